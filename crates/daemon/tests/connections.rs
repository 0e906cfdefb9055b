//! A thousand NBD clients connected at once, each reading: every one is answered, a
//! further client too, and what an idle connection costs stays small (its read buffer is
//! the most of it). Clients that go away in the middle of their requests while a backup
//! runs: the job and the other clients do not notice.

mod common;

use common::raw_nbd::{connect, request};
use common::*;
use nbd::proto::{CMD_READ, CMD_WRITE, REQUEST_MAGIC};
use serde_json::json;
use std::io::Write;

const CLIENTS: usize = 1000;

#[test]
fn a_thousand_clients_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let image = p(dir.path(), "d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &image, "64M"]);
    let sock = dir.path().join("nbd.sock");
    let mut args = vec![
        s("--blockdev"),
        format!("driver=qcow2,node-name=d,file.driver=file,file.filename={image}"),
    ];
    // The server's default is 100 clients at a time (as qsd's --nbd-server).
    args.extend([
        s("--nbd-server"),
        format!(
            "addr.type=unix,addr.path={},max-connections=0",
            sock.display()
        ),
    ]);
    args.extend([s("--export"), s("type=nbd,id=e,node-name=d")]);
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &args);
    let before = status_mib(daemon.pid(), "VmRSS");
    let mut clients: Vec<_> = (0..CLIENTS).map(|_| connect(&sock, "d").0).collect();
    let idle = status_mib(daemon.pid(), "VmRSS");
    for (i, client) in clients.iter_mut().enumerate() {
        assert_eq!(
            request(client, CMD_READ, (i as u64 % 16) << 20, 4096, &[]),
            0
        );
    }
    let (mut late, _) = connect(&sock, "d");
    assert_eq!(request(&mut late, CMD_READ, 0, 65536, &[]), 0);
    // 16 KiB of read buffer each, and some bookkeeping: with 64 KiB buffers this was 78 MiB.
    let per_client_kib = (idle.saturating_sub(before) << 10) / CLIENTS as u64;
    assert!(
        per_client_kib < 48,
        "{per_client_kib} KiB per idle connection"
    );
}

/// Sends a request header whose write payload stops short (or a read whose reply is never
/// read) and closes the connection.
fn hang_up_mid_request(sock: &std::path::Path, i: u64) {
    let (mut s, _) = connect(sock, "d");
    let write = i.is_multiple_of(2);
    let mut req = REQUEST_MAGIC.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&(if write { CMD_WRITE } else { CMD_READ }).to_be_bytes());
    req.extend_from_slice(&i.to_be_bytes());
    req.extend_from_slice(&((i % 32) << 20).to_be_bytes());
    req.extend_from_slice(&(1u32 << 20).to_be_bytes());
    s.write_all(&req).unwrap();
    if write {
        s.write_all(&vec![0xee; 100 << 10]).unwrap();
    }
}

/// Two hundred clients hang up in the middle of a write's payload or before reading a
/// read's reply while a backup of their disk runs: no half write reaches the disk, the
/// backup completes with the disk's point in time, and an honest client meanwhile is
/// served and reads back what it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_hanging_up_mid_request_during_a_backup() {
    let dir = tempfile::tempdir().unwrap();
    let (image, target) = (p(dir.path(), "d.qcow2"), p(dir.path(), "t.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", &image, "64M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", &target, "64M"]);
    assert_eq!(
        qemu_io_outcome(&["-f", "qcow2", "-c", "write -P 0x21 0 40M", &image]),
        "ok"
    );
    let expected = p(dir.path(), "expected.raw");
    qemu_img(&["convert", "-O", "raw", &image, &expected]);
    let sock = dir.path().join("nbd.sock");
    let mut args = vec![
        s("--blockdev"),
        format!("driver=qcow2,node-name=d,file.driver=file,file.filename={image}"),
        s("--blockdev"),
        format!("driver=qcow2,node-name=t,file.driver=file,file.filename={target}"),
    ];
    args.extend(nbd_server_args(&sock));
    args.extend([s("--export"), s("type=nbd,id=d,node-name=d,writable=on")]);
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &args);
    let mut c = daemon.qmp().await;
    // Slow enough to be running through all of it.
    c.execute(
        "blockdev-backup",
        json!({"job-id": "j", "device": "d", "target": "t", "sync": "full",
               "speed": 8 << 20}),
    )
    .await
    .unwrap();
    let hang_ups = {
        let sock = sock.clone();
        std::thread::spawn(move || (0..200).for_each(|i| hang_up_mid_request(&sock, i)))
    };
    let uri = format!("nbd+unix:///d?socket={}", sock.display());
    for command in [
        "write -P 0x5a 48M 1M",
        "read -P 0x5a 48M 1M",
        "read -P 0x21 8M 1M",
    ] {
        assert_eq!(qemu_io_outcome(&["-f", "raw", "-c", command, &uri]), "ok");
    }
    hang_ups.join().unwrap();
    let jobs = c.execute("query-block-jobs", json!({})).await.unwrap();
    assert_eq!(
        jobs[0]["status"], "running",
        "the backup ran through it: {jobs}"
    );
    c.execute("block-job-set-speed", json!({"device": "j", "speed": 0}))
        .await
        .unwrap();
    let done = c
        .wait_event("BLOCK_JOB_COMPLETED", WAIT)
        .await
        .expect("the backup completes");
    assert!(done["data"].get("error").is_none(), "{done}");
    // No half-sent write reached the disk: only the honest client's write changed it.
    for (command, at) in [("read -P 0x21 0 40M", "0"), ("read -P 0 40M 8M", "40M")] {
        assert_eq!(
            qemu_io_outcome(&["-f", "raw", "-c", command, &uri]),
            "ok",
            "{at}"
        );
    }
    delete_export_when_unused(&mut c, "d").await;
    daemon.quit(&mut c).await;
    qemu_img(&["check", "-q", &image]);
    qemu_img(&["check", "-q", &target]);
    let same = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &target, &expected]);
    assert!(
        same.contains("identical"),
        "the backup is the point in time: {same}"
    );
}
