//! The readahead cache of the web drivers (http, https; QEMU's curl driver), where every
//! read is a round trip: a read fetches `readahead` bytes more than it asks for, and a
//! later read that falls inside an earlier fetch, finished or still under way, is served
//! from it instead of a request of its own. A guest or a job reading in order then costs
//! one request per `readahead` bytes rather than one per read.
//!
//! The cache lives on the I/O thread that serves the node's requests (its fetches are
//! local futures) and holds at most [`SEGMENTS`] fetches and [`CACHED_BYTES`] bytes: a
//! fetch reads ahead only as far as the cache can keep it, and a read larger than the
//! cache is fetched for itself alone.

use bytes::Bytes;
use futures::future::{FutureExt, LocalBoxFuture, Shared};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;

/// Fetches kept: QEMU's curl driver keeps as many transfers' buffers.
const SEGMENTS: usize = 8;

/// Bytes the kept fetches hold at most.
const CACHED_BYTES: u64 = 32 << 20;

/// A fetch of bytes, shared by every read it serves. It fails with an errno, having
/// logged its own reason once.
pub type Fetch = Shared<LocalBoxFuture<'static, Result<Bytes, i32>>>;

/// One fetch and the range it covers.
struct Segment {
    start: u64,
    len: u64,
    data: Fetch,
}

impl Segment {
    fn covers(&self, offset: u64, len: u64) -> bool {
        self.start <= offset && offset + len <= self.start + self.len
    }

    fn failed(&self) -> bool {
        matches!(self.data.peek(), Some(Err(_)))
    }
}

/// The cache of one node.
pub struct Readahead {
    /// The disk's length: fetches end there.
    len: u64,
    readahead: u64,
    /// Oldest first.
    segments: RefCell<VecDeque<Segment>>,
}

impl Readahead {
    pub fn new(len: u64, readahead: u64) -> Readahead {
        Readahead {
            len,
            readahead,
            segments: RefCell::new(VecDeque::new()),
        }
    }

    /// The `len` bytes at `offset` (which end by the disk's length), from a fetch that
    /// covers them or from a new one that `fetch(start, len)` starts.
    pub async fn read(
        &self,
        offset: u64,
        len: u64,
        fetch: impl FnOnce(u64, u64) -> LocalBoxFuture<'static, Result<Bytes, i32>>,
    ) -> io::Result<Bytes> {
        let found = self
            .segments
            .borrow()
            .iter()
            .rev()
            .find(|s| s.covers(offset, len) && !s.failed())
            .map(|s| (s.start, s.data.clone()));
        let (start, data) = match found {
            Some(found) => found,
            None => {
                // A readahead larger than the cache would be fetched only to be dropped.
                let ahead = self.readahead.min(CACHED_BYTES.saturating_sub(len));
                let end = offset
                    .saturating_add(len)
                    .saturating_add(ahead)
                    .min(self.len)
                    .max(offset + len);
                let data = fetch(offset, end - offset).shared();
                self.keep(Segment {
                    start: offset,
                    len: end - offset,
                    data: data.clone(),
                });
                (offset, data)
            }
        };
        let bytes = data.await.map_err(io::Error::from_raw_os_error)?;
        let from = (offset - start) as usize;
        Ok(bytes.slice(from..from + len as usize))
    }

    /// Keeps `segment` for later reads, dropping failed fetches and the oldest ones beyond
    /// the bounds. A dropped fetch still under way goes on for the reads that wait on it.
    fn keep(&self, segment: Segment) {
        let mut segments = self.segments.borrow_mut();
        segments.retain(|s| !s.failed());
        if segment.len > CACHED_BYTES {
            return;
        }
        let mut held: u64 = segments.iter().map(|s| s.len).sum();
        while segments.len() >= SEGMENTS || held + segment.len > CACHED_BYTES {
            let Some(oldest) = segments.pop_front() else {
                break;
            };
            held -= oldest.len;
        }
        segments.push_back(segment);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// A fetch of `len` bytes at `start` whose bytes are their own offsets (mod 251),
    /// counting the fetches made.
    fn counting(
        count: &Rc<Cell<u32>>,
    ) -> impl FnOnce(u64, u64) -> LocalBoxFuture<'static, Result<Bytes, i32>> {
        let count = count.clone();
        move |start, len| {
            count.set(count.get() + 1);
            let data: Vec<u8> = (start..start + len).map(|i| (i % 251) as u8).collect();
            async move { Ok(Bytes::from(data)) }.boxed_local()
        }
    }

    fn expected(offset: u64, len: u64) -> Vec<u8> {
        (offset..offset + len).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn reads_in_order_share_one_fetch_per_readahead() {
        let cache = Readahead::new(1 << 20, 64 << 10);
        let count = Rc::new(Cell::new(0));
        for i in 0..16u64 {
            let got = cache.read(i * 4096, 4096, counting(&count)).await.unwrap();
            assert_eq!(&got[..], &expected(i * 4096, 4096)[..]);
        }
        // The first fetch covers 4 KiB + 64 KiB: reads 0..16 need exactly one more.
        assert_eq!(count.get(), 1);
        let got = cache.read(17 * 4096, 4096, counting(&count)).await.unwrap();
        assert_eq!(&got[..], &expected(17 * 4096, 4096)[..]);
        assert_eq!(count.get(), 2);
    }

    #[tokio::test]
    async fn fetches_end_at_the_disk_and_failures_are_not_kept() {
        let cache = Readahead::new(10_000, 64 << 10);
        let seen = Rc::new(Cell::new(0u64));
        let s = seen.clone();
        let fetch = move |start: u64, len: u64| {
            s.set(start + len);
            async { Err(libc::EIO) }.boxed_local()
        };
        let e = cache.read(9_000, 1_000, fetch).await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert_eq!(seen.get(), 10_000);
        let count = Rc::new(Cell::new(0));
        cache.read(9_000, 1_000, counting(&count)).await.unwrap();
        assert_eq!(count.get(), 1, "a failed fetch serves no later read");
    }

    #[tokio::test]
    async fn readahead_stops_where_the_cache_ends() {
        let cache = Readahead::new(1 << 40, 1 << 40);
        let asked = Rc::new(Cell::new(0u64));
        let a = asked.clone();
        let fetch = move |_start: u64, len: u64| {
            a.set(len);
            async { Err(libc::EIO) }.boxed_local()
        };
        let _ = cache.read(0, 4096, fetch).await;
        assert_eq!(asked.get(), CACHED_BYTES);
    }

    #[tokio::test]
    async fn reads_wait_on_a_fetch_under_way() {
        let cache = Rc::new(Readahead::new(1 << 20, 64 << 10));
        let count = Rc::new(Cell::new(0));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let c = count.clone();
        let slow = move |start: u64, len: u64| {
            c.set(c.get() + 1);
            let data: Vec<u8> = (start..start + len).map(|i| (i % 251) as u8).collect();
            async move {
                let _ = released.await;
                Ok(Bytes::from(data))
            }
            .boxed_local()
        };
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let first = tokio::task::spawn_local({
                    let cache = cache.clone();
                    async move { cache.read(0, 4096, slow).await }
                });
                tokio::task::yield_now().await;
                let second = tokio::task::spawn_local({
                    let (cache, count) = (cache.clone(), count.clone());
                    async move { cache.read(8192, 4096, counting(&count)).await }
                });
                tokio::task::yield_now().await;
                release.send(()).unwrap();
                assert_eq!(&first.await.unwrap().unwrap()[..], &expected(0, 4096)[..]);
                assert_eq!(
                    &second.await.unwrap().unwrap()[..],
                    &expected(8192, 4096)[..]
                );
            })
            .await;
        assert_eq!(count.get(), 1, "the second read waited on the first fetch");
    }

    #[tokio::test]
    async fn the_cache_stays_within_its_bounds() {
        let cache = Readahead::new(1 << 40, 0);
        let count = Rc::new(Cell::new(0));
        for i in 0..3 * SEGMENTS as u64 {
            cache
                .read(i << 20, 1 << 20, counting(&count))
                .await
                .unwrap();
        }
        {
            let segments = cache.segments.borrow();
            assert!(segments.len() <= SEGMENTS);
            assert!(segments.iter().map(|s| s.len).sum::<u64>() <= CACHED_BYTES);
        }
        cache
            .read(1 << 30, CACHED_BYTES + 1, counting(&count))
            .await
            .unwrap();
        assert!(!cache.segments.borrow().iter().any(|s| s.len > CACHED_BYTES));
    }
}
