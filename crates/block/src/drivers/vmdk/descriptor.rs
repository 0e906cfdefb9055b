//! The vmdk descriptor: the text that names the disk's extents (`RW 10240 SPARSE
//! "disk-s001.vmdk"`), its content ID (CID), its parent's, and the parent's file. It is a
//! file of its own, or sits inside a monolithic sparse file.
//!
//! Where QEMU skips an extent line it cannot read (or one whose access is not RW), blockd
//! refuses the descriptor: skipping a line would move every later extent to the wrong
//! guest offset. QEMU also skips ZERO extents; blockd reads them as VMware defines them
//! (zeroes over their sectors), so the extents after them stay where VMware puts them.

/// The most descriptor text read: a descriptor names its extents in a few lines each.
pub const MAX_LEN: usize = 1 << 20;
/// The most extents one descriptor may name (a 62 TiB disk in 2 GiB pieces needs 31744).
const MAX_EXTENTS: usize = 32768;

/// How an extent stores its part of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    /// The data as is, from an offset in the file (`FLAT`, and `VMFS` at offset 0).
    Flat,
    /// Reads as zeroes; no file.
    Zero,
    /// A hosted sparse extent (grain directory, grain tables, grains).
    Sparse,
    /// ESXi's space-efficient sparse extent, read only.
    SeSparse,
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// The extent's length.
    pub sectors: u64,
    /// How it stores its data.
    pub kind: ExtentType,
    /// As the line spells it (`FLAT`, `VMFS`, `SPARSE`, `ZERO`), for query-named-block-nodes.
    pub type_name: String,
    /// The file, relative to the descriptor's; empty for `ZERO`.
    pub file: String,
    /// Where a flat extent's data starts in its file, in sectors.
    pub offset: u64,
}

/// What blockd reads from a descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Descriptor {
    /// The content ID, changed by the first write of a session.
    pub cid: u32,
    /// The parent's CID when this disk was made from it; `ffffffff` without a parent.
    pub parent_cid: u32,
    /// The subformat (`createType`).
    pub create_type: Option<String>,
    /// The backing file (`parentFileNameHint`).
    pub parent_file: Option<String>,
    /// The extents, in disk order.
    pub extents: Vec<ExtentLine>,
}

/// The value of `key = value` or `key="value"` on a line, quotes removed.
fn value_of<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.trim_start().strip_prefix(key)?;
    let value = rest.trim_start().strip_prefix('=')?.trim();
    Some(
        value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value),
    )
}

/// The text up to the first NUL (a descriptor inside a sparse file is padded with them).
pub fn text_of(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

impl Descriptor {
    /// The keys of `text`, and its extent lines if `with_extents` (a descriptor inside a
    /// monolithic sparse file only names the file itself).
    pub fn parse(text: &str, with_extents: bool) -> Result<Descriptor, String> {
        let mut d = Descriptor {
            parent_cid: u32::MAX,
            ..Descriptor::default()
        };
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if let Some(v) = value_of(line, "CID") {
                d.cid = u32::from_str_radix(v, 16).unwrap_or(0);
            } else if let Some(v) = value_of(line, "parentCID") {
                d.parent_cid = u32::from_str_radix(v, 16).unwrap_or(0);
            } else if let Some(v) = value_of(line, "createType") {
                d.create_type = Some(v.to_string());
            } else if let Some(v) = value_of(line, "parentFileNameHint") {
                d.parent_file = Some(v.to_string());
            } else if with_extents {
                if let Some(extent) = parse_extent(line)? {
                    if d.extents.len() == MAX_EXTENTS {
                        return Err(format!("more than {MAX_EXTENTS} extents"));
                    }
                    d.extents.push(extent);
                }
            }
        }
        Ok(d)
    }

    /// A descriptor file's: its create type must be one QEMU opens from a descriptor file.
    pub fn parse_file(text: &str) -> Result<Descriptor, String> {
        let d = Descriptor::parse(text, true)?;
        let Some(create_type) = &d.create_type else {
            return Err("invalid VMDK image descriptor".into());
        };
        if ![
            "monolithicFlat",
            "vmfs",
            "vmfsSparse",
            "seSparse",
            "twoGbMaxExtentSparse",
            "twoGbMaxExtentFlat",
        ]
        .contains(&create_type.as_str())
        {
            return Err(format!("Unsupported image type '{create_type}'"));
        }
        if d.extents.is_empty() {
            return Err("The vmdk descriptor names no extents".into());
        }
        let mut total = 0u64;
        for extent in &d.extents {
            total = total
                .checked_add(extent.sectors)
                .filter(|&t| t <= i64::MAX as u64 / 512)
                .ok_or("The vmdk extents add up to more than the largest disk")?;
        }
        Ok(d)
    }
}

/// An extent line (`ACCESS SECTORS TYPE "FILE" [OFFSET]`), or None for any other line.
fn parse_extent(line: &str) -> Result<Option<ExtentLine>, String> {
    let invalid = || format!("Invalid extent line: {line}");
    let mut words = line.split_ascii_whitespace();
    let access = match words.next() {
        Some(a @ ("RW" | "RDONLY" | "NOACCESS")) => a,
        _ => return Ok(None),
    };
    if access != "RW" {
        return Err(format!(
            "blockd opens only RW extents, not {access}: {line}"
        ));
    }
    let sectors: u64 = words
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|&s| s > 0)
        .ok_or_else(invalid)?;
    let type_name = words.next().ok_or_else(invalid)?;
    // The file name is quoted and may hold spaces.
    let after_type = &line[line.find(type_name).expect("a word of the line") + type_name.len()..];
    let (file, rest) = match after_type.trim_start().strip_prefix('"') {
        Some(quoted) => {
            let end = quoted.find('"').ok_or_else(invalid)?;
            (&quoted[..end], &quoted[end + 1..])
        }
        None if type_name == "ZERO" => ("", after_type),
        None => return Err(invalid()),
    };
    let mut rest = rest.split_ascii_whitespace();
    let offset = match rest.next() {
        Some(word) => Some(word.parse::<u64>().map_err(|_| invalid())?),
        None => None,
    };
    if rest.next().is_some() {
        return Err(invalid());
    }
    let (kind, offset) = match (type_name, offset) {
        ("FLAT", Some(offset)) => (ExtentType::Flat, offset),
        ("VMFS", None) => (ExtentType::Flat, 0),
        ("SPARSE" | "VMFSSPARSE", None) => (ExtentType::Sparse, 0),
        ("ZERO", None) => (ExtentType::Zero, 0),
        ("SESPARSE", None) => (ExtentType::SeSparse, 0),
        ("FLAT" | "VMFS" | "SPARSE" | "VMFSSPARSE" | "SESPARSE" | "ZERO", _) => {
            return Err(invalid())
        }
        _ => return Err(format!("Unsupported extent type '{type_name}'")),
    };
    if offset > i64::MAX as u64 / 512 {
        return Err(invalid());
    }
    Ok(Some(ExtentLine {
        sectors,
        kind,
        type_name: type_name.to_string(),
        file: file.to_string(),
        offset,
    }))
}

/// The text of a new descriptor, laid out as QEMU lays it out.
pub struct NewDescriptor<'a> {
    pub cid: u32,
    pub parent_cid: u32,
    pub create_type: &'a str,
    pub parent_file: Option<&'a str>,
    /// Extent lines, each without its line end.
    pub extents: &'a [String],
    pub hw_version: &'a str,
    pub tools_version: &'a str,
    pub adapter_type: &'a str,
    /// The disk size in sectors, for the geometry.
    pub sectors: u64,
}

impl NewDescriptor<'_> {
    pub fn render(&self) -> String {
        let heads = if self.adapter_type == "ide" { 16 } else { 255 };
        let cylinders = self.sectors / (heads * 63);
        let parent = match self.parent_file {
            Some(file) => format!("parentFileNameHint=\"{file}\"\n"),
            None => "\n".to_string(),
        };
        let mut extents = String::new();
        for line in self.extents {
            extents.push_str(line);
            extents.push('\n');
        }
        format!(
            "# Disk DescriptorFile\nversion=1\nCID={:08x}\nparentCID={:08x}\n\
             createType=\"{}\"\n{parent}# Extent description\n{extents}\n\
             # The Disk Data Base\n#DDB\n\n\
             ddb.virtualHWVersion = \"{}\"\nddb.geometry.cylinders = \"{cylinders}\"\n\
             ddb.geometry.heads = \"{heads}\"\nddb.geometry.sectors = \"63\"\n\
             ddb.adapterType = \"{}\"\nddb.toolsVersion = \"{}\"\n",
            self.cid,
            self.parent_cid,
            self.create_type,
            self.hw_version,
            self.adapter_type,
            self.tools_version
        )
    }
}

/// The descriptor `text` with its CID line saying `cid` (QEMU's new CID after the first
/// write). Bytes, not text: whatever else the descriptor holds stays as it was.
pub fn with_cid(text: &[u8], cid: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 16);
    for line in text.split_inclusive(|&b| b == b'\n') {
        let is_cid = std::str::from_utf8(line).is_ok_and(|l| value_of(l, "CID").is_some());
        if is_cid {
            out.extend_from_slice(format!("CID={cid:08x}\n").as_bytes());
        } else {
            out.extend_from_slice(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAT: &str = "# Disk DescriptorFile\nversion=1\nCID=8bdb90a9\nparentCID=ffffffff\n\
        createType=\"monolithicFlat\"\n\n# Extent description\nRW 10240 FLAT \"a b-flat.vmdk\" 0\n\
        RW 2048 ZERO\nRW 100 VMFS \"v.vmdk\"\n\n#DDB\nddb.adapterType = \"ide\"\n";

    #[test]
    fn descriptor_files_name_their_extents() {
        let d = Descriptor::parse_file(FLAT).unwrap();
        assert_eq!((d.cid, d.parent_cid), (0x8bdb90a9, u32::MAX));
        assert_eq!(d.create_type.as_deref(), Some("monolithicFlat"));
        let kinds: Vec<_> = d
            .extents
            .iter()
            .map(|e| (e.sectors, e.kind, e.file.as_str(), e.offset))
            .collect();
        assert_eq!(
            kinds,
            [
                (10240, ExtentType::Flat, "a b-flat.vmdk", 0),
                (2048, ExtentType::Zero, "", 0),
                (100, ExtentType::Flat, "v.vmdk", 0),
            ]
        );
    }

    #[test]
    fn lines_qemu_would_skip_are_refused() {
        for (from, to, error) in [
            ("RW 10240 FLAT", "RW x FLAT", "Invalid extent line"),
            ("RW 10240 FLAT", "RDONLY 10240 FLAT", "only RW"),
            ("\" 0\n", "\"\n", "Invalid extent line"),
            (
                "RW 100 VMFS \"v.vmdk\"",
                "RW 100 VMFS \"v.vmdk\" 0",
                "Invalid",
            ),
            (
                "RW 2048 ZERO",
                "RW 2048 VMFSRDM \"x\"",
                "Unsupported extent type",
            ),
            ("RW 2048 ZERO", "RW 0 ZERO", "Invalid extent line"),
            (
                "monolithicFlat",
                "streamOptimized",
                "Unsupported image type",
            ),
            ("createType", "kind", "invalid VMDK image descriptor"),
        ] {
            let text = FLAT.replacen(from, to, 1);
            let e = Descriptor::parse_file(&text).unwrap_err();
            assert!(e.contains(error), "{to}: {e}");
        }
    }

    #[test]
    fn new_descriptors_read_back() {
        let lines = ["RW 10240 SPARSE \"d.vmdk\"".to_string()];
        let text = NewDescriptor {
            cid: 0x1234,
            parent_cid: 0xabcdef01,
            create_type: "twoGbMaxExtentSparse",
            parent_file: Some("base.vmdk"),
            extents: &lines,
            hw_version: "4",
            tools_version: "2147483647",
            adapter_type: "ide",
            sectors: 10240,
        }
        .render();
        assert!(text.contains("ddb.geometry.cylinders = \"10\"\n"), "{text}");
        let d = Descriptor::parse_file(&text).unwrap();
        assert_eq!((d.cid, d.parent_cid), (0x1234, 0xabcdef01));
        assert_eq!(d.parent_file.as_deref(), Some("base.vmdk"));
        let changed = String::from_utf8(with_cid(text.as_bytes(), 7)).unwrap();
        let d = Descriptor::parse_file(&changed).unwrap();
        assert_eq!(d.cid, 7);
    }
}
