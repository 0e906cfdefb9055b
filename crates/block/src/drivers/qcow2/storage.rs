//! imago `Storage` over a graph edge, so that `blockdev-create` can have imago lay out a new
//! qcow2 image through our `file` node (the driver itself does not use imago).

use crate::node::{Child, WriteFlags};
use futures::future::try_join_all;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::Storage;
use std::fmt;
use std::io;
use std::sync::Arc;

pub struct NodeStorage {
    child: Arc<Child>,
    helper: CommonStorageHelper,
}

impl NodeStorage {
    pub fn new(child: Arc<Child>) -> NodeStorage {
        NodeStorage {
            child,
            helper: CommonStorageHelper::default(),
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
        let mut pos = offset;
        for mut slice in bufv.into_inner() {
            self.child.read(pos, &mut slice).await?;
            pos += slice.len() as u64;
        }
        Ok(())
    }

    /// # Safety
    /// As `pure_readv`: ordinary writes through the file child, nothing to uphold.
    async unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        let slices = bufv.into_inner();
        let mut pos = offset;
        let mut writes = Vec::with_capacity(slices.len());
        for slice in &slices {
            let at = pos;
            pos += slice.len() as u64;
            writes.push(self.child.write(at, slice, WriteFlags::default()));
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
