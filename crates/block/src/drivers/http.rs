//! `http`, `https`: a disk image on a web server, read with Range requests (QEMU's curl
//! driver, with reqwest over rustls in place of libcurl). Read-only, as in QEMU; the node
//! itself is a [`WebDriver`].
//!
//! Opening asks for the file's length with HEAD and refuses a server that does not take
//! byte ranges. A read asks for its range plus `readahead` bytes. `timeout` bounds each
//! whole request, as libcurl's CURLOPT_TIMEOUT. Like libcurl, the driver trusts the
//! system's certificate authorities (`/etc/ssl/certs`, or `SSL_CERT_FILE`), follows
//! redirects between http and https, and takes a proxy from `http_proxy`, `https_proxy`
//! or `all_proxy`.

use crate::drivers::web::{
    certificate_text, system_tls, CurlOptions, RangeSource, WebDriver, CONNECTIONS,
};
use crate::open::{DriverEntry, Opener};
use crate::Driver;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use qapi::error::QmpError;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE};
use reqwest::{Client, StatusCode};
use serde_json::{Map, Value};
use std::io;
use std::time::{Duration, Instant};

/// Redirects followed at most (libcurl's default limit).
const MAX_REDIRECTS: usize = 30;

/// Range requests to one URL.
struct HttpSource {
    client: Client,
    url: String,
}

#[async_trait(?Send)]
impl RangeSource for HttpSource {
    async fn get(&self, start: u64, len: u64) -> Result<Bytes, String> {
        let began = Instant::now();
        self.get_range(start, len).await.map_err(|e| match e {
            Failure::Request(e) => request_error_text(&e, began),
            Failure::Reply(text) => text,
        })
    }
}

impl HttpSource {
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
                certificate_text(matches!(
                    why,
                    Why::NotValidForName | Why::NotValidForNameContext { .. }
                ))
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
    opts: &CurlOptions,
    timeout: Option<Duration>,
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
    if let Some(timeout) = timeout {
        // As libcurl's CURLOPT_TIMEOUT: the whole transfer, so that a server trickling
        // bytes cannot hold a read (and the slot it takes) for long.
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
    let (driver, opts, checked) = CurlOptions::parse(o, options)?;
    let tls = system_tls(opts.sslverify.unwrap_or(true)).await;
    let client = client(o, driver, &opts, checked.timeout, tls)?;
    let len = file_length(&client, &opts.url)
        .await
        .map_err(|e| QmpError::generic(format!("CURL: Error opening file: {e}")))?;
    crate::drivers::check_disk_length(len)?;
    let source = HttpSource {
        client,
        url: opts.url.clone(),
    };
    Ok(Box::new(WebDriver::start(
        driver,
        opts.url,
        len,
        checked.readahead,
        Box::new(source),
    )))
}
