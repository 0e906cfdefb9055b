//! A toy QMP server on its own thread (current-thread runtime and `LocalSet`, as in the
//! daemon) and a raw line-level client, shared by the protocol tests.

// Each test binary uses its own part of these helpers.
#![allow(dead_code)]

use futures::future::LocalBoxFuture;
use qapi::error::QmpError;
use qmp::{Dispatcher, EventSink, Server};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

/// Long enough for a loaded machine, short enough to fail a hung test.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn version() -> Value {
    json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "toy"})
}

const COMMANDS: &[&str] = &[
    "echo",
    "fail",
    "emit",
    "gate",
    "open",
    "completed",
    "query-version",
];

/// echo (returns its arguments), fail, emit {name, data?}, gate (waits for open), open,
/// completed (how many gates finished), query-version.
struct Toy {
    events: EventSink,
    gate: Notify,
    gates_done: Cell<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize)]
struct EmitArgs {
    name: String,
    data: Option<Value>,
}

impl Dispatcher for Toy {
    fn dispatch<'a>(
        &'a self,
        command: &'a str,
        args: Map<String, Value>,
    ) -> LocalBoxFuture<'a, Result<Value, QmpError>> {
        Box::pin(async move {
            match command {
                "echo" => Ok(Value::Object(args)),
                "fail" => Err(QmpError::generic("failed on purpose")),
                "emit" => {
                    let a: EmitArgs = qapi::de::from_value(Value::Object(args))?;
                    self.events.emit(&a.name, a.data);
                    Ok(json!({}))
                }
                "gate" => {
                    self.gate.notified().await;
                    self.gates_done.set(self.gates_done.get() + 1);
                    Ok(json!({}))
                }
                "open" => {
                    self.gate.notify_waiters();
                    Ok(json!({}))
                }
                "completed" => Ok(json!(self.gates_done.get())),
                "query-version" => {
                    qapi::de::from_value::<NoArgs>(Value::Object(args))?;
                    Ok(version())
                }
                _ => Err(QmpError::command_not_found(format!(
                    "The command {command} has not been found"
                ))),
            }
        })
    }

    fn has_command(&self, command: &str) -> bool {
        COMMANDS.contains(&command)
    }
}

/// The toy server; stops when dropped.
pub struct ToyServer {
    pub path: PathBuf,
    pub events: EventSink,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for ToyServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub fn start_toy() -> ToyServer {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let events = EventSink::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (p, sink) = (path.clone(), events.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let listener = UnixListener::bind(&p).unwrap();
            let toy = Toy {
                events: sink.clone(),
                gate: Notify::new(),
                gates_done: Cell::new(0),
            };
            let server = Server::new(Rc::new(toy), sink, version(), false);
            server.serve_unix(listener);
            ready_tx.send(()).unwrap();
            let _ = stop_rx.await;
        });
    });
    ready_rx.recv().unwrap();
    ToyServer {
        path,
        events,
        _dir: dir,
        stop: Some(stop_tx),
    }
}

/// A line-level connection: bytes out, reply lines in, nothing interpreted.
pub struct Raw {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Raw {
    pub async fn connect(path: &Path) -> Raw {
        let (r, w) = UnixStream::connect(path).await.unwrap().into_split();
        Raw {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    /// The next line, which must end in CR LF as QEMU's do, without its line end; `None`
    /// at end of stream.
    pub async fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        let n = tokio::time::timeout(WAIT, self.reader.read_line(&mut line))
            .await
            .expect("no reply line in time")
            .unwrap();
        if n == 0 {
            return None;
        }
        let line = line.strip_suffix("\r\n");
        Some(line.expect("a line ends with CR LF").to_owned())
    }

    /// Sends `input`, then a sync command with id "sync", and returns the lines that came
    /// before the sync reply.
    pub async fn transact(&mut self, input: &[u8]) -> Vec<String> {
        self.send(input).await;
        self.send(b"{\"execute\":\"query-version\",\"id\":\"sync\"}\n")
            .await;
        let mut lines = Vec::new();
        loop {
            let line = self.line().await.expect("connection closed");
            if line.contains(r#""id": "sync""#) {
                return lines;
            }
            lines.push(line);
        }
    }
}

/// Replaces the greeting's and query-version's package string, which differs by build.
pub fn normalize(line: &str) -> String {
    match line.find(r#""package": ""#) {
        Some(start) => {
            let value = start + r#""package": ""#.len();
            let end = value + line[value..].find('"').unwrap_or(0);
            format!("{}P{}", &line[..value], &line[end..])
        }
        None => line.to_owned(),
    }
}

/// One input and the reply lines qemu-storage-daemon 10.0.2 gives for it.
pub type Case = (&'static [u8], &'static [&'static str]);

pub const NEGOTIATE: &[u8] = b"{\"execute\":\"qmp_capabilities\",\"id\":\"neg\"}\n";
pub const NEGOTIATE_OOB: &[u8] =
    b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]},\"id\":\"neg\"}\n";

/// Before `qmp_capabilities`.
pub const BEFORE_NEGOTIATION: &[Case] = &[
    (
        b"{\"execute\":\"query-version\"}\n",
        &[
            r#"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#,
        ],
    ),
    (
        b"{\"execute\":\"nosuch\",\"id\":\"x\"}\n",
        &[
            r#"{"id": "x", "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#,
        ],
    ),
    (
        b"{\"exec-oob\":\"qmp_capabilities\"}\n",
        &[
            r#"{"error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#,
        ],
    ),
    (
        b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"foo\"]}}\n",
        &[
            r#"{"error": {"class": "GenericError", "desc": "Parameter 'null' does not accept value 'foo'"}}"#,
        ],
    ),
    (
        b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":\"oob\"}}\n",
        &[
            r#"{"error": {"class": "GenericError", "desc": "Invalid parameter type for 'enable', expected: array"}}"#,
        ],
    ),
    (
        b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"x\":1,\"y\":2}}\n",
        &[r#"{"error": {"class": "GenericError", "desc": "Parameter 'y' is unexpected"}}"#],
    ),
    (
        b"{\"execute\":\"qmp_capabilities\",\"arguments\":[]}\n",
        &[
            r#"{"error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}"#,
        ],
    ),
    (
        b"{\"foo\":1,\"id\":7}\n",
        &[
            r#"{"id": 7, "error": {"class": "GenericError", "desc": "QMP input member 'foo' is unexpected"}}"#,
        ],
    ),
    (
        b"garbage\n",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'garbage'"}}"#,
        ],
    ),
];

/// After plain negotiation (no `oob`).
pub const NEGOTIATED: &[Case] = &[
    (
        b"{\"execute\":\"query-version\",\"id\":{\"a\":[1]}}\n",
        &[r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "P"}, "id": {"a": [1]}}"#],
    ),
    (
        b"{\"execute\":\"query-version\",\"id\":\"\\u00e9\\u20ac\\ud83d\\ude00 \\u007f \\u0001\"}\n",
        &[r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "P"}, "id": "\u00E9\u20AC\uD83D\uDE00 \u007F \u0001"}"#],
    ),
    (
        b"{\"execute\":\"query-version\",\"id\":1.5e300}\n",
        &[r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "P"}, "id": 1.5000000000000001e+300}"#],
    ),
    (
        b"{\"execute\":\"query-version\",\"id\":12345678901234567890}\n",
        &[r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "P"}, "id": 12345678901234567890}"#],
    ),
    (
        b"{\"execute\":\"query-version\",\"id\":[true,false,null,-0,0.1]}\n",
        &[r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "P"}, "id": [true, false, null, 0, 0.10000000000000001]}"#],
    ),
    (
        b"{'execute':'query-version','id':'a\"b\\'c'}\n",
        &[r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "P"}, "id": "a\"b'c"}"#],
    ),
    (
        b"{\"execute\":\"query-version\",\"arguments\":{\"x\":1},\"id\":8}\n",
        &[r#"{"id": 8, "error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}}"#],
    ),
    (
        b"{\"execute\":\"nosuch\",\"id\":5}\n",
        &[r#"{"id": 5, "error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}}"#],
    ),
    (
        b"[1]\n1\n\"str\"\nnull\n",
        &[
            r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
        ],
    ),
    (
        b"{}\n",
        &[r#"{"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#],
    ),
    (
        b"{\"id\":1}\n",
        &[r#"{"id": 1, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#],
    ),
    (
        b"{\"execute\":1}\n",
        &[r#"{"error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}"#],
    ),
    (
        b"{\"execute\":1,\"bar\":2}\n",
        &[r#"{"error": {"class": "GenericError", "desc": "QMP input member 'bar' is unexpected"}}"#],
    ),
    (
        b"{\"arguments\":1,\"execute\":2}\n",
        &[r#"{"error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}"#],
    ),
    (
        b"{\"execute\":\"query-version\",\"arguments\":null}\n",
        &[r#"{"error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}"#],
    ),
    (
        b"{\"execute\":\"query-version\",\"arguments\":5,\"id\":[]}\n",
        &[r#"{"id": [], "error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}"#],
    ),
    (
        b"{\"execute\":\"query-version\",\"control\":1}\n",
        &[r#"{"error": {"class": "GenericError", "desc": "QMP input member 'control' is unexpected"}}"#],
    ),
    (
        b"{\"exec-oob\":\"query-version\",\"id\":3}\n",
        &[r#"{"id": 3, "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#],
    ),
    (
        b"{\"execute\":\"qmp_capabilities\",\"id\":4}\n",
        &[r#"{"id": 4, "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#],
    ),
    (
        b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"x\":1}}\n",
        &[r#"{"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}}"#],
    ),
    (
        b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[1]}}\n",
        &[r#"{"error": {"class": "GenericError", "desc": "Invalid parameter type for 'enable[0]', expected: string"}}"#],
    ),
    (
        b"{\"execute\": xyz\n{\"execute\":\"query-version\"}\n}\n",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'xyz'"}}"#],
    ),
    (
        b"]\n",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#],
    ),
    (
        b"{\"execute\":\"query-version\"}}\n",
        &[
            r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "P"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
        ],
    ),
    (
        b"{\"execute\":\"query-version\"} {\"execute\":\"query-version\",\"id\":2}\n",
        &[
            r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "P"}}"#,
            r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "P"}, "id": 2}"#,
        ],
    ),
    (
        b"{\"execute\":\"query-version\", @ {\"execute\":\"query-version\",\"id\":9}\n",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '@'"}}"#,
            r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "P"}, "id": 9}"#,
        ],
    ),
    (
        b"{\"execute\":\"query-version\", \xff{\"execute\":\"query-version\",\"id\":9}\n",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#,
            r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "P"}, "id": 9}"#,
        ],
    ),
    (
        b"{\"execute\":\"query-version\",\"id\":Abc,def}\n",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray 'A'"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'def'"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
        ],
    ),
    (
        b"{\"execute\":\"query-version\",\"id\":\"tab\there\"}\n",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"tab\t'"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
        ],
    ),
    (
        b"{\"execute\":\"query-version\",\"id\":\"\\ud800\"}\n",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\ud800 is not a valid Unicode character"}}"#],
    ),
    (
        b"{\"execute\":\"query-version\",\"id\":\"\xc3\"}\n",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8 sequence in string"}}"#],
    ),
    (
        b"{\"execute\":\"query-version\",\"id\":{\"a\":1,\"a\":2}}\n",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}}"#],
    ),
    (
        b"{\"a\" 1}\n{1:2}\n[1 2]\n{\"a\":1 \"b\":2}\n",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, missing : in object pair"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, key is not a string in object"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expected separator in list"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expected separator in dict"}}"#,
        ],
    ),
    (b"  \t\r\n", &[]),
];

/// After negotiation with `oob` enabled.
pub const NEGOTIATED_OOB: &[Case] = &[
    (
        b"{\"execute\":\"x\",\"exec-oob\":\"y\"}\n",
        &[
            r#"{"error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}"#,
        ],
    ),
    (
        b"{\"exec-oob\":\"query-version\",\"id\":1}\n",
        &[
            r#"{"id": 1, "error": {"class": "GenericError", "desc": "The command query-version does not support OOB"}}"#,
        ],
    ),
    (
        b"{\"exec-oob\":\"nosuch\",\"id\":1}\n",
        &[
            r#"{"id": 1, "error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}}"#,
        ],
    ),
    (
        b"{\"exec-oob\":\"qmp_capabilities\",\"id\":1}\n",
        &[
            r#"{"id": 1, "error": {"class": "GenericError", "desc": "The command qmp_capabilities does not support OOB"}}"#,
        ],
    ),
    (
        b"{\"exec-oob\":1,\"id\":1}\n",
        &[
            r#"{"id": 1, "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' must be a string"}}"#,
        ],
    ),
    (
        b"{\"execute\":\"query-version\",\"id\":2}\n",
        &[
            r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "P"}, "id": 2}"#,
        ],
    ),
];

/// Runs a session: greeting, `before`, `negotiate`, `after`; returns every normalized
/// line per step, the greeting first.
pub async fn session(path: &Path, negotiate: &[u8], after: &[Case]) -> Vec<Vec<String>> {
    let mut raw = Raw::connect(path).await;
    let mut out = vec![vec![normalize(&raw.line().await.unwrap())]];
    for (input, _) in BEFORE_NEGOTIATION {
        out.push(
            raw.transact(input)
                .await
                .iter()
                .map(|l| normalize(l))
                .collect(),
        );
    }
    raw.send(negotiate).await;
    out.push(vec![raw.line().await.unwrap()]);
    for (input, _) in after {
        out.push(
            raw.transact(input)
                .await
                .iter()
                .map(|l| normalize(l))
                .collect(),
        );
    }
    out
}

/// What [`session`] should return according to the tables.
pub fn expected_session(after: &[Case]) -> Vec<Vec<String>> {
    let lines = |c: &Case| c.1.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut out = vec![vec![
        r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "P"}, "capabilities": ["oob"]}}"#.to_string(),
    ]];
    out.extend(BEFORE_NEGOTIATION.iter().map(lines));
    out.push(vec![r#"{"return": {}, "id": "neg"}"#.to_string()]);
    out.extend(after.iter().map(lines));
    out
}
