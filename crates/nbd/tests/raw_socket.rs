//! Misbehaving clients speaking raw bytes: each case checks the server's answer and then
//! that a normal client still succeeds.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nbd::proto::*;
use nbd::{Client, ClientOptions, ConnectAddr, ExportOptions};

const MIB: u64 = 1024 * 1024;

struct Raw {
    s: UnixStream,
}

impl Raw {
    fn connect(fx: &Fixture) -> Raw {
        let mut s = UnixStream::connect(&fx.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(be_u64(&g[0..8]), NBD_MAGIC);
        assert_eq!(be_u64(&g[8..16]), IHAVEOPT);
        assert_eq!(be_u16(&g[16..18]), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        Raw { s }
    }

    fn hello(fx: &Fixture) -> Raw {
        let mut r = Raw::connect(fx);
        r.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        r
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be_u64(&h[0..8]), OPTION_REPLY_MAGIC);
        let mut d = vec![0u8; be_u32(&h[16..20]) as usize];
        self.s.read_exact(&mut d).unwrap();
        (be_u32(&h[8..12]), be_u32(&h[12..16]), d)
    }

    /// Structured replies plus `NBD_OPT_GO`; returns the export size.
    fn go(&mut self, name: &str) -> u64 {
        self.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(self.reply().1, REP_ACK);
        let mut d = Vec::new();
        encode_info_request(&mut d, name, &[]);
        self.option(OPT_GO, &d);
        let mut size = 0;
        loop {
            let (_, kind, data) = self.reply();
            match kind {
                REP_INFO if be_u16(&data) == INFO_EXPORT => size = be_u64(&data[2..10]),
                REP_INFO => {}
                REP_ACK => return size,
                k => panic!("unexpected GO reply {k:#x}"),
            }
        }
    }

    fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let mut b = Vec::new();
        Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        }
        .encode(&mut b);
        self.send(&b);
    }

    /// Reads one structured chunk: (flags, type, cookie, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be_u32(&h[0..4]), STRUCTURED_REPLY_MAGIC);
        let mut p = vec![0u8; be_u32(&h[16..20]) as usize];
        self.s.read_exact(&mut p).unwrap();
        (be_u16(&h[4..6]), be_u16(&h[6..8]), be_u64(&h[8..16]), p)
    }

    /// Expects an error chunk for `cookie` and returns its errno.
    fn error(&mut self, cookie: u64) -> u32 {
        let (flags, kind, c, p) = self.chunk();
        assert_eq!(c, cookie);
        assert_eq!(kind, REPLY_TYPE_ERROR);
        assert_ne!(flags & REPLY_FLAG_DONE, 0);
        be_u32(&p[0..4])
    }

    /// True once the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1024];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

fn setup() -> (Fixture, Arc<MemBackend>) {
    let fx = Fixture::new(0);
    let b = Arc::new(MemBackend::new(MIB));
    fx.export("disk", b.clone());
    (fx, b)
}

/// A well-behaved client still gets served: write then read back.
fn normal_client_works(fx: &Fixture) {
    let addr = ConnectAddr::Unix(fx.socket.clone());
    local(async {
        let c = Client::connect(&addr, "disk", &ClientOptions::default())
            .await
            .unwrap();
        c.write(8192, &[0x42; 4096], false).await.unwrap();
        let mut buf = vec![0u8; 4096];
        c.read(8192, &mut buf).await.unwrap();
        assert!(buf.iter().all(|&b| b == 0x42));
        c.disconnect().await.unwrap();
    });
}

#[test]
fn malformed_handshakes_are_disconnected() {
    let (fx, _) = setup();
    let mut r = Raw::connect(&fx);
    r.send(&0x8000_0001u32.to_be_bytes());
    assert!(r.closed(), "unknown client flag accepted");

    let mut r = Raw::connect(&fx);
    r.send(&0u32.to_be_bytes());
    assert!(r.closed(), "non-fixed newstyle client accepted");

    let mut r = Raw::hello(&fx);
    r.send(b"NOTMAGIC\0\0\0\x07\0\0\0\0");
    assert!(r.closed(), "bad option magic accepted");

    let mut r = Raw::hello(&fx);
    r.option(OPT_EXPORT_NAME, b"missing");
    assert!(r.closed(), "unknown NBD_OPT_EXPORT_NAME accepted");

    normal_client_works(&fx);
}

#[test]
fn unknown_and_refused_options_get_error_replies() {
    let (fx, _) = setup();
    let mut r = Raw::hello(&fx);
    r.option(99, b"whatever");
    assert_eq!(
        r.reply(),
        (99, REP_ERR_UNSUP, b"option not supported".to_vec())
    );
    r.option(OPT_STARTTLS, &[]);
    assert_eq!(r.reply().1, REP_ERR_POLICY);
    r.option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(r.reply().1, REP_ERR_UNSUP);
    // Meta contexts before structured replies are invalid.
    let mut d = Vec::new();
    encode_meta_context_request(&mut d, "disk", &["base:allocation"]);
    r.option(OPT_SET_META_CONTEXT, &d);
    assert_eq!(r.reply().1, REP_ERR_INVALID);
    // An oversized option is drained and refused without losing sync.
    r.option(OPT_LIST, &vec![0u8; 100_000]);
    assert_eq!(r.reply().1, REP_ERR_TOO_BIG);
    r.option(OPT_LIST, &[1]);
    assert_eq!(r.reply().1, REP_ERR_INVALID);
    let mut d = Vec::new();
    encode_info_request(&mut d, "nope", &[]);
    r.option(OPT_INFO, &d);
    let (_, kind, msg) = r.reply();
    assert_eq!(kind, REP_ERR_UNKNOWN);
    assert_eq!(msg, b"export 'nope' not present");
    r.option(OPT_GO, &[0, 0, 0, 9]);
    assert_eq!(r.reply().1, REP_ERR_INVALID);
    // The session is still usable.
    assert_eq!(r.go("disk"), MIB);
    r.request(CMD_DISC, 0, 1, 0, 0);
    assert!(r.closed());

    let mut r = Raw::hello(&fx);
    r.option(OPT_ABORT, &[]);
    assert_eq!(r.reply().1, REP_ACK);
    assert!(r.closed());
    normal_client_works(&fx);
}

#[test]
fn invalid_requests_get_errors_and_the_connection_survives() {
    let (fx, backend) = setup();
    let mut r = Raw::hello(&fx);
    r.go("disk");
    r.request(CMD_READ, 0, 1, MIB - 512, 1024);
    assert_eq!(r.error(1), EINVAL);
    r.request(CMD_WRITE, 0, 2, MIB, 512);
    r.send(&[0xee; 512]);
    assert_eq!(r.error(2), EINVAL);
    r.request(CMD_READ, 0, 3, 0, MAX_PAYLOAD + 1);
    assert_eq!(r.error(3), EINVAL);
    r.request(99, 0, 4, 0, 0);
    assert_eq!(r.error(4), EINVAL);
    r.request(CMD_TRIM, CMD_FLAG_DF, 5, 0, 512);
    assert_eq!(r.error(5), EINVAL);
    // No context was selected, so block status is invalid.
    r.request(CMD_BLOCK_STATUS, 0, 6, 0, 512);
    assert_eq!(r.error(6), EINVAL);
    r.request(CMD_READ, 0, 7, 0, 0);
    let (flags, kind, cookie, _) = r.chunk();
    assert_eq!((flags, kind, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 7));
    // A good request on the same connection.
    r.request(CMD_WRITE, 0, 8, 0, 4);
    r.send(b"abcd");
    let mut simple = [0u8; 16];
    r.s.read_exact(&mut simple).unwrap();
    assert_eq!(be_u32(&simple[0..4]), SIMPLE_REPLY_MAGIC);
    assert_eq!(be_u32(&simple[4..8]), 0);
    assert_eq!(be_u64(&simple[8..16]), 8);
    assert_eq!(&backend.contents()[..4], b"abcd");
    assert!(backend.contents()[MIB as usize - 512..]
        .iter()
        .all(|&b| b == 0));
    normal_client_works(&fx);
}

#[test]
fn oversized_write_and_bad_magic_disconnect() {
    let (fx, _) = setup();
    let mut r = Raw::hello(&fx);
    r.go("disk");
    r.request(CMD_WRITE, 0, 1, 0, MAX_PAYLOAD + 1);
    assert!(r.closed(), "oversized write kept the connection");

    let mut r = Raw::hello(&fx);
    r.go("disk");
    r.send(&[0x55; REQUEST_HEADER_LEN]);
    assert!(r.closed(), "bad request magic kept the connection");
    normal_client_works(&fx);
}

#[test]
fn write_to_read_only_export_is_eperm() {
    let (fx, _) = setup();
    let ro = Arc::new(MemBackend::new(MIB));
    fx.server
        .add_export("ro", None, ro.clone(), ExportOptions::default())
        .unwrap();
    let mut r = Raw::hello(&fx);
    r.go("ro");
    r.request(CMD_WRITE, 0, 1, 0, 512);
    r.send(&[1; 512]);
    assert_eq!(r.error(1), EPERM);
    r.request(CMD_WRITE_ZEROES, 0, 2, 0, 512);
    assert_eq!(r.error(2), EPERM);
    r.request(CMD_TRIM, 0, 3, 0, 512);
    assert_eq!(r.error(3), EPERM);
    assert!(ro.contents().iter().all(|&b| b == 0));

    // The crate's client sees EPERM as PermissionDenied.
    let addr = ConnectAddr::Unix(fx.socket.clone());
    local(async {
        let c = Client::connect(&addr, "ro", &ClientOptions::default())
            .await
            .unwrap();
        assert!(c.is_read_only());
        let e = c.write(0, &[1; 512], false).await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    });
    normal_client_works(&fx);
}

#[test]
fn client_vanishing_with_requests_in_flight_leaks_nothing() {
    let (fx, _) = setup();
    for round in 0..3 {
        let mut r = Raw::hello(&fx);
        r.go("disk");
        let mut b = Vec::new();
        for i in 0..64u64 {
            Request {
                flags: 0,
                kind: if i % 2 == 0 { CMD_READ } else { CMD_WRITE },
                cookie: i,
                offset: (i % 16) * 65536,
                length: 65536,
            }
            .encode(&mut b);
            if i % 2 == 1 {
                b.extend_from_slice(&[round as u8; 65536]);
            }
        }
        // Half a request at the end: the server must cope with a cut in the middle.
        b.extend_from_slice(&[0x25, 0x60]);
        r.send(&b);
        drop(r);
    }
    wait_until("connections to go", || fx.server.connection_count() == 0);
    assert_eq!(fx.server.export_clients("disk"), Some(0));
    normal_client_works(&fx);
}

#[test]
fn reads_use_simple_replies_or_hole_chunks_as_negotiated() {
    let (fx, backend) = setup();
    local(async {
        use nbd::Backend;
        backend.write(65536, &[7; 65536], false).await.unwrap();
    });

    // Without structured replies: one simple reply carrying the data.
    let mut r = Raw::hello(&fx);
    let mut d = Vec::new();
    encode_info_request(&mut d, "disk", &[]);
    r.option(OPT_GO, &d);
    while r.reply().1 != REP_ACK {}
    r.request(CMD_READ, 0, 5, 0, 131072);
    let mut h = [0u8; 16];
    r.s.read_exact(&mut h).unwrap();
    assert_eq!(be_u32(&h[0..4]), SIMPLE_REPLY_MAGIC);
    assert_eq!(be_u32(&h[4..8]), 0);
    assert_eq!(be_u64(&h[8..16]), 5);
    let mut data = vec![0u8; 131072];
    r.s.read_exact(&mut data).unwrap();
    assert!(data[..65536].iter().all(|&b| b == 0));
    assert!(data[65536..].iter().all(|&b| b == 7));

    // With structured replies: a hole chunk then a data chunk flagged done.
    let mut r = Raw::hello(&fx);
    r.go("disk");
    r.request(CMD_READ, 0, 6, 0, 131072);
    let (flags, kind, cookie, p) = r.chunk();
    assert_eq!((flags, kind, cookie), (0, REPLY_TYPE_OFFSET_HOLE, 6));
    assert_eq!((be_u64(&p[0..8]), be_u32(&p[8..12])), (0, 65536));
    let (flags, kind, cookie, p) = r.chunk();
    assert_eq!(
        (flags, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 6)
    );
    assert_eq!(be_u64(&p[0..8]), 65536);
    assert!(p[8..].iter().all(|&b| b == 7) && p.len() == 8 + 65536);

    // A read the backend answers in one lookup: one chunk, hole or data, flagged done.
    r.request(CMD_READ, 0, 8, 4096, 8192);
    let (flags, kind, cookie, p) = r.chunk();
    assert_eq!(
        (flags, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 8)
    );
    assert_eq!((be_u64(&p[0..8]), be_u32(&p[8..12])), (4096, 8192));
    r.request(CMD_READ, 0, 9, 65536 + 512, 4096);
    let (flags, kind, cookie, p) = r.chunk();
    assert_eq!(
        (flags, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 9)
    );
    assert_eq!(be_u64(&p[0..8]), 65536 + 512);
    assert!(p[8..].iter().all(|&b| b == 7) && p.len() == 8 + 4096);

    // DF asks for a single data chunk.
    r.request(CMD_READ, CMD_FLAG_DF, 7, 0, 131072);
    let (flags, kind, _, p) = r.chunk();
    assert_eq!((flags, kind), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA));
    assert_eq!(p.len(), 8 + 131072);
    normal_client_works(&fx);
}

#[test]
fn meta_context_negotiation_follows_query_rules() {
    let (fx, _) = setup();
    let mut r = Raw::hello(&fx);
    r.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(r.reply().1, REP_ACK);
    let names = |r: &mut Raw, opt: u32, queries: &[&str]| -> Vec<(u32, String)> {
        let mut d = Vec::new();
        encode_meta_context_request(&mut d, "disk", queries);
        r.option(opt, &d);
        let mut out = Vec::new();
        loop {
            let (_, kind, data) = r.reply();
            match kind {
                REP_META_CONTEXT => out.push((
                    be_u32(&data[..4]),
                    String::from_utf8(data[4..].to_vec()).unwrap(),
                )),
                REP_ACK => return out,
                k => panic!("unexpected reply {k:#x}"),
            }
        }
    };
    let all = names(&mut r, OPT_LIST_META_CONTEXT, &[]);
    assert_eq!(
        all.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>(),
        [
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:dirty"
        ]
    );
    assert!(all.iter().all(|(id, _)| *id == 0));
    let q = names(&mut r, OPT_LIST_META_CONTEXT, &["qemu:dirty-bitmap:"]);
    assert_eq!(q, [(0, "qemu:dirty-bitmap:dirty".to_string())]);
    assert!(names(&mut r, OPT_SET_META_CONTEXT, &["qemu:"]).is_empty());
    let set = names(
        &mut r,
        OPT_SET_META_CONTEXT,
        &["qemu:allocation-depth", "x-nope:thing", "base:allocation"],
    );
    assert_eq!(set.len(), 2);
    assert_ne!(set[0].0, set[1].0);
    let mut d = Vec::new();
    encode_info_request(&mut d, "disk", &[]);
    r.option(OPT_GO, &d);
    while r.reply().1 != REP_ACK {}
    r.request(CMD_BLOCK_STATUS, 0, 9, 0, 131072);
    let mut ids = Vec::new();
    loop {
        let (flags, kind, cookie, p) = r.chunk();
        assert_eq!((kind, cookie), (REPLY_TYPE_BLOCK_STATUS, 9));
        ids.push(be_u32(&p[..4]));
        if flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    ids.sort();
    let mut want = vec![set[0].0, set[1].0];
    want.sort();
    assert_eq!(ids, want);
}
