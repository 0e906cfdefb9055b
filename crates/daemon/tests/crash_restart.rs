//! A blockd takes over an image right after the blockd that served it was killed under
//! load (kill -9), as a supervisor's restart or a standby would. The killed blockd's lock
//! bytes outlive it for a moment (the kernel tears its io_uring down after the exit, and
//! in-flight O_DIRECT writes keep the descriptors open), so opening the image at once met
//! QEMU's "Failed to get ... lock" now and then. It must open every time, and the image
//! must stay repairable to clean.

mod common;

use common::*;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::Duration;

const ROUNDS: usize = 20;

#[tokio::test]
async fn an_image_opens_right_after_its_blockd_was_killed() {
    let dir = tempfile::tempdir().unwrap();
    let image = p(dir.path(), "d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &image, "256M"]);
    let served = dir.path().join("served");
    let standby_dir = dir.path().join("standby");
    std::fs::create_dir(&served).unwrap();
    std::fs::create_dir(&standby_dir).unwrap();
    let sock = served.join("nbd.sock");
    let uri = format!("nbd+unix:///d?socket={}", sock.display());
    let mut serving = vec![
        s("--blockdev"),
        format!("driver=file,node-name=f,filename={image},cache.direct=on"),
        s("--blockdev"),
        s("driver=qcow2,node-name=d,file=f"),
    ];
    serving.extend(nbd_server_args(&sock));
    serving.extend([s("--export"), s("type=nbd,id=e,node-name=d,writable=on")]);
    // The standby is up before the kill, so it opens the image within a QMP round trip.
    let standby = Daemon::start(Impl::Blockd, &standby_dir, &[]);
    let mut control = standby.qmp().await;
    for round in 0..ROUNDS {
        let daemon = Daemon::start(Impl::Blockd, &served, &serving);
        // Many writes in flight when the kill comes.
        let writer = Command::new("nbdcopy")
            .args(["/dev/urandom", &uri])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("nbdcopy: {e}: {}", missing_peer("nbdcopy")));
        let writer = KillOnDrop(writer);
        tokio::time::sleep(Duration::from_millis(150)).await;
        daemon.kill();
        let asked = std::time::Instant::now();
        let opened = control
            .execute(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": "t",
                       "file": {"driver": "file", "filename": image, "cache": {"direct": true}}}),
            )
            .await;
        if let Err(e) = opened {
            panic!(
                "round {round}: the image was refused right after the kill, after {:?}: {}",
                asked.elapsed(),
                e.desc
            );
        }
        control
            .execute("blockdev-del", json!({"node-name": "t"}))
            .await
            .unwrap();
        drop(writer);
    }
    // A live holder still refuses: another blockd, and this one through a second node.
    let other_dir = dir.path().join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other = Daemon::start(Impl::Blockd, &other_dir, &[]);
    let mut other_control = other.qmp().await;
    let add = |name: &str| {
        json!({"driver": "qcow2", "node-name": name,
               "file": {"driver": "file", "filename": image}})
    };
    control.execute("blockdev-add", add("t")).await.unwrap();
    for (client, name) in [(&mut other_control, "u"), (&mut control, "t2")] {
        let refused = client.execute("blockdev-add", add(name)).await.unwrap_err();
        assert_eq!(refused.desc, "Failed to get \"write\" lock", "{name}");
    }
    other.quit(&mut other_control).await;
    control
        .execute("blockdev-del", json!({"node-name": "t"}))
        .await
        .unwrap();
    standby.quit(&mut control).await;
    // Killed mid-write, the image may leak clusters; nothing worse.
    qemu_img(&["check", "-q", "-r", "leaks", &image]);
    qemu_img(&["check", "-q", &image]);
}

/// The job running on the disk while the client writes and the daemon is killed.
#[derive(Clone, Copy, Debug)]
enum Job {
    Backup,
    Mirror,
    ActiveCommit,
}

#[tokio::test]
async fn flushed_writes_survive_kill_during_a_backup() {
    flushed_writes_survive_kill(Job::Backup).await;
}

#[tokio::test]
async fn flushed_writes_survive_kill_during_a_mirror() {
    flushed_writes_survive_kill(Job::Mirror).await;
}

#[tokio::test]
async fn flushed_writes_survive_kill_during_an_active_commit() {
    flushed_writes_survive_kill(Job::ActiveCommit).await;
}

/// kill -9 while a client writes with flushes through NBD and `job` runs on the same disk
/// (throttled, so it is still running): every write acknowledged before the last
/// acknowledged flush is in the image afterwards (read through its backing file for a
/// commit), and the image repairs to clean (leaked clusters at most).
async fn flushed_writes_survive_kill(job: Job) {
    const BLOCK: usize = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let image = p(dir.path(), "d.qcow2");
    let target = p(dir.path(), "t.qcow2");
    let base = p(dir.path(), "base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "64M"]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &image,
    ]);
    for round in 0..5u64 {
        qemu_img(&["create", "-q", "-f", "qcow2", &target, "64M"]);
        let sock = dir.path().join("nbd.sock");
        let mut args = vec![
            s("--blockdev"),
            format!("driver=qcow2,node-name=d,file.driver=file,file.filename={image}"),
            s("--blockdev"),
            format!("driver=qcow2,node-name=t,file.driver=file,file.filename={target}"),
        ];
        args.extend(nbd_server_args(&sock));
        args.extend([s("--export"), s("type=nbd,id=e,node-name=d,writable=on")]);
        let daemon = Daemon::start(Impl::Blockd, dir.path(), &args);
        let mut control = daemon.qmp().await;
        let (command, arguments) = match job {
            Job::Backup => (
                "blockdev-backup",
                serde_json::json!({"job-id": "j", "device": "d", "target": "t", "sync": "full"}),
            ),
            Job::Mirror => (
                "blockdev-mirror",
                serde_json::json!({"job-id": "j", "device": "d", "target": "t", "sync": "full"}),
            ),
            Job::ActiveCommit => (
                "block-commit",
                serde_json::json!({"job-id": "j", "device": "d"}),
            ),
        };
        let mut arguments = arguments;
        arguments["speed"] = serde_json::json!(8 << 20);
        control.execute(command, arguments).await.unwrap();
        // Block i gets byte (round * 64 + i) % 251 + 1.
        let fill = |i: u64| ((round * 64 + i) % 251 + 1) as u8;
        // The NBD client runs its connection as a local task.
        let local = tokio::task::LocalSet::new();
        let flushed = local
            .run_until(async {
                let client = nbd::Client::connect(
                    &nbd::ConnectAddr::Unix(sock.clone()),
                    "d",
                    &Default::default(),
                )
                .await
                .unwrap();
                // A flush after every fourth block.
                let mut flushed = 0u64;
                let deadline = std::time::Instant::now() + Duration::from_millis(150 + round * 60);
                let mut i = 0u64;
                while std::time::Instant::now() < deadline && i < 1000 {
                    client
                        .write((i % 1024) * BLOCK as u64, &vec![fill(i); BLOCK], false)
                        .await
                        .unwrap();
                    i += 1;
                    if i.is_multiple_of(4) {
                        client.flush().await.unwrap();
                        flushed = i;
                    }
                }
                daemon.kill();
                drop(client);
                flushed
            })
            .await;
        assert!(
            flushed >= 4,
            "{job:?} round {round}: nothing was flushed before the kill"
        );
        // The lock may linger a moment (see above); qemu-img does not wait for it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let out = run(Command::new("qemu-img").args(["check", "-q", "-r", "leaks", &image]));
            if out.status.success() {
                break;
            }
            let text = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(
                text.contains("lock") && std::time::Instant::now() < deadline,
                "{job:?} round {round}: {text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        qemu_img(&["check", "-q", &image]);
        for k in 0..flushed {
            let io = qemu_io_outcome(&[
                "-f",
                "qcow2",
                "-c",
                &format!("read -P {} {} 64k", fill(k), (k % 1024) * BLOCK as u64),
                &image,
            ]);
            assert_eq!(
                io, "ok",
                "{job:?} round {round}: block {k} of {flushed} flushed"
            );
        }
    }
}
