//! `http`, `https`: a disk image on a web server, read with Range requests (QEMU's curl
//! driver, with reqwest over rustls in place of libcurl). Read-only, as in QEMU.
//!
//! Opening asks for the file's length with HEAD and refuses a server that does not take
//! byte ranges. A read asks for its range plus `readahead` bytes ([`Readahead`]); at most
//! [`CONNECTIONS`] requests run at once, as QEMU's driver runs as many transfers.
//!
//! The client and the cache live on the I/O thread that opened the node (the cache's
//! fetches are local futures): a task there takes reads from any thread over a channel.
//!
//! `timeout` bounds connecting and every wait for the server's next bytes, where libcurl
//! bounds the whole transfer: a large read over a slow link is not cut off while data
//! flows, and a server that stops answering fails the read with EIO within `timeout`.
//! Like libcurl, the driver trusts the system's certificate authorities
//! (`/etc/ssl/certs`, or `SSL_CERT_FILE`), follows redirects that keep the protocol, and
//! takes a proxy from `http_proxy`, `https_proxy` or `all_proxy`.

use crate::drivers::readahead::Readahead;
use crate::node::{DriverInfo, Extent, ExtentKind, Node, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use qapi::error::QmpError;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE};
use reqwest::{Client, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::cell::Cell;
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Requests in flight at once per node (QEMU's CURL_NUM_STATES).
pub const CONNECTIONS: usize = 8;

/// QEMU's default readahead.
const DEFAULT_READAHEAD: i64 = 256 << 10;

/// QEMU's default timeout, and the largest it takes, in seconds.
const DEFAULT_TIMEOUT: i64 = 5;
const MAX_TIMEOUT: i64 = 10000;

/// Failed reads logged per node, as QEMU's curl driver stops after 100.
const LOGGED_FAILURES: u32 = 100;

/// Redirects followed at most (libcurl's default limit).
const MAX_REDIRECTS: usize = 30;

/// The options that change what the node reads, which its `json:` filename names.
const STRONG: &[&str] = &[
    "url",
    "sslverify",
    "cookie",
    "cookie-secret",
    "username",
    "password-secret",
    "proxy-username",
    "proxy-password-secret",
];

/// BlockdevOptionsCurlHttp and BlockdevOptionsCurlHttps (`sslverify` only for https).
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct HttpOptions {
    url: String,
    readahead: Option<i64>,
    timeout: Option<i64>,
    username: Option<String>,
    password_secret: Option<String>,
    proxy_username: Option<String>,
    proxy_password_secret: Option<String>,
    cookie: Option<String>,
    cookie_secret: Option<String>,
    sslverify: Option<bool>,
}

/// A read for the node's task: `len` bytes at `offset`, within the file.
struct ReadRequest {
    offset: u64,
    len: u64,
    reply: oneshot::Sender<io::Result<Bytes>>,
}

pub struct HttpDriver {
    driver: &'static str,
    url: String,
    /// The file's length in bytes.
    len: u64,
    /// Dropping the driver closes the channel, which ends the task.
    requests: mpsc::UnboundedSender<ReadRequest>,
}

/// What the node's task reads with.
struct Remote {
    client: Client,
    url: String,
    slots: Semaphore,
    cache: Readahead,
    /// Failed fetches so far: the log gets the first [`LOGGED_FAILURES`].
    failures: Cell<u32>,
}

impl Remote {
    async fn serve(self: Rc<Self>, request: ReadRequest) {
        let remote = self.clone();
        let result = self
            .cache
            .read(request.offset, request.len, move |start, len| {
                async move { remote.fetch(start, len).await }.boxed_local()
            })
            .await;
        let _ = request.reply.send(result);
    }

    /// The `len` bytes at `start`, or EIO with the reason logged.
    async fn fetch(&self, start: u64, len: u64) -> Result<Bytes, i32> {
        let _slot = self.slots.acquire().await.map_err(|_| libc::EIO)?;
        let began = Instant::now();
        self.get_range(start, len).await.map_err(|e| {
            let e = match e {
                Failure::Request(e) => request_error_text(&e, began),
                Failure::Reply(text) => text,
            };
            let failures = self.failures.get().saturating_add(1);
            self.failures.set(failures);
            match failures.cmp(&LOGGED_FAILURES) {
                std::cmp::Ordering::Less => {
                    tracing::warn!(url = %self.url, "reading {len} bytes at {start}: {e}")
                }
                std::cmp::Ordering::Equal => tracing::warn!(
                    url = %self.url,
                    "reading {len} bytes at {start}: {e} (further errors suppressed)"
                ),
                std::cmp::Ordering::Greater => {}
            }
            libc::EIO
        })
    }

    async fn get_range(&self, start: u64, len: u64) -> Result<Bytes, Failure> {
        let last = start + len - 1;
        let mut response = self
            .client
            .get(&self.url)
            .header(reqwest::header::RANGE, format!("bytes={start}-{last}"))
            .send()
            .await?;
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                let range = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if !range.starts_with(&format!("bytes {start}-{last}/")) {
                    return Err(Failure::Reply(format!(
                        "the server sent range '{range}' for bytes {start}-{last}"
                    )));
                }
            }
            // A server may answer a range that is the whole file with all of it.
            StatusCode::OK if start == 0 && response.content_length() == Some(len) => {}
            status => {
                return Err(Failure::Reply(format!(
                    "The requested URL returned error: {}",
                    status.as_u16()
                )))
            }
        }
        // Grown as the bytes arrive, so a server that sends less takes less memory.
        let mut data = BytesMut::with_capacity((len as usize).min(1 << 20));
        while let Some(chunk) = response.chunk().await? {
            if data.len() + chunk.len() > len as usize {
                return Err(Failure::Reply(format!(
                    "the server sent more than the {len} bytes asked for"
                )));
            }
            data.extend_from_slice(&chunk);
        }
        if data.len() as u64 != len {
            return Err(Failure::Reply(format!(
                "the server sent {} of the {len} bytes asked for",
                data.len()
            )));
        }
        Ok(data.freeze())
    }
}

/// Why a request failed: the transfer itself, or an answer that is not what was asked.
enum Failure {
    Request(reqwest::Error),
    Reply(String),
}

impl From<reqwest::Error> for Failure {
    fn from(e: reqwest::Error) -> Failure {
        Failure::Request(e)
    }
}

/// A failed transfer in libcurl's words where it has them (QEMU's errors quote libcurl):
/// a refused connection, a timeout, a certificate the system does not trust.
fn request_error_text(e: &reqwest::Error, began: Instant) -> String {
    let ms = began.elapsed().as_millis();
    if let Some(tls) = tls_error(e) {
        return match tls {
            rustls::Error::InvalidCertificate(why) => {
                use rustls::CertificateError as Why;
                match why {
                    Why::UnknownIssuer => {
                        "SSL certificate problem: unable to get local issuer certificate".into()
                    }
                    Why::Expired | Why::ExpiredContext { .. } => {
                        "SSL certificate problem: certificate has expired".into()
                    }
                    Why::NotValidForName | Why::NotValidForNameContext { .. } => {
                        "SSL: no alternative certificate subject name matches target host name"
                            .into()
                    }
                    other => format!("SSL certificate problem: {other:?}"),
                }
            }
            other => format!("SSL connect error: {other}"),
        };
    }
    if e.is_timeout() {
        return format!("Operation timed out after {ms} milliseconds");
    }
    if let Some(host) = unresolved(e) {
        return format!("Could not resolve host: {host}");
    }
    if e.is_connect() {
        let url = e.url();
        let host = url.and_then(|u| u.host_str()).unwrap_or("");
        let port = url.and_then(|u| u.port_or_known_default()).unwrap_or(0);
        return format!(
            "Failed to connect to {host} port {port} after {ms} ms: Couldn't connect to server"
        );
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// The host a failed connection could not resolve, if that is why it failed.
fn unresolved(e: &reqwest::Error) -> Option<&str> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.to_string().starts_with("dns error") {
            return e.url().and_then(|u| u.host_str());
        }
        source = s.source();
    }
    None
}

/// The TLS error under a failed connection. An `io::Error` hides the error it wraps from
/// `source()` (and connectors wrap io errors in io errors), so the walk looks inside each.
fn tls_error(e: &reqwest::Error) -> Option<&rustls::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(tls) = s.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        source = match s.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner),
            None => s.source(),
        };
    }
    None
}

/// The proxy libcurl would take for `scheme` from the environment (the proxy credentials
/// go with it).
fn proxy_from_env(scheme: &str) -> Option<String> {
    // libcurl reads http_proxy in lower case only: HTTP_PROXY may be set by a CGI client.
    let names = match scheme {
        "http" => vec!["http_proxy".to_string()],
        _ => vec![
            format!("{scheme}_proxy"),
            format!("{}_PROXY", scheme.to_uppercase()),
        ],
    };
    names
        .into_iter()
        .chain(["all_proxy".into(), "ALL_PROXY".into()])
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
}

/// The client for `opts`, with the secrets looked up. `tls` is the verifying (or, with
/// `sslverify=off`, trusting) configuration, or why the system's authorities could not be
/// read.
fn client(
    o: &Opener<'_>,
    scheme: &'static str,
    opts: &HttpOptions,
    timeout: i64,
    tls: Result<rustls::ClientConfig, String>,
) -> Result<Client, QmpError> {
    let mut headers = HeaderMap::new();
    let cookie = match &opts.cookie_secret {
        Some(id) => Some(o.secret_text(id)?),
        None => opts.cookie.clone(),
    };
    if let Some(cookie) = cookie {
        let mut value = HeaderValue::from_str(&cookie)
            .map_err(|_| QmpError::generic("The cookie is not a valid HTTP header value"))?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::COOKIE, value);
    }
    // Secrets are looked up whether or not a user goes with them, as QEMU does.
    let password = match &opts.password_secret {
        Some(id) => o.secret_text(id)?,
        None => String::new(),
    };
    let proxy_password = match &opts.proxy_password_secret {
        Some(id) => o.secret_text(id)?,
        None => String::new(),
    };
    if let Some(user) = &opts.username {
        let token = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{user}:{password}"),
        );
        let mut value = HeaderValue::from_str(&format!("Basic {token}"))
            .map_err(|_| QmpError::generic("The username is not a valid HTTP header value"))?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    // libcurl follows redirects between http and https (QEMU allows both, and the ftp
    // protocols, which blockd does not have); an http node that could not read the
    // system's authorities stays on http, and an https node without them does not open.
    let (tls, https_ok) = match tls {
        Ok(tls) => (tls, true),
        Err(e) if scheme == "https" => return Err(QmpError::generic(e)),
        // reqwest sets TLS up whatever the scheme; this node never reaches it.
        Err(_) => (
            nbd::tls::system_client_config(false).map_err(QmpError::generic)?,
            false,
        ),
    };
    let redirects = reqwest::redirect::Policy::custom(move |attempt| {
        let scheme = attempt.url().scheme();
        if attempt.previous().len() >= MAX_REDIRECTS {
            attempt.error("too many redirects")
        } else if scheme == "http" || (scheme == "https" && https_ok) {
            attempt.follow()
        } else {
            let to = attempt.url().to_string();
            attempt.error(format!("a redirect to {to}, which blockd does not follow"))
        }
    });
    let mut builder = Client::builder()
        .default_headers(headers)
        .use_preconfigured_tls(tls)
        .redirect(redirects)
        .pool_max_idle_per_host(CONNECTIONS)
        // The proxy is libcurl's, from the environment, set below.
        .no_proxy();
    if timeout > 0 {
        // As libcurl's CURLOPT_TIMEOUT: the whole transfer, so that a server trickling
        // bytes cannot hold a read (and the slot it takes) for long.
        let timeout = Duration::from_secs(timeout as u64);
        builder = builder
            .connect_timeout(timeout)
            .read_timeout(timeout)
            .timeout(timeout);
    }
    if let Some(proxy) = proxy_from_env(scheme) {
        let mut proxy = reqwest::Proxy::all(&proxy)
            .map_err(|e| QmpError::generic(format!("Invalid proxy '{proxy}': {e}")))?
            .no_proxy(reqwest::NoProxy::from_env());
        if let Some(user) = &opts.proxy_username {
            proxy = proxy.basic_auth(user, &proxy_password);
        }
        builder = builder.proxy(proxy);
    }
    builder
        .build()
        .map_err(|e| QmpError::generic(format!("CURL: {e}")))
}

/// The file's length from a HEAD request, checking that the server takes byte ranges.
async fn file_length(client: &Client, url: &str) -> Result<u64, String> {
    let began = Instant::now();
    let response = client
        .head(url)
        .send()
        .await
        .map_err(|e| request_error_text(&e, began))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!(
            "The requested URL returned error: {}",
            status.as_u16()
        ));
    }
    let headers = response.headers();
    let len = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|len| *len <= i64::MAX as u64)
        .ok_or("Server didn't report file size.")?;
    let ranges = headers
        .get_all(ACCEPT_RANGES)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|unit| unit.trim() == "bytes"));
    if !ranges {
        return Err("Server does not support 'range' (byte ranges).".into());
    }
    Ok(len)
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: false,
    // Reading is all it does: another process may own the image meanwhile.
    hands_over: true,
    names: &["http", "https"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let driver: &'static str = match o.driver_name() {
        "https" => "https",
        _ => "http",
    };
    if driver == "http" && options.contains_key("sslverify") {
        return Err(QmpError::generic("Parameter 'sslverify' is unexpected"));
    }
    let opts: HttpOptions = o.parse(options)?;
    o.only_read("curl driver does not support writes")?;
    // QEMU's order of checks, so that the first complaint is the same.
    let readahead = opts.readahead.unwrap_or(DEFAULT_READAHEAD);
    if readahead < 0 {
        return Err(QmpError::generic(format!(
            "Value '{readahead}' is out of range for parameter 'readahead'"
        )));
    }
    if readahead % 512 != 0 {
        return Err(QmpError::generic(format!(
            "HTTP_READAHEAD_SIZE {readahead} is not a multiple of 512"
        )));
    }
    let timeout = opts.timeout.unwrap_or(DEFAULT_TIMEOUT);
    if !(0..=MAX_TIMEOUT).contains(&timeout) {
        return Err(QmpError::generic(
            "timeout parameter is too large or negative",
        ));
    }
    if opts.cookie.is_some() && opts.cookie_secret.is_some() {
        return Err(QmpError::generic(
            "curl driver cannot handle both cookie and cookie secret",
        ));
    }
    let prefix = format!("{driver}://");
    if !opts.url.starts_with(&prefix) {
        return Err(QmpError::generic(format!(
            "{driver} curl driver cannot handle the URL '{}' (does not start with '{prefix}')",
            opts.url
        )));
    }
    // Reading the system's authorities is file I/O: not on the I/O thread.
    let verify = opts.sslverify.unwrap_or(true);
    let tls = tokio::task::spawn_blocking(move || nbd::tls::system_client_config(verify))
        .await
        .map_err(|e| QmpError::generic(e.to_string()))?;
    let client = client(o, driver, &opts, timeout, tls)?;
    let len = file_length(&client, &opts.url)
        .await
        .map_err(|e| QmpError::generic(format!("CURL: Error opening file: {e}")))?;
    // QEMU's largest disk (BDRV_MAX_LENGTH): i64's largest, in whole GiB.
    if len.div_ceil(512).saturating_mul(512) > (i64::MAX as u64) & !((1 << 30) - 1) {
        return Err(QmpError::generic(
            "Could not refresh total sector count: File too large",
        ));
    }
    let remote = Rc::new(Remote {
        client,
        url: opts.url.clone(),
        slots: Semaphore::new(CONNECTIONS),
        cache: Readahead::new(len, readahead as u64),
        failures: Cell::new(0),
    });
    let (requests, mut incoming) = mpsc::unbounded_channel::<ReadRequest>();
    tokio::task::spawn_local(async move {
        while let Some(request) = incoming.recv().await {
            tokio::task::spawn_local(remote.clone().serve(request));
        }
    });
    Ok(Box::new(HttpDriver {
        driver,
        url: opts.url,
        len,
        requests,
    }))
}

/// What a write to the read-only driver fails with.
fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EACCES)
}

#[async_trait(?Send)]
impl Driver for HttpDriver {
    fn format_name(&self) -> &'static str {
        self.driver
    }

    /// The file's length rounded up to whole sectors, as QEMU reports it; the tail past the
    /// file reads as zeroes.
    fn size(&self, _: &Node) -> u64 {
        // Bounded at open: the rounded size fits QAPI's int.
        self.len.div_ceil(512).saturating_mul(512)
    }

    async fn read(&self, _: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = (offset + buf.len() as u64).min(self.len);
        let within = end.saturating_sub(offset) as usize;
        buf[within..].fill(0);
        if within == 0 {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        let gone = || io::Error::from_raw_os_error(libc::ESHUTDOWN);
        self.requests
            .send(ReadRequest {
                offset,
                len: within as u64,
                reply,
            })
            .map_err(|_| gone())?;
        let data = answer.await.map_err(|_| gone())??;
        buf[..within].copy_from_slice(&data);
        Ok(())
    }

    async fn write(&self, _: &Node, _: u64, _: &[u8], _: WriteFlags) -> io::Result<()> {
        Err(read_only())
    }

    async fn write_zeroes(&self, _: &Node, _: u64, _: u64, _: WriteFlags) -> io::Result<()> {
        Err(read_only())
    }

    async fn discard(&self, _: &Node, _: u64, _: u64) -> io::Result<()> {
        Err(read_only())
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        Ok(())
    }

    async fn block_status(&self, _: &Node, _offset: u64, len: u64) -> io::Result<Extent> {
        Ok(Extent {
            len,
            kind: ExtentKind::Data,
        })
    }

    async fn truncate(&self, _: &Node, _size: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    fn child_perms(&self, _: &str, _: Perms, _: Perms, _: bool) -> (Perms, Perms) {
        (Perms::NONE, Perms::ALL)
    }

    /// The URL, or a `json:` name when an option changes what is read: QEMU names
    /// `sslverify` only when it is off.
    fn info(&self, node: &Node) -> DriverInfo {
        let strong = match node.open_options() {
            Value::Object(options) => options.iter().any(|(k, v)| match k.as_str() {
                "url" => false,
                "sslverify" => match v {
                    Value::Bool(on) => !on,
                    Value::String(on) => !matches!(on.as_str(), "on" | "yes" | "true"),
                    _ => true,
                },
                k => STRONG.contains(&k),
            }),
            _ => false,
        };
        DriverInfo {
            filename: match strong {
                true => crate::graph::strong_json_filename(node, STRONG),
                false => self.url.clone(),
            },
            ..DriverInfo::default()
        }
    }
}
