//! Crash consistency: the daemon runs a workload on an image whose file sits under a
//! blklogwrites filter, which records every write and flush in order. The log is then
//! replayed onto the image's content from before the workload, cut at many points, as a
//! crash could have cut it: at every flush, and between flushes with some of the writes
//! since the last flush dropped (a disk may persist unflushed writes in any order). Each
//! replayed image must pass `qemu-img check` (leaks allowed, corruption never), every write
//! acknowledged before the cut's flush must read back, and a persistent bitmap must be
//! either marked in use (not trusted) or right.
//!
//! The replay reads the log by the dm-log-writes layout itself, independently of the
//! driver that wrote it (`common::log_writes`).

mod common;

use common::log_writes::Log;
use common::*;
use serde_json::{json, Value};

/// `qemu-img check` of a replayed image: corruptions must be none (leaks are allowed: a
/// crash may leave allocated clusters nobody uses), but for one kind. A cut inside an
/// internal snapshot's creation can leave the COPIED flags of some tables out of step
/// with their refcounts: they live in other clusters, so no order of writes avoids the
/// window (QEMU's has it too). That state is safe (no snapshot references the clusters
/// yet; a flag wrongly clear costs a copy, one wrongly set sits on a refcount that is only
/// too high), and `qemu-img check -r all` repairs it: it must, to a clean image.
fn check_clean(image: &str, cut: &str) {
    let report = check(image, &[], cut);
    if report.corruptions == 0 {
        return;
    }
    let unexpected: Vec<&String> = report
        .errors
        .iter()
        .filter(|e| !e.contains("OFLAG_COPIED"))
        .collect();
    assert!(unexpected.is_empty(), "{cut}: {:?}", report.errors);
    let repaired = format!("{image}.repaired");
    std::fs::copy(image, &repaired).unwrap();
    check(&repaired, &["-r", "all"], cut);
    let after = check(&repaired, &[], cut);
    assert_eq!(after.corruptions, 0, "{cut}, repaired: {:?}", after.errors);
}

struct CheckReport {
    corruptions: u64,
    /// qemu-img's lines about each error.
    errors: Vec<String>,
}

fn check(image: &str, extra: &[&str], cut: &str) -> CheckReport {
    let out = run(std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2", "--output=json"])
        .args(extra)
        .arg(image));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "{cut}: qemu-img check gave no report: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        report.get("check-errors").is_none_or(|e| e == 0),
        "{cut}: {report}"
    );
    CheckReport {
        corruptions: report["corruptions"].as_u64().unwrap_or(0),
        errors: String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.starts_with("ERROR"))
            .map(str::to_string)
            .collect(),
    }
}

/// Replays every cut of `log`: at each flush (then `at_flush` checks the image too), and
/// for each interval between flushes a few times with some of its writes dropped. Each
/// replayed image must check clean. Returns the number of cuts.
fn check_every_cut(
    log: &Log,
    base: &str,
    cut_image: &str,
    mut at_flush: impl FnMut(usize, &str),
) -> usize {
    let flushes = log.flushes();
    let mut cuts = 0;
    for (n, &flush) in flushes.iter().enumerate() {
        let name = format!("cut at flush {n} (entry {flush})");
        log.replay(base, cut_image, flush + 1, |_| true);
        check_clean(cut_image, &name);
        at_flush(flush, &name);
        cuts += 1;
        // Up to the next flush, keep some of the writes and drop the others.
        let next = flushes.get(n + 1).copied().unwrap_or(log.entries.len());
        if next > flush + 2 {
            for seed in 0..3u64 {
                let keep = |i: usize| i <= flush || coin(seed + n as u64 * 7, i);
                log.replay(base, cut_image, next, keep);
                let name = format!("cut before entry {next} after flush {n}, seed {seed}");
                check_clean(cut_image, &name);
                cuts += 1;
            }
        }
    }
    cuts
}

/// The guest's writes: phase `p` writes pattern `0x40 + p` into its own 4 MiB region, some
/// of it in whole clusters, some in pieces of one, then flushes.
const PHASES: u8 = 8;

fn pattern(phase: u8) -> u8 {
    0x40 + phase
}

fn phase_commands(phase: u8) -> Vec<String> {
    let base = phase as u64 * (4 << 20);
    let p = pattern(phase);
    vec![
        format!("write -P {p} {base} 1M"),
        format!("write -P {p} {} 4k", base + (2 << 20) + 512),
        format!("write -P {p} {} 192k", base + (3 << 20) - 65536),
        "flush".to_string(),
    ]
}

/// Reads each phase's writes back from `image`; which of them did.
fn phases_present(image: &str) -> Vec<bool> {
    (1..=PHASES)
        .map(|phase| {
            phase_commands(phase)
                .iter()
                .filter(|c| c.starts_with("write"))
                .all(|c| {
                    let read = c.replacen("write", "read", 1);
                    qemu_io_outcome(&["-r", "-f", "qcow2", "-c", &read, image]) == "ok"
                })
        })
        .collect()
}

/// A deterministic pseudo-random choice per entry, for the cuts between flushes.
fn coin(seed: u64, i: usize) -> bool {
    let mut x = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x & 1 == 1
}

/// The daemon writes, snapshots, resizes and records a persistent bitmap in a qcow2 whose
/// file is logged; every cut of the log replays to a clean image holding every phase
/// flushed before the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cut_of_a_guest_workload_replays_to_a_clean_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = p(dir.path(), "disk.qcow2");
    let base = p(dir.path(), "base.qcow2");
    let log = p(dir.path(), "disk.log");
    qemu_img(&["create", "-q", "-f", "qcow2", &image, "40M"]);
    std::fs::copy(&image, &base).unwrap();
    std::fs::write(&log, b"").unwrap();
    let sock = dir.path().join("nbd.sock");
    let mut args = vec![
        s("--blockdev"),
        format!("driver=file,node-name=f,filename={image}"),
        s("--blockdev"),
        format!("driver=file,node-name=lf,filename={log}"),
        s("--blockdev"),
        s("driver=blklogwrites,node-name=lw,file=f,log=lf,log-super-update-interval=64"),
        s("--blockdev"),
        s("driver=qcow2,node-name=q,file=lw,discard=unmap"),
    ];
    args.extend(nbd_server_args(&sock));
    args.extend([s("--export"), s("type=nbd,id=e,node-name=q,writable=on")]);
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &args);
    let mut c = daemon.qmp().await;
    c.execute(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "b0", "persistent": true}),
    )
    .await
    .unwrap();
    let uri = format!("nbd+unix:///q?socket={}", sock.display());
    for phase in 1..=PHASES {
        let mut io = vec!["-f", "raw"];
        let commands = phase_commands(phase);
        for command in &commands {
            io.extend(["-c", command]);
        }
        io.push(&uri);
        assert_eq!(qemu_io_outcome(&io), "ok", "phase {phase}");
        match phase {
            3 => {
                c.execute(
                    "blockdev-snapshot-internal-sync",
                    json!({"device": "q", "name": "s1"}),
                )
                .await
                .unwrap();
            }
            5 => {
                // An export does not share resizing: it goes for the resize.
                delete_export_when_unused(&mut c, "e").await;
                c.execute("block_resize", json!({"node-name": "q", "size": 48 << 20}))
                    .await
                    .unwrap();
                c.execute(
                    "block-export-add",
                    json!({"type": "nbd", "id": "e", "node-name": "q", "writable": true}),
                )
                .await
                .unwrap();
                // Clusters allocated in the new room, then freed.
                let io = [
                    "-f",
                    "raw",
                    "-c",
                    "write -P 0x7f 40M 1M",
                    "-c",
                    "discard 40M 1M",
                ];
                assert_eq!(qemu_io_outcome(&[&io[..], &[uri.as_str()]].concat()), "ok");
            }
            _ => {}
        }
    }
    let sha = c
        .execute(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "q", "name": "b0"}),
        )
        .await
        .unwrap()["sha256"]
        .clone();
    daemon.quit(&mut c).await;

    let log = Log::read(&log);
    let flushes = log.flushes();
    assert!(
        flushes.len() >= PHASES as usize,
        "{} flushes",
        flushes.len()
    );
    // Phase p is durable from the last flush before the first entry of phase p + 1's data.
    let durable_at: Vec<usize> = (1..=PHASES)
        .map(|phase| {
            let next = if phase == PHASES {
                log.entries.len()
            } else {
                log.first_with(pattern(phase + 1))
                    .expect("next phase logged")
            };
            *flushes
                .iter()
                .rfind(|&&f| f < next)
                .expect("a flush after the phase")
        })
        .collect();
    let cut_image = p(dir.path(), "cut.qcow2");
    // Cuts whose image lists the bitmap as stored (not in use): kept to check its bits.
    let mut stored = Vec::new();
    let cuts = check_every_cut(&log, &base, &cut_image, |flush, name| {
        let present = phases_present(&cut_image);
        for (phase, &at) in durable_at.iter().enumerate() {
            if at <= flush {
                assert!(present[phase], "{name}: phase {} lost", phase + 1);
            }
        }
        let info: Value =
            serde_json::from_str(&qemu_img(&["info", "--output=json", &cut_image])).unwrap();
        let listed = info["format-specific"]["data"]["bitmaps"]
            .as_array()
            .cloned();
        for bitmap in listed.unwrap_or_default() {
            let in_use = bitmap["flags"]
                .as_array()
                .is_some_and(|f| f.contains(&json!("in-use")));
            if !in_use {
                let copy = p(dir.path(), &format!("stored-{flush}.qcow2"));
                std::fs::copy(&cut_image, &copy).unwrap();
                stored.push(copy);
            }
        }
    });
    assert!(cuts > 2 * PHASES as usize, "only {cuts} cuts");
    assert!(!stored.is_empty(), "no cut has the bitmap stored");

    // The whole log: the image the daemon left, bitmap stored and right.
    log.replay(&base, &cut_image, log.entries.len(), |_| true);
    check_clean(&cut_image, "the whole log");
    assert_eq!(
        std::fs::read(&cut_image).unwrap(),
        std::fs::read(&image).unwrap(),
        "the whole log replays to the image itself"
    );
    let info: Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", &cut_image])).unwrap();
    let bitmaps = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(bitmaps[0]["name"], "b0", "{info}");
    assert_eq!(bitmaps[0]["flags"], json!(["auto"]), "{info}");
    // Any cut that lists the bitmap as stored, the whole log's included, has it right.
    stored.push(cut_image.clone());
    for (i, image) in stored.iter().enumerate() {
        let again_dir = dir.path().join(format!("again-{i}"));
        std::fs::create_dir_all(&again_dir).unwrap();
        let node =
            format!("driver=qcow2,node-name=q,read-only=on,file.driver=file,file.filename={image}");
        let reopened = Daemon::start(Impl::Blockd, &again_dir, &[s("--blockdev"), node]);
        let mut c = reopened.qmp().await;
        let again = c
            .execute(
                "x-debug-block-dirty-bitmap-sha256",
                json!({"node": "q", "name": "b0"}),
            )
            .await
            .unwrap()["sha256"]
            .clone();
        assert_eq!(again, sha, "{image}: not the bitmap the daemon recorded");
        reopened.quit(&mut c).await;
    }
}

/// Writes five 1 MiB patterns into the qcow2 `image` with qemu-io, from `first`.
fn fill(image: &str, first: u8, at: &[&str]) {
    for (i, at) in at.iter().enumerate() {
        let w = format!("write -P {} {at} 1M", first + i as u8);
        assert_eq!(qemu_io_outcome(&["-f", "qcow2", "-c", &w, image]), "ok");
    }
}

/// The image a job writes sits on a logged file: every cut replays to a clean image, and
/// the whole log to the image the job was to make (compared with `expected`, a qcow2
/// whose view is the job's result).
async fn job_cuts(job: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (src, written, base) = (
        p(dir.path(), "src.qcow2"),
        p(dir.path(), "written.qcow2"),
        p(dir.path(), "base.qcow2"),
    );
    let log = p(dir.path(), "written.log");
    std::fs::write(&log, b"").unwrap();
    let logged = |node: &str, backing: Option<&str>| {
        let mut a = vec![
            s("--blockdev"),
            format!("driver=file,node-name=wf,filename={written}"),
            s("--blockdev"),
            format!("driver=file,node-name=lf,filename={log}"),
            s("--blockdev"),
            s("driver=blklogwrites,node-name=lw,file=wf,log=lf"),
        ];
        let backing = backing.map_or(String::new(), |b| format!(",backing={b}"));
        a.extend([
            s("--blockdev"),
            format!("driver=qcow2,node-name={node},file=lw{backing}"),
        ]);
        a
    };
    let plain = |node: &str, image: &str, backing: &str| {
        vec![
            s("--blockdev"),
            format!(
                "driver=qcow2,node-name={node},file.driver=file,file.filename={image}{backing}"
            ),
        ]
    };
    // What each job writes into: a backup's or mirror's target, a commit's base (under
    // the active layer `src`), a stream's top (over its backing file `src`).
    let (args, command, expected) = match job {
        "backup" | "mirror" => {
            qemu_img(&["create", "-q", "-f", "qcow2", &src, "32M"]);
            fill(&src, 0x61, &["0", "3M", "9M", "20M", "31M"]);
            qemu_img(&["create", "-q", "-f", "qcow2", &written, "32M"]);
            let mut args = plain("src", &src, "");
            args.extend(logged("t", None));
            let verb = format!("blockdev-{job}");
            let c = json!({"job-id": "j", "device": "src", "target": "t", "sync": "full"});
            (args, (verb, c), src.clone())
        }
        "commit" => {
            qemu_img(&["create", "-q", "-f", "qcow2", &written, "32M"]);
            fill(&written, 0x61, &["0", "3M", "9M"]);
            qemu_img(&[
                "create", "-q", "-f", "qcow2", "-b", &written, "-F", "qcow2", &src,
            ]);
            fill(&src, 0x71, &["2M", "9M", "20M"]);
            let mut args = logged("b", None);
            args.extend(plain("src", &src, ",backing=b"));
            let c = json!({"job-id": "j", "device": "src"});
            (args, ("block-commit".to_string(), c), src.clone())
        }
        _ => {
            qemu_img(&["create", "-q", "-f", "qcow2", &src, "32M"]);
            fill(&src, 0x61, &["0", "3M", "9M", "20M"]);
            qemu_img(&[
                "create", "-q", "-f", "qcow2", "-b", &src, "-F", "qcow2", &written,
            ]);
            fill(&written, 0x71, &["3M", "31M"]);
            let mut args = plain("src", &src, "");
            args.extend(logged("top", Some("src")));
            let c = json!({"job-id": "j", "device": "top"});
            (args, ("block-stream".to_string(), c), written.clone())
        }
    };
    // The result to compare with, taken before the job changes anything.
    let result = p(dir.path(), "result.raw");
    qemu_img(&["convert", "-O", "raw", &expected, &result]);
    std::fs::copy(&written, &base).unwrap();
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &args);
    let mut c = daemon.qmp().await;
    c.execute(&command.0, command.1).await.unwrap();
    let wait = std::time::Duration::from_secs(30);
    if job == "mirror" || job == "commit" {
        c.wait_event("BLOCK_JOB_READY", wait)
            .await
            .expect("the job gets ready");
        c.execute("job-complete", json!({"id": "j"})).await.unwrap();
    }
    let done = c
        .wait_event("BLOCK_JOB_COMPLETED", wait)
        .await
        .expect("the job ends");
    assert!(done["data"].get("error").is_none(), "{job}: {done}");
    daemon.quit(&mut c).await;

    let log = Log::read(&log);
    let cut_image = p(dir.path(), "cut.qcow2");
    let cuts = check_every_cut(&log, &base, &cut_image, |_, _| {});
    assert!(cuts >= 2, "{job}: only {cuts} cuts");
    log.replay(&base, &cut_image, log.entries.len(), |_| true);
    let same = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &cut_image, &result]);
    assert!(same.contains("identical"), "{job}: {same}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cut_of_a_backup_target_replays_to_a_clean_image() {
    job_cuts("backup").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cut_of_a_mirror_target_replays_to_a_clean_image() {
    job_cuts("mirror").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cut_of_a_commit_base_replays_to_a_clean_image() {
    job_cuts("commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cut_of_a_streamed_top_replays_to_a_clean_image() {
    job_cuts("stream").await;
}
