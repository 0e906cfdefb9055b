//! The hosted sparse extent (VMDK4, magic `KDMV`): a 512-byte header, a grain directory
//! (GD) of grain table (GT) sectors and a redundant copy of both (RGD), and grains.
//! A GT entry is a grain's sector, 0 for a grain never written, 1 for a zeroed grain when
//! the header has that feature. streamOptimized extents hold zlib-compressed grains, each
//! after a marker (its sector and length), and may keep their GD in a footer at the end.

use crate::drivers::fields::{le32, le64};

pub const MAGIC: &[u8; 4] = b"KDMV";
pub const HEADER_LEN: usize = 512;
/// The `gd_offset` of an extent whose GD is named by the footer at the end of the file.
pub const GD_AT_END: u64 = u64::MAX;
/// Metadata marker types of a stream (the marker's `size` is 0 for them).
pub const MARKER_END_OF_STREAM: u32 = 0;
pub const MARKER_FOOTER: u32 = 3;

/// Header flags.
pub const FLAG_NL_DETECT: u32 = 1;
pub const FLAG_RGD: u32 = 1 << 1;
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
pub const FLAG_COMPRESS: u32 = 1 << 16;
pub const FLAG_MARKER: u32 = 1 << 17;

/// A GT entry for a zeroed grain.
pub const GTE_ZEROED: u32 = 1;
/// Grains of at most 1 GiB, as QEMU takes.
const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
/// GD entries QEMU takes at most.
const MAX_GD_ENTRIES: u64 = 32 << 20;

/// The header fields (public for the fuzz target). Offsets and sizes are in sectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseHeader {
    /// 1; 2 with zeroed grains; 3 for streamOptimized.
    pub version: u32,
    /// `FLAG_*`.
    pub flags: u32,
    /// Sectors the extent holds.
    pub capacity: u64,
    /// Sectors per grain.
    pub grain_sectors: u64,
    /// Where an embedded descriptor starts (0: none).
    pub desc_offset: u64,
    /// Room for the embedded descriptor.
    pub desc_size: u64,
    /// Entries per grain table.
    pub gtes_per_gt: u32,
    /// Where the redundant GD is.
    pub rgd_offset: u64,
    /// Where the GD is, or [`GD_AT_END`].
    pub gd_offset: u64,
    /// Where the first grain may go: past the header and tables.
    pub overhead: u64,
    /// 1: deflate (zlib).
    pub compress_algorithm: u16,
}

impl SparseHeader {
    /// The fields of a header, with QEMU's checks and words; None without the magic.
    pub fn parse(buf: &[u8]) -> Option<Result<SparseHeader, String>> {
        if buf.len() < HEADER_LEN || &buf[..4] != MAGIC {
            return None;
        }
        let h = SparseHeader {
            version: le32(buf, 4),
            flags: le32(buf, 8),
            capacity: le64(buf, 12),
            grain_sectors: le64(buf, 20),
            desc_offset: le64(buf, 28),
            desc_size: le64(buf, 36),
            gtes_per_gt: le32(buf, 44),
            rgd_offset: le64(buf, 48),
            gd_offset: le64(buf, 56),
            overhead: le64(buf, 64),
            compress_algorithm: u16::from_le_bytes([buf[77], buf[78]]),
        };
        Some(h.check().map(|()| h))
    }

    /// A sparse header of either kind: VMDK4 (`KDMV`), or the VMDK3 (`COWD`) header of
    /// ESX's vmfsSparse extents, taken as a VMDK4 one with 4096-entry grain tables and no
    /// redundant directory. None without either magic.
    pub fn parse_any(buf: &[u8]) -> Option<Result<SparseHeader, String>> {
        if buf.len() < HEADER_LEN || &buf[..4] != b"COWD" {
            return SparseHeader::parse(buf);
        }
        let h = SparseHeader {
            version: 1,
            flags: 0,
            capacity: le32(buf, 12) as u64,
            grain_sectors: le32(buf, 16) as u64,
            // QEMU reads a VMDK3 extent's descriptor (its CID) from the second sector.
            desc_offset: 1,
            desc_size: 1,
            gtes_per_gt: 4096,
            rgd_offset: 0,
            gd_offset: le32(buf, 20) as u64,
            overhead: 0,
            compress_algorithm: 0,
        };
        if h.grain_sectors == 0 {
            return Some(Err("L1 entry size is invalid".into()));
        }
        if h.grain_sectors > MAX_GRAIN_SECTORS {
            return Some(Err("Invalid granularity, image may be corrupt".into()));
        }
        Some(Ok(h))
    }

    /// Whether the GD is named by a footer instead (a stream written front to back).
    pub fn gd_at_end(&self) -> bool {
        self.gd_offset == GD_AT_END
    }

    fn check(&self) -> Result<(), String> {
        if self.version > 3 {
            return Err(format!("Unsupported VMDK version {}", self.version));
        }
        if self.gtes_per_gt > 512 {
            return Err("L2 table size too big".into());
        }
        if self.grain_sectors.saturating_mul(self.gtes_per_gt as u64) == 0 {
            return Err("L1 entry size is invalid".into());
        }
        if self.grain_sectors > MAX_GRAIN_SECTORS {
            return Err("Invalid granularity, image may be corrupt".into());
        }
        if self.capacity > i64::MAX as u64 / 512 {
            return Err("Image too large".into());
        }
        if self.gd_entries() > MAX_GD_ENTRIES {
            return Err("L1 size too big".into());
        }
        Ok(())
    }

    /// GD entries: enough GTs to cover the capacity.
    pub fn gd_entries(&self) -> u64 {
        self.capacity
            .div_ceil(self.grain_sectors * self.gtes_per_gt as u64)
    }

    /// Bytes per grain.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_sectors * 512
    }

    /// Whether the grains are compressed (streamOptimized).
    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESS != 0
    }

    /// The header as it is written (the layout `parse` reads).
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain_sectors.to_le_bytes());
        b[28..36].copy_from_slice(&self.desc_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.desc_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        // The line-end characters that let a reader detect a file mangled by a text tool.
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }
}

/// The header inside a stream's footer (the last 1536 bytes: a footer marker, the header,
/// an end-of-stream marker), with QEMU's word for a bad one.
pub fn footer_header(tail: &[u8]) -> Result<SparseHeader, String> {
    let invalid = || "Invalid footer".to_string();
    if tail.len() != 3 * 512 {
        return Err(invalid());
    }
    let marker_ok = |at: usize, kind: u32| le32(tail, at + 8) == 0 && le32(tail, at + 12) == kind;
    if !marker_ok(0, MARKER_FOOTER) || !marker_ok(1024, MARKER_END_OF_STREAM) {
        return Err(invalid());
    }
    match SparseHeader::parse(&tail[512..1024]) {
        Some(Ok(h)) if !h.gd_at_end() => Ok(h),
        Some(Err(e)) => Err(e),
        _ => Err(invalid()),
    }
}

/// Where a new sparse extent's tables go, as QEMU lays them out: the header, room for a
/// descriptor, the RGD and its GTs, the GD and its GTs, then grains from the next grain
/// boundary.
pub struct Layout {
    pub header: SparseHeader,
    /// GD entries, and sectors of one GD and of one GT.
    pub gd_entries: u64,
    pub gd_sectors: u64,
    pub gt_sectors: u64,
}

/// Room QEMU leaves for a descriptor in every sparse extent it creates.
pub const DESC_SECTORS: u64 = 20;
/// New extents have 64 KiB grains and 512-entry GTs.
const NEW_GRAIN_SECTORS: u64 = 128;
const NEW_GTES: u32 = 512;

impl Layout {
    pub fn new(capacity: u64, compressed: bool, zeroed_grain: bool) -> Layout {
        let gd_entries = capacity.div_ceil(NEW_GRAIN_SECTORS * NEW_GTES as u64);
        let gd_sectors = (gd_entries * 4).div_ceil(512);
        let gt_sectors = (NEW_GTES as u64 * 4).div_ceil(512);
        let rgd_offset = 1 + DESC_SECTORS;
        let gd_offset = rgd_offset + gd_sectors + gd_entries * gt_sectors;
        let end = gd_offset + gd_sectors + gd_entries * gt_sectors;
        let mut flags = FLAG_NL_DETECT | FLAG_RGD;
        if compressed {
            flags |= FLAG_COMPRESS | FLAG_MARKER;
        }
        if zeroed_grain {
            flags |= FLAG_ZERO_GRAIN;
        }
        let version = match (compressed, zeroed_grain) {
            (true, _) => 3,
            (false, true) => 2,
            (false, false) => 1,
        };
        Layout {
            header: SparseHeader {
                version,
                flags,
                capacity,
                grain_sectors: NEW_GRAIN_SECTORS,
                desc_offset: 1,
                desc_size: DESC_SECTORS,
                gtes_per_gt: NEW_GTES,
                rgd_offset,
                gd_offset,
                overhead: end.next_multiple_of(NEW_GRAIN_SECTORS),
                compress_algorithm: u16::from(compressed),
            },
            gd_entries,
            gd_sectors,
            gt_sectors,
        }
    }

    /// A directory (at `at`, in sectors) naming the GTs that follow it.
    pub fn directory(&self, at: u64) -> Vec<u8> {
        let mut gd = vec![0u8; (self.gd_sectors * 512) as usize];
        for i in 0..self.gd_entries {
            let gt = (at + self.gd_sectors + i * self.gt_sectors) as u32;
            gd[i as usize * 4..][..4].copy_from_slice(&gt.to_le_bytes());
        }
        gd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_layouts_are_qemus() {
        // What qemu-img 10.0 writes for 5 MiB and 10 GiB images.
        let small = Layout::new(10240, false, false);
        let h = &small.header;
        assert_eq!((h.rgd_offset, h.gd_offset, h.overhead), (21, 26, 128));
        let big = Layout::new(20971520, false, false);
        let h = &big.header;
        assert_eq!((h.rgd_offset, h.gd_offset, h.overhead), (21, 1304, 2688));
        let stream = Layout::new(10240, true, false).header;
        assert_eq!(
            (stream.version, stream.flags, stream.compress_algorithm),
            (3, 0x30003, 1)
        );
        let zeroed = Layout::new(10240, false, true).header;
        assert_eq!((zeroed.version, zeroed.flags), (2, 7));
        let bytes = h.to_bytes();
        assert_eq!(SparseHeader::parse(&bytes), Some(Ok(h.clone())));
        assert_eq!(big.directory(21)[..8], [24, 0, 0, 0, 28, 0, 0, 0]);
    }

    #[test]
    fn bad_headers_get_qemus_words() {
        let good = Layout::new(10240, false, false).header;
        for (change, error) in [
            (
                SparseHeader {
                    version: 4,
                    ..good.clone()
                },
                "Unsupported VMDK version 4",
            ),
            (
                SparseHeader {
                    gtes_per_gt: 1024,
                    ..good.clone()
                },
                "L2 table size too big",
            ),
            (
                SparseHeader {
                    grain_sectors: 0,
                    ..good.clone()
                },
                "L1 entry size is invalid",
            ),
            (
                SparseHeader {
                    grain_sectors: 1 << 22,
                    ..good.clone()
                },
                "Invalid granularity",
            ),
            (
                SparseHeader {
                    capacity: 1 << 60,
                    ..good.clone()
                },
                "Image too large",
            ),
            (
                SparseHeader {
                    capacity: 1 << 50,
                    gtes_per_gt: 1,
                    grain_sectors: 1,
                    ..good
                },
                "L1 size too big",
            ),
        ] {
            let e = SparseHeader::parse(&change.to_bytes())
                .unwrap()
                .unwrap_err();
            assert!(e.starts_with(error), "{e}");
        }
    }
}
