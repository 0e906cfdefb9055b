//! NBD (Network Block Device) protocol: a server that exposes exports through the
//! [`Backend`] trait and a pipelining client, with structured replies and block status.
//!
//! The crate knows nothing of the block layer: the daemon plugs nodes in as backends and
//! places connections on its I/O threads through a [`Spawner`].

#![warn(missing_docs)]

pub mod backend;
pub mod client;
pub mod inet;
pub mod proto;
pub mod server;
mod socket;
pub mod spawn;
pub mod tls;

pub use backend::{Backend, BlockSize, Capabilities, MetaContext, StatusExtent, ZeroFlags};
pub use client::{Client, ClientOptions, ClientTls, ConnectAddr};
pub use inet::InetOptions;
pub use server::{
    Authorize, ExportError, ExportOptions, ListenAddr, NbdServer, ServerConfig, ServerEvent,
    ServerTls,
};
pub use socket::listen_unix_private;
pub use spawn::{LocalSpawner, Spawner, ThreadSpawner, Work};
pub use tls::{Endpoint, TlsCreds, X509Options};
