//! `wsedge resource put FILE | get NAME | delete NAME | list | diff FILE`: an operator's
//! change to one resource in etcd, checked with the same code as `-t` (the whole
//! configuration that would result, against the current defaults and the other
//! resources) before anything is written, and written with a compare-and-swap on the
//! revision it was checked against: when another operator changed anything under the
//! prefix in between, nothing is written and the command says so.

use super::etcd;
use crate::config::store::{EtcdSettings, Snapshot, DEFAULTS, RESOURCES};
use crate::config::Config;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What to do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Create or replace the resource in FILE (one entry of `resources:`); with a
    /// revision, only if nothing under the prefix changed after it (the one an operator
    /// reviewed with `diff` or `list`).
    Put(PathBuf, Option<i64>),
    /// Print a resource's value.
    Get(String),
    /// Remove a resource (with a revision: only if nothing changed after it).
    Delete(String, Option<i64>),
    /// List the resources.
    List,
    /// Show what `put FILE` would change, and whether it would be accepted.
    Diff(PathBuf),
}

/// Where the store is.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// The edge's configuration file: its `source.etcd`, and the local part every check
    /// joins the resources to (when it exists).
    pub config: Option<PathBuf>,
    /// Endpoints instead of the file's (`--etcd URL`).
    pub endpoints: Vec<String>,
    /// A prefix instead of the file's (`--prefix`).
    pub prefix: Option<String>,
}

/// The local part of a check when no edge configuration is at hand: a listener and the
/// source, so that what is checked is the resources and defaults alone.
fn bare_local(s: &EtcdSettings) -> String {
    format!(
        "listen: {{ http: [\"127.0.0.1:1\"] }}\nsource: {{ etcd: {{ endpoints: [{}], prefix: \"{}\" }} }}\n",
        s.endpoints
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", "),
        s.prefix
    )
}

/// The settings and the local text (with the path it is named by) of a check.
fn resolve(t: &Target) -> Result<(EtcdSettings, PathBuf, String), String> {
    let file = t
        .config
        .as_ref()
        .filter(|p| p.exists() || t.endpoints.is_empty());
    let mut settings = match file {
        Some(p) => Config::etcd_settings(p)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "{}: has no source.etcd; name the store with --etcd URL",
                    p.display()
                )
            })?,
        None => EtcdSettings {
            endpoints: Vec::new(),
            prefix: "/wsedge/".into(),
            tls: None,
            user: None,
            last_known_good: PathBuf::new(),
            timeout: Duration::from_secs(5),
        },
    };
    if !t.endpoints.is_empty() {
        for e in &t.endpoints {
            crate::config::store::check_endpoint(e).map_err(|e| format!("--etcd: {e}"))?;
        }
        settings.endpoints = t.endpoints.clone();
    }
    if let Some(p) = &t.prefix {
        crate::config::store::check_prefix(p).map_err(|e| format!("--prefix: {e}"))?;
        settings.prefix = p.clone();
    }
    let (path, local) = match file {
        Some(p) => (
            p.clone(),
            crate::config::read_text(p).map_err(|e| format!("{}: {e}", p.display()))?,
        ),
        None => (
            PathBuf::from("(no edge configuration)"),
            bare_local(&settings),
        ),
    };
    Ok((settings, path, local))
}

/// Runs `action`; the text to print, or the error.
pub fn run(target: &Target, action: Action) -> Result<String, String> {
    let (settings, path, local) = resolve(target)?;
    super::run_blocking(async move {
        let mut client = etcd::connect(&settings)
            .await
            .map_err(|e| format!("etcd ({}): {e}", super::describe(&settings)))?;
        let store = etcd::read(&mut client, &settings)
            .await
            .map_err(|e| format!("etcd ({}): {e}", super::describe(&settings)))?;
        let key = |name: &str| format!("{}{RESOURCES}{name}", settings.prefix);
        match action {
            Action::List => {
                let mut out = format!(
                    "revision {}: {} resources\n",
                    store.revision,
                    super::count(&store)
                );
                for name in store.resource_names() {
                    out.push_str(name);
                    out.push('\n');
                }
                if store.entries.contains_key(DEFAULTS) {
                    out.push_str(&format!("(and {}{DEFAULTS})\n", settings.prefix));
                }
                Ok(out)
            }
            Action::Get(name) => store
                .entries
                .get(&format!("{RESOURCES}{name}"))
                .cloned()
                .ok_or_else(|| format!("no resource {name} ({} is not set)", key(&name))),
            Action::Diff(file) => {
                let (name, text) = read_resource(&file)?;
                let old = store.entries.get(&format!("{RESOURCES}{name}"));
                let mut out = match old {
                    None => format!("{}: a new resource\n", key(&name)),
                    Some(old) if *old == text => format!("{}: unchanged\n", key(&name)),
                    Some(old) => format!(
                        "{} at revision {}:\n{}",
                        key(&name),
                        store.revision,
                        diff(old, &text)
                    ),
                };
                let mut next = store.clone();
                next.entries.insert(format!("{RESOURCES}{name}"), text);
                match check(&path, &local, &next, &settings.prefix, &name, &file) {
                    Ok(n) => out.push_str(&format!("it would be accepted ({n} resources)\n")),
                    Err(e) => out.push_str(&format!("it would be refused: {e}\n")),
                }
                Ok(out)
            }
            Action::Put(file, if_revision) => {
                let base = base_revision(&store, if_revision)?;
                let (name, text) = read_resource(&file)?;
                let k = format!("{RESOURCES}{name}");
                let unchanged = store.entries.get(&k) == Some(&text);
                let mut next = store.clone();
                next.entries.insert(k, text.clone());
                // Checked even when unchanged: a value already in etcd may not validate.
                let n = check(&path, &local, &next, &settings.prefix, &name, &file)?;
                if unchanged {
                    return Ok(format!(
                        "{}: unchanged at revision {}\n",
                        key(&name),
                        store.revision
                    ));
                }
                let op = TxnOp::put(key(&name), text, None);
                let revision = write_if_unchanged(&mut client, &settings, base, op).await?;
                Ok(format!(
                    "{}: written at revision {revision} ({n} resources)\n",
                    key(&name)
                ))
            }
            Action::Delete(name, if_revision) => {
                let base = base_revision(&store, if_revision)?;
                let k = format!("{RESOURCES}{name}");
                if !store.entries.contains_key(&k) {
                    return Err(format!("no resource {name} ({} is not set)", key(&name)));
                }
                let mut next = store.clone();
                next.entries.remove(&k);
                let n = check(&path, &local, &next, &settings.prefix, &name, Path::new(""))?;
                let op = TxnOp::delete(key(&name), None);
                let revision = write_if_unchanged(&mut client, &settings, base, op).await?;
                Ok(format!(
                    "{}: deleted at revision {revision} ({n} resources left)\n",
                    key(&name)
                ))
            }
        }
    })
}

/// The revision a write is conditional on: the one asked for, else the one just read.
fn base_revision(store: &Snapshot, asked: Option<i64>) -> Result<i64, String> {
    match asked {
        Some(r) if r < 1 || r > store.revision => Err(format!(
            "--if-revision {r}: etcd is at revision {}; give one that `list` or `diff` showed",
            store.revision
        )),
        Some(r) => Ok(r),
        None => Ok(store.revision),
    }
}

/// A resource file: its name and text.
fn read_resource(file: &Path) -> Result<(String, String), String> {
    let text = crate::config::read_text(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let value: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| format!("{}: not YAML: {e}", file.display()))?;
    let name = value.get("name").and_then(|n| n.as_str()).ok_or_else(|| {
        format!(
            "{}: no `name`: a resource file is one entry of `resources:`, with its name",
            file.display()
        )
    })?;
    crate::config::store::check_name(name).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok((name.to_string(), text))
}

/// Checks the configuration `next` would make, as `-t` does; the number of resources, or
/// the error (an error in the resource's own value is placed in `file`).
fn check(
    path: &Path,
    local: &str,
    next: &Snapshot,
    prefix: &str,
    name: &str,
    file: &Path,
) -> Result<usize, String> {
    match Config::from_parts(path, local, Some(next)) {
        Ok(c) => Ok(c.resources.len()),
        Err(e) => {
            let e = e.to_string();
            let own = format!("etcd {prefix}{RESOURCES}{name}:");
            Err(match e.strip_prefix(&own) {
                Some(rest) if !file.as_os_str().is_empty() => format!("{}:{rest}", file.display()),
                _ => e,
            })
        }
    }
}

/// Writes `op` only if no key under the prefix changed after `revision` (the one the
/// change was checked against); the revision it was written at.
pub async fn write_if_unchanged(
    client: &mut etcd_client::Client,
    s: &EtcdSettings,
    revision: i64,
    op: TxnOp,
) -> Result<i64, String> {
    let unchanged =
        Compare::mod_revision(s.prefix.as_str(), CompareOp::Less, revision + 1).with_prefix();
    let txn = Txn::new().when([unchanged]).and_then([op]);
    let resp = tokio::time::timeout(s.timeout, client.txn(txn))
        .await
        .map_err(|_| format!("etcd: no answer within {}s; the change may or may not be written: run `list` or `get`", s.timeout.as_secs_f64()))?
        .map_err(|e| format!("etcd: {e}"))?;
    let now = resp.header().map_or(0, |h| h.revision());
    if !resp.succeeded() {
        return Err(format!(
            "nothing written: the keys under {} changed since revision {} (now {now}), by another operator or tool; run the command again to check against what is there now",
            s.prefix, revision
        ));
    }
    Ok(now)
}

/// The lines of `old` and `new` that differ, as `-` and `+` lines with a little context.
pub fn diff(old: &str, new: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let mut out = String::new();
    if a.len().saturating_mul(b.len()) > 4_000_000 {
        a.iter().for_each(|l| out.push_str(&format!("- {l}\n")));
        b.iter().for_each(|l| out.push_str(&format!("+ {l}\n")));
        return out;
    }
    // Longest common subsequence, from the ends.
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&format!("  {}\n", a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push_str(&format!("- {}\n", a[i]));
            i += 1;
        } else {
            out.push_str(&format!("+ {}\n", b[j]));
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn diff_marks_changed_lines() {
        let d = super::diff("a\nb\nc\n", "a\nB\nc\nd\n");
        assert_eq!(d, "  a\n- b\n+ B\n  c\n+ d\n");
    }
}
