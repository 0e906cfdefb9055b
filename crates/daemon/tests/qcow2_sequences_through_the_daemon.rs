//! Our qcow2 driver against QEMU's, through the daemon: the same random writes, zero writes
//! (allocating or unmapping), discards, internal snapshots taken and deleted, and resizes
//! go through blockd (I/O over an NBD export, the rest over QMP) onto one copy of an image,
//! and through qemu-io and qemu-img onto another. Both copies must check clean and read
//! alike, the active layer and every snapshot. The driver alone meets its own random
//! requests in `crates/block/tests/qcow2_differential.rs`; this one adds the daemon's paths
//! and snapshots deleted among the writes.

mod common;

use common::*;
use serde_json::json;
use std::path::Path;

/// A small deterministic generator (xorshift64*), so a failure names its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

#[derive(Debug)]
enum Op {
    /// qemu-io command on the disk (write, write -z, write -z -u, discard).
    Io(String),
    Snapshot(String),
    DeleteSnapshot(String),
    Grow(u64),
}

/// A sequence of `count` operations on a disk of `size` bytes.
fn operations(rng: &mut Rng, mut size: u64, count: usize) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut snapshots: Vec<String> = Vec::new();
    let mut taken = 0;
    for i in 0..count {
        let len = rng.pick(&[512u64, 4096, 65536, 100_352, 1 << 20, 3 << 20]);
        // Mostly sector-aligned; sometimes any byte.
        let at = if rng.below(5) == 0 {
            rng.below(size - len)
        } else {
            rng.below((size - len) / 512) * 512
        };
        // Every sequence takes a snapshot and grows the disk at least once.
        let kind = match i {
            12 => 16,
            24 => 19,
            _ => rng.below(20),
        };
        let op = match kind {
            0..=8 => Op::Io(format!("write -P {} {at} {len}", 1 + rng.below(250))),
            9..=10 => Op::Io(format!("write -z {at} {len}")),
            11..=12 => Op::Io(format!("write -z -u {at} {len}")),
            13..=15 => Op::Io(format!("discard {at} {len}")),
            16..=17 if snapshots.len() < 3 => {
                taken += 1;
                let name = format!("s{taken}");
                snapshots.push(name.clone());
                Op::Snapshot(name)
            }
            18 if !snapshots.is_empty() => {
                let i = rng.below(snapshots.len() as u64) as usize;
                Op::DeleteSnapshot(snapshots.remove(i))
            }
            19 => {
                size += (1 + rng.below(8)) << 20;
                Op::Grow(size)
            }
            _ => Op::Io(format!("write -P 7 {at} 4096")),
        };
        ops.push(op);
    }
    ops
}

/// The reference: qemu-io and qemu-img on `image`.
fn apply_with_qemu(image: &str, ops: &[Op]) {
    for op in ops {
        match op {
            Op::Io(command) => {
                let out = qemu_io_outcome(&["-d", "unmap", "-f", "qcow2", "-c", command, image]);
                assert_eq!(out, "ok", "qemu-io {command}");
            }
            Op::Snapshot(name) => {
                qemu_img(&["snapshot", "-c", name, image]);
            }
            Op::DeleteSnapshot(name) => {
                qemu_img(&["snapshot", "-d", name, image]);
            }
            Op::Grow(size) => {
                qemu_img(&["resize", "-q", "-f", "qcow2", image, &size.to_string()]);
            }
        }
    }
}

/// The same through one blockd: I/O over an NBD export, the rest over QMP.
async fn apply_with_blockd(dir: &Path, image: &str, ops: &[Op]) {
    let sock = dir.join("nbd.sock");
    let mut args = vec![
        s("--blockdev"),
        format!("driver=qcow2,node-name=d,discard=unmap,file.driver=file,file.filename={image}"),
    ];
    args.extend(nbd_server_args(&sock));
    let daemon = Daemon::start(Impl::Blockd, dir, &args);
    let mut c = daemon.qmp().await;
    let export = json!({"type": "nbd", "id": "e", "node-name": "d", "writable": true});
    c.execute("block-export-add", export.clone()).await.unwrap();
    let uri = format!("nbd+unix:///d?socket={}", sock.display());
    for op in ops {
        match op {
            Op::Io(command) => {
                let out = qemu_io_outcome(&["-f", "raw", "-c", command, &uri]);
                assert_eq!(out, "ok", "blockd: {command}");
            }
            Op::Snapshot(name) => {
                c.execute(
                    "blockdev-snapshot-internal-sync",
                    json!({"device": "d", "name": name}),
                )
                .await
                .unwrap();
            }
            Op::DeleteSnapshot(name) => {
                c.execute(
                    "blockdev-snapshot-delete-internal-sync",
                    json!({"device": "d", "name": name}),
                )
                .await
                .unwrap();
            }
            Op::Grow(size) => {
                // An export does not share resizing: it goes for the resize.
                delete_export_when_unused(&mut c, "e").await;
                c.execute("block_resize", json!({"node-name": "d", "size": size}))
                    .await
                    .unwrap();
                c.execute("block-export-add", export.clone()).await.unwrap();
            }
        }
    }
    delete_export_when_unused(&mut c, "e").await;
    daemon.quit(&mut c).await;
}

/// The snapshot names `qemu-img snapshot -l` lists, in order.
fn snapshot_names(image: &str) -> Vec<String> {
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", image])).unwrap();
    info["snapshots"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|s| s["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The image's content (or a snapshot's) as raw bytes.
fn content(dir: &Path, image: &str, snapshot: Option<&str>) -> Vec<u8> {
    let raw = p(dir, "content.raw");
    let mut args = vec!["convert", "-f", "qcow2", "-O", "raw"];
    let opt;
    if let Some(name) = snapshot {
        opt = format!("snapshot.name={name}");
        args.extend(["-l", &opt]);
    }
    args.extend([image, &raw]);
    qemu_img(&args);
    std::fs::read(&raw).unwrap()
}

async fn run_case(cluster: &str, extended_l2: bool, seed: u64) {
    let case = format!("cluster {cluster}, extended_l2 {extended_l2}, seed {seed}");
    let dir = tempfile::tempdir().unwrap();
    let ours = p(dir.path(), "ours.qcow2");
    let theirs = p(dir.path(), "theirs.qcow2");
    let opts = format!(
        "cluster_size={cluster},extended_l2={}",
        if extended_l2 { "on" } else { "off" }
    );
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, &ours, "32M"]);
    // A start with data in it, so discards and zero writes meet allocated clusters.
    let fill = ["write -P 3 0 5M", "write -P 4 12M 3M", "write -P 5 30M 2M"];
    for command in fill {
        assert_eq!(
            qemu_io_outcome(&["-f", "qcow2", "-c", command, &ours]),
            "ok"
        );
    }
    std::fs::copy(&ours, &theirs).unwrap();
    let ops = operations(&mut Rng(seed.wrapping_mul(0x9e37_79b9) | 1), 32 << 20, 36);
    apply_with_qemu(&theirs, &ops);
    apply_with_blockd(dir.path(), &ours, &ops).await;
    for image in [&ours, &theirs] {
        let check = qemu_img(&["check", "-f", "qcow2", image]);
        assert!(
            check.contains("No errors"),
            "{case}: {image}: {check}\n{ops:#?}"
        );
    }
    let names = snapshot_names(&ours);
    assert_eq!(names, snapshot_names(&theirs), "{case}: snapshots");
    for snapshot in std::iter::once(None).chain(names.iter().map(|n| Some(n.as_str()))) {
        let (a, b) = (
            content(dir.path(), &ours, snapshot),
            content(dir.path(), &theirs, snapshot),
        );
        assert_eq!(a.len(), b.len(), "{case}: size of {snapshot:?}");
        if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
            panic!("{case}: {snapshot:?} differs at byte {at}\n{ops:#?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sequences_match_qemu_64k_clusters() {
    for seed in 1..=3 {
        run_case("65536", false, seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sequences_match_qemu_small_and_large_clusters() {
    run_case("4096", false, 4).await;
    run_case("2M", false, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sequences_match_qemu_extended_l2() {
    for seed in 6..=7 {
        run_case("65536", true, seed).await;
    }
}
