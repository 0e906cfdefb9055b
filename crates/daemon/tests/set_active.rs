//! blockdev-set-active and the exports' allow-inactive, side by side with qsd: a handover
//! session (the image written by another process while the daemon is inactive, then read
//! back through the daemon after it takes the image back), refusals, and a failed
//! activation that puts every node back as it was.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

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
    let mut args = vec![
        s("--blockdev"),
        format!("driver=file,node-name=f,filename={image}"),
        s("--blockdev"),
        s("driver=qcow2,node-name=q,file=f"),
    ];
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
    let args = [
        s("--blockdev"),
        format!("driver=file,node-name=f,filename={image}"),
        s("--blockdev"),
        s("driver=qcow2,node-name=q,file=f"),
    ];
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
