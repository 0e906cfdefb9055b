//! QEMU's job state machine: the statuses, which transitions are legal and which verbs
//! each status accepts.

use serde::Serialize;
use std::fmt;

/// A job's status as QMP shows it (`JobStatus`); `undefined` is never visible and so is
/// not represented.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// `created`: made by `JobManager::create`, not started yet.
    Created,
    /// `running`: the driver's work runs.
    Running,
    /// `paused`: the work waits at a pause point (a user pause or the `stop` policy).
    Paused,
    /// `ready`: a mirror or active commit has caught up and accepts complete; it keeps
    /// copying.
    Ready,
    /// `standby`: a `ready` job that is paused; resuming brings it back to `ready`.
    Standby,
    /// `waiting`: the work is over; the job waits for the rest of its transaction.
    Waiting,
    /// `pending`: the whole transaction's work is over; finalisation is next, or
    /// job-finalize when auto-finalize is off.
    Pending,
    /// `aborting`: the job failed or was cancelled and is being finalised with an error.
    Aborting,
    /// `concluded`: finalised; kept for query and job-dismiss when auto-dismiss is off.
    Concluded,
    /// `null`: gone from the manager (dismissed, or failed before it started); seen only in
    /// JOB_STATUS_CHANGE.
    Null,
}

impl JobStatus {
    /// Every status, in QEMU's order (for tables and tests).
    pub const ALL: [JobStatus; 10] = [
        JobStatus::Created,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Ready,
        JobStatus::Standby,
        JobStatus::Waiting,
        JobStatus::Pending,
        JobStatus::Aborting,
        JobStatus::Concluded,
        JobStatus::Null,
    ];

    /// The QMP name, as in JOB_STATUS_CHANGE and the queries' `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// QEMU's transition table. Staying in `aborting` is allowed (a failing transaction
    /// may abort a job that already aborts); every other self-transition is not.
    pub fn can_transition_to(self, to: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, to),
            (Created, Running | Aborting | Null)
                | (Running, Paused | Ready | Waiting | Aborting)
                | (Paused, Running)
                | (Ready, Standby | Waiting | Aborting)
                | (Standby, Ready)
                | (Waiting, Pending | Aborting)
                | (Pending, Aborting | Concluded)
                | (Aborting, Aborting | Concluded)
                | (Concluded, Null)
        )
    }

    /// The job's work has returned (or will never run): QEMU's `job_is_completed`.
    pub fn is_completed(self) -> bool {
        matches!(
            self,
            JobStatus::Waiting
                | JobStatus::Pending
                | JobStatus::Aborting
                | JobStatus::Concluded
                | JobStatus::Null
        )
    }

    /// Whether a job in this status accepts `verb`: QEMU's `JobVerbTable`. A refused verb
    /// fails with the text of `verb_refusal`.
    pub fn accepts(self, verb: JobVerb) -> bool {
        use JobStatus::*;
        match verb {
            JobVerb::Cancel => matches!(
                self,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed | JobVerb::Change => {
                matches!(self, Created | Running | Paused | Ready | Standby)
            }
            JobVerb::Complete => matches!(self, Ready | Standby),
            JobVerb::Finalize => self == Pending,
            JobVerb::Dismiss => self == Concluded,
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The commands a user may apply to a job (`JobVerb`); [`JobStatus::accepts`] says in
/// which statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobVerb {
    /// `cancel`: job-cancel, block-job-cancel.
    Cancel,
    /// `pause`: job-pause, block-job-pause.
    Pause,
    /// `resume`: job-resume, block-job-resume.
    Resume,
    /// `set-speed`: block-job-set-speed.
    SetSpeed,
    /// `complete`: job-complete, block-job-complete.
    Complete,
    /// `finalize`: job-finalize, block-job-finalize.
    Finalize,
    /// `dismiss`: job-dismiss, block-job-dismiss.
    Dismiss,
    /// `change`: block-job-change.
    Change,
}

impl JobVerb {
    /// Every verb, in QEMU's order (for tables and tests).
    pub const ALL: [JobVerb; 8] = [
        JobVerb::Cancel,
        JobVerb::Pause,
        JobVerb::Resume,
        JobVerb::SetSpeed,
        JobVerb::Complete,
        JobVerb::Finalize,
        JobVerb::Dismiss,
        JobVerb::Change,
    ];

    /// The QMP name, as in the refusal text.
    pub fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
            JobVerb::Change => "change",
        }
    }
}

impl fmt::Display for JobVerb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The refusal text QEMU gives for a verb the status does not accept.
pub fn verb_refusal(id: &str, status: JobStatus, verb: JobVerb) -> String {
    format!("Job '{id}' in state '{status}' cannot accept command verb '{verb}'")
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobStatus::*;

    #[test]
    fn transition_table_matches_qemu() {
        let allowed: &[(JobStatus, &[JobStatus])] = &[
            (Created, &[Running, Aborting, Null]),
            (Running, &[Paused, Ready, Waiting, Aborting]),
            (Paused, &[Running]),
            (Ready, &[Standby, Waiting, Aborting]),
            (Standby, &[Ready]),
            (Waiting, &[Pending, Aborting]),
            (Pending, &[Aborting, Concluded]),
            (Aborting, &[Aborting, Concluded]),
            (Concluded, &[Null]),
            (Null, &[]),
        ];
        for (from, tos) in allowed {
            for to in JobStatus::ALL {
                assert_eq!(
                    from.can_transition_to(to),
                    tos.contains(&to),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn verb_table_matches_qemu() {
        let table: &[(JobVerb, &[JobStatus])] = &[
            (
                JobVerb::Cancel,
                &[Created, Running, Paused, Ready, Standby, Waiting, Pending],
            ),
            (JobVerb::Pause, &[Created, Running, Paused, Ready, Standby]),
            (JobVerb::Resume, &[Created, Running, Paused, Ready, Standby]),
            (
                JobVerb::SetSpeed,
                &[Created, Running, Paused, Ready, Standby],
            ),
            (JobVerb::Change, &[Created, Running, Paused, Ready, Standby]),
            (JobVerb::Complete, &[Ready, Standby]),
            (JobVerb::Finalize, &[Pending]),
            (JobVerb::Dismiss, &[Concluded]),
        ];
        assert_eq!(table.len(), JobVerb::ALL.len());
        for (verb, states) in table {
            for status in JobStatus::ALL {
                assert_eq!(
                    status.accepts(*verb),
                    states.contains(&status),
                    "{verb} in {status}"
                );
            }
        }
    }

    #[test]
    fn refusal_text() {
        assert_eq!(
            verb_refusal("j1", Running, JobVerb::Complete),
            "Job 'j1' in state 'running' cannot accept command verb 'complete'"
        );
        assert_eq!(
            verb_refusal("j1", Pending, JobVerb::SetSpeed),
            "Job 'j1' in state 'pending' cannot accept command verb 'set-speed'"
        );
    }

    #[test]
    fn completed_statuses() {
        let completed: Vec<_> = JobStatus::ALL
            .into_iter()
            .filter(|s| s.is_completed())
            .collect();
        assert_eq!(completed, [Waiting, Pending, Aborting, Concluded, Null]);
    }
}
