//! Throttle groups: QEMU's leaky-bucket I/O limits (ThrottleLimits), shared by every
//! throttle node of a group, whose waiting requests are served round-robin.
//!
//! A bucket fills with the bytes (or operations) of each request let through and leaks at
//! the average rate. A request may go while the bucket is not over its size (a tenth of a
//! second of the average rate, or `max * max-length` when bursts are allowed), however big
//! it is; the requests after it then wait until the bucket has leaked back. The state is
//! shared by the I/O threads: a mutex held for a few arithmetic steps, oneshot wake-ups,
//! and one tokio timer per direction that runs the queue when the buckets have leaked.

use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The largest rate QEMU accepts.
pub const VALUE_MAX: u64 = 1_000_000_000_000_000;

/// The buckets in QEMU's order, which decides which invalid setting is reported first.
const BPS_TOTAL: usize = 0;
const BPS_READ: usize = 1;
const BPS_WRITE: usize = 2;
const OPS_TOTAL: usize = 3;
const OPS_READ: usize = 4;
const OPS_WRITE: usize = 5;

/// ThrottleLimits member stems, by bucket.
const NAMES: [&str; 6] = [
    "bps-total",
    "bps-read",
    "bps-write",
    "iops-total",
    "iops-read",
    "iops-write",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Read = 0,
    Write = 1,
}

impl Direction {
    /// The buckets a request of this direction fills: (bytes, operations) pairs.
    fn buckets(self) -> [(usize, bool); 4] {
        match self {
            Direction::Read => [
                (BPS_TOTAL, true),
                (BPS_READ, true),
                (OPS_TOTAL, false),
                (OPS_READ, false),
            ],
            Direction::Write => [
                (BPS_TOTAL, true),
                (BPS_WRITE, true),
                (OPS_TOTAL, false),
                (OPS_WRITE, false),
            ],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketLimit {
    /// Units per second; 0 for unlimited.
    pub avg: u64,
    /// Burst rate; 0 for no bursts above the bucket's size.
    pub max: u64,
    /// Seconds a burst at `max` may last.
    pub burst_length: u64,
}

impl Default for BucketLimit {
    fn default() -> Self {
        BucketLimit {
            avg: 0,
            max: 0,
            burst_length: 1,
        }
    }
}

/// A throttle group's limits (QEMU's ThrottleConfig); the default limits nothing. Built
/// from [`ThrottleLimits`] with `merged`, then checked with `validate`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// One limit per bucket, in QEMU's order: bps-total, bps-read, bps-write (bytes per
    /// second), iops-total, iops-read, iops-write (operations per second).
    pub buckets: [BucketLimit; 6],
    /// Requests larger than this count as several operations in the iops buckets.
    pub iops_size: u64,
}

/// ThrottleLimits as QMP sends it; members left out keep their current value.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ThrottleLimits {
    /// `iops-total`: operations per second, reads and writes together; 0 unlimited.
    pub iops_total: Option<i64>,
    /// `iops-total-max`: the burst rate for `iops-total`; 0 for no bursts.
    pub iops_total_max: Option<i64>,
    /// `iops-total-max-length`: seconds a burst at `iops-total-max` may last.
    pub iops_total_max_length: Option<i64>,
    /// `iops-read`: read operations per second; 0 unlimited.
    pub iops_read: Option<i64>,
    /// `iops-read-max`: the burst rate for `iops-read`; 0 for no bursts.
    pub iops_read_max: Option<i64>,
    /// `iops-read-max-length`: seconds a burst at `iops-read-max` may last.
    pub iops_read_max_length: Option<i64>,
    /// `iops-write`: write operations per second; 0 unlimited.
    pub iops_write: Option<i64>,
    /// `iops-write-max`: the burst rate for `iops-write`; 0 for no bursts.
    pub iops_write_max: Option<i64>,
    /// `iops-write-max-length`: seconds a burst at `iops-write-max` may last.
    pub iops_write_max_length: Option<i64>,
    /// `bps-total`: bytes per second, read and written together; 0 unlimited.
    pub bps_total: Option<i64>,
    /// `bps-total-max`: the burst rate for `bps-total`; 0 for no bursts.
    pub bps_total_max: Option<i64>,
    /// `bps-total-max-length`: seconds a burst at `bps-total-max` may last.
    pub bps_total_max_length: Option<i64>,
    /// `bps-read`: bytes read per second; 0 unlimited.
    pub bps_read: Option<i64>,
    /// `bps-read-max`: the burst rate for `bps-read`; 0 for no bursts.
    pub bps_read_max: Option<i64>,
    /// `bps-read-max-length`: seconds a burst at `bps-read-max` may last.
    pub bps_read_max_length: Option<i64>,
    /// `bps-write`: bytes written per second; 0 unlimited.
    pub bps_write: Option<i64>,
    /// `bps-write-max`: the burst rate for `bps-write`; 0 for no bursts.
    pub bps_write_max: Option<i64>,
    /// `bps-write-max-length`: seconds a burst at `bps-write-max` may last.
    pub bps_write_max_length: Option<i64>,
    /// `iops-size`: bytes one operation stands for in the iops buckets; a larger
    /// request counts as several. 0 counts every request as one.
    pub iops_size: Option<i64>,
}

impl ThrottleLimits {
    /// (avg, max, max-length) per bucket, in bucket order.
    fn per_bucket(&self) -> [[Option<i64>; 3]; 6] {
        [
            [
                self.bps_total,
                self.bps_total_max,
                self.bps_total_max_length,
            ],
            [self.bps_read, self.bps_read_max, self.bps_read_max_length],
            [
                self.bps_write,
                self.bps_write_max,
                self.bps_write_max_length,
            ],
            [
                self.iops_total,
                self.iops_total_max,
                self.iops_total_max_length,
            ],
            [
                self.iops_read,
                self.iops_read_max,
                self.iops_read_max_length,
            ],
            [
                self.iops_write,
                self.iops_write_max,
                self.iops_write_max_length,
            ],
        ]
    }
}

impl ThrottleConfig {
    /// The config with the members `limits` gives replaced. Negative numbers wrap, as
    /// QEMU's unsigned fields do, and are then refused by `validate` as out of range.
    pub fn merged(&self, limits: &ThrottleLimits) -> ThrottleConfig {
        let mut out = self.clone();
        for (bucket, [avg, max, length]) in out.buckets.iter_mut().zip(limits.per_bucket()) {
            if let Some(v) = avg {
                bucket.avg = v as u64;
            }
            if let Some(v) = max {
                bucket.max = v as u64;
            }
            if let Some(v) = length {
                bucket.burst_length = v as u64;
            }
        }
        if let Some(v) = limits.iops_size {
            out.iops_size = v as u64;
        }
        out
    }

    /// QEMU's checks, in QEMU's order, with its texts.
    pub fn validate(&self) -> Result<(), String> {
        let b = &self.buckets;
        let conflict = |total: usize, read: usize, write: usize| {
            (b[total].avg != 0 && (b[read].avg != 0 || b[write].avg != 0))
                || (b[total].max != 0 && (b[read].max != 0 || b[write].max != 0))
        };
        if conflict(BPS_TOTAL, BPS_READ, BPS_WRITE) || conflict(OPS_TOTAL, OPS_READ, OPS_WRITE) {
            return Err(
                "bps/iops/max total values and read/write values cannot be used at the same time"
                    .into(),
            );
        }
        if self.iops_size != 0
            && [OPS_TOTAL, OPS_READ, OPS_WRITE]
                .iter()
                .all(|&i| b[i].avg == 0)
        {
            return Err("iops size requires an iops value to be set".into());
        }
        for bucket in b {
            if bucket.avg > VALUE_MAX || bucket.max > VALUE_MAX {
                return Err(format!(
                    "bps/iops/max values must be within [0, {VALUE_MAX}]"
                ));
            }
            if bucket.burst_length == 0 {
                return Err("the burst length cannot be 0".into());
            }
            if bucket.burst_length > 1 && bucket.max == 0 {
                return Err("burst length set without burst rate".into());
            }
            if bucket.max != 0 && bucket.burst_length > VALUE_MAX / bucket.max {
                return Err("burst length too high for this burst rate".into());
            }
            if bucket.max != 0 && bucket.avg == 0 {
                return Err("bps_max/iops_max require corresponding bps/iops values".into());
            }
            if bucket.max != 0 && bucket.max < bucket.avg {
                return Err("bps_max/iops_max cannot be lower than bps/iops".into());
            }
        }
        Ok(())
    }

    /// Whether any limit is set.
    pub fn is_enabled(&self) -> bool {
        self.buckets.iter().any(|b| b.avg != 0)
    }

    /// Every ThrottleLimits member, as qom-get shows `limits`.
    pub fn to_limits(&self) -> Value {
        let mut out = Map::new();
        for (i, bucket) in self.buckets.iter().enumerate() {
            let name = NAMES[i];
            out.insert(name.into(), json!(bucket.avg));
            out.insert(format!("{name}-max"), json!(bucket.max));
            out.insert(format!("{name}-max-length"), json!(bucket.burst_length));
        }
        out.insert("iops-size".into(), json!(self.iops_size));
        Value::Object(out)
    }
}

/// How long the bucket must leak before a request may go, in seconds (0: go now).
fn bucket_wait(limit: &BucketLimit, level: &Level) -> f64 {
    if limit.avg == 0 {
        return 0.0;
    }
    let (avg, max) = (limit.avg as f64, limit.max as f64);
    let (size, burst_size) = if limit.max == 0 {
        (avg / 10.0, 0.0)
    } else {
        (max * limit.burst_length as f64, max / 10.0)
    };
    let extra = level.level - size;
    if extra > 0.0 {
        return extra / avg;
    }
    // A burst longer than a second is also held to `max` per second on its way.
    if limit.burst_length > 1 {
        let extra = level.burst_level - burst_size;
        if extra > 0.0 {
            return extra / max;
        }
    }
    0.0
}

#[derive(Clone, Copy, Debug, Default)]
struct Level {
    level: f64,
    burst_level: f64,
}

struct Waiter {
    bytes: u64,
    wake: oneshot::Sender<()>,
}

struct Member {
    id: u64,
    queues: [VecDeque<Waiter>; 2],
}

struct GroupState {
    config: ThrottleConfig,
    levels: [Level; 6],
    last_leak: Instant,
    members: Vec<Member>,
    /// Index into `members` of the next to serve, per direction.
    turn: [usize; 2],
    /// When the timer of each direction fires, if one is armed.
    timer: [Option<Instant>; 2],
    next_id: u64,
}

impl GroupState {
    fn leak(&mut self, now: Instant) {
        let delta = now.saturating_duration_since(self.last_leak).as_secs_f64();
        self.last_leak = now;
        for (limit, level) in self.config.buckets.iter().zip(self.levels.iter_mut()) {
            level.level = (level.level - limit.avg as f64 * delta).max(0.0);
            if limit.burst_length > 1 {
                level.burst_level = (level.burst_level - limit.max as f64 * delta).max(0.0);
            }
        }
    }

    fn wait(&mut self, dir: Direction, now: Instant) -> Duration {
        self.leak(now);
        let secs = dir
            .buckets()
            .iter()
            .map(|&(i, _)| bucket_wait(&self.config.buckets[i], &self.levels[i]))
            .fold(0.0, f64::max);
        Duration::from_secs_f64(secs)
    }

    fn account(&mut self, dir: Direction, bytes: u64) {
        let size = self.config.iops_size;
        let ops = if size != 0 && bytes > size {
            bytes as f64 / size as f64
        } else {
            1.0
        };
        for (i, is_bytes) in dir.buckets() {
            let limit = self.config.buckets[i];
            if limit.avg == 0 {
                continue;
            }
            let units = if is_bytes { bytes as f64 } else { ops };
            self.levels[i].level += units;
            if limit.burst_length > 1 {
                self.levels[i].burst_level += units;
            }
        }
    }

    fn queued(&self, dir: Direction) -> bool {
        self.members
            .iter()
            .any(|m| !m.queues[dir as usize].is_empty())
    }

    /// The next waiter in round-robin order over the members.
    fn next_waiter(&mut self, dir: Direction) -> Option<Waiter> {
        let d = dir as usize;
        let n = self.members.len();
        for k in 0..n {
            let i = (self.turn[d] + k) % n;
            if let Some(w) = self.members[i].queues[d].pop_front() {
                self.turn[d] = (i + 1) % n;
                return Some(w);
            }
        }
        None
    }
}

/// One throttle-group object: limits and bucket levels shared by its member nodes.
pub struct ThrottleGroup {
    name: String,
    state: Mutex<GroupState>,
}

/// A member's handle; the member leaves the group when it is dropped.
pub struct Membership {
    group: Arc<ThrottleGroup>,
    id: u64,
}

impl ThrottleGroup {
    /// A group with no members, limited by `config` (already validated). The caller adds
    /// it to [`crate::Graph`]'s `throttle_groups`.
    pub fn new(name: &str, config: ThrottleConfig) -> Arc<ThrottleGroup> {
        Arc::new(ThrottleGroup {
            name: name.to_string(),
            state: Mutex::new(GroupState {
                config,
                levels: [Level::default(); 6],
                last_leak: Instant::now(),
                members: Vec::new(),
                turn: [0; 2],
                timer: [None; 2],
                next_id: 0,
            }),
        })
    }

    /// The group's id: the throttle-group object's `id`, or the group block_set_io_throttle
    /// named.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The limits in force now (qom-get `limits`).
    pub fn config(&self) -> ThrottleConfig {
        self.lock().config.clone()
    }

    /// New limits take effect at once: the buckets start empty and queued requests are
    /// reconsidered under the new limits.
    pub fn set_config(self: &Arc<Self>, config: ThrottleConfig) {
        let mut st = self.lock();
        st.config = config;
        st.levels = [Level::default(); 6];
        st.last_leak = Instant::now();
        st.timer = [None; 2];
        self.run_queue(&mut st, Direction::Read);
        self.run_queue(&mut st, Direction::Write);
    }

    /// How many throttle nodes belong to the group; object-del refuses a group in use.
    pub fn member_count(&self) -> usize {
        self.lock().members.len()
    }

    /// Add a member (a throttle node); its requests wait their turn through the handle,
    /// and dropping the handle leaves the group.
    pub fn join(self: &Arc<Self>) -> Membership {
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.members.push(Member {
            id,
            queues: [VecDeque::new(), VecDeque::new()],
        });
        Membership {
            group: self.clone(),
            id,
        }
    }

    /// Wait until a request of `bytes` may go, then count it.
    async fn admit(self: &Arc<Self>, member: u64, dir: Direction, bytes: u64) {
        let woken = {
            let mut st = self.lock();
            let d = dir as usize;
            if !st.queued(dir) && st.timer[d].is_none() {
                let now = Instant::now();
                if st.wait(dir, now).is_zero() {
                    st.account(dir, bytes);
                    return;
                }
            }
            let (wake, woken) = oneshot::channel();
            let Some(m) = st.members.iter_mut().find(|m| m.id == member) else {
                return;
            };
            m.queues[d].push_back(Waiter { bytes, wake });
            self.run_queue(&mut st, dir);
            woken
        };
        // The sender only goes away with the member (its node is closing): let it through.
        let _ = woken.await;
    }

    /// Let queued requests go, round-robin over the members, while the buckets allow;
    /// then arm the direction's timer for when they will allow the next.
    fn run_queue(self: &Arc<Self>, st: &mut GroupState, dir: Direction) {
        let d = dir as usize;
        while st.queued(dir) {
            let now = Instant::now();
            let wait = st.wait(dir, now);
            if !wait.is_zero() {
                let deadline = now + wait;
                if st.timer[d].is_none_or(|armed| armed > deadline) {
                    st.timer[d] = Some(deadline);
                    self.arm_timer(dir, deadline);
                }
                return;
            }
            let Some(waiter) = st.next_waiter(dir) else {
                return;
            };
            // A request whose client went away is not counted.
            if waiter.wake.is_closed() {
                continue;
            }
            st.account(dir, waiter.bytes);
            let _ = waiter.wake.send(());
        }
    }

    fn arm_timer(self: &Arc<Self>, dir: Direction, deadline: Instant) {
        let group = self.clone();
        let fire = async move {
            tokio::time::sleep_until(deadline.into()).await;
            let mut st = group.lock();
            let d = dir as usize;
            if st.timer[d] == Some(deadline) {
                st.timer[d] = None;
            }
            group.run_queue(&mut st, dir);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn(fire)),
            Err(_) => {
                // Requests always come from an I/O thread's runtime; without one there is
                // nothing to wake the queue later, so it must not be left waiting.
                tracing::error!(group = %self.name, "throttle timer outside a runtime");
                let mut st = self.lock();
                st.timer[dir as usize] = None;
                while let Some(w) = st.next_waiter(dir) {
                    let _ = w.wake.send(());
                }
            }
        }
    }
}

impl Membership {
    pub fn group(&self) -> &Arc<ThrottleGroup> {
        &self.group
    }

    /// Wait until the group's limits let a request of `bytes` in direction `dir` go.
    pub async fn admit(&self, dir: Direction, bytes: u64) {
        self.group.admit(self.id, dir, bytes).await
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut st = self.group.lock();
        if let Some(i) = st.members.iter().position(|m| m.id == self.id) {
            st.members.remove(i);
            st.turn = [0; 2];
        }
    }
}

/// The daemon's throttle groups by id: those made with object-add and those that
/// block_set_io_throttle made, which share one name space as in QEMU.
#[derive(Default)]
pub struct ThrottleGroups {
    groups: Mutex<BTreeMap<String, Arc<ThrottleGroup>>>,
}

impl ThrottleGroups {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<ThrottleGroup>>> {
        self.groups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, name: &str) -> Option<Arc<ThrottleGroup>> {
        self.lock().get(name).cloned()
    }

    /// Add a group; false if the name is taken.
    pub fn insert(&self, group: Arc<ThrottleGroup>) -> bool {
        let mut groups = self.lock();
        if groups.contains_key(group.name()) {
            return false;
        }
        groups.insert(group.name().to_string(), group);
        true
    }

    pub fn remove(&self, name: &str) -> Option<Arc<ThrottleGroup>> {
        self.lock().remove(name)
    }

    /// The groups' names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(limits: ThrottleLimits) -> Result<ThrottleConfig, String> {
        let c = ThrottleConfig::default().merged(&limits);
        c.validate().map(|_| c)
    }

    #[test]
    fn validation_matches_qemu() {
        let err = |l| config(l).unwrap_err();
        assert_eq!(
            err(ThrottleLimits {
                bps_total: Some(100),
                bps_read: Some(5),
                ..Default::default()
            }),
            "bps/iops/max total values and read/write values cannot be used at the same time"
        );
        assert_eq!(
            err(ThrottleLimits {
                bps_total: Some(10),
                bps_read_max: Some(40),
                ..Default::default()
            }),
            "bps_max/iops_max require corresponding bps/iops values"
        );
        assert_eq!(
            err(ThrottleLimits {
                bps_total: Some(10),
                bps_total_max: Some(40),
                bps_total_max_length: Some(-1),
                ..Default::default()
            }),
            "burst length too high for this burst rate"
        );
        assert_eq!(
            err(ThrottleLimits {
                bps_total: Some(-1),
                ..Default::default()
            }),
            "bps/iops/max values must be within [0, 1000000000000000]"
        );
        assert_eq!(
            err(ThrottleLimits {
                iops_size: Some(4096),
                ..Default::default()
            }),
            "iops size requires an iops value to be set"
        );
        assert_eq!(
            err(ThrottleLimits {
                bps_total: Some(100),
                bps_total_max_length: Some(5),
                ..Default::default()
            }),
            "burst length set without burst rate"
        );
        assert!(config(ThrottleLimits {
            bps_total: Some(100),
            bps_total_max: Some(1000),
            bps_total_max_length: Some(3601),
            ..Default::default()
        })
        .is_ok());
    }

    #[test]
    fn a_large_request_goes_and_the_next_waits_for_the_leak() {
        let cfg = config(ThrottleLimits {
            bps_total: Some(1000),
            ..Default::default()
        })
        .unwrap();
        let group = ThrottleGroup::new("g", cfg);
        let mut st = group.lock();
        let now = st.last_leak;
        assert!(st.wait(Direction::Read, now).is_zero());
        st.account(Direction::Read, 5000);
        // 5000 bytes in a bucket of 100 at 1000/s: 4.9 s until it may take more.
        let wait = st.wait(Direction::Write, now);
        assert!((wait.as_secs_f64() - 4.9).abs() < 1e-6, "{wait:?}");
        let later = now + Duration::from_millis(4900);
        assert!(st.wait(Direction::Write, later).is_zero());
    }

    #[test]
    fn bursts_fill_to_max_times_length() {
        let cfg = config(ThrottleLimits {
            iops_total: Some(10),
            iops_total_max: Some(100),
            iops_total_max_length: Some(2),
            ..Default::default()
        })
        .unwrap();
        let group = ThrottleGroup::new("g", cfg);
        let mut st = group.lock();
        let now = st.last_leak;
        let mut admitted = 0;
        // Within one instant only the burst bucket (max / 10 = 10 operations) holds it back.
        while st.wait(Direction::Read, now).is_zero() {
            st.account(Direction::Read, 512);
            admitted += 1;
        }
        assert_eq!(admitted, 11);
    }

    #[test]
    fn iops_size_counts_large_requests_as_several() {
        let cfg = config(ThrottleLimits {
            iops_total: Some(10),
            iops_size: Some(4096),
            ..Default::default()
        })
        .unwrap();
        let group = ThrottleGroup::new("g", cfg);
        let mut st = group.lock();
        st.account(Direction::Write, 4096 * 8);
        assert_eq!(st.levels[OPS_TOTAL].level, 8.0);
        st.account(Direction::Write, 100);
        assert_eq!(st.levels[OPS_TOTAL].level, 9.0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_members_are_served_in_turn() {
        let cfg = config(ThrottleLimits {
            iops_total: Some(10),
            ..Default::default()
        })
        .unwrap();
        let group = ThrottleGroup::new("g", cfg);
        let a = Arc::new(group.join());
        let b = Arc::new(group.join());
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Member a queues 6 requests before b queues 3: b must not wait behind all of a's.
        for (who, member, n) in [("a", a.clone(), 6), ("b", b.clone(), 3)] {
            for _ in 0..n {
                let (member, order) = (member.clone(), order.clone());
                tasks.push(tokio::spawn(async move {
                    member.admit(Direction::Read, 512).await;
                    order.lock().unwrap().push(who);
                }));
                tokio::task::yield_now().await;
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().join("");
        // The first two go at once (an empty bucket of one operation, then its overflow);
        // from then on the queue alternates while both members have requests waiting.
        assert_eq!(order, "aaabababa");
    }
}
