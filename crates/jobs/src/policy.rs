//! Error policies of block jobs (`on-source-error`, `on-target-error`), the io-status they
//! leave behind, and the back-off that keeps a persistent error under `ignore` from
//! flooding the monitor (qemu-storage-daemon emits hundreds of BLOCK_JOB_ERROR a second).

use serde::{Deserialize, Serialize};
use std::io;
use std::time::Duration;
use tokio::time::Instant;

/// What a job does on an I/O error (`BlockdevOnError`, the QMP `on-source-error`,
/// `on-target-error` and `on-error` arguments).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// `report`: fail the job (the default).
    #[default]
    Report,
    /// `ignore`: go on after a back-off; the driver retries or skips the range.
    Ignore,
    /// `enospc`: `stop` on ENOSPC, `report` on any other error.
    Enospc,
    /// `stop`: pause the job until the user resumes it, then retry.
    Stop,
    /// `auto`: for jobs the same as `enospc`, as in QEMU.
    Auto,
}

/// A job's `io-status` in query-block-jobs (`BlockDeviceIoStatus`): set when the `stop`
/// or `enospc` policy pauses the job, `ok` again when it resumes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoStatus {
    /// `ok`: no error stopped the job.
    #[default]
    Ok,
    /// `failed`: an error other than ENOSPC stopped the job.
    Failed,
    /// `nospace`: ENOSPC stopped the job.
    Nospace,
}

impl IoStatus {
    /// The QMP name (`ok`, `failed`, `nospace`).
    pub fn as_str(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::Nospace => "nospace",
        }
    }
}

/// The action a policy picks for one error (`BlockErrorAction`), as named in BLOCK_JOB_ERROR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyAction {
    Report,
    Ignore,
    Stop,
}

impl PolicyAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyAction::Report => "report",
            PolicyAction::Ignore => "ignore",
            PolicyAction::Stop => "stop",
        }
    }
}

/// What a driver does after [`crate::JobContext::handle_error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorAction {
    /// Fail the job with this error.
    Report,
    /// The policy is `ignore`: the driver retries or skips as its kind of job does (backup
    /// retries, stream goes on and fails at the end). The back-off has already been slept.
    Ignore,
    /// The job was stopped by the policy and the user resumed it (or cancelled it: check
    /// cancellation first); retry the failed operation.
    Retry,
}

pub fn is_enospc(err: &io::Error) -> bool {
    err.raw_os_error() == Some(libc::ENOSPC)
}

/// For jobs `auto` behaves like `enospc`, as in QEMU.
pub fn decide(policy: OnError, err: &io::Error) -> PolicyAction {
    match policy {
        OnError::Report => PolicyAction::Report,
        OnError::Ignore => PolicyAction::Ignore,
        OnError::Stop => PolicyAction::Stop,
        OnError::Enospc | OnError::Auto => {
            if is_enospc(err) {
                PolicyAction::Stop
            } else {
                PolicyAction::Report
            }
        }
    }
}

/// The io-status a stopped job shows for `err`.
pub fn io_status_for(err: &io::Error) -> IoStatus {
    if is_enospc(err) {
        IoStatus::Nospace
    } else {
        IoStatus::Failed
    }
}

const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Events allowed at once before the steady rate applies.
const EVENT_BURST: u32 = 5;
const EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// Back-off for errors under `ignore`: the n-th error in a row without progress waits
/// 10 ms * 2^(n-1), at most 1 s; BLOCK_JOB_ERROR goes out through a token bucket of
/// `EVENT_BURST` events refilled at one a second.
#[derive(Debug)]
pub struct IgnoreBackoff {
    streak: u32,
    tokens: u32,
    refilled: Instant,
    suppressed: u64,
}

/// The verdict for one ignored error.
#[derive(Debug, PartialEq, Eq)]
pub struct IgnoreStep {
    /// How long the job sleeps before going on.
    pub delay: Duration,
    /// Emit BLOCK_JOB_ERROR for this error.
    pub emit: bool,
    /// Events suppressed since the last one that went out (to log).
    pub suppressed: u64,
}

impl IgnoreBackoff {
    pub fn new(now: Instant) -> IgnoreBackoff {
        IgnoreBackoff {
            streak: 0,
            tokens: EVENT_BURST,
            refilled: now,
            suppressed: 0,
        }
    }

    /// The job made progress: the next error starts a new streak.
    pub fn progress(&mut self) {
        self.streak = 0;
    }

    /// One more error under `ignore`, at `now`.
    pub fn on_error(&mut self, now: Instant) -> IgnoreStep {
        self.streak = self.streak.saturating_add(1);
        let doublings = (self.streak - 1).min(16);
        let delay = BACKOFF_FIRST
            .saturating_mul(1 << doublings)
            .min(BACKOFF_MAX);

        let elapsed = now.saturating_duration_since(self.refilled);
        let whole = (elapsed.as_nanos() / EVENT_INTERVAL.as_nanos()) as u32;
        if whole > 0 {
            self.tokens = self.tokens.saturating_add(whole).min(EVENT_BURST);
            self.refilled += EVENT_INTERVAL * whole;
        }
        let emit = self.tokens > 0;
        let suppressed = if emit {
            self.tokens -= 1;
            std::mem::take(&mut self.suppressed)
        } else {
            self.suppressed += 1;
            0
        };
        IgnoreStep {
            delay,
            emit,
            suppressed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eio() -> io::Error {
        io::Error::from_raw_os_error(libc::EIO)
    }

    fn enospc() -> io::Error {
        io::Error::from_raw_os_error(libc::ENOSPC)
    }

    #[test]
    fn policies() {
        use PolicyAction::*;
        let cases = [
            (OnError::Report, Report, Report),
            (OnError::Ignore, Ignore, Ignore),
            (OnError::Stop, Stop, Stop),
            (OnError::Enospc, Report, Stop),
            (OnError::Auto, Report, Stop),
        ];
        for (policy, on_eio, on_enospc) in cases {
            assert_eq!(decide(policy, &eio()), on_eio, "{policy:?} EIO");
            assert_eq!(decide(policy, &enospc()), on_enospc, "{policy:?} ENOSPC");
        }
        assert_eq!(io_status_for(&eio()), IoStatus::Failed);
        assert_eq!(io_status_for(&enospc()), IoStatus::Nospace);
    }

    #[test]
    fn policy_names_parse_like_qapi() {
        let p: OnError = serde_json::from_value(serde_json::json!("enospc")).unwrap();
        assert_eq!(p, OnError::Enospc);
        assert!(serde_json::from_value::<OnError>(serde_json::json!("Stop")).is_err());
    }

    #[test]
    fn backoff_doubles_to_a_second_and_resets_on_progress() {
        let now = Instant::now();
        let mut b = IgnoreBackoff::new(now);
        let delays: Vec<u64> = (0..10)
            .map(|_| b.on_error(now).delay.as_millis() as u64)
            .collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        b.progress();
        assert_eq!(b.on_error(now).delay, Duration::from_millis(10));
    }

    #[test]
    fn events_are_rate_limited() {
        let start = Instant::now();
        let mut b = IgnoreBackoff::new(start);
        let emitted = (0..100).filter(|_| b.on_error(start).emit).count();
        assert_eq!(emitted, EVENT_BURST as usize);
        // One more token a second; the first event after the pause reports what was dropped.
        let step = b.on_error(start + Duration::from_millis(1500));
        assert!(step.emit);
        assert_eq!(step.suppressed, 100 - EVENT_BURST as u64);
        assert!(!b.on_error(start + Duration::from_millis(1900)).emit);
        assert!(b.on_error(start + Duration::from_millis(2000)).emit);
    }
}
