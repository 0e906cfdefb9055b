//! Job transactions and finalisation: jobs of one transaction wait for each other, are
//! finalised together, and fail together (one failure force-cancels the others).
//!
//! QEMU serialises this in its main loop; here the jobs of a transaction run on different
//! threads, so every step that looks at the transaction as a whole runs under the
//! transaction's async lock, taken by whoever drives the step: a job's thread when its work
//! returns, or the monitor thread for cancel and finalize.

use crate::job::Job;
use std::sync::{Arc, Mutex};

/// QEMU's `JobTxn`: the jobs of one grouped `transaction`. A job created without one gets
/// a transaction of its own.
#[derive(Default)]
pub struct JobTxn {
    /// Newest first, like QEMU: that is the order jobs are finalised in.
    jobs: Mutex<Vec<Arc<Job>>>,
    step: tokio::sync::Mutex<()>,
}

impl JobTxn {
    /// An empty transaction, to give to each job of the group through
    /// [`JobOptions::txn`](crate::JobOptions::txn).
    pub fn new() -> Arc<JobTxn> {
        Arc::new(JobTxn::default())
    }

    pub(crate) async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.step.lock().await
    }

    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn add(&self, job: Arc<Job>) {
        self.list().insert(0, job);
    }

    pub(crate) fn remove(&self, job: &Job) {
        self.list().retain(|j| !std::ptr::eq(Arc::as_ptr(j), job));
    }

    pub(crate) fn jobs(&self) -> Vec<Arc<Job>> {
        self.list().clone()
    }

    /// The number of jobs not yet finalised.
    pub fn len(&self) -> usize {
        self.list().len()
    }

    /// Every job is finalised (or none was added).
    pub fn is_empty(&self) -> bool {
        self.list().is_empty()
    }
}

/// The job's work returned (on the job's thread).
pub(crate) async fn job_exit(job: &Arc<Job>) {
    let txn = Arc::clone(job.txn());
    let _step = txn.lock().await;
    // A failing transaction may already have finalised this job.
    if job.status().is_completed() {
        return;
    }
    completed(job, &txn).await;
}

/// QEMU's `job_completed`, with the transaction locked.
async fn completed(job: &Arc<Job>, txn: &JobTxn) {
    if job.update_rc() {
        abort(job, txn).await;
        return;
    }
    job.to_waiting();
    let jobs = txn.jobs();
    if jobs.iter().any(|j| !j.status().is_completed()) {
        return;
    }
    for j in &jobs {
        j.to_pending();
    }
    if jobs.iter().all(|j| j.auto_finalize()) {
        do_finalize(txn).await;
    }
}

/// Prepare every job of the transaction, then commit them all, or abort them all when
/// one prepare fails. With the transaction locked.
pub(crate) async fn do_finalize(txn: &JobTxn) {
    let jobs = txn.jobs();
    for job in &jobs {
        if !job.prepare().await {
            abort(job, txn).await;
            return;
        }
    }
    for job in &jobs {
        job.finalize_single().await;
    }
}

/// `cause` failed or was force-cancelled: force-cancel the others, wait for their work to
/// return, then finalise everyone (abort). With the transaction locked.
async fn abort(cause: &Arc<Job>, txn: &JobTxn) {
    cause.update_rc();
    let jobs = txn.jobs();
    let others = || jobs.iter().filter(|j| !Arc::ptr_eq(j, cause));
    for job in others() {
        job.cancel_async(true);
    }
    for job in others() {
        job.wait_phase(|p| p.deferred).await;
        job.update_rc();
    }
    for job in &jobs {
        job.finalize_single().await;
    }
}

/// QEMU's `job_cancel`, with the transaction locked and the verb already checked.
pub(crate) async fn cancel_locked(job: &Arc<Job>, force: bool) {
    let txn = Arc::clone(job.txn());
    job.cancel_async(force);
    let (started, deferred) = {
        let st = job.lock();
        (st.started, st.deferred)
    };
    if !started {
        completed(job, &txn).await;
    } else if deferred && job.is_cancelled() {
        abort(job, &txn).await;
    }
}
