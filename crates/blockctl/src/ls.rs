//! `blockctl ls`: the node graph as a tree. Each top node (no other node above it) starts a
//! tree of its children (file, backing, target, ...); a node shared by two parents is drawn
//! once and referred to after. Every node line has its driver, size, allocation, file and
//! flags, then its bitmaps and its users that are not nodes: jobs and exports.

use crate::output::{bitmap_flags, bytes, print_json, refused, Failure};
use qmp::api::{
    BlockDeviceInfo, BlockExportInfo, BlockGraph, QueryBlockExports, QueryNamedBlockNodes,
    XDebugQueryBlockGraph,
};
use qmp::Client;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};

/// A node with its place in the graph.
struct Entry<'a> {
    info: &'a BlockDeviceInfo,
    /// (role, child node name), in the graph's order.
    children: Vec<(String, String)>,
    /// Jobs using the node, with their role (`main node`, `target`, ...).
    jobs: Vec<(String, String)>,
    exports: Vec<&'a BlockExportInfo>,
    has_node_parent: bool,
}

/// Prints the graph.
pub async fn ls(client: &mut Client, json: bool) -> Result<i32, Failure> {
    let nodes = client
        .call(&QueryNamedBlockNodes { flat: Some(true) })
        .await
        .map_err(refused("listing nodes"))?;
    // Only a daemon without x-debug-query-block-graph lacks the edges; its nodes are
    // then listed without a tree.
    let graph = client.call(&XDebugQueryBlockGraph {}).await.ok();
    let exports = client
        .call(&QueryBlockExports {})
        .await
        .map_err(refused("listing exports"))?;
    let entries = assemble(&nodes, graph.as_ref(), &exports);
    if json {
        print_json(&to_json(&entries));
        return Ok(0);
    }
    if entries.is_empty() {
        println!("no nodes");
        return Ok(0);
    }
    let by_name: HashMap<&str, &Entry> = entries
        .iter()
        .map(|e| (e.info.node_name.as_str(), e))
        .collect();
    let mut drawn = HashSet::new();
    for entry in entries.iter().filter(|e| !e.has_node_parent) {
        draw(entry, None, "", "", &by_name, &mut drawn);
    }
    // A cycle cannot happen, but nodes whose parents are all unnamed must still show.
    for entry in &entries {
        if !drawn.contains(entry.info.node_name.as_str()) {
            draw(entry, None, "", "", &by_name, &mut drawn);
        }
    }
    Ok(0)
}

fn assemble<'a>(
    nodes: &'a [BlockDeviceInfo],
    graph: Option<&BlockGraph>,
    exports: &'a [BlockExportInfo],
) -> Vec<Entry<'a>> {
    let mut entries: Vec<Entry> = nodes
        .iter()
        .map(|info| Entry {
            info,
            children: Vec::new(),
            jobs: Vec::new(),
            exports: exports
                .iter()
                .filter(|x| x.node_name == info.node_name)
                .collect(),
            has_node_parent: false,
        })
        .collect();
    let Some(graph) = graph else {
        return entries;
    };
    let vertex: HashMap<u64, (&str, &str)> = graph
        .nodes
        .iter()
        .map(|n| (n.id, (n.kind.as_str(), n.name.as_str())))
        .collect();
    let index: HashMap<String, usize> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.info.node_name.clone(), i))
        .collect();
    for edge in &graph.edges {
        let (Some(&(parent_kind, parent)), Some(&(child_kind, child))) =
            (vertex.get(&edge.parent), vertex.get(&edge.child))
        else {
            continue;
        };
        if child_kind != "block-driver" {
            continue;
        }
        let Some(&child_index) = index.get(child) else {
            continue;
        };
        match parent_kind {
            "block-driver" => {
                if let Some(&parent_index) = index.get(parent) {
                    entries[parent_index]
                        .children
                        .push((edge.name.clone(), child.to_owned()));
                    entries[child_index].has_node_parent = true;
                }
            }
            "block-job" => entries[child_index]
                .jobs
                .push((parent.to_owned(), edge.name.clone())),
            _ => {}
        }
    }
    entries
}

fn describe(info: &BlockDeviceInfo) -> String {
    let mut text = format!("{}  {}", info.node_name, info.drv);
    text.push_str(&format!("  {}", bytes(info.image.virtual_size)));
    if let Some(allocated) = info.image.actual_size {
        text.push_str(&format!(" ({} allocated)", bytes(allocated)));
    }
    text.push_str(&format!("  {}", info.file));
    if info.ro {
        text.push_str("  read-only");
    }
    if !info.active {
        text.push_str("  inactive");
    }
    text
}

fn draw(
    entry: &Entry,
    role: Option<&str>,
    first: &str,
    rest: &str,
    by_name: &HashMap<&str, &Entry>,
    drawn: &mut HashSet<String>,
) {
    let name = entry.info.node_name.as_str();
    let label = role.map_or(String::new(), |r| format!("{r}: "));
    if !drawn.insert(name.to_owned()) {
        println!("{first}{label}{name} (shown above)");
        return;
    }
    println!("{first}{label}{}", describe(entry.info));
    let continues = if entry.children.is_empty() {
        "    "
    } else {
        "│   "
    };
    for b in &entry.info.dirty_bitmaps {
        let flags = bitmap_flags(b);
        let name = if b.name.is_empty() {
            "(a job's own)"
        } else {
            &b.name
        };
        println!(
            "{rest}{continues}bitmap {name}: {} dirty, {} granularity, {}",
            bytes(b.count),
            bytes(b.granularity),
            flags.join(", ")
        );
    }
    for (job, role) in &entry.jobs {
        println!("{rest}{continues}used by job {job} ({role})");
    }
    for export in &entry.exports {
        let state = if export.shutting_down {
            ", shutting down"
        } else {
            ""
        };
        println!(
            "{rest}{continues}exported as {} ({}{state})",
            export.id, export.kind
        );
    }
    for (i, (role, child)) in entry.children.iter().enumerate() {
        let Some(child_entry) = by_name.get(child.as_str()) else {
            continue;
        };
        let last = i + 1 == entry.children.len();
        let (branch, under) = if last {
            ("└── ", "    ")
        } else {
            ("├── ", "│   ")
        };
        draw(
            child_entry,
            Some(role),
            &format!("{rest}{branch}"),
            &format!("{rest}{under}"),
            by_name,
            drawn,
        );
    }
}

fn to_json(entries: &[Entry]) -> Value {
    Value::Array(
        entries
            .iter()
            .map(|e| {
                json!({
                    "node-name": e.info.node_name,
                    "driver": e.info.drv,
                    "file": e.info.file,
                    "virtual-size": e.info.image.virtual_size,
                    "actual-size": e.info.image.actual_size,
                    "read-only": e.info.ro,
                    "active": e.info.active,
                    "children": e.children.iter()
                        .map(|(role, node)| json!({"role": role, "node-name": node}))
                        .collect::<Vec<_>>(),
                    "bitmaps": e.info.dirty_bitmaps,
                    "jobs": e.jobs.iter()
                        .map(|(id, role)| json!({"id": id, "role": role}))
                        .collect::<Vec<_>>(),
                    "exports": e.exports.iter().map(|x| &x.id).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}
