//! `ImageFile`: a host file or block device whose I/O never blocks the calling I/O thread.
//!
//! Data goes through pooled buffers owned by each in-flight request (see `op`), on the
//! thread's io_uring or the blocking pool, never straight into or out of memory the caller
//! only lends: a caller may leak a future it polled (mem::forget is safe), and the kernel
//! would then write into memory freed under it. Owned buffers make that impossible. The
//! slice API copies through them and so takes any alignment; `read_buf` and `write_buf`
//! take the caller's own [`IoBuf`] for the time of the request and spare the copy. Reads past the end of file return
//! zeroes. With `direct` the file is opened O_DIRECT and requests are aligned to the probed
//! logical block size.

use crate::iobuf::IoBuf;
use crate::lock::{self, LockState, Locking, Perms};
use crate::op::{self, check, Core, Kind, Request};
use crate::pool::{PoolBuf, MAX_BUF};
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::storage::PreallocateMode;
use imago::StorageExt;
use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tracing::debug;

/// Request alignment assumed for O_DIRECT when the kernel does not tell.
const DEFAULT_DIRECT_ALIGN: usize = 4096;

/// Where a file's requests run (QEMU's `aio` of the file driver).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Engine {
    /// The ring where it serves the file well: as `Ring`, but large writes to a file on a
    /// file system where io_uring would run them one at a time (tmpfs) go to the blocking
    /// pool. The default when the user did not choose.
    #[default]
    Auto,
    /// The I/O thread's io_uring when it has one, else the blocking pool.
    Ring,
    /// Always the blocking pool (QEMU's aio=threads).
    Threads,
}

/// How to open an [`ImageFile`].
#[derive(Clone, Debug)]
pub struct OpenOptions {
    path: PathBuf,
    writable: bool,
    direct: bool,
    create: bool,
    truncate: bool,
    locking: Locking,
    engine: Engine,
    max_batch: usize,
}

impl OpenOptions {
    /// Read-only, cached I/O, no creation, `locking=auto`.
    pub fn new(path: impl AsRef<Path>) -> OpenOptions {
        OpenOptions {
            path: path.as_ref().to_path_buf(),
            writable: false,
            direct: false,
            create: false,
            truncate: false,
            locking: Locking::Auto,
            engine: Engine::Auto,
            max_batch: 0,
        }
    }

    /// Open for writing too (O_RDWR); without it the descriptor is read-only and the kernel
    /// refuses writes.
    pub fn writable(mut self, writable: bool) -> Self {
        self.writable = writable;
        self
    }

    /// Bypass the host page cache (O_DIRECT).
    pub fn direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }

    /// Create the file if it does not exist (implies writable).
    pub fn create(mut self, create: bool) -> Self {
        self.create = create;
        self
    }

    /// Cut an existing file to length zero on open (implies writable).
    pub fn truncate(mut self, truncate: bool) -> Self {
        self.truncate = truncate;
        self
    }

    /// Whether to take QEMU-compatible lock bytes (the file driver's `locking` option);
    /// `On` fails the open where OFD locks do not work. The locks themselves are taken by
    /// [`ImageFile::set_perms`], not by opening.
    pub fn locking(mut self, locking: Locking) -> Self {
        self.locking = locking;
        self
    }

    /// Where the file's requests run (the file driver's `aio` option).
    pub fn engine(mut self, engine: Engine) -> Self {
        self.engine = engine;
        self
    }

    /// Submit the ring's queued requests once this many are waiting, instead of at the end
    /// of the I/O thread's turn (QEMU's aio-max-batch); 0 for no limit.
    pub fn max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch;
        self
    }

    /// Open the file (the `open` call itself runs off the async thread).
    pub async fn open(self) -> io::Result<ImageFile> {
        op::blocking(move || ImageFile::open_sync(self)).await
    }
}

/// Alignments and size learnt at open time.
struct Geometry {
    block_device: bool,
    req_align: usize,
    discard_align: usize,
    size: u64,
    /// The file system is one whose writes io_uring runs one at a time (see `probe_geometry`).
    serial_ring_writes: bool,
}

/// An open image file or host block device.
pub struct ImageFile {
    core: Arc<Core>,
    path: PathBuf,
    writable: bool,
    direct: bool,
    block_device: bool,
    req_align: usize,
    discard_align: usize,
    /// Cached length; everything that grows or shrinks the file through us updates it.
    size: AtomicU64,
    /// Whether lock bytes are used (locking=on, or auto on a file system with OFD locks).
    locking: bool,
    lock: Mutex<LockState>,
    no_punch_hole: AtomicBool,
    no_zero_range: AtomicBool,
    helper: CommonStorageHelper,
}

impl Drop for ImageFile {
    fn drop(&mut self) {
        let state = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        lock::forget(self.core.raw_fd(), &state);
    }
}

impl fmt::Debug for ImageFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageFile")
            .field("path", &self.path)
            .field("fd", &self.core.raw_fd())
            .field("writable", &self.writable)
            .field("direct", &self.direct)
            .field("req_align", &self.req_align)
            .finish()
    }
}

impl fmt::Display for ImageFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "file:{}", self.path.display())
    }
}

fn unsupported_errno(errno: i32) -> bool {
    // ENOTSUP is EOPNOTSUPP on Linux.
    matches!(
        errno,
        libc::EOPNOTSUPP | libc::ENOSYS | libc::ENODEV | libc::ENXIO | libc::ENOTTY
    )
}

/// `io::Error` for a negated errno, with the kind imago uses to pick fall-backs.
fn fallocate_error(res: i32) -> io::Error {
    if unsupported_errno(-res) {
        io::Error::new(
            io::ErrorKind::Unsupported,
            io::Error::from_raw_os_error(-res),
        )
    } else {
        io::Error::from_raw_os_error(-res)
    }
}

fn overflow() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "offset + length overflows")
}

fn probe_geometry(file: &fs::File, direct: bool) -> io::Result<Geometry> {
    let meta = file.metadata()?;
    let block_device = meta.file_type().is_block_device();
    let fd = file.as_raw_fd();
    let size = if block_device {
        // Safety: plain lseek on a descriptor we own.
        let end = unsafe { libc::lseek(fd, 0, libc::SEEK_END) };
        if end < 0 {
            return Err(io::Error::last_os_error());
        }
        end as u64
    } else {
        meta.len()
    };
    let req_align = if direct {
        direct_alignment(fd, block_device)
    } else {
        1
    };
    // Safety: all-zero is a valid statfs, filled by the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // Safety: valid descriptor and out pointer.
    let statfs_ok = !block_device && unsafe { libc::fstatfs(fd, &mut st) } == 0;
    let fs_block = if block_device {
        req_align
    } else if statfs_ok && st.f_frsize > 0 {
        st.f_frsize as usize
    } else {
        DEFAULT_DIRECT_ALIGN
    };
    // io_uring cannot write to a tmpfs file without blocking, so it hands every write to
    // its io-wq workers, and there writes to one regular file are serialised (hashed by
    // inode) unless the file system declares parallel direct writes, as ext4 and xfs do
    // and tmpfs does not. A backup or mirror target on tmpfs then has one write in flight
    // at a time, and a client's copy-before-write waits behind the job's whole queue
    // (bench/run in RAM: client write p50 during a backup 16 ms against qsd's 0.5 ms;
    // 1.4 ms with the writes on the blocking pool, which runs them in parallel).
    let serial_ring_writes = statfs_ok && st.f_type == libc::TMPFS_MAGIC;
    let discard_align = if fs_block.is_power_of_two() {
        fs_block.max(req_align)
    } else {
        DEFAULT_DIRECT_ALIGN.max(req_align)
    };
    Ok(Geometry {
        block_device,
        req_align,
        discard_align,
        size,
        serial_ring_writes,
    })
}

/// The logical block size that O_DIRECT requests must be aligned to.
fn direct_alignment(fd: RawFd, block_device: bool) -> usize {
    let found = if block_device {
        let mut sector: libc::c_int = 0;
        // Safety: BLKSSZGET writes one int to the pointer.
        let ret = unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut sector as *mut libc::c_int) };
        (ret == 0).then_some(sector as usize)
    } else {
        // Safety: all-zero is a valid statx, filled by the call; the empty path with
        // AT_EMPTY_PATH names `fd` itself.
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        let ret = unsafe {
            libc::statx(
                fd,
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                libc::STATX_DIOALIGN,
                &mut stx,
            )
        };
        (ret == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0)
            .then_some(stx.stx_dio_offset_align as usize)
    };
    match found {
        Some(align) if align.is_power_of_two() => align,
        _ => DEFAULT_DIRECT_ALIGN,
    }
}

impl ImageFile {
    fn open_sync(opts: OpenOptions) -> io::Result<ImageFile> {
        let writable = opts.writable || opts.create || opts.truncate;
        let mut fo = fs::OpenOptions::new();
        fo.read(true)
            .write(writable)
            .create(opts.create)
            .truncate(opts.truncate);
        if opts.direct {
            fo.custom_flags(libc::O_DIRECT);
        }
        let file = fo.open(&opts.path)?;
        let geo = probe_geometry(&file, opts.direct)?;
        let fd: OwnedFd = file.into();
        let locking = match opts.locking {
            Locking::Off => false,
            Locking::On => {
                if !lock::probe(fd.as_raw_fd()) {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "OFD locks are not supported on this file",
                    ));
                }
                true
            }
            Locking::Auto => lock::probe(fd.as_raw_fd()),
        };
        debug!(
            path = %opts.path.display(),
            writable,
            direct = opts.direct,
            req_align = geo.req_align,
            locking,
            "opened image file"
        );
        Ok(ImageFile {
            core: Core::new(
                fd,
                opts.engine,
                opts.max_batch,
                opts.engine == Engine::Auto && geo.serial_ring_writes,
            ),
            path: opts.path,
            writable,
            direct: opts.direct,
            block_device: geo.block_device,
            req_align: geo.req_align,
            discard_align: geo.discard_align,
            size: AtomicU64::new(geo.size),
            locking,
            lock: Mutex::new(LockState::default()),
            no_punch_hole: AtomicBool::new(false),
            no_zero_range: AtomicBool::new(false),
            helper: CommonStorageHelper::default(),
        })
    }

    /// The path the file was opened with (used in lock conflict hints and `Display`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the descriptor is open for writing (asked for, or implied by create or
    /// truncate).
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Whether the file was opened with O_DIRECT, bypassing the host page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Whether this is a host block device rather than a regular file: its size is fixed
    /// (growing fails, shrinking is ignored) and zeroing keeps the size.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Whether lock bytes are taken (locking=on, or auto where OFD locks work).
    pub fn uses_locking(&self) -> bool {
        self.locking
    }

    /// Offset and length alignment of requests (1 unless O_DIRECT).
    pub fn request_alignment(&self) -> usize {
        self.req_align
    }

    /// Length in bytes (cached; kept current by our own writes and truncates).
    pub fn size(&self) -> io::Result<u64> {
        Ok(self.size.load(Ordering::Relaxed))
    }

    /// Read the length anew, after another process may have changed it; a short syscall
    /// (`lseek` to the end, which block devices answer too).
    pub fn refresh_size(&self) -> io::Result<u64> {
        // Safety: a descriptor `self.core` keeps open; lseek takes integers only.
        let end = unsafe { libc::lseek(self.core.raw_fd(), 0, libc::SEEK_END) };
        if end < 0 {
            return Err(io::Error::last_os_error());
        }
        self.size.store(end as u64, Ordering::Relaxed);
        Ok(end as u64)
    }

    /// Bytes allocated on the host (`st_blocks * 512`), QEMU's `actual-size`.
    pub fn allocated_size(&self) -> io::Result<u64> {
        // Safety: all-zero is a valid stat, filled by the call.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // Safety: valid descriptor and out pointer.
        if unsafe { libc::fstat(self.core.raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st.st_blocks as u64 * 512)
    }

    /// Read `buf.len()` bytes at `offset`; the part past the end of file reads as zeroes.
    /// Any offset and length work, also with O_DIRECT.
    pub async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        StorageExt::read(self, buf, offset).await
    }

    /// Write all of `buf` at `offset`, growing the file as needed. Any offset and length
    /// work; with O_DIRECT unaligned edges take a read-modify-write cycle.
    pub async fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        StorageExt::write(self, buf, offset).await
    }

    /// Make `len` bytes at `offset` read as zeroes, growing the file as needed. With
    /// `may_unmap` the range may be deallocated (punched); otherwise it stays allocated.
    /// Falls back to writing zeroes where the file system cannot do either.
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        if may_unmap {
            StorageExt::write_zeroes(self, offset, len).await
        } else {
            StorageExt::write_allocated_zeroes(self, offset, len).await
        }
    }

    /// Like [`write_zeroes`](Self::write_zeroes), but fail with `Unsupported` instead of
    /// writing zeroes where the file system can neither punch nor zero a range.
    pub async fn write_zeroes_no_fallback(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> io::Result<()> {
        if may_unmap {
            self.zero_unmap(offset, len).await
        } else {
            self.zero_allocated(offset, len).await
        }
    }

    /// Deallocate whole file-system blocks inside the range (advisory: where that is not
    /// supported nothing happens). Never changes the file size.
    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        StorageExt::discard(self, offset, len).await
    }

    /// Make written data durable (fdatasync).
    pub async fn flush(&self) -> io::Result<()> {
        let req = Request::new(&self.core, Kind::DataSync, None, 0);
        let (res, _req) = op::run(req).await?;
        check(res).map(|_| ())
    }

    /// Ask the kernel to drop the file's pages from the host page cache, after another
    /// process may have written the file behind it. Dirty pages stay: [`flush`](Self::flush)
    /// first. A blocking syscall that can take a while on a large file: call it from a
    /// blocking thread.
    pub fn drop_page_cache(&self) -> io::Result<()> {
        // Safety: a descriptor `self.core` keeps open; the advice takes integers only.
        let err =
            unsafe { libc::posix_fadvise(self.core.raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        match err {
            0 => Ok(()),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }

    /// How many of the file's pages the host page cache holds, found with mincore over a
    /// read-only shared mapping, one window at a time so the address space used stays
    /// bounded. Blocking, like [`drop_page_cache`](Self::drop_page_cache).
    pub fn cached_pages(&self) -> io::Result<u64> {
        const WINDOW: u64 = 256 << 20;
        // Safety: sysconf takes an integer.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let size = self.refresh_size()?;
        let mut resident = vec![0u8; (WINDOW / page) as usize];
        let mut cached = 0u64;
        let mut offset = 0u64;
        while offset < size {
            let len = (size - offset).min(WINDOW);
            // Safety: a fresh read-only mapping of a range inside the file, unmapped below
            // before anything else can use it.
            let map = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    self.core.raw_fd(),
                    offset as libc::off_t,
                )
            };
            if map == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            // Safety: `map` covers `len` bytes and `resident` has a byte for each page.
            let rc = unsafe { libc::mincore(map, len as usize, resident.as_mut_ptr()) };
            let err = io::Error::last_os_error();
            // Safety: the mapping made above, not used after this.
            unsafe { libc::munmap(map, len as usize) };
            if rc != 0 {
                return Err(err);
            }
            let pages = len.div_ceil(page) as usize;
            cached += resident[..pages].iter().filter(|&&b| b & 1 != 0).count() as u64;
            offset += len;
        }
        Ok(cached)
    }

    /// Set the file length. Block devices cannot change size: growing them fails, other
    /// lengths are accepted without effect, as QEMU does.
    pub async fn truncate(&self, len: u64) -> io::Result<()> {
        if self.block_device {
            let size = self.size.load(Ordering::Relaxed);
            if len > size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "Cannot grow device files",
                ));
            }
            return Ok(());
        }
        let core = Arc::clone(&self.core);
        op::blocking(move || {
            let len = libc::off_t::try_from(len).map_err(|_| overflow())?;
            // Safety: plain ftruncate on a descriptor `core` keeps open.
            if unsafe { libc::ftruncate(core.raw_fd(), len) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
        .await?;
        self.size.store(len, Ordering::Relaxed);
        Ok(())
    }

    /// Whether `offset` starts data (`true`) or a hole (`false`), and how many bytes from
    /// `offset` (at most `len`) share that state. Past the end of file is a hole; files or
    /// file systems without SEEK_DATA report everything as data.
    pub fn block_status(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        if len == 0 {
            return Ok((true, 0));
        }
        let fd = self.core.raw_fd();
        let Ok(start) = libc::off_t::try_from(offset) else {
            return Ok((false, len));
        };
        let seek = |whence| {
            // Safety: lseek with integer arguments on a descriptor `core` keeps open.
            let r = unsafe { libc::lseek(fd, start, whence) };
            if r < 0 {
                Err(io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO))
            } else {
                Ok(r as u64)
            }
        };
        match seek(libc::SEEK_DATA) {
            Ok(data) if data > offset => Ok((false, (data - offset).min(len))),
            Ok(_) => match seek(libc::SEEK_HOLE) {
                Ok(hole) if hole > offset => Ok((true, (hole - offset).min(len))),
                // A hole at `offset` right after SEEK_DATA said data: the file changed
                // under us; one byte of data is a safe answer.
                Ok(_) => Ok((true, 1)),
                Err(_) => Ok((true, len)),
            },
            Err(libc::ENXIO) => Ok((false, len)),
            Err(_) => Ok((true, len)),
        }
    }

    /// Take and share permissions through QEMU-compatible lock bytes (a no-op with locking
    /// off). On conflict the previous locks stay and the error carries a
    /// [`LockConflict`](crate::lock::LockConflict) with QEMU's message and hint.
    pub fn set_perms(&self, held: Perms, shared: Perms) -> io::Result<()> {
        if !self.locking {
            return Ok(());
        }
        let mut state = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.path.to_string_lossy();
        lock::apply(self.core.raw_fd(), &mut state, held, shared, &path)
    }

    /// Wait until every write, write-zeroes and discard issued so far has finished, including
    /// those whose futures were dropped.
    pub async fn settle_writes(&self) {
        self.core.settle_writes().await
    }

    /// Whether the kernel can move `buf`'s bytes at `offset` in place: with O_DIRECT the
    /// address, offset and length must be multiples of the request alignment.
    fn fits_in_place(&self, buf: &IoBuf, offset: u64) -> bool {
        let align = self.req_align;
        !self.direct
            || (buf.addr().is_multiple_of(align)
                && buf.len().is_multiple_of(align)
                && offset.is_multiple_of(align as u64))
    }

    /// Read `buf.len()` bytes at `offset` into `buf` and hand it back; like
    /// [`read_at`](Self::read_at), but where the buffer suits the file (always without
    /// O_DIRECT, and for aligned pieces with it) the kernel fills it in place.
    pub async fn read_buf(&self, mut buf: IoBuf, offset: u64) -> io::Result<IoBuf> {
        if buf.is_empty() {
            return Ok(buf);
        }
        if !self.fits_in_place(&buf, offset) {
            self.read_at(buf.as_mut_slice(), offset).await?;
            return Ok(buf);
        }
        self.read_chunk(offset, buf).await
    }

    /// Write all of `buf` at `offset`, growing the file as needed, and hand the buffer
    /// back; like [`write_at`](Self::write_at), without a copy where the buffer suits the
    /// file.
    pub async fn write_buf(&self, buf: IoBuf, offset: u64) -> io::Result<IoBuf> {
        if buf.is_empty() {
            return Ok(buf);
        }
        if !self.fits_in_place(&buf, offset) {
            self.write_at(buf.as_slice(), offset).await?;
            return Ok(buf);
        }
        let end = offset.checked_add(buf.len() as u64).ok_or_else(overflow)?;
        // As imago's aligned writes: wait for a read-modify-write of an unaligned write
        // that overlaps, and hold off new ones meanwhile.
        let _blocker = StorageExt::weak_write_blocker(self, offset..end).await;
        self.write_chunk(offset, buf).await
    }

    /// Fill all of `buf` (at most `MAX_BUF` bytes, aligned for the file) from `offset`,
    /// zero-filling from the end of file on.
    async fn read_chunk(&self, offset: u64, mut buf: IoBuf) -> io::Result<IoBuf> {
        let len = buf.len();
        let mut done = 0;
        while done < len {
            let pos = offset.checked_add(done as u64).ok_or_else(overflow)?;
            let req = Request::new(&self.core, Kind::Read { offset: pos }, Some(buf), done);
            let (res, mut req) = op::run(req).await?;
            buf = req.take_buf().expect("read requests carry their buffer");
            let n = check(res)?;
            done += n;
            let unaligned_end = self.direct && done % self.req_align != 0;
            if n == 0 || unaligned_end {
                buf.as_mut_slice()[done..].fill(0);
                break;
            }
        }
        Ok(buf)
    }

    /// Write all of `buf` at `offset`.
    async fn write_chunk(&self, offset: u64, mut buf: IoBuf) -> io::Result<IoBuf> {
        let len = buf.len();
        let mut done = 0;
        while done < len {
            let pos = offset.checked_add(done as u64).ok_or_else(overflow)?;
            let req = Request::new(&self.core, Kind::Write { offset: pos }, Some(buf), done);
            let (res, mut req) = op::run(req).await?;
            buf = req.take_buf().expect("write requests carry their buffer");
            let n = check(res)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += n;
            self.size.fetch_max(pos + n as u64, Ordering::Relaxed);
        }
        Ok(buf)
    }

    pub(crate) async fn readv_inner(
        &self,
        mut bufv: IoVectorMut<'_>,
        mut offset: u64,
    ) -> io::Result<()> {
        while !bufv.is_empty() {
            let chunk = bufv.len().min(MAX_BUF as u64);
            let (mut head, tail) = bufv.split_at(chunk);
            let bounce = PoolBuf::new(chunk as usize, self.req_align)?;
            let data = self.read_chunk(offset, bounce.into()).await?;
            head.copy_from_slice(data.as_slice());
            bufv = tail;
            offset = offset.checked_add(chunk).ok_or_else(overflow)?;
        }
        Ok(())
    }

    pub(crate) async fn writev_inner(
        &self,
        mut bufv: IoVector<'_>,
        mut offset: u64,
    ) -> io::Result<()> {
        while !bufv.is_empty() {
            let chunk = bufv.len().min(MAX_BUF as u64);
            let (head, tail) = bufv.split_at(chunk);
            let mut data = PoolBuf::new(chunk as usize, self.req_align)?;
            head.copy_into_slice(data.as_mut_slice());
            self.write_chunk(offset, data.into()).await?;
            bufv = tail;
            offset = offset.checked_add(chunk).ok_or_else(overflow)?;
        }
        Ok(())
    }

    async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let kind = Kind::Fallocate { mode, offset, len };
        let (res, _req) = op::run(Request::new(&self.core, kind, None, 0)).await?;
        if res < 0 {
            Err(fallocate_error(res))
        } else {
            Ok(())
        }
    }

    /// Grow the file to at least `end` bytes, for zeroing past the end of file.
    async fn grow_to(&self, end: u64) -> io::Result<()> {
        if end <= self.size.load(Ordering::Relaxed) {
            return Ok(());
        }
        if self.block_device {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "Cannot grow device files",
            ));
        }
        let core = Arc::clone(&self.core);
        op::blocking(move || {
            // Never shrink: a concurrent write may have grown the file further meanwhile.
            // Safety: fstat/ftruncate on a descriptor `core` keeps open, valid out pointer.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            if unsafe { libc::fstat(core.raw_fd(), &mut st) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let end = libc::off_t::try_from(end).map_err(|_| overflow())?;
            if st.st_size < end && unsafe { libc::ftruncate(core.raw_fd(), end) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
        .await?;
        self.size.fetch_max(end, Ordering::Relaxed);
        Ok(())
    }

    /// Zero by punching a hole (deallocating) where possible, else zero-range.
    pub(crate) async fn zero_unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len).ok_or_else(overflow)?;
        if !self.no_punch_hole.load(Ordering::Relaxed) {
            let inside_end = end.min(self.size.load(Ordering::Relaxed));
            let punched = if offset < inside_end {
                self.fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    inside_end - offset,
                )
                .await
            } else {
                Ok(())
            };
            match punched {
                Ok(()) => return self.grow_to(end).await,
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                    self.no_punch_hole.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        self.zero_allocated(offset, len).await
    }

    /// Zero keeping the range allocated (zero-range); `Unsupported` when the file system
    /// cannot, which makes imago write zeroes instead.
    pub(crate) async fn zero_allocated(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len).ok_or_else(overflow)?;
        if self.no_zero_range.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let mut mode = libc::FALLOC_FL_ZERO_RANGE;
        let mut zero_end = end;
        if self.block_device {
            mode |= libc::FALLOC_FL_KEEP_SIZE;
            zero_end = end.min(self.size.load(Ordering::Relaxed));
        }
        if offset < zero_end {
            if let Err(e) = self.fallocate(mode, offset, zero_end - offset).await {
                if e.kind() == io::ErrorKind::Unsupported {
                    self.no_zero_range.store(true, Ordering::Relaxed);
                }
                return Err(e);
            }
        }
        self.size.fetch_max(zero_end, Ordering::Relaxed);
        self.grow_to(end).await
    }

    /// Punch a hole inside the file; unsupported punching is silently accepted.
    pub(crate) async fn discard_inner(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or_else(overflow)?
            .min(self.size.load(Ordering::Relaxed));
        if offset >= end || self.no_punch_hole.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(mode, offset, end - offset).await {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                self.no_punch_hole.store(true, Ordering::Relaxed);
                Ok(())
            }
            other => other,
        }
    }

    /// Resize for imago, with its preallocation modes.
    pub(crate) async fn resize_inner(
        &self,
        new_size: u64,
        prealloc: PreallocateMode,
    ) -> io::Result<()> {
        let current = self.size.load(Ordering::Relaxed);
        if new_size <= current || self.block_device {
            return self.truncate(new_size).await;
        }
        match prealloc {
            PreallocateMode::None | PreallocateMode::Zero => self.truncate(new_size).await,
            PreallocateMode::Allocate => {
                self.fallocate(0, current, new_size - current).await?;
                self.size.fetch_max(new_size, Ordering::Relaxed);
                Ok(())
            }
            PreallocateMode::WriteData | _ => {
                let mut offset = current;
                while offset < new_size {
                    let chunk = (new_size - offset).min(MAX_BUF as u64);
                    let zeroes = PoolBuf::filled(chunk as usize, self.req_align, 0)?;
                    self.write_chunk(offset, zeroes.into()).await?;
                    offset += chunk;
                }
                Ok(())
            }
        }
    }

    pub(crate) fn discard_alignment(&self) -> usize {
        self.discard_align
    }

    pub(crate) fn storage_helper(&self) -> &CommonStorageHelper {
        &self.helper
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_file_is_shareable_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<ImageFile>();
        shareable::<OpenOptions>();
    }

    #[test]
    fn unsupported_fallocate_errors_get_the_unsupported_kind() {
        assert_eq!(
            fallocate_error(-libc::EOPNOTSUPP).kind(),
            io::ErrorKind::Unsupported
        );
        assert_eq!(
            fallocate_error(-libc::ENODEV).kind(),
            io::ErrorKind::Unsupported
        );
        assert_eq!(
            fallocate_error(-libc::ENOSPC).raw_os_error(),
            Some(libc::ENOSPC)
        );
    }
}
