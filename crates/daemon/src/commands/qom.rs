//! QOM introspection (qom-list, qom-list-types, qom-list-properties) over the object types
//! blockd has, with the names, parents and properties qemu-storage-daemon 10.0 gives them;
//! the types blockd lacks (tls-creds-psk, main-loop, most chardevs, ...) are not listed.

use crate::daemon::Daemon;
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// One QOM type: its parent, whether it is abstract, the interfaces it implements, and
/// the properties it adds to its parent's.
struct TypeInfo {
    name: &'static str,
    parent: Option<&'static str>,
    is_abstract: bool,
    interfaces: &'static [&'static str],
    properties: &'static [(&'static str, &'static str)],
}

const USER_CREATABLE: &[&str] = &["user-creatable"];

const THROTTLE_GROUP_PROPERTIES: &[(&str, &str)] = &[
    ("limits", "ThrottleLimits"),
    ("x-iops-total", "int"),
    ("x-iops-total-max", "int"),
    ("x-iops-total-max-length", "int"),
    ("x-iops-read", "int"),
    ("x-iops-read-max", "int"),
    ("x-iops-read-max-length", "int"),
    ("x-iops-write", "int"),
    ("x-iops-write-max", "int"),
    ("x-iops-write-max-length", "int"),
    ("x-bps-total", "int"),
    ("x-bps-total-max", "int"),
    ("x-bps-total-max-length", "int"),
    ("x-bps-read", "int"),
    ("x-bps-read-max", "int"),
    ("x-bps-read-max-length", "int"),
    ("x-bps-write", "int"),
    ("x-bps-write-max", "int"),
    ("x-bps-write-max-length", "int"),
    ("x-iops-size", "int"),
];

const TYPES: &[TypeInfo] = &[
    TypeInfo {
        name: "object",
        parent: None,
        is_abstract: true,
        interfaces: &[],
        properties: &[("type", "string")],
    },
    TypeInfo {
        name: "interface",
        parent: None,
        is_abstract: true,
        interfaces: &[],
        properties: &[],
    },
    TypeInfo {
        name: "user-creatable",
        parent: Some("interface"),
        is_abstract: true,
        interfaces: &[],
        properties: &[],
    },
    TypeInfo {
        name: "container",
        parent: Some("object"),
        is_abstract: false,
        interfaces: &[],
        properties: &[],
    },
    TypeInfo {
        name: "secret_common",
        parent: Some("object"),
        is_abstract: true,
        interfaces: USER_CREATABLE,
        properties: &[
            ("iv", "string"),
            ("keyid", "string"),
            ("format", "QCryptoSecretFormat"),
        ],
    },
    TypeInfo {
        name: "secret",
        parent: Some("secret_common"),
        is_abstract: false,
        interfaces: USER_CREATABLE,
        properties: &[("file", "string"), ("data", "string")],
    },
    TypeInfo {
        name: "throttle-group",
        parent: Some("object"),
        is_abstract: false,
        interfaces: USER_CREATABLE,
        properties: THROTTLE_GROUP_PROPERTIES,
    },
    TypeInfo {
        name: "event-loop-base",
        parent: Some("object"),
        is_abstract: true,
        interfaces: USER_CREATABLE,
        properties: &[
            ("thread-pool-min", "int"),
            ("aio-max-batch", "int"),
            ("thread-pool-max", "int"),
        ],
    },
    TypeInfo {
        name: "iothread",
        parent: Some("event-loop-base"),
        is_abstract: false,
        interfaces: USER_CREATABLE,
        properties: &[
            ("poll-max-ns", "int"),
            ("poll-grow", "int"),
            ("poll-shrink", "int"),
        ],
    },
    TypeInfo {
        name: "tls-creds",
        parent: Some("object"),
        is_abstract: true,
        interfaces: USER_CREATABLE,
        properties: &[
            ("endpoint", "QCryptoTLSCredsEndpoint"),
            ("dir", "string"),
            ("verify-peer", "bool"),
            ("priority", "string"),
        ],
    },
    TypeInfo {
        name: "tls-creds-x509",
        parent: Some("tls-creds"),
        is_abstract: false,
        interfaces: USER_CREATABLE,
        properties: &[("sanity-check", "bool"), ("passwordid", "string")],
    },
    TypeInfo {
        name: "authz",
        parent: Some("object"),
        is_abstract: true,
        interfaces: &[],
        properties: &[],
    },
    TypeInfo {
        name: "authz-simple",
        parent: Some("authz"),
        is_abstract: false,
        interfaces: USER_CREATABLE,
        properties: &[("identity", "string")],
    },
    TypeInfo {
        name: "authz-list",
        parent: Some("authz"),
        is_abstract: false,
        interfaces: USER_CREATABLE,
        properties: &[("policy", "QAuthZListPolicy"), ("rules", "QAuthZListRule")],
    },
    TypeInfo {
        name: "authz-list-file",
        parent: Some("authz"),
        is_abstract: false,
        interfaces: USER_CREATABLE,
        properties: &[("filename", "string"), ("refresh", "bool")],
    },
    TypeInfo {
        name: "chardev",
        parent: Some("object"),
        is_abstract: true,
        interfaces: &[],
        properties: &[],
    },
    TypeInfo {
        name: "chardev-socket",
        parent: Some("chardev"),
        is_abstract: false,
        interfaces: &[],
        properties: &[("connected", "bool"), ("addr", "SocketAddress")],
    },
    TypeInfo {
        name: "chardev-fd",
        parent: Some("chardev"),
        is_abstract: true,
        interfaces: &[],
        properties: &[],
    },
    TypeInfo {
        name: "chardev-file",
        parent: Some("chardev-fd"),
        is_abstract: false,
        interfaces: &[],
        properties: &[],
    },
    TypeInfo {
        name: "chardev-pipe",
        parent: Some("chardev-fd"),
        is_abstract: false,
        interfaces: &[],
        properties: &[],
    },
    TypeInfo {
        name: "chardev-serial",
        parent: Some("chardev-fd"),
        is_abstract: false,
        interfaces: &[],
        properties: &[],
    },
    TypeInfo {
        name: "chardev-stdio",
        parent: Some("chardev-fd"),
        is_abstract: false,
        interfaces: &[],
        properties: &[],
    },
    TypeInfo {
        name: "chardev-null",
        parent: Some("chardev"),
        is_abstract: false,
        interfaces: &[],
        properties: &[],
    },
    TypeInfo {
        name: "chardev-pty",
        parent: Some("chardev"),
        is_abstract: false,
        interfaces: &[],
        properties: &[],
    },
    TypeInfo {
        name: "chardev-ringbuf",
        parent: Some("chardev"),
        is_abstract: false,
        interfaces: &[],
        properties: &[],
    },
    TypeInfo {
        name: "chardev-memory",
        parent: Some("chardev-ringbuf"),
        is_abstract: false,
        interfaces: &[],
        properties: &[],
    },
];

fn find(name: &str) -> Option<&'static TypeInfo> {
    TYPES.iter().find(|t| t.name == name)
}

/// `t` and its ancestors, itself first.
fn lineage(t: &'static TypeInfo) -> impl Iterator<Item = &'static TypeInfo> {
    std::iter::successors(Some(t), |t| t.parent.and_then(find))
}

/// Whether `t` is `wanted`, descends from it or implements it (QEMU's dynamic cast).
fn implements(t: &'static TypeInfo, wanted: &str) -> bool {
    lineage(t).any(|a| a.name == wanted || a.interfaces.contains(&wanted))
}

/// Every property of `t`, inherited ones included, as ObjectPropertyInfo.
fn properties(t: &'static TypeInfo) -> Vec<Value> {
    let mut chain: Vec<&TypeInfo> = lineage(t).collect();
    chain.reverse();
    chain
        .iter()
        .flat_map(|t| t.properties.iter())
        .map(|(name, ty)| json!({"name": name, "type": ty}))
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListTypesArgs {
    implements: Option<String>,
    #[serde(rename = "abstract")]
    include_abstract: Option<bool>,
}

pub fn qom_list_types(args: Map<String, Value>) -> Result<Value, QmpError> {
    let args: ListTypesArgs = qapi::de::from_value(Value::Object(args))?;
    let include_abstract = args.include_abstract.unwrap_or(false);
    let types = TYPES
        .iter()
        .filter(|t| t.name != "interface" && t.parent != Some("interface"))
        .filter(|t| include_abstract || !t.is_abstract)
        .filter(|t| args.implements.as_deref().is_none_or(|w| implements(t, w)))
        .map(|t| {
            let mut info = Map::new();
            info.insert("name".into(), json!(t.name));
            if t.is_abstract {
                info.insert("abstract".into(), json!(true));
            }
            if let Some(parent) = t.parent {
                info.insert("parent".into(), json!(parent));
            }
            Value::Object(info)
        })
        .collect();
    Ok(Value::Array(types))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListPropertiesArgs {
    typename: String,
}

pub fn qom_list_properties(args: Map<String, Value>) -> Result<Value, QmpError> {
    let args: ListPropertiesArgs = qapi::de::from_value(Value::Object(args))?;
    match find(&args.typename) {
        Some(t) if t.name == "interface" || t.parent == Some("interface") => {
            Err(QmpError::generic("Parameter 'typename' expects a QOM type"))
        }
        Some(t) => Ok(Value::Array(properties(t))),
        None => Err(QmpError::device_not_found(format!(
            "Class '{}' not found",
            args.typename
        ))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListArgs {
    path: String,
}

/// The QOM type name of the user-created object `id`, if there is one.
pub(crate) fn object_type(daemon: &Daemon, id: &str) -> Option<&'static str> {
    let graph = &daemon.graph;
    if graph.secrets.contains(id) {
        Some("secret")
    } else if graph.throttle_groups.get(id).is_some() {
        Some("throttle-group")
    } else if graph.tls_creds.contains(id) {
        Some("tls-creds-x509")
    } else if daemon.iothreads.contains(id) {
        Some("iothread")
    } else {
        daemon.authz.get(id).map(|a| a.qom_type())
    }
}

fn child(name: &str, ty: &str) -> Value {
    json!({"name": name, "type": format!("child<{ty}>")})
}

pub fn qom_list(daemon: &Daemon, args: Map<String, Value>) -> Result<Value, QmpError> {
    let args: ListArgs = qapi::de::from_value(Value::Object(args))?;
    let not_found = || QmpError::device_not_found(format!("Device '{}' not found", args.path));
    let type_property = json!({"name": "type", "type": "string"});
    let mut out = vec![type_property];
    match args.path.as_str() {
        "/" => {
            for container in ["backend", "objects", "chardevs"] {
                out.push(child(container, "container"));
            }
        }
        "/backend" => {}
        "/objects" => {
            let graph = &daemon.graph;
            let mut ids = graph.secrets.ids();
            ids.extend(graph.throttle_groups.names());
            ids.extend(graph.tls_creds.ids());
            ids.extend(daemon.authz.ids());
            ids.extend(daemon.iothreads.ids());
            for id in ids {
                let ty = object_type(daemon, &id).ok_or_else(not_found)?;
                out.push(child(&id, ty));
            }
        }
        "/chardevs" => {
            for (id, ty) in daemon.chardevs.list() {
                out.push(child(&id, ty));
            }
        }
        path => {
            let ty = if let Some(id) = path.strip_prefix("/objects/") {
                object_type(daemon, id)
            } else if let Some(id) = path.strip_prefix("/chardevs/") {
                daemon
                    .chardevs
                    .list()
                    .into_iter()
                    .find(|(c, _)| c == id)
                    .map(|(_, ty)| ty)
            } else {
                None
            };
            let t = ty.and_then(find).ok_or_else(not_found)?;
            return Ok(Value::Array(properties(t)));
        }
    }
    Ok(Value::Array(out))
}
