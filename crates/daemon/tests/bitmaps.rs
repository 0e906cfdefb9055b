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
    delete_export_when_unused(&mut c, "e0").await;
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
    Impl::all();
    let blockd = commands_transcript(Impl::Blockd).await;
    let joined = blockd.join("\n");
    assert!(joined.contains("\"busy\":true"), "{joined}");
    assert!(
        joined.contains("3145728      131072    1  dirty"),
        "g4k map: {joined}"
    );
    let qsd = commands_transcript(Impl::Qsd).await;
    for (b, q) in blockd.iter().zip(&qsd) {
        assert_eq!(b, q, "blockd vs qsd");
    }
    assert_eq!(blockd.len(), qsd.len());
}

async fn count(client: &mut qmp::Client, node: &str, name: &str) -> u64 {
    let nodes = client
        .execute("query-named-block-nodes", json!({}))
        .await
        .unwrap();
    let node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .unwrap();
    node["dirty-bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap()["count"]
        .as_u64()
        .unwrap()
}

/// Run a backup to completion; its BLOCK_JOB_COMPLETED event.
async fn backup(client: &mut qmp::Client, args: Value) -> Value {
    client.execute("blockdev-backup", args).await.unwrap();
    client
        .wait_event("BLOCK_JOB_COMPLETED", WAIT)
        .await
        .expect("job completes")
}

async fn add_qcow2_target(client: &mut qmp::Client, dir: &Path, name: &str) {
    let file = path(dir, &format!("{name}.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", &file, "16M"]);
    client
        .execute(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": name, "file": {"driver": "file", "filename": file}}),
        )
        .await
        .unwrap();
}

fn save_state(dir: &Path, name: &str) {
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &nbd_uri(dir, "disk0"),
        &path(dir, name),
    ]);
}

/// Bytes a qcow2 image holds data for itself.
fn data_bytes(image: &str) -> u64 {
    let map: Value =
        serde_json::from_str(&qemu_img(&["map", "--output=json", "-f", "qcow2", image])).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true && e["depth"] == 0)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

fn chain_daemon_args(dir: &Path) -> Vec<String> {
    vec![
        s("--blockdev"),
        s("driver=file,node-name=f0,filename=disk.qcow2"),
        s("--blockdev"),
        s("driver=qcow2,node-name=disk0,file=f0"),
        s("--nbd-server"),
        format!("addr.type=unix,addr.path={}", path(dir, "nbd.sock")),
        s("--export"),
        s("type=nbd,id=e0,node-name=disk0,writable=on"),
    ]
}

/// Full backup, writes, incremental, writes, incremental: rebased onto each other the
/// backups read exactly as the disk did at each point, and the incrementals hold only
/// what changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_chain_restores_each_point_in_time() {
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let disk = path(d, "disk.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", &disk, "16M"]);
        qemu_io(&[
            "-f",
            "qcow2",
            &disk,
            "-c",
            "write -P 0x11 0 4M",
            "-c",
            "write -P 0x22 8M 2M",
        ]);
        let daemon = Daemon::start(which, d, &chain_daemon_args(d));
        let mut c = daemon.qmp().await;
        c.execute(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "b0"}),
        )
        .await
        .unwrap();
        nbd_writes(d, "disk0", &["write -P 0x12 2M 64k"]);
        add_qcow2_target(&mut c, d, "full").await;
        let done = backup(&mut c, json!({"job-id": "j0", "device": "disk0", "target": "full", "sync": "full", "bitmap": "b0", "bitmap-mode": "on-success"})).await;
        assert!(done["data"].get("error").is_none(), "{which:?}: {done}");
        assert_eq!(
            count(&mut c, "disk0", "b0").await,
            0,
            "{which:?}: cleared by the full backup"
        );
        save_state(d, "state0.raw");

        nbd_writes(
            d,
            "disk0",
            &[
                "write -P 0x33 1M 64k",
                "write -P 0x44 5M 100k",
                "write -z 8M 64k",
                "write -P 0x55 15M 4k",
            ],
        );
        assert_eq!(count(&mut c, "disk0", "b0").await, 5 * 65536, "{which:?}");
        save_state(d, "state1.raw");
        add_qcow2_target(&mut c, d, "inc1").await;
        let done = backup(&mut c, json!({"job-id": "j1", "device": "disk0", "target": "inc1", "sync": "incremental", "bitmap": "b0"})).await;
        assert!(done["data"].get("error").is_none(), "{which:?}: {done}");
        assert_eq!(count(&mut c, "disk0", "b0").await, 0, "{which:?}");

        nbd_writes(
            d,
            "disk0",
            &["write -P 0x66 1056k 64k", "write -P 0x77 12M 1M"],
        );
        save_state(d, "state2.raw");
        add_qcow2_target(&mut c, d, "inc2").await;
        let done = backup(&mut c, json!({"job-id": "j2", "device": "disk0", "target": "inc2", "sync": "bitmap", "bitmap": "b0", "bitmap-mode": "on-success"})).await;
        assert!(done["data"].get("error").is_none(), "{which:?}: {done}");
        daemon.quit(&mut c).await;

        let (full, inc1, inc2) = (
            path(d, "full.qcow2"),
            path(d, "inc1.qcow2"),
            path(d, "inc2.qcow2"),
        );
        assert!(
            data_bytes(&inc1) <= 5 * 65536,
            "{which:?}: inc1 holds only the changes"
        );
        assert_eq!(
            data_bytes(&inc2),
            18 * 65536,
            "{which:?}: inc2 holds only the changes"
        );
        qemu_img(&[
            "rebase", "-q", "-u", "-f", "qcow2", "-b", &full, "-F", "qcow2", &inc1,
        ]);
        qemu_img(&[
            "rebase", "-q", "-u", "-f", "qcow2", "-b", &inc1, "-F", "qcow2", &inc2,
        ]);
        for (state, image) in [
            ("state0.raw", &full),
            ("state1.raw", &inc1),
            ("state2.raw", &inc2),
        ] {
            qemu_img(&[
                "compare",
                "-q",
                "-f",
                "raw",
                "-F",
                "qcow2",
                &path(d, state),
                image,
            ]);
        }
    }
}

/// A bitmap backup whose target fails at 4 MiB (or not), with one write made while the
/// job runs: what the bitmap holds afterwards for each bitmap-mode, the listing while the
/// job runs, and the job's final `[offset, len]`.
async fn bitmap_after_backup(which: Impl, mode: &str, fail: bool) -> (u64, String, Value) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disk = path(d, "disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &disk, "16M"]);
    qemu_io(&["-f", "qcow2", &disk, "-c", "write -P 0x11 0 16M"]);
    qemu_img(&["create", "-q", "-f", "raw", &path(d, "t.raw"), "16M"]);
    let mut file =
        json!({"driver": "blkdebug", "image": {"driver": "file", "filename": path(d, "t.raw")}});
    if fail {
        file["inject-error"] =
            json!([{"event": "none", "iotype": "write", "sector": 8192, "errno": 5}]);
    }
    let target = json!({"driver": "raw", "node-name": "tgt", "file": file});
    let mut args = chain_daemon_args(d);
    args.extend([s("--blockdev"), target.to_string()]);
    let daemon = Daemon::start(which, d, &args);
    let mut c = daemon.qmp().await;
    c.execute(
        "block-dirty-bitmap-add",
        json!({"node": "disk0", "name": "b0"}),
    )
    .await
    .unwrap();
    nbd_writes(
        d,
        "disk0",
        &[
            "write -P 1 0 64k",
            "write -P 2 1M 64k",
            "write -P 3 4M 192k",
        ],
    );
    // One request may start at any speed: the job copies the first cluster and waits.
    c.execute("blockdev-backup", json!({"job-id": "j", "device": "disk0", "target": "tgt", "sync": "bitmap", "bitmap": "b0", "bitmap-mode": mode, "speed": 1, "x-perf": {"max-workers": 1}}))
        .await
        .unwrap();
    let during = bitmap_listing(&mut c).await;
    nbd_writes(d, "disk0", &["write -P 4 8M 64k"]);
    c.execute("block-job-set-speed", json!({"device": "j", "speed": 0}))
        .await
        .unwrap();
    let done = c.wait_event("BLOCK_JOB_COMPLETED", WAIT).await.unwrap();
    assert_eq!(
        done["data"].get("error").is_some(),
        fail,
        "{which:?} {mode}: {done}"
    );
    let after = count(&mut c, "disk0", "b0").await;
    let listing = bitmap_listing(&mut c).await;
    assert!(!listing.contains("\"busy\":true"), "{which:?}: {listing}");
    daemon.quit(&mut c).await;
    let progress = json!([done["data"]["offset"], done["data"]["len"]]);
    (after, during, progress)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitmap_modes_on_success_and_failure() {
    const C: u64 = 65536;
    let cases = [
        ("on-success", false, C),
        ("on-success", true, 6 * C),
        ("never", false, 6 * C),
        ("never", true, 6 * C),
        ("always", false, C),
        ("always", true, 4 * C),
    ];
    let mut progress = Vec::new();
    for which in Impl::all() {
        for (mode, fail, expected) in cases {
            let (after, during, done) = bitmap_after_backup(which, mode, fail).await;
            progress.push(done);
            assert_eq!(after, expected, "{which:?} mode {mode}, failing {fail}");
            let disk0 = during.lines().find(|l| l.starts_with("disk0")).unwrap();
            assert_eq!(
                disk0,
                "disk0: [{\"recording\":true,\"persistent\":false,\"busy\":false,\"granularity\":65536,\"count\":0},\
                 {\"name\":\"b0\",\"recording\":true,\"persistent\":false,\"busy\":true,\"granularity\":65536,\"count\":327680}]",
                "{which:?}: a nameless successor records while b0 is busy"
            );
        }
    }
    // len - offset is what was left undone: of the 5 dirty clusters, the 3 at 4 MiB.
    let (blockd, qsd) = progress.split_at(cases.len());
    assert_eq!(blockd, qsd, "offset and len of BLOCK_JOB_COMPLETED");
    assert_eq!(blockd[5], json!([2 * C, 5 * C]));
}

async fn backup_errors_transcript(which: Impl) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img(&["create", "-q", "-f", "qcow2", &path(d, "disk.qcow2"), "16M"]);
    let daemon = Daemon::start(which, d, &chain_daemon_args(d));
    let mut c = daemon.qmp().await;
    add_qcow2_target(&mut c, d, "tgt").await;
    for (name, disabled) in [("b0", false), ("busy", true)] {
        c.execute(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": name, "disabled": disabled}),
        )
        .await
        .unwrap();
    }
    c.execute(
        "block-dirty-bitmap-add",
        json!({"node": "tgt", "name": "bt"}),
    )
    .await
    .unwrap();
    c.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "disk0", "name": "x", "bitmaps": ["busy"]}),
    )
    .await
    .unwrap();
    let cases = [
        json!({"sync": "incremental"}),
        json!({"sync": "bitmap", "target": "disk0"}),
        json!({"sync": "incremental", "bitmap-mode": "always"}),
        json!({"sync": "full", "bitmap-mode": "always", "target": "disk0"}),
        json!({"sync": "incremental", "bitmap": "nope", "target": "disk0"}),
        json!({"sync": "incremental", "bitmap": "bt"}),
        json!({"sync": "incremental", "bitmap": "nope", "bitmap-mode": "never"}),
        json!({"sync": "bitmap", "bitmap": "b0"}),
        json!({"sync": "full", "bitmap": "busy"}),
        json!({"sync": "full", "bitmap": "busy", "bitmap-mode": "on-success"}),
        json!({"sync": "none", "bitmap": "b0", "bitmap-mode": "on-success", "target": "disk0"}),
        json!({"sync": "full", "bitmap": "b0", "bitmap-mode": "never"}),
        json!({"sync": "top", "bitmap": "b0", "bitmap-mode": "never"}),
        json!({"sync": "bitmap", "bitmap": "b0", "bitmap-mode": "always", "target": "disk0"}),
    ];
    let mut t = Vec::new();
    for case in cases {
        let mut args = json!({"job-id": "j", "device": "disk0", "target": "tgt"});
        args.as_object_mut()
            .unwrap()
            .extend(case.as_object().unwrap().clone());
        t.push(step(&mut c, "blockdev-backup", args).await);
    }
    t.push(
        step(&mut c, "drive-backup", json!({"device": "disk0", "target": path(d, "new.qcow2"), "sync": "bitmap", "bitmap": "busy", "bitmap-mode": "always"}))
            .await
            .replace(&path(d, ""), ""),
    );
    t.push(bitmap_listing(&mut c).await);
    daemon.quit(&mut c).await;
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_bitmap_errors_match_qsd() {
    let blockd = backup_errors_transcript(Impl::Blockd).await;
    assert!(
        blockd
            .iter()
            .all(|l| l.contains("error:") || l.contains("disk0:")),
        "{blockd:#?}"
    );
    Impl::all();
    let qsd = backup_errors_transcript(Impl::Qsd).await;
    assert_eq!(blockd, qsd);
}

/// With parallel workers too, a failed job's offset counts every range that was copied
/// (QEMU's rule: len - offset is what was left undone), in the event and in query-jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_backup_reports_the_work_done() {
    const M: u64 = 1 << 20;
    let mut reports = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let disk = path(d, "disk.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", &disk, "16M"]);
        qemu_img(&["create", "-q", "-f", "raw", &path(d, "t.raw"), "16M"]);
        let target = json!({"driver": "raw", "node-name": "tgt", "file": {
            "driver": "blkdebug", "image": {"driver": "file", "filename": path(d, "t.raw")},
            "inject-error": [{"event": "none", "iotype": "write", "sector": 8192, "errno": 5}]}});
        let mut args = chain_daemon_args(d);
        args.extend([s("--blockdev"), target.to_string()]);
        let daemon = Daemon::start(which, d, &args);
        let mut c = daemon.qmp().await;
        c.execute(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "b0"}),
        )
        .await
        .unwrap();
        nbd_writes(d, "disk0", &["write -P 1 0 8M"]);
        c.execute("blockdev-backup", json!({"job-id": "j", "device": "disk0", "target": "tgt", "sync": "bitmap", "bitmap": "b0", "bitmap-mode": "always", "auto-dismiss": false}))
            .await
            .unwrap();
        let done = c.wait_event("BLOCK_JOB_COMPLETED", WAIT).await.unwrap();
        let jobs = c.execute("query-jobs", json!({})).await.unwrap();
        let left = count(&mut c, "disk0", "b0").await;
        daemon.quit(&mut c).await;
        let (offset, len) = (&done["data"]["offset"], &done["data"]["len"]);
        assert_eq!(jobs[0]["current-progress"], *offset, "{which:?}");
        assert_eq!(jobs[0]["total-progress"], *len, "{which:?}");
        assert_eq!(*len, json!(8 * M), "{which:?}");
        // The failed write's range stays dirty, and is all that is undone.
        let undone = len.as_u64().unwrap() - offset.as_u64().unwrap();
        assert_eq!(undone, left, "{which:?}: {done}");
        reports.push(undone);
    }
    assert_eq!(reports[0], reports[1], "undone bytes differ from qsd");
}
