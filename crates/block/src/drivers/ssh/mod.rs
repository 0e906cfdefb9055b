//! `ssh`: a disk image on another host, read and written over SFTP (QEMU's ssh driver, with
//! russh and russh-sftp in place of libssh).
//!
//! Opening connects, checks the server's host key (`host-key-check`: against known_hosts,
//! a fingerprint, or not at all), authenticates with public keys as libssh's
//! `ssh_userauth_publickey_auto` does (the identities of the agent at `SSH_AUTH_SOCK`,
//! then `~/.ssh/id_ed25519`, `id_ecdsa` and `id_rsa` without passphrase), and opens the
//! file over SFTP. What that needs from files (known_hosts, key files, the password
//! database) is read on the blocking pool first. Requests are SFTP reads and writes at
//! offsets, split into pieces of at most [`PIECE`] bytes (less if the server's
//! `limits@openssh.com` says so), at most [`IN_FLIGHT`] of them outstanding per node;
//! flush is `fsync@openssh.com` where the server has it, and FUA writes are flushed.
//!
//! The SSH session's tasks run on the I/O thread that opened the node; a request from any
//! thread reaches them over russh-sftp's channel, whose packets are read through
//! [`frames::Frames`] (a bound on their size). Keepalives close a connection whose server
//! stopped answering; a request unanswered for [`REQUEST_TIMEOUT`] closes the connection
//! too, so what it queued is freed and every later request fails with EIO.
//!
//! `~` is `$HOME` (libssh reads the password database), so a test or a service can give
//! blockd a known_hosts and keys of its own.

mod frames;
mod known_hosts;

use crate::drivers::nbd::InetServer;
use crate::node::{DriverInfo, Extent, ExtentKind, Node, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use async_trait::async_trait;
use futures::stream::{self, StreamExt, TryStreamExt};
use known_hosts::Recorded;
use qapi::error::QmpError;
use russh::client::{self, Handle};
use russh::keys::agent::client::AgentClient;
use russh::keys::{Algorithm, HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::client::RawSftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Semaphore};

/// Bytes per SFTP read or write: OpenSSH's server answers at most 256 KiB less headers,
/// and smaller pieces keep many in flight on one connection.
const PIECE: usize = 64 << 10;

/// Pieces of one request in flight at once.
const PIECES_IN_FLIGHT: usize = 16;

/// Pieces outstanding per node: what russh-sftp queues is bounded by this many pieces.
const IN_FLIGHT: usize = 64;

/// How long connecting and authenticating may take (libssh would wait for ever).
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one SFTP request may wait for its answer, counted from when it is queued. A
/// slow but live server (an fsync of a big cache) is given long; keepalives find dead ones
/// sooner.
const REQUEST_TIMEOUT: u64 = 300;

/// Keepalives: a connection whose server has not answered three, 15 s apart, is closed.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// QAPI's SshHostKeyCheckHashType.
#[derive(Clone, Copy, Debug)]
enum HashType {
    Md5,
    Sha1,
    Sha256,
}

impl HashType {
    fn name(self) -> &'static str {
        match self {
            HashType::Md5 => "md5",
            HashType::Sha1 => "sha1",
            HashType::Sha256 => "sha256",
        }
    }

    /// The hash of the key's wire form, as libssh's ssh_get_publickey_hash.
    fn of(self, key: &PublicKey) -> Vec<u8> {
        use sha2::Digest;
        let blob = key.to_bytes().unwrap_or_default();
        match self {
            HashType::Md5 => md5::Md5::digest(&blob).to_vec(),
            HashType::Sha1 => sha1::Sha1::digest(&blob).to_vec(),
            HashType::Sha256 => sha2::Sha256::digest(&blob).to_vec(),
        }
    }
}

/// QAPI's SshHostKeyCheckMode.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(rename_all = "snake_case")]
enum HostKeyMode {
    None,
    Hash,
    KnownHosts,
}

/// QAPI's SshHostKeyCheck as it comes: the hash's members are checked by hand, for QEMU's
/// texts (a bad value of a flat union's member is named without its parent).
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
struct HostKeyCheckOptions {
    mode: HostKeyMode,
    #[serde(rename = "type")]
    kind: Option<String>,
    hash: Option<String>,
}

/// How the server's host key is checked.
#[derive(Clone, Debug)]
enum HostKeyCheck {
    None,
    Hash { kind: HashType, hash: String },
    KnownHosts,
}

impl HostKeyCheckOptions {
    /// The check; `at` is where the options sit (`host-key-check`, `file.host-key-check`),
    /// which QEMU names in a missing or unexpected member (but not in a bad enum value).
    fn check(self, at: &str) -> Result<HostKeyCheck, String> {
        if self.mode != HostKeyMode::Hash {
            if let Some(member) = [("type", &self.kind), ("hash", &self.hash)]
                .iter()
                .find_map(|(name, v)| v.is_some().then_some(name))
            {
                return Err(format!("Parameter '{at}.{member}' is unexpected"));
            }
        }
        Ok(match self.mode {
            HostKeyMode::None => HostKeyCheck::None,
            HostKeyMode::KnownHosts => HostKeyCheck::KnownHosts,
            HostKeyMode::Hash => {
                let kind = match self.kind.as_deref() {
                    Some("md5") => HashType::Md5,
                    Some("sha1") => HashType::Sha1,
                    Some("sha256") => HashType::Sha256,
                    Some(other) => {
                        return Err(format!("Parameter 'type' does not accept value '{other}'"))
                    }
                    None => return Err(format!("Parameter '{at}.type' is missing")),
                };
                let hash = self
                    .hash
                    .ok_or_else(|| format!("Parameter '{at}.hash' is missing"))?;
                HostKeyCheck::Hash { kind, hash }
            }
        })
    }
}

/// BlockdevOptionsSsh.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct SshOptions {
    server: InetServer,
    path: String,
    user: Option<String>,
    host_key_check: Option<HostKeyCheckOptions>,
}

/// Whether `given` spells `hash` in hex digits of either case, pairs optionally separated
/// by colons, as QEMU compares them.
fn fingerprint_matches(hash: &[u8], given: &str) -> bool {
    let mut rest = given.chars().peekable();
    for byte in hash {
        while rest.peek() == Some(&':') {
            rest.next();
        }
        let high = rest.next().and_then(|c| c.to_digit(16));
        let low = rest.next().and_then(|c| c.to_digit(16));
        match (high, low) {
            (Some(h), Some(l)) if h * 16 + l == u32::from(*byte) => {}
            _ => return false,
        }
    }
    rest.next().is_none()
}

/// The user's home: `$HOME`, else the password database's.
fn home() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return Some(home.into());
    }
    passwd_entry().map(|(_, dir)| dir)
}

/// The current user's name and home from the password database. Blocking (NSS may ask a
/// directory service): called on the blocking pool.
fn passwd_entry() -> Option<(String, PathBuf)> {
    let mut buf = vec![0u8; 16 << 10];
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: the buffer outlives the call and the strings read from it below.
    let rc = unsafe {
        libc::getpwuid_r(
            libc::getuid(),
            &mut entry,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return None;
    }
    // SAFETY: getpwuid_r filled both strings, NUL-terminated, inside `buf`.
    let (name, dir) = unsafe {
        (
            std::ffi::CStr::from_ptr(entry.pw_name),
            std::ffi::CStr::from_ptr(entry.pw_dir),
        )
    };
    Some((
        name.to_string_lossy().into_owned(),
        PathBuf::from(dir.to_string_lossy().into_owned()),
    ))
}

/// What opening needs from files, read on the blocking pool before connecting: the user
/// (when not given), the known_hosts records, the key files.
struct Prepared {
    user: String,
    recorded: Recorded,
    keys: Vec<PrivateKey>,
}

fn prepare(
    user: Option<String>,
    host: &str,
    port: u16,
    known_hosts: bool,
) -> Result<Prepared, String> {
    let user = match user {
        Some(user) => user,
        None => passwd_entry()
            .map(|(name, _)| name)
            .ok_or("Can't get user name")?,
    };
    let home = home();
    let recorded = match known_hosts {
        true => {
            let mut files = vec![PathBuf::from("/etc/ssh/ssh_known_hosts")];
            if let Some(home) = &home {
                files.insert(0, home.join(".ssh/known_hosts"));
            }
            known_hosts::recorded(&files, host, port)
        }
        false => Recorded::default(),
    };
    let keys = home
        .map(|home| {
            ["id_ed25519", "id_ecdsa", "id_rsa"]
                .iter()
                .filter_map(|name| {
                    russh::keys::load_secret_key(home.join(".ssh").join(name), None).ok()
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Prepared {
        user,
        recorded,
        keys,
    })
}

/// The host key checked against what known_hosts records, with QEMU's texts for a key
/// that changed, one of another type, or none.
fn check_known_hosts(recorded: &Recorded, key: &PublicKey) -> Result<(), String> {
    let mismatch = || {
        format!(
            "host key ({} key with fingerprint {}) does not match the one in known_hosts; \
             this may be a possible attack",
            key.algorithm().as_str(),
            key.fingerprint(HashAlg::Sha256)
        )
    };
    if recorded
        .revoked
        .iter()
        .any(|k| k.key_data() == key.key_data())
    {
        return Err(mismatch());
    }
    if recorded.keys.iter().any(|k| k.key_data() == key.key_data()) {
        return Ok(());
    }
    if recorded
        .keys
        .iter()
        .any(|k| k.algorithm() == key.algorithm())
    {
        return Err(mismatch());
    }
    if !recorded.keys.is_empty() {
        return Err("host key for this server not found, another type exists".into());
    }
    Err("no host key was found in known_hosts".into())
}

fn check_host_key(
    check: &HostKeyCheck,
    recorded: &Recorded,
    key: &PublicKey,
) -> Result<(), String> {
    match check {
        HostKeyCheck::None => Ok(()),
        HostKeyCheck::KnownHosts => check_known_hosts(recorded, key),
        HostKeyCheck::Hash { kind, hash } => {
            let actual = kind.of(key);
            if fingerprint_matches(&actual, hash) {
                return Ok(());
            }
            let hex: String = actual.iter().map(|b| format!("{b:02x}")).collect();
            Err(format!(
                "remote host {} key fingerprint '{}:{hex}' does not match host_key_check '{}:{hash}'",
                key.algorithm().as_str(),
                kind.name(),
                kind.name()
            ))
        }
    }
}

/// The host key algorithms to offer: those known_hosts records for the host first (as
/// libssh and OpenSSH do, so a server with several keys shows the one on record), then
/// russh's own order.
fn preferred_host_keys(recorded: &Recorded) -> Vec<Algorithm> {
    let mut first: Vec<Algorithm> = Vec::new();
    for key in &recorded.keys {
        let algorithms = match key.algorithm() {
            Algorithm::Rsa { .. } => vec![
                Algorithm::Rsa {
                    hash: Some(HashAlg::Sha512),
                },
                Algorithm::Rsa {
                    hash: Some(HashAlg::Sha256),
                },
            ],
            other => vec![other],
        };
        for a in algorithms {
            if !first.contains(&a) {
                first.push(a);
            }
        }
    }
    let defaults = client::Config::default().preferred.key;
    first.retain(|a| defaults.contains(a));
    let rest: Vec<Algorithm> = defaults
        .iter()
        .filter(|a| !first.contains(a))
        .cloned()
        .collect();
    first.extend(rest);
    first
}

/// The ciphers to offer: AES-256-GCM first where the CPU has AES instructions (ring then
/// runs it in hardware, well ahead of ChaCha20-Poly1305, russh's first choice), then
/// russh's own order.
fn preferred_ciphers() -> Vec<russh::cipher::Name> {
    let defaults = client::Config::default().preferred.cipher;
    let aes = russh::cipher::AES_256_GCM;
    #[cfg(target_arch = "x86_64")]
    let hardware = std::arch::is_x86_feature_detected!("aes");
    #[cfg(target_arch = "aarch64")]
    let hardware = std::arch::is_aarch64_feature_detected!("aes");
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let hardware = false;
    if !hardware || !defaults.contains(&aes) {
        return defaults.to_vec();
    }
    std::iter::once(aes)
        .chain(defaults.iter().copied().filter(|c| *c != aes))
        .collect()
}

/// The session's handler: it checks the host key and keeps the reason of a refusal.
struct Checker {
    check: HostKeyCheck,
    recorded: Arc<Recorded>,
    refusal: Arc<Mutex<Option<String>>>,
}

impl client::Handler for Checker {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKey) -> Result<bool, Self::Error> {
        match check_host_key(&self.check, &self.recorded, key) {
            Ok(()) => Ok(true),
            Err(why) => {
                *self.refusal.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                Ok(false)
            }
        }
    }
}

/// Public key authentication as libssh's ssh_userauth_publickey_auto: the agent's
/// identities, then the default key files (read beforehand) without passphrase.
async fn authenticate(
    session: &mut Handle<Checker>,
    user: &str,
    keys: Vec<PrivateKey>,
) -> Result<(), String> {
    match session.authenticate_none(user).await {
        Ok(r) if r.success() => return Ok(()),
        Ok(_) => {}
        Err(_) => return Err("failed to authenticate using none authentication".into()),
    }
    let rsa_hash = session
        .best_supported_rsa_hash()
        .await
        .ok()
        .flatten()
        .flatten();
    if std::env::var_os("SSH_AUTH_SOCK").is_some() {
        if let Ok(mut agent) = AgentClient::connect_env().await {
            for key in agent.request_identities().await.unwrap_or_default() {
                let hash = rsa_hash.filter(|_| key.algorithm().is_rsa());
                if let Ok(r) = session
                    .authenticate_publickey_with(user, key, hash, &mut agent)
                    .await
                {
                    if r.success() {
                        return Ok(());
                    }
                }
            }
        }
    }
    for key in keys {
        let hash = rsa_hash.filter(|_| key.algorithm().is_rsa());
        let key = PrivateKeyWithHashAlg::new(Arc::new(key), hash);
        if let Ok(r) = session.authenticate_publickey(user, key).await {
            if r.success() {
                return Ok(());
            }
        }
    }
    Err(
        "failed to authenticate using publickey authentication and the identities held by \
         your ssh-agent"
            .into(),
    )
}

pub struct SshDriver {
    filename: String,
    sftp: RawSftpSession,
    handle: String,
    /// The file's size, grown by writes past its end.
    size: AtomicU64,
    /// Bytes per read and per write piece: [`PIECE`], or less where the server's
    /// `limits@openssh.com` says so.
    read_piece: usize,
    write_piece: usize,
    /// Pieces outstanding ([`IN_FLIGHT`]).
    slots: Semaphore,
    /// The server has `fsync@openssh.com`.
    fsync: bool,
    /// A flush without fsync has been warned about.
    warned: AtomicBool,
    /// The SSH connection that carries the SFTP channel; closed when a request times out.
    session: Handle<Checker>,
    /// True once the SFTP stream has ended: waiting requests fail then.
    ended: watch::Receiver<bool>,
}

/// An SFTP failure as the errno a request fails with (the text goes to the log).
fn errno(e: &SftpError) -> io::Error {
    let code = match e {
        SftpError::Status(s) => match s.status_code {
            StatusCode::NoSuchFile => libc::ENOENT,
            StatusCode::PermissionDenied => libc::EACCES,
            StatusCode::OpUnsupported => libc::ENOTSUP,
            _ => libc::EIO,
        },
        _ => libc::EIO,
    };
    io::Error::from_raw_os_error(code)
}

/// libssh's words for an SFTP failure.
fn sftp_text(e: &SftpError) -> String {
    match e {
        SftpError::Status(s) => format!(
            "SFTP server: {} (libssh error code: 1, sftp error code: {})",
            s.error_message, s.status_code as u32
        ),
        other => other.to_string(),
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: false,
    hands_over: true,
    names: &["ssh"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let opts: SshOptions = o.parse(options)?;
    let flags = match o.common().read_only {
        true => OpenFlags::READ,
        false => OpenFlags::READ | OpenFlags::WRITE,
    };
    let at = crate::open::prefixed(o.path, "host-key-check");
    let driver = opts.open(flags, &at).await.map_err(QmpError::generic)?;
    Ok(Box::new(driver))
}

impl SshOptions {
    /// Connect and open the file with `flags`, within [`OPEN_TIMEOUT`]; `at` names the
    /// host key check's options in errors.
    async fn open(&self, flags: OpenFlags, at: &str) -> Result<SshDriver, String> {
        let port: u16 = self
            .server
            .port
            .parse()
            .map_err(|_| "Use only numeric port value".to_string())?;
        let check = match self.host_key_check.clone() {
            Some(options) => options.check(at)?,
            None => HostKeyCheck::KnownHosts,
        };
        let (user, host) = (self.user.clone(), self.server.host.clone());
        let known_hosts = matches!(check, HostKeyCheck::KnownHosts);
        let prepared = tokio::task::spawn_blocking(move || prepare(user, &host, port, known_hosts))
            .await
            .map_err(|e| e.to_string())??;
        let filename = format!(
            "ssh://{}@{}:{}{}",
            prepared.user, self.server.host, self.server.port, self.path
        );
        let opening = connect(
            &self.server.host,
            port,
            prepared,
            check,
            &self.path,
            flags,
            filename,
        );
        tokio::time::timeout(OPEN_TIMEOUT, opening)
            .await
            .map_err(|_| "Connection attempt cancelled by timeout".to_string())?
    }
}

/// Where blockdev-create's host key check sits, for error texts.
const HOST_KEY_CHECK_AT_CREATE: &str = "options.location.host-key-check";

/// BlockdevCreateOptionsSsh: a new file of `size` bytes (a sparse one where the server's
/// file system allows) at `location`, replacing any file there, as QEMU's driver does.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SshCreate {
    location: SshOptions,
    size: u64,
}

impl SshCreate {
    /// What QAPI refuses before a create job starts: the host key check's members.
    pub fn check(&self) -> Result<(), String> {
        if let Some(options) = self.location.host_key_check.clone() {
            options.check(HOST_KEY_CHECK_AT_CREATE)?;
        }
        Ok(())
    }

    /// Create the file: connect, open it anew (mode 0644, as QEMU), and give it its size.
    pub async fn create(self) -> Result<(), String> {
        let flags = OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::WRITE;
        let driver = self.location.open(flags, HOST_KEY_CHECK_AT_CREATE).await?;
        if self.size > 0 {
            driver
                .grow(self.size)
                .await
                .map_err(|e| format!("Failed to grow file: {}", sftp_text(&e)))?;
        }
        Ok(())
    }
}

/// Connect, check the host, authenticate and open `path`, reported as `filename`.
async fn connect(
    host: &str,
    port: u16,
    prepared: Prepared,
    check: HostKeyCheck,
    path: &str,
    flags: OpenFlags,
    filename: String,
) -> Result<SshDriver, String> {
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| {
            format!(
                "Failed to connect to '{host}:{port}': {}",
                crate::drivers::file::os_error_text(&e)
            )
        })?;
    let _ = stream.set_nodelay(true);
    let mut config = client::Config {
        keepalive_interval: Some(KEEPALIVE),
        keepalive_max: 3,
        nodelay: true,
        ..client::Config::default()
    };
    config.preferred.key = preferred_host_keys(&prepared.recorded).into();
    config.preferred.cipher = preferred_ciphers().into();
    let refusal = Arc::new(Mutex::new(None));
    let checker = Checker {
        check,
        recorded: Arc::new(prepared.recorded),
        refusal: refusal.clone(),
    };
    let mut session = client::connect_stream(Arc::new(config), stream, checker)
        .await
        .map_err(|e| {
            refusal
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .unwrap_or_else(|| format!("failed to establish SSH session: {e}"))
        })?;
    authenticate(&mut session, &prepared.user, prepared.keys).await?;
    let channel = session
        .channel_open_session()
        .await
        .map_err(|e| format!("failed to initialize sftp handle: {e}"))?;
    channel
        .request_subsystem(true, "sftp")
        .await
        .map_err(|e| format!("failed to initialize sftp handle: {e}"))?;
    let (stream, ended) = frames::Frames::new(channel.into_stream());
    let mut sftp = RawSftpSession::new(stream);
    sftp.set_timeout(REQUEST_TIMEOUT);
    let version = sftp
        .init()
        .await
        .map_err(|e| format!("failed to initialize sftp handle: {}", sftp_text(&e)))?;
    let (mut read_piece, mut write_piece) = (PIECE, PIECE);
    if version.extensions.contains_key("limits@openssh.com") {
        if let Ok(limits) = sftp.limits().await {
            // A read's answer carries 13 bytes of header, a write's request 25 and the
            // handle; both must fit the server's packet limit too.
            let packet = match limits.max_packet_len {
                0 => usize::MAX,
                n => (n as usize).saturating_sub(64),
            };
            let bounded = |n: u64| match n {
                0 => PIECE,
                n => (n as usize).min(PIECE),
            };
            read_piece = bounded(limits.max_read_len).min(packet).max(1);
            write_piece = bounded(limits.max_write_len).min(packet).max(1);
            sftp.set_limits(limits.into());
        }
    }
    let attrs = FileAttributes {
        permissions: Some(0o644),
        ..FileAttributes::empty()
    };
    let handle = sftp
        .open(path, flags, attrs)
        .await
        .map_err(|e| format!("failed to open remote file '{path}': {}", sftp_text(&e)))?
        .handle;
    let size = sftp
        .fstat(handle.as_str())
        .await
        .ok()
        .and_then(|a| a.attrs.size)
        .ok_or("failed to read file attributes")?;
    crate::drivers::check_disk_length(size).map_err(|e| e.desc)?;
    Ok(SshDriver {
        filename,
        fsync: version.extensions.contains_key("fsync@openssh.com"),
        sftp,
        handle,
        size: AtomicU64::new(size),
        read_piece,
        write_piece,
        slots: Semaphore::new(IN_FLIGHT),
        warned: AtomicBool::new(false),
        session,
        ended,
    })
}

impl SshDriver {
    /// `request`'s answer, or an error as soon as the SFTP stream ends (russh-sftp itself
    /// would leave the request waiting until its timeout).
    async fn ask<T>(
        &self,
        request: impl Future<Output = Result<T, SftpError>>,
    ) -> Result<T, SftpError> {
        let mut ended = self.ended.clone();
        tokio::select! {
            answer = request => answer,
            _ = ended.wait_for(|ended| *ended) => {
                Err(SftpError::IO("the SFTP connection ended".into()))
            }
        }
    }

    /// The file's size as the server has it now.
    async fn remote_size(&self) -> Result<u64, SftpError> {
        let attrs = self.ask(self.sftp.fstat(self.handle.as_str())).await?;
        attrs
            .attrs
            .size
            .ok_or_else(|| SftpError::UnexpectedBehavior("no size in the file's attributes".into()))
    }

    /// Grow the file to `size`, as QEMU does: a zero byte written at `size - 1`, which
    /// cannot shrink it whatever the server holds; a file already as long is left alone.
    async fn grow(&self, size: u64) -> Result<(), SftpError> {
        let current = self.remote_size().await?;
        if current < size {
            self.ask(self.sftp.write(self.handle.as_str(), size - 1, vec![0]))
                .await?;
        }
        self.size.fetch_max(size.max(current), Ordering::AcqRel);
        Ok(())
    }

    /// A failed request: logged, and a request that timed out closes the connection (what
    /// it queued is then freed, and every later request fails at once).
    async fn failed(&self, what: &str, e: SftpError) -> io::Error {
        tracing::warn!(file = %self.filename, "{what}: {}", sftp_text(&e));
        if matches!(e, SftpError::Timeout) {
            let _ = self
                .session
                .disconnect(russh::Disconnect::ByApplication, "request timed out", "")
                .await;
        }
        errno(&e)
    }

    /// Fill `buf` from `offset` with SFTP reads; a short read asks again for the rest, and
    /// the end of the file (a status EOF) reads as zeroes, as QEMU's driver has it.
    async fn read_piece(&self, mut offset: u64, mut buf: &mut [u8]) -> io::Result<()> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| io::Error::from_raw_os_error(libc::EIO))?;
        while !buf.is_empty() {
            let asked = self
                .sftp
                .read(self.handle.as_str(), offset, buf.len() as u32);
            match self.ask(asked).await {
                Ok(data) if !data.data.is_empty() && data.data.len() <= buf.len() => {
                    let n = data.data.len();
                    buf[..n].copy_from_slice(&data.data);
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Ok(data) => {
                    tracing::warn!(
                        file = %self.filename,
                        "the server sent {} bytes for a read of {} at {offset}",
                        data.data.len(),
                        buf.len()
                    );
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
                Err(SftpError::Status(s)) if s.status_code == StatusCode::Eof => {
                    buf.fill(0);
                    return Ok(());
                }
                Err(e) => return Err(self.failed(&format!("read at {offset}"), e).await),
            }
        }
        Ok(())
    }

    async fn write_piece(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| io::Error::from_raw_os_error(libc::EIO))?;
        let asked = self.sftp.write(self.handle.as_str(), offset, data.to_vec());
        match self.ask(asked).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.failed(&format!("write at {offset}"), e).await),
        }
    }
}

#[async_trait(?Send)]
impl Driver for SshDriver {
    fn format_name(&self) -> &'static str {
        "ssh"
    }

    fn size(&self, _: &Node) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    async fn read(&self, _: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let piece = self.read_piece;
        let pieces = buf
            .chunks_mut(piece)
            .enumerate()
            .map(|(i, part)| self.read_piece(offset + (i * piece) as u64, part));
        stream::iter(pieces)
            .buffer_unordered(PIECES_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await
            .map(drop)
    }

    async fn write(
        &self,
        node: &Node,
        offset: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> io::Result<()> {
        let piece = self.write_piece;
        let pieces = buf
            .chunks(piece)
            .enumerate()
            .map(|(i, part)| self.write_piece(offset + (i * piece) as u64, part));
        stream::iter(pieces)
            .buffer_unordered(PIECES_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        self.size
            .fetch_max(offset + buf.len() as u64, Ordering::AcqRel);
        // SFTP has no FUA: the write is made durable by a flush, as QEMU emulates it.
        if flags.fua {
            self.flush(node).await?;
        }
        Ok(())
    }

    /// SFTP has no zero write: the zeroes are written, a piece at a time, unless the caller
    /// asked for no slow fallback (ENOTSUP then, as QEMU's driver answers).
    async fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        if flags.no_fallback {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        let zeroes = vec![0u8; (len as usize).min(PIECE * PIECES_IN_FLIGHT)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            let last = done + n as u64 == len;
            let piece_flags = WriteFlags {
                fua: flags.fua && last,
                ..flags
            };
            self.write(node, offset + done, &zeroes[..n], piece_flags)
                .await?;
            done += n as u64;
        }
        Ok(())
    }

    async fn discard(&self, _: &Node, _: u64, _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        if !self.fsync {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "ssh server {} does not support fsync: flushes do not reach its disk",
                    self.filename
                );
            }
            return Ok(());
        }
        match self.ask(self.sftp.fsync(self.handle.as_str())).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.failed("fsync", e).await),
        }
    }

    async fn block_status(&self, _: &Node, _offset: u64, len: u64) -> io::Result<Extent> {
        Ok(Extent {
            len,
            kind: ExtentKind::Data,
        })
    }

    /// Growing only, as QEMU's driver: a shrink fails ("ssh driver does not support
    /// shrinking files").
    async fn truncate(&self, _: &Node, size: u64) -> io::Result<()> {
        let current = self.size.load(Ordering::Acquire);
        if size < current {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "ssh driver does not support shrinking files",
            ));
        }
        if size == current {
            return Ok(());
        }
        match self.grow(size).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.failed("Failed to grow file", e).await),
        }
    }

    /// Another process may have changed the file's size while it held the image.
    async fn activate(&self, _: &Node) -> Result<(), String> {
        let size = self
            .remote_size()
            .await
            .map_err(|e| format!("failed to read file attributes: {}", sftp_text(&e)))?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    fn child_perms(&self, _: &str, _: Perms, _: Perms, _: bool) -> (Perms, Perms) {
        (Perms::NONE, Perms::ALL)
    }

    fn info(&self, _: &Node) -> DriverInfo {
        DriverInfo {
            filename: self.filename.clone(),
            ..DriverInfo::default()
        }
    }

    fn extends_on_write(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_compare_as_qemu_does() {
        let hash = [0xeb, 0xfd, 0x03];
        assert!(fingerprint_matches(&hash, "ebfd03"));
        assert!(fingerprint_matches(&hash, "EB:FD:03"));
        assert!(fingerprint_matches(&hash, "::eb:fd03"));
        assert!(!fingerprint_matches(&hash, "e:bfd03"));
        assert!(!fingerprint_matches(&hash, "+bfd03"));
        assert!(!fingerprint_matches(&hash, "ebfd0"));
        assert!(!fingerprint_matches(&hash, "ebfd0300"));
        assert!(!fingerprint_matches(&hash, "ebfd03:"));
        assert!(!fingerprint_matches(&hash, "ebfd04"));
        assert!(!fingerprint_matches(&hash, "zzfd03"));
        assert!(!fingerprint_matches(&hash, ""));
    }
}
