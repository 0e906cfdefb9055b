//! `transaction` end to end over two exported disks: atomic success, rollback that leaves
//! no bitmap, job or overlay, grouped completion where one failing backup cancels the
//! other and every bitmap keeps its old point in time — compared with qsd.

mod common;

use common::jobs::*;
use common::*;
use serde_json::{json, Value};
use std::path::Path;

/// Two 16 MiB disks d0/d1 with data, exported as e0/e1, and targets t0/t1. With
/// `failing_t1`, writes to t1 fail (blkdebug).
fn two_disks(dir: &Path, failing_t1: bool) -> Vec<String> {
    let mut args = Vec::new();
    for i in 0..2 {
        let disk = p(dir, &format!("d{i}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", &disk, "16M"]);
        qemu_io(&[
            "-f",
            "qcow2",
            &disk,
            "-c",
            &format!("write -P {} 0 2M", 0x10 + i),
        ]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            &p(dir, &format!("t{i}.qcow2")),
            "16M",
        ]);
        args.extend([
            s("--blockdev"),
            format!("driver=qcow2,node-name=d{i},file.driver=file,file.filename=d{i}.qcow2"),
        ]);
        if failing_t1 && i == 1 {
            args.extend([
                s("--blockdev"),
                format!(
                    r#"{{"driver":"qcow2","node-name":"t1","file":{{"driver":"blkdebug","image":{{"driver":"file","filename":"{}"}},"inject-error":[{{"event":"write_aio","errno":5}}]}}}}"#,
                    p(dir, "t1.qcow2")
                ),
            ]);
        } else {
            args.extend(target_args(&format!("t{i}"), &format!("t{i}.qcow2")));
        }
    }
    args.extend([
        s("--nbd-server"),
        format!(
            "addr.type=unix,addr.path={}",
            dir.join("nbd.sock").display()
        ),
        s("--export"),
        s("type=nbd,id=e0,node-name=d0,name=d0,writable=on"),
        s("--export"),
        s("type=nbd,id=e1,node-name=d1,name=d1,writable=on"),
    ]);
    args
}

fn uri(dir: &Path, export: &str) -> String {
    format!(
        "nbd+unix:///{export}?socket={}",
        dir.join("nbd.sock").display()
    )
}

/// Bitmaps of a node as (name, count) pairs.
async fn bitmaps_of(client: &mut qmp::Client, node: &str) -> Vec<(Value, Value)> {
    let nodes = client
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .and_then(|n| n["dirty-bitmaps"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|b| (b["name"].clone(), b["count"].clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_starts_backups_of_two_disks_atomically() {
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon::start(which, dir.path(), &two_disks(dir.path(), false));
        let mut client = daemon.qmp().await;
        client
            .execute(
                "transaction",
                json!({"actions": [
                    {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b"}},
                    {"type": "block-dirty-bitmap-add", "data": {"node": "d1", "name": "b"}},
                    {"type": "blockdev-backup", "data": {"job-id": "j0", "device": "d0", "target": "t0", "sync": "full"}},
                    {"type": "blockdev-backup", "data": {"job-id": "j1", "device": "d1", "target": "t1", "sync": "full"}}
                ]}),
            )
            .await
            .unwrap();
        // Written after the point in time: in the bitmaps, not in the backups.
        qemu_io(&[
            "-f",
            "raw",
            &uri(dir.path(), "d0"),
            "-c",
            "write -P 0x77 0 64k",
        ]);
        qemu_io(&[
            "-f",
            "raw",
            &uri(dir.path(), "d1"),
            "-c",
            "write -P 0x77 1M 64k",
        ]);
        let mut completed = Vec::new();
        while completed.len() < 2 {
            let event = client
                .wait_event("BLOCK_JOB_COMPLETED", WAIT)
                .await
                .expect("completion");
            assert!(event["data"].get("error").is_none(), "{which:?}: {event}");
            completed.push(event["data"]["device"].clone());
        }
        completed.sort_by_key(|v| v.to_string());
        assert_eq!(completed, [json!("j0"), json!("j1")]);
        for node in ["d0", "d1"] {
            assert_eq!(
                bitmaps_of(&mut client, node).await,
                [(json!("b"), json!(65536))],
                "{which:?} {node}"
            );
        }
        daemon.quit(&mut client).await;
        for i in 0..2 {
            qemu_io(&[
                "-f",
                "qcow2",
                &p(dir.path(), &format!("t{i}.qcow2")),
                "-c",
                &format!("read -P {} 0 2M", 0x10 + i),
            ]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_transaction_rolls_back_without_a_trace() {
    let mut outcomes = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon::start(which, dir.path(), &two_disks(dir.path(), false));
        let mut client = daemon.qmp().await;
        let err = client
            .execute(
                "transaction",
                json!({"actions": [
                    {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b"}},
                    {"type": "blockdev-backup", "data": {"job-id": "j0", "device": "d0", "target": "t0", "sync": "full"}},
                    {"type": "blockdev-snapshot-sync", "data": {"node-name": "d1", "snapshot-file": p(dir.path(), "s1.qcow2"), "snapshot-node-name": "s1"}},
                    {"type": "abort", "data": {}}
                ]}),
            )
            .await
            .unwrap_err();
        let events = job_events(&mut client, "j0", "null").await;
        let exports = client
            .execute("query-block-exports", json!({}))
            .await
            .unwrap();
        let jobs = client.execute("query-jobs", json!({})).await.unwrap();
        let nodes = client
            .execute("query-named-block-nodes", json!({"flat": true}))
            .await
            .unwrap();
        let names: Vec<Value> = nodes
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node-name"].clone())
            .filter(|n| !n.as_str().unwrap().starts_with('#'))
            .collect();
        let b0 = bitmaps_of(&mut client, "d0").await;
        outcomes.push(json!({
            "error": err.desc,
            "events": events,
            "exports": exports,
            "jobs": jobs,
            "nodes": names,
            "bitmaps": b0.len(),
        }));
        // Both disks still take writes where they did.
        qemu_io(&[
            "-f",
            "raw",
            &uri(dir.path(), "d1"),
            "-c",
            "write -P 0x55 0 64k",
        ]);
        daemon.quit(&mut client).await;
        qemu_io(&[
            "-f",
            "qcow2",
            &p(dir.path(), "d1.qcow2"),
            "-c",
            "read -P 0x55 0 64k",
        ]);
    }
    assert_eq!(
        outcomes[0]["error"],
        "Transaction aborted using Abort action"
    );
    assert_eq!(outcomes[0]["bitmaps"], 0);
    assert_eq!(outcomes[0]["jobs"], json!([]));
    assert_eq!(
        outcomes[0]["events"],
        json!(["created", "aborting", "concluded", "null"])
    );
    if outcomes.len() == 2 {
        assert_eq!(outcomes[0], outcomes[1]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_completion_cancels_the_other_job_and_keeps_bitmaps() {
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon::start(which, dir.path(), &two_disks(dir.path(), true));
        let mut client = daemon.qmp().await;
        for node in ["d0", "d1"] {
            client
                .execute("block-dirty-bitmap-add", json!({"node": node, "name": "b"}))
                .await
                .unwrap();
        }
        qemu_io(&[
            "-f",
            "raw",
            &uri(dir.path(), "d0"),
            "-c",
            "write -P 0x21 0 1M",
        ]);
        qemu_io(&[
            "-f",
            "raw",
            &uri(dir.path(), "d1"),
            "-c",
            "write -P 0x22 0 1M",
        ]);
        let before: Vec<_> = [
            bitmaps_of(&mut client, "d0").await,
            bitmaps_of(&mut client, "d1").await,
        ]
        .concat();
        let err = client
            .execute(
                "transaction",
                json!({"actions": [
                    {"type": "blockdev-backup", "data": {"job-id": "j0", "device": "d0", "target": "t0", "sync": "incremental", "bitmap": "b", "speed": 1 << 20}},
                    {"type": "blockdev-backup", "data": {"job-id": "j1", "device": "d1", "target": "t1", "sync": "incremental", "bitmap": "b"}}
                ], "properties": {"completion-mode": "grouped"}}),
            )
            .await;
        assert!(err.is_ok(), "{which:?}: {err:?}");
        let e0 = job_events(&mut client, "j0", "null").await;
        assert!(e0.contains(&s("BLOCK_JOB_CANCELLED")), "{which:?}: {e0:?}");
        let after: Vec<_> = [
            bitmaps_of(&mut client, "d0").await,
            bitmaps_of(&mut client, "d1").await,
        ]
        .concat();
        assert_eq!(before, after, "{which:?}: bitmaps keep their point in time");
        let refused = client
            .execute(
                "transaction",
                json!({"actions": [
                    {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "c"}}
                ], "properties": {"completion-mode": "grouped"}}),
            )
            .await
            .unwrap_err();
        assert_eq!(
            refused.desc,
            "Action 'block-dirty-bitmap-add' does not support transaction property completion-mode = grouped"
        );
        daemon.quit(&mut client).await;
    }
}
