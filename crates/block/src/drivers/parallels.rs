//! `parallels`: Parallels (Virtuozzo) disks. A 64-byte header, then a BAT of 32-bit
//! entries, one per cluster: 0 for a cluster never written, else where its data is (in
//! clusters for "WithouFreSpacExt" images, in sectors for the older "WithoutFreeSpace").
//!
//! A new cluster is written whole (zeroes around the guest's data) and flushed before its
//! BAT entry names it, so a crash leaves at worst an unreferenced cluster. An image QEMU
//! left open ("in use") is repaired when opened read-write, as QEMU does: BAT entries
//! that point outside the file are cleared, then the flag is. An image with a format
//! extension (dirty bitmaps) opens read-write as in QEMU; its first change takes the
//! extension out of the header, since the bitmaps go stale.

use super::block_map::{self, read_metadata};
use super::fields::{le32, le64};
use crate::node::{Child, DriverInfo, Extent, Node, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use async_trait::async_trait;
use qapi::error::QmpError;
use serde_json::{Map, Value};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub(crate) const MAGIC: &[u8; 16] = b"WithoutFreeSpace";
pub(crate) const MAGIC_EXT: &[u8; 16] = b"WithouFreSpacExt";
pub(crate) const HEADER_LEN: usize = 64;
/// Clusters one block-status answer or zero-write piece maps at most.
const MAP_CLUSTERS: u64 = 4096;
/// The `inuse` value of an image open for writing.
const IN_USE: u32 = 0x746F_6E59;

/// The header fields (public for the fuzz target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// BAT entries are clusters ("WithouFreSpacExt"), not sectors.
    pub ext: bool,
    /// Bytes per cluster.
    pub cluster_size: u64,
    /// BAT entries.
    pub bat_entries: u64,
    /// The disk size in sectors.
    pub sectors: u64,
    /// Left open for writing (QEMU's `inuse`).
    pub in_use: bool,
    /// Where the data area starts, in sectors.
    pub data_off: u64,
    /// A format extension (dirty bitmaps) at this offset, in sectors.
    pub ext_off: u64,
}

impl Header {
    /// Parse and check a header as QEMU does.
    pub fn parse(buf: &[u8]) -> Result<Header, String> {
        let not = || "Image not in Parallels format".to_string();
        if buf.len() < HEADER_LEN {
            return Err(not());
        }
        let ext = match &buf[..16] {
            m if m == MAGIC => false,
            m if m == MAGIC_EXT => true,
            _ => return Err(not()),
        };
        if le32(buf, 16) != 2 {
            return Err(not());
        }
        let tracks = le32(buf, 28) as u64;
        if tracks == 0 {
            return Err("Invalid image: Zero sectors per track".into());
        }
        if tracks > i32::MAX as u64 / 513 {
            return Err("Invalid image: Too big cluster".into());
        }
        let bat_entries = le32(buf, 32) as u64;
        if bat_entries > i32::MAX as u64 / 4 {
            return Err("Catalog too large".into());
        }
        let mut sectors = le64(buf, 36);
        if !ext {
            // The old format's size field is 32 bits.
            sectors &= 0xffff_ffff;
        }
        if sectors > bat_entries * tracks {
            return Err("The parallels BAT does not cover the disk".into());
        }
        Ok(Header {
            ext,
            cluster_size: tracks * 512,
            bat_entries,
            sectors,
            in_use: le32(buf, 44) == IN_USE,
            data_off: le32(buf, 48) as u64,
            ext_off: le64(buf, 56),
        })
    }

    /// Bytes per unit of a BAT entry.
    fn unit(&self) -> u64 {
        if self.ext {
            self.cluster_size
        } else {
            512
        }
    }
}

/// A new image's header and BAT area as QEMU lays them out: heads 16, 32 sectors a
/// track, the data area from the next cluster boundary after the BAT.
pub(crate) fn new_image(size: u64, cluster_size: u64) -> Vec<u8> {
    let bat_entries = size.div_ceil(cluster_size);
    let data_off = (HEADER_LEN as u64 + bat_entries * 4).next_multiple_of(cluster_size);
    let mut image = vec![0u8; data_off as usize];
    image[..16].copy_from_slice(MAGIC_EXT);
    image[16..20].copy_from_slice(&2u32.to_le_bytes());
    image[20..24].copy_from_slice(&16u32.to_le_bytes());
    image[24..28].copy_from_slice(&((size / 512 / 16 / 32) as u32).to_le_bytes());
    image[28..32].copy_from_slice(&((cluster_size / 512) as u32).to_le_bytes());
    image[32..36].copy_from_slice(&(bat_entries as u32).to_le_bytes());
    image[36..44].copy_from_slice(&(size / 512).to_le_bytes());
    image[48..52].copy_from_slice(&((data_off / 512) as u32).to_le_bytes());
    image
}

struct State {
    bat: Vec<u32>,
    /// Where the next cluster goes: the file's end, cluster aligned.
    end: u64,
}

pub struct Parallels {
    file: Arc<Child>,
    header: Header,
    state: tokio::sync::Mutex<State>,
    /// The header no longer names the format extension (see [`Parallels::drop_extension`]).
    extension_dropped: AtomicBool,
}

impl Parallels {
    /// Where cluster `index`'s data is, if it has any.
    fn host(&self, state: &State, index: u64) -> io::Result<Option<u64>> {
        match state.bat.get(index as usize).copied().unwrap_or(0) {
            0 => Ok(None),
            e => {
                let at = e as u64 * self.header.unit();
                if at + self.header.cluster_size > state.end {
                    return Err(io::Error::other(
                        "parallels: a BAT entry points outside the file",
                    ));
                }
                Ok(Some(at))
            }
        }
    }

    /// A map of the disk as the shared block helpers take it: from a guest offset to
    /// where its cluster is, read under the state lock once for the request.
    fn snapshot(&self, state: &State, offset: u64, len: u64) -> io::Result<Vec<Option<u64>>> {
        let c = self.header.cluster_size;
        (offset / c..(offset + len).div_ceil(c))
            .map(|i| self.host(state, i))
            .collect()
    }

    /// Before the first change of a session, the header stops naming the format extension
    /// (dirty bitmaps of the image's writer): blockd does not keep those bitmaps up to
    /// date, and a tool that later trusted them for an incremental backup would miss what
    /// changed here. QEMU opens such images read-write too ("Format Extension ignored in
    /// RW mode") but leaves the stale extension named.
    async fn drop_extension(&self) -> io::Result<()> {
        if self.header.ext_off == 0 || self.extension_dropped.load(Ordering::Acquire) {
            return Ok(());
        }
        let _state = self.state.lock().await;
        if self.extension_dropped.load(Ordering::Acquire) {
            return Ok(());
        }
        self.file
            .write(56, &0u64.to_le_bytes(), WriteFlags::default())
            .await?;
        self.file.flush().await?;
        self.extension_dropped.store(true, Ordering::Release);
        Ok(())
    }

    /// The repair of an image found in use (its writer stopped without closing it):
    /// entries are checked against the file as it is, not against where new clusters go.
    async fn repair_opened(&self, state: &mut State) -> io::Result<()> {
        let end = state.end;
        state.end = self.file.node().size();
        let repaired = self.repair(state).await;
        state.end = end;
        repaired
    }

    async fn repair(&self, state: &mut State) -> io::Result<()> {
        let plain = WriteFlags::default();
        for i in 0..state.bat.len() {
            if state.bat[i] != 0 && self.host(state, i as u64).is_err() {
                tracing::warn!(entry = i, "parallels repair: clearing a BAT entry");
                self.file
                    .write(HEADER_LEN as u64 + i as u64 * 4, &0u32.to_le_bytes(), plain)
                    .await?;
                state.bat[i] = 0;
            }
        }
        self.file.flush().await?;
        self.file.write(44, &0u32.to_le_bytes(), plain).await?;
        self.file.flush().await
    }
}

#[async_trait(?Send)]
impl Driver for Parallels {
    fn format_name(&self) -> &'static str {
        "parallels"
    }

    fn size(&self, _node: &Node) -> u64 {
        self.header.sectors * 512
    }

    async fn read(&self, _node: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let c = self.header.cluster_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = block_map::in_block(c, pos, (buf.len() - done) as u64) as usize;
            let host = self.host(&*self.state.lock().await, pos / c)?;
            let chunk = &mut buf[done..done + n];
            match host {
                Some(host) => self.file.read(host + pos % c, chunk).await?,
                None => chunk.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        self.drop_extension().await?;
        let c = self.header.cluster_size;
        let plain = WriteFlags::default();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = block_map::in_block(c, pos, (buf.len() - done) as u64) as usize;
            let chunk = &buf[done..done + n];
            let index = pos / c;
            let mut state = self.state.lock().await;
            match self.host(&state, index)? {
                Some(host) => {
                    drop(state);
                    self.file.write(host + pos % c, chunk, plain).await?;
                }
                None => {
                    // The new file space reads as zeroes around the data.
                    let host = state.end;
                    let entry = u32::try_from(host / self.header.unit())
                        .map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
                    state.end += c;
                    self.file.node().truncate(state.end).await?;
                    self.file.write(host + pos % c, chunk, plain).await?;
                    // The cluster is on disk before the BAT names it.
                    self.file.flush().await?;
                    self.file
                        .write(HEADER_LEN as u64 + index * 4, &entry.to_le_bytes(), plain)
                        .await?;
                    state.bat[index as usize] = entry;
                }
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
        _: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        self.drop_extension().await?;
        let c = self.header.cluster_size;
        // A piece at a time, so that the map of a zero write over the whole disk stays
        // small.
        let piece = MAP_CLUSTERS * c;
        let mut done = 0;
        while done < len {
            let pos = offset + done;
            let n = (piece - pos % piece).min(len - done);
            let map = self.snapshot(&*self.state.lock().await, pos, n)?;
            let first = pos / c;
            block_map::write_zeroes(&self.file, c, pos, n, flags, |at| {
                map[(at / c - first) as usize].map(|host| host + at % c)
            })
            .await?;
            done += n;
        }
        Ok(())
    }

    /// Discard is advisory; clusters stay.
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
        let c = self.header.cluster_size;
        // A run ends after a bounded number of clusters; callers come back for more.
        let len = len.min(size - offset).min(MAP_CLUSTERS * c - offset % c);
        let map = self.snapshot(&*self.state.lock().await, offset, len)?;
        let first = offset / c;
        Ok(block_map::extent(c, offset, len, |pos| {
            map[(pos / c - first) as usize]
        }))
    }

    async fn reopen(&self, _: &Node, writable: bool) -> Result<(), String> {
        self.file.node().set_writable(writable).await
    }

    /// The BAT, and where the next cluster goes, are read anew: the other process may have
    /// allocated clusters. The header must be as this node left it; an image the other
    /// process left in use is repaired here as at open.
    async fn activate(&self, node: &Node) -> Result<(), String> {
        let (fresh, state) = load(&self.file).await.map_err(|e| e.desc)?;
        let ext_off = if self.extension_dropped.load(Ordering::Acquire) {
            0
        } else {
            self.header.ext_off
        };
        let layout = |h: &Header, ext_off: u64| Header {
            in_use: false,
            ext_off,
            ..h.clone()
        };
        if layout(&fresh, fresh.ext_off) != layout(&self.header, ext_off) {
            return Err(crate::active::layout_changed("parallels", "header"));
        }
        let mut current = self.state.lock().await;
        *current = state;
        if fresh.in_use && !node.read_only() {
            self.repair_opened(&mut current)
                .await
                .map_err(|e| format!("Could not repair the parallels image: {e}"))?;
        }
        Ok(())
    }

    /// Resizing is not done here yet.
    async fn truncate(&self, _: &Node, _size: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    fn child_perms(&self, role: &str, perm: Perms, _: Perms, read_only: bool) -> (Perms, Perms) {
        crate::perm::format_child_perms(role, perm, read_only)
    }

    fn info(&self, _node: &Node) -> DriverInfo {
        DriverInfo::of_storage(&self.file)
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: true,
    hands_over: true,
    names: &["parallels"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let file = o.open_file_only(options).await?;
    let (header, state) = load(&file).await?;
    if header.ext_off != 0 && !o.common().read_only {
        tracing::warn!("Format Extension ignored in RW mode");
    }
    o.claim_position();
    let in_use = header.in_use;
    let parallels = Parallels {
        file,
        header,
        state: tokio::sync::Mutex::new(state),
        extension_dropped: AtomicBool::new(false),
    };
    if in_use && o.may_write() {
        let mut state = parallels.state.lock().await;
        parallels
            .repair_opened(&mut state)
            .await
            .map_err(|e| QmpError::generic(format!("Could not repair the parallels image: {e}")))?;
    }
    Ok(Box::new(parallels))
}

/// The header and BAT of the image in `file`.
async fn load(file: &Child) -> Result<(Header, State), QmpError> {
    let head = read_metadata(file, 0, HEADER_LEN, "parallels header").await?;
    let header = Header::parse(&head).map_err(QmpError::generic)?;
    let file_size = file.node().size();
    // The BAT is read whole: it must be in the file, which bounds what it can claim.
    if HEADER_LEN as u64 + header.bat_entries * 4 > file_size {
        return Err(QmpError::generic(
            "The parallels BAT lies past the end of the file",
        ));
    }
    let raw = read_metadata(
        file,
        HEADER_LEN as u64,
        (header.bat_entries * 4) as usize,
        "parallels BAT",
    )
    .await?;
    let bat = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
    let end = file_size
        .max(header.data_off * 512)
        .next_multiple_of(header.cluster_size);
    Ok((header, State { bat, end }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_images_parse_back_as_qemu_lays_them_out() {
        let image = new_image(5 << 20, 1 << 20);
        assert_eq!(image.len(), 1 << 20);
        let h = Header::parse(&image).unwrap();
        assert_eq!(
            (h.cluster_size, h.bat_entries, h.sectors, h.data_off),
            (1 << 20, 5, 10240, 2048)
        );
        assert_eq!(new_image(5 << 20, 512).len(), 41472);
    }
}
