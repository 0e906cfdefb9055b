//! One job: its state (status, progress, pauses, cancellation, speed, io-status), the
//! verbs applied to it, the events it emits, and the [`JobContext`] its driver works with.

use crate::driver::{JobDriver, JobFailure, JobType};
use crate::events::JobEventSink;
use crate::manager::JobManager;
use crate::policy::{self, ErrorAction, IgnoreBackoff, IoStatus, OnError, PolicyAction};
use crate::ratelimit::RateLimit;
use crate::status::{verb_refusal, JobStatus, JobVerb};
use crate::txn::{self, JobTxn};
use block::Work;
use futures::FutureExt;
use qapi::error::QmpError;
use serde_json::{json, Map, Value};
use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::futures::Notified;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// The options every job command shares.
#[derive(Clone)]
pub struct JobOptions {
    /// QMP `job-id`: a letter, then letters, digits, `-`, `.`, `_` ([`crate::is_valid_id`]);
    /// also the `device` of the BLOCK_JOB_* events.
    pub id: String,
    /// QMP `auto-finalize`: when false the transaction stops in `pending` (with
    /// BLOCK_JOB_PENDING) until job-finalize.
    pub auto_finalize: bool,
    /// QMP `auto-dismiss`: when false the job stays `concluded` until job-dismiss.
    pub auto_dismiss: bool,
    /// QMP `speed`: bytes per second, 0 = unlimited; negative is refused as QEMU does.
    pub speed: i64,
    /// QMP `on-source-error`: the policy for read errors (block-stream and block-commit
    /// set both policies from `on-error`).
    pub on_source_error: OnError,
    /// QMP `on-target-error`: the policy for write errors.
    pub on_target_error: OnError,
    /// The transaction the job fails together with; `None` gives the job its own.
    pub txn: Option<Arc<JobTxn>>,
}

impl JobOptions {
    /// QEMU's defaults: auto-finalize and auto-dismiss on, no speed limit, `report` on
    /// errors, a transaction of its own.
    pub fn new(id: impl Into<String>) -> JobOptions {
        JobOptions {
            id: id.into(),
            auto_finalize: true,
            auto_dismiss: true,
            speed: 0,
            on_source_error: OnError::Report,
            on_target_error: OnError::Report,
            txn: None,
        }
    }
}

pub(crate) struct State {
    pub(crate) status: JobStatus,
    /// `start` was called: only started jobs emit BLOCK_JOB_COMPLETED/CANCELLED.
    pub(crate) started: bool,
    /// The work has returned, or never will run.
    pub(crate) deferred: bool,
    pub(crate) failure: Option<JobFailure>,
    cancelled: bool,
    force_cancel: bool,
    complete_requested: bool,
    /// The user's pause (at most one) plus the one a created job holds until `start`
    /// takes it away.
    pause_count: u32,
    user_paused: bool,
    /// Times the error policy stopped the job (see `JobContext::handle_error_since`).
    error_stops: u64,
    busy: bool,
    offset: u64,
    len: u64,
    speed: u64,
    limit: RateLimit,
    io_status: IoStatus,
    backoff: IgnoreBackoff,
}

impl State {
    /// QEMU's `job_is_cancelled`: only a force cancel stops the work.
    fn is_cancelled(&self) -> bool {
        self.cancelled && self.force_cancel
    }

    fn is_ready(&self) -> bool {
        matches!(self.status, JobStatus::Ready | JobStatus::Standby)
    }
}

/// What other threads wait on: the status and whether the work has returned.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Phase {
    pub(crate) status: JobStatus,
    pub(crate) deferred: bool,
}

/// One job, made by [`JobManager::create`] and shared through `Arc` by the manager, its
/// transaction, its work on an I/O thread and the monitor thread's verbs.
pub struct Job {
    id: String,
    driver: Arc<dyn JobDriver>,
    events: Arc<dyn JobEventSink>,
    manager: Weak<JobManager>,
    txn: Arc<JobTxn>,
    auto_finalize: bool,
    auto_dismiss: bool,
    on_source_error: OnError,
    on_target_error: OnError,
    state: Mutex<State>,
    /// Wakes the work from sleeps and pause points; every wait re-checks the state, so a
    /// spurious wake-up is harmless and a missed one impossible (waiters register first).
    kick: Notify,
    phase: watch::Sender<Phase>,
}

impl Job {
    pub(crate) fn new(
        driver: Arc<dyn JobDriver>,
        events: Arc<dyn JobEventSink>,
        manager: Weak<JobManager>,
        txn: Arc<JobTxn>,
        opts: &JobOptions,
    ) -> Job {
        let status = JobStatus::Created;
        Job {
            id: opts.id.clone(),
            driver,
            events,
            manager,
            txn,
            auto_finalize: opts.auto_finalize,
            auto_dismiss: opts.auto_dismiss,
            on_source_error: opts.on_source_error,
            on_target_error: opts.on_target_error,
            state: Mutex::new(State {
                status,
                started: false,
                deferred: false,
                failure: None,
                cancelled: false,
                force_cancel: false,
                complete_requested: false,
                pause_count: 1,
                user_paused: false,
                error_stops: 0,
                busy: false,
                offset: 0,
                len: 0,
                speed: 0,
                limit: RateLimit::new(0),
                io_status: IoStatus::Ok,
                backoff: IgnoreBackoff::new(Instant::now()),
            }),
            kick: Notify::new(),
            phase: watch::Sender::new(Phase {
                status,
                deferred: false,
            }),
        }
    }

    /// The job's id: QMP `id`, and `device` for block jobs.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The driver's kind.
    pub fn job_type(&self) -> JobType {
        self.driver.job_type()
    }

    /// The driver that does the job's work.
    pub fn driver(&self) -> &Arc<dyn JobDriver> {
        &self.driver
    }

    /// The transaction the job is finalised and fails with.
    pub(crate) fn txn(&self) -> &Arc<JobTxn> {
        &self.txn
    }

    /// The status now; other threads may move it on at any time.
    pub fn status(&self) -> JobStatus {
        self.lock().status
    }

    /// QMP `auto-finalize`, as created.
    pub(crate) fn auto_finalize(&self) -> bool {
        self.auto_finalize
    }

    /// Paused by the user or by the `stop` error policy.
    pub fn is_user_paused(&self) -> bool {
        self.lock().user_paused
    }

    /// QMP `io-status`: what error stopped the job under the `stop` or `enospc` policy.
    pub fn io_status(&self) -> IoStatus {
        self.lock().io_status
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn emit(&self, name: &str, data: Value) {
        self.events.emit(name, data);
    }

    pub(crate) fn kick(&self) {
        self.kick.notify_waiters();
    }

    /// Move to `to` if QEMU's table allows it; a refused transition is a bug in the
    /// framework, loud in debug builds and logged (state kept) in release builds.
    pub(crate) fn transition(&self, st: &mut State, to: JobStatus) {
        let from = st.status;
        if !from.can_transition_to(to) {
            tracing::error!(job = %self.id, "refused job transition {from} -> {to}");
            debug_assert!(
                false,
                "job '{}': refused transition {from} -> {to}",
                self.id
            );
            return;
        }
        st.status = to;
        self.publish(st);
        if from != to {
            self.emit(
                "JOB_STATUS_CHANGE",
                json!({"id": self.id, "status": to.as_str()}),
            );
        }
    }

    /// Tell waiters on other threads about the status and `deferred`.
    pub(crate) fn publish(&self, st: &State) {
        self.phase.send_replace(Phase {
            status: st.status,
            deferred: st.deferred,
        });
    }

    pub(crate) fn emit_created(&self) {
        self.emit(
            "JOB_STATUS_CHANGE",
            json!({"id": self.id, "status": JobStatus::Created.as_str()}),
        );
    }

    pub(crate) async fn wait_phase(&self, done: impl FnMut(&Phase) -> bool) {
        let mut rx = self.phase.subscribe();
        // The sender lives as long as the job, and we hold the job.
        let _ = rx.wait_for(done).await;
    }

    fn apply_verb(&self, st: &State, verb: JobVerb) -> Result<(), QmpError> {
        if st.status.accepts(verb) {
            Ok(())
        } else {
            Err(QmpError::generic(verb_refusal(&self.id, st.status, verb)))
        }
    }

    /// Start the work: `created -> running`, then hand the future's maker to `spawn`,
    /// which runs it on an I/O thread (or, in tests, on a local task).
    pub fn start_with(self: &Arc<Self>, spawn: impl FnOnce(Work)) {
        {
            let mut st = self.lock();
            if st.status != JobStatus::Created || st.started {
                tracing::error!(job = %self.id, status = %st.status, "job started twice");
                debug_assert!(false, "job '{}' started twice", self.id);
                return;
            }
            st.started = true;
            st.busy = true;
            st.pause_count -= 1;
            self.transition(&mut st, JobStatus::Running);
        }
        let job = Arc::clone(self);
        spawn(Box::new(move || Box::pin(job.work())));
    }

    async fn work(self: Arc<Self>) {
        let ctx = JobContext {
            job: Arc::clone(&self),
        };
        ctx.pause_point().await;
        // A panic (a bug) fails this job, as an I/O error would, and nothing else.
        let result = AssertUnwindSafe(self.driver.run(&ctx))
            .catch_unwind()
            .await
            .unwrap_or_else(|payload| {
                let panicked = block::Panicked::from_payload(payload);
                Err(JobFailure::new(String::from(panicked)))
            });
        {
            let mut st = self.lock();
            st.deferred = true;
            st.busy = false;
            if let Err(failure) = result {
                tracing::info!(job = %self.id, "job failed: {failure}");
                st.failure = Some(failure);
            }
            self.publish(&st);
        }
        txn::job_exit(&self).await;
    }

    /// A job whose setup failed after it was created: `created -> null`, no other event.
    pub fn early_fail(self: &Arc<Self>) {
        {
            let st = self.lock();
            if st.started {
                tracing::error!(job = %self.id, "early_fail on a started job");
                debug_assert!(false, "early_fail on started job '{}'", self.id);
                return;
            }
        }
        self.txn.remove(self);
        self.do_dismiss();
    }

    pub(crate) fn do_dismiss(self: &Arc<Self>) {
        {
            let mut st = self.lock();
            st.deferred = true;
            self.transition(&mut st, JobStatus::Null);
        }
        if let Some(manager) = self.manager.upgrade() {
            manager.remove(self);
        }
    }

    /// block-job-pause / job-pause.
    pub fn user_pause(&self) -> Result<(), QmpError> {
        {
            let mut st = self.lock();
            self.apply_verb(&st, JobVerb::Pause)?;
            if st.user_paused {
                return Err(QmpError::generic("Job is already paused"));
            }
            st.user_paused = true;
            st.pause_count += 1;
        }
        self.kick();
        Ok(())
    }

    /// block-job-resume / job-resume; also clears the io-status left by policy `stop`.
    pub fn user_resume(&self) -> Result<(), QmpError> {
        {
            let mut st = self.lock();
            if !st.user_paused {
                return Err(QmpError::generic("Can't resume a job that was not paused"));
            }
            self.apply_verb(&st, JobVerb::Resume)?;
            st.io_status = IoStatus::Ok;
            st.user_paused = false;
            st.pause_count -= 1;
        }
        self.kick();
        Ok(())
    }

    /// block-job-set-speed. A sleeping job wakes when the limit is lifted or raised.
    pub fn set_speed(&self, speed: i64) -> Result<(), QmpError> {
        let wake = {
            let mut st = self.lock();
            self.apply_verb(&st, JobVerb::SetSpeed)?;
            let speed = u64::try_from(speed)
                .map_err(|_| QmpError::generic("Parameter 'speed' expects a non-negative value"))?;
            let old = st.speed;
            st.speed = speed;
            st.limit.set_speed(speed);
            speed == 0 || speed > old
        };
        if wake {
            self.kick();
        }
        Ok(())
    }

    /// block-job-complete / job-complete.
    pub fn complete(&self) -> Result<(), QmpError> {
        {
            let st = self.lock();
            self.apply_verb(&st, JobVerb::Complete)?;
            if st.cancelled || !self.driver.can_complete() {
                return Err(QmpError::generic(format!(
                    "The active block job '{}' cannot be completed",
                    self.id
                )));
            }
        }
        self.driver.complete()?;
        self.lock().complete_requested = true;
        self.kick();
        Ok(())
    }

    /// block-job-change.
    pub fn change(&self, args: &Map<String, Value>) -> Result<(), QmpError> {
        self.apply_verb(&self.lock(), JobVerb::Change)?;
        self.driver.change(args)
    }

    /// job-cancel / block-job-cancel after its own checks. A running job is woken and
    /// finishes on its thread; a job whose work is over (waiting, pending) or never started
    /// is finalised before this returns, as in QEMU.
    pub async fn cancel(self: &Arc<Self>, force: bool) -> Result<(), QmpError> {
        let _txn = self.txn.lock().await;
        self.apply_verb(&self.lock(), JobVerb::Cancel)?;
        txn::cancel_locked(self, force).await;
        Ok(())
    }

    /// Force-cancel without the verb check and wait until the job is concluded or gone:
    /// for quit and for rolling back a failed `transaction` (its jobs were never started:
    /// `created -> aborting -> concluded -> null`).
    pub async fn cancel_sync(self: &Arc<Self>) {
        self.force_cancel().await;
        self.wait_concluded().await;
    }

    /// Force-cancel in any status that can be cancelled, without waiting for the work.
    pub(crate) async fn force_cancel(self: &Arc<Self>) {
        let _txn = self.txn.lock().await;
        if self.status().accepts(JobVerb::Cancel) {
            txn::cancel_locked(self, true).await;
        }
    }

    /// job-finalize / block-job-finalize: finalises the job's whole transaction.
    pub async fn finalize(self: &Arc<Self>) -> Result<(), QmpError> {
        let _txn = self.txn.lock().await;
        self.apply_verb(&self.lock(), JobVerb::Finalize)?;
        txn::do_finalize(&self.txn).await;
        Ok(())
    }

    /// job-dismiss / block-job-dismiss.
    pub fn dismiss(self: &Arc<Self>) -> Result<(), QmpError> {
        self.apply_verb(&self.lock(), JobVerb::Dismiss)?;
        self.do_dismiss();
        Ok(())
    }

    /// Wait until the job is concluded (kept for dismiss) or gone.
    pub async fn wait_concluded(&self) {
        self.wait_phase(|p| matches!(p.status, JobStatus::Concluded | JobStatus::Null))
            .await;
    }

    /// Cancel without waiting, as QEMU's `job_cancel_async`: a soft cancel of a job that
    /// cannot soft-cancel now becomes a force cancel; a user pause is lifted.
    pub(crate) fn cancel_async(&self, force: bool) {
        let mut st = self.lock();
        let force = force || !(self.driver.supports_soft_cancel() && st.is_ready());
        if st.user_paused {
            st.user_paused = false;
            st.pause_count -= 1;
            st.io_status = IoStatus::Ok;
        }
        // A soft cancel of finished work changes nothing.
        if !st.deferred || force {
            st.cancelled = true;
            st.force_cancel |= force;
        }
        if !st.started {
            st.deferred = true;
            self.publish(&st);
        }
        drop(st);
        self.kick();
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.lock().is_cancelled()
    }

    /// QEMU's `job_update_rc`: a force-cancelled job without an error fails with
    /// "Operation canceled"; a failed job goes `aborting`. Returns whether it failed.
    pub(crate) fn update_rc(&self) -> bool {
        let mut st = self.lock();
        if st.failure.is_none() && st.is_cancelled() {
            st.failure = Some(JobFailure::cancelled());
        }
        if st.failure.is_some() {
            self.transition(&mut st, JobStatus::Aborting);
            true
        } else {
            false
        }
    }

    pub(crate) fn to_waiting(&self) {
        let mut st = self.lock();
        self.transition(&mut st, JobStatus::Waiting);
    }

    pub(crate) fn to_pending(&self) {
        let mut st = self.lock();
        self.transition(&mut st, JobStatus::Pending);
        if !self.auto_finalize && self.job_type().is_block_job() {
            self.emit(
                "BLOCK_JOB_PENDING",
                json!({"type": self.job_type().as_str(), "id": self.id}),
            );
        }
    }

    /// The driver's `prepare` for a job whose work succeeded; a failure fails the job.
    pub(crate) async fn prepare(&self) -> bool {
        if self.lock().failure.is_some() {
            return false;
        }
        if let Err(failure) = self.driver.prepare().await {
            tracing::info!(job = %self.id, "job prepare failed: {failure}");
            self.lock().failure = Some(failure);
            self.update_rc();
            return false;
        }
        true
    }

    /// QEMU's `job_finalize_single`: commit or abort, clean, the final event (only for a
    /// job that started), then concluded, and gone if auto-dismiss (or never started).
    pub(crate) async fn finalize_single(self: &Arc<Self>) {
        if self.update_rc() {
            self.driver.abort().await;
        } else {
            self.driver.commit().await;
        }
        self.driver.clean().await;
        self.txn.remove(self);
        let dismiss = {
            let mut st = self.lock();
            // QEMU's BLOCK_JOB_* events belong to block jobs; a create job only changes status.
            if st.started && self.job_type().is_block_job() {
                let mut data = json!({
                    "type": self.job_type().as_str(),
                    "device": self.id,
                    "len": st.len,
                    "offset": st.offset,
                    "speed": st.speed,
                });
                if st.is_cancelled() {
                    self.emit("BLOCK_JOB_CANCELLED", data);
                } else {
                    if let Some(failure) = &st.failure {
                        data["error"] = json!(failure.message());
                    }
                    self.emit("BLOCK_JOB_COMPLETED", data);
                }
            }
            st.busy = false;
            self.transition(&mut st, JobStatus::Concluded);
            self.auto_dismiss || !st.started
        };
        if dismiss {
            self.do_dismiss();
        }
    }

    /// A query-block-jobs row (`BlockJobInfo`).
    pub fn block_job_info(&self) -> Value {
        let mut row = Map::new();
        let progress = {
            let st = self.lock();
            row.insert("type".into(), json!(self.job_type().as_str()));
            row.insert("device".into(), json!(self.id));
            row.insert("len".into(), json!(st.len));
            row.insert("offset".into(), json!(st.offset));
            row.insert("busy".into(), json!(st.busy));
            row.insert("paused".into(), json!(st.pause_count > 0));
            row.insert("speed".into(), json!(st.speed));
            row.insert("io-status".into(), json!(st.io_status.as_str()));
            row.insert("ready".into(), json!(st.is_ready()));
            row.insert("status".into(), json!(st.status.as_str()));
            row.insert("auto-finalize".into(), json!(self.auto_finalize));
            row.insert("auto-dismiss".into(), json!(self.auto_dismiss));
            if let Some(failure) = &st.failure {
                row.insert("error".into(), json!(failure.message()));
            }
            crate::driver::RowProgress {
                offset: st.offset,
                len: st.len,
                ready: st.is_ready(),
                paused: st.pause_count > 0,
            }
        };
        row.extend(self.driver.extra_info(&progress));
        Value::Object(row)
    }

    /// A query-jobs row (`JobInfo`).
    pub fn job_info(&self) -> Value {
        let st = self.lock();
        let mut row = json!({
            "id": self.id,
            "type": self.job_type().as_str(),
            "status": st.status.as_str(),
            "current-progress": st.offset,
            "total-progress": st.len,
        });
        if let Some(failure) = &st.failure {
            row["error"] = json!(failure.message());
        }
        row
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("type", &self.job_type())
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

/// What a driver's `run` works with. Cheap to clone; all methods may be called from the
/// job's thread while the monitor thread applies verbs.
#[derive(Clone)]
pub struct JobContext {
    job: Arc<Job>,
}

impl JobContext {
    /// The job's id, for logs.
    pub fn id(&self) -> &str {
        &self.job.id
    }

    /// `len` may grow while the job runs (new writes to copy).
    pub fn set_len(&self, len: u64) {
        self.job.lock().len = len;
    }

    /// Progress also ends an error streak under `ignore`.
    pub fn add_offset(&self, delta: u64) {
        let mut st = self.job.lock();
        st.offset = st.offset.saturating_add(delta);
        if delta > 0 {
            st.backoff.progress();
        }
    }

    /// `(offset, len)`: the query's current and total progress.
    pub fn progress(&self) -> (u64, u64) {
        let st = self.job.lock();
        (st.offset, st.len)
    }

    /// Force-cancelled (or any cancel of a job that cannot soft-cancel): stop the work.
    pub fn is_cancelled(&self) -> bool {
        self.job.is_cancelled()
    }

    /// Any cancel, soft or force.
    pub fn cancel_requested(&self) -> bool {
        self.job.lock().cancelled
    }

    /// block-job-complete was accepted.
    pub fn should_complete(&self) -> bool {
        self.job.lock().complete_requested
    }

    /// The job has been READY: status `ready`, or `standby` while paused.
    pub fn is_ready(&self) -> bool {
        self.job.lock().is_ready()
    }

    /// `running -> ready` and BLOCK_JOB_READY.
    pub fn set_ready(&self) {
        let job = &self.job;
        let mut st = job.lock();
        job.transition(&mut st, JobStatus::Ready);
        job.emit(
            "BLOCK_JOB_READY",
            json!({
                "type": job.job_type().as_str(),
                "device": job.id,
                "len": st.len,
                "offset": st.offset,
                "speed": st.speed,
            }),
        );
    }

    /// Resolves at the next wake-up of the job (pause, cancel, complete, speed change). It
    /// counts from its creation, so make it before checking the condition waited for.
    pub fn kicked(&self) -> Notified<'_> {
        self.job.kick.notified()
    }

    /// Where the job may pause: returns at once unless a pause is due, else shows
    /// `paused` (or `standby` when READY) until every pause is lifted or the job is
    /// force-cancelled. Must be awaited to its end, not dropped.
    pub async fn pause_point(&self) {
        let job = &self.job;
        let mut resume_to = None;
        loop {
            let kicked = job.kick.notified();
            {
                let mut st = job.lock();
                if st.pause_count == 0 || st.is_cancelled() {
                    if let Some(status) = resume_to {
                        st.busy = true;
                        job.transition(&mut st, status);
                    }
                    return;
                }
                if resume_to.is_none() {
                    let status = st.status;
                    let to = if status == JobStatus::Ready {
                        JobStatus::Standby
                    } else {
                        JobStatus::Paused
                    };
                    st.busy = false;
                    job.transition(&mut st, to);
                    resume_to = Some(status);
                }
            }
            kicked.await;
        }
    }

    /// Sleep, cut short by any wake-up of the job, then pass a pause point (QEMU's
    /// `job_sleep_ns`).
    pub async fn sleep(&self, duration: Duration) {
        self.sleep_until(std::future::pending::<()>(), duration)
            .await
    }

    /// Like `sleep`, also cut short when `wake` resolves (new work for the job).
    pub async fn sleep_until(
        &self,
        wake: impl std::future::Future<Output = ()>,
        duration: Duration,
    ) {
        let job = &self.job;
        let kicked = job.kick.notified();
        let skip = {
            let mut st = job.lock();
            let skip = duration.is_zero() || st.pause_count > 0 || st.is_cancelled();
            if !skip {
                st.busy = false;
            }
            skip
        };
        if !skip {
            tokio::select! {
                _ = tokio::time::sleep(duration) => {}
                _ = kicked => {}
                _ = wake => {}
            }
            job.lock().busy = true;
        }
        self.pause_point().await;
    }

    /// Account `bytes` against the job's `speed` and sleep as long as the limit says;
    /// call it per request, before or after issuing it.
    pub async fn rate_limit(&self, bytes: u64) {
        let mut delay = self.job.lock().limit.delay(Instant::now(), bytes);
        while !delay.is_zero() && !self.is_cancelled() {
            self.sleep(delay).await;
            // The speed may have changed while the job slept.
            delay = self.job.lock().limit.delay(Instant::now(), 0);
        }
        self.pause_point().await;
    }

    /// How many times the error policy stopped the job so far: a driver notes it when a
    /// request starts and hands it to [`handle_error_since`](Self::handle_error_since).
    pub fn error_stops(&self) -> u64 {
        self.job.lock().error_stops
    }

    /// [`handle_error`](Self::handle_error) for a request started when
    /// [`error_stops`](Self::error_stops) said `started`. A request that failed before the
    /// policy's last stop (many fail together when the target's file system fills up) is
    /// retried without asking the policy again: the user resumed the job after the cause
    /// was dealt with, and stopping again for the same cause would never let it go on.
    pub async fn handle_error_since(
        &self,
        err: &io::Error,
        is_read: bool,
        started: u64,
    ) -> ErrorAction {
        if started < self.error_stops() {
            return ErrorAction::Retry;
        }
        self.handle_error(err, is_read).await
    }

    /// Apply the job's error policy (`on-source-error` for reads, `on-target-error` for
    /// writes) to a failed I/O: emit BLOCK_JOB_ERROR and report, stop (pause until the
    /// user resumes, io-status failed or nospace) or ignore (with back-off).
    pub async fn handle_error(&self, err: &io::Error, is_read: bool) -> ErrorAction {
        let job = &self.job;
        let policy = if is_read {
            job.on_source_error
        } else {
            job.on_target_error
        };
        let operation = if is_read { "read" } else { "write" };
        let action = policy::decide(policy, err);
        let event = json!({"device": job.id, "operation": operation, "action": action.as_str()});
        match action {
            PolicyAction::Report => {
                tracing::warn!(job = %job.id, "{operation} error, failing the job: {err}");
                job.emit("BLOCK_JOB_ERROR", event);
                ErrorAction::Report
            }
            PolicyAction::Stop => {
                tracing::warn!(job = %job.id, "{operation} error, stopping the job: {err}");
                {
                    let mut st = job.lock();
                    if !st.user_paused {
                        st.user_paused = true;
                        st.pause_count += 1;
                    }
                    if st.io_status == IoStatus::Ok {
                        st.io_status = policy::io_status_for(err);
                    }
                    st.error_stops += 1;
                    job.emit("BLOCK_JOB_ERROR", event);
                }
                self.pause_point().await;
                ErrorAction::Retry
            }
            PolicyAction::Ignore => {
                let step = job.lock().backoff.on_error(Instant::now());
                if step.emit {
                    if step.suppressed > 0 {
                        tracing::warn!(
                            job = %job.id,
                            "{} BLOCK_JOB_ERROR events suppressed", step.suppressed
                        );
                    }
                    tracing::warn!(job = %job.id, "{operation} error ignored: {err}");
                    job.emit("BLOCK_JOB_ERROR", event);
                }
                self.sleep(step.delay).await;
                ErrorAction::Ignore
            }
        }
    }
}
