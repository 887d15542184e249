//! The YAML file as operators write it. Values that can be checked on their own (durations,
//! addresses, names, enums) are checked while deserializing, so serde_yaml reports the line
//! and column of the bad value; [`super::validate`] does the cross-checks and builds the
//! typed [`super::Config`].

use serde::{de, Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Pingora's own `ServerConf` keys, passed through untouched.
    #[serde(default)]
    pub pingora: Option<BTreeMap<String, serde_yaml::Value>>,
    pub listen: ListenFile,
    /// The admin listener (/healthz, /reload, /metrics).
    #[serde(default)]
    pub admin: Option<Addr>,
    /// Per-chunk metrics and frame parsing; off saves their cost.
    #[serde(default)]
    pub metrics: Option<bool>,
    /// `stdout`, `off`, or a file path.
    #[serde(default)]
    pub access_log: Option<String>,
    /// Limits on client requests.
    #[serde(default)]
    pub client: ClientFile,
    #[serde(default)]
    pub defaults: DefaultsFile,
    pub resources: Vec<ResourceFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenFile {
    #[serde(default)]
    pub http: Vec<Addr>,
    #[serde(default)]
    pub https: Vec<Addr>,
    /// Served to TLS clients whose SNI matches no resource (else their handshake fails).
    pub default_certificate: Option<TlsFile>,
}

/// A certificate chain and its private key, PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub certificate: String,
    pub private_key: String,
}

/// Resource keys that apply to every resource unless the resource sets them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsFile {
    #[serde(default)]
    pub origin: OriginDefaultsFile,
    #[serde(default)]
    pub websocket: WebSocketFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceFile {
    pub name: Name,
    pub hostnames: Vec<Hostname>,
    #[serde(default, rename = "type")]
    pub kind: ResourceType,
    pub origin: OriginFile,
    #[serde(default)]
    pub websocket: WebSocketFile,
    /// The certificate for this resource's hostnames on https listeners.
    pub tls: Option<TlsFile>,
}

/// `full_site` serves everything, `static_only` only static files (no WebSocket by default).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceType {
    /// A whole site: WebSocket on by default.
    #[default]
    FullSite,
    /// Static files only: WebSocket off by default.
    StaticOnly,
}

/// How the edge talks to the origin.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OriginProtocol {
    /// Plain HTTP (ws://) to the origin.
    #[default]
    Http,
    /// TLS (wss://) to the origin.
    Https,
    /// The scheme the client used.
    Follow,
}

/// Origin keys allowed under `defaults.origin` (everything but the servers).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginDefaultsFile {
    pub protocol: Option<OriginProtocol>,
    pub verify_tls: Option<bool>,
    pub ca_file: Option<String>,
    pub connect_timeout: Option<DurationStr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginFile {
    pub protocol: Option<OriginProtocol>,
    #[serde(deserialize_with = "non_empty")]
    pub servers: Vec<ServerFile>,
    pub balance: Option<Balance>,
    pub health_check: Option<HealthCheckFile>,
    pub host: Option<String>,
    pub sni: Option<String>,
    pub verify_tls: Option<bool>,
    pub ca_file: Option<String>,
    pub connect_timeout: Option<DurationStr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub address: HostPort,
    pub weight: Option<u32>,
    pub backup: Option<bool>,
}

/// How requests are spread over the primary servers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Weighted round robin.
    #[default]
    RoundRobin,
    /// Consistent hashing on the client IP: a client stays on its server while it is up.
    ClientIp,
}

/// `health_check: { path: /healthz, interval: 5s }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckFile {
    pub path: Option<PathPrefix>,
    pub interval: Option<DurationStr>,
    pub healthy_after: Option<u32>,
    pub unhealthy_after: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocketFile {
    pub enabled: Option<bool>,
    pub idle_timeout: Option<DurationStr>,
    pub handshake_timeout: Option<DurationStr>,
    pub paths: Option<Vec<PathPrefix>>,
    pub allowed_origins: Option<Vec<OriginName>>,
    pub max_connections: Option<u32>,
    pub handshake_rate: Option<RateFile>,
    pub max_lifetime: Option<DurationStr>,
}

/// `handshake_rate: { rate: 20/s, burst: 40 }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateFile {
    pub rate: PerSecond,
    pub burst: Option<u32>,
}

/// Limits on what clients send before a request is known.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    pub header_timeout: Option<DurationStr>,
    pub max_header_bytes: Option<usize>,
}

fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ServerFile>, D::Error> {
    let v = Vec::<ServerFile>::deserialize(d)?;
    if v.is_empty() {
        return Err(de::Error::custom(
            "the origin group has no servers; list at least one, like `- { address: \"10.0.0.5:8080\" }`",
        ));
    }
    Ok(v)
}

/// Implements `Deserialize` for a newtype over a string by a parse function whose error
/// text goes to the operator as it is.
macro_rules! parsed_string {
    ($(#[$doc:meta])* $name:ident($inner:ty) = $parse:path) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name(pub $inner);
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $parse(&s).map($name).map_err(de::Error::custom)
            }
        }
    };
}

parsed_string!(
    /// A duration written as `500ms`, `60s`, `5m` or `1h`.
    DurationStr(Duration) = parse_duration
);
parsed_string!(
    /// A socket address `ip:port`.
    Addr(SocketAddr) = parse_addr
);
parsed_string!(
    /// `ip:port` or `name:port` (resolved at load and reload).
    HostPort(String) = parse_host_port
);

fn parse_host_port(s: &str) -> Result<String, String> {
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(s.to_string());
    }
    let ok = s.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && port.parse::<u16>().is_ok_and(|p| p > 0)
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    });
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid address \"{s}\": write ip:port or name:port, like 10.0.0.5:8080, [::1]:8080 or origin.internal:8080"
        ))
    }
}
parsed_string!(
    /// A resource name: `[a-z0-9_-]+`.
    Name(String) = parse_name
);
parsed_string!(
    /// A hostname or a `*.` wildcard, lower-cased.
    Hostname(String) = parse_hostname
);
parsed_string!(
    /// A path prefix starting with `/`.
    PathPrefix(String) = parse_path
);
parsed_string!(
    /// An exact origin `scheme://host[:port]`, lower-cased, or `none`.
    OriginName(String) = parse_origin
);
parsed_string!(
    /// A rate like `20/s` or `600/m`, in events per second.
    PerSecond(f64) = parse_rate
);

fn parse_origin(s: &str) -> Result<String, String> {
    let o = s.to_ascii_lowercase();
    if o == "none" {
        return Ok(o);
    }
    let help = "write an exact origin like https://chat.example.com or http://localhost:8080 (no path), or \"none\" to allow clients that send no Origin";
    let Some((scheme, rest)) = o.split_once("://") else {
        return Err(format!("invalid origin \"{s}\": {help}"));
    };
    if !matches!(scheme, "http" | "https") || rest.is_empty() || rest.contains(['/', '?', '#', ' '])
    {
        return Err(format!("invalid origin \"{s}\": {help}"));
    }
    Ok(o)
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let help = "write a count per second or minute, like 20/s or 600/m";
    let (n, unit) = s
        .trim()
        .split_once('/')
        .ok_or_else(|| format!("invalid rate \"{s}\": {help}"))?;
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("invalid rate \"{s}\": {help}"))?;
    let per = match unit.trim() {
        "s" => 1.0,
        "m" => 60.0,
        _ => return Err(format!("invalid rate \"{s}\": {help}")),
    };
    if n == 0 {
        return Err(format!("rate \"{s}\" is zero: {help}"));
    }
    Ok(f64::from(n) / per)
}

/// Parses `500ms`, `60s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let help = "write a whole number followed by ms, s, m or h, like 500ms, 60s, 5m or 1h";
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration \"{s}\": {help}"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("invalid duration \"{s}\": {help}")),
    };
    if d.is_zero() {
        return Err(format!("duration \"{s}\" is zero: {help}"));
    }
    Ok(d)
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("invalid address \"{s}\": write ip:port, like 10.0.0.5:8080 or [::1]:8080")
    })
}

fn parse_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid resource name \"{s}\": use lower-case letters, digits, '_' and '-' only"
        ))
    }
}

fn parse_hostname(s: &str) -> Result<String, String> {
    let h = s.to_ascii_lowercase();
    let bare = h.strip_prefix("*.").unwrap_or(&h);
    let label_ok = |l: &str| {
        !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if bare.is_empty() || !bare.split('.').all(label_ok) {
        return Err(format!(
            "invalid hostname \"{s}\": write a name like chat.example.com, or *.chat.example.com for one more label"
        ));
    }
    Ok(h)
}

fn parse_path(s: &str) -> Result<String, String> {
    if s.starts_with('/') {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid path prefix \"{s}\": it must start with '/', like /ws"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        for bad in ["", "5", "s", "5x", "1.5s", "-1s", "0s"] {
            assert!(parse_duration(bad).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn hostnames() {
        assert_eq!(
            parse_hostname("Chat.Example.com").unwrap(),
            "chat.example.com"
        );
        assert_eq!(parse_hostname("*.a.b").unwrap(), "*.a.b");
        for bad in ["", "*.", "a..b", "a.*.b", "a b", "*a.b"] {
            assert!(parse_hostname(bad).is_err(), "{bad} should fail");
        }
    }
}
