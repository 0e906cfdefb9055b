//! VirtualBox (vdi) images on both daemons: images qemu-img and blockdev-create make,
//! dynamic and static, written through NBD (within a block, across blocks, zero writes,
//! discards), then checked by qemu-img and compared with what qsd made of the same steps;
//! crafted headers get qsd's refusals.

mod common;

use common::formats::{assert_behaves_as_in_qsd, assert_refusals_match, nodes_of, patched};
use common::jobs::{create, empty_file_nodes, qemu_io};
use common::*;
use serde_json::{json, Value};
use std::path::Path;

const IMAGES: [&str; 4] = ["dyn.vdi", "static.vdi", "new.vdi", "newstatic.vdi"];

async fn exercise(which: Impl, dir: &Path) -> Vec<Value> {
    let d = |n: &str| p(dir, n);
    qemu_img(&["create", "-q", "-f", "vdi", &d("dyn.vdi"), "5M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vdi",
        "-o",
        "static=on",
        &d("static.vdi"),
        "3M",
    ]);
    qemu_io(&["-f", "vdi", &d("dyn.vdi"), "-c", "write -P 0x11 1M 1M"]);
    let sock = dir.join("nbd.sock");
    let daemon = Daemon::start(which, dir, &nbd_server_args(&sock));
    let mut client = daemon.qmp().await;
    let mut seen = Vec::new();
    empty_file_nodes(&mut client, &["new.vdi", "newstatic.vdi", "x.vdi"]).await;
    for options in [
        json!({"driver": "vdi", "file": "new-vdi", "size": 6 << 20}),
        json!({"driver": "vdi", "file": "newstatic-vdi", "size": (2 << 20) + 1000,
               "preallocation": "metadata"}),
        json!({"driver": "vdi", "file": "x-vdi", "size": 1 << 20, "preallocation": "full"}),
        json!({"driver": "vdi", "file": "x-vdi", "size": 1u64 << 62}),
        json!({"driver": "vdi", "file": "x-vdi", "size": 1 << 20, "bogus": 1}),
    ] {
        seen.push(create(&mut client, "c", options).await);
    }
    for (i, name) in IMAGES.iter().enumerate() {
        let node = format!("n{i}");
        add_exported(&mut client, "vdi", &node, name).await;
        let uri = format!("nbd+unix:///{node}?socket={}", sock.display());
        qemu_io(&[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x22 1000 3000",
            "-c",
            "write -P 0x33 1047576 2000",
            "-c",
            "write -z 1100000 5000",
            "-c",
            "discard 0 512",
            "-c",
            "read -P 0x22 1000 3000",
            "-c",
            "read -P 0x33 1047576 2000",
            "-c",
            "read -P 0 1100000 5000",
            "-c",
            "flush",
        ]);
    }
    seen.extend(nodes_of(&mut client, "vdi").await);
    daemon.quit(&mut client).await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vdi_images_behave_as_in_qsd() {
    assert_behaves_as_in_qsd("vdi", &IMAGES, |which, dir| async move {
        exercise(which, &dir).await
    })
    .await;
}

/// Headers QEMU refuses, refused the same way, and none of them a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_vdi_headers_are_refused_as_qsd_refuses_them() {
    assert_refusals_match("vdi", &[], &[], |good| {
        vec![
            ("short", good[..100].to_vec()),
            ("signature", patched(good, 64, &7u32.to_le_bytes())),
            ("version", patched(good, 68, &0x0001_0000u32.to_le_bytes())),
            ("blocksize", patched(good, 376, &4096u32.to_le_bytes())),
            ("sectorsize", patched(good, 360, &4096u32.to_le_bytes())),
            ("room", patched(good, 384, &1u32.to_le_bytes())),
            ("parent", patched(good, 440, &[1; 16])),
            ("link", patched(good, 424, &[1; 16])),
            ("bmap", patched(good, 340, &3u32.to_le_bytes())),
            ("blocks", patched(good, 384, &0x4000_0000u32.to_le_bytes())),
        ]
    })
    .await;
}
