//! Every subcommand but `ls` and `watch`: each is a few QMP commands, with failures that
//! say what was being done and keep the daemon's words.

use crate::cli::{
    BitmapCmd, Cmd, Create, ExportCmd, ExportType, Format, JobArgs, JobCmd, Snapshot, WhenReady,
};
use crate::output::{bitmap_flags, bytes, estimates, print_json, print_table, refused, Failure};
use crate::progress::{self, Goal};
use qmp::api::{
    BlockCommit, BlockDirtyBitmapAdd, BlockDirtyBitmapClear, BlockDirtyBitmapDisable,
    BlockDirtyBitmapEnable, BlockDirtyBitmapMerge, BlockDirtyBitmapRemove, BlockExportAdd,
    BlockExportDel, BlockJobCancel, BlockJobSetSpeed, BlockResize, BlockStream, BlockdevAdd,
    BlockdevBackup, BlockdevCreate, BlockdevDel, BlockdevMirror, BlockdevSnapshot, Command,
    JobComplete, JobDismiss, JobFinalize, JobOptions, JobPause, JobResume, JobStatus,
    NbdServerStart, NbdServerStop, QueryBlockExports, QueryBlockJobs, QueryJobs,
    QueryNamedBlockNodes,
};
use qmp::Client;
use serde_json::{json, Map, Value};

/// Runs `command` and returns the exit status.
pub async fn run(client: &mut Client, command: Cmd, json: bool) -> Result<i32, Failure> {
    match command {
        Cmd::Ls => crate::ls::ls(client, json).await,
        Cmd::Backup(b) => {
            let id = b.job.job_id.clone().unwrap_or_else(|| b.source.clone());
            let mut backup = BlockdevBackup::new(&b.source, &b.target, b.sync.into());
            backup.job = job_options(&id, &b.job);
            backup.bitmap = b.bitmap;
            backup.bitmap_mode = b.bitmap_mode;
            backup.compress = b.compress.then_some(true);
            client.call(&backup).await.map_err(refused(format!(
                "backup of '{}' into '{}'",
                b.source, b.target
            )))?;
            started(
                client,
                "backup",
                id,
                &b.job,
                Goal::End {
                    complete_when_ready: false,
                },
                json,
            )
            .await
        }
        Cmd::Mirror(m) => {
            let id = m.job.job_id.clone().unwrap_or_else(|| m.source.clone());
            let mut mirror = BlockdevMirror::new(&m.source, &m.target, m.sync.into());
            mirror.job = job_options(&id, &m.job);
            client.call(&mirror).await.map_err(refused(format!(
                "mirror of '{}' into '{}'",
                m.source, m.target
            )))?;
            if !m.job.wait || m.when_ready == WhenReady::Stay {
                return started(client, "mirror", id, &m.job, Goal::Ready, json).await;
            }
            let ids = [id.clone()];
            let ready = progress::follow(client, &ids, Goal::Ready).await?;
            if ready[0].ended != progress::Ended::Ready {
                // Failed or cancelled before it was in sync.
                return Ok(progress::report(&ready, json));
            }
            match m.when_ready {
                WhenReady::Complete => client
                    .call(&JobComplete { id: id.clone() })
                    .await
                    .map_err(refused(format!("completing mirror '{id}'")))?,
                _ => client
                    .call(&BlockJobCancel {
                        device: id.clone(),
                        force: None,
                    })
                    .await
                    .map_err(refused(format!("ending mirror '{id}' in sync")))?,
            };
            let mut ended = progress::follow(
                client,
                &ids,
                Goal::End {
                    complete_when_ready: false,
                },
            )
            .await?;
            // The time since the mirror started, not since it was ready.
            ended[0].seconds += ready[0].seconds;
            Ok(progress::report(&ended, json))
        }
        Cmd::Stream(s) => {
            let id = s.job.job_id.clone().unwrap_or_else(|| s.node.clone());
            let stream = BlockStream {
                job: job_options(&id, &s.job),
                device: s.node.clone(),
                base_node: s.base,
            };
            client
                .call(&stream)
                .await
                .map_err(refused(format!("stream into '{}'", s.node)))?;
            started(
                client,
                "stream",
                id,
                &s.job,
                Goal::End {
                    complete_when_ready: false,
                },
                json,
            )
            .await
        }
        Cmd::Commit(c) => {
            let id = c.job.job_id.clone().unwrap_or_else(|| c.device.clone());
            let commit = BlockCommit {
                job: job_options(&id, &c.job),
                device: c.device.clone(),
                top_node: c.top,
                base_node: c.base,
            };
            client
                .call(&commit)
                .await
                .map_err(refused(format!("commit of '{}'", c.device)))?;
            started(
                client,
                "commit",
                id,
                &c.job,
                Goal::End {
                    complete_when_ready: true,
                },
                json,
            )
            .await
        }
        Cmd::Snapshot(s) => snapshot(client, s, json).await,
        Cmd::Bitmap(b) => bitmap(client, b, json).await,
        Cmd::Export(e) => export(client, e, json).await,
        Cmd::Create(c) => create(client, c, json).await,
        Cmd::Resize { node, size } => {
            client
                .call(&BlockResize {
                    node_name: node.clone(),
                    size,
                })
                .await
                .map_err(refused(format!("resizing '{node}'")))?;
            done(
                json,
                &format!("'{node}' is now {}", bytes(size)),
                json!({"node": node, "size": size}),
            );
            Ok(0)
        }
        Cmd::Job(j) => job(client, j, json).await,
        Cmd::Watch { .. } | Cmd::Completions { .. } | Cmd::Man { .. } => {
            unreachable!("handled before connecting")
        }
    }
}

/// The job's id and speed; QEMU's defaults for the rest, so that a job blockctl stops
/// following (interrupted) finishes and goes on its own.
fn job_options(id: &str, args: &JobArgs) -> JobOptions {
    JobOptions {
        job_id: Some(id.to_owned()),
        speed: args.speed,
        auto_finalize: None,
        auto_dismiss: None,
    }
}

/// After a job command: wait for it when asked, else say it started.
async fn started(
    client: &mut Client,
    kind: &str,
    id: String,
    args: &JobArgs,
    goal: Goal,
    json: bool,
) -> Result<i32, Failure> {
    if args.wait {
        return progress::wait(client, &[id], goal, json).await;
    }
    done(
        json,
        &format!("{kind} job '{id}' started"),
        json!({"job-id": id}),
    );
    Ok(0)
}

/// Prints what a command did.
fn done(json: bool, text: &str, value: Value) {
    if json {
        print_json(&value);
    } else {
        println!("{text}");
    }
}

async fn bitmap(client: &mut Client, command: BitmapCmd, json: bool) -> Result<i32, Failure> {
    let (text, value) = match command {
        BitmapCmd::Add {
            node,
            name,
            granularity,
            persistent,
            disabled,
        } => {
            client
                .call(&BlockDirtyBitmapAdd {
                    node: node.clone(),
                    name: name.clone(),
                    granularity,
                    persistent: persistent.then_some(true),
                    disabled: disabled.then_some(true),
                })
                .await
                .map_err(refused(format!("adding bitmap '{name}' to '{node}'")))?;
            (
                format!("bitmap '{name}' added to '{node}'"),
                json!({"node": node, "name": name}),
            )
        }
        BitmapCmd::Rm { node, name } => {
            let done = format!("bitmap '{name}' removed from '{node}'");
            let command = BlockDirtyBitmapRemove { node, name };
            named_bitmap(
                client,
                &command,
                &command.node,
                &command.name,
                "removing",
                done,
            )
            .await?
        }
        BitmapCmd::Clear { node, name } => {
            let done = format!("bitmap '{name}' of '{node}' cleared");
            let command = BlockDirtyBitmapClear { node, name };
            named_bitmap(
                client,
                &command,
                &command.node,
                &command.name,
                "clearing",
                done,
            )
            .await?
        }
        BitmapCmd::Enable { node, name } => {
            let done = format!("bitmap '{name}' of '{node}' records writes");
            let command = BlockDirtyBitmapEnable { node, name };
            named_bitmap(
                client,
                &command,
                &command.node,
                &command.name,
                "enabling",
                done,
            )
            .await?
        }
        BitmapCmd::Disable { node, name } => {
            let done = format!("bitmap '{name}' of '{node}' no longer records writes");
            let command = BlockDirtyBitmapDisable { node, name };
            named_bitmap(
                client,
                &command,
                &command.node,
                &command.name,
                "disabling",
                done,
            )
            .await?
        }
        BitmapCmd::Merge {
            node,
            target,
            sources,
        } => {
            client
                .call(&BlockDirtyBitmapMerge {
                    node: node.clone(),
                    target: target.clone(),
                    bitmaps: sources.clone(),
                })
                .await
                .map_err(refused(format!(
                    "merging into bitmap '{target}' of '{node}'"
                )))?;
            (
                format!("{} merged into '{target}' of '{node}'", sources.join(", ")),
                json!({"node": node, "target": target, "bitmaps": sources}),
            )
        }
        BitmapCmd::Ls { node } => {
            let nodes = client
                .call(&QueryNamedBlockNodes { flat: Some(true) })
                .await
                .map_err(refused("listing nodes"))?;
            if let Some(wanted) = &node {
                if !nodes.iter().any(|n| &n.node_name == wanted) {
                    return Err(Failure::new(format!("no node named '{wanted}'")));
                }
            }
            let mut rows = Vec::new();
            let mut list = Vec::new();
            for n in nodes
                .iter()
                .filter(|n| node.as_ref().is_none_or(|w| w == &n.node_name))
            {
                for b in &n.dirty_bitmaps {
                    let flags = bitmap_flags(b);
                    rows.push(vec![
                        n.node_name.clone(),
                        b.name.clone(),
                        bytes(b.granularity),
                        bytes(b.count),
                        flags.join(","),
                    ]);
                    let mut entry = serde_json::to_value(b).unwrap_or(Value::Null);
                    entry["node"] = json!(n.node_name);
                    list.push(entry);
                }
            }
            if json {
                print_json(&Value::Array(list));
            } else {
                print_table(&["NODE", "BITMAP", "GRANULARITY", "DIRTY", "FLAGS"], &rows);
            }
            return Ok(0);
        }
    };
    done(json, &text, value);
    Ok(0)
}

/// Runs a bitmap command that names one bitmap; returns what to print.
async fn named_bitmap<C: Command>(
    client: &mut Client,
    command: &C,
    node: &str,
    name: &str,
    doing: &str,
    done: String,
) -> Result<(String, Value), Failure> {
    client
        .call(command)
        .await
        .map_err(refused(format!("{doing} bitmap '{name}' of '{node}'")))?;
    Ok((done, json!({"node": node, "name": name})))
}

async fn export(client: &mut Client, command: ExportCmd, json: bool) -> Result<i32, Failure> {
    match command {
        ExportCmd::Add {
            node,
            id,
            kind,
            writable,
            name,
            listen,
            path,
        } => {
            let id = id.unwrap_or_else(|| node.clone());
            let mut started_server = false;
            let mut options = Map::new();
            options.insert("id".into(), json!(id));
            options.insert("node-name".into(), json!(node));
            options.insert("writable".into(), json!(writable));
            match kind {
                ExportType::Nbd => {
                    if path.is_some() {
                        return Err(Failure::usage(
                            "--path is for vhost-user-blk and fuse exports",
                        ));
                    }
                    options.insert("type".into(), json!("nbd"));
                    if let Some(name) = name {
                        options.insert("name".into(), json!(name));
                    }
                    if let Some(listen) = &listen {
                        client
                            .call(&NbdServerStart {
                                addr: socket_address(listen)?,
                            })
                            .await
                            .map_err(refused(format!("starting the NBD server on {listen}")))?;
                        started_server = true;
                    }
                }
                ExportType::VhostUserBlk | ExportType::Fuse => {
                    if name.is_some() || listen.is_some() {
                        return Err(Failure::usage("--name and --listen are for nbd exports"));
                    }
                    let Some(path) = path else {
                        return Err(Failure::usage(
                            "--path is needed: the vhost-user socket, or the FUSE mount point",
                        ));
                    };
                    if kind == ExportType::Fuse {
                        options.insert("type".into(), json!("fuse"));
                        options.insert("mountpoint".into(), json!(path));
                    } else {
                        options.insert("type".into(), json!("vhost-user-blk"));
                        options.insert("addr".into(), json!({"type": "unix", "path": path}));
                    }
                }
            }
            let added = client.call(&BlockExportAdd(options)).await;
            if let Err(e) = added {
                if started_server {
                    // Left running, it would refuse the next --listen.
                    let _ = client.call(&NbdServerStop {}).await;
                }
                return Err(Failure::refused(format!("exporting '{node}'"), e));
            }
            done(
                json,
                &format!("'{node}' exported as '{id}'"),
                json!({"id": id, "node": node}),
            );
            Ok(0)
        }
        ExportCmd::Rm { id, hard } => {
            client
                .call(&BlockExportDel {
                    id: id.clone(),
                    mode: hard.then(|| "hard".to_owned()),
                })
                .await
                .map_err(refused(format!("removing export '{id}'")))?;
            done(json, &format!("export '{id}' removed"), json!({"id": id}));
            Ok(0)
        }
        ExportCmd::Ls => {
            let exports = client
                .call(&QueryBlockExports {})
                .await
                .map_err(refused("listing exports"))?;
            if json {
                print_json(&serde_json::to_value(&exports).unwrap_or(Value::Null));
            } else {
                let rows: Vec<Vec<String>> = exports
                    .iter()
                    .map(|e| {
                        vec![
                            e.id.clone(),
                            e.kind.clone(),
                            e.node_name.clone(),
                            if e.shutting_down {
                                "shutting down"
                            } else {
                                "serving"
                            }
                            .to_owned(),
                        ]
                    })
                    .collect();
                print_table(&["ID", "TYPE", "NODE", "STATE"], &rows);
            }
            Ok(0)
        }
    }
}

/// `/path` or `unix:/path` is a Unix socket, `HOST:PORT` a TCP one; as nbd-server-start
/// takes them (SocketAddressLegacy, with the address under `data`).
fn socket_address(text: &str) -> Result<Value, Failure> {
    if let Some(path) = text.strip_prefix("unix:") {
        return Ok(json!({"type": "unix", "data": {"path": path}}));
    }
    if text.starts_with('/') || text.starts_with('.') {
        return Ok(json!({"type": "unix", "data": {"path": text}}));
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()) => {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            Ok(json!({"type": "inet", "data": {"host": host, "port": port}}))
        }
        _ => Err(Failure::usage(format!(
            "'{text}' is not a listen address: write a socket path or HOST:PORT"
        ))),
    }
}

/// `create`: the image, and its node when asked.
async fn create(client: &mut Client, c: Create, json: bool) -> Result<i32, Failure> {
    if c.format == Format::Raw && (c.backing.is_some() || c.cluster_size.is_some()) {
        return Err(Failure::usage("--backing and --cluster-size are for qcow2"));
    }
    create_image(client, &c).await?;
    let text = match &c.node_name {
        Some(node) => format!(
            "{} created ({} {}), opened as '{node}'",
            c.file,
            c.format.as_str(),
            bytes(c.size)
        ),
        None => format!(
            "{} created ({} {})",
            c.file,
            c.format.as_str(),
            bytes(c.size)
        ),
    };
    done(
        json,
        &text,
        json!({"file": c.file, "size": c.size, "node": c.node_name}),
    );
    Ok(0)
}

/// Creates an overlay of `node` and puts it on top (what blockdev-snapshot-sync does, in
/// the steps qemu-storage-daemon needs: there, an overlay made by blockdev-snapshot-sync
/// over a node that no device uses is dropped at once).
async fn snapshot(client: &mut Client, s: Snapshot, json: bool) -> Result<i32, Failure> {
    let nodes = client
        .call(&QueryNamedBlockNodes { flat: Some(true) })
        .await
        .map_err(refused("listing nodes"))?;
    let Some(base) = nodes.iter().find(|n| n.node_name == s.node) else {
        return Err(Failure::new(format!("no node named '{}'", s.node)));
    };
    let overlay = Create {
        file: s.file.clone(),
        size: base.image.virtual_size,
        format: Format::Qcow2,
        backing: Some(base.file.clone()),
        backing_format: Some(base.drv.clone()),
        cluster_size: None,
        node_name: Some(s.node_name.clone()),
    };
    create_image(client, &overlay).await?;
    let placed = client
        .call(&BlockdevSnapshot {
            node: s.node.clone(),
            overlay: s.node_name.clone(),
        })
        .await;
    if let Err(e) = placed {
        for node in [s.node_name.clone(), format!("{}-file", s.node_name)] {
            let _ = client.call(&BlockdevDel { node_name: node }).await;
        }
        return Err(Failure::refused(
            format!(
                "putting the overlay on '{}' (the file {} was created and is left unused)",
                s.node, s.file
            ),
            e,
        ));
    }
    done(
        json,
        &format!(
            "'{}' is now the overlay of '{}' ({})",
            s.node_name, s.node, s.file
        ),
        json!({"node": s.node, "overlay": s.node_name, "file": s.file}),
    );
    Ok(0)
}

/// Creates the file, formats it (blockdev-create jobs), and opens it when `node_name` is
/// given.
async fn create_image(client: &mut Client, c: &Create) -> Result<(), Failure> {
    // Checked before the file is touched: a name the daemon refuses after the file was
    // created would leave an empty file behind.
    if let Some(node) = &c.node_name {
        check_node_name(node)?;
        let nodes = client
            .call(&QueryNamedBlockNodes { flat: Some(true) })
            .await
            .map_err(refused("listing nodes"))?;
        for name in [node.clone(), format!("{node}-file")] {
            if nodes.iter().any(|n| n.node_name == name) {
                return Err(Failure::new(format!(
                    "a node named '{name}' exists already"
                )));
            }
        }
    }
    let what = format!("creating {}", c.file);
    let file_size = if c.format == Format::Raw { c.size } else { 0 };
    run_create(
        client,
        &what,
        json!({"driver": "file", "filename": c.file, "size": file_size}),
    )
    .await?;
    let node = c.node_name.clone().unwrap_or_else(|| unique_name("bctl"));
    let file_node = format!("{node}-file");
    let mut file = Map::new();
    file.insert("driver".into(), json!("file"));
    file.insert("filename".into(), json!(c.file));
    file.insert("node-name".into(), json!(file_node));
    client
        .call(&BlockdevAdd(file))
        .await
        .map_err(refused(format!("{what}: opening the file")))?;
    let formatted = async {
        if c.format == Format::Qcow2 {
            let mut options = json!({"driver": "qcow2", "file": file_node, "size": c.size});
            if let Some(backing) = &c.backing {
                options["backing-file"] = json!(backing);
            }
            if let Some(format) = &c.backing_format {
                options["backing-fmt"] = json!(format);
            }
            if let Some(cluster) = c.cluster_size {
                options["cluster-size"] = json!(cluster);
            }
            run_create(client, &what, options).await?;
        }
        if c.node_name.is_some() {
            let mut format = Map::new();
            format.insert("driver".into(), json!(c.format.as_str()));
            format.insert("node-name".into(), json!(node));
            format.insert("file".into(), json!(file_node));
            if c.backing.is_some() {
                // The overlay's backing file is opened by the user's own choice of node
                // (blockdev-snapshot or a later reopen), not guessed here.
                format.insert("backing".into(), Value::Null);
            }
            client
                .call(&BlockdevAdd(format))
                .await
                .map_err(refused(format!("{what}: opening the image")))?;
        }
        Ok::<(), Failure>(())
    }
    .await;
    if c.node_name.is_none() || formatted.is_err() {
        // The file node was only a means to format the image.
        let _ = client
            .call(&BlockdevDel {
                node_name: file_node.clone(),
            })
            .await;
    }
    formatted
}

/// QEMU's rule for node names (a letter, then letters, digits, '-', '.', '_'), at most 31
/// bytes with the `-file` blockctl adds for the image's file node.
fn check_node_name(node: &str) -> Result<(), Failure> {
    let well_formed = node.starts_with(|c: char| c.is_ascii_alphabetic())
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !well_formed {
        return Err(Failure::usage(format!(
            "'{node}' is not a node name: a letter, then letters, digits, '-', '.', '_'"
        )));
    }
    if node.len() + "-file".len() > 31 {
        return Err(Failure::usage(format!(
            "'{node}' is too long: node names have at most 31 bytes, and its file's is '{node}-file'"
        )));
    }
    Ok(())
}

/// Runs one blockdev-create job to its end.
async fn run_create(client: &mut Client, what: &str, options: Value) -> Result<(), Failure> {
    let id = unique_name("bctl-create");
    client
        .call(&BlockdevCreate {
            job_id: id.clone(),
            options,
        })
        .await
        .map_err(refused(what))?;
    let outcome = progress::follow(
        client,
        std::slice::from_ref(&id),
        Goal::End {
            complete_when_ready: false,
        },
    )
    .await?;
    match &outcome[0].ended {
        progress::Ended::Completed => Ok(()),
        progress::Ended::Failed(e) => Err(Failure::new(format!("{what}: {e}"))),
        other => Err(Failure::new(format!("{what}: the job ended {other:?}"))),
    }
}

/// A name no other blockctl run uses at the same time.
fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    // Node names are at most 31 bytes in QEMU.
    format!("{prefix}-{}-{}", std::process::id(), nanos % 1_000_000)
}

async fn job(client: &mut Client, command: JobCmd, json: bool) -> Result<i32, Failure> {
    let (text, id) = match command {
        JobCmd::Ls => return job_ls(client, json).await,
        JobCmd::Wait { ids } => {
            let jobs = client
                .call(&QueryJobs {})
                .await
                .map_err(refused("listing jobs"))?;
            let ids = if ids.is_empty() {
                // The jobs on their way to an end: a ready mirror or a pending job waits
                // for someone, which would be waited for without end here.
                jobs.into_iter()
                    .filter(|j| {
                        matches!(
                            j.status,
                            JobStatus::Created
                                | JobStatus::Running
                                | JobStatus::Paused
                                | JobStatus::Waiting
                                | JobStatus::Aborting
                        )
                    })
                    .map(|j| j.id)
                    .collect()
            } else {
                if let Some(missing) = ids.iter().find(|id| !jobs.iter().any(|j| &j.id == *id)) {
                    return Err(Failure::new(format!("no job '{missing}'")));
                }
                ids
            };
            if ids.is_empty() {
                done(json, "no running jobs", json!([]));
                return Ok(0);
            }
            return progress::wait(
                client,
                &ids,
                Goal::End {
                    complete_when_ready: false,
                },
                json,
            )
            .await;
        }
        JobCmd::Pause { id } => {
            client
                .call(&JobPause { id: id.clone() })
                .await
                .map_err(refused(format!("pausing job '{id}'")))?;
            ("paused", id)
        }
        JobCmd::Resume { id } => {
            client
                .call(&JobResume { id: id.clone() })
                .await
                .map_err(refused(format!("resuming job '{id}'")))?;
            ("resumed", id)
        }
        JobCmd::Cancel { id, force } => {
            client
                .call(&BlockJobCancel {
                    device: id.clone(),
                    force: force.then_some(true),
                })
                .await
                .map_err(refused(format!("cancelling job '{id}'")))?;
            ("cancelled", id)
        }
        JobCmd::Complete { id } => {
            client
                .call(&JobComplete { id: id.clone() })
                .await
                .map_err(refused(format!("completing job '{id}'")))?;
            ("completing", id)
        }
        JobCmd::Finalize { id } => {
            client
                .call(&JobFinalize { id: id.clone() })
                .await
                .map_err(refused(format!("finalizing job '{id}'")))?;
            ("finalized", id)
        }
        JobCmd::Dismiss { id } => {
            client
                .call(&JobDismiss { id: id.clone() })
                .await
                .map_err(refused(format!("dismissing job '{id}'")))?;
            ("dismissed", id)
        }
        JobCmd::Speed { id, speed } => {
            client
                .call(&BlockJobSetSpeed {
                    device: id.clone(),
                    speed,
                })
                .await
                .map_err(refused(format!("setting the speed of job '{id}'")))?;
            ("speed set", id)
        }
    };
    done(
        json,
        &format!("job '{id}': {text}"),
        json!({"id": id, "action": text}),
    );
    Ok(0)
}

async fn job_ls(client: &mut Client, json: bool) -> Result<i32, Failure> {
    let jobs = client
        .call(&QueryJobs {})
        .await
        .map_err(refused("listing jobs"))?;
    let block_jobs = client
        .call(&QueryBlockJobs {})
        .await
        .map_err(refused("listing block jobs"))?;
    let block_job = |id: &str| block_jobs.iter().find(|b| b.device == id);
    let speed_of = |id: &str| block_job(id).map(|b| b.speed);
    if json {
        let list: Vec<Value> = jobs
            .iter()
            .map(|j| {
                let b = block_job(&j.id);
                json!({"id": j.id, "type": j.kind, "status": j.status,
                       "current-progress": j.current_progress,
                       "total-progress": j.total_progress,
                       "speed": speed_of(&j.id), "error": j.error,
                       "copy-rate": b.and_then(|b| b.copy_rate),
                       "dirty-rate": b.and_then(|b| b.dirty_rate),
                       "seconds-to-ready": b.and_then(|b| b.seconds_to_ready)})
            })
            .collect();
        print_json(&Value::Array(list));
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let percent = if j.total_progress == 0 {
                0.0
            } else {
                100.0 * j.current_progress as f64 / j.total_progress as f64
            };
            vec![
                j.id.clone(),
                j.kind.clone(),
                j.status.as_str().to_owned(),
                format!(
                    "{}/{} ({percent:.0}%)",
                    bytes(j.current_progress),
                    bytes(j.total_progress)
                ),
                match speed_of(&j.id) {
                    Some(0) | None => "-".to_owned(),
                    Some(s) => format!("{}/s", bytes(s)),
                },
                block_job(&j.id).and_then(estimates).unwrap_or_default(),
                j.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "TYPE",
            "STATUS",
            "PROGRESS",
            "SPEED LIMIT",
            "ESTIMATES",
            "ERROR",
        ],
        &rows,
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            socket_address("/tmp/n.sock").unwrap(),
            json!({"type": "unix", "data": {"path": "/tmp/n.sock"}})
        );
        assert_eq!(
            socket_address("unix:rel.sock").unwrap(),
            json!({"type": "unix", "data": {"path": "rel.sock"}})
        );
        assert_eq!(
            socket_address("127.0.0.1:10809").unwrap(),
            json!({"type": "inet", "data": {"host": "127.0.0.1", "port": "10809"}})
        );
        assert_eq!(
            socket_address("[::1]:10809").unwrap(),
            json!({"type": "inet", "data": {"host": "::1", "port": "10809"}})
        );
        assert!(socket_address("localhost").is_err());
        assert!(check_node_name("disk0").is_ok());
        assert!(check_node_name("a.b_c-d").is_ok());
        assert!(check_node_name("0disk").is_err());
        assert!(check_node_name("di sk").is_err());
        assert!(check_node_name(&"n".repeat(26)).is_ok());
        assert!(check_node_name(&"n".repeat(27)).is_err());
        assert!(socket_address("host:port").is_err());
    }
}
