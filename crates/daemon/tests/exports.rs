//! NBD exports of the real daemon, judged by real NBD clients (qemu-io, qemu-img, nbdinfo,
//! nbdcopy), and the nbd client driver against qemu-nbd and against blockd itself.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};

fn nbd_uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

fn qemu_io_nbd(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    run_qemu_io(c, cmds)
}

fn qemu_io_nbd_read_only(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-r", "-f", "raw", uri]);
    run_qemu_io(c, cmds)
}

fn run_qemu_io(mut c: Command, cmds: &[&str]) -> String {
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(&mut c);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-io {cmds:?}: {text}");
    assert!(
        !text.contains("fail") && !text.contains("error"),
        "qemu-io {cmds:?}: {text}"
    );
    text
}

/// A qcow2 over a backing file, with data in both layers, holes, and zero clusters.
fn make_image(dir: &Path) -> String {
    let base = dir.join("base.qcow2").to_string_lossy().into_owned();
    let top = dir.join("top.qcow2").to_string_lossy().into_owned();
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "32M"]);
    let io = |img: &str, cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "qcow2", img]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        assert!(run(&mut c).status.success());
    };
    io(&base, &["write -P 0x11 0 4M", "write -P 0x22 16M 1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &top,
    ]);
    io(
        &top,
        &[
            "write -P 0x33 2M 1M",
            "write -z 16M 64k",
            "write -P 0x44 30M 64k",
        ],
    );
    top
}

fn serve_args(nbd_sock: &Path, writable: bool) -> Vec<String> {
    vec![
        s("--blockdev"),
        s("driver=file,node-name=f0,filename=top.qcow2"),
        s("--blockdev"),
        s("driver=qcow2,node-name=disk0,file=f0"),
        s("--nbd-server"),
        format!("addr.type=unix,addr.path={}", nbd_sock.display()),
        s("--export"),
        format!(
            "type=nbd,id=e0,node-name=disk0,name=disk0,writable={}",
            if writable { "on" } else { "off" }
        ),
    ]
}

/// qemu-img map's JSON, merged into (start, length, data, zero) runs so that two maps of
/// the same content compare equal whatever their chunking and depth.
fn map_runs(args: &[&str]) -> Vec<(u64, u64, bool, bool)> {
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json"])
        .args(args));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut runs: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in entries {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let (data, zero) = (e["data"].as_bool().unwrap(), e["zero"].as_bool().unwrap());
        match runs.last_mut() {
            Some(last) if last.2 == data && last.3 == zero && last.0 + last.1 == start => {
                last.1 += len
            }
            _ => runs.push((start, len, data, zero)),
        }
    }
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_read_and_write_through_an_export() {
    let dir = tempfile::tempdir().unwrap();
    let top = make_image(dir.path());
    let reference = dir.path().join("ref.raw");
    qemu_img(&["convert", "-O", "raw", &top, &reference.to_string_lossy()]);
    let sock = dir.path().join("nbd.sock");
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &serve_args(&sock, true));
    let uri = nbd_uri(&sock, "disk0");

    // What a client reads equals qemu-img's own reading of the image.
    let pulled = dir.path().join("pulled.raw");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &uri,
        &pulled.to_string_lossy(),
    ]);
    assert!(std::fs::read(&pulled).unwrap() == std::fs::read(&reference).unwrap());

    // Block status over NBD equals the map of the image file (data/zero runs).
    assert_eq!(
        map_runs(&["-f", "raw", &uri]),
        map_runs(&["-U", &top]),
        "qemu-img map over NBD differs from the image's map"
    );

    // Writes of every kind, read back through the same export.
    qemu_io_nbd(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "aio_write -P 0xcd 8M 512k",
            "aio_flush",
            "write -z 2M 64k",
            "write -f -P 0xef 5M 4k",
            "discard 6M 1M",
            "flush",
            "read -P 0xab 0 1M",
            "read -P 0xcd 8M 512k",
            "read -P 0 2M 64k",
            "read -P 0xef 5M 4k",
        ],
    );
    let mut client = daemon.qmp().await;
    daemon.quit(&mut client).await;
    qemu_img(&["check", &top]);
    // The writes are in the image file, as qemu-io reads it.
    let io = run(Command::new("qemu-io").args([
        "-f",
        "qcow2",
        &top,
        "-c",
        "read -P 0xab 0 1M",
        "-c",
        "read -P 0xcd 8M 512k",
        "-c",
        "read -P 0 2M 64k",
    ]));
    assert!(!String::from_utf8_lossy(&io.stdout).contains("failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_sees_allocation_and_depth() {
    let dir = tempfile::tempdir().unwrap();
    make_image(dir.path());
    let sock = dir.path().join("nbd.sock");
    let mut args = serve_args(&sock, false);
    args.last_mut().unwrap().push_str(",allocation-depth=on");
    let _daemon = Daemon::start(Impl::Blockd, dir.path(), &args);
    let uri = nbd_uri(&sock, "disk0");
    let out = run(Command::new("nbdinfo").args(["--json", &uri]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 32 << 20);
    assert_eq!(export["is_read_only"], true);
    assert_eq!(export["can_multi_conn"], true);
    let contexts = export["contexts"].as_array().unwrap();
    assert!(contexts.contains(&json!("base:allocation")));
    assert!(contexts.contains(&json!("qemu:allocation-depth")));

    let depth = run(Command::new("nbdinfo").args(["--map=qemu:allocation-depth", "--json", &uri]));
    assert!(
        depth.status.success(),
        "{}",
        String::from_utf8_lossy(&depth.stderr)
    );
    let extents: Vec<Value> = serde_json::from_slice(&depth.stdout).unwrap();
    let depth_at = |offset: u64| {
        extents
            .iter()
            .find(|e| {
                let off = e["offset"].as_u64().unwrap();
                off <= offset && offset < off + e["length"].as_u64().unwrap()
            })
            .map(|e| e["type"].as_u64().unwrap())
            .unwrap()
    };
    assert_eq!(depth_at(0), 2, "base data");
    assert_eq!(depth_at(2 << 20), 1, "top data");
    assert_eq!(depth_at(16 << 20), 1, "top zero cluster");
    assert_eq!(depth_at(12 << 20), 0, "nowhere");

    let alloc = run(Command::new("nbdinfo").args(["--map", "--json", &uri]));
    let extents: Vec<Value> = serde_json::from_slice(&alloc.stdout).unwrap();
    let flags_at = |offset: u64| {
        extents
            .iter()
            .find(|e| {
                let off = e["offset"].as_u64().unwrap();
                off <= offset && offset < off + e["length"].as_u64().unwrap()
            })
            .map(|e| e["type"].as_u64().unwrap())
            .unwrap()
    };
    assert_eq!(flags_at(0), 0, "data");
    assert_eq!(flags_at(12 << 20), 3, "hole, zero");
    assert_eq!(flags_at(16 << 20), 3, "zero cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_with_four_connections() {
    let dir = tempfile::tempdir().unwrap();
    let top = make_image(dir.path());
    let sock = dir.path().join("nbd.sock");
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &serve_args(&sock, true));
    let uri = nbd_uri(&sock, "disk0");
    let pattern: Vec<u8> = (0..(32u32 << 20)).map(|i| (i % 251) as u8).collect();
    let src = dir.path().join("pattern.raw");
    std::fs::write(&src, &pattern).unwrap();
    let push = run(Command::new("nbdcopy").args(["-C", "4", &src.to_string_lossy(), &uri]));
    assert!(
        push.status.success(),
        "{}",
        String::from_utf8_lossy(&push.stderr)
    );
    let back = dir.path().join("back.raw");
    let pull = run(Command::new("nbdcopy").args(["-C", "4", &uri, &back.to_string_lossy()]));
    assert!(
        pull.status.success(),
        "{}",
        String::from_utf8_lossy(&pull.stderr)
    );
    assert!(std::fs::read(&back).unwrap() == pattern);
    let mut client = daemon.qmp().await;
    daemon.quit(&mut client).await;
    qemu_img(&["check", &top]);
    qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        &top,
        &src.to_string_lossy(),
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_commands_answer_like_qsd() {
    let script = |nbd: &str, nbd2: &str| {
        vec![
            json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "disk0"}}),
            json!({"execute": "nbd-server-stop"}),
            json!({"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": nbd}}}}),
            json!({"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": nbd2}}}}),
            json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "disk0", "writable": true}}),
            json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "disk0"}}),
            json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e1", "node-name": "nope"}}),
            json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e1", "node-name": "disk0", "name": "disk0"}}),
            json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e2", "node-name": "disk0", "name": "x", "bitmaps": ["b"]}}),
            json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e3", "node-name": "disk0", "name": "ro"}}),
            json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e6", "node-name": "disk0", "name": "n".repeat(4097)}}),
            json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e6", "node-name": "disk0", "name": "d", "description": "d".repeat(4097)}}),
            json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e4", "node-name": "disk0", "iothread": "io0"}}),
            json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e4", "node-name": "nope", "iothread": "io0"}}),
            json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e4", "node-name": "disk0", "name": "opts", "fixed-iothread": true, "allow-inactive": true}}),
            json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e5", "node-name": "disk0", "name": "opts2", "allow-inactive": false}}),
            json!({"execute": "query-block-exports"}),
            json!({"execute": "nbd-server-add", "arguments": {"device": "disk0", "name": "legacy"}}),
            json!({"execute": "nbd-server-add", "arguments": {"device": "disk0"}}),
            json!({"execute": "nbd-server-remove", "arguments": {"name": "legacy"}}),
            json!({"execute": "nbd-server-remove", "arguments": {"name": "legacy"}}),
            json!({"execute": "block-export-del", "arguments": {"id": "zz"}}),
            json!({"execute": "block-export-del", "arguments": {"id": "e0"}}),
            json!({"execute": "blockdev-del", "arguments": {"node-name": "disk0"}}),
            json!({"execute": "query-block-exports"}),
            json!({"execute": "nbd-server-stop"}),
            json!({"execute": "query-block-exports"}),
            json!({"execute": "nbd-server-stop"}),
        ]
    };
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        make_image(dir.path());
        let daemon = Daemon::start(
            which,
            dir.path(),
            &[
                s("--blockdev"),
                s("driver=file,node-name=f0,filename=top.qcow2"),
                s("--blockdev"),
                s("driver=qcow2,node-name=disk0,file=f0"),
            ],
        );
        let mut client = daemon.qmp().await;
        let nbd = dir.path().join("n.sock").to_string_lossy().into_owned();
        let nbd2 = dir.path().join("n2.sock").to_string_lossy().into_owned();
        let mut replies = Vec::new();
        let mut deleted = Vec::new();
        for cmd in script(&nbd, &nbd2) {
            let reply = client
                .execute(
                    cmd["execute"].as_str().unwrap(),
                    cmd.get("arguments").cloned().unwrap_or(json!({})),
                )
                .await;
            replies.push(match reply {
                Ok(v) => json!({"return": v}),
                Err(e) => json!({"error": e.desc}),
            });
        }
        while let Some(event) = client
            .next_event(std::time::Duration::from_millis(500))
            .await
        {
            if event["event"] == "BLOCK_EXPORT_DELETED" {
                deleted.push(event["data"]["id"].clone());
            }
        }
        deleted.sort_by_key(|v| v.to_string());
        all.push((replies, deleted));
    }
    assert_eq!(
        all[0].1,
        vec![
            json!("e0"),
            json!("e3"),
            json!("e4"),
            json!("e5"),
            json!("legacy")
        ]
    );
    assert_eq!(all[0].0[12]["error"], "iothread \"io0\" not found");
    if all.len() == 2 {
        for (i, (a, b)) in all[0].0.iter().zip(&all[1].0).enumerate() {
            assert_eq!(a, b, "reply {i} differs from qsd");
        }
        assert_eq!(all[0].1, all[1].1, "BLOCK_EXPORT_DELETED events differ");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_delete_refuses_while_a_client_is_connected() {
    let dir = tempfile::tempdir().unwrap();
    make_image(dir.path());
    let sock = dir.path().join("nbd.sock");
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &serve_args(&sock, true));
    let mut client = daemon.qmp().await;
    // An interactive client: once it answered a read, it is connected, and it stays so
    // until its stdin closes.
    let mut holder = Command::new("qemu-io")
        .args(["-f", "raw", &nbd_uri(&sock, "disk0")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::{BufRead, Write};
        let stdin = holder.stdin.as_mut().unwrap();
        writeln!(stdin, "read 0 512").unwrap();
        stdin.flush().unwrap();
        let mut lines = std::io::BufReader::new(holder.stdout.take().unwrap()).lines();
        assert!(lines.any(|l| l.unwrap().contains("read 512/512")));
    }
    let refused = client
        .execute("block-export-del", json!({"id": "e0"}))
        .await;
    assert_eq!(refused.unwrap_err().desc, "export 'e0' still in use");
    client
        .execute("block-export-del", json!({"id": "e0", "mode": "hard"}))
        .await
        .unwrap();
    let event = client
        .wait_event("BLOCK_EXPORT_DELETED", WAIT)
        .await
        .expect("event");
    assert_eq!(event["data"]["id"], "e0");
    assert_eq!(
        client
            .execute("query-block-exports", json!({}))
            .await
            .unwrap(),
        json!([])
    );
    drop(holder.stdin.take());
    let _ = holder.wait();
    // The node is free again: it can be deleted now.
    client
        .execute("blockdev-del", json!({"node-name": "disk0"}))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_driver_reads_qemu_nbd_and_blockd_exports() {
    let dir = tempfile::tempdir().unwrap();
    let top = make_image(dir.path());
    let reference = dir.path().join("ref.raw");
    qemu_img(&["convert", "-O", "raw", &top, &reference.to_string_lossy()]);
    let qemu_nbd_sock = dir.path().join("qemu-nbd.sock");
    let _qemu_nbd = KillOnDrop(
        Command::new("qemu-nbd")
            .args([
                "-f",
                "qcow2",
                "-k",
                &qemu_nbd_sock.to_string_lossy(),
                "-x",
                "img",
                "-t",
                &top,
            ])
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + WAIT;
    while !qemu_nbd_sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-nbd did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // blockd imports qemu-nbd's export and re-exports it; a client reads it through both.
    let sock = dir.path().join("nbd.sock");
    let daemon = Daemon::start(
        Impl::Blockd,
        dir.path(),
        &[
            s("--blockdev"),
            format!(
                "driver=nbd,node-name=remote,server.type=unix,server.path={},export=img",
                qemu_nbd_sock.display()
            ),
            s("--nbd-server"),
            format!("addr.type=unix,addr.path={}", sock.display()),
            s("--export"),
            s("type=nbd,id=e0,node-name=remote,name=again,writable=on"),
        ],
    );
    let pulled = dir.path().join("pulled.raw");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &nbd_uri(&sock, "again"),
        &pulled.to_string_lossy(),
    ]);
    assert!(std::fs::read(&pulled).unwrap() == std::fs::read(&reference).unwrap());
    qemu_io_nbd(
        &nbd_uri(&sock, "again"),
        &["write -P 0x77 1M 64k", "read -P 0x77 1M 64k"],
    );

    // And a second blockd reads the first one's export through the nbd driver.
    let dir2 = tempfile::tempdir().unwrap();
    let sock2 = dir2.path().join("nbd2.sock");
    let _second = Daemon::start(
        Impl::Blockd,
        dir2.path(),
        &[
            s("--blockdev"),
            format!(
                "driver=nbd,node-name=chain,server.type=unix,server.path={},export=again",
                sock.display()
            ),
            s("--nbd-server"),
            format!("addr.type=unix,addr.path={}", sock2.display()),
            s("--export"),
            s("type=nbd,id=e1,node-name=chain,name=twice"),
        ],
    );
    let out = qemu_io_nbd_read_only(
        &nbd_uri(&sock2, "twice"),
        &["read -P 0x77 1M 64k", "read -P 0x33 2M 64k"],
    );
    assert!(out.contains("read 65536/65536"));
    drop(daemon);
}

#[test]
fn serve_creates_an_image_and_exports_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BLOCKD)
        .args(["serve", "disk.qcow2"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let nbd = dir.path().join("blockd.nbd");
    let deadline = std::time::Instant::now() + WAIT;
    while !nbd.exists() {
        assert!(std::time::Instant::now() < deadline, "serve did not start");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = run(Command::new("nbdinfo").args(["--json", &nbd_uri(&nbd, "disk0")]));
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["exports"][0]["export-size"], 1u64 << 30);
    assert_eq!(info["exports"][0]["is_read_only"], false);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    assert!(stdout.contains("created"), "{stdout}");
    assert!(stdout.contains("blockd.qmp"), "{stdout}");
    qemu_img(&["check", &dir.path().join("disk.qcow2").to_string_lossy()]);
}

/// FAST_ZERO is advertised and kept: zeroing that whole (zero) clusters cover succeeds, and a
/// partial cluster succeeds only where it reads as zeroes already; otherwise the request fails
/// with ENOTSUP and the data stays. qsd answers the same requests the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_zero_fails_rather_than_writing_zeroes() {
    const K: u64 = 1 << 10;
    const M: u64 = 1 << 20;
    let fast = |may_trim| nbd::ZeroFlags {
        fast: true,
        may_trim,
        fua: false,
    };
    // (offset, length, may_trim); make_image's layout says what each range holds.
    let requests = [
        (2 * M, 128 * K, false), // whole clusters of the top layer's data
        (2 * M + 128 * K + 512, 4 * K, false), // part of a top-layer data cluster
        (5 * M + 512, 4 * K, false), // part of a cluster no layer holds
        (M + 512, 4 * K, false), // part of a cluster only the backing holds
        (8 * M, M, true),        // whole unallocated clusters, trimming allowed
        (30 * M, 64 * K, true),  // a whole data cluster, trimming allowed
    ];
    let expected: Vec<Option<i32>> = vec![
        None,
        Some(libc::ENOTSUP),
        None,
        Some(libc::ENOTSUP),
        None,
        None,
    ];
    let mut answers = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let top = make_image(dir.path());
        let sock = dir.path().join("nbd.sock");
        let daemon = Daemon::start(which, dir.path(), &serve_args(&sock, true));
        let addr = nbd::ConnectAddr::Unix(sock.clone());
        let results = tokio::task::LocalSet::new()
            .run_until(async move {
                // The NBD socket may appear a moment after the monitor's.
                let deadline = std::time::Instant::now() + WAIT;
                let client = loop {
                    match nbd::Client::connect(&addr, "disk0", &Default::default()).await {
                        Ok(client) => break client,
                        Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                };
                assert_ne!(client.flags() & nbd::proto::FLAG_SEND_FAST_ZERO, 0);
                let mut results = Vec::new();
                for (offset, len, may_trim) in requests {
                    let r = client.write_zeroes(offset, len, fast(may_trim)).await;
                    results.push(r.err().map(|e| e.raw_os_error().unwrap_or(-1)));
                }
                client.disconnect().await.unwrap();
                results
            })
            .await;
        let mut client = daemon.qmp().await;
        daemon.quit(&mut client).await;
        qemu_img(&["check", &top]);
        let reads = run(Command::new("qemu-io").args([
            "-f",
            "qcow2",
            &top,
            "-c",
            "read -P 0 2M 128k",
            "-c",
            "read -P 0x33 2176k 64k",
            "-c",
            "read -P 0x11 1M 64k",
            "-c",
            "read -P 0 30M 64k",
        ]));
        let out = String::from_utf8_lossy(&reads.stdout).into_owned();
        assert!(!out.contains("failed"), "{which:?}: {out}");
        answers.push((which, results));
    }
    for (which, results) in answers {
        assert_eq!(results, expected, "{which:?}");
    }
}

/// nbd-server-start's inet options do what qsd's do: `to` takes the next free port,
/// `numeric` refuses a name, one address family only, both families off refused;
/// keep-alive and mptcp listeners serve clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inet_listener_options_match_qsd() {
    let mut answers = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon::start(
            which,
            dir.path(),
            &[
                s("--blockdev"),
                s("driver=null-co,node-name=z,size=1048576"),
            ],
        );
        let mut client = daemon.qmp().await;
        // A port held here, and `to` one past it.
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let inet = |extra: Value| {
            let mut data = json!({"host": "127.0.0.1", "port": port.to_string()});
            data.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            json!({"addr": {"type": "inet", "data": data}})
        };
        let mut replies = Vec::new();
        for extra in [
            json!({}),
            json!({"to": port}),
            json!({"host": "localhost", "numeric": true}),
            json!({"ipv6": true}),
            json!({"ipv4": false}),
            json!({"ipv4": false, "ipv6": false}),
        ] {
            let answer = reply(&mut client, "nbd-server-start", inet(extra)).await;
            // Each run holds its own port.
            let text = answer.to_string().replace(&port.to_string(), "PORT");
            replies.push(serde_json::from_str::<Value>(&text).unwrap());
        }
        // Served on the next port, with keep-alive and MPTCP asked for.
        let started = reply(
            &mut client,
            "nbd-server-start",
            inet(json!({"to": port + 1, "keep-alive": true, "mptcp": true})),
        )
        .await;
        replies.push(started.clone());
        if started.get("return").is_some() {
            client
                .execute(
                    "block-export-add",
                    json!({"type": "nbd", "id": "e", "node-name": "z"}),
                )
                .await
                .unwrap();
            let out = run(Command::new("nbdinfo")
                .args(["--size", &format!("nbd://127.0.0.1:{}/z", port + 1)]));
            assert!(out.status.success(), "{which:?}: {out:?}");
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1048576");
        }
        drop(held);
        daemon.quit(&mut client).await;
        answers.push((which, replies));
    }
    let (_, blockd) = &answers[0];
    assert_eq!(
        blockd[5]["error"]["desc"],
        "Cannot disable IPv4 and IPv6 at same time"
    );
    assert!(blockd[6].get("return").is_some(), "{blockd:?}");
    for (which, replies) in &answers[1..] {
        assert_eq!(replies, blockd, "{which:?}");
    }
}

/// Extents of an `nbdinfo --map --json` answer, one type per `granule` bytes, so that two
/// servers that cut the same map differently compare equal.
fn types_per_granule(extents: &[Value], granule: u64) -> Vec<u64> {
    let mut types = Vec::new();
    for e in extents {
        let len = e["length"].as_u64().unwrap();
        types.extend(std::iter::repeat_n(
            e["type"].as_u64().unwrap(),
            (len / granule) as usize,
        ));
    }
    types
}

/// An image with extended L2 entries whose clusters hold allocated, zero and unallocated
/// subclusters side by side, over a backing file: both maps (allocation and depth) are
/// the same from both daemons, 2 KiB subcluster by subcluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subcluster_maps_match_qsd() {
    let mut maps = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let (base, top) = (p(dir.path(), "base.qcow2"), p(dir.path(), "top.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", &base, "4M"]);
        common::jobs::qemu_io(&["-f", "qcow2", &base, "-c", "write -P 0x11 0 1M"]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            &base,
            "-F",
            "qcow2",
            &top,
        ]);
        for write in [
            "write -P 0x22 6k 4k",
            "write -z 64k 8k",
            "write -z 128k 64k",
            "write -P 0x33 1022k 4k",
            "write -z -u 2M 64k",
            "write -P 0x44 3M 2k",
        ] {
            common::jobs::qemu_io(&["-f", "qcow2", &top, "-c", write]);
        }
        let sock = dir.path().join("nbd.sock");
        let mut args = serve_args(&sock, false);
        args.last_mut().unwrap().push_str(",allocation-depth=on");
        let _daemon = Daemon::start(which, dir.path(), &args);
        let uri = nbd_uri(&sock, "disk0");
        let mut both = Vec::new();
        for context in ["--map=qemu:allocation-depth", "--map"] {
            let out = run(Command::new("nbdinfo").args([context, "--json", &uri]));
            assert!(
                out.status.success(),
                "{which:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let extents: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
            both.push(types_per_granule(&extents, 2048));
        }
        maps.push(both);
    }
    let depth = &maps[0][0];
    assert_eq!(depth[3], 1, "the written subcluster is the top's");
    assert_eq!(depth[2], 2, "its neighbour is the backing file's");
    if let [blockd, qsd] = &maps[..] {
        assert_eq!(blockd, qsd);
    }
}
