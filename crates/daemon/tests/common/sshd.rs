//! A real SSH server for the ssh driver tests: OpenSSH's sshd (Debian openssh-server) on a
//! loopback port of its own, with a host key and an authorized user key made for the test,
//! and an ssh-agent holding that key; daemons run with the agent and a home of the test's
//! (for known_hosts) through [`Sshd::wrapper`].

use super::*;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Sshd {
    pub port: u16,
    /// The test's home: `.ssh/known_hosts` goes there.
    pub home: PathBuf,
    /// The server's public host keys, as `ssh-ed25519 AAAA...` and `ecdsa-sha2-nistp256 ...`.
    pub host_key: String,
    pub ecdsa_key: String,
    dir: PathBuf,
    agent_socket: PathBuf,
    server: KillOnDrop,
    _agent: KillOnDrop,
}

fn keygen(args: &[&str]) -> String {
    let out = run(Command::new("ssh-keygen").args(args));
    assert!(
        out.status.success(),
        "ssh-keygen {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Wait until `port` takes connections or `child` has exited.
fn wait_listening(child: &mut KillOnDrop, port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!(
                "{what} exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "{what} never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Sshd {
    pub fn start(dir: &Path) -> Sshd {
        Sshd::start_with(dir, "internal-sftp")
    }

    /// An sshd whose SFTP server is tests/peers/faulty-sftp in `mode`, logging to `log`.
    pub fn faulty(dir: &Path, mode: &str, log: &Path) -> Sshd {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/faulty-sftp");
        Sshd::start_with(
            dir,
            &format!(
                "/usr/bin/python3 {} {mode} {}",
                script.display(),
                log.display()
            ),
        )
    }

    /// An sshd whose `Subsystem sftp` runs `sftp`.
    pub fn start_with(dir: &Path, sftp: &str) -> Sshd {
        for (program, package) in [
            ("/usr/sbin/sshd", "openssh-server"),
            ("/usr/bin/ssh-agent", "openssh-client"),
        ] {
            assert!(
                Path::new(program).exists(),
                "test peer {program} is not installed: install the Debian package {package} \
                 (.ci/run installs every test peer)"
            );
        }
        let own = dir.join("sshd");
        let home = dir.join("home");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::create_dir_all(home.join(".ssh")).unwrap();
        let key = |name: &str| own.join(name).to_string_lossy().into_owned();
        keygen(&["-q", "-t", "ed25519", "-N", "", "-f", &key("host")]);
        // A second host key, of another type, as servers have.
        keygen(&["-q", "-t", "ecdsa", "-N", "", "-f", &key("host-ecdsa")]);
        keygen(&["-q", "-t", "ed25519", "-N", "", "-f", &key("user")]);
        std::fs::copy(own.join("user.pub"), own.join("authorized_keys")).unwrap();
        let public = |name: &str| {
            let text = std::fs::read_to_string(own.join(name)).unwrap();
            text.split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (host_key, ecdsa_key) = (public("host.pub"), public("host-ecdsa.pub"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let o = own.display();
        std::fs::write(
            own.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {o}/host\nHostKey {o}/host-ecdsa\n\
                 AuthorizedKeysFile {o}/authorized_keys\nPidFile none\nUsePAM no\n\
                 StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\nSubsystem sftp {sftp}\n\
                 LogLevel VERBOSE\n"
            ),
        )
        .unwrap();
        // As root, sshd wants its privilege separation directory (Debian makes it at boot).
        if unsafe { libc::getuid() } == 0 {
            std::fs::create_dir_all("/run/sshd").unwrap();
        }
        let log = own.join("sshd.log");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f", &key("sshd_config")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn sshd");
        let mut server = KillOnDrop(child);
        wait_listening(&mut server, port, "sshd", &log);

        let agent_socket = own.join("agent.sock");
        let agent = Command::new("/usr/bin/ssh-agent")
            .args(["-D", "-a", &agent_socket.to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ssh-agent");
        let agent = KillOnDrop(agent);
        let deadline = Instant::now() + WAIT;
        while !agent_socket.exists() {
            assert!(Instant::now() < deadline, "ssh-agent never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        let added = run(Command::new("ssh-add")
            .arg(key("user"))
            .env("SSH_AUTH_SOCK", &agent_socket));
        assert!(
            added.status.success(),
            "ssh-add: {}",
            String::from_utf8_lossy(&added.stderr)
        );
        Sshd {
            port,
            home,
            host_key,
            ecdsa_key,
            dir: own,
            agent_socket,
            server,
            _agent: agent,
        }
    }

    /// The `server` member of an ssh node's options.
    pub fn server(&self) -> serde_json::Value {
        serde_json::json!({"host": "127.0.0.1", "port": self.port.to_string()})
    }

    /// The environment that gives a daemon the agent and the test's home, as a wrapper
    /// command for [`Daemon::start_wrapped`].
    pub fn wrapper(&self) -> Vec<String> {
        vec![
            "env".into(),
            format!("SSH_AUTH_SOCK={}", self.agent_socket.display()),
            format!("HOME={}", self.home.display()),
        ]
    }

    /// The host key's fingerprint as `ssh-keygen -l -E <hash>` prints it (`MD5:aa:bb...`,
    /// `SHA256:base64`).
    pub fn fingerprint(&self, hash: &str) -> String {
        let out = keygen(&[
            "-l",
            "-E",
            hash,
            "-f",
            &self.dir.join("host.pub").to_string_lossy(),
        ]);
        out.split_whitespace().nth(1).unwrap().to_string()
    }

    /// Write `line` as the test home's known_hosts.
    pub fn known_hosts(&self, line: &str) {
        std::fs::write(self.home.join(".ssh/known_hosts"), format!("{line}\n")).unwrap();
    }

    /// End every session the server serves (its per-connection processes), as a server
    /// that dies under its clients; the listener stays.
    pub fn kill_sessions(&self) {
        for pid in descendants(self.server.0.id() as i32) {
            // SAFETY: kill has no memory effects; the pids are this test's sshd's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// A new key pair of `kind` (another host's key), as `type base64`.
    pub fn other_key(&self, kind: &str) -> String {
        let path = self.dir.join(format!("other-{kind}"));
        let _ = std::fs::remove_file(&path);
        keygen(&["-q", "-t", kind, "-N", "", "-f", &path.to_string_lossy()]);
        let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
        public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    }
}
