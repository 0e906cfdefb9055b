//! The `vhost-user-blk` export: a node served as a virtio-blk device to a vhost-user
//! frontend (a VMM such as cloud-hypervisor, crosvm or QEMU) over a unix socket, as
//! qemu-storage-daemon's export of that type does.
//!
//! rust-vmm's vhost-user-backend speaks the control protocol (memory table, vrings) on its
//! own threads: one thread reads the frontend's messages, and a few vring workers wait for
//! the frontend's kicks. A worker only pops the available requests and hands each to the
//! I/O thread its queue belongs to, which runs it against the node and puts it on the used
//! ring; so the queues spread over the I/O threads and requests run concurrently, like
//! NBD's. Data is copied between guest memory and pooled buffers in pieces of at most
//! [`PIECE`] bytes, and the bytes in flight per export are bounded, whatever lengths the
//! frontend's descriptors claim.
//!
//! One frontend is served at a time. When it goes away, the export waits for its requests
//! to finish and then takes the next connection, with fresh vrings and memory.

use crate::vhost_relay;
use aio::pool::PoolBuf;
use block::{Child, IoThreads, WriteFlags};
use std::io;
use std::mem::offset_of;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use tokio::sync::Semaphore;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

type GuestMemory = GuestMemoryMmap<()>;
type Mem = GuestMemoryAtomic<GuestMemory>;
type Vring = VringRwLock<Mem>;
type Chain = DescriptorChain<Arc<GuestMemory>>;

/// virtio-blk sectors are 512 bytes whatever the logical block size.
const SECTOR: u64 = 512;
/// The largest queue a frontend may set up.
const MAX_QUEUE_SIZE: usize = 1024;
/// Data segments per request (QEMU's 128 descriptors less header and status).
const SEG_MAX: u32 = 126;
/// Sectors in one discard or write-zeroes request (QEMU's limit, 16 MiB).
const MAX_ZERO_SECTORS: u32 = 32768;
/// A request's data moves through a buffer of at most this many bytes at a time.
const PIECE: usize = 1 << 20;
/// Bytes of request data in flight per export, in [`PERMIT`] units.
const INFLIGHT_BYTES: usize = 64 << 20;
const PERMIT: usize = 4096;
/// What GET_ID answers: qsd's serial for these exports, NUL-terminated when it fits.
const SERIAL: &[u8] = b"vhost_user_blk\0";
/// Bytes of the virtio-blk config space this device fills: up to the secure-erase
/// fields, which it does not offer.
const CONFIG_LEN: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);
/// vhost-user-backend maps queues to its workers with a 64-bit mask.
pub const MAX_QUEUES: u16 = 64;

/// A feature bit as the features word has it.
const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// A status byte (the bindings give statuses as u32).
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Where the export listens (QMP's SocketAddress, of the kinds qsd takes for it).
pub enum Addr {
    /// A unix socket bound at this path (an existing file there is replaced).
    Unix(PathBuf),
    /// A listening unix socket the daemon was given.
    Fd(OwnedFd),
}

/// What block-export-add asks of a vhost-user-blk export.
pub struct VhostUserBlkOptions {
    pub addr: Addr,
    pub writable: bool,
    /// The device's logical block size: a power of two from 512 to 2 MiB.
    pub logical_block_size: u32,
    pub num_queues: u16,
}

/// A listening vhost-user-blk export. Dropping it stops taking connections and
/// disconnects the frontend; requests still running end with EIO once the export's edge
/// is gone.
pub struct VhostUserBlkExport {
    control: Arc<Control>,
}

/// What the export's owner shares with its serving thread.
struct Control {
    /// Wakes the serving thread (waiting for a frontend, or relaying) to end.
    stop: EventNotifier,
    /// The socket the export bound (not one it was handed), removed with the export as
    /// qsd removes it.
    bound: Option<PathBuf>,
}

impl Drop for VhostUserBlkExport {
    fn drop(&mut self) {
        let _ = self.control.stop.notify();
        if let Some(path) = &self.control.bound {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Where vhost-user-backend's handler listens for the relay: a socket in a directory of
/// its own (mode 0700, so no other user can connect first), removed with the export.
struct HandlerSocket {
    dir: PathBuf,
    path: PathBuf,
    listener: Listener,
}

impl HandlerSocket {
    fn new() -> io::Result<HandlerSocket> {
        let dir = nix::unistd::mkdtemp(&std::env::temp_dir().join("blockd-vhost-XXXXXX"))?;
        let path = dir.join("handler.sock");
        let listener = UnixListener::bind(&path).inspect_err(|_| {
            let _ = std::fs::remove_dir(&dir);
        })?;
        Ok(HandlerSocket {
            dir,
            path,
            listener: Listener::from(listener),
        })
    }
}

impl Drop for HandlerSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// What every connection of one export shares.
struct Device {
    edge: Weak<Child>,
    io: Arc<IoThreads>,
    writable: bool,
    block_size: u32,
    num_queues: u16,
    /// The I/O thread of queue 0; queue q runs on the next q-th.
    first_thread: usize,
    inflight_bytes: Semaphore,
}

impl VhostUserBlkExport {
    /// Listens at `options.addr` for a frontend and serves the node behind `edge`.
    pub fn start(
        options: VhostUserBlkOptions,
        edge: Weak<Child>,
        io: Arc<IoThreads>,
    ) -> Result<VhostUserBlkExport, String> {
        let (listener, bound) = match options.addr {
            Addr::Unix(path) => {
                // QEMU too replaces what is at the path.
                let _ = std::fs::remove_file(&path);
                let listener = nbd::listen_unix_private(&path).map_err(|e| {
                    format!(
                        "Failed to bind socket to {}: {}",
                        path.display(),
                        block::os_error_text(&e)
                    )
                })?;
                (listener, Some(path))
            }
            Addr::Fd(fd) => (UnixListener::from(fd), None),
        };
        // A frontend that goes between poll and accept must not block the thread.
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let (stop_consumer, stop) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK).map_err(|e| e.to_string())?;
        let (resized, resize) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK).map_err(|e| e.to_string())?;
        if let Some(edge) = edge.upgrade() {
            edge.on_resize(Box::new(move || {
                let _ = resize.notify();
            }));
        }
        let control = Arc::new(Control { stop, bound });
        let device = Arc::new(Device {
            edge,
            first_thread: io.pick(),
            io,
            writable: options.writable,
            block_size: options.logical_block_size,
            num_queues: options.num_queues,
            inflight_bytes: Semaphore::new(INFLIGHT_BYTES / PERMIT),
        });
        let events = Events {
            stop: stop_consumer,
            resized,
        };
        std::thread::Builder::new()
            .name("blockd-vhost".into())
            .spawn(move || serve(listener, events, device))
            .map_err(|e| e.to_string())?;
        Ok(VhostUserBlkExport { control })
    }
}

/// What the serving thread waits for besides its sockets.
struct Events {
    stop: EventConsumer,
    resized: EventConsumer,
}

/// Accepts one frontend after another until the export is deleted; each is relayed to a
/// fresh vhost-user-backend handler.
fn serve(listener: UnixListener, events: Events, device: Arc<Device>) {
    loop {
        if !wait_readable(&listener, &events.stop) {
            return;
        }
        let frontend = match listener.accept() {
            Ok((frontend, _)) => frontend,
            Err(_) => continue,
        };
        if let Err(e) = frontend.set_nonblocking(false) {
            tracing::warn!("vhost-user-blk export: {e}");
            continue;
        }
        // A handler socket per connection: nothing a failed start left queued on it can
        // meet the next frontend.
        let connected = HandlerSocket::new()
            .and_then(|handler| UnixStream::connect(&handler.path).map(|end| (handler, end)));
        let (mut handler, relay_end) = match connected {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!("vhost-user-blk export: {e}");
                continue;
            }
        };
        let connection = Arc::new(Connection::new(device.clone()));
        let backend = Backend(connection.clone());
        let mut daemon = match VhostUserDaemon::new(
            "blockd-vhost-user".into(),
            backend,
            GuestMemoryAtomic::new(GuestMemory::new()),
        ) {
            Ok(daemon) => daemon,
            Err(e) => {
                tracing::warn!("vhost-user-blk export: {e}");
                return;
            }
        };
        let started = daemon.start(&mut handler.listener);
        // Accepted (or not): the socket and its directory go at once, so that no daemon
        // that stops, even by a kill, leaves them behind.
        drop(handler);
        if let Err(e) = started {
            tracing::warn!("vhost-user-blk export: {e}");
            continue;
        }
        vhost_relay::run(frontend, relay_end, &events.resized, &events.stop);
        if let Err(e) = daemon.wait() {
            tracing::info!("vhost-user-blk export: frontend gone: {e}");
        }
        // The next frontend may reuse the same guest memory: nothing of this one's may
        // land there after it is gone.
        connection.close();
        connection.drain_all();
        connection.stop_workers();
    }
}

/// Waits until a frontend connects (true) or the export stops (false).
fn wait_readable(listener: &UnixListener, stop: &EventConsumer) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // Safety: two valid pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        return fds[1].revents == 0 && fds[0].revents & libc::POLLIN != 0;
    }
}

/// Requests of one queue that have not completed, so that GET_VRING_BASE and a
/// disconnection can wait for them.
#[derive(Default)]
struct Inflight {
    count: Mutex<usize>,
    zero: Condvar,
}

impl Inflight {
    fn wait_zero(&self) {
        let mut count = self.count.lock().unwrap();
        while *count > 0 {
            count = self.zero.wait(count).unwrap();
        }
    }
}

/// Counts a request in flight until dropped (finished, or dropped unrun at shutdown).
struct InflightGuard(Arc<Connection>, usize);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let inflight = &self.0.inflight[self.1];
        let mut count = inflight.count.lock().unwrap();
        *count -= 1;
        if *count == 0 {
            inflight.zero.notify_all();
        }
    }
}

/// One frontend's session: its memory, its negotiated features, its workers.
struct Connection {
    device: Arc<Device>,
    mem: Mutex<Option<Mem>>,
    event_idx: AtomicBool,
    inflight: Vec<Inflight>,
    queues: Vec<QueueTask>,
    /// The frontend went away: queue tasks end.
    closed: AtomicBool,
    workers: usize,
    /// Wakes each vring worker to exit.
    exits: Mutex<Vec<EventNotifier>>,
}

impl Connection {
    fn new(device: Arc<Device>) -> Connection {
        let queues = usize::from(device.num_queues);
        Connection {
            workers: queues.min(device.io.count()).max(1),
            inflight: (0..queues).map(|_| Inflight::default()).collect(),
            queues: (0..queues).map(|_| QueueTask::default()).collect(),
            closed: AtomicBool::new(false),
            device,
            mem: Mutex::new(None),
            event_idx: AtomicBool::new(false),
            exits: Mutex::new(Vec::new()),
        }
    }

    fn drain_all(&self) {
        for queue in &self.inflight {
            queue.wait_zero();
        }
    }

    fn stop_workers(&self) {
        for exit in self.exits.lock().unwrap().drain(..) {
            let _ = exit.notify();
        }
    }

    /// The config space (virtio_blk_config, little-endian) as it is now: the capacity
    /// follows the node's size.
    fn config(&self) -> [u8; CONFIG_LEN] {
        let device = &self.device;
        let capacity = device.edge.upgrade().map_or(0, |e| e.node().size()) / SECTOR;
        let block_sectors = device.block_size / SECTOR as u32;
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            c[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        macro_rules! field {
            ($name:ident) => {
                offset_of!(virtio_blk_config, $name)
            };
        }
        put(field!(capacity), &capacity.to_le_bytes());
        put(field!(seg_max), &SEG_MAX.to_le_bytes());
        put(field!(blk_size), &device.block_size.to_le_bytes());
        put(field!(min_io_size), &1u16.to_le_bytes());
        put(field!(opt_io_size), &1u32.to_le_bytes());
        put(field!(num_queues), &device.num_queues.to_le_bytes());
        put(field!(max_discard_sectors), &MAX_ZERO_SECTORS.to_le_bytes());
        put(field!(max_discard_seg), &1u32.to_le_bytes());
        put(
            field!(discard_sector_alignment),
            &block_sectors.to_le_bytes(),
        );
        put(
            field!(max_write_zeroes_sectors),
            &MAX_ZERO_SECTORS.to_le_bytes(),
        );
        put(field!(max_write_zeroes_seg), &1u32.to_le_bytes());
        // write_zeroes_may_unmap stays 0, as qsd has it: the UNMAP flag is still honoured.
        c
    }

    /// A kick on `queue` (from its vring worker): wakes the queue's task on its I/O thread,
    /// starting it on the first kick.
    fn kick(self: &Arc<Self>, queue: usize, vring: &Vring) {
        let Some(task) = self.queues.get(queue) else {
            return;
        };
        if !task.started.swap(true, Ordering::AcqRel) {
            let connection = self.clone();
            let vring = vring.clone();
            let work: block::Work =
                Box::new(move || Box::pin(connection.serve_queue(queue, vring)));
            let index = self.device.first_thread + queue;
            match self.device.edge.upgrade() {
                Some(edge) => self.device.io.spawn_for_at(&edge.node(), index, work),
                None => self.device.io.spawn_on(index, work),
            }
        }
        task.wake.notify_one();
    }

    /// The task of one queue: after each kick, takes what the frontend made available and
    /// runs each request as a task of this I/O thread.
    async fn serve_queue(self: Arc<Self>, queue: usize, vring: Vring) {
        loop {
            self.queues[queue].wake.notified().await;
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            if let Err(e) = self.pop_requests(queue, &vring) {
                tracing::warn!("vhost-user-blk queue {queue}: {e}");
            }
        }
    }

    fn pop_requests(self: &Arc<Self>, queue: usize, vring: &Vring) -> io::Result<()> {
        let Some(mem) = self
            .mem
            .lock()
            .unwrap()
            .as_ref()
            .map(|m| m.memory().into_inner())
        else {
            return Ok(());
        };
        let event_idx = self.event_idx.load(Ordering::Acquire);
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            loop {
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone());
                let Some(chain) = chain else { break };
                *self.inflight[queue].count.lock().unwrap() += 1;
                let guard = InflightGuard(self.clone(), queue);
                tokio::task::spawn_local(complete(guard, vring.clone(), chain));
            }
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }

    /// The frontend is gone: queue tasks end, and so do the vring workers.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for task in &self.queues {
            task.wake.notify_one();
        }
    }
}

/// Runs one request and puts it on the used ring, telling the frontend unless event_idx
/// says it need not hear yet.
async fn complete(guard: InflightGuard, vring: Vring, chain: Chain) {
    let connection = &guard.0;
    let head = chain.head_index();
    let used = run_request(&connection.device, &chain).await;
    if vring.add_used(head, used).is_ok() {
        let notify = !connection.event_idx.load(Ordering::Acquire)
            || vring.needs_notification().unwrap_or(true);
        if notify {
            let _ = vring.signal_used_queue();
        }
    }
}

/// A queue's task on its I/O thread.
#[derive(Default)]
struct QueueTask {
    started: AtomicBool,
    wake: tokio::sync::Notify,
}

/// The lengths of a request's device-readable and device-writable parts; None for a
/// chain that puts readable descriptors after writable ones.
fn layout(chain: &Chain) -> Option<(u64, u64)> {
    let (mut readable, mut writable) = (0u64, 0u64);
    for desc in chain.clone() {
        let len = u64::from(desc.len());
        if desc.is_write_only() {
            writable += len;
        } else if writable > 0 {
            return None;
        } else {
            readable += len;
        }
    }
    Some((readable, writable))
}

/// Copies `dst.len()` bytes of the chain's readable part, from byte `skip` on.
fn read_guest(chain: &Chain, mut skip: u64, dst: &mut [u8]) -> Result<(), ()> {
    let mem = chain.memory();
    let mut done = 0;
    for desc in chain.clone().take_while(|d| !d.is_write_only()) {
        let len = u64::from(desc.len());
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(dst.len() - done);
        let addr = desc.addr().checked_add(skip).ok_or(())?;
        mem.read_slice(&mut dst[done..done + n], GuestAddress(addr.0))
            .map_err(|_| ())?;
        done += n;
        skip = 0;
        if done == dst.len() {
            return Ok(());
        }
    }
    if done == dst.len() {
        Ok(())
    } else {
        Err(())
    }
}

/// Copies `src` into the chain's writable part, from byte `skip` on.
fn write_guest(chain: &Chain, mut skip: u64, src: &[u8]) -> Result<(), ()> {
    let mem = chain.memory();
    let mut done = 0;
    for desc in chain.clone().filter(|d| d.is_write_only()) {
        if done == src.len() {
            break;
        }
        let len = u64::from(desc.len());
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(src.len() - done);
        let addr = desc.addr().checked_add(skip).ok_or(())?;
        mem.write_slice(&src[done..done + n], GuestAddress(addr.0))
            .map_err(|_| ())?;
        done += n;
        skip = 0;
    }
    if done == src.len() {
        Ok(())
    } else {
        Err(())
    }
}

/// Runs one request and writes its status; the length the used ring reports (bytes
/// written into the request's writable part).
async fn run_request(device: &Device, chain: &Chain) -> u32 {
    let Some((readable, writable)) = layout(chain) else {
        return 0;
    };
    // Every request ends in a status byte the device writes.
    let Some(data_in) = writable.checked_sub(1) else {
        return 0;
    };
    let mut header = [0u8; 16];
    let (status, written) = if readable < 16 || read_guest(chain, 0, &mut header).is_err() {
        (IOERR, 0)
    } else {
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        execute(device, chain, kind, sector, readable - 16, data_in).await
    };
    if write_guest(chain, data_in, &[status]).is_err() {
        return 0;
    }
    u32::try_from(written + 1).unwrap_or(u32::MAX)
}

/// Runs a request of type `kind`; its status and the data bytes written to the guest.
async fn execute(
    device: &Device,
    chain: &Chain,
    kind: u32,
    sector: u64,
    data_out: u64,
    data_in: u64,
) -> (u8, u64) {
    let Some(edge) = device.edge.upgrade() else {
        return (IOERR, 0);
    };
    match kind {
        // The used length of a read counts its whole buffer, failed or not (as qsd's).
        VIRTIO_BLK_T_IN => match transfer(device, &edge, chain, sector, data_in, false).await {
            Ok(()) => (OK, data_in),
            Err(status) => (status, data_in),
        },
        VIRTIO_BLK_T_OUT if !device.writable => (IOERR, 0),
        VIRTIO_BLK_T_OUT => match transfer(device, &edge, chain, sector, data_out, true).await {
            Ok(()) => (OK, 0),
            Err(status) => (status, 0),
        },
        VIRTIO_BLK_T_FLUSH => (status_of(edge.flush().await), 0),
        VIRTIO_BLK_T_GET_ID => {
            // The used length counts the whole ID buffer, as qsd's does.
            let n = (SERIAL.len() as u64).min(data_in) as usize;
            match write_guest(chain, 0, &SERIAL[..n]) {
                Ok(()) => (OK, data_in),
                Err(()) => (IOERR, 0),
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => (
            zero_or_discard(device, &edge, chain, kind, data_out).await,
            0,
        ),
        _ => (UNSUPP, 0),
    }
}

fn status_of(result: io::Result<()>) -> u8 {
    match result {
        Ok(()) => OK,
        Err(_) => IOERR,
    }
}

/// Whether `len` bytes at `offset` are whole logical blocks inside the device.
fn range_ok(device: &Device, edge: &Child, offset: u64, len: u64) -> bool {
    let block = u64::from(device.block_size);
    offset.is_multiple_of(block)
        && len.is_multiple_of(block)
        && offset
            .checked_add(len)
            .is_some_and(|end| end <= edge.node().size())
}

/// Reads (`write` false) or writes `len` bytes at `sector`, a piece at a time, between
/// the node and the request's data buffers.
async fn transfer(
    device: &Device,
    edge: &Child,
    chain: &Chain,
    sector: u64,
    len: u64,
    write: bool,
) -> Result<(), u8> {
    let offset = sector.checked_mul(SECTOR).ok_or(IOERR)?;
    if !range_ok(device, edge, offset, len) {
        return Err(IOERR);
    }
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(PIECE);
        let permits = n.div_ceil(PERMIT) as u32;
        let _permit = device
            .inflight_bytes
            .acquire_many(permits)
            .await
            .map_err(|_| IOERR)?;
        let at = offset + done;
        if let Some(host) = host_range(chain, !write, if write { 16 + done } else { done }, n) {
            // Safety: `host` is `n` bytes of one mapped region of guest memory, which the
            // chain's Arc keeps mapped until it is dropped after this request. The frontend
            // may touch the buffer meanwhile (as with any virtio device, a guest that does
            // gets garbage in its own buffer); blockd treats the bytes as plain data.
            let result = if write {
                let data = unsafe { std::slice::from_raw_parts(host.cast_const(), n) };
                edge.write(at, data, WriteFlags::default()).await
            } else {
                let data = unsafe { std::slice::from_raw_parts_mut(host, n) };
                edge.read(at, data).await
            };
            result.map_err(|_| IOERR)?;
            done += n as u64;
            continue;
        }
        let mut buf = PoolBuf::new(n, 4096).map_err(|_| IOERR)?;
        if write {
            // The readable part holds the 16-byte header first.
            read_guest(chain, 16 + done, buf.as_mut_slice()).map_err(|_| IOERR)?;
            edge.write(at, buf.as_slice(), WriteFlags::default())
                .await
                .map_err(|_| IOERR)?;
        } else {
            edge.read(at, buf.as_mut_slice()).await.map_err(|_| IOERR)?;
            write_guest(chain, done, buf.as_slice()).map_err(|_| IOERR)?;
        }
        done += n as u64;
    }
    Ok(())
}

/// The host address of bytes `skip..skip + len` of the chain's device-readable part
/// (`device_writes` false) or device-writable part, when they lie inside one descriptor
/// and one memory region: then the node reads or writes guest memory in place.
fn host_range(chain: &Chain, device_writes: bool, mut skip: u64, len: usize) -> Option<*mut u8> {
    for desc in chain.clone().filter(|d| d.is_write_only() == device_writes) {
        let desc_len = u64::from(desc.len());
        if skip >= desc_len {
            skip -= desc_len;
            continue;
        }
        if skip + len as u64 > desc_len {
            return None;
        }
        let addr = desc.addr().checked_add(skip)?;
        let slice = chain.memory().get_slice(addr, len).ok()?;
        return Some(slice.ptr_guard_mut().as_ptr());
    }
    None
}

/// A discard or write-zeroes request: one segment (sector, sectors, flags), as the config
/// space's max_*_seg say.
async fn zero_or_discard(
    device: &Device,
    edge: &Child,
    chain: &Chain,
    kind: u32,
    data_out: u64,
) -> u8 {
    if !device.writable {
        return IOERR;
    }
    let mut segment = [0u8; 16];
    if data_out != 16 || read_guest(chain, 16, &mut segment).is_err() {
        return IOERR;
    }
    let sector = u64::from_le_bytes(segment[0..8].try_into().unwrap());
    let sectors = u32::from_le_bytes(segment[8..12].try_into().unwrap());
    let flags = u32::from_le_bytes(segment[12..16].try_into().unwrap());
    let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
    // Discard takes no flags; write-zeroes only UNMAP.
    if (kind == VIRTIO_BLK_T_DISCARD && flags != 0)
        || flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
    {
        return UNSUPP;
    }
    if sectors > MAX_ZERO_SECTORS {
        return IOERR;
    }
    let Some(offset) = sector.checked_mul(SECTOR) else {
        return IOERR;
    };
    let len = u64::from(sectors) * SECTOR;
    if !range_ok(device, edge, offset, len) {
        return IOERR;
    }
    if kind == VIRTIO_BLK_T_DISCARD {
        status_of(edge.discard(offset, len).await)
    } else {
        let flags = WriteFlags {
            may_unmap: unmap,
            ..WriteFlags::default()
        };
        status_of(edge.write_zeroes(offset, len, flags).await)
    }
}

/// The connection as vhost-user-backend sees it.
#[derive(Clone)]
struct Backend(Arc<Connection>);

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.0.device.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut features = [
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_MQ,
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
        ]
        .into_iter()
        .fold(VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), |f, b| {
            f | bit(b)
        });
        if !self.0.device.writable {
            features |= bit(VIRTIO_BLK_F_RO);
        }
        features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.0.config();
        let start = (offset as usize).min(CONFIG_LEN);
        let end = start.saturating_add(size as usize).min(CONFIG_LEN);
        let mut out = config[start..end].to_vec();
        // Fields past those this device fills read as zeroes.
        out.resize(size as usize, 0);
        out
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // The cache mode (wce) stays write-back: flushes are honoured either way.
        Ok(())
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.0.mem.lock().unwrap() = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let workers = self.0.workers;
        (0..workers)
            .map(|w| {
                (w..self.num_queues())
                    .step_by(workers)
                    .fold(0u64, |mask, q| mask | 1 << q)
            })
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()?;
        self.0
            .exits
            .lock()
            .unwrap()
            .push(notifier.try_clone().ok()?);
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(queue) = self.0.inflight.get(queue_index as usize) {
            queue.wait_zero();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        // The worker's vrings are queues thread_id, thread_id + workers, ...
        let index = usize::from(device_event);
        let Some(vring) = vrings.get(index) else {
            return Ok(());
        };
        let queue = thread_id + index * self.0.workers;
        self.0.kick(queue, vring);
        Ok(())
    }
}

/// A listening socket the daemon was handed by number: checked to be a listening unix
/// socket before it is used.
pub fn listening_fd(text: &str) -> Result<OwnedFd, String> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt::AcceptConn, UnixAddr};
    // Named descriptors come from getfd, which only QEMU's monitor has (qsd's text).
    let fd: i32 = text
        .parse()
        .map_err(|_| "only QEMU supports file descriptor passing".to_string())?;
    // Safety: fcntl on any number is harmless; F_GETFD tells whether it is open.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("File descriptor named '{text}' has not been found"));
    }
    // Safety: open, as just checked; only borrowed until it proves to be what we take.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let listening = getsockopt(&borrowed, AcceptConn).unwrap_or(false);
    if !listening || getsockname::<UnixAddr>(fd).is_err() {
        return Err(format!(
            "File descriptor '{text}' is not a listening unix socket"
        ));
    }
    // Safety: the export owns it from here, as QEMU's does.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}
