//! The copy requests a job keeps in flight, kept running while the job's loop awaits
//! anything else.
//!
//! A request in flight may hold what others wait for: a qcow2 node's metadata lock while it
//! loads an L2 table, a cluster claimed against copy-before-write, a mirror's range lock.
//! Plain `FuturesUnordered` only runs its futures while it is polled, so a loop that awaits
//! something else (the speed limit, a block-status query, an error policy that pauses the
//! job) stops them where they are: a backup then waited on the qcow2 lock an unpolled
//! request held, for ever, and client writes waited on a paused job's half-done copies.
//! [`Workers::alongside`] awaits such a future while the requests go on; what they finish
//! meanwhile is kept for [`Workers::next`].

use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::VecDeque;
use std::future::Future;

/// Requests in flight plus the results of those that finished while nobody asked.
pub(crate) struct Workers<F: Future> {
    running: FuturesUnordered<F>,
    finished: VecDeque<F::Output>,
}

impl<F: Future> Workers<F> {
    pub(crate) fn new() -> Self {
        Workers {
            running: FuturesUnordered::new(),
            finished: VecDeque::new(),
        }
    }

    /// Start a request.
    pub(crate) fn push(&mut self, request: F) {
        self.running.push(request);
    }

    /// Requests still running (finished ones waiting in [`Workers::next`] do not count:
    /// they hold nothing).
    pub(crate) fn running(&self) -> usize {
        self.running.len()
    }

    /// No request running and no result waiting.
    pub(crate) fn is_idle(&self) -> bool {
        self.running.is_empty() && self.finished.is_empty()
    }

    /// The next result: one already kept, else the next request to finish. None when
    /// [`Workers::is_idle`].
    pub(crate) async fn next(&mut self) -> Option<F::Output> {
        match self.finished.pop_front() {
            Some(output) => Some(output),
            None => self.running.next().await,
        }
    }

    /// Await `other` while the requests keep running; their results wait for
    /// [`Workers::next`].
    pub(crate) async fn alongside<T>(&mut self, other: impl Future<Output = T>) -> T {
        let mut other = std::pin::pin!(other);
        loop {
            tokio::select! {
                biased;
                output = &mut other => return output,
                Some(output) = self.running.next(), if !self.running.is_empty() => {
                    self.finished.push_back(output);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Workers;
    use std::sync::Arc;
    use tokio::sync::Mutex;

    /// The deadlock `alongside` exists for: a request holds a lock across an await, and the
    /// loop waits for that lock. With the requests not polled meanwhile this never ends.
    #[tokio::test]
    async fn a_request_holding_a_lock_finishes_while_the_loop_waits_for_it() {
        let lock = Arc::new(Mutex::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut workers = Workers::new();
        let held = lock.clone().lock_owned().await;
        workers.push(Box::pin(async move {
            let mut held = held;
            rx.await.unwrap();
            *held += 1;
        })
            as std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>);
        // The request's wake-up arrives only once the loop already waits for the lock.
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            tx.send(()).unwrap();
        });
        let got = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            workers.alongside(async { *lock.lock().await }),
        )
        .await
        .expect("the loop's wait ended");
        assert_eq!(got, 1);
        assert!(!workers.is_idle());
        assert_eq!(workers.running(), 0);
        assert_eq!(workers.next().await, Some(()));
        assert!(workers.is_idle());
        assert_eq!(workers.next().await, None);
    }
}
