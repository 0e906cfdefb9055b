//! A persistent bitmap's round trip: blockd creates it over QMP and records NBD writes,
//! qemu-img info lists it after quit, qemu-storage-daemon loads it with the same count and
//! records more, and blockd loads qsd's result.

mod common;

use common::jobs::qemu_io;
use common::*;
use serde_json::{json, Value};
use std::path::Path;

fn disk_args(dir: &Path) -> Vec<String> {
    vec![
        s("--blockdev"),
        s("driver=qcow2,node-name=disk0,file.driver=file,file.filename=disk.qcow2"),
        s("--nbd-server"),
        format!(
            "addr.type=unix,addr.path={}",
            dir.join("nbd.sock").display()
        ),
        s("--export"),
        s("type=nbd,id=e0,node-name=disk0,name=disk,writable=on"),
    ]
}

fn uri(dir: &Path) -> String {
    format!("nbd+unix:///disk?socket={}", dir.join("nbd.sock").display())
}

/// (count, sha256) of bitmap `b` on disk0.
async fn bitmap_state(client: &mut qmp::Client) -> (Value, Value) {
    let nodes = client
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "disk0")
        .unwrap()
        .clone();
    let bitmap = node["dirty-bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "b")
        .unwrap_or_else(|| panic!("no bitmap b: {node}"))
        .clone();
    assert_eq!(bitmap["persistent"], true);
    let hash = client
        .execute(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "disk0", "name": "b"}),
        )
        .await
        .unwrap();
    (bitmap["count"].clone(), hash["sha256"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_bitmap_round_trips_blockd_qemu_img_qsd_blockd() {
    Impl::all();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2").to_string_lossy().into_owned();
    qemu_img(&["create", "-q", "-f", "qcow2", &disk, "64M"]);

    let blockd = Daemon::start(Impl::Blockd, dir.path(), &disk_args(dir.path()));
    let mut client = blockd.qmp().await;
    client
        .execute(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "b", "persistent": true, "granularity": 65536}),
        )
        .await
        .unwrap();
    qemu_io(&[
        "-f",
        "raw",
        &uri(dir.path()),
        "-c",
        "write 1M 128k",
        "-c",
        "write 40M 4k",
    ]);
    let written_by_blockd = bitmap_state(&mut client).await;
    assert_eq!(written_by_blockd.0, 3 * 65536);
    blockd.quit(&mut client).await;

    let info: Value = serde_json::from_str(&qemu_img(&["info", "--output=json", &disk])).unwrap();
    let listed = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(listed[0]["name"], "b", "{info}");
    assert_eq!(listed[0]["granularity"], 65536);
    assert_eq!(listed[0]["flags"], json!(["auto"]));
    qemu_img(&["check", &disk]);

    let qsd = Daemon::start(Impl::Qsd, dir.path(), &disk_args(dir.path()));
    let mut client = qsd.qmp().await;
    assert_eq!(bitmap_state(&mut client).await, written_by_blockd);
    qemu_io(&["-f", "raw", &uri(dir.path()), "-c", "write 60M 64k"]);
    let written_by_qsd = bitmap_state(&mut client).await;
    assert_eq!(written_by_qsd.0, 4 * 65536);
    qsd.quit(&mut client).await;

    let blockd = Daemon::start(Impl::Blockd, dir.path(), &disk_args(dir.path()));
    let mut client = blockd.qmp().await;
    assert_eq!(bitmap_state(&mut client).await, written_by_qsd);
    blockd.quit(&mut client).await;
    qemu_img(&["check", &disk]);
}
