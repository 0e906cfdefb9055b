//! A QMP client for tests and tools: executes commands one at a time and buffers the
//! events that arrive meanwhile. `Send`, so it works on any tokio runtime.

use qapi::error::QmpError;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::time::Instant;

/// One QMP connection.
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// Bytes of a line not yet complete (kept across cancelled reads).
    partial: Vec<u8>,
    greeting: Value,
    events: VecDeque<Value>,
}

impl Client {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect_unix(path: impl AsRef<Path>) -> io::Result<Client> {
        let mut client = Self::connect_unix_raw(path).await?;
        client
            .execute("qmp_capabilities", json!({}))
            .await
            .map_err(|e| io::Error::other(format!("qmp_capabilities failed: {e}")))?;
        Ok(client)
    }

    /// Connects and reads the greeting, without negotiating.
    pub async fn connect_unix_raw(path: impl AsRef<Path>) -> io::Result<Client> {
        let (reader, writer) = UnixStream::connect(path).await?.into_split();
        let mut client = Client {
            reader: BufReader::new(reader),
            writer,
            partial: Vec::new(),
            greeting: Value::Null,
            events: VecDeque::new(),
        };
        client.greeting = client.read_message().await?;
        if client.greeting.get("QMP").is_none() {
            return Err(io::Error::other(format!(
                "not a QMP greeting: {}",
                client.greeting
            )));
        }
        Ok(client)
    }

    /// The server's greeting, `{"QMP": {"version": .., "capabilities": [..]}}`.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Runs `command` with `args` (an object, or null for none). A lost connection is
    /// reported as a GenericError whose text starts with `QMP connection`.
    pub async fn execute(&mut self, command: &str, args: Value) -> Result<Value, QmpError> {
        let mut request = Map::new();
        request.insert("execute".into(), Value::String(command.to_owned()));
        if !args.is_null() {
            request.insert("arguments".into(), args);
        }
        let line = Value::Object(request).to_string();
        let reply = self
            .exchange(line.as_bytes())
            .await
            .map_err(|e| QmpError::generic(format!("QMP connection: {e}")))?;
        if let Some(value) = reply.get("return") {
            return Ok(value.clone());
        }
        match serde_json::from_value::<QmpError>(reply["error"].clone()) {
            Ok(e) => Err(e),
            Err(_) => Err(QmpError::generic(format!(
                "QMP connection: bad reply {reply}"
            ))),
        }
    }

    /// Sends `line` as it is (add the newline yourself) and returns the next reply that is
    /// not an event, verbatim, or `Value::Null` if the connection is lost first.
    pub async fn execute_raw_line(&mut self, line: &str) -> Value {
        self.exchange(line.as_bytes()).await.unwrap_or(Value::Null)
    }

    /// Sends raw bytes without waiting for anything.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes).await
    }

    /// The next message that is not an event (events met on the way are buffered).
    pub async fn read_reply(&mut self) -> io::Result<Value> {
        loop {
            let message = self.read_message().await?;
            if message.get("event").is_some() {
                self.events.push_back(message);
            } else {
                return Ok(message);
            }
        }
    }

    /// One write for the command and its newline: a server that quits on the command may
    /// close before a second write, which would then fail with EPIPE.
    async fn exchange(&mut self, line: &[u8]) -> io::Result<Value> {
        if line.ends_with(b"\n") {
            self.writer.write_all(line).await?;
        } else {
            let mut framed = Vec::with_capacity(line.len() + 1);
            framed.extend_from_slice(line);
            framed.push(b'\n');
            self.writer.write_all(&framed).await?;
        }
        self.read_reply().await
    }

    /// The oldest buffered event, else the next one to arrive within `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<Value> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let message = tokio::time::timeout_at(deadline, self.read_message())
                .await
                .ok()?
                .ok()?;
            if message.get("event").is_some() {
                return Some(message);
            }
            tracing::warn!("QMP reply without a command: {message}");
        }
    }

    /// The first event named `name`, buffered or arriving within `timeout`; other events
    /// stay buffered in order.
    pub async fn wait_event(&mut self, name: &str, timeout: Duration) -> Option<Value> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let message = tokio::time::timeout_at(deadline, self.read_message())
                .await
                .ok()?
                .ok()?;
            if message["event"] == name {
                return Some(message);
            }
            if message.get("event").is_some() {
                self.events.push_back(message);
            } else {
                tracing::warn!("QMP reply without a command: {message}");
            }
        }
    }

    /// Takes all buffered events, oldest first.
    pub fn drain_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Reads one line and parses it. Cancel-safe: a partial line waits in `self.partial`.
    async fn read_message(&mut self) -> io::Result<Value> {
        loop {
            let n = self.reader.read_until(b'\n', &mut self.partial).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if self.partial.ends_with(b"\n") {
                let line = std::mem::take(&mut self.partial);
                return serde_json::from_slice(&line).map_err(io::Error::other);
            }
        }
    }
}
