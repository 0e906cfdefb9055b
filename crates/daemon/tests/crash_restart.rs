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
        let mut daemon = Daemon::start(Impl::Blockd, &served, &serving);
        // Many writes in flight when the kill comes.
        let writer = Command::new("nbdcopy")
            .args(["/dev/urandom", &uri])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("nbdcopy: {e}: {}", missing_peer("nbdcopy")));
        let writer = KillOnDrop(writer);
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Safety: a signal to our own child.
        unsafe { libc::kill(daemon.pid() as i32, libc::SIGKILL) };
        daemon.wait_exit();
        let opened = control
            .execute(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": "t",
                       "file": {"driver": "file", "filename": image, "cache": {"direct": true}}}),
            )
            .await;
        if let Err(e) = opened {
            panic!(
                "round {round}: the image was refused right after the kill: {}",
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
