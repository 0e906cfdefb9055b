//! A QMP client for tests, tools and other Rust programs: executes commands one at a time
//! and buffers the events that arrive meanwhile, over a Unix or TCP socket, with typed
//! commands ([`crate::api`]) and reconnection. `Send`, so it works on any tokio runtime.

use crate::api::{Command, Event};
use qapi::error::QmpError;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

/// Where a QMP monitor listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A Unix socket's path.
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

impl FromStr for Address {
    type Err = io::Error;

    /// `tcp:HOST:PORT` is a TCP address, `unix:PATH` or anything else a socket path.
    fn from_str(s: &str) -> io::Result<Address> {
        if let Some(hostport) = s.strip_prefix("tcp:") {
            if !hostport.contains(':') {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("'{s}' lacks a port: write tcp:HOST:PORT"),
                ));
            }
            return Ok(Address::Tcp(hostport.to_owned()));
        }
        let path = s.strip_prefix("unix:").unwrap_or(s);
        if path.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty QMP socket path",
            ));
        }
        Ok(Address::Unix(PathBuf::from(path)))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "{}", path.display()),
            Address::Tcp(hostport) => write!(f, "tcp:{hostport}"),
        }
    }
}

type Reader = BufReader<Box<dyn AsyncRead + Send + Unpin>>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// One QMP connection.
pub struct Client {
    address: Address,
    reader: Reader,
    writer: Writer,
    /// Bytes of a line not yet complete (kept across cancelled reads).
    partial: Vec<u8>,
    greeting: Value,
    events: VecDeque<Value>,
}

impl Client {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(address: &Address) -> io::Result<Client> {
        let mut client = Self::connect_raw(address).await?;
        client.negotiate().await?;
        Ok(client)
    }

    /// [`connect`](Self::connect) to a Unix socket.
    pub async fn connect_unix(path: impl AsRef<Path>) -> io::Result<Client> {
        Self::connect(&Address::Unix(path.as_ref().to_owned())).await
    }

    /// Connects to a Unix socket and reads the greeting, without negotiating.
    pub async fn connect_unix_raw(path: impl AsRef<Path>) -> io::Result<Client> {
        Self::connect_raw(&Address::Unix(path.as_ref().to_owned())).await
    }

    /// Connects anew to the same address, waiting up to `patience` for the monitor to
    /// come back (a restarting daemon, or qemu-storage-daemon's monitor that serves one
    /// client at a time). Events buffered from the old connection are kept.
    pub async fn reconnect(&mut self, patience: Duration) -> io::Result<()> {
        let deadline = Instant::now() + patience;
        loop {
            // A monitor that accepts and never greets must not hold us past the deadline.
            let attempt = tokio::time::timeout_at(deadline, Self::connect(&self.address))
                .await
                .unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the monitor did not greet in time",
                    ))
                });
            match attempt {
                Ok(fresh) => {
                    self.reader = fresh.reader;
                    self.writer = fresh.writer;
                    self.partial.clear();
                    self.greeting = fresh.greeting;
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The address this client connects to.
    pub fn address(&self) -> &Address {
        &self.address
    }

    async fn negotiate(&mut self) -> io::Result<()> {
        self.execute("qmp_capabilities", json!({}))
            .await
            .map(drop)
            .map_err(|e| io::Error::other(format!("qmp_capabilities failed: {e}")))
    }

    /// Connects and reads the greeting, without negotiating.
    pub async fn connect_raw(address: &Address) -> io::Result<Client> {
        let (reader, writer): (Box<dyn AsyncRead + Send + Unpin>, Writer) = match address {
            Address::Unix(path) => {
                let (r, w) = UnixStream::connect(path).await?.into_split();
                (Box::new(r), Box::new(w))
            }
            Address::Tcp(hostport) => {
                let (r, w) = TcpStream::connect(hostport.as_str()).await?.into_split();
                (Box::new(r), Box::new(w))
            }
        };
        let mut client = Client {
            address: address.clone(),
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

    /// Runs a typed command and reads its typed reply. A reply that does not have the
    /// expected shape is a GenericError naming the command.
    pub async fn call<C: Command>(&mut self, command: &C) -> Result<C::Returns, QmpError> {
        let args = serde_json::to_value(command)
            .map_err(|e| QmpError::generic(format!("{}: arguments: {e}", C::NAME)))?;
        let reply = self.execute(C::NAME, args).await?;
        serde_json::from_value(reply)
            .map_err(|e| QmpError::generic(format!("{}: unexpected reply: {e}", C::NAME)))
    }

    /// The oldest buffered event, else the next one to arrive within `timeout`, typed:
    /// `Ok(None)` when none arrived in time, an error when the connection is lost.
    pub async fn next_typed_event(&mut self, timeout: Duration) -> io::Result<Option<Event>> {
        if let Some(message) = self.events.pop_front() {
            return Ok(Event::from_message(&message));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let Ok(message) = tokio::time::timeout_at(deadline, self.read_message()).await else {
                return Ok(None);
            };
            match Event::from_message(&message?) {
                Some(event) => return Ok(Some(event)),
                None => tracing::warn!("QMP reply without a command"),
            }
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
