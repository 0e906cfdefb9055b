//! Per-node I/O accounting for query-blockstats and the metrics endpoint: lock-free
//! counters bumped on the request path, so that keeping them costs a clock read and a few
//! relaxed atomic adds per request, and a latency histogram per kind of request.

use crate::node::Node;
use serde_json::{json, Map, Value};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// What a request does, as the statistics group requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    /// Reads.
    Read = 0,
    /// Writes and zero writes, as a guest device accounts them.
    Write = 1,
    /// Flushes.
    Flush = 2,
    /// Discards.
    Unmap = 3,
}

impl IoKind {
    /// Every kind, in counter order.
    pub const ALL: [IoKind; 4] = [IoKind::Read, IoKind::Write, IoKind::Flush, IoKind::Unmap];

    /// The name metrics label it with.
    pub fn name(self) -> &'static str {
        match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::Flush => "flush",
            IoKind::Unmap => "unmap",
        }
    }
}

/// Upper bounds of the latency histogram's buckets, in nanoseconds: from what a request
/// served from memory takes to what a disk in trouble takes; slower ones land in +Inf.
pub const LATENCY_BOUNDS_NS: [u64; 12] = [
    10_000,
    50_000,
    100_000,
    500_000,
    1_000_000,
    5_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
    500_000_000,
    1_000_000_000,
    5_000_000_000,
];

#[derive(Default)]
struct KindCounters {
    bytes: AtomicU64,
    ops: AtomicU64,
    total_ns: AtomicU64,
    /// Requests the driver failed.
    failed: AtomicU64,
    /// Requests refused before reaching the driver (out of range, read-only node).
    invalid: AtomicU64,
    /// Requests the driver answered, by latency: one counter per bound, then +Inf. Not
    /// cumulative, so a request bumps one counter.
    latency: [AtomicU64; LATENCY_BOUNDS_NS.len() + 1],
}

/// One kind's counters, read at once (each counter on its own, so a request ending
/// meanwhile may be in some and not yet in others).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindSnapshot {
    /// Bytes of successful requests.
    pub bytes: u64,
    /// Successful requests.
    pub ops: u64,
    /// Failed requests.
    pub failed: u64,
    /// Requests refused before the driver.
    pub invalid: u64,
    /// Nanoseconds spent in answered requests.
    pub total_ns: u64,
    /// Answered requests per latency bucket (see [`LATENCY_BOUNDS_NS`]), the last being
    /// +Inf; not cumulative.
    pub latency: [u64; LATENCY_BOUNDS_NS.len() + 1],
}

/// The counters of a node (query-blockstats), or of an edge's user (an export's requests).
#[derive(Default)]
pub struct NodeStats {
    kinds: [KindCounters; 4],
    wr_highest_offset: AtomicU64,
    /// Nanoseconds since `clock_origin()` plus one at the last request's end; 0 for never.
    last_access: AtomicU64,
    /// Discards that reached the driver (after `discard=ignore` dropped the rest).
    driver_discard_ok: AtomicU64,
    driver_discard_failed: AtomicU64,
    driver_discard_bytes_ok: AtomicU64,
}

/// Measures one request from its start; the node's `*_entered` methods end it.
pub struct Accounting<'a> {
    stats: &'a NodeStats,
    kind: IoKind,
    start: Instant,
}

fn clock_origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn since_origin(t: Instant) -> u64 {
    t.saturating_duration_since(clock_origin()).as_nanos() as u64 + 1
}

impl NodeStats {
    /// Starts measuring a request of `kind`.
    pub fn start(&self, kind: IoKind) -> Accounting<'_> {
        Accounting {
            stats: self,
            kind,
            start: Instant::now(),
        }
    }

    /// A discard the driver was asked to do, for the file driver's own counters.
    pub fn driver_discard(&self, len: u64, result: &io::Result<()>) {
        if result.is_ok() {
            self.driver_discard_ok.fetch_add(1, Ordering::Relaxed);
            self.driver_discard_bytes_ok
                .fetch_add(len, Ordering::Relaxed);
        } else {
            self.driver_discard_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn kind(&self, kind: IoKind) -> &KindCounters {
        &self.kinds[kind as usize]
    }

    /// `kind`'s counters now.
    pub fn snapshot(&self, kind: IoKind) -> KindSnapshot {
        let k = self.kind(kind);
        KindSnapshot {
            bytes: k.bytes.load(Ordering::Relaxed),
            ops: k.ops.load(Ordering::Relaxed),
            failed: k.failed.load(Ordering::Relaxed),
            invalid: k.invalid.load(Ordering::Relaxed),
            total_ns: k.total_ns.load(Ordering::Relaxed),
            latency: std::array::from_fn(|i| k.latency[i].load(Ordering::Relaxed)),
        }
    }

    fn touch(&self, now: Instant) {
        self.last_access
            .fetch_max(since_origin(now), Ordering::Relaxed);
    }

    /// BlockDeviceStats.
    pub fn to_json(&self) -> Value {
        let get = |kind: IoKind, f: fn(&KindCounters) -> &AtomicU64| {
            f(self.kind(kind)).load(Ordering::Relaxed)
        };
        let mut out = json!({
            "rd_bytes": get(IoKind::Read, |k| &k.bytes),
            "wr_bytes": get(IoKind::Write, |k| &k.bytes),
            "zone_append_bytes": 0,
            "unmap_bytes": get(IoKind::Unmap, |k| &k.bytes),
            "rd_operations": get(IoKind::Read, |k| &k.ops),
            "wr_operations": get(IoKind::Write, |k| &k.ops),
            "zone_append_operations": 0,
            "flush_operations": get(IoKind::Flush, |k| &k.ops),
            "unmap_operations": get(IoKind::Unmap, |k| &k.ops),
            "rd_total_time_ns": get(IoKind::Read, |k| &k.total_ns),
            "wr_total_time_ns": get(IoKind::Write, |k| &k.total_ns),
            "zone_append_total_time_ns": 0,
            "flush_total_time_ns": get(IoKind::Flush, |k| &k.total_ns),
            "unmap_total_time_ns": get(IoKind::Unmap, |k| &k.total_ns),
            "wr_highest_offset": self.wr_highest_offset.load(Ordering::Relaxed),
            "rd_merged": 0,
            "wr_merged": 0,
            "zone_append_merged": 0,
            "unmap_merged": 0,
            "failed_rd_operations": get(IoKind::Read, |k| &k.failed),
            "failed_wr_operations": get(IoKind::Write, |k| &k.failed),
            "failed_zone_append_operations": 0,
            "failed_flush_operations": get(IoKind::Flush, |k| &k.failed),
            "failed_unmap_operations": get(IoKind::Unmap, |k| &k.failed),
            "invalid_rd_operations": get(IoKind::Read, |k| &k.invalid),
            "invalid_wr_operations": get(IoKind::Write, |k| &k.invalid),
            "invalid_zone_append_operations": 0,
            "invalid_flush_operations": get(IoKind::Flush, |k| &k.invalid),
            "invalid_unmap_operations": get(IoKind::Unmap, |k| &k.invalid),
            // Both are always counted here (qsd's node rows say false: it counts nothing).
            "account_invalid": true,
            "account_failed": true,
            // Latency intervals are a property of guest devices, which blockd has none of.
            "timed_stats": [],
        });
        let last = self.last_access.load(Ordering::Relaxed);
        if last != 0 {
            let idle = since_origin(Instant::now()).saturating_sub(last);
            out["idle_time_ns"] = json!(idle);
        }
        out
    }
}

impl Accounting<'_> {
    /// The request was refused before reaching the driver.
    pub fn invalid(&self, e: io::Error) -> io::Error {
        self.stats
            .kind(self.kind)
            .invalid
            .fetch_add(1, Ordering::Relaxed);
        self.stats.touch(Instant::now());
        e
    }

    /// The driver answered a request of `bytes`; the answer passes through.
    pub fn finish<T>(&self, bytes: u64, result: io::Result<T>) -> io::Result<T> {
        let now = Instant::now();
        let counters = self.stats.kind(self.kind);
        if result.is_ok() {
            counters.ops.fetch_add(1, Ordering::Relaxed);
            counters.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            counters.failed.fetch_add(1, Ordering::Relaxed);
        }
        let elapsed = now.saturating_duration_since(self.start).as_nanos() as u64;
        counters.total_ns.fetch_add(elapsed, Ordering::Relaxed);
        let bucket = LATENCY_BOUNDS_NS.partition_point(|&bound| bound < elapsed);
        counters.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.stats.touch(now);
        result
    }

    /// `finish` for a write or zero write of `[offset, offset + bytes)`, which also moves
    /// the highest written offset, whether or not it succeeded.
    pub fn finish_write<T>(&self, offset: u64, bytes: u64, result: io::Result<T>) -> io::Result<T> {
        self.stats
            .wr_highest_offset
            .fetch_max(offset.saturating_add(bytes), Ordering::Relaxed);
        self.finish(bytes, result)
    }
}

/// BlockStats of one node for query-blockstats with query-nodes: its counters, and the
/// node's `file` (or blkdebug's `image`) child as `parent`, as QEMU shows `bs->file`.
pub fn block_stats(node: &Arc<Node>) -> Value {
    let mut out = Map::new();
    out.insert("node-name".into(), json!(node.name()));
    out.insert("stats".into(), node.stats().to_json());
    let format = node.driver().format_name();
    if matches!(format, "file" | "host_device") {
        let s = node.stats();
        out.insert(
            "driver-specific".into(),
            json!({
                "driver": format,
                "discard-nb-ok": s.driver_discard_ok.load(Ordering::Relaxed),
                "discard-nb-failed": s.driver_discard_failed.load(Ordering::Relaxed),
                "discard-bytes-ok": s.driver_discard_bytes_ok.load(Ordering::Relaxed),
            }),
        );
    }
    if let Some(file) = node.child("file").or_else(|| node.child("image")) {
        out.insert("parent".into(), block_stats(&file.node()));
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_bytes_failures_and_the_highest_write() {
        let stats = NodeStats::default();
        assert!(stats.to_json().get("idle_time_ns").is_none());
        let acct = stats.start(IoKind::Write);
        acct.finish_write(4096, 512, Ok(())).unwrap();
        let acct = stats.start(IoKind::Write);
        let failed: io::Result<()> = Err(io::Error::from_raw_os_error(libc::EIO));
        assert!(acct.finish_write(100, 10, failed).is_err());
        let acct = stats.start(IoKind::Read);
        let _ = acct.invalid(io::Error::from_raw_os_error(libc::EINVAL));
        let json = stats.to_json();
        assert_eq!(json["wr_bytes"], 512);
        assert_eq!(json["wr_operations"], 1);
        assert_eq!(json["failed_wr_operations"], 1);
        assert_eq!(json["invalid_rd_operations"], 1);
        assert_eq!(json["rd_operations"], 0);
        assert_eq!(json["wr_highest_offset"], 4608);
        assert!(json["idle_time_ns"].is_u64());
        let writes = stats.snapshot(IoKind::Write);
        assert_eq!((writes.ops, writes.failed, writes.bytes), (1, 1, 512));
        // Both answered writes are in the histogram; the refused read is not.
        assert_eq!(writes.latency.iter().sum::<u64>(), 2);
        assert_eq!(stats.snapshot(IoKind::Read).latency.iter().sum::<u64>(), 0);
    }

    #[test]
    fn latency_buckets_hold_their_upper_bound() {
        let bucket = |ns: u64| LATENCY_BOUNDS_NS.partition_point(|&bound| bound < ns);
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(10_000), 0);
        assert_eq!(bucket(10_001), 1);
        assert_eq!(bucket(5_000_000_000), LATENCY_BOUNDS_NS.len() - 1);
        assert_eq!(bucket(u64::MAX), LATENCY_BOUNDS_NS.len());
    }
}
