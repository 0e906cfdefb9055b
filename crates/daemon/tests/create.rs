//! blockdev-create on the real daemon: QEMU's two-step qcow2 creation judged by qemu-img,
//! and the job's status events, query-jobs rows and errors compared with
//! qemu-storage-daemon.

mod common;

use common::jobs::{create, qemu_io};
use common::*;
use serde_json::{json, Value};
use std::path::Path;

fn qemu_img_json(args: &[&str]) -> Value {
    serde_json::from_str(&qemu_img(args)).unwrap()
}

/// file, blockdev-add, qcow2 on the node, blockdev-add: the image carries the options
/// asked for and passes qemu-img check; a preallocated file is fully allocated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_step_qcow2_creation_passes_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    qemu_img(&["create", "-q", "-f", "qcow2", &p("base.qcow2"), "32M"]);
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &[]);
    let mut c = daemon.qmp().await;
    let file = json!({ "driver": "file", "filename": p("new.qcow2"), "size": 0 });
    assert_eq!(
        create(&mut c, "c1", file).await["jobs"][0]["status"],
        "concluded"
    );
    c.execute(
        "blockdev-add",
        json!({ "driver": "file", "node-name": "f", "filename": p("new.qcow2") }),
    )
    .await
    .unwrap();
    let qcow2 = json!({
        "driver": "qcow2", "file": "f", "size": 64 << 20, "cluster-size": 4096,
        "lazy-refcounts": true, "refcount-bits": 8, "backing-file": "base.qcow2",
        "backing-fmt": "qcow2",
    });
    let outcome = create(&mut c, "c2", qcow2).await;
    assert_eq!(
        outcome["statuses"],
        json!(["created", "running", "waiting", "pending", "concluded"]),
        "{outcome}"
    );
    assert!(outcome["jobs"][0].get("error").is_none(), "{outcome}");
    c.execute(
        "blockdev-add",
        json!({ "driver": "qcow2", "node-name": "q", "file": "f" }),
    )
    .await
    .unwrap();
    let prealloc = json!({ "driver": "file", "filename": p("full.raw"), "size": 1 << 20,
                           "preallocation": "full" });
    assert!(create(&mut c, "c3", prealloc).await["jobs"][0]
        .get("error")
        .is_none());
    daemon.quit(&mut c).await;

    qemu_img(&["check", "-q", &p("new.qcow2")]);
    let info = qemu_img_json(&["info", "--output=json", &p("new.qcow2")]);
    assert_eq!(info["virtual-size"], 64 << 20, "{info}");
    assert_eq!(info["cluster-size"], 4096, "{info}");
    assert_eq!(info["backing-filename"], "base.qcow2", "{info}");
    assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
    let specific = &info["format-specific"]["data"];
    assert_eq!(specific["lazy-refcounts"], true, "{info}");
    assert_eq!(specific["refcount-bits"], 8, "{info}");
    assert_eq!(specific["compat"], "1.1", "{info}");
    let raw = qemu_img_json(&["info", "--output=json", &p("full.raw")]);
    assert_eq!(raw["virtual-size"], 1 << 20);
    assert!(raw["actual-size"].as_u64().unwrap() >= 1 << 20, "{raw}");
}

fn created_image_is_qcow2(path: &Path) -> bool {
    qemu_img_json(&["info", "--output=json", "-U", path.to_str().unwrap()])["format"] == "qcow2"
}

/// The same creations and refusals on both daemons give the same replies, job statuses,
/// query-jobs rows (with QEMU's error texts) and dismissals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_jobs_and_errors_match_qsd() {
    let mut transcripts = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon::start(which, dir.path(), &[]);
        let mut c = daemon.qmp().await;
        let mut seen = Vec::new();
        let file = json!({ "driver": "file", "filename": "x.qcow2", "size": 0 });
        seen.push(create(&mut c, "f", file).await);
        c.execute(
            "blockdev-add",
            json!({ "driver": "file", "node-name": "f", "filename": "x.qcow2" }),
        )
        .await
        .unwrap();
        let qcow2 = |extra: Value| {
            let mut options = json!({ "driver": "qcow2", "file": "f", "size": 16 << 20 });
            options
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            options
        };
        for options in [
            json!({ "driver": "raw" }),
            json!({ "driver": "null-co" }),
            json!({ "driver": "raw", "size": 1 }),
            json!({ "driver": "nope" }),
            json!({ "driver": "file", "filename": "none/x", "size": 0 }),
            json!({ "driver": "file", "filename": "m.raw", "size": 0,
                    "preallocation": "metadata" }),
            json!({ "driver": "file", "filename": "n.raw", "size": -1 }),
            qcow2(json!({ "file": "nonode" })),
            qcow2(json!({ "size": 1000 })),
            qcow2(json!({ "cluster-size": 1000 })),
            qcow2(json!({ "refcount-bits": 3 })),
            qcow2(json!({ "version": "v2", "refcount-bits": 8 })),
            qcow2(json!({ "version": "v2", "lazy-refcounts": true })),
            qcow2(json!({ "backing-fmt": "qcow2" })),
            qcow2(json!({ "backing-file": "b", "backing-fmt": "raw",
                          "preallocation": "metadata" })),
            qcow2(json!({ "extended-l2": true, "cluster-size": 4096 })),
            qcow2(json!({})),
        ] {
            seen.push(create(&mut c, "j", options).await);
        }
        assert!(created_image_is_qcow2(&dir.path().join("x.qcow2")));
        c.execute(
            "blockdev-add",
            json!({ "driver": "qcow2", "node-name": "q", "file": "f" }),
        )
        .await
        .unwrap();
        seen.push(create(&mut c, "j", qcow2(json!({}))).await);
        seen.push(
            reply(
                &mut c,
                "blockdev-create",
                json!({ "job-id": "a b",
                    "options": qcow2(json!({})) }),
            )
            .await,
        );
        if which == Impl::Blockd {
            daemon.quit(&mut c).await;
        }
        transcripts.push(normalize(Value::Array(seen)));
    }
    let blockd = &transcripts[0];
    assert_eq!(
        blockd[0]["statuses"],
        json!(["created", "running", "waiting", "pending", "concluded"])
    );
    assert_eq!(
        blockd[8]["jobs"][0]["error"],
        "Cannot find device='nonode' nor node-name='nonode'"
    );
    assert_eq!(
        blockd[8]["statuses"],
        json!(["created", "running", "aborting", "concluded"])
    );
    assert!(
        blockd[18]["jobs"][0]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("Permission conflict on node 'f'")),
        "{blockd:#}"
    );
    if let Some(qsd) = transcripts.get(1) {
        assert_eq!(first_difference(blockd, qsd), None, "{blockd:#}\n{qsd:#}");
    }
}

/// x-blockdev-amend: a qcow2 node amends nothing successfully, encryption fails the job,
/// other drivers and unknown nodes are refused, all as in qsd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amend_answers_like_qsd() {
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            &p(dir.path(), "a.qcow2"),
            "1M",
        ]);
        let daemon = Daemon::start(
            which,
            dir.path(),
            &[
                s("--blockdev"),
                s("driver=qcow2,node-name=q,file.driver=file,file.filename=a.qcow2,file.node-name=qf"),
            ],
        );
        let mut client = daemon.qmp().await;
        let calls = [
            json!({"job-id": "a", "node-name": "q", "options": {"driver": "qcow2"}}),
            json!({"job-id": "b", "node-name": "qf", "options": {"driver": "qcow2"}}),
            json!({"job-id": "c", "node-name": "nope", "options": {"driver": "qcow2"}}),
            json!({"job-id": "d", "node-name": "q", "options": {"driver": "raw"}}),
            json!({"job-id": "e", "node-name": "qf", "options": {"driver": "file"}}),
            json!({"job-id": "f", "node-name": "q", "options": {"driver": "qcow2", "lazy-refcounts": true}}),
            json!({"job-id": "g", "node-name": "q", "options": {"driver": "qcow2", "encrypt": {"format": "luks", "state": "active", "new-secret": "x"}}}),
        ];
        let mut replies = Vec::new();
        for call in calls {
            replies.push(match client.execute("x-blockdev-amend", call).await {
                Ok(v) => json!({"return": v}),
                Err(e) => json!({"error": e.desc}),
            });
        }
        for id in ["a", "g"] {
            let deadline = std::time::Instant::now() + WAIT;
            loop {
                let jobs = client.execute("query-jobs", json!({})).await.unwrap();
                let job = jobs
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|j| j["id"] == id)
                    .cloned();
                if let Some(job) = job.filter(|j| j["status"] == "concluded") {
                    replies.push(job);
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{which:?}: {id} never concluded"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            client
                .execute("job-dismiss", json!({"id": id}))
                .await
                .unwrap();
        }
        daemon.quit(&mut client).await;
        all.push(replies);
    }
    assert_eq!(all[0][0], json!({"return": {}}));
    assert_eq!(all[0][8]["error"], "image is not encrypted, can't amend");
    if all.len() == 2 {
        for (i, (ours, theirs)) in all[0].iter().zip(&all[1]).enumerate() {
            assert_eq!(ours, theirs, "step {i}");
        }
    }
}

/// qcow2 images of every shape blockdev-create makes, created by both daemons: qemu-img
/// checks each clean and reads the same options back from both, the data clusters of a
/// preallocated image are allocated as qsd's are (sparse for `metadata`, on disk for
/// `falloc` and `full`), and each takes writes from qemu-io and checks clean after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_creation_matches_qsd_for_every_shape() {
    let shapes = [
        json!({ "size": 0 }),
        json!({ "size": 5 << 20, "version": "v2" }),
        json!({ "size": 5 << 20, "version": "v2", "backing-file": "base.qcow2" }),
        json!({ "size": 5 << 20, "compression-type": "zstd" }),
        json!({ "size": 5 << 20, "cluster-size": 512, "refcount-bits": 1,
                "backing-file": "base.qcow2", "backing-fmt": "qcow2" }),
        json!({ "size": 5 << 20, "cluster-size": 2 << 20, "refcount-bits": 64 }),
        json!({ "size": (5 << 20) + 512, "cluster-size": 4096, "preallocation": "metadata" }),
        json!({ "size": 3 << 20, "cluster-size": 512, "refcount-bits": 2,
                "preallocation": "metadata" }),
        json!({ "size": 5 << 20, "preallocation": "falloc", "lazy-refcounts": true }),
        json!({ "size": 5 << 20, "preallocation": "full", "refcount-bits": 32 }),
        json!({ "size": 5 << 20, "extended-l2": true }),
        json!({ "size": 5 << 20, "extended-l2": true, "cluster-size": 16384,
                "preallocation": "metadata", "backing-file": "base.qcow2",
                "backing-fmt": "qcow2" }),
        // `data-file: true` stands for a data file node made for the image.
        json!({ "size": 5 << 20, "data-file": true }),
        json!({ "size": 5 << 20, "data-file": true, "data-file-raw": true }),
        json!({ "size": 5 << 20, "data-file": true, "extended-l2": true,
                "preallocation": "falloc" }),
    ];
    let mut seen: Vec<Vec<Value>> = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
        qemu_img(&["create", "-q", "-f", "qcow2", &p("base.qcow2"), "5M"]);
        let daemon = Daemon::start(which, dir.path(), &[]);
        let mut c = daemon.qmp().await;
        for (i, shape) in shapes.iter().enumerate() {
            let name = format!("img{i}.qcow2");
            let file = json!({ "driver": "file", "filename": p(&name), "size": 0 });
            assert!(create(&mut c, "f", file).await["jobs"][0]
                .get("error")
                .is_none());
            c.execute(
                "blockdev-add",
                json!({ "driver": "file", "node-name": format!("f{i}"), "filename": p(&name) }),
            )
            .await
            .unwrap();
            let mut options = json!({ "driver": "qcow2", "file": format!("f{i}") });
            options
                .as_object_mut()
                .unwrap()
                .extend(shape.as_object().unwrap().clone());
            if shape.get("data-file").is_some() {
                let data = p(&format!("data{i}.raw"));
                let file = json!({ "driver": "file", "filename": data, "size": 0 });
                assert!(create(&mut c, "d", file).await["jobs"][0]
                    .get("error")
                    .is_none());
                c.execute(
                    "blockdev-add",
                    json!({ "driver": "file", "node-name": format!("d{i}"), "filename": data }),
                )
                .await
                .unwrap();
                options["data-file"] = json!(format!("d{i}"));
            }
            let outcome = create(&mut c, "q", options).await;
            assert!(
                outcome["jobs"][0].get("error").is_none(),
                "{which:?} {shape}: {outcome}"
            );
            c.execute("blockdev-del", json!({ "node-name": format!("f{i}") }))
                .await
                .unwrap();
            if shape.get("data-file").is_some() {
                c.execute("blockdev-del", json!({ "node-name": format!("d{i}") }))
                    .await
                    .unwrap();
            }
        }
        daemon.quit(&mut c).await;
        let mut images = Vec::new();
        for (i, shape) in shapes.iter().enumerate() {
            let path = p(&format!("img{i}.qcow2"));
            qemu_img(&["check", "-q", &path]);
            let mut info = qemu_img_json(&["info", "--output=json", &path]);
            let size = shape["size"].as_u64().unwrap();
            // Guest data goes to the data file, where there is one.
            let actual = match shape.get("data-file") {
                Some(_) => {
                    let data = p(&format!("data{i}.raw"));
                    assert_eq!(
                        std::fs::metadata(&data).unwrap().len(),
                        size,
                        "{which:?} {shape}"
                    );
                    qemu_img_json(&["info", "--output=json", "-f", "raw", &data])["actual-size"]
                        .as_u64()
                        .unwrap()
                }
                None => info["actual-size"].as_u64().unwrap(),
            };
            let as_asked = match shape["preallocation"].as_str() {
                Some("falloc" | "full") => actual >= size,
                Some(_) => actual < size,
                None => true,
            };
            assert!(as_asked, "{which:?} {shape}: {info}");
            let map = qemu_img_json(&["map", "--output=json", &path]);
            let data: u64 = map
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["data"] == true && e["depth"] == 0)
                .map(|e| e["length"].as_u64().unwrap())
                .sum();
            for key in [
                "actual-size",
                "filename",
                "dirty-flag",
                "children",
                "full-backing-filename",
            ] {
                info.as_object_mut().unwrap().remove(key);
            }
            let specific = &mut info["format-specific"]["data"];
            if let Some(name) = specific["data-file"].as_str() {
                specific["data-file"] = json!(name.trim_start_matches(&p("")));
            }
            images.push(json!({ "info": info, "data": data }));
            if size > 0 {
                let cluster = info["cluster-size"].as_u64().unwrap();
                let mut writes = vec![s("write -P 0x5a 4096 70000")];
                // Compressed writes: not with a data file.
                if shape.get("preallocation").is_none() && shape.get("data-file").is_none() {
                    // Into clusters nothing allocated yet, as compressed writes need.
                    let at = (1u64 << 20).next_multiple_of(cluster);
                    writes.push(format!("write -c -P 0x6b {at} {cluster}"));
                }
                for write in writes {
                    let out = qemu_io(&["-f", "qcow2", &path, "-c", &write]);
                    assert!(out.contains("wrote"), "{which:?} {shape} {write}: {out}");
                }
                qemu_img(&["check", "-q", &path]);
            }
        }
        seen.push(images);
    }
    if let [blockd, qsd] = &seen[..] {
        for (i, (ours, theirs)) in blockd.iter().zip(qsd).enumerate() {
            assert_eq!(ours, theirs, "{}", shapes[i]);
        }
    }
}

/// blockdev-create of a file that is open, by a node of the daemon itself or by another
/// process, is refused before the file is touched: emptying it first destroyed the image
/// (found through `blockctl create` naming an image in use).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_over_an_image_in_use_is_refused_and_leaves_it_whole() {
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let disk = p(d, "disk.qcow2");
        let other = p(d, "other.qcow2");
        for image in [&disk, &other] {
            qemu_img(&["create", "-q", "-f", "qcow2", image, "16M"]);
            qemu_io(&["-c", "write -P 7 0 1M", image]);
        }
        let daemon = Daemon::start(
            which,
            d,
            &[
                s("--blockdev"),
                format!("driver=qcow2,node-name=disk0,file.driver=file,file.filename={disk}"),
            ],
        );
        // Another process holds `other` open for writing meanwhile.
        let holder_sock = p(d, "holder.sock");
        let holder = KillOnDrop(
            std::process::Command::new("qemu-nbd")
                .args(["-f", "qcow2", "-k", &holder_sock, &other])
                .spawn()
                .unwrap_or_else(|e| panic!("qemu-nbd: {e}: {}", missing_peer("qemu-nbd"))),
        );
        // It listens once the image is open, and locked.
        let deadline = std::time::Instant::now() + WAIT;
        while !Path::new(&holder_sock).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-nbd never listened"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let mut client = daemon.qmp().await;
        for (image, what) in [(&disk, "a node of the daemon"), (&other, "another process")] {
            let outcome = create(
                &mut client,
                "c",
                json!({"driver": "file", "filename": image, "size": 0}),
            )
            .await;
            assert_eq!(
                outcome["jobs"][0]["error"], "Failed to get \"write\" lock",
                "{which:?}, {what}: {outcome}"
            );
            assert!(
                std::fs::metadata(image).unwrap().len() > 1 << 20,
                "{which:?}, {what}: emptied"
            );
        }
        daemon.quit(&mut client).await;
        drop(holder);
        qemu_img(&["check", "-q", &disk]);
        qemu_io(&["-c", "read -P 7 0 1M", &disk]);
    }
}
