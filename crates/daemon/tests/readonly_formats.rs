//! The read-only formats, bochs and cloop, on both daemons: images built here byte by
//! byte (qemu-img cannot make them) read through NBD the same on both and as built;
//! a writable open and crafted headers get qsd's refusals.

mod common;

use common::formats::{export_to_raw, patched};
use common::*;
use serde_json::{json, Value};
use std::io::Write;

/// A 1 MiB bochs disk of 64 KiB extents: extent 0 holds sectors 0..10 (0x11), extent 3
/// holds every sector (0x33); the rest was never written.
fn bochs_image() -> (Vec<u8>, Vec<u8>) {
    let (extent, catalog) = (65536usize, 16usize);
    let mut image = vec![0u8; 512];
    image[..22].copy_from_slice(b"Bochs Virtual HD Image");
    image[32..39].copy_from_slice(b"Redolog");
    image[48..55].copy_from_slice(b"Growing");
    for (at, v) in [
        (64, 0x20000u32),
        (68, 512),
        (72, catalog as u32),
        (76, 512),
        (80, extent as u32),
    ] {
        image[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    image[88..96].copy_from_slice(&((catalog * extent) as u64).to_le_bytes());
    let mut entries = vec![0xffff_ffffu32; catalog];
    entries[0] = 0;
    entries[3] = 1;
    image.extend(entries.iter().flat_map(|e| e.to_le_bytes()));
    let mut expected = vec![0u8; catalog * extent];
    for (sectors, fill, disk_extent) in [(10usize, 0x11u8, 0usize), (128, 0x33, 3)] {
        let mut bitmap = vec![0u8; 512];
        for s in 0..sectors {
            bitmap[s / 8] |= 1 << (s % 8);
        }
        image.extend(bitmap);
        let mut data = vec![0x77u8; extent];
        data[..sectors * 512].fill(fill);
        image.extend(&data);
        expected[disk_extent * extent..disk_extent * extent + sectors * 512].fill(fill);
    }
    (image, expected)
}

/// A cloop image of four 64 KiB blocks, each one byte repeated.
fn cloop_image() -> (Vec<u8>, Vec<u8>) {
    let block = 65536usize;
    let mut image = b"#!/bin/sh\n#V2.0 Format\n".to_vec();
    image.resize(128, 0);
    image.extend(&(block as u32).to_be_bytes());
    image.extend(&4u32.to_be_bytes());
    let mut blocks = Vec::new();
    let mut expected = Vec::new();
    for i in 0..4u8 {
        let data = vec![0x40 + i; block];
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&data).unwrap();
        blocks.push(z.finish().unwrap());
        expected.extend(data);
    }
    let mut offset = (136 + 5 * 8) as u64;
    let mut offsets = vec![offset];
    for b in &blocks {
        offset += b.len() as u64;
        offsets.push(offset);
    }
    image.extend(offsets.iter().flat_map(|o| o.to_be_bytes()));
    for b in blocks {
        image.extend(b);
    }
    (image, expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bochs_and_cloop_images_read_as_in_qsd() {
    let (bochs, bochs_expected) = bochs_image();
    let (cloop, cloop_expected) = cloop_image();
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = |n: &str| p(dir.path(), n);
        let cases: Vec<(&str, &str, Vec<u8>)> = vec![
            ("bochs", "disk.bochs", bochs.clone()),
            ("cloop", "disk.cloop", cloop.clone()),
            (
                "bochs",
                "magic.bochs",
                patched(&bochs, 0, b"Bochs Virtual HD Imagf"),
            ),
            (
                "bochs",
                "version.bochs",
                patched(&bochs, 64, &3u32.to_le_bytes()),
            ),
            (
                "bochs",
                "catalog.bochs",
                patched(&bochs, 72, &(1u32 << 30).to_le_bytes()),
            ),
            (
                "bochs",
                "extent.bochs",
                patched(&bochs, 80, &1000u32.to_le_bytes()),
            ),
            (
                "cloop",
                "blocksize.cloop",
                patched(&cloop, 128, &1000u32.to_be_bytes()),
            ),
            (
                "cloop",
                "bigblock.cloop",
                patched(&cloop, 128, &(128u32 << 20).to_be_bytes()),
            ),
            (
                "cloop",
                "blocks.cloop",
                patched(&cloop, 132, &u32::MAX.to_be_bytes()),
            ),
            (
                "cloop",
                "order.cloop",
                patched(&cloop, 136 + 16, &1u64.to_be_bytes()),
            ),
        ];
        let sock = dir.path().join("nbd.sock");
        let daemon = Daemon::start(which, dir.path(), &nbd_server_args(&sock));
        let mut client = daemon.qmp().await;
        let mut seen = Vec::new();
        for (driver, file, bytes) in cases {
            std::fs::write(d(file), bytes).unwrap();
            let node = file.replace('.', "-");
            let answer = reply(
                &mut client,
                "blockdev-add",
                json!({"driver": driver, "node-name": node, "read-only": true,
                       "file": {"driver": "file", "filename": file}}),
            )
            .await;
            seen.push(json!({file: answer}));
        }
        // A writable open of a read-only format.
        let writable = reply(
            &mut client,
            "blockdev-add",
            json!({"driver": "bochs", "node-name": "w",
                   "file": {"driver": "file", "filename": "disk.bochs"}}),
        )
        .await;
        seen.push(json!({"writable": writable}));
        for (node, expected) in [
            ("disk-bochs", &bochs_expected),
            ("disk-cloop", &cloop_expected),
        ] {
            let out = d(&format!("{node}.raw"));
            export_to_raw(&mut client, &sock, node, &out).await;
            assert!(
                std::fs::read(&out).unwrap() == *expected,
                "{which:?} {node}"
            );
        }
        daemon.quit(&mut client).await;
        all.push(normalize(Value::Array(seen)));
    }
    assert_eq!(
        first_difference(&all[0], &all[1]),
        None,
        "{:#}\n{:#}",
        all[0],
        all[1]
    );
}
