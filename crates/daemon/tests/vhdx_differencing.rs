//! Differencing vhdx images (which QEMU does not open): a child made from a qemu-img
//! image by giving it a parent locator, with blocks fully present, partially present
//! (a sector bitmap), zeroed, and absent (the parent's). No reader on this system
//! follows the spec for them (libvhdi 20210425's vhdimount reads the parent's data even
//! for fully present blocks), so the expected disk is worked out from the spec: blockd
//! must read it, write into each kind of block, and read the result back after a
//! restart, leaving the parent untouched; a parent that is not the one the child was
//! made from, and a missing one, are refused.

mod common;

use common::formats::export_to_raw;
use common::jobs::qemu_io;
use common::*;
use serde_json::{json, Value};
use std::path::Path;

const MIB: usize = 1 << 20;
const DISK: usize = 16 * MIB;
const BAT: usize = 2 * MIB;
const METADATA: usize = 3 * MIB;
const LOCATOR_AT: usize = 64 * 1024 + 1024;
/// The BAT index of the first chunk's sector bitmap (chunk ratio 4096 for 1 MiB blocks).
const BITMAP_ENTRY: usize = 4096;

/// A GUID as parent_linkage writes it, from its on-disk bytes (in lower case here;
/// blockd reads either).
fn guid_text(g: &[u8]) -> String {
    let d1 = u32::from_le_bytes(g[..4].try_into().unwrap());
    let d2 = u16::from_le_bytes(g[4..6].try_into().unwrap());
    let d3 = u16::from_le_bytes(g[6..8].try_into().unwrap());
    let hex: String = g[8..].iter().map(|b| format!("{b:02X}")).collect();
    format!("{{{d1:08X}-{d2:04X}-{d3:04X}-{}-{}}}", &hex[..4], &hex[4..])
}

/// The data write GUID of the image's current header (the higher sequence number).
fn data_write_guid(image: &[u8]) -> Vec<u8> {
    let seq = |at: usize| u64::from_le_bytes(image[at + 8..at + 16].try_into().unwrap());
    let at = if seq(0x10000) > seq(0x20000) {
        0x10000
    } else {
        0x20000
    };
    image[at + 32..at + 48].to_vec()
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// The parent locator item: VHDX's locator type, then key/value entries.
fn locator(entries: &[(&str, &str)]) -> Vec<u8> {
    let mut item = vec![
        0xB7, 0xEF, 0x4A, 0xB0, 0x9E, 0xD1, 0x81, 0x4A, 0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59,
        0x13, 0, 0,
    ];
    item.extend((entries.len() as u16).to_le_bytes());
    let mut text: Vec<u8> = Vec::new();
    let base = 20 + entries.len() * 12;
    for (key, value) in entries {
        let (k, v) = (utf16(key), utf16(value));
        let key_at = base + text.len();
        text.extend(&k);
        let value_at = base + text.len();
        text.extend(&v);
        item.extend((key_at as u32).to_le_bytes());
        item.extend((value_at as u32).to_le_bytes());
        item.extend((k.len() as u16).to_le_bytes());
        item.extend((v.len() as u16).to_le_bytes());
    }
    item.extend(text);
    item
}

/// `child` (a 1 MiB-block dynamic image with blocks 1-3 written) made the differencing
/// child of the parent whose data write GUID is `linkage`: block 2 partially present
/// (its first 512 KiB and sector 1500 its own), block 3 zeroed.
fn make_differencing(child: &mut Vec<u8>, linkage: &str) {
    let put = |image: &mut Vec<u8>, at: usize, bytes: &[u8]| {
        image[at..at + bytes.len()].copy_from_slice(bytes)
    };
    let table = METADATA;
    // File parameters: HasParent.
    let params = table + 64 * 1024;
    let flags = u32::from_le_bytes(child[params + 4..params + 8].try_into().unwrap());
    put(child, params + 4, &(flags | 2).to_le_bytes());
    let item = locator(&[
        ("parent_linkage", linkage),
        ("relative_path", ".\\base.vhdx"),
        ("absolute_win32_path", "C:\\nowhere\\base.vhdx"),
    ]);
    put(child, table + LOCATOR_AT, &item);
    let count = u16::from_le_bytes([child[table + 10], child[table + 11]]) as usize;
    let mut entry = vec![
        0x2D, 0x5F, 0xD3, 0xA8, 0x0B, 0xB3, 0x4D, 0x45, 0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB,
        0x0C,
    ];
    entry.extend((LOCATOR_AT as u32).to_le_bytes());
    entry.extend((item.len() as u32).to_le_bytes());
    entry.extend(4u32.to_le_bytes());
    entry.extend([0u8; 4]);
    put(child, table + 32 + count * 32, &entry);
    put(child, table + 10, &((count + 1) as u16).to_le_bytes());
    // A sector bitmap block at the end of the file.
    let bitmap_at = child.len().next_multiple_of(MIB);
    child.resize(bitmap_at + MIB, 0);
    let first = 2 * MIB / 512;
    for s in (first..first + 1024).chain([first + 1500]) {
        child[bitmap_at + s / 8] |= 1 << (s % 8);
    }
    let bat = |i: usize| BAT + i * 8;
    let block2 = u64::from_le_bytes(child[bat(2)..bat(2) + 8].try_into().unwrap());
    assert_eq!(block2 & 7, 6, "block 2 was written");
    put(child, bat(2), &(block2 & !7 | 7).to_le_bytes());
    put(child, bat(3), &2u64.to_le_bytes());
    put(
        child,
        bat(BITMAP_ENTRY),
        &(bitmap_at as u64 | 6).to_le_bytes(),
    );
}

/// The disk the child shows: the parent's 0x11 and 0x22 where the child holds nothing.
fn expected() -> Vec<u8> {
    let mut disk = vec![0x11u8; 8 * MIB];
    disk.resize(DISK, 0x22);
    disk[MIB..2 * MIB].fill(0x33);
    disk[2 * MIB..2 * MIB + 512 * 1024].fill(0x44);
    disk[2 * MIB + 1500 * 512..2 * MIB + 1501 * 512].fill(0x44);
    disk[3 * MIB..4 * MIB].fill(0);
    disk
}

/// Parent and child in `dir`; the child's bytes are returned for variants.
fn make_images(dir: &Path) -> Vec<u8> {
    let d = |n: &str| p(dir, n);
    // The child's blocks start absent (block_state_zero=off), not zeroed.
    for name in ["base.vhdx", "child.vhdx"] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M,block_state_zero=off",
            &d(name),
            "16M",
        ]);
    }
    qemu_io(&[
        "-f",
        "vhdx",
        &d("base.vhdx"),
        "-c",
        "write -P 0x11 0 8M",
        "-c",
        "write -P 0x22 8M 8M",
    ]);
    qemu_io(&[
        "-f",
        "vhdx",
        &d("child.vhdx"),
        "-c",
        "write -P 0x33 1M 1M",
        "-c",
        "write -P 0x44 2M 1M",
        "-c",
        "write -P 0x55 3M 1M",
    ]);
    let base = std::fs::read(d("base.vhdx")).unwrap();
    let mut child = std::fs::read(d("child.vhdx")).unwrap();
    make_differencing(
        &mut child,
        &guid_text(&data_write_guid(&base)).to_lowercase(),
    );
    std::fs::write(d("child.vhdx"), &child).unwrap();
    child
}

async fn add(client: &mut qmp::Client, node: &str, extra: Value) -> Value {
    let mut options = json!({"driver": "vhdx", "node-name": node,
                             "file": {"driver": "file", "filename": "child.vhdx"}});
    for (k, v) in extra.as_object().unwrap() {
        options[k] = v.clone();
    }
    reply(client, "blockdev-add", options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_differencing_image_reads_and_writes_as_the_spec_says() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| p(dir.path(), n);
    make_images(dir.path());
    let mut want = expected();
    let parent = std::fs::read(d("base.vhdx")).unwrap();
    let sock = dir.path().join("nbd.sock");
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &nbd_server_args(&sock));
    let mut client = daemon.qmp().await;
    let answer = add(&mut client, "child", json!({})).await;
    assert!(answer.get("return").is_some(), "{answer}");
    export_to_raw(&mut client, &sock, "child", &d("read.raw")).await;
    assert!(std::fs::read(d("read.raw")).unwrap() == want, "blockd");
    let nodes = client
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let child = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "child")
        .unwrap();
    assert_eq!(child["backing_file"], "base.vhdx", "{child}");
    assert_eq!(child["image"]["backing-filename-format"], "vhdx", "{child}");
    client
        .execute("block-export-del", json!({"id": "child"}))
        .await
        .unwrap();
    client
        .execute(
            "block-export-add",
            json!({"type": "nbd", "id": "rw", "name": "rw", "node-name": "child", "writable": true}),
        )
        .await
        .unwrap();
    // Into a block of the parent's, a partially present one, a whole parent block
    // zeroed, part of one zeroed, and a fully present one.
    let uri = format!("nbd+unix:///rw?socket={}", sock.display());
    qemu_io(&[
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0x66 512k 4k",
        "-c",
        "write -P 0x77 2816k 4k",
        "-c",
        "write -z 4M 1M",
        "-c",
        "write -z 5220k 8k",
        "-c",
        "write -P 0x88 1M 512",
    ]);
    want[512 * 1024..516 * 1024].fill(0x66);
    want[2816 * 1024..2820 * 1024].fill(0x77);
    want[4 * MIB..5 * MIB].fill(0);
    want[5220 * 1024..5228 * 1024].fill(0);
    want[MIB..MIB + 512].fill(0x88);
    export_to_raw(&mut client, &sock, "child", &d("written.raw")).await;
    assert!(
        std::fs::read(d("written.raw")).unwrap() == want,
        "blockd after writes"
    );
    daemon.quit(&mut client).await;
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &nbd_server_args(&sock));
    let mut client = daemon.qmp().await;
    let answer = add(&mut client, "again", json!({"read-only": true})).await;
    assert!(answer.get("return").is_some(), "{answer}");
    export_to_raw(&mut client, &sock, "again", &d("again.raw")).await;
    assert!(
        std::fs::read(d("again.raw")).unwrap() == want,
        "after a restart"
    );
    daemon.quit(&mut client).await;
    assert!(
        std::fs::read(d("base.vhdx")).unwrap() == parent,
        "the parent is untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_that_is_not_the_childs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| p(dir.path(), n);
    let child = make_images(dir.path());
    let sock = dir.path().join("nbd.sock");
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &nbd_server_args(&sock));
    let mut client = daemon.qmp().await;
    // Without its parent, the blocks the child does not hold read as zeroes.
    let answer = add(
        &mut client,
        "alone",
        json!({"backing": null, "read-only": true}),
    )
    .await;
    assert!(answer.get("return").is_some(), "{answer}");
    export_to_raw(&mut client, &sock, "alone", &d("alone.raw")).await;
    let mut want = expected();
    want[..MIB].fill(0);
    want[4 * MIB..].fill(0);
    want[2 * MIB + 512 * 1024..2 * MIB + 1500 * 512].fill(0);
    want[2 * MIB + 1501 * 512..3 * MIB].fill(0);
    assert!(
        std::fs::read(d("alone.raw")).unwrap() == want,
        "without a parent"
    );
    // The parent written since the child was made has a new data write GUID.
    qemu_io(&["-f", "vhdx", &d("base.vhdx"), "-c", "write -P 0x99 0 4k"]);
    let answer = add(&mut client, "changed", json!({"read-only": true})).await;
    let error = answer["error"]["desc"].as_str().unwrap_or_default();
    assert!(
        error.contains("is not the disk it was made from"),
        "{answer}"
    );
    std::fs::remove_file(d("base.vhdx")).unwrap();
    let answer = add(&mut client, "missing", json!({"read-only": true})).await;
    let error = answer["error"]["desc"].as_str().unwrap_or_default();
    assert!(error.starts_with("Could not open backing file"), "{answer}");
    // A dynamic image takes no backing file.
    std::fs::write(d("child.vhdx"), &child).unwrap();
    qemu_img(&["create", "-q", "-f", "vhdx", &d("plain.vhdx"), "16M"]);
    let answer = reply(
        &mut client,
        "blockdev-add",
        json!({"driver": "vhdx", "node-name": "plain", "backing": "alone",
               "file": {"driver": "file", "filename": "plain.vhdx"}}),
    )
    .await;
    assert!(answer.get("error").is_some(), "{answer}");
    daemon.quit(&mut client).await;
}
