//! blockctl: a command line for people (and scripts, with `--json`) that drives blockd, or
//! qemu-storage-daemon, over QMP: the node graph as a tree, jobs with progress bars,
//! bitmaps, exports, image creation, and a live event feed.

mod cli;
mod commands;
mod ls;
mod output;
mod progress;
mod watch;

use clap::{CommandFactory, Parser};
use cli::{Cli, Cmd, EXIT_FAILED};
use output::Failure;
use qmp::Client;
use std::time::Duration;
use tokio::time::Instant;

fn main() {
    // Rust ignores SIGPIPE, which turns `blockctl ls | head` into a panic on the next print;
    // a command-line tool dies quietly of it instead, as cat and ls do.
    // SAFETY: nothing else runs yet, and SIG_DFL is a valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let json = cli.json;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("blockctl: cannot start: {e}");
            std::process::exit(EXIT_FAILED);
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(failure) => failure.report(json),
    };
    std::process::exit(code);
}

/// Runs one command; the exit status on success (a job's outcome may make it non-zero).
async fn run(cli: Cli) -> Result<i32, Failure> {
    match &cli.command {
        Cmd::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "blockctl",
                &mut std::io::stdout(),
            );
            return Ok(0);
        }
        Cmd::Man { dir } => {
            write_man_pages(dir)?;
            return Ok(0);
        }
        _ => {}
    }
    let mut client = connect(&cli).await?;
    let reconnect = matches!(cli.command, Cmd::Watch { reconnect: true });
    match cli.command {
        Cmd::Watch { .. } => watch::watch(&mut client, cli.json, reconnect).await,
        command => commands::run(&mut client, command, cli.json).await,
    }
}

/// Connects within `--connect-timeout`. qemu-storage-daemon's monitor serves one client
/// at a time: another waits for its greeting until the first leaves, and one that comes
/// just as the previous client goes may be hung up on before the greeting, which is tried
/// again.
async fn connect(cli: &Cli) -> Result<Client, Failure> {
    let Some(socket) = &cli.socket else {
        return Err(Failure::usage(
            "no QMP monitor given: use -s SOCKET or set BLOCKCTL_SOCKET",
        ));
    };
    let address: qmp::Address = socket
        .parse()
        .map_err(|e: std::io::Error| Failure::usage(e.to_string()))?;
    let deadline = Instant::now() + Duration::from_secs(cli.connect_timeout);
    loop {
        let attempt = tokio::time::timeout_at(deadline, Client::connect(&address)).await;
        match attempt {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(e))
                if e.kind() == std::io::ErrorKind::UnexpectedEof && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Err(e)) => {
                let hint = match e.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                        " (is the daemon running, with a monitor there?)"
                    }
                    _ => "",
                };
                return Err(Failure::new(format!(
                    "cannot connect to {address}: {e}{hint}"
                )));
            }
            Err(_) => {
                return Err(Failure::new(format!(
                    "{address} did not answer within {} s (another client may hold \
                     qemu-storage-daemon's only monitor connection)",
                    cli.connect_timeout
                )))
            }
        }
    }
}

fn write_man_pages(dir: &std::path::Path) -> Result<(), Failure> {
    let fail =
        |e: std::io::Error| Failure::new(format!("writing man pages into {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(fail)?;
    let command = Cli::command();
    let mut pages = vec![(String::from("blockctl"), command.clone())];
    for sub in command.get_subcommands() {
        pages.push((format!("blockctl-{}", sub.get_name()), sub.clone()));
    }
    for (name, page) in pages {
        let mut text = Vec::new();
        clap_mangen::Man::new(page)
            .title(name.clone())
            .render(&mut text)
            .map_err(fail)?;
        std::fs::write(dir.join(format!("{name}.1")), text).map_err(fail)?;
    }
    Ok(())
}
