//! The qcow2 runtime options: checked as QEMU checks them (with its texts), then each one
//! either matches what this driver does or is refused with a text that says why.
//!
//! The driver (`image.rs`) keeps metadata caches of the sizes the cache options give
//! (whole L2 tables, never cleaned by time), writes refcounts back before any
//! table that needs them so the image is never left dirty, makes the metadata overlap
//! checks `overlap-check` asks for (`overlap.rs`), and discards freed clusters in the image
//! file as the `pass-discard-*` options say (`refcount.rs`).
//! Options asking for anything else are refused rather than accepted and ignored.

use super::header::Qcow2Header;
use super::overlap::{Checks, Metadata};
use super::refcount::PassDiscard;
use super::Qcow2Options;
use serde_json::Value;

/// QEMU's cache defaults and minimums (DEFAULT_L2_CACHE_MAX_SIZE, MIN_L2_CACHE_SIZE,
/// MIN_REFCOUNT_CACHE_SIZE).
const DEFAULT_L2_CACHE_BYTES: u64 = 32 << 20;
const MIN_L2_TABLES: u64 = 2;
const MIN_REFCOUNT_BLOCKS: u64 = 4;

/// QEMU's Qcow2OverlapCheckMode values.
const OVERLAP_MODES: &[&str] = &["none", "constant", "cached", "all"];

/// A boolean member: typed in JSON, `on` or `off` in keyval syntax.
fn flag_value(value: &Value, keyval: bool) -> Option<bool> {
    match value {
        Value::Bool(b) if !keyval => Some(*b),
        Value::String(s) if keyval && s == "on" => Some(true),
        Value::String(s) if keyval && s == "off" => Some(false),
        _ => None,
    }
}

/// The checks `overlap-check` asks for, after QEMU's type checks of the value.
fn overlap_checks(value: &Value, keyval: bool) -> Result<Checks, String> {
    match value {
        Value::String(mode) if OVERLAP_MODES.contains(&mode.as_str()) => {
            Ok(Checks::mode(mode).expect("a listed mode"))
        }
        Value::String(mode) => Err(format!(
            "Parameter 'overlap-check' does not accept value '{mode}'"
        )),
        Value::Object(flags) => {
            // QEMU's default template is `cached`.
            let mut checks = Checks::CACHED;
            if let Some(template) = flags.get("template") {
                match template {
                    Value::String(mode) if OVERLAP_MODES.contains(&mode.as_str()) => {
                        checks = Checks::mode(mode).expect("a listed mode");
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
                let Some(kind) = Metadata::ALL.into_iter().find(|k| k.flag() == key) else {
                    return Err(format!("Parameter 'overlap-check.{key}' is unexpected"));
                };
                match flag_value(value, keyval) {
                    Some(on) => checks = checks.with(kind, on),
                    None => {
                        return Err(format!(
                            "Invalid parameter type for 'overlap-check.{key}', expected: boolean"
                        ))
                    }
                }
            }
            Ok(checks)
        }
        _ => Err("Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks".into()),
    }
}

fn unsupported(option: &str, why: &str) -> String {
    format!("blockd's qcow2 driver does not support {option}: {why}")
}

impl Qcow2Options {
    /// What QEMU's option parser refuses, before anything is opened; the overlap checks
    /// asked for.
    pub(super) fn validate(&self, keyval: bool) -> Result<Checks, String> {
        match &self.overlap_check {
            Some(value) => overlap_checks(value, keyval),
            None => Ok(Checks::CACHED),
        }
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
        self.cache_sizes(header)?;
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
        if self.discard_no_unref == Some(true) && header.version < 3 {
            return Err("discard-no-unref is only supported since qcow2 version 3".into());
        }
        Ok(())
    }

    /// How many L2 tables and refcount blocks the caches hold, from `cache-size`,
    /// `l2-cache-size` and `refcount-cache-size` as QEMU divides them: by default L2 tables
    /// for the whole disk up to 32 MiB and four refcount blocks; a total is given to the L2
    /// cache first. At least two tables and four blocks. The L2 cache holds whole tables
    /// (QEMU's `l2-cache-entry-size` slices are not taken), so a size that is not a
    /// multiple of the cluster size is rounded down.
    pub(super) fn cache_sizes(&self, header: &Qcow2Header) -> Result<(usize, usize), String> {
        let cluster = header.cluster_size();
        let min_refcount = MIN_REFCOUNT_BLOCKS * cluster;
        let max_l2 = (header.size.div_ceil(cluster) * 8).next_multiple_of(cluster);
        let mut l2 = self
            .l2_cache_size
            .unwrap_or(DEFAULT_L2_CACHE_BYTES)
            .min(max_l2);
        let mut refcount = self.refcount_cache_size.unwrap_or(0);
        if let Some(total) = self.cache_size {
            if self.l2_cache_size.is_some_and(|l2| l2 > total) {
                return Err("l2-cache-size may not exceed cache-size".into());
            }
            if refcount > total {
                return Err("refcount-cache-size may not exceed cache-size".into());
            }
            if self.l2_cache_size.is_some() {
                refcount = total - l2;
            } else if self.refcount_cache_size.is_some() {
                l2 = total - refcount;
            } else if total >= max_l2 + min_refcount {
                l2 = max_l2;
                refcount = total - l2;
            } else {
                refcount = total.min(min_refcount);
                l2 = total - refcount;
            }
        }
        let tables = (l2 / cluster).max(MIN_L2_TABLES);
        let blocks = (refcount / cluster).max(MIN_REFCOUNT_BLOCKS);
        if tables > i32::MAX as u64 {
            return Err("L2 cache size too big".into());
        }
        if blocks > i32::MAX as u64 {
            return Err("Refcount cache size too big".into());
        }
        Ok((tables as usize, blocks as usize))
    }

    /// Which freed clusters reach the file as discards, with QEMU's defaults: guest
    /// requests when the node has `discard=unmap`, snapshots' clusters always, other
    /// metadata never.
    pub(super) fn pass_discard(&self, discard_unmap: bool) -> PassDiscard {
        PassDiscard {
            request: self.pass_discard_request.unwrap_or(discard_unmap),
            snapshot: self.pass_discard_snapshot.unwrap_or(true),
            other: self.pass_discard_other.unwrap_or(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cache_sizes_are_divided_as_qemu_divides_them() {
        let header = Qcow2Header {
            cluster_bits: 16,
            size: 1 << 30,
            ..Qcow2Header::default()
        };
        let sizes = |options: Value| {
            serde_json::from_value::<Qcow2Options>(options)
                .unwrap()
                .cache_sizes(&header)
        };
        // 1 GiB needs 128 KiB of L2 tables: two of them, and four refcount blocks.
        assert_eq!(sizes(json!({})), Ok((2, 4)));
        assert_eq!(sizes(json!({"cache-size": 1 << 20})), Ok((2, 14)));
        // Too small for both: the refcount cache first, at least the minimums.
        assert_eq!(sizes(json!({"cache-size": 200 << 10})), Ok((2, 4)));
        assert_eq!(
            sizes(json!({"cache-size": 1 << 20, "refcount-cache-size": 512 << 10})),
            Ok((8, 8))
        );
        assert_eq!(
            sizes(json!({"cache-size": 1 << 20, "l2-cache-size": 1 << 20})),
            Ok((2, 14))
        );
        assert_eq!(
            sizes(json!({"cache-size": 1 << 20, "l2-cache-size": 2 << 20})),
            Err("l2-cache-size may not exceed cache-size".into())
        );
        assert_eq!(sizes(json!({"refcount-cache-size": 1 << 20})), Ok((2, 16)));
    }

    #[test]
    fn overlap_check_values_as_qemu_types_them() {
        assert_eq!(overlap_checks(&json!("none"), false), Ok(Checks::NONE));
        assert_eq!(overlap_checks(&json!("all"), false), Ok(Checks::ALL));
        assert_eq!(
            overlap_checks(&json!({"template": "none"}), false),
            Ok(Checks::NONE)
        );
        assert_eq!(
            overlap_checks(&json!({"template": "none", "active-l1": true}), false),
            Ok(Checks::NONE.with(Metadata::ActiveL1, true))
        );
        assert_eq!(
            overlap_checks(&json!({"main-header": "off"}), true),
            Ok(Checks::CACHED.with(Metadata::Header, false))
        );
        assert_eq!(
            overlap_checks(&json!("bogus"), false),
            Err("Parameter 'overlap-check' does not accept value 'bogus'".into())
        );
        assert_eq!(
            overlap_checks(&json!(5), false),
            Err("Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks".into())
        );
        assert_eq!(
            overlap_checks(&json!({"nope": true}), false),
            Err("Parameter 'overlap-check.nope' is unexpected".into())
        );
    }
}
