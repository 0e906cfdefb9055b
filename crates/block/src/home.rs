//! Which thread serves a node: the shared I/O threads, or the iothread object it is pinned
//! to, and QEMU's rule that nodes connected by edges live on one thread together.
//!
//! A node's home decides where work on it starts: its exports' connections and queues and
//! its jobs run there (`IoThreads::spawn_for`). Nodes are `Send + Sync`, so a request
//! that started elsewhere before a move is still served right; the home is about where
//! the CPU time goes, which is what users pin iothreads for.
//!
//! Moves take the whole connected group of nodes (through parents and children alike), as
//! QEMU's AioContext changes do, and new edges keep a group together (`join_children`,
//! `Graph::insert_filter`, `GraphChange::set_backing`). A user that must stay where it is refuses the move and
//! nothing changes: an export with `fixed-iothread`, or a block job, whose tasks run on the
//! thread it started on until it ends (QEMU moves a job along; ours cannot move). NBD
//! connections follow their node (`watch_moves`), between requests.

use crate::iothread::{IoThreads, Work};
use crate::node::{Node, Parent};
use crate::{Graph, IoThreadObject};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use tokio::sync::watch;

/// Counts moves, so that work that runs on a node's thread and can follow it (an NBD
/// connection) learns when to look again where its node lives.
static MOVES: LazyLock<watch::Sender<u64>> = LazyLock::new(|| watch::channel(0).0);

/// A receiver that sees a change whenever nodes moved to another thread.
pub fn watch_moves() -> watch::Receiver<u64> {
    MOVES.subscribe()
}

impl Node {
    /// The iothread object the node is pinned to; `None` for the shared I/O threads.
    pub fn home(&self) -> Option<Arc<IoThreadObject>> {
        self.home.lock().unwrap().clone()
    }

    /// Whether the node lives on `home` (`None`: the shared I/O threads).
    pub(crate) fn is_home(&self, home: Option<&Arc<IoThreadObject>>) -> bool {
        match (self.home.lock().unwrap().as_ref(), home) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Whether a user outside the graph holds this node (QEMU's bdrv_has_blk): an export,
    /// a job, a command's handle.
    pub fn has_backend(&self) -> bool {
        self.parents()
            .iter()
            .any(|edge| !matches!(edge.parent(), Parent::Node(_)))
    }
}

impl crate::Child {
    /// Keep the node on its current thread while this edge lives (an export's
    /// `fixed-iothread`).
    pub fn fix_home(&self) {
        self.fixed_home.store(true, Ordering::Release);
    }
}

/// `node` and every node connected to it by edges, either way.
fn group(graph: &Graph, node: &Arc<Node>) -> Vec<Arc<Node>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut todo = vec![node.clone()];
    while let Some(n) = todo.pop() {
        if !seen.insert(Arc::as_ptr(&n)) {
            continue;
        }
        todo.extend(n.children().iter().map(|c| c.node()));
        for edge in n.parents() {
            if let Parent::Node(name) = edge.parent() {
                if let Some(parent) = graph.find(name) {
                    todo.push(parent);
                }
            }
        }
        out.push(n);
    }
    out
}

/// Moves `node` and the nodes connected to it to `home` (`None`: the shared I/O threads).
/// Refused with QEMU's text, changing nothing, when an export with `fixed-iothread` uses
/// one of them, and with our own when a block job does.
pub fn set_home(
    graph: &Graph,
    node: &Arc<Node>,
    home: Option<&Arc<IoThreadObject>>,
) -> Result<(), String> {
    let nodes = group(graph, node);
    for n in &nodes {
        if n.is_home(home) {
            continue;
        }
        for edge in n.parents() {
            match edge.parent() {
                Parent::Job { id, .. } => {
                    return Err(format!(
                        "Cannot move node '{}' to another iothread while block job '{id}' \
                         runs on it",
                        n.name()
                    ))
                }
                Parent::User { .. } if edge.fixed_home.load(Ordering::Acquire) => {
                    return Err("Cannot change iothread of active block backend".into())
                }
                _ => {}
            }
        }
    }
    let mut moved = false;
    for n in &nodes {
        moved |= !n.is_home(home);
        *n.home.lock().unwrap() = home.cloned();
    }
    if moved {
        MOVES.send_modify(|count| *count = count.wrapping_add(1));
    }
    Ok(())
}

/// Brings a node just attached over `children` to where they live, as QEMU does when an
/// edge joins two nodes: the new node takes the home of the first pinned child, and the
/// other children's groups move there too (or the attach is refused).
pub fn join_children(graph: &Graph, node: &Arc<Node>) -> Result<(), String> {
    let home = node.children().iter().find_map(|c| c.node().home());
    match home {
        Some(home) => set_home(graph, node, Some(&home)),
        None => Ok(()),
    }
}

/// Whether any node of `graph` is pinned to `home` (so the object cannot be deleted).
pub fn is_home_of_any(graph: &Graph, home: &Arc<IoThreadObject>) -> bool {
    graph
        .nodes()
        .iter()
        .any(|n| n.home().is_some_and(|h| Arc::ptr_eq(&h, home)))
}

impl IoThreads {
    /// Starts `work` for `node`: on its iothread object when it is pinned to one, else on
    /// the shared threads round-robin.
    pub fn spawn_for(&self, node: &Node, work: Work) {
        match node.home() {
            Some(home) => home.spawn(work),
            None => self.spawn(work),
        }
    }

    /// Starts the `index`th of several pieces of work for `node` (a device's queues): on
    /// its iothread object when it is pinned to one, else spread over the shared threads.
    pub fn spawn_for_at(&self, node: &Node, index: usize, work: Work) {
        match node.home() {
            Some(home) => home.spawn(work),
            None => self.spawn_on(index, work),
        }
    }
}
