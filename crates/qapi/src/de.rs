//! QEMU-compatible deserialization of QMP arguments.
//!
//! [`from_value`] reads JSON arguments as QMP gives them; [`from_keyval`] reads the output of
//! the keyval parser, where every scalar is a string (`size=1k`, `read-only=on`). Either way
//! the errors are QEMU's texts, with QEMU's dotted member paths (`file.filename`,
//! `bitmaps[0].name` over QMP, `inject-error.0.errno` on the command line).
//!
//! Structs are read member by member in declaration order and members the struct does not
//! declare are refused after it was read (no `deny_unknown_fields` needed), picking the
//! member QEMU would name when several are unknown. Absent members are left to serde, so
//! optional members are `Option<T>` or `#[serde(default)]`.
//!
//! serde's tagged and untagged enums buffer their input and lose the member paths, so QAPI
//! flat unions and alternates are written by hand with [`union`] and [`alternate`].

use crate::error::QmpError;
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::Rc;

/// Reads `T` from QMP arguments (JSON).
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, QmpError> {
    run(value, Mode::Qmp)
}

/// Reads `T` from command-line options parsed by [`crate::keyval`]: every scalar is a string.
pub fn from_keyval<T: DeserializeOwned>(value: Value) -> Result<T, QmpError> {
    run(value, Mode::Keyval)
}

fn run<T: DeserializeOwned>(value: Value, mode: Mode) -> Result<T, QmpError> {
    let _mode = ModeGuard::enter(mode);
    T::deserialize(ValueDe::new(value, mode)).map_err(|e| QmpError::generic(e.render(mode)))
}

/// A QAPI `size` (bytes): a JSON integer over QMP, `1536`, `1.5k` or `0x600` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Size(pub u64);

const SIZE_TOKEN: &str = "$qapi::de::Size";

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl<'de> Visitor<'de> for SizeVisitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_newtype_struct<D: de::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<Size, D::Error> {
                u64::deserialize(d).map(Size)
            }
        }
        d.deserialize_newtype_struct(SIZE_TOKEN, SizeVisitor)
    }
}

/// Where the arguments come from; decides how scalars are read and paths are spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Qmp,
    Keyval,
}

thread_local! {
    static MODE: Cell<Mode> = const { Cell::new(Mode::Qmp) };
    static STASH: RefCell<Option<Error>> = const { RefCell::new(None) };
}

/// Makes the mode visible to [`union`] and [`alternate`], which only see a generic deserializer.
struct ModeGuard(Mode);

impl ModeGuard {
    fn enter(mode: Mode) -> Self {
        ModeGuard(MODE.with(|m| m.replace(mode)))
    }
}

impl Drop for ModeGuard {
    fn drop(&mut self) {
        MODE.with(|m| m.set(self.0));
    }
}

/// One step of a member path, innermost first in [`Error::path`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Missing,
    Unexpected,
    /// Keyval: an object where a scalar was wanted.
    UnexpectedObject,
    InvalidType(String),
    /// `Parameter 'x' expects <what>`: bad keyval scalar or integer out of range.
    Expects(&'static str),
    /// Reported with the innermost name only, as QEMU does.
    BadEnum(String),
    /// Reported with the innermost name only, as QEMU does.
    Alternate(String),
    Custom(String),
}

/// The error of this deserializer: a kind and the path where it happened. Built innermost
/// first, each enclosing member adds its name while the error travels up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: Kind,
    path: Vec<Seg>,
}

impl Error {
    fn new(kind: Kind) -> Self {
        Error {
            kind,
            path: Vec::new(),
        }
    }

    fn named(kind: Kind, name: &str) -> Self {
        Error {
            kind,
            path: vec![Seg::Key(name.to_owned())],
        }
    }

    fn at(mut self, seg: Seg) -> Self {
        self.path.push(seg);
        self
    }

    fn full_name(&self, mode: Mode) -> String {
        let mut out = String::new();
        for (i, seg) in self.path.iter().rev().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => out.push_str(k),
                Seg::Key(k) => {
                    out.push('.');
                    out.push_str(k);
                }
                Seg::Index(n) if mode == Mode::Keyval => {
                    if i > 0 {
                        out.push('.');
                    }
                    out.push_str(&n.to_string());
                }
                Seg::Index(n) => out.push_str(&format!("[{n}]")),
            }
        }
        if out.is_empty() {
            out.push_str("null");
        }
        out
    }

    fn leaf_name(&self) -> &str {
        match self.path.first() {
            Some(Seg::Key(k)) => k,
            _ => "null",
        }
    }

    fn render(&self, mode: Mode) -> String {
        match &self.kind {
            Kind::Missing => format!("Parameter '{}' is missing", self.full_name(mode)),
            Kind::Unexpected => format!("Parameter '{}' is unexpected", self.full_name(mode)),
            Kind::UnexpectedObject => {
                format!("Parameters '{}.*' are unexpected", self.full_name(mode))
            }
            Kind::InvalidType(t) => format!(
                "Invalid parameter type for '{}', expected: {t}",
                self.full_name(mode)
            ),
            Kind::Expects(what) => format!("Parameter '{}' expects {what}", self.full_name(mode)),
            Kind::BadEnum(v) => {
                format!(
                    "Parameter '{}' does not accept value '{v}'",
                    self.leaf_name()
                )
            }
            Kind::Alternate(t) => format!(
                "Invalid parameter type for '{}', expected: {t}",
                self.leaf_name()
            ),
            Kind::Custom(msg) => msg.clone(),
        }
    }

    /// Passes this error through a foreign `D::Error` unchanged when `D` is this module's
    /// deserializer (its `custom` picks it up again); other deserializers get the text.
    fn into_de<E: de::Error>(self) -> E {
        let text = self.render(MODE.with(Cell::get));
        STASH.with(|s| *s.borrow_mut() = Some(self));
        let e = E::custom(text);
        STASH.with(|s| s.borrow_mut().take());
        e
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(MODE.with(Cell::get)))
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        if let Some(e) = STASH.with(|s| s.borrow_mut().take()) {
            return e;
        }
        let msg = msg.to_string();
        match msg.strip_prefix("data did not match any variant of untagged enum ") {
            Some(name) => Error::new(Kind::Alternate(name.to_owned())),
            None => Error::new(Kind::Custom(msg)),
        }
    }

    fn missing_field(field: &'static str) -> Self {
        Error::named(Kind::Missing, field)
    }

    fn unknown_field(field: &str, _expected: &'static [&'static str]) -> Self {
        Error::named(Kind::Unexpected, field)
    }

    fn unknown_variant(variant: &str, _expected: &'static [&'static str]) -> Self {
        Error::new(Kind::BadEnum(variant.to_owned()))
    }
}

/// Deserializer over one value at one place in the arguments.
struct ValueDe {
    value: Value,
    mode: Mode,
    /// Set for the struct read by [`Members::take`]: members it does not declare are left
    /// for the union to judge, and the declared ones are reported back.
    known: Option<Rc<RefCell<Vec<&'static str>>>>,
}

impl ValueDe {
    fn new(value: Value, mode: Mode) -> Self {
        ValueDe {
            value,
            mode,
            known: None,
        }
    }

    fn invalid_type(&self, expected: &str) -> Error {
        if self.mode == Mode::Keyval && self.value.is_object() && expected != "object" {
            Error::new(Kind::UnexpectedObject)
        } else {
            Error::new(Kind::InvalidType(expected.to_owned()))
        }
    }

    fn int(self) -> Result<i64, Error> {
        match (&self.value, self.mode) {
            (Value::Number(n), Mode::Qmp) => n.as_i64().ok_or_else(|| self.invalid_type("integer")),
            (Value::String(s), Mode::Keyval) => {
                parse_c_int(s).ok_or(Error::new(Kind::Expects("integer")))
            }
            _ => Err(self.invalid_type("integer")),
        }
    }

    fn uint(self) -> Result<u64, Error> {
        match (&self.value, self.mode) {
            // QEMU takes a negative integer for an unsigned member, two's complement.
            (Value::Number(n), Mode::Qmp) => n
                .as_u64()
                .or_else(|| n.as_i64().map(|i| i as u64))
                .ok_or_else(|| self.invalid_type("integer")),
            (Value::String(s), Mode::Keyval) => {
                parse_c_uint(s).ok_or(Error::new(Kind::Expects("integer")))
            }
            _ => Err(self.invalid_type("integer")),
        }
    }

    fn str(self) -> Result<String, Error> {
        match self.value {
            Value::String(s) => Ok(s),
            _ => Err(self.invalid_type("string")),
        }
    }
}

macro_rules! narrow_int {
    ($method:ident, $visit:ident, $t:ty, $wide:ident, $name:literal) => {
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            let v = self.$wide()?;
            let v = <$t>::try_from(v).map_err(|_| Error::new(Kind::Expects($name)))?;
            visitor.$visit(v)
        }
    };
}

impl<'de> de::Deserializer<'de> for ValueDe {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let mode = self.mode;
        match self.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else {
                    visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => visitor.visit_string(s),
            Value::Array(a) => visitor.visit_seq(SeqDe::new(a, mode)),
            Value::Object(m) => visitor.visit_map(MapDe::all(m, mode)),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match (&self.value, self.mode) {
            (Value::Bool(b), Mode::Qmp) => visitor.visit_bool(*b),
            (Value::String(s), Mode::Keyval) => match s.as_str() {
                "on" | "yes" | "true" | "y" => visitor.visit_bool(true),
                "off" | "no" | "false" | "n" => visitor.visit_bool(false),
                _ => Err(Error::new(Kind::Expects("'on' or 'off'"))),
            },
            _ => Err(self.invalid_type("boolean")),
        }
    }

    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i64(self.int()?)
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_u64(self.uint()?)
    }

    narrow_int!(deserialize_i8, visit_i8, i8, int, "int8_t");
    narrow_int!(deserialize_i16, visit_i16, i16, int, "int16_t");
    narrow_int!(deserialize_i32, visit_i32, i32, int, "int32_t");
    narrow_int!(deserialize_u8, visit_u8, u8, uint, "uint8_t");
    narrow_int!(deserialize_u16, visit_u16, u16, uint, "uint16_t");
    narrow_int!(deserialize_u32, visit_u32, u32, uint, "uint32_t");

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match (&self.value, self.mode) {
            (Value::Number(n), Mode::Qmp) => visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN)),
            (Value::String(s), Mode::Keyval) => match s.trim_start().parse::<f64>() {
                Ok(f) if f.is_finite() => visitor.visit_f64(f),
                _ => Err(Error::new(Kind::Expects("number"))),
            },
            _ => Err(self.invalid_type("number")),
        }
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_string(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_string(visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_string(self.str()?)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_string(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_string(visitor)
    }

    /// A present member is never "none": QEMU refuses `null` for an optional member.
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.value {
            Value::Null => visitor.visit_unit(),
            _ => Err(self.invalid_type("null")),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        if name == SIZE_TOKEN && self.mode == Mode::Keyval {
            return match &self.value {
                Value::String(s) => match parse_size(s) {
                    Some(n) => visitor.visit_u64(n),
                    None => Err(Error::new(Kind::Expects("size"))),
                },
                _ => Err(self.invalid_type("size")),
            };
        }
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let mode = self.mode;
        match self.value {
            Value::Array(a) => visitor.visit_seq(SeqDe::new(a, mode)),
            _ => Err(Error::new(Kind::InvalidType("array".into()))),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let mode = self.mode;
        match self.value {
            Value::Object(m) => visitor.visit_map(MapDe::all(m, mode)),
            _ => Err(Error::new(Kind::InvalidType("object".into()))),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let (mode, known) = (self.mode, self.known.clone());
        let Value::Object(map) = self.value else {
            return Err(Error::new(Kind::InvalidType("object".into())));
        };
        let order: Vec<String> = map.keys().cloned().collect();
        let mut entries = map;
        let mut visited = Vec::new();
        let mut declared = Vec::new();
        for f in fields {
            if let Some((k, v)) = entries.remove_entry(*f) {
                visited.push(k.clone());
                declared.push((k, v));
            }
        }
        let out = visitor.visit_map(MapDe::declared(declared, mode))?;
        match known {
            Some(k) => k.borrow_mut().extend_from_slice(fields),
            None if !entries.is_empty() => {
                let visited: Vec<&str> = visited.iter().map(String::as_str).collect();
                let keys: Vec<&str> = order.iter().map(String::as_str).collect();
                let name = first_unexpected(&keys, &visited);
                return Err(Error::named(Kind::Unexpected, name));
            }
            None => {}
        }
        Ok(out)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let s = self.str()?;
        visitor.visit_enum(s.into_deserializer())
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_string(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
}

struct SeqDe {
    items: std::vec::IntoIter<Value>,
    index: usize,
    mode: Mode,
}

impl SeqDe {
    fn new(items: Vec<Value>, mode: Mode) -> Self {
        SeqDe {
            items: items.into_iter(),
            index: 0,
            mode,
        }
    }
}

impl<'de> de::SeqAccess<'de> for SeqDe {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        let Some(v) = self.items.next() else {
            return Ok(None);
        };
        let i = self.index;
        self.index += 1;
        seed.deserialize(ValueDe::new(v, self.mode))
            .map(Some)
            .map_err(|e| e.at(Seg::Index(i)))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapDe {
    entries: std::vec::IntoIter<(String, Value)>,
    pending: Option<(String, Value)>,
    mode: Mode,
}

impl MapDe {
    fn all(map: Map<String, Value>, mode: Mode) -> Self {
        Self::declared(map.into_iter().collect(), mode)
    }

    fn declared(entries: Vec<(String, Value)>, mode: Mode) -> Self {
        MapDe {
            entries: entries.into_iter(),
            pending: None,
            mode,
        }
    }
}

impl<'de> de::MapAccess<'de> for MapDe {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some((k, v)) = self.entries.next() else {
            return Ok(None);
        };
        let key = seed.deserialize(ValueDe::new(Value::String(k.clone()), Mode::Qmp));
        self.pending = Some((k, v));
        key.map(Some)
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, Error> {
        let (k, v) = self
            .pending
            .take()
            .ok_or_else(|| Error::new(Kind::Custom("value requested before key".into())))?;
        seed.deserialize(ValueDe::new(v, self.mode))
            .map_err(|e| e.at(Seg::Key(k)))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// The members of a QAPI flat union, read in parts: the base struct, then the branch the
/// discriminator selects. See [`union`].
pub struct Members {
    map: Map<String, Value>,
    mode: Mode,
    /// Members declared by the parts read so far, in reading order.
    known: Vec<&'static str>,
}

impl Members {
    /// Reads the struct `T` from the union's members, ignoring members `T` does not declare.
    pub fn take<T: DeserializeOwned>(&mut self) -> Result<T, Error> {
        let known = Rc::new(RefCell::new(Vec::new()));
        let de = ValueDe {
            value: Value::Object(self.map.clone()),
            mode: self.mode,
            known: Some(known.clone()),
        };
        let out = T::deserialize(de);
        self.known.extend(known.take());
        out
    }

    fn finish(self) -> Result<(), Error> {
        if self.map.keys().all(|k| self.known.contains(&k.as_str())) {
            return Ok(());
        }
        let keys: Vec<&str> = self.map.keys().map(String::as_str).collect();
        let visited: Vec<&str> = self
            .known
            .iter()
            .copied()
            .filter(|k| self.map.contains_key(*k))
            .collect();
        Err(Error::named(
            Kind::Unexpected,
            first_unexpected(&keys, &visited),
        ))
    }
}

/// Reads a QAPI flat union: `build` reads the base with [`Members::take`], looks at the
/// discriminator and reads the branch the same way. Members no part declares are then
/// refused with QEMU's text.
///
/// ```ignore
/// impl<'de> Deserialize<'de> for BlockdevOptions {
///     fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
///         qapi::de::union(d, |m| {
///             let base: Base = m.take()?;
///             let driver = match base.driver {
///                 Driver::Null => Branch::Null(m.take()?),
///                 Driver::Raw => Branch::Raw(m.take()?),
///             };
///             Ok(BlockdevOptions { base, driver })
///         })
///     }
/// }
/// ```
pub fn union<'de, D, T, F>(d: D, build: F) -> Result<T, D::Error>
where
    D: de::Deserializer<'de>,
    F: FnOnce(&mut Members) -> Result<T, Error>,
{
    let map = match Value::deserialize(d)? {
        Value::Object(map) => map,
        _ => return Err(Error::new(Kind::InvalidType("object".into())).into_de()),
    };
    let mut members = Members {
        map,
        mode: MODE.with(Cell::get),
        known: Vec::new(),
    };
    let out = build(&mut members).map_err(Error::into_de)?;
    members.finish().map_err(Error::into_de)?;
    Ok(out)
}

/// The JSON type of an alternate's value, as QEMU sees it (on the command line every
/// scalar is a string).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonType {
    /// `null` (QEMU's QTYPE_QNULL).
    Null,
    /// `true` or `false` (QTYPE_QBOOL); never on the command line.
    Bool,
    /// Any number (QTYPE_QNUM); never on the command line.
    Number,
    /// A string (QTYPE_QSTRING); on the command line, every scalar.
    String,
    /// An array (QTYPE_QLIST).
    Array,
    /// An object (QTYPE_QDICT).
    Object,
}

/// The value of a QAPI alternate, to be read as the branch its JSON type selects.
pub struct Branch {
    value: Value,
    mode: Mode,
}

impl Branch {
    /// The value's JSON type, which picks the branch.
    pub fn json_type(&self) -> JsonType {
        match self.value {
            Value::Null => JsonType::Null,
            Value::Bool(_) => JsonType::Bool,
            Value::Number(_) => JsonType::Number,
            Value::String(_) => JsonType::String,
            Value::Array(_) => JsonType::Array,
            Value::Object(_) => JsonType::Object,
        }
    }

    /// Reads the value as `T`, with errors inside it reported at their full path.
    pub fn parse<T: DeserializeOwned>(self) -> Result<T, Error> {
        T::deserialize(ValueDe::new(self.value, self.mode))
    }
}

/// Reads a QAPI alternate named `type_name`: `choose` picks a branch by JSON type and parses
/// it, or returns `None` when no branch takes that type, which gives QEMU's
/// `Invalid parameter type for 'file', expected: BlockdevRef`.
pub fn alternate<'de, D, T, F>(d: D, type_name: &'static str, choose: F) -> Result<T, D::Error>
where
    D: de::Deserializer<'de>,
    F: FnOnce(Branch) -> Option<Result<T, Error>>,
{
    let branch = Branch {
        value: Value::deserialize(d)?,
        mode: MODE.with(Cell::get),
    };
    match choose(branch) {
        Some(r) => r.map_err(Error::into_de),
        None => Err(Error::new(Kind::Alternate(type_name.to_owned())).into_de()),
    }
}

/// Which of the members that no declared member consumed QEMU names first: its argument
/// dictionary (a 512-bucket hash) feeds a GLib hash table of unvisited members, and the
/// error names the first one that table iterates.
fn first_unexpected<'a>(keys: &[&'a str], visited: &[&str]) -> &'a str {
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by_key(|&i| (crate::json::qdict_bucket(keys[i]), std::cmp::Reverse(i)));
    let mut table = GHashSet::new();
    for i in order {
        table.insert(keys[i]);
    }
    for v in visited {
        table.remove(v);
    }
    table
        .first()
        .or_else(|| keys.iter().find(|k| !visited.contains(k)).copied())
        .unwrap_or("null")
}

/// Just enough of GLib's open-addressing hash table (string keys) to know its iteration
/// order after inserts, removals and resizes.
struct GHashSet<'a> {
    shift: u32,
    hashes: Vec<u32>,
    keys: Vec<Option<&'a str>>,
    nnodes: usize,
    noccupied: usize,
}

const G_UNUSED: u32 = 0;
const G_TOMBSTONE: u32 = 1;
const G_MIN_SHIFT: u32 = 3;
const G_PRIMES: [u32; 17] = [
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521,
];

impl<'a> GHashSet<'a> {
    fn new() -> Self {
        let size = 1 << G_MIN_SHIFT;
        GHashSet {
            shift: G_MIN_SHIFT,
            hashes: vec![G_UNUSED; size],
            keys: vec![None; size],
            nnodes: 0,
            noccupied: 0,
        }
    }

    fn hash(key: &str) -> u32 {
        let h = key.bytes().fold(5381u32, |h, c| {
            h.wrapping_mul(33).wrapping_add(u32::from(c))
        });
        h.max(2)
    }

    fn index(&self, hash: u32) -> usize {
        let primes = G_PRIMES[(self.shift as usize).min(G_PRIMES.len() - 1)];
        (hash.wrapping_mul(11) % primes) as usize
    }

    fn mask(&self) -> usize {
        (1 << self.shift) - 1
    }

    fn lookup(&self, key: &str, hash: u32) -> (usize, bool) {
        let mut i = self.index(hash);
        let mut step = 0;
        let mut tombstone = None;
        while self.hashes[i] != G_UNUSED {
            if self.hashes[i] == hash && self.keys[i] == Some(key) {
                return (i, true);
            }
            if self.hashes[i] == G_TOMBSTONE && tombstone.is_none() {
                tombstone = Some(i);
            }
            step += 1;
            i = (i + step) & self.mask();
        }
        (tombstone.unwrap_or(i), false)
    }

    fn insert(&mut self, key: &'a str) {
        let hash = Self::hash(key);
        let (i, found) = self.lookup(key, hash);
        if found {
            return;
        }
        let old = self.hashes[i];
        self.hashes[i] = hash;
        self.keys[i] = Some(key);
        self.nnodes += 1;
        if old == G_UNUSED {
            self.noccupied += 1;
            self.maybe_resize();
        }
    }

    fn remove(&mut self, key: &str) {
        let (i, found) = self.lookup(key, Self::hash(key));
        if found {
            self.hashes[i] = G_TOMBSTONE;
            self.keys[i] = None;
            self.nnodes -= 1;
            self.maybe_resize();
        }
    }

    fn maybe_resize(&mut self) {
        let size = 1usize << self.shift;
        let min = 1usize << G_MIN_SHIFT;
        if (size > self.nnodes * 4 && size > min) || size <= self.noccupied + self.noccupied / 16 {
            self.resize();
        }
    }

    fn resize(&mut self) {
        let old_size = 1usize << self.shift;
        let mut want = (self.nnodes as f64 * 1.333) as usize;
        let mut shift = 0;
        while want > 0 {
            want >>= 1;
            shift += 1;
        }
        self.shift = shift.max(G_MIN_SHIFT);
        let new_size = 1usize << self.shift;
        if new_size > old_size {
            self.hashes.resize(new_size, G_UNUSED);
            self.keys.resize(new_size, None);
        }
        let mut placed = vec![false; new_size.max(old_size)];
        for i in 0..old_size {
            let mut hash = self.hashes[i];
            if hash < 2 {
                self.hashes[i] = G_UNUSED;
                continue;
            }
            if placed[i] {
                continue;
            }
            self.hashes[i] = G_UNUSED;
            let mut key = self.keys[i].take();
            loop {
                let mut j = self.index(hash);
                let mut step = 0;
                while placed[j] {
                    step += 1;
                    j = (j + step) & self.mask();
                }
                placed[j] = true;
                let replaced = std::mem::replace(&mut self.hashes[j], hash);
                let evicted = std::mem::replace(&mut self.keys[j], key);
                if replaced < 2 {
                    break;
                }
                hash = replaced;
                key = evicted;
            }
        }
        self.hashes.truncate(new_size);
        self.keys.truncate(new_size);
        self.noccupied = self.nnodes;
    }

    fn first(&self) -> Option<&'a str> {
        self.hashes
            .iter()
            .zip(&self.keys)
            .find(|(h, _)| **h >= 2)
            .and_then(|(_, k)| *k)
    }
}

/// C `strtoll(s, base 0)` over the whole string, as QEMU reads integers on the command line.
fn parse_c_int(s: &str) -> Option<i64> {
    let (neg, mag) = parse_c_magnitude(s)?;
    if neg {
        0i64.checked_sub_unsigned(mag)
    } else {
        i64::try_from(mag).ok()
    }
}

/// C `strtoull(s, base 0)` over the whole string: a leading `-` negates modulo 2^64.
fn parse_c_uint(s: &str) -> Option<u64> {
    let (neg, mag) = parse_c_magnitude(s)?;
    Some(if neg { mag.wrapping_neg() } else { mag })
}

fn parse_c_magnitude(s: &str) -> Option<(bool, u64)> {
    let s = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (radix, digits) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (16, h)
    } else if s.len() > 1 && s.starts_with('0') {
        (8, &s[1..])
    } else {
        (10, s)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok().map(|m| (neg, m))
}

/// QEMU's size syntax: a decimal number with an optional fraction and a binary suffix
/// (`B`, `k`, `M`, `G`, `T`, `P`, `E`, any case; a fraction needs a suffix other than `B`),
/// or a hexadecimal number without suffix.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if h.is_empty() || !h.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        return u64::from_str_radix(h, 16).ok();
    }
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(end);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return None,
    };
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) if shift > 0 && !f.is_empty() && !f.contains('.') => (i, Some(f)),
        Some(_) => return None,
        None => (number, None),
    };
    if int.is_empty() {
        return None;
    }
    let whole = int.parse::<u64>().ok()?.checked_mul(1u64 << shift)?;
    let part = match frac {
        Some(f) => {
            let f: f64 = format!("0.{f}").parse().ok()?;
            (f * (1u64 << shift) as f64) as u64
        }
        None => 0,
    };
    whole.checked_add(part)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    #[allow(dead_code)]
    struct Cache {
        direct: Option<bool>,
        no_flush: Option<bool>,
    }

    #[derive(Debug, Deserialize, PartialEq, Eq, Clone, Copy)]
    #[serde(rename_all = "kebab-case")]
    enum Aio {
        Threads,
        Native,
    }

    #[derive(Debug, Deserialize, PartialEq, Eq, Clone, Copy)]
    #[serde(rename_all = "kebab-case")]
    enum Driver {
        File,
        Raw,
        NullCo,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    #[allow(dead_code)]
    struct Base {
        driver: Driver,
        node_name: Option<String>,
        cache: Option<Cache>,
        read_only: Option<bool>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    #[allow(dead_code)]
    struct FileBranch {
        filename: String,
        aio: Option<Aio>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    #[allow(dead_code)]
    struct RawBranch {
        file: Box<BlockdevRef>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    #[allow(dead_code)]
    struct NullBranch {
        size: Option<i64>,
        latency_ns: Option<u64>,
    }

    #[derive(Debug)]
    #[allow(dead_code)]
    enum Branches {
        File(FileBranch),
        Raw(RawBranch),
        Null(NullBranch),
    }

    #[derive(Debug)]
    #[allow(dead_code)]
    struct BlockdevOptions {
        base: Base,
        branch: Branches,
    }

    impl<'de> Deserialize<'de> for BlockdevOptions {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            union(d, |m| {
                let base: Base = m.take()?;
                let branch = match base.driver {
                    Driver::File => Branches::File(m.take()?),
                    Driver::Raw => Branches::Raw(m.take()?),
                    Driver::NullCo => Branches::Null(m.take()?),
                };
                Ok(BlockdevOptions { base, branch })
            })
        }
    }

    #[derive(Debug)]
    #[allow(dead_code)]
    enum BlockdevRef {
        Reference(String),
        Definition(BlockdevOptions),
    }

    impl<'de> Deserialize<'de> for BlockdevRef {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            alternate(d, "BlockdevRef", |b| match b.json_type() {
                JsonType::String => Some(b.parse().map(BlockdevRef::Reference)),
                JsonType::Object => Some(b.parse().map(BlockdevRef::Definition)),
                _ => None,
            })
        }
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    #[allow(dead_code)]
    struct InjectError {
        event: Aio,
        errno: Option<i32>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    #[allow(dead_code)]
    struct Misc {
        enable: Option<Vec<Aio>>,
        max_connections: Option<u32>,
        speed: Option<i64>,
        inject_error: Option<Vec<InjectError>>,
        refs: Option<Vec<BlockdevRef>>,
        ratio: Option<f64>,
        size: Option<Size>,
        flag: Option<bool>,
    }

    fn qmp_err<T: DeserializeOwned + fmt::Debug>(v: Value) -> String {
        from_value::<T>(v).unwrap_err().desc
    }

    fn kv_err<T: DeserializeOwned + fmt::Debug>(v: Value) -> String {
        from_keyval::<T>(v).unwrap_err().desc
    }

    /// Texts observed on qemu-storage-daemon 10.0.2 for the same inputs (blockdev-add,
    /// qmp_capabilities, nbd-server-start, block-dirty-bitmap-merge, blkdebug inject-error).
    #[test]
    fn qmp_texts_match_qsd() {
        let cases: Vec<(Value, &str)> = vec![
            (
                json!({"driver":"raw","node-name":"a","file":{"driver":"file"}}),
                "Parameter 'file.filename' is missing",
            ),
            (
                json!({"driver":"raw","node-name":"a","file":5}),
                "Invalid parameter type for 'file', expected: BlockdevRef",
            ),
            (
                json!({"driver":"raw","node-name":"a","file":null}),
                "Invalid parameter type for 'file', expected: BlockdevRef",
            ),
            (
                json!({"driver":"raw","node-name":"a","file":{"driver":"raw","file":5}}),
                "Invalid parameter type for 'file', expected: BlockdevRef",
            ),
            (
                json!({"driver":"raw","node-name":"a","file":{"driver":"raw","file":{"driver":"file"}}}),
                "Parameter 'file.file.filename' is missing",
            ),
            (
                json!({"driver":"null-co","node-name":"a","size":"x"}),
                "Invalid parameter type for 'size', expected: integer",
            ),
            (
                json!({"driver":"null-co","node-name":"a","size":1.5}),
                "Invalid parameter type for 'size', expected: integer",
            ),
            (
                json!({"driver":"null-co","node-name":"a","size":18446744073709551615u64}),
                "Invalid parameter type for 'size', expected: integer",
            ),
            (
                json!({"driver":"nope"}),
                "Parameter 'driver' does not accept value 'nope'",
            ),
            (
                json!({"driver":5}),
                "Invalid parameter type for 'driver', expected: string",
            ),
            (
                json!({"driver":"null-co","node-name":"a","read-only":"yes"}),
                "Invalid parameter type for 'read-only', expected: boolean",
            ),
            (
                json!({"driver":"null-co","node-name":null}),
                "Invalid parameter type for 'node-name', expected: string",
            ),
            (json!({"node-name":"a"}), "Parameter 'driver' is missing"),
            (
                json!({"driver":"raw","file":{"driver":"file","filename":"x","aio":5}}),
                "Invalid parameter type for 'file.aio', expected: string",
            ),
            (
                json!({"driver":"raw","file":{"driver":"file","filename":"x","aio":"bad"}}),
                "Parameter 'aio' does not accept value 'bad'",
            ),
            (
                json!({"driver":"raw","file":{"driver":"file","filename":"x","bogus":1}}),
                "Parameter 'file.bogus' is unexpected",
            ),
            (
                json!({"driver":"raw","cache":5}),
                "Invalid parameter type for 'cache', expected: object",
            ),
            (
                json!({"driver":"raw","cache":{"direct":"x"}}),
                "Invalid parameter type for 'cache.direct', expected: boolean",
            ),
            (
                json!({"driver":"null-co","node-name":"a","bogus":1}),
                "Parameter 'bogus' is unexpected",
            ),
            (
                json!({"driver":"null-co","node-name":"a","bogus":1,"size":"x"}),
                "Invalid parameter type for 'size', expected: integer",
            ),
            (
                json!({"driver":"null-co","node-name":"a","b":1,"c":2,"d":3,"e":4,"f":5,"g":6,"h":7,"i":8,"j":9}),
                "Parameter 'b' is unexpected",
            ),
            (
                json!({"driver":"null-co","node-name":"a","bb":1,"cc":2,"dd":3,"ee":4,"ff":5}),
                "Parameter 'ff' is unexpected",
            ),
            (
                json!({"driver":"null-co","read-only":true,"node-name":"a","zzz":1,"size":5,"qqq":2}),
                "Parameter 'zzz' is unexpected",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(qmp_err::<BlockdevOptions>(input.clone()), want, "{input}");
        }
        let misc: Vec<(Value, &str)> = vec![
            (
                json!({"enable":["foo"]}),
                "Parameter 'null' does not accept value 'foo'",
            ),
            (
                json!({"enable":"oob"}),
                "Invalid parameter type for 'enable', expected: array",
            ),
            (
                json!({"enable":[1]}),
                "Invalid parameter type for 'enable[0]', expected: string",
            ),
            (json!({"x":1,"y":2}), "Parameter 'y' is unexpected"),
            (
                json!({"enable":"oob","x":1}),
                "Invalid parameter type for 'enable', expected: array",
            ),
            (
                json!({"max-connections":5000000000u64}),
                "Parameter 'max-connections' expects uint32_t",
            ),
            (
                json!({"max-connections":-1}),
                "Parameter 'max-connections' expects uint32_t",
            ),
            (
                json!({"speed":9223372036854775808u64}),
                "Invalid parameter type for 'speed', expected: integer",
            ),
            (
                json!({"speed":"1"}),
                "Invalid parameter type for 'speed', expected: integer",
            ),
            (
                json!({"inject-error":[{"event":"threads","errno":"x"}]}),
                "Invalid parameter type for 'inject-error[0].errno', expected: integer",
            ),
            (
                json!({"inject-error":[{"event":"nope"}]}),
                "Parameter 'event' does not accept value 'nope'",
            ),
            (
                json!({"inject-error":[{"errno":1}]}),
                "Parameter 'inject-error[0].event' is missing",
            ),
            (
                json!({"inject-error":{"errno":1}}),
                "Invalid parameter type for 'inject-error', expected: array",
            ),
            (
                json!({"inject-error":[{"event":"native","bogus":1}]}),
                "Parameter 'inject-error[0].bogus' is unexpected",
            ),
            (
                json!({"refs":[1]}),
                "Invalid parameter type for 'null', expected: BlockdevRef",
            ),
            (
                json!({"ratio":"x"}),
                "Invalid parameter type for 'ratio', expected: number",
            ),
        ];
        for (input, want) in misc {
            assert_eq!(qmp_err::<Misc>(input.clone()), want, "{input}");
        }
    }

    #[test]
    fn qmp_values() {
        let m: Misc = from_value(json!({
            "enable": ["native"], "max-connections": 7, "ratio": 2, "size": 4096,
            "refs": ["n0", {"driver": "null-co", "size": 5}], "flag": true
        }))
        .unwrap();
        assert_eq!(m.enable, Some(vec![Aio::Native]));
        assert_eq!(m.max_connections, Some(7));
        assert_eq!(m.ratio, Some(2.0));
        assert_eq!(m.size, Some(Size(4096)));
        assert_eq!(m.flag, Some(true));
        let refs = m.refs.unwrap();
        assert!(matches!(&refs[0], BlockdevRef::Reference(s) if s == "n0"));
        assert!(matches!(
            &refs[1],
            BlockdevRef::Definition(BlockdevOptions {
                branch: Branches::Null(NullBranch { size: Some(5), .. }),
                ..
            })
        ));
        let n: NullBranch = from_value(json!({"latency-ns": -1})).unwrap();
        assert_eq!(n.latency_ns, Some(u64::MAX));
    }

    /// Texts observed on qemu-storage-daemon 10.0.2's command line (`--blockdev`,
    /// `--nbd-server`), except `expects size` (no size member is reachable there).
    #[test]
    fn keyval_texts_match_qsd() {
        let s = |v: &str| Value::String(v.into());
        let cases: Vec<(Value, &str)> = vec![
            (
                json!({"driver":"null-co","node-name":"a","size":"abc"}),
                "Parameter 'size' expects integer",
            ),
            (
                json!({"driver":"null-co","size":"1.5k"}),
                "Parameter 'size' expects integer",
            ),
            (
                json!({"driver":"null-co","size":"99999999999999999999"}),
                "Parameter 'size' expects integer",
            ),
            (
                json!({"driver":"null-co","size":""}),
                "Parameter 'size' expects integer",
            ),
            (
                json!({"driver":"null-co","size":"5 "}),
                "Parameter 'size' expects integer",
            ),
            (
                json!({"driver":"null-co","size":"0x"}),
                "Parameter 'size' expects integer",
            ),
            (
                json!({"driver":"null-co","read-only":"maybe"}),
                "Parameter 'read-only' expects 'on' or 'off'",
            ),
            (
                json!({"driver":"null-co","read-only":"ON"}),
                "Parameter 'read-only' expects 'on' or 'off'",
            ),
            (
                json!({"driver":"nope"}),
                "Parameter 'driver' does not accept value 'nope'",
            ),
            (
                json!({"driver":"null-co","bogus":"1"}),
                "Parameter 'bogus' is unexpected",
            ),
            (
                json!({"driver":"raw","file":{"driver":"file"}}),
                "Parameter 'file.filename' is missing",
            ),
            (
                json!({"driver":"raw","cache":{"direct":"x"}}),
                "Parameter 'cache.direct' expects 'on' or 'off'",
            ),
            (json!({"node-name":"a"}), "Parameter 'driver' is missing"),
            (
                json!({"driver":"null-co","size":{"x":"1"}}),
                "Parameters 'size.*' are unexpected",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(kv_err::<BlockdevOptions>(input.clone()), want, "{input}");
        }
        let misc: Vec<(Value, &str)> = vec![
            (
                json!({"inject-error":[{"event":"nope"}]}),
                "Parameter 'event' does not accept value 'nope'",
            ),
            (
                json!({"inject-error":[{"errno":"x","event":"native"}]}),
                "Parameter 'inject-error.0.errno' expects integer",
            ),
            (
                json!({"inject-error":{"x":{"event":"native"}}}),
                "Invalid parameter type for 'inject-error', expected: array",
            ),
            (
                json!({"inject-error":"5"}),
                "Invalid parameter type for 'inject-error', expected: array",
            ),
            (
                json!({"max-connections":"-1"}),
                "Parameter 'max-connections' expects uint32_t",
            ),
            (
                json!({"max-connections":"5000000000"}),
                "Parameter 'max-connections' expects uint32_t",
            ),
            (
                json!({"max-connections":"x"}),
                "Parameter 'max-connections' expects integer",
            ),
            (json!({"size":"1kB"}), "Parameter 'size' expects size"),
            (json!({"size":"16E"}), "Parameter 'size' expects size"),
            (json!({"size":"1.5"}), "Parameter 'size' expects size"),
            (json!({"size":"0x10k"}), "Parameter 'size' expects size"),
            (json!({"size":"-1"}), "Parameter 'size' expects size"),
        ];
        for (input, want) in misc {
            assert_eq!(kv_err::<Misc>(input.clone()), want, "{input}");
        }
        let m: Misc = from_keyval(json!({
            "flag": s("y"), "max-connections": s(" +0x10"), "speed": s("-010"),
            "size": s("1.5k"), "refs": [s("n0"), {"driver": s("null-co"), "size": s("5")}]
        }))
        .unwrap();
        assert_eq!(m.flag, Some(true));
        assert_eq!(m.max_connections, Some(16));
        assert_eq!(m.speed, Some(-8));
        assert_eq!(m.size, Some(Size(1536)));
        assert!(matches!(&m.refs.unwrap()[1], BlockdevRef::Definition(_)));
    }

    #[test]
    fn sizes() {
        for (s, v) in [
            ("0", 0),
            ("5b", 5),
            (" 5", 5),
            ("1K", 1024),
            ("1.5k", 1536),
            ("0x10", 16),
            ("15E", 15 << 60),
        ] {
            assert_eq!(parse_size(s), Some(v), "{s}");
        }
        for s in [
            "", "k", "1.5", "1.5B", "1e3", "1kB", "0x1.8k", "16E", ".5k", "1..5k",
        ] {
            assert_eq!(parse_size(s), None, "{s}");
        }
    }

    #[test]
    fn deny_unknown_fields_is_honoured() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Strict {
            a: Option<u8>,
        }
        assert_eq!(
            qmp_err::<Strict>(json!({"b": 1})),
            "Parameter 'b' is unexpected"
        );
        let m: Map<String, Value> = from_value(json!({"b": 1})).unwrap();
        assert_eq!(m["b"], 1);
    }
}
