//! Block drivers: each file does one format or protocol's own work and nothing else.

pub mod blkdebug;
pub mod blklogwrites;
pub mod blkverify;
pub(crate) mod block_map;
pub mod bochs;
pub mod cbw;
pub mod cloop;
pub mod compress;
pub mod cor;
pub mod dmg;
pub(crate) mod fields;
pub mod file;
pub mod ftp;
pub mod http;
pub mod luks;
pub mod mirror_top;
pub mod nbd;
pub mod null;
pub mod parallels;
pub mod preallocate;
pub mod qcow;
pub mod qcow2;
pub mod qed;
pub mod quorum;
pub mod raw;
pub mod rbd;
pub(crate) mod read_only;
pub(crate) mod readahead;
pub mod ssh;
pub mod throttle;
pub mod vdi;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;
pub(crate) mod web;

/// Refuses a remote file longer than QEMU's largest disk (BDRV_MAX_LENGTH: i64's largest,
/// in whole GiB), with QEMU's text: the protocols that learn a size from a server (http,
/// ftp, ssh) must not take one QAPI cannot report.
pub(crate) fn check_disk_length(len: u64) -> Result<(), qapi::error::QmpError> {
    if len.div_ceil(512).saturating_mul(512) > (i64::MAX as u64) & !((1 << 30) - 1) {
        return Err(qapi::error::QmpError::generic(
            "Could not refresh total sector count: File too large",
        ));
    }
    Ok(())
}
