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

/// What a daemon answers, in order, for the bitmaps of an image it opened with `read_only`:
/// each command's reply, then `format-specific` of query-named-block-nodes.
async fn bitmaps_of_an_image(which: Impl, read_only: bool) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2").to_string_lossy().into_owned();
    qemu_img(&["create", "-q", "-f", "qcow2", &disk, "16M"]);
    qemu_img(&["bitmap", "--add", &disk, "b0"]);
    qemu_img(&["bitmap", "--add", "--disable", "-g", "128k", &disk, "b1"]);
    let ro = if read_only { "on" } else { "off" };
    let daemon = Daemon::start(
        which,
        dir.path(),
        &[
            s("--blockdev"),
            format!("driver=qcow2,node-name=disk0,read-only={ro},file.driver=file,file.filename=disk.qcow2"),
        ],
    );
    let mut client = daemon.qmp().await;
    let mut replies = Vec::new();
    for (command, args) in [
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "n1"}),
        ),
        (
            "block-dirty-bitmap-clear",
            json!({"node": "disk0", "name": "b0"}),
        ),
        (
            "block-dirty-bitmap-disable",
            json!({"node": "disk0", "name": "b0"}),
        ),
        (
            "block-dirty-bitmap-enable",
            json!({"node": "disk0", "name": "b1"}),
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "disk0", "target": "b0", "bitmaps": ["n1"]}),
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "disk0", "target": "n1", "bitmaps": ["b0"]}),
        ),
        (
            "block-dirty-bitmap-remove",
            json!({"node": "disk0", "name": "b1"}),
        ),
    ] {
        replies.push(reply(&mut client, command, args).await);
    }
    let nodes = client
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let disk0 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "disk0")
        .unwrap();
    replies.push(disk0["image"]["format-specific"]["data"]["bitmaps"].clone());
    daemon.quit(&mut client).await;
    replies
}

/// A read-only image's bitmaps may be read, enabled and disabled, never changed or removed
/// (the image could not take it), and the image's own list of bitmaps is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitmaps_of_read_only_images_and_their_listing_match_qsd() {
    for read_only in [true, false] {
        let mut all = Vec::new();
        for which in Impl::all() {
            all.push(bitmaps_of_an_image(which, read_only).await);
        }
        assert_eq!(all[0], all[1], "read-only {read_only}: blockd vs qsd");
        let readonly = "Bitmap 'b0' is readonly and cannot be modified";
        assert_eq!(all[0][1]["error"]["desc"] == readonly, read_only);
    }
}

/// The offset of the first bitmap directory entry's table size in a qcow2 v3 image.
fn first_table_size_field(image: &[u8]) -> usize {
    let be32 = |at: usize| u32::from_be_bytes(image[at..at + 4].try_into().unwrap());
    let be64 = |at: usize| u64::from_be_bytes(image[at..at + 8].try_into().unwrap());
    let mut at = be32(100) as usize;
    loop {
        let (magic, len) = (be32(at), be32(at + 4) as usize);
        assert_ne!(magic, 0, "no bitmaps extension");
        if magic == 0x2385_2875 {
            return be64(at + 8 + 16) as usize + 8;
        }
        at += 8 + len.next_multiple_of(8);
    }
}

/// A directory entry claiming a 32 GiB bitmap table is refused before anything is
/// allocated or written, and the daemon goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_bitmap_table_size_is_refused_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    let disk_s = disk.to_string_lossy().into_owned();
    qemu_img(&["create", "-q", "-f", "qcow2", &disk_s, "16M"]);
    qemu_img(&["bitmap", "--add", &disk_s, "b0"]);
    let mut image = std::fs::read(&disk).unwrap();
    let field = first_table_size_field(&image);
    image[field..field + 4].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
    std::fs::write(&disk, &image).unwrap();
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &[]);
    let mut client = daemon.qmp().await;
    let err = client
        .execute(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "disk0",
                   "file": {"driver": "file", "filename": disk_s}}),
        )
        .await
        .unwrap_err();
    assert!(
        err.desc
            .contains("bitmap table does not match the disk size"),
        "{}",
        err.desc
    );
    assert!(
        std::fs::read(&disk).unwrap() == image,
        "a refused open changed the image"
    );
    client.execute("query-version", json!({})).await.unwrap();
    daemon.quit(&mut client).await;
}

/// Storing bitmaps at quit may need more refcount blocks than the refcount table can
/// point at: the table grows (a larger one, then the header, then the old one freed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storing_bitmaps_grows_a_full_refcount_table() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    let disk_s = disk.to_string_lossy().into_owned();
    // One 512-byte table cluster of 64-bit refcounts reaches 2 MiB of file: after 1980 KiB
    // of data, 6 clusters are left, and 7 bitmap tables and a directory need 8.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512,refcount_bits=64",
        &disk_s,
        "4M",
    ]);
    qemu_io(&["-f", "qcow2", &disk_s, "-c", "write -P 1 0 1980k"]);
    let table_clusters = |image: &Path| {
        let bytes = std::fs::read(image).unwrap();
        u32::from_be_bytes(bytes[56..60].try_into().unwrap())
    };
    assert_eq!(table_clusters(&disk), 1);
    let daemon = Daemon::start(
        Impl::Blockd,
        dir.path(),
        &[
            s("--blockdev"),
            s("driver=qcow2,node-name=disk0,file.driver=file,file.filename=disk.qcow2"),
        ],
    );
    let mut client = daemon.qmp().await;
    let names: Vec<String> = (0..7).map(|i| format!("b{i}")).collect();
    for name in &names {
        client
            .execute(
                "block-dirty-bitmap-add",
                json!({"node": "disk0", "name": name, "persistent": true, "granularity": 512}),
            )
            .await
            .unwrap();
    }
    daemon.quit(&mut client).await;
    let check: Value =
        serde_json::from_str(&qemu_img(&["check", "--output=json", &disk_s])).unwrap();
    assert_eq!(check["leaks"], Value::Null, "{check}");
    assert!(table_clusters(&disk) > 1, "the refcount table did not grow");
    let info: Value = serde_json::from_str(&qemu_img(&["info", "--output=json", &disk_s])).unwrap();
    let stored: Vec<&str> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap_or_else(|| panic!("no bitmaps: {info}"))
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(stored, names);
    qemu_io(&["-f", "qcow2", "-r", &disk_s, "-c", "read -P 1 0 1980k"]);
}

/// Opens refused for their encryption (no password, a wrong one) are refused before
/// anything is written: the bytes, and so the persistent bitmaps, stay as they were (a
/// writable open clears autoclear bits it does not know, so a late refusal could cost the
/// bitmaps their consistency).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_opens_change_nothing_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("luks.qcow2").to_string_lossy().into_owned();
    let secret = "secret,id=sec0,data=abc";
    qemu_img(&[
        "create",
        "-q",
        "--object",
        secret,
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        &path,
        "16M",
    ]);
    let image_opts =
        format!("driver=qcow2,file.driver=file,file.filename={path},encrypt.key-secret=sec0");
    qemu_img(&[
        "bitmap",
        "--object",
        secret,
        "--add",
        "--image-opts",
        &image_opts,
        "b0",
    ]);
    let images = [
        (path.clone(), None, "is required for cipher"),
        (path, Some("wrong"), "Invalid password"),
    ];
    let daemon = Daemon::start(
        Impl::Blockd,
        dir.path(),
        &[
            "--object".to_string(),
            "secret,id=wrong,data=abd".to_string(),
        ],
    );
    let mut client = daemon.qmp().await;
    for (i, (path, secret, why)) in images.iter().enumerate() {
        let before = std::fs::read(path).unwrap();
        let mut options = json!({"driver": "qcow2", "node-name": format!("n{i}"),
                                 "file": {"driver": "file", "filename": path}});
        if let Some(secret) = secret {
            options["encrypt"] = json!({"format": "luks", "key-secret": secret});
        }
        let err = client.execute("blockdev-add", options).await.unwrap_err();
        assert!(err.desc.contains(why), "{path}: {}", err.desc);
        assert!(std::fs::read(path).unwrap() == before, "{path} changed");
    }
    daemon.quit(&mut client).await;
    for (path, _, _) in &images {
        let info = run(std::process::Command::new("qemu-img").args(["info", path]));
        let warnings = String::from_utf8_lossy(&info.stderr);
        assert!(!warnings.contains("inconsistent"), "{path}: {warnings}");
    }
}
