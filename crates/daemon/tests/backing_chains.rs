//! Backing chains named by image headers: a long one opens (each level nests an open on
//! the I/O thread's stack, which ran out at about 150 levels before), and images that
//! name each other are refused with qemu-img's words instead of opening each other until
//! the stack overflows (qsd hangs on them).

mod common;

use common::*;
use serde_json::{json, Value};

/// A qcow2 naming `backing` (unchecked, as `qemu-img rebase -u` leaves it).
fn overlay(dir: &std::path::Path, name: &str, backing: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        backing,
        "-F",
        "qcow2",
        &p(dir, name),
        "1M",
    ]);
}

async fn add(client: &mut qmp::Client, node: &str, file: &str) -> Value {
    reply(
        client,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": node, "read-only": true,
               "file": {"driver": "file", "filename": file, "read-only": true}}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_chains_open_and_loops_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let levels = 200;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &p(dir.path(), "c0.qcow2"),
        "1M",
    ]);
    for i in 1..=levels {
        overlay(
            dir.path(),
            &format!("c{i}.qcow2"),
            &format!("c{}.qcow2", i - 1),
        );
    }
    overlay(dir.path(), "a.qcow2", "b.qcow2");
    overlay(dir.path(), "b.qcow2", "a.qcow2");
    overlay(dir.path(), "self.qcow2", "self.qcow2");
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &[]);
    let mut client = daemon.qmp().await;
    let answer = add(&mut client, "top", &format!("c{levels}.qcow2")).await;
    assert!(answer.get("return").is_some(), "{answer}");
    let nodes = client
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let formats = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["drv"] == "qcow2")
        .count();
    assert_eq!(formats, levels + 1);
    for (node, file, error) in [
        (
            "a",
            "a.qcow2",
            "Could not open backing file: Backing file 'a.qcow2' creates an infinite loop",
        ),
        (
            "self",
            "self.qcow2",
            "Backing file 'self.qcow2' creates an infinite loop",
        ),
    ] {
        let answer = add(&mut client, node, file).await;
        assert_eq!(answer["error"]["desc"], error, "{answer}");
    }
    daemon.quit(&mut client).await;
}
