//! Configuration: the YAML file as operators write it ([`file`]) is parsed and built
//! ([`build`]) into the typed [`Config`] the edge runs on; [`errors`] places every mistake
//! at a file, line, column and key. Loading reads the PEM files a configuration names
//! ([`pem`]) and resolves origin names (DNS); nothing else here touches the system.

mod build;
mod errors;
mod file;
pub mod geo;
mod pem;
pub mod store;

pub use errors::ConfigError;
pub use file::{Balance, OriginProtocol, ResourceType};
pub use pem::{Certificate, OriginCa};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where the admin listener binds when the file does not say: loopback only.
pub const DEFAULT_ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9090);
/// Idle time after which a tunnel with no data either way is closed, when not configured.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time the origin has to answer an upgrade, when not configured.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to establish the TCP (and TLS) connection to an origin, when not configured.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The typed, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub source: PathBuf,
    /// The text it was built from (`watch` compares the file with it).
    pub(crate) text: std::sync::Arc<str>,
    /// Pingora's `ServerConf` keys as YAML text, if the file had a `pingora:` section.
    pub pingora_yaml: Option<String>,
    /// Pingora's grace period as that section sets it (`grace_period_seconds`), or
    /// Pingora's default; a reload does not change the running one.
    pub grace_period: Duration,
    /// Listening addresses.
    pub listen: Listen,
    /// The admin listener.
    pub admin: Admin,
    /// Whether tunnels count bytes and messages into metrics as they pass (frame parsing
    /// included); access-log lines and close reasons are kept either way.
    pub metrics: bool,
    /// Whether the edge reloads by itself when its configuration file changes (`watch`).
    pub watch: bool,
    /// Where access-log lines go.
    pub access_log: AccessLogTarget,
    /// Limits on client requests.
    pub client: ClientLimits,
    /// How open tunnels are told to go at shutdown, upgrade and `POST /drain`.
    pub drain: DrainSettings,
    /// The CDN resources, in file order.
    pub resources: Vec<Arc<Resource>>,
    /// The certificate for TLS clients whose SNI matches no resource.
    pub default_certificate: Option<Certificate>,
    /// Things that work but deserve a look (an expired certificate, say).
    pub warnings: Vec<String>,
    /// `source.etcd`: resources and defaults come from etcd.
    pub etcd: Option<store::EtcdSettings>,
    /// What etcd held when this configuration was built from it.
    pub store: Option<Arc<store::Snapshot>>,
    /// `analytics`: rows for fleet statistics, to ClickHouse.
    pub analytics: Option<Analytics>,
}

/// `analytics`: where the edge's rows go and how they wait while ClickHouse is away.
#[derive(Debug, Clone, PartialEq)]
pub struct Analytics {
    /// ClickHouse's HTTP interface, `host:port`.
    pub authority: String,
    /// The database the tables are in (`deploy/clickhouse/schema.sql`).
    pub database: String,
    /// ClickHouse's user and password, if not `default` without one.
    pub user: Option<(String, store::Secret)>,
    /// Rows per insert.
    pub batch: usize,
    /// A batch not full is sent after this long.
    pub flush: Duration,
    /// Each request to ClickHouse gets this long.
    pub timeout: Duration,
    /// The directory batches are spilled to while ClickHouse is away.
    pub spill_dir: PathBuf,
    /// The most the spill directory holds; rows beyond it are dropped (and counted).
    pub spill_max: u64,
    /// This edge's id in every row.
    pub edge_id: String,
    /// This edge's region in every row.
    pub edge_region: String,
    /// An open tunnel that moved bytes reports them this often (so bandwidth lands in
    /// the buckets it happened in, not all at the close).
    pub interim: Duration,
    /// MaxMind-format databases for the client's ASN/ISP and country, read at load (so
    /// a reload reads them again).
    pub geoip: geo::GeoIp,
}

/// Rows per insert, when `analytics.clickhouse.batch` does not say.
pub const DEFAULT_ANALYTICS_BATCH: usize = 10_000;
/// The longest a row waits in a batch that is not full, when not configured.
pub const DEFAULT_ANALYTICS_FLUSH: Duration = Duration::from_secs(5);
/// Each request to ClickHouse, when not configured.
pub const DEFAULT_ANALYTICS_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an open tunnel reports its bytes, when not configured.
pub const DEFAULT_ANALYTICS_INTERIM: Duration = Duration::from_secs(60);
/// Where batches wait while ClickHouse is away, when not configured.
pub const DEFAULT_SPILL_DIR: &str = "/var/lib/wsedge/analytics-spill";
/// The spill directory's bound, when not configured.
pub const DEFAULT_SPILL_MAX: u64 = 256 << 20;

/// The admin listener and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The bearer token `POST` endpoints require (read from `token_file`), if any.
    pub token: Option<String>,
    /// Host names it answers to besides IP addresses and `localhost` (lower case).
    pub hostnames: Vec<String>,
}

/// Where access-log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// Standard output (the default; containers collect it).
    Stdout,
    /// Nowhere.
    Off,
    /// Appended to this file.
    File(PathBuf),
}

/// Where the edge listens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listen {
    /// Plain HTTP and `ws://` listeners.
    pub http: Vec<SocketAddr>,
    /// HTTPS and `wss://` listeners.
    pub https: Vec<SocketAddr>,
    /// Whether HTTPS listeners take WebSockets over HTTP/2 (RFC 8441 extended CONNECT,
    /// advertised with `SETTINGS_ENABLE_CONNECT_PROTOCOL`).
    pub h2_websockets: bool,
}

/// One CDN resource: a set of hostnames served from one origin group.
#[derive(Debug, Clone)]
pub struct Resource {
    /// Unique name; the label in metrics and logs.
    pub name: String,
    /// Lower-case hostnames, `*.` wildcards allowed.
    pub hostnames: Vec<String>,
    /// Whole site or static files only.
    pub kind: ResourceType,
    /// Where requests go.
    pub origin: Origin,
    /// WebSocket policy.
    pub websocket: WebSocket,
    /// The certificate for its hostnames on https listeners.
    pub tls: Option<Certificate>,
}

/// The origin group of a resource.
#[derive(Debug, Clone)]
pub struct Origin {
    /// Scheme towards the origin.
    pub protocol: OriginProtocol,
    /// The servers of the group.
    pub servers: Vec<Server>,
    /// How requests are spread over the healthy primary servers.
    pub balance: Balance,
    /// Active health checks, if configured.
    pub health_check: Option<HealthCheck>,
    /// `Host` sent to the origin; `None` keeps the client's.
    pub host: Option<String>,
    /// TLS server name for https; `None` means `host`, else the client's Host.
    pub sni: Option<String>,
    /// Whether the origin's certificate is verified (https only).
    pub verify_tls: bool,
    /// PEM file with the CAs that sign the origin's certificate; `None` means system roots.
    pub ca_file: Option<PathBuf>,
    /// The certificates of `ca_file`, read at load.
    pub ca: Option<OriginCa>,
    /// TCP (and TLS) connect timeout per server.
    pub connect_timeout: Duration,
}

/// One server of an origin group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Server {
    /// Its address (names are resolved at load and reload).
    pub addr: SocketAddr,
    /// Its share among the primaries (default 1).
    pub weight: u32,
    /// Used only while no primary is healthy.
    pub backup: bool,
}

/// Active health checks of an origin group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// `GET path` expecting 2xx; `None` checks a TCP connect.
    pub path: Option<http::uri::PathAndQuery>,
    /// Time between checks.
    pub interval: Duration,
    /// Consecutive successes that mark a server up.
    pub healthy_after: u32,
    /// Consecutive failures that mark a server down.
    pub unhealthy_after: u32,
}

/// WebSocket settings of a resource.
#[derive(Debug, Clone)]
pub struct WebSocket {
    /// Whether upgrades are allowed at all.
    pub enabled: bool,
    /// No data either way for this long closes the tunnel (the heartbeat interval).
    pub idle_timeout: Duration,
    /// The origin must answer the upgrade within this, else 504.
    pub handshake_timeout: Duration,
    /// Path prefixes allowed to upgrade; empty allows every path.
    pub paths: Vec<String>,
    /// Exact `Origin` values allowed to upgrade (lower case); empty allows any. `none` in
    /// the list allows requests without an `Origin` header (non-browser clients).
    pub allowed_origins: Vec<String>,
    /// Open tunnels of the resource on this edge, at most.
    pub max_connections: Option<u32>,
    /// Open tunnels of the resource from one client (IPv4 address, or IPv6 prefix of
    /// `client.ipv6_prefix` bits) on this edge, at most.
    pub max_connections_per_ip: Option<u32>,
    /// Handshakes per client IP.
    pub handshake_rate: Option<Rate>,
    /// A tunnel older than this is closed.
    pub max_lifetime: Option<Duration>,
    /// The edge's own pings toward a quiet client (and origin).
    pub heartbeat: Option<Heartbeat>,
    /// A data message larger than this (all its fragments, as on the wire) ends the tunnel.
    pub max_message_size: Option<u64>,
    /// Messages from the client per second, over a tunnel; more ends it.
    pub message_rate: Option<Rate>,
}

/// A token bucket: `per_second` refill, `burst` capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// Bucket size: events allowed at once.
    pub burst: u32,
}

/// The edge's heartbeat on a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// A Ping goes to a client that sent nothing for this long.
    pub interval: Duration,
    /// No Pong (and no other byte) for this long after the Ping ends the tunnel.
    pub timeout: Duration,
    /// The origin gets the same (masked pings).
    pub origin: bool,
}

/// The heartbeat timeout when only the interval is given.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

/// `drain:`: each open tunnel gets a Close frame with `close_code`, each at a moment drawn
/// uniformly over `spread`, so that clients reconnect spread over it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainSettings {
    /// The window (zero: all at once).
    pub spread: Duration,
    /// The code of the Close frames.
    pub close_code: u16,
}

/// The drain's window when not configured: 30 s, or less when Pingora's grace period
/// leaves less (see [`DRAIN_CLOSING`]).
pub const DEFAULT_DRAIN_SPREAD: Duration = Duration::from_secs(30);
/// What the last tunnels of a drain need after its window, within Pingora's grace period:
/// a frame boundary (up to 1 s), the closing handshake (up to 1 s), and a second to spare.
pub const DRAIN_CLOSING: Duration = Duration::from_secs(3);
/// Pingora's grace period when `pingora.grace_period_seconds` is not set.
pub const PINGORA_GRACE_PERIOD: Duration = Duration::from_secs(300);

/// Limits on what clients send before their request is known.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Every request header must arrive within this from its first byte, and a TLS
    /// handshake (or an HTTP/2 preface) within this from the connection (slowloris).
    pub header_timeout: Duration,
    /// A request header larger than this gets 431 (HTTP/1.1 and HTTP/2).
    pub max_header_bytes: usize,
    /// A kept-alive HTTP/1.1 connection waits this long for the next request, an HTTP/2
    /// connection this long without a stream, before it is closed.
    pub keepalive_timeout: Duration,
    /// Requests one HTTP/1.1 connection may carry (nginx's `keepalive_requests`); after the
    /// last one the connection is closed. `None`: no limit.
    pub max_requests_per_connection: Option<u32>,
    /// IPv6 clients are told apart by this many leading bits in per-IP limits (64: one
    /// subscriber's network; 128: every address on its own).
    pub ipv6_prefix: u8,
}

/// Time a client has to send a complete request header, when not configured.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request header accepted, when not configured (like nginx's 4 × 8 KiB).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
/// Idle time of a kept-alive client connection, when not configured (Pingora's and about
/// nginx's `keepalive_timeout`).
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// IPv6 prefix that identifies one client in per-IP limits, when not configured: a /64 is
/// what one subscriber or host gets, and trying addresses within it must not multiply
/// anyone's share.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        Self::load_with(path, None)
    }

    /// Parses and validates configuration text; `path` is only used in messages.
    pub fn from_yaml(path: impl AsRef<Path>, text: &str) -> Result<Config, ConfigError> {
        build::build(path.as_ref(), text, None)
    }

    /// Reads the file and builds it with what etcd holds (`source.etcd`), checked as one
    /// configuration exactly like a file; without `source.etcd` the store is not used.
    pub fn load_with(
        path: impl AsRef<Path>,
        store: Option<&store::Snapshot>,
    ) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = read_text(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source: explain_read_error(path, source),
        })?;
        Self::from_parts(path, &text, store)
    }

    /// [`Config::from_yaml`] with what etcd holds.
    pub fn from_parts(
        path: impl AsRef<Path>,
        text: &str,
        store: Option<&store::Snapshot>,
    ) -> Result<Config, ConfigError> {
        build::build(path.as_ref(), text, store)
    }

    /// `source.etcd` of the file at `path`, if it has one (the rest is not checked here).
    pub fn etcd_settings(
        path: impl AsRef<Path>,
    ) -> Result<Option<store::EtcdSettings>, ConfigError> {
        let path = path.as_ref();
        let text = read_text(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source: explain_read_error(path, source),
        })?;
        build::etcd_of(path, &text)
    }
}

/// The largest configuration file read, bytes.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// A configuration file's text: a regular file (a FIFO or a device would be waited on
/// forever, by a start, a reload and `watch` alike) of at most [`MAX_FILE_BYTES`].
pub(crate) fn read_text(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {} MiB", MAX_FILE_BYTES >> 20),
        ));
    }
    Ok(text)
}

/// A permission error says who this process is and what the file allows, and what to do
/// (a file mounted into a container is often its owner's only, mode 0600, while the
/// process runs as another user); other errors stay as they are.
fn explain_read_error(path: &Path, e: std::io::Error) -> std::io::Error {
    use std::os::unix::fs::MetadataExt;
    if e.kind() != std::io::ErrorKind::PermissionDenied {
        return e;
    }
    let (uid, gid) = crate::os::effective_ids();
    let file = match std::fs::metadata(path) {
        Ok(m) => format!(
            "the file is owned by uid {} gid {} with mode {:04o}",
            m.uid(),
            m.gid(),
            m.mode() & 0o7777
        ),
        Err(_) => "a directory on its path is not searchable".to_string(),
    };
    std::io::Error::new(
        e.kind(),
        format!(
            "permission denied: wsedge runs as uid {uid} gid {gid} and {file}; make it readable by this user (chmod a+r, or chown it), or run wsedge as its owner (docker run --user)"
        ),
    )
}

impl Resource {
    /// A host name this resource serves, for when one must be named (a health check's
    /// Host, the demo's banner): its first exact hostname, else `www.` under its first
    /// wildcard.
    pub fn concrete_host(&self) -> String {
        self.hostnames
            .iter()
            .find(|h| !h.starts_with("*."))
            .cloned()
            .unwrap_or_else(|| self.hostnames[0].replace("*.", "www."))
    }

    /// Whether `path` (the request target's path) may be upgraded on this resource.
    pub fn path_allowed(&self, path: &str) -> bool {
        self.websocket.paths.is_empty()
            || self
                .websocket
                .paths
                .iter()
                .any(|p| path_has_prefix(path, p))
    }
}

/// `/ws` matches `/ws`, `/ws/x` and `/ws?x`, not `/wsx` (unless the prefix ends with '/').
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with(['/', '?']),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::path_has_prefix;

    #[test]
    fn path_prefixes() {
        assert!(path_has_prefix("/ws", "/ws"));
        assert!(path_has_prefix("/ws/room", "/ws"));
        assert!(path_has_prefix("/ws?x=1", "/ws"));
        assert!(!path_has_prefix("/wsx", "/ws"));
        assert!(!path_has_prefix("/", "/ws"));
        assert!(path_has_prefix("/api/x", "/api/"));
    }
}
