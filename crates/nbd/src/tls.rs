//! TLS for NBD: x509 credentials loaded from a directory laid out as QEMU's
//! `tls-creds-x509` reads it (`ca-cert.pem`, optional `ca-crl.pem`, `server-cert.pem` and
//! `server-key.pem`, or `client-cert.pem` and `client-key.pem`), the rustls configurations
//! built from them, and the peer's distinguished name as QEMU's authz objects match it.
//!
//! rustls speaks TLS 1.2 and 1.3 with ECDHE only, so a `dh-params.pem` in the directory
//! (used by GnuTLS for DHE suites) has nothing to configure and is not read.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};

/// Which side of a connection credentials are for (QEMU's `endpoint`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Accepts connections: presents `server-cert.pem`.
    Server,
    /// Connects: checks the server against `ca-cert.pem`, presents `client-cert.pem` if
    /// the directory has one.
    Client,
}

/// The properties of a `tls-creds-x509` object.
#[derive(Clone)]
pub struct X509Options {
    /// The directory holding the PEM files.
    pub dir: PathBuf,
    /// Server or client side.
    pub endpoint: Endpoint,
    /// Server: require a client certificate signed by the CA. Client: check the server's
    /// certificate and name. QEMU's default is on.
    pub verify_peer: bool,
    /// A GnuTLS priority string, as far as rustls can follow it (see [`Priority`]).
    pub priority: Option<String>,
    /// Check at load time that the object's own certificate is valid, signed by the CA
    /// and meant for its side (QEMU's `sanity-check`, on by default).
    pub sanity_check: bool,
    /// The password of an encrypted private key (QEMU's `passwordid`, resolved).
    pub key_password: Option<zeroize::Zeroizing<Vec<u8>>>,
}

/// A GnuTLS priority string read as far as rustls can do what it says: a keyword
/// (`NORMAL`, `PERFORMANCE`, `PFS`, `SECURE128`, `@SYSTEM`: rustls's suites, all of which
/// have forward secrecy and at least 128-bit keys; `SECURE192`, `SECURE256`: 256-bit suites
/// only), then `:`-separated `+VERS-TLS1.2`, `-VERS-TLS1.3`, `-VERS-ALL` and the like, and
/// `%SERVER_PRECEDENCE`. Removing versions rustls never speaks (TLS 1.1 and older) changes
/// nothing; anything else is refused rather than ignored.
struct Priority {
    tls12: bool,
    tls13: bool,
    strong_only: bool,
    server_precedence: bool,
}

impl Priority {
    fn parse(text: &str) -> Result<Priority, String> {
        let refuse = |item: &str| {
            format!(
                "TLS priority '{text}': blockd cannot apply '{item}' (its TLS library, rustls, \
                 speaks TLS 1.2 and 1.3 with its own cipher suites)"
            )
        };
        let mut items = text.split(':');
        let keyword = items.next().unwrap_or_default();
        let mut p = Priority {
            tls12: true,
            tls13: true,
            strong_only: false,
            server_precedence: false,
        };
        match keyword {
            "NORMAL" | "PERFORMANCE" | "PFS" | "SECURE128" | "@SYSTEM" => {}
            "SECURE192" | "SECURE256" => p.strong_only = true,
            other => return Err(refuse(other)),
        }
        for item in items {
            match item {
                "+VERS-TLS1.2" => p.tls12 = true,
                "+VERS-TLS1.3" => p.tls13 = true,
                "+VERS-ALL" | "+VERS-TLS-ALL" => (p.tls12, p.tls13) = (true, true),
                "-VERS-TLS1.2" => p.tls12 = false,
                "-VERS-TLS1.3" => p.tls13 = false,
                "-VERS-ALL" | "-VERS-TLS-ALL" => (p.tls12, p.tls13) = (false, false),
                "-VERS-SSL3.0" | "-VERS-TLS1.0" | "-VERS-TLS1.1" | "-VERS-DTLS-ALL"
                | "-VERS-DTLS1.0" | "-VERS-DTLS1.2" => {}
                "%SERVER_PRECEDENCE" => p.server_precedence = true,
                other => return Err(refuse(other)),
            }
        }
        if !p.tls12 && !p.tls13 {
            return Err(format!(
                "TLS priority '{text}' leaves no protocol version (blockd speaks TLS 1.2 and 1.3)"
            ));
        }
        Ok(p)
    }

    fn versions(&self) -> Vec<&'static rustls::SupportedProtocolVersion> {
        let mut v = Vec::new();
        if self.tls13 {
            v.push(&rustls::version::TLS13);
        }
        if self.tls12 {
            v.push(&rustls::version::TLS12);
        }
        v
    }

    /// The provider with only the suites the keyword allows.
    fn provider(&self) -> Arc<CryptoProvider> {
        use rustls::CipherSuite as S;
        let mut provider = base_provider();
        if self.strong_only {
            provider.cipher_suites.retain(|s| {
                matches!(
                    s.suite(),
                    S::TLS13_AES_256_GCM_SHA384
                        | S::TLS13_CHACHA20_POLY1305_SHA256
                        | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
                        | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
                        | S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
                        | S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
                )
            });
        }
        Arc::new(provider)
    }
}

/// Loaded x509 credentials, ready for connections.
pub struct TlsCreds {
    endpoint: Endpoint,
    dir: PathBuf,
    verify_peer: bool,
    config: Config,
}

enum Config {
    Server(tokio_rustls::TlsAcceptor),
    Client(tokio_rustls::TlsConnector),
}

impl std::fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCreds")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// ring, which rustls 0.23.48 marks deprecated for its lack of post-quantum key exchange:
/// the other provider, aws-lc-rs, needs cmake and minutes of C build on these 2-core
/// machines, and QEMU's GnuTLS peers negotiate classic ECDHE with either.
#[allow(deprecated)]
fn base_provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A client configuration for the web protocols (the https and ftps drivers), which QEMU
/// hands to libcurl without credentials objects: the system's trusted authorities
/// (`/etc/ssl/certs`, or the files `SSL_CERT_FILE` and `SSL_CERT_DIR` name), or with
/// `verify == false` (QEMU's `sslverify=off`) any certificate.
pub fn system_client_config(verify: bool) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(base_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if verify {
        let loaded = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(loaded.certs);
        if added == 0 {
            let why = loaded
                .errors
                .first()
                .map_or("none found".to_string(), |e| e.to_string());
            return Err(format!(
                "No trusted certificate authorities to verify the server with: {why}"
            ));
        }
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("Unable to set up server verification: {e}"))?;
        builder.with_webpki_verifier(verifier)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
    };
    Ok(builder.with_no_client_auth())
}

/// QEMU's words for a credentials file that cannot be opened.
fn access_error(path: &Path, e: &io::Error) -> String {
    format!(
        "Unable to access credentials {}: {}",
        path.display(),
        crate::socket::os_text(e)
    )
}

/// Reads a required (or, with `required == false`, optional) file's PEM objects.
fn pem_file<T: PemObject>(path: &Path, required: bool, what: &str) -> Result<Vec<T>, String> {
    match std::fs::metadata(path) {
        Err(e) if !required && e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(access_error(path, &e)),
        Ok(_) => {}
    }
    let items: Result<Vec<T>, _> = T::pem_file_iter(path)
        .map_err(|e| format!("Unable to import {what} {}: {e}", path.display()))?
        .collect();
    let items = items.map_err(|e| format!("Unable to import {what} {}: {e}", path.display()))?;
    if items.is_empty() {
        return Err(format!(
            "Unable to import {what} {}: no PEM object found",
            path.display()
        ));
    }
    Ok(items)
}

/// The private key in `path` (of the certificate in `cert_path`); with `password`, the key
/// must be encrypted PKCS #8.
fn private_key(
    path: &Path,
    cert_path: &Path,
    password: Option<&[u8]>,
) -> Result<PrivateKeyDer<'static>, String> {
    let import_error =
        |e: &dyn std::fmt::Display| format!("Unable to import private key {}: {e}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| access_error(path, &e))?;
    let encrypted = text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----");
    match (password, encrypted) {
        (None, false) => {
            PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|e| import_error(&e))
        }
        (None, true) => Err(import_error(
            &"the key is encrypted: give its password with passwordid",
        )),
        (Some(_), false) => Err(import_error(
            &"passwordid is given but the key is not encrypted",
        )),
        (Some(password), true) => {
            let (_, doc) = pkcs8::SecretDocument::from_pem(&text).map_err(|e| import_error(&e))?;
            let info = pkcs8::EncryptedPrivateKeyInfo::try_from(doc.as_bytes())
                .map_err(|e| import_error(&e))?;
            // QEMU's (GnuTLS's) words for a wrong password.
            let plain = info.decrypt(password).map_err(|_| {
                format!(
                    "Cannot load certificate '{}' & key '{}': Decryption has failed.",
                    cert_path.display(),
                    path.display()
                )
            })?;
            Ok(PrivateKeyDer::Pkcs8(plain.as_bytes().to_vec().into()))
        }
    }
}

/// QEMU's sanity check: the object's own certificate chains to the CA, is valid now and
/// is meant for its side.
fn check_own_certificate(
    provider: &CryptoProvider,
    certs: &[CertificateDer<'static>],
    cas: &[CertificateDer<'static>],
    usage: webpki::KeyUsage,
    cert_path: &Path,
    ca_path: &Path,
) -> Result<(), String> {
    let failed = |reason: String| {
        format!(
            "Our own certificate {} failed validation against {}: {reason}",
            cert_path.display(),
            ca_path.display()
        )
    };
    let anchors: Vec<_> = cas
        .iter()
        .filter_map(|ca| webpki::anchor_from_trusted_cert(ca).ok())
        .collect();
    let Some((own, intermediates)) = certs.split_first() else {
        return Err(failed("no certificate".into()));
    };
    let own = webpki::EndEntityCert::try_from(own).map_err(|e| failed(format!("{e:?}")))?;
    own.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &anchors,
        intermediates,
        UnixTime::now(),
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| {
        failed(match e {
            webpki::Error::UnknownIssuer => "The certificate hasn't got a known issuer".into(),
            webpki::Error::CertExpired { .. } => "The certificate has expired".into(),
            webpki::Error::CertNotValidYet { .. } => "The certificate is not yet activated".into(),
            other => format!("{other:?}"),
        })
    })
}

impl TlsCreds {
    /// Loads the directory's files for `opts.endpoint` and checks that they fit together
    /// (QEMU loads and checks them when the object is created, so does blockd).
    pub fn load_x509(opts: &X509Options) -> Result<TlsCreds, String> {
        let dir = &opts.dir;
        let ca_path = dir.join("ca-cert.pem");
        let cas: Vec<CertificateDer<'static>> = pem_file(&ca_path, true, "CA certificate list")?;
        let crls: Vec<CertificateRevocationListDer<'static>> =
            pem_file(&dir.join("ca-crl.pem"), false, "CA revocation list")?;
        let mut roots = RootCertStore::empty();
        for ca in cas.iter().cloned() {
            roots.add(ca).map_err(|e| {
                format!("Unable to import CA certificate {}: {e}", ca_path.display())
            })?;
        }
        let roots = Arc::new(roots);
        let priority = Priority::parse(opts.priority.as_deref().unwrap_or("NORMAL"))?;
        let provider = priority.provider();
        let versions = priority.versions();
        let password = opts.key_password.as_ref().map(|p| p.as_slice());
        let config = match opts.endpoint {
            Endpoint::Server => {
                let cert_path = dir.join("server-cert.pem");
                let certs = pem_file(&cert_path, true, "server certificate")?;
                let key = private_key(&dir.join("server-key.pem"), &cert_path, password)?;
                if opts.sanity_check {
                    check_own_certificate(
                        &provider,
                        &certs,
                        &cas,
                        webpki::KeyUsage::server_auth(),
                        &cert_path,
                        &ca_path,
                    )?;
                }
                let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(&versions)
                    .map_err(|e| e.to_string())?;
                let builder = if opts.verify_peer {
                    let verifier =
                        WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                            .with_crls(crls)
                            .build()
                            .map_err(|e| format!("Unable to set up client verification: {e}"))?;
                    builder.with_client_cert_verifier(verifier)
                } else {
                    builder.with_no_client_auth()
                };
                let mut config = builder.with_single_cert(certs, key).map_err(|e| {
                    format!(
                        "Unable to load server certificate {}: {e}",
                        cert_path.display()
                    )
                })?;
                config.ignore_client_order = priority.server_precedence;
                Config::Server(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
            }
            Endpoint::Client => {
                let cert_path = dir.join("client-cert.pem");
                let certs: Vec<CertificateDer<'static>> =
                    pem_file(&cert_path, false, "client certificate")?;
                if opts.sanity_check && !certs.is_empty() {
                    check_own_certificate(
                        &provider,
                        &certs,
                        &cas,
                        webpki::KeyUsage::client_auth(),
                        &cert_path,
                        &ca_path,
                    )?;
                }
                let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(&versions)
                    .map_err(|e| e.to_string())?;
                let builder = if opts.verify_peer {
                    let verifier =
                        WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                            .with_crls(crls)
                            .build()
                            .map_err(|e| format!("Unable to set up server verification: {e}"))?;
                    builder.with_webpki_verifier(verifier)
                } else {
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
                };
                let config = if certs.is_empty() {
                    builder.with_no_client_auth()
                } else {
                    let key = private_key(&dir.join("client-key.pem"), &cert_path, password)?;
                    builder.with_client_auth_cert(certs, key).map_err(|e| {
                        format!(
                            "Unable to load client certificate {}: {e}",
                            cert_path.display()
                        )
                    })?
                };
                Config::Client(tokio_rustls::TlsConnector::from(Arc::new(config)))
            }
        };
        Ok(TlsCreds {
            endpoint: opts.endpoint,
            dir: opts.dir.clone(),
            verify_peer: opts.verify_peer,
            config,
        })
    }

    /// The side these credentials are for.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// The directory the files came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the peer's certificate is checked.
    pub fn verify_peer(&self) -> bool {
        self.verify_peer
    }

    /// Server side of the TLS handshake over `stream`. Returns the stream and the client
    /// certificate's distinguished name, if it sent one.
    pub(crate) async fn accept<S>(
        &self,
        stream: S,
    ) -> io::Result<(tokio_rustls::server::TlsStream<S>, Option<String>)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Config::Server(acceptor) = &self.config else {
            return Err(io::Error::other("TLS credentials are not for a server"));
        };
        let tls = acceptor.accept(stream).await?;
        let name = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| distinguished_name(cert));
        Ok((tls, name))
    }

    /// Client side of the TLS handshake over `stream`, checking the server's certificate
    /// against `hostname`.
    pub(crate) async fn connect<S>(
        &self,
        stream: S,
        hostname: &str,
    ) -> io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Config::Client(connector) = &self.config else {
            return Err(io::Error::other("TLS credentials are not for a client"));
        };
        let name = ServerName::try_from(hostname.to_string()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("'{hostname}' is not a valid TLS host name"),
            )
        })?;
        connector
            .connect(name, stream)
            .await
            .map_err(|e| certificate_error(e, hostname))
    }
}

/// The server certificate's faults in QEMU's (GnuTLS's) words; other errors as they are.
fn certificate_error(e: io::Error, hostname: &str) -> io::Error {
    use rustls::CertificateError;
    let text = match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(cert)) => match cert {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("Certificate does not match the hostname {hostname}")
            }
            CertificateError::UnknownIssuer => "The certificate hasn't got a known issuer".into(),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "The certificate has expired".into()
            }
            CertificateError::Revoked => "The certificate has been revoked".into(),
            _ => return e,
        },
        _ => return e,
    };
    io::Error::new(io::ErrorKind::PermissionDenied, text)
}

/// A certificate's subject as GnuTLS prints it and QEMU's authz objects match it: the
/// relative distinguished names in the certificate's order, joined by commas, each as
/// RFC 4514 writes it (`C=GB,O=Example,CN=client.example`).
pub fn distinguished_name(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(cert.as_ref()).ok()?;
    let names: Vec<String> = cert
        .tbs_certificate
        .subject
        .0
        .iter()
        .map(|rdn| rdn.to_string())
        .collect();
    Some(names.join(","))
}

/// A client's `verify-peer=off`: the server's certificate is taken as it comes, as QEMU
/// does then; its signature over the handshake is still checked.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::Priority;

    #[test]
    fn priority_strings_become_versions_and_suites_or_are_refused() {
        let p = Priority::parse("NORMAL:-VERS-TLS1.3").unwrap();
        assert_eq!(p.versions(), [&rustls::version::TLS12]);
        let p = Priority::parse("SECURE256:-VERS-ALL:+VERS-TLS1.3:%SERVER_PRECEDENCE").unwrap();
        assert_eq!(p.versions(), [&rustls::version::TLS13]);
        assert!(p.server_precedence);
        let suites = p.provider().cipher_suites.len();
        assert!(suites > 0 && suites < super::base_provider().cipher_suites.len());
        // Versions rustls never speaks may be taken away; nothing is left, or an item it
        // cannot follow, is refused.
        assert!(Priority::parse("NORMAL:-VERS-TLS1.0:-VERS-TLS1.1").is_ok());
        let err = Priority::parse("NORMAL:-VERS-ALL").err().unwrap();
        assert!(err.contains("leaves no protocol version"), "{err}");
        let err = Priority::parse("NORMAL:+ARCFOUR-128").err().unwrap();
        assert!(err.contains("cannot apply '+ARCFOUR-128'"), "{err}");
        assert!(Priority::parse("LEGACY").is_err());
    }
}
