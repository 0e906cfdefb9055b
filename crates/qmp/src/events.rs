//! QMP events: stamped once when emitted, then fanned out to every subscriber (negotiated
//! monitor connections and in-process listeners) through bounded per-subscriber queues, so
//! that a stalled client never blocks the emitter.

use serde_json::{json, Map, Value};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Events a subscriber may have queued before it is cut off as hopelessly behind.
const QUEUE_LIMIT: usize = 4096;

/// Where events are emitted. Cheap to clone, usable from any thread.
#[derive(Clone, Default)]
pub struct EventSink {
    subscribers: Arc<Mutex<Vec<mpsc::Sender<Arc<Value>>>>>,
}

impl EventSink {
    /// A sink with no subscribers yet; events emitted before anyone subscribes are lost.
    pub fn new() -> Self {
        Self::default()
    }

    /// Emits event `name` with optional `data`, stamped with the current time. A subscriber
    /// whose queue is full is dropped: its stream ends (a monitor connection is closed).
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut event = Map::new();
        event.insert("event".into(), Value::String(name.to_owned()));
        if let Some(data) = data {
            event.insert("data".into(), data);
        }
        event.insert(
            "timestamp".into(),
            json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()}),
        );
        let event = Arc::new(Value::Object(event));
        let mut subscribers = self
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        subscribers.retain(|tx| match tx.try_send(event.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(
                    event = name,
                    "QMP event queue overflow, dropping the subscriber"
                );
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }

    /// Receives every event emitted from now on.
    pub fn subscribe(&self) -> EventStream {
        let (tx, rx) = mpsc::channel(QUEUE_LIMIT);
        self.subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(tx);
        EventStream { rx }
    }
}

/// The events of one subscriber, each a full event object:
/// `{"timestamp": {"seconds": .., "microseconds": ..}, "event": NAME, "data": ..}`.
pub struct EventStream {
    rx: mpsc::Receiver<Arc<Value>>,
}

impl EventStream {
    /// The next event; `None` once this subscriber was dropped for falling too far behind,
    /// or every clone of the sink is gone.
    pub async fn recv(&mut self) -> Option<Value> {
        self.rx.recv().await.map(Arc::unwrap_or_clone)
    }

    pub(crate) async fn recv_shared(&mut self) -> Option<Arc<Value>> {
        self.rx.recv().await
    }

    /// The next event if one is queued.
    pub fn try_recv(&mut self) -> Option<Value> {
        self.try_recv_shared().map(Arc::unwrap_or_clone)
    }

    /// [`try_recv`](Self::try_recv) without copying the event.
    pub(crate) fn try_recv_shared(&mut self) -> Option<Arc<Value>> {
        self.rx.try_recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_reach_every_subscriber_stamped() {
        let sink = EventSink::new();
        let mut a = sink.subscribe();
        let mut b = sink.subscribe();
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let emitter = sink.clone();
        std::thread::spawn(move || emitter.emit("E1", Some(json!({"x": 1}))))
            .join()
            .unwrap();
        sink.emit("E2", None);
        for s in [&mut a, &mut b] {
            let e = s.recv().await.unwrap();
            assert_eq!(e["event"], "E1");
            assert_eq!(e["data"], json!({"x": 1}));
            assert!(e["timestamp"]["seconds"].as_u64().unwrap() >= before);
            assert!(e["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
            let e = s.recv().await.unwrap();
            assert_eq!(e["event"], "E2");
            assert!(e.get("data").is_none());
        }
        assert!(a.try_recv().is_none());
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_dropped() {
        let sink = EventSink::new();
        let mut slow = sink.subscribe();
        let mut fast = sink.subscribe();
        for i in 0..QUEUE_LIMIT + 1 {
            sink.emit("E", Some(json!(i)));
            fast.recv().await.unwrap();
        }
        let mut got = 0;
        while slow.recv().await.is_some() {
            got += 1;
        }
        assert_eq!(got, QUEUE_LIMIT);
        sink.emit("E", None);
        assert!(fast.recv().await.is_some());
    }
}
