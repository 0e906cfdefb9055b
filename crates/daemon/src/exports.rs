//! NBD exports: the NBD server's lifetime, block-export-* and the legacy nbd-server-add,
//! and the backend that serves a node's data to NBD clients.

use crate::commands::bitmaps::{self, BitmapRef, BusyBitmaps};
use crate::daemon::Daemon;
use crate::fuse::{AllowOther, FuseExport, FuseOptions};
use crate::vhost_user_blk::{self, VhostUserBlkExport, VhostUserBlkOptions};
use async_trait::async_trait;
use block::DirtyBitmap;
use block::{ChainExtent, WriteFlags};
use block::{Child, Node, Parent, Perms};
use block::{InetServer, UnixServer};
use nbd::backend::{Backend, Capabilities, MetaContext, StatusExtent, ZeroFlags};
use nbd::proto::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use nbd::server::{
    Authorize, ExportOptions, ListenAddr, NbdServer, ServerConfig, ServerEvent, ServerTls,
};
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::sync::{Arc, Weak};
use tokio::sync::mpsc;

/// Places each NBD connection on one of the I/O threads, round-robin.
struct IoSpawner(Arc<block::IoThreads>);

impl nbd::spawn::Spawner for IoSpawner {
    fn spawn(&self, job: nbd::Work) {
        self.0.spawn(job);
    }
}

/// Most runs of a dirty bitmap sent in one block status reply; the client asks again for
/// the rest.
const MAX_BITMAP_EXTENTS: usize = 1024;

/// Serves one node through its export's edge, so it follows the node when a job swaps it.
/// The export record owns the edge: once the export is deleted the node is free at once,
/// even while connection tasks still hold the backend.
struct NodeBackend {
    edge: Weak<Child>,
    writable: bool,
    /// The exported bitmaps by context name; they may belong to other nodes.
    bitmaps: Vec<(String, Arc<DirtyBitmap>)>,
}

impl NodeBackend {
    fn edge(&self) -> io::Result<Arc<Child>> {
        self.edge
            .upgrade()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESHUTDOWN))
    }
}

#[async_trait(?Send)]
impl Backend for NodeBackend {
    fn size(&self) -> u64 {
        self.edge().map_or(0, |edge| edge.node().size())
    }

    /// The node's iothread object, so connections are served where the node is pinned.
    fn home(&self) -> Option<Arc<dyn nbd::spawn::Spawner>> {
        let home = self.edge().ok()?.node().home()?;
        Some(home)
    }

    fn watch_home(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(block::watch_moves())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: !self.writable,
            ..Capabilities::default()
        }
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.edge()?.read(offset, buf).await
    }

    async fn read_or_zero(&self, offset: u64, buf: &mut [u8]) -> io::Result<Option<bool>> {
        self.edge()?.read_or_zero(offset, buf).await
    }

    /// Holes go through the node path too, so that throttle filters hold them and the
    /// read counters count them; reading an unallocated range costs no disk I/O.
    async fn read_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let edge = self.edge()?;
        let mut buf = aio::pool::PoolBuf::new(len.min(CHUNK) as usize, 1)?;
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(CHUNK) as usize;
            edge.read(pos, &mut buf.as_mut_slice()[..n]).await?;
            pos += n as u64;
        }
        Ok(())
    }

    async fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        let flags = WriteFlags {
            fua,
            ..WriteFlags::default()
        };
        self.edge()?.write(offset, buf, flags).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        let flags = WriteFlags {
            fua: flags.fua,
            may_unmap: flags.may_trim,
            no_fallback: flags.fast,
            ..WriteFlags::default()
        };
        self.edge()?.write_zeroes(offset, len, flags).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let edge = self.edge()?;
        edge.discard(offset, len).await?;
        if fua {
            edge.flush().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        self.edge()?.flush().await
    }

    /// Prefetch: read the range so that it is in the host's cache when the client asks.
    async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let edge = self.edge()?;
        let mut scratch = aio::pool::PoolBuf::new(CHUNK.min(len) as usize, 1)?;
        let mut pos = offset;
        while pos < offset + len {
            let n = CHUNK.min(offset + len - pos) as usize;
            edge.read(pos, &mut scratch.as_mut_slice()[..n]).await?;
            pos += n as u64;
        }
        Ok(())
    }

    async fn block_status(
        &self,
        context: &MetaContext,
        offset: u64,
        len: u64,
    ) -> io::Result<Vec<StatusExtent>> {
        if let MetaContext::DirtyBitmap(name) = context {
            return self.bitmap_status(name, offset, len);
        }
        let node = self.edge()?.node();
        let ChainExtent {
            len: run,
            zero,
            depth,
            ..
        } = node.block_status_above(None, offset, len).await?;
        let flags = match context {
            MetaContext::BaseAllocation if zero => STATE_HOLE | STATE_ZERO,
            MetaContext::BaseAllocation => 0,
            MetaContext::AllocationDepth => depth,
            MetaContext::DirtyBitmap(_) => unreachable!("answered above"),
        };
        Ok(vec![StatusExtent { length: run, flags }])
    }
}

impl NodeBackend {
    fn bitmap_status(&self, name: &str, offset: u64, len: u64) -> io::Result<Vec<StatusExtent>> {
        let bitmap = self
            .bitmaps
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let end = offset.saturating_add(len);
        let mut extents = Vec::new();
        let mut pos = offset;
        while pos < end && extents.len() < MAX_BITMAP_EXTENTS {
            let (dirty, run) = bitmap.extent(pos, end - pos);
            if run == 0 {
                break;
            }
            let flags = if dirty { STATE_DIRTY } else { 0 };
            extents.push(StatusExtent { length: run, flags });
            pos += run;
        }
        if extents.is_empty() {
            // Past the bitmap's end (the node shrank): nothing there was written.
            extents.push(StatusExtent {
                length: len,
                flags: 0,
            });
        }
        Ok(extents)
    }
}

struct Export {
    id: String,
    name: String,
    /// Holds the export's permissions on the node until the export is gone; it follows
    /// the node's replacement (mirror pivot, snapshot).
    edge: Arc<Child>,
    /// The exported bitmaps stay busy until the export is gone.
    _bitmaps: BusyBitmaps,
    shutting_down: bool,
    /// What serves an export that does not live in the NBD server.
    own: Option<OwnServer>,
}

/// An export as the metrics show it.
pub struct ExportMetrics {
    pub id: String,
    /// nbd, fuse or vhost-user-blk.
    pub kind: &'static str,
    pub node: String,
    /// Connected NBD clients (None for the other types).
    pub clients: Option<usize>,
    /// What its clients' requests asked of the node since it was added, counted where
    /// they reach the export's edge: bytes are exact, while one protocol request may count
    /// as several operations (a large NBD read in 1 MiB pieces, a trim with FUA as a
    /// discard and a flush).
    pub requests: Arc<block::NodeStats>,
}

/// An export served outside the NBD server; dropping it stops serving.
enum OwnServer {
    Fuse { _mount: FuseExport },
    VhostUserBlk { _server: VhostUserBlkExport },
}

impl OwnServer {
    fn type_name(&self) -> &'static str {
        match self {
            OwnServer::Fuse { .. } => "fuse",
            OwnServer::VhostUserBlk { .. } => "vhost-user-blk",
        }
    }
}

#[derive(Default)]
pub struct Exports {
    server: RefCell<Option<NbdServer>>,
    exports: RefCell<Vec<Export>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct NbdServerStartArgs {
    addr: SocketAddressLegacy,
    tls_creds: Option<String>,
    tls_authz: Option<String>,
    max_connections: Option<u32>,
    handshake_max_seconds: Option<u32>,
}

/// nbd-server-start's address: the old `{type, data: {...}}` shape.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct SocketAddressLegacy {
    #[serde(rename = "type")]
    kind: SocketKind,
    data: Map<String, Value>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum SocketKind {
    Unix,
    Inet,
    Vsock,
    Fd,
}

/// --nbd-server's options: the flat `addr.type=unix,addr.path=...` shape.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct NbdServerOptions {
    addr: Map<String, Value>,
    tls_creds: Option<String>,
    tls_authz: Option<String>,
    max_connections: Option<u32>,
    handshake_max_seconds: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockExportAddArgs {
    #[serde(rename = "type")]
    kind: ExportType,
    id: String,
    node_name: String,
    /// The node must stay on the export's iothread: moving it there may not fail, and
    /// nothing may move it away while the export lives.
    fixed_iothread: Option<bool>,
    /// The iothread object to serve the export from; its node (with the nodes connected
    /// to it) moves there when it can.
    iothread: Option<String>,
    writable: Option<bool>,
    writethrough: Option<bool>,
    /// Serve the node while inactive (NBD only): reads work, writes answer EPERM, and
    /// the export does not stop blockdev-set-active. Without it an inactive node is
    /// activated first.
    allow_inactive: Option<bool>,
    name: Option<String>,
    description: Option<String>,
    bitmaps: Option<Vec<BitmapRef>>,
    allocation_depth: Option<bool>,
    mountpoint: Option<String>,
    growable: Option<bool>,
    allow_other: Option<AllowOther>,
    addr: Option<Map<String, Value>>,
    logical_block_size: Option<u64>,
    num_queues: Option<u16>,
}

impl BlockExportAddArgs {
    /// The members given that belong to another type of export, as QEMU's union refuses
    /// them.
    fn foreign_members(&self) -> Option<&'static str> {
        let given = |present: bool, name| present.then_some(name);
        let nbd = given(self.name.is_some(), "name")
            .or(given(self.description.is_some(), "description"))
            .or(given(self.bitmaps.is_some(), "bitmaps"))
            .or(given(self.allocation_depth.is_some(), "allocation-depth"));
        let fuse = given(self.mountpoint.is_some(), "mountpoint")
            .or(given(self.growable.is_some(), "growable"))
            .or(given(self.allow_other.is_some(), "allow-other"));
        let vhost = given(self.addr.is_some(), "addr")
            .or(given(
                self.logical_block_size.is_some(),
                "logical-block-size",
            ))
            .or(given(self.num_queues.is_some(), "num-queues"));
        match self.kind {
            ExportType::Nbd => fuse.or(vhost),
            ExportType::Fuse => nbd.or(vhost),
            ExportType::VhostUserBlk | ExportType::VduseBlk => nbd.or(fuse),
        }
    }
}

#[derive(Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum ExportType {
    Nbd,
    VhostUserBlk,
    Fuse,
    VduseBlk,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct NbdServerAddArgs {
    device: String,
    name: Option<String>,
    description: Option<String>,
    writable: Option<bool>,
    bitmap: Option<String>,
    allocation_depth: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ExportDelArgs {
    id: String,
    mode: Option<RemoveMode>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct NbdServerRemoveArgs {
    name: String,
    mode: Option<RemoveMode>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum RemoveMode {
    Safe,
    Hard,
}

/// What every export shares with other users of its node: all but resizing.
const EXPORT_SHARED: Perms = Perms::from_bits(
    Perms::CONSISTENT_READ.bits() | Perms::WRITE.bits() | Perms::WRITE_UNCHANGED.bits(),
);

struct NewExport {
    id: String,
    name: String,
    node_name: String,
    description: Option<String>,
    writable: bool,
    bitmaps: Vec<BitmapRef>,
    allocation_depth: bool,
    /// `node_name` came as nbd-server-add's `device` (a device or a node name).
    by_device: bool,
    allow_inactive: bool,
    /// fixed-iothread: the node may not leave its thread while the export lives.
    fixed_home: bool,
}

impl Exports {
    pub fn server_start(daemon: &Rc<Daemon>, args: Map<String, Value>) -> Result<Value, QmpError> {
        let args: NbdServerStartArgs = qapi::de::from_value(Value::Object(args))?;
        let tls = server_tls(daemon, args.tls_creds.as_deref(), args.tls_authz.as_deref())?;
        let addr = match args.addr.kind {
            SocketKind::Unix => {
                let unix: UnixServer = qapi::de::from_value(Value::Object(args.addr.data))?;
                unix_addr(unix)?
            }
            SocketKind::Inet => inet_addr(args.addr.data)?,
            SocketKind::Vsock | SocketKind::Fd => {
                return Err(QmpError::generic(
                    "blockd's NBD server listens on unix or inet sockets only",
                ))
            }
        };
        Self::start(
            daemon,
            addr,
            args.max_connections,
            args.handshake_max_seconds,
            tls,
        )?;
        Ok(json!({}))
    }

    /// --nbd-server, with the flat address form.
    pub fn server_start_cli(
        daemon: &Rc<Daemon>,
        options: Value,
        keyval: bool,
    ) -> Result<(), QmpError> {
        let args: NbdServerOptions = if keyval {
            qapi::de::from_keyval(options)?
        } else {
            qapi::de::from_value(options)?
        };
        let tls = server_tls(daemon, args.tls_creds.as_deref(), args.tls_authz.as_deref())?;
        let mut addr = args.addr;
        let kind = addr.remove("type");
        let addr = match kind.as_ref().and_then(Value::as_str) {
            Some("unix") => {
                let unix: UnixServer = if keyval {
                    qapi::de::from_keyval(Value::Object(addr))?
                } else {
                    qapi::de::from_value(Value::Object(addr))?
                };
                unix_addr(unix)?
            }
            Some("inet") => inet_addr(addr)?,
            Some(other) => {
                return Err(QmpError::generic(format!(
                    "Parameter 'addr.type' does not accept value '{other}'"
                )))
            }
            None => return Err(QmpError::generic("Parameter 'addr.type' is missing")),
        };
        Self::start(
            daemon,
            addr,
            args.max_connections,
            args.handshake_max_seconds,
            tls,
        )
    }

    fn start(
        daemon: &Rc<Daemon>,
        addr: ListenAddr,
        max_connections: Option<u32>,
        handshake_max_seconds: Option<u32>,
        tls: Option<ServerTls>,
    ) -> Result<(), QmpError> {
        let exports = &daemon.exports;
        if exports.server.borrow().is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        let server = NbdServer::new(Arc::new(IoSpawner(daemon.io.clone())));
        let mut config = ServerConfig::default();
        if let Some(max) = max_connections {
            config.max_connections = max;
        }
        if let Some(secs) = handshake_max_seconds {
            config.handshake_max_seconds = secs;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        server.set_event_handler(move |event| {
            let _ = tx.send(event);
        });
        server.start(&addr, config, tls).map_err(|e| {
            QmpError::generic(match &addr {
                // The inet errors are worded as QEMU's already.
                ListenAddr::Tcp { .. } => e.to_string(),
                ListenAddr::Unix(path) => format!(
                    "Failed to bind socket to {}: {}",
                    path.display(),
                    block::os_error_text(&e)
                ),
            })
        })?;
        *exports.server.borrow_mut() = Some(server);
        tokio::task::spawn_local(Self::watch_deletions(daemon.clone(), rx));
        Ok(())
    }

    /// Export records live until the server says their last client is gone; then the
    /// node is released and BLOCK_EXPORT_DELETED goes out.
    async fn watch_deletions(daemon: Rc<Daemon>, mut rx: mpsc::UnboundedReceiver<ServerEvent>) {
        while let Some(event) = rx.recv().await {
            let ServerEvent::ExportDeleted { name } = event;
            let removed = {
                let mut exports = daemon.exports.exports.borrow_mut();
                exports
                    .iter()
                    .position(|e| e.name == name && e.shutting_down)
                    .map(|i| exports.remove(i))
            };
            if let Some(export) = removed {
                daemon
                    .events
                    .emit("BLOCK_EXPORT_DELETED", Some(json!({"id": export.id})));
            }
        }
    }

    pub fn server_stop(daemon: &Rc<Daemon>) -> Result<Value, QmpError> {
        let server = daemon
            .exports
            .server
            .borrow_mut()
            .take()
            .ok_or_else(|| QmpError::generic("NBD server not running"))?;
        for export in daemon.exports.exports.borrow_mut().iter_mut() {
            export.shutting_down |= export.own.is_none();
        }
        server.stop();
        Ok(json!({}))
    }

    pub async fn block_export_add(
        daemon: &Rc<Daemon>,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        Self::block_export_add_value(daemon, Value::Object(args), false).await
    }

    pub async fn block_export_add_value(
        daemon: &Rc<Daemon>,
        args: Value,
        keyval: bool,
    ) -> Result<Value, QmpError> {
        let args: BlockExportAddArgs = if keyval {
            qapi::de::from_keyval(args)?
        } else {
            qapi::de::from_value(args)?
        };
        if let Some(member) = args.foreign_members() {
            return Err(QmpError::generic(format!(
                "Parameter '{member}' is unexpected"
            )));
        }
        if args.kind == ExportType::VduseBlk {
            return Err(QmpError::generic(
                "blockd exports over NBD, FUSE and vhost-user-blk only",
            ));
        }
        let fixed_home = args.fixed_iothread.unwrap_or(false);
        if let Some(id) = &args.iothread {
            // QEMU finds the node before the iothread.
            let node = daemon.graph.lookup_node(&args.node_name)?;
            let iothread = daemon
                .iothreads
                .get(id)
                .ok_or_else(|| QmpError::generic(format!("iothread \"{id}\" not found")))?;
            // Without fixed-iothread an export whose node cannot move serves it where it is.
            if let Err(e) = block::set_home(&daemon.graph, &node, Some(&iothread)) {
                if fixed_home {
                    return Err(QmpError::generic(e));
                }
            }
        }
        if args.writethrough == Some(true) {
            return Err(QmpError::generic(
                "blockd does not support writethrough exports",
            ));
        }
        let allow_inactive = args.allow_inactive.unwrap_or(false);
        if allow_inactive && args.kind != ExportType::Nbd {
            return Err(QmpError::generic(
                "Export type does not support inactive exports",
            ));
        }
        if !allow_inactive {
            Self::activate_node(daemon, &args.node_name).await?;
        }
        if args.kind == ExportType::Fuse {
            let Some(mountpoint) = args.mountpoint else {
                return Err(QmpError::generic("Parameter 'mountpoint' is missing"));
            };
            let options = FuseOptions {
                mountpoint: mountpoint.into(),
                writable: args.writable.unwrap_or(false),
                growable: args.growable.unwrap_or(false),
                allow_other: args.allow_other.unwrap_or(AllowOther::Auto),
            };
            Self::add_fuse(daemon, args.id, &args.node_name, options, fixed_home)?;
            return Ok(json!({}));
        }
        if args.kind == ExportType::VhostUserBlk {
            let options = vhost_user_blk_options(&args, keyval)?;
            Self::add_vhost_user_blk(daemon, args.id, &args.node_name, options, fixed_home)?;
            return Ok(json!({}));
        }
        let bitmaps = args.bitmaps.unwrap_or_default();
        let name = args.name.unwrap_or_else(|| args.node_name.clone());
        Self::add(
            daemon,
            NewExport {
                id: args.id,
                name,
                node_name: args.node_name,
                description: args.description,
                writable: args.writable.unwrap_or(false),
                bitmaps,
                allocation_depth: args.allocation_depth.unwrap_or(false),
                by_device: false,
                allow_inactive,
                fixed_home,
            },
        )?;
        Ok(json!({}))
    }

    /// The 2.x command: the export id is its name.
    pub async fn nbd_server_add(
        daemon: &Rc<Daemon>,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        let args: NbdServerAddArgs = qapi::de::from_value(Value::Object(args))?;
        Self::activate_node(daemon, &args.device).await?;
        let name = args.name.unwrap_or_else(|| args.device.clone());
        Self::add(
            daemon,
            NewExport {
                id: name.clone(),
                name,
                node_name: args.device,
                description: args.description,
                writable: args.writable.unwrap_or(false),
                bitmaps: args.bitmap.into_iter().map(BitmapRef::Name).collect(),
                allocation_depth: args.allocation_depth.unwrap_or(false),
                by_device: true,
                allow_inactive: false,
                fixed_home: false,
            },
        )?;
        Ok(json!({}))
    }

    /// An export that needs its node active takes it back first, as QEMU's export code
    /// does; a node not found is left to the export's own lookup and its error.
    async fn activate_node(daemon: &Rc<Daemon>, node_name: &str) -> Result<(), QmpError> {
        let Some(node) = daemon.graph.find(node_name) else {
            return Ok(());
        };
        if node.is_active() {
            return Ok(());
        }
        let graph = daemon.graph.clone();
        daemon
            .io
            .run(move || async move { graph.set_active(Some(node), true).await })
            .await
    }

    fn add(daemon: &Rc<Daemon>, new: NewExport) -> Result<(), QmpError> {
        let exports = &daemon.exports;
        let server_guard = exports.server.borrow();
        let server = server_guard
            .as_ref()
            .ok_or_else(|| QmpError::generic("NBD server not running"))?;
        Self::check_new_id(daemon, &new.id)?;
        let node = if new.by_device {
            daemon.graph.lookup(&new.node_name)?
        } else {
            daemon.graph.lookup_node(&new.node_name)?
        };
        if server.exports().contains(&new.name) {
            return Err(QmpError::generic(format!(
                "NBD server already has export named '{}'",
                new.name
            )));
        }
        let perm = export_perm(new.writable);
        check_writable(&node, new.writable)?;
        let edge = user_edge(&node, perm, EXPORT_SHARED).map_err(QmpError::generic)?;
        edge.count_requests();
        if new.allow_inactive {
            edge.allow_inactive();
        }
        if new.fixed_home {
            edge.fix_home();
        }
        let bitmaps = export_bitmaps(&daemon.graph, &node, &new.bitmaps, new.writable)?;
        let backend = Arc::new(NodeBackend {
            edge: Arc::downgrade(&edge),
            writable: new.writable,
            bitmaps: bitmaps.clone(),
        });
        server
            .add_export(
                &new.name,
                new.description.as_deref(),
                backend,
                ExportOptions {
                    writable: new.writable,
                    bitmaps: bitmaps.iter().map(|(name, _)| name.clone()).collect(),
                    allocation_depth: new.allocation_depth,
                },
            )
            .map_err(|e| QmpError::generic(e.to_string()))?;
        exports.exports.borrow_mut().push(Export {
            id: new.id,
            name: new.name,
            edge,
            _bitmaps: BusyBitmaps::hold(bitmaps.into_iter().map(|(_, b)| b).collect()),
            shutting_down: false,
            own: None,
        });
        Ok(())
    }

    fn check_new_id(daemon: &Daemon, id: &str) -> Result<(), QmpError> {
        if daemon.exports.exports.borrow().iter().any(|e| e.id == id) {
            return Err(QmpError::generic(format!(
                "Block export id '{id}' is already in use"
            )));
        }
        Ok(())
    }

    /// A fuse export: the node mounted as a file over `options.mountpoint`.
    fn add_fuse(
        daemon: &Rc<Daemon>,
        id: String,
        node_name: &str,
        options: FuseOptions,
        fixed_home: bool,
    ) -> Result<(), QmpError> {
        let mut perm = export_perm(options.writable);
        if options.growable {
            perm |= Perms::RESIZE;
        }
        let io = daemon.io.clone();
        Self::add_own(daemon, id, node_name, perm, fixed_home, move |edge| {
            let mount = FuseExport::mount(&options, edge, io)?;
            Ok(OwnServer::Fuse { _mount: mount })
        })
    }

    /// A vhost-user-blk export: the node served to a vhost-user frontend.
    fn add_vhost_user_blk(
        daemon: &Rc<Daemon>,
        id: String,
        node_name: &str,
        options: VhostUserBlkOptions,
        fixed_home: bool,
    ) -> Result<(), QmpError> {
        let perm = export_perm(options.writable);
        let io = daemon.io.clone();
        Self::add_own(daemon, id, node_name, perm, fixed_home, move |edge| {
            let server = VhostUserBlkExport::start(options, edge, io)?;
            Ok(OwnServer::VhostUserBlk { _server: server })
        })
    }

    /// An export served outside the NBD server, holding `perm` on the node through its
    /// own edge, which `start` serves. Unlike an NBD export it lets others resize the node
    /// (as QEMU's do): a fuse file and a virtio-blk capacity follow the node's size.
    fn add_own(
        daemon: &Rc<Daemon>,
        id: String,
        node_name: &str,
        perm: Perms,
        fixed_home: bool,
        start: impl FnOnce(Weak<Child>) -> Result<OwnServer, String>,
    ) -> Result<(), QmpError> {
        Self::check_new_id(daemon, &id)?;
        let node = daemon.graph.lookup_node(node_name)?;
        check_writable(&node, perm.contains(Perms::WRITE))?;
        let edge = user_edge(&node, perm, Perms::ALL).map_err(QmpError::generic)?;
        edge.count_requests();
        if fixed_home {
            edge.fix_home();
        }
        let server = start(Arc::downgrade(&edge)).map_err(QmpError::generic)?;
        daemon.exports.exports.borrow_mut().push(Export {
            id: id.clone(),
            name: id,
            edge,
            _bitmaps: BusyBitmaps::hold(Vec::new()),
            shutting_down: false,
            own: Some(server),
        });
        Ok(())
    }

    pub fn block_export_del(
        daemon: &Rc<Daemon>,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        let args: ExportDelArgs = qapi::de::from_value(Value::Object(args))?;
        Self::remove(daemon, &args.id, args.mode == Some(RemoveMode::Hard))
    }

    pub fn nbd_server_remove(
        daemon: &Rc<Daemon>,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        let args: NbdServerRemoveArgs = qapi::de::from_value(Value::Object(args))?;
        Self::remove(daemon, &args.name, args.mode == Some(RemoveMode::Hard))
    }

    fn remove(daemon: &Rc<Daemon>, id: &str, hard: bool) -> Result<Value, QmpError> {
        let exports = &daemon.exports;
        // A fuse or vhost-user-blk export goes at once: a process holding the file, or a
        // frontend, gets EIO from then on. Requests already running hold the export's edge
        // until they end; like QEMU (whose export lives while requests hold it), blockd
        // reports the export deleted, and the node free, only then.
        let own = {
            let mut list = exports.exports.borrow_mut();
            list.iter()
                .position(|e| e.id == id && e.own.is_some())
                .map(|i| list.remove(i))
        };
        if let Some(export) = own {
            let edge = Arc::downgrade(&export.edge);
            drop(export);
            let (daemon, id) = (daemon.clone(), id.to_string());
            tokio::task::spawn_local(async move {
                while edge.strong_count() > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                daemon
                    .events
                    .emit("BLOCK_EXPORT_DELETED", Some(json!({"id": id})));
            });
            return Ok(json!({}));
        }
        let name = exports
            .exports
            .borrow()
            .iter()
            .find(|e| e.id == id && !e.shutting_down)
            .map(|e| e.name.clone())
            .ok_or_else(|| QmpError::generic(format!("Export '{id}' is not found")))?;
        let server_guard = exports.server.borrow();
        let Some(server) = server_guard.as_ref() else {
            return Err(QmpError::generic(format!("Export '{id}' is not found")));
        };
        if !hard && server.export_clients(&name).unwrap_or(0) > 0 {
            return Err(QmpError::generic(format!("export '{id}' still in use")));
        }
        if let Some(export) = exports.exports.borrow_mut().iter_mut().find(|e| e.id == id) {
            export.shutting_down = true;
        }
        server
            .remove_export(&name, hard)
            .map_err(|e| QmpError::generic(e.to_string()))?;
        Ok(json!({}))
    }

    pub fn query(daemon: &Rc<Daemon>) -> Value {
        Value::Array(
            daemon
                .exports
                .exports
                .borrow()
                .iter()
                .rev()
                .map(|e| {
                    json!({
                        "type": e.own.as_ref().map_or("nbd", OwnServer::type_name),
                        "id": e.id,
                        "node-name": exported_node_name(&e.edge),
                        "shutting-down": e.shutting_down,
                    })
                })
                .collect(),
        )
    }

    /// What the metrics show of each export.
    pub fn metrics(daemon: &Rc<Daemon>) -> Vec<ExportMetrics> {
        let server = daemon.exports.server.borrow();
        daemon
            .exports
            .exports
            .borrow()
            .iter()
            .map(|e| ExportMetrics {
                id: e.id.clone(),
                kind: e.own.as_ref().map_or("nbd", OwnServer::type_name),
                node: exported_node_name(&e.edge),
                clients: match (&e.own, server.as_ref()) {
                    (None, Some(server)) => server.export_clients(&e.name),
                    _ => None,
                },
                requests: e.edge.count_requests(),
            })
            .collect()
    }

    /// Disconnect every client and release every node (quit).
    pub fn shutdown(daemon: &Rc<Daemon>) {
        if let Some(server) = daemon.exports.server.borrow_mut().take() {
            server.stop();
        }
        daemon.exports.exports.borrow_mut().clear();
    }
}

/// An export's edge on its node: a user (QEMU's block-backend) holding `perm` and sharing
/// `shared`; Err is QEMU's permission-conflict text.
pub(crate) fn user_edge(
    node: &Arc<Node>,
    perm: Perms,
    shared: Perms,
) -> Result<Arc<Child>, String> {
    let user = Parent::User {
        kind: "block-backend",
        name: String::new(),
    };
    Node::attach(node, "root", user, perm, shared)
}

/// What an export takes on its node: a consistent view, and writing when writable.
fn export_perm(writable: bool) -> Perms {
    if writable {
        Perms::CONSISTENT_READ | Perms::WRITE
    } else {
        Perms::CONSISTENT_READ
    }
}

/// A writable export of a read-only node is refused before anything else, as QEMU's
/// generic export code does.
fn check_writable(node: &Node, writable: bool) -> Result<(), QmpError> {
    if writable && node.read_only() {
        return Err(QmpError::generic(
            "Cannot export read-only node as writable",
        ));
    }
    Ok(())
}

/// The node an export serves, looking through filters a job put above it.
fn exported_node_name(edge: &Child) -> String {
    let mut node = edge.node();
    while node.is_implicit() {
        match node
            .driver()
            .filtered_child_role()
            .and_then(|r| node.child(r))
        {
            Some(child) => node = child.node(),
            None => break,
        }
    }
    node.name().to_string()
}

/// Find an export's bitmaps (a bare name on the node or down its backing chain) and check
/// that they may be served: not in use elsewhere, consistent, and not still recording
/// writes to a writable node behind a read-only export.
fn export_bitmaps(
    graph: &block::Graph,
    node: &Arc<Node>,
    refs: &[BitmapRef],
    writable: bool,
) -> Result<Vec<(String, Arc<DirtyBitmap>)>, QmpError> {
    let mut found = Vec::with_capacity(refs.len());
    for r in refs {
        let (owner, bitmap) = match r {
            BitmapRef::Name(name) => find_in_chain(node, name)
                .ok_or_else(|| QmpError::generic(format!("Bitmap '{name}' is not found")))?,
            BitmapRef::Node(r) => bitmaps::lookup(graph, &r.node, &r.name)?,
        };
        bitmaps::check_bitmap(&bitmap, bitmaps::BitmapUse::Read)?;
        let name = bitmap.name().unwrap_or_default().to_string();
        if !writable && !owner.read_only() && bitmap.is_enabled() {
            return Err(QmpError::generic(format!(
                "Enabled bitmap '{name}' incompatible with readonly export"
            )));
        }
        found.push((name, bitmap));
    }
    Ok(found)
}

/// QEMU looks for an export's bitmap on the node, then down through backing files and
/// filters (but not through a raw format node).
fn find_in_chain(node: &Arc<Node>, name: &str) -> Option<(Arc<Node>, Arc<DirtyBitmap>)> {
    for n in node.chain() {
        if let Some(bitmap) = n.dirty_bitmap(name) {
            return Some((n, bitmap));
        }
        if n.driver().format_name() == "raw" {
            return None;
        }
    }
    None
}

/// nbd-server-start's `tls-creds` and `tls-authz`, with QEMU's texts. Unlike QEMU, which
/// ignores it then, `tls-authz` without `tls-creds` is refused: no client could be named,
/// so the authorization would silently not apply.
fn server_tls(
    daemon: &Daemon,
    creds: Option<&str>,
    authz: Option<&str>,
) -> Result<Option<ServerTls>, QmpError> {
    let Some(id) = creds else {
        return match authz {
            Some(_) => Err(QmpError::generic(
                "tls-authz needs tls-creds: without TLS no client is named to authorize",
            )),
            None => Ok(None),
        };
    };
    let creds = daemon.graph.tls_creds.get(id).ok_or_else(|| {
        if crate::commands::objects::object_exists(daemon, id) {
            QmpError::generic(format!("Object with id '{id}' is not TLS credentials"))
        } else {
            QmpError::generic(format!("No TLS credentials with id '{id}'"))
        }
    })?;
    if creds.endpoint() != nbd::Endpoint::Server {
        return Err(QmpError::generic(
            "Expected TLS credentials for a server endpoint",
        ));
    }
    let authorize: Option<Authorize> = authz.map(|id| {
        let registry = daemon.authz.clone();
        let id = id.to_string();
        Arc::new(move |identity: Option<&str>| {
            let authz = registry
                .get(&id)
                .ok_or_else(|| format!("No authorization object with id '{id}'"))?;
            Ok(identity.is_some_and(|name| authz.is_allowed(name)))
        }) as Authorize
    });
    Ok(Some(ServerTls { creds, authorize }))
}

fn unix_addr(unix: UnixServer) -> Result<ListenAddr, QmpError> {
    Ok(ListenAddr::Unix(
        unix.path().map_err(QmpError::generic)?.into(),
    ))
}

fn inet_addr(data: Map<String, Value>) -> Result<ListenAddr, QmpError> {
    let inet: InetServer = qapi::de::from_value(Value::Object(data))?;
    let port = inet.port_number().map_err(QmpError::generic)?;
    let options = inet.options().map_err(QmpError::generic)?;
    Ok(ListenAddr::Tcp {
        host: inet.host,
        port,
        inet: options,
    })
}

/// A vhost-user-blk export's options, checked as QEMU checks them.
fn vhost_user_blk_options(
    args: &BlockExportAddArgs,
    keyval: bool,
) -> Result<VhostUserBlkOptions, QmpError> {
    let Some(mut addr) = args.addr.clone() else {
        return Err(QmpError::generic("Parameter 'addr' is missing"));
    };
    let addr = match addr.remove("type").as_ref().and_then(Value::as_str) {
        Some("unix") => {
            let unix: UnixServer = if keyval {
                qapi::de::from_keyval(Value::Object(addr))?
            } else {
                qapi::de::from_value(Value::Object(addr))?
            };
            vhost_user_blk::Addr::Unix(unix.path().map_err(QmpError::generic)?.into())
        }
        Some("fd") => {
            let fd: FdSocket = if keyval {
                qapi::de::from_keyval(Value::Object(addr))?
            } else {
                qapi::de::from_value(Value::Object(addr))?
            };
            vhost_user_blk::Addr::Fd(
                vhost_user_blk::listening_fd(&fd.str).map_err(QmpError::generic)?,
            )
        }
        Some("inet" | "vsock") => {
            return Err(QmpError::generic(
                "Only socket address types 'unix' and 'fd' are supported",
            ))
        }
        Some(other) => {
            return Err(QmpError::generic(format!(
                "Parameter 'addr.type' does not accept value '{other}'"
            )))
        }
        None => return Err(QmpError::generic("Parameter 'addr.type' is missing")),
    };
    let num_queues = args.num_queues.unwrap_or(1);
    if num_queues == 0 {
        return Err(QmpError::generic("num-queues must be greater than 0"));
    }
    if num_queues > vhost_user_blk::MAX_QUEUES {
        return Err(QmpError::generic(format!(
            "num-queues must be at most {} in blockd",
            vhost_user_blk::MAX_QUEUES
        )));
    }
    let block_size = args.logical_block_size.unwrap_or(512);
    if !block_size.is_power_of_two() || !(512..=2 << 20).contains(&block_size) {
        return Err(QmpError::generic(
            "parameter logical-block-size must be a power of 2 between 512 and 2097152",
        ));
    }
    Ok(VhostUserBlkOptions {
        addr,
        writable: args.writable.unwrap_or(false),
        logical_block_size: block_size as u32,
        num_queues,
    })
}

/// SocketAddress of type `fd`: a file descriptor by name or number.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FdSocket {
    str: String,
}
