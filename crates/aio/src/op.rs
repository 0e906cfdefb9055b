//! One file operation with everything it needs kept alive until it has really finished.
//!
//! A [`Request`] owns its bounce buffer and a reference to the file, so the kernel (through
//! the thread's io_uring) or a pool thread can finish it even after the future that issued it
//! was dropped. [`run`] picks the current thread's ring when there is one (and the file's
//! engine and file system suit it), else the blocking pool, else (outside any runtime)
//! performs the call inline. Large writes to a file whose ring would serialise them go to
//! the file's one pool writer instead (see [`SerialWrites`]).

use crate::file::Engine;
use crate::iobuf::IoBuf;
use crate::ring;
use io_uring::{opcode, squeue, types};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{oneshot, Notify};

/// Writes from this size on leave the ring for the file's pool writer on file systems
/// where the ring serialises them. A job's copies (64 KiB clusters and up) and
/// copy-before-write then no longer wait behind io-wq's hashed queue; small client writes
/// stay on the ring, where a thread hand-off would cost more than the copy (bench/run in
/// RAM: 4 KiB random writes 101k IOPS on the ring, 45k through the pool).
const POOL_WRITE_MIN: usize = 64 * 1024;

/// The file descriptor plus the accounting of modifying requests still under way.
#[derive(Debug)]
pub(crate) struct Core {
    fd: OwnedFd,
    engine: Engine,
    max_batch: usize,
    /// Large writes go to the blocking pool even with the ring engine: the ring would run
    /// them one at a time on this file system (`file::probe_geometry`).
    writes_to_pool: bool,
    serial: SerialWrites,
    writes_in_flight: AtomicUsize,
    writes_settled: Notify,
}

/// The large writes of one file waiting for its pool writer, and whether one runs.
///
/// Such a file is on tmpfs, whose write path holds the inode's lock exclusively for the
/// whole copy: writes to one file run one at a time whoever issues them. Several pool
/// threads writing at once only spin on that lock (perf, mirror in RAM: 27% of the
/// daemon's CPU in `rwsem_spin_on_owner`), so one thread drains the queue in order and the
/// others stay free for reads.
#[derive(Debug, Default)]
struct SerialWrites {
    state: Mutex<SerialState>,
}

#[derive(Debug, Default)]
struct SerialState {
    queue: VecDeque<(Request, oneshot::Sender<(i32, Request)>)>,
    /// A writer is scheduled or running: it drains `queue` until it finds it empty.
    writer: bool,
}

/// The pool task that drains a file's queue. Dropped unrun (the runtime shut down), it
/// fails what is queued so no caller waits for a writer that will never come.
struct Writer(Option<Arc<Core>>);

impl Writer {
    fn drain(mut self) {
        let Some(core) = self.0.take() else { return };
        loop {
            let next = {
                let mut state = lock(&core.serial.state);
                match state.queue.pop_front() {
                    Some(next) => next,
                    None => {
                        state.writer = false;
                        return;
                    }
                }
            };
            let (mut req, done) = next;
            let res = req.execute_sync();
            // The caller may have gone away; the request (and its buffer) drops here then.
            let _ = done.send((res, req));
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(core) = self.0.take() {
            let failed = {
                let mut state = lock(&core.serial.state);
                state.writer = false;
                std::mem::take(&mut state.queue)
            };
            // Dropping the senders answers each waiting caller with an error.
            drop(failed);
        }
    }
}

/// The queue's lock: it guards plain data, which a panic cannot leave half changed.
fn lock(state: &Mutex<SerialState>) -> std::sync::MutexGuard<'_, SerialState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Core {
    pub(crate) fn new(
        fd: OwnedFd,
        engine: Engine,
        max_batch: usize,
        writes_to_pool: bool,
    ) -> Arc<Core> {
        Arc::new(Core {
            fd,
            engine,
            max_batch,
            writes_to_pool,
            serial: SerialWrites::default(),
            writes_in_flight: AtomicUsize::new(0),
            writes_settled: Notify::new(),
        })
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Wait until every modifying request issued so far has completed, including those whose
    /// futures were dropped.
    pub(crate) async fn settle_writes(&self) {
        loop {
            let notified = self.writes_settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.writes_in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Read { offset: u64 },
    Write { offset: u64 },
    DataSync,
    Fallocate { mode: i32, offset: u64, len: u64 },
}

impl Kind {
    fn modifies(&self) -> bool {
        !matches!(self, Kind::Read { .. })
    }
}

/// An operation plus the resources the kernel may touch until its completion.
#[derive(Debug)]
pub(crate) struct Request {
    core: Arc<Core>,
    kind: Kind,
    /// Data buffer for reads and writes; `buf[start..]` is transferred.
    buf: Option<IoBuf>,
    start: usize,
}

impl Request {
    /// `start` is where in `buf` the transfer begins (to resume after a short one).
    pub(crate) fn new(core: &Arc<Core>, kind: Kind, buf: Option<IoBuf>, start: usize) -> Request {
        if kind.modifies() {
            core.writes_in_flight.fetch_add(1, Ordering::AcqRel);
        }
        Request {
            core: Arc::clone(core),
            kind,
            buf,
            start,
        }
    }

    /// A write of at least [`POOL_WRITE_MIN`] bytes.
    fn is_large_write(&self) -> bool {
        matches!(self.kind, Kind::Write { .. })
            && self
                .buf
                .as_ref()
                .is_some_and(|b| b.len() - self.start.min(b.len()) >= POOL_WRITE_MIN)
    }

    /// See `OpenOptions::max_batch`.
    pub(crate) fn max_batch(&self) -> usize {
        self.core.max_batch
    }

    pub(crate) fn take_buf(&mut self) -> Option<IoBuf> {
        self.buf.take()
    }

    fn buf_ptr_len(&mut self) -> (*mut u8, usize) {
        let start = self.start;
        match self.buf.as_mut() {
            Some(b) => {
                let start = start.min(b.len());
                let rest = &mut b.as_mut_slice()[start..];
                (rest.as_mut_ptr(), rest.len())
            }
            None => (std::ptr::null_mut(), 0),
        }
    }

    /// The submission entry for this request; the buffer it points to lives in `self`.
    pub(crate) fn build_sqe(&mut self) -> io::Result<squeue::Entry> {
        let fd = types::Fd(self.core.raw_fd());
        let (ptr, len) = self.buf_ptr_len();
        let len32 = u32::try_from(len).map_err(|_| io::Error::other("request too large"))?;
        Ok(match self.kind {
            Kind::Read { offset } => opcode::Read::new(fd, ptr, len32).offset(offset).build(),
            Kind::Write { offset } => opcode::Write::new(fd, ptr, len32).offset(offset).build(),
            Kind::DataSync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Kind::Fallocate { mode, offset, len } => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(mode)
                .build(),
        })
    }

    /// Perform the request with a plain system call; returns the result the way a CQE
    /// would (non-negative on success, negated errno on failure).
    pub(crate) fn execute_sync(&mut self) -> i32 {
        let fd = self.core.raw_fd();
        let (ptr, len) = self.buf_ptr_len();
        loop {
            // Safety: the buffer pointer and length describe memory owned by `self.buf`; the
            // other calls take plain integers and a descriptor `self.core` keeps open.
            let ret: i64 = unsafe {
                match self.kind {
                    Kind::Read { offset } => {
                        libc::pread(fd, ptr.cast(), len, offset as libc::off_t) as i64
                    }
                    Kind::Write { offset } => {
                        libc::pwrite(fd, ptr.cast(), len, offset as libc::off_t) as i64
                    }
                    Kind::DataSync => libc::fdatasync(fd) as i64,
                    Kind::Fallocate { mode, offset, len } => {
                        libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) as i64
                    }
                }
            };
            if ret >= 0 {
                return i32::try_from(ret).unwrap_or(i32::MAX);
            }
            let errno = io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if errno != libc::EINTR {
                return -errno;
            }
        }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if self.kind.modifies() && self.core.writes_in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.core.writes_settled.notify_waiters();
        }
    }
}

/// Turn a CQE-style result into an `io::Result` of the transferred byte count.
pub(crate) fn check(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

/// Run `req` to completion without blocking the calling async thread; returns the raw
/// result and the request (with its buffer) back.
pub(crate) async fn run(req: Request) -> io::Result<(i32, Request)> {
    let serial = req.core.writes_to_pool && req.is_large_write();
    if req.core.engine != Engine::Threads && !serial {
        if let Some(ring) = ring::current() {
            return Ok(ring::Op::new(ring, req).await);
        }
    }
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if serial => run_serial(&handle, req).await,
        Ok(handle) => handle
            .spawn_blocking(move || {
                let mut req = req;
                let res = req.execute_sync();
                (res, req)
            })
            .await
            .map_err(|e| io::Error::other(format!("I/O worker failed: {e}"))),
        Err(_) => {
            let mut req = req;
            let res = req.execute_sync();
            Ok((res, req))
        }
    }
}

/// Queue a large write for its file's pool writer, starting one if none runs.
async fn run_serial(handle: &tokio::runtime::Handle, req: Request) -> io::Result<(i32, Request)> {
    let core = Arc::clone(&req.core);
    let (done, answer) = oneshot::channel();
    let start_writer = {
        let mut state = lock(&core.serial.state);
        state.queue.push_back((req, done));
        !std::mem::replace(&mut state.writer, true)
    };
    if start_writer {
        let writer = Writer(Some(core));
        handle.spawn_blocking(move || writer.drain());
    }
    answer
        .await
        .map_err(|_| io::Error::other("I/O worker stopped before the write ran"))
}

/// Run a blocking closure off the async thread (inline when there is no runtime).
pub(crate) async fn blocking<T, F>(f: F) -> io::Result<T>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle
            .spawn_blocking(f)
            .await
            .map_err(|e| io::Error::other(format!("I/O worker failed: {e}")))?,
        Err(_) => f(),
    }
}
