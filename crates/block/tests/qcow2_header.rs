//! qcow2 header rewrites done by us in a live image (backing file name and format) stay
//! intact while the data path keeps writing, and qemu-img agrees with the result.

mod common;

use block::{Node, WriteFlags};
use common::{check_clean, run, Setup};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;

fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

fn info_json(image: &str) -> Value {
    // -U: some tests look while the image is still open.
    serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", image])).unwrap()
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

async fn set_backing(node: &Node, file: Option<&str>, format: Option<&str>) -> std::io::Result<()> {
    assert_eq!(node.driver().format_name(), "qcow2");
    node.driver().change_backing_file(node, file, format).await
}

fn backing_of(node: &Arc<Node>) -> (Option<String>, Option<String>) {
    let info = node.driver().info(node);
    (info.backing_filename, info.backing_format)
}

const OTHER: &str = "other-backing-file-with-a-name-longer-than-the-first-one.raw";

#[test]
fn new_backing_name_survives_header_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (base, other, top) = (
        path(dir.path(), "base.qcow2"),
        // Longer than the old name: a stale name length in the header would cut it short.
        path(dir.path(), OTHER),
        path(dir.path(), "top.qcow2"),
    );
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "1M"]);
    qemu_img(&["create", "-q", "-f", "raw", &other, "1M"]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
    ]);

    let setup = Setup::new();
    setup.add(json!({"driver": "qcow2", "node-name": "top",
                     "file": {"driver": "file", "filename": top}}));
    let reported = setup.on("top", |node| async move {
        set_backing(&node, Some(OTHER), Some("raw")).await.unwrap();
        let reported = backing_of(&node);
        // Growing the image writes header fields again (size, L1 pointer).
        node.truncate(64 << 20).await.unwrap();
        node.write(40 << 20, &[0x5a; 65536], WriteFlags::default())
            .await
            .unwrap();
        reported
    });
    assert_eq!(reported, (Some(OTHER.into()), Some("raw".into())));
    setup.close();
    let info = info_json(&top);
    assert_eq!(info["backing-filename"], OTHER);
    assert_eq!(info["backing-filename-format"], "raw");
    assert_eq!(info["virtual-size"], 64 << 20);
    let chain = qemu_img(&["info", "--backing-chain", &top]);
    assert!(chain.contains(&format!("image: {other}")), "{chain}");
    check_clean(&top);
    let map = qemu_img(&["map", "--output=json", &top]);
    assert!(
        map.contains("\"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"),
        "{map}"
    );
}

#[test]
fn backing_file_can_be_dropped_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = (
        path(dir.path(), "base.qcow2"),
        path(dir.path(), "top.qcow2"),
    );
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "1M"]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
    ]);

    let setup = Setup::new();
    setup.add(json!({"driver": "qcow2", "node-name": "top",
                     "file": {"driver": "file", "filename": top}}));
    let reported = setup.on("top", |node| async move {
        set_backing(&node, None, None).await.unwrap();
        backing_of(&node)
    });
    assert_eq!(reported, (None, None));
    let info = info_json(&top);
    assert!(info.get("backing-filename").is_none(), "{info}");
    assert!(info.get("backing-filename-format").is_none(), "{info}");
    check_clean(&top);

    setup.on("top", |node| async move {
        set_backing(&node, Some("base.qcow2"), Some("qcow2"))
            .await
            .unwrap();
        node.write(0, &[1; 4096], WriteFlags::default())
            .await
            .unwrap();
    });
    setup.close();
    let info = info_json(&top);
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    check_clean(&top);
}

#[test]
fn names_that_do_not_fit_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = (
        path(dir.path(), "base.qcow2"),
        path(dir.path(), "top.qcow2"),
    );
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "-b",
        &base,
        "-F",
        "qcow2",
        &top,
    ]);

    let setup = Setup::new();
    setup.add(json!({"driver": "qcow2", "node-name": "top",
                     "file": {"driver": "file", "filename": top}}));
    let errors = setup.on("top", |node| async move {
        let too_big = set_backing(&node, Some(&"x".repeat(600)), Some("qcow2")).await;
        let too_long = set_backing(&node, Some(&"y".repeat(1024)), None).await;
        let format_alone = set_backing(&node, None, Some("qcow2")).await;
        (
            too_big.unwrap_err().raw_os_error(),
            too_long.unwrap_err().raw_os_error(),
            format_alone.unwrap_err().raw_os_error(),
            backing_of(&node),
        )
    });
    assert_eq!(errors.0, Some(libc::ENOSPC));
    assert_eq!(errors.1, Some(libc::EINVAL));
    assert_eq!(errors.2, Some(libc::EINVAL));
    assert_eq!(errors.3 .0.as_deref(), Some(base.as_str()));
    setup.close();
    assert_eq!(info_json(&top)["backing-filename"], base.as_str());
    check_clean(&top);
}
