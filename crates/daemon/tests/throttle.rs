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
            "read -P 0 6M 1M",
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
    // The read of a hole is answered without data but counted all the same.
    assert_eq!(d["rd_bytes"], (2 << 20) + (512 << 10));
    assert_eq!(d["rd_operations"], 3);
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

/// Files `a.raw` and `b.raw`, throttle nodes `ta`/`tb` over them in group `g0` (1 MiB/s),
/// exported writable under their node names.
fn throttled_args(dir: &Path, sock: &Path) -> Vec<String> {
    let mut args = vec![
        s("--object"),
        s("throttle-group,id=g0,x-bps-total=1048576"),
        s("--nbd-server"),
        format!("addr.type=unix,addr.path={}", sock.display()),
    ];
    for n in ["a", "b"] {
        let img = dir.join(format!("{n}.raw"));
        qemu_img(&["create", "-q", "-f", "raw", img.to_str().unwrap(), "16M"]);
        args.extend([
            s("--blockdev"),
            format!("file,node-name=f{n},filename={}", img.display()),
            s("--blockdev"),
            format!("throttle,node-name=t{n},file=f{n},throttle-group=g0"),
            s("--export"),
            format!("nbd,id=e{n},node-name=t{n},writable=on"),
        ]);
    }
    args
}

/// qemu-io commands writing `total` bytes in 64 KiB requests from `start`.
fn chunked_writes(verb: &str, start: u64, total: u64) -> Vec<String> {
    (0..total / 65536)
        .map(|i| format!("{verb} {} 64k", start + i * 65536))
        .collect()
}

fn spawn_qemu_io(uri: &str, cmds: &[String]) -> KillOnDrop {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    KillOnDrop(
        c.stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn qemu-io"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_node_holds_nbd_writes_to_the_group_limit() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &throttled_args(dir.path(), &sock));
    let mut c = daemon.qmp().await;
    let cmds = chunked_writes("write", 0, 4 << 20);
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let started = std::time::Instant::now();
    qemu_io_nbd(&nbd_uri(&sock, "ta"), &cmds);
    let elapsed = started.elapsed();
    // 4 MiB at 1 MiB/s, less the first request and the bucket's tenth of a second.
    assert!(elapsed.as_secs_f64() >= 3.0, "took only {elapsed:?}");
    let rows = c
        .execute("query-blockstats", json!({"query-nodes": true}))
        .await
        .unwrap();
    let ta = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node-name"] == "ta")
        .unwrap();
    assert_eq!(ta["stats"]["wr_bytes"], 4 << 20);
    assert_eq!(ta["parent"]["stats"]["wr_bytes"], 4 << 20);
    daemon.quit(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qom_set_changes_the_limit_of_a_running_group() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &throttled_args(dir.path(), &sock));
    let mut c = daemon.qmp().await;
    c.execute(
        "qom-set",
        json!({"path": "/objects/g0", "property": "limits", "value": {"bps-total": 262144}}),
    )
    .await
    .unwrap();
    let limits = c
        .execute("qom-get", json!({"path": "g0", "property": "limits"}))
        .await
        .unwrap();
    assert_eq!(limits["bps-total"], 262144);
    assert_eq!(limits["bps-total-max-length"], 1);
    let cmds = chunked_writes("write", 0, 1 << 20);
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let started = std::time::Instant::now();
    qemu_io_nbd(&nbd_uri(&sock, "tb"), &cmds);
    let elapsed = started.elapsed();
    // 1 MiB at the new 256 KiB/s, where the old 1 MiB/s would have taken under a second.
    assert!(elapsed.as_secs_f64() >= 3.0, "took only {elapsed:?}");
    daemon.quit(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_a_group_take_turns() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &throttled_args(dir.path(), &sock));
    let mut c = daemon.qmp().await;
    // a keeps many requests in flight; b has one at a time. Served first come first
    // served, b would wait behind all of a's queue for each request.
    let mut a = spawn_qemu_io(
        &nbd_uri(&sock, "ta"),
        &[
            chunked_writes("aio_write", 0, 4 << 20),
            vec![s("aio_flush")],
        ]
        .concat(),
    );
    let b_cmds = chunked_writes("write", 0, 1 << 20);
    let b_cmds: Vec<&str> = b_cmds.iter().map(String::as_str).collect();
    qemu_io_nbd(&nbd_uri(&sock, "tb"), &b_cmds);
    let still_running = a.0.try_wait().unwrap().is_none();
    let rows = c
        .execute("query-blockstats", json!({"query-nodes": true}))
        .await
        .unwrap();
    let written = |name: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["node-name"] == name)
            .unwrap()["stats"]["wr_bytes"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(written("tb"), 1 << 20);
    assert!(still_running, "a finished its 4 MiB before b's 1 MiB");
    // Neither starved: a made progress meanwhile too.
    let a_done = written("ta");
    assert!(a_done > 0 && a_done < 4 << 20, "a wrote {a_done}");
    let status = a.0.wait().unwrap();
    assert!(status.success());
    daemon.quit(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_group_objects_like_qsd() {
    let mut seen = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("f.raw");
        qemu_img(&["create", "-q", "-f", "raw", img.to_str().unwrap(), "1M"]);
        let daemon = Daemon::start(
            which,
            dir.path(),
            &[
                s("--object"),
                s("throttle-group,id=g0,limits.bps-total=1048576,x-iops-total=7"),
                s("--blockdev"),
                format!("file,node-name=f,filename={}", img.display()),
                s("--blockdev"),
                s("throttle,node-name=t,file=f,throttle-group=g0"),
            ],
        );
        let mut c = daemon.qmp().await;
        let mut replies = Vec::new();
        let calls = [
            ("qom-get", json!({"path": "g0", "property": "limits"})),
            (
                "object-add",
                json!({"qom-type": "throttle-group", "id": "g1", "limits": {"iops-total": 100, "bps-read": 2000}}),
            ),
            (
                "object-add",
                json!({"qom-type": "throttle-group", "id": "g1"}),
            ),
            (
                "object-add",
                json!({"qom-type": "throttle-group", "id": "g2", "limits": {"bps-total": 100, "bps-read": 5}}),
            ),
            (
                "object-add",
                json!({"qom-type": "throttle-group", "id": "g2", "limits": {"bps-total-max": 100}}),
            ),
            (
                "object-add",
                json!({"qom-type": "throttle-group", "id": "g2", "limits": {"bogus": 1}}),
            ),
            (
                "object-add",
                json!({"qom-type": "throttle-group", "id": "g2", "x-bps-total": -5}),
            ),
            (
                "object-add",
                json!({"qom-type": "throttle-group", "id": "1bad"}),
            ),
            ("object-add", json!({"qom-type": "bogus", "id": "g2"})),
            ("object-del", json!({"id": "g0"})),
            ("object-del", json!({"id": "nope"})),
            (
                "qom-set",
                json!({"path": "g0", "property": "limits", "value": {"iops-total": 100}}),
            ),
            (
                "qom-get",
                json!({"path": "/objects/g0", "property": "limits"}),
            ),
            ("qom-get", json!({"path": "g0", "property": "x-bps-total"})),
            (
                "qom-set",
                json!({"path": "g0", "property": "x-bps-total", "value": 5}),
            ),
            (
                "qom-set",
                json!({"path": "nope", "property": "limits", "value": {}}),
            ),
            ("qom-get", json!({"path": "g0", "property": "nope"})),
            (
                "blockdev-add",
                json!({"driver": "throttle", "node-name": "t2", "file": "f", "throttle-group": "nope"}),
            ),
            (
                "blockdev-add",
                json!({"driver": "throttle", "node-name": "t2", "file": "f"}),
            ),
            (
                "blockdev-add",
                json!({"driver": "throttle", "node-name": "t2", "file": "f", "throttle-group": "g1"}),
            ),
            ("object-del", json!({"id": "g1"})),
            ("blockdev-del", json!({"node-name": "t2"})),
            ("object-del", json!({"id": "g1"})),
        ];
        for (command, args) in calls {
            replies.push(match c.execute(command, args).await {
                Ok(v) => json!({"return": v}),
                Err(e) => json!({"class": e.class.as_str(), "desc": e.desc}),
            });
        }
        let nodes = c
            .execute("query-named-block-nodes", json!({}))
            .await
            .unwrap();
        let text = nodes
            .to_string()
            .replace(dir.path().to_str().unwrap(), "<dir>");
        replies.push(normalize(serde_json::from_str(&text).unwrap()));
        seen.push((which, replies));
        finish(daemon, &mut c).await;
    }
    let ours = &seen[0].1;
    assert_eq!(
        ours[9],
        json!({"class": "GenericError", "desc": "object 'g0' is in use, can not be deleted"})
    );
    assert_eq!(ours[12]["return"]["iops-total"], 100);
    assert_eq!(ours[12]["return"]["bps-total"], 1048576);
    for (which, theirs) in &seen[1..] {
        for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
            if let Some(d) = first_difference(a, b) {
                panic!("reply {i}: blockd vs {which:?}: {d}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_set_io_throttle_throttles_a_node_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let daemon = Daemon::start(
        Impl::Blockd,
        dir.path(),
        &raw_export_args(dir.path(), &sock),
    );
    let mut c = daemon.qmp().await;
    let limits = |bps: u64| {
        json!({"device": "d", "bps": bps, "bps_rd": 0, "bps_wr": 0,
               "iops": 0, "iops_rd": 0, "iops_wr": 0})
    };
    let err = c
        .execute("block_set_io_throttle", json!({"device": "nope", "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}))
        .await
        .unwrap_err();
    assert_eq!(err.desc, "Device 'nope' not found");
    c.execute("block_set_io_throttle", limits(1 << 20))
        .await
        .unwrap();
    let drivers = |nodes: &Value| -> Vec<String> {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["drv"].as_str().unwrap().to_string())
            .collect()
    };
    let nodes = c
        .execute("query-named-block-nodes", json!({}))
        .await
        .unwrap();
    assert_eq!(drivers(&nodes), ["throttle", "raw", "file"]);
    let limits_now = c
        .execute("qom-get", json!({"path": "d", "property": "limits"}))
        .await
        .unwrap();
    assert_eq!(limits_now["bps-total"], 1 << 20);
    let cmds = chunked_writes("write", 0, 4 << 20);
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let started = std::time::Instant::now();
    qemu_io_nbd(&nbd_uri(&sock, "d"), &cmds);
    let elapsed = started.elapsed();
    assert!(elapsed.as_secs_f64() >= 3.0, "took only {elapsed:?}");
    c.execute("block_set_io_throttle", limits(0)).await.unwrap();
    let nodes = c
        .execute("query-named-block-nodes", json!({}))
        .await
        .unwrap();
    assert_eq!(drivers(&nodes), ["raw", "file"]);
    daemon.quit(&mut c).await;
}
