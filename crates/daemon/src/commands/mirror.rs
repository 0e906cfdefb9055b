//! Mirror commands: blockdev-mirror, drive-mirror and block-job-change.

use crate::daemon::Daemon;
use block::{Node, Perms};
use jobs::{Job, JobManager, JobOptions, OnError};
use jobs::{MirrorConfig, MirrorStart, MirrorSync};
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::rc::Rc;
use std::sync::Arc;

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "kebab-case")]
enum SyncArg {
    Top,
    Full,
    None,
    Incremental,
    Bitmap,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "kebab-case")]
enum CopyMode {
    #[default]
    Background,
    WriteBlocking,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "kebab-case")]
enum NewImageMode {
    Existing,
    AbsolutePaths,
}

/// The members of blockdev-mirror and drive-mirror; each command refuses the other's own.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct MirrorArgs {
    job_id: Option<String>,
    device: String,
    target: String,
    replaces: Option<String>,
    sync: SyncArg,
    speed: Option<i64>,
    granularity: Option<u32>,
    buf_size: Option<i64>,
    on_source_error: Option<OnError>,
    on_target_error: Option<OnError>,
    copy_mode: Option<CopyMode>,
    /// blockd's own: switch to write-blocking when background copying cannot converge.
    x_auto_write_blocking: Option<bool>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
    /// blockdev-mirror only.
    filter_node_name: Option<String>,
    /// blockdev-mirror only: the user vouches the target reads as zeroes.
    target_is_zero: Option<bool>,
    /// drive-mirror only.
    format: Option<String>,
    /// drive-mirror only: the new target's node name.
    node_name: Option<String>,
    /// drive-mirror only.
    mode: Option<NewImageMode>,
    /// drive-mirror only.
    unmap: Option<bool>,
}

const DEFAULT_BUF_SIZE: u64 = 16 << 20;

fn refuse_members(args: &Map<String, Value>, members: &[&str]) -> Result<(), QmpError> {
    for key in members {
        if args.contains_key(*key) {
            return Err(QmpError::generic(format!(
                "Parameter '{key}' is unexpected"
            )));
        }
    }
    Ok(())
}

pub async fn blockdev_mirror(
    daemon: &Rc<Daemon>,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    refuse_members(&args, &["format", "node-name", "mode", "unmap"])?;
    let args: MirrorArgs = qapi::de::from_value(Value::Object(args))?;
    let source = daemon.graph.lookup_root(&args.device)?;
    let target = daemon.graph.lookup(&args.target)?;
    let target_is_zero = args.target_is_zero.unwrap_or(false);
    start_mirror(daemon, args, source, target, target_is_zero, None).await
}

pub async fn drive_mirror(
    daemon: &Rc<Daemon>,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    refuse_members(&args, &["filter-node-name", "target-is-zero"])?;
    let args: MirrorArgs = qapi::de::from_value(Value::Object(args))?;
    let source = daemon.graph.lookup_root(&args.device)?;
    if args.replaces.is_some() && args.node_name.is_none() {
        return Err(QmpError::generic(
            "a node-name must be provided when replacing a named node of the graph",
        ));
    }
    check_sync(args.sync)?;
    let format = args
        .format
        .clone()
        .unwrap_or_else(|| source.driver().format_name().to_string());
    let mode = args.mode.unwrap_or(NewImageMode::AbsolutePaths);
    // sync=top keeps the source's backing under the new image, sync=none the source itself.
    let backing_node = match args.sync {
        SyncArg::Top => source.skip_filters().backing(),
        SyncArg::None => Some(source.clone()),
        _ => None,
    };
    if mode == NewImageMode::AbsolutePaths {
        super::create_image_file(
            daemon,
            &args.target,
            &format,
            source.size(),
            backing_node.as_ref(),
        )
        .await?;
    }
    let mut options = Map::new();
    if let Some(name) = &args.node_name {
        options.insert("node-name".into(), json!(name));
    }
    options.insert("driver".into(), json!(format));
    options.insert(
        "file".into(),
        json!({"driver": "file", "filename": args.target}),
    );
    if format == "qcow2" {
        // The backing chain is already open under the source; the target shares it at
        // completion instead of opening it a second time.
        options.insert("backing".into(), Value::Null);
    }
    let graph = daemon.graph.clone();
    let target = daemon
        .io
        .run(move || async move { graph.open_implicit(options).await })
        .await?;
    let target_is_zero = mode == NewImageMode::AbsolutePaths && backing_node.is_none();
    start_mirror(daemon, args, source, target, target_is_zero, backing_node).await
}

fn check_sync(sync: SyncArg) -> Result<(), QmpError> {
    match sync {
        SyncArg::Incremental => Err(QmpError::generic("Sync mode 'incremental' not supported")),
        SyncArg::Bitmap => Err(QmpError::generic("Sync mode 'bitmap' not supported")),
        _ => Ok(()),
    }
}

/// Checks and filter insertion shared by both commands.
async fn start_mirror(
    daemon: &Rc<Daemon>,
    args: MirrorArgs,
    source: Arc<Node>,
    target: Arc<Node>,
    target_is_zero: bool,
    target_backing: Option<Arc<Node>>,
) -> Result<Value, QmpError> {
    let granularity = match args.granularity {
        None | Some(0) => block::default_granularity(target.driver().info(&target).cluster_size),
        Some(g) => {
            if !(512..=64 << 20).contains(&g) {
                return Err(QmpError::generic(
                    "Parameter 'granularity' expects a value in range [512B, 64MB]",
                ));
            }
            if !g.is_power_of_two() {
                return Err(QmpError::generic(
                    "Parameter 'granularity' expects a power of 2",
                ));
            }
            u64::from(g)
        }
    };
    let buf_size = match args.buf_size {
        None | Some(0) => DEFAULT_BUF_SIZE,
        Some(n) if n > 0 => n as u64,
        Some(_) => return Err(QmpError::generic("Invalid parameter 'buf-size'")),
    };
    check_sync(args.sync)?;
    source.check_no_job()?;
    target.check_no_job()?;
    if Arc::ptr_eq(&source, &target) {
        return Err(QmpError::generic("Can't mirror node into itself"));
    }
    let replaces = match &args.replaces {
        Some(name) => Some(daemon.graph.find(name).ok_or_else(|| {
            QmpError::generic(format!("Failed to find node with node-name='{name}'"))
        })?),
        None => None,
    };
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
    if let Some(name) = &args.filter_node_name {
        if daemon.graph.find(name).is_some() {
            return Err(QmpError::generic(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
    }
    let sync = match args.sync {
        SyncArg::Full => MirrorSync::Full,
        SyncArg::Top => MirrorSync::Top,
        _ => MirrorSync::None,
    };
    let filter_name = args
        .filter_node_name
        .clone()
        .unwrap_or_else(|| daemon.graph.generate_name());
    let write_blocking = args.copy_mode.unwrap_or_default() == CopyMode::WriteBlocking;
    let config = MirrorConfig {
        sync,
        buf_size,
        unmap: args.unmap.unwrap_or(true),
        replaces,
        commit_base: false,
        target_backing,
        target_is_zero,
        target_reopened: false,
        auto_write_blocking: args.x_auto_write_blocking.unwrap_or(false),
    };
    let mut options = JobOptions::new(job_id);
    options.speed = args.speed.unwrap_or(0);
    options.auto_finalize = args.auto_finalize.unwrap_or(true);
    options.auto_dismiss = args.auto_dismiss.unwrap_or(true);
    options.on_source_error = args.on_source_error.unwrap_or(OnError::Report);
    options.on_target_error = args.on_target_error.unwrap_or(OnError::Report);
    let start = MirrorStart {
        graph: daemon.graph.clone(),
        source,
        target,
        filter_name,
        job_type: "mirror",
        granularity,
        write_blocking,
        target_perm: Perms::WRITE,
        reopen_target: false,
        busy: Vec::new(),
        config,
    };
    create_and_start_job(daemon, move |manager| async move {
        jobs::create_mirror(start, &manager, options).await
    })
    .await
}

/// Create a job on an I/O thread with `create` (one of the jobs crate's `create`
/// functions, which take back their setup when they fail) and start it.
pub(super) async fn create_and_start_job<F, Fut>(
    daemon: &Rc<Daemon>,
    create: F,
) -> Result<Value, QmpError>
where
    F: FnOnce(Arc<JobManager>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Arc<Job>, QmpError>> + 'static,
{
    let manager = daemon.jobs.clone();
    let job = daemon.io.run(move || create(manager)).await?;
    super::jobs::start_job(daemon, &job);
    Ok(json!({}))
}

/// BlockJobChangeOptions: a union on the job type where only `mirror` has members.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct MirrorChangeArgs {
    id: String,
    #[serde(rename = "type")]
    _job_type: String,
    #[serde(rename = "copy-mode")]
    _copy_mode: CopyMode,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OtherChangeArgs {
    id: String,
    #[serde(rename = "type")]
    _job_type: String,
}

/// QEMU's JobType values, all valid in block-job-change's `type`.
const JOB_TYPES: &[&str] = &[
    "commit",
    "stream",
    "mirror",
    "backup",
    "create",
    "amend",
    "snapshot-load",
    "snapshot-save",
    "snapshot-delete",
];

/// A change whose type is not the job's own changes nothing, as in qsd.
pub fn block_job_change(daemon: &Rc<Daemon>, args: Map<String, Value>) -> Result<Value, QmpError> {
    let id = match args.get("type") {
        None => return Err(QmpError::generic("Parameter 'type' is missing")),
        Some(Value::String(t)) if !JOB_TYPES.contains(&t.as_str()) => {
            return Err(QmpError::generic(format!(
                "Parameter 'type' does not accept value '{t}'"
            )))
        }
        Some(Value::String(t)) if t == "mirror" => {
            qapi::de::from_value::<MirrorChangeArgs>(Value::Object(args.clone()))?.id
        }
        _ => qapi::de::from_value::<OtherChangeArgs>(Value::Object(args.clone()))?.id,
    };
    daemon.jobs.block_job_change(&id, &args)?;
    Ok(json!({}))
}
