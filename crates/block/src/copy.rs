//! Cluster-granular copying from a source to a target, shared by a backup job and its
//! copy-before-write filter so that each cluster is copied exactly once: whoever reaches a
//! cluster first copies it, the other waits for that copy and then skips it.

use crate::foreground::Foreground;
use crate::node::{Child, WriteFlags};
use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// One bit per cluster: a set bit is a cluster that still needs copying. Indexes past the
/// end read as clear and ignore writes.
#[derive(Clone, Debug, Default)]
pub struct ClusterBitmap {
    words: Vec<u64>,
    clusters: u64,
}

impl ClusterBitmap {
    /// The clusters of `cluster` bytes that hold a dirty byte of `bitmap` (any
    /// granularity), over `len` bytes.
    pub fn from_dirty(
        bitmap: &crate::bitmap::DirtyBitmap,
        cluster: u64,
        len: u64,
    ) -> ClusterBitmap {
        let mut pending = ClusterBitmap::new(len.div_ceil(cluster));
        let mut offset = 0;
        while let Some((start, run)) = bitmap.next_dirty_range(offset, u64::MAX) {
            let end = start + run;
            pending.set_range(start / cluster..end.div_ceil(cluster), true);
            offset = end;
        }
        pending
    }

    /// `clusters` bits, all clear.
    pub fn new(clusters: u64) -> ClusterBitmap {
        ClusterBitmap {
            words: vec![0; clusters.div_ceil(64) as usize],
            clusters,
        }
    }

    /// How many clusters the bitmap covers (set or not; `count` gives the set ones).
    pub fn len(&self) -> u64 {
        self.clusters
    }

    /// Covers no cluster at all (a zero-length source), whatever is set.
    pub fn is_empty(&self) -> bool {
        self.clusters == 0
    }

    /// Whether `cluster` is set.
    pub fn get(&self, cluster: u64) -> bool {
        cluster < self.clusters && self.words[(cluster / 64) as usize] & (1 << (cluster % 64)) != 0
    }

    /// Set (`value` true) or clear one cluster.
    pub fn set(&mut self, cluster: u64, value: bool) {
        if cluster >= self.clusters {
            return;
        }
        let word = &mut self.words[(cluster / 64) as usize];
        if value {
            *word |= 1 << (cluster % 64);
        } else {
            *word &= !(1 << (cluster % 64));
        }
    }

    /// Set or clear every cluster of `clusters` (cluster indexes, not bytes), a word at a
    /// time: a 16 TiB disk has 2^28 clusters of 64 KiB.
    pub fn set_range(&mut self, clusters: Range<u64>, value: bool) {
        let mut cluster = clusters.start;
        let end = clusters.end.min(self.clusters);
        while cluster < end {
            let bit = cluster % 64;
            let n = (64 - bit).min(end - cluster);
            let mask = (u64::MAX >> (64 - n)) << bit;
            let word = &mut self.words[(cluster / 64) as usize];
            if value {
                *word |= mask;
            } else {
                *word &= !mask;
            }
            cluster += n;
        }
    }

    /// How many clusters of `clusters` are set.
    pub fn count_range(&self, clusters: Range<u64>) -> u64 {
        let mut cluster = clusters.start;
        let end = clusters.end.min(self.clusters);
        let mut count = 0;
        while cluster < end {
            let bit = cluster % 64;
            let n = (64 - bit).min(end - cluster);
            let mask = (u64::MAX >> (64 - n)) << bit;
            count += u64::from((self.words[(cluster / 64) as usize] & mask).count_ones());
            cluster += n;
        }
        count
    }

    /// How many clusters are set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut cluster = from;
        while cluster < self.clusters {
            let word = self.words[(cluster / 64) as usize] >> (cluster % 64);
            if word != 0 {
                let found = cluster + u64::from(word.trailing_zeros());
                return (found < self.clusters).then_some(found);
            }
            cluster = (cluster / 64 + 1) * 64;
        }
        None
    }
}

struct CopyState {
    /// Clusters that still hold data the target needs.
    pending: ClusterBitmap,
    /// Clusters being copied right now, with the signal their waiters wait on.
    in_flight: HashMap<u64, Arc<Notify>>,
}

/// What a copy of one run found, for the caller's error policy.
#[derive(Debug)]
pub enum CopyError {
    /// Reading the source failed (or no buffer for it could be had): a job applies its
    /// `on-source-error`.
    Read(io::Error),
    /// Writing the target failed: a job applies its `on-target-error`.
    Write(io::Error),
}

impl CopyError {
    /// The error itself, whichever side it came from.
    pub fn io(&self) -> &io::Error {
        match self {
            CopyError::Read(e) | CopyError::Write(e) => e,
        }
    }
}

/// QEMU's block-copy state: which clusters of `source` the `target` still needs, and who
/// is copying which right now. A backup job and its copy-before-write filter share one
/// (`Arc`), as do a copy-before-write node and the snapshot-access node reading its
/// point-in-time view; all methods may be called from any thread.
pub struct BlockCopy {
    source: Arc<Child>,
    target: Arc<Child>,
    cluster_size: u64,
    len: u64,
    target_mode: TargetMode,
    state: Mutex<CopyState>,
    copied_bytes: AtomicU64,
    /// Client requests through the copy-before-write filter, which the job makes room for.
    foreground: Foreground,
}

/// Largest run copied in one request.
const MAX_RUN: u64 = 1 << 20;

/// How a copy writes its target.
#[derive(Clone, Copy, Debug, Default)]
pub struct TargetMode {
    /// The target reads as zeroes already (a new image): zero runs of the source are not
    /// written.
    pub is_zero: bool,
    /// Data goes out compressed (backup's `compress`; the target must support it).
    pub compress: bool,
}

impl BlockCopy {
    /// Copy the clusters set in `pending`, of `cluster_size` bytes each, from `source` to
    /// `target`, over the source's size at this moment, writing as `target_mode` says.
    pub fn new(
        source: Arc<Child>,
        target: Arc<Child>,
        cluster_size: u64,
        pending: ClusterBitmap,
        target_mode: TargetMode,
    ) -> BlockCopy {
        let len = source.node().size();
        BlockCopy {
            source,
            target,
            cluster_size,
            len,
            target_mode,
            state: Mutex::new(CopyState {
                pending,
                in_flight: HashMap::new(),
            }),
            copied_bytes: AtomicU64::new(0),
            foreground: Foreground::default(),
        }
    }

    /// The unit of copying and tracking, in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// Bytes covered: the source's size when the copy state was made.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The source was empty: there is nothing to copy.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The edge the old data is read from (the filter's `file`).
    pub fn source(&self) -> &Arc<Child> {
        &self.source
    }

    /// The edge copies are written to.
    pub fn target(&self) -> &Arc<Child> {
        &self.target
    }

    /// When clients last wrote or read through the copy-before-write filter.
    pub fn foreground(&self) -> &Foreground {
        &self.foreground
    }

    /// Bytes still to copy.
    pub fn remaining_bytes(&self) -> u64 {
        let state = self.state.lock().unwrap();
        (state.pending.count() * self.cluster_size).min(self.len)
    }

    /// Bytes copied so far, by the job and the filter together, zero runs included: the
    /// backup job's progress offset.
    pub fn copied_bytes(&self) -> u64 {
        self.copied_bytes.load(Ordering::Relaxed)
    }

    /// Whether the cluster holding byte `offset` still needs copying (being copied
    /// counts as pending until the copy succeeded).
    pub(crate) fn is_pending(&self, offset: u64) -> bool {
        self.state
            .lock()
            .unwrap()
            .pending
            .get(offset / self.cluster_size)
    }

    /// The next pending cluster at or after `cluster` that nobody is copying yet.
    pub fn next_pending(&self, cluster: u64) -> Option<u64> {
        let state = self.state.lock().unwrap();
        let mut from = cluster;
        loop {
            let found = state.pending.next_set(from)?;
            if !state.in_flight.contains_key(&found) {
                return Some(found);
            }
            from = found + 1;
        }
    }

    /// Forget that clusters need copying (sync=top skipping what the top does not hold).
    pub fn skip(&self, clusters: Range<u64>) {
        self.state
            .lock()
            .unwrap()
            .pending
            .set_range(clusters, false);
    }

    /// When the source holds zeroes from `cluster` on (its metadata says so, so a whole
    /// unallocated stretch is one answer) and the target reads as zeroes there too, those
    /// clusters need no copy: they are no longer pending, and the first cluster past them is
    /// returned. The target reads as zeroes when it was created empty, or, for a copy of
    /// the whole disk (`whole_disk`) into a target without a backing file, when its own
    /// metadata says so; that answer holds until the copy ends, as only the copy writes the
    /// clusters still pending there. (An incremental target must get explicit zeroes: it
    /// will be rebased onto the previous backup, which its unallocated clusters would show.)
    /// Clusters a copy-before-write is copying right now are left to it. None when nothing
    /// can be skipped (or the source could not tell: the copy will meet the error).
    pub async fn skip_zeroes(&self, cluster: u64, whole_disk: bool) -> Option<u64> {
        let offset = cluster * self.cluster_size;
        if offset >= self.len {
            return None;
        }
        let status = self
            .source
            .node()
            .block_status_above(None, offset, self.len - offset)
            .await
            .ok()?;
        if !status.zero {
            return None;
        }
        let mut zero_len = status.len;
        if !self.target_mode.is_zero {
            let target = self.target.node();
            if !whole_disk || target.backing().is_some() {
                return None;
            }
            let target = target
                .block_status_above(None, offset, zero_len)
                .await
                .ok()?;
            if !target.zero {
                return None;
            }
            zero_len = zero_len.min(target.len);
        }
        let zero_end = offset + zero_len;
        let end = if zero_end >= self.len {
            self.len.div_ceil(self.cluster_size)
        } else {
            zero_end / self.cluster_size
        };
        if end <= cluster {
            return None;
        }
        let mut state = self.state.lock().unwrap();
        let skipped = state.pending.count_range(cluster..end);
        state.pending.set_range(cluster..end, false);
        let copying: Vec<u64> = state
            .in_flight
            .keys()
            .copied()
            .filter(|c| (cluster..end).contains(c))
            .collect();
        for c in &copying {
            state.pending.set(*c, true);
        }
        drop(state);
        let bytes = skipped.saturating_sub(copying.len() as u64) * self.cluster_size;
        self.copied_bytes.fetch_add(bytes, Ordering::Relaxed);
        Some(end)
    }

    /// Make sure every pending cluster of `[offset, offset+len)` is on the target before
    /// returning: copy those nobody copies, wait for those being copied.
    pub async fn copy_range(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        let end = (offset + len).min(self.len);
        if offset >= end {
            return Ok(());
        }
        let first = offset / self.cluster_size;
        let last = (end - 1) / self.cluster_size;
        let mut cluster = first;
        while cluster <= last {
            match self.claim(cluster, last) {
                Claim::Done => cluster += 1,
                // The same cluster is looked at again afterwards: that copy may have failed.
                Claim::Wait(notify) => self.wait_for(cluster, &notify).await,
                Claim::Copy(run) => {
                    let mut claimed = ClaimedRun::new(self, run.clone());
                    let result = self.copy_run(run.clone()).await;
                    claimed.copied = result.is_ok();
                    drop(claimed);
                    result?;
                    cluster = run.end;
                }
            }
        }
        Ok(())
    }

    /// Read the point-in-time view: clusters still pending come from the source (writes to
    /// them wait meanwhile), copied ones from the target.
    pub(crate) async fn read_point_in_time(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let cluster = pos / self.cluster_size;
            let chunk_end = end.min((cluster + 1) * self.cluster_size);
            let slice = &mut buf[(pos - offset) as usize..(chunk_end - offset) as usize];
            match self.claim(cluster, cluster) {
                Claim::Done => self.target.node().read(pos, slice).await?,
                Claim::Wait(notify) => {
                    self.wait_for(cluster, &notify).await;
                    continue;
                }
                Claim::Copy(run) => {
                    let claimed = ClaimedRun::new(self, run);
                    let result = self.source.node().read(pos, slice).await;
                    drop(claimed);
                    result?;
                }
            }
            pos = chunk_end;
        }
        Ok(())
    }

    /// The reader of the view no longer needs `[offset, offset+len)`: whole clusters in it
    /// are neither copied any more nor kept on the target.
    pub(crate) async fn forget_point_in_time(&self, offset: u64, len: u64) -> io::Result<()> {
        let first = offset.div_ceil(self.cluster_size);
        let last = (offset + len).min(self.len) / self.cluster_size;
        if first >= last {
            return Ok(());
        }
        self.state
            .lock()
            .unwrap()
            .pending
            .set_range(first..last, false);
        let start = first * self.cluster_size;
        let end = (last * self.cluster_size).min(self.len);
        self.target.node().discard(start, end - start).await
    }

    async fn wait_for(&self, cluster: u64, notify: &Arc<Notify>) {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Only wait if that copy is still running now that we listen.
        if self.copying_with(cluster, notify) {
            notified.await;
        }
    }

    fn claim(&self, cluster: u64, last: u64) -> Claim {
        let mut state = self.state.lock().unwrap();
        if !state.pending.get(cluster) {
            return Claim::Done;
        }
        if let Some(notify) = state.in_flight.get(&cluster) {
            return Claim::Wait(notify.clone());
        }
        let max_clusters = (MAX_RUN / self.cluster_size).max(1);
        let mut end = cluster + 1;
        while end <= last
            && end - cluster < max_clusters
            && state.pending.get(end)
            && !state.in_flight.contains_key(&end)
        {
            end += 1;
        }
        let notify = Arc::new(Notify::new());
        for c in cluster..end {
            state.in_flight.insert(c, notify.clone());
        }
        Claim::Copy(cluster..end)
    }

    fn copying_with(&self, cluster: u64, notify: &Arc<Notify>) -> bool {
        let state = self.state.lock().unwrap();
        state
            .in_flight
            .get(&cluster)
            .is_some_and(|n| Arc::ptr_eq(n, notify))
    }

    fn release(&self, run: Range<u64>, copied: bool) {
        // Runs in `ClaimedRun::drop`, maybe while unwinding: a second panic would abort.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut notify = None;
        for c in run {
            notify = state.in_flight.remove(&c).or(notify);
            if copied {
                state.pending.set(c, false);
            }
        }
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }

    async fn copy_run(&self, run: Range<u64>) -> Result<(), CopyError> {
        let start = run.start * self.cluster_size;
        let end = (run.end * self.cluster_size).min(self.len);
        let source = self.source.node();
        let target = self.target.node();
        let mut offset = start;
        while offset < end {
            let status = source
                .block_status_above(None, offset, end - offset)
                .await
                .map_err(CopyError::Read)?;
            let n = status.len.max(1).min(end - offset);
            if status.zero {
                if !self.target_mode.is_zero {
                    let flags = WriteFlags {
                        may_unmap: true,
                        ..WriteFlags::default()
                    };
                    target
                        .write_zeroes(offset, n, flags)
                        .await
                        .map_err(CopyError::Write)?;
                }
            } else {
                // Pooled: this runs for every chunk of a backup and every copy-before-write.
                // A run is at most max(MAX_RUN, one cluster), within the pool's 8 MiB.
                let buf = aio::IoBuf::with_capacity(n as usize, MAX_RUN as usize)
                    .map_err(CopyError::Read)?;
                let buf = source
                    .read_buf(offset, buf)
                    .await
                    .map_err(CopyError::Read)?;
                let flags = WriteFlags {
                    compressed: self.target_mode.compress,
                    ..WriteFlags::default()
                };
                target
                    .write_buf(offset, buf, flags)
                    .await
                    .map_err(CopyError::Write)?;
            }
            offset += n;
        }
        self.copied_bytes.fetch_add(end - start, Ordering::Relaxed);
        Ok(())
    }
}

enum Claim {
    Done,
    Wait(Arc<Notify>),
    Copy(Range<u64>),
}

/// A claimed run, released when dropped: also when the future working on it is dropped
/// half-way (a `cbw-timeout` that fires, a request whose connection went away), so that
/// no cluster stays claimed for ever and every later copy of it waits in vain.
struct ClaimedRun<'a> {
    copy: &'a BlockCopy,
    run: Range<u64>,
    /// The run reached the target: its clusters are no longer pending.
    copied: bool,
}

impl<'a> ClaimedRun<'a> {
    fn new(copy: &'a BlockCopy, run: Range<u64>) -> ClaimedRun<'a> {
        ClaimedRun {
            copy,
            run,
            copied: false,
        }
    }
}

impl Drop for ClaimedRun<'_> {
    fn drop(&mut self) {
        self.copy.release(self.run.clone(), self.copied);
    }
}

#[cfg(test)]
mod tests {
    use super::ClusterBitmap;

    #[test]
    fn ranges_across_words_set_clear_and_count() {
        let mut b = ClusterBitmap::new(300);
        b.set_range(3..250, true);
        assert_eq!(b.count(), 247);
        assert_eq!(b.count_range(0..64), 61);
        assert_eq!(b.count_range(60..200), 140);
        b.set_range(64..128, false);
        assert_eq!(b.count(), 247 - 64);
        assert!(b.get(63) && !b.get(64) && !b.get(127) && b.get(128));
        b.set_range(290..400, true);
        assert_eq!(b.count_range(280..1000), 10);
    }

    #[test]
    fn bitmap_set_get_count_next() {
        let mut b = ClusterBitmap::new(200);
        assert_eq!(b.next_set(0), None);
        b.set_range(10..20, true);
        b.set(130, true);
        b.set(500, true);
        assert_eq!(b.count(), 11);
        assert_eq!(b.next_set(0), Some(10));
        assert_eq!(b.next_set(20), Some(130));
        assert_eq!(b.next_set(131), None);
        b.set(15, false);
        assert!(!b.get(15));
        assert!(b.get(16));
    }
}
