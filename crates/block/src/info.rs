//! What query-named-block-nodes and x-debug-query-block-graph report, in QEMU's shapes.

use crate::bitmap::DirtyBitmap;
use crate::node::{Node, Parent};
use crate::Graph;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// ImageInfo of one layer; `chain_image_info` nests the layers below.
fn image_info(node: &Arc<Node>) -> Value {
    let info = node.driver().info(node);
    let mut image = Map::new();
    if let Ok(snapshots) = node.driver().internal_snapshots() {
        if !snapshots.is_empty() {
            let list: Vec<Value> = snapshots.iter().map(|s| s.to_json()).collect();
            image.insert("snapshots".into(), Value::Array(list));
        }
    }
    image.insert("virtual-size".into(), json!(node.size()));
    image.insert("filename".into(), json!(info.filename));
    if let Some(cluster_size) = info.cluster_size {
        image.insert("cluster-size".into(), json!(cluster_size));
    }
    image.insert("format".into(), json!(node.driver().format_name()));
    if let Some(actual) = info.actual_size {
        image.insert("actual-size".into(), json!(actual));
    }
    if let Some(specific) = info.format_specific {
        image.insert("format-specific".into(), specific);
    }
    if info.encrypted {
        image.insert("encrypted".into(), json!(true));
    }
    if let Some(dirty) = info.dirty_flag {
        image.insert("dirty-flag".into(), json!(dirty));
    }
    if let Some(backing) = &info.backing_filename {
        image.insert("backing-filename".into(), json!(backing));
        let full = full_backing_filename(node, backing);
        image.insert("full-backing-filename".into(), json!(full));
        if let Some(format) = &info.backing_format {
            image.insert("backing-filename-format".into(), json!(format));
        }
    }
    Value::Object(image)
}

/// ImageInfo of `node` with the layers below it nested as `backing-image`, built from the
/// bottom up so that a deep chain needs no deep recursion.
fn chain_image_info(node: &Arc<Node>) -> Value {
    let mut below: Option<Value> = None;
    for layer in node.chain().iter().rev() {
        let mut info = image_info(layer);
        if let Some(b) = below {
            info["backing-image"] = b;
        }
        below = Some(info);
    }
    below.unwrap_or_default()
}

/// The header's backing file name made relative to the directory of the image's file, as
/// QEMU resolves it (whichever node is actually the backing one).
fn full_backing_filename(node: &Arc<Node>, backing: &str) -> String {
    let image_file = match node.child("file") {
        Some(file) => {
            let file = file.node();
            file.driver().info(&file).filename
        }
        None => node.driver().info(node).filename,
    };
    if std::path::Path::new(backing).is_absolute() {
        return backing.to_string();
    }
    match std::path::Path::new(&image_file).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            dir.join(backing).to_string_lossy().into_owned()
        }
        _ => backing.to_string(),
    }
}

/// BlockDeviceInfo for one node.
pub fn block_device_info(node: &Arc<Node>, flat: bool) -> Value {
    let opts = node.options();
    let info = node.driver().info(node);
    let mut out = json!({
        "file": info.filename,
        "node-name": node.name(),
        "ro": node.read_only(),
        "drv": node.driver().format_name(),
        "encrypted": info.encrypted,
        "detect_zeroes": opts.detect_zeroes.as_str(),
        "bps": 0, "bps_rd": 0, "bps_wr": 0,
        "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "image": if flat { image_info(node) } else { chain_image_info(node) },
        "backing_file_depth": if flat { 0 } else { node.chain().len() - 1 },
        "active": node.is_active(),
        "write_threshold": node.write_threshold(),
        "cache": {
            "writeback": true,
            "direct": opts.cache_direct,
            "no-flush": opts.cache_no_flush,
        },
    });
    // The file of the backing node in use, which may differ from the name in the header
    // (change-backing-file, a backing node given by reference).
    let backing_file = match node.backing() {
        Some(backing) => Some(backing.driver().info(&backing).filename),
        None => info.backing_filename,
    };
    if let Some(backing) = backing_file {
        out["backing_file"] = json!(backing);
    }
    let bitmaps = node.dirty_bitmaps();
    if !bitmaps.is_empty() {
        out["dirty-bitmaps"] = bitmaps.iter().rev().map(|b| dirty_info(b)).collect();
    }
    out
}

/// BlockDirtyInfo; QEMU lists a node's bitmaps newest first.
fn dirty_info(bitmap: &DirtyBitmap) -> Value {
    let mut info = Map::new();
    if let Some(name) = bitmap.name() {
        info.insert("name".into(), json!(name));
    }
    // QEMU counts a frozen bitmap as recording when its successor records in its place.
    let recording = bitmap.is_recording() || bitmap.successor().is_some_and(|s| s.is_enabled());
    info.insert("recording".into(), json!(recording));
    info.insert("persistent".into(), json!(bitmap.is_persistent()));
    info.insert("busy".into(), json!(bitmap.is_busy()));
    info.insert("granularity".into(), json!(bitmap.granularity()));
    info.insert("count".into(), json!(bitmap.count()));
    if bitmap.is_inconsistent() {
        info.insert("inconsistent".into(), json!(true));
    }
    Value::Object(info)
}

/// query-named-block-nodes: a BlockDeviceInfo per node. With `flat` (QMP `flat`), `image`
/// has no nested `backing-image` and `backing_file_depth` is 0.
pub fn named_block_nodes(graph: &Graph, flat: bool) -> Value {
    Value::Array(
        graph
            .nodes()
            .iter()
            .map(|n| block_device_info(n, flat))
            .collect(),
    )
}

/// x-debug-query-block-graph: every node and user, and every edge with its permissions.
pub fn block_graph(graph: &Graph) -> Value {
    let nodes = graph.nodes();
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut out_nodes = Vec::new();
    let mut out_edges = Vec::new();
    let mut next_id = 1;
    for node in &nodes {
        ids.insert(node.name().to_string(), next_id);
        out_nodes.push(json!({"name": node.name(), "type": "block-driver", "id": next_id}));
        next_id += 1;
    }
    let mut users: HashMap<(String, String), usize> = HashMap::new();
    for node in &nodes {
        for edge in node.parents() {
            let parent_id = match edge.parent() {
                Parent::Node(name) => match ids.get(name) {
                    Some(&id) => id,
                    None => continue,
                },
                Parent::User { kind, name } => *users
                    .entry((kind.to_string(), name.clone()))
                    .or_insert_with(|| {
                        let id = next_id;
                        next_id += 1;
                        out_nodes.push(json!({"name": name, "type": kind, "id": id}));
                        id
                    }),
                Parent::Job { id: job, .. } => *users
                    .entry(("block-job".to_string(), job.clone()))
                    .or_insert_with(|| {
                        let id = next_id;
                        next_id += 1;
                        out_nodes.push(json!({"name": job, "type": "block-job", "id": id}));
                        id
                    }),
            };
            out_edges.push(json!({
                "parent": parent_id,
                "child": ids[node.name()],
                "name": edge.role(),
                "perm": edge.perm().names(),
                "shared-perm": edge.shared().names(),
            }));
        }
    }
    json!({"nodes": out_nodes, "edges": out_edges})
}
