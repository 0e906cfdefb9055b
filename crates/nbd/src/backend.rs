//! The trait through which an NBD export reaches its data, so that this crate knows
//! nothing of the block layer that implements it.

use std::io;

use async_trait::async_trait;

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`, in bytes. The server
/// sends them but does not enforce them, beyond refusing payloads over
/// [`crate::proto::MAX_PAYLOAD`]; the client reports what the server sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize {
    /// Smallest alignment of offsets and lengths that the export handles (the server
    /// sends at least 1).
    pub minimum: u32,
    /// Alignment and size that avoid read-modify-write or other slow paths (the server
    /// sends at least `minimum`).
    pub preferred: u32,
    /// Largest READ/WRITE payload (the server sends at most
    /// [`crate::proto::MAX_PAYLOAD`]).
    pub maximum: u32,
}

impl Default for BlockSize {
    fn default() -> Self {
        BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: crate::proto::MAX_PAYLOAD,
        }
    }
}

/// What a backend can do; the server derives its transmission flags from this, so that
/// they tell the truth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// The data cannot be written, whatever the export options say
    /// (`NBD_FLAG_READ_ONLY`; also withdraws the write-side flags).
    pub read_only: bool,
    /// [`Backend::flush`] does something (`NBD_FLAG_SEND_FLUSH`).
    pub flush: bool,
    /// Writes honour `fua` (`NBD_FLAG_SEND_FUA`).
    pub fua: bool,
    /// [`Backend::trim`] is offered (`NBD_FLAG_SEND_TRIM`).
    pub trim: bool,
    /// [`Backend::write_zeroes`] is offered (`NBD_FLAG_SEND_WRITE_ZEROES`).
    pub write_zeroes: bool,
    /// `write_zeroes` honours `fast` (fails with `ENOTSUP` quickly when it cannot be fast).
    pub fast_zero: bool,
    /// [`Backend::cache`] is offered (`NBD_FLAG_SEND_CACHE`).
    pub cache: bool,
    /// Flushes and FUA writes are visible through every connection once answered
    /// (`NBD_FLAG_CAN_MULTI_CONN`, withdrawn anyway when the server allows one
    /// connection).
    pub multi_conn: bool,
    /// Sent in every answer to `NBD_OPT_GO` and `NBD_OPT_INFO`, asked for or not.
    pub block_size: BlockSize,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            read_only: false,
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
            block_size: BlockSize::default(),
        }
    }
}

/// A metadata context an export may offer to `NBD_CMD_BLOCK_STATUS`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MetaContext {
    /// `base:allocation`: flags `STATE_HOLE` (unallocated) and `STATE_ZERO` (reads as zero).
    BaseAllocation,
    /// `qemu:allocation-depth`: 0 unallocated, N = depth in the backing chain (1 = top).
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME`: flag `STATE_DIRTY`.
    DirtyBitmap(String),
}

impl MetaContext {
    /// The context's name on the wire.
    pub fn name(&self) -> String {
        match self {
            MetaContext::BaseAllocation => crate::proto::CONTEXT_BASE_ALLOCATION.to_string(),
            MetaContext::AllocationDepth => crate::proto::CONTEXT_ALLOCATION_DEPTH.to_string(),
            MetaContext::DirtyBitmap(n) => {
                format!("{}{n}", crate::proto::CONTEXT_DIRTY_BITMAP_PREFIX)
            }
        }
    }
}

/// One run of equal status, as returned by [`Backend::block_status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusExtent {
    /// Bytes the extent covers; not 0. The server cuts it to fit the request (whose
    /// length is 32 bits on the wire).
    pub length: u64,
    /// The context's flags for the extent: `STATE_*` bits, or the depth for
    /// `qemu:allocation-depth`.
    pub flags: u32,
}

/// Options of `write_zeroes`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated (the client did not send `NO_HOLE`).
    pub may_trim: bool,
    /// Fail with `ENOTSUP` at once rather than zero slowly (`FAST_ZERO`).
    pub fast: bool,
    /// Persist before returning (`FUA`).
    pub fua: bool,
}

/// One export's data. Implementations are shared between I/O threads (`Send + Sync`), but
/// the futures they return stay on the thread that polls them and need not be `Send`.
///
/// The server checks bounds, flags and read-only state before calling; a backend only
/// does the I/O. Errors are mapped to NBD error values with [`crate::proto::errno_of`].
#[async_trait(?Send)]
pub trait Backend: Send + Sync + 'static {
    /// Current size in bytes.
    fn size(&self) -> u64;

    /// The thread the export wants its connections served on, if it has one: after
    /// negotiation a connection moves there (see `server/relocate.rs`), and again when
    /// [`watch_home`](Self::watch_home) says the answer changed.
    fn home(&self) -> Option<std::sync::Arc<dyn crate::spawn::Spawner>> {
        None
    }

    /// A receiver that sees a change whenever [`home`](Self::home) may answer differently:
    /// connections then ask again, and move between requests. None: the answer is fixed.
    fn watch_home(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// What the export can do. Called at negotiation and again for every request's
    /// checks, so it must be cheap.
    fn capabilities(&self) -> Capabilities;

    /// Fills `buf` with the bytes at `offset`.
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// A read that also tells whether the range reads as zeroes, when the backend learns
    /// that in the same lookup: `Some(true)` zeroes, `Some(false)` data in `buf`. `None`:
    /// the backend cannot tell cheaply and read nothing; the server then asks
    /// [`Backend::block_status`] and reads the data runs.
    async fn read_or_zero(&self, _offset: u64, _buf: &mut [u8]) -> io::Result<Option<bool>> {
        Ok(None)
    }

    /// A read the server answers with a hole chunk, without the data: a backend that
    /// accounts or throttles reads still sees it.
    async fn read_hole(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// Writes `buf` at `offset`; with `fua`, the data is durable before this returns.
    async fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()>;

    /// Makes `[offset, offset + len)` read as zeroes (`NBD_CMD_WRITE_ZEROES`), as
    /// `flags` allow.
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()>;

    /// Discards `[offset, offset + len)` (`NBD_CMD_TRIM`): a hint, after which the range
    /// may read as anything; with `fua`, durable before this returns.
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;

    /// Makes every write completed so far durable (`NBD_CMD_FLUSH`).
    async fn flush(&self) -> io::Result<()>;

    /// Prefetch hint (`NBD_CMD_CACHE`).
    async fn cache(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Status of `[offset, offset + len)` for `context`, as consecutive extents from
    /// `offset`. They may cover less than `len` (but not nothing); extents past `len`
    /// are cut by the server.
    async fn block_status(
        &self,
        context: &MetaContext,
        offset: u64,
        len: u64,
    ) -> io::Result<Vec<StatusExtent>>;
}
