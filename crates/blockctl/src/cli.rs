//! The command line: every subcommand and option, as clap derives them. Completions and man
//! pages are generated from these same definitions.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Exit statuses, for scripts: refused or failed.
pub const EXIT_FAILED: i32 = 1;
/// Bad arguments (clap exits with the same status for those it finds).
pub const EXIT_USAGE: i32 = 2;
/// A job that was waited for was cancelled.
pub const EXIT_CANCELLED: i32 = 3;

const EXIT_HELP: &str = "Exit status: 0 done (a waited-for job completed, or a mirror is \
ready); 1 an error (the daemon refused, is not there, or a job failed); 2 bad arguments; \
3 a waited-for job was cancelled.";

/// Drive blockd, or qemu-storage-daemon, over QMP.
#[derive(Debug, Parser)]
#[command(name = "blockctl", version, after_help = EXIT_HELP)]
pub struct Cli {
    /// The daemon's QMP monitor: a Unix socket's path, or tcp:HOST:PORT.
    #[arg(
        short,
        long,
        env = "BLOCKCTL_SOCKET",
        global = true,
        value_name = "SOCKET"
    )]
    pub socket: Option<String>,

    /// Print JSON on stdout instead of text, for scripts.
    #[arg(long, global = true)]
    pub json: bool,

    /// Seconds to wait for the monitor to answer the connection.
    #[arg(long, global = true, default_value_t = 10, value_name = "SECONDS")]
    pub connect_timeout: u64,

    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// The node graph as a tree: drivers, files, sizes, bitmaps, jobs and exports.
    Ls,
    /// A point-in-time backup of a node into another (blockdev-backup).
    Backup(Backup),
    /// Copy a node into another and keep it in sync (blockdev-mirror).
    Mirror(Mirror),
    /// Pull a backing chain's data into a node (block-stream).
    Stream(Stream),
    /// Write a chain's upper layers into a lower one (block-commit).
    Commit(Commit),
    /// Put a new overlay image on top of a node (blockdev-create, blockdev-snapshot).
    Snapshot(Snapshot),
    /// Dirty bitmaps.
    #[command(subcommand)]
    Bitmap(BitmapCmd),
    /// Exports (NBD, vhost-user-blk, FUSE).
    #[command(subcommand)]
    Export(ExportCmd),
    /// Create an image file, and optionally open it as a node.
    Create(Create),
    /// Grow or shrink a node.
    Resize {
        /// The node.
        node: String,
        /// The new size: bytes, or with a K, M, G, T suffix.
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// Jobs.
    #[command(subcommand)]
    Job(JobCmd),
    /// Follow events live, with a progress bar per running job on a terminal.
    Watch {
        /// When the daemon goes away, wait for it to come back instead of exiting.
        #[arg(long)]
        reconnect: bool,
    },
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (blockctl.1 and one per subcommand) into a directory.
    Man {
        /// The directory.
        dir: PathBuf,
    },
}

/// Options of commands that start a job.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job's id (the source node's name when absent).
    #[arg(long)]
    pub job_id: Option<String>,
    /// Bytes per second, with a K, M, G suffix; none for no limit.
    #[arg(long, value_parser = parse_size)]
    pub speed: Option<u64>,
    /// Wait until the job ends, with a progress bar; the exit status says how it ended.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SyncMode {
    Full,
    Top,
    None,
    Incremental,
    Bitmap,
}

impl From<SyncMode> for qmp::api::MirrorSyncMode {
    fn from(mode: SyncMode) -> Self {
        match mode {
            SyncMode::Full => qmp::api::MirrorSyncMode::Full,
            SyncMode::Top => qmp::api::MirrorSyncMode::Top,
            SyncMode::None => qmp::api::MirrorSyncMode::None,
            SyncMode::Incremental => qmp::api::MirrorSyncMode::Incremental,
            SyncMode::Bitmap => qmp::api::MirrorSyncMode::Bitmap,
        }
    }
}

#[derive(Debug, Args)]
pub struct Backup {
    /// The node to back up.
    pub source: String,
    /// The node that receives the copy (see `blockctl create`).
    pub target: String,
    /// What to copy.
    #[arg(long, value_enum, default_value = "full")]
    pub sync: SyncMode,
    /// The dirty bitmap of an incremental or bitmap backup.
    #[arg(long)]
    pub bitmap: Option<String>,
    /// What becomes of the bitmap: on-success, never, always.
    #[arg(long)]
    pub bitmap_mode: Option<String>,
    /// Compress the target's clusters.
    #[arg(long)]
    pub compress: bool,
    #[command(flatten)]
    pub job: JobArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WhenReady {
    /// Leave the mirror running in sync.
    Stay,
    /// Switch users over to the target (block-job-complete).
    Complete,
    /// End the mirror in sync without switching (block-job-cancel).
    Cancel,
}

#[derive(Debug, Args)]
pub struct Mirror {
    /// The node to copy.
    pub source: String,
    /// The node that receives the copy.
    pub target: String,
    /// What to copy.
    #[arg(long, value_enum, default_value = "full")]
    pub sync: SyncMode,
    /// With --wait: what to do once the mirror is in sync.
    #[arg(long, value_enum, default_value = "stay")]
    pub when_ready: WhenReady,
    #[command(flatten)]
    pub job: JobArgs,
}

#[derive(Debug, Args)]
pub struct Stream {
    /// The node that receives the data.
    pub node: String,
    /// The node that stays its backing file (absent: the whole chain).
    #[arg(long)]
    pub base: Option<String>,
    #[command(flatten)]
    pub job: JobArgs,
}

#[derive(Debug, Args)]
pub struct Commit {
    /// The chain's top (active) node.
    pub device: String,
    /// The highest layer to commit (absent: the active layer; with --wait that commit is
    /// completed as soon as it is in sync).
    #[arg(long)]
    pub top: Option<String>,
    /// The layer that receives the data (absent: the chain's bottom).
    #[arg(long)]
    pub base: Option<String>,
    #[command(flatten)]
    pub job: JobArgs,
}

#[derive(Debug, Args)]
pub struct Snapshot {
    /// The node the overlay goes on.
    pub node: String,
    /// The overlay's file: a qcow2 image created with the node as its backing file.
    pub file: String,
    /// The overlay's node name.
    #[arg(long)]
    pub node_name: String,
}

#[derive(Debug, Subcommand)]
pub enum BitmapCmd {
    /// Add a bitmap.
    Add {
        /// The node.
        node: String,
        /// The bitmap.
        name: String,
        /// Bytes per bit, with a K, M suffix.
        #[arg(long, value_parser = parse_size)]
        granularity: Option<u64>,
        /// Store it in the image at close.
        #[arg(long)]
        persistent: bool,
        /// Create it not recording.
        #[arg(long)]
        disabled: bool,
    },
    /// Remove a bitmap.
    Rm {
        /// The node.
        node: String,
        /// The bitmap.
        name: String,
    },
    /// List bitmaps, of one node or of all.
    Ls {
        /// The node.
        node: Option<String>,
    },
    /// OR bitmaps into another of the same node.
    Merge {
        /// The node.
        node: String,
        /// The bitmap that receives the bits.
        target: String,
        /// The bitmaps merged in.
        #[arg(required = true)]
        sources: Vec<String>,
    },
    /// Clear a bitmap.
    Clear {
        /// The node.
        node: String,
        /// The bitmap.
        name: String,
    },
    /// Start recording writes.
    Enable {
        /// The node.
        node: String,
        /// The bitmap.
        name: String,
    },
    /// Stop recording writes.
    Disable {
        /// The node.
        node: String,
        /// The bitmap.
        name: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportType {
    Nbd,
    VhostUserBlk,
    Fuse,
}

#[derive(Debug, Subcommand)]
pub enum ExportCmd {
    /// Export a node.
    Add {
        /// The node.
        node: String,
        /// The export's id (the node's name when absent).
        #[arg(long)]
        id: Option<String>,
        /// The protocol.
        #[arg(long = "type", value_enum, default_value = "nbd")]
        kind: ExportType,
        /// Let clients write.
        #[arg(long)]
        writable: bool,
        /// nbd: the export's name (the node's name when absent).
        #[arg(long)]
        name: Option<String>,
        /// nbd: start the NBD server first, on a Unix socket path or HOST:PORT.
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// vhost-user-blk: the socket the VMM connects to; fuse: the mount point (a file).
        #[arg(long, value_name = "PATH")]
        path: Option<String>,
    },
    /// Remove an export.
    Rm {
        /// The export.
        id: String,
        /// Disconnect its clients instead of refusing while they are connected.
        #[arg(long)]
        hard: bool,
    },
    /// List exports.
    Ls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    /// The driver's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

#[derive(Debug, Args)]
pub struct Create {
    /// The image file, created (an existing file is truncated).
    pub file: String,
    /// The image's size: bytes, or with a K, M, G, T suffix.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// The image's format.
    #[arg(long, value_enum, default_value = "qcow2")]
    pub format: Format,
    /// qcow2: the backing file recorded in the image.
    #[arg(long)]
    pub backing: Option<String>,
    /// qcow2: the backing file's format.
    #[arg(long)]
    pub backing_format: Option<String>,
    /// qcow2: the cluster size, with a K, M suffix.
    #[arg(long, value_parser = parse_size)]
    pub cluster_size: Option<u64>,
    /// Open the image as a node of this name (its file becomes NAME-file); without it the
    /// image is only created.
    #[arg(long)]
    pub node_name: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum JobCmd {
    /// List jobs.
    Ls,
    /// Pause a job.
    Pause {
        /// The job.
        id: String,
    },
    /// Resume a paused job.
    Resume {
        /// The job.
        id: String,
    },
    /// Cancel a job (a ready mirror ends in sync, unless --force).
    Cancel {
        /// The job.
        id: String,
        /// Abandon a ready mirror instead of ending it in sync.
        #[arg(long)]
        force: bool,
    },
    /// Complete a ready job: a mirror or commit switches users to its target.
    Complete {
        /// The job.
        id: String,
    },
    /// Finalize a pending job.
    Finalize {
        /// The job.
        id: String,
    },
    /// Dismiss a concluded job.
    Dismiss {
        /// The job.
        id: String,
    },
    /// Set a job's speed limit.
    Speed {
        /// The job.
        id: String,
        /// Bytes per second, with a K, M, G suffix; 0 for no limit.
        #[arg(value_parser = parse_size)]
        speed: u64,
    },
    /// Wait for jobs to end, with a progress bar each.
    Wait {
        /// The jobs (all running ones when none is named).
        ids: Vec<String>,
    },
}

/// A size as QEMU's tools read it: bytes, or a number (fractions allowed) with one of the
/// binary suffixes K, M, G, T, P, E (a trailing B or iB is accepted).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let body = trimmed
        .strip_suffix("iB")
        .or_else(|| trimmed.strip_suffix('B'))
        .unwrap_or(trimmed);
    let (number, shift) = match body.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                'E' => 60,
                _ => return Err(format!("'{text}': unknown size suffix '{c}'")),
            };
            (&body[..i], shift)
        }
        _ => (body, 0),
    };
    let bad = || format!("'{text}' is not a size (write e.g. 4096, 64K, 1.5G)");
    if number.is_empty() || number.starts_with('-') || number.starts_with('+') {
        return Err(bad());
    }
    if let Ok(whole) = number.parse::<u64>() {
        return whole
            .checked_mul(1u64 << shift)
            .ok_or_else(|| format!("'{text}' is too large"));
    }
    let fraction: f64 = number.parse().map_err(|_| bad())?;
    let bytes = fraction * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("'{text}' is too large"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2MB"), Ok(2 << 20));
        assert_eq!(parse_size("1.5M"), Ok(3 << 19));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert!(parse_size("").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("16E").is_err());
        assert!(parse_size("1e30").is_err());
    }

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }
}
