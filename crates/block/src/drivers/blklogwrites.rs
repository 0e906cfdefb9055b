//! `blklogwrites`: a filter that passes every request to its `file` child and records each
//! write, zero write, discard and flush, in the order they reach the file, in its `log`
//! child, in the format of Linux's dm-log-writes (QEMU's driver of the same name). Replaying
//! a prefix of the log onto the image's earlier content gives the image as a crash at that
//! point could have left it: the crash-consistency tests do exactly that.
//!
//! The log is a super block in sector 0 (magic, version, entry count, sector size), then
//! the entries: a sector holding the entry's header (first sector, sector count, flags),
//! followed by the written sectors for a write (zeroes for a zero write), nothing for a
//! discard or a flush. Sectors are `log-sector-size` bytes. Requests that are not whole
//! sectors are widened to them here, with the bytes around read from the file, as QEMU's
//! block layer does for the driver's request alignment.
//!
//! One request at a time reaches the file and the log, so the log's order is the file's.
//! The super block's entry count is written every `log-super-update-interval` entries, at
//! each flush and at close, and before the first entry of a new log, so a log cut short
//! never claims entries of an earlier one.

use super::block_map::read_zero_past_end;
use super::fields::{le32, le64};
use crate::node::{Child, DriverInfo, Extent, Node, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use async_trait::async_trait;
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::io;
use std::sync::Arc;

pub const LOG_MAGIC: u64 = 0x006a_7366_7773_6872;
pub const LOG_VERSION: u64 = 1;
pub const FLAG_FLUSH: u64 = 1;
pub const FLAG_FUA: u64 = 1 << 1;
pub const FLAG_DISCARD: u64 = 1 << 2;
/// The sizes QEMU accepts: the entry header must fit a sector.
const MIN_SECTOR: u64 = 32;
const MAX_SECTOR: u64 = 8 << 20;
/// Zero writes are logged as zeroed sectors, this many bytes per log write at most.
const ZERO_CHUNK: usize = 1 << 20;

/// One entry's header, as the log holds it (public for the tests' replay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogEntry {
    pub sector: u64,
    pub sectors: u64,
    pub flags: u64,
}

impl LogEntry {
    pub fn parse(buf: &[u8]) -> Option<LogEntry> {
        (buf.len() >= 32).then(|| LogEntry {
            sector: le64(buf, 0),
            sectors: le64(buf, 8),
            flags: le64(buf, 16),
        })
    }

    fn to_sector(self, sector_size: usize) -> Vec<u8> {
        let mut b = vec![0u8; sector_size];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..16].copy_from_slice(&self.sectors.to_le_bytes());
        b[16..24].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    /// Sectors of data that follow the header in the log.
    pub fn data_sectors(self) -> u64 {
        if self.flags & (FLAG_DISCARD | FLAG_FLUSH) != 0 {
            0
        } else {
            self.sectors
        }
    }
}

/// The super block's fields: (entry count, sector size), if `buf` holds one of a known
/// version. The errors are QEMU's words.
pub fn parse_super(buf: &[u8]) -> Result<(u64, u64), String> {
    if buf.len() < 28 || le64(buf, 0) != LOG_MAGIC {
        return Err("Invalid log superblock magic".into());
    }
    let version = le64(buf, 8);
    if version != LOG_VERSION {
        return Err(format!("Unsupported log version {version}"));
    }
    let sector_size = le32(buf, 24) as u64;
    if !valid_sector_size(sector_size) {
        return Err(format!("Invalid log sector size {sector_size}"));
    }
    Ok((le64(buf, 16), sector_size))
}

fn valid_sector_size(size: u64) -> bool {
    size.is_power_of_two() && (MIN_SECTOR..=MAX_SECTOR).contains(&size)
}

struct LogState {
    /// Where the next entry goes, in sectors.
    next: u64,
    entries: u64,
    /// The super block on disk names no entries of an earlier log.
    fresh: bool,
}

pub struct BlkLogWrites {
    file: Arc<Child>,
    log: Arc<Child>,
    sector: u64,
    update_interval: u64,
    /// Held for a whole request, file and log together: the log's order is the file's.
    state: tokio::sync::Mutex<LogState>,
}

impl BlkLogWrites {
    async fn write_super(&self, state: &LogState) -> io::Result<()> {
        let mut b = vec![0u8; self.sector as usize];
        b[0..8].copy_from_slice(&LOG_MAGIC.to_le_bytes());
        b[8..16].copy_from_slice(&LOG_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&state.entries.to_le_bytes());
        b[24..28].copy_from_slice(&(self.sector as u32).to_le_bytes());
        self.log.write(0, &b, WriteFlags::default()).await
    }

    /// Appends one entry (its header, then `data` unless it is a discard or flush).
    async fn append(
        &self,
        state: &mut LogState,
        entry: LogEntry,
        data: Data<'_>,
    ) -> io::Result<()> {
        if !state.fresh {
            self.write_super(state).await?;
            state.fresh = true;
        }
        let plain = WriteFlags::default();
        let header = entry.to_sector(self.sector as usize);
        self.log
            .write(state.next * self.sector, &header, plain)
            .await?;
        let at = (state.next + 1) * self.sector;
        match data {
            Data::Bytes(bytes) => self.log.write(at, bytes, plain).await?,
            Data::Zeroes(len) => {
                let zeroes = vec![0u8; (len as usize).min(ZERO_CHUNK)];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(zeroes.len() as u64);
                    self.log
                        .write(at + done, &zeroes[..n as usize], plain)
                        .await?;
                    done += n;
                }
            }
            Data::None => {}
        }
        state.next += 1 + entry.data_sectors();
        state.entries += 1;
        let flushed = entry.flags & FLAG_FLUSH != 0;
        if flushed || state.entries.is_multiple_of(self.update_interval) {
            self.write_super(state).await?;
        }
        if flushed {
            self.log.flush().await?;
        }
        Ok(())
    }

    /// The whole sectors around `offset..offset + len`.
    fn widen(&self, offset: u64, len: u64) -> (u64, u64) {
        let start = offset - offset % self.sector;
        let end = (offset + len).next_multiple_of(self.sector);
        (start, end)
    }

    /// `buf` at `offset` with the bytes around it that complete its sectors, read from the
    /// file (zeroes past its end): what is logged and written for a request that does not
    /// cover whole sectors.
    async fn whole_sectors(&self, offset: u64, buf: &[u8]) -> io::Result<(u64, Vec<u8>)> {
        let (start, end) = self.widen(offset, buf.len() as u64);
        let mut whole = vec![0u8; (end - start) as usize];
        read_zero_past_end(&self.file, start, &mut whole).await?;
        let at = (offset - start) as usize;
        whole[at..at + buf.len()].copy_from_slice(buf);
        Ok((start, whole))
    }

    async fn logged_write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        let mut state = self.state.lock().await;
        let aligned =
            offset.is_multiple_of(self.sector) && (buf.len() as u64).is_multiple_of(self.sector);
        let widened;
        let (offset, buf) = if aligned {
            (offset, buf)
        } else {
            widened = self.whole_sectors(offset, buf).await?;
            (widened.0, widened.1.as_slice())
        };
        let entry = LogEntry {
            sector: offset / self.sector,
            sectors: buf.len() as u64 / self.sector,
            flags: if flags.fua { FLAG_FUA } else { 0 },
        };
        self.append(&mut state, entry, Data::Bytes(buf)).await?;
        self.file.write(offset, buf, flags).await
    }
}

/// What follows an entry's header in the log.
enum Data<'a> {
    Bytes(&'a [u8]),
    Zeroes(u64),
    None,
}

#[async_trait(?Send)]
impl Driver for BlkLogWrites {
    fn format_name(&self) -> &'static str {
        "blklogwrites"
    }

    fn size(&self, _: &Node) -> u64 {
        self.file.node().size()
    }

    async fn read(&self, _: &Node, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read(offset, buf).await
    }

    async fn write(&self, _: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> io::Result<()> {
        self.logged_write(offset, buf, flags).await
    }

    /// Logged as a write of zeroed sectors, as QEMU logs it; the file gets a zero write
    /// over the whole sectors, and the partial sectors at either end are written with the
    /// bytes around them (at most a sector each, whatever the request's length).
    async fn write_zeroes(
        &self,
        _: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> io::Result<()> {
        let end = offset + len;
        let (inner_start, inner_end) = (
            offset.next_multiple_of(self.sector),
            end / self.sector * self.sector,
        );
        if inner_start >= inner_end {
            return self
                .logged_write(offset, &vec![0u8; len as usize], flags)
                .await;
        }
        if offset < inner_start {
            let head = vec![0u8; (inner_start - offset) as usize];
            self.logged_write(offset, &head, flags).await?;
        }
        {
            let mut state = self.state.lock().await;
            let entry = LogEntry {
                sector: inner_start / self.sector,
                sectors: (inner_end - inner_start) / self.sector,
                flags: if flags.fua { FLAG_FUA } else { 0 },
            };
            let zeroes = Data::Zeroes(inner_end - inner_start);
            self.append(&mut state, entry, zeroes).await?;
            self.file
                .write_zeroes(inner_start, inner_end - inner_start, flags)
                .await?;
        }
        if inner_end < end {
            let tail = vec![0u8; (end - inner_end) as usize];
            self.logged_write(inner_end, &tail, flags).await?;
        }
        Ok(())
    }

    /// Only whole sectors are discarded and logged: a discard is advisory.
    async fn discard(&self, _: &Node, offset: u64, len: u64) -> io::Result<()> {
        let start = offset.next_multiple_of(self.sector);
        let end = (offset + len) / self.sector * self.sector;
        if start >= end {
            return Ok(());
        }
        let mut state = self.state.lock().await;
        let entry = LogEntry {
            sector: start / self.sector,
            sectors: (end - start) / self.sector,
            flags: FLAG_DISCARD,
        };
        self.append(&mut state, entry, Data::None).await?;
        self.file.discard(start, end - start).await
    }

    /// The file's flush first: the flush entry says every entry before it is durable.
    async fn flush(&self, _: &Node) -> io::Result<()> {
        let mut state = self.state.lock().await;
        self.file.flush().await?;
        let entry = LogEntry {
            sector: 0,
            sectors: 0,
            flags: FLAG_FLUSH,
        };
        self.append(&mut state, entry, Data::None).await
    }

    async fn block_status(&self, _: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        self.file.node().status_for_filter(offset, len).await
    }

    /// The log has no entry for a size change: a replay grows the file by its writes.
    async fn truncate(&self, _: &Node, size: u64) -> io::Result<()> {
        let _state = self.state.lock().await;
        self.file.node().truncate(size).await
    }

    fn extends_on_write(&self) -> bool {
        let node = self.file.node();
        node.driver().extends_on_write()
    }

    fn child_perms(
        &self,
        role: &str,
        perm: Perms,
        shared: Perms,
        read_only: bool,
    ) -> (Perms, Perms) {
        match role {
            "log" if read_only => (Perms::CONSISTENT_READ, Perms::ALL),
            // Nobody else may write the log or change its size under the entries.
            "log" => (
                Perms::CONSISTENT_READ | Perms::WRITE | Perms::RESIZE,
                Perms::ALL & !(Perms::WRITE | Perms::RESIZE),
            ),
            _ => (perm, shared),
        }
    }

    fn info(&self, node: &Node) -> DriverInfo {
        DriverInfo::of_filter(node, &self.file)
    }

    fn filtered_child_role(&self) -> Option<&'static str> {
        Some("file")
    }

    /// The entry count is written for the last entries too.
    async fn close(&self, _: &Node) -> io::Result<()> {
        let state = self.state.lock().await;
        if state.fresh {
            self.write_super(&state).await?;
            self.log.flush().await?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct LogOptions {
    log_sector_size: Option<u64>,
    log_append: Option<bool>,
    log_super_update_interval: Option<u64>,
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: false,
    hands_over: false,
    names: &["blklogwrites"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    mut options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let file_ref = o.take_child_ref(&mut options, "file")?;
    let log_ref = o.take_child_ref(&mut options, "log")?;
    let opts: LogOptions = o.parse(options)?;
    let append = opts.log_append.unwrap_or(false);
    if append && opts.log_sector_size.is_some() {
        return Err(QmpError::generic(
            "log-append and log-sector-size are mutually exclusive",
        ));
    }
    let update_interval = opts.log_super_update_interval.unwrap_or(4096);
    if update_interval == 0 {
        return Err(QmpError::generic(
            "Invalid log superblock update interval 0",
        ));
    }
    let file = o
        .open_child(file_ref, "file", Perms::NONE, Perms::ALL)
        .await?;
    let log = o
        .open_child(log_ref, "log", Perms::NONE, Perms::ALL)
        .await?;
    let (sector, state) = if append {
        find_log_end(&log).await?
    } else {
        let sector = opts.log_sector_size.unwrap_or(512);
        if !valid_sector_size(sector) {
            return Err(QmpError::generic(format!(
                "Invalid log sector size {sector}"
            )));
        }
        let fresh = LogState {
            next: 1,
            entries: 0,
            fresh: false,
        };
        (sector, fresh)
    };
    Ok(Box::new(BlkLogWrites {
        file,
        log,
        sector,
        update_interval,
        state: tokio::sync::Mutex::new(state),
    }))
}

/// The sector size and end of the log in `log`, to append to it.
async fn find_log_end(log: &Child) -> Result<(u64, LogState), QmpError> {
    let mut head = [0u8; 28];
    read_zero_past_end(log, 0, &mut head)
        .await
        .map_err(|e| QmpError::generic(format!("Could not read log superblock: {e}")))?;
    let mut walk = LogWalk::new(&head, log.node().size()).map_err(QmpError::generic)?;
    let mut header = [0u8; 32];
    while let Some(at) = walk.next_header().map_err(QmpError::generic)? {
        log.read(at, &mut header)
            .await
            .map_err(|e| QmpError::generic(format!("Could not read log entry: {e}")))?;
        walk.take(&header).map_err(QmpError::generic)?;
    }
    let state = LogState {
        next: walk.next,
        entries: walk.entries,
        fresh: true,
    };
    Ok((walk.sector, state))
}

/// A walk over the entries a log's super block counts, to find where the log ends: the
/// caller reads each header where [`LogWalk::next_header`] says (public for the fuzz
/// target). Every entry must lie in the log's file, `file_len` bytes.
pub struct LogWalk {
    /// The log's sector size.
    pub sector: u64,
    sectors: u64,
    left: u64,
    /// The sector after the entries walked so far.
    pub next: u64,
    /// The entries the super block counts.
    pub entries: u64,
}

impl LogWalk {
    /// A walk over the log whose super block is `super_block` (QEMU's texts when it is
    /// none of a known version).
    pub fn new(super_block: &[u8], file_len: u64) -> Result<LogWalk, String> {
        let (entries, sector) = parse_super(super_block)?;
        Ok(LogWalk {
            sector,
            sectors: file_len / sector,
            left: entries,
            next: 1,
            entries,
        })
    }

    /// The byte offset of the next header to read, or None once every entry is walked.
    pub fn next_header(&self) -> Result<Option<u64>, String> {
        if self.left == 0 {
            return Ok(None);
        }
        if self.next >= self.sectors {
            return Err(LOG_PAST_END.into());
        }
        Ok(Some(self.next * self.sector))
    }

    /// Steps over the entry whose header (at least 32 bytes) was read.
    pub fn take(&mut self, header: &[u8]) -> Result<(), String> {
        let entry = LogEntry::parse(header).ok_or(LOG_PAST_END)?;
        self.next = self
            .next
            .checked_add(1)
            .and_then(|n| n.checked_add(entry.data_sectors()))
            .filter(|&n| n <= self.sectors)
            .ok_or(LOG_PAST_END)?;
        self.left -= 1;
        Ok(())
    }
}

const LOG_PAST_END: &str = "The log lies past the end of its file";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_and_super_blocks_parse_back() {
        let entry = LogEntry {
            sector: 7,
            sectors: 3,
            flags: FLAG_FUA,
        };
        let sector = entry.to_sector(512);
        assert_eq!(sector.len(), 512);
        assert_eq!(LogEntry::parse(&sector), Some(entry));
        assert_eq!(entry.data_sectors(), 3);
        let discard = LogEntry {
            flags: FLAG_DISCARD,
            ..entry
        };
        assert_eq!(discard.data_sectors(), 0);
        let mut sb = vec![0u8; 512];
        sb[0..8].copy_from_slice(&LOG_MAGIC.to_le_bytes());
        sb[8..16].copy_from_slice(&1u64.to_le_bytes());
        sb[16..24].copy_from_slice(&9u64.to_le_bytes());
        sb[24..28].copy_from_slice(&4096u32.to_le_bytes());
        assert_eq!(parse_super(&sb), Ok((9, 4096)));
        sb[24..28].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(parse_super(&sb), Err("Invalid log sector size 1000".into()));
        sb[8] = 2;
        assert_eq!(parse_super(&sb), Err("Unsupported log version 2".into()));
        assert!(parse_super(&sb[..10]).is_err());
    }

    /// The fuzz target's first find: an empty log whose file is shorter than one of its
    /// sectors ends at sector 1, where the first entry will go.
    #[test]
    fn an_empty_log_shorter_than_a_sector_ends_at_sector_one() {
        let mut log = vec![0u8; 150];
        log[0..8].copy_from_slice(&LOG_MAGIC.to_le_bytes());
        log[8..16].copy_from_slice(&1u64.to_le_bytes());
        log[24..28].copy_from_slice(&(128u32 << 10).to_le_bytes());
        let walk = LogWalk::new(&log, log.len() as u64).unwrap();
        assert_eq!(walk.next_header(), Ok(None));
        assert_eq!((walk.next, walk.entries, walk.sector), (1, 0, 128 << 10));
        // One entry counted, but no room for its header: refused, not walked past the end.
        log[16..24].copy_from_slice(&1u64.to_le_bytes());
        let walk = LogWalk::new(&log, log.len() as u64).unwrap();
        assert_eq!(walk.next_header(), Err(LOG_PAST_END.to_string()));
    }
}
