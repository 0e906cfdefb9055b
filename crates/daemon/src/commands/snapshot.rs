//! External snapshots: blockdev-snapshot-sync (create the overlay image) and
//! blockdev-snapshot (an overlay node added before). The overlay takes the node's place for
//! every user (an NBD export moves to it) and reads the node as its backing.

use crate::daemon::Daemon;
use block::GraphChange;
use block::{DrainedSection, Graph, Node, OptionSyntax};
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::rc::Rc;
use std::sync::Arc;

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "kebab-case")]
enum NewImageMode {
    Existing,
    AbsolutePaths,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct SnapshotSyncArgs {
    device: Option<String>,
    node_name: Option<String>,
    snapshot_file: String,
    snapshot_node_name: Option<String>,
    format: Option<String>,
    mode: Option<NewImageMode>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct SnapshotArgs {
    node: String,
    overlay: String,
}

/// Refuse a node that already has an overlay or is used by a job.
fn check_snapshot_base(graph: &Graph, node: &Node) -> Result<(), QmpError> {
    match graph.op_blocker(node) {
        Some(busy) => Err(busy),
        None => Ok(()),
    }
}

pub async fn blockdev_snapshot_sync(
    daemon: &Rc<Daemon>,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    prepare_snapshot_sync(daemon, args, &DrainedSection::new(&daemon.graph))
        .await?
        .commit();
    Ok(json!({}))
}

pub async fn blockdev_snapshot(
    daemon: &Rc<Daemon>,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    prepare_snapshot(daemon, args, &DrainedSection::new(&daemon.graph))
        .await?
        .commit();
    Ok(json!({}))
}

/// A snapshot in place, which a failing transaction can take back. Node and overlay stay
/// in the caller's drained section, so no write reaches the overlay before the transaction
/// is decided.
pub(super) struct AppliedSnapshot(GraphChange);

impl AppliedSnapshot {
    pub fn commit(self) {
        self.0.commit();
    }

    /// Users go back to the node, the overlay lets go of it, and an overlay the snapshot
    /// created is deleted.
    pub async fn undo(self, daemon: &Daemon) {
        daemon.io.run(move || self.0.abort()).await;
    }
}

pub(super) async fn prepare_snapshot_sync(
    daemon: &Rc<Daemon>,
    args: Map<String, Value>,
    drained: &Arc<DrainedSection>,
) -> Result<AppliedSnapshot, QmpError> {
    let args: SnapshotSyncArgs = qapi::de::from_value(Value::Object(args))?;
    // blockd has no devices (block backends): only node names find a node.
    let node = match (&args.device, &args.node_name) {
        (None, Some(name)) => daemon.graph.find(name),
        _ => None,
    }
    .ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='{}' nor node-name='{}'",
            args.device.as_deref().unwrap_or(""),
            args.node_name.as_deref().unwrap_or("")
        ))
    })?;
    if let Some(name) = &args.snapshot_node_name {
        if daemon.graph.find(name).is_some() {
            return Err(QmpError::generic("New overlay node-name already in use"));
        }
    }
    drained.add(&node).await;
    check_snapshot_base(&daemon.graph, &node)?;
    let format = args.format.clone().unwrap_or_else(|| "qcow2".to_string());
    if args.mode.unwrap_or(NewImageMode::AbsolutePaths) == NewImageMode::AbsolutePaths {
        super::create_image_file(
            daemon,
            &args.snapshot_file,
            &format,
            node.size(),
            Some(&node),
        )
        .await?;
    }
    let mut options = Map::new();
    if let Some(name) = &args.snapshot_node_name {
        options.insert("node-name".into(), json!(name));
    }
    options.insert("driver".into(), json!(format));
    options.insert(
        "file".into(),
        json!({"driver": "file", "filename": args.snapshot_file}),
    );
    if format == "qcow2" {
        options.insert("backing".into(), Value::Null);
    }
    let mut change = GraphChange::new(&daemon.graph);
    let drained = drained.clone();
    daemon
        .io
        .run(move || async move {
            let added = change.add(options, OptionSyntax::Json).await;
            let appended = match added {
                Ok(overlay) => append_overlay(&mut change, &node, &overlay, &drained).await,
                Err(e) => Err(e.desc),
            };
            match appended {
                Ok(()) => Ok(AppliedSnapshot(change)),
                Err(e) => {
                    change.abort().await;
                    Err(QmpError::generic(e))
                }
            }
        })
        .await
}

pub(super) async fn prepare_snapshot(
    daemon: &Rc<Daemon>,
    args: Map<String, Value>,
    drained: &Arc<DrainedSection>,
) -> Result<AppliedSnapshot, QmpError> {
    let args: SnapshotArgs = qapi::de::from_value(Value::Object(args))?;
    let node = daemon.graph.lookup(&args.node)?;
    let overlay = daemon.graph.lookup(&args.overlay)?;
    drained.add(&node).await;
    check_snapshot_base(&daemon.graph, &node)?;
    if overlay.backing().is_some() {
        return Err(QmpError::generic("The overlay already has a backing image"));
    }
    let mut change = GraphChange::new(&daemon.graph);
    let drained = drained.clone();
    daemon
        .io
        .run(move || async move {
            match append_overlay(&mut change, &node, &overlay, &drained).await {
                Ok(()) => Ok(AppliedSnapshot(change)),
                Err(e) => {
                    change.abort().await;
                    Err(QmpError::generic(e))
                }
            }
        })
        .await
}

/// Give `overlay` the backing `node`, then put it in `node`'s place for all other users.
/// `node` is in `drained` already; the overlay joins it before it takes any user.
async fn append_overlay(
    change: &mut GraphChange,
    node: &Arc<Node>,
    overlay: &Arc<Node>,
    drained: &DrainedSection,
) -> Result<(), String> {
    if !overlay.driver().supports_backing() {
        return Err("The overlay does not support backing images".into());
    }
    change.set_backing(overlay, Some(node)).await?;
    drained.add(overlay).await;
    change.replace(node, overlay).await;
    Ok(())
}
