//! The backup job: a point-in-time copy of a source node to a target node.
//!
//! A copy-before-write filter sits above the source for the whole job, sharing one
//! [`BlockCopy`] with the job: the job walks the clusters still to copy with many requests
//! in flight, and a client write to a cluster not copied yet first has the filter copy the
//! old data. Either way each cluster is copied once, as it was when the job started.
//!
//! With a sync bitmap the job copies only what the bitmap marks, and the bitmap's point in
//! time moves to the job's start when the job ends as its mode says (see [`SyncBitmap`]).

use crate::policy::ErrorAction;
use crate::setup::create_job;
use crate::workers::Workers;
use crate::{Job, JobManager, JobOptions};
use crate::{JobContext, JobDriver, JobFailure, JobType};
use async_trait::async_trait;
use block::DirtyBitmap;
use block::GraphChange;
use block::{BlockCopy, ClusterBitmap, CopyError, TargetMode};
use block::{Child, DrainedSection, Graph, Node, Parent, Perms};
use block::{CommonOptions, ExtentKind};
use block::{CopyBeforeWrite, OnCbwError};
use qapi::error::QmpError;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a backup copies (QMP `sync`; `incremental` and `bitmap` both become `Bitmap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Everything the source reads.
    Full,
    /// Only what the source's top layer holds.
    Top,
    /// Nothing by itself: only what writes are about to overwrite (fleecing).
    None,
    /// What the sync bitmap marks (the copy starts with exactly those clusters pending).
    Bitmap,
}

/// What becomes of the sync bitmap when the job ends (QEMU's BitmapSyncMode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitmapMode {
    /// Success: the bitmap holds only writes made since the job started; failure: as before
    /// plus those writes.
    OnSuccess,
    /// Always as before plus the writes made during the job.
    Never,
    /// Success as on-success; failure: what was not copied plus the writes made meanwhile.
    Always,
}

/// A dirty bitmap whose point in time a backup holds: while the job runs, writes go to an
/// anonymous successor (listed on the node, so queries show it and it sees every write),
/// and the named bitmap is frozen and busy.
pub struct SyncBitmap {
    node: Arc<Node>,
    bitmap: Arc<DirtyBitmap>,
    successor: Arc<DirtyBitmap>,
    mode: BitmapMode,
}

impl SyncBitmap {
    /// Freeze `bitmap` (of `node`) as of now.
    pub fn start(node: Arc<Node>, bitmap: Arc<DirtyBitmap>, mode: BitmapMode) -> SyncBitmap {
        let successor = bitmap.create_successor();
        node.add_dirty_bitmap(successor.clone());
        SyncBitmap {
            node,
            bitmap,
            successor,
            mode,
        }
    }

    pub fn bitmap(&self) -> &Arc<DirtyBitmap> {
        &self.bitmap
    }

    /// Give the point in time back or move it, as the mode says for this outcome; a failed
    /// job in mode always re-marks what `uncopied` (its copy) did not copy.
    ///
    /// The node is drained meanwhile: a write recorded in the successor after it was merged
    /// would be lost. The successor stays in the node's list until the merge is done, so a
    /// write landing in between is recorded in both.
    pub async fn finish(&self, success: bool, uncopied: &BlockCopy) {
        let sync = (success || self.mode == BitmapMode::Always) && self.mode != BitmapMode::Never;
        let remark = (!success && self.mode == BitmapMode::Always).then_some(uncopied);
        self.end(sync, remark).await;
    }

    /// The job never started: the bitmap is as before plus the writes made meanwhile.
    pub async fn undo(&self) {
        self.end(false, None).await;
    }

    async fn end(&self, abdicate: bool, uncopied: Option<&BlockCopy>) {
        self.node.drain().await;
        if abdicate {
            self.bitmap.abdicate();
        } else {
            self.bitmap.reclaim();
        }
        if let Some(copy) = uncopied {
            let cluster = copy.cluster_size();
            let mut next = 0;
            while let Some(c) = copy.next_pending(next) {
                self.bitmap.set(c * cluster, cluster);
                next = c + 1;
            }
        }
        self.node.remove_dirty_bitmap(&self.successor);
        self.node.undrain();
    }
}

/// Parallelism of the copy loop (QEMU's x-perf options).
#[derive(Clone, Copy, Debug)]
pub struct BackupPerf {
    /// Most copy requests in flight (x-perf `max-workers`); fewer if they would hold more
    /// than 128 MiB.
    pub max_workers: usize,
    /// Largest request, in bytes; 0 picks the default.
    pub max_chunk: u64,
}

/// 16 rather than QEMU's 64: a client write to a cluster not copied yet waits for the copy
/// of that cluster, which queues behind every job write in flight on the target. With 64
/// MiB in flight the p99 write latency under load was about qsd's (~150 ms in bench/); with
/// 16 MiB it is a quarter of it, and the backup alone is as fast (qcow2 targets gather the
/// writes in flight into one allocation, so fewer of them still keep the disk busy).
impl Default for BackupPerf {
    fn default() -> Self {
        BackupPerf {
            max_workers: 16,
            max_chunk: 0,
        }
    }
}

/// Default request size. Larger requests make a qcow2 target allocate faster (4 MiB: about
/// 10 % faster backups in bench/), but a client write that meets a cluster being copied
/// waits for the whole request: 1 MiB kept the p99 write latency under load below qsd's,
/// 4 MiB more than doubled it.
const DEFAULT_CHUNK: u64 = 1 << 20;

/// Bound on the bytes of all requests in flight (QEMU's block-copy bound too).
const MAX_IN_FLIGHT_BYTES: u64 = 128 << 20;

pub struct BackupJob {
    graph: Arc<Graph>,
    source: Arc<Node>,
    /// The filter and the copy state hold edges on source and target: `clean` lets go of
    /// them, so the nodes are free as soon as the job ends, not when the job is dropped.
    filter: Mutex<Option<Arc<Node>>>,
    copy: Mutex<Option<Arc<BlockCopy>>>,
    sync: SyncMode,
    perf: BackupPerf,
    /// The job's own edges on source and target: they mark both busy until the job ends.
    job_edges: Mutex<Vec<Arc<Child>>>,
    sync_bitmap: Option<Arc<SyncBitmap>>,
}

impl BackupJob {
    pub fn new(
        graph: Arc<Graph>,
        source: Arc<Node>,
        filter: Arc<Node>,
        copy: Arc<BlockCopy>,
        sync: SyncMode,
        perf: BackupPerf,
        job_edges: Vec<Arc<Child>>,
    ) -> BackupJob {
        BackupJob {
            graph,
            source,
            filter: Mutex::new(Some(filter)),
            copy: Mutex::new(Some(copy)),
            sync,
            perf,
            job_edges: Mutex::new(job_edges),
            sync_bitmap: None,
        }
    }

    /// The copy state, present from creation until `clean`.
    fn copy(&self) -> Arc<BlockCopy> {
        self.copy
            .lock()
            .unwrap()
            .clone()
            .expect("the copy state lives until clean, the job's last step")
    }

    /// Back up with `bitmap` (sync=bitmap reads the copy's pending clusters from it).
    pub fn with_sync_bitmap(mut self, bitmap: Arc<SyncBitmap>) -> BackupJob {
        self.sync_bitmap = Some(bitmap);
        self
    }

    fn chunk(&self) -> u64 {
        let cluster = self.copy().cluster_size();
        let chunk = match self.perf.max_chunk {
            0 => DEFAULT_CHUNK,
            n => n,
        };
        chunk.max(cluster) / cluster * cluster
    }

    /// sync=top: forget the clusters the source's top layer does not hold.
    async fn skip_unallocated(&self, ctx: &JobContext) -> Result<(), JobFailure> {
        let cluster = self.copy().cluster_size();
        let len = self.copy().len();
        let mut offset = 0;
        while offset < len {
            ctx.pause_point().await;
            if ctx.is_cancelled() {
                return Err(JobFailure::cancelled());
            }
            let extent = self.source.block_status(offset, len - offset).await?;
            let run = extent.len.max(1);
            if extent.kind == ExtentKind::Unallocated {
                let first = offset.div_ceil(cluster);
                let end = (offset + run) / cluster + u64::from(offset + run >= len);
                if first < end {
                    self.copy().skip(first..end);
                }
            }
            offset += run;
        }
        Ok(())
    }

    /// sync=none: keep the point in time until cancelled, reporting what writes copied.
    async fn hold_point_in_time(&self, ctx: &JobContext) -> Result<(), JobFailure> {
        let mut reported = 0;
        loop {
            let kicked = ctx.kicked();
            if ctx.is_cancelled() {
                return Err(JobFailure::cancelled());
            }
            ctx.pause_point().await;
            self.report_progress(ctx, &mut reported);
            tokio::select! {
                _ = kicked => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// Bring the job's offset up to what block-copy has copied; `reported` is what the
    /// offset already holds.
    fn report_progress(&self, ctx: &JobContext, reported: &mut u64) {
        let copied = self.copy().copied_bytes();
        ctx.add_offset(copied.saturating_sub(*reported));
        *reported = copied;
    }

    async fn copy_all(&self, ctx: &JobContext) -> Result<(), JobFailure> {
        let cluster = self.copy().cluster_size();
        let chunk = self.chunk();
        let workers = self
            .perf
            .max_workers
            .clamp(1, (MAX_IN_FLIGHT_BYTES / chunk).max(1) as usize);
        let mut reported = 0;
        let mut cursor = 0;
        let mut in_flight = Workers::new();
        loop {
            if in_flight.is_idle() {
                ctx.pause_point().await;
            }
            if ctx.is_cancelled() {
                // Requests already sent finish so no buffer is dropped mid-write.
                while in_flight.next().await.is_some() {}
                self.report_progress(ctx, &mut reported);
                return Err(JobFailure::cancelled());
            }
            // Clients writing through the filter meanwhile come first.
            while in_flight.running() < self.copy().foreground().job_share(workers) {
                let Some(next) = self.copy().next_pending(cursor) else {
                    break;
                };
                let whole_disk = self.sync == SyncMode::Full;
                let skipped = in_flight
                    .alongside(self.copy().skip_zeroes(next, whole_disk))
                    .await;
                if let Some(end) = skipped {
                    // Counted against the speed limit as QEMU counts its zero writes.
                    in_flight
                        .alongside(ctx.rate_limit((end - next) * cluster))
                        .await;
                    // Skipped clusters count as done, as QEMU's do.
                    self.report_progress(ctx, &mut reported);
                    cursor = end;
                    continue;
                }
                // The speed limit applies when a request starts, so that many requests in
                // flight cannot run ahead of it.
                in_flight.alongside(ctx.rate_limit(chunk)).await;
                // Under a speed limit this loop may run for the whole job while requests
                // finish alongside: the offset follows them, not the loop's end.
                self.report_progress(ctx, &mut reported);
                if ctx.is_cancelled() {
                    break;
                }
                let offset = next * cluster;
                cursor = (offset + chunk) / cluster;
                let copy = self.copy();
                let started = ctx.error_stops();
                in_flight
                    .push(async move { (offset, started, copy.copy_range(offset, chunk).await) });
            }
            let Some((offset, started, result)) = in_flight.next().await else {
                if self.copy().remaining_bytes() == 0 {
                    break;
                }
                // What is left is being copied by client writes, or failed and awaits a
                // retry from the start.
                cursor = 0;
                ctx.sleep(Duration::from_millis(1)).await;
                continue;
            };
            self.report_progress(ctx, &mut reported);
            if let Err(e) = result {
                let is_read = matches!(e, CopyError::Read(_));
                // The other requests go on meanwhile, also while the policy pauses the job:
                // a client write may wait for a cluster one of them copies.
                let handled = ctx.handle_error_since(e.io(), is_read, started);
                match in_flight.alongside(handled).await {
                    ErrorAction::Report => {
                        // What the other workers still copy counts as done: len - offset
                        // is what the job left undone.
                        while in_flight.next().await.is_some() {}
                        self.report_progress(ctx, &mut reported);
                        return Err(e.io().into());
                    }
                    // The range stays pending: go back and copy it again.
                    ErrorAction::Retry | ErrorAction::Ignore => {
                        cursor = cursor.min(offset / cluster);
                    }
                }
            }
        }
        // The last clusters may have been copied by client writes, after the last report.
        self.report_progress(ctx, &mut reported);
        self.copy().target().flush().await?;
        Ok(())
    }
}

#[async_trait(?Send)]
impl JobDriver for BackupJob {
    fn job_type(&self) -> JobType {
        JobType::Backup
    }

    async fn run(&self, ctx: &JobContext) -> Result<(), JobFailure> {
        ctx.set_len(self.copy().len());
        match self.sync {
            SyncMode::None => self.hold_point_in_time(ctx).await,
            SyncMode::Top => {
                self.skip_unallocated(ctx).await?;
                ctx.set_len(self.copy().remaining_bytes());
                self.copy_all(ctx).await
            }
            SyncMode::Bitmap => {
                ctx.set_len(self.copy().remaining_bytes());
                self.copy_all(ctx).await
            }
            SyncMode::Full => self.copy_all(ctx).await,
        }
    }

    async fn commit(&self) {
        if let Some(sync) = &self.sync_bitmap {
            sync.finish(true, &self.copy()).await;
        }
    }

    async fn abort(&self) {
        if let Some(sync) = &self.sync_bitmap {
            sync.finish(false, &self.copy()).await;
        }
    }

    /// The filter leaves the graph whatever the outcome; the graph is as before the job.
    async fn clean(&self) {
        let filter = self.filter.lock().unwrap().take();
        if let Some(filter) = filter {
            self.graph.remove_filter(&filter, &self.source).await;
        }
        self.copy.lock().unwrap().take();
        self.job_edges.lock().unwrap().clear();
    }
}

/// Everything a backup job is made of, checked and looked up by the caller (the QMP
/// handler parses arguments, finds the nodes and the bitmap, and gives QEMU's texts).
pub struct BackupSetup {
    /// The graph the copy-before-write filter goes into.
    pub graph: Arc<Graph>,
    /// The node backed up (QMP `device`).
    pub source: Arc<Node>,
    /// The node written (QMP `target`).
    pub target: Arc<Node>,
    /// The copy-before-write filter's node name.
    pub filter_name: String,
    /// What to copy (QMP `sync`).
    pub sync: SyncMode,
    /// The sync bitmap and what becomes of it.
    pub bitmap: Option<(Arc<DirtyBitmap>, BitmapMode)>,
    /// The copy loop's parallelism and request size (QMP `x-perf`).
    pub perf: BackupPerf,
    /// The smallest copy unit asked for (x-perf.min-cluster-size), 0 for the target's.
    pub min_cluster: u64,
    /// The target reads as zeroes already (a new image), and whether data goes out
    /// compressed (QMP `compress`).
    pub target_mode: TargetMode,
    /// Id, speed, error policies and transaction of the job.
    pub options: JobOptions,
}

/// QEMU's backup_job_create: the sync bitmap's point in time moves to now, a
/// copy-before-write filter goes above the source (joining `drained`, so that the point in
/// time holds until the caller ends its drained section), and the job is created in
/// `manager`, not started. Any failure takes all of it back. Runs on an I/O thread.
pub async fn create_backup(
    setup: BackupSetup,
    manager: &JobManager,
    drained: &DrainedSection,
) -> Result<Arc<Job>, QmpError> {
    let BackupSetup {
        graph,
        source,
        target,
        filter_name,
        sync,
        bitmap,
        perf,
        min_cluster,
        target_mode,
        options,
    } = setup;
    let sync_bitmap =
        bitmap.map(|(bitmap, mode)| Arc::new(SyncBitmap::start(source.clone(), bitmap, mode)));
    let only_dirty = (sync == SyncMode::Bitmap)
        .then(|| sync_bitmap.as_ref().map(|s| s.bitmap().clone()))
        .flatten();
    let job_id = options.id.clone();
    let job_graph = graph.clone();
    let created = create_job(
        &graph,
        manager,
        options,
        async |change: &mut GraphChange| {
            let (filter, copy, job_edges) = insert_cbw(
                change,
                &source,
                &target,
                &filter_name,
                min_cluster,
                target_mode,
                only_dirty.as_deref(),
                &job_id,
                drained,
            )
            .await?;
            let driver = BackupJob::new(job_graph, source, filter, copy, sync, perf, job_edges);
            Ok(match &sync_bitmap {
                Some(sync_bitmap) => driver.with_sync_bitmap(sync_bitmap.clone()),
                None => driver,
            })
        },
    )
    .await;
    if created.is_err() {
        if let Some(sync_bitmap) = sync_bitmap {
            sync_bitmap.undo().await;
        }
    }
    created
}

/// Put a copy-before-write filter above `source` whose point in time is now, and mark
/// source and target as used by the job. With `only_dirty`, only the clusters it marks are
/// to be copied.
#[allow(clippy::too_many_arguments)]
async fn insert_cbw(
    change: &mut GraphChange,
    source: &Arc<Node>,
    target: &Arc<Node>,
    filter_name: &str,
    min_cluster: u64,
    target_mode: TargetMode,
    only_dirty: Option<&DirtyBitmap>,
    job_id: &str,
    drained: &DrainedSection,
) -> Result<(Arc<Node>, Arc<BlockCopy>, Vec<Arc<block::Child>>), String> {
    // The filter writes the target from the source's thread.
    change.share_thread(target, source)?;
    let job_parent = || Parent::Job {
        id: job_id.to_string(),
        job_type: "backup",
    };
    let job_edges = vec![
        Node::attach(source, "main node", job_parent(), Perms::NONE, Perms::ALL)?,
        Node::attach(target, "target", job_parent(), Perms::NONE, Perms::ALL)?,
    ];
    let filter_parent = || Parent::Node(filter_name.to_string());
    // The filter's open attaches its children: QEMU words a failure as the failure to
    // create the node (a read-only target, a conflicting user).
    let created = |e: String| format!("Could not create node: {e}");
    let file = Node::attach(
        source,
        "file",
        filter_parent(),
        Perms::CONSISTENT_READ,
        Perms::ALL & !Perms::RESIZE,
    )
    .map_err(created)?;
    let target_edge = Node::attach(
        target,
        "target",
        filter_parent(),
        Perms::WRITE,
        Perms::ALL & !Perms::RESIZE,
    )
    .map_err(created)?;
    let cluster = CopyBeforeWrite::cluster_size_for(target).max(min_cluster);
    let pending = match only_dirty {
        Some(bitmap) => ClusterBitmap::from_dirty(bitmap, cluster, source.size()),
        None => {
            let mut all = ClusterBitmap::new(source.size().div_ceil(cluster));
            all.set_range(0..all.len(), true);
            all
        }
    };
    let copy = Arc::new(BlockCopy::new(
        file.clone(),
        target_edge.clone(),
        cluster,
        pending,
        target_mode,
    ));
    let cbw = CopyBeforeWrite::with_copy(copy.clone(), OnCbwError::BreakGuestWrite, None);
    let filter = Node::new(
        filter_name.to_string(),
        true,
        Box::new(cbw),
        CommonOptions::default(),
        json!({"driver": "copy-before-write", "file": source.name(), "target": target.name()}),
    );
    filter.add_child(file);
    filter.add_child(target_edge);
    drained.add(&filter).await;
    change.insert_filter(source, &filter).await;
    Ok((filter, copy, job_edges))
}
