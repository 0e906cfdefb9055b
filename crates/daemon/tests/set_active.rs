//! blockdev-set-active, blockdev-add's `active` and the exports' allow-inactive, side by
//! side with qsd: a handover session (the image written by another process while the
//! daemon is inactive, then read back through the daemon after it takes the image back),
//! refusals, a failed activation that puts every node back as it was, and a migration
//! between two blockd daemons.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

/// The command line that opens `image` as file node `f` under qcow2 node `q`.
fn qcow2_args(image: &str) -> Vec<String> {
    vec![
        s("--blockdev"),
        format!("driver=file,node-name=f,filename={image}"),
        s("--blockdev"),
        s("driver=qcow2,node-name=q,file=f"),
    ]
}

/// One qemu-io command on the export `e` of the server listening on `sock`.
fn over_nbd(sock: &Path, command: &str) -> Value {
    let uri = format!("nbd+unix:///e?socket={}", sock.display());
    json!(qemu_io_outcome(&["-f", "raw", "-c", command, &uri]))
}

/// The same session on one daemon; every reply and I/O outcome in order.
async fn handover_session(which: Impl, dir: &Path) -> (Vec<Value>, String) {
    let (_, image) = tagged_qcow2(dir, which, "64M");
    qemu_io_outcome(&["-f", "qcow2", "-c", "write -P 1 0 1M", &image]);
    let sock = dir.join("nbd.sock");
    let mountpoint = p(dir, "mnt");
    std::fs::write(&mountpoint, b"").unwrap();
    let mut args = qcow2_args(&image);
    args.extend(nbd_server_args(&sock));
    let daemon = Daemon::start(which, dir, &args);
    let mut c = daemon.qmp().await;
    let mut seen = Vec::new();
    let export = |id: &str, allow: Option<bool>| {
        let mut a = json!({ "type": "nbd", "id": id, "name": "e", "node-name": "q",
                            "writable": true });
        if let Some(allow) = allow {
            a["allow-inactive"] = json!(allow);
        }
        a
    };
    seen.push(reply(&mut c, "block-export-add", export("e1", Some(true))).await);
    seen.push(reply(&mut c, "blockdev-set-active", json!({ "active": false })).await);
    seen.push(node_flags(&mut c, "active").await);
    // Reads go on; anything that writes, and block status, is refused.
    for command in [
        "read -P 1 0 4k",
        "write -P 3 0 4k",
        "discard 0 64k",
        "write -z 0 64k",
    ] {
        seen.push(over_nbd(&sock, command));
    }
    // The image is free for another process, which allocates clusters in it.
    seen.push(json!(qemu_io_outcome(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 2 8M 64k",
        &image
    ])));
    seen.push(reply(&mut c, "blockdev-set-active", json!({ "active": true })).await);
    seen.push(node_flags(&mut c, "active").await);
    // Taken back: what the other process wrote is what the export serves.
    seen.push(over_nbd(&sock, "read -P 2 8M 64k"));
    seen.push(over_nbd(&sock, "write -P 4 16M 64k"));
    // One node: its file follows, as no active node uses it; the file alone comes back.
    for (node, active) in [("q", false), ("f", true), ("f", false)] {
        seen.push(
            reply(
                &mut c,
                "blockdev-set-active",
                json!({ "node-name": node, "active": active }),
            )
            .await,
        );
        seen.push(node_flags(&mut c, "active").await);
    }
    seen.push(
        reply(
            &mut c,
            "blockdev-add",
            json!({ "driver": "raw", "node-name": "r", "file": "q" }),
        )
        .await,
    );
    seen.push(
        reply(
            &mut c,
            "block-export-add",
            json!({ "type": "fuse", "id": "x", "node-name": "q", "mountpoint": mountpoint,
                    "allow-inactive": true }),
        )
        .await,
    );
    // An export that needs the node active takes it back, then keeps it so.
    seen.push(reply(&mut c, "block-export-del", json!({ "id": "e1" })).await);
    c.wait_event("BLOCK_EXPORT_DELETED", WAIT).await;
    seen.push(reply(&mut c, "block-export-add", export("e2", None)).await);
    seen.push(node_flags(&mut c, "active").await);
    seen.push(reply(&mut c, "blockdev-set-active", json!({ "active": false })).await);
    for node in ["q", "f"] {
        seen.push(
            reply(
                &mut c,
                "blockdev-set-active",
                json!({ "node-name": node, "active": false }),
            )
            .await,
        );
    }
    seen.push(node_flags(&mut c, "active").await);
    seen.push(over_nbd(&sock, "read -P 4 16M 64k"));
    seen.push(over_nbd(&sock, "read -P 2 8M 64k"));
    // The target's side: opened inactive while this daemon's own export holds the image;
    // taking it over then meets that lock.
    for (driver, name, file) in [
        ("file", "f2", json!({ "filename": image })),
        ("qcow2", "q2", json!({ "file": "f2" })),
    ] {
        let mut add = json!({ "driver": driver, "node-name": name, "active": false });
        add.as_object_mut()
            .unwrap()
            .extend(file.as_object().unwrap().clone());
        seen.push(reply(&mut c, "blockdev-add", add).await);
    }
    seen.push(node_flags(&mut c, "active").await);
    seen.push(
        reply(
            &mut c,
            "blockdev-set-active",
            json!({ "node-name": "q2", "active": true }),
        )
        .await,
    );
    // Bad arguments.
    for args in [
        json!({ "active": "x" }),
        json!({}),
        json!({ "node-name": "nope", "active": true }),
        json!({ "node-name": "", "active": false }),
        json!({ "active": true, "extra": 1 }),
    ] {
        seen.push(reply(&mut c, "blockdev-set-active", args).await);
    }
    daemon.quit(&mut c).await;
    (seen, image)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_session_as_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let mut images = Vec::new();
    let mut sessions = Vec::new();
    for which in Impl::all() {
        let wd = dir.path().join(format!("{which:?}"));
        std::fs::create_dir_all(&wd).unwrap();
        let (seen, image) = handover_session(which, &wd).await;
        sessions.push(normalize(Value::from(seen)));
        images.push(image);
    }
    if let Some(diff) = first_difference(&sessions[0], &sessions[1]) {
        panic!(
            "blockd and qsd differ: {diff}\nblockd: {:#}\nqsd: {:#}",
            sessions[0], sessions[1]
        );
    }
    // Both images took the same writes and are intact.
    for image in &images {
        qemu_img(&["check", "-q", image]);
    }
    qemu_img(&["compare", "-q", &images[0], &images[1]]);
}

/// Taking an image back while another process holds it fails with qsd's text, and every
/// node the call had already activated goes back to inactive (qsd leaves the file node
/// active and locked). Once the other process is gone, the same call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_activation_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = p(dir.path(), "a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &image, "16M"]);
    let args = qcow2_args(&image);
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &args);
    let mut c = daemon.qmp().await;
    c.execute("blockdev-set-active", json!({ "active": false }))
        .await
        .unwrap();
    let sock = dir.path().join("holder.sock");
    let holder = KillOnDrop(
        Command::new("qemu-nbd")
            .args(["-f", "qcow2", "-k"])
            .arg(&sock)
            .arg(&image)
            .spawn()
            .unwrap_or_else(|_| panic!("{}", missing_peer("qemu-nbd"))),
    );
    let deadline = std::time::Instant::now() + WAIT;
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-nbd never listened"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let refused = c
        .execute("blockdev-set-active", json!({ "active": true }))
        .await
        .unwrap_err();
    assert_eq!(refused.desc, "Failed to get \"write\" lock");
    assert_eq!(
        node_flags(&mut c, "active").await,
        json!([["f", false], ["q", false]])
    );
    drop(holder);
    let deadline = std::time::Instant::now() + WAIT;
    while let Err(e) = c
        .execute("blockdev-set-active", json!({ "active": true }))
        .await
    {
        assert!(std::time::Instant::now() < deadline, "{}", e.desc);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        node_flags(&mut c, "active").await,
        json!([["f", true], ["q", true]])
    );
    daemon.quit(&mut c).await;
    qemu_img(&["check", "-q", &image]);
}

/// A migration between two blockd daemons: the target opens the image inactive while the
/// source holds it, takes it over once the source lets go, and serves what the source
/// wrote; the source cannot take it back while the target holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_between_two_daemons() {
    let dir = tempfile::tempdir().unwrap();
    let image = p(dir.path(), "a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &image, "32M"]);
    let node_args = |active: bool| {
        vec![
            s("--blockdev"),
            format!("driver=file,node-name=f,filename={image},active={active}"),
            s("--blockdev"),
            format!("driver=qcow2,node-name=q,file=f,active={active}"),
        ]
    };
    let (src_dir, dst_dir) = (dir.path().join("src"), dir.path().join("dst"));
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::create_dir_all(&dst_dir).unwrap();
    let src_sock = src_dir.join("nbd.sock");
    let mut args = node_args(true);
    args.extend(nbd_server_args(&src_sock));
    args.extend([
        s("--export"),
        s("type=nbd,id=e,name=e,node-name=q,writable=on,allow-inactive=on"),
    ]);
    let source = Daemon::start(Impl::Blockd, &src_dir, &args);
    let mut src = source.qmp().await;
    assert_eq!(over_nbd(&src_sock, "write -P 5 4M 64k"), json!("ok"));
    let target = Daemon::start(Impl::Blockd, &dst_dir, &node_args(false));
    let mut dst = target.qmp().await;
    assert_eq!(
        node_flags(&mut dst, "active").await,
        json!([["f", false], ["q", false]])
    );
    let take_over = json!({ "active": true });
    let held = dst
        .execute("blockdev-set-active", take_over.clone())
        .await
        .unwrap_err();
    assert_eq!(held.desc, "Failed to get \"write\" lock");
    src.execute("blockdev-set-active", json!({ "active": false }))
        .await
        .unwrap();
    dst.execute("blockdev-set-active", take_over.clone())
        .await
        .unwrap();
    let dst_sock = dst_dir.join("nbd.sock");
    dst.execute(
        "nbd-server-start",
        json!({ "addr": { "type": "unix", "data": { "path": dst_sock } } }),
    )
    .await
    .unwrap();
    dst.execute(
        "block-export-add",
        json!({ "type": "nbd", "id": "e", "name": "e", "node-name": "q", "writable": true }),
    )
    .await
    .unwrap();
    assert_eq!(over_nbd(&dst_sock, "read -P 5 4M 64k"), json!("ok"));
    assert_eq!(over_nbd(&dst_sock, "write -P 6 12M 64k"), json!("ok"));
    // The source still serves reads of what it had, and cannot take the image back.
    assert_eq!(over_nbd(&src_sock, "read -P 5 4M 64k"), json!("ok"));
    let back = src
        .execute("blockdev-set-active", take_over)
        .await
        .unwrap_err();
    assert_eq!(back.desc, "Failed to get \"write\" lock");
    // Any format can be opened inactive, and is taken over once its image is free.
    let vmdk = p(dir.path(), "b.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", &vmdk, "1M"]);
    qemu_io_outcome(&["-f", "vmdk", "-c", "write -P 7 0 64k", &vmdk]);
    dst.execute(
        "blockdev-add",
        json!({ "driver": "vmdk", "node-name": "v", "active": false,
                "file": { "driver": "file", "filename": vmdk, "node-name": "vf" } }),
    )
    .await
    .unwrap();
    dst.execute(
        "blockdev-set-active",
        json!({ "node-name": "v", "active": true }),
    )
    .await
    .unwrap();
    dst.execute(
        "block-export-add",
        json!({ "type": "nbd", "id": "v", "name": "v", "node-name": "v", "writable": true }),
    )
    .await
    .unwrap();
    let v = |command: &str| {
        let uri = format!("nbd+unix:///v?socket={}", dst_sock.display());
        qemu_io_outcome(&["-f", "raw", "-c", command, &uri])
    };
    assert_eq!(v("read -P 7 0 64k"), "ok");
    assert_eq!(v("write -P 8 512k 64k"), "ok");
    target.quit(&mut dst).await;
    source.quit(&mut src).await;
    qemu_img(&["check", "-q", &image]);
    assert_eq!(
        qemu_io_outcome(&["-f", "qcow2", "-c", "read -P 6 12M 64k", &image]),
        "ok"
    );
    qemu_img(&["check", "-q", &vmdk]);
    assert_eq!(
        qemu_io_outcome(&["-f", "vmdk", "-c", "read -P 8 512k 64k", &vmdk]),
        "ok"
    );
}

/// The node's dirty bitmaps (name, count, persistent, recording) as query-named-block-nodes
/// lists them.
async fn bitmaps_of(c: &mut qmp::Client, node: &str) -> Value {
    let nodes = c
        .execute("query-named-block-nodes", json!({ "flat": true }))
        .await
        .unwrap();
    let entry = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .unwrap()
        .clone();
    let list: Vec<Value> = entry["dirty-bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| json!([b["name"], b["count"], b["persistent"], b["recording"]]))
        .collect();
    json!(list)
}

/// The bitmaps the image's directory lists, as `qemu-img info` reads them.
fn listed_in_image(image: &str) -> Value {
    let info: Value =
        serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", image])).unwrap();
    info["format-specific"]["data"]["bitmaps"].clone()
}

/// Persistent bitmaps go with the image: stored (no longer in use) when the node is
/// inactivated and released from memory, changed by another process meanwhile, and loaded
/// back on activation with what that process recorded; side by side with qsd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_bitmaps_go_with_the_image_as_in_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let mut sessions = Vec::new();
    for which in Impl::all() {
        let wd = dir.path().join(format!("{which:?}"));
        std::fs::create_dir_all(&wd).unwrap();
        let (_, image) = tagged_qcow2(&wd, which, "64M");
        let sock = wd.join("nbd.sock");
        let mut args = qcow2_args(&image);
        args.extend(nbd_server_args(&sock));
        let daemon = Daemon::start(which, &wd, &args);
        let mut c = daemon.qmp().await;
        let mut seen = Vec::new();
        for (command, arguments) in [
            (
                "block-dirty-bitmap-add",
                json!({ "node": "q", "name": "b0", "persistent": true }),
            ),
            (
                "block-export-add",
                json!({ "type": "nbd", "id": "e", "name": "e", "node-name": "q",
                        "writable": true, "allow-inactive": true }),
            ),
        ] {
            seen.push(reply(&mut c, command, arguments).await);
        }
        seen.push(over_nbd(&sock, "write -P 1 0 64k"));
        seen.push(bitmaps_of(&mut c, "q").await);
        seen.push(reply(&mut c, "blockdev-set-active", json!({ "active": false })).await);
        seen.push(listed_in_image(&image));
        seen.push(bitmaps_of(&mut c, "q").await);
        // Another process writes, and the bitmap in the image records it.
        seen.push(json!(qemu_io_outcome(&[
            "-f",
            "qcow2",
            "-c",
            "write -P 2 1M 128k",
            &image
        ])));
        seen.push(reply(&mut c, "blockdev-set-active", json!({ "active": true })).await);
        seen.push(bitmaps_of(&mut c, "q").await);
        seen.push(
            reply(
                &mut c,
                "x-debug-block-dirty-bitmap-sha256",
                json!({ "node": "q", "name": "b0" }),
            )
            .await,
        );
        seen.push(over_nbd(&sock, "write -P 3 4M 64k"));
        seen.push(bitmaps_of(&mut c, "q").await);
        seen.push(reply(&mut c, "block-export-del", json!({ "id": "e" })).await);
        c.wait_event("BLOCK_EXPORT_DELETED", WAIT).await;
        daemon.quit(&mut c).await;
        seen.push(listed_in_image(&image));
        qemu_img(&["check", "-q", &image]);
        sessions.push(normalize(Value::from(seen)));
    }
    if let Some(diff) = first_difference(&sessions[0], &sessions[1]) {
        panic!(
            "blockd and qsd differ: {diff}\nblockd: {:#}\nqsd: {:#}",
            sessions[0], sessions[1]
        );
    }
}

/// A running job keeps the nodes it works on active: the source behind the job's filter
/// and the target it writes, with qsd's replies. Asked for every node, qsd inactivates
/// them under the running job; blockd refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_keeps_its_nodes_active() {
    let dir = tempfile::tempdir().unwrap();
    let image = p(dir.path(), "a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &image, "64M"]);
    let mut args = qcow2_args(&image);
    args.extend([
        s("--blockdev"),
        s("driver=null-co,node-name=n,size=67108864"),
    ]);
    let set = |node: Option<&str>| match node {
        Some(node) => json!({ "node-name": node, "active": false }),
        None => json!({ "active": false }),
    };
    let requests = [
        (
            "blockdev-backup",
            json!({ "job-id": "j", "device": "q", "target": "n", "sync": "full",
                    "speed": 1 }),
        ),
        ("blockdev-set-active", set(Some("q"))),
        ("blockdev-set-active", set(Some("n"))),
        ("blockdev-set-active", set(Some("f"))),
        ("blockdev-set-active", set(None)),
        ("block-job-cancel", json!({ "device": "j", "force": true })),
    ];
    let [mut blockd, mut qsd] = replies_of_both(dir.path(), &args, &requests).await;
    assert_eq!(
        blockd[4],
        json!({ "error": { "class": "GenericError",
                           "desc": "Failed to inactivate all nodes: Operation not permitted" } })
    );
    assert_eq!(qsd[4], json!({ "return": {} }));
    blockd.as_array_mut().unwrap().remove(4);
    qsd.as_array_mut().unwrap().remove(4);
    assert_eq!(blockd, qsd);
}

/// The dirty extents (offset, length) that an export of `sock` reports for `bitmap`.
fn dirty_extents(sock: &Path, bitmap: &str) -> Vec<(u64, u64)> {
    let uri = format!("nbd+unix:///e?socket={}", sock.display());
    let out = run(Command::new("nbdinfo").args([
        &format!("--map=qemu:dirty-bitmap:{bitmap}"),
        "--json",
        &uri,
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let extents: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    extents
        .iter()
        .filter(|e| e["type"] == 1)
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// An export serving a persistent bitmap keeps serving the node's bitmap across a
/// handover: after activation it shows what another process recorded while the daemon
/// was inactive, and what the daemon records from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_bitmap_follows_the_image_across_a_handover() {
    let dir = tempfile::tempdir().unwrap();
    let image = p(dir.path(), "a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &image, "16M"]);
    let sock = dir.path().join("nbd.sock");
    let mut args = qcow2_args(&image);
    args.extend(nbd_server_args(&sock));
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &args);
    let mut c = daemon.qmp().await;
    c.execute(
        "block-dirty-bitmap-add",
        json!({ "node": "q", "name": "b0", "persistent": true }),
    )
    .await
    .unwrap();
    c.execute(
        "block-export-add",
        json!({ "type": "nbd", "id": "e", "name": "e", "node-name": "q", "writable": true,
                "allow-inactive": true, "bitmaps": ["b0"] }),
    )
    .await
    .unwrap();
    assert_eq!(over_nbd(&sock, "write -P 1 0 64k"), json!("ok"));
    c.execute("blockdev-set-active", json!({ "active": false }))
        .await
        .unwrap();
    assert_eq!(
        qemu_io_outcome(&["-f", "qcow2", "-c", "write -P 2 1M 128k", &image]),
        "ok"
    );
    c.execute("blockdev-set-active", json!({ "active": true }))
        .await
        .unwrap();
    let mib = 1 << 20;
    assert_eq!(
        dirty_extents(&sock, "b0"),
        vec![(0, 64 << 10), (mib, 128 << 10)]
    );
    assert_eq!(over_nbd(&sock, "write -P 3 4M 64k"), json!("ok"));
    assert_eq!(
        dirty_extents(&sock, "b0"),
        vec![(0, 64 << 10), (mib, 128 << 10), (4 * mib, 64 << 10)]
    );
    delete_export_when_unused(&mut c, "e").await;
    daemon.quit(&mut c).await;
    qemu_img(&["check", "-q", &image]);
}

/// A luks volume is handed over as qsd hands it over: inactive, it is another process's
/// to write; taken back, the daemon reads what that process wrote.
#[tokio::test]
async fn luks_volumes_are_handed_over_as_by_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let mut sessions = Vec::new();
    for which in Impl::all() {
        let (tag, _) = tagged_qcow2(dir.path(), which, "1M");
        let image = p(dir.path(), &format!("{tag}.luks"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            "secret,id=s,data=pw",
            "-o",
            "key-secret=s,iter-time=10",
            &image,
            "16M",
        ]);
        let sock = dir.path().join(format!("{tag}.nbd"));
        let mut args = vec![
            s("--object"),
            s("secret,id=s,data=pw"),
            s("--blockdev"),
            format!("driver=file,node-name=f,filename={image}"),
            s("--blockdev"),
            s("driver=luks,node-name=l,file=f,key-secret=s"),
        ];
        args.extend(nbd_server_args(&sock));
        let daemon = Daemon::start(which, dir.path(), &args);
        let mut c = daemon.qmp().await;
        let mut seen = Vec::new();
        seen.push(reply(&mut c, "blockdev-set-active", json!({ "active": false })).await);
        seen.push(node_flags(&mut c, "active").await);
        let other = format!("driver=luks,key-secret=s,file.filename={image}");
        let out = run(Command::new("qemu-io").args([
            "--object",
            "secret,id=s,data=pw",
            "--image-opts",
            &other,
            "-c",
            "write -P 0x2c 1M 64k",
        ]));
        seen.push(json!(out.status.success()));
        seen.push(reply(&mut c, "blockdev-set-active", json!({ "active": true })).await);
        seen.push(node_flags(&mut c, "active").await);
        seen.push(
            reply(
                &mut c,
                "block-export-add",
                json!({"type": "nbd", "id": "e", "name": "e", "node-name": "l"}),
            )
            .await,
        );
        seen.push(json!(qemu_io_outcome(&[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x2c 1M 64k",
            &format!("nbd+unix:///e?socket={}", sock.display()),
        ])));
        delete_export_when_unused(&mut c, "e").await;
        daemon.quit(&mut c).await;
        sessions.push(seen);
    }
    assert_eq!(
        sessions[1][2],
        json!(true),
        "the other process could not write"
    );
    assert_eq!(sessions[0], sessions[1], "blockd vs qsd");
}

/// The formats whose allocation tables another process changes while the node is
/// inactive; qsd keeps the tables it had, blockd reads them anew.
const TABLE_FORMATS: [&str; 7] = ["vmdk", "vhdx", "vpc", "vdi", "qed", "qcow", "parallels"];

/// Every format hands its image over: while the node is inactive another process allocates
/// clusters in it; taken back, the node reads them, and its own new clusters go elsewhere,
/// so the image checks clean and holds all three writes. With stale tables the other
/// process's data reads as zeroes, and the node's next new cluster lands on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn formats_with_tables_read_them_anew_on_activation() {
    for format in TABLE_FORMATS {
        let dir = tempfile::tempdir().unwrap();
        let image = p(dir.path(), &format!("a.{format}"));
        qemu_img(&["create", "-q", "-f", format, &image, "64M"]);
        let sock = dir.path().join("nbd.sock");
        let mut args = vec![
            s("--blockdev"),
            format!("driver=file,node-name=f,filename={image}"),
            s("--blockdev"),
            format!("driver={format},node-name=d,file=f"),
        ];
        args.extend(nbd_server_args(&sock));
        args.extend([
            s("--export"),
            s("type=nbd,id=e,name=e,node-name=d,writable=on,allow-inactive=on"),
        ]);
        let daemon = Daemon::start(Impl::Blockd, dir.path(), &args);
        let mut c = daemon.qmp().await;
        assert_eq!(over_nbd(&sock, "write -P 1 0 1M"), json!("ok"), "{format}");
        c.execute("blockdev-set-active", json!({ "active": false }))
            .await
            .unwrap();
        let other = qemu_io_outcome(&["-f", format, "-c", "write -P 2 8M 1M", &image]);
        assert_eq!(other, "ok", "{format}: the other process could not write");
        c.execute("blockdev-set-active", json!({ "active": true }))
            .await
            .unwrap();
        for command in ["read -P 2 8M 1M", "write -P 3 16M 1M", "read -P 1 0 1M"] {
            assert_eq!(over_nbd(&sock, command), json!("ok"), "{format}: {command}");
        }
        delete_export_when_unused(&mut c, "e").await;
        daemon.quit(&mut c).await;
        // qemu-img checks all of them but vpc and qcow.
        if !["vpc", "qcow"].contains(&format) {
            qemu_img(&["check", "-q", "-f", format, &image]);
        }
        for (pattern, at) in [(1, "0"), (2, "8M"), (3, "16M")] {
            let read = format!("read -P {pattern} {at} 1M");
            let outcome = qemu_io_outcome(&["-r", "-f", format, "-c", &read, &image]);
            assert_eq!(outcome, "ok", "{format}: {read} in the image");
        }
    }
}

/// An image whose layout changed while its node was inactive (grown by the other
/// process) is not taken back: the activation says why, and the node stays inactive and
/// keeps serving reads.
#[tokio::test]
async fn a_changed_layout_is_not_taken_back() {
    let dir = tempfile::tempdir().unwrap();
    let image = p(dir.path(), "a.qed");
    qemu_img(&["create", "-q", "-f", "qed", &image, "16M"]);
    qemu_io_outcome(&["-f", "qed", "-c", "write -P 4 0 64k", &image]);
    let sock = dir.path().join("nbd.sock");
    let mut args = vec![
        s("--blockdev"),
        format!("driver=file,node-name=f,filename={image}"),
        s("--blockdev"),
        s("driver=qed,node-name=d,file=f"),
    ];
    args.extend(nbd_server_args(&sock));
    args.extend([
        s("--export"),
        s("type=nbd,id=e,name=e,node-name=d,writable=on,allow-inactive=on"),
    ]);
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &args);
    let mut c = daemon.qmp().await;
    c.execute("blockdev-set-active", json!({ "active": false }))
        .await
        .unwrap();
    qemu_img(&["resize", "-q", "-f", "qed", &image, "32M"]);
    let refused = c
        .execute("blockdev-set-active", json!({ "active": true }))
        .await
        .unwrap_err();
    assert_eq!(
        refused.desc,
        "Could not activate the qed image: its header changed while the node was inactive; \
         open the image anew"
    );
    assert_eq!(
        node_flags(&mut c, "active").await,
        json!([["d", false], ["f", false]])
    );
    assert_eq!(over_nbd(&sock, "read -P 4 0 64k"), json!("ok"));
    assert_eq!(
        over_nbd(&sock, "write -P 5 0 64k"),
        json!("write failed: Operation not permitted")
    );
    delete_export_when_unused(&mut c, "e").await;
    daemon.quit(&mut c).await;
    qemu_img(&["check", "-q", "-f", "qed", &image]);
}

/// drop-cache (on by default) drops the file's pages from the host page cache on
/// activation, and x-check-cache-dropped proves it with mincore, in qsd's session too.
#[tokio::test]
async fn activation_drops_the_page_cache_as_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let mut sessions = Vec::new();
    for which in Impl::all() {
        let (tag, image) = tagged_qcow2(dir.path(), which, "16M");
        qemu_io_outcome(&["-f", "qcow2", "-c", "write -P 9 0 4M", &image]);
        let sock = dir.path().join(format!("{tag}.nbd"));
        let mut args = vec![
            s("--blockdev"),
            format!("driver=file,node-name=f,filename={image},x-check-cache-dropped=on"),
            s("--blockdev"),
            s("driver=qcow2,node-name=q,file=f"),
        ];
        args.extend(nbd_server_args(&sock));
        let daemon = Daemon::start(which, dir.path(), &args);
        let mut c = daemon.qmp().await;
        let mut seen = Vec::new();
        let export = json!({ "type": "nbd", "id": "e", "name": "e", "node-name": "q",
                             "writable": true, "allow-inactive": true });
        seen.push(reply(&mut c, "block-export-add", export).await);
        // The reads fill the page cache with the image's pages.
        seen.push(over_nbd(&sock, "read -P 9 0 4M"));
        seen.push(reply(&mut c, "blockdev-set-active", json!({ "active": false })).await);
        seen.push(json!(qemu_io_outcome(&[
            "-f",
            "qcow2",
            "-c",
            "write -P 10 1M 64k",
            &image
        ])));
        seen.push(reply(&mut c, "blockdev-set-active", json!({ "active": true })).await);
        seen.push(over_nbd(&sock, "read -P 10 1M 64k"));
        delete_export_when_unused(&mut c, "e").await;
        daemon.quit(&mut c).await;
        sessions.push(seen);
    }
    assert_eq!(sessions[0][4], json!({ "return": {} }), "{:?}", sessions[0]);
    assert_eq!(sessions[0], sessions[1], "blockd vs qsd");
}
