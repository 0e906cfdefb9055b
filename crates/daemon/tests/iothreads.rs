//! iothread objects, x-blockdev-set-iothread and the exports' iothread options: a command
//! session side by side with qsd, and what pinning does, seen from outside: which threads
//! spend the CPU time of an export's clients and of a job.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// file `f` under qcow2 `q`, and file `f2` under qcow2 `q2`, on fresh images, plus two
/// iothreads given on the command line.
fn two_images(dir: &Path) -> Vec<String> {
    let mut args = vec![
        s("--object"),
        s("iothread,id=io0"),
        s("--object"),
        s("iothread,id=io1,poll-max-ns=1000,aio-max-batch=8,thread-pool-max=4"),
    ];
    for (file, node, name) in [("f", "q", "a"), ("f2", "q2", "b")] {
        let image = p(dir, &format!("{name}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", &image, "16M"]);
        args.extend([
            s("--blockdev"),
            format!("driver=file,node-name={file},filename={image}"),
            s("--blockdev"),
            format!("driver=qcow2,node-name={node},file={file}"),
        ]);
    }
    args
}

/// The properties, the QOM views and every rule about moving nodes, with qsd's replies.
#[tokio::test]
async fn iothread_sessions_match_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = two_images(dir.path());
    let sock = dir.path().join("nbd.sock");
    args.extend(nbd_server_args(&sock));
    let get = |property: &str| json!({"path": "/objects/io1", "property": property});
    let set_home = |node: &str, iothread: Value, force: Option<bool>| {
        let mut a = json!({"node-name": node, "iothread": iothread});
        if let Some(force) = force {
            a["force"] = json!(force);
        }
        ("x-blockdev-set-iothread", a)
    };
    let export = |id: &str, iothread: Option<&str>, fixed: Option<bool>| {
        let mut a = json!({"type": "nbd", "id": id, "name": id, "node-name": "q"});
        if let Some(iothread) = iothread {
            a["iothread"] = json!(iothread);
        }
        if let Some(fixed) = fixed {
            a["fixed-iothread"] = json!(fixed);
        }
        ("block-export-add", a)
    };
    let add = |id: &str, props: Value| {
        let mut a = json!({"qom-type": "iothread", "id": id});
        a.as_object_mut()
            .unwrap()
            .extend(props.as_object().unwrap().clone());
        ("object-add", a)
    };
    let requests = vec![
        ("qom-list", json!({"path": "/objects/io1"})),
        ("qom-list-properties", json!({"typename": "iothread"})),
        ("qom-list-types", json!({"implements": "iothread"})),
        ("qom-get", get("poll-max-ns")),
        ("qom-get", get("aio-max-batch")),
        ("qom-get", get("thread-pool-max")),
        ("qom-get", get("poll-grow")),
        (
            "qom-get",
            json!({"path": "/objects/io0", "property": "poll-max-ns"}),
        ),
        ("qom-get", get("bogus")),
        (
            "qom-set",
            json!({"path": "/objects/io1", "property": "poll-max-ns", "value": 5000}),
        ),
        ("qom-get", get("poll-max-ns")),
        (
            "qom-set",
            json!({"path": "/objects/io1", "property": "poll-grow", "value": -1}),
        ),
        (
            "qom-set",
            json!({"path": "/objects/io1", "property": "poll-shrink", "value": "x"}),
        ),
        add("io2", json!({"poll-grow": -1})),
        add("io2", json!({"thread-pool-max": 0})),
        add("io2", json!({"thread-pool-max": 1u64 << 40})),
        add("io2", json!({"aio-max-batch": 1.5})),
        add("io2", json!({"bogus": 1})),
        add("io0", json!({})),
        add("io3", json!({})),
        ("object-del", json!({"id": "io3"})),
        ("object-del", json!({"id": "io3"})),
        set_home("q", json!("nope"), None),
        set_home("nope", json!("io0"), None),
        // A child moves its parent along, and back.
        set_home("f", json!("io0"), None),
        set_home("q", Value::Null, None),
        set_home("q", json!("io1"), None),
        set_home("q2", json!("io0"), None),
        export("e1", None, None),
        set_home("q", json!("io0"), None),
        set_home("q", json!("io0"), Some(true)),
        export("e2", Some("io1"), Some(true)),
        export("e3", Some("io0"), Some(true)),
        export("e4", Some("io0"), Some(false)),
        export("e5", Some("nope"), None),
        set_home("q", json!("io0"), Some(true)),
        set_home("f", json!("io0"), None),
        ("query-block-exports", json!({})),
    ];
    let [ours, theirs] = replies_of_both(dir.path(), &args, &requests).await;
    assert_eq!(
        ours,
        theirs,
        "{}",
        first_difference(&ours, &theirs).unwrap_or_default()
    );
}

/// A job's target joins its source's thread, as in QEMU: refused when an export pins the
/// target elsewhere, and once moved, the target is where a move to the source's iothread
/// finds it (with the job running, a move is refused; an equal one changes nothing).
#[tokio::test]
async fn a_jobs_target_joins_its_sources_iothread_as_in_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = two_images(dir.path());
    args.extend(nbd_server_args(&dir.path().join("nbd.sock")));
    let pinned = |id: &str, node: &str| {
        json!({"type": "nbd", "id": id, "name": id, "node-name": node,
               "iothread": "io0", "fixed-iothread": true})
    };
    let job = |id: &str| json!({"job-id": id, "device": "q", "target": "q2", "sync": "full"});
    let requests = vec![
        ("block-export-add", pinned("t", "q2")),
        ("blockdev-backup", job("b")),
        ("blockdev-mirror", job("m")),
        ("block-export-del", json!({"id": "t"})),
        ("block-export-add", pinned("s", "q")),
        ("blockdev-mirror", job("m")),
        (
            "x-blockdev-set-iothread",
            json!({"node-name": "q2", "iothread": "io0", "force": true}),
        ),
    ];
    let mut answers = Vec::new();
    for which in Impl::all() {
        let wd = dir.path().join(format!("{which:?}"));
        std::fs::create_dir_all(&wd).unwrap();
        let daemon = Daemon::start(which, &wd, &args);
        let mut c = daemon.qmp().await;
        let mut seen = Vec::new();
        for (command, arguments) in &requests {
            seen.push(reply(&mut c, command, arguments.clone()).await);
        }
        // qsd 10 fails an assertion when it quits while a job in an iothread ends.
        c.execute("block-job-cancel", json!({"device": "m", "force": true}))
            .await
            .unwrap();
        let ended = c
            .wait_event("BLOCK_JOB_CANCELLED", std::time::Duration::from_secs(10))
            .await;
        assert!(ended.is_some(), "{which:?}: the mirror did not end");
        daemon.quit(&mut c).await;
        answers.push(Value::from(seen));
    }
    let (ours, theirs) = (&answers[0], &answers[1]);
    assert_eq!(
        ours,
        theirs,
        "{}",
        first_difference(ours, theirs).unwrap_or_default()
    );
    assert_eq!(
        ours[1]["error"]["desc"],
        "Cannot change iothread of active block backend"
    );
}

/// CPU time in milliseconds per thread name of process `pid`, from each thread's
/// schedstat (nanoseconds on a CPU): exact, where the 10 ms ticks of `stat` left a short
/// job at one tick.
fn cpu_by_thread(pid: u32) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let (Ok(comm), Ok(schedstat)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("schedstat")),
        ) else {
            continue;
        };
        let ns: u64 = schedstat
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        *out.entry(comm.trim_end().to_string()).or_default() += ns / 1_000_000;
    }
    out
}

/// CPU milliseconds threads spent between two snapshots: the iothread's, and the shared
/// I/O threads' together.
fn ms_between(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> (u64, u64) {
    let spent = |name: &str| after.get(name).unwrap_or(&0) - before.get(name).unwrap_or(&0);
    let shared = after
        .keys()
        .filter(|name| name.starts_with("blockd-io"))
        .map(|name| spent(name))
        .sum();
    (spent("IO io0"), shared)
}

/// blockd with iothread `io0`, file node `d` on a new 64 MiB `disk.raw`, `extra` options
/// and an NBD server: the daemon, the server's socket and the image's path.
fn daemon_with_iothread(dir: &Path, extra: &[String]) -> (Daemon, std::path::PathBuf, String) {
    let image = p(dir, "disk.raw");
    qemu_img(&["create", "-q", "-f", "raw", &image, "64M"]);
    let sock = dir.join("nbd.sock");
    let mut args = vec![
        s("--object"),
        s("iothread,id=io0"),
        s("--blockdev"),
        format!("driver=file,node-name=d,filename={image}"),
    ];
    args.extend_from_slice(extra);
    args.extend(nbd_server_args(&sock));
    (Daemon::start(Impl::Blockd, dir, &args), sock, image)
}

/// An export's clients are served on its iothread, including a job on its node; once the
/// node moves back they are served on the shared threads, and the iothread can go.
#[tokio::test]
async fn clients_and_jobs_run_on_the_iothread_their_node_is_pinned_to() {
    let dir = tempfile::tempdir().unwrap();
    let target = p(dir.path(), "target.raw");
    qemu_img(&["create", "-q", "-f", "raw", &target, "64M"]);
    let extra = [
        s("--blockdev"),
        format!("driver=file,node-name=t,filename={target}"),
    ];
    let (daemon, sock, image) = daemon_with_iothread(dir.path(), &extra);
    let mut c = daemon.qmp().await;
    let added = reply(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "d", "writable": true,
               "iothread": "io0", "fixed-iothread": true}),
    )
    .await;
    assert_eq!(added, json!({"return": {}}));
    let uri = format!("nbd+unix:///d?socket={}", sock.display());
    let clients = || {
        let out = qemu_io_outcome(&["-f", "raw", "-c", "write -P 7 0 48M", &uri]);
        assert_eq!(out, "ok");
        let same = qemu_img(&["compare", "-f", "raw", "-F", "raw", &uri, &image]);
        assert!(same.contains("identical"), "{same}");
    };
    let before = cpu_by_thread(daemon.pid());
    clients();
    let (pinned, shared) = ms_between(&before, &cpu_by_thread(daemon.pid()));
    assert!(
        pinned >= 20 && pinned > 4 * shared,
        "pinned export: {pinned} ms on IO io0, {shared} ms on the shared threads"
    );
    // A job on the pinned node runs there too.
    let before = cpu_by_thread(daemon.pid());
    let started = reply(
        &mut c,
        "blockdev-backup",
        json!({"job-id": "j", "device": "d", "target": "t", "sync": "full"}),
    )
    .await;
    assert_eq!(started, json!({"return": {}}));
    while !reply(&mut c, "query-jobs", json!({})).await["return"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (pinned, shared) = ms_between(&before, &cpu_by_thread(daemon.pid()));
    assert!(
        pinned >= 5 && pinned > 2 * shared,
        "backup of a pinned node: {pinned} ms on IO io0, {shared} ms on the shared threads"
    );
    let same = qemu_img(&["compare", "-f", "raw", "-F", "raw", &image, &target]);
    assert!(same.contains("identical"), "{same}");
    // The fixed export keeps the node; without it, the node goes back with force only.
    let refused = reply(&mut c, "object-del", json!({"id": "io0"})).await;
    assert_eq!(
        refused["error"]["desc"],
        "object 'io0' is in use, can not be deleted"
    );
    let fixed = reply(
        &mut c,
        "x-blockdev-set-iothread",
        json!({"node-name": "d", "iothread": null, "force": true}),
    )
    .await;
    assert_eq!(
        fixed["error"]["desc"],
        "Cannot change iothread of active block backend"
    );
    delete_export_when_unused(&mut c, "e").await;
    reply(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e2", "name": "d", "node-name": "d", "writable": true}),
    )
    .await;
    let back = reply(
        &mut c,
        "x-blockdev-set-iothread",
        json!({"node-name": "d", "iothread": null, "force": true}),
    )
    .await;
    assert_eq!(back, json!({"return": {}}));
    let before = cpu_by_thread(daemon.pid());
    clients();
    let (pinned, shared) = ms_between(&before, &cpu_by_thread(daemon.pid()));
    assert!(
        shared >= 20 && shared > 4 * pinned,
        "unpinned export: {pinned} ms on IO io0, {shared} ms on the shared threads"
    );
    // The backup's target joined its source's iothread, and stays there after the job,
    // as in QEMU.
    assert_eq!(
        reply(&mut c, "object-del", json!({"id": "io0"})).await["error"]["desc"],
        "object 'io0' is in use, can not be deleted"
    );
    let target_back = reply(
        &mut c,
        "x-blockdev-set-iothread",
        json!({"node-name": "t", "iothread": null}),
    )
    .await;
    assert_eq!(target_back, json!({"return": {}}));
    assert_eq!(
        reply(&mut c, "object-del", json!({"id": "io0"})).await,
        json!({"return": {}})
    );
    let names = cpu_by_thread(daemon.pid());
    assert!(
        !names.contains_key("IO io0"),
        "the deleted iothread's thread still runs"
    );
    daemon.quit(&mut c).await;
}

/// Options blockd cannot honor are refused with a reason, not ignored.
#[tokio::test]
async fn pool_options_blockd_cannot_honor_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &[]);
    let mut c = daemon.qmp().await;
    let warm = reply(
        &mut c,
        "object-add",
        json!({"qom-type": "iothread", "id": "a", "thread-pool-min": 2}),
    )
    .await;
    assert!(
        warm["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("thread-pool-min must be 0"),
        "{warm}"
    );
    reply(
        &mut c,
        "object-add",
        json!({"qom-type": "iothread", "id": "b", "thread-pool-max": 2}),
    )
    .await;
    let resized = reply(
        &mut c,
        "qom-set",
        json!({"path": "/objects/b", "property": "thread-pool-max", "value": 8}),
    )
    .await;
    assert!(
        resized["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("cannot be changed"),
        "{resized}"
    );
    let kept = reply(
        &mut c,
        "qom-get",
        json!({"path": "/objects/b", "property": "thread-pool-max"}),
    )
    .await;
    assert_eq!(kept, json!({"return": 2}));
    daemon.quit(&mut c).await;
}

/// An external snapshot's overlay joins the iothread of the disk it snapshots: the export,
/// which moves to the overlay, is still served there.
#[tokio::test]
async fn a_snapshot_overlay_joins_its_disks_iothread() {
    let dir = tempfile::tempdir().unwrap();
    let overlay = p(dir.path(), "overlay.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &overlay, "64M"]);
    let (daemon, sock, _) = daemon_with_iothread(dir.path(), &[]);
    let mut c = daemon.qmp().await;
    reply(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "d", "writable": true,
               "iothread": "io0"}),
    )
    .await;
    let added = reply(
        &mut c,
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "ov",
               "file": {"driver": "file", "filename": overlay}}),
    )
    .await;
    assert_eq!(added, json!({"return": {}}));
    let snapshot = reply(
        &mut c,
        "blockdev-snapshot",
        json!({"node": "d", "overlay": "ov"}),
    )
    .await;
    assert_eq!(snapshot, json!({"return": {}}));
    let uri = format!("nbd+unix:///d?socket={}", sock.display());
    let before = cpu_by_thread(daemon.pid());
    assert_eq!(
        qemu_io_outcome(&["-f", "raw", "-c", "write -P 9 0 48M", &uri]),
        "ok"
    );
    let (pinned, shared) = ms_between(&before, &cpu_by_thread(daemon.pid()));
    assert!(
        pinned >= 10 && pinned > 4 * shared,
        "writes to the overlay: {pinned} ms on IO io0, {shared} ms on the shared threads"
    );
    // The overlay holds the writes, the disk below does not.
    let map = qemu_img(&["map", "-U", "--output=json", "-f", "qcow2", &overlay]);
    assert!(map.contains("\"data\": true"), "{map}");
    daemon.quit(&mut c).await;
}

/// One qemu-io process kept open on an NBD export: commands go in on its stdin, and each
/// one's outcome line comes back, over the same connection.
struct Session {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Session {
    fn open(uri: &str) -> Session {
        let mut child = std::process::Command::new("qemu-io")
            .args(["-f", "raw", uri])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
        Session { child, lines }
    }

    /// Runs `command` ("write ..." or "read ...") and returns the line saying how it went
    /// ("wrote ...", "read ...", or the failure).
    fn run(&mut self, command: &str) -> String {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        for line in self.lines.by_ref() {
            let line = line.unwrap();
            // Each line may follow the prompts of the commands before it.
            let line = line.trim_start_matches("qemu-io> ");
            if line.contains("failed") || line.starts_with("wrote") || line.starts_with("read") {
                return line.to_string();
            }
        }
        "qemu-io ended".to_string()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client connected while its node is pinned follows the node when it moves back to the
/// shared threads: its requests spend their CPU time there, and deleting the iothread
/// leaves it connected (QEMU moves its connections along too).
#[tokio::test]
async fn a_connected_client_follows_its_node_to_another_thread() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, sock, _image) = daemon_with_iothread(dir.path(), &[]);
    let mut c = daemon.qmp().await;
    let added = reply(
        &mut c,
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "d", "writable": true,
               "iothread": "io0"}),
    )
    .await;
    assert_eq!(added, json!({"return": {}}));
    let uri = format!("nbd+unix:///d?socket={}", sock.display());
    let mut client = Session::open(&uri);
    let before = cpu_by_thread(daemon.pid());
    assert!(client.run("write -P 7 0 48M").starts_with("wrote"));
    let (pinned, shared) = ms_between(&before, &cpu_by_thread(daemon.pid()));
    assert!(
        pinned >= 20 && pinned > 4 * shared,
        "pinned: {pinned} ms on IO io0, {shared} ms on the shared threads"
    );
    let back = reply(
        &mut c,
        "x-blockdev-set-iothread",
        json!({"node-name": "d", "iothread": null, "force": true}),
    )
    .await;
    assert_eq!(back, json!({"return": {}}));
    let before = cpu_by_thread(daemon.pid());
    assert!(client.run("write -P 8 0 48M").starts_with("wrote"));
    let (pinned, shared) = ms_between(&before, &cpu_by_thread(daemon.pid()));
    assert!(
        shared >= 20 && shared > 4 * pinned,
        "moved back: {pinned} ms on IO io0, {shared} ms on the shared threads"
    );
    assert_eq!(
        reply(&mut c, "object-del", json!({"id": "io0"})).await,
        json!({"return": {}})
    );
    let read = client.run("read -P 8 0 48M");
    assert!(read.starts_with("read"), "{read}");
    drop(client);
    delete_export_when_unused(&mut c, "e").await;
    daemon.quit(&mut c).await;
}
