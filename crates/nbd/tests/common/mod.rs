//! Shared test fixtures: a sparse in-memory backend and a server running on its own
//! I/O thread with a unix socket in a temp dir.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nbd::proto::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use nbd::{
    Backend, Capabilities, ExportOptions, ListenAddr, MetaContext, NbdServer, ServerConfig,
    ServerEvent, StatusExtent, ThreadSpawner, ZeroFlags,
};

pub const CHUNK: u64 = 64 * 1024;

#[derive(Clone)]
enum Top {
    Data(Vec<u8>),
    Zero,
}

#[derive(Default)]
struct State {
    top: BTreeMap<u64, Top>,
    dirty: BTreeSet<u64>,
    flushes: u64,
}

/// A sparse disk: chunks written by clients form the top layer (depth 1); a fixed set
/// of "backing" chunks filled with `BACKING_BYTE` sits below (depth 2); the rest is a
/// hole (depth 0). Writes mark a dirty bitmap called `dirty`.
pub struct MemBackend {
    size: u64,
    backing: BTreeSet<u64>,
    state: Mutex<State>,
    caps: Capabilities,
    /// A read at this offset panics (a bug, for the server's panic boundary); MAX: none.
    panic_at: std::sync::atomic::AtomicU64,
}

pub const BACKING_BYTE: u8 = 0x11;

impl MemBackend {
    pub fn new(size: u64) -> Self {
        Self::with(size, BTreeSet::new(), Capabilities::default())
    }

    pub fn with(size: u64, backing: BTreeSet<u64>, caps: Capabilities) -> Self {
        MemBackend {
            size,
            backing,
            state: Mutex::new(State::default()),
            caps,
            panic_at: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }

    /// Make reads at `offset` panic.
    pub fn panic_on_read_at(&self, offset: u64) {
        self.panic_at
            .store(offset, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn flushes(&self) -> u64 {
        self.state.lock().unwrap().flushes
    }

    /// Reads the whole disk.
    pub fn contents(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size as usize];
        self.read_sync(0, &mut v);
        v
    }

    fn read_sync(&self, offset: u64, buf: &mut [u8]) {
        let st = self.state.lock().unwrap();
        let mut pos = offset;
        let mut done = 0usize;
        while done < buf.len() {
            let idx = pos / CHUNK;
            let within = (pos % CHUNK) as usize;
            let n = (CHUNK as usize - within).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match st.top.get(&idx) {
                Some(Top::Data(d)) => dst.copy_from_slice(&d[within..within + n]),
                Some(Top::Zero) => dst.fill(0),
                None if self.backing.contains(&idx) => dst.fill(BACKING_BYTE),
                None => dst.fill(0),
            }
            done += n;
            pos += n as u64;
        }
    }

    fn chunk_status(&self, st: &State, idx: u64, ctx: &MetaContext) -> u32 {
        match ctx {
            MetaContext::BaseAllocation => match st.top.get(&idx) {
                Some(Top::Data(_)) => 0,
                Some(Top::Zero) => STATE_ZERO,
                None if self.backing.contains(&idx) => 0,
                None => STATE_HOLE | STATE_ZERO,
            },
            MetaContext::AllocationDepth => {
                if st.top.contains_key(&idx) {
                    1
                } else if self.backing.contains(&idx) {
                    2
                } else {
                    0
                }
            }
            MetaContext::DirtyBitmap(_) => {
                if st.dirty.contains(&idx) {
                    STATE_DIRTY
                } else {
                    0
                }
            }
        }
    }

    /// The backend's own view of `ctx`, merged, for comparison with what clients see.
    pub fn status_map(&self, ctx: &MetaContext) -> Vec<(u64, u64, u32)> {
        let st = self.state.lock().unwrap();
        let mut out: Vec<(u64, u64, u32)> = Vec::new();
        let mut pos = 0;
        while pos < self.size {
            let idx = pos / CHUNK;
            let len = (CHUNK - pos % CHUNK).min(self.size - pos);
            let f = self.chunk_status(&st, idx, ctx);
            match out.last_mut() {
                Some((_, l, lf)) if *lf == f => *l += len,
                _ => out.push((pos, len, f)),
            }
            pos += len;
        }
        out
    }

    fn zero_range(&self, st: &mut State, offset: u64, len: u64, may_trim: bool) {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let idx = pos / CHUNK;
            let within = pos % CHUNK;
            let n = (CHUNK - within).min(end - pos);
            st.dirty.insert(idx);
            if n == CHUNK {
                if may_trim && !self.backing.contains(&idx) {
                    st.top.remove(&idx);
                } else {
                    st.top.insert(idx, Top::Zero);
                }
            } else {
                let data = self.materialize(st, idx);
                data[within as usize..(within + n) as usize].fill(0);
            }
            pos += n;
        }
    }

    fn materialize<'a>(&self, st: &'a mut State, idx: u64) -> &'a mut Vec<u8> {
        let fill = if self.backing.contains(&idx) {
            BACKING_BYTE
        } else {
            0
        };
        let entry = st
            .top
            .entry(idx)
            .or_insert_with(|| Top::Data(vec![fill; CHUNK as usize]));
        if let Top::Zero = entry {
            *entry = Top::Data(vec![0; CHUNK as usize]);
        }
        match entry {
            Top::Data(d) => d,
            Top::Zero => unreachable!("replaced above"),
        }
    }
}

#[async_trait(?Send)]
impl Backend for MemBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // Yield so that requests really overlap on the connection.
        tokio::task::yield_now().await;
        if offset == self.panic_at.load(std::sync::atomic::Ordering::Relaxed) {
            panic!("MemBackend asked to panic at {offset}");
        }
        self.read_sync(offset, buf);
        Ok(())
    }

    /// Like a qcow2 node: tells only for a range within one chunk.
    async fn read_or_zero(&self, offset: u64, buf: &mut [u8]) -> io::Result<Option<bool>> {
        let idx = offset / CHUNK;
        if (offset + buf.len() as u64).div_ceil(CHUNK) > idx + 1 {
            return Ok(None);
        }
        tokio::task::yield_now().await;
        self.read_sync(offset, buf);
        let st = self.state.lock().unwrap();
        let flags = self.chunk_status(&st, idx, &MetaContext::BaseAllocation);
        Ok(Some(flags & STATE_ZERO != 0))
    }

    async fn write(&self, offset: u64, buf: &[u8], _fua: bool) -> io::Result<()> {
        tokio::task::yield_now().await;
        let mut st = self.state.lock().unwrap();
        let mut pos = offset;
        let mut done = 0usize;
        while done < buf.len() {
            let idx = pos / CHUNK;
            let within = (pos % CHUNK) as usize;
            let n = (CHUNK as usize - within).min(buf.len() - done);
            st.dirty.insert(idx);
            let d = self.materialize(&mut st, idx);
            d[within..within + n].copy_from_slice(&buf[done..done + n]);
            done += n;
            pos += n as u64;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        self.zero_range(&mut st, offset, len, flags.may_trim);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        let first = offset.div_ceil(CHUNK);
        let end = (offset + len) / CHUNK;
        for idx in first..end {
            st.dirty.insert(idx);
            if self.backing.contains(&idx) {
                st.top.insert(idx, Top::Zero);
            } else {
                st.top.remove(&idx);
            }
        }
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        self.state.lock().unwrap().flushes += 1;
        Ok(())
    }

    async fn cache(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    async fn block_status(
        &self,
        context: &MetaContext,
        offset: u64,
        len: u64,
    ) -> io::Result<Vec<StatusExtent>> {
        let st = self.state.lock().unwrap();
        let mut out: Vec<StatusExtent> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let idx = pos / CHUNK;
            let n = (CHUNK - pos % CHUNK).min(end - pos);
            let flags = self.chunk_status(&st, idx, context);
            match out.last_mut() {
                Some(e) if e.flags == flags => e.length += n,
                _ => out.push(StatusExtent { length: n, flags }),
            }
            pos += n;
        }
        Ok(out)
    }
}

/// A running server with a temp dir for its socket and files.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub server: NbdServer,
    pub events: Arc<Mutex<Vec<ServerEvent>>>,
    _thread: Arc<ThreadSpawner>,
}

impl Fixture {
    pub fn new(max_connections: u32) -> Fixture {
        Self::with_config(ServerConfig {
            max_connections,
            ..ServerConfig::default()
        })
    }

    pub fn with_config(config: ServerConfig) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let thread = Arc::new(ThreadSpawner::start("nbd-test-io").unwrap());
        let server = NbdServer::new(thread.clone());
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        server.set_event_handler(move |e| ev.lock().unwrap().push(e));
        server
            .start(&ListenAddr::Unix(socket.clone()), config, None)
            .unwrap();
        Fixture {
            dir,
            socket,
            server,
            events,
            _thread: thread,
        }
    }

    /// Adds a writable export with allocation depth and a `dirty` bitmap.
    pub fn export(&self, name: &str, backend: Arc<MemBackend>) {
        self.server
            .add_export(
                name,
                Some("test disk"),
                backend,
                ExportOptions {
                    writable: true,
                    bitmaps: vec!["dirty".into()],
                    allocation_depth: true,
                },
            )
            .unwrap();
    }

    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.server.stop();
    }
}

/// Runs a command and returns its output, failing the test with its stderr on error.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Waits (bounded) for a condition that another thread makes true.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `f` on a fresh current-thread runtime inside a `LocalSet`.
pub fn local<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f)
}
