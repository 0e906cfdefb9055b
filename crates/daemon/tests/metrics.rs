//! `--metrics`: scraped during a backup with NBD clients at work, parsed by Prometheus' own
//! Python client (a page it cannot parse fails the test), and checked against what the
//! clients and the job did; and what a scraper that misbehaves gets.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A port nobody listens on now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Sends `request` as it is and returns the status code and the body.
fn http(port: u16, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(request).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

fn scrape(port: u16) -> String {
    let (status, body) = http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200, "{body}");
    body
}

/// Every sample, as Prometheus' Python parser reads the page: (name, labels, value).
fn parse(page: &str) -> Vec<(String, Value, f64)> {
    const SCRIPT: &str = "
import sys, json
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
";
    // Debian's python3, which python3-prometheus-client installs for.
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 (Debian's python3)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "Prometheus' parser refused the page (or python3-prometheus-client is missing: \
         .ci/run installs it): {}\n{page}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<(String, Value, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!samples.is_empty());
    samples
}

/// The value of the one sample named `name` whose labels include `labels`.
fn value(samples: &[(String, Value, f64)], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = samples
        .iter()
        .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l[*k] == *v))
        .map(|(_, _, v)| *v)
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_during_a_backup_parses_and_adds_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disk = p(d, "disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &disk, "64M"]);
    common::jobs::qemu_io(&["-c", "write -P 1 0 32M", &disk]);
    qemu_img(&["create", "-q", "-f", "qcow2", &p(d, "tgt.qcow2"), "64M"]);
    let port = free_port();
    let sock = p(d, "nbd.sock");
    let daemon = Daemon::start(
        Impl::Blockd,
        d,
        &[
            s("--metrics"),
            format!("127.0.0.1:{port}"),
            s("--blockdev"),
            format!("driver=qcow2,node-name=disk0,file.driver=file,file.filename={disk}"),
            s("--blockdev"),
            "driver=qcow2,node-name=tgt,file.driver=file,file.filename=tgt.qcow2".into(),
            s("--nbd-server"),
            format!("addr.type=unix,addr.path={sock}"),
            s("--export"),
            "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on".into(),
        ],
    );
    // Two writes and one read through the export.
    common::jobs::qemu_io(&[
        "-f",
        "raw",
        "-c",
        "write -P 2 0 64k",
        "-c",
        "write -P 3 64k 64k",
        "-c",
        "read -P 2 0 64k",
        &format!("nbd+unix:///disk0?socket={sock}"),
    ]);
    let mut client = daemon.qmp().await;
    client
        .execute(
            "blockdev-backup",
            json!({"job-id": "bk", "device": "disk0", "target": "tgt", "sync": "full",
                   "speed": 16 << 20}),
        )
        .await
        .unwrap();
    // The rate is sampled every second: wait for two samples.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let samples = parse(&scrape(port));

    let export = |name: &str, op: &str| value(&samples, name, &[("export", "e0"), ("op", op)]);
    assert_eq!(export("blockd_export_operations_total", "write"), 2.0);
    assert_eq!(export("blockd_export_bytes_total", "write"), 131072.0);
    assert_eq!(export("blockd_export_operations_total", "read"), 1.0);
    assert_eq!(export("blockd_export_bytes_total", "read"), 65536.0);
    assert_eq!(
        export("blockd_export_failed_operations_total", "write"),
        0.0
    );
    assert_eq!(
        value(
            &samples,
            "blockd_export_info",
            &[("export", "e0"), ("type", "nbd"), ("node", "disk0")]
        ),
        1.0
    );
    value(&samples, "blockd_export_clients", &[("export", "e0")]);

    // The node's own counters include the backup's reads.
    let node_read = value(
        &samples,
        "blockd_node_bytes_total",
        &[("node", "disk0"), ("op", "read")],
    );
    assert!(node_read > 65536.0, "{node_read}");
    assert_eq!(
        value(&samples, "blockd_node_size_bytes", &[("node", "disk0")]),
        64.0 * 1048576.0
    );
    // Histogram: cumulative buckets, +Inf equal to the count, which counts every answer.
    let buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|(n, l, _)| {
            n == "blockd_export_request_duration_seconds_bucket"
                && l["export"] == "e0"
                && l["op"] == "write"
        })
        .map(|(_, l, v)| (l["le"].as_str().unwrap().parse::<f64>().unwrap(), *v))
        .collect();
    assert_eq!(buckets.len(), 13, "{buckets:?}");
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "{buckets:?}"
    );
    assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, 2.0));
    let count = value(
        &samples,
        "blockd_export_request_duration_seconds_count",
        &[("export", "e0"), ("op", "write")],
    );
    assert_eq!(count, 2.0);

    // The job, mid-way under its speed limit.
    let job = [("job", "bk"), ("type", "backup")];
    let done = value(&samples, "blockd_job_progress_bytes", &job);
    let total = value(&samples, "blockd_job_total_bytes", &job);
    assert!(
        done > 0.0 && done < total && total == 64.0 * 1048576.0,
        "{done} of {total}"
    );
    assert_eq!(
        value(&samples, "blockd_job_speed_limit_bytes_per_second", &job),
        16.0 * 1048576.0
    );
    let rate = value(&samples, "blockd_job_rate_bytes_per_second", &job);
    assert!(
        rate > 2.0 * 1048576.0 && rate < 64.0 * 1048576.0,
        "{rate} under a 16 MiB/s limit"
    );
    assert_eq!(
        value(
            &samples,
            "blockd_job_state",
            &[("job", "bk"), ("state", "running")]
        ),
        1.0
    );

    let rss = value(&samples, "process_resident_memory_bytes", &[]);
    let status_rss = status_mib(daemon.pid(), "VmRSS") as f64 * 1048576.0;
    assert!(
        rss > 1048576.0 && (rss - status_rss).abs() < 64.0 * 1048576.0,
        "{rss} vs {status_rss}"
    );
    assert!(value(&samples, "process_cpu_seconds_total", &[]) > 0.0);
    assert!(value(&samples, "process_open_fds", &[]) > 3.0);

    client
        .execute("block-job-cancel", json!({"device": "bk"}))
        .await
        .unwrap();
    client
        .wait_event("BLOCK_JOB_CANCELLED", WAIT)
        .await
        .unwrap();
    daemon.quit(&mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapers_that_misbehave_and_bad_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let daemon = Daemon::start(
        Impl::Blockd,
        d,
        &[s("--metrics"), format!("127.0.0.1:{port}")],
    );

    // A client that connects and says nothing does not hold up the others.
    let silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let start = Instant::now();
    parse(&scrape(port));
    assert!(start.elapsed() < Duration::from_secs(2));
    drop(silent);

    // Many that say nothing cost the daemon a bounded number of descriptors, and are gone
    // after the request deadline.
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
            .unwrap()
            .count()
    };
    let before = fds();
    let idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        fds() < before + 40,
        "{} descriptors for 200 idle clients",
        fds() - before
    );
    std::thread::sleep(Duration::from_millis(3500));
    parse(&scrape(port));
    drop(idle);

    assert_eq!(http(port, b"GET /nope HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(
        http(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").0,
        405
    );
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 16 << 10));
    huge.extend_from_slice(b"\r\n\r\n");
    assert_eq!(http(port, &huge).0, 431);
    // Still serving.
    parse(&scrape(port));
    let mut client = daemon.qmp().await;
    daemon.quit(&mut client).await;

    // Bad addresses stop the daemon at startup, saying why.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    for (address, reason) in [
        ("nonsense".to_owned(), "'nonsense' is not HOST:PORT"),
        ("127.0.0.1:99999".to_owned(), "is not HOST:PORT"),
        (format!("127.0.0.1:{taken_port}"), "Address already in use"),
    ] {
        let out = Command::new(BLOCKD)
            .args(["--metrics", &address])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{address}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(reason) && stderr.contains("--metrics"),
            "{address}: {stderr}"
        );
    }
}
