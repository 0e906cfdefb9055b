//! Reads through the qcow2 driver return what qemu-img reads from the same image, for every
//! kind of cluster (data in this layer or the backing file, zero, unallocated, compressed,
//! partial) and for requests inside one cluster or spanning several kinds, with zlib and
//! with zstd compressed clusters.

mod common;

use common::{run, Setup};

const KIB: u64 = 1024;
const SIZE: u64 = 4096 * KIB;

#[test]
fn reads_match_qemu_for_every_kind_of_cluster() {
    reads_match_qemu("zlib");
}

/// The same on an image with extended L2 entries (32 subclusters per cluster): the
/// partial writes and zero writes leave clusters whose subclusters are allocated, zero and
/// unallocated side by side.
#[test]
fn reads_match_qemu_with_subclusters() {
    reads_match_qemu("zlib,extended_l2=on");
}

/// The same with the compressed cluster stored as a zstd frame.
#[test]
fn reads_match_qemu_with_zstd_compressed_clusters() {
    reads_match_qemu("zstd");
}

fn reads_match_qemu(compression: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (base, top, flat) = (path("base.qcow2"), path("top.qcow2"), path("flat.raw"));

    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &base, &SIZE.to_string()],
    );
    run("qemu-io", &["-c", "write -P 0x11 0 256k", &base]);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("compression_type={compression}"),
            "-b",
            &base,
            "-F",
            "qcow2",
            &top,
        ],
    );
    for cmd in [
        "write -P 0x22 64k 64k",
        "write -z 128k 64k",
        "write -P 0x33 200k 4k",
        "write -c -P 0x44 512k 64k",
        "write -P 0x55 1020k 8k",
    ] {
        run("qemu-io", &["-c", cmd, &top]);
    }
    run("qemu-img", &["convert", "-O", "raw", &top, &flat]);
    let expected = std::fs::read(&flat).unwrap();

    let requests: Vec<(u64, u64)> = vec![
        (0, 4 * KIB),              // backing data
        (64 * KIB + 100, 3000),    // top data, unaligned
        (60 * KIB, 8 * KIB),       // backing into top
        (128 * KIB, 64 * KIB),     // zero cluster
        (130 * KIB, 4 * KIB),      // inside the zero cluster
        (200 * KIB, 4 * KIB),      // partial cluster over backing data
        (196 * KIB, 16 * KIB),     // around it
        (516 * KIB, 4 * KIB),      // compressed
        (300 * KIB, 8 * KIB),      // unallocated everywhere
        (1016 * KIB, 16 * KIB),    // a write across two clusters
        (0, 1024 * KIB),           // everything at once
        (SIZE - 4 * KIB, 4 * KIB), // the last block
    ];
    let setup = Setup::open(&top, true);
    let got = setup.on_node(move |node| async move {
        let mut out = Vec::new();
        for (offset, len) in requests {
            let mut buf = vec![0xeeu8; len as usize];
            node.read(offset, &mut buf).await.unwrap();
            let mut told = vec![0xeeu8; len as usize];
            let zero = node.read_or_zero(offset, &mut told).await.unwrap();
            out.push((offset, buf, zero.map(|z| (z, told))));
        }
        out
    });
    setup.close();
    let mut told_count = 0;
    for (offset, buf, told) in got {
        let want = &expected[offset as usize..offset as usize + buf.len()];
        assert!(
            buf == want,
            "read of {} bytes at {offset} differs from qemu-img's",
            buf.len()
        );
        if let Some((zero, told)) = told {
            told_count += 1;
            assert!(
                told == want,
                "read_or_zero at {offset} differs from qemu-img's"
            );
            assert_eq!(zero, want.iter().all(|&b| b == 0), "zero flag at {offset}");
        }
    }
    // Reads within one mapping of the top layer tell (its data, its zero cluster); those
    // that reach the backing file, span mappings or hit a compressed cluster do not.
    assert!(told_count >= 4, "only {told_count} reads told their zeroes");

    // Without a backing file, an unallocated cluster tells that it reads as zeroes.
    let setup = Setup::open(&base, true);
    let told = setup.on_node(|node| async move {
        let mut buf = vec![0xeeu8; 4096];
        let zero = node.read_or_zero(300 * KIB, &mut buf).await.unwrap();
        (zero, buf.iter().all(|&b| b == 0))
    });
    setup.close();
    assert_eq!(told, (Some(true), true));
}
