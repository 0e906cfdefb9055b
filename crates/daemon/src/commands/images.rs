//! QMP commands that change what an image file records about itself: change-backing-file.

use crate::daemon::Daemon;
use block::os_error_text;

use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ChangeBackingFileArgs {
    device: String,
    image_node_name: String,
    backing_file: String,
}

/// change-backing-file: rewrite the backing file name in the header of `image-node-name`,
/// a layer of `device`'s chain, without touching the graph. The backing format recorded is
/// that of the node currently below the image.
pub async fn change_backing_file(
    daemon: &Daemon,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    let args: ChangeBackingFileArgs = qapi::de::from_value(Value::Object(args))?;
    let graph = &daemon.graph;
    let device = graph.lookup(&args.device)?;
    if !device.is_root() {
        return Err(QmpError::generic("Need a root block node"));
    }
    let image = graph.find(&args.image_node_name).ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='' nor node-name='{}'",
            args.image_node_name
        ))
    })?;
    let Some(below) = image.data_below() else {
        return Err(QmpError::generic(
            "not allowing backing file change on an image without a backing file",
        ));
    };
    if !device.chain().iter().any(|n| Arc::ptr_eq(n, &image)) {
        return Err(QmpError::generic(format!(
            "'{}' and image file are not in the same chain",
            args.device
        )));
    }
    image.check_no_job()?;
    let format = below.driver().format_name();
    let name = args.backing_file;
    let result = {
        let name = name.clone();
        daemon
            .io
            .run(move || async move {
                image
                    .driver()
                    .change_backing_file(&image, Some(&name), Some(format))
                    .await
            })
            .await
    };
    result.map_err(|e| {
        QmpError::generic(format!(
            "Could not change backing file to '{name}': {}",
            os_error_text(&e)
        ))
    })?;
    Ok(json!({}))
}
