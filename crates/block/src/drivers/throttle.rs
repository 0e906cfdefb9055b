//! `throttle`: a filter that holds reads, writes, zero writes and discards of its `file`
//! child to the limits of a throttle group, shared with the group's other throttle nodes.

use crate::node::{Child, CommonOptions, DriverInfo, Extent, Node, Parent, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::throttle::{Direction, Membership, ThrottleConfig, ThrottleGroup};
use crate::{Driver, Graph};
use async_trait::async_trait;
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::json;
use serde_json::{Map, Value};
use std::io;
use std::sync::Arc;

#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ThrottleOptions {
    pub throttle_group: String,
}

pub struct Throttle {
    file: Arc<Child>,
    member: Membership,
    /// Made by block_set_io_throttle rather than blockdev-add.
    legacy: bool,
}

impl Throttle {
    pub fn new(file: Arc<Child>, group: &Arc<ThrottleGroup>, legacy: bool) -> Throttle {
        Throttle {
            file,
            member: group.join(),
            legacy,
        }
    }

    pub fn group(&self) -> &Arc<ThrottleGroup> {
        self.member.group()
    }

    pub fn is_legacy(&self) -> bool {
        self.legacy
    }
}

#[async_trait(?Send)]
impl Driver for Throttle {
    fn format_name(&self) -> &'static str {
        "throttle"
    }

    fn size(&self, _: &Node) -> u64 {
        self.file.node().size()
    }

    async fn read(&self, _: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.member.admit(Direction::Read, buf.len() as u64).await;
        self.file.read(offset, buf).await
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        self.member.admit(Direction::Write, buf.len() as u64).await;
        self.file.write(offset, buf, flags).await
    }

    async fn write_zeroes(
        &self,
        _: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        self.member.admit(Direction::Write, len).await;
        self.file.write_zeroes(offset, len, flags).await
    }

    async fn discard(&self, _: &Node, offset: u64, len: u64) -> io::Result<()> {
        self.member.admit(Direction::Write, len).await;
        self.file.discard(offset, len).await
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        self.file.flush().await
    }

    async fn block_status(&self, _: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        self.file.node().status_for_filter(offset, len).await
    }

    async fn truncate(&self, _: &Node, size: u64) -> io::Result<()> {
        self.file.node().truncate(size).await
    }

    fn child_perms(&self, _: &str, perm: Perms, shared: Perms, _: bool) -> (Perms, Perms) {
        (perm, shared)
    }

    fn info(&self, node: &Node) -> DriverInfo {
        DriverInfo::of_filter(node, &self.file)
    }

    fn filtered_child_role(&self) -> Option<&'static str> {
        Some("file")
    }
}

/// The throttle filter block_set_io_throttle put above `node`, if any.
fn legacy_filter(graph: &Graph, node: &Arc<Node>) -> Option<Arc<Node>> {
    node.parents().iter().find_map(|edge| {
        let parent = graph.find(edge.parent_node_name()?)?;
        let throttle = parent.driver_as::<Throttle>()?;
        (throttle.is_legacy() && parent.is_implicit()).then_some(parent)
    })
}

/// block_set_io_throttle: throttle `node` with `config` as a member of group `group_name`
/// (made if it does not exist), through an implicit throttle filter inserted above it, so
/// that every user of the node is held to the limits. A config without limits removes the
/// filter. Must run on an I/O thread.
pub async fn set_io_throttle(
    graph: &Graph,
    node: &Arc<Node>,
    group_name: &str,
    config: ThrottleConfig,
) -> Result<(), String> {
    let _changing = graph.lock_changes().await;
    let existing = legacy_filter(graph, node);
    let current_group = existing
        .as_ref()
        .and_then(|f| f.driver_as::<Throttle>())
        .map(|t| t.group().clone());
    if let Some(group) = &current_group {
        if config.is_enabled() && group.name() == group_name {
            group.set_config(config);
            return Ok(());
        }
    }
    if let Some(filter) = existing {
        graph.remove_filter(&filter, node).await;
    }
    if let Some(group) = current_group {
        if group.member_count() == 0 {
            graph.throttle_groups.remove(group.name());
        }
    }
    if !config.is_enabled() {
        return Ok(());
    }
    let group = match graph.throttle_groups.get(group_name) {
        Some(group) => {
            group.set_config(config);
            group
        }
        None => {
            let group = ThrottleGroup::new(group_name, config);
            graph.throttle_groups.insert(group.clone());
            group
        }
    };
    let name = graph.generate_name();
    let file = Node::attach(
        node,
        "file",
        Parent::Node(name.clone()),
        Perms::NONE,
        Perms::ALL,
    )?;
    let options = json!({
        "driver": "throttle",
        "throttle-group": group_name,
        "file": node.name(),
    });
    let common = CommonOptions {
        read_only: node.read_only(),
        ..CommonOptions::default()
    };
    let driver = Box::new(Throttle::new(file.clone(), &group, true));
    let filter = Node::new(name, true, driver, common, options);
    filter.add_child(file);
    graph.insert_filter(node, &filter).await;
    filter.refresh_perms()?;
    Ok(())
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: false,
    hands_over: true,
    names: &["throttle"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    mut options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let file_ref = o.take_child_ref(&mut options, "file")?;
    let opts: ThrottleOptions = o.parse(options)?;
    let group = o.throttle_group(&opts.throttle_group).ok_or_else(|| {
        QmpError::generic(format!(
            "Throttle group '{}' does not exist",
            opts.throttle_group
        ))
    })?;
    let file = o
        .open_child(file_ref, "file", Perms::NONE, Perms::ALL)
        .await?;
    Ok(Box::new(Throttle::new(file, &group, false)))
}
