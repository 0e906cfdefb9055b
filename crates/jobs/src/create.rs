//! blockdev-create's job (type `create`): one step of work the daemon hands over, run on
//! the job's I/O thread, with QEMU's progress of 0 of 1 then 1 of 1 whatever the outcome.

use crate::driver::{JobDriver, JobFailure, JobType};
use crate::job::JobContext;
use async_trait::async_trait;
use futures::future::LocalBoxFuture;
use std::sync::Mutex;

/// The creation itself: built on the monitor thread, polled on the job's thread.
pub type CreateWork = Box<dyn FnOnce() -> LocalBoxFuture<'static, Result<(), String>> + Send>;

pub struct CreateJob {
    work: Mutex<Option<CreateWork>>,
}

impl CreateJob {
    pub fn new(work: CreateWork) -> CreateJob {
        CreateJob {
            work: Mutex::new(Some(work)),
        }
    }
}

#[async_trait(?Send)]
impl JobDriver for CreateJob {
    fn job_type(&self) -> JobType {
        JobType::Create
    }

    async fn run(&self, ctx: &JobContext) -> Result<(), JobFailure> {
        ctx.set_len(1);
        let work = self.work.lock().unwrap().take();
        let result = match work {
            Some(work) => work().await,
            None => Err("The image was already created".to_string()),
        };
        ctx.add_offset(1);
        result.map_err(JobFailure::new)
    }
}
