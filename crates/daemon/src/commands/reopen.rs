//! blockdev-reopen: switch a set of nodes between read-only and read-write at once, all or
//! nothing. The other options must keep their values (QEMU's "Cannot change the option").

use crate::daemon::Daemon;
use block::GraphChange;
use block::{Graph, Node, Parent, Perms};
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReopenArgs {
    options: Vec<Map<String, Value>>,
}

/// Options every reopen may carry whatever the node was opened with.
const HANDLED: &[&str] = &["driver", "node-name", "read-only", "file", "backing"];

struct Change {
    node: Arc<Node>,
    writable: bool,
}

pub async fn blockdev_reopen(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    let args: ReopenArgs = qapi::de::from_value(Value::Object(args))?;
    let graph = &daemon.graph;
    let _changes = graph.lock_changes().await;
    let mut changes: Vec<Change> = Vec::new();
    for (index, options) in args.options.iter().enumerate() {
        let name = match options.get("node-name") {
            Some(Value::String(name)) => name,
            _ => return Err(QmpError::generic("node-name not specified")),
        };
        let node = graph.find(name).ok_or_else(|| {
            QmpError::generic(format!("Failed to find node with node-name='{name}'"))
        })?;
        check_backing(graph, &node, options)?;
        check_unchanged(&node, options, index)?;
        let writable = match options.get("read-only") {
            Some(Value::Bool(read_only)) => !read_only,
            None => true,
            Some(_) => {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for 'options[{index}].read-only', expected: boolean"
                )))
            }
        };
        changes.push(Change { node, writable });
    }
    let writable_after = |node: &Arc<Node>| {
        changes
            .iter()
            .find(|c| Arc::ptr_eq(&c.node, node))
            .map_or(!node.read_only(), |c| c.writable)
    };
    for change in &changes {
        let node = &change.node;
        if change.writable {
            // A child must be writable only where the node, once writable, writes to it
            // (a qcow2 node always does; a raw node only for its own writers).
            let (perm, shared) = node.cumulative_perms();
            let children_writable = node.children().iter().all(|c| {
                let (wanted, _) = node.driver().child_perms(c.role(), perm, shared, false);
                !wanted.intersects(Perms::WRITE | Perms::RESIZE) || writable_after(&c.node())
            });
            if !children_writable {
                return Err(QmpError::generic("Block node is read-only"));
            }
        } else {
            let writer = node.parents().into_iter().find(|edge| {
                let parent_stays_writable = match edge.parent() {
                    Parent::Node(parent) => graph.find(parent).is_none_or(|p| writable_after(&p)),
                    Parent::User { .. } | Parent::Job { .. } => true,
                };
                edge.perm().intersects(Perms::WRITE | Perms::RESIZE) && parent_stays_writable
            });
            if writer.is_some() {
                return Err(QmpError::generic(format!(
                    "Read-only block node '{}' cannot support read-write users",
                    node.name()
                )));
            }
        }
    }
    let changes: Vec<(Arc<Node>, bool)> = changes
        .into_iter()
        .filter(|c| c.node.read_only() == c.writable)
        .map(|c| (c.node, c.writable))
        .collect();
    let graph = graph.clone();
    daemon
        .io
        .run(move || async move { apply(&graph, changes).await })
        .await
        .map_err(QmpError::generic)?;
    Ok(json!({}))
}

/// Nodes becoming read-only first (a parent before the nodes below it, as listed), then
/// those becoming writable, as one graph change: on a failure, every node already switched
/// goes back.
async fn apply(graph: &Arc<Graph>, mut changes: Vec<(Arc<Node>, bool)>) -> Result<(), String> {
    changes.sort_by_key(|(_, writable)| *writable);
    let (change, ()) = GraphChange::apply(graph, async |change: &mut GraphChange| {
        for (node, writable) in &changes {
            change.set_writable(node, *writable).await?;
        }
        Ok::<_, String>(())
    })
    .await?;
    change.commit();
    Ok(())
}

/// QEMU checks the `backing` option before any other: a node that has a backing child
/// must name it (or another one), the new one must exist, must not close a cycle, and a
/// job's frozen chain keeps its link. blockd does not switch backing nodes here; the
/// other options' check refuses a change that passes these.
fn check_backing(
    graph: &block::Graph,
    node: &Arc<Node>,
    options: &Map<String, Value>,
) -> Result<(), QmpError> {
    let current = node.backing();
    let wanted = match options.get("backing") {
        None if current.is_some() => {
            return Err(QmpError::generic(format!(
                "backing is missing for '{}'",
                node.name()
            )))
        }
        Some(Value::String(name)) => Some(graph.lookup_node(name)?),
        _ => None,
    };
    let unchanged = match (&wanted, &current) {
        (Some(w), Some(c)) => Arc::ptr_eq(w, c),
        (None, None) => true,
        _ => false,
    };
    if unchanged {
        return Ok(());
    }
    if let Some(new_backing) = &wanted {
        if new_backing.subtree().iter().any(|n| Arc::ptr_eq(n, node)) {
            return Err(QmpError::generic(block::would_cycle_message(
                new_backing.name(),
                "backing",
                node.name(),
            )));
        }
    }
    if let (Some(current), Some(_)) = (&current, node.busy_with_job()) {
        return Err(QmpError::generic(format!(
            "Cannot change frozen 'backing' link from '{}' to '{}'",
            node.name(),
            current.name()
        )));
    }
    Ok(())
}

/// QEMU refuses to change anything but the read-only flag here: the driver, the children
/// (named as they are) and every other option must stay as they were opened.
fn check_unchanged(
    node: &Node,
    options: &Map<String, Value>,
    index: usize,
) -> Result<(), QmpError> {
    let cannot = |key: &str| QmpError::generic(format!("Cannot change the option '{key}'"));
    if options.get("driver").and_then(Value::as_str) != Some(node.driver().format_name()) {
        return Err(cannot("driver"));
    }
    for child in node.children() {
        let role = child.role();
        match options.get(role) {
            Some(Value::String(name)) if name == child.node().name() => {}
            Some(_) => return Err(cannot(role)),
            None if role == "backing" => {}
            None => {
                return Err(QmpError::generic(format!(
                    "Parameter 'options[{index}].{role}' is missing"
                )))
            }
        }
    }
    if let Some(Value::String(_)) = options.get("backing") {
        if node.child("backing").is_none() {
            return Err(cannot("backing"));
        }
    }
    let opened = node.open_options();
    for (key, value) in options {
        if HANDLED.contains(&key.as_str()) {
            continue;
        }
        if opened.get(key) != Some(value) {
            return Err(cannot(key));
        }
    }
    Ok(())
}
