//! blockctl against a running daemon: the README's quick start (create, bitmap, export, ls,
//! backup, mirror) on blockd and on qemu-storage-daemon, jobs that fail and jobs that are
//! cancelled with the exit status each gives, stream and commit, the live event feed with
//! reconnection, and the progress bars as a person sees them on a terminal (tmux).

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// blockctl is built beside blockd: `cargo test --workspace` builds both (blockctl's own
/// tests need its binary).
fn blockctl_binary() -> PathBuf {
    let path = Path::new(BLOCKD).with_file_name("blockctl");
    assert!(
        path.exists(),
        "{} is not built: run `cargo build -p blockctl` (cargo test --workspace builds it)",
        path.display()
    );
    path
}

fn ctl_command(daemon: &Daemon, args: &[&str]) -> Command {
    let mut command = Command::new(blockctl_binary());
    command
        .arg("-s")
        .arg(&daemon.qmp_path)
        .args(args)
        .env_remove("BLOCKCTL_SOCKET");
    command
}

fn ctl(daemon: &Daemon, args: &[&str]) -> Output {
    ctl_command(daemon, args).output().expect("run blockctl")
}

/// Runs blockctl and expects exit status 0; returns stdout.
fn ok(daemon: &Daemon, args: &[&str]) -> String {
    let out = ctl(daemon, args);
    assert!(
        out.status.success(),
        "{:?}: blockctl {args:?} exited {:?}: {}{}",
        daemon.which,
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(daemon: &Daemon, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(daemon, &all)).unwrap()
}

/// A 64 MiB qcow2 image whose first 4 MiB hold pattern 7, opened as node `disk0`.
fn disk_args(dir: &Path) -> Vec<String> {
    let disk = p(dir, "disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &disk, "64M"]);
    common::jobs::qemu_io(&["-c", "write -P 7 0 4M", &disk]);
    vec![
        "--blockdev".into(),
        format!("driver=file,filename={disk},node-name=disk0-file"),
        "--blockdev".into(),
        "driver=qcow2,file=disk0-file,node-name=disk0".into(),
    ]
}

fn nbd_uri(dir: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", p(dir, "nbd.sock"))
}

/// A 64 MiB qcow2 image at `file`, opened as node `tgt`.
fn create_tgt(daemon: &Daemon, file: &str) {
    ok(
        daemon,
        &["create", file, "--size", "64M", "--node-name", "tgt"],
    );
}

async fn quit(daemon: Daemon) {
    let mut client = daemon.qmp().await;
    daemon.quit(&mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_start_backup_and_mirror_on_both_daemons() {
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let daemon = Daemon::start(which, d, &disk_args(d));
        let backup = p(d, "backup.qcow2");
        let mirror = p(d, "mirror.qcow2");

        let out = ok(
            &daemon,
            &["create", &backup, "--size", "64M", "--node-name", "tgt"],
        );
        assert!(out.contains("opened as 'tgt'"), "{which:?}: {out}");
        ok(&daemon, &["bitmap", "add", "disk0", "b0", "--persistent"]);
        let sock = p(d, "nbd.sock");
        ok(
            &daemon,
            &["export", "add", "disk0", "--listen", &sock, "--writable"],
        );

        let tree = ok(&daemon, &["ls"]);
        for line in [
            "disk0  qcow2  64.00 MiB",
            "│   bitmap b0: 0 B dirty, 64.00 KiB granularity, recording, persistent",
            "│   exported as disk0 (nbd)",
            "└── file: disk0-file  file",
            "tgt  qcow2  64.00 MiB",
        ] {
            assert!(tree.contains(line), "{which:?}: no '{line}' in\n{tree}");
        }
        let nodes = json(&daemon, &["ls"]);
        let disk0 = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == "disk0")
            .unwrap();
        assert_eq!(disk0["children"][0]["role"], "file", "{which:?}: {disk0}");
        assert_eq!(disk0["children"][0]["node-name"], "disk0-file");
        assert_eq!(disk0["exports"][0], "disk0");
        assert_eq!(disk0["bitmaps"][0]["name"], "b0");
        assert_eq!(disk0["virtual-size"], 64 << 20);

        let out = ok(&daemon, &["backup", "disk0", "tgt", "--wait"]);
        assert!(
            out.starts_with("backup 'disk0' completed (64.00 MiB in "),
            "{which:?}: {out}"
        );
        assert_eq!(
            json(&daemon, &["job", "ls"]),
            serde_json::json!([]),
            "{which:?}: dismissed"
        );

        // A client write after the backup: the bitmap counts it, the backup does not see it.
        common::jobs::qemu_io(&["-f", "raw", "-c", "write -P 9 1M 1M", &nbd_uri(d, "disk0")]);
        let bitmaps = json(&daemon, &["bitmap", "ls", "disk0"]);
        assert_eq!(bitmaps[0]["count"], 1 << 20, "{which:?}: {bitmaps}");
        assert_eq!(bitmaps[0]["node"], "disk0");

        ok(
            &daemon,
            &["create", &mirror, "--size", "64M", "--node-name", "mt"],
        );
        let out = ok(
            &daemon,
            &[
                "mirror",
                "disk0",
                "mt",
                "--wait",
                "--when-ready",
                "complete",
            ],
        );
        assert!(
            out.starts_with("mirror 'disk0' completed"),
            "{which:?}: {out}"
        );
        // The export followed the pivot.
        let exports = json(&daemon, &["export", "ls"]);
        assert_eq!(exports[0]["node-name"], "mt", "{which:?}: {exports}");

        quit(daemon).await;
        for image in [&backup, &mirror] {
            qemu_img(&["check", "-q", image]);
        }
        common::jobs::qemu_io(&["-c", "read -P 7 0 4M", &backup]);
        common::jobs::qemu_io(&[
            "-c",
            "read -P 7 0 1M",
            "-c",
            "read -P 9 1M 1M",
            "-c",
            "read -P 7 2M 2M",
            &mirror,
        ]);
        qemu_img(&["compare", &mirror, &p(d, "disk.qcow2")]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_named_with_the_daemons_words() {
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let target = p(d, "target.raw");
        std::fs::File::create(&target)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let mut args = disk_args(d);
        args.extend([
            "--blockdev".to_string(),
            format!(
                "driver=raw,node-name=failing,file.driver=blkdebug,\
                 file.image.driver=file,file.image.filename={target},\
                 file.inject-error.0.event=write_aio,file.inject-error.0.errno=5"
            ),
        ]);
        let daemon = Daemon::start(which, d, &args);

        // The job starts, then fails on its first write.
        let out = ctl(&daemon, &["backup", "disk0", "failing", "--wait"]);
        assert_eq!(out.status.code(), Some(1), "{which:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.starts_with("backup 'disk0' failed: Input/output error"),
            "{which:?}: {stdout}"
        );
        let out = ctl(
            &daemon,
            &[
                "--json", "backup", "disk0", "failing", "--wait", "--job-id", "again",
            ],
        );
        assert_eq!(out.status.code(), Some(1), "{which:?}");
        let outcome: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(outcome["outcome"], "failed");
        assert_eq!(outcome["error"], "Input/output error");
        assert_eq!(
            json(&daemon, &["job", "ls"]),
            serde_json::json!([]),
            "{which:?}: dismissed"
        );

        // Refused before any job: what was asked, then the daemon's own text.
        let out = ctl(&daemon, &["backup", "nothere", "failing"]);
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let daemons_words = stderr
            .strip_prefix("blockctl: backup of 'nothere' into 'failing': ")
            .unwrap_or_else(|| panic!("{which:?}: {stderr}"));
        assert!(daemons_words.contains("nothere"), "{which:?}: {stderr}");

        // A mirror that fails before it is in sync: its reason, not a lost job.
        let out = ctl(
            &daemon,
            &[
                "mirror",
                "disk0",
                "failing",
                "--wait",
                "--when-ready",
                "complete",
            ],
        );
        assert_eq!(out.status.code(), Some(1), "{which:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.starts_with("mirror 'disk0' failed: Input/output error"),
            "{which:?}: {stdout}"
        );

        let out = ctl(&daemon, &["job", "wait", "nosuch"]);
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "blockctl: no job 'nosuch'\n"
        );
        assert_eq!(ok(&daemon, &["job", "wait"]), "no running jobs\n");
        let out = ctl(
            &daemon,
            &[
                "create",
                &p(d, "x.qcow2"),
                "--size",
                "1M",
                "--node-name",
                "disk0",
            ],
        );
        assert_eq!(out.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("a node named 'disk0' exists already")
        );
        assert!(
            !Path::new(&p(d, "x.qcow2")).exists(),
            "{which:?}: refused, yet created"
        );
        let out = ctl(&daemon, &["--json", "bitmap", "rm", "disk0", "zz"]);
        assert_eq!(out.status.code(), Some(1));
        let error: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(error["error"]["class"], "GenericError");
        assert_eq!(
            error["error"]["desc"], "removing bitmap 'zz' of 'disk0': Dirty bitmap 'zz' not found",
            "{which:?}"
        );
        let out = ctl(&daemon, &["bitmap", "ls", "nonode"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("no node named 'nonode'"));
        quit(daemon).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_and_stream_wait_for_their_end() {
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let daemon = Daemon::start(which, d, &disk_args(d));
        let overlay = p(d, "overlay.qcow2");
        ok(
            &daemon,
            &["snapshot", "disk0", &overlay, "--node-name", "ov"],
        );
        let sock = p(d, "nbd.sock");
        ok(
            &daemon,
            &["export", "add", "ov", "--listen", &sock, "--writable"],
        );
        common::jobs::qemu_io(&["-f", "raw", "-c", "write -P 5 2M 1M", &nbd_uri(d, "ov")]);

        // Active commit: ready, then completed by blockctl; the export moves down to disk0.
        let out = ok(&daemon, &["commit", "ov", "--wait"]);
        assert!(out.starts_with("commit 'ov' completed"), "{which:?}: {out}");
        let exports = json(&daemon, &["export", "ls"]);
        assert_eq!(exports[0]["node-name"], "disk0", "{which:?}: {exports}");

        let out = ok(&daemon, &["export", "rm", "ov"]);
        assert_eq!(out, "export 'ov' removed\n");
        // The committed overlay stays a node over disk0; a new one goes on top of it.
        let top = p(d, "top.qcow2");
        ok(&daemon, &["snapshot", "ov", &top, "--node-name", "top"]);
        let out = ok(&daemon, &["stream", "top", "--wait", "--job-id", "pull"]);
        assert!(
            out.starts_with("stream 'pull' completed"),
            "{which:?}: {out}"
        );
        quit(daemon).await;

        common::jobs::qemu_io(&[
            "-c",
            "read -P 7 0 2M",
            "-c",
            "read -P 5 2M 1M",
            &p(d, "disk.qcow2"),
        ]);
        // Streamed: the top image holds the data itself, and no longer needs a backing file.
        let info: Value =
            serde_json::from_str(&qemu_img(&["info", "--output=json", &top])).unwrap();
        assert!(info.get("backing-filename").is_none(), "{which:?}: {info}");
        common::jobs::qemu_io(&["-c", "read -P 7 0 2M", "-c", "read -P 5 2M 1M", &top]);
    }
}

/// Waits until `id` is listed by `blockctl job ls`.
fn wait_for_job(daemon: &Daemon, id: &str) {
    let deadline = Instant::now() + WAIT;
    while !json(daemon, &["job", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["id"] == id)
    {
        assert!(Instant::now() < deadline, "job {id} never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_child(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "blockctl did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_exits_3_and_speed_changes_apply() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let daemon = Daemon::start(Impl::Blockd, d, &disk_args(d));
    create_tgt(&daemon, &p(d, "b.qcow2"));
    let mut waiting = ctl_command(
        &daemon,
        &[
            "backup", "disk0", "tgt", "--sync", "full", "--speed", "1M", "--wait",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for_job(&daemon, "disk0");
    ok(&daemon, &["job", "speed", "disk0", "2M"]);
    let jobs = ok(&daemon, &["job", "ls"]);
    assert!(jobs.contains("2.00 MiB/s"), "{jobs}");
    ok(&daemon, &["job", "cancel", "disk0"]);
    let status = wait_child(&mut waiting);
    let mut stdout = String::new();
    std::io::Read::read_to_string(waiting.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    assert_eq!(status.code(), Some(3), "{stdout}");
    assert!(stdout.starts_with("backup 'disk0' cancelled"), "{stdout}");
    assert_eq!(json(&daemon, &["job", "ls"]), serde_json::json!([]));

    // blockctl killed while it waits: the job goes on, and goes away on its own at its
    // end, so the next job of the same id can start.
    let mut waiting = ctl_command(
        &daemon,
        &[
            "backup", "disk0", "tgt", "--speed", "1M", "--wait", "--job-id", "k",
        ],
    )
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    wait_for_job(&daemon, "k");
    waiting.kill().unwrap();
    waiting.wait().unwrap();
    ok(&daemon, &["job", "speed", "k", "0"]);
    let out = ok(&daemon, &["job", "wait", "k"]);
    assert!(out.starts_with("backup 'k' completed"), "{out}");
    assert_eq!(json(&daemon, &["job", "ls"]), serde_json::json!([]));
    quit(daemon).await;
}

/// Reads lines from `child`'s stdout on a thread, so the test can wait for one.
fn line_reader(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Runs backups named `id` until the watcher prints one from its start to its end: it
/// connects (and reconnects) on its own time, and events before that are not for it to
/// see. Every line it prints must be JSON. Returns the lines of that backup's round.
fn backups_until_seen(
    daemon: &Daemon,
    lines: &std::sync::mpsc::Receiver<String>,
    id: &str,
) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    let mut rounds = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "watch never showed job {id}: {rounds:?}"
        );
        ok(
            daemon,
            &["backup", "disk0", "tgt", "--wait", "--job-id", id],
        );
        let round: Vec<String> = lines
            .recv_timeout(Duration::from_millis(500))
            .into_iter()
            .chain(lines.try_iter())
            .collect();
        let events: Vec<Value> = round
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let of_job = |name: &str, status: Option<&str>| {
            events.iter().any(|e| {
                e["event"] == name
                    && (e["data"]["device"] == id || e["data"]["id"] == id)
                    && status.is_none_or(|s| e["data"]["status"] == s)
            })
        };
        if of_job("JOB_STATUS_CHANGE", Some("running")) && of_job("BLOCK_JOB_COMPLETED", None) {
            return round;
        }
        rounds.push(round);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_events_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let daemon = Daemon::start(Impl::Blockd, d, &disk_args(d));
    let mut watch = ctl_command(&daemon, &["--json", "watch", "--reconnect"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = line_reader(&mut watch);
    // It waits for the daemon forever: a failing test must not leave it behind.
    let mut watch = KillOnDrop(watch);
    create_tgt(&daemon, &p(d, "b.qcow2"));
    backups_until_seen(&daemon, &lines, "first");

    // The daemon goes and comes back on the same socket: the watcher follows.
    daemon.kill();
    let daemon = Daemon::start(Impl::Blockd, d, &disk_args(d));
    create_tgt(&daemon, &p(d, "c.qcow2"));
    backups_until_seen(&daemon, &lines, "second");
    assert!(
        watch.0.try_wait().unwrap().is_none(),
        "watch --reconnect exited"
    );
    quit(daemon).await;
}

/// "12.00 MiB" → bytes.
fn parse_bytes(number: &str, unit: &str) -> f64 {
    let scale = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => panic!("unit {unit}"),
    };
    number.parse::<f64>().unwrap() * scale
}

/// Kills a tmux session when the test ends, however it ends.
struct TmuxSession {
    socket: String,
    name: String,
}

impl TmuxSession {
    fn run(&self, args: &[&str]) -> Output {
        run(Command::new("tmux").arg("-S").arg(&self.socket).args(args))
    }

    fn screen(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-t", &self.name]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TmuxSession {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_bars_move_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let daemon = Daemon::start(Impl::Blockd, d, &disk_args(d));
    // Data everywhere, so that every cluster is copied under the speed limit.
    ok(
        &daemon,
        &[
            "export",
            "add",
            "disk0",
            "--listen",
            &p(d, "nbd.sock"),
            "--writable",
        ],
    );
    common::jobs::qemu_io(&["-f", "raw", "-c", "write -P 3 4M 60M", &nbd_uri(d, "disk0")]);
    create_tgt(&daemon, &p(d, "b.qcow2"));

    let tmux = TmuxSession {
        socket: p(d, "tmux"),
        name: "progress".into(),
    };
    let shell_command = format!(
        "{} -s {} backup disk0 tgt --speed 16M --wait; echo EXIT=$?; sleep 60",
        blockctl_binary().display(),
        daemon.qmp_path.display()
    );
    let started = tmux.run(&[
        "new-session",
        "-d",
        "-x",
        "150",
        "-y",
        "10",
        "-s",
        "progress",
        &shell_command,
    ]);
    assert!(
        started.status.success(),
        "tmux: {}",
        String::from_utf8_lossy(&started.stderr)
    );

    // While running, the bar's line reads
    // `backup disk0 [====>   ] 12.00 MiB/64.00 MiB 15.98 MiB/s ETA 3s running`.
    let deadline = Instant::now() + WAIT;
    let mut positions: Vec<f64> = Vec::new();
    let mut rates: Vec<f64> = Vec::new();
    let last = loop {
        let text = tmux.screen();
        assert!(Instant::now() < deadline, "no end:\n{text}");
        if text.contains("EXIT=") {
            break text;
        }
        if let Some(line) = text
            .lines()
            .find(|l| l.starts_with("backup disk0 [") && l.ends_with("running"))
        {
            let fields: Vec<&str> = line
                .split("] ")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .collect();
            // 12.00 MiB/64.00 MiB 15.98 MiB/s ETA 3s running
            let (done, _total) = fields[1].split_once('/').unwrap();
            positions.push(parse_bytes(fields[0], done));
            rates.push(parse_bytes(fields[3], fields[4].trim_end_matches("/s")));
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        last.contains("backup disk0 [==============================] 64.00 MiB/64.00 MiB"),
        "{last}"
    );
    assert!(last.contains(" completed\n"), "{last}");
    assert!(
        last.contains("backup 'disk0' completed (64.00 MiB in "),
        "{last}"
    );
    assert!(last.contains("EXIT=0"), "{last}");
    let distinct: std::collections::BTreeSet<u64> = positions.iter().map(|p| *p as u64).collect();
    assert!(distinct.len() >= 3, "the bar did not move: {positions:?}");
    assert!(positions.windows(2).all(|w| w[0] <= w[1]), "{positions:?}");
    // Plausible for a 16 MiB/s limit (indicatif smooths its estimate; a loaded machine
    // bends it, but not by ten times).
    assert!(rates.len() >= 3, "too few samples: {rates:?}");
    let settled = &rates[rates.len() / 2..];
    assert!(
        settled
            .iter()
            .all(|r| *r > 1.6 * 1048576.0 && *r < 160.0 * 1048576.0),
        "rates {rates:?} for a 16 MiB/s limit"
    );
    quit(daemon).await;
}
