//! JSON as QEMU writes it: its layout (`{"a": 1, "b": [1, 2]}`), non-ASCII escaped as
//! `\uXXXX`, floats as `%.17g`, and object members in the order QEMU's dictionaries
//! iterate, so that replies and `json:` filenames are byte-identical to QEMU's.

use serde_json::{Map, Value};

/// Serializes `value` as QEMU's monitor does (no trailing newline).
pub fn to_string(value: &Value) -> String {
    let mut out = String::new();
    write_value(value, &mut out);
    out
}

/// Serializes `value` as QEMU's monitor does with `pretty=on`: one member or element per
/// line, indented by four spaces a level, closing brackets at their opener's level (an
/// empty object too: `{` and `}` on lines of their own). Lines end in `\n`.
pub fn to_string_pretty(value: &Value) -> String {
    let mut out = String::new();
    write_pretty(value, 0, &mut out);
    out
}

fn write_pretty(value: &Value, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n(' ', level * 4));
    };
    match value {
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, level + 1);
                write_pretty(v, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in qdict_order(map).into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, level + 1);
                write_string(k, out);
                out.push_str(": ");
                write_pretty(v, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        scalar => write_value(scalar, out),
    }
}

fn write_value(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (_, Some(u), _) => out.push_str(&u.to_string()),
            (_, _, Some(f)) => out.push_str(&format_g17(f)),
            _ => out.push_str("null"),
        },
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(v, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in qdict_order(map).into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_string(k, out);
                out.push_str(": ");
                write_value(v, out);
            }
            out.push('}');
        }
    }
}

/// QEMU's dictionaries iterate by hash bucket (512 buckets), newest entry first within one.
pub fn qdict_order(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut entries: Vec<(u32, usize, (&String, &Value))> = map
        .iter()
        .enumerate()
        .map(|(i, kv)| (qdict_bucket(kv.0), i, kv))
        .collect();
    entries.sort_by_key(|&(bucket, i, _)| (bucket, std::cmp::Reverse(i)));
    entries.into_iter().map(|(_, _, kv)| kv).collect()
}

/// The bucket QEMU's QDict puts `key` in.
pub fn qdict_bucket(key: &str) -> u32 {
    let mut v = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, &c) in key.as_bytes().iter().enumerate() {
        v = v.wrapping_add(u32::from(c) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(v).wrapping_add(12345) % 512
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04X}"));
                }
            }
        }
    }
    out.push('"');
}

/// C's `%.17g`.
fn format_g17(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.into();
    }
    let sci = format!("{:.16e}", f);
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let trim = |s: String| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    };
    if !(-4..17).contains(&exp) {
        let m = trim(format!("{}.{}", &digits[..1], &digits[1..]));
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    } else if exp >= 0 {
        let point = exp as usize + 1;
        let m = trim(format!("{}.{}", &digits[..point], &digits[point..]));
        format!("{sign}{m}")
    } else {
        let zeros = "0".repeat((-exp - 1) as usize);
        let m = trim(format!("0.{zeros}{digits}"));
        format!("{sign}{m}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_written_in_qdict_order() {
        let v: Value = serde_json::from_str(
            r#"{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "p"}, "capabilities": ["oob"]}}"#,
        )
        .unwrap();
        assert_eq!(
            to_string(&v),
            r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "p"}, "capabilities": ["oob"]}}"#
        );
        let v: Value = serde_json::from_str(
            r#"{"event": "E", "data": {}, "timestamp": {"microseconds": 1, "seconds": 2}}"#,
        )
        .unwrap();
        assert_eq!(
            to_string(&v),
            r#"{"timestamp": {"seconds": 2, "microseconds": 1}, "event": "E", "data": {}}"#
        );
    }
}
