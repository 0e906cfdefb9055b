//! qemu-storage-daemon compatible command line, plus blockd's `serve` shortcut.
//!
//! Like qsd, parsing runs in two passes. The first walks the words as getopt_long does
//! (abbreviated long options, `--opt=value`, bundled short options, `--` ends the options)
//! and stops at the first unknown option, missing argument, `-h` or `-V`, so `-V` wins over a
//! bad `--blockdev` but not over an earlier unknown option. The second pass reads the option
//! arguments in order and keeps the order of the items, which the daemon applies one by one.
//! Errors carry their origin (the words as typed) so that they print as qsd's do:
//! `blockd: --blockdev driver=nope: Parameter 'driver' does not accept value 'nope'`.
//!
//! Hand-written rather than clap: qsd's interface is getopt's, with its abbreviations, its
//! exact error texts and its "first error or -h/-V wins" order, and the items are a single
//! ordered list of heterogeneous options whose arguments are parsed with QEMU's own syntaxes
//! (keyval, JSON, QemuOpts); clap would only do the word splitting, and differently.

pub use crate::chardev::ChardevSpec;
use qapi::keyval;
use serde_json::{Map, Value};
use std::fmt;
use std::path::PathBuf;

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Invocation {
    /// Run the daemon with qsd-style options.
    Run(DaemonArgs),
    /// `blockd serve IMAGE ...`.
    Serve(ServeArgs),
    /// Print this text to stdout and exit 0.
    Help(String),
    /// Print this text to stdout and exit 0.
    Version(String),
}

/// The qsd-style options.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DaemonArgs {
    /// `--blockdev`, `--chardev`, `--monitor`, `--nbd-server`, `--export` and `--object`,
    /// in command-line order.
    pub items: Vec<Located<CliItem>>,
    /// `--pidfile`: the last one given.
    pub pidfile: Option<PathBuf>,
    pub daemonize: bool,
    /// `--io-threads` (blockd only); `None` means one per CPU.
    pub io_threads: Option<usize>,
    /// `--metrics HOST:PORT` (blockd only): where Prometheus scrapes; the last one given.
    pub metrics: Option<String>,
    /// `-T`/`--trace` arguments, in order, unparsed.
    pub trace: Vec<String>,
}

/// An item with the words it came from, for error messages in qsd's form.
#[derive(Debug, Clone, PartialEq)]
pub struct Located<T> {
    /// The option as typed: `--blockdev driver=x` or `--blockdev=driver=x`.
    pub origin: String,
    pub item: T,
}

impl<T> Located<T> {
    /// An error found while applying this item (unknown chardev, bad driver, ...).
    pub fn error(&self, message: impl fmt::Display) -> CliError {
        CliError {
            origin: Some(self.origin.clone()),
            message: message.to_string(),
        }
    }
}

/// One ordered configuration item.
#[derive(Debug, Clone, PartialEq)]
pub enum CliItem {
    /// `blockdev-add` arguments.
    Blockdev(QapiArgs),
    Chardev(ChardevSpec),
    Monitor(Monitor),
    /// `nbd-server-start` arguments.
    NbdServer(QapiArgs),
    /// `block-export-add` arguments.
    Export(QapiArgs),
    /// `object-add` arguments (`qom-type`, `id`, properties).
    Object(QapiArgs),
}

/// How an option argument was written; it decides how its scalars must be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// `key=value,...`: every scalar is a string, converted to the type the schema expects
    /// (`on` for true, `512` for 512, ...).
    Keyval,
    /// A JSON object: scalars must already have the schema's type.
    Json,
}

/// The arguments of a QMP command given on the command line.
#[derive(Debug, Clone, PartialEq)]
pub struct QapiArgs {
    pub syntax: Syntax,
    pub args: Map<String, Value>,
}

/// A `--monitor`: QMP on a chardev. QEMU accepts an `id` but uses it for nothing, and
/// qsd refuses `mode=readline`; so only the chardev and `pretty` remain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Monitor {
    pub chardev: String,
    pub pretty: bool,
}

/// `blockd serve IMAGE [--qmp PATH] [--nbd PATH] [--io-threads N]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeArgs {
    pub image: PathBuf,
    /// QMP socket, default `./blockd.qmp`.
    pub qmp: PathBuf,
    /// NBD socket, default `./blockd.nbd`.
    pub nbd: PathBuf,
    pub io_threads: Option<usize>,
}

/// A bad command line; `Display` is the one-line message, without the program name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    /// The words the error is about, as typed (`--blockdev foo`), when there are some.
    pub origin: Option<String>,
    pub message: String,
}

impl CliError {
    fn plain(message: impl Into<String>) -> Self {
        Self {
            origin: None,
            message: message.into(),
        }
    }

    fn at(origin: &str, message: impl Into<String>) -> Self {
        Self {
            origin: Some(origin.to_owned()),
            message: message.into(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Some(origin) => write!(f, "{origin}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for CliError {}

/// Parse the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Invocation, CliError> {
    let mut args: Vec<String> = args.into_iter().collect();
    if args.first().map(String::as_str) == Some("serve") {
        args.remove(0);
        return parse_serve(args);
    }
    let tokens = match scan(args, DAEMON_OPTIONS)? {
        Scanned::Tokens(tokens) => tokens,
        Scanned::Help => return Ok(Invocation::Help(help_text())),
        Scanned::Version => return Ok(Invocation::Version(version_text())),
    };
    let mut out = DaemonArgs::default();
    for token in tokens {
        let (opt, origin, arg) = match token {
            Token::Positional(word) => return Err(CliError::at(&word, "Unexpected argument")),
            Token::Opt { opt, origin, arg } => (opt, origin, arg.unwrap_or_default()),
        };
        let at = |message: String| CliError::at(&origin, message);
        let item = match opt {
            Opt::Blockdev => CliItem::Blockdev(parse_qapi(&arg, Some("driver")).map_err(at)?),
            Opt::Chardev => match parse_chardev(&arg).map_err(at)? {
                Some(chardev) => CliItem::Chardev(chardev),
                None => return Ok(Invocation::Help(CHARDEV_HELP.to_owned())),
            },
            Opt::Monitor => CliItem::Monitor(parse_monitor(&arg).map_err(at)?),
            Opt::NbdServer => CliItem::NbdServer(parse_qapi(&arg, None).map_err(at)?),
            Opt::Export => CliItem::Export(parse_qapi(&arg, Some("type")).map_err(at)?),
            Opt::Object => CliItem::Object(parse_qapi(&arg, Some("qom-type")).map_err(at)?),
            Opt::Pidfile => {
                out.pidfile = Some(PathBuf::from(arg));
                continue;
            }
            Opt::Daemonize => {
                out.daemonize = true;
                continue;
            }
            Opt::IoThreads => {
                out.io_threads = Some(parse_io_threads(&arg).map_err(at)?);
                continue;
            }
            Opt::Metrics => {
                out.metrics = Some(parse_metrics(&arg).map_err(at)?);
                continue;
            }
            Opt::Trace => {
                out.trace.push(arg);
                continue;
            }
            Opt::Help | Opt::Version | Opt::Qmp | Opt::Nbd => {
                unreachable!("the scanner handles -h/-V and only serve has --qmp/--nbd")
            }
        };
        out.items.push(Located { origin, item });
    }
    Ok(Invocation::Run(out))
}

fn parse_serve(args: Vec<String>) -> Result<Invocation, CliError> {
    let tokens = match scan(args, SERVE_OPTIONS)? {
        Scanned::Tokens(tokens) => tokens,
        Scanned::Help => return Ok(Invocation::Help(help_text())),
        Scanned::Version => return Ok(Invocation::Version(version_text())),
    };
    let mut image = None;
    let mut serve = ServeArgs {
        image: PathBuf::new(),
        qmp: PathBuf::from("./blockd.qmp"),
        nbd: PathBuf::from("./blockd.nbd"),
        io_threads: None,
    };
    for token in tokens {
        match token {
            Token::Positional(word) if image.is_none() => image = Some(PathBuf::from(word)),
            Token::Positional(word) => return Err(CliError::at(&word, "Unexpected argument")),
            Token::Opt { opt, origin, arg } => {
                let arg = arg.unwrap_or_default();
                match opt {
                    Opt::Qmp => serve.qmp = PathBuf::from(arg),
                    Opt::Nbd => serve.nbd = PathBuf::from(arg),
                    Opt::IoThreads => {
                        serve.io_threads =
                            Some(parse_io_threads(&arg).map_err(|e| CliError::at(&origin, e))?)
                    }
                    _ => unreachable!("SERVE_OPTIONS has no other option taking part here"),
                }
            }
        }
    }
    serve.image = image.ok_or_else(|| CliError::at("serve", "missing IMAGE argument"))?;
    Ok(Invocation::Serve(serve))
}

/// `HOST:PORT` (an IPv6 host in brackets); the host is resolved when the daemon binds.
fn parse_metrics(arg: &str) -> Result<String, String> {
    match arg.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(arg.to_owned()),
        _ => Err(format!(
            "'{arg}' is not HOST:PORT (for example 127.0.0.1:9184)"
        )),
    }
}

fn parse_io_threads(arg: &str) -> Result<usize, String> {
    match arg.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("the number of I/O threads must be a positive integer".into()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opt {
    Help,
    Version,
    Trace,
    Blockdev,
    Chardev,
    Daemonize,
    Export,
    IoThreads,
    Metrics,
    Monitor,
    NbdServer,
    Object,
    Pidfile,
    Qmp,
    Nbd,
}

struct OptSpec {
    long: &'static str,
    short: Option<char>,
    takes_arg: bool,
    opt: Opt,
}

const fn spec(long: &'static str, short: Option<char>, takes_arg: bool, opt: Opt) -> OptSpec {
    OptSpec {
        long,
        short,
        takes_arg,
        opt,
    }
}

const DAEMON_OPTIONS: &[OptSpec] = &[
    spec("help", Some('h'), false, Opt::Help),
    spec("version", Some('V'), false, Opt::Version),
    spec("trace", Some('T'), true, Opt::Trace),
    spec("blockdev", None, true, Opt::Blockdev),
    spec("chardev", None, true, Opt::Chardev),
    spec("daemonize", None, false, Opt::Daemonize),
    spec("export", None, true, Opt::Export),
    spec("io-threads", None, true, Opt::IoThreads),
    spec("metrics", None, true, Opt::Metrics),
    spec("monitor", None, true, Opt::Monitor),
    spec("nbd-server", None, true, Opt::NbdServer),
    spec("object", None, true, Opt::Object),
    spec("pidfile", None, true, Opt::Pidfile),
];

const SERVE_OPTIONS: &[OptSpec] = &[
    spec("help", Some('h'), false, Opt::Help),
    spec("qmp", None, true, Opt::Qmp),
    spec("nbd", None, true, Opt::Nbd),
    spec("io-threads", None, true, Opt::IoThreads),
];

#[derive(Debug)]
enum Token {
    Opt {
        opt: Opt,
        origin: String,
        arg: Option<String>,
    },
    Positional(String),
}

enum Scanned {
    Tokens(Vec<Token>),
    Help,
    Version,
}

/// The first pass: split the words into options and positional words like getopt_long,
/// stopping at the first error, `-h` or `-V`. Words after `--` are ignored, as qsd does.
fn scan(args: Vec<String>, specs: &[OptSpec]) -> Result<Scanned, CliError> {
    let mut tokens = Vec::new();
    let mut words = args.into_iter();
    while let Some(word) = words.next() {
        let mut found = Vec::new();
        if word == "--" {
            break;
        } else if let Some(long) = word.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((name, value)) => (name, Some(value.to_owned())),
                None => (long, None),
            };
            let spec = find_long(specs, name, &word)?;
            let (origin, arg) = match (spec.takes_arg, inline) {
                (true, Some(value)) => (word.clone(), Some(value)),
                (true, None) => match words.next() {
                    Some(value) => (format!("{word} {value}"), Some(value)),
                    None => {
                        return Err(CliError::plain(format!(
                            "option '--{}' requires an argument",
                            spec.long
                        )))
                    }
                },
                (false, Some(_)) => {
                    return Err(CliError::plain(format!(
                        "option '--{}' doesn't allow an argument",
                        spec.long
                    )))
                }
                (false, None) => (word.clone(), None),
            };
            found.push((spec.opt, origin, arg));
        } else if word.len() > 1 && word.starts_with('-') {
            let cluster = &word[1..];
            for (at, letter) in cluster.char_indices() {
                let spec = specs
                    .iter()
                    .find(|s| s.short == Some(letter))
                    .ok_or_else(|| CliError::plain(format!("invalid option -- '{letter}'")))?;
                if !spec.takes_arg {
                    found.push((spec.opt, format!("-{letter}"), None));
                    continue;
                }
                let attached = &cluster[at + letter.len_utf8()..];
                let (origin, arg) = if !attached.is_empty() {
                    (word.clone(), attached.to_owned())
                } else if let Some(value) = words.next() {
                    (format!("{word} {value}"), value)
                } else {
                    return Err(CliError::plain(format!(
                        "option requires an argument -- '{letter}'"
                    )));
                };
                found.push((spec.opt, origin, Some(arg)));
                break;
            }
        } else {
            tokens.push(Token::Positional(word));
            continue;
        }
        for (opt, origin, arg) in found {
            match opt {
                Opt::Help => return Ok(Scanned::Help),
                Opt::Version => return Ok(Scanned::Version),
                _ => tokens.push(Token::Opt { opt, origin, arg }),
            }
        }
    }
    Ok(Scanned::Tokens(tokens))
}

/// The option `name` names exactly or as the unambiguous start of one.
fn find_long<'a>(specs: &'a [OptSpec], name: &str, word: &str) -> Result<&'a OptSpec, CliError> {
    if let Some(exact) = specs.iter().find(|s| s.long == name) {
        return Ok(exact);
    }
    let candidates: Vec<&OptSpec> = if name.is_empty() {
        Vec::new()
    } else {
        specs.iter().filter(|s| s.long.starts_with(name)).collect()
    };
    match candidates.as_slice() {
        [] => Err(CliError::plain(format!("unrecognized option '{word}'"))),
        [only] => Ok(only),
        several => {
            let names: Vec<String> = several.iter().map(|s| format!("'--{}'", s.long)).collect();
            Err(CliError::plain(format!(
                "option '--{name}' is ambiguous; possibilities: {}",
                names.join(" ")
            )))
        }
    }
}

/// A QAPI-typed option argument: a JSON object when it starts with `{`, else keyval.
fn parse_qapi(arg: &str, implied_key: Option<&str>) -> Result<QapiArgs, String> {
    if arg.starts_with('{') {
        return Ok(QapiArgs {
            syntax: Syntax::Json,
            args: parse_json_object(arg)?,
        });
    }
    let args = keyval::parse(arg, implied_key).map_err(|e| e.to_string())?;
    Ok(QapiArgs {
        syntax: Syntax::Keyval,
        args,
    })
}

/// One JSON object and nothing after it. The texts follow QEMU's JSON parser where serde's
/// error kinds allow; QEMU's own wording for other syntax errors is not reproduced.
fn parse_json_object(arg: &str) -> Result<Map<String, Value>, String> {
    let mut stream = serde_json::Deserializer::from_str(arg).into_iter::<Value>();
    let value = match stream.next() {
        Some(Ok(value)) => value,
        Some(Err(e)) if e.is_eof() => return Err("JSON parse error, premature EOI".into()),
        Some(Err(e)) => {
            let text = e.to_string();
            let reason = text.split(" at line ").next().unwrap_or(&text);
            let reason = reason.replace("expected value", "expecting value");
            return Err(format!("JSON parse error, {reason}"));
        }
        None => return Err("JSON parse error, premature EOI".into()),
    };
    if !arg[stream.byte_offset()..].trim_start().is_empty() {
        return Err("Expecting at most one JSON value".into());
    }
    match value {
        Value::Object(map) => Ok(map),
        _ => Err("JSON parse error, expecting an object".into()),
    }
}

/// `--monitor [chardev=]name[,mode=control][,pretty=on|off][,id=...]` or a JSON object,
/// read in the order of QEMU's MonitorOptions so that the first error is the same.
fn parse_monitor(arg: &str) -> Result<Monitor, String> {
    let QapiArgs { syntax, args } = parse_qapi(arg, Some("chardev"))?;
    member_str(&args, "id", syntax)?;
    let readline = match member_str(&args, "mode", syntax)?.as_deref() {
        None | Some("control") => false,
        Some("readline") => true,
        Some(other) => return Err(format!("Parameter 'mode' does not accept value '{other}'")),
    };
    let pretty = member_bool(&args, "pretty", syntax)?.unwrap_or(false);
    let chardev = member_str(&args, "chardev", syntax)?
        .ok_or_else(|| "Parameter 'chardev' is missing".to_owned())?;
    if let Some(key) = args
        .keys()
        .find(|k| !["id", "mode", "pretty", "chardev"].contains(&k.as_str()))
    {
        return Err(format!("Parameter '{key}' is unexpected"));
    }
    if readline {
        return Err("Only QMP is supported".into());
    }
    Ok(Monitor { chardev, pretty })
}

fn member_str(
    args: &Map<String, Value>,
    name: &str,
    syntax: Syntax,
) -> Result<Option<String>, String> {
    match args.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(wrong_type(name, other, syntax, "string")),
    }
}

fn member_bool(
    args: &Map<String, Value>,
    name: &str,
    syntax: Syntax,
) -> Result<Option<bool>, String> {
    match (args.get(name), syntax) {
        (None, _) => Ok(None),
        (Some(Value::Bool(b)), Syntax::Json) => Ok(Some(*b)),
        (Some(Value::String(s)), Syntax::Keyval) => parse_bool(s)
            .map(Some)
            .ok_or_else(|| format!("Parameter '{name}' expects 'on' or 'off'")),
        (Some(other), _) => Err(wrong_type(name, other, syntax, "boolean")),
    }
}

fn wrong_type(name: &str, value: &Value, syntax: Syntax, expected: &str) -> String {
    match (syntax, value) {
        (Syntax::Keyval, Value::Object(_) | Value::Array(_)) => {
            format!("Parameters '{name}.*' are unexpected")
        }
        _ => format!("Invalid parameter type for '{name}', expected: {expected}"),
    }
}

/// QEMU's spellings of a boolean on the command line.
pub(crate) fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

const CHARDEV_HELP: &str = "Available chardev backend types: \n  file\n  memory\n  null\n  pipe\n  pty\n  ringbuf\n  serial\n  socket\n  stdio\n";

/// Every backend QEMU knows; the others are not valid driver names.
const QEMU_CHARDEV_BACKENDS: &[&str] = &[
    "pty", "file", "udp", "memory", "stdio", "socket", "ringbuf", "null", "parallel", "pipe",
    "mux", "serial", "hub",
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChardevOptType {
    Str,
    Bool,
    Number,
    Size,
}

/// QEMU's chardev options (all backends share one list) and their types.
const QEMU_CHARDEV_OPTIONS: &[(&str, ChardevOptType)] = {
    use ChardevOptType::{Bool, Number, Size, Str};
    &[
        ("abstract", Bool),
        ("append", Bool),
        ("backend", Str),
        ("chardev", Str),
        ("chardevs.0", Str),
        ("chardevs.1", Str),
        ("chardevs.2", Str),
        ("chardevs.3", Str),
        ("clipboard", Bool),
        ("cols", Number),
        ("debug", Number),
        ("delay", Bool),
        ("fd", Str),
        ("height", Number),
        ("host", Str),
        ("input-path", Str),
        ("ipv4", Bool),
        ("ipv6", Bool),
        ("localaddr", Str),
        ("localport", Str),
        ("logappend", Bool),
        ("logfile", Str),
        ("mouse", Bool),
        ("mux", Bool),
        ("name", Str),
        ("nodelay", Bool),
        ("path", Str),
        ("port", Str),
        ("reconnect-ms", Number),
        ("reconnect", Number),
        ("rows", Number),
        ("server", Bool),
        ("signal", Bool),
        ("size", Size),
        ("telnet", Bool),
        ("tight", Bool),
        ("tls-authz", Str),
        ("tls-creds", Str),
        ("tn3270", Bool),
        ("to", Number),
        ("wait", Bool),
        ("websocket", Bool),
        ("width", Number),
    ]
};

/// The socket options blockd implements; the other QEMU options are refused.
/// `--chardev` in QemuOpts syntax: `backend,id=...,key=value,...` where a bare first
/// element is the backend, `,,` escapes a comma in values, a bare `name`/`noname` means
/// `name=on`/`name=off` (deprecated), `id` keeps its first value and other keys their last.
/// `None` for `--chardev help`.
fn parse_chardev(arg: &str) -> Result<Option<ChardevSpec>, String> {
    if arg == "help" || arg == "?" {
        return Ok(None);
    }
    let opts = split_qemu_opts(arg, "backend");
    let id = opts.iter().find(|(k, _)| k == "id").map(|(_, v)| v.clone());
    if let Some(id) = &id {
        if !is_qemu_identifier(id) {
            return Err("Parameter 'id' expects an identifier".into());
        }
    }
    let mut values: Vec<(&str, &str)> = Vec::new();
    for (key, value) in opts.iter().filter(|(k, _)| k != "id") {
        let Some(&(name, kind)) = QEMU_CHARDEV_OPTIONS.iter().find(|(n, _)| n == key) else {
            return Err(format!("Invalid parameter '{key}'"));
        };
        match kind {
            ChardevOptType::Bool if parse_bool(value).is_none() => {
                return Err(format!("Parameter '{name}' expects 'on' or 'off'"));
            }
            ChardevOptType::Number if !is_qemu_number(value) => {
                return Err(format!("Parameter '{name}' expects a number"));
            }
            _ => {}
        }
        values.retain(|(n, _)| *n != name);
        values.push((name, value.as_str()));
    }
    let get = |name: &str| values.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    let id = id.ok_or_else(|| "chardev: no id specified".to_owned())?;
    let backend = get("backend").ok_or_else(|| format!("chardev: \"{id}\" missing backend"))?;
    if !QEMU_CHARDEV_BACKENDS.contains(&backend) {
        return Err(format!("'{backend}' is not a valid char driver name"));
    }
    crate::chardev::spec_from_opts(id, backend, &values).map(Some)
}

/// Split QemuOpts syntax into (key, value) pairs in order. A first element without `=` is
/// the value of `implied`; other elements without `=` are deprecated short-form booleans.
fn split_qemu_opts(arg: &str, implied: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = arg;
    let mut first = true;
    while !rest.is_empty() {
        let name_len = rest.find(['=', ',']).unwrap_or(rest.len());
        let has_value = rest[name_len..].starts_with('=');
        if first && !has_value {
            let (value, after) = take_opts_value(rest);
            out.push((implied.to_owned(), value));
            rest = after;
        } else if has_value {
            let name = rest[..name_len].to_owned();
            let (value, after) = take_opts_value(&rest[name_len + 1..]);
            out.push((name, value));
            rest = after;
        } else {
            let word = &rest[..name_len];
            let known = QEMU_CHARDEV_OPTIONS.iter().any(|(n, _)| *n == word);
            let (name, value) = match word.strip_prefix("no") {
                Some(negated) if !known => (negated, "off"),
                _ => (word, "on"),
            };
            tracing::warn!(
                "short-form boolean option '{word}' deprecated; please use {name}={value} instead"
            );
            out.push((name.to_owned(), value.to_owned()));
            rest = rest[name_len..]
                .strip_prefix(',')
                .unwrap_or(&rest[name_len..]);
        }
        first = false;
    }
    out
}

/// A QemuOpts value up to the next lone `,` (`,,` is a comma), and the input after it.
fn take_opts_value(input: &str) -> (String, &str) {
    let mut value = String::new();
    let mut chars = input.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        if c == ',' {
            if chars.peek().map(|&(_, c)| c) == Some(',') {
                chars.next();
            } else {
                return (value, &input[at + 1..]);
            }
        }
        value.push(c);
    }
    (value, "")
}

/// QEMU's identifiers: a letter, then letters, digits, `-`, `.` and `_`.
fn is_qemu_identifier(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// A QemuOpts number: decimal, `0x` hexadecimal or `0` octal, without sign.
fn is_qemu_number(s: &str) -> bool {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).is_ok();
    }
    if s.len() > 1 && s.starts_with('0') {
        return u64::from_str_radix(&s[1..], 8).is_ok();
    }
    s.parse::<u64>().is_ok()
}

fn version_text() -> String {
    format!(
        "blockd version {}\nA qemu-storage-daemon compatible storage daemon\n",
        env!("CARGO_PKG_VERSION")
    )
}

fn help_text() -> String {
    "\
Usage: blockd [options]
       blockd serve IMAGE [--qmp PATH] [--nbd PATH] [--io-threads N]
blockd, a qemu-storage-daemon compatible storage daemon

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend

  --chardev socket,id=<id>,path=<path>[,server=on|off][,wait=on|off]
  --chardev socket,id=<id>,host=<host>,port=<port>[,server=on|off][,wait=on|off]
                         configure a character device backend

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --io-threads <n>       number of I/O threads (default: one per CPU)

  --metrics <host>:<port>
                         serve Prometheus metrics at http://<host>:<port>/metrics
                         (nodes, exports, jobs, the process)

  --monitor [chardev=]name[,mode=control][,pretty=on|off]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>[,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --object <type>[,<property>=<value>...]
                         create a new object of type <type>, setting
                         properties in the order they are specified. Note
                         that the 'id' property must be set.

  --pidfile <path>       write process ID to a file after startup

Options taking key=value lists also take a JSON object: --blockdev '{\"driver\": ...}'.
Options are applied in the order given.

  serve IMAGE            serve IMAGE over NBD, with a QMP monitor
    --qmp <path>         QMP socket (default ./blockd.qmp)
    --nbd <path>         NBD socket (default ./blockd.nbd)
    --io-threads <n>     number of I/O threads (default: one per CPU)
"
    .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chardev::{Backend, SocketAddr, SocketSpec};
    use serde_json::json;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    fn run(words: &[&str]) -> DaemonArgs {
        match parse(args(words)) {
            Ok(Invocation::Run(run)) => run,
            other => panic!("{words:?}: expected Run, got {other:?}"),
        }
    }

    fn error(words: &[&str]) -> String {
        match parse(args(words)) {
            Err(e) => e.to_string(),
            Ok(other) => panic!("{words:?}: expected an error, got {other:?}"),
        }
    }

    fn keyval(value: Value) -> QapiArgs {
        let Value::Object(args) = value else {
            panic!("not an object")
        };
        QapiArgs {
            syntax: Syntax::Keyval,
            args,
        }
    }

    fn json_args(value: Value) -> QapiArgs {
        QapiArgs {
            syntax: Syntax::Json,
            ..keyval(value)
        }
    }

    fn socket(id: &str, addr: SocketAddr, server: bool, wait: bool) -> CliItem {
        CliItem::Chardev(ChardevSpec {
            id: id.into(),
            backend: Backend::Socket(SocketSpec {
                addr,
                server,
                wait,
                nodelay: false,
                reconnect: None,
            }),
            log: None,
        })
    }

    fn unix(id: &str, path: &str, server: bool, wait: bool) -> CliItem {
        let addr = SocketAddr::Unix {
            path: path.into(),
            abstract_name: false,
            tight: true,
        };
        socket(id, addr, server, wait)
    }

    fn monitor(chardev: &str, pretty: bool) -> CliItem {
        CliItem::Monitor(Monitor {
            chardev: chardev.into(),
            pretty,
        })
    }

    /// A command line and the items it gives, each with its origin.
    type ItemCase<'a> = (Vec<&'a str>, Vec<(&'a str, CliItem)>);

    #[test]
    fn command_lines_to_items() {
        let cases: Vec<ItemCase> = vec![
            (
                vec!["--blockdev", "null-co,node-name=n0"],
                vec![(
                    "--blockdev null-co,node-name=n0",
                    CliItem::Blockdev(keyval(json!({"driver": "null-co", "node-name": "n0"}))),
                )],
            ),
            (
                vec!["--blockdev=driver=file,filename=a,,b.img,node-name=f"],
                vec![(
                    "--blockdev=driver=file,filename=a,,b.img,node-name=f",
                    CliItem::Blockdev(keyval(
                        json!({"driver": "file", "filename": "a,b.img", "node-name": "f"}),
                    )),
                )],
            ),
            (
                vec!["--blockd", "qcow2,file.driver=file,file.filename=x"],
                vec![(
                    "--blockd qcow2,file.driver=file,file.filename=x",
                    CliItem::Blockdev(keyval(
                        json!({"driver": "qcow2", "file": {"driver": "file", "filename": "x"}}),
                    )),
                )],
            ),
            (
                vec![
                    "--blockdev",
                    r#"{"driver":"null-co","size":1024,"node-name":"n"}"#,
                ],
                vec![(
                    r#"--blockdev {"driver":"null-co","size":1024,"node-name":"n"}"#,
                    CliItem::Blockdev(json_args(
                        json!({"driver": "null-co", "size": 1024, "node-name": "n"}),
                    )),
                )],
            ),
            (
                vec![
                    "--chardev",
                    "socket,id=m0,path=/run/q.sock,server=on,wait=off",
                    "--monitor",
                    "chardev=m0",
                    "--monitor=m0,pretty=on,mode=control,id=mon1",
                ],
                vec![
                    (
                        "--chardev socket,id=m0,path=/run/q.sock,server=on,wait=off",
                        unix("m0", "/run/q.sock", true, false),
                    ),
                    ("--monitor chardev=m0", monitor("m0", false)),
                    (
                        "--monitor=m0,pretty=on,mode=control,id=mon1",
                        monitor("m0", true),
                    ),
                ],
            ),
            (
                vec!["--monitor", r#"{"chardev":"m0","pretty":true}"#],
                vec![(
                    r#"--monitor {"chardev":"m0","pretty":true}"#,
                    monitor("m0", true),
                )],
            ),
            (
                vec![
                    "--chardev",
                    "id=t,backend=socket,host=127.0.0.1,port=4444,server=yes",
                ],
                vec![(
                    "--chardev id=t,backend=socket,host=127.0.0.1,port=4444,server=yes",
                    socket(
                        "t",
                        SocketAddr::Inet {
                            host: "127.0.0.1".into(),
                            port: "4444".into(),
                        },
                        true,
                        true,
                    ),
                )],
            ),
            (
                vec![
                    "--chardev",
                    "socket,id=m0,id=m1,path=a,,b,path=c,server,nowait",
                ],
                vec![(
                    "--chardev socket,id=m0,id=m1,path=a,,b,path=c,server,nowait",
                    unix("m0", "c", true, false),
                )],
            ),
            (
                vec!["--chardev", "socket,id=c,path=/s"],
                vec![(
                    "--chardev socket,id=c,path=/s",
                    unix("c", "/s", false, false),
                )],
            ),
            (
                vec![
                    "--nbd-server",
                    "addr.type=unix,addr.path=/tmp/n.sock,max-connections=4",
                    "--export",
                    "nbd,id=e0,node-name=n0,writable=on,name=disk",
                    "--object",
                    "throttle-group,id=t0,limits.bps-total=1000",
                ],
                vec![
                    (
                        "--nbd-server addr.type=unix,addr.path=/tmp/n.sock,max-connections=4",
                        CliItem::NbdServer(keyval(json!({
                            "addr": {"type": "unix", "path": "/tmp/n.sock"},
                            "max-connections": "4"
                        }))),
                    ),
                    (
                        "--export nbd,id=e0,node-name=n0,writable=on,name=disk",
                        CliItem::Export(keyval(json!({
                            "type": "nbd", "id": "e0", "node-name": "n0",
                            "writable": "on", "name": "disk"
                        }))),
                    ),
                    (
                        "--object throttle-group,id=t0,limits.bps-total=1000",
                        CliItem::Object(keyval(json!({
                            "qom-type": "throttle-group", "id": "t0",
                            "limits": {"bps-total": "1000"}
                        }))),
                    ),
                ],
            ),
            (
                vec![
                    "--nbd-server",
                    r#"{"addr":{"type":"inet","data":{"host":"::1","port":"10809"}}}"#,
                    "--export",
                    r#"{"type":"nbd","id":"e","node-name":"n","writable":true}"#,
                    "--object",
                    r#"{"qom-type":"throttle-group","id":"t","limits":{"iops-total":10}}"#,
                ],
                vec![
                    (
                        r#"--nbd-server {"addr":{"type":"inet","data":{"host":"::1","port":"10809"}}}"#,
                        CliItem::NbdServer(json_args(json!({
                            "addr": {"type": "inet", "data": {"host": "::1", "port": "10809"}}
                        }))),
                    ),
                    (
                        r#"--export {"type":"nbd","id":"e","node-name":"n","writable":true}"#,
                        CliItem::Export(json_args(json!({
                            "type": "nbd", "id": "e", "node-name": "n", "writable": true
                        }))),
                    ),
                    (
                        r#"--object {"qom-type":"throttle-group","id":"t","limits":{"iops-total":10}}"#,
                        CliItem::Object(json_args(json!({
                            "qom-type": "throttle-group", "id": "t",
                            "limits": {"iops-total": 10}
                        }))),
                    ),
                ],
            ),
            (
                vec!["--blockdev", "null-co,node-name=a", "--", "--bogus", "foo"],
                vec![(
                    "--blockdev null-co,node-name=a",
                    CliItem::Blockdev(keyval(json!({"driver": "null-co", "node-name": "a"}))),
                )],
            ),
        ];
        for (words, want) in cases {
            let got = run(&words);
            let got: Vec<(&str, CliItem)> = got
                .items
                .iter()
                .map(|l| (l.origin.as_str(), l.item.clone()))
                .collect();
            assert_eq!(got, want, "command line {words:?}");
        }
    }

    #[test]
    fn global_options() {
        let got = run(&[
            "--pidfile",
            "/run/a.pid",
            "--daemonize",
            "-T",
            "nbd_*",
            "--trace=events=/x",
            "-Tjob_*",
            "--pidfile=/run/b.pid",
            "--io-threads",
            "3",
            "--metrics",
            "127.0.0.1:9184",
        ]);
        assert_eq!(
            got,
            DaemonArgs {
                items: Vec::new(),
                pidfile: Some("/run/b.pid".into()),
                daemonize: true,
                io_threads: Some(3),
                metrics: Some("127.0.0.1:9184".into()),
                trace: vec!["nbd_*".into(), "events=/x".into(), "job_*".into()],
            }
        );
        assert_eq!(run(&[]), DaemonArgs::default());
    }

    /// A bad command line and its one-line error.
    type ErrorCase = (Vec<&'static str>, &'static str);

    /// Bad command lines that qemu-storage-daemon 10.0 refuses with the same text (it prints
    /// `qemu-storage-daemon: ` before it, blockd prints `blockd: `).
    fn errors_shared_with_qsd() -> Vec<ErrorCase> {
        vec![
            (vec!["--bogus"], "unrecognized option '--bogus'"),
            (
                vec!["--chardev", "file,id=f"],
                "--chardev file,id=f: chardev: file: no filename given",
            ),
            (
                vec!["--chardev", "pipe,id=p"],
                "--chardev pipe,id=p: chardev: pipe: no device path given",
            ),
            (
                vec!["--chardev", "serial,id=t"],
                "--chardev serial,id=t: chardev: serial/tty: no device path given",
            ),
            (vec!["--bogus=1"], "unrecognized option '--bogus=1'"),
            (vec!["--bogus", "-V"], "unrecognized option '--bogus'"),
            (vec!["-x"], "invalid option -- 'x'"),
            (vec!["-q"], "invalid option -- 'q'"),
            (vec!["--blockdev"], "option '--blockdev' requires an argument"),
            (vec!["--block"], "option '--blockdev' requires an argument"),
            (vec!["--pidfile"], "option '--pidfile' requires an argument"),
            (vec!["--trace"], "option '--trace' requires an argument"),
            (vec!["-T"], "option requires an argument -- 'T'"),
            (vec!["--daemonize=1"], "option '--daemonize' doesn't allow an argument"),
            (vec!["--help=x"], "option '--help' doesn't allow an argument"),
            (vec!["foo"], "foo: Unexpected argument"),
            (vec!["foo", "--blockdev", "a..b=1"], "foo: Unexpected argument"),
            (
                vec!["--blockdev", "driver=null-co,foo"],
                "--blockdev driver=null-co,foo: Expected '=' after parameter 'foo'",
            ),
            (
                vec!["--blockdev", "foo,bar"],
                "--blockdev foo,bar: Expected '=' after parameter 'bar'",
            ),
            (
                vec!["--blockdev=driver=null-co,a.b=1,a=2"],
                "--blockdev=driver=null-co,a.b=1,a=2: Parameters 'a.*' used inconsistently",
            ),
            (
                vec!["--blockdev", "driver=null-co,a.1=1"],
                "--blockdev driver=null-co,a.1=1: Parameter 'a.0' missing",
            ),
            (
                vec!["--blockdev", "driver=null-co,a..b=x"],
                "--blockdev driver=null-co,a..b=x: Invalid parameter 'a..b'",
            ),
            (vec!["--blockdev", "help"], "--blockdev help: Help is not available for this option"),
            (
                vec!["--blockdev", r#"{"driver":"null-co","node-name":"x""#],
                r#"--blockdev {"driver":"null-co","node-name":"x": JSON parse error, premature EOI"#,
            ),
            (
                vec!["--blockdev", r#"{"a":}"#],
                r#"--blockdev {"a":}: JSON parse error, expecting value"#,
            ),
            (
                vec!["--blockdev", r#"{"a":1} x"#],
                r#"--blockdev {"a":1} x: Expecting at most one JSON value"#,
            ),
            (
                vec!["--blockdev", r#"{"a":1}{}"#],
                r#"--blockdev {"a":1}{}: Expecting at most one JSON value"#,
            ),
            (vec!["--export", "help"], "--export help: Help is not available for this option"),
            (vec!["--nbd-server", "foo"], "--nbd-server foo: Expected '=' after parameter 'foo'"),
            (vec!["--object", "help,foo"], "--object help,foo: Expected '=' after parameter 'foo'"),
            (vec!["--monitor", ""], "--monitor : Parameter 'chardev' is missing"),
            (vec!["--monitor", "id=x,bar=1"], "--monitor id=x,bar=1: Parameter 'chardev' is missing"),
            (vec!["--monitor", "foo,pretty"], "--monitor foo,pretty: Expected '=' after parameter 'pretty'"),
            (vec!["--monitor", "foo,bar=1"], "--monitor foo,bar=1: Parameter 'bar' is unexpected"),
            (vec!["--monitor", "m0,x.y=1"], "--monitor m0,x.y=1: Parameter 'x' is unexpected"),
            (vec!["--monitor", "pretty=x"], "--monitor pretty=x: Parameter 'pretty' expects 'on' or 'off'"),
            (vec!["--monitor", "m0,pretty=ON"], "--monitor m0,pretty=ON: Parameter 'pretty' expects 'on' or 'off'"),
            (vec!["--monitor", "m0,pretty="], "--monitor m0,pretty=: Parameter 'pretty' expects 'on' or 'off'"),
            (vec!["--monitor", "mode=x"], "--monitor mode=x: Parameter 'mode' does not accept value 'x'"),
            (
                vec!["--monitor", "mode=x,pretty=x"],
                "--monitor mode=x,pretty=x: Parameter 'mode' does not accept value 'x'",
            ),
            (vec!["--monitor", "m0,mode="], "--monitor m0,mode=: Parameter 'mode' does not accept value ''"),
            (vec!["--monitor", "m0,pretty.y=1"], "--monitor m0,pretty.y=1: Parameters 'pretty.*' are unexpected"),
            (vec!["--monitor", "chardev.y=1"], "--monitor chardev.y=1: Parameters 'chardev.*' are unexpected"),
            (
                vec!["--monitor", "m0,chardev.y=1"],
                "--monitor m0,chardev.y=1: Parameters 'chardev.*' used inconsistently",
            ),
            (
                vec!["--monitor", r#"{"chardev":1}"#],
                r#"--monitor {"chardev":1}: Invalid parameter type for 'chardev', expected: string"#,
            ),
            (
                vec!["--monitor", r#"{"chardev":"m0","pretty":"on"}"#],
                r#"--monitor {"chardev":"m0","pretty":"on"}: Invalid parameter type for 'pretty', expected: boolean"#,
            ),
            (
                vec!["--monitor", r#"{"chardev":"m0","mode":1}"#],
                r#"--monitor {"chardev":"m0","mode":1}: Invalid parameter type for 'mode', expected: string"#,
            ),
            (
                vec!["--monitor", r#"{"chardev":"m0","x":1}"#],
                r#"--monitor {"chardev":"m0","x":1}: Parameter 'x' is unexpected"#,
            ),
            (
                vec!["--monitor", r#"{"chardev":"m0","id":null}"#],
                r#"--monitor {"chardev":"m0","id":null}: Invalid parameter type for 'id', expected: string"#,
            ),
            (vec!["--chardev", "foo"], "--chardev foo: chardev: no id specified"),
            (vec!["--chardev", "socket"], "--chardev socket: chardev: no id specified"),
            (vec!["--chardev", ""], "--chardev : chardev: no id specified"),
            (vec!["--chardev", r#"{"id":"m0"}"#], r#"--chardev {"id":"m0"}: chardev: no id specified"#),
            (vec!["--chardev", "id=x"], "--chardev id=x: chardev: \"x\" missing backend"),
            (vec!["--chardev", "bogus,id=x"], "--chardev bogus,id=x: 'bogus' is not a valid char driver name"),
            (
                vec!["--chardev", "socket,,x,id=m0"],
                "--chardev socket,,x,id=m0: 'socket,x' is not a valid char driver name",
            ),
            (vec!["--chardev", ",id=m0"], "--chardev ,id=m0: '' is not a valid char driver name"),
            (
                vec!["--chardev", "socket,id=m0,path=/s,server=on,wait=off,bogus=1"],
                "--chardev socket,id=m0,path=/s,server=on,wait=off,bogus=1: Invalid parameter 'bogus'",
            ),
            (vec!["--chardev", "socket,id=m0,path=/s,=x"], "--chardev socket,id=m0,path=/s,=x: Invalid parameter ''"),
            (vec!["--chardev", "socket,id=m0,a.b=1"], "--chardev socket,id=m0,a.b=1: Invalid parameter 'a.b'"),
            (
                vec!["--chardev", "socket,id=0m,path=/s,server=on"],
                "--chardev socket,id=0m,path=/s,server=on: Parameter 'id' expects an identifier",
            ),
            (
                vec!["--chardev", "socket,id=m0,path=/s,server=maybe"],
                "--chardev socket,id=m0,path=/s,server=maybe: Parameter 'server' expects 'on' or 'off'",
            ),
            (
                vec!["--chardev", "socket,id=m0,path=/s,server=on,reconnect=x"],
                "--chardev socket,id=m0,path=/s,server=on,reconnect=x: Parameter 'reconnect' expects a number",
            ),
            (
                vec!["--chardev", "socket,id=m0,host=127.0.0.1,server=on"],
                "--chardev socket,id=m0,host=127.0.0.1,server=on: chardev: socket: no port given",
            ),
            (
                vec!["--chardev", "socket,id=m0,path=/s,host=h,port=1,server=on"],
                "--chardev socket,id=m0,path=/s,host=h,port=1,server=on: None or one of 'path', 'fd' or 'host' option required.",
            ),
            (
                vec!["--chardev", "socket,id=m0,path=/s,wait=off"],
                "--chardev socket,id=m0,path=/s,wait=off: 'wait' option is incompatible with socket in client connect mode",
            ),
            (
                vec!["--chardev", "socket,id=m0,path=/s,server=on,wait=off,server=off"],
                "--chardev socket,id=m0,path=/s,server=on,wait=off,server=off: 'wait' option is incompatible with socket in client connect mode",
            ),
            (
                vec!["--chardev", "socket,id=m0,path=/s,noserver,wait=off"],
                "--chardev socket,id=m0,path=/s,noserver,wait=off: 'wait' option is incompatible with socket in client connect mode",
            ),
        ]
    }

    /// Command lines that blockd refuses and qsd accepts (or refuses later, when applying).
    fn errors_of_blockd_only() -> Vec<ErrorCase> {
        vec![
            // qsd looks the chardev up first, so it says 'chardev "m0" not found' here.
            (
                vec!["--monitor", "m0,mode=readline"],
                "--monitor m0,mode=readline: Only QMP is supported",
            ),
            (
                vec!["--chardev", "udp,id=u0"],
                "--chardev udp,id=u0: chardev backend 'udp' is not supported by blockd",
            ),
            (
                vec!["--chardev", "socket,id=m0,path=/s,server=on,telnet=on"],
                "--chardev socket,id=m0,path=/s,server=on,telnet=on: chardev option 'telnet' is not supported by blockd",
            ),
            (
                vec!["--chardev", "socket,id=m0,server=on"],
                "--chardev socket,id=m0,server=on: chardev: socket: 'path' or 'host' and 'port' required",
            ),
            (
                vec!["--io-threads", "0"],
                "--io-threads 0: the number of I/O threads must be a positive integer",
            ),
            (
                vec!["--io-threads=x"],
                "--io-threads=x: the number of I/O threads must be a positive integer",
            ),
        ]
    }

    #[test]
    fn bad_command_lines() {
        for (words, want) in errors_shared_with_qsd()
            .into_iter()
            .chain(errors_of_blockd_only())
        {
            assert_eq!(error(&words), want, "command line {words:?}");
        }
    }

    /// The real qemu-storage-daemon, run on the same bad command lines, must print the same
    /// error and exit 1.
    #[test]
    fn bad_command_lines_match_qemu_storage_daemon() {
        use std::os::unix::process::CommandExt;
        let qsd = std::path::Path::new("/usr/bin/qemu-storage-daemon");
        assert!(
            qsd.exists(),
            "test peer {} is not installed: install the Debian package qemu-utils (.ci/run installs every test peer)",
            qsd.display()
        );
        for (words, want) in errors_shared_with_qsd() {
            // getopt names the program by argv[0].
            let mut child = std::process::Command::new(qsd)
                .arg0("qemu-storage-daemon")
                .args(&words)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("qemu-storage-daemon starts");
            // A command line qsd accepted would leave it running: bound the wait.
            let mut status = None;
            for _ in 0..500 {
                status = child.try_wait().expect("waiting for qemu-storage-daemon");
                if status.is_some() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if status.is_none() {
                let _ = child.kill();
                let _ = child.wait();
                panic!("qemu-storage-daemon accepted {words:?}");
            }
            let output = child.wait_with_output().expect("qsd output");
            let stderr = String::from_utf8_lossy(&output.stderr);
            // The error is the last prefixed line: warnings come before it, hints after it.
            let last = stderr
                .lines()
                .rfind(|l| l.starts_with("qemu-storage-daemon: "))
                .unwrap_or_default();
            assert_eq!(output.status.code(), Some(1), "{words:?}: {stderr}");
            assert_eq!(last, format!("qemu-storage-daemon: {want}"), "{words:?}");
        }
    }

    #[test]
    fn help_and_version_win_in_the_first_pass() {
        for words in [
            vec!["-h"],
            vec!["--help"],
            vec!["--he"],
            vec!["-hV"],
            vec!["--blockdev", "a..b=1", "-h"],
            vec!["--chardev", "help"],
        ] {
            assert!(
                matches!(parse(args(&words)), Ok(Invocation::Help(_))),
                "{words:?}"
            );
        }
        for words in [
            vec!["-V"],
            vec!["--version"],
            vec!["-Vh"],
            vec!["-V", "--bogus"],
            vec!["--blockdev", "driver=nope", "-V"],
            vec!["-V", "foo"],
        ] {
            assert!(
                matches!(parse(args(&words)), Ok(Invocation::Version(_))),
                "{words:?}"
            );
        }
    }

    #[test]
    fn help_lists_every_daemon_option() {
        let Ok(Invocation::Help(text)) = parse(args(&["-h"])) else {
            panic!("no help")
        };
        for spec in DAEMON_OPTIONS {
            assert!(
                text.contains(&format!("--{}", spec.long)),
                "--{}",
                spec.long
            );
        }
        assert!(text.contains("serve IMAGE"));
    }

    #[test]
    fn serve_subcommand() {
        let serve = |words: &[&str]| match parse(args(words)) {
            Ok(Invocation::Serve(s)) => s,
            other => panic!("{words:?}: {other:?}"),
        };
        assert_eq!(
            serve(&["serve", "disk.qcow2"]),
            ServeArgs {
                image: "disk.qcow2".into(),
                qmp: "./blockd.qmp".into(),
                nbd: "./blockd.nbd".into(),
                io_threads: None,
            }
        );
        assert_eq!(
            serve(&[
                "serve",
                "--qmp",
                "/q",
                "d.img",
                "--nbd=/n",
                "--io-threads",
                "2"
            ]),
            ServeArgs {
                image: "d.img".into(),
                qmp: "/q".into(),
                nbd: "/n".into(),
                io_threads: Some(2),
            }
        );
        assert!(matches!(
            parse(args(&["serve", "-h"])),
            Ok(Invocation::Help(_))
        ));
        let error = |words: &[&str]| parse(args(words)).unwrap_err().to_string();
        assert_eq!(error(&["serve"]), "serve: missing IMAGE argument");
        assert_eq!(error(&["serve", "a", "b"]), "b: Unexpected argument");
        assert_eq!(
            error(&["serve", "a", "--qmp"]),
            "option '--qmp' requires an argument"
        );
        assert_eq!(
            error(&["serve", "a", "--blockdev", "x"]),
            "unrecognized option '--blockdev'"
        );
        assert_eq!(
            error(&["serve", "a", "--io-threads", "-1"]),
            "--io-threads -1: the number of I/O threads must be a positive integer"
        );
        // Not a subcommand unless it comes first.
        assert_eq!(
            error(&["--daemonize", "serve", "a"]),
            "serve: Unexpected argument"
        );
    }

    #[test]
    fn ambiguous_abbreviations_are_refused() {
        const SPECS: &[OptSpec] = &[
            spec("nbd", None, true, Opt::Nbd),
            spec("nbd-server", None, true, Opt::NbdServer),
            spec("object", None, true, Opt::Object),
        ];
        assert_eq!(
            find_long(SPECS, "nb", "--nb").err().map(|e| e.to_string()),
            Some("option '--nb' is ambiguous; possibilities: '--nbd' '--nbd-server'".into())
        );
        assert!(find_long(SPECS, "nbd", "--nbd").is_ok_and(|s| s.opt == Opt::Nbd));
        assert!(find_long(SPECS, "nbd-", "--nbd-").is_ok_and(|s| s.opt == Opt::NbdServer));
        assert!(find_long(SPECS, "", "--=x").is_err());
    }

    #[test]
    fn located_errors_print_like_qsd() {
        let run = run(&["--monitor", "chardev=missing"]);
        let err = run.items[0].error("chardev \"missing\" not found");
        assert_eq!(
            err.to_string(),
            "--monitor chardev=missing: chardev \"missing\" not found"
        );
    }
}
