//! Shared harness for end-to-end tests: start blockd (or qemu-storage-daemon, for
//! differential tests) on a temp dir with the same command line and talk QMP to it.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod ceph;
pub mod certs;
pub mod formats;
pub mod ftpd;
pub mod jobs;
pub mod log_writes;
pub mod raw_nbd;
pub mod sshd;
pub mod web;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BLOCKD: &str = env!("CARGO_BIN_EXE_blockd");
pub const QSD: &str = "/usr/bin/qemu-storage-daemon";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    Blockd,
    Qsd,
}

impl Impl {
    pub fn binary(self) -> &'static str {
        match self {
            Impl::Blockd => BLOCKD,
            Impl::Qsd => QSD,
        }
    }

    /// Both: qemu-storage-daemon is a test peer like the others, so a machine without it
    /// fails the test with the package to install instead of skipping half of it.
    pub fn all() -> Vec<Impl> {
        assert!(Path::new(QSD).exists(), "{}", missing_peer(QSD));
        vec![Impl::Blockd, Impl::Qsd]
    }
}

pub struct Daemon {
    pub which: Impl,
    child: Option<Child>,
    pub qmp_path: PathBuf,
    stderr_path: PathBuf,
}

/// How long any wait in a test may take before the test fails instead of hanging.
pub const WAIT: Duration = Duration::from_secs(20);

impl Daemon {
    /// Start with a QMP monitor on `dir/<name>.qmp` plus `extra` options.
    pub fn start(which: Impl, dir: &Path, extra: &[String]) -> Daemon {
        Daemon::start_wrapped(which, dir, extra, &[])
    }

    /// [`start`](Self::start) through `wrapper`, a command that ends by running the daemon
    /// with its arguments (which follow the wrapper's own), as `unshare ... sh -c` does.
    pub fn start_wrapped(which: Impl, dir: &Path, extra: &[String], wrapper: &[String]) -> Daemon {
        let tag = match which {
            Impl::Blockd => "blockd",
            Impl::Qsd => "qsd",
        };
        let qmp_path = dir.join(format!("{tag}.qmp"));
        let stderr_path = dir.join(format!("{tag}.stderr"));
        let mut args = vec![
            "--chardev".to_string(),
            format!(
                "socket,id=m0,path={},server=on,wait=off",
                qmp_path.display()
            ),
            "--monitor".to_string(),
            "chardev=m0".to_string(),
        ];
        args.extend(extra.iter().cloned());
        // A daemon started before in the same directory left its socket behind.
        let _ = std::fs::remove_file(&qmp_path);
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut c = Command::new(program);
                c.args(wrapper_args).arg(which.binary());
                c
            }
            None => Command::new(which.binary()),
        };
        let child = command
            .args(&args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("spawn daemon");
        let mut daemon = Daemon {
            which,
            child: Some(child),
            qmp_path,
            stderr_path,
        };
        daemon.wait_for_socket();
        daemon.wait_for_greeting();
        daemon
    }

    /// A monitor greets only once startup is complete (every option applied), so a
    /// greeting means the NBD server and exports of the command line are up too.
    fn wait_for_greeting(&self) {
        use std::io::BufRead;
        // The socket file exists from bind() on; connecting is refused until listen().
        let deadline = Instant::now() + WAIT;
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(&self.qmp_path) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("connect QMP: {e}"),
            }
        };
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut greeting = String::new();
        std::io::BufReader::new(stream)
            .read_line(&mut greeting)
            .expect("QMP greeting");
        assert!(
            greeting.contains("QMP"),
            "{:?} greeted with {greeting:?}; stderr:\n{}",
            self.which,
            self.stderr()
        );
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + WAIT;
        while !self.qmp_path.exists() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "{:?} exited early ({status}): {}",
                    self.which,
                    self.stderr()
                );
            }
            assert!(Instant::now() < deadline, "QMP socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// A QMP client on the monitor. qsd's monitor takes one client at a time and closes a
    /// connection that arrives before it has seen the previous one go (the greeting probe
    /// of `start` is such a previous one), so a connection closed before its greeting is
    /// tried again.
    pub async fn qmp(&self) -> qmp::Client {
        let deadline = Instant::now() + WAIT;
        loop {
            match qmp::Client::connect_unix(&self.qmp_path).await {
                Ok(client) => return client,
                Err(e)
                    if e.kind() == std::io::ErrorKind::UnexpectedEof
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("QMP connect to {:?}: {e}: {}", self.which, self.stderr()),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// `quit`, then wait for a clean exit: images are only complete on disk after it.
    pub async fn quit(mut self, client: &mut qmp::Client) {
        if let Err(e) = client.execute("quit", serde_json::json!({})).await {
            panic!("{:?} quit: {e:?}; stderr:\n{}", self.which, self.stderr());
        }
        assert!(
            self.wait_exit().success(),
            "{:?} quit must exit 0",
            self.which
        );
    }

    /// kill -9, as a crash would end it, and reap it.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Wait (bounded) for the daemon to exit by itself.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "daemon did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Delete export `id` once its clients are gone. The server notices a client's disconnect on
/// its own time (qsd too), so right after a client exits the export may still be in use.
pub async fn delete_export_when_unused(client: &mut qmp::Client, id: &str) {
    let deadline = Instant::now() + WAIT;
    while let Err(e) = client
        .execute("block-export-del", serde_json::json!({ "id": id }))
        .await
    {
        assert!(
            e.desc.ends_with("still in use") && Instant::now() < deadline,
            "{}",
            e.desc
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Fails the test unless qemu-storage-daemon has its block driver module `name` (`curl`,
/// `ssh`), which Debian's qemu-block-extra brings.
pub fn assert_qsd_has(name: &str) {
    let module = format!(
        "/usr/lib/{}-linux-gnu/qemu/block-{name}.so",
        std::env::consts::ARCH
    );
    assert!(
        Path::new(&module).exists(),
        "qemu-storage-daemon has no {name} driver here: install the Debian package \
         qemu-block-extra, from the same release as qemu-utils (.ci/run installs it)"
    );
}

/// nbd-server-add `node` as export `node` on an NBD server at `dir/nbd.sock`, started
/// by the first export; its URL.
pub async fn export_node(
    client: &mut qmp::Client,
    dir: &Path,
    node: &str,
    writable: bool,
) -> String {
    let sock = dir.join("nbd.sock");
    if !sock.exists() {
        client
            .execute(
                "nbd-server-start",
                serde_json::json!({"addr": {"type": "unix", "data": {"path": sock}}}),
            )
            .await
            .unwrap();
    }
    client
        .execute(
            "nbd-server-add",
            serde_json::json!({"device": node, "name": node, "writable": writable}),
        )
        .await
        .unwrap();
    format!("nbd+unix:///{node}?socket={}", sock.display())
}

/// Node `name` as query-named-block-nodes shows it, if there is one.
pub async fn named_node(client: &mut qmp::Client, name: &str) -> Option<Value> {
    let nodes = client
        .execute("query-named-block-nodes", serde_json::json!({"flat": true}))
        .await
        .unwrap();
    nodes
        .as_array()?
        .iter()
        .find(|n| n["node-name"] == name)
        .cloned()
}

/// The processes below `pid` (children, their children...), from /proc.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut parents: Vec<(i32, i32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // The parent's pid is the second field after the parenthesised name.
        if let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|v| v.parse::<i32>().ok())
        {
            parents.push((child, ppid));
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// A command's reply as it appears on the wire, for comparing implementations.
pub async fn reply(c: &mut qmp::Client, command: &str, args: Value) -> Value {
    match c.execute(command, args).await {
        Ok(v) => serde_json::json!({ "return": v }),
        Err(e) => serde_json::json!({ "error": { "class": e.class.as_str(), "desc": e.desc } }),
    }
}

pub fn run(cmd: &mut Command) -> std::process::Output {
    match cmd.output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{}", missing_peer(&cmd.get_program().to_string_lossy()))
        }
        Err(e) => panic!("spawn {:?}: {e}", cmd.get_program()),
    }
}

/// The failure for a test peer that is not installed, naming the Debian package that
/// brings it (`.ci/run`, the README's test command, installs them all).
pub fn missing_peer(program: &str) -> String {
    let name = Path::new(program)
        .file_name()
        .map_or(program.into(), |n| n.to_string_lossy());
    let package = match &*name {
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        "socat" => "socat",
        "cryptsetup" => "cryptsetup-bin",
        "dmg2img" => "dmg2img",
        "bzip2" => "bzip2",
        "openssl" => "openssl",
        "qemu-system-x86_64" => "qemu-system-x86",
        "busybox" => "busybox-static",
        "vmlinuz" => "linux-image-amd64",
        _ => "qemu-utils",
    };
    format!("test peer {name} is not installed: install the Debian package {package} (.ci/run installs every test peer)")
}

pub fn qemu_img(args: &[&str]) -> String {
    let out = run(Command::new("qemu-img").args(args));
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The arguments that open `image` as qcow2 node `d` and export it with `export` (the
/// export's options after `node-name=d,`).
pub fn exported_qcow2_args(image: &str, export: String) -> Vec<String> {
    vec![
        s("--blockdev"),
        format!("driver=qcow2,node-name=d,file.driver=file,file.filename={image}"),
        s("--export"),
        export,
    ]
}

/// The arguments that start the daemon's NBD server on the unix socket `sock`.
pub fn nbd_server_args(sock: &Path) -> Vec<String> {
    vec![
        s("--nbd-server"),
        format!("addr.type=unix,addr.path={}", sock.display()),
    ]
}

/// Run one qemu-io command (`args` ends with it): "ok", or the line saying it failed. An
/// image qemu-io cannot open fails the test: that is never the outcome being checked.
pub fn qemu_io_outcome(args: &[&str]) -> String {
    let out = run(Command::new("qemu-io").args(args));
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(!errors.contains("can't open"), "qemu-io {args:?}: {errors}");
    let text = String::from_utf8_lossy(&out.stdout);
    match text.lines().find(|l| l.contains("failed")) {
        Some(line) => line.to_string(),
        None => "ok".to_string(),
    }
}

/// The path of `name` in `dir`, as a string for command lines.
pub fn p(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

pub fn s(v: &str) -> String {
    v.to_string()
}

/// Replace the parts that legitimately differ between implementations and runs.
pub fn normalize(mut v: Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(map) => {
                map.remove("timestamp");
                if let Some(Value::String(p)) = map.get_mut("package") {
                    *p = "<package>".into();
                }
                for (k, item) in map.iter_mut() {
                    if k == "actual-size" {
                        *item = Value::from(0);
                    }
                    walk(item);
                }
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            Value::String(text) if text.starts_with("#block") => *text = "#block".into(),
            _ => {}
        }
    }
    walk(&mut v);
    v
}

/// The first place two JSON values differ, as a path and both sides, for readable failures.
pub fn first_difference(a: &Value, b: &Value) -> Option<String> {
    fn walk(a: &Value, b: &Value, path: String) -> Option<String> {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                for key in x.keys().chain(y.keys()) {
                    let sub = format!("{path}.{key}");
                    match (x.get(key), y.get(key)) {
                        (Some(p), Some(q)) => {
                            if let Some(d) = walk(p, q, sub) {
                                return Some(d);
                            }
                        }
                        (p, q) => return Some(format!("{sub}: {p:?} vs {q:?}")),
                    }
                }
                None
            }
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
                .iter()
                .zip(y)
                .enumerate()
                .find_map(|(i, (p, q))| walk(p, q, format!("{path}[{i}]"))),
            _ if a == b => None,
            _ => Some(format!("{path}: {a} vs {b}")),
        }
    }
    walk(a, b, String::new())
}

/// A helper process (qemu-nbd, ...) that must not outlive a failing test.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// blockdev-add a `driver` node named `node` over the file `file`, and export it writable
/// over NBD under the name `node`.
pub async fn add_exported(client: &mut qmp::Client, driver: &str, node: &str, file: &str) {
    client
        .execute(
            "blockdev-add",
            serde_json::json!({"driver": driver, "node-name": node,
                               "file": {"driver": "file", "filename": file}}),
        )
        .await
        .unwrap();
    client
        .execute(
            "block-export-add",
            serde_json::json!({"type": "nbd", "id": node, "node-name": node, "name": node,
                               "writable": true}),
        )
        .await
        .unwrap();
}

/// A memory figure of process `pid` from /proc/PID/status (VmRSS, VmHWM), in MiB.
pub fn status_mib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1024
}

/// node-name -> the boolean `field` of its query-named-block-nodes entry ("ro",
/// "active"), sorted by name.
pub async fn node_flags(c: &mut qmp::Client, field: &str) -> Value {
    let nodes = c
        .execute(
            "query-named-block-nodes",
            serde_json::json!({ "flat": true }),
        )
        .await
        .unwrap();
    let mut flags: Vec<(String, bool)> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node-name"].as_str().unwrap().to_string(),
                n[field].as_bool().unwrap(),
            )
        })
        .collect();
    flags.sort();
    serde_json::json!(flags)
}

/// Each daemon started in a directory of its own on `args`, and its replies to
/// `requests` (command, arguments) in order: blockd's, then qsd's.
pub async fn replies_of_both(
    dir: &Path,
    args: &[String],
    requests: &[(&str, Value)],
) -> [Value; 2] {
    let mut answers = Vec::new();
    for which in Impl::all() {
        let wd = dir.join(format!("{which:?}"));
        std::fs::create_dir_all(&wd).unwrap();
        let daemon = Daemon::start(which, &wd, args);
        let mut client = daemon.qmp().await;
        let mut seen = Vec::new();
        for (command, arguments) in requests {
            seen.push(reply(&mut client, command, arguments.clone()).await);
        }
        daemon.quit(&mut client).await;
        answers.push(Value::from(seen));
    }
    let qsd = answers.pop().unwrap();
    [answers.pop().unwrap(), qsd]
}

/// A new qcow2 image of `size` for `which` in `dir`, named after it so that both daemons
/// of a side-by-side test have their own; the name (`blockd`, `qsd`) and the path.
pub fn tagged_qcow2(dir: &Path, which: Impl, size: &str) -> (String, String) {
    let tag = format!("{which:?}").to_lowercase();
    let image = p(dir, &format!("{tag}.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", &image, size]);
    (tag, image)
}
