//! One file operation with everything it needs kept alive until it has really finished.
//!
//! A [`Request`] owns its bounce buffer and a reference to the file, so the kernel (through
//! the thread's io_uring) or a pool thread can finish it even after the future that issued it
//! was dropped. [`run`] picks the current thread's ring when there is one (and the file's
//! engine and file system suit it), else the blocking pool, else (outside any runtime)
//! performs the call inline.

use crate::file::Engine;
use crate::iobuf::IoBuf;
use crate::ring;
use io_uring::{opcode, squeue, types};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

/// Writes from this size on leave the ring for the blocking pool on file systems where
/// the ring serialises them. A job's copies (64 KiB clusters and up) and copy-before-write
/// then run in parallel; small client writes stay on the ring, where a pool hand-off would
/// cost more than the copy (bench/run in RAM: 4 KiB random writes 101k IOPS on the ring,
/// 45k through the pool).
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
    writes_in_flight: AtomicUsize,
    writes_settled: Notify,
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
    let on_ring =
        req.core.engine != Engine::Threads && !(req.core.writes_to_pool && req.is_large_write());
    if on_ring {
        if let Some(ring) = ring::current() {
            return Ok(ring::Op::new(ring, req).await);
        }
    }
    match tokio::runtime::Handle::try_current() {
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
