//! `nbd`: a remote NBD export as a node, so that a job can copy to (or from) another host.
//!
//! An NBD client connection is bound to the thread that made it (its futures are not
//! `Send`), and every I/O thread may serve this node, so each thread opens its own
//! connection on first use and keeps it in a thread-local table. A connection that fails
//! is dropped and reopened, retrying for up to `reconnect-delay` seconds.

use crate::node::{DriverInfo, Extent, ExtentKind, Node, WriteFlags};
use crate::perm::Perms;
use crate::Driver;
use async_trait::async_trait;
use nbd::backend::ZeroFlags;
use nbd::client::{Client, ClientOptions, ConnectAddr};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NbdOptions {
    pub server: Map<String, Value>,
    pub export: Option<String>,
    pub tls_creds: Option<String>,
    pub tls_hostname: Option<String>,
    pub x_dirty_bitmap: Option<String>,
    pub reconnect_delay: Option<u64>,
    pub open_timeout: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct UnixServer {
    pub path: String,
    #[serde(rename = "abstract")]
    _abstract: Option<bool>,
    #[serde(rename = "tight")]
    _tight: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct InetServer {
    pub host: String,
    pub port: String,
    #[serde(rename = "numeric")]
    _numeric: Option<bool>,
    #[serde(rename = "to")]
    _to: Option<u16>,
    #[serde(rename = "ipv4")]
    _ipv4: Option<bool>,
    #[serde(rename = "ipv6")]
    _ipv6: Option<bool>,
    #[serde(rename = "keep-alive")]
    _keep_alive: Option<bool>,
    #[serde(rename = "mptcp")]
    _mptcp: Option<bool>,
}

/// NBD base:allocation flags.
const STATE_HOLE: u32 = 1;
const STATE_ZERO: u32 = 2;

/// One thread's connection to one nbd node, with the flag that says the node is gone.
struct Connection {
    closed: Arc<AtomicBool>,
    client: Rc<Client>,
}

thread_local! {
    /// This thread's connection per nbd node (keyed by the driver's id). Connections of
    /// nodes that were closed meanwhile are dropped on this thread's next lookup, since a
    /// connection can only be dropped on the thread that owns it.
    static CONNECTIONS: RefCell<HashMap<u64, Connection>> = RefCell::new(HashMap::new());
}

fn cached_client(id: u64) -> Option<Rc<Client>> {
    CONNECTIONS.with(|c| {
        let mut connections = c.borrow_mut();
        connections.retain(|_, conn| !conn.closed.load(Ordering::Acquire));
        connections.get(&id).map(|conn| conn.client.clone())
    })
}

fn forget_client(id: u64) {
    CONNECTIONS.with(|c| c.borrow_mut().remove(&id));
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub struct NbdDriver {
    id: u64,
    addr: ConnectAddr,
    export: String,
    filename: String,
    size: u64,
    reconnect_delay: Duration,
    /// Set when the node goes away, so every thread drops its connection on next look.
    closed: Arc<AtomicBool>,
}

impl NbdDriver {
    /// The address to connect to and the `nbd+unix://` / `nbd://` filename for reports.
    pub fn unix_addr(server: UnixServer) -> (ConnectAddr, String) {
        let filename = format!("nbd+unix://?socket={}", server.path);
        (ConnectAddr::Unix(server.path.into()), filename)
    }

    pub fn inet_addr(server: InetServer) -> Result<(ConnectAddr, String), String> {
        let port: u16 = server
            .port
            .parse()
            .map_err(|_| format!("Port '{}' is not a valid port number", server.port))?;
        let filename = format!("nbd://{}:{port}", server.host);
        Ok((
            ConnectAddr::Tcp {
                host: server.host,
                port,
            },
            filename,
        ))
    }

    /// Connect (on the calling I/O thread) and learn the export's size and flags.
    pub async fn open(
        addr: ConnectAddr,
        filename: String,
        opts: &NbdOptions,
        read_only: bool,
    ) -> Result<NbdDriver, String> {
        if opts.tls_creds.is_some() || opts.tls_hostname.is_some() {
            return Err("blockd's NBD client does not support TLS".into());
        }
        if opts.x_dirty_bitmap.is_some() {
            return Err("x-dirty-bitmap is not supported by blockd's NBD client".into());
        }
        let export = opts.export.clone().unwrap_or_default();
        let client = Client::connect(&addr, &export, &ClientOptions::default())
            .await
            .map_err(|e| format!("Failed to connect to '{filename}': {e}"))?;
        if !read_only && client.is_read_only() {
            return Err(
                "An export that is read-only on the server cannot be opened read-write".into(),
            );
        }
        let driver = NbdDriver {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            addr,
            filename: if export.is_empty() {
                filename
            } else {
                format!("{filename}/{export}")
            },
            export,
            size: client.size(),
            reconnect_delay: Duration::from_secs(opts.reconnect_delay.unwrap_or(0)),
            closed: Arc::new(AtomicBool::new(false)),
        };
        driver.remember(Rc::new(client));
        Ok(driver)
    }

    fn remember(&self, client: Rc<Client>) {
        let conn = Connection {
            closed: self.closed.clone(),
            client,
        };
        CONNECTIONS.with(|c| c.borrow_mut().insert(self.id, conn));
    }

    /// This thread's connection, opened (or reopened) on demand.
    async fn client(&self) -> io::Result<Rc<Client>> {
        if let Some(client) = cached_client(self.id) {
            return Ok(client);
        }
        let deadline = Instant::now() + self.reconnect_delay;
        loop {
            match Client::connect(&self.addr, &self.export, &ClientOptions::default()).await {
                Ok(client) => {
                    let client = Rc::new(client);
                    self.remember(client.clone());
                    return Ok(client);
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Run a request; a broken connection is forgotten so that the next request reconnects.
    async fn with_client<T, F, Fut>(&self, op: F) -> io::Result<T>
    where
        F: Fn(Rc<Client>) -> Fut,
        Fut: std::future::Future<Output = io::Result<T>>,
    {
        let client = self.client().await?;
        match op(client).await {
            Err(e) if is_disconnect(&e) => {
                forget_client(self.id);
                op(self.client().await?).await
            }
            other => other,
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

impl Drop for NbdDriver {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
        forget_client(self.id);
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
        let client = self.client().await?;
        match client.read(offset, buf).await {
            Err(e) if is_disconnect(&e) => {
                forget_client(self.id);
                self.client().await?.read(offset, buf).await
            }
            other => other,
        }
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        self.with_client(|c| async move { c.write(offset, buf, flags.fua).await })
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
        self.with_client(|c| async move { c.write_zeroes(offset, len, zero).await })
            .await
    }

    async fn discard(&self, _: &Node, offset: u64, len: u64) -> io::Result<()> {
        self.with_client(|c| async move { c.trim(offset, len, false).await })
            .await
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        self.with_client(|c| async move { c.flush().await }).await
    }

    async fn block_status(&self, _: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        let replies = self
            .with_client(|c| async move { c.block_status(offset, len, true).await })
            .await;
        let extent = match replies {
            Ok(replies) => replies
                .into_iter()
                .find_map(|(_, extents)| extents.into_iter().next()),
            // A server without base:allocation: everything is data.
            Err(e) if e.kind() == io::ErrorKind::Unsupported => None,
            Err(e) => return Err(e),
        };
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
