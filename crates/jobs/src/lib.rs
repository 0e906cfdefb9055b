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

#![warn(missing_docs)]

mod backup;
mod commit;
mod create;
mod driver;
mod events;
mod job;
mod manager;
mod mirror;
mod policy;
mod ratelimit;
mod setup;
mod status;
mod stream;
mod txn;
mod workers;

pub use backup::{create_backup, BackupPerf, BackupSetup, BitmapMode, SyncMode};
pub use commit::{create_commit, CommitStart};
pub use create::{OneStepJob, StepWork};
pub use driver::{JobDriver, JobFailure, JobType, RowProgress};
pub use events::JobEventSink;
pub use job::{Job, JobContext, JobOptions};
pub use manager::{is_valid_id, JobManager};
pub use mirror::{create_mirror, MirrorConfig, MirrorStart, MirrorSync};
pub use policy::{ErrorAction, IoStatus, OnError};
pub use status::{JobStatus, JobVerb};
pub use stream::{create_stream, StreamStart};
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
