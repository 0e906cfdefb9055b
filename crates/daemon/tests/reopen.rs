//! blockdev-reopen on the real daemon: a read-only qcow2 chain made writable for an NBD
//! client and back, judged by qemu-img and qemu-io; refusals and all-or-nothing behaviour
//! compared with qemu-storage-daemon.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;

fn reopen(options: Value) -> Value {
    json!({ "options": options })
}

fn qcow2(read_only: bool) -> Value {
    json!({ "driver": "qcow2", "node-name": "q0", "file": "f0", "read-only": read_only })
}

fn file(read_only: bool) -> Value {
    json!({ "driver": "file", "node-name": "f0", "filename": "a.qcow2", "read-only": read_only })
}

fn start_args(dir: &Path, read_only: bool) -> Vec<String> {
    let ro = if read_only { "on" } else { "off" };
    vec![
        s("--blockdev"),
        format!("file,node-name=f0,filename=a.qcow2,read-only={ro}"),
        s("--blockdev"),
        format!("qcow2,node-name=q0,file=f0,read-only={ro}"),
        s("--blockdev"),
        s("file,node-name=f1,filename=b.raw"),
        s("--blockdev"),
        s("raw,node-name=r1,file=f1"),
        s("--nbd-server"),
        format!(
            "addr.type=unix,addr.path={}",
            dir.join("nbd.sock").display()
        ),
    ]
}

fn make_images(dir: &Path) {
    let a = dir.join("a.qcow2");
    let b = dir.join("b.raw");
    qemu_img(&["create", "-q", "-f", "qcow2", a.to_str().unwrap(), "16M"]);
    qemu_img(&["create", "-q", "-f", "raw", b.to_str().unwrap(), "16M"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_read_write_for_an_nbd_writer_and_back() {
    let dir = tempfile::tempdir().unwrap();
    make_images(dir.path());
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &start_args(dir.path(), true));
    let mut c = daemon.qmp().await;
    let export = json!({ "type": "nbd", "id": "e", "node-name": "q0", "writable": true });
    let refused = reply(&mut c, "block-export-add", export.clone()).await;
    assert!(refused.get("error").is_some(), "{refused}");
    c.execute(
        "blockdev-reopen",
        reopen(json!([file(false), qcow2(false)])),
    )
    .await
    .unwrap();
    c.execute("block-export-add", export).await.unwrap();
    let uri = format!(
        "nbd+unix:///q0?socket={}",
        dir.path().join("nbd.sock").display()
    );
    jobs::qemu_io(&["-f", "raw", &uri, "-c", "write -P 0x77 1M 2M"]);
    delete_export_when_unused(&mut c, "e").await;
    c.wait_event("BLOCK_EXPORT_DELETED", WAIT).await.unwrap();
    c.execute("blockdev-reopen", reopen(json!([qcow2(true), file(true)])))
        .await
        .unwrap();
    assert_eq!(
        node_flags(&mut c, "ro").await,
        json!([["f0", true], ["f1", false], ["q0", true], ["r1", false]])
    );
    // The daemon still holds the image (read-only now): read it beside the daemon.
    let a = dir.path().join("a.qcow2");
    jobs::qemu_io(&[
        "-f",
        "qcow2",
        "-U",
        "-r",
        a.to_str().unwrap(),
        "-c",
        "read -P 0x77 1M 2M",
    ]);
    daemon.quit(&mut c).await;
    qemu_img(&["check", "-q", a.to_str().unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_errors_and_atomicity_match_qsd() {
    let mut transcripts = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        make_images(dir.path());
        let daemon = Daemon::start(which, dir.path(), &start_args(dir.path(), false));
        let mut c = daemon.qmp().await;
        let raw =
            |ro: bool| json!({ "driver": "raw", "node-name": "r1", "file": "f1", "read-only": ro });
        let raw_file = |ro: bool| json!({ "driver": "file", "node-name": "f1", "filename": "b.raw", "read-only": ro });
        let mut seen = Vec::new();
        for options in [
            json!([{ "driver": "qcow2", "node-name": "nope", "file": "f0" }]),
            json!([{ "driver": "qcow2", "file": "f0" }]),
            json!([{ "driver": "raw", "node-name": "q0", "file": "f0" }]),
            json!([{ "driver": "qcow2", "node-name": "q0" }]),
            json!([{ "driver": "file", "node-name": "f1", "filename": "c.raw" }]),
            json!([raw(true), raw_file(true)]),
            json!([raw_file(false), raw(false)]),
        ] {
            seen.push(reply(&mut c, "blockdev-reopen", reopen(options)).await);
            seen.push(node_flags(&mut c, "ro").await);
        }
        c.execute(
            "block-export-add",
            json!({ "type": "nbd", "id": "e", "node-name": "q0", "writable": true }),
        )
        .await
        .unwrap();
        for options in [
            json!([qcow2(true)]),
            json!([file(true)]),
            // The raw pair would succeed; q0's exporter makes the whole set fail.
            json!([raw(true), raw_file(true), qcow2(true)]),
        ] {
            seen.push(reply(&mut c, "blockdev-reopen", reopen(options)).await);
            seen.push(node_flags(&mut c, "ro").await);
        }
        if which == Impl::Blockd {
            daemon.quit(&mut c).await;
        }
        transcripts.push(Value::Array(seen));
    }
    let blockd = &transcripts[0];
    assert_eq!(blockd[10], json!({ "return": {} }), "{blockd:#}");
    assert_eq!(
        blockd[11],
        json!([["f0", false], ["f1", true], ["q0", false], ["r1", true]])
    );
    assert_eq!(
        blockd[18]["error"]["desc"],
        "Read-only block node 'q0' cannot support read-write users"
    );
    assert_eq!(
        blockd[19],
        json!([["f0", false], ["f1", false], ["q0", false], ["r1", false]])
    );
    if let Some(qsd) = transcripts.get(1) {
        assert_eq!(first_difference(blockd, qsd), None, "{blockd:#}\n{qsd:#}");
    }
}
