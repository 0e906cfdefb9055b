//! The fuse export: a node mounted as a regular file, driven with ordinary file calls and
//! with dd, cmp, fallocate and qemu-img, side by side with qemu-storage-daemon's fuse
//! export on a copy of the same image; the images are then compared by qemu-img.

mod common;

use common::*;
use serde_json::{json, Value};
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

fn fuse_daemon(which: Impl, dir: &Path, image: &str, mountpoint: &Path, extra: &str) -> Daemon {
    std::fs::write(mountpoint, b"").unwrap();
    let export = format!(
        "type=fuse,id=e,node-name=d,mountpoint={}{extra}",
        mountpoint.display()
    );
    Daemon::start(which, dir, &exported_qcow2_args(image, export))
}

fn seek(fd: i32, offset: i64, whence: i32) -> Result<i64, i32> {
    // Safety: lseek on an open descriptor with plain integers.
    let r = unsafe { libc::lseek(fd, offset, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r)
    }
}

fn tool(program: &str, args: &[&str]) {
    let out = run(Command::new(program).args(args));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The same file operations through both daemons' fuse exports leave the same images
/// behind (contents and allocation), and the file answers the same along the way.
#[tokio::test]
async fn file_operations_on_the_export_match_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = dir.path().join("pattern");
    let data: Vec<u8> = (0..MIB as usize).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&pattern, &data).unwrap();
    let mut answers = Vec::new();
    let mut images = Vec::new();
    for which in Impl::all() {
        let (tag, image) = tagged_qcow2(dir.path(), which, "16M");
        let mnt = dir.path().join(format!("{tag}.mnt"));
        let daemon = fuse_daemon(which, dir.path(), &image, &mnt, ",writable=on");
        let mut client = daemon.qmp().await;
        let mut seen: Vec<Value> = Vec::new();
        seen.push(normalize(
            reply(&mut client, "query-block-exports", json!({})).await,
        ));
        let m = mnt.to_string_lossy().to_string();
        tool(
            "dd",
            &[
                &format!("if={}", pattern.display()),
                &format!("of={m}"),
                "bs=64k",
                "seek=2",
                "conv=notrunc,fsync",
                "status=none",
            ],
        );
        tool(
            "cmp",
            &[
                "-n",
                &MIB.to_string(),
                "-i",
                &format!("{}:0", 2 * 65536),
                &m,
                &pattern.to_string_lossy(),
            ],
        );
        tool("fallocate", &["-p", "-o", "131072", "-l", "65536", &m]);
        tool("fallocate", &["-z", "-o", "262144", "-l", "65536", &m]);
        let info = qemu_img(&["info", "-f", "raw", "--output=json", &m]);
        let info: Value = serde_json::from_str(&info).unwrap();
        seen.push(info["virtual-size"].clone());
        {
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&mnt)
                .unwrap();
            let fd = f.as_raw_fd();
            seen.push(json!(format!(
                "{:?} {:?} {:?} {:?}",
                seek(fd, 0, libc::SEEK_DATA),
                seek(fd, 196608, libc::SEEK_HOLE),
                seek(fd, 2 * MIB as i64, libc::SEEK_DATA),
                seek(fd, 16 * MIB as i64, libc::SEEK_HOLE),
            )));
            f.seek(SeekFrom::Start(15 * MIB)).unwrap();
            f.write_all(&data[..4096]).unwrap();
            // Past the end of a non-growable export.
            f.seek(SeekFrom::Start(16 * MIB)).unwrap();
            seen.push(json!(format!(
                "{:?}",
                f.write(b"x").map_err(|e| e.raw_os_error())
            )));
            f.set_len(20 * MIB).unwrap();
            f.set_len(18 * MIB).unwrap();
            f.sync_all().unwrap();
            let mut back = vec![0u8; 4096];
            f.seek(SeekFrom::Start(15 * MIB)).unwrap();
            f.read_exact(&mut back).unwrap();
            assert!(back == data[..4096], "{which:?}: read back differs");
            seen.push(json!(f.metadata().unwrap().len()));
        }
        daemon.quit(&mut client).await;
        answers.push(seen);
        images.push(image);
    }
    assert_eq!(answers[0], answers[1], "blockd, then qsd");
    let map = |image: &str| qemu_img(&["map", "--output=json", image]);
    assert_eq!(map(&images[0]), map(&images[1]), "allocation differs");
    qemu_img(&[
        "compare", "-f", "qcow2", "-F", "qcow2", &images[0], &images[1],
    ]);
    qemu_img(&["check", &images[0]]);
}

/// A read-only export refuses writers; refusals of bad arguments are qsd's, word for word.
#[tokio::test]
async fn read_only_exports_and_refusals_match_qsd() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("a-directory")).unwrap();
    let mut seen = Vec::new();
    for which in Impl::all() {
        let (tag, image) = tagged_qcow2(dir.path(), which, "4M");
        let mnt = dir.path().join(format!("{tag}.mnt"));
        let daemon = fuse_daemon(which, dir.path(), &image, &mnt, "");
        let mut client = daemon.qmp().await;
        let mut answers = Vec::new();
        answers.push(json!(format!(
            "{:?}",
            OpenOptions::new()
                .write(true)
                .open(&mnt)
                .map(|_| ())
                .map_err(|e| e.raw_os_error())
        )));
        let mut buf = vec![1u8; 4096];
        std::fs::File::open(&mnt)
            .unwrap()
            .read_exact(&mut buf)
            .unwrap();
        answers.push(json!(buf.iter().all(|&b| b == 0)));
        for args in [
            json!({"type": "fuse", "id": "x", "node-name": "d",
                   "mountpoint": dir.path().join("nothing")}),
            json!({"type": "fuse", "id": "x", "node-name": "d",
                   "mountpoint": dir.path().join("a-directory")}),
            json!({"type": "fuse", "id": "x", "node-name": "d", "mountpoint": mnt,
                   "name": "n"}),
            json!({"type": "fuse", "id": "x", "node-name": "d"}),
            json!({"type": "fuse", "id": "e", "node-name": "d", "mountpoint": mnt}),
            json!({"type": "nbd", "id": "y", "node-name": "d", "mountpoint": mnt}),
            json!({"type": "fuse", "id": "x", "node-name": "d", "mountpoint": mnt,
                   "allow-other": "maybe"}),
            json!({"type": "fuse", "id": "x", "node-name": "d", "mountpoint": mnt,
                   "growable": "yes"}),
            json!({"type": "fuse", "id": "x", "node-name": "nothing", "mountpoint": mnt}),
        ] {
            answers.push(reply(&mut client, "block-export-add", args).await);
        }
        answers.push(reply(&mut client, "blockdev-del", json!({"node-name": "d"})).await);
        daemon.quit(&mut client).await;
        let text = json!(answers)
            .to_string()
            .replace(&*dir.path().to_string_lossy(), "DIR");
        seen.push(text.replace(&tag, "IMPL"));
    }
    assert_eq!(seen[0], seen[1], "blockd, then qsd");
}

/// block-export-del unmounts at once, even while a process holds the file open: that
/// process reads EIO from then on, the node is free, and the mountpoint is the plain file
/// again.
#[tokio::test]
async fn deleting_an_export_in_use_unmounts_it_and_frees_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let image = p(dir.path(), "d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &image, "4M"]);
    let mnt = dir.path().join("d.mnt");
    let daemon = fuse_daemon(Impl::Blockd, dir.path(), &image, &mnt, ",writable=on");
    let mut client = daemon.qmp().await;
    let mut held = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&mnt)
        .unwrap();
    held.write_all(&[0x5a; 4096]).unwrap();
    let r = reply(&mut client, "block-export-del", json!({"id": "e"})).await;
    assert_eq!(r, json!({"return": {}}));
    let event = client
        .wait_event("BLOCK_EXPORT_DELETED", WAIT)
        .await
        .expect("BLOCK_EXPORT_DELETED");
    assert_eq!(event["data"]["id"], "e");
    assert_eq!(std::fs::metadata(&mnt).unwrap().len(), 0, "still mounted");
    let mut buf = [0u8; 512];
    held.seek(SeekFrom::Start(0)).unwrap();
    let err = held
        .read(&mut buf)
        .expect_err("a read through a deleted export");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let r = reply(&mut client, "blockdev-del", json!({"node-name": "d"})).await;
    assert_eq!(r, json!({"return": {}}));
    drop(held);
    daemon.quit(&mut client).await;
    let out = qemu_io_outcome(&["-f", "qcow2", &image, "-c", "read -P 0x5a 0 4k"]);
    assert_eq!(out, "ok");
}

/// A growable export grows the node with writes past its end, as qsd's; a non-growable
/// one refuses them (EIO) and keeps its size.
#[tokio::test]
async fn growable_exports_grow_with_writes_past_the_end_as_in_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    let mut images = Vec::new();
    for which in Impl::all() {
        let (tag, image) = tagged_qcow2(dir.path(), which, "1M");
        let mnt = dir.path().join(format!("{tag}.mnt"));
        let daemon = fuse_daemon(which, dir.path(), &image, &mnt, ",writable=on,growable=on");
        let mut client = daemon.qmp().await;
        let mut answers = Vec::new();
        {
            let mut f = OpenOptions::new().write(true).open(&mnt).unwrap();
            f.seek(SeekFrom::Start(MIB + 4096)).unwrap();
            f.write_all(&[0xa5; 8192]).unwrap();
            f.sync_all().unwrap();
            answers.push(json!(f.metadata().unwrap().len()));
        }
        let info = reply(&mut client, "query-named-block-nodes", json!({})).await;
        let sizes: Vec<Value> = info["return"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["node-name"] == "d")
            .map(|n| n["image"]["virtual-size"].clone())
            .collect();
        answers.push(json!(sizes));
        daemon.quit(&mut client).await;
        seen.push(answers);
        images.push(image);
    }
    assert_eq!(seen[0], seen[1], "blockd, then qsd");
    assert_eq!(seen[0][0], json!(MIB + 4096 + 8192));
    qemu_img(&[
        "compare", "-f", "qcow2", "-F", "qcow2", &images[0], &images[1],
    ]);
    let out = qemu_io_outcome(&["-f", "qcow2", &images[0], "-c", "read -P 0xa5 1052672 8192"]);
    assert_eq!(out, "ok");
}

/// A mirror of a node exported as a fuse file: writes through the file during the job
/// reach the target, and after the pivot the file writes to the target. qsd refuses this
/// mirror (its writable fuse export holds the resize permission the job does not share);
/// blockd's export takes that permission only for the moment of a truncate.
#[tokio::test]
async fn the_export_follows_its_node_through_a_mirror_pivot() {
    let dir = tempfile::tempdir().unwrap();
    for which in [Impl::Blockd, Impl::Qsd] {
        let tag = format!("{which:?}").to_lowercase();
        let source = p(dir.path(), &format!("{tag}-source.qcow2"));
        let target = p(dir.path(), &format!("{tag}-target.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", &source, "4M"]);
        qemu_img(&["create", "-q", "-f", "qcow2", &target, "4M"]);
        let out =
            run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x11 0 1M", &source]));
        assert!(out.status.success());
        let mnt = dir.path().join(format!("{tag}.mnt"));
        let daemon = fuse_daemon(which, dir.path(), &source, &mnt, ",writable=on");
        let mut client = daemon.qmp().await;
        let r = reply(
            &mut client,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "t",
                      "file": {"driver": "file", "filename": target}}),
        )
        .await;
        assert!(r.get("return").is_some(), "{which:?}: {r}");
        let r = reply(
            &mut client,
            "blockdev-mirror",
            json!({"job-id": "j", "device": "d",
                      "target": "t", "sync": "full"}),
        )
        .await;
        if which == Impl::Qsd {
            let desc = r["error"]["desc"].as_str().unwrap_or_default();
            assert!(desc.contains("permissions 'resize'"), "{r}");
            daemon.quit(&mut client).await;
            continue;
        }
        assert!(r.get("return").is_some(), "{which:?}: {r}");
        let mut file = OpenOptions::new().write(true).open(&mnt).unwrap();
        file.seek(SeekFrom::Start(MIB)).unwrap();
        file.write_all(&vec![0x22; MIB as usize]).unwrap();
        file.sync_all().unwrap();
        client
            .wait_event("BLOCK_JOB_READY", WAIT)
            .await
            .expect("READY");
        let r = reply(&mut client, "block-job-complete", json!({"device": "j"})).await;
        assert!(r.get("return").is_some(), "{which:?}: {r}");
        client
            .wait_event("BLOCK_JOB_COMPLETED", WAIT)
            .await
            .expect("COMPLETED");
        file.seek(SeekFrom::Start(2 * MIB)).unwrap();
        file.write_all(&vec![0x33; MIB as usize]).unwrap();
        file.sync_all().unwrap();
        drop(file);
        // The export now serves the target.
        let exports = reply(&mut client, "query-block-exports", json!({})).await;
        assert_eq!(exports["return"][0]["node-name"], "t", "{exports}");
        daemon.quit(&mut client).await;
        for (image, range, pattern) in [
            (&target, "0 1M", "0x11"),
            (&target, "1M 1M", "0x22"),
            (&target, "2M 1M", "0x33"),
            (&source, "2M 1M", "0"),
        ] {
            let read = format!("read -P {pattern} {range}");
            let out = qemu_io_outcome(&["-f", "qcow2", image, "-c", &read]);
            assert_eq!(out, "ok", "{which:?}: {image} {read}");
        }
        qemu_img(&["check", &target]);
    }
}
