//! Block drivers: each file does one format or protocol's own work and nothing else.

pub mod blkdebug;
pub(crate) mod block_map;
pub mod bochs;
pub mod cbw;
pub mod cloop;
pub mod compress;
pub mod cor;
pub mod dmg;
pub(crate) mod fields;
pub mod file;
pub mod luks;
pub mod mirror_top;
pub mod nbd;
pub mod null;
pub mod parallels;
pub mod qcow;
pub mod qcow2;
pub mod qed;
pub mod raw;
pub mod rbd;
pub(crate) mod read_only;
pub mod throttle;
pub mod vdi;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;
