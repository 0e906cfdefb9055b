//! A real web server for the http and https driver tests: nginx (Debian nginx-light) on a
//! loopback port of its own, serving a directory of the test, with the places the tests
//! need: one without byte ranges, one behind a cookie, one behind a password, a redirect;
//! and the images the web driver tests serve, and how they check what a daemon read.

use super::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A 4 MiB raw image of random bytes, a 64 MiB qcow2 image with 1 MiB written, and a file
/// whose length is no whole number of sectors, in the server's directory.
pub fn images(root: &Path) {
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(root.join("raw.img"), data).unwrap();
    let qcow2 = root.join("disk.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        qcow2.to_str().unwrap(),
        "64M",
    ]);
    let out = run(Command::new("qemu-io").args([
        "-f",
        "qcow2",
        "-c",
        "write -P 0xab 3M 1M",
        qcow2.to_str().unwrap(),
    ]));
    assert!(out.status.success());
    std::fs::write(root.join("odd.img"), [0x5au8; 1000]).unwrap();
}

/// nbd-server-add `node`, read-only, as export `node` on a server at `dir/nbd.sock`.
pub async fn export(client: &mut qmp::Client, dir: &Path, node: &str) -> String {
    export_node(client, dir, node, false).await
}

/// qemu-img compare of the served file `local` with the export: the same bytes.
pub fn assert_same(local: &Path, format: &str, exported: &str, what: &str) {
    assert_eq!(
        compare(local, format, exported),
        "Images are identical.\n",
        "{what}"
    );
}

pub fn compare(local: &Path, format: &str, exported: &str) -> String {
    let out = run(Command::new("qemu-img").args([
        "compare",
        "-f",
        format,
        "-F",
        "raw",
        local.to_str().unwrap(),
        exported,
    ]));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The user and password of the `/auth/` place.
pub const USER: &str = "reader";
pub const PASSWORD: &str = "s3cret pass";

/// The cookie the `/cookie/` place asks for.
pub const COOKIE: &str = "session=abc";

pub struct Nginx {
    pub port: u16,
    /// The served directory.
    pub root: PathBuf,
    scheme: &'static str,
    dir: PathBuf,
    master: KillOnDrop,
}

/// Where the tests' certificate and key are, for https.
pub struct Tls<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
}

impl Nginx {
    /// nginx serving `dir/www`, with its configuration and logs in `dir/nginx`.
    pub fn start(dir: &Path, tls: Option<Tls<'_>>) -> Nginx {
        assert!(
            Path::new("/usr/sbin/nginx").exists(),
            "test peer nginx is not installed: install the Debian package nginx-light \
             (.ci/run installs every test peer)"
        );
        let own = dir.join("nginx");
        let root = dir.join("www");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        let hash = run(Command::new("openssl").args(["passwd", "-apr1", PASSWORD]));
        assert!(hash.status.success());
        std::fs::write(
            own.join("htpasswd"),
            format!("{USER}:{}", String::from_utf8_lossy(&hash.stdout).trim()),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (scheme, listen) = match &tls {
            Some(t) => (
                "https",
                format!(
                    "listen 127.0.0.1:{port} ssl;\n ssl_certificate {};\n ssl_certificate_key {};",
                    t.cert.display(),
                    t.key.display()
                ),
            ),
            None => ("http", format!("listen 127.0.0.1:{port};")),
        };
        let o = own.display();
        let r = root.display();
        // `user root`: the workers read the test's private temp dir (ignored as non-root).
        let conf = format!(
            "user root;\nworker_processes 1;\ndaemon off;\npid {o}/nginx.pid;\n\
             error_log {o}/error.log;\nevents {{ worker_connections 64; }}\n\
             http {{\n access_log {o}/access.log;\n client_body_temp_path {o}/body;\n\
             proxy_temp_path {o}/proxy;\n fastcgi_temp_path {o}/fastcgi;\n\
             uwsgi_temp_path {o}/uwsgi;\n scgi_temp_path {o}/scgi;\n\
             server {{\n {listen}\n root {r};\n\
             location /noranges/ {{ alias {r}/; max_ranges 0; }}\n\
             location /cookie/ {{ alias {r}/; if ($cookie_session != \"abc\") {{ return 403; }} }}\n\
             location /auth/ {{ alias {r}/; auth_basic \"blockd\"; auth_basic_user_file {o}/htpasswd; }}\n\
             location /moved/ {{ rewrite ^/moved/(.*)$ /$1 redirect; }}\n\
             }}\n}}\n"
        );
        std::fs::write(own.join("nginx.conf"), conf).unwrap();
        let child = Command::new("/usr/sbin/nginx")
            .args(["-e", &format!("{o}/error.log"), "-p", &format!("{o}")])
            .args(["-c", &format!("{o}/nginx.conf")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let mut master = KillOnDrop(child);
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = master.0.try_wait() {
                panic!(
                    "nginx exited ({status}): {}",
                    std::fs::read_to_string(own.join("error.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "nginx never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            port,
            root,
            scheme,
            dir: own,
            master,
        }
    }

    /// The URL of `path` (no leading slash) on this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}/{path}", self.scheme, self.port)
    }

    /// The request lines the server has logged for `path`, as `METHOD /path`.
    pub fn requests(&self, path: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split('"').nth(1))
            .filter(|r| r.split(' ').nth(1) == Some(&format!("/{path}")))
            .map(|r| r.rsplit_once(' ').map_or(r, |(m, _)| m).to_string())
            .collect()
    }

    /// Freeze (SIGSTOP) or thaw (SIGCONT) the master and its workers: connections are
    /// still accepted by the kernel, and then nothing answers.
    pub fn freeze(&self, frozen: bool) {
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        self.signal(signal);
    }

    /// Send `signal` to the master and its workers.
    fn signal(&self, signal: i32) {
        let master = self.master.0.id() as i32;
        for pid in std::iter::once(master).chain(descendants(master)) {
            // SAFETY: kill has no memory effects; the pids are this test's nginx.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

/// The workers outlive a killed master: all of them go, the stopped ones too.
impl Drop for Nginx {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
    }
}

/// The user and password tinyproxy asks for.
pub const PROXY_USER: &str = "proxyuser";
pub const PROXY_PASSWORD: &str = "proxy-pass";

/// A forward proxy that asks for a password (Debian tinyproxy), on a loopback port.
pub struct Proxy {
    pub port: u16,
    log: PathBuf,
    _child: KillOnDrop,
}

impl Proxy {
    pub fn start(dir: &Path) -> Proxy {
        assert!(
            Path::new("/usr/bin/tinyproxy").exists(),
            "test peer tinyproxy is not installed: install the Debian package tinyproxy \
             (.ci/run installs every test peer)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = dir.join("tinyproxy.conf");
        let log = dir.join("tinyproxy.log");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 16\nAllow 127.0.0.1\n\
                 BasicAuth {PROXY_USER} {PROXY_PASSWORD}\nLogLevel Connect\n"
            ),
        )
        .unwrap();
        let child = Command::new("/usr/bin/tinyproxy")
            .args(["-d", "-c", conf.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tinyproxy");
        let mut child = KillOnDrop(child);
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.0.try_wait() {
                panic!(
                    "tinyproxy exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "tinyproxy never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Proxy {
            port,
            log,
            _child: child,
        }
    }

    /// Connections the proxy made to the server on a client's behalf.
    pub fn forwarded(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("Established connection")
            .count()
    }

    /// The environment that sends a daemon's http requests through the proxy, as a
    /// wrapper command for [`Daemon::start_wrapped`].
    pub fn wrapper(&self) -> Vec<String> {
        vec![
            "env".into(),
            "-u".into(),
            "no_proxy".into(),
            "-u".into(),
            "NO_PROXY".into(),
            format!("http_proxy=http://127.0.0.1:{}", self.port),
        ]
    }
}
