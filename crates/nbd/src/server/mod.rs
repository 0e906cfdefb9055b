//! NBD server: the export registry, listeners with a connection limit, and the
//! management operations the daemon drives (add/remove exports, stop).
//!
//! The registry and the listener state are `Send + Sync`; each connection runs on an
//! I/O thread chosen by the daemon's [`Spawner`], where its futures stay.

mod handshake;
mod relocate;
mod transmission;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Notify};

use crate::backend::{Backend, MetaContext};
use crate::inet::InetOptions;
use crate::proto;
use crate::spawn::Spawner;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix socket path; a stale socket file there is replaced, and the file is
    /// removed when the server stops listening.
    Unix(PathBuf),
    /// A TCP address (QEMU's InetSocketAddress).
    Tcp {
        /// Host name or address literal to bind.
        host: String,
        /// TCP port; 0 picks a free one, and [`NbdServer::start`] returns the real one.
        port: u16,
        /// How to bind: port range, address family, keep-alive, MPTCP.
        inet: InetOptions,
    },
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp { host, port, .. } => write!(f, "{host}:{port}"),
        }
    }
}

/// Server-wide settings (QEMU's `nbd-server-start` options).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Simultaneous connections, 0 for unlimited. At the limit the server stops
    /// accepting (extra clients wait in the backlog, as with QEMU). A limit of 1 also
    /// withdraws `CAN_MULTI_CONN`.
    pub max_connections: u32,
    /// Clients that have not finished negotiating after this many seconds are
    /// disconnected; 0 for no limit.
    pub handshake_max_seconds: u32,
}

impl Default for ServerConfig {
    /// QEMU's defaults.
    fn default() -> Self {
        ServerConfig {
            max_connections: 100,
            handshake_max_seconds: 10,
        }
    }
}

/// Per-export settings decided by the daemon.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportOptions {
    /// Clients may write (the export is also read-only if the backend says so).
    pub writable: bool,
    /// Dirty bitmaps offered as `qemu:dirty-bitmap:NAME`.
    pub bitmaps: Vec<String>,
    /// Offer `qemu:allocation-depth`.
    pub allocation_depth: bool,
}

/// Errors of the management API, kept distinct so the daemon can map them to qsd's texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportError {
    /// An export with this name already exists.
    Exists(String),
    /// No export with this name.
    NotFound(String),
    /// Safe removal refused: clients are connected.
    InUse {
        /// The export's name.
        name: String,
        /// Clients connected to it.
        clients: usize,
    },
    /// The name is longer than the protocol allows ([`proto::MAX_STRING`] bytes).
    InvalidName(String),
    /// The description is longer than the protocol allows ([`proto::MAX_STRING`] bytes).
    DescriptionTooLong(String),
}

impl fmt::Display for ExportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExportError::Exists(n) => write!(f, "NBD server already has export named '{n}'"),
            ExportError::NotFound(n) => write!(f, "Export '{n}' is not found"),
            ExportError::InUse { name, .. } => write!(f, "export '{name}' still in use"),
            ExportError::InvalidName(n) => write!(f, "export name '{n}' too long"),
            ExportError::DescriptionTooLong(d) => write!(f, "description '{d}' too long"),
        }
    }
}

impl std::error::Error for ExportError {}

/// Notifications for the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    /// A removed export has no clients left (QEMU's BLOCK_EXPORT_DELETED moment).
    ExportDeleted {
        /// The export's name.
        name: String,
    },
}

type EventHandler = Arc<dyn Fn(ServerEvent) + Send + Sync>;

/// Decides whether a TLS client, named by its certificate's distinguished name (`None`
/// when it sent no certificate), may go on negotiating; `Err` is a reason to log (an authz
/// object that is gone), and refuses too.
pub type Authorize = Arc<dyn Fn(Option<&str>) -> Result<bool, String> + Send + Sync>;

/// TLS for the whole server (nbd-server-start's `tls-creds` and `tls-authz`): clients must
/// upgrade with `NBD_OPT_STARTTLS` before anything else.
#[derive(Clone)]
pub struct ServerTls {
    /// Server-side credentials.
    pub creds: Arc<crate::tls::TlsCreds>,
    /// Who may connect once the TLS handshake is done; everyone without it.
    pub authorize: Option<Authorize>,
}

/// A signal that tells one connection to stop; shared by the registries that may need
/// to end it (server stop, hard export removal).
pub(crate) type KillSwitch = Arc<watch::Sender<bool>>;

pub(crate) struct Export {
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) options: ExportOptions,
    clients: Mutex<HashMap<u64, KillSwitch>>,
    removed: AtomicBool,
}

impl Export {
    /// The contexts this export offers, in listing order.
    pub(crate) fn contexts(&self) -> Vec<MetaContext> {
        let mut v = vec![MetaContext::BaseAllocation];
        if self.options.allocation_depth {
            v.push(MetaContext::AllocationDepth);
        }
        v.extend(
            self.options
                .bitmaps
                .iter()
                .map(|b| MetaContext::DirtyBitmap(b.clone())),
        );
        v
    }

    pub(crate) fn read_only(&self) -> bool {
        !self.options.writable || self.backend.capabilities().read_only
    }
}

struct Listening {
    stop: watch::Sender<bool>,
    addr: ListenAddr,
}

pub(crate) struct Shared {
    spawner: Arc<dyn Spawner>,
    config: Mutex<ServerConfig>,
    exports: Mutex<BTreeMap<String, Arc<Export>>>,
    listening: Mutex<Option<Listening>>,
    connections: Mutex<HashMap<u64, KillSwitch>>,
    slot_freed: Notify,
    next_id: AtomicU64,
    events: Mutex<Option<EventHandler>>,
    tls: Mutex<Option<ServerTls>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not wedge the registry; the data stays consistent because
    // every critical section is a single map operation.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn emit(&self, ev: ServerEvent) {
        let handler = lock(&self.events).clone();
        if let Some(h) = handler {
            h(ev);
        }
    }

    pub(crate) fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        lock(&self.exports).get(name).cloned()
    }

    pub(crate) fn list(&self) -> Vec<Arc<Export>> {
        lock(&self.exports).values().cloned().collect()
    }

    fn register(self: &Arc<Self>) -> ConnectionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        let kill = Arc::new(tx);
        lock(&self.connections).insert(id, kill.clone());
        ConnectionGuard {
            shared: self.clone(),
            id,
            kill,
            kill_rx: rx,
        }
    }

    fn connection_count(&self) -> usize {
        lock(&self.connections).len()
    }

    pub(crate) fn config(&self) -> ServerConfig {
        *lock(&self.config)
    }

    fn tls(&self) -> Option<ServerTls> {
        lock(&self.tls).clone()
    }
}

/// Keeps a connection counted (server-wide) while it lives.
pub(crate) struct ConnectionGuard {
    shared: Arc<Shared>,
    pub(crate) id: u64,
    pub(crate) kill: KillSwitch,
    pub(crate) kill_rx: watch::Receiver<bool>,
}

impl ConnectionGuard {
    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Counts this connection as a client of `export`; `None` if the export is being
    /// removed.
    pub(crate) fn attach(&self, export: &Arc<Export>) -> Option<ExportGuard> {
        let mut clients = lock(&export.clients);
        if export.removed.load(Ordering::Acquire) {
            return None;
        }
        clients.insert(self.id, self.kill.clone());
        Some(ExportGuard {
            shared: self.shared.clone(),
            export: export.clone(),
            id: self.id,
        })
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        lock(&self.shared.connections).remove(&self.id);
        self.shared.slot_freed.notify_waiters();
    }
}

/// Counts a connection as a client of one export while it lives.
pub(crate) struct ExportGuard {
    shared: Arc<Shared>,
    pub(crate) export: Arc<Export>,
    id: u64,
}

impl Drop for ExportGuard {
    fn drop(&mut self) {
        let last = {
            let mut clients = lock(&self.export.clients);
            clients.remove(&self.id);
            clients.is_empty() && self.export.removed.load(Ordering::Acquire)
        };
        if last {
            self.shared.emit(ServerEvent::ExportDeleted {
                name: self.export.name.clone(),
            });
        }
    }
}

/// The NBD server. Cheap to clone; all clones drive the same registry.
#[derive(Clone)]
pub struct NbdServer {
    shared: Arc<Shared>,
}

enum StdStream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

enum StdListener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl NbdServer {
    /// A server with no listener and no exports; connections run where `spawner` puts them.
    pub fn new(spawner: Arc<dyn Spawner>) -> NbdServer {
        NbdServer {
            shared: Arc::new(Shared {
                spawner,
                config: Mutex::new(ServerConfig::default()),
                exports: Mutex::new(BTreeMap::new()),
                listening: Mutex::new(None),
                connections: Mutex::new(HashMap::new()),
                slot_freed: Notify::new(),
                next_id: AtomicU64::new(0),
                events: Mutex::new(None),
                tls: Mutex::new(None),
            }),
        }
    }

    /// Installs the callback that receives [`ServerEvent`]s. It may run on any thread,
    /// including inside [`NbdServer::remove_export`].
    pub fn set_event_handler(&self, handler: impl Fn(ServerEvent) + Send + Sync + 'static) {
        *lock(&self.shared.events) = Some(Arc::new(handler));
    }

    /// Binds `addr` and starts accepting with `config`, over TLS only if `tls` is given.
    /// Returns the bound address (the real port for TCP port 0). The I/O threads' runtimes
    /// need the time driver for the handshake limit.
    pub fn start(
        &self,
        addr: &ListenAddr,
        config: ServerConfig,
        tls: Option<ServerTls>,
    ) -> io::Result<ListenAddr> {
        let mut listening = lock(&self.shared.listening);
        if listening.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "NBD server already running",
            ));
        }
        let (listener, bound) = bind(addr)?;
        *lock(&self.shared.config) = config;
        *lock(&self.shared.tls) = tls;
        let max_connections = config.max_connections;
        let (stop, stop_rx) = watch::channel(false);
        *listening = Some(Listening {
            stop,
            addr: bound.clone(),
        });
        drop(listening);
        let shared = self.shared.clone();
        self.shared.spawner.spawn(Box::new(move || {
            Box::pin(accept_loop(shared, listener, stop_rx, max_connections))
        }));
        tracing::info!(addr = %bound, max_connections, "NBD server listening");
        Ok(bound)
    }

    /// The address being listened on, if started.
    pub fn listen_addr(&self) -> Option<ListenAddr> {
        lock(&self.shared.listening)
            .as_ref()
            .map(|l| l.addr.clone())
    }

    /// Closes the listener, removes every export (hard) and disconnects every client.
    /// `ExportDeleted` events follow as clients go.
    pub fn stop(&self) {
        if let Some(l) = lock(&self.shared.listening).take() {
            let _ = l.stop.send(true);
        }
        let names: Vec<String> = lock(&self.shared.exports).keys().cloned().collect();
        for name in names {
            let _ = self.remove_export(&name, true);
        }
        let conns: Vec<KillSwitch> = lock(&self.shared.connections).values().cloned().collect();
        for k in conns {
            k.send_replace(true);
        }
    }

    /// Adds an export that clients can open by `name` from now on. `description` is sent
    /// with `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`. Fails if the name is taken or the
    /// name or description is too long.
    pub fn add_export(
        &self,
        name: &str,
        description: Option<&str>,
        backend: Arc<dyn Backend>,
        options: ExportOptions,
    ) -> Result<(), ExportError> {
        if name.len() > proto::MAX_STRING {
            return Err(ExportError::InvalidName(name.to_string()));
        }
        if let Some(d) = description.filter(|d| d.len() > proto::MAX_STRING) {
            return Err(ExportError::DescriptionTooLong(d.to_string()));
        }
        let mut exports = lock(&self.shared.exports);
        if exports.contains_key(name) {
            return Err(ExportError::Exists(name.to_string()));
        }
        exports.insert(
            name.to_string(),
            Arc::new(Export {
                name: name.to_string(),
                description: description.map(str::to_string),
                backend,
                options,
                clients: Mutex::new(HashMap::new()),
                removed: AtomicBool::new(false),
            }),
        );
        Ok(())
    }

    /// Removes an export so no new client can open it. Safe mode (`hard == false`) fails
    /// with [`ExportError::InUse`] while clients are connected; hard mode disconnects them.
    /// `ExportDeleted` is emitted once no client is left (at once if there was none).
    pub fn remove_export(&self, name: &str, hard: bool) -> Result<(), ExportError> {
        let export = {
            let mut exports = lock(&self.shared.exports);
            let export = exports
                .get(name)
                .cloned()
                .ok_or_else(|| ExportError::NotFound(name.to_string()))?;
            let clients = lock(&export.clients);
            if !hard && !clients.is_empty() {
                return Err(ExportError::InUse {
                    name: name.to_string(),
                    clients: clients.len(),
                });
            }
            export.removed.store(true, Ordering::Release);
            drop(clients);
            exports.remove(name);
            export
        };
        let kills: Vec<KillSwitch> = lock(&export.clients).values().cloned().collect();
        if kills.is_empty() {
            self.shared.emit(ServerEvent::ExportDeleted {
                name: name.to_string(),
            });
        }
        for k in kills {
            k.send_replace(true);
        }
        Ok(())
    }

    /// Names of the exports, sorted.
    pub fn exports(&self) -> Vec<String> {
        lock(&self.shared.exports).keys().cloned().collect()
    }

    /// Clients in transmission on `name`, or `None` if there is no such export.
    pub fn export_clients(&self, name: &str) -> Option<usize> {
        self.shared.lookup(name).map(|e| lock(&e.clients).len())
    }

    /// All open connections, negotiating or transmitting.
    pub fn connection_count(&self) -> usize {
        self.shared.connection_count()
    }

    /// Serves an already connected unix socket (e.g. passed by file descriptor) on an I/O
    /// thread. It counts toward the connection total but ignores the limit.
    pub fn serve_unix_stream(&self, stream: UnixStream) {
        spawn_connection(&self.shared, StdStream::Unix(stream));
    }

    /// Serves one connection on the current task, over any byte stream. Must run inside a
    /// `LocalSet` (request handlers are `spawn_local`ed). Returns when the connection ends.
    pub async fn serve_io<R, W>(&self, reader: R, writer: W)
    where
        R: AsyncRead + Unpin + 'static,
        W: AsyncWrite + Unpin + 'static,
    {
        let guard = self.shared.register();
        transmission::serve_here(guard, reader, writer).await
    }
}

fn bind(addr: &ListenAddr) -> io::Result<(StdListener, ListenAddr)> {
    match addr {
        ListenAddr::Unix(path) => {
            // Like QEMU, a stale socket file left by an earlier run is replaced.
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if meta.file_type().is_socket() {
                    let _ = std::fs::remove_file(path);
                }
            }
            let l = crate::socket::listen_unix_private(path)?;
            l.set_nonblocking(true)?;
            Ok((StdListener::Unix(l, path.clone()), addr.clone()))
        }
        ListenAddr::Tcp { host, port, inet } => {
            let l = crate::inet::listen(host, *port, inet)?;
            l.set_nonblocking(true)?;
            let port = l.local_addr()?.port();
            let bound = ListenAddr::Tcp {
                host: host.clone(),
                port,
                inet: *inet,
            };
            Ok((StdListener::Tcp(l), bound))
        }
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: StdListener,
    mut stop: watch::Receiver<bool>,
    max: u32,
) {
    enum Tokio {
        Unix(tokio::net::UnixListener, PathBuf),
        Tcp(tokio::net::TcpListener),
    }
    let listener = match listener {
        StdListener::Unix(l, p) => tokio::net::UnixListener::from_std(l).map(|l| Tokio::Unix(l, p)),
        StdListener::Tcp(l) => tokio::net::TcpListener::from_std(l).map(Tokio::Tcp),
    };
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("NBD listener cannot be registered: {e}");
            return;
        }
    };
    loop {
        if max > 0 {
            loop {
                let freed = shared.slot_freed.notified();
                tokio::pin!(freed);
                freed.as_mut().enable();
                if shared.connection_count() < max as usize {
                    break;
                }
                tokio::select! {
                    _ = freed => {}
                    _ = stop.changed() => break,
                }
            }
        }
        if *stop.borrow() {
            break;
        }
        let accepted = tokio::select! {
            r = async {
                match &listener {
                    Tokio::Unix(l, _) => l.accept().await.and_then(|(s, _)| {
                        crate::socket::enlarge_send_buffer(&s);
                        s.into_std()
                    }).map(StdStream::Unix),
                    Tokio::Tcp(l) => l.accept().await.and_then(|(s, _)| {
                        s.set_nodelay(true)?;
                        s.into_std()
                    }).map(StdStream::Tcp),
                }
            } => r,
            _ = stop.changed() => break,
        };
        match accepted {
            Ok(s) => spawn_connection(&shared, s),
            Err(e) => tracing::warn!("NBD accept failed: {e}"),
        }
    }
    if let Tokio::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("NBD server stopped listening");
}

fn spawn_connection(shared: &Arc<Shared>, stream: StdStream) {
    // Counted at once so the accept loop sees the slot taken before the job runs.
    let guard = shared.register();
    let tls = shared.tls();
    shared.spawner.spawn(Box::new(move || {
        Box::pin(async move {
            match stream {
                StdStream::Unix(s) => {
                    let killer = s.try_clone();
                    match tokio::net::UnixStream::from_std(s) {
                        Ok(t) => {
                            let on_kill = move || {
                                if let Ok(k) = &killer {
                                    let _ = k.shutdown(std::net::Shutdown::Both);
                                }
                            };
                            serve_socket(guard, t, tls, on_kill).await
                        }
                        Err(e) => tracing::warn!("NBD connection cannot be registered: {e}"),
                    }
                }
                StdStream::Tcp(s) => {
                    let killer = s.try_clone();
                    match tokio::net::TcpStream::from_std(s) {
                        Ok(t) => {
                            let on_kill = move || {
                                if let Ok(k) = &killer {
                                    let _ = k.shutdown(std::net::Shutdown::Both);
                                }
                            };
                            serve_socket(guard, t, tls, on_kill).await
                        }
                        Err(e) => tracing::warn!("NBD connection cannot be registered: {e}"),
                    }
                }
            }
        })
    }));
}

/// Serves one accepted socket: over TLS if the server has it (the whole socket goes into
/// the TLS session), else on the socket's own halves.
async fn serve_socket<S: relocate::RawSocket>(
    guard: ConnectionGuard,
    socket: S,
    tls: Option<ServerTls>,
    on_kill: impl Fn() + Send + 'static,
) where
    tokio_rustls::server::TlsStream<relocate::Slot<S>>: Send,
{
    match tls {
        Some(tls) => transmission::serve_tls(guard, socket, tls, on_kill).await,
        None => {
            let (r, w) = socket.split();
            transmission::serve::<relocate::Plain<S>>(guard, r, w, on_kill).await
        }
    }
}
