//! seSparse extents (ESXi's space-efficient snapshots), read-only as in QEMU. A 512-byte
//! constant header and a volatile one (all little-endian, offsets in sectors); a grain
//! directory of 64-bit entries naming grain tables by index, and grain tables of 4096
//! 64-bit entries whose top nibble says what the 4 KiB grain is: absent, unmapped or
//! zeroed (both read as zeroes), or stored at a grain index whose bits the entry keeps
//! in two pieces.

use super::{eio, Mapping, GT_CACHE};
use crate::drivers::block_map::read_zero_past_end;
use crate::drivers::fields::le64;
use crate::node::Child;
use std::collections::HashMap;
use std::io;
use std::sync::Arc;

/// Both headers are one sector.
pub const HEADER_LEN: usize = 512;
const CONST_MAGIC: u64 = 0xcafe_babe;
const VOLATILE_MAGIC: u64 = 0xcafe_cafe;
/// The one layout QEMU reads: 4 KiB grains, grain tables of 64 sectors.
const GRAIN_SECTORS: u64 = 8;
const GT_SECTORS: u64 = 64;
/// Grain table entries per table.
pub const GT_ENTRIES: u64 = GT_SECTORS * 512 / 8;

/// The constant header's fields blockd uses (public for the fuzz target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeSparseHeader {
    /// The extent's size in sectors.
    pub capacity: u64,
    /// Where the volatile header is.
    pub volatile_header_offset: u64,
    /// Where the grain directory is.
    pub grain_dir_offset: u64,
    /// The grain directory's size.
    pub grain_dir_size: u64,
    /// Where grain table 0 is; the others follow it, 64 sectors each.
    pub grain_tables_offset: u64,
    /// Where grain 0 is; the others follow it, 8 sectors each.
    pub grains_offset: u64,
}

/// Why a header is refused: QEMU's words and its errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// QEMU's errno for the case.
    pub errno: i32,
    /// QEMU's message.
    pub text: String,
}

fn refuse(errno: i32, text: String) -> Refusal {
    Refusal { errno, text }
}

impl SeSparseHeader {
    /// The constant header, checked as QEMU checks it.
    pub fn parse(buf: &[u8]) -> Result<SeSparseHeader, Refusal> {
        if buf.len() < HEADER_LEN {
            return Err(refuse(
                libc::EINVAL,
                "The seSparse header is cut short".into(),
            ));
        }
        let field = |i: usize| le64(buf, i * 8);
        let magic = field(0);
        if magic != CONST_MAGIC {
            return Err(refuse(
                libc::EINVAL,
                format!("Bad const header magic: 0x{magic:016x}"),
            ));
        }
        let unsupported = |text: String| Err(refuse(libc::ENOTSUP, text));
        let version = field(1);
        if version != 0x0000_0002_0000_0001 {
            return unsupported(format!("Unsupported version: 0x{version:016x}"));
        }
        if field(3) != GRAIN_SECTORS {
            return unsupported(format!("Unsupported grain size: {}", field(3)));
        }
        if field(4) != GT_SECTORS {
            return unsupported(format!("Unsupported grain table size: {}", field(4)));
        }
        if field(5) != 0 {
            return unsupported(format!("Unsupported flags: 0x{:016x}", field(5)));
        }
        if (6..10).any(|i| field(i) != 0) {
            return unsupported(format!(
                "Unsupported reserved bits: 0x{:016x} 0x{:016x} 0x{:016x} 0x{:016x}",
                field(6),
                field(7),
                field(8),
                field(9)
            ));
        }
        if buf[26 * 8..HEADER_LEN].iter().any(|&b| b != 0) {
            return unsupported("Unsupported non-zero const header padding".into());
        }
        if field(2) > i64::MAX as u64 / 512 {
            return Err(refuse(
                libc::EINVAL,
                format!("The seSparse capacity of {} sectors is too large", field(2)),
            ));
        }
        Ok(SeSparseHeader {
            capacity: field(2),
            volatile_header_offset: field(10),
            grain_dir_offset: field(16),
            grain_dir_size: field(17),
            grain_tables_offset: field(18),
            grains_offset: field(24),
        })
    }

    /// Grain directory entries.
    pub fn gd_entries(&self) -> u64 {
        self.grain_dir_size.saturating_mul(512) / 8
    }
}

/// The volatile header: a journal left to replay is refused, as QEMU cannot replay it.
pub fn check_volatile(buf: &[u8]) -> Result<(), Refusal> {
    if buf.len() < HEADER_LEN {
        return Err(refuse(
            libc::EINVAL,
            "The seSparse header is cut short".into(),
        ));
    }
    let magic = le64(buf, 0);
    if magic != VOLATILE_MAGIC {
        return Err(refuse(
            libc::EINVAL,
            format!("Bad volatile header magic: 0x{magic:016x}"),
        ));
    }
    if le64(buf, 24) != 0 {
        return Err(refuse(
            libc::ENOTSUP,
            "Image is dirty, Replaying journal not supported".into(),
        ));
    }
    if buf[32..HEADER_LEN].iter().any(|&b| b != 0) {
        return Err(refuse(
            libc::ENOTSUP,
            "Unsupported non-zero volatile header padding".into(),
        ));
    }
    Ok(())
}

/// A grain directory entry: the sector of the grain table it names, None for none.
fn table_sector(header: &SeSparseHeader, entry: u64) -> io::Result<Option<u64>> {
    if entry == 0 {
        return Ok(None);
    }
    // The top 32 bits say "allocated"; the rest is the table's index (a disk has fewer
    // than 2^32 tables).
    if entry >> 32 != 0x1000_0000 {
        return Err(eio("a seSparse grain directory entry is invalid"));
    }
    let sector = header
        .grain_tables_offset
        .saturating_add((entry & 0xffff_ffff) * GT_SECTORS);
    if sector > u32::MAX as u64 {
        return Err(eio("a seSparse grain table lies past 2 TiB"));
    }
    Ok(Some(sector))
}

/// A grain table entry, as a mapping of the grain.
fn grain_mapping(header: &SeSparseHeader, entry: u64) -> io::Result<Mapping> {
    Ok(match entry >> 60 {
        0 if entry == 0 => Mapping::Unallocated,
        1 | 2 => Mapping::Zeroed,
        3 => {
            let index = ((entry >> 48) & 0xfff) | ((entry & 0x0000_ffff_ffff_ffff) << 12);
            let at = index
                .checked_mul(GRAIN_SECTORS)
                .and_then(|s| s.checked_add(header.grains_offset))
                .and_then(|s| s.checked_mul(512))
                .filter(|&at| at <= i64::MAX as u64)
                .ok_or_else(|| eio("a seSparse grain lies past the largest file"))?;
            Mapping::Data(at)
        }
        _ => return Err(eio("a seSparse grain table entry is invalid")),
    })
}

/// An open seSparse extent.
pub(super) struct SeSparse {
    pub file: Arc<Child>,
    header: SeSparseHeader,
    gd: Vec<u64>,
    gts: tokio::sync::Mutex<HashMap<u64, Vec<u64>>>,
}

impl SeSparse {
    pub fn new(file: Arc<Child>, header: SeSparseHeader, gd: Vec<u64>) -> SeSparse {
        SeSparse {
            file,
            header,
            gd,
            gts: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Whether `fresh`, read anew from the same file when the node takes its image back,
    /// has this extent's header and grain directory. The cached grain tables are dropped
    /// either way: the other process may have written them.
    pub async fn take_back(&self, fresh: SeSparse) -> bool {
        self.gts.lock().await.clear();
        fresh.header == self.header && fresh.gd == self.gd
    }

    /// Bytes per grain.
    pub fn grain(&self) -> u64 {
        GRAIN_SECTORS * 512
    }

    /// The extent's length in bytes.
    pub fn len(&self) -> u64 {
        self.header.capacity * 512
    }

    /// The grain at extent offset `off`.
    pub async fn lookup(&self, off: u64) -> io::Result<Mapping> {
        let grain = off / self.grain();
        let entry = self
            .gd
            .get((grain / GT_ENTRIES) as usize)
            .copied()
            .ok_or_else(|| eio("a read past the seSparse grain directory"))?;
        let Some(sector) = table_sector(&self.header, entry)? else {
            return Ok(Mapping::Unallocated);
        };
        let mut gts = self.gts.lock().await;
        if !gts.contains_key(&sector) {
            if gts.len() >= GT_CACHE {
                gts.clear();
            }
            let mut raw = vec![0u8; (GT_ENTRIES * 8) as usize];
            read_zero_past_end(&self.file, sector * 512, &mut raw).await?;
            gts.insert(sector, raw.chunks_exact(8).map(|c| le64(c, 0)).collect());
        }
        let entry = gts[&sector][(grain % GT_ENTRIES) as usize];
        grain_mapping(&self.header, entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        for (i, v) in [
            (0, CONST_MAGIC),
            (1, 0x2_0000_0001),
            (2, 8192),
            (3, 8),
            (4, 64),
            (10, 1),
            (16, 8),
            (17, 1),
            (18, 16),
            (24, 128),
        ] {
            h[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        h
    }

    #[test]
    fn headers_are_checked_in_qemus_words() {
        let h = SeSparseHeader::parse(&header()).unwrap();
        assert_eq!(
            (h.capacity, h.gd_entries(), h.grains_offset),
            (8192, 64, 128)
        );
        let mut bad = header();
        bad[3 * 8] = 16;
        assert_eq!(
            SeSparseHeader::parse(&bad).unwrap_err().text,
            "Unsupported grain size: 16"
        );
        let mut bad = header();
        bad[500] = 1;
        assert_eq!(
            SeSparseHeader::parse(&bad).unwrap_err().errno,
            libc::ENOTSUP
        );
        let mut volatile = vec![0u8; HEADER_LEN];
        volatile[..8].copy_from_slice(&VOLATILE_MAGIC.to_le_bytes());
        assert!(check_volatile(&volatile).is_ok());
        volatile[24] = 1;
        assert_eq!(
            check_volatile(&volatile).unwrap_err().text,
            "Image is dirty, Replaying journal not supported"
        );
    }

    #[test]
    fn grain_entries_keep_the_index_in_two_pieces() {
        let h = SeSparseHeader::parse(&header()).unwrap();
        let index = 5000u64;
        let entry = 3 << 60 | (index & 0xfff) << 48 | index >> 12;
        assert_eq!(
            grain_mapping(&h, entry).unwrap(),
            Mapping::Data((128 + index * 8) * 512)
        );
        assert_eq!(grain_mapping(&h, 1 << 60).unwrap(), Mapping::Zeroed);
        assert!(grain_mapping(&h, 5).is_err());
        assert!(grain_mapping(&h, 4 << 60).is_err());
        assert_eq!(
            table_sector(&h, 0x1000_0000_0000_0002).unwrap(),
            Some(16 + 128)
        );
        assert!(table_sector(&h, 0x2000_0000_0000_0000).is_err());
    }
}
