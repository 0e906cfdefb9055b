//! `preallocate`: a filter between a format and its file (QEMU's preallocate driver). When
//! a write goes past the file's end, the file is first grown by `prealloc-size` more bytes
//! of allocated zeroes (its new end aligned to `prealloc-align`), so that a growing image
//! asks the file system for space in large steps instead of one cluster at a time.
//!
//! The format above sees the file's size as the end of what was written (`data_end`), not
//! the preallocated length; the tail beyond it is cut off when the node closes or hands the
//! image over, so the image on disk never keeps the preallocation. Preallocation is a
//! hint: when the file cannot be grown that way the write goes on without it, as in QEMU.
//! It only happens while this node is the file's only writer (it then also holds the
//! file's resize permission), since another writer could not know of the tail.

use crate::node::{Child, DriverInfo, Extent, Node, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use async_trait::async_trait;
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub struct Preallocate {
    file: Arc<Child>,
    /// QMP `prealloc-align`: the preallocated end is a multiple of it (0: no alignment).
    align: u64,
    /// QMP `prealloc-size`: how far past a write's end the file is grown.
    size: u64,
    /// The end of the data written: the size the node shows.
    data_end: AtomicU64,
    /// The file's real length, preallocated tail included.
    file_end: AtomicU64,
    /// This node has write permission: preallocation may happen (see the module comment).
    writing: AtomicBool,
    /// The file could not be grown once: no more preallocation on this node.
    gave_up: AtomicBool,
    /// One preallocation at a time; concurrent writes past the end wait for it.
    growing: tokio::sync::Mutex<()>,
}

impl Preallocate {
    /// Grow the file ahead of a write ending at `end`, if it would go past the file's end.
    async fn prepare(&self, end: u64) {
        if !self.writing.load(Ordering::Acquire) || end <= self.file_end.load(Ordering::Acquire) {
            return;
        }
        let _growing = self.growing.lock().await;
        let file_end = self.file_end.load(Ordering::Acquire);
        if end <= file_end {
            return;
        }
        let target = end.saturating_add(self.size);
        let target = match self.align {
            0 | 1 => target,
            align => target.div_ceil(align).saturating_mul(align),
        };
        let start = file_end.max(self.data_end.load(Ordering::Acquire));
        let zeroes = WriteFlags {
            no_fallback: true,
            ..WriteFlags::default()
        };
        match self.file.write_zeroes(start, target - start, zeroes).await {
            Ok(()) => self.file_end.store(target, Ordering::Release),
            Err(e) => {
                // Not tried again: this write now extends the file itself, past the end
                // known here, and a later preallocation from that stale end would zero
                // over it while it is under way.
                tracing::debug!("preallocate: file not grown ({e}), writing without from now on");
                self.writing.store(false, Ordering::Release);
                self.gave_up.store(true, Ordering::Release);
            }
        }
    }

    fn written(&self, end: u64) {
        self.data_end.fetch_max(end, Ordering::AcqRel);
        self.file_end.fetch_max(end, Ordering::AcqRel);
    }

    /// Cut the preallocated tail off the file: it ends where the data ends.
    async fn cut_tail(&self) -> io::Result<()> {
        let _growing = self.growing.lock().await;
        let data_end = self.data_end.load(Ordering::Acquire);
        if self.file_end.load(Ordering::Acquire) > data_end {
            self.file.node().truncate(data_end).await?;
            self.file_end.store(data_end, Ordering::Release);
        }
        Ok(())
    }
}

#[async_trait(?Send)]
impl Driver for Preallocate {
    fn format_name(&self) -> &'static str {
        "preallocate"
    }

    fn size(&self, _: &Node) -> u64 {
        self.data_end.load(Ordering::Acquire)
    }

    async fn read(&self, _: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read(offset, buf).await
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        self.prepare(end).await;
        self.file.write(offset, buf, flags).await?;
        self.written(end);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        _: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        let end = offset + len;
        self.prepare(end).await;
        self.file.write_zeroes(offset, len, flags).await?;
        self.written(end);
        Ok(())
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
        let _growing = self.growing.lock().await;
        self.file.node().truncate(size).await?;
        self.data_end.store(size, Ordering::Release);
        self.file_end.store(size, Ordering::Release);
        Ok(())
    }

    fn child_perms(&self, _: &str, perm: Perms, shared: Perms, _: bool) -> (Perms, Perms) {
        if perm.contains(Perms::WRITE) {
            // The only writer of the file, which it grows.
            (
                perm | Perms::RESIZE,
                shared.minus(Perms::WRITE | Perms::RESIZE),
            )
        } else if self.file_end.load(Ordering::Acquire) > self.data_end.load(Ordering::Acquire) {
            // The writer above is gone (handed over, closing) but the tail is still there:
            // the right to cut it stays until it is cut.
            (perm | Perms::RESIZE, shared.minus(Perms::RESIZE))
        } else {
            (perm, shared)
        }
    }

    fn apply_perms(&self, perm: Perms, _shared: Perms) -> Result<(), String> {
        let writing = perm.contains(Perms::WRITE) && !self.gave_up.load(Ordering::Acquire);
        self.writing.store(writing, Ordering::Release);
        Ok(())
    }

    fn info(&self, node: &Node) -> DriverInfo {
        DriverInfo::of_filter(node, &self.file)
    }

    fn extends_on_write(&self) -> bool {
        true
    }

    async fn inactivate(&self, _: &Node) -> Result<(), String> {
        self.cut_tail().await.map_err(|e| e.to_string())
    }

    /// Another process may have written meanwhile: the file's length is the data's end.
    async fn activate(&self, _: &Node) -> Result<(), String> {
        let size = self.file.node().size();
        self.data_end.store(size, Ordering::Release);
        self.file_end.store(size, Ordering::Release);
        Ok(())
    }

    async fn close(&self, _: &Node) -> io::Result<()> {
        self.cut_tail().await
    }

    fn filtered_child_role(&self) -> Option<&'static str> {
        Some("file")
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: false,
    hands_over: true,
    names: &["preallocate"],
    open: |o, options| Box::pin(open(o, options)),
};

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct PreallocateOptions {
    prealloc_align: Option<i64>,
    prealloc_size: Option<i64>,
}

/// A size option: QEMU reads these as sizes, which are never negative.
fn size_option(value: Option<i64>, name: &str, default: u64) -> Result<u64, QmpError> {
    match value {
        None => Ok(default),
        Some(v) => u64::try_from(v).map_err(|_| {
            QmpError::generic(format!(
                "Value '{v}' is out of range for parameter '{name}'"
            ))
        }),
    }
}

async fn open(
    o: &mut Opener<'_>,
    mut options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let file_ref = o.take_child_ref(&mut options, "file")?;
    let opts: PreallocateOptions = o.parse(options)?;
    let align = size_option(opts.prealloc_align, "prealloc-align", 1 << 20)?;
    let size = size_option(opts.prealloc_size, "prealloc-size", 128 << 20)?;
    if align % 512 != 0 {
        return Err(QmpError::generic(
            "prealloc-align parameter of preallocate filter is not aligned to 512",
        ));
    }
    let file = o
        .open_child(file_ref, "file", Perms::NONE, Perms::ALL)
        .await?;
    let end = file.node().size();
    Ok(Box::new(Preallocate {
        file,
        align,
        size,
        data_end: AtomicU64::new(end),
        file_end: AtomicU64::new(end),
        writing: AtomicBool::new(false),
        gave_up: AtomicBool::new(false),
        growing: tokio::sync::Mutex::new(()),
    }))
}
