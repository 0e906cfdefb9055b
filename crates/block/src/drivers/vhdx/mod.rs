//! `vhdx`: Hyper-V's disks ([`format`] has the structures). A BAT maps each payload block
//! of the disk to a place in the file or to a state without data (not present, zero).
//!
//! Opening an image whose log holds entries (its writer stopped before it cleared them)
//! replays the log first, as QEMU does, and refuses a read-only open then. A new block
//! goes to the end of the file: its data first, a flush, then its BAT entry (one 8-byte
//! write, which a sector write keeps whole), so a crash leaves at worst an unreferenced
//! block. The first write of a session gives the headers new write GUIDs, as the format
//! asks.
//!
//! A differencing image (QEMU opens none) reads what it does not hold from its parent,
//! found through the parent locator (relative path first) and checked against the
//! locator's linkage GUID, or given as `backing`. A block partially present in the child
//! has a sector bitmap saying which sectors are its own. The first write into a block
//! the parent shows through copies the merged block into a new one, then names it fully
//! present: a crash before that leaves the block as it was.

mod create;
pub mod format;

pub use create::VhdxCreate;

use crate::drivers::block_map::{could_not_open, in_block, read_metadata, BackingEdge};
use crate::drivers::fields::le64;
use crate::node::{Child, DriverInfo, Extent, ExtentKind, Node, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use async_trait::async_trait;
use format::*;
use qapi::error::QmpError;
use serde_json::{Map, Value};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The largest log and metadata region blockd reads whole (QEMU makes 1 MiB ones).
const MAX_LOG: u64 = 64 * MIB;
const MAX_METADATA: u64 = 32 * MIB;

struct State {
    bat: Vec<u64>,
    /// Where the next block goes: the file's end.
    end: u64,
    header: Header,
}

pub struct Vhdx {
    file: Arc<Child>,
    backing: BackingEdge,
    meta: Metadata,
    bat_offset: u64,
    state: tokio::sync::Mutex<State>,
    session_started: AtomicBool,
}

/// Where a payload block is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Block {
    Data(u64),
    /// No data, and reads as zeroes: never written, zeroed, unmapped.
    Zero {
        present: bool,
    },
    /// A differencing image's block it does not hold: the parent's data.
    Parent,
    /// A differencing image's block holding the sectors its bitmap (in the sector bitmap
    /// block at `bitmap`) marks; the others are the parent's.
    Partial {
        host: u64,
        bitmap: u64,
    },
}

/// Bits in a sector bitmap block: one per logical sector of its chunk.
const BITMAP_BITS: u64 = 8 * MIB;

impl Vhdx {
    fn block_of(&self, state: &State, pos: u64) -> io::Result<Block> {
        let block = pos / self.meta.block_size;
        let (kind, offset) = bat_entry(state.bat[self.meta.bat_index(block)]);
        let inside = |offset: u64, len: u64| {
            if offset < MIB || offset.saturating_add(len) > state.end {
                return Err(io::Error::other(
                    "vhdx: a BAT entry points outside the file",
                ));
            }
            Ok(offset)
        };
        let differencing = self.meta.parent.is_some();
        match kind {
            BLOCK_FULLY_PRESENT => Ok(Block::Data(inside(offset, self.meta.block_size)?)),
            // The spec lets an undefined block read as anything: the parent's data is
            // what the disk held before.
            BLOCK_NOT_PRESENT | BLOCK_UNDEFINED if differencing => Ok(Block::Parent),
            BLOCK_NOT_PRESENT => Ok(Block::Zero { present: false }),
            BLOCK_UNDEFINED | BLOCK_ZERO | BLOCK_UNMAPPED => Ok(Block::Zero { present: true }),
            BLOCK_PARTIALLY_PRESENT if differencing => {
                let (sb_kind, sb_offset) = bat_entry(state.bat[self.meta.bitmap_index(block)]);
                if sb_kind != BITMAP_PRESENT {
                    return Err(io::Error::other(
                        "vhdx: a partially present block has no sector bitmap",
                    ));
                }
                Ok(Block::Partial {
                    host: inside(offset, self.meta.block_size)?,
                    bitmap: inside(sb_offset, MIB)?,
                })
            }
            BLOCK_PARTIALLY_PRESENT => Err(io::Error::other(
                "vhdx: a partially present block in an image without a parent",
            )),
            _ => Err(io::Error::other("vhdx: a BAT entry has a reserved state")),
        }
    }

    /// Fill `buf` from disk offset `pos`, inside `block`.
    async fn read_block(&self, block: Block, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        let within = pos % self.meta.block_size;
        match block {
            Block::Data(host) => self.file.read(host + within, buf).await,
            Block::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Block::Parent => self.backing.read(pos, buf).await,
            Block::Partial { host, bitmap } => {
                let sector = self.meta.logical_sector;
                let (first, last) = (pos / sector, (pos + buf.len() as u64 - 1) / sector);
                let bit0 = first % BITMAP_BITS;
                let mut bits = vec![0u8; ((bit0 + last - first) / 8 - bit0 / 8 + 1) as usize];
                self.file.read(bitmap + bit0 / 8, &mut bits).await?;
                let own = |s: u64| {
                    let bit = s - first + bit0 % 8;
                    bits[(bit / 8) as usize] >> (bit % 8) & 1 == 1
                };
                let mut done = 0usize;
                while done < buf.len() {
                    let at = pos + done as u64;
                    let here = own(at / sector);
                    let mut end = (at / sector + 1) * sector;
                    while end < pos + buf.len() as u64 && own(end / sector) == here {
                        end += sector;
                    }
                    let n = (end.min(pos + buf.len() as u64) - at) as usize;
                    let part = &mut buf[done..done + n];
                    if here {
                        self.file
                            .read(host + at % self.meta.block_size, part)
                            .await?;
                    } else {
                        self.backing.read(at, part).await?;
                    }
                    done += n;
                }
                Ok(())
            }
        }
    }

    /// Make the parent-backed `block` (Parent or Partial) of the disk's `pos` fully
    /// present, with the `len` bytes at `pos` replaced by `data` (zeroes without): the
    /// merged block is copied into the child, a MiB at a time, flushed, and only then
    /// named fully present in the BAT.
    async fn materialize(
        &self,
        state: &mut State,
        block: Block,
        pos: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> io::Result<()> {
        let size = self.meta.block_size;
        let (start, within) = (pos - pos % size, pos % size);
        let host = match block {
            Block::Partial { host, .. } => host,
            _ => {
                let host = state.end.next_multiple_of(MIB);
                self.file.node().truncate(host + size).await?;
                state.end = host + size;
                host
            }
        };
        let mut piece = vec![0u8; MIB as usize];
        let plain = WriteFlags::default();
        for at in (0..size).step_by(MIB as usize) {
            self.read_block(block, start + at, &mut piece).await?;
            let (from, to) = (within.max(at), (within + len).min(at + MIB));
            if from < to {
                let dst = &mut piece[(from - at) as usize..(to - at) as usize];
                match data {
                    Some(d) => {
                        dst.copy_from_slice(&d[(from - within) as usize..(to - within) as usize])
                    }
                    None => dst.fill(0),
                }
            }
            self.file.write(host + at, &piece, plain).await?;
        }
        self.file.flush().await?;
        self.set_entry(state, pos / size, host | BLOCK_FULLY_PRESENT)
            .await
    }

    /// Write payload block `block`'s BAT entry.
    async fn set_entry(&self, state: &mut State, block: u64, entry: u64) -> io::Result<()> {
        let index = self.meta.bat_index(block);
        self.file
            .write(
                self.bat_offset + index as u64 * 8,
                &entry.to_le_bytes(),
                WriteFlags::default(),
            )
            .await?;
        state.bat[index] = entry;
        Ok(())
    }

    /// Write `header` into one slot, flush, then into the other, each with the next
    /// sequence number: a crash between or during them leaves a good header (a torn one
    /// fails its checksum and the other counts).
    async fn write_headers(&self, state: &mut State, mut header: Header) -> io::Result<()> {
        for at in HEADER_OFFSETS {
            header.sequence = state.header.sequence + 1;
            let bytes = header.to_bytes();
            self.file.write(at, &bytes, WriteFlags::default()).await?;
            self.file.flush().await?;
            state.header = header.clone();
        }
        Ok(())
    }

    /// New file and data write GUIDs before the first change of a session.
    async fn start_session(&self, state: &mut State) -> io::Result<()> {
        if self.session_started.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut guids = [0u8; 32];
        crypto::random(&mut guids).map_err(io::Error::other)?;
        let mut header = state.header.clone();
        header.file_write_guid.copy_from_slice(&guids[..16]);
        header.data_write_guid.copy_from_slice(&guids[16..]);
        self.write_headers(state, header).await?;
        self.session_started.store(true, Ordering::Release);
        Ok(())
    }

    /// A new block at the end of the file for payload block `block`, holding `data` at
    /// `within` (the rest reads as zeroes, as the new file space does).
    async fn allocate(
        &self,
        state: &mut State,
        block: u64,
        within: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let host = state.end.next_multiple_of(MIB);
        let end = host + self.meta.block_size;
        self.file.node().truncate(end).await?;
        state.end = end;
        self.file
            .write(host + within, data, WriteFlags::default())
            .await?;
        // The block is on disk before the BAT names it.
        self.file.flush().await?;
        self.set_entry(state, block, host | BLOCK_FULLY_PRESENT)
            .await
    }
}

#[async_trait(?Send)]
impl Driver for Vhdx {
    fn format_name(&self) -> &'static str {
        "vhdx"
    }

    /// Whole sectors, as QEMU reports it.
    fn size(&self, _node: &Node) -> u64 {
        self.meta.disk_size / 512 * 512
    }

    async fn read(&self, _node: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = in_block(self.meta.block_size, pos, (buf.len() - done) as u64) as usize;
            let block = self.block_of(&*self.state.lock().await, pos)?;
            self.read_block(block, pos, &mut buf[done..done + n])
                .await?;
            done += n;
        }
        Ok(())
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = in_block(self.meta.block_size, pos, (buf.len() - done) as u64) as usize;
            let chunk = &buf[done..done + n];
            let within = pos % self.meta.block_size;
            let mut state = self.state.lock().await;
            self.start_session(&mut state).await?;
            match self.block_of(&state, pos)? {
                Block::Data(host) => {
                    drop(state);
                    self.file
                        .write(host + within, chunk, WriteFlags::default())
                        .await?;
                }
                Block::Zero { .. } => {
                    let block = pos / self.meta.block_size;
                    self.allocate(&mut state, block, within, chunk).await?;
                }
                block => {
                    self.materialize(&mut state, block, pos, n as u64, Some(chunk))
                        .await?
                }
            }
            done += n;
        }
        if flags.fua {
            self.file.flush().await?;
        }
        Ok(())
    }

    /// Blocks with data get zeroes written (the file may punch them); the others read as
    /// zeroes already.
    async fn write_zeroes(
        &self,
        _: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            let pos = offset + done;
            let n = in_block(self.meta.block_size, pos, len - done);
            let mut state = self.state.lock().await;
            match self.block_of(&state, pos)? {
                Block::Data(host) => {
                    self.start_session(&mut state).await?;
                    drop(state);
                    let plain = WriteFlags {
                        no_fallback: flags.no_fallback,
                        may_unmap: flags.may_unmap,
                        ..WriteFlags::default()
                    };
                    self.file
                        .write_zeroes(host + pos % self.meta.block_size, n, plain)
                        .await?;
                }
                Block::Zero { .. } => {}
                // A whole block the parent shows through becomes a zero block; part of
                // one is copied with zeroes in it.
                block => {
                    self.start_session(&mut state).await?;
                    if n == self.meta.block_size {
                        self.set_entry(&mut state, pos / n, BLOCK_ZERO).await?;
                    } else if flags.no_fallback {
                        return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
                    } else {
                        self.materialize(&mut state, block, pos, n, None).await?;
                    }
                }
            }
            done += n;
        }
        if flags.fua {
            self.file.flush().await?;
        }
        Ok(())
    }

    /// Discard is advisory; blocks stay, as in QEMU.
    async fn discard(&self, _: &Node, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        self.file.flush().await
    }

    async fn block_status(&self, node: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        let size = self.size(node);
        if offset >= size {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // A run ends after a chunk's worth of blocks at most; callers come back for more.
        let chunk = self.meta.chunk_ratio() * self.meta.block_size;
        let len = len.min(size - offset).min(chunk - offset % chunk);
        let state = self.state.lock().await;
        let first = self.block_of(&state, offset)?;
        let kind_of = |b: Block| match b {
            Block::Data(_) | Block::Partial { .. } => 0,
            Block::Zero { present } => 1 + u8::from(present),
            Block::Parent => 3,
        };
        let mut run = in_block(self.meta.block_size, offset, len);
        while run < len && kind_of(self.block_of(&state, offset + run)?) == kind_of(first) {
            run += in_block(self.meta.block_size, offset + run, len - run);
        }
        let kind = match first {
            // A partially present block counts as the child's: it reads its own sectors.
            Block::Data(_) | Block::Partial { .. } => ExtentKind::Data,
            Block::Zero { present } => ExtentKind::Zero { allocated: present },
            Block::Parent => ExtentKind::Unallocated,
        };
        Ok(Extent { len: run, kind })
    }

    async fn reopen(&self, _: &Node, writable: bool) -> Result<(), String> {
        self.file.node().set_writable(writable).await
    }

    /// The headers and the BAT are read anew (the log replayed first, as at open, if the
    /// other process left one), and the next write starts a new session with new write
    /// GUIDs. The metadata and the BAT's place must be as this node left them.
    async fn activate(&self, node: &Node) -> Result<(), String> {
        let fresh = Layout::read(&self.file, !node.read_only())
            .await
            .map_err(|e| e.desc)?;
        if fresh.meta != self.meta || fresh.bat_offset != self.bat_offset {
            return Err(crate::active::layout_changed("vhdx", "metadata"));
        }
        *self.state.lock().await = fresh.state;
        self.session_started.store(false, Ordering::Release);
        Ok(())
    }

    /// Resizing is not done here yet.
    async fn truncate(&self, _: &Node, _size: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    fn child_perms(&self, role: &str, perm: Perms, _: Perms, read_only: bool) -> (Perms, Perms) {
        crate::perm::format_child_perms(role, perm, read_only)
    }

    fn supports_backing(&self) -> bool {
        self.meta.parent.is_some()
    }

    async fn set_backing_edge(
        &self,
        _node: &Node,
        backing: Option<Arc<Child>>,
    ) -> Result<(), String> {
        self.backing.set(backing);
        Ok(())
    }

    fn info(&self, _node: &Node) -> DriverInfo {
        let parent = self.meta.parent.as_ref().and_then(|p| p.path());
        DriverInfo {
            cluster_size: Some(self.meta.block_size),
            dirty_flag: Some(false),
            backing_format: parent.as_ref().map(|_| "vhdx".to_string()),
            backing_filename: parent,
            ..DriverInfo::of_storage(&self.file)
        }
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: true,
    hands_over: true,
    names: &["vhdx"],
    open: |o, options| Box::pin(open(o, options)),
};

/// A differencing image's parent: `backing` as given (null: none), else the file its
/// locator names, opened read-only. A vhdx parent must be the one the child was made
/// from: its data write GUID is the locator's `parent_linkage`, or the disk would mix
/// two parents.
async fn open_parent(
    o: &mut Opener<'_>,
    file: &Arc<Child>,
    meta: &Metadata,
    backing_ref: Option<Value>,
    name: &str,
) -> Result<Option<Arc<Child>>, QmpError> {
    let Some(locator) = &meta.parent else {
        return match backing_ref {
            None | Some(Value::Null) => Ok(None),
            Some(_) => Err(QmpError::generic(format!(
                "'{name}' is not a differencing VHDX image: it takes no backing file"
            ))),
        };
    };
    let parent = match backing_ref {
        Some(Value::Null) => return Ok(None),
        Some(reference) => {
            o.open_child(reference, "backing", Perms::NONE, Perms::ALL)
                .await?
        }
        None => {
            let path = locator.path().ok_or_else(|| {
                could_not_open(name, libc::EINVAL, "the parent locator names no path")
            })?;
            o.open_backing_from_header(&file.node(), &path, Some("vhdx"))
                .await?
        }
    };
    if let Some(vhdx) = parent.node().driver_as::<Vhdx>() {
        let linkage = guid_text(&vhdx.state.lock().await.header.data_write_guid);
        let expected = locator.get("parent_linkage").unwrap_or_default();
        // The spec's second linkage names a parent whose GUID changed in a way the writer
        // knew to be safe.
        let also = locator.get("parent_linkage2");
        let matches = |g: &str| linkage.eq_ignore_ascii_case(g);
        if !matches(expected) && !also.is_some_and(matches) {
            return Err(QmpError::generic(format!(
                "The parent of '{name}' is not the disk it was made from: its data write GUID is {linkage}, the child's parent_linkage {expected}"
            )));
        }
    }
    Ok(Some(parent))
}

/// Replay the log's active sequence into the file, then clear the header's log GUID.
async fn replay_log(
    file: &Child,
    header: &Header,
    slot: usize,
    refuse: impl Fn(i32, &str) -> QmpError,
) -> Result<Header, QmpError> {
    let io_err = |e: io::Error| refuse(e.raw_os_error().unwrap_or(libc::EIO), &e.to_string());
    let (offset, length) = (header.log_offset, header.log_length as u64);
    let file_size = file.node().size();
    if offset % MIB != 0 || length % MIB != 0 || length > MAX_LOG || offset + length > file_size {
        return Err(refuse(
            libc::EINVAL,
            "the log lies outside the file or is larger than 64 MiB",
        ));
    }
    let log = read_metadata(file, offset, length as usize, "vhdx log").await?;
    let entries = active_sequence(&log, &header.log_guid);
    let plain = WriteFlags::default();
    for entry in &entries {
        if entry.flushed_file_offset > file_size {
            return Err(refuse(
                libc::EINVAL,
                "the log names data past the end of the file",
            ));
        }
        for (at, write) in &entry.writes {
            match write {
                LogWrite::Data(sector) => file.write(*at, sector, plain).await.map_err(io_err)?,
                LogWrite::Zero(len) => file.write_zeroes(*at, *len, plain).await.map_err(io_err)?,
            }
        }
    }
    if let Some(last) = entries.last() {
        if last.last_file_offset > file.node().size() {
            file.node()
                .truncate(last.last_file_offset)
                .await
                .map_err(io_err)?;
        }
    }
    file.flush().await.map_err(io_err)?;
    tracing::info!(entries = entries.len(), "vhdx: replayed the log");
    // The log is done with: both headers say so.
    let mut clean = header.clone();
    clean.log_guid = [0; 16];
    for i in 0..2 {
        clean.sequence = header.sequence + 1 + i as u64;
        let at = HEADER_OFFSETS[(slot + 1 + i) % 2];
        file.write(at, &clean.to_bytes(), plain)
            .await
            .map_err(io_err)?;
        file.flush().await.map_err(io_err)?;
    }
    Ok(clean)
}

async fn open(
    o: &mut Opener<'_>,
    mut options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let backing_ref = options.remove("backing");
    let file = o.open_file_only(options).await?;
    let Layout {
        meta,
        bat_offset,
        state,
    } = Layout::read(&file, o.may_write()).await?;
    o.claim_position();
    let name = file_name(&file);
    let backing = open_parent(o, &file, &meta, backing_ref, &name).await?;
    Ok(Box::new(Vhdx {
        file,
        backing: BackingEdge::new(backing),
        meta,
        bat_offset,
        state: tokio::sync::Mutex::new(state),
        session_started: AtomicBool::new(false),
    }))
}

/// The name of the file an image is in, for error texts.
fn file_name(file: &Child) -> String {
    let node = file.node();
    node.driver().info(&node).filename
}

/// What the file says of the disk: its metadata, where its BAT is, and the state the data
/// path keeps (the BAT, the current header).
struct Layout {
    meta: Metadata,
    bat_offset: u64,
    state: State,
}

impl Layout {
    /// Read the image in `file`, replaying its log first where `may_write` (else an image
    /// with a log to replay is refused, as QEMU refuses a read-only open of one).
    async fn read(file: &Child, may_write: bool) -> Result<Layout, QmpError> {
        let name = file_name(file);
        let refuse = |errno: i32, why: &str| could_not_open(&name, errno, why);
        let refusal = |r: Refusal| refuse(r.errno, &r.why);
        let file_size = file.node().size();
        let id = read_metadata(file, 0, 8, "vhdx file identifier").await?;
        if id != FILE_SIGNATURE {
            return Err(refuse(libc::EINVAL, "no VHDX file signature"));
        }
        let first = read_metadata(file, HEADER_OFFSETS[0], HEADER_LEN, "vhdx header").await?;
        let second = read_metadata(file, HEADER_OFFSETS[1], HEADER_LEN, "vhdx header").await?;
        let (slot, mut header) = current_header(&first, &second)
            .ok_or_else(|| QmpError::generic("No valid VHDX header found"))?;
        if header.log_version != 0 {
            return Err(refuse(libc::EINVAL, "the log version is not 0"));
        }
        let table = read_metadata(
            file,
            REGION_TABLE_OFFSETS[0],
            REGION_TABLE_LEN,
            "vhdx region table",
        )
        .await?;
        let regions = parse_regions(&table).map_err(refusal)?;
        if header.log_guid != [0; 16] {
            if !may_write {
                return Err(QmpError::generic(format!(
                    "VHDX image file '{name}' opened read-only, but contains a log that needs to be replayed"
                )));
            }
            header = replay_log(file, &header, slot, refuse).await?;
        }
        let (meta_offset, meta_len) = regions.metadata;
        if meta_len > MAX_METADATA
            || meta_offset + meta_len > file_size
            || (meta_len as usize) < METADATA_TABLE_LEN
        {
            return Err(refuse(
                libc::EINVAL,
                "the metadata region lies outside the file",
            ));
        }
        let region = read_metadata(file, meta_offset, meta_len as usize, "vhdx metadata").await?;
        let meta = parse_metadata(&region, |offset, len| {
            let end = (offset as usize).checked_add(len)?;
            (offset as usize >= METADATA_TABLE_LEN || len == 0)
                .then(|| region.get(offset as usize..end).map(<[u8]>::to_vec))
                .flatten()
        })
        .map_err(refusal)?;
        let (bat_offset, bat_len) = regions.bat;
        let entries = meta.bat_entries();
        if entries * 8 > bat_len || bat_offset + entries * 8 > file_size {
            return Err(refuse(
                libc::EINVAL,
                "the BAT region is too small for the disk or lies outside the file",
            ));
        }
        let raw = read_metadata(file, bat_offset, (entries * 8) as usize, "vhdx BAT").await?;
        let bat = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();
        let end = file.node().size();
        Ok(Layout {
            meta,
            bat_offset,
            state: State { bat, end, header },
        })
    }
}
