//! The one-step jobs of blockdev-create (type `create`) and x-blockdev-amend (`amend`):
//! work the daemon hands over, run on the job's I/O thread, with QEMU's progress of 0 of 1
//! then 1 of 1 whatever the outcome.

use crate::driver::{JobDriver, JobFailure, JobType};
use crate::job::JobContext;
use async_trait::async_trait;
use futures::future::LocalBoxFuture;
use std::sync::Mutex;

/// The work itself: built on the monitor thread, polled on the job's thread.
pub type StepWork = Box<dyn FnOnce() -> LocalBoxFuture<'static, Result<(), String>> + Send>;

/// The driver of a `create` or `amend` job: runs its [`StepWork`] once, and fails with
/// the text the work returns.
pub struct OneStepJob {
    job_type: JobType,
    work: Mutex<Option<StepWork>>,
}

impl OneStepJob {
    /// `job_type` is [`JobType::Create`] or [`JobType::Amend`]; `work` runs when the job
    /// starts.
    pub fn new(job_type: JobType, work: StepWork) -> OneStepJob {
        OneStepJob {
            job_type,
            work: Mutex::new(Some(work)),
        }
    }
}

#[async_trait(?Send)]
impl JobDriver for OneStepJob {
    fn job_type(&self) -> JobType {
        self.job_type
    }

    async fn run(&self, ctx: &JobContext) -> Result<(), JobFailure> {
        ctx.set_len(1);
        let work = self.work.lock().unwrap().take();
        let result = match work {
            Some(work) => work().await,
            None => Err("The job's work was already done".to_string()),
        };
        ctx.add_offset(1);
        result.map_err(JobFailure::new)
    }
}
