//! All jobs of the daemon by id, job creation, and the QMP-level job commands
//! (`block-job-*`, `job-*`, the queries, cancel-all on quit) with QEMU's lookups and texts.

use crate::driver::JobDriver;
use crate::events::JobEventSink;
use crate::job::{Job, JobOptions};
use qapi::error::QmpError;
use serde_json::{Map, Value};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// The daemon's jobs by id. One per daemon, shared through `Arc` by the monitor thread
/// and the jobs, which leave it when they go `null`.
pub struct JobManager {
    events: Arc<dyn JobEventSink>,
    /// Newest first, the order QEMU lists jobs in.
    jobs: Mutex<Vec<Arc<Job>>>,
    this: Weak<JobManager>,
}

/// QEMU's id rules (the node-name rules, without a length limit): a letter, then letters,
/// digits, '-', '.', '_'.
pub fn is_valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

impl JobManager {
    /// A manager whose jobs send their events to `events`.
    pub fn new(events: Arc<dyn JobEventSink>) -> Arc<JobManager> {
        Arc::new_cyclic(|this| JobManager {
            events,
            jobs: Mutex::new(Vec::new()),
            this: this.clone(),
        })
    }

    fn list(&self) -> MutexGuard<'_, Vec<Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Create a job in status `created` (JOB_STATUS_CHANGE created). The caller then either
    /// starts it (`job.start_with(..)`), or calls `job.early_fail()` if its own setup fails,
    /// or `job.cancel_sync()` when rolling back a transaction.
    pub fn create(
        &self,
        driver: Arc<dyn JobDriver>,
        opts: JobOptions,
    ) -> Result<Arc<Job>, QmpError> {
        if !is_valid_id(&opts.id) {
            return Err(QmpError::generic(format!("Invalid job ID '{}'", opts.id)));
        }
        let txn = opts.txn.clone().unwrap_or_default();
        let job = {
            let mut jobs = self.list();
            if jobs.iter().any(|j| j.id() == opts.id) {
                return Err(QmpError::generic(format!(
                    "Job ID '{}' already in use",
                    opts.id
                )));
            }
            let job = Arc::new(Job::new(
                driver,
                Arc::clone(&self.events),
                self.this.clone(),
                Arc::clone(&txn),
                &opts,
            ));
            jobs.insert(0, Arc::clone(&job));
            job
        };
        txn.add(Arc::clone(&job));
        job.emit_created();
        if let Err(e) = job.set_speed(opts.speed) {
            job.early_fail();
            return Err(e);
        }
        Ok(job)
    }

    pub(crate) fn remove(&self, job: &Job) {
        self.list().retain(|j| !std::ptr::eq(Arc::as_ptr(j), job));
    }

    /// Every job not yet `null`, newest first.
    pub fn jobs(&self) -> Vec<Arc<Job>> {
        self.list().clone()
    }

    /// The job with this id, of any type; `None` if there is none. The commands use
    /// `find_block_job` or `find_job`, which give QEMU's error.
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.list().iter().find(|j| j.id() == id).cloned()
    }

    /// The lookup of `block-job-*`: only block jobs, DeviceNotActive otherwise.
    pub fn find_block_job(&self, id: &str) -> Result<Arc<Job>, QmpError> {
        self.get(id)
            .filter(|j| j.job_type().is_block_job())
            .ok_or_else(|| QmpError::device_not_active(format!("Block job '{id}' not found")))
    }

    /// The lookup of `job-*`.
    pub fn find_job(&self, id: &str) -> Result<Arc<Job>, QmpError> {
        self.get(id)
            .ok_or_else(|| QmpError::generic("Job not found"))
    }

    /// query-block-jobs: a `BlockJobInfo` row per block job, newest first.
    pub fn query_block_jobs(&self) -> Vec<Value> {
        self.jobs()
            .iter()
            .filter(|j| j.job_type().is_block_job())
            .map(|j| j.block_job_info())
            .collect()
    }

    /// query-jobs: a `JobInfo` row per job of any type, newest first.
    pub fn query_jobs(&self) -> Vec<Value> {
        self.jobs().iter().map(|j| j.job_info()).collect()
    }

    /// block-job-set-speed: `speed` in bytes per second, 0 = unlimited.
    pub fn block_job_set_speed(&self, device: &str, speed: i64) -> Result<(), QmpError> {
        self.find_block_job(device)?.set_speed(speed)
    }

    /// block-job-cancel. A soft cancel of a user-paused job is refused (QEMU would wait
    /// forever); a force cancel resumes it first.
    pub async fn block_job_cancel(&self, device: &str, force: bool) -> Result<(), QmpError> {
        let job = self.find_block_job(device)?;
        if !force && job.is_user_paused() {
            return Err(QmpError::generic(format!(
                "The block job for device '{device}' is currently paused"
            )));
        }
        job.cancel(force).await
    }

    /// block-job-pause: the job pauses at its next pause point.
    pub fn block_job_pause(&self, device: &str) -> Result<(), QmpError> {
        self.find_block_job(device)?.user_pause()
    }

    /// block-job-resume: lifts the user's pause, or the one the `stop` policy took.
    pub fn block_job_resume(&self, device: &str) -> Result<(), QmpError> {
        self.find_block_job(device)?.user_resume()
    }

    /// block-job-complete: a READY mirror or active commit finishes and pivots.
    pub fn block_job_complete(&self, device: &str) -> Result<(), QmpError> {
        self.find_block_job(device)?.complete()
    }

    /// block-job-finalize: finalises the job's whole transaction, which is `pending`.
    pub async fn block_job_finalize(&self, id: &str) -> Result<(), QmpError> {
        self.find_block_job(id)?.finalize().await
    }

    /// block-job-dismiss: a `concluded` job goes `null` and leaves the manager.
    pub fn block_job_dismiss(&self, id: &str) -> Result<(), QmpError> {
        self.find_block_job(id)?.dismiss()
    }

    /// block-job-change with the command's arguments (`id`, `type`, a mirror's
    /// `copy-mode`), passed to the driver.
    pub fn block_job_change(&self, id: &str, args: &Map<String, Value>) -> Result<(), QmpError> {
        self.find_block_job(id)?.change(args)
    }

    /// job-pause: as block-job-pause, for a job of any type.
    pub fn job_pause(&self, id: &str) -> Result<(), QmpError> {
        self.find_job(id)?.user_pause()
    }

    /// job-resume: as block-job-resume, for a job of any type.
    pub fn job_resume(&self, id: &str) -> Result<(), QmpError> {
        self.find_job(id)?.user_resume()
    }

    /// job-cancel is always a force cancel.
    pub async fn job_cancel(&self, id: &str) -> Result<(), QmpError> {
        self.find_job(id)?.cancel(true).await
    }

    /// job-complete: as block-job-complete, for a job of any type.
    pub fn job_complete(&self, id: &str) -> Result<(), QmpError> {
        self.find_job(id)?.complete()
    }

    /// job-finalize: as block-job-finalize, for a job of any type.
    pub async fn job_finalize(&self, id: &str) -> Result<(), QmpError> {
        self.find_job(id)?.finalize().await
    }

    /// job-dismiss: as block-job-dismiss, for a job of any type.
    pub fn job_dismiss(&self, id: &str) -> Result<(), QmpError> {
        self.find_job(id)?.dismiss()
    }

    /// For quit and SIGTERM: force-cancel every job (a READY mirror too) and wait until
    /// each is concluded or gone.
    pub async fn cancel_all_and_wait(&self) {
        let jobs = self.jobs();
        for job in &jobs {
            job.force_cancel().await;
        }
        for job in &jobs {
            job.wait_concluded().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_valid_id;

    #[test]
    fn id_rules() {
        for good in ["j1", "a", "A-b.c_d", &"a".repeat(40)] {
            assert!(is_valid_id(good), "{good}");
        }
        for bad in ["", "1j", "-a", "_a", "a b", "a#", "é"] {
            assert!(!is_valid_id(bad), "{bad}");
        }
    }
}
