//! Opening a node: the registry of drivers, and the [`Opener`] a driver's open function is
//! handed to parse its options and open its own children, as QEMU's drivers call
//! bdrv_open_child.
//!
//! Adding a driver is one module with an open function and one line in [`DRIVERS`].
//! Everything an open creates is recorded in the graph's pending set and registered only
//! if the whole blockdev-add succeeds; a failure drops it all.

use crate::drivers::{
    blkdebug, blklogwrites, blkverify, bochs, cbw, cloop, compress, dmg, file, ftp, http, luks,
    nbd, null, parallels, preallocate, qcow, qcow2, qed, quorum, raw, rbd, ssh, throttle, vdi,
    vhdx, vmdk, vpc,
};
use crate::graph::{Graph, OptionSyntax, Pending};
use crate::node::{Child, CommonOptions, Driver, Node, Parent};
use crate::perm::Perms;
use crate::throttle::ThrottleGroup;
use futures::future::LocalBoxFuture;
use qapi::error::QmpError;
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::Arc;

/// Backing files named by image headers that one open follows at most: deeper chains
/// (or loops spelled with different paths) would exhaust the I/O thread's stack.
const MAX_BACKING_CHAIN: usize = 512;

/// How a driver opens: it gets its own options (the common ones taken out) and returns the
/// driver, its children opened through the `Opener`.
pub type OpenFn = for<'a, 'b> fn(
    &'a mut Opener<'b>,
    Map<String, Value>,
) -> LocalBoxFuture<'a, Result<Box<dyn Driver>, QmpError>>;

/// One registered driver.
pub struct DriverEntry {
    /// The `driver` values it serves (`file` and `host_device` share one).
    pub names: &'static [&'static str],
    /// An image format (QEMU's `is_format`): its data children default to
    /// `discard=unmap`, since the format itself decides which discards reach them.
    pub format: bool,
    /// Its nodes can be inactive (blockdev-set-active, blockdev-add's `active`): it keeps
    /// nothing in memory it cannot read anew from the image, and opening writes nothing.
    pub hands_over: bool,
    pub open: OpenFn,
}

/// Every driver blockd has. The schema's BlockdevDriver lists exactly these (a test in the
/// daemon checks it).
pub const DRIVERS: &[DriverEntry] = &[
    file::DRIVER,
    null::DRIVER,
    raw::DRIVER,
    qcow2::DRIVER,
    qcow::DRIVER,
    qed::DRIVER,
    luks::DRIVER,
    vdi::DRIVER,
    vpc::DRIVER,
    vmdk::DRIVER,
    vhdx::DRIVER,
    parallels::DRIVER,
    bochs::DRIVER,
    cloop::DRIVER,
    dmg::DRIVER,
    blkdebug::DRIVER,
    nbd::DRIVER,
    rbd::DRIVER,
    http::DRIVER,
    ftp::DRIVER,
    ssh::DRIVER,
    cbw::DRIVER,
    cbw::SNAPSHOT_ACCESS,
    throttle::DRIVER,
    compress::DRIVER,
    blklogwrites::DRIVER,
    blkverify::DRIVER,
    preallocate::DRIVER,
    quorum::DRIVER,
];

/// The names of all registered drivers.
pub fn driver_names() -> impl Iterator<Item = &'static str> {
    DRIVERS.iter().flat_map(|d| d.names.iter().copied())
}

pub(crate) fn lookup(name: &str) -> Option<&'static DriverEntry> {
    DRIVERS.iter().find(|d| d.names.contains(&name))
}

/// What a driver's open function works with: its node's name and common options, the
/// option syntax, and the graph to open children in.
pub struct Opener<'b> {
    pub(crate) graph: &'b Graph,
    pub(crate) pending: &'b mut Pending,
    pub(crate) name: &'b str,
    pub(crate) driver_name: &'b str,
    pub(crate) syntax: OptionSyntax,
    /// Where this node's options sit inside the blockdev-add (`file`, `backing.file`), for
    /// error texts; None for the root.
    pub(crate) path: Option<&'b str>,
    /// Options a child inherits when it does not set them (QEMU's inherited options).
    pub(crate) inherited: &'b Map<String, Value>,
    /// This node's driver is an image format ([`DriverEntry::format`]).
    pub(crate) format: bool,
    pub(crate) common: &'b CommonOptions,
    pub(crate) children: Vec<Arc<Child>>,
    /// The driver can only read, and the node opens read-only under `auto-read-only`.
    pub(crate) made_read_only: bool,
}

impl Opener<'_> {
    /// The `driver` value this node was opened with.
    pub fn driver_name(&self) -> &str {
        self.driver_name
    }

    pub fn common(&self) -> &CommonOptions {
        self.common
    }

    /// Whether opening may write to the image (a repair, a log replay): not read-only, and
    /// not opened inactive, when the image is still another process's until `activate`.
    pub fn may_write(&self) -> bool {
        !self.common.read_only && !self.common.inactive
    }

    /// For a driver that cannot write (QEMU's bdrv_apply_auto_read_only): a read-only node
    /// is fine, an `auto-read-only` one becomes read-only, and a writable one is refused
    /// with `why`.
    pub fn only_read(&mut self, why: &str) -> Result<(), QmpError> {
        if self.common.read_only {
            return Ok(());
        }
        if !self.common.auto_read_only {
            return Err(QmpError::generic(why));
        }
        self.made_read_only = true;
        Ok(())
    }

    /// The text of secret `id`, for a password or a cookie (QEMU's
    /// qcrypto_secret_lookup_as_utf8).
    pub fn secret_text(&self, id: &str) -> Result<String, QmpError> {
        let secret = self
            .graph
            .secrets
            .get(id)
            .ok_or_else(|| QmpError::generic(format!("No secret with id '{id}'")))?;
        String::from_utf8(secret.bytes().to_vec())
            .map_err(|_| QmpError::generic(format!("Data from secret {id} is not valid UTF-8")))
    }

    /// The syntax the options came in, for a driver that types an untyped member itself.
    pub fn syntax(&self) -> OptionSyntax {
        self.syntax
    }

    /// Where events this node's driver raises go (see [`crate::Graph::set_event_hook`]).
    pub fn event_hook(&self) -> Option<crate::EventHook> {
        self.graph.event_hook()
    }

    /// Deserialize the driver's options with QEMU's texts, members named by their path.
    pub fn parse<T: DeserializeOwned>(&self, options: Map<String, Value>) -> Result<T, QmpError> {
        parse_options(Value::Object(options), self.syntax, self.path)
    }

    /// Like `parse`, for the options of a member (`server` of nbd).
    pub fn parse_member<T: DeserializeOwned>(
        &self,
        options: Map<String, Value>,
        member: &str,
    ) -> Result<T, QmpError> {
        parse_options(
            Value::Object(options),
            self.syntax,
            Some(&prefixed(self.path, member)),
        )
    }

    /// `member` with this node's path in front, as QEMU names it in texts.
    pub fn member_path(&self, member: &str) -> String {
        prefixed(self.path, member)
    }

    /// A "Parameter 'x' ..." text about one of this node's members, its path put in.
    pub fn qualify(&self, desc: String) -> QmpError {
        QmpError::generic(match self.path {
            Some(path) => qualify_member(&desc, path),
            None => desc,
        })
    }

    /// Take the reference of a child the driver requires.
    pub fn take_child_ref(
        &self,
        options: &mut Map<String, Value>,
        role: &str,
    ) -> Result<Value, QmpError> {
        options.remove(role).ok_or_else(|| {
            QmpError::generic(format!(
                "Parameter '{}' is missing",
                prefixed(self.path, role)
            ))
        })
    }

    /// Open the `file` child of a driver whose other options are all taken out already
    /// (QEMU's BlockdevOptionsGenericFormat, less `backing` where the driver has one):
    /// any option left is refused.
    pub async fn open_file_only(
        &mut self,
        options: Map<String, Value>,
    ) -> Result<Arc<Child>, QmpError> {
        let file_ref = self.take_file_only(options)?;
        self.open_child(file_ref, "file", Perms::NONE, Perms::ALL)
            .await
    }

    /// The `file` reference of [`Opener::open_file_only`], for a driver with a check to
    /// make between the options and opening the file.
    pub fn take_file_only(&self, mut options: Map<String, Value>) -> Result<Value, QmpError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct NoOptions {}
        let file_ref = self.take_child_ref(&mut options, "file")?;
        let _: NoOptions = self.parse(options)?;
        Ok(file_ref)
    }

    /// A node by name: one the graph has, or one this blockdev-add opened already.
    pub fn find_node(&self, name: &str) -> Option<Arc<Node>> {
        self.pending.find(name).or_else(|| self.graph.find(name))
    }

    pub fn throttle_group(&self, name: &str) -> Option<Arc<ThrottleGroup>> {
        self.graph.throttle_groups.get(name)
    }

    /// The password in the secret `id` names ([`Graph::password`]).
    pub fn password(&self, id: &str) -> Result<Arc<crypto::Secret>, QmpError> {
        self.graph.password(id).map_err(QmpError::generic)
    }

    /// The node counts from now in QEMU's listing order (a format after its file, before
    /// its backing chain).
    pub fn claim_position(&mut self) {
        self.pending.claim_position(self.name);
    }

    /// Open (inline options) or find (a node name) the child in `role` and attach it with
    /// these permissions; it becomes one of the node's children.
    pub async fn open_child(
        &mut self,
        reference: Value,
        role: &str,
        perm: Perms,
        shared: Perms,
    ) -> Result<Arc<Child>, QmpError> {
        // An edge to a node others can see is a graph change: no blockdev-del or reopen
        // may come between finding the node and attaching to it.
        let mut changing = None;
        let target = match reference {
            Value::String(name) => match self.pending.find(&name) {
                Some(node) => node,
                None => {
                    changing = Some(self.graph.lock_changes().await);
                    self.graph.find(&name).ok_or_else(|| {
                        QmpError::generic(format!(
                            "Cannot find device='{name}' nor node-name='{name}'"
                        ))
                    })?
                }
            },
            Value::Object(mut child_options) => {
                if self.format && role != "backing" {
                    // QEMU's rule: not the parent's discard mode but unmap, as the format
                    // passes on only the discards it means (qcow2's pass-discard-*).
                    child_options
                        .entry("discard".to_string())
                        .or_insert(json!("unmap"));
                }
                for (key, value) in self.inherited {
                    child_options.entry(key.clone()).or_insert(value.clone());
                }
                let child_path = prefixed(self.path, role);
                self.graph
                    .open_node(
                        child_options,
                        self.syntax,
                        false,
                        Some(&child_path),
                        self.pending,
                    )
                    .await?
            }
            _ => {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for '{}', expected: BlockdevRef",
                    prefixed(self.path, role)
                )))
            }
        };
        let edge = Node::attach_to(
            &target,
            role,
            Parent::Node(self.name.to_string()),
            !self.common.inactive,
            perm,
            shared,
        )
        .map_err(QmpError::generic)?;
        drop(changing);
        self.children.push(edge.clone());
        Ok(edge)
    }

    /// Open the backing file an image header names, read-only and implicit, relative to
    /// the overlay's file, in the format the header names (else probed), and make it the
    /// node's backing child.
    pub async fn open_backing_from_header(
        &mut self,
        overlay_file: &Arc<Node>,
        backing_file: &str,
        backing_format: Option<&str>,
    ) -> Result<Arc<Child>, QmpError> {
        let overlay_filename = overlay_file.driver().info(overlay_file).filename;
        let path = resolve_backing_path(&overlay_filename, backing_file);
        // Images that name each other as backing files (crafted, or a rebase gone wrong)
        // would open each other until the stack ran out.
        let chain = &self.pending.backing_chain;
        if path == overlay_filename || chain.contains(&path) {
            return Err(QmpError::generic(format!(
                "Backing file '{backing_file}' creates an infinite loop"
            )));
        }
        if chain.len() >= MAX_BACKING_CHAIN {
            return Err(QmpError::generic(format!(
                "The backing chain of '{overlay_filename}' is longer than {MAX_BACKING_CHAIN} images"
            )));
        }
        let format = match backing_format {
            Some(format) => format.to_string(),
            None => probe_format(&path),
        };
        let options = json!({
            "driver": format,
            "read-only": true,
            "file": {"driver": "file", "filename": path},
        });
        let Value::Object(options) = options else {
            unreachable!("json! object literal")
        };
        self.pending.backing_chain.push(overlay_filename);
        let target = self
            .graph
            .open_node(options, OptionSyntax::Json, false, None, self.pending)
            .await;
        self.pending.backing_chain.pop();
        let target = target
            .map_err(|e| QmpError::generic(format!("Could not open backing file: {}", e.desc)))?;
        let edge = Node::attach_to(
            &target,
            "backing",
            Parent::Node(self.name.to_string()),
            !self.common.inactive,
            Perms::NONE,
            Perms::ALL,
        )
        .map_err(QmpError::generic)?;
        self.children.push(edge.clone());
        Ok(edge)
    }
}

pub(crate) fn prefixed(path: Option<&str>, key: &str) -> String {
    match path {
        Some(path) => format!("{path}.{key}"),
        None => key.to_string(),
    }
}

/// Deserialize driver options with QEMU's error texts, naming nested members by their path.
pub(crate) fn parse_options<T: DeserializeOwned>(
    value: Value,
    syntax: OptionSyntax,
    path: Option<&str>,
) -> Result<T, QmpError> {
    let result = match syntax {
        OptionSyntax::Json => qapi::de::from_value(value),
        OptionSyntax::Keyval => qapi::de::from_keyval(value),
    };
    result.map_err(|e| match path {
        Some(path) => QmpError {
            desc: qualify_member(&e.desc, path),
            ..e
        },
        None => e,
    })
}

/// Turn "Parameter 'x' ..." into "Parameter 'path.x' ..." for members of an inline child.
fn qualify_member(desc: &str, path: &str) -> String {
    match desc.find('\'') {
        Some(start) => format!("{}{path}.{}", &desc[..=start], &desc[start + 1..]),
        None => desc.to_string(),
    }
}

/// A relative backing name is relative to the directory of the overlay's file.
pub(crate) fn resolve_backing_path(overlay_filename: &str, backing: &str) -> String {
    if Path::new(backing).is_absolute() {
        return backing.to_string();
    }
    match Path::new(overlay_filename).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            dir.join(backing).to_string_lossy().into_owned()
        }
        _ => backing.to_string(),
    }
}

/// The format of a backing file whose overlay does not name it, by its first bytes as
/// QEMU probes: qcow (version 1) or qcow2, qed, vdi, vhdx, vpc, vmdk, parallels, luks; else
/// raw.
pub(crate) fn probe_format(path: &str) -> String {
    use std::io::Read;
    let mut head = Vec::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(512).read_to_end(&mut head);
    }
    head.resize(512, 0);
    let format = if &head[..4] == b"QFI\xfb" {
        match u32::from_be_bytes([head[4], head[5], head[6], head[7]]) {
            1 => "qcow",
            _ => "qcow2",
        }
    } else if &head[..4] == b"QED\0" {
        "qed"
    } else if head[64..68] == 0xbeda_107fu32.to_le_bytes() {
        "vdi"
    } else if &head[..4] == b"KDMV"
        || &head[..4] == b"COWD"
        || head.starts_with(b"# Disk DescriptorFile")
    {
        "vmdk"
    } else if &head[..16] == b"WithoutFreeSpace" || &head[..16] == b"WithouFreSpacExt" {
        "parallels"
    } else if &head[..8] == b"vhdxfile" {
        "vhdx"
    } else if &head[..8] == b"conectix" {
        "vpc"
    } else if &head[..6] == crypto::luks::MAGIC {
        "luks"
    } else {
        "raw"
    };
    format.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_paths_are_relative_to_the_overlay() {
        assert_eq!(
            resolve_backing_path("top.qcow2", "base.qcow2"),
            "base.qcow2"
        );
        assert_eq!(
            resolve_backing_path("/d/top.qcow2", "base.qcow2"),
            "/d/base.qcow2"
        );
        assert_eq!(resolve_backing_path("/d/top.qcow2", "/e/base"), "/e/base");
    }

    #[test]
    fn nested_members_are_qualified() {
        assert_eq!(
            qualify_member("Parameter 'filename' is missing", "file"),
            "Parameter 'file.filename' is missing"
        );
        assert_eq!(
            qualify_member(
                "Invalid parameter type for 'size', expected: integer",
                "file"
            ),
            "Invalid parameter type for 'file.size', expected: integer"
        );
    }

    #[test]
    fn every_name_is_registered_once() {
        let mut names: Vec<&str> = driver_names().collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count);
    }
}
