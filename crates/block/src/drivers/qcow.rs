//! `qcow`: QEMU's first image format (version 1). A 48-byte header, the backing file name
//! after it, an L1 table of L2 table offsets, and L2 tables of cluster offsets (bit 63: a
//! zlib-compressed cluster, its length in the bits below). Nothing is refcounted: new L2
//! tables and clusters are appended at the end of the file.
//!
//! A new cluster is written whole (what the guest read there before, merged with the new
//! data) and flushed before the L2 entry points at it; a new L2 table is written (zeroed)
//! and flushed before the L1 entry points at it. A crash leaves at worst unreferenced space at the end. Encrypted
//! images (legacy AES) are refused.

use super::block_map::{in_block, read_metadata, BackingEdge};
use super::fields::{be32, be64};
use super::qcow2::Compression;
use crate::node::{Child, DriverInfo, Extent, ExtentKind, Node, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use aio::pool::PoolBuf;
use async_trait::async_trait;
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::io;
use std::sync::Arc;

pub(crate) const MAGIC: &[u8; 4] = b"QFI\xfb";
pub(crate) const HEADER_LEN: usize = 48;
const COMPRESSED: u64 = 1 << 63;
/// L2 tables kept in memory; a bounded cache, as an image may have millions.
const L2_CACHE: usize = 64;

/// The header fields (public for the fuzz target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The disk size in bytes.
    pub size: u64,
    /// Clusters are `1 << cluster_bits` bytes (512 to 64 KiB).
    pub cluster_bits: u32,
    /// L2 tables hold `1 << l2_bits` entries.
    pub l2_bits: u32,
    /// Where the L1 table starts.
    pub l1_offset: u64,
    /// Entries in the L1 table: enough to cover `size`.
    pub l1_size: u64,
    /// Where the backing file name is, and its length.
    pub backing: Option<(u64, u32)>,
}

impl Header {
    /// Parse and check a header as QEMU does, in its words.
    pub fn parse(buf: &[u8]) -> Result<Header, String> {
        if buf.len() < HEADER_LEN || &buf[..4] != MAGIC {
            return Err("Image not in qcow format".into());
        }
        let version = be32(buf, 4);
        if version != 1 {
            return Err(format!("qcow (v1) does not support qcow version {version}"));
        }
        let size = be64(buf, 24);
        let cluster_bits = buf[32] as u32;
        let l2_bits = buf[33] as u32;
        if size <= 1 {
            return Err("Image size is too small (must be at least 2 bytes)".into());
        }
        if !(9..=16).contains(&cluster_bits) {
            return Err("Cluster size must be between 512 and 64k".into());
        }
        // The L2 table size: between 512 bytes and 64 KiB.
        if !(6..=13).contains(&l2_bits) {
            return Err("L2 table size must be between 512 and 64k".into());
        }
        let crypt_method = be32(buf, 36);
        if crypt_method > 1 {
            return Err("invalid encryption method in qcow header".into());
        }
        if crypt_method == 1 {
            return Err(
                "blockd does not open AES-encrypted qcow images (legacy encryption)".into(),
            );
        }
        let shift = cluster_bits + l2_bits;
        if size > u64::MAX - (1 << shift) {
            return Err("Image too large".into());
        }
        let l1_size = size.div_ceil(1 << shift);
        if l1_size > i32::MAX as u64 / 8 {
            return Err("Image too large".into());
        }
        let backing_offset = be64(buf, 8);
        let backing_len = be32(buf, 16);
        let backing = match backing_offset {
            0 => None,
            _ if backing_len > 1023 => return Err("Backing file name too long".into()),
            offset => Some((offset, backing_len)),
        };
        Ok(Header {
            size,
            cluster_bits,
            l2_bits,
            l1_offset: be64(buf, 40),
            l1_size,
            backing,
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }
}

/// A new image, laid out as QEMU lays it out: 4 KiB clusters and 512-entry L2 tables, or
/// 512-byte clusters and 4096-entry tables with a backing file (so a write never needs a
/// backing file's data around it); the name after the header, then the L1 table.
pub(crate) fn new_image(size: u64, backing: Option<&str>) -> Vec<u8> {
    let (cluster_bits, l2_bits) = if backing.is_some() {
        (9u8, 12u8)
    } else {
        (12, 9)
    };
    let name = backing.unwrap_or("");
    let l1_offset = (HEADER_LEN as u64 + name.len() as u64).next_multiple_of(8);
    let l1_size = size.div_ceil(1 << (cluster_bits + l2_bits));
    let mut image = vec![0u8; l1_offset as usize + (l1_size * 8).next_multiple_of(512) as usize];
    image[..4].copy_from_slice(MAGIC);
    image[4..8].copy_from_slice(&1u32.to_be_bytes());
    if backing.is_some() {
        image[8..16].copy_from_slice(&(HEADER_LEN as u64).to_be_bytes());
        image[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        image[HEADER_LEN..HEADER_LEN + name.len()].copy_from_slice(name.as_bytes());
    }
    image[24..32].copy_from_slice(&size.to_be_bytes());
    image[32] = cluster_bits;
    image[33] = l2_bits;
    image[40..48].copy_from_slice(&l1_offset.to_be_bytes());
    image
}

/// Where a guest cluster's data is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mapping {
    Data(u64),
    Compressed(u64),
    Unallocated,
}

struct Meta {
    l1: Vec<u64>,
    l2: HashMap<u64, Vec<u64>>,
    /// Where the next table or cluster goes: the file's end, cluster aligned.
    end: u64,
}

pub struct Qcow {
    file: Arc<Child>,
    /// Changes when the graph gives the node another backing node.
    backing: BackingEdge,
    header: Header,
    backing_name: Option<String>,
    /// Lookups and allocations; allocating writes hold it while they write.
    meta: tokio::sync::Mutex<Meta>,
}

impl Qcow {
    async fn l2_table<'m>(&self, meta: &'m mut Meta, offset: u64) -> io::Result<&'m mut Vec<u64>> {
        if !meta.l2.contains_key(&offset) {
            if meta.l2.len() >= L2_CACHE {
                meta.l2.clear();
            }
            let mut raw = vec![0u8; (self.header.l2_entries() * 8) as usize];
            self.file.read(offset, &mut raw).await?;
            meta.l2
                .insert(offset, raw.chunks_exact(8).map(|c| be64(c, 0)).collect());
        }
        Ok(meta.l2.get_mut(&offset).expect("inserted above"))
    }

    async fn lookup(&self, meta: &mut Meta, pos: u64) -> io::Result<Mapping> {
        let h = &self.header;
        let l1_index = (pos >> (h.cluster_bits + h.l2_bits)) as usize;
        let l2_offset = meta.l1.get(l1_index).copied().unwrap_or(0);
        if l2_offset == 0 {
            return Ok(Mapping::Unallocated);
        }
        let index = ((pos >> h.cluster_bits) & (h.l2_entries() - 1)) as usize;
        let entry = self.l2_table(meta, l2_offset).await?[index];
        Ok(match entry {
            0 => Mapping::Unallocated,
            e if e & COMPRESSED != 0 => Mapping::Compressed(e),
            e => Mapping::Data(e),
        })
    }

    /// The whole cluster a compressed entry holds.
    async fn decompress(&self, entry: u64, out: &mut [u8]) -> io::Result<()> {
        let bits = self.header.cluster_bits;
        let len = (entry >> (63 - bits)) & (self.header.cluster_size() - 1);
        let offset = entry & ((1 << (63 - bits)) - 1);
        let mut input = vec![0u8; len as usize];
        self.file.read(offset, &mut input).await?;
        Compression::Zlib
            .decompress(&input, out)
            .map_err(|()| io::Error::other("qcow: a compressed cluster does not decompress"))
    }

    /// What the guest reads at `pos`, within one cluster.
    async fn read_cluster_part(
        &self,
        mapping: Mapping,
        pos: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let within = pos % self.header.cluster_size();
        match mapping {
            Mapping::Data(host) => self.file.read(host + within, buf).await,
            Mapping::Compressed(entry) => {
                let mut cluster = PoolBuf::new(self.header.cluster_size() as usize, 1)?;
                self.decompress(entry, cluster.as_mut_slice()).await?;
                let at = within as usize;
                buf.copy_from_slice(&cluster.as_slice()[at..at + buf.len()]);
                Ok(())
            }
            Mapping::Unallocated => self.backing.read(pos, buf).await,
        }
    }

    /// Write `data` at `pos` (within one cluster) into a new cluster: the rest of it is
    /// what the guest read there; then the L2 entry (and a new L2 table first if needed).
    async fn allocate(
        &self,
        meta: &mut Meta,
        mapping: Mapping,
        pos: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let h = &self.header;
        let cluster_size = h.cluster_size();
        let plain = WriteFlags::default();
        let l1_index = (pos >> (h.cluster_bits + h.l2_bits)) as usize;
        let mut l2_offset = meta.l1[l1_index];
        if l2_offset == 0 {
            l2_offset = meta.end;
            let table_len = h.l2_entries() * 8;
            meta.end = (l2_offset + table_len).next_multiple_of(cluster_size);
            if meta.end > self.file.node().size() {
                self.file.node().truncate(meta.end).await?;
            }
            self.file.write_zeroes(l2_offset, table_len, plain).await?;
            self.file.flush().await?;
            self.file
                .write(
                    h.l1_offset + l1_index as u64 * 8,
                    &l2_offset.to_be_bytes(),
                    plain,
                )
                .await?;
            meta.l1[l1_index] = l2_offset;
            meta.l2.insert(l2_offset, vec![0; h.l2_entries() as usize]);
        }
        let cluster_start = pos - pos % cluster_size;
        let mut cluster = PoolBuf::new(cluster_size as usize, 1)?;
        let bytes = cluster.as_mut_slice();
        let len = cluster_size.min(h.size - cluster_start) as usize;
        self.read_cluster_part(mapping, cluster_start, &mut bytes[..len])
            .await?;
        bytes[len..].fill(0);
        let at = (pos - cluster_start) as usize;
        bytes[at..at + data.len()].copy_from_slice(data);
        let host = meta.end;
        meta.end += cluster_size;
        if meta.end > self.file.node().size() {
            self.file.node().truncate(meta.end).await?;
        }
        self.file.write(host, bytes, plain).await?;
        // The cluster (and a new table) are on disk before the L2 entry names it.
        self.file.flush().await?;
        let index = (pos >> h.cluster_bits) & (h.l2_entries() - 1);
        self.file
            .write(l2_offset + index * 8, &host.to_be_bytes(), plain)
            .await?;
        self.l2_table(meta, l2_offset).await?[index as usize] = host;
        Ok(())
    }
}

#[async_trait(?Send)]
impl Driver for Qcow {
    fn format_name(&self) -> &'static str {
        "qcow"
    }

    /// Whole sectors, as QEMU reports it.
    fn size(&self, _node: &Node) -> u64 {
        self.header.size / 512 * 512
    }

    async fn read(&self, _node: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = in_block(self.header.cluster_size(), pos, (buf.len() - done) as u64) as usize;
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
            let n = in_block(self.header.cluster_size(), pos, (buf.len() - done) as u64) as usize;
            let chunk = &buf[done..done + n];
            let mut meta = self.meta.lock().await;
            match self.lookup(&mut meta, pos).await? {
                Mapping::Data(host) => {
                    drop(meta);
                    let within = pos % self.header.cluster_size();
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

    async fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        if flags.no_fallback {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            let plain = WriteFlags {
                fua: flags.fua,
                ..WriteFlags::default()
            };
            self.write(node, offset + done, &zeroes[..n], plain).await?;
            done += n as u64;
        }
        Ok(())
    }

    /// Discard is advisory and qcow cannot give clusters back: the data stays, as in QEMU.
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
        let len = len.min(size - offset);
        let mut meta = self.meta.lock().await;
        let first = self.lookup(&mut meta, offset).await?;
        let allocated = first != Mapping::Unallocated;
        let mut run = in_block(self.header.cluster_size(), offset, len);
        while run < len
            && (self.lookup(&mut meta, offset + run).await? != Mapping::Unallocated) == allocated
        {
            run += in_block(self.header.cluster_size(), offset + run, len - run);
        }
        let kind = match first {
            Mapping::Unallocated => ExtentKind::Unallocated,
            _ => ExtentKind::Data,
        };
        Ok(Extent { len: run, kind })
    }

    async fn reopen(&self, _: &Node, writable: bool) -> Result<(), String> {
        self.file.node().set_writable(writable).await
    }

    /// The L1 table is read anew and the cached L2 tables dropped: the other process may
    /// have allocated tables and clusters. The header must be as this node left it.
    async fn activate(&self, _: &Node) -> Result<(), String> {
        let fresh = Tables::read(&self.file).await.map_err(|e| e.desc)?;
        if fresh.header != self.header || fresh.backing_name != self.backing_name {
            return Err(crate::active::layout_changed("qcow", "header"));
        }
        *self.meta.lock().await = fresh.meta;
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

    /// QEMU's qcow cannot resize either.
    async fn truncate(&self, _: &Node, _size: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    fn child_perms(&self, role: &str, perm: Perms, _: Perms, read_only: bool) -> (Perms, Perms) {
        crate::perm::format_child_perms(role, perm, read_only)
    }

    fn info(&self, _node: &Node) -> DriverInfo {
        DriverInfo {
            cluster_size: Some(self.header.cluster_size()),
            dirty_flag: Some(false),
            backing_filename: self.backing_name.clone(),
            ..DriverInfo::of_storage(&self.file)
        }
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct QcowOptions {
    /// BlockdevQcowEncryption: refused, as blockd opens no AES-encrypted qcow image.
    encrypt: Option<Value>,
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: true,
    hands_over: true,
    names: &["qcow"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    mut options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let file_ref = o.take_child_ref(&mut options, "file")?;
    let backing_ref = options.remove("backing");
    let opts: QcowOptions = o.parse(options)?;
    if opts.encrypt.is_some() {
        return Err(QmpError::generic(
            "blockd does not open AES-encrypted qcow images (legacy encryption)",
        ));
    }
    let file = o
        .open_child(file_ref, "file", Perms::NONE, Perms::ALL)
        .await?;
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
            Some(name) => Some(o.open_backing_from_header(&file.node(), name, None).await?),
            None => None,
        },
    };
    Ok(Box::new(Qcow {
        file,
        backing: BackingEdge::new(backing),
        header,
        backing_name,
        meta: tokio::sync::Mutex::new(meta),
    }))
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
        let read = |offset: u64, len: usize| read_metadata(file, offset, len, "qcow header");
        let header = Header::parse(&read(0, HEADER_LEN).await?).map_err(QmpError::generic)?;
        // The L1 table is read whole: it must be in the file, which bounds what it can claim.
        if header
            .l1_offset
            .checked_add(header.l1_size * 8)
            .is_none_or(|end| end > file_size)
        {
            return Err(QmpError::generic(
                "qcow: the L1 table lies past the end of the file",
            ));
        }
        let raw = read(header.l1_offset, (header.l1_size * 8) as usize).await?;
        let l1: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        let backing_name = match header.backing {
            Some((offset, len)) => {
                let name = read(offset, len as usize).await?;
                Some(String::from_utf8_lossy(&name).into_owned())
            }
            None => None,
        };
        let end = file_size.next_multiple_of(header.cluster_size());
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
        let plain = new_image(5 << 20, None);
        assert_eq!(plain.len(), 560);
        let h = Header::parse(&plain).unwrap();
        assert_eq!(
            (h.cluster_bits, h.l2_bits, h.l1_offset, h.l1_size),
            (12, 9, 48, 3)
        );
        let backed = new_image(5 << 20, Some("q1.qcow"));
        let h = Header::parse(&backed).unwrap();
        assert_eq!((h.cluster_bits, h.l2_bits, h.l1_offset), (9, 12, 56));
        assert_eq!(h.backing, Some((48, 7)));
    }
}
