//! blockd's block-job framework: QEMU's job state machine and verbs, transactions,
//! finalisation, pause points, cancellation, the `speed` limit and the error policies, with
//! the QMP-level operations the daemon's command handlers call. Job drivers (backup, mirror,
//! stream, commit) implement [`JobDriver`] and do only their own work.

pub mod driver;
pub mod events;
pub mod job;
pub mod manager;
pub mod policy;
pub mod ratelimit;
pub mod status;
pub mod txn;

pub use driver::{JobDriver, JobFailure, JobType};
pub use events::EventSink;
pub use job::{IoWork, Job, JobContext, JobOptions};
pub use manager::JobManager;
pub use policy::{ErrorAction, IoStatus, OnError};
pub use status::{JobStatus, JobVerb};
pub use txn::JobTxn;
