//! Image locking that QEMU processes (qemu-img, qemu-io, qemu-storage-daemon) understand.
//!
//! The protocol is QEMU file-posix's: shared open-file-description (OFD) locks on single
//! bytes. For each permission bit N a user holds, byte 100+N is locked; for each permission
//! bit N it does not let others have, byte 200+N is locked. Taking a permission fails while
//! another process locks its "not shared" byte; refusing to share one fails while another
//! process locks its "held" byte. Locks belong to the open file description, so they vanish
//! when the file is closed, and locks of the same description never conflict with each other.
//!
//! A blockd killed with in-flight io_uring requests keeps its lock bytes for a moment after
//! it was reaped: the kernel tears the ring down (and closes the descriptors it holds)
//! after the exit. That lingering lock is protective (requests of the dead process may
//! still land), so blockd does not drop it early; instead a blockd that finds a conflict
//! waits a bounded time when the holder is a blockd that is gone. Two markers tell: byte
//! [`BLOCKD_BYTE`] (an OFD lock, lingering like the others) says a blockd holds or held
//! locks on the file, and byte [`LIVE_BYTE`] (a POSIX lock, which the kernel drops as the
//! process exits) says that blockd is alive. QEMU's tools look at neither.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const HELD_BASE: i64 = 100;
const UNSHARED_BASE: i64 = 200;
/// Locked (OFD) by every blockd descriptor that holds lock bytes.
const BLOCKD_BYTE: i64 = 401;
/// Locked (POSIX, per process) by every blockd process that holds lock bytes.
const LIVE_BYTE: i64 = 400;
/// How long a conflict with a blockd that is gone is waited out (its ring's teardown takes
/// as long as its last requests; milliseconds in practice).
const DEAD_HOLDER_WAIT: Duration = Duration::from_secs(2);
const DEAD_HOLDER_POLL: Duration = Duration::from_millis(5);

/// Per file (device, inode): how many descriptors of this process hold lock bytes on it.
/// A conflict on a file this process has open may be with itself, never waited out.
static MARKED: Mutex<Option<HashMap<(u64, u64), usize>>> = Mutex::new(None);

/// A set of QEMU block permissions, numbered as QEMU numbers them (the numbers pick the
/// lock bytes).
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Perms(u32);

impl Perms {
    /// No permission.
    pub const NONE: Perms = Perms(0);
    /// QEMU's BLK_PERM_CONSISTENT_READ: the holder sees complete, self-consistent contents
    /// (not true of, e.g., the intermediate nodes of a running commit).
    pub const CONSISTENT_READ: Perms = Perms(1 << 0);
    /// QEMU's BLK_PERM_WRITE: the holder may change the visible contents.
    pub const WRITE: Perms = Perms(1 << 1);
    /// QEMU's BLK_PERM_WRITE_UNCHANGED: the holder may write data that leaves the visible
    /// contents as they were (copy-on-read, a backup's copy-before-write); weaker than
    /// `WRITE`.
    pub const WRITE_UNCHANGED: Perms = Perms(1 << 2);
    /// QEMU's BLK_PERM_RESIZE: the holder may change the size.
    pub const RESIZE: Perms = Perms(1 << 3);
    /// QEMU's BLK_PERM_ALL: every permission above.
    pub const ALL: Perms = Perms(0xf);

    /// Names as QEMU's lock errors spell them, by bit number.
    const NAMES: [&'static str; 4] = ["consistent read", "write", "write unchanged", "resize"];

    /// Names as QMP spells them, by bit number.
    const QMP_NAMES: [&'static str; 4] = ["consistent-read", "write", "write-unchanged", "resize"];

    /// The bits as QEMU numbers them; with [`from_bits`](Self::from_bits) this builds sets
    /// in `const` items, where `|` is not available.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Ignores bits that are not permissions.
    pub const fn from_bits(bits: u32) -> Perms {
        Perms(bits & Self::ALL.0)
    }

    /// Whether every permission in `other` is in `self`.
    pub const fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    /// The permissions in either set (also `|`).
    pub const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    /// The permissions in `self` but not in `other`.
    pub const fn minus(self, other: Perms) -> Perms {
        Perms(self.0 & !other.0)
    }

    /// The permissions of [`ALL`](Self::ALL) not in `self` (also `!`).
    pub const fn complement(self) -> Perms {
        Perms(!self.0 & Self::ALL.0)
    }

    /// Whether the sets have a permission in common.
    pub const fn intersects(self, other: Perms) -> bool {
        self.0 & other.0 != 0
    }

    /// QMP's names (x-debug-query-block-graph), highest bit first as QEMU lists them.
    pub fn names(self) -> Vec<&'static str> {
        let mut names: Vec<_> = self
            .bit_numbers()
            .map(|n| Self::QMP_NAMES[n as usize])
            .collect();
        names.reverse();
        names
    }

    /// QMP's names lowest bit first, joined as QEMU's permission-conflict message lists them.
    pub fn describe(self) -> String {
        self.bit_numbers()
            .map(|n| Self::QMP_NAMES[n as usize])
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn bit_numbers(self) -> impl Iterator<Item = u32> {
        (0..Self::NAMES.len() as u32).filter(move |n| self.0 & (1 << n) != 0)
    }
}

impl fmt::Debug for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self
            .bit_numbers()
            .map(|n| Self::NAMES[n as usize])
            .collect();
        write!(f, "Perms({})", names.join("|"))
    }
}

impl std::ops::BitOr for Perms {
    type Output = Perms;
    fn bitor(self, rhs: Perms) -> Perms {
        self.union(rhs)
    }
}

impl std::ops::BitAnd for Perms {
    type Output = Perms;
    fn bitand(self, rhs: Perms) -> Perms {
        Perms(self.0 & rhs.0)
    }
}

impl std::ops::Not for Perms {
    type Output = Perms;
    fn not(self) -> Perms {
        self.complement()
    }
}

impl std::ops::BitOrAssign for Perms {
    fn bitor_assign(&mut self, rhs: Perms) {
        *self = self.union(rhs);
    }
}

impl std::ops::BitAndAssign for Perms {
    fn bitand_assign(&mut self, rhs: Perms) {
        *self = Perms(self.0 & rhs.0);
    }
}

/// The `locking` option of QEMU's file driver.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum Locking {
    /// Take locks; failing to probe OFD locks is an error.
    On,
    /// Never lock.
    Off,
    /// Take locks when the file supports OFD locks, silently skip them otherwise.
    #[default]
    Auto,
}

impl FromStr for Locking {
    type Err = io::Error;
    fn from_str(s: &str) -> io::Result<Locking> {
        match s {
            "on" => Ok(Locking::On),
            "off" => Ok(Locking::Off),
            "auto" => Ok(Locking::Auto),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid locking mode '{s}'"),
            )),
        }
    }
}

/// Another process holds a lock that conflicts with the permissions asked for.
///
/// `Display` gives QEMU's error message (`Failed to get "write" lock`); [`Self::hint`] gives
/// the line QEMU prints after it on the command line (QMP replies carry only the message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockConflict {
    message: String,
    hint: String,
}

impl LockConflict {
    fn new(message: String, path: &str) -> LockConflict {
        LockConflict {
            message,
            hint: format!("Is another process using the image [{path}]?"),
        }
    }

    /// QEMU's error text, e.g. `Failed to get "write" lock` (also what `Display` gives).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// QEMU's follow-up line, `Is another process using the image [PATH]?`, printed after the
    /// message on the command line; QMP replies leave it out.
    pub fn hint(&self) -> &str {
        &self.hint
    }

    /// The conflict inside `err`, if `err` reports one.
    pub fn from_io(err: &io::Error) -> Option<&LockConflict> {
        err.get_ref()?.downcast_ref::<LockConflict>()
    }
}

impl fmt::Display for LockConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for LockConflict {}

/// The lock bytes this file description currently holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LockState {
    held: Perms,
    unshared: Perms,
}

#[derive(Clone, Copy)]
enum Area {
    Held,
    Unshared,
}

impl Area {
    fn byte(self, bit: u32) -> i64 {
        match self {
            Area::Held => HELD_BASE + i64::from(bit),
            Area::Unshared => UNSHARED_BASE + i64::from(bit),
        }
    }
}

fn flock(fd: RawFd, cmd: libc::c_int, ty: libc::c_int, byte: i64) -> io::Result<libc::flock> {
    // Safety: all-zero is a valid `flock`; OFD locks require `l_pid` to be 0.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    loop {
        // Safety: `fl` is a valid, exclusively borrowed `flock` for the duration of the call.
        let ret = unsafe { libc::fcntl(fd, cmd, &mut fl as *mut libc::flock) };
        if ret != -1 {
            return Ok(fl);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

fn lock_byte(fd: RawFd, byte: i64) -> io::Result<()> {
    flock(fd, libc::F_OFD_SETLK, libc::F_RDLCK, byte).map(|_| ())
}

fn unlock_byte(fd: RawFd, byte: i64) -> io::Result<()> {
    flock(fd, libc::F_OFD_SETLK, libc::F_UNLCK, byte).map(|_| ())
}

/// Whether a description other than ours holds a lock on `byte`.
fn byte_locked_by_others(fd: RawFd, byte: i64) -> io::Result<bool> {
    let fl = flock(fd, libc::F_OFD_GETLK, libc::F_WRLCK, byte)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Whether OFD locks work on `fd` (some network and FUSE file systems refuse them).
pub(crate) fn probe(fd: RawFd) -> bool {
    byte_locked_by_others(fd, HELD_BASE).is_ok()
}

fn set_area(fd: RawFd, area: Area, from: Perms, to: Perms) -> io::Result<()> {
    for bit in to.minus(from).bit_numbers() {
        lock_byte(fd, area.byte(bit)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("Failed to lock byte {}: {e}", area.byte(bit)),
            )
        })?;
    }
    for bit in from.minus(to).bit_numbers() {
        unlock_byte(fd, area.byte(bit)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("Failed to unlock byte {}: {e}", area.byte(bit)),
            )
        })?;
    }
    Ok(())
}

/// Find the first conflict between what we want and what other processes lock.
fn check(fd: RawFd, held: Perms, unshared: Perms, path: &str) -> io::Result<()> {
    for bit in held.bit_numbers() {
        if byte_locked_by_others(fd, Area::Unshared.byte(bit))? {
            let name = Perms::NAMES[bit as usize];
            let msg = format!("Failed to get \"{name}\" lock");
            return Err(io::Error::other(LockConflict::new(msg, path)));
        }
    }
    for bit in unshared.bit_numbers() {
        if byte_locked_by_others(fd, Area::Held.byte(bit))? {
            let name = Perms::NAMES[bit as usize];
            let msg = format!("Failed to get shared \"{name}\" lock");
            return Err(io::Error::other(LockConflict::new(msg, path)));
        }
    }
    Ok(())
}

fn file_id(fd: RawFd) -> Option<(u64, u64)> {
    // Safety: all-zero is a valid `stat`; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // Safety: a valid out pointer.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

/// Marks `fd` as a blockd descriptor holding lock bytes (or no longer), and this process
/// as alive on the file.
fn set_marked(fd: RawFd, marked: bool) {
    let Some(id) = file_id(fd) else { return };
    let mut registry = MARKED.lock().unwrap_or_else(|e| e.into_inner());
    let counts = registry.get_or_insert_with(HashMap::new);
    if marked {
        let _ = lock_byte(fd, BLOCKD_BYTE);
        *counts.entry(id).or_default() += 1;
    } else {
        let _ = unlock_byte(fd, BLOCKD_BYTE);
        if let Some(count) = counts.get_mut(&id) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&id);
                let _ = flock(fd, libc::F_SETLK, libc::F_UNLCK, LIVE_BYTE);
            }
        }
    }
}

/// Whether the lock bytes in the way belong to a blockd that is gone: a blockd marker
/// another description holds, no live process holding the liveness byte, and no other
/// descriptor of this process on the file.
fn left_by_dead_blockd(fd: RawFd, marked_here: bool) -> bool {
    let Some(id) = file_id(fd) else { return false };
    let ours = {
        let registry = MARKED.lock().unwrap_or_else(|e| e.into_inner());
        registry
            .as_ref()
            .and_then(|counts| counts.get(&id).copied())
            .unwrap_or(0)
    };
    if ours > usize::from(marked_here) {
        return false;
    }
    let blockd = byte_locked_by_others(fd, BLOCKD_BYTE).unwrap_or(false);
    let live = flock(fd, libc::F_GETLK, libc::F_WRLCK, LIVE_BYTE)
        .map_or(true, |fl| fl.l_type != libc::F_UNLCK as libc::c_short);
    blockd && !live
}

/// Move the locks on `fd` from `state` to hold `held` and share only `shared`.
///
/// New bytes are locked before checking for conflicts, so two processes racing for the same
/// image cannot both miss each other. On conflict the locks go back to `state`; a conflict
/// with a blockd that is gone is retried for up to [`DEAD_HOLDER_WAIT`] first (blocking:
/// this runs on the thread that changes the graph, and only right after such a crash).
pub(crate) fn apply(
    fd: RawFd,
    state: &mut LockState,
    held: Perms,
    shared: Perms,
    path: &str,
) -> io::Result<()> {
    let deadline = Instant::now() + DEAD_HOLDER_WAIT;
    loop {
        match apply_once(fd, state, held, shared, path) {
            Err(e)
                if LockConflict::from_io(&e).is_some()
                    && Instant::now() < deadline
                    && left_by_dead_blockd(fd, *state != LockState::default()) =>
            {
                std::thread::sleep(DEAD_HOLDER_POLL);
            }
            result => return result,
        }
    }
}

fn apply_once(
    fd: RawFd,
    state: &mut LockState,
    held: Perms,
    shared: Perms,
    path: &str,
) -> io::Result<()> {
    let want = LockState {
        held,
        unshared: shared.complement(),
    };
    let grown = LockState {
        held: state.held | want.held,
        unshared: state.unshared | want.unshared,
    };
    let attempt = set_area(fd, Area::Held, state.held, grown.held)
        .and_then(|()| set_area(fd, Area::Unshared, state.unshared, grown.unshared))
        .and_then(|()| check(fd, want.held, want.unshared, path));
    if let Err(e) = attempt {
        // Best effort: the bytes we failed to add or remove are still reported by `e`.
        let _ = set_area(fd, Area::Held, grown.held, state.held);
        let _ = set_area(fd, Area::Unshared, grown.unshared, state.unshared);
        return Err(e);
    }
    set_area(fd, Area::Held, grown.held, want.held)?;
    set_area(fd, Area::Unshared, grown.unshared, want.unshared)?;
    let (was, is) = (*state != LockState::default(), want != LockState::default());
    if was != is {
        set_marked(fd, is);
    }
    if is {
        // Again each time: a POSIX lock goes when this process closes any descriptor of
        // the file.
        let _ = flock(fd, libc::F_SETLK, libc::F_RDLCK, LIVE_BYTE);
    }
    *state = want;
    Ok(())
}

/// A descriptor that held lock bytes is being closed: it no longer counts as this
/// process's (its bytes go with the descriptor).
pub(crate) fn forget(fd: RawFd, state: &LockState) {
    if *state != LockState::default() {
        set_marked(fd, false);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn qmp_names_follow_qemu_order() {
        assert_eq!(
            Perms::ALL.names(),
            ["resize", "write-unchanged", "write", "consistent-read"]
        );
        assert_eq!((Perms::WRITE | Perms::RESIZE).describe(), "write, resize");
        assert_eq!(
            !Perms::WRITE,
            Perms::CONSISTENT_READ | Perms::WRITE_UNCHANGED | Perms::RESIZE
        );
    }

    use super::*;
    use std::os::fd::AsRawFd;

    fn locked_bytes(fd: RawFd) -> Vec<i64> {
        (HELD_BASE..UNSHARED_BASE + 8)
            .filter(|&b| byte_locked_by_others(fd, b).unwrap())
            .collect()
    }

    #[test]
    fn perms_set_operations() {
        let rw = Perms::CONSISTENT_READ | Perms::WRITE;
        assert!(rw.contains(Perms::WRITE));
        assert!(!rw.contains(Perms::RESIZE));
        assert_eq!(rw.complement(), Perms::WRITE_UNCHANGED | Perms::RESIZE);
        assert_eq!(Perms::from_bits(0xff), Perms::ALL);
        assert_eq!(rw.minus(Perms::WRITE), Perms::CONSISTENT_READ);
        assert_eq!(
            format!("{:?}", Perms::WRITE | Perms::RESIZE),
            "Perms(write|resize)"
        );
        assert_eq!("auto".parse::<Locking>().unwrap(), Locking::Auto);
        assert!("maybe".parse::<Locking>().is_err());
    }

    #[test]
    fn lock_bytes_follow_perms_and_conflicts_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let ours = std::fs::File::open(&path).unwrap();
        let theirs = std::fs::File::open(&path).unwrap();
        let p = path.to_str().unwrap();
        assert!(probe(ours.as_raw_fd()));

        let mut state = LockState::default();
        apply(
            ours.as_raw_fd(),
            &mut state,
            Perms::CONSISTENT_READ | Perms::WRITE,
            Perms::CONSISTENT_READ | Perms::WRITE_UNCHANGED,
            p,
        )
        .unwrap();
        assert_eq!(locked_bytes(theirs.as_raw_fd()), vec![100, 101, 201, 203]);

        // Another description wanting to write is refused by our "write not shared" byte.
        let mut other = LockState::default();
        let err = apply(theirs.as_raw_fd(), &mut other, Perms::WRITE, Perms::ALL, p).unwrap_err();
        let conflict = LockConflict::from_io(&err).unwrap();
        assert_eq!(conflict.message(), "Failed to get \"write\" lock");
        assert_eq!(
            conflict.hint(),
            format!("Is another process using the image [{p}]?")
        );
        assert_eq!(other, LockState::default());
        assert_eq!(locked_bytes(ours.as_raw_fd()), Vec::<i64>::new());

        // A reader refusing to share writes is refused by our "write held" byte.
        let err = apply(
            theirs.as_raw_fd(),
            &mut other,
            Perms::CONSISTENT_READ,
            Perms::CONSISTENT_READ,
            p,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "Failed to get shared \"write\" lock");

        // Dropping to read-only sharing everything releases the other bytes.
        apply(
            ours.as_raw_fd(),
            &mut state,
            Perms::CONSISTENT_READ,
            Perms::ALL,
            p,
        )
        .unwrap();
        assert_eq!(locked_bytes(theirs.as_raw_fd()), vec![100]);
        apply(theirs.as_raw_fd(), &mut other, Perms::WRITE, Perms::ALL, p).unwrap();
        apply(ours.as_raw_fd(), &mut state, Perms::NONE, Perms::ALL, p).unwrap();
        assert_eq!(locked_bytes(theirs.as_raw_fd()), Vec::<i64>::new());
    }
}
