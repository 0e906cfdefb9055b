//! Serialises requests on overlapping byte ranges: a mirror's copy of a range and a client
//! write to it must not interleave, or an older copy could land on the target after a newer
//! one and leave it stale while the dirty bitmap says it is in sync.

use std::sync::Mutex;
use tokio::sync::Notify;

/// Byte ranges held by requests in flight; [`RangeLock::lock`] waits for overlapping ones.
#[derive(Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64)>>,
    released: Notify,
}

/// Holds `start..end` until dropped.
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl RangeLock {
    /// Wait until no held range overlaps `start..end`, then hold it.
    pub async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        loop {
            // Created before the check so a release in between is not missed.
            let released = self.released.notified();
            {
                let mut held = self.held.lock().unwrap();
                if !held.iter().any(|&(s, e)| s < end && start < e) {
                    held.push((start, end));
                    return RangeGuard {
                        lock: self,
                        range: (start, end),
                    };
                }
            }
            released.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().unwrap();
        if let Some(i) = held.iter().position(|&r| r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.lock.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::RangeLock;
    use std::sync::Arc;

    #[tokio::test]
    async fn overlapping_ranges_wait() {
        let lock = Arc::new(RangeLock::default());
        let first = lock.lock(0, 100).await;
        let _disjoint = lock.lock(100, 200).await;
        let waiter = {
            let lock = lock.clone();
            tokio::spawn(async move {
                let _g = lock.lock(50, 60).await;
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(first);
        waiter.await.unwrap();
    }
}
