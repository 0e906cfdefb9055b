//! `vdi`: VirtualBox disk images (version 1.1), dynamic and static.
//!
//! A 512-byte header, then a block map of little-endian 32-bit entries, one per 1 MiB block
//! of the disk: the block's index in the data area, or "unallocated" / "discarded" (both
//! read as zeroes). A dynamic image appends a block the first time it is written; a static
//! one has every block from creation.
//!
//! Appending a block writes the whole block (the data with zeroes around it) and the
//! header's allocated-block count, flushes, then writes the map entry: a crash at any
//! point leaves a map that points only at written blocks, at worst with one block leaked
//! past the count. New blocks go past every block the map names, even in a map a crafted
//! or damaged image gives more entries than its count.

use super::block_map;
use super::fields::{le32, le64};
use crate::node::{Child, DriverInfo, Extent, Node, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use aio::pool::PoolBuf;
use async_trait::async_trait;
use qapi::error::QmpError;
use serde_json::{Map, Value};
use std::io;
use std::sync::{Arc, Mutex};

const SIGNATURE: u32 = 0xbeda_107f;
/// Version 1.1, the only one QEMU (and VirtualBox since 2.0) writes.
const VERSION: u32 = 0x0001_0001;
const TYPE_DYNAMIC: u32 = 1;
const TYPE_STATIC: u32 = 2;
const UNALLOCATED: u32 = 0xffff_ffff;
const DISCARDED: u32 = 0xffff_fffe;
pub(crate) const HEADER_LEN: usize = 512;
/// The size QEMU's header_size field holds (what follows the pre-header it counts).
const HEADER_SIZE_FIELD: u32 = 0x180;
const SECTOR: u64 = 512;
/// Blocks are 1 MiB: QEMU refuses others.
pub(crate) const BLOCK_SIZE: u64 = 1 << 20;
/// QEMU's limit (VDI_BLOCKS_IN_IMAGE_MAX): the block map's bytes fit 32 bits, rounded down
/// to a sector.
pub(crate) const MAX_BLOCKS: u64 = 0x1fff_ff80;
const TEXT: &[u8] = b"<<< QEMU VM Virtual Disk Image >>>\n";

/// The header fields the driver uses (public for the fuzz target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 1 dynamic, 2 static.
    pub image_type: u32,
    /// Where the block map starts, sector aligned.
    pub offset_bmap: u32,
    /// Where block 0 of the data area starts, sector aligned.
    pub offset_data: u32,
    /// The disk size, rounded down to a sector.
    pub disk_size: u64,
    /// Entries in the block map.
    pub blocks_in_image: u32,
    /// Blocks in the data area; the next appended block takes this index.
    pub blocks_allocated: u32,
}

impl Header {
    /// Parse and check a header as QEMU does, in its words.
    pub fn parse(buf: &[u8]) -> Result<Header, String> {
        let signature = if buf.len() >= HEADER_LEN {
            le32(buf, 64)
        } else {
            0
        };
        if signature != SIGNATURE {
            return Err(format!(
                "Image not in VDI format (bad signature {signature:08x})"
            ));
        }
        let version = le32(buf, 68);
        if version != VERSION {
            return Err(format!(
                "unsupported VDI image (version {}.{})",
                version >> 16,
                version & 0xffff
            ));
        }
        let header = Header {
            image_type: le32(buf, 76),
            offset_bmap: le32(buf, 340),
            offset_data: le32(buf, 344),
            // VBoxManage can write odd sizes: QEMU rounds them down to a sector.
            disk_size: le64(buf, 368) / SECTOR * SECTOR,
            blocks_in_image: le32(buf, 384),
            blocks_allocated: le32(buf, 388),
        };
        let sector_size = le32(buf, 360);
        let block_size = le32(buf, 376);
        if !(header.offset_bmap as u64).is_multiple_of(SECTOR) {
            return Err(format!(
                "unsupported VDI image (unaligned block map offset 0x{:x})",
                header.offset_bmap
            ));
        }
        if !(header.offset_data as u64).is_multiple_of(SECTOR) {
            return Err(format!(
                "unsupported VDI image (unaligned data offset 0x{:x})",
                header.offset_data
            ));
        }
        if sector_size as u64 != SECTOR {
            return Err(format!(
                "unsupported VDI image (sector size {sector_size} is not {SECTOR})"
            ));
        }
        if block_size as u64 != BLOCK_SIZE {
            return Err(format!(
                "unsupported VDI image (block size {block_size} is not {BLOCK_SIZE})"
            ));
        }
        let room = header.blocks_in_image as u64 * BLOCK_SIZE;
        if header.disk_size > room {
            return Err(format!(
                "unsupported VDI image (disk size {}, image bitmap has room for {room})",
                header.disk_size
            ));
        }
        if buf[424..440].iter().any(|&b| b != 0) {
            return Err("unsupported VDI image (non-NULL link UUID)".into());
        }
        if buf[440..456].iter().any(|&b| b != 0) {
            return Err("unsupported VDI image (non-NULL parent UUID)".into());
        }
        if header.blocks_in_image as u64 > MAX_BLOCKS {
            return Err(format!(
                "unsupported VDI image (too many blocks {}, max is {MAX_BLOCKS})",
                header.blocks_in_image
            ));
        }
        if header.image_type != TYPE_DYNAMIC && header.image_type != TYPE_STATIC {
            return Err(format!(
                "unsupported VDI image (image type {})",
                header.image_type
            ));
        }
        let bmap_end = header.offset_bmap as u64 + header.blocks_in_image as u64 * 4;
        if bmap_end > header.offset_data as u64 && header.blocks_in_image > 0 {
            return Err("unsupported VDI image (block map overlaps the data)".into());
        }
        if header.blocks_allocated > header.blocks_in_image {
            return Err(format!(
                "unsupported VDI image ({} blocks allocated, image has {})",
                header.blocks_allocated, header.blocks_in_image
            ));
        }
        Ok(header)
    }
}

/// A new image's header and block map, as QEMU lays them out: the map from 512, the data
/// after it on a 512-byte boundary; a static image's blocks all mapped in order.
pub(crate) fn new_image(size: u64, fixed: bool, uuids: [[u8; 16]; 2]) -> (Vec<u8>, Vec<u8>, u64) {
    let blocks = size.div_ceil(BLOCK_SIZE);
    let bmap_len = (blocks * 4).next_multiple_of(SECTOR);
    let offset_bmap = HEADER_LEN as u64;
    let offset_data = offset_bmap + bmap_len;
    let mut h = vec![0u8; HEADER_LEN];
    h[..TEXT.len()].copy_from_slice(TEXT);
    let put32 = |h: &mut [u8], at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put32(&mut h, 64, SIGNATURE);
    put32(&mut h, 68, VERSION);
    put32(&mut h, 72, HEADER_SIZE_FIELD);
    put32(&mut h, 76, if fixed { TYPE_STATIC } else { TYPE_DYNAMIC });
    put32(&mut h, 340, offset_bmap as u32);
    put32(&mut h, 344, offset_data as u32);
    put32(&mut h, 360, SECTOR as u32);
    h[368..376].copy_from_slice(&size.to_le_bytes());
    put32(&mut h, 376, BLOCK_SIZE as u32);
    put32(&mut h, 384, blocks as u32);
    put32(&mut h, 388, if fixed { blocks as u32 } else { 0 });
    h[392..408].copy_from_slice(&uuids[0]);
    h[408..424].copy_from_slice(&uuids[1]);
    let mut bmap = vec![0u8; bmap_len as usize];
    for (i, entry) in bmap.chunks_exact_mut(4).enumerate() {
        let v = if (i as u64) < blocks && fixed {
            i as u32
        } else {
            UNALLOCATED
        };
        entry.copy_from_slice(&v.to_le_bytes());
    }
    let end = offset_data + if fixed { blocks * BLOCK_SIZE } else { 0 };
    (h, bmap, end)
}

pub struct Vdi {
    file: Arc<Child>,
    header: Header,
    /// The block map; entries change only under `allocating`.
    bmap: Mutex<Vec<u32>>,
    /// Held while a block is appended, and holds the allocated-block count.
    allocating: tokio::sync::Mutex<u32>,
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl Vdi {
    /// Where the data of guest `offset` is in the file, if its block is allocated.
    fn host(&self, offset: u64) -> Option<u64> {
        let block = (offset / BLOCK_SIZE) as usize;
        let entry = *self.bmap.lock().expect("bmap lock").get(block)?;
        (entry < DISCARDED).then(|| {
            self.header.offset_data as u64 + entry as u64 * BLOCK_SIZE + offset % BLOCK_SIZE
        })
    }

    /// Write `data` (within one block) into a block that has none yet: append a block,
    /// then the count, then the map entry.
    async fn append(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut allocated = self.allocating.lock().await;
        // Another write may have appended the block while this one waited.
        if let Some(host) = self.host(offset) {
            return self.file.write(host, data, WriteFlags::default()).await;
        }
        let index = *allocated;
        if index >= self.header.blocks_in_image {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let block_start = self.header.offset_data as u64 + index as u64 * BLOCK_SIZE;
        let mut block = PoolBuf::new(BLOCK_SIZE as usize, 1)?;
        let bytes = block.as_mut_slice();
        bytes.fill(0);
        let at = (offset % BLOCK_SIZE) as usize;
        bytes[at..at + data.len()].copy_from_slice(data);
        let plain = WriteFlags::default();
        let block_end = block_start + BLOCK_SIZE;
        if block_end > self.file.node().size() {
            self.file.node().truncate(block_end).await?;
        }
        self.file.write(block_start, bytes, plain).await?;
        self.file
            .write(388, &(index + 1).to_le_bytes(), plain)
            .await?;
        // The block and the count are on disk before the map names the block.
        self.file.flush().await?;
        *allocated = index + 1;
        let block = offset / BLOCK_SIZE;
        self.file
            .write(
                self.header.offset_bmap as u64 + block * 4,
                &index.to_le_bytes(),
                plain,
            )
            .await?;
        self.bmap.lock().expect("bmap lock")[block as usize] = index;
        Ok(())
    }
}

#[async_trait(?Send)]
impl Driver for Vdi {
    fn format_name(&self) -> &'static str {
        "vdi"
    }

    fn size(&self, _node: &Node) -> u64 {
        self.header.disk_size
    }

    async fn read(&self, _node: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        block_map::read(&self.file, BLOCK_SIZE, offset, buf, |pos| self.host(pos)).await
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = block_map::in_block(BLOCK_SIZE, pos, (buf.len() - done) as u64) as usize;
            let chunk = &buf[done..done + n];
            match self.host(pos) {
                Some(host) => self.file.write(host, chunk, WriteFlags::default()).await?,
                None => self.append(pos, chunk).await?,
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
        block_map::write_zeroes(&self.file, BLOCK_SIZE, offset, len, flags, |pos| {
            self.host(pos)
        })
        .await
    }

    /// Discard is advisory and VDI has nothing to give back but whole blocks at the end:
    /// the data stays, as in QEMU.
    async fn discard(&self, _: &Node, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        self.file.flush().await
    }

    async fn block_status(&self, node: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        let size = self.size(node);
        if offset >= size {
            return Err(einval());
        }
        let len = len.min(size - offset);
        Ok(block_map::extent(BLOCK_SIZE, offset, len, |pos| {
            self.host(pos)
        }))
    }

    async fn reopen(&self, _: &Node, writable: bool) -> Result<(), String> {
        self.file.node().set_writable(writable).await
    }

    /// The block map and the allocated-block count are read anew: the other process may
    /// have appended blocks. The header's layout must be as this node left it.
    async fn activate(&self, _: &Node) -> Result<(), String> {
        let fresh = load(self.file.clone()).await.map_err(|e| e.desc)?;
        let layout = |h: &Header| Header {
            blocks_allocated: 0,
            ..h.clone()
        };
        if layout(&fresh.header) != layout(&self.header) {
            return Err(crate::active::layout_changed("vdi", "header"));
        }
        let mut allocated = self.allocating.lock().await;
        *allocated = fresh.allocating.into_inner();
        *self.bmap.lock().expect("bmap lock") = fresh.bmap.into_inner().expect("bmap lock");
        Ok(())
    }

    /// QEMU's vdi cannot resize either.
    async fn truncate(&self, _: &Node, _size: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    fn child_perms(&self, role: &str, perm: Perms, _: Perms, read_only: bool) -> (Perms, Perms) {
        crate::perm::format_child_perms(role, perm, read_only)
    }

    fn info(&self, _node: &Node) -> DriverInfo {
        DriverInfo {
            cluster_size: Some(BLOCK_SIZE),
            dirty_flag: Some(false),
            ..DriverInfo::of_storage(&self.file)
        }
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: true,
    hands_over: true,
    names: &["vdi"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let file = o.open_file_only(options).await?;
    Ok(Box::new(load(file).await?))
}

/// The header and block map of the image in `file`.
async fn load(file: Arc<Child>) -> Result<Vdi, QmpError> {
    let file_size = file.node().size();
    let mut buf = vec![0u8; HEADER_LEN];
    let avail = file_size.min(HEADER_LEN as u64) as usize;
    file.read(0, &mut buf[..avail])
        .await
        .map_err(|e| QmpError::generic(format!("Could not read VDI header: {e}")))?;
    let header = Header::parse(&buf).map_err(QmpError::generic)?;
    // The map is read whole: it must be in the file, which bounds what it can claim.
    let bmap_len = header.blocks_in_image as u64 * 4;
    if header.offset_bmap as u64 + bmap_len > file_size {
        return Err(QmpError::generic(
            "unsupported VDI image (block map past the end of the file)",
        ));
    }
    let mut raw = vec![0u8; bmap_len as usize];
    file.read(header.offset_bmap as u64, &mut raw)
        .await
        .map_err(|e| QmpError::generic(format!("Could not read VDI block map: {e}")))?;
    let bmap: Vec<u32> = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
    // Past the count and past every block the map names, so a new block never lands on
    // data a (damaged) map already points at.
    let next = bmap
        .iter()
        .filter(|&&e| e < DISCARDED)
        .map(|&e| e + 1)
        .max()
        .unwrap_or(0)
        .max(header.blocks_allocated);
    Ok(Vdi {
        file,
        allocating: tokio::sync::Mutex::new(next),
        header,
        bmap: Mutex::new(bmap),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_headers_parse_back() {
        for fixed in [false, true] {
            let (h, bmap, end) = new_image(5 << 20, fixed, [[1; 16], [2; 16]]);
            let header = Header::parse(&h).unwrap();
            assert_eq!(header.blocks_in_image, 5);
            assert_eq!(header.offset_data, 1024);
            assert_eq!(bmap.len(), 512);
            assert_eq!(end, if fixed { 1024 + (5 << 20) } else { 1024 });
        }
    }

    #[test]
    fn crafted_headers_are_refused() {
        let (good, _, _) = new_image(5 << 20, false, [[1; 16], [2; 16]]);
        let cases: [(usize, u32, &str); 5] = [
            (64, 7, "bad signature"),
            (68, 0x0001_0000, "version 1.0"),
            (376, 4096, "block size 4096"),
            (384, 1, "image bitmap has room"),
            (340, 3, "unaligned block map"),
        ];
        for (at, value, want) in cases {
            let mut h = good.clone();
            h[at..at + 4].copy_from_slice(&value.to_le_bytes());
            let err = Header::parse(&h).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
        assert!(Header::parse(&good[..100]).is_err());
    }
}
