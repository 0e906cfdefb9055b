//! Job commands: blockdev-backup / drive-backup, and the verbs and queries of every job.

use super::bitmaps::{check_bitmap, BitmapUse};
use crate::daemon::Daemon;
use block::DirtyBitmap;
use block::{DrainedSection, Node, TargetMode};
use jobs::{BackupPerf, BackupSetup, BitmapMode, SyncMode};
use jobs::{JobOptions, OnError};
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::rc::Rc;
use std::sync::Arc;

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "kebab-case")]
enum MirrorSyncMode {
    Top,
    Full,
    None,
    Incremental,
    Bitmap,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "kebab-case")]
enum BitmapSyncMode {
    OnSuccess,
    Never,
    Always,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "kebab-case")]
enum NewImageMode {
    Existing,
    AbsolutePaths,
}

#[derive(Deserialize, Default, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BackupPerfArgs {
    /// Copy offloading between files; reads and writes do the same work here.
    #[serde(rename = "use-copy-range")]
    _use_copy_range: Option<bool>,
    max_workers: Option<i64>,
    max_chunk: Option<i64>,
    min_cluster_size: Option<u64>,
}

/// The members blockdev-backup and drive-backup share (BackupCommon).
#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BackupArgs {
    job_id: Option<String>,
    device: String,
    target: String,
    sync: MirrorSyncMode,
    speed: Option<i64>,
    bitmap: Option<String>,
    bitmap_mode: Option<BitmapSyncMode>,
    compress: Option<bool>,
    on_source_error: Option<OnError>,
    on_target_error: Option<OnError>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
    filter_node_name: Option<String>,
    x_perf: Option<BackupPerfArgs>,
    discard_source: Option<bool>,
    /// drive-backup only.
    format: Option<String>,
    /// drive-backup only.
    mode: Option<NewImageMode>,
}

pub async fn blockdev_backup(
    daemon: &Rc<Daemon>,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    let drained = DrainedSection::new(&daemon.graph);
    let job = create_blockdev_backup(daemon, args, None, &drained).await?;
    start_job(daemon, &job);
    Ok(json!({}))
}

pub async fn drive_backup(
    daemon: &Rc<Daemon>,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    let drained = DrainedSection::new(&daemon.graph);
    let job = create_drive_backup(daemon, args, None, &drained).await?;
    start_job(daemon, &job);
    Ok(json!({}))
}

/// Run a created job on an I/O thread: its node's iothread object when that is pinned to
/// one, else one of the shared threads.
pub(super) fn start_job(daemon: &Daemon, job: &Arc<jobs::Job>) {
    let io = daemon.io.clone();
    // The job's "main node" edge: its other edges (a target) do not say where it runs.
    let node = daemon.graph.nodes().into_iter().find(|node| {
        node.parents().iter().any(|edge| {
            edge.role() == "main node"
                && matches!(edge.parent(), block::Parent::Job { id, .. } if id == job.id())
        })
    });
    job.start_with(move |work| match node {
        Some(node) => io.spawn_for(&node, work),
        None => io.spawn(work),
    });
}

/// blockdev-backup up to a created, not yet started job (a transaction starts it once
/// every action is prepared), in the job transaction `txn` if given. The source and the
/// filter put above it join `drained`, so the point in time holds until the caller ends
/// the section.
pub(super) async fn create_blockdev_backup(
    daemon: &Rc<Daemon>,
    mut args: Map<String, Value>,
    txn: Option<Arc<jobs::JobTxn>>,
    drained: &Arc<DrainedSection>,
) -> Result<Arc<jobs::Job>, QmpError> {
    for key in ["format", "mode"] {
        if args.contains_key(key) {
            return Err(QmpError::generic(format!(
                "Parameter '{key}' is unexpected"
            )));
        }
    }
    let args: BackupArgs = qapi::de::from_value(Value::Object(std::mem::take(&mut args)))?;
    let source = daemon.graph.lookup(&args.device)?;
    let target = daemon.graph.lookup(&args.target)?;
    drained.add(&source).await;
    let bitmap = resolve_bitmap(&args, &source)?;
    create_backup(daemon, args, source, target, bitmap, false, txn, drained).await
}

pub(super) async fn create_drive_backup(
    daemon: &Rc<Daemon>,
    args: Map<String, Value>,
    txn: Option<Arc<jobs::JobTxn>>,
    drained: &Arc<DrainedSection>,
) -> Result<Arc<jobs::Job>, QmpError> {
    let args: BackupArgs = qapi::de::from_value(Value::Object(args))?;
    let source = daemon.graph.lookup(&args.device)?;
    drained.add(&source).await;
    let bitmap = resolve_bitmap(&args, &source)?;
    let format = args
        .format
        .clone()
        .unwrap_or_else(|| source.driver().format_name().to_string());
    let mode = args.mode.unwrap_or(NewImageMode::AbsolutePaths);
    let path = args.target.clone();
    // As QEMU's drive-backup: a sync=top copy holds the top layer and reads the rest from
    // the source's backing image, named in its header and opened from there; a sync=none
    // copy holds only what the source overwrote and reads the rest from the live source
    // node, which becomes its backing once it is open.
    let sync_none = matches!(args.sync, MirrorSyncMode::None);
    if mode == NewImageMode::AbsolutePaths {
        let backing = match args.sync {
            MirrorSyncMode::Top => source.skip_filters().backing(),
            MirrorSyncMode::None => Some(source.clone()),
            _ => None,
        };
        super::create_image_file(daemon, &path, &format, source.size(), backing.as_ref()).await?;
    }
    let mut options = Map::new();
    options.insert("driver".into(), json!(format));
    options.insert("file".into(), json!({"driver": "file", "filename": path}));
    options.insert("discard".into(), json!("unmap"));
    options.insert("detect-zeroes".into(), json!("unmap"));
    if sync_none && format == "qcow2" {
        // Not the backing its header names: the live node is set below.
        options.insert("backing".into(), Value::Null);
    }
    let graph = daemon.graph.clone();
    let live_source = sync_none.then(|| source.clone());
    let target = daemon
        .io
        .run(move || async move {
            let target = graph.open_implicit(options).await?;
            if let Some(source) = live_source {
                target
                    .set_backing(Some(&source))
                    .await
                    .map_err(QmpError::generic)?;
            }
            Ok::<_, QmpError>(target)
        })
        .await?;
    create_backup(
        daemon,
        args,
        source,
        target,
        bitmap,
        mode == NewImageMode::AbsolutePaths,
        txn,
        drained,
    )
    .await
}

fn sync_name(sync: MirrorSyncMode) -> &'static str {
    match sync {
        MirrorSyncMode::Top => "top",
        MirrorSyncMode::Full => "full",
        MirrorSyncMode::None => "none",
        MirrorSyncMode::Incremental => "incremental",
        MirrorSyncMode::Bitmap => "bitmap",
    }
}

/// The backup's sync bitmap (on the source) and what becomes of it, checked in qsd's order.
fn resolve_bitmap(
    args: &BackupArgs,
    source: &Node,
) -> Result<Option<(Arc<DirtyBitmap>, BitmapMode)>, QmpError> {
    let incremental = args.sync == MirrorSyncMode::Incremental;
    if (incremental || args.sync == MirrorSyncMode::Bitmap) && args.bitmap.is_none() {
        return Err(QmpError::generic(format!(
            "must provide a valid bitmap name for '{}' sync mode",
            sync_name(args.sync)
        )));
    }
    if incremental
        && args
            .bitmap_mode
            .is_some_and(|m| m != BitmapSyncMode::OnSuccess)
    {
        return Err(QmpError::generic(
            "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
        ));
    }
    let Some(name) = &args.bitmap else {
        if args.bitmap_mode.is_some() {
            return Err(QmpError::generic(
                "Cannot specify bitmap sync mode without a bitmap",
            ));
        }
        return Ok(None);
    };
    let bitmap = source
        .dirty_bitmap(name)
        .ok_or_else(|| QmpError::generic(format!("Bitmap '{name}' could not be found")))?;
    let mode = match (args.bitmap_mode, incremental) {
        (_, true) | (Some(BitmapSyncMode::OnSuccess), _) => BitmapMode::OnSuccess,
        (Some(BitmapSyncMode::Always), _) => BitmapMode::Always,
        (Some(BitmapSyncMode::Never), _) => BitmapMode::Never,
        (None, false) => {
            return Err(QmpError::generic(
                "Bitmap sync mode must be given when providing a bitmap",
            ))
        }
    };
    // A backup that updates the bitmap at its end needs to be able to change it.
    let usage = match mode {
        BitmapMode::Never => BitmapUse::Read,
        BitmapMode::OnSuccess | BitmapMode::Always => BitmapUse::Modify,
    };
    check_bitmap(&bitmap, usage)?;
    match args.sync {
        MirrorSyncMode::None => Err(QmpError::generic(
            "sync mode 'none' does not produce meaningful bitmap outputs",
        )),
        MirrorSyncMode::Full | MirrorSyncMode::Top if mode == BitmapMode::Never => {
            Err(QmpError::generic(format!(
                "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{}'",
                sync_name(args.sync)
            )))
        }
        _ => Ok(Some((bitmap, mode))),
    }
}

#[allow(clippy::too_many_arguments)]
async fn create_backup(
    daemon: &Rc<Daemon>,
    args: BackupArgs,
    source: Arc<Node>,
    target: Arc<Node>,
    bitmap: Option<(Arc<DirtyBitmap>, BitmapMode)>,
    target_is_new: bool,
    txn: Option<Arc<jobs::JobTxn>>,
    drained: &Arc<DrainedSection>,
) -> Result<Arc<jobs::Job>, QmpError> {
    if Arc::ptr_eq(&source, &target) {
        return Err(QmpError::generic("Source and target cannot be the same"));
    }
    target.check_no_job()?;
    source.check_no_job()?;
    let job_id = args
        .job_id
        .clone()
        .unwrap_or_else(|| source.name().to_string());
    if !jobs::is_valid_id(&job_id) {
        return Err(QmpError::generic(format!("Invalid job ID '{job_id}'")));
    }
    if daemon.jobs.get(&job_id).is_some() {
        return Err(QmpError::generic(format!(
            "Job ID '{job_id}' already in use"
        )));
    }
    if source.size() != target.size() {
        return Err(QmpError::generic(
            "Source and target image have different sizes",
        ));
    }
    if args.compress == Some(true) && !target.driver().supports_compressed_writes() {
        // QEMU names the target's device here, and a daemon's nodes have none.
        return Err(QmpError::generic(
            "Compression is not supported for this drive ",
        ));
    }
    if args.discard_source == Some(true) {
        return Err(QmpError::generic(
            "discard-source is not supported by blockd's backup",
        ));
    }
    if let Some(name) = &args.filter_node_name {
        if daemon.graph.find(name).is_some() {
            return Err(QmpError::generic(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
    }
    let sync = match args.sync {
        MirrorSyncMode::Full => SyncMode::Full,
        MirrorSyncMode::Top => SyncMode::Top,
        MirrorSyncMode::None => SyncMode::None,
        MirrorSyncMode::Incremental | MirrorSyncMode::Bitmap => SyncMode::Bitmap,
    };
    let perf_args = args.x_perf.unwrap_or_default();
    let perf = BackupPerf {
        max_workers: match perf_args.max_workers {
            None => BackupPerf::default().max_workers,
            Some(n) if n >= 1 => n as usize,
            Some(_) => return Err(QmpError::generic("max-workers must be greater than zero")),
        },
        max_chunk: match perf_args.max_chunk {
            None | Some(0) => 0,
            Some(n) if n > 0 => n as u64,
            Some(_) => {
                return Err(QmpError::generic(
                    "max-chunk must be zero (which means no limit) or positive",
                ))
            }
        },
    };
    let min_cluster = perf_args.min_cluster_size.unwrap_or(0);
    // QEMU creates the filter node here, so its error comes wrapped.
    block::check_min_cluster_size(min_cluster).map_err(|e| {
        QmpError::generic(if min_cluster > i64::MAX as u64 {
            e
        } else {
            format!("Could not create node: {e}")
        })
    })?;

    let filter_name = args
        .filter_node_name
        .clone()
        .unwrap_or_else(|| daemon.graph.generate_name());
    let mut options = JobOptions::new(job_id);
    options.speed = args.speed.unwrap_or(0);
    options.auto_finalize = args.auto_finalize.unwrap_or(true);
    options.auto_dismiss = args.auto_dismiss.unwrap_or(true);
    options.on_source_error = args.on_source_error.unwrap_or(OnError::Report);
    options.on_target_error = args.on_target_error.unwrap_or(OnError::Report);
    options.txn = txn;
    let setup = BackupSetup {
        graph: daemon.graph.clone(),
        source,
        target,
        filter_name,
        sync,
        bitmap,
        perf,
        min_cluster,
        target_mode: TargetMode {
            is_zero: target_is_new && sync == SyncMode::Full,
            compress: args.compress == Some(true),
        },
        options,
    };
    let (manager, drained) = (daemon.jobs.clone(), drained.clone());
    daemon
        .io
        .run(move || async move { jobs::create_backup(setup, &manager, &drained).await })
        .await
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct DeviceArgs {
    device: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct CancelArgs {
    device: String,
    force: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct SetSpeedArgs {
    device: String,
    speed: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct IdArgs {
    id: String,
}

/// Every job verb and query, dispatched by command name.
pub async fn job_command(
    daemon: &Rc<Daemon>,
    command: &str,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    let jobs = &daemon.jobs;
    let args = Value::Object(args);
    match command {
        "query-block-jobs" => {
            super::block::no_arguments(into_map(args))?;
            Ok(Value::Array(jobs.query_block_jobs()))
        }
        "query-jobs" => {
            super::block::no_arguments(into_map(args))?;
            Ok(Value::Array(jobs.query_jobs()))
        }
        "block-job-set-speed" => {
            let a: SetSpeedArgs = qapi::de::from_value(args)?;
            jobs.block_job_set_speed(&a.device, a.speed)?;
            Ok(json!({}))
        }
        "block-job-cancel" => {
            let a: CancelArgs = qapi::de::from_value(args)?;
            jobs.block_job_cancel(&a.device, a.force.unwrap_or(false))
                .await?;
            Ok(json!({}))
        }
        "block-job-pause" => {
            let a: DeviceArgs = qapi::de::from_value(args)?;
            jobs.block_job_pause(&a.device)?;
            Ok(json!({}))
        }
        "block-job-resume" => {
            let a: DeviceArgs = qapi::de::from_value(args)?;
            jobs.block_job_resume(&a.device)?;
            Ok(json!({}))
        }
        "block-job-complete" => {
            let a: DeviceArgs = qapi::de::from_value(args)?;
            jobs.block_job_complete(&a.device)?;
            Ok(json!({}))
        }
        "block-job-dismiss" => {
            let a: IdArgs = qapi::de::from_value(args)?;
            jobs.block_job_dismiss(&a.id)?;
            Ok(json!({}))
        }
        "block-job-finalize" => {
            let a: IdArgs = qapi::de::from_value(args)?;
            jobs.block_job_finalize(&a.id).await?;
            Ok(json!({}))
        }
        "job-pause" | "job-resume" | "job-cancel" | "job-complete" | "job-dismiss"
        | "job-finalize" => {
            let a: IdArgs = qapi::de::from_value(args)?;
            match command {
                "job-pause" => jobs.job_pause(&a.id)?,
                "job-resume" => jobs.job_resume(&a.id)?,
                "job-cancel" => jobs.job_cancel(&a.id).await?,
                "job-complete" => jobs.job_complete(&a.id)?,
                "job-dismiss" => jobs.job_dismiss(&a.id)?,
                _ => jobs.job_finalize(&a.id).await?,
            }
            Ok(json!({}))
        }
        _ => Err(QmpError::command_not_found(format!(
            "The command {command} has not been found"
        ))),
    }
}

fn into_map(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}
