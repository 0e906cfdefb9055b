//! QMP command dispatch: one handler function per command, grouped by area.

pub mod bitmaps;
pub mod block;
mod chain;
mod chardev;
mod create;
mod images;
mod internal_snapshots;
mod jobs;
mod mirror;
mod misc;
pub mod objects;
pub mod qom;
mod reopen;
mod resize;
mod snapshot;
mod stats;
mod transaction;

pub use misc::version_json;

use crate::daemon::Daemon;
use crate::exports::Exports;
use futures::future::LocalBoxFuture;
use qapi::error::QmpError;
use serde_json::{json, Map, Value};
use std::rc::Rc;

/// Every command blockd answers, as query-commands lists them.
pub const COMMANDS: &[&str] = &[
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-merge",
    "block-dirty-bitmap-remove",
    "block-export-add",
    "block-export-del",
    "block-commit",
    "block-job-cancel",
    "block-job-change",
    "block-job-complete",
    "block-job-dismiss",
    "block-job-finalize",
    "block-job-pause",
    "block-job-resume",
    "block-job-set-speed",
    "block-stream",
    "blockdev-backup",
    "blockdev-add",
    "blockdev-create",
    "blockdev-reopen",
    "blockdev-del",
    "blockdev-set-active",
    "blockdev-mirror",
    "blockdev-snapshot",
    "blockdev-snapshot-sync",
    "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-delete-internal-sync",
    "change-backing-file",
    "chardev-add",
    "chardev-change",
    "chardev-remove",
    "chardev-send-break",
    "block_set_io_throttle",
    "block_resize",
    "block-set-write-threshold",
    "drive-backup",
    "drive-mirror",
    "job-cancel",
    "job-complete",
    "job-dismiss",
    "job-finalize",
    "job-pause",
    "job-resume",
    "nbd-server-add",
    "nbd-server-remove",
    "nbd-server-start",
    "nbd-server-stop",
    "qmp_capabilities",
    "query-block",
    "query-block-exports",
    "query-block-jobs",
    "query-chardev",
    "query-chardev-backends",
    "query-blockstats",
    "query-commands",
    "query-jobs",
    "query-named-block-nodes",
    "query-qmp-schema",
    "query-version",
    "object-add",
    "object-del",
    "qom-get",
    "qom-set",
    "quit",
    "ringbuf-read",
    "ringbuf-write",
    "transaction",
    "x-blockdev-amend",
    "x-blockdev-del",
    "x-blockdev-set-iothread",
    "x-debug-block-dirty-bitmap-sha256",
    "x-debug-query-block-graph",
];

pub struct Commands {
    daemon: Rc<Daemon>,
}

impl Commands {
    pub fn new(daemon: Rc<Daemon>) -> Commands {
        Commands { daemon }
    }
}

impl qmp::Dispatcher for Commands {
    fn dispatch<'a>(
        &'a self,
        command: &'a str,
        args: Map<String, Value>,
    ) -> LocalBoxFuture<'a, Result<Value, QmpError>> {
        let daemon = &self.daemon;
        Box::pin(async move {
            match command {
                "blockdev-add" => block::blockdev_add(daemon, args).await,
                "blockdev-create" => create::blockdev_create(daemon, args).await,
                "blockdev-reopen" => reopen::blockdev_reopen(daemon, args).await,
                "blockdev-del" | "x-blockdev-del" => block::blockdev_del(daemon, args).await,
                "x-blockdev-change" => block::x_blockdev_change(daemon, args).await,
                "x-blockdev-set-iothread" => block::x_blockdev_set_iothread(daemon, args),
                "blockdev-set-active" => block::blockdev_set_active(daemon, args).await,
                "chardev-add" => chardev::chardev_add(daemon, args).await,
                "chardev-change" => chardev::chardev_change(daemon, args).await,
                "chardev-remove" => chardev::chardev_remove(daemon, args),
                "chardev-send-break" => chardev::chardev_send_break(daemon, args),
                "query-chardev" => chardev::query_chardev(daemon, args),
                "query-chardev-backends" => chardev::query_chardev_backends(args),
                "ringbuf-write" => chardev::ringbuf_write(daemon, args),
                "ringbuf-read" => chardev::ringbuf_read(daemon, args),
                "query-block" => block::query_block(args),
                "nbd-server-start" => Exports::server_start(daemon, args),
                "nbd-server-stop" => {
                    block::no_arguments(args)?;
                    Exports::server_stop(daemon)
                }
                "nbd-server-add" => Exports::nbd_server_add(daemon, args).await,
                "nbd-server-remove" => Exports::nbd_server_remove(daemon, args),
                "block-export-add" => Exports::block_export_add(daemon, args).await,
                "block-export-del" => Exports::block_export_del(daemon, args),
                "query-block-exports" => {
                    block::no_arguments(args)?;
                    Ok(Exports::query(daemon))
                }
                "query-named-block-nodes" => block::query_named_block_nodes(daemon, args),
                "x-debug-query-block-graph" => block::query_block_graph(daemon, args),
                "change-backing-file" => images::change_backing_file(daemon, args).await,
                "blockdev-backup" => jobs::blockdev_backup(daemon, args).await,
                "drive-backup" => jobs::drive_backup(daemon, args).await,
                "blockdev-mirror" => mirror::blockdev_mirror(daemon, args).await,
                "block-stream" => chain::block_stream(daemon, args).await,
                "blockdev-snapshot-sync" => snapshot::blockdev_snapshot_sync(daemon, args).await,
                "blockdev-snapshot" => snapshot::blockdev_snapshot(daemon, args).await,
                "blockdev-snapshot-internal-sync" => {
                    internal_snapshots::blockdev_snapshot_internal_sync(daemon, args).await
                }
                "blockdev-snapshot-delete-internal-sync" => {
                    internal_snapshots::blockdev_snapshot_delete_internal_sync(daemon, args).await
                }
                "transaction" => transaction::transaction(daemon, args).await,
                "x-blockdev-amend" => create::x_blockdev_amend(daemon, args),
                "block-commit" => chain::block_commit(daemon, args).await,
                "drive-mirror" => mirror::drive_mirror(daemon, args).await,
                "block-job-change" => mirror::block_job_change(daemon, args),
                "query-block-jobs" | "query-jobs" => jobs::job_command(daemon, command, args).await,
                name if name.starts_with("block-job-") || name.starts_with("job-") => {
                    jobs::job_command(daemon, command, args).await
                }
                name if name.starts_with("block-dirty-bitmap-") => {
                    match bitmaps::BitmapAction::parse(name, args)? {
                        Some(action) => action.run(&daemon.graph).map(|()| json!({})),
                        None => Err(QmpError::command_not_found(format!(
                            "The command {command} has not been found"
                        ))),
                    }
                }
                "x-debug-block-dirty-bitmap-sha256" => bitmaps::sha256(&daemon.graph, args),
                "block-set-write-threshold" => stats::block_set_write_threshold(daemon, args),
                "query-blockstats" => stats::query_blockstats(daemon, args),
                "object-add" => objects::object_add(daemon, args),
                "object-del" => objects::object_del(daemon, args).await,
                "qom-get" => objects::qom_get(daemon, args),
                "qom-list" => qom::qom_list(daemon, args),
                "qom-list-types" => qom::qom_list_types(args),
                "qom-list-properties" => qom::qom_list_properties(args),
                "qom-set" => objects::qom_set(daemon, args),
                "block_resize" => resize::block_resize(daemon, args).await,
                "block_set_io_throttle" => objects::block_set_io_throttle(daemon, args).await,
                "query-version" => misc::query_version(args),
                "query-commands" => misc::query_commands(args),
                "query-qmp-schema" => misc::query_qmp_schema(args),
                "quit" => misc::quit(daemon, args),
                _ => Err(QmpError::command_not_found(format!(
                    "The command {command} has not been found"
                ))),
            }
        })
    }

    fn has_command(&self, command: &str) -> bool {
        COMMANDS.contains(&command)
    }
}

/// Create an image file for drive-backup, drive-mirror and blockdev-snapshot-sync, with
/// `backing` (a node) named in its header, on an I/O thread.
async fn create_image_file(
    daemon: &Daemon,
    path: &str,
    format: &str,
    size: u64,
    backing: Option<&std::sync::Arc<::block::Node>>,
) -> Result<(), QmpError> {
    let backing = backing.map(|b| {
        let info = b.driver().info(b);
        (info.filename, b.driver().format_name().to_string())
    });
    let (format, path) = (format.to_string(), path.to_string());
    daemon
        .io
        .run(move || async move {
            let image = ::block::NewImage {
                format: &format,
                size,
                backing,
            };
            ::block::create_image(std::path::Path::new(&path), image).await
        })
        .await
        .map_err(QmpError::generic)
}
