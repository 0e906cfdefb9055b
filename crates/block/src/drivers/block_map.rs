//! What the formats that map the disk in fixed-size blocks (vdi, vpc, qcow, vmdk) share:
//! reading through the map, zeroing the blocks that have data, and block status runs. Each
//! format keeps its own map and knows where a block's data is (`host`: None for a block
//! never written, which reads as zeroes). Also their reads of metadata and of backing
//! files, where what lies past a child's end reads as zeroes.

use crate::node::{Child, Extent, ExtentKind, WriteFlags};
use qapi::error::QmpError;
use std::io;
use std::sync::{Arc, Mutex};

/// A format's backing child, which the graph may change under it (`set_backing_edge`):
/// what reads of blocks the format does not hold fall through to.
#[derive(Default)]
pub(crate) struct BackingEdge(Mutex<Option<Arc<Child>>>);

impl BackingEdge {
    pub(crate) fn new(child: Option<Arc<Child>>) -> BackingEdge {
        BackingEdge(Mutex::new(child))
    }

    pub(crate) fn get(&self) -> Option<Arc<Child>> {
        self.0.lock().expect("backing lock").clone()
    }

    pub(crate) fn set(&self, child: Option<Arc<Child>>) {
        *self.0.lock().expect("backing lock") = child;
    }

    /// Fill `buf` from `pos` of the backing child; zeroes without one or past its end.
    pub(crate) async fn read(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        match self.get() {
            Some(backing) => read_zero_past_end(&backing, pos, buf).await,
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }
}

/// Fill `buf` from `offset` of `child`; what lies past its end reads as zeroes (a backing
/// file shorter than its overlay, a table in a truncated image).
pub(crate) async fn read_zero_past_end(
    child: &Child,
    offset: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    let inside = child
        .node()
        .size()
        .saturating_sub(offset)
        .min(buf.len() as u64) as usize;
    if inside > 0 {
        child.read(offset, &mut buf[..inside]).await?;
    }
    buf[inside..].fill(0);
    Ok(())
}

/// `len` bytes of metadata from `offset` of `file` (zeroes past its end); a failed read
/// is "Could not read `what`".
pub(crate) async fn read_metadata(
    file: &Child,
    offset: u64,
    len: usize,
    what: &str,
) -> Result<Vec<u8>, QmpError> {
    let mut buf = vec![0u8; len];
    read_zero_past_end(file, offset, &mut buf)
        .await
        .map_err(|e| QmpError::generic(format!("Could not read {what}: {e}")))?;
    Ok(buf)
}

/// QEMU's refusal of an image it finds invalid, as it words it ("Could not open '…':
/// Invalid argument"), with what blockd found after it.
pub(crate) fn could_not_open(filename: &str, errno: i32, why: &str) -> QmpError {
    let text = super::file::os_error_text(&io::Error::from_raw_os_error(errno));
    QmpError::generic(format!("Could not open '{filename}': {text} ({why})"))
}

/// Bytes from `offset` to the end of its block, at most `len`.
pub(crate) fn in_block(block_size: u64, offset: u64, len: u64) -> u64 {
    (block_size - offset % block_size).min(len)
}

/// Fill `buf` from guest `offset`: each block's part from where `host` puts it in `file`,
/// zeroes for blocks without data.
pub(crate) async fn read(
    file: &Child,
    block_size: u64,
    offset: u64,
    buf: &mut [u8],
    host: impl Fn(u64) -> Option<u64>,
) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        let n = in_block(block_size, pos, (buf.len() - done) as u64) as usize;
        let chunk = &mut buf[done..done + n];
        match host(pos) {
            Some(at) => file.read(at, chunk).await?,
            None => chunk.fill(0),
        }
        done += n;
    }
    Ok(())
}

/// Make guest `offset..offset + len` read as zeroes: blocks without data already do, the
/// others get zeroes written where `host` puts them. With `no_fallback`, ENOTSUP when a
/// block with data is in the range (zeroes would have to be written).
pub(crate) async fn write_zeroes(
    file: &Child,
    block_size: u64,
    offset: u64,
    len: u64,
    flags: WriteFlags,
    host: impl Fn(u64) -> Option<u64>,
) -> io::Result<()> {
    let plain = WriteFlags::default();
    let mut done = 0;
    while done < len {
        let pos = offset + done;
        let n = in_block(block_size, pos, len - done);
        if let Some(at) = host(pos) {
            if flags.no_fallback {
                return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
            }
            file.write_zeroes(at, n, plain).await?;
        }
        done += n;
    }
    if flags.fua {
        file.flush().await?;
    }
    Ok(())
}

/// The run from `offset` (at most `len` bytes) of blocks that all have data or all have
/// none: data, or zeroes this layer does not hold.
pub(crate) fn extent(
    block_size: u64,
    offset: u64,
    len: u64,
    host: impl Fn(u64) -> Option<u64>,
) -> Extent {
    let allocated = host(offset).is_some();
    let mut run = in_block(block_size, offset, len);
    while run < len && host(offset + run).is_some() == allocated {
        run += in_block(block_size, offset + run, len - run);
    }
    Extent {
        len: run,
        kind: if allocated {
            ExtentKind::Data
        } else {
            ExtentKind::Zero { allocated: false }
        },
    }
}
