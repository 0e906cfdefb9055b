//! The rbd driver against a real Ceph cluster: one mon, one mgr and one memstore OSD on
//! loopback, started once for this test binary by `tests/peers/ceph-start` (Debian's
//! ceph-mon, ceph-osd, ceph-mgr, ceph-common). qemu-img and qsd here are built without
//! rbd, so the independent checks are Ceph's own tools (`rbd info`, `rbd export`,
//! `rbd snap ls`, `rbd diff`) and QEMU's on local images and NBD exports.

mod common;

use common::ceph::*;
use common::jobs::create;
use common::*;
use serde_json::{json, Value};
use std::process::Command;

/// blockdev-create makes images as asked (QEMU's checks first), an rbd node serves reads
/// and writes over NBD, and block status tells written from never-written ranges.
#[tokio::test]
async fn rbd_images_are_created_served_and_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let image = unique("created");
    let sock = dir.path().join("nbd.sock");
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &nbd_server_args(&sock));
    let mut c = daemon.qmp().await;
    let location = json!({"pool": "rbd", "image": image, "conf": cluster().to_str().unwrap()});
    let mut refused = Vec::new();
    for (options, text) in [
        (
            json!({"driver": "rbd", "location": location, "size": 64 << 20, "cluster-size": 3000}),
            "obj size needs to be power of 2",
        ),
        (
            json!({"driver": "rbd", "location": location, "size": 64 << 20, "cluster-size": 2048}),
            "obj size too small",
        ),
        (
            json!({"driver": "rbd", "size": 64 << 20,
                   "location": {"pool": "rbd", "image": image, "snapshot": "s",
                                "conf": cluster().to_str().unwrap()}}),
            "Can't use snapshot name for image creation",
        ),
        (
            json!({"driver": "rbd", "size": 64 << 20,
                   "location": {"pool": "nopool", "image": image,
                                "conf": cluster().to_str().unwrap()}}),
            "error opening pool nopool",
        ),
    ] {
        let events = create(&mut c, "c", json!(options)).await;
        refused.push((events.to_string(), text));
    }
    for (events, text) in refused {
        assert!(events.contains(text), "{text}: {events}");
    }
    let events = create(
        &mut c,
        "c",
        json!({"driver": "rbd", "location": location, "size": 64 << 20,
               "cluster-size": 1 << 20}),
    )
    .await;
    assert!(!events.to_string().contains("error"), "{events}");
    let info: Value = serde_json::from_str(&rbd(&["info", "--format", "json", &image])).unwrap();
    assert_eq!(info["size"], 64 << 20, "{info}");
    assert_eq!(info["order"], 20, "{info}");

    let missing = reply(&mut c, "blockdev-add", rbd_node("gone", "no-such-image")).await;
    let text = missing["error"]["desc"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        text.starts_with("error reading header from no-such-image"),
        "{missing}"
    );
    assert_eq!(
        reply(&mut c, "blockdev-add", rbd_node("r", &image)).await,
        json!({"return": {}})
    );
    let nodes = reply(&mut c, "query-named-block-nodes", json!({"flat": true})).await;
    let node = &nodes["return"][0];
    assert_eq!(node["drv"], "rbd");
    assert_eq!(node["image"]["virtual-size"], 64 << 20);
    assert_eq!(node["image"]["cluster-size"], 1 << 20);
    reply(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "r", "writable": true}),
    )
    .await;
    let uri = format!("nbd+unix:///r?socket={}", sock.display());
    for command in [
        "write -P 0x11 1M 3M",
        "write -P 0x22 40M 64k",
        "write -z 1M 64k",
    ] {
        assert_eq!(qemu_io_outcome(&["-f", "raw", "-c", command, &uri]), "ok");
    }
    // The same writes on a local file give the expected disk.
    let expected = p(dir.path(), "expected.raw");
    qemu_img(&["create", "-q", "-f", "raw", &expected, "64M"]);
    for command in [
        "write -P 0x11 1M 3M",
        "write -P 0x22 40M 64k",
        "write -z 1M 64k",
    ] {
        qemu_io_outcome(&["-f", "raw", "-c", command, &expected]);
    }
    assert_same(&uri, &expected);
    delete_export_when_unused(&mut c, "e").await;
    assert_same(&exported(dir.path(), &image), &expected);
    // Block status: only the written objects are data; the rest reads as zeroes.
    reply(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e2", "node-name": "r"}),
    )
    .await;
    let map: Value =
        serde_json::from_str(&qemu_img(&["map", "--output=json", "-f", "raw", &uri])).unwrap();
    let data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    let diff: Value = serde_json::from_str(&rbd(&["diff", "--format", "json", &image])).unwrap();
    let allocated: Vec<(u64, u64)> = diff
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    let total = |runs: &[(u64, u64)]| runs.iter().map(|r| r.1).sum::<u64>();
    assert_eq!(
        total(&data),
        total(&allocated),
        "map {data:?} vs rbd diff {allocated:?}"
    );
    assert!(
        total(&data) < 8 << 20,
        "most of the image was never written: {data:?}"
    );
    daemon.quit(&mut c).await;
    rbd(&["rm", &image]);
}

/// Waits for `event` of job `id` and returns its data.
async fn job_event(c: &mut qmp::Client, event: &str, id: &str) -> Value {
    loop {
        let e = c.wait_event(event, WAIT).await.expect(event);
        if e["data"]["device"] == id || e["data"]["id"] == id {
            return e["data"].clone();
        }
    }
}

/// Jobs across the engine: a local disk backed up into the cluster, a running disk moved
/// into it by a mirror with pivot while a client writes, an rbd disk mirrored out, and
/// an incremental backup of an rbd disk from a dirty bitmap.
#[tokio::test]
async fn jobs_move_disks_into_and_out_of_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let local = p(d, "local.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &local, "32M"]);
    for command in [
        "write -P 0x41 0 2M",
        "write -P 0x42 17M 1M",
        "write -P 0x43 31M 1M",
    ] {
        qemu_io_outcome(&["-f", "qcow2", "-c", command, &local]);
    }
    let (backup, moved) = (unique("backup"), unique("moved"));
    for image in [&backup, &moved] {
        rbd(&["create", "--size", "32M", image]);
    }
    let sock = d.join("nbd.sock");
    let mut args = vec![
        s("--blockdev"),
        format!("driver=qcow2,node-name=l,file.driver=file,file.filename={local}"),
    ];
    args.extend(nbd_server_args(&sock));
    let daemon = Daemon::start(Impl::Blockd, d, &args);
    let mut c = daemon.qmp().await;
    for (node, image) in [("bk", &backup), ("mv", &moved)] {
        assert_eq!(
            reply(&mut c, "blockdev-add", rbd_node(node, image)).await,
            json!({"return": {}})
        );
    }
    let local_raw = p(d, "local.raw");
    qemu_img(&[
        "convert", "-U", "-f", "qcow2", "-O", "raw", &local, &local_raw,
    ]);

    // A local disk backed up into the cluster.
    start_job(
        &mut c,
        "blockdev-backup",
        json!({"job-id": "b", "device": "l", "target": "bk", "sync": "full"}),
    )
    .await;
    let done = job_event(&mut c, "BLOCK_JOB_COMPLETED", "b").await;
    assert!(done.get("error").is_none(), "{done}");
    assert_same(&exported(d, &backup), &local_raw);
    // A sparse backup: only the three 4 MiB objects that hold the source's data exist.
    // (The unallocated rest of those objects is written as zeroes, which librbd stores
    // in the object; objects with no data are left out.)
    assert_eq!(written_bytes(&backup), 3 * (4 << 20));

    // The running disk moves into the cluster: a client writes through the mirror, and
    // after the pivot its writes go to the rbd image.
    let uri = writable_export(&mut c, &sock, "e", "disk", "l").await;
    start_job(
        &mut c,
        "blockdev-mirror",
        json!({"job-id": "m", "device": "l", "target": "mv", "sync": "full"}),
    )
    .await;
    assert_eq!(
        qemu_io_outcome(&["-f", "raw", "-c", "write -P 0x51 8M 1M", &uri]),
        "ok"
    );
    job_event(&mut c, "BLOCK_JOB_READY", "m").await;
    assert_eq!(
        qemu_io_outcome(&["-f", "raw", "-c", "write -P 0x52 9M 64k", &uri]),
        "ok"
    );
    reply(&mut c, "block-job-complete", json!({"device": "m"})).await;
    let done = job_event(&mut c, "BLOCK_JOB_COMPLETED", "m").await;
    assert!(done.get("error").is_none(), "{done}");
    assert_eq!(
        qemu_io_outcome(&["-f", "raw", "-c", "write -P 0x53 10M 64k", &uri]),
        "ok"
    );
    for command in [
        "write -P 0x51 8M 1M",
        "write -P 0x52 9M 64k",
        "write -P 0x53 10M 64k",
    ] {
        qemu_io_outcome(&["-f", "raw", "-c", command, &local_raw]);
    }
    assert_same(&uri, &local_raw);
    delete_export_when_unused(&mut c, "e").await;
    let flushed = exported(d, &moved);
    assert_same(&flushed, &local_raw);

    // An rbd disk mirrored out of the cluster into a local image.
    let out = local_qcow2(&mut c, d, "out", "32M").await;
    start_job(
        &mut c,
        "blockdev-mirror",
        json!({"job-id": "o", "device": "bk", "target": "out", "sync": "full"}),
    )
    .await;
    job_event(&mut c, "BLOCK_JOB_READY", "o").await;
    reply(&mut c, "block-job-cancel", json!({"device": "o"})).await;
    job_event(&mut c, "BLOCK_JOB_COMPLETED", "o").await;

    // Incremental backup of an rbd disk: only what the bitmap saw is copied.
    let added = reply(
        &mut c,
        "block-dirty-bitmap-add",
        json!({"node": "bk", "name": "b0", "granularity": 65536}),
    )
    .await;
    assert_eq!(added, json!({"return": {}}));
    let bk_uri = writable_export(&mut c, &sock, "e2", "bk", "bk").await;
    assert_eq!(
        qemu_io_outcome(&["-f", "raw", "-c", "write -P 0x61 5M 64k", &bk_uri]),
        "ok"
    );
    let inc = local_qcow2(&mut c, d, "inc", "32M").await;
    start_job(
        &mut c,
        "blockdev-backup",
        json!({"job-id": "i", "device": "bk", "target": "inc", "sync": "incremental",
               "bitmap": "b0"}),
    )
    .await;
    let done = job_event(&mut c, "BLOCK_JOB_COMPLETED", "i").await;
    assert!(done.get("error").is_none(), "{done}");
    daemon.quit(&mut c).await;
    // The mirrored-out copy is the backup image as it was.
    assert_same(&p(d, &format!("{backup}.raw")), &{
        let raw = p(d, "out.raw");
        qemu_img(&["convert", "-f", "qcow2", "-O", "raw", &out, &raw]);
        raw
    });
    let map: Value =
        serde_json::from_str(&qemu_img(&["map", "--output=json", "-f", "qcow2", &inc])).unwrap();
    let data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        data,
        vec![(5 << 20, 64 << 10)],
        "incremental backup copied {data:?}"
    );
    assert_eq!(
        qemu_io_outcome(&["-f", "qcow2", "-c", "read -P 0x61 5M 64k", &inc]),
        "ok"
    );
    for image in [&backup, &moved] {
        rbd(&["rm", image]);
    }
}

/// Internal snapshots are RBD snapshots; a snapshot opens read-only with the data it
/// holds; block_resize resizes the image.
#[tokio::test]
async fn snapshots_and_resize_are_the_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let image = unique("snap");
    rbd(&["create", "--size", "16M", &image]);
    let sock = dir.path().join("nbd.sock");
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &nbd_server_args(&sock));
    let mut c = daemon.qmp().await;
    reply(&mut c, "blockdev-add", rbd_node("r", &image)).await;
    let uri = writable_export(&mut c, &sock, "e", "r", "r").await;
    assert_eq!(
        qemu_io_outcome(&["-f", "raw", "-c", "write -P 0x71 0 1M", &uri]),
        "ok"
    );
    let taken = reply(
        &mut c,
        "blockdev-snapshot-internal-sync",
        json!({"device": "r", "name": "before"}),
    )
    .await;
    assert_eq!(taken, json!({"return": {}}));
    assert!(rbd(&["snap", "ls", &image]).contains("before"));
    assert_eq!(
        qemu_io_outcome(&["-f", "raw", "-c", "write -P 0x72 0 1M", &uri]),
        "ok"
    );
    // The snapshot needs read-only (or auto-read-only) and holds the old data.
    let mut at_snapshot = rbd_node("old", &image);
    at_snapshot["snapshot"] = json!("before");
    let refused = reply(&mut c, "blockdev-add", at_snapshot.clone()).await;
    assert_eq!(refused["error"]["desc"], "rbd snapshots are read-only");
    at_snapshot["read-only"] = json!(true);
    assert_eq!(
        reply(&mut c, "blockdev-add", at_snapshot).await,
        json!({"return": {}})
    );
    reply(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e2", "name": "old", "node-name": "old"}),
    )
    .await;
    let old = format!("nbd+unix:///old?socket={}", sock.display());
    assert_eq!(
        qemu_io_outcome(&["-r", "-f", "raw", "-c", "read -P 0x71 0 1M", &old]),
        "ok"
    );
    assert_eq!(
        qemu_io_outcome(&["-f", "raw", "-c", "read -P 0x72 0 1M", &uri]),
        "ok"
    );
    let listed = reply(&mut c, "query-named-block-nodes", json!({"flat": true})).await;
    let snapshots = listed["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "r")
        .map(|n| n["image"]["snapshots"].clone())
        .unwrap();
    assert_eq!(snapshots[0]["name"], "before", "{snapshots}");
    delete_export_when_unused(&mut c, "e2").await;
    reply(&mut c, "blockdev-del", json!({"node-name": "old"})).await;
    let deleted = reply(
        &mut c,
        "blockdev-snapshot-delete-internal-sync",
        json!({"device": "r", "name": "before"}),
    )
    .await;
    assert_eq!(deleted["return"]["name"], "before", "{deleted}");
    assert!(!rbd(&["snap", "ls", &image]).contains("before"));
    // An NBD export does not let its node be resized (as in QEMU).
    delete_export_when_unused(&mut c, "e").await;
    let resized = reply(
        &mut c,
        "block_resize",
        json!({"node-name": "r", "size": 48 << 20}),
    )
    .await;
    assert_eq!(resized, json!({"return": {}}));
    let info: Value = serde_json::from_str(&rbd(&["info", "--format", "json", &image])).unwrap();
    assert_eq!(info["size"], 48 << 20, "{info}");
    daemon.quit(&mut c).await;
    rbd(&["rm", &image]);
}

/// client.admin's cephx key, from the cluster's keyring.
fn admin_key() -> String {
    let keyring = std::fs::read_to_string(cluster().with_file_name("keyring")).unwrap();
    let admin = keyring.split("[client.admin]").nth(1).unwrap();
    let line = admin
        .lines()
        .find(|l| l.trim().starts_with("key ="))
        .unwrap();
    line.split('=')
        .skip(1)
        .collect::<Vec<_>>()
        .join("=")
        .trim()
        .to_string()
}

/// The monitor's port, from the cluster's ceph.conf.
fn mon_port() -> String {
    let conf = std::fs::read_to_string(cluster()).unwrap();
    let host = conf.lines().find(|l| l.starts_with("mon host")).unwrap();
    host.rsplit(':').next().unwrap().trim().to_string()
}

/// Without a ceph.conf: the monitors from `server`, the user, its cephx key from a secret
/// object and the accepted auth modes; a wrong key or a mode the cluster does not offer is
/// refused at connect.
#[tokio::test]
async fn cephx_credentials_come_from_options_and_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let image = unique("cephx");
    rbd(&["create", "--size", "8M", &image]);
    let key = admin_key();
    let wrong = base64_of(&[7u8; 16]);
    let args = vec![
        s("--object"),
        format!("secret,id=key0,data={key},format=base64"),
        s("--object"),
        format!("secret,id=bad,data={wrong},format=base64"),
    ];
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &args);
    let mut c = daemon.qmp().await;
    let node = |name: &str, secret: &str, modes: Value| {
        json!({"driver": "rbd", "node-name": name, "pool": "rbd", "image": image,
               "user": "admin", "key-secret": secret, "auth-client-required": modes,
               "server": [{"host": "127.0.0.1", "port": mon_port()}]})
    };
    let refused = reply(&mut c, "blockdev-add", node("w", "bad", json!(["cephx"]))).await;
    let text = refused["error"]["desc"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(text.starts_with("error connecting"), "{refused}");
    let refused = reply(&mut c, "blockdev-add", node("n", "key0", json!(["none"]))).await;
    let text = refused["error"]["desc"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(text.starts_with("error connecting"), "{refused}");
    let missing = reply(&mut c, "blockdev-add", node("m", "nokey", json!(["cephx"]))).await;
    assert_eq!(
        missing["error"]["desc"], "No secret with id 'nokey'",
        "{missing}"
    );
    assert_eq!(
        reply(
            &mut c,
            "blockdev-add",
            node("r", "key0", json!(["cephx", "none"]))
        )
        .await,
        json!({"return": {}})
    );
    let sock = dir.path().join("nbd.sock");
    reply(
        &mut c,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}}}),
    )
    .await;
    let uri = writable_export(&mut c, &sock, "e", "r", "r").await;
    assert_eq!(
        qemu_io_outcome(&["-f", "raw", "-c", "write -P 0x33 2M 64k", &uri]),
        "ok"
    );
    delete_export_when_unused(&mut c, "e").await;
    daemon.quit(&mut c).await;
    let raw = exported(dir.path(), &image);
    assert_eq!(
        qemu_io_outcome(&["-f", "raw", "-c", "read -P 0x33 2M 64k", &raw]),
        "ok"
    );
    rbd(&["rm", &image]);
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// librbd's own LUKS: blockdev-create formats the image, a node with `encrypt` reads and
/// writes plain data, what lands in the cluster is ciphertext that QEMU's own LUKS driver
/// (LUKS1) and cryptsetup (LUKS2) open with the same passphrase, and a wrong passphrase
/// is refused.
#[tokio::test]
async fn encrypted_images_are_luks_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let conf = cluster().to_str().unwrap().to_string();
    let sock = d.join("nbd.sock");
    let mut args = vec![
        s("--object"),
        s("secret,id=pw,data=correct horse"),
        s("--object"),
        s("secret,id=wrong,data=battery staple"),
    ];
    args.extend(nbd_server_args(&sock));
    let daemon = Daemon::start(Impl::Blockd, d, &args);
    let mut c = daemon.qmp().await;
    for (version, format) in [("v1", "luks"), ("v2", "luks2")] {
        let image = unique(&format!("enc-{version}"));
        let location = json!({"pool": "rbd", "image": image, "conf": conf});
        let refused = create(
            &mut c,
            "c",
            json!({"driver": "rbd", "location": location, "size": 32 << 20,
                   "encrypt": {"format": format, "key-secret": "pw", "cipher-alg": "twofish-128"}}),
        )
        .await;
        assert!(
            refused
                .to_string()
                .contains("unknown encryption algorithm: twofish-128"),
            "{refused}"
        );
        let made = create(
            &mut c,
            "c",
            json!({"driver": "rbd", "location": location, "size": 32 << 20,
                   "encrypt": {"format": format, "key-secret": "pw"}}),
        )
        .await;
        assert!(!made.to_string().contains("error"), "{made}");
        let mut node = rbd_node("wrongkey", &image);
        node["encrypt"] = json!({"format": format, "key-secret": "wrong"});
        let refused = reply(&mut c, "blockdev-add", node).await;
        let text = refused["error"]["desc"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(text.starts_with("encryption load fail"), "{refused}");
        let mut node = rbd_node("enc", &image);
        node["encrypt"] = json!({"format": "luks-any", "key-secret": "pw"});
        assert_eq!(
            reply(&mut c, "blockdev-add", node).await,
            json!({"return": {}})
        );
        let nodes = reply(&mut c, "query-named-block-nodes", json!({"flat": true})).await;
        let info = &nodes["return"][0];
        assert_eq!(info["encrypted"], true, "{info}");
        assert_eq!(
            info["image"]["format-specific"]["data"]["encryption-format"], format,
            "{info}"
        );
        reply(
            &mut c,
            "block-export-add",
            json!({"type": "nbd", "id": "e", "name": "enc", "node-name": "enc",
                   "writable": true}),
        )
        .await;
        let uri = format!("nbd+unix:///enc?socket={}", sock.display());
        assert_eq!(
            qemu_io_outcome(&["-f", "raw", "-c", "write -P 0x5e 1M 1M", &uri]),
            "ok"
        );
        assert_eq!(
            qemu_io_outcome(&["-f", "raw", "-c", "read -P 0x5e 1M 1M", &uri]),
            "ok"
        );
        delete_export_when_unused(&mut c, "e").await;
        reply(&mut c, "blockdev-del", json!({"node-name": "enc"})).await;
        let raw = exported(d, &image);
        // The cluster holds ciphertext, no run of the plain pattern.
        let bytes = std::fs::read(&raw).unwrap();
        assert!(
            !bytes.windows(4096).any(|w| w.iter().all(|&b| b == 0x5e)),
            "plain data reached the cluster"
        );
        if version == "v1" {
            let opts = format!("driver=luks,key-secret=pw,file.driver=file,file.filename={raw}");
            let out = run(Command::new("qemu-io").args([
                "--object",
                "secret,id=pw,data=correct horse",
                "--image-opts",
                &opts,
                "-c",
                "read -P 0x5e 1M 1M",
            ]));
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("read 1048576/1048576"),
                "qemu's LUKS driver on the exported image: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            let out = run(Command::new("cryptsetup").args(["luksDump", &raw]));
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("Version:       \t2"), "luksDump: {text}");
        }
        rbd(&["rm", &image]);
    }
    daemon.quit(&mut c).await;
}
