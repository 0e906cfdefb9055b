//! `query-qmp-schema`: blockd's QMP schema, read from QAPI syntax and rendered as SchemaInfo.
//!
//! The schema lives in `schema/blockd.json`, written in the QAPI schema language so it can be
//! reviewed side by side with QEMU's reference.  It is parsed and checked once (every type
//! reference resolves, union tags are enums, no duplicate names), then rendered the way QEMU
//! renders introspection in release builds: commands and events first, in schema order, then
//! every type they reach, in order of first use, with type names replaced by numbers (builtins
//! and arrays of them keep their names).  Clients must look at commands and events, not at
//! type names, and the numbering keeps them honest, as it does for qsd.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::{json, Map, Value};

const SOURCE: &str = include_str!("schema/blockd.json");

/// The object type QEMU uses for "no arguments" and "no return value".
const EMPTY_OBJECT: &str = "q_empty";

/// Builtin types with the JSON type introspection reports for them.
const BUILTINS: [(&str, &str); 6] = [
    ("str", "string"),
    ("int", "int"),
    ("number", "number"),
    ("bool", "boolean"),
    ("null", "null"),
    ("any", "value"),
];

/// QAPI's sized integer types: introspection reports them all as plain `int`.
const INT_ALIASES: [&str; 9] = [
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "size",
];

/// SchemaInfo of every command and event blockd's schema describes.
#[cfg(test)]
pub fn schema_info() -> Value {
    static FULL: OnceLock<Value> = OnceLock::new();
    FULL.get_or_init(|| schema().render(None, true)).clone()
}

/// SchemaInfo of the given commands (names the schema lacks are ignored), every event, and
/// the types they reach: what `query-qmp-schema` answers, so that it never advertises a
/// command the daemon would refuse with CommandNotFound.
pub fn schema_info_for(commands: &[&str]) -> Value {
    let wanted: HashSet<&str> = commands.iter().copied().collect();
    schema().render(Some(&wanted), true)
}

/// Names of the commands the schema describes, in schema order.
#[cfg(test)]
pub fn command_names() -> Vec<&'static str> {
    entity_names(EntityKind::Command)
}

/// Names of the events the schema describes, in schema order.
#[cfg(test)]
pub fn event_names() -> Vec<&'static str> {
    entity_names(EntityKind::Event)
}

#[cfg(test)]
fn entity_names(kind: EntityKind) -> Vec<&'static str> {
    schema()
        .entities
        .iter()
        .filter(|e| e.kind == kind)
        .map(|e| e.name.as_str())
        .collect()
}

fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    // The source is compiled in and `tests::bundled_schema_is_valid` parses it, so failing
    // here means a broken build, not bad input.
    SCHEMA.get_or_init(|| Schema::parse(SOURCE).expect("bundled QMP schema is valid"))
}

/// Why a schema source was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError(String);

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QAPI schema: {}", self.0)
    }
}

impl std::error::Error for SchemaError {}

fn err<T>(msg: impl Into<String>) -> Result<T, SchemaError> {
    Err(SchemaError(msg.into()))
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum TypeRef {
    Named(String),
    Array(String),
}

impl TypeRef {
    fn element(&self) -> &str {
        match self {
            TypeRef::Named(n) | TypeRef::Array(n) => n,
        }
    }
}

#[derive(Clone, Debug)]
struct Member {
    name: String,
    ty: TypeRef,
    optional: bool,
    features: Vec<String>,
}

#[derive(Debug)]
enum Def {
    Enum {
        values: Vec<(String, Vec<String>)>,
        features: Vec<String>,
    },
    Object {
        members: Vec<Member>,
        tag: Option<String>,
        variants: Vec<(String, String)>,
        features: Vec<String>,
    },
    Alternate {
        members: Vec<TypeRef>,
        features: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EntityKind {
    Command,
    Event,
}

#[derive(Debug)]
struct Entity {
    name: String,
    kind: EntityKind,
    arg: String,
    ret: TypeRef,
    features: Vec<String>,
}

#[derive(Debug)]
struct Schema {
    defs: HashMap<String, Def>,
    entities: Vec<Entity>,
}

// ---- the source syntax ----

#[derive(Deserialize)]
#[serde(untagged)]
enum RawType {
    Name(String),
    Array([String; 1]),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMemberFull {
    #[serde(rename = "type")]
    ty: RawType,
    #[serde(default)]
    features: Vec<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawMember {
    Plain(RawType),
    Full(RawMemberFull),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnumValueFull {
    name: String,
    #[serde(default)]
    features: Vec<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawEnumValue {
    Name(String),
    Full(RawEnumValueFull),
}

/// Command/event arguments or a union base: a type name or inline members.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawData {
    Named(String),
    Inline(Map<String, Value>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnum {
    #[serde(rename = "enum")]
    name: String,
    data: Vec<RawEnumValue>,
    #[serde(default)]
    features: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStruct {
    #[serde(rename = "struct")]
    name: String,
    base: Option<String>,
    data: Map<String, Value>,
    #[serde(default)]
    features: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnion {
    #[serde(rename = "union")]
    name: String,
    base: RawData,
    discriminator: String,
    data: Map<String, Value>,
    #[serde(default)]
    features: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlternate {
    #[serde(rename = "alternate")]
    name: String,
    data: Map<String, Value>,
    #[serde(default)]
    features: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    #[serde(rename = "command")]
    name: String,
    data: Option<RawData>,
    returns: Option<RawType>,
    #[serde(default)]
    features: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    #[serde(rename = "event")]
    name: String,
    data: Option<RawData>,
    #[serde(default)]
    features: Vec<String>,
}

/// A command or event, before its arguments are resolved.
struct RawEntity {
    name: String,
    kind: EntityKind,
    data: Option<RawData>,
    returns: Option<RawType>,
    features: Vec<String>,
}

enum RawExpr {
    Enum(RawEnum),
    Struct(RawStruct),
    Union(RawUnion),
    Alternate(RawAlternate),
    Command(RawCommand),
    Event(RawEvent),
}

impl RawExpr {
    fn from_value(v: Value) -> Result<Self, SchemaError> {
        fn de<T: for<'de> Deserialize<'de>>(v: Value, what: &str) -> Result<T, SchemaError> {
            let shown = v.to_string();
            serde_json::from_value(v).map_err(|e| SchemaError(format!("bad {what} {shown}: {e}")))
        }
        let keys = ["enum", "struct", "union", "alternate", "command", "event"];
        let kind = v
            .as_object()
            .and_then(|o| keys.into_iter().find(|k| o.contains_key(*k)));
        Ok(match kind {
            Some("enum") => RawExpr::Enum(de(v, "enum")?),
            Some("struct") => RawExpr::Struct(de(v, "struct")?),
            Some("union") => RawExpr::Union(de(v, "union")?),
            Some("alternate") => RawExpr::Alternate(de(v, "alternate")?),
            Some("command") => RawExpr::Command(de(v, "command")?),
            Some("event") => RawExpr::Event(de(v, "event")?),
            _ => return err(format!("not a definition: {v}")),
        })
    }
}

/// QAPI syntax is JSON with single quotes and `#` comments.  The schema's strings contain
/// neither quote characters nor `#`, which makes a textual rewrite exact.
fn source_to_json(src: &str) -> String {
    src.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .map(|line| line.replace('\'', "\""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn type_ref(raw: RawType) -> TypeRef {
    let canonical = |n: String| {
        if INT_ALIASES.contains(&n.as_str()) {
            "int".to_owned()
        } else {
            n
        }
    };
    match raw {
        RawType::Name(n) => TypeRef::Named(canonical(n)),
        RawType::Array([n]) => TypeRef::Array(canonical(n)),
    }
}

fn parse_members(data: &Map<String, Value>, owner: &str) -> Result<Vec<Member>, SchemaError> {
    data.iter()
        .map(|(key, v)| {
            let raw: RawMember = serde_json::from_value(v.clone())
                .map_err(|e| SchemaError(format!("{owner}: member {key}: {e}")))?;
            let (ty, features) = match raw {
                RawMember::Plain(t) => (t, Vec::new()),
                RawMember::Full(f) => (f.ty, f.features),
            };
            let (name, optional) = match key.strip_prefix('*') {
                Some(n) => (n.to_owned(), true),
                None => (key.clone(), false),
            };
            Ok(Member {
                name,
                ty: type_ref(ty),
                optional,
                features,
            })
        })
        .collect()
}

fn is_builtin(name: &str) -> bool {
    BUILTINS.iter().any(|(b, _)| *b == name)
}

impl Schema {
    fn parse(src: &str) -> Result<Schema, SchemaError> {
        let json = source_to_json(src);
        let mut raws = Vec::new();
        for v in serde_json::Deserializer::from_str(&json).into_iter::<Value>() {
            let v = v.map_err(|e| SchemaError(format!("syntax: {e}")))?;
            raws.push(RawExpr::from_value(v)?);
        }
        Builder::default().build(raws)
    }

    fn def(&self, name: &str) -> Option<&Def> {
        self.defs.get(name)
    }

    fn render(&self, commands: Option<&HashSet<&str>>, mask: bool) -> Value {
        let mut r = Renderer {
            schema: self,
            mask,
            used: Vec::new(),
            seen: HashSet::new(),
            numbers: HashMap::new(),
        };
        let mut out = Vec::new();
        for e in &self.entities {
            if e.kind == EntityKind::Command
                && commands.is_some_and(|c| !c.contains(e.name.as_str()))
            {
                continue;
            }
            let mut info = Map::new();
            info.insert("name".into(), json!(e.name));
            let arg = r.use_type(&TypeRef::Named(e.arg.clone()));
            match e.kind {
                EntityKind::Command => {
                    info.insert("meta-type".into(), json!("command"));
                    info.insert("arg-type".into(), json!(arg));
                    info.insert("ret-type".into(), json!(r.use_type(&e.ret)));
                }
                EntityKind::Event => {
                    info.insert("meta-type".into(), json!("event"));
                    info.insert("arg-type".into(), json!(arg));
                }
            }
            add_features(&mut info, &e.features);
            out.push(Value::Object(info));
        }
        // Rendering a type may use more types; they join the end of the queue.
        let mut i = 0;
        while i < r.used.len() {
            let t = r.used[i].clone();
            out.push(r.render_type(&t));
            i += 1;
        }
        Value::Array(out)
    }
}

fn add_features(info: &mut Map<String, Value>, features: &[String]) {
    if !features.is_empty() {
        info.insert("features".into(), json!(features));
    }
}

struct Renderer<'a> {
    schema: &'a Schema,
    mask: bool,
    used: Vec<TypeRef>,
    seen: HashSet<TypeRef>,
    numbers: HashMap<String, String>,
}

impl Renderer<'_> {
    /// The name a type goes by in the output; queues it for rendering on first use.
    fn use_type(&mut self, t: &TypeRef) -> String {
        if self.seen.insert(t.clone()) {
            self.used.push(t.clone());
        }
        match t {
            TypeRef::Named(n) if is_builtin(n) => n.clone(),
            TypeRef::Named(n) => self.masked(n),
            TypeRef::Array(e) => format!("[{}]", self.use_type(&TypeRef::Named(e.clone()))),
        }
    }

    fn masked(&mut self, name: &str) -> String {
        if !self.mask {
            return name.to_owned();
        }
        let next = self.numbers.len().to_string();
        self.numbers.entry(name.to_owned()).or_insert(next).clone()
    }

    fn render_type(&mut self, t: &TypeRef) -> Value {
        let mut info = Map::new();
        info.insert("name".into(), json!(self.use_type(t)));
        let name = match t {
            TypeRef::Array(e) => {
                info.insert("meta-type".into(), json!("array"));
                let elem = self.use_type(&TypeRef::Named(e.clone()));
                info.insert("element-type".into(), json!(elem));
                return Value::Object(info);
            }
            TypeRef::Named(n) => n,
        };
        if let Some((_, json_type)) = BUILTINS.iter().find(|(b, _)| b == name) {
            info.insert("meta-type".into(), json!("builtin"));
            info.insert("json-type".into(), json!(json_type));
            return Value::Object(info);
        }
        let schema = self.schema;
        match schema.def(name) {
            Some(Def::Enum { values, features }) => {
                info.insert("meta-type".into(), json!("enum"));
                let members: Vec<Value> = values
                    .iter()
                    .map(|(v, f)| {
                        let mut m = Map::new();
                        m.insert("name".into(), json!(v));
                        add_features(&mut m, f);
                        Value::Object(m)
                    })
                    .collect();
                info.insert("members".into(), Value::Array(members));
                let plain: Vec<&str> = values.iter().map(|(v, _)| v.as_str()).collect();
                info.insert("values".into(), json!(plain));
                add_features(&mut info, features);
            }
            Some(Def::Object {
                members,
                tag,
                variants,
                features,
            }) => {
                info.insert("meta-type".into(), json!("object"));
                let members: Vec<Value> = members
                    .iter()
                    .map(|m| {
                        let mut mv = Map::new();
                        mv.insert("name".into(), json!(m.name));
                        mv.insert("type".into(), json!(self.use_type(&m.ty)));
                        if m.optional {
                            mv.insert("default".into(), Value::Null);
                        }
                        add_features(&mut mv, &m.features);
                        Value::Object(mv)
                    })
                    .collect();
                info.insert("members".into(), Value::Array(members));
                if let Some(tag) = tag {
                    info.insert("tag".into(), json!(tag));
                    let variants: Vec<Value> = variants
                        .iter()
                        .map(|(case, ty)| {
                            let ty = self.use_type(&TypeRef::Named(ty.clone()));
                            json!({ "case": case, "type": ty })
                        })
                        .collect();
                    info.insert("variants".into(), Value::Array(variants));
                }
                add_features(&mut info, features);
            }
            Some(Def::Alternate { members, features }) => {
                info.insert("meta-type".into(), json!("alternate"));
                let members: Vec<Value> = members
                    .iter()
                    .map(|m| json!({ "type": self.use_type(m) }))
                    .collect();
                info.insert("members".into(), Value::Array(members));
                add_features(&mut info, features);
            }
            // Parsing checked that every reference resolves.
            None => unreachable!("unresolved type {name} in a checked schema"),
        }
        Value::Object(info)
    }
}

// ---- building and checking ----

#[derive(Default)]
struct Builder {
    enums: HashMap<String, RawEnum>,
    structs: HashMap<String, RawStruct>,
    unions: HashMap<String, RawUnion>,
    alternates: HashMap<String, RawAlternate>,
    struct_members: HashMap<String, Vec<Member>>,
}

impl Builder {
    fn build(mut self, raws: Vec<RawExpr>) -> Result<Schema, SchemaError> {
        let mut names: HashSet<String> = BUILTINS.iter().map(|(b, _)| b.to_string()).collect();
        names.insert(EMPTY_OBJECT.to_owned());
        let mut entity_raws = Vec::new();
        for raw in raws {
            let name = match &raw {
                RawExpr::Enum(e) => e.name.clone(),
                RawExpr::Struct(s) => s.name.clone(),
                RawExpr::Union(u) => u.name.clone(),
                RawExpr::Alternate(a) => a.name.clone(),
                RawExpr::Command(c) => format!("command {}", c.name),
                RawExpr::Event(e) => format!("event {}", e.name),
            };
            if !names.insert(name.clone()) {
                return err(format!("{name} is defined twice"));
            }
            match raw {
                RawExpr::Enum(e) => {
                    self.enums.insert(name, e);
                }
                RawExpr::Struct(s) => {
                    self.structs.insert(name, s);
                }
                RawExpr::Union(u) => {
                    self.unions.insert(name, u);
                }
                RawExpr::Alternate(a) => {
                    self.alternates.insert(name, a);
                }
                RawExpr::Command(c) => entity_raws.push(RawEntity {
                    name: c.name,
                    kind: EntityKind::Command,
                    data: c.data,
                    returns: c.returns,
                    features: c.features,
                }),
                RawExpr::Event(e) => entity_raws.push(RawEntity {
                    name: e.name,
                    kind: EntityKind::Event,
                    data: e.data,
                    returns: None,
                    features: e.features,
                }),
            }
        }

        let mut defs = HashMap::new();
        defs.insert(
            EMPTY_OBJECT.to_owned(),
            Def::Object {
                members: Vec::new(),
                tag: None,
                variants: Vec::new(),
                features: Vec::new(),
            },
        );
        let mut entities = Vec::new();
        for RawEntity {
            name,
            kind,
            data,
            returns,
            features,
        } in entity_raws
        {
            let arg = match data {
                None => EMPTY_OBJECT.to_owned(),
                Some(RawData::Named(t)) => {
                    if !self.structs.contains_key(&t) && !self.unions.contains_key(&t) {
                        return err(format!("{name}: arguments {t} are not an object type"));
                    }
                    t
                }
                Some(RawData::Inline(m)) => {
                    let implicit = format!("q_obj_{name}-arg");
                    let members = parse_members(&m, &name)?;
                    check_unique(&members, &name)?;
                    defs.insert(
                        implicit.clone(),
                        Def::Object {
                            members,
                            tag: None,
                            variants: Vec::new(),
                            features: Vec::new(),
                        },
                    );
                    implicit
                }
            };
            let ret = returns.map_or(TypeRef::Named(EMPTY_OBJECT.to_owned()), type_ref);
            entities.push(Entity {
                name,
                kind,
                arg,
                ret,
                features,
            });
        }

        for (name, e) in &self.enums {
            let values: Vec<(String, Vec<String>)> = e
                .data
                .iter()
                .map(|v| match v {
                    RawEnumValue::Name(n) => (n.clone(), Vec::new()),
                    RawEnumValue::Full(f) => (f.name.clone(), f.features.clone()),
                })
                .collect();
            let mut seen = HashSet::new();
            if let Some((dup, _)) = values.iter().find(|(v, _)| !seen.insert(v.clone())) {
                return err(format!("{name}: value {dup} listed twice"));
            }
            defs.insert(
                name.clone(),
                Def::Enum {
                    values,
                    features: e.features.clone(),
                },
            );
        }
        let struct_names: Vec<String> = self.structs.keys().cloned().collect();
        for name in struct_names {
            let members = self.members_of_struct(&name, &mut Vec::new())?;
            defs.insert(
                name.clone(),
                Def::Object {
                    members,
                    tag: None,
                    variants: Vec::new(),
                    features: self.structs[&name].features.clone(),
                },
            );
        }
        let union_names: Vec<String> = self.unions.keys().cloned().collect();
        for name in union_names {
            let def = self.union_def(&name)?;
            defs.insert(name, def);
        }
        for (name, a) in &self.alternates {
            let members = parse_members(&a.data, name)?;
            if members.iter().any(|m| m.optional || !m.features.is_empty()) {
                return err(format!("{name}: alternatives are plain types"));
            }
            defs.insert(
                name.clone(),
                Def::Alternate {
                    members: members.into_iter().map(|m| m.ty).collect(),
                    features: a.features.clone(),
                },
            );
        }

        let schema = Schema { defs, entities };
        check_references(&schema)?;
        Ok(schema)
    }

    /// A struct's members: its base's, then its own.
    fn members_of_struct(
        &mut self,
        name: &str,
        stack: &mut Vec<String>,
    ) -> Result<Vec<Member>, SchemaError> {
        if let Some(m) = self.struct_members.get(name) {
            return Ok(m.clone());
        }
        if stack.iter().any(|s| s == name) {
            return err(format!("{name} is its own base"));
        }
        let Some(raw) = self.structs.get(name) else {
            return err(format!("{name} is not a struct"));
        };
        let own = parse_members(&raw.data, name)?;
        let base = raw.base.clone();
        let mut members = match base {
            Some(b) => {
                stack.push(name.to_owned());
                let m = self.members_of_struct(&b, stack)?;
                stack.pop();
                m
            }
            None => Vec::new(),
        };
        members.extend(own);
        check_unique(&members, name)?;
        self.struct_members.insert(name.to_owned(), members.clone());
        Ok(members)
    }

    fn union_def(&mut self, name: &str) -> Result<Def, SchemaError> {
        let u = &self.unions[name];
        let discriminator = u.discriminator.clone();
        let features = u.features.clone();
        let cases: Vec<(String, Value)> =
            u.data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let members = match &u.base {
            RawData::Inline(m) => {
                let m = parse_members(m, name)?;
                check_unique(&m, name)?;
                m
            }
            RawData::Named(b) => {
                let b = b.clone();
                self.members_of_struct(&b, &mut vec![name.to_owned()])?
            }
        };
        let Some(tag) = members.iter().find(|m| m.name == discriminator) else {
            return err(format!("{name}: no base member {discriminator}"));
        };
        let tag_enum = match (&tag.ty, tag.optional) {
            (TypeRef::Named(t), false) if self.enums.contains_key(t) => t.clone(),
            _ => return err(format!("{name}: {discriminator} must be a mandatory enum")),
        };
        let values: Vec<String> = self.enums[&tag_enum]
            .data
            .iter()
            .map(|v| match v {
                RawEnumValue::Name(n) => n.clone(),
                RawEnumValue::Full(f) => f.name.clone(),
            })
            .collect();
        let mut variants = Vec::new();
        for (case, ty) in cases {
            let Some(ty) = ty.as_str().map(str::to_owned) else {
                return err(format!("{name}: branch {case} must name a struct"));
            };
            if !values.contains(&case) {
                return err(format!("{name}: {case} is not a value of {tag_enum}"));
            }
            let branch = self.members_of_struct(&ty, &mut vec![name.to_owned()])?;
            if let Some(clash) = branch
                .iter()
                .find(|b| members.iter().any(|m| m.name == b.name))
            {
                return err(format!("{name}: branch {case} redefines {}", clash.name));
            }
            variants.push((case, ty));
        }
        // Like QEMU, values without a branch select an empty one.
        for v in values {
            if !variants.iter().any(|(c, _)| *c == v) {
                variants.push((v, EMPTY_OBJECT.to_owned()));
            }
        }
        Ok(Def::Object {
            members,
            tag: Some(discriminator),
            variants,
            features,
        })
    }
}

fn check_unique(members: &[Member], owner: &str) -> Result<(), SchemaError> {
    let mut seen = HashSet::new();
    match members.iter().find(|m| !seen.insert(m.name.as_str())) {
        Some(m) => err(format!("{owner}: member {} defined twice", m.name)),
        None => Ok(()),
    }
}

fn check_references(schema: &Schema) -> Result<(), SchemaError> {
    let known = |t: &str| is_builtin(t) || schema.defs.contains_key(t);
    let check = |t: &TypeRef, owner: &str| {
        if known(t.element()) {
            Ok(())
        } else {
            err(format!("{owner} refers to undefined type {}", t.element()))
        }
    };
    for e in &schema.entities {
        check(&TypeRef::Named(e.arg.clone()), &e.name)?;
        check(&e.ret, &e.name)?;
    }
    for (name, def) in &schema.defs {
        match def {
            Def::Enum { .. } => {}
            Def::Object { members, .. } => {
                for m in members {
                    check(&m.ty, name)?;
                }
            }
            Def::Alternate { members, .. } => {
                for m in members {
                    check(m, name)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(list: &Value) -> HashMap<String, Value> {
        let mut idx = HashMap::new();
        for e in list.as_array().expect("SchemaInfo list") {
            let name = e["name"].as_str().expect("name").to_owned();
            assert!(
                idx.insert(name.clone(), e.clone()).is_none(),
                "{name} twice"
            );
        }
        idx
    }

    /// Every type name an entry refers to.
    fn references(e: &Value) -> Vec<String> {
        let mut refs = Vec::new();
        let mut push = |v: &Value| refs.push(v.as_str().expect("type name").to_owned());
        match e["meta-type"].as_str().expect("meta-type") {
            "command" => {
                push(&e["arg-type"]);
                push(&e["ret-type"]);
            }
            "event" => push(&e["arg-type"]),
            "array" => push(&e["element-type"]),
            "object" => {
                for m in e["members"].as_array().expect("members") {
                    push(&m["type"]);
                }
                for v in e["variants"].as_array().into_iter().flatten() {
                    push(&v["type"]);
                }
            }
            "alternate" => {
                for m in e["members"].as_array().expect("members") {
                    push(&m["type"]);
                }
            }
            "enum" | "builtin" => {}
            other => panic!("unknown meta-type {other}"),
        }
        refs
    }

    /// Checks what a client may rely on: unique names, no dangling reference, every type
    /// reachable from a command or event, masked names for everything but builtins.
    fn assert_well_formed(list: &Value) {
        let idx = index(list);
        let mut reachable = HashSet::new();
        let mut todo: Vec<String> = idx
            .values()
            .filter(|e| matches!(e["meta-type"].as_str(), Some("command" | "event")))
            .map(|e| e["name"].as_str().expect("name").to_owned())
            .collect();
        while let Some(n) = todo.pop() {
            if !reachable.insert(n.clone()) {
                continue;
            }
            let e = idx
                .get(&n)
                .unwrap_or_else(|| panic!("dangling type name {n}"));
            todo.extend(references(e));
        }
        let unreachable: Vec<&String> = idx.keys().filter(|n| !reachable.contains(*n)).collect();
        assert!(unreachable.is_empty(), "unreachable: {unreachable:?}");
        for (name, e) in &idx {
            match e["meta-type"].as_str().expect("meta-type") {
                "builtin" => assert!(is_builtin(name), "{name}"),
                "array" => assert!(name.starts_with('[') && name.ends_with(']'), "{name}"),
                "command" | "event" => {}
                _ => assert!(name.parse::<u32>().is_ok(), "unmasked type name {name}"),
            }
        }
    }

    fn entry<'a>(idx: &'a HashMap<String, Value>, name: &str) -> &'a Value {
        idx.get(name).unwrap_or_else(|| panic!("{name} missing"))
    }

    #[test]
    fn bundled_schema_is_valid() {
        Schema::parse(SOURCE).expect("schema parses and checks");
    }

    #[test]
    fn schema_describes_every_daemon_command() {
        let described = command_names();
        let missing: Vec<&&str> = crate::commands::COMMANDS
            .iter()
            .filter(|c| !described.contains(c))
            .collect();
        assert!(missing.is_empty(), "commands without schema: {missing:?}");
        let advertised = schema_info_for(crate::commands::COMMANDS);
        let listed = advertised
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["meta-type"] == "command")
            .count();
        assert_eq!(listed, crate::commands::COMMANDS.len());
    }

    #[test]
    fn full_schema_is_well_formed() {
        let list = schema_info();
        assert_well_formed(&list);
        let idx = index(&list);
        for (b, json_type) in BUILTINS {
            assert_eq!(entry(&idx, b)["json-type"], json_type);
        }
        for c in [
            "blockdev-add",
            "x-blockdev-del",
            "query-qmp-schema",
            "qom-set",
        ] {
            assert_eq!(entry(&idx, c)["meta-type"], "command");
        }
        assert_eq!(entry(&idx, "BLOCK_JOB_READY")["meta-type"], "event");
    }

    #[test]
    fn blockdev_add_describes_every_supported_driver() {
        let list = schema().render(None, false);
        let idx = index(&list);
        let opts = entry(
            &idx,
            entry(&idx, "blockdev-add")["arg-type"].as_str().unwrap(),
        );
        assert_eq!(opts["tag"], "driver");
        let variants = opts["variants"].as_array().unwrap();
        // The drivers are those of the block layer's registry, each described.
        for d in block::driver_names() {
            let v = variants
                .iter()
                .find(|v| v["case"] == d)
                .unwrap_or_else(|| panic!("no variant for driver {d}"));
            assert_ne!(v["type"], EMPTY_OBJECT, "driver {d} has no members");
        }
        let mut listed: Vec<&str> = entry(&idx, "BlockdevDriver")["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let mut registered: Vec<&str> = block::driver_names().collect();
        listed.sort_unstable();
        registered.sort_unstable();
        assert_eq!(
            listed, registered,
            "BlockdevDriver and the driver registry differ"
        );
    }

    #[test]
    fn filtered_schema_keeps_only_requested_commands() {
        let list = schema_info_for(&["query-version", "quit", "no-such-command"]);
        assert_well_formed(&list);
        let entries = list.as_array().unwrap();
        let commands: Vec<&str> = entries
            .iter()
            .filter(|e| e["meta-type"] == "command")
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(commands, ["query-version", "quit"]);
        let events = entries.iter().filter(|e| e["meta-type"] == "event").count();
        assert_eq!(events, event_names().len());
        assert!(entries.len() < schema_info().as_array().unwrap().len());
    }

    #[test]
    fn names_are_numbered_in_order_of_first_use() {
        let list = schema_info_for(&["query-version"]);
        let entries = list.as_array().unwrap();
        // The first entity's argument type is the first type used.
        assert_eq!(entries[0]["name"], "JOB_STATUS_CHANGE");
        assert_eq!(entries[0]["arg-type"], "0");
        let numbered: Vec<u32> = entries
            .iter()
            .filter_map(|e| e["name"].as_str().and_then(|n| n.parse().ok()))
            .collect();
        let mut sorted = numbered.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..numbered.len() as u32).collect::<Vec<_>>());
    }

    #[test]
    fn schema_describes_the_planned_commands_and_events() {
        let mut commands = command_names();
        commands.sort_unstable();
        let mut planned = vec![
            "qmp_capabilities",
            "query-version",
            "query-commands",
            "query-qmp-schema",
            "quit",
            "blockdev-add",
            "blockdev-del",
            "x-blockdev-del",
            "query-named-block-nodes",
            "x-debug-query-block-graph",
            "query-block",
            "nbd-server-start",
            "nbd-server-stop",
            "nbd-server-add",
            "nbd-server-remove",
            "block-export-add",
            "block-export-del",
            "query-block-exports",
            "query-block-jobs",
            "query-jobs",
            "block-job-set-speed",
            "block-job-cancel",
            "block-job-pause",
            "block-job-resume",
            "block-job-complete",
            "block-job-dismiss",
            "block-job-finalize",
            "job-pause",
            "job-resume",
            "job-cancel",
            "job-complete",
            "job-dismiss",
            "job-finalize",
            "blockdev-backup",
            "drive-backup",
            "blockdev-mirror",
            "drive-mirror",
            "block-stream",
            "block-commit",
            "block-job-change",
            "x-blockdev-amend",
            "block-dirty-bitmap-add",
            "block-dirty-bitmap-remove",
            "block-dirty-bitmap-clear",
            "block-dirty-bitmap-enable",
            "block-dirty-bitmap-disable",
            "block-dirty-bitmap-merge",
            "x-debug-block-dirty-bitmap-sha256",
            "transaction",
            "blockdev-snapshot-sync",
            "blockdev-snapshot",
            "block_resize",
            "block-set-write-threshold",
            "query-blockstats",
            "blockdev-create",
            "blockdev-reopen",
            "change-backing-file",
            "object-add",
            "object-del",
            "qom-set",
            "qom-get",
            "qom-list",
            "qom-list-types",
            "qom-list-properties",
            "block_set_io_throttle",
            "blockdev-snapshot-internal-sync",
            "blockdev-snapshot-delete-internal-sync",
            "x-blockdev-change",
            "x-blockdev-set-iothread",
            "blockdev-set-active",
            "query-chardev",
            "query-chardev-backends",
            "ringbuf-write",
            "ringbuf-read",
            "chardev-add",
            "chardev-change",
            "chardev-remove",
            "chardev-send-break",
        ];
        planned.sort_unstable();
        assert_eq!(commands, planned);
        let mut events = event_names();
        events.sort_unstable();
        assert_eq!(
            events,
            [
                "BLOCK_EXPORT_DELETED",
                "BLOCK_JOB_CANCELLED",
                "BLOCK_JOB_COMPLETED",
                "BLOCK_JOB_ERROR",
                "BLOCK_JOB_PENDING",
                "BLOCK_JOB_READY",
                "BLOCK_WRITE_THRESHOLD",
                "JOB_STATUS_CHANGE",
                "QUORUM_FAILURE",
                "QUORUM_REPORT_BAD",
            ]
        );
    }

    #[test]
    fn int_aliases_render_as_int() {
        let list = schema().render(None, false);
        let idx = index(&list);
        let threshold = entry(&idx, "q_obj_block-set-write-threshold-arg");
        assert_eq!(threshold["members"][1]["type"], "int");
        assert!(!idx.contains_key("uint64"));
    }

    fn parse_err(src: &str) -> String {
        Schema::parse(src).expect_err("schema must be refused").0
    }

    #[test]
    fn refuses_broken_schemas() {
        assert!(parse_err("{ 'command': 'x', 'data': { 'a': 'Nope' } }").contains("Nope"));
        assert!(
            parse_err("{ 'enum': 'E', 'data': ['a'] } { 'enum': 'E', 'data': ['b'] }")
                .contains("twice")
        );
        assert!(parse_err("{ 'struct': 'S', 'data': { }, 'bogus': 1 }").contains("bogus"));
        assert!(parse_err(
            "{ 'struct': 'S', 'data': { 'a': 'str' } }
             { 'union': 'U', 'base': { 'kind': 'str' }, 'discriminator': 'kind',
               'data': { 'x': 'S' } }"
        )
        .contains("mandatory enum"));
        assert!(parse_err(
            "{ 'enum': 'K', 'data': ['x'] } { 'struct': 'S', 'data': { } }
             { 'union': 'U', 'base': { 'kind': 'K' }, 'discriminator': 'kind',
               'data': { 'y': 'S' } }"
        )
        .contains("not a value"));
        assert!(parse_err("{ 'struct': 'A', 'base': 'B', 'data': { } } { 'struct': 'B', 'base': 'A', 'data': { } }")
            .contains("own base"));
        assert!(parse_err("{ 'struct': 'A', 'base': 'B', 'data': { 'x': 'int' } } { 'struct': 'B', 'data': { 'x': 'str' } }")
            .contains("twice"));
    }

    #[test]
    fn unions_fill_unlisted_values_with_the_empty_branch() {
        let s = Schema::parse(
            "{ 'enum': 'K', 'data': ['x', 'y'] }
             { 'struct': 'S', 'data': { 'v': 'size' } }
             { 'union': 'U', 'base': { 'kind': 'K' }, 'discriminator': 'kind',
               'data': { 'y': 'S' } }
             { 'command': 'c', 'data': 'U', 'returns': ['S'] }",
        )
        .unwrap();
        let list = s.render(None, false);
        let idx = index(&list);
        assert_eq!(
            entry(&idx, "U")["variants"],
            json!([{ "case": "y", "type": "S" }, { "case": "x", "type": "q_empty" }])
        );
        assert_eq!(entry(&idx, "c")["ret-type"], "[S]");
        assert_eq!(
            entry(&idx, "S")["members"],
            json!([{ "name": "v", "type": "int" }])
        );
        let masked = s.render(None, true);
        assert_eq!(
            masked[0],
            json!({ "name": "c", "meta-type": "command", "arg-type": "0", "ret-type": "[1]" })
        );
    }

    // ---- differential test against qemu-storage-daemon ----

    mod qsd {
        use std::io::{BufRead, BufReader, Write};
        use std::os::unix::net::UnixStream;
        use std::process::{Child, Command, Stdio};
        use std::time::{Duration, Instant};

        use serde_json::{json, Value};

        struct Daemon(Child);

        impl Drop for Daemon {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }

        /// qsd's `query-qmp-schema`, or None when qemu-storage-daemon is not installed.
        pub fn schema() -> Option<Value> {
            let dir = tempfile::tempdir().expect("temp dir");
            let sock = dir.path().join("qmp.sock");
            let spawned = Command::new("qemu-storage-daemon")
                .arg("--chardev")
                .arg(format!(
                    "socket,id=m0,path={},server=on,wait=off",
                    sock.display()
                ))
                .args(["--monitor", "chardev=m0"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn();
            let _daemon = match spawned {
                Ok(child) => Daemon(child),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
                Err(e) => panic!("starting qemu-storage-daemon: {e}"),
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            let stream = loop {
                match UnixStream::connect(&sock) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => panic!("qsd monitor: {e}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            let mut writer = stream.try_clone().expect("clone socket");
            let mut reader = BufReader::new(stream);
            let mut read = || {
                let mut line = String::new();
                reader.read_line(&mut line).expect("read from qsd");
                serde_json::from_str::<Value>(&line).expect("qsd speaks JSON")
            };
            assert!(read().get("QMP").is_some(), "greeting");
            let mut execute = |cmd: &str| {
                writeln!(writer, "{}", json!({ "execute": cmd })).expect("write to qsd");
                loop {
                    let reply = read();
                    if let Some(r) = reply.get("return") {
                        return r.clone();
                    }
                    assert!(reply.get("event").is_some(), "{cmd} failed: {reply}");
                }
            };
            execute("qmp_capabilities");
            Some(execute("query-qmp-schema"))
        }
    }

    /// Whether our type `a` describes what qsd's type `b` does, by structure: the same
    /// members (any order, same optionality, compatible types); our enum values, union
    /// branches and features a subset of qsd's, since blockd leaves out drivers and object
    /// types it does not implement.
    fn compatible(
        ours: &HashMap<String, Value>,
        a: &str,
        theirs: &HashMap<String, Value>,
        b: &str,
        seen: &mut HashSet<(String, String)>,
        path: &str,
    ) -> Result<(), String> {
        if !seen.insert((a.to_owned(), b.to_owned())) {
            return Ok(());
        }
        let ea = ours.get(a).ok_or(format!("{path}: we lack {a}"))?;
        let eb = theirs.get(b).ok_or(format!("{path}: qsd lacks {b}"))?;
        let kind = ea["meta-type"].as_str().unwrap_or_default();
        if ea["meta-type"] != eb["meta-type"] {
            return Err(format!("{path}: {kind} here, {} in qsd", eb["meta-type"]));
        }
        let subset = |x: &Value, y: &Value, what: &str| -> Result<(), String> {
            let ys: Vec<&Value> = y.as_array().into_iter().flatten().collect();
            match x.as_array().into_iter().flatten().find(|v| !ys.contains(v)) {
                Some(v) => Err(format!("{path}: {what} {v} not in qsd")),
                None => Ok(()),
            }
        };
        subset(&ea["features"], &eb["features"], "feature")?;
        let mut recurse = |x: &Value, y: &Value, sub: &str| {
            let (x, y) = (
                x.as_str().unwrap_or_default(),
                y.as_str().unwrap_or_default(),
            );
            compatible(ours, x, theirs, y, seen, &format!("{path}.{sub}"))
        };
        match kind {
            "builtin" => (a == b).then_some(()).ok_or(format!("{path}: {a} vs {b}")),
            "array" => recurse(&ea["element-type"], &eb["element-type"], "[]"),
            "enum" => {
                for m in ea["members"].as_array().unwrap() {
                    let Some(t) = eb["members"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|t| t["name"] == m["name"])
                    else {
                        return Err(format!("{path}: value {} not in qsd", m["name"]));
                    };
                    subset(&m["features"], &t["features"], "feature")?;
                }
                Ok(())
            }
            "command" | "event" => {
                recurse(&ea["arg-type"], &eb["arg-type"], "arg")?;
                if kind == "command" {
                    recurse(&ea["ret-type"], &eb["ret-type"], "ret")?;
                }
                Ok(())
            }
            "alternate" => {
                let (ma, mb) = (
                    ea["members"].as_array().unwrap(),
                    eb["members"].as_array().unwrap(),
                );
                if ma.len() != mb.len() {
                    return Err(format!(
                        "{path}: {} alternatives, qsd has {}",
                        ma.len(),
                        mb.len()
                    ));
                }
                for (i, (x, y)) in ma.iter().zip(mb).enumerate() {
                    recurse(&x["type"], &y["type"], &i.to_string())?;
                }
                Ok(())
            }
            "object" => {
                let (ma, mb) = (
                    ea["members"].as_array().unwrap(),
                    eb["members"].as_array().unwrap(),
                );
                for y in mb {
                    if !ma.iter().any(|x| x["name"] == y["name"]) {
                        return Err(format!("{path}: we lack member {}", y["name"]));
                    }
                }
                for x in ma {
                    let name = x["name"].as_str().unwrap_or_default();
                    let Some(y) = mb.iter().find(|y| y["name"] == x["name"]) else {
                        let extension = BLOCKD_EXTENSIONS
                            .iter()
                            .any(|(at, member)| path.ends_with(at) && *member == name);
                        if extension && x.get("default").is_some() {
                            continue;
                        }
                        return Err(format!("{path}: member {name} not in qsd"));
                    };
                    if x.get("default").is_some() != y.get("default").is_some() {
                        return Err(format!("{path}.{name}: optionality differs"));
                    }
                    subset(&x["features"], &y["features"], "feature")?;
                    recurse(&x["type"], &y["type"], name)?;
                }
                if ea["tag"] != eb["tag"] {
                    return Err(format!("{path}: tag {} vs {}", ea["tag"], eb["tag"]));
                }
                for x in ea["variants"].as_array().into_iter().flatten() {
                    let case = x["case"].as_str().unwrap_or_default();
                    let Some(y) = eb["variants"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|y| y["case"] == x["case"])
                    else {
                        return Err(format!("{path}: branch {case} not in qsd"));
                    };
                    recurse(&x["type"], &y["type"], &format!("({case})"))?;
                }
                Ok(())
            }
            other => Err(format!("{path}: unexpected meta-type {other}")),
        }
    }

    /// Optional members blockd takes or gives beyond qsd's (where the path ends, the
    /// member), each documented where it is handled: vhdx's `backing` is
    /// a differencing image's parent, which QEMU does not open; the mirror's and active
    /// commit's estimates are blockd's own (jobs' mirror.rs).
    const BLOCKD_EXTENSIONS: &[(&str, &str)] = &[
        ("", "x-auto-write-blocking"),
        ("(vhdx)", "backing"),
        ("(mirror)", "x-copy-rate"),
        ("(mirror)", "x-dirty-rate"),
        ("(mirror)", "x-seconds-to-ready"),
        ("(commit)", "x-copy-rate"),
        ("(commit)", "x-dirty-rate"),
        ("(commit)", "x-seconds-to-ready"),
    ];

    #[test]
    fn matches_qemu_storage_daemon() {
        let theirs = qsd::schema().expect(
            "test peer qemu-storage-daemon is not installed: install the Debian package qemu-utils (.ci/run installs every test peer)",
        );
        let theirs = index(&theirs);
        let ours = index(&schema_info());
        let mut compared = Vec::new();
        let mut failures = Vec::new();
        for name in command_names().into_iter().chain(event_names()) {
            if !theirs.contains_key(name) {
                continue;
            }
            compared.push(name);
            if let Err(e) = compatible(&ours, name, &theirs, name, &mut HashSet::new(), name) {
                failures.push(e);
            }
        }
        assert!(
            failures.is_empty(),
            "differences from qsd:\n{}",
            failures.join("\n")
        );
        for c in [
            "query-named-block-nodes",
            "blockdev-del",
            "block-job-cancel",
            "blockdev-backup",
            "blockdev-add",
        ] {
            assert!(compared.contains(&c), "{c} not compared");
        }
        // Only x-blockdev-del and block_set_io_throttle, the 2.8 commands, are ours alone.
        assert_eq!(
            compared.len() + 2,
            command_names().len() + event_names().len()
        );
    }
}
