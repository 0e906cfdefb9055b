//! Plays an NBD client made of fuzz input against `nbd::NbdServer` over an in-memory
//! stream, because everything a client sends (flags, options, option data, request headers,
//! write payloads) is untrusted input to the server.
//!
//! Input layout: the first byte picks a mode, the rest is the client's bytes.
//! - even: raw, the rest goes to the server verbatim after the greeting (reaches the
//!   option haggling);
//! - odd: framed, a valid fixed-newstyle handshake (structured replies,
//!   `base:allocation`, NBD_OPT_GO on export "d") comes first, then the rest of the input
//!   verbatim as transmission requests.
//!
//! The export is 1 MiB of memory, writable, with `base:allocation`. Each input runs on its
//! own current-thread runtime and `LocalSet`; the server must end the session (or wait for
//! more) within 1 s of the client's end of stream, and the server's output is drained so
//! that replies never block it.
#![no_main]

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nbd::backend::{Backend, Capabilities, MetaContext, StatusExtent, ZeroFlags};
use nbd::proto::*;
use nbd::{ExportOptions, NbdServer, Spawner, Work};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(1);

struct Memory(Mutex<Vec<u8>>);

/// `serve_io` runs the session on the calling task; nothing is spawned elsewhere.
struct NoSpawner;

impl Spawner for NoSpawner {
    fn spawn(&self, _job: Work) {}
}

fn range(offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
    let end = offset.checked_add(len as u64).filter(|&e| e <= SIZE);
    match end {
        Some(end) => Ok(offset as usize..end as usize),
        // The server checks bounds before calling; reaching here would be its bug.
        None => panic!("request past the end reached the backend: {offset}+{len}"),
    }
}

#[async_trait::async_trait(?Send)]
impl Backend for Memory {
    fn size(&self) -> u64 {
        SIZE
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            multi_conn: true,
            cache: true,
            ..Capabilities::default()
        }
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = range(offset, buf.len())?;
        buf.copy_from_slice(&self.0.lock().unwrap()[r]);
        Ok(())
    }
    async fn write(&self, offset: u64, buf: &[u8], _fua: bool) -> io::Result<()> {
        let r = range(offset, buf.len())?;
        self.0.lock().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> io::Result<()> {
        let r = range(offset, len as usize)?;
        self.0.lock().unwrap()[r].fill(0);
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        range(offset, len as usize).map(|_| ())
    }
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        range(offset, len as usize).map(|_| ())
    }
    async fn block_status(
        &self,
        _context: &MetaContext,
        offset: u64,
        len: u64,
    ) -> io::Result<Vec<StatusExtent>> {
        range(offset, len as usize)?;
        // Alternating 64 KiB data and hole extents.
        let step = 64 * 1024;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < offset + len && out.len() < 64 {
            let next = ((pos / step) + 1) * step;
            let flags = if (pos / step) % 2 == 0 { 0 } else { STATE_HOLE | STATE_ZERO };
            out.push(StatusExtent {
                length: next.min(offset + len) - pos,
                flags,
            });
            pos = next;
        }
        Ok(out)
    }
}

fn option(out: &mut Vec<u8>, code: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn client_bytes(data: &[u8]) -> Vec<u8> {
    let Some((&mode, rest)) = data.split_first() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if mode % 2 == 1 {
        out.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        option(&mut out, OPT_STRUCTURED_REPLY, &[]);
        let mut meta = Vec::new();
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(b"d");
        meta.extend_from_slice(&1u32.to_be_bytes());
        let ctx = b"base:allocation";
        meta.extend_from_slice(&(ctx.len() as u32).to_be_bytes());
        meta.extend_from_slice(ctx);
        option(&mut out, OPT_SET_META_CONTEXT, &meta);
        let mut go = Vec::new();
        go.extend_from_slice(&1u32.to_be_bytes());
        go.extend_from_slice(b"d");
        go.extend_from_slice(&0u16.to_be_bytes());
        option(&mut out, OPT_GO, &go);
    }
    out.extend_from_slice(rest);
    out
}

fuzz_target!(|data: &[u8]| {
    let input = client_bytes(data);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let server = NbdServer::new(Arc::new(NoSpawner));
        let memory = Arc::new(Memory(Mutex::new(vec![0u8; SIZE as usize])));
        server
            .add_export(
                "d",
                Some("fuzzed"),
                memory,
                ExportOptions {
                    writable: true,
                    ..ExportOptions::default()
                },
            )
            .unwrap();
        let (client, server_side) = tokio::io::duplex(1 << 16);
        let (server_read, server_write) = tokio::io::split(server_side);
        let serving = tokio::task::spawn_local(async move {
            server.serve_io(server_read, server_write).await;
        });
        let (mut client_read, mut client_write) = tokio::io::split(client);
        // Drain the server's output so that its replies never block it.
        let drain = tokio::task::spawn_local(async move {
            let mut sink = vec![0u8; 1 << 16];
            while let Ok(n) = client_read.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        });
        let _ = client_write.write_all(&input).await;
        let _ = client_write.shutdown().await;
        // A session the client ended must end too; one still waiting for a request it
        // will never get is a hang only if it outlives the timeout by far.
        if tokio::time::timeout(TIMEOUT, serving).await.is_err() {
            eprintln!("nbd_server: session still running {TIMEOUT:?} after the client's end");
        }
        drain.abort();
    });
});
