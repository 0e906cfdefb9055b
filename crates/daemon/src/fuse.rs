//! The `fuse` export: a node shown as one regular file mounted over an existing file (the
//! mountpoint), as qemu-storage-daemon's FUSE export does. The FUSE session reads the
//! kernel's requests on its own thread and hands each to an I/O thread, which answers it
//! when the node has; so requests run concurrently, like NBD requests.
//!
//! The file follows the node through its export edge (a mirror pivot, a snapshot); once
//! the export is deleted, requests from processes that still hold the file fail with EIO.

use aio::pool::PoolBuf;
use block::{Child, IoThreads, Perms, WriteFlags};
use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyEmpty, ReplyLseek,
    ReplyOpen, ReplyWrite, Request, TimeOrNow,
};
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

/// The file's attributes are never cached by the kernel: the node's size can change under
/// it (block_resize, a growing write through NBD).
const NO_CACHE: Duration = Duration::ZERO;

/// QMP's FuseExportAllowOther.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllowOther {
    /// Other users may open the file (mount option allow_other).
    On,
    /// Only the daemon's user.
    Off,
    /// allow_other if mounting with it works, else without (QEMU's default).
    Auto,
}

/// What block-export-add asks of a fuse export.
pub struct FuseOptions {
    /// The existing regular file the export is mounted over.
    pub mountpoint: PathBuf,
    /// Writes may go to the node.
    pub writable: bool,
    /// Writes past the end grow the node (and the file may be truncated or extended).
    pub growable: bool,
    /// Who besides the daemon's user may open the file.
    pub allow_other: AllowOther,
}

/// A mounted fuse export; dropping it unmounts (lazily: processes that hold the file keep
/// it until they close it, getting EIO once the export is gone).
pub struct FuseExport {
    mountpoint: std::ffi::CString,
    /// Dropped after `drop` detached the mount: fuser's own unmount then finds nothing.
    _session: fuser::BackgroundSession,
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        // Detached, so the unmount happens also while a process holds the file (fuser's
        // own unmount would fail busy then).
        // Safety: a NUL-terminated path.
        if unsafe { libc::umount2(self.mountpoint.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = io::Error::last_os_error();
            // EPERM: not privileged; fuser's drop unmounts through fusermount3 then.
            if e.raw_os_error() != Some(libc::EPERM) {
                tracing::warn!("fuse export unmount: {e}");
            }
        }
    }
}

impl FuseExport {
    /// Mounts the node behind `edge` at `options.mountpoint`.
    pub fn mount(
        options: &FuseOptions,
        edge: Weak<Child>,
        io: Arc<IoThreads>,
    ) -> Result<FuseExport, String> {
        let path = &options.mountpoint;
        let meta = std::fs::metadata(path).map_err(|e| {
            format!(
                "Failed to stat '{}': {}",
                path.display(),
                block::os_error_text(&e)
            )
        })?;
        if !meta.is_file() {
            return Err(format!("'{}' is not a regular file", path.display()));
        }
        let canonical = path.canonicalize().map_err(|e| e.to_string())?;
        let mountpoint = std::ffi::CString::new(canonical.into_os_string().into_encoded_bytes())
            .map_err(|e| e.to_string())?;
        let now = SystemTime::now();
        // Safety: getuid and getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let file = FileState {
            mode: if options.writable { 0o600 } else { 0o400 },
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
        };
        let make = |allow_other: bool| {
            let fs = ExportFs {
                edge: edge.clone(),
                io: io.clone(),
                writable: options.writable,
                growable: options.growable,
                file: Mutex::new(file),
            };
            let mut mount = vec![
                MountOption::FSName("blockd".into()),
                MountOption::Subtype("blockd".into()),
                MountOption::DefaultPermissions,
            ];
            if allow_other {
                mount.push(MountOption::AllowOther);
            }
            fuser::Session::new(fs, path, &mount).and_then(|s| s.spawn())
        };
        let session = match options.allow_other {
            AllowOther::On => make(true),
            AllowOther::Off => make(false),
            AllowOther::Auto => make(true).or_else(|_| make(false)),
        }
        .map_err(|e| {
            format!(
                "Failed to mount FUSE session to export: {}",
                block::os_error_text(&e)
            )
        })?;
        Ok(FuseExport {
            mountpoint,
            _session: session,
        })
    }
}

/// What the file shows besides the node's size; chmod, chown and utimes change it.
#[derive(Clone, Copy)]
struct FileState {
    mode: u32,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
}

struct ExportFs {
    edge: Weak<Child>,
    io: Arc<IoThreads>,
    writable: bool,
    growable: bool,
    file: Mutex<FileState>,
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn attr(file: &FileState, size: u64) -> FileAttr {
    FileAttr {
        ino: fuser::FUSE_ROOT_ID,
        size,
        blocks: size.div_ceil(512),
        atime: file.atime,
        mtime: file.mtime,
        ctime: file.ctime,
        crtime: file.ctime,
        kind: FileType::RegularFile,
        perm: (file.mode & 0o7777) as u16,
        nlink: 1,
        uid: file.uid,
        gid: file.gid,
        rdev: 0,
        blksize: 512,
        flags: 0,
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl ExportFs {
    /// Runs `work` on an I/O thread with the export's edge, `None` once the export is gone
    /// (the work answers EIO then). Should the daemon stop first, `work` is dropped unrun,
    /// and with it its reply, which fuser answers with EIO.
    fn on_node<F, Fut>(&self, work: F)
    where
        F: FnOnce(Option<Arc<Child>>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let edge = self.edge.clone();
        let work: block::Work =
            Box::new(move || Box::pin(async move { work(edge.upgrade()).await }));
        match self.edge.upgrade() {
            Some(edge) => self.io.spawn_for(&edge.node(), work),
            None => self.io.spawn(work),
        }
    }

    /// close and fsync: the node's data reaches stable storage.
    fn flush_node(&self, reply: ReplyEmpty) {
        self.on_node(move |edge| async move {
            let Some(edge) = edge else {
                return reply.error(libc::EIO);
            };
            match edge.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn state(&self) -> FileState {
        *self.file.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Resizes the node to `size`. An export that does not hold the resize permission
/// (not growable) takes it for the time of the resize, as QEMU does; EPERM when another
/// user of the node does not share it (a job, say).
async fn resize(edge: &Child, size: u64) -> io::Result<()> {
    let node = edge.node();
    let _held = if edge.perm().contains(Perms::RESIZE) {
        None
    } else {
        Some(
            crate::exports::user_edge(&node, Perms::RESIZE, Perms::ALL)
                .map_err(|_| io::Error::from_raw_os_error(libc::EPERM))?,
        )
    };
    let old = node.size();
    node.truncate(size).await?;
    // What the file grew by reads as zeroes even over a backing chain that is longer
    // (QEMU's BDRV_REQ_ZERO_WRITE on the truncate).
    if size > old {
        edge.write_zeroes(old, size - old, WriteFlags::default())
            .await?;
    }
    Ok(())
}

/// Grows the node to `end` if it is shorter (a growable export's write).
async fn grow_to(edge: &Child, end: u64) -> io::Result<()> {
    if end > edge.node().size() {
        resize(edge, end).await?;
    }
    Ok(())
}

impl Filesystem for ExportFs {
    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        if ino != fuser::FUSE_ROOT_ID {
            return reply.error(libc::ENOENT);
        }
        match self.edge.upgrade() {
            Some(edge) => reply.attr(&NO_CACHE, &attr(&self.state(), edge.node().size())),
            None => reply.error(libc::EIO),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        if size.is_some() && !self.writable {
            return reply.error(libc::EACCES);
        }
        let state = {
            let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(mode) = mode {
                file.mode = mode;
            }
            if let Some(uid) = uid {
                file.uid = uid;
            }
            if let Some(gid) = gid {
                file.gid = gid;
            }
            if let Some(t) = atime {
                file.atime = time(t);
            }
            if let Some(t) = mtime {
                file.mtime = time(t);
            }
            file.ctime = SystemTime::now();
            *file
        };
        let Some(size) = size else {
            return match self.edge.upgrade() {
                Some(edge) => reply.attr(&NO_CACHE, &attr(&state, edge.node().size())),
                None => reply.error(libc::EIO),
            };
        };
        self.on_node(move |edge| async move {
            let Some(edge) = edge else {
                return reply.error(libc::EIO);
            };
            match resize(&edge, size).await {
                Ok(()) => reply.attr(&NO_CACHE, &attr(&state, edge.node().size())),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn open(&mut self, _req: &Request<'_>, _ino: u64, _flags: i32, reply: ReplyOpen) {
        // A read-only export refuses writes, not opening for writing (as qsd's).
        // Direct I/O: no page cache in between, so NBD clients and jobs writing the same
        // node are seen at once.
        reply.opened(0, fuser::consts::FOPEN_DIRECT_IO);
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let offset = offset.max(0) as u64;
        self.on_node(move |edge| async move {
            let Some(edge) = edge else {
                return reply.error(libc::EIO);
            };
            let end = edge.node().size();
            let len = (size as u64).min(end.saturating_sub(offset)) as usize;
            // From the I/O thread's buffer pool: no allocation per read.
            let mut buf = match PoolBuf::new(len, 1) {
                Ok(buf) => buf,
                Err(e) => return reply.error(errno(&e)),
            };
            match edge.read(offset, buf.as_mut_slice()).await {
                Ok(()) => reply.data(buf.as_slice()),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        if !self.writable {
            return reply.error(libc::EACCES);
        }
        let offset = offset.max(0) as u64;
        let growable = self.growable;
        let data = data.to_vec();
        self.on_node(move |edge| async move {
            let Some(edge) = edge else {
                return reply.error(libc::EIO);
            };
            let end = offset + data.len() as u64;
            let mut len = data.len();
            if growable {
                if let Err(e) = grow_to(&edge, end).await {
                    return reply.error(errno(&e));
                }
            } else {
                let size = edge.node().size();
                if offset >= size && len > 0 {
                    return reply.error(libc::EIO);
                }
                len = len.min((size - offset.min(size)) as usize);
            }
            match edge
                .write(offset, &data[..len], WriteFlags::default())
                .await
            {
                Ok(()) => reply.written(len as u32),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        self.flush_node(reply);
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _data: bool, reply: ReplyEmpty) {
        self.flush_node(reply);
    }

    /// Punching a hole zeroes and may deallocate, zeroing a range zeroes; plain allocation
    /// only extends a growable file (the node's bytes within it always exist).
    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if !self.writable {
            return reply.error(libc::EACCES);
        }
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 || offset < 0 || length <= 0 {
            return reply.error(libc::EOPNOTSUPP);
        }
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        if punch && !keep_size {
            return reply.error(libc::EINVAL);
        }
        let (offset, length) = (offset as u64, length as u64);
        self.on_node(move |edge| async move {
            let Some(edge) = edge else {
                return reply.error(libc::EIO);
            };
            let end = offset.saturating_add(length);
            let size = edge.node().size();
            if !punch && !zero && offset < size {
                return reply.error(libc::EOPNOTSUPP);
            }
            if end > size && !keep_size {
                if let Err(e) = grow_to(&edge, end).await {
                    return reply.error(errno(&e));
                }
            }
            let size = edge.node().size();
            let end = end.min(size);
            if (punch || zero) && offset < end {
                let flags = WriteFlags {
                    may_unmap: punch,
                    ..WriteFlags::default()
                };
                if let Err(e) = edge.write_zeroes(offset, end - offset, flags).await {
                    return reply.error(errno(&e));
                }
            }
            reply.ok()
        });
    }

    /// The file has no extended attributes (the kernel stops asking after ENOSYS).
    fn getxattr(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _name: &std::ffi::OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(libc::ENOSYS);
    }

    fn listxattr(&mut self, _req: &Request<'_>, _ino: u64, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(libc::ENOSYS);
    }

    /// No ioctls: a regular file answers ENOTTY.
    fn ioctl(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _flags: u32,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(libc::ENOTTY);
    }

    /// SEEK_DATA and SEEK_HOLE from the node's block status (the kernel answers the other
    /// kinds of seek by itself).
    fn lseek(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return reply.error(libc::EINVAL);
        }
        let want_data = whence == libc::SEEK_DATA;
        let offset = offset.max(0) as u64;
        self.on_node(move |edge| async move {
            let Some(edge) = edge else {
                return reply.error(libc::EIO);
            };
            let node = edge.node();
            let size = node.size();
            let mut pos = offset;
            while pos < size {
                let extent = match node.block_status_above(None, pos, size - pos).await {
                    Ok(e) => e,
                    Err(e) => return reply.error(errno(&e)),
                };
                if extent.zero != want_data {
                    return reply.offset(pos as i64);
                }
                pos += extent.len.max(1);
            }
            // Past the last data there is the hole at the end of the file.
            if want_data || offset > size {
                reply.error(libc::ENXIO)
            } else {
                reply.offset(size as i64)
            }
        });
    }
}
