//! block-stream and block-commit end to end on a three-layer chain whose top is exported
//! and written through NBD during the jobs, judged with qemu-img (info --backing-chain,
//! compare, check) and compared with qemu-storage-daemon.

mod common;

use common::jobs::*;
use common::*;
use serde_json::{json, Value};
use std::path::Path;

/// base (0x11 at 0-4M) <- mid (0x22 at 2-6M) <- top (0x33 at 5-7M), 16 MiB each.
fn make_three(dir: &Path) {
    qemu_img(&["create", "-q", "-f", "qcow2", &p(dir, "base.qcow2"), "16M"]);
    qemu_io(&[
        "-f",
        "qcow2",
        &p(dir, "base.qcow2"),
        "-c",
        "write -P 0x11 0 4M",
        "-c",
        "write -P 0x12 15M 64k",
    ]);
    for (name, backing) in [("mid.qcow2", "base.qcow2"), ("top.qcow2", "mid.qcow2")] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            "qcow2",
            &p(dir, name),
        ]);
    }
    qemu_io(&[
        "-f",
        "qcow2",
        &p(dir, "mid.qcow2"),
        "-c",
        "write -P 0x22 2M 4M",
        "-c",
        "write -z 15M 64k",
    ]);
    qemu_io(&[
        "-f",
        "qcow2",
        &p(dir, "top.qcow2"),
        "-c",
        "write -P 0x33 5M 2M",
    ]);
}

/// Named read-only nodes for base and mid (as libvirt opens a chain), top writable and
/// exported.
fn chain_nodes(dir: &Path) -> Vec<String> {
    vec![
        s("--blockdev"),
        s("driver=qcow2,node-name=base,read-only=on,file.driver=file,file.filename=base.qcow2"),
        s("--blockdev"),
        s("driver=qcow2,node-name=mid,read-only=on,backing=base,file.driver=file,file.filename=mid.qcow2"),
        s("--blockdev"),
        s("driver=qcow2,node-name=top,backing=mid,file.driver=file,file.filename=top.qcow2"),
        s("--nbd-server"),
        format!("addr.type=unix,addr.path={}", dir.join("nbd.sock").display()),
        s("--export"),
        s("type=nbd,id=e0,node-name=top,name=disk,writable=on"),
    ]
}

fn nbd_uri(dir: &Path) -> String {
    format!("nbd+unix:///disk?socket={}", dir.join("nbd.sock").display())
}

/// What the disk reads now, as a raw file, to compare with after the job.
fn snapshot(dir: &Path, name: &str) -> String {
    let out = p(dir, name);
    qemu_img(&["convert", "-U", "-O", "raw", &p(dir, "top.qcow2"), &out]);
    out
}

fn backing_of(image: &str) -> Option<String> {
    let info: Value =
        serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", image])).unwrap();
    info["backing-filename"].as_str().map(str::to_string)
}

/// Client writes at 8 MiB during the job, also applied to the reference.
fn write_during_job(dir: &Path, reference: &str) {
    qemu_io(&[
        "-f",
        "raw",
        &nbd_uri(dir),
        "-c",
        "write -P 0x44 8M 1M",
        "-c",
        "write -P 0x45 3M 64k",
    ]);
    qemu_io(&[
        "-f",
        "raw",
        reference,
        "-c",
        "write -P 0x44 8M 1M",
        "-c",
        "write -P 0x45 3M 64k",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_whole_and_partial_chains_and_an_intermediate_node() {
    // (device, base-node, expected backing of the device afterwards)
    let cases: [(&str, Option<&str>, Option<&str>); 3] = [
        ("top", None, None),
        ("top", Some("base"), Some("base.qcow2")),
        ("mid", None, None),
    ];
    let mut sequences = Vec::new();
    for which in Impl::all() {
        for (device, base, expect_backing) in cases {
            let dir = tempfile::tempdir().unwrap();
            make_three(dir.path());
            let reference = snapshot(dir.path(), "ref.raw");
            let daemon = Daemon::start(which, dir.path(), &chain_nodes(dir.path()));
            let mut client = daemon.qmp().await;
            let mut args = json!({"job-id": "s", "device": device, "speed": 4 << 20});
            if let Some(base) = base {
                args["base-node"] = json!(base);
            }
            client.execute("block-stream", args).await.unwrap();
            write_during_job(dir.path(), &reference);
            let events = job_events(&mut client, "s", "null").await;
            assert!(
                events.contains(&s("BLOCK_JOB_COMPLETED")),
                "{which:?} {device}: {events:?}"
            );
            if which == Impl::Blockd {
                sequences.push(without_drain_pairs(&events));
            }
            qemu_io(&[
                "-f",
                "raw",
                &nbd_uri(dir.path()),
                "-c",
                "read -P 0x44 8M 1M",
            ]);
            daemon.quit(&mut client).await;
            let image = p(dir.path(), &format!("{device}.qcow2"));
            qemu_img(&["check", &image]);
            let backing = backing_of(&image);
            assert_eq!(
                backing.as_deref().map(|b| b.rsplit('/').next().unwrap()),
                expect_backing,
                "{which:?} {device} {base:?}"
            );
            let chain = qemu_img(&["info", "--backing-chain", &p(dir.path(), "top.qcow2")]);
            assert!(chain.contains("top.qcow2"), "{chain}");
            qemu_img(&[
                "compare",
                "-F",
                "raw",
                &p(dir.path(), "top.qcow2"),
                &reference,
            ]);
        }
    }
    assert!(
        sequences.iter().all(|seq| seq
            == &[
                "created",
                "running",
                "waiting",
                "pending",
                "BLOCK_JOB_COMPLETED",
                "concluded",
                "null"
            ]),
        "{sequences:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_cancel_leaves_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    make_three(dir.path());
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &chain_nodes(dir.path()));
    let mut client = daemon.qmp().await;
    client
        .execute(
            "block-stream",
            json!({"job-id": "s", "device": "top", "speed": 1 << 20}),
        )
        .await
        .unwrap();
    client
        .execute("block-job-cancel", json!({"device": "s"}))
        .await
        .unwrap();
    let events = job_events(&mut client, "s", "null").await;
    assert!(events.contains(&s("BLOCK_JOB_CANCELLED")), "{events:?}");
    let nodes = client
        .execute("query-named-block-nodes", json!({}))
        .await
        .unwrap();
    let top = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "top")
        .unwrap();
    assert_eq!(top["backing_file_depth"], 2);
    assert!(nodes
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["drv"] != "copy-on-read"));
    daemon.quit(&mut client).await;
    assert!(backing_of(&p(dir.path(), "top.qcow2"))
        .unwrap()
        .ends_with("mid.qcow2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_commit_moves_mid_into_base() {
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        make_three(dir.path());
        let reference = snapshot(dir.path(), "ref.raw");
        let daemon = Daemon::start(which, dir.path(), &chain_nodes(dir.path()));
        let mut client = daemon.qmp().await;
        client
            .execute(
                "block-commit",
                json!({"job-id": "c", "device": "top", "top-node": "mid", "base-node": "base", "speed": 4 << 20}),
            )
            .await
            .unwrap();
        write_during_job(dir.path(), &reference);
        let events = job_events(&mut client, "c", "null").await;
        assert!(
            events.contains(&s("BLOCK_JOB_COMPLETED")),
            "{which:?}: {events:?}"
        );
        let nodes = client
            .execute("query-named-block-nodes", json!({}))
            .await
            .unwrap();
        let top = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == "top")
            .unwrap();
        assert_eq!(top["backing_file_depth"], 1, "{which:?}");
        daemon.quit(&mut client).await;
        let top_image = p(dir.path(), "top.qcow2");
        assert!(
            backing_of(&top_image).unwrap().ends_with("base.qcow2"),
            "{which:?}"
        );
        qemu_img(&["check", &p(dir.path(), "base.qcow2")]);
        qemu_img(&["compare", "-F", "raw", &top_image, &reference]);
        // base alone now holds what mid held.
        qemu_io(&[
            "-f",
            "qcow2",
            "-r",
            &p(dir.path(), "base.qcow2"),
            "-c",
            "read -P 0x22 2M 4M",
            "-c",
            "read -P 0 15M 64k",
        ]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_commit_pivots_the_export_to_base() {
    let mut sequences = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        make_three(dir.path());
        let reference = snapshot(dir.path(), "ref.raw");
        let daemon = Daemon::start(which, dir.path(), &chain_nodes(dir.path()));
        let mut client = daemon.qmp().await;
        client
            .execute("block-commit", json!({"job-id": "c", "device": "top"}))
            .await
            .unwrap();
        let mut events = job_events(&mut client, "c", "BLOCK_JOB_READY").await;
        write_during_job(dir.path(), &reference);
        client
            .execute("block-job-complete", json!({"device": "c"}))
            .await
            .unwrap();
        events.extend(job_events(&mut client, "c", "null").await);
        sequences.push(without_drain_pairs(&events));
        let exports = client
            .execute("query-block-exports", json!({}))
            .await
            .unwrap();
        assert_eq!(exports[0]["node-name"], "base", "{which:?}");
        daemon.quit(&mut client).await;
        let base = p(dir.path(), "base.qcow2");
        qemu_img(&["check", &base]);
        qemu_img(&["compare", "-F", "raw", &base, &reference]);
    }
    assert_ready_job_events(&sequences);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_commit_soft_cancel_keeps_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    make_three(dir.path());
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &chain_nodes(dir.path()));
    let mut client = daemon.qmp().await;
    client
        .execute("block-commit", json!({"job-id": "c", "device": "top"}))
        .await
        .unwrap();
    job_events(&mut client, "c", "BLOCK_JOB_READY").await;
    client
        .execute("block-job-cancel", json!({"device": "c"}))
        .await
        .unwrap();
    job_events(&mut client, "c", "null").await;
    let exports = client
        .execute("query-block-exports", json!({}))
        .await
        .unwrap();
    assert_eq!(exports[0]["node-name"], "top");
    // base is read-only again: a second commit can reopen it.
    let nodes = client
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let base = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "base")
        .unwrap();
    assert_eq!(base["ro"], true);
    daemon.quit(&mut client).await;
    assert!(backing_of(&p(dir.path(), "top.qcow2"))
        .unwrap()
        .ends_with("mid.qcow2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_job_errors_and_conflicts_answer_like_qsd() {
    let script = [
        ("block-commit", json!({"device": "nodev"})),
        (
            "block-commit",
            json!({"device": "top", "top-node": "base", "base-node": "base"}),
        ),
        (
            "block-commit",
            json!({"device": "top", "top-node": "mid", "base-node": "top"}),
        ),
        (
            "block-commit",
            json!({"device": "top", "base-node": "base", "backing-file": "x"}),
        ),
        ("block-stream", json!({"device": "nope"})),
        ("block-stream", json!({"device": "mid", "base-node": "top"})),
        (
            "block-stream",
            json!({"device": "top", "base": "base.qcow2", "base-node": "base"}),
        ),
        (
            "block-stream",
            json!({"device": "top", "backing-file": "x"}),
        ),
        // Node-only arguments name no device; chain, root and exclusivity checks.
        (
            "block-stream",
            json!({"device": "top", "base-node": "nonode"}),
        ),
        ("block-stream", json!({"device": "top", "bottom": "nonode"})),
        ("block-stream", json!({"device": "mid", "bottom": "top"})),
        (
            "block-stream",
            json!({"device": "top", "base-node": "base", "bottom": "mid"}),
        ),
        (
            "block-commit",
            json!({"device": "top", "top-node": "nonode"}),
        ),
        (
            "block-commit",
            json!({"device": "top", "base-node": "nonode"}),
        ),
        ("block-commit", json!({"device": "mid", "top-node": "top"})),
        ("block-commit", json!({"device": "base"})),
        (
            "block-commit",
            json!({"device": "top", "top-node": "mid", "top": "mid.qcow2"}),
        ),
        (
            "block-commit",
            json!({"device": "top", "base-node": "base", "base": "base.qcow2"}),
        ),
        ("nbd-server-add", json!({"device": "nonode"})),
        (
            "drive-mirror",
            json!({"device": "top", "target": "x.qcow2", "sync": "full", "replaces": "mid"}),
        ),
        ("blockdev-del", json!({"node-name": "mid"})),
        (
            "blockdev-reopen",
            json!({"options": [{"driver": "qcow2", "node-name": "top", "file": "f"}]}),
        ),
        (
            "blockdev-reopen",
            json!({"options": [{"driver": "qcow2", "node-name": "top", "file": "f", "backing": "nonode"}]}),
        ),
        // A commit running on mid..base refuses a stream over the same layers.
        (
            "block-commit",
            json!({"job-id": "c", "device": "top", "top-node": "mid", "base-node": "base", "speed": 1}),
        ),
        ("block-stream", json!({"job-id": "s", "device": "top"})),
        ("blockdev-del", json!({"node-name": "base"})),
        ("blockdev-del", json!({"node-name": "mid"})),
        ("block-commit", json!({"job-id": "c2", "device": "top"})),
        (
            "blockdev-reopen",
            json!({"options": [{"driver": "qcow2", "node-name": "mid", "file": "f", "backing": null}]}),
        ),
        ("block-job-cancel", json!({"device": "c", "force": true})),
    ];
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        make_three(dir.path());
        let daemon = Daemon::start(which, dir.path(), &chain_nodes(dir.path()));
        let mut client = daemon.qmp().await;
        let mut replies = Vec::new();
        for (command, args) in &script {
            replies.push(match client.execute(command, args.clone()).await {
                Ok(v) => json!({"return": v}),
                Err(e) => json!({"error": e.desc, "class": format!("{:?}", e.class)}),
            });
        }
        job_events(&mut client, "c", "null").await;
        daemon.quit(&mut client).await;
        all.push(replies);
    }
    assert_eq!(all[0][0]["class"], "DeviceNotFound");
    let stream_on_busy = script
        .iter()
        .position(|(_, args)| args["job-id"] == "s")
        .unwrap();
    let busy = &all[0][stream_on_busy]["error"];
    assert!(busy.as_str().unwrap().contains("is busy"), "{busy}");
    if all.len() == 2 {
        for (i, (ours, theirs)) in all[0].iter().zip(&all[1]).enumerate() {
            assert_eq!(ours, theirs, "step {i}: {:?}", script[i]);
        }
    }
}

/// The chain of `chain_nodes` with mid's data reads failing once at 1 MiB into its file.
fn failing_mid_nodes(dir: &Path) -> Vec<String> {
    let mut args = chain_nodes(dir);
    args[3] = s(
        r#"{"driver":"qcow2","node-name":"mid","read-only":true,"backing":"base","file":{"driver":"blkdebug","image":{"driver":"file","filename":"mid.qcow2"},"inject-error":[{"event":"read_aio","errno":5,"sector":2048,"once":true}]}}"#,
    );
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_error_policies() {
    for policy in ["report", "ignore", "stop"] {
        let mut outcomes = Vec::new();
        for which in Impl::all() {
            let dir = tempfile::tempdir().unwrap();
            make_three(dir.path());
            let reference = snapshot(dir.path(), "ref.raw");
            let daemon = Daemon::start(which, dir.path(), &failing_mid_nodes(dir.path()));
            let mut client = daemon.qmp().await;
            client
                .execute(
                    "block-stream",
                    json!({"job-id": "s", "device": "top", "on-error": policy}),
                )
                .await
                .unwrap();
            let error = client
                .wait_event("BLOCK_JOB_ERROR", WAIT)
                .await
                .expect("BLOCK_JOB_ERROR");
            assert_eq!(error["data"]["operation"], "read", "{policy}");
            if policy == "stop" {
                resume_stopped_job(&mut client, "s", "failed").await;
            }
            let done = client
                .wait_event("BLOCK_JOB_COMPLETED", WAIT)
                .await
                .expect("BLOCK_JOB_COMPLETED");
            daemon.quit(&mut client).await;
            let top = p(dir.path(), "top.qcow2");
            let backing = backing_of(&top);
            if policy == "stop" {
                // Resumed, the failed step is retried and the stream completes.
                assert!(done["data"].get("error").is_none(), "{done}");
                assert_eq!(backing, None);
            } else {
                // report fails at once; ignore copies the rest but keeps the chain.
                assert_eq!(done["data"]["error"], "Input/output error", "{policy}");
                assert!(backing.as_ref().unwrap().ends_with("mid.qcow2"), "{policy}");
            }
            qemu_img(&["check", &top]);
            qemu_img(&["compare", "-F", "raw", &top, &reference]);
            outcomes.push((
                error["data"].clone(),
                done["data"]["error"].clone(),
                backing,
            ));
        }
        assert_eq!(outcomes[0], outcomes[1], "{policy}: blockd vs qsd");
    }
}

/// Stream and commit jobs that fail to start after their setup made a read-only layer
/// writable and put a filter in (here: a negative speed, which job creation refuses)
/// take it all back: every layer as read-only as before, no filter left, as in qsd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_that_cannot_start_leave_the_chain_as_it_was() {
    let mut outcomes = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        make_three(dir.path());
        let daemon = Daemon::start(which, dir.path(), &chain_nodes(dir.path()));
        let mut client = daemon.qmp().await;
        let mut replies = Vec::new();
        for (command, args) in [
            (
                "block-stream",
                json!({"job-id": "s", "device": "mid", "base-node": "base"}),
            ),
            (
                "block-commit",
                json!({"job-id": "c", "device": "top", "top-node": "mid", "base-node": "base"}),
            ),
            (
                "block-commit",
                json!({"job-id": "a", "device": "top", "base-node": "mid"}),
            ),
        ] {
            let mut args = args;
            args["speed"] = json!(-1);
            replies.push(reply(&mut client, command, args).await);
        }
        let nodes = client
            .execute("query-named-block-nodes", json!({"flat": true}))
            .await
            .unwrap();
        let state: Vec<(Value, Value, Value)> = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| !n["node-name"].as_str().unwrap().starts_with('#') || n["drv"] != "file")
            .map(|n| (n["node-name"].clone(), n["drv"].clone(), n["ro"].clone()))
            .collect();
        daemon.quit(&mut client).await;
        outcomes.push((replies, state));
    }
    let (replies, state) = &outcomes[0];
    assert!(replies
        .iter()
        .all(|r| r["error"]["desc"] == "Parameter 'speed' expects a non-negative value"));
    assert_eq!(
        state,
        &[
            (json!("top"), json!("qcow2"), json!(false)),
            (json!("mid"), json!("qcow2"), json!(true)),
            (json!("base"), json!("qcow2"), json!(true)),
        ]
    );
    assert_eq!(outcomes[0], outcomes[1], "blockd vs qsd");
}
