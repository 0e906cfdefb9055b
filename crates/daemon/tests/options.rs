//! The runtime options of the file, qcow2 and blkdebug drivers: each value either behaves
//! as qemu-storage-daemon's (the same error, or a node that opens and serves), or is one
//! blockd cannot honour and refuses with a text that names it, where qsd would accept it.

mod common;

use common::*;
use serde_json::{json, Value};

/// What blockd does with a blockdev-add.
enum Expect {
    /// The same reply as qsd's.
    Same,
    /// Refused with a text containing this, where qsd opens the node.
    Refused(&'static str),
}

fn cases(dir: &std::path::Path) -> Vec<(&'static str, Value, Expect)> {
    use Expect::*;
    let image = p(dir, "v3.qcow2");
    let file = json!({"driver": "file", "filename": image});
    let v2 = json!({"driver": "file", "filename": p(dir, "v2.qcow2")});
    let with = |base: &Value, extra: Value| {
        let mut node = base.clone();
        node.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        node
    };
    let file_node = json!({"driver": "file", "node-name": "n", "filename": image});
    let qcow2_node = json!({"driver": "qcow2", "node-name": "n", "file": file});
    let blkdebug_node = json!({"driver": "blkdebug", "node-name": "n", "image": file});
    let file_with = |extra| with(&file_node, extra);
    let qcow2_with = |extra| with(&qcow2_node, extra);
    let blkdebug_with = |extra| with(&blkdebug_node, extra);
    vec![
        (
            "aio native, cached",
            file_with(json!({"aio": "native"})),
            Same,
        ),
        (
            "aio native, direct",
            file_with(json!({"aio": "native", "cache": {"direct": true}})),
            Same,
        ),
        ("aio threads", file_with(json!({"aio": "threads"})), Same),
        ("aio io_uring", file_with(json!({"aio": "io_uring"})), Same),
        (
            "aio-max-batch 8",
            file_with(json!({"aio-max-batch": 8})),
            Same,
        ),
        (
            "aio-max-batch -1",
            file_with(json!({"aio-max-batch": -1})),
            Same,
        ),
        (
            "drop-cache off",
            file_with(json!({"drop-cache": false})),
            Same,
        ),
        ("pr-manager", file_with(json!({"pr-manager": "pr0"})), Same),
        (
            "lazy-refcounts off",
            qcow2_with(json!({"lazy-refcounts": false})),
            Same,
        ),
        (
            "lazy-refcounts on, v2",
            json!({"driver": "qcow2", "node-name": "n", "file": v2, "lazy-refcounts": true}),
            Same,
        ),
        (
            "lazy-refcounts on",
            qcow2_with(json!({"lazy-refcounts": true})),
            Refused("lazy-refcounts=on"),
        ),
        (
            "overlap-check none",
            qcow2_with(json!({"overlap-check": "none"})),
            Same,
        ),
        (
            "overlap-check template none",
            qcow2_with(json!({"overlap-check": {"template": "none"}})),
            Same,
        ),
        (
            "overlap-check bogus",
            qcow2_with(json!({"overlap-check": "bogus"})),
            Same,
        ),
        (
            "overlap-check number",
            qcow2_with(json!({"overlap-check": 5})),
            Same,
        ),
        (
            "overlap-check all",
            qcow2_with(json!({"overlap-check": "all"})),
            Same,
        ),
        (
            "overlap-check flags",
            qcow2_with(json!({"overlap-check": {"template": "none", "active-l2": true}})),
            Same,
        ),
        (
            "overlap-check constant, no header",
            qcow2_with(json!({"overlap-check": {"template": "constant", "main-header": "off"}})),
            Same,
        ),
        (
            "overlap-check cached, no L1",
            qcow2_with(json!({"overlap-check": {"template": "cached", "active-l1": false}})),
            Same,
        ),
        (
            "three cache sizes",
            qcow2_with(json!({"cache-size": 1048576, "l2-cache-size": 1048576,
                              "refcount-cache-size": 1048576})),
            Same,
        ),
        (
            "cache-size",
            qcow2_with(json!({"cache-size": 1048576})),
            Same,
        ),
        (
            "l2-cache-size",
            qcow2_with(json!({"l2-cache-size": 1048576})),
            Same,
        ),
        (
            "refcount-cache-size",
            qcow2_with(json!({"refcount-cache-size": 0})),
            Same,
        ),
        (
            "l2-cache-size above cache-size",
            qcow2_with(json!({"cache-size": 1048576, "l2-cache-size": 2097152})),
            Same,
        ),
        (
            "refcount-cache-size above cache-size",
            qcow2_with(json!({"cache-size": 1048576, "refcount-cache-size": 2097152})),
            Same,
        ),
        (
            "cache-size and refcount-cache-size",
            qcow2_with(json!({"cache-size": 1048576, "refcount-cache-size": 65536})),
            Same,
        ),
        (
            "l2 entry 1000",
            qcow2_with(json!({"l2-cache-entry-size": 1000})),
            Same,
        ),
        (
            "l2 entry cluster",
            qcow2_with(json!({"l2-cache-entry-size": 65536})),
            Same,
        ),
        (
            "l2 entry 4096",
            qcow2_with(json!({"l2-cache-entry-size": 4096})),
            Refused("l2-cache-entry-size"),
        ),
        (
            "clean interval -1",
            qcow2_with(json!({"cache-clean-interval": -1})),
            Same,
        ),
        (
            "clean interval 0",
            qcow2_with(json!({"cache-clean-interval": 0})),
            Same,
        ),
        (
            "clean interval 10",
            qcow2_with(json!({"cache-clean-interval": 10})),
            Refused("cache-clean-interval"),
        ),
        (
            "pass-discard-request off",
            qcow2_with(json!({"pass-discard-request": false})),
            Same,
        ),
        (
            "pass-discard-request on",
            qcow2_with(json!({"pass-discard-request": true})),
            Same,
        ),
        (
            "pass-discard-snapshot on",
            qcow2_with(json!({"pass-discard-snapshot": true})),
            Same,
        ),
        (
            "pass-discard-other on",
            qcow2_with(json!({"pass-discard-other": true})),
            Same,
        ),
        (
            "discard-no-unref on",
            qcow2_with(json!({"discard-no-unref": true})),
            Same,
        ),
        ("blkdebug align 3", blkdebug_with(json!({"align": 3})), Same),
        (
            "blkdebug max-transfer 1000",
            blkdebug_with(json!({"align": 512, "max-transfer": 1000})),
            Same,
        ),
        (
            "blkdebug max-write-zero 1000",
            blkdebug_with(json!({"align": 512, "max-write-zero": 1000})),
            Same,
        ),
        (
            "blkdebug max-discard below opt-discard",
            blkdebug_with(json!({"opt-discard": 4096, "max-discard": 2048})),
            Same,
        ),
        (
            "blkdebug align 4096",
            blkdebug_with(json!({"align": 4096})),
            Refused("align"),
        ),
        (
            "blkdebug opt-discard",
            blkdebug_with(json!({"opt-discard": 4096})),
            Refused("opt-discard"),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_option_behaves_as_qsd_or_is_refused() {
    let mut answers = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            &p(dir.path(), "v3.qcow2"),
            "1M",
        ]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            &p(dir.path(), "v2.qcow2"),
            "1M",
        ]);
        let daemon = Daemon::start(which, dir.path(), &[]);
        let mut client = daemon.qmp().await;
        let mut replies = Vec::new();
        for (name, node, _) in cases(dir.path()) {
            let added = reply(&mut client, "blockdev-add", node).await;
            if added.get("return").is_some() {
                client
                    .execute("blockdev-del", json!({"node-name": "n"}))
                    .await
                    .unwrap_or_else(|e| panic!("{which:?} {name}: {}", e.desc));
            }
            replies.push(added);
        }
        daemon.quit(&mut client).await;
        answers.push(replies);
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, (name, _, expect)) in cases(dir.path()).into_iter().enumerate() {
        let (blockd, qsd) = (&answers[0][i], &answers[1][i]);
        match expect {
            Expect::Same => assert_eq!(blockd, qsd, "{name}"),
            Expect::Refused(text) => {
                assert!(qsd.get("return").is_some(), "{name}: qsd {qsd}");
                let desc = blockd["error"]["desc"].as_str().unwrap_or_default();
                assert!(desc.contains(text), "{name}: blockd {blockd}");
            }
        }
    }
}
