//! The same protocol-level sessions (bad input, negotiation, id echo, exec-oob) sent to the
//! real qemu-storage-daemon and to the toy server: the reply lines must be byte-identical,
//! the version package string aside.

mod common;

use common::{start_toy, WAIT};
use std::path::Path;
use std::process::{Child, Command};

const QSD: &str = "/usr/bin/qemu-storage-daemon";

struct Qsd(Child);

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_qsd(socket: &Path) -> Qsd {
    let child = Command::new(QSD)
        .arg("--chardev")
        .arg(format!(
            "socket,id=m0,path={},server=on,wait=off",
            socket.display()
        ))
        .args(["--monitor", "chardev=m0"])
        .spawn()
        .expect("start qemu-storage-daemon");
    let qsd = Qsd(child);
    let deadline = std::time::Instant::now() + WAIT;
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "qsd did not listen");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    qsd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_replies_are_identical_to_qsd() {
    assert!(
        Path::new(QSD).exists(),
        "test peer {QSD} is not installed: install the Debian package qemu-utils (.ci/run installs every test peer)"
    );
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qsd.sock");
    let _qsd = start_qsd(&socket);
    let toy = start_toy();
    for (negotiate, after) in [
        (common::NEGOTIATE, common::NEGOTIATED),
        (common::NEGOTIATE_OOB, common::NEGOTIATED_OOB),
    ] {
        // qsd serves one monitor client at a time: this session ends before the next.
        let theirs = common::session(&socket, negotiate, after).await;
        let ours = common::session(&toy.path, negotiate, after).await;
        assert_eq!(theirs.len(), ours.len());
        for (t, o) in theirs.iter().zip(&ours) {
            assert_eq!(t, o, "qsd vs toy");
        }
        assert_eq!(
            theirs,
            common::expected_session(after),
            "qsd vs recorded table"
        );
    }
}
