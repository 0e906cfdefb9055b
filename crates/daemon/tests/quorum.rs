//! The quorum driver against qemu-storage-daemon: votes, QUORUM_REPORT_BAD and
//! QUORUM_FAILURE events with the same data, corrupted copies rewritten, failing children
//! outvoted on writes and skipped by fifo reads, and option errors in qsd's words.

mod common;

use common::jobs::qemu_io;
use common::*;
use serde_json::{json, Value};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

/// Raw images `name`.img of 4 MiB with 1 MiB of pattern 1 at the start, opened as nodes.
fn raw_children(d: &Path, names: &[&str]) -> Vec<String> {
    let mut args = Vec::new();
    for name in names {
        let image = p(d, &format!("{name}.img"));
        qemu_img(&["create", "-q", "-f", "raw", &image, "4M"]);
        qemu_io(&["-f", "raw", "-c", "write -P 1 0 1M", &image]);
        args.extend([
            s("--blockdev"),
            format!("driver=raw,node-name={name},file.driver=file,file.filename={image}"),
        ]);
    }
    args
}

/// 512 bytes of 0xaa at 64 KiB into `name`.img, behind the daemon's back.
fn corrupt(d: &Path, name: &str) {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(p(d, &format!("{name}.img")))
        .unwrap();
    file.seek(SeekFrom::Start(64 << 10)).unwrap();
    file.write_all(&[0xaa; 512]).unwrap();
}

fn quorum(node: &str, children: &[&str], extra: Value) -> Vec<String> {
    let mut options = json!({"driver": "quorum", "node-name": node, "children": children});
    options
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    vec![
        s("--blockdev"),
        options.to_string(),
        s("--export"),
        format!("type=nbd,id={node},node-name={node},name={node},writable=on"),
    ]
}

fn nbd(d: &Path) -> Vec<String> {
    vec![
        s("--nbd-server"),
        format!("addr.type=unix,addr.path={}", p(d, "nbd.sock")),
    ]
}

fn uri(d: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", p(d, "nbd.sock"))
}

/// qemu-io's output, whether or not the requests succeeded.
fn qemu_io_any(args: &[&str]) -> String {
    let out = run(Command::new("qemu-io").args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An event without its timestamp.
fn strip(e: &Value) -> Value {
    json!({"event": e["event"], "data": e["data"]})
}

/// Waits for a `name` event, then returns the quorum events so far, that one last.
async fn events_until(client: &mut qmp::Client, name: &str) -> Vec<Value> {
    let last = client.wait_event(name, WAIT).await.unwrap();
    let mut events: Vec<Value> = client
        .drain_events()
        .iter()
        .filter(|e| e["event"].as_str().unwrap_or("").starts_with("QUORUM"))
        .map(strip)
        .collect();
    events.push(strip(&last));
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn votes_reports_and_rewrites_like_qsd() {
    let mut seen = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut args = raw_children(d, &["a1", "a2", "a3", "b1", "b2", "b3"]);
        corrupt(d, "a3");
        corrupt(d, "b3");
        args.extend(nbd(d));
        args.extend(quorum(
            "qa",
            &["a1", "a2", "a3"],
            json!({"vote-threshold": 2, "rewrite-corrupted": true}),
        ));
        args.extend(quorum(
            "qb",
            &["b1", "b2", "b3"],
            json!({"vote-threshold": 3}),
        ));
        let daemon = Daemon::start(which, d, &args);
        let mut client = daemon.qmp().await;

        // Two of three agree: the read gets their data, the third is reported and rewritten.
        let out = qemu_io_any(&["-f", "raw", "-c", "read -P 1 0 128k", &uri(d, "qa")]);
        assert!(!out.contains("failed"), "{which:?}: {out}");
        // Writes reach every child.
        qemu_io(&["-f", "raw", "-c", "write -P 2 1M 64k", &uri(d, "qa")]);
        // All three needed: no majority, the read fails.
        let out = qemu_io_any(&["-f", "raw", "-c", "read 0 128k", &uri(d, "qb")]);
        assert!(
            out.contains("read failed: Input/output error"),
            "{which:?}: {out}"
        );
        // Events arrive on their own time: wait for the failure's.
        let got = events_until(&mut client, "QUORUM_FAILURE").await;
        daemon.quit(&mut client).await;

        // The corrupted copy was rewritten with the winning data; the others are whole.
        for image in ["a1", "a2", "a3"] {
            let image = p(d, &format!("{image}.img"));
            qemu_io(&[
                "-f",
                "raw",
                "-c",
                "read -P 1 0 1M",
                "-c",
                "read -P 2 1M 64k",
                &image,
            ]);
        }
        qemu_io(&["-f", "raw", "-c", "read -P 0xaa 64k 512", &p(d, "b3.img")]);
        seen.push(got);
    }
    assert!(!seen[0].is_empty());
    assert_eq!(seen[0], seen[1], "events of blockd, then qsd");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_children_are_outvoted_and_skipped_like_qsd() {
    let mut seen = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut args = raw_children(d, &["w1", "w2", "f2"]);
        // A child whose writes fail, and one whose reads fail.
        let failing = |name: &str, event: &str, iotype: &str| {
            let image = p(d, &format!("{name}.img"));
            qemu_img(&["create", "-q", "-f", "raw", &image, "4M"]);
            qemu_io(&["-f", "raw", "-c", "write -P 1 0 1M", &image]);
            vec![
                s("--blockdev"),
                format!(
                    "driver=raw,node-name={name},file.driver=blkdebug,\
                     file.image.driver=file,file.image.filename={image},\
                     file.inject-error.0.event={event},file.inject-error.0.iotype={iotype},\
                     file.inject-error.0.errno=5"
                ),
            ]
        };
        args.extend(failing("w3", "write_aio", "write"));
        args.extend(failing("f1", "read_aio", "read"));
        args.extend(nbd(d));
        args.extend(quorum(
            "qw",
            &["w1", "w2", "w3"],
            json!({"vote-threshold": 2}),
        ));
        args.extend(quorum(
            "qf",
            &["f1", "f2"],
            json!({"vote-threshold": 1, "read-pattern": "fifo"}),
        ));
        let daemon = Daemon::start(which, d, &args);
        let mut client = daemon.qmp().await;

        qemu_io(&["-f", "raw", "-c", "write -P 3 0 4k", &uri(d, "qw")]);
        let mut got = events_until(&mut client, "QUORUM_REPORT_BAD").await;
        qemu_io(&["-f", "raw", "-c", "read -P 1 0 64k", &uri(d, "qf")]);
        got.extend(events_until(&mut client, "QUORUM_REPORT_BAD").await);
        daemon.quit(&mut client).await;
        for image in ["w1", "w2"] {
            qemu_io(&[
                "-f",
                "raw",
                "-c",
                "read -P 3 0 4k",
                &p(d, &format!("{image}.img")),
            ]);
        }
        seen.push(got);
    }
    assert_eq!(seen[0], seen[1], "events of blockd, then qsd");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_errors_read_as_qsds() {
    let mut answers = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let daemon = Daemon::start(which, d, &raw_children(d, &["c1", "c2", "c3"]));
        let mut client = daemon.qmp().await;
        let mut replies = Vec::new();
        for extra in [
            json!({"children": []}),
            json!({"children": [], "vote-threshold": 1}),
            json!({"children": ["c1", "c2"], "vote-threshold": 0}),
            json!({"children": ["c1", "c2"], "vote-threshold": 3}),
            json!({"children": ["c1", "c2", "c3"], "vote-threshold": 2, "blkverify": true}),
            json!({"children": ["c1", "c2"], "vote-threshold": 2, "blkverify": true,
                   "rewrite-corrupted": true}),
            json!({"children": ["c1", "c2"], "vote-threshold": 1, "read-pattern": "sideways"}),
            json!({"children": ["c1", "nosuch"], "vote-threshold": 1}),
            json!({"children": ["c1", "c2"], "vote-threshold": 1, "bogus": 1}),
        ] {
            let mut args = json!({"driver": "quorum", "node-name": "q"});
            args.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            replies.push(reply(&mut client, "blockdev-add", args).await);
        }
        daemon.quit(&mut client).await;
        answers.push(replies);
    }
    assert_eq!(answers[0], answers[1], "blockd, then qsd");
}

/// x-blockdev-change on a quorum: a new child is named children.N and gets the writes,
/// children go while at least vote-threshold stay, and the refusals read as qsd's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_come_and_go_like_qsd() {
    let mut answers = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut args = raw_children(d, &["c1", "c2", "c3", "c4", "v1", "v2"]);
        args.extend(nbd(d));
        args.extend(quorum(
            "q",
            &["c1", "c2", "c3"],
            json!({"vote-threshold": 2}),
        ));
        args.extend([
            s("--blockdev"),
            json!({"driver": "quorum", "node-name": "v", "children": ["v1", "v2"],
                   "vote-threshold": 2, "blkverify": true})
            .to_string(),
        ]);
        let daemon = Daemon::start(which, d, &args);
        let mut client = daemon.qmp().await;
        let mut replies = Vec::new();
        for change in [
            json!({"parent": "q", "node": "c4"}),
            json!({"parent": "q", "node": "c2"}),
            json!({"parent": "v", "node": "c4"}),
            json!({"parent": "q", "child": "children.0"}),
            json!({"parent": "q", "child": "children.0"}),
            json!({"parent": "q", "child": "children.1"}),
            json!({"parent": "q", "child": "children.2"}),
            json!({"parent": "q", "node": "nosuch"}),
            json!({"parent": "q"}),
        ] {
            replies.push(reply(&mut client, "x-blockdev-change", change).await);
        }
        assert_eq!(replies[0], json!({"return": {}}), "{which:?}: {replies:?}");
        assert_eq!(replies[3], json!({"return": {}}), "{which:?}: {replies:?}");
        assert!(replies[6]["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("lower than the vote threshold 2"));
        // What is left: c3 and c4, which both get a write.
        let graph = client
            .execute("x-debug-query-block-graph", json!({}))
            .await
            .unwrap();
        let names: std::collections::HashMap<u64, String> = graph["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["id"].as_u64().unwrap(),
                    n["name"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let mut edges: Vec<(String, String)> = graph["edges"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| names[&e["parent"].as_u64().unwrap()] == "q")
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_owned(),
                    names[&e["child"].as_u64().unwrap()].clone(),
                )
            })
            .collect();
        edges.sort();
        replies.push(json!(edges));
        qemu_io(&["-f", "raw", "-c", "write -P 4 2M 4k", &uri(d, "q")]);
        daemon.quit(&mut client).await;
        for image in ["c3", "c4"] {
            qemu_io(&[
                "-f",
                "raw",
                "-c",
                "read -P 4 2M 4k",
                &p(d, &format!("{image}.img")),
            ]);
        }
        qemu_io(&["-f", "raw", "-c", "read -P 0 2M 4k", &p(d, "c1.img")]);
        answers.push(replies);
    }
    assert_eq!(answers[0], answers[1], "blockd, then qsd");
}

/// Children must stay alike: children of different sizes are refused, and so is anyone
/// else writing to a child, in qsd's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_stay_alike_like_qsd() {
    let mut answers = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut args = raw_children(d, &["c1", "c2"]);
        let small = p(d, "small.img");
        qemu_img(&["create", "-q", "-f", "raw", &small, "2M"]);
        args.extend([
            s("--blockdev"),
            format!("driver=raw,node-name=small,file.driver=file,file.filename={small}"),
        ]);
        args.extend(nbd(d));
        let daemon = Daemon::start(which, d, &args);
        let mut client = daemon.qmp().await;
        let mut replies = Vec::new();
        let quorum = |children: &[&str]| {
            json!({"driver": "quorum", "node-name": "q", "children": children,
                   "vote-threshold": 1})
        };
        replies.push(reply(&mut client, "blockdev-add", quorum(&["c1", "small"])).await);
        replies.push(reply(&mut client, "blockdev-add", quorum(&["c1", "c2"])).await);
        replies.push(
            reply(
                &mut client,
                "block-export-add",
                json!({"type": "nbd", "id": "e1", "node-name": "c1", "writable": true}),
            )
            .await,
        );
        replies.push(
            reply(
                &mut client,
                "block-export-add",
                json!({"type": "nbd", "id": "e2", "node-name": "c1", "writable": false}),
            )
            .await,
        );
        daemon.quit(&mut client).await;
        answers.push(replies);
    }
    assert_eq!(answers[0][1], json!({"return": {}}));
    assert!(answers[0][2].get("error").is_some(), "{:?}", answers[0]);
    assert_eq!(answers[0], answers[1], "blockd, then qsd");
}
