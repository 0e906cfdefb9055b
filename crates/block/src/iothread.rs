//! I/O threads: one current-thread tokio runtime with a `LocalSet` per thread.
//!
//! imago's futures (and ours) are not `Send`, so work is sent to a thread as a `Send` closure
//! that builds its future there; the future never leaves that thread.

use futures::future::LocalBoxFuture;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::thread::JoinHandle;
use tokio::sync::{mpsc, oneshot};

/// Work for an I/O thread: a closure, run there, that makes the future to spawn locally.
pub type IoJob = Box<dyn FnOnce() -> LocalBoxFuture<'static, ()> + Send>;

pub struct IoThreads {
    /// Emptied on shutdown, which ends each thread's receive loop.
    senders: RwLock<Vec<mpsc::UnboundedSender<IoJob>>>,
    count: usize,
    next: AtomicUsize,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

/// Ring entries per thread: enough for a deep NBD queue plus a job's parallel copies.
const RING_ENTRIES: u32 = 256;

impl IoThreads {
    pub fn start(count: usize) -> io::Result<IoThreads> {
        let count = count.max(1);
        let mut senders = Vec::with_capacity(count);
        let mut handles = Vec::with_capacity(count);
        for index in 0..count {
            let (tx, rx) = mpsc::unbounded_channel::<IoJob>();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let handle = std::thread::Builder::new()
                .name(format!("blockd-io{index}"))
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

    pub fn count(&self) -> usize {
        self.count
    }

    /// Pick threads round-robin so connections and jobs spread over the cores.
    pub fn pick(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.count
    }

    pub fn spawn_on(&self, thread: usize, job: IoJob) {
        // No sender means the daemon is shutting down; the job is moot then.
        if let Some(tx) = self.senders.read().unwrap().get(thread % self.count) {
            let _ = tx.send(job);
        }
    }

    pub fn spawn(&self, job: IoJob) {
        self.spawn_on(self.pick(), job);
    }

    /// Run `make()`'s future on an I/O thread and hand its output back to the caller.
    pub async fn run<T, F, Fut>(&self, make: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        self.run_on(self.pick(), make).await
    }

    pub async fn run_on<T, F, Fut>(&self, thread: usize, make: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.spawn_on(
            thread,
            Box::new(move || {
                Box::pin(async move {
                    let _ = tx.send(make().await);
                })
            }),
        );
        rx.await
            .expect("I/O thread stopped while running a request")
    }

    /// Stop accepting work and join the threads; work still queued is dropped.
    pub fn shutdown(&self) {
        self.senders.write().unwrap().clear();
        for handle in std::mem::take(&mut *self.handles.lock().unwrap()) {
            let _ = handle.join();
        }
    }
}

fn run_thread(
    mut rx: mpsc::UnboundedReceiver<IoJob>,
    ready: std::sync::mpsc::Sender<io::Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        if let Err(e) = aio::init_thread(RING_ENTRIES) {
            tracing::warn!("io_uring unavailable, file I/O uses the thread pool: {e}");
        }
        let _ = ready.send(Ok(()));
        while let Some(job) = rx.recv().await {
            tokio::task::spawn_local(job());
        }
    });
}
