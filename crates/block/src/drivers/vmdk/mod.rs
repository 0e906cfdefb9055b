//! `vmdk`: VMware's disks. A disk is a row of extents, each flat (the data as is), zero,
//! or sparse (grains a grain directory and grain tables find, see [`sparse`]; the VMDK3
//! extents of ESX's vmfsSparse disks are read as such too; ESXi's seSparse extents, see
//! [`sesparse`], are read only). A
//! monolithic sparse file is one sparse extent with its descriptor inside; otherwise the
//! `file` child is a text descriptor ([`descriptor`]) that names the extent files, opened
//! as children `extents.N` relative to it.
//!
//! A new grain goes to the end of its extent file: its data (and, around a write that
//! covers part of it, the backing file's data) first, a flush, then its entry in both the
//! grain table and the redundant one. A crash leaves at worst an unreferenced grain.
//! streamOptimized extents take each grain once, compressed, as QEMU writes them. The
//! first write of a session gives the disk a new content ID, as QEMU does, so that
//! overlays made from the old content can tell.

mod create;
pub mod descriptor;
pub mod sesparse;
pub mod sparse;

pub use create::{CreateTarget, VmdkCreate};

use crate::drivers::block_map::{in_block, read_metadata, read_zero_past_end, BackingEdge};
use crate::drivers::fields::{le32, le64};
use crate::node::{Child, DriverInfo, Extent, ExtentKind, Node, WriteFlags};
use crate::open::{resolve_backing_path, DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use aio::pool::PoolBuf;
use async_trait::async_trait;
use descriptor::{Descriptor, ExtentType};
use qapi::error::QmpError;
use serde_json::{json, Map, Value};
use sesparse::{SeSparse, SeSparseHeader};
use sparse::{SparseHeader, GTE_ZEROED};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

/// Grain tables kept in memory per extent; a bounded cache, as an extent may have many.
const GT_CACHE: usize = 256;
/// Compressed grains are decompressed whole: at most this large (QEMU's are 64 KiB).
const MAX_COMPRESSED_GRAIN: u64 = 2 << 20;
/// Grain directory entries a disk may have in all (QEMU's limit for one extent: 128 MiB
/// of directory).
const MAX_DIRECTORY_ENTRIES: u64 = 32 << 20;
/// Backing data copied around a new grain in pieces of at most this.
const COPY_CHUNK: u64 = 1 << 20;

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("vmdk: {what}"))
}

/// Where a grain's data is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mapping {
    Data(u64),
    Compressed(u64),
    Zeroed,
    Unallocated,
}

impl Mapping {
    /// Whether `next`, `distance` bytes into the disk after the start of this grain, can
    /// be read in one go with it: data that follows on in the file, or more of the same
    /// kind of nothing.
    fn continues_with(self, next: Mapping, distance: u64) -> bool {
        match (self, next) {
            (Mapping::Data(a), Mapping::Data(b)) => a.checked_add(distance) == Some(b),
            (Mapping::Unallocated, Mapping::Unallocated) | (Mapping::Zeroed, Mapping::Zeroed) => {
                true
            }
            _ => false,
        }
    }
}

struct SparseMeta {
    gd: Vec<u32>,
    rgd: Vec<u32>,
    gts: HashMap<u32, Vec<u32>>,
    /// Where the next grain or table goes: the file's end, sector aligned.
    end: u64,
}

/// A sparse extent's tables.
struct Sparse {
    file: Arc<Child>,
    header: SparseHeader,
    grain: u64,
    gtes: u64,
    zeroed_grain: bool,
    compressed: bool,
    markers: bool,
    /// False where the GD came from a stream's footer: grains appended would land after
    /// the footer, so such an extent is read only.
    writable: bool,
    meta: tokio::sync::Mutex<SparseMeta>,
}

impl Sparse {
    async fn gt<'m>(&self, meta: &'m mut SparseMeta, sector: u32) -> io::Result<&'m mut Vec<u32>> {
        if !meta.gts.contains_key(&sector) {
            if meta.gts.len() >= GT_CACHE {
                meta.gts.clear();
            }
            let mut raw = vec![0u8; (self.gtes * 4) as usize];
            read_zero_past_end(&self.file, sector as u64 * 512, &mut raw).await?;
            meta.gts
                .insert(sector, raw.chunks_exact(4).map(|c| le32(c, 0)).collect());
        }
        Ok(meta.gts.get_mut(&sector).expect("inserted above"))
    }

    /// The grain at extent offset `off`.
    async fn lookup(&self, meta: &mut SparseMeta, off: u64) -> io::Result<Mapping> {
        let grain = off / self.grain;
        let gt_sector = meta
            .gd
            .get((grain / self.gtes) as usize)
            .copied()
            .unwrap_or(0);
        if gt_sector == 0 {
            return Ok(Mapping::Unallocated);
        }
        let entry = self.gt(meta, gt_sector).await?[(grain % self.gtes) as usize];
        Ok(match entry {
            0 => Mapping::Unallocated,
            GTE_ZEROED if self.zeroed_grain => Mapping::Zeroed,
            e if self.compressed => Mapping::Compressed(e as u64 * 512),
            e => Mapping::Data(e as u64 * 512),
        })
    }

    /// Where new grains and tables go from now: past `meta.end` and past the file's end,
    /// which a write to a grain the tables put past the end may have moved.
    fn refresh_end(&self, meta: &mut SparseMeta) {
        meta.end = meta.end.max(self.file.node().size().next_multiple_of(512));
    }

    /// Grow the file to hold `meta.end`.
    async fn grow(&self, meta: &SparseMeta) -> io::Result<()> {
        if meta.end / 512 > u32::MAX as u64 {
            // GT entries are 32-bit sectors: an extent file holds at most 2 TiB.
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        if meta.end > self.file.node().size() {
            self.file.node().truncate(meta.end).await?;
        }
        Ok(())
    }

    /// Make sure the GT for grain directory entry `index` exists: a new (zeroed) GT and
    /// its redundant copy at the end of the file, flushed before the directories name them.
    async fn ensure_gt(&self, meta: &mut SparseMeta, index: usize) -> io::Result<()> {
        if meta.gd.get(index).is_none() {
            return Err(eio("a write past the capacity its sparse header gives"));
        }
        if meta.gd[index] != 0 {
            return Ok(());
        }
        let gt_len = (self.gtes * 4).next_multiple_of(512);
        let with_rgd = !meta.rgd.is_empty();
        self.refresh_end(meta);
        let at = meta.end;
        meta.end += gt_len * if with_rgd { 2 } else { 1 };
        self.grow(meta).await?;
        self.file.flush().await?;
        let plain = WriteFlags::default();
        let gt = (at / 512) as u32;
        self.file
            .write(
                self.header.gd_offset * 512 + index as u64 * 4,
                &gt.to_le_bytes(),
                plain,
            )
            .await?;
        if with_rgd {
            let rgt = ((at + gt_len) / 512) as u32;
            self.file
                .write(
                    self.header.rgd_offset * 512 + index as u64 * 4,
                    &rgt.to_le_bytes(),
                    plain,
                )
                .await?;
            meta.rgd[index] = rgt;
        }
        meta.gd[index] = gt;
        meta.gts.insert(gt, vec![0; self.gtes as usize]);
        Ok(())
    }

    /// Point grains `first..first + entries.len()` at `entries`, in the GT and the RGT:
    /// one write per table per GT.
    async fn set_entries(
        &self,
        meta: &mut SparseMeta,
        first: u64,
        entries: &[u32],
    ) -> io::Result<()> {
        let plain = WriteFlags::default();
        let mut done = 0usize;
        while done < entries.len() {
            let grain = first + done as u64;
            let index = (grain / self.gtes) as usize;
            let within = (grain % self.gtes) as usize;
            let n = (self.gtes as usize - within).min(entries.len() - done);
            let part = &entries[done..done + n];
            let gt_sector = meta.gd[index];
            self.gt(meta, gt_sector).await?[within..within + n].copy_from_slice(part);
            let bytes: Vec<u8> = part.iter().flat_map(|e| e.to_le_bytes()).collect();
            self.file
                .write(gt_sector as u64 * 512 + within as u64 * 4, &bytes, plain)
                .await?;
            if let Some(&rgt) = meta.rgd.get(index).filter(|&&s| s != 0) {
                self.file
                    .write(rgt as u64 * 512 + within as u64 * 4, &bytes, plain)
                    .await?;
            }
            done += n;
        }
        Ok(())
    }

    /// A compressed grain whole (at most `out.len()` bytes of it), and how many bytes it
    /// holds.
    async fn decompress(&self, host: u64, out: &mut [u8]) -> io::Result<usize> {
        let (data_at, len) = if self.markers {
            let mut marker = [0u8; 12];
            self.file.read(host, &mut marker).await?;
            (host + 12, le32(&marker, 8) as u64)
        } else {
            let left = self.file.node().size().saturating_sub(host);
            (host, left.min(2 * self.grain))
        };
        if len > 2 * self.grain + 1024 || data_at + len > self.file.node().size() {
            return Err(eio(
                "a compressed grain is larger than its file or its grain",
            ));
        }
        let mut input = vec![0u8; len as usize];
        self.file.read(data_at, &mut input).await?;
        let mut inflate = flate2::Decompress::new(true);
        match inflate.decompress(&input, out, flate2::FlushDecompress::Finish) {
            Ok(_) => Ok(inflate.total_out() as usize),
            Err(_) => Err(eio("a compressed grain does not decompress")),
        }
    }
}

enum ExtentData {
    Flat { file: Arc<Child>, offset: u64 },
    Zero,
    Sparse(Box<Sparse>),
    SeSparse(Box<SeSparse>),
}

struct VmdkExtent {
    /// Where it starts on the disk, and its length, in bytes.
    start: u64,
    len: u64,
    data: ExtentData,
    /// The descriptor's word for it (empty for the extent of a monolithic sparse file).
    type_name: String,
}

/// Where the descriptor text is, for the new CID.
struct DescriptorAt {
    file: Arc<Child>,
    offset: u64,
    /// Room it may fill: the descriptor area of a sparse file, or any size for a file of
    /// its own (None).
    room: Option<u64>,
}

impl DescriptorAt {
    /// The descriptor's bytes as the file holds them now, up to the first NUL.
    async fn read(&self) -> io::Result<Vec<u8>> {
        let size = self.file.node().size();
        let room = self.room.unwrap_or(descriptor::MAX_LEN as u64);
        let len = size.saturating_sub(self.offset).min(room) as usize;
        let mut raw = vec![0u8; len];
        self.file.read(self.offset, &mut raw).await?;
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        raw.truncate(end);
        Ok(raw)
    }
}

pub struct Vmdk {
    extents: Vec<VmdkExtent>,
    size: u64,
    /// The file children, each once (the descriptor and the extent files).
    files: Vec<Arc<Child>>,
    backing: BackingEdge,
    descriptor: Descriptor,
    descriptor_at: Option<DescriptorAt>,
    cid: AtomicU32,
    cid_updated: AtomicBool,
    cid_lock: tokio::sync::Mutex<()>,
    /// The backing file was found to be the vmdk this disk was made from (its CID is our
    /// parent CID); checked at the first I/O, as QEMU checks.
    parent_checked: AtomicBool,
}

impl Vmdk {
    fn extent_at(&self, pos: u64) -> &VmdkExtent {
        let i = self.extents.partition_point(|e| e.start + e.len <= pos);
        &self.extents[i]
    }

    /// An error (`errno`) while the backing file is not the vmdk this disk was made from:
    /// its content changed since (another CID), or it is no vmdk at all. As in QEMU, what
    /// needs the backing file fails then (reads of grains without data, new grains), as
    /// the disk would mix two parents; its own grains stay readable and writable.
    fn check_parent(&self, errno: i32) -> io::Result<()> {
        if self.parent_checked.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some(backing) = self.backing.get() {
            let node = backing.node();
            let parent_cid = node
                .driver_as::<Vmdk>()
                .map(|v| v.cid.load(Ordering::Relaxed));
            if parent_cid != Some(self.descriptor.parent_cid) {
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        self.parent_checked.store(true, Ordering::Release);
        Ok(())
    }

    /// The first write of a session that succeeds gives the disk a new CID in its
    /// descriptor, as QEMU does (a failed write changes nothing).
    async fn update_cid(&self) -> io::Result<()> {
        if self.cid_updated.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one = self.cid_lock.lock().await;
        if self.cid_updated.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some(at) = &self.descriptor_at {
            let raw = at.read().await?;
            let mut cid = [0u8; 4];
            crypto::random(&mut cid).map_err(io::Error::other)?;
            let cid = u32::from_le_bytes(cid);
            let mut text = descriptor::with_cid(&raw, cid);
            text.resize((text.len() as u64).next_multiple_of(512) as usize, 0);
            if at.room.is_none_or(|room| text.len() as u64 <= room) {
                at.file
                    .write(at.offset, &text, WriteFlags::default())
                    .await?;
                at.file.flush().await?;
                self.cid.store(cid, Ordering::Relaxed);
            }
        }
        self.cid_updated.store(true, Ordering::Release);
        Ok(())
    }

    async fn read_sparse(
        &self,
        s: &Sparse,
        start: u64,
        off: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let left = (buf.len() - done) as u64;
            let mut meta = s.meta.lock().await;
            let mapping = s.lookup(&mut meta, pos).await?;
            let mut n = in_block(s.grain, pos, left);
            // Grains that follow on, on the disk and in the file, are read in one go.
            while n < left {
                let next = s.lookup(&mut meta, pos + n).await?;
                if !mapping.continues_with(next, pos % s.grain + n) {
                    break;
                }
                n += in_block(s.grain, pos + n, left - n);
            }
            drop(meta);
            let chunk = &mut buf[done..done + n as usize];
            match mapping {
                Mapping::Data(host) => {
                    read_zero_past_end(&s.file, host + pos % s.grain, chunk).await?
                }
                Mapping::Zeroed => chunk.fill(0),
                Mapping::Unallocated => {
                    self.check_parent(libc::EIO)?;
                    self.backing.read(start + pos, chunk).await?
                }
                Mapping::Compressed(host) => {
                    let mut grain = PoolBuf::new(s.grain as usize, 1)?;
                    let got = s.decompress(host, grain.as_mut_slice()).await?;
                    let at = (pos % s.grain) as usize;
                    if at + chunk.len() > got {
                        return Err(eio("a compressed grain holds less than the grain"));
                    }
                    chunk.copy_from_slice(&grain.as_slice()[at..at + chunk.len()]);
                }
            }
            done += n as usize;
        }
        Ok(())
    }

    async fn write_sparse(
        &self,
        s: &Sparse,
        extent: &VmdkExtent,
        off: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let left = (data.len() - done) as u64;
            let n = in_block(s.grain, pos, left);
            let mut meta = s.meta.lock().await;
            let mapping = s.lookup(&mut meta, pos).await?;
            match mapping {
                Mapping::Data(host) => {
                    drop(meta);
                    let chunk = &data[done..done + n as usize];
                    s.file
                        .write(host + pos % s.grain, chunk, WriteFlags::default())
                        .await?;
                    done += n as usize;
                }
                Mapping::Compressed(_) => {
                    return Err(eio("a streamOptimized grain is written only once"))
                }
                Mapping::Unallocated | Mapping::Zeroed
                    if s.compressed
                        && (!pos.is_multiple_of(s.grain)
                            || (n < s.grain && pos + n < extent.len)) =>
                {
                    // As QEMU: a stream takes whole grains only (a grain is written once).
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                Mapping::Unallocated | Mapping::Zeroed if s.compressed => {
                    let chunk = &data[done..done + n as usize];
                    self.write_compressed(s, &mut meta, extent, pos, chunk, mapping)
                        .await?;
                    done += n as usize;
                }
                Mapping::Unallocated | Mapping::Zeroed => {
                    // The grains after it that have no data either get theirs in one go.
                    let mut run = n;
                    while run < left {
                        match s.lookup(&mut meta, pos + run).await? {
                            Mapping::Unallocated | Mapping::Zeroed => {
                                run += in_block(s.grain, pos + run, left - run)
                            }
                            _ => break,
                        }
                    }
                    let chunk = &data[done..done + run as usize];
                    self.allocate(s, &mut meta, extent, pos, chunk).await?;
                    done += run as usize;
                }
            }
        }
        Ok(())
    }

    /// New grains for extent bytes `off..off + data.len()`, none of which has data yet.
    async fn allocate(
        &self,
        s: &Sparse,
        meta: &mut SparseMeta,
        extent: &VmdkExtent,
        off: u64,
        data: &[u8],
    ) -> io::Result<()> {
        if !s.writable {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        self.check_parent(libc::EINVAL)?;
        let end = off + data.len() as u64;
        let first = off / s.grain;
        let last = (end - 1) / s.grain;
        for index in first / s.gtes..=last / s.gtes {
            s.ensure_gt(meta, index as usize).await?;
        }
        let head_from_backing =
            !off.is_multiple_of(s.grain) && s.lookup(meta, off).await? == Mapping::Unallocated;
        let tail_from_backing = !end.is_multiple_of(s.grain)
            && end < extent.len
            && s.lookup(meta, end).await? == Mapping::Unallocated;
        s.refresh_end(meta);
        let host = meta.end;
        meta.end += (last - first + 1) * s.grain;
        s.grow(meta).await?;
        // The new file space reads as zeroes; what a zeroed grain or no backing file gives.
        let plain = WriteFlags::default();
        let base = first * s.grain;
        s.file.write(host + off - base, data, plain).await?;
        if head_from_backing {
            self.copy_backing(s, extent.start, base, off, host).await?;
        }
        if tail_from_backing {
            let grain_end = ((last + 1) * s.grain).min(extent.len);
            self.copy_backing(s, extent.start, end, grain_end, host + end - base)
                .await?;
        }
        // The grains are on disk before the tables name them.
        s.file.flush().await?;
        let entries: Vec<u32> = (0..=last - first)
            .map(|i| ((host + i * s.grain) / 512) as u32)
            .collect();
        s.set_entries(meta, first, &entries).await
    }

    /// The backing file's data for extent bytes `from..to`, written at `host`.
    async fn copy_backing(
        &self,
        s: &Sparse,
        start: u64,
        from: u64,
        to: u64,
        host: u64,
    ) -> io::Result<()> {
        if self.backing.get().is_none() {
            return Ok(());
        }
        let mut buf = PoolBuf::new((to - from).min(COPY_CHUNK) as usize, 1)?;
        let mut done = 0;
        while from + done < to {
            let n = (to - from - done).min(COPY_CHUNK) as usize;
            let part = &mut buf.as_mut_slice()[..n];
            self.backing.read(start + from + done, part).await?;
            s.file
                .write(host + done, part, WriteFlags::default())
                .await?;
            done += n as u64;
        }
        Ok(())
    }

    /// A streamOptimized grain, written once: what was there (the backing file's data or
    /// zeroes) with `data` at `off`, compressed after its marker at the end of the file.
    async fn write_compressed(
        &self,
        s: &Sparse,
        meta: &mut SparseMeta,
        extent: &VmdkExtent,
        off: u64,
        data: &[u8],
        mapping: Mapping,
    ) -> io::Result<()> {
        if !s.writable {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        self.check_parent(libc::EINVAL)?;
        let grain = off / s.grain;
        let base = grain * s.grain;
        let len = s.grain.min(extent.len - base) as usize;
        let mut whole = vec![0u8; len];
        if mapping == Mapping::Unallocated {
            self.backing.read(extent.start + base, &mut whole).await?;
        }
        let at = (off - base) as usize;
        whole[at..at + data.len()].copy_from_slice(data);
        let compressed = crate::iothread::cpu_bound(move || {
            let mut deflate = flate2::Compress::new(flate2::Compression::default(), true);
            let mut out = Vec::with_capacity(whole.len() + whole.len() / 8 + 64);
            loop {
                match deflate.compress_vec(&whole, &mut out, flate2::FlushCompress::Finish) {
                    Ok(flate2::Status::StreamEnd) => return Ok(out),
                    Ok(_) => out.reserve(out.capacity()),
                    Err(e) => return Err(io::Error::other(e)),
                }
            }
        })
        .await??;
        s.ensure_gt(meta, (grain / s.gtes) as usize).await?;
        let mut record = Vec::with_capacity(12 + compressed.len() + 512);
        if s.markers {
            record.extend_from_slice(&(base / 512).to_le_bytes());
            record.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
        }
        record.extend_from_slice(&compressed);
        record.resize((record.len() as u64).next_multiple_of(512) as usize, 0);
        s.refresh_end(meta);
        let host = meta.end;
        meta.end += record.len() as u64;
        s.grow(meta).await?;
        s.file.write(host, &record, WriteFlags::default()).await?;
        s.file.flush().await?;
        s.set_entries(meta, grain, &[(host / 512) as u32]).await
    }

    /// Zeroes for extent bytes `off..off + len`: whole grains become zeroed grains where
    /// the extent has the feature; grains with data get zeroes written; grains without
    /// data read zeroes already unless a backing file shows through.
    async fn zero_sparse(
        &self,
        s: &Sparse,
        extent: &VmdkExtent,
        off: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        let backing = self.backing.get().is_some();
        let mut done = 0;
        while done < len {
            let pos = off + done;
            let n = in_block(s.grain, pos, len - done);
            let whole = n == s.grain || pos + n == extent.len && pos.is_multiple_of(s.grain);
            let mut meta = s.meta.lock().await;
            let mapping = s.lookup(&mut meta, pos).await?;
            if whole && s.zeroed_grain && s.writable && mapping != Mapping::Zeroed {
                s.ensure_gt(&mut meta, (pos / s.grain / s.gtes) as usize)
                    .await?;
                s.set_entries(&mut meta, pos / s.grain, &[GTE_ZEROED])
                    .await?;
            } else {
                match mapping {
                    Mapping::Zeroed => {}
                    Mapping::Unallocated if !backing => {}
                    Mapping::Data(host) => {
                        drop(meta);
                        let plain = WriteFlags {
                            no_fallback: flags.no_fallback,
                            ..WriteFlags::default()
                        };
                        s.file.write_zeroes(host + pos % s.grain, n, plain).await?;
                    }
                    _ if flags.no_fallback => {
                        return Err(io::Error::from_raw_os_error(libc::ENOTSUP))
                    }
                    _ => {
                        drop(meta);
                        let zeroes = vec![0u8; n.min(COPY_CHUNK) as usize];
                        let mut at = 0;
                        while at < n {
                            let part = (n - at).min(COPY_CHUNK) as usize;
                            self.write_sparse(s, extent, pos + at, &zeroes[..part])
                                .await?;
                            at += part as u64;
                        }
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Reads of a seSparse extent: its grains, zeroes, or the backing file's data.
    async fn read_sesparse(
        &self,
        s: &SeSparse,
        start: u64,
        off: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let grain = s.grain();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let left = (buf.len() - done) as u64;
            let mapping = s.lookup(pos).await?;
            let mut n = in_block(grain, pos, left);
            while n < left && mapping.continues_with(s.lookup(pos + n).await?, pos % grain + n) {
                n += in_block(grain, pos + n, left - n);
            }
            let chunk = &mut buf[done..done + n as usize];
            match mapping {
                Mapping::Data(host) => {
                    read_zero_past_end(&s.file, host + pos % grain, chunk).await?
                }
                Mapping::Unallocated => {
                    self.check_parent(libc::EIO)?;
                    self.backing.read(start + pos, chunk).await?
                }
                Mapping::Zeroed | Mapping::Compressed(_) => chunk.fill(0),
            }
            done += n as usize;
        }
        Ok(())
    }

    async fn status_sesparse(&self, s: &SeSparse, off: u64, len: u64) -> io::Result<Extent> {
        let table = s.grain() * sesparse::GT_ENTRIES;
        let len = len.min(table - off % table);
        let first = s.lookup(off).await?;
        let mut run = in_block(s.grain(), off, len);
        while run < len && same_status(s.lookup(off + run).await?, first) {
            run += in_block(s.grain(), off + run, len - run);
        }
        Ok(Extent {
            len: run,
            kind: status_of(first),
        })
    }

    async fn status_sparse(&self, s: &Sparse, off: u64, len: u64) -> io::Result<Extent> {
        {
            let mut meta = s.meta.lock().await;
            let first = s.lookup(&mut meta, off).await?;
            // A run ends with its grain table at the latest: a caller asking about the
            // rest of a large disk comes back for more instead of holding the tables.
            let table = s.grain * s.gtes;
            let len = len.min(table - off % table);
            let mut run = in_block(s.grain, off, len);
            while run < len && same_status(s.lookup(&mut meta, off + run).await?, first) {
                run += in_block(s.grain, off + run, len - run);
            }
            Ok(Extent {
                len: run,
                kind: status_of(first),
            })
        }
    }
}

/// A grain's block status.
fn status_of(m: Mapping) -> ExtentKind {
    match m {
        Mapping::Unallocated => ExtentKind::Unallocated,
        Mapping::Zeroed => ExtentKind::Zero { allocated: true },
        Mapping::Data(_) | Mapping::Compressed(_) => ExtentKind::Data,
    }
}

fn same_status(a: Mapping, b: Mapping) -> bool {
    status_of(a) == status_of(b)
}

#[async_trait(?Send)]
impl Driver for Vmdk {
    fn format_name(&self) -> &'static str {
        "vmdk"
    }

    fn size(&self, _node: &Node) -> u64 {
        self.size
    }

    async fn read(&self, _node: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let e = self.extent_at(pos);
            let within = pos - e.start;
            let n = (e.len - within).min((buf.len() - done) as u64) as usize;
            let chunk = &mut buf[done..done + n];
            match &e.data {
                ExtentData::Zero => chunk.fill(0),
                ExtentData::Flat { file, offset } => {
                    read_zero_past_end(file, offset + within, chunk).await?
                }
                ExtentData::Sparse(s) => self.read_sparse(s, e.start, within, chunk).await?,
                ExtentData::SeSparse(s) => self.read_sesparse(s, e.start, within, chunk).await?,
            }
            done += n;
        }
        Ok(())
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let e = self.extent_at(pos);
            let within = pos - e.start;
            let n = (e.len - within).min((buf.len() - done) as u64) as usize;
            let chunk = &buf[done..done + n];
            match &e.data {
                ExtentData::Zero => return Err(eio("a ZERO extent cannot be written")),
                ExtentData::Flat { file, offset } => {
                    file.write(offset + within, chunk, WriteFlags::default())
                        .await?
                }
                ExtentData::Sparse(s) => self.write_sparse(s, e, within, chunk).await?,
                ExtentData::SeSparse(_) => return Err(io::Error::from_raw_os_error(libc::ENOTSUP)),
            }
            done += n;
        }
        if flags.fua {
            self.flush_files().await?;
        }
        self.update_cid().await
    }

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
            let e = self.extent_at(pos);
            let within = pos - e.start;
            let n = (e.len - within).min(len - done);
            match &e.data {
                ExtentData::Zero => {}
                ExtentData::Flat { file, offset } => {
                    let plain = WriteFlags {
                        no_fallback: flags.no_fallback,
                        ..WriteFlags::default()
                    };
                    file.write_zeroes(offset + within, n, plain).await?
                }
                ExtentData::Sparse(s) => self.zero_sparse(s, e, within, n, flags).await?,
                ExtentData::SeSparse(_) => return Err(io::Error::from_raw_os_error(libc::ENOTSUP)),
            }
            done += n;
        }
        if flags.fua {
            self.flush_files().await?;
        }
        self.update_cid().await
    }

    /// Discard is advisory and vmdk cannot give grains back: the data stays, as in QEMU.
    async fn discard(&self, _: &Node, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        self.flush_files().await
    }

    async fn block_status(&self, node: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        let size = self.size(node);
        if offset >= size {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let e = self.extent_at(offset);
        let within = offset - e.start;
        let len = len.min(e.len - within);
        match &e.data {
            ExtentData::Zero => Ok(Extent {
                len,
                kind: ExtentKind::Zero { allocated: true },
            }),
            ExtentData::Flat { .. } => Ok(Extent {
                len,
                kind: ExtentKind::Data,
            }),
            ExtentData::Sparse(s) => self.status_sparse(s, within, len).await,
            ExtentData::SeSparse(s) => self.status_sesparse(s, within, len).await,
        }
    }

    /// Each sparse extent's grain directories are read anew and its cached grain tables
    /// dropped, and so is the descriptor's CID: the other process may have allocated
    /// grains and given the disk a new CID, and this node's next write gives it another.
    /// The extents' headers and the descriptor's other keys must be as this node left them.
    async fn activate(&self, node: &Node) -> Result<(), String> {
        let changed = |what| crate::active::layout_changed("vmdk", what);
        for extent in &self.extents {
            match &extent.data {
                ExtentData::Sparse(s) => {
                    let header = sparse_header(&s.file)
                        .await
                        .map_err(|e| e.desc)?
                        .ok_or_else(|| changed("extent header"))?;
                    let fresh = open_sparse(s.file.clone(), header, node.read_only())
                        .await
                        .map_err(|e| e.desc)?;
                    if fresh.header != s.header || fresh.writable != s.writable {
                        return Err(changed("extent header"));
                    }
                    *s.meta.lock().await = fresh.meta.into_inner();
                }
                ExtentData::SeSparse(s) => {
                    let mut budget = MAX_DIRECTORY_ENTRIES;
                    let fresh = open_sesparse(s.file.clone(), true, &mut budget)
                        .await
                        .map_err(|e| e.desc)?;
                    if !s.take_back(fresh).await {
                        return Err(changed("extent header"));
                    }
                }
                ExtentData::Flat { .. } | ExtentData::Zero => {}
            }
        }
        if let Some(at) = &self.descriptor_at {
            let raw = at
                .read()
                .await
                .map_err(|e| format!("Could not read the vmdk descriptor: {e}"))?;
            let text = descriptor::text_of(&raw);
            let fresh = Descriptor::parse(&text, !self.descriptor.extents.is_empty())?;
            let cid = fresh.cid;
            if (Descriptor {
                cid: self.descriptor.cid,
                ..fresh
            }) != self.descriptor
            {
                return Err(changed("descriptor"));
            }
            self.cid.store(cid, Ordering::Relaxed);
        }
        self.cid_updated.store(false, Ordering::Release);
        Ok(())
    }

    async fn reopen(&self, _: &Node, writable: bool) -> Result<(), String> {
        for file in &self.files {
            file.node().set_writable(writable).await?;
        }
        Ok(())
    }

    /// As QEMU: compressed extents (streamOptimized) take each whole grain compressed;
    /// the others store it as any write.
    fn supports_compressed_writes(&self) -> bool {
        true
    }

    fn supports_backing(&self) -> bool {
        true
    }

    async fn set_backing_edge(
        &self,
        _node: &Node,
        backing: Option<Arc<Child>>,
    ) -> Result<(), String> {
        self.backing.set(backing);
        self.parent_checked.store(false, Ordering::Release);
        Ok(())
    }

    /// QEMU's vmdk cannot resize either.
    async fn truncate(&self, _: &Node, _size: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    fn child_perms(&self, role: &str, perm: Perms, _: Perms, read_only: bool) -> (Perms, Perms) {
        crate::perm::format_child_perms(role, perm, read_only)
    }

    fn info(&self, _node: &Node) -> DriverInfo {
        let file = self.files[0].node();
        let file_info = file.driver().info(&file);
        let actual_size = self
            .files
            .iter()
            .map(|f| {
                let n = f.node();
                n.driver().info(&n).actual_size
            })
            .sum::<Option<u64>>();
        let extents: Vec<Value> = self
            .extents
            .iter()
            .map(|e| {
                let mut info = json!({"format": e.type_name, "virtual-size": e.len});
                let file = match &e.data {
                    ExtentData::Flat { file, .. } => Some(file),
                    ExtentData::Sparse(s) => {
                        info["cluster-size"] = json!(s.grain);
                        if s.compressed {
                            info["compressed"] = json!(true);
                        }
                        Some(&s.file)
                    }
                    ExtentData::SeSparse(s) => {
                        info["cluster-size"] = json!(s.grain());
                        Some(&s.file)
                    }
                    ExtentData::Zero => None,
                };
                info["filename"] = json!(file.map_or(String::new(), |f| {
                    let n = f.node();
                    n.driver().info(&n).filename
                }));
                info
            })
            .collect();
        let d = &self.descriptor;
        DriverInfo {
            filename: file_info.filename,
            actual_size,
            cluster_size: match &self.extents[0].data {
                ExtentData::Sparse(s) => Some(s.grain),
                ExtentData::SeSparse(s) => Some(s.grain()),
                _ => None,
            },
            dirty_flag: Some(false),
            format_specific: Some(json!({"type": "vmdk", "data": {
                "cid": self.cid.load(Ordering::Relaxed),
                "parent-cid": d.parent_cid,
                "create-type": d.create_type.as_deref().unwrap_or("monolithicSparse"),
                "extents": extents,
            }})),
            backing_filename: d.parent_file.clone(),
            backing_format: d.parent_file.as_ref().map(|_| "vmdk".to_string()),
            ..DriverInfo::default()
        }
    }
}

impl Vmdk {
    async fn flush_files(&self) -> io::Result<()> {
        for file in &self.files {
            file.flush().await?;
        }
        Ok(())
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: true,
    hands_over: true,
    names: &["vmdk"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn read_bytes(file: &Child, offset: u64, len: usize) -> Result<Vec<u8>, QmpError> {
    read_metadata(file, offset, len, "vmdk image").await
}

/// The tables of the sparse extent in `file`, whose first sector is `head`.
async fn open_sparse(
    file: Arc<Child>,
    header: SparseHeader,
    read_only: bool,
) -> Result<Sparse, QmpError> {
    let err = |s: String| QmpError::generic(s);
    let file_size = file.node().size();
    if header.version == 3 && !header.compressed() && !read_only {
        // Such extents carry VMware's changed-block tracking, which writes would break.
        return Err(err("VMDK version 3 must be read only".into()));
    }
    let (header, writable) = if header.gd_at_end() {
        let tail = read_bytes(&file, file_size.saturating_sub(1536), 1536).await?;
        (sparse::footer_header(&tail).map_err(err)?, false)
    } else {
        (header, true)
    };
    if header.overhead.saturating_mul(512) > file_size {
        return Err(err(format!(
            "File truncated, expecting at least {} bytes",
            header.overhead.saturating_mul(512)
        )));
    }
    let grain = header.grain_bytes();
    if header.compressed() && grain > MAX_COMPRESSED_GRAIN {
        return Err(err(format!(
            "blockd reads compressed grains of at most {MAX_COMPRESSED_GRAIN} bytes, not {grain}"
        )));
    }
    let entries = header.gd_entries();
    // The directories are read whole: they must be in the file, which bounds what they
    // can claim.
    let directory = |at: u64, what: &str| {
        let bytes = entries * 4;
        if at
            .checked_mul(512)
            .and_then(|a| a.checked_add(bytes))
            .is_none_or(|e| e > file_size)
        {
            return Err(err(format!(
                "The vmdk {what} lies past the end of the file"
            )));
        }
        Ok(at * 512)
    };
    let gd_at = directory(header.gd_offset, "grain directory")?;
    let raw = read_bytes(&file, gd_at, (entries * 4) as usize).await?;
    let gd: Vec<u32> = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
    let rgd = if writable && header.flags & sparse::FLAG_RGD != 0 {
        let rgd_at = directory(header.rgd_offset, "redundant grain directory")?;
        let raw = read_bytes(&file, rgd_at, (entries * 4) as usize).await?;
        raw.chunks_exact(4).map(|c| le32(c, 0)).collect()
    } else {
        Vec::new()
    };
    Ok(Sparse {
        grain,
        gtes: header.gtes_per_gt as u64,
        zeroed_grain: header.flags & sparse::FLAG_ZERO_GRAIN != 0,
        compressed: header.compressed(),
        markers: header.flags & sparse::FLAG_MARKER != 0,
        writable,
        meta: tokio::sync::Mutex::new(SparseMeta {
            gd,
            rgd,
            gts: HashMap::new(),
            end: file_size.next_multiple_of(512),
        }),
        header,
        file,
    })
}

/// A seSparse extent: refused writable (QEMU has no write support either), its headers
/// checked in QEMU's words, its grain directory read whole (within `directory_budget`).
async fn open_sesparse(
    file: Arc<Child>,
    read_only: bool,
    directory_budget: &mut u64,
) -> Result<SeSparse, QmpError> {
    if !read_only {
        return Err(QmpError::generic(
            "No write support for seSparse images available",
        ));
    }
    let refused = |r: sesparse::Refusal| QmpError::generic(r.text);
    let head = read_bytes(&file, 0, sesparse::HEADER_LEN).await?;
    let header = SeSparseHeader::parse(&head).map_err(refused)?;
    let at = header.volatile_header_offset.saturating_mul(512);
    let volatile = read_bytes(&file, at, sesparse::HEADER_LEN).await?;
    sesparse::check_volatile(&volatile).map_err(refused)?;
    let entries = header.gd_entries();
    *directory_budget = directory_budget
        .checked_sub(entries)
        .ok_or_else(|| QmpError::generic("The vmdk extents' grain directories are too large"))?;
    let gd_at = header.grain_dir_offset.saturating_mul(512);
    if gd_at.saturating_add(entries * 8) > file.node().size() {
        return Err(QmpError::generic(
            "The vmdk grain directory lies past the end of the file",
        ));
    }
    let raw = read_bytes(&file, gd_at, (entries * 8) as usize).await?;
    let gd = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();
    Ok(SeSparse::new(file, header, gd))
}

/// The sparse header at the start of `file`, or an error naming the file.
async fn sparse_header(file: &Child) -> Result<Option<SparseHeader>, QmpError> {
    let head = read_bytes(file, 0, sparse::HEADER_LEN).await?;
    SparseHeader::parse_any(&head)
        .transpose()
        .map_err(QmpError::generic)
}

async fn open(
    o: &mut Opener<'_>,
    mut options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let backing_ref = options.remove("backing");
    let file = o.open_file_only(options).await?;
    let file_size = file.node().size();
    let head = read_bytes(&file, 0, sparse::HEADER_LEN).await?;
    o.claim_position();
    let mut extents = Vec::new();
    let mut files = vec![file.clone()];
    let (descriptor, descriptor_at) = match SparseHeader::parse_any(&head) {
        Some(Err(e)) => return Err(QmpError::generic(e)),
        Some(Ok(header)) => {
            let room = header
                .desc_size
                .saturating_mul(512)
                .min(descriptor::MAX_LEN as u64);
            let text = if header.desc_offset != 0 {
                descriptor::text_of(
                    &read_bytes(&file, header.desc_offset.saturating_mul(512), room as usize)
                        .await?,
                )
            } else {
                String::new()
            };
            let at = DescriptorAt {
                file: file.clone(),
                offset: header.desc_offset.saturating_mul(512),
                room: Some(room),
            };
            if header.capacity == 0 && header.desc_offset != 0 {
                // The descriptor inside names the extents.
                let d = Descriptor::parse_file(&text).map_err(QmpError::generic)?;
                open_extents(o, &file, &d, &mut extents, &mut files).await?;
                (d, Some(at))
            } else {
                let d = Descriptor::parse(&text, false).map_err(QmpError::generic)?;
                let s = open_sparse(file.clone(), header, o.common().read_only).await?;
                // The capacity of the header in force (a stream's footer's).
                let len = s.header.capacity * 512;
                extents.push(VmdkExtent {
                    start: 0,
                    len,
                    data: ExtentData::Sparse(Box::new(s)),
                    type_name: String::new(),
                });
                (d, (at.offset != 0).then_some(at))
            }
        }
        None => {
            if file_size > descriptor::MAX_LEN as u64 {
                return Err(QmpError::generic("invalid VMDK image descriptor"));
            }
            let text = descriptor::text_of(&read_bytes(&file, 0, file_size as usize).await?);
            let d = Descriptor::parse_file(&text).map_err(QmpError::generic)?;
            open_extents(o, &file, &d, &mut extents, &mut files).await?;
            let at = DescriptorAt {
                file: file.clone(),
                offset: 0,
                room: None,
            };
            (d, Some(at))
        }
    };
    if extents.iter().all(|e| e.len == 0) {
        return Err(QmpError::generic("The vmdk disk has no extents"));
    }
    let size = extents.last().map_or(0, |e| e.start + e.len);
    let backing = match backing_ref {
        Some(Value::Null) => None,
        Some(reference) => Some(
            o.open_child(reference, "backing", Perms::NONE, Perms::ALL)
                .await?,
        ),
        None => match &descriptor.parent_file {
            Some(name) => Some(
                o.open_backing_from_header(&file.node(), name, Some("vmdk"))
                    .await?,
            ),
            None => None,
        },
    };
    Ok(Box::new(Vmdk {
        extents,
        size,
        files,
        backing: BackingEdge::new(backing),
        cid: AtomicU32::new(descriptor.cid),
        descriptor,
        descriptor_at,
        cid_updated: AtomicBool::new(false),
        cid_lock: tokio::sync::Mutex::new(()),
        parent_checked: AtomicBool::new(false),
    }))
}

/// Open the extents a descriptor names, relative to the descriptor's file; a file two
/// extents share is opened once.
async fn open_extents(
    o: &mut Opener<'_>,
    descriptor_file: &Arc<Child>,
    d: &Descriptor,
    extents: &mut Vec<VmdkExtent>,
    files: &mut Vec<Arc<Child>>,
) -> Result<(), QmpError> {
    let base = {
        let node = descriptor_file.node();
        node.driver().info(&node).filename
    };
    let mut opened: HashMap<String, Arc<Child>> = HashMap::new();
    opened.insert(base.clone(), descriptor_file.clone());
    let mut sparse_files = Vec::new();
    // Grain directories are read whole, one per sparse extent: their sum is bounded.
    let mut directory_budget = MAX_DIRECTORY_ENTRIES;
    let read_only = o.common().read_only;
    let mut start = 0u64;
    for (i, line) in d.extents.iter().enumerate() {
        let mut len = line.sectors * 512;
        let file = match line.kind {
            ExtentType::Zero => None,
            _ => {
                let path = resolve_backing_path(&base, &line.file);
                Some(match opened.get(&path) {
                    Some(child) => child.clone(),
                    None => {
                        let child = o
                            .open_child(
                                json!({"driver": "file", "filename": path}),
                                &format!("extents.{i}"),
                                Perms::NONE,
                                Perms::ALL,
                            )
                            .await?;
                        opened.insert(path, child.clone());
                        files.push(child.clone());
                        child
                    }
                })
            }
        };
        let data = match (line.kind, file) {
            (ExtentType::Flat, Some(file)) => ExtentData::Flat {
                file,
                offset: line.offset * 512,
            },
            (ExtentType::Sparse, Some(file)) => match sparse_header(&file).await? {
                Some(header) => {
                    let path = resolve_backing_path(&base, &line.file);
                    if sparse_files.contains(&path) {
                        return Err(QmpError::generic(format!(
                            "The vmdk descriptor names the sparse extent '{}' twice",
                            line.file
                        )));
                    }
                    sparse_files.push(path);
                    directory_budget = directory_budget
                        .checked_sub(header.gd_entries())
                        .ok_or_else(|| {
                            QmpError::generic("The vmdk extents' grain directories are too large")
                        })?;
                    let s = open_sparse(file, header, read_only).await?;
                    // As QEMU: a sparse extent is as long as its header says.
                    len = s.header.capacity * 512;
                    ExtentData::Sparse(Box::new(s))
                }
                None => {
                    return Err(QmpError::generic(format!(
                        "The vmdk extent '{}' is not a sparse extent",
                        line.file
                    )))
                }
            },
            (ExtentType::SeSparse, Some(file)) => {
                let may_become_read_only = read_only || o.common().auto_read_only;
                let s = open_sesparse(file, may_become_read_only, &mut directory_budget).await?;
                // As QEMU: the extent is as long as its header says.
                len = s.len();
                ExtentData::SeSparse(Box::new(s))
            }
            _ => ExtentData::Zero,
        };
        extents.push(VmdkExtent {
            start,
            len,
            data,
            type_name: line.type_name.clone(),
        });
        start += len;
    }
    Ok(())
}
