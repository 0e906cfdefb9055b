//! Chardev configuration as QMP gives it (ChardevBackend, a simple union of `type` and
//! `data`, for chardev-add and chardev-change) and as `--chardev` gives it (QemuOpts), both
//! turned into one [`ChardevSpec`], with QEMU's checks and texts.

use super::{Backend, ChardevSpec, LogSpec, SocketAddr, SocketSpec, KNOWN_KINDS, NOT_OFFERED};
use crate::cli::parse_bool;
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

/// ChardevBackend from QMP (chardev-add, chardev-change): a simple union, `type` and `data`.
pub fn backend_from_qmp(id: &str, value: Value) -> Result<(Backend, Option<LogSpec>), QmpError> {
    let args: BackendArgs =
        qapi::de::from_value(json!({ "backend": value })).map(|w: BackendWrapper| w.backend)?;
    args.into_backend()
        .map_err(|e| QmpError::generic(format!("Failed to add chardev '{id}': {e}")))
}

#[derive(Deserialize)]
struct BackendWrapper {
    backend: BackendArgs,
}

struct BackendArgs {
    kind: String,
    data: DataArgs,
}

#[derive(Deserialize)]
struct Tag {
    #[serde(rename = "type")]
    kind: Kind,
}

/// ChardevBackendKind, in the order of [`KNOWN_KINDS`].
#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    File,
    Serial,
    Parallel,
    Pipe,
    Socket,
    Udp,
    Pty,
    Null,
    Mux,
    Hub,
    Msmouse,
    Wctablet,
    Braille,
    Testdev,
    Stdio,
    Console,
    Spicevmc,
    Spiceport,
    QemuVdagent,
    Dbus,
    Vc,
    Ringbuf,
    Memory,
}

#[derive(Deserialize)]
struct Data<T> {
    data: T,
}

/// ChardevCommon, the members every backend's data has.
#[derive(Deserialize, Default)]
struct Common {
    logfile: Option<String>,
    logappend: Option<bool>,
}

/// A branch's data, which has the ChardevCommon members besides its own.
trait Branch: serde::de::DeserializeOwned {
    fn take_common(&mut self) -> Common;
}

macro_rules! branches {
    ($($t:ty),*) => {
        $(impl Branch for $t {
            fn take_common(&mut self) -> Common {
                Common {
                    logfile: self.logfile.take(),
                    logappend: self.logappend,
                }
            }
        })*
    };
}

branches!(
    FileArgs,
    HostdevArgs,
    SocketArgs,
    RingbufArgs,
    PtyArgs,
    StdioArgs
);

/// Read the union's `data` as branch `T`, split from its ChardevCommon members.
fn branch<T: Branch>(
    m: &mut qapi::de::Members,
    wrap: fn(T, Common) -> DataArgs,
) -> Result<DataArgs, qapi::de::Error> {
    let mut args = m.take::<Data<T>>()?.data;
    let common = args.take_common();
    Ok(wrap(args, common))
}

#[derive(Deserialize)]
struct FileArgs {
    #[serde(rename = "in")]
    input: Option<String>,
    out: String,
    append: Option<bool>,
    logfile: Option<String>,
    logappend: Option<bool>,
}

#[derive(Deserialize)]
struct HostdevArgs {
    device: String,
    logfile: Option<String>,
    logappend: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct SocketArgs {
    addr: AddrArgs,
    tls_creds: Option<String>,
    tls_authz: Option<String>,
    server: Option<bool>,
    wait: Option<bool>,
    nodelay: Option<bool>,
    telnet: Option<bool>,
    tn3270: Option<bool>,
    websocket: Option<bool>,
    reconnect: Option<i64>,
    reconnect_ms: Option<i64>,
    logfile: Option<String>,
    logappend: Option<bool>,
}

#[derive(Deserialize)]
struct RingbufArgs {
    size: Option<i64>,
    logfile: Option<String>,
    logappend: Option<bool>,
}

#[derive(Deserialize)]
struct PtyArgs {
    path: Option<String>,
    logfile: Option<String>,
    logappend: Option<bool>,
}

#[derive(Deserialize)]
struct StdioArgs {
    signal: Option<bool>,
    logfile: Option<String>,
    logappend: Option<bool>,
}

/// A branch of ChardevBackend, with ChardevCommon.
enum DataArgs {
    File(FileArgs, Common),
    Hostdev(HostdevArgs, Common),
    Socket(SocketArgs, Common),
    Ringbuf(RingbufArgs, Common),
    Pty(PtyArgs, Common),
    Stdio(StdioArgs, Common),
    Common(Common),
    /// A backend blockd does not offer; its data is not looked at.
    Other,
}

impl<'de> Deserialize<'de> for BackendArgs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        qapi::de::union(d, |m| {
            let tag: Tag = m.take()?;
            let data = match tag.kind {
                Kind::File => branch(m, DataArgs::File)?,
                Kind::Serial | Kind::Parallel | Kind::Pipe => branch(m, DataArgs::Hostdev)?,
                Kind::Socket => branch(m, DataArgs::Socket)?,
                Kind::Ringbuf | Kind::Memory => branch(m, DataArgs::Ringbuf)?,
                Kind::Pty => branch(m, DataArgs::Pty)?,
                Kind::Stdio => branch(m, DataArgs::Stdio)?,
                Kind::Null => DataArgs::Common(m.take::<Data<Common>>()?.data),
                _ => {
                    m.take::<Data<Value>>()?;
                    DataArgs::Other
                }
            };
            let kind = KNOWN_KINDS[tag.kind as usize].to_owned();
            Ok(BackendArgs { kind, data })
        })
    }
}

impl BackendArgs {
    fn into_backend(self) -> Result<(Backend, Option<LogSpec>), String> {
        let kind = self.kind.as_str();
        let (backend, common) = match self.data {
            DataArgs::File(args, common) => (
                Backend::File {
                    out: args.out.into(),
                    input: args.input.map(PathBuf::from),
                    append: args.append.unwrap_or(false),
                },
                common,
            ),
            DataArgs::Hostdev(args, common) => match kind {
                "pipe" => (
                    Backend::Pipe {
                        device: args.device.into(),
                    },
                    common,
                ),
                "serial" => (
                    Backend::Serial {
                        device: args.device.into(),
                    },
                    common,
                ),
                _ => return Err(not_offered(kind)),
            },
            DataArgs::Socket(args, common) => (Backend::Socket(args.into_spec()?), common),
            DataArgs::Ringbuf(args, common) => {
                let size = args.size.unwrap_or(65536);
                (
                    Backend::Ringbuf {
                        size: u64::try_from(size).unwrap_or(0),
                        memory: kind == "memory",
                    },
                    common,
                )
            }
            DataArgs::Pty(args, common) => (
                Backend::Pty {
                    link: args.path.map(PathBuf::from),
                },
                common,
            ),
            DataArgs::Stdio(args, common) => {
                if args.signal == Some(false) {
                    return Err(unsupported("signal=off"));
                }
                (Backend::Stdio, common)
            }
            DataArgs::Common(common) => (Backend::Null, common),
            DataArgs::Other => {
                return Err(if NOT_OFFERED.contains(&kind) {
                    not_offered(kind)
                } else {
                    format!("'{kind}' is not a valid char driver name")
                })
            }
        };
        let log = common.logfile.map(|path| LogSpec {
            path: path.into(),
            append: common.logappend.unwrap_or(false),
        });
        Ok((backend, log))
    }
}

impl SocketArgs {
    fn into_spec(self) -> Result<SocketSpec, String> {
        for (name, set) in [
            ("tls-creds", self.tls_creds.is_some()),
            ("tls-authz", self.tls_authz.is_some()),
            ("telnet", self.telnet == Some(true)),
            ("tn3270", self.tn3270 == Some(true)),
            ("websocket", self.websocket == Some(true)),
        ] {
            if set {
                return Err(unsupported(name));
            }
        }
        let server = self.server.unwrap_or(true);
        socket_spec(
            self.addr.into_addr()?,
            server,
            self.wait,
            self.nodelay.unwrap_or(false),
            self.reconnect,
            self.reconnect_ms,
        )
    }
}

/// The checks QEMU makes of a socket chardev's options, shared by QMP and `--chardev`.
fn socket_spec(
    addr: SocketAddr,
    server: bool,
    wait: Option<bool>,
    nodelay: bool,
    reconnect: Option<i64>,
    reconnect_ms: Option<i64>,
) -> Result<SocketSpec, String> {
    if !server && wait.is_some() {
        return Err("'wait' option is incompatible with socket in client connect mode".into());
    }
    if reconnect.is_some() && reconnect_ms.is_some() {
        return Err("'reconnect' and 'reconnect-ms' are mutually exclusive".into());
    }
    let reconnect = match (reconnect, reconnect_ms) {
        (Some(s), _) => u64::try_from(s)
            .ok()
            .map(|s| Duration::from_secs(s.min(1 << 32))),
        (_, Some(ms)) => u64::try_from(ms).ok().map(Duration::from_millis),
        _ => None,
    }
    .filter(|d| !d.is_zero() && !server);
    Ok(SocketSpec {
        addr,
        server,
        wait: server && wait.unwrap_or(false),
        nodelay,
        reconnect,
    })
}

/// SocketAddressLegacy: a simple union, `type` and `data`.
struct AddrArgs {
    addr: Result<SocketAddr, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum AddrKind {
    Unix,
    Inet,
    Vsock,
    Fd,
}

#[derive(Deserialize)]
struct AddrTag {
    #[serde(rename = "type")]
    kind: AddrKind,
}

#[derive(Deserialize)]
struct UnixArgs {
    path: String,
    #[serde(rename = "abstract")]
    abstract_name: Option<bool>,
    tight: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct InetArgs {
    host: String,
    port: String,
    numeric: Option<bool>,
    to: Option<u16>,
    ipv4: Option<bool>,
    ipv6: Option<bool>,
    keep_alive: Option<bool>,
    keep_alive_count: Option<u32>,
    keep_alive_idle: Option<u32>,
    keep_alive_interval: Option<u32>,
    mptcp: Option<bool>,
}

impl<'de> Deserialize<'de> for AddrArgs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        qapi::de::union(d, |m| {
            let tag: AddrTag = m.take()?;
            let addr = match tag.kind {
                AddrKind::Unix => {
                    let u = m.take::<Data<UnixArgs>>()?.data;
                    Ok(SocketAddr::Unix {
                        path: u.path.into(),
                        abstract_name: u.abstract_name.unwrap_or(false),
                        tight: u.tight.unwrap_or(true),
                    })
                }
                AddrKind::Inet => {
                    let i = m.take::<Data<InetArgs>>()?.data;
                    let extra = [
                        ("numeric", i.numeric.is_some()),
                        ("to", i.to.is_some()),
                        ("ipv4", i.ipv4.is_some()),
                        ("ipv6", i.ipv6.is_some()),
                        ("keep-alive", i.keep_alive.is_some()),
                        ("keep-alive-count", i.keep_alive_count.is_some()),
                        ("keep-alive-idle", i.keep_alive_idle.is_some()),
                        ("keep-alive-interval", i.keep_alive_interval.is_some()),
                        ("mptcp", i.mptcp.is_some()),
                    ]
                    .into_iter()
                    .find(|(_, set)| *set);
                    match extra {
                        Some((name, _)) => Err(unsupported(name)),
                        None => Ok(SocketAddr::Inet {
                            host: i.host,
                            port: i.port,
                        }),
                    }
                }
                AddrKind::Vsock => {
                    m.take::<Data<Value>>()?;
                    Err("vsock sockets are not supported by blockd".into())
                }
                AddrKind::Fd => {
                    m.take::<Data<Value>>()?;
                    Err("only QEMU supports file descriptor passing".into())
                }
            };
            Ok(AddrArgs { addr })
        })
    }
}

impl AddrArgs {
    fn into_addr(self) -> Result<SocketAddr, String> {
        self.addr
    }
}

fn unsupported(option: &str) -> String {
    format!("chardev option '{option}' is not supported by blockd")
}

fn not_offered(kind: &str) -> String {
    format!("chardev backend '{kind}' is not supported by blockd")
}

/// Whether blockd's `backend` does something with QemuOpts option `name`, if only refuse a
/// value it does not carry out (QEMU ignores the options of other backends; blockd refuses
/// them rather than accept what it ignores).
fn option_used(backend: &str, name: &str) -> bool {
    let specific: &[&str] = match backend {
        "socket" => &[
            "path",
            "host",
            "port",
            "server",
            "wait",
            "nodelay",
            "reconnect",
            "reconnect-ms",
            "abstract",
            "tight",
            "telnet",
            "tn3270",
            "websocket",
            "tls-creds",
            "tls-authz",
            "fd",
            "to",
            "ipv4",
            "ipv6",
        ],
        "ringbuf" | "memory" => &["size"],
        "file" => &["path", "input-path", "append"],
        "pipe" | "serial" | "pty" => &["path"],
        "stdio" => &["signal"],
        _ => &[],
    };
    ["backend", "logfile", "logappend", "mux"].contains(&name) || specific.contains(&name)
}

/// `--chardev` in QemuOpts form (already split and checked against QEMU's option names)
/// to the same spec QMP gives.
pub fn spec_from_opts(
    id: String,
    backend: &str,
    values: &[(&str, &str)],
) -> Result<ChardevSpec, String> {
    if let Some((name, _)) = values.iter().find(|(n, _)| !option_used(backend, n)) {
        return Err(format!(
            "Parameter '{name}' is not supported by blockd for chardev backend '{backend}'"
        ));
    }
    let get = |name: &str| {
        values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_string())
    };
    let flag = |name: &str| get(name).and_then(|v| parse_bool(&v));
    let number = |name: &str| -> Result<Option<i64>, String> {
        get(name)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| format!("Parameter '{name}' expects a number"))
            })
            .transpose()
    };
    if flag("mux") == Some(true) {
        return Err(unsupported("mux"));
    }
    let path = get("path");
    let backend = match backend {
        "socket" => {
            for name in ["tls-creds", "tls-authz", "fd", "to", "ipv4", "ipv6"] {
                if get(name).is_some() {
                    return Err(unsupported(name));
                }
            }
            for name in ["telnet", "tn3270", "websocket"] {
                if flag(name) == Some(true) {
                    return Err(unsupported(name));
                }
            }
            let (host, port) = (get("host"), get("port"));
            if [path.is_some(), get("fd").is_some(), host.is_some()]
                .iter()
                .filter(|set| **set)
                .count()
                > 1
            {
                return Err("None or one of 'path', 'fd' or 'host' option required.".into());
            }
            let addr = match (path, host, port) {
                (Some(path), _, _) => SocketAddr::Unix {
                    path: path.into(),
                    abstract_name: flag("abstract").unwrap_or(false),
                    tight: flag("tight").unwrap_or(true),
                },
                (None, Some(_), None) => return Err("chardev: socket: no port given".into()),
                (None, host, Some(port)) => SocketAddr::Inet {
                    host: host.unwrap_or_default(),
                    port,
                },
                // qsd listens on some default address here; blockd asks for one.
                _ => return Err("chardev: socket: 'path' or 'host' and 'port' required".into()),
            };
            // On the command line a server waits for its first client unless told not to.
            let server = flag("server").unwrap_or(false);
            let wait = match flag("wait") {
                None if server => Some(true),
                wait => wait,
            };
            Backend::Socket(socket_spec(
                addr,
                server,
                wait,
                flag("nodelay").unwrap_or(false),
                number("reconnect")?,
                number("reconnect-ms")?,
            )?)
        }
        "ringbuf" | "memory" => Backend::Ringbuf {
            size: match get("size") {
                Some(size) => {
                    qapi::de::from_keyval::<qapi::de::Size>(Value::String(size))
                        .map_err(|_| {
                            "Parameter 'size' expects a non-negative number below 2^64".to_owned()
                        })?
                        .0
                }
                None => 65536,
            },
            memory: backend == "memory",
        },
        "file" => Backend::File {
            out: path
                .ok_or_else(|| "chardev: file: no filename given".to_owned())?
                .into(),
            input: get("input-path").map(PathBuf::from),
            append: flag("append").unwrap_or(false),
        },
        "null" => Backend::Null,
        "pipe" | "serial" => {
            let name = if backend == "serial" {
                "serial/tty"
            } else {
                backend
            };
            let device: PathBuf = path
                .ok_or_else(|| format!("chardev: {name}: no device path given"))?
                .into();
            if backend == "pipe" {
                Backend::Pipe { device }
            } else {
                Backend::Serial { device }
            }
        }
        "stdio" => {
            if flag("signal") == Some(false) {
                return Err(unsupported("signal=off"));
            }
            Backend::Stdio
        }
        "pty" => Backend::Pty {
            link: path.map(PathBuf::from),
        },
        other if NOT_OFFERED.contains(&other) || KNOWN_KINDS.contains(&other) => {
            return Err(not_offered(other))
        }
        other => return Err(format!("'{other}' is not a valid char driver name")),
    };
    let log = get("logfile").map(|path| LogSpec {
        path: path.into(),
        append: flag("logappend").unwrap_or(false),
    });
    Ok(ChardevSpec { id, backend, log })
}
