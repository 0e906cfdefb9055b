//! Persistent dirty bitmaps in qcow2 images: bitmaps QEMU stored load with their bits,
//! bitmaps we store are what qemu-img reads, the image stays clean for qemu-img check, a
//! crash leaves them in use, and read-only opens change nothing.

mod common;

use block::DirtyBitmap;
use block::WriteFlags;
use common::{check_clean, run, Setup};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

/// The bitmaps qemu-img lists, as (name, granularity, flags).
fn qemu_bitmaps(image: &str) -> Vec<(String, u64, Vec<String>)> {
    let info: Value =
        serde_json::from_str(&run("qemu-img", &["info", "-U", "--output=json", image])).unwrap();
    let list = &info["format-specific"]["data"]["bitmaps"];
    list.as_array()
        .map(|items| {
            items
                .iter()
                .map(|b| {
                    (
                        b["name"].as_str().unwrap().to_string(),
                        b["granularity"].as_u64().unwrap(),
                        b["flags"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|f| f.as_str().unwrap().to_string())
                            .collect(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Setup {
    /// (name, granularity, count, enabled, persistent, inconsistent) of every bitmap.
    fn bitmaps(&self) -> Vec<(String, u64, u64, bool, bool, bool)> {
        let node = self.graph.find("disk").unwrap();
        node.dirty_bitmaps()
            .iter()
            .map(|b| {
                (
                    b.name().unwrap().to_string(),
                    b.granularity(),
                    b.count(),
                    b.is_enabled(),
                    b.is_persistent(),
                    b.is_inconsistent(),
                )
            })
            .collect()
    }
}

/// 4 MiB image with enabled `b0` (64 KiB) and disabled `b1` (128 KiB), written by qemu-io
/// at 0 (64 KiB) and 1 MiB (128 KiB) while both existed: b0 counts 192 KiB, b1 none.
fn qemu_image(dir: &Path) -> String {
    let image = dir.join("disk.qcow2").to_string_lossy().into_owned();
    run("qemu-img", &["create", "-q", "-f", "qcow2", &image, "4M"]);
    run("qemu-img", &["bitmap", "--add", &image, "b0"]);
    run(
        "qemu-img",
        &["bitmap", "--add", "--disable", "-g", "128k", &image, "b1"],
    );
    run(
        "qemu-io",
        &["-c", "write 0 64k", "-c", "write 1M 128k", &image],
    );
    image
}

fn write(setup: &Setup, offset: u64, len: usize) {
    setup.on_node(move |node| async move {
        node.write(offset, &vec![0x5a; len], WriteFlags::default())
            .await
            .unwrap()
    });
}

#[test]
fn qemu_bitmaps_load_record_and_are_stored_back() {
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_image(dir.path());

    let setup = Setup::open(&image, false);
    assert_eq!(
        setup.bitmaps(),
        vec![
            ("b0".into(), 65536, 192 << 10, true, true, false),
            ("b1".into(), 131072, 0, false, true, false),
        ]
    );
    // While we have them, a crash would leave them unsaved: the image says so.
    let in_use: Vec<_> = qemu_bitmaps(&image).into_iter().map(|b| b.2).collect();
    assert_eq!(in_use, vec![vec!["in-use", "auto"], vec!["in-use"]]);

    write(&setup, 3 << 20, 65536);
    setup.close();
    assert_eq!(
        qemu_bitmaps(&image),
        vec![
            ("b0".into(), 65536, vec!["auto".into()]),
            ("b1".into(), 131072, vec![]),
        ]
    );
    check_clean(&image);

    // What we stored is what we read back, and storing again frees the old clusters.
    let setup = Setup::open(&image, false);
    assert_eq!(
        setup.bitmaps(),
        vec![
            ("b0".into(), 65536, 256 << 10, true, true, false),
            ("b1".into(), 131072, 0, false, true, false),
        ]
    );
    setup.close();
    check_clean(&image);
}

#[test]
fn bitmaps_we_add_are_stored_for_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("new.qcow2").to_string_lossy().into_owned();
    run("qemu-img", &["create", "-q", "-f", "qcow2", &image, "64M"]);

    let setup = Setup::open(&image, false);
    setup.on_node(|node| async move {
        let bitmap = DirtyBitmap::new(Some("ours".into()), 65536, node.size());
        bitmap.set_persistent(true);
        node.add_dirty_bitmap(Arc::new(bitmap));
        let transient = DirtyBitmap::new(Some("transient".into()), 65536, node.size());
        node.add_dirty_bitmap(Arc::new(transient));
        // Spread over many bitmap data clusters' worth of disk: 8 MiB apart.
        for i in 0..8u64 {
            node.write(i * (8 << 20), &[1; 4096], WriteFlags::default())
                .await
                .unwrap();
        }
    });
    setup.close();
    assert_eq!(
        qemu_bitmaps(&image),
        vec![("ours".into(), 65536, vec!["auto".into()])]
    );
    check_clean(&image);
    // qemu-img reads the same bits: it merges ours into a bitmap of its own and stores
    // both, which we then load.
    run("qemu-img", &["bitmap", "--add", &image, "copy"]);
    run("qemu-img", &["bitmap", "--merge", "ours", &image, "copy"]);
    let setup = Setup::open(&image, true);
    assert_eq!(
        setup.bitmaps(),
        vec![
            ("ours".into(), 65536, 8 << 16, true, true, false),
            ("copy".into(), 65536, 8 << 16, true, true, false),
        ]
    );
    setup.close();
}

#[test]
fn a_crash_leaves_bitmaps_inconsistent() {
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_image(dir.path());
    let setup = Setup::open(&image, false);
    write(&setup, 2 << 20, 4096);
    setup.abandon();
    let flags: Vec<_> = qemu_bitmaps(&image).into_iter().map(|b| b.2).collect();
    assert_eq!(flags, vec![vec!["in-use", "auto"], vec!["in-use"]]);

    let setup = Setup::open(&image, false);
    let state: Vec<_> = setup.bitmaps().iter().map(|b| (b.0.clone(), b.5)).collect();
    assert_eq!(state, vec![("b0".into(), true), ("b1".into(), true)]);
    setup.close();
    // Still unusable after a clean close: only removing them helps, as in QEMU.
    let flags: Vec<_> = qemu_bitmaps(&image).into_iter().map(|b| b.2).collect();
    assert_eq!(flags, vec![vec!["in-use", "auto"], vec!["in-use"]]);
    check_clean(&image);
}

#[test]
fn read_only_opens_leave_the_image_alone() {
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_image(dir.path());
    let before = std::fs::read(&image).unwrap();
    let setup = Setup::open(&image, true);
    assert_eq!(setup.bitmaps()[0].2, 192 << 10);
    setup.close();
    assert!(
        std::fs::read(&image).unwrap() == before,
        "the image changed"
    );
}
