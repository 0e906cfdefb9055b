//! `qcow2` through imago, opened without imago's own backing chain.
//!
//! The backing chain is the graph's job (each layer its own node, so stream, commit and
//! snapshots are graph operations). imago still needs a backing layer to copy from when a
//! partial write allocates a cluster, and to read unallocated ranges from, so it gets a raw
//! layer over a [`NodeStorage`] of our `backing` edge: its bytes are whatever the backing
//! node (and its own chain) reads. imago's metadata and data I/O goes through the `file`
//! child the same way, so filters such as blkdebug between qcow2 and the file work as in
//! QEMU, and `storage.rs` announces each request to blkdebug with the event QEMU's qcow2
//! fires there (and says which events cannot happen here). Our own reads and writes of
//! the header, snapshot table and bitmaps go to the file directly and fire none, as QEMU's
//! header and bitmap code fires none.
//!
//! Persistent dirty bitmaps live beside imago, which does not know them: see `bitmaps.rs`
//! for how they are loaded before imago opens and stored when the node closes. Internal
//! snapshots are created and deleted beside imago too: see `snapshots.rs`.

mod batch;
mod bitmaps;
mod header;
mod options;
mod snapshots;
mod storage;
pub use storage::NodeStorage;

pub use header::Qcow2Header;

use crate::bitmap::DirtyBitmap;
use crate::node::{Child, DriverInfo, Extent, ExtentKind, Node, SnapshotInfo, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use async_trait::async_trait;
use batch::AllocBatcher;
use imago::format::drivers::ShallowMapping;
use imago::format::PreallocateMode;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2 as ImagoQcow2;
use imago::raw::Raw as ImagoRaw;
use imago::storage::ext::StorageExt;
use imago::{FormatAccess, Mapping};
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::Map;
use serde_json::{json, Value};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use storage::HeaderPatch;
use tokio::sync::RwLock;

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
    pub data_file: Option<serde_json::Value>,
}

type ImagoImage = ImagoQcow2<NodeStorage>;

pub struct Qcow2 {
    access: RwLock<FormatAccess<NodeStorage>>,
    file: Arc<Child>,
    header: std::sync::Mutex<Qcow2Header>,
    header_patch: Arc<HeaderPatch>,
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
    batcher: AllocBatcher,
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
}

impl Qcow2 {
    /// Read the header, refusing what imago or we cannot serve, before the real open.
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

    /// `implicit_backing`: the graph opened `backing` from the name in the header, rather
    /// than the user naming a backing node (or none).
    pub async fn open(
        file: Arc<Child>,
        backing: Option<Arc<Child>>,
        implicit_backing: bool,
        header: Qcow2Header,
        writable: bool,
    ) -> Result<Qcow2, String> {
        let auto_backing_file = match &backing {
            Some(edge) if implicit_backing => {
                let node = edge.node();
                let filename = node.driver().info(&node).filename;
                filename
            }
            _ => header.backing_file.clone().unwrap_or_default(),
        };
        let header_patch = Arc::new(HeaderPatch::default());
        let storage = NodeStorage::with_header_patch(file.clone(), header_patch.clone());
        // Before imago: its writable open makes the bitmaps extension inconsistent.
        let loaded = match header.consistent_bitmaps() {
            Some(ext) => Some(
                bitmaps::load(&file, ext, header.cluster_size(), header.size)
                    .await
                    .map_err(|e| format!("Could not read qcow2 bitmaps: {e}"))?,
            ),
            None => None,
        };
        let mut image = ImagoImage::open_image(storage, writable)
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
            };
        }
        image.set_backing(backing_layer(backing).await?);
        // The data file is part of the image file; external data files are refused in
        // `Header::parse`.
        image.set_data_file(None);
        let mut access = FormatAccess::new(image);
        access.set_async_read_parallelization(4);
        access.set_async_write_parallelization(4);
        Ok(Qcow2 {
            access: RwLock::new(access),
            file,
            header: std::sync::Mutex::new(header),
            header_patch,
            auto_backing_file: std::sync::Mutex::new(auto_backing_file),
            writable: AtomicBool::new(writable),
            bitmaps: std::sync::Mutex::new(bitmap_state),
            snapshot_list: std::sync::Mutex::new(snapshot_list),
            batcher: AllocBatcher::default(),
        })
    }

    /// What a qcow2 node takes on its children when it has no users of its own.
    pub fn default_child_perms(role: &str, read_only: bool) -> (Perms, Perms) {
        match role {
            "file" => {
                let write = if read_only {
                    Perms::NONE
                } else {
                    Perms::WRITE | Perms::RESIZE
                };
                (
                    Perms::CONSISTENT_READ | write,
                    Perms::CONSISTENT_READ | Perms::WRITE_UNCHANGED,
                )
            }
            _ => (Perms::NONE, Perms::ALL),
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
        for (from, to) in [(offset, first), (last, end)] {
            if !self.reads_zero(node, from, to).await? {
                return Err(io::ErrorKind::Unsupported.into());
            }
        }
        Ok((first, last - first))
    }

    /// Whether `from..to` reads as zeroes, this layer or the backing chain below.
    async fn reads_zero(&self, node: &Node, mut from: u64, to: u64) -> io::Result<bool> {
        while from < to {
            let extent = self.block_status(node, from, to - from).await?;
            let (zero, len) = match (extent.kind, node.backing()) {
                (ExtentKind::Data, _) => (false, extent.len),
                (ExtentKind::Unallocated, Some(backing)) if from < backing.size() => {
                    let len = extent.len.min(backing.size() - from);
                    let below = backing.block_status_above(None, from, len).await?;
                    (below.zero, below.len)
                }
                _ => (true, extent.len),
            };
            if !zero || len == 0 {
                return Ok(false);
            }
            from += len;
        }
        Ok(true)
    }

    /// Rewrite the backing file name and backing format recorded in the image (None: no
    /// backing file). The whole first cluster is rebuilt in memory, refused with ENOSPC when
    /// it does not fit, and written at once while no imago request runs; imago's later
    /// writes of its header keep the new name (see [`HeaderPatch`]). A read-only image (a
    /// layer below the active one) is written through a short-lived writable handle, as
    /// QEMU reopens it read-write for the change.
    async fn set_backing_file(
        &self,
        node: &Node,
        file: Option<&str>,
        format: Option<&str>,
    ) -> io::Result<()> {
        let _quiet = self.access.write().await;
        let cluster_size = self.header().cluster_size();
        let file_node = self.file.node();
        let mut cluster = vec![0u8; cluster_size as usize];
        let on_disk = cluster_size.min(file_node.size()) as usize;
        self.file.read(0, &mut cluster[..on_disk]).await?;
        let new = header::with_backing(&cluster, file, format)?;
        let mut pointer = [0u8; 12];
        pointer.copy_from_slice(&new[8..20]);
        if file_node.read_only() {
            write_read_only_header(&self.file, &new).await?;
        } else {
            self.file.write(0, &new, WriteFlags::default()).await?;
            self.header_patch.set(pointer);
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

    fn internal_snapshots(&self) -> io::Result<Vec<SnapshotInfo>> {
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

    /// Give imago another backing edge (or none) after the graph changed this node's
    /// backing; waits for requests in flight.
    async fn set_backing_edge(
        &self,
        _node: &Node,
        backing: Option<Arc<Child>>,
    ) -> Result<(), String> {
        let layer = backing_layer(backing).await?;
        let mut access = self.access.write().await;
        let inner: &mut dyn std::any::Any = access.inner_mut();
        let image = inner
            .downcast_mut::<ImagoImage>()
            .ok_or("qcow2 driver holds an unexpected imago image type")?;
        image.set_backing(layer);
        Ok(())
    }

    fn size(&self, _node: &Node) -> u64 {
        // try_read only fails while a resize or discard holds the lock; the header knows then.
        match self.access.try_read() {
            Ok(access) => access.size(),
            Err(_) => self.header.lock().unwrap().size,
        }
    }

    async fn read(&self, _: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let access = self.access.read().await;
        if read_one_mapping(&access, offset, buf).await? {
            return Ok(());
        }
        let mut bufv = IoVectorMut::new();
        bufv.push(buf);
        access.readv(bufv, offset).await
    }

    /// Tells from this layer's own mapping only: imago sees the backing node as raw data, so
    /// below this layer it cannot tell zeroes from data.
    async fn read_or_zero(
        &self,
        _: &Node,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<Option<bool>> {
        let access = self.access.read().await;
        let (mapping, mapped) = access.get_shallow_mapping(offset, buf.len() as u64).await?;
        if mapped < buf.len() as u64 {
            return Ok(None);
        }
        match mapping {
            ShallowMapping::Raw {
                storage,
                offset: host,
                ..
            } => storage.read(&mut *buf, host).await.map(|()| Some(false)),
            ShallowMapping::Zero { .. } | ShallowMapping::Eof { .. } => {
                buf.fill(0);
                Ok(Some(true))
            }
            _ => Ok(None),
        }
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        let access = self.access.read().await;
        if is_allocated(&access, offset, buf.len() as u64).await {
            let mut bufv = IoVector::new();
            bufv.push(buf);
            access.writev(bufv, offset).await?;
        } else if flags.job_target {
            write_mapped_first(&access, offset, buf).await?;
        } else {
            self.batcher.write(&access, offset, buf).await?;
        }
        if flags.fua {
            persist(&access).await?;
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
        let (offset, len) = if flags.no_fallback {
            self.zero_clusters_only(node, offset, len).await?
        } else {
            (offset, len)
        };
        if len > 0 && flags.may_unmap {
            self.access
                .write()
                .await
                .discard_to_zero(offset, len)
                .await?;
        } else if len > 0 {
            self.access.read().await.write_zeroes(offset, len).await?;
        }
        if flags.fua {
            persist(&*self.access.read().await).await?;
        }
        Ok(())
    }

    async fn discard(&self, _: &Node, offset: u64, len: u64) -> io::Result<()> {
        self.access.write().await.discard_to_any(offset, len).await
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        persist(&*self.access.read().await).await
    }

    async fn block_status(&self, _: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        let access = self.access.read().await;
        let (mapping, len) = access.get_shallow_mapping(offset, len).await?;
        let kind = match mapping {
            ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => ExtentKind::Data,
            ShallowMapping::Zero { explicit: true, .. } => ExtentKind::Zero { allocated: true },
            ShallowMapping::Zero { .. } | ShallowMapping::Indirect { .. } => {
                ExtentKind::Unallocated
            }
            ShallowMapping::Eof { .. } => ExtentKind::Zero { allocated: false },
            _ => ExtentKind::Data,
        };
        Ok(Extent { len, kind })
    }

    async fn truncate(&self, _: &Node, size: u64) -> io::Result<()> {
        let mut access = self.access.write().await;
        access.resize(size, PreallocateMode::None).await?;
        self.header.lock().unwrap().size = size;
        Ok(())
    }

    fn can_store_persistent_bitmaps(&self) -> bool {
        true
    }

    fn take_loaded_bitmaps(&self) -> Vec<Arc<DirtyBitmap>> {
        std::mem::take(&mut self.bitmaps.lock().unwrap().to_attach)
    }

    /// Store the persistent bitmaps (see `bitmaps.rs`). imago stays idle from here on: the
    /// access lock is held while refcounts change behind its back, and the node is going.
    async fn close(&self, node: &Node) -> io::Result<()> {
        let access = self.access.write().await;
        let old_clusters = {
            let mut state = self.bitmaps.lock().unwrap();
            if state.closed || !self.writable.load(Ordering::Acquire) {
                return Ok(());
            }
            state.closed = true;
            std::mem::take(&mut state.stored_clusters)
        };
        let persistent: Vec<Arc<DirtyBitmap>> = node
            .dirty_bitmaps()
            .iter()
            .filter(|b| b.is_persistent() && b.name().is_some())
            .cloned()
            .collect();
        let had_extension = self.bitmaps.lock().unwrap().had_extension;
        if persistent.is_empty() && !had_extension {
            return Ok(());
        }
        persist(&access).await?;
        bitmaps::store(&self.file, &persistent, &old_clusters).await?;
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
            // Reading the overlay reads the backing; nothing writes through it.
            _ => (
                perm & Perms::CONSISTENT_READ,
                base_shared | (shared & Perms::ALL),
            ),
        }
    }

    /// The file below changes mode first, then imago opens the image anew in that mode
    /// (imago decides at open whether it may allocate and write metadata).
    /// Persistent bitmaps are stored at close only by a writable node, and imago's writable
    /// open invalidates them on disk: a node that has them is not reopened.
    async fn reopen(&self, node: &Node, writable: bool) -> Result<(), String> {
        let has_bitmaps = self.bitmaps.lock().unwrap().had_extension
            || node.dirty_bitmaps().iter().any(|b| b.is_persistent());
        if has_bitmaps {
            return Err(format!(
                "Node '{}' has persistent dirty bitmaps and cannot be reopened",
                node.name()
            ));
        }
        let mut access = self.access.write().await;
        if !writable {
            persist(&access).await.map_err(|e| e.to_string())?;
        }
        self.file.node().set_writable(writable).await?;
        match open_access(
            &self.file,
            &self.header_patch,
            node.child("backing"),
            writable,
        )
        .await
        {
            Ok(reopened) => {
                *access = reopened;
                self.writable.store(writable, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                let _ = self.file.node().set_writable(!writable).await;
                Err(e)
            }
        }
    }

    fn info(&self, node: &Node) -> DriverInfo {
        self.driver_info(node)
    }
}

impl Qcow2 {
    /// ImageInfoSpecificQCow2: the header's facts and the bitmaps the image lists, less
    /// those removed since (QEMU removes them from the image at once; we do at close).
    fn format_specific(&self, node: &Node, header: &Qcow2Header) -> Value {
        let mut data = header.format_specific();
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
            } else {
                file_info.filename
            },
            actual_size: file_info.actual_size,
            cluster_size: Some(header.cluster_size()),
            dirty_flag: Some(header.is_dirty()),
            format_specific: Some(json!({
                "type": "qcow2",
                "data": self.format_specific(node, &header),
            })),
            backing_filename: header.backing_file.clone(),
            backing_format: header.backing_format.clone(),
        }
    }
}

/// An imago instance on `file` in the given mode, reading `backing` below it.
async fn open_access(
    file: &Arc<Child>,
    header_patch: &Arc<HeaderPatch>,
    backing: Option<Arc<Child>>,
    writable: bool,
) -> Result<FormatAccess<NodeStorage>, String> {
    let storage = NodeStorage::with_header_patch(file.clone(), header_patch.clone());
    let mut image = ImagoImage::open_image(storage, writable)
        .await
        .map_err(|e| format!("Could not open qcow2 image: {e}"))?;
    image.set_backing(backing_layer(backing).await?);
    // The data file is part of the image file; external data files are refused in
    // `Header::parse`.
    image.set_data_file(None);
    let mut access = FormatAccess::new(image);
    access.set_async_read_parallelization(4);
    access.set_async_write_parallelization(4);
    Ok(access)
}

/// imago's view of a backing edge: a raw layer whose bytes are what the backing node reads.
async fn backing_layer(
    backing: Option<Arc<Child>>,
) -> Result<Option<FormatAccess<NodeStorage>>, String> {
    let Some(edge) = backing else {
        return Ok(None);
    };
    let raw = ImagoRaw::open_image(NodeStorage::new(edge), false)
        .await
        .map_err(|e| format!("Could not open backing layer: {e}"))?;
    Ok(Some(FormatAccess::new(raw)))
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

/// Serves a read that lies within one mapping, which most do; that skips imago's general
/// read loop, which sets up a set of parallel chunk workers on every call. False if nothing
/// was read, because the range spans mappings or is compressed.
async fn read_one_mapping(
    access: &FormatAccess<NodeStorage>,
    offset: u64,
    buf: &mut [u8],
) -> io::Result<bool> {
    let (mapping, mapped) = access.get_mapping(offset, buf.len() as u64).await?;
    if mapped < buf.len() as u64 {
        return Ok(false);
    }
    match mapping {
        Mapping::Raw {
            storage,
            offset: host,
            ..
        } => storage.read(&mut *buf, host).await.map(|()| true),
        Mapping::Zero { .. } | Mapping::Eof { .. } => {
            buf.fill(0);
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Whether all of `[offset, offset+len)` is in clusters this image may overwrite in place,
/// so writing there allocates nothing (and takes no L2 table lock in imago).
async fn is_allocated(access: &FormatAccess<NodeStorage>, offset: u64, len: u64) -> bool {
    matches!(
        access.get_shallow_mapping(offset, len).await,
        Ok((ShallowMapping::Raw { writable: true, .. }, mapped)) if mapped >= len
    )
}

/// Write back imago's cached metadata, then make everything stable on disk.
/// Map the clusters, then write the data there. Unlike imago's write, which keeps the L2
/// table locked from allocation until the data is written, this lets any number of such
/// writes run at once; the price is that a crash or a reader in between sees the new clusters
/// before their data, which only a job target may accept (see `WriteFlags::job_target`).
async fn write_mapped_first(
    access: &FormatAccess<NodeStorage>,
    mut offset: u64,
    mut buf: &[u8],
) -> io::Result<()> {
    while !buf.is_empty() {
        let (storage, host_offset, mapped) = access
            .ensure_data_mapping(offset, buf.len() as u64, true)
            .await?;
        let (head, rest) = buf.split_at(mapped as usize);
        storage.write(head, host_offset).await?;
        buf = rest;
        offset += mapped;
    }
    Ok(())
}

async fn persist(access: &FormatAccess<NodeStorage>) -> io::Result<()> {
    access.flush().await?;
    access.sync().await
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
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
    let opts: Qcow2Options = o.parse(options)?;
    opts.validate().map_err(|e| o.qualify(e))?;
    if opts.data_file.is_some() || opts.encrypt.is_some() {
        return Err(QmpError::generic(
            "qcow2 external data files and encryption are not supported",
        ));
    }
    let read_only = o.common().read_only;
    let (perm, shared) = Qcow2::default_child_perms("file", read_only);
    let file = o.open_child(file_ref, "file", perm, shared).await?;
    let header = Qcow2::probe_header(&file)
        .await
        .map_err(QmpError::generic)?;
    opts.check(&header).map_err(QmpError::generic)?;
    o.claim_position();
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
    let driver = Qcow2::open(file, backing, implicit_backing, header, !read_only)
        .await
        .map_err(QmpError::generic)?;
    Ok(Box::new(driver))
}
