//! The algorithms an encrypted disk names: ciphers, cipher modes, IV generators and hashes,
//! with their QAPI names (QCryptoCipherAlgo, QCryptoCipherMode, QCryptoIVGenAlgo,
//! QCryptoHashAlgo) and their names in a LUKS header. The set is QEMU's: a header or an
//! option naming anything else is refused.

use digest::Digest;

/// A block cipher and its key size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherAlg {
    Aes128,
    Aes192,
    Aes256,
    Cast5_128,
    Serpent128,
    Serpent192,
    Serpent256,
    Twofish128,
    Twofish192,
    Twofish256,
    Sm4,
}

impl CipherAlg {
    pub const ALL: [CipherAlg; 11] = [
        CipherAlg::Aes128,
        CipherAlg::Aes192,
        CipherAlg::Aes256,
        CipherAlg::Cast5_128,
        CipherAlg::Serpent128,
        CipherAlg::Serpent192,
        CipherAlg::Serpent256,
        CipherAlg::Twofish128,
        CipherAlg::Twofish192,
        CipherAlg::Twofish256,
        CipherAlg::Sm4,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
            CipherAlg::Cast5_128 => "cast5-128",
            CipherAlg::Serpent128 => "serpent-128",
            CipherAlg::Serpent192 => "serpent-192",
            CipherAlg::Serpent256 => "serpent-256",
            CipherAlg::Twofish128 => "twofish-128",
            CipherAlg::Twofish192 => "twofish-192",
            CipherAlg::Twofish256 => "twofish-256",
            CipherAlg::Sm4 => "sm4",
        }
    }

    pub fn from_name(name: &str) -> Option<CipherAlg> {
        CipherAlg::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The cipher's family, as a LUKS header's cipher name spells it.
    pub fn family(self) -> &'static str {
        match self {
            CipherAlg::Aes128 | CipherAlg::Aes192 | CipherAlg::Aes256 => "aes",
            CipherAlg::Cast5_128 => "cast5",
            CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => "serpent",
            CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => "twofish",
            CipherAlg::Sm4 => "sm4",
        }
    }

    /// The cipher of a family with this key length: how a LUKS header names a cipher.
    pub fn from_family(family: &str, key_len: usize) -> Option<CipherAlg> {
        CipherAlg::ALL
            .into_iter()
            .find(|a| a.family() == family && a.key_len() == key_len)
    }

    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128
            | CipherAlg::Cast5_128
            | CipherAlg::Serpent128
            | CipherAlg::Twofish128
            | CipherAlg::Sm4 => 16,
            CipherAlg::Aes192 | CipherAlg::Serpent192 | CipherAlg::Twofish192 => 24,
            CipherAlg::Aes256 | CipherAlg::Serpent256 | CipherAlg::Twofish256 => 32,
        }
    }

    pub fn block_len(self) -> usize {
        match self {
            CipherAlg::Cast5_128 => 8,
            _ => 16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherMode {
    Ecb,
    Cbc,
    Xts,
    Ctr,
}

impl CipherMode {
    pub const ALL: [CipherMode; 4] = [
        CipherMode::Ecb,
        CipherMode::Cbc,
        CipherMode::Xts,
        CipherMode::Ctr,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
            CipherMode::Ctr => "ctr",
        }
    }

    pub fn from_name(name: &str) -> Option<CipherMode> {
        CipherMode::ALL.into_iter().find(|m| m.name() == name)
    }

    /// How many cipher keys the mode takes: XTS has a data key and a tweak key.
    pub fn keys(self) -> usize {
        match self {
            CipherMode::Xts => 2,
            _ => 1,
        }
    }
}

/// How a sector's IV is made from its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGenAlg {
    /// The low 32 bits of the sector number, little-endian.
    Plain,
    /// The 64-bit sector number, little-endian.
    Plain64,
    /// The 64-bit sector number encrypted with the hash of the key.
    Essiv,
}

impl IvGenAlg {
    pub const ALL: [IvGenAlg; 3] = [IvGenAlg::Plain, IvGenAlg::Plain64, IvGenAlg::Essiv];

    pub fn name(self) -> &'static str {
        match self {
            IvGenAlg::Plain => "plain",
            IvGenAlg::Plain64 => "plain64",
            IvGenAlg::Essiv => "essiv",
        }
    }

    pub fn from_name(name: &str) -> Option<IvGenAlg> {
        IvGenAlg::ALL.into_iter().find(|g| g.name() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    Md5,
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
    Ripemd160,
}

impl HashAlg {
    pub const ALL: [HashAlg; 7] = [
        HashAlg::Md5,
        HashAlg::Sha1,
        HashAlg::Sha224,
        HashAlg::Sha256,
        HashAlg::Sha384,
        HashAlg::Sha512,
        HashAlg::Ripemd160,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Md5 => "md5",
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
            HashAlg::Ripemd160 => "ripemd160",
        }
    }

    pub fn from_name(name: &str) -> Option<HashAlg> {
        HashAlg::ALL.into_iter().find(|h| h.name() == name)
    }

    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Md5 => 16,
            HashAlg::Sha1 | HashAlg::Ripemd160 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The digest of the parts, one after the other.
    pub fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut hasher = D::new();
            for part in parts {
                hasher.update(part);
            }
            hasher.finalize().to_vec()
        }
        match self {
            HashAlg::Md5 => run::<md5::Md5>(parts),
            HashAlg::Sha1 => run::<sha1::Sha1>(parts),
            HashAlg::Sha224 => run::<sha2::Sha224>(parts),
            HashAlg::Sha256 => run::<sha2::Sha256>(parts),
            HashAlg::Sha384 => run::<sha2::Sha384>(parts),
            HashAlg::Sha512 => run::<sha2::Sha512>(parts),
            HashAlg::Ripemd160 => run::<ripemd::Ripemd160>(parts),
        }
    }

    /// PBKDF2 with HMAC over this hash, filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            HashAlg::Md5 => pbkdf2_hmac::<md5::Md5>(password, salt, iterations, out),
            HashAlg::Sha1 => pbkdf2_hmac::<sha1::Sha1>(password, salt, iterations, out),
            HashAlg::Sha224 => pbkdf2_hmac::<sha2::Sha224>(password, salt, iterations, out),
            HashAlg::Sha256 => pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, out),
            HashAlg::Sha384 => pbkdf2_hmac::<sha2::Sha384>(password, salt, iterations, out),
            HashAlg::Sha512 => pbkdf2_hmac::<sha2::Sha512>(password, salt, iterations, out),
            HashAlg::Ripemd160 => pbkdf2_hmac::<ripemd::Ripemd160>(password, salt, iterations, out),
        }
    }
}
