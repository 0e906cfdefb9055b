//! Parallels images on both daemons: images qemu-img and blockdev-create make, written
//! through NBD (within a cluster, across clusters, zero writes, discards), then checked by
//! qemu-img and compared with what qsd made of the same steps; an image left "in use" is
//! repaired on a read-write open as qsd repairs it; an image with a format extension
//! opens read-write as in qsd; crafted headers get qsd's refusals.

mod common;

use common::formats::{assert_behaves_as_in_qsd, assert_refusals_match, nodes_of, patched};
use common::jobs::{create, empty_file_nodes, qemu_io};
use common::*;
use serde_json::{json, Value};
use std::path::Path;

const IMAGES: [&str; 4] = ["made.prl", "new.prl", "small.prl", "tiny.prl"];

async fn exercise(which: Impl, dir: &Path) -> Vec<Value> {
    let d = |n: &str| p(dir, n);
    qemu_img(&["create", "-q", "-f", "parallels", &d("made.prl"), "5M"]);
    qemu_io(&[
        "-f",
        "parallels",
        &d("made.prl"),
        "-c",
        "write -P 0x11 1M 1M",
    ]);
    let sock = dir.join("nbd.sock");
    let daemon = Daemon::start(which, dir, &nbd_server_args(&sock));
    let mut client = daemon.qmp().await;
    let mut seen = Vec::new();
    empty_file_nodes(&mut client, &["new.prl", "small.prl", "tiny.prl", "x.prl"]).await;
    for options in [
        json!({"driver": "parallels", "file": "new-prl", "size": 6 << 20}),
        json!({"driver": "parallels", "file": "small-prl", "size": 3 << 20, "cluster-size": 65536}),
        json!({"driver": "parallels", "file": "tiny-prl", "size": 2 << 20, "cluster-size": 512}),
        json!({"driver": "parallels", "file": "x-prl", "size": 5000}),
        json!({"driver": "parallels", "file": "x-prl", "size": 1 << 20, "cluster-size": 1000}),
        json!({"driver": "parallels", "file": "x-prl", "size": 1 << 20, "cluster-size": 1u64 << 32}),
        json!({"driver": "parallels", "file": "x-prl", "size": 1u64 << 62}),
        json!({"driver": "parallels", "file": "x-prl", "size": 1 << 20, "bogus": 1}),
    ] {
        seen.push(create(&mut client, "c", options).await);
    }
    for (i, name) in IMAGES.iter().enumerate() {
        let node = format!("n{i}");
        add_exported(&mut client, "parallels", &node, name).await;
        let uri = format!("nbd+unix:///{node}?socket={}", sock.display());
        qemu_io(&[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x22 1000 3000",
            "-c",
            "write -P 0x33 1047576 200000",
            "-c",
            "write -z 1300000 5000",
            "-c",
            "discard 0 512",
            "-c",
            "read -P 0x22 1000 3000",
            "-c",
            "read -P 0x33 1047576 200000",
            "-c",
            "read -P 0 1300000 5000",
            "-c",
            "flush",
        ]);
    }
    seen.extend(nodes_of(&mut client, "parallels").await);
    daemon.quit(&mut client).await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallels_images_behave_as_in_qsd() {
    assert_behaves_as_in_qsd("parallels", &IMAGES, |which, dir| async move {
        exercise(which, &dir).await
    })
    .await;
}

/// An image QEMU left "in use" with a BAT entry past the end of the file: opened
/// read-write, both daemons clear the entry and the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_left_in_use_are_repaired_as_qsd_repairs_them() {
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = |n: &str| p(dir.path(), n);
        qemu_img(&["create", "-q", "-f", "parallels", &d("a.prl"), "5M"]);
        qemu_io(&["-f", "parallels", &d("a.prl"), "-c", "write -P 0x11 0 1M"]);
        let image = std::fs::read(d("a.prl")).unwrap();
        let image = patched(&image, 44, &0x746F_6E59u32.to_le_bytes());
        let image = patched(&image, 64 + 4, &1000u32.to_le_bytes());
        std::fs::write(d("a.prl"), image).unwrap();
        let sock = dir.path().join("nbd.sock");
        let daemon = Daemon::start(which, dir.path(), &nbd_server_args(&sock));
        let mut client = daemon.qmp().await;
        add_exported(&mut client, "parallels", "a", "a.prl").await;
        let uri = format!("nbd+unix:///a?socket={}", sock.display());
        qemu_io(&[
            "-f",
            "raw",
            &uri,
            "-c",
            "read -P 0x11 0 1M",
            "-c",
            "read -P 0 1M 1M",
        ]);
        daemon.quit(&mut client).await;
        let check = run(std::process::Command::new("qemu-img").args([
            "check",
            "-f",
            "parallels",
            &d("a.prl"),
        ]));
        let image = std::fs::read(d("a.prl")).unwrap();
        all.push(json!({"check": String::from_utf8_lossy(&check.stdout), "inuse": image[44..48], "entry": image[68..72]}));
    }
    assert_eq!(all[0], all[1]);
    assert_eq!(all[0]["inuse"], json!([0, 0, 0, 0]));
}

/// Headers QEMU refuses, refused the same way, and none of them a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_parallels_headers_are_refused_as_qsd_refuses_them() {
    assert_refusals_match("parallels", &[], &["write 0 64k"], |good| {
        vec![
            ("short", good[..40].to_vec()),
            ("magic", patched(good, 0, b"WithoutFreeSpacX")),
            ("version", patched(good, 16, &3u32.to_le_bytes())),
            ("tracks", patched(good, 28, &0u32.to_le_bytes())),
            ("tracks_big", patched(good, 28, &(1u32 << 30).to_le_bytes())),
            ("catalog", patched(good, 32, &(1u32 << 30).to_le_bytes())),
            ("old_magic", patched(good, 0, b"WithoutFreeSpace")),
        ]
    })
    .await;
}

/// An image carrying a format extension (its writer's dirty bitmaps, here none) appended
/// after its data, checksummed with `md5sum`.
fn with_format_extension(path: &str) {
    let mut image = std::fs::read(path).unwrap();
    let cluster = u32::from_le_bytes(image[28..32].try_into().unwrap()) as usize * 512;
    let at = image.len().next_multiple_of(cluster);
    let mut ext = vec![0u8; cluster];
    ext[..8].copy_from_slice(&0xAB23_4CEF_23DC_EA87u64.to_le_bytes());
    let body = format!("{path}.ext-body");
    std::fs::write(&body, &ext[24..]).unwrap();
    let out = run(std::process::Command::new("md5sum").arg(&body));
    let hex = String::from_utf8(out.stdout).unwrap();
    for (i, byte) in ext[8..24].iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    image.resize(at, 0);
    image.extend(ext);
    image[56..64].copy_from_slice(&((at / 512) as u64).to_le_bytes());
    std::fs::write(path, image).unwrap();
}

/// Both daemons open an image with a format extension read-write (qsd warns that it
/// ignores it). blockd's first write also takes the extension out of the header, so no
/// tool trusts its bitmaps, stale from then on; qsd leaves it named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_with_a_format_extension_open_read_write() {
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let image = p(dir.path(), "ext.prl");
        qemu_img(&["create", "-q", "-f", "parallels", &image, "64M"]);
        qemu_io(&["-f", "parallels", &image, "-c", "write -P 0x33 0 1M"]);
        with_format_extension(&image);
        // The reference takes the extension as well formed.
        qemu_img(&["info", "-f", "parallels", &image]);
        let sock = dir.path().join("nbd.sock");
        let daemon = Daemon::start(which, dir.path(), &nbd_server_args(&sock));
        let mut client = daemon.qmp().await;
        add_exported(&mut client, "parallels", "ext", "ext.prl").await;
        let uri = format!("nbd+unix:///ext?socket={}", sock.display());
        qemu_io(&["-f", "raw", &uri, "-c", "read -P 0x33 0 1M"]);
        let named = |path: &str| {
            let bytes = std::fs::read(path).unwrap();
            u64::from_le_bytes(bytes[56..64].try_into().unwrap()) != 0
        };
        assert!(
            named(&image),
            "{which:?}: a read leaves the extension named"
        );
        qemu_io(&["-f", "raw", &uri, "-c", "write -P 0x44 5M 64k"]);
        daemon.quit(&mut client).await;
        qemu_io(&[
            "-f",
            "parallels",
            &image,
            "-c",
            "read -P 0x33 0 1M",
            "-c",
            "read -P 0x44 5M 64k",
        ]);
        assert_eq!(named(&image), which == Impl::Qsd, "{which:?}");
    }
}
