//! The http and https drivers against a real nginx on loopback: images read through them
//! (raw and qcow2 over http) match the served files, as qemu-img compare judges through an
//! NBD export, on blockd and on qemu-storage-daemon; open errors, passwords, cookies,
//! redirects and a proxy that asks for a password (tinyproxy) behave as qsd's; https verifies the server against a CA made by the test; a
//! server that stops answering fails reads and jobs with EIO within `timeout`. A server
//! that answers wrongly on purpose (a crafted length, ranges, bodies, a trickle) gets a
//! clear error or EIO, never a panic or a hang.

mod common;

use common::certs::{make_ca, make_peer};
use common::web::{
    assert_same, export, images, Nginx, Proxy, Tls, COOKIE, PASSWORD, PROXY_PASSWORD, PROXY_USER,
    USER,
};
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The node as query-named-block-nodes shows it.
async fn node(client: &mut qmp::Client, name: &str) -> Value {
    named_node(client, name)
        .await
        .unwrap_or_else(|| panic!("no node {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_read_over_http_match_the_served_files_on_both_daemons() {
    assert_qsd_has("curl");
    let dir = tempfile::tempdir().unwrap();
    let server = Nginx::start(dir.path(), None);
    images(&server.root);
    let mut seen = Vec::new();
    for which in Impl::all() {
        let wd = dir.path().join(format!("{which:?}"));
        std::fs::create_dir_all(&wd).unwrap();
        let daemon = Daemon::start(which, &wd, &[]);
        let mut c = daemon.qmp().await;
        for (name, path) in [("raw", "raw.img"), ("odd", "odd.img")] {
            c.execute(
                "blockdev-add",
                json!({"driver": "http", "node-name": name, "url": server.url(path),
                       "read-only": true}),
            )
            .await
            .unwrap();
        }
        // qcow2 over http, its file opened inline, with a readahead of its own.
        c.execute(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "qcow2", "read-only": true,
                   "file": {"driver": "http", "url": server.url("disk.qcow2"),
                            "readahead": 1 << 20}}),
        )
        .await
        .unwrap();
        let raw = export(&mut c, &wd, "raw").await;
        let qcow2 = export(&mut c, &wd, "qcow2").await;
        let odd = export(&mut c, &wd, "odd").await;
        assert_same(
            &server.root.join("raw.img"),
            "raw",
            &raw,
            &format!("{which:?}"),
        );
        assert_same(
            &server.root.join("disk.qcow2"),
            "qcow2",
            &qcow2,
            &format!("{which:?}"),
        );
        // The tail past the file's 1000 bytes reads as zeroes up to the sector's end.
        let tail = run(std::process::Command::new("qemu-io").args([
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 0 1000",
            "-c",
            "read -P 0 1000 24",
            &odd,
        ]));
        let text = String::from_utf8_lossy(&tail.stdout).into_owned();
        assert!(
            tail.status.success()
                && text.contains("read 1000/1000 bytes")
                && text.contains("read 24/24 bytes")
                && !text.contains("fail")
                && !text.contains("differ"),
            "{which:?}: {text}{}",
            String::from_utf8_lossy(&tail.stderr)
        );
        let mut nodes = Vec::new();
        for name in ["raw", "odd"] {
            let mut n = node(&mut c, name).await;
            n.as_object_mut().unwrap().remove("node-name");
            nodes.push(normalize(n));
        }
        // An auto-read-only node becomes read-only; a writable one is refused.
        let writable = reply(
            &mut c,
            "blockdev-add",
            json!({"driver": "http", "node-name": "w", "url": server.url("raw.img")}),
        )
        .await;
        c.execute(
            "blockdev-add",
            json!({"driver": "http", "node-name": "a", "url": server.url("raw.img"),
                   "auto-read-only": true}),
        )
        .await
        .unwrap();
        nodes.push(writable);
        nodes.push(node(&mut c, "a").await["ro"].clone());
        seen.push(nodes);
        daemon.quit(&mut c).await;
    }
    assert_eq!(seen[0], seen[1], "blockd, then qsd");
    assert_eq!(seen[0][0]["image"]["virtual-size"], 4 << 20);
    assert_eq!(seen[0][1]["image"]["virtual-size"], 1024);
    assert_eq!(seen[0][3], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_errors_passwords_cookies_and_redirects_read_as_qsd() {
    assert_qsd_has("curl");
    let dir = tempfile::tempdir().unwrap();
    let server = Nginx::start(dir.path(), None);
    images(&server.root);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let add = |name: &str, extra: Value| {
        let mut args = json!({"driver": "http", "node-name": name, "read-only": true});
        args.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        ("blockdev-add", args)
    };
    let requests = [
        (
            "object-add",
            json!({"qom-type": "secret", "id": "pw", "data": PASSWORD}),
        ),
        (
            "object-add",
            json!({"qom-type": "secret", "id": "bad", "data": "wrong"}),
        ),
        (
            "object-add",
            json!({"qom-type": "secret", "id": "ck", "data": COOKIE}),
        ),
        add("e1", json!({"url": server.url("noranges/raw.img")})),
        add("e2", json!({"url": server.url("absent.img")})),
        add(
            "e3",
            json!({"url": server.url("raw.img").replace("http", "https")}),
        ),
        add(
            "e4",
            json!({"url": format!("http://127.0.0.1:{closed}/raw.img")}),
        ),
        add(
            "e5",
            json!({"url": server.url("raw.img"), "readahead": 1000}),
        ),
        add(
            "e6",
            json!({"url": server.url("raw.img"), "readahead": -512}),
        ),
        add(
            "e7",
            json!({"url": server.url("raw.img"), "timeout": 10001}),
        ),
        add(
            "e8",
            json!({"url": server.url("raw.img"), "sslverify": false}),
        ),
        add(
            "e9",
            json!({"url": server.url("raw.img"), "password-secret": "none"}),
        ),
        add("e10", json!({"url": server.url("cookie/raw.img")})),
        add("e11", json!({"url": server.url("auth/raw.img")})),
        add(
            "e12",
            json!({"url": server.url("auth/raw.img"), "username": USER,
                          "password-secret": "bad"}),
        ),
        add(
            "e13",
            json!({"url": server.url("cookie/raw.img"), "cookie": COOKIE, "cookie-secret": "ck"}),
        ),
        add(
            "ok1",
            json!({"url": server.url("cookie/raw.img"), "cookie": COOKIE}),
        ),
        add(
            "ok2",
            json!({"url": server.url("cookie/raw.img"), "cookie-secret": "ck"}),
        ),
        add(
            "ok3",
            json!({"url": server.url("auth/raw.img"), "username": USER,
                          "password-secret": "pw"}),
        ),
        add("ok4", json!({"url": server.url("moved/raw.img")})),
        add("ok5", json!({"url": server.url("raw.img"), "timeout": 0})),
    ];
    let [mut ours, qsd] = replies_of_both(dir.path(), &[], &requests).await;
    // libcurl counts the milliseconds a refused connection took.
    let refused = &mut ours[6]["error"]["desc"];
    let text = refused.as_str().unwrap().to_string();
    let same = qsd[6]["error"]["desc"].as_str().unwrap();
    if text.split(" after ").next() == same.split(" after ").next() {
        *refused = json!(same);
    }
    assert_eq!(ours, qsd, "blockd, then qsd");
    for (i, r) in ours.as_array().unwrap().iter().enumerate() {
        let expect_ok = !(3..16).contains(&i);
        assert_eq!(r.get("return").is_some(), expect_ok, "request {i}: {r}");
    }

    // Each open node reads the served bytes, through the password, the cookie and the
    // redirect alike.
    let d = dir.path().join("reads");
    std::fs::create_dir_all(&d).unwrap();
    let daemon = Daemon::start(Impl::Blockd, &d, &[]);
    let mut c = daemon.qmp().await;
    for (command, args) in &requests[..3] {
        c.execute(command, args.clone()).await.unwrap();
    }
    for (command, args) in &requests[16..] {
        c.execute(command, args.clone()).await.unwrap();
        let name = args["node-name"].as_str().unwrap();
        let url = export(&mut c, &d, name).await;
        assert_same(&server.root.join("raw.img"), "raw", &url, name);
    }
    daemon.quit(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_from_the_environment_takes_the_proxy_credentials_as_with_qsd() {
    assert_qsd_has("curl");
    let dir = tempfile::tempdir().unwrap();
    let server = Nginx::start(dir.path(), None);
    images(&server.root);
    let proxy = Proxy::start(dir.path());
    let url = server.url("raw.img");
    let mut seen = Vec::new();
    for which in Impl::all() {
        let wd = dir.path().join(format!("{which:?}"));
        std::fs::create_dir_all(&wd).unwrap();
        let daemon = Daemon::start_wrapped(which, &wd, &[], &proxy.wrapper());
        let mut c = daemon.qmp().await;
        let mut replies = Vec::new();
        for (id, data) in [("pp", PROXY_PASSWORD), ("bad", "wrong")] {
            c.execute(
                "object-add",
                json!({"qom-type": "secret", "id": id, "data": data}),
            )
            .await
            .unwrap();
        }
        let before = proxy.forwarded();
        for (name, credentials) in [
            ("none", json!({})),
            (
                "bad",
                json!({"proxy-username": PROXY_USER, "proxy-password-secret": "bad"}),
            ),
            (
                "ok",
                json!({"proxy-username": PROXY_USER, "proxy-password-secret": "pp"}),
            ),
        ] {
            let mut args = json!({"driver": "http", "node-name": name, "url": url,
                                  "read-only": true});
            args.as_object_mut()
                .unwrap()
                .extend(credentials.as_object().unwrap().clone());
            replies.push(reply(&mut c, "blockdev-add", args).await);
        }
        let exported = export(&mut c, &wd, "ok").await;
        assert_same(
            &server.root.join("raw.img"),
            "raw",
            &exported,
            &format!("{which:?}"),
        );
        assert!(
            proxy.forwarded() > before,
            "{which:?} went around the proxy"
        );
        seen.push(replies);
        daemon.quit(&mut c).await;
    }
    assert_eq!(seen[0], seen[1], "blockd, then qsd");
    assert!(seen[0][0]["error"]["desc"]
        .as_str()
        .unwrap()
        .ends_with("407"));
    assert_eq!(seen[0][2], json!({"return": {}}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_serves_reads_in_order_from_few_requests() {
    let dir = tempfile::tempdir().unwrap();
    let server = Nginx::start(dir.path(), None);
    images(&server.root);
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &[]);
    let mut c = daemon.qmp().await;
    for (name, readahead) in [("small", 0), ("large", 1 << 20)] {
        c.execute(
            "blockdev-add",
            json!({"driver": "http", "node-name": name, "url": server.url("raw.img"),
                   "read-only": true, "readahead": readahead}),
        )
        .await
        .unwrap();
        let url = export(&mut c, dir.path(), name).await;
        let before = server.requests("raw.img").len();
        // 1 MiB in 64 KiB reads, one after the other.
        let mut args = vec!["-r".to_string(), "-f".into(), "raw".into()];
        for i in 0..16 {
            args.push("-c".into());
            args.push(format!("read {} 64k", i * 65536));
        }
        args.push(url);
        let out = run(std::process::Command::new("qemu-io").args(&args));
        assert!(out.status.success());
        let made = server.requests("raw.img").len() - before;
        match name {
            // Every read is its own request.
            "small" => assert_eq!(made, 16),
            // The first read's fetch covers the next 1 MiB: one request, and the next
            // read is already inside it.
            _ => assert_eq!(made, 1),
        }
    }
    daemon.quit(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_verifies_the_server_against_the_trusted_authorities() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = make_ca(d, "web");
    let peer = make_peer(
        &ca,
        d,
        "server",
        "/CN=127.0.0.1",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth",
    );
    let server = Nginx::start(
        d,
        Some(Tls {
            cert: &peer.join("server-cert.pem"),
            key: &peer.join("server-key.pem"),
        }),
    );
    images(&server.root);
    let url = server.url("raw.img");
    let trusted = vec![
        "env".to_string(),
        format!("SSL_CERT_FILE={}", ca.join("ca-cert.pem").display()),
    ];
    // The test's CA trusted: reads match.
    let wd = d.join("trusted");
    std::fs::create_dir_all(&wd).unwrap();
    let daemon = Daemon::start_wrapped(Impl::Blockd, &wd, &[], &trusted);
    let mut c = daemon.qmp().await;
    c.execute(
        "blockdev-add",
        json!({"driver": "https", "node-name": "s", "url": url, "read-only": true}),
    )
    .await
    .unwrap();
    let exported = export(&mut c, &wd, "s").await;
    assert_same(
        &server.root.join("raw.img"),
        "raw",
        &exported,
        "the served file",
    );
    daemon.quit(&mut c).await;

    // Only the system's authorities, which do not know the test's CA: refused in qsd's
    // words, unless sslverify is off.
    assert_qsd_has("curl");
    let refused = [(
        "blockdev-add",
        json!({"driver": "https", "node-name": "s", "url": url, "read-only": true}),
    )];
    let [ours, qsd] = replies_of_both(&d.join("refused"), &[], &refused).await;
    assert_eq!(ours, qsd, "blockd, then qsd");
    assert_eq!(
        ours[0]["error"]["desc"],
        "CURL: Error opening file: server certificate verification failed. CAfile: none \
         CRLfile: none"
    );
    let wd = d.join("untrusted");
    std::fs::create_dir_all(&wd).unwrap();
    let daemon = Daemon::start(Impl::Blockd, &wd, &[]);
    let mut c = daemon.qmp().await;
    c.execute(
        "blockdev-add",
        json!({"driver": "https", "node-name": "s", "url": url, "read-only": true,
               "sslverify": false}),
    )
    .await
    .unwrap();
    let exported = export(&mut c, &wd, "s").await;
    assert_same(
        &server.root.join("raw.img"),
        "raw",
        &exported,
        "the served file",
    );
    let n = node(&mut c, "s").await;
    assert!(
        n["file"].as_str().unwrap().starts_with("json:"),
        "sslverify is named in the file name: {n}"
    );
    daemon.quit(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_fails_reads_and_jobs_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = Nginx::start(d, None);
    images(&server.root);
    let daemon = Daemon::start(Impl::Blockd, d, &[]);
    let mut c = daemon.qmp().await;
    c.execute(
        "blockdev-add",
        json!({"driver": "http", "node-name": "web", "url": server.url("raw.img"),
               "read-only": true, "timeout": 2, "readahead": 0}),
    )
    .await
    .unwrap();
    let exported = export(&mut c, d, "web").await;
    assert_eq!(
        qemu_io_outcome(&["-r", "-f", "raw", "-c", "read 0 64k", &exported]),
        "ok"
    );

    server.freeze(true);
    let began = Instant::now();
    let outcome = qemu_io_outcome(&["-r", "-f", "raw", "-c", "read 1M 64k", &exported]);
    let took = began.elapsed();
    assert!(outcome.contains("Input/output error"), "{outcome}");
    assert!(
        took < Duration::from_secs(15),
        "the read failed after {took:?}"
    );

    // A backup from the node fails with EIO too, through its error policy.
    let target = p(d, "target.raw");
    qemu_img(&["create", "-q", "-f", "raw", &target, "4M"]);
    c.execute(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "target",
               "file": {"driver": "file", "filename": target}}),
    )
    .await
    .unwrap();
    c.execute(
        "blockdev-backup",
        json!({"job-id": "b", "device": "web", "target": "target", "sync": "full",
               "on-source-error": "report"}),
    )
    .await
    .unwrap();
    let done = c
        .wait_event("BLOCK_JOB_COMPLETED", WAIT)
        .await
        .expect("the backup ends");
    assert_eq!(done["data"]["error"], "Input/output error", "{done}");

    // Answering again, the node reads again.
    server.freeze(false);
    assert_eq!(
        qemu_io_outcome(&["-r", "-f", "raw", "-c", "read 2M 64k", &exported]),
        "ok"
    );
    drop(server);
    let outcome = qemu_io_outcome(&["-r", "-f", "raw", "-c", "read 3M 64k", &exported]);
    assert!(outcome.contains("Input/output error"), "{outcome}");
    daemon.quit(&mut c).await;
}

/// How the crafted server below misbehaves.
#[derive(Clone, Copy, Debug)]
enum Crafted {
    /// HEAD answers this Content-Length.
    Length(u64),
    /// Range answers start one byte late.
    WrongRange,
    /// A range is answered with 200 and the whole file.
    WholeFile,
    /// The body is longer than the range.
    TooLong,
    /// The connection closes half way through the body.
    TooShort,
    /// One byte a second.
    Trickle,
}

/// A server that answers as `how` says, on a thread: the crafted input a broken or hostile
/// web server sends, which no real server can be told to send. The file is 1 MiB of 0x5a.
fn crafted_server(how: Crafted) -> u16 {
    use std::io::{BufRead, BufReader, Write};
    const LEN: u64 = 1 << 20;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push(line);
                }
                let head_request = head[0].starts_with("HEAD");
                let range = head.iter().find_map(|l| {
                    let (start, end) = l.strip_prefix("range: bytes=")?.trim().split_once('-')?;
                    Some((start.parse::<u64>().ok()?, end.parse::<u64>().ok()?))
                });
                let length = match how {
                    Crafted::Length(n) => n,
                    _ => LEN,
                };
                if head_request {
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\
                         Accept-Ranges: bytes\r\nConnection: close\r\n\r\n"
                    );
                    return;
                }
                let (start, end) = range.unwrap_or((0, LEN - 1));
                let n = end - start + 1;
                let (status, first, sent, declared) = match how {
                    Crafted::WrongRange => ("206 Partial Content", start + 1, n, n),
                    Crafted::WholeFile => ("200 OK", 0, LEN, LEN),
                    Crafted::TooLong => ("206 Partial Content", start, n + 4096, n + 4096),
                    Crafted::TooShort => ("206 Partial Content", start, n / 2, n),
                    _ => ("206 Partial Content", start, n, n),
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Length: {declared}\r\n\
                     Content-Range: bytes {first}-{}/{LEN}\r\nConnection: close\r\n\r\n",
                    first + n - 1
                );
                if let Crafted::Trickle = how {
                    for _ in 0..sent {
                        if stream.write_all(&[0x5a]).is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    return;
                }
                let _ = stream.write_all(&vec![0x5a; sent as usize]);
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_lengths_are_refused_as_by_qsd() {
    assert_qsd_has("curl");
    let dir = tempfile::tempdir().unwrap();
    let mut requests = Vec::new();
    let largest = (i64::MAX as u64) & !((1 << 30) - 1);
    for (i, length) in [u64::MAX, i64::MAX as u64, largest + 1, largest, 0]
        .into_iter()
        .enumerate()
    {
        let port = crafted_server(Crafted::Length(length));
        requests.push((
            "blockdev-add",
            json!({"driver": "http", "node-name": format!("n{i}"), "read-only": true,
                   "url": format!("http://127.0.0.1:{port}/disk.img")}),
        ));
    }
    let [ours, qsd] = replies_of_both(dir.path(), &[], &requests).await;
    assert_eq!(ours, qsd, "blockd, then qsd");
    for (i, r) in ours.as_array().unwrap().iter().enumerate() {
        assert_eq!(r["error"].is_object(), i < 3, "{i}: {r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_answers_fail_reads_with_eio() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let daemon = Daemon::start(Impl::Blockd, d, &[]);
    let mut c = daemon.qmp().await;
    for how in [
        Crafted::WrongRange,
        Crafted::WholeFile,
        Crafted::TooLong,
        Crafted::TooShort,
        Crafted::Trickle,
    ] {
        let port = crafted_server(how);
        let name = format!("{how:?}").to_lowercase();
        c.execute(
            "blockdev-add",
            json!({"driver": "http", "node-name": name, "read-only": true, "timeout": 2,
                   "url": format!("http://127.0.0.1:{port}/disk.img")}),
        )
        .await
        .unwrap();
        let url = export(&mut c, d, &name).await;
        let began = Instant::now();
        let outcome = qemu_io_outcome(&["-r", "-f", "raw", "-c", "read 64k 64k", &url]);
        assert!(outcome.contains("Input/output error"), "{how:?}: {outcome}");
        assert!(
            began.elapsed() < Duration::from_secs(15),
            "{how:?} took {:?}",
            began.elapsed()
        );
    }
    daemon.quit(&mut c).await;
}
