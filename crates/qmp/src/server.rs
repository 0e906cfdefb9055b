//! The QMP server: one task per connection on the caller's `LocalSet`, each reading
//! commands, running them one at a time in order, and writing replies and events.
//!
//! Protocol errors have qemu-storage-daemon 10.0's classes and texts. A running command is
//! always driven to completion, even when its client goes away, so that no command is left
//! half done; while it runs, the connection's input is not read (the socket applies
//! back-pressure) but events keep flowing.

use crate::events::{EventSink, EventStream};
use crate::json::{Message, Streamer};
use futures::future::LocalBoxFuture;
use qapi::error::{ErrorClass, QmpError};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::rc::Rc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;

/// Runs QMP commands for the server.
pub trait Dispatcher: 'static {
    /// Runs `command`. An unknown command should fail with
    /// `QmpError::command_not_found(format!("The command {command} has not been found"))`.
    fn dispatch<'a>(
        &'a self,
        command: &'a str,
        args: Map<String, Value>,
    ) -> LocalBoxFuture<'a, Result<Value, QmpError>>;

    /// Whether `command` exists. Only consulted for `exec-oob`, which QEMU answers
    /// differently for unknown commands and for commands that cannot run out of band
    /// (none can here). The default claims every command exists.
    fn has_command(&self, _command: &str) -> bool {
        true
    }
}

/// A QMP monitor: any number of listeners and connections share its dispatcher and events.
#[derive(Clone)]
pub struct Server {
    inner: Rc<Inner>,
}

struct Inner {
    dispatcher: Rc<dyn Dispatcher>,
    events: EventSink,
    greeting: String,
    /// `--monitor pretty=on`: JSON written over several indented lines.
    pretty: bool,
}

impl Inner {
    /// One message as it goes on the wire, without the final line end.
    fn render(&self, message: &Value) -> String {
        if self.pretty {
            // QEMU's monitor ends every line it writes with CR LF, inner ones too; JSON
            // strings never hold a raw line feed.
            qapi::json::to_string_pretty(message).replace('\n', "\r\n")
        } else {
            qapi::json::to_string(message)
        }
    }
}

impl Server {
    /// `version` is the greeting's `version` member, e.g.
    /// `{"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "blockd-0.1.0"}`;
    /// `pretty` lays every message out over indented lines, as QEMU's `pretty=on`.
    pub fn new(
        dispatcher: Rc<dyn Dispatcher>,
        events: EventSink,
        version: Value,
        pretty: bool,
    ) -> Server {
        let mut inner = Inner {
            dispatcher,
            events,
            greeting: String::new(),
            pretty,
        };
        inner.greeting =
            inner.render(&json!({"QMP": {"version": version, "capabilities": ["oob"]}}));
        Server {
            inner: Rc::new(inner),
        }
    }

    /// Accepts connections on `listener` until the task is aborted. Must be called within
    /// a `LocalSet`.
    pub fn serve_unix(&self, listener: UnixListener) -> JoinHandle<()> {
        let server = self.clone();
        tokio::task::spawn_local(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        server.serve_connection(stream);
                    }
                    Err(e) => accept_failed(e).await,
                }
            }
        })
    }

    /// Accepts connections on `listener` until the task is aborted. Must be called within
    /// a `LocalSet`.
    pub fn serve_tcp(&self, listener: TcpListener) -> JoinHandle<()> {
        let server = self.clone();
        tokio::task::spawn_local(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        tracing::debug!(%peer, "QMP connection");
                        let _ = stream.set_nodelay(true);
                        server.serve_connection(stream);
                    }
                    Err(e) => accept_failed(e).await,
                }
            }
        })
    }

    /// Serves one already-connected stream (a socket, or stdio) until it closes. Must be
    /// called within a `LocalSet`.
    pub fn serve_connection<S>(&self, stream: S) -> JoinHandle<()>
    where
        S: AsyncRead + AsyncWrite + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_local(async move {
            let (reader, writer) = tokio::io::split(stream);
            let mut conn = Connection {
                inner,
                reader,
                writer,
                alive: true,
                oob: false,
                events: None,
            };
            conn.run().await;
        })
    }
}

/// Accept fails on resource exhaustion (EMFILE); wait a little instead of spinning.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!("QMP accept failed: {e}");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

struct Connection<R, W> {
    inner: Rc<Inner>,
    reader: R,
    writer: W,
    /// False once a write failed: the rest of the session runs without output.
    alive: bool,
    /// Whether the client enabled the `oob` capability.
    oob: bool,
    /// Set once capabilities were negotiated: only then does a client get events.
    events: Option<EventStream>,
}

/// What the connection loop is waiting for.
enum Wake {
    Input(std::io::Result<usize>),
    Event(Option<std::sync::Arc<Value>>),
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Connection<R, W> {
    async fn run(&mut self) {
        let greeting = self.inner.greeting.clone();
        self.write_line(&greeting).await;
        let mut streamer = Streamer::new();
        let mut pending: Vec<Message> = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        while self.alive {
            for message in std::mem::take(&mut pending) {
                if !self.alive {
                    break;
                }
                self.handle(message).await;
            }
            let wake = match &mut self.events {
                Some(events) => tokio::select! {
                    n = self.reader.read(&mut buf) => Wake::Input(n),
                    e = events.recv_shared() => Wake::Event(e),
                },
                None => Wake::Input(self.reader.read(&mut buf).await),
            };
            match wake {
                Wake::Input(Ok(0)) => break,
                Wake::Input(Ok(n)) => streamer.feed(&buf[..n], &mut pending),
                Wake::Input(Err(e)) => {
                    tracing::debug!("QMP read failed: {e}");
                    break;
                }
                Wake::Event(Some(event)) => self.write_line(&self.inner.render(&event)).await,
                Wake::Event(None) => break,
            }
        }
        let _ = self.writer.shutdown().await;
    }

    /// Answers one message. While a command runs, events are still written.
    async fn handle(&mut self, message: Message) {
        let (id, outcome) = match self.check(message) {
            Err((id, e)) => (id, Err(e)),
            Ok(request) => {
                let id = request.id.clone();
                (id, self.execute(request).await)
            }
        };
        let mut reply = Map::new();
        match outcome {
            Ok(value) => reply.insert("return".into(), value),
            Err(e) => reply.insert("error".into(), json!({"class": e.class, "desc": e.desc})),
        };
        if let Some(id) = id {
            reply.insert("id".into(), id);
        }
        self.write_line(&self.inner.render(&Value::Object(reply)))
            .await;
    }

    /// Validates the request's shape, in the order qemu-storage-daemon reports problems.
    fn check(&self, message: Message) -> Result<Request, (Option<Value>, QmpError)> {
        let value = message.map_err(|desc| (None, QmpError::generic(desc)))?;
        let Value::Object(mut obj) = value else {
            return Err((None, QmpError::generic("QMP input must be a JSON object")));
        };
        let id = obj.get("id").cloned();
        let fail = |desc: String| (id.clone(), QmpError::generic(desc));
        let mut keys: Vec<(u32, usize, &String)> = obj
            .keys()
            .enumerate()
            .map(|(i, k)| (qapi::json::qdict_bucket(k), i, k))
            .collect();
        keys.sort_by_key(|&(bucket, i, _)| (bucket, std::cmp::Reverse(i)));
        for (_, _, key) in keys {
            let value = &obj[key.as_str()];
            match key.as_str() {
                "execute" | "exec-oob" if key == "exec-oob" && !self.oob => {
                    return Err(fail(format!("QMP input member '{key}' is unexpected")));
                }
                "execute" | "exec-oob" if !value.is_string() => {
                    return Err(fail(format!("QMP input member '{key}' must be a string")));
                }
                "arguments" if !value.is_object() => {
                    return Err(fail(
                        "QMP input member 'arguments' must be an object".into(),
                    ));
                }
                "execute" | "exec-oob" | "arguments" | "id" => {}
                _ => return Err(fail(format!("QMP input member '{key}' is unexpected"))),
            }
        }
        let take_str = |obj: &mut Map<String, Value>, key: &str| match obj.remove(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let (command, oob) = match (
            take_str(&mut obj, "execute"),
            take_str(&mut obj, "exec-oob"),
        ) {
            (Some(_), Some(_)) => {
                return Err(fail(
                    "QMP input member 'execute' clashes with 'exec-oob'".into(),
                ))
            }
            (Some(c), None) => (c, false),
            (None, Some(c)) => (c, true),
            (None, None) => return Err(fail("QMP input lacks member 'execute'".into())),
        };
        let args = match obj.remove("arguments") {
            Some(Value::Object(args)) => args,
            _ => Map::new(),
        };
        Ok(Request {
            id,
            command,
            oob,
            args,
        })
    }

    async fn execute(&mut self, request: Request) -> Result<Value, QmpError> {
        let Request {
            command, oob, args, ..
        } = request;
        if self.events.is_none() {
            if command != "qmp_capabilities" {
                return Err(QmpError::command_not_found(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ));
            }
            let caps: CapabilitiesArgs = qapi::de::from_value(Value::Object(args))?;
            self.oob = caps.enable.unwrap_or_default().contains(&Capability::Oob);
            self.events = Some(self.inner.events.subscribe());
            return Ok(json!({}));
        }
        if oob {
            let known =
                command == "qmp_capabilities" || self.inner.dispatcher.has_command(&command);
            return Err(if known {
                QmpError::generic(format!("The command {command} does not support OOB"))
            } else {
                QmpError::command_not_found(format!("The command {command} has not been found"))
            });
        }
        if command == "qmp_capabilities" {
            qapi::de::from_value::<CapabilitiesArgs>(Value::Object(args))?;
            return Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        let inner = self.inner.clone();
        let command_future = inner.dispatcher.dispatch(&command, args);
        tokio::pin!(command_future);
        loop {
            let event = match &mut self.events {
                Some(events) => tokio::select! {
                    result = &mut command_future => {
                        // Events emitted before the command ended go out before its reply,
                        // as QEMU's monitor sends them: a client that sees a job gone from
                        // query-jobs has already been told how it ended.
                        while let Some(event) = self.events.as_mut().and_then(EventStream::try_recv_shared) {
                            self.write_line(&self.inner.render(&event)).await;
                        }
                        return result;
                    }
                    event = events.recv_shared() => event,
                },
                None => return command_future.await,
            };
            match event {
                Some(event) => self.write_line(&self.inner.render(&event)).await,
                // Dropped as too slow: finish the command, then the session ends.
                None => {
                    self.events = None;
                    self.alive = false;
                }
            }
        }
    }

    async fn write_line(&mut self, line: &str) {
        if !self.alive {
            return;
        }
        // QEMU's monitor ends every line with CR LF.
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        let written = async {
            self.writer.write_all(&bytes).await?;
            self.writer.flush().await
        };
        if let Err(e) = written.await {
            tracing::debug!("QMP write failed: {e}");
            self.alive = false;
        }
    }
}

struct Request {
    id: Option<Value>,
    command: String,
    oob: bool,
    args: Map<String, Value>,
}

#[derive(Deserialize)]
struct CapabilitiesArgs {
    enable: Option<Vec<Capability>>,
}

#[derive(Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum Capability {
    Oob,
}
