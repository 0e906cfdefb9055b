//! The QEMU keyval option syntax used on the command line.
