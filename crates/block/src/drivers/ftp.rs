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

use crate::drivers::web::{certificate_text, system_tls, CurlOptions, RangeSource, WebDriver};
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

/// How long the end of a transfer may take to settle before its connection is given up.
const SETTLE: Duration = Duration::from_secs(2);

/// How long a connection may wait in the pool (libcurl's 118 s; servers close idle
/// sessions after a minute or more).
const MAX_IDLE: Duration = Duration::from_secs(60);

/// What each step of an exchange may take when `timeout` is 0: connecting (TLS included)
/// and every reply, as libcurl bounds them even then; the data itself is not bounded.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// The longest reply line taken, and the most lines in one reply.
const MAX_LINE: u64 = 4096;
const MAX_LINES: usize = 256;

/// `io` within [`STEP_TIMEOUT`].
async fn step<T>(io: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, io)
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// A control or data connection, plain or over TLS.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Why an FTP exchange failed.
enum Failure {
    /// The connection itself (refused, reset, TLS, a bad reply's form).
    Io(io::Error),
    /// A reply with an unexpected code.
    Reply(u32, String),
    /// libcurl's words for a refusal: a login, a greeting, a missing file.
    Said(String),
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
    /// Implicit TLS with this configuration (ftps).
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Option<Duration>,
}

/// libcurl's words for an FTP failure, where it has them.
fn ftp_text(e: &Failure, began: Instant, location: &Location) -> String {
    match e {
        Failure::Said(text) => text.clone(),
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
    /// Its TLS, whose session store is its own: a data connection resumes the control
    /// connection's session, which servers may insist on (ProFTPD, vsftpd's default).
    tls: Option<tokio_rustls::TlsConnector>,
    /// The server's address, where passive data connections go.
    peer: SocketAddr,
}

impl Control {
    /// The next reply: its code and text, lines bounded, within [`STEP_TIMEOUT`].
    async fn reply(&mut self) -> Result<(u32, String), Failure> {
        tokio::time::timeout(STEP_TIMEOUT, self.read_reply())
            .await
            .map_err(|_| Failure::Io(io::ErrorKind::TimedOut.into()))?
    }

    async fn read_reply(&mut self) -> Result<(u32, String), Failure> {
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
            let this: Option<u32> = line
                .get(..3)
                .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|c| c.parse().ok())
                .filter(|c| (100..600).contains(c));
            if !text.is_empty() {
                text.push('\n');
            }
            match this {
                Some(_) => text.push_str(line.get(4..).unwrap_or("")),
                None => text.push_str(&line),
            }
            match (code, this) {
                // The first line sets the code; "123-" opens a reply of many lines.
                (None, Some(c)) if line.as_bytes().get(3) == Some(&b'-') => code = Some(c),
                (None, Some(c)) => return Ok((c, text)),
                (None, None) => return Err(malformed("a reply without a code")),
                // A line "123 " with the same code ends it.
                (Some(c), Some(t)) if c == t && line.as_bytes().get(3) != Some(&b'-') => {
                    return Ok((c, text))
                }
                (Some(_), _) => {}
            }
        }
        Err(malformed("a reply of too many lines"))
    }

    /// Send `command` and read its reply, which must have one of the `expected` codes.
    async fn command(&mut self, command: &str, expected: &[u32]) -> Result<(u32, String), Failure> {
        if command.contains(['\r', '\n']) {
            return Err(malformed("a command with a line break"));
        }
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
            Ok((_, text)) => epsv_port(&text)?,
            Err(Failure::Reply(..)) => {
                let (_, text) = self.command("PASV", &[227]).await?;
                pasv_port(&text)?
            }
            Err(e) => return Err(e),
        };
        let mut at = self.peer;
        at.set_port(port);
        Ok(at)
    }
}

/// The port of an EPSV answer: `(<d><d><d>port<d>)` with any delimiter `d`.
fn epsv_port(text: &str) -> Result<u16, Failure> {
    let inner = text
        .split_once('(')
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(inner, _)| inner.as_bytes())
        .ok_or_else(|| malformed("an EPSV reply without a port"))?;
    let port = match inner {
        [d, d2, d3, port @ .., d4] if d == d2 && d == d3 && d == d4 => port,
        _ => return Err(malformed("an EPSV reply without a port")),
    };
    std::str::from_utf8(port)
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| malformed("a bad EPSV port"))
}

/// The port of a PASV answer: the last two of six comma-separated numbers of at most 255,
/// as libcurl reads them.
fn pasv_port(text: &str) -> Result<u16, Failure> {
    let bad = || malformed("a PASV reply without an address");
    let start = text.find(|c: char| c.is_ascii_digit()).ok_or_else(bad)?;
    let numbers: Vec<u8> = text[start..]
        .split(',')
        .take(6)
        .map(|n| {
            let digits: String = n.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse::<u8>().ok()
        })
        .collect::<Option<Vec<u8>>>()
        .filter(|n| n.len() == 6)
        .ok_or_else(bad)?;
    let port = u16::from(numbers[4]) << 8 | u16::from(numbers[5]);
    match port {
        0 => Err(bad()),
        port => Ok(port),
    }
}

impl Location {
    /// Wrap `tcp` in `tls`, for ftps.
    async fn secure(
        &self,
        tcp: TcpStream,
        tls: Option<&tokio_rustls::TlsConnector>,
    ) -> Result<Box<dyn Stream>, Failure> {
        match tls {
            None => Ok(Box::new(tcp)),
            Some(connector) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|_| malformed("a host name TLS cannot check"))?;
                Ok(Box::new(step(connector.connect(name, tcp)).await?))
            }
        }
    }

    /// A logged-in control connection in binary mode.
    async fn connect(&self) -> Result<Control, Failure> {
        let tcp = step(TcpStream::connect((self.host.as_str(), self.port))).await?;
        let _ = tcp.set_nodelay(true);
        let peer = tcp.peer_addr()?;
        let tls = self.tls.as_ref().map(|base| {
            let mut config = (**base).clone();
            config.resumption = rustls::client::Resumption::in_memory_sessions(4);
            tokio_rustls::TlsConnector::from(Arc::new(config))
        });
        let stream = BufReader::new(self.secure(tcp, tls.as_ref()).await?);
        let mut control = Control { stream, tls, peer };
        match control.reply().await? {
            (220, _) => {}
            (code, _) => {
                return Err(Failure::Said(format!(
                    "Got a {code:03} ftp-server response when 220 was expected"
                )))
            }
        }
        let denied = |e| match e {
            Failure::Reply(code, _) => Failure::Said(format!("Access denied: {code:03}")),
            other => other,
        };
        let (code, _) = control
            .command(&format!("USER {}", self.user), &[230, 331, 232, 202])
            .await
            .map_err(denied)?;
        if code == 331 {
            control
                .command(&format!("PASS {}", self.password), &[230, 202, 232])
                .await
                .map_err(denied)?;
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
            .await
            .map_err(|e| match e {
                Failure::Reply(550, _) => Failure::Said("The file does not exist".into()),
                other => other,
            })?;
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
        let tcp = step(TcpStream::connect(data_at)).await?;
        control
            .command(&format!("RETR {}", self.path), &[125, 150])
            .await?;
        let mut data_stream = self.secure(tcp, control.tls.as_ref()).await?;
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
        // The bytes are in hand. When the transfer ran to the file's end, its clean close
        // lets the connection serve again; anything else (no 226, a TLS close without
        // close_notify, a slow server) only costs the connection.
        let reusable = start + len == file_len
            && tokio::time::timeout(SETTLE, async {
                let extra = data_stream.read(&mut chunk[..1]).await.ok()?;
                drop(data_stream);
                let (code, _) = control.reply().await.ok()?;
                Some(extra == 0 && (code == 226 || code == 250))
            })
            .await
            .ok()
            .flatten()
            .unwrap_or(false);
        Ok((data.freeze(), reusable))
    }
}

/// Ranges of one file, over a pool of control connections.
struct FtpSource {
    location: Location,
    len: u64,
    /// Logged-in connections and since when they wait.
    idle: RefCell<Vec<(Control, Instant)>>,
}

impl FtpSource {
    /// A connection that waited less than [`MAX_IDLE`], if there is one.
    fn pooled(&self) -> Option<Control> {
        let mut idle = self.idle.borrow_mut();
        idle.retain(|(_, since)| since.elapsed() < MAX_IDLE);
        idle.pop().map(|(control, _)| control)
    }

    async fn fetch(&self, start: u64, len: u64) -> Result<Bytes, Failure> {
        let (data, control, reusable) = match self.pooled() {
            Some(mut control) => {
                match self
                    .location
                    .retrieve(&mut control, start, len, self.len)
                    .await
                {
                    Ok((data, reusable)) => (data, control, reusable),
                    // The server may have closed a waiting connection (a 421, a reset):
                    // once more on a new one, as libcurl retries.
                    Err(_) => self.fresh(start, len).await?,
                }
            }
            None => self.fresh(start, len).await?,
        };
        let mut idle = self.idle.borrow_mut();
        if reusable && idle.len() < IDLE {
            idle.push((control, Instant::now()));
        }
        Ok(data)
    }

    async fn fresh(&self, start: u64, len: u64) -> Result<(Bytes, Control, bool), Failure> {
        let mut control = self.location.connect().await?;
        let (data, reusable) = self
            .location
            .retrieve(&mut control, start, len, self.len)
            .await?;
        Ok((data, control, reusable))
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
    let (driver, opts, checked) = CurlOptions::parse(o, options)?;
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
    // One leading slash separates the path; what follows is relative to the login
    // directory, as libcurl takes it (`//srv/img` is absolute).
    let path = percent_decode(url.path().strip_prefix('/').unwrap_or(url.path()))?;
    let secret = match &opts.password_secret {
        Some(id) => Some(o.secret_text(id)?),
        None => None,
    };
    // libcurl's choices: the option's user, else the URL's, else anonymous; the URL's
    // password where it has one, else the secret.
    let url_password = url.password().map(percent_decode).transpose()?;
    let (user, password) = match (&opts.username, url.username()) {
        (Some(user), _) => (user.clone(), secret.unwrap_or_default()),
        (None, "") => ("anonymous".to_string(), "ftp@example.com".to_string()),
        (None, user) => (
            percent_decode(user)?,
            url_password.or(secret).unwrap_or_default(),
        ),
    };
    // A control character would end the command it is sent in and start another (libcurl
    // refuses them too).
    for (what, text) in [
        ("path", &path),
        ("user name", &user),
        ("password", &password),
    ] {
        if text.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return Err(QmpError::generic(format!(
                "CURL: Error opening file: the {what} contains control characters"
            )));
        }
    }
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
    crate::drivers::check_disk_length(len)?;
    let source = FtpSource {
        location,
        len,
        idle: RefCell::new(vec![(control, Instant::now())]),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn port(r: Result<u16, Failure>) -> Option<u16> {
        r.ok()
    }

    #[test]
    fn passive_answers_are_read_as_libcurl_reads_them() {
        assert_eq!(
            port(pasv_port("Entering Passive Mode (127,0,0,1,4,1).")),
            Some(1025)
        );
        assert_eq!(port(pasv_port("=127,0,0,1,255,255")), Some(65535));
        assert_eq!(port(pasv_port("(127,0,0,1,256,0)")), None);
        assert_eq!(port(pasv_port("(127,0,0,1,0,0)")), None);
        assert_eq!(port(pasv_port("(127,0,0,1)")), None);
        assert_eq!(
            port(epsv_port("Entering Extended Passive Mode (|||6446|)")),
            Some(6446)
        );
        assert_eq!(port(epsv_port("(!!!21!)")), Some(21));
        assert_eq!(port(epsv_port("(|||0|)")), None);
        assert_eq!(port(epsv_port("(|||70000|)")), None);
        assert_eq!(port(epsv_port("(||6446|)")), None);
    }
}
