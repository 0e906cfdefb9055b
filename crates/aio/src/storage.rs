//! imago `Storage` for `ImageFile`, so imago's qcow2 and raw drivers run on our I/O path.
//!
//! The memory alignment reported is 1: every request is copied through an aligned bounce
//! buffer anyway, so imago never needs bounce buffers of its own. Files opened through
//! `Storage::open` (e.g. backing files imago opens by itself) take no lock bytes; whoever
//! owns the node sets permissions with [`ImageFile::set_perms`].

use crate::file::{ImageFile, OpenOptions};
use crate::lock::Locking;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::storage::PreallocateMode;
use imago::{Storage, StorageCreateOptions, StorageOpenOptions};
use std::io;
use std::path::{Path, PathBuf};

fn options_from(opts: &StorageOpenOptions) -> io::Result<OpenOptions> {
    let path = opts
        .get_filename()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "Filename required"))?;
    Ok(OpenOptions::new(path)
        .writable(opts.get_writable())
        .direct(opts.get_direct())
        .locking(Locking::Off))
}

impl Storage for ImageFile {
    async fn open(opts: StorageOpenOptions) -> io::Result<Self> {
        options_from(&opts)?.open().await
    }

    async fn create_open(opts: StorageCreateOptions) -> io::Result<Self> {
        let size = opts.get_size();
        let prealloc = opts.get_preallocate();
        let overwrite = opts.get_overwrite();
        let open = opts.get_open_options();
        let path = open
            .get_filename()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "Filename required"))?
            .to_path_buf();
        if !overwrite {
            // Refuse existing files the way O_EXCL would, before opening anything.
            let exists = crate::op::blocking(move || Ok(path.symlink_metadata().is_ok())).await?;
            if exists {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
        }
        let file = options_from(&open)?
            .create(true)
            .truncate(overwrite)
            .open()
            .await?;
        if size > 0 {
            file.resize_inner(size, prealloc).await?;
        }
        Ok(file)
    }

    fn mem_align(&self) -> usize {
        1
    }

    fn req_align(&self) -> usize {
        self.request_alignment()
    }

    fn discard_align(&self) -> usize {
        self.discard_alignment()
    }

    fn size(&self) -> io::Result<u64> {
        ImageFile::size(self)
    }

    fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> io::Result<PathBuf> {
        let relative = relative.as_ref();
        if relative.is_absolute() {
            return Ok(relative.to_path_buf());
        }
        let dir = self
            .path()
            .parent()
            .ok_or_else(|| io::Error::other("Invalid base image filename"))?;
        Ok(dir.join(relative))
    }

    fn get_filename(&self) -> Option<PathBuf> {
        Some(self.path().to_path_buf())
    }

    /// # Safety
    /// imago marks this `unsafe` because a storage may need aligned requests and may not
    /// guard concurrent overlapping ones. Here any offset, length and alignment works (the
    /// data moves through request-owned buffers, so a leaked future cannot have the kernel
    /// write into `bufv` later), and an overlapping write only makes the data read
    /// unspecified: the caller has nothing to uphold for memory safety.
    async unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        self.readv_inner(bufv, offset).await
    }

    /// # Safety
    /// As `pure_readv`: no alignment is required, `bufv` is copied into request-owned
    /// buffers before the kernel sees it, and overlapping requests only race on the data.
    async unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        self.writev_inner(bufv, offset).await
    }

    /// # Safety
    /// No memory is handed over; any range works (past the end of file grows it). Nothing
    /// to uphold.
    async unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.zero_unmap(offset, length).await
    }

    /// # Safety
    /// As `pure_write_zeroes`.
    async unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.zero_allocated(offset, length).await
    }

    /// # Safety
    /// No memory is handed over; any range works. Nothing to uphold.
    async unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        self.discard_inner(offset, length).await
    }

    /// Nothing is buffered above the kernel.
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    async fn sync(&self) -> io::Result<()> {
        ImageFile::flush(self).await
    }

    async fn settle_writes(&self) -> io::Result<()> {
        ImageFile::settle_writes(self).await;
        Ok(())
    }

    /// Nothing is cached above the kernel.
    ///
    /// # Safety
    /// Does nothing, so nothing to uphold.
    async unsafe fn invalidate_cache(&self) -> io::Result<()> {
        Ok(())
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        self.storage_helper()
    }

    async fn resize(&self, new_size: u64, prealloc_mode: PreallocateMode) -> io::Result<()> {
        self.resize_inner(new_size, prealloc_mode).await
    }
}
