//! A single-host Ceph cluster for a test binary (`tests/peers/ceph-start`) and helpers
//! around Ceph's own `rbd` tool, the independent check of what blockd's rbd driver wrote.

use super::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The cluster's ceph.conf; the cluster stops when this test process exits.
pub fn cluster() -> &'static Path {
    static CONF: OnceLock<PathBuf> = OnceLock::new();
    CONF.get_or_init(|| {
        for tool in ["ceph-mon", "ceph-osd", "ceph-mgr", "rbd"] {
            assert!(
                run(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
                    .status
                    .success(),
                "the rbd tests need {tool} (Debian packages ceph-mon ceph-osd ceph-mgr \
                 ceph-common; .ci/run installs them)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("blockd-ceph")
            .tempdir()
            .unwrap()
            .keep();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/ceph-start");
        let out = run(Command::new(script).args([
            dir.to_str().unwrap(),
            &std::process::id().to_string(),
            &port.to_string(),
        ]));
        let log = std::fs::read_to_string(dir.join("log/start.log")).unwrap_or_default();
        assert!(
            out.status.success(),
            "the Ceph cluster did not start: {}{}\n{log}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// `rbd` on the test cluster; its stdout, the test failing with stderr if it fails.
pub fn rbd(args: &[&str]) -> String {
    let out = run(Command::new("rbd").arg("-c").arg(cluster()).args(args));
    assert!(
        out.status.success(),
        "rbd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A name no other test of this run uses.
pub fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// An rbd node's options for `image` in pool `rbd` of the test cluster.
pub fn rbd_node(node: &str, image: &str) -> Value {
    json!({"driver": "rbd", "node-name": node, "pool": "rbd", "image": image,
           "conf": cluster().to_str().unwrap()})
}

/// The image's bytes as `rbd export` writes them, into `dir/<image>.raw`.
pub fn exported(dir: &Path, image: &str) -> String {
    let out = p(dir, &format!("{image}.raw"));
    rbd(&["export", image, &out]);
    out
}

/// Bytes of `image` that `rbd diff` lists as written.
pub fn written_bytes(image: &str) -> u64 {
    let diff: Value = serde_json::from_str(&rbd(&["diff", "--format", "json", image])).unwrap();
    diff.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["exists"] == "true" || e["exists"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

pub fn assert_same(a: &str, b: &str) {
    let same = qemu_img(&["compare", "-f", "raw", "-F", "raw", a, b]);
    assert!(same.contains("identical"), "{a} vs {b}: {same}");
}

/// Runs a job command that must be accepted.
pub async fn start_job(c: &mut qmp::Client, command: &str, args: Value) {
    let started = reply(c, command, args.clone()).await;
    assert_eq!(started, json!({"return": {}}), "{command} {args}");
}

/// A new qcow2 image `dir/<node>.qcow2` of `size`, opened as node `node`; its path.
pub async fn local_qcow2(c: &mut qmp::Client, dir: &Path, node: &str, size: &str) -> String {
    let path = p(dir, &format!("{node}.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", &path, size]);
    let added = reply(
        c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": node,
               "file": {"driver": "file", "filename": path}}),
    )
    .await;
    assert_eq!(added, json!({"return": {}}), "{added}");
    path
}

/// A writable NBD export `id` of `node` named `name` on the server at `sock`; its URI.
pub async fn writable_export(
    c: &mut qmp::Client,
    sock: &Path,
    id: &str,
    name: &str,
    node: &str,
) -> String {
    let added = reply(
        c,
        "block-export-add",
        json!({"type": "nbd", "id": id, "name": name, "node-name": node, "writable": true}),
    )
    .await;
    assert_eq!(added, json!({"return": {}}), "{added}");
    format!("nbd+unix:///{name}?socket={}", sock.display())
}
