//! QEMU's version 1 images (qcow) on both daemons: plain, with a backing file, with
//! compressed clusters, and made by blockdev-create, written through NBD (partial clusters,
//! across L2 tables, into compressed clusters, zero writes), then compared with what qsd
//! made of the same steps; crafted headers get qsd's refusals.

mod common;

use common::formats::{assert_refusals_match, assert_same_images, patched, Run};
use common::jobs::{create, empty_file_nodes, qemu_io};
use common::*;
use serde_json::{json, Value};
use std::path::Path;

const IMAGES: [&str; 5] = [
    "plain.qcow",
    "over.qcow",
    "comp.qcow",
    "new.qcow",
    "newb.qcow",
];

async fn exercise(which: Impl, dir: &Path) -> Vec<Value> {
    let d = |n: &str| p(dir, n);
    qemu_img(&["create", "-q", "-f", "qcow", &d("plain.qcow"), "5M"]);
    qemu_img(&["create", "-q", "-f", "qcow", &d("base.qcow"), "5M"]);
    qemu_io(&["-f", "qcow", &d("base.qcow"), "-c", "write -P 0x11 0 3M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow",
        "-o",
        "backing_file=base.qcow,backing_fmt=qcow",
        &d("over.qcow"),
        "5M",
    ]);
    // Compressed clusters (4 KiB each) at 0, 4 KiB and 2 MiB.
    qemu_img(&["create", "-q", "-f", "qcow", &d("comp.qcow"), "5M"]);
    qemu_io(&[
        "-f",
        "qcow",
        &d("comp.qcow"),
        "-c",
        "write -c -P 1 0 4k",
        "-c",
        "write -c -P 2 4k 4k",
        "-c",
        "write -c -P 3 2M 4k",
    ]);
    let sock = dir.join("nbd.sock");
    let daemon = Daemon::start(which, dir, &nbd_server_args(&sock));
    let mut client = daemon.qmp().await;
    let mut seen = Vec::new();
    empty_file_nodes(&mut client, &["new.qcow", "newb.qcow", "x.qcow"]).await;
    for options in [
        json!({"driver": "qcow", "file": "new-qcow", "size": 6 << 20}),
        json!({"driver": "qcow", "file": "newb-qcow", "size": 5 << 20, "backing-file": "base.qcow"}),
        json!({"driver": "qcow", "file": "x-qcow", "size": 1 << 20, "bogus": 1}),
        json!({"driver": "qcow", "file": "x-qcow", "size": 0}),
    ] {
        seen.push(create(&mut client, "c", options).await);
    }
    for (i, name) in IMAGES.iter().enumerate() {
        let node = format!("n{i}");
        add_exported(&mut client, "qcow", &node, name).await;
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
            "write -P 0x44 4194000 300",
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
    let nodes = client
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    for node in nodes.as_array().unwrap() {
        if node["drv"] == "qcow"
            && node["node-name"]
                .as_str()
                .is_some_and(|n| n.starts_with('n'))
        {
            let mut image = node["image"].clone();
            image.as_object_mut().unwrap().remove("backing-image");
            seen.push(json!({"node": node["node-name"], "image": image}));
        }
    }
    daemon.quit(&mut client).await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow_images_behave_as_in_qsd() {
    let mut runs = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let seen = exercise(which, dir.path()).await;
        runs.push(Run { seen, dir });
    }
    assert_same_images("qcow", &IMAGES, &runs);
    let dirs: Vec<&Path> = runs.iter().map(|r| r.dir.path()).collect();
    // The backing file shows through around the first write, the compressed clusters
    // around the writes into them.
    let over = p(dirs[0], "over.qcow");
    qemu_io(&[
        "-f",
        "qcow",
        "-r",
        &over,
        "-c",
        "read -P 0x11 0 1000",
        "-c",
        "read -P 0x11 4000 96",
    ]);
    let comp = p(dirs[0], "comp.qcow");
    qemu_io(&[
        "-f",
        "qcow",
        "-r",
        &comp,
        "-c",
        "read -P 1 0 1000",
        "-c",
        "read -P 2 4096 4096",
        "-c",
        "read -P 3 2099052 1000",
    ]);
}

/// Headers QEMU refuses, refused the same way, and none of them a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_qcow_headers_are_refused_as_qsd_refuses_them() {
    assert_refusals_match("qcow", &[], &[], |good| {
        vec![
            ("short", good[..20].to_vec()),
            ("version", patched(good, 4, &2u32.to_be_bytes())),
            ("tiny", patched(good, 24, &1u64.to_be_bytes())),
            ("clusterbits", patched(good, 32, &[20])),
            ("l2bits", patched(good, 33, &[2])),
            ("crypt", patched(good, 36, &2u32.to_be_bytes())),
            ("huge", patched(good, 24, &(u64::MAX - 10).to_be_bytes())),
            (
                "backingname",
                patched(good, 8, &[0, 0, 0, 0, 0, 0, 0, 48, 0, 0, 8, 0]),
            ),
        ]
    })
    .await;
}
