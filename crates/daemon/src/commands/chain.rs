//! Backing-chain jobs: block-stream and block-commit (intermediate, and active commit
//! which runs as a mirror into the base).

use super::mirror::create_and_start_job;
use crate::daemon::Daemon;
use block::{Node, Perms};
use jobs::CommitStart;
use jobs::StreamStart;
use jobs::{JobOptions, OnError};
use jobs::{MirrorConfig, MirrorStart, MirrorSync};
use qapi::error::{ErrorClass, QmpError};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::rc::Rc;
use std::sync::Arc;

#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct StreamArgs {
    job_id: Option<String>,
    device: String,
    base: Option<String>,
    base_node: Option<String>,
    backing_file: Option<String>,
    /// Only matters for protocol-prefixed names, which blockd's files never carry.
    #[serde(rename = "backing-mask-protocol")]
    _backing_mask_protocol: Option<bool>,
    bottom: Option<String>,
    speed: Option<i64>,
    on_error: Option<OnError>,
    filter_node_name: Option<String>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct CommitArgs {
    job_id: Option<String>,
    device: String,
    base_node: Option<String>,
    base: Option<String>,
    top_node: Option<String>,
    top: Option<String>,
    backing_file: Option<String>,
    #[serde(rename = "backing-mask-protocol")]
    _backing_mask_protocol: Option<bool>,
    speed: Option<i64>,
    on_error: Option<OnError>,
    filter_node_name: Option<String>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
}

/// `node` and the nodes below it through backing edges (looking through filters), each
/// once.
fn chain_of(node: &Arc<Node>) -> Vec<Arc<Node>> {
    let mut chain = vec![node.clone()];
    while let Some(next) = chain.last().and_then(|n| n.skip_filters().backing()) {
        if chain.iter().any(|n| Arc::ptr_eq(n, &next)) {
            break;
        }
        chain.push(next);
    }
    chain
}

/// A node of the chain below `top` whose image is `filename`.
fn find_by_filename(top: &Arc<Node>, filename: &str) -> Option<Arc<Node>> {
    chain_of(top).into_iter().skip(1).find(|n| {
        let info = n.driver().info(n);
        // The same file under another spelling (relative path, symlink) counts too.
        info.filename == filename
            || matches!(
                (std::fs::canonicalize(&info.filename), std::fs::canonicalize(filename)),
                (Ok(a), Ok(b)) if a == b
            )
    })
}

fn busy_check(nodes: &[Arc<Node>]) -> Result<(), QmpError> {
    nodes.iter().try_for_each(|node| node.check_no_job())
}

fn check_job_id(daemon: &Daemon, job_id: &str) -> Result<(), QmpError> {
    if !jobs::is_valid_id(job_id) {
        return Err(QmpError::generic(format!("Invalid job ID '{job_id}'")));
    }
    if daemon.jobs.get(job_id).is_some() {
        return Err(QmpError::generic(format!(
            "Job ID '{job_id}' already in use"
        )));
    }
    Ok(())
}

fn check_filter_name(daemon: &Daemon, name: &Option<String>) -> Result<String, QmpError> {
    match name {
        Some(name) if daemon.graph.find(name).is_some() => Err(QmpError::generic(format!(
            "Duplicate nodes with node-name='{name}'"
        ))),
        Some(name) => Ok(name.clone()),
        None => Ok(daemon.graph.generate_name()),
    }
}

fn job_options(
    job_id: String,
    speed: Option<i64>,
    on_error: Option<OnError>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
) -> JobOptions {
    let mut options = JobOptions::new(job_id);
    options.speed = speed.unwrap_or(0);
    options.auto_finalize = auto_finalize.unwrap_or(true);
    options.auto_dismiss = auto_dismiss.unwrap_or(true);
    let policy = on_error.unwrap_or(OnError::Report);
    options.on_source_error = policy;
    options.on_target_error = policy;
    options
}

pub async fn block_stream(
    daemon: &Rc<Daemon>,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    let args: StreamArgs = qapi::de::from_value(Value::Object(args))?;
    let device = daemon.graph.lookup(&args.device)?;
    if args.base.is_some() && args.base_node.is_some() {
        return Err(QmpError::generic(
            "'base' and 'base-node' cannot be specified at the same time",
        ));
    }
    if args.base.is_some() && args.bottom.is_some() {
        return Err(QmpError::generic(
            "'base' and 'bottom' cannot be specified at the same time",
        ));
    }
    if args.base_node.is_some() && args.bottom.is_some() {
        return Err(QmpError::generic(
            "'bottom' and 'base-node' cannot be specified at the same time",
        ));
    }
    let chain = chain_of(&device);
    let base = if let Some(name) = &args.base {
        Some(find_by_filename(&device, name).ok_or_else(|| {
            QmpError::generic(format!("Can't find '{name}' in the backing chain"))
        })?)
    } else if let Some(name) = &args.base_node {
        let base = daemon.graph.lookup_node(name)?;
        if !chain.iter().skip(1).any(|n| Arc::ptr_eq(n, &base)) {
            return Err(QmpError::generic(format!(
                "Node '{name}' is not a backing image of '{}'",
                args.device
            )));
        }
        Some(base)
    } else if let Some(name) = &args.bottom {
        let bottom = daemon.graph.lookup_node(name)?;
        if !chain.iter().skip(1).any(|n| Arc::ptr_eq(n, &bottom)) {
            return Err(QmpError::generic(format!(
                "Node '{name}' is not in a chain starting from '{}'",
                args.device
            )));
        }
        bottom.skip_filters().backing()
    } else {
        None
    };
    if base.is_none() && args.backing_file.is_some() {
        return Err(QmpError::generic(
            "backing file specified, but streaming the entire chain",
        ));
    }
    // The device and every layer that leaves the chain belong to the job.
    let streamed: Vec<Arc<Node>> = chain
        .iter()
        .take_while(|n| base.as_ref().is_none_or(|b| !Arc::ptr_eq(n, b)))
        .cloned()
        .collect();
    busy_check(&streamed)?;
    let job_id = args.job_id.clone().unwrap_or_else(|| args.device.clone());
    check_job_id(daemon, &job_id)?;
    let filter_name = check_filter_name(daemon, &args.filter_node_name)?;

    let options = job_options(
        job_id,
        args.speed,
        args.on_error,
        args.auto_finalize,
        args.auto_dismiss,
    );
    let start = StreamStart {
        graph: daemon.graph.clone(),
        device,
        base,
        streamed,
        filter_name,
        backing_file: args.backing_file.clone(),
    };
    create_and_start_job(daemon, move |manager| async move {
        jobs::create_stream(start, &manager, options).await
    })
    .await
}

pub async fn block_commit(
    daemon: &Rc<Daemon>,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    let args: CommitArgs = qapi::de::from_value(Value::Object(args))?;
    let device = daemon.graph.find(&args.device).ok_or_else(|| QmpError {
        class: ErrorClass::DeviceNotFound,
        desc: format!("Device '{}' not found", args.device),
    })?;
    if !device.is_root() {
        return Err(QmpError::generic("Need a root block node"));
    }
    if args.top_node.is_some() && args.top.is_some() {
        return Err(QmpError::generic(
            "'top-node' and 'top' are mutually exclusive",
        ));
    }
    let chain = chain_of(&device);
    let top = if let Some(name) = &args.top_node {
        let top = daemon.graph.lookup_node(name)?;
        if !chain.iter().any(|n| Arc::ptr_eq(n, &top)) {
            return Err(QmpError::generic(format!(
                "'{name}' is not in this backing file chain"
            )));
        }
        top
    } else if let Some(name) = &args.top {
        if device.driver().info(&device).filename == *name {
            device.clone()
        } else {
            find_by_filename(&device, name)
                .ok_or_else(|| QmpError::generic(format!("Top image file {name} not found")))?
        }
    } else {
        device.clone()
    };
    if args.base_node.is_some() && args.base.is_some() {
        return Err(QmpError::generic(
            "'base-node' and 'base' are mutually exclusive",
        ));
    }
    let base = if let Some(name) = &args.base_node {
        let base = daemon.graph.lookup_node(name)?;
        if !chain_of(&top).iter().any(|n| Arc::ptr_eq(n, &base)) {
            return Err(QmpError::generic(format!(
                "'{name}' is not in this backing file chain"
            )));
        }
        base
    } else if let Some(name) = &args.base {
        find_by_filename(&top, name)
            .ok_or_else(|| QmpError::generic(format!("Can't find '{name}' in the backing chain")))?
    } else {
        // The bottom of the chain, which is `top` itself when it has no backing.
        chain_of(&top).last().unwrap_or(&top).clone()
    };
    if Arc::ptr_eq(&top, &base) {
        return Err(QmpError::generic("cannot commit an image into itself"));
    }
    let top_chain = chain_of(&top);
    if !top_chain.iter().skip(1).any(|n| Arc::ptr_eq(n, &base)) {
        return Err(QmpError::generic(format!(
            "'{}' is not in this backing file chain",
            base.name()
        )));
    }
    let active = Arc::ptr_eq(&top, &device);
    if active && args.backing_file.is_some() {
        return Err(QmpError::generic(
            "'backing-file' specified, but 'top' is the active layer",
        ));
    }
    // The overlay of an intermediate top is the job's too: its backing changes.
    let overlay = chain
        .iter()
        .find(|n| {
            n.skip_filters()
                .backing()
                .is_some_and(|b| Arc::ptr_eq(&b, &top))
        })
        .cloned();
    let committed: Vec<Arc<Node>> = overlay
        .iter()
        .cloned()
        .chain(
            top_chain
                .iter()
                .take_while(|n| !Arc::ptr_eq(n, &base))
                .cloned(),
        )
        .chain(std::iter::once(base.clone()))
        .collect();
    busy_check(&committed)?;
    let job_id = args.job_id.clone().unwrap_or_else(|| args.device.clone());
    check_job_id(daemon, &job_id)?;
    let options = job_options(
        job_id.clone(),
        args.speed,
        args.on_error,
        args.auto_finalize,
        args.auto_dismiss,
    );
    if active {
        return start_active_commit(daemon, args, top, base, committed, options).await;
    }
    let overlay = overlay.ok_or_else(|| QmpError::generic("Could not find overlay image"))?;
    let start = CommitStart {
        graph: daemon.graph.clone(),
        top,
        base,
        overlay,
        committed,
        backing_file: args.backing_file.clone(),
    };
    create_and_start_job(daemon, move |manager| async move {
        jobs::create_commit(start, &manager, options).await
    })
    .await
}

async fn start_active_commit(
    daemon: &Rc<Daemon>,
    args: CommitArgs,
    top: Arc<Node>,
    base: Arc<Node>,
    committed: Vec<Arc<Node>>,
    options: JobOptions,
) -> Result<Value, QmpError> {
    let filter_name = check_filter_name(daemon, &args.filter_node_name)?;
    let granularity = block::default_granularity(base.driver().info(&base).cluster_size);
    let config = MirrorConfig {
        sync: MirrorSync::Full,
        buf_size: 16 << 20,
        unmap: false,
        replaces: None,
        commit_base: true,
        target_backing: None,
        target_is_zero: false,
        // Set by the setup when it reopens the base.
        target_reopened: false,
        auto_write_blocking: false,
    };
    let start = MirrorStart {
        graph: daemon.graph.clone(),
        source: top,
        target: base,
        filter_name,
        job_type: "commit",
        granularity,
        write_blocking: false,
        target_perm: Perms::WRITE | Perms::RESIZE,
        reopen_target: true,
        busy: committed,
        config,
    };
    create_and_start_job(daemon, move |manager| async move {
        jobs::create_mirror(start, &manager, options).await
    })
    .await
}
