//! librados and librbd, Ceph's own client libraries, loaded when the first rbd node opens.
//!
//! Loading at run time (as QEMU loads its rbd module) keeps blockd buildable and runnable
//! on machines without Ceph: only opening an rbd node needs `librbd1`. We declare the few
//! C functions we call ourselves rather than depend on a binding crate: the crates that
//! exist link librbd at build time and cover far more than we use.
//!
//! Every blocking call (connect, open, close, resize, snapshots, diff iteration) runs on
//! the blocking pool; reads, writes, discards, write-zeroes and flushes go through librbd's
//! aio completions, whose callbacks run on librbd's threads and wake the waiting future.

use aio::IoBuf;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io;
use std::ptr;
use std::sync::OnceLock;
use tokio::sync::oneshot;

type Rados = *mut c_void;
type Ioctx = *mut c_void;
type Image = *mut c_void;
type Completion = *mut c_void;
type ImageOptions = *mut c_void;
type Callback = unsafe extern "C" fn(Completion, *mut c_void);
type DiffCallback = unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

/// librbd's rbd_snap_info_t.
#[repr(C)]
struct SnapInfo {
    id: u64,
    size: u64,
    name: *const c_char,
}

/// librbd's rbd_image_info_t (its name fields are deprecated and unused here).
#[repr(C)]
struct ImageInfo {
    size: u64,
    obj_size: u64,
    num_objs: u64,
    order: c_int,
    block_name_prefix: [c_char; 24],
    parent_pool: i64,
    parent_name: [c_char; 96],
}

/// librbd's rbd_encryption_luks{1,2}_format_options_t (one layout for both).
#[repr(C)]
struct LuksOptions {
    alg: c_int,
    passphrase: *const c_char,
    passphrase_size: usize,
}

/// The LUKS versions librbd formats and loads (rbd_encryption_format_t).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Luks {
    V1 = 0,
    V2 = 1,
}

/// The data ciphers librbd's LUKS offers (rbd_encryption_algorithm_t).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cipher {
    Aes128 = 0,
    Aes256 = 1,
}

/// Seconds to wait for the monitors at connect, unless the configuration says otherwise.
const MOUNT_TIMEOUT: &str = "20";
/// Seconds a request may wait for its OSD or monitor: longer than an OSD failover
/// (the 20 s heartbeat grace and then peering) takes.
const OP_TIMEOUT: &str = "60";

/// RBD_IMAGE_OPTION_ORDER: log2 of the object size.
const IMAGE_OPTION_ORDER: c_int = 2;
/// RBD_WRITE_ZEROES_FLAG_THICK_PROVISION: zeroes written out rather than unmapped.
const WRITE_ZEROES_THICK: c_int = 1;

macro_rules! library {
    ($($lib:ident => { $($name:ident: $ty:ty;)* })*) => {
        struct Lib {
            $($($name: $ty,)*)*
        }

        fn load() -> Result<Lib, String> {
            $(
                let file = match stringify!($lib) {
                    "librados" => ("librados.so.2", "librados2"),
                    _ => ("librbd.so.1", "librbd1"),
                };
                // Safety: loading runs the library's initializers, which is what linking
                // it would do at start.
                let $lib = unsafe { libloading::Library::new(file.0) }.map_err(|e| {
                    format!("rbd needs Ceph's client library {} (Debian package {}): {e}", file.0, file.1)
                })?;
            )*
            let lib = Lib {
                $($(
                    // Safety: the type is the C prototype from librados.h / librbd.h.
                    $name: unsafe {
                        *$lib
                            .get::<$ty>(concat!(stringify!($name), "\0").as_bytes())
                            .map_err(|e| format!("{}: {e}", stringify!($name)))?
                    },
                )*)*
            };
            // The libraries stay loaded for the life of the process.
            $(std::mem::forget($lib);)*
            Ok(lib)
        }
    };
}

library! {
    librados => {
        rados_create: unsafe extern "C" fn(*mut Rados, *const c_char) -> c_int;
        rados_conf_read_file: unsafe extern "C" fn(Rados, *const c_char) -> c_int;
        rados_conf_set: unsafe extern "C" fn(Rados, *const c_char, *const c_char) -> c_int;
        rados_conf_get: unsafe extern "C" fn(Rados, *const c_char, *mut c_char, usize) -> c_int;
        rados_connect: unsafe extern "C" fn(Rados) -> c_int;
        rados_shutdown: unsafe extern "C" fn(Rados);
        rados_ioctx_create: unsafe extern "C" fn(Rados, *const c_char, *mut Ioctx) -> c_int;
        rados_ioctx_destroy: unsafe extern "C" fn(Ioctx);
        rados_ioctx_set_namespace: unsafe extern "C" fn(Ioctx, *const c_char);
    }
    librbd => {
        rbd_open: unsafe extern "C" fn(Ioctx, *const c_char, *mut Image, *const c_char) -> c_int;
        rbd_open_read_only:
            unsafe extern "C" fn(Ioctx, *const c_char, *mut Image, *const c_char) -> c_int;
        rbd_close: unsafe extern "C" fn(Image) -> c_int;
        rbd_get_size: unsafe extern "C" fn(Image, *mut u64) -> c_int;
        rbd_stat: unsafe extern "C" fn(Image, *mut ImageInfo, usize) -> c_int;
        rbd_resize: unsafe extern "C" fn(Image, u64) -> c_int;
        rbd_invalidate_cache: unsafe extern "C" fn(Image) -> c_int;
        rbd_image_options_create: unsafe extern "C" fn(*mut ImageOptions);
        rbd_image_options_destroy: unsafe extern "C" fn(ImageOptions);
        rbd_image_options_set_uint64: unsafe extern "C" fn(ImageOptions, c_int, u64) -> c_int;
        rbd_create4: unsafe extern "C" fn(Ioctx, *const c_char, u64, ImageOptions) -> c_int;
        rbd_aio_create_completion:
            unsafe extern "C" fn(*mut c_void, Callback, *mut Completion) -> c_int;
        rbd_aio_get_return_value: unsafe extern "C" fn(Completion) -> isize;
        rbd_aio_release: unsafe extern "C" fn(Completion);
        rbd_aio_read: unsafe extern "C" fn(Image, u64, usize, *mut c_char, Completion) -> c_int;
        rbd_aio_write:
            unsafe extern "C" fn(Image, u64, usize, *const c_char, Completion) -> c_int;
        rbd_aio_discard: unsafe extern "C" fn(Image, u64, u64, Completion) -> c_int;
        rbd_aio_write_zeroes:
            unsafe extern "C" fn(Image, u64, usize, Completion, c_int, c_int) -> c_int;
        rbd_aio_flush: unsafe extern "C" fn(Image, Completion) -> c_int;
        rbd_diff_iterate2: unsafe extern "C" fn(
            Image, *const c_char, u64, u64, u8, u8, DiffCallback, *mut c_void) -> c_int;
        rbd_snap_list: unsafe extern "C" fn(Image, *mut SnapInfo, *mut c_int) -> c_int;
        rbd_snap_list_end: unsafe extern "C" fn(*mut SnapInfo);
        rbd_snap_create: unsafe extern "C" fn(Image, *const c_char) -> c_int;
        rbd_snap_remove: unsafe extern "C" fn(Image, *const c_char) -> c_int;
        rbd_encryption_format: unsafe extern "C" fn(Image, c_int, *mut c_void, usize) -> c_int;
        rbd_encryption_load: unsafe extern "C" fn(Image, c_int, *mut c_void, usize) -> c_int;
    }
}

static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();

fn lib() -> Result<&'static Lib, String> {
    LIB.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// The error a negative librados/librbd return value stands for.
pub(super) fn os_error(r: impl Into<i64>) -> io::Error {
    io::Error::from_raw_os_error((-r.into()) as i32)
}

/// A librados/librbd return value as a result.
fn check(r: c_int) -> io::Result<()> {
    if r < 0 {
        return Err(os_error(r));
    }
    Ok(())
}

fn c_string(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("'{s}' contains a NUL byte"))
}

/// Where and as whom to connect (BlockdevOptionsRbd less the image).
#[derive(Clone, Debug, Default)]
pub(super) struct ConnectOptions {
    pub conf: Option<String>,
    pub user: Option<String>,
    pub pool: String,
    pub namespace: Option<String>,
    /// `host:port` of each monitor, for `mon_host`.
    pub mon_host: Option<String>,
    /// The cephx key (base64), from `key-secret`.
    pub key: Option<String>,
    /// `auth_client_required`, as "cephx;none".
    pub auth_client_required: Option<String>,
    /// librbd's own cache (`rbd_cache`): off for `cache.direct`, as QEMU sets it, over
    /// whatever the conf file says.
    pub cache: bool,
}

/// A connected cluster and an I/O context on one pool; shut down when dropped.
pub(super) struct Pool {
    cluster: Rados,
    ioctx: Ioctx,
}

// Safety: librados handles may be used from any thread (librados is thread-safe; QEMU
// uses them from several).
unsafe impl Send for Pool {}
unsafe impl Sync for Pool {}

impl Pool {
    /// Connects (blocking: call it on the blocking pool). Errors are QEMU's texts.
    pub(super) fn connect(o: &ConnectOptions) -> Result<Pool, String> {
        let lib = lib()?;
        let user = o.user.as_deref().map(c_string).transpose()?;
        let mut cluster: Rados = ptr::null_mut();
        // Safety: FFI with valid pointers; `cluster` is shut down on every error path below
        // (by `Pool`'s Drop once it holds it).
        let r = unsafe {
            (lib.rados_create)(
                &mut cluster,
                user.as_ref().map_or(ptr::null(), |u| u.as_ptr()),
            )
        };
        if r < 0 {
            return Err(format!("error initializing: {}", os_error(r)));
        }
        let mut pool = Pool {
            cluster,
            ioctx: ptr::null_mut(),
        };
        let set = |key: &str, value: &str| -> Result<(), String> {
            let (k, v) = (c_string(key)?, c_string(value)?);
            // Safety: valid handle and strings.
            let r = unsafe { (lib.rados_conf_set)(cluster, k.as_ptr(), v.as_ptr()) };
            if r < 0 {
                return Err(format!("error setting {key}: {}", os_error(r)));
            }
            Ok(())
        };
        let get = |key: &str| -> Option<String> {
            let k = c_string(key).ok()?;
            let mut buf = [0 as c_char; 64];
            // Safety: valid handle, string and buffer of the length given.
            let r =
                unsafe { (lib.rados_conf_get)(cluster, k.as_ptr(), buf.as_mut_ptr(), buf.len()) };
            // Safety: on success librados wrote a NUL-terminated string into `buf`.
            (r == 0).then(|| {
                unsafe { CStr::from_ptr(buf.as_ptr()) }
                    .to_string_lossy()
                    .into_owned()
            })
        };
        match &o.conf {
            Some(conf) => {
                let path = c_string(conf)?;
                // Safety: valid handle and string.
                let r = unsafe { (lib.rados_conf_read_file)(cluster, path.as_ptr()) };
                if r < 0 {
                    return Err(format!("error reading conf file {conf}: {}", os_error(r)));
                }
            }
            // The default search path (/etc/ceph/ceph.conf, ...); having none is fine.
            None => unsafe {
                (lib.rados_conf_read_file)(cluster, ptr::null());
            },
        }
        // librados waits five minutes for monitors that do not answer or refuse the
        // credentials, and for ever for an OSD or monitor that stops answering a request.
        // A blockdev-add should fail sooner, and a request should fail (so that the
        // client, or the job's error policy, decides) rather than hang. A value the conf
        // file set stays: only librados's own defaults are replaced (a value set through
        // the API would win over the file's).
        for (key, librados_default, ours) in [
            ("client_mount_timeout", 300.0, MOUNT_TIMEOUT),
            ("rados_osd_op_timeout", 0.0, OP_TIMEOUT),
            ("rados_mon_op_timeout", 0.0, OP_TIMEOUT),
        ] {
            let current = get(key).and_then(|v| v.trim().parse::<f64>().ok());
            if current.is_none_or(|v| v == librados_default) {
                set(key, ours)?;
            }
        }
        if let Some(mon_host) = &o.mon_host {
            set("mon_host", mon_host)?;
        }
        if let Some(key) = &o.key {
            set("key", key)?;
        }
        if let Some(auth) = &o.auth_client_required {
            set("auth_client_required", auth)?;
        }
        set("rbd_cache", if o.cache { "true" } else { "false" })?;
        // Safety: valid handle.
        let r = unsafe { (lib.rados_connect)(cluster) };
        if r < 0 {
            return Err(format!("error connecting: {}", os_error(r)));
        }
        let name = c_string(&o.pool)?;
        // Safety: valid handle and string; `ioctx` is destroyed in Drop.
        let r = unsafe { (lib.rados_ioctx_create)(cluster, name.as_ptr(), &mut pool.ioctx) };
        if r < 0 {
            return Err(format!("error opening pool {}: {}", o.pool, os_error(r)));
        }
        if let Some(ns) = &o.namespace {
            let ns = c_string(ns)?;
            // Safety: valid context and string (librados copies it).
            unsafe { (lib.rados_ioctx_set_namespace)(pool.ioctx, ns.as_ptr()) };
        }
        Ok(pool)
    }

    /// Creates image `name` of `size` bytes with objects of 2^`order` bytes (blocking).
    pub(super) fn create(&self, name: &str, size: u64, order: Option<u32>) -> io::Result<()> {
        let lib = lib().map_err(io::Error::other)?;
        let name = c_string(name).map_err(io::Error::other)?;
        let mut opts: ImageOptions = ptr::null_mut();
        // Safety: FFI with valid pointers; the options are destroyed before returning.
        unsafe {
            (lib.rbd_image_options_create)(&mut opts);
            if let Some(order) = order {
                (lib.rbd_image_options_set_uint64)(opts, IMAGE_OPTION_ORDER, order.into());
            }
            let r = (lib.rbd_create4)(self.ioctx, name.as_ptr(), size, opts);
            (lib.rbd_image_options_destroy)(opts);
            check(r)?;
        }
        Ok(())
    }

    /// Opens image `name` (at `snapshot`, read-only then) on this pool (blocking).
    pub(super) fn open(
        self,
        name: &str,
        snapshot: Option<&str>,
        read_only: bool,
    ) -> io::Result<RbdImage> {
        let lib = lib().map_err(io::Error::other)?;
        let cname = c_string(name).map_err(io::Error::other)?;
        let snap = snapshot
            .map(c_string)
            .transpose()
            .map_err(io::Error::other)?;
        let snap_ptr = snap.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let mut image: Image = ptr::null_mut();
        let open = if read_only {
            lib.rbd_open_read_only
        } else {
            lib.rbd_open
        };
        // Safety: valid context and strings; the image is closed in Drop.
        let r = unsafe { open(self.ioctx, cname.as_ptr(), &mut image, snap_ptr) };
        check(r)?;
        Ok(RbdImage { image, _pool: self })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Ok(lib) = lib() {
            // Safety: handles from this Pool, released once.
            unsafe {
                if !self.ioctx.is_null() {
                    (lib.rados_ioctx_destroy)(self.ioctx);
                }
                (lib.rados_shutdown)(self.cluster);
            }
        }
    }
}

/// An open image (with the connection it needs); closed when dropped.
pub(super) struct RbdImage {
    image: Image,
    _pool: Pool,
}

// Safety: librbd image handles are thread-safe for every call we make.
unsafe impl Send for RbdImage {}
unsafe impl Sync for RbdImage {}

impl Drop for RbdImage {
    fn drop(&mut self) {
        if let Ok(lib) = lib() {
            // Safety: the handle is ours, closed once, and no request is in flight (each
            // holds the image through the node, which is being dropped).
            unsafe { (lib.rbd_close)(self.image) };
        }
    }
}

/// What an aio completion hands back to the waiting future.
struct Pending {
    done: oneshot::Sender<(isize, Option<IoBuf>)>,
    /// The request's buffer, owned here until librbd is done with it, whatever happens to
    /// the future that issued it.
    buf: Option<IoBuf>,
}

unsafe extern "C" fn completed(c: Completion, arg: *mut c_void) {
    // Safety: `arg` is the Box leaked in `RbdImage::aio`, reclaimed exactly once here.
    let pending = unsafe { Box::from_raw(arg as *mut Pending) };
    let ret = match lib() {
        // Safety: `c` is the completion this callback was registered with.
        Ok(lib) => unsafe {
            let ret = (lib.rbd_aio_get_return_value)(c);
            (lib.rbd_aio_release)(c);
            ret
        },
        Err(_) => -(libc::EIO as isize),
    };
    let Pending { done, buf } = *pending;
    // A receiver gone (the future was dropped) drops the buffer here instead.
    let _ = done.send((ret, buf));
}

/// One aio operation: given the completion and the buffer's address, start it.
type Start<'a> = &'a dyn Fn(&Lib, Completion, *mut u8) -> c_int;

impl RbdImage {
    async fn aio(
        &self,
        buf: Option<IoBuf>,
        start: Start<'_>,
    ) -> io::Result<(isize, Option<IoBuf>)> {
        let lib = lib().map_err(io::Error::other)?;
        let (done, answer) = oneshot::channel();
        let pending = Box::into_raw(Box::new(Pending { done, buf }));
        // Safety: `pending` is valid until the callback reclaims it, or until we do below
        // when the operation never started. The buffer's bytes live in the pool, not in the
        // Box, so the address stays valid while librbd uses it.
        unsafe {
            let data = (*pending)
                .buf
                .as_mut()
                .map_or(ptr::null_mut(), |b| b.as_mut_slice().as_mut_ptr());
            let mut c: Completion = ptr::null_mut();
            let r = (lib.rbd_aio_create_completion)(pending.cast(), completed, &mut c);
            if r < 0 {
                drop(Box::from_raw(pending));
                return Err(os_error(r));
            }
            let r = start(lib, c, data);
            if r < 0 {
                (lib.rbd_aio_release)(c);
                drop(Box::from_raw(pending));
                return Err(os_error(r));
            }
        }
        let (ret, buf) = answer
            .await
            .map_err(|_| io::Error::other("librbd dropped a request"))?;
        if ret < 0 {
            return Err(os_error(ret as i64));
        }
        Ok((ret, buf))
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    pub(super) async fn read(&self, offset: u64, buf: IoBuf) -> io::Result<IoBuf> {
        let len = buf.len();
        let image = self.image;
        let (_, buf) = self
            .aio(Some(buf), &|lib, c, data| unsafe {
                (lib.rbd_aio_read)(image, offset, len, data.cast(), c)
            })
            .await?;
        buf.ok_or_else(|| io::Error::other("librbd lost a buffer"))
    }

    /// Writes `buf` at `offset`.
    pub(super) async fn write(&self, offset: u64, buf: IoBuf) -> io::Result<IoBuf> {
        let len = buf.len();
        let image = self.image;
        let (_, buf) = self
            .aio(Some(buf), &|lib, c, data| unsafe {
                (lib.rbd_aio_write)(image, offset, len, data.cast_const().cast(), c)
            })
            .await?;
        buf.ok_or_else(|| io::Error::other("librbd lost a buffer"))
    }

    pub(super) async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let image = self.image;
        self.aio(None, &|lib, c, _| unsafe {
            (lib.rbd_aio_discard)(image, offset, len, c)
        })
        .await
        .map(drop)
    }

    /// Zeroes `len` bytes at `offset`; `unmap` lets librbd deallocate them.
    pub(super) async fn write_zeroes(
        &self,
        offset: u64,
        len: usize,
        unmap: bool,
    ) -> io::Result<()> {
        let image = self.image;
        let flags = if unmap { 0 } else { WRITE_ZEROES_THICK };
        self.aio(None, &|lib, c, _| unsafe {
            (lib.rbd_aio_write_zeroes)(image, offset, len, c, flags, 0)
        })
        .await
        .map(drop)
    }

    pub(super) async fn flush(&self) -> io::Result<()> {
        let image = self.image;
        self.aio(None, &|lib, c, _| unsafe { (lib.rbd_aio_flush)(image, c) })
            .await
            .map(drop)
    }

    /// The image's size now (librbd keeps it current as other clients resize it).
    pub(super) fn size(&self) -> io::Result<u64> {
        let lib = lib().map_err(io::Error::other)?;
        let mut size = 0;
        // Safety: valid handle and pointer.
        let r = unsafe { (lib.rbd_get_size)(self.image, &mut size) };
        check(r)?;
        Ok(size)
    }

    /// The size of the image's objects (blocking: call on the blocking pool).
    pub(super) fn object_size(&self) -> io::Result<u64> {
        let lib = lib().map_err(io::Error::other)?;
        // Safety: a zeroed plain C struct is a valid value to be filled.
        let mut info: ImageInfo = unsafe { std::mem::zeroed() };
        // Safety: valid handle; `info` has the size librbd is told.
        let r = unsafe { (lib.rbd_stat)(self.image, &mut info, std::mem::size_of::<ImageInfo>()) };
        check(r)?;
        Ok(info.obj_size)
    }

    /// Blocking: call on the blocking pool.
    pub(super) fn resize(&self, size: u64) -> io::Result<()> {
        let lib = lib().map_err(io::Error::other)?;
        // Safety: valid handle.
        let r = unsafe { (lib.rbd_resize)(self.image, size) };
        check(r)
    }

    /// Drops what librbd caches (the image may have changed under an inactive node).
    pub(super) fn invalidate_cache(&self) -> io::Result<()> {
        let lib = lib().map_err(io::Error::other)?;
        // Safety: valid handle.
        let r = unsafe { (lib.rbd_invalidate_cache)(self.image) };
        check(r)
    }

    /// The first run of `[offset, offset + len)` that is allocated or not: `(true, n)` for
    /// `n` allocated bytes at `offset`, `(false, n)` for `n` bytes that read as zeroes
    /// (never written, or discarded). Blocking: call on the blocking pool.
    pub(super) fn allocation(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        struct Walk {
            offset: u64,
            end: u64,
            /// The first allocated extent at or after `offset`, clipped.
            first: Option<(u64, u64)>,
        }
        unsafe extern "C" fn each(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            // Safety: `arg` is the `Walk` on the caller's stack, alive for the whole call.
            let walk = unsafe { &mut *(arg as *mut Walk) };
            if exists == 0 {
                return 0;
            }
            let (start, end) = (off.max(walk.offset), (off + len as u64).min(walk.end));
            if start >= end {
                return 0;
            }
            match &mut walk.first {
                None => walk.first = Some((start, end)),
                // Extents come in order: extend a run that continues, stop at a gap.
                Some((_, run_end)) if start == *run_end => *run_end = end,
                Some(_) => return STOP,
            }
            0
        }
        /// What the callback returns to end the walk early (any negative value does).
        const STOP: c_int = -9000;
        let lib = lib().map_err(io::Error::other)?;
        let mut walk = Walk {
            offset,
            end: offset + len,
            first: None,
        };
        // Safety: valid handle; `walk` outlives the call, which runs the callback inline.
        let r = unsafe {
            (lib.rbd_diff_iterate2)(
                self.image,
                ptr::null(),
                offset,
                len,
                1,
                0,
                each,
                (&mut walk as *mut Walk).cast(),
            )
        };
        if r < 0 && r != STOP {
            return Err(os_error(r));
        }
        Ok(match walk.first {
            None => (false, len),
            Some((start, _)) if start > offset => (false, start - offset),
            Some((_, end)) => (true, end - offset),
        })
    }

    /// The image's snapshots as `(id, name)`.
    pub(super) fn snapshots(&self) -> io::Result<Vec<(u64, String)>> {
        let lib = lib().map_err(io::Error::other)?;
        let mut max: c_int = 16;
        loop {
            let mut snaps: Vec<SnapInfo> = (0..max)
                .map(|_| SnapInfo {
                    id: 0,
                    size: 0,
                    name: ptr::null(),
                })
                .collect();
            // Safety: `snaps` has room for `max` entries; librbd says how many it needs.
            let r = unsafe { (lib.rbd_snap_list)(self.image, snaps.as_mut_ptr(), &mut max) };
            if r == -libc::ERANGE {
                continue;
            }
            check(r)?;
            let list = snaps[..r as usize]
                .iter()
                // Safety: librbd filled these names; they live until rbd_snap_list_end.
                .map(|s| {
                    (
                        s.id,
                        unsafe { CStr::from_ptr(s.name) }
                            .to_string_lossy()
                            .into_owned(),
                    )
                })
                .collect();
            // Safety: the entries rbd_snap_list filled, freed once.
            unsafe { (lib.rbd_snap_list_end)(snaps.as_mut_ptr()) };
            return Ok(list);
        }
    }

    /// Formats the image as a LUKS volume unlocked by `passphrase` (blocking).
    pub(super) fn encryption_format(
        &self,
        luks: Luks,
        cipher: Cipher,
        passphrase: &[u8],
    ) -> io::Result<()> {
        self.encryption(luks, cipher, passphrase, true)
    }

    /// Unlocks a LUKS volume with `passphrase`: from then on reads and writes see the
    /// plain data, and the size is the payload's (blocking).
    pub(super) fn encryption_load(&self, luks: Luks, passphrase: &[u8]) -> io::Result<()> {
        self.encryption(luks, Cipher::Aes256, passphrase, false)
    }

    fn encryption(
        &self,
        luks: Luks,
        cipher: Cipher,
        passphrase: &[u8],
        format: bool,
    ) -> io::Result<()> {
        let lib = lib().map_err(io::Error::other)?;
        let mut opts = LuksOptions {
            alg: cipher as c_int,
            passphrase: passphrase.as_ptr().cast(),
            passphrase_size: passphrase.len(),
        };
        let call = if format {
            lib.rbd_encryption_format
        } else {
            lib.rbd_encryption_load
        };
        // Safety: valid handle; `opts` and the passphrase outlive the call.
        let r = unsafe {
            call(
                self.image,
                luks as c_int,
                (&mut opts as *mut LuksOptions).cast(),
                std::mem::size_of::<LuksOptions>(),
            )
        };
        check(r)
    }

    /// Blocking: call on the blocking pool.
    pub(super) fn snap_create(&self, name: &str) -> io::Result<()> {
        let lib = lib().map_err(io::Error::other)?;
        let name = c_string(name).map_err(io::Error::other)?;
        // Safety: valid handle and string.
        let r = unsafe { (lib.rbd_snap_create)(self.image, name.as_ptr()) };
        check(r)
    }

    /// Blocking: call on the blocking pool.
    pub(super) fn snap_remove(&self, name: &str) -> io::Result<()> {
        let lib = lib().map_err(io::Error::other)?;
        let name = c_string(name).map_err(io::Error::other)?;
        // Safety: valid handle and string.
        let r = unsafe { (lib.rbd_snap_remove)(self.image, name.as_ptr()) };
        check(r)
    }
}
