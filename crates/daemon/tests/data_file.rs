//! qcow2 images whose data lives in an external data file (`data-file`, `data-file-raw`),
//! on both daemons: the same writes, zero writes, discards and a resize through NBD leave
//! the same images, qemu-img checks them clean, a raw data file stays a raw image of the
//! disk, and the refusals read the same.

mod common;

use common::jobs::qemu_io;
use common::*;
use serde_json::{json, Value};
use std::path::Path;

/// What one daemon did to `img.qcow2` (data in `data.raw`) and `raw.qcow2` (data in
/// `raw.raw`, kept raw): its answers, and the node reports.
async fn exercise(which: Impl, dir: &Path) -> Vec<Value> {
    let data = format!("data_file={}", p(dir, "data.raw"));
    let raw = format!("data_file={},data_file_raw=on", p(dir, "raw.raw"));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &data,
        &p(dir, "img.qcow2"),
        "4M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &raw,
        &p(dir, "raw.qcow2"),
        "4M",
    ]);
    qemu_img(&["create", "-q", "-f", "qcow2", &p(dir, "plain.qcow2"), "4M"]);
    qemu_io(&[
        "-f",
        "qcow2",
        &p(dir, "img.qcow2"),
        "-c",
        "write -P 0x11 0 1M",
    ]);
    let sock = dir.join("nbd.sock");
    let mut args = nbd_server_args(&sock);
    args.extend([
        // The data file by the name in the header, and given as an option.
        s("--blockdev"),
        s("driver=qcow2,node-name=img,discard=unmap,file.driver=file,file.filename=img.qcow2"),
        s("--blockdev"),
        s("driver=file,node-name=rawdata,filename=raw.raw"),
        s("--blockdev"),
        s("driver=qcow2,node-name=raw,discard=unmap,file.driver=file,file.filename=raw.qcow2,data-file=rawdata"),
        s("--export"),
        s("type=nbd,id=e0,node-name=img,name=img,writable=on"),
        s("--export"),
        s("type=nbd,id=e1,node-name=raw,name=raw,writable=on"),
    ]);
    let daemon = Daemon::start(which, dir, &args);
    let mut client = daemon.qmp().await;
    for name in ["img", "raw"] {
        let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
        qemu_io(&[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x22 512k 1M",
            "-c",
            "write -P 0x33 3M 100k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "discard 2M 1M",
            "-c",
            "write -z -u 0 64k",
            "-c",
            "flush",
        ]);
    }
    // An export does not share resizing: the nodes grow once the exports are gone.
    for (export, name) in [("e0", "img"), ("e1", "raw")] {
        delete_export_when_unused(&mut client, export).await;
        client
            .execute("block_resize", json!({"node-name": name, "size": 6 << 20}))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let nodes = client
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let dir_prefix = format!("{}/", dir.display());
    for node in nodes.as_array().unwrap() {
        if node["drv"] == "qcow2" {
            let mut specific = node["image"]["format-specific"].clone();
            let name = &mut specific["data"]["data-file"];
            *name = json!(name.as_str().unwrap().trim_start_matches(&dir_prefix));
            seen.push(json!({"node": node["node-name"], "specific": specific}));
        }
    }

    let refusals = [
        json!({"driver": "qcow2", "node-name": "x1",
               "file": {"driver": "file", "filename": "plain.qcow2"},
               "data-file": {"driver": "file", "filename": "data.raw"}}),
        json!({"driver": "qcow2", "node-name": "x2",
               "file": {"driver": "file", "filename": "img.qcow2"},
               "data-file": "nonode"}),
    ];
    for options in refusals {
        seen.push(reply(&mut client, "blockdev-add", options).await);
    }
    seen.push(
        reply(
            &mut client,
            "blockdev-snapshot-internal-sync",
            json!({"device": "img", "name": "s"}),
        )
        .await,
    );
    daemon.quit(&mut client).await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_file_images_behave_as_in_qsd() {
    let mut results = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let seen = exercise(which, dir.path()).await;
        let d = |name: &str| p(dir.path(), name);
        for image in ["img.qcow2", "raw.qcow2"] {
            qemu_img(&["check", "-q", &d(image)]);
        }
        // The raw data file is the disk, byte for byte.
        qemu_img(&[
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            "qcow2",
            &d("raw.raw"),
            &d("raw.qcow2"),
        ]);
        let contents: Vec<Vec<u8>> = ["img.qcow2", "raw.qcow2"]
            .iter()
            .map(|image| {
                let out = d(&format!("{image}.out"));
                qemu_img(&["convert", "-O", "raw", &d(image), &out]);
                std::fs::read(out).unwrap()
            })
            .collect();
        assert_eq!(contents[0].len(), 6 << 20, "{which:?}: resized");
        assert!(
            contents[0][..512 << 10]
                .iter()
                .all(|&b| b == 0x11 || b == 0),
            "{which:?}: first 512 KiB"
        );
        // Only the first image held data before: past it, the same writes.
        assert!(
            contents[0][512 << 10..] == contents[1][512 << 10..],
            "{which:?}: the two images differ"
        );
        results.push((normalize(Value::Array(seen)), contents));
    }
    let (blockd, blockd_data) = &results[0];
    assert!(
        blockd
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == "img")
            .map(|n| &n["specific"]["data"]["data-file"])
            .unwrap()
            .as_str()
            .is_some_and(|f| f == "data.raw"),
        "{blockd:#}"
    );
    assert!(
        blockd[2]["error"]["desc"]
            .as_str()
            .is_some_and(|e| e.contains("can only be set")),
        "{blockd:#}"
    );
    if let Some((qsd, qsd_data)) = results.get(1) {
        assert_eq!(first_difference(blockd, qsd), None, "{blockd:#}\n{qsd:#}");
        assert!(blockd_data == qsd_data, "contents differ from qsd's");
    }
}

/// The refusals that come from the header alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_file_header_refusals_match_qsd() {
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = |name: &str| p(dir.path(), name);
        // The bit without a name, and the raw bit without the data file bit.
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", d("data.raw")),
            &d("noname.qcow2"),
            "1M",
        ]);
        let mut bytes = std::fs::read(d("noname.qcow2")).unwrap();
        let at = bytes.windows(4).position(|w| w == b"DATA").unwrap();
        bytes[at..at + 4].copy_from_slice(b"\xde\xad\xbe\xef");
        std::fs::write(d("noname.qcow2"), &bytes).unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", &d("rawbit.qcow2"), "1M"]);
        let mut bytes = std::fs::read(d("rawbit.qcow2")).unwrap();
        bytes[95] |= 2;
        std::fs::write(d("rawbit.qcow2"), &bytes).unwrap();
        let daemon = Daemon::start(which, dir.path(), &[]);
        let mut client = daemon.qmp().await;
        for image in ["noname.qcow2", "rawbit.qcow2"] {
            all.push(
                reply(
                    &mut client,
                    "blockdev-add",
                    json!({"driver": "qcow2", "node-name": "n",
                           "file": {"driver": "file", "filename": image}}),
                )
                .await,
            );
        }
        daemon.quit(&mut client).await;
    }
    assert_eq!(
        all[0]["error"]["desc"],
        "'data-file' is required for this image"
    );
    assert_eq!(
        all[1]["error"]["desc"],
        "data-file-raw requires a data file"
    );
    if all.len() == 4 {
        assert_eq!(all[..2], all[2..]);
    }
}
