//! blockdev-set-active: handing images over to another process and taking them back.
//!
//! Migration ends with two processes opening one image: the source inactivates its nodes
//! (everything cached is written back, every lock released, writes refused), the target
//! takes the image over, and should the migration fail the source activates its nodes
//! again, reading anew what the target may have changed. The rules are QEMU's: a node is
//! inactivated only after every node above it, its children follow when no active node
//! uses them any more; a node is activated only after its children. A user that may write
//! keeps its node active (EPERM) unless it said it copes with an inactive one (an NBD
//! export's `allow-inactive`).
//!
//! Unlike QEMU, a call that fails part way puts back the nodes it had already changed, so
//! a refused call changes nothing, and inactivating every node is refused while a job runs.

use crate::graph::Graph;
use crate::node::{Node, Parent};
use qapi::error::QmpError;
use std::sync::Arc;

/// Why a node could not be inactivated.
enum Refusal {
    /// A parent node is still active (QEMU's text says it whole).
    ActiveParent,
    /// A user may write and needs the node active: EPERM, worded by the caller.
    InUse,
    /// The driver or the flush before it failed.
    Failed(String),
}

impl Graph {
    /// blockdev-set-active for one node (with its subtree), or for every node.
    pub async fn set_active(&self, node: Option<Arc<Node>>, active: bool) -> Result<(), QmpError> {
        let _changing = self.lock_changes().await;
        let mut changed = Vec::new();
        let result = if active {
            let nodes = match &node {
                Some(node) => vec![node.clone()],
                None => self.nodes(),
            };
            let mut result = Ok(());
            for node in nodes {
                result = self.activate(&node, &mut changed).await;
                if result.is_err() {
                    break;
                }
            }
            result.map_err(QmpError::generic)
        } else {
            let result = match &node {
                Some(node) => self.inactivate(node, &mut changed).await,
                None => self.inactivate_all(&mut changed).await,
            };
            result.map_err(|refusal| match refusal {
                Refusal::ActiveParent => QmpError::generic("Node has active parent node"),
                Refusal::InUse => QmpError::generic(format!(
                    "Failed to inactivate {}: Operation not permitted",
                    if node.is_some() { "node" } else { "all nodes" }
                )),
                Refusal::Failed(e) => QmpError::generic(e),
            })
        };
        if result.is_err() {
            self.undo(changed, active).await;
        }
        result
    }

    /// Activate `node`'s children, then the node: it takes its locks (the error is the
    /// lock conflict's), then its driver reads the image anew.
    async fn activate(&self, node: &Arc<Node>, changed: &mut Vec<Arc<Node>>) -> Result<(), String> {
        if node.is_active() {
            return Ok(());
        }
        for child in node.children() {
            Box::pin(self.activate(&child.node(), changed)).await?;
        }
        take_back(node).await?;
        changed.push(node.clone());
        Ok(())
    }

    /// Inactivate `node`, then those of its children that no active node uses any more.
    async fn inactivate(
        &self,
        node: &Arc<Node>,
        changed: &mut Vec<Arc<Node>>,
    ) -> Result<(), Refusal> {
        if !node.is_active() {
            return Ok(());
        }
        // QEMU's order: the parent nodes first, then the other users.
        let parents = node.parents();
        if parents.iter().any(|e| self.parent_is_active(e.parent())) {
            return Err(Refusal::ActiveParent);
        }
        if parents.iter().any(|e| e.keeps_active()) {
            return Err(Refusal::InUse);
        }
        if !hands_over(node) {
            return Err(Refusal::Failed(cannot_be_inactive(
                node.name(),
                node.driver().format_name(),
            )));
        }
        hand_over(node).await.map_err(Refusal::Failed)?;
        changed.push(node.clone());
        for child in node.children() {
            let child = child.node();
            let unused = child
                .parents()
                .iter()
                .all(|edge| !self.parent_is_active(edge.parent()));
            if unused {
                Box::pin(self.inactivate(&child, changed)).await?;
            }
        }
        Ok(())
    }

    /// Every node, each once all nodes above it are inactive. Refused while a job runs:
    /// qsd inactivates its nodes under it, and the job then writes to an image that is
    /// no longer its own.
    async fn inactivate_all(&self, changed: &mut Vec<Arc<Node>>) -> Result<(), Refusal> {
        let job_running = self.nodes().iter().any(|node| {
            node.parents()
                .iter()
                .any(|edge| matches!(edge.parent(), Parent::Job { .. }))
        });
        if job_running {
            return Err(Refusal::InUse);
        }
        loop {
            let nodes = self.nodes();
            let next = nodes.iter().find(|node| {
                node.is_active()
                    && node
                        .parents()
                        .iter()
                        .all(|edge| !self.parent_is_active(edge.parent()))
            });
            match next {
                Some(node) => self.inactivate(node, changed).await?,
                None if nodes.iter().any(|n| n.is_active()) => return Err(Refusal::ActiveParent),
                None => return Ok(()),
            }
        }
    }

    /// Whether an edge's parent is an active node. A node name no longer in the graph is
    /// taken as active: refusing is the safe answer.
    fn parent_is_active(&self, parent: &Parent) -> bool {
        match parent {
            Parent::Node(name) => self.find(name).is_none_or(|n| n.is_active()),
            Parent::User { .. } | Parent::Job { .. } => false,
        }
    }

    /// Put back the nodes a failed call changed, newest first (best effort: the call's own
    /// error is what the caller hears).
    async fn undo(&self, changed: Vec<Arc<Node>>, activated: bool) {
        for node in changed.into_iter().rev() {
            let put_back = if activated {
                hand_over(&node).await
            } else {
                take_back(&node).await
            };
            if let Err(e) = put_back {
                tracing::warn!(node = node.name(), "could not put the node back: {e}");
            }
        }
    }
}

/// Whether `node`'s driver keeps nothing it could not read anew (`DriverEntry::hands_over`).
/// A job's filter is no driver one can open, and is never inactive.
pub(crate) fn hands_over(node: &Node) -> bool {
    crate::open::lookup(node.driver().format_name()).is_some_and(|entry| entry.hands_over)
}

/// The refusal for a node whose driver cannot hand its image over.
pub(crate) fn cannot_be_inactive(name: &str, driver: &str) -> String {
    format!(
        "Node '{name}' ({driver}) cannot be inactive in blockd: its driver would keep serving \
         metadata read before another process changed the image"
    )
}

/// The refusal of an activation that found the image laid out anew by the process that
/// held it (another size, tables elsewhere): a driver reads its tables anew on activation,
/// not a new layout under the node's users.
pub(crate) fn layout_changed(driver: &str, what: &str) -> String {
    format!(
        "Could not activate the {driver} image: its {what} changed while the node was \
         inactive; open the image anew"
    )
}

/// Make one node inactive: it is drained, flushed and its driver writes back what it keeps,
/// then it lets go of its locks. On failure the node is as before.
async fn hand_over(node: &Arc<Node>) -> Result<(), String> {
    node.drain().await;
    let result = async {
        node.flush().await.map_err(|e| e.to_string())?;
        node.driver().inactivate(node).await?;
        node.set_active_flag(false);
        node.refresh_perms().inspect_err(|_| {
            node.set_active_flag(true);
            let _ = node.refresh_perms();
        })
    }
    .await;
    node.undrain();
    result
}

/// Make one node active: it takes its locks (the error is the lock conflict's), then its
/// driver reads the image anew. On failure the node is as before.
async fn take_back(node: &Arc<Node>) -> Result<(), String> {
    node.set_active_flag(true);
    let result = match node.refresh_perms() {
        Ok(()) => {
            node.drain().await;
            let reread = node.driver().activate(node).await;
            node.undrain();
            reread
        }
        Err(e) => Err(e),
    };
    if result.is_err() {
        node.set_active_flag(false);
        let _ = node.refresh_perms();
    }
    result
}
