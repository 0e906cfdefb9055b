//! `cloop`: compressed loop images (Knoppix), read-only as in QEMU. A 128-byte preamble
//! (a shell script), the block size and block count (big-endian), a table of block
//! count + 1 offsets, and each block zlib-compressed between two offsets.

use super::block_map::read_metadata;
use super::fields::{be32, be64};
use super::read_only::{open_file, ReadOnly, ReadOnlyImage};
use crate::node::Child;
use crate::open::{DriverEntry, Opener};
use crate::Driver;
use async_trait::async_trait;
use qapi::error::QmpError;
use serde_json::{Map, Value};
use std::io;
use std::sync::{Arc, Mutex};

/// QEMU's limits: blocks of at most 64 MiB, at most 512 MiB of offsets.
const MAX_BLOCK: u64 = 64 << 20;
const MAX_OFFSETS: u64 = 512 << 20;

/// The header fields (public for the fuzz target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Bytes per block, before compression.
    pub block_size: u64,
    /// Blocks in the image.
    pub blocks: u64,
}

impl Header {
    /// Parse and check the block size and count as QEMU does, in its words.
    pub fn parse(buf: &[u8]) -> Result<Header, String> {
        if buf.len() < 136 {
            return Err("Image not in cloop format".into());
        }
        let block_size = be32(buf, 128) as u64;
        if block_size == 0 || !block_size.is_multiple_of(512) {
            return Err(format!("block_size {block_size} must be a multiple of 512"));
        }
        if block_size > MAX_BLOCK {
            return Err(format!("block_size {block_size} must be 64 MB or less"));
        }
        let blocks = be32(buf, 132) as u64;
        if blocks > u32::MAX as u64 / 8 {
            return Err(format!(
                "n_blocks {blocks} must be {} or less",
                u32::MAX / 8
            ));
        }
        if (blocks + 1) * 8 > MAX_OFFSETS {
            return Err("image requires too many offsets, try increasing block size".to_string());
        }
        Ok(Header { block_size, blocks })
    }
}

pub struct Cloop {
    file: Arc<Child>,
    header: Header,
    offsets: Vec<u64>,
    /// The last block decompressed, which sequential reads hit again.
    cache: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

impl Cloop {
    async fn block(&self, index: u64) -> io::Result<Arc<Vec<u8>>> {
        if let Some((cached, data)) = &*self.cache.lock().expect("cache lock") {
            if *cached == index {
                return Ok(data.clone());
            }
        }
        let (start, end) = (
            self.offsets[index as usize],
            self.offsets[index as usize + 1],
        );
        let mut input = vec![0u8; (end - start) as usize];
        self.file.read(start, &mut input).await?;
        let mut out = vec![0u8; self.header.block_size as usize];
        let mut inflate = flate2::Decompress::new(true);
        match inflate.decompress(&input, &mut out, flate2::FlushDecompress::Finish) {
            Ok(flate2::Status::StreamEnd) if inflate.total_out() == self.header.block_size => {}
            _ => return Err(io::Error::other("cloop: a block does not decompress")),
        }
        let data = Arc::new(out);
        *self.cache.lock().expect("cache lock") = Some((index, data.clone()));
        Ok(data)
    }
}

#[async_trait(?Send)]
impl ReadOnlyImage for Cloop {
    const NAME: &'static str = "cloop";

    fn file(&self) -> &Arc<Child> {
        &self.file
    }

    fn size(&self) -> u64 {
        self.header.blocks * self.header.block_size
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let b = self.header.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = (b - pos % b).min((buf.len() - done) as u64) as usize;
            let block = self.block(pos / b).await?;
            let at = (pos % b) as usize;
            buf[done..done + n].copy_from_slice(&block[at..at + n]);
            done += n;
        }
        Ok(())
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: true,
    // Read-only: nothing kept can go stale while another process reads the image too.
    hands_over: true,
    names: &["cloop"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let file = open_file(o, options).await?;
    let head = read_metadata(&file, 0, 136, "cloop header").await?;
    let header = Header::parse(&head).map_err(QmpError::generic)?;
    let file_size = file.node().size();
    let count = header.blocks + 1;
    if 136 + count * 8 > file_size {
        return Err(QmpError::generic(
            "The cloop offsets lie past the end of the file",
        ));
    }
    let raw = read_metadata(&file, 136, (count * 8) as usize, "cloop offsets").await?;
    let offsets: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
    // QEMU's checks: offsets in order, each block no larger than what deflate makes of a
    // block at worst, and all in the file.
    let worst = header.block_size + header.block_size / 1000 + 12 + 4;
    for (i, pair) in offsets.windows(2).enumerate() {
        if pair[1] < pair[0] {
            return Err(QmpError::generic(format!(
                "offsets not monotonically increasing at index {}, image file is corrupt",
                i + 1
            )));
        }
        if pair[1] - pair[0] > 2 * worst {
            return Err(QmpError::generic(format!(
                "invalid compressed block size at index {}, image file is corrupt",
                i + 1
            )));
        }
    }
    if offsets.last().is_some_and(|&end| end > file_size) {
        return Err(QmpError::generic(
            "The cloop blocks lie past the end of the file",
        ));
    }
    o.claim_position();
    Ok(Box::new(ReadOnly(Cloop {
        file,
        header,
        offsets,
        cache: Mutex::new(None),
    })))
}
