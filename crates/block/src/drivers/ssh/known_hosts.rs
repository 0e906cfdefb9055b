//! known_hosts as OpenSSH and libssh read it: a host field of comma-separated patterns
//! (`*` and `?` wildcards, `!` negation, `[host]:port`, or a `|1|salt|hash` HMAC-SHA1
//! of the name), matched case-insensitively; an optional `@revoked` or
//! `@cert-authority` marker; the key's type, which must agree with the key. For port 22 a
//! host is also written `[host]:22`.

use base64::Engine;
use hmac::{Hmac, Mac};
use russh::keys::PublicKey;
use std::path::PathBuf;

/// What the files say about one host.
#[derive(Default)]
pub struct Recorded {
    pub keys: Vec<PublicKey>,
    pub revoked: Vec<PublicKey>,
}

/// The names `host` at `port` goes by in a known_hosts file.
fn names(host: &str, port: u16) -> Vec<String> {
    let host = host.to_lowercase();
    match port {
        22 => vec![host.clone(), format!("[{host}]:22")],
        _ => vec![format!("[{host}]:{port}")],
    }
}

/// Whether `pattern` (with `*` and `?`) matches `name`.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.split_first(), name.split_first()) {
        (None, None) => true,
        (Some((b'*', rest)), _) => {
            glob(rest, name) || name.split_first().is_some_and(|(_, n)| glob(pattern, n))
        }
        (Some((b'?', rest)), Some((_, n))) => glob(rest, n),
        (Some((p, rest)), Some((c, n))) => p == c && glob(rest, n),
        _ => false,
    }
}

/// Whether a hashed entry (`|1|salt|hash`) is one of `names`.
fn hashed_matches(field: &str, names: &[String]) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut parts = field.trim_start_matches("|1|").split('|');
    let (Some(salt), Some(hash)) = (parts.next(), parts.next()) else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (b64.decode(salt), b64.decode(hash)) else {
        return false;
    };
    names.iter().any(|name| {
        let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(&salt) else {
            return false;
        };
        mac.update(name.as_bytes());
        mac.verify_slice(&hash).is_ok()
    })
}

/// Whether a host field names one of `names`: a hashed name, or patterns of which one
/// matches and no negated one does.
fn host_matches(field: &str, names: &[String]) -> bool {
    if field.starts_with("|1|") {
        return hashed_matches(field, names);
    }
    let mut matched = false;
    for pattern in field.split(',') {
        let pattern = pattern.to_lowercase();
        let (negated, pattern) = match pattern.strip_prefix('!') {
            Some(p) => (true, p.to_string()),
            None => (false, pattern),
        };
        if names.iter().any(|n| glob(pattern.as_bytes(), n.as_bytes())) {
            if negated {
                return false;
            }
            matched = true;
        }
    }
    matched
}

/// The keys `files` record for `host` at `port`; files that cannot be read count as empty.
pub fn recorded(files: &[PathBuf], host: &str, port: u16) -> Recorded {
    let names = names(host, port);
    let mut found = Recorded::default();
    for file in files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines() {
            let mut fields = line.split_whitespace().peekable();
            if fields.peek().is_none_or(|f| f.starts_with('#')) {
                continue;
            }
            let marker = fields.next_if(|f| f.starts_with('@'));
            let (Some(hosts), Some(kind), Some(key)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if marker == Some("@cert-authority") || !host_matches(hosts, &names) {
                continue;
            }
            let Ok(key) = PublicKey::from_openssh(&format!("{kind} {key}")) else {
                continue;
            };
            if key.algorithm().as_str() != kind {
                continue;
            }
            match marker {
                Some("@revoked") => found.revoked.push(key),
                _ => found.keys.push(key),
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG4SfbXFUQTYzN7AqCywpHObZ2XVyt8a54PVMvjXxVzT";

    fn found(line: &str, host: &str, port: u16) -> usize {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("known_hosts");
        std::fs::write(&file, format!("{line}\n")).unwrap();
        recorded(&[file], host, port).keys.len()
    }

    #[test]
    fn host_fields_match_as_in_openssh() {
        assert_eq!(
            found(&format!("[127.0.0.1]:2222 {KEY}"), "127.0.0.1", 2222),
            1
        );
        assert_eq!(found(&format!("127.0.0.1 {KEY}"), "127.0.0.1", 2222), 0);
        assert_eq!(found(&format!("127.0.0.1 {KEY}"), "127.0.0.1", 22), 1);
        assert_eq!(found(&format!("[127.0.0.1]:22 {KEY}"), "127.0.0.1", 22), 1);
        assert_eq!(
            found(&format!("[127.0.0.*]:2222 {KEY}"), "127.0.0.1", 2222),
            1
        );
        assert_eq!(found(&format!("* {KEY}"), "example.org", 22), 1);
        assert_eq!(found(&format!("*,!bad.org {KEY}"), "bad.org", 22), 0);
        assert_eq!(found(&format!("HOST.example {KEY}"), "host.EXAMPLE", 22), 1);
        assert_eq!(found(&format!("  host  {KEY}  comment"), "host", 22), 1);
        assert_eq!(found(&format!("@cert-authority * {KEY}"), "host", 22), 0);
        assert_eq!(found(&format!("# host {KEY}"), "host", 22), 0);
    }

    #[test]
    fn the_key_type_must_agree_with_the_key() {
        let wrong = KEY.replace("ssh-ed25519", "ssh-rsa");
        assert_eq!(found(&format!("host {wrong}"), "host", 22), 0);
    }

    #[test]
    fn hashed_names_match() {
        // `ssh-keygen -H` form of "[127.0.0.1]:2222" with salt "salt".
        let salt = b"0123456789abcdefghij";
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(salt).unwrap();
        mac.update(b"[127.0.0.1]:2222");
        let b64 = base64::engine::general_purpose::STANDARD;
        let field = format!(
            "|1|{}|{}",
            b64.encode(salt),
            b64.encode(mac.finalize().into_bytes())
        );
        assert_eq!(found(&format!("{field} {KEY}"), "127.0.0.1", 2222), 1);
        assert_eq!(found(&format!("{field} {KEY}"), "127.0.0.2", 2222), 0);
    }

    #[test]
    fn revoked_keys_are_kept_apart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("known_hosts");
        std::fs::write(&file, format!("@revoked host {KEY}\n")).unwrap();
        let r = recorded(&[file], "host", 22);
        assert_eq!((r.keys.len(), r.revoked.len()), (0, 1));
    }
}
