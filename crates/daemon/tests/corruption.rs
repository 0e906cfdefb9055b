//! Crafted qcow2 images whose tables point into other metadata or hold offsets no valid
//! image has: the request that meets it fails, BLOCK_IMAGE_CORRUPTED says what was found,
//! a writable image is marked corrupt and takes no further I/O, a read-only one goes on,
//! and the metadata is never overwritten. Both daemons, compared over NBD with qemu-io.

mod common;

use common::jobs::qemu_io;
use common::*;
use serde_json::{json, Value};

/// Where qemu-img lays out a 1 MiB image of 64 KiB clusters with its first cluster
/// written (checked by `base_image`).
const REFTABLE: u64 = 0x1_0000;
const REFBLOCK: u64 = 0x2_0000;
const L1: u64 = 0x3_0000;
const L2: u64 = 0x4_0000;
const DATA: u64 = 0x5_0000;
const COPIED: u64 = 1 << 63;

struct Case {
    name: &'static str,
    /// Bytes written over the base image.
    patch: (u64, Vec<u8>),
    io: &'static [&'static str],
    read_only: bool,
    /// Bytes of metadata that must come out unchanged.
    protected: (u64, u64),
}

fn be64(value: u64) -> Vec<u8> {
    value.to_be_bytes().to_vec()
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "data cluster on the L1 table",
            patch: (L2, be64(COPIED | L1)),
            io: &["write -P 0x22 0 4k", "read 64k 4k", "write -P 0x22 64k 4k"],
            read_only: false,
            protected: (L1, 16),
        },
        Case {
            name: "L2 table on the refcount table",
            patch: (L1, be64(COPIED | REFTABLE)),
            io: &["write -P 0x22 0 4k", "read 0 4k"],
            read_only: false,
            protected: (REFTABLE, 16),
        },
        Case {
            name: "data cluster on a refcount block",
            patch: (L2, be64(COPIED | REFBLOCK)),
            io: &["write -P 0x22 512 4k"],
            read_only: false,
            protected: (REFBLOCK, 16),
        },
        Case {
            name: "the header's refcount is 0",
            patch: (REFBLOCK, vec![0, 0]),
            io: &["write -P 0x22 128k 4k", "read 0 4k"],
            read_only: false,
            protected: (0, 72),
        },
        Case {
            name: "the L1 table's refcount is 0",
            patch: (REFBLOCK + 6, vec![0, 0]),
            io: &["write -P 0x22 128k 4k"],
            read_only: false,
            protected: (L1, 16),
        },
        Case {
            name: "unaligned data cluster",
            patch: (L2, be64(COPIED | DATA | 0x200)),
            io: &["read 0 4k", "read 64k 4k"],
            read_only: false,
            protected: (L2, 16),
        },
        Case {
            name: "unaligned L2 table",
            patch: (L1, be64(COPIED | L2 | 0x200)),
            io: &["read 0 4k"],
            read_only: false,
            protected: (L1, 16),
        },
        Case {
            name: "unaligned refcount block",
            patch: (REFTABLE, be64(REFBLOCK | 0x200)),
            io: &["write -P 0x22 128k 4k", "read 0 4k"],
            read_only: false,
            protected: (REFTABLE, 16),
        },
        Case {
            name: "unaligned data cluster, read-only",
            patch: (L2, be64(COPIED | DATA | 0x200)),
            io: &["read 0 4k", "read 0 4k", "read 64k 4k"],
            read_only: true,
            protected: (L2, 16),
        },
    ]
}

/// The base image with `patch` applied, in `dir`.
fn base_image(dir: &std::path::Path, patch: &(u64, Vec<u8>)) -> String {
    let disk = p(dir, "disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &disk, "1M"]);
    qemu_io(&["-f", "qcow2", &disk, "-c", "write -P 0x11 0 64k"]);
    let map = qemu_img(&["map", "--output=json", &disk]);
    assert!(
        map.contains(&format!("\"offset\": {DATA}")),
        "qemu-img laid the image out differently: {map}"
    );
    let mut bytes = std::fs::read(&disk).unwrap();
    let at = patch.0 as usize;
    bytes[at..at + patch.1.len()].copy_from_slice(&patch.1);
    std::fs::write(&disk, bytes).unwrap();
    disk
}

struct Outcome {
    /// What each qemu-io command did: "ok" or its error line.
    io: Vec<String>,
    events: Vec<Value>,
    /// The image's corrupt bit afterwards.
    marked: bool,
}

async fn run_case(which: Impl, case: &Case) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let disk = base_image(dir.path(), &case.patch);
    let (at, len) = case.protected;
    let before = std::fs::read(&disk).unwrap()[at as usize..(at + len) as usize].to_vec();
    let sock = dir.path().join("nbd.sock");
    let daemon = Daemon::start(which, dir.path(), &nbd_server_args(&sock));
    let mut client = daemon.qmp().await;
    let added = reply(
        &mut client,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "disk0", "read-only": case.read_only,
               "file": {"driver": "file", "filename": disk}}),
    )
    .await;
    assert_eq!(added, json!({"return": {}}), "{which:?} {}", case.name);
    client
        .execute(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "disk0",
                   "writable": !case.read_only}),
        )
        .await
        .unwrap();
    let uri = format!("nbd+unix:///disk0?socket={}", sock.display());
    let read_only = case.read_only.then_some("-r");
    let io = case
        .io
        .iter()
        .map(|command| {
            let args: Vec<&str> = read_only
                .into_iter()
                .chain(["-f", "raw", &uri, "-c", command])
                .collect();
            qemu_io_outcome(&args)
        })
        .collect();
    client.execute("query-version", json!({})).await.unwrap();
    let events = client
        .drain_events()
        .into_iter()
        .filter(|e| e["event"] == "BLOCK_IMAGE_CORRUPTED")
        .map(|e| e["data"].clone())
        .collect();
    daemon.quit(&mut client).await;
    let after = std::fs::read(&disk).unwrap()[at as usize..(at + len) as usize].to_vec();
    assert_eq!(
        before, after,
        "{which:?} {}: metadata overwritten",
        case.name
    );
    let info: Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", "-U", &disk])).unwrap();
    let marked = info["format-specific"]["data"]["corrupt"] == json!(true);
    Outcome { io, events, marked }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_metadata_is_reported_and_never_overwritten_as_by_qsd() {
    for case in cases() {
        let mut all = Vec::new();
        for which in Impl::all() {
            all.push(run_case(which, &case).await);
        }
        let (ours, theirs) = (&all[0], &all[1]);
        assert_eq!(ours.io, theirs.io, "{}: qemu-io outcomes", case.name);
        assert_eq!(ours.events, theirs.events, "{}: events", case.name);
        assert_eq!(ours.marked, theirs.marked, "{}: corrupt bit", case.name);
        // The cases are made to be caught: one event, and a mark when writable.
        assert_eq!(ours.events.len(), 1, "{}: {:?}", case.name, ours.events);
        assert_eq!(ours.marked, !case.read_only, "{}", case.name);
        assert!(
            ours.io.iter().any(|o| o != "ok"),
            "{}: nothing failed",
            case.name
        );
    }
}

/// An image marked corrupt opens read-only only, with qsd's text for a writable open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_marked_corrupt_opens_read_only_only() {
    let mut replies = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let disk = base_image(dir.path(), &(L2, be64(COPIED | L1)));
        let mut bytes = std::fs::read(&disk).unwrap();
        bytes[79] |= 2;
        std::fs::write(&disk, bytes).unwrap();
        let daemon = Daemon::start(which, dir.path(), &[]);
        let mut client = daemon.qmp().await;
        let mut got = Vec::new();
        for (name, read_only) in [("rw", false), ("ro", true)] {
            let r = reply(
                &mut client,
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": name, "read-only": read_only,
                       "file": {"driver": "file", "filename": disk}}),
            )
            .await;
            got.push(normalize(r));
        }
        daemon.quit(&mut client).await;
        replies.push(got);
    }
    assert_eq!(replies[0], replies[1]);
    assert_eq!(
        replies[0][0]["error"]["desc"],
        json!("qcow2: Image is corrupt; cannot be opened read/write")
    );
    assert_eq!(replies[0][1], json!({"return": {}}));
}
