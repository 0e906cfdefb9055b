//! LUKS volumes and secrets on both daemons: images made by qemu-img and by cryptsetup are
//! opened with a secret, written and read through NBD (partial sectors, zero writes,
//! discards), and read back by qemu-img with the same password; reports and refusals
//! match qsd's, and the secret objects' refusals too.

mod common;

use common::jobs::{create, empty_file_nodes, job_events, qemu_io};
use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

const SECRET: &str = "secret,id=s0,data=pass word";

/// An image's plaintext as qemu-img reads it with the password.
fn plaintext(image_opts: &str, out: &str) -> Vec<u8> {
    qemu_img(&[
        "convert",
        "--object",
        SECRET,
        "--image-opts",
        image_opts,
        "-O",
        "raw",
        out,
    ]);
    std::fs::read(out).unwrap()
}

fn create_luks(path: &str, extra: &str, size: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        SECRET,
        "-o",
        &format!("key-secret=s0,iter-time=10{extra}"),
        path,
        size,
    ]);
}

/// What varies between two volumes made the same way: the UUID and the measured PBKDF2
/// iteration counts.
fn strip_volume_identity(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for key in ["uuid", "iters", "master-key-iters"] {
                if map.contains_key(key) {
                    map.insert(key.into(), json!(0));
                }
            }
            map.values_mut().for_each(strip_volume_identity);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_volume_identity),
        _ => {}
    }
}

/// The nodes of driver `drv` as query-named-block-nodes reports them, less what differs
/// between two volumes made the same way and the backing image.
async fn encrypted_nodes(client: &mut qmp::Client, drv: &str) -> Vec<Value> {
    let nodes = client
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let mut seen = Vec::new();
    for node in nodes.as_array().unwrap() {
        if node["drv"] == drv {
            let mut image = node["image"].clone();
            strip_volume_identity(&mut image);
            image.as_object_mut().unwrap().remove("backing-image");
            seen.push(
                json!({"node": node["node-name"], "encrypted": node["encrypted"],
                             "image": image}),
            );
        }
    }
    seen
}

async fn exercise(which: Impl, dir: &Path) -> Vec<Value> {
    create_luks(&p(dir, "a.luks"), "", "4M");
    create_luks(
        &p(dir, "b.luks"),
        ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1",
        "4M",
    );
    std::fs::write(dir.join("plain.raw"), vec![0u8; 1 << 20]).unwrap();
    let sock = dir.join("nbd.sock");
    let mut args = nbd_server_args(&sock);
    args.extend([
        s("--object"),
        s(SECRET),
        s("--blockdev"),
        s("driver=luks,node-name=a,discard=unmap,key-secret=s0,file.driver=file,file.filename=a.luks"),
        s("--blockdev"),
        s("driver=luks,node-name=b,key-secret=s0,file.driver=file,file.filename=b.luks"),
        s("--export"),
        s("type=nbd,id=e0,node-name=a,name=a,writable=on"),
        s("--export"),
        s("type=nbd,id=e1,node-name=b,name=b,writable=on"),
    ]);
    let daemon = Daemon::start(which, dir, &args);
    let mut client = daemon.qmp().await;
    for name in ["a", "b"] {
        let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
        qemu_io(&[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x22 0 1M",
            // Partial sectors at both ends, and inside one sector.
            "-c",
            "write -P 0x33 1000 3000",
            "-c",
            "write -P 0x44 70000 10",
            "-c",
            "write -z 512k 64k",
            "-c",
            "write -z 700001 999",
            "-c",
            "discard 2M 1M",
            "-c",
            "write -P 0x55 3M 4096",
            "-c",
            "read -P 0x33 1000 3000",
            "-c",
            "read -P 0x22 4000 66000",
            "-c",
            "read -P 0x44 70000 10",
            "-c",
            "read -P 0 512k 64k",
            "-c",
            "read -P 0x55 3M 4096",
            "-c",
            "flush",
        ]);
    }
    let mut seen = encrypted_nodes(&mut client, "luks").await;
    client
        .execute(
            "object-add",
            json!({"qom-type": "secret", "id": "bad", "data": "wrong"}),
        )
        .await
        .unwrap();
    let refusals = [
        json!({"driver": "luks", "node-name": "x1",
               "file": {"driver": "file", "filename": "a.luks"}}),
        json!({"driver": "luks", "node-name": "x2", "key-secret": "none",
               "file": {"driver": "file", "filename": "a.luks"}}),
        json!({"driver": "luks", "node-name": "x3", "key-secret": "bad", "read-only": true,
               "file": {"driver": "file", "filename": "a.luks", "locking": "off"}}),
        json!({"driver": "luks", "node-name": "x4", "key-secret": "s0",
               "file": {"driver": "file", "filename": "plain.raw"}}),
    ];
    for options in refusals {
        seen.push(reply(&mut client, "blockdev-add", options).await);
    }
    daemon.quit(&mut client).await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn luks_images_behave_as_in_qsd() {
    let mut results = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let seen = exercise(which, dir.path()).await;
        let contents: Vec<Vec<u8>> = ["a", "b"]
            .iter()
            .map(|name| {
                let opts = format!(
                    "driver=luks,key-secret=s0,file.filename={}",
                    p(dir.path(), &format!("{name}.luks"))
                );
                plaintext(&opts, &p(dir.path(), &format!("{name}.out")))
            })
            .collect();
        // Discarded sectors read as noise; the rest as written.
        for data in &contents {
            assert_eq!(data.len(), 4 << 20, "{which:?}");
            assert!(data[..1000].iter().all(|&b| b == 0x22), "{which:?}");
            assert!(data[1000..4000].iter().all(|&b| b == 0x33), "{which:?}");
            assert!(data[700001..701000].iter().all(|&b| b == 0), "{which:?}");
            assert!(data[3 << 20..(3 << 20) + 4096].iter().all(|&b| b == 0x55));
        }
        let mut seen = normalize(Value::Array(seen));
        strip_volume_identity(&mut seen);
        results.push((seen, contents));
    }
    let (blockd, blockd_data) = &results[0];
    let (qsd, qsd_data) = &results[1];
    assert_eq!(first_difference(blockd, qsd), None, "{blockd:#}\n{qsd:#}");
    // Each volume has its own key, so only what was written reads the same: never-written
    // and discarded sectors decrypt to each key's own noise.
    let written = |d: &[u8]| [&d[..1 << 20], &d[3 << 20..(3 << 20) + 4096]].concat();
    for (ours, theirs) in blockd_data.iter().zip(qsd_data) {
        assert!(
            written(ours) == written(theirs),
            "contents differ from qsd's"
        );
    }
}

/// A volume cryptsetup formats: blockd writes it, qemu-img reads the same plaintext, and
/// the slot added by cryptsetup unlocks too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cryptsetup_volumes_are_read_and_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| p(dir.path(), n);
    std::fs::write(dir.path().join("c.img"), vec![0u8; 6 << 20]).unwrap();
    std::fs::write(dir.path().join("key"), b"pass word").unwrap();
    std::fs::write(dir.path().join("key2"), b"other").unwrap();
    let cryptsetup = |args: &[&str]| {
        let out = run(Command::new("cryptsetup").args(args));
        assert!(
            out.status.success(),
            "cryptsetup {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cryptsetup(&[
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks1",
        "--cipher",
        "aes-xts-plain64",
        "--key-size",
        "512",
        "--hash",
        "sha512",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        &d("key"),
        &d("c.img"),
    ]);
    cryptsetup(&[
        "luksAddKey",
        "--batch-mode",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        &d("key"),
        &d("c.img"),
        &d("key2"),
    ]);
    let sock = dir.path().join("nbd.sock");
    let mut args = nbd_server_args(&sock);
    args.extend([
        s("--object"),
        s("secret,id=s1,file=key2"),
        s("--blockdev"),
        s("driver=luks,node-name=c,key-secret=s1,file.driver=file,file.filename=c.img"),
        s("--export"),
        s("type=nbd,id=e0,node-name=c,name=c,writable=on"),
    ]);
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &args);
    let mut client = daemon.qmp().await;
    let uri = format!("nbd+unix:///c?socket={}", sock.display());
    qemu_io(&[
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0x66 4096 1M",
        "-c",
        "write -P 0x77 1536 100",
    ]);
    let served = d("served.raw");
    let out = run(Command::new("nbdcopy").args([&uri, &served]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    daemon.quit(&mut client).await;
    let theirs = plaintext(
        &format!("driver=luks,key-secret=s0,file.filename={}", d("c.img")),
        &d("c.out"),
    );
    let ours = std::fs::read(&served).unwrap();
    assert_eq!(ours.len(), theirs.len());
    assert!(
        ours == theirs,
        "blockd and qemu-img read different plaintext"
    );
    assert!(theirs[4096..4096 + (1 << 20)].iter().all(|&b| b == 0x66));
    assert!(theirs[1536..1636].iter().all(|&b| b == 0x77));
}

/// object-add of secrets: what each refusal says, on both daemons, and that a secret's
/// value shows nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_objects_match_qsd() {
    let mut results = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), b"from a file").unwrap();
        let daemon = Daemon::start(which, dir.path(), &[]);
        let mut client = daemon.qmp().await;
        let key = "0123456789abcdef0123456789abcdef";
        let zero_iv = "AAAAAAAAAAAAAAAAAAAAAA==";
        let cases = [
            json!({"qom-type": "secret", "id": "k", "data": key}),
            json!({"qom-type": "secret", "id": "s1"}),
            json!({"qom-type": "secret", "id": "s1", "data": "a", "file": "pw"}),
            json!({"qom-type": "secret", "id": "s1", "data": "@@", "format": "base64"}),
            json!({"qom-type": "secret", "id": "s1", "file": "/nonexistent"}),
            json!({"qom-type": "secret", "id": "s1", "data": "abc", "keyid": "nokey"}),
            json!({"qom-type": "secret", "id": "s1", "data": "abc", "keyid": "k"}),
            json!({"qom-type": "secret", "id": "s1", "data": "abc", "keyid": "k", "iv": "AAAA"}),
            json!({"qom-type": "secret", "id": "s1", "data": "abc", "keyid": "k", "iv": zero_iv}),
            json!({"qom-type": "secret", "id": "s1", "data": "abcdefghijklmnop", "keyid": "k",
                   "iv": zero_iv}),
            json!({"qom-type": "secret", "id": "s1", "data": "x", "format": "bogus"}),
            json!({"qom-type": "secret", "id": "1s", "data": "x"}),
            json!({"qom-type": "secret", "id": "s1", "data": "x", "bogus": 1}),
            // `letmein` encrypted with k under a zero IV.
            json!({"qom-type": "secret", "id": "enc", "data": "yaX//RwWd58JvrjMnO8YPA==",
                   "format": "base64", "keyid": "k", "iv": zero_iv}),
            json!({"qom-type": "secret", "id": "f", "file": "pw"}),
            json!({"qom-type": "secret", "id": "f", "data": "again"}),
            json!({"qom-type": "secret", "id": "b64", "data": "cGFzcyB3b3Jk", "format": "base64"}),
        ];
        let mut seen = Vec::new();
        for case in cases {
            seen.push(reply(&mut client, "object-add", case).await);
        }
        seen.push(reply(&mut client, "object-del", json!({"id": "f"})).await);
        seen.push(reply(&mut client, "object-del", json!({"id": "f"})).await);
        daemon.quit(&mut client).await;
        let stderr = std::fs::read_to_string(dir.path().join(match which {
            Impl::Blockd => "blockd.stderr",
            Impl::Qsd => "qsd.stderr",
        }))
        .unwrap_or_default();
        assert!(
            !stderr.contains("letmein") && !stderr.contains(key),
            "{stderr}"
        );
        results.push(normalize(Value::Array(seen)));
    }
    let text = results[0].to_string();
    assert!(!text.contains("from a file"), "{text}");
    assert_eq!(
        first_difference(&results[0], &results[1]),
        None,
        "{:#}\n{:#}",
        results[0],
        results[1]
    );
}

/// blockdev-create of luks volumes on both daemons: the job, the refusals, and what
/// qemu-img reads of the volumes; qemu-io writes and reads them with the password and
/// cryptsetup unlocks them. A detached header opens in qemu-img with its data file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn luks_creation_matches_qsd() {
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = |n: &str| p(dir.path(), n);
        let daemon = Daemon::start(which, dir.path(), &[s("--object"), s(SECRET)]);
        let mut client = daemon.qmp().await;
        let mut seen = Vec::new();
        empty_file_nodes(
            &mut client,
            &["a.luks", "b.luks", "hdr.img", "data.img", "x.luks"],
        )
        .await;
        let base = json!({"driver": "luks", "file": "a-luks", "key-secret": "s0",
                          "size": 4 << 20, "iter-time": 10});
        let with = |extra: Value| {
            let mut o = base.clone();
            o.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            o
        };
        let cases = [
            base.clone(),
            with(
                json!({"file": "b-luks", "cipher-alg": "twofish-128", "cipher-mode": "cbc",
                        "ivgen-alg": "essiv", "ivgen-hash-alg": "sha256", "hash-alg": "sha512",
                        "preallocation": "full"}),
            ),
            with(json!({"file": "data-img", "header": "hdr-img"})),
            with(json!({"file": "x-luks", "key-secret": "nosuch"})),
            with(json!({"file": "x-luks", "cipher-alg": "des"})),
            with(json!({"file": "x-luks", "cipher-alg": "cast5-128"})),
            with(json!({"file": "x-luks", "ivgen-alg": "essiv", "ivgen-hash-alg": "sha512"})),
            with(json!({"file": "x-luks", "bogus": 1})),
        ];
        for case in cases {
            seen.push(create(&mut client, "c", case).await);
        }
        let mut missing = base.clone();
        missing.as_object_mut().unwrap().remove("key-secret");
        missing["file"] = json!("x-luks");
        seen.push(create(&mut client, "c", missing).await);
        daemon.quit(&mut client).await;

        let opts = |name: &str| format!("driver=luks,key-secret=s0,file.filename={}", d(name));
        for name in ["a.luks", "b.luks"] {
            let mut info: Value = serde_json::from_str(&qemu_img(&[
                "info",
                "--output=json",
                "--object",
                SECRET,
                "--image-opts",
                &opts(name),
            ]))
            .unwrap();
            strip_volume_identity(&mut info);
            info["filename"] = json!(name);
            info.as_object_mut().unwrap().remove("children");
            seen.push(info);
            qemu_io(&[
                "--object",
                SECRET,
                "--image-opts",
                &opts(name),
                "-c",
                "write -P 0x42 512 70000",
                "-c",
                "read -P 0x42 512 70000",
            ]);
        }
        // b is preallocated: its whole payload is on disk.
        let b = std::fs::metadata(dir.path().join("b.luks")).unwrap();
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&b) * 512 >= 4 << 20,
            "{which:?}: b.luks is not preallocated"
        );
        std::fs::write(dir.path().join("key"), "pass word").unwrap();
        let out = run(Command::new("cryptsetup").args([
            "open",
            "--test-passphrase",
            "--key-file",
            &d("key"),
            &d("a.luks"),
        ]));
        assert!(
            out.status.success(),
            "{which:?}: cryptsetup cannot unlock: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        qemu_io(&[
            "--object",
            SECRET,
            "--image-opts",
            &format!(
                "driver=luks,key-secret=s0,header.filename={},file.filename={}",
                d("hdr.img"),
                d("data.img")
            ),
            "-c",
            "write -P 0x24 0 4096",
            "-c",
            "read -P 0x24 0 4096",
        ]);
        seen.push(json!({"data-file-size": std::fs::metadata(d("data.img")).unwrap().len()}));
        all.push(normalize(Value::Array(seen)));
    }
    assert_eq!(
        first_difference(&all[0], &all[1]),
        None,
        "{:#}\n{:#}",
        all[0],
        all[1]
    );
}

/// What one daemon did to encrypted qcow2 images: LUKS (with a plain backing file, and with
/// extended L2 entries) and legacy AES.
async fn exercise_qcow2(which: Impl, dir: &Path) -> Vec<Value> {
    let luks = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10";
    qemu_img(&["create", "-q", "-f", "qcow2", &p(dir, "base.qcow2"), "4M"]);
    qemu_io(&[
        "-f",
        "qcow2",
        &p(dir, "base.qcow2"),
        "-c",
        "write -P 0x11 0 4M",
    ]);
    for (name, opts) in [
        (
            "l.qcow2",
            format!("{luks},backing_file=base.qcow2,backing_fmt=qcow2"),
        ),
        (
            "x.qcow2",
            format!("{luks},extended_l2=on,cluster_size=128k"),
        ),
        (
            "a.qcow2",
            "encrypt.format=aes,encrypt.key-secret=s0".to_string(),
        ),
    ] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            SECRET,
            "-o",
            &opts,
            &p(dir, name),
            "4M",
        ]);
    }
    qemu_img(&["create", "-q", "-f", "qcow2", &p(dir, "plain.qcow2"), "1M"]);
    let sock = dir.join("nbd.sock");
    let mut args = nbd_server_args(&sock);
    args.extend([s("--object"), s(SECRET)]);
    for (node, file, format) in [
        ("l", "l.qcow2", "luks"),
        ("x", "x.qcow2", "luks"),
        ("a", "a.qcow2", "aes"),
    ] {
        args.extend([
            s("--blockdev"),
            format!("driver=qcow2,node-name={node},discard=unmap,encrypt.format={format},encrypt.key-secret=s0,file.driver=file,file.filename={file}"),
            s("--export"),
            format!("type=nbd,id={node},node-name={node},name={node},writable=on"),
        ]);
    }
    let daemon = Daemon::start(which, dir, &args);
    let mut client = daemon.qmp().await;
    for name in ["l", "x", "a"] {
        let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
        qemu_io(&[
            "-f",
            "raw",
            &uri,
            // Partial sectors in a new cluster (copied from the backing file around them),
            // then in the same, now allocated, cluster.
            "-c",
            "write -P 0x22 1000 3000",
            "-c",
            "write -P 0x33 70000 10",
            "-c",
            "write -P 0x44 65536 1M",
            "-c",
            "write -P 0x55 70001 7",
            "-c",
            "write -z 2M 64k",
            "-c",
            "write -z 2200000 999",
            "-c",
            "discard 3M 128k",
            "-c",
            "read -P 0x22 1000 3000",
            "-c",
            "read -P 0x55 70001 7",
            "-c",
            "flush",
        ]);
    }
    let mut seen = encrypted_nodes(&mut client, "qcow2").await;
    client
        .execute(
            "object-add",
            json!({"qom-type": "secret", "id": "bad", "data": "wrong"}),
        )
        .await
        .unwrap();
    let file = |name: &str| json!({"driver": "file", "filename": name, "locking": "off"});
    let refusals = [
        json!({"driver": "qcow2", "node-name": "r1", "read-only": true, "file": file("l.qcow2")}),
        json!({"driver": "qcow2", "node-name": "r2", "read-only": true, "file": file("l.qcow2"),
               "encrypt": {"format": "aes", "key-secret": "s0"}}),
        json!({"driver": "qcow2", "node-name": "r3", "read-only": true, "file": file("l.qcow2"),
               "encrypt": {"key-secret": "s0"}}),
        json!({"driver": "qcow2", "node-name": "r4", "read-only": true, "file": file("l.qcow2"),
               "encrypt": {"format": "luks", "key-secret": "bad"}}),
        json!({"driver": "qcow2", "node-name": "r5", "read-only": true,
               "file": file("plain.qcow2"), "encrypt": {"format": "luks", "key-secret": "s0"}}),
        json!({"driver": "qcow2", "node-name": "r6", "read-only": true, "file": file("a.qcow2"),
               "encrypt": {"format": "luks", "key-secret": "s0"}}),
    ];
    for options in refusals {
        seen.push(reply(&mut client, "blockdev-add", options).await);
    }
    let backup = json!({"job-id": "b", "device": "l", "target": "r1", "sync": "full",
                        "compress": true});
    seen.push(reply(&mut client, "blockdev-backup", backup).await);
    daemon.quit(&mut client).await;
    seen
}

/// Encrypted qcow2 images made by qemu-img, written on both daemons through NBD: qemu-img
/// checks them clean and reads the same plaintext from both, and the reports and refusals
/// are qsd's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_qcow2_behaves_as_in_qsd() {
    let mut results = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let seen = exercise_qcow2(which, dir.path()).await;
        let mut contents = Vec::new();
        for (name, format) in [("l", "luks"), ("x", "luks"), ("a", "aes")] {
            let file = p(dir.path(), &format!("{name}.qcow2"));
            qemu_img(&[
                "check",
                "-q",
                "--object",
                SECRET,
                "--image-opts",
                &format!("driver=qcow2,encrypt.format={format},encrypt.key-secret=s0,file.filename={file}"),
            ]);
            let data = plaintext(
                &format!("driver=qcow2,encrypt.key-secret=s0,file.filename={file}"),
                &p(dir.path(), &format!("{name}.out")),
            );
            assert!(
                data[1000..4000].iter().all(|&b| b == 0x22),
                "{which:?} {name}"
            );
            assert!(
                data[70001..70008].iter().all(|&b| b == 0x55),
                "{which:?} {name}"
            );
            contents.push(data);
        }
        // The backing file shows through around the first write.
        assert!(contents[0][..1000].iter().all(|&b| b == 0x11), "{which:?}");
        let mut seen = normalize(Value::Array(seen));
        strip_volume_identity(&mut seen);
        results.push((seen, contents));
    }
    let (blockd, blockd_data) = &results[0];
    let (qsd, qsd_data) = &results[1];
    assert_eq!(first_difference(blockd, qsd), None, "{blockd:#}\n{qsd:#}");
    for (i, (ours, theirs)) in blockd_data.iter().zip(qsd_data).enumerate() {
        assert!(ours == theirs, "image {i}: contents differ from qsd's");
    }
}

/// blockdev-create of encrypted qcow2 images on both daemons: LUKS in several shapes and
/// legacy AES; qemu-img checks each, reads its encryption back, and qemu-io writes and
/// reads it with the password; the refusals match qsd's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_qcow2_creation_matches_qsd() {
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let d = |n: &str| p(dir.path(), n);
        let daemon = Daemon::start(which, dir.path(), &[s("--object"), s(SECRET)]);
        let mut client = daemon.qmp().await;
        let names = ["a.qcow2", "b.qcow2", "c.qcow2", "x.qcow2", "data.raw"];
        empty_file_nodes(&mut client, &names).await;
        let luks = json!({"format": "luks", "key-secret": "s0", "iter-time": 10});
        let qcow2 = |file: &str, extra: Value| {
            let mut o = json!({"driver": "qcow2", "file": file, "size": 4 << 20});
            o.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            o
        };
        let cases = [
            qcow2("a-qcow2", json!({"encrypt": luks})),
            qcow2(
                "b-qcow2",
                json!({"encrypt": {"format": "luks", "key-secret": "s0",
                  "iter-time": 10, "cipher-alg": "aes-128", "cipher-mode": "cbc",
                  "ivgen-alg": "essiv", "hash-alg": "sha1"},
                  "extended-l2": true, "cluster-size": 32768, "preallocation": "metadata"}),
            ),
            qcow2(
                "c-qcow2",
                json!({"encrypt": {"format": "qcow", "key-secret": "s0"}}),
            ),
            qcow2("x-qcow2", json!({"encrypt": {"key-secret": "s0"}})),
            qcow2(
                "x-qcow2",
                json!({"encrypt": {"format": "luks", "iter-time": 10}}),
            ),
            qcow2(
                "x-qcow2",
                json!({"encrypt": {"format": "luks", "key-secret": "s0",
                  "bogus": 1}}),
            ),
            qcow2(
                "x-qcow2",
                json!({"encrypt": {"format": "luks", "key-secret": "nosuch"}}),
            ),
        ];
        let mut seen = Vec::new();
        for case in cases {
            seen.push(create(&mut client, "c", case).await);
        }
        daemon.quit(&mut client).await;
        for (name, format) in [("a.qcow2", "luks"), ("b.qcow2", "luks"), ("c.qcow2", "aes")] {
            let opts = format!(
                "driver=qcow2,encrypt.format={format},encrypt.key-secret=s0,file.filename={}",
                d(name)
            );
            qemu_img(&["check", "-q", "--object", SECRET, "--image-opts", &opts]);
            let mut info: Value = serde_json::from_str(&qemu_img(&[
                "info",
                "--output=json",
                "--object",
                SECRET,
                "--image-opts",
                &opts,
            ]))
            .unwrap();
            strip_volume_identity(&mut info);
            for key in ["children", "filename", "actual-size"] {
                info.as_object_mut().unwrap().remove(key);
            }
            seen.push(info);
            qemu_io(&[
                "--object",
                SECRET,
                "--image-opts",
                &opts,
                "-c",
                "write -P 0x42 512 70000",
                "-c",
                "read -P 0x42 512 70000",
            ]);
            qemu_img(&["check", "-q", "--object", SECRET, "--image-opts", &opts]);
        }
        all.push(normalize(Value::Array(seen)));
    }
    assert_eq!(
        first_difference(&all[0], &all[1]),
        None,
        "{:#}\n{:#}",
        all[0],
        all[1]
    );
}

/// Run one x-blockdev-amend to its end: the command's error, or the job's.
async fn amend(c: &mut qmp::Client, node: &str, options: Value, force: bool) -> Value {
    let mut args = json!({"job-id": "am", "node-name": node, "options": options});
    if force {
        args["force"] = json!(true);
    }
    if let Err(e) = c.execute("x-blockdev-amend", args).await {
        return json!({"refused": e.desc});
    }
    let deadline = std::time::Instant::now() + WAIT;
    let job = loop {
        let jobs = c.execute("query-jobs", json!({})).await.unwrap();
        let job = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == "am")
            .cloned();
        if let Some(job) = job.filter(|j| j["status"] == "concluded") {
            break job;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "amend never concluded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    c.execute("job-dismiss", json!({"id": "am"})).await.unwrap();
    json!({"error": job.get("error")})
}

/// The daemon for the amend test: a luks node `v`, a LUKS qcow2 node `q` and a plain
/// qcow2 node `p`, with secrets s0 (their password), s1 and s2.
async fn amend_daemon(which: Impl, dir: &Path) -> (Daemon, qmp::Client) {
    let d = |n: &str| p(dir, n);
    create_luks(&d("v.luks"), "", "1M");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        &d("q.qcow2"),
        "1M",
    ]);
    qemu_img(&["create", "-q", "-f", "qcow2", &d("p.qcow2"), "1M"]);
    let args = [
        s("--object"), s(SECRET),
        s("--object"), s("secret,id=s1,data=second"),
        s("--object"), s("secret,id=s2,data=nope"),
        s("--blockdev"),
        s("driver=luks,node-name=v,key-secret=s0,file.driver=file,file.filename=v.luks"),
        s("--blockdev"),
        s("driver=qcow2,node-name=q,encrypt.format=luks,encrypt.key-secret=s0,file.driver=file,file.filename=q.qcow2"),
        s("--blockdev"),
        s("driver=qcow2,node-name=p,file.driver=file,file.filename=p.qcow2"),
    ];
    let daemon = Daemon::start(which, dir, &args);
    let client = daemon.qmp().await;
    (daemon, client)
}

fn luks_amend(extra: Value) -> Value {
    let mut o = json!({"driver": "luks"});
    o.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    o
}

/// x-blockdev-amend's refusals of key slot changes, on a luks node and on a LUKS qcow2
/// node: every rule reads as qsd's. (Amends that read key material, and changes that go
/// through, are judged below against qemu-img's texts, qemu-img and cryptsetup: qsd 10.0
/// aborts on them, an assertion in its graph lock.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_slot_refusals_match_qsd() {
    let mut all = Vec::new();
    for which in Impl::all() {
        let dir = tempfile::tempdir().unwrap();
        let (daemon, mut client) = amend_daemon(which, dir.path()).await;
        let steps = [
            ("v", luks_amend(json!({"state": "active"}))),
            (
                "v",
                luks_amend(json!({"state": "active", "new-secret": "s1", "old-secret": "s0"})),
            ),
            (
                "v",
                luks_amend(json!({"state": "active", "new-secret": "s1", "keyslot": 0})),
            ),
            (
                "v",
                luks_amend(json!({"state": "active", "new-secret": "s1", "keyslot": 9})),
            ),
            (
                "v",
                luks_amend(json!({"state": "inactive", "new-secret": "s1"})),
            ),
            (
                "v",
                luks_amend(json!({"state": "inactive", "iter-time": 10})),
            ),
            ("v", luks_amend(json!({"state": "inactive"}))),
            ("v", luks_amend(json!({"state": "inactive", "keyslot": 5}))),
            ("v", luks_amend(json!({"state": "inactive", "keyslot": 0}))),
            ("v", luks_amend(json!({"bogus": 1, "state": "active"}))),
            ("v", json!({"driver": "qcow2"})),
            (
                "q",
                json!({"driver": "qcow2", "encrypt": {"format": "luks", "state": "active"}}),
            ),
            (
                "q",
                json!({"driver": "qcow2", "encrypt": {"format": "luks", "state": "inactive",
                         "keyslot": 0}}),
            ),
            (
                "q",
                json!({"driver": "qcow2", "encrypt": {"state": "inactive"}}),
            ),
            (
                "p",
                json!({"driver": "qcow2", "encrypt": {"format": "luks", "state": "active",
                         "new-secret": "s1"}}),
            ),
        ];
        let mut seen = Vec::new();
        for (node, options) in steps {
            seen.push(amend(&mut client, node, options, false).await);
        }
        daemon.quit(&mut client).await;
        all.push(normalize(Value::Array(seen)));
    }
    assert_eq!(
        first_difference(&all[0], &all[1]),
        None,
        "{:#}\n{:#}",
        all[0],
        all[1]
    );
}

/// Key slots blockd adds and erases: the refusals that read key material say what
/// `qemu-img amend` says, qemu-img reads the slots as asked, the added ones unlock in
/// qemu-io and cryptsetup, and the erased ones no longer unlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_slots_blockd_amends_unlock_in_qemu_and_cryptsetup() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| p(dir.path(), n);
    let (daemon, mut client) = amend_daemon(Impl::Blockd, dir.path()).await;
    let refusals = [
        (json!({"state": "inactive", "old-secret": "s2"}),
         "No keyslots match given (old) password for erase operation"),
        (json!({"state": "inactive", "keyslot": 0, "old-secret": "s1"}),
         "Given keyslot 0 doesn't contain the given old password for erase operation"),
        (json!({"state": "inactive", "old-secret": "s0"}),
         "All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation"),
        (json!({"state": "active", "new-secret": "s1", "secret": "s2"}),
         "Invalid password, cannot unlock any keyslot"),
    ];
    for (options, text) in refusals {
        let result = amend(&mut client, "v", luks_amend(options), false).await;
        assert_eq!(result, json!({"error": text}));
    }
    let ok = json!({"error": null});
    let changes = [
        (
            "v",
            luks_amend(json!({"state": "active", "new-secret": "s1", "iter-time": 10})),
            false,
        ),
        (
            "v",
            luks_amend(json!({"state": "inactive", "old-secret": "s1"})),
            false,
        ),
        (
            "v",
            luks_amend(json!({"state": "active", "new-secret": "s1", "keyslot": 6,
                                "iter-time": 10})),
            false,
        ),
        (
            "v",
            luks_amend(json!({"state": "active", "new-secret": "s2", "keyslot": 6,
                                "iter-time": 10})),
            true,
        ),
        (
            "v",
            luks_amend(
                json!({"state": "active", "new-secret": "s1", "secret": "s2",
                                "iter-time": 10}),
            ),
            false,
        ),
        (
            "q",
            json!({"driver": "qcow2", "encrypt": {"format": "luks", "state": "active",
                     "new-secret": "s1", "iter-time": 10}}),
            false,
        ),
        (
            "q",
            json!({"driver": "qcow2", "encrypt": {"format": "luks", "state": "inactive",
                     "old-secret": "s0"}}),
            true,
        ),
    ];
    for (node, options, force) in changes {
        assert_eq!(
            amend(&mut client, node, options.clone(), force).await,
            ok,
            "{options}"
        );
    }
    daemon.quit(&mut client).await;
    let active = |opts: &str, member: &[&str]| -> Vec<bool> {
        let info: Value = serde_json::from_str(&qemu_img(&[
            "info",
            "--output=json",
            "--object",
            SECRET,
            "--object",
            "secret,id=s1,data=second",
            "--image-opts",
            opts,
        ]))
        .unwrap();
        let mut slots = &info["format-specific"]["data"];
        for m in member {
            slots = &slots[*m];
        }
        slots
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["active"].as_bool().unwrap())
            .collect()
    };
    let v = format!("driver=luks,key-secret=s0,file.filename={}", d("v.luks"));
    let q = format!(
        "driver=qcow2,encrypt.key-secret=s1,file.filename={}",
        d("q.qcow2")
    );
    let t = true;
    let f = false;
    // v: slot 0 (s0), slot 6 (s1, then overwritten with s2 by force), slot 1 (s1, added
    // with the volume key s2's slot gives).
    assert_eq!(active(&v, &["slots"]), [t, t, f, f, f, f, t, f]);
    assert_eq!(active(&q, &["encrypt", "slots"]), [f, t, f, f, f, f, f, f]);
    let opens = |key: &str, slot: &str| {
        std::fs::write(dir.path().join("key"), key).unwrap();
        run(Command::new("cryptsetup").args([
            "open",
            "--test-passphrase",
            "--key-slot",
            slot,
            "--key-file",
            &d("key"),
            &d("v.luks"),
        ]))
        .status
        .success()
    };
    assert!(opens("pass word", "0"));
    assert!(opens("second", "1"));
    assert!(opens("nope", "6"));
    assert!(!opens("second", "6"));
    qemu_io(&[
        "--object",
        "secret,id=s1,data=second",
        "--image-opts",
        &q,
        "-c",
        "read 0 4096",
    ]);
    let out = run(Command::new("qemu-io").args([
        "--object",
        SECRET,
        "--image-opts",
        &format!(
            "driver=qcow2,encrypt.key-secret=s0,file.filename={}",
            d("q.qcow2")
        ),
        "-c",
        "read 0 4096",
    ]));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Invalid password"), "{text}");
}

/// A backup and a mirror from an encrypted qcow2 image to encrypted targets (each with its
/// own password, one a luks volume) while the source is exported: qemu-img checks the
/// targets and compares each with the source through their passwords.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_mirror_between_encrypted_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| p(dir.path(), n);
    let second = "secret,id=s1,data=second";
    let luks = |secret: &str| {
        format!("encrypt.format=luks,encrypt.key-secret={secret},encrypt.iter-time=10")
    };
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        &luks("s0"),
        &d("src.qcow2"),
        "8M",
    ]);
    qemu_io(&[
        "--object",
        SECRET,
        "--image-opts",
        &format!(
            "driver=qcow2,encrypt.key-secret=s0,file.filename={}",
            d("src.qcow2")
        ),
        "-c",
        "write -P 0x61 0 3M",
        "-c",
        "write -P 0x62 5M 1000",
        "-c",
        "write -z 6M 1M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        second,
        "-o",
        &luks("s1"),
        &d("backup.qcow2"),
        "8M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        second,
        "-o",
        "key-secret=s1,iter-time=10",
        &d("mirror.luks"),
        "8M",
    ]);
    let args = [
        s("--object"), s(SECRET), s("--object"), s(second),
        s("--blockdev"),
        s("driver=qcow2,node-name=src,encrypt.format=luks,encrypt.key-secret=s0,file.driver=file,file.filename=src.qcow2"),
        s("--blockdev"),
        s("driver=qcow2,node-name=bk,encrypt.format=luks,encrypt.key-secret=s1,file.driver=file,file.filename=backup.qcow2"),
        s("--blockdev"),
        s("driver=luks,node-name=mr,key-secret=s1,file.driver=file,file.filename=mirror.luks"),
    ];
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &args);
    let mut client = daemon.qmp().await;
    client
        .execute(
            "blockdev-backup",
            json!({"job-id": "b", "device": "src", "target": "bk", "sync": "full"}),
        )
        .await
        .unwrap();
    let events = job_events(&mut client, "b", "null").await;
    assert!(events.contains(&s("BLOCK_JOB_COMPLETED")), "{events:?}");
    client
        .execute(
            "blockdev-mirror",
            json!({"job-id": "m", "device": "src", "target": "mr", "sync": "full"}),
        )
        .await
        .unwrap();
    job_events(&mut client, "m", "BLOCK_JOB_READY").await;
    client
        .execute("job-complete", json!({"id": "m"}))
        .await
        .unwrap();
    let events = job_events(&mut client, "m", "null").await;
    assert!(events.contains(&s("BLOCK_JOB_COMPLETED")), "{events:?}");
    daemon.quit(&mut client).await;
    let src = format!(
        "driver=qcow2,encrypt.key-secret=s0,file.filename={}",
        d("src.qcow2")
    );
    let backup = format!(
        "driver=qcow2,encrypt.key-secret=s1,file.filename={}",
        d("backup.qcow2")
    );
    let mirror = format!(
        "driver=luks,key-secret=s1,file.filename={}",
        d("mirror.luks")
    );
    qemu_img(&["check", "-q", "--object", second, "--image-opts", &backup]);
    for target in [&backup, &mirror] {
        qemu_img(&[
            "compare",
            "--object",
            SECRET,
            "--object",
            second,
            "--image-opts",
            &src,
            target,
        ]);
    }
}

/// A volume whose header blockd wrote to a node of its own opens with `header`, reads what
/// was written through it, and a truncated or foreign header gets a clear refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_and_damaged_headers() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| p(dir.path(), n);
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &[s("--object"), s(SECRET)]);
    let mut client = daemon.qmp().await;
    empty_file_nodes(&mut client, &["hdr.img", "data.img"]).await;
    let created = create(
        &mut client,
        "c",
        json!({"driver": "luks", "file": "data-img", "header": "hdr-img", "key-secret": "s0",
               "size": 1 << 20, "iter-time": 10}),
    )
    .await;
    assert_eq!(created["jobs"][0]["error"], Value::Null, "{created}");
    daemon.quit(&mut client).await;
    // The data file holds only the payload.
    assert_eq!(std::fs::metadata(d("data.img")).unwrap().len(), 1 << 20);
    qemu_io(&[
        "--object",
        SECRET,
        "--image-opts",
        &format!(
            "driver=luks,key-secret=s0,header.filename={},file.filename={}",
            d("hdr.img"),
            d("data.img")
        ),
        "-c",
        "write -P 0x37 4096 8192",
    ]);
    create_luks(&d("whole.luks"), "", "1M");
    let whole = std::fs::read(d("whole.luks")).unwrap();
    std::fs::write(d("short.luks"), &whole[..1000]).unwrap();
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &[s("--object"), s(SECRET)]);
    let mut client = daemon.qmp().await;
    client
        .execute(
            "blockdev-add",
            json!({"driver": "luks", "node-name": "v", "key-secret": "s0",
                   "header": {"driver": "file", "filename": "hdr.img"},
                   "file": {"driver": "file", "filename": "data.img"}}),
        )
        .await
        .unwrap();
    let nodes = client
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let v = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "v")
        .unwrap();
    assert_eq!(v["image"]["virtual-size"], json!(1 << 20));
    assert_eq!(
        v["image"]["format-specific"]["data"]["detached-header"],
        json!(true)
    );
    assert_eq!(
        v["image"]["format-specific"]["data"]["payload-offset"],
        json!(0)
    );
    for (file, text) in [
        (
            "short.luks",
            "LUKS key material lies outside the header's area",
        ),
        ("data.img", "Volume is not in LUKS format"),
    ] {
        let err = client
            .execute(
                "blockdev-add",
                json!({"driver": "luks", "node-name": "x", "key-secret": "s0",
                       "file": {"driver": "file", "filename": file}}),
            )
            .await
            .unwrap_err();
        assert!(err.desc.contains(text), "{file}: {}", err.desc);
    }
    client
        .execute(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": d("nbd.sock")}}}),
        )
        .await
        .unwrap();
    client
        .execute(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "v", "name": "v"}),
        )
        .await
        .unwrap();
    let uri = format!("nbd+unix:///v?socket={}", d("nbd.sock"));
    qemu_io(&["-f", "raw", "-r", &uri, "-c", "read -P 0x37 4096 8192"]);
    daemon.quit(&mut client).await;
}

/// A qcow2 image whose crypto header extension is too long, or too short for the key
/// material its LUKS header places, is refused before anything is read or written there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_crypto_header_extensions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| p(dir.path(), n);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        &d("q.qcow2"),
        "1M",
    ]);
    let good = std::fs::read(d("q.qcow2")).unwrap();
    // qemu-img puts the crypto header extension first: type at 0x70, length at 0x80.
    assert_eq!(&good[0x70..0x74], &0x0537_be77u32.to_be_bytes());
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &[s("--object"), s(SECRET)]);
    let mut client = daemon.qmp().await;
    for (i, (length, text)) in [
        (4096u64, "LUKS key material lies outside the header's area"),
        (100, "crypto header extension is too short"),
        (
            1 << 40,
            "crypto header extension length 1099511627776 is too large",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let mut image = good.clone();
        image[0x80..0x88].copy_from_slice(&length.to_be_bytes());
        let name = format!("c{i}.qcow2");
        std::fs::write(dir.path().join(&name), &image).unwrap();
        let err = client
            .execute(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": format!("c{i}"),
                       "encrypt": {"format": "luks", "key-secret": "s0"},
                       "file": {"driver": "file", "filename": name}}),
            )
            .await
            .unwrap_err();
        assert!(err.desc.contains(text), "{length}: {}", err.desc);
        assert!(
            std::fs::read(dir.path().join(&name)).unwrap() == image,
            "{name} changed"
        );
    }
    daemon.quit(&mut client).await;
}
