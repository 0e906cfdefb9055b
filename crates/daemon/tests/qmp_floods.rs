//! QMP floods from one client: 100k-deep nesting, invalid UTF-8, 10k pipelined commands,
//! a 100 MB string. Each gets its error replies (or its answers) and the command after
//! it still runs; meanwhile another client is served, and the daemon's memory stays
//! small (the JSON limits: depth 1024, 64 MiB per token, as QEMU's).

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

fn client(path: &Path) -> (UnixStream, BufReader<UnixStream>) {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    (&s).write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    (s, reader)
}

#[test]
fn floods_get_their_errors_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(Impl::Blockd, dir.path(), &[]);
    let mut deep = b"{\"execute\":\"query-version\",\"arguments\":".to_vec();
    deep.extend(std::iter::repeat_n(b'[', 100_000));
    deep.extend(std::iter::repeat_n(b']', 100_000));
    deep.extend_from_slice(b"}\n");
    let mut big = b"{\"execute\":\"query-version\",\"arguments\":{\"x\":\"".to_vec();
    big.extend(std::iter::repeat_n(b'a', 100 << 20));
    big.extend_from_slice(b"\"}}\n");
    let floods: [(&str, Vec<u8>, &str); 4] = [
        ("deep", deep, "JSON nesting depth limit exceeded"),
        (
            "utf-8",
            b"{\"execute\":\"query-\xff\xfe\"}\n".to_vec(),
            "JSON parse error",
        ),
        (
            "pipelined",
            b"{\"execute\":\"query-version\"}\n".repeat(10_000),
            "\"qemu\"",
        ),
        ("big", big, "JSON token size limit exceeded"),
    ];
    for (name, flood, first) in floods {
        let (s, mut reader) = client(&daemon.qmp_path);
        // Replies are read while the flood goes out: a client that does not read them
        // is held back, as it should be.
        let drain = std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                let last = line.contains("\"id\": \"after\"");
                lines.push(std::mem::take(&mut line));
                if last {
                    break;
                }
            }
            lines
        });
        (&s).write_all(&flood).unwrap();
        (&s).write_all(b"{\"execute\":\"query-version\",\"id\":\"after\"}\n")
            .unwrap();
        let (other, mut other_reader) = client(&daemon.qmp_path);
        (&other)
            .write_all(b"{\"execute\":\"query-version\"}\n")
            .unwrap();
        let mut answer = String::new();
        other_reader.read_line(&mut answer).unwrap();
        assert!(
            answer.contains("\"return\""),
            "{name}: other client: {answer}"
        );
        let lines = drain.join().unwrap();
        assert!(lines[0].contains(first), "{name}: {}", lines[0]);
        assert!(
            lines.last().unwrap().contains("\"return\""),
            "{name}: the command after the flood: {:?}",
            lines.last()
        );
    }
    let peak = status_mib(daemon.pid(), "VmHWM");
    // The 64 MiB token limit, its buffer growing to it, and the rest of the daemon.
    assert!(peak < 200, "peak RSS {peak} MiB after the floods");
}
