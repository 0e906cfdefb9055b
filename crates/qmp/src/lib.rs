//! The QMP wire protocol, as qemu-storage-daemon speaks it: greeting, capabilities
//! negotiation, command dispatch with `id` echo, events, and QEMU's JSON reader and writer
//! (same error texts, same recovery after garbage, same output bytes). Commands themselves
//! are the [`Dispatcher`]'s business; this crate knows nothing of block devices.

#![warn(missing_docs)]

pub mod api;
mod client;
mod events;
mod json;
mod server;

pub use client::{Address, Client};
pub use events::{EventSink, EventStream};
pub use server::{Dispatcher, Server};
