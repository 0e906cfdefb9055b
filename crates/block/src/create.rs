//! Creating new images: `blockd serve`'s first image, drive-backup's targets, and
//! blockdev-create's `file`, `qcow2` and `luks` drivers (formats written onto an open node,
//! QEMU's two-step flow).

use crate::drivers::file::{FileDriver, FileOptions};
use crate::drivers::luks::{create_volume, new_volume, LuksCreateOptions};
use crate::drivers::qcow2::{Compression, NewEncryption, NewQcow2};
use crate::node::{Child, CommonOptions, Node, Parent, WriteFlags};
use crate::open::parse_options;
use crate::perm::Perms;
use crate::OptionSyntax;
use imago::Storage;
use serde_json::Value;
use std::io;
use std::path::Path;
use std::sync::Arc;

/// What a new image looks like.
pub struct NewImage<'a> {
    /// `"raw"` or `"qcow2"`; any other format is refused.
    pub format: &'a str,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Backing file name and format written into a qcow2 header.
    pub backing: Option<(String, String)>,
}

/// Opens `path` for writing, creating it, and empties it once nobody else (another
/// process, or a node of ours) uses it: truncating an image that is open elsewhere would
/// destroy it. QEMU takes the same locks first, and refuses with the same text.
async fn open_emptied(path: &Path) -> Result<aio::ImageFile, String> {
    let file = aio::OpenOptions::new(path)
        .create(true)
        .writable(true)
        .open()
        .await
        .map_err(|e| format!("Could not create '{}': {}", path.display(), os_text(&e)))?;
    let held = aio::Perms::WRITE.union(aio::Perms::RESIZE);
    file.set_perms(held, held.complement())
        .map_err(|e| match aio::LockConflict::from_io(&e) {
            Some(conflict) => conflict.message().to_string(),
            None => e.to_string(),
        })?;
    file.truncate(0)
        .await
        .map_err(|e| format!("Could not resize file: {}", os_text(&e)))?;
    Ok(file)
}

/// Create (or overwrite) an image file. Runs on an I/O thread: the file I/O goes through
/// the aio crate, never blocking the thread. Err is the text for the client.
pub async fn create_image(path: &Path, image: NewImage<'_>) -> Result<(), String> {
    let fail = |e: io::Error| format!("Could not create '{}': {}", path.display(), os_text(&e));
    match image.format {
        "raw" => {
            if image.backing.is_some() {
                return Err("Backing file not supported for file format 'raw'".into());
            }
            let file = open_emptied(path).await?;
            file.truncate(image.size).await.map_err(fail)
        }
        "qcow2" => {
            drop(open_emptied(path).await?);
            let edge = file_edge(path).await?;
            let new = NewQcow2 {
                size: image.size,
                version: 3,
                cluster_bits: 16,
                refcount_order: 4,
                lazy_refcounts: false,
                compression: Compression::Zlib,
                extended_l2: false,
                data_file: None,
                data_file_raw: false,
                backing: image
                    .backing
                    .as_ref()
                    .map(|(name, format)| (name.as_str(), Some(format.as_str()))),
                preallocate: Prealloc::Off,
                encryption: None,
            };
            new.write(&edge).await.map_err(fail)
        }
        other => Err(format!("Driver '{other}' does not support image creation")),
    }
}

/// A writable edge to the file at `path`, outside the graph: what a new qcow2 image is
/// written through.
async fn file_edge(path: &Path) -> Result<Arc<Child>, String> {
    let options = FileOptions {
        filename: path.to_string_lossy().into_owned(),
        pr_manager: None,
        locking: None,
        aio: None,
        aio_max_batch: None,
        drop_cache: None,
        x_check_cache_dropped: None,
    };
    let common = CommonOptions::default();
    let driver = FileDriver::open("file", options, &common).await?;
    let node = Node::new(
        "#create".into(),
        true,
        Box::new(driver),
        common,
        serde_json::Value::Null,
    );
    Node::attach(
        &node,
        "file",
        Parent::User {
            kind: "block-backend",
            name: String::new(),
        },
        Perms::WRITE | Perms::RESIZE,
        Perms::ALL,
    )
}

/// QEMU's `PreallocMode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prealloc {
    #[default]
    Off,
    Metadata,
    Falloc,
    Full,
}

impl Prealloc {
    fn as_str(self) -> &'static str {
        match self {
            Prealloc::Off => "off",
            Prealloc::Metadata => "metadata",
            Prealloc::Falloc => "falloc",
            Prealloc::Full => "full",
        }
    }
}

/// Zeroes written per request for `preallocation=full`.
const ZERO_CHUNK: u64 = 1 << 20;

/// Preallocate `len` bytes at `start` of a new image's data through `target`: `falloc`
/// allocates them as zeroes, `full` writes the zeroes; `off` and `metadata` leave them.
pub(crate) async fn preallocate(
    target: &Child,
    start: u64,
    len: u64,
    mode: Prealloc,
) -> io::Result<()> {
    let plain = WriteFlags::default();
    match mode {
        Prealloc::Off | Prealloc::Metadata => Ok(()),
        Prealloc::Falloc => target.write_zeroes(start, len, plain).await,
        Prealloc::Full => {
            let zeroes = vec![0u8; ZERO_CHUNK.min(len) as usize];
            let mut at = start;
            while at < start + len {
                let n = ZERO_CHUNK.min(start + len - at);
                target.write(at, &zeroes[..n as usize], plain).await?;
                at += n;
            }
            Ok(())
        }
    }
}

/// blockdev-create's `file` driver (`BlockdevCreateOptionsFile`).
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FileCreate {
    /// Path of the file to create, or to empty if it exists (QMP `filename`).
    pub filename: String,
    /// Size of the new file in bytes (QMP `size`).
    pub size: i64,
    /// QMP `preallocation`: `off`, `falloc` or `full`; `metadata` is refused, as QEMU's
    /// file driver does.
    #[serde(default)]
    pub preallocation: Prealloc,
    /// Turn off copy-on-write for the file's data where the file system has it (btrfs's
    /// `FS_NOCOW_FL`; QMP `nocow`).
    #[serde(default)]
    pub nocow: bool,
    /// XFS extent size hint in bytes, 1 MiB when absent, 0 for none (QMP
    /// `extent-size-hint`); at most `u32::MAX`.
    pub extent_size_hint: Option<i64>,
}

/// QEMU's default extent size hint for new files (only XFS-like file systems take it).
const DEFAULT_EXTENT_SIZE_HINT: i64 = 1 << 20;

impl FileCreate {
    /// Create (or empty) the file and give it its size. Runs on an I/O thread.
    pub async fn create(&self) -> Result<(), String> {
        let mode = match self.preallocation {
            Prealloc::Off => imago::storage::PreallocateMode::None,
            Prealloc::Falloc => imago::storage::PreallocateMode::Allocate,
            Prealloc::Full => imago::storage::PreallocateMode::WriteData,
            Prealloc::Metadata => {
                return Err(format!(
                    "Unsupported preallocation mode: {}",
                    self.preallocation.as_str()
                ))
            }
        };
        let hint = self.extent_size_hint.unwrap_or(DEFAULT_EXTENT_SIZE_HINT);
        let hint = u32::try_from(hint)
            .map_err(|_| "Extent size hint exceeds the maximum of 4294967295 bytes".to_string())?;
        let path = Path::new(&self.filename);
        let file = open_emptied(path).await?;
        // Both only help on some file systems and must be set while the file is empty;
        // like QEMU, a file system that refuses them still gets its image.
        if let Err(e) = set_file_hints(path, self.nocow, hint) {
            tracing::debug!(file = %self.filename, "file creation hints not applied: {e}");
        }
        let size =
            u64::try_from(self.size).map_err(|_| "Could not resize file: Invalid argument")?;
        Storage::resize(&file, size, mode)
            .await
            .map_err(|e| format!("Could not resize file: {}", os_text(&e)))?;
        file.flush()
            .await
            .map_err(|e| format!("Could not flush '{}': {}", self.filename, os_text(&e)))
    }
}

/// `FS_NOCOW_FL` (btrfs: no copy-on-write for the file's data).
const FS_NOCOW_FL: libc::c_long = 0x0080_0000;
/// `FS_XFLAG_EXTSIZE`, with the `fsxattr` ioctls (XFS extent size hint).
const FS_XFLAG_EXTSIZE: u32 = 0x800;
const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;
const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401c_5820;

#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

fn set_file_hints(path: &Path, nocow: bool, extent_size_hint: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path)?;
    let fd = file.as_raw_fd();
    if nocow {
        let mut flags: libc::c_long = 0;
        // Safety: both ioctls read or write one c_long through a pointer to ours.
        unsafe {
            if libc::ioctl(fd, libc::FS_IOC_GETFLAGS, &mut flags) == 0 {
                flags |= FS_NOCOW_FL;
                libc::ioctl(fd, libc::FS_IOC_SETFLAGS, &flags);
            }
        }
    }
    if extent_size_hint > 0 {
        let mut attr = FsXattr::default();
        // Safety: the fsxattr ioctls take a pointer to a struct fsxattr, which FsXattr mirrors.
        unsafe {
            if libc::ioctl(fd, FS_IOC_FSGETXATTR as _, &mut attr) != 0 {
                return Err(io::Error::last_os_error());
            }
            attr.xflags |= FS_XFLAG_EXTSIZE;
            attr.extsize = extent_size_hint;
            if libc::ioctl(fd, FS_IOC_FSSETXATTR as _, &attr) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// blockdev-create's `vdi` driver (BlockdevCreateOptionsVdi) less its `file`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VdiCreate {
    size: i64,
    /// `metadata` makes a static image (every block mapped); `off` a dynamic one.
    #[serde(default)]
    preallocation: Prealloc,
}

impl VdiCreate {
    /// Write a new image onto the node `file` leads to (what was there is lost). Runs on
    /// an I/O thread.
    pub async fn create_on(&self, file: Arc<Child>) -> Result<(), String> {
        use crate::drivers::vdi;
        let size = u64::try_from(self.size).map_err(|_| "Invalid image size".to_string())?;
        let size = size.next_multiple_of(512);
        let max = vdi::MAX_BLOCKS * vdi::BLOCK_SIZE;
        if size > max {
            return Err(format!(
                "Unsupported VDI image size (size is 0x{size:x}, max supported is 0x{max:x})"
            ));
        }
        let fixed = match self.preallocation {
            Prealloc::Off => false,
            Prealloc::Metadata => true,
            _ => return Err("Preallocation mode not supported for vdi".into()),
        };
        let mut uuids = [[0u8; 16]; 2];
        for uuid in &mut uuids {
            crypto::random(uuid)?;
            uuid[7] = (uuid[7] & 0x0f) | 0x40;
            uuid[8] = (uuid[8] & 0x3f) | 0x80;
        }
        let (header, bmap, end) = vdi::new_image(size, fixed, uuids);
        let node = file.node();
        let io_err = |e: io::Error| os_text(&e);
        node.truncate(0).await.map_err(io_err)?;
        node.truncate(end).await.map_err(io_err)?;
        let plain = WriteFlags::default();
        file.write(0, &header, plain).await.map_err(io_err)?;
        file.write(vdi::HEADER_LEN as u64, &bmap, plain)
            .await
            .map_err(io_err)?;
        file.flush().await.map_err(io_err)
    }
}

/// blockdev-create's `qcow` driver (BlockdevCreateOptionsQcow) less its `file`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct QcowCreate {
    size: i64,
    backing_file: Option<String>,
    /// QCryptoBlockCreateOptions: refused, blockd makes no AES-encrypted qcow image.
    encrypt: Option<Value>,
}

impl QcowCreate {
    /// Write a new image onto the node `file` leads to (what was there is lost). Runs on
    /// an I/O thread.
    pub async fn create_on(&self, file: Arc<Child>) -> Result<(), String> {
        if self.encrypt.is_some() {
            return Err("blockd does not create AES-encrypted qcow images".into());
        }
        let size = u64::try_from(self.size).map_err(|_| "Invalid image size".to_string())?;
        if size == 0 {
            return Err("Image size is too small, cannot be zero length".into());
        }
        // The L1 table QEMU would accept (at most 2^31 bytes of it), at the smallest
        // coverage per entry new images get (4 KiB clusters, 512 entries).
        if size.div_ceil(1 << 21) > i32::MAX as u64 / 8 {
            return Err("Image too large".into());
        }
        if let Some(name) = &self.backing_file {
            if name.len() > 1023 {
                return Err("Backing file name too long".into());
            }
        }
        let image = crate::drivers::qcow::new_image(size, self.backing_file.as_deref());
        let node = file.node();
        let io_err = |e: io::Error| os_text(&e);
        node.truncate(0).await.map_err(io_err)?;
        node.truncate(image.len() as u64).await.map_err(io_err)?;
        file.write(0, &image, WriteFlags::default())
            .await
            .map_err(io_err)?;
        file.flush().await.map_err(io_err)
    }
}

/// blockdev-create's `qed` driver (BlockdevCreateOptionsQed) less its `file`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct QedCreate {
    size: i64,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
    cluster_size: Option<i64>,
    table_size: Option<i64>,
}

impl QedCreate {
    /// Write a new image onto the node `file` leads to (what was there is lost). Runs on
    /// an I/O thread.
    pub async fn create_on(&self, file: Arc<Child>) -> Result<(), String> {
        let cluster_size = self.cluster_size.unwrap_or(65536);
        if !(4096..=64 << 20).contains(&cluster_size) || !(cluster_size as u64).is_power_of_two() {
            return Err(
                "QED cluster size must be within range [4096, 67108864] and power of 2".into(),
            );
        }
        let table_size = self.table_size.unwrap_or(4);
        if !(1..=16).contains(&table_size) || !(table_size as u64).is_power_of_two() {
            return Err("QED table size must be within range [1, 16] and power of 2".into());
        }
        let (cluster_size, table_size) = (cluster_size as u64, table_size as u64);
        let entries = table_size * cluster_size / 8;
        let max = entries.saturating_mul(entries).saturating_mul(cluster_size);
        let size = u64::try_from(self.size)
            .ok()
            .filter(|s| s.is_multiple_of(512) && *s <= max)
            .ok_or_else(|| {
                format!(
                    "QED image size must be a non-zero multiple of cluster size and less than {max} bytes"
                )
            })?;
        let backing = match &self.backing_file {
            Some(name) if name.len() > 1023 => return Err("Backing file name too long".into()),
            Some(name) => Some((name.as_str(), self.backing_fmt.as_deref() == Some("raw"))),
            None => None,
        };
        let (header, first) =
            crate::drivers::qed::new_image(size, cluster_size, table_size, backing);
        let node = file.node();
        let io_err = |e: io::Error| os_text(&e);
        node.truncate(0).await.map_err(io_err)?;
        node.truncate(header.l1_offset + table_size * cluster_size)
            .await
            .map_err(io_err)?;
        file.write(0, &first, WriteFlags::default())
            .await
            .map_err(io_err)?;
        file.flush().await.map_err(io_err)
    }
}

/// blockdev-create's `parallels` driver (BlockdevCreateOptionsParallels) less its `file`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ParallelsCreate {
    size: i64,
    cluster_size: Option<i64>,
}

impl ParallelsCreate {
    /// Write a new image onto the node `file` leads to (what was there is lost). Runs on
    /// an I/O thread.
    pub async fn create_on(&self, file: Arc<Child>) -> Result<(), String> {
        let size = u64::try_from(self.size)
            .ok()
            .filter(|s| s.is_multiple_of(512))
            .ok_or("Image size must be a multiple of 512 bytes")?;
        let cluster_size = u64::try_from(self.cluster_size.unwrap_or(1 << 20))
            .ok()
            .filter(|c| *c > 0 && c.is_multiple_of(512))
            .ok_or("Cluster size must be a multiple of 512 bytes")?;
        if cluster_size >= 1 << 32 {
            return Err("Cluster size is too large".into());
        }
        if size >= (1u64 << 32).saturating_mul(cluster_size) {
            return Err("Image size is too large for this cluster size".into());
        }
        let image = crate::drivers::parallels::new_image(size, cluster_size);
        let node = file.node();
        let io_err = |e: io::Error| os_text(&e);
        node.truncate(0).await.map_err(io_err)?;
        node.truncate(image.len() as u64).await.map_err(io_err)?;
        file.write(0, &image, WriteFlags::default())
            .await
            .map_err(io_err)?;
        file.flush().await.map_err(io_err)
    }
}

/// BlockdevVpcSubformat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VpcSubformat {
    #[default]
    Dynamic,
    Fixed,
}

/// blockdev-create's `vpc` driver (BlockdevCreateOptionsVpc) less its `file`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VpcCreate {
    size: i64,
    #[serde(default)]
    subformat: VpcSubformat,
    #[serde(default)]
    force_size: bool,
}

impl VpcCreate {
    /// Write a new image onto the node `file` leads to (what was there is lost). Runs on
    /// an I/O thread.
    pub async fn create_on(&self, file: Arc<Child>) -> Result<(), String> {
        let size = u64::try_from(self.size).map_err(|_| "Invalid image size".to_string())?;
        let mut uuid = [0u8; 16];
        crypto::random(&mut uuid)?;
        uuid[6] = (uuid[6] & 0x0f) | 0x40;
        uuid[8] = (uuid[8] & 0x3f) | 0x80;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let fixed = self.subformat == VpcSubformat::Fixed;
        let image = crate::drivers::vpc::NewVpc {
            size,
            fixed,
            force_size: self.force_size,
            uuid,
            now,
        };
        let (footer, dynamic, sectors) = image.layout()?;
        let node = file.node();
        let io_err = |e: io::Error| os_text(&e);
        let plain = WriteFlags::default();
        // The footer ends the file: a fixed image's after the disk, a dynamic one's after
        // the dynamic header and its table (a copy of it starts the file).
        let footer_at = if fixed {
            sectors * 512
        } else {
            512 + dynamic.len() as u64
        };
        node.truncate(0).await.map_err(io_err)?;
        node.truncate(footer_at + footer.len() as u64)
            .await
            .map_err(io_err)?;
        if !fixed {
            file.write(0, &footer, plain).await.map_err(io_err)?;
            file.write(512, &dynamic, plain).await.map_err(io_err)?;
        }
        file.write(footer_at, &footer, plain)
            .await
            .map_err(io_err)?;
        file.flush().await.map_err(io_err)
    }
}

/// QCryptoBlockCreateOptions of a new qcow2 image.
pub enum EncryptCreate {
    /// Legacy AES, keyed by the password itself.
    Qcow {
        key_secret: Option<String>,
    },
    Luks(LuksCreateOptions),
}

/// blockdev-create's `luks` driver (BlockdevCreateOptionsLUKS) less its `file` and
/// `header` references.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LuksCreate {
    size: i64,
    #[serde(default)]
    preallocation: Prealloc,
    key_secret: Option<String>,
    cipher_alg: Option<String>,
    cipher_mode: Option<String>,
    ivgen_alg: Option<String>,
    ivgen_hash_alg: Option<String>,
    hash_alg: Option<String>,
    iter_time: Option<i64>,
}

impl LuksCreate {
    /// Write the volume onto the nodes `file` and `header` lead to, with the password the
    /// graph's secret `key-secret` holds. Runs on an I/O thread.
    pub async fn create_on(
        &self,
        graph: &crate::Graph,
        file: Option<Arc<Child>>,
        header: Option<Arc<Child>>,
    ) -> Result<(), String> {
        let crypt = LuksCreateOptions {
            key_secret: self.key_secret.clone(),
            cipher_alg: self.cipher_alg.clone(),
            cipher_mode: self.cipher_mode.clone(),
            ivgen_alg: self.ivgen_alg.clone(),
            ivgen_hash_alg: self.ivgen_hash_alg.clone(),
            hash_alg: self.hash_alg.clone(),
            iter_time: self.iter_time,
        };
        let (key_secret, opts) = crypt.resolve("", header.is_some())?;
        let password = graph.password(&key_secret)?;
        let size = u64::try_from(self.size).map_err(|_| "Invalid image size".to_string())?;
        let preallocation = match self.preallocation {
            // The payload has no metadata to preallocate.
            Prealloc::Metadata => Prealloc::Off,
            other => other,
        };
        create_volume(file, header, size, preallocation, opts, password).await
    }
}

/// QEMU's qcow2 version choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Qcow2Version {
    V2,
    V3,
}

/// QEMU's `Qcow2CompressionType`, for compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionType {
    Zlib,
    Zstd,
}

/// blockdev-create's `qcow2` driver (`BlockdevCreateOptionsQcow2`) without `file`, which
/// the caller resolves to a node.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Qcow2Create {
    /// Virtual disk size in bytes, a multiple of 512 (QMP `size`).
    pub size: i64,
    /// QMP `version`: v3 when absent.
    pub version: Option<Qcow2Version>,
    /// Backing file name written into the header, not opened (QMP `backing-file`).
    pub backing_file: Option<String>,
    /// Backing format written beside the name, none when absent (QMP `backing-fmt`).
    pub backing_fmt: Option<String>,
    /// Cluster size in bytes, a power of two from 512 to 2 MiB, 64 KiB when absent (QMP
    /// `cluster-size`).
    pub cluster_size: Option<i64>,
    /// QMP `preallocation`: `metadata` allocates the metadata, `falloc` and `full` the
    /// data clusters too.
    #[serde(default)]
    pub preallocation: Prealloc,
    /// Set the lazy refcounts compatible feature bit in the new header (QMP
    /// `lazy-refcounts`; v3 only).
    #[serde(default)]
    pub lazy_refcounts: bool,
    /// Refcount entry width in bits, a power of two up to 64, 16 when absent (QMP
    /// `refcount-bits`).
    pub refcount_bits: Option<i64>,
    /// QMP `extended-l2`: 32 subclusters per cluster (v3, clusters of at least 16 KiB).
    #[serde(default)]
    pub extended_l2: bool,
    /// QMP `data-file`: the node guest data goes to (a node name or a definition), which
    /// the caller resolves and hands to `create_on`.
    pub data_file: Option<serde_json::Value>,
    /// QMP `data-file-raw`: keep the data file a raw image of the disk (every cluster
    /// mapped from the start, so `preallocation` is at least `metadata`).
    pub data_file_raw: Option<bool>,
    /// QMP `encrypt`: refused, so kept unparsed.
    pub encrypt: Option<serde_json::Value>,
    /// QMP `compression-type`: zlib when absent.
    pub compression_type: Option<CompressionType>,
}

impl Qcow2Create {
    /// QEMU's checks of the options, in QEMU's order and words, then what the qcow2 driver
    /// cannot write yet (encryption).
    pub fn check(&self) -> Result<(), String> {
        if self.size % 512 != 0 {
            return Err("Image size must be a multiple of 512 bytes".into());
        }
        let v3 = self.version != Some(Qcow2Version::V2);
        let cluster_size = self.cluster_size.unwrap_or(65536);
        if !(512..=2 << 20).contains(&cluster_size) || cluster_size.count_ones() != 1 {
            return Err("Cluster size must be a power of two between 512 and 2048k".into());
        }
        if self.extended_l2 {
            if !v3 {
                return Err("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)".into());
            }
            if cluster_size < 16384 {
                return Err(
                    "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                        .into(),
                );
            }
        }
        let refcount_bits = self.refcount_bits.unwrap_or(16);
        if !(1..=64).contains(&refcount_bits) || refcount_bits.count_ones() != 1 {
            return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
        }
        if !v3 && refcount_bits != 16 {
            return Err("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)".into());
        }
        if !v3 && self.lazy_refcounts {
            return Err("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)".into());
        }
        if self.backing_file.is_some() && self.preallocation != Prealloc::Off && !self.extended_l2 {
            return Err("Backing file and preallocation can only be used at the same time if extended_l2 is on".into());
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return Err("Backing format cannot be used without backing file".into());
        }
        if !v3 && self.data_file.is_some() {
            return Err("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)".into());
        }
        if self.data_file_raw.is_some() && self.data_file.is_none() {
            return Err("'data-file-raw' requires 'data-file'".into());
        }
        if self.data_file_raw == Some(true) && self.backing_file.is_some() {
            return Err("Backing file and data-file-raw cannot be used at the same time".into());
        }
        if !v3 && self.compression_type == Some(CompressionType::Zstd) {
            return Err("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)".into());
        }
        if self.encrypt.is_some() && self.data_file.is_some() {
            return Err(
                "blockd cannot create encrypted qcow2 images with an external data file".into(),
            );
        }
        Ok(())
    }

    /// `encrypt` read as QCryptoBlockCreateOptions: what QMP refuses before a job starts
    /// (a missing or unknown format, unknown members).
    pub fn encrypt_options(&self) -> Result<Option<EncryptCreate>, String> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "kebab-case", deny_unknown_fields)]
        struct QcowOptions {
            key_secret: Option<String>,
        }
        let Some(encrypt) = &self.encrypt else {
            return Ok(None);
        };
        let Value::Object(mut map) = encrypt.clone() else {
            return Err(
                "Invalid parameter type for 'options.encrypt', expected: QCryptoBlockCreateOptions"
                    .into(),
            );
        };
        let path = Some("options.encrypt");
        let format = match map.remove("format") {
            Some(Value::String(format)) => format,
            Some(_) => {
                return Err(
                    "Invalid parameter type for 'options.encrypt.format', expected: string".into(),
                )
            }
            None => return Err("Parameter 'options.encrypt.format' is missing".into()),
        };
        let parsed = match format.as_str() {
            "luks" => EncryptCreate::Luks(
                parse_options(Value::Object(map), OptionSyntax::Json, path).map_err(|e| e.desc)?,
            ),
            "qcow" => {
                let qcow: QcowOptions = parse_options(Value::Object(map), OptionSyntax::Json, path)
                    .map_err(|e| e.desc)?;
                EncryptCreate::Qcow {
                    key_secret: qcow.key_secret,
                }
            }
            other => {
                return Err(format!(
                    "Parameter 'options.encrypt.format' does not accept value '{other}'"
                ))
            }
        };
        Ok(Some(parsed))
    }

    /// The encryption `encrypt` asks for: a new LUKS volume for the password of its
    /// `key-secret`, or legacy AES (`qcow`).
    async fn encryption(&self, graph: &crate::Graph) -> Result<Option<NewEncryption>, String> {
        match self.encrypt_options()? {
            None => Ok(None),
            Some(EncryptCreate::Luks(luks)) => {
                let (key_secret, opts) = luks.resolve("encrypt.", false)?;
                let password = graph.password(&key_secret)?;
                Ok(Some(NewEncryption::Luks(Box::new(
                    new_volume(opts, password).await?,
                ))))
            }
            Some(EncryptCreate::Qcow { key_secret }) => {
                let key_secret =
                    key_secret.ok_or("Parameter 'encrypt.key-secret' is required for cipher")?;
                graph.password(&key_secret)?;
                Ok(Some(NewEncryption::Aes))
            }
        }
    }

    /// Write a new image onto the node `file` leads to (what was there is lost), through
    /// `file`, an edge that may write and resize; with `data_file`, its name for the header
    /// and an edge that may write and resize it. Runs on an I/O thread; `check` first.
    pub async fn create_on(
        &self,
        graph: &crate::Graph,
        file: Arc<Child>,
        data_file: Option<(String, Arc<Child>)>,
    ) -> Result<(), String> {
        let size = u64::try_from(self.size).map_err(|_| "Invalid image size".to_string())?;
        let encryption = self.encryption(graph).await?;
        let image = NewQcow2 {
            size,
            version: match self.version {
                Some(Qcow2Version::V2) => 2,
                _ => 3,
            },
            cluster_bits: self.cluster_size.unwrap_or(65536).trailing_zeros(),
            refcount_order: self.refcount_bits.unwrap_or(16).trailing_zeros(),
            lazy_refcounts: self.lazy_refcounts,
            compression: match self.compression_type {
                Some(CompressionType::Zstd) => Compression::Zstd,
                _ => Compression::Zlib,
            },
            extended_l2: self.extended_l2,
            data_file: data_file
                .as_ref()
                .map(|(name, edge)| (name.as_str(), edge.clone())),
            data_file_raw: self.data_file_raw == Some(true),
            backing: self
                .backing_file
                .as_deref()
                .map(|name| (name, self.backing_fmt.as_deref())),
            preallocate: match self.preallocation {
                // A raw data file needs every cluster mapped, as QEMU makes it.
                Prealloc::Off if self.data_file_raw == Some(true) => Prealloc::Metadata,
                other => other,
            },
            encryption: encryption.as_ref(),
        };
        image
            .write(&file)
            .await
            .map_err(|e| match (&e.raw_os_error(), &self.backing_file) {
                (Some(libc::ENOSPC | libc::EINVAL), Some(name)) => format!(
                    "Could not assign backing file '{name}' with format '{}': {}",
                    self.backing_fmt.as_deref().unwrap_or(""),
                    os_text(&e)
                ),
                _ => os_text(&e),
            })
    }
}

/// An OS error as QEMU words it: the strerror text alone.
fn os_text(e: &io::Error) -> String {
    crate::drivers::file::os_error_text(e)
}
