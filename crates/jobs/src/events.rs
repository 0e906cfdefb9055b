//! Where job events go: the daemon adapts its QMP event sink to [`JobEventSink`].

use serde_json::Value;

/// Receives every job event (JOB_STATUS_CHANGE, BLOCK_JOB_*), in the order they happen for
/// each job. Called with the job's state lock held, so it must not call back into the job
/// framework; queueing the event for the monitor is what it is for.
pub trait JobEventSink: Send + Sync {
    /// One event: its QMP name (`BLOCK_JOB_READY`) and its `data` object.
    fn emit(&self, name: &str, data: Value);
}
