//! `mirror_top`: the filter a mirror (or active commit) puts above its source. Every write
//! passing through marks the mirror's dirty bitmap once it is done, so the job copies it
//! again; in write-blocking mode the write also goes to the target before the client hears
//! back, and the granules it covers are in sync at once.
//!
//! The bitmap is disabled for the node's own recording (QEMU shows it `recording: false`):
//! the filter marks it itself, because in write-blocking mode marking and clearing must
//! happen while the range is held against the job's copies.

use crate::bitmap::DirtyBitmap;
use crate::foreground::Foreground;
use crate::node::{Child, DriverInfo, Extent, Node, WriteFlags};
use crate::perm::Perms;
use crate::range_lock::RangeLock;
use crate::Driver;
use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

/// What the filter and its job share.
pub struct MirrorState {
    bitmap: Arc<DirtyBitmap>,
    ranges: RangeLock,
    /// The job's writing edge on the target; gone once the job lets go.
    target: ArcSwapOption<Child>,
    write_blocking: AtomicBool,
    /// Write-blocking client writes between their range lock and their end.
    active_writes: AtomicUsize,
    /// A client write could not reach the target: the bitmap still covers it, but the
    /// job must hear of it (QEMU reports it as a target error of the job).
    target_write_failed: AtomicBool,
    /// Signalled when a client write made something dirty.
    dirtied: Notify,
    /// Bytes client writes marked dirty, counted once per write (a range dirtied twice
    /// counts twice): the job's dirty rate.
    dirtied_bytes: AtomicU64,
    /// Client requests through the filter, which the job makes room for.
    foreground: Foreground,
}

impl MirrorState {
    /// The state of a new mirror. `bitmap`, the job's dirty bitmap, stops recording on its
    /// own (the filter marks it from now on); `target` is the job's writing edge on the
    /// target; `write_blocking` is QMP `copy-mode: write-blocking`.
    pub fn new(bitmap: Arc<DirtyBitmap>, target: Arc<Child>, write_blocking: bool) -> MirrorState {
        bitmap.set_enabled(false);
        MirrorState {
            bitmap,
            ranges: RangeLock::default(),
            target: ArcSwapOption::new(Some(target)),
            write_blocking: AtomicBool::new(write_blocking),
            active_writes: AtomicUsize::new(0),
            target_write_failed: AtomicBool::new(false),
            dirtied: Notify::new(),
            dirtied_bytes: AtomicU64::new(0),
            foreground: Foreground::default(),
        }
    }

    /// When clients last wrote or read through the filter.
    pub fn foreground(&self) -> &Foreground {
        &self.foreground
    }

    /// The dirty bitmap: what the job still has to copy.
    pub fn bitmap(&self) -> &Arc<DirtyBitmap> {
        &self.bitmap
    }

    /// Locks on whole granules (see `granule_span`): the job holds one around each copy, so
    /// a write-blocking client write and a copy of the same granule never overlap.
    pub fn ranges(&self) -> &RangeLock {
        &self.ranges
    }

    /// The job's writing edge on the target; None once `release_target` ran.
    pub fn target(&self) -> Option<Arc<Child>> {
        self.target.load_full()
    }

    /// The job is over: release the target (and its permissions) and stop mirroring writes.
    pub fn release_target(&self) -> Option<Arc<Child>> {
        self.write_blocking.store(false, Ordering::Release);
        self.target.swap(None)
    }

    /// Whether client writes go to the target too before they complete.
    pub fn is_write_blocking(&self) -> bool {
        self.write_blocking.load(Ordering::Acquire)
    }

    /// From the next client write on, copy client writes to the target before they
    /// complete (block-job-change to `write-blocking`, or the job's own switch when
    /// background copying does not converge).
    pub fn set_write_blocking(&self) {
        self.write_blocking.store(true, Ordering::Release);
    }

    /// Client writes go to the source only again and mark what the job must copy; a
    /// write-blocking write already under way finishes on both sides.
    pub fn set_background(&self) {
        self.write_blocking.store(false, Ordering::Release);
    }

    /// Write-blocking client writes under way; while there are any, the job neither
    /// becomes READY nor finishes.
    pub fn active_writes(&self) -> usize {
        self.active_writes.load(Ordering::Acquire)
    }

    /// Resolves once a client write dirtied something since the last call.
    pub async fn dirtied(&self) {
        self.dirtied.notified().await
    }

    fn mark_dirty(&self, offset: u64, len: u64) {
        self.bitmap.set(offset, len);
        self.dirtied_bytes.fetch_add(len, Ordering::Relaxed);
        self.dirtied.notify_one();
    }

    /// Bytes client writes have marked dirty since the mirror started.
    pub fn dirtied_bytes(&self) -> u64 {
        self.dirtied_bytes.load(Ordering::Relaxed)
    }

    /// Whether a write-blocking client write failed on the target since the last call
    /// (and forget it): the job treats it as a target error, under `on-target-error`.
    pub fn take_target_write_failure(&self) -> bool {
        self.target_write_failed.swap(false, Ordering::AcqRel)
    }

    /// The range of whole granules covering `offset..offset+len`, which copies lock.
    pub fn granule_span(&self, offset: u64, len: u64) -> (u64, u64) {
        let g = self.bitmap.granularity();
        (offset / g * g, (offset + len).div_ceil(g) * g)
    }
}

enum WriteOp<'a> {
    Data(&'a [u8], WriteFlags),
    Zeroes(u64, WriteFlags),
    Discard(u64),
}

impl WriteOp<'_> {
    fn len(&self) -> u64 {
        match self {
            WriteOp::Data(buf, _) => buf.len() as u64,
            WriteOp::Zeroes(len, _) | WriteOp::Discard(len) => *len,
        }
    }

    async fn apply(&self, to: &Child, offset: u64) -> io::Result<()> {
        match self {
            WriteOp::Data(buf, flags) => to.write(offset, buf, *flags).await,
            WriteOp::Zeroes(len, flags) => to.write_zeroes(offset, *len, *flags).await,
            WriteOp::Discard(len) => to.discard(offset, *len).await,
        }
    }
}

/// The `mirror_top` driver, with the mirror's source as its `backing` child. Only a mirror
/// job's setup creates it (`jobs::create_mirror`); blockdev-add does not offer it.
pub struct MirrorTop {
    state: Arc<MirrorState>,
}

impl MirrorTop {
    /// The filter of the mirror whose job holds `state` too.
    pub fn new(state: Arc<MirrorState>) -> MirrorTop {
        MirrorTop { state }
    }

    fn source(node: &Node) -> io::Result<Arc<Child>> {
        node.child("backing")
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))
    }

    async fn write_op(&self, node: &Node, offset: u64, op: WriteOp<'_>) -> io::Result<()> {
        self.state.foreground.note();
        let source = Self::source(node)?;
        let len = op.len();
        let target = match self.state.is_write_blocking() {
            true => self.state.target(),
            false => None,
        };
        let Some(target) = target else {
            let result = op.apply(&source, offset).await;
            self.state.mark_dirty(offset, len);
            return result;
        };
        self.state.active_writes.fetch_add(1, Ordering::AcqRel);
        let (start, end) = self.state.granule_span(offset, len);
        let result = {
            let _held = self.state.ranges.lock(start, end).await;
            let result = op.apply(&source, offset).await;
            if result.is_err() {
                self.state.mark_dirty(offset, len);
            } else if op.apply(&target, offset).await.is_ok() {
                // Granules this write covers whole now match; partly covered ones keep
                // whatever state they had, since the bytes written match on both sides.
                self.state.bitmap.reset(offset, len);
            } else {
                self.state
                    .target_write_failed
                    .store(true, Ordering::Release);
                self.state.mark_dirty(offset, len);
            }
            result
        };
        self.state.active_writes.fetch_sub(1, Ordering::AcqRel);
        result
    }
}

#[async_trait(?Send)]
impl Driver for MirrorTop {
    fn format_name(&self) -> &'static str {
        "mirror_top"
    }

    fn size(&self, node: &Node) -> u64 {
        node.backing().map_or(0, |b| b.size())
    }

    async fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.state.foreground.note();
        Self::source(node)?.read(offset, buf).await
    }

    async fn read_or_zero(
        &self,
        node: &Node,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<Option<bool>> {
        self.state.foreground.note();
        Self::source(node)?.read_or_zero(offset, buf).await
    }

    async fn write(
        &self,
        node: &Node,
        offset: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> io::Result<()> {
        self.write_op(node, offset, WriteOp::Data(buf, flags)).await
    }

    async fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        self.write_op(node, offset, WriteOp::Zeroes(len, flags))
            .await
    }

    async fn discard(&self, node: &Node, offset: u64, len: u64) -> io::Result<()> {
        self.write_op(node, offset, WriteOp::Discard(len)).await
    }

    async fn flush(&self, node: &Node) -> io::Result<()> {
        Self::source(node)?.flush().await
    }

    async fn block_status(&self, node: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        Self::source(node)?.node().block_status(offset, len).await
    }

    async fn truncate(&self, _: &Node, _size: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    /// The users' needs pass through; nobody may resize while the target must match.
    fn child_perms(&self, _: &str, perm: Perms, shared: Perms, _: bool) -> (Perms, Perms) {
        (
            (perm | Perms::CONSISTENT_READ) & !Perms::RESIZE,
            (shared | Perms::WRITE_UNCHANGED) & !Perms::RESIZE,
        )
    }

    fn info(&self, node: &Node) -> DriverInfo {
        let Some(source) = node.backing() else {
            return DriverInfo::default();
        };
        let info = source.driver().info(&source);
        DriverInfo {
            filename: info.filename,
            actual_size: info.actual_size,
            cluster_size: info.cluster_size,
            dirty_flag: Some(false),
            ..DriverInfo::default()
        }
    }

    fn filtered_child_role(&self) -> Option<&'static str> {
        Some("backing")
    }
}
