//! qcow2 refcounts (docs/interop/qcow2.txt, "Cluster mapping" and "Host cluster
//! management"): the refcount table, a cache of refcount blocks, and cluster allocation.
//!
//! Changes are made in memory and written by [`Refcounts::write_back`], blocks first and the
//! table after them, so a table entry never points at a block that is not on disk. The
//! callers order the rest: a refcount increment must be stable before any table that
//! references the cluster is written, and a decrement only after the last table that
//! referenced it no longer does (see `image.rs`, which defers frees to its flush).
//!
//! A cluster whose refcount drops to 0 is also discarded in the image file when the
//! reason it was freed is one the `pass-discard-*` options pass on ([`Freed`],
//! [`PassDiscard`]): at the end of the next write-back, and only if nothing took it again
//! in between.
//!
//! Allocation takes the first run of free clusters from a cursor that only moves back when
//! a cluster is freed (QEMU's `free_cluster_index`), within the clusters that have a
//! refcount block; past those it appends at the end of the file, followed by the refcount
//! blocks the run needs and, when the table cannot reach them, a larger table, laid out so
//! that the new blocks count themselves and the table.

use super::header::{be32, be64};
use super::overlap::{hex, Corruption, Metadata, MetadataMap};
use crate::drivers::blkdebug::BlkdebugEvent;
use crate::node::{Child, WriteFlags};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::ops::Range;
use std::sync::Arc;

/// The low 9 bits of a refcount table entry are reserved.
const TABLE_OFFSET_MASK: u64 = !0x1ff;
/// QEMU's limit for the refcount table (QCOW_MAX_REFTABLE_SIZE): 8 MiB.
pub(super) const MAX_TABLE_BYTES: u64 = 8 << 20;
/// Clean blocks kept in memory beyond this many are dropped, least recently used first,
/// unless the open image's `refcount-cache-size` says otherwise.
const CACHED_BLOCKS: usize = 64;

fn corrupt(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("qcow2 refcounts: {what}"),
    )
}

/// Why a cluster lost a reference (QEMU's discard types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Freed {
    /// A guest discard or a zero write that may unmap.
    Request,
    /// A snapshot's clusters, its L1 copy or an old snapshot table.
    Snapshot,
    /// Old metadata moved elsewhere (an L1 or refcount table that grew, a copied L2 table).
    Other,
    /// Clusters no guest or snapshot could have seen in use: their discard is always passed.
    Always,
    /// An allocation undone after a failure, or a shared cluster copied on write: never.
    Never,
}

/// Which freed clusters are discarded in the image file (QEMU's `pass-discard-request`,
/// `-snapshot` and `-other`); the file node's own `discard` option still decides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct PassDiscard {
    pub request: bool,
    pub snapshot: bool,
    pub other: bool,
}

impl PassDiscard {
    fn passes(self, reason: Freed) -> bool {
        match reason {
            Freed::Request => self.request,
            Freed::Snapshot => self.snapshot,
            Freed::Other => self.other,
            Freed::Always => true,
            Freed::Never => false,
        }
    }
}

/// The image's refcounts.
pub(super) struct Refcounts {
    file: Arc<Child>,
    cluster_bits: u32,
    order: u32,
    table_offset: u64,
    table: Vec<u64>,
    table_dirty: bool,
    /// Where the table was before `allocate` moved it to a larger one: freed once the
    /// header points at the new table.
    moved_from: Option<(u64, u64)>,
    /// Cached blocks by table index, with the tick they were last used at.
    blocks: BTreeMap<u64, (Vec<u8>, u64)>,
    /// Where the blocks the table points at lie, for the overlap checks.
    block_offsets: BTreeSet<u64>,
    dirty: BTreeSet<u64>,
    tick: u64,
    /// No cluster below this one is free.
    free_cursor: u64,
    /// The first cluster past everything allocated and past the end of the file.
    end: u64,
    /// Where the next compressed cluster's bytes may go: the free tail of the cluster the
    /// last one went into (0: none). Forgotten when that cluster's refcount drops to 0,
    /// since it may then be handed out whole to someone else.
    free_byte_offset: u64,
    pass_discard: PassDiscard,
    /// How many blocks the cache keeps; dirty ones stay until written back.
    capacity: usize,
    /// Freed clusters to discard in the file at the next write-back; one taken again
    /// leaves the set.
    to_discard: BTreeSet<u64>,
}

impl Refcounts {
    /// The refcounts of the image whose first cluster (header) is `first`.
    pub(super) async fn load(file: Arc<Child>, first: &[u8]) -> io::Result<Refcounts> {
        if first.len() < 100 {
            return Err(corrupt("header is too short"));
        }
        let cluster_bits = be32(first, 20);
        let table_offset = be64(first, 48);
        let table_clusters = be32(first, 56) as u64;
        let order = if be32(first, 4) >= 3 {
            be32(first, 96)
        } else {
            4
        };
        if !(9..=21).contains(&cluster_bits) || order > 6 {
            return Err(corrupt("bad cluster size or refcount width"));
        }
        let table_bytes = table_clusters << cluster_bits;
        if table_bytes > MAX_TABLE_BYTES {
            return Err(corrupt("refcount table too large"));
        }
        if table_offset & ((1 << cluster_bits) - 1) != 0 {
            return Err(corrupt("refcount table offset is not aligned to a cluster"));
        }
        let mut raw = vec![0u8; table_bytes as usize];
        file.debug_event(BlkdebugEvent::ReftableLoad);
        file.read(table_offset, &mut raw).await?;
        let end = file.node().size().div_ceil(1 << cluster_bits).max(1);
        let table: Vec<u64> = raw.chunks(8).map(|c| be64(c, 0)).collect();
        let block_offsets = table
            .iter()
            .map(|e| e & TABLE_OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        Ok(Refcounts {
            file,
            cluster_bits,
            order,
            table_offset,
            table,
            table_dirty: false,
            moved_from: None,
            blocks: BTreeMap::new(),
            block_offsets,
            dirty: BTreeSet::new(),
            tick: 0,
            free_cursor: 0,
            end,
            free_byte_offset: 0,
            pass_discard: PassDiscard::default(),
            capacity: CACHED_BLOCKS,
            to_discard: BTreeSet::new(),
        })
    }

    /// Discard clusters freed for the reasons `pass` names.
    pub(super) fn with_pass_discard(mut self, pass: PassDiscard) -> Refcounts {
        self.pass_discard = pass;
        self
    }

    /// Keep at most `blocks` clean blocks cached.
    pub(super) fn with_capacity(mut self, blocks: usize) -> Refcounts {
        self.capacity = blocks;
        self
    }

    /// The highest refcount an entry can hold.
    pub(super) fn max(&self) -> u64 {
        u64::MAX >> (64 - (1u32 << self.order))
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn block_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.order
    }

    /// Whether refcounts changed in memory since the last `write_back`.
    pub(super) fn is_dirty(&self) -> bool {
        !self.dirty.is_empty() || self.table_dirty || self.moved_from.is_some()
    }

    /// The refcount block covering `cluster`, loaded, if the table points at one.
    async fn block(&mut self, cluster: u64) -> io::Result<Option<(u64, usize)>> {
        let table_index = cluster / self.block_entries();
        let Some(&entry) = self.table.get(table_index as usize) else {
            return Ok(None);
        };
        let offset = entry & TABLE_OFFSET_MASK;
        if offset == 0 {
            return Ok(None);
        }
        self.tick += 1;
        let tick = self.tick;
        if let Some(cached) = self.blocks.get_mut(&table_index) {
            cached.1 = tick;
        } else {
            if offset & (self.cluster_size() - 1) != 0 {
                return Err(Corruption::found(format!(
                    "Refblock offset {} unaligned (reftable index: {})",
                    hex(offset),
                    hex(table_index)
                )));
            }
            let mut buf = vec![0u8; self.cluster_size() as usize];
            self.file.debug_event(BlkdebugEvent::RefblockLoad);
            self.file.read(offset, &mut buf).await?;
            self.evict();
            self.blocks.insert(table_index, (buf, tick));
        }
        Ok(Some((
            table_index,
            (cluster % self.block_entries()) as usize,
        )))
    }

    /// Drop the least recently used clean block while too many are cached.
    fn evict(&mut self) {
        while self.blocks.len() >= self.capacity {
            let oldest = self
                .blocks
                .iter()
                .filter(|(index, _)| !self.dirty.contains(index))
                .min_by_key(|(_, (_, tick))| *tick)
                .map(|(&index, _)| index);
            match oldest {
                Some(index) => self.blocks.remove(&index),
                None => return,
            };
        }
    }

    pub(super) async fn get(&mut self, cluster: u64) -> io::Result<u64> {
        Ok(match self.block(cluster).await? {
            Some((block, index)) => read_refcount(&self.blocks[&block].0, index, self.order),
            None => 0,
        })
    }

    pub(super) async fn set(&mut self, cluster: u64, value: u64) -> io::Result<()> {
        let (block, index) = self
            .block(cluster)
            .await?
            .ok_or_else(|| corrupt("no refcount block for a cluster in use"))?;
        let order = self.order;
        let cached = self.blocks.get_mut(&block).expect("block() loaded it");
        write_refcount(&mut cached.0, index, order, value);
        self.dirty.insert(block);
        if value != 0 && !self.to_discard.is_empty() {
            self.to_discard.remove(&cluster);
        }
        if value == 0 {
            self.free_cursor = self.free_cursor.min(cluster);
            if self.free_byte_offset != 0 && self.free_byte_offset >> self.cluster_bits == cluster {
                self.free_byte_offset = 0;
            }
        }
        Ok(())
    }

    /// Take `len` bytes (less than a cluster) for a compressed cluster; returns their file
    /// offset. Compressed clusters are packed one after the other as QEMU packs them: each
    /// adds a reference to every host cluster its bytes touch, so one that does not fit in
    /// the rest of the current cluster starts a new one (QEMU would continue into the next
    /// cluster when it happens to be free; starting afresh only leaves a tail unused).
    pub(super) async fn allocate_bytes(&mut self, len: u64) -> io::Result<u64> {
        let cluster_size = self.cluster_size();
        debug_assert!(len > 0 && len < cluster_size);
        let at = self.free_byte_offset;
        let fits = at != 0 && (at & (cluster_size - 1)) + len <= cluster_size;
        let offset = match fits {
            true => {
                let cluster = at >> self.cluster_bits;
                match self.get(cluster).await? {
                    // Shared by as many compressed clusters as the refcount can count.
                    n if n > 0 && n < self.max() => {
                        self.set(cluster, n + 1).await?;
                        at
                    }
                    _ => self.allocate(1).await? << self.cluster_bits,
                }
            }
            false => self.allocate(1).await? << self.cluster_bits,
        };
        let end = offset + len;
        self.free_byte_offset = match end & (cluster_size - 1) {
            0 => 0,
            _ => end,
        };
        Ok(offset)
    }

    /// Take `count` consecutive free clusters with refcount 1; returns the first one's
    /// index. Reuses free clusters where refcount blocks already cover a long enough run,
    /// else appends (see the module documentation).
    pub(super) async fn allocate(&mut self, count: u64) -> io::Result<u64> {
        if let Some(start) = self.find_free(count).await? {
            for cluster in start..start + count {
                self.set(cluster, 1).await?;
            }
            return Ok(start);
        }
        self.append(count).await
    }

    /// The first run of `count` free clusters below `end` that refcount blocks cover.
    async fn find_free(&mut self, count: u64) -> io::Result<Option<u64>> {
        let entries = self.block_entries();
        let mut cluster = self.free_cursor;
        let mut run_start = cluster;
        let mut first_free = None;
        while cluster < self.end {
            if self.block(cluster).await?.is_none() {
                // Past the blocks that exist: leave the rest to `append`.
                cluster = (cluster / entries + 1) * entries;
                run_start = cluster;
                continue;
            }
            if self.get(cluster).await? != 0 {
                cluster += 1;
                run_start = cluster;
                continue;
            }
            first_free.get_or_insert(cluster);
            cluster += 1;
            if cluster - run_start == count {
                self.free_cursor = first_free.unwrap_or(cluster);
                return Ok(Some(run_start));
            }
        }
        self.free_cursor = first_free.unwrap_or(self.end);
        Ok(None)
    }

    /// Take `count` clusters past everything in use, then the refcount blocks they need
    /// and a larger table if the current one cannot reach them; returns the first one.
    async fn append(&mut self, count: u64) -> io::Result<u64> {
        let start = self.end;
        // The run, its new refcount blocks and a new table each may need more of the
        // others: grow the plan until it covers itself.
        let entries = self.block_entries();
        let (mut new_blocks, mut table_clusters) = (Vec::new(), 0u64);
        loop {
            let end = start + count + new_blocks.len() as u64 + table_clusters;
            let last_index = (end - 1) / entries;
            let missing: Vec<u64> = (start / entries..=last_index)
                .filter(|&i| {
                    self.table
                        .get(i as usize)
                        .is_none_or(|e| e & TABLE_OFFSET_MASK == 0)
                })
                .collect();
            let needed = if last_index as usize >= self.table.len() {
                // Some room to spare, so that appending does not move the table each time.
                let entries_wanted = (last_index + 1) * 2;
                (entries_wanted * 8).div_ceil(self.cluster_size())
            } else {
                0
            };
            if missing == new_blocks && needed == table_clusters {
                break;
            }
            (new_blocks, table_clusters) = (missing, needed);
        }
        if table_clusters << self.cluster_bits > MAX_TABLE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "qcow2 refcount table would exceed its maximum size",
            ));
        }
        let blocks_at = start + count;
        let table_at = blocks_at + new_blocks.len() as u64;
        if table_clusters > 0 {
            let old_clusters = (self.table.len() as u64 * 8).div_ceil(self.cluster_size());
            if self.moved_from.is_none() {
                self.moved_from = Some((self.table_offset, old_clusters));
            } else {
                // Moved twice before a write-back: the intermediate table never reached the
                // disk, so only its clusters' refcounts go.
                let first = self.table_offset >> self.cluster_bits;
                for cluster in first..first + old_clusters {
                    self.release(cluster, Freed::Never).await?;
                }
            }
            self.table_offset = table_at << self.cluster_bits;
            self.table
                .resize((table_clusters * self.cluster_size() / 8) as usize, 0);
            self.table_dirty = true;
        }
        self.tick += 1;
        for (n, &index) in new_blocks.iter().enumerate() {
            self.table[index as usize] = (blocks_at + n as u64) << self.cluster_bits;
            self.block_offsets
                .insert((blocks_at + n as u64) << self.cluster_bits);
            self.table_dirty = true;
            self.blocks
                .insert(index, (vec![0u8; self.cluster_size() as usize], self.tick));
            self.dirty.insert(index);
        }
        self.end = table_at + table_clusters;
        for cluster in start..self.end {
            self.set(cluster, 1).await?;
        }
        Ok(start)
    }

    /// The bytes the refcount table covers now.
    pub(super) fn table_range(&self) -> Range<u64> {
        self.table_offset..self.table_offset + self.table.len() as u64 * 8
    }

    /// Whether a refcount block lies within `range`.
    pub(super) fn has_block_in(&self, range: &Range<u64>) -> bool {
        let below = range.start.saturating_sub(self.cluster_size() - 1);
        self.block_offsets
            .range(below..range.end)
            .any(|&b| range.start < b + self.cluster_size())
    }

    /// Where the refcount table is now, and its length in clusters (for the header).
    pub(super) fn table_location(&self) -> (u64, u32) {
        let clusters = (self.table.len() as u64 * 8).div_ceil(self.cluster_size());
        (self.table_offset, clusters as u32)
    }

    /// One reference less to `cluster`, which lost it for `reason`.
    pub(super) async fn release(&mut self, cluster: u64, reason: Freed) -> io::Result<()> {
        match self.get(cluster).await? {
            0 => {
                tracing::warn!(cluster, "qcow2: freeing a cluster that is already free");
                Ok(())
            }
            n => {
                self.set(cluster, n - 1).await?;
                if n == 1 && self.pass_discard.passes(reason) {
                    self.to_discard.insert(cluster);
                }
                Ok(())
            }
        }
    }

    /// Discard the freed clusters waiting for it, in runs. Discards are advisory, as in
    /// QEMU: a failed one leaves the data in place and is not an error.
    async fn discard_freed(&mut self) {
        let mut clusters = std::mem::take(&mut self.to_discard).into_iter().peekable();
        while let Some(first) = clusters.next() {
            let mut end = first + 1;
            while clusters.next_if_eq(&end).is_some() {
                end += 1;
            }
            let (offset, len) = (
                first << self.cluster_bits,
                (end - first) << self.cluster_bits,
            );
            if let Err(e) = self.file.discard(offset, len).await {
                tracing::debug!(offset, len, "qcow2: discard of freed clusters failed: {e}");
            }
        }
    }

    async fn write_blocks(&mut self, map: &MetadataMap) -> io::Result<()> {
        while let Some(&block) = self.dirty.first() {
            let offset = self.table[block as usize] & TABLE_OFFSET_MASK;
            map.check(
                offset,
                self.cluster_size(),
                Some(Metadata::RefcountBlock),
                self,
            )?;
            // QEMU announces a refcount cache write-back so, whether or not the block is new.
            self.file.debug_event(BlkdebugEvent::RefblockUpdatePart);
            self.file
                .write(offset, &self.blocks[&block].0, WriteFlags::default())
                .await?;
            self.dirty.remove(&block);
        }
        Ok(())
    }

    /// Write changed refcount blocks, then the table entries that point at new ones, then
    /// (when the table moved) the header, then free the old table, then discard the freed
    /// clusters the options pass on. Only the last step's blocks are left unflushed; what
    /// is not written stays dirty for the next call. Each write is checked against the
    /// other metadata in `map` first.
    pub(super) async fn write_back(&mut self, map: &MetadataMap) -> io::Result<()> {
        self.write_blocks(map).await?;
        if self.table_dirty {
            self.file.flush().await?;
            let raw: Vec<u8> = self.table.iter().flat_map(|e| e.to_be_bytes()).collect();
            map.check(
                self.table_offset,
                raw.len() as u64,
                Some(Metadata::RefcountTable),
                self,
            )?;
            self.file.debug_event(BlkdebugEvent::ReftableUpdate);
            self.file
                .write(self.table_offset, &raw, WriteFlags::default())
                .await?;
            self.table_dirty = false;
        }
        if let Some((old_offset, old_clusters)) = self.moved_from {
            // The new table is complete on disk before the header points at it; a crash
            // before the switch leaks the new clusters at worst.
            self.file.flush().await?;
            let (offset, clusters) = self.table_location();
            let mut fields = [0u8; 12];
            fields[..8].copy_from_slice(&offset.to_be_bytes());
            fields[8..].copy_from_slice(&clusters.to_be_bytes());
            self.file.write(48, &fields, WriteFlags::default()).await?;
            self.file.flush().await?;
            self.moved_from = None;
            let first = old_offset >> self.cluster_bits;
            for cluster in first..first + old_clusters {
                self.release(cluster, Freed::Other).await?;
            }
            self.write_blocks(map).await?;
        }
        if !self.to_discard.is_empty() {
            self.discard_freed().await;
        }
        Ok(())
    }
}

pub(super) fn read_refcount(block: &[u8], index: usize, order: u32) -> u64 {
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

pub(super) fn write_refcount(block: &mut [u8], index: usize, order: u32, value: u64) {
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
}
