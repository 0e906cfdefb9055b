//! Transmission phase of one server connection: reads requests, runs each one as its
//! own local task so that many are in flight, and queues their replies (out of order) for
//! one writer task. Reply buffers come from a per-connection pool.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::handshake::{self, Negotiated};
use super::relocate::{Prefixed, RawSocket, Slot, Tls, Transport};
use super::{ConnectionGuard, ServerTls};
use crate::backend::{Backend, Capabilities, MetaContext, StatusExtent, ZeroFlags};
use crate::proto::*;
use crate::spawn::Spawner;
use tokio_rustls::server::TlsStream;

/// Payload bytes a connection may hold in flight, in units of [`BUDGET_UNIT`] bytes; it
/// bounds memory per connection while leaving room for one maximum-sized request.
const BUDGET_UNIT: usize = 64 * 1024;
const BUDGET_UNITS: usize = 2 * (MAX_PAYLOAD as usize / BUDGET_UNIT) + 64;
/// Data in read replies and write payloads starts at this alignment, so that copying it to
/// and from the I/O layer's page-aligned buffers runs on aligned memory.
const DATA_ALIGN: usize = 4096;
/// Buffers above this size are not kept in the pool.
const POOL_MAX_BUF: usize = 4 * 1024 * 1024 + DATA_ALIGN + 64;
const POOL_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Replies the writer hands to one vectored write.
const REPLIES_PER_WRITE: usize = 64;
/// A connection's read buffer: request headers and small write payloads are read in
/// batches through it, larger payloads straight into their data buffers. It is allocated
/// (and zeroed) for every connection, so its size is what an idle connection costs:
/// 64 KiB made 1000 idle connections 78 MiB.
const READ_BUFFER: usize = 16 * 1024;

/// Runs one connection from greeting to close. `on_kill` must make pending socket I/O
/// fail (shut the socket down) so that a killed connection ends promptly.
pub(super) async fn serve<T: Transport>(
    guard: ConnectionGuard,
    reader: T::Read,
    writer: T::Write,
    on_kill: impl Fn() + Send + 'static,
) where
    T::Detached: Send,
{
    let reader = Prefixed::new(reader);
    let handshake = negotiate_on(&guard, reader, writer, handshake::Start::Greet);
    let negotiated = bounded_handshake(&guard, handshake, &on_kill).await;
    if let Some((n, reader, writer)) = negotiated {
        transmit_at_home::<T, _>(guard, n, reader, writer, on_kill, None).await;
    }
}

/// [`serve`] over any byte stream, which stays on the calling thread.
pub(super) async fn serve_here<R, W>(guard: ConnectionGuard, reader: R, writer: W)
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let handshake = negotiate_on(&guard, reader, writer, handshake::Start::Greet);
    if let Some((n, reader, writer)) = bounded_handshake(&guard, handshake, &|| {}).await {
        let kill = guard.kill_rx.clone();
        transmit(n, reader, writer, kill, &|| {}, None).await;
    }
}

/// Runs one connection of a TLS server: the plain greeting, the client's
/// `NBD_OPT_STARTTLS`, the TLS handshake and the authorization of its certificate, then
/// negotiation and transmission inside TLS.
pub(super) async fn serve_tls<S: RawSocket>(
    guard: ConnectionGuard,
    stream: S,
    tls: ServerTls,
    on_kill: impl Fn() + Send + 'static,
) where
    TlsStream<Slot<S>>: Send,
{
    let handshake = async {
        let mut stream = stream;
        let Some(no_zeroes) = handshake::until_starttls(&mut stream).await? else {
            let _ = stream.shutdown().await;
            return Ok(None);
        };
        let (tls_stream, peer) = tls.creds.accept(Slot::new(stream)).await?;
        if let Some(authorize) = &tls.authorize {
            let identity = peer.as_deref();
            let allowed = authorize(identity).unwrap_or_else(|e| {
                tracing::warn!("NBD TLS authorization failed: {e}");
                false
            });
            if !allowed {
                tracing::warn!(
                    "TLS x509 authz check for {} is denied",
                    identity.unwrap_or("a client without a certificate")
                );
                return Ok(None);
            }
        }
        let (reader, writer) = tokio::io::split(tls_stream);
        let reader = Prefixed::new(reader);
        negotiate_on(
            &guard,
            reader,
            writer,
            handshake::Start::InTls { no_zeroes },
        )
        .await
    };
    let negotiated = bounded_handshake(&guard, handshake, &on_kill).await;
    if let Some((n, reader, writer)) = negotiated {
        transmit_at_home::<Tls<S>, _>(guard, n, reader, writer, on_kill, None).await;
    }
}

/// Negotiates over a reader and a writer; a session that ends there gets its writer shut
/// down. The halves come back for transmission.
async fn negotiate_on<R, W>(
    guard: &ConnectionGuard,
    reader: R,
    mut writer: W,
    start: handshake::Start,
) -> io::Result<Option<(Negotiated, BufReader<R>, W)>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    let negotiated = handshake::negotiate(guard, &mut reader, &mut writer, start).await?;
    if negotiated.is_none() {
        let _ = writer.shutdown().await;
    }
    Ok(negotiated.map(|n| (n, reader, writer)))
}

/// Runs transmission on the thread the export is served from, moving the connection there
/// first when it runs elsewhere (`relocate.rs`), and again whenever the export's node
/// moves. `here` is the iothread the connection runs on, `None` for the server's threads.
async fn transmit_at_home<T, K>(
    guard: ConnectionGuard,
    n: Negotiated,
    reader: BufReader<Prefixed<T::Read>>,
    writer: T::Write,
    on_kill: K,
    here: Option<Arc<dyn Spawner>>,
) where
    T: Transport,
    T::Detached: Send,
    K: Fn() + Send + 'static,
{
    let backend = n.export.export.backend.clone();
    let home = backend.home();
    if !runs_at(&home, &here) {
        move_to::<T, K>(guard, n, reader, writer, on_kill, home);
        return;
    }
    let follow = backend.watch_home().map(|moves| Follow {
        moves,
        backend,
        here,
    });
    let kill = guard.kill_rx.clone();
    if let Some((n, reader, writer)) = transmit(n, reader, writer, kill, &on_kill, follow).await {
        let home = n.export.export.backend.home();
        move_to::<T, K>(guard, n, reader, writer, on_kill, home);
    }
}

/// Whether a connection that runs at `here` (`None`: the server's threads) is where an
/// export whose home is `home` wants it.
fn runs_at(home: &Option<Arc<dyn Spawner>>, here: &Option<Arc<dyn Spawner>>) -> bool {
    match (home, here) {
        (Some(home), _) => home.is_current(),
        (None, here) => here.is_none(),
    }
}

/// Takes the connection off this thread and runs its transmission at `home` (`None`: the
/// server's threads), with the bytes the client already sent.
fn move_to<T, K>(
    guard: ConnectionGuard,
    n: Negotiated,
    reader: BufReader<Prefixed<T::Read>>,
    writer: T::Write,
    on_kill: K,
    home: Option<Arc<dyn Spawner>>,
) where
    T: Transport,
    T::Detached: Send,
    K: Fn() + Send + 'static,
{
    let buffered = reader.buffer().to_vec();
    let (early, read) = reader.into_inner().into_parts(&buffered);
    let detached = match T::detach(read, writer) {
        Ok(detached) => detached,
        Err(e) => {
            tracing::warn!("NBD connection cannot leave its thread: {e}");
            return;
        }
    };
    let spawner = home
        .clone()
        .unwrap_or_else(|| guard.shared().spawner.clone());
    spawner.spawn(Box::new(move || {
        Box::pin(async move {
            match T::attach(detached) {
                Ok((read, write)) => {
                    let read = Prefixed::with_early(early, read);
                    let reader = BufReader::with_capacity(READ_BUFFER, read);
                    Box::pin(transmit_at_home::<T, K>(
                        guard, n, reader, write, on_kill, home,
                    ))
                    .await;
                }
                Err(e) => tracing::warn!("NBD connection cannot move to its export's thread: {e}"),
            }
        })
    }));
}

/// What a connection that can move watches: `moves` changes when nodes move, and then
/// `backend` says where it wants its connections; `here` is where this one runs.
struct Follow {
    moves: tokio::sync::watch::Receiver<u64>,
    backend: Arc<dyn Backend>,
    here: Option<Arc<dyn Spawner>>,
}

impl Follow {
    /// Waits until the export wants its connections elsewhere.
    async fn moved_away(&mut self) {
        loop {
            if self.moves.changed().await.is_err() {
                return std::future::pending().await;
            }
            if !runs_at(&self.backend.home(), &self.here) {
                return;
            }
        }
    }
}

/// Runs a connection's negotiation within the server's time limit, ending it early when
/// the connection is killed. `None` when negotiation did not reach transmission.
async fn bounded_handshake<T>(
    guard: &ConnectionGuard,
    handshake: impl std::future::Future<Output = io::Result<Option<T>>>,
    on_kill: &impl Fn(),
) -> Option<T> {
    let mut kill = guard.kill_rx.clone();
    let limit = guard.shared().config().handshake_max_seconds;
    let handshake = async {
        if limit == 0 {
            return handshake.await;
        }
        match tokio::time::timeout(Duration::from_secs(limit.into()), handshake).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "negotiation exceeded the time limit",
            )),
        }
    };
    let negotiated = tokio::select! {
        biased;
        _ = kill.wait_for(|k| *k) => {
            on_kill();
            return None;
        }
        r = handshake => r,
    };
    match negotiated {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!("NBD handshake ended: {e}");
            None
        }
    }
}

struct Conn {
    backend: Arc<dyn Backend>,
    replies: ReplyQueue,
    pool: BufPool,
    structured: bool,
    contexts: Vec<(u32, MetaContext)>,
}

/// Serves requests until the client leaves or the connection is killed; or, with
/// `follow`, until the export wants its connections on another thread: then, once every
/// request read is answered, the connection comes back to be moved there.
async fn transmit<R, W>(
    n: Negotiated,
    mut reader: BufReader<R>,
    writer: W,
    mut kill: tokio::sync::watch::Receiver<bool>,
    on_kill: &impl Fn(),
    mut follow: Option<Follow>,
) -> Option<(Negotiated, BufReader<R>, W)>
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let export = n.export.export.clone();
    let backend = export.backend.clone();
    let read_only = export.read_only();
    let conn = Rc::new(Conn {
        backend,
        replies: ReplyQueue::default(),
        pool: BufPool::default(),
        structured: n.structured,
        contexts: n.contexts.clone(),
    });
    let writer = tokio::task::spawn_local(write_replies(conn.clone(), writer));
    let budget = Arc::new(Semaphore::new(BUDGET_UNITS));
    let mut tasks = JoinSet::new();
    let mut hdr = [0u8; REQUEST_HEADER_LEN];
    let mut moving = false;
    loop {
        while tasks.try_join_next().is_some() {}
        let moved_away = async {
            match follow.as_mut() {
                Some(follow) => follow.moved_away().await,
                None => std::future::pending().await,
            }
        };
        // Waiting for the first byte of a request, not the whole header, keeps a move
        // from cutting one in half: only `fill_buf` may be cancelled without losing bytes.
        let arrived = tokio::select! {
            biased;
            _ = kill.wait_for(|k| *k) => {
                tracing::debug!(export = %export.name, "NBD connection closed by the server");
                on_kill();
                break;
            }
            _ = moved_away => {
                moving = true;
                break;
            }
            r = reader.fill_buf() => r.map(|_| ()),
        };
        let read = match arrived {
            Ok(()) => tokio::select! {
                biased;
                _ = kill.wait_for(|k| *k) => {
                    tracing::debug!(export = %export.name, "NBD connection closed by the server");
                    on_kill();
                    break;
                }
                r = reader.read_exact(&mut hdr) => r,
            },
            Err(e) => Err(e),
        };
        if let Err(e) = read {
            if e.kind() != io::ErrorKind::UnexpectedEof {
                tracing::debug!("NBD connection read failed: {e}");
            }
            break;
        }
        let Some(req) = Request::parse(&hdr) else {
            tracing::warn!(export = %export.name, "NBD request with bad magic, disconnecting");
            break;
        };
        if req.kind == CMD_DISC {
            break;
        }
        let units = 1 + req.length as usize / BUDGET_UNIT;
        let permit = if req.kind == CMD_WRITE || req.kind == CMD_READ {
            budget
                .clone()
                .acquire_many_owned(units.min(BUDGET_UNITS) as u32)
                .await
        } else {
            budget.clone().acquire_owned().await
        };
        let Ok(permit) = permit else { break };

        let mut payload = None;
        if req.kind == CMD_WRITE {
            if req.length > MAX_PAYLOAD {
                tracing::warn!(
                    length = req.length,
                    "NBD write payload over the limit, disconnecting"
                );
                break;
            }
            let (mut buf, start) = conn.pool.get_aligned(0, req.length as usize);
            let data = start..start + req.length as usize;
            if reader.read_exact(&mut buf[data.clone()]).await.is_err() {
                break;
            }
            payload = Some((buf, data));
        }
        let size = conn.backend.size();
        let caps = conn.backend.capabilities();
        let conn2 = conn.clone();
        match check(&req, size, &caps, read_only, &conn) {
            Ok(()) => {
                tasks.spawn_local(async move {
                    let cookie = req.cookie;
                    // A panic (a bug) fails this request with EIO; the connection and the
                    // daemon go on.
                    let handled = AssertUnwindSafe(handle(&conn2, req, payload))
                        .catch_unwind()
                        .await;
                    if let Err(payload) = handled {
                        let message = payload
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| payload.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        tracing::error!(cookie, "NBD request panicked (a bug): {message}");
                        conn2.send_error(cookie, EIO, "internal error");
                    }
                    conn2.release_after_replies(permit);
                });
            }
            Err((errno, msg)) => {
                if let Some((buf, _)) = payload {
                    conn.pool.put(buf);
                }
                conn.send_error(req.cookie, errno, msg);
                conn.release_after_replies(permit);
            }
        }
    }
    // The spec asks in-flight requests to be answered before closing; after a kill the
    // socket is already shut down, so their replies fail fast. A connection that moves
    // sends every reply here first, and keeps its socket open.
    while tasks.join_next().await.is_some() {}
    conn.replies.handing_over.set(moving);
    conn.replies.close();
    let writer = writer.await.ok().flatten()?;
    if conn.replies.broken.get() {
        return None;
    }
    Some((n, reader, writer))
}

/// Replies waiting for the connection's writer task. The writer sends everything queued
/// in one vectored write, so the replies of requests that complete together (one ring
/// reap) cost one system call and one wake-up of the client instead of one each.
#[derive(Default)]
struct ReplyQueue {
    entries: RefCell<VecDeque<Queued>>,
    wake: Notify,
    closed: Cell<bool>,
    /// The socket failed: the client is gone, and replies are dropped unsent.
    broken: Cell<bool>,
    /// Once closed and empty, the writer hands the socket back instead of shutting it
    /// down: the connection moves to another thread.
    handing_over: Cell<bool>,
}

enum Queued {
    /// A buffer whose bytes in the given range are one reply (or chunk).
    Reply(Vec<u8>, Range<usize>),
    /// A request's share of the connection's budget, released once every reply queued
    /// before it is written, so that replies a slow client leaves unread still count.
    Release { _budget: OwnedSemaphorePermit },
}

impl ReplyQueue {
    fn push(&self, entry: Queued) {
        self.entries.borrow_mut().push_back(entry);
        self.wake.notify_one();
    }

    fn close(&self) {
        self.closed.set(true);
        self.wake.notify_one();
    }
}

/// The connection's writer: sends queued replies in batches until the queue is closed and
/// empty, then shuts the socket down, or hands it back for a move.
async fn write_replies<W: AsyncWrite + Unpin>(conn: Rc<Conn>, mut writer: W) -> Option<W> {
    let queue = &conn.replies;
    let mut batch = Vec::with_capacity(REPLIES_PER_WRITE);
    loop {
        {
            let mut entries = queue.entries.borrow_mut();
            let n = entries.len().min(REPLIES_PER_WRITE);
            batch.extend(entries.drain(..n));
        }
        if batch.is_empty() {
            if queue.closed.get() {
                break;
            }
            queue.wake.notified().await;
            continue;
        }
        // A failed write means the client is gone; the reader sees it too and ends the
        // connection, so the error needs no further handling here.
        if !queue.broken.get() && send_batch(&mut writer, &batch).await.is_err() {
            queue.broken.set(true);
        }
        for entry in batch.drain(..) {
            if let Queued::Reply(buf, _) = entry {
                conn.pool.put(buf);
            }
        }
    }
    if queue.handing_over.get() {
        return Some(writer);
    }
    let _ = writer.shutdown().await;
    None
}

async fn send_batch<W: AsyncWrite + Unpin>(writer: &mut W, batch: &[Queued]) -> io::Result<()> {
    let mut slices = [IoSlice::new(&[]); REPLIES_PER_WRITE];
    let mut count = 0;
    for entry in batch {
        if let Queued::Reply(buf, bytes) = entry {
            slices[count] = IoSlice::new(&buf[bytes.clone()]);
            count += 1;
        }
    }
    let mut pending = &mut slices[..count];
    IoSlice::advance_slices(&mut pending, 0);
    while !pending.is_empty() {
        let n = writer.write_vectored(pending).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut pending, n);
    }
    writer.flush().await
}

/// Validates a request against the negotiated features, in the order the NBD spec
/// gives: unknown command and flags, unsupported features, read-only, size limits,
/// bounds.
fn check(
    req: &Request,
    size: u64,
    caps: &Capabilities,
    read_only: bool,
    conn: &Conn,
) -> Result<(), (u32, &'static str)> {
    let allowed = CMD_FLAG_FUA
        | match req.kind {
            CMD_READ if conn.structured => CMD_FLAG_DF,
            CMD_WRITE_ZEROES if caps.fast_zero => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    let supported = match req.kind {
        CMD_READ | CMD_WRITE => true,
        CMD_FLUSH => caps.flush,
        CMD_TRIM => caps.trim,
        CMD_WRITE_ZEROES => caps.write_zeroes,
        CMD_CACHE => caps.cache,
        CMD_BLOCK_STATUS => !conn.contexts.is_empty(),
        _ => return Err((EINVAL, "unknown command")),
    };
    if !supported {
        return Err((EINVAL, "command not negotiated"));
    }
    if req.flags & !allowed != 0 {
        return Err((EINVAL, "unsupported flags for this command"));
    }
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && read_only {
        return Err((EPERM, "export is read-only"));
    }
    if req.kind == CMD_READ && req.length > MAX_PAYLOAD {
        return Err((EINVAL, "request length exceeds the maximum"));
    }
    if req.kind != CMD_FLUSH
        && req
            .offset
            .checked_add(req.length as u64)
            .is_none_or(|end| end > size)
    {
        // EINVAL for writes too (the spec suggests ENOSPC): QEMU's server answers EINVAL.
        return Err((EINVAL, "request beyond the end of the export"));
    }
    if req.kind == CMD_BLOCK_STATUS && req.length == 0 {
        return Err((EINVAL, "empty block status request"));
    }
    Ok(())
}

/// `payload`: a write's data, in the given range of the buffer.
async fn handle(conn: &Conn, req: Request, payload: Option<(Vec<u8>, Range<usize>)>) {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let len = req.length as u64;
    let b = &conn.backend;
    let result = match req.kind {
        CMD_READ => return conn.read(req).await,
        CMD_BLOCK_STATUS => return conn.block_status(req).await,
        CMD_WRITE => {
            let (buf, data) = payload.unwrap_or_default();
            let r = b.write(req.offset, &buf[data], fua).await;
            conn.pool.put(buf);
            r
        }
        CMD_WRITE_ZEROES => {
            let flags = ZeroFlags {
                may_trim: req.flags & CMD_FLAG_NO_HOLE == 0,
                fast: req.flags & CMD_FLAG_FAST_ZERO != 0,
                fua,
            };
            b.write_zeroes(req.offset, len, flags).await
        }
        CMD_TRIM => b.trim(req.offset, len, fua).await,
        CMD_FLUSH => b.flush().await,
        CMD_CACHE => b.cache(req.offset, len).await,
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    match result {
        Ok(()) => conn.send_ok(req.cookie),
        Err(e) => {
            let errno = errno_of(&e);
            tracing::debug!(
                kind = req.kind,
                offset = req.offset,
                len,
                "NBD request failed: {e}"
            );
            conn.send_error(req.cookie, errno, &e.to_string())
        }
    }
}

impl Conn {
    /// Queues the reply that is the whole of `buf`.
    fn send(&self, buf: Vec<u8>) {
        let len = buf.len();
        self.send_part(buf, 0..len)
    }

    /// Queues the reply in `buf[bytes]`; the buffer returns to the pool once sent.
    fn send_part(&self, buf: Vec<u8>, bytes: Range<usize>) {
        if self.replies.broken.get() {
            return self.pool.put(buf);
        }
        self.replies.push(Queued::Reply(buf, bytes));
    }

    fn release_after_replies(&self, permit: OwnedSemaphorePermit) {
        self.replies.push(Queued::Release { _budget: permit });
    }

    /// Queues a reply built on the stack, copied into a pooled buffer.
    fn send_bytes(&self, reply: &[u8]) {
        let mut buf = self.pool.get(reply.len());
        buf.extend_from_slice(reply);
        self.send(buf)
    }

    fn send_ok(&self, cookie: u64) {
        self.send_bytes(&simple_reply(0, cookie))
    }

    fn send_error(&self, cookie: u64, errno: u32, msg: &str) {
        let mut buf = self.pool.get(64 + msg.len());
        if self.structured {
            encode_error_chunk(&mut buf, cookie, errno, msg);
        } else {
            buf.extend_from_slice(&simple_reply(errno, cookie));
        }
        self.send(buf)
    }

    async fn read(&self, req: Request) {
        let len = req.length as usize;
        if !self.structured {
            let (mut buf, start) = self.pool.get_aligned(SIMPLE_REPLY_LEN, len);
            let data = start + SIMPLE_REPLY_LEN;
            buf[start..data].copy_from_slice(&simple_reply(0, req.cookie));
            match self
                .backend
                .read(req.offset, &mut buf[data..data + len])
                .await
            {
                Ok(()) => self.send_part(buf, start..data + len),
                Err(e) => {
                    self.pool.put(buf);
                    self.send_error(req.cookie, errno_of(&e), &e.to_string())
                }
            }
            return;
        }
        if len == 0 {
            let mut buf = self.pool.get(STRUCTURED_HEADER_LEN);
            encode_chunk_header(&mut buf, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0);
            return self.send(buf);
        }
        if req.flags & CMD_FLAG_DF == 0 && self.read_in_one_chunk(req).await {
            return;
        }
        let runs = if req.flags & CMD_FLAG_DF != 0 {
            vec![(len as u64, false)]
        } else {
            self.read_runs(req.offset, len as u64).await
        };
        let mut pos = req.offset;
        let count = runs.len();
        for (i, (run_len, zero)) in runs.into_iter().enumerate() {
            let flags = if i + 1 == count { REPLY_FLAG_DONE } else { 0 };
            if zero {
                if let Err(e) = self.backend.read_hole(pos, run_len).await {
                    return self.send_error(req.cookie, errno_of(&e), &e.to_string());
                }
                self.send_bytes(&hole_chunk(flags, req.cookie, pos, run_len as u32));
            } else {
                let n = run_len as usize;
                let head = DATA_CHUNK_HEAD_LEN;
                let (mut buf, start) = self.pool.get_aligned(head, n);
                let data = start + head;
                buf[start..data].copy_from_slice(&data_chunk_head(flags, req.cookie, pos, n));
                if let Err(e) = self.backend.read(pos, &mut buf[data..data + n]).await {
                    self.pool.put(buf);
                    return self.send_error(req.cookie, errno_of(&e), &e.to_string());
                }
                self.send_part(buf, start..data + n);
            }
            pos += run_len;
        }
    }

    /// Answers a structured read with one data or hole chunk when the backend can tell,
    /// while reading, whether the range reads as zeroes; false if it cannot (nothing sent).
    async fn read_in_one_chunk(&self, req: Request) -> bool {
        let len = req.length as usize;
        let (mut buf, start) = self.pool.get_aligned(DATA_CHUNK_HEAD_LEN, len);
        let data = start + DATA_CHUNK_HEAD_LEN;
        buf[start..data].copy_from_slice(&data_chunk_head(
            REPLY_FLAG_DONE,
            req.cookie,
            req.offset,
            len,
        ));
        match self
            .backend
            .read_or_zero(req.offset, &mut buf[data..data + len])
            .await
        {
            Ok(None) => {
                self.pool.put(buf);
                return false;
            }
            Ok(Some(false)) => self.send_part(buf, start..data + len),
            Ok(Some(true)) => {
                self.pool.put(buf);
                self.send_bytes(&hole_chunk(
                    REPLY_FLAG_DONE,
                    req.cookie,
                    req.offset,
                    req.length,
                ));
            }
            Err(e) => {
                self.pool.put(buf);
                self.send_error(req.cookie, errno_of(&e), &e.to_string());
            }
        }
        true
    }

    /// Splits a read into runs of data and zeroes using the backend's `base:allocation`
    /// status; anything it cannot tell is read as data.
    async fn read_runs(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let extents = self
            .backend
            .block_status(&MetaContext::BaseAllocation, offset, len)
            .await
            .unwrap_or_default();
        let mut covered = 0u64;
        for e in extents {
            if covered >= len || e.length == 0 {
                break;
            }
            let l = e.length.min(len - covered);
            let zero = e.flags & STATE_ZERO != 0;
            match runs.last_mut() {
                Some((rl, z)) if *z == zero => *rl += l,
                _ => runs.push((l, zero)),
            }
            covered += l;
        }
        if covered < len {
            match runs.last_mut() {
                Some((rl, false)) => *rl += len - covered,
                _ => runs.push((len - covered, false)),
            }
        }
        runs
    }

    async fn block_status(&self, req: Request) {
        let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
        let mut buf = self.pool.get(256);
        let count = self.contexts.len();
        for (i, (id, ctx)) in self.contexts.iter().enumerate() {
            let extents = match self
                .backend
                .block_status(ctx, req.offset, req.length as u64)
                .await
            {
                Ok(e) => wire_extents(&e, req.length, req_one),
                Err(e) => {
                    buf.clear();
                    self.pool.put(buf);
                    return self.send_error(req.cookie, errno_of(&e), &e.to_string());
                }
            };
            if extents.is_empty() {
                self.pool.put(buf);
                return self.send_error(req.cookie, EIO, "block status returned no extent");
            }
            let flags = if i + 1 == count { REPLY_FLAG_DONE } else { 0 };
            let plen = 4 + 8 * extents.len() as u32;
            encode_chunk_header(&mut buf, flags, REPLY_TYPE_BLOCK_STATUS, req.cookie, plen);
            buf.extend_from_slice(&id.to_be_bytes());
            for (l, f) in extents {
                buf.extend_from_slice(&l.to_be_bytes());
                buf.extend_from_slice(&f.to_be_bytes());
            }
        }
        self.send(buf);
    }
}

/// Length of an `OFFSET_DATA` chunk's header and offset, which precede its data.
const DATA_CHUNK_HEAD_LEN: usize = STRUCTURED_HEADER_LEN + 8;

/// The header and offset of an `OFFSET_DATA` chunk carrying `len` bytes read at `offset`.
fn data_chunk_head(flags: u16, cookie: u64, offset: u64, len: usize) -> [u8; DATA_CHUNK_HEAD_LEN] {
    let mut h = [0; DATA_CHUNK_HEAD_LEN];
    h[..STRUCTURED_HEADER_LEN].copy_from_slice(&chunk_header(
        flags,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        8 + len as u32,
    ));
    h[STRUCTURED_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    h
}

/// Length of an `OFFSET_HOLE` chunk: header, offset and length.
const HOLE_CHUNK_LEN: usize = STRUCTURED_HEADER_LEN + 12;

/// An `OFFSET_HOLE` chunk for the `len` bytes at `offset`.
fn hole_chunk(flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; HOLE_CHUNK_LEN] {
    let mut c = [0; HOLE_CHUNK_LEN];
    c[..STRUCTURED_HEADER_LEN].copy_from_slice(&chunk_header(
        flags,
        REPLY_TYPE_OFFSET_HOLE,
        cookie,
        12,
    ));
    c[STRUCTURED_HEADER_LEN..STRUCTURED_HEADER_LEN + 8].copy_from_slice(&offset.to_be_bytes());
    c[STRUCTURED_HEADER_LEN + 8..].copy_from_slice(&len.to_be_bytes());
    c
}

/// Clips backend extents to the request, merges equal neighbours and drops empty ones.
fn wire_extents(extents: &[StatusExtent], len: u32, req_one: bool) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = len;
    for e in extents {
        if left == 0 {
            break;
        }
        let l = e.length.min(left as u64) as u32;
        if l == 0 {
            continue;
        }
        match out.last_mut() {
            Some((ol, of)) if *of == e.flags => *ol += l,
            _ => out.push((l, e.flags)),
        }
        left -= l;
    }
    if req_one {
        out.truncate(1);
    }
    out
}

/// Reusable buffers of one connection (single-threaded, hence `RefCell`).
///
/// Small buffers hold replies encoded by appending and are handed out empty. Data buffers
/// (read replies, write payloads) keep the bytes of their last use: every byte that is
/// sent or written is first filled by the backend or the socket, so zeroing a megabyte
/// before each read would be wasted work (it was a fifth of the CPU of 1 MiB reads).
/// The stale bytes only ever come from this same connection.
#[derive(Default)]
struct BufPool {
    small: RefCell<Vec<Vec<u8>>>,
    data: RefCell<Vec<Vec<u8>>>,
}

impl BufPool {
    /// An empty buffer with room for `cap` bytes.
    fn get(&self, cap: usize) -> Vec<u8> {
        let mut small = self.small.borrow_mut();
        match small.iter().position(|b| b.capacity() >= cap) {
            Some(i) => {
                let mut buf = small.swap_remove(i);
                buf.clear();
                buf
            }
            None => Vec::with_capacity(cap),
        }
    }

    /// A buffer of at least `pad + head + len` bytes, where `pad` (returned with it) puts
    /// the `len` data bytes after the `head` bytes on a `DATA_ALIGN` boundary. The bytes'
    /// contents are unspecified.
    fn get_aligned(&self, head: usize, len: usize) -> (Vec<u8>, usize) {
        let cap = DATA_ALIGN + head + len;
        let mut buf = {
            let mut data = self.data.borrow_mut();
            match data.iter().position(|b| b.capacity() >= cap) {
                Some(i) => data.swap_remove(i),
                None => Vec::with_capacity(cap),
            }
        };
        let at = buf.as_ptr() as usize + head;
        let pad = at.next_multiple_of(DATA_ALIGN) - at;
        let end = pad + head + len;
        if buf.len() < end {
            // Within the capacity, so the buffer does not move; only never-used bytes
            // are zeroed.
            buf.resize(end, 0);
        }
        (buf, pad)
    }

    fn put(&self, buf: Vec<u8>) {
        if buf.capacity() > POOL_MAX_BUF {
            return;
        }
        let held_by = |list: &RefCell<Vec<Vec<u8>>>| -> usize {
            list.borrow().iter().map(Vec::capacity).sum()
        };
        let held = held_by(&self.small) + held_by(&self.data);
        if held + buf.capacity() > POOL_MAX_BYTES {
            return;
        }
        let list = if buf.capacity() >= DATA_ALIGN {
            &self.data
        } else {
            &self.small
        };
        list.borrow_mut().push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(length: u64, flags: u32) -> StatusExtent {
        StatusExtent { length, flags }
    }

    #[test]
    fn extents_are_clipped_and_merged() {
        let e = [ext(100, 1), ext(50, 1), ext(0, 2), ext(1000, 2)];
        assert_eq!(wire_extents(&e, 400, false), vec![(150, 1), (250, 2)]);
        assert_eq!(wire_extents(&e, 400, true), vec![(150, 1)]);
        assert_eq!(wire_extents(&[], 10, false), vec![]);
        assert_eq!(
            wire_extents(&[ext(u64::MAX, 3)], u32::MAX, false),
            vec![(u32::MAX, 3)]
        );
    }

    /// Accepts at most `step` bytes per call, as a full socket buffer does.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let this = self.get_mut();
            let n = buf.len().min(this.step);
            this.out.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<io::Result<usize>> {
            let this = self.get_mut();
            let mut left = this.step;
            for b in bufs {
                let n = b.len().min(left);
                this.out.extend_from_slice(&b[..n]);
                left -= n;
            }
            std::task::Poll::Ready(Ok(this.step - left))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn batches_survive_partial_writes_in_order() {
        let replies: Vec<(Vec<u8>, Range<usize>)> = vec![
            (b"xxABCzz".to_vec(), 2..5),
            (b"".to_vec(), 0..0),
            (b"DEFGHIJ".to_vec(), 0..7),
            (b"yK".to_vec(), 1..2),
        ];
        let permits = Arc::new(Semaphore::new(1));
        for step in [1, 2, 3, 5, 100] {
            let mut batch: Vec<Queued> = replies
                .iter()
                .map(|(b, r)| Queued::Reply(b.clone(), r.clone()))
                .collect();
            batch.insert(
                2,
                Queued::Release {
                    _budget: permits.clone().try_acquire_owned().unwrap(),
                },
            );
            let mut w = Trickle {
                out: Vec::new(),
                step,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(send_batch(&mut w, &batch)).unwrap();
            assert_eq!(w.out, b"ABCDEFGHIJK", "step {step}");
        }
    }

    #[test]
    fn pool_reuses_and_bounds() {
        let p = BufPool::default();
        let b = p.get(1000);
        let cap = b.capacity();
        p.put(b);
        let again = p.get(10);
        assert_eq!(again.capacity(), cap);
        p.put(Vec::with_capacity(POOL_MAX_BUF + 1));
        assert!(p.small.borrow().is_empty() && p.data.borrow().is_empty());
    }

    #[test]
    fn aligned_buffers_put_the_data_on_a_page_boundary_and_keep_their_bytes() {
        let p = BufPool::default();
        for (head, len) in [(0, 4096), (16, 1 << 20), (28, 512), (28, 4 << 20)] {
            for round in 0..2u8 {
                let (mut buf, pad) = p.get_aligned(head, len);
                assert!(buf.len() >= pad + head + len);
                assert_eq!((buf.as_ptr() as usize + pad + head) % DATA_ALIGN, 0);
                let data = pad + head..pad + head + len;
                if round == 1 {
                    assert!(
                        buf[data.clone()].iter().all(|&b| b == 7),
                        "bytes were reset"
                    );
                }
                buf[data].fill(7);
                p.put(buf);
            }
        }
        assert!(!p.data.borrow().is_empty());
        let small = p.get(10);
        assert!(small.is_empty() && small.capacity() < DATA_ALIGN);
    }
}
