//! Chardevs side by side with qsd: chardev-add/-change/-remove/-send-break, query-chardev,
//! ringbuf-read/-write and their errors; monitors on ringbuf, file, pipe and stdio chardevs
//! and on a client socket that connects out (again after reconnect-ms); a server chardev
//! added with wait=true answers once its first client came.

mod common;

use common::{reply, Daemon, Impl, WAIT};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;

/// `v` with `dir` spelled DIR, pty names and inet ports hidden, and lists sorted (qsd lists
/// chardevs in hash order): what may differ between two daemons that did the same.
fn normalized(v: Value, dir: &Path) -> Value {
    let text = v
        .to_string()
        .replace(&dir.display().to_string(), "DIR")
        .replace("blockd.qmp", "QMP")
        .replace("qsd.qmp", "QMP");
    let pts = regex_free_replace(&text, "/dev/pts/", |c| c.is_ascii_digit(), "N");
    let ports = regex_free_replace(&pts, "tcp:127.0.0.1:", |c| c.is_ascii_digit(), "PORT");
    let mut v: Value = serde_json::from_str(&ports).unwrap();
    if let Some(list) = v.get_mut("return").and_then(Value::as_array_mut) {
        list.sort_by_key(|e| e.to_string());
    }
    v
}

/// Replace the run of characters matching `keep` after each `marker` with `with`.
fn regex_free_replace(text: &str, marker: &str, keep: fn(char) -> bool, with: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(marker) {
        out.push_str(&rest[..at + marker.len()]);
        rest = &rest[at + marker.len()..];
        let end = rest.find(|c: char| !keep(c)).unwrap_or(rest.len());
        out.push_str(with);
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[tokio::test(flavor = "current_thread")]
async fn chardev_commands_answer_as_qsd() {
    let tmp = tempfile::tempdir().unwrap();
    let mut answers = Vec::new();
    for which in Impl::all() {
        let dir = tmp.path().join(format!("{which:?}"));
        std::fs::create_dir_all(&dir).unwrap();
        let d = |name: &str| dir.join(name).display().to_string();
        let unix = |path: String, server: bool| {
            json!({"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": path}}, "server": server}})
        };
        let add = |id: &str, backend: Value| ("chardev-add", json!({"id": id, "backend": backend}));
        let requests = vec![
            add("r", json!({"type": "ringbuf", "data": {"size": 4}})),
            ("ringbuf-write", json!({"device": "r", "data": "abcdef"})),
            ("ringbuf-read", json!({"device": "r", "size": 2})),
            ("ringbuf-read", json!({"device": "r", "size": 100})),
            ("ringbuf-read", json!({"device": "r", "size": 0})),
            (
                "ringbuf-write",
                json!({"device": "r", "data": "YWJj", "format": "base64"}),
            ),
            (
                "ringbuf-read",
                json!({"device": "r", "size": 100, "format": "base64"}),
            ),
            (
                "ringbuf-write",
                json!({"device": "r", "data": "!!", "format": "base64"}),
            ),
            (
                "ringbuf-write",
                json!({"device": "r", "data": "x", "format": "hex"}),
            ),
            ("ringbuf-write", json!({"device": "nope", "data": "x"})),
            add(
                "n",
                json!({"type": "null", "data": {"logfile": d("n.log")}}),
            ),
            ("ringbuf-read", json!({"device": "n", "size": 1})),
            add("n", json!({"type": "null", "data": {}})),
            add(
                "f",
                json!({"type": "file", "data": {"out": d("f.out"), "append": true}}),
            ),
            add(
                "g",
                json!({"type": "file", "data": {"out": "/nonexistent/x"}}),
            ),
            add("g", json!({"type": "file", "data": {}})),
            add("g", json!({"type": "file"})),
            add("g", json!({"type": "ringbuf", "data": {"size": 3}})),
            add(
                "g",
                json!({"type": "ringbuf", "data": {"size": 4, "bogus": 1}}),
            ),
            add("g", json!({"type": "ringbuf", "data": {}, "x": 1})),
            add("g", json!({"type": "bogus", "data": {}})),
            add("g", json!({"type": "msmouse", "data": {}})),
            add(
                "g",
                json!({"type": "pipe", "data": {"device": d("nopipe")}}),
            ),
            add(
                "g",
                json!({"type": "serial", "data": {"device": d("noserial")}}),
            ),
            ("chardev-add", json!({"id": "g"})),
            add("s", unix(d("s.sock"), true)),
            add("c", unix(d("s.sock"), false)),
            add("g", unix(d("none.sock"), false)),
            add(
                "g",
                json!({"type": "socket", "data": {
                    "addr": {"type": "unix", "data": {"path": d("x.sock")}},
                    "server": false, "wait": true}}),
            ),
            add(
                "g",
                json!({"type": "socket", "data": {
                    "addr": {"type": "unix", "data": {"path": d("x.sock")}},
                    "server": false, "reconnect": 1, "reconnect-ms": 5}}),
            ),
            add(
                "g",
                json!({"type": "socket", "data": {
                    "addr": {"type": "fd", "data": {"str": "3"}}, "server": true, "wait": false}}),
            ),
            add(
                "later",
                json!({"type": "socket", "data": {
                    "addr": {"type": "unix", "data": {"path": d("later.sock")}},
                    "server": false, "reconnect-ms": 100}}),
            ),
            add(
                "t",
                json!({"type": "socket", "data": {
                    "addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}},
                    "server": true, "wait": false, "nodelay": true}}),
            ),
            add(
                "a",
                json!({"type": "socket", "data": {
                    "addr": {"type": "unix", "data": {"path": d("abstract"), "abstract": true}},
                    "server": true, "wait": false}}),
            ),
            add("p", json!({"type": "pty", "data": {"path": d("pty.link")}})),
            ("query-chardev", json!({})),
            ("query-chardev", json!({"bogus": 1})),
            ("query-chardev-backends", json!({"bogus": 1})),
            ("chardev-send-break", json!({"id": "p"})),
            ("chardev-send-break", json!({"id": "nope"})),
            (
                "chardev-change",
                json!({"id": "s", "backend": {"type": "ringbuf", "data": {}}}),
            ),
            (
                "chardev-change",
                json!({"id": "nope", "backend": {"type": "null", "data": {}}}),
            ),
            (
                "chardev-change",
                json!({"id": "m0", "backend": {"type": "null", "data": {}}}),
            ),
            ("chardev-remove", json!({"id": "m0"})),
            ("chardev-remove", json!({"id": "p"})),
            ("chardev-remove", json!({"id": "c"})),
            ("chardev-remove", json!({"id": "nope"})),
            ("query-chardev", json!({})),
            ("qom-list", json!({"path": "/chardevs"})),
            ("qom-list", json!({"path": "/chardevs/r"})),
        ];
        let daemon = Daemon::start(which, &dir, &[]);
        let mut client = daemon.qmp().await;
        let mut seen = Vec::new();
        for (command, arguments) in &requests {
            seen.push(normalized(
                reply(&mut client, command, arguments.clone()).await,
                &dir,
            ));
        }
        // The socket file of a chardev that changed to a ring buffer and the link of a
        // removed pty are gone.
        assert!(!dir.join("s.sock").exists(), "{which:?}");
        assert!(!dir.join("pty.link").exists(), "{which:?}");
        assert!(dir.join("n.log").exists() && dir.join("f.out").exists());
        daemon.quit(&mut client).await;
        answers.push(seen);
    }
    let qsd = answers.pop().unwrap();
    let blockd = answers.pop().unwrap();
    for (i, (b, q)) in blockd.iter().zip(&qsd).enumerate() {
        assert_eq!(b, q, "request {i}");
    }
}

/// What blockd does differently, on purpose: a ring buffer of size 0 crashes qsd 10.0.2 at
/// its first write, and a failed chardev-change makes qsd lose the chardev.
#[tokio::test(flavor = "current_thread")]
async fn bad_chardev_input_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &[]);
    let mut client = daemon.qmp().await;
    let answer = reply(
        &mut client,
        "chardev-add",
        json!({"id": "z", "backend": {"type": "ringbuf", "data": {"size": 0}}}),
    )
    .await;
    assert_eq!(
        answer["error"]["desc"],
        "Failed to add chardev 'z': size of ringbuf chardev must be power of two"
    );
    let answer = reply(
        &mut client,
        "chardev-add",
        json!({"id": "big", "backend": {"type": "ringbuf", "data": {"size": 1u64 << 40}}}),
    )
    .await;
    assert!(answer["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("at most"));
    reply(
        &mut client,
        "chardev-add",
        json!({"id": "r", "backend": {"type": "ringbuf", "data": {"size": 8}}}),
    )
    .await;
    reply(
        &mut client,
        "ringbuf-write",
        json!({"device": "r", "data": "kept"}),
    )
    .await;
    let answer = reply(
        &mut client,
        "chardev-change",
        json!({"id": "r", "backend": {"type": "ringbuf", "data": {"size": 3}}}),
    )
    .await;
    assert_eq!(
        answer["error"]["desc"],
        "Failed to add chardev 'r': size of ringbuf chardev must be power of two"
    );
    let answer = reply(
        &mut client,
        "ringbuf-read",
        json!({"device": "r", "size": 8}),
    )
    .await;
    assert_eq!(answer, json!({"return": "kept"}));
    daemon.quit(&mut client).await;
}

/// A line of a QMP stream, with a deadline.
fn read_line(reader: &mut impl BufRead) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).expect("read a QMP line");
    line
}

/// qmp_capabilities and query-version on a monitor stream; returns the version reply.
fn negotiate(reader: &mut impl BufRead, writer: &mut impl Write) -> Value {
    writer
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-version\"}\n")
        .unwrap();
    writer.flush().unwrap();
    let caps: Value = serde_json::from_str(&read_line(reader)).unwrap();
    assert_eq!(caps, json!({"return": {}}));
    serde_json::from_str(&read_line(reader)).unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn monitors_on_ringbuf_file_pipe_and_stdio() {
    for which in Impl::all() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let fifo = |name: &str| {
            nix::unistd::mkfifo(
                &dir.join(name),
                nix::sys::stat::Mode::from_bits(0o600).unwrap(),
            )
            .unwrap()
        };
        fifo("p.in");
        fifo("p.out");
        let args: Vec<String> = [
            "--chardev",
            "ringbuf,id=r,size=1024",
            "--monitor",
            "r",
            "--chardev",
            &format!("file,id=f,path={}", dir.join("f.out").display()),
            "--monitor",
            "f",
            "--chardev",
            &format!("pipe,id=p,path={}", dir.join("p").display()),
            "--monitor",
            "p",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let daemon = Daemon::start(which, dir, &args);
        let mut client = daemon.qmp().await;
        // The monitors' greetings went into the ring and the file.
        let ring = reply(
            &mut client,
            "ringbuf-read",
            json!({"device": "r", "size": 1024}),
        )
        .await;
        let ring = ring["return"].as_str().unwrap().to_owned();
        assert!(
            ring.starts_with("{\"QMP\": {\"version\""),
            "{which:?}: {ring}"
        );
        let file = std::fs::read_to_string(dir.join("f.out")).unwrap();
        assert!(
            file.starts_with("{\"QMP\": {\"version\""),
            "{which:?}: {file}"
        );
        // The pipe monitor answers through the FIFOs.
        let (to, from) = (dir.join("p.in"), dir.join("p.out"));
        let done = tokio::task::spawn_blocking(move || {
            let mut writer = std::fs::OpenOptions::new().write(true).open(to).unwrap();
            let mut reader = BufReader::new(std::fs::File::open(from).unwrap());
            assert!(read_line(&mut reader).contains("QMP"));
            negotiate(&mut reader, &mut writer)
        });
        let version = tokio::time::timeout(WAIT, done).await.unwrap().unwrap();
        assert_eq!(version["return"]["qemu"]["major"], 10, "{which:?}");
        let busy = reply(&mut client, "chardev-remove", json!({"id": "p"})).await;
        assert_eq!(busy["error"]["desc"], "Chardev 'p' is busy");
        daemon.quit(&mut client).await;
    }
    // stdio: the daemon's standard input and output carry QMP.
    for which in Impl::all() {
        let mut child = std::process::Command::new(which.binary())
            .args(["--chardev", "stdio,id=s", "--monitor", "s"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut writer = child.stdin.take().unwrap();
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        assert!(read_line(&mut reader).contains("QMP"), "{which:?}");
        let version = negotiate(&mut reader, &mut writer);
        assert_eq!(version["return"]["qemu"]["major"], 10, "{which:?}");
        writer.write_all(b"{\"execute\":\"quit\"}\n").unwrap();
        writer.flush().unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        while child.try_wait().unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "{which:?} did not quit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_client_socket_monitor_connects_out_and_again_after_reconnect_ms() {
    for which in Impl::all() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("manager.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let args = vec![
            "--chardev".to_string(),
            format!("socket,id=out,path={},reconnect-ms=100", path.display()),
            "--monitor".to_string(),
            "out".to_string(),
        ];
        let daemon = Daemon::start(which, tmp.path(), &args);
        let accepted = tokio::task::spawn_blocking(move || {
            let mut versions = Vec::new();
            for _ in 0..2 {
                let (stream, _) = listener.accept().unwrap();
                stream.set_read_timeout(Some(WAIT)).unwrap();
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                assert!(read_line(&mut reader).contains("QMP"));
                versions.push(negotiate(&mut reader, &mut writer));
                // Dropping the connection: the daemon connects again after 100 ms.
            }
            versions
        });
        let versions = tokio::time::timeout(WAIT, accepted).await.unwrap().unwrap();
        for version in versions {
            assert_eq!(version["return"]["qemu"]["major"], 10, "{which:?}");
        }
        let mut client = daemon.qmp().await;
        let list = reply(&mut client, "query-chardev", json!({})).await;
        let out = list["return"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["label"] == "out")
            .unwrap()
            .clone();
        assert_eq!(out["frontend-open"], true, "{which:?}");
        daemon.quit(&mut client).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_server_added_with_wait_answers_once_its_client_came() {
    for which in Impl::all() {
        server_with_wait(which).await;
    }
}

async fn server_with_wait(which: Impl) {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(which, tmp.path(), &[]);
    let mut client = daemon.qmp().await;
    let path = tmp.path().join("w.sock");
    let add = reply(
        &mut client,
        "chardev-add",
        json!({"id": "w", "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": path.display().to_string()}},
            "server": true, "wait": true}}}),
    );
    let connect = async {
        loop {
            if let Ok(stream) = tokio::net::UnixStream::connect(&path).await {
                return stream;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (answer, _peer) = tokio::time::timeout(WAIT, async { tokio::join!(add, connect) })
        .await
        .unwrap();
    assert_eq!(answer, json!({"return": {}}));
    let list = reply(&mut client, "query-chardev", json!({})).await;
    let w = list["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["label"] == "w")
        .unwrap()
        .clone();
    let expected = format!("unix:{},server=on", path.display());
    assert_eq!(w["filename"], expected, "{which:?}");
    daemon.quit(&mut client).await;
}

/// Command lines that fail once applied, with the same text from both daemons.
#[test]
fn startup_errors_as_qsd() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let cases: Vec<Vec<String>> = vec![
        vec!["--chardev", "ringbuf,id=r,size=3"],
        vec!["--chardev", "null,id=n", "--monitor", "n", "--monitor", "n"],
        vec!["--chardev", "stdio,id=s", "--chardev", "stdio,id=t"],
        vec!["--chardev", "null,id=n", "--chardev", "null,id=n"],
        vec!["--monitor", "nope"],
        vec!["--chardev", "file,id=f,path=/nonexistent/f"],
    ]
    .into_iter()
    .map(|c| c.into_iter().map(str::to_owned).collect())
    .chain([vec![
        "--chardev".to_owned(),
        format!("file,id=f,path={},input-path=/nonexistent", out.display()),
    ]])
    .collect();
    for args in cases {
        let mut texts = Vec::new();
        for which in Impl::all() {
            let output = std::process::Command::new(which.binary())
                .args(&args)
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            assert_eq!(output.status.code(), Some(1), "{which:?} {args:?}");
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            let text = stderr.split_once(": ").map(|(_, t)| t.trim().to_owned());
            texts.push(text.unwrap_or(stderr));
        }
        assert_eq!(texts[0], texts[1], "{args:?}");
    }
}

/// `--monitor pretty=on` lays out every message as qsd does, byte for byte.
#[test]
fn pretty_monitors_write_as_qsd() {
    use std::io::Read;
    let mut outputs = Vec::new();
    for which in Impl::all() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("pretty.sock");
        let args = vec![
            "--chardev".to_string(),
            format!("socket,id=p,path={},server=on,wait=off", path.display()),
            "--monitor".to_string(),
            "chardev=p,pretty=on".to_string(),
        ];
        let _daemon = Daemon::start(which, tmp.path(), &args);
        let mut stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream
            .write_all(
                b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-version\"}\n\
                  {\"execute\":\"bogus\"}\n{\"execute\":\"query-jobs\",\"id\":[1,{}]}\n",
            )
            .unwrap();
        // Four replies after the greeting; the last ends with the id's closing brace.
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        while text.matches("\r\n}\r\n").count() < 5 {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "{which:?} closed: {text}");
            text.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        }
        let package = |t: &str| {
            t.split("\r\n")
                .map(|l| {
                    if l.trim_start().starts_with("\"package\"") {
                        "PACKAGE"
                    } else {
                        l
                    }
                })
                .collect::<Vec<_>>()
                .join("\r\n")
        };
        outputs.push(package(&text));
    }
    assert_eq!(outputs[0], outputs[1]);
    assert!(
        outputs[0].contains("{\r\n    \"return\": {\r\n    }\r\n}\r\n"),
        "{:?}",
        outputs[0]
    );
}
