//! The QMP server against a toy dispatcher: qemu-storage-daemon's replies to bad input,
//! id echo, ordering, events, several clients, disconnects and floods.

mod common;

use common::{start_toy, Raw, WAIT};
use serde_json::json;
use std::time::Duration;

/// Opens the toy's gate until one gated command has finished (an open before the gate
/// command started waiting is lost).
async fn open_gate(c: &mut qmp::Client) {
    let deadline = std::time::Instant::now() + WAIT;
    while c.execute("completed", json!({})).await.unwrap() == json!(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the gated command never finished"
        );
        c.execute("open", json!({})).await.unwrap();
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_match_the_recorded_qsd_replies() {
    let toy = start_toy();
    for (negotiate, after) in [
        (common::NEGOTIATE, common::NEGOTIATED),
        (common::NEGOTIATE_OOB, common::NEGOTIATED_OOB),
    ] {
        let got = common::session(&toy.path, negotiate, after).await;
        let want = common::expected_session(after);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g, w);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_executes_and_reports_errors() {
    let toy = start_toy();
    let mut c = qmp::Client::connect_unix(&toy.path).await.unwrap();
    assert_eq!(c.greeting()["QMP"]["capabilities"], json!(["oob"]));
    assert_eq!(c.greeting()["QMP"]["version"]["package"], "toy");
    assert_eq!(
        c.execute("echo", json!({"a": [1, "x"]})).await.unwrap(),
        json!({"a": [1, "x"]})
    );
    let e = c.execute("fail", json!({})).await.unwrap_err();
    assert_eq!(e, qapi::error::QmpError::generic("failed on purpose"));
    let e = c
        .execute("nope", serde_json::Value::Null)
        .await
        .unwrap_err();
    assert_eq!(e.class, qapi::error::ErrorClass::CommandNotFound);
    assert_eq!(e.desc, "The command nope has not been found");
    let reply = c
        .execute_raw_line("{\"execute\":\"echo\",\"id\":[1]}\n")
        .await;
    assert_eq!(reply, json!({"return": {}, "id": [1]}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_commands_are_answered_in_order() {
    let toy = start_toy();
    let mut raw = Raw::connect(&toy.path).await;
    raw.line().await.unwrap();
    raw.send(common::NEGOTIATE).await;
    raw.line().await.unwrap();
    // The gate holds the first command until another client opens it: the replies that
    // follow must wait for it.
    raw.send(b"{\"execute\":\"gate\",\"id\":1}{\"execute\":\"echo\",\"id\":2}\n{\"execute\":\"fail\",\"id\":3}\n")
        .await;
    let mut opener = qmp::Client::connect_unix(&toy.path).await.unwrap();
    open_gate(&mut opener).await;
    assert_eq!(raw.line().await.unwrap(), r#"{"return": {}, "id": 1}"#);
    assert_eq!(raw.line().await.unwrap(), r#"{"return": {}, "id": 2}"#);
    assert_eq!(
        raw.line().await.unwrap(),
        r#"{"id": 3, "error": {"class": "GenericError", "desc": "failed on purpose"}}"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_go_to_negotiated_clients_only() {
    let toy = start_toy();
    let mut a = qmp::Client::connect_unix(&toy.path).await.unwrap();
    let mut b = qmp::Client::connect_unix(&toy.path).await.unwrap();
    let mut fresh = qmp::Client::connect_unix_raw(&toy.path).await.unwrap();
    let mut local = toy.events.subscribe();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    a.execute("emit", json!({"name": "E1", "data": {"k": 1}}))
        .await
        .unwrap();
    toy.events.emit("E2", None);
    for c in [&mut a, &mut b] {
        let e1 = c.wait_event("E1", WAIT).await.unwrap();
        assert_eq!(e1["data"], json!({"k": 1}));
        let ts = &e1["timestamp"];
        assert!(ts["seconds"].as_u64().unwrap() >= before);
        assert!(ts["microseconds"].as_u64().unwrap() < 1_000_000);
        let e2 = c.next_event(WAIT).await.unwrap();
        assert_eq!(e2["event"], "E2");
        assert!(e2.get("data").is_none());
    }
    assert_eq!(local.recv().await.unwrap()["event"], "E1");
    assert_eq!(local.recv().await.unwrap()["event"], "E2");
    // The client that had not negotiated got nothing: its next line is its reply.
    let reply = fresh
        .execute_raw_line("{\"execute\":\"qmp_capabilities\"}\n")
        .await;
    assert_eq!(reply, json!({"return": {}}));
    assert!(fresh.drain_events().is_empty());
    toy.events.emit("E3", Some(json!([1])));
    assert_eq!(fresh.next_event(WAIT).await.unwrap()["data"], json!([1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_event_keeps_other_events_buffered() {
    let toy = start_toy();
    let mut c = qmp::Client::connect_unix(&toy.path).await.unwrap();
    for name in ["A", "B", "C"] {
        toy.events.emit(name, None);
    }
    assert_eq!(c.wait_event("C", WAIT).await.unwrap()["event"], "C");
    c.execute("echo", json!({})).await.unwrap();
    let rest: Vec<_> = c
        .drain_events()
        .into_iter()
        .map(|e| e["event"].clone())
        .collect();
    assert_eq!(rest, [json!("A"), json!("B")]);
    assert!(c.next_event(Duration::from_millis(50)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_outlives_its_client() {
    let toy = start_toy();
    let mut doomed = Raw::connect(&toy.path).await;
    doomed.line().await.unwrap();
    doomed.send(common::NEGOTIATE).await;
    doomed.line().await.unwrap();
    doomed.send(b"{\"execute\":\"gate\"}\n").await;
    let mut other = qmp::Client::connect_unix(&toy.path).await.unwrap();
    // Wait until the gate command is running, then hang up on it.
    other.execute("echo", json!({})).await.unwrap();
    drop(doomed);
    open_gate(&mut other).await;
    assert_eq!(
        other.execute("echo", json!({"x": 1})).await.unwrap(),
        json!({"x": 1})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_garbage_hurts_nobody_else() {
    let toy = start_toy();
    let mut flood = Raw::connect(&toy.path).await;
    flood.line().await.unwrap();
    flood.send(common::NEGOTIATE).await;
    flood.line().await.unwrap();
    let sender = tokio::spawn(async move {
        // 100 MB of digits: one number token far over QEMU's 64 MiB cap.
        flood.send(b"[").await;
        let chunk = vec![b'1'; 1 << 20];
        for _ in 0..100 {
            flood.send(&chunk).await;
        }
        flood
            .send(b"\n{\"execute\":\"echo\",\"id\":\"after\"}\n")
            .await;
        flood
    });
    let mut other = qmp::Client::connect_unix(&toy.path).await.unwrap();
    assert_eq!(
        other.execute("echo", json!({"y": 2})).await.unwrap(),
        json!({"y": 2})
    );
    let mut rd = sender.await.unwrap();
    assert_eq!(
        rd.line().await.unwrap(),
        r#"{"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}"#
    );
    assert_eq!(
        rd.line().await.unwrap(),
        r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#
    );
    assert_eq!(rd.line().await.unwrap(), r#"{"return": {}, "id": "after"}"#);
    assert_eq!(other.execute("echo", json!({})).await.unwrap(), json!({}));
}
