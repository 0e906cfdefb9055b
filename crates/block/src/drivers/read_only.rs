//! What the formats QEMU only reads (bochs, cloop, dmg) share: a writable open refused,
//! writes failing with EACCES, nothing to flush, and the file child's name and size in
//! query results. Each format says how big its disk is, how to read it, and, where it
//! knows, which parts read as zeroes; [`ReadOnly`] makes that a [`Driver`].

use crate::node::{Child, DriverInfo, Extent, ExtentKind, Node, WriteFlags};
use crate::open::Opener;
use crate::perm::Perms;
use crate::Driver;
use async_trait::async_trait;
use qapi::error::QmpError;
use serde_json::{Map, Value};
use std::io;
use std::sync::Arc;

/// A read-only format's own part.
#[async_trait(?Send)]
pub(crate) trait ReadOnlyImage: Send + Sync + 'static {
    /// QEMU's driver name.
    const NAME: &'static str;

    /// The image file.
    fn file(&self) -> &Arc<Child>;

    /// The disk's size in bytes.
    fn size(&self) -> u64;

    /// Fill `buf` from `offset`, which the caller has checked lies in the disk.
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// What the `len` bytes at `offset`, inside the disk, start with: data, unless the
    /// format knows better.
    async fn block_status(&self, _offset: u64, len: u64) -> io::Result<Extent> {
        Ok(Extent {
            len,
            kind: ExtentKind::Data,
        })
    }
}

/// A read-only format as a driver.
pub(crate) struct ReadOnly<T>(pub T);

/// What a write to a read-only format fails with.
fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EACCES)
}

/// Open a read-only format's file child from its options. The format cannot be written:
/// a writable node is refused unless it may become read-only (`auto-read-only`), as in
/// QEMU.
pub(crate) async fn open_file(
    o: &mut Opener<'_>,
    options: Map<String, Value>,
) -> Result<Arc<Child>, QmpError> {
    let file_ref = o.take_file_only(options)?;
    let common = o.common();
    if !common.read_only && !common.auto_read_only {
        return Err(QmpError::generic("Image is read-only"));
    }
    o.open_child(file_ref, "file", Perms::NONE, Perms::ALL)
        .await
}

#[async_trait(?Send)]
impl<T: ReadOnlyImage> Driver for ReadOnly<T> {
    fn format_name(&self) -> &'static str {
        T::NAME
    }

    fn size(&self, _node: &Node) -> u64 {
        self.0.size()
    }

    async fn read(&self, _node: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset.saturating_add(buf.len() as u64) > self.0.size() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.0.read(offset, buf).await
    }

    async fn write(&self, _: &Node, _: u64, _: &[u8], _: WriteFlags) -> io::Result<()> {
        Err(read_only())
    }

    async fn write_zeroes(&self, _: &Node, _: u64, _: u64, _: WriteFlags) -> io::Result<()> {
        Err(read_only())
    }

    async fn discard(&self, _: &Node, _offset: u64, _len: u64) -> io::Result<()> {
        Err(read_only())
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        Ok(())
    }

    async fn block_status(&self, _node: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        let size = self.0.size();
        if offset >= size {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.0.block_status(offset, len.min(size - offset)).await
    }

    async fn truncate(&self, _: &Node, _size: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    fn child_perms(&self, role: &str, perm: Perms, _: Perms, _: bool) -> (Perms, Perms) {
        crate::perm::format_child_perms(role, perm, true)
    }

    fn info(&self, _node: &Node) -> DriverInfo {
        DriverInfo::of_storage(self.0.file())
    }
}
