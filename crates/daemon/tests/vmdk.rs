//! VMware (vmdk) images: every subformat qemu-img writes (and a stream with its GD in a
//! footer, as VMware writes them) reads through blockd over NBD as qemu-img reads it;
//! images blockdev-create makes, written through NBD (within a grain, across grains, zero
//! writes, over a backing file), pass `qemu-img check` and match what qsd made of the same
//! steps; crafted descriptors and headers get qsd's refusals, or a clear one where qsd
//! takes them.

mod common;

use common::formats::{assert_refusals_match, assert_same_images, export_to_raw, patched, Run};
use common::jobs::{create, empty_file_nodes, qemu_io};
use common::*;
use serde_json::{json, Value};
use std::path::Path;

/// A 5 MiB pattern: data, a hole, and data crossing grain boundaries.
fn source(dir: &Path) -> String {
    let path = p(dir, "src.raw");
    qemu_img(&["create", "-q", "-f", "raw", &path, "5M"]);
    qemu_io(&[
        "-f",
        "raw",
        &path,
        "-c",
        "write -P 0x11 0 300k",
        "-c",
        "write -P 0x22 2000k 200k",
        "-c",
        "write -P 0x33 4000k 1000k",
    ]);
    path
}

/// `stream` (a streamOptimized image qemu-img wrote) with its GD named only by a footer:
/// the header says "GD at end", and a footer marker, the real header and an end-of-stream
/// marker close the file.
fn with_footer(stream: &[u8]) -> Vec<u8> {
    let mut image = stream.to_vec();
    image.resize(image.len().next_multiple_of(512), 0);
    let header = stream[..512].to_vec();
    image[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
    let marker = |kind: u32, sectors: u64| {
        let mut m = vec![0u8; 512];
        m[..8].copy_from_slice(&sectors.to_le_bytes());
        m[12..16].copy_from_slice(&kind.to_le_bytes());
        m
    };
    image.extend(marker(3, 1));
    image.extend(header);
    image.extend(marker(0, 0));
    image
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subformat_reads_as_qemu_img_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| p(dir.path(), n);
    let src = source(dir.path());
    let mut images = Vec::new();
    for sub in [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "streamOptimized",
    ] {
        let name = format!("{sub}.vmdk");
        qemu_img(&[
            "convert",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            &src,
            &d(&name),
        ]);
        images.push(name);
    }
    // Zeroed grains: whole grains zeroed over data.
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "zeroed_grain=on",
        &src,
        &d("zeroed.vmdk"),
    ]);
    qemu_io(&["-f", "vmdk", &d("zeroed.vmdk"), "-c", "write -z 0 256k"]);
    qemu_io(&["-f", "raw", &src, "-c", "write -z 0 256k"]);
    images.push("zeroed.vmdk".into());
    // An overlay: its grains over the backing file's.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "zeroed.vmdk",
        "-F",
        "vmdk",
        &d("overlay.vmdk"),
    ]);
    qemu_io(&[
        "-f",
        "vmdk",
        &d("overlay.vmdk"),
        "-c",
        "write -P 0x44 70000 1000",
    ]);
    let stream = std::fs::read(d("streamOptimized.vmdk")).unwrap();
    std::fs::write(d("footer.vmdk"), with_footer(&stream)).unwrap();
    images.extend(["overlay.vmdk".into(), "footer.vmdk".into()]);

    let sock = dir.path().join("nbd.sock");
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &nbd_server_args(&sock));
    let mut client = daemon.qmp().await;
    for (i, name) in images.iter().enumerate() {
        let node = format!("n{i}");
        add_exported(&mut client, "vmdk", &node, name).await;
        let uri = format!("nbd+unix:///{node}?socket={}", sock.display());
        qemu_img(&["compare", "-U", "-f", "vmdk", "-F", "raw", &d(name), &uri]);
        // Closed, so that an overlay can open it as its backing file.
        if i + 1 < images.len() {
            close_exported(&mut client, &node).await;
        }
    }
    let nodes = client
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let footer = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == format!("n{}", images.len() - 1))
        .unwrap();
    assert_eq!(
        footer["image"]["format-specific"]["data"]["extents"][0]["compressed"],
        true
    );
    daemon.quit(&mut client).await;
}

const IMAGES: [&str; 6] = [
    "sparse.vmdk",
    "flat.vmdk",
    "split.vmdk",
    "stream.vmdk",
    "zeroed.vmdk",
    "overlay.vmdk",
];

/// Delete the export and the node `node` (add_exported made both). Hard: the client
/// that used it has exited, but the daemon may not have seen it go yet.
async fn close_exported(client: &mut qmp::Client, node: &str) {
    client
        .execute("block-export-del", json!({"id": node, "mode": "hard"}))
        .await
        .unwrap();
    client
        .wait_event("BLOCK_EXPORT_DELETED", WAIT)
        .await
        .expect("export deleted");
    client
        .execute("blockdev-del", json!({"node-name": node}))
        .await
        .unwrap();
}

/// query-named-block-nodes' vmdk nodes, less the content IDs (random in each image).
fn vmdk_nodes(nodes: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for node in nodes.as_array().unwrap() {
        if node["drv"] == "vmdk" {
            let mut image = node["image"].clone();
            if let Some(data) = image["format-specific"]["data"].as_object_mut() {
                data.remove("cid");
                data.remove("parent-cid");
            }
            out.push(json!({"node": node["node-name"], "image": image}));
        }
    }
    out
}

async fn exercise(which: Impl, dir: &Path) -> Vec<Value> {
    let sock = dir.join("nbd.sock");
    let daemon = Daemon::start(which, dir, &nbd_server_args(&sock));
    let mut client = daemon.qmp().await;
    let mut seen = Vec::new();
    let files = [
        "sparse.vmdk",
        "flat.vmdk",
        "flat-e.vmdk",
        "split.vmdk",
        "split-1.vmdk",
        "split-2.vmdk",
        "stream.vmdk",
        "zeroed.vmdk",
        "overlay.vmdk",
        "x.vmdk",
        "x1.vmdk",
    ];
    empty_file_nodes(&mut client, &files).await;
    let big = (2u64 << 30) + (1 << 20);
    for options in [
        json!({"driver": "vmdk", "file": "sparse-vmdk", "size": 5 << 20}),
        json!({"driver": "vmdk", "file": "flat-vmdk", "size": 3 << 20,
               "subformat": "monolithicFlat", "extents": ["flat-e-vmdk"],
               "adapter-type": "lsilogic", "hwversion": "6", "toolsversion": "7"}),
        json!({"driver": "vmdk", "file": "split-vmdk", "size": big,
               "subformat": "twoGbMaxExtentSparse", "extents": ["split-1-vmdk", "split-2-vmdk"]}),
        json!({"driver": "vmdk", "file": "stream-vmdk", "size": 5 << 20,
               "subformat": "streamOptimized"}),
        json!({"driver": "vmdk", "file": "zeroed-vmdk", "size": 5 << 20, "zeroed-grain": true,
               "adapter-type": "buslogic"}),
        // Refusals.
        json!({"driver": "vmdk", "file": "x-vmdk", "size": 5000}),
        json!({"driver": "vmdk", "file": "x-vmdk", "size": 1 << 20, "subformat": "monolithicFlat"}),
        json!({"driver": "vmdk", "file": "x-vmdk", "size": 1 << 20, "subformat": "monolithicFlat",
               "extents": ["x1-vmdk", "flat-e-vmdk"]}),
        json!({"driver": "vmdk", "file": "x-vmdk", "size": 1 << 20, "backing-file": "nothere.vmdk"}),
        json!({"driver": "vmdk", "file": "x-vmdk", "size": 1 << 20, "backing-file": "split-1.vmdk",
               "subformat": "bogus"}),
        json!({"driver": "vmdk", "file": "x-vmdk", "size": 1 << 20, "bogus": 1}),
    ] {
        seen.push(create(&mut client, "c", options).await);
    }
    for (i, name) in IMAGES.iter().enumerate() {
        if *name == "overlay.vmdk" {
            // After the writes to its backing file: QEMU refuses I/O to an overlay whose
            // parent's content ID changed since it was made.
            let options = json!({"driver": "vmdk", "file": "overlay-vmdk", "size": 5 << 20,
                                 "backing-file": "zeroed.vmdk"});
            seen.push(create(&mut client, "c", options).await);
        }
        let node = format!("n{i}");
        add_exported(&mut client, "vmdk", &node, name).await;
        let uri = format!("nbd+unix:///{node}?socket={}", sock.display());
        let writes: &[&str] = match *name {
            // A stream takes each grain once.
            "stream.vmdk" => &[
                "write -P 0x22 0 64k",
                "write -P 0x33 1M 128k",
                "write -z 3M 64k",
                "read -P 0x22 0 64k",
                "read -P 0x33 1M 128k",
                "read -P 0 1152k 28k",
            ],
            "zeroed.vmdk" => &[
                "write -P 0x55 0 1M",
                "write -z 64k 128k",
                "write -z 300k 10k",
                "read -P 0 64k 128k",
                "read -P 0 300k 10k",
                "read -P 0x55 310k 10k",
            ],
            _ => &[
                "write -P 0x22 1000 3000",
                "write -P 0x33 1047576 200000",
                "write -z 1300000 5000",
                "discard 0 512",
                "read -P 0x22 1000 3000",
                "read -P 0x33 1047576 200000",
                "read -P 0 1300000 5000",
            ],
        };
        let mut args = vec!["-f", "raw", &uri];
        for w in writes {
            args.extend(["-c", w]);
        }
        args.extend(["-c", "flush"]);
        qemu_io(&args);
        if *name == "overlay.vmdk" {
            // Around the writes, the backing file's data.
            qemu_io(&[
                "-f",
                "raw",
                &uri,
                "-c",
                "read -P 0x55 0 1000",
                "-c",
                "read -P 0x55 4000 60000",
            ]);
        }
        let nodes = client
            .execute("query-named-block-nodes", json!({"flat": true}))
            .await
            .unwrap();
        seen.extend(vmdk_nodes(&nodes));
        // Closed, so that the overlay can open its backing file.
        close_exported(&mut client, &node).await;
    }
    daemon.quit(&mut client).await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmdk_images_behave_as_in_qsd() {
    let mut runs = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let seen = exercise(which, dir.path()).await;
        for name in IMAGES {
            qemu_img(&["check", "-q", "-f", "vmdk", &p(dir.path(), name)]);
        }
        runs.push(Run { seen, dir });
    }
    assert_same_images("vmdk", &IMAGES, &runs);
}

/// Headers and descriptors QEMU refuses, refused the same way, and none of them a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_vmdk_images_are_refused_as_qsd_refuses_them() {
    assert_refusals_match("vmdk", &[], &["write 0 64k"], |good| {
        vec![
            ("short", good[..300].to_vec()),
            ("truncated", good[..20000].to_vec()),
            ("text", b"hello world\n".to_vec()),
            ("version", patched(good, 4, &4u32.to_le_bytes())),
            ("gtes", patched(good, 44, &1024u32.to_le_bytes())),
            ("gtes0", patched(good, 44, &0u32.to_le_bytes())),
            ("grain0", patched(good, 20, &0u64.to_le_bytes())),
            ("grainhuge", patched(good, 20, &(1u64 << 22).to_le_bytes())),
            ("overhead", patched(good, 64, &(1u64 << 30).to_le_bytes())),
            ("footer", patched(good, 56, &u64::MAX.to_le_bytes())),
            ("inside", patched(good, 12, &0u64.to_le_bytes())),
        ]
    })
    .await;
}

/// What qsd takes (or crashes on) and blockd refuses: tables past the end of the file,
/// extent lines QEMU skips (which would move the extents after them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_vmdk_images_qsd_takes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| p(dir.path(), n);
    qemu_img(&["create", "-q", "-f", "vmdk", &d("good.vmdk"), "4M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        &d("flat.vmdk"),
        "4M",
    ]);
    let good = std::fs::read(d("good.vmdk")).unwrap();
    let flat = std::fs::read_to_string(d("flat.vmdk")).unwrap();
    let line = "RW 8192 FLAT \"flat-flat.vmdk\" 0";
    assert!(flat.contains(line), "{flat}");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "gd",
            patched(&good, 56, &(1u64 << 40).to_le_bytes()),
            "The vmdk grain directory lies past the end of the file",
        ),
        (
            "rgd",
            patched(&good, 48, &(1u64 << 40).to_le_bytes()),
            "The vmdk redundant grain directory lies past the end of the file",
        ),
        (
            "capacity",
            patched(&good, 12, &(1u64 << 40).to_le_bytes()),
            "The vmdk grain directory lies past the end of the file",
        ),
        (
            "skipped",
            flat.replace(line, "RW x FLAT \"flat-flat.vmdk\" 0")
                .into_bytes(),
            "Invalid extent line: RW x FLAT",
        ),
        (
            "rdonly",
            flat.replace(line, &line.replace("RW", "RDONLY"))
                .into_bytes(),
            "blockd opens only RW extents, not RDONLY",
        ),
        (
            "rdm",
            flat.replace(line, "RW 8192 VMFSRDM \"flat-flat.vmdk\"")
                .into_bytes(),
            "Unsupported extent type 'VMFSRDM'",
        ),
        (
            "nothing",
            flat.replace(line, "").into_bytes(),
            "The vmdk descriptor names no extents",
        ),
    ];
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &[]);
    let mut client = daemon.qmp().await;
    for (name, bytes, error) in cases {
        let file = format!("{name}.vmdk");
        std::fs::write(d(&file), bytes).unwrap();
        let answer = reply(
            &mut client,
            "blockdev-add",
            json!({"driver": "vmdk", "node-name": name, "read-only": true,
                   "file": {"driver": "file", "filename": file}}),
        )
        .await;
        let desc = answer["error"]["desc"].as_str().unwrap_or_default();
        assert!(desc.starts_with(error), "{name}: {answer}");
    }
    daemon.quit(&mut client).await;
}

/// An overlay whose parent was written after the overlay was made (the parent has a new
/// CID): what needs the parent fails on both daemons, the overlay's own grains do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlays_of_changed_parents_are_refused_as_in_qsd() {
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = |n: &str| p(dir.path(), n);
        qemu_img(&["create", "-q", "-f", "vmdk", &d("base.vmdk"), "4M"]);
        for name in ["same.vmdk", "changed.vmdk"] {
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-b",
                "base.vmdk",
                "-F",
                "vmdk",
                &d(name),
            ]);
        }
        qemu_io(&["-f", "vmdk", &d("changed.vmdk"), "-c", "write -P 7 1M 4k"]);
        let sock = dir.path().join("nbd.sock");
        let daemon = Daemon::start(which, dir.path(), &nbd_server_args(&sock));
        let mut client = daemon.qmp().await;
        let mut seen = Vec::new();
        add_exported(&mut client, "vmdk", "same", "same.vmdk").await;
        let same = format!("nbd+unix:///same?socket={}", sock.display());
        qemu_io(&["-f", "raw", &same, "-c", "read -P 0 0 64k"]);
        close_exported(&mut client, "same").await;
        // The base gets a new CID from its first write.
        add_exported(&mut client, "vmdk", "base", "base.vmdk").await;
        let base = format!("nbd+unix:///base?socket={}", sock.display());
        qemu_io(&["-f", "raw", &base, "-c", "write -P 9 0 4k"]);
        close_exported(&mut client, "base").await;
        add_exported(&mut client, "vmdk", "changed", "changed.vmdk").await;
        let changed = format!("nbd+unix:///changed?socket={}", sock.display());
        for command in [
            "read 0 4k",
            "read 1M 4k",
            "write 2M 4k",
            "write 3M 64k",
            "write 1M 4k",
            "read 1M 4k",
        ] {
            let out =
                run(std::process::Command::new("qemu-io")
                    .args(["-f", "raw", &changed, "-c", command]));
            let text = String::from_utf8_lossy(&out.stdout);
            // The first line: the result, without the timing.
            seen.push(json!({command: text.lines().next().unwrap_or_default()}));
        }
        daemon.quit(&mut client).await;
        all.push(Value::Array(seen));
    }
    assert_eq!(all[0], all[1]);
    assert!(
        all[0][0].to_string().contains("Input/output error"),
        "{}",
        all[0]
    );
}

/// What a review found, each as qsd does it: a sparse extent as long as its header says
/// (not its descriptor line); a stream takes whole grains only; a write that fails
/// leaves the CID alone; a grain the tables put at the end of the file does not make
/// the next new grain land on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_cases_behave_as_in_qsd() {
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = |n: &str| p(dir.path(), n);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=twoGbMaxExtentSparse",
            &d("split.vmdk"),
            "10M",
        ]);
        let text = std::fs::read_to_string(d("split.vmdk")).unwrap();
        std::fs::write(
            d("split.vmdk"),
            text.replace("RW 20480 SPARSE", "RW 40960 SPARSE"),
        )
        .unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            &d("stream.vmdk"),
            "4M",
        ]);
        // Grain 0's table entry names the sector at the end of the file.
        qemu_img(&["create", "-q", "-f", "vmdk", &d("end.vmdk"), "4M"]);
        let image = std::fs::read(d("end.vmdk")).unwrap();
        let gd = u64::from_le_bytes(image[56..64].try_into().unwrap()) as usize * 512;
        let gt = u32::from_le_bytes(image[gd..gd + 4].try_into().unwrap()) as usize * 512;
        let eof = (image.len() / 512) as u32;
        std::fs::write(d("end.vmdk"), patched(&image, gt, &eof.to_le_bytes())).unwrap();
        let sock = dir.path().join("nbd.sock");
        let daemon = Daemon::start(which, dir.path(), &nbd_server_args(&sock));
        let mut client = daemon.qmp().await;
        let mut seen = Vec::new();
        for (node, file, commands) in [
            ("split", "split.vmdk", vec!["read 0 4k"]),
            (
                "stream",
                "stream.vmdk",
                vec!["write -P 1 0 4k", "write -P 2 64k 64k", "read -P 2 64k 64k"],
            ),
            (
                "end",
                "end.vmdk",
                vec![
                    "write -P 0xaa 0 64k",
                    "write -P 0xbb 128k 64k",
                    "read -P 0xaa 0 64k",
                    "read -P 0xbb 128k 64k",
                ],
            ),
        ] {
            add_exported(&mut client, "vmdk", node, file).await;
            let uri = format!("nbd+unix:///{node}?socket={}", sock.display());
            for command in commands {
                let out =
                    run(std::process::Command::new("qemu-io")
                        .args(["-f", "raw", &uri, "-c", command]));
                let text = String::from_utf8_lossy(&out.stdout);
                seen.push(json!({command: text.lines().next().unwrap_or_default()}));
            }
        }
        let nodes = client
            .execute("query-named-block-nodes", json!({"flat": true}))
            .await
            .unwrap();
        seen.extend(vmdk_nodes(&nodes));
        daemon.quit(&mut client).await;
        all.push(normalize(Value::Array(seen)));
    }
    let text = all[0].to_string();
    assert_eq!(
        first_difference(&all[0], &all[1]),
        None,
        "{:#}\n{:#}",
        all[0],
        all[1]
    );
    assert!(text.contains("write failed: Invalid argument"), "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
}

/// Compressed backups (`compress: true`) into a streamOptimized and a monolithicSparse
/// target: both daemons complete them, and each target reads as its source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_backups_into_vmdk_targets_complete_as_in_qsd() {
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = |n: &str| p(dir.path(), n);
        qemu_img(&["create", "-q", "-f", "qcow2", &d("src.qcow2"), "4M"]);
        qemu_io(&[
            "-f",
            "qcow2",
            &d("src.qcow2"),
            "-c",
            "write -P 0x61 0 1M",
            "-c",
            "write -P 0x62 3M 64k",
        ]);
        for (name, sub) in [
            ("stream.vmdk", "streamOptimized"),
            ("sparse.vmdk", "monolithicSparse"),
        ] {
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                &format!("subformat={sub}"),
                &d(name),
                "4M",
            ]);
        }
        let daemon = Daemon::start(which, dir.path(), &[]);
        let mut client = daemon.qmp().await;
        client
            .execute(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": "src",
                     "file": {"driver": "file", "filename": "src.qcow2"}}),
            )
            .await
            .unwrap();
        for (node, file) in [("stream", "stream.vmdk"), ("sparse", "sparse.vmdk")] {
            client
                .execute(
                    "blockdev-add",
                    json!({"driver": "vmdk", "node-name": node,
                         "file": {"driver": "file", "filename": file}}),
                )
                .await
                .unwrap();
            client
                .execute(
                    "blockdev-backup",
                    json!({"job-id": node, "device": "src", "target": node,
                         "sync": "full", "compress": true}),
                )
                .await
                .unwrap();
            let done = client
                .wait_event("BLOCK_JOB_COMPLETED", WAIT)
                .await
                .expect("completed");
            assert_eq!(done["data"].get("error"), None, "{which:?} {node}: {done}");
        }
        daemon.quit(&mut client).await;
        for file in ["stream.vmdk", "sparse.vmdk"] {
            qemu_img(&[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "vmdk",
                &d("src.qcow2"),
                &d(file),
            ]);
            qemu_img(&["check", "-q", "-f", "vmdk", &d(file)]);
        }
    }
}

/// ESX's vmfsSparse (VMDK3, `COWD`) extents, built here byte by byte (qemu-img cannot
/// make them): a 1 MiB extent of 8 KiB grains, grain 0 and grain 5 written. Opened alone
/// and through a vmfsSparse descriptor, on both daemons: the same contents, as built,
/// and the same CID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmfs_sparse_extents_read_as_in_qsd() {
    let mut image = vec![0u8; 512];
    image[..4].copy_from_slice(b"COWD");
    // version, flags, capacity (sectors), granularity, GD sector, GD entries.
    for (at, v) in [(4, 1u32), (8, 3), (12, 2048), (16, 16), (20, 2), (24, 1)] {
        image[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    // QEMU reads the extent's CID from a descriptor in the second sector.
    let mut text = b"# Disk DescriptorFile\nCID=12345678\nparentCID=ffffffff\n".to_vec();
    text.resize(512, 0);
    image.extend(text);
    let mut gd = vec![0u8; 512];
    gd[..4].copy_from_slice(&3u32.to_le_bytes());
    image.extend(gd);
    let mut gt = vec![0u8; 4096 * 4];
    gt[..4].copy_from_slice(&35u32.to_le_bytes());
    gt[20..24].copy_from_slice(&51u32.to_le_bytes());
    image.extend(gt);
    image.extend(vec![0x11u8; 8192]);
    image.extend(vec![0x22u8; 8192]);
    let mut expected = vec![0u8; 1 << 20];
    expected[..8192].fill(0x11);
    expected[5 * 8192..6 * 8192].fill(0x22);
    let descriptor = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
        createType=\"vmfsSparse\"\n\nRW 2048 VMFSSPARSE \"cowd-delta.vmdk\"\n";
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = |n: &str| p(dir.path(), n);
        std::fs::write(d("cowd-delta.vmdk"), &image).unwrap();
        std::fs::write(d("cowd.vmdk"), descriptor).unwrap();
        let sock = dir.path().join("nbd.sock");
        let daemon = Daemon::start(which, dir.path(), &nbd_server_args(&sock));
        let mut client = daemon.qmp().await;
        for (node, file) in [("alone", "cowd-delta.vmdk"), ("described", "cowd.vmdk")] {
            client
                .execute(
                    "blockdev-add",
                    json!({"driver": "vmdk", "node-name": node, "read-only": true,
                         "file": {"driver": "file", "filename": file}}),
                )
                .await
                .unwrap_or_else(|e| panic!("{which:?} {node}: {e:?}"));
            let out = d(&format!("{node}.raw"));
            export_to_raw(&mut client, &sock, node, &out).await;
            let read = std::fs::read(&out).unwrap();
            // qsd counts an extent opened through a descriptor twice (its disk is 2 MiB,
            // the second half zeroes); blockd's is as long as the extent.
            let len = if which == Impl::Blockd {
                read.len()
            } else {
                expected.len()
            };
            assert!(read[..len] == expected[..], "{which:?} {node}");
        }
        daemon.quit(&mut client).await;
    }
}
