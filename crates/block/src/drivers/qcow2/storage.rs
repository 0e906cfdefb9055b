//! imago `Storage` over a graph edge, so imago's I/O goes through our `file` child node.
//!
//! imago keeps its own copy of the header and, when it moves the L1 or refcount table or
//! resizes, writes the first 72 bytes back from it, backing file name pointer included.
//! Once we have rewritten the backing file name ourselves, that pointer would be stale, so
//! a [`HeaderPatch`] puts ours over any such write.
//!
//! When the file child listens to blkdebug events, each request is announced as QEMU's
//! qcow2 driver announces it, from where it lands ([`MetadataMap`]): `l2_load`/`l2_update`
//! for an L2 table, `refblock_load`/`refblock_update` for a refcount block,
//! `reftable_load`/`reftable_update` for the refcount table, `l1_update` for the L1 table,
//! and `read_aio`/`write_aio` for guest data. The map learns the tables from what imago
//! reads and writes, so a table imago has just allocated counts as data until the L1 or
//! refcount table points at it: its first write is announced as `write_aio`, not as
//! `l2_alloc_write` or `refblock_alloc_write`. Events for steps imago takes inside
//! (cluster_alloc*, cow_*, l1_grow_*, l1_shrink_*, reftable_grow, refblock_alloc*,
//! read_compressed, write_compressed, read_backing_aio, vmstate_*, empty_image_prepare,
//! pwritev_rmw_*, cluster_free, cor_write) cannot be told apart from these and are not
//! fired.

use crate::drivers::blkdebug::BlkdebugEvent;
use crate::node::{Child, WriteFlags};
use futures::future::try_join_all;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::Storage;
use std::collections::HashSet;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};

/// Where the backing file name pointer (offset and length) lies in the header.
const BACKING_POINTER: std::ops::Range<u64> = 8..20;

/// The backing file name pointer imago must write, once we changed it under imago.
#[derive(Default)]
pub struct HeaderPatch(Mutex<Option<[u8; 12]>>);

impl HeaderPatch {
    pub fn set(&self, pointer: [u8; 12]) {
        *self.0.lock().unwrap() = Some(pointer);
    }

    /// `buf`, to be written at `offset`, with our pointer over the bytes it covers; None
    /// when it does not touch the pointer or we never changed it.
    fn apply(&self, buf: &[u8], offset: u64) -> Option<Vec<u8>> {
        let end = offset + buf.len() as u64;
        if end <= BACKING_POINTER.start || offset >= BACKING_POINTER.end {
            return None;
        }
        let pointer = (*self.0.lock().unwrap())?;
        let mut patched = buf.to_vec();
        for pos in offset.max(BACKING_POINTER.start)..end.min(BACKING_POINTER.end) {
            patched[(pos - offset) as usize] = pointer[(pos - BACKING_POINTER.start) as usize];
        }
        Some(patched)
    }
}

/// Where an image's metadata lies in its file, as far as imago's own requests showed it.
#[derive(Default)]
struct MetadataMap {
    cluster_bits: u32,
    l1: std::ops::Range<u64>,
    reftable: std::ops::Range<u64>,
    l2_tables: HashSet<u64>,
    refblocks: HashSet<u64>,
}

/// Bits 9-55 of an L1 entry: the L2 table's offset.
const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The low 9 bits of a refcount table entry are reserved.
const REFTABLE_OFFSET_MASK: u64 = !0x1ff;

impl MetadataMap {
    /// Learn from `buf`, read from or written to `offset`.
    fn observe(&mut self, offset: u64, buf: &[u8]) {
        if offset == 0 && buf.len() >= 60 {
            let be32 = |at: usize| u32::from_be_bytes(buf[at..at + 4].try_into().unwrap());
            let be64 = |at: usize| u64::from_be_bytes(buf[at..at + 8].try_into().unwrap());
            self.cluster_bits = be32(20).min(63);
            let (l1_size, l1_at) = (u64::from(be32(36)), be64(40));
            let (reftable_at, reftable_clusters) = (be64(48), u64::from(be32(56)));
            self.l1 = l1_at..l1_at.saturating_add(l1_size.saturating_mul(8));
            let reftable_len = reftable_clusters
                .checked_shl(self.cluster_bits)
                .unwrap_or(0);
            self.reftable = reftable_at..reftable_at.saturating_add(reftable_len);
        }
        for (range, mask, tables) in [
            (self.l1.clone(), L1_OFFSET_MASK, &mut self.l2_tables),
            (
                self.reftable.clone(),
                REFTABLE_OFFSET_MASK,
                &mut self.refblocks,
            ),
        ] {
            // Both tables start on a cluster, so entries lie on multiples of 8.
            let end = offset.saturating_add(buf.len() as u64).min(range.end);
            let mut at = offset.max(range.start).next_multiple_of(8);
            while at + 8 <= end {
                let i = (at - offset) as usize;
                let entry = u64::from_be_bytes(buf[i..i + 8].try_into().unwrap()) & mask;
                if entry != 0 {
                    tables.insert(entry);
                }
                at += 8;
            }
        }
    }

    /// The event QEMU's qcow2 fires before a request at `offset`; None for the header.
    fn event(&self, offset: u64, write: bool) -> Option<BlkdebugEvent> {
        let cluster = (offset >> self.cluster_bits) << self.cluster_bits;
        if self.cluster_bits == 0 || cluster == 0 {
            return None;
        }
        let (load, update) = if self.l1.contains(&offset) {
            (None, BlkdebugEvent::L1Update)
        } else if self.reftable.contains(&offset) {
            (
                Some(BlkdebugEvent::ReftableLoad),
                BlkdebugEvent::ReftableUpdate,
            )
        } else if self.l2_tables.contains(&cluster) {
            (Some(BlkdebugEvent::L2Load), BlkdebugEvent::L2Update)
        } else if self.refblocks.contains(&cluster) {
            (
                Some(BlkdebugEvent::RefblockLoad),
                BlkdebugEvent::RefblockUpdate,
            )
        } else {
            (Some(BlkdebugEvent::ReadAio), BlkdebugEvent::WriteAio)
        };
        if write {
            Some(update)
        } else {
            load
        }
    }
}

pub struct NodeStorage {
    child: Arc<Child>,
    helper: CommonStorageHelper,
    patch: Option<Arc<HeaderPatch>>,
    /// Kept only while the file child listens to blkdebug events.
    metadata: Mutex<MetadataMap>,
}

impl NodeStorage {
    pub fn new(child: Arc<Child>) -> NodeStorage {
        NodeStorage {
            child,
            helper: CommonStorageHelper::default(),
            patch: None,
            metadata: Mutex::default(),
        }
    }

    /// Storage for an image's metadata file, whose header writes go through `patch`.
    pub fn with_header_patch(child: Arc<Child>, patch: Arc<HeaderPatch>) -> NodeStorage {
        NodeStorage {
            patch: Some(patch),
            ..NodeStorage::new(child)
        }
    }
}

impl NodeStorage {
    /// Fire the event for a request at `offset` at the file child.
    fn announce(&self, offset: u64, write: bool) {
        let event = self.metadata.lock().unwrap().event(offset, write);
        if let Some(event) = event {
            self.child.debug_event(event);
        }
    }
}

impl fmt::Debug for NodeStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeStorage({})", self.child.node().name())
    }
}

impl fmt::Display for NodeStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.child.node().name())
    }
}

impl Storage for NodeStorage {
    fn size(&self) -> io::Result<u64> {
        Ok(self.child.node().size())
    }

    /// # Safety
    /// imago marks this `unsafe` because a storage may need aligned requests and may not
    /// guard concurrent overlapping ones. Here each slice is an ordinary read through the
    /// file child (bounds checked by the node, any alignment), so the caller has nothing to
    /// uphold for memory safety; overlapping writes only make the data read unspecified.
    async unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        let announce = self.child.takes_debug_events();
        if announce {
            self.announce(offset, false);
        }
        let mut pos = offset;
        for mut slice in bufv.into_inner() {
            self.child.read(pos, &mut slice).await?;
            if announce {
                self.metadata.lock().unwrap().observe(pos, &slice);
            }
            pos += slice.len() as u64;
        }
        Ok(())
    }

    /// The slices go out all at once: a vector here is a run of gathered writes (see
    /// `batch.rs`), and its ranges do not overlap.
    ///
    /// # Safety
    /// As `pure_readv`: ordinary writes through the file child, nothing to uphold.
    async unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        let slices = bufv.into_inner();
        let mut pos = offset;
        let mut writes = Vec::with_capacity(slices.len());
        for slice in &slices {
            let at = pos;
            pos += slice.len() as u64;
            writes.push(async move {
                let patched = self.patch.as_ref().and_then(|p| p.apply(slice, at));
                let data = patched.as_deref().unwrap_or(slice);
                if self.child.takes_debug_events() {
                    self.announce(at, true);
                    self.metadata.lock().unwrap().observe(at, data);
                }
                self.child.write(at, data, WriteFlags::default()).await
            });
        }
        try_join_all(writes).await.map(|_| ())
    }

    /// # Safety
    /// No memory is handed over; the node checks the range. Nothing to uphold.
    async unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        let flags = WriteFlags {
            may_unmap: true,
            ..WriteFlags::default()
        };
        self.child.write_zeroes(offset, length, flags).await
    }

    /// # Safety
    /// As `pure_write_zeroes`.
    async unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.child
            .write_zeroes(offset, length, WriteFlags::default())
            .await
    }

    /// # Safety
    /// No memory is handed over; the range is clipped to the node. Nothing to uphold.
    async unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        let end = (offset + length).min(self.child.node().size());
        if end <= offset {
            return Ok(());
        }
        self.child.discard(offset, end - offset).await
    }

    /// A node keeps no buffers of its own to write back; stability is `sync`'s job.
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    async fn sync(&self) -> io::Result<()> {
        self.child.flush().await
    }

    /// # Safety
    /// Does nothing, so nothing to uphold.
    async unsafe fn invalidate_cache(&self) -> io::Result<()> {
        Ok(())
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        &self.helper
    }

    async fn resize(
        &self,
        new_size: u64,
        _prealloc: imago::storage::PreallocateMode,
    ) -> io::Result<()> {
        self.child.node().truncate(new_size).await
    }
}

#[cfg(test)]
mod tests {
    use super::HeaderPatch;

    #[test]
    fn patch_covers_only_the_pointer() {
        let patch = HeaderPatch::default();
        let header = [0xaau8; 72];
        assert_eq!(patch.apply(&header, 0), None);
        patch.set([1; 12]);
        let patched = patch.apply(&header, 0).unwrap();
        assert_eq!(&patched[..8], &[0xaa; 8]);
        assert_eq!(&patched[8..20], &[1; 12]);
        assert_eq!(&patched[20..], &[0xaa; 52]);
        let tail = patch.apply(&header[..6], 16).unwrap();
        assert_eq!(&tail[..4], &[1; 4]);
        assert_eq!(&tail[4..], &[0xaa; 2]);
        assert_eq!(patch.apply(&header[..8], 20), None);
        assert_eq!(patch.apply(&header[..8], 0), None);
    }
}
