//! qemu-storage-daemon compatible command line.
