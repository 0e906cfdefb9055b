//! Creating a job whose setup changes the graph, as QEMU's backup_job_create,
//! mirror_start_job, stream_start and commit_start do: the job's edges, a reopen, its
//! filter, all through one [`GraphChange`] that is kept once the job exists (the job undoes
//! it when it ends) and taken back when the setup or the creation fails.

use crate::{Job, JobDriver, JobManager, JobOptions};
use block::GraphChange;
use block::{Child, Graph, Node, Parent, Perms};
use qapi::error::QmpError;
use std::sync::Arc;

/// Run `setup` on a new graph change, create the job from the driver it returns, and keep
/// the change only if both worked. The job is created, not started. Runs on an I/O thread.
pub async fn create_job<D: JobDriver + 'static>(
    graph: &Arc<Graph>,
    manager: &JobManager,
    options: JobOptions,
    setup: impl AsyncFnOnce(&mut GraphChange) -> Result<D, String>,
) -> Result<Arc<Job>, QmpError> {
    let (change, driver) = GraphChange::apply(graph, setup)
        .await
        .map_err(QmpError::generic)?;
    match manager.create(Arc::new(driver), options) {
        Ok(job) => {
            change.commit();
            Ok(job)
        }
        Err(e) => {
            change.abort().await;
            Err(e)
        }
    }
}

/// The job's claim on a node it works on: no permissions, but the node counts as busy
/// (QEMU's "main node" job edge) until the job drops it.
pub fn job_edge(
    node: &Arc<Node>,
    job_id: &str,
    job_type: &'static str,
) -> Result<Arc<Child>, String> {
    Node::attach(
        node,
        "main node",
        Parent::Job {
            id: job_id.to_string(),
            job_type,
        },
        Perms::NONE,
        Perms::ALL,
    )
}
