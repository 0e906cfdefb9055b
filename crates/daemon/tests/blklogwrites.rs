//! The blklogwrites driver side by side with qsd: its options and their refusals, and its
//! log: replayed onto the image's earlier content it gives the image, and qsd appends to a
//! log blockd wrote (and blockd to qsd's), so the two agree on the layout.

mod common;

use common::log_writes::Log;
use common::*;
use serde_json::{json, Value};
use std::path::Path;

/// Files `d` (the disk) and `lf` (its log), and a junk file that is no log.
fn files(dir: &Path) -> Vec<String> {
    let (disk, log, junk) = (p(dir, "d.raw"), p(dir, "l.raw"), p(dir, "junk.raw"));
    qemu_img(&["create", "-q", "-f", "raw", &disk, "4M"]);
    qemu_img(&["create", "-q", "-f", "raw", &junk, "1M"]);
    std::fs::write(&log, b"").unwrap();
    vec![
        s("--blockdev"),
        format!("driver=file,node-name=df,filename={disk}"),
        s("--blockdev"),
        format!("driver=file,node-name=lf,filename={log}"),
        s("--blockdev"),
        format!("driver=file,node-name=jf,filename={junk}"),
    ]
}

#[tokio::test]
async fn options_match_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let args = files(dir.path());
    let add = |log: &str, extra: Value| {
        let mut a = json!({"driver": "blklogwrites", "node-name": "lw", "file": "df", "log": log});
        a.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        ("blockdev-add", a)
    };
    let del = ("blockdev-del", json!({"node-name": "lw"}));
    let mut requests = Vec::new();
    for extra in [
        json!({"log-sector-size": 1000}),
        json!({"log-sector-size": 16}),
        json!({"log-sector-size": 1 << 24}),
        json!({"log-sector-size": 4096, "log-append": true}),
        json!({"log-super-update-interval": 0}),
        json!({"bogus": 1}),
    ] {
        requests.push(add("lf", extra));
    }
    requests.push(add("jf", json!({"log-append": true})));
    requests.push((
        "blockdev-add",
        json!({"driver": "blklogwrites", "node-name": "lw", "file": "df"}),
    ));
    for extra in [
        json!({"log-sector-size": 32}),
        json!({"log-sector-size": 8 << 20}),
        json!({}),
    ] {
        requests.push(add("lf", extra));
        requests.push(del.clone());
    }
    requests.push(add("lf", json!({})));
    requests.push((
        "blockdev-add",
        json!({"driver": "blklogwrites", "node-name": "lw2", "file": "df", "log": "lf"}),
    ));
    let [ours, theirs] = replies_of_both(dir.path(), &args, &requests).await;
    assert_eq!(
        ours,
        theirs,
        "{}",
        first_difference(&ours, &theirs).unwrap_or_default()
    );
}

/// One daemon session on the logged disk: the qemu-io commands through NBD, then quit.
async fn session(which: Impl, dir: &Path, append: bool, commands: &[&str]) {
    let wd = dir.join(format!("{which:?}-{append}"));
    std::fs::create_dir_all(&wd).unwrap();
    let sock = wd.join("nbd.sock");
    let (disk, log) = (p(dir, "d.raw"), p(dir, "l.raw"));
    let mut args = vec![
        s("--blockdev"),
        format!("driver=file,node-name=df,filename={disk},discard=unmap"),
        s("--blockdev"),
        format!("driver=file,node-name=lf,filename={log}"),
        s("--blockdev"),
        format!(
            "driver=blklogwrites,node-name=lw,file=df,log=lf,log-append={append},discard=unmap"
        ),
    ];
    args.extend(nbd_server_args(&sock));
    args.extend([s("--export"), s("type=nbd,id=e,node-name=lw,writable=on")]);
    let daemon = Daemon::start(which, &wd, &args);
    let mut c = daemon.qmp().await;
    let uri = format!("nbd+unix:///lw?socket={}", sock.display());
    for command in commands {
        let outcome = qemu_io_outcome(&["-f", "raw", "-c", command, &uri]);
        assert_eq!(outcome, "ok", "{which:?}: {command}");
    }
    delete_export_when_unused(&mut c, "e").await;
    daemon.quit(&mut c).await;
}

/// Each daemon writes a log, the other appends to it, and the whole log replays to the
/// disk both wrote.
#[tokio::test]
async fn logs_replay_to_the_disk_and_each_daemon_appends_to_the_others() {
    for (first, second) in [(Impl::Blockd, Impl::Qsd), (Impl::Qsd, Impl::Blockd)] {
        let dir = tempfile::tempdir().unwrap();
        let disk = p(dir.path(), "d.raw");
        let earlier = p(dir.path(), "earlier.raw");
        files(dir.path());
        qemu_io_outcome(&["-f", "raw", "-c", "write -P 9 0 4M", &disk]);
        std::fs::copy(&disk, &earlier).unwrap();
        let one = [
            "write -P 1 0 64k",
            "write -P 2 100000 3000",
            "write -z 1M 128k",
            "discard 2M 64k",
            "flush",
        ];
        session(first, dir.path(), false, &one).await;
        let two = [
            "write -P 3 60000 10000",
            "write -z 3000000 700",
            "write -z 1500 300000",
            "flush",
        ];
        session(second, dir.path(), true, &two).await;
        let log = Log::read(&p(dir.path(), "l.raw"));
        assert!(
            log.entries.len() >= 6,
            "{first:?}: {} entries",
            log.entries.len()
        );
        let replayed = p(dir.path(), "replayed.raw");
        log.replay(&earlier, &replayed, log.entries.len(), |_| true);
        // The file punched a hole where the discard went: the replay zeroes it.
        let cmp = qemu_img(&["compare", "-f", "raw", "-F", "raw", &replayed, &disk]);
        assert!(
            cmp.contains("identical"),
            "{first:?} then {second:?}: {cmp}"
        );
    }
}
