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
    /// The admin listener (/healthz, /reload, /metrics): `ip:port`, or a map with a token.
    #[serde(default)]
    pub admin: Option<AdminFile>,
    /// Per-chunk metrics and frame parsing; off saves their cost.
    #[serde(default)]
    pub metrics: Option<bool>,
    /// Reload by itself when this file changes.
    #[serde(default)]
    pub watch: Option<bool>,
    /// `stdout`, `off`, or a file path.
    #[serde(default)]
    pub access_log: Option<String>,
    /// Limits on client requests.
    #[serde(default)]
    pub client: ClientFile,
    #[serde(default)]
    pub defaults: DefaultsFile,
    /// How open tunnels are told to go at shutdown, upgrade and `POST /drain`.
    #[serde(default)]
    pub drain: DrainFile,
    /// Where resources and defaults come from when not from this file.
    #[serde(default)]
    pub source: Option<SourceFile>,
    #[serde(default)]
    pub resources: Vec<ResourceFile>,
    /// Fleet statistics: rows to ClickHouse.
    #[serde(default)]
    pub analytics: Option<AnalyticsFile>,
}

/// `analytics`: where rows go, where they wait while ClickHouse is away, who this edge is,
/// and the client's network from MaxMind databases.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalyticsFile {
    pub clickhouse: ClickHouseFile,
    #[serde(default)]
    pub spill: SpillFile,
    #[serde(default)]
    pub edge: EdgeFile,
    #[serde(default)]
    pub geoip: GeoIpFile,
    /// An open tunnel reports the bytes it moved this often (default 60s).
    pub interim: Option<DurationStr>,
}

/// `analytics.clickhouse`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseFile {
    /// `http://host:port` of ClickHouse's HTTP interface.
    pub url: ClickHouseUrl,
    pub database: Option<Identifier>,
    pub user: Option<String>,
    pub password_file: Option<String>,
    /// Rows per insert (default 10000).
    pub batch: Option<Ranged<1, 1_000_000>>,
    /// A batch not full is sent after this long (default 5s).
    pub flush: Option<DurationStr>,
    /// Each request to ClickHouse gets this long (default 10s).
    pub timeout: Option<DurationStr>,
}

/// `analytics.spill`: the local directory batches wait in while ClickHouse is away.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpillFile {
    pub path: Option<String>,
    pub max_size: Option<ByteSize>,
}

/// `analytics.edge`: this edge's name and region in every row.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeFile {
    pub id: Option<Label>,
    pub region: Option<Label>,
}

/// `analytics.geoip`: MaxMind-format databases (GeoLite2-ASN, GeoLite2-Country or
/// compatible).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoIpFile {
    pub asn: Option<String>,
    pub country: Option<String>,
}

/// `source: { etcd: {...} }`: resources and defaults from a configuration store.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    pub etcd: EtcdFile,
}

/// `source.etcd`: where the store is and how to reach it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdFile {
    /// `http://host:port` or `https://host:port`, one per member.
    pub endpoints: Vec<EtcdEndpoint>,
    /// The keys' common prefix (default `/wsedge/`).
    pub prefix: Option<EtcdPrefix>,
    /// Client TLS towards etcd (https endpoints).
    pub tls: Option<EtcdTlsFile>,
    /// etcd's user, with `password_file`.
    pub user: Option<String>,
    pub password_file: Option<String>,
    /// Where the configuration last applied is kept for a start without etcd.
    pub last_known_good: Option<String>,
    /// Each request to etcd (and a start's first read) gets this long (default 5s).
    pub timeout: Option<DurationStr>,
}

/// `source.etcd.tls`: the CA that signs etcd's certificate, and a client certificate.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTlsFile {
    pub ca_file: Option<String>,
    pub certificate: Option<String>,
    pub private_key: Option<String>,
}

/// `drain: { spread: 30s, close_code: 1001 }`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainFile {
    pub spread: Option<SpreadDuration>,
    pub close_code: Option<CloseCode>,
}

/// The code of the edge's Close frames in a drain: one an endpoint may send (RFC 6455
/// §7.4.1: 1000, 1001, 1012 service restart, 1013 try again later; 3000-4999 for
/// applications), never one that means a failure or that only a library may report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCode(pub u16);

impl<'de> Deserialize<'de> for CloseCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u64::deserialize(d)?;
        match v {
            1000 | 1001 | 1012 | 1013 | 3000..=4999 => Ok(CloseCode(v as u16)),
            _ => Err(de::Error::custom(format!(
                "close code {v} is not one a drain may send: use 1001 (going away, the default), 1012 (service restart), 1013 (try again later), 1000, or an application's code from 3000 to 4999"
            ))),
        }
    }
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
    /// WebSockets over HTTP/2 (RFC 8441) on the https listeners; on by default.
    pub h2_websockets: Option<bool>,
}

/// A certificate chain and its private key, PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub certificate: String,
    pub private_key: String,
}

/// `admin: "127.0.0.1:9090"` or `admin: { listen: ..., token_file: ..., hostnames: [...] }`.
#[derive(Debug)]
pub struct AdminFile {
    pub listen: Addr,
    /// A file holding the bearer token that `POST` endpoints require.
    pub token_file: Option<String>,
    /// Host names (besides IP addresses and `localhost`) the admin listener answers to.
    pub hostnames: Vec<Hostname>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminMap {
    listen: Addr,
    token_file: Option<String>,
    #[serde(default)]
    hostnames: Vec<Hostname>,
}

impl<'de> Deserialize<'de> for AdminFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = AdminFile;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an address like \"127.0.0.1:9090\", or a map with `listen` and optionally `token_file` and `hostnames`")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<AdminFile, E> {
                Ok(AdminFile {
                    listen: Addr(parse_addr(s).map_err(E::custom)?),
                    token_file: None,
                    hostnames: Vec::new(),
                })
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<AdminFile, A::Error> {
                let m = AdminMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(AdminFile {
                    listen: m.listen,
                    token_file: m.token_file,
                    hostnames: m.hostnames,
                })
            }
        }
        d.deserialize_any(V)
    }
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
    pub weight: Option<Ranged<1, 1000>>,
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
    pub path: Option<HealthPath>,
    pub interval: Option<DurationStr>,
    pub healthy_after: Option<Ranged<1, 1000>>,
    pub unhealthy_after: Option<Ranged<1, 1000>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocketFile {
    pub enabled: Option<bool>,
    pub idle_timeout: Option<DurationStr>,
    pub handshake_timeout: Option<DurationStr>,
    pub paths: Option<Vec<PathPrefix>>,
    pub allowed_origins: Option<Vec<OriginName>>,
    pub max_connections: Option<u32>,
    pub max_connections_per_ip: Option<Ranged<1, 4_294_967_295>>,
    pub handshake_rate: Option<RateFile>,
    pub max_lifetime: Option<DurationStr>,
    pub heartbeat: Option<Switch<HeartbeatFile>>,
    pub max_message_size: Option<Switch<ByteSize>>,
    pub message_rate: Option<Switch<RateFile>>,
}

impl WebSocketFile {
    /// These keys, each falling back to the one in `defaults` when not set here.
    pub fn or(&self, defaults: &WebSocketFile) -> WebSocketFile {
        let d = defaults.clone();
        let w = self.clone();
        WebSocketFile {
            enabled: w.enabled.or(d.enabled),
            idle_timeout: w.idle_timeout.or(d.idle_timeout),
            handshake_timeout: w.handshake_timeout.or(d.handshake_timeout),
            paths: w.paths.or(d.paths),
            allowed_origins: w.allowed_origins.or(d.allowed_origins),
            max_connections: w.max_connections.or(d.max_connections),
            max_connections_per_ip: w.max_connections_per_ip.or(d.max_connections_per_ip),
            handshake_rate: w.handshake_rate.or(d.handshake_rate),
            max_lifetime: w.max_lifetime.or(d.max_lifetime),
            heartbeat: w.heartbeat.or(d.heartbeat),
            max_message_size: w.max_message_size.or(d.max_message_size),
            message_rate: w.message_rate.or(d.message_rate),
        }
    }
}

/// `handshake_rate: { rate: 20/s, burst: 40 }`, or `20/s` for a burst of one second's worth.
#[derive(Debug, Clone)]
pub struct RateFile {
    pub rate: PerSecond,
    pub burst: Option<Ranged<1, 1_000_000>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateMap {
    rate: PerSecond,
    burst: Option<Ranged<1, 1_000_000>>,
}

impl<'de> Deserialize<'de> for RateFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> de::Visitor<'de> for Visit {
            type Value = RateFile;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a rate like 20/s, or { rate: 20/s, burst: 40 }")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RateFile, E> {
                let rate = parse_rate(s).map_err(E::custom)?;
                Ok(RateFile {
                    rate: PerSecond(rate),
                    burst: None,
                })
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RateFile, A::Error> {
                let m = RateMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RateFile {
                    rate: m.rate,
                    burst: m.burst,
                })
            }
        }
        d.deserialize_any(Visit)
    }
}

/// `heartbeat: { interval: 30s, timeout: 10s, origin: false }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatFile {
    pub interval: HeartbeatDuration,
    pub timeout: Option<HeartbeatDuration>,
    pub origin: Option<bool>,
}

/// A setting that a resource can also switch off (`off` or `false`), for when `defaults`
/// switched it on.
#[derive(Debug, Clone)]
pub enum Switch<T> {
    Off,
    On(T),
}

impl<T> Switch<T> {
    pub fn on(&self) -> Option<&T> {
        match self {
            Switch::Off => None,
            Switch::On(t) => Some(t),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Switch<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> de::Visitor<'de> for Visit<T> {
            type Value = Switch<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a setting, or off")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Switch<T>, E> {
                match v {
                    false => Ok(Switch::Off),
                    true => Err(E::custom(
                        "\"true\" is not a setting: write the setting itself, or off",
                    )),
                }
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Switch<T>, E> {
                if s == "off" {
                    return Ok(Switch::Off);
                }
                T::deserialize(de::value::StrDeserializer::<E>::new(s)).map(Switch::On)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Switch<T>, E> {
                T::deserialize(de::value::U64Deserializer::<E>::new(v)).map(Switch::On)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Switch<T>, E> {
                T::deserialize(de::value::I64Deserializer::<E>::new(v)).map(Switch::On)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Switch<T>, E> {
                T::deserialize(de::value::F64Deserializer::<E>::new(v)).map(Switch::On)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Switch<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Switch::On)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Switch<T>, A::Error> {
                T::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(Switch::On)
            }
        }
        d.deserialize_any(Visit(std::marker::PhantomData))
    }
}

/// A size in bytes: `1048576`, `64KiB`, `1MiB`, `1GiB`, or nginx's `64k`, `1m`, `1g`
/// (also powers of 1024), from 1 byte to 1 TiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl de::Visitor<'_> for Visit {
            type Value = ByteSize;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size like 1MiB, 64KiB or 1048576")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                parse_size(&v.to_string()).map(ByteSize).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                parse_size(&v.to_string()).map(ByteSize).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ByteSize, E> {
                parse_size(s).map(ByteSize).map_err(E::custom)
            }
        }
        d.deserialize_any(Visit)
    }
}

/// The largest size the file may give.
pub const MAX_SIZE: u64 = 1 << 40;

/// Parses a size in bytes (see [`ByteSize`]).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let help = "write a whole number of bytes, optionally followed by KiB, MiB or GiB, like 1MiB, 64KiB or 1048576";
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size \"{s}\": {help}"))?;
    let per: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "k" | "K" => 1 << 10,
        "MiB" | "m" | "M" => 1 << 20,
        "GiB" | "g" | "G" => 1 << 30,
        "KB" | "MB" | "GB" | "kB" => {
            return Err(format!(
                "invalid size \"{s}\": {unit} is ambiguous (1000 or 1024?); write KiB, MiB or GiB"
            ))
        }
        _ => return Err(format!("invalid size \"{s}\": {help}")),
    };
    match n.checked_mul(per) {
        Some(0) => Err(format!("size \"{s}\" is zero: {help}")),
        Some(b) if b <= MAX_SIZE => Ok(b),
        _ => Err(format!("size \"{s}\" is too large: at most 1024GiB")),
    }
}

/// Limits on what clients send before a request is known.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    pub header_timeout: Option<DurationStr>,
    /// Pingora refuses request headers over 1 MiB whatever this says.
    pub max_header_bytes: Option<Ranged<1024, 1_048_576>>,
    pub keepalive_timeout: Option<DurationStr>,
    pub max_requests_per_connection: Option<Ranged<1, 4_294_967_295>>,
    pub ipv6_prefix: Option<Ranged<32, 128>>,
}

/// A whole number between `LO` and `HI` (both included); anything else is an error that
/// names the range, so a typo cannot turn into a huge allocation or a zero divisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ranged<const LO: u64, const HI: u64>(pub u64);

impl<'de, const LO: u64, const HI: u64> Deserialize<'de> for Ranged<LO, HI> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u64::deserialize(d)?;
        if (LO..=HI).contains(&v) {
            Ok(Ranged(v))
        } else {
            Err(de::Error::custom(format!(
                "\"{v}\" is out of range: write a whole number from {LO} to {HI}"
            )))
        }
    }
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
    /// ClickHouse's HTTP interface: `http://host:port` (no path, no user in it).
    ClickHouseUrl(String) = parse_clickhouse_url
);
parsed_string!(
    /// A ClickHouse database name: letters, digits and `_`, not starting with a digit.
    Identifier(String) = parse_identifier
);
parsed_string!(
    /// An edge's id or region: 1 to 64 of letters, digits, `.`, `-` and `_`.
    Label(String) = parse_label
);

fn parse_clickhouse_url(s: &str) -> Result<String, String> {
    let help = "write ClickHouse's HTTP interface as http://host:port, like http://10.0.0.7:8123";
    if s.starts_with("https://") {
        return Err(format!(
            "\"{s}\": https is not supported towards ClickHouse yet; reach it over a private network or a local TLS proxy, as http://host:port"
        ));
    }
    let Some(rest) = s.strip_prefix("http://") else {
        return Err(format!("\"{s}\" is not an http:// URL: {help}"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty()
        || authority.len() > 255
        || !authority
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
    {
        return Err(format!("\"{s}\" is not host:port: {help}"));
    }
    let port = authority.rsplit_once(':').map(|(_, p)| p);
    match port.map(str::parse::<u16>) {
        Some(Ok(p)) if p > 0 => Ok(authority.to_string()),
        _ => Err(format!("\"{s}\" has no port: {help}")),
    }
}

fn parse_identifier(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "\"{s}\" is not a database name: 1 to 64 letters, digits and _, not starting with a digit"
        ))
    }
}

fn parse_label(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "\"{s}\" is not a label: 1 to 64 of letters, digits, '.', '-' and '_'"
        ))
    }
}

parsed_string!(
    /// A duration written as `500ms`, `60s`, `5m` or `1h`.
    DurationStr(Duration) = parse_duration
);
parsed_string!(
    /// A drain's spread: `0` (every tunnel told at once), or a duration of at most 1h.
    SpreadDuration(Duration) = parse_spread
);

fn parse_spread(s: &str) -> Result<Duration, String> {
    // A bare 0 needs no unit; any zero duration (`0s`, `0m`) means the same.
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    let d = parse_duration_or_zero(s)?;
    if d > Duration::from_secs(3600) {
        return Err(format!(
            "spread \"{s}\" is too long: at most 1h (the process waits for the last tunnel)"
        ));
    }
    Ok(d)
}

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
    /// An etcd member's URL: `http://host:port` or `https://host:port`.
    EtcdEndpoint(String) = parse_etcd_endpoint
);
parsed_string!(
    /// The prefix of wsedge's keys in etcd: starts and ends with `/`.
    EtcdPrefix(String) = parse_etcd_prefix
);

pub(crate) fn parse_etcd_endpoint(s: &str) -> Result<String, String> {
    let help =
        "write an etcd member's URL like http://10.0.0.9:2379 or https://etcd-1.internal:2379";
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| format!("invalid etcd endpoint \"{s}\": {help}"))?;
    parse_host_port(rest.trim_end_matches('/'))
        .map(|_| s.trim_end_matches('/').to_string())
        .map_err(|_| format!("invalid etcd endpoint \"{s}\": {help}"))
}

pub(crate) fn parse_etcd_prefix(s: &str) -> Result<String, String> {
    let ok = s.len() >= 2
        && s.len() <= 256
        && s.starts_with('/')
        && s.ends_with('/')
        && s.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid etcd prefix \"{s}\": write a key prefix that starts and ends with '/', like /wsedge/ or /cdn/edge-eu/"
        ))
    }
}
parsed_string!(
    /// A hostname or a `*.` wildcard, lower-cased.
    Hostname(String) = parse_hostname
);
parsed_string!(
    /// A path prefix starting with `/`, in normal form.
    PathPrefix(String) = parse_path
);
parsed_string!(
    /// The path (and query) a health check requests.
    HealthPath(http::uri::PathAndQuery) = parse_health_path
);
parsed_string!(
    /// An exact origin `scheme://host[:port]`, lower-cased, or `none`.
    OriginName(String) = parse_origin
);
parsed_string!(
    /// A rate like `20/s` or `600/m`, in events per second.
    PerSecond(f64) = parse_rate
);

/// The shortest heartbeat interval or timeout the file may give.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(100);

parsed_string!(
    /// A heartbeat interval or timeout: a duration of at least 100ms.
    HeartbeatDuration(Duration) = parse_heartbeat
);

fn parse_heartbeat(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < MIN_HEARTBEAT {
        return Err(format!(
            "duration \"{s}\" is too short for a heartbeat: at least 100ms (every ping costs the client a wake-up)"
        ));
    }
    Ok(d)
}

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

/// The longest duration the file may give (a year): long enough for any timeout or
/// lifetime, and far from where adding it to a clock overflows.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 86_400);

/// Parses `500ms`, `60s`, `5m`, `1h`, up to [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration_or_zero(s)?;
    if d.is_zero() {
        let help = "write a whole number followed by ms, s, m or h, like 500ms, 60s, 5m or 1h";
        return Err(format!("duration \"{s}\" is zero: {help}"));
    }
    Ok(d)
}

/// [`parse_duration`], zero included.
fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    let help = "write a whole number followed by ms, s, m or h, like 500ms, 60s, 5m or 1h";
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration \"{s}\": {help}"))?;
    let secs = |per: u64| n.checked_mul(per).map(Duration::from_secs);
    let d = match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        _ => return Err(format!("invalid duration \"{s}\": {help}")),
    };
    let Some(d) = d.filter(|d| *d <= MAX_DURATION) else {
        return Err(format!(
            "duration \"{s}\" is too long: at most 8784h (a year)"
        ));
    };
    Ok(d)
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("invalid address \"{s}\": write ip:port, like 10.0.0.5:8080 or [::1]:8080")
    })
}

pub(crate) fn parse_name(s: &str) -> Result<String, String> {
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
    if !s.starts_with('/') {
        return Err(format!(
            "invalid path prefix \"{s}\": it must start with '/', like /ws"
        ));
    }
    // Requests are matched in normal form (see crate::path), so a prefix that is not in
    // normal form could never match, or would match something else than it reads.
    match crate::syntax::path::normalize(s) {
        Ok(n) if n == s => Ok(s.to_string()),
        Ok(n) => Err(format!(
            "path prefix \"{s}\" is not in normal form: requests are matched after dot-segments are resolved, slashes merged and unreserved characters decoded; write \"{n}\""
        )),
        Err(e) => Err(format!(
            "invalid path prefix \"{s}\": {}",
            e.body().trim_end().to_lowercase()
        )),
    }
}

fn parse_health_path(s: &str) -> Result<http::uri::PathAndQuery, String> {
    let help = "write a path like /healthz or /status?full=1";
    if !s.starts_with('/') {
        return Err(format!("invalid health check path \"{s}\": {help}"));
    }
    s.parse()
        .map_err(|_| format!("invalid health check path \"{s}\" (spaces and control characters must be percent-encoded): {help}"))
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
        for bad in [
            "",
            "5",
            "s",
            "5x",
            "1.5s",
            "-1s",
            "0s",
            "18446744073709551615h",
            "5124095576030431h",
            "8785h",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad} should fail");
        }
        assert_eq!(parse_duration("8784h").unwrap(), MAX_DURATION);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("1m").unwrap(), 1 << 20);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("1024GiB").unwrap(), MAX_SIZE);
        for bad in [
            "",
            "0",
            "0MiB",
            "1MB",
            "1.5MiB",
            "-1",
            "MiB",
            "1 TiB",
            "1025GiB",
            "99999999999999999999",
            "18446744073709551615GiB",
            "1MiBMiB",
            "%31MiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad} should fail");
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
