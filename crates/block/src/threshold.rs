//! The write threshold of a node (block-set-write-threshold): a one-shot alarm raised by the
//! first write or zero write that ends past a set offset.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Told `(node name, amount exceeded, threshold)` when the threshold trips.
pub type ThresholdHook = Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

#[derive(Default)]
pub struct WriteThreshold {
    /// 0 means unset, as in QEMU.
    offset: AtomicU64,
    hook: Mutex<Option<ThresholdHook>>,
}

impl WriteThreshold {
    pub fn get(&self) -> u64 {
        self.offset.load(Ordering::Acquire)
    }

    /// Arm (or with 0, disarm) the threshold; `hook` hears when it trips.
    pub fn set(&self, threshold: u64, hook: ThresholdHook) {
        *self.hook.lock().unwrap_or_else(PoisonError::into_inner) = Some(hook);
        self.offset.store(threshold, Ordering::Release);
    }

    /// Called before a write of `[offset, offset + len)` reaches the driver, so the alarm
    /// sounds even if the write then fails (the space may be taken anyway).
    pub fn check(&self, node: &str, offset: u64, len: u64) {
        let threshold = self.offset.load(Ordering::Relaxed);
        if threshold == 0 {
            return;
        }
        let end = offset.saturating_add(len);
        if end <= threshold {
            return;
        }
        // Only the write that disarms it reports, however many race past the threshold.
        if self
            .offset
            .compare_exchange(threshold, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let hook = self
            .hook
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(hook) = hook {
            hook(node, end - threshold, threshold);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_once_past_the_threshold() {
        let fired = Arc::new(Mutex::new(Vec::new()));
        let seen = fired.clone();
        let t = WriteThreshold::default();
        t.check("n", 0, 1 << 30);
        t.set(
            1000,
            Arc::new(move |node, amount, threshold| {
                seen.lock()
                    .unwrap()
                    .push((node.to_string(), amount, threshold))
            }),
        );
        t.check("n", 0, 1000);
        assert!(fired.lock().unwrap().is_empty());
        t.check("n", 900, 200);
        t.check("n", 900, 300);
        assert_eq!(*fired.lock().unwrap(), vec![("n".to_string(), 100, 1000)]);
        assert_eq!(t.get(), 0);
    }
}
