//! VirtualBox (vdi) images on both daemons: images qemu-img and blockdev-create make,
//! dynamic and static, written through NBD (within a block, across blocks, zero writes,
//! discards), then checked by qemu-img and compared with what qsd made of the same steps;
//! crafted headers get qsd's refusals.

mod common;

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
    let nodes = client
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    for node in nodes.as_array().unwrap() {
        if node["drv"] == "vdi" {
            seen.push(json!({"node": node["node-name"], "image": node["image"]}));
        }
    }
    daemon.quit(&mut client).await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vdi_images_behave_as_in_qsd() {
    let mut results = Vec::new();
    let mut dirs = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let seen = exercise(which, dir.path()).await;
        let mut infos = Vec::new();
        for name in IMAGES {
            let path = p(dir.path(), name);
            qemu_img(&["check", "-q", "-f", "vdi", &path]);
            let mut info: Value =
                serde_json::from_str(&qemu_img(&["info", "--output=json", &path])).unwrap();
            for key in ["children", "filename", "actual-size"] {
                info.as_object_mut().unwrap().remove(key);
            }
            infos.push(info);
        }
        results.push(normalize(json!({"seen": seen, "infos": infos})));
        dirs.push(dir);
    }
    assert_eq!(
        first_difference(&results[0], &results[1]),
        None,
        "{:#}\n{:#}",
        results[0],
        results[1]
    );
    for name in IMAGES {
        qemu_img(&[
            "compare",
            "-f",
            "vdi",
            "-F",
            "vdi",
            &p(dirs[0].path(), name),
            &p(dirs[1].path(), name),
        ]);
    }
}

/// Headers QEMU refuses, refused the same way, and none of them a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_vdi_headers_are_refused_as_qsd_refuses_them() {
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let good_path = p(dir.path(), "good.vdi");
        qemu_img(&["create", "-q", "-f", "vdi", &good_path, "4M"]);
        let good = std::fs::read(&good_path).unwrap();
        let patched = |at: usize, bytes: &[u8]| {
            let mut v = good.clone();
            v[at..at + bytes.len()].copy_from_slice(bytes);
            v
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("short", good[..100].to_vec()),
            ("signature", patched(64, &7u32.to_le_bytes())),
            ("version", patched(68, &0x0001_0000u32.to_le_bytes())),
            ("blocksize", patched(376, &4096u32.to_le_bytes())),
            ("sectorsize", patched(360, &4096u32.to_le_bytes())),
            ("room", patched(384, &1u32.to_le_bytes())),
            ("parent", patched(440, &[1; 16])),
            ("link", patched(424, &[1; 16])),
            ("bmap", patched(340, &3u32.to_le_bytes())),
            ("blocks", patched(384, &0x4000_0000u32.to_le_bytes())),
        ];
        let daemon = Daemon::start(which, dir.path(), &[]);
        let mut client = daemon.qmp().await;
        let mut seen = Vec::new();
        for (name, bytes) in cases {
            let file = format!("{name}.vdi");
            std::fs::write(dir.path().join(&file), bytes).unwrap();
            let answer = reply(
                &mut client,
                "blockdev-add",
                json!({"driver": "vdi", "node-name": name, "read-only": true,
                       "file": {"driver": "file", "filename": file}}),
            )
            .await;
            seen.push(json!({name: answer}));
        }
        daemon.quit(&mut client).await;
        all.push(seen);
    }
    let (ours, theirs) = (Value::Array(all[0].clone()), Value::Array(all[1].clone()));
    assert_eq!(
        first_difference(&ours, &theirs),
        None,
        "{ours:#}\n{theirs:#}"
    );
}
