//! The QMP monitor's input: bytes from a client, split into messages by QEMU's JSON
//! lexer and streamer and handled by the server's connection loop (greeting, capabilities
//! negotiation, oob, `id` echo, error replies) in front of a dispatcher that answers a few
//! commands. The first input byte sets the size of the writes the client makes, so that
//! messages arrive cut at every place.
#![no_main]

use std::rc::Rc;
use std::time::Duration;

use futures::future::LocalBoxFuture;
use libfuzzer_sys::fuzz_target;
use qapi::error::QmpError;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Echo;

impl qmp::Dispatcher for Echo {
    fn dispatch<'a>(
        &'a self,
        command: &'a str,
        args: Map<String, Value>,
    ) -> LocalBoxFuture<'a, Result<Value, QmpError>> {
        Box::pin(async move {
            match command {
                "query-status" => Ok(json!({"status": "running"})),
                "echo" => Ok(Value::Object(args)),
                _ => Err(QmpError::command_not_found(format!(
                    "The command {command} has not been found"
                ))),
            }
        })
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).max(1);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let input = bytes.to_vec();
    // Odd first bytes run the session with pretty=on, so both layouts meet every input.
    let pretty = bytes.first().is_some_and(|b| b & 1 == 1);
    local.block_on(&rt, async move {
        let server = qmp::Server::new(
            Rc::new(Echo),
            qmp::EventSink::new(),
            json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "fuzz"}),
            pretty,
        );
        let (client, server_side) = tokio::io::duplex(1 << 16);
        let serving = server.serve_connection(server_side);
        let (mut read, mut write) = tokio::io::split(client);
        let drain = tokio::task::spawn_local(async move {
            let mut sink = vec![0u8; 1 << 16];
            while let Ok(n) = read.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        });
        let _ = write.write_all(b"{\"execute\": \"qmp_capabilities\"}\n").await;
        for chunk in input.chunks(cut) {
            if write.write_all(chunk).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let _ = write.shutdown().await;
        if tokio::time::timeout(Duration::from_secs(1), serving).await.is_err() {
            eprintln!("qmp_stream: connection still open 1 s after the client's end");
        }
        drain.abort();
    });
});
