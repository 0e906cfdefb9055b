//! NBD client: fixed newstyle handshake with structured replies and metadata contexts,
//! then pipelined requests matched to replies by cookie.
//!
//! A [`Client`] lives on the thread that created it, inside a `LocalSet`: one local task
//! writes requests and one reads replies, so any number of requests may be awaited at
//! once from that thread. Dropping a request future is safe (its reply is discarded).

use crate::inet::InetOptions;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use futures::future::try_join_all;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::backend::{BlockSize, StatusExtent, ZeroFlags};
use crate::proto::*;

/// Where to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectAddr {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address (QEMU's InetSocketAddress).
    Tcp {
        /// Host name or address literal, looked up at connect time.
        host: String,
        /// TCP port (10809 is NBD's).
        port: u16,
        /// How to connect: address family, keep-alive, MPTCP.
        inet: InetOptions,
    },
}

/// Negotiation choices.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Metadata contexts to select (exact names); those the server lacks are skipped.
    pub meta_contexts: Vec<String>,
    /// Upgrade to TLS with `NBD_OPT_STARTTLS` before anything else.
    pub tls: Option<ClientTls>,
}

/// TLS for a client connection (the nbd driver's `tls-creds` and `tls-hostname`).
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// Client-side credentials.
    pub creds: Arc<crate::tls::TlsCreds>,
    /// The name the server's certificate must carry.
    pub hostname: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            meta_contexts: vec![CONTEXT_BASE_ALLOCATION.to_string()],
            tls: None,
        }
    }
}

/// Option replies larger than this are treated as a protocol violation.
const MAX_OPTION_REPLY: u32 = 1024 * 1024;
/// Block status payloads larger than this are treated as a protocol violation.
const MAX_STATUS_PAYLOAD: u32 = 16 * 1024 * 1024;
/// Largest range asked for in one zeroing/trim/status request (aligned, below 4 GiB).
const MAX_RANGE: u64 = 1 << 30;

struct Negotiated {
    size: u64,
    flags: u16,
    structured: bool,
    block_size: Option<BlockSize>,
    contexts: Vec<(u32, String)>,
}

enum Expect {
    Plain,
    Read { offset: u64, len: usize },
    Status,
}

enum Outcome {
    Done,
    Data(Vec<u8>),
    Status(Vec<(u32, Vec<StatusExtent>)>),
}

struct Pending {
    expect: Expect,
    data: Vec<u8>,
    /// Bytes of a structured read that data and hole chunks have filled.
    covered: u64,
    extents: Vec<(u32, Vec<StatusExtent>)>,
    error: Option<io::Error>,
    tx: oneshot::Sender<io::Result<Outcome>>,
}

struct Inner {
    tx: RefCell<Option<mpsc::UnboundedSender<Vec<u8>>>>,
    pending: RefCell<HashMap<u64, Pending>>,
    next_cookie: Cell<u64>,
    dead: RefCell<Option<(io::ErrorKind, String)>>,
    pool: RefCell<Vec<Vec<u8>>>,
}

impl Inner {
    fn dead_error(&self) -> Option<io::Error> {
        self.dead
            .borrow()
            .as_ref()
            .map(|(k, m)| io::Error::new(*k, m.clone()))
    }

    /// Marks the connection broken and fails every request in flight.
    fn fail_all(&self, err: &io::Error) {
        if self.dead.borrow().is_none() {
            *self.dead.borrow_mut() = Some((err.kind(), format!("NBD connection lost: {err}")));
        }
        let pending: Vec<Pending> = self.pending.borrow_mut().drain().map(|(_, p)| p).collect();
        for p in pending {
            let _ = p.tx.send(Err(io::Error::new(
                err.kind(),
                format!("NBD connection lost: {err}"),
            )));
        }
    }

    fn buf(&self, cap: usize) -> Vec<u8> {
        let mut pool = self.pool.borrow_mut();
        match pool.iter().position(|b| b.capacity() >= cap) {
            Some(i) => pool.swap_remove(i),
            None => Vec::with_capacity(cap),
        }
    }

    fn recycle(&self, mut b: Vec<u8>) {
        let mut pool = self.pool.borrow_mut();
        if b.capacity() <= 4 * 1024 * 1024 && pool.len() < 16 {
            b.clear();
            pool.push(b);
        }
    }
}

/// A connected NBD client (see the module doc for threading).
pub struct Client {
    inner: Rc<Inner>,
    neg: Negotiated,
    writer: Option<JoinHandle<()>>,
    reader: JoinHandle<()>,
}

impl Client {
    /// Connects, negotiates and starts the reply reader. Must run inside a `LocalSet`.
    pub async fn connect(
        addr: &ConnectAddr,
        export: &str,
        opts: &ClientOptions,
    ) -> io::Result<Client> {
        match addr {
            ConnectAddr::Unix(p) => {
                let mut s = tokio::net::UnixStream::connect(p).await?;
                crate::socket::enlarge_send_buffer(&s);
                if opts.tls.is_some() {
                    return Self::connect_stream(s, export, opts).await;
                }
                let neg = handshake(&mut s, export, opts).await?;
                let (r, w) = s.into_split();
                Ok(Self::start(neg, r, w))
            }
            ConnectAddr::Tcp { host, port, inet } => {
                let mut s = crate::inet::connect(host, *port, inet).await?;
                s.set_nodelay(true)?;
                if opts.tls.is_some() {
                    return Self::connect_stream(s, export, opts).await;
                }
                let neg = handshake(&mut s, export, opts).await?;
                let (r, w) = s.into_split();
                Ok(Self::start(neg, r, w))
            }
        }
    }

    /// Negotiates over an already connected byte stream (a socket passed by file
    /// descriptor, an in-memory pipe). Must run inside a `LocalSet`.
    pub async fn connect_stream<S>(
        mut stream: S,
        export: &str,
        opts: &ClientOptions,
    ) -> io::Result<Client>
    where
        S: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        let Some(tls) = &opts.tls else {
            let neg = handshake(&mut stream, export, opts).await?;
            let (r, w) = tokio::io::split(stream);
            return Ok(Self::start(neg, r, w));
        };
        let no_zeroes = greet(&mut stream).await?;
        send_option(&mut stream, OPT_STARTTLS, &[]).await?;
        let (kind, data) = read_option_reply(&mut stream, OPT_STARTTLS).await?;
        if kind != REP_ACK {
            return Err(option_error(kind, &data, OPT_STARTTLS));
        }
        let mut stream = tls.creds.connect(stream, &tls.hostname).await?;
        let neg = haggle(&mut stream, export, opts, no_zeroes).await?;
        let (r, w) = tokio::io::split(stream);
        Ok(Self::start(neg, r, w))
    }

    fn start<R, W>(neg: Negotiated, r: R, w: W) -> Client
    where
        R: AsyncRead + Unpin + 'static,
        W: AsyncWrite + Unpin + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Rc::new(Inner {
            tx: RefCell::new(Some(tx)),
            pending: RefCell::new(HashMap::new()),
            next_cookie: Cell::new(1),
            dead: RefCell::new(None),
            pool: RefCell::new(Vec::new()),
        });
        let writer = tokio::task::spawn_local(write_loop(inner.clone(), rx, w));
        let reader = tokio::task::spawn_local(read_loop(inner.clone(), r));
        Client {
            inner,
            neg,
            writer: Some(writer),
            reader,
        }
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.neg.size
    }

    /// Transmission flags sent by the server.
    pub fn flags(&self) -> u16 {
        self.neg.flags
    }

    /// The server sent `NBD_FLAG_READ_ONLY`: it will refuse writes, trims and
    /// write-zeroes.
    pub fn is_read_only(&self) -> bool {
        self.neg.flags & FLAG_READ_ONLY != 0
    }

    /// The server accepted `NBD_OPT_STRUCTURED_REPLY`; without it no metadata context is
    /// selected and [`Client::block_status`] fails.
    pub fn structured_replies(&self) -> bool {
        self.neg.structured
    }

    /// The server's `NBD_INFO_BLOCK_SIZE`, if it sent one. Its maximum bounds the size
    /// of each READ/WRITE request this client sends.
    pub fn block_size(&self) -> Option<BlockSize> {
        self.neg.block_size
    }

    /// Selected metadata contexts: (id, name).
    pub fn meta_contexts(&self) -> &[(u32, String)] {
        &self.neg.contexts
    }

    /// The id the server gave the context `name`, if selected.
    pub fn meta_context_id(&self, name: &str) -> Option<u32> {
        self.neg
            .contexts
            .iter()
            .find(|(_, n)| n == name)
            .map(|(id, _)| *id)
    }

    fn max_payload(&self) -> usize {
        self.neg
            .block_size
            .map_or(MAX_PAYLOAD, |b| b.maximum.clamp(512, MAX_PAYLOAD)) as usize
    }

    async fn submit(&self, req: Request, payload: &[u8], expect: Expect) -> io::Result<Outcome> {
        if let Some(e) = self.inner.dead_error() {
            return Err(e);
        }
        let cookie = self.inner.next_cookie.get();
        self.inner.next_cookie.set(cookie.wrapping_add(1));
        let req = Request { cookie, ..req };
        let mut buf = self.inner.buf(REQUEST_HEADER_LEN + payload.len());
        req.encode(&mut buf);
        buf.extend_from_slice(payload);
        let (tx, rx) = oneshot::channel();
        self.inner.pending.borrow_mut().insert(
            cookie,
            Pending {
                expect,
                data: Vec::new(),
                covered: 0,
                extents: Vec::new(),
                error: None,
                tx,
            },
        );
        let sent = match self.inner.tx.borrow().as_ref() {
            Some(tx) => tx.send(buf).is_ok(),
            None => false,
        };
        if !sent {
            self.inner.pending.borrow_mut().remove(&cookie);
            return Err(self.inner.dead_error().unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotConnected, "NBD client disconnected")
            }));
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(self
                .inner
                .dead_error()
                .unwrap_or_else(|| io::ErrorKind::ConnectionAborted.into())),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.neg.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "request beyond the end of the export",
            )),
        }
    }

    fn simple(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 0,
            offset,
            length,
        }
    }

    /// Reads `buf.len()` bytes at `offset`; large reads are split and sent together.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let max = self.max_payload();
        try_join_all(buf.chunks_mut(max).enumerate().map(|(i, chunk)| {
            let off = offset + (i * max) as u64;
            self.read_one(off, chunk)
        }))
        .await?;
        Ok(())
    }

    async fn read_one(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len();
        let req = Self::simple(CMD_READ, 0, offset, len as u32);
        match self.submit(req, &[], Expect::Read { offset, len }).await? {
            Outcome::Data(d) => {
                buf.copy_from_slice(&d[..len]);
                self.inner.recycle(d);
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "read reply carried no data",
            )),
        }
    }

    /// Writes `data` at `offset`, persisting it first when `fua` is set.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.check_range(offset, data.len() as u64)?;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let max = self.max_payload();
        try_join_all(data.chunks(max).enumerate().map(|(i, chunk)| {
            let req = Self::simple(
                CMD_WRITE,
                flags,
                offset + (i * max) as u64,
                chunk.len() as u32,
            );
            self.submit(req, chunk, Expect::Plain)
        }))
        .await?;
        Ok(())
    }

    async fn ranged(&self, kind: u16, flags: u16, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        let mut reqs = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(MAX_RANGE);
            reqs.push(self.submit(Self::simple(kind, flags, pos, n as u32), &[], Expect::Plain));
            pos += n;
        }
        try_join_all(reqs).await?;
        Ok(())
    }

    /// Zeroes a range (`NBD_CMD_WRITE_ZEROES`); needs `FLAG_SEND_WRITE_ZEROES`.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        if self.neg.flags & FLAG_SEND_WRITE_ZEROES == 0 {
            return Err(io::ErrorKind::Unsupported.into());
        }
        if flags.fast && self.neg.flags & FLAG_SEND_FAST_ZERO == 0 {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let mut f = 0;
        if !flags.may_trim {
            f |= CMD_FLAG_NO_HOLE;
        }
        if flags.fast {
            f |= CMD_FLAG_FAST_ZERO;
        }
        if flags.fua {
            f |= CMD_FLAG_FUA;
        }
        self.ranged(CMD_WRITE_ZEROES, f, offset, len).await
    }

    /// Discards a range; needs `FLAG_SEND_TRIM`.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        if self.neg.flags & FLAG_SEND_TRIM == 0 {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let f = if fua { CMD_FLAG_FUA } else { 0 };
        self.ranged(CMD_TRIM, f, offset, len).await
    }

    /// Prefetch hint; needs `FLAG_SEND_CACHE`.
    pub async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.neg.flags & FLAG_SEND_CACHE == 0 {
            return Err(io::ErrorKind::Unsupported.into());
        }
        self.ranged(CMD_CACHE, 0, offset, len).await
    }

    /// Flushes the server's cache; needs `FLAG_SEND_FLUSH`.
    pub async fn flush(&self) -> io::Result<()> {
        if self.neg.flags & FLAG_SEND_FLUSH == 0 {
            return Err(io::ErrorKind::Unsupported.into());
        }
        self.submit(Self::simple(CMD_FLUSH, 0, 0, 0), &[], Expect::Plain)
            .await
            .map(|_| ())
    }

    /// Block status of `[offset, offset + len)` for every selected context: one list of
    /// extents per context id. The server may describe less than `len` (large ranges
    /// are cut to 1 GiB here).
    pub async fn block_status(
        &self,
        offset: u64,
        len: u64,
        req_one: bool,
    ) -> io::Result<Vec<(u32, Vec<StatusExtent>)>> {
        if self.neg.contexts.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no metadata context negotiated",
            ));
        }
        self.check_range(offset, len)?;
        let len = len.min(MAX_RANGE) as u32;
        let flags = if req_one { CMD_FLAG_REQ_ONE } else { 0 };
        let req = Self::simple(CMD_BLOCK_STATUS, flags, offset, len);
        match self.submit(req, &[], Expect::Status).await? {
            Outcome::Status(s) => Ok(s),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "block status reply without extents",
            )),
        }
    }

    /// Sends `NBD_CMD_DISC` after the requests already queued and closes the connection.
    pub async fn disconnect(mut self) -> io::Result<()> {
        let tx = self.inner.tx.borrow_mut().take();
        if let Some(tx) = tx {
            let mut buf = Vec::with_capacity(REQUEST_HEADER_LEN);
            Self::simple(CMD_DISC, 0, 0, 0).encode(&mut buf);
            let _ = tx.send(buf);
        }
        if let Some(w) = self.writer.take() {
            let _ = w.await;
        }
        Ok(())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(w) = &self.writer {
            w.abort();
        }
        self.reader.abort();
        let err = io::Error::new(io::ErrorKind::NotConnected, "NBD client closed");
        self.inner.fail_all(&err);
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    inner: Rc<Inner>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    w: W,
) {
    let mut w = BufWriter::with_capacity(256 * 1024, w);
    let result: io::Result<()> = async {
        while let Some(buf) = rx.recv().await {
            w.write_all(&buf).await?;
            inner.recycle(buf);
            // Batch whatever else is queued into the same flush.
            while let Ok(buf) = rx.try_recv() {
                w.write_all(&buf).await?;
                inner.recycle(buf);
            }
            w.flush().await?;
        }
        w.shutdown().await
    }
    .await;
    if let Err(e) = result {
        inner.fail_all(&e);
    }
}

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

async fn read_loop<R: AsyncRead + Unpin>(inner: Rc<Inner>, r: R) {
    let mut r = BufReader::with_capacity(256 * 1024, r);
    let err = loop {
        if let Err(e) = read_reply(&inner, &mut r).await {
            break e;
        }
    };
    inner.fail_all(&err);
}

async fn read_reply<R: AsyncRead + Unpin>(inner: &Inner, r: &mut R) -> io::Result<()> {
    let magic = r.read_u32().await?;
    match magic {
        SIMPLE_REPLY_MAGIC => {
            let errno = r.read_u32().await?;
            let cookie = r.read_u64().await?;
            let p = inner
                .pending
                .borrow_mut()
                .remove(&cookie)
                .ok_or_else(|| protocol_error("reply for an unknown cookie"))?;
            let result = match (errno, &p.expect) {
                (0, Expect::Read { len, .. }) => {
                    let mut d = inner.buf(*len);
                    d.resize(*len, 0);
                    r.read_exact(&mut d).await?;
                    Ok(Outcome::Data(d))
                }
                (0, Expect::Status) => {
                    Err(protocol_error("block status answered by a simple reply"))
                }
                (0, Expect::Plain) => Ok(Outcome::Done),
                (e, _) => Err(error_of(e)),
            };
            let _ = p.tx.send(result);
            Ok(())
        }
        STRUCTURED_REPLY_MAGIC => {
            let mut h = [0u8; 16];
            r.read_exact(&mut h).await?;
            let h = ChunkHeader::parse(&h);
            read_chunk(inner, r, h).await
        }
        _ => Err(protocol_error(format!("bad reply magic {magic:#x}"))),
    }
}

/// Where a read chunk for `n` bytes at `off` lands in the buffer of a read of `len` bytes
/// at `start`; None when any of it falls outside, whatever values the server sent.
fn chunk_range(start: u64, len: usize, off: u64, n: u64) -> Option<std::ops::Range<usize>> {
    let rel = off.checked_sub(start)?;
    let end = rel.checked_add(n).filter(|&end| end <= len as u64)?;
    Some(rel as usize..end as usize)
}

async fn read_chunk<R: AsyncRead + Unpin>(
    inner: &Inner,
    r: &mut R,
    h: ChunkHeader,
) -> io::Result<()> {
    // Take what the chunk needs out of the pending entry so no RefCell borrow is held
    // across an await (requests are inserted concurrently).
    let (read_range, mut data) = {
        let mut pending = inner.pending.borrow_mut();
        let p = pending
            .get_mut(&h.cookie)
            .ok_or_else(|| protocol_error("chunk for an unknown cookie"))?;
        let range = match p.expect {
            Expect::Read { offset, len } => Some((offset, len)),
            _ => None,
        };
        (range, std::mem::take(&mut p.data))
    };
    if let Some((_, len)) = read_range {
        if data.len() != len {
            data = inner.buf(len);
            data.resize(len, 0);
        }
    }
    let mut status = None;
    let mut error = None;
    let mut filled = 0;
    match h.kind {
        REPLY_TYPE_NONE => {
            if h.length != 0 {
                return Err(protocol_error("NONE chunk with payload"));
            }
        }
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
            let (start, len) =
                read_range.ok_or_else(|| protocol_error("data chunk for a non-read"))?;
            if h.length < 9 || (h.kind == REPLY_TYPE_OFFSET_HOLE && h.length != 12) {
                return Err(protocol_error("malformed read chunk"));
            }
            let off = r.read_u64().await?;
            let n = if h.kind == REPLY_TYPE_OFFSET_DATA {
                (h.length - 8) as u64
            } else {
                r.read_u32().await? as u64
            };
            let Some(range) = chunk_range(start, len, off, n) else {
                return Err(protocol_error("read chunk outside the request"));
            };
            let dst = &mut data[range];
            if h.kind == REPLY_TYPE_OFFSET_DATA {
                r.read_exact(dst).await?;
            } else {
                dst.fill(0);
            }
            filled = n;
        }
        REPLY_TYPE_BLOCK_STATUS => {
            if h.length < 12 || !(h.length - 4).is_multiple_of(8) || h.length > MAX_STATUS_PAYLOAD {
                return Err(protocol_error("malformed block status chunk"));
            }
            let mut p = vec![0u8; h.length as usize];
            r.read_exact(&mut p).await?;
            let id = be_u32(&p[0..4]);
            let ext = p[4..]
                .chunks_exact(8)
                .map(|c| StatusExtent {
                    length: be_u32(&c[0..4]) as u64,
                    flags: be_u32(&c[4..8]),
                })
                .collect::<Vec<_>>();
            status = Some((id, ext));
        }
        k if k & REPLY_TYPE_FLAG_ERROR != 0 => {
            if h.length < 6 || h.length > MAX_OPTION_REPLY {
                return Err(protocol_error("malformed error chunk"));
            }
            let mut p = vec![0u8; h.length as usize];
            r.read_exact(&mut p).await?;
            let errno = be_u32(&p[0..4]);
            let mlen = be_u16(&p[4..6]) as usize;
            if 6 + mlen > p.len() {
                return Err(protocol_error("error message overflows its chunk"));
            }
            let msg = String::from_utf8_lossy(&p[6..6 + mlen]);
            tracing::debug!(errno, cookie = h.cookie, "NBD server error: {msg}");
            error = Some(error_of(if errno == 0 { EIO } else { errno }));
        }
        _ => return Err(protocol_error(format!("unknown chunk type {}", h.kind))),
    }
    let mut pending = inner.pending.borrow_mut();
    let done = h.flags & REPLY_FLAG_DONE != 0;
    let Some(p) = pending.get_mut(&h.cookie) else {
        return Ok(());
    };
    p.data = data;
    p.covered = p.covered.saturating_add(filled);
    if let Some(s) = status {
        p.extents.push(s);
    }
    if let (Some(e), None) = (error, &p.error) {
        p.error = Some(e);
    }
    if done {
        let p = pending.remove(&h.cookie).expect("entry checked above");
        let result = match (p.error, p.expect) {
            (Some(e), _) => Err(e),
            // The spec has a successful read's chunks cover the request (without
            // overlapping): a server that says less has not answered it.
            (None, Expect::Read { len, .. }) if p.covered != len as u64 => {
                Err(protocol_error("read reply does not cover the request"))
            }
            (None, Expect::Read { .. }) => Ok(Outcome::Data(p.data)),
            (None, Expect::Status) => Ok(Outcome::Status(p.extents)),
            (None, Expect::Plain) => Ok(Outcome::Done),
        };
        let _ = p.tx.send(result);
    }
    Ok(())
}

async fn read_option_reply<S: AsyncRead + Unpin>(
    s: &mut S,
    option: u32,
) -> io::Result<(u32, Vec<u8>)> {
    if s.read_u64().await? != OPTION_REPLY_MAGIC {
        return Err(protocol_error("bad option reply magic"));
    }
    if s.read_u32().await? != option {
        return Err(protocol_error("option reply for another option"));
    }
    let kind = s.read_u32().await?;
    let len = s.read_u32().await?;
    if len > MAX_OPTION_REPLY {
        return Err(protocol_error("option reply too large"));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).await?;
    Ok((kind, data))
}

async fn send_option<S: AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await?;
    s.flush().await
}

/// The server's refusal of `option`. A TLS-only server's refusal is worded as QEMU words
/// it, with the hint its user needs.
fn option_error(kind: u32, data: &[u8], option: u32) -> io::Error {
    let msg = String::from_utf8_lossy(data);
    let name = option_name(option);
    if kind == REP_ERR_TLS_REQD {
        return io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "TLS negotiation required before option {option} ({name})\nDid you forget a valid tls-creds?\nserver reported: {msg}"
            ),
        );
    }
    let ek = match kind {
        REP_ERR_UNKNOWN => io::ErrorKind::NotFound,
        REP_ERR_UNSUP | REP_ERR_PLATFORM => io::ErrorKind::Unsupported,
        REP_ERR_POLICY => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(
        ek,
        format!("option {option} ({name}) failed (reply {kind:#x}): {msg}"),
    )
}

/// An option's name as QEMU's messages give it.
fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "export name",
        OPT_ABORT => "abort",
        OPT_LIST => "list",
        OPT_STARTTLS => "starttls",
        OPT_INFO => "info",
        OPT_GO => "go",
        OPT_STRUCTURED_REPLY => "structured reply",
        OPT_LIST_META_CONTEXT => "list meta context",
        OPT_SET_META_CONTEXT => "set meta context",
        OPT_EXTENDED_HEADERS => "extended headers",
        _ => "unknown",
    }
}

async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    opts: &ClientOptions,
) -> io::Result<Negotiated> {
    let no_zeroes = greet(s).await?;
    haggle(s, export, opts, no_zeroes).await
}

/// Reads the server's greeting and sends the client flags; returns whether the server
/// leaves out the padding zeroes.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> io::Result<bool> {
    if s.read_u64().await? != NBD_MAGIC {
        return Err(protocol_error("not an NBD server"));
    }
    if s.read_u64().await? != IHAVEOPT {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "server does not speak newstyle negotiation",
        ));
    }
    let hs = s.read_u16().await?;
    if hs & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "server does not speak fixed newstyle negotiation",
        ));
    }
    let no_zeroes = hs & FLAG_NO_ZEROES != 0;
    let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    s.write_all(&cflags.to_be_bytes()).await?;
    Ok(no_zeroes)
}

/// The options after the greeting, up to transmission.
async fn haggle<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    opts: &ClientOptions,
    no_zeroes: bool,
) -> io::Result<Negotiated> {
    if export.len() > MAX_STRING {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "export name too long",
        ));
    }
    send_option(s, OPT_STRUCTURED_REPLY, &[]).await?;
    let (kind, _) = read_option_reply(s, OPT_STRUCTURED_REPLY).await?;
    let structured = kind == REP_ACK;

    let mut contexts = Vec::new();
    if structured && !opts.meta_contexts.is_empty() {
        let mut d = Vec::new();
        let q: Vec<&str> = opts.meta_contexts.iter().map(String::as_str).collect();
        encode_meta_context_request(&mut d, export, &q);
        send_option(s, OPT_SET_META_CONTEXT, &d).await?;
        loop {
            let (kind, data) = read_option_reply(s, OPT_SET_META_CONTEXT).await?;
            match kind {
                REP_META_CONTEXT if data.len() >= 4 => {
                    let name = check_string(&data[4..]).map_err(|m| protocol_error(m.0))?;
                    contexts.push((be_u32(&data[..4]), name.to_string()));
                }
                REP_ACK => break,
                k if k & REP_FLAG_ERROR != 0 => {
                    if k == REP_ERR_UNKNOWN {
                        return Err(option_error(k, &data, OPT_SET_META_CONTEXT));
                    }
                    tracing::debug!("server refused metadata contexts: {:#x}", k);
                    contexts.clear();
                    break;
                }
                _ => return Err(protocol_error("unexpected meta context reply")),
            }
        }
    }

    let mut d = Vec::new();
    encode_info_request(&mut d, export, &[INFO_BLOCK_SIZE]);
    send_option(s, OPT_GO, &d).await?;
    let mut size = None;
    let mut flags = 0;
    let mut block_size = None;
    loop {
        let (kind, data) = read_option_reply(s, OPT_GO).await?;
        match kind {
            REP_INFO if data.len() >= 2 => match be_u16(&data[..2]) {
                INFO_EXPORT if data.len() == 12 => {
                    size = Some(be_u64(&data[2..10]));
                    flags = be_u16(&data[10..12]);
                }
                INFO_BLOCK_SIZE if data.len() == 14 => {
                    block_size = Some(BlockSize {
                        minimum: be_u32(&data[2..6]),
                        preferred: be_u32(&data[6..10]),
                        maximum: be_u32(&data[10..14]),
                    });
                }
                _ => {}
            },
            REP_ACK => break,
            REP_ERR_UNSUP => {
                return export_name_fallback(s, export, no_zeroes, structured, contexts).await;
            }
            k if k & REP_FLAG_ERROR != 0 => return Err(option_error(k, &data, OPT_GO)),
            _ => return Err(protocol_error("unexpected NBD_OPT_GO reply")),
        }
    }
    let size = size.ok_or_else(|| protocol_error("server sent no NBD_INFO_EXPORT"))?;
    Ok(Negotiated {
        size,
        flags,
        structured,
        block_size,
        contexts,
    })
}

async fn export_name_fallback<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
    structured: bool,
    contexts: Vec<(u32, String)>,
) -> io::Result<Negotiated> {
    send_option(s, OPT_EXPORT_NAME, export.as_bytes()).await?;
    let size = s.read_u64().await?;
    let flags = s.read_u16().await?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        s.read_exact(&mut z).await?;
    }
    Ok(Negotiated {
        size,
        flags,
        structured,
        block_size: None,
        contexts,
    })
}

#[cfg(test)]
mod tests {
    use super::chunk_range;

    /// A server's chunk offset and length come off the wire: near u64::MAX they must be
    /// refused, not wrap around into a slice out of range.
    #[test]
    fn read_chunks_outside_the_request_are_refused() {
        assert_eq!(chunk_range(4096, 8192, 4096, 8192), Some(0..8192));
        assert_eq!(chunk_range(4096, 8192, 8192, 4096), Some(4096..8192));
        assert_eq!(chunk_range(4096, 8192, 8192, 4097), None);
        assert_eq!(chunk_range(4096, 8192, 0, 10), None);
        assert_eq!(chunk_range(4096, 8192, 4097, u64::MAX), None);
        assert_eq!(chunk_range(0, 8192, u64::MAX, 2), None);
    }
}
