//! `iothread` objects: named I/O threads that nodes and exports are pinned to (QEMU's
//! IOThread, `--object iothread,id=...`).
//!
//! Nodes without one are served by the shared [`crate::IoThreads`] (QEMU's main loop for
//! our purposes). An iothread object is one more thread like those, with its own
//! runtime and io_uring, plus the knobs QEMU gives it:
//! - `poll-max-ns`, `poll-grow`, `poll-shrink`: before the thread sleeps it spins, looking
//!   for io_uring completions and new work, for an adaptive time up to `poll-max-ns`.
//!   Waking from sleep costs tens of microseconds; a completion found while spinning does
//!   not. The time grows (times `poll-grow`, 2 when 0) while events come soon after it ran
//!   out, and shrinks (divided by `poll-shrink`, to 0 when 0) when sleeps are longer than
//!   the maximum, where spinning only burns the CPU.
//! - `aio-max-batch`: the io_uring batch limit of files that set none.
//! - `thread-pool-max`: the most threads of the pool behind its blocking work (`aio=threads`
//!   files, opens, truncates, tmpfs writers). The pool is tokio's, sized when the runtime
//!   is built, so it is fixed for the thread's life; `thread-pool-min` must be 0 because
//!   that pool starts threads on demand and cannot keep some warm.

use crate::iothread::{serve, Work};
use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::{JoinHandle, ThreadId};
use std::time::Instant;
use tokio::sync::mpsc;

/// What an iothread object is created with (QEMU's IothreadProperties), with qsd's
/// defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoThreadOptions {
    /// Longest spin before sleeping, in ns; 0 never spins.
    pub poll_max_ns: u64,
    /// Factor the spin grows by; 0 means 2.
    pub poll_grow: u64,
    /// Divisor the spin shrinks by; 0 drops it to 0 at once.
    pub poll_shrink: u64,
    /// io_uring batch limit for files without their own; 0 for one submission per round.
    pub aio_max_batch: u64,
    /// Pool threads kept warm: only 0 (see the module doc).
    pub thread_pool_min: u64,
    /// Most pool threads.
    pub thread_pool_max: u64,
}

impl Default for IoThreadOptions {
    fn default() -> Self {
        IoThreadOptions {
            poll_max_ns: 32768,
            poll_grow: 0,
            poll_shrink: 0,
            aio_max_batch: 0,
            thread_pool_min: 0,
            thread_pool_max: 64,
        }
    }
}

impl IoThreadOptions {
    /// QEMU's checks: every value fits an int64 and the pool bounds are an int range with
    /// max > 0 and min <= max; then ours, thread-pool-min 0.
    pub fn validate(&self) -> Result<(), String> {
        for (name, value) in [
            ("poll-max-ns", self.poll_max_ns),
            ("poll-grow", self.poll_grow),
            ("poll-shrink", self.poll_shrink),
            ("aio-max-batch", self.aio_max_batch),
            ("thread-pool-min", self.thread_pool_min),
            ("thread-pool-max", self.thread_pool_max),
        ] {
            if value > i64::MAX as u64 {
                return Err(format!("{name} value must be in range [0, {}]", i64::MAX));
            }
        }
        if self.thread_pool_max == 0
            || self.thread_pool_max > i32::MAX as u64
            || self.thread_pool_min > self.thread_pool_max
        {
            return Err("bad thread-pool-min/thread-pool-max values".into());
        }
        if self.thread_pool_min != 0 {
            return Err(
                "thread-pool-min must be 0 in blockd: its I/O threads start pool threads \
                 on demand and cannot keep idle ones warm"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The knobs the thread reads while it runs; qom-set changes them.
#[derive(Default)]
struct Knobs {
    poll_max_ns: AtomicU64,
    poll_grow: AtomicU64,
    poll_shrink: AtomicU64,
    aio_max_batch: AtomicU64,
    /// Work sent so far: a spinning thread sees new work by this changing.
    sent: AtomicU64,
    /// Sleeps skipped because the spin found something, for tests and curiosity.
    poll_hits: AtomicU64,
}

/// One iothread object. Shared by `Arc` with the nodes pinned to it.
pub struct IoThreadObject {
    id: String,
    inbox: RwLock<Option<mpsc::UnboundedSender<Work>>>,
    handle: Mutex<Option<JoinHandle<()>>>,
    thread: ThreadId,
    knobs: Arc<Knobs>,
    thread_pool_max: u64,
    /// Work spawned here that has not ended yet (connections, device queues, jobs).
    live: Arc<AtomicUsize>,
}

/// Counts one piece of work as live until it ends (or is dropped unrun).
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The first spin of a thread that has not been spinning, in ns.
const FIRST_SPIN_NS: u64 = 4000;

thread_local! {
    /// This thread's current spin, in ns.
    static SPIN_NS: Cell<u64> = const { Cell::new(0) };
    /// When this thread went to sleep after a spin that found nothing.
    static SLEPT_AT: Cell<Option<Instant>> = const { Cell::new(None) };
}

impl Knobs {
    /// Before the runtime sleeps: spin for the current spin time, looking for completions
    /// and new work.
    fn before_sleep(&self) {
        let max = self.poll_max_ns.load(Ordering::Relaxed);
        let spin = SPIN_NS.get().min(max);
        if spin > 0 {
            let start = Instant::now();
            let sent = self.sent.load(Ordering::Acquire);
            loop {
                if aio::thread_has_completions() || self.sent.load(Ordering::Acquire) != sent {
                    self.poll_hits.fetch_add(1, Ordering::Relaxed);
                    SLEPT_AT.set(None);
                    return;
                }
                if start.elapsed().as_nanos() as u64 >= spin {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        SLEPT_AT.set((max > 0).then(Instant::now));
    }

    /// After the runtime woke: adapt the spin to how long it slept.
    fn after_wake(&self) {
        let Some(slept_at) = SLEPT_AT.take() else {
            return;
        };
        let slept = slept_at.elapsed().as_nanos() as u64;
        let max = self.poll_max_ns.load(Ordering::Relaxed);
        let spin = SPIN_NS.get();
        let next = if slept > max {
            match self.poll_shrink.load(Ordering::Relaxed) {
                0 => 0,
                shrink => spin / shrink,
            }
        } else if spin < max {
            match (spin, self.poll_grow.load(Ordering::Relaxed)) {
                (0, _) => FIRST_SPIN_NS,
                (spin, 0) => spin.saturating_mul(2),
                (spin, grow) => spin.saturating_mul(grow),
            }
        } else {
            spin
        };
        SPIN_NS.set(next.min(max));
    }
}

impl IoThreadObject {
    /// Starts the thread (named `IO <id>`, as QEMU names its iothreads) and waits until it
    /// runs. `options` must have passed [`IoThreadOptions::validate`].
    pub fn start(id: &str, options: IoThreadOptions) -> io::Result<IoThreadObject> {
        let knobs = Arc::new(Knobs::default());
        knobs
            .poll_max_ns
            .store(options.poll_max_ns, Ordering::Relaxed);
        knobs.poll_grow.store(options.poll_grow, Ordering::Relaxed);
        knobs
            .poll_shrink
            .store(options.poll_shrink, Ordering::Relaxed);
        knobs
            .aio_max_batch
            .store(options.aio_max_batch, Ordering::Relaxed);
        let (park, unpark) = (knobs.clone(), knobs.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(options.thread_pool_max as usize)
            .on_thread_park(move || park.before_sleep())
            .on_thread_unpark(move || unpark.after_wake())
            .build()?;
        let (tx, rx) = mpsc::unbounded_channel::<Work>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let batch = options.aio_max_batch as usize;
        let handle = std::thread::Builder::new()
            .name(format!("IO {id}"))
            .stack_size(crate::iothread::IO_THREAD_STACK)
            .spawn(move || serve(runtime, rx, ready_tx, || aio::set_thread_max_batch(batch)))?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("iothread died during start"))??;
        Ok(IoThreadObject {
            id: id.to_string(),
            thread: handle.thread().id(),
            inbox: RwLock::new(Some(tx)),
            handle: Mutex::new(Some(handle)),
            knobs,
            thread_pool_max: options.thread_pool_max,
            live: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The object's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The values qom-get reports.
    pub fn options(&self) -> IoThreadOptions {
        let k = &self.knobs;
        IoThreadOptions {
            poll_max_ns: k.poll_max_ns.load(Ordering::Relaxed),
            poll_grow: k.poll_grow.load(Ordering::Relaxed),
            poll_shrink: k.poll_shrink.load(Ordering::Relaxed),
            aio_max_batch: k.aio_max_batch.load(Ordering::Relaxed),
            thread_pool_min: 0,
            thread_pool_max: self.thread_pool_max,
        }
    }

    /// qom-set of the polling knobs and `aio-max-batch`; `options` keeps the pool as it
    /// is (the caller refuses changing it) and must have passed validation.
    pub fn update(&self, options: IoThreadOptions) {
        let k = &self.knobs;
        k.poll_max_ns.store(options.poll_max_ns, Ordering::Relaxed);
        k.poll_grow.store(options.poll_grow, Ordering::Relaxed);
        k.poll_shrink.store(options.poll_shrink, Ordering::Relaxed);
        let batch = options.aio_max_batch;
        if k.aio_max_batch.swap(batch, Ordering::Relaxed) != batch {
            self.spawn(Box::new(move || {
                Box::pin(async move { aio::set_thread_max_batch(batch as usize) })
            }));
        }
    }

    /// How many times the thread found work by spinning instead of sleeping.
    pub fn poll_hits(&self) -> u64 {
        self.knobs.poll_hits.load(Ordering::Relaxed)
    }

    /// Runs `work` on this thread, fire and forget; dropped once the object is stopped.
    pub fn spawn(&self, work: Work) {
        if let Some(tx) = self.inbox.read().unwrap().as_ref() {
            self.live.fetch_add(1, Ordering::AcqRel);
            let live = Live(self.live.clone());
            self.knobs.sent.fetch_add(1, Ordering::Release);
            let _ = tx.send(Box::new(move || {
                let work = work();
                Box::pin(async move {
                    let _live = live;
                    work.await
                })
            }));
        }
    }

    /// Whether work spawned here still runs, waiting up to `grace` for it to end: what
    /// follows its node elsewhere (an NBD connection) leaves within moments of a move.
    pub async fn busy_after(&self, grace: std::time::Duration) -> bool {
        let until = tokio::time::Instant::now() + grace;
        while self.live.load(Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() >= until {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        false
    }

    /// Runs `make()`'s future on this thread and awaits its output.
    pub async fn run<T, F, Fut>(&self, make: F) -> T
    where
        T: crate::iothread::FromPanic + Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + 'static,
    {
        crate::iothread::run_with(|work| self.spawn(work), make).await
    }

    /// Whether the caller runs on this thread.
    pub fn is_current(&self) -> bool {
        std::thread::current().id() == self.thread
    }

    /// Ends the thread: work still queued is dropped, and tasks still running on it end
    /// with it. Called when the object is deleted (only once nothing is pinned to it) and
    /// at shutdown.
    pub fn stop(&self) {
        self.inbox.write().unwrap().take();
        if let Some(handle) = self.handle.lock().unwrap().take() {
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
    }
}

impl Drop for IoThreadObject {
    fn drop(&mut self) {
        self.stop();
    }
}

impl nbd::spawn::Spawner for IoThreadObject {
    fn spawn(&self, job: Work) {
        IoThreadObject::spawn(self, job);
    }

    fn is_current(&self) -> bool {
        IoThreadObject::is_current(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_as_qemu_checks_them() {
        let ok = IoThreadOptions::default();
        assert_eq!(ok.validate(), Ok(()));
        let bad = |o: IoThreadOptions| o.validate().unwrap_err();
        assert_eq!(
            bad(IoThreadOptions {
                thread_pool_max: 0,
                ..ok
            }),
            "bad thread-pool-min/thread-pool-max values"
        );
        assert_eq!(
            bad(IoThreadOptions {
                thread_pool_max: 1 << 40,
                ..ok
            }),
            "bad thread-pool-min/thread-pool-max values"
        );
        assert_eq!(
            bad(IoThreadOptions {
                poll_grow: u64::MAX,
                ..ok
            }),
            "poll-grow value must be in range [0, 9223372036854775807]"
        );
        assert!(bad(IoThreadOptions {
            thread_pool_min: 1,
            ..ok
        })
        .contains("thread-pool-min must be 0"));
    }

    /// Work runs on the object's own thread, named after it, and stops with it.
    #[test]
    fn work_runs_on_the_named_thread() {
        let t = IoThreadObject::start("io-test", IoThreadOptions::default()).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let name: Result<String, String> = runtime.block_on(
            t.run(|| async { Ok(std::thread::current().name().unwrap_or("").to_string()) }),
        );
        assert_eq!(name.unwrap(), "IO io-test");
        t.stop();
        let after: Result<(), String> = runtime.block_on(t.run(|| async { Ok(()) }));
        assert!(after.is_err(), "work after stop must fail, not hang");
    }

    /// With polling on, a thread that keeps getting work finds some of it by spinning;
    /// with poll-max-ns 0 it never spins. The maximum is large so that a loaded machine,
    /// where a round trip can take milliseconds, does not keep resetting the spin.
    #[test]
    fn polling_finds_work_only_when_enabled() {
        let hits = |poll_max_ns, rounds| {
            let t = IoThreadObject::start(
                "io-poll",
                IoThreadOptions {
                    poll_max_ns,
                    ..IoThreadOptions::default()
                },
            )
            .unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                for _ in 0..rounds {
                    let _: Result<(), String> = t.run(|| async { Ok(()) }).await;
                    if t.poll_hits() > 0 {
                        break;
                    }
                }
            });
            let hits = t.poll_hits();
            t.stop();
            hits
        };
        assert_eq!(hits(0, 500), 0);
        assert!(
            hits(50_000_000, 5000) > 0,
            "a spin of up to 50 ms never found work"
        );
    }
}
