//! The vhost-user-blk export, driven by a vhost-user frontend built on rust-vmm's vhost
//! crate (tests/common/vhost.rs) side by side against qemu-storage-daemon's export of a
//! copy of the same image: the same requests get the same statuses and data, the images
//! end up equal (qemu-img compare) and clean (qemu-img check), and the data is where
//! qemu-io finds it.

mod common;
#[path = "common/vhost.rs"]
mod vhost;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use vhost::*;
use virtio_bindings::virtio_blk::*;

const MIB: u64 = 1 << 20;

fn blk_daemon(which: Impl, dir: &Path, image: &str, socket: &Path, extra: &str) -> Daemon {
    let export = format!(
        "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={}{extra}",
        socket.display()
    );
    Daemon::start(which, dir, &exported_qcow2_args(image, export))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn request(kind: u32, sector: u64, out: Vec<u8>, in_len: usize) -> Request {
    Request {
        kind,
        sector,
        out,
        in_len,
    }
}

fn summary(c: &Completion) -> Value {
    json!({"status": c.status, "used": c.used_len, "data": c.data.len(),
           "sum": c.data.iter().map(|&b| u64::from(b)).sum::<u64>()})
}

/// The device both daemons offer, and every kind of request (good and bad) on two queues,
/// answer the same; the images are equal afterwards and hold what was written.
#[tokio::test]
async fn requests_match_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let mut transcripts = Vec::new();
    let mut images = Vec::new();
    for which in Impl::all() {
        let (tag, image) = tagged_qcow2(dir.path(), which, "16M");
        let sock = dir.path().join(format!("{tag}.sock"));
        let daemon = blk_daemon(
            which,
            dir.path(),
            &image,
            &sock,
            ",writable=on,num-queues=2",
        );
        let mut client = daemon.qmp().await;
        let mut seen = Vec::new();
        seen.push(normalize(
            reply(&mut client, "query-block-exports", json!({})).await,
        ));
        let sock2 = sock.clone();
        let answers = tokio::task::spawn_blocking(move || {
            let mut blk = VhostBlk::connect(&sock2, 2, 64, 2 * MIB, false).expect("connect");
            let mut seen = vec![json!({"features": blk.features(),
                                       "config": format!("{:?}", blk.config().unwrap())})];
            let one = pattern(MIB as usize, 1);
            let two = pattern(64 << 10, 2);
            let q0 = vec![
                request(VIRTIO_BLK_T_OUT, 0, one.clone(), 0),
                request(VIRTIO_BLK_T_OUT, 4096, two.clone(), 0),
                request(VIRTIO_BLK_T_GET_ID, 0, vec![], 20),
                request(VIRTIO_BLK_T_GET_ID, 0, vec![], 8),
                request(VIRTIO_BLK_T_FLUSH, 0, vec![], 0),
            ];
            for c in blk.run(0, &q0).unwrap() {
                seen.push(summary(&c));
            }
            let q1 = vec![
                VhostBlk::zero_request(VIRTIO_BLK_T_WRITE_ZEROES, 8, 8, 0),
                VhostBlk::zero_request(VIRTIO_BLK_T_WRITE_ZEROES, 2048, 2048, 1),
                VhostBlk::zero_request(VIRTIO_BLK_T_DISCARD, 6144, 2048, 0),
                // Discard takes no flags; unknown write-zeroes flags are refused.
                VhostBlk::zero_request(VIRTIO_BLK_T_DISCARD, 6144, 8, 1),
                VhostBlk::zero_request(VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 2),
                // Past the end, too long, an unknown type.
                VhostBlk::zero_request(VIRTIO_BLK_T_WRITE_ZEROES, 32760, 16, 0),
                VhostBlk::zero_request(VIRTIO_BLK_T_WRITE_ZEROES, 0, 32769, 0),
                request(99, 0, vec![], 0),
                request(VIRTIO_BLK_T_IN, 32767, vec![], 1024),
                request(VIRTIO_BLK_T_OUT, 32768, vec![0; 512], 0),
            ];
            for c in blk.run(1, &q1).unwrap() {
                seen.push(summary(&c));
            }
            let reads = vec![
                request(VIRTIO_BLK_T_IN, 0, vec![], MIB as usize),
                request(VIRTIO_BLK_T_IN, 4096, vec![], 64 << 10),
                request(VIRTIO_BLK_T_IN, 2040, vec![], 16 << 10),
            ];
            let back = blk.run(0, &reads).unwrap();
            assert!(
                back[0].data[4096..8192].iter().all(|&b| b == 0),
                "zeroed range"
            );
            assert!(back[0].data[..4096] == one[..4096], "read back");
            assert!(back[0].data[8192..] == one[8192..], "read back");
            assert!(back[1].data == two, "read back");
            for c in &back {
                seen.push(summary(c));
            }
            let id = blk
                .run(0, &[request(VIRTIO_BLK_T_GET_ID, 0, vec![], 20)])
                .unwrap();
            seen.push(json!(String::from_utf8_lossy(&id[0].data)));
            seen
        })
        .await
        .unwrap();
        seen.extend(answers);
        daemon.quit(&mut client).await;
        qemu_img(&["check", &image]);
        transcripts.push(seen);
        images.push(image);
    }
    let (ours, theirs) = (
        Value::from(transcripts[0].clone()),
        Value::from(transcripts[1].clone()),
    );
    assert!(
        ours == theirs,
        "blockd against qsd: {:?}",
        first_difference(&ours, &theirs)
    );
    qemu_img(&["compare", &images[0], &images[1]]);
    let io = qemu_io_outcome(&[
        "-f",
        "qcow2",
        "-c",
        "read -P 0 4k 4k",
        "-c",
        "read -P 0 1M 1M",
        "-c",
        "read -P 0 3M 1M",
        &images[0],
    ]);
    assert_eq!(io, "ok");
}

/// A read-only export says so in its features and refuses writes, zeroing and discards;
/// reads work.
#[tokio::test]
async fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let image = p(dir.path(), "d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &image, "4M"]);
    let io = qemu_io_outcome(&["-f", "qcow2", "-c", "write -P 7 0 64k", &image]);
    assert_eq!(io, "ok");
    let mut statuses = Vec::new();
    for which in Impl::all() {
        let tag = format!("{which:?}").to_lowercase();
        let sock = dir.path().join(format!("{tag}.sock"));
        let daemon = blk_daemon(which, dir.path(), &image, &sock, "");
        let mut client = daemon.qmp().await;
        let seen = tokio::task::spawn_blocking(move || {
            let mut blk = VhostBlk::connect(&sock, 1, 16, MIB, false).unwrap();
            assert_ne!(blk.features() & F_RO, 0);
            let read = blk.read(0, 4096).unwrap();
            assert_eq!(read.data, vec![7; 4096]);
            let answers = blk
                .run(
                    0,
                    &[
                        request(VIRTIO_BLK_T_OUT, 0, vec![1; 512], 0),
                        VhostBlk::zero_request(VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 0),
                        VhostBlk::zero_request(VIRTIO_BLK_T_DISCARD, 0, 8, 0),
                        request(VIRTIO_BLK_T_FLUSH, 0, vec![], 0),
                    ],
                )
                .unwrap();
            answers.iter().map(|c| c.status).collect::<Vec<_>>()
        })
        .await
        .unwrap();
        statuses.push(seen);
        daemon.quit(&mut client).await;
    }
    assert_eq!(statuses[0], statuses[1]);
    assert_eq!(statuses[0][..3], [1, 1, 1]);
}

/// A frontend that goes away and comes back finds what it wrote; the export keeps
/// serving, and block_resize shows in the capacity the next GET_CONFIG reads.
#[tokio::test]
async fn frontend_reconnects_and_sees_resize() {
    let dir = tempfile::tempdir().unwrap();
    for which in Impl::all() {
        let (tag, image) = tagged_qcow2(dir.path(), which, "4M");
        let sock = dir.path().join(format!("{tag}.sock"));
        let daemon = blk_daemon(which, dir.path(), &image, &sock, ",writable=on");
        let mut client = daemon.qmp().await;
        let s1 = sock.clone();
        tokio::task::spawn_blocking(move || {
            let mut blk = VhostBlk::connect(&s1, 1, 16, MIB, true).unwrap();
            assert_eq!(blk.write(16, &pattern(8192, 9)).unwrap().status, 0);
        })
        .await
        .unwrap();
        let s2 = sock.clone();
        tokio::task::spawn_blocking(move || {
            let mut blk = VhostBlk::connect(&s2, 1, 16, MIB, true).unwrap();
            assert_eq!(
                blk.read(16, 8192).unwrap().data,
                pattern(8192, 9),
                "{which:?}"
            );
        })
        .await
        .unwrap();
        let s3 = sock.clone();
        let before = tokio::task::spawn_blocking(move || {
            VhostBlk::connect(&s3, 1, 16, MIB, false)
                .unwrap()
                .config()
                .unwrap()
                .capacity
        });
        let before = before.await.unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        assert_eq!(before, 8192, "{which:?}");
        // A frontend connected across the resize hears of it on its backend channel.
        let s_watch = sock.clone();
        let watcher = std::thread::spawn(move || {
            let mut blk = VhostBlk::connect(&s_watch, 1, 16, MIB, false).unwrap();
            blk.read(0, 512).unwrap();
            ready_tx.send(()).unwrap();
            let heard = blk.wait_config_change();
            (heard, blk.config().unwrap().capacity)
        });
        ready_rx.recv_timeout(WAIT).expect("watcher connected");
        client
            .execute("block_resize", json!({"node-name": "d", "size": 8 * MIB}))
            .await
            .unwrap();
        let (heard, seen) = watcher.join().unwrap();
        assert!(heard, "{which:?}: config change message after block_resize");
        assert_eq!(seen, 16384, "{which:?}");
        let s4 = sock.clone();
        let (after, read) = tokio::task::spawn_blocking(move || {
            let mut blk = VhostBlk::connect(&s4, 1, 16, MIB, false).unwrap();
            let after = blk.config().unwrap().capacity;
            (after, blk.read(16000, 4096).unwrap())
        })
        .await
        .unwrap();
        assert_eq!(after, 16384, "{which:?}");
        assert_eq!(read.status, 0, "{which:?}: the grown part reads");
        daemon.quit(&mut client).await;
        qemu_img(&["check", &image]);
    }
}

/// Many requests at once on four queues, each writing its own pattern; qemu-io finds every
/// one in the image afterwards.
#[tokio::test]
async fn concurrent_requests_on_four_queues() {
    let dir = tempfile::tempdir().unwrap();
    let image = p(dir.path(), "d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &image, "64M"]);
    let sock = dir.path().join("blk.sock");
    let daemon = blk_daemon(
        Impl::Blockd,
        dir.path(),
        &image,
        &sock,
        ",writable=on,num-queues=4",
    );
    let mut client = daemon.qmp().await;
    tokio::task::spawn_blocking(move || {
        let mut blk = VhostBlk::connect(&sock, 4, 96, 256 << 10, true).unwrap();
        let slots = blk.slots();
        for q in 0..4 {
            for slot in 0..slots {
                let n = (q * slots + slot) as u64;
                blk.put(
                    q,
                    slot,
                    &request(VIRTIO_BLK_T_OUT, n * 256, vec![n as u8 + 1; 128 << 10], 0),
                );
            }
            blk.kick(q);
        }
        let mut left = 4 * slots;
        let mut done = Vec::new();
        while left > 0 {
            done.clear();
            blk.wait_any(&mut done).unwrap();
            for &(_, _, status) in &done {
                assert_eq!(status, 0);
                left -= 1;
            }
        }
    })
    .await
    .unwrap();
    daemon.quit(&mut client).await;
    qemu_img(&["check", &image]);
    for n in [0u64, 31, 63, 127] {
        let io = qemu_io_outcome(&[
            "-f",
            "qcow2",
            "-c",
            &format!("read -P {} {} 128k", n + 1, n * 256 * 512),
            &image,
        ]);
        assert_eq!(io, "ok", "request {n}");
    }
}

/// Chains a frontend should not send (no status byte, a header cut short, readable after
/// writable) get no data written and leave the device serving; a removed export cuts its
/// frontend off and lets the node go.
#[tokio::test]
async fn malformed_chains_and_export_removal() {
    let dir = tempfile::tempdir().unwrap();
    let image = p(dir.path(), "d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &image, "4M"]);
    let sock = dir.path().join("blk.sock");
    let daemon = blk_daemon(Impl::Blockd, dir.path(), &image, &sock, ",writable=on");
    let mut client = daemon.qmp().await;
    let socket = sock.clone();
    let blk = tokio::task::spawn_blocking(move || {
        let mut blk = VhostBlk::connect(&sock, 1, 16, MIB, false).unwrap();
        let base = blk.slot_addr(0, 0);
        let mut header = [0u8; 16];
        header[0] = 0; // IN
        blk.poke(base, &header);
        // No writable descriptor at all.
        blk.put_chain(0, 0, &[(base, 16, 0)]);
        blk.expect(0, 0, 0, base + 64, base + 64);
        blk.kick(0);
        let c = blk.wait(0).unwrap();
        assert_eq!(c[0].1.used_len, 0);
        // A header of 8 bytes.
        blk.poke(base + 64, &[0xff]);
        blk.put_chain(0, 0, &[(base, 8, 0), (base + 64, 1, 2)]);
        blk.expect(0, 0, 0, base + 64, base + 64);
        blk.kick(0);
        assert_eq!(blk.wait(0).unwrap()[0].1.status, 1);
        // Readable after writable.
        blk.put_chain(
            0,
            0,
            &[(base, 16, 0), (base + 64, 1, 2), (base + 128, 16, 0)],
        );
        blk.expect(0, 0, 0, base + 64, base + 64);
        blk.kick(0);
        assert_eq!(blk.wait(0).unwrap()[0].1.used_len, 0);
        // A descriptor outside guest memory.
        blk.put_chain(
            0,
            0,
            &[(base, 16, 0), (1 << 40, 4096, 2), (base + 64, 1, 2)],
        );
        blk.expect(0, 0, 0, base + 64, base + 64);
        blk.kick(0);
        blk.wait(0).unwrap();
        // Still serving.
        assert_eq!(blk.write(0, &[5; 4096]).unwrap().status, 0);
        assert_eq!(blk.read(0, 4096).unwrap().data, vec![5; 4096]);
        blk
    })
    .await
    .unwrap();
    client
        .execute("block-export-del", json!({"id": "e"}))
        .await
        .unwrap();
    let event = client
        .wait_event("BLOCK_EXPORT_DELETED", WAIT)
        .await
        .expect("BLOCK_EXPORT_DELETED");
    assert_eq!(event["data"]["id"], "e");
    assert!(!socket.exists(), "the export removes its socket, as qsd's");
    client
        .execute("blockdev-del", json!({"node-name": "d"}))
        .await
        .unwrap();
    drop(blk);
    daemon.quit(&mut client).await;
    qemu_img(&["check", &image]);
}

/// Options qsd refuses, blockd refuses with the same words.
#[tokio::test]
async fn bad_options_match_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let image = p(dir.path(), "d.img");
    qemu_img(&["create", "-q", "-f", "raw", &image, "4M"]);
    let cases = [
        json!({"addr": {"type": "unix", "path": "x.sock"}, "num-queues": 0}),
        json!({"addr": {"type": "unix", "path": "x.sock"}, "logical-block-size": 1000}),
        json!({"addr": {"type": "unix", "path": "x.sock"}, "logical-block-size": 256}),
        json!({"addr": {"type": "inet", "host": "127.0.0.1", "port": "0"}}),
        json!({"addr": {"type": "unix", "path": "/nonexistent/x.sock"}}),
        json!({"addr": {"type": "fd", "str": "nosuchfd"}}),
        json!({}),
        json!({"addr": {"type": "unix", "path": "x.sock"}, "mountpoint": "x"}),
        json!({"addr": {"type": "unix", "path": "x.sock"}, "name": "x"}),
    ];
    let requests: Vec<_> = cases
        .iter()
        .map(|case| {
            let mut args = json!({"type": "vhost-user-blk", "id": "e", "node-name": "d"});
            for (k, v) in case.as_object().unwrap() {
                args[k] = v.clone();
            }
            ("block-export-add", args)
        })
        .collect();
    let blockdev = [
        s("--blockdev"),
        format!("driver=file,node-name=d,filename={image}"),
    ];
    let answers = replies_of_both(dir.path(), &blockdev, &requests).await;
    assert_eq!(answers[0], answers[1]);
}

/// `addr.type=fd`: a listening socket the daemon inherits by number (as a VMM manager or
/// systemd hands one over) serves the frontend like a bound path, on both daemons.
#[tokio::test]
async fn an_inherited_listening_socket_serves() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    for which in Impl::all() {
        let (tag, image) = tagged_qcow2(dir.path(), which, "4M");
        let sock = dir.path().join(format!("{tag}.sock"));
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let fd = listener.as_raw_fd();
        let mut command = std::process::Command::new(which.binary());
        command
            .args([
                "--blockdev",
                &format!("driver=qcow2,node-name=d,file.driver=file,file.filename={image}"),
            ])
            .args([
                "--export",
                "type=vhost-user-blk,id=e,node-name=d,addr.type=fd,addr.str=3,writable=on",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // Safety: dup2 is async-signal-safe; descriptor 3 is the inherited listener.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let _daemon = KillOnDrop(command.spawn().unwrap());
        drop(listener);
        let read = tokio::task::spawn_blocking(move || {
            let mut blk = VhostBlk::connect(&sock, 1, 16, MIB, true).unwrap();
            assert_eq!(blk.write(8, &pattern(4096, 5)).unwrap().status, 0);
            blk.read(8, 4096).unwrap().data
        })
        .await
        .unwrap();
        assert!(read == pattern(4096, 5), "{which:?}");
    }
}
