//! `copy-before-write`: a filter above a source that, before a write reaches a range the
//! target does not have yet, copies the old data there. The target then holds the source
//! as it was when the filter was inserted (a backup's point in time, or a fleecing image),
//! whatever writes arrive meanwhile. `snapshot-access` reads that point-in-time view.

use crate::copy::{BlockCopy, ClusterBitmap, TargetMode};
use crate::node::{Child, DriverInfo, Extent, ExtentKind, Node, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use async_trait::async_trait;
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CbwOptions {
    pub bitmap: Option<BitmapRef>,
    pub on_cbw_error: Option<OnCbwError>,
    pub cbw_timeout: Option<u64>,
    pub min_cluster_size: Option<u64>,
}

/// `BlockDirtyBitmap`: the bitmap whose dirty clusters are the only ones the filter
/// copies (the others are not part of the point in time).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct BitmapRef {
    pub node: String,
    pub name: String,
}

/// What a failed copy does (QMP `on-cbw-error`, QEMU's `OnCbwError`). A copy that
/// outlasts `cbw-timeout` counts as failed.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnCbwError {
    /// `break-guest-write`, the default: a failed copy fails the client's write, so the
    /// point in time stays intact.
    #[default]
    BreakGuestWrite,
    /// `break-snapshot`: a failed copy lets the client's write through and invalidates the
    /// point in time; reads of the snapshot-access view fail with EACCES from then on.
    BreakSnapshot,
}

/// Copy granularity: at least 64 KiB, and never below the target's cluster.
pub const MIN_CLUSTER: u64 = 64 * 1024;

/// The `copy-before-write` driver: its `file` child is the source, its `target` child
/// receives the old data. Opened from blockdev-add, or built by a backup job's setup
/// around the job's own [`BlockCopy`] (`with_copy`).
pub struct CopyBeforeWrite {
    copy: Arc<BlockCopy>,
    on_error: OnCbwError,
    timeout: Option<Duration>,
    /// Set once a copy failed under break-snapshot: reads of the view fail from then on.
    snapshot_broken: AtomicBool,
}

/// QEMU's bounds on `min-cluster-size` (a `size`, so -1 arrives as u64::MAX): at most
/// i64::MAX, and a power of two unless 0 (the target's own cluster size then).
pub fn check_min_cluster_size(size: u64) -> Result<(), String> {
    if size > i64::MAX as u64 {
        return Err(format!("min-cluster-size too large: {size} > {}", i64::MAX));
    }
    if size != 0 && !size.is_power_of_two() {
        return Err(
            "Cannot create block-copy-state: min-cluster-size needs to be a power of 2".into(),
        );
    }
    Ok(())
}

impl CopyBeforeWrite {
    /// Every cluster (or, with `only`, each one it marks dirty) starts as needing a copy:
    /// the point in time is "now".
    pub fn new(
        file: Arc<Child>,
        target: Arc<Child>,
        cluster_size: u64,
        only: Option<&crate::bitmap::DirtyBitmap>,
        on_error: OnCbwError,
        timeout: Option<Duration>,
    ) -> CopyBeforeWrite {
        let len = file.node().size();
        let pending = match only {
            Some(bitmap) => ClusterBitmap::from_dirty(bitmap, cluster_size, len),
            None => {
                let mut all = ClusterBitmap::new(len.div_ceil(cluster_size));
                all.set_range(0..all.len(), true);
                all
            }
        };
        CopyBeforeWrite::with_copy(
            Arc::new(BlockCopy::new(
                file,
                target,
                cluster_size,
                pending,
                TargetMode::default(),
            )),
            on_error,
            timeout,
        )
    }

    /// A filter over an existing copy state, shared with whoever made it (the backup job,
    /// which copies the same clusters in the background). `timeout`: QMP `cbw-timeout`,
    /// the longest a client write waits for its copy; None waits as long as it takes.
    pub fn with_copy(
        copy: Arc<BlockCopy>,
        on_error: OnCbwError,
        timeout: Option<Duration>,
    ) -> CopyBeforeWrite {
        CopyBeforeWrite {
            copy,
            on_error,
            timeout,
            snapshot_broken: AtomicBool::new(false),
        }
    }

    /// The copy state, for the snapshot-access node reading its point in time.
    pub(crate) fn block_copy(&self) -> &Arc<BlockCopy> {
        &self.copy
    }

    /// A copy failed under `break-snapshot`: the target no longer holds the point in time.
    pub(crate) fn snapshot_broken(&self) -> bool {
        self.snapshot_broken.load(Ordering::Acquire)
    }

    /// The copy granularity for a target: QEMU's max(64 KiB, target cluster).
    pub fn cluster_size_for(target: &Node) -> u64 {
        target
            .driver()
            .info(target)
            .cluster_size
            .unwrap_or(MIN_CLUSTER)
            .max(MIN_CLUSTER)
    }

    /// Before a write: save the old data of `[offset, offset+len)` to the target.
    async fn before_write(&self, offset: u64, len: u64) -> io::Result<()> {
        self.copy.foreground().note();
        if self.snapshot_broken() {
            return Ok(());
        }
        let copy = self.copy.copy_range(offset, len);
        let result = match self.timeout {
            Some(limit) => match tokio::time::timeout(limit, copy).await {
                Ok(r) => r.map_err(|e| clone_io(e.io())),
                Err(_) => Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
            },
            None => copy.await.map_err(|e| clone_io(e.io())),
        };
        match (result, self.on_error) {
            (Ok(()), _) => Ok(()),
            (Err(e), OnCbwError::BreakGuestWrite) => Err(e),
            (Err(e), OnCbwError::BreakSnapshot) => {
                tracing::warn!("copy-before-write failed, the snapshot is now invalid: {e}");
                self.snapshot_broken.store(true, Ordering::Release);
                Ok(())
            }
        }
    }

    fn file(&self) -> Arc<Node> {
        self.copy.source().node()
    }
}

fn clone_io(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

#[async_trait(?Send)]
impl Driver for CopyBeforeWrite {
    fn format_name(&self) -> &'static str {
        "copy-before-write"
    }

    fn size(&self, _: &Node) -> u64 {
        self.file().size()
    }

    async fn read(&self, _: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.copy.foreground().note();
        self.copy.source().read(offset, buf).await
    }

    async fn read_or_zero(
        &self,
        _: &Node,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<Option<bool>> {
        self.copy.foreground().note();
        self.copy.source().read_or_zero(offset, buf).await
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        self.before_write(offset, buf.len() as u64).await?;
        self.copy.source().write(offset, buf, flags).await
    }

    async fn write_zeroes(
        &self,
        _: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        self.before_write(offset, len).await?;
        self.copy.source().write_zeroes(offset, len, flags).await
    }

    async fn discard(&self, _: &Node, offset: u64, len: u64) -> io::Result<()> {
        self.before_write(offset, len).await?;
        self.copy.source().discard(offset, len).await
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        self.copy.source().flush().await?;
        self.copy.target().node().flush().await
    }

    async fn block_status(&self, _: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        self.file().block_status(offset, len).await
    }

    async fn truncate(&self, _: &Node, _size: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    fn child_perms(&self, role: &str, perm: Perms, shared: Perms, _: bool) -> (Perms, Perms) {
        match role {
            // Resizing would move the point in time's bounds: nobody may.
            "file" => (perm | Perms::CONSISTENT_READ, shared & !Perms::RESIZE),
            _ => (Perms::WRITE, Perms::ALL & !Perms::RESIZE),
        }
    }

    fn info(&self, node: &Node) -> DriverInfo {
        let file = self.file();
        let file_info = file.driver().info(&file);
        DriverInfo {
            filename: crate::graph::json_filename(node, &file_info.filename),
            actual_size: file_info.actual_size,
            cluster_size: Some(self.copy.cluster_size()),
            dirty_flag: Some(false),
            ..DriverInfo::default()
        }
    }

    fn filtered_child_role(&self) -> Option<&'static str> {
        Some("file")
    }
}

/// `snapshot-access`: the point-in-time view of a copy-before-write node, for fleecing
/// exports. Ranges not copied yet are read from the source while writes to them wait;
/// copied ranges are read from the target.
pub struct SnapshotAccess {
    cbw: Arc<Child>,
}

impl SnapshotAccess {
    pub fn new(cbw: Arc<Child>) -> Result<SnapshotAccess, String> {
        let node = cbw.node();
        if node.driver_as::<CopyBeforeWrite>().is_none() {
            return Err(format!(
                "snapshot-access must be opened on a copy-before-write node, not on '{}'",
                node.name()
            ));
        }
        Ok(SnapshotAccess { cbw })
    }

    fn with_cbw<T>(&self, f: impl FnOnce(&CopyBeforeWrite) -> T) -> T {
        let node = self.cbw.node();
        let cbw = node
            .driver_as::<CopyBeforeWrite>()
            .expect("checked at open: the child is a copy-before-write node");
        f(cbw)
    }
}

#[async_trait(?Send)]
impl Driver for SnapshotAccess {
    fn format_name(&self) -> &'static str {
        "snapshot-access"
    }

    fn size(&self, _: &Node) -> u64 {
        self.cbw.node().size()
    }

    async fn read(&self, _: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let (copy, broken) = self.with_cbw(|c| (c.block_copy().clone(), c.snapshot_broken()));
        if broken {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        copy.read_point_in_time(offset, buf).await
    }

    async fn write(&self, _: &Node, _: u64, _: &[u8], _: WriteFlags) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    async fn write_zeroes(&self, _: &Node, _: u64, _: u64, _: WriteFlags) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    /// Fleecing clients discard what they have read, so the target need not keep it.
    async fn discard(&self, _: &Node, offset: u64, len: u64) -> io::Result<()> {
        let copy = self.with_cbw(|c| c.block_copy().clone());
        copy.forget_point_in_time(offset, len).await
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        Ok(())
    }

    async fn block_status(&self, _: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        let copy = self.with_cbw(|c| c.block_copy().clone());
        let cluster = copy.cluster_size();
        // Report per cluster run: pending ranges by the source's status, copied ones as data.
        let end = (offset + len).min(copy.len());
        let first_end = ((offset / cluster) + 1) * cluster;
        let run = first_end.min(end) - offset;
        if copy.is_pending(offset) {
            let source = copy.source().node();
            let status = source.block_status_above(None, offset, run).await?;
            let kind = if status.zero {
                ExtentKind::Zero { allocated: true }
            } else {
                ExtentKind::Data
            };
            Ok(Extent {
                len: status.len.max(1).min(run),
                kind,
            })
        } else {
            Ok(Extent {
                len: run.max(1),
                kind: ExtentKind::Data,
            })
        }
    }

    async fn truncate(&self, _: &Node, _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    fn child_perms(&self, _: &str, _: Perms, _: Perms, _: bool) -> (Perms, Perms) {
        (Perms::CONSISTENT_READ, Perms::ALL)
    }

    fn info(&self, node: &Node) -> DriverInfo {
        DriverInfo {
            filename: crate::graph::json_filename(node, "snapshot-access"),
            ..DriverInfo::default()
        }
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: false,
    hands_over: false,
    names: &["copy-before-write"],
    open: |o, options| Box::pin(open_cbw(o, options)),
};

pub(crate) const SNAPSHOT_ACCESS: DriverEntry = DriverEntry {
    format: false,
    hands_over: false,
    names: &["snapshot-access"],
    open: |o, options| Box::pin(open_snapshot_access(o, options)),
};

async fn open_cbw(
    o: &mut Opener<'_>,
    mut options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let file_ref = o.take_child_ref(&mut options, "file")?;
    let target_ref = o.take_child_ref(&mut options, "target")?;
    let opts: CbwOptions = o.parse(options)?;
    let bitmap =
        match &opts.bitmap {
            Some(r) => {
                let owner = o.find_node(&r.node).ok_or_else(|| {
                    QmpError::generic(format!("Cannot find device='' nor node-name='{}'", r.node))
                })?;
                Some(owner.dirty_bitmap(&r.name).ok_or_else(|| {
                    QmpError::generic(format!("Dirty bitmap '{}' not found", r.name))
                })?)
            }
            None => None,
        };
    let file = o
        .open_child(
            file_ref,
            "file",
            Perms::CONSISTENT_READ,
            Perms::ALL & !Perms::RESIZE,
        )
        .await?;
    let target = o
        .open_child(
            target_ref,
            "target",
            Perms::WRITE,
            Perms::ALL & !Perms::RESIZE,
        )
        .await?;
    let min_cluster = opts.min_cluster_size.unwrap_or(0);
    check_min_cluster_size(min_cluster).map_err(QmpError::generic)?;
    let cluster = CopyBeforeWrite::cluster_size_for(&target.node()).max(min_cluster);
    Ok(Box::new(CopyBeforeWrite::new(
        file,
        target,
        cluster,
        bitmap.as_deref(),
        opts.on_cbw_error.unwrap_or_default(),
        opts.cbw_timeout.filter(|&s| s > 0).map(Duration::from_secs),
    )))
}

/// snapshot-access takes no options of its own.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotAccessOptions {}

async fn open_snapshot_access(
    o: &mut Opener<'_>,
    mut options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let file_ref = o.take_child_ref(&mut options, "file")?;
    o.parse::<SnapshotAccessOptions>(options)?;
    let file = o
        .open_child(file_ref, "file", Perms::CONSISTENT_READ, Perms::ALL)
        .await?;
    Ok(Box::new(
        SnapshotAccess::new(file).map_err(QmpError::generic)?,
    ))
}
