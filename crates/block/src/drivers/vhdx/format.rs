//! The VHDX on-disk structures (MS-VHDX): the two headers, the region table, the
//! metadata table and its items, BAT entries, and the log's entries. Pure functions of
//! bytes, shared by the driver, image creation and the fuzz target. Integers are
//! little-endian; GUIDs are compared as their 16 on-disk bytes.

use crate::drivers::fields::{le32, le64};

/// A kibibyte.
pub const KIB: u64 = 1024;
/// A mebibyte: the format aligns regions and blocks to it.
pub const MIB: u64 = 1024 * KIB;
/// The first 8 bytes of every VHDX file.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Where the two headers are.
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
/// Bytes of a header its checksum covers.
pub const HEADER_LEN: usize = 4096;
/// Where the region table and its copy are.
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
/// Bytes of a region table its checksum covers.
pub const REGION_TABLE_LEN: usize = 64 * KIB as usize;
/// Bytes of the metadata table at the start of its region.
pub const METADATA_TABLE_LEN: usize = 64 * KIB as usize;
/// The largest disk the format allows.
pub const MAX_SIZE: u64 = 64 << 40;

/// A GUID as its on-disk bytes.
pub type Guid = [u8; 16];

/// The region of the BAT.
pub const BAT_REGION: Guid = guid(
    0x2DC27766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
/// The region of the metadata.
pub const METADATA_REGION: Guid = guid(
    0x8B7CA206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
/// Metadata item: block size and flags.
pub const FILE_PARAMETERS: Guid = guid(
    0xCAA16737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
/// Metadata item: the disk size in bytes.
pub const VIRTUAL_DISK_SIZE: Guid = guid(
    0x2FA54224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
/// Metadata item: the disk's GUID.
pub const VIRTUAL_DISK_ID: Guid = guid(
    0xBECA12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
/// Metadata item: the guest's sector size.
pub const LOGICAL_SECTOR_SIZE: Guid = guid(
    0x8141BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
/// Metadata item: the sector size reported as physical.
pub const PHYSICAL_SECTOR_SIZE: Guid = guid(
    0xCDA348C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
/// Metadata item: where a differencing image's parent is.
pub const PARENT_LOCATOR: Guid = guid(
    0xA8D35F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);

/// A GUID's on-disk (mixed-endian) bytes from its textual fields.
const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

fn guid_at(buf: &[u8], at: usize) -> Guid {
    buf[at..at + 16].try_into().expect("16 bytes")
}

/// CRC-32C of `buf` with its 4-byte checksum field at `at` taken as zero.
pub fn checksum(buf: &[u8], at: usize) -> u32 {
    let crc = crc32c::crc32c(&buf[..at]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &buf[at + 4..])
}

/// Write the checksum of `buf` into its field at `at`.
pub fn seal(buf: &mut [u8], at: usize) {
    let crc = checksum(buf, at);
    buf[at..at + 4].copy_from_slice(&crc.to_le_bytes());
}

/// One of the two headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Which header is newer.
    pub sequence: u64,
    /// Changed before the first change of a session.
    pub file_write_guid: Guid,
    /// Changed before the first data write of a session.
    pub data_write_guid: Guid,
    /// Non-zero: the log holds entries that must be replayed.
    pub log_guid: Guid,
    /// Must be 0.
    pub log_version: u16,
    /// Bytes of the log.
    pub log_length: u32,
    /// Where the log is.
    pub log_offset: u64,
}

impl Header {
    /// A header whose signature, checksum and version are right; None otherwise.
    pub fn parse(buf: &[u8]) -> Option<Header> {
        if buf.len() < HEADER_LEN || &buf[..4] != b"head" {
            return None;
        }
        let buf = &buf[..HEADER_LEN];
        if checksum(buf, 4) != le32(buf, 4) || u16::from_le_bytes([buf[66], buf[67]]) != 1 {
            return None;
        }
        Some(Header {
            sequence: le64(buf, 8),
            file_write_guid: guid_at(buf, 16),
            data_write_guid: guid_at(buf, 32),
            log_guid: guid_at(buf, 48),
            log_version: u16::from_le_bytes([buf[64], buf[65]]),
            log_length: le32(buf, 68),
            log_offset: le64(buf, 72),
        })
    }

    /// The header as written, checksum included.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..4].copy_from_slice(b"head");
        b[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid);
        b[32..48].copy_from_slice(&self.data_write_guid);
        b[48..64].copy_from_slice(&self.log_guid);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&1u16.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        seal(&mut b, 4);
        b
    }
}

/// The current header of the two: the valid one, or the valid one with the greater
/// sequence number; and which slot it is in.
pub fn current_header(first: &[u8], second: &[u8]) -> Option<(usize, Header)> {
    match (Header::parse(first), Header::parse(second)) {
        (Some(a), Some(b)) if b.sequence > a.sequence => Some((1, b)),
        (Some(a), _) => Some((0, a)),
        (None, Some(b)) => Some((1, b)),
        (None, None) => None,
    }
}

/// Where the BAT and the metadata are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Regions {
    /// Offset and length of the BAT.
    pub bat: (u64, u64),
    /// Offset and length of the metadata.
    pub metadata: (u64, u64),
}

/// Why an image is refused: QEMU's errno (`Invalid argument`, `Operation not supported`)
/// and what blockd found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// QEMU's errno for the case.
    pub errno: i32,
    /// What blockd found.
    pub why: String,
}

fn invalid(why: impl Into<String>) -> Refusal {
    Refusal {
        errno: libc::EINVAL,
        why: why.into(),
    }
}

fn unsupported(why: impl Into<String>) -> Refusal {
    Refusal {
        errno: libc::ENOTSUP,
        why: why.into(),
    }
}

/// The region table's BAT and metadata regions; an unknown region marked required is
/// refused.
pub fn parse_regions(buf: &[u8]) -> Result<Regions, Refusal> {
    if buf.len() < REGION_TABLE_LEN || &buf[..4] != b"regi" {
        return Err(invalid("the region table has no signature"));
    }
    let buf = &buf[..REGION_TABLE_LEN];
    if checksum(buf, 4) != le32(buf, 4) {
        return Err(invalid("the region table's checksum is wrong"));
    }
    let count = le32(buf, 8) as usize;
    if count > 2047 {
        return Err(invalid("the region table has more than 2047 entries"));
    }
    let (mut bat, mut metadata) = (None, None);
    for i in 0..count {
        let e = &buf[16 + i * 32..16 + (i + 1) * 32];
        let region = (le64(e, 16), le32(e, 24) as u64);
        if !region.0.is_multiple_of(MIB) || !region.1.is_multiple_of(MIB) || region.0 < MIB {
            return Err(invalid("a region is not aligned to 1 MiB"));
        }
        match guid_at(e, 0) {
            BAT_REGION => bat = Some(region),
            METADATA_REGION => metadata = Some(region),
            _ if le32(e, 28) & 1 != 0 => return Err(unsupported("an unknown region is required")),
            _ => {}
        }
    }
    match (bat, metadata) {
        (Some(bat), Some(metadata)) => Ok(Regions { bat, metadata }),
        _ => Err(invalid("the BAT or metadata region is missing")),
    }
}

/// What the metadata says about the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// Bytes per payload block.
    pub block_size: u64,
    /// A fixed image: blocks stay allocated.
    pub leave_blocks_allocated: bool,
    /// A differencing image's parent locator.
    pub parent: Option<ParentLocator>,
    /// The disk size in bytes.
    pub disk_size: u64,
    /// 512 or 4096.
    pub logical_sector: u64,
    /// As the image says.
    pub physical_sector: u64,
}

/// The metadata table (`table`, its first 64 KiB) and its items, read through `item`
/// (offset in the region, length) from the rest of the region.
pub fn parse_metadata(
    table: &[u8],
    item: impl Fn(u64, usize) -> Option<Vec<u8>>,
) -> Result<Metadata, Refusal> {
    if table.len() < METADATA_TABLE_LEN || &table[..8] != b"metadata" {
        return Err(invalid("the metadata table has no signature"));
    }
    let count = u16::from_le_bytes([table[10], table[11]]) as usize;
    if count > 2047 {
        return Err(invalid("the metadata table has more than 2047 entries"));
    }
    let mut found: [Option<Vec<u8>>; 6] = Default::default();
    let known = [
        FILE_PARAMETERS,
        VIRTUAL_DISK_SIZE,
        VIRTUAL_DISK_ID,
        LOGICAL_SECTOR_SIZE,
        PHYSICAL_SECTOR_SIZE,
        PARENT_LOCATOR,
    ];
    let wants = [8usize, 8, 16, 4, 4, 0];
    for i in 0..count {
        let e = &table[32 + i * 32..32 + (i + 1) * 32];
        let (offset, len, flags) = (le32(e, 16) as u64, le32(e, 20) as usize, le32(e, 24));
        match known.iter().position(|g| *g == guid_at(e, 0)) {
            Some(k) => {
                if len > MIB as usize || (wants[k] != 0 && len != wants[k]) {
                    return Err(invalid("a metadata item has the wrong length"));
                }
                let bytes = item(offset, len)
                    .ok_or_else(|| invalid("a metadata item lies outside its region"))?;
                found[k] = Some(bytes);
            }
            None if flags & 4 != 0 => {
                return Err(unsupported("an unknown metadata item is required"))
            }
            None => {}
        }
    }
    let [Some(params), Some(size), Some(_), Some(logical), Some(physical), locator] = found else {
        return Err(unsupported("a required metadata item is missing"));
    };
    let block_size = le32(&params, 0) as u64;
    if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
        return Err(invalid(format!(
            "the block size {block_size} is not a power of two from 1 MiB to 256 MiB"
        )));
    }
    let flags = le32(&params, 4);
    let logical_sector = le32(&logical, 0) as u64;
    if logical_sector != 512 && logical_sector != 4096 {
        return Err(unsupported(format!(
            "the logical sector size {logical_sector} is neither 512 nor 4096"
        )));
    }
    let parent = match (flags & 2 != 0, locator) {
        (false, _) => None,
        (true, None) => return Err(invalid("a differencing image has no parent locator")),
        (true, Some(locator)) => Some(ParentLocator::parse(&locator)?),
    };
    let disk_size = le64(&size, 0);
    if disk_size > MAX_SIZE {
        return Err(invalid("the disk is larger than 64 TiB"));
    }
    Ok(Metadata {
        block_size,
        leave_blocks_allocated: flags & 1 != 0,
        parent,
        disk_size,
        logical_sector,
        physical_sector: le32(&physical, 0) as u64,
    })
}

impl Metadata {
    /// Payload blocks per sector bitmap block.
    pub fn chunk_ratio(&self) -> u64 {
        (1 << 23) * self.logical_sector / self.block_size
    }

    /// Payload blocks the disk needs.
    pub fn payload_blocks(&self) -> u64 {
        self.disk_size.div_ceil(self.block_size)
    }

    /// BAT entries: payload entries with a sector bitmap entry after every chunk.
    pub fn bat_entries(&self) -> u64 {
        let blocks = self.payload_blocks();
        if self.parent.is_some() {
            blocks.div_ceil(self.chunk_ratio()) * (self.chunk_ratio() + 1)
        } else if blocks == 0 {
            0
        } else {
            blocks + (blocks - 1) / self.chunk_ratio()
        }
    }

    /// The BAT index of payload block `block`.
    pub fn bat_index(&self, block: u64) -> usize {
        (block + block / self.chunk_ratio()) as usize
    }

    /// The BAT index of the sector bitmap block for payload block `block`'s chunk.
    pub fn bitmap_index(&self, block: u64) -> usize {
        let ratio = self.chunk_ratio();
        ((block / ratio) * (ratio + 1) + ratio) as usize
    }
}

/// The parent locator type of VHDX parents, the one type the format defines.
pub const VHDX_PARENT_LOCATOR: Guid = guid(
    0xB04AEFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// Where a differencing image's parent is: the locator's keys and values (UTF-16 in the
/// file), among them `parent_linkage` (the parent's data write GUID when the child was
/// made) and the paths `relative_path`, `volume_path` and `absolute_win32_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLocator {
    /// The keys and values, in the locator's order.
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// The locator item: a 20-byte header (type GUID, key-value count) and 12-byte
    /// entries whose key and value offsets are relative to the item.
    pub fn parse(item: &[u8]) -> Result<ParentLocator, Refusal> {
        if item.len() < 20 {
            return Err(invalid("the parent locator is cut short"));
        }
        if guid_at(item, 0) != VHDX_PARENT_LOCATOR {
            return Err(unsupported("the parent locator is of an unknown type"));
        }
        let count = u16::from_le_bytes([item[18], item[19]]) as usize;
        if 20 + count * 12 > item.len() {
            return Err(invalid("the parent locator's entries lie past its end"));
        }
        let text = |offset: u32, len: u16| {
            let (start, len) = (offset as usize, len as usize);
            let bytes = item
                .get(start..start.saturating_add(len))
                .filter(|b| b.len() % 2 == 0)
                .ok_or_else(|| invalid("a parent locator entry lies outside the locator"))?;
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).map_err(|_| invalid("a parent locator entry is not UTF-16"))
        };
        let entries = item[20..20 + count * 12]
            .chunks_exact(12)
            .map(|e| {
                let key = text(le32(e, 0), u16::from_le_bytes([e[8], e[9]]))?;
                let value = text(le32(e, 4), u16::from_le_bytes([e[10], e[11]]))?;
                Ok((key, value))
            })
            .collect::<Result<Vec<_>, Refusal>>()?;
        Ok(ParentLocator { entries })
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The parent's path as the locator gives it, relative first (Hyper-V's order when
    /// the child moves with its parent), with Windows separators made `/`.
    pub fn path(&self) -> Option<String> {
        ["relative_path", "absolute_win32_path"]
            .iter()
            .find_map(|k| self.get(k))
            .map(|p| {
                let p = p.replace('\\', "/");
                p.strip_prefix("./").map(str::to_string).unwrap_or(p)
            })
    }
}

/// A GUID as text, as parent_linkage holds it: `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}`.
pub fn guid_text(g: &Guid) -> String {
    let d1 = u32::from_le_bytes([g[0], g[1], g[2], g[3]]);
    let d2 = u16::from_le_bytes([g[4], g[5]]);
    let d3 = u16::from_le_bytes([g[6], g[7]]);
    let hex: String = g[8..].iter().map(|b| format!("{b:02X}")).collect();
    format!("{{{d1:08X}-{d2:04X}-{d3:04X}-{}-{}}}", &hex[..4], &hex[4..])
}

/// Sector bitmap block state: the block is in the file.
pub const BITMAP_PRESENT: u64 = 6;
/// Payload block states.
pub const BLOCK_NOT_PRESENT: u64 = 0;
/// Content undefined (read as zeroes).
pub const BLOCK_UNDEFINED: u64 = 1;
/// Reads as zeroes.
pub const BLOCK_ZERO: u64 = 2;
/// Discarded (read as zeroes).
pub const BLOCK_UNMAPPED: u64 = 3;
/// Data in the file.
pub const BLOCK_FULLY_PRESENT: u64 = 6;
/// Differencing only: a sector bitmap says which sectors are here.
pub const BLOCK_PARTIALLY_PRESENT: u64 = 7;

/// A BAT entry: its state and its block's offset in the file.
pub fn bat_entry(raw: u64) -> (u64, u64) {
    (raw & 7, raw & !(MIB - 1))
}

/// One log entry: where its 4 KiB sectors are written, and the file sizes it records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Which header is newer.
    pub sequence: u64,
    /// Bytes the entry takes in the log.
    pub length: u64,
    /// The file size known durable when it was written.
    pub flushed_file_offset: u64,
    /// The file size that holds everything it names.
    pub last_file_offset: u64,
    /// (file offset, 4096 bytes or None for a run of zeroes of the given length).
    pub writes: Vec<(u64, LogWrite)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
/// What one log descriptor writes.
pub enum LogWrite {
    /// A 4 KiB sector.
    Data(Vec<u8>),
    /// This many bytes of zeroes.
    Zero(u64),
}

/// The entry starting at `at` of the circular `log`, if it is whole and valid for
/// `log_guid`: signature, lengths, descriptors, data sectors and checksum.
pub fn log_entry(log: &[u8], at: usize, log_guid: &Guid) -> Option<LogEntry> {
    let len = log.len();
    if len == 0 || !at.is_multiple_of(4096) || at >= len {
        return None;
    }
    // The entry may wrap around the end of the log.
    let head =
        |off: usize, n: usize| -> Vec<u8> { (0..n).map(|i| log[(at + off + i) % len]).collect() };
    let first = head(0, 4096);
    if &first[..4] != b"loge" {
        return None;
    }
    let length = le32(&first, 8) as usize;
    let sequence = le64(&first, 16);
    let descriptors = le32(&first, 24) as usize;
    if length == 0
        || !length.is_multiple_of(4096)
        || length > len
        || sequence == 0
        || &guid_at(&first, 32) != log_guid
    {
        return None;
    }
    if descriptors.checked_mul(32)? > length {
        return None;
    }
    let entry = head(0, length);
    if checksum(&entry, 4) != le32(&entry, 4) {
        return None;
    }
    let descriptor_sectors = (descriptors + 2).div_ceil(128);
    let mut data_sector = descriptor_sectors;
    let mut writes = Vec::new();
    for i in 0..descriptors {
        let d = &entry[64 + i * 32..96 + i * 32];
        let file_offset = le64(d, 16);
        if le64(d, 24) != sequence || !file_offset.is_multiple_of(4096) {
            return None;
        }
        match &d[..4] {
            b"zero" => {
                let zero_len = le64(d, 8);
                if !zero_len.is_multiple_of(4096) {
                    return None;
                }
                writes.push((file_offset, LogWrite::Zero(zero_len)));
            }
            b"desc" => {
                let s = entry.get(data_sector * 4096..(data_sector + 1) * 4096)?;
                let seq = (le32(s, 4) as u64) << 32 | le32(s, 4092) as u64;
                if &s[..4] != b"data" || seq != sequence {
                    return None;
                }
                let mut sector = Vec::with_capacity(4096);
                sector.extend_from_slice(&d[8..16]);
                sector.extend_from_slice(&s[8..4092]);
                sector.extend_from_slice(&d[4..8]);
                writes.push((file_offset, LogWrite::Data(sector)));
                data_sector += 1;
            }
            _ => return None,
        }
    }
    Some(LogEntry {
        sequence,
        length: length as u64,
        flushed_file_offset: le64(&first, 48),
        last_file_offset: le64(&first, 56),
        writes,
    })
}

/// The active sequence of the log: from every valid entry, the run of entries that follow
/// it with sequence numbers one apart; the run ending at the highest sequence number.
pub fn active_sequence(log: &[u8], log_guid: &Guid) -> Vec<LogEntry> {
    let mut best: Vec<LogEntry> = Vec::new();
    // An entry inside a run found already starts only a tail of that run.
    let mut seen = vec![false; log.len() / 4096];
    for at in (0..log.len()).step_by(4096) {
        if seen[at / 4096] {
            continue;
        }
        let Some(first) = log_entry(log, at, log_guid) else {
            continue;
        };
        let mut run = vec![first];
        let mut next = at;
        loop {
            seen[next / 4096] = true;
            let last = run.last().expect("one entry");
            next = (next + last.length as usize) % log.len();
            if run.len() * 4096 > log.len() {
                break;
            }
            match log_entry(log, next, log_guid) {
                Some(e) if e.sequence == last.sequence + 1 => run.push(e),
                _ => break,
            }
        }
        let head = run.last().map(|e| e.sequence);
        if head > best.last().map(|e| e.sequence) {
            best = run;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_are_stored_mixed_endian() {
        assert_eq!(
            BAT_REGION,
            [
                0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
                0x4a, 0x08
            ]
        );
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn headers_round_trip_and_the_newer_is_current() {
        let h = Header {
            sequence: 7,
            file_write_guid: [1; 16],
            data_write_guid: [2; 16],
            log_guid: [0; 16],
            log_version: 0,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        let a = h.to_bytes();
        let b = Header {
            sequence: 8,
            ..h.clone()
        }
        .to_bytes();
        assert_eq!(Header::parse(&a), Some(h.clone()));
        assert_eq!(
            current_header(&a, &b).map(|(slot, h)| (slot, h.sequence)),
            Some((1, 8))
        );
        let mut broken = b.clone();
        broken[100] ^= 1;
        assert_eq!(current_header(&a, &broken).map(|(slot, _)| slot), Some(0));
        assert_eq!(current_header(&broken, &broken), None);
    }

    #[test]
    fn a_parent_locator_gives_its_keys_and_path() {
        let utf16 = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(u16::to_le_bytes).collect() };
        let mut item = VHDX_PARENT_LOCATOR.to_vec();
        item.extend([0, 0, 2, 0]);
        let pairs = [
            ("parent_linkage", "{x}"),
            ("relative_path", ".\\dir\\base.vhdx"),
        ];
        let mut text = Vec::new();
        for (k, v) in pairs {
            let (k, v) = (utf16(k), utf16(v));
            let at = 20 + 24 + text.len();
            item.extend((at as u32).to_le_bytes());
            item.extend(((at + k.len()) as u32).to_le_bytes());
            item.extend((k.len() as u16).to_le_bytes());
            item.extend((v.len() as u16).to_le_bytes());
            text.extend(k);
            text.extend(v);
        }
        item.extend(text);
        let locator = ParentLocator::parse(&item).unwrap();
        assert_eq!(locator.get("parent_linkage"), Some("{x}"));
        assert_eq!(locator.path().as_deref(), Some("dir/base.vhdx"));
        let mut cut = item.clone();
        cut.truncate(item.len() - 1);
        assert!(ParentLocator::parse(&cut).is_err());
        assert_eq!(
            guid_text(&PARENT_LOCATOR),
            "{A8D35F2D-B30B-454D-ABF7-D3D84834AB0C}"
        );
    }

    #[test]
    fn bat_entries_interleave_sector_bitmaps() {
        let m = Metadata {
            block_size: 16 * MIB,
            leave_blocks_allocated: false,
            parent: None,
            disk_size: 5 << 30,
            logical_sector: 512,
            physical_sector: 512,
        };
        assert_eq!(
            (m.chunk_ratio(), m.bat_entries(), m.bat_index(256)),
            (256, 321, 257)
        );
        let diff = Metadata {
            parent: Some(ParentLocator { entries: vec![] }),
            disk_size: 64 * MIB,
            block_size: 8 * MIB,
            ..m
        };
        assert_eq!(diff.bat_entries(), 513);
    }

    #[test]
    fn log_entries_are_checked_and_give_their_writes() {
        let guid = [9u8; 16];
        let mut log = vec![0u8; 1 << 20];
        let mut entry = vec![0u8; 8192];
        entry[..4].copy_from_slice(b"loge");
        entry[8..12].copy_from_slice(&8192u32.to_le_bytes());
        entry[16..24].copy_from_slice(&5u64.to_le_bytes());
        entry[24..28].copy_from_slice(&1u32.to_le_bytes());
        entry[32..48].copy_from_slice(&guid);
        let d = &mut entry[64..96];
        d[..4].copy_from_slice(b"desc");
        d[4..8].copy_from_slice(&[0xee; 4]);
        d[8..16].copy_from_slice(&[0xaa; 8]);
        d[16..24].copy_from_slice(&(2 * MIB).to_le_bytes());
        d[24..32].copy_from_slice(&5u64.to_le_bytes());
        let s = &mut entry[4096..];
        s[..4].copy_from_slice(b"data");
        s[8..4092].fill(0x55);
        s[4092..].copy_from_slice(&5u32.to_le_bytes());
        seal(&mut entry, 4);
        // Wrapped around the end of the log.
        let at = log.len() - 4096;
        log[at..].copy_from_slice(&entry[..4096]);
        log[..4096].copy_from_slice(&entry[4096..]);
        let run = active_sequence(&log, &guid);
        assert_eq!(run.len(), 1);
        let LogWrite::Data(sector) = &run[0].writes[0].1 else {
            panic!("data")
        };
        assert_eq!(
            (&sector[..8], sector[8], &sector[4092..]),
            (&[0xaa; 8][..], 0x55, &[0xee; 4][..])
        );
        assert!(active_sequence(&log, &[1; 16]).is_empty());
        log[100] ^= 1;
        assert!(active_sequence(&log, &guid).is_empty());
    }
}
