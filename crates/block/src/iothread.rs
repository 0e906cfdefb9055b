//! I/O threads: one current-thread tokio runtime with a `LocalSet` per thread.
//!
//! Our drivers' futures are not `Send`, so work is sent to a thread as a `Send` closure
//! that builds its future there; the future never leaves that thread.
//!
//! A panic is a bug, and it fails the unit of work it happened in, never the daemon: work
//! run here (`run`, what a QMP command does on an I/O thread) answers [`Panicked`], as
//! an NBD request answers EIO and a job fails. Locks are std locks on purpose: one that a
//! panic left poisoned makes the later users of the same state fail too, rather than work
//! on state the panic may have left half changed.

use futures::FutureExt;
use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::thread::JoinHandle;
use tokio::sync::{mpsc, oneshot};

pub use nbd::Work;

/// The daemon's I/O threads (`blockd-io0`, `blockd-io1`, ...), each with its own io_uring.
/// Every thread serves every node; shared by `Arc` and usable from any thread.
pub struct IoThreads {
    /// Emptied on shutdown, which ends each thread's receive loop.
    senders: RwLock<Vec<mpsc::UnboundedSender<Work>>>,
    count: usize,
    next: AtomicUsize,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

/// Work on an I/O thread panicked (or the thread stopped under it).
#[derive(Debug)]
pub struct Panicked(pub String);

impl Panicked {
    /// The panic's own message, where it has one.
    pub fn from_payload(payload: Box<dyn std::any::Any + Send>) -> Panicked {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        tracing::error!("internal error (a bug): {message}");
        Panicked(message)
    }
}

impl From<Panicked> for String {
    fn from(p: Panicked) -> String {
        format!("internal error: {}", p.0)
    }
}

impl From<Panicked> for io::Error {
    fn from(p: Panicked) -> io::Error {
        io::Error::other(String::from(p))
    }
}

impl From<Panicked> for qapi::error::QmpError {
    fn from(p: Panicked) -> qapi::error::QmpError {
        qapi::error::QmpError::generic(String::from(p))
    }
}

/// What work run on an I/O thread answers when it panicked: its error.
pub trait FromPanic {
    fn from_panic(panicked: Panicked) -> Self;
}

impl<T, E: From<Panicked>> FromPanic for Result<T, E> {
    fn from_panic(panicked: Panicked) -> Self {
        Err(panicked.into())
    }
}

/// Work with no answer (cleanup): the panic is logged, nothing else to tell.
impl FromPanic for () {
    fn from_panic(_: Panicked) -> Self {}
}

/// Ring entries per thread: enough for a deep NBD queue plus a job's parallel copies.
const RING_ENTRIES: u32 = 256;

impl IoThreads {
    /// Start `count` threads (at least one) and wait until each has its runtime; Err when a
    /// thread or its runtime could not be created. A thread without io_uring still starts
    /// (its file I/O falls back to the blocking pool).
    pub fn start(count: usize) -> io::Result<IoThreads> {
        let count = count.max(1);
        let mut senders = Vec::with_capacity(count);
        let mut handles = Vec::with_capacity(count);
        for index in 0..count {
            let (tx, rx) = mpsc::unbounded_channel::<Work>();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let handle = std::thread::Builder::new()
                .name(format!("blockd-io{index}"))
                .stack_size(IO_THREAD_STACK)
                .spawn(move || run_thread(rx, ready_tx))?;
            ready_rx
                .recv()
                .map_err(|_| io::Error::other("I/O thread died during start"))??;
            senders.push(tx);
            handles.push(handle);
        }
        Ok(IoThreads {
            senders: RwLock::new(senders),
            count,
            next: AtomicUsize::new(0),
            handles: Mutex::new(handles),
        })
    }

    /// How many I/O threads there are.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Pick threads round-robin so connections and jobs spread over the cores.
    pub fn pick(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.count
    }

    /// Send `job` to thread `thread` (modulo the count), fire and forget: its future is
    /// spawned there as a local task. Dropped silently after [`IoThreads::shutdown`].
    pub fn spawn_on(&self, thread: usize, job: Work) {
        // No sender means the daemon is shutting down; the job is moot then.
        if let Some(tx) = self.senders.read().unwrap().get(thread % self.count) {
            let _ = tx.send(job);
        }
    }

    /// [`IoThreads::spawn_on`] the next thread round-robin (NBD connections, jobs).
    pub fn spawn(&self, job: Work) {
        self.spawn_on(self.pick(), job);
    }

    /// Run `make()`'s future on an I/O thread and hand its output back to the caller.
    pub async fn run<T, F, Fut>(&self, make: F) -> T
    where
        T: FromPanic + Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        self.run_on(self.pick(), make).await
    }

    /// [`IoThreads::run`] on thread `thread` (modulo the count). A panic in the work, or the
    /// thread stopping before it answered, comes back as `T::from_panic`.
    pub async fn run_on<T, F, Fut>(&self, thread: usize, make: F) -> T
    where
        T: FromPanic + Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        run_with(|work| self.spawn_on(thread, work), make).await
    }

    /// Stop accepting work and join the threads; work still queued is dropped.
    pub fn shutdown(&self) {
        self.senders.write().unwrap().clear();
        for handle in std::mem::take(&mut *self.handles.lock().unwrap()) {
            let _ = handle.join();
        }
    }
}

/// Sends `make` as work through `send` and awaits its output; a panic in the work, or the
/// thread dropping it unrun, comes back as `T::from_panic`.
pub(crate) async fn run_with<T, F, Fut>(send: impl FnOnce(Work), make: F) -> T
where
    T: FromPanic + Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    let (tx, rx) = oneshot::channel();
    send(Box::new(move || {
        Box::pin(async move {
            let work = async move { make().await };
            let output = AssertUnwindSafe(work)
                .catch_unwind()
                .await
                .unwrap_or_else(|payload| T::from_panic(Panicked::from_payload(payload)));
            let _ = tx.send(output);
        })
    }));
    rx.await.unwrap_or_else(|_| {
        T::from_panic(Panicked(
            "I/O thread stopped while running a request".into(),
        ))
    })
}

fn run_thread(rx: mpsc::UnboundedReceiver<Work>, ready: std::sync::mpsc::Sender<io::Result<()>>) {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => serve(runtime, rx, ready, || {}),
        Err(e) => {
            let _ = ready.send(Err(e));
        }
    }
}

/// An I/O thread's life on its own thread: set up the ring (then `setup`), say it is
/// ready, and run the work it receives until its sender is dropped.
pub(crate) fn serve(
    runtime: tokio::runtime::Runtime,
    mut rx: mpsc::UnboundedReceiver<Work>,
    ready: std::sync::mpsc::Sender<io::Result<()>>,
    setup: impl FnOnce(),
) {
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        if let Err(e) = aio::init_thread(RING_ENTRIES) {
            tracing::warn!("io_uring unavailable, file I/O uses the thread pool: {e}");
        }
        setup();
        let _ = ready.send(Ok(()));
        tokio::task::spawn_local(trim_when_idle());
        while let Some(job) = rx.recv().await {
            // Building the work may panic too; the thread goes on serving the others.
            match std::panic::catch_unwind(AssertUnwindSafe(job)) {
                Ok(work) => {
                    tokio::task::spawn_local(work);
                }
                Err(payload) => {
                    Panicked::from_payload(payload);
                }
            }
        }
    });
}

/// How often an I/O thread looks whether its buffer pool went unused.
const TRIM_PERIOD: std::time::Duration = std::time::Duration::from_secs(2);

/// Gives back the buffers (and the allocator's free memory) of a thread that went idle:
/// after a burst of large requests the daemon's memory returns to its resting size
/// instead of staying at the burst's peak. Every I/O thread runs it; the daemon's main
/// thread (the monitor's huge messages) too.
pub async fn trim_when_idle() {
    let mut tick = tokio::time::interval(TRIM_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        aio::pool::trim_idle();
        if let Some(hook) = TRIM_HOOK.get() {
            hook();
        }
    }
}

static TRIM_HOOK: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// What else each I/O thread runs at every trim: the binary's allocator hands back the
/// memory it holds free (the block crate does not know which allocator that is).
pub fn set_trim_hook(hook: fn()) {
    let _ = TRIM_HOOK.set(hook);
}

/// An I/O thread's stack. Opening a backing chain nests one open inside the other, a few
/// tens of KiB of stack each: the 2 MiB default ran out at about 150 levels. Only the
/// pages used are ever resident.
pub(crate) const IO_THREAD_STACK: usize = 64 << 20;

/// A piece of CPU-bound work for the pool.
type CpuJob = Box<dyn FnOnce() + Send>;

/// The daemon's CPU workers (`blockd-cpu0`, ...), one per core, for CPU-bound work
/// (compressing and decompressing clusters and chunks). A fixed pool rather than tokio's
/// blocking threads: those grow with the work in flight (a compressed backup keeps dozens
/// of clusters in flight), each with its own stack and allocator arena and the memory
/// they keep, and go no faster than the cores; and a worker that finishes a piece takes
/// the next from the queue at once, without waiting for an I/O thread to hand it over.
static CPU_POOL: std::sync::LazyLock<Mutex<std::sync::mpsc::Sender<CpuJob>>> =
    std::sync::LazyLock::new(|| {
        let (tx, rx) = std::sync::mpsc::channel::<CpuJob>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        for i in 0..cores {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("blockd-cpu{i}"))
                .spawn(move || loop {
                    // The lock is held while waiting: the other workers queue behind it
                    // for the next piece, which is what they would do anyway.
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("could not start CPU worker {i}: {e}");
            }
        }
        Mutex::new(tx)
    });

/// Run `work` on the CPU workers and wait for it without holding the I/O thread. A panic
/// in it fails this piece of work only.
pub(crate) async fn cpu_bound<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let (tx, rx) = oneshot::channel();
    let job: CpuJob = Box::new(move || {
        let result = std::panic::catch_unwind(AssertUnwindSafe(work));
        let _ = tx.send(result.map_err(|p| Panicked::from_payload(p).0));
    });
    CPU_POOL
        .lock()
        .map_err(|_| io::Error::other("the CPU workers are gone"))?
        .send(job)
        .map_err(|_| io::Error::other("the CPU workers are gone"))?;
    match rx.await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(panic)) => Err(io::Error::other(format!("CPU work panicked: {panic}"))),
        Err(_) => Err(io::Error::other("the CPU workers are gone")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Work that panics answers its error; a job that panics while it is built is
    /// dropped; the thread serves what comes next either way.
    #[test]
    fn a_panic_fails_its_work_and_the_thread_goes_on() {
        let io = IoThreads::start(1).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let failed: Result<(), String> = io
                .run(|| async {
                    if std::hint::black_box(true) {
                        panic!("boom");
                    }
                    Ok(())
                })
                .await;
            assert_eq!(failed, Err("internal error: boom".to_string()));
            io.spawn(Box::new(|| panic!("while building")));
            let next: Result<u32, String> = io.run(|| async { Ok(7) }).await;
            assert_eq!(next, Ok(7));
        });
        io.shutdown();
    }

    #[test]
    fn cpu_work_answers_and_a_panic_fails_only_its_own_piece() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            assert_eq!(cpu_bound(|| 6 * 7).await.unwrap(), 42);
            let failed = cpu_bound(|| -> u32 { panic!("boom") }).await;
            assert!(failed.unwrap_err().to_string().contains("boom"));
            assert_eq!(cpu_bound(|| 1).await.unwrap(), 1);
        });
    }
}
