//! blockctl without a daemon: arguments it refuses, a monitor that is not there, and the
//! completions and man pages it generates.

use std::process::{Command, Output};

const BLOCKCTL: &str = env!("CARGO_BIN_EXE_blockctl");

fn blockctl(args: &[&str]) -> Output {
    Command::new(BLOCKCTL)
        .args(args)
        .env_remove("BLOCKCTL_SOCKET")
        .output()
        .expect("run blockctl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn bad_arguments_exit_2_with_the_reason() {
    let out = blockctl(&["-s", "/nowhere", "backup", "only-one"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("<TARGET>"),
        "{}",
        text(&out.stderr)
    );

    let out = blockctl(&["-s", "/nowhere", "resize", "disk", "12Q"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("unknown size suffix 'Q'"),
        "{}",
        text(&out.stderr)
    );

    let out = blockctl(&["-s", "/nowhere", "backup", "a", "b", "--sync", "sideways"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("sideways"),
        "{}",
        text(&out.stderr)
    );

    let out = blockctl(&["ls"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("use -s SOCKET or set BLOCKCTL_SOCKET"),
        "{}",
        text(&out.stderr)
    );

    let out = blockctl(&["-s", "tcp:localhost", "ls"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("lacks a port"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_daemon_that_is_not_there_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.qmp");
    let out = blockctl(&["-s", socket.to_str().unwrap(), "ls"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot connect to") && err.contains("none.qmp"),
        "{err}"
    );
    assert!(err.contains("is the daemon running"), "{err}");
    assert!(out.stdout.is_empty());

    // --json: the same failure as an object on stdout.
    let out = blockctl(&["--json", "-s", socket.to_str().unwrap(), "job", "ls"]);
    assert_eq!(out.status.code(), Some(1));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["error"]["class"], "blockctl");
    assert!(reply["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("cannot connect"));

    // A TCP port nobody listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let out = blockctl(&["-s", &format!("tcp:127.0.0.1:{port}"), "ls"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("refused"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_monitor_that_never_greets_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("mute.qmp");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let start = std::time::Instant::now();
    let out = blockctl(&[
        "-s",
        socket.to_str().unwrap(),
        "--connect-timeout",
        "1",
        "ls",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("did not answer within 1 s"),
        "{}",
        text(&out.stderr)
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
}

#[test]
fn completions_and_man_pages() {
    for shell in ["bash", "zsh", "fish"] {
        let out = blockctl(&["completions", shell]);
        assert!(out.status.success());
        let script = text(&out.stdout);
        assert!(
            script.contains("blockctl") && script.contains("backup"),
            "{shell}: {script}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let out = blockctl(&["man", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = std::fs::read_to_string(dir.path().join("blockctl.1")).unwrap();
    assert!(page.contains(".TH") && page.contains("backup"), "{page}");
    let backup = std::fs::read_to_string(dir.path().join("blockctl-backup.1")).unwrap();
    assert!(backup.contains("incremental"), "{backup}");
}
