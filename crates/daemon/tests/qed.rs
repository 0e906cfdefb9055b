//! QEMU enhanced disk (qed) images on both daemons: images qemu-img and blockdev-create
//! make, with and without a backing file, written through NBD (within a cluster, across
//! clusters, zero writes, discards), then checked by qemu-img and compared with what qsd
//! made of the same steps; an image left "needing a check" is repaired on a read-write
//! open as qsd repairs it; crafted headers get qsd's refusals.

mod common;

use common::formats::{assert_behaves_as_in_qsd, assert_refusals_match, nodes_of, patched};
use common::jobs::{create, empty_file_nodes, qemu_io};
use common::*;
use serde_json::{json, Value};
use std::path::Path;

const IMAGES: [&str; 5] = [
    "made.qed",
    "new.qed",
    "small.qed",
    "over.qed",
    "overraw.qed",
];

async fn exercise(which: Impl, dir: &Path) -> Vec<Value> {
    let d = |n: &str| p(dir, n);
    qemu_img(&["create", "-q", "-f", "qed", &d("made.qed"), "5M"]);
    qemu_io(&["-f", "qed", &d("made.qed"), "-c", "write -P 0x11 1M 1M"]);
    qemu_img(&["create", "-q", "-f", "qed", &d("base.qed"), "5M"]);
    qemu_io(&["-f", "qed", &d("base.qed"), "-c", "write -P 0x55 0 3M"]);
    qemu_img(&["create", "-q", "-f", "raw", &d("base.raw"), "5M"]);
    qemu_io(&["-f", "raw", &d("base.raw"), "-c", "write -P 0x44 0 5M"]);
    let sock = dir.join("nbd.sock");
    let daemon = Daemon::start(which, dir, &nbd_server_args(&sock));
    let mut client = daemon.qmp().await;
    let mut seen = Vec::new();
    empty_file_nodes(
        &mut client,
        &["new.qed", "small.qed", "over.qed", "overraw.qed", "x.qed"],
    )
    .await;
    for options in [
        json!({"driver": "qed", "file": "new-qed", "size": 6 << 20}),
        json!({"driver": "qed", "file": "small-qed", "size": (3 << 20) + 1024,
               "cluster-size": 4096, "table-size": 2}),
        json!({"driver": "qed", "file": "over-qed", "size": 5 << 20, "backing-file": "base.qed"}),
        json!({"driver": "qed", "file": "overraw-qed", "size": 5 << 20, "backing-file": "base.raw",
               "backing-fmt": "raw"}),
        json!({"driver": "qed", "file": "x-qed", "size": 5000}),
        json!({"driver": "qed", "file": "x-qed", "size": 1 << 20, "cluster-size": 2048}),
        json!({"driver": "qed", "file": "x-qed", "size": 1 << 20, "table-size": 3}),
        json!({"driver": "qed", "file": "x-qed", "size": 1u64 << 60}),
        json!({"driver": "qed", "file": "x-qed", "size": 1 << 20, "bogus": 1}),
    ] {
        seen.push(create(&mut client, "c", options).await);
    }
    for (i, name) in IMAGES.iter().enumerate() {
        let node = format!("n{i}");
        add_exported(&mut client, "qed", &node, name).await;
        let uri = format!("nbd+unix:///{node}?socket={}", sock.display());
        qemu_io(&[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x22 1000 3000",
            "-c",
            "write -P 0x33 1047576 200000",
            "-c",
            "write -z 1300000 5000",
            "-c",
            "write -z 2M 128k",
            "-c",
            "discard 0 512",
            "-c",
            "read -P 0x22 1000 3000",
            "-c",
            "read -P 0x33 1047576 200000",
            "-c",
            "read -P 0 1300000 5000",
            "-c",
            "read -P 0 2M 128k",
            "-c",
            "flush",
        ]);
        if name.starts_with("over") {
            // Around the writes, the backing file's data.
            let pattern = if *name == "over.qed" { "0x55" } else { "0x44" };
            qemu_io(&[
                "-f",
                "raw",
                &uri,
                "-c",
                &format!("read -P {pattern} 4000 60000"),
            ]);
        }
    }
    seen.extend(nodes_of(&mut client, "qed").await);
    daemon.quit(&mut client).await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qed_images_behave_as_in_qsd() {
    assert_behaves_as_in_qsd("qed", &IMAGES, |which, dir| async move {
        exercise(which, &dir).await
    })
    .await;
}

/// An image QEMU left "needing a check" with an L2 entry past the end of the file: opened
/// read-write, both daemons clear the entry (the cluster reads from the backing file
/// again) and the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_needing_a_check_are_repaired_as_qsd_repairs_them() {
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = |n: &str| p(dir.path(), n);
        qemu_img(&["create", "-q", "-f", "qed", &d("a.qed"), "5M"]);
        qemu_io(&["-f", "qed", &d("a.qed"), "-c", "write -P 0x11 0 128k"]);
        let image = std::fs::read(d("a.qed")).unwrap();
        // The L1 table is the 4 clusters after the header; its first entry names the L2
        // table, whose second entry gets an offset past the end of the file.
        let l2 = u64::from_le_bytes(image[65536..65544].try_into().unwrap()) as usize;
        let image = patched(&image, 16, &2u64.to_le_bytes());
        let image = patched(&image, l2 + 8, &(1u64 << 40).to_le_bytes());
        std::fs::write(d("a.qed"), image).unwrap();
        let sock = dir.path().join("nbd.sock");
        let daemon = Daemon::start(which, dir.path(), &nbd_server_args(&sock));
        let mut client = daemon.qmp().await;
        add_exported(&mut client, "qed", "a", "a.qed").await;
        let uri = format!("nbd+unix:///a?socket={}", sock.display());
        qemu_io(&[
            "-f",
            "raw",
            &uri,
            "-c",
            "read -P 0x11 0 64k",
            "-c",
            "read -P 0 64k 64k",
        ]);
        daemon.quit(&mut client).await;
        let check =
            run(std::process::Command::new("qemu-img").args(["check", "-f", "qed", &d("a.qed")]));
        let header = std::fs::read(d("a.qed")).unwrap()[16..24].to_vec();
        all.push(json!({"check": String::from_utf8_lossy(&check.stdout), "features": header}));
    }
    assert_eq!(all[0], all[1]);
    assert_eq!(all[0]["features"], json!([0, 0, 0, 0, 0, 0, 0, 0]));
}

/// Headers QEMU refuses, refused the same way, and none of them a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_qed_headers_are_refused_as_qsd_refuses_them() {
    assert_refusals_match("qed", &[], &["write 0 64k"], |good| {
        vec![
            ("short", good[..40].to_vec()),
            ("magic", patched(good, 0, b"QEF\0")),
            ("cluster", patched(good, 4, &3000u32.to_le_bytes())),
            ("cluster_small", patched(good, 4, &2048u32.to_le_bytes())),
            ("table", patched(good, 8, &3u32.to_le_bytes())),
            ("table_big", patched(good, 8, &32u32.to_le_bytes())),
            ("header_size", patched(good, 12, &0u32.to_le_bytes())),
            ("features", patched(good, 16, &8u64.to_le_bytes())),
            ("size", patched(good, 48, &5000u64.to_le_bytes())),
            ("size_huge", patched(good, 48, &(1u64 << 60).to_le_bytes())),
            ("l1", patched(good, 40, &100u64.to_le_bytes())),
            ("l1_far", patched(good, 40, &(1u64 << 40).to_le_bytes())),
            ("backing", patched(good, 16, &1u64.to_le_bytes())),
        ]
    })
    .await;
}

/// block_resize of a qed node on both daemons: growing works (the new part reads as
/// zeroes and can be written), shrinking and odd sizes are refused with qsd's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qed_images_grow_as_in_qsd() {
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = |n: &str| p(dir.path(), n);
        qemu_img(&["create", "-q", "-f", "qed", &d("a.qed"), "5M"]);
        qemu_io(&["-f", "qed", &d("a.qed"), "-c", "write -P 0x11 4M 1M"]);
        let daemon = Daemon::start(which, dir.path(), &[]);
        let mut client = daemon.qmp().await;
        client
            .execute(
                "blockdev-add",
                json!({"driver": "qed", "node-name": "a",
                       "file": {"driver": "file", "filename": "a.qed"}}),
            )
            .await
            .unwrap();
        let mut seen = Vec::new();
        for size in [3u64 << 20, (7 << 20) + 100, 7 << 20, 1u64 << 50] {
            let answer = reply(
                &mut client,
                "block_resize",
                json!({"node-name": "a", "size": size}),
            )
            .await;
            seen.push(json!({size.to_string(): answer}));
        }
        seen.extend(nodes_of(&mut client, "qed").await);
        daemon.quit(&mut client).await;
        qemu_io(&[
            "-f",
            "qed",
            &d("a.qed"),
            "-c",
            "read -P 0x11 4M 1M",
            "-c",
            "read -P 0 5M 2M",
            "-c",
            "write -P 0x22 6M 64k",
            "-c",
            "read -P 0x22 6M 64k",
        ]);
        qemu_img(&["check", "-q", "-f", "qed", &d("a.qed")]);
        all.push(normalize(Value::Array(seen)));
    }
    assert_eq!(
        first_difference(&all[0], &all[1]),
        None,
        "{:#}\n{:#}",
        all[0],
        all[1]
    );
}
