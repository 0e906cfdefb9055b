//! Persistent dirty bitmaps in the qcow2 bitmaps extension (docs/interop/qcow2.txt,
//! "Bitmaps"), loaded at open and stored at close, beside the data path (`image.rs`),
//! which keeps the autoclear bit that says the extension is consistent.
//!
//! - **Open**: the bitmap directory, tables and data are read before the data path opens.
//!   Each bitmap becomes a [`DirtyBitmap`] (persistent; enabled when its `auto` flag is
//!   set) that the graph attaches to the node. A bitmap found with `in_use` set was not
//!   saved by whoever had it last: it is loaded as inconsistent, without its bits, as QEMU
//!   does. The clusters the stored bitmaps occupy are remembered, to be freed when they are
//!   replaced.
//! - **Writable open**: every entry of the directory gets `in_use`, in place (no
//!   allocation). A crash from here on leaves bitmaps that QEMU and we load as
//!   inconsistent, rather than stale bits that would look valid.
//! - **Close** (blockdev-del, quit): the data path is flushed and then held idle for good,
//!   which makes us the only user of the refcounts. Every persistent bitmap is written to
//!   free clusters (data clusters that are all zero stay unallocated), with refcounts set
//!   through the refcount table as qcow2 requires (new refcount blocks where needed), then
//!   the header points at the new directory with the autoclear bit set, and only then are
//!   the old directory, tables and data freed. A crash in between leaks clusters at worst
//!   (qemu-img check -r fixes leaks), never loses consistency.
//! - **Flush** does not store bitmaps: Bitmaps stay `in_use` on disk until close, as
//!   QEMU's do until it closes.
//! - **Read-only opens** read the bitmaps and never write anything.

use super::header::BitmapsExt;
use super::header::{be32, be64};
use super::overlap::{Checks, MetadataMap};
use super::refcount::{Freed, Refcounts};
use crate::bitmap::DirtyBitmap;
use crate::node::{Child, WriteFlags};
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

/// Set `in_use` on every stored bitmap, in place.
pub async fn mark_in_use(file: &Child, loaded: &Loaded) -> io::Result<()> {
    let mut directory = loaded.directory.clone();
    for &at in &loaded.entry_starts {
        let flags = be32(&directory, at + 12) | FLAG_IN_USE;
        directory[at + 12..at + 16].copy_from_slice(&flags.to_be_bytes());
    }
    file.write(loaded.directory_offset, &directory, WriteFlags::default())
        .await?;
    file.flush().await
}

/// Write `bitmaps` as the image's bitmaps and free `old_clusters`. The image's format
/// driver must be idle for good (closed): this allocates clusters itself.
pub async fn store(
    file: &Arc<Child>,
    bitmaps: &[Arc<DirtyBitmap>],
    old_clusters: &[u64],
    checks: Checks,
) -> io::Result<()> {
    let mut cluster0 = vec![0u8; 512];
    file.read(0, &mut cluster0).await?;
    let cluster_size = 1u64 << be32(&cluster0, 20);
    let mut first = vec![0u8; cluster_size as usize];
    file.read(0, &mut first).await?;
    let mut refcounts = Refcounts::load(file.clone(), &first).await?;
    let map = MetadataMap::load(file, &first, None, checks).await?;

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
        let base = refcounts.allocate(next).await?;
        refcounts.write_back(&map).await?;
        // The old bitmaps are still allocated, so the whole run is new to the image.
        map.check(base * cluster_size, next * cluster_size, None, &refcounts)?;
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
        refcounts
            .release(offset / cluster_size, Freed::Always)
            .await?;
    }
    refcounts.write_back(&map).await?;
    file.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

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
