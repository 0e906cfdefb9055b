//! `quorum`: the same disk on several children, kept alike and voted on (QEMU's quorum).
//!
//! Writes, zero writes, discards and flushes go to every child and succeed when at least
//! `vote-threshold` children succeed; each child that fails is reported (QUORUM_REPORT_BAD
//! with its error). Reads, with `read-pattern: quorum`, read every child and vote: the
//! version most children returned wins if at least `vote-threshold` returned it, children
//! that returned another version are reported (and, with `rewrite-corrupted`, given the
//! winning data); without such a majority the read fails and QUORUM_FAILURE says where.
//! With `read-pattern: fifo` the first child that reads successfully answers.
//!
//! `blkverify: true` (two children, threshold 2) makes any difference an error; QEMU ends
//! the process there, blockd fails the read with EIO and logs it, as its blkverify does.
//!
//! x-blockdev-change adds children (named `children.N`, N counting on) and removes them
//! while at least `vote-threshold` stay. Requests load the list once, so one that was under
//! way when the list changed finishes on the children it started with.

use crate::graph::EventHook;
use crate::node::{Child, DriverInfo, Extent, ExtentKind, Node, Parent, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use futures::future::join_all;
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Reads are voted on in pieces of at most this many bytes (one buffer per child).
const CHUNK: usize = 1 << 20;

pub struct Quorum {
    children: ArcSwap<Vec<Arc<Child>>>,
    /// The index the next added child's role gets.
    next_index: AtomicUsize,
    threshold: usize,
    blkverify: bool,
    rewrite_corrupted: bool,
    fifo: bool,
    events: Option<EventHook>,
    /// When each (event, node) last went out, for [`Quorum::emit`]'s limit.
    last_events: Mutex<HashMap<(String, String), Instant>>,
}

/// At most one QUORUM_* event per node and this interval (QEMU's monitor limit).
const EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// QUORUM_REPORT_BAD's `type`.
#[derive(Clone, Copy)]
enum Op {
    Read,
    Write,
    Flush,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
        }
    }
}

/// The sectors an event names: QEMU counts in 512-byte sectors, rounding the end up.
fn sectors(offset: u64, len: u64) -> (u64, u64) {
    let start = offset / 512;
    (start, (offset + len).div_ceil(512) - start)
}

impl Quorum {
    /// Sends an event, at most one a second per event and `key` (as QEMU's monitor limits
    /// these two): a guest that keeps reading a bad range must not flood the monitor.
    fn emit(&self, name: &str, key: &str, data: Value) {
        let Some(hook) = &self.events else {
            return;
        };
        let now = Instant::now();
        {
            let mut last = self.last_events.lock().unwrap();
            let key = (name.to_owned(), key.to_owned());
            if let Some(then) = last.get(&key) {
                if now.duration_since(*then) < EVENT_INTERVAL {
                    tracing::debug!("quorum: {} for '{}' held back: {data}", key.0, key.1);
                    return;
                }
            }
            last.insert(key, now);
        }
        hook(name, data);
    }

    fn report(&self, op: Op, child: &Child, offset: u64, len: u64, error: Option<String>) {
        let (sector, count) = sectors(offset, len);
        let name = child.node().name().to_owned();
        let mut data = json!({
            "type": op.as_str(),
            "node-name": name,
            "sector-num": sector,
            "sectors-count": count,
        });
        if let Some(e) = error {
            data["error"] = json!(e);
        }
        self.emit("QUORUM_REPORT_BAD", &name, data);
    }

    fn report_failure(&self, node: &Node, offset: u64, len: u64) {
        let (sector, count) = sectors(offset, len);
        self.emit(
            "QUORUM_FAILURE",
            "",
            json!({"reference": node.name(), "sector-num": sector, "sectors-count": count}),
        );
    }

    /// Runs `request` on every child at once; succeeds when `vote-threshold` of them did,
    /// reporting each child that failed.
    async fn on_all<'a, F, Fut>(
        &'a self,
        node: &Node,
        op: Op,
        offset: u64,
        len: u64,
        request: F,
    ) -> io::Result<()>
    where
        F: Fn(Arc<Child>) -> Fut,
        Fut: Future<Output = io::Result<()>> + 'a,
    {
        let children = self.children.load_full();
        let results = join_all(children.iter().cloned().map(&request)).await;
        let mut first_error = None;
        let mut succeeded = 0;
        for (child, result) in children.iter().zip(results) {
            match result {
                Ok(()) => succeeded += 1,
                Err(e) => {
                    let text = crate::drivers::file::os_error_text(&e);
                    self.report(op, child, offset, len, Some(text));
                    first_error.get_or_insert(e);
                }
            }
        }
        if succeeded >= self.threshold {
            return Ok(());
        }
        if !matches!(op, Op::Flush) {
            self.report_failure(node, offset, len);
        }
        Err(first_error.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EIO)))
    }

    /// One piece of a voted read into `buf`; what went wrong is noted in `bad` (by child
    /// index, with the error if its read failed), to be reported once for the request.
    async fn vote(
        &self,
        children: &[Arc<Child>],
        offset: u64,
        buf: &mut [u8],
        bad: &mut BTreeMap<usize, Option<String>>,
    ) -> io::Result<()> {
        let len = buf.len() as u64;
        let mut copies = Vec::with_capacity(children.len());
        for _ in children.iter() {
            copies.push(aio::pool::PoolBuf::new(buf.len(), 1)?);
        }
        let results = join_all(
            children
                .iter()
                .zip(copies.iter_mut())
                .map(|(child, copy)| child.read(offset, copy.as_mut_slice())),
        )
        .await;
        // Children that answered, by index; each group of identical versions, by index.
        let mut answered = Vec::new();
        let mut first_error = None;
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(()) => answered.push(i),
                Err(e) => {
                    bad.entry(i)
                        .or_insert_with(|| Some(crate::drivers::file::os_error_text(&e)));
                    first_error.get_or_insert(e);
                }
            }
        }
        if answered.len() < self.threshold {
            return Err(first_error.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EIO)));
        }
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for &i in &answered {
            let same = groups
                .iter_mut()
                .find(|g| copies[g[0]].as_slice() == copies[i].as_slice());
            match same {
                Some(group) => group.push(i),
                None => groups.push(vec![i]),
            }
        }
        if self.blkverify && groups.len() > 1 {
            let (a, b) = (
                copies[groups[0][0]].as_slice(),
                copies[groups[1][0]].as_slice(),
            );
            let at = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0);
            tracing::error!(
                "quorum: offset={offset} bytes={len} contents mismatch at offset {}",
                offset + at as u64
            );
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        // The largest group wins; of equal ones, the first child's.
        let winner = groups
            .iter()
            .enumerate()
            .max_by_key(|(index, g)| (g.len(), std::cmp::Reverse(*index)))
            .map(|(index, _)| index)
            .unwrap_or(0);
        if groups[winner].len() < self.threshold {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let data = copies[groups[winner][0]].as_slice();
        buf.copy_from_slice(data);
        for (index, group) in groups.iter().enumerate() {
            if index == winner {
                continue;
            }
            for &i in group {
                let child = &children[i];
                bad.entry(i).or_insert(None);
                if self.rewrite_corrupted {
                    if let Err(e) = child.write(offset, data, WriteFlags::default()).await {
                        tracing::warn!(
                            node = child.node().name(),
                            "quorum: rewriting a corrupted range failed: {e}"
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

#[async_trait(?Send)]
impl Driver for Quorum {
    fn format_name(&self) -> &'static str {
        "quorum"
    }

    fn size(&self, _: &Node) -> u64 {
        self.children.load().first().map_or(0, |c| c.node().size())
    }

    async fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.fifo {
            let len = buf.len() as u64;
            let mut last_error = None;
            for child in self.children.load_full().iter() {
                match child.read(offset, buf).await {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        let text = crate::drivers::file::os_error_text(&e);
                        self.report(Op::Read, child, offset, len, Some(text));
                        last_error = Some(e);
                    }
                }
            }
            return Err(last_error.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EIO)));
        }
        let len = buf.len() as u64;
        let children = self.children.load_full();
        let mut bad = BTreeMap::new();
        let mut result = Ok(());
        for (i, piece) in buf.chunks_mut(CHUNK).enumerate() {
            result = self
                .vote(&children, offset + (i * CHUNK) as u64, piece, &mut bad)
                .await;
            if result.is_err() {
                break;
            }
        }
        // Reported per request, as QEMU does, not per piece.
        for (i, error) in bad {
            self.report(Op::Read, &children[i], offset, len, error);
        }
        if result.is_err() {
            self.report_failure(node, offset, len);
        }
        result
    }

    async fn write(
        &self,
        node: &Node,
        offset: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> io::Result<()> {
        self.on_all(
            node,
            Op::Write,
            offset,
            buf.len() as u64,
            |child| async move { child.write(offset, buf, flags).await },
        )
        .await
    }

    async fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        self.on_all(node, Op::Write, offset, len, |child| async move {
            child.write_zeroes(offset, len, flags).await
        })
        .await
    }

    async fn discard(&self, node: &Node, offset: u64, len: u64) -> io::Result<()> {
        self.on_all(node, Op::Write, offset, len, |child| async move {
            child.discard(offset, len).await
        })
        .await
    }

    async fn flush(&self, node: &Node) -> io::Result<()> {
        self.on_all(
            node,
            Op::Flush,
            0,
            0,
            |child| async move { child.flush().await },
        )
        .await
    }

    /// QEMU's quorum gives no allocation status: everything is data.
    async fn block_status(&self, node: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        Ok(Extent {
            len: self.size(node).saturating_sub(offset).min(len),
            kind: ExtentKind::Data,
        })
    }

    async fn truncate(&self, _: &Node, _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    /// Nobody else may write to or resize a child: the copies would drift apart unseen.
    /// With `rewrite-corrupted` the quorum itself writes, even for readers.
    fn child_perms(&self, _: &str, perm: Perms, _: Perms, _: bool) -> (Perms, Perms) {
        let perm = if self.rewrite_corrupted {
            perm | Perms::WRITE
        } else {
            perm
        };
        (perm, Perms::CONSISTENT_READ | Perms::WRITE_UNCHANGED)
    }

    fn info(&self, node: &Node) -> DriverInfo {
        DriverInfo {
            filename: crate::graph::json_filename(node, ""),
            ..DriverInfo::default()
        }
    }

    async fn add_child(&self, node: &Arc<Node>, child: &Arc<Node>) -> Result<(), String> {
        if !child.parents().is_empty() {
            return Err(format!("The node {} already has a parent", child.name()));
        }
        if self.blkverify {
            return Err("Cannot add a child to a quorum in blkverify mode".into());
        }
        let size = node.size();
        if child.size() != size {
            return Err(format!(
                "The node {} has {} bytes, the quorum's children {size}",
                child.name(),
                child.size()
            ));
        }
        let role = format!("children.{}", self.next_index.load(Ordering::Acquire));
        let (perm, shared) = node.cumulative_perms();
        let (perm, shared) = self.child_perms(&role, perm, shared, false);
        let edge = Node::attach(
            child,
            &role,
            Parent::Node(node.name().to_owned()),
            perm,
            shared,
        )?;
        node.add_child(edge.clone());
        let mut children = Vec::clone(&self.children.load());
        children.push(edge);
        self.children.store(Arc::new(children));
        self.next_index.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    async fn remove_child(&self, node: &Arc<Node>, role: &str) -> Result<(), String> {
        let children = self.children.load_full();
        if children.len() <= self.threshold {
            return Err(format!(
                "The number of children cannot be lower than the vote threshold {}",
                self.threshold
            ));
        }
        let kept: Vec<Arc<Child>> = children
            .iter()
            .filter(|c| c.role() != role)
            .cloned()
            .collect();
        self.children.store(Arc::new(kept));
        // The edge is let go below only once this list no longer holds it.
        drop(children);
        // As QEMU: the last index added is given out again once its child is gone.
        let index = self.next_index.load(Ordering::Acquire);
        if index > 0 && role == format!("children.{}", index - 1) {
            self.next_index.store(index - 1, Ordering::Release);
        }
        if let Some(edge) = node.remove_child(role) {
            let below = edge.node();
            drop(edge);
            let _ = below.refresh_perms();
        }
        Ok(())
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: false,
    hands_over: true,
    names: &["quorum"],
    open: |o, options| Box::pin(open(o, options)),
};

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum ReadPattern {
    Quorum,
    Fifo,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct QuorumOptions {
    blkverify: Option<bool>,
    children: Vec<Value>,
    vote_threshold: i64,
    rewrite_corrupted: Option<bool>,
    read_pattern: Option<ReadPattern>,
}

async fn open(
    o: &mut Opener<'_>,
    options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let opts: QuorumOptions = o.parse(options)?;
    if opts.children.is_empty() {
        return Err(QmpError::generic(
            "Number of provided children must be 1 or more",
        ));
    }
    if opts.vote_threshold < 1 {
        return Err(QmpError::generic(
            "Parameter 'vote-threshold' expects a value >= 1",
        ));
    }
    let threshold = opts.vote_threshold as usize;
    if threshold > opts.children.len() {
        return Err(QmpError::generic("threshold may not exceed children count"));
    }
    let blkverify = opts.blkverify.unwrap_or(false);
    if blkverify && (opts.children.len() != 2 || threshold != 2) {
        return Err(QmpError::generic(
            "blkverify=on can only be set if there are exactly two files and vote-threshold is 2",
        ));
    }
    let rewrite_corrupted = opts.rewrite_corrupted.unwrap_or(false);
    if rewrite_corrupted && blkverify {
        return Err(QmpError::generic(
            "rewrite-corrupted=on cannot be used with blkverify=on",
        ));
    }
    let mut children = Vec::with_capacity(opts.children.len());
    for (i, reference) in opts.children.into_iter().enumerate() {
        let role = format!("children.{i}");
        children.push(
            o.open_child(reference, &role, Perms::NONE, Perms::ALL)
                .await?,
        );
    }
    // QEMU's quorum fails its size query when the children differ, which fails the open.
    let size = children[0].node().size();
    if children.iter().any(|c| c.node().size() != size) {
        return Err(QmpError::generic(
            "Could not refresh total sector count: Input/output error",
        ));
    }
    Ok(Box::new(Quorum {
        next_index: AtomicUsize::new(children.len()),
        children: ArcSwap::from_pointee(children),
        threshold,
        blkverify,
        rewrite_corrupted,
        fifo: opts.read_pattern == Some(ReadPattern::Fifo),
        events: o.event_hook(),
        last_events: Mutex::default(),
    }))
}
