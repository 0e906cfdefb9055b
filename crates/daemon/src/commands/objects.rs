//! QOM objects (object-add, object-del, qom-get, qom-set) — blockd has throttle groups,
//! secrets, x509 TLS credentials, authorization lists and iothreads — and the 2.8
//! block_set_io_throttle, which throttles one node without naming a group.

use crate::authz::{Authz, ListFile, RuleList};
use crate::daemon::Daemon;
use block::{ThrottleConfig, ThrottleGroup, ThrottleLimits};
use crypto::{SecretFormat, SecretOptions, Zeroizing};
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// object-add from QMP.
pub fn object_add(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    add(daemon, args, false)?;
    Ok(json!({}))
}

/// `--object` on the command line, in keyval or JSON syntax.
pub fn object_add_cli(
    daemon: &Daemon,
    args: Map<String, Value>,
    keyval: bool,
) -> Result<(), QmpError> {
    add(daemon, args, keyval)
}

fn add(daemon: &Daemon, mut args: Map<String, Value>, keyval: bool) -> Result<(), QmpError> {
    let qom_type = match args.remove("qom-type") {
        Some(Value::String(t)) => t,
        Some(_) => {
            return Err(QmpError::generic(
                "Invalid parameter type for 'qom-type', expected: string",
            ))
        }
        None => return Err(QmpError::generic("Parameter 'qom-type' is missing")),
    };
    let id = match args.remove("id") {
        Some(Value::String(id)) => id,
        Some(_) => {
            return Err(QmpError::generic(
                "Invalid parameter type for 'id', expected: string",
            ))
        }
        None => return Err(QmpError::generic("Parameter 'id' is missing")),
    };
    match qom_type.as_str() {
        "throttle-group" | "secret" | "tls-creds-x509" | "authz-simple" | "authz-list"
        | "authz-listfile" | "iothread" => {}
        "tls-creds-psk" | "tls-creds-anon" => {
            return Err(QmpError::generic(format!(
                "Object type '{qom_type}' is not supported by blockd: its TLS library (rustls) \
                 has no pre-shared-key or anonymous suites; use tls-creds-x509"
            )))
        }
        other => {
            return Err(QmpError::generic(format!(
                "Parameter 'qom-type' does not accept value '{other}'"
            )))
        }
    }
    if !is_identifier(&id) {
        return Err(QmpError::generic("Parameter 'id' expects an identifier"));
    }
    let duplicate = || {
        QmpError::generic(format!(
            "attempt to add duplicate property '{id}' to object (type 'container')"
        ))
    };
    if qom_type == "secret" {
        let props: SecretProperties = parse(Value::Object(args), keyval)?;
        if object_exists(daemon, &id) {
            return Err(duplicate());
        }
        let secrets = &daemon.graph.secrets;
        let secret = props
            .options()
            .load(|keyid| secrets.get(keyid))
            .map_err(QmpError::generic)?;
        return if secrets.insert(&id, secret) {
            Ok(())
        } else {
            Err(duplicate())
        };
    }
    // As in QEMU, the id is checked before the object loads anything.
    if (qom_type == "tls-creds-x509" || qom_type.starts_with("authz-"))
        && object_exists(daemon, &id)
    {
        return Err(duplicate());
    }
    if qom_type == "tls-creds-x509" {
        let props: TlsCredsX509Properties = parse(Value::Object(args), keyval)?;
        let options = props.options(daemon).map_err(QmpError::generic)?;
        let creds = nbd::TlsCreds::load_x509(&options).map_err(QmpError::generic)?;
        if !daemon.graph.tls_creds.insert(&id, creds) {
            return Err(duplicate());
        }
        return Ok(());
    }
    if qom_type == "iothread" {
        let props: IothreadProperties = parse(Value::Object(args), keyval)?;
        let options = props.options();
        options.validate().map_err(QmpError::generic)?;
        if object_exists(daemon, &id) {
            return Err(duplicate());
        }
        let iothread = block::IoThreadObject::start(&id, options)
            .map_err(|e| QmpError::generic(format!("Failed to create iothread '{id}': {e}")))?;
        if !daemon.iothreads.insert(&id, iothread) {
            return Err(duplicate());
        }
        return Ok(());
    }
    if let Some(kind) = qom_type.strip_prefix("authz-") {
        let authz = authz_object(kind, Value::Object(args), keyval)?;
        if !daemon.authz.insert(&id, authz) {
            return Err(duplicate());
        }
        return Ok(());
    }
    let config = throttle_group_config(args, keyval)?;
    if object_exists(daemon, &id)
        || !daemon
            .graph
            .throttle_groups
            .insert(ThrottleGroup::new(&id, config))
    {
        return Err(duplicate());
    }
    Ok(())
}

/// Whether any object, of whatever type, has the id `id`.
pub(crate) fn object_exists(daemon: &Daemon, id: &str) -> bool {
    super::qom::object_type(daemon, id).is_some()
}

/// IothreadProperties (with EventLoopBaseProperties). Values are QEMU's int64s: a
/// negative one is out of range, as qsd says.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct IothreadProperties {
    poll_max_ns: Option<i64>,
    poll_grow: Option<i64>,
    poll_shrink: Option<i64>,
    aio_max_batch: Option<i64>,
    thread_pool_min: Option<i64>,
    thread_pool_max: Option<i64>,
}

impl IothreadProperties {
    fn options(&self) -> block::IoThreadOptions {
        let d = block::IoThreadOptions::default();
        // Negative values become huge ones, which validation refuses with qsd's range text.
        let get = |v: Option<i64>, default: u64| v.map_or(default, |v| v as u64);
        block::IoThreadOptions {
            poll_max_ns: get(self.poll_max_ns, d.poll_max_ns),
            poll_grow: get(self.poll_grow, d.poll_grow),
            poll_shrink: get(self.poll_shrink, d.poll_shrink),
            aio_max_batch: get(self.aio_max_batch, d.aio_max_batch),
            thread_pool_min: get(self.thread_pool_min, d.thread_pool_min),
            thread_pool_max: get(self.thread_pool_max, d.thread_pool_max),
        }
    }
}

/// TlsCredsX509Properties; `priority` is followed as far as rustls can (nbd::tls).
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct TlsCredsX509Properties {
    /// Optional in QEMU's schema, required when the credentials load.
    dir: Option<String>,
    endpoint: Option<EndpointName>,
    verify_peer: Option<bool>,
    priority: Option<String>,
    sanity_check: Option<bool>,
    passwordid: Option<String>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum EndpointName {
    Server,
    Client,
}

impl TlsCredsX509Properties {
    fn options(self, daemon: &Daemon) -> Result<nbd::X509Options, String> {
        let key_password = match &self.passwordid {
            Some(id) => {
                let secret = daemon
                    .graph
                    .secrets
                    .get(id)
                    .ok_or_else(|| format!("No secret with id '{id}'"))?;
                Some(Zeroizing::new(secret.bytes().to_vec()))
            }
            None => None,
        };
        let dir = self.dir.ok_or("Missing 'dir' property value")?;
        Ok(nbd::X509Options {
            dir: dir.into(),
            endpoint: match self.endpoint {
                Some(EndpointName::Server) => nbd::Endpoint::Server,
                Some(EndpointName::Client) | None => nbd::Endpoint::Client,
            },
            verify_peer: self.verify_peer.unwrap_or(true),
            priority: self.priority,
            sanity_check: self.sanity_check.unwrap_or(true),
            key_password,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthzSimpleProperties {
    identity: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthzListFileProperties {
    filename: String,
    refresh: Option<bool>,
}

/// An authz-`kind` object from its properties.
fn authz_object(kind: &str, props: Value, keyval: bool) -> Result<Authz, QmpError> {
    Ok(match kind {
        "simple" => {
            let p: AuthzSimpleProperties = parse(props, keyval)?;
            Authz::Simple(std::sync::Mutex::new(p.identity))
        }
        "list" => Authz::List(parse::<RuleList>(props, keyval)?),
        _ => {
            let p: AuthzListFileProperties = parse(props, keyval)?;
            let file = ListFile::open(p.filename.into(), p.refresh.unwrap_or(true))
                .map_err(QmpError::generic)?;
            Authz::ListFile(file)
        }
    })
}

/// SecretProperties. Secrets never show again: not in query output, logs or error texts.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretProperties {
    data: Option<String>,
    file: Option<String>,
    format: Option<SecretFormatName>,
    keyid: Option<String>,
    iv: Option<String>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum SecretFormatName {
    Raw,
    Base64,
}

impl SecretProperties {
    fn options(self) -> SecretOptions {
        SecretOptions {
            data: self.data.map(Zeroizing::new),
            file: self.file,
            format: match self.format {
                Some(SecretFormatName::Base64) => SecretFormat::Base64,
                Some(SecretFormatName::Raw) | None => SecretFormat::Raw,
            },
            keyid: self.keyid,
            iv: self.iv,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ThrottleGroupProperties {
    limits: Option<ThrottleLimits>,
}

/// ThrottleGroupProperties: `limits` and the same limits as flat unstable `x-` members,
/// which are applied first.
fn throttle_group_config(
    mut args: Map<String, Value>,
    keyval: bool,
) -> Result<ThrottleConfig, QmpError> {
    let flat_keys: Vec<String> = args
        .keys()
        .filter(|k| k.starts_with("x-"))
        .cloned()
        .collect();
    let mut flat = Map::new();
    for key in flat_keys {
        let value = args.remove(&key).expect("key listed above");
        flat.insert(key["x-".len()..].to_string(), value);
    }
    let props: ThrottleGroupProperties = parse(Value::Object(args), keyval)?;
    let flat: ThrottleLimits = parse(Value::Object(flat), keyval).map_err(|e| QmpError {
        desc: e.desc.replacen('\'', "'x-", 1),
        ..e
    })?;
    if flat_values(&flat).iter().flatten().any(|&v| v < 0) {
        return Err(QmpError::generic("Property values cannot be negative"));
    }
    let mut config = ThrottleConfig::default().merged(&flat);
    if let Some(limits) = &props.limits {
        config = config.merged(limits);
    }
    config.validate().map_err(QmpError::generic)?;
    Ok(config)
}

fn parse<T: serde::de::DeserializeOwned>(value: Value, keyval: bool) -> Result<T, QmpError> {
    if keyval {
        qapi::de::from_keyval(value)
    } else {
        qapi::de::from_value(value)
    }
}

fn flat_values(l: &ThrottleLimits) -> Vec<Option<i64>> {
    vec![
        l.iops_total,
        l.iops_total_max,
        l.iops_total_max_length,
        l.iops_read,
        l.iops_read_max,
        l.iops_read_max_length,
        l.iops_write,
        l.iops_write_max,
        l.iops_write_max_length,
        l.bps_total,
        l.bps_total_max,
        l.bps_total_max_length,
        l.bps_read,
        l.bps_read_max,
        l.bps_read_max_length,
        l.bps_write,
        l.bps_write_max,
        l.bps_write_max_length,
        l.iops_size,
    ]
}

/// QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'.
fn is_identifier(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectDelArgs {
    id: String,
}

/// How long object-del of an iothread waits for the work still running there to leave.
const IOTHREAD_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

pub async fn object_del(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    let args: ObjectDelArgs = qapi::de::from_value(Value::Object(args))?;
    // Nothing holds on to a secret: an open image keeps its own key. Servers and nodes
    // that use TLS credentials keep their own reference, as in QEMU, and authz objects are
    // looked up per connection (one that is gone refuses every client).
    if daemon.graph.secrets.remove(&args.id)
        || daemon.graph.tls_creds.remove(&args.id)
        || daemon.authz.remove(&args.id)
    {
        return Ok(json!({}));
    }
    if let Some(iothread) = daemon.iothreads.get(&args.id) {
        // qsd 10 crashes deleting an iothread that still serves nodes; refuse instead, and
        // while work started there still runs (a device's queues stay where they started;
        // NBD connections follow their node away within moments).
        let in_use = block::is_home_of_any(&daemon.graph, &iothread)
            || iothread.busy_after(IOTHREAD_GRACE).await;
        if in_use {
            return Err(QmpError::generic(format!(
                "object '{}' is in use, can not be deleted",
                args.id
            )));
        }
        daemon.iothreads.remove(&args.id);
        iothread.stop();
        return Ok(json!({}));
    }
    let groups = &daemon.graph.throttle_groups;
    let group = groups
        .get(&args.id)
        .ok_or_else(|| QmpError::generic(format!("object '{}' not found", args.id)))?;
    if group.member_count() > 0 {
        return Err(QmpError::generic(format!(
            "object '{}' is in use, can not be deleted",
            args.id
        )));
    }
    groups.remove(&args.id);
    Ok(json!({}))
}

/// A QOM path to an object: `/objects/ID`, or just `ID` (QEMU's partial paths).
fn resolve(daemon: &Daemon, path: &str) -> Result<Arc<ThrottleGroup>, QmpError> {
    let id = path.strip_prefix("/objects/").unwrap_or(path);
    daemon
        .graph
        .throttle_groups
        .get(id)
        .ok_or_else(|| QmpError::device_not_found(format!("Device '{path}' not found")))
}

fn no_property(name: &str) -> QmpError {
    QmpError::generic(format!("Property 'throttle-group.{name}' not found"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QomGetArgs {
    path: String,
    property: String,
}

pub fn qom_get(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    let args: QomGetArgs = qapi::de::from_value(Value::Object(args))?;
    let id = args.path.strip_prefix("/objects/").unwrap_or(&args.path);
    if daemon.graph.secrets.contains(id) {
        return match args.property.as_str() {
            "type" => Ok(json!("secret")),
            "data" | "file" | "format" | "keyid" | "iv" => Err(QmpError::generic(format!(
                "Property 'secret.{}' cannot be read: blockd never shows a secret",
                args.property
            ))),
            name => Err(QmpError::generic(format!(
                "Property 'secret.{name}' not found"
            ))),
        };
    }
    if let Some(creds) = daemon.graph.tls_creds.get(id) {
        return match args.property.as_str() {
            "type" => Ok(json!("tls-creds-x509")),
            "endpoint" => Ok(json!(match creds.endpoint() {
                nbd::Endpoint::Server => "server",
                nbd::Endpoint::Client => "client",
            })),
            "dir" => Ok(json!(creds.dir().display().to_string())),
            "verify-peer" => Ok(json!(creds.verify_peer())),
            name => Err(QmpError::generic(format!(
                "Property 'tls-creds-x509.{name}' not found"
            ))),
        };
    }
    if let Some(iothread) = daemon.iothreads.get(id) {
        let o = iothread.options();
        let value = match args.property.as_str() {
            "type" => return Ok(json!("iothread")),
            "poll-max-ns" => o.poll_max_ns,
            "poll-grow" => o.poll_grow,
            "poll-shrink" => o.poll_shrink,
            "aio-max-batch" => o.aio_max_batch,
            "thread-pool-min" => o.thread_pool_min,
            "thread-pool-max" => o.thread_pool_max,
            name => {
                return Err(QmpError::generic(format!(
                    "Property 'iothread.{name}' not found"
                )))
            }
        };
        return Ok(json!(value));
    }
    if let Some(authz) = daemon.authz.get(id) {
        return match args.property.as_str() {
            "type" => Ok(json!(authz.qom_type())),
            name => authz.property(name).ok_or_else(|| {
                QmpError::generic(format!("Property '{}.{name}' not found", authz.qom_type()))
            }),
        };
    }
    let group = resolve(daemon, &args.path)?;
    let limits = group.config().to_limits();
    match args.property.as_str() {
        "type" => Ok(json!("throttle-group")),
        "limits" => Ok(limits),
        name => name
            .strip_prefix("x-")
            .and_then(|member| limits.get(member).cloned())
            .ok_or_else(|| no_property(name)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QomSetArgs {
    path: String,
    property: String,
    value: Value,
}

/// qom-set: only `limits` may change once the group exists; members left out keep their
/// values, and the new limits apply to requests already waiting.
pub fn qom_set(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    let args: QomSetArgs = qapi::de::from_value(Value::Object(args))?;
    let id = args.path.strip_prefix("/objects/").unwrap_or(&args.path);
    if let Some(iothread) = daemon.iothreads.get(id) {
        set_iothread_property(&iothread, &args.property, args.value)?;
        return Ok(json!({}));
    }
    if let Some(authz) = daemon.authz.get(id) {
        if args.property != "identity" {
            return Err(QmpError::generic(format!(
                "Property '{}.{}' cannot be set by blockd",
                authz.qom_type(),
                args.property
            )));
        }
        authz.set_identity(&args.value).map_err(QmpError::generic)?;
        return Ok(json!({}));
    }
    let group = resolve(daemon, &args.path)?;
    match args.property.as_str() {
        "limits" => {
            let limits: ThrottleLimits = qapi::de::from_value(args.value)?;
            let config = group.config().merged(&limits);
            config.validate().map_err(QmpError::generic)?;
            group.set_config(config);
            Ok(json!({}))
        }
        name if name.starts_with("x-") && group.config().to_limits().get(&name[2..]).is_some() => {
            Err(QmpError::generic(
                "Property cannot be set after initialization",
            ))
        }
        name => Err(no_property(name)),
    }
}

/// qom-set on an iothread: the polling knobs and aio-max-batch take effect at once; the
/// pool was sized when the thread started and stays so.
fn set_iothread_property(
    iothread: &block::IoThreadObject,
    property: &str,
    value: Value,
) -> Result<(), QmpError> {
    let mut o = iothread.options();
    let slot = match property {
        "poll-max-ns" => &mut o.poll_max_ns,
        "poll-grow" => &mut o.poll_grow,
        "poll-shrink" => &mut o.poll_shrink,
        "aio-max-batch" => &mut o.aio_max_batch,
        "thread-pool-min" | "thread-pool-max" => {
            return Err(QmpError::generic(format!(
                "Property 'iothread.{property}' cannot be changed by blockd once the \
                 iothread runs: its pool is sized when the thread starts"
            )))
        }
        name => {
            return Err(QmpError::generic(format!(
                "Property 'iothread.{name}' not found"
            )))
        }
    };
    let Some(v) = value.as_i64() else {
        return Err(QmpError::generic(format!(
            "Invalid parameter type for '{property}', expected: integer"
        )));
    };
    *slot = v as u64;
    o.validate().map_err(QmpError::generic)?;
    iothread.update(o);
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockIoThrottle {
    device: Option<String>,
    id: Option<String>,
    bps: i64,
    bps_rd: i64,
    bps_wr: i64,
    iops: i64,
    iops_rd: i64,
    iops_wr: i64,
    bps_max: Option<i64>,
    bps_rd_max: Option<i64>,
    bps_wr_max: Option<i64>,
    iops_max: Option<i64>,
    iops_rd_max: Option<i64>,
    iops_wr_max: Option<i64>,
    bps_max_length: Option<i64>,
    bps_rd_max_length: Option<i64>,
    bps_wr_max_length: Option<i64>,
    iops_max_length: Option<i64>,
    iops_rd_max_length: Option<i64>,
    iops_wr_max_length: Option<i64>,
    iops_size: Option<i64>,
    group: Option<String>,
}

/// block_set_io_throttle (2.8; qsd dropped it): `device` or `id` names a node here. All
/// limits 0 lifts the throttling; the group defaults to one of the node's own.
pub async fn block_set_io_throttle(
    daemon: &Daemon,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    let a: BlockIoThrottle = qapi::de::from_value(Value::Object(args))?;
    let name = match (&a.device, &a.id) {
        (Some(name), None) | (None, Some(name)) => name.clone(),
        _ => return Err(QmpError::generic("Need exactly one of 'device' and 'id'")),
    };
    let node = daemon
        .graph
        .find(&name)
        .ok_or_else(|| QmpError::device_not_found(format!("Device '{name}' not found")))?;
    let limits = ThrottleLimits {
        bps_total: Some(a.bps),
        bps_read: Some(a.bps_rd),
        bps_write: Some(a.bps_wr),
        iops_total: Some(a.iops),
        iops_read: Some(a.iops_rd),
        iops_write: Some(a.iops_wr),
        bps_total_max: a.bps_max,
        bps_read_max: a.bps_rd_max,
        bps_write_max: a.bps_wr_max,
        iops_total_max: a.iops_max,
        iops_read_max: a.iops_rd_max,
        iops_write_max: a.iops_wr_max,
        bps_total_max_length: a.bps_max_length,
        bps_read_max_length: a.bps_rd_max_length,
        bps_write_max_length: a.bps_wr_max_length,
        iops_total_max_length: a.iops_max_length,
        iops_read_max_length: a.iops_rd_max_length,
        iops_write_max_length: a.iops_wr_max_length,
        iops_size: a.iops_size,
    };
    let config = ThrottleConfig::default().merged(&limits);
    config.validate().map_err(QmpError::generic)?;
    let group = a.group.unwrap_or_else(|| name.clone());
    let graph = daemon.graph.clone();
    daemon
        .io
        .run(move || async move { block::set_io_throttle(&graph, &node, &group, config).await })
        .await
        .map_err(QmpError::generic)?;
    Ok(json!({}))
}
