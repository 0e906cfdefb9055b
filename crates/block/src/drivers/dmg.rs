//! `dmg`: Apple's UDIF disk images, read-only as in QEMU. A 512-byte "koly" trailer at the
//! end of the file points at the chunk tables ("mish" blocks), kept either in a binary
//! resource fork or base64-encoded in an XML property list. Each table maps runs of
//! 512-byte sectors to a chunk of the data fork: zeroes, raw bytes, or zlib or bzip2
//! compressed bytes. Sectors no chunk covers, and chunks of kinds blockd cannot read (ADC,
//! lzfse), read as EIO, as in QEMU.
//!
//! QEMU reads bzip2 and lzfse chunks only when its dmg-bz2 and dmg-lzfse modules are
//! installed; blockd reads bzip2 chunks always and lzfse never (no Debian tool writes or
//! reads them to test against).

use super::block_map::{could_not_open, read_metadata, read_zero_past_end};
use super::fields::{be32, be64};
use super::read_only::{open_file, ReadOnly, ReadOnlyImage};
use crate::node::Child;
use crate::open::{DriverEntry, Opener};
use crate::Driver;
use async_trait::async_trait;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use qapi::error::QmpError;
use serde_json::{Map, Value};
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

const SECTOR: u64 = 512;
/// The trailer's size, and the window at the end of the file QEMU searches for its magic:
/// a file's length used to be rounded up to whole sectors, so the trailer may start
/// anywhere in the last 511 bytes of the second-last sector or at the last sector.
const TRAILER: usize = 512;
const SEARCH: usize = 515;
/// QEMU's limits on one chunk: what it decompresses at once, and what it reads.
const MAX_CHUNK_SECTORS: u64 = 131072;
const MAX_CHUNK_LEN: u64 = 64 << 20;
/// The most of the file blockd reads for the chunk tables (an XML list of a large image
/// is a few MiB).
const MAX_TABLES: u64 = 64 << 20;
/// A mish block's header, and each of its chunk entries.
const MISH_HEADER: usize = 204;
const MISH_ENTRY: usize = 40;
/// Decompressed chunks kept for the reads that follow (sequential reads hit one chunk
/// many times); the latest is kept whatever its size.
const CACHE_BYTES: usize = 8 << 20;

/// What a chunk of the data fork holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// Zeroes, nothing stored ("zero fill" and "ignore" chunks).
    Zero,
    /// The sectors' bytes as they are.
    Raw,
    /// The sectors compressed.
    Compressed(Codec),
}

/// How a compressed chunk is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Zlib,
    Bzip2,
}

impl ChunkKind {
    /// The kind of a chunk entry's type, or None for those QEMU skips: comments and the
    /// terminator (`Some(None)`), and the kinds neither reads (`None`: ADC, lzfse, unknown).
    fn of(kind: u32) -> Option<Option<ChunkKind>> {
        Some(Some(match kind {
            0 | 2 => ChunkKind::Zero,
            1 => ChunkKind::Raw,
            0x8000_0005 => ChunkKind::Compressed(Codec::Zlib),
            0x8000_0006 => ChunkKind::Compressed(Codec::Bzip2),
            0x7fff_fffe | 0xffff_ffff => return Some(None),
            _ => return None,
        }))
    }
}

/// One run of sectors and where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub kind: ChunkKind,
    /// The first sector of the disk it holds.
    pub sector: u64,
    pub sectors: u64,
    /// Where its bytes start in the file, and how many there are.
    pub offset: u64,
    pub length: u64,
}

/// Why an image is refused: QEMU's own message, or what blockd found where QEMU says
/// only "Invalid argument".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Message(String),
    Invalid(String),
}

fn invalid(why: impl Into<String>) -> Refusal {
    Refusal::Invalid(why.into())
}

/// Where the chunk tables are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tables {
    /// A binary resource fork at this offset, of this length.
    ResourceFork(u64, u64),
    /// An XML property list at this offset, of this length.
    Xml(u64, u64),
}

impl Tables {
    /// Where the tables are in the file, and their length.
    pub fn region(self) -> (u64, u64) {
        match self {
            Tables::ResourceFork(offset, len) | Tables::Xml(offset, len) => (offset, len),
        }
    }
}

/// The trailer's fields blockd uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trailer {
    /// Where the data fork starts: chunk offsets are relative to it.
    pub data_fork: u64,
    pub tables: Tables,
    /// The disk's size in sectors.
    pub sectors: u64,
}

/// Where the trailer starts, from the `SEARCH` bytes of the file at `start` (zeroes past
/// its end): the first "koly" among them.
pub fn trailer_offset(window: &[u8], start: u64) -> Result<u64, Refusal> {
    window
        .windows(4)
        .take(SEARCH - 3)
        .position(|w| w == b"koly")
        .map(|i| start + i as u64)
        .ok_or_else(|| Refusal::Message("Could not locate UDIF trailer in dmg file".into()))
}

/// Where the trailer search starts in a file of `len` bytes. QEMU measures the file in
/// whole sectors, rounded up, and so does blockd: the same window finds the same "koly".
pub fn search_start(len: u64) -> Result<u64, Refusal> {
    if len == 0 {
        return Err(Refusal::Message(
            "dmg file must be at least 512 bytes long".into(),
        ));
    }
    let rounded = len.div_ceil(SECTOR).saturating_mul(SECTOR);
    Ok(rounded.saturating_sub((TRAILER + TRAILER - 1) as u64))
}

impl Trailer {
    /// The trailer's 512 bytes, found at `at`: every region it names must lie before it.
    pub fn parse(buf: &[u8], at: u64) -> Result<Trailer, Refusal> {
        if buf.len() < TRAILER {
            return Err(invalid("the trailer is cut short"));
        }
        let data_fork = be64(buf, 0x18);
        if data_fork > at {
            return Err(invalid(format!(
                "the data fork at {data_fork} starts after the trailer at {at}"
            )));
        }
        let region = |field: usize, what: &str| {
            let (offset, len) = (be64(buf, field), be64(buf, field + 8));
            if offset >= at || len > at - offset {
                return Err(invalid(format!(
                    "the {what} ({len} bytes at {offset}) does not lie before the trailer at {at}"
                )));
            }
            Ok((offset, len))
        };
        let rsrc = region(0x28, "resource fork")?;
        let xml = region(0xd8, "property list")?;
        let sectors = be64(buf, 0x1ec);
        if sectors > i64::MAX as u64 / SECTOR {
            return Err(invalid(format!("sector count {sectors} is too large")));
        }
        let tables = if rsrc.1 != 0 {
            Tables::ResourceFork(rsrc.0, rsrc.1)
        } else if xml.1 != 0 {
            Tables::Xml(xml.0, xml.1)
        } else {
            return Err(invalid("the trailer names no chunk tables"));
        };
        let (_, len) = tables.region();
        if len > MAX_TABLES {
            return Err(invalid(format!(
                "chunk tables of {len} bytes are larger than blockd reads ({MAX_TABLES})"
            )));
        }
        Ok(Trailer {
            data_fork,
            tables,
            sectors,
        })
    }
}

/// The chunks the tables hold (the bytes `self.tables` names), sorted by sector, and the
/// first chunk type seen that neither blockd nor QEMU reads.
pub fn chunks(trailer: &Trailer, tables: &[u8]) -> Result<(Vec<Chunk>, Option<u32>), Refusal> {
    let mut found = Found {
        chunks: Vec::new(),
        unknown: None,
        data_fork: trailer.data_fork,
    };
    match trailer.tables {
        Tables::ResourceFork(..) => resource_fork(tables, &mut found)?,
        Tables::Xml(..) => property_list(tables, &mut found)?,
    }
    found.chunks.sort_by_key(|c| c.sector);
    Ok((found.chunks, found.unknown))
}

struct Found {
    chunks: Vec<Chunk>,
    unknown: Option<u32>,
    data_fork: u64,
}

/// A resource fork: a header with the offset and length of its data, which is a list of
/// resources each led by its length; the mish blocks among them hold the chunks.
fn resource_fork(fork: &[u8], found: &mut Found) -> Result<(), Refusal> {
    if fork.len() < 12 {
        return Err(invalid("the resource fork is cut short"));
    }
    let (start, len) = (be32(fork, 0) as usize, be32(fork, 8) as usize);
    if start > fork.len() {
        return Err(invalid("the resource fork's data lies past its end"));
    }
    if len == 0 || len > fork.len() - start {
        return Err(invalid(format!(
            "the resource fork's data length {len} does not fit it"
        )));
    }
    let mut rest = &fork[start..start + len];
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(invalid("a resource's length is cut short"));
        }
        let size = be32(rest, 0) as usize;
        rest = &rest[4..];
        if size == 0 || size > rest.len() {
            return Err(invalid(format!(
                "a resource of {size} bytes does not fit the resource fork"
            )));
        }
        mish(&rest[..size], found)?;
        rest = &rest[size..];
    }
    Ok(())
}

/// An XML property list: every `<data>` element holds a base64-encoded resource.
fn property_list(xml: &[u8], found: &mut Found) -> Result<(), Refusal> {
    // glib's decoder, which QEMU uses, skips what is not in the alphabet: so does blockd.
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::RequireNone)
            .with_decode_allow_trailing_bits(true),
    );
    let mut rest = xml;
    while let Some(at) = find(rest, b"<data>") {
        rest = &rest[at + 6..];
        let end = find(rest, b"</data>")
            .ok_or_else(|| invalid("a <data> element of the property list is not closed"))?;
        let mut text: Vec<u8> = rest[..end]
            .iter()
            .copied()
            .filter(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
            .collect();
        if text.len() % 4 == 1 {
            text.pop();
        }
        let resource = LENIENT
            .decode(&text)
            .map_err(|e| invalid(format!("a <data> element is not base64: {e}")))?;
        mish(&resource, found)?;
        rest = &rest[end + 7..];
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One resource: a mish block adds its chunks; any other resource is skipped.
fn mish(block: &[u8], found: &mut Found) -> Result<(), Refusal> {
    if block.len() < MISH_HEADER + MISH_ENTRY || &block[..4] != b"mish" {
        return Ok(());
    }
    let first_sector = be64(block, 8);
    let data_start = be64(block, 0x18);
    for entry in block[MISH_HEADER..].chunks_exact(MISH_ENTRY) {
        let code = be32(entry, 0);
        let kind = match ChunkKind::of(code) {
            Some(Some(kind)) => kind,
            Some(None) => continue,
            None => {
                found.unknown.get_or_insert(code);
                continue;
            }
        };
        let index = found.chunks.len();
        let sectors = be64(entry, 0x10);
        if kind != ChunkKind::Zero && sectors > MAX_CHUNK_SECTORS {
            return Err(invalid(format!(
                "sector count {sectors} for chunk {index} is larger than max ({MAX_CHUNK_SECTORS})"
            )));
        }
        let length = be64(entry, 0x20);
        if length > MAX_CHUNK_LEN {
            return Err(invalid(format!(
                "length {length} for chunk {index} is larger than max ({MAX_CHUNK_LEN})"
            )));
        }
        found.chunks.push(Chunk {
            kind,
            sector: first_sector.saturating_add(be64(entry, 8)),
            sectors,
            offset: found
                .data_fork
                .saturating_add(data_start)
                .saturating_add(be64(entry, 0x18)),
            length,
        });
    }
    Ok(())
}

/// The trailer and chunks of a whole image held in memory (for the fuzz target; the
/// driver reads the same regions from its file).
pub fn parse_image(image: &[u8]) -> Result<(Trailer, Vec<Chunk>), Refusal> {
    let region = |offset: u64, len: usize| {
        let mut buf = vec![0u8; len];
        let start = (offset.min(image.len() as u64)) as usize;
        let n = (image.len() - start).min(len);
        buf[..n].copy_from_slice(&image[start..start + n]);
        buf
    };
    let start = search_start(image.len() as u64)?;
    let at = trailer_offset(&region(start, SEARCH), start)?;
    let trailer = Trailer::parse(&region(at, TRAILER), at)?;
    let (offset, len) = trailer.tables.region();
    let (chunks, _) = chunks(&trailer, &region(offset, len as usize))?;
    Ok((trailer, chunks))
}

pub struct Dmg {
    file: Arc<Child>,
    sectors: u64,
    chunks: Vec<Chunk>,
    /// Recently decompressed chunks by index, the latest last.
    cache: Mutex<VecDeque<(usize, Arc<Vec<u8>>)>>,
    decompressing: tokio::sync::Mutex<()>,
}

impl Dmg {
    /// The chunk that holds `sector`.
    fn chunk_of(&self, sector: u64) -> io::Result<usize> {
        let after = self.chunks.partition_point(|c| c.sector <= sector);
        match after.checked_sub(1) {
            Some(i) if sector - self.chunks[i].sector < self.chunks[i].sectors => Ok(i),
            _ => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }

    /// A compressed chunk's sectors, decompressed (off the I/O thread: a chunk may be
    /// 64 MiB).
    async fn inflated(&self, index: usize) -> io::Result<Arc<Vec<u8>>> {
        let cached = || {
            self.cache
                .lock()
                .expect("cache lock")
                .iter()
                .find(|(i, _)| *i == index)
                .map(|(_, data)| data.clone())
        };
        if let Some(data) = cached() {
            return Ok(data);
        }
        // One decompression at a time per image, as QEMU's lock does: a chunk's input and
        // output may be 64 MiB each, and the reads waiting here for the same chunk find it
        // in the cache instead of decompressing it again.
        let _one = self.decompressing.lock().await;
        if let Some(data) = cached() {
            return Ok(data);
        }
        let chunk = self.chunks[index].clone();
        let ChunkKind::Compressed(codec) = chunk.kind else {
            return Err(io::Error::other("dmg: only compressed chunks decompress"));
        };
        let mut input = vec![0u8; chunk.length as usize];
        read_zero_past_end(&self.file, chunk.offset, &mut input).await?;
        let data =
            crate::iothread::cpu_bound(move || decompress(codec, chunk.sectors, &input)).await??;
        let data = Arc::new(data);
        let mut cache = self.cache.lock().expect("cache lock");
        cache.push_back((index, data.clone()));
        while cache.len() > 1 && cache.iter().map(|(_, d)| d.len()).sum::<usize>() > CACHE_BYTES {
            cache.pop_front();
        }
        Ok(data)
    }
}

/// A compressed chunk's bytes, which must decompress to exactly its sectors.
fn decompress(codec: Codec, sectors: u64, input: &[u8]) -> io::Result<Vec<u8>> {
    let want = (sectors * SECTOR) as usize;
    let mut out = vec![0u8; want];
    let whole = match codec {
        Codec::Zlib => {
            let mut z = flate2::Decompress::new(true);
            let status = z.decompress(input, &mut out, flate2::FlushDecompress::Finish);
            matches!(status, Ok(flate2::Status::StreamEnd)) && z.total_out() == want as u64
        }
        Codec::Bzip2 => {
            let mut bz = bzip2::Decompress::new(false);
            let status = bz.decompress(input, &mut out);
            matches!(status, Ok(bzip2::Status::StreamEnd)) && bz.total_out() == want as u64
        }
    };
    if !whole {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(out)
}

#[async_trait(?Send)]
impl ReadOnlyImage for Dmg {
    const NAME: &'static str = "dmg";

    fn file(&self) -> &Arc<Child> {
        &self.file
    }

    fn size(&self) -> u64 {
        self.sectors * SECTOR
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = self.chunk_of(pos / SECTOR)?;
            let chunk = &self.chunks[index];
            let at = pos - chunk.sector * SECTOR;
            // Zero chunks may claim any number of sectors: saturate, never overflow.
            let bytes = chunk.sectors.saturating_mul(SECTOR);
            let n = (bytes - at).min((buf.len() - done) as u64) as usize;
            let out = &mut buf[done..done + n];
            match chunk.kind {
                ChunkKind::Zero => out.fill(0),
                ChunkKind::Raw => {
                    // Bytes past the chunk's length read as zeroes.
                    let stored = chunk.length.min(bytes).saturating_sub(at);
                    let stored = stored.min(n as u64) as usize;
                    let from = chunk.offset.saturating_add(at);
                    read_zero_past_end(&self.file, from, &mut out[..stored]).await?;
                    out[stored..].fill(0);
                }
                ChunkKind::Compressed(_) => {
                    let data = self.inflated(index).await?;
                    out.copy_from_slice(&data[at as usize..at as usize + n]);
                }
            }
            done += n;
        }
        Ok(())
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: true,
    // Read-only: nothing kept can go stale while another process reads the image too.
    hands_over: true,
    names: &["dmg"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let file = open_file(o, options).await?;
    let name = {
        let node = file.node();
        node.driver().info(&node).filename
    };
    let refused = |r: Refusal| match r {
        Refusal::Message(text) => QmpError::generic(text),
        Refusal::Invalid(why) => could_not_open(&name, libc::EINVAL, &why),
    };
    let start = search_start(file.node().size()).map_err(refused)?;
    let window = read_metadata(&file, start, SEARCH, "dmg trailer").await?;
    let at = trailer_offset(&window, start).map_err(refused)?;
    let buf = read_metadata(&file, at, TRAILER, "dmg trailer").await?;
    let trailer = Trailer::parse(&buf, at).map_err(refused)?;
    let (offset, len) = trailer.tables.region();
    let tables = read_metadata(&file, offset, len as usize, "dmg chunk tables").await?;
    let (chunks, unknown) = chunks(&trailer, &tables).map_err(refused)?;
    if let Some(code) = unknown {
        tracing::warn!(
            "Image contains chunks of unknown type {code:x}, accessing them will result in I/O errors"
        );
    }
    o.claim_position();
    Ok(Box::new(ReadOnly(Dmg {
        file,
        sectors: trailer.sectors,
        chunks,
        cache: Mutex::new(VecDeque::new()),
        decompressing: tokio::sync::Mutex::new(()),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: u32, sector: u64, sectors: u64, offset: u64, length: u64) -> Vec<u8> {
        let mut e = vec![0u8; MISH_ENTRY];
        e[..4].copy_from_slice(&kind.to_be_bytes());
        for (at, v) in [(8, sector), (0x10, sectors), (0x18, offset), (0x20, length)] {
            e[at..at + 8].copy_from_slice(&v.to_be_bytes());
        }
        e
    }

    fn mish_block(first: u64, entries: &[Vec<u8>]) -> Vec<u8> {
        let mut b = vec![0u8; MISH_HEADER];
        b[..4].copy_from_slice(b"mish");
        b[8..16].copy_from_slice(&first.to_be_bytes());
        b.extend(entries.concat());
        b
    }

    fn trailer(data_fork: u64) -> Trailer {
        Trailer {
            data_fork,
            tables: Tables::Xml(0, 1),
            sectors: 64,
        }
    }

    #[test]
    fn chunks_are_placed_after_the_first_sector_and_data_fork() {
        let block = mish_block(
            8,
            &[
                entry(0x8000_0005, 4, 4, 100, 50),
                entry(1, 0, 4, 0, 2048),
                entry(0x7fff_fffe, 0, 0, 0, 0),
                entry(0x8000_0004, 8, 2, 0, 0),
            ],
        );
        let xml = format!(
            "<plist><data>\n{}\n</data><data>aGVsbG8=</data></plist>",
            base64::engine::general_purpose::STANDARD.encode(&block)
        );
        let (chunks, unknown) = chunks(&trailer(1000), xml.as_bytes()).unwrap();
        assert_eq!(unknown, Some(0x8000_0004));
        assert_eq!(
            chunks,
            vec![
                Chunk {
                    kind: ChunkKind::Raw,
                    sector: 8,
                    sectors: 4,
                    offset: 1000,
                    length: 2048
                },
                Chunk {
                    kind: ChunkKind::Compressed(Codec::Zlib),
                    sector: 12,
                    sectors: 4,
                    offset: 1100,
                    length: 50
                },
            ]
        );
    }

    #[test]
    fn oversized_chunks_and_unclosed_data_are_refused() {
        let big = mish_block(0, &[entry(1, 0, MAX_CHUNK_SECTORS + 1, 0, 0)]);
        let xml = format!(
            "<data>{}</data>",
            base64::engine::general_purpose::STANDARD.encode(&big)
        );
        assert!(matches!(
            chunks(&trailer(0), xml.as_bytes()),
            Err(Refusal::Invalid(why)) if why.starts_with("sector count 131073 for chunk 0")
        ));
        let zero = mish_block(0, &[entry(0, 0, MAX_CHUNK_SECTORS + 1, 0, 0)]);
        let xml = format!(
            "<data>{}</data>",
            base64::engine::general_purpose::STANDARD.encode(&zero)
        );
        assert!(chunks(&trailer(0), xml.as_bytes()).is_ok());
        assert!(chunks(&trailer(0), b"<data>AAAA").is_err());
    }

    #[test]
    fn a_resource_fork_lists_its_resources_by_length() {
        let block = mish_block(0, &[entry(1, 0, 1, 0, 512)]);
        let mut fork = vec![0u8; 16];
        fork[0..4].copy_from_slice(&16u32.to_be_bytes());
        let data_len = 4 + block.len() + 4 + 3;
        fork[8..12].copy_from_slice(&(data_len as u32).to_be_bytes());
        fork.extend((block.len() as u32).to_be_bytes());
        fork.extend(&block);
        fork.extend(3u32.to_be_bytes());
        fork.extend(b"abc");
        let t = Trailer {
            tables: Tables::ResourceFork(0, fork.len() as u64),
            ..trailer(0)
        };
        assert_eq!(chunks(&t, &fork).unwrap().0.len(), 1);
        fork[8..12].copy_from_slice(&((data_len + 1) as u32).to_be_bytes());
        assert!(chunks(&t, &fork).is_err());
    }
}
