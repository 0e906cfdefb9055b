//! Character devices (`--chardev`, chardev-add/-change/-remove/-send-break, query-chardev,
//! query-chardev-backends, ringbuf-read/-write): the byte streams QMP monitors run on.
//!
//! In qsd the only user (QEMU's "frontend") a chardev can have is a monitor, attached on the
//! command line. So a chardev here opens its resource when created (binds or connects its
//! socket, opens its files, allocates its ring) and, once startup is over, feeds the
//! connections it gets to its monitor: every client of a server socket, each connection of a
//! client socket (again after `reconnect-ms`), or the one stream of the other backends.
//! Without a monitor a socket still accepts or connects (and reads away what comes, so a
//! peer never blocks), the other backends do nothing but write what ringbuf-write gives.
//!
//! Writes to regular files (the file backend's output, `logfile`) are plain system calls on
//! the main thread, as in QEMU: they go to the page cache, and the main thread serves only
//! the monitors, never a block request.

mod args;

pub use args::{backend_from_qmp, spec_from_opts};

use base64::Engine as _;
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;

/// Largest ring buffer: QEMU allocates any power of two it is given and aborts when that
/// fails; blockd keeps a chardev's memory bounded.
const MAX_RING: u64 = 1 << 28;

/// What a chardev is: QMP's ChardevBackend, which `--chardev` options are turned into too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevSpec {
    pub id: String,
    pub backend: Backend,
    /// ChardevCommon's `logfile`: a copy of everything written to the chardev.
    pub log: Option<LogSpec>,
}

/// ChardevCommon's `logfile` and `logappend`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSpec {
    pub path: PathBuf,
    pub append: bool,
}

/// The backends blockd offers (query-chardev-backends lists them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Socket(SocketSpec),
    /// `ringbuf`, or its older name `memory`: output kept in memory for ringbuf-read.
    Ringbuf {
        size: u64,
        memory: bool,
    },
    /// Output to `out`, input from `input` when given.
    File {
        out: PathBuf,
        input: Option<PathBuf>,
        append: bool,
    },
    Null,
    /// `device.in` and `device.out` when both open, else `device` both ways.
    Pipe {
        device: PathBuf,
    },
    /// A host terminal device, both ways.
    Serial {
        device: PathBuf,
    },
    /// The daemon's standard input and output.
    Stdio,
    /// A new pseudo-terminal; `link` is made a symbolic link to its name.
    Pty {
        link: Option<PathBuf>,
    },
}

/// ChardevSocket, as far as blockd offers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketSpec {
    pub addr: SocketAddr,
    pub server: bool,
    /// A server waits for its first client before the command (or startup) goes on.
    pub wait: bool,
    pub nodelay: bool,
    /// A client connects again this long after losing its connection.
    pub reconnect: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddr {
    Unix {
        path: PathBuf,
        /// A Linux abstract socket name instead of a file.
        abstract_name: bool,
        /// An abstract name without padding to the full address length (QEMU's `tight`).
        tight: bool,
    },
    Inet {
        host: String,
        port: String,
    },
}

impl Backend {
    /// The QOM type of such a chardev (qom-list).
    pub fn qom_type(&self) -> &'static str {
        match self {
            Backend::Socket(_) => "chardev-socket",
            Backend::Ringbuf { memory: false, .. } => "chardev-ringbuf",
            Backend::Ringbuf { memory: true, .. } => "chardev-memory",
            Backend::File { .. } => "chardev-file",
            Backend::Null => "chardev-null",
            Backend::Pipe { .. } => "chardev-pipe",
            Backend::Serial { .. } => "chardev-serial",
            Backend::Stdio => "chardev-stdio",
            Backend::Pty { .. } => "chardev-pty",
        }
    }
}

/// The backends blockd has, as query-chardev-backends names them.
pub const BACKENDS: &[&str] = &[
    "file", "memory", "null", "pipe", "pty", "ringbuf", "serial", "socket", "stdio",
];

/// Every ChardevBackendKind QEMU knows; those blockd lacks are refused by name.
const KNOWN_KINDS: &[&str] = &[
    "file",
    "serial",
    "parallel",
    "pipe",
    "socket",
    "udp",
    "pty",
    "null",
    "mux",
    "hub",
    "msmouse",
    "wctablet",
    "braille",
    "testdev",
    "stdio",
    "console",
    "spicevmc",
    "spiceport",
    "qemu-vdagent",
    "dbus",
    "vc",
    "ringbuf",
    "memory",
];

/// Backends qsd 10.0.2 is built with but blockd does not offer: no monitor runs on them.
const NOT_OFFERED: &[&str] = &["parallel", "udp", "mux", "hub"];

/// The chardevs by id.
#[derive(Default)]
pub struct Chardevs {
    map: RefCell<BTreeMap<String, Rc<Chardev>>>,
    /// Startup is over: new chardevs start serving at once.
    started: Cell<bool>,
}

impl Chardevs {
    /// The ids and QOM types of the chardevs, sorted by id.
    pub fn list(&self) -> Vec<(String, &'static str)> {
        self.map
            .borrow()
            .values()
            .map(|c| (c.spec.id.clone(), c.spec.backend.qom_type()))
            .collect()
    }

    pub fn get(&self, id: &str) -> Option<Rc<Chardev>> {
        self.map.borrow().get(id).cloned()
    }

    /// Open a new chardev (`--chardev`, chardev-add). `announce` prints QEMU's messages
    /// about a server waiting for its client and a pty's name (startup only).
    pub async fn add(&self, spec: ChardevSpec, announce: bool) -> Result<Value, AddError> {
        if self.map.borrow().contains_key(&spec.id) {
            return Err(AddError::Duplicate);
        }
        self.check_stdio(&spec).map_err(AddError::Open)?;
        let chardev = Chardev::open(spec, announce)
            .await
            .map_err(AddError::Open)?;
        let reply = chardev.reply();
        let id = chardev.spec.id.clone();
        if self.started.get() {
            chardev.start();
        }
        self.map.borrow_mut().insert(id, chardev);
        Ok(reply)
    }

    /// chardev-change: a new backend for a chardev nobody uses. The old one is closed only
    /// once the new one is open, so a failure leaves the chardev as it was (qsd 10.0.2
    /// loses the chardev then).
    pub async fn change(&self, spec: ChardevSpec) -> Result<Value, QmpError> {
        let old = self
            .get(&spec.id)
            .ok_or_else(|| QmpError::generic(format!("Chardev '{}' does not exist", spec.id)))?;
        if old.has_monitor() {
            return Err(QmpError::generic(
                "Chardev user does not support chardev hotswap",
            ));
        }
        let id = spec.id.clone();
        let failed = |e| QmpError::generic(format!("Failed to add chardev '{id}': {e}"));
        self.check_stdio(&spec).map_err(failed)?;
        let new = Chardev::open(spec, false).await.map_err(failed)?;
        let reply = new.reply();
        if self.started.get() {
            new.start();
        }
        self.map.borrow_mut().insert(id, new);
        old.close();
        Ok(reply)
    }

    /// Only one chardev may use the daemon's standard input and output (`spec` may replace
    /// the chardev of its id).
    fn check_stdio(&self, spec: &ChardevSpec) -> Result<(), String> {
        let taken = self
            .map
            .borrow()
            .values()
            .any(|c| c.spec.backend == Backend::Stdio && c.spec.id != spec.id);
        if spec.backend == Backend::Stdio && taken {
            return Err("cannot use stdio by multiple character devices".into());
        }
        Ok(())
    }

    /// chardev-remove: only a chardev without a monitor.
    pub fn remove(&self, id: &str) -> Result<(), QmpError> {
        let chardev = self
            .get(id)
            .ok_or_else(|| QmpError::generic(format!("Chardev '{id}' not found")))?;
        if chardev.has_monitor() {
            return Err(QmpError::generic(format!("Chardev '{id}' is busy")));
        }
        self.map.borrow_mut().remove(id);
        chardev.close();
        Ok(())
    }

    /// Startup is over: every chardev starts serving.
    pub fn start(&self) {
        self.started.set(true);
        for chardev in self.map.borrow().values() {
            chardev.start();
        }
    }

    /// query-chardev.
    pub fn query(&self) -> Value {
        Value::Array(
            self.map
                .borrow()
                .values()
                .map(|c| {
                    json!({
                        "label": c.spec.id,
                        "filename": c.filename(),
                        "frontend-open": c.has_monitor(),
                    })
                })
                .collect(),
        )
    }

    /// Close every chardev (shutdown): sockets and links go from the file system.
    pub fn close_all(&self) {
        for (_, chardev) in std::mem::take(&mut *self.map.borrow_mut()) {
            chardev.close();
        }
    }
}

/// Why [`Chardevs::add`] failed: the id is taken, or the backend did not open (QEMU's
/// text). Each caller words the two its own way, as QEMU does for `--chardev` and QMP.
pub enum AddError {
    Duplicate,
    Open(String),
}

/// What a chardev opened, until its task takes it.
enum Resource {
    /// A server socket, with the client `wait` took before startup went on.
    Listener(Listener, Option<Stream>),
    /// A client socket's connection (none while `reconnect-ms` retries).
    Client(Option<Stream>),
    /// Everything else: an input (maybe none) and an output.
    Duplex(Input, Output),
}

enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

/// A connected socket.
enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

/// One chardev: its configuration, what it opened, and its monitor.
pub struct Chardev {
    spec: ChardevSpec,
    resource: RefCell<Option<Resource>>,
    monitor: RefCell<Option<qmp::Server>>,
    /// Connections open now (sockets); 0 shows as "disconnected:" in query-chardev.
    connections: Rc<Cell<usize>>,
    ring: Option<Rc<RefCell<Ring>>>,
    log: Option<Rc<std::fs::File>>,
    task: RefCell<Option<JoinHandle<()>>>,
    /// The socket file this chardev made, by device and inode, removed when it closes.
    socket_file: Option<(PathBuf, u64, u64)>,
    /// Where an inet server listens (the port chosen when `port` was 0).
    local_addr: Option<std::net::SocketAddr>,
    /// A pty's terminal name; the other end stays open so that the pty never hangs up.
    pty: Option<(String, OwnedFd)>,
    /// The terminal chardev-send-break sends to (serial, pty).
    break_fd: Option<OwnedFd>,
}

impl Chardev {
    async fn open(spec: ChardevSpec, announce: bool) -> Result<Rc<Chardev>, String> {
        let log = match &spec.log {
            Some(log) => Some(Rc::new(open_log(log)?)),
            None => None,
        };
        let mut chardev = Chardev {
            spec: spec.clone(),
            resource: RefCell::new(None),
            monitor: RefCell::new(None),
            connections: Rc::new(Cell::new(0)),
            ring: None,
            log,
            task: RefCell::new(None),
            socket_file: None,
            local_addr: None,
            pty: None,
            break_fd: None,
        };
        let resource = match &spec.backend {
            Backend::Socket(socket) => open_socket(&mut chardev, socket).await?,
            Backend::Ringbuf { size, .. } => {
                if !size.is_power_of_two() {
                    return Err("size of ringbuf chardev must be power of two".into());
                }
                if *size > MAX_RING {
                    return Err(format!(
                        "size of ringbuf chardev must be at most {MAX_RING} in blockd"
                    ));
                }
                let ring = Rc::new(RefCell::new(Ring::new(*size as usize)));
                chardev.ring = Some(ring.clone());
                Resource::Duplex(Input::Never, Output::Ring(ring))
            }
            Backend::File { out, input, append } => {
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create(true).mode(0o666);
                if *append {
                    options.append(true);
                } else {
                    options.truncate(true);
                }
                let out_file = options.open(out).map_err(|e| could_not_open(out, e))?;
                let input = match input {
                    Some(path) => Input::Fd(FdIo::new(
                        std::fs::File::open(path)
                            .map_err(|e| could_not_open(path, e))?
                            .into(),
                    )?),
                    None => Input::Never,
                };
                Resource::Duplex(input, Output::File(out_file))
            }
            Backend::Null => Resource::Duplex(Input::Never, Output::Null),
            Backend::Pipe { device } => {
                let (input, output) = open_pipe(device)?;
                Resource::Duplex(Input::Fd(input), Output::Fd(output))
            }
            Backend::Serial { device } => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NOCTTY)
                    .open(device)
                    .map_err(|e| could_not_open(device, e))?;
                let fd: OwnedFd = file.into();
                chardev.break_fd = Some(fd.try_clone().map_err(|e| e.to_string())?);
                let output = FdIo::new(fd.try_clone().map_err(|e| e.to_string())?)?;
                Resource::Duplex(Input::Fd(FdIo::new(fd)?), Output::Fd(output))
            }
            Backend::Stdio => {
                let input = std::io::stdin().as_fd_owned().map_err(|e| e.to_string())?;
                let output = std::io::stdout().as_fd_owned().map_err(|e| e.to_string())?;
                Resource::Duplex(Input::Fd(FdIo::new(input)?), Output::Fd(FdIo::new(output)?))
            }
            Backend::Pty { link } => {
                let pty = nix::pty::openpty(None, None).map_err(|e| format!("openpty: {e}"))?;
                let name = nix::unistd::ttyname(&pty.slave)
                    .map_err(|e| format!("openpty: {e}"))?
                    .to_string_lossy()
                    .into_owned();
                // Raw, as QEMU sets it: the monitor's bytes pass unchanged.
                if let Ok(mut termios) = nix::sys::termios::tcgetattr(&pty.slave) {
                    nix::sys::termios::cfmakeraw(&mut termios);
                    let _ = nix::sys::termios::tcsetattr(
                        &pty.slave,
                        nix::sys::termios::SetArg::TCSANOW,
                        &termios,
                    );
                }
                if let Some(link) = link {
                    let _ = std::fs::remove_file(link);
                    std::os::unix::fs::symlink(&name, link)
                        .map_err(|e| format!("Failed to create PTY symlink: {e}"))?;
                }
                if announce {
                    eprintln!("char device redirected to {name} (label {})", spec.id);
                }
                chardev.break_fd = Some(pty.master.try_clone().map_err(|e| e.to_string())?);
                let output = FdIo::new(pty.master.try_clone().map_err(|e| e.to_string())?)?;
                let input = FdIo::new(pty.master)?;
                chardev.pty = Some((name, pty.slave));
                Resource::Duplex(Input::Fd(input), Output::Fd(output))
            }
        };
        *chardev.resource.borrow_mut() = Some(resource);
        let chardev = Rc::new(chardev);
        if let Backend::Socket(socket) = &spec.backend {
            if socket.server && socket.wait {
                if announce {
                    eprintln!("QEMU waiting for connection on: {}", chardev.filename());
                }
                chardev.wait_first_client().await?;
            }
        }
        Ok(chardev)
    }

    /// What chardev-add answers: the pty's name for a pty.
    fn reply(&self) -> Value {
        match &self.pty {
            Some((name, _)) => json!({"pty": name}),
            None => json!({}),
        }
    }

    /// QEMU's `filename` in query-chardev.
    fn filename(&self) -> String {
        match &self.spec.backend {
            Backend::Socket(socket) => {
                let mut name = match &socket.addr {
                    SocketAddr::Unix {
                        path,
                        abstract_name,
                        tight,
                    } => {
                        let mut name = format!("unix:{}", path.display());
                        if *abstract_name {
                            name.push_str(",abstract=on");
                            if *tight {
                                name.push_str(",tight=on");
                            }
                        }
                        name
                    }
                    SocketAddr::Inet { host, port } => match self.local_addr {
                        Some(addr) => format!("tcp:{host}:{}", addr.port()),
                        None => format!("tcp:{host}:{port}"),
                    },
                };
                if socket.server {
                    name.push_str(",server=on");
                }
                if self.connections.get() == 0 {
                    name.insert_str(0, "disconnected:");
                }
                name
            }
            Backend::Ringbuf { .. } => "ringbuf".into(),
            Backend::File { .. } => "file".into(),
            Backend::Null => "null".into(),
            Backend::Pipe { .. } => "pipe".into(),
            Backend::Serial { .. } => "serial".into(),
            Backend::Stdio => "stdio".into(),
            Backend::Pty { .. } => format!(
                "pty:{}",
                self.pty.as_ref().map_or("", |(name, _)| name.as_str())
            ),
        }
    }

    pub fn has_monitor(&self) -> bool {
        self.monitor.borrow().is_some()
    }

    /// `--monitor` on this chardev: it gets every connection from `start` on.
    pub fn attach_monitor(&self, server: qmp::Server) -> Result<(), String> {
        let mut monitor = self.monitor.borrow_mut();
        if monitor.is_some() {
            return Err(format!("chardev '{}' is already in use", self.spec.id));
        }
        *monitor = Some(server);
        Ok(())
    }

    async fn wait_first_client(&self) -> Result<(), String> {
        // Nothing else looks at the resource before the chardev is registered.
        let mut resource = self.resource.borrow_mut().take();
        if let Some(Resource::Listener(listener, first)) = &mut resource {
            *first = Some(
                listener
                    .accept()
                    .await
                    .map_err(|e| format!("accept: {e}"))?,
            );
        }
        *self.resource.borrow_mut() = resource;
        Ok(())
    }

    /// Start serving: connections go to the monitor (or are read away without one).
    fn start(self: &Rc<Self>) {
        let Some(resource) = self.resource.borrow_mut().take() else {
            return;
        };
        let monitor = self.monitor.borrow().clone();
        let log = self.log.clone();
        let connections = self.connections.clone();
        let task = match resource {
            Resource::Listener(listener, first) => {
                let nodelay = matches!(&self.spec.backend, Backend::Socket(s) if s.nodelay);
                tokio::task::spawn_local(async move {
                    if let Some(stream) = first {
                        serve_stream(stream, &monitor, &log, &connections, nodelay);
                    }
                    loop {
                        match listener.accept().await {
                            Ok(stream) => {
                                serve_stream(stream, &monitor, &log, &connections, nodelay);
                            }
                            Err(e) => {
                                tracing::warn!("chardev accept failed: {e}");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                })
            }
            Resource::Client(stream) => {
                let Backend::Socket(socket) = self.spec.backend.clone() else {
                    return;
                };
                let id = self.spec.id.clone();
                tokio::task::spawn_local(async move {
                    let mut stream = stream;
                    loop {
                        if let Some(stream) = stream.take() {
                            let done =
                                serve_stream(stream, &monitor, &log, &connections, socket.nodelay);
                            let _ = done.await;
                        }
                        let Some(delay) = socket.reconnect else {
                            return;
                        };
                        tokio::time::sleep(delay).await;
                        match connect(&socket.addr).await {
                            Ok(s) => stream = Some(s),
                            Err(e) => {
                                tracing::warn!("Unable to connect character device {id}: {e}")
                            }
                        }
                    }
                })
            }
            Resource::Duplex(input, output) => {
                let Some(monitor) = monitor else { return };
                monitor.serve_connection(Logged {
                    inner: Duplex { input, output },
                    log,
                })
            }
        };
        *self.task.borrow_mut() = Some(task);
    }

    /// Stop serving and let go of what the chardev opened; its socket file and pty link
    /// leave the file system (only if they are still the ones it made).
    fn close(&self) {
        if let Some(task) = self.task.borrow_mut().take() {
            task.abort();
        }
        self.resource.borrow_mut().take();
        if let Some((path, dev, ino)) = &self.socket_file {
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.dev() == *dev && m.ino() == *ino) {
                let _ = std::fs::remove_file(path);
            }
        }
        if let (Backend::Pty { link: Some(link) }, Some((name, _))) =
            (&self.spec.backend, &self.pty)
        {
            if std::fs::read_link(link).is_ok_and(|target| target == Path::new(name)) {
                let _ = std::fs::remove_file(link);
            }
        }
    }

    /// chardev-send-break: a break on a terminal; other backends have none to send.
    pub fn send_break(&self) {
        if let Some(fd) = &self.break_fd {
            let _ = nix::sys::termios::tcsendbreak(fd, 0);
        }
    }

    /// ringbuf-write.
    pub fn ring_write(&self, data: &[u8]) -> Result<(), QmpError> {
        let ring = self.ring_or_err()?;
        ring.borrow_mut().write(data);
        if let Some(log) = &self.log {
            let _ = (&**log).write_all(data);
        }
        Ok(())
    }

    /// ringbuf-read: up to `size` bytes, the oldest first.
    pub fn ring_read(&self, size: usize) -> Result<Vec<u8>, QmpError> {
        Ok(self.ring_or_err()?.borrow_mut().read(size))
    }

    fn ring_or_err(&self) -> Result<&Rc<RefCell<Ring>>, QmpError> {
        self.ring
            .as_ref()
            .ok_or_else(|| QmpError::generic(format!("{} is not a ringbuf device", self.spec.id)))
    }
}

fn could_not_open(path: &Path, e: io::Error) -> String {
    format!(
        "Could not open '{}': {}",
        path.display(),
        block::os_error_text(&e)
    )
}

fn open_log(log: &LogSpec) -> Result<std::fs::File, String> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).mode(0o666);
    if log.append {
        options.append(true);
    } else {
        options.truncate(true);
    }
    options
        .open(&log.path)
        .map_err(|e| could_not_open(&log.path, e))
}

/// QEMU's pipe backend: `PATH.in` and `PATH.out`, or `PATH` both ways. Opened read-write,
/// so that opening a FIFO does not wait for its other end.
fn open_pipe(device: &Path) -> Result<(FdIo, FdIo), String> {
    let open = |path: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map(OwnedFd::from)
    };
    let with = |suffix: &str| {
        let mut name = device.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    let (input, output) = match (open(&with(".in")), open(&with(".out"))) {
        (Ok(input), Ok(output)) => (input, output),
        _ => {
            let fd = open(device).map_err(|e| could_not_open(device, e))?;
            (fd.try_clone().map_err(|e| e.to_string())?, fd)
        }
    };
    Ok((FdIo::new(input)?, FdIo::new(output)?))
}

async fn open_socket(chardev: &mut Chardev, socket: &SocketSpec) -> Result<Resource, String> {
    if !socket.server {
        return match connect(&socket.addr).await {
            Ok(stream) => {
                if let Stream::Tcp(tcp) = &stream {
                    let _ = tcp.set_nodelay(socket.nodelay);
                }
                Ok(Resource::Client(Some(stream)))
            }
            // With reconnect-ms the chardev exists anyway and keeps trying, as in QEMU.
            Err(e) if socket.reconnect.is_some() => {
                tracing::warn!(
                    "Unable to connect character device {}: {e}",
                    chardev.spec.id
                );
                Ok(Resource::Client(None))
            }
            Err(e) => Err(e),
        };
    }
    match &socket.addr {
        SocketAddr::Unix {
            path,
            abstract_name: false,
            ..
        } => {
            // A stale socket file from an earlier run would make bind fail, as QEMU knows.
            let _ = std::fs::remove_file(path);
            let listener = nbd::listen_unix_private(path)
                .and_then(|l| {
                    l.set_nonblocking(true)?;
                    tokio::net::UnixListener::from_std(l)
                })
                .map_err(|e| format!("Failed to bind socket to {}: {e}", path.display()))?;
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                chardev.socket_file = Some((path.clone(), meta.dev(), meta.ino()));
            }
            Ok(Resource::Listener(Listener::Unix(listener), None))
        }
        SocketAddr::Unix {
            path,
            abstract_name: true,
            tight,
        } => {
            let addr = abstract_addr(path, *tight).map_err(|e| e.to_string())?;
            let listener = std::os::unix::net::UnixListener::bind_addr(&addr)
                .and_then(|l| {
                    l.set_nonblocking(true)?;
                    tokio::net::UnixListener::from_std(l)
                })
                .map_err(|e| format!("Failed to bind socket: {e}"))?;
            Ok(Resource::Listener(Listener::Unix(listener), None))
        }
        SocketAddr::Inet { host, port } => {
            let listener = tokio::net::TcpListener::bind(format!("{host}:{port}"))
                .await
                .map_err(|e| format!("Failed to bind socket: {}", block::os_error_text(&e)))?;
            chardev.local_addr = listener.local_addr().ok();
            Ok(Resource::Listener(Listener::Tcp(listener), None))
        }
    }
}

/// An abstract socket name; without `tight` QEMU pads it with NULs to the whole
/// sun_path.
fn abstract_addr(path: &Path, tight: bool) -> io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    let mut name = path.as_os_str().as_bytes().to_vec();
    if !tight {
        name.resize(107, 0);
    }
    std::os::unix::net::SocketAddr::from_abstract_name(&name)
}

async fn connect(addr: &SocketAddr) -> Result<Stream, String> {
    match addr {
        SocketAddr::Unix {
            path,
            abstract_name: false,
            ..
        } => tokio::net::UnixStream::connect(path)
            .await
            .map(Stream::Unix)
            .map_err(|e| {
                format!(
                    "Failed to connect to '{}': {}",
                    path.display(),
                    block::os_error_text(&e)
                )
            }),
        SocketAddr::Unix {
            path,
            abstract_name: true,
            tight,
        } => {
            let addr = abstract_addr(path, *tight).map_err(|e| e.to_string())?;
            std::os::unix::net::UnixStream::connect_addr(&addr)
                .and_then(|s| {
                    s.set_nonblocking(true)?;
                    tokio::net::UnixStream::from_std(s)
                })
                .map(Stream::Unix)
                .map_err(|e| {
                    format!(
                        "Failed to connect to '{}': {}",
                        path.display(),
                        block::os_error_text(&e)
                    )
                })
        }
        SocketAddr::Inet { host, port } => tokio::net::TcpStream::connect(format!("{host}:{port}"))
            .await
            .map(Stream::Tcp)
            .map_err(|e| {
                format!(
                    "Failed to connect to '{host}:{port}': {}",
                    block::os_error_text(&e)
                )
            }),
    }
}

impl Listener {
    async fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| Stream::Tcp(s)),
        }
    }
}

/// Serve one connection: a QMP session when there is a monitor, else read away until the
/// peer closes. Counted in `connections` while open.
fn serve_stream(
    stream: Stream,
    monitor: &Option<qmp::Server>,
    log: &Option<Rc<std::fs::File>>,
    connections: &Rc<Cell<usize>>,
    nodelay: bool,
) -> JoinHandle<()> {
    connections.set(connections.get() + 1);
    let guard = ConnectionGuard(connections.clone());
    let session = match (stream, monitor) {
        (Stream::Unix(s), Some(m)) => Some(m.serve_connection(Logged {
            inner: s,
            log: log.clone(),
        })),
        (Stream::Tcp(s), Some(m)) => {
            let _ = s.set_nodelay(nodelay);
            Some(m.serve_connection(Logged {
                inner: s,
                log: log.clone(),
            }))
        }
        (stream, None) => {
            return tokio::task::spawn_local(async move {
                let _guard = guard;
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                loop {
                    let n = match &mut stream {
                        Stream::Unix(s) => s.read(&mut buf).await,
                        Stream::Tcp(s) => s.read(&mut buf).await,
                    };
                    if !matches!(n, Ok(n) if n > 0) {
                        return;
                    }
                }
            });
        }
    };
    tokio::task::spawn_local(async move {
        let _guard = guard;
        if let Some(session) = session {
            let _ = session.await;
        }
    })
}

struct ConnectionGuard(Rc<Cell<usize>>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// QEMU's ring buffer: writes past its size drop the oldest bytes.
pub struct Ring {
    buf: Vec<u8>,
    /// Bytes ever written and ever read (or dropped); `produced - consumed <= size`.
    produced: u64,
    consumed: u64,
}

impl Ring {
    fn new(size: usize) -> Ring {
        Ring {
            buf: vec![0; size],
            produced: 0,
            consumed: 0,
        }
    }

    fn write(&mut self, data: &[u8]) {
        let size = self.buf.len() as u64;
        for &byte in data {
            let at = (self.produced % size) as usize;
            self.buf[at] = byte;
            self.produced += 1;
        }
        self.consumed = self.consumed.max(self.produced.saturating_sub(size));
    }

    fn read(&mut self, max: usize) -> Vec<u8> {
        let size = self.buf.len() as u64;
        let n = (self.produced - self.consumed).min(max as u64);
        let out = (0..n)
            .map(|i| self.buf[((self.consumed + i) % size) as usize])
            .collect();
        self.consumed += n;
        out
    }
}

/// Input of a chardev stream.
enum Input {
    /// No input (ringbuf, null, a file without `in`): the session only writes.
    Never,
    Fd(FdIo),
}

/// Output of a chardev stream.
enum Output {
    Ring(Rc<RefCell<Ring>>),
    Null,
    File(std::fs::File),
    Fd(FdIo),
}

/// A descriptor read and written without blocking: through the reactor where it can wait
/// (FIFOs, terminals, sockets), directly where it never waits (regular files).
struct FdIo {
    polled: Option<AsyncFd<OwnedFd>>,
    plain: Option<OwnedFd>,
}

impl FdIo {
    fn new(fd: OwnedFd) -> Result<FdIo, String> {
        let regular = nix::sys::stat::fstat(&fd)
            .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
            .unwrap_or(false);
        if regular {
            return Ok(FdIo {
                polled: None,
                plain: Some(fd),
            });
        }
        let flags =
            nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).map_err(|e| e.to_string())?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(|e| e.to_string())?;
        // Safety: the AsyncFd owns the descriptor, which stays open and the same until
        // the AsyncFd is dropped.
        match unsafe { AsyncFd::register(fd) } {
            Ok(polled) => Ok(FdIo {
                polled: Some(polled),
                plain: None,
            }),
            Err(e) => match e.into_parts() {
                // Devices epoll cannot wait on (/dev/null) never make a read or write wait.
                (fd, e) if e.raw_os_error() == Some(libc::EPERM) => Ok(FdIo {
                    polled: None,
                    plain: Some(fd),
                }),
                (_, e) => Err(e.to_string()),
            },
        }
    }

    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let read = |fd: &OwnedFd, buf: &mut ReadBuf<'_>| {
            let unfilled = buf.initialize_unfilled();
            let n = nix::unistd::read(fd, unfilled).map_err(io::Error::from)?;
            buf.advance(n);
            Ok(())
        };
        if let Some(fd) = &self.plain {
            return Poll::Ready(read(fd, buf));
        }
        let Some(afd) = &self.polled else {
            return Poll::Ready(Ok(()));
        };
        loop {
            let mut guard = ready!(afd.poll_read_ready(cx))?;
            match guard.try_io(|inner| read(inner.get_ref(), buf)) {
                // A terminal whose other end is closed reads EIO: that is its end of file.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_write(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if let Some(fd) = &self.plain {
            return Poll::Ready(nix::unistd::write(fd, data).map_err(io::Error::from));
        }
        let Some(afd) = &self.polled else {
            return Poll::Ready(Ok(data.len()));
        };
        loop {
            let mut guard = ready!(afd.poll_write_ready(cx))?;
            match guard
                .try_io(|inner| nix::unistd::write(inner.get_ref(), data).map_err(io::Error::from))
            {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }
}

/// A chardev's input and output as one stream for a QMP session.
struct Duplex {
    input: Input,
    output: Output,
}

impl AsyncRead for Duplex {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &self.input {
            Input::Never => Poll::Pending,
            Input::Fd(fd) => fd.poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Duplex {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.output {
            Output::Ring(ring) => {
                ring.borrow_mut().write(data);
                Poll::Ready(Ok(data.len()))
            }
            Output::Null => Poll::Ready(Ok(data.len())),
            Output::File(file) => Poll::Ready(file.write(data)),
            Output::Fd(fd) => fd.poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A stream whose output is also copied to the chardev's `logfile`.
struct Logged<S> {
    inner: S,
    log: Option<Rc<std::fs::File>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Logged<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Logged<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, data))?;
        if let Some(log) = &self.log {
            let _ = (&**log).write_all(&data[..n]);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A duplicate of a standard stream's descriptor, so that closing the chardev leaves the
/// process's own descriptor open.
trait AsFdOwned {
    fn as_fd_owned(&self) -> io::Result<OwnedFd>;
}

impl<T: std::os::fd::AsFd> AsFdOwned for T {
    fn as_fd_owned(&self) -> io::Result<OwnedFd> {
        self.as_fd().try_clone_to_owned()
    }
}

/// ringbuf-write's and ringbuf-read's `format`.
#[derive(Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    #[default]
    Utf8,
    Base64,
}

/// The bytes ringbuf-write's `data` stands for.
pub fn decode_data(data: &str, format: DataFormat) -> Result<Vec<u8>, QmpError> {
    match format {
        DataFormat::Utf8 => Ok(data.as_bytes().to_vec()),
        DataFormat::Base64 => lenient_base64()
            .decode(data)
            .map_err(|_| QmpError::generic("Base64 data contains invalid characters")),
    }
}

/// ringbuf-read's answer for `bytes`. utf8 replaces what is not UTF-8 (QEMU passes such
/// bytes on and its JSON writer replaces them the same way).
pub fn encode_data(bytes: &[u8], format: DataFormat) -> String {
    match format {
        DataFormat::Utf8 => String::from_utf8_lossy(bytes).into_owned(),
        DataFormat::Base64 => base64::engine::general_purpose::STANDARD.encode(bytes),
    }
}

/// Standard base64, padding optional as GLib's decoder takes it.
fn lenient_base64() -> base64::engine::GeneralPurpose {
    base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    )
}

#[cfg(test)]
mod tests {
    use super::Ring;

    #[test]
    fn a_full_ring_drops_its_oldest_bytes() {
        let mut ring = Ring::new(4);
        ring.write(b"abcdef");
        assert_eq!(ring.read(2), b"cd");
        assert_eq!(ring.read(100), b"ef");
        assert_eq!(ring.read(100), b"");
        ring.write(b"xy");
        ring.write(b"z");
        assert_eq!(ring.read(100), b"xyz");
    }
}
