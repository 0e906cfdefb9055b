//! `nbd`: a remote NBD export as a node, so that a job can copy to (or from) another host.
//!
//! One connection, as QEMU's client has: many servers (qemu-nbd by default) take one
//! client only. The connection is bound to the I/O thread that opened the node (its
//! futures are not `Send`), so a task there owns it and serves requests that arrive from
//! any thread over a channel, many at a time. A request that finds the connection broken
//! reconnects, retrying for up to `reconnect-delay` seconds.

use crate::node::{DriverInfo, Extent, ExtentKind, Node, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use async_trait::async_trait;
use nbd::backend::ZeroFlags;
use nbd::client::{Client, ClientOptions, ClientTls, ConnectAddr};
use nbd::proto::{STATE_HOLE, STATE_ZERO};
use nbd::InetOptions;
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NbdOptions {
    pub server: Map<String, Value>,
    pub export: Option<String>,
    pub tls_creds: Option<String>,
    pub tls_hostname: Option<String>,
    pub x_dirty_bitmap: Option<String>,
    pub reconnect_delay: Option<u32>,
    pub open_timeout: Option<u32>,
}

/// QAPI's `UnixSocketAddress`: the `server` of an nbd node and the address of
/// nbd-server-start and `--nbd-server`, when `type` is `unix`.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct UnixServer {
    /// The socket's file system path (QMP `path`).
    pub path: String,
    /// Linux abstract sockets are not offered; accepted when off.
    #[serde(rename = "abstract")]
    pub abstract_name: Option<bool>,
    #[serde(rename = "tight")]
    _tight: Option<bool>,
}

impl UnixServer {
    /// The socket path; Err (a text for the client) if the address asks for an abstract
    /// socket (`abstract: true`), which blockd does not offer.
    pub fn path(self) -> Result<String, String> {
        if self.abstract_name == Some(true) {
            return Err("blockd does not use abstract unix sockets".into());
        }
        Ok(self.path)
    }
}

impl InetServer {
    /// The port of an inet address, which QAPI carries as a string. Only a number is
    /// accepted, no service name; Err is the text for the client.
    pub fn port_number(&self) -> Result<u16, String> {
        self.port
            .parse()
            .map_err(|_| format!("Port '{}' is not a valid port number", self.port))
    }

    /// The socket options, checked: both address families off is refused up front.
    pub fn options(&self) -> Result<InetOptions, String> {
        let options = InetOptions {
            numeric: self.numeric.unwrap_or(false),
            to: self.to,
            ipv4: self.ipv4,
            ipv6: self.ipv6,
            keep_alive: self.keep_alive.unwrap_or(false),
            mptcp: self.mptcp.unwrap_or(false),
        };
        options.validate().map_err(|e| e.to_string())?;
        Ok(options)
    }
}

/// QAPI's `InetSocketAddress`: the `server` of an nbd node and the address of
/// nbd-server-start and `--nbd-server`, when `type` is `inet`.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct InetServer {
    /// Host name or IP address (QMP `host`).
    pub host: String,
    /// Port, as a decimal string (QMP `port`); `port_number` parses it.
    pub port: String,
    numeric: Option<bool>,
    to: Option<u16>,
    ipv4: Option<bool>,
    ipv6: Option<bool>,
    keep_alive: Option<bool>,
    mptcp: Option<bool>,
}

type Reply<T> = oneshot::Sender<io::Result<T>>;

/// A request for the connection's task; buffers are owned because they cross threads.
enum Request {
    Read(u64, usize, Reply<Vec<u8>>),
    Write(u64, Vec<u8>, bool, Reply<()>),
    Zeroes(u64, u64, ZeroFlags, Reply<()>),
    Trim(u64, u64, Reply<()>),
    Flush(Reply<()>),
    Status(u64, u64, Reply<Option<nbd::backend::StatusExtent>>),
}

pub struct NbdDriver {
    filename: String,
    size: u64,
    /// Dropping the driver closes the channel, which ends the task and the connection.
    requests: mpsc::UnboundedSender<Request>,
}

/// Where to (re)connect, and the connection of the moment.
struct Connection {
    addr: ConnectAddr,
    export: String,
    /// Negotiation choices, TLS among them, for every (re)connection.
    options: ClientOptions,
    reconnect_delay: Duration,
    client: RefCell<Option<Rc<Client>>>,
}

impl Connection {
    async fn client(&self) -> io::Result<Rc<Client>> {
        if let Some(client) = self.client.borrow().clone() {
            return Ok(client);
        }
        let deadline = Instant::now() + self.reconnect_delay;
        loop {
            match Client::connect(&self.addr, &self.export, &self.options).await {
                Ok(client) => {
                    let client = Rc::new(client);
                    *self.client.borrow_mut() = Some(client.clone());
                    return Ok(client);
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Run a request once, and once more on a fresh connection if the first one broke.
    async fn run<T, F, Fut>(&self, op: F) -> io::Result<T>
    where
        F: Fn(Rc<Client>) -> Fut,
        Fut: std::future::Future<Output = io::Result<T>>,
    {
        match op(self.client().await?).await {
            Err(e) if is_disconnect(&e) => {
                self.client.borrow_mut().take();
                op(self.client().await?).await
            }
            other => other,
        }
    }

    async fn serve(self: Rc<Self>, request: Request) {
        match request {
            Request::Read(offset, len, reply) => {
                let result = self
                    .run(|c| async move {
                        let mut buf = vec![0u8; len];
                        c.read(offset, &mut buf).await.map(|()| buf)
                    })
                    .await;
                let _ = reply.send(result);
            }
            Request::Write(offset, data, fua, reply) => {
                let data = &data;
                let result = self
                    .run(|c| async move { c.write(offset, data, fua).await })
                    .await;
                let _ = reply.send(result);
            }
            Request::Zeroes(offset, len, flags, reply) => {
                let result = self
                    .run(|c| async move { c.write_zeroes(offset, len, flags).await })
                    .await;
                let _ = reply.send(result);
            }
            Request::Trim(offset, len, reply) => {
                let result = self
                    .run(|c| async move { c.trim(offset, len, false).await })
                    .await;
                let _ = reply.send(result);
            }
            Request::Flush(reply) => {
                let _ = reply.send(self.run(|c| async move { c.flush().await }).await);
            }
            Request::Status(offset, len, reply) => {
                let result = self
                    .run(|c| async move {
                        match c.block_status(offset, len, true).await {
                            Ok(replies) => Ok(replies
                                .into_iter()
                                .find_map(|(_, extents)| extents.into_iter().next())),
                            // A server without base:allocation: everything is data.
                            Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(None),
                            Err(e) => Err(e),
                        }
                    })
                    .await;
                let _ = reply.send(result);
            }
        }
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected
    ) || e.raw_os_error() == Some(libc::ESHUTDOWN)
}

/// How long blockd waits for a server to answer when `open-timeout` is 0: QEMU then waits
/// forever (its monitor hangs with a server that accepts and never greets); blockd gives
/// up with QEMU's timeout text instead.
const DEFAULT_OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause between connection attempts within `open-timeout`.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Connect and negotiate within `open_timeout` seconds (QEMU's open-timeout): a server
/// that refuses or is not there yet is tried again until then (with 0, once, as QEMU); one
/// that does not finish the handshake in time is given up with QEMU's text. The outer
/// error is the timeout, the inner one the connection's own.
async fn establish(
    addr: &ConnectAddr,
    export: &str,
    options: &ClientOptions,
    open_timeout: u32,
) -> Result<io::Result<Client>, String> {
    let retry = open_timeout > 0;
    let bound = if retry {
        Duration::from_secs(u64::from(open_timeout))
    } else {
        DEFAULT_OPEN_TIMEOUT
    };
    let attempts = async {
        loop {
            match Client::connect(addr, export, options).await {
                // The socket's own errors (absent, refused, reset); an NBD server's
                // refusal has no OS error and is final.
                Err(e) if retry && e.raw_os_error().is_some() => {
                    tracing::debug!("NBD server not there yet: {e}");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                result => return result,
            }
        }
    };
    tokio::time::timeout(bound, attempts)
        .await
        .map_err(|_| "Connection attempt cancelled by timeout".to_string())
}

impl NbdDriver {
    /// The address to connect to and the `nbd+unix://` / `nbd://` filename for reports.
    pub fn unix_addr(server: UnixServer) -> Result<(ConnectAddr, String), String> {
        let path = server.path()?;
        let filename = format!("nbd+unix://?socket={path}");
        Ok((ConnectAddr::Unix(path.into()), filename))
    }

    pub fn inet_addr(server: InetServer) -> Result<(ConnectAddr, String), String> {
        let port = server.port_number()?;
        let inet = server.options()?;
        let filename = format!("nbd://{}:{port}", server.host);
        Ok((
            ConnectAddr::Tcp {
                host: server.host,
                port,
                inet,
            },
            filename,
        ))
    }

    /// Connect and learn the export's size and flags. Must run on an I/O thread: the
    /// connection stays on it for the node's lifetime.
    pub async fn open(
        addr: ConnectAddr,
        filename: String,
        opts: &NbdOptions,
        tls: Option<ClientTls>,
        read_only: bool,
    ) -> Result<NbdDriver, String> {
        if opts.x_dirty_bitmap.is_some() {
            return Err("x-dirty-bitmap is not supported by blockd's NBD client".into());
        }
        let export = opts.export.clone().unwrap_or_default();
        let options = ClientOptions {
            tls,
            ..ClientOptions::default()
        };
        let client = establish(&addr, &export, &options, opts.open_timeout.unwrap_or(0))
            .await?
            .map_err(|e| {
                // QEMU names the socket address, not the URI.
                let to = match &addr {
                    ConnectAddr::Unix(path) => path.display().to_string(),
                    ConnectAddr::Tcp { host, port, .. } => format!("{host}:{port}"),
                };
                format!(
                    "Failed to connect to '{to}': {}",
                    crate::drivers::file::os_error_text(&e)
                )
            })?;
        if !read_only && client.is_read_only() {
            return Err(
                "An export that is read-only on the server cannot be opened read-write".into(),
            );
        }
        let size = client.size();
        let filename = if export.is_empty() {
            filename
        } else {
            format!("{filename}/{export}")
        };
        let connection = Rc::new(Connection {
            addr,
            export,
            options,
            reconnect_delay: Duration::from_secs(opts.reconnect_delay.map_or(0, u64::from)),
            client: RefCell::new(Some(Rc::new(client))),
        });
        let (requests, mut incoming) = mpsc::unbounded_channel::<Request>();
        tokio::task::spawn_local(async move {
            while let Some(request) = incoming.recv().await {
                tokio::task::spawn_local(connection.clone().serve(request));
            }
        });
        Ok(NbdDriver {
            filename,
            size,
            requests,
        })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> io::Result<T> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(make(tx))
            .map_err(|_| io::Error::from_raw_os_error(libc::ESHUTDOWN))?;
        rx.await
            .map_err(|_| io::Error::from_raw_os_error(libc::ESHUTDOWN))?
    }
}

#[async_trait(?Send)]
impl Driver for NbdDriver {
    fn format_name(&self) -> &'static str {
        "nbd"
    }

    fn size(&self, _: &Node) -> u64 {
        self.size
    }

    async fn read(&self, _: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let data = self
            .call(|reply| Request::Read(offset, buf.len(), reply))
            .await?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        self.call(|reply| Request::Write(offset, buf.to_vec(), flags.fua, reply))
            .await
    }

    async fn write_zeroes(
        &self,
        _: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        let zero = ZeroFlags {
            may_trim: flags.may_unmap,
            fast: flags.no_fallback,
            fua: flags.fua,
        };
        self.call(|reply| Request::Zeroes(offset, len, zero, reply))
            .await
    }

    async fn discard(&self, _: &Node, offset: u64, len: u64) -> io::Result<()> {
        self.call(|reply| Request::Trim(offset, len, reply)).await
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        self.call(Request::Flush).await
    }

    async fn block_status(&self, _: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        let extent = self
            .call(|reply| Request::Status(offset, len, reply))
            .await?;
        Ok(match extent {
            Some(e) if e.flags & STATE_ZERO != 0 => Extent {
                len: e.length.clamp(1, len),
                kind: ExtentKind::Zero {
                    allocated: e.flags & STATE_HOLE == 0,
                },
            },
            Some(e) => Extent {
                len: e.length.clamp(1, len),
                kind: ExtentKind::Data,
            },
            None => Extent {
                len,
                kind: ExtentKind::Data,
            },
        })
    }

    async fn truncate(&self, _: &Node, _size: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
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
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: false,
    hands_over: true,
    names: &["nbd"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let opts: NbdOptions = o.parse(options)?;
    let (addr, filename) = server_addr(o, opts.server.clone())?;
    let tls = client_tls(o.graph, &opts, &addr).map_err(QmpError::generic)?;
    let driver = NbdDriver::open(addr, filename, &opts, tls, o.common().read_only)
        .await
        .map_err(QmpError::generic)?;
    Ok(Box::new(driver))
}

/// The driver's `tls-creds` and `tls-hostname`, with QEMU's texts: the credentials must be
/// for a client, and the name the server's certificate is checked against is
/// `tls-hostname`, else the TCP host (a unix socket has none).
fn client_tls(
    graph: &crate::Graph,
    opts: &NbdOptions,
    addr: &ConnectAddr,
) -> Result<Option<ClientTls>, String> {
    let Some(id) = &opts.tls_creds else {
        if opts.tls_hostname.is_some() {
            return Err("tls-hostname needs tls-creds".into());
        }
        return Ok(None);
    };
    let creds = graph
        .tls_creds
        .get(id)
        .ok_or_else(|| format!("No TLS credentials with id '{id}'"))?;
    if creds.endpoint() != nbd::Endpoint::Client {
        return Err("Expected TLS credentials for a client endpoint".into());
    }
    let hostname = match (&opts.tls_hostname, addr) {
        (Some(name), _) => name.clone(),
        (None, ConnectAddr::Tcp { host, .. }) => host.clone(),
        (None, ConnectAddr::Unix(_)) => return Err("No hostname for certificate validation".into()),
    };
    Ok(Some(ClientTls { creds, hostname }))
}

/// The driver's `server`: a flat SocketAddress keyed by `type`.
fn server_addr(
    o: &Opener<'_>,
    mut server: Map<String, Value>,
) -> Result<(ConnectAddr, String), QmpError> {
    let kind = server.remove("type");
    match kind.as_ref().and_then(Value::as_str) {
        Some("unix") => {
            NbdDriver::unix_addr(o.parse_member(server, "server")?).map_err(QmpError::generic)
        }
        Some("inet") => {
            NbdDriver::inet_addr(o.parse_member(server, "server")?).map_err(QmpError::generic)
        }
        Some(other) => Err(QmpError::generic(format!(
            "Parameter '{}.type' does not accept value '{other}'",
            o.member_path("server")
        ))),
        None => Err(QmpError::generic(format!(
            "Parameter '{}.type' is missing",
            o.member_path("server")
        ))),
    }
}
