//! block_resize on the real daemon: sizes seen by NBD clients and qemu-img afterwards, and
//! the refusals (exports, jobs, read-only nodes, bad sizes) compared with
//! qemu-storage-daemon.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

fn resize(node: &str, size: i64) -> Value {
    json!({ "node-name": node, "size": size })
}

/// Generated node names (`#block123`) inside error texts differ between runs.
fn without_node_numbers(v: Value) -> Value {
    let text = v.to_string();
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("#block") {
        out.push_str(&rest[..at + 6]);
        rest = rest[at + 6..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    serde_json::from_str(&out).unwrap()
}

fn nbd_size(sock: &Path, export: &str) -> u64 {
    let uri = format!("nbd+unix:///{export}?socket={}", sock.display());
    let out = run(Command::new("nbdinfo").args(["--size", &uri]));
    assert!(
        out.status.success(),
        "nbdinfo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn image_info(path: &Path) -> Value {
    serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        "-U",
        path.to_str().unwrap(),
    ]))
    .unwrap()
}

/// Grow and shrink a qcow2 and a raw node; each size reaches a fresh NBD connection, and
/// the images stay consistent and keep their data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_is_seen_on_reconnect_and_by_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("a.qcow2");
    let r = dir.path().join("b.raw");
    let sock = dir.path().join("nbd.sock");
    qemu_img(&["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "64M"]);
    jobs::qemu_io(&[
        "-f",
        "qcow2",
        q.to_str().unwrap(),
        "-c",
        "write -P 0x5a 0 1M",
    ]);
    qemu_img(&["create", "-q", "-f", "raw", r.to_str().unwrap(), "64M"]);
    let daemon = Daemon::start(
        Impl::Blockd,
        dir.path(),
        &[
            s("--blockdev"),
            format!("file,node-name=fq,filename={}", q.display()),
            s("--blockdev"),
            s("qcow2,node-name=q,file=fq"),
            s("--blockdev"),
            format!("file,node-name=fr,filename={}", r.display()),
            s("--blockdev"),
            s("raw,node-name=r,file=fr"),
            s("--nbd-server"),
            format!("addr.type=unix,addr.path={}", sock.display()),
        ],
    );
    let mut c = daemon.qmp().await;
    for (node, size) in [
        ("q", 128i64 << 20),
        ("q", 32 << 20),
        ("r", 96 << 20),
        ("r", (16 << 20) + 512),
    ] {
        c.execute("block_resize", resize(node, size)).await.unwrap();
        c.execute(
            "block-export-add",
            json!({ "type": "nbd", "id": "e", "node-name": node }),
        )
        .await
        .unwrap();
        assert_eq!(nbd_size(&sock, node), size as u64, "{node} after resize");
        delete_export_when_unused(&mut c, "e").await;
        c.wait_event("BLOCK_EXPORT_DELETED", WAIT).await.unwrap();
    }
    daemon.quit(&mut c).await;
    assert_eq!(image_info(&q)["virtual-size"], 32 << 20);
    assert_eq!(image_info(&r)["virtual-size"], (16 << 20) + 512);
    qemu_img(&["check", "-q", q.to_str().unwrap()]);
    jobs::qemu_io(&[
        "-f",
        "qcow2",
        q.to_str().unwrap(),
        "-c",
        "read -P 0x5a 0 1M",
    ]);
}

/// The same commands on both daemons must get the same answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_errors_match_qsd() {
    let mut transcripts = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
        qemu_img(&["create", "-q", "-f", "qcow2", &p("a.qcow2"), "64M"]);
        qemu_img(&["create", "-q", "-f", "qcow2", &p("t.qcow2"), "64M"]);
        qemu_img(&["create", "-q", "-f", "raw", &p("b.raw"), "64M"]);
        let v2 = p("v2.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            &v2,
            "1M",
        ]);
        qemu_img(&["snapshot", "-c", "s", &v2]);
        let daemon = Daemon::start(
            which,
            dir.path(),
            &[
                s("--blockdev"),
                format!("file,node-name=f0,filename={}", p("a.qcow2")),
                s("--blockdev"),
                s("qcow2,node-name=q0,file=f0"),
                s("--blockdev"),
                format!("file,node-name=ft,filename={}", p("t.qcow2")),
                s("--blockdev"),
                s("qcow2,node-name=qt,file=ft"),
                s("--blockdev"),
                format!("file,node-name=f1,filename={}", p("b.raw")),
                s("--blockdev"),
                s("raw,node-name=r1,file=f1"),
                s("--blockdev"),
                format!("file,node-name=fv2,filename={v2}"),
                s("--blockdev"),
                s("qcow2,node-name=v2,file=fv2"),
                s("--blockdev"),
                format!(
                    "file,node-name=ro,filename={},read-only=on,locking=off",
                    p("b.raw")
                ),
                s("--nbd-server"),
                format!("addr.type=unix,addr.path={}", p("nbd.sock")),
            ],
        );
        let mut c = daemon.qmp().await;
        let mut seen = Vec::new();
        for args in [
            json!({ "device": "q0", "size": 1 << 20 }),
            json!({ "size": 1 << 20 }),
            resize("nope", 1 << 20),
            resize("q0", -1),
            resize("q0", 1000),
            resize("f1", 1000),
            resize("r1", 64 << 20),
            resize("ro", 1 << 20),
            resize("f0", 1 << 20),
            resize("v2", 2 << 20),
        ] {
            seen.push(reply(&mut c, "block_resize", args).await);
        }
        let backup = json!({ "job-id": "j", "device": "q0", "target": "qt", "sync": "full",
                             "speed": 1 });
        c.execute("blockdev-backup", backup).await.unwrap();
        seen.push(reply(&mut c, "block_resize", resize("q0", 1 << 20)).await);
        seen.push(reply(&mut c, "block_resize", resize("qt", 1 << 20)).await);
        c.execute("job-cancel", json!({ "id": "j" })).await.unwrap();
        c.wait_event("BLOCK_JOB_CANCELLED", WAIT).await.unwrap();
        let mirror = json!({ "job-id": "m", "device": "q0", "target": "qt", "sync": "full",
                             "speed": 1 });
        c.execute("blockdev-mirror", mirror).await.unwrap();
        seen.push(reply(&mut c, "block_resize", resize("q0", 1 << 20)).await);
        seen.push(reply(&mut c, "block_resize", resize("qt", 1 << 20)).await);
        c.execute("job-cancel", json!({ "id": "m" })).await.unwrap();
        c.wait_event("BLOCK_JOB_CANCELLED", WAIT).await.unwrap();
        c.execute(
            "block-export-add",
            json!({ "type": "nbd", "id": "e", "node-name": "r1", "writable": true }),
        )
        .await
        .unwrap();
        seen.push(reply(&mut c, "block_resize", resize("r1", 1 << 20)).await);
        seen.push(reply(&mut c, "block_resize", resize("f1", 1 << 20)).await);
        if which == Impl::Blockd {
            daemon.quit(&mut c).await;
        }
        transcripts.push(normalize(Value::Array(
            seen.into_iter().map(without_node_numbers).collect(),
        )));
    }
    let blockd = &transcripts[0];
    let errors = blockd.as_array().unwrap();
    assert!(errors[3]["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("expects a >0 size"));
    assert!(errors[7]["error"]["desc"] == "Image is read-only");
    assert_eq!(
        errors[9]["error"]["desc"],
        "Can't resize a v2 image which has snapshots"
    );
    assert!(errors[11]["error"]["desc"]
        .as_str()
        .unwrap()
        .starts_with("Node 'qt' is busy"));
    assert!(errors[14]["error"]["desc"]
        .as_str()
        .unwrap()
        .starts_with("Permission conflict on node 'r1'"));
    if let Some(qsd) = transcripts.get(1) {
        assert_eq!(first_difference(blockd, qsd), None, "{blockd:#}\n{qsd:#}");
    }
}
