//! Disk encryption for blockd: secrets, the ciphers and modes encrypted disks use, and the
//! LUKS1 header, all without I/O so that the block drivers (luks, qcow2's `encrypt`) and
//! the fuzz targets share them.

pub mod af;
pub mod algo;
pub mod cipher;
pub mod luks;
pub mod secret;

pub use algo::{CipherAlg, CipherMode, HashAlg, IvGenAlg};
pub use cipher::{CipherSpec, SectorCipher, SECTOR};
pub use secret::{Secret, SecretFormat, SecretOptions, Secrets};
pub use zeroize::Zeroizing;

/// Fill `buf` from the operating system's random source (salts, keys, UUIDs).
pub fn random(buf: &mut [u8]) -> Result<(), String> {
    getrandom::fill(buf).map_err(|e| format!("Unable to read random bytes: {e}"))
}
