//! Encrypted qcow2 images: `encrypt.format=luks`, a LUKS1 header inside the image (in
//! clusters the crypto header extension points at) whose volume key encrypts each 512-byte
//! sector of guest data by its host offset; and the legacy `aes` format, AES-128-CBC keyed
//! by the password itself, by guest offset. Metadata is never encrypted.
//!
//! `open` checks the `encrypt` options against the header with QEMU's texts and unlocks the
//! key; the data path (`image.rs`) calls `encrypt` and `decrypt` around every guest data
//! cluster it writes or reads, on whole sectors.

use super::header::Qcow2Header;
use crate::drivers::luks::{luks_info, unlock, KeyslotAmend, Keyslots, Unlocked};
use crate::node::Child;
use crate::open::Opener;
use crypto::{CipherAlg, CipherMode, CipherSpec, IvGenAlg, SectorCipher, SECTOR};
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Value};

/// `crypt_method` in the header.
pub(super) const CRYPT_NONE: u32 = 0;
pub(super) const CRYPT_AES: u32 = 1;
pub(super) const CRYPT_LUKS: u32 = 2;

/// BlockdevQcow2Encryption: the format, and the secret holding the password.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct EncryptOptions {
    format: Option<String>,
    key_secret: Option<String>,
}

/// An open image's encryption.
pub(super) struct Encryption {
    cipher: SectorCipher,
    /// LUKS numbers sectors by where they are in the file, legacy AES by where they are in
    /// the disk.
    by_host_offset: bool,
    /// The LUKS header and key, and where they are in the image (None for AES), for
    /// reports and x-blockdev-amend.
    luks: Option<Keyslots>,
}

fn format_name(method: u32) -> &'static str {
    match method {
        CRYPT_AES => "aes",
        CRYPT_LUKS => "luks",
        _ => "none",
    }
}

impl Encryption {
    fn sector(&self, host: u64, guest: u64) -> u64 {
        if self.by_host_offset {
            host / SECTOR as u64
        } else {
            guest / SECTOR as u64
        }
    }

    /// Encrypt guest data (whole sectors) bound for `host`, guest offset `guest`.
    pub(super) fn encrypt(&self, host: u64, guest: u64, buf: &mut [u8]) {
        self.cipher.encrypt(self.sector(host, guest), buf);
    }

    /// Decrypt guest data (whole sectors) read from `host`, guest offset `guest`.
    pub(super) fn decrypt(&self, host: u64, guest: u64, buf: &mut [u8]) {
        self.cipher.decrypt(self.sector(host, guest), buf);
    }

    /// ImageInfoSpecificQCow2Encryption.
    pub(super) fn info(&self) -> Value {
        match &self.luks {
            Some(keyslots) => {
                let mut info = luks_info(&keyslots.header(), false);
                info["format"] = json!("luks");
                info
            }
            None => json!({"format": "aes"}),
        }
    }

    /// x-blockdev-amend of the LUKS key slots, in the image `file`.
    pub(super) async fn amend(
        &self,
        file: &Child,
        graph: &crate::Graph,
        amend: &KeyslotAmend,
        force: bool,
    ) -> Result<(), String> {
        match &self.luks {
            Some(keyslots) => keyslots.amend(file, graph, amend, force).await,
            None => Err("Only LUKS encryption can be amended".into()),
        }
    }
}

/// The legacy qcow AES key: the password's first 16 bytes, zero-padded.
fn aes_key(password: &[u8]) -> [u8; 16] {
    let mut key = [0u8; 16];
    let n = password.len().min(16);
    key[..n].copy_from_slice(&password[..n]);
    key
}

/// Check the `encrypt` options against the header (QEMU's rules and texts) and unlock the
/// image's key; None for an image without encryption.
pub(super) async fn open(
    o: &Opener<'_>,
    file: &Child,
    header: &Qcow2Header,
    options: Option<Value>,
) -> Result<Option<Encryption>, QmpError> {
    let opts: Option<EncryptOptions> = match options {
        Some(Value::Object(map)) => Some(o.parse_member(map, "encrypt")?),
        Some(_) => {
            return Err(o.qualify(
                "Invalid parameter type for 'encrypt', expected: BlockdevQcow2Encryption".into(),
            ))
        }
        None => None,
    };
    if let Some(opts) = &opts {
        match &opts.format {
            None => return Err(o.qualify("Parameter 'encrypt.format' is missing".into())),
            Some(f) if f != "aes" && f != "luks" => {
                return Err(o.qualify(format!(
                    "Parameter 'encrypt.format' does not accept value '{f}'"
                )))
            }
            Some(f) if header.crypt_method == CRYPT_NONE => {
                return Err(QmpError::generic(format!(
                    "No encryption in image header, but options specified format '{f}'"
                )))
            }
            Some(f) if f != format_name(header.crypt_method) => {
                return Err(QmpError::generic(format!(
                    "Header reported '{}' encryption format but options specify '{f}'",
                    format_name(header.crypt_method)
                )))
            }
            Some(_) => {}
        }
    }
    if header.crypt_method == CRYPT_NONE {
        return Ok(None);
    }
    let key_secret = opts.and_then(|o| o.key_secret).ok_or_else(|| {
        QmpError::generic(format!(
            "Parameter '{}' is required for cipher",
            o.member_path("encrypt.key-secret")
        ))
    })?;
    let password = o.password(&key_secret)?;
    if header.crypt_method == CRYPT_AES {
        let spec = CipherSpec {
            alg: CipherAlg::Aes128,
            mode: CipherMode::Cbc,
            ivgen: IvGenAlg::Plain64,
            ivgen_hash: None,
        };
        let cipher =
            SectorCipher::new(spec, &aes_key(password.bytes())).map_err(QmpError::generic)?;
        return Ok(Some(Encryption {
            cipher,
            by_host_offset: false,
            luks: None,
        }));
    }
    let (offset, len) = header.crypto_header.ok_or_else(|| {
        QmpError::generic("LUKS encrypted qcow2 image has no crypto header extension")
    })?;
    if offset + len > file.node().size() {
        return Err(QmpError::generic(
            "The crypto header extension points past the end of the image",
        ));
    }
    if len < crypto::luks::HEADER_LEN as u64 {
        return Err(QmpError::generic(
            "The crypto header extension is too short",
        ));
    }
    let Unlocked {
        header: luks,
        master,
    } = unlock(file, offset..offset + len, password.bytes())
        .await
        .map_err(QmpError::generic)?;
    let cipher = luks.cipher(&master).map_err(QmpError::generic)?;
    Ok(Some(Encryption {
        cipher,
        by_host_offset: true,
        luks: Some(Keyslots::new(luks, master, offset..offset + len)),
    }))
}
