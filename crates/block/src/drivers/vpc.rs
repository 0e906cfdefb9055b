//! `vpc`: Virtual PC / Hyper-V disk images (VHD), fixed and dynamic.
//!
//! A fixed image is the disk followed by a 512-byte footer. A dynamic one starts with a
//! copy of the footer, then a dynamic header pointing at the block allocation table (BAT):
//! one big-endian sector number per block (2 MiB by default), or all ones for a block
//! never written (it reads as zeroes). Each allocated block is a sector bitmap followed by
//! the block's data; the footer ends the file.
//!
//! The disk size comes from the footer's CHS geometry unless the image was made by a
//! program that stores the exact size (Hyper-V, `qemu-img create -o force_size=on`), as
//! QEMU decides it. Appending a block writes the footer past it first, then the block's
//! bitmap and data, flushes, then writes its BAT entry: the footer is always somewhere the
//! next open finds it, and the table never points at an unwritten block.

use super::block_map;
use super::fields::{be16, be32, be64};
use crate::node::{Child, DriverInfo, Extent, ExtentKind, Node, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use async_trait::async_trait;
use qapi::error::QmpError;
use serde_json::{Map, Value};
use std::io;
use std::sync::{Arc, Mutex};

const FOOTER_LEN: usize = 512;
const DYN_HEADER_LEN: usize = 1024;
const SECTOR: u64 = 512;
const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const UNALLOCATED: u32 = 0xffff_ffff;
/// The largest geometry (65535 cylinders, 16 heads, 255 sectors): an image this big
/// stores its size only in `current_size`.
const MAX_GEOMETRY: u64 = 65535 * 16 * 255;
/// QEMU's limit (VHD_MAX_SECTORS): 2040 GiB.
const MAX_SECTORS: u64 = 0xff00_0000;
/// Dynamic images' default block size.
const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// QEMU's text for a table or block past the end of the file.
const TRUNCATED: &str =
    "block-vpc: free_data_block_offset points after the end of file. The image has been truncated.";
/// Seconds from the Unix epoch to VHD's (2000-01-01).
const TIMESTAMP_BASE: u64 = 946_684_800;

/// The ones' complement of the byte sum, skipping the checksum field at `at`.
fn checksum(buf: &[u8], at: usize) -> u32 {
    let sum: u32 = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| !(at..at + 4).contains(i))
        .fold(0u32, |s, (_, &b)| s.wrapping_add(b as u32));
    !sum
}

/// The disk size the footer gives, in sectors, as QEMU computes it: CHS unless the
/// creator stores exact sizes or the geometry is at its maximum.
fn footer_sectors(footer: &[u8]) -> u64 {
    let chs = be16(footer, 56) as u64 * footer[58] as u64 * footer[59] as u64;
    let creator = &footer[28..32];
    let exact_creators: [&[u8]; 5] = [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"];
    let use_chs = !exact_creators.contains(&creator);
    if !use_chs || chs == MAX_GEOMETRY {
        be64(footer, 48) / SECTOR
    } else {
        chs
    }
}

/// A footer's disk size in sectors, after QEMU's checks of its checksum and size (public
/// for the fuzz target; the caller has checked the cookie).
pub fn footer_size(footer: &[u8]) -> Result<u64, String> {
    if footer.len() < FOOTER_LEN {
        return Err("invalid VPC image".into());
    }
    if checksum(footer, 64) != be32(footer, 64) {
        return Err("Incorrect header checksum".into());
    }
    let sectors = footer_sectors(footer);
    if sectors > MAX_SECTORS {
        return Err("Image size too big".into());
    }
    Ok(sectors)
}

/// A dynamic image's table: its blocks' size, its entries and where it is (public for the
/// fuzz target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DynamicHeader {
    /// A power of two, at least a sector.
    pub block_size: u64,
    /// Enough to cover the disk, and at most what QEMU takes.
    pub entries: u64,
    /// Where the table is in the file.
    pub bat_offset: u64,
}

impl DynamicHeader {
    /// Parse and check a dynamic header for a disk of `sectors`, as QEMU does.
    pub fn parse(header: &[u8], sectors: u64) -> Result<DynamicHeader, String> {
        if header.len() < DYN_HEADER_LEN || &header[..8] != b"cxsparse" {
            return Err("Invalid header magic".into());
        }
        let block_size = be32(header, 32) as u64;
        if !block_size.is_power_of_two() || block_size < SECTOR {
            return Err(format!("Invalid block size {block_size}"));
        }
        if sectors * SECTOR / block_size > u32::MAX as u64 {
            return Err("Too many blocks".into());
        }
        let entries = be32(header, 28) as u64;
        if entries * block_size < sectors * SECTOR {
            return Err("Page table too small".into());
        }
        if entries > i32::MAX as u64 / 4 {
            return Err(format!("Max Table Entries too large ({entries})"));
        }
        Ok(DynamicHeader {
            block_size,
            entries,
            bat_offset: be64(header, 16),
        })
    }
}

/// The CHS geometry the VHD specification gives a disk of `sectors`.
fn geometry(sectors: u64) -> (u16, u8, u8) {
    let sectors = sectors.min(MAX_GEOMETRY);
    let (mut secs, mut heads, mut cyl_heads);
    if sectors >= 65535 * 16 * 63 {
        secs = 255;
        heads = 16;
        cyl_heads = sectors / secs;
    } else {
        secs = 17;
        cyl_heads = sectors / secs;
        heads = cyl_heads.div_ceil(1024).max(4);
        if cyl_heads >= heads * 1024 || heads > 16 {
            secs = 31;
            heads = 16;
            cyl_heads = sectors / secs;
        }
        if cyl_heads >= heads * 1024 {
            secs = 63;
            heads = 16;
            cyl_heads = sectors / secs;
        }
    }
    ((cyl_heads / heads) as u16, heads as u8, secs as u8)
}

/// What a new image looks like.
pub(crate) struct NewVpc {
    /// Bytes asked for.
    pub size: u64,
    pub fixed: bool,
    /// Store exactly `size` (creator "qem2") instead of rounding up to a CHS geometry.
    pub force_size: bool,
    pub uuid: [u8; 16],
    /// Seconds since the Unix epoch.
    pub now: u64,
}

impl NewVpc {
    /// The footer, and for a dynamic image the dynamic header and BAT (placed after the
    /// footer copy at 0), as QEMU lays them out; the disk size in sectors.
    pub(crate) fn layout(&self) -> Result<(Vec<u8>, Vec<u8>, u64), String> {
        // QEMU's search: the smallest geometry holding the size (the largest one means
        // the size is stored exactly), then the size must be exactly what it describes.
        let (cyls, heads, secs) = if self.force_size {
            (65535u16, 16u8, 255u8)
        } else {
            let wanted = (self.size / SECTOR).min(MAX_GEOMETRY);
            let mut g = (0u16, 0u8, 0u8);
            let mut i = 0;
            while wanted > g.0 as u64 * g.1 as u64 * g.2 as u64 {
                g = geometry(wanted + i);
                i += 1;
            }
            g
        };
        let chs = cyls as u64 * heads as u64 * secs as u64;
        let sectors = if chs == MAX_GEOMETRY {
            let sectors = self.size / SECTOR;
            if sectors > MAX_SECTORS {
                return Err("Disk size is too large, max size is 2040 GiB".into());
            }
            sectors
        } else {
            chs
        };
        if sectors * SECTOR != self.size {
            return Err("The requested image size cannot be represented in CHS geometry".into());
        }
        let bytes = sectors * SECTOR;
        let mut f = vec![0u8; FOOTER_LEN];
        f[..8].copy_from_slice(b"conectix");
        f[8..12].copy_from_slice(&2u32.to_be_bytes());
        f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        let data_offset = if self.fixed {
            u64::MAX
        } else {
            FOOTER_LEN as u64
        };
        f[16..24].copy_from_slice(&data_offset.to_be_bytes());
        let stamp = self.now.saturating_sub(TIMESTAMP_BASE) as u32;
        f[24..28].copy_from_slice(&stamp.to_be_bytes());
        f[28..32].copy_from_slice(if self.force_size { b"qem2" } else { b"qemu" });
        f[32..36].copy_from_slice(&0x0005_0003u32.to_be_bytes());
        f[36..40].copy_from_slice(b"Wi2k");
        f[40..48].copy_from_slice(&bytes.to_be_bytes());
        f[48..56].copy_from_slice(&bytes.to_be_bytes());
        f[56..58].copy_from_slice(&cyls.to_be_bytes());
        f[58] = heads;
        f[59] = secs;
        let kind = if self.fixed { TYPE_FIXED } else { TYPE_DYNAMIC };
        f[60..64].copy_from_slice(&kind.to_be_bytes());
        f[68..84].copy_from_slice(&self.uuid);
        let sum = checksum(&f, 64);
        f[64..68].copy_from_slice(&sum.to_be_bytes());
        if self.fixed {
            return Ok((f, Vec::new(), sectors));
        }
        let entries = bytes.div_ceil(DEFAULT_BLOCK_SIZE as u64);
        let bat_offset = (FOOTER_LEN + DYN_HEADER_LEN) as u64;
        let mut h = vec![0u8; DYN_HEADER_LEN];
        h[..8].copy_from_slice(b"cxsparse");
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        h[16..24].copy_from_slice(&bat_offset.to_be_bytes());
        h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        h[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
        h[32..36].copy_from_slice(&DEFAULT_BLOCK_SIZE.to_be_bytes());
        let sum = checksum(&h, 36);
        h[36..40].copy_from_slice(&sum.to_be_bytes());
        let bat_len = (entries * 4).next_multiple_of(SECTOR) as usize;
        h.resize(DYN_HEADER_LEN + bat_len, 0xff);
        Ok((f, h, sectors))
    }
}

/// A dynamic image's allocation state.
struct Table {
    bat: Vec<u32>,
    /// Where the next block goes (the footer sits there now).
    free: u64,
}

pub struct Vpc {
    file: Arc<Child>,
    footer: Vec<u8>,
    sectors: u64,
    /// None for a fixed image.
    dynamic: Option<Dynamic>,
}

struct Dynamic {
    block_size: u64,
    bitmap_size: u64,
    bat_offset: u64,
    table: Mutex<Table>,
    /// Held while a block is appended.
    allocating: tokio::sync::Mutex<()>,
}

impl Dynamic {
    /// Where guest `offset`'s data is, if its block is allocated.
    fn host(&self, offset: u64) -> Option<u64> {
        let index = (offset / self.block_size) as usize;
        let entry = *self.table.lock().expect("vpc table").bat.get(index)?;
        (entry != UNALLOCATED)
            .then(|| entry as u64 * SECTOR + self.bitmap_size + offset % self.block_size)
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl Vpc {
    /// Write `data` (within one block) into a block that has none yet.
    async fn append(&self, d: &Dynamic, offset: u64, data: &[u8]) -> io::Result<()> {
        let _one = d.allocating.lock().await;
        if let Some(host) = d.host(offset) {
            return self.file.write(host, data, WriteFlags::default()).await;
        }
        let plain = WriteFlags::default();
        let start = d.table.lock().expect("vpc table").free;
        let end = start + d.bitmap_size + d.block_size;
        let sector = u32::try_from(start / SECTOR).map_err(|_| einval())?;
        let file_end = end + FOOTER_LEN as u64;
        if file_end > self.file.node().size() {
            self.file.node().truncate(file_end).await?;
        }
        self.file.write(end, &self.footer, plain).await?;
        let bitmap = vec![0xffu8; d.bitmap_size as usize];
        self.file.write(start, &bitmap, plain).await?;
        let data_start = start + d.bitmap_size;
        self.file
            .write_zeroes(data_start, d.block_size, plain)
            .await?;
        self.file
            .write(data_start + offset % d.block_size, data, plain)
            .await?;
        // The footer and the block are on disk before the table names the block.
        self.file.flush().await?;
        let index = offset / d.block_size;
        self.file
            .write(d.bat_offset + index * 4, &sector.to_be_bytes(), plain)
            .await?;
        let mut table = d.table.lock().expect("vpc table");
        table.bat[index as usize] = sector;
        table.free = end;
        Ok(())
    }
}

#[async_trait(?Send)]
impl Driver for Vpc {
    fn format_name(&self) -> &'static str {
        "vpc"
    }

    fn size(&self, _node: &Node) -> u64 {
        self.sectors * SECTOR
    }

    async fn read(&self, _node: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match &self.dynamic {
            None => self.file.read(offset, buf).await,
            Some(d) => {
                block_map::read(&self.file, d.block_size, offset, buf, |pos| d.host(pos)).await
            }
        }
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        match &self.dynamic {
            None => self.file.write(offset, buf, WriteFlags::default()).await?,
            Some(d) => {
                let mut done = 0usize;
                while done < buf.len() {
                    let pos = offset + done as u64;
                    let n =
                        block_map::in_block(d.block_size, pos, (buf.len() - done) as u64) as usize;
                    let chunk = &buf[done..done + n];
                    match d.host(pos) {
                        Some(host) => self.file.write(host, chunk, WriteFlags::default()).await?,
                        None => self.append(d, pos, chunk).await?,
                    }
                    done += n;
                }
            }
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
        match &self.dynamic {
            // A fixed image's disk is the file's start: its zeroes are the file's.
            None => self.file.write_zeroes(offset, len, flags).await,
            Some(d) => {
                block_map::write_zeroes(&self.file, d.block_size, offset, len, flags, |pos| {
                    d.host(pos)
                })
                .await
            }
        }
    }

    /// Discard is advisory and VHD has no way to give blocks back: the data stays, as in
    /// QEMU.
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
        let Some(d) = &self.dynamic else {
            let extent = self.file.node().block_status(offset, len).await?;
            let kind = match extent.kind {
                ExtentKind::Unallocated => ExtentKind::Zero { allocated: true },
                kind => kind,
            };
            return Ok(Extent {
                len: extent.len.min(len),
                kind,
            });
        };
        Ok(block_map::extent(d.block_size, offset, len, |pos| {
            d.host(pos)
        }))
    }

    async fn reopen(&self, _: &Node, writable: bool) -> Result<(), String> {
        self.file.node().set_writable(writable).await
    }

    /// A dynamic image's block table, and where its next block goes, are read anew: the
    /// other process may have appended blocks. The footer and the table's place must be
    /// as this node left them.
    async fn activate(&self, _: &Node) -> Result<(), String> {
        let fresh = load(self.file.clone()).await.map_err(|e| e.desc)?;
        let layout = |v: &Vpc| {
            let d = v.dynamic.as_ref();
            (
                v.footer.clone(),
                v.sectors,
                d.map(|d| (d.block_size, d.bitmap_size, d.bat_offset)),
            )
        };
        if layout(&fresh) != layout(self) {
            return Err(crate::active::layout_changed("vpc", "footer"));
        }
        if let (Some(d), Some(fresh)) = (&self.dynamic, fresh.dynamic) {
            let _one = d.allocating.lock().await;
            *d.table.lock().expect("vpc table") = fresh.table.into_inner().expect("vpc table");
        }
        Ok(())
    }

    /// QEMU's vpc cannot resize either.
    async fn truncate(&self, _: &Node, _size: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    fn child_perms(&self, role: &str, perm: Perms, _: Perms, read_only: bool) -> (Perms, Perms) {
        crate::perm::format_child_perms(role, perm, read_only)
    }

    fn info(&self, _node: &Node) -> DriverInfo {
        DriverInfo {
            cluster_size: self.dynamic.as_ref().map(|d| d.block_size),
            dirty_flag: Some(false),
            ..DriverInfo::of_storage(&self.file)
        }
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: true,
    hands_over: true,
    names: &["vpc"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn read_at(file: &Child, offset: u64, len: usize) -> Result<Vec<u8>, QmpError> {
    block_map::read_metadata(file, offset, len, "VHD metadata").await
}

async fn open(
    o: &mut Opener<'_>,
    options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let file = o.open_file_only(options).await?;
    Ok(Box::new(load(file).await?))
}

/// The footer, and a dynamic image's header and block table, of the image in `file`.
async fn load(file: Arc<Child>) -> Result<Vpc, QmpError> {
    let file_size = file.node().size();
    let mut footer = read_at(&file, 0, FOOTER_LEN).await?;
    let mut kind = be32(&footer, 60);
    if &footer[..8] != b"conectix" {
        if file_size < FOOTER_LEN as u64 {
            return Err(QmpError::generic("File too small for a VHD header"));
        }
        footer = read_at(&file, file_size - FOOTER_LEN as u64, FOOTER_LEN).await?;
        if &footer[..8] != b"conectix" || be32(&footer, 60) != TYPE_FIXED {
            return Err(QmpError::generic("invalid VPC image"));
        }
        kind = TYPE_FIXED;
    }
    let sectors = footer_size(&footer).map_err(QmpError::generic)?;
    let dynamic = match kind {
        TYPE_FIXED => {
            // The footer follows the disk: writes to the last sector must not reach it.
            if sectors * SECTOR + FOOTER_LEN as u64 > file_size {
                return Err(QmpError::generic(
                    "VHD disk size is larger than the image file",
                ));
            }
            None
        }
        TYPE_DYNAMIC => Some(open_dynamic(&file, &footer, sectors).await?),
        other => {
            return Err(QmpError::generic(format!(
                "VHD disk type {other} is not supported"
            )))
        }
    };
    Ok(Vpc {
        file,
        footer,
        sectors,
        dynamic,
    })
}

async fn open_dynamic(file: &Child, footer: &[u8], sectors: u64) -> Result<Dynamic, QmpError> {
    let file_size = file.node().size();
    let header = read_at(file, be64(footer, 16), DYN_HEADER_LEN).await?;
    let DynamicHeader {
        block_size,
        entries,
        bat_offset,
    } = DynamicHeader::parse(&header, sectors).map_err(QmpError::generic)?;
    // The table is read whole: it must be in the file, which bounds what it can claim.
    if bat_offset
        .checked_add(entries * 4)
        .is_none_or(|end| end > file_size)
    {
        return Err(QmpError::generic(TRUNCATED));
    }
    let raw = read_at(file, bat_offset, (entries * 4) as usize).await?;
    let bat: Vec<u32> = raw.chunks_exact(4).map(|c| be32(c, 0)).collect();
    let bitmap_size = (block_size / (8 * SECTOR)).next_multiple_of(SECTOR);
    let mut free = (bat_offset + entries * 4).next_multiple_of(SECTOR);
    for &entry in bat.iter().filter(|&&e| e != UNALLOCATED) {
        free = free.max(entry as u64 * SECTOR + bitmap_size + block_size);
    }
    if free > file_size {
        return Err(QmpError::generic(TRUNCATED));
    }
    Ok(Dynamic {
        block_size,
        bitmap_size,
        bat_offset,
        table: Mutex::new(Table { bat, free }),
        allocating: tokio::sync::Mutex::new(()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_rounds_as_qemu_does() {
        let image = |size: u64, force_size: bool| NewVpc {
            size,
            fixed: false,
            force_size,
            uuid: [0; 16],
            now: TIMESTAMP_BASE,
        };
        // qemu-img create -f vpc 10M rounds up to 302 x 4 x 17.
        assert!(image(10 << 20, false).layout().is_err());
        let (footer, dynamic, sectors) = image(302 * 4 * 17 * 512, false).layout().unwrap();
        assert_eq!(sectors, 302 * 4 * 17);
        assert_eq!((be16(&footer, 56), footer[58], footer[59]), (302, 4, 17));
        assert_eq!(footer_sectors(&footer), sectors);
        assert_eq!(dynamic.len(), DYN_HEADER_LEN + 512);
        assert_eq!(checksum(&footer, 64), be32(&footer, 64));
        let (footer, _, sectors) = image(10 << 20, true).layout().unwrap();
        assert_eq!(sectors, (10 << 20) / 512);
        assert_eq!(footer_sectors(&footer), sectors);
        assert!(image(3000 << 30, false).layout().is_err());
        // A size the first geometry tried falls short of, one a later one describes.
        assert!(image(69615 * 512, false).layout().is_ok());
    }
}
