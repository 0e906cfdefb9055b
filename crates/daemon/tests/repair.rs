//! Images left dirty by a lazy-refcounts writer that was killed: opened read-write, both
//! daemons repair them (refcounts rebuilt, COPIED flags right, dirty bit cleared) and the
//! data, the internal snapshot and the bitmap survive; opened read-only, they are served
//! as they are and left untouched.

mod common;

use common::jobs::qemu_io;
use common::*;
use serde_json::{json, Value};
use std::process::Command;

/// A 16 MiB image with a snapshot (and a bitmap, if asked) whose writer died with
/// refcounts unwritten: qemu-img check finds errors and leaks in it.
fn killed_writer_image(path: &str, bitmap: bool) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        path,
        "16M",
    ]);
    qemu_io(&["-f", "qcow2", path, "-c", "write -P 0x11 0 1M"]);
    qemu_img(&["snapshot", "-c", "s1", path]);
    if bitmap {
        qemu_img(&["bitmap", "--add", path, "b0"]);
    }
    let out = run(Command::new("qemu-io").args([
        "-f",
        "qcow2",
        path,
        "-c",
        "write -P 0x22 512k 1M",
        "-c",
        "write -P 0x33 8M 64k",
        "-c",
        "sigraise 9",
    ]));
    assert!(!out.status.success(), "qemu-io was meant to be killed");
    let check = Command::new("qemu-img")
        .args(["check", "--output=json", path])
        .output()
        .unwrap();
    let check: Value = serde_json::from_slice(&check.stdout).unwrap();
    assert!(
        check["corruptions"].as_u64().unwrap_or(0) > 0,
        "the killed writer left no errors: {check}"
    );
}

fn info(path: &str) -> Value {
    serde_json::from_str(&qemu_img(&["info", "--output=json", "-U", path])).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_images_are_repaired_when_opened_writable() {
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let disk = p(dir.path(), "disk.qcow2");
        let readonly = p(dir.path(), "ro.qcow2");
        killed_writer_image(&disk, true);
        std::fs::copy(&disk, &readonly).unwrap();
        let untouched = std::fs::read(&readonly).unwrap();
        let sock = dir.path().join("nbd.sock");
        let mut args = nbd_server_args(&sock);
        args.extend([
            s("--blockdev"),
            format!("driver=qcow2,node-name=disk0,file.driver=file,file.filename={disk}"),
            s("--blockdev"),
            format!(
                "driver=qcow2,node-name=ro,read-only=on,file.driver=file,file.filename={readonly}"
            ),
            s("--export"),
            s("type=nbd,id=e0,node-name=disk0,name=disk0,writable=on"),
            s("--export"),
            s("type=nbd,id=e1,node-name=ro,name=ro"),
        ]);
        let daemon = Daemon::start(which, dir.path(), &args);
        let mut client = daemon.qmp().await;
        let uri = |name: &str| format!("nbd+unix:///{name}?socket={}", sock.display());
        // New allocations after the repair must not land on clusters in use.
        qemu_io(&["-f", "raw", &uri("disk0"), "-c", "write -P 0x44 2M 4M"]);
        for u in [uri("disk0"), uri("ro")] {
            qemu_io(&[
                "-r",
                "-f",
                "raw",
                &u,
                "-c",
                "read -P 0x11 0 512k",
                "-c",
                "read -P 0x22 512k 1M",
                "-c",
                "read -P 0x33 8M 64k",
            ]);
        }
        daemon.quit(&mut client).await;

        let check: Value =
            serde_json::from_str(&qemu_img(&["check", "--output=json", &disk])).unwrap();
        assert_eq!(check["corruptions"], Value::Null, "{which:?}: {check}");
        assert_eq!(check["leaks"], Value::Null, "{which:?}: {check}");
        let repaired = info(&disk);
        assert_eq!(repaired["dirty-flag"], false, "{which:?}: {repaired}");
        assert_eq!(
            repaired["snapshots"][0]["name"], "s1",
            "{which:?}: {repaired}"
        );
        let bitmaps = &repaired["format-specific"]["data"]["bitmaps"];
        assert_eq!(bitmaps[0]["name"], "b0", "{which:?}: {repaired}");
        qemu_io(&[
            "-f",
            "qcow2",
            &disk,
            "-c",
            "read -P 0x11 0 512k",
            "-c",
            "read -P 0x22 512k 1M",
            "-c",
            "read -P 0x44 2M 4M",
            "-c",
            "read -P 0x33 8M 64k",
        ]);
        let snapshot = p(dir.path(), "s1.raw");
        qemu_img(&[
            "convert",
            "-O",
            "raw",
            "-l",
            "snapshot.name=s1",
            &disk,
            &snapshot,
        ]);
        qemu_io(&[
            "-f",
            "raw",
            &snapshot,
            "-c",
            "read -P 0x11 0 1M",
            "-c",
            "read -P 0 1M 15M",
        ]);
        assert!(
            std::fs::read(&readonly).unwrap() == untouched,
            "{which:?}: the read-only open changed the image"
        );
        assert_eq!(info(&readonly)["dirty-flag"], true);
    }
}

/// A read-only node reopened read-write is repaired first (blockd only: nodes with
/// persistent bitmaps cannot be reopened, so this image has none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dirty_image_reopened_writable_is_repaired_first() {
    let dir = tempfile::tempdir().unwrap();
    let disk = p(dir.path(), "disk.qcow2");
    killed_writer_image(&disk, false);
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &[]);
    let mut client = daemon.qmp().await;
    let node = json!({"driver": "qcow2", "node-name": "d", "read-only": true,
                      "file": {"driver": "file", "node-name": "f", "filename": disk}});
    client.execute("blockdev-add", node.clone()).await.unwrap();
    let mut writable = node;
    writable["read-only"] = json!(false);
    writable["file"] = json!("f");
    let file = json!({"driver": "file", "node-name": "f", "filename": disk});
    client
        .execute("blockdev-reopen", json!({"options": [writable, file]}))
        .await
        .unwrap();
    client
        .execute("blockdev-del", json!({"node-name": "d"}))
        .await
        .unwrap();
    daemon.quit(&mut client).await;
    qemu_img(&["check", "-q", &disk]);
    assert_eq!(info(&disk)["dirty-flag"], false);
}

/// An open refused for its options or its data file repairs nothing: the dirty image stays
/// byte for byte as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_opens_leave_a_dirty_image_alone() {
    let dir = tempfile::tempdir().unwrap();
    let disk = p(dir.path(), "disk.qcow2");
    killed_writer_image(&disk, false);
    let before = std::fs::read(&disk).unwrap();
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &[]);
    let mut client = daemon.qmp().await;
    let file = json!({"driver": "file", "filename": disk});
    for refused in [
        json!({"driver": "qcow2", "node-name": "a", "file": file, "l2-cache-entry-size": 4096}),
        json!({"driver": "qcow2", "node-name": "b", "file": file,
               "data-file": {"driver": "file", "filename": p(dir.path(), "none.raw")}}),
    ] {
        client.execute("blockdev-add", refused).await.unwrap_err();
    }
    daemon.quit(&mut client).await;
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "a refused open wrote to the image"
    );
}
