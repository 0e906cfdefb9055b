//! Multi-step graph changes that succeed or fail as a whole.
//!
//! A command that changes the graph in several steps (a job putting its filter in place
//! after making a node writable, a snapshot adding an overlay and moving users to it)
//! records each step in a [`GraphChange`] with what undoes it. When a later step or the
//! command itself fails, `abort` takes every step back in reverse order; when all went
//! well, `commit` keeps them. Rollback is then written once, here, instead of at each
//! failure site.
//!
//! Edges a step attaches need no record: dropping the `Child` detaches it.

use crate::graph::{Graph, OptionSyntax};
use crate::node::Node;
use crate::IoThreadObject;
use qapi::error::QmpError;
use serde_json::{Map, Value};
use std::sync::Arc;

/// What takes one step back.
enum Undo {
    /// Make the node writable (true) or read-only again.
    SetWritable(Arc<Node>, bool),
    /// Remove a filter put above `below`.
    RemoveFilter { filter: Arc<Node>, below: Arc<Node> },
    /// Give `old` back the users that moved to `new`.
    Replace { old: Arc<Node>, new: Arc<Node> },
    /// Put the node's previous backing child back.
    SetBacking(Arc<Node>, Option<Arc<Node>>),
    /// Delete a node the change added.
    Delete(String),
    /// Move the node (with its group) back to its thread.
    SetHome(Arc<Node>, Option<Arc<IoThreadObject>>),
}

/// Steps applied so far, each with its undo. Must end in `commit` or `abort`.
#[must_use = "a graph change must be committed or aborted"]
pub struct GraphChange {
    graph: Arc<Graph>,
    undo: Vec<Undo>,
}

impl GraphChange {
    /// An empty change on `graph`, for a caller that records steps one by one and ends
    /// with `commit` or `abort` itself; [`GraphChange::apply`] does both for a closure.
    pub fn new(graph: &Arc<Graph>) -> GraphChange {
        GraphChange {
            graph: graph.clone(),
            undo: Vec::new(),
        }
    }

    /// Run `steps` as one change on `graph`: when they fail, every step they took is taken
    /// back and their error returned; when they succeed, the change comes back with their
    /// result for the caller to commit (or abort, when what follows fails).
    pub async fn apply<T, E>(
        graph: &Arc<Graph>,
        steps: impl AsyncFnOnce(&mut GraphChange) -> Result<T, E>,
    ) -> Result<(GraphChange, T), E> {
        let mut change = GraphChange::new(graph);
        match steps(&mut change).await {
            Ok(done) => Ok((change, done)),
            Err(e) => {
                change.abort().await;
                Err(e)
            }
        }
    }

    /// [`Node::set_writable`], made read-only (or writable) again on abort. Nothing is
    /// recorded when the node already was as asked.
    pub async fn set_writable(&mut self, node: &Arc<Node>, writable: bool) -> Result<(), String> {
        if node.read_only() != writable {
            return Ok(());
        }
        node.set_writable(writable).await?;
        self.undo.push(Undo::SetWritable(node.clone(), !writable));
        Ok(())
    }

    /// [`Graph::insert_filter`], removed again on abort.
    pub async fn insert_filter(&mut self, below: &Arc<Node>, filter: &Arc<Node>) {
        self.graph.insert_filter(below, filter).await;
        self.undo.push(Undo::RemoveFilter {
            filter: filter.clone(),
            below: below.clone(),
        });
    }

    /// Move every user of `old` (but those `new` reaches through its own children) to
    /// `new`, requests in flight finishing first; moved back on abort.
    pub async fn replace(&mut self, old: &Arc<Node>, new: &Arc<Node>) {
        old.drain().await;
        old.replace_in_parents(new);
        old.undrain();
        self.undo.push(Undo::Replace {
            old: old.clone(),
            new: new.clone(),
        });
    }

    /// [`Node::set_backing`], the previous backing child put back on abort.
    pub async fn set_backing(
        &mut self,
        node: &Arc<Node>,
        backing: Option<&Arc<Node>>,
    ) -> Result<(), String> {
        if let Some(backing) = backing {
            // Connected nodes share a thread: the node joins its new backing's (an overlay
            // goes where the disk it snapshots is pinned), or, when it cannot move, the
            // backing joins the node's.
            if self.share_thread(node, backing).is_err() {
                self.share_thread(backing, node)?;
            }
        }
        let old = node.backing();
        node.set_backing(backing).await?;
        self.undo.push(Undo::SetBacking(node.clone(), old));
        Ok(())
    }

    /// Bring `node`, with the nodes connected to it, to the thread `to` lives on
    /// ([`crate::set_home`], whose refusal is the error), as QEMU moves a job's target into
    /// its source's AioContext; moved back on abort.
    pub fn share_thread(&mut self, node: &Arc<Node>, to: &Arc<Node>) -> Result<(), String> {
        let (old, new) = (node.home(), to.home());
        if node.is_home(new.as_ref()) {
            return Ok(());
        }
        crate::set_home(&self.graph, node, new.as_ref())?;
        self.undo.push(Undo::SetHome(node.clone(), old));
        Ok(())
    }

    /// [`Graph::add`] (blockdev-add), the node deleted again on abort.
    pub async fn add(
        &mut self,
        options: Map<String, Value>,
        syntax: OptionSyntax,
    ) -> Result<Arc<Node>, QmpError> {
        let node = self.graph.add(options, syntax).await?;
        self.undo.push(Undo::Delete(node.name().to_string()));
        Ok(node)
    }

    /// Keep every step.
    pub fn commit(mut self) {
        self.undo.clear();
    }

    /// Take every step back, the last first. Undoing can fail only where the image itself
    /// fails (a reopen, a header write); that is logged and the rest still undone.
    pub async fn abort(mut self) {
        while let Some(step) = self.undo.pop() {
            match step {
                Undo::SetWritable(node, writable) => {
                    if let Err(e) = node.set_writable(writable).await {
                        tracing::warn!(node = node.name(), "rolling back a reopen: {e}");
                    }
                }
                Undo::RemoveFilter { filter, below } => {
                    self.graph.remove_filter(&filter, &below).await
                }
                Undo::Replace { old, new } => {
                    new.drain().await;
                    new.replace_in_parents(&old);
                    new.undrain();
                }
                Undo::SetBacking(node, old) => {
                    if let Err(e) = node.set_backing(old.as_ref()).await {
                        tracing::warn!(node = node.name(), "rolling back a backing change: {e}");
                    }
                }
                Undo::Delete(name) => {
                    if let Err(e) = self.graph.del(&name).await {
                        tracing::warn!(node = name, "rolling back an added node: {}", e.desc);
                    }
                }
                Undo::SetHome(node, home) => {
                    if let Err(e) = crate::set_home(&self.graph, &node, home.as_ref()) {
                        tracing::warn!(node = node.name(), "rolling back a thread move: {e}");
                    }
                }
            }
        }
    }
}

impl Drop for GraphChange {
    fn drop(&mut self) {
        if !self.undo.is_empty() {
            tracing::error!(
                steps = self.undo.len(),
                "a graph change was dropped without commit or abort; its steps stay"
            );
        }
    }
}
