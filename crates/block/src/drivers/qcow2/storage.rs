//! imago `Storage` over a graph edge, so imago's I/O goes through our `file` child node.
//!
//! imago keeps its own copy of the header and, when it moves the L1 or refcount table or
//! resizes, writes the first 72 bytes back from it, backing file name pointer included.
//! Once we have rewritten the backing file name ourselves, that pointer would be stale, so
//! a [`HeaderPatch`] puts ours over any such write.

use crate::node::{Child, WriteFlags};
use futures::future::try_join_all;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::Storage;
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

pub struct NodeStorage {
    child: Arc<Child>,
    helper: CommonStorageHelper,
    patch: Option<Arc<HeaderPatch>>,
}

impl NodeStorage {
    pub fn new(child: Arc<Child>) -> NodeStorage {
        NodeStorage {
            child,
            helper: CommonStorageHelper::default(),
            patch: None,
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

    async unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        let mut pos = offset;
        for mut slice in bufv.into_inner() {
            self.child.read(pos, &mut slice).await?;
            pos += slice.len() as u64;
        }
        Ok(())
    }

    /// The slices go out all at once: a vector here is a run of gathered writes (see
    /// `batch.rs`), and its ranges do not overlap.
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
                self.child.write(at, data, WriteFlags::default()).await
            });
        }
        try_join_all(writes).await.map(|_| ())
    }

    async unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        let flags = WriteFlags {
            may_unmap: true,
            ..WriteFlags::default()
        };
        self.child.write_zeroes(offset, length, flags).await
    }

    async unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.child
            .write_zeroes(offset, length, WriteFlags::default())
            .await
    }

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
