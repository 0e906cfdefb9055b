//! The server judged by QEMU's own NBD client: qemu-io, qemu-img convert and map.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;

use common::*;
use nbd::{Capabilities, ExportOptions, MetaContext};

const MIB: u64 = 1024 * 1024;

#[test]
fn qemu_io_read_write_zero_discard_flush() {
    let fx = Fixture::new(0);
    let backend = Arc::new(MemBackend::new(8 * MIB));
    fx.export("disk", backend.clone());
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &fx.uri("disk"),
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "read -P 0xab 0 1M",
        "-c",
        "aio_write -P 0xcd 2M 512k",
        "-c",
        "aio_write -P 0xce 3M 64k",
        "-c",
        "aio_flush",
        "-c",
        "read -P 0xcd 2M 512k",
        "-c",
        "write -z 256k 128k",
        "-c",
        "read -P 0 256k 128k",
        "-c",
        "write -f -P 0x77 5M 4k",
        "-c",
        "discard 3M 64k",
        "-c",
        "flush",
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("Pattern verification failed"), "{stdout}");
    assert!(!stdout.contains("error"), "{stdout}");

    let data = backend.contents();
    let m = MIB as usize;
    assert!(data[..256 * 1024].iter().all(|&b| b == 0xab));
    assert!(data[256 * 1024..384 * 1024].iter().all(|&b| b == 0));
    assert!(data[384 * 1024..m].iter().all(|&b| b == 0xab));
    assert!(data[2 * m..2 * m + 512 * 1024].iter().all(|&b| b == 0xcd));
    assert!(data[5 * m..5 * m + 4096].iter().all(|&b| b == 0x77));
    // The discarded chunk is a hole again.
    let alloc = backend.status_map(&MetaContext::BaseAllocation);
    assert!(alloc
        .iter()
        .any(|&(o, l, f)| o <= 3 * MIB && o + l >= 3 * MIB + 65536 && f == 3));
    assert!(backend.flushes() >= 2);
}

#[test]
fn qemu_io_detects_bad_pattern() {
    // Guards the test above: a mismatching pattern must be reported.
    let fx = Fixture::new(0);
    fx.export("disk", Arc::new(MemBackend::new(MIB)));
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &fx.uri("disk"), "-c", "read -P 0x55 0 4k"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"));
}

#[test]
fn read_only_export_rejects_writes_with_eperm() {
    let fx = Fixture::new(0);
    let backend = Arc::new(MemBackend::new(MIB));
    fx.server
        .add_export("ro", None, backend.clone(), ExportOptions::default())
        .unwrap();
    // QEMU refuses a read-write open of a READ_ONLY export before sending anything; the
    // server's own EPERM answer to a write is checked with the crate's client.
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "raw", &fx.uri("ro"), "-c", "read -P 0 0 64k"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("failed"));
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &fx.uri("ro"), "-c", "write -P 1 0 64k"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Permission denied") || text.contains("Operation not permitted"),
        "{text}"
    );
    assert!(backend.contents().iter().all(|&b| b == 0));
}

#[test]
fn qemu_img_convert_to_and_from_export() {
    let fx = Fixture::new(0);
    let size = 4 * MIB;
    let backend = Arc::new(MemBackend::new(size));
    fx.export("disk", backend.clone());

    let src = fx.path("src.raw");
    let mut image = vec![0u8; size as usize];
    for (i, b) in image.iter_mut().enumerate().take(MIB as usize) {
        *b = (i % 251) as u8;
    }
    image[3 * MIB as usize..3 * MIB as usize + 4096].fill(0x5a);
    std::fs::write(&src, &image).unwrap();

    run(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &fx.uri("disk"),
    ]));
    assert_eq!(backend.contents(), image);

    let dst = fx.path("dst.qcow2");
    run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &fx.uri("disk"),
        dst.to_str().unwrap(),
    ]));
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ]));
}

#[derive(Debug, PartialEq)]
struct MapEntry {
    start: u64,
    length: u64,
    data: bool,
    zero: bool,
}

fn qemu_img_map(uri: &str) -> Vec<MapEntry> {
    let out = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", uri]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut entries: Vec<MapEntry> = Vec::new();
    for e in v.as_array().unwrap() {
        let entry = MapEntry {
            start: e["start"].as_u64().unwrap(),
            length: e["length"].as_u64().unwrap(),
            data: e["data"].as_bool().unwrap(),
            zero: e["zero"].as_bool().unwrap(),
        };
        match entries.last_mut() {
            Some(l) if l.data == entry.data && l.zero == entry.zero => l.length += entry.length,
            _ => entries.push(entry),
        }
    }
    entries
}

#[test]
fn qemu_img_map_matches_backend_allocation() {
    let fx = Fixture::new(0);
    let size = 4 * MIB;
    let backing: BTreeSet<u64> = [20, 21, 40].into_iter().collect();
    let backend = Arc::new(MemBackend::with(size, backing, Capabilities::default()));
    fx.export("disk", backend.clone());
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &fx.uri("disk"),
        "-c",
        "write -P 1 0 128k",
        "-c",
        "write -P 2 1M 64k",
        "-c",
        "write -z -u 2M 64k",
        "-c",
        "write -z 1088k 64k",
    ]));

    let expected: Vec<MapEntry> = {
        let mut v: Vec<MapEntry> = Vec::new();
        for (start, length, f) in backend.status_map(&MetaContext::BaseAllocation) {
            let e = MapEntry {
                start,
                length,
                data: f & 1 == 0,
                zero: f & 2 != 0,
            };
            match v.last_mut() {
                Some(l) if l.data == e.data && l.zero == e.zero => l.length += e.length,
                _ => v.push(e),
            }
        }
        v
    };
    assert!(expected.len() >= 5, "{expected:?}");
    assert_eq!(qemu_img_map(&fx.uri("disk")), expected);
}
