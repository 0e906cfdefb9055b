//! File I/O for blockd's block layer: io_uring per I/O thread, thread-pool fallback, bounce
//! buffers owned by in-flight requests, QEMU-compatible image locking, imago `Storage`.

#![warn(missing_docs)]

mod file;
mod iobuf;
pub mod lock;
mod op;
pub mod pool;
mod ring;
mod storage;

pub use file::{Engine, ImageFile, OpenOptions};
pub use iobuf::IoBuf;
pub use lock::{LockConflict, Locking, Perms};
pub use ring::{
    init_thread, set_thread_max_batch, thread_has_completions, thread_has_ring,
    thread_ring_counters, uring_available, RingCounters,
};
