//! Sector encryption: a block cipher in a mode, with an IV made from each 512-byte sector's
//! number, as dm-crypt, cryptsetup and QEMU encrypt a disk.
//!
//! The block ciphers are RustCrypto's. The modes (ECB, CBC, XTS, CTR) are written here over
//! them, a few lines each, because the mode crates fix the cipher type at compile time and
//! take blocks one at a time; here the cipher is chosen by the image header at run time
//! behind one dynamic call per sector, and a sector's 32 blocks go to the cipher in one
//! call so AES-NI can work on several at once.

use crate::algo::{CipherAlg, CipherMode, HashAlg, IvGenAlg};
use cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use zeroize::Zeroize;

/// The unit IVs count in, whatever the image's own sector size.
pub const SECTOR: usize = 512;

/// The largest cipher block (16 bytes): sized scratch space on the stack.
const MAX_BLOCK: usize = 16;

/// A keyed block cipher behind a dynamic call: ECB over whole blocks.
trait Blocks: Send + Sync {
    fn encrypt(&self, data: &mut [u8]);
    fn decrypt(&self, data: &mut [u8]);
}

struct Keyed<C>(C);

impl<C> Blocks for Keyed<C>
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + Send + Sync,
{
    fn encrypt(&self, data: &mut [u8]) {
        let (blocks, rest) = Array::slice_as_chunks_mut(data);
        debug_assert!(rest.is_empty());
        self.0.encrypt_blocks(blocks);
    }

    fn decrypt(&self, data: &mut [u8]) {
        let (blocks, rest) = Array::slice_as_chunks_mut(data);
        debug_assert!(rest.is_empty());
        self.0.decrypt_blocks(blocks);
    }
}

fn keyed<C>(key: &[u8]) -> Result<Box<dyn Blocks>, String>
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + KeyInit + Send + Sync + 'static,
{
    C::new_from_slice(key)
        .map(|c| Box::new(Keyed(c)) as Box<dyn Blocks>)
        .map_err(|_| format!("Invalid key length {}", key.len()))
}

fn block_cipher(alg: CipherAlg, key: &[u8]) -> Result<Box<dyn Blocks>, String> {
    if key.len() != alg.key_len() {
        return Err(format!(
            "Cipher key length {} does not match {} key length {}",
            key.len(),
            alg.name(),
            alg.key_len()
        ));
    }
    match alg {
        CipherAlg::Aes128 => keyed::<aes::Aes128>(key),
        CipherAlg::Aes192 => keyed::<aes::Aes192>(key),
        CipherAlg::Aes256 => keyed::<aes::Aes256>(key),
        CipherAlg::Cast5_128 => keyed::<cast5::Cast5>(key),
        CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => {
            keyed::<serpent::Serpent>(key)
        }
        CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => {
            keyed::<twofish::Twofish>(key)
        }
        CipherAlg::Sm4 => keyed::<sm4::Sm4>(key),
    }
}

/// The cipher ESSIV encrypts sector numbers with: the same family, keyed by the digest of
/// the data key, so its key length is the hash's digest length.
pub fn essiv_cipher(alg: CipherAlg, hash: HashAlg) -> Result<CipherAlg, String> {
    let len = hash.digest_len();
    CipherAlg::from_family(alg.family(), len).ok_or_else(|| match alg.family() {
        "aes" => format!("No AES cipher with key size {len} available"),
        "serpent" => format!("No Serpent cipher with key size {len} available"),
        "twofish" => format!("No Twofish cipher with key size {len} available"),
        _ => format!("Cipher alg {} not supported with essiv", alg.name()),
    })
}

/// What a sector cipher is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CipherSpec {
    pub alg: CipherAlg,
    pub mode: CipherMode,
    pub ivgen: IvGenAlg,
    /// The hash ESSIV keys its cipher with; None for the other generators.
    pub ivgen_hash: Option<HashAlg>,
}

impl CipherSpec {
    /// The length of the whole key: XTS takes two cipher keys.
    pub fn key_len(&self) -> usize {
        self.alg.key_len() * self.mode.keys()
    }

    /// What the combination cannot do, with the reason.
    pub fn check(&self) -> Result<(), String> {
        // XTS works on 16-byte blocks.
        if self.mode == CipherMode::Xts && self.alg.block_len() != 16 {
            return Err("Unsupported cipher mode xts".into());
        }
        match (self.ivgen, self.ivgen_hash) {
            (IvGenAlg::Essiv, None) => Err("essiv needs a hash algorithm".into()),
            (IvGenAlg::Essiv, Some(hash)) => essiv_cipher(self.alg, hash).map(drop),
            _ => Ok(()),
        }
    }
}

/// A keyed cipher that encrypts and decrypts whole 512-byte sectors in place, each with
/// the IV of its number.
pub struct SectorCipher {
    spec: CipherSpec,
    data: Box<dyn Blocks>,
    /// XTS's second key encrypts the tweak.
    tweak: Option<Box<dyn Blocks>>,
    /// ESSIV's cipher.
    essiv: Option<Box<dyn Blocks>>,
}

impl SectorCipher {
    pub fn new(spec: CipherSpec, key: &[u8]) -> Result<SectorCipher, String> {
        spec.check()?;
        if key.len() != spec.key_len() {
            return Err(format!(
                "Key length {} does not match {}-{} key length {}",
                key.len(),
                spec.alg.name(),
                spec.mode.name(),
                spec.key_len()
            ));
        }
        let half = spec.alg.key_len();
        let data = block_cipher(spec.alg, &key[..half])?;
        let tweak = match spec.mode {
            CipherMode::Xts => Some(block_cipher(spec.alg, &key[half..])?),
            _ => None,
        };
        let essiv = match (spec.ivgen, spec.ivgen_hash) {
            (IvGenAlg::Essiv, Some(hash)) => {
                let mut salt = hash.digest(&[key]);
                let cipher = block_cipher(essiv_cipher(spec.alg, hash)?, &salt);
                salt.zeroize();
                Some(cipher?)
            }
            _ => None,
        };
        Ok(SectorCipher {
            spec,
            data,
            tweak,
            essiv,
        })
    }

    fn block_len(&self) -> usize {
        self.spec.alg.block_len()
    }

    /// The IV of a sector, in the first block length bytes of `iv`.
    fn iv(&self, sector: u64, iv: &mut [u8; MAX_BLOCK]) {
        *iv = [0; MAX_BLOCK];
        let len = self.block_len();
        match self.spec.ivgen {
            IvGenAlg::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGenAlg::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGenAlg::Essiv => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                if let Some(essiv) = &self.essiv {
                    essiv.encrypt(&mut iv[..len]);
                }
            }
        }
    }

    /// Encrypt sectors in place, the first numbered `first_sector`. The last may be short
    /// (LUKS key material need not fill its last sector) but holds whole cipher blocks.
    pub fn encrypt(&self, first_sector: u64, buf: &mut [u8]) {
        self.each_sector(first_sector, buf, true);
    }

    /// Decrypt sectors in place, as [`SectorCipher::encrypt`] encrypts them.
    pub fn decrypt(&self, first_sector: u64, buf: &mut [u8]) {
        self.each_sector(first_sector, buf, false);
    }

    fn each_sector(&self, first_sector: u64, buf: &mut [u8], encrypt: bool) {
        assert!(
            buf.len().is_multiple_of(self.block_len()),
            "sector ciphers take whole cipher blocks"
        );
        let mut iv = [0u8; MAX_BLOCK];
        for (i, sector) in buf.chunks_mut(SECTOR).enumerate() {
            self.iv(first_sector.wrapping_add(i as u64), &mut iv);
            match (self.spec.mode, encrypt) {
                (CipherMode::Ecb, true) => self.data.encrypt(sector),
                (CipherMode::Ecb, false) => self.data.decrypt(sector),
                (CipherMode::Cbc, true) => self.cbc_encrypt(&iv, sector),
                (CipherMode::Cbc, false) => self.cbc_decrypt(&iv, sector),
                (CipherMode::Xts, _) => self.xts(&iv, sector, encrypt),
                (CipherMode::Ctr, _) => self.ctr(&iv, sector),
            }
        }
    }

    fn cbc_encrypt(&self, iv: &[u8; MAX_BLOCK], sector: &mut [u8]) {
        let len = self.block_len();
        let mut chain = [0u8; MAX_BLOCK];
        chain[..len].copy_from_slice(&iv[..len]);
        for block in sector.chunks_exact_mut(len) {
            xor(block, &chain[..len]);
            self.data.encrypt(block);
            chain[..len].copy_from_slice(block);
        }
    }

    fn cbc_decrypt(&self, iv: &[u8; MAX_BLOCK], sector: &mut [u8]) {
        let len = self.block_len();
        let mut ciphertext = [0u8; SECTOR];
        let n = sector.len();
        ciphertext[..n].copy_from_slice(sector);
        self.data.decrypt(sector);
        xor(&mut sector[..len], &iv[..len]);
        xor(&mut sector[len..], &ciphertext[..n - len]);
        ciphertext.zeroize();
    }

    /// IEEE 1619 XTS: the IV encrypted with the tweak key, doubled in GF(2^128) per block.
    fn xts(&self, iv: &[u8; MAX_BLOCK], sector: &mut [u8], encrypt: bool) {
        let mut tweak = *iv;
        if let Some(t) = &self.tweak {
            t.encrypt(&mut tweak);
        }
        let mut tweaks = [0u8; SECTOR];
        let tweaks = &mut tweaks[..sector.len()];
        for chunk in tweaks.chunks_exact_mut(16) {
            chunk.copy_from_slice(&tweak);
            double(&mut tweak);
        }
        xor(sector, tweaks);
        if encrypt {
            self.data.encrypt(sector);
        } else {
            self.data.decrypt(sector);
        }
        xor(sector, tweaks);
        tweaks.zeroize();
    }

    /// CTR: the IV counts up as a big-endian number, one per block.
    fn ctr(&self, iv: &[u8; MAX_BLOCK], sector: &mut [u8]) {
        let len = self.block_len();
        let mut keystream = [0u8; SECTOR];
        let keystream = &mut keystream[..sector.len()];
        let mut counter = [0u8; MAX_BLOCK];
        counter[..len].copy_from_slice(&iv[..len]);
        for chunk in keystream.chunks_exact_mut(len) {
            chunk.copy_from_slice(&counter[..len]);
            increment(&mut counter[..len]);
        }
        self.data.encrypt(keystream);
        xor(sector, keystream);
        keystream.zeroize();
    }
}

/// CBC decryption of a whole message with an explicit IV (not sector by sector), as a
/// secret encrypted by another secret is stored.
pub fn cbc_decrypt(alg: CipherAlg, key: &[u8], iv: &[u8], data: &mut [u8]) -> Result<(), String> {
    let len = alg.block_len();
    if !data.len().is_multiple_of(len) {
        return Err(format!(
            "Length {} must be a multiple of block size {len}",
            data.len()
        ));
    }
    if iv.len() != len {
        return Err(format!(
            "IV length {} does not match block size {len}",
            iv.len()
        ));
    }
    let cipher = block_cipher(alg, key)?;
    let ciphertext = zeroize::Zeroizing::new(data.to_vec());
    cipher.decrypt(data);
    let mut previous = iv;
    for (block, cipher_block) in data.chunks_exact_mut(len).zip(ciphertext.chunks_exact(len)) {
        xor(block, previous);
        previous = cipher_block;
    }
    Ok(())
}

fn xor(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// Multiply by x in GF(2^128), the little-endian way XTS numbers its tweaks.
fn double(tweak: &mut [u8; 16]) {
    let value = u128::from_le_bytes(*tweak);
    let carry = (value >> 127) as u8;
    *tweak = (value << 1).to_le_bytes();
    tweak[0] ^= 0x87 * carry;
}

fn increment(counter: &mut [u8]) {
    for byte in counter.iter_mut().rev() {
        *byte = byte.wrapping_add(1);
        if *byte != 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(alg: CipherAlg, mode: CipherMode, ivgen: IvGenAlg) -> CipherSpec {
        CipherSpec {
            alg,
            mode,
            ivgen,
            ivgen_hash: (ivgen == IvGenAlg::Essiv).then_some(HashAlg::Sha256),
        }
    }

    /// IEEE 1619-2007 XTS-AES-128 vector 4: key1 27182818..., key2 31415926..., data unit
    /// 0, plaintext 00 01 02 ... ff twice.
    #[test]
    fn xts_aes_matches_the_ieee_vector() {
        let mut key = Vec::new();
        key.extend_from_slice(&[
            0x27, 0x18, 0x28, 0x18, 0x28, 0x45, 0x90, 0x45, 0x23, 0x53, 0x60, 0x28, 0x74, 0x71,
            0x35, 0x26,
        ]);
        key.extend_from_slice(&[
            0x31, 0x41, 0x59, 0x26, 0x53, 0x58, 0x97, 0x93, 0x23, 0x84, 0x62, 0x64, 0x33, 0x83,
            0x27, 0x95,
        ]);
        let cipher = SectorCipher::new(
            spec(CipherAlg::Aes128, CipherMode::Xts, IvGenAlg::Plain64),
            &key,
        )
        .unwrap();
        let mut sector: Vec<u8> = (0..512).map(|i| i as u8).collect();
        cipher.encrypt(0, &mut sector);
        assert_eq!(
            &sector[..16],
            &[
                0x27, 0xa7, 0x47, 0x9b, 0xef, 0xa1, 0xd4, 0x76, 0x48, 0x9f, 0x30, 0x8c, 0xd4, 0xcf,
                0xa6, 0xe2
            ]
        );
        assert_eq!(
            &sector[496..],
            &[
                0x0a, 0x28, 0x2d, 0xf9, 0x20, 0x14, 0x7b, 0xea, 0xbe, 0x42, 0x1e, 0xe5, 0x31, 0x9d,
                0x05, 0x68
            ]
        );
        cipher.decrypt(0, &mut sector);
        assert!(sector.iter().enumerate().all(|(i, &b)| b == i as u8));
    }

    #[test]
    fn every_combination_round_trips_and_depends_on_the_sector() {
        for alg in CipherAlg::ALL {
            for mode in CipherMode::ALL {
                for ivgen in IvGenAlg::ALL {
                    let spec = spec(alg, mode, ivgen);
                    if spec.check().is_err() {
                        continue;
                    }
                    let key: Vec<u8> = (0..spec.key_len()).map(|i| (i * 7) as u8).collect();
                    let cipher = SectorCipher::new(spec, &key).unwrap();
                    // Two and a half sectors: key material ends in a short one.
                    let plain: Vec<u8> = (0..1280).map(|i| (i * 13) as u8).collect();
                    let mut buf = plain.clone();
                    cipher.encrypt(5, &mut buf);
                    assert_ne!(buf, plain, "{spec:?}");
                    let mut other = plain.clone();
                    cipher.encrypt(6, &mut other);
                    if mode != CipherMode::Ecb {
                        assert_ne!(buf[..512], other[..512], "{spec:?}");
                    }
                    cipher.decrypt(5, &mut buf);
                    assert_eq!(buf, plain, "{spec:?}");
                }
            }
        }
    }

    #[test]
    fn essiv_needs_a_key_size_the_family_has() {
        let bad = CipherSpec {
            alg: CipherAlg::Cast5_128,
            mode: CipherMode::Cbc,
            ivgen: IvGenAlg::Essiv,
            ivgen_hash: Some(HashAlg::Sha256),
        };
        assert!(bad.check().is_err());
        let xts_cast5 = spec(CipherAlg::Cast5_128, CipherMode::Xts, IvGenAlg::Plain64);
        assert!(xts_cast5.check().is_err());
    }
}
