//! Internal qcow2 snapshots over QMP, with writes through an NBD export before and after,
//! judged by qemu-img (snapshot -l, check, snapshot -a on a copy compared with the content
//! saved through NBD at the time) and compared with qemu-storage-daemon: replies, errors,
//! and the transaction action with its rollback.

mod common;

use common::jobs::qemu_io;
use common::*;
use serde_json::{json, Value};
use std::path::Path;

fn uri(dir: &Path) -> String {
    format!("nbd+unix:///disk?socket={}", dir.join("nbd.sock").display())
}

/// `disk.qcow2` (4 MiB, data at 0 and 1 MiB) as node disk0, exported writable as `disk`.
fn exported_disk(dir: &Path, create_options: &str) -> Vec<String> {
    let disk = p(dir, "disk.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        create_options,
        &disk,
        "4M",
    ]);
    qemu_io(&[
        "-f",
        "qcow2",
        &disk,
        "-c",
        "write -P 0x11 0 128k",
        "-c",
        "write -P 0x12 1M 64k",
    ]);
    vec![
        s("--blockdev"),
        s("driver=file,node-name=file0,filename=disk.qcow2"),
        s("--blockdev"),
        s("driver=qcow2,node-name=disk0,file=file0"),
        s("--nbd-server"),
        format!(
            "addr.type=unix,addr.path={}",
            dir.join("nbd.sock").display()
        ),
        s("--export"),
        s("type=nbd,id=e0,node-name=disk0,name=disk,writable=on"),
    ]
}

fn nbd_write(dir: &Path, command: &str) {
    qemu_io(&["-f", "raw", &uri(dir), "-c", command]);
}

/// The guest content as an NBD client reads it now, saved to `name`.
fn save_through_nbd(dir: &Path, name: &str) {
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &uri(dir),
        &p(dir, name),
    ]);
}

/// (id, name) of the snapshots qemu-img lists.
fn listed(image: &str) -> Vec<(String, String)> {
    let info: Value =
        serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", image])).unwrap();
    info["snapshots"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["name"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn check_clean(image: &str) {
    let out = run(std::process::Command::new("qemu-img").args(["check", "--output=json", image]));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(out.status.success(), "qemu-img check {image}: {report}");
    for key in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(
            report.get(key).and_then(Value::as_u64).unwrap_or(0),
            0,
            "{report}"
        );
    }
}

/// A reply with its clock readings replaced: they differ between runs, not in shape.
fn without_times(mut reply: Value) -> Value {
    if let Value::Object(map) = &mut reply {
        for key in ["date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec"] {
            if let Some(value) = map.get_mut(key) {
                assert!(value.is_u64(), "{key}: {value}");
                *value = json!(0);
            }
        }
    }
    reply
}

fn outcome(result: Result<Value, qapi::error::QmpError>) -> Value {
    match result {
        Ok(reply) => json!({"return": without_times(reply)}),
        Err(e) => json!({"error": e.desc}),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_taken_while_writing_through_nbd_hold_their_content() {
    let mut outcomes = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let daemon = Daemon::start(which, d, &exported_disk(d, "cluster_size=65536"));
        let mut client = daemon.qmp().await;
        let mut replies = Vec::new();

        nbd_write(d, "write -P 0x21 0 64k");
        save_through_nbd(d, "at-s1.raw");
        replies.push(outcome(
            client
                .execute(
                    "blockdev-snapshot-internal-sync",
                    json!({"device": "disk0", "name": "s1"}),
                )
                .await,
        ));
        // A whole cluster, part of one (the rest must be copied), and a new one.
        nbd_write(d, "write -P 0x42 0 64k");
        nbd_write(d, "write -P 0x43 1052672 4k");
        nbd_write(d, "write -P 0x44 3M 64k");
        save_through_nbd(d, "at-s2.raw");
        replies.push(outcome(
            client
                .execute(
                    "blockdev-snapshot-internal-sync",
                    json!({"device": "disk0", "name": "s2"}),
                )
                .await,
        ));
        nbd_write(d, "write -P 0x45 64k 64k");
        nbd_write(d, "write -z 1M 64k");
        save_through_nbd(d, "at-s3.raw");
        replies.push(outcome(
            client
                .execute(
                    "blockdev-snapshot-internal-sync",
                    json!({"device": "disk0", "name": "s3"}),
                )
                .await,
        ));
        nbd_write(d, "write -P 0x46 0 4k");
        save_through_nbd(d, "final.raw");
        replies.push(outcome(
            client
                .execute(
                    "blockdev-snapshot-delete-internal-sync",
                    json!({"device": "disk0", "name": "s2"}),
                )
                .await,
        ));
        replies.push(outcome(
            client
                .execute(
                    "blockdev-snapshot-delete-internal-sync",
                    json!({"device": "disk0", "id": "3", "name": "s3"}),
                )
                .await,
        ));
        // The export still serves what was written after every change.
        qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &p(d, "final.raw"),
            &uri(d),
        ]);
        daemon.quit(&mut client).await;

        let image = p(d, "disk.qcow2");
        assert_eq!(listed(&image), vec![(s("1"), s("s1"))], "{which:?}");
        check_clean(&image);
        qemu_img(&["compare", "-F", "raw", &image, &p(d, "final.raw")]);
        let copy = p(d, "copy.qcow2");
        std::fs::copy(&image, &copy).unwrap();
        qemu_img(&["snapshot", "-a", "s1", &copy]);
        check_clean(&copy);
        qemu_img(&["compare", "-F", "raw", &copy, &p(d, "at-s1.raw")]);
        outcomes.push(replies);
    }
    let blockd = &outcomes[0];
    assert_eq!(blockd[0], json!({"return": {}}));
    assert_eq!(
        blockd[3],
        json!({"return": {"id": "2", "name": "s2", "vm-state-size": 0, "date-sec": 0,
            "date-nsec": 0, "vm-clock-sec": 0, "vm-clock-nsec": 0}})
    );
    if outcomes.len() == 2 {
        assert_eq!(outcomes[0], outcomes[1], "blockd vs qsd");
    }
}

/// Every refusal (and the replies between them) as qsd gives them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_and_errors_match_qsd() {
    let mut outcomes = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut args = exported_disk(d, "cluster_size=65536");
        qemu_img(&["create", "-q", "-f", "raw", &p(d, "raw.img"), "1M"]);
        let ro = p(d, "ro.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", &ro, "1M"]);
        qemu_img(&["snapshot", "-c", "old", &ro]);
        let tiny = p(d, "tiny.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=1",
            &tiny,
            "1M",
        ]);
        args.extend([
            s("--blockdev"),
            s("driver=raw,node-name=raw0,file.driver=file,file.filename=raw.img"),
            s("--blockdev"),
            s("driver=qcow2,node-name=ro0,read-only=on,file.driver=file,file.filename=ro.qcow2"),
            s("--blockdev"),
            s("driver=qcow2,node-name=tiny0,file.driver=file,file.filename=tiny.qcow2"),
        ]);
        let daemon = Daemon::start(which, d, &args);
        let mut client = daemon.qmp().await;
        let create = |device: &str, name: Value| {
            (
                s("blockdev-snapshot-internal-sync"),
                json!({"device": device, "name": name}),
            )
        };
        let delete = |args: Value| (s("blockdev-snapshot-delete-internal-sync"), args);
        let commands = vec![
            create("disk0", json!("a")),
            create("disk0", json!("a")),
            create("disk0", json!("1")),
            create("disk0", json!("")),
            create("nope", json!("a")),
            create("file0", json!("a")),
            create("raw0", json!("a")),
            create("ro0", json!("a")),
            create("disk0", json!(5)),
            create("tiny0", json!("a")),
            (
                s("blockdev-snapshot-internal-sync"),
                json!({"device": "disk0"}),
            ),
            (
                s("blockdev-snapshot-internal-sync"),
                json!({"device": "disk0", "name": "x", "y": 1}),
            ),
            delete(json!({"device": "disk0"})),
            delete(json!({"device": "nope", "name": "a"})),
            delete(json!({"device": "file0", "name": "a"})),
            delete(json!({"device": "raw0", "name": "a"})),
            delete(json!({"device": "disk0", "name": "zz"})),
            delete(json!({"device": "disk0", "id": "9"})),
            delete(json!({"device": "disk0", "id": "1", "name": "1"})),
            delete(json!({"device": "ro0", "name": "missing"})),
            delete(json!({"device": "ro0", "name": "old"})),
            delete(json!({"device": "disk0", "name": "1"})),
            create("disk0", json!("b")),
            delete(json!({"device": "disk0", "id": "1"})),
            create("disk0", json!("c")),
            delete(json!({"device": "disk0", "id": "3", "name": "b"})),
        ];
        let mut replies = Vec::new();
        for (command, args) in commands {
            let reply = outcome(client.execute(&command, args.clone()).await);
            replies.push(json!({"command": command, "args": args, "outcome": reply}));
        }
        // query-named-block-nodes lists each node's snapshots in its image info.
        let nodes = client
            .execute("query-named-block-nodes", json!({"flat": true}))
            .await
            .unwrap();
        for node in nodes.as_array().unwrap() {
            // qsd drops a snapshot from its list when deleting it fails (ro0's "old"), though
            // the image keeps it; blockd keeps listing it.
            if node["node-name"] == "ro0" && which == Impl::Blockd {
                assert_eq!(node["image"]["snapshots"][0]["name"], "old", "{node}");
            }
            if node["node-name"] == "ro0" {
                continue;
            }
            let snapshots: Vec<Value> = node["image"]["snapshots"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(without_times)
                .collect();
            replies.push(normalize(
                json!({"node": node["node-name"], "snapshots": snapshots}),
            ));
        }
        daemon.quit(&mut client).await;
        let image = p(d, "disk.qcow2");
        check_clean(&image);
        assert_eq!(
            listed(&image),
            vec![(s("2"), s("b")), (s("3"), s("c"))],
            "{which:?}"
        );
        assert_eq!(listed(&ro), vec![(s("1"), s("old"))], "{which:?}");
        outcomes.push(replies);
    }
    let disk0 = outcomes[0]
        .iter()
        .find(|r| r["node"] == "disk0")
        .expect("disk0 listed");
    let ids: Vec<&Value> = disk0["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["id"])
        .collect();
    assert_eq!(ids, [&json!("2"), &json!("3")]);
    if outcomes.len() == 2 {
        assert_eq!(outcomes[0].len(), outcomes[1].len());
        for (ours, theirs) in outcomes[0].iter().zip(&outcomes[1]) {
            assert_eq!(ours, theirs, "blockd vs qsd");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_takes_internal_snapshots_all_or_nothing() {
    let mut outcomes = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let daemon = Daemon::start(which, d, &exported_disk(d, "cluster_size=65536"));
        let mut client = daemon.qmp().await;
        let snap = |name: &str| {
            json!({"type": "blockdev-snapshot-internal-sync",
                "data": {"device": "disk0", "name": name}})
        };
        let mut replies = Vec::new();
        for actions in [
            json!([snap("t1"), {"type": "abort", "data": {}}]),
            json!([snap("t1"), snap("t2"), snap("t1")]),
            json!([snap("t3"), {"type": "block-dirty-bitmap-add",
                "data": {"node": "disk0", "name": "b0"}}]),
        ] {
            replies.push(outcome(
                client
                    .execute("transaction", json!({"actions": actions}))
                    .await,
            ));
            // Every rollback leaves the export writable, in place of the snapshot's content.
            nbd_write(d, "write -P 0x51 0 64k");
        }
        save_through_nbd(d, "final.raw");
        daemon.quit(&mut client).await;
        let image = p(d, "disk.qcow2");
        assert_eq!(listed(&image), vec![(s("1"), s("t3"))], "{which:?}");
        check_clean(&image);
        qemu_img(&["compare", "-F", "raw", &image, &p(d, "final.raw")]);
        outcomes.push(replies);
    }
    assert_eq!(
        outcomes[0],
        vec![
            json!({"error": "Transaction aborted using Abort action"}),
            json!({"error": "Snapshot with name 't1' already exists on device 'disk0'"}),
            json!({"return": {}}),
        ]
    );
    if outcomes.len() == 2 {
        assert_eq!(outcomes[0], outcomes[1], "blockd vs qsd");
    }
}
