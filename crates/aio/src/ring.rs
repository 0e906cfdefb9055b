//! The per-thread io_uring: submission batching, completion reaping, in-flight ownership.
//!
//! Each I/O thread calls [`init_thread`] once inside its runtime and `LocalSet`. That puts a
//! ring in a thread-local and spawns a local reaper task that waits on the ring fd through
//! tokio's `AsyncFd`. Operations push their SQE and wake the reaper, so all SQEs queued while
//! the current task runs go to the kernel in one `io_uring_enter` once it yields. The in-flight
//! table owns every submitted [`Request`] (and so its buffer) until its CQE arrives, whatever
//! happens to the future that issued it; the ring is never torn down with operations pending.

use crate::op::Request;
use io_uring::{opcode, IoUring, Probe};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tracing::{debug, error, warn};

thread_local! {
    static RING: RefCell<Option<Rc<Ring>>> = const { RefCell::new(None) };
}

static AVAILABLE: OnceLock<bool> = OnceLock::new();

/// Whether io_uring with every operation we use can be set up on this host (probed once).
pub fn uring_available() -> bool {
    *AVAILABLE.get_or_init(|| match Ring::new(2) {
        Ok(_) => true,
        Err(e) => {
            debug!("io_uring unavailable: {e}");
            false
        }
    })
}

/// Whether the calling thread has a working ring (so file I/O goes through io_uring rather
/// than the blocking pool).
pub fn thread_has_ring() -> bool {
    current().is_some()
}

/// What the calling thread's ring has done so far: requests it took and submission calls
/// it made (their ratio is the batching). None without a ring.
pub fn thread_ring_counters() -> Option<RingCounters> {
    current().map(|ring| RingCounters {
        requests: ring.requests.get(),
        submissions: ring.submissions.get(),
    })
}

/// Totals of one thread's ring since [`init_thread`], from [`thread_ring_counters`]; tests
/// compare two snapshots to see how requests were batched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingCounters {
    /// Requests queued on the ring (one SQE each).
    pub requests: u64,
    /// Times the queued SQEs were handed to the kernel (`io_uring_enter` calls that had
    /// something new to submit).
    pub submissions: u64,
}

/// Sets the calling thread's batch limit for files that have none of their own (an
/// iothread's `aio-max-batch`; 0 submits once per reaper round, as files without a limit
/// do). No effect on a thread without a ring.
pub fn set_thread_max_batch(max_batch: usize) {
    if let Some(ring) = current() {
        ring.default_batch.set(max_batch);
    }
}

/// Whether the calling thread's ring has completions waiting to be reaped: what a thread
/// that busy-polls before sleeping looks for. False without a ring.
pub fn thread_has_completions() -> bool {
    current().is_some_and(|ring| {
        ring.uring
            .try_borrow_mut()
            .is_ok_and(|mut uring| !uring.completion().is_empty())
    })
}

/// Set up the calling thread's ring with `entries` submission slots (also the cap on
/// operations in flight on this thread) and spawn its reaper task.
///
/// Must run inside a tokio runtime with I/O enabled and inside a `LocalSet` (the reaper is a
/// local task; tokio panics if there is none). When io_uring cannot be used on this host, a
/// warning is logged, `Ok` is returned, and the thread's I/O goes to the blocking pool.
pub fn init_thread(entries: u32) -> io::Result<()> {
    if entries == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "io_uring needs at least one entry",
        ));
    }
    if RING.with(|r| r.borrow().is_some()) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "io_uring already set up on this thread",
        ));
    }
    let ring = match Ring::new(entries) {
        Ok(ring) => Rc::new(ring),
        Err(e) => {
            warn!("io_uring unavailable ({e}); file I/O on this thread uses the thread pool");
            let _ = AVAILABLE.set(false);
            return Ok(());
        }
    };
    // Safety: `RingFd` keeps the ring, and so its descriptor, alive as long as the `AsyncFd`.
    let afd =
        unsafe { AsyncFd::register_with_interest(RingFd(Rc::clone(&ring)), Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
    RING.with(|r| *r.borrow_mut() = Some(ring));
    tokio::task::spawn_local(reap(afd));
    debug!(entries, "io_uring ready on this thread");
    Ok(())
}

/// The calling thread's ring, if it has a live one.
pub(crate) fn current() -> Option<Rc<Ring>> {
    RING.try_with(|r| r.borrow().clone()).ok().flatten()
}

struct RingFd(Rc<Ring>);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.fd
    }
}

enum Slot {
    Free,
    /// Submitted; the issuing future waits.
    Waiting(Request, Option<Waker>),
    /// Completed; the issuing future has not collected the result yet.
    Done(Request, i32),
    /// Submitted, but the issuing future is gone; dropped when the CQE arrives.
    Orphaned(Request),
}

#[derive(Default)]
struct Slots {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Slots submitted to the kernel and not yet completed.
    pending: usize,
}

impl Slots {
    fn insert(&mut self, slot: Slot) -> usize {
        match self.free.pop() {
            Some(idx) => {
                self.slots[idx] = slot;
                idx
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        }
    }

    fn release(&mut self, idx: usize) -> Slot {
        self.free.push(idx);
        std::mem::replace(&mut self.slots[idx], Slot::Free)
    }

    fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

/// io_uring worker threads per ring for requests that block (see `Ring::new`).
const MAX_BLOCKING_WORKERS: u32 = 64;

pub(crate) struct Ring {
    uring: RefCell<IoUring>,
    fd: RawFd,
    slots: RefCell<Slots>,
    capacity: usize,
    unsubmitted: Cell<bool>,
    /// Requests queued since the last submission, for files with a batch limit.
    queued: Cell<usize>,
    /// The batch limit of files that set none (see [`set_thread_max_batch`]).
    default_batch: Cell<usize>,
    requests: Cell<u64>,
    submissions: Cell<u64>,
    reaper: RefCell<Option<Waker>>,
    space_waiters: RefCell<VecDeque<Waker>>,
    /// Set when the reaper task is gone (its runtime or `LocalSet` ended).
    dead: Cell<bool>,
}

impl Ring {
    fn new(entries: u32) -> io::Result<Ring> {
        let uring = IoUring::builder().setup_clamp().build(entries)?;
        let mut probe = Probe::new();
        uring.submitter().register_probe(&mut probe)?;
        // Requests the file system cannot start without blocking (ext4 takes the inode lock
        // exclusively for allocating or file-extending direct writes) go to io_uring's
        // worker threads. With its default of 4 per CPU they queue up for a few workers that
        // spin on that lock: a 2 GiB qcow2 backup took 1.2 CPU s with 8 workers and 0.65 CPU s
        // (and less time) with one worker per request a job keeps in flight. 0 keeps the
        // default for unbounded (socket) work, which we do not use.
        let mut max_workers = [MAX_BLOCKING_WORKERS, 0];
        if let Err(e) = uring
            .submitter()
            .register_iowq_max_workers(&mut max_workers)
        {
            debug!("io_uring worker limit not raised: {e}");
        }
        for (code, name) in [
            (opcode::Read::CODE, "read"),
            (opcode::Write::CODE, "write"),
            (opcode::Readv::CODE, "readv"),
            (opcode::Writev::CODE, "writev"),
            (opcode::Fsync::CODE, "fsync"),
            (opcode::Fallocate::CODE, "fallocate"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring lacks the {name} operation"),
                ));
            }
        }
        // At most one SQE per in-flight request, and the CQ (twice the SQ) cannot overflow.
        let capacity = uring.params().sq_entries() as usize;
        Ok(Ring {
            fd: uring.as_raw_fd(),
            uring: RefCell::new(uring),
            slots: RefCell::default(),
            capacity,
            unsubmitted: Cell::new(false),
            queued: Cell::new(0),
            default_batch: Cell::new(0),
            requests: Cell::new(0),
            submissions: Cell::new(0),
            reaper: RefCell::new(None),
            space_waiters: RefCell::default(),
            dead: Cell::new(false),
        })
    }

    /// Queue `req` for the next submission.
    fn push(&self, mut req: Request, waker: &Waker) -> Push {
        if self.slots.borrow().in_use() >= self.capacity {
            return Push::Full(req);
        }
        let max_batch = match req.max_batch() {
            0 => self.default_batch.get(),
            own => own,
        };
        let sqe = match req.build_sqe() {
            Ok(sqe) => sqe,
            Err(e) => return Push::Failed(req, e),
        };
        let idx = self
            .slots
            .borrow_mut()
            .insert(Slot::Waiting(req, Some(waker.clone())));
        let sqe = sqe.user_data(idx as u64);
        // Safety: the SQE points into the buffer of the request now owned by slot `idx`,
        // which stays there until the CQE with this user data has been reaped.
        let pushed = unsafe { self.uring.borrow_mut().submission().push(&sqe) };
        if pushed.is_err() {
            // In-flight requests never outnumber the SQ entries, so the SQ has room; should
            // that ever be wrong, wait for space like a full table.
            let Slot::Waiting(req, _) = self.slots.borrow_mut().release(idx) else {
                unreachable!("slot just inserted");
            };
            return Push::Full(req);
        }
        self.slots.borrow_mut().pending += 1;
        self.unsubmitted.set(true);
        self.queued.set(self.queued.get() + 1);
        self.requests.set(self.requests.get() + 1);
        if max_batch > 0 && self.queued.get() >= max_batch {
            self.submit();
        } else if let Some(w) = self.reaper.borrow().as_ref() {
            w.wake_by_ref();
        }
        Push::Queued(idx)
    }

    fn submit(&self) {
        if !self.unsubmitted.replace(false) {
            return;
        }
        self.queued.set(0);
        self.submissions.set(self.submissions.get() + 1);
        let uring = self.uring.borrow();
        loop {
            match uring.submit() {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    // EAGAIN/EBUSY: the kernel is short of resources; try again on the next
                    // reaper round (which a completion or the wake below triggers).
                    warn!("io_uring submit failed: {e}");
                    self.unsubmitted.set(true);
                    break;
                }
            }
        }
    }

    /// Move completions into their slots and wake the waiting futures.
    fn reap(&self) {
        let mut orphans = Vec::new();
        let mut freed = 0;
        {
            let mut uring = self.uring.borrow_mut();
            let mut slots = self.slots.borrow_mut();
            for cqe in uring.completion() {
                let idx = cqe.user_data() as usize;
                let res = cqe.result();
                slots.pending -= 1;
                match std::mem::replace(&mut slots.slots[idx], Slot::Free) {
                    Slot::Waiting(req, waker) => {
                        slots.slots[idx] = Slot::Done(req, res);
                        if let Some(w) = waker {
                            w.wake();
                        }
                    }
                    Slot::Orphaned(req) => {
                        slots.free.push(idx);
                        orphans.push(req);
                        freed += 1;
                    }
                    other @ (Slot::Free | Slot::Done(..)) => {
                        slots.slots[idx] = other;
                        error!(idx, "io_uring completion for a slot not in flight");
                    }
                }
            }
        }
        // Dropped outside the borrows: dropping returns buffers and may notify settlers.
        drop(orphans);
        self.wake_space_waiters(freed);
    }

    fn wake_space_waiters(&self, n: usize) {
        let mut waiters = self.space_waiters.borrow_mut();
        for _ in 0..n {
            match waiters.pop_front() {
                Some(w) => w.wake(),
                None => break,
            }
        }
    }

    /// Block the thread until every submitted request has completed. Only for teardown,
    /// when no reaper will ever run again.
    fn wait_all_blocking(&self) {
        self.unsubmitted.set(true);
        while self.slots.borrow().pending > 0 {
            self.unsubmitted.set(false);
            let res = self.uring.borrow().submit_and_wait(1);
            match res {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    // The kernel may still write into the buffers: leak them rather than free.
                    error!("io_uring wait failed during teardown ({e}); leaking buffers");
                    let slots = std::mem::take(&mut *self.slots.borrow_mut());
                    std::mem::forget(slots);
                    return;
                }
            }
            self.reap();
        }
    }

    fn poll_reaper(&self, cx: &mut Context<'_>, afd: &AsyncFd<RingFd>) -> Poll<()> {
        {
            let mut reaper = self.reaper.borrow_mut();
            if !reaper.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *reaper = Some(cx.waker().clone());
            }
        }
        loop {
            self.submit();
            self.reap();
            match afd.poll_read_ready(cx) {
                Poll::Ready(Ok(mut guard)) => guard.clear_ready(),
                Poll::Ready(Err(e)) => {
                    error!("io_uring completion wait failed: {e}");
                    return Poll::Ready(());
                }
                Poll::Pending => break,
            }
        }
        if self.unsubmitted.get() {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.wait_all_blocking();
    }
}

/// Detaches the ring from the thread when the reaper task ends, so later I/O on this thread
/// falls back to the thread pool instead of waiting for completions nobody reaps.
struct ReaperGuard(Rc<Ring>);

impl Drop for ReaperGuard {
    fn drop(&mut self) {
        self.0.dead.set(true);
        let _ = RING.try_with(|r| {
            let mut r = r.borrow_mut();
            if r.as_ref().is_some_and(|cur| Rc::ptr_eq(cur, &self.0)) {
                *r = None;
            }
        });
        self.0.wake_space_waiters(usize::MAX);
    }
}

async fn reap(afd: AsyncFd<RingFd>) {
    let guard = ReaperGuard(Rc::clone(&afd.get_ref().0));
    std::future::poll_fn(|cx| afd.get_ref().0.poll_reaper(cx, &afd)).await;
    drop(afd);
    drop(guard);
}

enum Push {
    Queued(usize),
    Full(Request),
    Failed(Request, io::Error),
}

enum OpState {
    Unsubmitted(Request),
    InFlight(usize),
    Finished,
}

/// A request on its way through a ring.
pub(crate) struct Op {
    ring: Rc<Ring>,
    state: OpState,
}

impl Op {
    pub(crate) fn new(ring: Rc<Ring>, req: Request) -> Op {
        Op {
            ring,
            state: OpState::Unsubmitted(req),
        }
    }
}

impl Future for Op {
    type Output = (i32, Request);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match std::mem::replace(&mut this.state, OpState::Finished) {
                OpState::Unsubmitted(mut req) => {
                    if this.ring.dead.get() {
                        let res = req.execute_sync();
                        return Poll::Ready((res, req));
                    }
                    match this.ring.push(req, cx.waker()) {
                        Push::Queued(idx) => {
                            this.state = OpState::InFlight(idx);
                            return Poll::Pending;
                        }
                        Push::Failed(req, e) => {
                            let errno = e.raw_os_error().unwrap_or(libc::EINVAL);
                            return Poll::Ready((-errno, req));
                        }
                        Push::Full(req) => {
                            this.ring
                                .space_waiters
                                .borrow_mut()
                                .push_back(cx.waker().clone());
                            this.state = OpState::Unsubmitted(req);
                            return Poll::Pending;
                        }
                    }
                }
                OpState::InFlight(idx) => {
                    let mut slots = this.ring.slots.borrow_mut();
                    match &mut slots.slots[idx] {
                        Slot::Done(..) => {
                            let Slot::Done(req, res) = slots.release(idx) else {
                                unreachable!("matched Done");
                            };
                            drop(slots);
                            this.ring.wake_space_waiters(1);
                            return Poll::Ready((res, req));
                        }
                        Slot::Waiting(_, waker) => {
                            if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                                *waker = Some(cx.waker().clone());
                            }
                            drop(slots);
                            this.state = OpState::InFlight(idx);
                            if this.ring.dead.get() {
                                this.ring.wait_all_blocking();
                                continue;
                            }
                            return Poll::Pending;
                        }
                        Slot::Free | Slot::Orphaned(_) => {
                            unreachable!("an in-flight slot belongs to its Op")
                        }
                    }
                }
                OpState::Finished => panic!("Op polled after completion"),
            }
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if let OpState::InFlight(idx) = self.state {
            let mut slots = self.ring.slots.borrow_mut();
            match std::mem::replace(&mut slots.slots[idx], Slot::Free) {
                Slot::Waiting(req, _) => slots.slots[idx] = Slot::Orphaned(req),
                Slot::Done(req, _) => {
                    slots.free.push(idx);
                    drop(slots);
                    drop(req);
                    self.ring.wake_space_waiters(1);
                }
                other @ (Slot::Free | Slot::Orphaned(_)) => slots.slots[idx] = other,
            }
        }
    }
}
