//! Hyper-V (vhdx) images on both daemons: images qemu-img and blockdev-create make,
//! dynamic and fixed, written through NBD (within a block, across blocks, zero writes,
//! discards), then checked by qemu-img and compared with what qsd made of the same steps;
//! an image whose log was left to replay is refused read-only and replayed read-write as
//! qsd does; crafted images get qsd's refusals (blockd adds what it found).

mod common;

use common::formats::{assert_behaves_as_in_qsd, nodes_of, patched};
use common::jobs::{create, empty_file_nodes, qemu_io};
use common::*;
use serde_json::{json, Value};
use std::path::Path;

const IMAGES: [&str; 5] = [
    "made.vhdx",
    "madefixed.vhdx",
    "new.vhdx",
    "fixed.vhdx",
    "small.vhdx",
];

async fn exercise(which: Impl, dir: &Path) -> Vec<Value> {
    let d = |n: &str| p(dir, n);
    qemu_img(&["create", "-q", "-f", "vhdx", &d("made.vhdx"), "64M"]);
    qemu_io(&["-f", "vhdx", &d("made.vhdx"), "-c", "write -P 0x11 1M 9M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "subformat=fixed,block_state_zero=off",
        &d("madefixed.vhdx"),
        "24M",
    ]);
    let sock = dir.join("nbd.sock");
    let daemon = Daemon::start(which, dir, &nbd_server_args(&sock));
    let mut client = daemon.qmp().await;
    let mut seen = Vec::new();
    empty_file_nodes(
        &mut client,
        &["new.vhdx", "fixed.vhdx", "small.vhdx", "x.vhdx"],
    )
    .await;
    for options in [
        json!({"driver": "vhdx", "file": "new-vhdx", "size": 64 << 20}),
        json!({"driver": "vhdx", "file": "fixed-vhdx", "size": 24 << 20, "subformat": "fixed",
               "block-state-zero": false}),
        json!({"driver": "vhdx", "file": "small-vhdx", "size": (20 << 20) + 5000,
               "block-size": 1 << 20, "log-size": 2 << 20}),
        json!({"driver": "vhdx", "file": "x-vhdx", "size": 1 << 20, "block-size": 3 << 20}),
        json!({"driver": "vhdx", "file": "x-vhdx", "size": 1 << 20, "block-size": 512 << 10}),
        json!({"driver": "vhdx", "file": "x-vhdx", "size": 1 << 20, "block-size": 512 << 20}),
        json!({"driver": "vhdx", "file": "x-vhdx", "size": 1 << 20, "log-size": 1536 << 10}),
        json!({"driver": "vhdx", "file": "x-vhdx", "size": (64u64 << 40) + 512}),
        json!({"driver": "vhdx", "file": "x-vhdx", "size": 1 << 20, "bogus": 1}),
    ] {
        seen.push(create(&mut client, "c", options).await);
    }
    for (i, name) in IMAGES.iter().enumerate() {
        let node = format!("n{i}");
        add_exported(&mut client, "vhdx", &node, name).await;
        let uri = format!("nbd+unix:///{node}?socket={}", sock.display());
        qemu_io(&[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x22 1000 3000",
            "-c",
            "write -P 0x33 8388000 2000",
            "-c",
            "write -z 2M 5000",
            "-c",
            "write -z 1M 64k",
            "-c",
            "discard 0 512",
            "-c",
            "read -P 0x22 1000 3000",
            "-c",
            "read -P 0x33 8388000 2000",
            "-c",
            "read -P 0 2M 5000",
            "-c",
            "read -P 0 1M 64k",
            "-c",
            "flush",
        ]);
    }
    seen.extend(nodes_of(&mut client, "vhdx").await);
    daemon.quit(&mut client).await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhdx_images_behave_as_in_qsd() {
    assert_behaves_as_in_qsd("vhdx", &IMAGES, |which, dir| async move {
        exercise(which, &dir).await
    })
    .await;
}

/// `image` with `bytes` at `at`, and the checksum of the structure of `len` bytes at
/// `start` (its field 4 bytes in) made right again.
fn patched_sealed(image: &[u8], at: usize, bytes: &[u8], start: usize, len: usize) -> Vec<u8> {
    let mut v = patched(image, at, bytes);
    v[start + 4..start + 8].fill(0);
    let crc = crc32c::crc32c(&v[start..start + len]);
    v[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    v
}

/// Opened read-only on both daemons: qsd's answer, and blockd's begins with it (blockd
/// adds what it found where qsd says only "Invalid argument").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_vhdx_images_are_refused_as_qsd_refuses_them() {
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = |n: &str| p(dir.path(), n);
        qemu_img(&["create", "-q", "-f", "vhdx", &d("good.vhdx"), "64M"]);
        let good = std::fs::read(d("good.vhdx")).unwrap();
        let (h1, h2, rt, md) = (0x10000, 0x20000, 0x30000, 0x300000);
        let header = |g: &[u8], at: usize, bytes: &[u8]| {
            let g = patched_sealed(g, h1 + at, bytes, h1, 4096);
            patched_sealed(&g, h2 + at, bytes, h2, 4096)
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("signature", patched(&good, 0, b"vhdxfilX")),
            (
                "headers",
                patched(&patched(&good, h1 + 100, &[1]), h2 + 100, &[1]),
            ),
            ("one_header", patched(&good, h2 + 100, &[1])),
            ("log_version", header(&good, 64, &[1, 0])),
            ("region_crc", patched(&good, rt + 100, &[1])),
            (
                "region_unknown",
                patched_sealed(&good, rt + 16, &[0x11; 16], rt, 65536),
            ),
            ("metadata_signature", patched(&good, md, b"metadatX")),
            (
                "block_size",
                patched(&good, md + 0x10000, &(3u32 << 20).to_le_bytes()),
            ),
            (
                "block_size_small",
                patched(&good, md + 0x10000, &(512u32 << 10).to_le_bytes()),
            ),
            (
                "logical_sector",
                patched(&good, md + 0x10020, &1024u32.to_le_bytes()),
            ),
            (
                "unknown_item",
                patched(
                    &patched(&good, md + 32 + 64, &[0x22; 16]),
                    md + 32 + 64 + 24,
                    &[4],
                ),
            ),
            (
                "bat_small",
                patched(&good, md + 0x10008, &(10u64 << 40).to_le_bytes()),
            ),
            ("parent", patched(&good, md + 0x10004, &2u32.to_le_bytes())),
            ("short", good[..100000].to_vec()),
        ];
        let daemon = Daemon::start(which, dir.path(), &[]);
        let mut client = daemon.qmp().await;
        let mut seen = Vec::new();
        for (name, bytes) in cases {
            let file = format!("{name}.vhdx");
            std::fs::write(d(&file), bytes).unwrap();
            let answer = reply(
                &mut client,
                "blockdev-add",
                json!({"driver": "vhdx", "node-name": name, "read-only": true,
                       "file": {"driver": "file", "filename": file}}),
            )
            .await;
            seen.push((name, answer));
        }
        daemon.quit(&mut client).await;
        all.push(seen);
    }
    // All but "one_header" (the other header is good) are refused.
    let refused: Vec<_> = all[0]
        .iter()
        .filter(|(_, a)| a.get("error").is_some())
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(refused.len(), 13, "{refused:?}");
    for ((name, ours), (_, theirs)) in all[0].iter().zip(&all[1]) {
        match (
            ours["error"]["desc"].as_str(),
            theirs["error"]["desc"].as_str(),
        ) {
            (Some(a), Some(b)) => assert!(a.starts_with(b), "{name}: {a} / {b}"),
            (a, b) => assert_eq!(a, b, "{name}: {ours} / {theirs}"),
        }
    }
}

/// An image whose writer stopped before it replayed its log (QEMU made to fail the BAT
/// write of an allocation, then killed): refused read-only, replayed read-write, on both
/// daemons, with the same result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_left_to_replay_is_replayed_as_qsd_replays_it() {
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = |n: &str| p(dir.path(), n);
        qemu_img(&["create", "-q", "-f", "vhdx", &d("dirty.vhdx"), "64M"]);
        std::fs::write(
            d("fail-bat.conf"),
            "[inject-error]\nevent = \"pwritev\"\nsector = \"4096\"\nerrno = \"5\"\nonce = \"on\"\n",
        )
        .unwrap();
        let blkdebug = format!("blkdebug:{}:{}", d("fail-bat.conf"), d("dirty.vhdx"));
        let out = run(std::process::Command::new("qemu-io").args([
            "-f",
            "vhdx",
            &blkdebug,
            "-c",
            "write -P 0x5a 0 4k",
            "-c",
            "sigraise 9",
        ]));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("write failed"),
            "{out:?}"
        );
        let image = std::fs::read(d("dirty.vhdx")).unwrap();
        assert!(
            image[0x10000 + 48..0x10000 + 64].iter().any(|&b| b != 0),
            "no log to replay"
        );
        let sock = dir.path().join("nbd.sock");
        let daemon = Daemon::start(which, dir.path(), &nbd_server_args(&sock));
        let mut client = daemon.qmp().await;
        let read_only = reply(
            &mut client,
            "blockdev-add",
            json!({"driver": "vhdx", "node-name": "ro", "read-only": true,
                   "file": {"driver": "file", "filename": "dirty.vhdx"}}),
        )
        .await;
        add_exported(&mut client, "vhdx", "rw", "dirty.vhdx").await;
        let uri = format!("nbd+unix:///rw?socket={}", sock.display());
        qemu_io(&[
            "-f",
            "raw",
            &uri,
            "-c",
            "read -P 0x5a 0 4k",
            "-c",
            "read -P 0 4k 60k",
        ]);
        daemon.quit(&mut client).await;
        qemu_img(&["check", "-q", "-f", "vhdx", &d("dirty.vhdx")]);
        all.push(json!({"read-only": normalize(read_only).to_string().replace(&dir.path().display().to_string(), "")}));
    }
    assert_eq!(all[0], all[1]);
    assert!(
        all[0].to_string().contains("needs to be replayed"),
        "{}",
        all[0]
    );
}
