//! What a kind of job (backup, mirror, stream, commit, create) implements: its work and its
//! part in finalisation. The framework does everything else (states, events, pauses,
//! cancellation, speed, error policies).

use crate::job::JobContext;
use async_trait::async_trait;
use qapi::error::QmpError;
use serde::Serialize;
use serde_json::{Map, Value};
use std::fmt;
use std::io;

/// `JobType` (the kinds blockd runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobType {
    /// `backup`: blockdev-backup, drive-backup, and backups in a `transaction`.
    Backup,
    /// `mirror`: blockdev-mirror, drive-mirror.
    Mirror,
    /// `stream`: block-stream.
    Stream,
    /// `commit`: block-commit, active (a mirror into the base) or not.
    Commit,
    /// `create`: blockdev-create; a job but not a block job.
    Create,
    /// `amend`: x-blockdev-amend; a job but not a block job.
    Amend,
}

impl JobType {
    /// The QMP name, as in the `type` of the queries and the events.
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::Backup => "backup",
            JobType::Mirror => "mirror",
            JobType::Stream => "stream",
            JobType::Commit => "commit",
            JobType::Create => "create",
            JobType::Amend => "amend",
        }
    }

    /// Block jobs are listed by query-block-jobs and reached by `block-job-*`; `create`
    /// (blockdev-create) and `amend` are jobs but not block jobs.
    pub fn is_block_job(self) -> bool {
        !matches!(self, JobType::Create | JobType::Amend)
    }
}

impl fmt::Display for JobType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a job failed: the text shown as `error` in BLOCK_JOB_COMPLETED and the queries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobFailure {
    message: String,
}

impl JobFailure {
    /// A failure with this text, shown as it is.
    pub fn new(message: impl Into<String>) -> JobFailure {
        JobFailure {
            message: message.into(),
        }
    }

    /// The failure of a job that stopped because it was cancelled (QEMU: ECANCELED).
    pub fn cancelled() -> JobFailure {
        JobFailure::from_errno(libc::ECANCELED)
    }

    /// The failure QEMU shows for a job that returned `-errno`: the strerror text (EIO:
    /// "Input/output error").
    pub fn from_errno(errno: i32) -> JobFailure {
        JobFailure::from(&io::Error::from_raw_os_error(errno))
    }

    /// The text QMP shows as `error`.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for JobFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for JobFailure {}

/// An OS error becomes its strerror text ("Input/output error"), as QEMU reports it; Rust
/// appends " (os error N)", which QMP clients must not see.
impl From<&io::Error> for JobFailure {
    fn from(err: &io::Error) -> JobFailure {
        let text = err.to_string();
        let message = match err.raw_os_error() {
            Some(code) => text
                .strip_suffix(&format!(" (os error {code})"))
                .map(str::to_string)
                .unwrap_or(text),
            None => text,
        };
        JobFailure { message }
    }
}

impl From<io::Error> for JobFailure {
    fn from(err: io::Error) -> JobFailure {
        JobFailure::from(&err)
    }
}

/// One kind of job. The driver object is shared between the job's I/O thread (where `run`
/// and `prepare` run) and the monitor thread (verbs, queries), hence `Send + Sync`; its
/// futures stay on the thread that polls them.
///
/// Finalisation calls, in order: `prepare` (only if `run` succeeded), then `commit` or
/// `abort`, then `clean`. `prepare` may still fail the whole transaction; `commit`,
/// `abort` and `clean` cannot fail.
#[async_trait(?Send)]
pub trait JobDriver: Send + Sync + 'static {
    /// The kind, shown as `type` in the queries and the events; `block-job-*` commands
    /// reach only block jobs ([`JobType::is_block_job`]).
    fn job_type(&self) -> JobType;

    /// The job's work. Call `ctx.pause_point()` between steps, check `ctx.is_cancelled()`,
    /// account progress and speed through `ctx`, and route I/O errors through
    /// `ctx.handle_error`. Return `Err(JobFailure::cancelled())` or `Ok` when cancelled.
    async fn run(&self, ctx: &JobContext) -> Result<(), JobFailure>;

    /// Mirror and active commit: block-job-complete is allowed once READY.
    fn can_complete(&self) -> bool {
        false
    }

    /// block-job-complete, after the framework checked the verb and that the job may
    /// complete; on success the framework records the request (`ctx.should_complete()`)
    /// and wakes the job.
    fn complete(&self) -> Result<(), QmpError> {
        Ok(())
    }

    /// A soft cancel (force=false) of a READY job means "finish without pivot" for drivers
    /// that say so (mirror, active commit); every other cancel is a force cancel.
    fn supports_soft_cancel(&self) -> bool {
        false
    }

    /// block-job-change with the command's arguments (the framework checked the verb).
    fn change(&self, _args: &Map<String, Value>) -> Result<(), QmpError> {
        Err(QmpError::generic("Job type does not support change"))
    }

    /// QEMU's `.prepare`: the work of every job of the transaction succeeded; do what may
    /// still fail before anything is committed (e.g. rewrite an image header). An `Err`
    /// fails the job and aborts the whole transaction.
    async fn prepare(&self) -> Result<(), JobFailure> {
        Ok(())
    }

    /// Graph changes of a successful job (mirror pivot, stream and commit's new backing).
    async fn commit(&self) {}

    /// QEMU's `.abort`, instead of `commit`: the job failed or was force-cancelled, or
    /// another job of its transaction did (also for a job that never started).
    async fn abort(&self) {}

    /// Undo what the job put in place (filters, its claims on nodes), whatever the outcome.
    async fn clean(&self) {}

    /// Members added after the common ones of a query-block-jobs row (mirror:
    /// `actively-synced`, and blockd's rates and time to READY), given the job's progress
    /// as the row shows it.
    fn extra_info(&self, _progress: &RowProgress) -> Map<String, Value> {
        Map::new()
    }
}

/// A job's progress, as a query-block-jobs row shows it.
#[derive(Debug, Clone, Copy)]
pub struct RowProgress {
    /// Bytes done.
    pub offset: u64,
    /// Bytes known.
    pub len: u64,
    /// In sync (mirror, active commit).
    pub ready: bool,
    /// Paused, by the user or an error policy.
    pub paused: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_text_is_strerror() {
        let f = JobFailure::from(io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(f.message(), "Input/output error");
        assert_eq!(JobFailure::cancelled().message(), "Operation canceled");
        let custom = io::Error::other("Source and target image have different sizes");
        assert_eq!(
            JobFailure::from(&custom).message(),
            "Source and target image have different sizes"
        );
    }
}
