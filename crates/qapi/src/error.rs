//! QMP error classes and errors.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The `class` of a QMP error reply, spelled as QEMU spells it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorClass {
    /// `GenericError`: the class of almost every error; only the `desc` text tells them
    /// apart.
    GenericError,
    /// `CommandNotFound`: the command does not exist, or is not allowed before
    /// `qmp_capabilities` (and vice versa).
    CommandNotFound,
    /// `DeviceNotFound`: the named device, node or QOM path does not exist. Only where QEMU
    /// uses this class (`qom-get`, `qom-set`, `block_set_io_throttle`); most failed lookups
    /// are `GenericError`.
    DeviceNotFound,
    /// `DeviceNotActive` (QEMU: "a device has failed to become active"); in practice the
    /// answer to a `block-job-*` command naming no block job.
    DeviceNotActive,
    /// `KVMMissingCap`: a KVM capability is missing. A storage daemon never sends it; it is
    /// here so that every class QEMU defines deserializes.
    KVMMissingCap,
}

impl ErrorClass {
    /// The wire name, e.g. `GenericError`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GenericError => "GenericError",
            Self::CommandNotFound => "CommandNotFound",
            Self::DeviceNotFound => "DeviceNotFound",
            Self::DeviceNotActive => "DeviceNotActive",
            Self::KVMMissingCap => "KVMMissingCap",
        }
    }
}

/// A QMP error: serializes to the `{"class": ..., "desc": ...}` body of an error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QmpError {
    /// The error class (QMP `class`).
    pub class: ErrorClass,
    /// The human-readable message (QMP `desc`), worded as QEMU words it, since clients and
    /// tests compare it.
    pub desc: String,
}

impl QmpError {
    /// An error of `class` with message `desc`.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        Self {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError` with message `desc`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// A `CommandNotFound` error with message `desc`.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::CommandNotFound, desc)
    }

    /// A `DeviceNotFound` error with message `desc`.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotFound, desc)
    }

    /// A `DeviceNotActive` error with message `desc`.
    pub fn device_not_active(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotActive, desc)
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for QmpError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_like_qemu() {
        let e = QmpError::device_not_active("Block job 'j' not found");
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"class":"DeviceNotActive","desc":"Block job 'j' not found"}"#
        );
        let back: QmpError =
            serde_json::from_str(r#"{"class":"KVMMissingCap","desc":"x"}"#).unwrap();
        assert_eq!(back.class, ErrorClass::KVMMissingCap);
        assert_eq!(back.class.as_str(), "KVMMissingCap");
        assert_eq!(QmpError::generic("boom").to_string(), "boom");
    }
}
