//! Dirty bitmaps end to end: the block-dirty-bitmap-* commands and their errors, counts and
//! hashes after writes through NBD, bitmaps pulled with `nbdinfo --map`, and backups with
//! bitmaps (an incremental chain restored with qemu-img, every bitmap-mode on success and
//! on an injected target failure) — compared with qemu-storage-daemon where both run.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

fn qemu_io(args: &[&str]) -> String {
    let out = run(Command::new("qemu-io").args(args));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {args:?}: {text}"
    );
    text
}

fn nbd_uri(dir: &Path, export: &str) -> String {
    format!(
        "nbd+unix:///{export}?socket={}",
        dir.join("nbd.sock").display()
    )
}

/// Write through the NBD export with qemu-io commands.
fn nbd_writes(dir: &Path, export: &str, commands: &[&str]) {
    let uri = nbd_uri(dir, export);
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(&uri);
    qemu_io(&args);
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

fn disk_args(dir: &Path) -> Vec<String> {
    vec![
        s("--blockdev"),
        s("driver=file,node-name=f0,filename=disk.qcow2"),
        s("--blockdev"),
        s("driver=qcow2,node-name=disk0,file=f0"),
        s("--blockdev"),
        s("driver=file,node-name=r0,filename=disk.raw"),
        s("--blockdev"),
        s("driver=raw,node-name=raw0,file=r0"),
        s("--nbd-server"),
        format!("addr.type=unix,addr.path={}", path(dir, "nbd.sock")),
    ]
}

/// Answer or error text of one command, as a line of a transcript.
async fn step(client: &mut qmp::Client, command: &str, args: Value) -> String {
    let result = match client.execute(command, args.clone()).await {
        Ok(v) => v.to_string(),
        Err(e) => format!("error: {}", e.desc),
    };
    format!("{command} {args} -> {result}")
}

/// The dirty-bitmaps of the named nodes (implicit names differ between daemons).
async fn bitmap_listing(client: &mut qmp::Client) -> String {
    let nodes = client
        .execute("query-named-block-nodes", json!({}))
        .await
        .unwrap();
    let mut out = Vec::new();
    for node in nodes.as_array().unwrap() {
        let name = node["node-name"].as_str().unwrap();
        // f0's bitmap counts the image file's writes, metadata included: each qcow2
        // implementation writes its own.
        if name.starts_with('#') || name == "f0" {
            continue;
        }
        out.push(format!(
            "{name}: {}",
            node.get("dirty-bitmaps").unwrap_or(&json!(null))
        ));
    }
    out.join("\n")
}

fn nbdinfo_map(dir: &Path, export: &str, context: &str) -> String {
    let out = run(Command::new("nbdinfo")
        .arg(format!("--map={context}"))
        .arg(nbd_uri(dir, export)));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn commands_transcript(which: Impl) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img(&["create", "-q", "-f", "qcow2", &path(d, "disk.qcow2"), "10M"]);
    qemu_img(&["create", "-q", "-f", "raw", &path(d, "disk.raw"), "10M"]);
    let daemon = Daemon::start(which, d, &disk_args(d));
    let mut c = daemon.qmp().await;
    let mut t = Vec::new();
    let add = |name: &str, extra: Value| {
        let mut args = json!({"node": "disk0", "name": name});
        args.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        args
    };
    let calls: Vec<(&str, Value)> = vec![
        ("block-dirty-bitmap-add", add("b0", json!({}))),
        ("block-dirty-bitmap-add", add("b0", json!({}))),
        ("block-dirty-bitmap-add", add("", json!({}))),
        (
            "block-dirty-bitmap-add",
            json!({"node": "nonode", "name": ""}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "nonode", "name": "x"}),
        ),
        (
            "block-dirty-bitmap-add",
            add("g", json!({"granularity": 1000})),
        ),
        (
            "block-dirty-bitmap-add",
            add("g", json!({"granularity": 256})),
        ),
        (
            "block-dirty-bitmap-add",
            add("g", json!({"granularity": 0})),
        ),
        (
            "block-dirty-bitmap-add",
            add("g", json!({"granularity": 1u64 << 40})),
        ),
        (
            "block-dirty-bitmap-add",
            add("g512", json!({"granularity": 512})),
        ),
        (
            "block-dirty-bitmap-add",
            add("g4k", json!({"granularity": 4096})),
        ),
        (
            "block-dirty-bitmap-add",
            add("g1m", json!({"granularity": 1 << 20})),
        ),
        (
            "block-dirty-bitmap-add",
            add("off", json!({"disabled": true})),
        ),
        ("block-dirty-bitmap-add", add(&"x".repeat(1024), json!({}))),
        (
            "block-dirty-bitmap-add",
            json!({"node": "raw0", "name": "p", "persistent": true}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "raw0", "name": "r"}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "f0", "name": "small"}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "x", "foo": 1}),
        ),
        (
            "block-dirty-bitmap-remove",
            json!({"node": "disk0", "name": "nope"}),
        ),
        (
            "block-dirty-bitmap-remove",
            json!({"node": "nonode", "name": "b0"}),
        ),
        (
            "block-dirty-bitmap-clear",
            json!({"node": "disk0", "name": "nope"}),
        ),
        (
            "block-dirty-bitmap-enable",
            json!({"node": "nonode", "name": "b0"}),
        ),
        (
            "block-dirty-bitmap-disable",
            json!({"node": "disk0", "name": "nope"}),
        ),
        (
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "disk0", "name": "nope"}),
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "disk0", "target": "nope", "bitmaps": ["b0"]}),
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "disk0", "target": "b0", "bitmaps": [{"node": "f0", "name": "small"}]}),
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "disk0", "target": "b0", "bitmaps": [{"node": "raw0", "name": "zz"}]}),
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "disk0", "target": "b0", "bitmaps": [{"node": "raw0"}]}),
        ),
    ];
    for (command, args) in calls {
        t.push(step(&mut c, command, args).await);
    }
    t.push(step(&mut c, "block-export-add", json!({"type": "nbd", "id": "e0", "node-name": "disk0", "writable": true, "bitmaps": ["g4k", "off"]})).await);
    t.push(step(&mut c, "block-export-add", json!({"type": "nbd", "id": "e1", "node-name": "disk0", "name": "ro", "bitmaps": ["g512"]})).await);
    t.push(step(&mut c, "block-export-add", json!({"type": "nbd", "id": "e1", "node-name": "disk0", "name": "ro", "bitmaps": ["nope"]})).await);
    t.push(step(&mut c, "block-export-add", json!({"type": "nbd", "id": "e1", "node-name": "disk0", "name": "ro", "bitmaps": [{"node": "raw0", "name": "zz"}]})).await);
    t.push(step(&mut c, "block-export-add", json!({"type": "nbd", "id": "e1", "node-name": "disk0", "name": "ro", "bitmaps": ["off"]})).await);
    t.push(
        step(
            &mut c,
            "nbd-server-add",
            json!({"device": "disk0", "name": "legacy", "bitmap": "g512"}),
        )
        .await,
    );
    for command in [
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable",
        "block-dirty-bitmap-remove",
    ] {
        t.push(step(&mut c, command, json!({"node": "disk0", "name": "g4k"})).await);
    }
    t.push(
        step(
            &mut c,
            "block-dirty-bitmap-merge",
            json!({"node": "disk0", "target": "g4k", "bitmaps": ["b0"]}),
        )
        .await,
    );
    t.push(
        step(
            &mut c,
            "block-dirty-bitmap-merge",
            json!({"node": "disk0", "target": "b0", "bitmaps": ["g4k"]}),
        )
        .await,
    );
    t.push(bitmap_listing(&mut c).await);

    nbd_writes(
        d,
        "disk0",
        &[
            "write -P 1 0 64k",
            "write -P 2 1M 4k",
            "write -z 3M 128k",
            "write -P 3 100k 1k",
            "write -P 4 5000k 3000",
            "discard 8M 64k",
            "write -P 5 10236k 4k",
        ],
    );
    t.push(bitmap_listing(&mut c).await);
    for name in ["b0", "g512", "g4k", "g1m", "off"] {
        t.push(
            step(
                &mut c,
                "x-debug-block-dirty-bitmap-sha256",
                json!({"node": "disk0", "name": name}),
            )
            .await,
        );
    }
    for name in ["g4k", "off"] {
        t.push(nbdinfo_map(
            d,
            "disk0",
            &format!("qemu:dirty-bitmap:{name}"),
        ));
    }
    t.push(
        step(
            &mut c,
            "block-dirty-bitmap-disable",
            json!({"node": "disk0", "name": "b0"}),
        )
        .await,
    );
    t.push(step(&mut c, "block-dirty-bitmap-merge", json!({"node": "disk0", "target": "b0", "bitmaps": ["g512", {"node": "disk0", "name": "g1m"}, "b0"]})).await);
    t.push(
        step(
            &mut c,
            "block-dirty-bitmap-merge",
            json!({"node": "disk0", "target": "off", "bitmaps": ["g512"]}),
        )
        .await,
    );
    t.push(step(&mut c, "block-export-del", json!({"id": "e0"})).await);
    c.wait_event("BLOCK_EXPORT_DELETED", WAIT).await.unwrap();
    t.push(
        step(
            &mut c,
            "block-dirty-bitmap-merge",
            json!({"node": "disk0", "target": "off", "bitmaps": ["g512"]}),
        )
        .await,
    );
    t.push(
        step(
            &mut c,
            "block-dirty-bitmap-clear",
            json!({"node": "disk0", "name": "g1m"}),
        )
        .await,
    );
    t.push(
        step(
            &mut c,
            "block-dirty-bitmap-remove",
            json!({"node": "disk0", "name": "g512"}),
        )
        .await,
    );
    t.push(
        step(
            &mut c,
            "block-dirty-bitmap-enable",
            json!({"node": "disk0", "name": "b0"}),
        )
        .await,
    );
    t.push(bitmap_listing(&mut c).await);
    for name in ["b0", "off"] {
        t.push(
            step(
                &mut c,
                "x-debug-block-dirty-bitmap-sha256",
                json!({"node": "disk0", "name": name}),
            )
            .await,
        );
    }
    daemon.quit(&mut c).await;
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitmap_commands_counts_and_maps_match_qsd() {
    let all = Impl::all();
    let blockd = commands_transcript(Impl::Blockd).await;
    let joined = blockd.join("\n");
    assert!(joined.contains("\"busy\":true"), "{joined}");
    assert!(
        joined.contains("3145728      131072    1  dirty"),
        "g4k map: {joined}"
    );
    if all.contains(&Impl::Qsd) {
        let qsd = commands_transcript(Impl::Qsd).await;
        for (b, q) in blockd.iter().zip(&qsd) {
            assert_eq!(b, q, "blockd vs qsd");
        }
        assert_eq!(blockd.len(), qsd.len());
    }
}
