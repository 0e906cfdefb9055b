//! What QEMU's curl drivers (http, https, ftp, ftps) share in blockd: their options and
//! QEMU's checks of them, and a read-only node over a remote file read in byte ranges
//! ([`WebDriver`]) that a protocol module gives a [`RangeSource`].
//!
//! The source and the readahead cache live on the I/O thread that opened the node (the
//! cache's fetches are local futures): a task there takes reads from any thread over a
//! channel. At most [`CONNECTIONS`] fetches run at once, as QEMU's driver runs as many
//! transfers; failed fetches are logged, the first [`LOGGED_FAILURES`] of them.

use crate::drivers::readahead::Readahead;
use crate::node::{DriverInfo, Extent, ExtentKind, Node, WriteFlags};
use crate::open::Opener;
use crate::perm::Perms;
use crate::Driver;
use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt;
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::Value;
use std::cell::Cell;
use std::io;
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Fetches in flight at once per node (QEMU's CURL_NUM_STATES).
pub(crate) const CONNECTIONS: usize = 8;

/// QEMU's default readahead.
const DEFAULT_READAHEAD: i64 = 256 << 10;

/// QEMU's default timeout, and the largest it takes, in seconds.
const DEFAULT_TIMEOUT: i64 = 5;
const MAX_TIMEOUT: i64 = 10000;

/// Failed reads logged per node, as QEMU's curl driver stops after 100.
const LOGGED_FAILURES: u32 = 100;

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

/// BlockdevOptionsCurlBase and the members the protocols add: `cookie` and
/// `cookie-secret` (http, https), `sslverify` (https, ftps). [`CurlOptions::parse`] refuses
/// the members a driver does not have.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct CurlOptions {
    pub url: String,
    readahead: Option<i64>,
    timeout: Option<i64>,
    pub username: Option<String>,
    pub password_secret: Option<String>,
    pub proxy_username: Option<String>,
    pub proxy_password_secret: Option<String>,
    pub cookie: Option<String>,
    pub cookie_secret: Option<String>,
    pub sslverify: Option<bool>,
}

/// The checked options: readahead in bytes, the timeout (`None`: wait for ever).
pub(crate) struct Checked {
    pub readahead: u64,
    pub timeout: Option<Duration>,
}

impl CurlOptions {
    /// The options of the node's driver (its name comes with them), checked in QEMU's
    /// order so that the first complaint is the same: writable nodes, readahead, timeout,
    /// the cookie pair, the URL's scheme.
    pub fn parse(
        o: &mut Opener<'_>,
        options: serde_json::Map<String, Value>,
    ) -> Result<(&'static str, CurlOptions, Checked), QmpError> {
        let (driver, own): (&'static str, &[&str]) = match o.driver_name() {
            "http" => ("http", &["cookie", "cookie-secret"]),
            "https" => ("https", &["cookie", "cookie-secret", "sslverify"]),
            "ftps" => ("ftps", &["sslverify"]),
            _ => ("ftp", &[]),
        };
        if let Some(other) = ["cookie", "cookie-secret", "sslverify"]
            .iter()
            .find(|k| options.contains_key(**k) && !own.contains(k))
        {
            return Err(QmpError::generic(format!(
                "Parameter '{other}' is unexpected"
            )));
        }
        let opts: CurlOptions = o.parse(options)?;
        o.only_read("curl driver does not support writes")?;
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
        let checked = Checked {
            readahead: readahead as u64,
            timeout: (timeout > 0).then(|| Duration::from_secs(timeout as u64)),
        };
        Ok((driver, opts, checked))
    }
}

/// The TLS configuration for `sslverify`, read off the I/O thread (the system's
/// authorities are files); Err says why there is none.
pub(crate) async fn system_tls(verify: bool) -> Result<rustls::ClientConfig, String> {
    tokio::task::spawn_blocking(move || nbd::tls::system_client_config(verify))
        .await
        .map_err(|e| e.to_string())?
}

/// libcurl's words for a server certificate that was refused, as Debian's QEMU (libcurl
/// over GnuTLS) gives them: one that does not name the host (`name_mismatch`), or any
/// other refusal (an unknown issuer, an expired certificate).
pub(crate) fn certificate_text(name_mismatch: bool) -> String {
    match name_mismatch {
        true => "SSL: no alternative certificate subject name matches target host name".into(),
        false => "server certificate verification failed. CAfile: none CRLfile: none".into(),
    }
}

/// Where a web node's bytes come from.
#[async_trait(?Send)]
pub(crate) trait RangeSource: 'static {
    /// Exactly the `len` (at least 1) bytes at `start`, which lie within the file, or the
    /// reason they could not be had.
    async fn get(&self, start: u64, len: u64) -> Result<Bytes, String>;
}

/// A read for the node's task: `len` bytes at `offset`, within the file.
struct ReadRequest {
    offset: u64,
    len: u64,
    reply: oneshot::Sender<io::Result<Bytes>>,
}

/// What the node's task reads with.
struct Remote {
    source: Box<dyn RangeSource>,
    url: String,
    slots: Semaphore,
    cache: Readahead,
    /// Failed fetches so far.
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
        self.source.get(start, len).await.map_err(|e| {
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
}

/// A read-only node over a remote file of `len` bytes.
pub(crate) struct WebDriver {
    driver: &'static str,
    url: String,
    len: u64,
    /// Dropping the driver closes the channel, which ends the task.
    requests: mpsc::UnboundedSender<ReadRequest>,
}

impl WebDriver {
    /// The node of `driver` over `source`; its task starts on this (the opening) thread.
    pub fn start(
        driver: &'static str,
        url: String,
        len: u64,
        readahead: u64,
        source: Box<dyn RangeSource>,
    ) -> WebDriver {
        let remote = Rc::new(Remote {
            source,
            url: url.clone(),
            slots: Semaphore::new(CONNECTIONS),
            cache: Readahead::new(len, readahead),
            failures: Cell::new(0),
        });
        let (requests, mut incoming) = mpsc::unbounded_channel::<ReadRequest>();
        tokio::task::spawn_local(async move {
            while let Some(request) = incoming.recv().await {
                tokio::task::spawn_local(remote.clone().serve(request));
            }
        });
        WebDriver {
            driver,
            url,
            len,
            requests,
        }
    }
}

/// What a write to the read-only driver fails with.
fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EACCES)
}

#[async_trait(?Send)]
impl Driver for WebDriver {
    fn format_name(&self) -> &'static str {
        self.driver
    }

    /// The file's length rounded up to whole sectors, as QEMU reports it; the tail past the
    /// file reads as zeroes.
    fn size(&self, _: &Node) -> u64 {
        // Bounded at open (check_disk_length): the rounded size fits QAPI's int.
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
