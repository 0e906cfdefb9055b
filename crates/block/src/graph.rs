//! The block graph: which nodes exist, who owns them, and how blockdev-add options become
//! nodes (children inline or by reference, implicit backing chains, generated names).

use crate::node::{CommonOptions, DetectZeroes, Node, Parent};
use crate::open::{parse_options, prefixed, Opener};
use crate::throttle::ThrottleGroups;
use futures::future::LocalBoxFuture;
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// Every driver name QEMU 10 knows, so that a known-but-unsupported driver gets a clearer
/// error than an unknown one.
pub const QEMU_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "snapshot-access",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "io_uring",
    "iscsi",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "nvme-io_uring",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "virtio-blk-vfio-pci",
    "virtio-blk-vhost-user",
    "virtio-blk-vhost-vdpa",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Drivers the seeds name that blockd will not build, and why; blockdev-add gives the
/// reason. The first is in QEMU 10, the others are gone from QEMU itself.
pub const NOT_BUILT: &[(&str, &str)] = &[
    (
        "gluster",
        "QEMU deprecated it in 9.2 and the GlusterFS project is unmaintained",
    ),
    (
        "replication",
        "it is COLO's, which runs inside qemu-system beside a guest, not in a storage daemon",
    ),
    ("sheepdog", "removed from QEMU; the Sheepdog project ended"),
    (
        "archipelago",
        "removed from QEMU; the Archipelago project ended",
    ),
    ("vxhs", "removed from QEMU; Veritas HyperScale ended"),
];

/// Keys every driver takes (BlockdevOptionsBase); the rest belong to the driver.
const BASE_KEYS: &[&str] = &[
    "driver",
    "node-name",
    "discard",
    "cache",
    "read-only",
    "auto-read-only",
    "force-share",
    "detect-zeroes",
    "active",
];

/// Base options a child opened inline takes from its parent unless it sets them itself.
const INHERITED_KEYS: &[&str] = &[
    "read-only",
    "cache",
    "discard",
    "force-share",
    "auto-read-only",
];

#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BaseOptions {
    driver: String,
    node_name: Option<String>,
    discard: Option<DiscardOption>,
    cache: Option<CacheOptions>,
    read_only: Option<bool>,
    auto_read_only: Option<bool>,
    force_share: Option<bool>,
    detect_zeroes: Option<DetectZeroesOption>,
    active: Option<bool>,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum DiscardOption {
    Ignore,
    Unmap,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum DetectZeroesOption {
    Off,
    On,
    Unmap,
}

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct CacheOptions {
    direct: Option<bool>,
    no_flush: Option<bool>,
}

/// How option values arrive: typed JSON (QMP) or strings (command-line keyval).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionSyntax {
    /// QMP blockdev-add, or `--blockdev` given as a JSON object: values have their types.
    Json,
    /// `--blockdev driver=file,filename=...`: every scalar is a string, converted to the
    /// member's type as QEMU's keyval visitor does (`read-only=on`).
    Keyval,
}

enum Ownership {
    /// Added by blockdev-add: lives until blockdev-del.
    Monitor(Arc<Node>),
    /// Opened for a parent (inline child, implicit backing): lives as long as a parent uses it.
    Parent(Weak<Node>),
}

struct Entry {
    name: String,
    ownership: Ownership,
}

impl Entry {
    fn node(&self) -> Option<Arc<Node>> {
        match &self.ownership {
            Ownership::Monitor(node) => Some(node.clone()),
            Ownership::Parent(weak) => weak.upgrade(),
        }
    }
}

#[derive(Default)]
struct Registry {
    entries: Vec<Entry>,
    implicit_counter: u64,
}

impl Registry {
    fn find(&self, name: &str) -> Option<Arc<Node>> {
        self.entries
            .iter()
            .filter(|e| e.name == name)
            .find_map(Entry::node)
    }

    fn prune(&mut self) {
        self.entries.retain(|e| match &e.ownership {
            Ownership::Monitor(_) => true,
            Ownership::Parent(weak) => weak.strong_count() > 0,
        });
    }
}

/// The daemon's block graph: every node by name with who keeps it alive, the lock that
/// serialises graph changes, the throttle groups and the secrets. One per daemon, shared by
/// `Arc`.
#[derive(Default)]
pub struct Graph {
    registry: Mutex<Registry>,
    /// Serialises graph changes; I/O keeps running meanwhile.
    change: tokio::sync::Mutex<()>,
    /// Throttle groups by id, for throttle nodes to join.
    pub throttle_groups: ThrottleGroups,
    /// Secrets by id, for encrypted images' `key-secret`.
    pub secrets: crypto::Secrets,
    /// TLS credentials by id, for nbd nodes' and the NBD server's `tls-creds`.
    pub tls_creds: crate::Objects<nbd::TlsCreds>,
    /// Where drivers send the events they raise themselves (BLOCK_IMAGE_CORRUPTED).
    events: OnceLock<EventHook>,
}

/// Told `(event name, data)` for an event a driver raises.
pub type EventHook = Arc<dyn Fn(&str, Value) + Send + Sync>;

/// Nodes opened by one blockdev-add, registered together only if all of it succeeds.
#[derive(Default)]
pub(crate) struct Pending {
    nodes: Vec<Arc<Node>>,
    /// Names in QEMU's listing order: a node counts from when its driver opened, which for
    /// a format is after its file and before its backing chain.
    order: Vec<String>,
    /// The files of the overlays whose backing files named in their headers are being
    /// opened, outermost first: a backing file among them would open forever.
    pub(crate) backing_chain: Vec<String>,
}

impl Pending {
    pub(crate) fn find(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes.iter().find(|n| n.name() == name).cloned()
    }

    pub(crate) fn claim_position(&mut self, name: &str) {
        if !self.order.iter().any(|n| n == name) {
            self.order.push(name.to_string());
        }
    }

    /// The opened nodes in listing order.
    fn in_order(&self) -> Vec<Arc<Node>> {
        self.order
            .iter()
            .filter_map(|name| self.find(name))
            .collect()
    }
}

impl Graph {
    /// The password in the secret `id` names, with QEMU's texts when there is none or it
    /// is not text.
    pub fn password(&self, id: &str) -> Result<Arc<crypto::Secret>, String> {
        let secret = self
            .secrets
            .get(id)
            .ok_or_else(|| format!("No secret with id '{id}'"))?;
        secret.as_utf8(id)?;
        Ok(secret)
    }

    /// An empty graph.
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Where events the drivers raise go from now on; set once, before nodes open.
    pub fn set_event_hook(&self, hook: EventHook) {
        let _ = self.events.set(hook);
    }

    /// The hook set by [`Graph::set_event_hook`], for a driver to keep; None without one.
    pub fn event_hook(&self) -> Option<EventHook> {
        self.events.get().cloned()
    }

    /// The live node named `name`, None when there is none (or it is still being opened).
    /// [`Graph::lookup`] and [`Graph::lookup_node`] give QEMU's error instead.
    pub fn find(&self, name: &str) -> Option<Arc<Node>> {
        let mut registry = self.registry.lock().unwrap();
        registry.prune();
        registry.find(name)
    }

    /// Find a node for commands that take "device or node-name"; blockd has no devices.
    pub fn lookup(&self, name: &str) -> Result<Arc<Node>, QmpError> {
        self.find(name).ok_or_else(|| not_found(name, name))
    }

    /// Find a node for arguments that name a node only (`base-node`, `top-node`, an
    /// export's `node-name`): QEMU's text then leaves the device empty.
    pub fn lookup_node(&self, name: &str) -> Result<Arc<Node>, QmpError> {
        self.find(name).ok_or_else(|| not_found("", name))
    }

    /// A node that commands needing a whole disk take (QEMU's qmp_get_root_bs): one that
    /// no other node and no job uses.
    pub fn lookup_root(&self, name: &str) -> Result<Arc<Node>, QmpError> {
        let node = self.lookup(name)?;
        if !node.is_root() {
            return Err(QmpError::generic("Need a root block node"));
        }
        Ok(node)
    }

    /// All live nodes, newest first (QEMU's listing order).
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        let mut registry = self.registry.lock().unwrap();
        registry.prune();
        registry
            .entries
            .iter()
            .rev()
            .filter_map(Entry::node)
            .collect()
    }

    /// Hold this while changing the graph so changes never interleave.
    pub async fn lock_changes(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.change.lock().await
    }

    /// blockdev-add. Must run on an I/O thread: opening reads image headers.
    ///
    /// Opening waits on disks and servers (an NBD server may take its open-timeout to
    /// answer), so other graph changes go on meanwhile: only the steps that touch nodes
    /// others can see (an edge to an existing node, the registration) take the change
    /// lock, and the names are checked again when the new nodes are registered.
    pub async fn add(
        &self,
        options: Map<String, Value>,
        syntax: OptionSyntax,
    ) -> Result<Arc<Node>, QmpError> {
        let mut pending = Pending::default();
        let node = self
            .open_node(options, syntax, true, None, &mut pending)
            .await?;
        let _changing = self.change.lock().await;
        let mut registry = self.registry.lock().unwrap();
        registry.prune();
        check_names_free(&registry, &pending)?;
        for opened in &pending.in_order() {
            let ownership = if Arc::ptr_eq(opened, &node) {
                Ownership::Monitor(opened.clone())
            } else {
                Ownership::Parent(Arc::downgrade(opened))
            };
            registry.entries.push(Entry {
                name: opened.name().to_string(),
                ownership,
            });
        }
        Ok(node)
    }

    /// Open a node for a job's own use (drive-backup's target): listed like other implicit
    /// nodes, gone when the job lets go of it.
    /// Like `add`, not holding the change lock while it opens.
    pub async fn open_implicit(&self, options: Map<String, Value>) -> Result<Arc<Node>, QmpError> {
        let mut pending = Pending::default();
        let node = self
            .open_node(options, OptionSyntax::Json, false, None, &mut pending)
            .await?;
        let _changing = self.change.lock().await;
        {
            let mut registry = self.registry.lock().unwrap();
            registry.prune();
            check_names_free(&registry, &pending)?;
        }
        for opened in &pending.in_order() {
            self.register_implicit(opened);
        }
        Ok(node)
    }

    /// blockdev-del: only monitor-owned nodes nobody uses. Flushes before letting go, after
    /// the node left the registry and without the change lock: nobody can find it any
    /// more, and a flush may wait on a slow disk or server.
    pub async fn del(&self, name: &str) -> Result<(), QmpError> {
        let changing = self.change.lock().await;
        let node = {
            let mut registry = self.registry.lock().unwrap();
            registry.prune();
            let Some(index) = registry.entries.iter().position(|e| e.name == name) else {
                return Err(QmpError::generic(format!(
                    "Failed to find node with node-name='{name}'"
                )));
            };
            let entry = &registry.entries[index];
            let Ownership::Monitor(node) = &entry.ownership else {
                return Err(QmpError::generic(format!(
                    "Node {name} is not owned by the monitor"
                )));
            };
            // QEMU's order: a block backend (an export, a job's own backend), then the
            // newest operation blocker (a job, an overlay's backing edge), then any user.
            let users = node.parents();
            if users
                .iter()
                .any(|e| matches!(e.parent(), Parent::User { .. }))
            {
                return Err(QmpError::generic(format!("Node {name} is in use")));
            }
            if let Some(busy) = op_blocker(&registry, node) {
                return Err(busy);
            }
            if !users.is_empty() {
                return Err(QmpError::generic(format!("Block device {name} is in use")));
            }
            let node = node.clone();
            registry.entries.remove(index);
            node
        };
        drop(changing);
        flush_subtree(&node).await;
        // An inactive image is another process's: nothing more is written to it.
        if !node.is_active() {
            node.detach_children();
            return Ok(());
        }
        if let Err(e) = node.driver().close(&node).await {
            tracing::warn!(node = node.name(), "close failed: {e}");
        }
        node.detach_children();
        Ok(())
    }

    /// Why QEMU would refuse to remove or replace `node` (its newest operation blocker),
    /// with QEMU's text: a job working on it, or an overlay that reads it as its backing.
    pub fn op_blocker(&self, node: &Node) -> Option<QmpError> {
        let mut registry = self.registry.lock().unwrap();
        registry.prune();
        op_blocker(&registry, node)
    }

    /// Flush every node (quit, SIGTERM).
    pub async fn flush_all(&self) {
        for node in self.nodes().into_iter().filter(|n| n.is_active()) {
            if let Err(e) = node.flush().await {
                tracing::warn!(node = node.name(), "flush failed: {e}");
            }
        }
    }

    /// Let every driver write back what it keeps beside the data (quit, after `flush_all`).
    pub async fn close_images(&self) {
        for node in self.nodes().into_iter().filter(|n| n.is_active()) {
            if let Err(e) = node.driver().close(&node).await {
                tracing::warn!(node = node.name(), "close failed: {e}");
            }
        }
    }

    /// Drop every node, children after parents, releasing file locks.
    pub fn close_all(&self) {
        let entries = std::mem::take(&mut self.registry.lock().unwrap().entries);
        for entry in entries.iter().rev() {
            if let Some(node) = entry.node() {
                node.detach_children();
            }
        }
    }

    /// List a node built by a job (a filter) among the implicit nodes; it lives as long as
    /// its users keep it.
    pub fn register_implicit(&self, node: &Arc<Node>) {
        self.registry.lock().unwrap().entries.push(Entry {
            name: node.name().to_string(),
            ownership: Ownership::Parent(Arc::downgrade(node)),
        });
    }

    /// Insert `filter`, whose own child edge already points at `below`, between `below` and
    /// all of `below`'s other users. Requests in flight finish first, and those held back
    /// meanwhile go to the filter.
    pub async fn insert_filter(&self, below: &Arc<Node>, filter: &Arc<Node>) {
        // The filter joins the group of the node it sits on, on that node's thread.
        *filter.home.lock().unwrap() = below.home();
        below.drain().await;
        below.replace_in_parents(filter);
        below.undrain();
        self.register_implicit(filter);
    }

    /// Undo `insert_filter`: the filter's users go back to `below` and the filter lets go.
    pub async fn remove_filter(&self, filter: &Arc<Node>, below: &Arc<Node>) {
        filter.drain().await;
        filter.replace_in_parents(below);
        filter.undrain();
        self.retire_filter(filter);
    }

    /// A filter that left the graph drops its children and is no longer listed, even while
    /// its job still holds the node object.
    pub fn retire_filter(&self, filter: &Arc<Node>) {
        filter.detach_children();
        self.registry
            .lock()
            .unwrap()
            .entries
            .retain(|e| match &e.ownership {
                Ownership::Parent(weak) => !std::ptr::eq(weak.as_ptr(), Arc::as_ptr(filter)),
                Ownership::Monitor(_) => true,
            });
    }

    /// QEMU's shape for a node the user did not name: a counter and two random digits.
    pub fn generate_name(&self) -> String {
        let mut registry = self.registry.lock().unwrap();
        let counter = registry.implicit_counter;
        registry.implicit_counter += 1;
        let salt = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
            % 100;
        format!("#block{counter}{salt:02}")
    }

    pub(crate) fn open_node<'a>(
        &'a self,
        mut options: Map<String, Value>,
        syntax: OptionSyntax,
        root: bool,
        path: Option<&'a str>,
        pending: &'a mut Pending,
    ) -> LocalBoxFuture<'a, Result<Arc<Node>, QmpError>> {
        Box::pin(async move {
            let open_options = Value::Object(options.clone());
            let mut base_map = Map::new();
            for key in BASE_KEYS {
                if let Some(v) = options.remove(*key) {
                    base_map.insert(key.to_string(), v);
                }
            }
            let base: BaseOptions = parse_options(Value::Object(base_map), syntax, path)?;
            let driver_name = base.driver.clone();
            let not_built = NOT_BUILT.iter().find(|(name, _)| *name == driver_name);
            if !QEMU_DRIVERS.contains(&driver_name.as_str()) {
                let why = not_built.map_or(String::new(), |(_, why)| format!(" ({why})"));
                return Err(QmpError::generic(format!(
                    "Parameter '{}' does not accept value '{driver_name}'{why}",
                    prefixed(path, "driver")
                )));
            }
            if let Some((_, why)) = not_built {
                return Err(QmpError::generic(format!(
                    "Driver '{driver_name}' is not built by blockd: {why}"
                )));
            }
            let (name, implicit) = match &base.node_name {
                Some(name) => {
                    check_node_name(name)?;
                    if self.find(name).is_some() || pending.find(name).is_some() {
                        return Err(QmpError::generic(format!(
                            "Duplicate nodes with node-name='{name}'"
                        )));
                    }
                    (name.clone(), false)
                }
                None if root => {
                    return Err(QmpError::generic(
                        "'node-name' must be specified for the root node",
                    ))
                }
                None => (self.generate_name(), true),
            };
            let common = CommonOptions {
                read_only: base.read_only.unwrap_or(false),
                auto_read_only: base.auto_read_only.unwrap_or(false),
                cache_direct: base.cache.as_ref().and_then(|c| c.direct).unwrap_or(false),
                cache_no_flush: base
                    .cache
                    .as_ref()
                    .and_then(|c| c.no_flush)
                    .unwrap_or(false),
                discard_unmap: base.discard == Some(DiscardOption::Unmap),
                detect_zeroes: match base.detect_zeroes {
                    None | Some(DetectZeroesOption::Off) => DetectZeroes::Off,
                    Some(DetectZeroesOption::On) => DetectZeroes::On,
                    Some(DetectZeroesOption::Unmap) => DetectZeroes::Unmap,
                },
                force_share: base.force_share.unwrap_or(false),
                inactive: base.active == Some(false),
            };
            if common.force_share && !common.read_only {
                return Err(QmpError::generic(
                    "force-share=on can only be used with read-only images",
                ));
            }
            if common.detect_zeroes == DetectZeroes::Unmap && !common.discard_unmap {
                return Err(QmpError::generic(
                    "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
                ));
            }
            let inherited: Map<String, Value> = INHERITED_KEYS
                .iter()
                .filter_map(|k| open_options.get(*k).map(|v| (k.to_string(), v.clone())))
                .collect();
            let entry = crate::open::lookup(&driver_name).ok_or_else(|| {
                QmpError::generic(format!("Driver '{driver_name}' is not supported by blockd"))
            })?;
            // Opening writes nothing only where the driver says so, and only then may the
            // image still be another process's.
            if common.inactive && !entry.hands_over {
                return Err(QmpError::generic(crate::active::cannot_be_inactive(
                    &name,
                    &driver_name,
                )));
            }
            let mut opener = Opener {
                graph: self,
                pending,
                name: &name,
                driver_name: &driver_name,
                syntax,
                path,
                inherited: &inherited,
                format: entry.format,
                common: &common,
                children: Vec::new(),
                made_read_only: false,
            };
            let driver = (entry.open)(&mut opener, options).await?;
            let children = std::mem::take(&mut opener.children);
            let common = CommonOptions {
                read_only: common.read_only || opener.made_read_only,
                ..common
            };
            let node = Node::new(name, implicit, driver, common, open_options);
            for bitmap in node.driver().take_loaded_bitmaps() {
                node.add_dirty_bitmap(bitmap);
            }
            for child in children {
                node.add_child(child);
            }
            // What the driver takes on its children, now that it is open (as QEMU, after
            // the driver's own checks): a file another node writes is refused here.
            node.refresh_perms().map_err(QmpError::generic)?;
            pending.claim_position(node.name());
            pending.nodes.push(node.clone());
            Ok(node)
        })
    }
}

/// Refuse to register nodes whose names another open registered meanwhile.
fn check_names_free(registry: &Registry, pending: &Pending) -> Result<(), QmpError> {
    match pending
        .nodes
        .iter()
        .find(|n| !n.is_implicit() && registry.find(n.name()).is_some())
    {
        Some(taken) => Err(QmpError::generic(format!(
            "Duplicate nodes with node-name='{}'",
            taken.name()
        ))),
        None => Ok(()),
    }
}

async fn flush_subtree(node: &Arc<Node>) {
    for n in node.subtree().into_iter().filter(|n| n.is_active()) {
        if let Err(e) = n.flush().await {
            tracing::warn!(node = n.name(), "flush failed: {e}");
        }
    }
}

fn op_blocker(registry: &Registry, node: &Node) -> Option<QmpError> {
    let reason = node
        .parents()
        .iter()
        .rev()
        .find_map(|edge| match edge.parent() {
            Parent::Job { job_type, .. } => Some(crate::node::job_blocker(job_type)),
            // A filter's data child is no backing file (a job's mirror_top reads `backing`).
            Parent::Node(parent) if edge.role() == "backing" => {
                let filter = registry
                    .find(parent)
                    .is_some_and(|p| p.driver().filtered_child_role() == Some("backing"));
                (!filter).then(|| format!("node is used as backing hd of '{parent}'"))
            }
            _ => None,
        })?;
    Some(crate::node::busy_error(node.name(), &reason))
}

fn not_found(device: &str, node_name: &str) -> QmpError {
    QmpError::generic(format!(
        "Cannot find device='{device}' nor node-name='{node_name}'"
    ))
}

/// QEMU's rules: a letter first, then letters, digits, '-', '.', '_'; at most 31 bytes.
fn check_node_name(name: &str) -> Result<(), QmpError> {
    let mut chars = name.chars();
    let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !well_formed {
        return Err(QmpError::generic(format!("Invalid node-name: '{name}'")));
    }
    if name.len() >= 32 {
        return Err(QmpError::generic("Node name too long"));
    }
    Ok(())
}

/// QEMU's `json:{...}` filename for nodes whose own options say more than a plain name.
pub fn json_filename(node: &Node, plain: &str) -> String {
    let own = own_options(node);
    if own.keys().all(|k| k == "driver") {
        plain.to_string()
    } else {
        full_json_filename(node)
    }
}

/// The `json:{...}` filename, for nodes a plain name cannot describe (an image whose backing
/// node is not the one its header names).
pub fn full_json_filename(node: &Node) -> String {
    format!(
        "json:{}",
        qapi::json::to_string(&Value::Object(full_options(node, &mut Vec::new())))
    )
}

/// The `json:{...}` filename QEMU gives a node whose driver names its strong options (those
/// that change what the node reads, as qcow2's `encrypt.key-secret`): the driver, those of
/// `strong` (dotted keys) it was opened with, and its children but the backing node the
/// image's header names (an overridden backing needs [`full_json_filename`]).
pub fn strong_json_filename(node: &Node, strong: &[&str]) -> String {
    let roles: Vec<String> = node
        .children()
        .iter()
        .map(|c| c.role().to_string())
        .filter(|role| role != "backing")
        .collect();
    let mut options = full_options(node, &mut Vec::new());
    options.retain(|k, _| k == "driver" || strong.contains(&k.as_str()) || roles.contains(k));
    format!("json:{}", qapi::json::to_string(&Value::Object(options)))
}

/// The options a node was opened with, less those every node takes and its children.
fn own_options(node: &Node) -> Map<String, Value> {
    let Value::Object(options) = node.open_options() else {
        return Map::new();
    };
    let children: Vec<String> = node
        .children()
        .iter()
        .map(|c| c.role().to_string())
        .collect();
    options
        .iter()
        .filter(|(k, _)| !BASE_KEYS.contains(&k.as_str()) || k.as_str() == "driver")
        .filter(|(k, _)| !children.iter().any(|c| c == *k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// What QEMU puts in a `json:` filename: the own options flattened to dotted keys, and
/// every child by its own full options. `path` holds the nodes above: a child already on it
/// (a cycle, which `Node::attach` prevents) is named instead of described again.
fn full_options(node: &Node, path: &mut Vec<*const Node>) -> Map<String, Value> {
    // QEMU flattens the options when it opens the node and copies them again when it
    // builds the filename, each time walking its dictionaries in their own order: that
    // decides the order of members that share a hash bucket, so do the same two walks.
    let own = own_options(node);
    let mut flat = Map::new();
    for (key, value) in qapi::json::qdict_order(&own) {
        flatten_into(&mut flat, key, value.clone());
    }
    let mut out: Map<String, Value> = qapi::json::qdict_order(&flat)
        .into_iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    path.push(node);
    for child in node.children() {
        let child_node = child.node();
        let value = if path.contains(&Arc::as_ptr(&child_node)) {
            json!(child_node.name())
        } else {
            Value::Object(full_options(&child_node, path))
        };
        out.insert(child.role().to_string(), value);
    }
    path.pop();
    out
}

fn flatten_into(out: &mut Map<String, Value>, key: &str, value: Value) {
    match value {
        Value::Object(map) => {
            for (k, v) in qapi::json::qdict_order(&map) {
                flatten_into(out, &format!("{key}.{k}"), v.clone());
            }
        }
        Value::Array(items) => {
            for (i, v) in items.into_iter().enumerate() {
                flatten_into(out, &format!("{key}.{i}"), v);
            }
        }
        scalar => {
            out.insert(key.to_string(), scalar);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_follow_qemu_rules() {
        assert!(check_node_name("disk0").is_ok());
        assert!(check_node_name("a.b-c_d").is_ok());
        assert_eq!(
            check_node_name("1bad").unwrap_err().desc,
            "Invalid node-name: '1bad'"
        );
        assert_eq!(
            check_node_name("#block1").unwrap_err().desc,
            "Invalid node-name: '#block1'"
        );
        assert_eq!(
            check_node_name("").unwrap_err().desc,
            "Invalid node-name: ''"
        );
        assert_eq!(
            check_node_name(&"a".repeat(32)).unwrap_err().desc,
            "Node name too long"
        );
        assert!(check_node_name(&"a".repeat(31)).is_ok());
    }
}
