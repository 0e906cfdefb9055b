//! Read-only exports and read-only nodes refuse every kind of write at every layer, as
//! qsd's do: NBD write, trim and write-zeroes sent anyway to a read-only export (raw
//! requests: client libraries refuse them before sending), exporting or resizing a
//! read-only node, and a read-only node as a job's target. The image is unchanged. The
//! one difference: NBD writes get EPERM from blockd (the NBD specification's answer) and
//! EINVAL from qsd 10.

mod common;

use common::*;
use serde_json::{json, Value};

use nbd::proto::{CMD_FLUSH, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES};
use raw_nbd::{connect, request};

#[tokio::test]
async fn read_only_exports_and_nodes_refuse_writes_as_qsd_does() {
    let dir = tempfile::tempdir().unwrap();
    let pristine = p(dir.path(), "pristine.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &pristine, "4M"]);
    assert_eq!(
        qemu_io_outcome(&["-f", "qcow2", "-c", "write -P 0x33 0 1M", &pristine]),
        "ok"
    );
    let mut transcripts = Vec::new();
    for which in Impl::all() {
        let tag = format!("{which:?}").to_lowercase();
        let image = p(dir.path(), &format!("{tag}.qcow2"));
        let target = p(dir.path(), &format!("{tag}-target.qcow2"));
        std::fs::copy(&pristine, &image).unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", &target, "4M"]);
        let sock = dir.path().join(format!("{tag}.sock"));
        let mut args = vec![
            s("--blockdev"),
            format!("driver=qcow2,node-name=d,file.driver=file,file.filename={image}"),
            s("--blockdev"),
            format!(
                "driver=qcow2,node-name=ro,read-only=on,file.driver=file,file.filename={target},file.read-only=on"
            ),
        ];
        args.extend(nbd_server_args(&sock));
        args.extend([s("--export"), s("type=nbd,id=e,node-name=d")]);
        let daemon = Daemon::start(which, dir.path(), &args);
        let mut client = daemon.qmp().await;
        let mut seen: Vec<Value> = Vec::new();
        let nbd = tokio::task::spawn_blocking(move || {
            let (mut s, flags) = connect(&sock, "d");
            let mut codes =
                vec![json!({"read-only flag": flags & nbd::proto::FLAG_READ_ONLY != 0})];
            codes.push(json!(request(&mut s, CMD_WRITE, 0, 4096, &[9; 4096])));
            codes.push(json!(request(&mut s, CMD_TRIM, 0, 65536, &[])));
            codes.push(json!(request(&mut s, CMD_WRITE_ZEROES, 0, 65536, &[])));
            codes.push(json!(request(&mut s, CMD_FLUSH, 0, 0, &[])));
            codes
        })
        .await
        .unwrap();
        seen.extend(nbd);
        for (command, arguments) in [
            (
                "block-export-add",
                json!({"type": "nbd", "id": "w", "node-name": "ro", "writable": true}),
            ),
            ("block_resize", json!({"node-name": "ro", "size": 8 << 20})),
            (
                "blockdev-backup",
                json!({"job-id": "b", "device": "d", "target": "ro", "sync": "full"}),
            ),
            (
                "blockdev-mirror",
                json!({"job-id": "m", "device": "d", "target": "ro", "sync": "full"}),
            ),
        ] {
            let answer = reply(&mut client, command, arguments).await;
            assert!(
                answer.get("error").is_some(),
                "{which:?} {command}: {answer}"
            );
            seen.push(answer);
        }
        daemon.quit(&mut client).await;
        qemu_img(&["compare", &pristine, &image]);
        transcripts.push(seen);
    }
    // NBD: blockd answers EPERM, as the NBD specification says a server should for a
    // write to a read-only export; qsd 10 answers EINVAL. Everything else as qsd.
    assert_eq!(
        transcripts[0][1..5],
        [json!(1), json!(1), json!(1), json!(0)]
    );
    assert_eq!(
        transcripts[1][1..5],
        [json!(22), json!(22), json!(22), json!(0)]
    );
    let (ours, theirs) = (&transcripts[0], &transcripts[1]);
    let qmp = |t: &Vec<Value>| Value::from(t[5..].to_vec());
    assert!(
        qmp(ours) == qmp(theirs) && ours[0] == theirs[0],
        "blockd against qsd: {:?}",
        first_difference(&qmp(ours), &qmp(theirs))
    );
}
