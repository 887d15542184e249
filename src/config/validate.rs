//! From [`FileConfig`] to [`Config`]: defaults merged, cross-checks done, every error placed
//! at a file, line and column, with the resource and key named and a way to fix it.

use super::file::{FileConfig, ResourceFile, ResourceType};
use super::{
    Config, Listen, Origin, Resource, WebSocket, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A configuration that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read the file: {source}")]
    Read {
        /// The file named with `-c`.
        file: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file was read but is not a valid configuration.
    #[error("{file}:{line}:{column}: {}{key}: {message}", resource.as_ref().map(|r| format!("resource \"{r}\": ")).unwrap_or_default())]
    Invalid {
        /// The file named with `-c`.
        file: String,
        /// 1-based line of the offending key or value (0 when unknown).
        line: usize,
        /// 1-based column.
        column: usize,
        /// The resource the key belongs to, if any.
        resource: Option<String>,
        /// Dotted path of the key, like `resources[0].websocket.idle_timeout`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

pub(super) fn validate(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let parsed: FileConfig = serde_yaml::from_str(text).map_err(|e| from_serde(&file, text, &e))?;
    build(path, text, parsed)
}

/// Turns a serde_yaml error into one that names the key and the resource.
fn from_serde(file: &str, text: &str, e: &serde_yaml::Error) -> ConfigError {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    let mut msg = e.to_string();
    // serde_yaml appends " at line L column C"; we print the location up front.
    if let Some(i) = msg.rfind(" at line ") {
        msg.truncate(i);
    }
    // and prefixes the path of the key: "resources[0].origin: unknown field ..."
    let (key, message) = match msg.split_once(": ") {
        Some((k, m)) if !k.contains(' ') => (k.to_string(), m.to_string()),
        _ => (String::new(), msg.clone()),
    };
    // For a bad value serde_yaml names the mapping that holds it; find the key itself on
    // the reported line, so the operator reads `...websocket.idle_timeout`.
    let (key, line, column) = match leaf_key(text, line, column, &message) {
        Some((leaf, at_line, col))
            if !message.starts_with("unknown field") && !message.starts_with("missing field") =>
        {
            let key = if key.is_empty() {
                leaf
            } else if key.ends_with(&format!(".{leaf}")) {
                key
            } else {
                format!("{key}.{leaf}")
            };
            (key, at_line, col)
        }
        _ => (key, line, column),
    };
    let message = if message.starts_with("unknown field") {
        format!("{message}; remove it or fix its spelling")
    } else {
        message
    };
    ConfigError::Invalid {
        file: file.to_string(),
        line,
        column,
        resource: resource_of_key(text, &key),
        key: if key.is_empty() {
            "(top level)".into()
        } else {
            key
        },
        message,
    }
}

/// The key at `line:column`, or else the key before the first quoted value of `message` on
/// that line, with the column where it starts.
fn leaf_key(
    text: &str,
    line: usize,
    column: usize,
    message: &str,
) -> Option<(String, usize, usize)> {
    let is_key = |c: char| c.is_ascii_alphanumeric() || c == '_';
    // serde_yaml places an error in a value at the start of the mapping that holds it, so
    // the value (quoted in the message) is looked for as `key: value` from there to the end
    // of that mapping: the lines indented at least as far.
    if let Some(value) = message.split('"').nth(1).filter(|v| !v.is_empty()) {
        let indent = column.saturating_sub(1);
        for (i, src) in text.lines().enumerate().skip(line.checked_sub(1)?) {
            let own = src.len() - src.trim_start().len();
            if i + 1 > line && own < indent && !src.trim().is_empty() {
                break;
            }
            let code = src.split(" #").next().unwrap_or(src);
            let found = code.match_indices(value).find_map(|(at, _)| {
                code[..at]
                    .trim_end_matches(['"', '\'', ' '])
                    .strip_suffix(':')
            });
            if let Some(before) = found {
                let start = before.rfind(|c: char| !is_key(c)).map_or(0, |i| i + 1);
                let word = &before[start..];
                if !word.is_empty() {
                    return Some((word.to_string(), i + 1, start + 1));
                }
            }
        }
    }
    let src = text.lines().nth(line.checked_sub(1)?)?;
    let at = src.get(column.checked_sub(1)?..)?;
    let word: String = at.chars().take_while(|&c| is_key(c)).collect();
    (!word.is_empty() && at[word.len()..].starts_with(':')).then_some((word, line, column))
}

/// `resources[3].x` → the name of the fourth resource, read leniently from the text.
fn resource_of_key(text: &str, key: &str) -> Option<String> {
    let idx: usize = key
        .strip_prefix("resources[")?
        .split(']')
        .next()?
        .parse()
        .ok()?;
    let v: serde_yaml::Value = serde_yaml::from_str(text).ok()?;
    v.get("resources")?
        .get(idx)?
        .get("name")?
        .as_str()
        .map(str::to_string)
}

fn build(path: &Path, text: &str, f: FileConfig) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let base = path.parent().unwrap_or(Path::new("."));
    let invalid =
        |resource: Option<&str>, key: String, needle: &str, nth: usize, message: String| {
            let (line, column) = locate(text, needle, nth);
            ConfigError::Invalid {
                file: file.clone(),
                line,
                column,
                resource: resource.map(str::to_string),
                key,
                message,
            }
        };

    if f.listen.http.is_empty() && f.listen.https.is_empty() {
        return Err(invalid(
            None,
            "listen.http".into(),
            "listen",
            0,
            "no listener: add at least one address, like `http: [\"0.0.0.0:8080\"]`".into(),
        ));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut warnings = Vec::new();
    let mut load_cert =
        |resource: Option<&str>, key: String, t: &super::file::TlsFile| {
            let (chain, private) = (
                relative_to(base, &t.certificate),
                relative_to(base, &t.private_key),
            );
            match crate::tls::Certificate::load(&chain, &private) {
                Ok(c) => {
                    if c.expired(now) {
                        warnings.push(format!(
                        "{file}: {}{key}: the certificate {} has expired; clients will refuse it",
                        resource.map(|r| format!("resource \"{r}\": ")).unwrap_or_default(),
                        chain.display()
                    ));
                    }
                    Ok(c)
                }
                Err(why) => Err(invalid(
                    resource,
                    key,
                    &t.certificate,
                    0,
                    format!("{why}; paths are relative to the config file's folder"),
                )),
            }
        };
    let default_certificate = match &f.listen.default_certificate {
        Some(t) => Some(load_cert(None, "listen.default_certificate".into(), t)?),
        None => None,
    };
    let mut certs = Vec::with_capacity(f.resources.len());
    for (i, r) in f.resources.iter().enumerate() {
        certs.push(match &r.tls {
            Some(t) => Some(load_cert(
                Some(&r.name.0),
                format!("resources[{i}].tls"),
                t,
            )?),
            None => None,
        });
    }
    if !f.listen.https.is_empty()
        && default_certificate.is_none()
        && certs.iter().all(Option::is_none)
    {
        return Err(invalid(
            None,
            "listen.https".into(),
            "https",
            0,
            "an https listener needs certificates: give resources a `tls: { certificate, private_key }` block, or set listen.default_certificate".into(),
        ));
    }
    if f.resources.is_empty() {
        return Err(invalid(
            None,
            "resources".into(),
            "resources",
            0,
            "no resources: add at least one resource with a name, hostnames and an origin".into(),
        ));
    }

    let pingora_yaml = match &f.pingora {
        Some(map) => {
            let yaml = serde_yaml::to_string(map).unwrap_or_default();
            if let Err(e) = pingora::server::configuration::ServerConf::from_yaml(&yaml) {
                return Err(invalid(
                    None,
                    "pingora".into(),
                    "pingora",
                    0,
                    format!("Pingora rejects this section: {e}; see Pingora's ServerConf keys"),
                ));
            }
            Some(yaml)
        }
        None => None,
    };

    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut owners: HashMap<&str, &str> = HashMap::new();
    let mut resources = Vec::with_capacity(f.resources.len());
    for (i, r) in f.resources.iter().enumerate() {
        let name = r.name.0.as_str();
        if names.insert(name, i).is_some() {
            return Err(invalid(
                Some(name),
                format!("resources[{i}].name"),
                name,
                1,
                format!("another resource is already named \"{name}\"; names must be unique"),
            ));
        }
        for (j, h) in r.hostnames.iter().enumerate() {
            let h = h.0.as_str();
            if let Some(other) = owners.insert(h, name) {
                return Err(invalid(
                    Some(name),
                    format!("resources[{i}].hostnames[{j}]"),
                    h,
                    1,
                    format!(
                        "hostname \"{h}\" already belongs to resource \"{other}\"; a hostname may belong to one resource only"
                    ),
                ));
            }
        }
        if r.hostnames.is_empty() {
            return Err(invalid(
                Some(name),
                format!("resources[{i}].hostnames"),
                "hostnames",
                i,
                "no hostnames: list the names this resource serves, like [\"chat.example.com\"]"
                    .into(),
            ));
        }
        let mut res = Resource {
            tls: certs[i].take(),
            ..resource(&f, r, base)
        };
        for (j, server) in r.origin.servers.iter().enumerate() {
            let addr = resolve(&server.address.0).map_err(|why| {
                invalid(
                    Some(name),
                    format!("resources[{i}].origin.servers[{j}].address"),
                    &server.address.0,
                    0,
                    why,
                )
            })?;
            res.origin.servers.push(super::Server {
                addr,
                weight: server.weight.map_or(1, |w| w.0 as u32),
                backup: server.backup.unwrap_or(false),
            });
        }
        if res.origin.servers.iter().all(|s| s.backup) {
            return Err(invalid(
                Some(name),
                format!("resources[{i}].origin.servers"),
                "servers",
                i,
                "every server is a backup: make at least one a primary (remove `backup: true`)"
                    .into(),
            ));
        }
        let res = match &res.origin.ca_file {
            Some(ca_path) => match crate::origin::OriginCa::load(ca_path) {
                Ok(ca) => Resource {
                    origin: super::Origin {
                        ca: Some(ca),
                        ..res.origin
                    },
                    ..res
                },
                Err(why) => {
                    return Err(invalid(
                        Some(name),
                        format!("resources[{i}].origin.ca_file"),
                        "ca_file",
                        0,
                        format!("{why}; the path is relative to the config file's folder"),
                    ))
                }
            },
            None => res,
        };
        resources.push(Arc::new(res));
    }

    let admin = match &f.admin {
        None => super::Admin {
            addr: super::DEFAULT_ADMIN,
            token: None,
            hostnames: Vec::new(),
        },
        Some(a) => {
            let token = match &a.token_file {
                None => None,
                Some(t) => Some(
                    read_token(&relative_to(base, t))
                        .map_err(|why| invalid(None, "admin.token_file".into(), t, 0, why))?,
                ),
            };
            super::Admin {
                addr: a.listen.0,
                token,
                hostnames: a.hostnames.iter().map(|h| h.0.clone()).collect(),
            }
        }
    };
    if !admin.addr.ip().is_loopback() && admin.token.is_none() {
        warnings.push(format!(
            "{file}: admin: the admin listener {} is reachable from other hosts and POST /reload needs no token; set admin.token_file",
            admin.addr
        ));
    }

    Ok(Config {
        source: path.to_path_buf(),
        pingora_yaml,
        admin,
        metrics: f.metrics.unwrap_or(true),
        client: super::ClientLimits {
            header_timeout: f
                .client
                .header_timeout
                .as_ref()
                .map_or(super::DEFAULT_HEADER_TIMEOUT, |t| t.0),
            max_header_bytes: f
                .client
                .max_header_bytes
                .map_or(super::DEFAULT_MAX_HEADER_BYTES, |b| b.0 as usize),
            keepalive_timeout: f
                .client
                .keepalive_timeout
                .as_ref()
                .map_or(super::DEFAULT_KEEPALIVE_TIMEOUT, |t| t.0),
            ipv6_prefix: f
                .client
                .ipv6_prefix
                .map_or(super::DEFAULT_IPV6_PREFIX, |p| p.0 as u8),
        },
        access_log: match f.access_log.as_deref() {
            None | Some("stdout") => super::AccessLogTarget::Stdout,
            Some("off") => super::AccessLogTarget::Off,
            Some(p) => super::AccessLogTarget::File(relative_to(base, p)),
        },
        listen: Listen {
            http: f.listen.http.iter().map(|a| a.0).collect(),
            https: f.listen.https.iter().map(|a| a.0).collect(),
        },
        resources,
        default_certificate,
        warnings,
    })
}

/// The admin token: the file's first line, at least 16 characters (a guessable token is
/// no protection).
fn read_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{} must hold a token of at least 16 printable characters on its first line, like the output of `openssl rand -hex 32`",
            path.display()
        ));
    }
    Ok(token.to_string())
}

/// Merges a resource with the defaults.
fn resource(f: &FileConfig, r: &ResourceFile, base: &Path) -> Resource {
    let d = &f.defaults;
    let o = &r.origin;
    let w = &r.websocket;
    let ca_file = o
        .ca_file
        .as_ref()
        .or(d.origin.ca_file.as_ref())
        .map(|p| relative_to(base, p));
    Resource {
        name: r.name.0.clone(),
        hostnames: r.hostnames.iter().map(|h| h.0.clone()).collect(),
        kind: r.kind,
        origin: Origin {
            protocol: o.protocol.or(d.origin.protocol).unwrap_or_default(),
            // Resolved by `resolve_servers` once the file is known to be valid.
            servers: Vec::new(),
            balance: o.balance.unwrap_or_default(),
            health_check: o.health_check.as_ref().map(|h| super::HealthCheck {
                path: h.path.as_ref().map(|p| p.0.clone()),
                interval: h
                    .interval
                    .as_ref()
                    .map_or(std::time::Duration::from_secs(5), |i| i.0),
                healthy_after: h.healthy_after.map_or(2, |n| n.0 as u32),
                unhealthy_after: h.unhealthy_after.map_or(2, |n| n.0 as u32),
            }),
            host: o.host.clone(),
            sni: o.sni.clone(),
            verify_tls: o.verify_tls.or(d.origin.verify_tls).unwrap_or(true),
            ca_file,
            ca: None,
            connect_timeout: o
                .connect_timeout
                .as_ref()
                .or(d.origin.connect_timeout.as_ref())
                .map_or(DEFAULT_CONNECT_TIMEOUT, |t| t.0),
        },
        websocket: WebSocket {
            // static_only resources serve files: no WebSocket unless asked for.
            enabled: w
                .enabled
                .or(d.websocket.enabled)
                .unwrap_or(r.kind == ResourceType::FullSite),
            idle_timeout: w
                .idle_timeout
                .as_ref()
                .or(d.websocket.idle_timeout.as_ref())
                .map_or(DEFAULT_IDLE_TIMEOUT, |t| t.0),
            handshake_timeout: w
                .handshake_timeout
                .as_ref()
                .or(d.websocket.handshake_timeout.as_ref())
                .map_or(DEFAULT_HANDSHAKE_TIMEOUT, |t| t.0),
            paths: w
                .paths
                .as_ref()
                .or(d.websocket.paths.as_ref())
                .map(|p| p.iter().map(|p| p.0.clone()).collect())
                .unwrap_or_default(),
            allowed_origins: w
                .allowed_origins
                .as_ref()
                .or(d.websocket.allowed_origins.as_ref())
                .map(|o| o.iter().map(|o| o.0.clone()).collect())
                .unwrap_or_default(),
            max_connections: w.max_connections.or(d.websocket.max_connections),
            max_connections_per_ip: w
                .max_connections_per_ip
                .or(d.websocket.max_connections_per_ip)
                .map(|n| n.0 as u32),
            handshake_rate: w
                .handshake_rate
                .as_ref()
                .or(d.websocket.handshake_rate.as_ref())
                .map(|r| super::HandshakeRate {
                    per_second: r.rate.0,
                    // Default burst: one second's worth, at least 1.
                    burst: r
                        .burst
                        .map_or((r.rate.0.ceil() as u32).max(1), |b| b.0 as u32),
                }),
            max_lifetime: w
                .max_lifetime
                .as_ref()
                .or(d.websocket.max_lifetime.as_ref())
                .map(|t| t.0),
        },
        tls: None,
    }
}

/// `ip:port` as is; `name:port` through the system resolver (the first address).
fn resolve(address: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(a) = address.parse() {
        return Ok(a);
    }
    use std::net::ToSocketAddrs;
    match address.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("\"{address}\" resolves to no address")),
        Err(e) => Err(format!(
            "\"{address}\" does not resolve ({e}); fix the name or use ip:port"
        )),
    }
}

fn relative_to(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Line and column (1-based) of the `nth` (0-based) occurrence of `needle` in `text`; the
/// cross-checks run after serde has dropped the locations, so they find the value again.
fn locate(text: &str, needle: &str, nth: usize) -> (usize, usize) {
    let mut seen = 0;
    for (i, line) in text.lines().enumerate() {
        let code = line.split(" #").next().unwrap_or(line);
        if let Some(col) = code.find(needle) {
            if seen == nth {
                return (i + 1, col + 1);
            }
            seen += 1;
        }
    }
    (0, 0)
}
