//! Virtual PC / Hyper-V (vpc) images on both daemons: fixed, dynamic and exact-size images
//! qemu-img and blockdev-create make, written through NBD (within a block, across blocks,
//! zero writes, discards), then compared with what qsd made of the same steps; crafted
//! footers and headers get qsd's refusals.

mod common;

use common::formats::{assert_refusals_match, assert_same_images, nodes_of, patched, Run};
use common::jobs::{create, empty_file_nodes, qemu_io};
use common::*;
use serde_json::{json, Value};
use std::path::Path;

const IMAGES: [&str; 6] = [
    "dyn.vhd",
    "fixed.vhd",
    "exact.vhd",
    "new.vhd",
    "newfixed.vhd",
    "newexact.vhd",
];

async fn exercise(which: Impl, dir: &Path) -> Vec<Value> {
    let d = |n: &str| p(dir, n);
    qemu_img(&["create", "-q", "-f", "vpc", &d("dyn.vhd"), "10M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed",
        &d("fixed.vhd"),
        "3M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "force_size=on",
        &d("exact.vhd"),
        "5M",
    ]);
    qemu_io(&["-f", "vpc", &d("dyn.vhd"), "-c", "write -P 0x11 2M 1M"]);
    let sock = dir.join("nbd.sock");
    let daemon = Daemon::start(which, dir, &nbd_server_args(&sock));
    let mut client = daemon.qmp().await;
    let mut seen = Vec::new();
    empty_file_nodes(
        &mut client,
        &["new.vhd", "newfixed.vhd", "newexact.vhd", "x.vhd"],
    )
    .await;
    for options in [
        // 302 x 4 x 17 sectors, what qemu-img makes of 10M.
        json!({"driver": "vpc", "file": "new-vhd", "size": 10514432}),
        json!({"driver": "vpc", "file": "newfixed-vhd", "size": 10514432, "subformat": "fixed"}),
        json!({"driver": "vpc", "file": "x-vhd", "size": 6 << 20}),
        json!({"driver": "vpc", "file": "newexact-vhd", "size": 5 << 20, "force-size": true}),
        json!({"driver": "vpc", "file": "x-vhd", "size": 3000u64 << 30}),
        json!({"driver": "vpc", "file": "x-vhd", "size": 1 << 20, "subformat": "sparse"}),
    ] {
        seen.push(create(&mut client, "c", options).await);
    }
    for (i, name) in IMAGES.iter().enumerate() {
        let node = format!("n{i}");
        add_exported(&mut client, "vpc", &node, name).await;
        let uri = format!("nbd+unix:///{node}?socket={}", sock.display());
        qemu_io(&[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x22 1000 3000",
            "-c",
            "write -P 0x33 2097052 2000",
            "-c",
            "write -z 2200000 5000",
            "-c",
            "discard 0 512",
            "-c",
            "read -P 0x22 1000 3000",
            "-c",
            "read -P 0x33 2097052 2000",
            "-c",
            "read -P 0 2200000 5000",
            "-c",
            "flush",
        ]);
    }
    seen.extend(nodes_of(&mut client, "vpc").await);
    daemon.quit(&mut client).await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vpc_images_behave_as_in_qsd() {
    let mut runs = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let seen = exercise(which, dir.path()).await;
        runs.push(Run { seen, dir });
    }
    assert_same_images("vpc", &IMAGES, &runs);
}

/// `image` with a field of its first footer replaced and the checksum made right again.
fn with_footer_field(image: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut v = image.to_vec();
    v[at..at + bytes.len()].copy_from_slice(bytes);
    let sum = v[..512]
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |s, (_, &b)| s.wrapping_add(b as u32));
    v[64..68].copy_from_slice(&(!sum).to_be_bytes());
    v
}

/// Footers and headers QEMU refuses, refused the same way, and none of them a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_vpc_images_are_refused_as_qsd_refuses_them() {
    assert_refusals_match("vpc", &[], &["write -P 1 0 4k"], |good| {
        vec![
            ("short", good[..100].to_vec()),
            ("cookie", patched(good, 0, b"notavhd!")),
            ("dynmagic", patched(good, 512, b"notspars")),
            ("blocksize", patched(good, 512 + 32, &3000u32.to_be_bytes())),
            ("entries", patched(good, 512 + 28, &1u32.to_be_bytes())),
            (
                "bigentries",
                patched(good, 512 + 28, &0x4000_0000u32.to_be_bytes()),
            ),
            ("bat", patched(good, 512 + 16, &(1u64 << 40).to_be_bytes())),
            ("checksum", patched(good, 60, &4u32.to_be_bytes())),
            ("truncated", good[..good.len() - 4096].to_vec()),
        ]
    })
    .await;
}

/// A differencing image reads through its parent, which blockd does not open: it is
/// refused rather than served with the parent's data missing. (qsd opens it and serves
/// zeroes where the parent's data should be.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differencing_vpc_images_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = p(dir.path(), "good.vhd");
    qemu_img(&["create", "-q", "-f", "vpc", &path, "4M"]);
    let image = with_footer_field(&std::fs::read(&path).unwrap(), 60, &4u32.to_be_bytes());
    std::fs::write(dir.path().join("diff.vhd"), image).unwrap();
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &[]);
    let mut client = daemon.qmp().await;
    let err = client
        .execute(
            "blockdev-add",
            json!({"driver": "vpc", "node-name": "d",
                   "file": {"driver": "file", "filename": "diff.vhd"}}),
        )
        .await
        .unwrap_err();
    assert_eq!(err.desc, "VHD disk type 4 is not supported");
    daemon.quit(&mut client).await;
}
