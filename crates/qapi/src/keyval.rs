//! The QEMU keyval option syntax used on the command line (`--blockdev`, `--export`, ...).
//!
//! `key=value` pairs separated by `,`, where `,,` stands for a comma inside a value. A key is
//! a dotted path of fragments: `file.driver=file` builds nested objects, and an object whose
//! keys are all decimal numbers (`bitmaps.0=a,bitmaps.1=b`) becomes an array, which must have
//! no gaps. The first fragment must be a QAPI name (`[A-Za-z][A-Za-z0-9_-]*`, optionally with
//! a downstream `__RFQDN_` prefix); later fragments are QAPI names or numbers; each is 1 to 127
//! characters. When the same leaf is given twice the last value wins. An element `help` or `?`
//! asks for help, which the command line does not offer. With an implied key the first element
//! may omit `key=`; its value then runs up to the next `,` with no escapes.
//!
//! Every leaf is a JSON string: typing happens later, in the keyval mode of the deserializer.
//! Error texts are QEMU's, checked against qemu-storage-daemon 10.0.

use serde_json::{Map, Value};
use std::fmt;

/// Longest key fragment QEMU accepts.
const MAX_FRAGMENT_LEN: usize = 127;

/// Why a keyval string was refused; `Display` gives QEMU's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyvalError {
    /// An element other than the first (or with no implied key) has no `=`.
    ExpectedEquals {
        /// The element as written, up to the next `,`.
        key: String,
    },
    /// The key is empty or has a fragment that is neither a QAPI name nor a number.
    InvalidParameter {
        /// The whole dotted key as written.
        key: String,
    },
    /// A fragment is longer than 127 characters.
    TooLong {
        /// The fragment that is too long.
        fragment: String,
        /// Whether the key has other fragments (QEMU then says `Parameter fragment`).
        in_path: bool,
    },
    /// `prefix` is used both as a value and as an object, or as both an object and an array.
    Inconsistent {
        /// The dotted key prefix used both ways.
        prefix: String,
    },
    /// An array is missing an element.
    Missing {
        /// The full dotted key of the missing element, e.g. `a.0`.
        key: String,
    },
    /// A `help` or `?` element; help is not offered for keyval options.
    Help,
}

impl fmt::Display for KeyvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ExpectedEquals { key } => write!(f, "Expected '=' after parameter '{key}'"),
            Self::InvalidParameter { key } => write!(f, "Invalid parameter '{key}'"),
            Self::TooLong { fragment, in_path } => {
                let what = if *in_path {
                    "Parameter fragment"
                } else {
                    "Parameter"
                };
                write!(f, "{what} '{fragment}' is too long")
            }
            Self::Inconsistent { prefix } => {
                write!(f, "Parameters '{prefix}.*' used inconsistently")
            }
            Self::Missing { key } => write!(f, "Parameter '{key}' missing"),
            Self::Help => f.write_str("Help is not available for this option"),
        }
    }
}

impl std::error::Error for KeyvalError {}

/// Parse `input` into a JSON object whose leaves are strings.
///
/// `implied_key` names the key of a first element written without `key=` (`driver` for
/// `--blockdev`, `type` for `--export`, `qom-type` for `--object`).
pub fn parse(input: &str, implied_key: Option<&str>) -> Result<Map<String, Value>, KeyvalError> {
    let mut root = Map::new();
    let mut help = false;
    let mut rest = input;
    let mut implied_key = implied_key;
    while !rest.is_empty() {
        rest = parse_element(&mut root, rest, implied_key.take(), &mut help)?;
    }
    // QEMU reports help before it looks for inconsistent or incomplete arrays.
    if help {
        return Err(KeyvalError::Help);
    }
    let mut path = Vec::new();
    listify_members(&mut root, &mut path)?;
    Ok(root)
}

/// Parse the element at the start of `input` into `root`; return the input after it.
fn parse_element<'a>(
    root: &mut Map<String, Value>,
    input: &'a str,
    implied_key: Option<&str>,
    help: &mut bool,
) -> Result<&'a str, KeyvalError> {
    let key_len = input.find(['=', ',']).unwrap_or(input.len());
    let bare = &input[..key_len];
    let after_bare = &input[key_len..];
    if !bare.is_empty() && !after_bare.starts_with('=') {
        if bare == "help" || bare == "?" {
            *help = true;
            return Ok(after_bare.strip_prefix(',').unwrap_or(after_bare));
        }
        if let Some(key) = implied_key {
            let leaf = walk_to_leaf(root, key)?;
            put_leaf(leaf, key, bare)?;
            return Ok(after_bare.strip_prefix(',').unwrap_or(after_bare));
        }
    }
    let leaf = walk_to_leaf(root, bare)?;
    let Some(after_eq) = after_bare.strip_prefix('=') else {
        return Err(KeyvalError::ExpectedEquals {
            key: bare.to_owned(),
        });
    };
    let (value, rest) = take_value(after_eq);
    put_leaf(leaf, bare, &value)?;
    Ok(rest)
}

/// The object that holds the last fragment of `key`, and that fragment, creating the
/// intermediate objects; checks every fragment on the way as QEMU does.
fn walk_to_leaf<'m, 'k>(
    root: &'m mut Map<String, Value>,
    key: &'k str,
) -> Result<(&'m mut Map<String, Value>, &'k str), KeyvalError> {
    let mut cur = root;
    let mut start = 0;
    loop {
        let rest = &key[start..];
        let first = start == 0;
        let len = if !first && rest.starts_with(|c: char| c.is_ascii_digit()) {
            rest.find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len())
        } else {
            qapi_name_len(rest)
        };
        if len == 0 || rest[len..].chars().next().is_some_and(|c| c != '.') {
            return Err(KeyvalError::InvalidParameter {
                key: key.to_owned(),
            });
        }
        let fragment = &rest[..len];
        if len > MAX_FRAGMENT_LEN {
            return Err(KeyvalError::TooLong {
                fragment: fragment.to_owned(),
                in_path: !first || len != key.len(),
            });
        }
        let end = start + len;
        if end == key.len() {
            return Ok((cur, fragment));
        }
        // The fragment is followed by '.', so it must name an object.
        let entry = cur
            .entry(fragment.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(next) = entry else {
            return Err(KeyvalError::Inconsistent {
                prefix: key[..end].to_owned(),
            });
        };
        cur = next;
        start = end + 1;
    }
}

/// Store a string leaf; a later value for the same leaf replaces the earlier one.
fn put_leaf(
    (parent, fragment): (&mut Map<String, Value>, &str),
    key: &str,
    value: &str,
) -> Result<(), KeyvalError> {
    if matches!(parent.get(fragment), Some(Value::Object(_))) {
        return Err(KeyvalError::Inconsistent {
            prefix: key.to_owned(),
        });
    }
    parent.insert(fragment.to_owned(), Value::String(value.to_owned()));
    Ok(())
}

/// The value at the start of `input` with `,,` unescaped, and the input after its `,`.
fn take_value(input: &str) -> (String, &str) {
    let mut value = String::new();
    let mut rest = input;
    loop {
        match rest.find(',') {
            None => {
                value.push_str(rest);
                return (value, "");
            }
            Some(comma) => {
                value.push_str(&rest[..comma]);
                let after = &rest[comma + 1..];
                match after.strip_prefix(',') {
                    Some(escaped_rest) => {
                        value.push(',');
                        rest = escaped_rest;
                    }
                    None => return (value, after),
                }
            }
        }
    }
}

/// Length of the QAPI name at the start of `s` (0 when there is none): an optional
/// downstream prefix `__` [A-Za-z0-9.-]* `_`, then a letter, then [A-Za-z0-9_-]*.
fn qapi_name_len(s: &str) -> usize {
    let bytes = s.as_bytes();
    let mut i = 0;
    if bytes.first() == Some(&b'_') {
        if bytes.get(1) != Some(&b'_') {
            return 0;
        }
        i = 2;
        while bytes
            .get(i)
            .is_some_and(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            i += 1;
        }
        if bytes.get(i) != Some(&b'_') {
            return 0;
        }
        i += 1;
    }
    if !bytes.get(i).is_some_and(u8::is_ascii_alphabetic) {
        return 0;
    }
    i += 1;
    while bytes
        .get(i)
        .is_some_and(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        i += 1;
    }
    i
}

/// Turn every nested object whose keys are all numbers into an array, depth first.
/// `path` holds the fragments leading to `map`.
fn listify_members(
    map: &mut Map<String, Value>,
    path: &mut Vec<String>,
) -> Result<(), KeyvalError> {
    for (key, value) in map.iter_mut() {
        if let Value::Object(member) = value {
            path.push(key.clone());
            listify_members(member, path)?;
            if let Some(list) = as_list(member, path)? {
                *value = Value::Array(list);
            }
            path.pop();
        }
    }
    Ok(())
}

/// `map`'s values in index order when its keys are all numbers; `None` when none is.
fn as_list(
    map: &mut Map<String, Value>,
    path: &[String],
) -> Result<Option<Vec<Value>>, KeyvalError> {
    let indexed = map.keys().filter(|k| is_index(k)).count();
    if indexed == 0 {
        return Ok(None);
    }
    if indexed != map.len() {
        return Err(KeyvalError::Inconsistent {
            prefix: path.join("."),
        });
    }
    // "1" and "01" are distinct keys with the same index; the later one wins.
    let mut slots: Vec<Option<Value>> = vec![None; map.len()];
    let mut max_index = 0;
    for (key, value) in std::mem::take(map) {
        let index = index_of(&key);
        max_index = max_index.max(index);
        if let Some(slot) = slots.get_mut(index) {
            *slot = Some(value);
        }
    }
    let mut list = Vec::with_capacity(slots.len());
    for (index, slot) in slots.into_iter().enumerate().take(max_index + 1) {
        match slot {
            Some(value) => list.push(value),
            None => {
                return Err(KeyvalError::Missing {
                    key: format!("{}.{index}", path.join(".")),
                })
            }
        }
    }
    Ok(Some(list))
}

fn is_index(key: &str) -> bool {
    !key.is_empty() && key.bytes().all(|b| b.is_ascii_digit())
}

/// The index a numeric key denotes, saturating like QEMU (which caps at `INT_MAX`); any
/// index past the number of elements is necessarily a gap.
fn index_of(key: &str) -> usize {
    key.bytes()
        .fold(0usize, |n, b| {
            n.saturating_mul(10).saturating_add(usize::from(b - b'0'))
        })
        .min(i32::MAX as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(input: &str, implied: Option<&str>) -> Value {
        match parse(input, implied) {
            Ok(map) => Value::Object(map),
            Err(e) => panic!("{input:?}: unexpected error: {e}"),
        }
    }

    fn err(input: &str, implied: Option<&str>) -> String {
        match parse(input, implied) {
            Ok(map) => panic!("{input:?}: expected an error, got {map:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn accepted_inputs() {
        let long_key = "k".repeat(127);
        let long_input = format!("{long_key}=x");
        let cases: Vec<(&str, Option<&str>, Value)> = vec![
            ("", None, json!({})),
            ("", Some("driver"), json!({})),
            ("a=1", None, json!({"a": "1"})),
            ("a=1,", None, json!({"a": "1"})),
            ("a=", None, json!({"a": ""})),
            ("a=1,b=2", None, json!({"a": "1", "b": "2"})),
            ("a=x,,y", None, json!({"a": "x,y"})),
            ("a=x,,", None, json!({"a": "x,"})),
            ("a=x,,,", None, json!({"a": "x,"})),
            ("a=x,,,b=y", None, json!({"a": "x,", "b": "y"})),
            ("a=b=c", None, json!({"a": "b=c"})),
            ("a=é", None, json!({"a": "é"})),
            ("a=1,a=2", None, json!({"a": "2"})),
            (
                "driver=qcow2,file.driver=file,file.filename=x.img",
                None,
                json!({"driver": "qcow2", "file": {"driver": "file", "filename": "x.img"}}),
            ),
            (
                "a.b.c=1,a.d=2",
                None,
                json!({"a": {"b": {"c": "1"}, "d": "2"}}),
            ),
            (
                "bitmaps.0=a,bitmaps.1=b",
                None,
                json!({"bitmaps": ["a", "b"]}),
            ),
            ("l.1=b,l.0=a", None, json!({"l": ["a", "b"]})),
            (
                "l.0.x=1,l.1.y=2",
                None,
                json!({"l": [{"x": "1"}, {"y": "2"}]}),
            ),
            ("l.0.0=a,l.0.1=b", None, json!({"l": [["a", "b"]]})),
            ("l.0=a,l.00=b", None, json!({"l": ["b"]})),
            ("a_b=1,A-9=2", None, json!({"a_b": "1", "A-9": "2"})),
            ("__com.redhat_foo=1", None, json!({"__com.redhat_foo": "1"})),
            (
                "__Com.Redhat-9_x.y=1",
                None,
                json!({"__Com.Redhat-9_x": {"y": "1"}}),
            ),
            ("a.b1=1", None, json!({"a": {"b1": "1"}})),
            (&long_input, None, json!({ long_key.as_str(): "x" })),
            ("null-co", Some("driver"), json!({"driver": "null-co"})),
            (
                "qcow2,node-name=n",
                Some("driver"),
                json!({"driver": "qcow2", "node-name": "n"}),
            ),
            ("driver=raw", Some("driver"), json!({"driver": "raw"})),
            (
                "a.b,x=1",
                Some("driver"),
                json!({"driver": "a.b", "x": "1"}),
            ),
            ("x=1,y=2", Some("driver"), json!({"x": "1", "y": "2"})),
            ("nbd,id=e", Some("type"), json!({"type": "nbd", "id": "e"})),
            (
                "throttle-group,id=t0,limits.bps-total=5",
                Some("qom-type"),
                json!({"qom-type": "throttle-group", "id": "t0", "limits": {"bps-total": "5"}}),
            ),
        ];
        for (input, implied, want) in cases {
            assert_eq!(ok(input, implied), want, "input {input:?}");
        }
    }

    #[test]
    fn refused_inputs_give_qemu_texts() {
        let long = "k".repeat(128);
        let long_key = format!("driver=x,{long}=x");
        let long_fragment = format!("a.{long}=x");
        let too_long_with_path = format!("{long}.a=x");
        let cases: Vec<(&str, Option<&str>, String)> = vec![
            ("foo", None, "Expected '=' after parameter 'foo'".into()),
            (
                "driver=x,foo",
                None,
                "Expected '=' after parameter 'foo'".into(),
            ),
            (
                "foo,bar",
                Some("driver"),
                "Expected '=' after parameter 'bar'".into(),
            ),
            (
                "driver=x,helpx",
                None,
                "Expected '=' after parameter 'helpx'".into(),
            ),
            (
                "help,null-co",
                Some("driver"),
                "Expected '=' after parameter 'null-co'".into(),
            ),
            (
                "a.b=1,a=2",
                None,
                "Parameters 'a.*' used inconsistently".into(),
            ),
            (
                "a=2,a.b=1",
                None,
                "Parameters 'a.*' used inconsistently".into(),
            ),
            (
                "a.b.c=1,a.b=2",
                None,
                "Parameters 'a.b.*' used inconsistently".into(),
            ),
            (
                "a.b=2,a.b.c=1",
                None,
                "Parameters 'a.b.*' used inconsistently".into(),
            ),
            (
                "a.0.b=2,a.0=1",
                None,
                "Parameters 'a.0.*' used inconsistently".into(),
            ),
            (
                "a=1,a.b",
                None,
                "Parameters 'a.*' used inconsistently".into(),
            ),
            (
                "a.0=1,a.b=2",
                None,
                "Parameters 'a.*' used inconsistently".into(),
            ),
            (
                "a.x.0=2,a.x.y=1",
                None,
                "Parameters 'a.x.*' used inconsistently".into(),
            ),
            (
                "b.1=2,a=1,a.c=2",
                None,
                "Parameters 'a.*' used inconsistently".into(),
            ),
            ("a.1=1", None, "Parameter 'a.0' missing".into()),
            ("a.0=x,a.2=y", None, "Parameter 'a.1' missing".into()),
            ("a.01=x", None, "Parameter 'a.0' missing".into()),
            ("a.x.0=2,a.y.1=1", None, "Parameter 'a.y.0' missing".into()),
            ("x.4294967296=1", None, "Parameter 'x.0' missing".into()),
            (
                "x.99999999999999999999=1",
                None,
                "Parameter 'x.0' missing".into(),
            ),
            ("x.0=a,x.00=b,x.2=c", None, "Parameter 'x.1' missing".into()),
            ("=x", None, "Invalid parameter ''".into()),
            ("driver=x,=x", None, "Invalid parameter ''".into()),
            (",driver=x", Some("driver"), "Invalid parameter ''".into()),
            ("null,,co", Some("driver"), "Invalid parameter ''".into()),
            ("a..b=x", None, "Invalid parameter 'a..b'".into()),
            ("a.=x", None, "Invalid parameter 'a.'".into()),
            (".a=x", None, "Invalid parameter '.a'".into()),
            ("0=x", None, "Invalid parameter '0'".into()),
            ("1a=x", None, "Invalid parameter '1a'".into()),
            ("a.1a=x", None, "Invalid parameter 'a.1a'".into()),
            ("a.-b=x", None, "Invalid parameter 'a.-b'".into()),
            ("_a=x", None, "Invalid parameter '_a'".into()),
            ("__com=x", None, "Invalid parameter '__com'".into()),
            (
                "__com.redhat.x=1",
                None,
                "Invalid parameter '__com.redhat.x'".into(),
            ),
            ("a@b=x", None, "Invalid parameter 'a@b'".into()),
            ("é=1", None, "Invalid parameter 'é'".into()),
            ("a.é=1", None, "Invalid parameter 'a.é'".into()),
            ("a=1,b.1=2,c..d=3", None, "Invalid parameter 'c..d'".into()),
            ("help,=x", None, "Invalid parameter ''".into()),
            ("=x,help", None, "Invalid parameter ''".into()),
            (
                "a=1,a.b=1,help",
                None,
                "Parameters 'a.*' used inconsistently".into(),
            ),
            (&long_key, None, format!("Parameter '{long}' is too long")),
            (
                &long_fragment,
                None,
                format!("Parameter fragment '{long}' is too long"),
            ),
            (
                &too_long_with_path,
                None,
                format!("Parameter fragment '{long}' is too long"),
            ),
            ("help", None, "Help is not available for this option".into()),
            (
                "?",
                Some("driver"),
                "Help is not available for this option".into(),
            ),
            (
                "driver=x,?",
                None,
                "Help is not available for this option".into(),
            ),
            (
                "help,driver=x",
                Some("driver"),
                "Help is not available for this option".into(),
            ),
            (
                "x,help",
                Some("driver"),
                "Help is not available for this option".into(),
            ),
            (
                "a.0=x,a.b=1,help",
                None,
                "Help is not available for this option".into(),
            ),
            (
                "driver=x,help,a.1=x",
                None,
                "Help is not available for this option".into(),
            ),
        ];
        for (input, implied, want) in cases {
            assert_eq!(err(input, implied), want, "input {input:?}");
        }
    }

    #[test]
    fn help_as_a_key_with_a_value_is_an_ordinary_key() {
        assert_eq!(ok("help=x", None), json!({"help": "x"}));
    }

    #[test]
    fn implied_key_only_applies_to_the_first_element() {
        assert_eq!(
            err("null-co,qcow2", Some("driver")),
            "Expected '=' after parameter 'qcow2'"
        );
    }
}
