//! A vhost-user-blk frontend for tests and bench/run: the vhost-user control protocol from
//! rust-vmm's vhost crate (its frontend side, an implementation independent of the
//! backend under test), guest memory in a memfd shared with the backend, and the driver
//! side of split virtqueues written here from the virtio 1.2 specification (2.7).
//!
//! Each queue has fixed request slots: slot i uses descriptors 3i..3i+2 (header, data,
//! status) and its own piece of the data area, so a slot can be resubmitted as soon as it
//! completes (a pipeline at a fixed depth, as bench/run drives it).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vmm_sys_util::eventfd::EventFd;
pub const F_RO: u64 = 1 << VIRTIO_BLK_F_RO;
pub const F_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const DESC_F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
const DESC_F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Each queue's rings live in their own 64 KiB at the start of guest memory.
const RING_AREA: u64 = 64 << 10;
/// How long a request may take before the frontend calls it lost.
const TIMEOUT: Duration = Duration::from_secs(20);

/// The device's config space, as far as tests look at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

/// One request in a slot.
#[derive(Debug, Clone)]
pub struct Request {
    pub kind: u32,
    pub sector: u64,
    /// Bytes the device reads after the header (OUT data, discard segments).
    pub out: Vec<u8>,
    /// Bytes the device may write before the status byte (IN data, GET_ID).
    pub in_len: usize,
}

/// A finished request: its status byte, the used length and what it wrote.
#[derive(Debug, Clone)]
pub struct Completion {
    pub status: u8,
    pub used_len: u32,
    pub data: Vec<u8>,
}

struct Queue {
    size: u16,
    /// Guest-physical (= offset in the memfd) addresses of the rings.
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    last_used: u16,
    call: EventFd,
    kick: EventFd,
    /// Where each slot's data goes, and how long it may be.
    data: u64,
    slot_bytes: u64,
    /// What each slot's request asked for, to read its answer.
    pending: Vec<Option<Pending>>,
}

/// Where a pending request's answer goes: `in_len` bytes at `data`, the status at `status`.
#[derive(Clone, Copy)]
struct Pending {
    in_len: usize,
    data: u64,
    status: u64,
}

/// Counts the device's config-change messages on the backend channel.
#[derive(Default)]
pub struct ConfigChanges(AtomicU32);

impl VhostUserFrontendReqHandler for ConfigChanges {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(0)
    }
}

/// A connected, set-up vhost-user-blk device.
pub struct VhostBlk {
    frontend: Frontend,
    mem: *mut u8,
    mem_len: usize,
    _memfd: OwnedFd,
    queues: Vec<Queue>,
    features: u64,
    event_idx: bool,
    /// The backend channel, when the device offers one.
    backend_channel: Option<FrontendReqHandler<ConfigChanges>>,
    config_changes: Arc<ConfigChanges>,
}

// The mapping is owned by this value; the backend writes to it concurrently only where
// the virtio protocol lets it.
unsafe impl Send for VhostBlk {}

impl Drop for VhostBlk {
    fn drop(&mut self) {
        // Safety: the mapping made in connect, unmapped once.
        unsafe { libc::munmap(self.mem.cast(), self.mem_len) };
    }
}

fn os(e: vhost::Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl VhostBlk {
    /// Connects to the backend at `path` and sets up `queues` queues of `queue_size`
    /// entries, each with `slots` request slots of up to `slot_bytes` data bytes.
    /// `event_idx` negotiates VIRTIO_RING_F_EVENT_IDX when the device offers it.
    pub fn connect(
        path: &Path,
        queues: u16,
        queue_size: u16,
        slot_bytes: u64,
        event_idx: bool,
    ) -> io::Result<VhostBlk> {
        let slots = u64::from(queue_size / 3);
        let data_start = RING_AREA * u64::from(queues);
        let mem_len = (data_start + slot_bytes * slots * u64::from(queues)) as usize;
        // Safety: a name and flags; the fd is checked.
        let fd = unsafe { libc::memfd_create(c"vhost-blk-guest".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // Safety: a fresh fd we own.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Safety: our own fd and length.
        if unsafe { libc::ftruncate(fd, mem_len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // Safety: a shared mapping of the whole memfd.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mem_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if mem == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut frontend = Frontend::connect(path, u64::from(queues)).map_err(os)?;
        frontend.set_owner().map_err(os)?;
        let offered = frontend.get_features().map_err(os)?;
        // The device-type features (bits 0-14, multiqueue among them) as offered.
        let mut features = 1 << VIRTIO_F_VERSION_1
            | F_PROTOCOL_FEATURES
            | (offered & (1 << VIRTIO_BLK_F_MQ | 0x7fff));
        if event_idx {
            features |= offered & F_EVENT_IDX;
        }
        features &= offered;
        frontend.set_features(features).map_err(os)?;
        let protocol = frontend.get_protocol_features().map_err(os)?;
        frontend
            .set_protocol_features(
                protocol
                    & (VhostUserProtocolFeatures::MQ
                        | VhostUserProtocolFeatures::CONFIG
                        | VhostUserProtocolFeatures::REPLY_ACK
                        | VhostUserProtocolFeatures::BACKEND_REQ),
            )
            .map_err(os)?;
        let config_changes = Arc::new(ConfigChanges::default());
        let backend_channel = if protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let mut channel = FrontendReqHandler::new(config_changes.clone())
                .map_err(|e| io::Error::other(e.to_string()))?;
            channel.set_reply_ack_flag(protocol.contains(VhostUserProtocolFeatures::REPLY_ACK));
            frontend
                .set_backend_request_fd(&channel.get_tx_raw_fd())
                .map_err(os)?;
            Some(channel)
        } else {
            None
        };
        let offered_queues = frontend.get_queue_num().map_err(os)?;
        if u64::from(queues) > offered_queues {
            return Err(io::Error::other(format!(
                "device has {offered_queues} queues"
            )));
        }
        frontend
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: mem_len as u64,
                userspace_addr: mem as u64,
                mmap_offset: 0,
                mmap_handle: memfd.as_raw_fd(),
            }])
            .map_err(os)?;
        let mut blk = VhostBlk {
            frontend,
            mem: mem.cast(),
            mem_len,
            _memfd: memfd,
            queues: Vec::new(),
            features,
            event_idx: features & F_EVENT_IDX != 0,
            backend_channel,
            config_changes,
        };
        for q in 0..queues {
            let base = RING_AREA * u64::from(q);
            let size = u64::from(queue_size);
            let desc = base;
            let avail = desc + 16 * size;
            let used = (avail + 6 + 2 * size).next_multiple_of(4);
            assert!(used + 6 + 8 * size <= base + RING_AREA);
            let queue = Queue {
                size: queue_size,
                desc,
                avail,
                used,
                next_avail: 0,
                last_used: 0,
                call: EventFd::new(libc::EFD_NONBLOCK)?,
                kick: EventFd::new(0)?,
                data: data_start + slot_bytes * slots * u64::from(q),
                slot_bytes,
                pending: vec![None; slots as usize],
            };
            let index = usize::from(q);
            let user = mem as u64;
            blk.frontend.set_vring_num(index, queue_size).map_err(os)?;
            blk.frontend
                .set_vring_addr(
                    index,
                    &VringConfigData {
                        queue_max_size: queue_size,
                        queue_size,
                        flags: 0,
                        desc_table_addr: user + desc,
                        used_ring_addr: user + used,
                        avail_ring_addr: user + avail,
                        log_addr: None,
                    },
                )
                .map_err(os)?;
            blk.frontend.set_vring_base(index, 0).map_err(os)?;
            blk.frontend
                .set_vring_call(index, &queue.call)
                .map_err(os)?;
            blk.frontend
                .set_vring_kick(index, &queue.kick)
                .map_err(os)?;
            blk.frontend.set_vring_enable(index, true).map_err(os)?;
            blk.queues.push(queue);
        }
        Ok(blk)
    }

    /// Waits (up to the request timeout) for the device's next config-change message;
    /// false if none came or the device has no backend channel.
    pub fn wait_config_change(&mut self) -> bool {
        let Some(channel) = self.backend_channel.as_mut() else {
            return false;
        };
        let before = self.config_changes.0.load(Ordering::SeqCst);
        let mut pfd = libc::pollfd {
            fd: channel.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Safety: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, TIMEOUT.as_millis() as i32) } > 0;
        ready
            && channel.handle_request().is_ok()
            && self.config_changes.0.load(Ordering::SeqCst) > before
    }

    /// The features both sides agreed on.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The request slots per queue.
    pub fn slots(&self) -> usize {
        self.queues[0].pending.len()
    }

    /// Reads `len` bytes of the config space at `offset`.
    pub fn config_bytes(&mut self, offset: u32, len: u32) -> io::Result<Vec<u8>> {
        let (_, payload) = self
            .frontend
            .get_config(
                offset,
                len,
                VhostUserConfigFlags::WRITABLE,
                &vec![0; len as usize],
            )
            .map_err(os)?;
        Ok(payload.to_vec())
    }

    /// The config space, parsed.
    pub fn config(&mut self) -> io::Result<BlkConfig> {
        let len = std::mem::offset_of!(virtio_blk_config, max_secure_erase_sectors);
        let c = self.config_bytes(0, len as u32)?;
        macro_rules! at {
            ($field:ident, $ty:ty) => {{
                let o = std::mem::offset_of!(virtio_blk_config, $field);
                <$ty>::from_le_bytes(c[o..o + std::mem::size_of::<$ty>()].try_into().unwrap())
            }};
        }
        Ok(BlkConfig {
            capacity: at!(capacity, u64),
            size_max: at!(size_max, u32),
            seg_max: at!(seg_max, u32),
            blk_size: at!(blk_size, u32),
            min_io_size: at!(min_io_size, u16),
            opt_io_size: at!(opt_io_size, u32),
            num_queues: at!(num_queues, u16),
            max_discard_sectors: at!(max_discard_sectors, u32),
            max_discard_seg: at!(max_discard_seg, u32),
            discard_sector_alignment: at!(discard_sector_alignment, u32),
            max_write_zeroes_sectors: at!(max_write_zeroes_sectors, u32),
            max_write_zeroes_seg: at!(max_write_zeroes_seg, u32),
            write_zeroes_may_unmap: at!(write_zeroes_may_unmap, u8),
        })
    }

    fn write_mem(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa as usize + bytes.len() <= self.mem_len);
        // Safety: inside the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.mem.add(gpa as usize), bytes.len())
        };
    }

    fn read_mem(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa as usize + len <= self.mem_len);
        let mut out = vec![0; len];
        // Safety: inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.mem.add(gpa as usize), out.as_mut_ptr(), len) };
        out
    }

    fn write_u16(&self, gpa: u64, value: u16) {
        // Safety: an aligned u16 inside the mapping, shared with the backend.
        unsafe { std::ptr::write_volatile(self.mem.add(gpa as usize).cast::<u16>(), value.to_le()) }
    }

    fn read_u16(&self, gpa: u64) -> u16 {
        // Safety: as write_u16.
        u16::from_le(unsafe { std::ptr::read_volatile(self.mem.add(gpa as usize).cast::<u16>()) })
    }

    fn read_u32(&self, gpa: u64) -> u32 {
        // Safety: an aligned u32 inside the mapping.
        u32::from_le(unsafe { std::ptr::read_volatile(self.mem.add(gpa as usize).cast::<u32>()) })
    }

    fn write_desc(&self, q: &Queue, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.write_mem(q.desc + 16 * u64::from(index), &d);
    }

    /// Puts `request` in `slot` of queue `q` and makes it available (no kick yet).
    pub fn put(&mut self, q: usize, slot: usize, request: &Request) {
        let queue = &self.queues[q];
        let data_len = request.out.len().max(request.in_len) as u64;
        assert!(
            data_len + 32 <= queue.slot_bytes,
            "request too large for a slot"
        );
        let base = queue.data + queue.slot_bytes * slot as u64;
        let (header, data, status) = (base, base + 16, base + 16 + data_len);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&request.kind.to_le_bytes());
        h[8..16].copy_from_slice(&request.sector.to_le_bytes());
        self.write_mem(header, &h);
        self.write_mem(status, &[0xff]);
        let first = (slot * 3) as u16;
        let mut parts = vec![(header, 16u32, 0u16)];
        if !request.out.is_empty() {
            self.write_mem(data, &request.out);
            parts.push((data, request.out.len() as u32, 0));
        }
        if request.in_len > 0 {
            parts.push((data, request.in_len as u32, DESC_F_WRITE));
        }
        parts.push((status, 1, DESC_F_WRITE));
        self.put_chain(q, first, &parts);
        self.queues[q].pending[slot] = Some(Pending {
            in_len: request.in_len,
            data,
            status,
        });
    }

    /// Makes a chain of (address, length, flags) descriptors available, from descriptor
    /// `first` on (for malformed requests too).
    pub fn put_chain(&mut self, q: usize, first: u16, parts: &[(u64, u32, u16)]) {
        let queue = &self.queues[q];
        for (i, &(addr, len, flags)) in parts.iter().enumerate() {
            let index = first + i as u16;
            let last = i + 1 == parts.len();
            let flags = if last { flags } else { flags | DESC_F_NEXT };
            self.write_desc(queue, index, addr, len, flags, index + 1);
        }
        let slot = queue.avail + 4 + 2 * u64::from(queue.next_avail % queue.size);
        self.write_u16(slot, first);
        fence(Ordering::Release);
        let next = queue.next_avail.wrapping_add(1);
        self.write_u16(queue.avail + 2, next);
        self.queues[q].next_avail = next;
    }

    /// Tells the device that queue `q` has new requests.
    pub fn kick(&mut self, q: usize) {
        fence(Ordering::SeqCst);
        self.queues[q].kick.write(1).expect("kick");
    }

    /// Waits for the device to finish at least one request on queue `q`; the finished
    /// slots with what they returned.
    pub fn wait(&mut self, q: usize) -> io::Result<Vec<(usize, Completion)>> {
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            let mut done = Vec::new();
            while let Some((slot, p, used_len, status)) = self.next_used(q) {
                let data = self.read_mem(p.data, p.in_len);
                done.push((
                    slot,
                    Completion {
                        status,
                        used_len,
                        data,
                    },
                ));
            }
            self.publish_used_event(q);
            if !done.is_empty() {
                return Ok(done);
            }
            self.sleep_on_calls(q..q + 1, deadline)?;
        }
    }

    /// Waits until some queue has finished requests; each finished (queue, slot, status),
    /// without copying data out (bench/run's driver, which resubmits them at once).
    pub fn wait_any(&mut self, done: &mut Vec<(usize, usize, u8)>) -> io::Result<()> {
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            for q in 0..self.queues.len() {
                while let Some((slot, _, _, status)) = self.next_used(q) {
                    done.push((q, slot, status));
                }
                self.publish_used_event(q);
            }
            if !done.is_empty() {
                return Ok(());
            }
            self.sleep_on_calls(0..self.queues.len(), deadline)?;
        }
    }

    /// Sleeps until the device signals one of `queues` (at most a second), or fails past
    /// `deadline`. A device gone away shows as a hang-up on the control socket; the
    /// deadline covers it.
    fn sleep_on_calls(
        &self,
        queues: std::ops::Range<usize>,
        deadline: std::time::Instant,
    ) -> io::Result<()> {
        if std::time::Instant::now() > deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no completion"));
        }
        let mut fds: Vec<libc::pollfd> = self.queues[queues.clone()]
            .iter()
            .map(|q| libc::pollfd {
                fd: q.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // Safety: valid pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        for (queue, fd) in self.queues[queues].iter().zip(&fds) {
            if fd.revents != 0 {
                let _ = queue.call.read();
            }
        }
        Ok(())
    }

    /// Takes the next finished request off queue `q`'s used ring: its slot, what it asked
    /// for, its used length and its status byte.
    fn next_used(&mut self, q: usize) -> Option<(usize, Pending, u32, u8)> {
        let queue = &self.queues[q];
        let used_idx = self.read_u16(queue.used + 2);
        fence(Ordering::Acquire);
        if used_idx == queue.last_used {
            return None;
        }
        let elem = queue.used + 4 + 8 * u64::from(queue.last_used % queue.size);
        let slot = self.read_u32(elem) as usize / 3;
        let used_len = self.read_u32(elem + 4);
        let p = queue
            .pending
            .get(slot)
            .copied()
            .flatten()
            .expect("unknown id");
        let status = self.read_mem(p.status, 1)[0];
        let queue = &mut self.queues[q];
        queue.pending[slot] = None;
        queue.last_used = queue.last_used.wrapping_add(1);
        Some((slot, p, used_len, status))
    }

    /// With event_idx, sets used_event: interrupt me when the device passes what I have
    /// seen.
    fn publish_used_event(&self, q: usize) {
        if self.event_idx {
            let queue = &self.queues[q];
            self.write_u16(queue.avail + 4 + 2 * u64::from(queue.size), queue.last_used);
        }
    }

    /// Runs `requests` concurrently on queue `q` (one per slot) and returns their
    /// completions in order.
    pub fn run(&mut self, q: usize, requests: &[Request]) -> io::Result<Vec<Completion>> {
        assert!(requests.len() <= self.slots());
        for (slot, request) in requests.iter().enumerate() {
            self.put(q, slot, request);
        }
        self.kick(q);
        let mut out: Vec<Option<Completion>> = vec![None; requests.len()];
        let mut left = requests.len();
        while left > 0 {
            for (slot, completion) in self.wait(q)? {
                out[slot] = Some(completion);
                left -= 1;
            }
        }
        Ok(out.into_iter().map(Option::unwrap).collect())
    }

    /// One request on queue 0.
    pub fn one(&mut self, request: Request) -> io::Result<Completion> {
        Ok(self.run(0, &[request])?.remove(0))
    }

    pub fn read(&mut self, sector: u64, len: usize) -> io::Result<Completion> {
        self.one(Request {
            kind: VIRTIO_BLK_T_IN,
            sector,
            out: Vec::new(),
            in_len: len,
        })
    }

    pub fn write(&mut self, sector: u64, data: &[u8]) -> io::Result<Completion> {
        self.one(Request {
            kind: VIRTIO_BLK_T_OUT,
            sector,
            out: data.to_vec(),
            in_len: 0,
        })
    }

    /// A discard or write-zeroes request of one segment.
    pub fn zero_request(kind: u32, sector: u64, sectors: u32, flags: u32) -> Request {
        let mut segment = Vec::with_capacity(16);
        segment.extend_from_slice(&sector.to_le_bytes());
        segment.extend_from_slice(&sectors.to_le_bytes());
        segment.extend_from_slice(&flags.to_le_bytes());
        Request {
            kind,
            sector: 0,
            out: segment,
            in_len: 0,
        }
    }

    /// The guest address of slot `slot`'s data area on queue `q` (for hand-made chains).
    pub fn slot_addr(&self, q: usize, slot: usize) -> u64 {
        let queue = &self.queues[q];
        queue.data + queue.slot_bytes * slot as u64
    }

    /// Marks `slot` as pending a hand-made chain whose answer is `in_len` bytes at `data`
    /// and a status byte at `status`.
    pub fn expect(&mut self, q: usize, slot: usize, in_len: usize, data: u64, status: u64) {
        self.queues[q].pending[slot] = Some(Pending {
            in_len,
            data,
            status,
        });
    }

    /// Writes raw bytes into guest memory (for hand-made chains).
    pub fn poke(&self, gpa: u64, bytes: &[u8]) {
        self.write_mem(gpa, bytes);
    }
}
