//! block_resize: grow or shrink the image of a node, under QEMU's checks and permissions.

use crate::daemon::Daemon;
use block::os_error_text;
use block::{Node, Parent, Perms};
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockResizeArgs {
    device: Option<String>,
    node_name: Option<String>,
    size: i64,
}

/// How QEMU names the short-lived user a resize goes through.
const RESIZER: &str = "an unnamed block device";

pub async fn block_resize(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    let args: BlockResizeArgs = qapi::de::from_value(Value::Object(args))?;
    let graph = &daemon.graph;
    let _changes = graph.lock_changes().await;
    // blockd has no named block devices, so only node-name can find anything; QEMU still
    // names both in its message.
    let node = args
        .node_name
        .as_deref()
        .and_then(|name| graph.find(name))
        .ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{}' nor node-name='{}'",
                args.device.as_deref().unwrap_or(""),
                args.node_name.as_deref().unwrap_or("")
            ))
        })?;
    if let Some(job_type) = blocking_job(&node) {
        return Err(block::busy_error(
            node.name(),
            &block::job_blocker(job_type),
        ));
    }
    let size = u64::try_from(args.size)
        .map_err(|_| QmpError::generic("Parameter 'size' expects a >0 size"))?;
    check_resize_shared(&node)?;
    if node.read_only() {
        return Err(QmpError::generic("Image is read-only"));
    }
    if node.driver().format_name() == "qcow2" && size % 512 != 0 {
        return Err(QmpError::generic("The new size must be a multiple of 512"));
    }
    // Held while the image changes size: it takes the resize lock byte of the file too.
    let edge = Node::attach(
        &node,
        "root",
        Parent::User {
            kind: "block-backend",
            name: String::new(),
        },
        Perms::RESIZE,
        Perms::ALL,
    )
    .map_err(QmpError::generic)?;
    let result = {
        let node = node.clone();
        daemon
            .io
            .run(move || async move {
                node.truncate(size).await?;
                node.flush().await
            })
            .await
    };
    drop(edge);
    result.map_err(|e| QmpError::generic(os_error_text(&e)))?;
    Ok(json!({}))
}

/// The job that forbids resizing the node, as QEMU's operation blockers do: every node a
/// job works on except a backup's source, which QEMU guards by permissions only (through
/// the copy-before-write filter above it).
fn blocking_job(node: &Node) -> Option<&'static str> {
    node.parents().iter().find_map(|edge| match edge.parent() {
        Parent::Job { job_type, .. } if !(*job_type == "backup" && edge.role() == "main node") => {
            Some(*job_type)
        }
        _ => None,
    })
}

/// QEMU's refusal when a user of the node does not let others resize it.
fn check_resize_shared(node: &Arc<Node>) -> Result<(), QmpError> {
    match node
        .parents()
        .into_iter()
        .find(|other| !other.shared().contains(Perms::RESIZE))
    {
        Some(other) => Err(QmpError::generic(format!(
            "Permission conflict on node '{name}': permissions 'resize' are both required by {RESIZER} (uses node '{name}' as 'root' child) and unshared by {}.",
            other.describe_user(),
            name = node.name()
        ))),
        None => Ok(()),
    }
}
