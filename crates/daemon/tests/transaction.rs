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
    named_node(client, node)
        .await
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

/// 4 KiB blocks written by [`LockStepWriter`]; each holds its write's number.
const BLOCK: usize = 4096;

/// The contents of write number `i`: `i` in every 8 bytes.
fn block_of(i: u64) -> Vec<u8> {
    i.to_le_bytes().repeat(BLOCK / 8)
}

/// A client writing through NBD without pause on its own thread: write `i` (from 1) goes
/// to block `i % blocks` of every export in turn, each acknowledged before the next is
/// sent. `done` counts the writes acknowledged by all exports.
struct LockStepWriter {
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl LockStepWriter {
    fn start(sock: &Path, exports: &[&str], blocks: u64) -> LockStepWriter {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let done = std::sync::Arc::new(AtomicU64::new(0));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let addr = nbd::ConnectAddr::Unix(sock.to_path_buf());
        let exports: Vec<String> = exports.iter().map(|e| e.to_string()).collect();
        let (thread_done, thread_stop) = (done.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(tokio::task::LocalSet::new().run_until(async move {
                let mut clients = Vec::new();
                for export in &exports {
                    let client = nbd::Client::connect(&addr, export, &Default::default())
                        .await
                        .unwrap_or_else(|e| panic!("connecting to {export}: {e}"));
                    clients.push(client);
                }
                let mut i = 0;
                while !thread_stop.load(Ordering::Acquire) {
                    i += 1;
                    let offset = (i % blocks) * BLOCK as u64;
                    for client in &clients {
                        client
                            .write(offset, &block_of(i), false)
                            .await
                            .unwrap_or_else(|e| panic!("write {i}: {e}"));
                    }
                    thread_done.store(i, Ordering::Release);
                }
                for client in clients {
                    client.disconnect().await.unwrap();
                }
                i
            }))
        });
        LockStepWriter { done, stop, thread }
    }

    /// Wait until `n` more writes were acknowledged.
    async fn wait_for(&self, n: u64) {
        let target = self.done.load(std::sync::atomic::Ordering::Acquire) + n;
        let deadline = std::time::Instant::now() + WAIT;
        while self.done.load(std::sync::atomic::Ordering::Acquire) < target {
            assert!(std::time::Instant::now() < deadline, "the writer stalled");
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// Stop after the write in progress; the number of the last write acknowledged.
    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread.join().expect("the writer failed")
    }
}

/// The raw contents of an image, as qemu-img reads them.
fn raw_contents(dir: &Path, image: &str) -> Vec<u8> {
    let raw = p(dir, &format!("{image}.raw"));
    qemu_img(&["convert", "-O", "raw", &p(dir, image), &raw]);
    std::fs::read(&raw).unwrap()
}

/// Disks `names` of 16 MiB (qcow2, zero), their nodes named as the files, each exported
/// writable under its own name over `nbd.sock`.
fn exported_disks(dir: &Path, names: &[&str]) -> Vec<String> {
    let mut args = Vec::new();
    for name in names {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            &p(dir, &format!("{name}.qcow2")),
            "16M",
        ]);
        args.extend(target_args(name, &format!("{name}.qcow2")));
    }
    args.extend([
        s("--nbd-server"),
        format!(
            "addr.type=unix,addr.path={}",
            dir.join("nbd.sock").display()
        ),
    ]);
    for name in names {
        args.extend([
            s("--export"),
            format!("type=nbd,id=e-{name},node-name={name},name={name},writable=on"),
        ]);
    }
    args
}

/// A transaction that snapshots the disk a client is writing to and then fails: the disk
/// and its overlay stay drained until the abort, so every write the client saw
/// acknowledged is in the disk afterwards (none was left in the overlay that the abort
/// takes away).
///
/// blockd only: qsd 10.0.2 fails this. It drains the disk, but the export moves to the
/// overlay, which is not drained, and writes resume there until the abort drops them (on
/// this machine each run lost some of the writes acknowledged during the transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_transaction_loses_no_acknowledged_write() {
    const BLOCKS: u64 = 4096;
    {
        let which = Impl::Blockd;
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon::start(
            which,
            dir.path(),
            &exported_disks(dir.path(), &["d0", "d1"]),
        );
        let mut client = daemon.qmp().await;
        let writer = LockStepWriter::start(&dir.path().join("nbd.sock"), &["d0"], BLOCKS);
        writer.wait_for(50).await;
        // The second snapshot (an image to create) keeps the first one in place a while
        // before the abort takes both back.
        let err = client
            .execute(
                "transaction",
                json!({"actions": [
                    {"type": "blockdev-snapshot-sync", "data": {"node-name": "d0", "snapshot-file": p(dir.path(), "o0.qcow2"), "snapshot-node-name": "o0"}},
                    {"type": "blockdev-snapshot-sync", "data": {"node-name": "d1", "snapshot-file": p(dir.path(), "o1.qcow2"), "snapshot-node-name": "o1"}},
                    {"type": "abort", "data": {}}
                ]}),
            )
            .await
            .unwrap_err();
        assert_eq!(
            err.desc, "Transaction aborted using Abort action",
            "{which:?}"
        );
        writer.wait_for(50).await;
        let last = writer.stop();
        daemon.quit(&mut client).await;
        let disk = raw_contents(dir.path(), "d0.qcow2");
        for block in 0..BLOCKS {
            // The last write to the block, if any (the writer did not wrap around).
            let expected = match block {
                0 if last >= BLOCKS => block_of(BLOCKS),
                b if b >= 1 && b <= last => block_of(b),
                _ => vec![0; BLOCK],
            };
            let at = block as usize * BLOCK;
            assert!(
                disk[at..at + BLOCK] == expected[..],
                "{which:?}: block {block} of {last} written lost its data"
            );
        }
        assert!(last < BLOCKS, "{which:?}: the writer wrapped around");
    }
}

/// Backups of two disks started by one transaction share one point in time: a client
/// writes the same counter to both disks in turn, so any point in time sees the second
/// disk at most one write behind the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_backs_up_two_disks_at_one_point_in_time() {
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let mut args = exported_disks(dir.path(), &["d0", "d1", "d2"]);
        for target in ["t0", "t1"] {
            let file = format!("{target}.qcow2");
            qemu_img(&["create", "-q", "-f", "qcow2", &p(dir.path(), &file), "16M"]);
            args.extend(target_args(target, &file));
        }
        let daemon = Daemon::start(which, dir.path(), &args);
        let mut client = daemon.qmp().await;
        let writer = LockStepWriter::start(&dir.path().join("nbd.sock"), &["d0", "d1"], 1);
        writer.wait_for(50).await;
        // The snapshot between the two backups (an image to create) takes a while.
        client
            .execute(
                "transaction",
                json!({"actions": [
                    {"type": "blockdev-backup", "data": {"job-id": "j0", "device": "d0", "target": "t0", "sync": "full"}},
                    {"type": "blockdev-snapshot-sync", "data": {"node-name": "d2", "snapshot-file": p(dir.path(), "o2.qcow2"), "snapshot-node-name": "o2"}},
                    {"type": "blockdev-backup", "data": {"job-id": "j1", "device": "d1", "target": "t1", "sync": "full"}}
                ]}),
            )
            .await
            .unwrap();
        for _ in 0..2 {
            let event = client
                .wait_event("BLOCK_JOB_COMPLETED", WAIT)
                .await
                .expect("completion");
            assert!(event["data"].get("error").is_none(), "{which:?}: {event}");
        }
        let last = writer.stop();
        daemon.quit(&mut client).await;
        let counter = |image: &str| {
            let raw = raw_contents(dir.path(), image);
            u64::from_le_bytes(raw[..8].try_into().unwrap())
        };
        let (t0, t1) = (counter("t0.qcow2"), counter("t1.qcow2"));
        assert!(t0 >= 50 && t0 <= last, "{which:?}: {t0} of {last}");
        assert!(
            t0 == t1 || t0 == t1 + 1,
            "{which:?}: the backups hold writes {t0} and {t1}"
        );
    }
}
