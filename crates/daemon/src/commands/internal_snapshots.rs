//! Internal snapshots of qcow2 nodes: blockdev-snapshot-internal-sync,
//! blockdev-snapshot-delete-internal-sync and the transaction action, with qsd's checks in
//! qsd's order and its texts. blockd has no devices, so `device` names a node, which must be
//! a root (used by no other node), as qsd requires of a node given as `device`.

use crate::daemon::Daemon;
use block::os_error_text;
use block::SnapshotInfo;
use block::{DrainedSection, Node};
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct CreateArgs {
    device: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct DeleteArgs {
    device: String,
    id: Option<String>,
    name: Option<String>,
}

/// A snapshot taken by a transaction action, deleted again if the transaction fails.
pub(super) struct TakenInternalSnapshot {
    node: Arc<Node>,
    id: String,
    name: String,
}

impl TakenInternalSnapshot {
    pub async fn undo(self, daemon: &Daemon) {
        let result = daemon
            .io
            .run(move || async move {
                self.node
                    .driver()
                    .delete_internal_snapshot(&self.node, Some(&self.id), Some(&self.name))
                    .await
            })
            .await;
        if let Err(e) = result {
            tracing::warn!("rolling back an internal snapshot: {e}");
        }
    }
}

/// The node's snapshots as it knows them (as QEMU, from the table read at open).
fn list(node: &Node) -> std::io::Result<Vec<SnapshotInfo>> {
    node.driver().internal_snapshots()
}

pub(super) async fn prepare_internal_snapshot(
    daemon: &Daemon,
    args: Map<String, Value>,
    drained: &Arc<DrainedSection>,
) -> Result<TakenInternalSnapshot, QmpError> {
    let args: CreateArgs = qapi::de::from_value(Value::Object(args))?;
    let device = args.device;
    let node = daemon.graph.lookup_root(&device)?;
    drained.add(&node).await;
    node.check_no_job()?;
    if node.read_only() {
        return Err(QmpError::generic(format!("Device '{device}' is read only")));
    }
    if !node.driver().supports_internal_snapshots() {
        return Err(QmpError::generic(format!(
            "Block format '{}' used by device '{device}' does not support internal snapshots",
            node.driver().format_name()
        )));
    }
    if args.name.is_empty() {
        return Err(QmpError::generic("Name is empty"));
    }
    let existing = list(&node).map_err(|e| {
        QmpError::generic(format!(
            "Failed to get a snapshot list: {}",
            os_error_text(&e)
        ))
    })?;
    if existing.iter().any(|s| s.name == args.name) {
        return Err(QmpError::generic(format!(
            "Snapshot with name '{}' already exists on device '{device}'",
            args.name
        )));
    }
    let name = args.name.clone();
    let target = node.clone();
    let created = daemon
        .io
        .run(move || async move {
            target
                .driver()
                .create_internal_snapshot(&target, &name)
                .await
        })
        .await
        .map_err(|e| {
            QmpError::generic(format!(
                "Failed to create snapshot '{}' on device '{device}': {}",
                args.name,
                os_error_text(&e)
            ))
        })?;
    Ok(TakenInternalSnapshot {
        node,
        id: created.id,
        name: created.name,
    })
}

pub async fn blockdev_snapshot_internal_sync(
    daemon: &Daemon,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    prepare_internal_snapshot(daemon, args, &DrainedSection::new(&daemon.graph)).await?;
    Ok(json!({}))
}

pub async fn blockdev_snapshot_delete_internal_sync(
    daemon: &Daemon,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    let args: DeleteArgs = qapi::de::from_value(Value::Object(args))?;
    let device = args.device;
    let node = daemon.graph.lookup_root(&device)?;
    if args.id.is_none() && args.name.is_none() {
        return Err(QmpError::generic("Name or id must be provided"));
    }
    node.check_no_job()?;
    let existing = list(&node).map_err(|e| {
        QmpError::generic(format!(
            "Failed to get a snapshot list: {}",
            os_error_text(&e)
        ))
    })?;
    let found = existing.iter().any(|s| {
        args.id.as_ref().is_none_or(|id| &s.id == id)
            && args.name.as_ref().is_none_or(|name| &s.name == name)
    });
    if !found {
        return Err(QmpError::generic(format!(
            "Snapshot with id '{}' and name '{}' does not exist on device '{device}'",
            args.id.as_deref().unwrap_or("null"),
            args.name.as_deref().unwrap_or("null")
        )));
    }
    let removal_failed = |e: &std::io::Error| {
        QmpError::generic(format!(
            "Failed to remove snapshot from snapshot list: {}",
            os_error_text(e)
        ))
    };
    if node.read_only() {
        return Err(removal_failed(&std::io::Error::from_raw_os_error(
            libc::EPERM,
        )));
    }
    let (id, name) = (args.id, args.name);
    let deleted = daemon
        .io
        .run(move || async move {
            node.driver()
                .delete_internal_snapshot(&node, id.as_deref(), name.as_deref())
                .await
        })
        .await
        .map_err(|e| removal_failed(&e))?;
    // Found just before, on this node; nothing else deletes snapshots in between.
    let deleted =
        deleted.ok_or_else(|| removal_failed(&std::io::Error::from_raw_os_error(libc::ENOENT)))?;
    Ok(deleted.to_json())
}
