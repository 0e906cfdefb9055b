//! `file` and `host_device`: a local file or block device, through the aio crate (io_uring
//! with a thread-pool fallback), locked like QEMU locks its images.

use crate::node::{CommonOptions, DriverInfo, Extent, ExtentKind, Node, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use aio::{Engine, ImageFile, IoBuf, Locking, OpenOptions};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::json;
use serde_json::{Map, Value};
use std::io;
use std::sync::Arc;

#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FileOptions {
    pub filename: String,
    /// blockd has no pr-manager objects, so any id is refused with QEMU's text for an
    /// unknown one.
    pub pr_manager: Option<String>,
    pub locking: Option<OnOffAuto>,
    pub aio: Option<AioMode>,
    /// 0 or less: no limit, as in QEMU.
    pub aio_max_batch: Option<i64>,
    /// Drop the host page cache of the file when the node is activated after a handover
    /// (default on): another process wrote the file meanwhile.
    pub drop_cache: Option<bool>,
    /// After that drop, check with mincore that no page of the file stayed cached, and
    /// fail the activation if one did (QEMU's debug option).
    pub x_check_cache_dropped: Option<bool>,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OnOffAuto {
    On,
    Off,
    Auto,
}

/// Where requests run. `threads`: the blocking pool, as in QEMU. `native` asks for the
/// kernel's asynchronous I/O, which is io_uring here (Linux AIO in QEMU), and like QEMU
/// needs cache.direct=on. `io_uring`: the I/O thread's ring, refused where the kernel has
/// none. Unset: `Engine::Auto` (the ring, but large writes to a tmpfs file on the pool).
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AioMode {
    Threads,
    Native,
    IoUring,
}

pub struct FileDriver {
    driver_name: &'static str,
    filename: String,
    /// Replaced whole when the node is reopened read-write or read-only.
    file: ArcSwap<ImageFile>,
    direct: bool,
    locking: Locking,
    engine: Engine,
    max_batch: usize,
    /// auto-read-only fell back to a read-only open. As in QEMU the node still counts as
    /// writable, and a writer is refused when it attaches (see `apply_perms`).
    fell_back_read_only: bool,
    drop_cache: bool,
    check_cache_dropped: bool,
}

impl FileDriver {
    pub async fn open(
        driver_name: &str,
        opts: FileOptions,
        common: &CommonOptions,
    ) -> Result<FileDriver, String> {
        if let Some(id) = &opts.pr_manager {
            return Err(format!("No persistent reservation manager with id '{id}'"));
        }
        let engine = match opts.aio {
            Some(AioMode::Threads) => Engine::Threads,
            Some(AioMode::Native) if !common.cache_direct => {
                return Err("aio=native was specified, but it requires cache.direct=on, which was not specified.".into());
            }
            Some(AioMode::IoUring) if !aio::uring_available() => {
                return Err("Unable to use io_uring: the kernel does not offer it".into());
            }
            Some(AioMode::Native | AioMode::IoUring) => Engine::Ring,
            None => Engine::Auto,
        };
        let max_batch = opts
            .aio_max_batch
            .filter(|&n| n > 0)
            .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX));
        let locking = match (opts.locking, common.force_share) {
            (Some(OnOffAuto::Off), _) => Locking::Off,
            // force-share asks for no exclusion at all: take no lock bytes that could refuse others.
            (_, true) => Locking::Off,
            (Some(OnOffAuto::On), _) => Locking::On,
            _ => Locking::Auto,
        };
        let open = |writable| {
            OpenOptions::new(&opts.filename)
                .writable(writable)
                .direct(common.cache_direct)
                .locking(locking)
                .engine(engine)
                .max_batch(max_batch)
                .open()
        };
        let mut fell_back_read_only = false;
        let file = match open(!common.read_only).await {
            Err(e)
                if common.auto_read_only
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EACCES | libc::EROFS | libc::EPERM)
                    ) =>
            {
                fell_back_read_only = true;
                open(false).await
            }
            other => other,
        }
        .map_err(|e| format!("Could not open '{}': {}", opts.filename, os_error_text(&e)))?;
        Ok(FileDriver {
            driver_name: if driver_name == "host_device" {
                "host_device"
            } else {
                "file"
            },
            filename: opts.filename,
            file: ArcSwap::from_pointee(file),
            direct: common.cache_direct,
            locking,
            engine,
            max_batch,
            fell_back_read_only,
            drop_cache: opts.drop_cache.unwrap_or(true),
            check_cache_dropped: opts.x_check_cache_dropped.unwrap_or(false),
        })
    }
}

/// strerror() text without Rust's " (os error N)" suffix, as QEMU prints it.
pub fn os_error_text(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

#[async_trait(?Send)]
impl Driver for FileDriver {
    /// The locks went with the node's permissions. What the other process may have changed
    /// under the node is read anew: the file's length, and (with drop-cache, unless
    /// O_DIRECT bypasses it) the host's cached pages, dropped as QEMU drops them.
    async fn activate(&self, _: &Node) -> Result<(), String> {
        let file = self.file.load_full();
        file.refresh_size()
            .map_err(|e| format!("Could not read the size of {}: {e}", self.filename))?;
        if !self.drop_cache || self.direct {
            return Ok(());
        }
        file.flush()
            .await
            .map_err(|e| format!("flush failed: {}", os_error_text(&e)))?;
        let check = self.check_cache_dropped;
        // fadvise walks every cached page of the file and mincore maps it: both block.
        tokio::task::spawn_blocking(move || {
            file.drop_page_cache()
                .map_err(|e| format!("fadvise failed: {}", os_error_text(&e)))?;
            match check.then(|| file.cached_pages()) {
                Some(Ok(0)) | None => Ok(()),
                Some(Ok(_)) => Err("page cache still in use!".to_string()),
                Some(Err(e)) => Err(format!("mincore failed: {}", os_error_text(&e))),
            }
        })
        .await
        .map_err(|e| format!("Could not drop the page cache: {e}"))?
    }

    fn format_name(&self) -> &'static str {
        self.driver_name
    }

    fn size(&self, _node: &Node) -> u64 {
        // The file keeps its length cached and current; no syscall here. Like QEMU, whole
        // 512-byte sectors: the tail of a partial last sector reads as zeroes.
        self.file.load().size().unwrap_or(0).next_multiple_of(512)
    }

    async fn read(&self, _: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.load_full().read_at(buf, offset).await
    }

    async fn read_buf(&self, _: &Node, offset: u64, buf: IoBuf) -> io::Result<IoBuf> {
        self.file.load_full().read_buf(buf, offset).await
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        self.file.load_full().write_at(buf, offset).await?;
        if flags.fua {
            self.file.load_full().flush().await?;
        }
        Ok(())
    }

    async fn write_buf(
        &self,
        _: &Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> io::Result<IoBuf> {
        let buf = self.file.load_full().write_buf(buf, offset).await?;
        if flags.fua {
            self.file.load_full().flush().await?;
        }
        Ok(buf)
    }

    async fn write_zeroes(
        &self,
        _: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        let file = self.file.load_full();
        if flags.no_fallback {
            file.write_zeroes_no_fallback(offset, len, flags.may_unmap)
                .await?;
        } else {
            file.write_zeroes(offset, len, flags.may_unmap).await?;
        }
        if flags.fua {
            self.file.load_full().flush().await?;
        }
        Ok(())
    }

    async fn discard(&self, _: &Node, offset: u64, len: u64) -> io::Result<()> {
        self.file.load_full().discard(offset, len).await
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        self.file.load_full().flush().await
    }

    async fn block_status(&self, _: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        let (data, run) = self.file.load().block_status(offset, len)?;
        let kind = if data {
            ExtentKind::Data
        } else {
            ExtentKind::Zero { allocated: true }
        };
        Ok(Extent {
            len: run.clamp(1, len),
            kind,
        })
    }

    async fn truncate(&self, _: &Node, size: u64) -> io::Result<()> {
        self.file.load_full().truncate(size).await
    }

    fn child_perms(&self, _: &str, _: Perms, _: Perms, _: bool) -> (Perms, Perms) {
        (Perms::NONE, Perms::ALL)
    }

    fn apply_perms(&self, perm: Perms, shared: Perms) -> Result<(), String> {
        if self.fell_back_read_only && perm.intersects(Perms::WRITE | Perms::RESIZE) {
            // QEMU reopens the file read-write for its first writer and refuses the writer
            // with the open's error. The descriptor here stays read-only, so a writer is
            // refused in any case (never left to fail with EBADF); the probe gives QEMU's
            // text. A one-off open on a graph change, not on the request path.
            let probe = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.filename);
            let reason = match probe {
                Err(e) => os_error_text(&e),
                Ok(_) => "the node fell back to read-only at open; reopen it read-write first"
                    .to_string(),
            };
            return Err(format!("Could not open '{}': {reason}", self.filename));
        }
        self.file
            .load()
            .set_perms(perm, shared)
            .map_err(|e| match aio::LockConflict::from_io(&e) {
                Some(conflict) => conflict.message().to_string(),
                None => e.to_string(),
            })
    }

    fn info(&self, _node: &Node) -> DriverInfo {
        DriverInfo {
            filename: self.filename.clone(),
            actual_size: self.file.load().allocated_size().ok(),
            format_specific: Some(json!({"type": self.driver_name, "data": {}})),
            dirty_flag: Some(false),
            ..DriverInfo::default()
        }
    }

    fn extends_on_write(&self) -> bool {
        true
    }

    /// A new descriptor in the new mode. The old one gives up its lock bytes first: OFD
    /// locks of two descriptions conflict even within one process.
    async fn reopen(&self, node: &Node, writable: bool) -> Result<(), String> {
        let old = self.file.load_full();
        old.flush().await.map_err(|e| e.to_string())?;
        let (perm, shared) = node.cumulative_perms();
        old.set_perms(Perms::NONE, Perms::ALL)
            .map_err(|e| e.to_string())?;
        let reopened = OpenOptions::new(&self.filename)
            .writable(writable)
            .direct(self.direct)
            .locking(self.locking)
            .engine(self.engine)
            .max_batch(self.max_batch)
            .open()
            .await;
        let new = match reopened {
            Ok(file) => file,
            Err(e) => {
                let _ = old.set_perms(perm, shared);
                return Err(format!(
                    "Could not reopen '{}': {}",
                    self.filename,
                    os_error_text(&e)
                ));
            }
        };
        if let Err(e) = new.set_perms(perm, shared) {
            let _ = old.set_perms(perm, shared);
            return Err(e.to_string());
        }
        self.file.store(Arc::new(new));
        Ok(())
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: false,
    hands_over: true,
    names: &["file", "host_device"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let opts: FileOptions = o.parse(options)?;
    let driver = FileDriver::open(o.driver_name(), opts, o.common())
        .await
        .map_err(QmpError::generic)?;
    Ok(Box::new(driver))
}
