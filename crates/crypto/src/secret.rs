//! Secrets: the passwords and keys other objects name by id (`key-secret`), as QEMU's
//! `secret` objects hold them.
//!
//! A secret comes from `data` or from a `file`, raw or base64, and may itself be encrypted
//! with AES-256-CBC under another secret (`keyid` and `iv`). Its bytes are wiped from
//! memory when it is dropped, and no `Debug` or error text ever shows them.

use crate::algo::CipherAlg;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use zeroize::Zeroizing;

/// glib's decoder, which QEMU's base64 goes through, takes missing padding and stray
/// trailing bits.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// A secret's value.
pub struct Secret(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(Zeroizing::new(bytes))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// The secret as a password: QEMU takes passwords as UTF-8 text.
    pub fn as_utf8(&self, id: &str) -> Result<&str, String> {
        std::str::from_utf8(&self.0)
            .map_err(|_| format!("Data from secret {id} is not valid UTF-8"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SecretFormat {
    #[default]
    Raw,
    Base64,
}

impl SecretFormat {
    pub fn from_name(name: &str) -> Option<SecretFormat> {
        match name {
            "raw" => Some(SecretFormat::Raw),
            "base64" => Some(SecretFormat::Base64),
            _ => None,
        }
    }
}

/// The properties of a `secret` object.
#[derive(Default)]
pub struct SecretOptions {
    pub data: Option<Zeroizing<String>>,
    pub file: Option<String>,
    pub format: SecretFormat,
    /// The secret that decrypts this one (AES-256-CBC, so 32 bytes long).
    pub keyid: Option<String>,
    /// The base64 IV of that decryption.
    pub iv: Option<String>,
}

/// QEMU's qbase64_decode: only the base64 alphabet, then glib's lenient decoding.
fn decode_base64(input: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
    if input.contains(&0) {
        return Err("Base64 data contains embedded NUL characters".into());
    }
    if !input
        .iter()
        .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'='))
    {
        return Err("Base64 data contains invalid characters".into());
    }
    LENIENT
        .decode(input)
        .map(Zeroizing::new)
        .map_err(|e| format!("Base64 data is not valid: {e}"))
}

impl SecretOptions {
    /// The secret's value; `lookup` finds the secret `keyid` names.
    pub fn load(&self, lookup: impl Fn(&str) -> Option<Arc<Secret>>) -> Result<Secret, String> {
        let input: Zeroizing<Vec<u8>> = match (&self.data, &self.file) {
            (Some(_), Some(_)) => return Err("'file' and 'data' are mutually exclusive".into()),
            (None, None) => return Err("Either 'file' or 'data' must be provided".into()),
            (Some(data), None) => Zeroizing::new(data.as_bytes().to_vec()),
            (None, Some(file)) => std::fs::read(file).map(Zeroizing::new).map_err(|e| {
                // glib's text, which QEMU passes on; the OS's without Rust's "(os error N)".
                let text = e.to_string();
                let reason = text.split(" (os error").next().unwrap_or(&text);
                format!(
                    "Unable to read {file}: Failed to open file \u{201c}{file}\u{201d}: {reason}"
                )
            })?,
        };
        let value = match &self.keyid {
            Some(keyid) => self.decrypt(keyid, &input, lookup)?,
            None if self.format == SecretFormat::Base64 => decode_base64(&input)?,
            None => input,
        };
        Ok(Secret(value))
    }

    fn decrypt(
        &self,
        keyid: &str,
        input: &[u8],
        lookup: impl Fn(&str) -> Option<Arc<Secret>>,
    ) -> Result<Zeroizing<Vec<u8>>, String> {
        let key = lookup(keyid).ok_or_else(|| format!("No secret with id '{keyid}'"))?;
        if key.bytes().len() != 32 {
            return Err("Key should be 32 bytes in length".into());
        }
        let iv = self
            .iv
            .as_deref()
            .ok_or("IV is required to decrypt secret")?;
        let iv = decode_base64(iv.as_bytes())?;
        if iv.len() != 16 {
            return Err(format!("IV should be 16 bytes in length not {}", iv.len()));
        }
        let mut data = match self.format {
            SecretFormat::Base64 => decode_base64(input)?,
            SecretFormat::Raw => Zeroizing::new(input.to_vec()),
        };
        crate::cipher::cbc_decrypt(CipherAlg::Aes256, key.bytes(), &iv, &mut data)?;
        let padding = data.last().copied().unwrap_or(0);
        if padding > 16 || usize::from(padding) > data.len() {
            return Err(format!(
                "Incorrect number of padding bytes ({padding}) found on decrypted data"
            ));
        }
        let len = data.len() - usize::from(padding);
        data.truncate(len);
        Ok(data)
    }
}

/// The daemon's secrets by id.
#[derive(Default)]
pub struct Secrets {
    map: Mutex<HashMap<String, Arc<Secret>>>,
}

impl Secrets {
    /// Add a secret; false if the id is taken.
    pub fn insert(&self, id: &str, secret: Secret) -> bool {
        let mut map = self.map.lock().expect("secrets lock");
        if map.contains_key(id) {
            return false;
        }
        map.insert(id.to_string(), Arc::new(secret));
        true
    }

    pub fn get(&self, id: &str) -> Option<Arc<Secret>> {
        self.map.lock().expect("secrets lock").get(id).cloned()
    }

    pub fn remove(&self, id: &str) -> bool {
        self.map.lock().expect("secrets lock").remove(id).is_some()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.map.lock().expect("secrets lock").contains_key(id)
    }

    /// The ids, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .map
            .lock()
            .expect("secrets lock")
            .keys()
            .cloned()
            .collect();
        ids.sort();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(data: &str) -> SecretOptions {
        SecretOptions {
            data: Some(Zeroizing::new(data.to_string())),
            ..SecretOptions::default()
        }
    }

    #[test]
    fn data_is_raw_or_base64() {
        assert_eq!(opts("pw").load(|_| None).unwrap().bytes(), b"pw");
        let mut b = opts("cHc=");
        b.format = SecretFormat::Base64;
        assert_eq!(b.load(|_| None).unwrap().bytes(), b"pw");
        let mut bad = opts("@@");
        bad.format = SecretFormat::Base64;
        assert_eq!(
            bad.load(|_| None).unwrap_err(),
            "Base64 data contains invalid characters"
        );
    }

    /// A secret encrypted as QEMU's documentation shows: `openssl enc -aes-256-cbc` of
    /// "letmein" with key "0123456789abcdef0123456789abcdef" and a zero IV.
    #[test]
    fn an_encrypted_secret_is_decrypted_with_its_key() {
        let key = Arc::new(Secret::new(b"0123456789abcdef0123456789abcdef".to_vec()));
        let mut o = opts("yaX//RwWd58JvrjMnO8YPA==");
        o.format = SecretFormat::Base64;
        o.keyid = Some("k".into());
        o.iv = Some("AAAAAAAAAAAAAAAAAAAAAA==".into());
        let lookup = |id: &str| (id == "k").then(|| key.clone());
        assert_eq!(o.load(lookup).unwrap().bytes(), b"letmein");
        o.iv = None;
        assert_eq!(
            o.load(lookup).unwrap_err(),
            "IV is required to decrypt secret"
        );
        o.keyid = Some("none".into());
        assert_eq!(o.load(lookup).unwrap_err(), "No secret with id 'none'");
    }

    #[test]
    fn debug_never_shows_the_value() {
        assert_eq!(
            format!("{:?}", Secret::new(b"hunter2".to_vec())),
            "Secret(..)"
        );
    }
}
