//! QMP schema types shared by the daemon and its clients: error classes, a QEMU-compatible
//! argument deserializer, and the QEMU keyval option syntax. No I/O.

#![warn(missing_docs)]

pub mod de;
pub mod error;
pub mod json;
pub mod keyval;
