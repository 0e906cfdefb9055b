//! Plays an NBD server made of fuzz input against `nbd::Client` over a Unix socket, because everything a server sends (handshake, option replies, simple replies, structured-reply chunks) is untrusted input to the client.
//!
//! Input layout: a 23-byte parameter block (see `Params::parse`), then the server's bytes.
//! The first byte picks a mode:
//! - 0, raw: the server sends the rest of the input verbatim from the first byte of the
//!   greeting (reaches the handshake and option-haggling parsers).
//! - 1, framed: the server plays a valid fixed-newstyle handshake (structured replies,
//!   `base:allocation`, NBD_OPT_GO or the NBD_OPT_EXPORT_NAME fallback, chosen by
//!   parameter bits), waits for the client's read / block status / flush requests, then
//!   turns the rest of the input into replies: each one a selector byte (which request's
//!   cookie, simple or structured), then the header fields and payload from the input,
//!   with the magic and cookie filled in so the fuzzer need not guess them.
//! - 2, structured raw: the same valid handshake, then the rest of the input verbatim.
//!
//! Each input runs on its own current-thread runtime and `LocalSet` with a 1 s timeout;
//! the runtime, the socket pair and the temporary directory are dropped before the next
//! input. A timeout is not a crash: it is logged to stderr, or made a panic when
//! `NBD_FUZZ_PANIC_ON_TIMEOUT` is set (to minimize a hang with `cargo fuzz tmin`).
#![no_main]

use std::cell::Cell;
use std::io;
use std::path::PathBuf;
use std::sync::{Once, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nbd::proto::*;
use nbd::{Client, ClientOptions, ConnectAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;

const EXPORT_SIZE: u64 = 1 << 20;
/// Framed mode stops producing replies past this many bytes (simple read replies are
/// padded to the request length).
const MAX_OUTPUT: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(1);

/// A cursor that yields zeros once the input runs out.
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let h = self.take(N);
        a[..h.len()].copy_from_slice(h);
        a
    }
    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.array())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.array())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.array())
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Clone, Copy, Debug)]
struct Params {
    mode: u8,
    no_zeroes: bool,
    refuse_structured: bool,
    send_block_size: bool,
    refuse_contexts: bool,
    go_unsupported: bool,
    transmission_flags: u16,
    context_id: u32,
    block_max: u32,
    read_off: u16,
    read_len: u16,
    status_off: u16,
    status_len: u32,
    req_one: bool,
    flush: bool,
}

impl Params {
    fn parse(b: &mut Bytes) -> Params {
        let mode = b.u8() % 3;
        let hs = b.u8();
        Params {
            mode,
            no_zeroes: hs & 1 != 0,
            refuse_structured: hs & 2 != 0,
            send_block_size: hs & 4 != 0,
            refuse_contexts: hs & 8 != 0,
            go_unsupported: hs & 16 != 0,
            transmission_flags: b.u16(),
            context_id: b.u32(),
            block_max: b.u32(),
            read_off: b.u16(),
            read_len: b.u16(),
            status_off: b.u16(),
            status_len: b.u32(),
            req_one: b.0.first().is_some_and(|r| r & 1 != 0),
            flush: b.u8() & 2 != 0,
        }
    }
}

/// What the client side actually asked for, so the server reads exactly those requests.
#[derive(Clone, Copy, Debug, Default)]
struct Expected {
    read_len: u64,
    status: bool,
    flush: bool,
}

fn protocol(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

async fn read_option(s: &mut UnixStream) -> io::Result<(u32, Vec<u8>)> {
    if s.read_u64().await? != IHAVEOPT {
        return Err(protocol("client option without IHAVEOPT"));
    }
    let option = s.read_u32().await?;
    let len = s.read_u32().await?;
    if len > 64 * 1024 {
        return Err(protocol("client option too long"));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).await?;
    Ok((option, data))
}

/// A valid fixed-newstyle handshake, shaped by the parameter bits.
async fn handshake(s: &mut UnixStream, p: &Params) -> io::Result<()> {
    let mut out = Vec::new();
    out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    let hs = FLAG_FIXED_NEWSTYLE | if p.no_zeroes { FLAG_NO_ZEROES } else { 0 };
    out.extend_from_slice(&hs.to_be_bytes());
    s.write_all(&out).await?;
    let _client_flags = s.read_u32().await?;
    loop {
        let (option, _data) = read_option(s).await?;
        let mut out = Vec::new();
        match option {
            OPT_STRUCTURED_REPLY => {
                let reply = if p.refuse_structured {
                    REP_ERR_UNSUP
                } else {
                    REP_ACK
                };
                encode_option_reply(&mut out, option, reply, &[]);
            }
            OPT_SET_META_CONTEXT => {
                if p.refuse_contexts {
                    encode_option_reply(&mut out, option, REP_ERR_UNSUP, b"no contexts");
                } else {
                    let mut d = p.context_id.to_be_bytes().to_vec();
                    d.extend_from_slice(CONTEXT_BASE_ALLOCATION.as_bytes());
                    encode_option_reply(&mut out, option, REP_META_CONTEXT, &d);
                    encode_option_reply(&mut out, option, REP_ACK, &[]);
                }
            }
            OPT_GO if p.go_unsupported => {
                encode_option_reply(&mut out, option, REP_ERR_UNSUP, &[]);
            }
            OPT_GO => {
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&EXPORT_SIZE.to_be_bytes());
                d.extend_from_slice(&p.transmission_flags.to_be_bytes());
                encode_option_reply(&mut out, option, REP_INFO, &d);
                if p.send_block_size {
                    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    d.extend_from_slice(&1u32.to_be_bytes());
                    d.extend_from_slice(&4096u32.to_be_bytes());
                    d.extend_from_slice(&p.block_max.to_be_bytes());
                    encode_option_reply(&mut out, option, REP_INFO, &d);
                }
                encode_option_reply(&mut out, option, REP_ACK, &[]);
                s.write_all(&out).await?;
                return Ok(());
            }
            OPT_EXPORT_NAME => {
                out.extend_from_slice(&EXPORT_SIZE.to_be_bytes());
                out.extend_from_slice(&p.transmission_flags.to_be_bytes());
                if !p.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&out).await?;
                return Ok(());
            }
            _ => return Err(protocol("unexpected option")),
        }
        s.write_all(&out).await?;
    }
}

/// Reads the request headers the client sent for what it announced.
async fn read_requests(s: &mut UnixStream, e: Expected) -> io::Result<Vec<Request>> {
    let mut reqs = Vec::new();
    let (mut read, mut status, mut flush) = (0u64, false, false);
    while read < e.read_len || (e.status && !status) || (e.flush && !flush) {
        let mut h = [0u8; REQUEST_HEADER_LEN];
        s.read_exact(&mut h).await?;
        let req = Request::parse(&h).ok_or_else(|| protocol("bad request magic"))?;
        match req.kind {
            CMD_READ => read += req.length as u64,
            CMD_BLOCK_STATUS => status = true,
            CMD_FLUSH => flush = true,
            _ => return Err(protocol("unexpected request")),
        }
        reqs.push(req);
    }
    Ok(reqs)
}

/// Turns the input into replies to `reqs`, filling in magic and cookie.
fn framed_replies(mut b: Bytes, reqs: &[Request]) -> Vec<u8> {
    let mut out = Vec::new();
    while !b.is_empty() && out.len() < MAX_OUTPUT {
        let sel = b.u8();
        let req = (!reqs.is_empty()).then(|| reqs[(sel & 0x3f) as usize % reqs.len()]);
        let cookie = match req {
            Some(r) if sel & 0x40 == 0 => r.cookie,
            _ => b.u64(),
        };
        if sel & 0x80 != 0 {
            let errno = b.u32();
            out.extend_from_slice(&simple_reply(errno, cookie));
            if let Some(r) = req.filter(|r| errno == 0 && r.kind == CMD_READ && r.cookie == cookie)
            {
                let data = b.take(r.length as usize);
                out.extend_from_slice(data);
                out.resize(out.len() + (r.length as usize - data.len()), 0);
            }
        } else {
            let flags = b.u16();
            let kind = b.u16();
            let length = b.u32();
            encode_chunk_header(&mut out, flags, kind, cookie, length);
            out.extend_from_slice(b.take(length as usize));
        }
    }
    out
}

async fn serve(
    listener: UnixListener,
    p: Params,
    rest: &[u8],
    expected: oneshot::Receiver<Expected>,
) -> io::Result<()> {
    let (mut s, _) = listener.accept().await?;
    drop(listener);
    let out = if p.mode == 0 {
        rest.to_vec()
    } else {
        handshake(&mut s, &p).await?;
        let reqs = match expected.await {
            Ok(e) => read_requests(&mut s, e).await?,
            Err(_) => return Ok(()), // the client refused the handshake
        };
        if p.mode == 1 {
            framed_replies(Bytes(rest), &reqs)
        } else {
            rest.to_vec()
        }
    };
    // The client may already have given up: keep going to the drain either way.
    let _ = s.write_all(&out).await;
    let _ = s.shutdown().await;
    let mut sink = [0u8; 4096];
    while let Ok(n) = s.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
    Ok(())
}

async fn run_client(path: PathBuf, p: Params, expected: oneshot::Sender<Expected>) {
    let opts = ClientOptions::default();
    let client = match Client::connect(&ConnectAddr::Unix(path), "fuzz", &opts).await {
        Ok(client) => client,
        Err(e) => {
            debug(format_args!("connect: {e}"));
            return;
        }
    };
    let size = client.size();
    let _ = (
        client.flags(),
        client.is_read_only(),
        client.structured_replies(),
    );
    let _ = (
        client.block_size(),
        client.meta_context_id(CONTEXT_BASE_ALLOCATION),
    );
    let read_off = (p.read_off as u64).min(size);
    let read_len = (p.read_len as u64).min(size - read_off);
    let status_off = (p.status_off as u64).min(size);
    let status_len = (p.status_len as u64).min(size - status_off);
    let e = Expected {
        read_len,
        status: !client.meta_contexts().is_empty(),
        flush: p.flush && client.flags() & FLAG_SEND_FLUSH != 0,
    };
    let _ = expected.send(e);
    let mut buf = vec![0u8; read_len as usize];
    let (read, status, flush) = tokio::join!(
        client.read(read_off, &mut buf),
        client.block_status(status_off, status_len, p.req_one),
        async {
            if e.flush {
                client.flush().await
            } else {
                Ok(())
            }
        }
    );
    debug(format_args!(
        "size {size} flags {:#x} structured {} contexts {:?} block size {:?}; {e:?}\n  read: {read:?}\n  status: {status:?}\n  flush: {flush:?}",
        client.flags(),
        client.structured_replies(),
        client.meta_contexts(),
        client.block_size(),
    ));
    if let Ok(contexts) = status {
        let total: u64 = contexts
            .iter()
            .flat_map(|(_, ext)| ext.iter())
            .fold(0u64, |a, x| a.saturating_add(x.length));
        std::hint::black_box(total);
    }
    let _ = client.disconnect().await;
}

/// `NBD_FUZZ_DEBUG=1` prints what the client made of each input (to check the harness).
fn debug(args: std::fmt::Arguments) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("NBD_FUZZ_DEBUG").is_some()) {
        eprintln!("nbd_client: {args}");
    }
}

fn one_input(data: &[u8]) {
    let mut b = Bytes(data);
    let p = Params::parse(&mut b);
    let rest = b.0;

    let dir = tempfile::Builder::new()
        .prefix("nbd-fuzz")
        .tempdir()
        .expect("temp dir");
    let path = dir.path().join("s");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    let timed_out = Cell::new(false);
    local.block_on(&rt, async {
        let listener = UnixListener::bind(&path).expect("bind");
        let (tx, rx) = oneshot::channel();
        let both = async {
            let _ = tokio::join!(
                serve(listener, p, rest, rx),
                run_client(path.clone(), p, tx)
            );
        };
        if tokio::time::timeout(TIMEOUT, both).await.is_err() {
            timed_out.set(true);
        }
    });
    // Tasks the client spawned go with the LocalSet, sockets with them, then the runtime.
    drop(local);
    drop(rt);
    drop(dir);
    if timed_out.get() {
        if std::env::var_os("NBD_FUZZ_PANIC_ON_TIMEOUT").is_some() {
            panic!("nbd_client: input timed out after {TIMEOUT:?}");
        }
        eprintln!(
            "nbd_client: input timed out after {TIMEOUT:?} (mode {})",
            p.mode
        );
    }
}

static IGNORE_SIGPIPE: Once = Once::new();

fuzz_target!(|data: &[u8]| {
    // libFuzzer's main, not Rust's, runs the process: writes to a closed socket must
    // fail with EPIPE as they do in the daemon, not kill the fuzzer.
    IGNORE_SIGPIPE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
    one_input(data);
});
