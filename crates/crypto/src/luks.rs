//! LUKS1: the on-disk header (read, checked, written), unlocking a key slot with a
//! password, making a new volume key, and adding or wiping key slots.
//!
//! The header is 592 bytes: cipher, mode and hash names, where the payload starts, the
//! volume key's length and a PBKDF2 digest of it, a UUID, and eight key slots. A slot holds
//! the volume key split into 4000 stripes (`af.rs`), encrypted with a key derived from a
//! password by PBKDF2. Everything is big-endian; offsets count 512-byte sectors.
//!
//! This module does no I/O: the caller reads the header and a slot's material and hands
//! them over, so the same code serves a luks node, a detached header and a qcow2 image's
//! encryption header.

use crate::algo::{CipherAlg, CipherMode, HashAlg, IvGenAlg};
use crate::cipher::{CipherSpec, SectorCipher, SECTOR};
use crate::{af, random};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

pub const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// The header's length on disk.
pub const HEADER_LEN: usize = 592;
pub const SLOTS: usize = 8;
/// Stripes per key slot: the only count cryptsetup and QEMU write, and so the only one
/// accepted (it also bounds the material a slot can make us read).
pub const STRIPES: u32 = 4000;
const SLOT_ACTIVE: u32 = 0x00ac_71f3;
const SLOT_DISABLED: u32 = 0x0000_dead;
const DIGEST_LEN: usize = 20;
const SALT_LEN: usize = 32;
const UUID_LEN: usize = 40;
/// QEMU's floors for PBKDF2 iterations, however fast the machine.
const MIN_SLOT_ITERS: u64 = 1000;
const MIN_DIGEST_ITERS: u64 = 1000;
/// Key material and payload start on 4 KiB boundaries, as QEMU and cryptsetup lay them out.
const ALIGN: u64 = 4096;
/// The longest volume key any cipher here takes (XTS with two 256-bit keys).
const MAX_KEY_LEN: u32 = 64;
/// The most PBKDF2 iterations a header may ask for (half a minute per slot here):
/// cryptsetup and QEMU measure a second or two, so more is a crafted header making an
/// open hang.
const MAX_ITERATIONS: u32 = 1 << 27;

/// The volume (master) key, wiped from memory when dropped.
pub type MasterKey = Zeroizing<Vec<u8>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    pub active: bool,
    pub iterations: u32,
    pub salt: [u8; SALT_LEN],
    /// Where the slot's material starts, in sectors from the start of the header.
    pub key_offset: u32,
    pub stripes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub cipher_name: String,
    pub cipher_mode: String,
    pub hash_spec: String,
    /// Where the encrypted data starts, in sectors; 0 with a detached header.
    pub payload_offset: u32,
    pub key_bytes: u32,
    pub mk_digest: [u8; DIGEST_LEN],
    pub mk_digest_salt: [u8; SALT_LEN],
    pub mk_digest_iter: u32,
    pub uuid: String,
    pub slots: [KeySlot; SLOTS],
    /// The cipher the names above spell.
    pub spec: CipherSpec,
    pub hash: HashAlg,
}

fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

/// A NUL-padded text field.
fn text(field: &[u8]) -> Result<String, String> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    std::str::from_utf8(&field[..end])
        .map(str::to_string)
        .map_err(|_| "LUKS header text field is not valid text".to_string())
}

fn put_text(field: &mut [u8], value: &str) {
    field[..value.len()].copy_from_slice(value.as_bytes());
}

/// The cipher spec of a header's cipher name, mode string and volume key length.
fn parse_cipher(name: &str, mode: &str, key_bytes: u32) -> Result<CipherSpec, String> {
    let (mode_name, ivgen) = match mode.split_once('-') {
        Some((m, iv)) => (m, Some(iv)),
        None => (mode, None),
    };
    let mode_alg = CipherMode::from_name(mode_name)
        .ok_or_else(|| format!("Unsupported cipher mode '{mode}'"))?;
    let (ivgen, ivgen_hash) = match ivgen {
        // cryptsetup writes a bare "ecb": ECB has no IV to generate.
        None if mode_alg == CipherMode::Ecb => (IvGenAlg::Plain64, None),
        None => return Err(format!("Unexpected cipher mode string format '{mode}'")),
        Some(iv) => {
            let (iv_name, hash) = match iv.split_once(':') {
                Some((n, h)) => (
                    n,
                    Some(
                        HashAlg::from_name(h)
                            .ok_or_else(|| format!("Unsupported IV generator hash '{h}'"))?,
                    ),
                ),
                None => (iv, None),
            };
            let alg = IvGenAlg::from_name(iv_name)
                .ok_or_else(|| format!("Unsupported IV generator '{iv_name}'"))?;
            if (alg == IvGenAlg::Essiv) != hash.is_some() {
                return Err(format!("Unexpected cipher mode string format '{mode}'"));
            }
            (alg, hash)
        }
    };
    let cipher_key = key_bytes as usize / mode_alg.keys();
    let alg = CipherAlg::from_family(name, cipher_key)
        .ok_or_else(|| format!("Unsupported cipher '{name}' with key size {cipher_key} bytes"))?;
    let spec = CipherSpec {
        alg,
        mode: mode_alg,
        ivgen,
        ivgen_hash,
    };
    if spec.key_len() != key_bytes as usize {
        return Err(format!(
            "Unsupported cipher '{name}' with key size {key_bytes} bytes"
        ));
    }
    spec.check()?;
    Ok(spec)
}

/// The mode string a header stores for a spec ("xts-plain64", "cbc-essiv:sha256").
fn mode_string(spec: &CipherSpec) -> String {
    match spec.ivgen_hash {
        Some(hash) => format!("{}-{}:{}", spec.mode.name(), spec.ivgen.name(), hash.name()),
        None => format!("{}-{}", spec.mode.name(), spec.ivgen.name()),
    }
}

impl Header {
    /// Parse and check a header: anything that would make us read outside it, divide by
    /// zero or misplace data is refused here.
    pub fn parse(buf: &[u8]) -> Result<Header, String> {
        if buf.len() < HEADER_LEN || &buf[..6] != MAGIC {
            return Err("Volume is not in LUKS format".into());
        }
        let version = u16::from_be_bytes([buf[6], buf[7]]);
        if version != 1 {
            return Err(format!("Unsupported LUKS version {version}"));
        }
        let cipher_name = text(&buf[8..40])?;
        let cipher_mode = text(&buf[40..72])?;
        let hash_spec = text(&buf[72..104])?;
        let payload_offset = be32(buf, 104);
        let key_bytes = be32(buf, 108);
        let hash = HashAlg::from_name(&hash_spec)
            .ok_or_else(|| format!("Unsupported hash algorithm '{hash_spec}'"))?;
        if key_bytes == 0 || key_bytes > MAX_KEY_LEN {
            return Err(format!("LUKS key size {key_bytes} is not supported"));
        }
        let spec = parse_cipher(&cipher_name, &cipher_mode, key_bytes)?;
        let mk_digest_iter = be32(buf, 164);
        if mk_digest_iter == 0 || mk_digest_iter > MAX_ITERATIONS {
            return Err(format!(
                "LUKS master key digest iterations {mk_digest_iter} are out of range"
            ));
        }
        let mut slots = std::array::from_fn(|i| {
            let at = 208 + i * 48;
            KeySlot {
                active: be32(buf, at) == SLOT_ACTIVE,
                iterations: be32(buf, at + 4),
                salt: buf[at + 8..at + 40].try_into().expect("32 bytes"),
                key_offset: be32(buf, at + 40),
                stripes: be32(buf, at + 44),
            }
        });
        for (i, slot) in slots.iter_mut().enumerate() {
            let state = be32(buf, 208 + i * 48);
            if state != SLOT_ACTIVE && state != SLOT_DISABLED {
                return Err(format!("Keyslot {i} state (active/disable) is corrupted"));
            }
            if slot.stripes != STRIPES {
                return Err(format!(
                    "Keyslot {i} is corrupted (stripes {} != {STRIPES})",
                    slot.stripes
                ));
            }
            if slot.active && (slot.iterations == 0 || slot.iterations > MAX_ITERATIONS) {
                return Err(format!(
                    "Keyslot {i} is corrupted (iterations {} are out of range)",
                    slot.iterations
                ));
            }
        }
        let header = Header {
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset,
            key_bytes,
            mk_digest: buf[112..132].try_into().expect("20 bytes"),
            mk_digest_salt: buf[132..164].try_into().expect("32 bytes"),
            mk_digest_iter,
            uuid: text(&buf[168..168 + UUID_LEN])?,
            slots,
            spec,
            hash,
        };
        header.check_layout()?;
        Ok(header)
    }

    /// Key material inside the header area and clear of the header, the payload and each
    /// other.
    fn check_layout(&self) -> Result<(), String> {
        let header_end = (HEADER_LEN as u64).div_ceil(SECTOR as u64);
        for i in 0..SLOTS {
            let (start, len) = self.slot_sectors(i);
            if start < header_end {
                return Err(format!("Keyslot {i} is overlapping with the LUKS header"));
            }
            if self.payload_offset != 0 && start + len > u64::from(self.payload_offset) {
                return Err(format!(
                    "Keyslot {i} is overlapping with the encrypted payload"
                ));
            }
            for j in i + 1..SLOTS {
                let (other, other_len) = self.slot_sectors(j);
                if start < other + other_len && other < start + len {
                    return Err(format!(
                        "Keyslots {i} and {j} are overlapping in the header"
                    ));
                }
            }
        }
        Ok(())
    }

    /// A slot's material: first sector and length in sectors.
    fn slot_sectors(&self, slot: usize) -> (u64, u64) {
        let len = self.material_len() as u64;
        (
            u64::from(self.slots[slot].key_offset),
            len.div_ceil(SECTOR as u64),
        )
    }

    /// The bytes of one slot's key material.
    pub fn material_len(&self) -> usize {
        self.key_bytes as usize * STRIPES as usize
    }

    /// Where a slot's material is, in bytes from the start of the header, and its length.
    pub fn material_range(&self, slot: usize) -> (u64, usize) {
        (
            u64::from(self.slots[slot].key_offset) * SECTOR as u64,
            self.material_len(),
        )
    }

    /// Where the header and all key material end, in bytes.
    pub fn header_area_len(&self) -> u64 {
        (0..SLOTS)
            .map(|i| {
                let (start, len) = self.slot_sectors(i);
                (start + len) * SECTOR as u64
            })
            .max()
            .unwrap_or(HEADER_LEN as u64)
    }

    /// The payload's start in bytes.
    pub fn payload_start(&self) -> u64 {
        u64::from(self.payload_offset) * SECTOR as u64
    }

    pub fn serialize(&self) -> [u8; HEADER_LEN] {
        let mut buf = [0u8; HEADER_LEN];
        buf[..6].copy_from_slice(MAGIC);
        buf[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_text(&mut buf[8..40], &self.cipher_name);
        put_text(&mut buf[40..72], &self.cipher_mode);
        put_text(&mut buf[72..104], &self.hash_spec);
        buf[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        buf[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        buf[112..132].copy_from_slice(&self.mk_digest);
        buf[132..164].copy_from_slice(&self.mk_digest_salt);
        buf[164..168].copy_from_slice(&self.mk_digest_iter.to_be_bytes());
        put_text(&mut buf[168..168 + UUID_LEN], &self.uuid);
        for (i, slot) in self.slots.iter().enumerate() {
            let at = 208 + i * 48;
            let state = if slot.active {
                SLOT_ACTIVE
            } else {
                SLOT_DISABLED
            };
            buf[at..at + 4].copy_from_slice(&state.to_be_bytes());
            buf[at + 4..at + 8].copy_from_slice(&slot.iterations.to_be_bytes());
            buf[at + 8..at + 40].copy_from_slice(&slot.salt);
            buf[at + 40..at + 44].copy_from_slice(&slot.key_offset.to_be_bytes());
            buf[at + 44..at + 48].copy_from_slice(&slot.stripes.to_be_bytes());
        }
        buf
    }

    /// The volume key, if `password` opens this active slot whose `material` was read.
    pub fn try_slot(&self, slot: usize, password: &[u8], material: &[u8]) -> Option<MasterKey> {
        let s = &self.slots[slot];
        if !s.active || material.len() != self.material_len() {
            return None;
        }
        let mut slot_key = Zeroizing::new(vec![0u8; self.key_bytes as usize]);
        self.hash
            .pbkdf2(password, &s.salt, s.iterations, &mut slot_key);
        let cipher = SectorCipher::new(self.spec, &slot_key).ok()?;
        let mut split = Zeroizing::new(material.to_vec());
        cipher.decrypt(0, &mut split);
        let key = af::merge(self.hash, &split, self.key_bytes as usize);
        self.is_master_key(&key).then_some(key)
    }

    /// Whether `key` is the volume key: its digest, compared in constant time.
    fn is_master_key(&self, key: &[u8]) -> bool {
        let mut digest = [0u8; DIGEST_LEN];
        self.hash
            .pbkdf2(key, &self.mk_digest_salt, self.mk_digest_iter, &mut digest);
        bool::from(digest.ct_eq(&self.mk_digest))
    }

    /// The data cipher, keyed with the volume key.
    pub fn cipher(&self, master: &[u8]) -> Result<SectorCipher, String> {
        SectorCipher::new(self.spec, master)
    }

    /// Fill a free slot for `password`: the header's slot entry is set, and the encrypted
    /// material to write at [`Header::material_range`] is returned.
    pub fn set_slot(
        &mut self,
        slot: usize,
        master: &[u8],
        password: &[u8],
        iter_time: Duration,
    ) -> Result<Vec<u8>, String> {
        let iterations = scaled_iterations(self.hash, self.key_bytes as usize, iter_time, 1)?;
        let iterations = u32::try_from(iterations.max(MIN_SLOT_ITERS))
            .map_err(|_| format!("PBKDF iterations {iterations} too large"))?;
        let mut salt = [0u8; SALT_LEN];
        random(&mut salt)?;
        let mut slot_key = Zeroizing::new(vec![0u8; self.key_bytes as usize]);
        self.hash.pbkdf2(password, &salt, iterations, &mut slot_key);
        let mut material = af::split(self.hash, master, STRIPES as usize)?;
        SectorCipher::new(self.spec, &slot_key)?.encrypt(0, &mut material);
        let s = &mut self.slots[slot];
        s.active = true;
        s.iterations = iterations;
        s.salt = salt;
        Ok(material.to_vec())
    }

    /// Disable a slot; the caller overwrites its material with [`wipe_material`].
    pub fn clear_slot(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        s.active = false;
        s.iterations = 0;
        s.salt = [0; SALT_LEN];
    }

    /// Random bytes to overwrite a wiped slot's material with.
    pub fn wipe_material(&self) -> Result<Vec<u8>, String> {
        let mut garbage = vec![0u8; self.material_len()];
        random(&mut garbage)?;
        Ok(garbage)
    }
}

/// What a new volume is made with.
#[derive(Debug, Clone, Copy)]
pub struct CreateOptions {
    pub spec: CipherSpec,
    pub hash: HashAlg,
    pub iter_time: Duration,
    /// The header lives apart from the data: the payload starts at 0 of the data.
    pub detached: bool,
}

/// A new volume: its header, the volume key, and slot 0's material for `password`.
pub struct Created {
    pub header: Header,
    pub master: MasterKey,
    pub material: Vec<u8>,
}

/// Make a new volume key and a header with slot 0 opened by `password`, laid out as QEMU
/// lays it out: slot material from 4 KiB, each slot's rounded up to 4 KiB, the payload
/// after the eighth.
pub fn create(opts: &CreateOptions, password: &[u8]) -> Result<Created, String> {
    opts.spec.check()?;
    let key_len = opts.spec.key_len();
    let mut master = Zeroizing::new(vec![0u8; key_len]);
    random(&mut master)?;
    let mut mk_digest_salt = [0u8; SALT_LEN];
    random(&mut mk_digest_salt)?;
    // cryptsetup's and QEMU's eighth of the time: all eight slots checked in iter-time.
    let digest_iters = scaled_iterations(opts.hash, DIGEST_LEN, opts.iter_time, 8)?;
    let mk_digest_iter = u32::try_from(digest_iters.max(MIN_DIGEST_ITERS))
        .map_err(|_| format!("PBKDF iterations {digest_iters} too large"))?;
    let mut mk_digest = [0u8; DIGEST_LEN];
    opts.hash
        .pbkdf2(&master, &mk_digest_salt, mk_digest_iter, &mut mk_digest);

    let material_sectors =
        (key_len as u64 * u64::from(STRIPES)).next_multiple_of(ALIGN) / SECTOR as u64;
    let first = ALIGN / SECTOR as u64;
    let slot_offset = |i: u64| (first + i * material_sectors) as u32;
    let payload_offset = if opts.detached {
        0
    } else {
        slot_offset(SLOTS as u64)
    };
    let slots = std::array::from_fn(|i| KeySlot {
        active: false,
        iterations: 0,
        salt: [0; SALT_LEN],
        key_offset: slot_offset(i as u64),
        stripes: STRIPES,
    });
    let mut header = Header {
        cipher_name: opts.spec.alg.family().to_string(),
        cipher_mode: mode_string(&opts.spec),
        hash_spec: opts.hash.name().to_string(),
        payload_offset,
        key_bytes: key_len as u32,
        mk_digest,
        mk_digest_salt,
        mk_digest_iter,
        uuid: new_uuid()?,
        slots,
        spec: opts.spec,
        hash: opts.hash,
    };
    let material = header.set_slot(0, &master, password, opts.iter_time)?;
    Ok(Created {
        header,
        master,
        material,
    })
}

/// A random (version 4) UUID in its text form.
fn new_uuid() -> Result<String, String> {
    let mut b = [0u8; 16];
    random(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

/// PBKDF2 iterations that take `time / divisor` on this machine for an output of
/// `out_len` bytes: timed on a growing count until a run takes long enough to measure.
fn scaled_iterations(
    hash: HashAlg,
    out_len: usize,
    time: Duration,
    divisor: u64,
) -> Result<u64, String> {
    let mut out = vec![0u8; out_len];
    let mut iterations: u32 = 1 << 10;
    loop {
        let start = Instant::now();
        hash.pbkdf2(
            b"blockd iteration count",
            &[0u8; SALT_LEN],
            iterations,
            &mut out,
        );
        let elapsed = start.elapsed();
        if elapsed >= Duration::from_millis(50) || iterations >= 1 << 30 {
            let per_ms = f64::from(iterations) / elapsed.as_secs_f64().max(1e-9) / 1000.0;
            let total = per_ms * time.as_millis() as f64 / divisor as f64;
            if total > f64::from(u32::MAX) {
                return Err(format!("PBKDF iterations {total:.0} too large to scale"));
            }
            return Ok(total as u64);
        }
        iterations *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> CreateOptions {
        CreateOptions {
            spec: CipherSpec {
                alg: CipherAlg::Aes256,
                mode: CipherMode::Xts,
                ivgen: IvGenAlg::Plain64,
                ivgen_hash: None,
            },
            hash: HashAlg::Sha256,
            iter_time: Duration::from_millis(1),
            detached: false,
        }
    }

    #[test]
    fn a_created_header_parses_back_and_unlocks_with_its_password_only() {
        let created = create(&opts(), b"secret").unwrap();
        let bytes = created.header.serialize();
        let header = Header::parse(&bytes).unwrap();
        assert_eq!(header, created.header);
        // QEMU's layout for aes-256-xts: slots 504 sectors apart from sector 8.
        assert_eq!(header.slots[1].key_offset, 512);
        assert_eq!(header.payload_offset, 4040);
        let key = header.try_slot(0, b"secret", &created.material).unwrap();
        assert_eq!(&key[..], &created.master[..]);
        assert!(header.try_slot(0, b"wrong", &created.material).is_none());
        assert!(header.try_slot(1, b"secret", &created.material).is_none());
    }

    #[test]
    fn corrupt_headers_are_refused_with_a_reason() {
        let good = create(&opts(), b"pw").unwrap().header.serialize();
        let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
        cases.push((good[..100].to_vec(), "not in LUKS format"));
        let mut v = good;
        v[7] = 2;
        cases.push((v.to_vec(), "Unsupported LUKS version 2"));
        let mut v = good;
        v[8..11].copy_from_slice(b"des");
        cases.push((v.to_vec(), "Unsupported cipher 'des'"));
        let mut v = good;
        v[108..112].copy_from_slice(&1000u32.to_be_bytes());
        cases.push((v.to_vec(), "key size 1000"));
        let mut v = good;
        v[208 + 44..208 + 48].copy_from_slice(&1u32.to_be_bytes());
        cases.push((v.to_vec(), "stripes 1 != 4000"));
        let mut v = good;
        v[208 + 48 + 40..208 + 48 + 44].copy_from_slice(&8u32.to_be_bytes());
        cases.push((v.to_vec(), "Keyslots 0 and 1 are overlapping"));
        let mut v = good;
        v[104..108].copy_from_slice(&100u32.to_be_bytes());
        cases.push((v.to_vec(), "overlapping with the encrypted payload"));
        let mut v = good;
        v[208..212].copy_from_slice(&7u32.to_be_bytes());
        cases.push((v.to_vec(), "corrupted"));
        // Iteration counts that would keep an open busy for hours.
        let mut v = good;
        v[208 + 4..208 + 8].copy_from_slice(&u32::MAX.to_be_bytes());
        cases.push((v.to_vec(), "iterations 4294967295 are out of range"));
        let mut v = good;
        v[164..168].copy_from_slice(&u32::MAX.to_be_bytes());
        cases.push((v.to_vec(), "digest iterations 4294967295"));
        for (bytes, want) in cases {
            let err = Header::parse(&bytes).unwrap_err();
            assert!(err.contains(want), "{err} should say {want}");
        }
    }

    #[test]
    fn slots_are_added_and_cleared() {
        let created = create(&opts(), b"one").unwrap();
        let mut header = created.header;
        let material = header
            .set_slot(3, &created.master, b"two", Duration::from_millis(1))
            .unwrap();
        assert!(header.try_slot(3, b"two", &material).is_some());
        header.clear_slot(3);
        assert!(header.try_slot(3, b"two", &material).is_none());
    }
}
