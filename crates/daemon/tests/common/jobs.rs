//! Helpers for job tests: a small backing chain, qemu-io, and waiting for job events.

use super::{qemu_img, reply, run, s, WAIT};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

pub fn qemu_io(args: &[&str]) -> String {
    let out = run(Command::new("qemu-io").args(args));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {args:?}: {text}"
    );
    text
}

/// base (16 MiB of 0x11 in its first 4 MiB) under top (0x33 at 2 MiB, zero cluster at 8 MiB).
pub fn make_chain(dir: &Path) {
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
    qemu_img(&["create", "-q", "-f", "qcow2", &p("base.qcow2"), "16M"]);
    qemu_io(&[
        "-f",
        "qcow2",
        &p("base.qcow2"),
        "-c",
        "write -P 0x11 0 4M",
        "-c",
        "write -P 0x12 12M 1M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &p("top.qcow2"),
    ]);
    qemu_io(&[
        "-f",
        "qcow2",
        &p("top.qcow2"),
        "-c",
        "write -P 0x33 2M 1M",
        "-c",
        "write -z 8M 64k",
        "-c",
        "write -P 0x34 15M 64k",
    ]);
}

pub fn chain_args(extra: &[String]) -> Vec<String> {
    let mut args = vec![
        s("--blockdev"),
        s("driver=file,node-name=f0,filename=top.qcow2"),
        s("--blockdev"),
        s("driver=qcow2,node-name=disk0,file=f0"),
    ];
    args.extend(extra.iter().cloned());
    args
}

pub fn target_args(name: &str, file: &str) -> Vec<String> {
    vec![
        s("--blockdev"),
        format!("driver=qcow2,node-name={name},file.driver=file,file.filename={file}"),
    ]
}

/// Events until (and including) the job's terminal BLOCK_JOB_* event and its `null` (or
/// `concluded` when auto-dismiss is off), as "status" strings and event names.
pub async fn job_events(client: &mut qmp::Client, id: &str, until: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let event = client
            .next_event(WAIT)
            .await
            .unwrap_or_else(|| panic!("no event after {seen:?}"));
        let name = event["event"].as_str().unwrap().to_string();
        let data = &event["data"];
        let entry = if name == "JOB_STATUS_CHANGE" {
            if data["id"] != id {
                continue;
            }
            data["status"].as_str().unwrap().to_string()
        } else if data["device"] == id || data["id"] == id {
            name
        } else {
            continue;
        };
        let done = entry == until;
        seen.push(entry);
        if done {
            return seen;
        }
    }
}

/// qsd reports internal drains as paused/running pairs; neither side's meaning changes.
pub fn without_drain_pairs(events: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in events {
        if e == "running" && out.last().map(String::as_str) == Some("paused") {
            out.pop();
            if out.last().map(String::as_str) != Some("running") {
                out.push(e.clone());
            }
            continue;
        }
        out.push(e.clone());
    }
    out
}

/// Under policy stop the job pauses with `io_status`; then resume it.
pub async fn resume_stopped_job(client: &mut qmp::Client, id: &str, io_status: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let jobs = client.execute("query-block-jobs", json!({})).await.unwrap();
        if jobs[0]["status"] == "paused" {
            assert_eq!(jobs[0]["io-status"], io_status, "{id}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{id} never paused");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client
        .execute("block-job-resume", json!({"device": id}))
        .await
        .unwrap();
}

/// `tgt.qcow2` reads the same as `top.qcow2` (qemu-img compare).
pub fn target_matches_top(dir: &Path) {
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    qemu_img(&["compare", &path("top.qcow2"), &path("tgt.qcow2")]);
}

/// The status and event sequence of a job that became ready and was completed, the first
/// of `sequences` (blockd's), equal to the second (qsd's) when there is one.
pub fn assert_ready_job_events(sequences: &[Vec<String>]) {
    assert_eq!(
        sequences[0],
        [
            "created",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    if let [blockd, qsd] = sequences {
        assert_eq!(blockd, qsd, "event order differs from qsd");
    }
}

/// Run one blockdev-create to its end: the reply, the job's statuses up to `concluded`
/// (none when refused), its query-jobs row, and the status job-dismiss leads to.
pub async fn create(c: &mut qmp::Client, id: &str, options: Value) -> Value {
    let answer = reply(
        c,
        "blockdev-create",
        json!({ "job-id": id, "options": options }),
    )
    .await;
    if answer.get("error").is_some() {
        return answer;
    }
    let mut statuses = Vec::new();
    while statuses.last() != Some(&json!("concluded")) {
        let event = c.next_event(WAIT).await.expect("job status change");
        if event["event"] == "JOB_STATUS_CHANGE" && event["data"]["id"] == id {
            statuses.push(event["data"]["status"].clone());
        } else {
            assert_ne!(event["event"], "BLOCK_JOB_COMPLETED", "not a block job");
        }
    }
    let jobs = c.execute("query-jobs", json!({})).await.unwrap();
    c.execute("job-dismiss", json!({ "id": id })).await.unwrap();
    let gone = c.wait_event("JOB_STATUS_CHANGE", WAIT).await.unwrap();
    json!({ "statuses": statuses, "jobs": jobs, "dismissed": gone["data"] })
}

/// For each name, an empty file made by blockdev-create and opened as node `name` with its
/// dots turned into dashes (`a.luks` is node `a-luks`).
pub async fn empty_file_nodes(client: &mut qmp::Client, names: &[&str]) {
    for name in names {
        create(
            client,
            "f",
            json!({"driver": "file", "filename": name, "size": 0}),
        )
        .await;
        client
            .execute(
                "blockdev-add",
                json!({"driver": "file", "node-name": name.replace('.', "-"), "filename": name}),
            )
            .await
            .unwrap();
    }
}
