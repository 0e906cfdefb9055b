//! The ssh driver against a real OpenSSH server on loopback, with key authentication
//! through ssh-agent: raw and qcow2 images written and read through it match what
//! qemu-storage-daemon writes (qemu-img compare and check on the server's files); host key
//! checks by fingerprint and open errors read as qsd's; known_hosts is checked; blockdev-create
//! makes the file; a server that dies under a client gives EIO.

mod common;

use base64::Engine;
use common::sshd::Sshd;
use common::*;
use serde_json::{json, Value};
use sha2::Digest;
use std::path::Path;

/// The host key's SHA-256 in hex, as QEMU's `hash` takes it.
fn sha256_hex(host_key: &str) -> String {
    let blob = base64::engine::general_purpose::STANDARD
        .decode(host_key.split_whitespace().nth(1).unwrap())
        .unwrap();
    sha2::Sha256::digest(&blob)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// nbd-server-add `node`, writable.
async fn export(client: &mut qmp::Client, dir: &Path, node: &str) -> String {
    export_node(client, dir, node, true).await
}

fn qemu_io_ok(args: &[&str]) {
    let out = run(std::process::Command::new("qemu-io").args(args));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("differ"),
        "qemu-io {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_written_over_ssh_match_qsds() {
    assert_qsd_has("ssh");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sshd = Sshd::start(d);
    let check = json!({"mode": "hash", "type": "md5",
                       "hash": sshd.fingerprint("md5").trim_start_matches("MD5:")});
    let mut images = Vec::new();
    for which in Impl::all() {
        let tag = format!("{which:?}").to_lowercase();
        let wd = d.join(&tag);
        std::fs::create_dir_all(&wd).unwrap();
        let raw = p(&wd, "disk.raw");
        let qcow2 = p(&wd, "disk.qcow2");
        qemu_img(&["create", "-q", "-f", "raw", &raw, "8M"]);
        qemu_img(&["create", "-q", "-f", "qcow2", &qcow2, "64M"]);
        let daemon = Daemon::start_wrapped(which, &wd, &[], &sshd.wrapper());
        let mut c = daemon.qmp().await;
        c.execute(
            "blockdev-add",
            json!({"driver": "ssh", "node-name": "raw", "server": sshd.server(),
                   "path": raw, "host-key-check": check}),
        )
        .await
        .unwrap();
        // qcow2 over ssh: the file grows under the format's writes.
        c.execute(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "qcow2",
                   "file": {"driver": "ssh", "server": sshd.server(), "path": qcow2,
                            "host-key-check": {"mode": "none"}}}),
        )
        .await
        .unwrap();
        let raw_url = export(&mut c, &wd, "raw").await;
        let qcow2_url = export(&mut c, &wd, "qcow2").await;
        for url in [&raw_url, &qcow2_url] {
            qemu_io_ok(&[
                "-f",
                "raw",
                "-c",
                "write -P 0x61 1M 3M",
                "-c",
                "write -P 0x62 4095k 2k",
                "-c",
                "write -z 6M 512k",
                "-c",
                "flush",
                "-c",
                "read -P 0x61 1M 3071k",
                "-c",
                "read -P 0x62 4095k 2k",
                url,
            ]);
        }
        let node = named_node(&mut c, "raw").await.unwrap();
        assert_eq!(node["drv"], "ssh");
        assert_eq!(
            node["file"],
            format!("ssh://{}@127.0.0.1:{}{raw}", user(), sshd.port)
        );
        // Shrinking is refused, as by QEMU; growing works (the exports, which keep the
        // size, gone first).
        c.execute("nbd-server-stop", json!({})).await.unwrap();
        let shrink = reply(
            &mut c,
            "block_resize",
            json!({"node-name": "raw", "size": 4 << 20}),
        )
        .await;
        let grow = reply(
            &mut c,
            "block_resize",
            json!({"node-name": "raw", "size": 16 << 20}),
        )
        .await;
        daemon.quit(&mut c).await;
        qemu_img(&["check", "-q", &qcow2]);
        images.push((raw, qcow2, shrink, grow));
    }
    let (ours, theirs) = (&images[0], &images[1]);
    assert_eq!(ours.2, theirs.2, "shrinking: blockd, then qsd");
    assert_eq!(ours.3, theirs.3, "growing: blockd, then qsd");
    assert_eq!(ours.3, json!({"return": {}}));
    assert_eq!(std::fs::metadata(&ours.0).unwrap().len(), 16 << 20);
    for (a, b, format) in [(&ours.0, &theirs.0, "raw"), (&ours.1, &theirs.1, "qcow2")] {
        let same = qemu_img(&["compare", "-f", format, "-F", format, a, b]);
        assert_eq!(same, "Images are identical.\n");
    }
    qemu_io_ok(&[
        "-f",
        "raw",
        "-c",
        "read -P 0x61 1M 3071k",
        "-c",
        "read -P 0 6M 512k",
        &ours.0,
    ]);
}

/// The local user's name, which an ssh node logs in as by default.
fn user() -> String {
    let out = run(std::process::Command::new("id").arg("-un"));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_key_checks_and_open_errors_read_as_qsd() {
    assert_qsd_has("ssh");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sshd = Sshd::start(d);
    let image = p(d, "disk.raw");
    qemu_img(&["create", "-q", "-f", "raw", &image, "1M"]);
    let md5 = sshd.fingerprint("md5");
    let md5 = md5.trim_start_matches("MD5:");
    let sha256 = sha256_hex(&sshd.host_key);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let add = |name: &str, path: &str, check: Value| {
        (
            "blockdev-add",
            json!({"driver": "ssh", "node-name": name, "server": sshd.server(), "path": path,
                   "host-key-check": check, "read-only": true}),
        )
    };
    let requests = [
        add("ok1", &image, json!({"mode": "none"})),
        add(
            "ok2",
            &image,
            json!({"mode": "hash", "type": "md5", "hash": md5}),
        ),
        add(
            "ok3",
            &image,
            json!({"mode": "hash", "type": "md5", "hash": md5.replace(':', "").to_uppercase()}),
        ),
        add(
            "ok4",
            &image,
            json!({"mode": "hash", "type": "sha256", "hash": sha256}),
        ),
        add(
            "e1",
            &image,
            json!({"mode": "hash", "type": "md5", "hash": "00:11"}),
        ),
        add(
            "e2",
            &image,
            json!({"mode": "hash", "type": "sha1", "hash": "zz"}),
        ),
        add(
            "e3",
            &image,
            json!({"mode": "hash", "type": "sha256",
                                 "hash": sshd.fingerprint("sha256")}),
        ),
        add("e4", &p(d, "absent.raw"), json!({"mode": "none"})),
        add(
            "e5",
            &image,
            json!({"mode": "hash", "type": "md4", "hash": md5}),
        ),
        (
            "blockdev-add",
            json!({"driver": "ssh", "node-name": "e6", "path": image,
                   "server": {"host": "127.0.0.1", "port": closed.to_string()},
                   "host-key-check": {"mode": "none"}}),
        ),
    ];
    let mut seen = Vec::new();
    for which in Impl::all() {
        let wd = d.join(format!("{which:?}"));
        std::fs::create_dir_all(&wd).unwrap();
        let daemon = Daemon::start_wrapped(which, &wd, &[], &sshd.wrapper());
        let mut c = daemon.qmp().await;
        let mut replies = Vec::new();
        for (command, args) in &requests {
            replies.push(reply(&mut c, command, args.clone()).await);
        }
        seen.push(replies);
        daemon.quit(&mut c).await;
    }
    assert_eq!(seen[0], seen[1], "blockd, then qsd");
    for (i, r) in seen[0].iter().enumerate() {
        assert_eq!(r.get("return").is_some(), i < 4, "request {i}: {r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_hosts_decides_whom_to_trust() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sshd = Sshd::start(d);
    let image = p(d, "disk.raw");
    qemu_img(&["create", "-q", "-f", "raw", &image, "1M"]);
    let daemon = Daemon::start_wrapped(Impl::Blockd, d, &[], &sshd.wrapper());
    let mut c = daemon.qmp().await;
    let host = format!("[127.0.0.1]:{}", sshd.port);
    let other_ed25519 = sshd.other_key("ed25519");
    let other_rsa = sshd.other_key("rsa");
    let cases = [
        (
            String::new(),
            Err("no host key was found in known_hosts".to_string()),
        ),
        (
            format!("{host} {other_ed25519}"),
            Err(format!(
                "host key (ssh-ed25519 key with fingerprint {}) does not match the one in \
                 known_hosts; this may be a possible attack",
                sshd.fingerprint("sha256")
            )),
        ),
        (
            format!("{host} {other_rsa}"),
            Err("host key for this server not found, another type exists".to_string()),
        ),
        (format!("{host} {}", sshd.host_key), Ok(())),
        // Only the server's other key on record: that is the one asked for.
        (format!("{host} {}", sshd.ecdsa_key), Ok(())),
        (
            format!("[127.0.0.*]:{},other {}", sshd.port, sshd.host_key),
            Ok(()),
        ),
        (
            format!("  {}  {}  a comment", host.to_uppercase(), sshd.host_key),
            Ok(()),
        ),
        (
            format!(
                "{host} {}\n@revoked {host} {}",
                sshd.ecdsa_key, sshd.host_key
            ),
            Ok(()),
        ),
        // Another port's key is not this server's.
        (
            format!("127.0.0.1 {}", sshd.host_key),
            Err("no host key was found in known_hosts".into()),
        ),
    ];
    for (i, (known, expected)) in cases.into_iter().enumerate() {
        sshd.known_hosts(&known);
        let name = format!("k{i}");
        let outcome = c
            .execute(
                "blockdev-add",
                json!({"driver": "ssh", "node-name": name, "server": sshd.server(),
                       "path": image, "read-only": true}),
            )
            .await
            .map(drop)
            .map_err(|e| e.desc);
        assert_eq!(outcome, expected, "known_hosts: {known}");
    }
    daemon.quit(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blockdev_create_makes_the_file_as_qsd_does() {
    assert_qsd_has("ssh");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sshd = Sshd::start(d);
    for which in Impl::all() {
        let wd = d.join(format!("{which:?}"));
        std::fs::create_dir_all(&wd).unwrap();
        let image = p(&wd, "new.raw");
        // Replaced: blockdev-create truncates what is there.
        std::fs::write(&image, vec![0xffu8; 1 << 20]).unwrap();
        let daemon = Daemon::start_wrapped(which, &wd, &[], &sshd.wrapper());
        let mut c = daemon.qmp().await;
        let location = json!({"server": sshd.server(), "path": image,
                              "host-key-check": {"mode": "none"}});
        let outcome = common::jobs::create(
            &mut c,
            "c",
            json!({"driver": "ssh", "location": location, "size": 16 << 20}),
        )
        .await;
        assert!(outcome.get("error").is_none(), "{which:?}: {outcome}");
        assert_eq!(
            std::fs::metadata(&image).unwrap().len(),
            16 << 20,
            "{which:?}"
        );
        qemu_io_ok(&["-f", "raw", "-c", "read -P 0 0 16M", &image]);
        // A qcow2 image made on the file through an ssh node, which cannot shrink it.
        std::fs::write(&image, vec![0xffu8; 1 << 20]).unwrap();
        let mut node = location.clone();
        node.as_object_mut().unwrap().extend([
            ("driver".into(), json!("ssh")),
            ("node-name".into(), json!("f")),
        ]);
        c.execute("blockdev-add", node).await.unwrap();
        let outcome = common::jobs::create(
            &mut c,
            "q",
            json!({"driver": "qcow2", "file": "f", "size": 64 << 20}),
        )
        .await;
        assert!(outcome.get("error").is_none(), "{which:?}: {outcome}");
        daemon.quit(&mut c).await;
        qemu_img(&["check", "-q", &image]);
        qemu_io_ok(&["-f", "qcow2", "-c", "read -P 0 0 64M", &image]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_dies_gives_eio() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sshd = Sshd::start(d);
    let image = p(d, "disk.raw");
    qemu_img(&["create", "-q", "-f", "raw", &image, "4M"]);
    let daemon = Daemon::start_wrapped(Impl::Blockd, d, &[], &sshd.wrapper());
    let mut c = daemon.qmp().await;
    c.execute(
        "blockdev-add",
        json!({"driver": "ssh", "node-name": "s", "server": sshd.server(), "path": image,
               "host-key-check": {"mode": "none"}}),
    )
    .await
    .unwrap();
    let url = export(&mut c, d, "s").await;
    qemu_io_ok(&["-f", "raw", "-c", "write -P 0x33 0 64k", &url]);
    sshd.kill_sessions();
    for command in ["read 0 64k", "write -P 0x34 64k 64k"] {
        let outcome = qemu_io_outcome(&["-f", "raw", "-c", command, &url]);
        assert!(
            outcome.contains("Input/output error"),
            "{command}: {outcome}"
        );
    }
    daemon.quit(&mut c).await;
}

/// A node over a faulty SFTP server (tests/peers/faulty-sftp in `mode`) on `which`, with
/// its writable export; the daemon, its QMP client, the export's URL and the server's log.
async fn faulty_node(
    d: &Path,
    which: Impl,
    mode: &str,
) -> (Sshd, Daemon, qmp::Client, String, std::path::PathBuf) {
    let wd = d.join(format!("{mode}-{which:?}"));
    std::fs::create_dir_all(&wd).unwrap();
    let log = wd.join("sftp.log");
    let sshd = Sshd::faulty(&wd, mode, &log);
    let image = p(&wd, "disk.raw");
    qemu_img(&["create", "-q", "-f", "raw", &image, "1M"]);
    qemu_io_ok(&["-f", "raw", "-c", "write -P 0x77 0 1M", &image]);
    let daemon = Daemon::start_wrapped(which, &wd, &[], &sshd.wrapper());
    let mut c = daemon.qmp().await;
    c.execute(
        "blockdev-add",
        json!({"driver": "ssh", "node-name": "s", "server": sshd.server(), "path": image,
               "host-key-check": {"mode": "none"}}),
    )
    .await
    .unwrap();
    let url = export(&mut c, &wd, "s").await;
    (sshd, daemon, c, url, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_packet_fails_the_read_without_the_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (_sshd, daemon, mut c, url, _) = faulty_node(dir.path(), Impl::Blockd, "huge-read").await;
    let outcome = qemu_io_outcome(&["-f", "raw", "-c", "read 0 4k", &url]);
    assert!(outcome.contains("Input/output error"), "{outcome}");
    assert!(
        status_mib(daemon.pid(), "VmHWM") < 512,
        "blockd took {} MiB",
        status_mib(daemon.pid(), "VmHWM")
    );
    c.execute("query-version", json!({})).await.unwrap();
    daemon.quit(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_data_limits_fua_and_fsync_as_with_qsd() {
    assert_qsd_has("ssh");
    let dir = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    for which in Impl::all() {
        let mut outcomes = Vec::new();
        // No data and no EOF in the middle of the file is an error, not zeroes.
        let (_s, daemon, mut c, url, _) = faulty_node(dir.path(), which, "empty-data").await;
        outcomes.push(qemu_io_outcome(&[
            "-f",
            "raw",
            "-c",
            "read -P 0x77 64k 4k",
            &url,
        ]));
        daemon.quit(&mut c).await;
        // The server's limits make blockd's pieces smaller (qsd's libssh ignores them and
        // writes 128 KiB); the write lands whole either way.
        let (_s, daemon, mut c, url, log) = faulty_node(dir.path(), which, "limits").await;
        outcomes.push(qemu_io_outcome(&[
            "-f",
            "raw",
            "-c",
            "write -P 0x12 4096 200000",
            "-c",
            "read -P 0x12 4096 200000",
            &url,
        ]));
        daemon.quit(&mut c).await;
        let largest = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter_map(|l| {
                l.strip_prefix("write ")?
                    .split(' ')
                    .nth(1)?
                    .parse::<u64>()
                    .ok()
            })
            .max();
        if which == Impl::Blockd {
            assert_eq!(largest, Some(32768), "the server's write limit");
        }
        // Each FUA write reaches the server's disk: an fsync apiece.
        let (_s, daemon, mut c, url, log) = faulty_node(dir.path(), which, "plain").await;
        outcomes.push(qemu_io_outcome(&[
            "-f",
            "raw",
            "-c",
            "write -f 0 4k",
            "-c",
            "write -f 8k 4k",
            "-c",
            "write -f 16k 4k",
            &url,
        ]));
        let fsyncs = || {
            std::fs::read_to_string(&log)
                .unwrap()
                .matches("extended fsync@openssh.com")
                .count()
        };
        outcomes.push(format!("at least 3 fsyncs: {}", fsyncs() >= 3));
        daemon.quit(&mut c).await;
        // A server without fsync: a flush succeeds (QEMU warns).
        let (_s, daemon, mut c, url, _) = faulty_node(dir.path(), which, "no-fsync").await;
        outcomes.push(qemu_io_outcome(&[
            "-f",
            "raw",
            "-c",
            "write 0 4k",
            "-c",
            "flush",
            &url,
        ]));
        daemon.quit(&mut c).await;
        seen.push(outcomes);
    }
    assert_eq!(seen[0], seen[1], "blockd, then qsd");
    assert!(seen[0][0].contains("Input/output error"), "{:?}", seen[0]);
    assert_eq!(seen[0][1], "ok");
    assert_eq!(seen[0][3], "at least 3 fsyncs: true");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_sftp_3_lacks_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = d.join("sftp.log");
    let sshd = Sshd::faulty(d, "odd-status", &log);
    let daemon = Daemon::start_wrapped(Impl::Blockd, d, &[], &sshd.wrapper());
    let mut c = daemon.qmp().await;
    let began = std::time::Instant::now();
    let e = c
        .execute(
            "blockdev-add",
            json!({"driver": "ssh", "node-name": "s", "server": sshd.server(),
                   "path": p(d, "any.raw"), "host-key-check": {"mode": "none"}}),
        )
        .await
        .unwrap_err();
    assert!(
        e.desc.contains("SFTP server: File already exists"),
        "{}",
        e.desc
    );
    assert!(began.elapsed() < std::time::Duration::from_secs(10));
    daemon.quit(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blockdev_create_refuses_bad_input_as_qsd_does() {
    assert_qsd_has("ssh");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sshd = Sshd::start(d);
    let none = json!({"mode": "none"});
    let cases = [
        json!({"driver": "ssh", "size": 1 << 20}),
        json!({"driver": "ssh", "location": {"server": sshd.server(), "path": p(d, "a.raw"),
                                             "host-key-check": none}}),
        json!({"driver": "ssh", "size": 1 << 20,
               "location": {"server": sshd.server(), "path": p(d, "absent/a.raw"),
                            "host-key-check": none}}),
        json!({"driver": "ssh", "size": 1 << 20,
               "location": {"server": sshd.server(), "path": p(d, "a.raw"),
                            "host-key-check": {"mode": "hash", "type": "md5"}}}),
    ];
    let mut seen = Vec::new();
    for which in Impl::all() {
        let wd = d.join(format!("{which:?}"));
        std::fs::create_dir_all(&wd).unwrap();
        let daemon = Daemon::start_wrapped(which, &wd, &[], &sshd.wrapper());
        let mut c = daemon.qmp().await;
        let mut outcomes = Vec::new();
        for (i, options) in cases.iter().enumerate() {
            outcomes.push(common::jobs::create(&mut c, &format!("c{i}"), options.clone()).await);
        }
        daemon.quit(&mut c).await;
        seen.push(outcomes);
    }
    assert_eq!(seen[0], seen[1], "blockd, then qsd");
    assert!(!d.join("a.raw").exists(), "nothing was created");
}
