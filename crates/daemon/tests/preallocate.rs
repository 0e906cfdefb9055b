//! The preallocate filter under qcow2, against qemu-storage-daemon: the file grows ahead of
//! writes by prealloc-size to a prealloc-align boundary, the format sees only the data's
//! end, and the tail is gone once the image is handed over or the daemon quits; option
//! errors read the same.

mod common;

use common::jobs::qemu_io;
use common::*;
use serde_json::{json, Value};
use std::path::Path;

fn file_len(path: &str) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

fn args(d: &Path, image: &str) -> Vec<String> {
    let node = json!({
        "driver": "qcow2", "node-name": "disk0",
        "file": {"driver": "preallocate", "node-name": "pre",
                 "prealloc-size": 4 << 20, "prealloc-align": 1 << 20,
                 "file": {"driver": "file", "filename": image}},
    });
    vec![
        s("--blockdev"),
        node.to_string(),
        s("--nbd-server"),
        format!("addr.type=unix,addr.path={}", p(d, "nbd.sock")),
        s("--export"),
        // allow-inactive: a writable export otherwise keeps its node from being handed over.
        "type=nbd,id=e0,node-name=disk0,name=d,writable=on,allow-inactive=on".into(),
    ]
}

async fn data_end(client: &mut qmp::Client) -> u64 {
    let nodes = client
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let pre = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "pre")
        .unwrap()
        .clone();
    assert_eq!(pre["drv"], "preallocate");
    pre["image"]["virtual-size"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_grows_ahead_and_keeps_no_tail_on_both_daemons() {
    let mut seen: Vec<Value> = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let image = p(d, "d.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", &image, "1G"]);
        let created = file_len(&image);
        let daemon = Daemon::start(which, d, &args(d, &image));
        assert_eq!(
            file_len(&image),
            created,
            "{which:?}: opening grows nothing"
        );
        let uri = format!("nbd+unix:///d?socket={}", p(d, "nbd.sock"));
        qemu_io(&["-f", "raw", "-c", "write -P 7 0 64k", &uri]);
        let mut client = daemon.qmp().await;
        let end = data_end(&mut client).await;
        let grown = file_len(&image);
        // 4 MiB past the write's end, to a 1 MiB boundary.
        assert_eq!(
            grown,
            (end + (4 << 20)).next_multiple_of(1 << 20),
            "{which:?}: {end}"
        );
        // Writes within the grown file do not grow it again.
        qemu_io(&["-f", "raw", "-c", "write -P 8 1M 64k", &uri]);
        assert_eq!(file_len(&image), grown, "{which:?}");
        let end = data_end(&mut client).await;

        // Handed over: no tail left for the other process. (qsd 10.0.2 cuts the tail too,
        // then refuses the handover with EPERM.)
        if which == Impl::Blockd {
            client
                .execute("blockdev-set-active", json!({"active": false}))
                .await
                .unwrap();
            assert_eq!(file_len(&image), end, "inactive");
            client
                .execute("blockdev-set-active", json!({"active": true}))
                .await
                .unwrap();
        }
        qemu_io(&["-f", "raw", "-c", "write -P 9 64M 64k", &uri]);
        let end = data_end(&mut client).await;
        assert!(file_len(&image) > end, "{which:?}: growing again");
        daemon.quit(&mut client).await;
        assert_eq!(file_len(&image), end, "{which:?}: after quit");
        qemu_img(&["check", "-q", &image]);
        qemu_io(&[
            "-c",
            "read -P 7 0 64k",
            "-c",
            "read -P 8 1M 64k",
            "-c",
            "read -P 9 64M 64k",
            &image,
        ]);
        seen.push(json!({"grown": grown, "end": end}));
    }
    assert_eq!(seen[0], seen[1], "blockd, then qsd");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_errors_read_as_qsds() {
    let mut answers = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon::start(which, dir.path(), &[]);
        let mut client = daemon.qmp().await;
        let mut replies = Vec::new();
        for extra in [
            json!({"prealloc-align": 1000}),
            json!({"prealloc-size": -1}),
            json!({"prealloc-align": "big"}),
            json!({"bogus": 1}),
            json!({"prealloc-align": 0, "prealloc-size": 0}),
        ] {
            let mut args = json!({"driver": "preallocate", "node-name": "p",
                                  "file": {"driver": "null-co"}});
            args.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let answer = reply(&mut client, "blockdev-add", args).await;
            if answer.get("return").is_some() {
                client
                    .execute("blockdev-del", json!({"node-name": "p"}))
                    .await
                    .unwrap();
            }
            replies.push(answer);
        }
        daemon.quit(&mut client).await;
        answers.push(replies);
    }
    assert_eq!(answers[0], answers[1], "blockd, then qsd");
}
