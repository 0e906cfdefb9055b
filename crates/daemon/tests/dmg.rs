//! The dmg driver against the reference: UDIF images built here byte by byte, with their
//! chunk tables in an XML property list and in a binary resource fork, read through each
//! daemon's NBD export and by `qemu-img convert`, and must hold what was written. bzip2
//! chunks (which qsd reads only with its dmg-bz2 module, absent here) are checked against
//! `dmg2img`. Crafted trailers and tables get qsd's refusals.

mod common;

use base64::Engine;
use common::formats::{export_to_raw, patched};
use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};

const ZERO: u32 = 0;
const RAW: u32 = 1;
const IGNORE: u32 = 2;
const ADC: u32 = 0x8000_0004;
const ZLIB: u32 = 0x8000_0005;
const BZIP2: u32 = 0x8000_0006;
const COMMENT: u32 = 0x7fff_fffe;
const LAST: u32 = 0xffff_ffff;

/// One mish block: its first sector, where its chunks' offsets start in the data fork,
/// and its chunk entries (type, sector, sectors, offset, length).
fn mish(first: u64, data_start: u64, entries: &[(u32, u64, u64, u64, u64)]) -> Vec<u8> {
    let mut b = vec![0u8; 204];
    b[..4].copy_from_slice(b"mish");
    b[4..8].copy_from_slice(&1u32.to_be_bytes());
    b[8..16].copy_from_slice(&first.to_be_bytes());
    let sectors: u64 = entries.iter().map(|e| e.2).sum();
    b[16..24].copy_from_slice(&sectors.to_be_bytes());
    b[24..32].copy_from_slice(&data_start.to_be_bytes());
    b[200..204].copy_from_slice(&(entries.len() as u32).to_be_bytes());
    for &(kind, sector, count, offset, length) in entries {
        b.extend(kind.to_be_bytes());
        b.extend([0u8; 4]);
        for v in [sector, count, offset, length] {
            b.extend(v.to_be_bytes());
        }
    }
    b
}

/// The property list as Apple writes it (and as dmg2img insists: a blkx array of dicts
/// with a Name after each Data), with one more resource that is not a mish block.
fn plist(blocks: &[Vec<u8>]) -> Vec<u8> {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut s = String::from(concat!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n",
        "<plist version=\"1.0\">\n<dict>\n<key>resource-fork</key>\n<dict>\n",
        "<key>blkx</key>\n<array>\n"
    ));
    for (i, block) in blocks.iter().enumerate() {
        // Base64 broken into lines with tabs, as in real images.
        let text = b64(block);
        let lines: Vec<&str> = text
            .as_bytes()
            .chunks(52)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        s += &format!(
            "<dict>\n<key>Data</key>\n<data>\n\t{}\n</data>\n<key>Name</key>\n<string>part {i}</string>\n</dict>\n",
            lines.join("\n\t")
        );
    }
    s += &format!(
        "</array>\n<key>plst</key>\n<array>\n<dict>\n<key>Data</key>\n<data>{}</data>\n<key>Name</key>\n<string></string>\n</dict>\n</array>\n</dict>\n</dict>\n</plist>\n",
        b64(b"not a mish block, skipped")
    );
    s.into_bytes()
}

/// A resource fork: a 16-byte header, its data at 256, each resource led by its length.
fn resource_fork(blocks: &[Vec<u8>]) -> Vec<u8> {
    let mut data = Vec::new();
    for b in blocks.iter().chain([&b"plst resource".to_vec()]) {
        data.extend((b.len() as u32).to_be_bytes());
        data.extend(b);
    }
    let mut fork = vec![0u8; 256];
    fork[0..4].copy_from_slice(&256u32.to_be_bytes());
    fork[4..8].copy_from_slice(&((256 + data.len()) as u32).to_be_bytes());
    fork[8..12].copy_from_slice(&(data.len() as u32).to_be_bytes());
    fork.extend(data);
    fork
}

#[derive(Clone, Copy)]
enum Tables {
    Xml,
    ResourceFork,
}

/// A whole image: `lead` bytes, the data fork, the tables, and the trailer.
fn udif(lead: usize, data: &[u8], blocks: &[Vec<u8>], tables: Tables, sectors: u64) -> Vec<u8> {
    let mut image = vec![0x5au8; lead];
    image.extend(data);
    let table_at = image.len() as u64;
    let bytes = match tables {
        Tables::Xml => plist(blocks),
        Tables::ResourceFork => resource_fork(blocks),
    };
    image.extend(&bytes);
    let mut koly = vec![0u8; 512];
    koly[..4].copy_from_slice(b"koly");
    koly[4..8].copy_from_slice(&4u32.to_be_bytes());
    koly[8..12].copy_from_slice(&512u32.to_be_bytes());
    let (rsrc, xml) = match tables {
        Tables::Xml => ((0, 0), (table_at, bytes.len() as u64)),
        Tables::ResourceFork => ((table_at, bytes.len() as u64), (0, 0)),
    };
    for (at, v) in [
        (0x18, lead as u64),
        (0x20, data.len() as u64),
        (0x28, rsrc.0),
        (0x30, rsrc.1),
        (0xd8, xml.0),
        (0xe0, xml.1),
        (0x1ec, sectors),
    ] {
        koly[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }
    image.extend(koly);
    image
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i / 512) as u8 ^ (i as u8).wrapping_mul(seed))
        .collect()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(data).unwrap();
    z.finish().unwrap()
}

/// bzip2 from the bzip2 tool, so the streams are the reference's own.
fn bzip2(data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("bzip2")
        .args(["-c", "-9"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", missing_peer("bzip2")));
    let mut stdin = child.stdin.take().unwrap();
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// Two mish blocks over 6160 sectors: zlib, raw and zero chunks, a comment; then (its
/// sectors and data offsets relative to the block's own start) an ignored run, raw and
/// zlib. Returns the data fork, the blocks, and the disk's bytes.
fn content() -> (Vec<u8>, Vec<Vec<u8>>, Vec<u8>) {
    let first = pattern(1 << 20, 3);
    let raw = pattern(4096, 5);
    let second = pattern(1 << 20, 7);
    let raw2 = pattern(4096, 11);
    let z1 = zlib(&first);
    let z2 = zlib(&second);
    let mut data = z1.clone();
    data.extend(&raw);
    let a = mish(
        0,
        0,
        &[
            (ZLIB, 0, 2048, 0, z1.len() as u64),
            (RAW, 2048, 8, z1.len() as u64, 4096),
            (COMMENT, 2056, 0, 0, 0),
            (ZERO, 2056, 2040, 0, 0),
            (LAST, 4096, 0, 0, 0),
        ],
    );
    let b_start = data.len() as u64;
    data.extend(&raw2);
    data.extend(&z2);
    let b = mish(
        4096,
        b_start,
        &[
            (IGNORE, 0, 8, 0, 0),
            (RAW, 8, 8, 0, 4096),
            (ZLIB, 16, 2048, 4096, z2.len() as u64),
            (LAST, 2064, 0, 0, 0),
        ],
    );
    let mut expected = first;
    expected.extend(&raw);
    expected.resize(4096 * 512 + 8 * 512, 0);
    expected.extend(&raw2);
    expected.extend(&second);
    (data, vec![a, b], expected)
}

async fn add(client: &mut qmp::Client, node: &str, file: &str, read_only: bool) -> Value {
    reply(
        client,
        "blockdev-add",
        json!({"driver": "dmg", "node-name": node, "read-only": read_only,
               "file": {"driver": "file", "filename": file}}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmg_images_read_as_in_qsd_with_either_kind_of_chunk_table() {
    let (data, blocks, expected) = content();
    let sectors = (expected.len() / 512) as u64;
    let xml = udif(512, &data, &blocks, Tables::Xml, sectors);
    let rsrc = udif(512, &data, &blocks, Tables::ResourceFork, sectors);
    assert!(
        !xml.len().is_multiple_of(512),
        "the trailer should not be sector-aligned"
    );
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = |n: &str| p(dir.path(), n);
        std::fs::write(d("xml.dmg"), &xml).unwrap();
        std::fs::write(d("rsrc.dmg"), &rsrc).unwrap();
        // The reference reads the images as built.
        for name in ["xml", "rsrc"] {
            let out = d(&format!("{name}.qemu-img.raw"));
            qemu_img(&[
                "convert",
                "-f",
                "dmg",
                "-O",
                "raw",
                &d(&format!("{name}.dmg")),
                &out,
            ]);
            assert!(std::fs::read(&out).unwrap() == expected, "qemu-img {name}");
        }
        let sock = dir.path().join("nbd.sock");
        let daemon = Daemon::start(which, dir.path(), &nbd_server_args(&sock));
        let mut client = daemon.qmp().await;
        for name in ["xml", "rsrc"] {
            let answer = add(&mut client, name, &format!("{name}.dmg"), true).await;
            assert!(answer.get("return").is_some(), "{which:?} {name}: {answer}");
            let out = d(&format!("{name}.raw"));
            export_to_raw(&mut client, &sock, name, &out).await;
            assert!(std::fs::read(&out).unwrap() == expected, "{which:?} {name}");
        }
        let info = client
            .execute("query-named-block-nodes", json!({"flat": true}))
            .await
            .unwrap();
        let node = info
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == "xml")
            .unwrap();
        assert_eq!(node["drv"], "dmg");
        assert_eq!(node["ro"], true);
        assert_eq!(node["image"]["virtual-size"], expected.len() as u64);
        daemon.quit(&mut client).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bzip2_chunks_read_as_dmg2img_reads_them() {
    let one = pattern(128 << 10, 13);
    let raw = pattern(4096, 17);
    let two = pattern(128 << 10, 19);
    let (b1, b2) = (bzip2(&one), bzip2(&two));
    let mut data = b1.clone();
    data.extend(&raw);
    data.extend(&b2);
    let block = mish(
        0,
        0,
        &[
            (BZIP2, 0, 256, 0, b1.len() as u64),
            (RAW, 256, 8, b1.len() as u64, 4096),
            (ZERO, 264, 248, 0, 0),
            (BZIP2, 512, 256, b1.len() as u64 + 4096, b2.len() as u64),
            (LAST, 768, 0, 0, 0),
        ],
    );
    let mut expected = one;
    expected.extend(&raw);
    expected.resize(512 * 512, 0);
    expected.extend(&two);
    let image = udif(0, &data, &[block], Tables::Xml, 768);
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| p(dir.path(), n);
    std::fs::write(d("bz.dmg"), &image).unwrap();
    let out = run(Command::new("dmg2img").args(["-s", &d("bz.dmg"), &d("dmg2img.raw")]));
    assert!(out.status.success(), "{out:?}");
    assert!(
        std::fs::read(d("dmg2img.raw")).unwrap() == expected,
        "dmg2img"
    );
    let sock = dir.path().join("nbd.sock");
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &nbd_server_args(&sock));
    let mut client = daemon.qmp().await;
    let answer = add(&mut client, "bz", "bz.dmg", true).await;
    assert!(answer.get("return").is_some(), "{answer}");
    export_to_raw(&mut client, &sock, "bz", &d("blockd.raw")).await;
    assert!(
        std::fs::read(d("blockd.raw")).unwrap() == expected,
        "blockd"
    );
    daemon.quit(&mut client).await;
}

/// Sectors no chunk covers, and chunks of a kind neither reads (ADC), fail with EIO in
/// both daemons; the sectors around them read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_sectors_fail_as_in_qsd() {
    let raw = pattern(4096, 23);
    let mut data = raw.clone();
    data.extend([0u8; 100]);
    let block = mish(
        0,
        0,
        &[
            (RAW, 0, 8, 0, 4096),
            (ADC, 8, 8, 4096, 100),
            (ZLIB, 24, 8, 4096, 100),
            // A zero run far longer than the disk.
            (ZERO, 40, 1 << 62, 0, 0),
            (LAST, 32, 0, 0, 0),
        ],
    );
    let image = udif(0, &data, &[block], Tables::Xml, 48);
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(p(dir.path(), "holes.dmg"), &image).unwrap();
        let sock = dir.path().join("nbd.sock");
        let daemon = Daemon::start(which, dir.path(), &nbd_server_args(&sock));
        let mut client = daemon.qmp().await;
        let answer = add(&mut client, "holes", "holes.dmg", true).await;
        assert!(answer.get("return").is_some(), "{answer}");
        client
            .execute(
                "block-export-add",
                json!({"type": "nbd", "id": "holes", "node-name": "holes"}),
            )
            .await
            .unwrap();
        let uri = format!("nbd+unix:///holes?socket={}", sock.display());
        let mut seen = Vec::new();
        // Raw, ADC, uncovered, a zlib chunk that does not inflate, past the tables, the
        // long zero run.
        for (offset, len) in [
            (0, 4096),
            (4096, 512),
            (8192, 4096),
            (12288, 512),
            (16384, 512),
            (20480, 4096),
        ] {
            let cmd = format!("read {offset} {len}");
            seen.push(
                json!({cmd.clone(): qemu_io_outcome(&["-r", "-f", "raw", "-c", &cmd, &uri])}),
            );
        }
        daemon.quit(&mut client).await;
        all.push(Value::Array(seen));
    }
    assert_eq!(all[0], all[1]);
    assert_eq!(all[0][0]["read 0 4096"], "ok");
    assert_ne!(all[0][1]["read 4096 512"], "ok");
    assert_eq!(all[0][5]["read 20480 4096"], "ok");
}

/// Opened read-only on both daemons: qsd's answer, and blockd's begins with it (blockd
/// adds what it found where qsd says only "Invalid argument").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_dmg_images_are_refused_as_qsd_refuses_them() {
    let (data, blocks, expected) = content();
    let sectors = (expected.len() / 512) as u64;
    let good = udif(512, &data, &blocks, Tables::Xml, sectors);
    let k = good.len() - 512;
    let be = |v: u64| v.to_be_bytes();
    let last_data_end = good.windows(7).rposition(|w| w == b"</data>").unwrap();
    let with_block = |block: Vec<u8>| udif(0, &data, &[block], Tables::Xml, 16);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("short", good[..300].to_vec()),
        ("no_trailer", patched(&good, k, b"kolx")),
        ("data_fork", patched(&good, k + 0x18, &be(k as u64 + 1))),
        ("xml_offset", patched(&good, k + 0xd8, &be(k as u64))),
        ("xml_length", patched(&good, k + 0xe0, &be(k as u64))),
        ("no_tables", patched(&good, k + 0xe0, &be(0))),
        ("rsrc_offset", patched(&good, k + 0x28, &be(k as u64 + 8))),
        ("sectors", patched(&good, k + 0x1ec, &be(1 << 63))),
        (
            "chunk_sectors",
            with_block(mish(0, 0, &[(RAW, 0, 200_000, 0, 512)])),
        ),
        (
            "chunk_length",
            with_block(mish(0, 0, &[(ZLIB, 0, 16, 0, (64 << 20) + 1)])),
        ),
        ("unclosed_data", patched(&good, last_data_end, b"</datX>")),
    ];
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon::start(which, dir.path(), &[]);
        let mut client = daemon.qmp().await;
        let mut seen = Vec::new();
        for (name, bytes) in &cases {
            let file = format!("{name}.dmg");
            std::fs::write(p(dir.path(), &file), bytes).unwrap();
            seen.push((*name, add(&mut client, name, &file, true).await));
        }
        std::fs::write(p(dir.path(), "good.dmg"), &good).unwrap();
        seen.push(("writable", add(&mut client, "w", "good.dmg", false).await));
        daemon.quit(&mut client).await;
        all.push(seen);
    }
    for ((name, ours), (_, theirs)) in all[0].iter().zip(&all[1]) {
        let (a, b) = (
            ours["error"]["desc"].as_str(),
            theirs["error"]["desc"].as_str(),
        );
        let (Some(a), Some(b)) = (a, b) else {
            panic!("{name}: blockd {ours} / qsd {theirs}");
        };
        assert!(a.starts_with(b), "{name}: {a} / {b}");
    }
}
