//! A fake job driver (copies chunks between two memory buffers, with injectable errors, an
//! optional mirror-like READY phase and a hold before returning) and an event recorder.

use async_trait::async_trait;
use jobs::{
    ErrorAction, Job, JobContext, JobDriver, JobEventSink, JobFailure, JobManager, JobOptions,
    JobType,
};
use qapi::error::QmpError;
use serde_json::{json, Map, Value};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

pub const CHUNK: usize = 64 << 10;

#[derive(Clone, Copy)]
pub struct Fault {
    pub chunk: usize,
    pub is_read: bool,
    pub errno: i32,
    /// How many times the chunk fails; `u32::MAX` for ever.
    pub times: u32,
}

#[derive(Default)]
pub struct Knobs {
    pub len: usize,
    pub mirror: bool,
    pub prepare_fails: bool,
    /// Under `ignore`, skip the failed chunk and fail at the end (stream) instead of
    /// retrying it (backup).
    pub skip_on_ignore: bool,
    /// Wait for a permit before returning from `run`.
    pub hold: Option<Arc<Semaphore>>,
    pub faults: Vec<Fault>,
    /// Panic (a bug in a driver) when the copy reaches this chunk.
    pub panic_at_chunk: Option<usize>,
}

pub struct Fake {
    knobs: Knobs,
    src: Vec<u8>,
    dst: Mutex<Vec<u8>>,
    faults: Mutex<Vec<Fault>>,
    pub calls: Mutex<Vec<String>>,
    pub error_calls: AtomicUsize,
}

/// A runaway error loop ends the job instead of hanging the test.
const MAX_ERRORS: usize = 1000;

impl Fake {
    pub fn new(knobs: Knobs) -> Arc<Fake> {
        let src: Vec<u8> = (0..knobs.len).map(|i| (i % 251) as u8 + 1).collect();
        Arc::new(Fake {
            dst: Mutex::new(vec![0; knobs.len]),
            faults: Mutex::new(knobs.faults.clone()),
            src,
            knobs,
            calls: Mutex::new(Vec::new()),
            error_calls: AtomicUsize::new(0),
        })
    }

    pub fn copied_all(&self) -> bool {
        *self.dst.lock().unwrap() == self.src
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn call(&self, what: &str) {
        self.calls.lock().unwrap().push(what.to_string());
    }

    fn copy_chunk(&self, index: usize) -> Result<usize, (io::Error, bool)> {
        for fault in self.faults.lock().unwrap().iter_mut() {
            if fault.chunk == index && fault.times > 0 {
                if fault.times != u32::MAX {
                    fault.times -= 1;
                }
                return Err((io::Error::from_raw_os_error(fault.errno), fault.is_read));
            }
        }
        let start = index * CHUNK;
        let end = (start + CHUNK).min(self.src.len());
        self.dst.lock().unwrap()[start..end].copy_from_slice(&self.src[start..end]);
        Ok(end - start)
    }

    async fn hold(&self) {
        if let Some(hold) = &self.knobs.hold {
            let _ = hold.acquire().await;
        }
    }
}

#[async_trait(?Send)]
impl JobDriver for Fake {
    fn job_type(&self) -> JobType {
        if self.knobs.mirror {
            JobType::Mirror
        } else {
            JobType::Backup
        }
    }

    async fn run(&self, ctx: &JobContext) -> Result<(), JobFailure> {
        let len = self.src.len();
        ctx.set_len(len as u64);
        let mut index = 0;
        let mut skipped = None;
        while index * CHUNK < len && !ctx.is_cancelled() {
            if self.knobs.panic_at_chunk == Some(index) {
                panic!("driver bug at chunk {index}");
            }
            match self.copy_chunk(index) {
                Ok(n) => {
                    ctx.add_offset(n as u64);
                    ctx.rate_limit(n as u64).await;
                    index += 1;
                }
                Err((err, is_read)) => {
                    if self.error_calls.fetch_add(1, Ordering::Relaxed) >= MAX_ERRORS {
                        return Err(JobFailure::new("runaway error loop"));
                    }
                    match ctx.handle_error(&err, is_read).await {
                        ErrorAction::Report => {
                            self.hold().await;
                            return Err(err.into());
                        }
                        ErrorAction::Ignore if self.knobs.skip_on_ignore => {
                            skipped = Some(err);
                            index += 1;
                        }
                        ErrorAction::Ignore | ErrorAction::Retry => {}
                    }
                }
            }
        }
        if self.knobs.mirror && !ctx.is_cancelled() {
            ctx.set_ready();
            loop {
                let kicked = ctx.kicked();
                ctx.pause_point().await;
                if ctx.should_complete() || ctx.cancel_requested() {
                    break;
                }
                kicked.await;
            }
            if ctx.should_complete() && !ctx.is_cancelled() {
                self.call("pivot");
            }
        }
        self.hold().await;
        if ctx.is_cancelled() {
            return Err(JobFailure::cancelled());
        }
        match skipped {
            Some(err) => Err(err.into()),
            None => Ok(()),
        }
    }

    fn can_complete(&self) -> bool {
        self.knobs.mirror
    }

    fn supports_soft_cancel(&self) -> bool {
        self.knobs.mirror
    }

    fn change(&self, args: &Map<String, Value>) -> Result<(), QmpError> {
        if !self.knobs.mirror {
            return Err(QmpError::generic("Job type does not support change"));
        }
        self.call(&format!("change {}", Value::Object(args.clone())));
        Ok(())
    }

    async fn prepare(&self) -> Result<(), JobFailure> {
        self.call("prepare");
        if self.knobs.prepare_fails {
            return Err(JobFailure::new("prepare failed"));
        }
        Ok(())
    }

    async fn commit(&self) {
        self.call("commit");
    }

    async fn abort(&self) {
        self.call("abort");
    }

    async fn clean(&self) {
        self.call("clean");
    }

    fn extra_info(&self, _progress: &jobs::RowProgress) -> Map<String, Value> {
        let mut extra = Map::new();
        if self.knobs.mirror {
            extra.insert("actively-synced".into(), json!(false));
        }
        extra
    }
}

#[derive(Default)]
pub struct Recorder {
    events: Mutex<Vec<(String, Value)>>,
    notify: Notify,
}

impl JobEventSink for Recorder {
    fn emit(&self, name: &str, data: Value) {
        self.events.lock().unwrap().push((name.to_string(), data));
        self.notify.notify_waiters();
    }
}

impl Recorder {
    pub fn events(&self) -> Vec<(String, Value)> {
        self.events.lock().unwrap().clone()
    }

    /// The job's events in order: JOB_STATUS_CHANGE as its status, BLOCK_JOB_X as "X".
    pub fn seq(&self, id: &str) -> Vec<String> {
        self.events()
            .iter()
            .filter(|(_, data)| data.get("id").or(data.get("device")) == Some(&json!(id)))
            .map(|(name, data)| short(name, data))
            .collect()
    }

    /// Every job's events in order, as "id:what".
    pub fn all(&self) -> Vec<String> {
        self.events()
            .iter()
            .map(|(name, data)| {
                let id = data.get("id").or(data.get("device")).unwrap();
                format!("{}:{}", id.as_str().unwrap(), short(name, data))
            })
            .collect()
    }

    /// The payload of the job's last event named `name`.
    pub fn payload(&self, id: &str, name: &str) -> Value {
        self.events()
            .into_iter()
            .rev()
            .find(|(n, data)| {
                n == name && data.get("id").or(data.get("device")) == Some(&json!(id))
            })
            .map(|(_, data)| data)
            .unwrap_or_else(|| panic!("no {name} for {id}"))
    }

    /// Wait (bounded, in virtual time) until the job has emitted `what` (a `seq` entry).
    pub async fn wait_for(&self, id: &str, what: &str) {
        self.wait_nth(id, what, 1).await;
    }

    /// Wait until the job has emitted `what` `n` times.
    pub async fn wait_nth(&self, id: &str, what: &str, n: usize) {
        let wait = async {
            loop {
                let notified = self.notify.notified();
                if self.seq(id).iter().filter(|s| *s == what).count() >= n {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(36_000), wait)
            .await
            .is_err()
        {
            panic!(
                "{id} never emitted {what} {n} times; events: {:?}",
                self.seq(id)
            );
        }
    }
}

fn short(name: &str, data: &Value) -> String {
    match name {
        "JOB_STATUS_CHANGE" => data["status"].as_str().unwrap().to_string(),
        other => other.trim_start_matches("BLOCK_JOB_").to_string(),
    }
}

pub fn manager() -> (Arc<JobManager>, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    (JobManager::new(rec.clone()), rec)
}

pub fn start(job: &Arc<Job>) {
    job.start_with(|work| {
        tokio::task::spawn_local(work());
    });
}

/// Create and start a job with the fake driver.
pub fn spawn(mgr: &JobManager, knobs: Knobs, opts: JobOptions) -> (Arc<Job>, Arc<Fake>) {
    let fake = Fake::new(knobs);
    let job = mgr.create(fake.clone(), opts).expect("create");
    start(&job);
    (job, fake)
}

pub fn opts(id: &str) -> JobOptions {
    JobOptions::new(id)
}

pub fn knobs(len: usize) -> Knobs {
    Knobs {
        len,
        ..Knobs::default()
    }
}

pub fn strs(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Run a test body on a current-thread runtime's LocalSet, as blockd's threads do.
pub async fn local<F: std::future::Future>(body: F) -> F::Output {
    tokio::task::LocalSet::new().run_until(body).await
}
