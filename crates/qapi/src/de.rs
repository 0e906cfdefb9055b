//! QEMU-compatible deserialization of QMP arguments.
