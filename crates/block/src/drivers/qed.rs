//! `qed`: QEMU's enhanced disk format. A header cluster (the backing file name inside it),
//! an L1 table of L2 table offsets and L2 tables of cluster offsets, all little-endian;
//! an entry of 1 in an L2 table is a zero cluster. Nothing is refcounted: new tables and
//! clusters are appended at the end of the file.
//!
//! A new cluster (what the guest read there before, merged with the new data) and a new
//! L2 table are written and flushed before a table entry names them, so a crash leaves at
//! worst unreferenced space at the end. An image QEMU left with its "needs check" flag
//! (it crashed while allocating) is checked when opened read-write, as QEMU does: table
//! entries that point outside the file or off a cluster boundary are cleared, then the
//! flag is.

use super::block_map::{in_block, read_metadata, read_zero_past_end, BackingEdge};
use super::fields::{le32, le64};
use crate::node::{Child, DriverInfo, Extent, ExtentKind, Node, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use aio::pool::PoolBuf;
use async_trait::async_trait;
use qapi::error::QmpError;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::io;
use std::sync::Arc;

pub(crate) const MAGIC: &[u8; 4] = b"QED\0";
pub(crate) const HEADER_LEN: usize = 64;
/// Features: a backing file, the "needs check" flag, a raw backing file (no probing).
pub(crate) const F_BACKING_FILE: u64 = 1;
pub(crate) const F_NEED_CHECK: u64 = 2;
pub(crate) const F_BACKING_FORMAT_NO_PROBE: u64 = 4;
const KNOWN_FEATURES: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;
/// An L2 entry for a cluster that reads as zeroes.
const ZERO_CLUSTER: u64 = 1;
/// L2 tables kept in memory; a bounded cache, as an image may have many.
const L2_CACHE: usize = 32;
/// The largest table blockd reads (QEMU's defaults make 256 KiB tables; the format allows
/// 1 GiB ones, which would be read whole for one lookup).
const MAX_TABLE: u64 = 32 << 20;

/// The header fields (public for the fuzz target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Bytes per cluster: a power of two from 4 KiB to 64 MiB.
    pub cluster_size: u64,
    /// Clusters per table: a power of two from 1 to 16.
    pub table_size: u64,
    /// Clusters the header takes (0 taken as QEMU takes it: tables may start anywhere).
    pub header_size: u64,
    /// `F_*` bits.
    pub features: u64,
    /// Where the L1 table starts.
    pub l1_offset: u64,
    /// The disk size in bytes.
    pub image_size: u64,
    /// Where the backing file name is in the header cluster(s), and its length.
    pub backing: Option<(u64, u64)>,
}

impl Header {
    /// Parse and check a header as QEMU does, in its words.
    pub fn parse(buf: &[u8]) -> Result<Header, String> {
        if buf.len() < HEADER_LEN || &buf[..4] != MAGIC {
            return Err("Image not in QED format".into());
        }
        let cluster_size = le32(buf, 4) as u64;
        let table_size = le32(buf, 8) as u64;
        let header_size = le32(buf, 12) as u64;
        let features = le64(buf, 16);
        if features & !KNOWN_FEATURES != 0 {
            return Err(format!(
                "Unsupported QED features: {:x}",
                features & !KNOWN_FEATURES
            ));
        }
        if !cluster_size.is_power_of_two() || !(4096..=64 << 20).contains(&cluster_size) {
            return Err("QED cluster size is invalid".into());
        }
        if !table_size.is_power_of_two() || !(1..=16).contains(&table_size) {
            return Err("QED table size is invalid".into());
        }
        let image_size = le64(buf, 48);
        let table_bytes = table_size * cluster_size;
        let entries = table_bytes / 8;
        let max_size = entries.saturating_mul(entries).saturating_mul(cluster_size);
        if !image_size.is_multiple_of(512) || image_size > max_size {
            return Err("QED image size is invalid".into());
        }
        let l1_offset = le64(buf, 40);
        if !l1_offset.is_multiple_of(cluster_size) || l1_offset < header_size * cluster_size {
            return Err("QED table offset is invalid".into());
        }
        let backing = if features & F_BACKING_FILE != 0 {
            let offset = le32(buf, 56) as u64;
            let len = le32(buf, 60) as u64;
            if offset + len > header_size * cluster_size || len > 1023 {
                return Err("The QED backing file name lies outside its header".into());
            }
            // An empty name, as QEMU reads it: no backing file.
            (len > 0).then_some((offset, len))
        } else {
            None
        };
        Ok(Header {
            cluster_size,
            table_size,
            header_size,
            features,
            l1_offset,
            image_size,
            backing,
        })
    }

    fn table_bytes(&self) -> u64 {
        self.table_size * self.cluster_size
    }

    fn entries(&self) -> u64 {
        self.table_bytes() / 8
    }

    /// The header as it is written (`parse` reads it back).
    pub(crate) fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&(self.cluster_size as u32).to_le_bytes());
        b[8..12].copy_from_slice(&(self.table_size as u32).to_le_bytes());
        b[12..16].copy_from_slice(&(self.header_size as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.features.to_le_bytes());
        b[40..48].copy_from_slice(&self.l1_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.image_size.to_le_bytes());
        if let Some((offset, len)) = self.backing {
            b[56..60].copy_from_slice(&(offset as u32).to_le_bytes());
            b[60..64].copy_from_slice(&(len as u32).to_le_bytes());
        }
        b
    }
}

/// A new image as QEMU lays it out: the header cluster (the backing file name after the
/// header), then a zeroed L1 table.
pub(crate) fn new_image(
    size: u64,
    cluster_size: u64,
    table_size: u64,
    backing: Option<(&str, bool)>,
) -> (Header, Vec<u8>) {
    let mut features = 0;
    if let Some((_, raw)) = backing {
        features |= F_BACKING_FILE;
        if raw {
            features |= F_BACKING_FORMAT_NO_PROBE;
        }
    }
    let header = Header {
        cluster_size,
        table_size,
        header_size: 1,
        features,
        l1_offset: cluster_size,
        image_size: size,
        backing: backing.map(|(name, _)| (HEADER_LEN as u64, name.len() as u64)),
    };
    let mut first = vec![0u8; cluster_size as usize];
    first[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    if let Some((name, _)) = backing {
        first[HEADER_LEN..HEADER_LEN + name.len()].copy_from_slice(name.as_bytes());
    }
    (header, first)
}

/// Where a guest cluster's data is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mapping {
    Data(u64),
    Zero,
    Unallocated,
}

struct Meta {
    l1: Vec<u64>,
    l2: HashMap<u64, Vec<u64>>,
    /// Where the next table or cluster goes: the file's end, cluster aligned.
    end: u64,
}

pub struct Qed {
    file: Arc<Child>,
    /// The disk size: the header's, until a resize grows it.
    size: std::sync::atomic::AtomicU64,
    /// Changes when the graph gives the node another backing node.
    backing: BackingEdge,
    header: Header,
    backing_name: Option<String>,
    /// Lookups and allocations; allocating writes hold it while they write.
    meta: tokio::sync::Mutex<Meta>,
}

impl Qed {
    /// Whether `offset` may be a table or cluster: aligned, past the header, in the file.
    fn valid_offset(&self, offset: u64, file_size: u64) -> bool {
        let h = &self.header;
        offset.is_multiple_of(h.cluster_size)
            && offset >= h.header_size * h.cluster_size
            && offset < file_size
    }

    async fn l2_table<'m>(&self, meta: &'m mut Meta, offset: u64) -> io::Result<&'m mut Vec<u64>> {
        if !meta.l2.contains_key(&offset) {
            if !self.valid_offset(offset, self.file.node().size()) {
                return Err(io::Error::other("qed: an L1 entry points outside the file"));
            }
            if meta.l2.len() >= L2_CACHE {
                meta.l2.clear();
            }
            let mut raw = vec![0u8; self.header.table_bytes() as usize];
            read_zero_past_end(&self.file, offset, &mut raw).await?;
            meta.l2
                .insert(offset, raw.chunks_exact(8).map(|c| le64(c, 0)).collect());
        }
        Ok(meta.l2.get_mut(&offset).expect("inserted above"))
    }

    fn indexes(&self, pos: u64) -> (usize, usize) {
        let cluster = pos / self.header.cluster_size;
        let entries = self.header.entries();
        ((cluster / entries) as usize, (cluster % entries) as usize)
    }

    async fn lookup(&self, meta: &mut Meta, pos: u64) -> io::Result<Mapping> {
        let (l1_index, l2_index) = self.indexes(pos);
        let l2_offset = meta.l1.get(l1_index).copied().unwrap_or(0);
        if l2_offset == 0 {
            return Ok(Mapping::Unallocated);
        }
        Ok(match self.l2_table(meta, l2_offset).await?[l2_index] {
            0 => Mapping::Unallocated,
            ZERO_CLUSTER => Mapping::Zero,
            e if self.valid_offset(e, self.file.node().size()) => Mapping::Data(e),
            _ => return Err(io::Error::other("qed: an L2 entry points outside the file")),
        })
    }

    async fn read_cluster_part(
        &self,
        mapping: Mapping,
        pos: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        match mapping {
            Mapping::Data(host) => {
                self.file
                    .read(host + pos % self.header.cluster_size, buf)
                    .await
            }
            Mapping::Zero => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Unallocated => self.backing.read(pos, buf).await,
        }
    }

    /// Grow the file for what `meta.end` now includes.
    async fn grow(&self, meta: &Meta) -> io::Result<()> {
        if meta.end > self.file.node().size() {
            self.file.node().truncate(meta.end).await?;
        }
        Ok(())
    }

    /// The L2 table for `pos`, a new (zeroed) one flushed and named by the L1 table if
    /// there was none.
    async fn ensure_l2(&self, meta: &mut Meta, pos: u64) -> io::Result<u64> {
        let (l1_index, _) = self.indexes(pos);
        let existing = meta.l1[l1_index];
        if existing != 0 {
            return Ok(existing);
        }
        let table = meta.end;
        meta.end += self.header.table_bytes();
        self.grow(meta).await?;
        // The new file space reads as zeroes: the empty table.
        self.file.flush().await?;
        self.file
            .write(
                self.header.l1_offset + l1_index as u64 * 8,
                &table.to_le_bytes(),
                WriteFlags::default(),
            )
            .await?;
        meta.l1[l1_index] = table;
        meta.l2
            .insert(table, vec![0; self.header.entries() as usize]);
        Ok(table)
    }

    async fn set_entry(&self, meta: &mut Meta, pos: u64, entry: u64) -> io::Result<()> {
        let table = self.ensure_l2(meta, pos).await?;
        let (_, l2_index) = self.indexes(pos);
        self.file
            .write(
                table + l2_index as u64 * 8,
                &entry.to_le_bytes(),
                WriteFlags::default(),
            )
            .await?;
        self.l2_table(meta, table).await?[l2_index] = entry;
        Ok(())
    }

    /// Write `data` at `pos` (within one cluster) into a new cluster: the rest of it is
    /// what the guest read there; then the L2 entry.
    async fn allocate(
        &self,
        meta: &mut Meta,
        mapping: Mapping,
        pos: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let cluster_size = self.header.cluster_size;
        self.ensure_l2(meta, pos).await?;
        let cluster_start = pos - pos % cluster_size;
        let mut cluster = PoolBuf::new(cluster_size as usize, 1)?;
        let bytes = cluster.as_mut_slice();
        let len = cluster_size.min(self.disk_size() - cluster_start) as usize;
        self.read_cluster_part(mapping, cluster_start, &mut bytes[..len])
            .await?;
        bytes[len..].fill(0);
        let at = (pos - cluster_start) as usize;
        bytes[at..at + data.len()].copy_from_slice(data);
        let host = meta.end;
        meta.end += cluster_size;
        self.grow(meta).await?;
        self.file.write(host, bytes, WriteFlags::default()).await?;
        // The cluster is on disk before the L2 entry names it.
        self.file.flush().await?;
        self.set_entry(meta, pos, host).await
    }

    fn disk_size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }

    /// QEMU's check after an unclean close, repairing: L1 and L2 entries that cannot be
    /// tables or clusters are cleared (their clusters read from the backing file again,
    /// as QEMU's repair leaves them); then the flag is cleared.
    async fn check_and_repair(&self, meta: &mut Meta) -> io::Result<()> {
        let file_size = self.file.node().size();
        let plain = WriteFlags::default();
        for i in 0..meta.l1.len() {
            let table = meta.l1[i];
            if table == 0 {
                continue;
            }
            if !self.valid_offset(table, file_size) {
                tracing::warn!(entry = i, offset = table, "qed check: clearing an L1 entry");
                self.file
                    .write(
                        self.header.l1_offset + i as u64 * 8,
                        &0u64.to_le_bytes(),
                        plain,
                    )
                    .await?;
                meta.l1[i] = 0;
                continue;
            }
            let entries = self.l2_table(meta, table).await?.clone();
            for (j, entry) in entries.iter().enumerate() {
                if *entry > ZERO_CLUSTER && !self.valid_offset(*entry, file_size) {
                    tracing::warn!(table, entry = j, "qed check: clearing an L2 entry");
                    self.file
                        .write(table + j as u64 * 8, &0u64.to_le_bytes(), plain)
                        .await?;
                    self.l2_table(meta, table).await?[j] = 0;
                }
            }
        }
        self.file.flush().await?;
        let features = self.header.features & !F_NEED_CHECK;
        self.file.write(16, &features.to_le_bytes(), plain).await?;
        self.file.flush().await
    }
}

#[async_trait(?Send)]
impl Driver for Qed {
    fn format_name(&self) -> &'static str {
        "qed"
    }

    fn size(&self, _node: &Node) -> u64 {
        self.disk_size()
    }

    async fn read(&self, _node: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = in_block(self.header.cluster_size, pos, (buf.len() - done) as u64) as usize;
            let mapping = self.lookup(&mut *self.meta.lock().await, pos).await?;
            self.read_cluster_part(mapping, pos, &mut buf[done..done + n])
                .await?;
            done += n;
        }
        Ok(())
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = in_block(self.header.cluster_size, pos, (buf.len() - done) as u64) as usize;
            let chunk = &buf[done..done + n];
            let mut meta = self.meta.lock().await;
            match self.lookup(&mut meta, pos).await? {
                Mapping::Data(host) => {
                    drop(meta);
                    let within = pos % self.header.cluster_size;
                    self.file
                        .write(host + within, chunk, WriteFlags::default())
                        .await?;
                }
                mapping => self.allocate(&mut meta, mapping, pos, chunk).await?,
            }
            done += n;
        }
        if flags.fua {
            self.file.flush().await?;
        }
        Ok(())
    }

    /// Whole clusters become zero clusters; parts of clusters with data get zeroes
    /// written; parts of clusters without data already read as zeroes unless a backing
    /// file shows through.
    async fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        let backing = self.backing.get().is_some();
        let mut done = 0;
        while done < len {
            let pos = offset + done;
            let n = in_block(self.header.cluster_size, pos, len - done);
            let whole = n == self.header.cluster_size
                || pos.is_multiple_of(self.header.cluster_size) && pos + n == self.disk_size();
            let mut meta = self.meta.lock().await;
            let mapping = self.lookup(&mut meta, pos).await?;
            if whole {
                if mapping != Mapping::Zero {
                    self.set_entry(&mut meta, pos, ZERO_CLUSTER).await?;
                }
            } else {
                match mapping {
                    Mapping::Zero => {}
                    Mapping::Unallocated if !backing => {}
                    Mapping::Data(host) => {
                        drop(meta);
                        let plain = WriteFlags {
                            no_fallback: flags.no_fallback,
                            ..WriteFlags::default()
                        };
                        let within = pos % self.header.cluster_size;
                        self.file.write_zeroes(host + within, n, plain).await?;
                    }
                    Mapping::Unallocated if flags.no_fallback => {
                        return Err(io::Error::from_raw_os_error(libc::ENOTSUP))
                    }
                    Mapping::Unallocated => {
                        drop(meta);
                        // In bounded pieces: a cluster may be 64 MiB.
                        let zeroes = vec![0u8; n.min(1 << 20) as usize];
                        let mut at = 0;
                        while at < n {
                            let part = (n - at).min(zeroes.len() as u64) as usize;
                            self.write(node, pos + at, &zeroes[..part], WriteFlags::default())
                                .await?;
                            at += part as u64;
                        }
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

    /// Discard is advisory and qed keeps its clusters: the data stays, as in QEMU.
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
        // A run ends with its L2 table at the latest: a caller asking about the rest of a
        // large disk comes back for more instead of holding the tables.
        let table = self.header.entries() * self.header.cluster_size;
        let len = len.min(size - offset).min(table - offset % table);
        let mut meta = self.meta.lock().await;
        let first = self.lookup(&mut meta, offset).await?;
        let kind_of = |m: Mapping| match m {
            Mapping::Data(_) => 0,
            Mapping::Zero => 1,
            Mapping::Unallocated => 2,
        };
        let mut run = in_block(self.header.cluster_size, offset, len);
        while run < len && kind_of(self.lookup(&mut meta, offset + run).await?) == kind_of(first) {
            run += in_block(self.header.cluster_size, offset + run, len - run);
        }
        let kind = match first {
            Mapping::Data(_) => ExtentKind::Data,
            Mapping::Zero => ExtentKind::Zero { allocated: true },
            Mapping::Unallocated => ExtentKind::Unallocated,
        };
        Ok(Extent { len: run, kind })
    }

    async fn reopen(&self, _: &Node, writable: bool) -> Result<(), String> {
        self.file.node().set_writable(writable).await
    }

    /// The L1 table is read anew and the cached L2 tables dropped: the other process may
    /// have allocated tables and clusters. The header must be as this node left it, but
    /// for the need-check flag: an image the other process left unclean is checked and
    /// repaired here as at open.
    async fn activate(&self, node: &Node) -> Result<(), String> {
        let fresh = Tables::read(&self.file).await.map_err(|e| e.desc)?;
        let layout = |h: &Header, size: u64| Header {
            features: h.features & !F_NEED_CHECK,
            image_size: size,
            ..h.clone()
        };
        if layout(&fresh.header, fresh.header.image_size) != layout(&self.header, self.disk_size())
            || fresh.backing_name != self.backing_name
        {
            return Err(crate::active::layout_changed("qed", "header"));
        }
        let mut meta = self.meta.lock().await;
        *meta = fresh.meta;
        if fresh.header.features & F_NEED_CHECK != 0 && !node.read_only() {
            self.check_and_repair(&mut meta)
                .await
                .map_err(|e| format!("Image corrupted: {e}"))?;
        }
        Ok(())
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
        Ok(())
    }

    /// Growing, as QEMU: the tables cover up to the format's largest disk, so only the
    /// header's size changes. Shrinking is refused, as in QEMU.
    async fn truncate(&self, _: &Node, size: u64) -> io::Result<()> {
        let h = &self.header;
        let entries = h.entries();
        let max = entries
            .saturating_mul(entries)
            .saturating_mul(h.cluster_size);
        if size < self.disk_size() {
            return Err(io::Error::other(
                "Shrinking images is currently not supported",
            ));
        }
        if !size.is_multiple_of(512) || size > max {
            return Err(io::Error::other("Invalid image size specified"));
        }
        let _meta = self.meta.lock().await;
        self.file
            .write(48, &size.to_le_bytes(), WriteFlags::default())
            .await?;
        self.file.flush().await?;
        self.size.store(size, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn child_perms(&self, role: &str, perm: Perms, _: Perms, read_only: bool) -> (Perms, Perms) {
        crate::perm::format_child_perms(role, perm, read_only)
    }

    fn info(&self, _node: &Node) -> DriverInfo {
        DriverInfo {
            cluster_size: Some(self.header.cluster_size),
            dirty_flag: Some(false),
            backing_filename: self.backing_name.clone(),
            backing_format: (self.header.features & F_BACKING_FORMAT_NO_PROBE != 0)
                .then(|| "raw".to_string()),
            ..DriverInfo::of_storage(&self.file)
        }
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: true,
    hands_over: true,
    names: &["qed"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    mut options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let backing_ref = options.remove("backing");
    let file = o.open_file_only(options).await?;
    let Tables {
        header,
        backing_name,
        meta,
    } = Tables::read(&file).await?;
    o.claim_position();
    let backing = match backing_ref {
        Some(Value::Null) => None,
        Some(reference) => Some(
            o.open_child(reference, "backing", Perms::NONE, Perms::ALL)
                .await?,
        ),
        None => match &backing_name {
            Some(name) => {
                let raw = header.features & F_BACKING_FORMAT_NO_PROBE != 0;
                let format = raw.then_some("raw");
                Some(
                    o.open_backing_from_header(&file.node(), name, format)
                        .await?,
                )
            }
            None => None,
        },
    };
    let need_check = header.features & F_NEED_CHECK != 0;
    let qed = Qed {
        size: std::sync::atomic::AtomicU64::new(header.image_size),
        file,
        backing: BackingEdge::new(backing),
        header,
        backing_name,
        meta: tokio::sync::Mutex::new(meta),
    };
    if need_check && o.may_write() {
        let mut meta = qed.meta.lock().await;
        qed.check_and_repair(&mut meta)
            .await
            .map_err(|e| QmpError::generic(format!("Image corrupted: {e}")))?;
    }
    Ok(Box::new(qed))
}

/// What an image's file says of it: the header, the backing file it names, its L1 table.
struct Tables {
    header: Header,
    backing_name: Option<String>,
    meta: Meta,
}

impl Tables {
    async fn read(file: &Child) -> Result<Tables, QmpError> {
        let file_size = file.node().size();
        let head = read_metadata(file, 0, HEADER_LEN, "qed header").await?;
        let header = Header::parse(&head).map_err(QmpError::generic)?;
        if header.table_bytes() > MAX_TABLE {
            return Err(QmpError::generic(format!(
                "blockd opens qed images whose tables are at most {MAX_TABLE} bytes"
            )));
        }
        // The L1 table is read whole: it must be in the file, which bounds what it can claim.
        if header
            .l1_offset
            .checked_add(header.table_bytes())
            .is_none_or(|end| end > file_size)
        {
            return Err(QmpError::generic("QED table offset is invalid"));
        }
        let raw = read_metadata(
            file,
            header.l1_offset,
            header.table_bytes() as usize,
            "qed L1 table",
        )
        .await?;
        let l1: Vec<u64> = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();
        let backing_name = match header.backing {
            Some((offset, len)) => {
                let name = read_metadata(file, offset, len as usize, "qed header").await?;
                Some(String::from_utf8_lossy(&name).into_owned())
            }
            None => None,
        };
        let end = file_size.next_multiple_of(header.cluster_size);
        Ok(Tables {
            header,
            backing_name,
            meta: Meta {
                l1,
                l2: HashMap::new(),
                end,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_images_parse_back_as_qemu_lays_them_out() {
        let (h, first) = new_image(5 << 20, 65536, 4, Some(("a.qed", false)));
        assert_eq!(first.len(), 65536);
        assert_eq!(Header::parse(&first), Ok(h.clone()));
        assert_eq!(
            (h.l1_offset, h.features, h.backing),
            (65536, 1, Some((64, 5)))
        );
        let (h, _) = new_image(1 << 20, 4096, 1, Some(("x.raw", true)));
        assert_eq!(h.features, 5);
    }

    #[test]
    fn bad_headers_get_qemus_words() {
        let (good, _) = new_image(5 << 20, 65536, 4, None);
        for (h, error) in [
            (
                Header {
                    cluster_size: 3000,
                    ..good.clone()
                },
                "QED cluster size",
            ),
            (
                Header {
                    table_size: 3,
                    ..good.clone()
                },
                "QED table size",
            ),
            (
                Header {
                    image_size: 1000,
                    ..good.clone()
                },
                "QED image size",
            ),
            (
                Header {
                    image_size: u64::MAX / 2,
                    ..good.clone()
                },
                "QED image size",
            ),
            (
                Header {
                    l1_offset: 100,
                    ..good.clone()
                },
                "QED table offset",
            ),
            (
                Header {
                    features: 8,
                    ..good
                },
                "Unsupported QED features",
            ),
        ] {
            let e = Header::parse(&h.to_bytes()).unwrap_err();
            assert!(e.starts_with(error), "{e}");
        }
    }
}
