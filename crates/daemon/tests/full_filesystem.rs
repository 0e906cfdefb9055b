//! A file system that fills up under a job, for real: the daemon runs in a mount
//! namespace of its own (`unshare --user --map-root-user --mount`, which needs no
//! privileges) where a small tmpfs holds the job's target. The job meets ENOSPC from the
//! kernel, not from an injected fault; the test makes room by remounting the tmpfs
//! larger from inside the namespace (`nsenter`).

mod common;

use common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

/// The daemon's wrapper: a `size` tmpfs on `dir`, then `commands` before the daemon.
fn in_small_tmpfs(dir: &str, size: &str, commands: &str) -> Vec<String> {
    let script = format!("mount -t tmpfs -o size={size} tmpfs \"$0\" && {commands} && exec \"$@\"");
    [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        dir,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// Runs `args` in the mount namespace of process `pid`.
fn in_namespace_of(pid: u32, args: &[&str]) {
    let pid = pid.to_string();
    let mut all = vec!["-t", &pid, "-U", "-m", "--preserve-credentials"];
    all.extend(args);
    let out = run(Command::new("nsenter").args(&all));
    assert!(
        out.status.success(),
        "nsenter {all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A backup into a file system that fills up: with on-target-error=enospc the job stops
/// with io-status nospace, the daemon goes on serving another disk's client, and once the
/// file system has room again the resumed job completes with a target equal to its
/// source. Many writes fail together when the file system fills: those that failed
/// before the stop are retried after the resume, not a reason to stop again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_file_system_stops_a_backup_until_there_is_room() {
    fill_up("blockdev-backup").await;
}

/// The same for a mirror, which then gets ready and pivots to the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_file_system_stops_a_mirror_until_there_is_room() {
    fill_up("blockdev-mirror").await;
}

/// The same for an active commit into a base on the full file system.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_file_system_stops_a_commit_until_there_is_room() {
    fill_up("block-commit").await;
}

/// The same for a stream into an overlay on the full file system.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_file_system_stops_a_stream_until_there_is_room() {
    fill_up("block-stream").await;
}

/// `command` writes node `t`, whose image lies on a 12 MiB tmpfs, from node `src`, whose
/// 32 MiB of data do not fit; `t` must end up with what `src` held.
async fn fill_up(command: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (source, other) = (p(dir.path(), "source.qcow2"), p(dir.path(), "other.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", &source, "48M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", &other, "16M"]);
    for (i, at) in ["0", "10M", "20M", "30M"].iter().enumerate() {
        let w = format!("write -P {} {at} 8M", 0x31 + i);
        assert_eq!(qemu_io_outcome(&["-f", "qcow2", "-c", &w, &source]), "ok");
    }
    let expected = p(dir.path(), "expected.raw");
    qemu_img(&["convert", "-O", "raw", &source, &expected]);
    let full = p(dir.path(), "full");
    std::fs::create_dir(&full).unwrap();
    let written = format!("{full}/written.qcow2");
    let node = |name: &str, file: &str, backing: &str| {
        vec![
            s("--blockdev"),
            format!("driver=qcow2,node-name={name},file.driver=file,file.filename={file}{backing}"),
        ]
    };
    // What the wrapper makes on the tmpfs, the nodes, and the job's arguments.
    let (create, mut args, job) = match command {
        "block-commit" => {
            // The data sit in the active layer over an empty base on the tmpfs.
            qemu_img(&["rebase", "-u", "-b", &written, "-F", "qcow2", &source]);
            let mut args = node("t", &written, "");
            args.extend(node("src", &source, ",backing=t"));
            let job = json!({"job-id": "j", "device": "src", "on-error": "enospc"});
            (
                format!("qemu-img create -q -f qcow2 {written} 48M"),
                args,
                job,
            )
        }
        "block-stream" => {
            let create = format!("qemu-img create -q -f qcow2 -b {source} -F qcow2 {written}");
            let mut args = node("src", &source, "");
            args.extend(node("t", &written, ",backing=src"));
            let job = json!({"job-id": "j", "device": "t", "on-error": "enospc"});
            (create, args, job)
        }
        _ => {
            let mut args = node("src", &source, "");
            args.extend(node("t", &written, ""));
            let job = json!({"job-id": "j", "device": "src", "target": "t", "sync": "full",
                             "on-target-error": "enospc"});
            (
                format!("qemu-img create -q -f qcow2 {written} 48M"),
                args,
                job,
            )
        }
    };
    args.extend(node("o", &other, ""));
    let wrapper = in_small_tmpfs(&full, "12M", &create);
    let sock = dir.path().join("nbd.sock");
    args.extend(nbd_server_args(&sock));
    args.extend([s("--export"), s("type=nbd,id=o,node-name=o,writable=on")]);
    let daemon = Daemon::start_wrapped(Impl::Blockd, dir.path(), &args, &wrapper);
    let mut c = daemon.qmp().await;
    c.execute(command, job).await.unwrap();
    let error = c
        .wait_event("BLOCK_JOB_ERROR", WAIT)
        .await
        .expect("the full file system stops the job");
    assert_eq!(error["data"]["operation"], "write", "{error}");
    assert_eq!(error["data"]["action"], "stop", "{error}");
    let jobs = c.execute("query-block-jobs", json!({})).await.unwrap();
    assert_eq!(jobs[0]["io-status"], "nospace", "{jobs}");
    // Another disk's client is served meanwhile.
    let uri = format!("nbd+unix:///o?socket={}", sock.display());
    for command in ["write -P 9 0 4M", "read -P 9 0 4M"] {
        assert_eq!(qemu_io_outcome(&["-f", "raw", "-c", command, &uri]), "ok");
    }
    in_namespace_of(daemon.pid(), &["mount", "-o", "remount,size=128M", &full]);
    c.execute("block-job-resume", json!({"device": "j"}))
        .await
        .unwrap();
    if command == "blockdev-mirror" || command == "block-commit" {
        c.wait_event("BLOCK_JOB_READY", Duration::from_secs(60))
            .await
            .expect("the resumed mirror gets ready");
        c.execute("job-complete", json!({"id": "j"})).await.unwrap();
    }
    let done = wait_completed(&mut c).await;
    assert!(done["data"].get("error").is_none(), "{done}");
    c.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "t", "node-name": "t"}),
    )
    .await
    .unwrap();
    let target_uri = format!("nbd+unix:///t?socket={}", sock.display());
    let same = qemu_img(&["compare", "-f", "raw", "-F", "raw", &expected, &target_uri]);
    assert!(same.contains("identical"), "{same}");
    delete_export_when_unused(&mut c, "t").await;
    delete_export_when_unused(&mut c, "o").await;
    daemon.quit(&mut c).await;
}

/// BLOCK_JOB_COMPLETED, past the BLOCK_JOB_ERROR events that writes failing before the
/// stop may have queued.
async fn wait_completed(c: &mut qmp::Client) -> Value {
    c.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60))
        .await
        .expect("the resumed job completes")
}
