//! Commands about the daemon itself: version, command list, schema, quit.

use super::block::no_arguments;
use super::COMMANDS;
use crate::daemon::Daemon;
use qapi::error::QmpError;
use serde_json::{json, Map, Value};

/// The version in the QMP greeting and query-version. The `qemu` numbers are those of the
/// qemu-storage-daemon whose commands and behaviour blockd matches (10.0.2, the one its
/// differential tests run against): management tools pick features and work-arounds from
/// them, and a blockd version there would make them take blockd for an ancient QEMU.
/// `package` names blockd and its own version, so that whoever looks can tell the two apart.
pub fn version_json() -> Value {
    json!({
        "qemu": {"major": 10, "minor": 0, "micro": 2},
        "package": concat!("blockd-", env!("CARGO_PKG_VERSION")),
    })
}

pub fn query_version(args: Map<String, Value>) -> Result<Value, QmpError> {
    no_arguments(args)?;
    Ok(version_json())
}

pub fn query_commands(args: Map<String, Value>) -> Result<Value, QmpError> {
    no_arguments(args)?;
    Ok(Value::Array(
        COMMANDS.iter().map(|name| json!({"name": name})).collect(),
    ))
}

pub fn query_qmp_schema(args: Map<String, Value>) -> Result<Value, QmpError> {
    no_arguments(args)?;
    Ok(crate::schema::schema_info_for(COMMANDS))
}

/// The reply goes out first; the main loop then flushes, releases locks and exits 0.
pub fn quit(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    no_arguments(args)?;
    daemon.request_quit();
    Ok(json!({}))
}
