//! The chardev commands: chardev-add, chardev-change, chardev-remove, chardev-send-break,
//! query-chardev, query-chardev-backends, ringbuf-write, ringbuf-read.

use super::block::no_arguments;
use crate::chardev::{
    backend_from_qmp, decode_data, encode_data, AddError, ChardevSpec, DataFormat,
};
use crate::daemon::Daemon;
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Map, Value};

#[derive(Deserialize)]
struct AddArgs {
    id: String,
    backend: Value,
}

#[derive(Deserialize)]
struct IdArgs {
    id: String,
}

#[derive(Deserialize)]
struct WriteArgs {
    device: String,
    data: String,
    format: Option<DataFormat>,
}

#[derive(Deserialize)]
struct ReadArgs {
    device: String,
    size: i64,
    format: Option<DataFormat>,
}

fn spec(args: Map<String, Value>) -> Result<ChardevSpec, QmpError> {
    let args: AddArgs = qapi::de::from_value(Value::Object(args))?;
    let (backend, log) = backend_from_qmp(&args.id, args.backend)?;
    Ok(ChardevSpec {
        id: args.id,
        backend,
        log,
    })
}

pub async fn chardev_add(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    let spec = spec(args)?;
    let id = spec.id.clone();
    daemon.chardevs.add(spec, false).await.map_err(|e| match e {
        AddError::Duplicate => QmpError::generic(format!("Chardev with id '{id}' already exists")),
        AddError::Open(e) => QmpError::generic(format!("Failed to add chardev '{id}': {e}")),
    })
}

pub async fn chardev_change(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    daemon.chardevs.change(spec(args)?).await
}

pub fn chardev_remove(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    let args: IdArgs = qapi::de::from_value(Value::Object(args))?;
    daemon.chardevs.remove(&args.id)?;
    Ok(json!({}))
}

pub fn chardev_send_break(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    let args: IdArgs = qapi::de::from_value(Value::Object(args))?;
    let chardev = daemon
        .chardevs
        .get(&args.id)
        .ok_or_else(|| QmpError::generic(format!("Chardev '{}' not found", args.id)))?;
    chardev.send_break();
    Ok(json!({}))
}

pub fn query_chardev(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    no_arguments(args)?;
    Ok(daemon.chardevs.query())
}

pub fn query_chardev_backends(args: Map<String, Value>) -> Result<Value, QmpError> {
    no_arguments(args)?;
    Ok(Value::Array(
        crate::chardev::BACKENDS
            .iter()
            .map(|name| json!({ "name": name }))
            .collect(),
    ))
}

fn ringbuf(
    daemon: &Daemon,
    device: &str,
) -> Result<std::rc::Rc<crate::chardev::Chardev>, QmpError> {
    daemon
        .chardevs
        .get(device)
        .ok_or_else(|| QmpError::generic(format!("Device '{device}' not found")))
}

pub fn ringbuf_write(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    let args: WriteArgs = qapi::de::from_value(Value::Object(args))?;
    let chardev = ringbuf(daemon, &args.device)?;
    let data = decode_data(&args.data, args.format.unwrap_or_default())?;
    chardev.ring_write(&data)?;
    Ok(json!({}))
}

pub fn ringbuf_read(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    let args: ReadArgs = qapi::de::from_value(Value::Object(args))?;
    let chardev = ringbuf(daemon, &args.device)?;
    if args.size <= 0 {
        return Err(QmpError::generic("size must be greater than zero"));
    }
    let size = usize::try_from(args.size).unwrap_or(usize::MAX);
    let bytes = chardev.ring_read(size)?;
    Ok(Value::String(encode_data(
        &bytes,
        args.format.unwrap_or_default(),
    )))
}
