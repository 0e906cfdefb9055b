//! qcow2 internal snapshots (docs/interop/qcow2.txt, "Snapshots"): created and deleted
//! beside the data path (`image.rs`), which serves images that have them.
//!
//! Every change happens with the node drained, the data path flushed (its caches written
//! back) and its lock held for writing, so we are the only one touching the metadata; then
//! the data path opens anew, as its cached L1/L2 tables and refcounts are no longer true.
//! Refcounts change through `refcount.rs`, as everywhere else.
//!
//! - **Create**: every cluster the active L1 table reaches gets one more reference: each L2
//!   table, each data cluster (preallocated zero clusters too) and each cluster a compressed
//!   cluster touches, counted per reference. Fresh clusters past the end of the file take
//!   the copy of the active L1 table and the new snapshot table. The COPIED flag (bit 63) of
//!   the active L1 and L2 entries is then cleared wherever the refcount is no longer 1: the data path
//!   writes in place only through entries with that flag, and otherwise copies the cluster
//!   (and an L2 table it must change) first, so later writes never reach what the snapshot
//!   holds. Only then is the L1 copy and table written and the header pointed at the table;
//!   the old table's clusters are freed last.
//! - **Delete**: the header first points at a table without the entry, then the snapshot's
//!   references go (its L2 tables, their data clusters, its L1 copy) and the old table is
//!   freed; COPIED is set again in the active tables where a refcount is back to 1 (the data
//!   path would otherwise copy clusters nobody else uses on every first write).
//!
//! The order of the writes is chosen so that a crash in between leaves refcounts too high
//! (leaked clusters, which `qemu-img check -r` repairs), never lower than the references.
//!
//! The list of snapshots is read at open and kept current by create and delete; reports
//! and lookups by name or id use it, as QEMU's do.
//!
//! Entries are written as QEMU 10 writes them: 24 bytes of extra data (the 64-bit VM state
//! size, the disk size, and icount -1 for "none"), no VM state. Extra data of entries we
//! did not write is kept as it is. With extended L2 entries, each entry's subcluster bitmap
//! is left as it is: the references and COPIED live in the entry.

use super::header::{be32, be64, INCOMPAT_EXTENDED_L2, INCOMPAT_EXTERNAL_DATA};
use super::image::{Image, MAX_L1_BYTES};
use super::overlap::{Metadata, MetadataMap};
use super::refcount::{Freed, Refcounts};
use super::Qcow2;
use crate::node::{Child, Node, SnapshotInfo, WriteFlags};
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

/// Bits 9-55 of an L1 entry or a standard L2 entry: the host cluster offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ENTRY_FIXED: usize = 40;
/// Extra data QEMU writes: 64-bit VM state size, disk size, icount.
const EXTRA_DATA_SIZE: usize = 24;
/// QEMU's limits for the table, which we keep so QEMU can open what we write.
const MAX_SNAPSHOTS: usize = 65536;
const MAX_TABLE_SIZE: u64 = 64 << 20;

/// A snapshot table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    l1_offset: u64,
    l1_size: u32,
    id: String,
    name: String,
    date_sec: u32,
    date_nsec: u32,
    vm_clock_nsec: u64,
    vm_state_size: u32,
    extra: Vec<u8>,
}

impl Entry {
    fn info(&self) -> SnapshotInfo {
        let vm_state_size = match self.extra.get(0..8) {
            Some(large) => be64(large, 0),
            None => self.vm_state_size as u64,
        };
        let icount = self
            .extra
            .get(16..24)
            .map(|b| be64(b, 0))
            .filter(|&n| n != u64::MAX);
        SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            vm_state_size,
            date_sec: self.date_sec,
            date_nsec: self.date_nsec,
            vm_clock_nsec: self.vm_clock_nsec,
            icount,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.l1_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_state_size.to_be_bytes());
        out.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
    }
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("qcow2 snapshots: {what}"),
    )
}

/// Parse `count` entries from the start of `table`.
fn parse_table(table: &[u8], count: u32) -> io::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let mut at = 0usize;
    for _ in 0..count {
        let fixed = table
            .get(at..at + ENTRY_FIXED)
            .ok_or_else(|| corrupt("table is shorter than its entries"))?;
        let id_len = u16::from_be_bytes([fixed[12], fixed[13]]) as usize;
        let name_len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
        let extra_len = be32(fixed, 36) as usize;
        let extra_at = at + ENTRY_FIXED;
        let id_at = extra_at + extra_len;
        let name_at = id_at + id_len;
        let end = name_at + name_len;
        if end > table.len() {
            return Err(corrupt("entry exceeds the table"));
        }
        entries.push(Entry {
            l1_offset: be64(fixed, 0),
            l1_size: be32(fixed, 8),
            date_sec: be32(fixed, 16),
            date_nsec: be32(fixed, 20),
            vm_clock_nsec: be64(fixed, 24),
            vm_state_size: be32(fixed, 32),
            extra: table[extra_at..id_at].to_vec(),
            id: String::from_utf8_lossy(&table[id_at..name_at]).into_owned(),
            name: String::from_utf8_lossy(&table[name_at..end]).into_owned(),
        });
        at = end.next_multiple_of(8);
    }
    Ok(entries)
}

fn encode_table(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in entries {
        entry.encode(&mut out);
    }
    out
}

/// The id a new snapshot gets: one past the highest numeric id, as QEMU numbers them.
fn next_id(entries: &[Entry]) -> String {
    let highest = entries
        .iter()
        .filter_map(|e| e.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    (highest + 1).to_string()
}

/// The entry `id` and `name` (those given) both match.
fn find(entries: &[Entry], id: Option<&str>, name: Option<&str>) -> Option<usize> {
    entries.iter().position(|e| {
        id.is_none_or(|id| e.id == id)
            && name.is_none_or(|name| e.name == name)
            && (id.is_some() || name.is_some())
    })
}

/// The header fields snapshots depend on.
struct Layout {
    /// Extended L2 entries (incompatible bit 4).
    extended: bool,
    /// Data clusters live in an external data file (incompatible bit 2), unrefcounted.
    external: bool,
    cluster_bits: u32,
    size: u64,
    l1_size: u32,
    l1_offset: u64,
    nb_snapshots: u32,
    snapshots_offset: u64,
}

impl Layout {
    fn parse(first: &[u8]) -> io::Result<Layout> {
        if first.len() < 104 {
            return Err(corrupt("header is too short"));
        }
        Ok(Layout {
            extended: be32(first, 4) >= 3 && be64(first, 72) & INCOMPAT_EXTENDED_L2 != 0,
            external: be32(first, 4) >= 3 && be64(first, 72) & INCOMPAT_EXTERNAL_DATA != 0,
            cluster_bits: be32(first, 20),
            size: be64(first, 24),
            l1_size: be32(first, 36),
            l1_offset: be64(first, 40),
            nb_snapshots: be32(first, 60),
            snapshots_offset: be64(first, 64),
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// 64-bit words per L2 entry: the entry, and with extended L2 entries its subcluster
    /// bitmap, which snapshots leave as it is.
    fn entry_words(&self) -> usize {
        1 + usize::from(self.extended)
    }

    /// The host clusters one L2 entry holds a reference to (None: unallocated, or zero
    /// without preallocation).
    fn referenced(&self, entry: u64) -> Option<std::ops::RangeInclusive<u64>> {
        if entry & COMPRESSED != 0 {
            let shift = 62 - (self.cluster_bits - 8);
            let offset = entry & ((1u64 << shift) - 1) & !511;
            let sectors = ((entry & !(COPIED | COMPRESSED)) >> shift) + 1;
            Some(offset >> self.cluster_bits..=(offset + sectors * 512 - 1) >> self.cluster_bits)
        } else {
            match entry & OFFSET_MASK {
                0 => None,
                offset => Some(offset >> self.cluster_bits..=offset >> self.cluster_bits),
            }
        }
    }
}

/// An L1 or L2 entry with COPIED set exactly when `refcount` is 1 (entries without a
/// cluster of their own, and compressed ones, never have it).
fn with_copied(entry: u64, standard: bool, refcount: u64) -> u64 {
    if standard && entry & OFFSET_MASK != 0 && refcount == 1 {
        entry | COPIED
    } else {
        entry & !COPIED
    }
}

fn table_bytes(raw: &[u8]) -> Vec<u64> {
    raw.chunks(8).map(|c| be64(c, 0)).collect()
}

fn raw_bytes(table: &[u64]) -> Vec<u8> {
    table.iter().flat_map(|e| e.to_be_bytes()).collect()
}

async fn read_table(file: &Child, offset: u64, entries: u64) -> io::Result<Vec<u64>> {
    let mut raw = vec![0u8; (entries * 8) as usize];
    file.read(offset, &mut raw).await?;
    Ok(table_bytes(&raw))
}

async fn read_first_cluster(file: &Child) -> io::Result<(Vec<u8>, Layout)> {
    let mut head = vec![0u8; 512.min(file.node().size() as usize)];
    file.read(0, &mut head).await?;
    if head.len() < 24 {
        return Err(corrupt("header is too short"));
    }
    let cluster_size = 1usize << be32(&head, 20).clamp(9, 21);
    let mut first = vec![0u8; cluster_size.min(file.node().size() as usize)];
    file.read(0, &mut first).await?;
    let layout = Layout::parse(&first)?;
    Ok((first, layout))
}

async fn read_entries(file: &Child, layout: &Layout) -> io::Result<Vec<Entry>> {
    if layout.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    if layout.nb_snapshots as usize > MAX_SNAPSHOTS
        || !layout
            .snapshots_offset
            .is_multiple_of(layout.cluster_size())
    {
        return Err(corrupt("bad snapshot table location"));
    }
    // Entries are at least 40 bytes; read on until every entry fits.
    let mut len = (layout.nb_snapshots as u64 * ENTRY_FIXED as u64).next_multiple_of(4096);
    loop {
        let available = file.node().size().saturating_sub(layout.snapshots_offset);
        let mut table = vec![0u8; len.min(available) as usize];
        file.read(layout.snapshots_offset, &mut table).await?;
        match parse_table(&table, layout.nb_snapshots) {
            Ok(entries) => return Ok(entries),
            Err(_) if len < available.min(MAX_TABLE_SIZE) => len *= 2,
            Err(e) => return Err(e),
        }
    }
}

/// Point the header at a snapshot table: one write of both fields.
async fn write_table_pointer(file: &Child, count: usize, offset: u64) -> io::Result<()> {
    let mut fields = [0u8; 12];
    fields[..4].copy_from_slice(&(count as u32).to_be_bytes());
    fields[4..].copy_from_slice(&offset.to_be_bytes());
    file.write(60, &fields, WriteFlags::default()).await?;
    file.flush().await
}

/// Write `entries` as a table in fresh clusters; returns its offset (0 when empty) and the
/// clusters it occupies.
async fn write_new_table(
    file: &Child,
    refcounts: &mut Refcounts,
    map: &MetadataMap,
    layout: &Layout,
    entries: &[Entry],
) -> io::Result<(u64, Vec<u64>)> {
    let table = encode_table(entries);
    if table.is_empty() {
        return Ok((0, Vec::new()));
    }
    if table.len() as u64 > MAX_TABLE_SIZE {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    }
    let clusters = (table.len() as u64).div_ceil(layout.cluster_size());
    let first = refcounts.allocate(clusters).await?;
    refcounts.write_back(map).await?;
    let offset = first << layout.cluster_bits;
    map.check(offset, table.len() as u64, None, refcounts)?;
    file.write(offset, &table, WriteFlags::default()).await?;
    file.flush().await?;
    Ok((offset, (first..first + clusters).collect()))
}

fn table_clusters(offset: u64, len_bytes: u64, layout: &Layout) -> Vec<u64> {
    let first = offset >> layout.cluster_bits;
    (first..first + len_bytes.div_ceil(layout.cluster_size())).collect()
}

/// The current snapshot table's clusters (to free once it is replaced).
fn current_table_clusters(entries: &[Entry], layout: &Layout) -> Vec<u64> {
    if layout.nb_snapshots == 0 || layout.snapshots_offset == 0 {
        return Vec::new();
    }
    table_clusters(
        layout.snapshots_offset,
        encode_table(entries).len() as u64,
        layout,
    )
}

/// Give COPIED to exactly the active L1 and L2 entries whose cluster has refcount 1.
async fn sync_copied_flags(
    file: &Child,
    refcounts: &mut Refcounts,
    map: &MetadataMap,
    layout: &Layout,
) -> io::Result<()> {
    let cluster_size = layout.cluster_size();
    let mut l1 = read_table(file, layout.l1_offset, layout.l1_size as u64).await?;
    let mut l1_changed = false;
    for entry in l1.iter_mut() {
        let l2_offset = *entry & OFFSET_MASK;
        if l2_offset == 0 {
            continue;
        }
        let mut l2 = read_table(file, l2_offset, cluster_size / 8).await?;
        let mut l2_changed = false;
        // Data in an external file is not refcounted: its entries keep COPIED.
        let data_entries = if layout.external { 0 } else { l2.len() };
        for l2_entry in l2
            .iter_mut()
            .take(data_entries)
            .step_by(layout.entry_words())
        {
            let standard = *l2_entry & COMPRESSED == 0;
            let refcount = match layout.referenced(*l2_entry) {
                Some(clusters) if standard => refcounts.get(*clusters.start()).await?,
                _ => 0,
            };
            let new = with_copied(*l2_entry, standard, refcount);
            l2_changed |= new != *l2_entry;
            *l2_entry = new;
        }
        if l2_changed {
            map.check(l2_offset, cluster_size, Some(Metadata::ActiveL2), refcounts)?;
            file.write(l2_offset, &raw_bytes(&l2), WriteFlags::default())
                .await?;
        }
        let refcount = refcounts.get(l2_offset >> layout.cluster_bits).await?;
        let new = with_copied(*entry, true, refcount);
        l1_changed |= new != *entry;
        *entry = new;
    }
    if l1_changed {
        let len = layout.l1_size as u64 * 8;
        map.check(layout.l1_offset, len, Some(Metadata::ActiveL1), refcounts)?;
        file.write(layout.l1_offset, &raw_bytes(&l1), WriteFlags::default())
            .await?;
    }
    file.flush().await
}

/// One reference more (`add`) or less for everything an L1 table reaches: its L2 tables
/// and the clusters their entries hold. Collected first, so a refcount that would overflow
/// refuses the whole change before anything is written.
async fn references(
    file: &Child,
    layout: &Layout,
    l1_offset: u64,
    l1_size: u32,
) -> io::Result<BTreeMap<u64, u64>> {
    let mut counts = BTreeMap::new();
    let l1 = read_table(file, l1_offset, l1_size as u64).await?;
    for entry in l1 {
        let l2_offset = entry & OFFSET_MASK;
        if l2_offset == 0 {
            continue;
        }
        *counts.entry(l2_offset >> layout.cluster_bits).or_insert(0) += 1;
        if layout.external {
            // Data in an external file is not refcounted.
            continue;
        }
        let l2 = read_table(file, l2_offset, layout.cluster_size() / 8).await?;
        for l2_entry in l2.into_iter().step_by(layout.entry_words()) {
            for cluster in layout.referenced(l2_entry).into_iter().flatten() {
                *counts.entry(cluster).or_insert(0) += 1;
            }
        }
    }
    Ok(counts)
}

/// What the refcounts should be, for the references L1 tables hold: the header cluster, the
/// active L1 table, the snapshot table, each snapshot's L1 copy, and what each L1 table
/// reaches (counted per table, as snapshots count them). Bitmaps are not counted here.
pub(super) async fn count_references(file: &Child) -> io::Result<BTreeMap<u64, u64>> {
    let (_, layout) = read_first_cluster(file).await?;
    let entries = read_entries(file, &layout).await?;
    let mut counts = BTreeMap::new();
    let add = |counts: &mut BTreeMap<u64, u64>, clusters: Vec<u64>| {
        for cluster in clusters {
            *counts.entry(cluster).or_insert(0) += 1;
        }
    };
    add(&mut counts, vec![0]);
    add(&mut counts, current_table_clusters(&entries, &layout));
    let tables = std::iter::once((layout.l1_offset, layout.l1_size))
        .chain(entries.iter().map(|e| (e.l1_offset, e.l1_size)));
    for (offset, size) in tables {
        if size == 0 {
            continue;
        }
        if size as u64 * 8 > MAX_L1_BYTES {
            return Err(corrupt("L1 table too large"));
        }
        add(
            &mut counts,
            table_clusters(offset, size as u64 * 8, &layout),
        );
        for (cluster, n) in references(file, &layout, offset, size).await? {
            *counts.entry(cluster).or_insert(0) += n;
        }
    }
    Ok(counts)
}

/// Give COPIED to exactly the active L1 and L2 entries whose cluster has refcount 1, after
/// the refcounts were rebuilt.
pub(super) async fn sync_copied(
    file: &Child,
    refcounts: &mut Refcounts,
    map: &MetadataMap,
) -> io::Result<()> {
    let (_, layout) = read_first_cluster(file).await?;
    sync_copied_flags(file, refcounts, map, &layout).await
}

fn now() -> (u32, u32) {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // Microseconds, as QEMU takes the time of day.
    (since.as_secs() as u32, since.subsec_micros() * 1000)
}

/// Where the snapshot table lies (bytes) and each snapshot's L1 table (offset, entries), for
/// the overlap checks.
pub(super) async fn table_extents(
    file: &Child,
    first: &[u8],
) -> io::Result<(std::ops::Range<u64>, Vec<(u64, u64)>)> {
    let layout = Layout::parse(first)?;
    let entries = read_entries(file, &layout).await?;
    let table =
        layout.snapshots_offset..layout.snapshots_offset + encode_table(&entries).len() as u64;
    let l1s = entries
        .iter()
        .map(|e| (e.l1_offset, e.l1_size as u64))
        .collect();
    Ok((table, l1s))
}

/// The snapshots an image holds, read from its table.
pub(super) async fn load_list(file: &Child) -> io::Result<Vec<SnapshotInfo>> {
    let (_, layout) = read_first_cluster(file).await?;
    let entries = read_entries(file, &layout).await?;
    Ok(entries.iter().map(Entry::info).collect())
}

impl Qcow2 {
    /// The snapshots the image holds (as known since open: see `snapshot_list`).
    pub(super) fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.snapshot_list.lock().unwrap().clone()
    }

    fn set_snapshot_list(&self, entries: &[Entry]) {
        *self.snapshot_list.lock().unwrap() = entries.iter().map(Entry::info).collect();
    }

    /// Take an internal snapshot named `name` of the node's current content.
    pub(super) async fn create_snapshot(
        &self,
        node: &Node,
        name: &str,
    ) -> io::Result<SnapshotInfo> {
        if self.header().has_data_file() {
            // As QEMU: snapshots would need the data file's clusters refcounted.
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        node.drain().await;
        let result = self.with_image_quiet(node, self.do_create(name)).await;
        node.undrain();
        let info = result?;
        tracing::info!(
            node = node.name(),
            id = info.id,
            name = info.name,
            "created internal snapshot"
        );
        Ok(info)
    }

    /// Delete the snapshot that `id` and `name` (those given) both match; None when there
    /// is none.
    pub(super) async fn delete_snapshot(
        &self,
        node: &Node,
        id: Option<&str>,
        name: Option<&str>,
    ) -> io::Result<Option<SnapshotInfo>> {
        node.drain().await;
        let result = self.with_image_quiet(node, self.do_delete(id, name)).await;
        node.undrain();
        let info = result?;
        if let Some(info) = &info {
            tracing::info!(
                node = node.name(),
                id = info.id,
                name = info.name,
                "deleted internal snapshot"
            );
        }
        Ok(info)
    }

    /// Run `change` on the metadata while the data path is flushed and idle, then open it
    /// anew (also when the change failed half way: its caches may be stale either way).
    async fn with_image_quiet<T>(
        &self,
        node: &Node,
        change: impl std::future::Future<Output = io::Result<T>>,
    ) -> io::Result<T> {
        let mut image = self.image.write().await;
        if !self.writable.load(Ordering::Acquire) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        image.flush().await?;
        let result = change.await;
        *image = Image::open(
            self.file.clone(),
            node.child("data-file"),
            node.child("backing"),
            true,
            self.settings.clone(),
            super::compression::Compression::of(&self.header()),
        )
        .await?;
        result
    }

    async fn do_create(&self, name: &str) -> io::Result<SnapshotInfo> {
        let file = &*self.file;
        let (first, layout) = read_first_cluster(file).await?;
        let mut entries = read_entries(file, &layout).await?;
        if entries.len() >= MAX_SNAPSHOTS {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let old_table = current_table_clusters(&entries, &layout);
        let mut refcounts = Refcounts::load(self.file.clone(), &first)
            .await?
            .with_pass_discard(self.settings.pass_discard);
        let map = MetadataMap::load(file, &first, None, self.settings.checks).await?;
        let counts = references(file, &layout, layout.l1_offset, layout.l1_size).await?;
        let max = refcounts.max();
        for (&cluster, &n) in &counts {
            if refcounts.get(cluster).await?.saturating_add(n) > max {
                // The refcount would overflow: QEMU refuses with EINVAL as well.
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
        }

        let l1_bytes = layout.l1_size as u64 * 8;
        let l1_clusters = l1_bytes.div_ceil(layout.cluster_size());
        let l1_copy = if l1_clusters == 0 {
            0
        } else {
            refcounts.allocate(l1_clusters).await? << layout.cluster_bits
        };
        for (&cluster, &n) in &counts {
            let value = refcounts.get(cluster).await? + n;
            refcounts.set(cluster, value).await?;
        }
        refcounts.write_back(&map).await?;
        sync_copied_flags(file, &mut refcounts, &map, &layout).await?;
        if l1_copy != 0 {
            let l1 = read_table(file, layout.l1_offset, layout.l1_size as u64).await?;
            let copy: Vec<u64> = l1.iter().map(|e| e & !COPIED).collect();
            map.check(l1_copy, l1_bytes, None, &refcounts)?;
            file.write(l1_copy, &raw_bytes(&copy), WriteFlags::default())
                .await?;
        }

        let (date_sec, date_nsec) = now();
        let mut extra = Vec::with_capacity(EXTRA_DATA_SIZE);
        extra.extend_from_slice(&0u64.to_be_bytes());
        extra.extend_from_slice(&layout.size.to_be_bytes());
        extra.extend_from_slice(&u64::MAX.to_be_bytes());
        let entry = Entry {
            l1_offset: l1_copy,
            l1_size: layout.l1_size,
            id: next_id(&entries),
            name: name.to_string(),
            date_sec,
            date_nsec,
            // Without a guest, QEMU's virtual clock is the time of day.
            vm_clock_nsec: date_sec as u64 * 1_000_000_000 + date_nsec as u64,
            vm_state_size: 0,
            extra,
        };
        let info = entry.info();
        entries.push(entry);
        let (table_offset, _) =
            write_new_table(file, &mut refcounts, &map, &layout, &entries).await?;
        write_table_pointer(file, entries.len(), table_offset).await?;
        self.set_snapshot_list(&entries);
        for cluster in old_table {
            refcounts.release(cluster, Freed::Snapshot).await?;
        }
        refcounts.write_back(&map).await?;
        Ok(info)
    }

    async fn do_delete(
        &self,
        id: Option<&str>,
        name: Option<&str>,
    ) -> io::Result<Option<SnapshotInfo>> {
        let file = &*self.file;
        let (first, layout) = read_first_cluster(file).await?;
        let mut entries = read_entries(file, &layout).await?;
        let Some(index) = find(&entries, id, name) else {
            return Ok(None);
        };
        let old_table = current_table_clusters(&entries, &layout);
        let mut refcounts = Refcounts::load(self.file.clone(), &first)
            .await?
            .with_pass_discard(self.settings.pass_discard);
        let map = MetadataMap::load(file, &first, None, self.settings.checks).await?;
        let gone = entries.remove(index);
        let counts = references(file, &layout, gone.l1_offset, gone.l1_size).await?;

        let (table_offset, _) =
            write_new_table(file, &mut refcounts, &map, &layout, &entries).await?;
        write_table_pointer(file, entries.len(), table_offset).await?;
        self.set_snapshot_list(&entries);

        for (&cluster, &n) in &counts {
            let value = refcounts.get(cluster).await?;
            if value < n {
                tracing::warn!(
                    cluster,
                    "qcow2: snapshot refcount lower than its references"
                );
            }
            for _ in 0..n.min(value) {
                refcounts.release(cluster, Freed::Snapshot).await?;
            }
        }
        let l1_copy = table_clusters(gone.l1_offset, gone.l1_size as u64 * 8, &layout);
        for cluster in l1_copy.into_iter().chain(old_table) {
            refcounts.release(cluster, Freed::Snapshot).await?;
        }
        refcounts.write_back(&map).await?;
        sync_copied_flags(file, &mut refcounts, &map, &layout).await?;
        Ok(Some(gone.info()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, name: &str) -> Entry {
        Entry {
            l1_offset: 0x40000,
            l1_size: 1,
            id: id.into(),
            name: name.into(),
            date_sec: 1_700_000_000,
            date_nsec: 5000,
            vm_clock_nsec: 7,
            vm_state_size: 0,
            extra: [0u64, 4 << 20, u64::MAX]
                .iter()
                .flat_map(|v| v.to_be_bytes())
                .collect(),
        }
    }

    #[test]
    fn table_round_trip() {
        let mut odd = entry("12", "odd extra");
        odd.extra = vec![1, 2, 3];
        let entries = vec![entry("1", "first"), odd, entry("3", "")];
        let table = encode_table(&entries);
        assert_eq!(table.len() % 8, 0);
        // 40 fixed + 24 extra + 1 id + 5 name = 70, padded to 72.
        assert_eq!(&table[72..80], &0x40000u64.to_be_bytes());
        assert_eq!(parse_table(&table, 3).unwrap(), entries);
        assert!(parse_table(&table, 4).is_err());
        assert!(parse_table(&table[..60], 1).is_err());
    }

    #[test]
    fn info_reads_extra_data() {
        let mut e = entry("1", "a");
        e.extra[0..8].copy_from_slice(&(1u64 << 33).to_be_bytes());
        e.extra[16..24].copy_from_slice(&99u64.to_be_bytes());
        let info = e.info();
        assert_eq!(info.vm_state_size, 1 << 33);
        assert_eq!(info.icount, Some(99));
        assert_eq!(entry("1", "a").info().icount, None);
        let mut old = entry("1", "a");
        old.extra.clear();
        old.vm_state_size = 512;
        assert_eq!(old.info().vm_state_size, 512);
    }

    #[test]
    fn ids_and_lookup() {
        assert_eq!(next_id(&[]), "1");
        let entries = vec![entry("1", "a"), entry("7", "b"), entry("x", "7")];
        assert_eq!(next_id(&entries), "8");
        assert_eq!(find(&entries, None, Some("7")), Some(2));
        assert_eq!(find(&entries, Some("7"), None), Some(1));
        assert_eq!(find(&entries, Some("7"), Some("b")), Some(1));
        assert_eq!(find(&entries, Some("7"), Some("a")), None);
        assert_eq!(find(&entries, None, None), None);
    }

    #[test]
    fn l2_entry_references() {
        let layout = Layout {
            extended: false,
            external: false,
            cluster_bits: 16,
            size: 0,
            l1_size: 0,
            l1_offset: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
        };
        assert_eq!(layout.referenced(0), None);
        // Zero cluster without preallocation.
        assert_eq!(layout.referenced(1), None);
        assert_eq!(layout.referenced(COPIED | 0x30000), Some(3..=3));
        assert_eq!(layout.referenced(0x50000 | 1), Some(5..=5));
        // Compressed: offset bits below 54, additional sectors above; this one starts 512
        // bytes before the end of cluster 2 and takes two more sectors.
        let shift = 62 - 8;
        let compressed = COMPRESSED | (2u64 << shift) | (0x30000 - 512);
        assert_eq!(layout.referenced(compressed), Some(2..=3));
        assert_eq!(with_copied(0x30000, true, 1), COPIED | 0x30000);
        assert_eq!(with_copied(COPIED | 0x30000, true, 2), 0x30000);
        assert_eq!(with_copied(COPIED | 1, true, 1), 1);
        assert_eq!(with_copied(compressed, false, 1), compressed);
    }
}
