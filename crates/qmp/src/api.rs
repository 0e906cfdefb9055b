//! Typed QMP for Rust programs that drive blockd or qemu-storage-daemon: each command is a
//! struct that knows its wire name and its reply type ([`Command`]), replies and events are
//! serde types, and [`Client::call`](crate::Client::call) ties them together.
//!
//! Only what tools need is typed here: the block graph, jobs, bitmaps, exports, images.
//! Reply types ignore fields they do not name, so the same program works against older
//! and newer daemons; anything else can still be sent with
//! [`Client::execute`](crate::Client::execute) as JSON.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use qmp::api::{BlockdevBackup, MirrorSyncMode, QueryJobs};
//! let mut client = qmp::Client::connect(&"/run/blockd.qmp".parse()?).await?;
//! client
//!     .call(&BlockdevBackup::new("disk0", "backup0", MirrorSyncMode::Full).job_id("nightly"))
//!     .await?;
//! for job in client.call(&QueryJobs {}).await? {
//!     println!("{} {:?} {}/{}", job.id, job.status, job.current_progress, job.total_progress);
//! }
//! # Ok(())
//! # }
//! ```

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A QMP command: its arguments are the struct's serialized fields.
pub trait Command: Serialize {
    /// The name on the wire, `execute`'s value.
    const NAME: &'static str;
    /// What the command returns (`IgnoredAny` for commands that return `{}`).
    type Returns: DeserializeOwned;
}

macro_rules! command {
    ($ty:ident, $name:literal, $returns:ty) => {
        impl Command for $ty {
            const NAME: &'static str = $name;
            type Returns = $returns;
        }
    };
}

/// A job's state, as `query-jobs` and `JOB_STATUS_CHANGE` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Created, not started.
    Created,
    /// Working.
    Running,
    /// Paused by the user or by an error policy.
    Paused,
    /// A mirror or active commit in sync, waiting for complete or cancel.
    Ready,
    /// Paused while ready.
    Standby,
    /// Done, waiting for the other jobs of its transaction.
    Waiting,
    /// Waiting for `job-finalize`.
    Pending,
    /// Failing or cancelled, undoing.
    Aborting,
    /// Ended, waiting for `job-dismiss`.
    Concluded,
    /// Gone.
    Null,
    /// A state this client does not know.
    #[serde(other)]
    Unknown,
}

impl JobStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
            JobStatus::Unknown => "unknown",
        }
    }
}

/// Which part of the source a backup or mirror copies (QEMU's MirrorSyncMode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MirrorSyncMode {
    /// Everything the guest sees.
    Full,
    /// Only what the top image allocates.
    Top,
    /// Nothing up front: only the old data of clusters written while the job runs.
    None,
    /// What a dirty bitmap marks.
    Incremental,
    /// What a dirty bitmap marks, with a bitmap-mode.
    Bitmap,
}

// ---- queries ----

/// `query-named-block-nodes`: every node of the graph.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryNamedBlockNodes {
    /// Without `backing-image` chains in each node's image info.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flat: Option<bool>,
}
command!(
    QueryNamedBlockNodes,
    "query-named-block-nodes",
    Vec<BlockDeviceInfo>
);

/// One node, as `query-named-block-nodes` describes it.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockDeviceInfo {
    /// The node's name.
    #[serde(rename = "node-name", default)]
    pub node_name: String,
    /// The driver.
    pub drv: String,
    /// The file name (or JSON filename) the node reads.
    pub file: String,
    /// Read-only.
    pub ro: bool,
    /// The image's own description.
    pub image: ImageInfo,
    /// The node's dirty bitmaps.
    #[serde(rename = "dirty-bitmaps", default)]
    pub dirty_bitmaps: Vec<DirtyBitmapInfo>,
    /// Whether the node may be written (false after `blockdev-set-active`).
    #[serde(default = "yes")]
    pub active: bool,
}

fn yes() -> bool {
    true
}

/// An image's size and format.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageInfo {
    /// The size the guest sees.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// Bytes allocated on the host, where known.
    #[serde(rename = "actual-size")]
    pub actual_size: Option<u64>,
    /// The format's name.
    pub format: String,
}

/// A dirty bitmap.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DirtyBitmapInfo {
    /// Its name.
    #[serde(default)]
    pub name: String,
    /// Dirty bytes.
    pub count: u64,
    /// Bytes per bit.
    pub granularity: u64,
    /// Recording writes (not disabled).
    pub recording: bool,
    /// In use by a job or an export.
    pub busy: bool,
    /// Stored in the image at close.
    pub persistent: bool,
    /// Found in-use at open: its content cannot be trusted.
    #[serde(default)]
    pub inconsistent: bool,
}

/// `x-debug-query-block-graph`: nodes and the edges between them, with the users that are
/// not nodes (jobs, exports).
#[derive(Debug, Clone, Default, Serialize)]
pub struct XDebugQueryBlockGraph {}
command!(
    XDebugQueryBlockGraph,
    "x-debug-query-block-graph",
    BlockGraph
);

/// The graph.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockGraph {
    /// Nodes and their users.
    pub nodes: Vec<GraphNode>,
    /// Who uses whom.
    pub edges: Vec<GraphEdge>,
}

/// A vertex of [`BlockGraph`].
#[derive(Debug, Clone, Deserialize)]
pub struct GraphNode {
    /// The number edges refer to.
    pub id: u64,
    /// `block-driver` (a node), `block-job`, `block-backend` or `block-export`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The node's, job's or backend's name (backends of exports may have none).
    pub name: String,
}

/// A parent's use of a child.
#[derive(Debug, Clone, Deserialize)]
pub struct GraphEdge {
    /// The user.
    pub parent: u64,
    /// The used node.
    pub child: u64,
    /// The role, e.g. `file`, `backing`, `target`, `root`.
    pub name: String,
    /// What the user takes.
    #[serde(default)]
    pub perm: Vec<String>,
}

/// `query-jobs`: every job.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryJobs {}
command!(QueryJobs, "query-jobs", Vec<JobInfo>);

/// A job.
#[derive(Debug, Clone, Deserialize)]
pub struct JobInfo {
    /// Its id.
    pub id: String,
    /// backup, mirror, stream, commit, create, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// Its state.
    pub status: JobStatus,
    /// Work done, in the job's unit (bytes for block jobs).
    #[serde(rename = "current-progress")]
    pub current_progress: u64,
    /// Work known so far; it grows while clients write under a mirror.
    #[serde(rename = "total-progress")]
    pub total_progress: u64,
    /// Why the job failed, once it has.
    pub error: Option<String>,
}

/// `query-block-jobs`: the block jobs, with their speed and nodes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryBlockJobs {}
command!(QueryBlockJobs, "query-block-jobs", Vec<BlockJobInfo>);

/// A block job.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockJobInfo {
    /// The job's id.
    pub device: String,
    /// backup, mirror, stream, commit.
    #[serde(rename = "type")]
    pub kind: String,
    /// Bytes known.
    pub len: u64,
    /// Bytes done.
    pub offset: u64,
    /// Bytes per second allowed, 0 for no limit.
    pub speed: u64,
    /// Its state.
    pub status: JobStatus,
    /// In sync (mirror, active commit).
    pub ready: bool,
    /// Paused.
    pub paused: bool,
    /// ok, failed or nospace.
    #[serde(rename = "io-status")]
    pub io_status: String,
    /// Why it failed, once it has.
    pub error: Option<String>,
    /// blockd, mirror and active commit: bytes per second the job copies.
    #[serde(rename = "x-copy-rate")]
    pub copy_rate: Option<u64>,
    /// blockd, mirror and active commit: bytes per second clients dirty.
    #[serde(rename = "x-dirty-rate")]
    pub dirty_rate: Option<u64>,
    /// blockd, mirror and active commit: seconds until READY at the rate the dirty set
    /// shrinks; absent while it does not shrink.
    #[serde(rename = "x-seconds-to-ready")]
    pub seconds_to_ready: Option<f64>,
}

/// `query-block-exports`: the exports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryBlockExports {}
command!(
    QueryBlockExports,
    "query-block-exports",
    Vec<BlockExportInfo>
);

/// An export.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct BlockExportInfo {
    /// Its id.
    pub id: String,
    /// nbd, vhost-user-blk, fuse.
    #[serde(rename = "type")]
    pub kind: String,
    /// The node it serves.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// Removal requested, clients still connected.
    #[serde(rename = "shutting-down")]
    pub shutting_down: bool,
}

// ---- jobs ----

/// Options every job command takes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobOptions {
    /// The job's id (the device name when absent).
    #[serde(rename = "job-id", skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Bytes per second, 0 or absent for no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    /// Finalize without waiting for `job-finalize`.
    #[serde(rename = "auto-finalize", skip_serializing_if = "Option::is_none")]
    pub auto_finalize: Option<bool>,
    /// Disappear once concluded, without waiting for `job-dismiss`.
    #[serde(rename = "auto-dismiss", skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
}

macro_rules! job_builders {
    ($ty:ident) => {
        impl $ty {
            /// Names the job.
            pub fn job_id(mut self, id: impl Into<String>) -> Self {
                self.job.job_id = Some(id.into());
                self
            }
            /// Limits the job's speed in bytes per second.
            pub fn speed(mut self, speed: u64) -> Self {
                self.job.speed = Some(speed);
                self
            }
            /// Keeps the job until `job-dismiss`, so its outcome can be read.
            pub fn keep_until_dismissed(mut self) -> Self {
                self.job.auto_dismiss = Some(false);
                self
            }
        }
    };
}

/// `blockdev-backup`: a point-in-time copy of `device` into `target`.
#[derive(Debug, Clone, Serialize)]
pub struct BlockdevBackup {
    /// Common job options.
    #[serde(flatten)]
    pub job: JobOptions,
    /// The source node.
    pub device: String,
    /// The target node.
    pub target: String,
    /// What to copy.
    pub sync: MirrorSyncMode,
    /// The dirty bitmap of an incremental or bitmap backup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// on-success, never or always.
    #[serde(rename = "bitmap-mode", skip_serializing_if = "Option::is_none")]
    pub bitmap_mode: Option<String>,
    /// Compress the target's clusters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compress: Option<bool>,
}
command!(BlockdevBackup, "blockdev-backup", IgnoredAny);
job_builders!(BlockdevBackup);

impl BlockdevBackup {
    /// A backup of `device` into `target`.
    pub fn new(device: impl Into<String>, target: impl Into<String>, sync: MirrorSyncMode) -> Self {
        BlockdevBackup {
            job: JobOptions::default(),
            device: device.into(),
            target: target.into(),
            sync,
            bitmap: None,
            bitmap_mode: None,
            compress: None,
        }
    }
}

/// `blockdev-mirror`: copies `device` into `target` and keeps it in sync.
#[derive(Debug, Clone, Serialize)]
pub struct BlockdevMirror {
    /// Common job options.
    #[serde(flatten)]
    pub job: JobOptions,
    /// The source node.
    pub device: String,
    /// The target node.
    pub target: String,
    /// What to copy.
    pub sync: MirrorSyncMode,
}
command!(BlockdevMirror, "blockdev-mirror", IgnoredAny);
job_builders!(BlockdevMirror);

impl BlockdevMirror {
    /// A mirror of `device` into `target`.
    pub fn new(device: impl Into<String>, target: impl Into<String>, sync: MirrorSyncMode) -> Self {
        BlockdevMirror {
            job: JobOptions::default(),
            device: device.into(),
            target: target.into(),
            sync,
        }
    }
}

/// `block-stream`: copies the backing chain's data into `device`.
#[derive(Debug, Clone, Serialize)]
pub struct BlockStream {
    /// Common job options.
    #[serde(flatten)]
    pub job: JobOptions,
    /// The node that receives the data.
    pub device: String,
    /// The node that stays its backing file (absent: the whole chain is copied).
    #[serde(rename = "base-node", skip_serializing_if = "Option::is_none")]
    pub base_node: Option<String>,
}
command!(BlockStream, "block-stream", IgnoredAny);
job_builders!(BlockStream);

/// `block-commit`: writes a chain's upper layers into a lower one.
#[derive(Debug, Clone, Serialize)]
pub struct BlockCommit {
    /// Common job options.
    #[serde(flatten)]
    pub job: JobOptions,
    /// The chain's top (active) node.
    pub device: String,
    /// The highest layer to commit (absent: the active layer, which makes it an active
    /// commit that waits in READY).
    #[serde(rename = "top-node", skip_serializing_if = "Option::is_none")]
    pub top_node: Option<String>,
    /// The layer that receives the data (absent: the chain's bottom).
    #[serde(rename = "base-node", skip_serializing_if = "Option::is_none")]
    pub base_node: Option<String>,
}
command!(BlockCommit, "block-commit", IgnoredAny);
job_builders!(BlockCommit);

/// `blockdev-create`: a job that formats a node (or creates a file) from driver options.
#[derive(Debug, Clone, Serialize)]
pub struct BlockdevCreate {
    /// The job's id.
    #[serde(rename = "job-id")]
    pub job_id: String,
    /// BlockdevCreateOptions: `driver` and the driver's own options.
    pub options: Value,
}
command!(BlockdevCreate, "blockdev-create", IgnoredAny);

macro_rules! job_control {
    ($ty:ident, $name:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Serialize)]
        pub struct $ty {
            /// The job.
            pub id: String,
        }
        command!($ty, $name, IgnoredAny);
    };
}

job_control!(JobPause, "job-pause", "`job-pause`.");
job_control!(JobResume, "job-resume", "`job-resume`.");
job_control!(
    JobComplete,
    "job-complete",
    "`job-complete`: pivot a ready job."
);
job_control!(
    JobFinalize,
    "job-finalize",
    "`job-finalize`: end a pending job."
);
job_control!(
    JobDismiss,
    "job-dismiss",
    "`job-dismiss`: forget a concluded job."
);

/// `block-job-cancel`: cancels a job; a ready mirror cancelled without `force` ends in
/// sync without pivoting, and counts as completed.
#[derive(Debug, Clone, Serialize)]
pub struct BlockJobCancel {
    /// The job.
    pub device: String,
    /// Abandon a ready mirror instead of ending it in sync.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
}
command!(BlockJobCancel, "block-job-cancel", IgnoredAny);

/// `block-job-set-speed`.
#[derive(Debug, Clone, Serialize)]
pub struct BlockJobSetSpeed {
    /// The job.
    pub device: String,
    /// Bytes per second, 0 for no limit.
    pub speed: u64,
}
command!(BlockJobSetSpeed, "block-job-set-speed", IgnoredAny);

// ---- nodes ----

/// `blockdev-add`: the options are BlockdevOptions, given as JSON.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct BlockdevAdd(pub Map<String, Value>);
command!(BlockdevAdd, "blockdev-add", IgnoredAny);

/// `blockdev-del`.
#[derive(Debug, Clone, Serialize)]
pub struct BlockdevDel {
    /// The node.
    #[serde(rename = "node-name")]
    pub node_name: String,
}
command!(BlockdevDel, "blockdev-del", IgnoredAny);

/// `block_resize`.
#[derive(Debug, Clone, Serialize)]
pub struct BlockResize {
    /// The node.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// The new size in bytes.
    pub size: u64,
}
command!(BlockResize, "block_resize", IgnoredAny);

/// `blockdev-snapshot`: puts `overlay`, an opened node without a backing file, on top of
/// `node`: users of `node` move to `overlay`, and `node` becomes its backing file.
#[derive(Debug, Clone, Serialize)]
pub struct BlockdevSnapshot {
    /// The node that becomes the backing file.
    pub node: String,
    /// The overlay.
    pub overlay: String,
}
command!(BlockdevSnapshot, "blockdev-snapshot", IgnoredAny);

/// `blockdev-snapshot-sync`: creates an overlay image and puts it on top of a node.
#[derive(Debug, Clone, Serialize)]
pub struct BlockdevSnapshotSync {
    /// The node that becomes the overlay's backing file.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// The overlay's file, created.
    #[serde(rename = "snapshot-file")]
    pub snapshot_file: String,
    /// The overlay's node name.
    #[serde(rename = "snapshot-node-name", skip_serializing_if = "Option::is_none")]
    pub snapshot_node_name: Option<String>,
    /// The overlay's format (qcow2 when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}
command!(BlockdevSnapshotSync, "blockdev-snapshot-sync", IgnoredAny);

// ---- bitmaps ----

/// `block-dirty-bitmap-add`.
#[derive(Debug, Clone, Serialize)]
pub struct BlockDirtyBitmapAdd {
    /// The node.
    pub node: String,
    /// The bitmap.
    pub name: String,
    /// Bytes per bit, a power of two.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granularity: Option<u64>,
    /// Stored in the image at close.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    /// Created not recording.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}
command!(BlockDirtyBitmapAdd, "block-dirty-bitmap-add", IgnoredAny);

macro_rules! bitmap_command {
    ($ty:ident, $name:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Serialize)]
        pub struct $ty {
            /// The node.
            pub node: String,
            /// The bitmap.
            pub name: String,
        }
        command!($ty, $name, IgnoredAny);
    };
}

bitmap_command!(
    BlockDirtyBitmapRemove,
    "block-dirty-bitmap-remove",
    "`block-dirty-bitmap-remove`."
);
bitmap_command!(
    BlockDirtyBitmapClear,
    "block-dirty-bitmap-clear",
    "`block-dirty-bitmap-clear`."
);
bitmap_command!(
    BlockDirtyBitmapEnable,
    "block-dirty-bitmap-enable",
    "`block-dirty-bitmap-enable`."
);
bitmap_command!(
    BlockDirtyBitmapDisable,
    "block-dirty-bitmap-disable",
    "`block-dirty-bitmap-disable`."
);

/// `block-dirty-bitmap-merge`: ORs bitmaps of the same node into `target`.
#[derive(Debug, Clone, Serialize)]
pub struct BlockDirtyBitmapMerge {
    /// The node.
    pub node: String,
    /// The bitmap that receives the bits.
    pub target: String,
    /// The bitmaps merged in.
    pub bitmaps: Vec<String>,
}
command!(
    BlockDirtyBitmapMerge,
    "block-dirty-bitmap-merge",
    IgnoredAny
);

// ---- exports ----

/// `nbd-server-start`, with a SocketAddress given as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct NbdServerStart {
    /// Where to listen, as SocketAddressLegacy: `{"type": "unix", "data": {"path": ..}}` or
    /// `{"type": "inet", "data": {"host": .., "port": ..}}`.
    pub addr: Value,
}
command!(NbdServerStart, "nbd-server-start", IgnoredAny);

/// `nbd-server-stop`: stops the NBD server and removes its exports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NbdServerStop {}
command!(NbdServerStop, "nbd-server-stop", IgnoredAny);

/// `block-export-add`: BlockExportOptions as JSON (the type decides the rest).
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct BlockExportAdd(pub Map<String, Value>);
command!(BlockExportAdd, "block-export-add", IgnoredAny);

/// `block-export-del`.
#[derive(Debug, Clone, Serialize)]
pub struct BlockExportDel {
    /// The export.
    pub id: String,
    /// `hard` disconnects clients; `safe` (absent) refuses while they are connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}
command!(BlockExportDel, "block-export-del", IgnoredAny);

// ---- events ----

/// An event as it arrived.
#[derive(Debug, Clone)]
pub struct Event {
    /// The event's name, e.g. `BLOCK_JOB_COMPLETED`.
    pub name: String,
    /// Its data (`Value::Null` when it has none).
    pub data: Value,
    /// When it was emitted, in microseconds since the epoch.
    pub timestamp_us: u64,
    /// The typed view of the events this module knows.
    pub kind: EventKind,
}

/// The events tools act on; the rest are [`EventKind::Other`].
#[derive(Debug, Clone)]
pub enum EventKind {
    /// A job changed state.
    JobStatusChange {
        /// The job.
        id: String,
        /// Its new state.
        status: JobStatus,
    },
    /// A block job ended; `error` says why when it failed.
    BlockJobCompleted(BlockJobEvent),
    /// A block job was cancelled.
    BlockJobCancelled(BlockJobEvent),
    /// A mirror or active commit is in sync.
    BlockJobReady(BlockJobEvent),
    /// An I/O error met a job's error policy.
    BlockJobError {
        /// The job.
        device: String,
        /// read or write.
        operation: String,
        /// ignore, report or stop.
        action: String,
    },
    /// An export is gone.
    BlockExportDeleted {
        /// The export.
        id: String,
    },
    /// Any other event.
    Other,
}

/// The data of BLOCK_JOB_COMPLETED, _CANCELLED and _READY.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockJobEvent {
    /// The job's id.
    pub device: String,
    /// The job's type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Bytes known.
    pub len: u64,
    /// Bytes done.
    pub offset: u64,
    /// Why the job failed.
    pub error: Option<String>,
}

impl Event {
    /// Reads an event message (`{"event": .., "data": .., "timestamp": ..}`); `None` if it
    /// is not one.
    pub fn from_message(message: &Value) -> Option<Event> {
        let name = message.get("event")?.as_str()?.to_owned();
        let data = message.get("data").cloned().unwrap_or(Value::Null);
        let timestamp = &message["timestamp"];
        let timestamp_us = timestamp["seconds"].as_u64().unwrap_or(0) * 1_000_000
            + timestamp["microseconds"].as_u64().unwrap_or(0);
        let kind = EventKind::parse(&name, &data);
        Some(Event {
            name,
            data,
            timestamp_us,
            kind,
        })
    }
}

impl EventKind {
    fn parse(name: &str, data: &Value) -> EventKind {
        fn field<T: DeserializeOwned>(data: &Value, key: &str) -> Option<T> {
            serde_json::from_value(data.get(key)?.clone()).ok()
        }
        fn job(data: &Value) -> Option<BlockJobEvent> {
            serde_json::from_value(data.clone()).ok()
        }
        let parsed = match name {
            "JOB_STATUS_CHANGE" => (|| {
                Some(EventKind::JobStatusChange {
                    id: field(data, "id")?,
                    status: field(data, "status")?,
                })
            })(),
            "BLOCK_JOB_COMPLETED" => job(data).map(EventKind::BlockJobCompleted),
            "BLOCK_JOB_CANCELLED" => job(data).map(EventKind::BlockJobCancelled),
            "BLOCK_JOB_READY" => job(data).map(EventKind::BlockJobReady),
            "BLOCK_JOB_ERROR" => (|| {
                Some(EventKind::BlockJobError {
                    device: field(data, "device")?,
                    operation: field(data, "operation")?,
                    action: field(data, "action")?,
                })
            })(),
            "BLOCK_EXPORT_DELETED" => {
                field(data, "id").map(|id| EventKind::BlockExportDeleted { id })
            }
            _ => None,
        };
        parsed.unwrap_or(EventKind::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arguments_are_qmp_names_without_absent_options() {
        let backup = BlockdevBackup::new("src", "dst", MirrorSyncMode::Incremental)
            .job_id("j")
            .speed(5);
        assert_eq!(
            serde_json::to_value(&backup).unwrap(),
            json!({"job-id": "j", "speed": 5, "device": "src", "target": "dst",
                   "sync": "incremental"})
        );
    }

    #[test]
    fn events_are_typed_and_unknown_ones_kept() {
        let e = Event::from_message(&json!({"event": "JOB_STATUS_CHANGE",
            "data": {"id": "j", "status": "concluded"},
            "timestamp": {"seconds": 2, "microseconds": 5}}))
        .unwrap();
        assert!(
            matches!(e.kind, EventKind::JobStatusChange { ref id, status }
            if id == "j" && status == JobStatus::Concluded)
        );
        assert_eq!(e.timestamp_us, 2_000_005);
        let e = Event::from_message(&json!({"event": "JOB_STATUS_CHANGE",
            "data": {"id": "j", "status": "someday"}, "timestamp": {}}))
        .unwrap();
        assert!(matches!(
            e.kind,
            EventKind::JobStatusChange {
                status: JobStatus::Unknown,
                ..
            }
        ));
        let e = Event::from_message(&json!({"event": "NEW_THING", "data": {"x": 1}})).unwrap();
        assert!(matches!(e.kind, EventKind::Other));
        assert_eq!(e.data["x"], 1);
        assert!(Event::from_message(&json!({"return": {}})).is_none());
    }
}
