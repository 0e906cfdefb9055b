//! A new, empty qcow2 image written onto a node (blockdev-create): the header with its
//! extensions, one refcount table, the refcount blocks, the L1 table and, when asked to
//! preallocate, every L2 table and data cluster.
//!
//! Everything is laid out in one run from cluster 0: header, refcount table, refcount
//! blocks, L1, L2 tables, data. The counts depend on each other (the refcount blocks count
//! themselves), so they are found by iterating to a fixed point. Tables are written one
//! cluster at a time, so a preallocated 16 TiB image needs no more memory than an empty
//! one (its L1 table aside, at most 32 MiB by the format's limit).

use super::compression::Compression;
use super::crypt::{CRYPT_AES, CRYPT_LUKS, CRYPT_NONE};
use super::header::{
    self, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, EXT_CRYPTO_HEADER, EXT_DATA_FILE,
    INCOMPAT_COMPRESSION, INCOMPAT_EXTENDED_L2, INCOMPAT_EXTERNAL_DATA, MAGIC,
};
use super::image::{COPIED, MAX_L1_BYTES};
use super::refcount::write_refcount;
use crate::create::{preallocate, Prealloc};
use crate::node::{Child, WriteFlags};
use std::io;
use std::sync::Arc;

/// A version 3 header with the compression type byte, padded to 8 as QEMU writes it.
const V3_HEADER_LENGTH: usize = 112;
const V2_HEADER_LENGTH: usize = 72;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// The names older readers print for feature bits they do not know: (type, bit, name),
/// type 0 incompatible, 1 compatible, 2 autoclear, as QEMU names them.
const FEATURE_NAMES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// What the new image looks like; `check` of blockdev-create's options came first.
#[derive(Clone)]
pub struct NewQcow2<'a> {
    pub size: u64,
    pub version: u32,
    pub cluster_bits: u32,
    pub refcount_order: u32,
    pub lazy_refcounts: bool,
    pub compression: Compression,
    /// Extended L2 entries (32 subclusters per cluster; at least 16 KiB clusters).
    pub extended_l2: bool,
    /// An external data file: its name for the header and an edge to it. Guest data goes
    /// there at its own offsets, so preallocation maps clusters to their guest offsets and
    /// allocates the data there, not in the image file.
    pub data_file: Option<(&'a str, Arc<Child>)>,
    /// Mark the data file as a raw image of the disk (`preallocate` must map it all).
    pub data_file_raw: bool,
    /// The backing file name and its format, written into the header, not opened.
    pub backing: Option<(&'a str, Option<&'a str>)>,
    /// `metadata`: every L2 table and data cluster allocated, the data left sparse in the
    /// file; `falloc`: the data's file range allocated too; `full`: zeroes written there.
    pub preallocate: Prealloc,
    /// Encrypt the guest data: a new LUKS volume (header and slot 0 go into clusters after
    /// the L1 table), or legacy AES (nothing to store).
    pub encryption: Option<&'a NewEncryption>,
}

/// The encryption of a new image.
pub enum NewEncryption {
    Aes,
    Luks(Box<crypto::luks::Created>),
}

/// Where everything goes, in clusters.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    refcount_table: u64,
    refcount_table_clusters: u64,
    refcount_blocks: u64,
    refcount_block_count: u64,
    l1: u64,
    l1_entries: u64,
    /// The LUKS header's clusters.
    crypto: u64,
    crypto_clusters: u64,
    l2_tables: u64,
    l2_table_count: u64,
    data: u64,
    data_clusters: u64,
    /// Clusters in use: every one below this has refcount 1.
    end: u64,
}

impl NewQcow2<'_> {
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// 64-bit words per L2 entry: 2 with extended L2 entries (the subcluster bitmap).
    fn entry_words(&self) -> u64 {
        1 + u64::from(self.extended_l2)
    }

    fn layout(&self) -> io::Result<Layout> {
        let cluster_size = self.cluster_size();
        let l2_entries = cluster_size / 8 / self.entry_words();
        let l1_entries = self.size.div_ceil(cluster_size * l2_entries);
        if l1_entries * 8 > MAX_L1_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "The image size is too large (try using a larger cluster size)",
            ));
        }
        let l1_clusters = (l1_entries * 8).div_ceil(cluster_size);
        let (l2_table_count, data_clusters) = match self.preallocate {
            Prealloc::Off => (0, 0),
            _ if self.data_file.is_some() => (l1_entries, 0),
            _ => (l1_entries, self.size.div_ceil(cluster_size)),
        };
        let crypto_clusters = match self.encryption {
            Some(NewEncryption::Luks(created)) => {
                created.header.payload_start().div_ceil(cluster_size)
            }
            _ => 0,
        };
        let per_block = (cluster_size * 8) >> self.refcount_order;
        let fixed = 1 + l1_clusters + crypto_clusters + l2_table_count + data_clusters;
        let (mut table, mut blocks) = (1, 1);
        loop {
            let total = fixed + table + blocks;
            let need_blocks = total.div_ceil(per_block);
            let need_table = (need_blocks * 8).div_ceil(cluster_size);
            if (need_blocks, need_table) == (blocks, table) {
                break;
            }
            // Never shrinks, so this ends.
            blocks = need_blocks.max(blocks);
            table = need_table.max(table);
        }
        let l1 = 1 + table + blocks;
        let crypto = l1 + l1_clusters;
        let l2_tables = crypto + crypto_clusters;
        Ok(Layout {
            refcount_table: 1,
            refcount_table_clusters: table,
            refcount_blocks: 1 + table,
            refcount_block_count: blocks,
            l1,
            l1_entries,
            crypto,
            crypto_clusters,
            l2_tables,
            l2_table_count,
            data: l2_tables + l2_table_count,
            data_clusters,
            end: l2_tables + l2_table_count + data_clusters,
        })
    }

    /// The first cluster: header fields, extensions, backing file name.
    fn header_cluster(&self, layout: &Layout) -> io::Result<Vec<u8>> {
        let cluster_size = self.cluster_size() as usize;
        let header_length = if self.version >= 3 {
            V3_HEADER_LENGTH
        } else {
            V2_HEADER_LENGTH
        };
        let mut fields = vec![0u8; header_length];
        fields[0..4].copy_from_slice(MAGIC);
        fields[4..8].copy_from_slice(&self.version.to_be_bytes());
        fields[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        fields[24..32].copy_from_slice(&self.size.to_be_bytes());
        fields[36..40].copy_from_slice(&(layout.l1_entries as u32).to_be_bytes());
        let l1_offset = if layout.l1_entries > 0 {
            layout.l1 << self.cluster_bits
        } else {
            0
        };
        fields[40..48].copy_from_slice(&l1_offset.to_be_bytes());
        fields[48..56].copy_from_slice(&(layout.refcount_table << self.cluster_bits).to_be_bytes());
        fields[56..60].copy_from_slice(&(layout.refcount_table_clusters as u32).to_be_bytes());
        let crypt_method = match self.encryption {
            None => CRYPT_NONE,
            Some(NewEncryption::Aes) => CRYPT_AES,
            Some(NewEncryption::Luks(_)) => CRYPT_LUKS,
        };
        fields[32..36].copy_from_slice(&crypt_method.to_be_bytes());
        if self.version >= 3 {
            let zstd = self.compression == Compression::Zstd;
            let mut incompatible = if zstd { INCOMPAT_COMPRESSION } else { 0 };
            if self.extended_l2 {
                incompatible |= INCOMPAT_EXTENDED_L2;
            }
            if self.data_file.is_some() {
                incompatible |= INCOMPAT_EXTERNAL_DATA;
            }
            if self.data_file_raw {
                fields[88..96].copy_from_slice(&AUTOCLEAR_DATA_FILE_RAW.to_be_bytes());
            }
            let compatible = if self.lazy_refcounts {
                COMPAT_LAZY_REFCOUNTS
            } else {
                0
            };
            fields[72..80].copy_from_slice(&incompatible.to_be_bytes());
            fields[80..88].copy_from_slice(&compatible.to_be_bytes());
            fields[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            fields[100..104].copy_from_slice(&(header_length as u32).to_be_bytes());
            fields[104] = u8::from(zstd);
        }
        // The feature names are only a courtesy to older readers: dropped when the backing
        // file name needs the room (512-byte clusters).
        let with_names = self.version >= 3;
        match self.place_backing(&fields, layout, with_names, cluster_size) {
            Err(e) if with_names && e.raw_os_error() == Some(libc::ENOSPC) => {
                self.place_backing(&fields, layout, false, cluster_size)
            }
            placed => placed,
        }
    }

    fn place_backing(
        &self,
        fields: &[u8],
        layout: &Layout,
        with_names: bool,
        cluster_size: usize,
    ) -> io::Result<Vec<u8>> {
        let mut cluster = fields.to_vec();
        if let Some(NewEncryption::Luks(created)) = self.encryption {
            cluster.extend_from_slice(&EXT_CRYPTO_HEADER.to_be_bytes());
            cluster.extend_from_slice(&16u32.to_be_bytes());
            cluster.extend_from_slice(&(layout.crypto << self.cluster_bits).to_be_bytes());
            cluster.extend_from_slice(&created.header.payload_start().to_be_bytes());
        }
        if let Some((name, _)) = &self.data_file {
            cluster.extend_from_slice(&EXT_DATA_FILE.to_be_bytes());
            cluster.extend_from_slice(&(name.len() as u32).to_be_bytes());
            cluster.extend_from_slice(name.as_bytes());
            cluster.resize(cluster.len().next_multiple_of(8), 0);
        }
        if with_names {
            cluster.extend_from_slice(&EXT_FEATURE_TABLE.to_be_bytes());
            cluster.extend_from_slice(&((FEATURE_NAMES.len() * 48) as u32).to_be_bytes());
            for &(kind, bit, name) in FEATURE_NAMES {
                let mut entry = [0u8; 48];
                entry[0] = kind;
                entry[1] = bit;
                entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
                cluster.extend_from_slice(&entry);
            }
        }
        cluster.extend_from_slice(&[0u8; 8]);
        if cluster.len() > cluster_size {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        cluster.resize(cluster_size, 0);
        match self.backing {
            Some((name, format)) => header::with_backing(&cluster, Some(name), format),
            None => Ok(cluster),
        }
    }

    /// Write the image onto `file`'s node, which is emptied first.
    pub async fn write(&self, file: &Arc<Child>) -> io::Result<()> {
        let layout = self.layout()?;
        let cluster_size = self.cluster_size();
        let header = self.header_cluster(&layout)?;
        let node = file.node();
        let plain = WriteFlags::default();
        match node.truncate(0).await {
            // Storage that cannot shrink (ssh, as in QEMU): what the layout takes is zeroed
            // instead, and what lies past it is free space to the new image.
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                file.write_zeroes(0, layout.end * cluster_size, plain)
                    .await?
            }
            other => {
                other?;
                node.truncate(layout.end * cluster_size).await?;
            }
        }
        file.write(0, &header, plain).await?;

        let table: Vec<u8> = (0..layout.refcount_block_count)
            .flat_map(|i| ((layout.refcount_blocks + i) << self.cluster_bits).to_be_bytes())
            .collect();
        file.write(layout.refcount_table << self.cluster_bits, &table, plain)
            .await?;
        let per_block = (cluster_size * 8) >> self.refcount_order;
        let mut block = vec![0u8; cluster_size as usize];
        for i in 0..layout.refcount_block_count {
            let used = layout.end.saturating_sub(i * per_block).min(per_block);
            // Every block but the last is all ones: filled once.
            if i == 0 || used < per_block {
                block.fill(0);
                for index in 0..used {
                    write_refcount(&mut block, index as usize, self.refcount_order, 1);
                }
            }
            let at = (layout.refcount_blocks + i) << self.cluster_bits;
            file.write(at, &block, plain).await?;
        }

        let l2_entries = cluster_size / 8 / self.entry_words();
        if layout.l1_entries > 0 {
            let l1: Vec<u8> = (0..layout.l1_entries)
                .flat_map(|i| {
                    match layout.l2_table_count {
                        0 => 0u64,
                        _ => COPIED | (layout.l2_tables + i) << self.cluster_bits,
                    }
                    .to_be_bytes()
                })
                .collect();
            file.write(layout.l1 << self.cluster_bits, &l1, plain)
                .await?;
        }
        if let Some(NewEncryption::Luks(created)) = self.encryption {
            crate::drivers::luks::write_header(file, layout.crypto << self.cluster_bits, created)
                .await?;
        }
        for table in 0..layout.l2_table_count {
            block.fill(0);
            let first = table * l2_entries;
            let guest_clusters = self.size.div_ceil(cluster_size);
            let count = guest_clusters.saturating_sub(first).min(l2_entries);
            // With extended L2 entries the bitmaps stay 0: the subclusters read from the
            // backing file, or as zeroes (what QEMU writes).
            let entry_bytes = 8 * self.entry_words() as usize;
            for (j, entry) in block
                .chunks_exact_mut(entry_bytes)
                .take(count as usize)
                .enumerate()
            {
                // In a data file a cluster's data sits at its guest offset.
                let at = match self.data_file {
                    Some(_) => first + j as u64,
                    None => layout.data + first + j as u64,
                };
                let host = at << self.cluster_bits;
                entry[..8].copy_from_slice(&(COPIED | host).to_be_bytes());
            }
            file.write(
                (layout.l2_tables + table) << self.cluster_bits,
                &block,
                plain,
            )
            .await?;
        }

        let (target, data, data_len) = match &self.data_file {
            // The data file keeps what it holds (a raw disk being given metadata keeps its
            // data); it only grows to the disk size, and only what it grows by is
            // preallocated.
            Some((_, edge)) => {
                let held = edge.node().size();
                if held < self.size {
                    edge.node().truncate(self.size).await?;
                }
                (edge, held, self.size.saturating_sub(held))
            }
            None => (
                file,
                layout.data << self.cluster_bits,
                layout.data_clusters << self.cluster_bits,
            ),
        };
        preallocate(target, data, data_len, self.preallocate).await?;
        if let Some((_, edge)) = &self.data_file {
            edge.flush().await?;
        }
        file.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(size: u64, cluster_bits: u32, preallocate: Prealloc) -> NewQcow2<'static> {
        NewQcow2 {
            size,
            version: 3,
            cluster_bits,
            refcount_order: 4,
            lazy_refcounts: false,
            compression: Compression::Zlib,
            extended_l2: false,
            data_file: None,
            data_file_raw: false,
            backing: None,
            preallocate,
            encryption: None,
        }
    }

    #[test]
    fn an_empty_image_takes_four_clusters() {
        let layout = image(64 << 20, 16, Prealloc::Off).layout().unwrap();
        assert_eq!(
            layout,
            Layout {
                refcount_table: 1,
                refcount_table_clusters: 1,
                refcount_blocks: 2,
                refcount_block_count: 1,
                l1: 3,
                l1_entries: 1,
                crypto: 4,
                crypto_clusters: 0,
                l2_tables: 4,
                l2_table_count: 0,
                data: 4,
                data_clusters: 0,
                end: 4,
            }
        );
    }

    #[test]
    fn refcount_blocks_cover_themselves_when_preallocated() {
        // 512-byte clusters with 16-bit refcounts: 256 clusters per block.
        for size in [0u64, 512, 64 << 10, 8 << 20, (8 << 20) + 512] {
            let layout = image(size, 9, Prealloc::Metadata).layout().unwrap();
            let per_block = 256;
            assert!(
                layout.refcount_block_count * per_block >= layout.end,
                "{size}"
            );
            assert!(
                (layout.refcount_block_count - 1) * per_block < layout.end,
                "{size}"
            );
            assert!(layout.refcount_table_clusters * 64 >= layout.refcount_block_count);
            assert_eq!(layout.data_clusters, size.div_ceil(512));
        }
    }

    #[test]
    fn too_large_an_l1_table_is_refused() {
        assert!(image(1 << 62, 9, Prealloc::Off).layout().is_err());
    }
}
