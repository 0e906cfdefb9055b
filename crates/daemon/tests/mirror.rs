//! Mirror jobs end to end, with clients writing through an NBD export during the job:
//! sync modes, completion moving the export to the target, soft and force cancel, standby,
//! write-blocking mode, error policies, a remote target — judged with qemu-img and
//! compared with qemu-storage-daemon where both run the same scenario.

mod common;

use common::jobs::*;
use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

fn nbd_args(dir: &Path, node: &str) -> Vec<String> {
    vec![
        s("--nbd-server"),
        format!(
            "addr.type=unix,addr.path={}",
            dir.join("nbd.sock").display()
        ),
        s("--export"),
        format!("type=nbd,id=e0,node-name={node},name=disk,writable=on"),
    ]
}

fn nbd_uri(dir: &Path) -> String {
    format!("nbd+unix:///disk?socket={}", dir.join("nbd.sock").display())
}

/// The chain of `make_chain` with an export on its top and an empty 16 MiB target.
fn start_with_target(which: Impl, dir: &Path) -> Daemon {
    make_chain(dir);
    qemu_img(&["create", "-q", "-f", "qcow2", &p(dir, "tgt.qcow2"), "16M"]);
    let mut extra = target_args("tgt", "tgt.qcow2");
    extra.extend(nbd_args(dir, "disk0"));
    Daemon::start(which, dir, &chain_args(&extra))
}

async fn wait_ready(client: &mut qmp::Client, id: &str) -> Vec<String> {
    job_events(client, id, "BLOCK_JOB_READY").await
}

async fn exported_node(client: &mut qmp::Client) -> Value {
    let exports = client
        .execute("query-block-exports", json!({}))
        .await
        .unwrap();
    exports[0]["node-name"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mirror_completes_and_the_export_moves_to_the_target() {
    let mut sequences = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = start_with_target(which, dir.path());
        let mut client = daemon.qmp().await;
        let uri = nbd_uri(dir.path());
        client
            .execute(
                "blockdev-mirror",
                json!({"job-id": "m", "device": "disk0", "target": "tgt", "sync": "full"}),
            )
            .await
            .unwrap();
        qemu_io(&["-f", "raw", &uri, "-c", "write -P 0x55 1M 2M"]);
        let mut events = wait_ready(&mut client, "m").await;
        // Written after READY: still mirrored.
        qemu_io(&[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x66 5M 1M",
            "-c",
            "write -z 2M 64k",
        ]);
        // Small reads through the job's filter, answered in one lookup as data or hole.
        qemu_io(&[
            "-f",
            "raw",
            &uri,
            "-c",
            "read -P 0x66 5M 4k",
            "-c",
            "read -P 0 2M 4k",
            "-c",
            "read -P 0x55 1M 4k",
        ]);
        client
            .execute("block-job-complete", json!({"device": "m"}))
            .await
            .unwrap();
        events.extend(job_events(&mut client, "m", "null").await);
        sequences.push(without_drain_pairs(&events));
        assert_eq!(exported_node(&mut client).await, "tgt", "{which:?}");
        qemu_io(&["-f", "raw", &uri, "-c", "read -P 0x66 5M 1M"]);
        daemon.quit(&mut client).await;
        qemu_img(&["check", &p(dir.path(), "tgt.qcow2")]);
        target_matches_top(dir.path());
    }
    assert_ready_job_events(&sequences);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drive_mirror_top_shares_the_backing_and_none_copies_only_new_writes() {
    for sync in ["top", "none"] {
        let dir = tempfile::tempdir().unwrap();
        make_chain(dir.path());
        let daemon = Daemon::start(
            Impl::Blockd,
            dir.path(),
            &chain_args(&nbd_args(dir.path(), "disk0")),
        );
        let mut client = daemon.qmp().await;
        let tgt = p(dir.path(), "new.qcow2");
        client
            .execute(
                "drive-mirror",
                json!({"job-id": "m", "device": "disk0", "target": tgt, "sync": sync, "node-name": "new"}),
            )
            .await
            .unwrap();
        qemu_io(&[
            "-f",
            "raw",
            &nbd_uri(dir.path()),
            "-c",
            "write -P 0x77 6M 1M",
        ]);
        wait_ready(&mut client, "m").await;
        client
            .execute("block-job-complete", json!({"device": "m"}))
            .await
            .unwrap();
        job_events(&mut client, "m", "null").await;
        assert_eq!(exported_node(&mut client).await, "new", "{sync}");
        // The export now reads the new image over the kept backing.
        qemu_io(&[
            "-f",
            "raw",
            &nbd_uri(dir.path()),
            "-c",
            "read -P 0x77 6M 1M",
            "-c",
            "read -P 0x11 0 1M",
        ]);
        daemon.quit(&mut client).await;
        qemu_img(&["check", &tgt]);
        let chain = qemu_img(&["info", "--backing-chain", &tgt]);
        let expected_backing = if sync == "top" {
            "base.qcow2"
        } else {
            "top.qcow2"
        };
        assert!(
            chain.contains(&format!("backing file: {expected_backing}")),
            "{sync}: {chain}"
        );
        qemu_img(&["compare", &p(dir.path(), "top.qcow2"), &tgt]);
        let map: Vec<Value> =
            serde_json::from_str(&qemu_img(&["map", "--output=json", &tgt])).unwrap();
        let own: u64 = map
            .iter()
            .filter(|e| e["depth"] == 0 && e["data"] == true)
            .map(|e| e["length"].as_u64().unwrap())
            .sum();
        let limit = if sync == "top" { 3 << 20 } else { 1 << 20 };
        assert!(own <= limit, "{sync} copied {own} bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_cancel_after_ready_keeps_a_consistent_copy_and_the_source() {
    let mut sequences = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = start_with_target(which, dir.path());
        let mut client = daemon.qmp().await;
        client
            .execute(
                "blockdev-mirror",
                json!({"job-id": "m", "device": "disk0", "target": "tgt", "sync": "full"}),
            )
            .await
            .unwrap();
        let mut events = wait_ready(&mut client, "m").await;
        qemu_io(&[
            "-f",
            "raw",
            &nbd_uri(dir.path()),
            "-c",
            "write -P 0x21 9M 1M",
        ]);
        client
            .execute("block-job-cancel", json!({"device": "m"}))
            .await
            .unwrap();
        events.extend(job_events(&mut client, "m", "null").await);
        sequences.push(without_drain_pairs(&events));
        assert_eq!(exported_node(&mut client).await, "disk0");
        daemon.quit(&mut client).await;
        target_matches_top(dir.path());
    }
    assert!(
        sequences[0].contains(&s("BLOCK_JOB_COMPLETED")),
        "{:?}",
        sequences[0]
    );
    if sequences.len() == 2 {
        assert_eq!(sequences[0], sequences[1], "event order differs from qsd");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_cancel_and_cancel_before_ready() {
    for (force, speed) in [(true, 0), (false, 1 << 20)] {
        let dir = tempfile::tempdir().unwrap();
        let daemon = start_with_target(Impl::Blockd, dir.path());
        let mut client = daemon.qmp().await;
        client
            .execute(
                "blockdev-mirror",
                json!({"job-id": "m", "device": "disk0", "target": "tgt", "sync": "full", "speed": speed}),
            )
            .await
            .unwrap();
        if speed == 0 {
            wait_ready(&mut client, "m").await;
        }
        client
            .execute("block-job-cancel", json!({"device": "m", "force": force}))
            .await
            .unwrap();
        let events = job_events(&mut client, "m", "null").await;
        assert!(events.contains(&s("BLOCK_JOB_CANCELLED")), "{events:?}");
        assert_eq!(exported_node(&mut client).await, "disk0");
        let nodes = client
            .execute("query-named-block-nodes", json!({"flat": true}))
            .await
            .unwrap();
        assert!(nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["drv"] != "mirror_top"));
        // The source is free for another job.
        client
            .execute(
                "blockdev-mirror",
                json!({"job-id": "again", "device": "disk0", "target": "tgt", "sync": "full"}),
            )
            .await
            .unwrap();
        wait_ready(&mut client, "again").await;
        daemon.quit(&mut client).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_in_ready_is_standby() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_with_target(Impl::Blockd, dir.path());
    let mut client = daemon.qmp().await;
    client
        .execute(
            "blockdev-mirror",
            json!({"job-id": "m", "device": "disk0", "target": "tgt", "sync": "full"}),
        )
        .await
        .unwrap();
    wait_ready(&mut client, "m").await;
    client
        .execute("block-job-pause", json!({"device": "m"}))
        .await
        .unwrap();
    assert_eq!(job_events(&mut client, "m", "standby").await, ["standby"]);
    // Writes while paused are remembered and copied after resume.
    qemu_io(&[
        "-f",
        "raw",
        &nbd_uri(dir.path()),
        "-c",
        "write -P 0x31 3M 1M",
    ]);
    client
        .execute("block-job-resume", json!({"device": "m"}))
        .await
        .unwrap();
    assert_eq!(job_events(&mut client, "m", "ready").await, ["ready"]);
    client
        .execute("block-job-complete", json!({"device": "m"}))
        .await
        .unwrap();
    job_events(&mut client, "m", "null").await;
    daemon.quit(&mut client).await;
    target_matches_top(dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_blocking_mode_stays_in_sync_under_continuous_writes() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_with_target(Impl::Blockd, dir.path());
    let mut client = daemon.qmp().await;
    client
        .execute(
            "blockdev-mirror",
            json!({"job-id": "m", "device": "disk0", "target": "tgt", "sync": "full", "copy-mode": "write-blocking"}),
        )
        .await
        .unwrap();
    let uri = nbd_uri(dir.path());
    let writer = {
        let uri = uri.clone();
        std::thread::spawn(move || {
            for round in 0..20u8 {
                let pattern = format!("write -P {} {}M 512k", 0x40 + round, round % 14);
                qemu_io(&[
                    "-f",
                    "raw",
                    &uri,
                    "-c",
                    &pattern,
                    "-c",
                    "write -P 0x3f 15M 4k",
                ]);
            }
        })
    };
    wait_ready(&mut client, "m").await;
    writer.join().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let jobs = client.execute("query-block-jobs", json!({})).await.unwrap();
        if jobs[0]["actively-synced"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "never actively synced: {jobs}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Once synced, each write reaches the target before it completes: the target matches
    // while the job still runs.
    qemu_io(&["-f", "raw", &uri, "-c", "write -P 0x99 7M 1M"]);
    let jobs = client.execute("query-block-jobs", json!({})).await.unwrap();
    assert_eq!(jobs[0]["actively-synced"], true);
    client
        .execute("block-job-cancel", json!({"device": "m"}))
        .await
        .unwrap();
    job_events(&mut client, "m", "null").await;
    daemon.quit(&mut client).await;
    target_matches_top(dir.path());
}

/// Target writes fail once through blkdebug.
fn failing_target_args(dir: &Path, errno: i32) -> Vec<String> {
    make_chain(dir);
    let tgt = p(dir, "tgt.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &tgt, "16M"]);
    let mut extra = vec![
        s("--blockdev"),
        format!(
            r#"{{"driver":"qcow2","node-name":"tgt","file":{{"driver":"blkdebug","image":{{"driver":"file","filename":"{tgt}"}},"inject-error":[{{"event":"write_aio","errno":{errno},"once":true}}]}}}}"#
        ),
    ];
    extra.extend(nbd_args(dir, "disk0"));
    chain_args(&extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_sizes_fail_the_job_like_qsd() {
    let mut completions = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        make_chain(dir.path());
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            &p(dir.path(), "small.qcow2"),
            "8M",
        ]);
        let daemon = Daemon::start(
            which,
            dir.path(),
            &chain_args(&target_args("small", "small.qcow2")),
        );
        let mut client = daemon.qmp().await;
        client
            .execute(
                "blockdev-mirror",
                json!({"job-id": "m", "device": "disk0", "target": "small", "sync": "full"}),
            )
            .await
            .unwrap();
        let done = client
            .wait_event("BLOCK_JOB_COMPLETED", WAIT)
            .await
            .expect("BLOCK_JOB_COMPLETED");
        completions.push(done["data"].clone());
        daemon.quit(&mut client).await;
    }
    assert_eq!(
        completions[0]["error"],
        "Source and target image have different sizes"
    );
    assert_eq!(completions[0]["len"], 0);
    if completions.len() == 2 {
        assert_eq!(completions[0], completions[1]);
    }
}

fn outcome(reply: Result<Value, qapi::error::QmpError>) -> Value {
    match reply {
        Ok(v) => json!({"return": v}),
        Err(e) => json!({"error": e.desc, "class": format!("{:?}", e.class)}),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_errors_answer_like_qsd() {
    let cases = [
        json!({"device": "nope", "target": "tgt", "sync": "full"}),
        json!({"device": "disk0", "target": "nope", "sync": "full"}),
        json!({"device": "disk0", "target": "disk0", "sync": "full"}),
        json!({"device": "f0", "target": "tgt", "sync": "full"}),
        json!({"device": "disk0", "target": "tgt", "sync": "full", "granularity": 100}),
        json!({"device": "disk0", "target": "tgt", "sync": "full", "granularity": 3 << 10}),
        json!({"device": "disk0", "target": "tgt", "sync": "full", "granularity": 1 << 30}),
        json!({"device": "disk0", "target": "tgt", "sync": "incremental"}),
        json!({"device": "disk0", "target": "tgt", "sync": "full", "job-id": "bad id"}),
        json!({"device": "disk0", "target": "tgt", "sync": "full", "unmap": true}),
        json!({"device": "disk0", "target": "tgt", "sync": "sideways"}),
        json!({"device": "disk0", "target": "tgt", "sync": "full", "job-id": "r", "replaces": "nonode"}),
    ];
    let mut answers: Vec<Vec<Value>> = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = start_with_target(which, dir.path());
        let mut client = daemon.qmp().await;
        let mut got = Vec::new();
        for case in &cases {
            got.push(outcome(
                client.execute("blockdev-mirror", case.clone()).await,
            ));
        }
        // A second job on a busy node.
        client
            .execute(
                "blockdev-mirror",
                json!({"job-id": "m", "device": "disk0", "target": "tgt", "sync": "full"}),
            )
            .await
            .unwrap();
        got.push(outcome(
            client
                .execute(
                    "blockdev-mirror",
                    json!({"job-id": "m2", "device": "disk0", "target": "tgt", "sync": "full"}),
                )
                .await,
        ));
        // The job holds its target through a block backend of its own: "in use".
        got.push(outcome(
            client
                .execute("blockdev-del", json!({"node-name": "tgt"}))
                .await,
        ));
        answers.push(got);
        daemon.quit(&mut client).await;
    }
    for reply in &answers[0] {
        assert!(reply.get("error").is_some(), "{reply}");
    }
    if answers.len() == 2 {
        for (i, (ours, theirs)) in answers[0].iter().zip(&answers[1]).enumerate() {
            assert_eq!(ours, theirs, "case {i}: {:?}", cases.get(i));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_to_a_second_blockd_over_nbd() {
    let remote_dir = tempfile::tempdir().unwrap();
    let remote_img = p(remote_dir.path(), "remote.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &remote_img, "16M"]);
    let mut remote_args = target_args("r", "remote.qcow2");
    remote_args.extend(nbd_args(remote_dir.path(), "r"));
    let remote = Daemon::start(Impl::Blockd, remote_dir.path(), &remote_args);
    let mut remote_client = remote.qmp().await;

    let dir = tempfile::tempdir().unwrap();
    make_chain(dir.path());
    let mut extra = vec![
        s("--blockdev"),
        format!(
            "driver=nbd,node-name=remote,server.type=unix,server.path={},export=disk",
            remote_dir.path().join("nbd.sock").display()
        ),
    ];
    extra.extend(nbd_args(dir.path(), "disk0"));
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &chain_args(&extra));
    let mut client = daemon.qmp().await;
    client
        .execute(
            "blockdev-mirror",
            json!({"job-id": "m", "device": "disk0", "target": "remote", "sync": "full"}),
        )
        .await
        .unwrap();
    qemu_io(&[
        "-f",
        "raw",
        &nbd_uri(dir.path()),
        "-c",
        "write -P 0x44 4M 2M",
    ]);
    wait_ready(&mut client, "m").await;
    client
        .execute("block-job-complete", json!({"device": "m"}))
        .await
        .unwrap();
    job_events(&mut client, "m", "null").await;
    // Clients of the local export now write to the remote disk.
    qemu_io(&[
        "-f",
        "raw",
        &nbd_uri(dir.path()),
        "-c",
        "write -P 0x45 14M 64k",
    ]);
    daemon.quit(&mut client).await;
    remote.quit(&mut remote_client).await;
    qemu_img(&["check", &remote_img]);
    qemu_io(&[
        "-f",
        "qcow2",
        &remote_img,
        "-c",
        "read -P 0x45 14M 64k",
        "-c",
        "read -P 0x44 4M 2M",
    ]);
    qemu_io(&[
        "-f",
        "qcow2",
        &p(dir.path(), "top.qcow2"),
        "-c",
        "write -P 0x45 14M 64k",
    ]);
    qemu_img(&["compare", &p(dir.path(), "top.qcow2"), &remote_img]);
}

/// Source reads fail once at 1 MiB into top.qcow2 through blkdebug.
fn failing_source_args(dir: &Path) -> Vec<String> {
    make_chain(dir);
    qemu_img(&["create", "-q", "-f", "qcow2", &p(dir, "tgt.qcow2"), "16M"]);
    let mut extra = vec![
        s("--blockdev"),
        s("driver=file,node-name=f0,filename=top.qcow2"),
        s("--blockdev"),
        s(
            r#"{"driver":"qcow2","node-name":"disk0","file":{"driver":"blkdebug","image":"f0","inject-error":[{"event":"read_aio","errno":5,"sector":2048,"once":true}]}}"#,
        ),
    ];
    extra.extend(target_args("tgt", "tgt.qcow2"));
    extra.extend(nbd_args(dir, "disk0"));
    extra
}

/// Each policy for target writes and source reads failing once: report fails the job;
/// ignore and stop (after resume) copy the failed range again and complete; enospc stops
/// on ENOSPC (io-status nospace) and reports anything else; both daemons alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_policies() {
    for (operation, policy, errno) in [
        ("write", "report", libc::EIO),
        ("write", "ignore", libc::EIO),
        ("write", "stop", libc::EIO),
        ("write", "enospc", libc::ENOSPC),
        ("write", "enospc", libc::EIO),
        ("read", "report", libc::EIO),
        ("read", "ignore", libc::EIO),
        ("read", "stop", libc::EIO),
    ] {
        let mut outcomes = Vec::new();
        for which in Impl::all() {
            let dir = tempfile::tempdir().unwrap();
            let (args, option) = match operation {
                "write" => (failing_target_args(dir.path(), errno), "on-target-error"),
                _ => (failing_source_args(dir.path()), "on-source-error"),
            };
            let daemon = Daemon::start(which, dir.path(), &args);
            let mut client = daemon.qmp().await;
            let mut job =
                json!({"job-id": "m", "device": "disk0", "target": "tgt", "sync": "full"});
            job[option] = json!(policy);
            client.execute("blockdev-mirror", job).await.unwrap();
            let error = client
                .wait_event("BLOCK_JOB_ERROR", WAIT)
                .await
                .expect("BLOCK_JOB_ERROR");
            assert_eq!(error["data"]["operation"], operation, "{policy}");
            let stops = policy == "stop" || (policy == "enospc" && errno == libc::ENOSPC);
            let reports = policy == "report" || (policy == "enospc" && !stops);
            let action = match (stops, reports) {
                (true, _) => "stop",
                (_, true) => "report",
                _ => policy,
            };
            assert_eq!(error["data"]["action"], action, "{policy} {errno}");
            if stops {
                let io_status = if errno == libc::ENOSPC {
                    "nospace"
                } else {
                    "failed"
                };
                resume_stopped_job(&mut client, "m", io_status).await;
            }
            if !reports {
                wait_ready(&mut client, "m").await;
                client
                    .execute("block-job-complete", json!({"device": "m"}))
                    .await
                    .unwrap();
            }
            let done = client
                .wait_event("BLOCK_JOB_COMPLETED", WAIT)
                .await
                .expect("BLOCK_JOB_COMPLETED");
            daemon.quit(&mut client).await;
            if reports {
                assert_eq!(done["data"]["error"], "Input/output error", "{operation}");
            } else {
                assert!(
                    done["data"].get("error").is_none(),
                    "{operation} {policy}: {done}"
                );
                target_matches_top(dir.path());
            }
            outcomes.push((error["data"].clone(), done["data"]["error"].clone()));
        }
        assert_eq!(
            outcomes[0], outcomes[1],
            "{operation} {policy} {errno}: blockd vs qsd"
        );
    }
}

/// block-job-change switches a READY background mirror to write-blocking: it becomes
/// actively synced and the target matches the source while the job runs. Bad changes
/// answer as in qsd; switching back to background works in blockd only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_job_change_switches_to_write_blocking() {
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = start_with_target(which, dir.path());
        let mut client = daemon.qmp().await;
        client
            .execute(
                "blockdev-mirror",
                json!({"job-id": "m", "device": "disk0", "target": "tgt", "sync": "full"}),
            )
            .await
            .unwrap();
        wait_ready(&mut client, "m").await;
        let mut replies = Vec::new();
        for args in [
            json!({"id": "nope", "type": "mirror", "copy-mode": "write-blocking"}),
            json!({"id": "m", "type": "backup", "copy-mode": "write-blocking"}),
            json!({"id": "m", "type": "mirror", "copy-mode": "sideways"}),
            json!({"id": "m", "type": "mirror", "copy-mode": "background"}),
            json!({"id": "m", "type": "mirror", "copy-mode": "write-blocking"}),
        ] {
            replies.push(match client.execute("block-job-change", args).await {
                Ok(v) => json!({"return": v}),
                Err(e) => json!({"error": e.desc}),
            });
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let jobs = client.execute("query-block-jobs", json!({})).await.unwrap();
            if jobs[0]["actively-synced"] == true {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{which:?} never actively synced: {jobs}"
            );
            qemu_io(&[
                "-f",
                "raw",
                &nbd_uri(dir.path()),
                "-c",
                "write -P 0x61 1M 64k",
            ]);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        qemu_io(&[
            "-f",
            "raw",
            &nbd_uri(dir.path()),
            "-c",
            "write -P 0x62 9M 1M",
        ]);
        // Back to background: QEMU refuses, blockd switches (client writes go to the
        // source only again, and the job is no longer actively synced).
        let back = client
            .execute(
                "block-job-change",
                json!({"id": "m", "type": "mirror", "copy-mode": "background"}),
            )
            .await;
        match which {
            Impl::Blockd => {
                back.unwrap();
                let jobs = client.execute("query-block-jobs", json!({})).await.unwrap();
                assert_eq!(jobs[0]["actively-synced"], false, "{jobs}");
            }
            Impl::Qsd => assert_eq!(
                back.unwrap_err().desc,
                "Change to copy mode 'background' is not implemented"
            ),
        }
        client
            .execute("block-job-cancel", json!({"device": "m", "force": true}))
            .await
            .unwrap();
        job_events(&mut client, "m", "null").await;
        daemon.quit(&mut client).await;
        // Force-cancelled right after the write: only write-blocking put it on the target.
        qemu_io(&[
            "-f",
            "qcow2",
            "-r",
            &p(dir.path(), "tgt.qcow2"),
            "-c",
            "read -P 0x62 9M 1M",
        ]);
        all.push(replies);
    }
    assert_eq!(all[0][4], json!({"return": {}}));
    assert_eq!(all[0], all[1]);
}

/// blockd's x-auto-write-blocking is taken and type-checked like every member; without it a
/// background mirror stays background (the rule that switches is unit-tested in the jobs
/// crate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_write_blocking_is_an_explicit_choice() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_with_target(Impl::Blockd, dir.path());
    let mut client = daemon.qmp().await;
    let err = client
        .execute(
            "blockdev-mirror",
            json!({"job-id": "m", "device": "disk0", "target": "tgt", "sync": "full",
                   "x-auto-write-blocking": "yes"}),
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.desc,
        "Invalid parameter type for 'x-auto-write-blocking', expected: boolean"
    );
    client
        .execute(
            "blockdev-mirror",
            json!({"job-id": "m", "device": "disk0", "target": "tgt", "sync": "full",
                   "x-auto-write-blocking": true}),
        )
        .await
        .unwrap();
    wait_ready(&mut client, "m").await;
    client
        .execute("block-job-complete", json!({"device": "m"}))
        .await
        .unwrap();
    job_events(&mut client, "m", "null").await;
    daemon.quit(&mut client).await;
    target_matches_top(dir.path());
}

/// blockd's estimates in query-block-jobs (QEMU has none): the copy rate follows the speed
/// limit, client writes show as a dirty rate, the time to READY matches what is left at
/// that rate, and is 0 once READY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estimates_follow_the_copy_and_the_clients() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disk = p(d, "disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &disk, "64M"]);
    qemu_io(&["-c", "write -P 1 0 32M", &disk]);
    qemu_img(&["create", "-q", "-f", "qcow2", &p(d, "tgt.qcow2"), "64M"]);
    let mut args = vec![
        s("--blockdev"),
        format!("driver=qcow2,node-name=disk0,file.driver=file,file.filename={disk}"),
        s("--blockdev"),
        "driver=qcow2,node-name=tgt,file.driver=file,file.filename=tgt.qcow2".into(),
    ];
    args.extend(nbd_args(d, "disk0"));
    let daemon = Daemon::start(Impl::Blockd, d, &args);
    let mut client = daemon.qmp().await;
    const SPEED: f64 = 16.0 * 1048576.0;
    client
        .execute(
            "blockdev-mirror",
            json!({"job-id": "m", "device": "disk0", "target": "tgt", "sync": "full",
                   "speed": SPEED as u64}),
        )
        .await
        .unwrap();
    // A client writes 1 MiB every 200 ms meanwhile.
    let uri = nbd_uri(d);
    let writer = std::thread::spawn(move || {
        let mut args = vec!["-f".to_string(), "raw".to_string()];
        for i in 0..10 {
            args.extend([
                "-c".into(),
                format!("write -P 9 {}M 1M", 40 + i),
                "-c".into(),
                "sleep 200".into(),
            ]);
        }
        args.push(uri);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        qemu_io(&args);
    });
    let deadline = Instant::now() + WAIT;
    let mut rows = Vec::new();
    let ready_row = loop {
        assert!(Instant::now() < deadline, "never ready: {rows:?}");
        let row = client.execute("query-block-jobs", json!({})).await.unwrap()[0].clone();
        if row["ready"] == true {
            break row;
        }
        rows.push(row);
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    writer.join().unwrap();
    let measured: Vec<&Value> = rows
        .iter()
        .filter(|r| r.get("x-copy-rate").is_some())
        .collect();
    assert!(measured.len() >= 3, "too few rows with estimates: {rows:?}");
    // The median copy rate follows the limit (the first window also holds the job's
    // start, and a loaded machine bends single windows).
    let mut copies: Vec<f64> = measured
        .iter()
        .map(|r| r["x-copy-rate"].as_f64().unwrap())
        .collect();
    copies.sort_by(f64::total_cmp);
    let median = copies[copies.len() / 2];
    assert!(
        median > SPEED / 2.0 && median < SPEED * 2.0,
        "copy rates {copies:?} under a {SPEED} limit"
    );
    assert!(
        measured
            .iter()
            .any(|r| r["x-dirty-rate"].as_f64().unwrap() > 0.0),
        "client writes never showed: {measured:?}"
    );
    // What is left at the limit's rate, give or take half, and a second.
    let predicted: Vec<(f64, f64)> = measured
        .iter()
        .filter_map(|r| {
            let eta = r.get("x-seconds-to-ready")?.as_f64()?;
            let left = (r["len"].as_f64()? - r["offset"].as_f64()?) / SPEED;
            Some((eta, left))
        })
        .collect();
    assert!(
        !predicted.is_empty(),
        "no time to READY given: {measured:?}"
    );
    // After the first, which may still hold the job's start.
    for (eta, left) in predicted.iter().skip(usize::from(predicted.len() > 1)) {
        assert!(
            *eta > left * 0.5 - 1.0 && *eta < left * 1.5 + 1.0,
            "said {eta} s, {left} s left: {predicted:?}"
        );
    }
    assert_eq!(ready_row["x-seconds-to-ready"], 0.0, "{ready_row}");
    client
        .execute("block-job-cancel", json!({"device": "m"}))
        .await
        .unwrap();
    client
        .wait_event("BLOCK_JOB_COMPLETED", WAIT)
        .await
        .unwrap();
    daemon.quit(&mut client).await;
}
