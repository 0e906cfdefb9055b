//! Freed qcow2 clusters reaching the image file as discards (`pass-discard-request`,
//! `pass-discard-snapshot`, the nodes' `discard` options and the default a format's file
//! takes), judged by how much of the file stays allocated on disk, on both daemons.

mod common;

use common::jobs::qemu_io;
use common::*;
use serde_json::json;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// Bytes the file takes on disk.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// A guest discard of 4 MiB of data through NBD, and a snapshot deleted after its clusters
/// were overwritten: how much the image file shrank each time.
async fn shrinkage(which: Impl, options: &str) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let path = image.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", path, "16M"]);
    qemu_io(&["-f", "qcow2", path, "-c", "write -P 0x11 0 8M"]);
    qemu_img(&["snapshot", "-c", "before", path]);
    let sock = dir.path().join("nbd.sock");
    let mut args = nbd_server_args(&sock);
    args.extend([
        s("--blockdev"),
        format!("driver=qcow2,node-name=disk0,file.driver=file,file.filename={path}{options}"),
        s("--export"),
        s("type=nbd,id=e0,node-name=disk0,name=disk0,writable=on"),
    ]);
    let daemon = Daemon::start(which, dir.path(), &args);
    let mut client = daemon.qmp().await;
    let uri = format!("nbd+unix:///disk0?socket={}", sock.display());
    // The snapshot shares 0-8M: the discard of 0-4M only frees clusters once it is gone, so
    // first overwrite 4-8M (new clusters; the old ones are the snapshot's alone).
    qemu_io(&["-f", "raw", &uri, "-c", "write -P 0x22 4M 4M"]);
    client
        .execute(
            "blockdev-snapshot-delete-internal-sync",
            json!({"device": "disk0", "name": "before"}),
        )
        .await
        .unwrap();
    client.execute("query-block", json!({})).await.unwrap();
    let after_snapshot = allocated(&image);
    qemu_io(&["-f", "raw", &uri, "-c", "discard 0 4M"]);
    // The frees reach the refcounts at the next flush.
    qemu_io(&["-f", "raw", &uri, "-c", "flush"]);
    let after_discard = allocated(&image);
    daemon.quit(&mut client).await;
    qemu_img(&["check", "-q", path]);
    // Without discard=unmap of its own the qcow2 node drops the guest's discard.
    let kept = if options.contains(",discard=unmap") {
        "read -P 0 0 4M"
    } else {
        "read -P 0x11 0 4M"
    };
    qemu_io(&["-f", "qcow2", path, "-c", kept, "-c", "read -P 0x22 4M 4M"]);
    let before = {
        // What the file held before the daemon ran: the same image made again.
        let again = dir.path().join("again.qcow2");
        let again = again.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", again, "16M"]);
        qemu_io(&["-f", "qcow2", again, "-c", "write -P 0x11 0 8M"]);
        qemu_img(&["snapshot", "-c", "before", again]);
        qemu_io(&["-f", "qcow2", again, "-c", "write -P 0x22 4M 4M"]);
        allocated(Path::new(again))
    };
    (
        before.saturating_sub(after_snapshot),
        after_snapshot.saturating_sub(after_discard),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freed_clusters_reach_the_file_as_the_options_say() {
    let cases = [
        // A format's file defaults to discard=unmap (QEMU's rule): a deleted snapshot's
        // clusters are discarded; the qcow2 node itself drops the guest's discard.
        ("", true, false),
        (",discard=unmap", true, true),
        (",discard=unmap,pass-discard-request=off", true, false),
        (",discard=unmap,pass-discard-snapshot=off", false, true),
        // The qcow2 node passes discards on, its file drops them.
        (",discard=unmap,file.discard=ignore", false, false),
        // Only the file has discard=unmap: the qcow2 node drops guest discards itself.
        (",pass-discard-request=on,file.discard=unmap", true, false),
    ];
    for which in Impl::all() {
        for (options, snapshot_shrinks, discard_shrinks) in cases {
            let (snapshot, discard) = shrinkage(which, options).await;
            let shrank = |bytes: u64| bytes >= 3 * MIB;
            assert_eq!(
                (shrank(snapshot), shrank(discard)),
                (snapshot_shrinks, discard_shrinks),
                "{which:?} {options:?}: snapshot delete freed {snapshot} bytes on disk, discard {discard}"
            );
        }
    }
}

/// The host offset qemu-img map gives guest offset 0.
fn offset_of_zero(path: &str) -> Option<u64> {
    let map: serde_json::Value =
        serde_json::from_str(&qemu_img(&["map", "--output=json", path])).unwrap();
    map[0]["offset"].as_u64()
}

/// discard-no-unref: a discarded range reads as zeroes, its data is discarded in the file,
/// and its clusters stay the image's: written again, the data lands where it was, on both
/// daemons.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_no_unref_keeps_the_clusters() {
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.qcow2");
        let path = image.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", path, "16M"]);
        qemu_io(&["-f", "qcow2", path, "-c", "write -P 0x11 0 4M"]);
        let before = offset_of_zero(path).expect("allocated");
        let sock = dir.path().join("nbd.sock");
        let mut args = nbd_server_args(&sock);
        args.extend([
            s("--blockdev"),
            format!("driver=qcow2,node-name=disk0,discard=unmap,discard-no-unref=on,file.driver=file,file.filename={path}"),
            s("--export"),
            s("type=nbd,id=e0,node-name=disk0,name=disk0,writable=on"),
        ]);
        let daemon = Daemon::start(which, dir.path(), &args);
        let mut client = daemon.qmp().await;
        let uri = format!("nbd+unix:///disk0?socket={}", sock.display());
        let full = allocated(&image);
        qemu_io(&["-f", "raw", &uri, "-c", "discard 0 4M", "-c", "flush"]);
        let discarded = allocated(&image);
        qemu_io(&[
            "-f",
            "raw",
            &uri,
            "-c",
            "read -P 0 0 4M",
            "-c",
            "write -P 0x22 0 4M",
        ]);
        daemon.quit(&mut client).await;
        assert!(
            full.saturating_sub(discarded) >= 3 * MIB,
            "{which:?}: the file kept the data ({full} -> {discarded} bytes)"
        );
        qemu_img(&["check", "-q", path]);
        qemu_io(&["-f", "qcow2", path, "-c", "read -P 0x22 0 4M"]);
        assert_eq!(
            offset_of_zero(path),
            Some(before),
            "{which:?}: the cluster moved"
        );
    }
}
