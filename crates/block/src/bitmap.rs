//! Dirty bitmaps: which parts of a node were written since a point in time.
//!
//! One bit per `granularity` bytes, in 64-bit words updated with atomic operations, so that
//! requests on every I/O thread can mark a bitmap without a lock; a lock is taken for writing
//! only to resize. A 16 TiB disk at the default 64 KiB granularity needs 32 MiB.
//!
//! Words hold bit `i` of the bitmap in bit `i % 64` of word `i / 64`, which is also the order
//! of QEMU's lowest bitmap level on a little-endian host, so their little-endian bytes hash
//! to the same `x-debug-block-dirty-bitmap-sha256`.

use arc_swap::ArcSwapOption;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

struct Bits {
    /// Bytes covered (the node's size).
    size: u64,
    words: Vec<AtomicU64>,
}

impl Bits {
    fn new(size: u64, granularity: u64) -> Bits {
        let units = size.div_ceil(granularity);
        Bits {
            size,
            words: (0..units.div_ceil(64).max(1))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }
}

/// A dirty bitmap of a node (QEMU's BdrvDirtyBitmap): named ones are the user's
/// (block-dirty-bitmap-add), anonymous ones a job's. The node marks it on every write while
/// it is attached ([`crate::Node::add_dirty_bitmap`]); lock-free, usable from any thread.
pub struct DirtyBitmap {
    /// None for the anonymous bitmaps jobs keep for themselves.
    name: Option<String>,
    granularity: u64,
    bits: RwLock<Bits>,
    /// Dirty units; kept beside the words so `count` is O(1).
    dirty_units: AtomicU64,
    enabled: AtomicBool,
    /// In use by an operation (a backup with its successor, an export): the user may
    /// neither change nor remove it.
    busy: AtomicBool,
    persistent: AtomicBool,
    /// Left in use by a process that did not close the image cleanly: its bits cannot be
    /// trusted, so it may only be removed.
    inconsistent: AtomicBool,
    /// Loaded from an image opened read-only: the image cannot take the change, so its
    /// bits and its presence may not change (it may still be enabled, disabled and read).
    readonly: AtomicBool,
    /// Records writes in this bitmap's place while an operation holds its point in time.
    successor: ArcSwapOption<DirtyBitmap>,
}

impl DirtyBitmap {
    /// `granularity` must be a power of two (callers check it with QEMU's messages).
    pub fn new(name: Option<String>, granularity: u64, size: u64) -> DirtyBitmap {
        assert!(granularity.is_power_of_two());
        DirtyBitmap {
            name,
            granularity,
            bits: RwLock::new(Bits::new(size, granularity)),
            dirty_units: AtomicU64::new(0),
            enabled: AtomicBool::new(true),
            busy: AtomicBool::new(false),
            persistent: AtomicBool::new(false),
            inconsistent: AtomicBool::new(false),
            readonly: AtomicBool::new(false),
            successor: ArcSwapOption::empty(),
        }
    }

    /// The bitmap's name (BlockDirtyInfo `name`); None for a job's anonymous bitmap.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Bytes per bit, a power of two (BlockDirtyInfo `granularity`).
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Bytes covered: the node's size when created or last resized.
    pub fn size(&self) -> u64 {
        self.bits.read().unwrap().size
    }

    /// Dirty bytes (whole granules, clipped at the end of the node), as QEMU counts.
    pub fn count(&self) -> u64 {
        let units = self.dirty_units.load(Ordering::Acquire);
        let bits = self.bits.read().unwrap();
        let last_unit = bits.size.div_ceil(self.granularity).saturating_sub(1);
        let mut bytes = units * self.granularity;
        if units > 0 && self.unit_is_set(&bits, last_unit) {
            bytes -= last_unit_slack(bits.size, self.granularity);
        }
        bytes
    }

    /// Whether the bitmap takes writes (block-dirty-bitmap-enable/-disable). While a
    /// successor records in its place, see [`DirtyBitmap::is_recording`].
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// block-dirty-bitmap-enable (true) or -disable (false).
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Release);
    }

    /// Whether writes to the node are recorded here now.
    pub fn is_recording(&self) -> bool {
        self.is_enabled() && self.successor.load().is_none()
    }

    /// Whether an operation holds the bitmap, so the user may neither change nor remove it
    /// (BlockDirtyInfo `busy`).
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// Mark the bitmap held by an operation (an export, a transaction removing it), or free
    /// again. `create_successor` sets it and `abdicate`/`reclaim` clear it themselves.
    pub fn set_busy(&self, busy: bool) {
        self.busy.store(busy, Ordering::Release);
    }

    /// Whether the image keeps the bitmap when the node closes (BlockDirtyInfo
    /// `persistent`).
    pub fn is_persistent(&self) -> bool {
        self.persistent.load(Ordering::Acquire)
    }

    /// Make the image keep the bitmap on close (block-dirty-bitmap-add `persistent`), or
    /// not; the caller checks that the format can (`Driver::can_store_persistent_bitmaps`).
    pub fn set_persistent(&self, persistent: bool) {
        self.persistent.store(persistent, Ordering::Release);
    }

    /// Whether the image says a process left the bitmap in use without closing it, so its
    /// bits cannot be trusted and it may only be removed (BlockDirtyInfo `inconsistent`).
    pub fn is_inconsistent(&self) -> bool {
        self.inconsistent.load(Ordering::Acquire)
    }

    /// Mark a bitmap loaded from an image as unusable: qcow2's in-use flag was set, or the
    /// bitmap is of a kind blockd does not know.
    pub fn set_inconsistent(&self, inconsistent: bool) {
        self.inconsistent.store(inconsistent, Ordering::Release);
    }

    /// Whether the bitmap came from an image opened read-only: its bits and its presence
    /// may not change, but it may be enabled, disabled and read.
    pub fn is_readonly(&self) -> bool {
        self.readonly.load(Ordering::Acquire)
    }

    /// Mark a bitmap loaded from a read-only image (see [`DirtyBitmap::is_readonly`]).
    pub fn set_readonly(&self, readonly: bool) {
        self.readonly.store(readonly, Ordering::Release);
    }

    fn unit_is_set(&self, bits: &Bits, unit: u64) -> bool {
        bits.words
            .get((unit / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (unit % 64)) != 0)
    }

    /// The units touched by a byte range, clipped to the bitmap.
    fn units(&self, bits: &Bits, offset: u64, len: u64) -> std::ops::Range<u64> {
        let end = offset.saturating_add(len).min(bits.size);
        if len == 0 || offset >= end {
            return 0..0;
        }
        offset / self.granularity..end.div_ceil(self.granularity)
    }

    /// A write to the node changed `offset..offset+len`: record it here, or in the
    /// successor while an operation holds this bitmap's point in time.
    pub fn record_write(&self, offset: u64, len: u64) {
        match &*self.successor.load() {
            Some(successor) => successor.record_write(offset, len),
            None if self.is_enabled() => self.set(offset, len),
            None => {}
        }
    }

    /// Mark `offset..offset+len` dirty (whole granules).
    pub fn set(&self, offset: u64, len: u64) {
        let bits = self.bits.read().unwrap();
        let units = self.units(&bits, offset, len);
        self.update_units(&bits, units, true);
    }

    /// Mark `offset..offset+len` clean. Only granules the range covers entirely are cleared,
    /// except at the end of the node, so a partial reset never loses a dirty byte.
    pub fn reset(&self, offset: u64, len: u64) {
        let bits = self.bits.read().unwrap();
        let end = offset.saturating_add(len).min(bits.size);
        if offset >= end {
            return;
        }
        let first = offset.div_ceil(self.granularity);
        let last = if end == bits.size {
            end.div_ceil(self.granularity)
        } else {
            end / self.granularity
        };
        if first < last {
            self.update_units(&bits, first..last, false);
        }
    }

    /// Mark the whole bitmap clean (block-dirty-bitmap-clear).
    pub fn clear(&self) {
        let bits = self.bits.read().unwrap();
        for word in &bits.words {
            word.store(0, Ordering::Release);
        }
        self.dirty_units.store(0, Ordering::Release);
    }

    fn update_units(&self, bits: &Bits, units: std::ops::Range<u64>, dirty: bool) {
        let mut unit = units.start;
        while unit < units.end {
            let word = (unit / 64) as usize;
            let lo = unit % 64;
            let hi = (units.end - (unit - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if dirty {
                let old = bits.words[word].fetch_or(mask, Ordering::AcqRel);
                self.dirty_units
                    .fetch_add((mask & !old).count_ones() as u64, Ordering::AcqRel);
            } else {
                let old = bits.words[word].fetch_and(!mask, Ordering::AcqRel);
                self.dirty_units
                    .fetch_sub((mask & old).count_ones() as u64, Ordering::AcqRel);
            }
            unit = unit - lo + hi;
        }
    }

    /// Whether the byte at `offset` is dirty.
    pub fn get(&self, offset: u64) -> bool {
        let bits = self.bits.read().unwrap();
        offset < bits.size && self.unit_is_set(&bits, offset / self.granularity)
    }

    /// The first dirty range starting at or after `offset`, at most `max_len` bytes long,
    /// aligned to granules and clipped at the end of the node.
    pub fn next_dirty_range(&self, offset: u64, max_len: u64) -> Option<(u64, u64)> {
        let bits = self.bits.read().unwrap();
        let units = bits.size.div_ceil(self.granularity);
        let start = self.find_unit(&bits, offset / self.granularity, units, true)?;
        let max_units = (max_len / self.granularity).max(1);
        let limit = start.saturating_add(max_units).min(units);
        let end = self.find_unit(&bits, start, limit, false).unwrap_or(limit);
        let byte_start = start * self.granularity;
        let byte_end = (end * self.granularity).min(bits.size);
        Some((byte_start, byte_end - byte_start))
    }

    /// Whether `offset` is dirty and how far that state lasts (at most `max_len`), for
    /// block status queries of a dirty-bitmap meta context.
    pub fn extent(&self, offset: u64, max_len: u64) -> (bool, u64) {
        let bits = self.bits.read().unwrap();
        let end = offset.saturating_add(max_len).min(bits.size);
        if offset >= end {
            return (false, 0);
        }
        let unit = offset / self.granularity;
        let dirty = self.unit_is_set(&bits, unit);
        let end_unit = end.div_ceil(self.granularity);
        let change = self
            .find_unit(&bits, unit, end_unit, !dirty)
            .unwrap_or(end_unit);
        let run_end = (change * self.granularity).min(end);
        (dirty, run_end - offset)
    }

    /// The first unit in `from..to` whose state is `dirty`.
    fn find_unit(&self, bits: &Bits, from: u64, to: u64, dirty: bool) -> Option<u64> {
        let mut unit = from;
        while unit < to {
            let word = bits.words[(unit / 64) as usize].load(Ordering::Acquire);
            let word = if dirty { word } else { !word };
            let masked = word & (u64::MAX << (unit % 64));
            if masked != 0 {
                let found = unit - unit % 64 + masked.trailing_zeros() as u64;
                return (found < to).then_some(found);
            }
            unit = unit - unit % 64 + 64;
        }
        None
    }

    /// Add the dirty areas of `other` (any granularity) to this bitmap.
    pub fn merge_from(&self, other: &DirtyBitmap) {
        if other.granularity == self.granularity {
            let ours = self.bits.read().unwrap();
            let theirs = other.bits.read().unwrap();
            for (mine, src) in ours.words.iter().zip(theirs.words.iter()) {
                let src = src.load(Ordering::Acquire);
                if src != 0 {
                    let old = mine.fetch_or(src, Ordering::AcqRel);
                    self.dirty_units
                        .fetch_add((src & !old).count_ones() as u64, Ordering::AcqRel);
                }
            }
            return;
        }
        let mut offset = 0;
        while let Some((start, len)) = other.next_dirty_range(offset, u64::MAX) {
            self.set(start, len);
            offset = start + len;
        }
    }

    /// Follow the node's new size: new space is clean, bits past a shrunk end are dropped.
    pub fn resize(&self, size: u64) {
        let mut bits = self.bits.write().unwrap();
        let mut resized = Bits::new(size, self.granularity);
        let units = size.div_ceil(self.granularity);
        let mut dirty = 0;
        for (i, word) in resized.words.iter_mut().enumerate() {
            let mut value = bits.words.get(i).map_or(0, |w| w.load(Ordering::Acquire));
            let first = i as u64 * 64;
            if first + 64 > units {
                let keep = units.saturating_sub(first);
                value &= if keep == 0 {
                    0
                } else {
                    u64::MAX >> (64 - keep)
                };
            }
            dirty += value.count_ones() as u64;
            *word.get_mut() = value;
        }
        *bits = resized;
        self.dirty_units.store(dirty, Ordering::Release);
    }

    /// A copy of the words, for storing the bitmap or hashing it.
    pub fn to_words(&self) -> Vec<u64> {
        let bits = self.bits.read().unwrap();
        bits.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// Replace the bits with `words` (bits past the end of the node are ignored).
    pub fn load_words(&self, words: &[u64]) {
        let bits = self.bits.read().unwrap();
        let units = bits.size.div_ceil(self.granularity);
        let mut dirty = 0;
        for (i, word) in bits.words.iter().enumerate() {
            let first = i as u64 * 64;
            let mut value = words.get(i).copied().unwrap_or(0);
            if first + 64 > units {
                let keep = units.saturating_sub(first);
                value &= if keep == 0 {
                    0
                } else {
                    u64::MAX >> (64 - keep)
                };
            }
            dirty += value.count_ones() as u64;
            word.store(value, Ordering::Release);
        }
        self.dirty_units.store(dirty, Ordering::Release);
    }

    /// Start an operation that needs this bitmap's point in time: it stops recording and a
    /// new anonymous bitmap records writes from now on, until `abdicate` or `reclaim`.
    pub fn create_successor(&self) -> Arc<DirtyBitmap> {
        let successor = Arc::new(DirtyBitmap::new(None, self.granularity, self.size()));
        successor.set_enabled(self.is_enabled());
        self.successor.store(Some(successor.clone()));
        self.set_busy(true);
        successor
    }

    /// The bitmap recording writes in this one's place, while an operation holds its point
    /// in time (`create_successor` until `abdicate` or `reclaim`).
    pub fn successor(&self) -> Option<Arc<DirtyBitmap>> {
        self.successor.load_full()
    }

    /// The operation consumed the point in time: the bitmap now holds only what was written
    /// since it started. The node must be drained: a write racing with the swap could be
    /// lost.
    pub fn abdicate(&self) {
        if let Some(successor) = self.successor.swap(None) {
            self.clear();
            self.merge_from(&successor);
        }
        self.set_busy(false);
    }

    /// The operation gave the point in time back: writes made meanwhile are added. The node
    /// must be drained, as for `abdicate`.
    pub fn reclaim(&self) {
        if let Some(successor) = self.successor.swap(None) {
            self.merge_from(&successor);
        }
        self.set_busy(false);
    }
}

/// Bytes of the last granule that lie past the end of the node.
fn last_unit_slack(size: u64, granularity: u64) -> u64 {
    match size % granularity {
        0 => 0,
        used => granularity - used,
    }
}

/// QEMU's default granularity for a node with clusters of `cluster_size` bytes (or none).
pub fn default_granularity(cluster_size: Option<u64>) -> u64 {
    cluster_size.unwrap_or(64 << 10).clamp(4 << 10, 64 << 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_reset_count() {
        let bm = DirtyBitmap::new(Some("b".into()), 4096, 1 << 20);
        bm.set(100, 1);
        assert_eq!(bm.count(), 4096);
        bm.set(4096 * 63, 4096 * 3);
        assert_eq!(bm.count(), 4 * 4096);
        assert!(bm.get(4096 * 64));
        bm.reset(4096 * 63 + 1, 4096 * 2);
        assert_eq!(bm.count(), 3 * 4096, "partial granule stays dirty");
        bm.reset(0, 1 << 20);
        assert_eq!(bm.count(), 0);
    }

    #[test]
    fn count_clips_last_granule() {
        let bm = DirtyBitmap::new(None, 65536, 65536 + 512);
        bm.set(65536, 1);
        assert_eq!(bm.count(), 512);
        bm.set(0, 1);
        assert_eq!(bm.count(), 65536 + 512);
    }

    #[test]
    fn ranges_and_extents() {
        let bm = DirtyBitmap::new(None, 512, 1 << 20);
        assert_eq!(bm.next_dirty_range(0, u64::MAX), None);
        bm.set(512 * 70, 512 * 100);
        assert_eq!(
            bm.next_dirty_range(0, u64::MAX),
            Some((512 * 70, 512 * 100))
        );
        assert_eq!(
            bm.next_dirty_range(512 * 100, 512 * 8),
            Some((512 * 100, 512 * 8))
        );
        assert_eq!(bm.next_dirty_range(512 * 170, u64::MAX), None);
        assert_eq!(bm.extent(0, 1 << 20), (false, 512 * 70));
        assert_eq!(bm.extent(512 * 71, 1 << 20), (true, 512 * 99));
        assert_eq!(
            bm.extent(512 * 170, 1 << 20),
            (false, (1 << 20) - 512 * 170)
        );
        bm.set((1 << 20) - 1, 1);
        assert_eq!(
            bm.next_dirty_range(512 * 170, u64::MAX),
            Some(((1 << 20) - 512, 512))
        );
    }

    #[test]
    fn merge_successor_resize() {
        let a = DirtyBitmap::new(Some("a".into()), 65536, 10 << 20);
        a.set(0, 65536);
        let succ = a.create_successor();
        assert!(!a.is_recording() && a.is_busy());
        succ.set(1 << 20, 1);
        a.reclaim();
        assert_eq!(a.count(), 2 * 65536);
        let succ = a.create_successor();
        succ.set(2 << 20, 1);
        a.abdicate();
        assert_eq!(a.count(), 65536);
        assert!(a.get(2 << 20) && !a.is_busy());

        let fine = DirtyBitmap::new(None, 512, 10 << 20);
        fine.merge_from(&a);
        assert_eq!(fine.count(), 65536);
        a.merge_from(&fine);
        assert_eq!(a.count(), 65536);

        a.set((10 << 20) - 1, 1);
        a.resize(5 << 20);
        assert_eq!(a.count(), 65536);
        a.resize(20 << 20);
        assert!(!a.get((10 << 20) - 1));
        a.set((20 << 20) - 1, 1);
        assert_eq!(a.count(), 2 * 65536);
    }

    #[test]
    fn words_round_trip() {
        let a = DirtyBitmap::new(None, 4096, 300 * 4096);
        a.set(4096 * 5, 4096 * 200);
        let b = DirtyBitmap::new(None, 4096, 300 * 4096);
        b.load_words(&a.to_words());
        assert_eq!(b.count(), a.count());
        b.load_words(&[u64::MAX; 5]);
        assert_eq!(b.count(), 300 * 4096);
    }
}
