//! How the server places connection futures (which are not `Send`) on I/O threads.
//!
//! The daemon owns its I/O threads and implements [`Spawner`]; this module also offers
//! two small implementations: [`LocalSpawner`] (jobs run on a `LocalSet` the caller
//! drives) and [`ThreadSpawner`] (one dedicated thread with its own runtime).

use std::thread;

use futures::future::LocalBoxFuture;
use tokio::sync::mpsc;

/// A unit of work for an I/O thread: a `Send` closure run on the target thread, where it
/// builds the thread-local future to poll (it may call `tokio::task::spawn_local`). The
/// one type for this across blockd: the block layer's I/O threads and the jobs take it too.
pub type Work = Box<dyn FnOnce() -> LocalBoxFuture<'static, ()> + Send>;

/// Runs jobs on some I/O thread, inside a tokio current-thread runtime and a `LocalSet`.
pub trait Spawner: Send + Sync + 'static {
    /// Runs `job` on some I/O thread: it is called there and its future is spawned on
    /// that thread's `LocalSet`. May be called from any thread; does not wait.
    fn spawn(&self, job: Work);

    /// Whether the caller already runs on the thread this spawner sends work to (so
    /// there is nothing to move). Spawners that spread work over threads say false.
    fn is_current(&self) -> bool {
        false
    }
}

/// Hands jobs to a driver future that spawns them on the `LocalSet` it runs in.
#[derive(Clone)]
pub struct LocalSpawner {
    tx: mpsc::UnboundedSender<Work>,
}

impl LocalSpawner {
    /// Returns the spawner and the driver to run with `LocalSet::spawn_local` (or
    /// `run_until`); jobs sent after the driver ended are dropped.
    pub fn new() -> (LocalSpawner, LocalBoxFuture<'static, ()>) {
        let (spawner, driver) = LocalSpawner::new_sendable();
        (spawner, Box::pin(driver.run()))
    }
}

impl Spawner for LocalSpawner {
    fn spawn(&self, job: Work) {
        if self.tx.send(job).is_err() {
            tracing::warn!("NBD job dropped: its I/O thread has stopped");
        }
    }
}

/// One dedicated thread running a current-thread runtime and a `LocalSet`. Dropping it
/// stops the thread once the handle is dropped (pending jobs are cancelled).
pub struct ThreadSpawner {
    inner: LocalSpawner,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ThreadSpawner {
    /// Starts the thread, named `name`; fails if its runtime or the thread cannot be
    /// created.
    pub fn start(name: &str) -> std::io::Result<ThreadSpawner> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (inner, driver) = LocalSpawner::new_sendable();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    tokio::task::spawn_local(driver.run());
                    // Either an explicit stop or the spawner being dropped ends the thread.
                    let _ = stop_rx.await;
                });
            })?;
        Ok(ThreadSpawner {
            inner,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Spawner for ThreadSpawner {
    fn spawn(&self, job: Work) {
        self.inner.spawn(job)
    }
}

impl Drop for ThreadSpawner {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            if t.thread().id() != thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// The driver of a [`LocalSpawner`] in a form that can cross threads before it starts.
struct SendableDriver {
    rx: mpsc::UnboundedReceiver<Work>,
}

impl SendableDriver {
    async fn run(mut self) {
        while let Some(job) = self.rx.recv().await {
            tokio::task::spawn_local(job());
        }
    }
}

impl LocalSpawner {
    fn new_sendable() -> (LocalSpawner, SendableDriver) {
        let (tx, rx) = mpsc::unbounded_channel::<Work>();
        (LocalSpawner { tx }, SendableDriver { rx })
    }
}
