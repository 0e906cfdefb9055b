//! A thousand NBD clients connected at once, each reading: every one is answered, a
//! further client too, and what an idle connection costs stays small (its read buffer is
//! the most of it).

mod common;

use common::raw_nbd::{connect, request};
use common::*;
use nbd::proto::CMD_READ;

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
