//! `blkdebug`: a filter over `image` that fails requests on command, for error-path tests.
//!
//! QEMU's format drivers fire named events (l2_load, read_aio, ...) deep inside their code;
//! imago does not, so this node fires events for the requests that reach it: `read_aio` for
//! reads, `write_aio` and `pwritev` for writes, `pwritev_zero` for zero writes, `flush_to_disk`
//! for flushes. A rule becomes armed when its event fires in its state (`none` arms it at
//! open) and then fails every request matching its `iotype` and `sector` until `once`
//! disarms it after the first failure.

use crate::node::{Child, DriverInfo, Extent, Node, WriteFlags};
use crate::perm::Perms;
use crate::Driver;
use async_trait::async_trait;
use serde::Deserialize;
use std::io;
use std::sync::{Arc, Mutex};

#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlkdebugOptions {
    pub config: Option<String>,
    pub align: Option<u64>,
    pub max_transfer: Option<u64>,
    pub opt_write_zero: Option<u64>,
    pub max_write_zero: Option<u64>,
    pub opt_discard: Option<u64>,
    pub max_discard: Option<u64>,
    #[serde(default)]
    pub inject_error: Vec<InjectError>,
    #[serde(default)]
    pub set_state: Vec<SetState>,
    #[serde(default)]
    pub take_child_perms: Vec<PermName>,
    #[serde(default)]
    pub unshare_child_perms: Vec<PermName>,
}

#[derive(Deserialize, Debug, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
pub enum PermName {
    ConsistentRead,
    Write,
    WriteUnchanged,
    Resize,
}

impl PermName {
    fn perm(self) -> Perms {
        match self {
            PermName::ConsistentRead => Perms::CONSISTENT_READ,
            PermName::Write => Perms::WRITE,
            PermName::WriteUnchanged => Perms::WRITE_UNCHANGED,
            PermName::Resize => Perms::RESIZE,
        }
    }
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum IoType {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
    BlockStatus,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct InjectError {
    pub event: Event,
    pub state: Option<i64>,
    pub iotype: Option<IoType>,
    pub errno: Option<i32>,
    pub sector: Option<i64>,
    pub once: Option<bool>,
    pub immediately: Option<bool>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SetState {
    pub event: Event,
    pub state: Option<i64>,
    pub new_state: i64,
}

/// QEMU's BlkdebugEvent names; all are accepted, the ones this node fires are listed above.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    L1Update,
    L1GrowAllocTable,
    L1GrowWriteTable,
    L1GrowActivateTable,
    L2Load,
    L2Update,
    L2UpdateCompressed,
    L2AllocCowRead,
    L2AllocWrite,
    ReadAio,
    ReadBackingAio,
    ReadCompressed,
    WriteAio,
    WriteCompressed,
    VmstateLoad,
    VmstateSave,
    CowRead,
    CowWrite,
    ReftableLoad,
    ReftableGrow,
    ReftableUpdate,
    RefblockLoad,
    RefblockUpdate,
    RefblockUpdatePart,
    RefblockAlloc,
    RefblockAllocHookup,
    RefblockAllocWrite,
    RefblockAllocWriteBlocks,
    RefblockAllocWriteTable,
    RefblockAllocSwitchTable,
    ClusterAlloc,
    ClusterAllocBytes,
    ClusterFree,
    FlushToOs,
    FlushToDisk,
    PwritevRmwHead,
    PwritevRmwAfterHead,
    PwritevRmwTail,
    PwritevRmwAfterTail,
    Pwritev,
    PwritevZero,
    PwritevDone,
    EmptyImagePrepare,
    L1ShrinkWriteTable,
    L1ShrinkFreeL2Clusters,
    CorWrite,
    ClusterAllocSpace,
    None,
}

struct Rule {
    spec: InjectError,
    armed: bool,
}

struct State {
    current: i64,
    rules: Vec<Rule>,
}

pub struct Blkdebug {
    image: Arc<Child>,
    set_state: Vec<SetState>,
    take_perms: Perms,
    unshare_perms: Perms,
    state: Mutex<State>,
}

const SECTOR: u64 = 512;

impl Blkdebug {
    pub fn new(image: Arc<Child>, opts: BlkdebugOptions) -> Result<Blkdebug, String> {
        if opts.config.is_some() {
            return Err(
                "blkdebug config files are not supported; use inject-error and set-state".into(),
            );
        }
        let rules = opts
            .inject_error
            .into_iter()
            .map(|spec| Rule {
                armed: spec.event == Event::None && spec.state.is_none_or(|s| s == 1),
                spec,
            })
            .collect();
        Ok(Blkdebug {
            image,
            set_state: opts.set_state,
            take_perms: opts
                .take_child_perms
                .iter()
                .fold(Perms::NONE, |acc, p| acc | p.perm()),
            unshare_perms: opts
                .unshare_child_perms
                .iter()
                .fold(Perms::NONE, |acc, p| acc | p.perm()),
            state: Mutex::new(State { current: 1, rules }),
        })
    }

    fn image(&self) -> Arc<Node> {
        self.image.node()
    }

    /// Fire `events`, then fail the request if an armed rule matches it.
    fn check(&self, events: &[Event], iotype: IoType, offset: u64, len: u64) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        for &event in events {
            let current = state.current;
            for rule in state.rules.iter_mut() {
                if rule.spec.event == event && rule.spec.state.is_none_or(|s| s == current) {
                    rule.armed = true;
                }
            }
            if let Some(transition) = self
                .set_state
                .iter()
                .find(|t| t.event == event && t.state.is_none_or(|s| s == current))
            {
                state.current = transition.new_state;
            }
        }
        let hit = state.rules.iter().position(|rule| {
            rule.armed
                && rule.spec.iotype.is_none_or(|t| t == iotype)
                && rule.spec.sector.is_none_or(|sector| {
                    sector < 0 || {
                        let start = sector as u64 * SECTOR;
                        start < offset + len.max(1) && offset < start + SECTOR
                    }
                })
        });
        let Some(index) = hit else {
            return Ok(());
        };
        let errno = state.rules[index].spec.errno.unwrap_or(libc::EIO);
        if state.rules[index].spec.once.unwrap_or(false) {
            state.rules.remove(index);
        }
        tracing::debug!(errno, offset, len, ?iotype, "blkdebug injects an error");
        Err(io::Error::from_raw_os_error(errno))
    }
}

#[async_trait(?Send)]
impl Driver for Blkdebug {
    fn format_name(&self) -> &'static str {
        "blkdebug"
    }

    fn size(&self, _node: &Node) -> u64 {
        self.image().size()
    }

    async fn read(&self, _: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(&[Event::ReadAio], IoType::Read, offset, buf.len() as u64)?;
        self.image.read(offset, buf).await
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        self.check(
            &[Event::WriteAio, Event::Pwritev],
            IoType::Write,
            offset,
            buf.len() as u64,
        )?;
        self.image.write(offset, buf, flags).await
    }

    async fn write_zeroes(
        &self,
        _: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        self.check(&[Event::PwritevZero], IoType::WriteZeroes, offset, len)?;
        self.image.write_zeroes(offset, len, flags).await
    }

    async fn discard(&self, _: &Node, offset: u64, len: u64) -> io::Result<()> {
        self.check(&[], IoType::Discard, offset, len)?;
        self.image.discard(offset, len).await
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        self.check(&[Event::FlushToDisk], IoType::Flush, 0, 0)?;
        self.image.flush().await
    }

    async fn block_status(&self, _: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        self.check(&[], IoType::BlockStatus, offset, len)?;
        self.image().block_status(offset, len).await
    }

    async fn truncate(&self, _: &Node, size: u64) -> io::Result<()> {
        self.image().truncate(size).await
    }

    fn child_perms(&self, _: &str, perm: Perms, shared: Perms, _: bool) -> (Perms, Perms) {
        (perm | self.take_perms, shared & !self.unshare_perms)
    }

    fn info(&self, node: &Node) -> DriverInfo {
        DriverInfo {
            filename: crate::graph::json_filename(node, "blkdebug"),
            ..DriverInfo::default()
        }
    }

    fn filtered_child_role(&self) -> Option<&'static str> {
        Some("image")
    }

    /// A filter over a growing file grows with it (qcow2 over blkdebug over file).
    fn extends_on_write(&self) -> bool {
        self.image().driver().extends_on_write()
    }
}
