//! Persistent dirty bitmaps in the qcow2 bitmaps extension (docs/interop/qcow2.txt,
//! "Bitmaps"), kept around imago, which does not know them.
//!
//! The design follows from what imago does with an image it opens writable: it clears every
//! autoclear bit, so the bitmaps extension it keeps in the header no longer counts as
//! consistent, and it owns the refcounts (allocation) until it is closed. So:
//!
//! - **Open**: the bitmap directory, tables and data are read *before* imago opens the
//!   image, while the extension still counts. Each bitmap becomes a [`DirtyBitmap`]
//!   (persistent; enabled when its `auto` flag is set) that the graph attaches to the node.
//!   A bitmap found with `in_use` set was not saved by whoever had it last: it is loaded
//!   as inconsistent, without its bits, as QEMU does. The clusters the stored bitmaps
//!   occupy are remembered, to be freed when they are replaced.
//! - **Writable open**: once imago has opened (and cleared the autoclear bits), every entry
//!   of the directory gets `in_use`, in place (no allocation), and the autoclear bit is set
//!   again. A crash from here on leaves bitmaps that QEMU and we load as inconsistent,
//!   rather than stale bits that would look valid. imago writes only the first 72 header
//!   bytes after its open, so it never clears the bit again.
//! - **Close** (blockdev-del, quit): imago is flushed and then held idle for good, which
//!   makes us the only user of the refcounts. Every persistent bitmap is written to fresh
//!   clusters past the last used one (data clusters that are all zero stay unallocated),
//!   with refcounts set through the refcount table as qcow2 requires (new refcount blocks
//!   where needed), then the header points at the new directory with the autoclear bit
//!   set, and only then are the old directory, tables and data freed. A crash in between
//!   leaks clusters at worst (qemu-img check -r fixes leaks), never loses consistency.
//! - **Flush** does not store bitmaps: doing so means allocating while imago owns the
//!   refcounts. Bitmaps stay `in_use` on disk until close, as QEMU's do until it closes.
//! - **Read-only opens** read the bitmaps and never write anything.

use super::header::BitmapsExt;
use crate::bitmap::DirtyBitmap;
use crate::node::{Child, WriteFlags};
use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

const FLAG_IN_USE: u32 = 1 << 0;
const FLAG_AUTO: u32 = 1 << 1;
const TYPE_DIRTY_TRACKING: u8 = 1;
const ENTRY_FIXED: usize = 24;
/// Bits 9-55 of a table entry hold the cluster offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 0 of an unallocated table entry: the cluster reads as all ones.
const ALL_ONES: u64 = 1;

fn be16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().unwrap())
}

fn be64(buf: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(buf[at..at + 8].try_into().unwrap())
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("qcow2 bitmaps: {what}"))
}

/// One bitmap directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DirEntry {
    table_offset: u64,
    table_size: u32,
    flags: u32,
    kind: u8,
    granularity_bits: u8,
    extra_size: u32,
    name: String,
}

impl DirEntry {
    fn encoded_len(name_len: usize, extra_size: usize) -> usize {
        (ENTRY_FIXED + extra_size + name_len).next_multiple_of(8)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.table_offset.to_be_bytes());
        out.extend_from_slice(&self.table_size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.push(self.kind);
        out.push(self.granularity_bits);
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
    }
}

/// Parse the directory; returns each entry and where it starts in `dir`.
fn parse_directory(dir: &[u8], count: u32) -> io::Result<Vec<(usize, DirEntry)>> {
    let mut entries = Vec::new();
    let mut at = 0;
    for _ in 0..count {
        if at + ENTRY_FIXED > dir.len() {
            return Err(corrupt("directory is shorter than its entries"));
        }
        let name_size = be16(dir, at + 18) as usize;
        let extra_size = be32(dir, at + 20);
        let name_at = at + ENTRY_FIXED + extra_size as usize;
        let name = dir
            .get(name_at..name_at + name_size)
            .ok_or_else(|| corrupt("directory entry exceeds the directory"))?;
        entries.push((
            at,
            DirEntry {
                table_offset: be64(dir, at),
                table_size: be32(dir, at + 8),
                flags: be32(dir, at + 12),
                kind: dir[at + 16],
                granularity_bits: dir[at + 17],
                extra_size,
                name: String::from_utf8_lossy(name).into_owned(),
            },
        ));
        at += DirEntry::encoded_len(name_size, extra_size as usize);
    }
    Ok(entries)
}

/// The bitmaps an image held when it was opened.
#[derive(Default)]
pub struct Loaded {
    pub bitmaps: Vec<Arc<DirtyBitmap>>,
    /// The directory's entries as the image lists them.
    pub listed: Vec<Listed>,
    /// Every cluster the stored bitmaps occupy (directory, tables, data), by offset.
    pub clusters: Vec<u64>,
    directory_offset: u64,
    directory: Vec<u8>,
    entry_starts: Vec<usize>,
}

/// A bitmap as the image's directory lists it: what query-named-block-nodes reports in
/// `format-specific` (QEMU reads it from the image, not from the bitmaps in memory).
#[derive(Clone, Debug)]
pub struct Listed {
    pub name: String,
    pub granularity: u64,
    pub in_use: bool,
    pub auto: bool,
}

impl Listed {
    /// Qcow2BitmapInfo.
    pub fn to_json(&self) -> serde_json::Value {
        let mut flags = Vec::new();
        if self.in_use {
            flags.push("in-use");
        }
        if self.auto {
            flags.push("auto");
        }
        serde_json::json!({"name": self.name, "granularity": self.granularity, "flags": flags})
    }
}

/// Read the bitmaps of an image whose extension is `ext` (only a consistent one).
pub async fn load(
    file: &Child,
    ext: &BitmapsExt,
    cluster_size: u64,
    disk_size: u64,
) -> io::Result<Loaded> {
    if ext.directory_size > 64 << 20 || !ext.directory_offset.is_multiple_of(cluster_size) {
        return Err(corrupt("bad directory location"));
    }
    let mut directory = vec![0u8; ext.directory_size as usize];
    file.read(ext.directory_offset, &mut directory).await?;
    let entries = parse_directory(&directory, ext.nb_bitmaps)?;
    let mut loaded = Loaded {
        clusters: cluster_run(ext.directory_offset, ext.directory_size, cluster_size),
        directory_offset: ext.directory_offset,
        entry_starts: entries.iter().map(|(at, _)| *at).collect(),
        directory,
        ..Loaded::default()
    };
    for (_, entry) in entries {
        loaded.listed.push(Listed {
            name: entry.name.clone(),
            granularity: 1u64 << entry.granularity_bits.min(63),
            in_use: entry.flags & FLAG_IN_USE != 0,
            auto: entry.flags & FLAG_AUTO != 0,
        });
        loaded
            .bitmaps
            .push(load_one(file, &entry, cluster_size, disk_size, &mut loaded.clusters).await?);
    }
    Ok(loaded)
}

async fn load_one(
    file: &Child,
    entry: &DirEntry,
    cluster_size: u64,
    disk_size: u64,
    clusters: &mut Vec<u64>,
) -> io::Result<Arc<DirtyBitmap>> {
    if !(9..=31).contains(&entry.granularity_bits) {
        return Err(corrupt("unsupported granularity"));
    }
    let granularity = 1u64 << entry.granularity_bits;
    let bitmap = DirtyBitmap::new(Some(entry.name.clone()), granularity, disk_size);
    bitmap.set_persistent(true);
    bitmap.set_enabled(entry.flags & FLAG_AUTO != 0);
    // Checked before anything is allocated: a crafted size could ask for gigabytes.
    let data_len = data_len(disk_size, granularity);
    if u64::from(entry.table_size) != data_len.div_ceil(cluster_size) {
        return Err(corrupt("bitmap table does not match the disk size"));
    }
    let table_bytes = entry.table_size as u64 * 8;
    if table_bytes > 0 && !entry.table_offset.is_multiple_of(cluster_size) {
        return Err(corrupt("unaligned bitmap table"));
    }
    let mut table = vec![0u8; table_bytes as usize];
    file.read(entry.table_offset, &mut table).await?;
    clusters.extend(cluster_run(entry.table_offset, table_bytes, cluster_size));
    let table: Vec<u64> = table.chunks(8).map(|c| be64(c, 0)).collect();
    clusters.extend(table.iter().map(|e| e & OFFSET_MASK).filter(|&o| o != 0));

    // Bits nobody may trust, or a kind we do not know: listed, never used.
    if entry.flags & FLAG_IN_USE != 0 || entry.kind != TYPE_DIRTY_TRACKING || entry.extra_size != 0
    {
        bitmap.set_inconsistent(true);
        return Ok(Arc::new(bitmap));
    }
    let mut data = vec![0u8; (table.len() as u64 * cluster_size) as usize];
    for (chunk, entry) in data.chunks_mut(cluster_size as usize).zip(&table) {
        match entry & OFFSET_MASK {
            0 if entry & ALL_ONES != 0 => chunk.fill(0xff),
            0 => {}
            offset => file.read(offset, chunk).await?,
        }
    }
    data.truncate(data_len as usize);
    data.resize(data_len.next_multiple_of(8) as usize, 0);
    let words: Vec<u64> = data
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    bitmap.load_words(&words);
    Ok(Arc::new(bitmap))
}

/// Bytes of bitmap data for a disk: one bit per granularity unit.
fn data_len(disk_size: u64, granularity: u64) -> u64 {
    disk_size.div_ceil(granularity).div_ceil(8)
}

fn cluster_run(offset: u64, len: u64, cluster_size: u64) -> Vec<u64> {
    (0..len.div_ceil(cluster_size))
        .map(|i| offset + i * cluster_size)
        .collect()
}

/// Set `in_use` on every stored bitmap and the autoclear bit, after imago's open cleared it.
pub async fn mark_in_use(file: &Child, loaded: &Loaded) -> io::Result<()> {
    let mut directory = loaded.directory.clone();
    for &at in &loaded.entry_starts {
        let flags = be32(&directory, at + 12) | FLAG_IN_USE;
        directory[at + 12..at + 16].copy_from_slice(&flags.to_be_bytes());
    }
    file.write(loaded.directory_offset, &directory, WriteFlags::default())
        .await?;
    file.flush().await?;
    restore_autoclear(file).await
}

/// Set the bitmaps autoclear bit again after a writable imago open cleared it; the
/// directory on disk is the one [`mark_in_use`] wrote.
pub async fn restore_autoclear(file: &Child) -> io::Result<()> {
    let mut autoclear = [0u8; 8];
    file.read(88, &mut autoclear).await?;
    let autoclear = u64::from_be_bytes(autoclear) | 1;
    file.write(88, &autoclear.to_be_bytes(), WriteFlags::default())
        .await?;
    file.flush().await
}

/// Write `bitmaps` as the image's bitmaps and free `old_clusters`. The image's format
/// driver must be idle for good (closed): this allocates clusters itself.
pub async fn store(
    file: &Child,
    bitmaps: &[Arc<DirtyBitmap>],
    old_clusters: &[u64],
) -> io::Result<()> {
    let mut cluster0 = vec![0u8; 512];
    file.read(0, &mut cluster0).await?;
    let cluster_size = 1u64 << be32(&cluster0, 20);
    let mut first = vec![0u8; cluster_size as usize];
    file.read(0, &mut first).await?;
    let mut refcounts = Refcounts::load(file, &first).await?;

    // Lay everything out in one run of fresh clusters: each bitmap's nonzero data
    // clusters, then its table; the directory last.
    struct Planned {
        entry: DirEntry,
        /// Run index of each data cluster; None for one that is all zero.
        table: Vec<Option<u64>>,
        data: Vec<(u64, Vec<u8>)>,
    }
    let mut planned = Vec::new();
    let mut next = 0u64;
    for bitmap in bitmaps {
        let granularity = bitmap.granularity();
        let clusters = data_len(bitmap.size(), granularity).div_ceil(cluster_size);
        let mut bytes: Vec<u8> = Vec::new();
        if !bitmap.is_inconsistent() {
            bytes = bitmap
                .to_words()
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            bytes.truncate(data_len(bitmap.size(), granularity) as usize);
        }
        bytes.resize((clusters * cluster_size) as usize, 0);
        let mut table = Vec::new();
        let mut data = Vec::new();
        for chunk in bytes.chunks(cluster_size as usize) {
            if chunk.iter().all(|&b| b == 0) {
                table.push(None);
            } else {
                table.push(Some(next));
                data.push((next, chunk.to_vec()));
                next += 1;
            }
        }
        let table_at = next;
        next += (table.len() as u64 * 8).div_ceil(cluster_size);
        let mut flags = 0;
        if bitmap.is_inconsistent() {
            flags |= FLAG_IN_USE;
        }
        if bitmap.is_enabled() {
            flags |= FLAG_AUTO;
        }
        planned.push(Planned {
            entry: DirEntry {
                table_offset: table_at,
                table_size: table.len() as u32,
                flags,
                kind: TYPE_DIRTY_TRACKING,
                granularity_bits: granularity.trailing_zeros() as u8,
                extra_size: 0,
                name: bitmap.name().unwrap_or_default().to_string(),
            },
            table,
            data,
        });
    }
    let directory_size: u64 = planned
        .iter()
        .map(|p| DirEntry::encoded_len(p.entry.name.len(), 0) as u64)
        .sum();
    let directory_at = next;
    next += directory_size.div_ceil(cluster_size);

    let ext = if planned.is_empty() {
        None
    } else {
        let base = refcounts.allocate(next, file.node().size()).await?;
        refcounts.write_back(file).await?;
        let at = |index: u64| (base + index) * cluster_size;
        let mut directory = Vec::new();
        for p in &mut planned {
            for (index, chunk) in &p.data {
                file.write(at(*index), chunk, WriteFlags::default()).await?;
            }
            let table: Vec<u8> = p
                .table
                .iter()
                .flat_map(|i| i.map_or(0, at).to_be_bytes())
                .collect();
            if !table.is_empty() {
                file.write(at(p.entry.table_offset), &table, WriteFlags::default())
                    .await?;
            }
            p.entry.table_offset = if p.table.is_empty() {
                0
            } else {
                at(p.entry.table_offset)
            };
            p.entry.encode(&mut directory);
        }
        file.write(at(directory_at), &directory, WriteFlags::default())
            .await?;
        file.flush().await?;
        Some(BitmapsExt {
            nb_bitmaps: planned.len() as u32,
            directory_size,
            directory_offset: at(directory_at),
        })
    };

    // The header as it is now: the refcount table may have moved.
    let (table_offset, table_clusters) = refcounts.table_location();
    first[48..56].copy_from_slice(&table_offset.to_be_bytes());
    first[56..60].copy_from_slice(&table_clusters.to_be_bytes());
    let header = super::header::with_bitmaps_extension(&first, ext.as_ref())?;
    file.write(0, &header, WriteFlags::default()).await?;
    file.flush().await?;

    for &offset in old_clusters {
        refcounts.release(offset / cluster_size).await?;
    }
    refcounts.write_back(file).await?;
    file.flush().await
}

/// The image's refcounts, read and changed directly: only while nothing else allocates.
pub(super) struct Refcounts<'a> {
    file: &'a Child,
    cluster_size: u64,
    order: u32,
    table_offset: u64,
    table: Vec<u64>,
    table_dirty: bool,
    /// Where the table was before `allocate` moved it to a larger one: freed once the
    /// header points at the new table.
    moved_from: Option<(u64, u64)>,
    blocks: BTreeMap<u64, Vec<u8>>,
    dirty: std::collections::BTreeSet<u64>,
}

impl<'a> Refcounts<'a> {
    pub(super) async fn load(file: &'a Child, first: &[u8]) -> io::Result<Refcounts<'a>> {
        let cluster_size = 1u64 << be32(first, 20);
        let table_offset = be64(first, 48);
        let table_clusters = be32(first, 56) as u64;
        let order = if be32(first, 4) >= 3 {
            be32(first, 96)
        } else {
            4
        };
        if order > 6 || table_clusters > 1 << 16 {
            return Err(corrupt("bad refcount table"));
        }
        let mut raw = vec![0u8; (table_clusters * cluster_size) as usize];
        file.read(table_offset, &mut raw).await?;
        Ok(Refcounts {
            file,
            cluster_size,
            order,
            table_offset,
            table: raw.chunks(8).map(|c| be64(c, 0)).collect(),
            table_dirty: false,
            moved_from: None,
            blocks: BTreeMap::new(),
            dirty: Default::default(),
        })
    }

    /// The highest refcount an entry can hold.
    pub(super) fn max(&self) -> u64 {
        u64::MAX >> (64 - (1u32 << self.order))
    }

    fn block_entries(&self) -> u64 {
        (self.cluster_size * 8) >> self.order
    }

    /// The refcount block covering `cluster`, if it is allocated.
    async fn block(&mut self, cluster: u64) -> io::Result<Option<(u64, usize)>> {
        let table_index = cluster / self.block_entries();
        let Some(&entry) = self.table.get(table_index as usize) else {
            return Ok(None);
        };
        let offset = entry & !0x1ff;
        if offset == 0 {
            return Ok(None);
        }
        if !self.blocks.contains_key(&table_index) {
            let mut buf = vec![0u8; self.cluster_size as usize];
            self.file.read(offset, &mut buf).await?;
            self.blocks.insert(table_index, buf);
        }
        Ok(Some((
            table_index,
            (cluster % self.block_entries()) as usize,
        )))
    }

    pub(super) async fn get(&mut self, cluster: u64) -> io::Result<u64> {
        Ok(match self.block(cluster).await? {
            Some((block, index)) => read_refcount(&self.blocks[&block], index, self.order),
            None => 0,
        })
    }

    pub(super) async fn set(&mut self, cluster: u64, value: u64) -> io::Result<()> {
        let (block, index) = self
            .block(cluster)
            .await?
            .ok_or_else(|| corrupt("no refcount block for a cluster in use"))?;
        let order = self.order;
        write_refcount(self.blocks.get_mut(&block).unwrap(), index, order, value);
        self.dirty.insert(block);
        Ok(())
    }

    /// Take `count` consecutive free clusters past everything in use (and past the end of
    /// the file, `file_size`), with refcount 1; returns the first cluster's index. The
    /// refcount blocks they need follow them, refcounting themselves, and so does a larger
    /// refcount table when the current one cannot reach them all (QEMU grows it the same
    /// way); `write_back` then switches the header to it.
    pub(super) async fn allocate(&mut self, count: u64, file_size: u64) -> io::Result<u64> {
        let mut start = file_size.div_ceil(self.cluster_size).max(1);
        let mut cluster = start;
        while cluster < start + count {
            if self.get(cluster).await? != 0 {
                start = cluster + 1;
            }
            cluster += 1;
        }
        // The run, its new refcount blocks and a new table each may need more of the
        // others: grow the plan until it covers itself.
        let entries = self.block_entries();
        let entry_bytes = 8;
        let (mut new_blocks, mut table_clusters) = (Vec::new(), 0u64);
        loop {
            let end = start + count + new_blocks.len() as u64 + table_clusters;
            let last_index = (end - 1) / entries;
            let missing: Vec<u64> = (start / entries..=last_index)
                .filter(|&i| self.table.get(i as usize).is_none_or(|e| e & !0x1ff == 0))
                .collect();
            let needed = if last_index as usize >= self.table.len() {
                ((last_index + 1) * entry_bytes).div_ceil(self.cluster_size)
            } else {
                0
            };
            if missing == new_blocks && needed == table_clusters {
                break;
            }
            (new_blocks, table_clusters) = (missing, needed);
        }
        let blocks_at = start + count;
        let table_at = blocks_at + new_blocks.len() as u64;
        if table_clusters > 0 {
            let old_clusters = (self.table.len() as u64 * entry_bytes).div_ceil(self.cluster_size);
            self.moved_from = Some((self.table_offset, old_clusters));
            self.table_offset = table_at * self.cluster_size;
            self.table.resize(
                (table_clusters * self.cluster_size / entry_bytes) as usize,
                0,
            );
        }
        for (n, &index) in new_blocks.iter().enumerate() {
            self.table[index as usize] = (blocks_at + n as u64) * self.cluster_size;
            self.table_dirty = true;
            self.blocks
                .insert(index, vec![0u8; self.cluster_size as usize]);
            self.dirty.insert(index);
        }
        for cluster in start..table_at + table_clusters {
            self.set(cluster, 1).await?;
        }
        Ok(start)
    }

    /// Where the refcount table is now, and its length in clusters (for the header).
    pub(super) fn table_location(&self) -> (u64, u32) {
        let clusters = (self.table.len() as u64 * 8).div_ceil(self.cluster_size);
        (self.table_offset, clusters as u32)
    }

    pub(super) async fn release(&mut self, cluster: u64) -> io::Result<()> {
        match self.get(cluster).await? {
            0 => {
                tracing::warn!(cluster, "qcow2: freeing a cluster that is already free");
                Ok(())
            }
            n => self.set(cluster, n - 1).await,
        }
    }

    /// Write changed refcount blocks, then the refcount table entries that point at new ones.
    pub(super) async fn write_back(&mut self, file: &Child) -> io::Result<()> {
        for block in std::mem::take(&mut self.dirty) {
            let offset = self.table[block as usize] & !0x1ff;
            file.write(offset, &self.blocks[&block], WriteFlags::default())
                .await?;
        }
        if std::mem::take(&mut self.table_dirty) {
            file.flush().await?;
            let raw: Vec<u8> = self.table.iter().flat_map(|e| e.to_be_bytes()).collect();
            file.write(self.table_offset, &raw, WriteFlags::default())
                .await?;
        }
        if let Some((old_offset, old_clusters)) = self.moved_from.take() {
            // The new table is complete on disk before the header points at it; a crash
            // before the switch leaks the new clusters at worst.
            file.flush().await?;
            let (offset, clusters) = self.table_location();
            let mut fields = [0u8; 12];
            fields[..8].copy_from_slice(&offset.to_be_bytes());
            fields[8..].copy_from_slice(&clusters.to_be_bytes());
            file.write(48, &fields, WriteFlags::default()).await?;
            file.flush().await?;
            let first = old_offset / self.cluster_size;
            for cluster in first..first + old_clusters {
                self.release(cluster).await?;
            }
            for block in std::mem::take(&mut self.dirty) {
                let offset = self.table[block as usize] & !0x1ff;
                file.write(offset, &self.blocks[&block], WriteFlags::default())
                    .await?;
            }
        }
        file.flush().await
    }
}

fn read_refcount(block: &[u8], index: usize, order: u32) -> u64 {
    let bits = 1usize << order;
    if bits >= 8 {
        let bytes = bits / 8;
        block[index * bytes..(index + 1) * bytes]
            .iter()
            .fold(0, |acc, &b| acc << 8 | b as u64)
    } else {
        let bit = index * bits;
        (block[bit / 8] >> (bit % 8)) as u64 & ((1 << bits) - 1)
    }
}

fn write_refcount(block: &mut [u8], index: usize, order: u32, value: u64) {
    let bits = 1usize << order;
    if bits >= 8 {
        let bytes = bits / 8;
        let be = value.to_be_bytes();
        block[index * bytes..(index + 1) * bytes].copy_from_slice(&be[8 - bytes..]);
    } else {
        let bit = index * bits;
        let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
        block[bit / 8] = (block[bit / 8] & !mask) | ((value as u8) << (bit % 8) & mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcounts_of_every_width() {
        for order in 0..=6 {
            let mut block = vec![0u8; 64];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            write_refcount(&mut block, 3, order, 1);
            write_refcount(&mut block, 4, order, max);
            assert_eq!(read_refcount(&block, 3, order), 1, "order {order}");
            assert_eq!(read_refcount(&block, 4, order), max, "order {order}");
            assert_eq!(read_refcount(&block, 2, order), 0, "order {order}");
            assert_eq!(read_refcount(&block, 5, order), 0, "order {order}");
        }
    }

    #[test]
    fn directory_entries_round_trip() {
        let entry = DirEntry {
            table_offset: 0x50000,
            table_size: 1,
            flags: FLAG_AUTO,
            kind: TYPE_DIRTY_TRACKING,
            granularity_bits: 16,
            extra_size: 0,
            name: "bitmap0".into(),
        };
        let mut dir = Vec::new();
        entry.encode(&mut dir);
        let second = DirEntry {
            name: "b".into(),
            flags: FLAG_IN_USE,
            ..entry.clone()
        };
        second.encode(&mut dir);
        assert_eq!(dir.len(), 32 + 32);
        let parsed = parse_directory(&dir, 2).unwrap();
        assert_eq!(parsed, vec![(0, entry), (32, second)]);
        assert!(parse_directory(&dir, 3).is_err());
    }
}
