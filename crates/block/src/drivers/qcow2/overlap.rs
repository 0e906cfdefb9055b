//! Metadata overlap checks (QEMU's `overlap-check` option) and what a found corruption is.
//!
//! Before the driver writes anything, guest data or its own tables, the host range is
//! checked against where the image's metadata lies, so that an image whose tables point
//! into other metadata (crafted or damaged) cannot make us overwrite the header, a table
//! or a refcount block. A write that would is refused as a [`Corruption`], as are table
//! entries no valid image holds (an unaligned L2 table or cluster offset); `mod.rs` turns
//! one into the BLOCK_IMAGE_CORRUPTED event and, on a writable node, marks the image
//! corrupt and stops all I/O to it, as QEMU does.
//!
//! The map is built when the data path opens (a snapshot operation opens it anew) and
//! follows the changes the data path makes: new and moved L2 tables, a moved L1 table.
//! The refcount table and blocks are the refcount module's own to tell (`refcount.rs`).

use super::header::{be32, be64, Qcow2Header};
use super::refcount::Refcounts;
use super::snapshots;
use crate::node::Child;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::ops::Range;

/// The kinds of metadata, in QEMU's order: when a write overlaps several, the first is
/// named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Metadata {
    Header,
    ActiveL1,
    ActiveL2,
    RefcountTable,
    RefcountBlock,
    SnapshotTable,
    InactiveL1,
    InactiveL2,
    BitmapDirectory,
}

impl Metadata {
    pub(super) const ALL: [Metadata; 9] = [
        Metadata::Header,
        Metadata::ActiveL1,
        Metadata::ActiveL2,
        Metadata::RefcountTable,
        Metadata::RefcountBlock,
        Metadata::SnapshotTable,
        Metadata::InactiveL1,
        Metadata::InactiveL2,
        Metadata::BitmapDirectory,
    ];

    /// QEMU's name in the corruption message.
    fn name(self) -> &'static str {
        match self {
            Metadata::Header => "qcow2_header",
            Metadata::ActiveL1 => "active L1 table",
            Metadata::ActiveL2 => "active L2 table",
            Metadata::RefcountTable => "refcount table",
            Metadata::RefcountBlock => "refcount block",
            Metadata::SnapshotTable => "snapshot table",
            Metadata::InactiveL1 => "inactive L1 table",
            Metadata::InactiveL2 => "inactive L2 table",
            Metadata::BitmapDirectory => "bitmap directory",
        }
    }

    /// The member of Qcow2OverlapCheckFlags that turns this check on or off.
    pub(super) fn flag(self) -> &'static str {
        match self {
            Metadata::Header => "main-header",
            Metadata::ActiveL1 => "active-l1",
            Metadata::ActiveL2 => "active-l2",
            Metadata::RefcountTable => "refcount-table",
            Metadata::RefcountBlock => "refcount-block",
            Metadata::SnapshotTable => "snapshot-table",
            Metadata::InactiveL1 => "inactive-l1",
            Metadata::InactiveL2 => "inactive-l2",
            Metadata::BitmapDirectory => "bitmap-directory",
        }
    }

    fn bit(self) -> u16 {
        1 << self as u16
    }
}

/// Which kinds of metadata writes are checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Checks(u16);

impl Checks {
    pub(super) const NONE: Checks = Checks(0);
    /// What is known without reading tables: QEMU's `constant` mode.
    pub(super) const CONSTANT: Checks = Checks(
        1 << Metadata::Header as u16
            | 1 << Metadata::ActiveL1 as u16
            | 1 << Metadata::RefcountTable as u16
            | 1 << Metadata::SnapshotTable as u16
            | 1 << Metadata::InactiveL1 as u16
            | 1 << Metadata::BitmapDirectory as u16,
    );
    /// QEMU's default, `cached`: the constant ones and the L2 tables and refcount blocks
    /// in use.
    pub(super) const CACHED: Checks = Checks(
        Checks::CONSTANT.0 | 1 << Metadata::ActiveL2 as u16 | 1 << Metadata::RefcountBlock as u16,
    );
    pub(super) const ALL: Checks = Checks(Checks::CACHED.0 | 1 << Metadata::InactiveL2 as u16);

    /// QEMU's Qcow2OverlapCheckMode by name.
    pub(super) fn mode(name: &str) -> Option<Checks> {
        Some(match name {
            "none" => Checks::NONE,
            "constant" => Checks::CONSTANT,
            "cached" => Checks::CACHED,
            "all" => Checks::ALL,
            _ => return None,
        })
    }

    pub(super) fn with(self, kind: Metadata, on: bool) -> Checks {
        if on {
            Checks(self.0 | kind.bit())
        } else {
            Checks(self.0 & !kind.bit())
        }
    }

    fn has(self, kind: Metadata) -> bool {
        self.0 & kind.bit() != 0
    }
}

/// Corrupt metadata met by a request: QEMU's message, and the range of the write that was
/// prevented, if it was one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Corruption {
    pub msg: String,
    pub range: Option<(u64, u64)>,
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "qcow2: {}", self.msg)
    }
}

impl std::error::Error for Corruption {}

impl Corruption {
    /// The request fails with EIO, as QEMU fails it.
    pub(super) fn found(msg: String) -> io::Error {
        io::Error::other(Corruption { msg, range: None })
    }

    fn overlap(kind: Metadata, offset: u64, len: u64) -> io::Error {
        io::Error::other(Corruption {
            msg: format!(
                "Preventing invalid write on metadata (overlaps with {})",
                kind.name()
            ),
            range: Some((offset, len)),
        })
    }

    /// The corruption an error carries, if it is one.
    pub(super) fn of(error: &io::Error) -> Option<&Corruption> {
        error.get_ref()?.downcast_ref::<Corruption>()
    }
}

/// A number as C's `%#x` prints it (QEMU's messages): `0` without the prefix.
pub(super) fn hex(n: u64) -> String {
    if n == 0 {
        "0".into()
    } else {
        format!("{n:#x}")
    }
}

/// Bits 9-55 of an L1 entry: where its L2 table lies.
const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// QEMU's limit for an L1 table (QCOW_MAX_L1_SIZE), active or a snapshot's.
const MAX_L1_BYTES: u64 = 32 << 20;

async fn read_table(file: &Child, offset: u64, entries: u64) -> io::Result<Vec<u64>> {
    if entries * 8 > MAX_L1_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "qcow2: L1 table too large",
        ));
    }
    let mut raw = vec![0u8; (entries * 8) as usize];
    file.read(offset, &mut raw).await?;
    Ok(raw.chunks(8).map(|c| be64(c, 0)).collect())
}

/// Where the metadata lies, as far as the data path needs to know.
pub(super) struct MetadataMap {
    checks: Checks,
    cluster_size: u64,
    /// Byte ranges that only change when the data path opens anew: the header cluster,
    /// the snapshot table, the snapshots' L1 tables, the bitmap directory.
    fixed: Vec<(Range<u64>, Metadata)>,
    active_l1: Range<u64>,
    /// The L2 tables the active L1 table points at, with how many entries point at each.
    active_l2: BTreeMap<u64, u32>,
    /// The L2 tables only snapshots point at (read only when `inactive-l2` is checked).
    inactive_l2: BTreeSet<u64>,
}

impl MetadataMap {
    pub(super) fn new(checks: Checks, cluster_size: u64) -> MetadataMap {
        MetadataMap {
            checks,
            cluster_size,
            fixed: vec![(0..cluster_size, Metadata::Header)],
            active_l1: 0..0,
            active_l2: BTreeMap::new(),
            inactive_l2: BTreeSet::new(),
        }
    }

    /// The map of the image whose header cluster is `first`, with its active L1 table
    /// `l1` when the caller has read it already.
    pub(super) async fn load(
        file: &Child,
        first: &[u8],
        l1: Option<&[u64]>,
        checks: Checks,
    ) -> io::Result<MetadataMap> {
        let cluster_size = 1u64 << be32(first, 20).clamp(9, 21);
        let mut map = MetadataMap::new(checks, cluster_size);
        if checks == Checks::NONE {
            return Ok(map);
        }
        let (l1_offset, l1_entries) = (be64(first, 40), be32(first, 36) as u64);
        let read;
        let l1 = match l1 {
            Some(l1) => l1,
            None => {
                read = read_table(file, l1_offset, l1_entries).await?;
                &read
            }
        };
        map.set_active_l1(l1_offset, l1.len());
        for entry in l1 {
            if entry & L1_OFFSET_MASK != 0 {
                map.add_active_l2(entry & L1_OFFSET_MASK);
            }
        }
        let (table, snapshot_l1s) = snapshots::table_extents(file, first).await?;
        map.add_fixed(table, Metadata::SnapshotTable);
        for (offset, entries) in snapshot_l1s {
            map.add_fixed(offset..offset + entries * 8, Metadata::InactiveL1);
            if checks.has(Metadata::InactiveL2) {
                for entry in read_table(file, offset, entries).await? {
                    if entry & L1_OFFSET_MASK != 0 {
                        map.inactive_l2.insert(entry & L1_OFFSET_MASK);
                    }
                }
            }
        }
        if let Some(bitmaps) = Qcow2Header::parse(first)
            .ok()
            .and_then(|h| h.consistent_bitmaps().cloned())
        {
            let start = bitmaps.directory_offset;
            map.add_fixed(
                start..start.saturating_add(bitmaps.directory_size),
                Metadata::BitmapDirectory,
            );
        }
        Ok(map)
    }

    pub(super) fn add_fixed(&mut self, range: Range<u64>, kind: Metadata) {
        if !range.is_empty() {
            self.fixed.push((range, kind));
        }
    }

    pub(super) fn set_active_l1(&mut self, offset: u64, entries: usize) {
        self.active_l1 = offset..offset + entries as u64 * 8;
    }

    pub(super) fn add_active_l2(&mut self, offset: u64) {
        *self.active_l2.entry(offset).or_insert(0) += 1;
    }

    pub(super) fn remove_active_l2(&mut self, offset: u64) {
        if let Some(count) = self.active_l2.get_mut(&offset) {
            *count -= 1;
            if *count == 0 {
                self.active_l2.remove(&offset);
            }
        }
    }

    /// Whether a cluster-sized table at one of `starts` overlaps `range`.
    fn cluster_in<'a>(
        &self,
        mut starts: impl Iterator<Item = &'a u64>,
        range: &Range<u64>,
    ) -> bool {
        starts.any(|&s| s < range.end && range.start < s + self.cluster_size)
    }

    /// Refuse a write of `len` bytes at `offset` that overlaps metadata of a checked kind
    /// other than `own` (the kind being written, as a table's write-back overlaps itself).
    pub(super) fn check(
        &self,
        offset: u64,
        len: u64,
        own: Option<Metadata>,
        refcounts: &Refcounts,
    ) -> io::Result<()> {
        if len == 0 || self.checks == Checks::NONE {
            return Ok(());
        }
        let range = offset..offset.saturating_add(len);
        let below = range.start.saturating_sub(self.cluster_size - 1);
        let overlaps = |a: &Range<u64>| a.start < range.end && range.start < a.end;
        for kind in Metadata::ALL {
            if Some(kind) == own || !self.checks.has(kind) {
                continue;
            }
            let hit = match kind {
                Metadata::ActiveL1 => overlaps(&self.active_l1),
                Metadata::ActiveL2 => self.cluster_in(
                    self.active_l2.range(below..range.end).map(|(k, _)| k),
                    &range,
                ),
                Metadata::InactiveL2 => {
                    self.cluster_in(self.inactive_l2.range(below..range.end), &range)
                }
                Metadata::RefcountTable => overlaps(&refcounts.table_range()),
                Metadata::RefcountBlock => refcounts.has_block_in(&range),
                _ => self.fixed.iter().any(|(r, k)| *k == kind && overlaps(r)),
            };
            if hit {
                return Err(Corruption::overlap(kind, offset, len));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_contain_what_qemu_lists() {
        assert!(Checks::CONSTANT.has(Metadata::Header));
        assert!(!Checks::CONSTANT.has(Metadata::ActiveL2));
        assert!(Checks::CACHED.has(Metadata::RefcountBlock));
        assert!(!Checks::CACHED.has(Metadata::InactiveL2));
        assert!(Checks::ALL.has(Metadata::InactiveL2));
        assert!(!Checks::CACHED
            .with(Metadata::ActiveL1, false)
            .has(Metadata::ActiveL1));
        assert_eq!(hex(0), "0");
        assert_eq!(hex(0x40200), "0x40200");
    }
}
