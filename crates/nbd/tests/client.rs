//! The crate's client against qemu-nbd (a qcow2 image) and against the crate's server.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use common::*;
use futures::future::try_join_all;
use nbd::proto::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use nbd::{Capabilities, Client, ClientOptions, ConnectAddr, MetaContext, StatusExtent, ZeroFlags};

const MIB: u64 = 1024 * 1024;

struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn all_contexts() -> ClientOptions {
    ClientOptions {
        meta_contexts: vec![
            "base:allocation".into(),
            "qemu:allocation-depth".into(),
            "qemu:dirty-bitmap:b0".into(),
            "qemu:dirty-bitmap:dirty".into(),
        ],
        tls: None,
    }
}

/// Flags per byte range, expanded from extents starting at `offset`.
fn flags_at(extents: &[StatusExtent], offset: u64, at: u64) -> u32 {
    let mut pos = offset;
    for e in extents {
        if at < pos + e.length {
            return e.flags;
        }
        pos += e.length;
    }
    panic!("{at} not covered by {extents:?}")
}

fn status_of(st: &[(u32, Vec<StatusExtent>)], id: u32) -> &[StatusExtent] {
    &st.iter()
        .find(|(i, _)| *i == id)
        .expect("context replied")
        .1
}

#[test]
fn client_against_qemu_nbd_with_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let sock = dir.path().join("q.sock");
    let img_s = img.to_str().unwrap();
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", img_s, "4M"]));
    run(Command::new("qemu-img").args(["bitmap", "--add", img_s, "b0"]));
    run(Command::new("qemu-io").args(["-f", "qcow2", img_s, "-c", "write -P 0x33 1M 64k"]));
    let _srv = QemuNbd(
        Command::new("qemu-nbd")
            .args([
                "-k",
                sock.to_str().unwrap(),
                "-f",
                "qcow2",
                "-t",
                "-A",
                "-B",
                "b0",
                img_s,
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("qemu-nbd socket", || sock.exists());

    local(async {
        let addr = ConnectAddr::Unix(sock.clone());
        let c = Client::connect(&addr, "", &all_contexts()).await.unwrap();
        assert_eq!(c.size(), 4 * MIB);
        assert!(c.structured_replies());
        assert!(!c.is_read_only());
        assert!(c.block_size().is_some());
        let base = c.meta_context_id("base:allocation").unwrap();
        let depth = c.meta_context_id("qemu:allocation-depth").unwrap();
        let b0 = c.meta_context_id("qemu:dirty-bitmap:b0").unwrap();
        assert_eq!(c.meta_contexts().len(), 3, "{:?}", c.meta_contexts());

        let mut buf = vec![0u8; 128 * 1024];
        c.read(MIB - 64 * 1024, &mut buf).await.unwrap();
        assert!(buf[..65536].iter().all(|&b| b == 0));
        assert!(buf[65536..].iter().all(|&b| b == 0x33));

        // Writes through NBD mark the exported bitmap.
        c.write(2 * MIB, &[0x44; 65536], true).await.unwrap();
        let st = c.block_status(0, 4 * MIB, false).await.unwrap();
        let b = status_of(&st, base);
        assert_eq!(flags_at(b, 0, 0) & STATE_HOLE, STATE_HOLE);
        assert_eq!(flags_at(b, 0, MIB), 0);
        let d = status_of(&st, depth);
        assert_eq!(flags_at(d, 0, 0), 0);
        assert_eq!(flags_at(d, 0, MIB), 1);
        let dirty = status_of(&st, b0);
        assert_eq!(flags_at(dirty, 0, 2 * MIB), STATE_DIRTY);
        assert_eq!(flags_at(dirty, 0, 3 * MIB), 0);

        // Pipelined writes and reads.
        try_join_all((0..32u64).map(|i| {
            let data = vec![i as u8 + 1; 32 * 1024];
            let c = &c;
            async move { c.write(i * 32 * 1024, &data, false).await }
        }))
        .await
        .unwrap();
        let mut bufs: Vec<Vec<u8>> = (0..32).map(|_| vec![0u8; 32 * 1024]).collect();
        try_join_all(
            bufs.iter_mut()
                .enumerate()
                .map(|(i, b)| c.read(i as u64 * 32 * 1024, b)),
        )
        .await
        .unwrap();
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&x| x == i as u8 + 1), "chunk {i}");
        }

        c.write_zeroes(0, 64 * 1024, ZeroFlags::default())
            .await
            .unwrap();
        c.trim(3 * MIB, 64 * 1024, false).await.unwrap();
        c.flush().await.unwrap();
        let mut z = vec![1u8; 64 * 1024];
        c.read(0, &mut z).await.unwrap();
        assert!(z.iter().all(|&b| b == 0));
        assert!(c.read(4 * MIB, &mut z).await.is_err());
        c.disconnect().await.unwrap();
    });

    // What the client wrote is in the image (qemu-io fails on a pattern mismatch).
    run(Command::new("qemu-io").args([
        "-r",
        "-U",
        "-f",
        "qcow2",
        img_s,
        "-c",
        "read -P 0x44 2M 64k",
        "-c",
        "read -P 0 0 64k",
        "-c",
        "read -P 3 64k 32k",
    ]));
}

#[test]
fn client_against_own_server() {
    let fx = Fixture::new(0);
    let backing: BTreeSet<u64> = [4, 5].into_iter().collect();
    let size = 40 * MIB;
    let backend = Arc::new(MemBackend::with(size, backing, Capabilities::default()));
    fx.export("disk", backend.clone());
    local(async {
        let addr = ConnectAddr::Unix(fx.socket.clone());
        let c = Client::connect(&addr, "disk", &all_contexts())
            .await
            .unwrap();
        assert_eq!(c.size(), size);
        assert_eq!(c.meta_contexts().len(), 3, "{:?}", c.meta_contexts());
        assert!(c.meta_context_id("qemu:dirty-bitmap:b0").is_none());

        // 64 writes in flight, then 64 reads, answered out of order.
        try_join_all((0..64u64).map(|i| {
            let data = vec![(i * 3) as u8; 48 * 1024];
            let c = &c;
            async move { c.write(MIB + i * 48 * 1024, &data, i % 7 == 0).await }
        }))
        .await
        .unwrap();
        let mut bufs: Vec<Vec<u8>> = (0..64).map(|_| vec![0u8; 48 * 1024]).collect();
        try_join_all(
            bufs.iter_mut()
                .enumerate()
                .map(|(i, b)| c.read(MIB + i as u64 * 48 * 1024, b)),
        )
        .await
        .unwrap();
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&x| x == (i * 3) as u8), "chunk {i}");
        }

        // A read across backing data, holes and written data (hole chunks on the wire).
        let mut big = vec![0xffu8; 2 * MIB as usize];
        c.read(0, &mut big).await.unwrap();
        assert_eq!(big, backend.contents()[..2 * MIB as usize]);
        assert!(big[4 * 65536..6 * 65536].iter().all(|&b| b == BACKING_BYTE));

        // A read larger than the 32 MiB request limit is split.
        let mut huge = vec![0u8; size as usize];
        c.read(0, &mut huge).await.unwrap();
        assert_eq!(huge, backend.contents());

        let st = c.block_status(0, size, false).await.unwrap();
        for ctx in [
            MetaContext::BaseAllocation,
            MetaContext::AllocationDepth,
            MetaContext::DirtyBitmap("dirty".into()),
        ] {
            let id = c.meta_context_id(&ctx.name()).unwrap();
            let got: Vec<(u64, u32)> = status_of(&st, id)
                .iter()
                .map(|e| (e.length, e.flags))
                .collect();
            let want: Vec<(u64, u32)> = backend
                .status_map(&ctx)
                .into_iter()
                .map(|(_, l, f)| (l, f))
                .collect();
            assert_eq!(got, want, "{}", ctx.name());
        }
        let one = c.block_status(0, size, true).await.unwrap();
        assert!(one.iter().all(|(_, e)| e.len() == 1));
        assert_eq!(one.len(), 3);

        c.write_zeroes(
            MIB,
            128 * 1024,
            ZeroFlags {
                may_trim: true,
                fast: true,
                fua: true,
            },
        )
        .await
        .unwrap();
        let st = c.block_status(MIB, 128 * 1024, false).await.unwrap();
        let base = status_of(&st, c.meta_context_id("base:allocation").unwrap());
        assert_eq!(
            base,
            [StatusExtent {
                length: 128 * 1024,
                flags: STATE_HOLE | STATE_ZERO
            }]
        );
        c.cache(0, MIB).await.unwrap();
        c.trim(2 * MIB, 5 * MIB, false).await.unwrap();
        c.flush().await.unwrap();
        assert!(backend.flushes() >= 1);
        let err = c.write(size - 10, &[0; 20], false).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        c.disconnect().await.unwrap();
    });
}

#[test]
fn dropped_request_futures_do_not_break_the_connection() {
    let fx = Fixture::new(0);
    fx.export("disk", Arc::new(MemBackend::new(4 * MIB)));
    local(async {
        let addr = ConnectAddr::Unix(fx.socket.clone());
        let c = Client::connect(&addr, "disk", &ClientOptions::default())
            .await
            .unwrap();
        for _ in 0..16 {
            let mut buf = vec![0u8; MIB as usize];
            let fut = c.read(0, &mut buf);
            // Polled once (the request is sent), then dropped before its reply.
            let _ = futures::poll!(Box::pin(fut));
        }
        let mut buf = vec![1u8; 4096];
        c.read(0, &mut buf).await.unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    });
}

/// A request whose backend panics (a bug) fails with EIO; the connection, and the other
/// requests on it, go on.
#[test]
fn a_panicking_request_fails_alone() {
    let fx = Fixture::new(0);
    let backend = Arc::new(MemBackend::new(4 * MIB));
    fx.export("disk", backend.clone());
    local(async {
        let addr = ConnectAddr::Unix(fx.socket.clone());
        let c = Client::connect(&addr, "disk", &ClientOptions::default())
            .await
            .unwrap();
        c.write(0, &vec![7u8; 2 * CHUNK as usize], false)
            .await
            .unwrap();
        backend.panic_on_read_at(CHUNK / 2);
        // Across two chunks, so the server reads the data runs from the backend.
        let mut buf = vec![0u8; CHUNK as usize];
        let err = c.read(CHUNK / 2, &mut buf).await.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        let mut buf = vec![0u8; 4096];
        c.read(0, &mut buf).await.unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        c.disconnect().await.unwrap();
    });
}
