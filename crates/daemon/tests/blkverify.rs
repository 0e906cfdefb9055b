//! The blkverify filter against qemu-storage-daemon: writes reach both images, reads that
//! agree pass, option errors read the same; and a read that finds the images different
//! fails with EIO in blockd, where qsd ends the whole process.

mod common;

use common::jobs::qemu_io;
use common::*;
use serde_json::json;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

/// test.qcow2 and raw.img: the same 16 MiB disk, 1 MiB of pattern 1 at its start.
fn images(d: &Path) -> (String, String) {
    let (test, raw) = (p(d, "test.qcow2"), p(d, "raw.img"));
    qemu_img(&["create", "-q", "-f", "qcow2", &test, "16M"]);
    qemu_io(&["-c", "write -P 1 0 1M", &test]);
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", &test, &raw]);
    (test, raw)
}

fn verified_export(d: &Path, test: &str, raw: &str) -> Vec<String> {
    let node = json!({
        "driver": "blkverify", "node-name": "v",
        "test": {"driver": "qcow2", "file": {"driver": "file", "filename": test}},
        "raw": {"driver": "raw", "file": {"driver": "file", "filename": raw}},
    });
    vec![
        s("--blockdev"),
        node.to_string(),
        s("--nbd-server"),
        format!("addr.type=unix,addr.path={}", p(d, "nbd.sock")),
        s("--export"),
        "type=nbd,id=e0,node-name=v,name=v,writable=on".into(),
    ]
}

fn uri(d: &Path) -> String {
    format!("nbd+unix:///v?socket={}", p(d, "nbd.sock"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_both_images_and_agreeing_reads_pass() {
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (test, raw) = images(d);
        let daemon = Daemon::start(which, d, &verified_export(d, &test, &raw));
        let out = qemu_io(&[
            "-f",
            "raw",
            "-c",
            "read -P 1 0 1M",
            "-c",
            "write -P 5 2M 1M",
            "-c",
            "read -P 5 2M 1M",
            "-c",
            "write -P 6 8M 4k",
            "-c",
            "read -P 6 8M 4k",
            // Larger than the 8 MiB the buffer pool lends at once.
            "-c",
            "read 0 16M",
            &uri(d),
        ]);
        if which == Impl::Blockd {
            // Zero writes reach both images as zeroes. qsd fails them with EIO, and one
            // that may unmap ends it on an assertion (QEMU 10.0's blkverify has no
            // write-zeroes, and its fallback asserts on the flags).
            qemu_io(&[
                "-f",
                "raw",
                "-c",
                "write -z 4M 1M",
                "-c",
                "write -z -u 12M 1M",
                "-c",
                "read -P 0 4M 1M",
                "-c",
                "read -P 0 12M 1M",
                &uri(d),
            ]);
        }
        assert!(!out.contains("error"), "{which:?}: {out}");
        let mut client = daemon.qmp().await;
        let nodes = client
            .execute("query-named-block-nodes", json!({}))
            .await
            .unwrap();
        let v = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == "v")
            .unwrap();
        assert_eq!(v["drv"], "blkverify", "{which:?}");
        assert_eq!(v["image"]["virtual-size"], 16 << 20, "{which:?}");
        daemon.quit(&mut client).await;
        qemu_img(&["check", "-q", &test]);
        qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &test, &raw]);
        qemu_io(&["-c", "read -P 5 2M 1M", "-c", "read -P 6 8M 4k", &test]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatch_fails_the_read_where_qsd_ends_the_process() {
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (test, raw) = images(d);
        // The reference differs in one sector at 8 MiB + 512.
        let mut file = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        file.seek(SeekFrom::Start((8 << 20) + 512)).unwrap();
        file.write_all(&[0xaa; 512]).unwrap();
        drop(file);
        let mut daemon = Daemon::start(which, d, &verified_export(d, &test, &raw));
        let out = run(Command::new("qemu-io").args(["-f", "raw", "-c", "read 8M 64k", &uri(d)]));
        let text = String::from_utf8_lossy(&out.stdout);
        match which {
            Impl::Blockd => {
                assert!(text.contains("read failed: Input/output error"), "{text}");
                // The rest of the disk, and the daemon, go on.
                qemu_io(&["-f", "raw", "-c", "read -P 1 0 1M", &uri(d)]);
                let log = daemon.stderr();
                assert!(
                    log.contains(&format!(
                        "blkverify: read offset={} bytes=65536 contents mismatch at offset {}",
                        8 << 20,
                        (8 << 20) + 512
                    )),
                    "{log}"
                );
                let mut client = daemon.qmp().await;
                daemon.quit(&mut client).await;
            }
            Impl::Qsd => {
                // QEMU's blkverify aborts the process on a mismatch.
                let status = daemon.wait_exit();
                assert_eq!(status.code(), Some(1), "{text}");
                assert!(
                    daemon.stderr().contains("contents mismatch"),
                    "{}",
                    daemon.stderr()
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_errors_read_as_qsds() {
    let mut answers = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (test, raw) = images(d);
        let daemon = Daemon::start(which, d, &[]);
        let mut client = daemon.qmp().await;
        let file = |f: &str| json!({"driver": "file", "filename": f});
        let mut replies = Vec::new();
        for args in [
            json!({"driver": "blkverify", "node-name": "v", "raw": file(&raw)}),
            json!({"driver": "blkverify", "node-name": "v", "test": file(&test)}),
            json!({"driver": "blkverify", "node-name": "v", "test": file(&test), "raw": file(&raw), "x": 1}),
            json!({"driver": "blkverify", "node-name": "v", "test": file(&test), "raw": "nosuch"}),
        ] {
            replies.push(reply(&mut client, "blockdev-add", args).await);
        }
        daemon.quit(&mut client).await;
        answers.push(replies);
    }
    assert_eq!(answers[0], answers[1], "blockd, then qsd");
}
