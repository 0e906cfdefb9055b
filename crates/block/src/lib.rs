//! The block layer: the node graph, the driver trait and drivers, permissions, I/O threads.

pub mod bitmap;
pub mod change;
pub mod copy;
pub mod create;
pub mod drain;
pub mod drivers;
pub mod graph;
pub mod info;
pub mod iothread;
pub mod node;
pub mod open;
pub mod perm;
pub mod range_lock;
pub mod stats;
pub mod threshold;
pub mod throttle;

pub use drain::DrainedSection;
pub use graph::{Graph, OptionSyntax};
pub use iothread::IoThreads;
pub use node::{Child, Driver, Node, Parent, WriteFlags};
pub use perm::Perms;
