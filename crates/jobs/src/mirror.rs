//! The mirror job (blockdev-mirror, drive-mirror, and active block-commit): keeps a target
//! in sync with a source that clients keep writing, then on block-job-complete puts the
//! target in the source's place for every user.
//!
//! A `mirror_top` filter above the source marks what clients write in the job's dirty
//! bitmap; the job copies dirty ranges with many requests in flight until nothing is dirty
//! (READY), and keeps copying after that. To finish it stops client I/O at the filter, copies
//! what is left, and keeps the filter quiet until the graph change is done.
//!
//! With blockd's `x-auto-write-blocking`, unlike QEMU's background mode, a mirror always
//! converges: when passes over the bitmap have stopped shrinking the dirty set for a while,
//! clients write faster than the job copies, and the filter switches to write-blocking
//! (client writes reach the target before they complete), so the dirty set can only shrink.
//! Not sooner: write-blocking makes every client write wait for the target, so a mirror that
//! still converges stays in the background.

use crate::driver::RowProgress;
use crate::policy::ErrorAction;
use crate::setup::{create_job, job_edge};
use crate::workers::Workers;
use crate::{Job, JobManager, JobOptions};
use crate::{JobContext, JobDriver, JobFailure, JobType};
use aio::IoBuf;
use async_trait::async_trait;
use block::CopyError;
use block::DirtyBitmap;
use block::GraphChange;
use block::{Child, Graph, Node, Parent, Perms};
use block::{CommonOptions, WriteFlags};
use block::{MirrorState, MirrorTop};
use qapi::error::QmpError;
use serde_json::{json, Map, Value};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// What a mirror copies besides new writes (QMP `sync`; the caller refuses `incremental`
/// and `bitmap`). Active commit uses `Full`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorSync {
    /// Everything the source reads.
    Full,
    /// What the source's top layer holds (the target has the same backing).
    Top,
    /// Only what clients write from now on.
    None,
}

/// At most this many copy requests in flight (QEMU's limit too).
const MAX_IN_FLIGHT: usize = 16;
/// Largest single copy request.
const MAX_CHUNK: u64 = 1 << 20;
/// How long passes may fail to shrink the dirty set before the mirror stops relying on
/// background copying (see the module comment).
const STALL: Duration = Duration::from_secs(2);

/// Watches the dirty bytes each pass over the bitmap leaves behind.
#[derive(Default)]
struct ConvergenceWatch {
    /// The last pass that left at most 3/4 of the one before it, and when it ended.
    best: Option<(u64, Instant)>,
}

impl ConvergenceWatch {
    /// A pass ended with `dirty` bytes left; true when no pass has shrunk the dirty set by a
    /// quarter for `STALL`.
    fn pass_ended(&mut self, dirty: u64, now: Instant) -> bool {
        match self.best {
            Some((best, since)) if dirty * 4 > best * 3 => {
                dirty > 0 && now.duration_since(since) >= STALL
            }
            _ => {
                self.best = Some((dirty, now));
                false
            }
        }
    }
}

/// How a mirror job copies and what completion does, kept by the job after its setup.
pub struct MirrorConfig {
    /// What to copy (QMP `sync`).
    pub sync: MirrorSync,
    /// Most bytes of copy requests in flight (QMP `buf-size`, defaulted by the caller);
    /// one request always may go.
    pub buf_size: u64,
    /// Zero ranges may be deallocated on the target.
    pub unmap: bool,
    /// The node that leaves the graph at completion: the source (through its filter), or
    /// the node `replaces` named.
    pub replaces: Option<Arc<Node>>,
    /// Active commit: the target is the base of the source's chain; only what lies above
    /// it is copied, and sizes may differ (the base grows).
    pub commit_base: bool,
    /// Give the target this backing node when it takes the source's place (drive-mirror
    /// sync=top/none on a new image).
    pub target_backing: Option<Arc<Node>>,
    /// The target reads as zeroes before the job: sync=full need not zero it first.
    pub target_is_zero: bool,
    /// Active commit made the read-only base writable: it goes back unless it took the
    /// top's place.
    pub target_reopened: bool,
    /// blockd's `x-auto-write-blocking`: a background mirror whose passes stop shrinking
    /// the dirty set switches to write-blocking by itself, so that it converges under any
    /// write load. Off unless asked for: QEMU never changes the copy mode on its own.
    pub auto_write_blocking: bool,
}

pub struct MirrorJob {
    graph: Arc<Graph>,
    source: Arc<Node>,
    target: Arc<Node>,
    filter: Arc<Node>,
    state: Arc<MirrorState>,
    config: MirrorConfig,
    /// The job's own edges on source and target: they mark both busy until the job ends.
    job_edges: Mutex<Vec<Arc<Child>>>,
    /// Run ended with the filter drained, to be released once the graph changed.
    drained: AtomicBool,
    pivot: AtomicBool,
    actively_synced: AtomicBool,
    /// Rates and the time to READY, brought up to date by query-block-jobs.
    estimates: Mutex<Estimates>,
}

/// Rates are measured over windows of at least this long.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// The newest window's weight in a smoothed rate.
const SMOOTHING: f64 = 0.5;
/// Slower than this (bytes per second) the dirty set is not shrinking.
const MIN_SHRINK_RATE: f64 = 64.0 * 1024.0;

/// What a window starts from.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    copied: u64,
    dirtied: u64,
    dirty: u64,
}

/// blockd's mirror estimates (QEMU has none): how fast the job copies, how fast clients
/// dirty, and from how fast the dirty set shrinks, when the job will be READY. Measured
/// over windows of at least [`RATE_WINDOW`] between queries, smoothed.
#[derive(Default)]
struct Estimates {
    last: Option<Sample>,
    copy_rate: Option<f64>,
    dirty_rate: Option<f64>,
    /// Bytes per second the dirty set shrinks by; negative while it grows.
    shrink_rate: Option<f64>,
}

impl Estimates {
    fn update(&mut self, now: Instant, copied: u64, dirtied: u64, dirty: u64) {
        if let Some(last) = self.last {
            let seconds = now.saturating_duration_since(last.at).as_secs_f64();
            if seconds < RATE_WINDOW.as_secs_f64() {
                return;
            }
            let smooth = |old: Option<f64>, new: f64| {
                Some(old.map_or(new, |old| old + SMOOTHING * (new - old)))
            };
            self.copy_rate = smooth(
                self.copy_rate,
                copied.saturating_sub(last.copied) as f64 / seconds,
            );
            self.dirty_rate = smooth(
                self.dirty_rate,
                dirtied.saturating_sub(last.dirtied) as f64 / seconds,
            );
            self.shrink_rate = smooth(
                self.shrink_rate,
                (last.dirty as f64 - dirty as f64) / seconds,
            );
        }
        self.last = Some(Sample {
            at: now,
            copied,
            dirtied,
            dirty,
        });
    }

    /// Seconds until nothing is dirty at the rate the dirty set shrinks; None while it
    /// does not shrink (clients outrun the copy) or before a window was measured.
    fn seconds_to_ready(&self, dirty: u64) -> Option<f64> {
        match self.shrink_rate {
            _ if dirty == 0 => Some(0.0),
            // Below the floor the set is taken as standing still: a smoothed rate that
            // decays towards zero would promise ever later times, in the end infinity.
            Some(rate) if rate >= MIN_SHRINK_RATE => Some(dirty as f64 / rate),
            _ => None,
        }
    }
}

/// What a mirror (blockdev-mirror, drive-mirror, or active block-commit) asked for,
/// checked and looked up by the caller.
pub struct MirrorStart {
    /// The graph the mirror_top filter goes into.
    pub graph: Arc<Graph>,
    /// The node mirrored (QMP `device`), or the top of an active commit.
    pub source: Arc<Node>,
    /// The node written (QMP `target`), or the base of an active commit.
    pub target: Arc<Node>,
    /// The mirror_top filter's node name (QMP `filter-node-name`, or a generated one).
    pub filter_name: String,
    /// "mirror" or "commit", as the job's edges report it.
    pub job_type: &'static str,
    /// Bytes per bit of the job's dirty bitmap (QMP `granularity`): a power of 2 in
    /// [512 B, 64 MiB], checked by the caller.
    pub granularity: u64,
    /// Start in copy-mode write-blocking (QMP `copy-mode`): client writes reach the target
    /// before they complete.
    pub write_blocking: bool,
    /// What the job takes on the target (commit also resizes the base).
    pub target_perm: Perms,
    /// Make a read-only target writable for the job (active commit into a backing node).
    pub reopen_target: bool,
    /// More nodes the job claims (the layers an active commit removes).
    pub busy: Vec<Arc<Node>>,
    /// How the job copies and completes.
    pub config: MirrorConfig,
}

/// QEMU's mirror_start_job: claim source, target and `busy`, reopen the target if asked,
/// put a mirror_top filter with the job's dirty bitmap above the source, and create the
/// job (not started). Any failure takes all of it back. Runs on an I/O thread.
pub async fn create_mirror(
    start: MirrorStart,
    manager: &JobManager,
    options: JobOptions,
) -> Result<Arc<Job>, QmpError> {
    let MirrorStart {
        graph,
        source,
        target,
        filter_name,
        job_type,
        granularity,
        write_blocking,
        target_perm,
        reopen_target,
        busy,
        mut config,
    } = start;
    let id = options.id.clone();
    let job_graph = graph.clone();
    create_job(
        &graph,
        manager,
        options,
        async |change: &mut GraphChange| {
            // The job and the filter write the target from the source's thread.
            change.share_thread(&target, &source)?;
            if reopen_target {
                config.target_reopened = target.read_only();
                change.set_writable(&target, true).await?;
            }
            let mut job_edges = Vec::new();
            for node in busy
                .iter()
                .filter(|n| !Arc::ptr_eq(n, &source) && !Arc::ptr_eq(n, &target))
            {
                job_edges.push(job_edge(node, &id, job_type)?);
            }
            let job_parent = || Parent::Job {
                id: id.clone(),
                job_type,
            };
            let target_edge = Node::attach(
                &target,
                "target",
                job_parent(),
                target_perm,
                Perms::ALL & !(Perms::WRITE | Perms::RESIZE),
            )?;
            job_edges.push(Node::attach(
                &source,
                "main node",
                job_parent(),
                Perms::NONE,
                Perms::ALL,
            )?);
            job_edges.push(Node::attach_job_backend(&target)?);
            let source_edge = Node::attach(
                &source,
                "backing",
                Parent::Node(filter_name.clone()),
                Perms::CONSISTENT_READ,
                Perms::ALL & !Perms::RESIZE,
            )?;
            let bitmap = Arc::new(DirtyBitmap::new(None, granularity, source.size()));
            let state = Arc::new(MirrorState::new(
                bitmap.clone(),
                target_edge,
                write_blocking,
            ));
            let filter = Node::new(
                filter_name,
                true,
                Box::new(MirrorTop::new(state.clone())),
                CommonOptions::default(),
                json!({"driver": "mirror_top", "backing": source.name()}),
            );
            filter.add_child(source_edge);
            filter.add_dirty_bitmap(bitmap);
            change.insert_filter(&source, &filter).await;
            Ok(MirrorJob::new(
                job_graph,
                source,
                target,
                MirrorFilter {
                    node: filter,
                    state,
                },
                config,
                job_edges,
            ))
        },
    )
    .await
}

/// The mirror_top node the job's setup inserted above the source, and the state it shares
/// with the job (its dirty bitmap, the target edge, the copy mode).
pub struct MirrorFilter {
    pub node: Arc<Node>,
    pub state: Arc<MirrorState>,
}

impl MirrorJob {
    pub fn new(
        graph: Arc<Graph>,
        source: Arc<Node>,
        target: Arc<Node>,
        filter: MirrorFilter,
        config: MirrorConfig,
        job_edges: Vec<Arc<Child>>,
    ) -> MirrorJob {
        let MirrorFilter {
            node: filter,
            state,
        } = filter;
        MirrorJob {
            graph,
            source,
            target,
            filter,
            state,
            config,
            job_edges: Mutex::new(job_edges),
            drained: AtomicBool::new(false),
            pivot: AtomicBool::new(false),
            actively_synced: AtomicBool::new(false),
            estimates: Mutex::default(),
        }
    }

    fn source_edge(&self) -> io::Result<Arc<Child>> {
        self.filter
            .child("backing")
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))
    }

    fn target_edge(&self) -> io::Result<Arc<Child>> {
        self.state
            .target()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))
    }

    /// The bottom of what is copied: the base for active commit, else the whole chain.
    fn base(&self) -> Option<&Arc<Node>> {
        self.config.commit_base.then_some(&self.target)
    }

    /// Mark what the sync mode asks to copy.
    async fn mark_initial(&self, ctx: &JobContext) -> Result<(), JobFailure> {
        let bitmap = self.state.bitmap();
        let len = self.source.size();
        match (self.config.sync, self.config.commit_base) {
            (MirrorSync::None, _) => return Ok(()),
            (MirrorSync::Full, false) if !self.config.target_is_zero => {
                bitmap.set(0, len);
                return Ok(());
            }
            _ => {}
        }
        let mut offset = 0;
        while offset < len {
            ctx.pause_point().await;
            if ctx.is_cancelled() {
                return Err(JobFailure::cancelled());
            }
            let allocated = if self.config.commit_base {
                let e = self
                    .source
                    .block_status_above(self.base(), offset, len - offset)
                    .await?;
                (e.allocated, e.len)
            } else if self.config.sync == MirrorSync::Full {
                let e = self
                    .source
                    .block_status_above(None, offset, len - offset)
                    .await?;
                (!e.zero, e.len)
            } else {
                let e = self.source.block_status(offset, len - offset).await?;
                (e.kind != block::ExtentKind::Unallocated, e.len)
            };
            let run = allocated.1.max(1).min(len - offset);
            if allocated.0 {
                bitmap.set(offset, run);
            }
            offset += run;
        }
        Ok(())
    }

    /// Copy one range that was dirty; on failure the range is dirty again.
    async fn copy_range(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        let (start, end) = self.state.granule_span(offset, len);
        let _held = self.state.ranges().lock(start, end).await;
        let result = self.copy_locked(offset, len).await;
        if result.is_err() {
            self.state.bitmap().set(offset, len);
        }
        result
    }

    async fn copy_locked(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        let source = self.source_edge().map_err(CopyError::Read)?;
        let target = self.target_edge().map_err(CopyError::Write)?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let extent = self
                .source
                .block_status_above(self.base(), pos, end - pos)
                .await
                .map_err(CopyError::Read)?;
            let n = extent.len.clamp(1, end - pos);
            if self.config.commit_base && !extent.allocated {
                // Lies in the base already.
            } else if extent.zero {
                if !self.target_reads_zero(pos, n).await {
                    let flags = WriteFlags {
                        may_unmap: self.config.unmap && self.target.backing().is_none(),
                        ..WriteFlags::default()
                    };
                    target
                        .write_zeroes(pos, n, flags)
                        .await
                        .map_err(CopyError::Write)?;
                }
            } else {
                let buf = IoBuf::with_capacity(n as usize, MAX_CHUNK as usize)
                    .map_err(CopyError::Read)?;
                let buf = source.read_buf(pos, buf).await.map_err(CopyError::Read)?;
                target
                    .write_buf(pos, buf, WriteFlags::default())
                    .await
                    .map_err(CopyError::Write)?;
            }
            pos += n;
        }
        Ok(())
    }

    async fn target_reads_zero(&self, offset: u64, len: u64) -> bool {
        match self.target.block_status_above(None, offset, len).await {
            Ok(e) => e.zero && e.len >= len,
            Err(_) => false,
        }
    }

    fn dirty_bytes(&self) -> u64 {
        self.state.bitmap().count()
    }

    /// Wait for new dirty data or a verb; the timeout only bounds a missed signal.
    async fn idle(&self, ctx: &JobContext) {
        ctx.sleep_until(self.state.dirtied(), Duration::from_millis(200))
            .await
    }

    async fn copy_loop(&self, ctx: &JobContext) -> Result<(), JobFailure> {
        let granularity = self.state.bitmap().granularity();
        let chunk = MAX_CHUNK
            .max(granularity)
            .min(self.config.buf_size.max(granularity));
        let mut cursor = 0;
        let mut in_flight = Workers::new();
        let mut bytes_in_flight = 0u64;
        let mut convergence = ConvergenceWatch::default();
        loop {
            if in_flight.is_idle() {
                ctx.pause_point().await;
            }
            if ctx.is_cancelled() {
                finish_in_flight(ctx, &mut in_flight).await;
                return Err(JobFailure::cancelled());
            }
            if self.state.take_target_write_failure() {
                let err = io::Error::from_raw_os_error(libc::EIO);
                let action = in_flight.alongside(ctx.handle_error(&err, false)).await;
                if let ErrorAction::Report = action {
                    finish_in_flight(ctx, &mut in_flight).await;
                    return Err(err.into());
                }
                self.actively_synced.store(false, Ordering::Release);
            }
            // Clients writing through the filter meanwhile come first.
            while in_flight.running() < self.state.foreground().job_share(MAX_IN_FLIGHT)
                && bytes_in_flight + chunk <= self.config.buf_size.max(chunk)
            {
                let next = match self.state.bitmap().next_dirty_range(cursor, chunk) {
                    Some(range) => Some(range),
                    None if cursor > 0 => {
                        // A pass is over: clients outrunning it means background copying
                        // cannot converge.
                        let dirty = self.dirty_bytes();
                        let stalled = convergence.pass_ended(dirty, Instant::now());
                        if stalled
                            && self.config.auto_write_blocking
                            && !self.state.is_write_blocking()
                        {
                            tracing::info!(
                                job = ctx.id(),
                                "mirror is not converging, switching to write-blocking"
                            );
                            self.state.set_write_blocking();
                        }
                        cursor = 0;
                        self.state.bitmap().next_dirty_range(0, chunk)
                    }
                    None => None,
                };
                let Some((offset, len)) = next else { break };
                in_flight.alongside(ctx.rate_limit(len)).await;
                if ctx.is_cancelled() {
                    break;
                }
                // Cleared before the copy reads, so that a write landing meanwhile marks
                // the range again and is copied once more.
                self.state.bitmap().reset(offset, len);
                cursor = offset + len;
                bytes_in_flight += len;
                let started = ctx.error_stops();
                in_flight.push(async move { (started, len, self.copy_range(offset, len).await) });
            }
            self.update_len(ctx, bytes_in_flight);
            let Some((started, len, result)) = in_flight.next().await else {
                if self.dirty_bytes() > 0 {
                    continue;
                }
                if self.finish_when_quiet(ctx).await? {
                    return Ok(());
                }
                continue;
            };
            bytes_in_flight -= len;
            match result {
                Ok(()) => ctx.add_offset(len),
                Err(e) => {
                    let (err, is_read) = match &e {
                        CopyError::Read(err) => (err, true),
                        CopyError::Write(err) => (err, false),
                    };
                    // The other copies go on meanwhile, also while the policy pauses the
                    // job: a client write may wait for a range one of them holds.
                    let handled = ctx.handle_error_since(err, is_read, started);
                    if let ErrorAction::Report = in_flight.alongside(handled).await {
                        finish_in_flight(ctx, &mut in_flight).await;
                        return Err(err.into());
                    }
                }
            }
        }
    }

    /// QEMU's progress: what was copied, plus what is dirty or being copied.
    fn update_len(&self, ctx: &JobContext, in_flight: u64) {
        let (offset, _) = ctx.progress();
        ctx.set_len(offset + self.dirty_bytes() + in_flight);
    }

    /// Nothing dirty, nothing in flight: become READY, and finish if asked to. Returns
    /// whether the job's work is over (with the filter drained).
    async fn finish_when_quiet(&self, ctx: &JobContext) -> Result<bool, JobFailure> {
        if self.state.active_writes() > 0 {
            self.idle(ctx).await;
            return Ok(false);
        }
        if !ctx.is_ready() {
            if let Err(e) = self.target.flush().await {
                if let ErrorAction::Report = ctx.handle_error(&e, false).await {
                    return Err(e.into());
                }
                return Ok(false);
            }
            if self.dirty_bytes() == 0 {
                self.update_len(ctx, 0);
                ctx.set_ready();
            }
            return Ok(false);
        }
        if self.state.is_write_blocking() {
            self.actively_synced.store(true, Ordering::Release);
        }
        if !(ctx.should_complete() || ctx.cancel_requested()) {
            self.idle(ctx).await;
            return Ok(false);
        }
        self.filter.drain().await;
        if self.dirty_bytes() > 0 {
            self.filter.undrain();
            return Ok(false);
        }
        if let Err(e) = self.target.flush().await {
            self.filter.undrain();
            if let ErrorAction::Report = ctx.handle_error(&e, false).await {
                return Err(e.into());
            }
            return Ok(false);
        }
        self.drained.store(true, Ordering::Release);
        self.pivot.store(!ctx.cancel_requested(), Ordering::Release);
        Ok(true)
    }

    /// Put the target where the replaced node was, for every user: the pivot, as one
    /// [`GraphChange`]. A backing the target cannot take is logged and the pivot goes on,
    /// as QEMU's mirror_exit_common does; the replace itself cannot fail, so the change
    /// is always kept.
    async fn swap_in_target(&self) {
        let mut change = GraphChange::new(&self.graph);
        if let Some(backing) = &self.config.target_backing {
            if self.target.driver().supports_backing() {
                if let Err(e) = change.set_backing(&self.target, Some(backing)).await {
                    tracing::warn!("mirror target keeps no backing: {e}");
                }
            }
        }
        // The job's writing edge would otherwise refuse the users' own write permission.
        drop(self.state.release_target());
        let replaced = match &self.config.replaces {
            Some(node) if !Arc::ptr_eq(node, &self.source) => node,
            _ => &self.filter,
        };
        change.replace(replaced, &self.target).await;
        change.commit();
    }
}

/// Let the copies in flight finish (no buffer is dropped mid-write) and count those that
/// succeeded as done: len - offset is what the job left undone.
async fn finish_in_flight<F>(ctx: &JobContext, in_flight: &mut Workers<F>)
where
    F: std::future::Future<Output = (u64, u64, Result<(), CopyError>)>,
{
    while let Some((_, len, result)) = in_flight.next().await {
        if result.is_ok() {
            ctx.add_offset(len);
        }
    }
}

#[async_trait(?Send)]
impl JobDriver for MirrorJob {
    fn job_type(&self) -> JobType {
        if self.config.commit_base {
            JobType::Commit
        } else {
            JobType::Mirror
        }
    }

    async fn run(&self, ctx: &JobContext) -> Result<(), JobFailure> {
        if !self.config.commit_base && self.source.size() != self.target.size() {
            return Err(JobFailure::new(
                "Source and target image have different sizes",
            ));
        }
        if self.config.commit_base && self.target.size() < self.source.size() {
            self.target.truncate(self.source.size()).await?;
        }
        self.mark_initial(ctx).await?;
        self.update_len(ctx, 0);
        self.copy_loop(ctx).await
    }

    fn can_complete(&self) -> bool {
        true
    }

    fn supports_soft_cancel(&self) -> bool {
        true
    }

    fn change(&self, args: &Map<String, Value>) -> Result<(), QmpError> {
        if self.config.commit_base || args.get("type").and_then(Value::as_str) != Some("mirror") {
            return Ok(());
        }
        match args.get("copy-mode").and_then(Value::as_str) {
            Some("write-blocking") => {
                self.state.set_write_blocking();
                Ok(())
            }
            // QEMU refuses this change; blockd allows it (client writes only mark the
            // bitmap again, the copy loop takes them), so a switch is never one-way.
            Some("background") => {
                self.state.set_background();
                self.actively_synced.store(false, Ordering::Release);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn commit(&self) {
        if self.pivot.load(Ordering::Acquire) {
            self.swap_in_target().await;
        }
    }

    async fn clean(&self) {
        drop(self.state.release_target());
        if self.pivot.load(Ordering::Acquire) {
            self.graph.retire_filter(&self.filter);
        } else {
            self.graph.remove_filter(&self.filter, &self.source).await;
        }
        if self.drained.swap(false, Ordering::AcqRel) {
            self.filter.undrain();
        }
        self.filter.remove_dirty_bitmap(self.state.bitmap());
        self.job_edges.lock().unwrap().clear();
        if self.config.target_reopened && !self.pivot.load(Ordering::Acquire) {
            if let Err(e) = self.target.set_writable(false).await {
                tracing::warn!(node = self.target.name(), "stays writable: {e}");
            }
        }
    }

    fn extra_info(&self, progress: &RowProgress) -> Map<String, Value> {
        let mut extra = Map::new();
        if !self.config.commit_base {
            extra.insert(
                "actively-synced".into(),
                json!(self.actively_synced.load(Ordering::Acquire)),
            );
        }
        let dirty = self.dirty_bytes();
        let mut estimates = self.estimates.lock().unwrap();
        estimates.update(
            Instant::now(),
            progress.offset,
            self.state.dirtied_bytes(),
            dirty,
        );
        if let (Some(copy), Some(dirtied)) = (estimates.copy_rate, estimates.dirty_rate) {
            extra.insert("x-copy-rate".into(), json!(copy.round() as u64));
            extra.insert("x-dirty-rate".into(), json!(dirtied.round() as u64));
        }
        let to_ready = if progress.ready {
            Some(0.0)
        } else if progress.paused {
            // A paused job gets no nearer.
            None
        } else {
            estimates.seconds_to_ready(dirty)
        };
        if let Some(seconds) = to_ready {
            extra.insert(
                "x-seconds-to-ready".into(),
                json!((seconds * 10.0).round() / 10.0),
            );
        }
        extra
    }
}

#[cfg(test)]
mod tests {
    use super::{ConvergenceWatch, Estimates, RATE_WINDOW, STALL};
    use tokio::time::Instant;

    const MIB: u64 = 1 << 20;

    #[test]
    fn shrinking_passes_never_stall() {
        let mut watch = ConvergenceWatch::default();
        let start = Instant::now();
        let mut dirty = 1024 * MIB;
        for pass in 0..20 {
            assert!(!watch.pass_ended(dirty, start + STALL * pass));
            dirty = dirty * 6 / 10;
        }
    }

    #[test]
    fn a_dirty_set_that_stops_shrinking_stalls_after_the_grace_time() {
        let mut watch = ConvergenceWatch::default();
        let start = Instant::now();
        assert!(!watch.pass_ended(1500 * MIB, start));
        assert!(!watch.pass_ended(1400 * MIB, start + STALL / 2));
        assert!(watch.pass_ended(1450 * MIB, start + STALL));
    }

    #[test]
    fn a_small_steady_dirty_set_stalls_too_until_a_pass_empties_it() {
        let mut watch = ConvergenceWatch::default();
        let start = Instant::now();
        assert!(!watch.pass_ended(2 * MIB, start));
        let tick = STALL / 400;
        let mut now = start;
        for _ in 0..399 {
            now += tick;
            assert!(!watch.pass_ended(2 * MIB, now));
        }
        now += tick;
        assert!(watch.pass_ended(2 * MIB, now));
        assert!(!watch.pass_ended(0, now + tick));
        assert!(!watch.pass_ended(2 * MIB, now + STALL / 2));
    }

    #[test]
    fn estimates_need_a_window_and_follow_the_dirty_set() {
        let mut e = Estimates::default();
        let t0 = Instant::now();
        e.update(t0, 0, 0, 100 * MIB);
        assert_eq!(e.seconds_to_ready(100 * MIB), None);
        // Too soon for a window: nothing changes.
        e.update(t0 + RATE_WINDOW / 2, 10 * MIB, 0, 90 * MIB);
        assert_eq!(e.copy_rate, None);
        // 40 MiB copied while clients dirtied 20: the set shrank by 20 MiB in 1 s.
        e.update(t0 + RATE_WINDOW, 40 * MIB, 20 * MIB, 80 * MIB);
        assert_eq!(e.copy_rate, Some(40.0 * MIB as f64));
        assert_eq!(e.dirty_rate, Some(20.0 * MIB as f64));
        assert_eq!(e.seconds_to_ready(80 * MIB), Some(4.0));
        // Clients outrun the copy: the set grows, and no time is promised.
        e.update(t0 + RATE_WINDOW * 2, 50 * MIB, 80 * MIB, 140 * MIB);
        assert_eq!(e.seconds_to_ready(140 * MIB), None);
        // A set that stands still: the decaying rate never turns into a promise.
        for i in 3..2000 {
            e.update(t0 + RATE_WINDOW * i, 50 * MIB, 80 * MIB, 140 * MIB);
            assert_eq!(e.seconds_to_ready(140 * MIB), None);
        }
        assert_eq!(e.seconds_to_ready(0), Some(0.0));
    }
}
