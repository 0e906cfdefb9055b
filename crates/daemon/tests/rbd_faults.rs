//! The rbd driver when the cluster stops answering: the OSD of this binary's own cluster
//! frozen (SIGSTOP) in the middle of a job and of client writes. Requests fail within the
//! op timeout instead of hanging, nothing that did not reach the cluster is acknowledged,
//! and jobs follow their error policy (stop, report, ignore); once the OSD answers again,
//! a stopped job resumes and its target is right.

mod common;

use common::ceph::*;
use common::*;
use serde_json::{json, Value};
use std::path::Path;

/// The OSD's process id, from its pid file beside ceph.conf.
fn osd_pid() -> i32 {
    let pid = cluster().with_file_name("run").join("osd.0.pid");
    std::fs::read_to_string(pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn signal_osd(signal: i32) {
    // Safety: kill(2) on the OSD this test binary started.
    assert_eq!(unsafe { libc::kill(osd_pid(), signal) }, 0);
}

/// The cluster's ceph.conf with a short op timeout for clients.
fn impatient_conf(dir: &Path) -> String {
    let conf = dir.join("client.conf");
    let mut text = std::fs::read_to_string(cluster()).unwrap();
    text.push_str("[client]\nrados osd op timeout = 4\n");
    std::fs::write(&conf, text).unwrap();
    conf.to_str().unwrap().to_string()
}

/// The job's BLOCK_JOB_ERROR or BLOCK_JOB_COMPLETED, whichever comes first.
async fn error_or_end(c: &mut qmp::Client, id: &str) -> Value {
    loop {
        let e = c.next_event(WAIT).await.expect("a job event");
        let name = e["event"].as_str().unwrap_or_default();
        if (name == "BLOCK_JOB_ERROR" || name == "BLOCK_JOB_COMPLETED") && e["data"]["device"] == id
        {
            return e;
        }
    }
}

#[tokio::test]
async fn a_frozen_osd_fails_requests_and_jobs_follow_their_policy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = unique("fault");
    rbd(&["create", "--size", "64M", &image]);
    let local = p(d, "local.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &local, "64M"]);
    assert_eq!(
        qemu_io_outcome(&["-f", "qcow2", "-c", "write -P 0x5a 0 64M", &local]),
        "ok"
    );
    let sock = d.join("nbd.sock");
    let mut args = vec![
        s("--blockdev"),
        format!("driver=qcow2,node-name=l,file.driver=file,file.filename={local}"),
    ];
    args.extend(nbd_server_args(&sock));
    let daemon = Daemon::start(Impl::Blockd, d, &args);
    let mut c = daemon.qmp().await;
    // Without librbd's write-back cache (cache.direct, as in QEMU) every write reaches the
    // OSD before it is acknowledged.
    let mut node = rbd_node("r", &image);
    node["conf"] = json!(impatient_conf(d));
    node["cache"] = json!({"direct": true});
    assert_eq!(
        reply(&mut c, "blockdev-add", node).await,
        json!({"return": {}})
    );
    let uri = writable_export(&mut c, &sock, "e", "r", "r").await;

    // on-target-error=stop: the job pauses on the failed write and finishes after.
    start_job(
        &mut c,
        "blockdev-backup",
        json!({"job-id": "b", "device": "l", "target": "r", "sync": "full",
               "speed": 8 << 20, "on-target-error": "stop"}),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    signal_osd(libc::SIGSTOP);
    let frozen_at = std::time::Instant::now();
    // A client write while the OSD is frozen fails; it is not acknowledged.
    let client_uri = uri.clone();
    let write = tokio::task::spawn_blocking(move || {
        let t = std::time::Instant::now();
        let out = qemu_io_outcome(&["-f", "raw", "-c", "write -P 0x77 60M 64k", &client_uri]);
        (out, t.elapsed())
    });
    let stopped = error_or_end(&mut c, "b").await;
    let waited = frozen_at.elapsed();
    let (write, write_took) = write.await.unwrap();
    eprintln!("job error after {waited:?}, client write answered after {write_took:?}");
    signal_osd(libc::SIGCONT);
    assert!(
        write.contains("failed"),
        "a write to a frozen cluster: {write}"
    );
    assert_eq!(stopped["event"], "BLOCK_JOB_ERROR", "{stopped}");
    assert_eq!(stopped["data"]["action"], "stop", "{stopped}");
    assert_eq!(stopped["data"]["operation"], "write", "{stopped}");
    assert!(waited.as_secs() < 20, "the job's error took {waited:?}");
    assert!(
        write_took.as_secs() < 20,
        "the client's error took {write_took:?}"
    );
    reply(
        &mut c,
        "block-job-set-speed",
        json!({"device": "b", "speed": 0}),
    )
    .await;
    // Copies that were in flight at the freeze fail too, each stopping the job again: it
    // is resumed until it ends.
    let end = loop {
        // Refused while the job is not paused yet, which is fine.
        reply(&mut c, "block-job-resume", json!({"device": "b"})).await;
        let e = error_or_end(&mut c, "b").await;
        if e["event"] == "BLOCK_JOB_COMPLETED" {
            break e;
        }
        assert_eq!(e["data"]["action"], "stop", "{e}");
    };
    assert!(end["data"].get("error").is_none(), "{end}");

    // on-target-error=report: the job ends with the error.
    start_job(
        &mut c,
        "blockdev-backup",
        json!({"job-id": "b2", "device": "l", "target": "r", "sync": "full",
               "speed": 8 << 20, "on-target-error": "report"}),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    signal_osd(libc::SIGSTOP);
    let ended = error_or_end(&mut c, "b2").await;
    let ended = if ended["event"] == "BLOCK_JOB_ERROR" {
        assert_eq!(ended["data"]["action"], "report", "{ended}");
        error_or_end(&mut c, "b2").await
    } else {
        ended
    };
    signal_osd(libc::SIGCONT);
    assert_eq!(ended["event"], "BLOCK_JOB_COMPLETED", "{ended}");
    assert!(ended["data"]["error"].is_string(), "{ended}");

    // on-target-error=ignore: the failed writes are reported and skipped, and the job
    // goes on to its end.
    start_job(
        &mut c,
        "blockdev-backup",
        json!({"job-id": "b3", "device": "l", "target": "r", "sync": "full",
               "speed": 8 << 20, "on-target-error": "ignore"}),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    signal_osd(libc::SIGSTOP);
    let ignored = error_or_end(&mut c, "b3").await;
    signal_osd(libc::SIGCONT);
    assert_eq!(ignored["event"], "BLOCK_JOB_ERROR", "{ignored}");
    assert_eq!(ignored["data"]["action"], "ignore", "{ignored}");
    reply(
        &mut c,
        "block-job-set-speed",
        json!({"device": "b3", "speed": 0}),
    )
    .await;
    let end = loop {
        let e = error_or_end(&mut c, "b3").await;
        if e["event"] == "BLOCK_JOB_COMPLETED" {
            break e;
        }
        assert_eq!(e["data"]["action"], "ignore", "{e}");
    };
    assert!(end["data"].get("error").is_none(), "{end}");

    // One more backup with the cluster answering makes the target whole again.
    start_job(
        &mut c,
        "blockdev-backup",
        json!({"job-id": "b4", "device": "l", "target": "r", "sync": "full"}),
    )
    .await;
    let end = error_or_end(&mut c, "b4").await;
    assert_eq!(end["event"], "BLOCK_JOB_COMPLETED", "{end}");
    assert!(end["data"].get("error").is_none(), "{end}");

    // The cluster answers again: the target's copy is all there.
    delete_export_when_unused(&mut c, "e").await;
    daemon.quit(&mut c).await;
    let local_raw = p(d, "local.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", &local, &local_raw]);
    assert_same(&exported(d, &image), &local_raw);
    rbd(&["rm", &image]);
}
