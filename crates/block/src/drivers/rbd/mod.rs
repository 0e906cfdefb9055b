//! `rbd`: disks in a Ceph cluster (RADOS block devices), through librbd.
//!
//! Options are qsd 10's BlockdevOptionsRbd. Data moves through librbd's aio calls, so an
//! I/O thread never waits on the cluster; the calls librbd only has in blocking form
//! (connect, open, resize, snapshots, the allocation walk) run on the blocking pool.
//! Block status comes from `rbd_diff_iterate2`: ranges the image never wrote (or
//! discarded) read as zeroes, so NBD's base:allocation, backup and mirror skip them.
//! Internal snapshots are RBD snapshots, named as given (QEMU's rbd gives them the name as
//! their ID too); a snapshot opens read-only. A node handed over for migration drops
//! librbd's cache when it takes the image back. `encrypt` is librbd's own LUKS (librbd
//! formats and unlocks it; the node sees plain data).

mod librbd;

use crate::node::{DriverInfo, Extent, ExtentKind, Node, SnapshotInfo, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::{Driver, Graph};
use aio::pool::MAX_BUF;
use aio::IoBuf;
use async_trait::async_trait;
use base64::Engine;
use librbd::{Cipher, ConnectOptions, Luks, Pool, RbdImage};
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::io;
use std::sync::Arc;

/// InetSocketAddressBase: one monitor.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct MonitorAddr {
    pub host: String,
    pub port: String,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RbdAuthMode {
    Cephx,
    None,
}

/// RbdImageEncryptionFormat.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RbdEncryptionFormat {
    Luks,
    Luks2,
    LuksAny,
}

impl RbdEncryptionFormat {
    fn as_str(self) -> &'static str {
        match self {
            RbdEncryptionFormat::Luks => "luks",
            RbdEncryptionFormat::Luks2 => "luks2",
            RbdEncryptionFormat::LuksAny => "luks-any",
        }
    }
}

/// RbdEncryptionOptions: librbd's own LUKS, unlocked at open.
#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RbdEncryption {
    pub format: RbdEncryptionFormat,
    pub key_secret: String,
    /// Layered encryption (a clone's parent encrypted apart) needs librbd 17's
    /// rbd_encryption_load2; refused.
    pub parent: Option<Value>,
}

/// The bytes of secret `id` (binary keys and passphrases are not text).
fn secret_bytes(graph: &Graph, id: &str) -> Result<Arc<crypto::Secret>, String> {
    graph
        .secrets
        .get(id)
        .ok_or_else(|| format!("No secret with id '{id}'"))
}

/// BlockdevOptionsRbd.
#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RbdOptions {
    pub pool: String,
    pub namespace: Option<String>,
    pub image: String,
    pub conf: Option<String>,
    pub snapshot: Option<String>,
    pub encrypt: Option<RbdEncryption>,
    pub user: Option<String>,
    pub auth_client_required: Option<Vec<RbdAuthMode>>,
    pub key_secret: Option<String>,
    pub server: Option<Vec<MonitorAddr>>,
}

impl RbdOptions {
    /// How to reach the pool, the key looked up in the graph's secrets; `cache` is
    /// librbd's write-back cache (off with `cache.direct`).
    fn connect_options(&self, graph: &Graph, cache: bool) -> Result<ConnectOptions, String> {
        let key = match &self.key_secret {
            // A cephx key is binary: the secret holds its bytes, librados takes base64
            // (QEMU's qcrypto_secret_lookup_as_base64).
            Some(id) => {
                let secret = secret_bytes(graph, id)?;
                Some(base64::engine::general_purpose::STANDARD.encode(secret.bytes()))
            }
            None => None,
        };
        // QEMU's form: monitors separated by ';', IPv6 hosts in brackets.
        let mon_host = self.server.as_ref().map(|servers| {
            servers
                .iter()
                .map(|s| match s.host.contains(':') {
                    true => format!("[{}]:{}", s.host, s.port),
                    false => format!("{}:{}", s.host, s.port),
                })
                .collect::<Vec<_>>()
                .join(";")
        });
        let auth_client_required = self.auth_client_required.as_ref().map(|modes| {
            modes
                .iter()
                .map(|m| match m {
                    RbdAuthMode::Cephx => "cephx",
                    RbdAuthMode::None => "none",
                })
                .collect::<Vec<_>>()
                .join(";")
        });
        Ok(ConnectOptions {
            conf: self.conf.clone(),
            user: self.user.clone(),
            pool: self.pool.clone(),
            namespace: self.namespace.clone(),
            mon_host,
            key,
            auth_client_required,
            cache,
        })
    }
}

pub struct Rbd {
    image: Arc<RbdImage>,
    /// Opened read-only where the node was not asked to be (a snapshot under
    /// auto-read-only): writers are refused.
    read_only_image: bool,
    /// The object size: QEMU reports it as the cluster size.
    object_size: Option<u64>,
    /// The LUKS version unlocked at open, if the image is encrypted.
    encryption: Option<Luks>,
}

/// The most block status looks at in one walk of the image's objects.
const STATUS_MAX: u64 = 1 << 30;

/// Runs blocking librbd work on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| io::Error::other(format!("librbd worker failed: {e}")))?
}

impl Rbd {
    fn snapshot_info(name: &str) -> SnapshotInfo {
        SnapshotInfo {
            id: name.to_string(),
            name: name.to_string(),
            vm_state_size: 0,
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            icount: None,
        }
    }
}

#[async_trait(?Send)]
impl Driver for Rbd {
    fn format_name(&self) -> &'static str {
        "rbd"
    }

    fn size(&self, _node: &Node) -> u64 {
        self.image.size().unwrap_or(0)
    }

    async fn read(&self, _node: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_BUF);
            let piece = self
                .image
                .read(offset + done as u64, IoBuf::new(n)?)
                .await?;
            buf[done..done + n].copy_from_slice(piece.as_slice());
            done += n;
        }
        Ok(())
    }

    /// Reads and calls it data: block status walks the image's objects on the blocking
    /// pool, far dearer than the read itself, so an NBD read must not ask for it (that made
    /// 4K random reads over NBD a third of librbd's own rate).
    async fn read_or_zero(
        &self,
        node: &Node,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<Option<bool>> {
        self.read(node, offset, buf).await?;
        Ok(Some(false))
    }

    async fn read_buf(&self, node: &Node, offset: u64, mut buf: IoBuf) -> io::Result<IoBuf> {
        if buf.len() <= MAX_BUF {
            return self.image.read(offset, buf).await;
        }
        self.read(node, offset, buf.as_mut_slice()).await?;
        Ok(buf)
    }

    async fn write(
        &self,
        _node: &Node,
        offset: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_BUF);
            let mut piece = IoBuf::new(n)?;
            piece.as_mut_slice().copy_from_slice(&buf[done..done + n]);
            self.image.write(offset + done as u64, piece).await?;
            done += n;
        }
        if flags.fua {
            self.image.flush().await?;
        }
        Ok(())
    }

    async fn write_buf(
        &self,
        node: &Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> io::Result<IoBuf> {
        if buf.len() > MAX_BUF {
            self.write(node, offset, buf.as_slice(), flags).await?;
            return Ok(buf);
        }
        let buf = self.image.write(offset, buf).await?;
        if flags.fua {
            self.image.flush().await?;
        }
        Ok(buf)
    }

    async fn write_zeroes(
        &self,
        _node: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        self.image
            .write_zeroes(offset, len as usize, flags.may_unmap)
            .await?;
        if flags.fua {
            self.image.flush().await?;
        }
        Ok(())
    }

    async fn discard(&self, _node: &Node, offset: u64, len: u64) -> io::Result<()> {
        self.image.discard(offset, len).await
    }

    async fn flush(&self, _node: &Node) -> io::Result<()> {
        self.image.flush().await
    }

    async fn block_status(&self, _node: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        let image = self.image.clone();
        let len = len.min(STATUS_MAX);
        let (allocated, len) = blocking(move || image.allocation(offset, len)).await?;
        let kind = if allocated {
            ExtentKind::Data
        } else {
            ExtentKind::Zero { allocated: false }
        };
        Ok(Extent { len, kind })
    }

    async fn truncate(&self, _node: &Node, size: u64) -> io::Result<()> {
        let image = self.image.clone();
        blocking(move || image.resize(size)).await
    }

    fn child_perms(&self, _: &str, _: Perms, _: Perms, _: bool) -> (Perms, Perms) {
        (Perms::NONE, Perms::ALL)
    }

    fn apply_perms(&self, perm: Perms, _shared: Perms) -> Result<(), String> {
        if self.read_only_image && perm.intersects(Perms::WRITE | Perms::RESIZE) {
            return Err("rbd snapshots are read-only".into());
        }
        Ok(())
    }

    fn info(&self, node: &Node) -> DriverInfo {
        DriverInfo {
            filename: crate::graph::full_json_filename(node),
            cluster_size: self.object_size,
            encrypted: self.encryption.is_some(),
            // ImageInfoSpecificRbd.
            format_specific: self.encryption.map(|luks| {
                let format = match luks {
                    Luks::V1 => "luks",
                    Luks::V2 => "luks2",
                };
                serde_json::json!({"type": "rbd", "data": {"encryption-format": format}})
            }),
            ..DriverInfo::default()
        }
    }

    /// Taking the image back from another client (migration): librbd's cache may hold
    /// what that client has since overwritten.
    async fn activate(&self, _node: &Node) -> Result<(), String> {
        let image = self.image.clone();
        blocking(move || image.invalidate_cache())
            .await
            .map_err(|e| format!("Could not invalidate the rbd cache: {e}"))
    }

    fn supports_internal_snapshots(&self) -> bool {
        true
    }

    fn internal_snapshots(&self) -> io::Result<Vec<SnapshotInfo>> {
        Ok(self
            .image
            .snapshots()?
            .iter()
            .map(|(_, name)| Rbd::snapshot_info(name))
            .collect())
    }

    async fn create_internal_snapshot(&self, node: &Node, name: &str) -> io::Result<SnapshotInfo> {
        // The snapshot must hold what was written before it.
        self.flush(node).await?;
        let image = self.image.clone();
        let owned = name.to_string();
        blocking(move || image.snap_create(&owned)).await?;
        Ok(Rbd::snapshot_info(name))
    }

    async fn delete_internal_snapshot(
        &self,
        _node: &Node,
        id: Option<&str>,
        name: Option<&str>,
    ) -> io::Result<Option<SnapshotInfo>> {
        // RBD snapshots have one name, which is also their QEMU ID: both given must agree.
        let wanted = match (id, name) {
            (Some(id), Some(name)) if id != name => return Ok(None),
            (Some(s), _) | (None, Some(s)) => s.to_string(),
            (None, None) => return Ok(None),
        };
        if !self.image.snapshots()?.iter().any(|(_, n)| *n == wanted) {
            return Ok(None);
        }
        let image = self.image.clone();
        let owned = wanted.clone();
        blocking(move || image.snap_remove(&owned)).await?;
        Ok(Some(Rbd::snapshot_info(&wanted)))
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: false,
    hands_over: true,
    names: &["rbd"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let opts: RbdOptions = o.parse(options)?;
    let common = o.common();
    let connect = opts
        .connect_options(o.graph, !common.cache_direct)
        .map_err(QmpError::generic)?;
    let read_only = common.read_only || opts.snapshot.is_some();
    if opts.snapshot.is_some() && !common.read_only && !common.auto_read_only {
        return Err(QmpError::generic("rbd snapshots are read-only"));
    }
    let read_only_image = read_only && !common.read_only;
    let unlock = match &opts.encrypt {
        Some(e) if e.parent.is_some() => {
            return Err(QmpError::generic(
                "rbd layered encryption (encrypt.parent) needs librbd 17's \
                 rbd_encryption_load2, which blockd does not use",
            ))
        }
        Some(e) => Some((
            e.format,
            secret_bytes(o.graph, &e.key_secret).map_err(QmpError::generic)?,
        )),
        None => None,
    };
    let image_name = opts.image.clone();
    let snapshot = opts.snapshot.clone();
    let (image, object_size, encryption) = blocking(move || {
        let pool = Pool::connect(&connect).map_err(io::Error::other)?;
        let image = pool
            .open(&image_name, snapshot.as_deref(), read_only)
            .map_err(|e| {
                io::Error::other(format!("error reading header from {image_name}: {e}"))
            })?;
        let encryption = match unlock {
            Some((format, secret)) => Some(load_encryption(&image, format, secret.bytes())?),
            None => None,
        };
        let object_size = image.object_size()?;
        Ok((image, object_size, encryption))
    })
    .await
    .map_err(|e| QmpError::generic(e.to_string()))?;
    Ok(Box::new(Rbd {
        image: Arc::new(image),
        read_only_image,
        object_size: Some(object_size),
        encryption,
    }))
}

/// Unlocks the image's LUKS with `passphrase`; `luks-any` tries LUKS2, then LUKS1 (what
/// librbd 17 does itself). Returns the version that opened.
fn load_encryption(
    image: &RbdImage,
    format: RbdEncryptionFormat,
    passphrase: &[u8],
) -> io::Result<Luks> {
    let versions: &[Luks] = match format {
        RbdEncryptionFormat::Luks => &[Luks::V1],
        RbdEncryptionFormat::Luks2 => &[Luks::V2],
        RbdEncryptionFormat::LuksAny => &[Luks::V2, Luks::V1],
    };
    let mut failure = None;
    for &luks in versions {
        match image.encryption_load(luks, passphrase) {
            Ok(()) => return Ok(luks),
            Err(e) => failure = Some(e),
        }
    }
    let e = failure.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL));
    Err(io::Error::other(format!("encryption load fail: {e}")))
}

/// RbdEncryptionCreateOptions.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RbdEncryptionCreate {
    format: RbdEncryptionFormat,
    key_secret: String,
    cipher_alg: Option<String>,
}

/// blockdev-create's `rbd` (BlockdevCreateOptionsRbd).
#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RbdCreate {
    location: RbdOptions,
    size: u64,
    cluster_size: Option<u64>,
    encrypt: Option<RbdEncryptionCreate>,
}

impl RbdCreate {
    /// Creates the image, with QEMU's checks and texts.
    pub async fn create(self, graph: &Graph) -> Result<(), String> {
        if self.location.snapshot.is_some() {
            return Err("Can't use snapshot name for image creation".into());
        }
        let format = match &self.encrypt {
            Some(e) => {
                let luks = match e.format {
                    RbdEncryptionFormat::Luks => Luks::V1,
                    RbdEncryptionFormat::Luks2 => Luks::V2,
                    other => {
                        return Err(format!(
                            "unknown image encryption format: {}",
                            other.as_str()
                        ))
                    }
                };
                let cipher = match e.cipher_alg.as_deref() {
                    None | Some("aes-256") => Cipher::Aes256,
                    Some("aes-128") => Cipher::Aes128,
                    Some(other) => return Err(format!("unknown encryption algorithm: {other}")),
                };
                Some((luks, cipher, secret_bytes(graph, &e.key_secret)?))
            }
            None => None,
        };
        let order = match self.cluster_size {
            Some(size) if !size.is_power_of_two() => {
                return Err("obj size needs to be power of 2".into())
            }
            Some(size) if size < 4096 => return Err("obj size too small".into()),
            Some(size) => Some(size.trailing_zeros()),
            None => None,
        };
        let connect = self.location.connect_options(graph, false)?;
        let (image, size) = (self.location.image, self.size);
        blocking(move || {
            let pool = Pool::connect(&connect).map_err(io::Error::other)?;
            pool.create(&image, size, order)
                .map_err(|e| io::Error::other(format!("error rbd create: {e}")))?;
            if let Some((luks, cipher, secret)) = format {
                let opened = pool.open(&image, None, false)?;
                opened
                    .encryption_format(luks, cipher, secret.bytes())
                    .map_err(|e| io::Error::other(format!("encryption format fail: {e}")))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())
    }
}
