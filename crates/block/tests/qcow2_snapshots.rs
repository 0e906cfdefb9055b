//! qcow2 internal snapshots taken and deleted by blockd, judged by qemu-img: the table lists
//! them, `check` finds no error or leak, writes after a snapshot never reach what it holds
//! (`snapshot -a` on a copy brings the old content back), and deleting gives the clusters
//! back.

mod common;

use block::SnapshotInfo;
use block::WriteFlags;
use common::{check_clean, run, Setup};
use serde_json::{json, Value};
use std::path::Path;

/// (id, name) of every snapshot qemu-img lists.
fn qemu_snapshots(image: &str) -> Vec<(String, String)> {
    let info: Value =
        serde_json::from_str(&run("qemu-img", &["info", "-U", "--output=json", image])).unwrap();
    info["snapshots"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|s| {
                    (
                        s["id"].as_str().unwrap().to_string(),
                        s["name"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The guest content of `image` (its active state), through qemu-img.
fn qemu_content(image: &str, dir: &Path) -> Vec<u8> {
    let raw = dir.join("content.raw");
    let raw = raw.to_str().unwrap();
    run("qemu-img", &["convert", "-U", "-O", "raw", image, raw]);
    let data = std::fs::read(raw).unwrap();
    std::fs::remove_file(raw).unwrap();
    data
}

/// The content snapshot `name` holds: applied to a copy of the image with qemu-img, which
/// must leave the copy clean.
fn snapshot_content(image: &str, name: &str, dir: &Path) -> Vec<u8> {
    let copy = dir.join("applied.qcow2");
    let copy = copy.to_str().unwrap();
    std::fs::copy(image, copy).unwrap();
    run("qemu-img", &["snapshot", "-a", name, copy]);
    check_clean(copy);
    let data = qemu_content(copy, dir);
    std::fs::remove_file(copy).unwrap();
    data
}

impl Setup {
    fn write(&self, offset: u64, len: usize, byte: u8) {
        self.on_node(move |node| async move {
            node.write(offset, &vec![byte; len], WriteFlags::default())
                .await
                .unwrap()
        });
    }

    fn discard_to_zero(&self, offset: u64, len: u64) {
        self.on_node(move |node| async move {
            let flags = WriteFlags {
                may_unmap: true,
                ..WriteFlags::default()
            };
            node.write_zeroes(offset, len, flags).await.unwrap()
        });
    }

    fn content(&self) -> Vec<u8> {
        self.on_node(|node| async move {
            let mut buf = vec![0u8; node.size() as usize];
            node.read(0, &mut buf).await.unwrap();
            buf
        })
    }

    fn create(&self, name: &str) -> std::io::Result<SnapshotInfo> {
        let name = name.to_string();
        self.on_node(move |node| async move {
            node.driver().create_internal_snapshot(&node, &name).await
        })
    }

    fn delete(&self, id: Option<&str>, name: Option<&str>) -> Option<SnapshotInfo> {
        let (id, name) = (id.map(str::to_string), name.map(str::to_string));
        self.on_node(move |node| async move {
            node.driver()
                .delete_internal_snapshot(&node, id.as_deref(), name.as_deref())
                .await
                .unwrap()
        })
    }

    fn list(&self) -> Vec<SnapshotInfo> {
        let node = self.graph.find("disk").unwrap();
        let list = node.driver().internal_snapshots().unwrap();
        list
    }
}

/// A 4 MiB image qemu-io wrote a few clusters of (one partly), with `create_options`.
fn image(dir: &Path, create_options: &str) -> String {
    let image = dir.join("disk.qcow2").to_string_lossy().into_owned();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            create_options,
            &image,
            "4M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -P 0x22 1M 128k",
            "-c",
            "write -P 0x33 2M 4k",
            &image,
        ],
    );
    image
}

/// Writes of every kind after a snapshot: a whole cluster, a partial one (copy of the rest),
/// a new cluster, and a discard that zeroes a shared cluster.
fn write_after(setup: &Setup) {
    setup.write(0, 65536, 0xa1);
    setup.write((1 << 20) + 4096, 512, 0xa2);
    setup.write(3 << 20, 8192, 0xa3);
    setup.discard_to_zero(2 << 20, 65536);
}

#[test]
fn writes_after_a_snapshot_leave_it_intact() {
    writes_after_a_snapshot("cluster_size=65536");
}

/// The same with extended L2 entries: the partial write after a snapshot copies the shared
/// cluster whole, subclusters and all.
#[test]
fn writes_after_a_snapshot_with_subclusters() {
    writes_after_a_snapshot("cluster_size=65536,extended_l2=on");
}

fn writes_after_a_snapshot(options: &str) {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path(), options);
    // A snapshot QEMU took stays listed and usable beside ours.
    run("qemu-img", &["snapshot", "-c", "by-qemu", &image]);
    let at_qemu_snapshot = qemu_content(&image, dir.path());

    let setup = Setup::open(&image, false);
    setup.write(1 << 20, 4096, 0x44);
    let before = setup.content();
    let info = setup.create("s1").unwrap();
    assert_eq!((info.id.as_str(), info.name.as_str()), ("2", "s1"));
    assert_eq!((info.vm_state_size, info.icount), (0, None));
    write_after(&setup);
    let after = setup.content();
    assert_ne!(before, after);
    // The table is read back as written.
    let listed: Vec<_> = setup.list().into_iter().map(|s| s.name).collect();
    assert_eq!(listed, vec!["by-qemu", "s1"]);
    // A second snapshot shares clusters with the first and the active layer at once.
    setup.create("s2").unwrap();
    setup.write(0, 4096, 0xb1);
    let last = setup.content();
    setup.close();

    assert_eq!(
        qemu_snapshots(&image),
        vec![
            ("1".into(), "by-qemu".into()),
            ("2".into(), "s1".into()),
            ("3".into(), "s2".into())
        ]
    );
    check_clean(&image);
    assert!(qemu_content(&image, dir.path()) == last);
    assert!(snapshot_content(&image, "s1", dir.path()) == before);
    assert!(snapshot_content(&image, "s2", dir.path()) == after);
    assert!(snapshot_content(&image, "by-qemu", dir.path()) == at_qemu_snapshot);
}

#[test]
fn deleting_snapshots_frees_their_clusters() {
    deleting_snapshots("cluster_size=65536");
}

#[test]
fn deleting_snapshots_with_subclusters() {
    deleting_snapshots("cluster_size=65536,extended_l2=on");
}

fn deleting_snapshots(options: &str) {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path(), options);
    let setup = Setup::open(&image, false);
    let s1 = setup.create("s1").unwrap();
    write_after(&setup);
    let middle = setup.content();
    setup.create("s2").unwrap();
    setup.write(3 << 20, 65536, 0xc1);
    let current = setup.content();

    assert_eq!(setup.delete(Some("1"), Some("s2")), None);
    assert_eq!(setup.delete(None, Some("nope")), None);
    assert_eq!(setup.delete(None, Some("s1")), Some(s1));
    // Writes where only the active layer holds the clusters again go in place.
    setup.write(0, 4096, 0xd1);
    let final_content = setup.content();
    assert_ne!(final_content, current);
    setup.close();
    assert_eq!(qemu_snapshots(&image), vec![("2".into(), "s2".into())]);
    check_clean(&image);
    assert!(snapshot_content(&image, "s2", dir.path()) == middle);
    assert!(qemu_content(&image, dir.path()) == final_content);

    let setup = Setup::open(&image, false);
    let reopened: Vec<_> = setup.list().into_iter().map(|s| (s.id, s.name)).collect();
    assert_eq!(reopened, vec![("2".to_string(), "s2".to_string())]);
    assert_eq!(setup.delete(Some("2"), None).unwrap().name, "s2");
    assert!(setup.list().is_empty());
    // After the last one, ids start again at 1, as QEMU numbers them.
    assert_eq!(setup.create("again").unwrap().id, "1");
    assert!(setup.delete(None, Some("again")).is_some());
    setup.close();
    assert!(qemu_snapshots(&image).is_empty());
    check_clean(&image);
    assert!(qemu_content(&image, dir.path()) == final_content);
    // Everything the snapshots held is free again: only metadata stays allocated beyond
    // the data clusters (qemu-img counts the clusters in use).
    let info: Value =
        serde_json::from_str(&run("qemu-img", &["check", "--output=json", &image])).unwrap();
    let allocated = info["allocated-clusters"].as_u64().unwrap();
    assert!(allocated <= 5, "{info}");
}

#[test]
fn compressed_clusters_are_shared_and_copied() {
    let dir = tempfile::tempdir().unwrap();
    let plain = image(dir.path(), "cluster_size=65536");
    let image = dir.path().join("compressed.qcow2");
    let image = image.to_str().unwrap();
    run("qemu-img", &["convert", "-c", "-O", "qcow2", &plain, image]);
    let setup = Setup::open(image, false);
    let before = setup.content();
    setup.create("s").unwrap();
    write_after(&setup);
    let after = setup.content();
    setup.close();
    check_clean(image);
    assert!(qemu_content(image, dir.path()) == after);
    assert!(snapshot_content(image, "s", dir.path()) == before);

    let setup = Setup::open(image, false);
    assert!(setup.delete(None, Some("s")).is_some());
    setup.close();
    check_clean(image);
    assert!(qemu_content(image, dir.path()) == after);
}

#[test]
fn refcounts_that_cannot_grow_refuse_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path(), "refcount_bits=1");
    let setup = Setup::open(&image, false);
    let before = setup.content();
    let err = setup.create("s").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    // Still served, and writable in place.
    setup.write(0, 4096, 0x99);
    let after = setup.content();
    assert_ne!(before, after);
    setup.close();
    assert!(qemu_snapshots(&image).is_empty());
    check_clean(&image);
    assert!(qemu_content(&image, dir.path()) == after);
}

#[test]
fn read_only_nodes_take_no_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path(), "cluster_size=65536");
    let setup = Setup::open(&image, true);
    let err = setup.create("s").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    setup.close();
    assert!(qemu_snapshots(&image).is_empty());
}

#[test]
fn persistent_bitmaps_survive_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path(), "cluster_size=65536");
    run("qemu-img", &["bitmap", "--add", &image, "b0"]);
    let setup = Setup::open(&image, false);
    setup.create("s").unwrap();
    setup.write(2 << 20, 65536, 0x77);
    setup.close();
    check_clean(&image);
    let info: Value =
        serde_json::from_str(&run("qemu-img", &["info", "--output=json", &image])).unwrap();
    let bitmaps = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(bitmaps[0]["name"], "b0", "{info}");
    assert_eq!(bitmaps[0]["flags"], json!(["auto"]), "{info}");
    assert_eq!(qemu_snapshots(&image), vec![("1".into(), "s".into())]);
}
