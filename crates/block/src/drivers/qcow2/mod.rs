//! `qcow2`: our own driver (`image.rs` the data path, `refcount.rs` the refcounts), opened
//! without a backing chain of its own.
//!
//! The backing chain is the graph's job (each layer its own node, so stream, commit and
//! snapshots are graph operations): unallocated clusters read from the `backing` edge, and
//! partial writes to them copy from it. Metadata and data go through the `file` child, so
//! filters such as blkdebug between qcow2 and the file work as in QEMU, and each request
//! fires the blkdebug event QEMU's qcow2 fires there. Our own reads and writes of the
//! header, snapshot table and bitmaps fire none, as QEMU's header and bitmap code fires none.
//!
//! Corrupt metadata met by a request (`overlap.rs`) is reported as QEMU reports it: the
//! BLOCK_IMAGE_CORRUPTED event, once; on a writable node the image is marked corrupt
//! (incompatible bit 1, so it opens read-only only until repaired) and the node takes no
//! further I/O, as QEMU takes the driver away.
//!
//! Persistent dirty bitmaps are loaded at open and stored when the node closes: see
//! `bitmaps.rs`. Internal snapshots are created and deleted with the data path quiet and
//! its caches written back, then the data path opens anew: see `snapshots.rs`.

mod bitmaps;
mod compression;
mod create;
mod crypt;
mod header;
mod image;
mod options;
mod overlap;
mod refcount;
mod repair;
mod snapshots;

pub use compression::Compression;
pub use create::{NewEncryption, NewQcow2};
pub use header::Qcow2Header;

use crate::bitmap::DirtyBitmap;
use crate::node::{Child, DriverInfo, Extent, Node, SnapshotInfo, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::{Driver, EventHook};
use aio::IoBuf;
use async_trait::async_trait;
use image::{Image, Settings};
use overlap::{Checks, Corruption};
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::Map;
use serde_json::{json, Value};
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::RwLock;

/// The children a qcow2 node opens with.
struct Edges {
    file: Arc<Child>,
    /// The external data file, for images that have one.
    data: Option<Arc<Child>>,
    backing: Option<Arc<Child>>,
    /// The graph opened `backing` from the name in the header, rather than the user naming
    /// a backing node (or none).
    implicit_backing: bool,
}

/// The runtime options (see `options.rs` for which ones this driver honours).
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Qcow2Options {
    pub lazy_refcounts: Option<bool>,
    pub pass_discard_request: Option<bool>,
    pub pass_discard_snapshot: Option<bool>,
    pub pass_discard_other: Option<bool>,
    pub discard_no_unref: Option<bool>,
    pub overlap_check: Option<serde_json::Value>,
    pub cache_size: Option<u64>,
    pub l2_cache_size: Option<u64>,
    pub l2_cache_entry_size: Option<u64>,
    pub refcount_cache_size: Option<u64>,
    pub cache_clean_interval: Option<i64>,
    pub encrypt: Option<serde_json::Value>,
}

pub struct Qcow2 {
    /// Operations that free clusters, resize or take snapshots hold it for writing, so
    /// nothing else runs meanwhile (see `image.rs`); the rest for reading.
    image: RwLock<Image>,
    file: Arc<Child>,
    header: std::sync::Mutex<Qcow2Header>,
    /// The backing file a plain filename stands for (QEMU's `auto_backing_file`): the node
    /// opened from the header, else the header's name. A backing node other than this one
    /// makes the node's filename a `json:` description.
    auto_backing_file: std::sync::Mutex<String>,
    /// Follows reopening: only a writable node stores its bitmaps at close.
    writable: AtomicBool,
    bitmaps: std::sync::Mutex<BitmapState>,
    /// The internal snapshots, as read at open and changed by us since (QEMU reports them
    /// the same way: another process changing the table goes unseen).
    snapshot_list: std::sync::Mutex<Vec<SnapshotInfo>>,
    /// What the runtime options chose (overlap checks, discards, cache sizes), for every
    /// reopen of the data path.
    settings: Settings,
    /// Where BLOCK_IMAGE_CORRUPTED goes.
    events: Option<EventHook>,
    /// A corruption was reported (later ones are not, as in QEMU).
    signaled: AtomicBool,
    /// A corruption met while writable: the node refuses all I/O from then on.
    broken: AtomicBool,
}

/// Persistent bitmaps between open and close.
#[derive(Default)]
struct BitmapState {
    /// Loaded at open, until the graph attaches them to the node.
    to_attach: Vec<Arc<DirtyBitmap>>,
    /// The clusters the stored bitmaps occupy, freed when they are stored anew.
    stored_clusters: Vec<u64>,
    /// The image had a bitmaps extension, so closing must rewrite (or drop) it.
    had_extension: bool,
    /// The directory as the image holds it (with `in_use` once a writable open set it).
    listed: Vec<bitmaps::Listed>,
    closed: bool,
    /// The bitmaps inactivation stored and took off the node: activation fills them with
    /// the image's bits and puts them back, so a user holding one (an NBD export's
    /// bitmap) keeps seeing the node's.
    released: Vec<Arc<DirtyBitmap>>,
}

impl Qcow2 {
    /// Read the header, refusing what we cannot serve, before the real open.
    pub async fn probe_header(file: &Arc<Child>) -> Result<Qcow2Header, String> {
        let node = file.node();
        let mut buf = vec![0u8; header::HEADER_READ_SIZE.min(node.size() as usize)];
        node.read(0, &mut buf)
            .await
            .map_err(|e| format!("Could not read qcow2 header: {e}"))?;
        let mut header = Qcow2Header::parse(&buf)?;
        header.check_supported()?;
        if let Some((offset, len)) = header.backing_file_span.take() {
            let mut name = vec![0u8; len as usize];
            node.read(offset, &mut name)
                .await
                .map_err(|e| format!("Could not read backing file name: {e}"))?;
            header.backing_file = Some(String::from_utf8_lossy(&name).into_owned());
        }
        Ok(header)
    }

    /// Repair a dirty image (see `repair.rs`), as QEMU does before writing to one; the
    /// header as it is afterwards.
    async fn repair(
        file: &Arc<Child>,
        header: &Qcow2Header,
        checks: Checks,
    ) -> Result<Qcow2Header, String> {
        repair::repair_dirty(file, header, checks)
            .await
            .map_err(|e| format!("Could not repair dirty image: {e}"))?;
        Qcow2::probe_header(file).await
    }

    async fn open(
        edges: Edges,
        header: Qcow2Header,
        writable: bool,
        settings: Settings,
        events: Option<EventHook>,
    ) -> Result<Qcow2, String> {
        let Edges {
            file,
            data,
            backing,
            implicit_backing,
        } = edges;
        let auto_backing_file = match &backing {
            Some(edge) if implicit_backing => {
                let node = edge.node();
                let filename = node.driver().info(&node).filename;
                filename
            }
            _ => header.backing_file.clone().unwrap_or_default(),
        };
        let loaded = match header.consistent_bitmaps() {
            Some(ext) => Some(
                bitmaps::load(&file, ext, header.cluster_size(), header.size)
                    .await
                    .map_err(|e| format!("Could not read qcow2 bitmaps: {e}"))?,
            ),
            None => None,
        };
        let image = Image::open(
            file.clone(),
            data,
            backing,
            writable,
            settings.clone(),
            compression::Compression::of(&header),
        )
        .await
        .map_err(|e| format!("Could not open qcow2 image: {e}"))?;
        let snapshot_list = snapshots::load_list(&file)
            .await
            .map_err(|e| format!("Could not read qcow2 snapshot table: {e}"))?;
        let mut bitmap_state = BitmapState::default();
        if let Some(mut loaded) = loaded {
            if writable {
                bitmaps::mark_in_use(&file, &loaded)
                    .await
                    .map_err(|e| format!("Could not mark qcow2 bitmaps in use: {e}"))?;
                loaded.listed.iter_mut().for_each(|l| l.in_use = true);
            } else {
                // Nothing could store a change: QEMU's read-only bitmaps.
                loaded.bitmaps.iter().for_each(|b| b.set_readonly(true));
            }
            bitmap_state = BitmapState {
                to_attach: loaded.bitmaps,
                stored_clusters: loaded.clusters,
                had_extension: true,
                listed: loaded.listed,
                closed: false,
                released: Vec::new(),
            };
        }
        Ok(Qcow2 {
            image: RwLock::new(image),
            file,
            header: std::sync::Mutex::new(header),
            auto_backing_file: std::sync::Mutex::new(auto_backing_file),
            writable: AtomicBool::new(writable),
            bitmaps: std::sync::Mutex::new(bitmap_state),
            snapshot_list: std::sync::Mutex::new(snapshot_list),
            settings,
            events,
            signaled: AtomicBool::new(false),
            broken: AtomicBool::new(false),
        })
    }

    /// Run one request: refused once a corruption stopped the node, and a corruption it
    /// meets is reported.
    async fn guarded<T>(
        &self,
        node: &Node,
        request: impl Future<Output = io::Result<T>>,
    ) -> io::Result<T> {
        if self.broken.load(Ordering::Acquire) {
            // QEMU's driver is gone: ENOMEDIUM, which NBD clients see as EINVAL.
            return Err(io::Error::from_raw_os_error(libc::ENOMEDIUM));
        }
        let result = request.await;
        if let Some(corruption) = result.as_ref().err().and_then(Corruption::of) {
            self.signal_corruption(node, corruption.clone()).await;
        }
        result
    }

    /// Report `corruption` (QEMU's qcow2_signal_corruption): fatal on a writable node,
    /// which then stops and marks the image corrupt; after the first report only a fatal
    /// one on an image not yet marked is reported.
    async fn signal_corruption(&self, node: &Node, corruption: Corruption) {
        let fatal = self.writable.load(Ordering::Acquire);
        if self.signaled.load(Ordering::Acquire) && (!fatal || self.header().is_corrupt()) {
            return;
        }
        if fatal {
            self.broken.store(true, Ordering::Release);
            tracing::error!(
                node = node.name(),
                "qcow2: Marking image as corrupt: {}; further corruption events will be suppressed",
                corruption.msg
            );
        } else {
            tracing::error!(
                node = node.name(),
                "qcow2: Image is corrupt: {}; further non-fatal corruption events will be suppressed",
                corruption.msg
            );
        }
        if let Some(events) = &self.events {
            let mut data = json!({
                "device": "",
                "node-name": node.name(),
                "msg": corruption.msg,
                "fatal": fatal,
            });
            if let Some((offset, size)) = corruption.range {
                data["offset"] = json!(offset);
                data["size"] = json!(size);
            }
            events("BLOCK_IMAGE_CORRUPTED", data);
        }
        if fatal {
            self.header.lock().unwrap().mark_corrupt();
            if let Err(e) = self.mark_corrupt_on_disk().await {
                tracing::error!(
                    node = node.name(),
                    "qcow2: could not mark the image corrupt: {e}"
                );
            }
        }
        self.signaled.store(true, Ordering::Release);
    }

    /// Set the corrupt bit in the image (version 3: version 2 has no feature bits).
    async fn mark_corrupt_on_disk(&self) -> io::Result<()> {
        if self.header().version < 3 {
            return Ok(());
        }
        let mut field = [0u8; 8];
        self.file.read(72, &mut field).await?;
        let marked = u64::from_be_bytes(field) | header::INCOMPAT_CORRUPT;
        self.file
            .write(72, &marked.to_be_bytes(), WriteFlags::default())
            .await?;
        self.file.flush().await
    }

    /// The node's persistent bitmaps with a name: what close and inactivation store.
    fn persistent_bitmaps(node: &Node) -> Vec<Arc<DirtyBitmap>> {
        node.dirty_bitmaps()
            .iter()
            .filter(|b| b.is_persistent() && b.name().is_some())
            .cloned()
            .collect()
    }

    /// After activation the image's bitmaps are the truth (the other process may have
    /// written or cleared them): a bitmap with the same name and granularity, on the node
    /// (one read-only from an inactive open) or released by inactivation, takes the
    /// image's bits in place; any other is replaced. Bitmaps added while inactive stay, as
    /// in QEMU.
    fn take_back_bitmaps(&self, node: &Node, loaded: Option<bitmaps::Loaded>, writable: bool) {
        let had_extension = loaded.is_some();
        let loaded = loaded.unwrap_or_default();
        let mut state = self.bitmaps.lock().unwrap();
        let released = std::mem::take(&mut state.released);
        for bitmap in &loaded.bitmaps {
            bitmap.set_readonly(!writable);
            let name = bitmap.name().unwrap_or_default();
            let on_node = node.dirty_bitmap(name);
            let earlier = on_node
                .clone()
                .or_else(|| released.iter().find(|b| b.name() == Some(name)).cloned());
            match earlier {
                Some(kept) if kept.granularity() == bitmap.granularity() => {
                    kept.resize(bitmap.size());
                    kept.load_words(&bitmap.to_words());
                    kept.set_enabled(bitmap.is_enabled());
                    kept.set_inconsistent(bitmap.is_inconsistent());
                    kept.set_persistent(true);
                    kept.set_readonly(!writable);
                    if on_node.is_none() {
                        node.add_dirty_bitmap(kept);
                    }
                }
                _ => {
                    if let Some(old) = on_node {
                        node.remove_dirty_bitmap(&old);
                    }
                    node.add_dirty_bitmap(bitmap.clone());
                }
            }
        }
        state.had_extension = had_extension;
        state.stored_clusters = loaded.clusters;
        state.listed = loaded.listed;
        state.to_attach.clear();
        state.closed = false;
    }

    /// Whether the image had bitmaps at open or the node has persistent ones now: they
    /// are written back (and their in-use flags cleared) only at close.
    fn has_persistent_bitmaps(&self, node: &Node) -> bool {
        self.bitmaps.lock().unwrap().had_extension
            || node.dirty_bitmaps().iter().any(|b| b.is_persistent())
    }

    /// What a qcow2 node takes on its children when it has no users of its own.
    pub fn default_child_perms(role: &str, read_only: bool) -> (Perms, Perms) {
        match role {
            "file" => crate::perm::format_child_perms(role, Perms::NONE, read_only),
            // Guest data only: what the parents ask for is passed on.
            "data-file" => (
                Perms::NONE,
                Perms::CONSISTENT_READ | Perms::WRITE | Perms::WRITE_UNCHANGED,
            ),
            _ => (Perms::NONE, Perms::ALL),
        }
    }

    /// Put the file and the data file back in the mode they had before a reopen failed
    /// (best effort: the reopen's error is what the caller reports).
    async fn restore_mode(&self, node: &Node, writable: bool) {
        let _ = self.file.node().set_writable(writable).await;
        if let Some(data) = node.child("data-file") {
            let _ = data.node().set_writable(writable).await;
        }
    }

    pub fn header(&self) -> Qcow2Header {
        self.header.lock().unwrap().clone()
    }

    /// The part of a zero write that zero clusters cover, for a write that must not fall back
    /// to writing zeroes: the partial clusters at either end must read as zeroes already (they
    /// are left alone), else the write fails with `Unsupported` before anything changed.
    async fn zero_clusters_only(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
    ) -> io::Result<(u64, u64)> {
        let header = self.header();
        if header.version < 3 {
            // Zero clusters came with version 3.
            return Err(io::ErrorKind::Unsupported.into());
        }
        let cluster_size = header.cluster_size();
        let end = offset + len;
        let first = offset.next_multiple_of(cluster_size).min(end);
        // The image's last cluster may be partial: it ends with the disk.
        let last = if end == node.size() {
            end
        } else {
            (end - end % cluster_size).max(first)
        };
        let image = self.image.read().await;
        for (from, to) in [(offset, first), (last, end)] {
            if !image.reads_zero(from, to).await? {
                return Err(io::ErrorKind::Unsupported.into());
            }
        }
        Ok((first, last - first))
    }

    /// Rewrite the backing file name and backing format recorded in the image (None: no
    /// backing file). The whole first cluster is rebuilt in memory, refused with ENOSPC when
    /// it does not fit, and written at once while no other request runs. A read-only image (a
    /// layer below the active one) is written through a short-lived writable handle, as
    /// QEMU reopens it read-write for the change.
    async fn set_backing_file(
        &self,
        node: &Node,
        file: Option<&str>,
        format: Option<&str>,
    ) -> io::Result<()> {
        let _quiet = self.image.write().await;
        let cluster_size = self.header().cluster_size();
        let file_node = self.file.node();
        let mut cluster = vec![0u8; cluster_size as usize];
        let on_disk = cluster_size.min(file_node.size()) as usize;
        self.file.read(0, &mut cluster[..on_disk]).await?;
        let new = header::with_backing(&cluster, file, format)?;
        if file_node.read_only() {
            write_read_only_header(&self.file, &new).await?;
        } else {
            self.file.write(0, &new, WriteFlags::default()).await?;
            self.file.flush().await?;
        }
        let mut header = self.header.lock().unwrap();
        header.backing_file = file.filter(|f| !f.is_empty()).map(str::to_string);
        header.backing_format = file.and(format).map(str::to_string);
        *self.auto_backing_file.lock().unwrap() = file.unwrap_or_default().to_string();
        tracing::info!(
            node = node.name(),
            backing_file = file,
            backing_format = format,
            "changed the backing file recorded in the image"
        );
        Ok(())
    }
}

#[async_trait(?Send)]
impl Driver for Qcow2 {
    async fn change_backing_file(
        &self,
        node: &Node,
        file: Option<&str>,
        format: Option<&str>,
    ) -> io::Result<()> {
        self.set_backing_file(node, file, format).await
    }

    fn supports_internal_snapshots(&self) -> bool {
        true
    }

    /// None with an external data file, whose clusters snapshots could not count: QEMU
    /// answers ENOTSUP for the list, and so for any snapshot command.
    fn internal_snapshots(&self) -> io::Result<Vec<SnapshotInfo>> {
        if self.header().has_data_file() {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        Ok(self.snapshots())
    }

    async fn create_internal_snapshot(&self, node: &Node, name: &str) -> io::Result<SnapshotInfo> {
        self.create_snapshot(node, name).await
    }

    async fn delete_internal_snapshot(
        &self,
        node: &Node,
        id: Option<&str>,
        name: Option<&str>,
    ) -> io::Result<Option<SnapshotInfo>> {
        self.delete_snapshot(node, id, name).await
    }

    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn supports_backing(&self) -> bool {
        true
    }

    /// Not with an external data file, as in QEMU.
    fn supports_compressed_writes(&self) -> bool {
        !self.header().has_data_file() && self.settings.crypt.is_none()
    }

    /// Read unallocated clusters from another backing edge (or none) after the graph
    /// changed this node's backing; waits for requests in flight.
    async fn set_backing_edge(
        &self,
        _node: &Node,
        backing: Option<Arc<Child>>,
    ) -> Result<(), String> {
        self.image.write().await.set_backing(backing);
        Ok(())
    }

    fn size(&self, _node: &Node) -> u64 {
        // try_read only fails while a resize or discard holds the lock; the header knows then.
        match self.image.try_read() {
            Ok(image) => image.size(),
            Err(_) => self.header.lock().unwrap().size,
        }
    }

    async fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.guarded(node, async {
            self.image.read().await.read(offset, buf).await
        })
        .await
    }

    async fn read_buf(&self, node: &Node, offset: u64, buf: IoBuf) -> io::Result<IoBuf> {
        self.guarded(node, async {
            self.image.read().await.read_buf(offset, buf).await
        })
        .await
    }

    /// Tells from this layer's own mapping only; what the backing chain holds is the
    /// caller's to find out.
    async fn read_or_zero(
        &self,
        node: &Node,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<Option<bool>> {
        self.guarded(node, async {
            self.image.read().await.read_or_zero(offset, buf).await
        })
        .await
    }

    async fn write(
        &self,
        node: &Node,
        offset: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> io::Result<()> {
        self.guarded(node, async {
            let image = self.image.read().await;
            if !flags.compressed {
                return image.write(offset, buf, flags).await;
            }
            image.write_compressed(offset, buf).await?;
            match flags.fua {
                true => image.flush().await,
                false => Ok(()),
            }
        })
        .await
    }

    async fn write_buf(
        &self,
        node: &Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> io::Result<IoBuf> {
        if flags.compressed {
            self.write(node, offset, buf.as_slice(), flags).await?;
            return Ok(buf);
        }
        self.guarded(node, async {
            self.image.read().await.write_buf(offset, buf, flags).await
        })
        .await
    }

    async fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        self.guarded(node, async {
            let (offset, len) = if flags.no_fallback {
                self.zero_clusters_only(node, offset, len).await?
            } else {
                (offset, len)
            };
            if len > 0 && flags.may_unmap {
                let image = self.image.write().await;
                image.write_zeroes(offset, len, true).await?;
            } else if len > 0 {
                let image = self.image.read().await;
                image.write_zeroes(offset, len, false).await?;
            }
            if flags.fua {
                self.image.read().await.flush().await?;
            }
            Ok(())
        })
        .await
    }

    async fn discard(&self, node: &Node, offset: u64, len: u64) -> io::Result<()> {
        self.guarded(node, async {
            self.image.write().await.discard(offset, len).await
        })
        .await
    }

    async fn flush(&self, node: &Node) -> io::Result<()> {
        self.guarded(node, async { self.image.read().await.flush().await })
            .await
    }

    async fn block_status(&self, node: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        self.guarded(node, async {
            self.image.read().await.block_status(offset, len).await
        })
        .await
    }

    async fn truncate(&self, node: &Node, size: u64) -> io::Result<()> {
        // A version 2 snapshot table entry has no room for the disk size it was taken at.
        if self.header().version < 3 && !self.snapshot_list.lock().unwrap().is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "Can't resize a v2 image which has snapshots",
            ));
        }
        self.guarded(node, async {
            self.image.write().await.resize(size).await?;
            self.header.lock().unwrap().size = size;
            Ok(())
        })
        .await
    }

    fn can_store_persistent_bitmaps(&self) -> bool {
        true
    }

    fn take_loaded_bitmaps(&self) -> Vec<Arc<DirtyBitmap>> {
        std::mem::take(&mut self.bitmaps.lock().unwrap().to_attach)
    }

    /// Store the persistent bitmaps (see `bitmaps.rs`). The data path stays idle from here
    /// on: its lock is held while refcounts change behind its back, and the node is going.
    /// An image found corrupt is left as it is.
    async fn close(&self, node: &Node) -> io::Result<()> {
        let image = self.image.write().await;
        if self.broken.load(Ordering::Acquire) {
            return Ok(());
        }
        let old_clusters = {
            let mut state = self.bitmaps.lock().unwrap();
            if state.closed || !self.writable.load(Ordering::Acquire) {
                return Ok(());
            }
            state.closed = true;
            std::mem::take(&mut state.stored_clusters)
        };
        let persistent = Self::persistent_bitmaps(node);
        let had_extension = self.bitmaps.lock().unwrap().had_extension;
        if persistent.is_empty() && !had_extension {
            return Ok(());
        }
        self.guarded(node, image.flush()).await?;
        bitmaps::store(&self.file, &persistent, &old_clusters, self.settings.checks).await?;
        tracing::info!(
            node = node.name(),
            count = persistent.len(),
            "stored persistent dirty bitmaps"
        );
        Ok(())
    }

    fn child_perms(
        &self,
        role: &str,
        perm: Perms,
        shared: Perms,
        read_only: bool,
    ) -> (Perms, Perms) {
        let (base_perm, base_shared) = Self::default_child_perms(role, read_only);
        match role {
            "file" => (base_perm, base_shared),
            "data-file" => (
                perm & (Perms::CONSISTENT_READ
                    | Perms::WRITE
                    | Perms::WRITE_UNCHANGED
                    | Perms::RESIZE),
                shared & base_shared,
            ),
            // Reading the overlay reads the backing; nothing writes through it.
            _ => (
                perm & Perms::CONSISTENT_READ,
                base_shared | (shared & Perms::ALL),
            ),
        }
    }

    /// The data path's cached tables are written back, then the persistent bitmaps are
    /// stored as at close (no longer in use), so the other process finds them whole;
    /// `activate` loads the image's back.
    async fn inactivate(&self, node: &Node) -> Result<(), String> {
        let image = self.image.write().await;
        self.guarded(node, image.flush())
            .await
            .map_err(|e| e.to_string())?;
        if !self.writable.load(Ordering::Acquire) || !self.has_persistent_bitmaps(node) {
            return Ok(());
        }
        let persistent = Self::persistent_bitmaps(node);
        let old_clusters = std::mem::take(&mut self.bitmaps.lock().unwrap().stored_clusters);
        bitmaps::store(&self.file, &persistent, &old_clusters, self.settings.checks)
            .await
            .map_err(|e| format!("Could not store qcow2 bitmaps: {e}"))?;
        // Released as QEMU does: the image holds them now, and may change under another
        // process; activation loads them back from it.
        for bitmap in &persistent {
            node.remove_dirty_bitmap(bitmap);
        }
        self.bitmaps.lock().unwrap().released = persistent;
        Ok(())
    }

    /// Everything is read anew as at open: the header (size, features, the corrupt and
    /// dirty bits), the tables and the snapshot list, so what the other process wrote is
    /// what this node serves. Bitmaps it added cannot join a running node: refused.
    async fn activate(&self, node: &Node) -> Result<(), String> {
        let mut image = self.image.write().await;
        // A node opened inactive was opened as if read-only; it becomes what it was asked
        // to be now.
        let writable = !node.read_only();
        let mut header = Qcow2::probe_header(&self.file).await?;
        if writable && header.is_corrupt() {
            return Err(CORRUPT_READ_WRITE.into());
        }
        if writable && header.is_dirty() {
            header = Qcow2::repair(&self.file, &header, self.settings.checks).await?;
        }
        let reopened = Image::open(
            self.file.clone(),
            node.child("data-file"),
            node.child("backing"),
            writable,
            self.settings.clone(),
            compression::Compression::of(&header),
        )
        .await
        .map_err(|e| format!("Could not reopen qcow2 image: {e}"))?;
        let snapshot_list = snapshots::load_list(&self.file)
            .await
            .map_err(|e| format!("Could not read qcow2 snapshot table: {e}"))?;
        let mut loaded = match header.consistent_bitmaps() {
            Some(ext) => Some(
                bitmaps::load(&self.file, ext, header.cluster_size(), header.size)
                    .await
                    .map_err(|e| format!("Could not read qcow2 bitmaps: {e}"))?,
            ),
            None => None,
        };
        if let (true, Some(loaded)) = (writable, loaded.as_mut()) {
            bitmaps::mark_in_use(&self.file, loaded)
                .await
                .map_err(|e| format!("Could not mark qcow2 bitmaps in use: {e}"))?;
            loaded.listed.iter_mut().for_each(|l| l.in_use = true);
        }
        let size = header.size;
        *image = reopened;
        *self.header.lock().unwrap() = header;
        *self.snapshot_list.lock().unwrap() = snapshot_list;
        self.writable.store(writable, Ordering::Release);
        for bitmap in node.dirty_bitmaps().iter() {
            bitmap.resize(size);
        }
        self.take_back_bitmaps(node, loaded, writable);
        Ok(())
    }

    /// The file below changes mode first, then the data path opens anew in that mode.
    /// Persistent bitmaps are stored at close only by a writable node: a node that has them
    /// is not reopened.
    async fn reopen(&self, node: &Node, writable: bool) -> Result<(), String> {
        if self.has_persistent_bitmaps(node) {
            return Err(format!(
                "Node '{}' has persistent dirty bitmaps and cannot be reopened",
                node.name()
            ));
        }
        if writable && self.header().is_corrupt() {
            return Err(CORRUPT_READ_WRITE.into());
        }
        let mut image = self.image.write().await;
        self.guarded(node, image.flush())
            .await
            .map_err(|e| e.to_string())?;
        self.file.node().set_writable(writable).await?;
        if let Some(data) = node.child("data-file") {
            data.node().set_writable(writable).await?;
        }
        if writable && self.header().is_dirty() {
            match Qcow2::repair(&self.file, &self.header(), self.settings.checks).await {
                Ok(repaired) => *self.header.lock().unwrap() = repaired,
                Err(e) => {
                    self.restore_mode(node, !writable).await;
                    return Err(e);
                }
            }
        }
        match Image::open(
            self.file.clone(),
            node.child("data-file"),
            node.child("backing"),
            writable,
            self.settings.clone(),
            compression::Compression::of(&self.header()),
        )
        .await
        {
            Ok(reopened) => {
                *image = reopened;
                self.writable.store(writable, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                self.restore_mode(node, !writable).await;
                Err(format!("Could not reopen qcow2 image: {e}"))
            }
        }
    }

    fn info(&self, node: &Node) -> DriverInfo {
        self.driver_info(node)
    }

    async fn amend_keyslots(
        &self,
        _: &Node,
        graph: &crate::Graph,
        amend: &crate::drivers::luks::KeyslotAmend,
        force: bool,
    ) -> Result<(), String> {
        match &self.settings.crypt {
            Some(crypt) => crypt.amend(&self.file, graph, amend, force).await,
            None => Err("image is not encrypted, can't amend".into()),
        }
    }
}

impl Qcow2 {
    /// ImageInfoSpecificQCow2: the header's facts and the bitmaps the image lists, less
    /// those removed since (QEMU removes them from the image at once; we do at close).
    fn format_specific(&self, node: &Node, header: &Qcow2Header) -> Value {
        let mut data = header.format_specific();
        if let Some(crypt) = &self.settings.crypt {
            data["encrypt"] = crypt.info();
        }
        let listed: Vec<Value> = self
            .bitmaps
            .lock()
            .unwrap()
            .listed
            .iter()
            .filter(|l| {
                node.dirty_bitmap(&l.name)
                    .is_some_and(|b| b.is_persistent())
            })
            .map(bitmaps::Listed::to_json)
            .collect();
        if !listed.is_empty() {
            data["bitmaps"] = Value::Array(listed);
        }
        data
    }

    fn driver_info(&self, node: &Node) -> DriverInfo {
        let header = self.header();
        let file = self.file.node();
        let file_info = file.driver().info(&file);
        let auto_backing_file = self.auto_backing_file.lock().unwrap().clone();
        let backing_overridden = match node.backing() {
            Some(backing) => backing.driver().info(&backing).filename != auto_backing_file,
            None => !auto_backing_file.is_empty(),
        };
        DriverInfo {
            filename: if backing_overridden {
                crate::graph::full_json_filename(node)
            } else if self.settings.crypt.is_some() {
                crate::graph::strong_json_filename(node, &["encrypt.key-secret"])
            } else {
                file_info.filename
            },
            actual_size: file_info.actual_size,
            cluster_size: Some(header.cluster_size()),
            dirty_flag: Some(header.is_dirty()),
            encrypted: self.settings.crypt.is_some(),
            format_specific: Some(json!({
                "type": "qcow2",
                "data": self.format_specific(node, &header),
            })),
            backing_filename: header.backing_file.clone(),
            backing_format: header.backing_format.clone(),
        }
    }
}

/// Write the first cluster of an image whose file node is read-only: as QEMU, the file is
/// reopened read-write for the change, which takes the write lock (so another process
/// that holds the image refuses it), then read-only again.
async fn write_read_only_header(file: &Child, cluster: &[u8]) -> io::Result<()> {
    let file_node = file.node();
    file_node
        .set_writable(true)
        .await
        .map_err(io::Error::other)?;
    let written = match file.write(0, cluster, WriteFlags::default()).await {
        Ok(()) => file.flush().await,
        Err(e) => Err(e),
    };
    if let Err(e) = file_node.set_writable(false).await {
        tracing::warn!(
            node = file_node.name(),
            "back to read-only after the header: {e}"
        );
    }
    written
}

/// QEMU's refusal of a writable open of an image marked corrupt.
const CORRUPT_READ_WRITE: &str = "qcow2: Image is corrupt; cannot be opened read/write";

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: true,
    hands_over: true,
    names: &["qcow2"],
    open: |o, options| Box::pin(open(o, options)),
};

/// The file, then the header, then the backing chain: given, none (`null`), or the one the
/// header names.
async fn open(
    o: &mut Opener<'_>,
    mut options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let file_ref = o.take_child_ref(&mut options, "file")?;
    let backing_ref = options.remove("backing");
    let data_ref = options.remove("data-file");
    let mut opts: Qcow2Options = o.parse(options)?;
    let keyval = o.syntax() == crate::OptionSyntax::Keyval;
    let checks = opts.validate(keyval).map_err(|e| o.qualify(e))?;
    let read_only = o.common().read_only;
    // Opened inactive, the image is still another process's: read, never written (no
    // repair, no bitmaps marked in use) until `activate`.
    let writable = o.may_write();
    let (perm, shared) = Qcow2::default_child_perms("file", read_only);
    let file = o.open_child(file_ref, "file", perm, shared).await?;
    let mut header = Qcow2::probe_header(&file)
        .await
        .map_err(QmpError::generic)?;
    if writable && header.is_corrupt() {
        return Err(QmpError::generic(CORRUPT_READ_WRITE));
    }
    opts.check(&header).map_err(QmpError::generic)?;
    let (l2_tables, refcount_blocks) = opts.cache_sizes(&header).map_err(QmpError::generic)?;
    let crypt = crypt::open(o, &file, &header, opts.encrypt.take()).await?;
    if crypt.is_some() {
        if header.has_data_file() {
            return Err(QmpError::generic(
                "blockd's qcow2 driver does not support encryption with an external data file",
            ));
        }
        if !header.size.is_multiple_of(512) {
            return Err(QmpError::generic(
                "Encrypted qcow2 image size is not a multiple of 512 bytes",
            ));
        }
    }
    o.claim_position();
    let (perm, shared) = Qcow2::default_child_perms("data-file", read_only);
    let data = match (data_ref, header.has_data_file(), &header.data_file) {
        (Some(reference), true, _) => {
            Some(o.open_child(reference, "data-file", perm, shared).await?)
        }
        (Some(_), false, _) => {
            return Err(QmpError::generic(
                "'data-file' can only be set for images with an external data file",
            ))
        }
        // QEMU opens the name as it stands, relative to its working directory.
        (None, true, Some(name)) => {
            let reference = json!({"driver": "file", "filename": name});
            Some(o.open_child(reference, "data-file", perm, shared).await?)
        }
        (None, true, None) => {
            return Err(QmpError::generic("'data-file' is required for this image"))
        }
        (None, false, _) if header.data_file_raw() => {
            return Err(QmpError::generic("data-file-raw requires a data file"))
        }
        (None, false, _) => None,
    };
    // Last before the backing chain, as in QEMU, so that an open refused for its options
    // or its data file leaves the image as it was.
    if writable && header.is_dirty() {
        header = Qcow2::repair(&file, &header, checks)
            .await
            .map_err(QmpError::generic)?;
    }
    let implicit_backing = backing_ref.is_none();
    let backing = match backing_ref {
        Some(Value::Null) => None,
        Some(reference) => Some(
            o.open_child(reference, "backing", Perms::NONE, Perms::ALL)
                .await?,
        ),
        None => match &header.backing_file {
            Some(backing_file) => Some(
                o.open_backing_from_header(
                    &file.node(),
                    backing_file,
                    header.backing_format.as_deref(),
                )
                .await?,
            ),
            None => None,
        },
    };
    let edges = Edges {
        file,
        data,
        backing,
        implicit_backing,
    };
    let driver = Qcow2::open(
        edges,
        header,
        writable,
        Settings {
            checks,
            pass_discard: opts.pass_discard(o.common().discard_unmap),
            l2_tables,
            refcount_blocks,
            discard_no_unref: opts.discard_no_unref == Some(true),
            crypt: crypt.map(Arc::new),
        },
        o.event_hook(),
    )
    .await
    .map_err(QmpError::generic)?;
    Ok(Box::new(driver))
}
