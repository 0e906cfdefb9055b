//! QMP commands on the block graph: blockdev-add/del and the node queries.

use crate::daemon::Daemon;
use block::OptionSyntax;
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// blockdev-add, in the modern flat form or the 2.8 form wrapped in `options`.
pub async fn blockdev_add(
    daemon: &Daemon,
    mut args: Map<String, Value>,
) -> Result<Value, QmpError> {
    if args.len() == 1 {
        if let Some(Value::Object(inner)) = args.get("options") {
            args = inner.clone();
        }
    }
    daemon.add_node(args, OptionSyntax::Json).await?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct NodeNameArgs {
    node_name: String,
}

/// blockdev-del (and the 2.8 name x-blockdev-del).
pub async fn blockdev_del(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    let args: NodeNameArgs = qapi::de::from_value(Value::Object(args))?;
    let graph = daemon.graph.clone();
    daemon
        .io
        .run(move || async move { graph.del(&args.node_name).await })
        .await?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct SetActiveArgs {
    node_name: Option<String>,
    active: bool,
}

/// blockdev-set-active: hand one node (with the children only it uses) or every node over
/// to another process, or take it back (`block::active`). On an I/O thread: taking an
/// image back reads its metadata.
pub async fn blockdev_set_active(
    daemon: &Daemon,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    let args: SetActiveArgs = qapi::de::from_value(Value::Object(args))?;
    let node = match &args.node_name {
        Some(name) => Some(daemon.graph.find(name).ok_or_else(|| {
            QmpError::generic(format!("Failed to find node with node-name='{name}'"))
        })?),
        None => None,
    };
    let graph = daemon.graph.clone();
    daemon
        .io
        .run(move || async move { graph.set_active(node, args.active).await })
        .await?;
    Ok(json!({}))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct QueryNamedBlockNodesArgs {
    flat: Option<bool>,
}

pub fn query_named_block_nodes(
    daemon: &Daemon,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    let args: QueryNamedBlockNodesArgs = qapi::de::from_value(Value::Object(args))?;
    Ok(block::named_block_nodes(
        &daemon.graph,
        args.flat.unwrap_or(false),
    ))
}

pub fn query_block_graph(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    no_arguments(args)?;
    Ok(block::block_graph(&daemon.graph))
}

/// qsd has no guest devices, so there are no BlockBackends with a name to list.
pub fn query_block(args: Map<String, Value>) -> Result<Value, QmpError> {
    no_arguments(args)?;
    Ok(json!([]))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArguments {}

pub fn no_arguments(args: Map<String, Value>) -> Result<(), QmpError> {
    qapi::de::from_value::<NoArguments>(Value::Object(args)).map(|_| ())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockdevChangeArgs {
    parent: String,
    child: Option<String>,
    node: Option<String>,
}

/// x-blockdev-change: adds a child to, or removes one from, a node whose driver takes
/// children at run time (quorum), with QEMU's checks in QEMU's order; the node is drained
/// while its children change.
pub async fn x_blockdev_change(
    daemon: &Daemon,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    let args: BlockdevChangeArgs = qapi::de::from_value(Value::Object(args))?;
    let parent = daemon.graph.lookup(&args.parent)?;
    let _changing = daemon.graph.lock_changes().await;
    let changed = match (&args.child, &args.node) {
        (Some(_), Some(_)) => {
            return Err(QmpError::generic(
                "The parameters child and node are in conflict",
            ))
        }
        (None, None) => return Err(QmpError::generic("Either child or node must be specified")),
        (Some(child), None) => {
            if parent.child(child).is_none() {
                return Err(QmpError::generic(format!(
                    "Node '{}' does not have child '{child}'",
                    parent.name()
                )));
            }
            parent.drain().await;
            let removed = parent.driver().remove_child(&parent, child).await;
            parent.undrain();
            removed
        }
        (None, Some(node)) => {
            let Some(child) = daemon.graph.find(node) else {
                return Err(QmpError::generic(format!("Node '{node}' not found")));
            };
            parent.drain().await;
            let added = parent.driver().add_child(&parent, &child).await;
            parent.undrain();
            added
        }
    };
    changed.map(|()| json!({})).map_err(QmpError::generic)
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct SetIothreadArgs {
    node_name: String,
    /// StrOrNull: an iothread's id, or null for the shared I/O threads.
    iothread: Value,
    force: Option<bool>,
}

/// x-blockdev-set-iothread: pins a node, with every node connected to it, to an iothread
/// object (or back to the shared I/O threads). A node an export or job uses only moves
/// with `force`, and not past a user that must stay (`block::set_home`).
pub fn x_blockdev_set_iothread(
    daemon: &Daemon,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    let args: SetIothreadArgs = qapi::de::from_value(Value::Object(args))?;
    let node = daemon.graph.find(&args.node_name).ok_or_else(|| {
        QmpError::generic(format!(
            "Failed to find node with node-name='{}'",
            args.node_name
        ))
    })?;
    if node.has_backend() && !args.force.unwrap_or(false) {
        return Err(QmpError::generic(format!(
            "Node {} is associated with a BlockBackend and could be in use (use force=true to \
             override this check)",
            args.node_name
        )));
    }
    let home = match &args.iothread {
        Value::Null => None,
        Value::String(id) => Some(
            daemon
                .iothreads
                .get(id)
                .ok_or_else(|| QmpError::generic(format!("Cannot find iothread {id}")))?,
        ),
        _ => {
            return Err(QmpError::generic(
                "Invalid parameter type for 'iothread', expected: StrOrNull",
            ))
        }
    };
    block::set_home(&daemon.graph, &node, home.as_ref()).map_err(QmpError::generic)?;
    Ok(json!({}))
}
