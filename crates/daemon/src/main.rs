//! `blockd`: a qemu-storage-daemon compatible storage daemon.

mod authz;
mod chardev;
mod cli;
mod commands;
mod daemon;
mod exports;
mod fuse;
mod metrics;
mod schema;
mod serve;
mod vhost_relay;
mod vhost_user_blk;

use cli::{DaemonArgs, Invocation};
use daemon::Daemon;
use std::process::ExitCode;

/// Every I/O request allocates a few small futures (async trait methods); mimalloc's per-thread free lists serve them at a fraction of glibc's cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    no_huge_pages();
    init_tracing();
    let invocation = match cli::parse(std::env::args().skip(1)) {
        Ok(invocation) => invocation,
        Err(e) => {
            eprintln!("blockd: {e}");
            return ExitCode::FAILURE;
        }
    };
    match invocation {
        Invocation::Help(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Invocation::Version(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Invocation::Run(args) => run(args),
        Invocation::Serve(args) => match serve::prepare(&args) {
            Ok(daemon_args) => run(daemon_args),
            Err(e) => {
                eprintln!("blockd: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Opts this process out of transparent huge pages before anything allocates. The
/// allocator's arenas on 2 MiB pages kept 6 to 11 MiB more resident than the same arenas on
/// 4 KiB pages (mirror in RAM: peak RSS 43 MiB with them, 31 without), and nothing here
/// gains from huge pages: I/O buffers are recycled by the pool, not walked by the TLB.
fn no_huge_pages() {
    // Safety: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    // Failure (a kernel without the option) leaves the default, which is only larger.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BLOCKD_LOG")
        // fuser tries its own unmount after the fuse export's lazy one (which it cannot
        // skip) and reports the expected failure as an error.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,fuser::mnt=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run(args: DaemonArgs) -> ExitCode {
    // mimalloc purges freed memory only when later allocations come by: after a burst of
    // large requests an idle daemon kept its peak (150 MiB against qsd's 19 MiB).
    block::set_trim_hook(|| {
        // Safety: mi_collect may be called from any thread at any time.
        unsafe { libmimalloc_sys::mi_collect(false) }
    });
    for pattern in &args.trace {
        eprintln!("blockd: -T {pattern}: QEMU trace events do not exist in blockd; set BLOCKD_LOG=debug (a tracing filter) instead");
    }
    // Forking must happen before any thread exists; the parent waits for the child to say
    // that startup went well, so `--daemonize` still reports startup errors by exit code.
    let daemonized = if args.daemonize {
        match daemonize() {
            Ok(Some(parent_exit)) => return parent_exit,
            Ok(None) => true,
            Err(e) => {
                eprintln!("blockd: --daemonize: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        false
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blockd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        // Before anything is served, so that a signal never finds the default action.
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail on Linux");
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .expect("installing a SIGINT handler cannot fail on Linux");
        let io_threads = args
            .io_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let daemon = match Daemon::new(io_threads) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("blockd: cannot start I/O threads: {e}");
                return ExitCode::FAILURE;
            }
        };
        tokio::task::spawn_local(block::trim_when_idle());
        for located in args.items {
            if let Err(e) = daemon.apply(located.item.clone()).await {
                eprintln!("blockd: {}", located.error(e));
                daemon.shutdown().await;
                return ExitCode::FAILURE;
            }
        }
        if let Some(pidfile) = &args.pidfile {
            if let Err(e) = std::fs::write(pidfile, format!("{}\n", std::process::id())) {
                eprintln!("blockd: cannot write pid file {}: {e}", pidfile.display());
                daemon.shutdown().await;
                return ExitCode::FAILURE;
            }
        }
        if let Some(addr) = &args.metrics {
            match bind_metrics(addr) {
                Ok(listener) => {
                    tokio::task::spawn_local(metrics::serve(listener, daemon.clone()));
                }
                Err(e) => {
                    eprintln!("blockd: --metrics {addr}: {e}");
                    daemon.shutdown().await;
                    return ExitCode::FAILURE;
                }
            }
        }
        daemon.start_monitors();
        if daemonized {
            signal_parent_ready();
        }
        tokio::select! {
            _ = daemon.wait_quit() => {}
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
        // Let the connection tasks send the reply to `quit` before we tear down.
        tokio::task::yield_now().await;
        daemon.shutdown().await;
        if let Some(pidfile) = &args.pidfile {
            let _ = std::fs::remove_file(pidfile);
        }
        ExitCode::SUCCESS
    })
}

/// Listens for metrics scrapes on `addr` (HOST:PORT, resolved here at startup).
fn bind_metrics(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

/// The write end of the pipe on which the daemonized child reports success.
static READY_FD: std::sync::OnceLock<std::os::fd::OwnedFd> = std::sync::OnceLock::new();

/// Fork; the parent returns its exit code once the child has started (or failed to).
fn daemonize() -> nix::Result<Option<ExitCode>> {
    use nix::unistd::{fork, pipe, setsid, ForkResult};
    let (read_end, write_end) = pipe()?;
    // SAFETY: no other thread exists yet (the runtime and I/O threads start after this).
    match unsafe { fork() }? {
        ForkResult::Parent { .. } => {
            drop(write_end);
            let mut byte = [0u8; 1];
            let started = matches!(nix::unistd::read(&read_end, &mut byte), Ok(1));
            Ok(Some(if started {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }))
        }
        ForkResult::Child => {
            drop(read_end);
            setsid()?;
            let _ = READY_FD.set(write_end);
            Ok(None)
        }
    }
}

fn signal_parent_ready() {
    if let Some(fd) = READY_FD.get() {
        let _ = nix::unistd::write(fd, b"1");
        // Detach from the terminal like qsd: stdio goes to /dev/null once startup is done.
        if let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            use std::os::fd::AsRawFd;
            for target in 0..=2 {
                // SAFETY: dup2 onto the standard descriptors of our own process.
                unsafe { libc::dup2(null.as_raw_fd(), target) };
            }
        }
    }
}
