//! blockd's block-job framework: QEMU's job state machine and verbs, transactions,
//! finalisation, pause points, cancellation, the `speed` limit and the error policies, with
//! the QMP-level operations the daemon's command handlers call. Job drivers (backup, mirror,
//! stream, commit) implement [`JobDriver`] and do only their own work.
//!
//! The daemon creates a job with [`JobManager::create`] (status `created`), finishes its own
//! setup (or calls [`Job::early_fail`]), then starts it on an I/O thread with
//! `job.start_with(|work| io_threads.spawn(work))`. From then on the job's thread runs the
//! driver's `run`, and finalisation (prepare, commit/abort, clean, the final events)
//! happens on whichever thread completes the transaction's step: the job's thread, or the
//! monitor thread for job-finalize and for cancelling a job whose work is over. Events
//! leave through the [`JobEventSink`] given to [`JobManager::new`].

pub mod backup;
pub mod commit;
pub mod create;
pub mod driver;
pub mod events;
pub mod job;
pub mod manager;
pub mod mirror;
pub mod policy;
pub mod ratelimit;
pub mod setup;
pub mod status;
pub mod stream;
pub mod txn;

pub use driver::{JobDriver, JobFailure, JobType};
pub use events::JobEventSink;
pub use job::{Job, JobContext, JobOptions};
pub use manager::JobManager;
pub use policy::{ErrorAction, IoStatus, OnError};
pub use status::{JobStatus, JobVerb};
pub use txn::JobTxn;

#[cfg(test)]
mod tests {
    /// The monitor thread and the I/O threads share these through `Arc`.
    #[test]
    fn shared_types_are_send_and_sync() {
        fn shared<T: Send + Sync>() {}
        shared::<crate::JobManager>();
        shared::<crate::Job>();
        shared::<crate::JobTxn>();
        shared::<crate::JobContext>();
    }
}
