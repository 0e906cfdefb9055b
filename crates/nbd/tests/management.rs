//! Management API: connection limit, safe and hard export removal, events, stop.

mod common;

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nbd::{Client, ClientOptions, ConnectAddr, ExportError, ServerEvent};

const MIB: u64 = 1024 * 1024;

async fn wait_async(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn max_connections_holds_extra_clients_until_a_slot_frees() {
    let fx = Fixture::new(1);
    fx.export("disk", Arc::new(MemBackend::new(MIB)));
    let mut a = UnixStream::connect(&fx.socket).unwrap();
    let mut greeting = [0u8; 18];
    a.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    wait_until("first connection counted", || {
        fx.server.connection_count() == 1
    });

    let mut b = UnixStream::connect(&fx.socket).unwrap();
    b.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let err = b.read_exact(&mut greeting).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
    assert_eq!(fx.server.connection_count(), 1);

    drop(a);
    b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    b.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[8..16], b"IHAVEOPT");
}

#[test]
fn single_connection_server_withdraws_multi_conn() {
    for (max, multi) in [(1, false), (2, true)] {
        let fx = Fixture::new(max);
        fx.export("disk", Arc::new(MemBackend::new(MIB)));
        let addr = ConnectAddr::Unix(fx.socket.clone());
        local(async {
            let c = Client::connect(&addr, "disk", &ClientOptions::default())
                .await
                .unwrap();
            assert_eq!(
                c.flags() & nbd::proto::FLAG_CAN_MULTI_CONN != 0,
                multi,
                "max {max}"
            );
        });
    }
}

#[test]
fn idle_negotiation_is_cut_after_the_handshake_limit() {
    let fx = Fixture::with_config(nbd::ServerConfig {
        max_connections: 0,
        handshake_max_seconds: 1,
    });
    let mut s = UnixStream::connect(&fx.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut all = Vec::new();
    // The server sends its greeting, then closes when the limit passes.
    s.read_to_end(&mut all).unwrap();
    assert_eq!(all.len(), 18);
    wait_until("connection released", || fx.server.connection_count() == 0);
}

#[test]
fn safe_removal_fails_with_clients_and_hard_removal_disconnects() {
    let fx = Fixture::new(0);
    fx.export("disk", Arc::new(MemBackend::new(MIB)));
    let addr = ConnectAddr::Unix(fx.socket.clone());
    local(async {
        let c = Client::connect(&addr, "disk", &ClientOptions::default())
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        c.read(0, &mut buf).await.unwrap();
        assert_eq!(fx.server.export_clients("disk"), Some(1));

        assert_eq!(
            fx.server.remove_export("disk", false),
            Err(ExportError::InUse {
                name: "disk".into(),
                clients: 1
            })
        );
        assert!(fx.events.lock().unwrap().is_empty());
        c.read(0, &mut buf).await.unwrap();

        fx.server.remove_export("disk", true).unwrap();
        wait_async("ExportDeleted", || !fx.events.lock().unwrap().is_empty()).await;
        assert_eq!(
            fx.events.lock().unwrap().as_slice(),
            [ServerEvent::ExportDeleted {
                name: "disk".into()
            }]
        );
        assert!(c.read(0, &mut buf).await.is_err());
        assert_eq!(fx.server.export_clients("disk"), None);

        let err = Client::connect(&addr, "disk", &ClientOptions::default())
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        assert_eq!(
            fx.server.remove_export("disk", true),
            Err(ExportError::NotFound("disk".into()))
        );
    });
}

#[test]
fn removal_without_clients_emits_at_once_and_name_is_reusable() {
    let fx = Fixture::new(0);
    fx.export("disk", Arc::new(MemBackend::new(MIB)));
    assert!(matches!(
        fx.server.add_export(
            "disk",
            None,
            Arc::new(MemBackend::new(MIB)),
            Default::default()
        ),
        Err(ExportError::Exists(_))
    ));
    fx.server.remove_export("disk", false).unwrap();
    assert_eq!(
        fx.events.lock().unwrap().as_slice(),
        [ServerEvent::ExportDeleted {
            name: "disk".into()
        }]
    );
    fx.export("disk", Arc::new(MemBackend::new(MIB)));
    assert_eq!(fx.server.exports(), ["disk"]);
}

#[test]
fn stop_disconnects_clients_and_closes_the_listener() {
    let fx = Fixture::new(0);
    fx.export("a", Arc::new(MemBackend::new(MIB)));
    fx.export("b", Arc::new(MemBackend::new(MIB)));
    let addr = ConnectAddr::Unix(fx.socket.clone());
    local(async {
        let c = Client::connect(&addr, "a", &ClientOptions::default())
            .await
            .unwrap();
        // A connection still negotiating is closed too.
        let mut raw = UnixStream::connect(&fx.socket).unwrap();
        wait_async("two connections", || fx.server.connection_count() == 2).await;
        fx.server.stop();
        wait_async("connections closed", || fx.server.connection_count() == 0).await;
        let mut buf = [0u8; 512];
        assert!(c.read(0, &mut buf).await.is_err());
        let mut all = Vec::new();
        raw.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = raw.read_to_end(&mut all);
        assert!(all.len() <= 18);
        wait_async("socket removed", || !fx.socket.exists()).await;
        let mut names: Vec<String> = fx
            .events
            .lock()
            .unwrap()
            .iter()
            .map(|ServerEvent::ExportDeleted { name }| name.clone())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "b"]);
        assert!(fx.server.exports().is_empty());
        assert!(fx.server.listen_addr().is_none());
    });
}

#[test]
fn tcp_listener_serves_clients() {
    let thread = Arc::new(nbd::ThreadSpawner::start("nbd-tcp").unwrap());
    let server = nbd::NbdServer::new(thread.clone());
    let bound = server
        .start(
            &nbd::ListenAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 0,
                inet: nbd::InetOptions::default(),
            },
            nbd::ServerConfig::default(),
            None,
        )
        .unwrap();
    let nbd::ListenAddr::Tcp { port, .. } = bound else {
        panic!("tcp address expected")
    };
    assert_ne!(port, 0);
    let backend = Arc::new(MemBackend::new(MIB));
    server
        .add_export(
            "t",
            None,
            backend.clone(),
            nbd::ExportOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
    local(async {
        let c = Client::connect(
            &ConnectAddr::Tcp {
                host: "127.0.0.1".into(),
                port,
                inet: nbd::InetOptions::default(),
            },
            "t",
            &ClientOptions::default(),
        )
        .await
        .unwrap();
        c.write(4096, &[9u8; 4096], true).await.unwrap();
        c.disconnect().await.unwrap();
    });
    assert!(backend.contents()[4096..8192].iter().all(|&b| b == 9));
    server.stop();
}
