//! `ftp`, `ftps`: a disk image on an FTP server (QEMU's curl driver, with an FTP client
//! of blockd's own over tokio and rustls in place of libcurl). Read-only, as in QEMU; the
//! node is a [`WebDriver`].
//!
//! Opening logs in (anonymously, as libcurl, unless `username` is given), switches to
//! binary and asks the file's length with SIZE. A read is EPSV (or PASV), REST and RETR on
//! a control connection, reading the range; the connection is then closed unless the
//! transfer ran to the file's end, as ABOR's answers differ between servers (vsftpd sends
//! 226 and then 225 once the data is out, which the next command would read). `ftps` is
//! implicit FTPS (TLS from the first byte, port 990 by default), which is what libcurl
//! means by `ftps://`, with PBSZ 0 and PROT P so the data connections are encrypted too;
//! the certificate is checked against the system's authorities unless `sslverify=off`.
//!
//! The client is written here rather than taken from a crate: the FTP crate there is
//! (suppaftp) reads a reply line of any length into memory, so a hostile server could make
//! blockd allocate without bound, and its ABOR handling leaves stray replies. Here a reply
//! line is at most [`MAX_LINE`] bytes and a reply at most [`MAX_LINES`] lines.
//!
//! Passive mode connects to the control connection's address whatever the server's answer
//! names (libcurl's default since 7.74), so a server cannot point blockd elsewhere.
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
use rustls::pki_types::ServerName;
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Idle control connections kept per node.
const IDLE: usize = 4;

/// How long connecting and logging in may take when `timeout` is 0 (for ever in libcurl).
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest reply line taken, and the most lines in one reply.
const MAX_LINE: u64 = 4096;
const MAX_LINES: usize = 256;

/// A control or data connection, plain or over TLS.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Why an FTP exchange failed.
enum Failure {
    /// The connection itself (refused, reset, TLS, a bad reply's form).
    Io(io::Error),
    /// A reply with an unexpected code.
    Reply(u32, String),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Io(e)
    }
}

fn malformed(what: &str) -> Failure {
    Failure::Io(io::Error::new(io::ErrorKind::InvalidData, what.to_string()))
}

/// Where the file is and how to log in.
struct Location {
    host: String,
    port: u16,
    path: String,
    user: String,
    password: String,
    /// Implicit TLS with this connector (ftps).
    tls: Option<tokio_rustls::TlsConnector>,
    timeout: Option<Duration>,
}

/// libcurl's words for an FTP failure, where it has them.
fn ftp_text(e: &Failure, began: Instant, location: &Location) -> String {
    match e {
        Failure::Reply(530, _) => "Access denied: 530".into(),
        Failure::Reply(550, _) => "The file does not exist".into(),
        Failure::Reply(code, text) => format!("the server answered {code}: {text}"),
        Failure::Io(io) if io.kind() == io::ErrorKind::ConnectionRefused => format!(
            "Failed to connect to {} port {} after {} ms: Couldn't connect to server",
            location.host,
            location.port,
            began.elapsed().as_millis()
        ),
        Failure::Io(io) => match io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::InvalidCertificate(why)) => certificate_text(matches!(
                why,
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            )),
            Some(other) => format!("SSL connect error: {other}"),
            None => io.to_string(),
        },
    }
}

/// A logged-in control connection.
struct Control {
    stream: BufReader<Box<dyn Stream>>,
    /// The server's address, where passive data connections go.
    peer: SocketAddr,
}

impl Control {
    /// The next reply: its code and text, lines bounded.
    async fn reply(&mut self) -> Result<(u32, String), Failure> {
        let mut text = String::new();
        let mut code = None;
        for _ in 0..MAX_LINES {
            let mut line = Vec::new();
            (&mut self.stream)
                .take(MAX_LINE)
                .read_until(b'\n', &mut line)
                .await?;
            if line.last() != Some(&b'\n') {
                return Err(match line.len() as u64 {
                    MAX_LINE => malformed("a reply line longer than 4096 bytes"),
                    _ => Failure::Io(io::ErrorKind::UnexpectedEof.into()),
                });
            }
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            let this: Option<u32> = line.get(..3).and_then(|c| c.parse().ok());
            text.push_str(line.get(4..).unwrap_or(""));
            match (code, this) {
                // The first line sets the code; "123-" opens a reply of many lines.
                (None, Some(c)) if line.as_bytes().get(3) == Some(&b'-') => code = Some(c),
                (None, Some(c)) => return Ok((c, text)),
                (None, None) => return Err(malformed("a reply without a code")),
                // A line "123 " with the same code ends it.
                (Some(c), Some(t)) if c == t && line.as_bytes().get(3) != Some(&b'-') => {
                    return Ok((c, text))
                }
                (Some(_), _) => text.push('\n'),
            }
        }
        Err(malformed("a reply of too many lines"))
    }

    /// Send `command` and read its reply, which must have one of the `expected` codes.
    async fn command(&mut self, command: &str, expected: &[u32]) -> Result<(u32, String), Failure> {
        self.stream
            .get_mut()
            .write_all(format!("{command}\r\n").as_bytes())
            .await?;
        self.stream.get_mut().flush().await?;
        let (code, text) = self.reply().await?;
        match expected.contains(&code) {
            true => Ok((code, text)),
            false => Err(Failure::Reply(code, text)),
        }
    }

    /// Where a passive data connection goes: the port from EPSV's answer (or PASV's, whose
    /// address is ignored), at the control connection's address.
    async fn passive(&mut self) -> Result<SocketAddr, Failure> {
        let port = match self.command("EPSV", &[229]).await {
            Ok((_, text)) => {
                let inner = text
                    .split_once("(|||")
                    .and_then(|(_, rest)| rest.split_once("|)"))
                    .ok_or_else(|| malformed("an EPSV reply without a port"))?;
                inner
                    .0
                    .parse::<u16>()
                    .map_err(|_| malformed("a bad EPSV port"))?
            }
            Err(Failure::Reply(..)) => {
                let (_, text) = self.command("PASV", &[227]).await?;
                let numbers: Vec<u16> = text
                    .split(|c: char| !c.is_ascii_digit())
                    .filter(|n| !n.is_empty())
                    .filter_map(|n| n.parse().ok())
                    .collect();
                match numbers.len() {
                    n if n >= 6 => numbers[n - 2] * 256 + numbers[n - 1],
                    _ => return Err(malformed("a PASV reply without an address")),
                }
            }
            Err(e) => return Err(e),
        };
        Ok(SocketAddr::new(self.peer.ip(), port))
    }
}

impl Location {
    /// Wrap `tcp` in TLS for ftps.
    async fn secure(&self, tcp: TcpStream) -> Result<Box<dyn Stream>, Failure> {
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some(connector) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|_| malformed("a host name TLS cannot check"))?;
                Ok(Box::new(connector.connect(name, tcp).await?))
            }
        }
    }

    /// A logged-in control connection in binary mode.
    async fn connect(&self) -> Result<Control, Failure> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        let _ = tcp.set_nodelay(true);
        let peer = tcp.peer_addr()?;
        let mut control = Control {
            stream: BufReader::new(self.secure(tcp).await?),
            peer,
        };
        match control.reply().await? {
            (220, _) => {}
            (code, text) => return Err(Failure::Reply(code, text)),
        }
        let (code, _) = control
            .command(&format!("USER {}", self.user), &[230, 331])
            .await?;
        if code == 331 {
            control
                .command(&format!("PASS {}", self.password), &[230, 202])
                .await?;
        }
        if self.tls.is_some() {
            control.command("PBSZ 0", &[200]).await?;
            control.command("PROT P", &[200]).await?;
        }
        control.command("TYPE I", &[200]).await?;
        Ok(control)
    }

    /// The file's length (SIZE).
    async fn length(&self, control: &mut Control) -> Result<u64, Failure> {
        let (_, text) = control
            .command(&format!("SIZE {}", self.path), &[213])
            .await?;
        text.trim()
            .parse()
            .map_err(|_| malformed("a SIZE reply without a number"))
    }

    /// `len` bytes at `start` on `control`: EPSV, REST, RETR, read. Whether the connection
    /// can be used again comes with the bytes: only when the transfer ran to the end.
    async fn retrieve(
        &self,
        control: &mut Control,
        start: u64,
        len: u64,
        file_len: u64,
    ) -> Result<(Bytes, bool), Failure> {
        let data_at = control.passive().await?;
        control.command(&format!("REST {start}"), &[350]).await?;
        let tcp = TcpStream::connect(data_at).await?;
        control
            .command(&format!("RETR {}", self.path), &[125, 150])
            .await?;
        let mut data_stream = self.secure(tcp).await?;
        // Grown as the bytes arrive, so a server that sends less takes less memory.
        let mut data = BytesMut::with_capacity((len as usize).min(1 << 20));
        let mut chunk = vec![0u8; 64 << 10];
        while (data.len() as u64) < len {
            let want = ((len - data.len() as u64) as usize).min(chunk.len());
            let n = data_stream.read(&mut chunk[..want]).await?;
            if n == 0 {
                return Err(malformed(&format!(
                    "the server sent {} of the {len} bytes asked for",
                    data.len()
                )));
            }
            data.extend_from_slice(&chunk[..n]);
        }
        let mut reusable = false;
        if start + len == file_len {
            // The whole rest was asked for: the transfer ends here, cleanly.
            let extra = data_stream.read(&mut chunk[..1]).await?;
            drop(data_stream);
            reusable = extra == 0 && matches!(control.reply().await?, (226 | 250, _));
        }
        Ok((data.freeze(), reusable))
    }
}

/// Ranges of one file, over a pool of control connections.
struct FtpSource {
    location: Location,
    len: u64,
    idle: RefCell<Vec<Control>>,
}

impl FtpSource {
    async fn fetch(&self, start: u64, len: u64) -> Result<Bytes, Failure> {
        let pooled = self.idle.borrow_mut().pop();
        let mut control = match pooled {
            Some(control) => control,
            None => self.location.connect().await?,
        };
        let (data, reusable) = self
            .location
            .retrieve(&mut control, start, len, self.len)
            .await?;
        let mut idle = self.idle.borrow_mut();
        if reusable && idle.len() < IDLE {
            idle.push(control);
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
        "ftps" => Some(tokio_rustls::TlsConnector::from(Arc::new(
            system_tls(opts.sslverify.unwrap_or(true))
                .await
                .map_err(QmpError::generic)?,
        ))),
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
        let mut control = location.connect().await?;
        let len = location.length(&mut control).await?;
        Ok::<_, Failure>((control, len))
    };
    let (control, len) = tokio::time::timeout(checked.timeout.unwrap_or(OPEN_TIMEOUT), opening)
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
        idle: RefCell::new(vec![control]),
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
