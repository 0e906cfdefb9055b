//! `copy-on-read`: the filter block-stream puts above the node it fills. The job copies
//! ranges from the backing chain into the node only where the node holds nothing yet; a
//! client write landing between that check and the copy would be overwritten with older
//! data, so writes and the job's copies hold their range against each other here.

use crate::node::{Child, DriverInfo, Extent, Node, WriteFlags};
use crate::perm::Perms;
use crate::range_lock::RangeLock;
use crate::Driver;
use async_trait::async_trait;
use std::io;
use std::sync::Arc;

/// The filter block-stream's setup inserts, with its `file` child the node being filled.
/// Only the stream job creates it (blockdev-add does not offer it), and it copies nothing
/// itself: reads pass through, and client writes, write-zeroes and discards hold their
/// range in `ranges` against the job's copies.
#[derive(Default)]
pub struct CopyOnRead {
    ranges: Arc<RangeLock>,
}

impl CopyOnRead {
    /// The lock the stream job takes around each copy.
    pub fn ranges(&self) -> &Arc<RangeLock> {
        &self.ranges
    }

    fn file(node: &Node) -> io::Result<Arc<Child>> {
        node.child("file")
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))
    }
}

#[async_trait(?Send)]
impl Driver for CopyOnRead {
    fn format_name(&self) -> &'static str {
        "copy-on-read"
    }

    fn size(&self, node: &Node) -> u64 {
        node.child("file").map_or(0, |f| f.node().size())
    }

    async fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        Self::file(node)?.read(offset, buf).await
    }

    async fn write(
        &self,
        node: &Node,
        offset: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> io::Result<()> {
        let _held = self.ranges.lock(offset, offset + buf.len() as u64).await;
        Self::file(node)?.write(offset, buf, flags).await
    }

    async fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        let _held = self.ranges.lock(offset, offset + len).await;
        Self::file(node)?.write_zeroes(offset, len, flags).await
    }

    async fn discard(&self, node: &Node, offset: u64, len: u64) -> io::Result<()> {
        let _held = self.ranges.lock(offset, offset + len).await;
        Self::file(node)?.discard(offset, len).await
    }

    async fn flush(&self, node: &Node) -> io::Result<()> {
        Self::file(node)?.flush().await
    }

    async fn block_status(&self, node: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        Self::file(node)?.node().block_status(offset, len).await
    }

    async fn truncate(&self, _: &Node, _size: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    fn child_perms(&self, _: &str, perm: Perms, shared: Perms, _: bool) -> (Perms, Perms) {
        (
            perm | Perms::CONSISTENT_READ,
            (shared | Perms::WRITE_UNCHANGED) & !Perms::RESIZE,
        )
    }

    fn info(&self, node: &Node) -> DriverInfo {
        let Some(file) = node.child("file").map(|f| f.node()) else {
            return DriverInfo::default();
        };
        let info = file.driver().info(&file);
        DriverInfo {
            filename: info.filename,
            actual_size: info.actual_size,
            dirty_flag: Some(false),
            ..DriverInfo::default()
        }
    }

    fn filtered_child_role(&self) -> Option<&'static str> {
        Some("file")
    }
}
