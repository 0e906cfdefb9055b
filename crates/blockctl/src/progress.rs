//! Waiting for jobs: a progress bar per job (bytes done and known, rate, ETA, state) drawn on
//! stderr when it is a terminal, and the outcome of each job read from the job's last state
//! and the events that ended it.
//!
//! A block job's outcome is what its BLOCK_JOB_COMPLETED (with the error, when it failed)
//! or BLOCK_JOB_CANCELLED event says: blockctl's connection is there before the job starts,
//! so it sees them, and the job keeps QEMU's default `auto-dismiss`, so a blockctl that is
//! interrupted leaves nothing behind. A job that must be dismissed by hand (blockdev-create,
//! or one created with `auto-dismiss: false`) is read from `query-jobs` once concluded and
//! dismissed.

use crate::cli::{EXIT_CANCELLED, EXIT_FAILED};
use crate::output::{bytes, estimates, print_json, refused, Failure};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use qmp::api::{
    Event, EventKind, JobComplete, JobDismiss, JobInfo, JobStatus, QueryBlockJobs, QueryJobs,
};
use qmp::Client;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// How often job progress is polled.
const TICK: Duration = Duration::from_millis(100);

/// What waiting ends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// The job's end; `complete_when_ready` completes it (block-job-complete) once it is in
    /// sync, as an active commit needs.
    End { complete_when_ready: bool },
    /// The job in sync (a mirror's READY), or its end if that comes first.
    Ready,
}

/// How a job ended, or reached its goal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Finished without error.
    Completed,
    /// In sync and still running.
    Ready,
    /// Failed, with the daemon's reason.
    Failed(String),
    /// Cancelled.
    Cancelled,
    /// Gone without an event saying how (dismissed by someone else).
    Vanished,
}

impl Ended {
    fn word(&self) -> &'static str {
        match self {
            Ended::Completed => "completed",
            Ended::Ready => "ready",
            Ended::Failed(_) => "failed",
            Ended::Cancelled => "cancelled",
            Ended::Vanished => "vanished",
        }
    }

    fn exit_code(&self) -> i32 {
        match self {
            Ended::Completed | Ended::Ready => 0,
            Ended::Cancelled => EXIT_CANCELLED,
            Ended::Failed(_) | Ended::Vanished => EXIT_FAILED,
        }
    }
}

/// A job's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The job.
    pub id: String,
    /// Its type.
    pub kind: String,
    /// How it ended.
    pub ended: Ended,
    /// Bytes done at the end.
    pub done: u64,
    /// Seconds waited.
    pub seconds: f64,
}

/// What the events of one job said so far.
#[derive(Default)]
struct Seen {
    cancelled: bool,
    completed: Option<Option<String>>,
    ready: bool,
    /// Bytes done and the job's type, as the last BLOCK_JOB_* event said.
    offset: Option<u64>,
    kind: Option<String>,
}

/// Progress bars, one per job, on stderr.
pub struct Bars {
    multi: MultiProgress,
    bars: HashMap<String, ProgressBar>,
}

impl Bars {
    /// Bars drawn on stderr if it is a terminal, hidden otherwise.
    pub fn new() -> Bars {
        Bars::with_target(ProgressDrawTarget::stderr())
    }

    /// Bars never drawn.
    pub fn hidden() -> Bars {
        Bars::with_target(ProgressDrawTarget::hidden())
    }

    fn with_target(target: ProgressDrawTarget) -> Bars {
        Bars {
            multi: MultiProgress::with_draw_target(target),
            bars: HashMap::new(),
        }
    }

    /// The jobs that have a bar.
    pub fn ids(&self) -> Vec<String> {
        self.bars.keys().cloned().collect()
    }

    /// Prints a line on stdout, above the bars.
    pub fn print(&self, text: &str) {
        self.multi.suspend(|| println!("{text}"));
    }

    /// Shows `job`'s state, adding its bar the first time.
    /// `detail`, when the daemon gives estimates, follows the state.
    pub fn update(&mut self, job: &JobInfo, detail: Option<String>) {
        let multi = &self.multi;
        let bar = self.bars.entry(job.id.clone()).or_insert_with(|| {
            let style = ProgressStyle::with_template(
                "{prefix:.bold} [{bar:30.cyan/blue}] {binary_bytes}/{binary_total_bytes} \
                 {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            let bar = multi.add(ProgressBar::new(job.total_progress).with_style(style));
            bar.set_prefix(format!("{} {}", job.kind, job.id));
            bar
        });
        bar.set_length(job.total_progress);
        bar.set_position(job.current_progress);
        match detail {
            Some(detail) => bar.set_message(format!("{} ({detail})", job.status.as_str())),
            None => bar.set_message(job.status.as_str()),
        }
    }

    /// Leaves `id`'s bar drawn with its final state.
    pub fn finish(&mut self, id: &str, word: &str) {
        if let Some(bar) = self.bars.remove(id) {
            bar.finish_with_message(word.to_owned());
        }
    }

    /// Takes `id`'s bar away.
    pub fn remove(&mut self, id: &str) {
        if let Some(bar) = self.bars.remove(id) {
            bar.finish_and_clear();
        }
    }

    /// Prints a line above the bars (or plainly on stderr when they are hidden).
    pub fn note(&self, text: &str) {
        if self.multi.is_hidden() {
            eprintln!("{text}");
        } else {
            // The bars are redrawn under the line; a failed draw loses only the line.
            let _ = self.multi.println(text);
        }
    }
}

/// Waits for `ids` to reach `goal`, showing their progress; prints each outcome and
/// returns the exit status.
pub async fn wait(
    client: &mut Client,
    ids: &[String],
    goal: Goal,
    json: bool,
) -> Result<i32, Failure> {
    let outcomes = follow(client, ids, goal).await?;
    Ok(report(&outcomes, json))
}

/// Prints each outcome (text on stdout, or one JSON object per job with `json`) and
/// returns the exit status they make.
pub fn report(outcomes: &[Outcome], json: bool) -> i32 {
    let mut code = 0;
    for outcome in outcomes {
        code = code.max(outcome.ended.exit_code());
        if json {
            let error = match &outcome.ended {
                Ended::Failed(e) => json!(e),
                _ => json!(null),
            };
            print_json(&json!({
                "id": outcome.id, "type": outcome.kind, "outcome": outcome.ended.word(),
                "error": error, "bytes": outcome.done, "seconds": outcome.seconds,
            }));
        } else {
            let reason = match &outcome.ended {
                Ended::Failed(e) => format!(": {e}"),
                Ended::Vanished => ": dismissed before its outcome was seen".to_owned(),
                _ => String::new(),
            };
            println!(
                "{} '{}' {}{reason} ({} in {:.1} s)",
                outcome.kind,
                outcome.id,
                outcome.ended.word(),
                bytes(outcome.done),
                outcome.seconds
            );
        }
    }
    code
}

/// The loop under [`wait`]: events as they come, `query-jobs` every [`TICK`]. Each id is
/// followed once, however often it is named.
pub async fn follow(
    client: &mut Client,
    ids: &[String],
    goal: Goal,
) -> Result<Vec<Outcome>, Failure> {
    let mut unique: Vec<String> = Vec::with_capacity(ids.len());
    for id in ids {
        if !unique.contains(id) {
            unique.push(id.clone());
        }
    }
    let ids = unique;
    let start = Instant::now();
    let mut bars = Bars::new();
    let mut seen: HashMap<String, Seen> =
        ids.iter().map(|id| (id.clone(), Seen::default())).collect();
    let mut last: HashMap<String, JobInfo> = HashMap::new();
    let mut completing: Vec<String> = Vec::new();
    let mut outcomes: Vec<Outcome> = Vec::new();
    let lost = |e: std::io::Error| Failure::new(format!("connection to the daemon lost: {e}"));
    loop {
        let jobs = client
            .call(&QueryJobs {})
            .await
            .map_err(refused("query-jobs"))?;
        let block_jobs = client
            .call(&QueryBlockJobs {})
            .await
            .map_err(refused("query-block-jobs"))?;
        // Events that arrived before the reply are older than it: read them first.
        for message in client.drain_events() {
            if let Some(event) = Event::from_message(&message) {
                note_event(&mut seen, &bars, &event);
            }
        }
        for id in &ids {
            if outcomes.iter().any(|o| &o.id == id) {
                continue;
            }
            let job = jobs.iter().find(|j| &j.id == id);
            if let Some(job) = job {
                let detail = block_jobs
                    .iter()
                    .find(|b| &b.device == id)
                    .and_then(estimates);
                bars.update(job, detail);
                last.insert(id.clone(), job.clone());
            }
            let Some(ended) = judge(job, &seen[id], goal) else {
                let ready = job.is_some_and(|j| j.status == JobStatus::Ready) || seen[id].ready;
                if ready
                    && matches!(
                        goal,
                        Goal::End {
                            complete_when_ready: true
                        }
                    )
                    && !completing.contains(id)
                {
                    client
                        .call(&JobComplete { id: id.clone() })
                        .await
                        .map_err(refused(format!("completing job '{id}'")))?;
                    completing.push(id.clone());
                }
                continue;
            };
            if job.is_some_and(|j| j.status == JobStatus::Concluded) {
                client
                    .call(&JobDismiss { id: id.clone() })
                    .await
                    .map_err(refused(format!("dismissing job '{id}'")))?;
            }
            let info = last.get(id);
            bars.finish(id, ended.word());
            let polled = info.map_or(0, |j| j.current_progress);
            outcomes.push(Outcome {
                id: id.clone(),
                kind: info
                    .map(|j| j.kind.clone())
                    .or_else(|| seen[id].kind.clone())
                    .unwrap_or_else(|| "job".to_owned()),
                ended,
                done: seen[id].offset.unwrap_or(polled).max(polled),
                seconds: start.elapsed().as_secs_f64(),
            });
        }
        if outcomes.len() == ids.len() {
            return Ok(outcomes);
        }
        let tick = Instant::now() + TICK;
        while let Some(event) = client
            .next_typed_event(tick.saturating_duration_since(Instant::now()))
            .await
            .map_err(lost)?
        {
            note_event(&mut seen, &bars, &event);
        }
    }
}

/// Whether the job reached the goal, and how, from its `query-jobs` entry (`None` once it
/// is gone) and its events.
fn judge(job: Option<&JobInfo>, seen: &Seen, goal: Goal) -> Option<Ended> {
    let ended_by_events = || {
        if seen.cancelled {
            Some(Ended::Cancelled)
        } else {
            match &seen.completed {
                Some(Some(error)) => Some(Ended::Failed(error.clone())),
                Some(None) => Some(Ended::Completed),
                None => None,
            }
        }
    };
    match job {
        None => Some(ended_by_events().unwrap_or(Ended::Vanished)),
        Some(job) if job.status == JobStatus::Concluded => {
            Some(match (ended_by_events(), &job.error) {
                (Some(Ended::Cancelled), _) => Ended::Cancelled,
                (_, Some(error)) => Ended::Failed(error.clone()),
                _ => Ended::Completed,
            })
        }
        Some(job) => {
            let ready = job.status == JobStatus::Ready || seen.ready;
            (goal == Goal::Ready && ready).then_some(Ended::Ready)
        }
    }
}

fn note_event(seen: &mut HashMap<String, Seen>, bars: &Bars, event: &Event) {
    match &event.kind {
        EventKind::BlockJobCancelled(e) => {
            if let Some(s) = seen.get_mut(&e.device) {
                s.cancelled = true;
                s.offset = Some(e.offset);
                s.kind = Some(e.kind.clone());
            }
        }
        EventKind::BlockJobCompleted(e) => {
            if let Some(s) = seen.get_mut(&e.device) {
                s.completed = Some(e.error.clone());
                s.offset = Some(e.offset);
                s.kind = Some(e.kind.clone());
            }
        }
        EventKind::BlockJobReady(e) => {
            if let Some(s) = seen.get_mut(&e.device) {
                s.ready = true;
            }
        }
        EventKind::BlockJobError {
            device,
            operation,
            action,
        } if seen.contains_key(device) => {
            bars.note(&format!(
                "job '{device}': I/O error on {operation}, action {action}"
            ));
        }
        _ => {}
    }
}
