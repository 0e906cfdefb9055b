//! Repairing an image whose dirty bit is set (a lazy-refcounts writer that did not close
//! it: its refcounts may be too low or too high), as QEMU does when it opens one
//! read-write.
//!
//! Every reference the metadata holds is counted (`snapshots::count_references` for the
//! L1 tables and what they reach, the bitmaps' and the LUKS header's clusters here), a new refcount table and
//! blocks holding exactly those counts are written past the end of the file, and the
//! header is pointed at them in one write. The COPIED flags are then made to agree with
//! the new counts and the dirty bit is cleared last, so a crash part way leaves an image
//! that is still marked dirty and is repaired again at the next open. The old refcount
//! structure is left behind as free clusters.

use super::bitmaps;
use super::header::{be64, Qcow2Header, INCOMPAT_DIRTY};
use super::overlap::{Checks, MetadataMap};
use super::refcount::{write_refcount, Refcounts, MAX_TABLE_BYTES};
use super::snapshots;
use crate::node::{Child, WriteFlags};
use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

fn corrupt(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Rebuild the refcounts of the image in `file` (its header `header`) and clear its dirty
/// bit.
pub(super) async fn repair_dirty(
    file: &Arc<Child>,
    header: &Qcow2Header,
    checks: Checks,
) -> io::Result<()> {
    let cluster_bits = header.cluster_bits;
    let mut counts = snapshots::count_references(file).await?;
    if let Some(ext) = header.consistent_bitmaps() {
        let loaded = bitmaps::load(file, ext, header.cluster_size(), header.size).await?;
        for offset in loaded.clusters {
            *counts.entry(offset >> cluster_bits).or_insert(0) += 1;
        }
    }
    // The LUKS header's clusters: nothing else points at them.
    if let Some((offset, len)) = header.crypto_header.filter(|&(_, len)| len > 0) {
        if offset + len > file.node().size() {
            return Err(io::Error::other(
                "the crypto header extension points past the end of the image",
            ));
        }
        for cluster in offset >> cluster_bits..=(offset + len - 1) >> cluster_bits {
            *counts.entry(cluster).or_insert(0) += 1;
        }
    }
    write_structure(file, counts, cluster_bits, header.refcount_order).await?;

    let first = first_cluster(file, cluster_bits).await?;
    let mut refcounts = Refcounts::load(file.clone(), &first).await?;
    let map = MetadataMap::load(file, &first, None, checks).await?;
    snapshots::sync_copied(file, &mut refcounts, &map).await?;

    let incompatible = be64(&first, 72) & !INCOMPAT_DIRTY;
    file.write(72, &incompatible.to_be_bytes(), WriteFlags::default())
        .await?;
    file.flush().await
}

async fn first_cluster(file: &Child, cluster_bits: u32) -> io::Result<Vec<u8>> {
    let len = (1u64 << cluster_bits).min(file.node().size());
    let mut first = vec![0u8; len as usize];
    file.read(0, &mut first).await?;
    Ok(first)
}

/// Write a refcount table and blocks holding `counts` (by cluster index) after everything
/// else in the file, counting their own clusters too, then point the header at them.
async fn write_structure(
    file: &Child,
    mut counts: BTreeMap<u64, u64>,
    cluster_bits: u32,
    order: u32,
) -> io::Result<()> {
    let cluster_size = 1u64 << cluster_bits;
    let per_block = (cluster_size * 8) >> order;
    let max = u64::MAX >> (64 - (1u32 << order));
    let start = file.node().size().div_ceil(cluster_size);
    if let Some((&beyond, _)) = counts.range(start..).next() {
        return Err(corrupt(format!(
            "cluster {beyond:#x} is referenced but lies past the end of the file"
        )));
    }
    let used_blocks: Vec<u64> = {
        let mut blocks: Vec<u64> = counts.keys().map(|c| c / per_block).collect();
        blocks.dedup();
        blocks
    };
    // The new blocks and table each may need more of the other: grow to a fixed point
    // (the need only grows with the room taken, so this ends).
    let mut taken = 0u64;
    let (blocks, table_clusters) = loop {
        let mut blocks = used_blocks.clone();
        if taken > 0 {
            blocks.extend(start / per_block..=(start + taken - 1) / per_block);
        }
        blocks.sort_unstable();
        blocks.dedup();
        let table_entries = blocks.last().map_or(0, |&b| b + 1);
        let table_clusters = (table_entries * 8).div_ceil(cluster_size);
        let need = blocks.len() as u64 + table_clusters;
        if need == taken {
            break (blocks, table_clusters);
        }
        taken = need;
    };
    if table_clusters * cluster_size > MAX_TABLE_BYTES {
        return Err(corrupt(
            "the refcount table would exceed its maximum size".into(),
        ));
    }
    for cluster in start..start + taken {
        counts.insert(cluster, 1);
    }
    if let Some((cluster, n)) = counts.iter().find(|&(_, &n)| n > max) {
        return Err(corrupt(format!(
            "cluster {cluster} has {n} references, more than a {}-bit refcount holds",
            1u32 << order
        )));
    }

    let mut table = vec![0u8; (table_clusters * cluster_size) as usize];
    let mut block = vec![0u8; cluster_size as usize];
    for (n, &index) in blocks.iter().enumerate() {
        let at = (start + n as u64) << cluster_bits;
        block.fill(0);
        let first = index * per_block;
        for (&cluster, &value) in counts.range(first..first + per_block) {
            write_refcount(&mut block, (cluster - first) as usize, order, value);
        }
        file.write(at, &block, WriteFlags::default()).await?;
        let entry = index as usize * 8;
        table[entry..entry + 8].copy_from_slice(&at.to_be_bytes());
    }
    let table_at = (start + blocks.len() as u64) << cluster_bits;
    file.write(table_at, &table, WriteFlags::default()).await?;
    file.flush().await?;
    let mut fields = [0u8; 12];
    fields[..8].copy_from_slice(&table_at.to_be_bytes());
    fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
    file.write(48, &fields, WriteFlags::default()).await?;
    file.flush().await?;
    Ok(())
}
