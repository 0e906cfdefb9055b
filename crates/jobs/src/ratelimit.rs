//! The `speed` limit of a job, with QEMU's slice semantics: 100 ms slices whose quota is
//! `speed * 0.1 s` bytes; a request may always start, and a slice whose quota is reached is
//! stretched to cover the overshoot so that the average rate is exactly `speed`.

use std::time::Duration;
use tokio::time::Instant;

pub const SLICE: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct RateLimit {
    /// Bytes per slice; 0 means unlimited.
    slice_quota: u64,
    slice_start: Instant,
    /// `None` until the first accounted request opens a slice.
    slice_end: Option<Instant>,
    dispatched: u64,
}

impl RateLimit {
    pub fn new(speed: u64) -> RateLimit {
        let mut limit = RateLimit {
            slice_quota: 0,
            slice_start: Instant::now(),
            slice_end: None,
            dispatched: 0,
        };
        limit.set_speed(speed);
        limit
    }

    /// Keeps the bytes already dispatched in the current slice, so a speed change applies
    /// to the overshoot being slept off too.
    pub fn set_speed(&mut self, speed: u64) {
        self.slice_quota = if speed == 0 {
            0
        } else {
            let quota = speed as f64 * SLICE.as_secs_f64();
            (quota as u64).max(1)
        };
    }

    /// Account `bytes` (0 to just ask) and return how long the job must sleep before its
    /// next request.
    pub fn delay(&mut self, now: Instant, bytes: u64) -> Duration {
        if self.slice_quota == 0 {
            return Duration::ZERO;
        }
        if self.slice_end.is_none_or(|end| end < now) {
            self.slice_start = now;
            self.slice_end = Some(now + SLICE);
            self.dispatched = 0;
        }
        self.dispatched = self.dispatched.saturating_add(bytes);
        if self.dispatched < self.slice_quota {
            return Duration::ZERO;
        }
        let slices = self.dispatched as f64 / self.slice_quota as f64;
        let end = self.slice_start + SLICE.mul_f64(slices);
        self.slice_end = Some(end);
        end.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_delays() {
        let mut limit = RateLimit::new(0);
        let now = Instant::now();
        for _ in 0..1000 {
            assert_eq!(limit.delay(now, 1 << 30), Duration::ZERO);
        }
    }

    #[test]
    fn quota_is_at_least_one_byte() {
        let mut limit = RateLimit::new(1);
        let now = Instant::now();
        // One byte fills the slice: the job sleeps to its end.
        assert_eq!(limit.delay(now, 1), SLICE);
    }

    #[test]
    fn requests_start_until_quota_then_slice_stretches() {
        // 1000 B/s: 100 bytes per slice.
        let mut limit = RateLimit::new(1000);
        let now = Instant::now();
        assert_eq!(limit.delay(now, 60), Duration::ZERO);
        // 60 + 90 = 150 bytes: one and a half slices.
        assert_eq!(limit.delay(now, 90), Duration::from_millis(150));
        // Asking again later in the stretched slice gives the rest.
        let later = now + Duration::from_millis(100);
        assert_eq!(limit.delay(later, 0), Duration::from_millis(50));
        // After the slice a new one opens.
        let after = now + Duration::from_millis(151);
        assert_eq!(limit.delay(after, 10), Duration::ZERO);
    }

    #[test]
    fn raising_speed_shortens_the_current_sleep() {
        let mut limit = RateLimit::new(1000);
        let now = Instant::now();
        assert_eq!(limit.delay(now, 400), Duration::from_millis(400));
        limit.set_speed(4000);
        assert_eq!(limit.delay(now, 0), Duration::from_millis(100));
        limit.set_speed(0);
        assert_eq!(limit.delay(now, 0), Duration::ZERO);
    }

    #[test]
    fn average_rate_is_the_speed() {
        let speed = 8 << 20;
        let mut limit = RateLimit::new(speed);
        let start = Instant::now();
        let mut now = start;
        let total: u64 = 32 << 20;
        let mut done = 0;
        while done < total {
            done += 64 << 10;
            now += limit.delay(now, 64 << 10);
        }
        let secs = (now - start).as_secs_f64();
        assert!((secs - 4.0).abs() <= SLICE.as_secs_f64(), "{secs}");
    }
}
