//! `ftp`, `ftps`: a disk image on an FTP server (QEMU's curl driver, with suppaftp over
//! tokio and rustls in place of libcurl). Read-only, as in QEMU; the node is a
//! [`WebDriver`].
//!
//! Opening logs in (anonymously, as libcurl, unless `username` is given), switches to
//! binary and asks the file's length with SIZE. A read is REST and RETR on a control
//! connection, reading the range and closing the connection, as ABOR's answers differ
//! between servers; a connection whose transfer ran to the file's end (and the one that
//! opened the node) waits in a small pool for the next read. `ftps` is implicit FTPS (TLS from the first byte, port 990
//! by default), which is what libcurl means by `ftps://`; the certificate is checked
//! against the system's authorities unless `sslverify=off`.
//!
//! Passive mode connects to the control connection's address whatever the server's PASV
//! answer names (libcurl's default since 7.74), so a server cannot point blockd elsewhere.
//! `timeout` bounds each whole fetch. blockd's FTP does not go through proxies: a
//! `proxy-username` is refused rather than ignored.

use crate::drivers::web::{
    certificate_text, check_length, system_tls, CurlOptions, RangeSource, WebDriver,
};
use crate::open::{DriverEntry, Opener};
use crate::Driver;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use qapi::error::QmpError;
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};
use suppaftp::tokio::{
    AsyncRustlsConnector, AsyncRustlsStream, ImplAsyncFtpStream, TokioTlsStream,
};
use suppaftp::types::FileType;
use suppaftp::{FtpError, Status};
use tokio::io::AsyncReadExt;

/// Idle control connections kept per node.
const IDLE: usize = 4;

/// How long connecting and logging in may take when `timeout` is 0 (for ever in libcurl).
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the file is and how to log in.
struct Location {
    host: String,
    port: u16,
    path: String,
    user: String,
    password: String,
    /// Implicit TLS with this configuration (ftps).
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Option<Duration>,
}

/// libcurl's words for an FTP failure, where it has them.
fn ftp_text(e: &FtpError, began: Instant, location: &Location) -> String {
    match e {
        FtpError::UnexpectedResponse(r) => match r.status {
            Status::NotLoggedIn => "Access denied: 530".into(),
            Status::FileUnavailable => "The file does not exist".into(),
            _ => format!(
                "the server answered {}: {}",
                r.status.code(),
                String::from_utf8_lossy(&r.body).trim()
            ),
        },
        FtpError::ConnectionError(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!(
                "Failed to connect to {} port {} after {} ms: Couldn't connect to server",
                location.host,
                location.port,
                began.elapsed().as_millis()
            )
        }
        // suppaftp keeps only the text of rustls's error.
        FtpError::SecureError(text) if text.contains("invalid peer certificate") => {
            certificate_text(text.contains("NotValidForName"))
        }
        other => other.to_string(),
    }
}

/// A logged-in control connection, plain or over TLS.
enum Session {
    Plain(ImplAsyncFtpStream<suppaftp::tokio::AsyncNoTlsStream>),
    Tls(ImplAsyncFtpStream<AsyncRustlsStream>),
}

impl Location {
    async fn connect(&self) -> Result<Session, FtpError> {
        let addr = (self.host.as_str(), self.port);
        let mut session = match &self.tls {
            None => Session::Plain(ImplAsyncFtpStream::connect(addr).await?),
            Some(config) => {
                let connector =
                    AsyncRustlsConnector::from(tokio_rustls::TlsConnector::from(config.clone()));
                Session::Tls(
                    ImplAsyncFtpStream::connect_secure_implicit(addr, connector, &self.host)
                        .await?,
                )
            }
        };
        match &mut session {
            Session::Plain(s) => self.login(s).await?,
            Session::Tls(s) => {
                self.login(s).await?;
                // Data connections over TLS too (implicit FTPS does not say so itself).
                s.custom_command("PBSZ 0", &[Status::CommandOk]).await?;
                s.custom_command("PROT P", &[Status::CommandOk]).await?;
            }
        }
        Ok(session)
    }

    async fn login<T: TokioTlsStream + Send>(
        &self,
        s: &mut ImplAsyncFtpStream<T>,
    ) -> Result<(), FtpError> {
        s.set_passive_nat_workaround(true);
        s.login(self.user.as_str(), self.password.as_str()).await?;
        s.transfer_type(FileType::Binary).await
    }

    /// The file's length (SIZE).
    async fn length(&self, session: &mut Session) -> Result<u64, FtpError> {
        let len = match session {
            Session::Plain(s) => s.size(&self.path).await?,
            Session::Tls(s) => s.size(&self.path).await?,
        };
        Ok(len as u64)
    }
}

/// `len` bytes at `start` on `s`: REST, RETR and read. Whether the connection can be used
/// again comes with the bytes: only when the transfer ran to the file's end. ABOR is not
/// used: servers answer it in different ways (vsftpd's 226 then 225 once the data is
/// sent), which would leave an answer in the control connection for the next command.
async fn retrieve<T: TokioTlsStream + Send + 'static>(
    s: &mut ImplAsyncFtpStream<T>,
    path: &str,
    start: u64,
    len: u64,
    file_len: u64,
) -> Result<(Bytes, bool), FtpError> {
    s.resume_transfer(start as usize).await?;
    let mut stream = s.retr_as_stream(path).await?;
    // Grown as the bytes arrive, so a server that sends less takes less memory.
    let mut data = BytesMut::with_capacity((len as usize).min(1 << 20));
    let mut chunk = vec![0u8; 64 << 10];
    while (data.len() as u64) < len {
        let want = ((len - data.len() as u64) as usize).min(chunk.len());
        let n = stream
            .read(&mut chunk[..want])
            .await
            .map_err(FtpError::ConnectionError)?;
        if n == 0 {
            return Err(FtpError::ConnectionError(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "the server sent {} of the {len} bytes asked for",
                    data.len()
                ),
            )));
        }
        data.extend_from_slice(&chunk[..n]);
    }
    let reusable = start + len == file_len && s.finalize_retr_stream(stream).await.is_ok();
    Ok((data.freeze(), reusable))
}

/// Ranges of one file, over a pool of control connections.
struct FtpSource {
    location: Location,
    len: u64,
    idle: RefCell<Vec<Session>>,
}

impl FtpSource {
    async fn fetch(&self, start: u64, len: u64) -> Result<Bytes, FtpError> {
        let pooled = self.idle.borrow_mut().pop();
        let mut session = match pooled {
            Some(session) => session,
            None => self.location.connect().await?,
        };
        let path = self.location.path.as_str();
        let (data, reusable) = match &mut session {
            Session::Plain(s) => retrieve(s, path, start, len, self.len).await?,
            Session::Tls(s) => retrieve(s, path, start, len, self.len).await?,
        };
        let mut idle = self.idle.borrow_mut();
        if reusable && idle.len() < IDLE {
            idle.push(session);
        }
        Ok(data)
    }
}

#[async_trait(?Send)]
impl RangeSource for FtpSource {
    async fn get(&self, start: u64, len: u64) -> Result<Bytes, String> {
        let began = Instant::now();
        let fetching = self.fetch(start, len);
        let result = match self.location.timeout {
            Some(limit) => tokio::time::timeout(limit, fetching).await.map_err(|_| {
                format!(
                    "Operation timed out after {} milliseconds",
                    began.elapsed().as_millis()
                )
            })?,
            None => fetching.await,
        };
        result.map_err(|e| ftp_text(&e, began, &self.location))
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: false,
    // Reading is all it does: another process may own the image meanwhile.
    hands_over: true,
    names: &["ftp", "ftps"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let driver: &'static str = match o.driver_name() {
        "ftps" => "ftps",
        _ => "ftp",
    };
    let (opts, checked) = CurlOptions::parse(o, driver, options)?;
    if opts.proxy_username.is_some() || opts.proxy_password_secret.is_some() {
        return Err(QmpError::generic(
            "blockd's ftp driver does not go through proxies",
        ));
    }
    let url = reqwest::Url::parse(&opts.url)
        .map_err(|e| QmpError::generic(format!("Invalid URL '{}': {e}", opts.url)))?;
    let host = url
        .host_str()
        .ok_or_else(|| QmpError::generic(format!("No host in URL '{}'", opts.url)))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url
        .port()
        .unwrap_or(if driver == "ftps" { 990 } else { 21 });
    // The path is relative to the login directory, as libcurl takes it (`/%2F...` is
    // absolute).
    let path = percent_decode(url.path().trim_start_matches('/'))?;
    let password = match &opts.password_secret {
        Some(id) => o.secret_text(id)?,
        None => String::new(),
    };
    let (user, password) = match (&opts.username, url.username()) {
        (Some(user), _) => (user.clone(), password),
        (None, "") => ("anonymous".to_string(), "ftp@example.com".to_string()),
        (None, user) => (
            percent_decode(user)?,
            percent_decode(url.password().unwrap_or(""))?,
        ),
    };
    let tls = match driver {
        "ftps" => Some(Arc::new(
            system_tls(opts.sslverify.unwrap_or(true))
                .await
                .map_err(QmpError::generic)?,
        )),
        _ => None,
    };
    let location = Location {
        host,
        port,
        path,
        user,
        password,
        tls,
        timeout: checked.timeout,
    };
    let began = Instant::now();
    let opening = async {
        let mut session = location.connect().await?;
        let len = location.length(&mut session).await?;
        Ok::<_, FtpError>((session, len))
    };
    let (session, len) = tokio::time::timeout(checked.timeout.unwrap_or(OPEN_TIMEOUT), opening)
        .await
        .map_err(|_| {
            QmpError::generic(format!(
                "CURL: Error opening file: Operation timed out after {} milliseconds",
                began.elapsed().as_millis()
            ))
        })?
        .map_err(|e| {
            QmpError::generic(format!(
                "CURL: Error opening file: {}",
                ftp_text(&e, began, &location)
            ))
        })?;
    check_length(len)?;
    let source = FtpSource {
        location,
        len,
        idle: RefCell::new(vec![session]),
    };
    Ok(Box::new(WebDriver::start(
        driver,
        opts.url,
        len,
        checked.readahead,
        Box::new(source),
    )))
}

/// A URL component with its percent escapes decoded.
fn percent_decode(text: &str) -> Result<String, QmpError> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|t| t.into_owned())
        .map_err(|_| QmpError::generic(format!("Invalid URL text: '{text}'")))
}
