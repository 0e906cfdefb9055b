//! Property tests: arbitrary bytes into the server's handshake and request parsers and
//! into the client's reply parser never panic, never hang, and end the session.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use nbd::proto::*;
use nbd::{Client, ClientOptions, ExportOptions, LocalSpawner, NbdServer};
use proptest::collection::vec;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Feeds `input` to a server connection over an in-memory pipe while draining its
/// output; returns how many bytes the server wrote.
fn serve_bytes(input: Vec<u8>) -> usize {
    local(async move {
        let (spawner, _driver) = LocalSpawner::new();
        let server = NbdServer::new(Arc::new(spawner));
        server
            .add_export(
                "disk",
                Some("fuzz"),
                Arc::new(MemBackend::new(1 << 20)),
                ExportOptions {
                    writable: true,
                    bitmaps: vec!["dirty".into()],
                    allocation_depth: true,
                },
            )
            .unwrap();
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (sr, sw) = tokio::io::split(theirs);
        let (mut cr, mut cw) = tokio::io::split(ours);
        let feed = async move {
            let _ = cw.write_all(&input).await;
            let _ = cw.shutdown().await;
        };
        let drain = async move {
            let mut total = 0usize;
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = cr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total += n;
            }
            total
        };
        let all = async { tokio::join!(server.serve_io(sr, sw), feed, drain).2 };
        tokio::time::timeout(Duration::from_secs(60), all)
            .await
            .expect("server connection did not end")
    })
}

fn negotiated_prefix() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    let mut opt = |code: u32, data: &[u8]| {
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
    };
    opt(OPT_STRUCTURED_REPLY, &[]);
    let mut d = Vec::new();
    encode_meta_context_request(
        &mut d,
        "disk",
        &[
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:dirty",
        ],
    );
    opt(OPT_SET_META_CONTEXT, &d);
    let mut d = Vec::new();
    encode_info_request(&mut d, "disk", &[INFO_NAME, INFO_BLOCK_SIZE]);
    opt(OPT_GO, &d);
    b
}

#[derive(Debug, Clone)]
struct FuzzRequest {
    good_magic: bool,
    req: Request,
    payload: Vec<u8>,
}

fn request() -> impl Strategy<Value = FuzzRequest> {
    (
        prop::bool::weighted(0.95),
        0u16..10,
        prop_oneof![Just(0u16), 0u16..64, any::<u16>()],
        prop_oneof![0u64..(1 << 20), any::<u64>()],
        prop_oneof![0u32..(128 * 1024), any::<u32>()],
        vec(any::<u8>(), 0..512),
    )
        .prop_map(
            |(good_magic, kind, flags, offset, length, payload)| FuzzRequest {
                good_magic,
                req: Request {
                    flags,
                    kind,
                    cookie: offset ^ length as u64,
                    offset,
                    length,
                },
                payload,
            },
        )
}

fn option() -> impl Strategy<Value = (u32, Vec<u8>)> {
    (prop_oneof![1u32..12, any::<u32>()], vec(any::<u8>(), 0..64))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn handshake_survives_arbitrary_bytes(fixed in any::<bool>(), bytes in vec(any::<u8>(), 0..2048)) {
        let mut input = Vec::new();
        if fixed {
            input.extend_from_slice(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
        }
        input.extend_from_slice(&bytes);
        // The greeting is always sent first.
        prop_assert!(serve_bytes(input) >= 18);
    }

    #[test]
    fn options_with_arbitrary_payloads(opts in vec(option(), 0..12), huge in any::<bool>()) {
        let mut input = (FLAG_C_FIXED_NEWSTYLE).to_be_bytes().to_vec();
        for (code, data) in opts {
            input.extend_from_slice(&IHAVEOPT.to_be_bytes());
            input.extend_from_slice(&code.to_be_bytes());
            input.extend_from_slice(&(data.len() as u32).to_be_bytes());
            input.extend_from_slice(&data);
        }
        if huge {
            // A length the server must not try to buffer.
            input.extend_from_slice(&IHAVEOPT.to_be_bytes());
            input.extend_from_slice(&OPT_GO.to_be_bytes());
            input.extend_from_slice(&u32::MAX.to_be_bytes());
        }
        serve_bytes(input);
    }

    #[test]
    fn requests_survive_arbitrary_input(reqs in vec(request(), 0..24), tail in vec(any::<u8>(), 0..64)) {
        let mut input = negotiated_prefix();
        for r in reqs {
            let start = input.len();
            r.req.encode(&mut input);
            if !r.good_magic {
                input[start] ^= 0xff;
            }
            if r.req.kind == CMD_WRITE {
                input.extend_from_slice(&r.payload);
            }
        }
        input.extend_from_slice(&tail);
        serve_bytes(input);
    }

    #[test]
    fn client_survives_arbitrary_server_bytes(structured in any::<bool>(), bytes in vec(any::<u8>(), 0..1024)) {
        let mut server_bytes = Vec::new();
        server_bytes.extend_from_slice(&NBD_MAGIC.to_be_bytes());
        server_bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
        server_bytes.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        if structured {
            encode_option_reply(&mut server_bytes, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        }
        server_bytes.extend_from_slice(&bytes);
        local(async move {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            let (mut sr, mut sw) = tokio::io::split(theirs);
            let fake = async move {
                let _ = sw.write_all(&server_bytes).await;
                let _ = sw.shutdown().await;
                let mut sink = Vec::new();
                let _ = sr.read_to_end(&mut sink).await;
            };
            let client = async move {
                if let Ok(c) = Client::connect_stream(ours, "", &ClientOptions::default()).await {
                    let mut buf = [0u8; 512];
                    if c.size() >= 512 {
                        let _ = c.read(0, &mut buf).await;
                    }
                    let _ = c.block_status(0, c.size().min(4096), false).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(fake, client) })
                .await
                .expect("client did not finish");
        });
    }
}

/// Found with the nbd_client fuzz target: a structured read answered by a lone NONE chunk
/// flagged DONE came back as a successful read of zeroes. Its chunks must cover it.
#[test]
fn a_read_reply_that_covers_nothing_is_an_error() {
    local(async {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (mut sr, mut sw) = tokio::io::split(theirs);
        let mut handshake = Vec::new();
        handshake.extend_from_slice(&NBD_MAGIC.to_be_bytes());
        handshake.extend_from_slice(&IHAVEOPT.to_be_bytes());
        handshake.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        encode_option_reply(&mut handshake, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        encode_option_reply(&mut handshake, OPT_SET_META_CONTEXT, REP_ACK, &[]);
        let mut export = Vec::new();
        export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        export.extend_from_slice(&(1u64 << 20).to_be_bytes());
        export.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_SEND_DF).to_be_bytes());
        encode_option_reply(&mut handshake, OPT_GO, REP_INFO, &export);
        encode_option_reply(&mut handshake, OPT_GO, REP_ACK, &[]);
        let server = async move {
            sw.write_all(&handshake).await.unwrap();
            // Skip the client's options up to its read request, then answer it with a
            // NONE chunk alone.
            let mut seen = Vec::new();
            let cookie = loop {
                let mut byte = [0u8; 1];
                sr.read_exact(&mut byte).await.unwrap();
                seen.push(byte[0]);
                let n = seen.len();
                if n >= 28 && seen[n - 28..n - 24] == REQUEST_MAGIC.to_be_bytes() {
                    break u64::from_be_bytes(seen[n - 20..n - 12].try_into().unwrap());
                }
            };
            let mut chunk = Vec::new();
            chunk.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            chunk.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
            chunk.extend_from_slice(&REPLY_TYPE_NONE.to_be_bytes());
            chunk.extend_from_slice(&cookie.to_be_bytes());
            chunk.extend_from_slice(&0u32.to_be_bytes());
            sw.write_all(&chunk).await.unwrap();
            let mut rest = Vec::new();
            let _ = sr.read_to_end(&mut rest).await;
        };
        let client = async move {
            let c = Client::connect_stream(ours, "", &ClientOptions::default())
                .await
                .unwrap();
            let mut buf = [0xaau8; 512];
            let err = c.read(0, &mut buf).await.unwrap_err();
            assert!(err.to_string().contains("does not cover"), "{err}");
            drop(c);
        };
        tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(server, client)
        })
        .await
        .expect("the exchange finished");
    });
}
