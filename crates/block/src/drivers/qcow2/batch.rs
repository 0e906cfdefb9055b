//! Allocating writes to a qcow2 image, gathered so that concurrent ones share one allocation.
//!
//! imago keeps an L2 table locked from allocating clusters until the data written there is
//! committed, so allocating writes within one L2 table (512 MiB of guest with 64 KiB
//! clusters) run one at a time, each with a single request on the disk. Writes arriving
//! meanwhile queue here; whoever gets the turn next takes the whole queue and hands each run
//! of contiguous writes to imago as one vectored write: one allocation, one L2 update, and
//! the data written with all its slices in flight at once (see `NodeStorage::pure_writev`).
//! Writes to clusters already allocated never come here: they do not take the L2 lock.

use super::storage::NodeStorage;
use futures::future::join_all;
use imago::io_buffers::IoVector;
use imago::FormatAccess;
use std::io;
use std::sync::Mutex;
use tokio::sync::oneshot;

/// Largest run handed to imago at once, so one batch does not keep an L2 table locked for
/// long while other writes wait for it.
const MAX_RUN: u64 = 32 << 20;

/// A write waiting for its turn; its data is copied, as its issuer only waits.
struct Queued {
    offset: u64,
    data: Vec<u8>,
    done: oneshot::Sender<io::Result<()>>,
}

#[derive(Default)]
pub struct AllocBatcher {
    queue: Mutex<Vec<Queued>>,
    /// Held by the one task issuing a batch.
    turn: tokio::sync::Mutex<()>,
}

impl AllocBatcher {
    /// Write `buf` at `offset`, together with the writes queued meanwhile.
    pub async fn write(
        &self,
        access: &FormatAccess<NodeStorage>,
        offset: u64,
        buf: &[u8],
    ) -> io::Result<()> {
        if let Ok(_turn) = self.turn.try_lock() {
            // Nobody is allocating: write from the caller's buffer, with whatever queued.
            return self
                .issue(access, Some((offset, buf)))
                .await
                .unwrap_or(Ok(()));
        }
        let (done, mut result) = oneshot::channel();
        self.queue.lock().unwrap().push(Queued {
            offset,
            data: buf.to_vec(),
            done,
        });
        loop {
            tokio::select! {
                biased;
                r = &mut result => return r.unwrap_or_else(|_| Err(abandoned())),
                _turn = self.turn.lock() => {
                    // Whoever took our write held the turn until it was done, so either it
                    // answered already or our write is still queued.
                    if let Ok(r) = result.try_recv() {
                        return r;
                    }
                    // Our own result comes through the channel, like the others'.
                    self.issue(access, None).await;
                }
            }
        }
    }

    /// Write the queue (plus `own`, the caller's write) in runs of contiguous writes; the
    /// result is `own`'s.
    async fn issue(
        &self,
        access: &FormatAccess<NodeStorage>,
        own: Option<(u64, &[u8])>,
    ) -> Option<io::Result<()>> {
        let taken = std::mem::take(&mut *self.queue.lock().unwrap());
        let mut items: Vec<(u64, &[u8])> = taken.iter().map(|q| (q.offset, &q.data[..])).collect();
        items.extend(own);
        tracing::trace!(writes = items.len(), "allocating writes gathered");
        let results = write_items(access, &items).await;
        let mut results = results.into_iter();
        for (queued, result) in taken.into_iter().zip(&mut results) {
            let _ = queued.done.send(result);
        }
        results.next()
    }
}

fn abandoned() -> io::Error {
    io::Error::other("the write gathering this request was abandoned")
}

/// Write every item and return each one's result, in the order given. Overlapping items
/// are written one after the other in that order, as a batch of them would otherwise race.
async fn write_items(
    access: &FormatAccess<NodeStorage>,
    items: &[(u64, &[u8])],
) -> Vec<io::Result<()>> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| items[i].0);
    let end = |i: usize| items[i].0 + items[i].1.len() as u64;
    let overlap = order.windows(2).any(|w| items[w[1]].0 < end(w[0]));
    let mut results: Vec<io::Result<()>> = Vec::with_capacity(items.len());
    if overlap {
        for &(offset, data) in items {
            results.push(write_run(access, offset, &[data]).await);
        }
        return results;
    }
    let mut runs: Vec<Vec<usize>> = Vec::new();
    for &i in &order {
        match runs.last_mut() {
            Some(run)
                if end(*run.last().unwrap()) == items[i].0
                    && end(i) - items[run[0]].0 <= MAX_RUN =>
            {
                run.push(i)
            }
            _ => runs.push(vec![i]),
        }
    }
    let outcomes = join_all(runs.iter().map(|run| {
        let slices: Vec<&[u8]> = run.iter().map(|&i| items[i].1).collect();
        async move { write_run(access, items[run[0]].0, &slices).await }
    }))
    .await;
    let mut per_item: Vec<Option<io::Result<()>>> = (0..items.len()).map(|_| None).collect();
    for (run, outcome) in runs.iter().zip(outcomes) {
        for &i in run {
            per_item[i] = Some(match &outcome {
                Ok(()) => Ok(()),
                Err(e) => Err(copy_error(e)),
            });
        }
    }
    results.extend(per_item.into_iter().map(|r| r.unwrap_or(Ok(()))));
    results
}

/// The same error for every write of a run (the errno kept, for the error policies).
fn copy_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

async fn write_run(
    access: &FormatAccess<NodeStorage>,
    offset: u64,
    slices: &[&[u8]],
) -> io::Result<()> {
    let mut bufv = IoVector::new();
    for slice in slices {
        bufv.push(slice);
    }
    access.writev(bufv, offset).await
}
