//! `blkdebug`: a filter over `image` that fails requests on command, for error-path tests.
//!
//! As in QEMU, events come from outside: the format driver above fires them on its file
//! child where it does each kind of I/O (qcow2's `read_aio` before guest data, `l2_load`
//! before an L2 table, ...; see the qcow2 and raw drivers for which they fire), the node
//! layer fires `flush_to_os` and `flush_to_disk` on a node's primary child before a flush,
//! and this node fires `pwritev`, `pwritev_zero` and `pwritev_done` for the writes it gets.
//! An event that has inject-error rules in the current state makes those rules the active
//! ones, in place of the earlier ones (rules for `none` are active from the open); an active
//! rule fails every request that matches its `iotype` and `sector` until `once` retires it.
//! set-state rules for the event then change the state.

use crate::node::{Child, DriverInfo, Extent, Node, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use async_trait::async_trait;
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{Map, Value};
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
    pub event: BlkdebugEvent,
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
    pub event: BlkdebugEvent,
    pub state: Option<i64>,
    pub new_state: i64,
}

/// QEMU's BlkdebugEvent names; all are accepted, and the drivers fire those with a
/// meaning for them (see the module doc).
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BlkdebugEvent {
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

struct State {
    current: i64,
    /// The inject-error rules; `once` retires one (None) after its first error, for good.
    rules: Vec<Option<InjectError>>,
    /// Indices into `rules` of the active ones.
    active: Vec<usize>,
}

pub struct Blkdebug {
    image: Arc<Child>,
    set_state: Vec<SetState>,
    take_perms: Perms,
    unshare_perms: Perms,
    state: Mutex<State>,
}

const SECTOR: u64 = 512;

impl BlkdebugOptions {
    /// The request limits, checked as QEMU checks them (each a multiple of what it builds
    /// on, below 2 GiB), and then refused: blockd's blkdebug passes requests on as they
    /// come, without the splitting and alignment QEMU's block layer would do for them.
    fn check_limits(&self) -> Result<(), String> {
        let fits = |value: u64, unit: u64| value < i32::MAX as u64 && value.is_multiple_of(unit);
        let align = self.align.unwrap_or(0);
        if align != 0 && (align >= i32::MAX as u64 || !align.is_power_of_two()) {
            return Err(format!("Cannot meet constraints with align {align}"));
        }
        // QEMU's unit is the larger of `align` and the image's own request alignment, which
        // is 1 for the files blockd opens through blkdebug's image without O_DIRECT.
        let unit = align.max(1);
        let opt_write_zero = self.opt_write_zero.unwrap_or(0);
        let opt_discard = self.opt_discard.unwrap_or(0);
        for (name, value, unit) in [
            ("max-transfer", self.max_transfer, unit),
            ("opt-write-zero", self.opt_write_zero, unit),
            (
                "max-write-zero",
                self.max_write_zero,
                unit.max(opt_write_zero),
            ),
            ("opt-discard", self.opt_discard, unit),
            ("max-discard", self.max_discard, unit.max(opt_discard)),
        ] {
            if let Some(value) = value.filter(|&v| v != 0) {
                if !fits(value, unit) {
                    return Err(format!("Cannot meet constraints with {name} {value}"));
                }
            }
        }
        for (name, value) in [
            ("align", self.align),
            ("max-transfer", self.max_transfer),
            ("opt-write-zero", self.opt_write_zero),
            ("max-write-zero", self.max_write_zero),
            ("opt-discard", self.opt_discard),
            ("max-discard", self.max_discard),
        ] {
            if value.is_some_and(|v| v != 0) {
                return Err(format!(
                    "blockd's blkdebug does not support {name}: it passes requests on without splitting or aligning them"
                ));
            }
        }
        Ok(())
    }
}

impl Blkdebug {
    pub fn new(image: Arc<Child>, opts: BlkdebugOptions) -> Result<Blkdebug, String> {
        if opts.config.is_some() {
            return Err(
                "blkdebug config files are not supported; use inject-error and set-state".into(),
            );
        }
        opts.check_limits()?;
        let active = opts
            .inject_error
            .iter()
            .enumerate()
            .filter(|(_, r)| r.event == BlkdebugEvent::None && r.state.is_none_or(|s| s == 1))
            .map(|(i, _)| i)
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
            state: Mutex::new(State {
                current: 1,
                rules: opts.inject_error.into_iter().map(Some).collect(),
                active,
            }),
        })
    }

    fn image(&self) -> Arc<Node> {
        self.image.node()
    }

    /// QEMU's blkdebug_debug_event: the event's inject-error rules for the current state
    /// become the active ones, then its set-state rule (if any) changes the state.
    fn fire(&self, event: BlkdebugEvent) {
        let mut state = self.state.lock().unwrap();
        let current = state.current;
        let matching: Vec<usize> = state
            .rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some((i, r.as_ref()?)))
            .filter(|(_, r)| r.event == event && r.state.is_none_or(|s| s == current))
            .map(|(i, _)| i)
            .collect();
        if !matching.is_empty() {
            state.active = matching;
        }
        if let Some(transition) = self
            .set_state
            .iter()
            .find(|t| t.event == event && t.state.is_none_or(|s| s == current))
        {
            state.current = transition.new_state;
        }
    }

    /// Fail the request if an active rule matches it (QEMU's rule_check): a rule without
    /// an iotype takes every kind but block status; one with a sector only requests that
    /// cover it. As in QEMU, the error comes back after a yield to the I/O thread's other
    /// work unless the rule says `immediately`.
    async fn check(&self, iotype: IoType, offset: u64, len: u64) -> io::Result<()> {
        let Some((errno, immediately)) = self.match_rule(iotype, offset, len) else {
            return Ok(());
        };
        tracing::debug!(errno, offset, len, ?iotype, "blkdebug injects an error");
        if !immediately {
            tokio::task::yield_now().await;
        }
        Err(io::Error::from_raw_os_error(errno))
    }

    /// The errno and `immediately` of the first active rule that matches, if one does;
    /// retires a `once` rule.
    fn match_rule(&self, iotype: IoType, offset: u64, len: u64) -> Option<(i32, bool)> {
        let mut state = self.state.lock().unwrap();
        let hit = state.active.iter().position(|&i| {
            let Some(rule) = &state.rules[i] else {
                return false;
            };
            let kind = match rule.iotype {
                Some(t) => t == iotype,
                None => iotype != IoType::BlockStatus,
            };
            kind && rule.sector.is_none_or(|sector| {
                sector < 0 || {
                    let at = sector as u64 * SECTOR;
                    len > 0 && offset <= at && at < offset + len
                }
            })
        });
        let position = hit?;
        let index = state.active[position];
        let rule = state.rules[index].as_ref().expect("active rules are live");
        let errno = rule.errno.unwrap_or(libc::EIO);
        let immediately = rule.immediately.unwrap_or(false);
        if rule.once.unwrap_or(false) {
            state.active.remove(position);
            state.rules[index] = None;
        }
        Some((errno, immediately))
    }

    /// A write as QEMU's block layer does it at this node: `pwritev` (or `pwritev_zero`)
    /// first, the rules, the write, then `pwritev_done`.
    async fn write_through<F>(
        &self,
        event: BlkdebugEvent,
        iotype: IoType,
        offset: u64,
        len: u64,
        write: F,
    ) -> io::Result<()>
    where
        F: std::future::Future<Output = io::Result<()>>,
    {
        self.fire(event);
        self.check(iotype, offset, len).await?;
        let result = write.await;
        self.fire(BlkdebugEvent::PwritevDone);
        result
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
        self.check(IoType::Read, offset, buf.len() as u64).await?;
        self.image.read(offset, buf).await
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        let len = buf.len() as u64;
        let write = self.image.write(offset, buf, flags);
        self.write_through(BlkdebugEvent::Pwritev, IoType::Write, offset, len, write)
            .await
    }

    async fn write_zeroes(
        &self,
        _: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        let write = self.image.write_zeroes(offset, len, flags);
        self.write_through(
            BlkdebugEvent::PwritevZero,
            IoType::WriteZeroes,
            offset,
            len,
            write,
        )
        .await
    }

    async fn discard(&self, _: &Node, offset: u64, len: u64) -> io::Result<()> {
        self.check(IoType::Discard, offset, len).await?;
        self.image.discard(offset, len).await
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        self.check(IoType::Flush, 0, 0).await?;
        self.image.flush().await
    }

    async fn block_status(&self, _: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        self.check(IoType::BlockStatus, offset, len).await?;
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

    fn takes_debug_events(&self) -> bool {
        true
    }

    fn debug_event(&self, event: BlkdebugEvent) {
        self.fire(event);
    }

    /// A filter over a growing file grows with it (qcow2 over blkdebug over file).
    fn extends_on_write(&self) -> bool {
        self.image().driver().extends_on_write()
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: false,
    hands_over: true,
    names: &["blkdebug"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    mut options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let image_ref = o.take_child_ref(&mut options, "image")?;
    let opts: BlkdebugOptions = o.parse(options)?;
    let image = o
        .open_child(image_ref, "image", Perms::NONE, Perms::ALL)
        .await?;
    Ok(Box::new(
        Blkdebug::new(image, opts).map_err(QmpError::generic)?,
    ))
}
