//! Read-only exports and read-only nodes refuse every kind of write at every layer, as
//! qsd's do: NBD write, trim and write-zeroes sent anyway to a read-only export (raw
//! requests: client libraries refuse them before sending), exporting or resizing a
//! read-only node, and a read-only node as a job's target. The image is unchanged. The
//! one difference: NBD writes get EPERM from blockd (the NBD specification's answer) and
//! EINVAL from qsd 10.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

/// A transmission-phase connection to `export` without structured replies: the raw
/// handshake (fixed newstyle, NBD_OPT_GO), so that nothing refuses requests for the
/// server.
fn connect(sock: &Path, export: &str) -> (UnixStream, u16) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
    opt.extend_from_slice(&data);
    s.write_all(&opt).unwrap();
    let mut flags = 0;
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).unwrap();
        let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        let mut body = vec![0; len];
        s.read_exact(&mut body).unwrap();
        if kind == 3 && len >= 12 && body[..2] == [0, 0] {
            flags = u16::from_be_bytes(body[10..12].try_into().unwrap());
        }
        if kind == 1 {
            return (s, flags);
        }
        assert_eq!(kind & 0x8000_0000, 0, "NBD_OPT_GO refused");
    }
}

/// Sends one request (with `payload` for a write) and returns the reply's error code.
fn request(s: &mut UnixStream, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> u32 {
    let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&cmd.to_be_bytes());
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&offset.to_be_bytes());
    req.extend_from_slice(&len.to_be_bytes());
    req.extend_from_slice(payload);
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply[..4], 0x6744_6698u32.to_be_bytes(), "simple reply");
    u32::from_be_bytes(reply[4..8].try_into().unwrap())
}

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
            let mut codes = vec![json!({"read-only flag": flags & 2 != 0})];
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
