//! `compress`: a filter that stores every write to its `file` child compressed (QEMU's
//! compress driver), for a format that takes compressed writes (qcow2, vmdk streams). A
//! compressed write covers whole clusters: one that does not is widened to them here,
//! the rest of its clusters read from the child first, as QEMU's block layer does for
//! the filter's cluster-sized request alignment. Like QEMU, a cluster is written
//! compressed once: the format refuses a second write into it.

use crate::node::{Child, DriverInfo, Extent, Node, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use async_trait::async_trait;
use qapi::error::QmpError;
use serde_json::{Map, Value};
use std::io;
use std::sync::Arc;

pub struct Compress {
    file: Arc<Child>,
}

impl Compress {
    /// The child's cluster size: the unit of its compressed writes.
    fn cluster(&self) -> u64 {
        let node = self.file.node();
        node.driver()
            .info(&node)
            .cluster_size
            .unwrap_or(512)
            .max(512)
    }
}

#[async_trait(?Send)]
impl Driver for Compress {
    fn format_name(&self) -> &'static str {
        "compress"
    }

    fn size(&self, _: &Node) -> u64 {
        self.file.node().size()
    }

    async fn read(&self, _: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read(offset, buf).await
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        let compressed = WriteFlags {
            compressed: true,
            ..flags
        };
        let (cluster, size) = (self.cluster(), self.file.node().size());
        let end = offset + buf.len() as u64;
        // The disk's last cluster may be cut short by its end.
        let (start, stop) = (
            offset - offset % cluster,
            end.next_multiple_of(cluster).min(size),
        );
        if start == offset && stop == end {
            return self.file.write(offset, buf, compressed).await;
        }
        let mut whole = vec![0u8; (stop - start) as usize];
        self.file.read(start, &mut whole).await?;
        whole[(offset - start) as usize..(end - start) as usize].copy_from_slice(buf);
        self.file.write(start, &whole, compressed).await
    }

    async fn write_zeroes(
        &self,
        _: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        self.file.write_zeroes(offset, len, flags).await
    }

    async fn discard(&self, _: &Node, offset: u64, len: u64) -> io::Result<()> {
        self.file.discard(offset, len).await
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        self.file.flush().await
    }

    async fn block_status(&self, _: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        self.file.node().status_for_filter(offset, len).await
    }

    async fn truncate(&self, _: &Node, size: u64) -> io::Result<()> {
        self.file.node().truncate(size).await
    }

    fn supports_compressed_writes(&self) -> bool {
        true
    }

    fn child_perms(&self, _: &str, perm: Perms, shared: Perms, _: bool) -> (Perms, Perms) {
        (perm, shared)
    }

    fn info(&self, node: &Node) -> DriverInfo {
        DriverInfo::of_filter(node, &self.file)
    }

    fn filtered_child_role(&self) -> Option<&'static str> {
        Some("file")
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: false,
    hands_over: true,
    names: &["compress"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let file = o.open_file_only(options).await?;
    let node = file.node();
    if !node.driver().supports_compressed_writes() {
        return Err(QmpError::generic(format!(
            "Compression is not supported for underlying format: {}",
            node.driver().format_name()
        )));
    }
    Ok(Box::new(Compress { file }))
}
