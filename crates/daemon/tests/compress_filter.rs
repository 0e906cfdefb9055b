//! The `compress` filter on both daemons: writes through it over NBD (whole clusters,
//! parts of clusters, a second write into a compressed cluster) and a backup into it; the qcow2 below must pass `qemu-img check`, map its
//! clusters as compressed where qsd's does, and hold the same bytes; a child that cannot
//! take compressed writes is refused in qsd's words.

mod common;

use common::formats::assert_behaves_as_in_qsd;
use common::jobs::{job_events, qemu_io};
use common::*;
use serde_json::{json, Value};

/// `qemu-img map` of a qcow2 without host offsets (where each daemon packs a compressed
/// cluster is its own business): which ranges are data, zero, compressed.
fn map_without_offsets(path: &str) -> Value {
    let map: Value =
        serde_json::from_str(&qemu_img(&["map", "--output=json", "-f", "qcow2", path])).unwrap();
    let mut map = map.as_array().unwrap().clone();
    for extent in &mut map {
        let e = extent.as_object_mut().unwrap();
        e.remove("offset");
    }
    Value::Array(map)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_the_compress_filter_are_stored_as_in_qsd() {
    assert_behaves_as_in_qsd("qcow2", &["t.qcow2", "b.qcow2"], |which, dir| async move {
        let d = |n: &str| p(&dir, n);
        qemu_img(&["create", "-q", "-f", "qcow2", &d("t.qcow2"), "1M"]);
        qemu_img(&["create", "-q", "-f", "qcow2", &d("b.qcow2"), "1M"]);
        qemu_img(&["create", "-q", "-f", "qcow2", &d("src.qcow2"), "1M"]);
        qemu_io(&[
            "-f",
            "qcow2",
            &d("src.qcow2"),
            "-c",
            "write -P 0x61 0 256k",
            "-c",
            "write -P 0x62 512k 64k",
        ]);
        let sock = dir.join("nbd.sock");
        let daemon = Daemon::start(which, &dir, &nbd_server_args(&sock));
        let mut client = daemon.qmp().await;
        let mut seen = Vec::new();
        for (node, file) in [("t", "t.qcow2"), ("b", "b.qcow2"), ("src", "src.qcow2")] {
            client
                .execute(
                    "blockdev-add",
                    json!({"driver": "qcow2", "node-name": node,
                           "file": {"driver": "file", "filename": file}}),
                )
                .await
                .unwrap();
        }
        for (node, file) in [("ct", "t"), ("cb", "b")] {
            let answer = reply(
                &mut client,
                "blockdev-add",
                json!({"driver": "compress", "node-name": node, "file": file}),
            )
            .await;
            seen.push(answer);
        }
        let refused = reply(
            &mut client,
            "blockdev-add",
            json!({"driver": "compress", "node-name": "bad",
                   "file": {"driver": "file", "filename": "src.qcow2"}}),
        )
        .await;
        seen.push(refused);
        client
            .execute(
                "block-export-add",
                json!({"type": "nbd", "id": "ct", "node-name": "ct", "writable": true}),
            )
            .await
            .unwrap();
        let uri = format!("nbd+unix:///ct?socket={}", sock.display());
        for cmd in [
            "write -P 0x11 0 128k",
            "write -P 0x22 200k 1000",
            "write -P 0x33 960k 40k",
            "write -P 0x44 0 4k",
            "read -P 0x11 4k 60k",
            "read -P 0x22 200k 1000",
            "read -P 0 196k 4k",
            "read -P 0x33 960k 40k",
        ] {
            seen.push(json!({cmd: qemu_io_outcome(&["-f", "raw", "-c", cmd, &uri])}));
        }
        client
            .execute(
                "blockdev-backup",
                json!({"job-id": "j", "device": "src", "target": "cb", "sync": "full"}),
            )
            .await
            .unwrap();
        // qsd pauses the job for a drained section now and then: not part of the outcome.
        let mut events = job_events(&mut client, "j", "null").await;
        events.retain(|e| e != "paused");
        events.dedup();
        seen.push(json!(events));
        daemon.quit(&mut client).await;
        seen.push(map_without_offsets(&d("t.qcow2")));
        seen.push(map_without_offsets(&d("b.qcow2")));
        seen
    })
    .await;
}
