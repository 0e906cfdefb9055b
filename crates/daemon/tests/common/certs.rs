//! Certificates made for a test by openssl, in QEMU's directory layout (`ca-cert.pem`,
//! `<who>-cert.pem`, `<who>-key.pem`): for NBD over TLS and the https driver.

use super::run;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = run(Command::new("openssl").args(args).current_dir(dir));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA in `dir/name-ca` (ca-cert.pem, ca-key.pem), with QEMU's required extensions.
pub fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let ca = dir.join(format!("{name}-ca"));
    std::fs::create_dir_all(&ca).unwrap();
    openssl(
        &ca,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "30",
            "-subj",
            &format!("/CN={name} test CA"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    ca
}

/// `dir/who` with the CA's certificate and `who-cert.pem`/`who-key.pem` signed by it.
pub fn make_peer(ca: &Path, dir: &Path, who: &str, subject: &str, extensions: &str) -> PathBuf {
    let out = dir.join(who);
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(ca.join("ca-cert.pem"), out.join("ca-cert.pem")).unwrap();
    let key = out.join(format!("{who}-key.pem"));
    let csr = dir.join(format!("{who}.csr"));
    let ext = dir.join(format!("{who}.ext"));
    std::fs::write(
        &ext,
        format!(
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n{extensions}\n"
        ),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key.to_string_lossy(),
            "-out",
            &csr.to_string_lossy(),
            "-subj",
            subject,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr.to_string_lossy(),
            "-CA",
            &ca.join("ca-cert.pem").to_string_lossy(),
            "-CAkey",
            &ca.join("ca-key.pem").to_string_lossy(),
            "-CAcreateserial",
            "-out",
            &out.join(format!("{who}-cert.pem")).to_string_lossy(),
            "-days",
            "30",
            "-extfile",
            &ext.to_string_lossy(),
        ],
    );
    out
}
