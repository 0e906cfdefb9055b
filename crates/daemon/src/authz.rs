//! Authorization objects (`authz-simple`, `authz-list`, `authz-listfile`): who may use the
//! NBD server once TLS named the client by its certificate's distinguished name.

use notify::Watcher;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// What a rule (or a list when no rule matched) decides (QAuthZListPolicy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// The identity may not connect (the default).
    #[default]
    Deny,
    /// The identity may connect.
    Allow,
}

/// How a rule's `match` is compared (QAuthZListFormat).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The identity must equal `match`.
    #[default]
    Exact,
    /// `*` stands for any run of characters and `?` for one, as GLib's simple patterns.
    Glob,
}

/// One rule of a list (QAuthZListRule).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(rename = "match")]
    pattern: String,
    policy: Policy,
    #[serde(default)]
    format: Format,
}

/// Rules tried in order, and the policy when none matches.
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RuleList {
    #[serde(default)]
    policy: Policy,
    #[serde(default)]
    rules: Vec<Rule>,
}

impl RuleList {
    fn decide(&self, identity: &str) -> bool {
        let policy = self
            .rules
            .iter()
            .find(|r| match r.format {
                Format::Exact => r.pattern == identity,
                Format::Glob => glob_match(&r.pattern, identity),
            })
            .map_or(self.policy, |r| r.policy);
        policy == Policy::Allow
    }
}

/// GLib's g_pattern_match_simple: `*` matches any run (also empty), `?` one character.
fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // The last `*` seen and the text position it was tried at: backtracking to it alone
    // suffices, which keeps the match linear in practice and never recursive.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// An authorization object.
pub enum Authz {
    /// `authz-simple`: exactly one identity may connect.
    Simple(Mutex<String>),
    /// `authz-list`: rules given with the object.
    List(RuleList),
    /// `authz-listfile`: rules read from a JSON file, again whenever it changes if
    /// `refresh` is on.
    ListFile(ListFile),
}

/// An `authz-listfile`'s rules, and the watcher that reloads them.
pub struct ListFile {
    filename: PathBuf,
    refresh: bool,
    rules: Arc<Mutex<RuleList>>,
    /// Dropped with the object, which ends the watching.
    _watcher: Option<notify::RecommendedWatcher>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn load_rules(path: &Path) -> Result<RuleList, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "Unable to read '{}': {}",
            path.display(),
            block::os_error_text(&e)
        )
    })?;
    serde_json::from_str(&text).map_err(|e| format!("Unable to parse '{}': {e}", path.display()))
}

impl ListFile {
    /// Loads `filename` and, with `refresh`, watches it: a change that parses replaces the
    /// rules, one that does not is logged and the old rules stay.
    pub fn open(filename: PathBuf, refresh: bool) -> Result<ListFile, String> {
        let rules = Arc::new(Mutex::new(load_rules(&filename)?));
        let watcher = if refresh {
            let target = rules.clone();
            let path = filename.clone();
            let mut watcher =
                notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                    if event.is_err() {
                        return;
                    }
                    match load_rules(&path) {
                        Ok(new) => *lock(&target) = new,
                        Err(e) => tracing::warn!("authz-listfile keeps its rules: {e}"),
                    }
                })
                .map_err(|e| format!("Unable to watch '{}': {e}", filename.display()))?;
            // The directory, not the file: editors replace files by renaming over them.
            let dir = filename
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            watcher
                .watch(dir, notify::RecursiveMode::NonRecursive)
                .map_err(|e| format!("Unable to watch '{}': {e}", filename.display()))?;
            Some(watcher)
        } else {
            None
        };
        Ok(ListFile {
            filename,
            refresh,
            rules,
            _watcher: watcher,
        })
    }
}

impl Authz {
    /// The object's QOM type name.
    pub fn qom_type(&self) -> &'static str {
        match self {
            Authz::Simple(_) => "authz-simple",
            Authz::List(_) => "authz-list",
            // QEMU's QOM name; the QAPI name in object-add is authz-listfile.
            Authz::ListFile(_) => "authz-list-file",
        }
    }

    /// Whether `identity` may connect.
    pub fn is_allowed(&self, identity: &str) -> bool {
        match self {
            Authz::Simple(allowed) => *lock(allowed) == identity,
            Authz::List(list) => list.decide(identity),
            Authz::ListFile(file) => lock(&file.rules).decide(identity),
        }
    }

    /// A property for qom-get, `None` if the object has no such property.
    pub fn property(&self, name: &str) -> Option<Value> {
        let list = |l: &RuleList| match name {
            "policy" => serde_json::to_value(l.policy).ok(),
            "rules" => serde_json::to_value(&l.rules).ok(),
            _ => None,
        };
        match (self, name) {
            (Authz::Simple(identity), "identity") => Some(Value::String(lock(identity).clone())),
            (Authz::List(l), _) => list(l),
            (Authz::ListFile(f), "filename") => {
                Some(Value::String(f.filename.display().to_string()))
            }
            (Authz::ListFile(f), "refresh") => Some(Value::Bool(f.refresh)),
            _ => None,
        }
    }

    /// qom-set of `authz-simple`'s identity, the one property QEMU lets change that blockd
    /// offers to; Err names what cannot be set.
    pub fn set_identity(&self, value: &Value) -> Result<(), String> {
        let Authz::Simple(identity) = self else {
            return Err("only authz-simple's identity can be set".into());
        };
        let Value::String(new) = value else {
            return Err("Invalid parameter type for 'identity', expected: string".into());
        };
        *lock(identity) = new.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns_match_as_glib_does() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*CN=client*", "C=GB,O=x,CN=client.example"));
        assert!(glob_match("CN=?lient", "CN=client"));
        assert!(!glob_match("CN=?lient", "CN=lient"));
        assert!(glob_match("a*b*c", "aXXbYYbZc"));
        assert!(!glob_match("a*b*c", "aXXbYYbZ"));
        assert!(glob_match("**x", "x"));
        assert!(!glob_match("", "x"));
    }

    #[test]
    fn lists_take_the_first_matching_rule_else_their_policy() {
        let list: RuleList = serde_json::from_value(serde_json::json!({
            "policy": "deny",
            "rules": [
                {"match": "CN=bad*", "policy": "deny", "format": "glob"},
                {"match": "CN=*", "policy": "allow", "format": "glob"},
                {"match": "O=exact", "policy": "allow"}
            ]
        }))
        .unwrap();
        assert!(!list.decide("CN=bad.example"));
        assert!(list.decide("CN=good.example"));
        assert!(list.decide("O=exact"));
        assert!(!list.decide("O=exactly"));
    }
}
