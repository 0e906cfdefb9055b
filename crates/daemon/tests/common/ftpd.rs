//! A real FTP server for the ftp and ftps driver tests: vsftpd (Debian vsftpd) on a
//! loopback port of its own, serving a directory of the test to anonymous users, in plain
//! FTP or in implicit FTPS (TLS from the first byte, what `ftps://` means).

use super::*;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Vsftpd {
    pub port: u16,
    /// The served directory.
    pub root: PathBuf,
    scheme: &'static str,
    child: KillOnDrop,
}

impl Vsftpd {
    /// vsftpd serving `dir/www`; with `tls` (certificate, key), implicit FTPS.
    pub fn start(dir: &Path, tls: Option<(&Path, &Path)>) -> Vsftpd {
        assert!(
            Path::new("/usr/sbin/vsftpd").exists(),
            "test peer vsftpd is not installed: install the Debian package vsftpd \
             (.ci/run installs every test peer)"
        );
        let scheme = if tls.is_some() { "ftps" } else { "ftp" };
        let own = dir.join(format!("vsftpd-{scheme}"));
        let root = dir.join("www");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        // The anonymous user reads the files after vsftpd chroots into the directory.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut conf = format!(
            "listen=YES\nlisten_ipv6=NO\nlisten_address=127.0.0.1\nlisten_port={port}\n\
             background=NO\nanonymous_enable=YES\nanon_root={}\nlocal_enable=NO\n\
             write_enable=NO\nseccomp_sandbox=NO\npasv_enable=YES\npasv_address=127.0.0.1\n\
             xferlog_enable=YES\nvsftpd_log_file={}/vsftpd.log\nlog_ftp_protocol=YES\n\
             secure_chroot_dir=/var/run/vsftpd/empty\n",
            root.display(),
            own.display()
        );
        if unsafe { libc::getuid() } != 0 {
            conf.push_str("run_as_launching_user=YES\n");
        }
        if let Some((cert, key)) = tls {
            conf.push_str(&format!(
                "ssl_enable=YES\nimplicit_ssl=YES\nallow_anon_ssl=YES\n\
                 force_anon_data_ssl=YES\nforce_anon_logins_ssl=YES\nrequire_ssl_reuse=NO\n\
                 rsa_cert_file={}\nrsa_private_key_file={}\n",
                cert.display(),
                key.display()
            ));
        }
        let conf_path = own.join("vsftpd.conf");
        std::fs::write(&conf_path, conf).unwrap();
        // vsftpd refuses a secure_chroot_dir that is not there (Debian's package makes it).
        let _ = std::fs::create_dir_all("/var/run/vsftpd/empty");
        let log = own.join("stderr");
        let child = Command::new("/usr/sbin/vsftpd")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn vsftpd");
        let mut child = KillOnDrop(child);
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.0.try_wait() {
                panic!(
                    "vsftpd exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "vsftpd never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Vsftpd {
            port,
            root,
            scheme,
            child,
        }
    }

    /// The URL of `path` (no leading slash) on this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}/{path}", self.scheme, self.port)
    }

    /// Stop the server and every session it serves, as a server that dies.
    pub fn kill(&self) {
        let master = self.child.0.id() as i32;
        for pid in std::iter::once(master).chain(descendants(master)) {
            // SAFETY: kill has no memory effects; the pids are this test's vsftpd's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Drop for Vsftpd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Make `path` readable by the anonymous user.
pub fn world_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}
