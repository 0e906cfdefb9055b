//! blkdebug's events follow QEMU's model: the qcow2 driver above announces each kind of
//! I/O on its file, so a rule fails the request that needs that kind of I/O and nothing
//! else, as in qemu-storage-daemon. Judged with qemu-io over NBD and qemu-img check.

mod common;

use common::jobs::qemu_io;
use common::*;
use serde_json::{json, Value};
use std::process::Command;

/// A qcow2 image of 4 KiB clusters (an L2 table per 2 MiB), 0x01 at 0 and 0x02 at 4 MiB,
/// opened over blkdebug with `rule` and exported; qemu-io runs `commands` against it.
/// Returns blockdev-add's reply and what each command did ("ok" or its error).
async fn run_rule(which: Impl, rule: Value, commands: &[&str]) -> (Value, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let disk = p(dir.path(), "disk.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        &disk,
        "8M",
    ]);
    qemu_io(&[
        "-f",
        "qcow2",
        &disk,
        "-c",
        "write -P 1 0 64k",
        "-c",
        "write -P 2 4M 64k",
    ]);
    let sock = dir.path().join("nbd.sock");
    let daemon = Daemon::start(which, dir.path(), &nbd_server_args(&sock));
    let mut client = daemon.qmp().await;
    let added = reply(
        &mut client,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "disk0", "file": {
            "driver": "blkdebug", "image": {"driver": "file", "filename": disk},
            "inject-error": [rule]}}),
    )
    .await;
    let mut outcomes = Vec::new();
    if added.get("return").is_some() {
        client
            .execute(
                "block-export-add",
                json!({"type": "nbd", "id": "e0", "node-name": "disk0", "writable": true}),
            )
            .await
            .unwrap();
        let uri = format!("nbd+unix:///disk0?socket={}", sock.display());
        for command in commands {
            outcomes.push(qemu_io_outcome(&["-f", "raw", &uri, "-c", command]));
        }
    }
    daemon.quit(&mut client).await;
    // A failed allocation may leak clusters (as in QEMU), never corrupt the image.
    let check = run(Command::new("qemu-img").args(["check", "--output=json", &disk]));
    let report: Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(report["corruptions"], Value::Null, "{which:?}: {report}");
    assert_eq!(report["check-errors"], 0, "{which:?}: {report}");
    (added, outcomes)
}

/// Each rule against both daemons: the same requests fail, the image stays consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_fail_the_requests_qemu_fails() {
    let io = [
        "read -P 1 0 4k",
        "read -P 1 0 4k",
        "read -P 2 4M 4k",
        "write -P 3 6M 4k",
        "write -P 3 6M 4k",
        "read -P 3 6M 4k",
        "write -P 4 0 4k",
        "read -P 4 0 4k",
    ];
    let cases = [
        // The header and tables load without read_aio: the image opens, guest reads fail.
        json!({"event": "read_aio", "errno": 5}),
        // Only the read that needs the L2 table; the retry loads it.
        json!({"event": "l2_load", "errno": 5, "once": true}),
        // Only the first guest write, with its errno.
        json!({"event": "write_aio", "errno": 28, "once": true}),
        // Only the write that points the L1 table at a new L2 table.
        json!({"event": "l1_update", "errno": 5, "once": true}),
    ];
    for rule in cases {
        let mut all = Vec::new();
        for which in Impl::all() {
            all.push(run_rule(which, rule.clone(), &io).await);
        }
        assert_eq!(all[0], all[1], "{rule}: blockd vs qsd");
        let (added, outcomes) = &all[0];
        assert_eq!(added, &json!({"return": {}}), "{rule}");
        assert!(
            outcomes.iter().any(|o| o != "ok"),
            "{rule}: nothing failed: {outcomes:?}"
        );
    }
}

/// Refcount blocks are written back before a new L2 table is: a rule on that write-back
/// (`refblock_update_part`, as QEMU announces it) fails the write that needs the table and
/// nothing else; `refblock_update` (a new block, which these writes never need) fails none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refblock_rules_fail_the_writes_qemu_fails() {
    let io = [
        "read -P 1 0 4k",
        "write -P 3 6M 4k",
        "write -P 3 6M 4k",
        "read -P 3 6M 4k",
        "read -P 2 4M 4k",
    ];
    for (event, second) in [
        ("refblock_update_part", "write failed: Input/output error"),
        ("refblock_update", "ok"),
    ] {
        let rule = json!({"event": event, "errno": 5, "once": true});
        for which in Impl::all() {
            let (_, outcomes) = run_rule(which, rule.clone(), &io).await;
            assert_eq!(
                outcomes,
                ["ok", second, "ok", "ok", "ok"],
                "{which:?} {event}"
            );
        }
    }
}
