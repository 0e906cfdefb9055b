//! `raw`: the image is the bytes of its `file` child, optionally a window of it.
//!
//! Like QEMU's raw driver it fires `read_aio` and `write_aio` on its file before guest
//! reads and writes, and no other blkdebug event.

use crate::drivers::blkdebug::BlkdebugEvent;
use crate::node::{Child, DriverInfo, Extent, ExtentKind, Node, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use aio::IoBuf;
use async_trait::async_trait;
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RawOptions {
    pub offset: Option<u64>,
    pub size: Option<u64>,
}

pub struct Raw {
    file: Arc<Child>,
    offset: u64,
    /// Fixed by the `size` option; otherwise the file's size less the offset.
    fixed_size: Option<u64>,
    /// The file length seen last, so a size query needs no syscall.
    file_size: AtomicU64,
}

impl Raw {
    pub fn new(file: Arc<Child>, opts: RawOptions) -> Result<Raw, String> {
        let offset = opts.offset.unwrap_or(0);
        let file_size = file.node().size();
        let size = opts.size.unwrap_or(file_size.saturating_sub(offset));
        if offset.checked_add(size).is_none_or(|end| end > file_size) {
            return Err(format!(
                "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the  actual size of the containing file ({file_size})"
            ));
        }
        Ok(Raw {
            file,
            offset,
            fixed_size: opts.size,
            file_size: AtomicU64::new(file_size),
        })
    }

    fn file(&self) -> Arc<Node> {
        self.file.node()
    }

    /// Pass-through permissions: raw adds no constraints of its own.
    pub fn default_child_perms() -> (Perms, Perms) {
        (Perms::NONE, Perms::ALL)
    }
}

#[async_trait(?Send)]
impl Driver for Raw {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn size(&self, _node: &Node) -> u64 {
        match self.fixed_size {
            Some(size) => size,
            None => {
                let file_size = self.file().size();
                self.file_size.store(file_size, Ordering::Relaxed);
                file_size.saturating_sub(self.offset)
            }
        }
    }

    async fn read(&self, _node: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.debug_event(BlkdebugEvent::ReadAio);
        self.file.read(self.offset + offset, buf).await
    }

    /// The file's answer: a protocol whose block status is dear (rbd) answers reads as
    /// data, and raw over it must not make the NBD server ask block status per read.
    async fn read_or_zero(
        &self,
        _node: &Node,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<Option<bool>> {
        let answer = self.file.read_or_zero(self.offset + offset, buf).await?;
        // Counted only when the file read: a `None` is followed by a plain `read`.
        if answer.is_some() {
            self.file.debug_event(BlkdebugEvent::ReadAio);
        }
        Ok(answer)
    }

    async fn read_buf(&self, _node: &Node, offset: u64, buf: IoBuf) -> io::Result<IoBuf> {
        self.file.debug_event(BlkdebugEvent::ReadAio);
        self.file.read_buf(self.offset + offset, buf).await
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        self.file.debug_event(BlkdebugEvent::WriteAio);
        self.file.write(self.offset + offset, buf, flags).await
    }

    async fn write_buf(
        &self,
        _: &Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> io::Result<IoBuf> {
        self.file.debug_event(BlkdebugEvent::WriteAio);
        self.file.write_buf(self.offset + offset, buf, flags).await
    }

    async fn write_zeroes(
        &self,
        _: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        self.file
            .write_zeroes(self.offset + offset, len, flags)
            .await
    }

    async fn discard(&self, _: &Node, offset: u64, len: u64) -> io::Result<()> {
        self.file.discard(self.offset + offset, len).await
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        self.file.flush().await
    }

    async fn block_status(&self, _: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        let extent = self.file().block_status(self.offset + offset, len).await?;
        // A raw image has no backing: whatever the file does not hold reads as zeroes here.
        let kind = match extent.kind {
            ExtentKind::Unallocated => ExtentKind::Zero { allocated: true },
            kind => kind,
        };
        Ok(Extent {
            len: extent.len,
            kind,
        })
    }

    async fn reopen(&self, _: &Node, writable: bool) -> Result<(), String> {
        self.file().set_writable(writable).await
    }

    async fn truncate(&self, _: &Node, size: u64) -> io::Result<()> {
        if self.fixed_size.is_some() || self.offset != 0 {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        self.file().truncate(size).await
    }

    fn child_perms(&self, _: &str, perm: Perms, shared: Perms, _: bool) -> (Perms, Perms) {
        (perm, shared)
    }

    fn info(&self, node: &Node) -> DriverInfo {
        let file = self.file();
        let file_info = file.driver().info(&file);
        DriverInfo {
            filename: if self.offset == 0 && self.fixed_size.is_none() {
                file_info.filename
            } else {
                crate::graph::json_filename(node, &file_info.filename)
            },
            actual_size: file_info.actual_size,
            dirty_flag: Some(false),
            ..DriverInfo::default()
        }
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: true,
    hands_over: true,
    names: &["raw"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    mut options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let file_ref = o.take_child_ref(&mut options, "file")?;
    let opts: RawOptions = o.parse(options)?;
    let (perm, shared) = Raw::default_child_perms();
    let file = o.open_child(file_ref, "file", perm, shared).await?;
    Ok(Box::new(Raw::new(file, opts).map_err(QmpError::generic)?))
}
