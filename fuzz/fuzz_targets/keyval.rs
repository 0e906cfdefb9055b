//! The command line's key=value syntax (`--blockdev`, `--object`, `--export`,
//! `--nbd-server`): QEMU's keyval parser, then the deserializer that turns its strings
//! into typed values, both on arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// A shape the daemon deserializes keyval into: strings, numbers, booleans, nested
/// objects and lists.
#[derive(serde::Deserialize, Debug)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct Shape {
    driver: Option<String>,
    size: Option<u64>,
    read_only: Option<bool>,
    file: Option<Value>,
    rules: Option<Vec<Value>>,
    limits: Option<std::collections::BTreeMap<String, i64>>,
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for implied in [None, Some("driver")] {
        if let Ok(map) = qapi::keyval::parse(text, implied) {
            let value = Value::Object(map);
            let _ = qapi::de::from_keyval::<Shape>(value.clone());
            let _ = qapi::de::from_keyval::<Value>(value);
        }
    }
});
