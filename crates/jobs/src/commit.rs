//! The commit job for an intermediate top (block-commit whose top is not the active layer):
//! copies what the chain from top down to above base holds into base, then makes base the
//! backing of top's overlay (graph and header), so top and the layers between leave the
//! chain. Nothing writes into those layers meanwhile (they are read-only backing nodes),
//! so no filter is needed. Active commit runs as a mirror into the base (mirror.rs).

use crate::setup::{create_job, job_edge};
use crate::stream::{copy_in_steps, copy_into, relink_backing, rewrite_backing_header};
use crate::{Job, JobManager, JobOptions};
use crate::{JobContext, JobDriver, JobFailure, JobType};
use async_trait::async_trait;
use block::GraphChange;
use block::{Child, Graph, Node, Parent, Perms};
use qapi::error::QmpError;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub struct CommitJob {
    top: Arc<Node>,
    base: Arc<Node>,
    /// The node whose backing is `top`.
    overlay: Arc<Node>,
    backing_file: Option<String>,
    write_edge: Mutex<Option<Arc<Child>>>,
    job_edges: Mutex<Vec<Arc<Child>>>,
    /// Base was made writable for the job and goes back to read-only after it.
    base_reopened: bool,
    incomplete: AtomicBool,
}

pub struct CommitSetup {
    pub top: Arc<Node>,
    pub base: Arc<Node>,
    pub overlay: Arc<Node>,
    pub backing_file: Option<String>,
    pub write_edge: Arc<Child>,
    pub job_edges: Vec<Arc<Child>>,
    pub base_reopened: bool,
}

/// What block-commit asked for (a top that is not the active layer), checked and looked up
/// by the caller.
pub struct CommitStart {
    /// The graph the job's changes go through.
    pub graph: Arc<Graph>,
    /// The top layer committed (QMP `top-node` or `top`).
    pub top: Arc<Node>,
    /// The layer committed into (QMP `base-node` or `base`); made writable for the job if
    /// it is read-only.
    pub base: Arc<Node>,
    /// The node whose backing is `top`.
    pub overlay: Arc<Node>,
    /// The overlay, top and every layer down to base: the job's while it runs.
    pub committed: Vec<Arc<Node>>,
    /// The name the overlay's header gets for base (QMP `backing-file`); `None`: base's
    /// own filename.
    pub backing_file: Option<String>,
}

/// QEMU's commit_start: make a read-only base writable, claim the layers, and create the
/// job (not started). Any failure takes all of it back. Runs on an I/O thread.
pub async fn create_commit(
    start: CommitStart,
    manager: &JobManager,
    options: JobOptions,
) -> Result<Arc<Job>, QmpError> {
    let CommitStart {
        graph,
        top,
        base,
        overlay,
        committed,
        backing_file,
    } = start;
    let id = options.id.clone();
    create_job(
        &graph,
        manager,
        options,
        async |change: &mut GraphChange| {
            let base_reopened = base.read_only();
            change.set_writable(&base, true).await?;
            let mut job_edges = vec![Node::attach_job_backend(&top)?];
            for node in &committed {
                job_edges.push(job_edge(node, &id, "commit")?);
            }
            // QEMU writes the base through a block backend of the job: blockdev-del calls the
            // base "in use" rather than busy.
            let write_edge = Node::attach(
                &base,
                "base",
                Parent::User {
                    kind: "block-backend",
                    name: String::new(),
                },
                Perms::WRITE | Perms::RESIZE,
                Perms::ALL & !(Perms::WRITE | Perms::RESIZE),
            )?;
            Ok(CommitJob::new(CommitSetup {
                top,
                base,
                overlay,
                backing_file,
                write_edge,
                job_edges,
                base_reopened,
            }))
        },
    )
    .await
}

impl CommitJob {
    pub fn new(setup: CommitSetup) -> CommitJob {
        CommitJob {
            top: setup.top,
            base: setup.base,
            overlay: setup.overlay,
            backing_file: setup.backing_file,
            write_edge: Mutex::new(Some(setup.write_edge)),
            job_edges: Mutex::new(setup.job_edges),
            base_reopened: setup.base_reopened,
            incomplete: AtomicBool::new(false),
        }
    }

    async fn copy_step(&self, offset: u64, len: u64) -> Result<(), (io::Error, bool)> {
        let Some(target) = self.write_edge.lock().unwrap().clone() else {
            return Err((io::Error::from_raw_os_error(libc::ENOMEDIUM), false));
        };
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let extent = self
                .top
                .block_status_above(Some(&self.base), pos, end - pos)
                .await
                .map_err(|e| (e, true))?;
            let n = extent.len.clamp(1, end - pos);
            if extent.allocated {
                copy_into(&self.top, &target, pos, n, extent.zero).await?;
            }
            pos += n;
        }
        Ok(())
    }
}

#[async_trait(?Send)]
impl JobDriver for CommitJob {
    fn job_type(&self) -> JobType {
        JobType::Commit
    }

    async fn run(&self, ctx: &JobContext) -> Result<(), JobFailure> {
        let len = self.top.size();
        if self.base.size() < len {
            self.base.truncate(len).await?;
        }
        copy_in_steps(ctx, len, &self.incomplete, |offset, n| {
            self.copy_step(offset, n)
        })
        .await?;
        self.base.flush().await?;
        Ok(())
    }

    /// The overlay's header names the base before the graph changes; a read-only overlay
    /// is writable just for that.
    async fn prepare(&self) -> Result<(), JobFailure> {
        if self.incomplete.load(Ordering::Acquire) {
            return Err(JobFailure::from_errno(libc::EIO));
        }
        let was_read_only = self.overlay.read_only();
        if was_read_only {
            self.overlay
                .set_writable(true)
                .await
                .map_err(JobFailure::new)?;
        }
        let result = rewrite_backing_header(
            &self.overlay,
            Some(&self.base),
            self.backing_file.as_deref(),
        )
        .await;
        if was_read_only {
            if let Err(e) = self.overlay.set_writable(false).await {
                tracing::warn!(node = self.overlay.name(), "stays writable: {e}");
            }
        }
        result?;
        Ok(())
    }

    async fn commit(&self) {
        relink_backing(&self.overlay, Some(&self.base)).await;
    }

    async fn clean(&self) {
        self.write_edge.lock().unwrap().take();
        self.job_edges.lock().unwrap().clear();
        if self.base_reopened {
            if let Err(e) = self.base.set_writable(false).await {
                tracing::warn!(node = self.base.name(), "stays writable: {e}");
            }
        }
    }
}
