//! The block layer: the node graph, the driver trait and drivers, permissions, I/O threads.

#![warn(missing_docs)]

mod active;
mod bitmap;
mod change;
mod copy;
mod create;
mod drain;
mod drivers;
mod foreground;
mod graph;
mod home;
mod info;
mod iothread;
mod iothread_object;
mod node;
mod objects;
mod open;
mod perm;
mod range_lock;
mod stats;
mod threshold;
mod throttle;

pub use bitmap::{default_granularity, DirtyBitmap};
pub use change::GraphChange;
pub use copy::{BlockCopy, ClusterBitmap, CopyError, TargetMode};
pub use create::{
    create_image, FileCreate, LuksCreate, NewImage, ParallelsCreate, Qcow2Create, QcowCreate,
    QedCreate, VdiCreate, VpcCreate,
};
pub use drain::DrainedSection;
pub use drivers::blklogwrites::LogWalk as BlkLogWalk;
pub use drivers::bochs::Header as BochsHeader;
pub use drivers::cbw::{check_min_cluster_size, CopyBeforeWrite, OnCbwError};
pub use drivers::cloop::Header as CloopHeader;
pub use drivers::cor::CopyOnRead;
pub use drivers::dmg::parse_image as dmg_parse_image;
pub use drivers::file::os_error_text;
pub use drivers::luks::KeyslotAmend;
pub use drivers::mirror_top::{MirrorState, MirrorTop};
pub use drivers::nbd::{InetServer, UnixServer};
pub use drivers::parallels::Header as ParallelsHeader;
pub use drivers::qcow::Header as QcowHeader;
pub use drivers::qcow2::Qcow2Header;
pub use drivers::qed::Header as QedHeader;
pub use drivers::rbd::RbdCreate;
pub use drivers::ssh::SshCreate;
pub use drivers::throttle::set_io_throttle;
pub use drivers::vdi::Header as VdiHeader;
pub use drivers::vhdx::{format as vhdx_format, VhdxCreate};
pub use drivers::vmdk::descriptor::Descriptor as VmdkDescriptor;
pub use drivers::vmdk::sesparse::{
    check_volatile as vmdk_sesparse_check_volatile, SeSparseHeader as VmdkSeSparseHeader,
};
pub use drivers::vmdk::sparse::{
    footer_header as vmdk_footer_header, SparseHeader as VmdkSparseHeader,
};
pub use drivers::vmdk::{CreateTarget as VmdkTarget, VmdkCreate};
pub use drivers::vpc::{footer_size as vpc_footer_size, DynamicHeader as VpcDynamicHeader};
pub use foreground::Foreground;
pub use graph::{EventHook, Graph, OptionSyntax, QEMU_DRIVERS};
pub use home::{is_home_of_any, join_children, set_home, watch_moves};
pub use info::{block_graph, named_block_nodes};
pub use iothread::{set_trim_hook, trim_when_idle, IoThreads, Panicked, Work};
pub use iothread_object::{IoThreadObject, IoThreadOptions};
pub use node::{
    busy_error, job_blocker, would_cycle_message, ChainExtent, Child, CommonOptions, Driver,
    ExtentKind, Node, Parent, SnapshotInfo, WriteFlags,
};
pub use objects::Objects;
pub use open::driver_names;
pub use perm::Perms;
pub use range_lock::RangeLock;
pub use stats::{block_stats, IoKind, KindSnapshot, NodeStats, LATENCY_BOUNDS_NS};
pub use throttle::{ThrottleConfig, ThrottleGroup, ThrottleLimits};
