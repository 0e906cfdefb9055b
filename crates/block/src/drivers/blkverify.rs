//! `blkverify`: a filter for testing a driver against a reference (QEMU's blkverify).
//! Every write goes to both children, `test` (the image under test) and `raw` (a plain
//! copy of the same disk); every read reads both and compares. Where QEMU prints the
//! mismatch and ends the process, blockd fails the request with EIO and logs both sides:
//! one bad read must not take every other disk of the daemon down with it.
//!
//! As in QEMU, `raw` is the filtered child (block status passes through to it), the size
//! is `test`'s, a flush flushes `test` only (the reference's durability does not matter),
//! discards do nothing and zero writes are written as data (QEMU's driver has neither,
//! and its block layer then does that).

use crate::node::{Child, DriverInfo, Extent, Node, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use async_trait::async_trait;
use qapi::error::QmpError;
use serde_json::{Map, Value};
use std::io;
use std::sync::Arc;

/// The largest piece read or written at once (the buffer pool's largest buffer is 8 MiB).
const CHUNK: usize = 1 << 20;

pub struct Blkverify {
    test: Arc<Child>,
    raw: Arc<Child>,
}

/// A request's outcome on the two children, judged: the same failure passes through,
/// different outcomes are a mismatch.
fn agree<T>(
    what: &str,
    offset: u64,
    len: u64,
    test: io::Result<T>,
    raw: io::Result<()>,
) -> io::Result<T> {
    match (test, raw) {
        (Ok(value), Ok(())) => Ok(value),
        // The same failure on both sides is an answer; different ones are a mismatch.
        (Err(e), Err(r)) if e.raw_os_error() == r.raw_os_error() => Err(e),
        (test, raw) => {
            tracing::error!(
                "blkverify: {what} offset={offset} bytes={len} return value mismatch: test {}, raw {}",
                outcome(&test),
                outcome(&raw)
            );
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
    }
}

fn outcome<T>(result: &io::Result<T>) -> String {
    match result {
        Ok(_) => "succeeded".to_owned(),
        Err(e) => format!("failed ({e})"),
    }
}

#[async_trait(?Send)]
impl Driver for Blkverify {
    fn format_name(&self) -> &'static str {
        "blkverify"
    }

    fn size(&self, _: &Node) -> u64 {
        self.test.node().size()
    }

    /// In pieces of at most [`CHUNK`] (the reference copy's buffer comes from the pool,
    /// which lends no more); the test image's share is read straight into `buf`.
    async fn read(&self, _: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut reference = aio::pool::PoolBuf::new(buf.len().min(CHUNK), 1)?;
        for (i, piece) in buf.chunks_mut(CHUNK).enumerate() {
            let at = offset + (i * CHUNK) as u64;
            let len = piece.len() as u64;
            let copy = &mut reference.as_mut_slice()[..piece.len()];
            let (test, raw) = futures::join!(self.test.read(at, piece), self.raw.read(at, copy));
            agree("read", at, len, test, raw)?;
            if let Some(diff) = piece.iter().zip(copy.iter()).position(|(a, b)| a != b) {
                tracing::error!(
                    "blkverify: read offset={at} bytes={len} contents mismatch at offset {}",
                    at + diff as u64
                );
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        Ok(())
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        let (test, raw) = futures::join!(
            self.test.write(offset, buf, flags),
            self.raw.write(offset, buf, flags)
        );
        agree("write", offset, buf.len() as u64, test, raw)
    }

    /// As QEMU's block layer does for a driver without write-zeroes: written out as zeroed
    /// data on both children (so they stay byte for byte alike, whatever each would have
    /// made of a zero request), and refused when the caller wants no such fallback.
    async fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        if flags.no_fallback {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        // Pool buffers come back with what they held last.
        let mut zeroes = aio::pool::PoolBuf::new((CHUNK as u64).min(len) as usize, 1)?;
        zeroes.as_mut_slice().fill(0);
        let data = WriteFlags {
            may_unmap: false,
            ..flags
        };
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(CHUNK as u64) as usize;
            self.write(node, pos, &zeroes.as_slice()[..n], data).await?;
            pos += n as u64;
        }
        Ok(())
    }

    async fn discard(&self, _: &Node, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        self.test.flush().await
    }

    async fn block_status(&self, _: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        self.raw.node().status_for_filter(offset, len).await
    }

    async fn truncate(&self, _: &Node, _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    fn child_perms(&self, _: &str, perm: Perms, shared: Perms, _: bool) -> (Perms, Perms) {
        (perm, shared)
    }

    fn info(&self, node: &Node) -> DriverInfo {
        DriverInfo::of_filter(node, &self.raw)
    }

    fn filtered_child_role(&self) -> Option<&'static str> {
        Some("raw")
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: false,
    hands_over: true,
    names: &["blkverify"],
    open: |o, options| Box::pin(open(o, options)),
};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NoOptions {}

async fn open(
    o: &mut Opener<'_>,
    mut options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    // QAPI's member order: test, then raw.
    let test_ref = o.take_child_ref(&mut options, "test")?;
    let raw_ref = o.take_child_ref(&mut options, "raw")?;
    let _: NoOptions = o.parse(options)?;
    // QEMU opens the filtered child first.
    let raw = o
        .open_child(raw_ref, "raw", Perms::NONE, Perms::ALL)
        .await?;
    let test = o
        .open_child(test_ref, "test", Perms::NONE, Perms::ALL)
        .await?;
    Ok(Box::new(Blkverify { test, raw }))
}
