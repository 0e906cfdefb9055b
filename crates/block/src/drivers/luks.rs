//! `luks`: a LUKS1 volume. The header, at the start of `file` or in a detached `header`
//! child, is unlocked with the password of the secret `key-secret` names; the payload after
//! it is the disk, encrypted 512-byte sector by sector with the volume key.
//!
//! Reads decrypt in place. Writes encrypt a copy; a write that covers part of a sector
//! reads, decrypts and re-encrypts that sector, holding its range so no other write lands
//! in between. Unwritten payload reads as whatever its ciphertext decrypts to, so the whole
//! disk is data in block status, as in QEMU.

use crate::node::{Child, DriverInfo, Extent, ExtentKind, Node, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::range_lock::RangeLock;
use crate::{Driver, Graph};
use aio::pool::PoolBuf;
use async_trait::async_trait;
use crypto::luks::{Header, MasterKey, HEADER_LEN, SLOTS};
use crypto::{SectorCipher, SECTOR};
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex};

const SECTOR_U64: u64 = SECTOR as u64;

/// Writes are encrypted this much at a time, which bounds the copy each one needs.
const CHUNK: usize = 1 << 20;

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct LuksOptions {
    key_secret: Option<String>,
}

pub struct Luks {
    file: Arc<Child>,
    /// The detached header; None when the header starts `file`.
    header_child: Option<Arc<Child>>,
    keyslots: Keyslots,
    cipher: SectorCipher,
    /// Where the payload starts in `file`.
    payload: u64,
    /// Held over each write's whole sectors, so a partial-sector write's read, merge and
    /// write back is not interleaved with another write to that sector.
    sectors: RangeLock,
}

/// The header and the volume key, read and unlocked from the node holding the header.
pub(crate) struct Unlocked {
    pub header: Header,
    pub master: MasterKey,
}

/// Read the LUKS header at the start of `area` (a byte range of `child` the header and
/// all its key material must lie in) and unlock it with `password`. The key derivations
/// run on the blocking pool: at QEMU's default iter-time each takes two seconds.
pub(crate) async fn unlock(
    child: &Child,
    area: Range<u64>,
    password: &[u8],
) -> Result<Unlocked, String> {
    let size = child.node().size();
    let base = area.start;
    let mut buf = vec![0u8; HEADER_LEN];
    let avail = size
        .min(area.end)
        .saturating_sub(base)
        .min(HEADER_LEN as u64) as usize;
    child
        .read(base, &mut buf[..avail])
        .await
        .map_err(|e| format!("Unable to read LUKS header: {e}"))?;
    let header = Header::parse(&buf)?;
    if header.header_area_len() > area.end - area.start {
        return Err("LUKS key material lies outside the header's area".into());
    }
    let header = Arc::new(header);
    let password = Arc::new(crypto::Zeroizing::new(password.to_vec()));
    for slot in 0..SLOTS {
        if !header.slots[slot].active {
            continue;
        }
        let (offset, len) = header.material_range(slot);
        let mut material = vec![0u8; len];
        child
            .read(base + offset, &mut material)
            .await
            .map_err(|e| format!("Unable to read LUKS key slot {slot}: {e}"))?;
        let (h, p) = (header.clone(), password.clone());
        let key = tokio::task::spawn_blocking(move || h.try_slot(slot, &p, &material))
            .await
            .map_err(|e| format!("Unable to unlock LUKS key slot {slot}: {e}"))?;
        if let Some(master) = key {
            let header = Arc::try_unwrap(header).unwrap_or_else(|h| (*h).clone());
            return Ok(Unlocked { header, master });
        }
    }
    Err("Invalid password, cannot unlock any keyslot".into())
}

/// QCryptoBlockAmendOptionsLUKS: activate a key slot for `new-secret`, or erase the one
/// `keyslot` names or those `old-secret` opens.
#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct KeyslotAmend {
    state: KeyslotState,
    /// The secret whose password an activated slot takes.
    new_secret: Option<String>,
    /// Erase the slots this secret's password opens.
    old_secret: Option<String>,
    keyslot: Option<i64>,
    iter_time: Option<i64>,
    /// The password that gets the volume key, instead of the one the image was opened with.
    secret: Option<String>,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum KeyslotState {
    Active,
    Inactive,
}

/// An open volume's header and key, for reports and for x-blockdev-amend.
pub(crate) struct Keyslots {
    header: Mutex<Header>,
    master: MasterKey,
    /// Where the header and its key material lie in the node holding them.
    area: Range<u64>,
    /// One amend at a time: each reads, changes and writes the whole header.
    amending: tokio::sync::Mutex<()>,
}

impl Keyslots {
    pub(crate) fn new(header: Header, master: MasterKey, area: Range<u64>) -> Keyslots {
        Keyslots {
            header: Mutex::new(header),
            master,
            area,
            amending: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) fn header(&self) -> std::sync::MutexGuard<'_, Header> {
        self.header.lock().expect("luks header lock")
    }

    /// Apply `amend` with QEMU's rules and texts to the header in `edge`, within its area
    /// (the slots' offsets never change, and `unlock` checked they fit).
    /// Material goes to disk before the header names it, and a header marking a slot
    /// inactive goes before its material is overwritten: a crash leaves every slot either
    /// as it was or as asked.
    pub(crate) async fn amend(
        &self,
        edge: &Child,
        graph: &Graph,
        amend: &KeyslotAmend,
        force: bool,
    ) -> Result<(), String> {
        let _one = self.amending.lock().await;
        let base = self.area.start;
        let mut header = self.header().clone();
        let slot = match amend.keyslot {
            Some(n) if !(0..SLOTS as i64).contains(&n) => {
                return Err(format!(
                    "Invalid keyslot {n} specified, must be between 0 and {}",
                    SLOTS - 1
                ))
            }
            n => n.map(|n| n as usize),
        };
        let io_err = |e: io::Error| crate::drivers::file::os_error_text(&e);
        match amend.state {
            KeyslotState::Active => {
                let new_secret = amend
                    .new_secret
                    .as_deref()
                    .ok_or("'new-secret' is required to activate a keyslot")?;
                if amend.old_secret.is_some() {
                    return Err("'old-secret' must not be given when activating keyslots".into());
                }
                let slot = match slot {
                    Some(n) if header.slots[n].active && !force => {
                        return Err(format!(
                            "Refusing to overwrite active keyslot {n} - please erase it first"
                        ))
                    }
                    Some(n) => n,
                    None => (0..SLOTS)
                        .find(|&i| !header.slots[i].active)
                        .ok_or("Can't add a keyslot - all keyslots are in use")?,
                };
                let master = match &amend.secret {
                    Some(id) => {
                        let password = graph.password(id)?;
                        unlock(edge, self.area.clone(), password.bytes())
                            .await?
                            .master
                    }
                    None => self.master.clone(),
                };
                let password = graph.password(new_secret)?;
                let iter_time = u64::try_from(amend.iter_time.unwrap_or(2000))
                    .map_err(|_| "'iter-time' must not be negative".to_string())?;
                let plain = WriteFlags::default();
                if header.slots[slot].active {
                    // Forced over an active slot: the header stops naming the old material
                    // before the new material replaces it.
                    let mut cleared = header.clone();
                    cleared.clear_slot(slot);
                    edge.write(base, &cleared.serialize(), plain)
                        .await
                        .map_err(io_err)?;
                    edge.flush().await.map_err(io_err)?;
                    *self.header() = cleared;
                }
                let (material, header) = tokio::task::spawn_blocking(move || {
                    let material = header.set_slot(
                        slot,
                        &master,
                        password.bytes(),
                        std::time::Duration::from_millis(iter_time),
                    );
                    material.map(|m| (m, header))
                })
                .await
                .map_err(|e| format!("Unable to add a LUKS key slot: {e}"))??;
                let (offset, _) = header.material_range(slot);
                edge.write(base + offset, &material, plain)
                    .await
                    .map_err(io_err)?;
                edge.flush().await.map_err(io_err)?;
                edge.write(base, &header.serialize(), plain)
                    .await
                    .map_err(io_err)?;
                edge.flush().await.map_err(io_err)?;
                *self.header() = header;
                Ok(())
            }
            KeyslotState::Inactive => {
                if amend.new_secret.is_some() {
                    return Err("'new-secret' must not be given when erasing keyslots".into());
                }
                if amend.iter_time.is_some() {
                    return Err("'iter-time' must not be given when erasing keyslots".into());
                }
                if amend.secret.is_some() {
                    return Err("'secret' must not be given when erasing keyslots".into());
                }
                let active: Vec<usize> = (0..SLOTS).filter(|&i| header.slots[i].active).collect();
                let opens = |slot: usize, password: Arc<crypto::Secret>| {
                    let header = header.clone();
                    async move {
                        let (offset, len) = header.material_range(slot);
                        let mut material = vec![0u8; len];
                        edge.read(base + offset, &mut material)
                            .await
                            .map_err(io_err)?;
                        tokio::task::spawn_blocking(move || {
                            header.try_slot(slot, password.bytes(), &material).is_some()
                        })
                        .await
                        .map_err(|e| format!("Unable to check a LUKS key slot: {e}"))
                    }
                };
                let old = match &amend.old_secret {
                    Some(id) => Some(graph.password(id)?),
                    None => None,
                };
                let erase: Vec<usize> = match (slot, old) {
                    (Some(n), old) => {
                        if !header.slots[n].active {
                            return Err(format!(
                                "Given keyslot {n} is already erased (inactive) "
                            ));
                        }
                        if let Some(old) = old {
                            if !opens(n, old).await? {
                                return Err(format!("Given keyslot {n} doesn't contain the given old password for erase operation"));
                            }
                        }
                        if active.len() == 1 && !force {
                            return Err(format!("Attempt to erase the only active keyslot {n} which will erase all the data in the image irreversibly - refusing operation"));
                        }
                        vec![n]
                    }
                    (None, Some(old)) => {
                        let mut matching = Vec::new();
                        for &i in &active {
                            if opens(i, old.clone()).await? {
                                matching.push(i);
                            }
                        }
                        if matching.is_empty() {
                            return Err(
                                "No keyslots match given (old) password for erase operation"
                                    .into(),
                            );
                        }
                        if matching.len() == active.len() && !force {
                            return Err("All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation".into());
                        }
                        matching
                    }
                    (None, None) => return Err("To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given".into()),
                };
                let plain = WriteFlags::default();
                for &i in &erase {
                    header.clear_slot(i);
                }
                edge.write(base, &header.serialize(), plain)
                    .await
                    .map_err(io_err)?;
                edge.flush().await.map_err(io_err)?;
                for &i in &erase {
                    let (offset, _) = header.material_range(i);
                    let garbage = header.wipe_material()?;
                    edge.write(base + offset, &garbage, plain)
                        .await
                        .map_err(io_err)?;
                }
                edge.flush().await.map_err(io_err)?;
                *self.header() = header;
                Ok(())
            }
        }
    }
}

/// QCryptoBlockInfoLUKS of a header.
pub(crate) fn luks_info(header: &Header, detached: bool) -> Value {
    let spec = header.spec;
    let slots: Vec<Value> = header
        .slots
        .iter()
        .enumerate()
        .map(|(i, slot)| {
            let offset = header.material_range(i).0;
            if slot.active {
                json!({"active": true, "iters": slot.iterations, "key-offset": offset,
                       "stripes": slot.stripes})
            } else {
                json!({"active": false, "key-offset": offset})
            }
        })
        .collect();
    let mut info = json!({
        "cipher-alg": spec.alg.name(),
        "cipher-mode": spec.mode.name(),
        "ivgen-alg": spec.ivgen.name(),
    });
    if let Some(hash) = spec.ivgen_hash {
        info["ivgen-hash-alg"] = json!(hash.name());
    }
    info["hash-alg"] = json!(header.hash.name());
    info["detached-header"] = json!(detached);
    info["payload-offset"] = json!(header.payload_start());
    info["master-key-iters"] = json!(header.mk_digest_iter);
    info["uuid"] = json!(header.uuid);
    info["slots"] = Value::Array(slots);
    info
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl Luks {
    /// Read and decrypt whole sectors `start..start + buf.len()` of the payload.
    async fn read_sectors(&self, start: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read(self.payload + start, buf).await?;
        self.cipher.decrypt(start / SECTOR_U64, buf);
        Ok(())
    }

    /// Encrypt `plain` (whole sectors from `start`) and write it, `CHUNK` at a time
    /// through a pooled buffer.
    async fn write_sectors(&self, start: u64, plain: &[u8], flags: WriteFlags) -> io::Result<()> {
        let mut scratch = PoolBuf::new(plain.len().min(CHUNK), 1)?;
        let mut done = 0;
        while done < plain.len() {
            let n = (plain.len() - done).min(CHUNK);
            let chunk = &mut scratch.as_mut_slice()[..n];
            chunk.copy_from_slice(&plain[done..done + n]);
            let at = start + done as u64;
            self.cipher.encrypt(at / SECTOR_U64, chunk);
            self.file.write(self.payload + at, chunk, flags).await?;
            done += n;
        }
        Ok(())
    }

    /// Write `buf` at `offset`: whole sectors straight through, partial ones merged with
    /// what the sector holds.
    async fn write_at(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let start = offset - offset % SECTOR_U64;
        let aligned_end = end.next_multiple_of(SECTOR_U64);
        let _held = self.sectors.lock(start, aligned_end).await;
        if start == offset && aligned_end == end {
            return self.write_sectors(offset, buf, flags).await;
        }
        let mut merged = PoolBuf::new((aligned_end - start) as usize, 1)?;
        let merged = merged.as_mut_slice();
        let head = (offset - start) as usize;
        let tail_sector = (aligned_end - SECTOR_U64 - start) as usize;
        self.read_sectors(start, &mut merged[..SECTOR]).await?;
        if tail_sector > 0 && aligned_end != end {
            self.read_sectors(aligned_end - SECTOR_U64, &mut merged[tail_sector..])
                .await?;
        }
        merged[head..head + buf.len()].copy_from_slice(buf);
        self.write_sectors(start, merged, flags).await
    }
}

#[async_trait(?Send)]
impl Driver for Luks {
    fn format_name(&self) -> &'static str {
        "luks"
    }

    /// Whole sectors only: a partial last sector could be neither encrypted nor written.
    fn size(&self, _node: &Node) -> u64 {
        let bytes = self.file.node().size().saturating_sub(self.payload);
        bytes - bytes % SECTOR_U64
    }

    async fn read(&self, _node: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let start = offset - offset % SECTOR_U64;
        let aligned_end = end.next_multiple_of(SECTOR_U64);
        if start == offset && aligned_end == end {
            return self.read_sectors(offset, buf).await;
        }
        let mut sectors = PoolBuf::new((aligned_end - start) as usize, 1)?;
        let sectors = sectors.as_mut_slice();
        self.read_sectors(start, sectors).await?;
        let head = (offset - start) as usize;
        buf.copy_from_slice(&sectors[head..head + buf.len()]);
        Ok(())
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        self.write_at(offset, buf, flags).await
    }

    /// Zeroes must be encrypted like any data: there is no cheap way.
    async fn write_zeroes(
        &self,
        _: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        if flags.no_fallback {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        let flags = WriteFlags {
            may_unmap: false,
            ..flags
        };
        let zeroes = vec![0u8; len.min(CHUNK as u64) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            self.write_at(offset + done, &zeroes[..n], flags).await?;
            done += n as u64;
        }
        Ok(())
    }

    /// The whole sectors in the range may go from `file`: their content is then
    /// unspecified (it decrypts to noise), which is what a discard allows.
    async fn discard(&self, _: &Node, offset: u64, len: u64) -> io::Result<()> {
        let start = offset.next_multiple_of(SECTOR_U64);
        let end = (offset + len) - (offset + len) % SECTOR_U64;
        if end <= start {
            return Ok(());
        }
        let _held = self.sectors.lock(start, end).await;
        self.file.discard(self.payload + start, end - start).await
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        self.file.flush().await
    }

    async fn block_status(&self, node: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        let size = self.size(node);
        if offset >= size {
            return Err(einval());
        }
        Ok(Extent {
            len: len.min(size - offset),
            kind: ExtentKind::Data,
        })
    }

    async fn reopen(&self, _: &Node, writable: bool) -> Result<(), String> {
        self.file.node().set_writable(writable).await?;
        if let Some(header) = &self.header_child {
            header.node().set_writable(writable).await?;
        }
        Ok(())
    }

    async fn truncate(&self, _: &Node, size: u64) -> io::Result<()> {
        if !size.is_multiple_of(SECTOR_U64) {
            return Err(einval());
        }
        self.file.node().truncate(self.payload + size).await
    }

    fn child_perms(&self, role: &str, perm: Perms, _: Perms, read_only: bool) -> (Perms, Perms) {
        crate::perm::format_child_perms(role, perm, read_only)
    }

    async fn amend_keyslots(
        &self,
        _: &Node,
        graph: &Graph,
        amend: &KeyslotAmend,
        force: bool,
    ) -> Result<(), String> {
        let edge = self.header_child.as_ref().unwrap_or(&self.file);
        self.keyslots.amend(edge, graph, amend, force).await
    }

    fn info(&self, node: &Node) -> DriverInfo {
        let file = self.file.node();
        let file_info = file.driver().info(&file);
        let header = self.keyslots.header();
        DriverInfo {
            // key-secret is one of the options a plain name cannot carry.
            filename: crate::graph::json_filename(node, &file_info.filename),
            actual_size: file_info.actual_size,
            dirty_flag: Some(false),
            encrypted: true,
            format_specific: Some(json!({
                "type": "luks",
                "data": luks_info(&header, self.header_child.is_some()),
            })),
            ..DriverInfo::default()
        }
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: true,
    // The header is read once, and nothing else is kept: the data key does not change
    // while another process holds the volume (re-encryption is not a handover).
    hands_over: true,
    names: &["luks"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    mut options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let file_ref = o.take_child_ref(&mut options, "file")?;
    let header_ref = options.remove("header");
    let opts: LuksOptions = o.parse(options)?;
    let file = o
        .open_child(file_ref, "file", Perms::NONE, Perms::ALL)
        .await?;
    let header_child = match header_ref {
        Some(reference) => Some(
            o.open_child(reference, "header", Perms::NONE, Perms::ALL)
                .await?,
        ),
        None => None,
    };
    let key_secret = opts.key_secret.ok_or_else(|| {
        QmpError::generic(format!(
            "Parameter '{}' is required for cipher",
            o.member_path("key-secret")
        ))
    })?;
    let password = o.password(&key_secret)?;
    let head = header_child.as_ref().unwrap_or(&file);
    let area = 0..head.node().size();
    let Unlocked { header, master } = unlock(head, area.clone(), password.bytes())
        .await
        .map_err(QmpError::generic)?;
    let payload = if header_child.is_some() {
        0
    } else {
        let payload = header.payload_start();
        if payload < header.header_area_len() {
            return Err(QmpError::generic(
                "LUKS payload is overlapping with the header",
            ));
        }
        let file_size = file.node().size();
        if payload > file_size {
            return Err(QmpError::generic(format!(
                "LUKS payload offset {payload} is past the end of the image ({file_size} bytes)"
            )));
        }
        payload
    };
    let cipher = header.cipher(&master).map_err(QmpError::generic)?;
    Ok(Box::new(Luks {
        file,
        header_child,
        keyslots: Keyslots::new(header, master, area),
        cipher,
        payload,
        sectors: RangeLock::default(),
    }))
}

/// QCryptoBlockCreateOptionsLUKS: how a new volume is encrypted, with QEMU's defaults
/// (aes-256, xts, plain64, sha256 and two seconds of PBKDF2). Names stay strings until
/// `resolve`, which refuses what QEMU's crypto layer refuses, in its words.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LuksCreateOptions {
    pub key_secret: Option<String>,
    pub cipher_alg: Option<String>,
    pub cipher_mode: Option<String>,
    pub ivgen_alg: Option<String>,
    pub ivgen_hash_alg: Option<String>,
    pub hash_alg: Option<String>,
    pub iter_time: Option<i64>,
}

impl LuksCreateOptions {
    /// The secret's id and the volume's parameters; `prefix` is where the options sit
    /// (`encrypt.` in qcow2), for the texts.
    pub fn resolve(
        &self,
        prefix: &str,
        detached: bool,
    ) -> Result<(String, crypto::luks::CreateOptions), String> {
        use crypto::{CipherAlg, CipherMode, CipherSpec, HashAlg, IvGenAlg};
        let key_secret = self
            .key_secret
            .clone()
            .ok_or_else(|| format!("Parameter '{prefix}key-secret' is required for cipher"))?;
        let alg = match self.cipher_alg.as_deref() {
            None => CipherAlg::Aes256,
            Some(name) => CipherAlg::from_name(name)
                .ok_or_else(|| format!("Algorithm '{name}' not supported"))?,
        };
        let mode = match self.cipher_mode.as_deref() {
            None => CipherMode::Xts,
            Some(name) => CipherMode::from_name(name)
                .ok_or_else(|| format!("Unsupported cipher mode {name}"))?,
        };
        let ivgen = match self.ivgen_alg.as_deref() {
            None => IvGenAlg::Plain64,
            Some(name) => IvGenAlg::from_name(name)
                .ok_or_else(|| format!("Unsupported IV generator '{name}'"))?,
        };
        let hash_named = |name: Option<&str>| match name {
            None => Ok(HashAlg::Sha256),
            Some(name) => HashAlg::from_name(name)
                .ok_or_else(|| format!("Hash algorithm '{name}' not supported")),
        };
        let hash = hash_named(self.hash_alg.as_deref())?;
        let ivgen_hash = match ivgen {
            IvGenAlg::Essiv => Some(hash_named(self.ivgen_hash_alg.as_deref())?),
            _ => None,
        };
        let iter_time = u64::try_from(self.iter_time.unwrap_or(2000))
            .map_err(|_| format!("Parameter '{prefix}iter-time' must not be negative"))?;
        let spec = CipherSpec {
            alg,
            mode,
            ivgen,
            ivgen_hash,
        };
        spec.check()?;
        Ok((
            key_secret,
            crypto::luks::CreateOptions {
                spec,
                hash,
                iter_time: std::time::Duration::from_millis(iter_time),
                detached,
            },
        ))
    }
}

/// Make a new volume key and header for `password` off the I/O thread: the PBKDF2 runs
/// take as long as iter-time asks.
pub(crate) async fn new_volume(
    opts: crypto::luks::CreateOptions,
    password: Arc<crypto::Secret>,
) -> Result<crypto::luks::Created, String> {
    tokio::task::spawn_blocking(move || crypto::luks::create(&opts, password.bytes()))
        .await
        .map_err(|e| format!("Unable to create the LUKS header: {e}"))?
}

/// Write a header and slot 0's material at `base` of `edge`.
pub(crate) async fn write_header(
    edge: &Child,
    base: u64,
    created: &crypto::luks::Created,
) -> io::Result<()> {
    let plain = WriteFlags::default();
    edge.write(base, &created.header.serialize(), plain).await?;
    let (offset, _) = created.header.material_range(0);
    edge.write(base + offset, &created.material, plain).await
}

/// blockdev-create's luks driver: a new volume of `size` bytes with its header in
/// `header` (detached) or at the start of `file`, whose payload is preallocated as asked.
/// Either node may be absent only when the other is given: a detached header alone, or
/// (QEMU's rule) a file with its header.
pub async fn create_volume(
    file: Option<Arc<Child>>,
    header: Option<Arc<Child>>,
    size: u64,
    preallocation: crate::create::Prealloc,
    opts: crypto::luks::CreateOptions,
    password: Arc<crypto::Secret>,
) -> Result<(), String> {
    let created = new_volume(opts, password).await?;
    let io_err = |e: io::Error| crate::drivers::file::os_error_text(&e);
    let payload = created.header.payload_start();
    if let Some(file) = &file {
        let end = payload + size;
        if file.node().size() < end {
            file.node().truncate(end).await.map_err(io_err)?;
        }
        crate::create::preallocate(file, payload, size, preallocation)
            .await
            .map_err(io_err)?;
    }
    let head = header
        .as_ref()
        .or(file.as_ref())
        .ok_or("Parameter 'file' is required")?;
    let area = created.header.header_area_len();
    if header.is_some() && head.node().size() < area {
        head.node().truncate(area).await.map_err(io_err)?;
    }
    write_header(head, 0, &created).await.map_err(io_err)?;
    for edge in [&file, &header].into_iter().flatten() {
        edge.flush().await.map_err(io_err)?;
    }
    Ok(())
}
