//! seSparse vmdk extents (ESXi snapshots, which QEMU reads and no Linux tool writes):
//! images built here byte by byte over a qemu-img parent, read through each daemon's NBD
//! export, must hold the same bytes, the ones the layout says; crafted headers get qsd's
//! refusals, and so does a writable open.

mod common;

use common::formats::{export_to_raw, patched};
use common::jobs::qemu_io;
use common::*;
use serde_json::{json, Value};
use std::path::Path;

const GRAIN: usize = 4096;
const DISK: usize = 4 << 20;
/// Sectors: the volatile header, the grain directory, grain table 0, grain 0.
const VOLATILE: u64 = 1;
const GD: u64 = 8;
const GTS: u64 = 16;
const GRAINS: u64 = 128;

/// The grains stored: (disk grain, grain index in the file, fill).
const STORED: [(usize, u64, u8); 4] =
    [(0, 0, 0x21), (5, 1, 0x22), (6, 2, 0x23), (1000, 5000, 0x24)];

fn const_header(fields: &[(usize, u64)]) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    for &(i, v) in fields {
        h[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    h
}

/// The seSparse extent file: grains 0, 5, 6 and 1000 stored, 1 zeroed, 2 unmapped, the
/// rest absent (the parent's).
fn extent() -> Vec<u8> {
    let mut file = const_header(&[
        (0, 0xcafe_babe),
        (1, 0x2_0000_0001),
        (2, (DISK / 512) as u64),
        (3, 8),
        (4, 64),
        (10, VOLATILE),
        (11, 1),
        (16, GD),
        (17, 1),
        (18, GTS),
        (19, 64),
        (24, GRAINS),
    ]);
    file.extend(const_header(&[(0, 0xcafe_cafe)]));
    let gt_entry = |index: u64| 3u64 << 60 | (index & 0xfff) << 48 | index >> 12;
    let mut put = |at: u64, bytes: &[u8]| {
        let at = at as usize;
        if file.len() < at + bytes.len() {
            file.resize(at + bytes.len(), 0);
        }
        file[at..at + bytes.len()].copy_from_slice(bytes);
    };
    put(GD * 512, &0x1000_0000_0000_0000u64.to_le_bytes());
    let gt = GTS * 512;
    for (grain, index, fill) in STORED {
        put(gt + grain as u64 * 8, &gt_entry(index).to_le_bytes());
        put((GRAINS + index * 8) * 512, &[fill; GRAIN]);
    }
    put(gt + 8, &(2u64 << 60).to_le_bytes());
    put(gt + 16, &(1u64 << 60).to_le_bytes());
    file
}

/// The disk over a parent of 0x11 (zeroes without one).
fn expected(parent: u8) -> Vec<u8> {
    let mut disk = vec![parent; DISK];
    for (grain, _, fill) in STORED {
        disk[grain * GRAIN..(grain + 1) * GRAIN].fill(fill);
    }
    disk[GRAIN..3 * GRAIN].fill(0);
    disk
}

fn descriptor(extent_line: &str, parent: Option<(&str, &str)>) -> String {
    let (parent_cid, hint) = match parent {
        Some((cid, file)) => (cid.to_string(), format!("parentFileNameHint=\"{file}\"\n")),
        None => ("ffffffff".to_string(), String::new()),
    };
    format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID={parent_cid}\ncreateType=\"seSparse\"\n{hint}\n# Extent description\n{extent_line}\n\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\n"
    )
}

/// The parent: a qemu-img vmdk of 0x11; its CID, which the child names.
fn make_parent(dir: &Path) -> String {
    let base = p(dir, "base.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", &base, "4M"]);
    qemu_io(&["-f", "vmdk", &base, "-c", "write -P 0x11 0 4M"]);
    let bytes = std::fs::read(&base).unwrap();
    let text = String::from_utf8_lossy(&bytes[512..512 * 21]);
    let at = text.find("\nCID=").expect("the parent's CID") + 5;
    text[at..at + 8].to_string()
}

async fn add(client: &mut qmp::Client, node: &str, file: &str, extra: Value) -> Value {
    let mut options = json!({"driver": "vmdk", "node-name": node, "read-only": true,
                             "file": {"driver": "file", "filename": file}});
    for (k, v) in extra.as_object().unwrap() {
        options[k] = v.clone();
    }
    reply(client, "blockdev-add", options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sesparse_extents_read_as_in_qsd() {
    let mut maps = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = |n: &str| p(dir.path(), n);
        let cid = make_parent(dir.path());
        std::fs::write(d("child-s.vmdk"), extent()).unwrap();
        let line = "RW 8192 SESPARSE \"child-s.vmdk\"";
        std::fs::write(d("child.vmdk"), descriptor(line, Some((&cid, "base.vmdk")))).unwrap();
        std::fs::write(d("alone.vmdk"), descriptor(line, None)).unwrap();
        let sock = dir.path().join("nbd.sock");
        let daemon = Daemon::start(which, dir.path(), &nbd_server_args(&sock));
        let mut client = daemon.qmp().await;
        for (node, file, parent) in [("child", "child.vmdk", 0x11), ("alone", "alone.vmdk", 0)] {
            let answer = add(&mut client, node, file, json!({})).await;
            assert!(answer.get("return").is_some(), "{which:?} {node}: {answer}");
            let out = d(&format!("{node}.raw"));
            export_to_raw(&mut client, &sock, node, &out).await;
            assert!(
                std::fs::read(&out).unwrap() == expected(parent),
                "{which:?} {node}"
            );
        }
        let map = qemu_img(&[
            "map",
            "--output=json",
            "-f",
            "raw",
            &format!("nbd+unix:///alone?socket={}", sock.display()),
        ]);
        maps.push(map);
        daemon.quit(&mut client).await;
    }
    // The same extents: stored grains data, zeroed and unmapped ones zero, the others
    // (no parent here) neither.
    assert_eq!(maps[0], maps[1]);
    assert!(maps[0].contains("\"data\": true"), "{}", maps[0]);
    assert!(maps[0].contains("\"zero\": true"), "{}", maps[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_sesparse_extents_are_refused_as_qsd_refuses_them() {
    let good = extent();
    let v = VOLATILE as usize * 512;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("magic", patched(&good, 0, &[0xbf])),
        ("version", patched(&good, 8, &[2])),
        ("grain", patched(&good, 24, &[16])),
        ("table", patched(&good, 32, &[32])),
        ("flags", patched(&good, 40, &[1])),
        ("reserved", patched(&good, 56, &[1])),
        ("padding", patched(&good, 300, &[1])),
        ("volatile_magic", patched(&good, v, &[0])),
        ("journal", patched(&good, v + 24, &[1])),
        ("volatile_padding", patched(&good, v + 100, &[1])),
    ];
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = |n: &str| p(dir.path(), n);
        let daemon = Daemon::start(which, dir.path(), &[]);
        let mut client = daemon.qmp().await;
        let mut seen = Vec::new();
        for (name, bytes) in &cases {
            std::fs::write(d(&format!("{name}-s.vmdk")), bytes).unwrap();
            let line = format!("RW 8192 SESPARSE \"{name}-s.vmdk\"");
            std::fs::write(d(&format!("{name}.vmdk")), descriptor(&line, None)).unwrap();
            seen.push((
                *name,
                add(&mut client, name, &format!("{name}.vmdk"), json!({})).await,
            ));
        }
        std::fs::write(d("good-s.vmdk"), &good).unwrap();
        let line = "RW 8192 SESPARSE \"good-s.vmdk\" 0";
        std::fs::write(d("offset.vmdk"), descriptor(line, None)).unwrap();
        seen.push((
            "offset",
            add(&mut client, "offset", "offset.vmdk", json!({})).await,
        ));
        let line = "RW 8192 SESPARSE \"good-s.vmdk\"";
        std::fs::write(d("good.vmdk"), descriptor(line, None)).unwrap();
        seen.push((
            "writable",
            add(&mut client, "w", "good.vmdk", json!({"read-only": false})).await,
        ));
        daemon.quit(&mut client).await;
        all.push(seen);
    }
    for ((name, ours), (_, theirs)) in all[0].iter().zip(&all[1]) {
        let (Some(a), Some(b)) = (
            ours["error"]["desc"].as_str(),
            theirs["error"]["desc"].as_str(),
        ) else {
            panic!("{name}: blockd {ours} / qsd {theirs}");
        };
        assert_eq!(a, b, "{name}");
    }
}
