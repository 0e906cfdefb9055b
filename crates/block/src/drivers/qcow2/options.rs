//! The qcow2 runtime options: checked as QEMU checks them (with its texts), then each one
//! either matches what this driver does or is refused with a text that says why.
//!
//! The driver (`image.rs`) keeps a metadata cache of a fixed size (up to 32 MiB of L2
//! tables and 64 refcount blocks, never cleaned by time), writes refcounts back before any
//! table that needs them so the image is never left dirty, makes no metadata overlap
//! checks, and frees discarded clusters without discarding them in the image file.
//! Options asking for anything else are refused rather than accepted and ignored.

use super::header::Qcow2Header;
use super::Qcow2Options;
use serde_json::Value;

/// QEMU's Qcow2OverlapCheckMode values.
const OVERLAP_MODES: &[&str] = &["none", "constant", "cached", "all"];

/// The members of QEMU's Qcow2OverlapCheckFlags besides `template`.
const OVERLAP_FLAGS: &[&str] = &[
    "main-header",
    "active-l1",
    "active-l2",
    "refcount-table",
    "refcount-block",
    "snapshot-table",
    "inactive-l1",
    "inactive-l2",
    "bitmap-directory",
];

fn flag_value(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s == "on" => Some(true),
        Value::String(s) if s == "off" => Some(false),
        _ => None,
    }
}

/// Whether `overlap-check` asks for any check, after QEMU's type checks of the value.
fn overlap_checks_asked(value: &Value) -> Result<bool, String> {
    match value {
        Value::String(mode) if OVERLAP_MODES.contains(&mode.as_str()) => Ok(mode != "none"),
        Value::String(mode) => Err(format!(
            "Parameter 'overlap-check' does not accept value '{mode}'"
        )),
        Value::Object(flags) => {
            // QEMU's default template is `cached`: only an explicit `none` starts empty.
            let mut asked = true;
            if let Some(template) = flags.get("template") {
                match template {
                    Value::String(mode) if OVERLAP_MODES.contains(&mode.as_str()) => {
                        asked = mode != "none";
                    }
                    Value::String(mode) => {
                        return Err(format!(
                            "Parameter 'overlap-check.template' does not accept value '{mode}'"
                        ))
                    }
                    _ => {
                        return Err(
                            "Invalid parameter type for 'overlap-check.template', expected: string"
                                .into(),
                        )
                    }
                }
            }
            for (key, value) in flags {
                if key == "template" {
                    continue;
                }
                if !OVERLAP_FLAGS.contains(&key.as_str()) {
                    return Err(format!("Parameter 'overlap-check.{key}' is unexpected"));
                }
                match flag_value(value) {
                    Some(on) => asked |= on,
                    None => {
                        return Err(format!(
                            "Invalid parameter type for 'overlap-check.{key}', expected: boolean"
                        ))
                    }
                }
            }
            Ok(asked)
        }
        _ => Err("Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks".into()),
    }
}

fn unsupported(option: &str, why: &str) -> String {
    format!("blockd's qcow2 driver does not support {option}: {why}")
}

impl Qcow2Options {
    /// What QEMU's option parser refuses, before anything is opened.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(value) = &self.overlap_check {
            overlap_checks_asked(value)?;
        }
        Ok(())
    }

    /// QEMU's checks that need the image header, in QEMU's order, then refuse what this
    /// driver cannot do.
    pub fn check(&self, header: &Qcow2Header) -> Result<(), String> {
        let sizes = [
            self.cache_size,
            self.l2_cache_size,
            self.refcount_cache_size,
        ];
        if sizes.iter().all(Option::is_some) {
            return Err(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
                    .into(),
            );
        }
        if let Some(entry) = self.l2_cache_entry_size {
            let cluster = header.cluster_size();
            if !entry.is_power_of_two() || !(512..=cluster).contains(&entry) {
                return Err(format!(
                    "L2 cache entry size must be a power of two between 512 and the cluster size ({cluster})"
                ));
            }
        }
        if let Some(interval) = self.cache_clean_interval {
            // QEMU reads it as an unsigned number: a negative one is huge.
            if interval < 0 || interval > i64::from(u32::MAX) {
                return Err("Cache clean interval too big".into());
            }
        }
        if self.lazy_refcounts == Some(true) && header.version < 3 {
            return Err(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
                    .into(),
            );
        }
        for (option, set) in [
            ("cache-size", self.cache_size.is_some()),
            ("l2-cache-size", self.l2_cache_size.is_some()),
            ("refcount-cache-size", self.refcount_cache_size.is_some()),
        ] {
            if set {
                return Err(unsupported(
                    option,
                    "its metadata cache has a fixed size (32 MiB of L2 tables, 64 refcount blocks)",
                ));
            }
        }
        if let Some(entry) = self.l2_cache_entry_size {
            if entry != header.cluster_size() {
                return Err(unsupported(
                    "l2-cache-entry-size",
                    "it caches whole L2 tables (one cluster each)",
                ));
            }
        }
        if self.cache_clean_interval.is_some_and(|s| s != 0) {
            return Err(unsupported(
                "cache-clean-interval",
                "it never drops cache entries for being unused (only 0 matches)",
            ));
        }
        if self.lazy_refcounts == Some(true) {
            return Err(unsupported(
                "lazy-refcounts=on",
                "it writes refcounts back before the tables that need them, so the image is never left dirty",
            ));
        }
        for (option, value) in [
            ("pass-discard-request=on", self.pass_discard_request),
            ("pass-discard-snapshot=on", self.pass_discard_snapshot),
            ("pass-discard-other=on", self.pass_discard_other),
        ] {
            if value == Some(true) {
                return Err(unsupported(
                    option,
                    "clusters it frees stay allocated in the image file",
                ));
            }
        }
        if self.discard_no_unref == Some(true) {
            return Err(unsupported(
                "discard-no-unref=on",
                "a discard always frees the clusters",
            ));
        }
        if let Some(value) = &self.overlap_check {
            if overlap_checks_asked(value)? {
                return Err(unsupported(
                    "metadata overlap checks",
                    "it makes none (only overlap-check=none matches)",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn overlap_check_values_as_qemu_types_them() {
        assert_eq!(overlap_checks_asked(&json!("none")), Ok(false));
        assert_eq!(overlap_checks_asked(&json!("all")), Ok(true));
        assert_eq!(
            overlap_checks_asked(&json!({"template": "none"})),
            Ok(false)
        );
        assert_eq!(
            overlap_checks_asked(&json!({"template": "none", "active-l1": true})),
            Ok(true)
        );
        assert_eq!(
            overlap_checks_asked(&json!({"main-header": false})),
            Ok(true)
        );
        assert_eq!(
            overlap_checks_asked(&json!("bogus")),
            Err("Parameter 'overlap-check' does not accept value 'bogus'".into())
        );
        assert_eq!(
            overlap_checks_asked(&json!(5)),
            Err("Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks".into())
        );
        assert_eq!(
            overlap_checks_asked(&json!({"nope": true})),
            Err("Parameter 'overlap-check.nope' is unexpected".into())
        );
    }
}
