//! `blockd serve IMAGE`: the short form for a new user, expanded into the long options.

use crate::chardev::{Backend, SocketAddr, SocketSpec};
use crate::cli::{ChardevSpec, CliItem, DaemonArgs, Located, Monitor, QapiArgs, ServeArgs, Syntax};
use serde_json::json;
use std::path::Path;

/// Size of the image `serve` creates when the file does not exist.
const NEW_IMAGE_SIZE: u64 = 1 << 30;

/// Create the image if needed, say what will be opened, and build the equivalent options.
pub fn prepare(args: &ServeArgs) -> Result<DaemonArgs, String> {
    let image = &args.image;
    if !image.exists() {
        create_image(image)?;
        println!(
            "blockd: created {} (qcow2, 1 GiB) because it did not exist",
            image.display()
        );
    }
    let format = probe_format(image)?;
    println!(
        "blockd: opening {} ({format}) as node 'disk0'",
        image.display()
    );
    println!("blockd: QMP listening on {}", args.qmp.display());
    println!(
        "blockd: NBD export 'disk0' (writable) on {}",
        args.nbd.display()
    );
    let json_args = |value: serde_json::Value| QapiArgs {
        syntax: Syntax::Json,
        args: match value {
            serde_json::Value::Object(map) => map,
            _ => unreachable!("object literal"),
        },
    };
    let located = |origin: &str, item| Located {
        origin: format!("serve: {origin}"),
        item,
    };
    let items = vec![
        located(
            "QMP socket",
            CliItem::Chardev(ChardevSpec {
                id: "qmp0".into(),
                backend: Backend::Socket(SocketSpec {
                    addr: SocketAddr::Unix {
                        path: args.qmp.clone(),
                        abstract_name: false,
                        tight: true,
                    },
                    server: true,
                    wait: false,
                    nodelay: false,
                    reconnect: None,
                }),
                log: None,
            }),
        ),
        located(
            "QMP monitor",
            CliItem::Monitor(Monitor {
                chardev: "qmp0".into(),
                pretty: false,
            }),
        ),
        located(
            "image",
            CliItem::Blockdev(json_args(json!({
                "driver": format,
                "node-name": "disk0",
                "file": {"driver": "file", "filename": image.to_string_lossy()},
            }))),
        ),
        located(
            "NBD socket",
            CliItem::NbdServer(json_args(json!({
                "addr": {"type": "unix", "path": args.nbd.to_string_lossy()},
            }))),
        ),
        located(
            "NBD export",
            CliItem::Export(json_args(json!({
                "type": "nbd", "id": "disk0", "node-name": "disk0", "writable": true,
            }))),
        ),
    ];
    Ok(DaemonArgs {
        items,
        io_threads: args.io_threads,
        ..DaemonArgs::default()
    })
}

/// Runs before the daemon starts, on a throwaway runtime.
fn create_image(path: &Path) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let image = block::NewImage {
        format: "qcow2",
        size: NEW_IMAGE_SIZE,
        backing: None,
    };
    runtime.block_on(block::create_image(path, image))
}

fn probe_format(path: &Path) -> Result<&'static str, String> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let qcow2 = file.read_exact(&mut magic).is_ok() && &magic == b"QFI\xfb";
    Ok(if qcow2 { "qcow2" } else { "raw" })
}
