//! The foundation seen from outside: QMP block commands, the command line, locking, quit —
//! each run against blockd and, where it says so, against qemu-storage-daemon too.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn make_chain(dir: &Path) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &dir.join("base.qcow2").to_string_lossy(),
        "64M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &dir.join("top.qcow2").to_string_lossy(),
    ]);
}

fn chain_args() -> Vec<String> {
    vec![
        s("--blockdev"),
        s("driver=file,node-name=f0,filename=top.qcow2"),
        s("--blockdev"),
        s("driver=qcow2,node-name=disk0,file=f0"),
    ]
}

/// Run each command, collecting the normalized reply (return value or error).
async fn exchange(client: &mut qmp::Client, script: &[Value]) -> Vec<Value> {
    let mut replies = Vec::new();
    for cmd in script {
        let reply = client
            .execute(
                cmd["execute"].as_str().unwrap(),
                cmd.get("arguments").cloned().unwrap_or(json!({})),
            )
            .await;
        replies.push(normalize(match reply {
            Ok(v) => json!({"return": v}),
            Err(e) => json!({"error": {"class": e.class, "desc": e.desc}}),
        }));
    }
    replies
}

fn graph_edges(graph: &Value) -> Vec<(String, String, String, Value, Value)> {
    let names: std::collections::HashMap<u64, String> = graph["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_u64().unwrap(),
                n["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut edges: Vec<_> = graph["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                normalize(json!(names[&e["parent"].as_u64().unwrap()])).to_string(),
                normalize(json!(names[&e["child"].as_u64().unwrap()])).to_string(),
                e["name"].as_str().unwrap().to_string(),
                e["perm"].clone(),
                e["shared-perm"].clone(),
            )
        })
        .collect();
    edges.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    edges
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_commands_answer_like_qsd() {
    let script = vec![
        json!({"execute": "query-named-block-nodes"}),
        json!({"execute": "query-named-block-nodes", "arguments": {"flat": true}}),
        json!({"execute": "query-block"}),
        json!({"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n1"}}),
        json!({"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n1"}}),
        json!({"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "1bad"}}),
        json!({"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "a234567890123456789012345678901234"}}),
        json!({"execute": "blockdev-add", "arguments": {"driver": "null-co"}}),
        json!({"execute": "blockdev-add", "arguments": {"node-name": "x"}}),
        json!({"execute": "blockdev-add", "arguments": {"driver": "nope", "node-name": "x"}}),
        json!({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "x"}}),
        json!({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "x", "file": 5}}),
        json!({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "x", "file": "nosuch"}}),
        json!({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "x", "file": {"driver": "file"}}}),
        json!({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "x", "file": {"driver": "file", "filename": "top.qcow2", "bogus": 1}}}),
        json!({"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "x", "size": "big"}}),
        json!({"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "x", "filename": "missing.img"}}),
        json!({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "d2", "file": "f0"}}),
        json!({"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r1", "file": "f0", "read-only": true}}),
        json!({"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "nz", "size": 1048576, "read-zeroes": true}}),
        json!({"execute": "blockdev-add", "arguments": {"driver": "blkdebug", "node-name": "bd", "image": "nz", "inject-error": [{"event": "none", "errno": 5}]}}),
        json!({"execute": "query-named-block-nodes"}),
        json!({"execute": "blockdev-del", "arguments": {"node-name": "f0"}}),
        json!({"execute": "blockdev-del", "arguments": {"node-name": "zz"}}),
        json!({"execute": "blockdev-del", "arguments": {}}),
        json!({"execute": "blockdev-del", "arguments": {"node-name": "nz"}}),
        json!({"execute": "blockdev-del", "arguments": {"node-name": "bd"}}),
        json!({"execute": "blockdev-del", "arguments": {"node-name": "nz"}}),
        json!({"execute": "blockdev-del", "arguments": {"node-name": "r1"}}),
        json!({"execute": "blockdev-del", "arguments": {"node-name": "n1"}}),
        json!({"execute": "query-named-block-nodes", "arguments": {"flat": true}}),
        json!({"execute": "no-such-command"}),
        json!({"execute": "query-version", "arguments": {"x": 1}}),
    ];
    let mut results = Vec::new();
    let mut graphs = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        make_chain(dir.path());
        let daemon = Daemon::start(which, dir.path(), &chain_args());
        let mut client = daemon.qmp().await;
        results.push((which, exchange(&mut client, &script).await));
        graphs.push(graph_edges(
            &client
                .execute("x-debug-query-block-graph", json!({}))
                .await
                .unwrap(),
        ));
    }
    let (_, ours) = &results[0];
    // Sanity on our own answers, independent of qsd.
    assert_eq!(
        ours[4]["error"]["desc"],
        "Duplicate nodes with node-name='n1'"
    );
    assert_eq!(ours[22]["error"]["desc"], "Block device f0 is in use");
    let nodes = ours[0]["return"].as_array().unwrap();
    assert_eq!(nodes.len(), 4, "top, its file, and the implicit base chain");
    let disk0 = nodes.iter().find(|n| n["node-name"] == "disk0").unwrap();
    assert_eq!(disk0["image"]["backing-image"]["filename"], "base.qcow2");
    if let Some((_, theirs)) = results.get(1) {
        for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
            assert!(
                a == b,
                "reply {i} to {} differs from qsd at {:?}",
                script[i],
                first_difference(a, b)
            );
        }
        assert_eq!(graphs[0], graphs[1], "block graph differs from qsd");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listed_command_exists_and_schema_describes_it() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &[]);
    let mut client = daemon.qmp().await;
    let commands = client.execute("query-commands", json!({})).await.unwrap();
    let schema = client.execute("query-qmp-schema", json!({})).await.unwrap();
    let in_schema: Vec<&str> = schema
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for cmd in commands.as_array().unwrap() {
        let name = cmd["name"].as_str().unwrap();
        assert!(
            in_schema.contains(&name),
            "{name} missing from query-qmp-schema"
        );
        if name == "quit" {
            continue;
        }
        // Wrong arguments, so nothing happens; but never "command not found".
        if let Err(e) = client.execute(name, json!({"no-such-argument": 1})).await {
            assert_ne!(e.class, qapi::error::ErrorClass::CommandNotFound, "{name}");
        }
    }
    for name in in_schema {
        assert!(
            commands
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == name),
            "schema advertises {name} which query-commands does not list"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_flushes_and_releases_locks() {
    let dir = tempfile::tempdir().unwrap();
    make_chain(dir.path());
    let top = dir.path().join("top.qcow2").to_string_lossy().into_owned();
    for which in Impl::all() {
        let mut daemon = Daemon::start(which, dir.path(), &chain_args());
        let locked = run(Command::new("qemu-img").args(["info", &top]));
        assert!(
            !locked.status.success(),
            "{which:?}: qemu-img info must see the lock"
        );
        let stderr = String::from_utf8_lossy(&locked.stderr);
        assert!(
            stderr.contains("Failed to get shared \"write\" lock"),
            "{which:?}: {stderr}"
        );
        assert!(run(Command::new("qemu-img").args(["info", "-U", &top]))
            .status
            .success());
        let mut client = daemon.qmp().await;
        assert_eq!(client.execute("quit", json!({})).await.unwrap(), json!({}));
        assert!(daemon.wait_exit().success(), "{which:?} quit must exit 0");
        assert!(run(Command::new("qemu-img").args(["info", &top]))
            .status
            .success());
        qemu_img(&["check", &top]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_an_image_qemu_holds() {
    let dir = tempfile::tempdir().unwrap();
    make_chain(dir.path());
    let holder = Daemon::start(
        Impl::Qsd,
        dir.path(),
        &[
            s("--blockdev"),
            s("driver=file,node-name=f0,filename=top.qcow2"),
            s("--blockdev"),
            s("driver=qcow2,node-name=q,file=f0"),
        ],
    );
    let out = run(Command::new(BLOCKD).current_dir(dir.path()).args([
        "--blockdev",
        "driver=file,node-name=f0,filename=top.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=q,file=f0",
    ]));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lock"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_node_releases_its_image() {
    let dir = tempfile::tempdir().unwrap();
    make_chain(dir.path());
    let top = dir.path().join("top.qcow2").to_string_lossy().into_owned();
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &[]);
    let mut client = daemon.qmp().await;
    for (command, name) in [("blockdev-del", "d1"), ("x-blockdev-del", "d2")] {
        client
            .execute(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": name, "file": {"driver": "file", "filename": top}}),
            )
            .await
            .unwrap();
        let locked = run(Command::new("qemu-img").args(["info", &top]));
        assert!(!locked.status.success(), "{name} holds the image");
        client
            .execute(command, json!({"node-name": name}))
            .await
            .unwrap();
        qemu_img(&["info", &top]);
        let err = client
            .execute(command, json!({"node-name": name}))
            .await
            .unwrap_err();
        assert_eq!(
            err.desc,
            format!("Failed to find node with node-name='{name}'")
        );
        let err = client.execute(command, json!({})).await.unwrap_err();
        assert_eq!(err.desc, "Parameter 'node-name' is missing");
    }
    let nodes = client
        .execute("query-named-block-nodes", json!({}))
        .await
        .unwrap();
    assert_eq!(
        nodes,
        json!([]),
        "the implicit file and backing nodes went too"
    );
    daemon.quit(&mut client).await;
    qemu_img(&["check", &top]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    make_chain(dir.path());
    let mut daemon = Daemon::start(Impl::Blockd, dir.path(), &chain_args());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(daemon.wait_exit().success());
    qemu_img(&["info", &dir.path().join("top.qcow2").to_string_lossy()]);
}

#[test]
fn bad_command_lines_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["--blockdev", "driver=nope,node-name=a"],
        vec!["--blockdev", "driver=null-co"],
        vec!["--blockdev", "driver=null-co,node-name=a,size=abc"],
        vec!["--blockdev", "driver=file,node-name=a,filename=missing.img"],
        vec!["--monitor", "chardev=nowhere"],
        vec!["--bogus"],
        vec!["--blockdev"],
    ] {
        let ours = run(Command::new(BLOCKD).args(&args).current_dir(dir.path()));
        assert!(!ours.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&ours.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        {
            let theirs = run(Command::new(QSD).args(&args).current_dir(dir.path()));
            assert!(!theirs.status.success(), "qsd accepted {args:?}");
            let their_err = String::from_utf8_lossy(&theirs.stderr);
            // Each names itself first (qsd by its full path for getopt errors).
            let strip = |t: &str| {
                t.trim()
                    .split_once(": ")
                    .map(|(_, m)| m.to_string())
                    .unwrap_or_default()
            };
            assert_eq!(strip(&err), strip(&their_err), "{args:?}");
        }
    }
}

#[test]
fn help_and_version() {
    let help = run(Command::new(BLOCKD).arg("-h"));
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for opt in [
        "--blockdev",
        "--chardev",
        "--monitor",
        "--pidfile",
        "--daemonize",
    ] {
        assert!(text.contains(opt), "help lacks {opt}");
    }
    let version = run(Command::new(BLOCKD).arg("-V"));
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_blockdev_pidfile_and_daemonize() {
    let dir = tempfile::tempdir().unwrap();
    make_chain(dir.path());
    let pidfile = dir.path().join("blockd.pid");
    let qmp_path = dir.path().join("d.qmp");
    let status = Command::new(BLOCKD)
        .current_dir(dir.path())
        .args([
            "--chardev", &format!("socket,id=m0,path={},server=on,wait=off", qmp_path.display()),
            "--monitor", "chardev=m0",
            "--blockdev", r#"{"driver": "qcow2", "node-name": "disk0", "file": {"driver": "file", "filename": "top.qcow2"}}"#,
            "--pidfile", &pidfile.to_string_lossy(),
            "--daemonize",
        ])
        .status()
        .unwrap();
    assert!(
        status.success(),
        "the parent exits 0 once the daemon is ready"
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut client = qmp::Client::connect_unix(&qmp_path).await.unwrap();
    let nodes = client
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    assert!(nodes
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["node-name"] == "disk0"));
    client.execute("quit", json!({})).await.unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() {
        assert!(std::time::Instant::now() < deadline, "daemon did not exit");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!pidfile.exists(), "pid file removed at exit");
}

/// The NBD client's numbers come from the user: reconnect-delay is a uint32 as in QEMU
/// (a huge or negative one is refused, not a deadline past the clock's end), and a server
/// that is not there is named by its socket address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_client_arguments_answer_like_qsd() {
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("absent.sock");
        let daemon = Daemon::start(which, dir.path(), &[]);
        let mut client = daemon.qmp().await;
        let mut script: Vec<Value> = [json!(-1), json!(4_294_967_295u64), json!(1u64 << 40)]
            .into_iter()
            .map(|delay| {
                json!({"execute": "blockdev-add", "arguments": {"driver": "nbd", "node-name": "n",
                    "server": {"type": "unix", "path": absent}, "reconnect-delay": delay}})
            })
            .collect();
        // A TCP port nobody listens on, reached with each inet option.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        for extra in [
            json!({"keep-alive": true}),
            json!({"mptcp": true}),
            json!({"ipv6": true}),
            json!({"ipv4": true, "numeric": true, "to": 9}),
            json!({"ipv4": false, "ipv6": false}),
        ] {
            let mut server =
                json!({"type": "inet", "host": "127.0.0.1", "port": closed.to_string()});
            server
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            script.push(
                json!({"execute": "blockdev-add", "arguments": {"driver": "nbd",
                "node-name": "n", "server": server}}),
            );
        }
        let replies = exchange(&mut client, &script).await;
        daemon.quit(&mut client).await;
        let text = serde_json::to_string(&replies).unwrap();
        all.push(
            text.replace(&absent.to_string_lossy().into_owned(), "ABSENT")
                .replace(&closed.to_string(), "PORT"),
        );
    }
    assert!(
        all[0].contains("Failed to connect to '127.0.0.1:PORT': Connection refused"),
        "{}",
        all[0]
    );
    assert!(
        all[0].contains("Failed to connect to 'ABSENT'"),
        "{}",
        all[0]
    );
    assert_eq!(all[0], all[1], "blockd vs qsd");
}

/// A server that accepts and never greets: open-timeout gives up with QEMU's text, and
/// meanwhile the daemon answers other monitors and changes the graph for them (qsd's
/// monitor hangs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_nbd_server_times_out_and_the_daemon_answers_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let silent = dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &[]);
    let mut adder = daemon.qmp().await;
    let mut other = daemon.qmp().await;
    let started = Instant::now();
    let add = async {
        let reply = adder
            .execute(
                "blockdev-add",
                json!({"driver": "nbd", "node-name": "n", "open-timeout": 2,
                       "server": {"type": "unix", "path": silent}}),
            )
            .await;
        (reply, Instant::now())
    };
    let query = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        other.execute("query-version", json!({})).await.unwrap();
        other
            .execute(
                "blockdev-add",
                json!({"driver": "null-co", "node-name": "meanwhile"}),
            )
            .await
            .unwrap();
        other
            .execute("blockdev-del", json!({"node-name": "meanwhile"}))
            .await
            .unwrap();
        Instant::now()
    };
    let ((added, added_at), answered_at) = tokio::join!(add, query);
    assert_eq!(
        added.unwrap_err().desc,
        "Connection attempt cancelled by timeout"
    );
    assert!(
        added_at - started >= Duration::from_secs(2),
        "gave up early"
    );
    assert!(answered_at < added_at, "the monitor waited for the open");
    drop(listener);
    daemon.quit(&mut other).await;
}

/// qemu-nbd serving the raw `image` on the unix socket `sock`.
fn serve_raw_image(sock: &Path, image: &Path) -> KillOnDrop {
    KillOnDrop(
        Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "-k",
                &sock.to_string_lossy(),
                &image.to_string_lossy(),
            ])
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", missing_peer("qemu-nbd"))),
    )
}

/// With open-timeout, a server that is not there yet is tried again until it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_timeout_waits_for_a_server_that_starts_late() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("late.raw");
    qemu_img(&["create", "-q", "-f", "raw", &image.to_string_lossy(), "1M"]);
    let sock = dir.path().join("late.sock");
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &[]);
    let mut client = daemon.qmp().await;
    let add = client.execute(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "n", "open-timeout": 10,
               "server": {"type": "unix", "path": sock}}),
    );
    let server = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        serve_raw_image(&sock, &image)
    };
    let (added, _server) = tokio::join!(add, server);
    added.unwrap();
    daemon.quit(&mut client).await;
}

/// Opening does not hold the graph: while an NBD node waits for its server, another
/// monitor takes its node name, and the open then fails with QEMU's duplicate-name text
/// instead of registering a second node of that name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_taken_while_a_node_opens_is_refused_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("late.raw");
    qemu_img(&["create", "-q", "-f", "raw", &image.to_string_lossy(), "1M"]);
    let sock = dir.path().join("late.sock");
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &[]);
    let mut adder = daemon.qmp().await;
    let mut other = daemon.qmp().await;
    let add = adder.execute(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "n", "open-timeout": 10,
               "server": {"type": "unix", "path": sock}}),
    );
    let meanwhile = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        other
            .execute(
                "blockdev-add",
                json!({"driver": "null-co", "node-name": "n"}),
            )
            .await
            .unwrap();
        serve_raw_image(&sock, &image)
    };
    let (added, _server) = tokio::join!(add, meanwhile);
    assert_eq!(
        added.unwrap_err().desc,
        "Duplicate nodes with node-name='n'"
    );
    let nodes = other
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let drivers: Vec<&Value> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| &n["drv"])
        .collect();
    assert_eq!(drivers, [&json!("null-co")]);
    daemon.quit(&mut other).await;
}

/// The monitor's, the NBD server's and a vhost-user-blk export's unix sockets are created
/// mode 0600 even under umask 000 (qsd takes the umask's mode: with the common 0002 a
/// whole group can drive its monitor).
#[tokio::test]
async fn sockets_only_the_daemons_user_can_use() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let image = p(dir.path(), "d.img");
    qemu_img(&["create", "-q", "-f", "raw", &image, "1M"]);
    let (qmp, nbd, vhost) = (
        dir.path().join("m.qmp"),
        dir.path().join("n.sock"),
        dir.path().join("v.sock"),
    );
    let mut command = Command::new(Impl::Blockd.binary());
    command
        .args([
            "--chardev",
            &format!("socket,id=m0,path={},server=on,wait=off", qmp.display()),
        ])
        .args(["--monitor", "chardev=m0"])
        .args([
            "--blockdev",
            &format!("driver=file,node-name=f,filename={image}"),
        ])
        .args(nbd_server_args(&nbd))
        .args(["--export", "type=nbd,id=e,node-name=f"])
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=v,node-name=f,addr.type=unix,addr.path={}",
            vhost.display()
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // Safety: umask is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let _daemon = KillOnDrop(command.spawn().unwrap());
    let deadline = Instant::now() + WAIT;
    for socket in [&qmp, &nbd, &vhost] {
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "{} never served",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let mode = std::fs::metadata(socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", socket.display());
    }
}

/// x-blockdev-change (quorum's children at run time): no blockd driver takes children
/// that way yet, so every case is refused, with qsd's words and in qsd's order of checks.
#[tokio::test]
async fn x_blockdev_change_refuses_as_qsd_does() {
    let dir = tempfile::tempdir().unwrap();
    let image = p(dir.path(), "d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &image, "1M"]);
    let cases = [
        json!({"parent": "nope", "node": "d"}),
        json!({"parent": "d", "child": "file", "node": "d"}),
        json!({"parent": "d"}),
        json!({"parent": "d", "child": "nope"}),
        json!({"parent": "d", "child": "file"}),
        json!({"parent": "d", "node": "nope"}),
        json!({"parent": "d", "node": "d"}),
        json!({"parent": "d", "node": "d", "extra": 1}),
    ];
    let mut requests: Vec<_> = cases
        .into_iter()
        .map(|c| ("x-blockdev-change", c))
        .collect();
    // Nothing changed: the node still has its file child, and goes as a whole.
    requests.push(("blockdev-del", json!({"node-name": "d"})));
    let blockdev = [
        s("--blockdev"),
        format!("driver=qcow2,node-name=d,file.driver=file,file.filename={image}"),
    ];
    let answers = replies_of_both(dir.path(), &blockdev, &requests).await;
    assert!(
        answers[0] == answers[1],
        "blockd against qsd: {:?}",
        first_difference(&answers[0], &answers[1])
    );
    assert_eq!(answers[0][8], json!({"return": {}}));
    qemu_img(&["check", &image]);
}

/// Events emitted before a command ended reach the client before the command's reply, as
/// QEMU's monitor sends them: once query-jobs no longer lists a job, its
/// BLOCK_JOB_COMPLETED has arrived. (blockd once wrote a quick command's reply ahead of
/// events already queued, and blockctl took a failed job for one that vanished.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_come_before_the_reply_of_a_later_command() {
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        qemu_img(&["create", "-q", "-f", "qcow2", &p(d, "disk.qcow2"), "4M"]);
        // Data to copy, so that the mirror writes, and fails.
        let filled = run(Command::new("qemu-io").args(["-c", "write 0 4M", &p(d, "disk.qcow2")]));
        assert!(filled.status.success());
        std::fs::File::create(p(d, "target.raw"))
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let args = [
            s("--blockdev"),
            format!(
                "driver=qcow2,node-name=disk0,file.driver=file,file.filename={}",
                p(d, "disk.qcow2")
            ),
            s("--blockdev"),
            format!(
                "driver=raw,node-name=failing,file.driver=blkdebug,\
                 file.image.driver=file,file.image.filename={},\
                 file.inject-error.0.event=write_aio,file.inject-error.0.errno=5",
                p(d, "target.raw")
            ),
        ];
        let daemon = Daemon::start(which, d, &args);
        let mut client = daemon.qmp().await;
        for round in 0..30 {
            let id = format!("j{round}");
            client
                .execute(
                    "blockdev-mirror",
                    json!({"job-id": id, "device": "disk0", "target": "failing", "sync": "full"}),
                )
                .await
                .unwrap();
            let deadline = Instant::now() + WAIT;
            loop {
                let jobs = client.execute("query-jobs", json!({})).await.unwrap();
                if !jobs.as_array().unwrap().iter().any(|j| j["id"] == id) {
                    break;
                }
                assert!(Instant::now() < deadline, "{which:?}: job {id} never ended");
            }
            let events = client.drain_events();
            assert!(
                events
                    .iter()
                    .any(|e| e["event"] == "BLOCK_JOB_COMPLETED" && e["data"]["device"] == id),
                "{which:?}, {id}: gone from query-jobs before its end was told: {events:?}"
            );
        }
        daemon.quit(&mut client).await;
    }
}
