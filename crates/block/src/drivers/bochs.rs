//! `bochs`: the Bochs emulator's growing disks, read-only as in QEMU. A 512-byte header,
//! a catalog of 32-bit extent numbers (0xffffffff: never written), and extents, each a
//! bitmap of its sectors (a set bit: the sector holds data) before the sectors.

use super::block_map::read_metadata;
use super::fields::{le32, le64};
use super::read_only::{open_file, ReadOnly, ReadOnlyImage};
use crate::node::{Child, Extent, ExtentKind};
use crate::open::{DriverEntry, Opener};
use crate::Driver;
use async_trait::async_trait;
use qapi::error::QmpError;
use serde_json::{Map, Value};
use std::io;
use std::sync::Arc;

pub(crate) const MAGIC: &[u8] = b"Bochs Virtual HD Image";
const HEADER_LEN: usize = 512;
const UNALLOCATED: u32 = 0xffff_ffff;
/// The largest catalog blockd reads whole (QEMU's limit: 2^24 entries).
const MAX_CATALOG: u64 = 1 << 24;

/// The header fields (public for the fuzz target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Where the catalog starts.
    pub header_size: u64,
    /// Catalog entries.
    pub catalog: u64,
    /// Bytes of each extent's sector bitmap.
    pub bitmap: u64,
    /// Bytes of each extent's data.
    pub extent: u64,
    /// The disk size in bytes.
    pub disk: u64,
}

impl Header {
    /// Parse and check a header as QEMU does.
    pub fn parse(buf: &[u8]) -> Result<Header, String> {
        let not = || "Image not in Bochs format".to_string();
        if buf.len() < HEADER_LEN
            || !buf.starts_with(MAGIC)
            || !buf[32..].starts_with(b"Redolog")
            || !buf[48..].starts_with(b"Growing")
        {
            return Err(not());
        }
        let disk = match le32(buf, 64) {
            0x0002_0000 => le64(buf, 88),
            0x0001_0000 => le64(buf, 84),
            _ => return Err(not()),
        };
        let header_size = le32(buf, 68) as u64;
        let catalog = le32(buf, 72) as u64;
        let bitmap = le32(buf, 76) as u64;
        let extent = le32(buf, 80) as u64;
        if catalog > MAX_CATALOG {
            return Err("Catalog size is too large".into());
        }
        if !extent.is_power_of_two() {
            return Err(format!("Extent size {extent} is not a power of two"));
        }
        if extent < 512 {
            return Err(format!("Extent size {extent} is too small"));
        }
        if extent > 0x8000_0000 {
            return Err(format!("Extent size {extent} is too large"));
        }
        if bitmap == 0 || bitmap > 0x1000_0000 {
            return Err("Bitmap size is invalid".into());
        }
        if header_size < HEADER_LEN as u64 {
            return Err("Header size is invalid".into());
        }
        if disk.div_ceil(extent) > catalog {
            return Err("Catalog size is too small for this disk size".into());
        }
        Ok(Header {
            header_size,
            catalog,
            bitmap,
            extent,
            disk,
        })
    }

    /// Bytes from one extent's bitmap to the next's.
    fn stride(&self) -> u64 {
        (self.bitmap.div_ceil(512) + self.extent / 512) * 512
    }
}

pub struct Bochs {
    file: Arc<Child>,
    header: Header,
    catalog: Vec<u32>,
    data_offset: u64,
}

impl Bochs {
    /// Where the sector at `pos` is in the file, if it holds data.
    async fn sector(&self, pos: u64) -> io::Result<Option<u64>> {
        let h = &self.header;
        let entry = self.catalog[(pos / h.extent) as usize];
        if entry == UNALLOCATED {
            return Ok(None);
        }
        let bitmap_at = self.data_offset + entry as u64 * h.stride();
        let sector = pos % h.extent / 512;
        let mut byte = [0u8; 1];
        self.file.read(bitmap_at + sector / 8, &mut byte).await?;
        if byte[0] >> (sector % 8) & 1 == 0 {
            return Ok(None);
        }
        Ok(Some(
            bitmap_at + h.bitmap.div_ceil(512) * 512 + sector * 512,
        ))
    }
}

#[async_trait(?Send)]
impl ReadOnlyImage for Bochs {
    const NAME: &'static str = "bochs";

    fn file(&self) -> &Arc<Child> {
        &self.file
    }

    fn size(&self) -> u64 {
        self.header.disk / 512 * 512
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = (512 - pos % 512).min((buf.len() - done) as u64) as usize;
            let chunk = &mut buf[done..done + n];
            match self.sector(pos).await? {
                Some(at) => self.file.read(at + pos % 512, chunk).await?,
                None => chunk.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// Whole extents: those without a catalog entry read as zeroes; the others are data
    /// (their bitmaps are per sector, and QEMU reports them so too).
    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        let h = &self.header;
        let len = len.min(h.extent - offset % h.extent);
        let allocated = self.catalog[(offset / h.extent) as usize] != UNALLOCATED;
        let kind = if allocated {
            ExtentKind::Data
        } else {
            ExtentKind::Zero { allocated: false }
        };
        Ok(Extent { len, kind })
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: true,
    // Read-only: nothing kept can go stale while another process reads the image too.
    hands_over: true,
    names: &["bochs"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let file = open_file(o, options).await?;
    let head = read_metadata(&file, 0, HEADER_LEN, "bochs header").await?;
    let header = Header::parse(&head).map_err(QmpError::generic)?;
    let file_size = file.node().size();
    // The catalog is read whole: it must be in the file, which bounds what it claims.
    if header.header_size + header.catalog * 4 > file_size {
        return Err(QmpError::generic(
            "The bochs catalog lies past the end of the file",
        ));
    }
    let raw = read_metadata(
        &file,
        header.header_size,
        (header.catalog * 4) as usize,
        "bochs catalog",
    )
    .await?;
    let catalog: Vec<u32> = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
    let data_offset = header.header_size + header.catalog * 4;
    // Every extent an entry names must be in the file, so a read never goes past it.
    let extents = file_size.saturating_sub(data_offset) / header.stride();
    if catalog
        .iter()
        .any(|&e| e != UNALLOCATED && e as u64 >= extents)
    {
        return Err(QmpError::generic(
            "A bochs catalog entry points past the end of the file",
        ));
    }
    o.claim_position();
    Ok(Box::new(ReadOnly(Bochs {
        file,
        header,
        catalog,
        data_offset,
    })))
}
