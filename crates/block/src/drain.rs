//! Drained sections: a set of nodes that take no new requests until the section ends.
//!
//! A `transaction` (and each command that is a transaction of one action in QEMU) changes
//! several nodes that must reach one point in time together, and must not let a write
//! land in a node it may still take back. Each action adds the nodes it works on, and the
//! nodes it puts in their place, before it changes anything; the section is released only
//! after the last commit or abort. Requests that arrive meanwhile wait at the edge and go
//! to whatever node the edge points at once the section ends (see `Child::enter`).

use crate::graph::Graph;
use crate::node::Node;
use std::sync::{Arc, Mutex};

/// Nodes kept drained until the last handle to the section is dropped.
pub struct DrainedSection {
    graph: Arc<Graph>,
    nodes: Mutex<Vec<Arc<Node>>>,
}

impl DrainedSection {
    /// An empty section on `graph`; nodes join it with [`DrainedSection::add`]. Shared
    /// (`Arc`) so each action of a transaction can hold it until the last one ends.
    pub fn new(graph: &Arc<Graph>) -> Arc<DrainedSection> {
        Arc::new(DrainedSection {
            graph: graph.clone(),
            nodes: Mutex::new(Vec::new()),
        })
    }

    /// Drain `node` for the rest of the section, and first every node above it: a parent
    /// drained after its child could wait forever for its own request held at the child.
    pub async fn add(&self, node: &Arc<Node>) {
        for node in self.top_down(node) {
            if self.claim(&node) {
                node.wait_idle().await;
            }
        }
    }

    /// Quiesce `node` and record it, unless the section holds it already.
    fn claim(&self, node: &Arc<Node>) -> bool {
        let mut nodes = self.nodes.lock().unwrap();
        if nodes.iter().any(|n| Arc::ptr_eq(n, node)) {
            return false;
        }
        node.quiesce();
        nodes.push(node.clone());
        true
    }

    /// `node` and the nodes above it, each after all of its own parents.
    fn top_down(&self, node: &Arc<Node>) -> Vec<Arc<Node>> {
        let mut order: Vec<Arc<Node>> = Vec::new();
        self.visit(node, &mut order, &mut Vec::new());
        order
    }

    /// Depth-first over parent edges, emitting a node once all its parents are emitted.
    /// `path` guards against a cycle, which the graph refuses but a walk need not trust.
    fn visit(&self, node: &Arc<Node>, order: &mut Vec<Arc<Node>>, path: &mut Vec<Arc<Node>>) {
        if order
            .iter()
            .chain(path.iter())
            .any(|n| Arc::ptr_eq(n, node))
        {
            return;
        }
        path.push(node.clone());
        for edge in node.parents() {
            if let Some(parent) = edge.parent_node_name().and_then(|n| self.graph.find(n)) {
                self.visit(&parent, order, path);
            }
        }
        path.pop();
        order.push(node.clone());
    }
}

impl Drop for DrainedSection {
    fn drop(&mut self) {
        for node in self.nodes.get_mut().unwrap().drain(..) {
            node.undrain();
        }
    }
}
