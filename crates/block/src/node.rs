//! A node of the block graph and the request path every I/O goes through.
//!
//! `Node` methods do the work common to all drivers once (bounds, read-only checks, request
//! tracking for drain, detect-zeroes); drivers only do their own format or protocol work.

use crate::bitmap::DirtyBitmap;
use crate::drivers::blkdebug::BlkdebugEvent;
use crate::perm::Perms;
use crate::stats::{Accounting, IoKind, NodeStats};
use crate::threshold::{ThresholdHook, WriteThreshold};
use aio::IoBuf;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use qapi::error::QmpError;
use serde_json::{json, Value};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use tokio::sync::Notify;

/// What one layer knows about a range, starting at the queried offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Bytes from the queried offset that share `kind`; 0 only at or past the end.
    pub len: u64,
    /// What the layer holds there.
    pub kind: ExtentKind,
}

/// What one layer holds for a range (`Driver::block_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// This layer holds data for the range.
    Data,
    /// The range reads as zeroes; `allocated` says whether this layer decides that (a zero
    /// cluster, a hole in a file) or the range is merely absent here and nothing lies below.
    Zero {
        /// This layer decides the zeroes (QEMU's BDRV_BLOCK_ALLOCATED).
        allocated: bool,
    },
    /// This layer does not hold the range: reads fall through to the backing node.
    Unallocated,
}

/// Block status resolved down a backing chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainExtent {
    /// Bytes from the queried offset that share this status; 0 only at or past the end.
    pub len: u64,
    /// Reads as zeroes.
    pub zero: bool,
    /// Some layer of the chain holds the range (as data or as an explicit zero).
    pub allocated: bool,
    /// 1 for the queried node, 2 for its backing, ...; 0 when no layer allocates the range.
    pub depth: u32,
}

/// How a write or zero write is to be done (QEMU's BdrvRequestFlags), passed down to the
/// driver; the default is a plain write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is stable when the request completes.
    pub fua: bool,
    /// A zero write may deallocate (punch a hole, drop a cluster) instead of writing zeroes.
    pub may_unmap: bool,
    /// A zero write must fail with ENOTSUP rather than fall back to slow explicit zeroes.
    pub no_fallback: bool,
    /// Store the data compressed (QEMU's BDRV_REQ_WRITE_COMPRESSED): whole clusters, into
    /// clusters not allocated yet. ENOTSUP where the driver cannot
    /// ([`Driver::supports_compressed_writes`]).
    pub compressed: bool,
}

/// Information a driver reports for query-named-block-nodes.
#[derive(Clone, Debug, Default)]
pub struct DriverInfo {
    pub filename: String,
    pub actual_size: Option<u64>,
    pub cluster_size: Option<u64>,
    pub dirty_flag: Option<bool>,
    /// The data is encrypted (luks, qcow2 with `encrypt`).
    pub encrypted: bool,
    pub format_specific: Option<Value>,
    pub backing_filename: Option<String>,
    pub backing_format: Option<String>,
}

impl DriverInfo {
    /// A format's report as far as its storage child `file` gives it: the file name and
    /// the space it takes.
    pub fn of_storage(file: &Child) -> DriverInfo {
        let node = file.node();
        let info = node.driver().info(&node);
        DriverInfo {
            filename: info.filename,
            actual_size: info.actual_size,
            ..DriverInfo::default()
        }
    }

    /// A filter's report over its data child `file`: QEMU's json: file name of the pair,
    /// the child's space and cluster size.
    pub fn of_filter(node: &Node, file: &Child) -> DriverInfo {
        let file = file.node();
        let info = file.driver().info(&file);
        DriverInfo {
            filename: crate::graph::json_filename(node, &info.filename),
            actual_size: info.actual_size,
            cluster_size: info.cluster_size,
            dirty_flag: Some(false),
            ..DriverInfo::default()
        }
    }
}

/// One internal snapshot of an image (QEMU's SnapshotInfo).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// QMP `id`: the ID the image gave the snapshot (qcow2 numbers them "1", "2", ...).
    pub id: String,
    /// QMP `name`: the name it was taken with.
    pub name: String,
    /// QMP `vm-state-size`: bytes of VM state saved with it; 0 for a disk-only snapshot.
    pub vm_state_size: u64,
    /// QMP `date-sec`: when it was taken, in seconds since the Unix epoch.
    pub date_sec: u32,
    /// QMP `date-nsec`: the nanoseconds within `date_sec`.
    pub date_nsec: u32,
    /// The guest clock when it was taken, in ns; QMP splits it into `vm-clock-sec` and
    /// `vm-clock-nsec`.
    pub vm_clock_nsec: u64,
    /// Instructions counted when icount was on; None when it was not.
    pub icount: Option<u64>,
}

impl SnapshotInfo {
    /// SnapshotInfo as QMP reports it.
    pub fn to_json(&self) -> Value {
        let mut value = json!({
            "id": self.id,
            "name": self.name,
            "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec / 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        });
        if let Some(icount) = self.icount {
            value["icount"] = json!(icount);
        }
        value
    }
}

/// The format- or protocol-specific part of a node.
///
/// Futures are not `Send`: they run on the I/O thread that issued them (see docs/DESIGN.md).
#[async_trait(?Send)]
pub trait Driver: std::any::Any + Send + Sync + 'static {
    /// QEMU's driver name (`drv` in query-named-block-nodes).
    fn format_name(&self) -> &'static str;

    /// Virtual size in bytes.
    fn size(&self, node: &Node) -> u64;

    /// Fill `buf` from byte `offset`. The node has checked that the range lies within
    /// `size`.
    async fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// [`read`](Self::read) into a buffer given for the time of the request and handed
    /// back filled. Drivers whose data lies in a file override it so that the kernel fills
    /// the buffer in place; the default reads through a slice of it.
    async fn read_buf(&self, node: &Node, offset: u64, mut buf: IoBuf) -> io::Result<IoBuf> {
        self.read(node, offset, buf.as_mut_slice()).await?;
        Ok(buf)
    }

    /// A read that also tells whether the range reads as zeroes, for a driver that learns
    /// it in the lookup that serves the read (an NBD server then answers with a hole and
    /// needs no separate block status): `Some(true)` zeroes (`buf` is zero-filled),
    /// `Some(false)` data. `None`: the driver cannot tell cheaply and read nothing.
    async fn read_or_zero(
        &self,
        _node: &Node,
        _offset: u64,
        _buf: &mut [u8],
    ) -> io::Result<Option<bool>> {
        Ok(None)
    }

    /// Write `buf` at byte `offset`. The node has checked that it is writable and that the
    /// range lies within `size` (or that `extends_on_write`), and marks the range in its
    /// dirty bitmaps afterwards.
    async fn write(
        &self,
        node: &Node,
        offset: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> io::Result<()>;

    /// [`write`](Self::write) of a buffer given for the time of the request and handed
    /// back; overridden as [`read_buf`](Self::read_buf) is.
    async fn write_buf(
        &self,
        node: &Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> io::Result<IoBuf> {
        self.write(node, offset, buf.as_slice(), flags).await?;
        Ok(buf)
    }

    /// Make `len` bytes at `offset` read as zeroes, checked as for `write`. `may_unmap` is
    /// already cleared unless the node has `discard=unmap`.
    async fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()>;

    /// Let the storage drop `len` bytes at `offset`, whose content is then unspecified (a
    /// hole, a freed cluster). Only called with `discard=unmap`, for a range within `size`.
    async fn discard(&self, node: &Node, offset: u64, len: u64) -> io::Result<()>;

    /// Make completed writes durable, down through the children the driver writes to (a
    /// format its metadata and `file`). Not called with `cache.no-flush`.
    async fn flush(&self, node: &Node) -> io::Result<()>;

    /// Status of this layer only, from `offset`, for at most `len` bytes.
    async fn block_status(&self, node: &Node, offset: u64, len: u64) -> io::Result<Extent>;

    /// Resize to `size` bytes (block_resize, a job matching its target to the source); the
    /// node has checked that it is writable and resizes its bitmaps after. ENOTSUP where
    /// the driver cannot.
    async fn truncate(&self, node: &Node, size: u64) -> io::Result<()>;

    /// The permissions this node needs on its child `role`, given what its own parents need
    /// (`perm`) and share (`shared`).
    fn child_perms(
        &self,
        role: &str,
        perm: Perms,
        shared: Perms,
        read_only: bool,
    ) -> (Perms, Perms);

    /// Called when the union of what this node's users need changes (file locks follow it).
    fn apply_perms(&self, _perm: Perms, _shared: Perms) -> Result<(), String> {
        Ok(())
    }

    /// What query-named-block-nodes reports of this driver (file name, sizes, backing
    /// file, format-specific data).
    fn info(&self, node: &Node) -> DriverInfo;

    /// Protocol drivers whose storage grows when written past its end (a file under qcow2,
    /// which appends clusters), so writes there are not bounded by the current size.
    fn extends_on_write(&self) -> bool {
        false
    }

    /// Switch between read-only and read-write (a job writing into a backing node). The
    /// node is drained and `node.read_only()` still tells the old mode.
    async fn reopen(&self, node: &Node, _writable: bool) -> Result<(), String> {
        Err(format!(
            "Node '{}' ({}) cannot be reopened",
            node.name(),
            self.format_name()
        ))
    }

    /// Hand the image over to another process (blockdev-set-active false): write back what
    /// the driver keeps beside the data. The node is drained and flushed, and takes no I/O
    /// but reads until [`activate`](Self::activate). Only drivers whose entry says
    /// `hands_over` are asked.
    async fn inactivate(&self, _node: &Node) -> Result<(), String> {
        Ok(())
    }

    /// Take the image back after [`inactivate`](Self::inactivate), with the node's locks
    /// held again: read anew what another process may have changed meanwhile.
    async fn activate(&self, _node: &Node) -> Result<(), String> {
        Ok(())
    }

    /// Whether writes with [`WriteFlags::compressed`] work (qcow2).
    fn supports_compressed_writes(&self) -> bool {
        false
    }

    /// x-blockdev-amend of the encryption key slots (luks, and qcow2's `encrypt`), run in
    /// the amend job; secrets are looked up in `graph`.
    async fn amend_keyslots(
        &self,
        _node: &Node,
        _graph: &crate::Graph,
        _amend: &crate::drivers::luks::KeyslotAmend,
        _force: bool,
    ) -> Result<(), String> {
        Err("Driver does not support x-blockdev-amend".into())
    }

    /// Whether the format has a backing file (qcow2), so that the node can take a backing
    /// child.
    fn supports_backing(&self) -> bool {
        false
    }

    /// Read through `backing` (or nothing) below this node's own layer from now on, after
    /// the graph changed the node's backing child. Requests in flight finish first. Only
    /// called where `supports_backing`.
    async fn set_backing_edge(
        &self,
        _node: &Node,
        _backing: Option<Arc<Child>>,
    ) -> Result<(), String> {
        Ok(())
    }

    /// Whether `debug_event` does anything (blkdebug), so that a parent tells its kinds of
    /// I/O apart only where someone listens.
    fn takes_debug_events(&self) -> bool {
        false
    }

    /// A blkdebug event fired at this node by its parent or the node layer (QEMU's
    /// bdrv_debug_event).
    fn debug_event(&self, _event: BlkdebugEvent) {}

    /// Record `file` (a name, or none) and its `format` as the backing file in the image's
    /// own metadata (qcow2's header), without touching the graph. ENOTSUP where the format
    /// records none.
    async fn change_backing_file(
        &self,
        _node: &Node,
        _file: Option<&str>,
        _format: Option<&str>,
    ) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    /// Whether the format keeps internal snapshots (qcow2).
    fn supports_internal_snapshots(&self) -> bool {
        false
    }

    /// The image's internal snapshots. ENOTSUP without `supports_internal_snapshots`.
    fn internal_snapshots(&self) -> io::Result<Vec<SnapshotInfo>> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    /// Take an internal snapshot named `name` of the node's current content.
    async fn create_internal_snapshot(
        &self,
        _node: &Node,
        _name: &str,
    ) -> io::Result<SnapshotInfo> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    /// Delete the internal snapshot that `id` and `name` (those given) both match; None
    /// when there is none.
    async fn delete_internal_snapshot(
        &self,
        _node: &Node,
        _id: Option<&str>,
        _name: Option<&str>,
    ) -> io::Result<Option<SnapshotInfo>> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    /// Whether the format can keep persistent dirty bitmaps in the image (qcow2).
    fn can_store_persistent_bitmaps(&self) -> bool {
        false
    }

    /// Persistent bitmaps the driver read from the image at open, handed over once for the
    /// graph to attach to the node.
    fn take_loaded_bitmaps(&self) -> Vec<Arc<DirtyBitmap>> {
        Vec::new()
    }

    /// The node leaves the graph (blockdev-del, quit) after its last flush: write back what
    /// the image keeps beside the data (persistent bitmaps). No I/O follows.
    async fn close(&self, _node: &Node) -> io::Result<()> {
        Ok(())
    }

    /// x-blockdev-change: take `child` (a node no other node uses) as a new child (QEMU's
    /// quorum). The node is drained meanwhile. Refused, in QEMU's words, by default.
    async fn add_child(&self, node: &Arc<Node>, _child: &Arc<Node>) -> Result<(), String> {
        Err(format!(
            "The node {} does not support adding a child",
            node.name()
        ))
    }

    /// x-blockdev-change: let go of the child edge `role` (which exists). The node is
    /// drained meanwhile. Refused, in QEMU's words, by default.
    async fn remove_child(&self, node: &Arc<Node>, _role: &str) -> Result<(), String> {
        Err(format!(
            "The node {} does not support removing a child",
            node.name()
        ))
    }

    /// Whether this node is a filter whose `file`/`image` child is its data (raw, blkdebug).
    fn filtered_child_role(&self) -> Option<&'static str> {
        None
    }
}

/// Who uses a node through a [`Child`] edge.
#[derive(Clone, Debug)]
pub enum Parent {
    /// The parent node, by name (node names are unique and the parent may not exist yet
    /// while its children are attached during open).
    Node(String),
    /// A user outside the graph: an export, the monitor.
    User {
        /// What kind of user, as x-debug-query-block-graph's `type` and QEMU's messages
        /// name it: "block-backend" (an export, a job's own backend, a command's handle).
        kind: &'static str,
        /// The user's name; an empty "block-backend" is QEMU's "an unnamed block device".
        name: String,
    },
    /// A block job working on the node: it blocks deletion and conflicting jobs.
    Job {
        /// The job's QMP `id`.
        id: String,
        /// The job's QMP `type` ("backup", "mirror", "commit", "stream"), named in QEMU's
        /// "in use by block job" text.
        job_type: &'static str,
    },
}

/// An edge from a parent to a node, carrying the parent's permissions on it.
///
/// The target can be swapped (mirror pivot, snapshot) without the parent noticing.
pub struct Child {
    role: String,
    parent: Parent,
    target: ArcSwap<Node>,
    perm: AtomicU32,
    shared: AtomicU32,
    /// What the parent wants to hear when the node changes size (QEMU's resize callback
    /// of a block-backend's device): a vhost-user-blk export tells its frontend.
    resize_hook: OnceLock<ResizeHook>,
    /// A user that keeps working on an inactive node (an NBD export's `allow-inactive`):
    /// its write permission does not stop the node from being inactivated.
    allows_inactive: AtomicBool,
    /// A user that must stay on the thread it was set up on (an export with
    /// `fixed-iothread`): the node cannot move to another one under it.
    pub(crate) fixed_home: AtomicBool,
    /// The requests made through this edge, counted for users that ask
    /// ([`Child::count_requests`]: exports, for the metrics); kept across node swaps.
    requests: OnceLock<Arc<NodeStats>>,
}

/// Called after the node behind an edge was resized.
pub type ResizeHook = Box<dyn Fn() + Send + Sync>;

impl Child {
    /// Let the node be inactivated under this user (see [`Node::inactivate_one`]).
    pub fn allow_inactive(&self) {
        self.allows_inactive.store(true, Ordering::Release);
    }

    /// Whether this user stops its node from being inactivated: a job working on it, or
    /// a user that may write and did not say it copes with an inactive node (QEMU's
    /// blk_root_inactivate).
    pub fn keeps_active(&self) -> bool {
        match self.parent {
            Parent::Node(_) => false,
            Parent::Job { .. } => true,
            Parent::User { .. } => {
                self.perm()
                    .intersects(Perms::WRITE | Perms::WRITE_UNCHANGED)
                    && !self.allows_inactive.load(Ordering::Acquire)
            }
        }
    }

    /// Call `hook` after every resize of the node this edge points to (set once).
    pub fn on_resize(&self, hook: ResizeHook) {
        let _ = self.resize_hook.set(hook);
    }

    /// The child's role in its parent (QEMU's child name: "file", "backing", "root",
    /// "main node"), as x-debug-query-block-graph's edge `name` and QEMU's messages give it.
    pub fn role(&self) -> &str {
        &self.role
    }

    /// Who holds this edge.
    pub fn parent(&self) -> &Parent {
        &self.parent
    }

    /// The node the edge points at now. A pivot or filter insertion may repoint it at any
    /// time; I/O should go through the edge, which follows it.
    pub fn node(&self) -> Arc<Node> {
        self.target.load_full()
    }

    /// What the parent does with the node (QEMU's BdrvChild.perm).
    pub fn perm(&self) -> Perms {
        Perms::from_bits(self.perm.load(Ordering::Acquire))
    }

    /// What the parent lets other users do with the node (QEMU's BdrvChild.shared_perm).
    pub fn shared(&self) -> Perms {
        Perms::from_bits(self.shared.load(Ordering::Acquire))
    }

    pub(crate) fn set_perms(&self, perm: Perms, shared: Perms) {
        self.perm.store(perm.bits(), Ordering::Release);
        self.shared.store(shared.bits(), Ordering::Release);
    }

    /// Fire a blkdebug event at the node this edge points to, before the I/O it announces.
    pub fn debug_event(&self, event: BlkdebugEvent) {
        let node = self.target.load();
        if node.driver.takes_debug_events() {
            node.driver.debug_event(event);
        }
    }

    /// Whether the node this edge points to listens to blkdebug events.
    pub fn takes_debug_events(&self) -> bool {
        self.target.load().driver.takes_debug_events()
    }

    /// How QEMU's permission-conflict message names this user.
    pub fn describe_user(&self) -> String {
        role_description(&self.parent, &self.node(), &self.role)
    }

    /// The current target, counted in flight. A request waits while the target is
    /// quiesced and then looks again, so that requests held back while a filter was
    /// inserted or a node replaced go to the new target.
    pub async fn enter(&self) -> EnteredNode {
        loop {
            let node = self.node();
            node.wait_unquiesced().await;
            node.inflight.count.fetch_add(1, Ordering::AcqRel);
            let entered = EnteredNode(node);
            let still_target = Arc::ptr_eq(&entered.0, &self.target.load());
            if still_target && entered.inflight.quiesced.load(Ordering::Acquire) == 0 {
                return entered;
            }
        }
    }

    /// From now on, count the requests made through this edge (bytes, operations and
    /// latency, as a node's own statistics); returns the counters.
    pub fn count_requests(&self) -> Arc<NodeStats> {
        self.requests.get_or_init(Arc::default).clone()
    }

    /// Starts accounting a request of this edge's user, if it counts them.
    fn account(&self, kind: IoKind) -> Option<Accounting<'_>> {
        self.requests.get().map(|stats| stats.start(kind))
    }

    /// [`Node::read`] on the current target, through [`Child::enter`].
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let acct = self.account(IoKind::Read);
        let len = buf.len() as u64;
        let result = self.enter().await.read_entered(offset, buf).await;
        counted(acct, len, result)
    }

    /// [`Node::read_buf`] on the current target, through [`Child::enter`].
    pub async fn read_buf(&self, offset: u64, buf: IoBuf) -> io::Result<IoBuf> {
        let acct = self.account(IoKind::Read);
        let len = buf.len() as u64;
        let result = self.enter().await.read_buf_entered(offset, buf).await;
        counted(acct, len, result)
    }

    /// [`Driver::read_or_zero`] through this edge; a `None` is not counted as a read (the
    /// caller reads next, and that read counts).
    pub async fn read_or_zero(&self, offset: u64, buf: &mut [u8]) -> io::Result<Option<bool>> {
        let acct = self.account(IoKind::Read);
        let len = buf.len() as u64;
        let result = self.enter().await.read_or_zero_entered(offset, buf).await;
        match result {
            Ok(None) => Ok(None),
            result => counted(acct, len, result),
        }
    }

    /// [`Node::write`] on the current target, through [`Child::enter`].
    pub async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        let acct = self.account(IoKind::Write);
        let result = self.enter().await.write_entered(offset, buf, flags).await;
        counted(acct, buf.len() as u64, result)
    }

    /// [`Node::write_buf`] on the current target, through [`Child::enter`].
    pub async fn write_buf(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> io::Result<IoBuf> {
        let acct = self.account(IoKind::Write);
        let len = buf.len() as u64;
        let result = self
            .enter()
            .await
            .write_buf_entered(offset, buf, flags)
            .await;
        counted(acct, len, result)
    }

    /// [`Node::write_zeroes`] on the current target, through [`Child::enter`].
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> io::Result<()> {
        let acct = self.account(IoKind::Write);
        let result = self
            .enter()
            .await
            .write_zeroes_entered(offset, len, flags)
            .await;
        counted(acct, len, result)
    }

    /// [`Node::discard`] on the current target, through [`Child::enter`].
    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let acct = self.account(IoKind::Unmap);
        let result = self.enter().await.discard_entered(offset, len).await;
        counted(acct, len, result)
    }

    /// [`Node::flush`] on the current target, through [`Child::enter`] (so, unlike
    /// `Node::flush`, it waits while the target is drained).
    pub async fn flush(&self) -> io::Result<()> {
        let acct = self.account(IoKind::Flush);
        let result = self.enter().await.flush_entered().await;
        counted(acct, 0, result)
    }

    /// The parent node's name; None when the parent is a user or a job.
    pub fn parent_node_name(&self) -> Option<&str> {
        match &self.parent {
            Parent::Node(name) => Some(name),
            Parent::User { .. } | Parent::Job { .. } => None,
        }
    }
}

/// Ends `acct`'s request, if it is counted; the result passes through.
fn counted<T>(acct: Option<Accounting<'_>>, bytes: u64, result: io::Result<T>) -> io::Result<T> {
    match acct {
        Some(acct) => acct.finish(bytes, result),
        None => result,
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let node = self.target.load_full();
        node.forget_parent(self);
        // Releasing permissions can only relax constraints; a failure to drop a lock byte
        // leaves a stricter lock, never a looser one, so there is nothing to undo here.
        let _ = node.refresh_perms();
    }
}

/// Options every node takes, whatever its driver.
#[derive(Clone, Debug, Default)]
pub struct CommonOptions {
    /// `read-only` as opened; [`Node::read_only`] is the current mode, which a reopen
    /// changes.
    pub read_only: bool,
    /// `auto-read-only`: open read-only when read-write is refused (EACCES, EROFS, EPERM).
    pub auto_read_only: bool,
    /// `cache.direct`: open files with O_DIRECT.
    pub cache_direct: bool,
    /// `cache.no-flush`: flushes succeed without reaching the driver.
    pub cache_no_flush: bool,
    /// `discard=unmap` (not the default `ignore`): discards reach the driver and zero
    /// writes may deallocate.
    pub discard_unmap: bool,
    /// `detect-zeroes`: all-zero writes become zero writes (with `unmap`, that may
    /// deallocate).
    pub detect_zeroes: DetectZeroes,
    /// `force-share`: take no image locks, so other processes may write the image; only
    /// allowed read-only.
    pub force_share: bool,
    /// `active=false`: opened inactive, for a migration target while the source still
    /// holds the image (`active.rs`).
    pub inactive: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DetectZeroes {
    #[default]
    Off,
    On,
    Unmap,
}

impl DetectZeroes {
    pub fn as_str(self) -> &'static str {
        match self {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        }
    }
}

/// Counts requests in flight so that graph changes can wait for a quiet node.
#[derive(Default)]
struct Inflight {
    count: AtomicUsize,
    quiesced: AtomicUsize,
    idle: Notify,
    resumed: Notify,
}

struct InflightGuard<'a>(&'a Inflight);

/// The data of a write: lent by the caller, or given for the time of the request.
enum Payload<'a> {
    Slice(&'a [u8]),
    Owned(IoBuf),
}

impl Payload<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Slice(buf) => buf,
            Payload::Owned(buf) => buf.as_slice(),
        }
    }

    fn into_owned(self) -> Option<IoBuf> {
        match self {
            Payload::Slice(_) => None,
            Payload::Owned(buf) => Some(buf),
        }
    }
}

/// A request counted in flight on a node it holds, for requests that go through an edge.
pub struct EnteredNode(Arc<Node>);

impl std::ops::Deref for EnteredNode {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.0
    }
}

impl Drop for EnteredNode {
    fn drop(&mut self) {
        drop(InflightGuard(&self.0.inflight));
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// One node of the block graph: its driver, options, child edges, weak links to the edges
/// that point at it, requests in flight (for drain), stats, write threshold and dirty
/// bitmaps. Shared by `Arc`; usable from any thread.
pub struct Node {
    name: String,
    implicit: bool,
    driver: Box<dyn Driver>,
    options: CommonOptions,
    read_only: AtomicBool,
    /// False while another process may own the image (blockdev-set-active): the node
    /// then holds no locks, takes nothing on its children, and serves reads only.
    active: AtomicBool,
    /// The options the node was opened with, for `json:` filenames and graph queries.
    open_options: Value,
    children: RwLock<Vec<Arc<Child>>>,
    parents: Mutex<Vec<Weak<Child>>>,
    inflight: Inflight,
    write_threshold: WriteThreshold,
    stats: NodeStats,
    /// Swapped as a whole when bitmaps come and go, so the write path reads it lock-free.
    dirty_bitmaps: ArcSwap<Vec<Arc<DirtyBitmap>>>,
    /// The iothread object the node is pinned to; none for the shared I/O threads
    /// (`home.rs` keeps connected nodes on one).
    pub(crate) home: Mutex<Option<Arc<crate::IoThreadObject>>>,
}

impl Node {
    /// A node around an opened `driver`, with no edges yet and not in the graph: the graph's
    /// open adds the children the driver opened, a job builds its filter. `implicit` marks
    /// a generated name; `open_options` are the options as given, kept for `json:`
    /// filenames and blockdev-reopen.
    pub fn new(
        name: String,
        implicit: bool,
        driver: Box<dyn Driver>,
        options: CommonOptions,
        open_options: Value,
    ) -> Arc<Node> {
        Arc::new(Node {
            name,
            implicit,
            read_only: AtomicBool::new(options.read_only),
            active: AtomicBool::new(!options.inactive),
            driver,
            options,
            open_options,
            children: RwLock::new(Vec::new()),
            parents: Mutex::new(Vec::new()),
            inflight: Inflight::default(),
            write_threshold: WriteThreshold::default(),
            stats: NodeStats::default(),
            dirty_bitmaps: ArcSwap::from_pointee(Vec::new()),
            home: Mutex::new(None),
        })
    }

    /// The node-name, given or generated (`#block<N>`), unique in the graph.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the name was generated for a node the user did not name.
    pub fn is_implicit(&self) -> bool {
        self.implicit
    }

    /// The node's driver, for its capabilities and what it reports.
    pub fn driver(&self) -> &dyn Driver {
        self.driver.as_ref()
    }

    /// The driver as its concrete type, for operations only one driver has.
    pub fn driver_as<T: Driver>(&self) -> Option<&T> {
        let any: &dyn std::any::Any = self.driver.as_ref();
        any.downcast_ref::<T>()
    }

    /// The options every node takes, as opened.
    pub fn options(&self) -> &CommonOptions {
        &self.options
    }

    /// The options the node was opened with, as given (blockdev-add's arguments, or a
    /// child's inline options).
    pub fn open_options(&self) -> &Value {
        &self.open_options
    }

    /// Whether this process owns the image now (blockdev-set-active).
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// See `active.rs`: only the graph's blockdev-set-active changes it.
    pub(crate) fn set_active_flag(&self, active: bool) {
        self.active.store(active, Ordering::Release);
    }

    /// Whether the node is read-only now; [`Node::set_writable`] changes it.
    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.driver.size(self)
    }

    /// The armed write threshold in bytes (QMP `write_threshold`); 0 when none is armed,
    /// or it has tripped.
    pub fn write_threshold(&self) -> u64 {
        self.write_threshold.get()
    }

    /// block-set-write-threshold: `hook` hears once when a write ends past `threshold`.
    pub fn set_write_threshold(&self, threshold: u64, hook: ThresholdHook) {
        self.write_threshold.set(threshold, hook);
    }

    /// What query-blockstats reports for this node.
    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// The node's dirty bitmaps, named and anonymous, in creation order.
    pub fn dirty_bitmaps(&self) -> Arc<Vec<Arc<DirtyBitmap>>> {
        self.dirty_bitmaps.load_full()
    }

    /// The node's dirty bitmap named `name`; None when it has none by that name.
    pub fn dirty_bitmap(&self, name: &str) -> Option<Arc<DirtyBitmap>> {
        self.dirty_bitmaps
            .load()
            .iter()
            .find(|b| b.name() == Some(name))
            .cloned()
    }

    /// Attach `bitmap`: from now on the node's writes mark it (while it is enabled). The
    /// caller checks that its name is free.
    pub fn add_dirty_bitmap(&self, bitmap: Arc<DirtyBitmap>) {
        self.dirty_bitmaps.rcu(|list| {
            let mut list = Vec::clone(list);
            list.push(bitmap.clone());
            list
        });
    }

    /// Detach `bitmap` (by identity); nothing happens when it is not attached.
    pub fn remove_dirty_bitmap(&self, bitmap: &Arc<DirtyBitmap>) {
        self.dirty_bitmaps.rcu(|list| {
            list.iter()
                .filter(|b| !Arc::ptr_eq(b, bitmap))
                .cloned()
                .collect::<Vec<_>>()
        });
    }

    fn record_write(&self, offset: u64, len: u64) {
        for bitmap in self.dirty_bitmaps.load().iter() {
            bitmap.record_write(offset, len);
        }
    }

    /// The node's child edges, in the order they were added.
    pub fn children(&self) -> Vec<Arc<Child>> {
        self.children.read().unwrap().clone()
    }

    /// The child edge with role `role` ("file", "backing", ...), if the node has one.
    pub fn child(&self, role: &str) -> Option<Arc<Child>> {
        self.children
            .read()
            .unwrap()
            .iter()
            .find(|c| c.role == role)
            .cloned()
    }

    /// The node the `backing` child points at, if there is one.
    pub fn backing(&self) -> Option<Arc<Node>> {
        self.child("backing").map(|c| c.node())
    }

    /// The type of a block job using this node, if one does.
    pub fn busy_with_job(&self) -> Option<&'static str> {
        self.parents().iter().find_map(|edge| match edge.parent() {
            Parent::Job { job_type, .. } => Some(*job_type),
            _ => None,
        })
    }

    /// QEMU's root node: only users outside the graph (exports, the monitor) use it; a
    /// parent node or a job's edge makes it part of something bigger.
    pub fn is_root(&self) -> bool {
        self.parents()
            .iter()
            .all(|edge| matches!(edge.parent(), Parent::User { .. }))
    }

    /// An edge through which a job holds `target` as QEMU's jobs do with a block backend of
    /// their own (a mirror's target, a commit's top and base): it takes no permissions, and
    /// makes blockdev-del call the node "in use" and conflicts name "an unnamed block
    /// device", as QEMU's texts do.
    pub fn attach_job_backend(target: &Arc<Node>) -> Result<Arc<Child>, String> {
        Node::attach(
            target,
            "root",
            Parent::User {
                kind: "block-backend",
                name: String::new(),
            },
            Perms::NONE,
            Perms::ALL,
        )
    }

    /// Refuse a node a block job works on, with QEMU's text.
    pub fn check_no_job(&self) -> Result<(), QmpError> {
        match self.busy_with_job() {
            Some(job_type) => Err(busy_error(&self.name, &job_blocker(job_type))),
            None => Ok(()),
        }
    }

    /// The live edges that point at this node.
    pub fn parents(&self) -> Vec<Arc<Child>> {
        self.parents
            .lock()
            .unwrap()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    fn forget_parent(&self, child: &Child) {
        self.parents
            .lock()
            .unwrap()
            .retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), child));
    }

    /// What all users together need from this node, and what all of them let others do.
    pub fn cumulative_perms(&self) -> (Perms, Perms) {
        self.parents()
            .iter()
            .fold((Perms::NONE, Perms::ALL), |(perm, shared), c| {
                (perm | c.perm(), shared & c.shared())
            })
    }

    /// Attach `target` as child `role` of a parent, with permissions `perm`/`shared`.
    ///
    /// Conflicts with the target's other users are refused with QEMU's message; on success
    /// the target's own children follow its new needs.
    pub fn attach(
        target: &Arc<Node>,
        role: &str,
        parent: Parent,
        perm: Perms,
        shared: Perms,
    ) -> Result<Arc<Child>, String> {
        Node::attach_to(target, role, parent, true, perm, shared)
    }

    /// [`attach`](Self::attach) for a parent that is being opened active or inactive: an
    /// inactive one takes nothing on its children until it is activated.
    pub fn attach_to(
        target: &Arc<Node>,
        role: &str,
        parent: Parent,
        parent_active: bool,
        perm: Perms,
        shared: Perms,
    ) -> Result<Arc<Child>, String> {
        let (perm, shared) = if parent_active {
            (perm, shared)
        } else {
            (Perms::NONE, Perms::ALL)
        };
        if let Parent::Node(parent_name) = &parent {
            if target.subtree().iter().any(|n| n.name == *parent_name) {
                return Err(would_cycle_message(&target.name, role, parent_name));
            }
            // An active node cannot work on an image that belongs to another process.
            if parent_active && !target.is_active() {
                return Err(format!(
                    "Inactive '{}' can't be a {role} child of active '{parent_name}'",
                    target.name
                ));
            }
        }
        target.check_new_user(perm, shared, &role_description(&parent, target, role))?;
        let child = Arc::new(Child {
            role: role.to_string(),
            parent,
            target: ArcSwap::new(target.clone()),
            perm: AtomicU32::new(perm.bits()),
            shared: AtomicU32::new(shared.bits()),
            resize_hook: OnceLock::new(),
            allows_inactive: AtomicBool::new(false),
            fixed_home: AtomicBool::new(false),
            requests: OnceLock::new(),
        });
        target.parents.lock().unwrap().push(Arc::downgrade(&child));
        if let Err(e) = target.refresh_perms() {
            // Dropping the edge detaches it and restores the previous permissions.
            drop(child);
            return Err(e);
        }
        Ok(child)
    }

    /// Add `child` (already attached with `Node::attach`) to this node's children.
    pub fn add_child(&self, child: Arc<Child>) {
        self.children.write().unwrap().push(child);
    }

    /// Remove this node's child edge `role`, releasing the permissions it held.
    pub fn remove_child(&self, role: &str) -> Option<Arc<Child>> {
        let mut children = self.children.write().unwrap();
        let idx = children.iter().position(|c| c.role == role)?;
        Some(children.remove(idx))
    }

    /// Drop all child edges (when the node leaves the graph).
    pub fn detach_children(&self) {
        let children = std::mem::take(&mut *self.children.write().unwrap());
        // The children forget this node at once, not when the last reference to each edge
        // goes: a request that was still finishing on another thread, or a job's copy
        // state, may hold one a moment longer, and the node below must not look used
        // meanwhile (a blockdev-del right after BLOCK_JOB_COMPLETED found a backup's
        // target "in use").
        for child in &children {
            let node = child.node();
            node.forget_parent(child);
            let _ = node.refresh_perms();
        }
        drop(children);
    }

    fn check_new_user(&self, perm: Perms, shared: Perms, user: &str) -> Result<(), String> {
        if self.read_only() && perm.intersects(Perms::WRITE | Perms::RESIZE) {
            return Err("Block node is read-only".to_string());
        }
        for other in self.parents() {
            let unshared_by_new = other.perm() & !shared;
            if unshared_by_new != Perms::NONE {
                return Err(conflict_message(
                    &self.name,
                    unshared_by_new,
                    &other.describe_user(),
                    user,
                ));
            }
            let unshared_by_other = perm & !other.shared();
            if unshared_by_other != Perms::NONE {
                return Err(conflict_message(
                    &self.name,
                    unshared_by_other,
                    user,
                    &other.describe_user(),
                ));
            }
        }
        Ok(())
    }

    /// Recompute the permissions this node takes on its children from what its users need,
    /// down the whole subgraph, and apply file locks.
    pub fn refresh_perms(&self) -> Result<(), String> {
        self.refresh_perms_on_path(&mut Vec::new())
    }

    /// `refresh_perms` for a node reached through the nodes on `path`. The graph has no
    /// cycles (`attach` and `replace_in_parents` refuse them); should a bug make one, the
    /// walk fails instead of recursing until the stack overflows.
    fn refresh_perms_on_path(&self, path: &mut Vec<*const Node>) -> Result<(), String> {
        let me: *const Node = self;
        if path.contains(&me) {
            return Err(cycle_message(&self.name));
        }
        path.push(me);
        let result = self.refresh_own_perms(path);
        path.pop();
        result
    }

    fn refresh_own_perms(&self, path: &mut Vec<*const Node>) -> Result<(), String> {
        let active = self.is_active();
        // An inactive node locks nothing and asks nothing of its children, whatever its
        // users hold: the image is another process's until it is activated again.
        let (perm, shared) = if active {
            self.cumulative_perms()
        } else {
            (Perms::NONE, Perms::ALL)
        };
        self.driver.apply_perms(perm, shared)?;
        for child in self.children() {
            let (cperm, cshared) = if active {
                self.driver
                    .child_perms(&child.role, perm, shared, self.read_only())
            } else {
                (Perms::NONE, Perms::ALL)
            };
            if (cperm, cshared) == (child.perm(), child.shared()) {
                continue;
            }
            let target = child.node();
            for other in target.parents() {
                if Arc::ptr_eq(&other, &child) {
                    continue;
                }
                let a = other.perm() & !cshared;
                if a != Perms::NONE {
                    return Err(conflict_message(
                        target.name(),
                        a,
                        &other.describe_user(),
                        &child.describe_user(),
                    ));
                }
                let b = cperm & !other.shared();
                if b != Perms::NONE {
                    return Err(conflict_message(
                        target.name(),
                        b,
                        &child.describe_user(),
                        &other.describe_user(),
                    ));
                }
            }
            child.set_perms(cperm, cshared);
            target.refresh_perms_on_path(path)?;
        }
        Ok(())
    }

    /// Point every parent edge of `self` at `new` instead (mirror pivot, snapshot overlay,
    /// filter insertion). Jobs keep their edges: a job works on a node by identity, not on
    /// whatever takes its place. Edges that `new` reaches through its own children stay too
    /// (QEMU's should_update_child): the new node's own edge to `self`, and in image
    /// fleecing the backing edge of the backup target, which would otherwise close a cycle.
    pub fn replace_in_parents(self: &Arc<Node>, new: &Arc<Node>) {
        let below_new = new.subtree();
        let reached_by_new = |edge: &Arc<Child>| {
            below_new
                .iter()
                .any(|n| n.children().iter().any(|c| Arc::ptr_eq(c, edge)))
        };
        for edge in self.parents() {
            if let Parent::Job { .. } = edge.parent() {
                continue;
            }
            if reached_by_new(&edge) {
                continue;
            }
            edge.target.store(new.clone());
            self.forget_parent(&edge);
            new.parents.lock().unwrap().push(Arc::downgrade(&edge));
        }
        let _ = self.refresh_perms();
        let _ = new.refresh_perms();
    }

    /// Make `backing` this node's backing child, or leave it with none, in place of the one
    /// it has (QEMU's bdrv_set_backing_hd). The driver takes the new layer before the graph
    /// changes, so a format without backing files refuses and nothing changes. The new edge
    /// takes no permissions until the next refresh, as QEMU's does before its update.
    pub async fn set_backing(self: &Arc<Node>, backing: Option<&Arc<Node>>) -> Result<(), String> {
        if !self.driver.supports_backing() {
            return Err(format!(
                "Driver '{}' of node '{}' does not support backing files",
                self.driver.format_name(),
                self.name
            ));
        }
        let edge = match backing {
            Some(b) => Some(Node::attach(
                b,
                "backing",
                Parent::Node(self.name.clone()),
                Perms::NONE,
                Perms::ALL,
            )?),
            None => None,
        };
        self.driver.set_backing_edge(self, edge.clone()).await?;
        self.remove_child("backing");
        if let Some(edge) = edge {
            self.add_child(edge);
        }
        Ok(())
    }

    fn enter(&self) -> InflightGuard<'_> {
        self.inflight.count.fetch_add(1, Ordering::AcqRel);
        InflightGuard(&self.inflight)
    }

    async fn wait_unquiesced(&self) {
        while self.inflight.quiesced.load(Ordering::Acquire) > 0 {
            let notified = self.inflight.resumed.notified();
            if self.inflight.quiesced.load(Ordering::Acquire) == 0 {
                break;
            }
            notified.await;
        }
    }

    /// Make the node (and the nodes below it that it writes through) writable or read-only
    /// again, keeping its users and data.
    pub async fn set_writable(&self, writable: bool) -> Result<(), String> {
        if self.read_only() != writable {
            return Ok(());
        }
        self.drain().await;
        let result = self.driver.reopen(self, writable).await;
        if result.is_ok() {
            self.read_only.store(!writable, Ordering::Release);
            if let Err(e) = self.refresh_perms() {
                tracing::warn!(node = self.name(), "permissions after reopen: {e}");
            }
        }
        self.undrain();
        result
    }

    /// Stop new requests and wait until those in flight are done. Pair with `undrain`.
    pub async fn drain(&self) {
        self.quiesce();
        self.wait_idle().await;
    }

    /// The first half of `drain`: new requests wait from now on. Pair with `undrain`.
    /// Apart from `wait_idle` so that a caller can record the drain before it awaits, and
    /// undrain exactly once even if the wait is cancelled.
    pub fn quiesce(&self) {
        self.inflight.quiesced.fetch_add(1, Ordering::AcqRel);
    }

    /// Wait until no request is in flight on the node.
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.inflight.idle.notified();
            if self.inflight.count.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// End one `drain` or `quiesce`; when the last ends, the requests held back go on.
    pub fn undrain(&self) {
        if self.inflight.quiesced.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inflight.resumed.notify_waiters();
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn check_write_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.driver.extends_on_write() {
            return match offset.checked_add(len) {
                Some(_) => Ok(()),
                None => Err(io::Error::from_raw_os_error(libc::EINVAL)),
            };
        }
        self.check_range(offset, len)
    }

    fn check_active(&self) -> io::Result<()> {
        if self.is_active() {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        }
    }

    /// Writes, discards and flushes need a writable, active node: EPERM otherwise, as
    /// QEMU answers for an inactive one.
    fn check_writable(&self) -> io::Result<()> {
        self.check_active()?;
        if self.read_only() {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        } else {
            Ok(())
        }
    }

    /// Read `buf.len()` bytes at byte `offset` from this node itself, waiting while it is
    /// drained. EINVAL past the end. Counted in the node's stats.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.wait_unquiesced().await;
        let _guard = self.enter();
        self.read_entered(offset, buf).await
    }

    /// [`read`](Self::read) into `buf`, handed back filled; the kernel fills it in place
    /// where the data lies in a file ([`Driver::read_buf`]).
    pub async fn read_buf(&self, offset: u64, buf: IoBuf) -> io::Result<IoBuf> {
        self.wait_unquiesced().await;
        let _guard = self.enter();
        self.read_buf_entered(offset, buf).await
    }

    /// [`Driver::read_or_zero`]; a `None` is not counted as a read.
    pub async fn read_or_zero(&self, offset: u64, buf: &mut [u8]) -> io::Result<Option<bool>> {
        self.wait_unquiesced().await;
        let _guard = self.enter();
        self.read_or_zero_entered(offset, buf).await
    }

    /// Write `buf` at byte `offset`, waiting while the node is drained. EPERM when
    /// read-only, EINVAL past the end (unless the driver `extends_on_write`). Trips the
    /// write threshold, turns an all-zero buffer into a zero write under `detect-zeroes`,
    /// and marks the range in the dirty bitmaps, even when the write fails.
    pub async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        self.wait_unquiesced().await;
        let _guard = self.enter();
        self.write_entered(offset, buf, flags).await
    }

    /// [`write`](Self::write) of `buf`, handed back; without a copy where the data goes to
    /// a file ([`Driver::write_buf`]).
    pub async fn write_buf(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> io::Result<IoBuf> {
        self.wait_unquiesced().await;
        let _guard = self.enter();
        self.write_buf_entered(offset, buf, flags).await
    }

    /// Make `len` bytes at `offset` read as zeroes; checked, counted and marked as
    /// [`Node::write`]. `may_unmap` only holds with `discard=unmap`.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> io::Result<()> {
        self.wait_unquiesced().await;
        let _guard = self.enter();
        self.write_zeroes_entered(offset, len, flags).await
    }

    /// Discard is advisory: with `discard=ignore` (the default) it succeeds doing nothing.
    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.wait_unquiesced().await;
        let _guard = self.enter();
        self.discard_entered(offset, len).await
    }

    /// Make completed writes durable ([`Driver::flush`]); succeeds at once with
    /// `cache.no-flush`. Unlike the other requests it does not wait while the node is
    /// drained.
    pub async fn flush(&self) -> io::Result<()> {
        let _guard = self.enter();
        self.flush_entered().await
    }

    /// Resize the node to `size` bytes and its dirty bitmaps with it. EPERM when read-only.
    /// Does not wait while the node is drained, and is not counted in the stats.
    pub async fn truncate(&self, size: u64) -> io::Result<()> {
        self.check_writable()?;
        let _guard = self.enter();
        self.driver.truncate(self, size).await?;
        for bitmap in self.dirty_bitmaps.load().iter() {
            bitmap.resize(size);
        }
        for parent in self.parents() {
            if let Some(hook) = parent.resize_hook.get() {
                hook();
            }
        }
        Ok(())
    }

    async fn read_entered(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len() as u64;
        let acct = self.stats.start(IoKind::Read);
        self.check_range(offset, len).map_err(|e| acct.invalid(e))?;
        acct.finish(len, self.driver.read(self, offset, buf).await)
    }

    async fn read_buf_entered(&self, offset: u64, buf: IoBuf) -> io::Result<IoBuf> {
        let len = buf.len() as u64;
        let acct = self.stats.start(IoKind::Read);
        self.check_range(offset, len).map_err(|e| acct.invalid(e))?;
        acct.finish(len, self.driver.read_buf(self, offset, buf).await)
    }

    async fn read_or_zero_entered(&self, offset: u64, buf: &mut [u8]) -> io::Result<Option<bool>> {
        let len = buf.len() as u64;
        let acct = self.stats.start(IoKind::Read);
        self.check_range(offset, len).map_err(|e| acct.invalid(e))?;
        match self.driver.read_or_zero(self, offset, buf).await {
            Ok(None) => Ok(None),
            result => acct.finish(len, result),
        }
    }

    async fn write_entered(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        self.write_payload(offset, Payload::Slice(buf), flags)
            .await
            .map(drop)
    }

    async fn write_buf_entered(
        &self,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> io::Result<IoBuf> {
        match self
            .write_payload(offset, Payload::Owned(buf), flags)
            .await?
        {
            Some(buf) => Ok(buf),
            None => Err(io::Error::other("an owned write lost its buffer")),
        }
    }

    /// The common work of every write: the checks, the write threshold, detect-zeroes,
    /// the driver call, the dirty bitmaps and the stats. An owned payload comes back.
    async fn write_payload(
        &self,
        offset: u64,
        payload: Payload<'_>,
        flags: WriteFlags,
    ) -> io::Result<Option<IoBuf>> {
        let len = payload.bytes().len() as u64;
        let acct = self.stats.start(IoKind::Write);
        self.check_writable().map_err(|e| acct.invalid(e))?;
        self.check_write_range(offset, len)
            .map_err(|e| acct.invalid(e))?;
        if flags.compressed && !self.driver.supports_compressed_writes() {
            return Err(acct.invalid(io::Error::from_raw_os_error(libc::ENOTSUP)));
        }
        self.write_threshold.check(&self.name, offset, len);
        if self.options.detect_zeroes != DetectZeroes::Off && is_zero(payload.bytes()) {
            let zero_flags = WriteFlags {
                may_unmap: self.options.detect_zeroes == DetectZeroes::Unmap
                    && self.options.discard_unmap,
                ..flags
            };
            let result = self
                .driver
                .write_zeroes(self, offset, len, zero_flags)
                .await;
            self.record_write(offset, len);
            return acct
                .finish_write(offset, len, result)
                .map(|()| payload.into_owned());
        }
        // Recorded after the write (even a failed one, which may have changed part of the
        // range): a job that cleared the bits before reading then sees the range again.
        let result = match payload {
            Payload::Slice(buf) => self
                .driver
                .write(self, offset, buf, flags)
                .await
                .map(|()| None),
            Payload::Owned(buf) => self
                .driver
                .write_buf(self, offset, buf, flags)
                .await
                .map(Some),
        };
        self.record_write(offset, len);
        acct.finish_write(offset, len, result)
    }

    async fn write_zeroes_entered(
        &self,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        let acct = self.stats.start(IoKind::Write);
        self.check_writable().map_err(|e| acct.invalid(e))?;
        self.check_write_range(offset, len)
            .map_err(|e| acct.invalid(e))?;
        self.write_threshold.check(&self.name, offset, len);
        let flags = WriteFlags {
            may_unmap: flags.may_unmap && self.options.discard_unmap,
            ..flags
        };
        let result = self.driver.write_zeroes(self, offset, len, flags).await;
        self.record_write(offset, len);
        acct.finish_write(offset, len, result)
    }

    async fn discard_entered(&self, offset: u64, len: u64) -> io::Result<()> {
        let acct = self.stats.start(IoKind::Unmap);
        self.check_writable().map_err(|e| acct.invalid(e))?;
        self.check_range(offset, len).map_err(|e| acct.invalid(e))?;
        if !self.options.discard_unmap {
            return acct.finish(len, Ok(()));
        }
        let result = self.driver.discard(self, offset, len).await;
        self.stats.driver_discard(len, &result);
        self.record_write(offset, len);
        acct.finish(len, result)
    }

    async fn flush_entered(&self) -> io::Result<()> {
        let acct = self.stats.start(IoKind::Flush);
        self.check_active().map_err(|e| acct.invalid(e))?;
        if self.options.cache_no_flush {
            return acct.finish(0, Ok(()));
        }
        // QEMU's bdrv_co_flush announces both steps to the node below.
        if let Some(primary) = self.primary_child() {
            primary.debug_event(BlkdebugEvent::FlushToOs);
            primary.debug_event(BlkdebugEvent::FlushToDisk);
        }
        acct.finish(0, self.driver.flush(self).await)
    }

    /// Status of this layer alone; EPERM on an inactive node, as QEMU answers.
    pub async fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        self.check_active()?;
        let _guard = self.enter();
        let len = len.min(self.size().saturating_sub(offset));
        if len == 0 {
            return Ok(Extent {
                len: 0,
                kind: ExtentKind::Zero { allocated: false },
            });
        }
        self.driver.block_status(self, offset, len).await
    }

    /// This node's whole chain as one layer, what a filter above it reports: a filter
    /// has no backing of its own, so an unallocated answer from this node's top layer
    /// would read as zeroes there.
    pub async fn status_for_filter(self: &Arc<Self>, offset: u64, len: u64) -> io::Result<Extent> {
        let status = self.block_status_above(None, offset, len).await?;
        let kind = if status.zero {
            ExtentKind::Zero {
                allocated: status.allocated,
            }
        } else {
            ExtentKind::Data
        };
        Ok(Extent {
            len: status.len,
            kind,
        })
    }

    /// Status resolved down the backing chain, stopping above `base` when given.
    pub async fn block_status_above(
        self: &Arc<Self>,
        base: Option<&Arc<Node>>,
        offset: u64,
        len: u64,
    ) -> io::Result<ChainExtent> {
        let mut node = self.clone();
        let mut depth = 1;
        let mut len = len;
        loop {
            let extent = node.block_status(offset, len).await?;
            len = extent.len;
            match extent.kind {
                ExtentKind::Data => {
                    return Ok(ChainExtent {
                        len,
                        zero: false,
                        allocated: true,
                        depth,
                    })
                }
                ExtentKind::Zero { allocated } => {
                    return Ok(ChainExtent {
                        len,
                        zero: true,
                        allocated,
                        depth: if allocated { depth } else { 0 },
                    })
                }
                ExtentKind::Unallocated => {
                    // A filter reports its data child's own layer: what that layer lacks
                    // lies in the data child's backing.
                    let below = node
                        .skip_filters()
                        .backing()
                        .filter(|b| base.is_none_or(|base| !Arc::ptr_eq(b, base)));
                    if depth as usize > MAX_WALK {
                        return Err(io::Error::other(cycle_message(node.name())));
                    }
                    match below {
                        Some(b) if offset < b.size() => {
                            len = len.min(b.size() - offset);
                            node = b;
                            depth += 1;
                        }
                        _ => {
                            return Ok(ChainExtent {
                                len,
                                zero: true,
                                allocated: false,
                                depth: 0,
                            })
                        }
                    }
                }
            }
        }
    }

    /// The node whose data this one passes through unchanged (filters), else itself.
    pub fn skip_filters(self: &Arc<Self>) -> Arc<Node> {
        let mut node = self.clone();
        for _ in 0..MAX_WALK {
            let Some(c) = node
                .driver
                .filtered_child_role()
                .and_then(|r| node.child(r))
            else {
                break;
            };
            node = c.node();
        }
        node
    }

    /// The child holding this node's own data or metadata (QEMU's primary child): a
    /// format's `file`, a filter's data child.
    fn primary_child(&self) -> Option<Arc<Child>> {
        self.child(self.driver.filtered_child_role().unwrap_or("file"))
    }

    /// The next layer of this node's data: its backing child, or the child a filter passes
    /// its data from (QEMU's bdrv_filter_or_cow_bs).
    pub fn data_below(&self) -> Option<Arc<Node>> {
        self.backing().or_else(|| {
            let role = self.driver.filtered_child_role()?;
            self.child(role).map(|c| c.node())
        })
    }

    /// This node and the layers below it, top first, through `data_below`. Should a bug
    /// make a cycle, the walk stops where it would repeat instead of looping.
    pub fn chain(self: &Arc<Self>) -> Vec<Arc<Node>> {
        let mut chain = vec![self.clone()];
        while let Some(next) = chain.last().and_then(|n| n.data_below()) {
            if chain.iter().any(|n| Arc::ptr_eq(n, &next)) {
                break;
            }
            chain.push(next);
        }
        chain
    }

    /// Every node reachable from this one through child edges, this one first, each once
    /// (so a cycle, were there one, is walked once too).
    pub fn subtree(self: &Arc<Self>) -> Vec<Arc<Node>> {
        let mut seen = vec![self.clone()];
        let mut next = 0;
        while let Some(node) = seen.get(next).cloned() {
            for child in node.children() {
                let child = child.node();
                if !seen.iter().any(|n| Arc::ptr_eq(n, &child)) {
                    seen.push(child);
                }
            }
            next += 1;
        }
        seen
    }
}

/// How far the loops of the request path (filter skipping, status down the chain) follow
/// edges before they give up: far beyond any real chain, and a bound should a bug make a
/// cycle.
const MAX_WALK: usize = 1 << 16;

/// QEMU's text for a node an operation blocker holds (`reason`: a job, an overlay).
pub fn busy_error(node: &str, reason: &str) -> QmpError {
    QmpError::generic(format!("Node '{node}' is busy: {reason}"))
}

/// The blocker reason of a block job of `job_type`.
pub fn job_blocker(job_type: &str) -> String {
    format!("block device is in use by block job: {job_type}")
}

/// QEMU's refusal of an edge that would close a cycle.
pub fn would_cycle_message(child: &str, role: &str, parent: &str) -> String {
    format!("Making '{child}' a {role} child of '{parent}' would create a cycle")
}

/// The error a walk gives when it finds the graph cyclic, which `attach` prevents.
fn cycle_message(node: &str) -> String {
    format!("The block graph has a cycle through node '{node}'")
}

fn role_description(parent: &Parent, target: &Node, role: &str) -> String {
    match parent {
        Parent::Node(parent) => format!(
            "node '{parent}' (uses node '{}' as '{role}' child)",
            target.name()
        ),
        Parent::User { kind, name } => {
            let user = match (*kind, name.as_str()) {
                ("block-backend", "") => "an unnamed block device".to_string(),
                ("block-backend", name) => format!("block device '{name}'"),
                (kind, name) => format!("{kind} '{name}'"),
            };
            format!("{user} (uses node '{}' as '{role}' child)", target.name())
        }
        Parent::Job { id, .. } => format!(
            "block job '{id}' (uses node '{}' as '{role}' child)",
            target.name()
        ),
    }
}

fn conflict_message(node: &str, perms: Perms, required_by: &str, unshared_by: &str) -> String {
    format!(
        "Permission conflict on node '{node}': permissions '{}' are both required by {required_by} and unshared by {unshared_by}.",
        perms.describe()
    )
}

/// Whether a buffer holds only zero bytes, comparing word-sized chunks where aligned.
pub fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u64, and `align_to` hands out only the
    // correctly aligned middle as words.
    let (head, words, tail) = unsafe { buf.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::null::{Null, NullOptions};

    fn null_node(name: &str) -> Arc<Node> {
        let options = NullOptions {
            size: Some(1 << 20),
            latency_ns: None,
            read_zeroes: Some(true),
        };
        Node::new(
            name.to_string(),
            false,
            Box::new(Null::new("null-co", options)),
            CommonOptions::default(),
            serde_json::json!({"driver": "null-co"}),
        )
    }

    fn backing_edge(target: &Arc<Node>, parent: &str) -> Result<Arc<Child>, String> {
        Node::attach(
            target,
            "backing",
            Parent::Node(parent.to_string()),
            Perms::CONSISTENT_READ,
            Perms::ALL,
        )
    }

    #[test]
    fn an_edge_that_would_close_a_cycle_is_refused() {
        let (a, b) = (null_node("a"), null_node("b"));
        a.add_child(backing_edge(&b, "a").unwrap());
        let refused = backing_edge(&a, "b").err();
        assert_eq!(
            refused.as_deref(),
            Some("Making 'a' a backing child of 'b' would create a cycle")
        );
        assert!(b.parents().len() == 1 && a.parents().is_empty());
    }

    /// A cycle made behind `attach`'s back (as a bug elsewhere could) leaves every walk
    /// finite: the daemon answers instead of overflowing its stack.
    #[test]
    fn walks_survive_a_cycle() {
        let (a, b) = (null_node("a"), null_node("b"));
        a.add_child(backing_edge(&b, "a").unwrap());
        b.add_child(backing_edge(&a, "not-b").unwrap());
        assert_eq!(a.subtree().len(), 2);
        assert_eq!(a.chain().len(), 2);
        assert_eq!(a.skip_filters().name(), "a");
        let first = a.children()[0].clone();
        first.set_perms(Perms::NONE, Perms::NONE);
        assert_eq!(a.refresh_perms(), Err(cycle_message("a")));
        let filename = crate::graph::full_json_filename(&a);
        assert!(filename.contains(r#""backing": "a""#), "{filename}");
        let info = crate::info::block_device_info(&a, false);
        assert_eq!(info["backing_file_depth"], 1);
        let status = futures::executor::block_on(a.block_status_above(None, 0, 4096));
        assert!(status.is_ok());
        // Break the cycle so that the nodes can be dropped.
        b.detach_children();
    }

    #[test]
    fn zero_detection() {
        let mut buf = vec![0u8; 4099];
        assert!(is_zero(&buf));
        assert!(is_zero(&buf[1..]));
        buf[4098] = 1;
        assert!(!is_zero(&buf));
        assert!(!is_zero(&buf[3..]));
    }
}
