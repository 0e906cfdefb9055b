//! The stream job (block-stream): copies into a node what its backing chain holds above a
//! base, then makes the base its backing (or none), in the graph and in the image header.
//!
//! A `copy-on-read` filter above the node holds each range against client writes while
//! the job checks that the node does not hold it yet and copies it, so a client write is
//! never overwritten with older data from the backing chain.

use crate::policy::ErrorAction;
use crate::setup::{create_job, job_edge};
use crate::workers::Workers;
use crate::{Job, JobManager, JobOptions};
use crate::{JobContext, JobDriver, JobFailure, JobType};
use aio::IoBuf;
use async_trait::async_trait;
use block::CommonOptions;
use block::CopyOnRead;
use block::GraphChange;
use block::RangeLock;
use block::{Child, Graph, Node, Parent, Perms};
use block::{ExtentKind, WriteFlags};
use qapi::error::QmpError;
use serde_json::json;
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes examined and copied per step.
const STEP: u64 = 1 << 20;
/// Steps of a stream or commit in flight at once.
const STEPS_IN_FLIGHT: usize = 4;

pub struct StreamJob {
    graph: Arc<Graph>,
    device: Arc<Node>,
    base: Option<Arc<Node>>,
    filter: Arc<Node>,
    /// The filter's locks on ranges being copied, which guest writes wait for.
    ranges: Arc<RangeLock>,
    /// The name written into the header for the new backing (else the base's filename).
    backing_file: Option<String>,
    /// The job's writing edge on the device.
    write_edge: Mutex<Option<Arc<Child>>>,
    job_edges: Mutex<Vec<Arc<Child>>>,
    /// The device was a read-only backing node made writable for the job.
    reopened: bool,
    /// Some range could not be copied under `ignore`: the chain must stay as it is.
    incomplete: AtomicBool,
}

pub struct StreamSetup {
    pub graph: Arc<Graph>,
    pub device: Arc<Node>,
    pub base: Option<Arc<Node>>,
    pub filter: Arc<Node>,
    /// The copy-on-read filter's range locks (`CopyOnRead::ranges`).
    pub ranges: Arc<RangeLock>,
    pub backing_file: Option<String>,
    pub write_edge: Arc<Child>,
    pub job_edges: Vec<Arc<Child>>,
    pub reopened: bool,
}

/// What block-stream asked for, checked and looked up by the caller.
pub struct StreamStart {
    /// The graph the copy-on-read filter goes into.
    pub graph: Arc<Graph>,
    /// The node streamed into.
    pub device: Arc<Node>,
    /// The node that stays below (None: the whole chain is copied).
    pub base: Option<Arc<Node>>,
    /// The device and every layer that leaves the chain: the job's while it runs.
    pub streamed: Vec<Arc<Node>>,
    /// The copy-on-read filter's node name (QMP `filter-node-name`, or a generated one).
    pub filter_name: String,
    /// The name the device's header gets for base (QMP `backing-file`); `None`: base's own
    /// filename.
    pub backing_file: Option<String>,
}

/// QEMU's stream_start: make a read-only device writable, claim the streamed layers, put a
/// copy-on-read filter above the device, and create the job (not started). Any failure
/// takes all of it back. Runs on an I/O thread.
pub async fn create_stream(
    start: StreamStart,
    manager: &JobManager,
    options: JobOptions,
) -> Result<Arc<Job>, QmpError> {
    let StreamStart {
        graph,
        device,
        base,
        streamed,
        filter_name,
        backing_file,
    } = start;
    let id = options.id.clone();
    create_job(
        &graph.clone(),
        manager,
        options,
        async |change: &mut GraphChange| {
            let reopened = device.read_only();
            change.set_writable(&device, true).await?;
            let mut job_edges = Vec::new();
            for node in &streamed {
                job_edges.push(job_edge(node, &id, "stream")?);
            }
            let write_edge = Node::attach(
                &device,
                "stream target",
                Parent::Job {
                    id: id.clone(),
                    job_type: "stream",
                },
                Perms::WRITE | Perms::WRITE_UNCHANGED,
                Perms::ALL & !Perms::RESIZE,
            )?;
            let file_edge = Node::attach(
                &device,
                "file",
                Parent::Node(filter_name.clone()),
                Perms::CONSISTENT_READ,
                Perms::ALL & !Perms::RESIZE,
            )?;
            let cor = CopyOnRead::default();
            let ranges = cor.ranges().clone();
            let filter = Node::new(
                filter_name,
                true,
                Box::new(cor),
                CommonOptions::default(),
                json!({"driver": "copy-on-read", "file": device.name()}),
            );
            filter.add_child(file_edge);
            change.insert_filter(&device, &filter).await;
            Ok(StreamJob::new(StreamSetup {
                graph,
                device,
                base,
                filter,
                ranges,
                backing_file,
                write_edge,
                job_edges,
                reopened,
            }))
        },
    )
    .await
}

impl StreamJob {
    pub fn new(setup: StreamSetup) -> StreamJob {
        StreamJob {
            graph: setup.graph,
            device: setup.device,
            base: setup.base,
            filter: setup.filter,
            ranges: setup.ranges,
            backing_file: setup.backing_file,
            write_edge: Mutex::new(Some(setup.write_edge)),
            job_edges: Mutex::new(setup.job_edges),
            reopened: setup.reopened,
            incomplete: AtomicBool::new(false),
        }
    }

    fn write_edge(&self) -> io::Result<Arc<Child>> {
        self.write_edge
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))
    }

    /// Copy what lies above the base into the device for one step. Errors say whether
    /// they came from reading (true) or writing.
    async fn copy_step(&self, offset: u64, len: u64) -> Result<(), (io::Error, bool)> {
        let ranges = self.ranges.clone();
        let _held = ranges.lock(offset, offset + len).await;
        let target = self.write_edge().map_err(|e| (e, false))?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let own = self
                .device
                .block_status(pos, end - pos)
                .await
                .map_err(|e| (e, true))?;
            let mut n = own.len.clamp(1, end - pos);
            if own.kind == ExtentKind::Unallocated {
                if let Some(backing) = self.device.backing() {
                    let below = backing
                        .block_status_above(self.base.as_ref(), pos, n)
                        .await
                        .map_err(|e| (e, true))?;
                    n = below.len.clamp(1, n);
                    if below.allocated {
                        copy_into(&self.device, &target, pos, n, below.zero).await?;
                    }
                }
            }
            pos += n;
        }
        Ok(())
    }
}

/// Walk `len` bytes in steps, pausing, honouring cancel and speed, and applying the error
/// policy: under `ignore` a failed step is skipped, marked in `incomplete`, and the job
/// fails at the end with the first error. Up to [`STEPS_IN_FLIGHT`] steps run at once, so
/// that one step's reads overlap another's writes; they run on while the loop waits for a
/// pause to end, the speed limit or the error policy (a step may hold a range others
/// wait for).
pub(crate) async fn copy_in_steps<F, Fut>(
    ctx: &JobContext,
    len: u64,
    incomplete: &AtomicBool,
    step: F,
) -> Result<(), JobFailure>
where
    F: Fn(u64, u64) -> Fut,
    Fut: std::future::Future<Output = Result<(), (io::Error, bool)>>,
{
    ctx.set_len(len);
    let mut next = 0u64;
    let mut retries: VecDeque<(u64, u64)> = VecDeque::new();
    let mut in_flight = Workers::new();
    let mut first_error: Option<io::Error> = None;
    // Set when the job is to end: the steps in flight are waited for, none started.
    let mut failure: Option<JobFailure> = None;
    loop {
        while failure.is_none()
            && in_flight.running() < STEPS_IN_FLIGHT
            && (next < len || !retries.is_empty())
        {
            in_flight.alongside(ctx.pause_point()).await;
            if ctx.is_cancelled() {
                failure = Some(JobFailure::cancelled());
                break;
            }
            let (offset, n) = retries.pop_front().unwrap_or_else(|| {
                let n = STEP.min(len - next);
                next += n;
                (next - n, n)
            });
            in_flight.alongside(ctx.rate_limit(n)).await;
            let copy = step(offset, n);
            let started = ctx.error_stops();
            in_flight.push(async move { (offset, n, started, copy.await) });
        }
        let Some((offset, n, started, result)) = in_flight.next().await else {
            break;
        };
        match result {
            Ok(()) => ctx.add_offset(n),
            // The job ends anyway: a later step's error changes nothing.
            Err(_) if failure.is_some() => {}
            Err((e, is_read)) => match in_flight
                .alongside(ctx.handle_error_since(&e, is_read, started))
                .await
            {
                ErrorAction::Report => failure = Some(e.into()),
                ErrorAction::Retry => retries.push_back((offset, n)),
                ErrorAction::Ignore => {
                    incomplete.store(true, Ordering::Release);
                    first_error.get_or_insert(e);
                    ctx.add_offset(n);
                }
            },
        }
    }
    if let Some(failure) = failure {
        return Err(failure);
    }
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Read `len` bytes at `offset` through `from` (its whole chain) and write them through
/// `to`; a zero range becomes an explicit zero write, never a hole, since a hole would let
/// the new backing show through.
pub(crate) async fn copy_into(
    from: &Node,
    to: &Child,
    offset: u64,
    len: u64,
    zero: bool,
) -> Result<(), (io::Error, bool)> {
    if zero {
        return to
            .write_zeroes(offset, len, WriteFlags::default())
            .await
            .map_err(|e| (e, false));
    }
    let buf = IoBuf::with_capacity(len as usize, STEP as usize).map_err(|e| (e, true))?;
    let buf = from.read_buf(offset, buf).await.map_err(|e| (e, true))?;
    to.write_buf(offset, buf, WriteFlags::default())
        .await
        .map(drop)
        .map_err(|e| (e, false))
}

/// Point `node` at `backing` (or nothing) in its qcow2 header: `name` or the backing
/// node's own filename, with its format.
pub(crate) async fn rewrite_backing_header(
    node: &Node,
    backing: Option<&Arc<Node>>,
    name: Option<&str>,
) -> io::Result<()> {
    // A format without a backing file has no name to record.
    if !node.driver().supports_backing() {
        return Ok(());
    }
    let (file, format) = match backing {
        Some(b) => (
            Some(
                name.map(str::to_string)
                    .unwrap_or_else(|| b.driver().info(b).filename),
            ),
            Some(b.driver().format_name()),
        ),
        None => (None, None),
    };
    node.driver()
        .change_backing_file(node, file.as_deref(), format)
        .await
}

/// Replace `node`'s backing edge by one to `backing` (or none), in the graph and in its
/// driver.
pub(crate) async fn relink_backing(node: &Arc<Node>, backing: Option<&Arc<Node>>) {
    if let Err(e) = node.set_backing(backing).await {
        tracing::error!(node = node.name(), "cannot switch the backing layer: {e}");
    }
}

#[async_trait(?Send)]
impl JobDriver for StreamJob {
    fn job_type(&self) -> JobType {
        JobType::Stream
    }

    async fn run(&self, ctx: &JobContext) -> Result<(), JobFailure> {
        copy_in_steps(ctx, self.device.size(), &self.incomplete, |offset, n| {
            self.copy_step(offset, n)
        })
        .await
    }

    /// The header first: if it cannot be written, the graph stays as it was.
    async fn prepare(&self) -> Result<(), JobFailure> {
        if self.incomplete.load(Ordering::Acquire) {
            return Err(JobFailure::from_errno(libc::EIO));
        }
        self.device.flush().await?;
        rewrite_backing_header(
            &self.device,
            self.base.as_ref(),
            self.backing_file.as_deref(),
        )
        .await?;
        Ok(())
    }

    async fn commit(&self) {
        relink_backing(&self.device, self.base.as_ref()).await;
    }

    async fn clean(&self) {
        self.graph.remove_filter(&self.filter, &self.device).await;
        self.write_edge.lock().unwrap().take();
        self.job_edges.lock().unwrap().clear();
        if self.reopened {
            if let Err(e) = self.device.set_writable(false).await {
                tracing::warn!(node = self.device.name(), "stays writable: {e}");
            }
        }
    }
}
