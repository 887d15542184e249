//! Resources and defaults from etcd (`source.etcd`): the settings, what the store held at
//! one revision ([`Snapshot`]), and how its values join the local file into one
//! configuration. That configuration is built and checked exactly like a file (`-t`), and
//! every error is placed in the etcd key and at the line within its value.
//!
//! The store holds one key per resource, `<prefix>resources/<name>`, whose value is the YAML
//! of one entry of `resources:` (its `name` the key's), and `<prefix>defaults`, the YAML of
//! `defaults:`. Other keys under the prefix are not wsedge's and are left alone.

use super::errors::{from_serde, ConfigError};
use super::file::{parse_name, DefaultsFile, ResourceFile};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// `source.etcd` as the edge uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    /// The members' URLs.
    pub endpoints: Vec<String>,
    /// The prefix of every key (starts and ends with `/`).
    pub prefix: String,
    /// Client TLS towards etcd.
    pub tls: Option<EtcdTls>,
    /// User and password (read from `password_file`).
    pub user: Option<(String, Secret)>,
    /// Where the configuration last applied is kept.
    pub last_known_good: PathBuf,
    /// Each request to etcd gets this long.
    pub timeout: Duration,
}

/// A password: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(secret)")
    }
}

/// PEM files for TLS towards etcd (relative paths already resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that signs etcd's certificate (else the system's roots).
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key, for etcd's `--client-cert-auth`.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// Where the last-known-good file is when `source.etcd.last_known_good` does not say.
pub const DEFAULT_LAST_KNOWN_GOOD: &str = "/var/lib/wsedge/last-known-good.yaml";
/// A request to etcd's time when `source.etcd.timeout` does not say.
pub const DEFAULT_ETCD_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest value of one key read (a resource is a few hundred bytes).
pub const MAX_VALUE_BYTES: usize = 256 * 1024;
/// The most keys under the prefix.
pub const MAX_KEYS: usize = 100_000;

/// What the store held under the prefix at one revision: keys without the prefix
/// (`defaults`, `resources/<name>`, others), with their values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// etcd's revision this is the state at.
    pub revision: i64,
    /// The keys (prefix removed) and their values.
    pub entries: BTreeMap<String, String>,
    /// Keys whose values could not be read as text, and why: a snapshot with any is
    /// refused like a value that does not validate.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unreadable: BTreeMap<String, String>,
}

impl Snapshot {
    /// The names of the resources it holds, in key order.
    pub fn resource_names(&self) -> impl Iterator<Item = &str> {
        self.entries
            .keys()
            .filter_map(|k| k.strip_prefix(RESOURCES))
    }
}

/// Checks an endpoint given on a command line like `source.etcd.endpoints`.
pub fn check_endpoint(url: &str) -> Result<(), String> {
    super::file::parse_etcd_endpoint(url).map(|_| ())
}

/// Checks a prefix given on a command line like `source.etcd.prefix`.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    super::file::parse_etcd_prefix(prefix).map(|_| ())
}

/// Checks a resource's name (the last part of its key).
pub fn check_name(name: &str) -> Result<(), String> {
    parse_name(name).map(|_| ())
}

/// The keys of resources start with this (after the prefix).
pub const RESOURCES: &str = "resources/";
/// The key of the defaults (after the prefix).
pub const DEFAULTS: &str = "defaults";

/// A part of the joined text that came from one etcd key.
#[derive(Debug, Clone)]
struct Segment {
    /// The full key, for messages.
    key: String,
    /// The joined text's line (1-based) that is the value's first.
    first: usize,
    /// Lines of the value.
    lines: usize,
    /// Spaces put in front of each of the value's lines.
    indent: usize,
}

/// The local file and the store's values as one configuration text, and where each part
/// came from.
#[derive(Debug, Clone)]
pub(super) struct Joined {
    pub text: String,
    segments: Vec<Segment>,
    /// Keys under the prefix that are not wsedge's.
    pub foreign: Vec<String>,
}

impl Joined {
    /// Places an error found in the joined text in the etcd key it came from, at the line
    /// and column within the value; errors in the local file stay as they are.
    pub fn place(&self, mut e: ConfigError) -> ConfigError {
        if let ConfigError::Invalid {
            file,
            line,
            column,
            key,
            ..
        } = &mut e
        {
            let within = |s: &&Segment| *line >= s.first && *line < s.first + s.lines.max(1);
            if let Some(s) = self.segments.iter().find(within) {
                *file = format!("etcd {}", s.key);
                *line = *line + 1 - s.first;
                *column = column.saturating_sub(s.indent).max(1);
                // `resources[3].websocket.x` → `websocket.x`: the key names the resource.
                if let Some(rest) = key.strip_prefix("resources[") {
                    *key = rest
                        .split_once("].")
                        .map_or_else(|| "(the whole value)".to_string(), |(_, k)| k.to_string());
                }
            }
        }
        e
    }
}

/// The error for a value that cannot be used at all, placed at its key.
fn bad_value(key: &str, line: usize, message: String) -> ConfigError {
    ConfigError::Invalid {
        file: format!("etcd {key}"),
        line,
        column: 1,
        resource: None,
        key: "(the whole value)".into(),
        message,
    }
}

/// Checks one value on its own (so its errors are placed in it, and it cannot refer to
/// another key's anchors) and that it can be indented into the joined text.
fn check_value<T: for<'de> Deserialize<'de>>(key: &str, value: &str) -> Result<T, ConfigError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(bad_value(
            key,
            0,
            format!(
                "the value is {} bytes; a value may hold at most {} KiB",
                value.len(),
                MAX_VALUE_BYTES >> 10
            ),
        ));
    }
    for (i, l) in value.lines().enumerate() {
        if l.starts_with("---") || l.starts_with("...") || l.starts_with('%') {
            return Err(bad_value(
                key,
                i + 1,
                "a value is one YAML document: remove `---`, `...` and `%` directives".into(),
            ));
        }
    }
    let file = format!("etcd {key}");
    serde_yaml::from_str(value).map_err(|e| {
        let mut placed = from_serde(&file, value, &e);
        if let ConfigError::Invalid { key: k, .. } = &mut placed {
            if k == "(top level)" {
                *k = "(the whole value)".into();
            }
        }
        placed
    })
}

/// Joins the local file's text and the store's values into one configuration text, each
/// value checked on its own first.
pub(super) fn join(local: &str, prefix: &str, store: &Snapshot) -> Result<Joined, ConfigError> {
    let mut text = String::with_capacity(local.len() + 64 * store.entries.len());
    text.push_str(local);
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    if let Some((key, why)) = store.unreadable.iter().next() {
        return Err(bad_value(&format!("{prefix}{key}"), 0, why.clone()));
    }
    let mut segments = Vec::new();
    let mut foreign = Vec::new();
    let mut push = |text: &mut String, key: String, value: &str, indent: usize| {
        let pad = " ".repeat(indent);
        let first = text.lines().count() + 1;
        let mut lines = 0;
        for l in value.lines() {
            text.push_str(&pad);
            text.push_str(l);
            text.push('\n');
            lines += 1;
        }
        segments.push(Segment {
            key,
            first,
            lines,
            indent,
        });
    };
    if let Some(value) = store.entries.get(DEFAULTS) {
        let key = format!("{prefix}{DEFAULTS}");
        check_value::<DefaultsFile>(&key, value)?;
        text.push_str("defaults:\n");
        push(&mut text, key, value, 2);
    }
    text.push_str("resources:\n");
    for (k, value) in &store.entries {
        let full = format!("{prefix}{k}");
        let Some(name) = k.strip_prefix(RESOURCES) else {
            if k != DEFAULTS {
                foreign.push(full);
            }
            continue;
        };
        if let Err(why) = parse_name(name) {
            return Err(bad_value(
                &full,
                0,
                format!("the key's last part is the resource's name: {why}"),
            ));
        }
        let parsed: ResourceFile = check_value(&full, value)?;
        if parsed.name.0 != name {
            return Err(bad_value(
                &full,
                0,
                format!(
                    "the value's name is \"{}\" but its key says \"{name}\": a resource is stored at {prefix}{RESOURCES}<its name>",
                    parsed.name.0
                ),
            ));
        }
        text.push_str("  -\n");
        push(&mut text, full, value, 4);
    }
    if store.resource_names().next().is_none() {
        // No resource yet (a new fleet): an empty list, not a null.
        text.truncate(text.len() - "resources:\n".len());
        text.push_str("resources: []\n");
    }
    Ok(Joined {
        text,
        segments,
        foreign,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: &str = "listen: { http: [\"127.0.0.1:0\"] }\n";

    fn store(entries: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            revision: 7,
            entries: entries
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            unreadable: Default::default(),
        }
    }

    #[test]
    fn values_are_indented_into_one_text_and_errors_go_back_to_their_key() {
        let chat = "name: chat\nhostnames: [chat.example.com]\norigin:\n  servers: [{ address: \"127.0.0.1:9\" }]\n";
        // Its second line takes a hostname chat has: an error of the cross-checks, which
        // run on the joined text.
        let dup = "name: dup\nhostnames: [\"chat.example.com\"]\norigin:\n  servers: [{ address: \"127.0.0.1:9\" }]\n";
        let s = store(&[
            ("defaults", "websocket:\n  idle_timeout: 30s\n"),
            ("resources/chat", chat),
            ("resources/dup", dup),
            ("other/thing", "x"),
        ]);
        let joined = join(LOCAL, "/wsedge/", &s).unwrap();
        assert_eq!(joined.foreign, vec!["/wsedge/other/thing".to_string()]);
        let parsed: serde_yaml::Value = serde_yaml::from_str(&joined.text).unwrap();
        assert_eq!(parsed["resources"][0]["name"].as_str(), Some("chat"));
        assert_eq!(
            parsed["defaults"]["websocket"]["idle_timeout"].as_str(),
            Some("30s")
        );
        let e = crate::config::build::build(std::path::Path::new("local.yaml"), &joined.text, None)
            .unwrap_err();
        let placed = joined.place(e).to_string();
        assert!(
            placed.starts_with("etcd /wsedge/resources/dup:2:14: resource \"dup\": hostnames[0]:"),
            "{placed}"
        );
        // An error in the local part stays there.
        let local = crate::config::ConfigError::Invalid {
            file: "local.yaml".into(),
            line: 1,
            column: 1,
            resource: None,
            key: "listen".into(),
            message: "x".into(),
        };
        assert!(joined
            .place(local)
            .to_string()
            .starts_with("local.yaml:1:1:"));
    }

    #[test]
    fn hostile_values_are_refused_at_their_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("resources/Bad!", "name: x", "the key's last part"),
            ("resources/a", "name: b\nhostnames: [a.example]\norigin: { servers: [{ address: \"127.0.0.1:9\" }] }", "its key says \"a\""),
            ("resources/a", "---\nname: a", "one YAML document"),
            ("resources/a", "[1, 2]", "(the whole value)"),
            ("resources/a", "name: a\nhostnames: *x", "etcd /wsedge/resources/a:2"),
            ("defaults", "websocket: { nope: 1 }", "unknown field"),
        ];
        for (k, v, want) in cases {
            let e = join(LOCAL, "/wsedge/", &store(&[(k, v)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{k}: {e}");
        }
        let huge = format!("name: a\n#{}", "x".repeat(MAX_VALUE_BYTES));
        let e = join(LOCAL, "/wsedge/", &store(&[("resources/a", &huge)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 256 KiB"), "{e}");
    }

    #[test]
    fn an_empty_store_is_an_empty_list() {
        let joined = join(LOCAL, "/p/", &Snapshot::default()).unwrap();
        assert!(joined.text.ends_with("resources: []\n"), "{}", joined.text);
    }
}
