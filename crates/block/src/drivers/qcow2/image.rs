//! The qcow2 data path (docs/interop/qcow2.txt): guest offsets mapped through the L1 and L2
//! tables, clusters allocated, copied on write and freed, with QEMU's ordering rules for
//! what reaches the disk first.
//!
//! **Locking.** The tables, the L2 cache and the refcounts sit behind one mutex ([`Meta`]),
//! held to look a mapping up or change one, never while guest data moves. An allocating
//! write takes its clusters under the mutex, marks its guest clusters as in flight and lets
//! go; it writes the data (merged with what the partial clusters at either end held) and
//! only then points the L2 entries at it. Writes that meet a cluster in flight wait for it;
//! reads meet the old mapping, which is what they would have read a moment earlier. The
//! driver runs operations that free clusters a write may still be writing (discard, zero
//! writes that unmap, resize) and snapshots with nothing else running.
//!
//! **Ordering.** L2 tables are a write-back cache, as QEMU's; refcount increments too. Before
//! any L2 table is written, the refcount blocks are written and flushed, so a table on disk
//! never points at a cluster whose refcount says free. Decrements are kept aside until the
//! L2 tables that dropped the reference are written and flushed, and only then reach the
//! refcounts, so a freed cluster is never reused while a table on disk still points at it.
//! A new L2 table is written (after its refcount) before the L1 entry points at it, and the
//! L1 table is written through at once, as QEMU writes it. `flush` writes everything back
//! in that order and then flushes the file: a crash leaves leaked clusters at worst.
//!
//! **Overlap checks.** Every write, of guest data or of a table, is first checked against
//! where the other metadata lies (`overlap.rs`); table entries no valid image holds are
//! reported the same way, as a [`Corruption`] the node acts on (`mod.rs`).
//!
//! **Extended L2 entries.** Each cluster has 32 subclusters, each allocated, zero or
//! unallocated on its own (a bitmap beside the entry); mappings change at subcluster
//! boundaries. A write into a cluster without data allocates a new cluster but fills only
//! the subclusters it touches (copy-on-write to subcluster boundaries); one into a cluster
//! this image owns fills its unallocated subclusters in place; a compressed or shared
//! cluster is copied whole. Zero writes and discards of whole clusters set every zero bit.
//!
//! **External data file.** Guest data may live in a second file at its own guest offsets
//! (`data`), unrefcounted and without overlap checks; with `data-file-raw` zero writes and
//! discards zero it too, so it stays a raw image of the disk.
//!
//! **Encryption.** With `encrypt` (`crypt.rs`) guest data is encrypted in 512-byte sectors:
//! every data read is decrypted and every data write encrypted on its way, and a request
//! that covers part of a sector is widened to whole sectors (a write merges what the sector
//! held, holding the sector range so no other write comes between).
//!
//! Not here yet: the `lazy-refcounts` write mode (refused at open by `options.rs`). An image a lazy-refcounts writer left dirty is repaired
//! before it is opened writable (`repair.rs`).

use super::compression::Compression;
use super::crypt::Encryption;
use super::header::{be32, be64, AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_EXTENDED_L2};
use super::overlap::{hex, Checks, Corruption, Metadata, MetadataMap};
use super::refcount::{Freed, PassDiscard, Refcounts};
use crate::drivers::blkdebug::BlkdebugEvent;
use crate::node::{Child, Extent, ExtentKind, WriteFlags};
use crate::range_lock::RangeLock;
use aio::pool::{PoolBuf, MAX_BUF};
use aio::IoBuf;
use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::sync::Arc;
use tokio::sync::{Mutex, Notify};

/// Bits 9-55 of an L1 entry or a standard L2 entry: the host cluster offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: the cluster's refcount is exactly 1, so it may be written in place.
pub(super) const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry (version 3, without extended L2 entries): the cluster
/// reads as zeroes.
const ZERO: u64 = 1;
/// The subcluster bitmap of an extended L2 entry: bits 0-31 say a subcluster is allocated
/// (its data in the host cluster), bits 32-63 that it reads as zeroes.
const ALL_ALLOCATED: u64 = 0xffff_ffff;
const ALL_ZERO: u64 = 0xffff_ffff << 32;
/// QEMU's limit for the L1 table (QCOW_MAX_L1_SIZE): 32 MiB.
pub(super) const MAX_L1_BYTES: u64 = 32 << 20;
/// The most one allocating step takes at once, so a huge write does not hold its whole
/// range in flight.
const MAX_ALLOCATION: u64 = 32 << 20;

/// An image we refuse to open (a table that cannot be right): no event, as in QEMU.
fn corrupt(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("qcow2: {what}"))
}

/// What a run of guest clusters maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mapping {
    /// Data at `host` (the byte the run starts at); `copied`: writable in place.
    Data { host: u64, copied: bool },
    /// Reads as zeroes (a zero cluster, preallocated or not).
    Zero,
    /// Not in this image: the backing file's data, or zeroes without one.
    Unallocated,
    /// One compressed cluster, as its L2 entry says.
    Compressed { entry: u64 },
}

/// An L2 table in the cache: its 64-bit words as on disk (with extended L2 entries, each
/// entry's standard word is followed by its subcluster bitmap).
struct CachedL2 {
    entries: Vec<u64>,
    dirty: bool,
    used: u64,
}

impl CachedL2 {
    /// Entry `index` and its subcluster bitmap (0 without extended L2 entries).
    fn get(&self, index: usize, extended: bool) -> (u64, u64) {
        if extended {
            (self.entries[2 * index], self.entries[2 * index + 1])
        } else {
            (self.entries[index], 0)
        }
    }

    /// Change entry `index` (and, with extended L2 entries, its bitmap).
    fn set(&mut self, index: usize, extended: bool, entry: u64, bitmap: u64) {
        if extended {
            self.entries[2 * index] = entry;
            self.entries[2 * index + 1] = bitmap;
        } else {
            self.entries[index] = entry;
        }
        self.dirty = true;
    }
}

/// Everything the mutex guards.
struct Meta {
    l1: Vec<u64>,
    l1_offset: u64,
    l2: HashMap<u64, CachedL2>,
    tick: u64,
    refcounts: Refcounts,
    map: MetadataMap,
    /// Host clusters that lost a reference, and why: released once the tables are written.
    pending_free: Vec<(u64, Freed)>,
    /// Guest cluster ranges being allocated.
    in_flight: Vec<Range<u64>>,
}

/// What the runtime options choose about an image's data path.
#[derive(Clone)]
pub(super) struct Settings {
    /// The metadata overlap checks (`overlap-check`).
    pub checks: Checks,
    /// Which freed clusters are discarded in the file (`pass-discard-*`).
    pub pass_discard: PassDiscard,
    /// How many L2 tables and refcount blocks the caches hold (the cache-size options).
    pub l2_tables: usize,
    pub refcount_blocks: usize,
    /// `discard-no-unref`: guest discards and unmapping zero writes keep the clusters this
    /// image owns, as zero clusters later writes fill in place.
    pub discard_no_unref: bool,
    /// The guest data's encryption (`crypt.rs`), shared by every reopen of the data path.
    pub crypt: Option<Arc<Encryption>>,
}

/// An open qcow2 image's data path.
pub(super) struct Image {
    file: Arc<Child>,
    /// Where guest data clusters are: `file`, or an external data file, in which a guest
    /// cluster's data sits at its own guest offset and is not refcounted.
    data: Arc<Child>,
    external: bool,
    /// The external data file is kept a raw image of the disk (`data-file-raw`): zero
    /// writes and discards zero it too.
    raw: bool,
    backing: Option<Arc<Child>>,
    cluster_bits: u32,
    version: u32,
    /// Extended L2 entries: 32 subclusters per cluster, each allocated or zero on its own.
    extended: bool,
    size: u64,
    settings: Settings,
    compression: Compression,
    meta: Mutex<Meta>,
    /// Woken whenever an allocation in flight completes.
    allocated: Notify,
    /// Guest sector ranges being written, when encrypted (see the module doc).
    sectors: RangeLock,
}

fn to_bytes(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

impl Image {
    /// Open the image in `file` (its header already checked by `Qcow2Header`), reading
    /// unallocated clusters from `backing`. A writable open clears autoclear bits we do
    /// not know, as the specification asks of a program that may change the image.
    pub(super) async fn open(
        file: Arc<Child>,
        data: Option<Arc<Child>>,
        backing: Option<Arc<Child>>,
        writable: bool,
        settings: Settings,
        compression: Compression,
    ) -> io::Result<Image> {
        let checks = settings.checks;
        let mut first = vec![0u8; 512.min(file.node().size() as usize)];
        file.read(0, &mut first).await?;
        if first.len() < 104 {
            first.resize(104, 0);
        }
        let version = be32(&first, 4);
        let extended = version >= 3 && be64(&first, 72) & INCOMPAT_EXTENDED_L2 != 0;
        let cluster_bits = be32(&first, 20);
        if !(9..=21).contains(&cluster_bits) || (extended && cluster_bits < 14) {
            return Err(corrupt(format!(
                "unsupported cluster size 2^{cluster_bits}"
            )));
        }
        let size = be64(&first, 24);
        let l1_size = be32(&first, 36) as u64;
        let l1_offset = be64(&first, 40);
        let cluster_size = 1u64 << cluster_bits;
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(corrupt("Active L1 table too large".into()));
        }
        let l2_coverage = cluster_size << (cluster_bits - 3 - u32::from(extended));
        if l1_size < size.div_ceil(l2_coverage) {
            return Err(corrupt("L1 table is too small".into()));
        }
        if l1_size > 0 && l1_offset & (cluster_size - 1) != 0 {
            return Err(corrupt("L1 table is not aligned to a cluster".into()));
        }
        let mut raw = vec![0u8; (l1_size * 8) as usize];
        if l1_size > 0 {
            file.read(l1_offset, &mut raw).await?;
        }
        let l1: Vec<u64> = raw.chunks(8).map(|c| be64(c, 0)).collect();
        let mut header_cluster = vec![0u8; cluster_size.min(file.node().size()) as usize];
        file.read(0, &mut header_cluster).await?;
        let refcounts = Refcounts::load(file.clone(), &header_cluster)
            .await?
            .with_pass_discard(settings.pass_discard)
            .with_capacity(settings.refcount_blocks);
        let map = MetadataMap::load(&file, &header_cluster, Some(&l1), checks).await?;
        if writable && version >= 3 {
            let autoclear = be64(&first, 88);
            // Bit 0: the bitmaps extension, which `bitmaps.rs` keeps consistent; bit 1: a
            // raw external data file, which this driver keeps raw.
            let known = autoclear & if data.is_some() { 3 } else { 1 };
            if autoclear != known {
                file.write(88, &known.to_be_bytes(), WriteFlags::default())
                    .await?;
                file.flush().await?;
            }
        }
        let raw = data.is_some() && be64(&first, 88) & AUTOCLEAR_DATA_FILE_RAW != 0;
        Ok(Image {
            external: data.is_some(),
            raw,
            data: data.unwrap_or_else(|| file.clone()),
            file,
            backing,
            cluster_bits,
            version,
            extended,
            size,
            settings,
            compression,
            meta: Mutex::new(Meta {
                l1,
                l1_offset,
                l2: HashMap::new(),
                tick: 0,
                refcounts,
                map,
                pending_free: Vec::new(),
                in_flight: Vec::new(),
            }),
            allocated: Notify::new(),
            sectors: RangeLock::default(),
        })
    }

    pub(super) fn size(&self) -> u64 {
        self.size
    }

    pub(super) fn set_backing(&mut self, backing: Option<Arc<Child>>) {
        self.backing = backing;
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Guest bytes one L2 table maps.
    fn l2_coverage(&self) -> u64 {
        self.cluster_size() * self.l2_entries() as u64
    }

    /// Entries in one L2 table: 8 bytes each, 16 with extended L2 entries.
    fn l2_entries(&self) -> usize {
        1 << (self.cluster_bits - 3 - u32::from(self.extended))
    }

    /// The host clusters of the image file an L2 entry holds a reference to: none for data
    /// in an external data file, which is not refcounted.
    fn owned(&self, entry: u64) -> Range<u64> {
        if self.external && entry & COMPRESSED == 0 {
            return 0..0;
        }
        referenced(entry, self.cluster_bits)
    }

    /// Where `count` new data clusters for the guest clusters from `guest` go: taken from
    /// the refcounts, or with an external data file the guest offset itself.
    async fn allocate_data(&self, meta: &mut Meta, guest: u64, count: u64) -> io::Result<u64> {
        if self.external {
            return Ok(guest);
        }
        Ok(meta.refcounts.allocate(count).await? << self.cluster_bits)
    }

    /// Undo `allocate_data`.
    async fn release_data(&self, meta: &mut Meta, host: u64, count: u64) -> io::Result<()> {
        if !self.external {
            for cluster in host >> self.cluster_bits..(host >> self.cluster_bits) + count {
                meta.refcounts.release(cluster, Freed::Never).await?;
            }
        }
        Ok(())
    }

    /// The overlap checks for data about to be written at `host`: only data in the image
    /// file can land on its metadata.
    fn check_data(&self, meta: &Meta, host: u64, len: u64) -> io::Result<()> {
        if self.external {
            return Ok(());
        }
        meta.map.check(host, len, None, &meta.refcounts)
    }

    /// With a raw external data file, make `offset..offset+len` of it read as zeroes too,
    /// as the guest now reads there (past the disk's end there is nothing to keep).
    async fn zero_raw_data(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let len = len.min(self.size.saturating_sub(offset));
        if !self.raw || len == 0 {
            return Ok(());
        }
        let flags = WriteFlags {
            may_unmap: unmap,
            ..WriteFlags::default()
        };
        self.data.write_zeroes(offset, len, flags).await
    }

    /// The unit a mapping can change at: a subcluster with extended L2 entries, else a
    /// cluster.
    fn granule_bits(&self) -> u32 {
        if self.extended {
            self.cluster_bits - 5
        } else {
            self.cluster_bits
        }
    }

    /// Where L1 entry `entry` (at `l1_index`) says its L2 table lies; 0 for none.
    fn l2_offset(&self, entry: u64, l1_index: usize) -> io::Result<u64> {
        let offset = entry & OFFSET_MASK;
        if offset & (self.cluster_size() - 1) != 0 {
            return Err(Corruption::found(format!(
                "L2 table offset {} unaligned (L1 index: {})",
                hex(offset),
                hex(l1_index as u64)
            )));
        }
        Ok(offset)
    }

    /// The L2 table at `offset` (cluster-aligned, as `l2_offset` checks), loaded into the
    /// cache if it is not there.
    async fn l2_table<'m>(&self, meta: &'m mut Meta, offset: u64) -> io::Result<&'m mut CachedL2> {
        meta.tick += 1;
        let tick = meta.tick;
        if !meta.l2.contains_key(&offset) {
            self.make_room(meta).await?;
            let mut raw = vec![0u8; self.cluster_size() as usize];
            self.file.debug_event(BlkdebugEvent::L2Load);
            self.file.read(offset, &mut raw).await?;
            let entries = raw.chunks(8).map(|c| be64(c, 0)).collect();
            meta.l2.insert(
                offset,
                CachedL2 {
                    entries,
                    dirty: false,
                    used: tick,
                },
            );
        }
        let table = meta.l2.get_mut(&offset).expect("inserted above");
        table.used = tick;
        Ok(table)
    }

    /// Evict the least recently used table when the cache is full, writing the dirty ones
    /// back first when only dirty ones are left.
    async fn make_room(&self, meta: &mut Meta) -> io::Result<()> {
        while meta.l2.len() >= self.settings.l2_tables {
            let clean = meta
                .l2
                .iter()
                .filter(|(_, t)| !t.dirty)
                .min_by_key(|(_, t)| t.used)
                .map(|(&offset, _)| offset);
            match clean {
                Some(offset) => {
                    meta.l2.remove(&offset);
                }
                None => self.write_tables(meta).await?,
            }
        }
        Ok(())
    }

    /// The mapping at guest offset `pos` and how many bytes from there, up to `len`, map
    /// the same way (contiguous on the host, for data).
    async fn lookup(&self, meta: &mut Meta, pos: u64, len: u64) -> io::Result<(Mapping, u64)> {
        let cluster_mask = self.cluster_size() - 1;
        let end = pos + len;
        let mut at = pos;
        let mut first: Option<Mapping> = None;
        while at < end {
            let l1_index = (at / self.l2_coverage()) as usize;
            let table_end = ((l1_index as u64 + 1) * self.l2_coverage()).min(end);
            let l2_offset = match meta.l1.get(l1_index) {
                Some(&entry) => self.l2_offset(entry, l1_index)?,
                None => 0,
            };
            if l2_offset == 0 {
                match first {
                    None => first = Some(Mapping::Unallocated),
                    Some(Mapping::Unallocated) => {}
                    Some(_) => break,
                }
                at = table_end;
                continue;
            }
            let cluster_bits = self.cluster_bits;
            let (version, extended) = (self.version, self.extended);
            let granule_bits = self.granule_bits();
            let index_mask = self.l2_entries() - 1;
            let table = self.l2_table(meta, l2_offset).await?;
            while at < table_end {
                let index = ((at >> cluster_bits) as usize) & index_mask;
                let (entry, bitmap) = table.get(index, extended);
                let sub = ((at & cluster_mask) >> granule_bits) as u32;
                let layout = EntryLayout {
                    cluster_bits,
                    version,
                    extended,
                };
                let mapping = classify(entry, bitmap, sub, layout).map_err(|bad| match bad {
                    BadEntry::Unaligned(host) => Corruption::found(format!(
                        "Cluster allocation offset {} unaligned (L2 offset: {}, L2 index: {})",
                        hex(host),
                        hex(l2_offset),
                        hex(index as u64)
                    )),
                    BadEntry::Invalid => Corruption::found(format!(
                        "Invalid cluster entry found (L2 offset: {}, L2 index: {})",
                        hex(l2_offset),
                        hex(index as u64)
                    )),
                })?;
                // A compressed cluster has no subclusters.
                let granule_mask = match mapping {
                    Mapping::Compressed { .. } => cluster_mask,
                    _ => (1 << granule_bits) - 1,
                };
                let next = ((at | granule_mask) + 1).min(table_end);
                match (first, mapping) {
                    (None, Mapping::Data { host, copied }) => {
                        first = Some(Mapping::Data {
                            host: host + (at & cluster_mask),
                            copied,
                        })
                    }
                    (None, mapping) => first = Some(mapping),
                    (
                        Some(Mapping::Data {
                            host: start,
                            copied,
                        }),
                        Mapping::Data {
                            host,
                            copied: copied_here,
                        },
                    ) if copied == copied_here
                        && host + (at & cluster_mask) == start + (at - pos) => {}
                    (Some(Mapping::Zero), Mapping::Zero)
                    | (Some(Mapping::Unallocated), Mapping::Unallocated) => {}
                    _ => return Ok((first.expect("set"), at - pos)),
                }
                at = next;
                if matches!(mapping, Mapping::Compressed { .. }) {
                    return Ok((mapping, at - pos));
                }
            }
        }
        Ok((first.unwrap_or(Mapping::Unallocated), at.min(end) - pos))
    }

    /// Read guest bytes at `offset`.
    pub(super) async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.settings.crypt.is_some() && !whole_sectors(offset, buf.len()) {
            let (start, end) = sectors_around(offset, buf.len());
            let mut sectors = PoolBuf::new((end - start) as usize, 1)?;
            let sectors = sectors.as_mut_slice();
            Box::pin(self.read(start, sectors)).await?;
            let head = (offset - start) as usize;
            buf.copy_from_slice(&sectors[head..head + buf.len()]);
            return Ok(());
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let rest = (buf.len() - done) as u64;
            let (mapping, len) = {
                let mut meta = self.meta.lock().await;
                self.lookup(&mut meta, pos, rest).await?
            };
            let chunk = &mut buf[done..done + len as usize];
            self.read_mapped(mapping, pos, chunk).await?;
            done += len as usize;
        }
        Ok(())
    }

    /// [`read`](Self::read) into an owned buffer: the pieces that lie in a data cluster
    /// of this image or in the backing chain are read in place, without a copy.
    pub(super) async fn read_buf(&self, offset: u64, mut buf: IoBuf) -> io::Result<IoBuf> {
        if self.settings.crypt.is_some() {
            self.read(offset, buf.as_mut_slice()).await?;
            return Ok(buf);
        }
        let mut done = IoBuf::empty();
        while !buf.is_empty() {
            let pos = offset + done.len() as u64;
            let (mapping, len) = {
                let mut meta = self.meta.lock().await;
                self.lookup(&mut meta, pos, buf.len() as u64).await?
            };
            let mut piece = buf.split_to(len as usize);
            match mapping {
                Mapping::Data { host, .. } => {
                    self.file.debug_event(BlkdebugEvent::ReadAio);
                    piece = self.data.read_buf(host, piece).await?;
                }
                Mapping::Unallocated => piece = self.read_backing_buf(pos, piece).await?,
                _ => self.read_mapped(mapping, pos, piece.as_mut_slice()).await?,
            }
            join(&mut done, piece)?;
        }
        Ok(done)
    }

    /// Fill `chunk`, guest bytes at `pos`, as `mapping` says they are stored.
    async fn read_mapped(&self, mapping: Mapping, pos: u64, chunk: &mut [u8]) -> io::Result<()> {
        match mapping {
            Mapping::Data { host, .. } => {
                self.file.debug_event(BlkdebugEvent::ReadAio);
                self.read_data(host, pos, chunk).await?;
            }
            Mapping::Zero => chunk.fill(0),
            Mapping::Unallocated => self.read_backing(pos, chunk).await?,
            Mapping::Compressed { entry } => {
                let cluster = self.decompress(entry).await?;
                let at = (pos & (self.cluster_size() - 1)) as usize;
                chunk.copy_from_slice(&cluster[at..at + chunk.len()]);
            }
        }
        Ok(())
    }

    /// Guest data at `host` (guest offset `guest`), decrypted.
    async fn read_data(&self, host: u64, guest: u64, buf: &mut [u8]) -> io::Result<()> {
        self.data.read(host, buf).await?;
        if let Some(crypt) = &self.settings.crypt {
            crypt.decrypt(host, guest, buf);
        }
        Ok(())
    }

    /// Write guest data at `host` (guest offset `guest`), encrypted on the way through a
    /// bounded copy.
    async fn write_data(&self, host: u64, guest: u64, data: &[u8]) -> io::Result<()> {
        let plain = WriteFlags::default();
        let Some(crypt) = &self.settings.crypt else {
            return self.data.write(host, data, plain).await;
        };
        let mut scratch = PoolBuf::new(data.len().min(CRYPT_CHUNK), 1)?;
        for (i, piece) in data.chunks(CRYPT_CHUNK).enumerate() {
            let at = (i * CRYPT_CHUNK) as u64;
            let copy = &mut scratch.as_mut_slice()[..piece.len()];
            copy.copy_from_slice(piece);
            crypt.encrypt(host + at, guest + at, copy);
            self.data.write(host + at, copy, plain).await?;
        }
        Ok(())
    }

    /// [`write_data`](Self::write_data) of an owned buffer, in place unless encrypted.
    async fn write_data_buf(&self, host: u64, guest: u64, data: IoBuf) -> io::Result<IoBuf> {
        if self.settings.crypt.is_some() {
            self.write_data(host, guest, data.as_slice()).await?;
            return Ok(data);
        }
        self.data.write_buf(host, data, WriteFlags::default()).await
    }

    /// What the backing chain holds at `pos` (zeroes past its end, or without one).
    async fn read_backing(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        let Some(backing) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let backing_size = backing.node().size();
        let inside = backing_size.saturating_sub(pos).min(buf.len() as u64) as usize;
        if inside > 0 {
            self.file.debug_event(BlkdebugEvent::ReadBackingAio);
            backing.read(pos, &mut buf[..inside]).await?;
        }
        buf[inside..].fill(0);
        Ok(())
    }

    /// [`read_backing`](Self::read_backing) into an owned buffer, in place when all of it
    /// lies within the backing node.
    async fn read_backing_buf(&self, pos: u64, mut buf: IoBuf) -> io::Result<IoBuf> {
        match &self.backing {
            Some(backing) if pos + buf.len() as u64 <= backing.node().size() => {
                self.file.debug_event(BlkdebugEvent::ReadBackingAio);
                backing.read_buf(pos, buf).await
            }
            _ => {
                self.read_backing(pos, buf.as_mut_slice()).await?;
                Ok(buf)
            }
        }
    }

    /// The whole guest cluster a compressed L2 entry holds.
    async fn decompress(&self, entry: u64) -> io::Result<Vec<u8>> {
        let (offset, len) = compressed_span(entry, self.cluster_bits);
        let file_size = self.file.node().size();
        let len = len.min(file_size.saturating_sub(offset));
        let mut input = vec![0u8; len as usize];
        self.file.debug_event(BlkdebugEvent::ReadCompressed);
        self.file.read(offset, &mut input).await?;
        let mut out = vec![0u8; self.cluster_size() as usize];
        self.compression
            .decompress(&input, &mut out)
            .map_err(|()| {
                corrupt(format!(
                    "compressed cluster at {offset:#x} does not decompress"
                ))
            })?;
        Ok(out)
    }

    /// Whether `from..to` reads as zeroes, this layer or the backing chain below.
    pub(super) async fn reads_zero(&self, mut from: u64, to: u64) -> io::Result<bool> {
        while from < to {
            let (mapping, len) = {
                let mut meta = self.meta.lock().await;
                self.lookup(&mut meta, from, to - from).await?
            };
            let zero = match (mapping, &self.backing) {
                (Mapping::Zero, _) | (Mapping::Unallocated, None) => true,
                (Mapping::Unallocated, Some(backing)) => {
                    let backing = backing.node();
                    if from >= backing.size() {
                        true
                    } else {
                        let len = len.min(backing.size() - from);
                        let below = backing.block_status_above(None, from, len).await?;
                        if !below.zero {
                            return Ok(false);
                        }
                        from += below.len.max(1);
                        continue;
                    }
                }
                _ => false,
            };
            if !zero {
                return Ok(false);
            }
            from += len;
        }
        Ok(true)
    }

    /// Read `buf` from this layer's own mapping only: Some(true) for zeroes, Some(false)
    /// for data, None when it is not one mapping or the backing chain holds it.
    pub(super) async fn read_or_zero(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<Option<bool>> {
        let (mapping, len) = {
            let mut meta = self.meta.lock().await;
            self.lookup(&mut meta, offset, buf.len() as u64).await?
        };
        if len < buf.len() as u64 {
            return Ok(None);
        }
        match mapping {
            Mapping::Data { .. }
                if self.settings.crypt.is_some() && !whole_sectors(offset, buf.len()) =>
            {
                Ok(None)
            }
            Mapping::Data { host, .. } => {
                self.file.debug_event(BlkdebugEvent::ReadAio);
                self.read_data(host, offset, buf).await?;
                Ok(Some(false))
            }
            Mapping::Zero => {
                buf.fill(0);
                Ok(Some(true))
            }
            Mapping::Unallocated if self.backing.is_none() => {
                buf.fill(0);
                Ok(Some(true))
            }
            _ => Ok(None),
        }
    }

    pub(super) async fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        let (mapping, len) = {
            let mut meta = self.meta.lock().await;
            self.lookup(&mut meta, offset, len).await?
        };
        let kind = match mapping {
            Mapping::Data { .. } | Mapping::Compressed { .. } => ExtentKind::Data,
            Mapping::Zero => ExtentKind::Zero { allocated: true },
            Mapping::Unallocated => ExtentKind::Unallocated,
        };
        Ok(Extent { len, kind })
    }

    /// Wait until no allocation in flight touches guest clusters `clusters`; returns with
    /// the mutex held.
    async fn settled<'a>(&'a self, clusters: Range<u64>) -> tokio::sync::MutexGuard<'a, Meta> {
        loop {
            let meta = self.meta.lock().await;
            if !meta
                .in_flight
                .iter()
                .any(|r| r.start < clusters.end && clusters.start < r.end)
            {
                return meta;
            }
            let notified = self.allocated.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            drop(meta);
            notified.await;
        }
    }

    /// Write guest bytes at `offset`, copied into owned buffers of at most `MAX_BUF`.
    pub(super) async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        if buf.is_empty() {
            return self
                .write_buf(offset, IoBuf::empty(), flags)
                .await
                .map(drop);
        }
        for (n, chunk) in buf.chunks(MAX_BUF).enumerate() {
            let mut owned = IoBuf::new(chunk.len())?;
            owned.as_mut_slice().copy_from_slice(chunk);
            let at = offset + (n * MAX_BUF) as u64;
            self.write_buf(at, owned, flags).await?;
        }
        Ok(())
    }

    /// Write guest bytes at `offset` from an owned buffer and hand it back. Where the data
    /// goes to clusters in one piece (in place, or new clusters it fills whole) the buffer
    /// itself is written, without a copy.
    pub(super) async fn write_buf(
        &self,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> io::Result<IoBuf> {
        if self.settings.crypt.is_none() {
            return self.write_steps(offset, buf, flags).await;
        }
        let (start, end) = sectors_around(offset, buf.len());
        let _held = self.sectors.lock(start, end).await;
        if whole_sectors(offset, buf.len()) {
            return self.write_steps(offset, buf, flags).await;
        }
        let mut merged = IoBuf::new((end - start) as usize)?;
        let merged_bytes = merged.as_mut_slice();
        let sector = SECTOR as usize;
        if offset != start {
            Box::pin(self.read(start, &mut merged_bytes[..sector])).await?;
        }
        let tail = merged_bytes.len() - sector;
        if offset + buf.len() as u64 != end && (tail > 0 || offset == start) {
            Box::pin(self.read(end - SECTOR, &mut merged_bytes[tail..])).await?;
        }
        let head = (offset - start) as usize;
        merged_bytes[head..head + buf.len()].copy_from_slice(buf.as_slice());
        self.write_steps(start, merged, flags).await?;
        Ok(buf)
    }

    async fn write_steps(
        &self,
        offset: u64,
        mut buf: IoBuf,
        flags: WriteFlags,
    ) -> io::Result<IoBuf> {
        let mut done = IoBuf::empty();
        while !buf.is_empty() {
            let pos = offset + done.len() as u64;
            let written = self.write_step(pos, &mut buf).await?;
            join(&mut done, written)?;
        }
        if flags.fua {
            self.flush().await?;
        }
        Ok(done)
    }

    /// Write whole guest clusters compressed (QEMU's compressed writes): `offset` starts a
    /// cluster and `buf` ends one or the disk. Each cluster must not be allocated yet
    /// (EIO otherwise, as in QEMU); one that does not compress below a cluster is written
    /// as is.
    pub(super) async fn write_compressed(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        // Compressed clusters are stored as they are: QEMU writes none into encrypted images.
        if self.settings.crypt.is_some() {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        let cluster_size = self.cluster_size();
        let end = offset + buf.len() as u64;
        if !offset.is_multiple_of(cluster_size)
            || (!end.is_multiple_of(cluster_size) && end != self.size)
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        for (n, data) in buf.chunks(cluster_size as usize).enumerate() {
            let pos = offset + n as u64 * cluster_size;
            self.write_compressed_cluster(pos, data).await?;
        }
        Ok(())
    }

    async fn write_compressed_cluster(&self, pos: u64, data: &[u8]) -> io::Result<()> {
        let cluster_size = self.cluster_size() as usize;
        // The disk's last cluster may be partial: it is compressed padded with zeroes.
        let mut whole = vec![0u8; cluster_size];
        whole[..data.len()].copy_from_slice(data);
        // Compressing a cluster takes about a millisecond: not on the I/O thread.
        let compression = self.compression;
        let compressed = crate::iothread::cpu_bound(move || compression.compress(&whole)).await?;
        let Some(compressed) = compressed else {
            return self.write(pos, data, WriteFlags::default()).await;
        };
        let len = compressed.len() as u64;
        let guest_cluster = pos >> self.cluster_bits;
        let mut meta = self.settled(guest_cluster..guest_cluster + 1).await;
        let l1_index = (pos / self.l2_coverage()) as usize;
        let l2_offset = self.writable_l2(&mut meta, l1_index).await?;
        let index = (guest_cluster as usize) & (self.l2_entries() - 1);
        let extended = self.extended;
        let (old, _) = self
            .l2_table(&mut meta, l2_offset)
            .await?
            .get(index, extended);
        if old & (OFFSET_MASK | COMPRESSED) != 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.file.debug_event(BlkdebugEvent::ClusterAllocBytes);
        let host = meta.refcounts.allocate_bytes(len).await?;
        let shift = 62 - (self.cluster_bits - 8);
        let placed = host + len <= 1 << shift;
        let written = match meta.map.check(host, len, None, &meta.refcounts) {
            Err(e) => Err(e),
            Ok(()) if !placed => Err(io::Error::from_raw_os_error(libc::EFBIG)),
            // Under the lock: the next compressed cluster may share this one's last
            // sector, and the file's read-modify-write of it must not interleave.
            Ok(()) => {
                self.file.debug_event(BlkdebugEvent::WriteCompressed);
                self.file
                    .write(host, &compressed, WriteFlags::default())
                    .await
            }
        };
        if let Err(e) = written {
            // `allocate_bytes` keeps the bytes within one host cluster.
            meta.refcounts
                .release(host >> self.cluster_bits, Freed::Never)
                .await?;
            return Err(e);
        }
        let sectors = ((host + len - 1) >> 9) - (host >> 9);
        let table = self.l2_table(&mut meta, l2_offset).await?;
        table.set(index, extended, COMPRESSED | (sectors << shift) | host, 0);
        drop(meta);
        self.allocated.notify_waiters();
        Ok(())
    }

    /// Write a first part of `data` at `pos`: in place where the clusters are this image's
    /// alone, else into new clusters. Splits off and returns the part written.
    async fn write_step(&self, pos: u64, data: &mut IoBuf) -> io::Result<IoBuf> {
        let cluster_size = self.cluster_size();
        let end = pos + data.len() as u64;
        let clusters = pos >> self.cluster_bits..end.div_ceil(cluster_size);
        let mut meta = self.settled(clusters).await;
        let (mapping, len) = self.lookup(&mut meta, pos, data.len() as u64).await?;
        if let Mapping::Data { host, copied: true } = mapping {
            self.check_data(&meta, host, len)?;
            drop(meta);
            self.file.debug_event(BlkdebugEvent::WriteAio);
            let piece = data.split_to(len as usize);
            return self.write_data_buf(host, pos, piece).await;
        }
        // One allocation within one L2 table, of clusters that all map the same way.
        let table_end = (pos / self.l2_coverage() + 1) * self.l2_coverage();
        let mut step_end = (pos + len).min(table_end).min(pos + MAX_ALLOCATION);
        let first = pos & !(cluster_size - 1);
        let l1_index = (pos / self.l2_coverage()) as usize;
        let l2_offset = self.writable_l2(&mut meta, l1_index).await?;
        // What the new clusters hold of the guest range: all of it, or with extended L2
        // entries over clusters without data, only the subclusters the write touches.
        let mut fill = first..step_end.next_multiple_of(cluster_size);
        if self.extended {
            let granule = 1u64 << self.granule_bits();
            let index_mask = self.l2_entries() - 1;
            let index = (pos >> self.cluster_bits) as usize & index_mask;
            let table = self.l2_table(&mut meta, l2_offset).await?;
            let (entry, _) = table.get(index, true);
            let cluster_end = first + cluster_size;
            if entry & COMPRESSED == 0 && entry & COPIED != 0 && entry & OFFSET_MASK != 0 {
                let step_end = step_end.min(cluster_end);
                let fill = pos & !(granule - 1)..step_end.next_multiple_of(granule);
                return self
                    .fill_in_place(meta, l2_offset, index, entry & OFFSET_MASK, fill, pos, data)
                    .await;
            }
            if entry & (COMPRESSED | OFFSET_MASK) == 0 {
                // New clusters for the run of clusters without one, which only take the
                // subclusters written.
                let mut run_end = cluster_end;
                while run_end < step_end {
                    let next = (run_end >> self.cluster_bits) as usize & index_mask;
                    if table.get(next, true).0 & (COMPRESSED | OFFSET_MASK) != 0 {
                        break;
                    }
                    run_end += cluster_size;
                }
                step_end = step_end.min(run_end);
                fill = pos & !(granule - 1)..step_end.next_multiple_of(granule);
            } else {
                // A compressed cluster, or one a snapshot shares: copied whole.
                step_end = step_end.min(cluster_end);
                fill = first..cluster_end;
            }
        } else if self.version >= 3 {
            // A zero cluster that keeps its host cluster (a zero write without unmap, or a
            // discard with discard-no-unref) and this image alone owns: written in place,
            // its zeroes around the data, so it is not reallocated elsewhere.
            let index = (pos >> self.cluster_bits) as usize & (self.l2_entries() - 1);
            let table = self.l2_table(&mut meta, l2_offset).await?;
            let (entry, _) = table.get(index, false);
            let zero_owned = entry & (ZERO | COPIED) == ZERO | COPIED
                && entry & COMPRESSED == 0
                && entry & OFFSET_MASK != 0;
            if zero_owned {
                let cluster_end = first + cluster_size;
                return self
                    .fill_in_place(
                        meta,
                        l2_offset,
                        index,
                        entry & OFFSET_MASK,
                        first..cluster_end,
                        pos,
                        data,
                    )
                    .await;
            }
        }
        let last = fill.end.next_multiple_of(cluster_size);
        let count = (last - first) >> self.cluster_bits;
        self.file.debug_event(BlkdebugEvent::ClusterAlloc);
        let host = self.allocate_data(&mut meta, first, count).await?;
        // The guest data first, then what is copied around it, as QEMU checks them.
        let data_at = host + (pos - first);
        let checked = [
            (data_at, step_end - pos),
            (host + (fill.start - first), pos - fill.start),
            (host + (step_end - first), fill.end - step_end),
        ]
        .into_iter()
        .try_for_each(|(at, len)| self.check_data(&meta, at, len));
        if let Err(e) = checked {
            self.release_data(&mut meta, host, count).await?;
            return Err(e);
        }
        let guest_clusters = first >> self.cluster_bits..last >> self.cluster_bits;
        meta.in_flight.push(guest_clusters.clone());
        drop(meta);

        let piece = data.split_to((step_end - pos) as usize);
        let written = self
            .fill_clusters(host + (fill.start - first), fill.clone(), pos, piece)
            .await;

        let mut meta = self.meta.lock().await;
        meta.in_flight.retain(|r| *r != guest_clusters);
        let result = match written {
            Ok(piece) => self
                .map_clusters(&mut meta, l2_offset, first, host, count, fill)
                .await
                .map(|()| piece),
            Err(e) => Err(e),
        };
        if result.is_err() {
            // Nothing points at the new clusters: they are free again at once.
            self.release_data(&mut meta, host, count).await?;
        }
        drop(meta);
        self.allocated.notify_waiters();
        result
    }

    /// Write `data` at `pos` into `fill` of a cluster this image alone owns at `host`
    /// whose `fill` part holds no data yet (with extended L2 entries, unallocated or zero
    /// subclusters; else a zero cluster, `fill` all of it), merged with what the guest
    /// reads around it, then mark it allocated. Other requests to the cluster wait while it
    /// is in flight; writes in place to its allocated subclusters that started before touch
    /// other bytes.
    #[allow(clippy::too_many_arguments)]
    async fn fill_in_place(
        &self,
        mut meta: tokio::sync::MutexGuard<'_, Meta>,
        l2_offset: u64,
        index: usize,
        host: u64,
        fill: Range<u64>,
        pos: u64,
        data: &mut IoBuf,
    ) -> io::Result<IoBuf> {
        let cluster_mask = self.cluster_size() - 1;
        let step_end = fill.end.min(pos + data.len() as u64);
        let at = host + (fill.start & cluster_mask);
        self.check_data(&meta, at, fill.end - fill.start)?;
        let guest_cluster = pos >> self.cluster_bits;
        let in_flight = guest_cluster..guest_cluster + 1;
        meta.in_flight.push(in_flight.clone());
        drop(meta);
        let piece = data.split_to((step_end - pos) as usize);
        let written = self.fill_clusters(at, fill.clone(), pos, piece).await;
        let mut meta = self.meta.lock().await;
        meta.in_flight.retain(|r| *r != in_flight);
        let result = match written {
            Ok(piece) => {
                let subclusters = subcluster_mask(fill, self.cluster_bits, self.granule_bits());
                let extended = self.extended;
                let table = self.l2_table(&mut meta, l2_offset).await?;
                let (entry, bitmap) = table.get(index, extended);
                if extended {
                    let allocated = (bitmap & ALL_ALLOCATED) | subclusters;
                    let zero = (bitmap >> 32) & !subclusters;
                    table.set(index, true, entry, allocated | zero << 32);
                } else {
                    table.set(index, false, entry & !ZERO, 0);
                }
                Ok(piece)
            }
            Err(e) => Err(e),
        };
        drop(meta);
        self.allocated.notify_waiters();
        result
    }

    /// Write `data` (guest bytes at `pos`) into new clusters at `host` that stand for the
    /// guest range `guest`; what the write leaves of them is copied from what the guest
    /// reads there now.
    async fn fill_clusters(
        &self,
        host: u64,
        guest: Range<u64>,
        pos: u64,
        data: IoBuf,
    ) -> io::Result<IoBuf> {
        let head = (pos - guest.start) as usize;
        let tail = (guest.end - pos - data.len() as u64) as usize;
        if head == 0 && tail == 0 {
            self.file.debug_event(BlkdebugEvent::WriteAio);
            return self.write_data_buf(host, pos, data).await;
        }
        let mut merged = vec![0u8; (guest.end - guest.start) as usize];
        let data_end = head + data.len();
        self.file.debug_event(BlkdebugEvent::CowRead);
        if head > 0 {
            self.read(guest.start, &mut merged[..head]).await?;
        }
        if tail > 0 {
            self.read(pos + data.len() as u64, &mut merged[data_end..])
                .await?;
        }
        merged[head..data_end].copy_from_slice(data.as_slice());
        self.file.debug_event(BlkdebugEvent::CowWrite);
        self.write_data(host, guest.start, &merged).await?;
        Ok(data)
    }

    /// Point the L2 entries of `count` guest clusters from `guest` at the new host clusters
    /// from `host`; the references the old entries held go at the next write-back. With
    /// extended L2 entries only the subclusters of `fill` are allocated: the others keep
    /// reading as they did (from the backing file, or zeroes).
    async fn map_clusters(
        &self,
        meta: &mut Meta,
        l2_offset: u64,
        guest: u64,
        host: u64,
        count: u64,
        fill: Range<u64>,
    ) -> io::Result<()> {
        let cluster_bits = self.cluster_bits;
        let (extended, granule_bits) = (self.extended, self.granule_bits());
        let start = ((guest >> cluster_bits) as usize) & (self.l2_entries() - 1);
        let table = self.l2_table(meta, l2_offset).await?;
        let mut released = Vec::new();
        for n in 0..count as usize {
            let (old, old_bitmap) = table.get(start + n, extended);
            released.extend(self.owned(old));
            let cluster = guest + ((n as u64) << cluster_bits);
            let within = fill.start.max(cluster)..fill.end.min(cluster + (1 << cluster_bits));
            let allocated = subcluster_mask(within, cluster_bits, granule_bits);
            let zero = (old_bitmap >> 32) & !allocated;
            let entry = (host + ((n as u64) << cluster_bits)) | COPIED;
            table.set(start + n, extended, entry, allocated | zero << 32);
        }
        meta.pending_free
            .extend(released.into_iter().map(|c| (c, Freed::Never)));
        Ok(())
    }

    /// The L2 table for L1 entry `l1_index`, which this image alone uses: a new one if there
    /// is none, or a copy of one a snapshot shares. Its refcount is made stable first, then
    /// the table is written, then the L1 entry points at it.
    async fn writable_l2(&self, meta: &mut Meta, l1_index: usize) -> io::Result<u64> {
        let entry = *meta
            .l1
            .get(l1_index)
            .ok_or_else(|| corrupt("write past the L1 table".into()))?;
        let old = self.l2_offset(entry, l1_index)?;
        if old != 0 && entry & COPIED != 0 {
            // Its write-back will be refused if it lies on other metadata: refuse the
            // change now, before guest data is written for it.
            meta.map.check(
                old,
                self.cluster_size(),
                Some(Metadata::ActiveL2),
                &meta.refcounts,
            )?;
            return Ok(old);
        }
        let entries = if old == 0 {
            vec![0u64; (self.cluster_size() / 8) as usize]
        } else {
            self.l2_table(meta, old).await?.entries.clone()
        };
        let new = meta.refcounts.allocate(1).await? << self.cluster_bits;
        let result = async {
            meta.refcounts.write_back(&meta.map).await?;
            meta.map.check(
                new,
                self.cluster_size(),
                Some(Metadata::ActiveL2),
                &meta.refcounts,
            )?;
            self.file.flush().await?;
            self.file.debug_event(BlkdebugEvent::L2AllocWrite);
            self.file
                .write(new, &to_bytes(&entries), WriteFlags::default())
                .await?;
            self.file.flush().await?;
            meta.l1[l1_index] = new | COPIED;
            self.write_l1_entry(meta, l1_index).await
        }
        .await;
        if let Err(e) = result {
            meta.l1[l1_index] = entry;
            meta.refcounts
                .release(new >> self.cluster_bits, Freed::Never)
                .await?;
            return Err(e);
        }
        if old != 0 {
            meta.l2.remove(&old);
            meta.map.remove_active_l2(old);
            meta.pending_free
                .push((old >> self.cluster_bits, Freed::Other));
        }
        meta.map.add_active_l2(new);
        self.make_room(meta).await?;
        meta.tick += 1;
        let used = meta.tick;
        meta.l2.insert(
            new,
            CachedL2 {
                entries,
                dirty: false,
                used,
            },
        );
        Ok(new)
    }

    /// Write the L1 entry at `index`, with the others of its 512-byte sector, as QEMU does.
    async fn write_l1_entry(&self, meta: &Meta, index: usize) -> io::Result<()> {
        let start = index - index % 64;
        let end = (start + 64).min(meta.l1.len());
        let at = meta.l1_offset + start as u64 * 8;
        let len = (end - start) as u64 * 8;
        meta.map
            .check(at, len, Some(Metadata::ActiveL1), &meta.refcounts)?;
        self.file.debug_event(BlkdebugEvent::L1Update);
        self.file
            .write(
                meta.l1_offset + start as u64 * 8,
                &to_bytes(&meta.l1[start..end]),
                WriteFlags::default(),
            )
            .await
    }

    /// Write the refcount blocks back, then (after a flush) the dirty L2 tables.
    async fn write_tables(&self, meta: &mut Meta) -> io::Result<()> {
        if meta.refcounts.is_dirty() {
            meta.refcounts.write_back(&meta.map).await?;
        }
        let dirty: Vec<u64> = meta
            .l2
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&offset, _)| offset)
            .collect();
        if dirty.is_empty() {
            return Ok(());
        }
        self.file.flush().await?;
        for offset in dirty {
            meta.map.check(
                offset,
                self.cluster_size(),
                Some(Metadata::ActiveL2),
                &meta.refcounts,
            )?;
            let table = meta.l2.get_mut(&offset).expect("listed above");
            self.file.debug_event(BlkdebugEvent::L2Update);
            self.file
                .write(offset, &to_bytes(&table.entries), WriteFlags::default())
                .await?;
            table.dirty = false;
        }
        Ok(())
    }

    /// Write all metadata back (see the module documentation for the order), release the
    /// references dropped since the last flush, and flush the file.
    pub(super) async fn flush(&self) -> io::Result<()> {
        let mut guard = self.meta.lock().await;
        let meta = &mut *guard;
        self.write_tables(meta).await?;
        if !meta.pending_free.is_empty() {
            self.file.flush().await?;
            while let Some(&(cluster, reason)) = meta.pending_free.last() {
                meta.refcounts.release(cluster, reason).await?;
                meta.pending_free.pop();
            }
            meta.refcounts.write_back(&meta.map).await?;
        }
        drop(guard);
        self.file.flush().await
    }

    /// Make `offset..offset+len` read as zeroes. Whole clusters become zero clusters (in
    /// version 3): with `unmap` they drop their host clusters, else clusters this image
    /// alone owns keep theirs. Partial clusters that do not read as zeroes already, and
    /// everything in version 2 images, get zeroes written.
    /// With `unmap`, the caller must keep every other request out.
    pub(super) async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let cluster_size = self.cluster_size();
        let end = offset + len;
        let first = offset.next_multiple_of(cluster_size).min(end);
        // The image's last cluster may be partial: it ends with the disk.
        let last = if end == self.size {
            end
        } else {
            (end - end % cluster_size).max(first)
        };
        if self.version < 3 {
            // No zero clusters: QEMU falls back to writing zeroes, and so do we.
            return self.write_literal_zeroes(offset, len).await;
        }
        for (from, to) in [(offset, first), (last, end)] {
            if from < to && !self.reads_zero(from, to).await? {
                self.write_literal_zeroes(from, to - from).await?;
            }
        }
        // Encrypted, a partial-sector write merging around these clusters must not put
        // back what they held: the zeroing holds their sectors as writes do.
        let _held = match &self.settings.crypt {
            Some(_) if first < last => Some(self.sectors.lock(first, last).await),
            _ => None,
        };
        for (from, to) in table_steps(self.l2_coverage(), first, last) {
            self.zero_clusters(from, to, unmap).await?;
        }
        self.zero_raw_data(first, last.saturating_sub(first), unmap)
            .await
    }

    /// Turn the whole clusters of `from..to` (within one L2 table) into zero clusters.
    async fn zero_clusters(&self, from: u64, to: u64, unmap: bool) -> io::Result<()> {
        let cluster_bits = self.cluster_bits;
        let clusters = from >> cluster_bits..to.div_ceil(self.cluster_size());
        let mut meta = self.settled(clusters.clone()).await;
        let l1_index = (from / self.l2_coverage()) as usize;
        let l2_offset = self.writable_l2(&mut meta, l1_index).await?;
        let mask = self.l2_entries() - 1;
        let extended = self.extended;
        let table = self.l2_table(&mut meta, l2_offset).await?;
        let mut released = Vec::new();
        for cluster in clusters {
            let index = cluster as usize & mask;
            let (old, _) = table.get(index, extended);
            let keep = (!unmap || self.settings.discard_no_unref)
                && old & COMPRESSED == 0
                && old & COPIED != 0
                && old & OFFSET_MASK != 0;
            let kept = if keep {
                (old & OFFSET_MASK) | COPIED
            } else {
                released.extend(self.owned(old));
                0
            };
            match extended {
                true => table.set(index, true, kept, ALL_ZERO),
                false => table.set(index, false, kept | ZERO, 0),
            }
        }
        meta.pending_free
            .extend(released.into_iter().map(|c| (c, Freed::Request)));
        Ok(())
    }

    async fn write_literal_zeroes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        while offset < end {
            let n = (end - offset).min(zeroes.len() as u64) as usize;
            self.write(offset, &zeroes[..n], WriteFlags::default())
                .await?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Drop the whole clusters of `offset..offset+len`: they read as zeroes afterwards
    /// (QEMU's discard: a zero cluster where a backing file or data showed through, version
    /// 3; unallocated in version 2 without a backing file; left alone otherwise). The
    /// caller must keep every other request out.
    pub(super) async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let cluster_size = self.cluster_size();
        let end = offset + len;
        let first = offset.next_multiple_of(cluster_size);
        let last = if end == self.size {
            end.next_multiple_of(cluster_size)
        } else {
            end - end % cluster_size
        };
        if self.version < 3 && self.backing.is_some() {
            return Ok(());
        }
        for (from, to) in table_steps(self.l2_coverage(), first, last) {
            self.discard_clusters(from, to).await?;
        }
        self.zero_raw_data(first, last.saturating_sub(first), true)
            .await
    }

    async fn discard_clusters(&self, from: u64, to: u64) -> io::Result<()> {
        let cluster_bits = self.cluster_bits;
        let mut meta = self.meta.lock().await;
        let l1_index = (from / self.l2_coverage()) as usize;
        if meta.l1.get(l1_index).is_none_or(|e| e & OFFSET_MASK == 0) {
            return Ok(());
        }
        let l2_offset = self.writable_l2(&mut meta, l1_index).await?;
        let (version, has_backing) = (self.version, self.backing.is_some());
        let extended = self.extended;
        let mask = self.l2_entries() - 1;
        let table = self.l2_table(&mut meta, l2_offset).await?;
        let mut released = Vec::new();
        let mut kept = Vec::new();
        for cluster in from >> cluster_bits..to >> cluster_bits {
            let index = cluster as usize & mask;
            let old = table.get(index, extended);
            let allocated = referenced(old.0, cluster_bits).next().is_some();
            let host = old.0 & OFFSET_MASK;
            if self.settings.discard_no_unref
                && old.0 & (COMPRESSED | COPIED) == COPIED
                && host != 0
            {
                // discard-no-unref: the cluster stays this image's, reading as zeroes.
                let new = match extended {
                    true => (host | COPIED, ALL_ZERO),
                    false => (host | COPIED | ZERO, 0),
                };
                table.set(index, extended, new.0, new.1);
                kept.push(host);
                continue;
            }
            let new = if version >= 3 && (has_backing || allocated) {
                match extended {
                    true => (0, ALL_ZERO),
                    false => (ZERO, 0),
                }
            } else if version < 3 {
                (0, 0)
            } else {
                continue;
            };
            released.extend(self.owned(old.0));
            if old != new {
                table.set(index, extended, new.0, new.1);
            }
        }
        meta.pending_free
            .extend(released.into_iter().map(|c| (c, Freed::Request)));
        drop(meta);
        if self.settings.pass_discard.request {
            // Kept clusters still give their data up, as the options ask (advisory).
            for host in kept {
                if let Err(e) = self.data.discard(host, self.cluster_size()).await {
                    tracing::debug!(host, "qcow2: discard of a kept cluster failed: {e}");
                }
            }
        }
        Ok(())
    }

    /// Change the disk size. Growing may move the L1 table to a larger one; shrinking
    /// drops the clusters past the new end. The caller must keep every other request out.
    pub(super) async fn resize(&mut self, size: u64) -> io::Result<()> {
        let needed = size.div_ceil(self.l2_coverage());
        if needed * 8 > MAX_L1_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "qcow2: the image would need too large an L1 table",
            ));
        }
        if size < self.size {
            let from = size.next_multiple_of(self.cluster_size());
            let to = self.size.next_multiple_of(self.cluster_size());
            for (from, to) in table_steps(self.l2_coverage(), from, to) {
                self.unmap_clusters(from, to).await?;
            }
            self.flush().await?;
        }
        if self.external {
            // The data file holds the disk at its own offsets: it takes the new size too.
            self.data.node().truncate(size).await?;
        }
        let grow_l1 = needed as usize > self.meta.lock().await.l1.len();
        if grow_l1 {
            self.grow_l1(needed as usize).await?;
        }
        self.file
            .write(24, &size.to_be_bytes(), WriteFlags::default())
            .await?;
        self.file.flush().await?;
        self.size = size;
        Ok(())
    }

    /// Make the clusters of `from..to` (within one L2 table) unallocated.
    async fn unmap_clusters(&self, from: u64, to: u64) -> io::Result<()> {
        let cluster_bits = self.cluster_bits;
        let mut meta = self.meta.lock().await;
        let l1_index = (from / self.l2_coverage()) as usize;
        if meta.l1.get(l1_index).is_none_or(|e| e & OFFSET_MASK == 0) {
            return Ok(());
        }
        let l2_offset = self.writable_l2(&mut meta, l1_index).await?;
        let mask = self.l2_entries() - 1;
        let table = self.l2_table(&mut meta, l2_offset).await?;
        let mut released = Vec::new();
        let extended = self.extended;
        for cluster in from >> cluster_bits..to >> cluster_bits {
            let index = cluster as usize & mask;
            released.extend(self.owned(table.get(index, extended).0));
            table.set(index, extended, 0, 0);
        }
        meta.pending_free
            .extend(released.into_iter().map(|c| (c, Freed::Always)));
        Ok(())
    }

    /// Move the L1 table to new clusters with room for `entries`: the new table is written
    /// and flushed before the header points at it, and the old one is freed after.
    async fn grow_l1(&self, entries: usize) -> io::Result<()> {
        let mut guard = self.meta.lock().await;
        let meta = &mut *guard;
        let mut l1 = meta.l1.clone();
        l1.resize(entries, 0);
        let bytes = to_bytes(&l1);
        let clusters = (bytes.len() as u64).div_ceil(self.cluster_size());
        self.file.debug_event(BlkdebugEvent::L1GrowAllocTable);
        let new = meta.refcounts.allocate(clusters).await? << self.cluster_bits;
        meta.refcounts.write_back(&meta.map).await?;
        meta.map
            .check(new, bytes.len() as u64, None, &meta.refcounts)?;
        self.file.flush().await?;
        self.file.debug_event(BlkdebugEvent::L1GrowWriteTable);
        self.file.write(new, &bytes, WriteFlags::default()).await?;
        self.file.flush().await?;
        let mut fields = [0u8; 12];
        fields[..4].copy_from_slice(&(entries as u32).to_be_bytes());
        fields[4..].copy_from_slice(&new.to_be_bytes());
        self.file.debug_event(BlkdebugEvent::L1GrowActivateTable);
        self.file.write(36, &fields, WriteFlags::default()).await?;
        self.file.flush().await?;
        let old = meta.l1_offset;
        let old_clusters = (meta.l1.len() as u64 * 8).div_ceil(self.cluster_size());
        meta.l1 = l1;
        meta.l1_offset = new;
        meta.map.set_active_l1(new, entries);
        if old != 0 {
            for cluster in old >> self.cluster_bits..(old >> self.cluster_bits) + old_clusters {
                meta.refcounts.release(cluster, Freed::Other).await?;
            }
        }
        meta.refcounts.write_back(&meta.map).await
    }
}

/// `from..to` cut where the guest ranges of L2 tables (`coverage` bytes each) end.
/// The sector size encryption works in.
const SECTOR: u64 = crypto::SECTOR as u64;
/// Guest data is encrypted this much at a time, which bounds each write's copy.
const CRYPT_CHUNK: usize = 1 << 20;

/// Appends `piece` to `done`, the parts of one buffer already read or written.
fn join(done: &mut IoBuf, piece: IoBuf) -> io::Result<()> {
    done.unsplit(piece)
        .map_err(|_| io::Error::other("qcow2: the pieces of a request's buffer came apart"))
}

fn whole_sectors(offset: u64, len: usize) -> bool {
    offset.is_multiple_of(SECTOR) && (len as u64).is_multiple_of(SECTOR)
}

/// The whole sectors a range touches.
fn sectors_around(offset: u64, len: usize) -> (u64, u64) {
    let start = offset - offset % SECTOR;
    (start, (offset + len as u64).next_multiple_of(SECTOR))
}

fn table_steps(coverage: u64, from: u64, to: u64) -> impl Iterator<Item = (u64, u64)> {
    let mut at = from;
    std::iter::from_fn(move || {
        (at < to).then(|| {
            let end = ((at / coverage + 1) * coverage).min(to);
            let step = (at, end);
            at = end;
            step
        })
    })
}

/// How an image's L2 entries are read.
#[derive(Clone, Copy, Debug)]
struct EntryLayout {
    cluster_bits: u32,
    version: u32,
    extended: bool,
}

/// An L2 entry no valid image holds.
#[derive(Debug, PartialEq, Eq)]
enum BadEntry {
    /// The host offset is not aligned to a cluster.
    Unaligned(u64),
    /// A subcluster bitmap that contradicts itself or its entry.
    Invalid,
}

/// What an L2 entry (and, with extended L2 entries, its bitmap) maps subcluster `sub` of
/// its cluster to; without extended L2 entries the whole cluster maps one way.
fn classify(entry: u64, bitmap: u64, sub: u32, layout: EntryLayout) -> Result<Mapping, BadEntry> {
    if entry & COMPRESSED != 0 {
        return match layout.extended && bitmap != 0 {
            true => Err(BadEntry::Invalid),
            false => Ok(Mapping::Compressed { entry }),
        };
    }
    let host = entry & OFFSET_MASK;
    let data = Mapping::Data {
        host,
        copied: entry & COPIED != 0,
    };
    let unaligned = host & ((1 << layout.cluster_bits) - 1) != 0;
    if layout.extended {
        let allocated = bitmap & ALL_ALLOCATED;
        let zero = bitmap >> 32;
        if (host == 0 && allocated != 0) || allocated & zero != 0 {
            return Err(BadEntry::Invalid);
        }
        if host != 0 && unaligned {
            return Err(BadEntry::Unaligned(host));
        }
        return Ok(if allocated >> sub & 1 != 0 {
            data
        } else if zero >> sub & 1 != 0 {
            Mapping::Zero
        } else {
            Mapping::Unallocated
        });
    }
    if entry & ZERO != 0 && layout.version >= 3 {
        return Ok(Mapping::Zero);
    }
    if host == 0 {
        return Ok(Mapping::Unallocated);
    }
    if unaligned {
        return Err(BadEntry::Unaligned(host));
    }
    Ok(data)
}

/// The subclusters (bits 0-31 of an extended L2 bitmap) that `range`, within one cluster
/// and aligned to subclusters, covers.
fn subcluster_mask(range: Range<u64>, cluster_bits: u32, granule_bits: u32) -> u64 {
    if range.is_empty() {
        return 0;
    }
    let cluster_mask = (1u64 << cluster_bits) - 1;
    let first = (range.start & cluster_mask) >> granule_bits;
    let count = (range.end - range.start).div_ceil(1 << granule_bits);
    (((1u64 << count) - 1) << first) & ALL_ALLOCATED
}

/// Where a compressed cluster's data lies in the file: its offset and the bytes its
/// sector count covers from there.
fn compressed_span(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let shift = 62 - (cluster_bits - 8);
    let offset = entry & ((1u64 << shift) - 1);
    let sectors = ((entry & !(COPIED | COMPRESSED)) >> shift) + 1;
    (offset, sectors * 512 - (offset & 511))
}

/// The host clusters an L2 entry holds a reference to.
fn referenced(entry: u64, cluster_bits: u32) -> Range<u64> {
    if entry & COMPRESSED != 0 {
        let (offset, len) = compressed_span(entry, cluster_bits);
        let start = offset & !511;
        let end = offset + len;
        start >> cluster_bits..((end - 1) >> cluster_bits) + 1
    } else {
        match entry & OFFSET_MASK {
            0 => 0..0,
            host => host >> cluster_bits..(host >> cluster_bits) + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STANDARD: EntryLayout = EntryLayout {
        cluster_bits: 16,
        version: 3,
        extended: false,
    };
    const EXTENDED: EntryLayout = EntryLayout {
        extended: true,
        ..STANDARD
    };

    #[test]
    fn entries_classify_as_the_specification_says() {
        let classify = |entry| classify(entry, 0, 0, STANDARD);
        assert_eq!(classify(0).unwrap(), Mapping::Unallocated);
        assert_eq!(classify(ZERO).unwrap(), Mapping::Zero);
        assert_eq!(classify(0x5_0000 | ZERO | COPIED).unwrap(), Mapping::Zero);
        assert_eq!(
            classify(0x5_0000 | COPIED).unwrap(),
            Mapping::Data {
                host: 0x5_0000,
                copied: true
            }
        );
        assert_eq!(classify(0x5_0200), Err(BadEntry::Unaligned(0x5_0200)));
        let compressed = COMPRESSED | (3 << (62 - 8)) | 0x12_3400;
        assert_eq!(
            classify(compressed).unwrap(),
            Mapping::Compressed { entry: compressed }
        );
    }

    #[test]
    fn subclusters_classify_by_their_bits() {
        let data = Mapping::Data {
            host: 0x5_0000,
            copied: true,
        };
        // Subcluster 0 allocated, 1 zero, 2 neither.
        let bitmap = 1 | 1 << 33;
        let entry = 0x5_0000 | COPIED;
        assert_eq!(classify(entry, bitmap, 0, EXTENDED), Ok(data));
        assert_eq!(classify(entry, bitmap, 1, EXTENDED), Ok(Mapping::Zero));
        assert_eq!(
            classify(entry, bitmap, 2, EXTENDED),
            Ok(Mapping::Unallocated)
        );
        // Bit 0 of the entry is not the zero flag here.
        assert_eq!(classify(entry | ZERO, bitmap, 0, EXTENDED), Ok(data));
        assert_eq!(classify(0, ALL_ZERO, 5, EXTENDED), Ok(Mapping::Zero));
        assert_eq!(classify(0, 1, 0, EXTENDED), Err(BadEntry::Invalid));
        assert_eq!(
            classify(entry, 1 | 1 << 32, 3, EXTENDED),
            Err(BadEntry::Invalid)
        );
        let compressed = COMPRESSED | 0x12_3400;
        assert_eq!(classify(compressed, 1, 0, EXTENDED), Err(BadEntry::Invalid));
    }

    #[test]
    fn subcluster_masks_cover_the_range() {
        let (cluster_bits, granule_bits) = (16, 11);
        assert_eq!(
            subcluster_mask(0..65536, cluster_bits, granule_bits),
            ALL_ALLOCATED
        );
        assert_eq!(
            subcluster_mask(2048..6144, cluster_bits, granule_bits),
            0b110
        );
        assert_eq!(
            subcluster_mask(0x1_f800..0x2_0000, cluster_bits, granule_bits),
            1 << 31
        );
        assert_eq!(subcluster_mask(4096..4096, cluster_bits, granule_bits), 0);
    }

    #[test]
    fn compressed_entries_reference_the_clusters_their_sectors_touch() {
        let bits = 16;
        // Four sectors from 0x1ff00: the last cluster's first bytes are touched too.
        let entry = COMPRESSED | (3 << (62 - 8)) | 0x1_ff00;
        assert_eq!(compressed_span(entry, bits), (0x1_ff00, 4 * 512 - 0x100));
        assert_eq!(referenced(entry, bits).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(
            referenced(0x3_0000 | COPIED, bits).collect::<Vec<_>>(),
            vec![3]
        );
        assert_eq!(referenced(ZERO, bits).count(), 0);
    }
}
