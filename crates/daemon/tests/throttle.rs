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
        daemon.quit(&mut c).await;
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
