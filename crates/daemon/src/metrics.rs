//! `--metrics HOST:PORT`: the daemon's state in Prometheus' text format, at `/metrics`:
//! per node the query-blockstats counters with a latency histogram, per export its clients
//! and the requests they made, per job its progress, rate, speed limit and state, and the
//! process's memory, CPU and file descriptors.
//!
//! The HTTP side is written here rather than taken from hyper: it answers one GET per
//! connection and closes, with a bounded request and a deadline, which is a few dozen
//! lines against a dozen crates. Scrapes read lock-free counters and the daemon's tables on
//! the main thread; they never touch an I/O thread.

use crate::daemon::Daemon;
use crate::exports::Exports;
use block::{IoKind, KindSnapshot, NodeStats, LATENCY_BOUNDS_NS};
use serde_json::Value;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest request head read; a scraper's is a few hundred bytes.
const MAX_REQUEST: usize = 8 << 10;
/// A client that has not sent its request and taken its answer by then is dropped.
const REQUEST_DEADLINE: Duration = Duration::from_secs(3);
/// Connections served at once; more are closed at once, so that idle connections cannot
/// pile up and take the file descriptors the disks need.
const MAX_CONNECTIONS: usize = 16;
/// How often job progress is sampled for the rate.
const RATE_INTERVAL: Duration = Duration::from_secs(1);

/// Job progress samples: the last one and the rate it gave, by job id.
#[derive(Default)]
struct Rates {
    jobs: HashMap<String, (Instant, u64, f64)>,
}

/// Serves `listener` until the daemon quits (the task is dropped with the main loop).
pub async fn serve(listener: TcpListener, daemon: Rc<Daemon>) {
    let rates = Rc::new(RefCell::new(Rates::default()));
    tokio::task::spawn_local(sample_rates(daemon.clone(), rates.clone()));
    let busy = Rc::new(Cell::new(0usize));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: wait instead of spinning.
                tracing::warn!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if busy.get() >= MAX_CONNECTIONS {
            drop(stream);
            continue;
        }
        let slot = Slot::take(&busy);
        let (daemon, rates) = (daemon.clone(), rates.clone());
        tokio::task::spawn_local(async move {
            let _slot = slot;
            let served = tokio::time::timeout(
                REQUEST_DEADLINE,
                answer(stream, || render(&daemon, &rates.borrow())),
            )
            .await;
            if let Ok(Err(e)) = served {
                tracing::debug!("metrics: {e}");
            }
        });
    }
}

/// A connection's place among the [`MAX_CONNECTIONS`], given back however its task ends.
struct Slot(Rc<Cell<usize>>);

impl Slot {
    fn take(busy: &Rc<Cell<usize>>) -> Slot {
        busy.set(busy.get() + 1);
        Slot(busy.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// Reads one request head and answers it.
async fn answer(mut stream: TcpStream, body: impl FnOnce() -> String) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if head.len() >= MAX_REQUEST {
            return respond(&mut stream, "431 Request Header Fields Too Large", "").await;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        // Only the new bytes (and the three before them) can complete the blank line.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if head[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    if method != "GET" {
        return respond(&mut stream, "405 Method Not Allowed", "only GET\n").await;
    }
    match target.split('?').next() {
        Some("/metrics") => respond(&mut stream, "200 OK", &body()).await,
        Some("/") => respond(&mut stream, "200 OK", "blockd: metrics at /metrics\n").await,
        _ => respond(&mut stream, "404 Not Found", "not found: try /metrics\n").await,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Samples every job's progress each [`RATE_INTERVAL`], so the rate is there whether or
/// not anyone scrapes, and whatever the scrape interval.
async fn sample_rates(daemon: Rc<Daemon>, rates: Rc<RefCell<Rates>>) {
    let mut tick = tokio::time::interval(RATE_INTERVAL);
    // After a stall, one late tick rather than a burst of them a few microseconds apart.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let jobs = daemon.jobs.query_jobs();
        let mut rates = rates.borrow_mut();
        rates
            .jobs
            .retain(|id, _| jobs.iter().any(|j| j["id"].as_str() == Some(id)));
        for job in &jobs {
            let (Some(id), Some(done)) = (job["id"].as_str(), job["current-progress"].as_u64())
            else {
                continue;
            };
            let rate = match rates.jobs.get(id) {
                Some(&(then, before, _)) => {
                    let seconds = now.saturating_duration_since(then).as_secs_f64();
                    if seconds > 0.0 {
                        done.saturating_sub(before) as f64 / seconds
                    } else {
                        0.0
                    }
                }
                None => 0.0,
            };
            rates.jobs.insert(id.to_owned(), (now, done, rate));
        }
    }
}

/// Metric families in the text format: `# HELP` and `# TYPE` once, then the samples.
#[derive(Default)]
struct Text {
    out: String,
}

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample; a value that is not finite is left out (Rust would print `inf`, which
    /// the text format spells `+Inf`, and no figure here should be one).
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        if !value.is_finite() {
            return;
        }
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"{}\"", escape(value));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// A label value as the text format quotes it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A counter family: its name's suffix, its help, and where a snapshot holds it.
type Counter = (&'static str, &'static str, fn(&KindSnapshot) -> u64);

/// The requests of one counter set (a node's, or an export's), labelled by `who`.
fn requests(text: &mut Text, prefix: &str, rows: &[(Vec<(&str, &str)>, &NodeStats)]) {
    let snapshots: Vec<Vec<(IoKind, KindSnapshot)>> = rows
        .iter()
        .map(|(_, stats)| {
            IoKind::ALL
                .iter()
                .map(|&k| (k, stats.snapshot(k)))
                .collect()
        })
        .collect();
    let counters: [Counter; 4] = [
        ("bytes_total", "Bytes of successful requests.", |s| s.bytes),
        ("operations_total", "Successful requests.", |s| s.ops),
        ("failed_operations_total", "Requests that failed.", |s| {
            s.failed
        }),
        (
            "invalid_operations_total",
            "Requests refused before reaching the driver (out of range, read-only).",
            |s| s.invalid,
        ),
    ];
    for (suffix, help, get) in counters {
        let name = format!("{prefix}_{suffix}");
        text.family(&name, "counter", help);
        for ((labels, _), kinds) in rows.iter().zip(&snapshots) {
            for (kind, snapshot) in kinds {
                if suffix == "bytes_total" && *kind == IoKind::Flush {
                    continue;
                }
                let mut labels = labels.clone();
                labels.push(("op", kind.name()));
                text.sample(&name, &labels, get(snapshot) as f64);
            }
        }
    }
    let name = format!("{prefix}_request_duration_seconds");
    text.family(
        &name,
        "histogram",
        "Time from a request's start to its answer.",
    );
    let bounds: Vec<String> = LATENCY_BOUNDS_NS
        .iter()
        .map(|ns| format!("{}", *ns as f64 / 1e9))
        .chain(std::iter::once("+Inf".to_owned()))
        .collect();
    for ((labels, _), kinds) in rows.iter().zip(&snapshots) {
        for (kind, snapshot) in kinds {
            let mut labels = labels.clone();
            labels.push(("op", kind.name()));
            let mut cumulative = 0;
            for (bound, count) in bounds.iter().zip(snapshot.latency) {
                cumulative += count;
                let mut with_le = labels.clone();
                with_le.push(("le", bound));
                text.sample(&format!("{name}_bucket"), &with_le, cumulative as f64);
            }
            text.sample(
                &format!("{name}_sum"),
                &labels,
                snapshot.total_ns as f64 / 1e9,
            );
            text.sample(&format!("{name}_count"), &labels, cumulative as f64);
        }
    }
}

/// The whole page.
fn render(daemon: &Rc<Daemon>, rates: &Rates) -> String {
    let mut text = Text::default();

    let nodes = daemon.graph.nodes();
    let names: Vec<(String, &'static str)> = nodes
        .iter()
        .map(|n| (n.name().to_owned(), n.driver().format_name()))
        .collect();
    text.family(
        "blockd_node_size_bytes",
        "gauge",
        "The node's virtual size.",
    );
    for (node, (name, driver)) in nodes.iter().zip(&names) {
        text.sample(
            "blockd_node_size_bytes",
            &[("node", name), ("driver", driver)],
            node.size() as f64,
        );
    }
    let rows: Vec<(Vec<(&str, &str)>, &NodeStats)> = nodes
        .iter()
        .zip(&names)
        .map(|(node, (name, _))| (vec![("node", name.as_str())], node.stats()))
        .collect();
    requests(&mut text, "blockd_node", &rows);

    let exports = Exports::metrics(daemon);
    text.family(
        "blockd_export_info",
        "gauge",
        "An export: its type and the node it serves.",
    );
    for e in &exports {
        text.sample(
            "blockd_export_info",
            &[("export", &e.id), ("type", e.kind), ("node", &e.node)],
            1.0,
        );
    }
    text.family("blockd_export_clients", "gauge", "Connected NBD clients.");
    for e in &exports {
        if let Some(clients) = e.clients {
            text.sample(
                "blockd_export_clients",
                &[("export", &e.id)],
                clients as f64,
            );
        }
    }
    let rows: Vec<(Vec<(&str, &str)>, &NodeStats)> = exports
        .iter()
        .map(|e| (vec![("export", e.id.as_str())], &*e.requests))
        .collect();
    requests(&mut text, "blockd_export", &rows);

    jobs(&mut text, daemon, rates);
    process(&mut text);
    text.out
}

fn jobs(text: &mut Text, daemon: &Rc<Daemon>, rates: &Rates) {
    let jobs = daemon.jobs.query_jobs();
    let block_jobs = daemon.jobs.query_block_jobs();
    let str_of = |v: &Value, key: &str| v[key].as_str().unwrap_or("").to_owned();
    let rows: Vec<(String, String, &Value)> = jobs
        .iter()
        .map(|j| (str_of(j, "id"), str_of(j, "type"), j))
        .collect();
    let gauges: [(&str, &str, &str); 2] = [
        (
            "blockd_job_progress_bytes",
            "current-progress",
            "Work done (bytes for block jobs).",
        ),
        (
            "blockd_job_total_bytes",
            "total-progress",
            "Work known so far; a mirror's grows while clients write.",
        ),
    ];
    for (name, key, help) in gauges {
        text.family(name, "gauge", help);
        for (id, kind, job) in &rows {
            let value = job[key].as_u64().unwrap_or(0);
            text.sample(name, &[("job", id), ("type", kind)], value as f64);
        }
    }
    text.family(
        "blockd_job_rate_bytes_per_second",
        "gauge",
        "Progress over the last second.",
    );
    for (id, kind, _) in &rows {
        if let Some(&(_, _, rate)) = rates.jobs.get(id) {
            text.sample(
                "blockd_job_rate_bytes_per_second",
                &[("job", id), ("type", kind)],
                rate,
            );
        }
    }
    text.family(
        "blockd_job_speed_limit_bytes_per_second",
        "gauge",
        "The job's speed limit; 0 for none.",
    );
    for job in &block_jobs {
        let (id, kind) = (str_of(job, "device"), str_of(job, "type"));
        let speed = job["speed"].as_u64().unwrap_or(0);
        text.sample(
            "blockd_job_speed_limit_bytes_per_second",
            &[("job", &id), ("type", &kind)],
            speed as f64,
        );
    }
    let estimates: [(&str, &str, &str); 3] = [
        (
            "blockd_job_copy_rate_bytes_per_second",
            "x-copy-rate",
            "Mirror and active commit: bytes the job copies per second.",
        ),
        (
            "blockd_job_dirty_rate_bytes_per_second",
            "x-dirty-rate",
            "Mirror and active commit: bytes clients dirty per second.",
        ),
        (
            "blockd_job_seconds_to_ready",
            "x-seconds-to-ready",
            "Mirror and active commit: seconds until READY at the rate the dirty set shrinks (absent while it does not).",
        ),
    ];
    for (name, key, help) in estimates {
        text.family(name, "gauge", help);
        for job in &block_jobs {
            if let Some(value) = job[key].as_f64() {
                let (id, kind) = (str_of(job, "device"), str_of(job, "type"));
                text.sample(name, &[("job", &id), ("type", &kind)], value);
            }
        }
    }
    text.family(
        "blockd_job_state",
        "gauge",
        "1 for the job's current state (created, running, paused, ready, standby, waiting, pending, aborting, concluded).",
    );
    for (id, kind, job) in &rows {
        let state = str_of(job, "status");
        text.sample(
            "blockd_job_state",
            &[("job", id), ("type", kind), ("state", &state)],
            1.0,
        );
    }
}

/// The process's own figures, under the names Prometheus' client libraries use.
fn process(text: &mut Text) {
    // SAFETY: sysconf and getrusage only read kernel values into memory we own.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as f64;
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        let mut fields = statm
            .split_whitespace()
            .map(|f| f.parse::<f64>().unwrap_or(0.0));
        let (virt, resident) = (fields.next().unwrap_or(0.0), fields.next().unwrap_or(0.0));
        text.family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
        );
        text.sample("process_resident_memory_bytes", &[], resident * page);
        text.family(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
        );
        text.sample("process_virtual_memory_bytes", &[], virt * page);
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // The fields after the command name, which is in parentheses and may hold spaces:
        // utime and stime are the 12th and 13th, num_threads the 18th, starttime the 20th.
        let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
        let fields: Vec<f64> = after
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0.0))
            .collect();
        if fields.len() > 19 {
            text.family(
                "process_cpu_seconds_total",
                "counter",
                "User and system CPU time spent in seconds.",
            );
            text.sample(
                "process_cpu_seconds_total",
                &[],
                (fields[11] + fields[12]) / ticks,
            );
            text.family("process_threads", "gauge", "Threads of the process.");
            text.sample("process_threads", &[], fields[17]);
            if let Some(boot) = boot_time() {
                text.family(
                    "process_start_time_seconds",
                    "gauge",
                    "Start time of the process since unix epoch in seconds.",
                );
                text.sample("process_start_time_seconds", &[], boot + fields[19] / ticks);
            }
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        text.family(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
        );
        text.sample("process_open_fds", &[], fds.count() as f64);
    }
}

/// The boot time, in seconds since the epoch, from /proc/stat's `btime`.
fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("btime "))?;
    line[6..].trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut text = Text::default();
        text.family("m", "gauge", "help");
        text.sample("m", &[("node", "a\"b\\c\nd"), ("op", "read")], 1.5);
        assert_eq!(
            text.out,
            "# HELP m help\n# TYPE m gauge\nm{node=\"a\\\"b\\\\c\\nd\",op=\"read\"} 1.5\n"
        );
    }

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let stats = NodeStats::default();
        for _ in 0..3 {
            let acct = stats.start(IoKind::Read);
            acct.finish(512, Ok(())).unwrap();
        }
        let mut text = Text::default();
        requests(&mut text, "t", &[(vec![("node", "n")], &stats)]);
        let out = text.out;
        assert!(
            out.contains("t_bytes_total{node=\"n\",op=\"read\"} 1536\n"),
            "{out}"
        );
        assert!(
            !out.contains("t_bytes_total{node=\"n\",op=\"flush\"}"),
            "{out}"
        );
        assert!(
            out.contains(
                "t_request_duration_seconds_bucket{node=\"n\",op=\"read\",le=\"+Inf\"} 3\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("t_request_duration_seconds_count{node=\"n\",op=\"read\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("t_request_duration_seconds_count{node=\"n\",op=\"write\"} 0\n"),
            "{out}"
        );
        assert_eq!(
            out.matches("# TYPE t_request_duration_seconds histogram")
                .count(),
            1
        );
    }
}
