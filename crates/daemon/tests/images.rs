//! Image metadata end to end: commands that rewrite it (change-backing-file) and crafted
//! headers that must be refused, the replies and node listings compared with
//! qemu-storage-daemon, the files judged with qemu-img.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;

/// base <- mid <- top, each naming the one below by a relative name; `other` has a backing
/// file but is not in top's chain.
fn make_images(dir: &Path) {
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
    qemu_img(&["create", "-q", "-f", "qcow2", &p("base.qcow2"), "1M"]);
    for (image, backing) in [
        ("mid.qcow2", "base.qcow2"),
        ("top.qcow2", "mid.qcow2"),
        ("other.qcow2", "base.qcow2"),
    ] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            "qcow2",
            &p(image),
        ]);
    }
}

fn chain_args() -> Vec<String> {
    [
        "driver=qcow2,node-name=base,read-only=on,file.driver=file,file.filename=base.qcow2",
        "driver=qcow2,node-name=mid,read-only=on,backing=base,file.driver=file,file.filename=mid.qcow2",
        "driver=qcow2,node-name=top,backing=mid,file.driver=file,file.filename=top.qcow2,file.node-name=topfile",
        "driver=qcow2,node-name=other,file.driver=file,file.filename=other.qcow2",
    ]
    .iter()
    .flat_map(|b| [s("--blockdev"), s(b)])
    .collect()
}

fn change(device: &str, image: &str, backing: &str) -> Value {
    json!({"device": device, "image-node-name": image, "backing-file": backing})
}

/// Run the same sequence on one daemon: every reply (or error), then the node listing, then
/// what qemu-img says of each file after quit.
async fn scenario(which: Impl) -> (Vec<Value>, Value, Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    make_images(dir.path());
    let daemon = Daemon::start(which, dir.path(), &chain_args());
    let mut qmp = daemon.qmp().await;
    let long = "n".repeat(1100);
    let calls = [
        change("nope", "top", "x"),
        change("top", "nope", "x"),
        change("mid", "mid", "x"),
        change("topfile", "top", "x"),
        change("top", "topfile", "x"),
        change("top", "base", "x"),
        change("top", "other", "x"),
        change("top", "top", &long),
        json!({"device": "top", "image-node-name": "top"}),
        json!({"device": "top", "image-node-name": "top", "backing-file": "x", "extra": 1}),
        change("top", "mid", "renamed-base.qcow2"),
        change("top", "top", "renamed-mid.qcow2"),
        change("other", "other", ""),
    ];
    let mut replies = Vec::new();
    for args in calls {
        let reply = match qmp.execute("change-backing-file", args).await {
            Ok(v) => json!({"return": v}),
            Err(e) => json!({"error": e.desc}),
        };
        replies.push(reply);
    }
    let nodes = qmp
        .execute("query-named-block-nodes", json!({}))
        .await
        .unwrap();
    daemon.quit(&mut qmp).await;
    // The chain must hold together under its new names.
    for (from, to) in [
        ("base.qcow2", "renamed-base.qcow2"),
        ("mid.qcow2", "renamed-mid.qcow2"),
    ] {
        std::fs::rename(dir.path().join(from), dir.path().join(to)).unwrap();
    }
    let top = dir.path().join("top.qcow2").to_string_lossy().into_owned();
    let chain = qemu_img(&["info", "--backing-chain", &top]);
    assert_eq!(chain.matches("image: ").count(), 3, "{chain}");
    let files = ["top.qcow2", "renamed-mid.qcow2", "other.qcow2"]
        .iter()
        .map(|f| {
            let path = dir.path().join(f).to_string_lossy().into_owned();
            let info: Value =
                serde_json::from_str(&qemu_img(&["info", "--output=json", &path])).unwrap();
            qemu_img(&["check", "-q", &path]);
            json!({
                "file": f,
                "backing-filename": info.get("backing-filename"),
                "backing-filename-format": info.get("backing-filename-format"),
            })
        })
        .collect();
    (replies, normalize(nodes), files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_backing_file_rewrites_headers_like_qsd() {
    let (replies, nodes, files) = scenario(Impl::Blockd).await;
    assert_eq!(
        files,
        vec![
            json!({"file": "top.qcow2", "backing-filename": "renamed-mid.qcow2",
                   "backing-filename-format": "qcow2"}),
            json!({"file": "renamed-mid.qcow2", "backing-filename": "renamed-base.qcow2",
                   "backing-filename-format": "qcow2"}),
            json!({"file": "other.qcow2", "backing-filename": null,
                   "backing-filename-format": null}),
        ]
    );
    assert_eq!(replies[12], json!({"return": {}}));
    Impl::all();
    let (qsd_replies, qsd_nodes, qsd_files) = scenario(Impl::Qsd).await;
    for (i, (ours, theirs)) in replies.iter().zip(&qsd_replies).enumerate() {
        assert_eq!(ours, theirs, "reply {i}");
    }
    assert_eq!(files, qsd_files);
    if let Some(d) = first_difference(&nodes, &qsd_nodes) {
        panic!("query-named-block-nodes differs at {d}");
    }
}

/// 4 MiB image with enabled `b0` and disabled `b1`; b0 saw 192 KiB of writes.
fn bitmap_image(dir: &Path) -> String {
    let image = dir.join("disk.qcow2").to_string_lossy().into_owned();
    qemu_img(&["create", "-q", "-f", "qcow2", &image, "4M"]);
    qemu_img(&["bitmap", "--add", &image, "b0"]);
    qemu_img(&["bitmap", "--add", "--disable", &image, "b1"]);
    let out = run(std::process::Command::new("qemu-io").args([
        "-c",
        "write 0 64k",
        "-c",
        "write 1M 128k",
        &image,
    ]));
    assert!(out.status.success());
    image
}

/// One daemon of several run one after the other on `dir/disk.qcow2`.
fn start_on_disk(which: Impl, dir: &Path) -> Daemon {
    // A socket left by the previous run would look like this one's.
    for socket in ["qsd.qmp", "blockd.qmp"] {
        let _ = std::fs::remove_file(dir.join(socket));
    }
    Daemon::start(
        which,
        dir,
        &[
            s("--blockdev"),
            s("driver=qcow2,node-name=disk,file.driver=file,file.filename=disk.qcow2"),
        ],
    )
}

/// (name, count, recording, inconsistent) of the bitmaps qsd lists for node `disk`, by name.
async fn qsd_bitmaps(dir: &Path) -> Vec<(String, u64, bool, bool)> {
    let qsd = start_on_disk(Impl::Qsd, dir);
    let mut qmp = qsd.qmp().await;
    let nodes = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    qsd.quit(&mut qmp).await;
    let disk = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "disk")
        .unwrap()
        .clone();
    let mut bitmaps: Vec<_> = disk["dirty-bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["count"].as_u64().unwrap(),
                b["recording"].as_bool().unwrap(),
                b.get("inconsistent")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            )
        })
        .collect();
    // qsd lists the bitmaps it loaded newest first.
    bitmaps.sort();
    bitmaps
}

fn qemu_img_flags(image: &str) -> Vec<Value> {
    let info: Value =
        serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", image])).unwrap();
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["flags"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitmaps_survive_blockd_for_qsd_and_a_crash_leaves_them_in_use() {
    Impl::all();
    let dir = tempfile::tempdir().unwrap();
    let image = bitmap_image(dir.path());
    let expected = vec![
        (s("b0"), 192 << 10, true, false),
        (s("b1"), 0, false, false),
    ];
    assert_eq!(qsd_bitmaps(dir.path()).await, expected);

    // blockd takes them over and hands them back on quit.
    let blockd = start_on_disk(Impl::Blockd, dir.path());
    let mut qmp = blockd.qmp().await;
    assert_eq!(
        qemu_img_flags(&image),
        vec![json!(["in-use", "auto"]), json!(["in-use"])]
    );
    blockd.quit(&mut qmp).await;
    assert_eq!(qemu_img_flags(&image), vec![json!(["auto"]), json!([])]);
    qemu_img(&["check", "-q", &image]);
    assert_eq!(qsd_bitmaps(dir.path()).await, expected);

    // Killed while holding them: nobody may trust them any more.
    let mut blockd = start_on_disk(Impl::Blockd, dir.path());
    let pid = blockd.pid().to_string();
    assert!(run(std::process::Command::new("kill").args(["-9", &pid]))
        .status
        .success());
    blockd.wait_exit();
    assert_eq!(
        qemu_img_flags(&image),
        vec![json!(["in-use", "auto"]), json!(["in-use"])]
    );
    let inconsistent: Vec<bool> = qsd_bitmaps(dir.path())
        .await
        .into_iter()
        .map(|b| b.3)
        .collect();
    assert_eq!(inconsistent, vec![true, true]);
}

/// Headers a crafted image could carry: each is refused with QEMU's text, the daemon
/// answers the next command, and the file is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_qcow2_headers_are_refused_like_qsd() {
    // (byte offset, big-endian bytes) written over a valid image's header.
    let crafts: [(usize, Vec<u8>); 4] = [
        (8, 0xffff_ffff_ffff_fff0u64.to_be_bytes().to_vec()),
        (16, 4000u32.to_be_bytes().to_vec()),
        (20, 40u32.to_be_bytes().to_vec()),
        // Found by the qcow2_header fuzz target: a shift by the refcount order overflowed.
        (96, 64u32.to_be_bytes().to_vec()),
    ];
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let base = p(dir.path(), "base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", &base, "16M"]);
        let daemon = Daemon::start(which, dir.path(), &[]);
        let mut client = daemon.qmp().await;
        let mut replies = Vec::new();
        for (i, (at, bytes)) in crafts.iter().enumerate() {
            let image = dir.path().join(format!("c{i}.qcow2"));
            let image_s = image.to_string_lossy().into_owned();
            qemu_img(&[
                "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &image_s, "16M",
            ]);
            let mut header = std::fs::read(&image).unwrap();
            header[*at..at + bytes.len()].copy_from_slice(bytes);
            std::fs::write(&image, &header).unwrap();
            replies.push(
                reply(
                    &mut client,
                    "blockdev-add",
                    json!({"driver": "qcow2", "node-name": format!("c{i}"),
                           "file": {"driver": "file", "filename": image_s}}),
                )
                .await,
            );
            assert!(
                std::fs::read(&image).unwrap() == header,
                "{which:?}: image changed"
            );
        }
        client.execute("query-version", json!({})).await.unwrap();
        daemon.quit(&mut client).await;
        all.push(replies);
    }
    assert_eq!(all[0][0]["error"]["desc"], "Invalid backing file offset");
    assert_eq!(all[0], all[1], "blockd vs qsd");
}

/// Makes a file immutable (`chattr +i`: writable opens fail with EPERM, even for root)
/// until dropped.
struct Immutable(String);

impl Immutable {
    fn new(path: &str) -> Immutable {
        let out = run(std::process::Command::new("chattr").args(["+i", path]));
        assert!(
            out.status.success(),
            "chattr +i {path} (package e2fsprogs, on a filesystem with attributes): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Immutable(path.to_string())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .args(["-i", &self.0])
            .status();
    }
}

/// auto-read-only falls back to a read-only open when the file cannot be written; as in
/// qsd the node is still reported writable, and a writer is refused up front with the
/// error of opening the file read-write (never left to fail its writes later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_read_only_makes_a_read_only_node() {
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let image = p(dir.path(), "locked.raw");
        qemu_img(&["create", "-q", "-f", "raw", &image, "1M"]);
        let _immutable = Immutable::new(&image);
        let sock = dir.path().join("nbd.sock");
        let daemon = Daemon::start(
            which,
            dir.path(),
            &[
                s("--nbd-server"),
                format!("addr.type=unix,addr.path={}", sock.display()),
            ],
        );
        let mut client = daemon.qmp().await;
        let mut replies = Vec::new();
        for (command, args) in [
            (
                "blockdev-add",
                json!({"driver": "file", "node-name": "f", "filename": image, "auto-read-only": true}),
            ),
            (
                "blockdev-add",
                json!({"driver": "file", "node-name": "g", "filename": image}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "w", "node-name": "f", "writable": true}),
            ),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "r", "node-name": "f"}),
            ),
        ] {
            replies.push(reply(&mut client, command, args).await);
        }
        let nodes = client
            .execute("query-named-block-nodes", json!({"flat": true}))
            .await
            .unwrap();
        replies.push(nodes[0]["ro"].clone());
        daemon.quit(&mut client).await;
        all.push(
            serde_json::to_string(&replies)
                .unwrap()
                .replace(&image, "IMAGE"),
        );
    }
    assert!(
        all[0].contains(
            r#""desc":"Could not open 'IMAGE': Operation not permitted"}},{"return":{}},false]"#
        ),
        "{}",
        all[0]
    );
    assert_eq!(all[0], all[1], "blockd vs qsd");
}
