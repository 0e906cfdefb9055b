//! Commands that watch how nodes are used: query-blockstats and block-set-write-threshold.

use crate::daemon::Daemon;
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct WriteThresholdArgs {
    node_name: String,
    write_threshold: u64,
}

/// block-set-write-threshold: 0 disarms; the event fires once, then the threshold is 0.
pub fn block_set_write_threshold(
    daemon: &Daemon,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    let args: WriteThresholdArgs = qapi::de::from_value(Value::Object(args))?;
    let node = daemon
        .graph
        .find(&args.node_name)
        .ok_or_else(|| QmpError::generic(format!("Device '{}' not found", args.node_name)))?;
    let events = daemon.events.clone();
    node.set_write_threshold(
        args.write_threshold,
        Arc::new(move |node, amount, threshold| {
            events.emit(
                "BLOCK_WRITE_THRESHOLD",
                Some(json!({
                    "node-name": node,
                    "amount-exceeded": amount,
                    "write-threshold": threshold,
                })),
            );
        }),
    );
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct QueryBlockstatsArgs {
    query_nodes: Option<bool>,
}

/// query-blockstats. Without query-nodes QEMU lists named block backends (guest devices),
/// which qsd and blockd have none of; with it, every node, oldest first.
pub fn query_blockstats(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    let args: QueryBlockstatsArgs = qapi::de::from_value(Value::Object(args))?;
    if !args.query_nodes.unwrap_or(false) {
        return Ok(json!([]));
    }
    Ok(Value::Array(
        daemon
            .graph
            .nodes()
            .iter()
            .rev()
            .map(block::block_stats)
            .collect(),
    ))
}
