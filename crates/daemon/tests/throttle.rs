//! Write thresholds, I/O throttling and block statistics of the real daemon, driven through
//! NBD by qemu-io and compared with qemu-storage-daemon where qsd can do the same.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

fn nbd_uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

fn qemu_io_nbd(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(&mut c);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-io {cmds:?}: {text}");
    assert!(
        !text.contains("fail") && !text.contains("error"),
        "qemu-io {cmds:?}: {text}"
    );
    text
}

/// A qcow2 node `d` over its file node `f`, exported writable as `d`.
fn qcow2_export_args(dir: &Path, sock: &Path) -> Vec<String> {
    let img = dir.join("d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"]);
    vec![
        s("--blockdev"),
        format!("file,node-name=f,filename={}", img.display()),
        s("--blockdev"),
        s("qcow2,node-name=d,file=f"),
        s("--nbd-server"),
        format!("addr.type=unix,addr.path={}", sock.display()),
        s("--export"),
        s("nbd,id=e,node-name=d,writable=on"),
    ]
}

fn thresholds(nodes: &Value) -> Vec<(String, u64)> {
    nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node-name"].as_str().unwrap().to_string(),
                n["write_threshold"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// blockd must exit cleanly on quit. qsd is just stopped: it may act on `quit` before the
/// client's trailing newline is written, which then fails with EPIPE.
async fn finish(daemon: Daemon, c: &mut qmp::Client) {
    if daemon.which == Impl::Blockd {
        daemon.quit(c).await;
    }
}

/// Events of `name` received so far (a command round trip first, so none is in flight).
async fn events_named(client: &mut qmp::Client, name: &str) -> Vec<Value> {
    client.execute("query-version", json!({})).await.unwrap();
    client
        .drain_events()
        .into_iter()
        .filter(|e| e["event"] == name)
        .map(|e| e["data"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_threshold_fires_once_like_qsd() {
    let mut seen = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let daemon = Daemon::start(which, dir.path(), &qcow2_export_args(dir.path(), &sock));
        let mut c = daemon.qmp().await;
        let mut replies = Vec::new();
        for args in [
            json!({"node-name": "d", "write-threshold": -1}),
            json!({"node-name": "d", "write-threshold": 1048576}),
            json!({"node-name": "f", "write-threshold": 300000}),
            json!({"node-name": "nope", "write-threshold": 1}),
            json!({"node-name": "d"}),
        ] {
            replies.push(match c.execute("block-set-write-threshold", args).await {
                Ok(v) => v,
                Err(e) => json!({"class": e.class.as_str(), "desc": e.desc}),
            });
        }
        let nodes = c
            .execute("query-named-block-nodes", json!({}))
            .await
            .unwrap();
        let armed = thresholds(&nodes);
        let uri = nbd_uri(&sock, "d");
        // The first write ends 424 bytes past the threshold; the second would trip it again
        // if it were not one-shot.
        qemu_io_nbd(&uri, &["write 1048000 1000", "write 2M 4k"]);
        let fired = events_named(&mut c, "BLOCK_WRITE_THRESHOLD").await;
        let on_d: Vec<&Value> = fired.iter().filter(|e| e["node-name"] == "d").collect();
        assert_eq!(
            on_d,
            vec![&json!({"node-name": "d", "amount-exceeded": 424, "write-threshold": 1048576})],
            "{which:?}"
        );
        // The file node sees the qcow2 layer's host offsets (data and metadata), past 300000.
        let on_f: Vec<&Value> = fired.iter().filter(|e| e["node-name"] == "f").collect();
        assert_eq!(on_f.len(), 1, "{which:?}: {fired:?}");
        assert_eq!(on_f[0]["write-threshold"], 300000);
        assert!(on_f[0]["amount-exceeded"].as_u64().unwrap() > 0);
        let nodes = c
            .execute("query-named-block-nodes", json!({}))
            .await
            .unwrap();
        let disarmed = thresholds(&nodes);
        // Zero writes count, discards do not.
        c.execute(
            "block-set-write-threshold",
            json!({"node-name": "d", "write-threshold": 8388608}),
        )
        .await
        .unwrap();
        qemu_io_nbd(&uri, &["discard 9M 64k"]);
        let after_discard = events_named(&mut c, "BLOCK_WRITE_THRESHOLD").await;
        qemu_io_nbd(&uri, &["write -z 8M 64k"]);
        let after_zero = events_named(&mut c, "BLOCK_WRITE_THRESHOLD").await;
        seen.push((which, replies, armed, disarmed, after_discard, after_zero));
        finish(daemon, &mut c).await;
    }
    let (_, replies, armed, disarmed, after_discard, after_zero) = &seen[0];
    assert_eq!(replies[1], json!({}));
    assert_eq!(
        *armed,
        vec![(s("d"), 1048576), (s("f"), 300000)],
        "listed newest first"
    );
    assert_eq!(*disarmed, vec![(s("d"), 0), (s("f"), 0)]);
    assert!(after_discard.is_empty());
    assert_eq!(
        *after_zero,
        vec![json!({"node-name": "d", "amount-exceeded": 65536, "write-threshold": 8388608})]
    );
    for other in &seen[1..] {
        assert_eq!(
            (&other.1, &other.2, &other.3, &other.4, &other.5),
            (replies, armed, disarmed, after_discard, after_zero),
            "{:?} differs from blockd",
            other.0
        );
    }
}

/// The member names of a JSON value, recursively, with values dropped.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| k.as_str() != "idle_time_ns")
                .map(|(k, v)| (k.clone(), shape(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(shape).collect()),
        _ => Value::Null,
    }
}

/// A raw node `d` over a file node `f`, exported writable as `d`.
fn raw_export_args(dir: &Path, sock: &Path) -> Vec<String> {
    let img = dir.join("d.raw");
    qemu_img(&["create", "-q", "-f", "raw", img.to_str().unwrap(), "16M"]);
    vec![
        s("--blockdev"),
        format!("file,node-name=f,filename={}", img.display()),
        s("--blockdev"),
        s("raw,node-name=d,file=f"),
        s("--nbd-server"),
        format!("addr.type=unix,addr.path={}", sock.display()),
        s("--export"),
        s("nbd,id=e,node-name=d,writable=on"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blockstats_have_qsd_fields() {
    let mut seen = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let daemon = Daemon::start(which, dir.path(), &raw_export_args(dir.path(), &sock));
        let mut c = daemon.qmp().await;
        qemu_io_nbd(&nbd_uri(&sock, "d"), &["write 0 64k", "read 0 64k"]);
        let default = c.execute("query-blockstats", json!({})).await.unwrap();
        let off = c
            .execute("query-blockstats", json!({"query-nodes": false}))
            .await
            .unwrap();
        let nodes = c
            .execute("query-blockstats", json!({"query-nodes": true}))
            .await
            .unwrap();
        let bad = c
            .execute("query-blockstats", json!({"query-nodes": true, "x": 1}))
            .await
            .unwrap_err()
            .desc;
        seen.push((which, default, off, shape(&nodes), bad));
        finish(daemon, &mut c).await;
    }
    let first = &seen[0];
    assert_eq!(first.1, json!([]));
    assert_eq!(first.2, json!([]));
    assert_eq!(first.3[0]["node-name"], Value::Null);
    assert_eq!(first.3.as_array().unwrap().len(), 2);
    for other in &seen[1..] {
        assert_eq!(
            (&other.1, &other.2, &other.4),
            (&first.1, &first.2, &first.4),
            "{:?}",
            other.0
        );
        if let Some(d) = first_difference(&first.3, &other.3) {
            panic!("blockd vs {:?}: {d}", other.0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blockstats_count_what_an_nbd_client_moved() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let daemon = Daemon::start(
        Impl::Blockd,
        dir.path(),
        &raw_export_args(dir.path(), &sock),
    );
    let mut c = daemon.qmp().await;
    qemu_io_nbd(
        &nbd_uri(&sock, "d"),
        &[
            "write -P 1 0 1M",
            "write -P 2 2M 512k",
            "write -z 4M 64k",
            "read -P 1 0 1M",
            "read -P 2 2M 512k",
            "discard 8M 64k",
            "flush",
        ],
    );
    let rows = c
        .execute("query-blockstats", json!({"query-nodes": true}))
        .await
        .unwrap();
    let names: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["f", "d"], "oldest first");
    let d = &rows[1]["stats"];
    assert_eq!(d["wr_bytes"], (1 << 20) + (512 << 10) + (64 << 10));
    assert_eq!(d["wr_operations"], 3);
    assert_eq!(d["rd_bytes"], (1 << 20) + (512 << 10));
    assert_eq!(d["rd_operations"], 2);
    assert_eq!(d["unmap_operations"], 1);
    assert_eq!(d["unmap_bytes"], 64 << 10);
    assert!(d["flush_operations"].as_u64().unwrap() >= 1);
    assert_eq!(d["wr_highest_offset"], (4 << 20) + (64 << 10));
    assert!(d["wr_total_time_ns"].as_u64().unwrap() > 0);
    assert!(d["idle_time_ns"].is_u64());
    assert_eq!(d["failed_wr_operations"], 0);
    // raw passes everything to its file; discard=ignore stops the discard at the top node.
    assert_eq!(rows[1]["parent"]["node-name"], "f");
    assert_eq!(rows[1]["parent"]["stats"]["wr_bytes"], d["wr_bytes"]);
    let f = &rows[0]["stats"];
    assert_eq!(f["wr_bytes"], d["wr_bytes"]);
    assert_eq!(f["rd_bytes"], d["rd_bytes"]);
    assert_eq!(f["unmap_operations"], 0);
    assert_eq!(rows[0]["driver-specific"]["discard-nb-ok"], 0);
    daemon.quit(&mut c).await;
}
