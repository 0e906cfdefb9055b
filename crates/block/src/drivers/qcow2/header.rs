//! The qcow2 header (docs/interop/qcow2.txt): what query-named-block-nodes reports, where
//! the tables lie, and what we must refuse before anything is written.

use serde_json::{json, Value};
use std::io;

/// Enough for the header, its extensions and a backing file name in all but odd images.
pub const HEADER_READ_SIZE: usize = 64 * 1024;

pub(super) const MAGIC: &[u8; 4] = b"QFI\xfb";
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_BITMAPS: u32 = 0x2385_2875;
/// The external data file's name.
pub(super) const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Where a LUKS header lies in the image: offset and length, 8 bytes each.
pub(super) const EXT_CRYPTO_HEADER: u32 = 0x0537_be77;
/// The longest crypto header we accept: four times what the largest LUKS1 key needs.
const MAX_CRYPTO_HEADER: u64 = 8 << 20;

/// Autoclear bit 0: the bitmaps extension is consistent.
const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is a valid raw image of the disk.
pub(super) const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// QEMU refuses longer backing file names (and so do we, in both directions).
const MAX_BACKING_NAME: usize = 1023;

pub(super) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(super) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(super) const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
pub(super) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(super) const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
pub(super) const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// What [`Qcow2Header::parse`] read from the start of a qcow2 image: the header fields and
/// extensions we need. Each field names its field in the spec
/// (docs/interop/qcow2.txt); those a version 2 header lacks hold what the spec assumes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Qcow2Header {
    /// `version` (bytes 4-7): 2 or 3, as `parse` refuses others.
    pub version: u32,
    /// `cluster_bits` (bytes 20-23): the cluster size is `1 << cluster_bits`; 9 to 21
    /// (512 bytes to 2 MiB, QEMU's limits), as `parse` refuses others.
    pub cluster_bits: u32,
    /// `size` (bytes 24-31): the virtual disk size in bytes.
    pub size: u64,
    /// `l1_size` (bytes 36-39): entries in the active L1 table.
    pub l1_size: u32,
    /// `l1_table_offset` (bytes 40-47): where the active L1 table starts.
    pub l1_table_offset: u64,
    /// `refcount_table_offset` (bytes 48-55): where the refcount table starts.
    pub refcount_table_offset: u64,
    /// `refcount_table_clusters` (bytes 56-59): the refcount table's length in clusters.
    pub refcount_table_clusters: u32,
    /// `crypt_method` (bytes 32-35): 0 none, 1 AES, 2 LUKS (`crypt.rs`); `parse` refuses
    /// others.
    pub crypt_method: u32,
    /// `incompatible_features` (bytes 72-79; 0 in version 2): bit 0 dirty, 1 corrupt,
    /// 2 external data file, 3 compression type, 4 extended L2 entries. `check_supported`
    /// refuses unknown bits; a corrupt image opens read-only only (`mod.rs`).
    pub incompatible: u64,
    /// `compatible_features` (bytes 80-87; 0 in version 2): bit 0 lazy refcounts.
    pub compatible: u64,
    /// `autoclear_features` (bytes 88-95; 0 in version 2): bit 0 says the bitmaps
    /// extension is consistent, bit 1 the external data file is raw.
    pub autoclear: u64,
    /// `refcount_order` (bytes 96-99): refcounts are `1 << refcount_order` bits wide; at
    /// most 6, and 4 in version 2.
    pub refcount_order: u32,
    /// `compression_type` (byte 104, 0 when `header_length` does not reach it): 0 zlib,
    /// 1 zstd. Only counts when incompatible bit 3 is set.
    pub compression_type: u8,
    /// The backing file name, stored at `backing_file_offset` (bytes 8-15) for
    /// `backing_file_size` bytes (16-19). None without one, or while it lies past the
    /// buffer parsed (then `backing_file_span` says where).
    pub backing_file: Option<String>,
    /// The backing file format name header extension (type 0xe2792aca).
    pub backing_format: Option<String>,
    /// `backing_file_offset` and `backing_file_size` when the name lies past the buffer
    /// given to `parse`: the caller reads it from there and fills `backing_file`.
    pub backing_file_span: Option<(u64, u32)>,
    /// The bitmaps extension (type 0x23852875), consistent or not: `consistent_bitmaps`
    /// looks at the autoclear bit too.
    pub bitmaps: Option<BitmapsExt>,
    /// The external data file name extension (type 0x44415441): where the data clusters
    /// are, when the `data-file` option does not say.
    pub data_file: Option<String>,
    /// The crypto header extension (type 0x0537be77): the LUKS header's offset (cluster
    /// aligned) and length in the image file.
    pub crypto_header: Option<(u64, u64)>,
}

/// The bitmaps extension: where the bitmap directory lies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BitmapsExt {
    /// `nb_bitmaps` (bytes 0-3): how many bitmaps the directory lists.
    pub nb_bitmaps: u32,
    /// `bitmap_directory_size` (bytes 8-15): the directory's size in bytes.
    pub directory_size: u64,
    /// `bitmap_directory_offset` (bytes 16-23): where the directory starts in the file.
    pub directory_offset: u64,
}

impl BitmapsExt {
    fn parse(data: &[u8]) -> Result<BitmapsExt, String> {
        if data.len() < 24 {
            return Err("qcow2: bitmaps extension is too short".into());
        }
        Ok(BitmapsExt {
            nb_bitmaps: be32(data, 0),
            directory_size: be64(data, 8),
            directory_offset: be64(data, 16),
        })
    }

    fn to_bytes(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[0..4].copy_from_slice(&self.nb_bitmaps.to_be_bytes());
        out[8..16].copy_from_slice(&self.directory_size.to_be_bytes());
        out[16..24].copy_from_slice(&self.directory_offset.to_be_bytes());
        out
    }
}

pub(super) fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().unwrap())
}

pub(super) fn be64(buf: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(buf[at..at + 8].try_into().unwrap())
}

impl Qcow2Header {
    /// Parse the start of an image file. Refuses what we cannot serve with QEMU's wording.
    pub fn parse(buf: &[u8]) -> Result<Qcow2Header, String> {
        if buf.len() < 72 || &buf[0..4] != MAGIC {
            return Err("Image is not in qcow2 format".into());
        }
        let version = be32(buf, 4);
        if !(2..=3).contains(&version) {
            return Err(format!("Unsupported qcow2 version {version}"));
        }
        let mut header = Qcow2Header {
            version,
            cluster_bits: be32(buf, 20),
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            refcount_order: 4,
            ..Qcow2Header::default()
        };
        if !(9..=21).contains(&header.cluster_bits) {
            return Err(format!(
                "Unsupported cluster size: 2^{}",
                header.cluster_bits
            ));
        }
        if header.crypt_method > 2 {
            return Err(format!(
                "Unsupported encryption method: {}",
                header.crypt_method
            ));
        }
        let mut header_length = 72usize;
        if version == 3 {
            if buf.len() < 104 {
                return Err("qcow2 header exceeds cluster size".into());
            }
            header.incompatible = be64(buf, 72);
            header.compatible = be64(buf, 80);
            header.autoclear = be64(buf, 88);
            header.refcount_order = be32(buf, 96);
            if header.refcount_order > 6 {
                return Err("Reference count entry width too large; may not exceed 64 bits".into());
            }
            header_length = be32(buf, 100) as usize;
            if header_length < 104 || header_length > buf.len() {
                return Err("qcow2 header exceeds cluster size".into());
            }
            if header_length > 104 {
                header.compression_type = buf[104];
            }
        }
        header.check_compression_type()?;
        header.parse_extensions(buf, header_length)?;

        let backing_offset = be64(buf, 8);
        let backing_size = be32(buf, 16);
        // QEMU's bounds: the name starts within the first cluster, so the arithmetic
        // below cannot overflow whatever a crafted header says.
        if backing_offset > header.cluster_size() {
            return Err("Invalid backing file offset".into());
        }
        if backing_offset != 0 && backing_size != 0 {
            if backing_size > 1023 {
                return Err("Backing file name too long".into());
            }
            let start = backing_offset as usize;
            let end = start + backing_size as usize;
            if end <= buf.len() {
                header.backing_file = Some(String::from_utf8_lossy(&buf[start..end]).into_owned());
            } else {
                header.backing_file_span = Some((backing_offset, backing_size));
            }
        }
        Ok(header)
    }

    fn parse_extensions(&mut self, buf: &[u8], mut at: usize) -> Result<(), String> {
        while at + 8 <= buf.len() {
            let kind = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            at += 8;
            if kind == EXT_END {
                return Ok(());
            }
            if at + len > buf.len() {
                return Err("qcow2: header extension exceeds the header".into());
            }
            if kind == EXT_BACKING_FORMAT {
                self.backing_format =
                    Some(String::from_utf8_lossy(&buf[at..at + len]).into_owned());
            }
            if kind == EXT_DATA_FILE {
                self.data_file = Some(String::from_utf8_lossy(&buf[at..at + len]).into_owned());
            }
            if kind == EXT_BITMAPS {
                self.bitmaps = Some(BitmapsExt::parse(&buf[at..at + len])?);
            }
            if kind == EXT_CRYPTO_HEADER {
                if len != 16 {
                    return Err(format!(
                        "qcow2: crypto header extension has length {len}, not 16"
                    ));
                }
                let (offset, length) = (be64(buf, at), be64(buf, at + 8));
                // A LUKS1 header with its key material takes about 2 MiB.
                if length > MAX_CRYPTO_HEADER {
                    return Err(format!(
                        "qcow2: crypto header extension length {length} is too large"
                    ));
                }
                if !offset.is_multiple_of(self.cluster_size())
                    || offset.checked_add(length).is_none()
                {
                    return Err("Invalid encryption header offset".into());
                }
                self.crypto_header = Some((offset, length));
            }
            at += len.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// QEMU's rules: zlib (0) or zstd (1), and the incompatible bit set exactly when the
    /// type is not zlib, since an older reader would misread the clusters.
    fn check_compression_type(&self) -> Result<(), String> {
        let flagged = self.incompatible & INCOMPAT_COMPRESSION != 0;
        match self.compression_type {
            0 | 1 if flagged == (self.compression_type != 0) => Ok(()),
            0 => Err("qcow2: Compression type incompatible feature bit must not be set".into()),
            1 => Err("qcow2: Compression type incompatible feature bit must be set".into()),
            other => Err(format!("qcow2: unknown compression type: {other}")),
        }
    }

    /// Refuse, before anything is written, the incompatible features the driver cannot
    /// serve yet: a refused open must leave the image (and its bitmaps) as it was.
    pub fn check_supported(&self) -> Result<(), String> {
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_EXTERNAL_DATA
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTENDED_L2;
        let unknown = self.incompatible & !known;
        if unknown != 0 {
            return Err(format!(
                "Unsupported qcow2 feature(s): Unknown incompatible feature: {unknown:x}"
            ));
        }
        Ok(())
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The corrupt bit (incompatible bit 1): the image may only be opened read-only.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible & INCOMPAT_CORRUPT != 0
    }

    /// Set the corrupt bit, as `mod.rs` does on disk.
    pub(super) fn mark_corrupt(&mut self) {
        self.incompatible |= INCOMPAT_CORRUPT;
    }

    /// The bitmaps extension, when the autoclear bit says a bitmap-aware program wrote it
    /// last (otherwise its bitmaps cannot be trusted and are ignored, as QEMU does).
    pub fn consistent_bitmaps(&self) -> Option<&BitmapsExt> {
        self.bitmaps
            .as_ref()
            .filter(|_| self.autoclear & AUTOCLEAR_BITMAPS != 0)
    }

    /// The dirty bit (incompatible bit 0): refcounts may be wrong, as a lazy-refcounts
    /// writer did not close the image. QMP `dirty-flag`.
    pub fn is_dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }

    /// Guest data lives in an external data file (incompatible bit 2), at the same offsets
    /// as in the disk.
    pub fn has_data_file(&self) -> bool {
        self.incompatible & INCOMPAT_EXTERNAL_DATA != 0
    }

    /// The external data file is kept a raw image of the disk (autoclear bit 1).
    pub fn data_file_raw(&self) -> bool {
        self.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    /// ImageInfoSpecificQCow2 as QEMU reports it.
    pub fn format_specific(&self) -> Value {
        let compression =
            if self.incompatible & INCOMPAT_COMPRESSION != 0 && self.compression_type == 1 {
                "zstd"
            } else {
                "zlib"
            };
        if self.version == 2 {
            return json!({
                "compat": "0.10",
                "compression-type": compression,
                "refcount-bits": 1u64 << self.refcount_order,
            });
        }
        let mut specific = json!({
            "compat": "1.1",
            "compression-type": compression,
            "lazy-refcounts": self.compatible & COMPAT_LAZY_REFCOUNTS != 0,
            "refcount-bits": 1u64 << self.refcount_order,
        });
        let fields = specific.as_object_mut().expect("an object");
        if let Some(name) = &self.data_file {
            fields.insert("data-file".into(), json!(name));
        }
        if self.has_data_file() {
            fields.insert("data-file-raw".into(), json!(self.data_file_raw()));
        }
        fields.insert(
            "corrupt".into(),
            json!(self.incompatible & INCOMPAT_CORRUPT != 0),
        );
        fields.insert(
            "extended-l2".into(),
            json!(self.incompatible & INCOMPAT_EXTENDED_L2 != 0),
        );
        specific
    }
}

/// The first cluster of an image with its backing file name and backing-format extension
/// replaced: the header fields stay, every other extension is kept in its order (a backing
/// format, when given, goes first as QEMU writes it), then the end marker and the name.
/// `cluster` is the whole first cluster as it is on disk; the result has the same length.
/// `Some("")` keeps an empty name and a format, as QEMU does for an empty `backing-file`.
pub fn with_backing(
    cluster: &[u8],
    file: Option<&str>,
    format: Option<&str>,
) -> io::Result<Vec<u8>> {
    if file.is_some_and(|f| f.len() > MAX_BACKING_NAME) || (file.is_none() && format.is_some()) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    rebuild(cluster, Some((file, format)), None)
}

/// The first cluster with the bitmaps extension replaced (None: removed) and the bitmaps
/// autoclear bit set to match; the backing file name and every other extension stay.
pub fn with_bitmaps_extension(cluster: &[u8], ext: Option<&BitmapsExt>) -> io::Result<Vec<u8>> {
    let data = ext.map(BitmapsExt::to_bytes);
    let mut out = rebuild(
        cluster,
        None,
        Some((EXT_BITMAPS, data.as_ref().map(|d| &d[..]))),
    )?;
    if be32(&out, 4) < 3 {
        return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
    }
    let mut autoclear = be64(&out, 88);
    if ext.is_some() {
        autoclear |= AUTOCLEAR_BITMAPS;
    } else {
        autoclear &= !AUTOCLEAR_BITMAPS;
    }
    out[88..96].copy_from_slice(&autoclear.to_be_bytes());
    Ok(out)
}

/// Rebuild the first cluster. `backing`: the new name and format (None keeps the ones on
/// disk); `replace`: an extension type whose data is replaced (None data: removed).
fn rebuild(
    cluster: &[u8],
    backing: Option<(Option<&str>, Option<&str>)>,
    replace: Option<(u32, Option<&[u8]>)>,
) -> io::Result<Vec<u8>> {
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    if cluster.len() < 104 || &cluster[0..4] != MAGIC {
        return Err(einval());
    }
    let header_length = match be32(cluster, 4) {
        2 => 72,
        3 => be32(cluster, 100) as usize,
        _ => return Err(einval()),
    };
    let old_name_offset = be64(cluster, 8) as usize;
    let old_name_len = be32(cluster, 16) as usize;
    let ext_limit = if old_name_offset != 0 && old_name_offset < cluster.len() {
        old_name_offset
    } else {
        cluster.len()
    };
    if header_length < 72 || header_length > ext_limit {
        return Err(einval());
    }

    let mut extensions = Vec::new();
    let mut old_format = None;
    let mut at = header_length;
    while at + 8 <= ext_limit {
        let kind = be32(cluster, at);
        let len = be32(cluster, at + 4) as usize;
        if kind == EXT_END {
            break;
        }
        let data = cluster.get(at + 8..at + 8 + len).ok_or_else(einval)?;
        if kind == EXT_BACKING_FORMAT {
            old_format = Some(data);
        } else if replace.is_none_or(|(replaced, _)| replaced != kind) {
            extensions.push((kind, data));
        }
        at += 8 + len.next_multiple_of(8);
    }
    if let Some((kind, Some(data))) = replace {
        extensions.push((kind, data));
    }
    let (name, format) = match backing {
        Some((file, format)) => (file.map(str::as_bytes), format.map(str::as_bytes)),
        None if old_name_offset != 0 => {
            let name = cluster
                .get(old_name_offset..old_name_offset + old_name_len)
                .ok_or_else(einval)?;
            (Some(name), old_format)
        }
        None => (None, None),
    };

    let mut out = cluster[..header_length].to_vec();
    out.resize(header_length.next_multiple_of(8), 0);
    if let (Some(_), Some(format)) = (name, format) {
        push_extension(&mut out, EXT_BACKING_FORMAT, format);
    }
    for (kind, data) in extensions {
        push_extension(&mut out, kind, data);
    }
    out.extend_from_slice(&[0u8; 8]);

    let (name_offset, name_len) = match name {
        Some(name) => {
            let offset = out.len() as u64;
            out.extend_from_slice(name);
            (offset, name.len() as u32)
        }
        None => (0, 0),
    };
    if out.len() > cluster.len() {
        return Err(io::Error::from_raw_os_error(libc::ENOSPC));
    }
    out[8..16].copy_from_slice(&name_offset.to_be_bytes());
    out[16..20].copy_from_slice(&name_len.to_be_bytes());
    out.resize(cluster.len(), 0);
    Ok(out)
}

fn push_extension(out: &mut Vec<u8>, kind: u32, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(8), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3_header(backing: Option<(&str, &str)>) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        buf[0..4].copy_from_slice(MAGIC);
        buf[4..8].copy_from_slice(&3u32.to_be_bytes());
        buf[20..24].copy_from_slice(&16u32.to_be_bytes());
        buf[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        buf[96..100].copy_from_slice(&4u32.to_be_bytes());
        buf[100..104].copy_from_slice(&112u32.to_be_bytes());
        if let Some((name, format)) = backing {
            buf[112..116].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
            buf[116..120].copy_from_slice(&(format.len() as u32).to_be_bytes());
            buf[120..120 + format.len()].copy_from_slice(format.as_bytes());
            buf[8..16].copy_from_slice(&512u64.to_be_bytes());
            buf[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            buf[512..512 + name.len()].copy_from_slice(name.as_bytes());
        }
        buf
    }

    /// Found by the qcow2_header fuzz target: 1 << refcount_order overflowed in the
    /// report of an image that claims 2^64-bit refcounts.
    #[test]
    fn refcount_order_is_bounded() {
        let mut buf = v3_header(None);
        buf[96..100].copy_from_slice(&64u32.to_be_bytes());
        assert_eq!(
            Qcow2Header::parse(&buf).unwrap_err(),
            "Reference count entry width too large; may not exceed 64 bits"
        );
        buf[96..100].copy_from_slice(&6u32.to_be_bytes());
        let header = Qcow2Header::parse(&buf).unwrap();
        assert_eq!(header.format_specific()["refcount-bits"], 64);
    }

    #[test]
    fn compression_type_and_its_bit_agree_as_qemu_requires() {
        let mut buf = v3_header(None);
        let incompatible = |buf: &mut Vec<u8>, bits: u64| {
            buf[72..80].copy_from_slice(&bits.to_be_bytes());
        };
        buf[104] = 1;
        assert_eq!(
            Qcow2Header::parse(&buf).unwrap_err(),
            "qcow2: Compression type incompatible feature bit must be set"
        );
        incompatible(&mut buf, INCOMPAT_COMPRESSION);
        let header = Qcow2Header::parse(&buf).unwrap();
        assert_eq!(header.format_specific()["compression-type"], "zstd");
        buf[104] = 0;
        assert_eq!(
            Qcow2Header::parse(&buf).unwrap_err(),
            "qcow2: Compression type incompatible feature bit must not be set"
        );
        buf[104] = 7;
        assert_eq!(
            Qcow2Header::parse(&buf).unwrap_err(),
            "qcow2: unknown compression type: 7"
        );
    }

    #[test]
    fn parses_backing_and_format() {
        let header = Qcow2Header::parse(&v3_header(Some(("base.qcow2", "qcow2")))).unwrap();
        assert_eq!(header.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(header.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(header.cluster_size(), 65536);
        assert_eq!(header.size, 1 << 30);
        assert_eq!(header.format_specific()["refcount-bits"], 16);
    }

    #[test]
    fn refuses_garbage_and_truncation() {
        assert_eq!(
            Qcow2Header::parse(b"not an image at all, not at all, no"),
            Err("Image is not in qcow2 format".to_string())
        );
        let header = v3_header(None);
        assert!(Qcow2Header::parse(&header[..80]).is_err());
        let mut bad_cluster = header.clone();
        bad_cluster[20..24].copy_from_slice(&40u32.to_be_bytes());
        assert!(Qcow2Header::parse(&bad_cluster).is_err());
        let mut bad_ext = header;
        bad_ext[112..116].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        bad_ext[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Qcow2Header::parse(&bad_ext).is_err());
    }

    #[test]
    fn backing_rewrite_keeps_other_extensions() {
        let mut cluster = v3_header(Some(("base.qcow2", "raw")));
        cluster.truncate(4096);
        // An unknown extension after the backing format must survive, byte for byte.
        let unknown_at = 120 + 8;
        cluster[unknown_at..unknown_at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        cluster[unknown_at + 4..unknown_at + 8].copy_from_slice(&3u32.to_be_bytes());
        cluster[unknown_at + 8..unknown_at + 11].copy_from_slice(b"xyz");

        let new = with_backing(&cluster, Some("other/new.img"), Some("qcow2")).unwrap();
        assert_eq!(new.len(), cluster.len());
        let header = Qcow2Header::parse(&new).unwrap();
        assert_eq!(header.backing_file.as_deref(), Some("other/new.img"));
        assert_eq!(header.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(&new[0..8], &cluster[0..8]);
        assert_eq!(&new[20..112], &cluster[20..112]);
        let unknown = new
            .windows(4)
            .position(|w| w == 0x1234_5678u32.to_be_bytes())
            .unwrap();
        assert_eq!(&new[unknown + 8..unknown + 11], b"xyz");

        let removed = with_backing(&new, None, None).unwrap();
        let header = Qcow2Header::parse(&removed).unwrap();
        assert_eq!(header.backing_file, None);
        assert_eq!(header.backing_format, None);
        assert_eq!(&removed[8..20], &[0u8; 12]);
        assert!(removed
            .windows(4)
            .any(|w| w == 0x1234_5678u32.to_be_bytes()));
    }

    #[test]
    fn bitmaps_extension_is_replaced_with_the_autoclear_bit() {
        let cluster = v3_header(Some(("base.qcow2", "qcow2")));
        let ext = BitmapsExt {
            nb_bitmaps: 2,
            directory_size: 80,
            directory_offset: 0x30000,
        };
        let with = with_bitmaps_extension(&cluster, Some(&ext)).unwrap();
        let header = Qcow2Header::parse(&with).unwrap();
        assert_eq!(header.consistent_bitmaps(), Some(&ext));
        assert_eq!(header.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(header.backing_format.as_deref(), Some("qcow2"));
        let without = with_bitmaps_extension(&with, None).unwrap();
        let header = Qcow2Header::parse(&without).unwrap();
        assert_eq!(header.bitmaps, None);
        assert_eq!(header.autoclear, 0);
        assert_eq!(header.backing_file.as_deref(), Some("base.qcow2"));
        let mut v2 = cluster.clone();
        v2[4..8].copy_from_slice(&2u32.to_be_bytes());
        assert!(with_bitmaps_extension(&v2, Some(&ext)).is_err());
    }

    #[test]
    fn backing_rewrite_refuses_what_does_not_fit() {
        let cluster = v3_header(None);
        let long = "a".repeat(1024);
        let err = with_backing(&cluster, Some(&long), None).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        let err = with_backing(&cluster, None, Some("qcow2")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        let small = &cluster[..160];
        let err = with_backing(small, Some(&"b".repeat(100)), Some("qcow2")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        let fits = with_backing(small, Some("b"), Some("raw")).unwrap();
        assert_eq!(
            Qcow2Header::parse(&fits).unwrap().backing_file.as_deref(),
            Some("b")
        );
    }
}
