//! External snapshots built live while a client writes through NBD: the export moves to
//! each new overlay, images get the right backing names, and qemu-img reads the chain as
//! the client wrote it. Errors are compared with qemu-storage-daemon.

mod common;

use common::jobs::*;
use common::*;
use serde_json::{json, Value};
use std::path::Path;

fn disk_args(dir: &Path) -> Vec<String> {
    vec![
        s("--blockdev"),
        s("driver=qcow2,node-name=disk0,file.driver=file,file.filename=disk.qcow2"),
        s("--nbd-server"),
        format!(
            "addr.type=unix,addr.path={}",
            dir.join("nbd.sock").display()
        ),
        s("--export"),
        s("type=nbd,id=e0,node-name=disk0,name=disk,writable=on"),
    ]
}

fn uri(dir: &Path) -> String {
    format!("nbd+unix:///disk?socket={}", dir.join("nbd.sock").display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_chain_built_live_while_writing() {
    let dir = tempfile::tempdir().unwrap();
    let disk = p(dir.path(), "disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &disk, "16M"]);
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &disk_args(dir.path()));
    let mut client = daemon.qmp().await;
    qemu_io(&["-f", "raw", &uri(dir.path()), "-c", "write -P 0x01 0 4M"]);
    let s1 = p(dir.path(), "s1.qcow2");
    client
        .execute(
            "blockdev-snapshot-sync",
            json!({"node-name": "disk0", "snapshot-file": s1, "snapshot-node-name": "s1"}),
        )
        .await
        .unwrap();
    qemu_io(&["-f", "raw", &uri(dir.path()), "-c", "write -P 0x02 1M 1M"]);
    // blockdev-snapshot with an overlay added by the user.
    let s2 = p(dir.path(), "s2.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", &s1, "-F", "qcow2", &s2]);
    client
        .execute(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "s2", "backing": null, "file": {"driver": "file", "filename": s2}}),
        )
        .await
        .unwrap();
    client
        .execute("blockdev-snapshot", json!({"node": "s1", "overlay": "s2"}))
        .await
        .unwrap();
    qemu_io(&["-f", "raw", &uri(dir.path()), "-c", "write -P 0x03 3M 64k"]);
    let exports = client
        .execute("query-block-exports", json!({}))
        .await
        .unwrap();
    assert_eq!(exports[0]["node-name"], "s2");
    let nodes = client
        .execute("query-named-block-nodes", json!({}))
        .await
        .unwrap();
    let top: &Value = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "s2")
        .unwrap();
    assert_eq!(top["backing_file_depth"], 2);
    // The old layers are busy as backing images.
    let err = client
        .execute(
            "blockdev-snapshot",
            json!({"node": "s1", "overlay": "disk0"}),
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.desc,
        "Node 's1' is busy: node is used as backing hd of 's2'"
    );
    daemon.quit(&mut client).await;
    let chain = qemu_img(&["info", "--backing-chain", &s2]);
    assert!(
        chain.contains("backing file: ") && chain.contains("disk.qcow2"),
        "{chain}"
    );
    for image in [&disk, &s1, &s2] {
        qemu_img(&["check", image]);
    }
    qemu_io(&[
        "-f",
        "qcow2",
        "-r",
        &s2,
        "-c",
        "read -P 0x01 0 1M",
        "-c",
        "read -P 0x02 1M 1M",
        "-c",
        "read -P 0x03 3M 64k",
    ]);
    // Each layer holds only what was written while it was on top.
    qemu_io(&["-f", "qcow2", "-r", &disk, "-c", "read -P 0x01 1M 1M"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_errors_answer_like_qsd() {
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            &p(dir.path(), "disk.qcow2"),
            "16M",
        ]);
        let daemon = Daemon::start(which, dir.path(), &disk_args(dir.path()));
        let mut client = daemon.qmp().await;
        let x = p(dir.path(), "x.qcow2");
        let script = [
            (
                "blockdev-snapshot-sync",
                json!({"node-name": "nope", "snapshot-file": x}),
            ),
            (
                "blockdev-snapshot-sync",
                json!({"device": "disk0", "snapshot-file": x}),
            ),
            (
                "blockdev-snapshot-sync",
                json!({"node-name": "disk0", "snapshot-file": x, "snapshot-node-name": "disk0"}),
            ),
            (
                "blockdev-snapshot-sync",
                json!({"node-name": "disk0", "snapshot-file": x, "snapshot-node-name": "sx"}),
            ),
            (
                "blockdev-snapshot-sync",
                json!({"node-name": "disk0", "snapshot-file": x, "snapshot-node-name": "sy"}),
            ),
            (
                "blockdev-snapshot",
                json!({"node": "nope", "overlay": "sx"}),
            ),
            (
                "blockdev-snapshot",
                json!({"node": "sx", "overlay": "nope"}),
            ),
        ];
        let mut replies = Vec::new();
        for (command, args) in &script {
            replies.push(match client.execute(command, args.clone()).await {
                Ok(v) => json!({"return": v}),
                Err(e) => json!({"error": e.desc}),
            });
        }
        let exports = client
            .execute("query-block-exports", json!({}))
            .await
            .unwrap();
        replies.push(exports[0]["node-name"].clone());
        daemon.quit(&mut client).await;
        all.push(replies);
    }
    assert_eq!(all[0].last().unwrap(), "sx");
    if all.len() == 2 {
        assert_eq!(all[0], all[1]);
    }
}

/// A snapshot or reopen that would put a node below itself is refused with QEMU's text and
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_that_would_close_a_cycle_are_refused_like_qsd() {
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["lower.qcow2", "upper.qcow2"] {
            qemu_img(&["create", "-q", "-f", "qcow2", &p(dir.path(), name), "16M"]);
        }
        let daemon = Daemon::start(which, dir.path(), &[]);
        let mut client = daemon.qmp().await;
        let script = [
            (
                "blockdev-add",
                json!({"driver": "file", "node-name": "lf", "filename": p(dir.path(), "lower.qcow2")}),
            ),
            (
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": "lower", "file": "lf"}),
            ),
            (
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": "upper", "backing": "lower",
                       "file": {"driver": "file", "filename": p(dir.path(), "upper.qcow2")}}),
            ),
            (
                "blockdev-snapshot",
                json!({"node": "upper", "overlay": "lower"}),
            ),
            (
                "blockdev-reopen",
                json!({"options": [{"driver": "qcow2", "node-name": "lower", "file": "lf",
                                    "backing": "upper"}]}),
            ),
        ];
        let mut replies = Vec::new();
        for (command, args) in &script {
            replies.push(reply(&mut client, command, args.clone()).await);
        }
        let nodes = client
            .execute("query-named-block-nodes", json!({}))
            .await
            .unwrap();
        for node in nodes.as_array().unwrap() {
            if node["drv"] == "qcow2" {
                let name = node["node-name"].as_str().unwrap();
                replies.push(json!([name, node["backing_file_depth"]]));
            }
        }
        daemon.quit(&mut client).await;
        all.push(replies);
    }
    let cycle = "Making 'upper' a backing child of 'lower' would create a cycle";
    assert_eq!(all[0][3]["error"]["desc"], cycle);
    assert_eq!(all[0][4]["error"]["desc"], cycle);
    if all.len() == 2 {
        assert_eq!(all[0], all[1]);
    }
}
