//! `transaction`: several actions applied all or nothing. Each action is prepared in order
//! (checked and applied in a form that can be taken back); the first failure takes back
//! every prepared action in reverse order and answers its error. Backup jobs are created
//! while preparing and only started once every action is in place, so a rolled-back
//! transaction leaves no job, bitmap or overlay behind.
//!
//! The nodes of every action stay drained from that action's prepare until the last
//! commit or abort (a `DrainedSection`): no client write reaches an overlay or filter that
//! may still be taken back, and the backups of several disks share one point in time.
//!
//! With `completion-mode: grouped` the backup jobs share one job transaction: if one
//! fails, the others are cancelled, and each bitmap keeps its old point in time.

use super::bitmaps::{BitmapAction, PreparedBitmapAction};
use super::internal_snapshots::{prepare_internal_snapshot, TakenInternalSnapshot};
use super::jobs::{create_blockdev_backup, create_drive_backup, start_job};
use super::snapshot::{prepare_snapshot, prepare_snapshot_sync, AppliedSnapshot};
use crate::daemon::Daemon;
use block::DrainedSection;
use jobs::{Job, JobTxn};
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::rc::Rc;
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct TransactionArgs {
    actions: Vec<Value>,
    properties: Option<Properties>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Properties {
    completion_mode: Option<CompletionMode>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
enum CompletionMode {
    #[default]
    Individual,
    Grouped,
}

/// The action types of QEMU's TransactionAction union, in its order.
const ACTION_TYPES: &[&str] = &[
    "abort",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "blockdev-backup",
    "blockdev-snapshot",
    "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-sync",
    "drive-backup",
];

/// A transaction action parsed but not prepared yet.
struct Action {
    kind: String,
    data: Map<String, Value>,
}

enum Prepared {
    Bitmap(PreparedBitmapAction),
    Backup(Arc<Job>),
    Snapshot(AppliedSnapshot),
    InternalSnapshot(TakenInternalSnapshot),
}

impl Prepared {
    fn commit(self, daemon: &Daemon) {
        match self {
            Prepared::Bitmap(action) => action.commit(),
            Prepared::Backup(job) => start_job(daemon, &job),
            Prepared::Snapshot(snapshot) => snapshot.commit(),
            Prepared::InternalSnapshot(_) => {}
        }
    }

    async fn abort(self, daemon: &Daemon) {
        match self {
            Prepared::Bitmap(action) => action.abort(),
            // A created job that never ran goes aborting -> concluded -> null and takes
            // its filter and bitmap successor with it.
            Prepared::Backup(job) => {
                if let Err(e) = job.cancel(true).await {
                    tracing::warn!(job = job.id(), "rolling back: {}", e.desc);
                }
            }
            Prepared::Snapshot(snapshot) => snapshot.undo(daemon).await,
            Prepared::InternalSnapshot(snapshot) => snapshot.undo(daemon).await,
        }
    }
}

fn parse_actions(args: &TransactionArgs) -> Result<Vec<Action>, QmpError> {
    let mut actions = Vec::with_capacity(args.actions.len());
    for (i, value) in args.actions.iter().enumerate() {
        let path = format!("actions[{i}]");
        let Value::Object(map) = value else {
            return Err(QmpError::generic(format!(
                "Invalid parameter type for '{path}', expected: object"
            )));
        };
        let kind = match map.get("type") {
            Some(Value::String(kind)) => kind.clone(),
            Some(_) => {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for '{path}.type', expected: string"
                )))
            }
            None => {
                return Err(QmpError::generic(format!(
                    "Parameter '{path}.type' is missing"
                )))
            }
        };
        if !ACTION_TYPES.contains(&kind.as_str()) {
            return Err(QmpError::generic(format!(
                "Parameter 'type' does not accept value '{kind}'"
            )));
        }
        if let Some(extra) = map.keys().find(|k| *k != "type" && *k != "data") {
            return Err(QmpError::generic(format!(
                "Parameter '{path}.{extra}' is unexpected"
            )));
        }
        let data = match map.get("data") {
            Some(Value::Object(data)) => data.clone(),
            Some(_) => {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for '{path}.data', expected: object"
                )))
            }
            None => {
                return Err(QmpError::generic(format!(
                    "Parameter '{path}.data' is missing"
                )))
            }
        };
        actions.push(Action { kind, data });
    }
    Ok(actions)
}

async fn prepare(
    daemon: &Rc<Daemon>,
    action: &Action,
    job_txn: &Option<Arc<JobTxn>>,
    drained: &Arc<DrainedSection>,
) -> Result<Prepared, QmpError> {
    let data = action.data.clone();
    match action.kind.as_str() {
        "abort" => {
            if let Some(extra) = data.keys().next() {
                return Err(QmpError::generic(format!(
                    "Parameter '{extra}' is unexpected"
                )));
            }
            Err(QmpError::generic("Transaction aborted using Abort action"))
        }
        "blockdev-backup" => Ok(Prepared::Backup(
            create_blockdev_backup(daemon, data, job_txn.clone(), drained).await?,
        )),
        "drive-backup" => Ok(Prepared::Backup(
            create_drive_backup(daemon, data, job_txn.clone(), drained).await?,
        )),
        "blockdev-snapshot" => Ok(Prepared::Snapshot(
            prepare_snapshot(daemon, data, drained).await?,
        )),
        "blockdev-snapshot-sync" => Ok(Prepared::Snapshot(
            prepare_snapshot_sync(daemon, data, drained).await?,
        )),
        "blockdev-snapshot-internal-sync" => Ok(Prepared::InternalSnapshot(
            prepare_internal_snapshot(daemon, data, drained).await?,
        )),
        kind => match BitmapAction::parse(kind, data)? {
            Some(bitmap) => {
                // A bitmap changed here must not miss a write that reaches the node
                // before the rest of the transaction is in place.
                if let Some(node) = daemon.graph.find(bitmap.node_name()) {
                    drained.add(&node).await;
                }
                Ok(Prepared::Bitmap(bitmap.prepare(&daemon.graph)?))
            }
            None => Err(QmpError::generic(format!(
                "Parameter 'type' does not accept value '{kind}'"
            ))),
        },
    }
}

pub async fn transaction(daemon: &Rc<Daemon>, args: Map<String, Value>) -> Result<Value, QmpError> {
    let args: TransactionArgs = qapi::de::from_value(Value::Object(args))?;
    let actions = parse_actions(&args)?;
    let mode = args
        .properties
        .unwrap_or_default()
        .completion_mode
        .unwrap_or_default();
    if mode == CompletionMode::Grouped {
        if let Some(action) = actions
            .iter()
            .find(|a| a.kind != "blockdev-backup" && a.kind != "drive-backup")
        {
            return Err(QmpError::generic(format!(
                "Action '{}' does not support transaction property completion-mode = grouped",
                action.kind
            )));
        }
    }
    let job_txn = (mode == CompletionMode::Grouped).then(JobTxn::new);
    let drained = DrainedSection::new(&daemon.graph);
    let mut prepared = Vec::with_capacity(actions.len());
    for action in &actions {
        match prepare(daemon, action, &job_txn, &drained).await {
            Ok(done) => prepared.push(done),
            Err(e) => {
                while let Some(done) = prepared.pop() {
                    done.abort(daemon).await;
                }
                return Err(e);
            }
        }
    }
    for done in prepared {
        done.commit(daemon);
    }
    Ok(json!({}))
}
