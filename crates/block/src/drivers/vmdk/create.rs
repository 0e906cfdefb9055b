//! blockdev-create's `vmdk` driver (BlockdevCreateOptionsVmdk): the subformats QEMU
//! writes, with its layouts, descriptor text and error words. Extents are written first
//! (a monolithic image is its own extent), then the descriptor, which needs the backing
//! file's CID.

use super::descriptor::{text_of, Descriptor, NewDescriptor};
use super::sparse::{Layout, SparseHeader, HEADER_LEN};
use crate::drivers::file::os_error_text;
use crate::node::{Child, WriteFlags};
use crate::open::{probe_format, resolve_backing_path};
use serde::Deserialize;
use std::io;
use std::sync::Arc;

/// The largest disk blockd creates: VMware's own limit is 62 TB.
const MAX_SIZE: u64 = 64 << 40;
/// twoGbMaxExtent* subformats cut the disk into extents of this many bytes.
const SPLIT: u64 = 2 << 30;

/// BlockdevVmdkSubformat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum VmdkSubformat {
    #[default]
    MonolithicSparse,
    MonolithicFlat,
    TwoGbMaxExtentSparse,
    TwoGbMaxExtentFlat,
    StreamOptimized,
}

impl VmdkSubformat {
    fn name(self) -> &'static str {
        match self {
            VmdkSubformat::MonolithicSparse => "monolithicSparse",
            VmdkSubformat::MonolithicFlat => "monolithicFlat",
            VmdkSubformat::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            VmdkSubformat::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
            VmdkSubformat::StreamOptimized => "streamOptimized",
        }
    }

    /// The descriptor is inside the one sparse extent, which is `file` itself.
    fn monolithic_sparse(self) -> bool {
        matches!(
            self,
            VmdkSubformat::MonolithicSparse | VmdkSubformat::StreamOptimized
        )
    }

    fn sparse(self) -> bool {
        self != VmdkSubformat::MonolithicFlat && self != VmdkSubformat::TwoGbMaxExtentFlat
    }
}

/// BlockdevVmdkAdapterType.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum AdapterType {
    #[default]
    #[serde(rename = "ide")]
    Ide,
    #[serde(rename = "buslogic")]
    Buslogic,
    #[serde(rename = "lsilogic")]
    Lsilogic,
    #[serde(rename = "legacyESX")]
    LegacyEsx,
}

impl AdapterType {
    fn name(self) -> &'static str {
        match self {
            AdapterType::Ide => "ide",
            AdapterType::Buslogic => "buslogic",
            AdapterType::Lsilogic => "lsilogic",
            AdapterType::LegacyEsx => "legacyESX",
        }
    }
}

/// BlockdevCreateOptionsVmdk less its `file` and `extents` references.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VmdkCreate {
    size: i64,
    #[serde(default)]
    subformat: VmdkSubformat,
    backing_file: Option<String>,
    #[serde(default)]
    adapter_type: AdapterType,
    hwversion: Option<String>,
    toolsversion: Option<String>,
    #[serde(default)]
    zeroed_grain: bool,
}

/// A node the image is written to, and its file name.
pub struct CreateTarget {
    /// An edge that writes and resizes the node.
    pub child: Arc<Child>,
    /// The node's file name, which the descriptor names extents by.
    pub filename: String,
}

fn io_text(e: io::Error) -> String {
    os_error_text(&e)
}

/// The last part of a path: how the descriptor names an extent beside it.
fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Empty `target` and write a sparse extent of `sectors` onto it, with `descriptor` (if
/// any) in its descriptor area.
async fn write_sparse(
    target: &Child,
    sectors: u64,
    compressed: bool,
    zeroed_grain: bool,
    descriptor: Option<&str>,
) -> Result<(), String> {
    let layout = Layout::new(sectors, compressed, zeroed_grain);
    let h = &layout.header;
    let node = target.node();
    node.truncate(0).await.map_err(io_text)?;
    node.truncate(h.overhead * 512).await.map_err(io_text)?;
    let plain = WriteFlags::default();
    target
        .write(0, &h.to_bytes(), plain)
        .await
        .map_err(io_text)?;
    if let Some(text) = descriptor {
        if text.len() as u64 > h.desc_size * 512 {
            return Err("The vmdk descriptor does not fit in its area".into());
        }
        target
            .write(h.desc_offset * 512, text.as_bytes(), plain)
            .await
            .map_err(io_text)?;
    }
    // The GTs are the zeroes the new file space reads as.
    for at in [h.rgd_offset, h.gd_offset] {
        target
            .write(at * 512, &layout.directory(at), plain)
            .await
            .map_err(io_text)?;
    }
    Ok(())
}

/// The CID of the vmdk image at `path`, refused as QEMU refuses a backing file of
/// another format.
fn backing_cid(path: &str) -> Result<u32, String> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .map_err(|e| format!("Could not open '{path}': {}", io_text(e)))?;
    let mut head = Vec::new();
    file.take(super::descriptor::MAX_LEN as u64)
        .read_to_end(&mut head)
        .map_err(|e| format!("Could not read '{path}': {}", io_text(e)))?;
    let format = probe_format(path);
    if format != "vmdk" {
        return Err(format!(
            "Invalid backing file format: {format}. Must be vmdk"
        ));
    }
    let text = match SparseHeader::parse(&head[..head.len().min(HEADER_LEN)]) {
        Some(Ok(h)) => {
            let start = (h.desc_offset.saturating_mul(512) as usize).min(head.len());
            let end = start
                .saturating_add((h.desc_size.saturating_mul(512)) as usize)
                .min(head.len());
            text_of(&head[start..end])
        }
        Some(Err(e)) => return Err(e),
        None => text_of(&head),
    };
    Ok(Descriptor::parse(&text, false)?.cid)
}

impl VmdkCreate {
    /// Write the image onto `file` (and `extents` for the subformats with extent files).
    /// Runs on an I/O thread.
    pub async fn create_on(
        &self,
        file: CreateTarget,
        extents: Vec<CreateTarget>,
    ) -> Result<(), String> {
        let size = u64::try_from(self.size)
            .ok()
            .filter(|s| s % 512 == 0)
            .ok_or("Image size must be a multiple of 512 bytes")?;
        if size > MAX_SIZE {
            return Err(format!(
                "blockd creates vmdk disks of at most {MAX_SIZE} bytes"
            ));
        }
        let sectors = size / 512;
        let sub = self.subformat;
        let mut lines = Vec::new();
        let mut used = 0;
        if sub.monolithic_sparse() {
            lines.push(format!(
                "RW {sectors} SPARSE \"{}\"",
                base_name(&file.filename)
            ));
        } else {
            let pieces: Vec<u64> = match sub {
                VmdkSubformat::MonolithicFlat => vec![size],
                _ => (0..size.div_ceil(SPLIT))
                    .map(|i| SPLIT.min(size - i * SPLIT))
                    .collect(),
            };
            for len in pieces {
                let target = extents
                    .get(used)
                    .ok_or_else(|| format!("Extent [{used}] not specified"))?;
                let name = base_name(&target.filename);
                if sub.sparse() {
                    write_sparse(&target.child, len / 512, false, self.zeroed_grain, None).await?;
                    lines.push(format!("RW {} SPARSE \"{name}\"", len / 512));
                } else {
                    let node = target.child.node();
                    node.truncate(0).await.map_err(io_text)?;
                    node.truncate(len).await.map_err(io_text)?;
                    lines.push(format!("RW {} FLAT \"{name}\" 0", len / 512));
                }
                used += 1;
            }
        }
        if extents.len() > used {
            return Err("List of extents contains unused extents".into());
        }
        let parent_cid = match &self.backing_file {
            Some(name) => {
                let path = resolve_backing_path(&file.filename, name);
                tokio::task::spawn_blocking(move || backing_cid(&path))
                    .await
                    .map_err(|e| e.to_string())??
            }
            None => u32::MAX,
        };
        let mut cid = [0u8; 4];
        crypto::random(&mut cid)?;
        let text = NewDescriptor {
            cid: u32::from_le_bytes(cid),
            parent_cid,
            create_type: sub.name(),
            parent_file: self.backing_file.as_deref(),
            extents: &lines,
            hw_version: self.hwversion.as_deref().unwrap_or("4"),
            tools_version: self.toolsversion.as_deref().unwrap_or("2147483647"),
            adapter_type: self.adapter_type.name(),
            sectors,
        }
        .render();
        if sub.monolithic_sparse() {
            let compressed = sub == VmdkSubformat::StreamOptimized;
            write_sparse(
                &file.child,
                sectors,
                compressed,
                self.zeroed_grain,
                Some(&text),
            )
            .await?;
        } else {
            let node = file.child.node();
            node.truncate(0).await.map_err(io_text)?;
            node.truncate(text.len() as u64).await.map_err(io_text)?;
            file.child
                .write(0, text.as_bytes(), WriteFlags::default())
                .await
                .map_err(io_text)?;
        }
        file.child.flush().await.map_err(io_text)?;
        for target in &extents {
            target.child.flush().await.map_err(io_text)?;
        }
        Ok(())
    }
}
