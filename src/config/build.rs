//! From [`FileConfig`] to [`Config`]: one function per section, defaults merged in one
//! step, cross-checks done (unique names and hostnames, certificates for https, a primary
//! server per group), files read and names resolved, every error placed at a file, line
//! and column with the resource and key named and a way to fix it.

use super::errors::{from_serde, locate, ConfigError};
use super::file::{
    EtcdFile, FileConfig, RateFile, ResourceFile, ResourceType, SourceFile, Switch, TlsFile,
    WebSocketFile,
};
use super::store::{EtcdSettings, EtcdTls, Secret, Snapshot};
use super::{
    AccessLogTarget, Admin, Certificate, ClientLimits, Config, DrainSettings, HealthCheck,
    Heartbeat, Listen, Origin, OriginCa, Rate, Resource, Server, WebSocket,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Time between health checks, when a `health_check` does not say.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// Consecutive results that flip a server's health, when not configured.
pub const DEFAULT_HEALTH_STREAK: u32 = 2;

/// Parses and builds the configuration in `text`; `path` names it in errors and is the
/// folder relative paths start from. A file with `source.etcd` takes its resources and
/// defaults from `store` (what etcd holds), joined into it and checked as one.
pub(super) fn build(
    path: &Path,
    text: &str,
    store: Option<&Snapshot>,
) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let parsed: FileConfig = serde_yaml::from_str(text).map_err(|e| from_serde(&file, text, &e))?;
    let builder = |text| Builder {
        file: file.clone(),
        text,
        base: path.parent().unwrap_or(Path::new(".")),
        warnings: Vec::new(),
        now: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
        from_store: false,
    };
    let Some(source) = &parsed.source else {
        return builder(text).config(path, parsed);
    };
    let local = builder(text);
    let etcd = local.etcd(source)?;
    local.no_local_resources(&parsed)?;
    let Some(store) = store else {
        return Err(local.invalid(
            None,
            "source.etcd".into(),
            "etcd",
            0,
            "this configuration takes its resources from etcd, which was not read: start it with the wsedge binary or wsedge::fleet::load".into(),
        ));
    };
    let joined = super::store::join(text, &etcd.prefix, store)?;
    let parsed: FileConfig = serde_yaml::from_str(&joined.text)
        .map_err(|e| joined.place(from_serde(&file, &joined.text, &e)))?;
    let mut b = builder(&joined.text);
    b.from_store = true;
    for k in &joined.foreign {
        b.warnings.push(format!(
            "etcd {k}: not a key of wsedge's (defaults, resources/<name>); left alone"
        ));
    }
    let mut config = b.config(path, parsed).map_err(|e| joined.place(e))?;
    config.text = text.into();
    config.etcd = Some(etcd);
    config.store = Some(Arc::new(store.clone()));
    Ok(config)
}

/// This machine's host name (the default edge id): `/proc/sys/kernel/hostname`, kept to
/// what a label may hold; `edge` if there is none.
fn host_name() -> String {
    let name: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
        .take(64)
        .collect();
    if name.is_empty() {
        "edge".into()
    } else {
        name
    }
}

/// `source.etcd` of the file in `text`, if it has one.
pub(super) fn etcd_of(path: &Path, text: &str) -> Result<Option<EtcdSettings>, ConfigError> {
    let file = path.display().to_string();
    let parsed: FileConfig = serde_yaml::from_str(text).map_err(|e| from_serde(&file, text, &e))?;
    let Some(source) = &parsed.source else {
        return Ok(None);
    };
    let b = Builder {
        file,
        text,
        base: path.parent().unwrap_or(Path::new(".")),
        warnings: Vec::new(),
        now: 0,
        from_store: false,
    };
    let settings = b.etcd(source)?;
    b.no_local_resources(&parsed)?;
    Ok(Some(settings))
}

/// What building one file needs: where it is (for errors and relative paths) and the
/// warnings found so far.
struct Builder<'a> {
    file: String,
    text: &'a str,
    base: &'a Path,
    warnings: Vec<String>,
    now: i64,
    /// The resources come from etcd (where none at all is a fleet not yet filled).
    from_store: bool,
}

impl Builder<'_> {
    /// An error at the `nth` occurrence of `needle`, in the block of resource `at` (index
    /// and name) when given.
    fn invalid(
        &self,
        at: Option<(usize, &str)>,
        key: String,
        needle: &str,
        nth: usize,
        message: String,
    ) -> ConfigError {
        let (line, column) = locate(self.text, at.map(|(i, _)| i), needle, nth);
        ConfigError::Invalid {
            file: self.file.clone(),
            line,
            column,
            resource: at.map(|(_, name)| name.to_string()),
            key,
            message,
        }
    }

    fn config(mut self, path: &Path, f: FileConfig) -> Result<Config, ConfigError> {
        let listen = self.listen(&f)?;
        let default_certificate = match &f.listen.default_certificate {
            Some(t) => Some(self.certificate(None, "listen.default_certificate".into(), t)?),
            None => None,
        };
        let resources = self.resources(&f)?;
        if !listen.https.is_empty()
            && default_certificate.is_none()
            && resources.iter().all(|r| r.tls.is_none())
        {
            return Err(self.invalid(
                None,
                "listen.https".into(),
                "https",
                0,
                "an https listener needs certificates: give resources a `tls: { certificate, private_key }` block, or set listen.default_certificate".into(),
            ));
        }
        let (pingora_yaml, grace_period) = self.pingora(&f)?;
        let analytics = self.analytics(&f)?;
        Ok(Config {
            source: path.to_path_buf(),
            text: self.text.into(),
            pingora_yaml,
            grace_period,
            admin: self.admin(&f)?,
            metrics: f.metrics.unwrap_or(true),
            watch: f.watch.unwrap_or(false),
            client: client(&f),
            drain: self.drain(&f, grace_period)?,
            access_log: match f.access_log.as_deref() {
                None | Some("stdout") => AccessLogTarget::Stdout,
                Some("off") => AccessLogTarget::Off,
                Some(p) => AccessLogTarget::File(relative_to(self.base, p)),
            },
            listen,
            resources,
            default_certificate,
            warnings: self.warnings,
            etcd: None,
            store: None,
            analytics,
        })
    }

    /// The first line of the password file `p` (relative to the file), for `key`.
    fn password(&self, key: &str, p: &str) -> Result<Secret, ConfigError> {
        let path = relative_to(self.base, p);
        super::read_text(&path)
            .map(|t| Secret(t.lines().next().unwrap_or("").to_string()))
            .map_err(|why| {
                self.invalid(
                    None,
                    key.into(),
                    p,
                    0,
                    format!("cannot read {}: {why}", path.display()),
                )
            })
    }

    /// `analytics`: ClickHouse, the spill directory, the edge's name, the MaxMind files
    /// (opened and checked now).
    fn analytics(&self, f: &FileConfig) -> Result<Option<super::Analytics>, ConfigError> {
        let Some(a) = &f.analytics else {
            return Ok(None);
        };
        let c = &a.clickhouse;
        let user = match (&c.user, &c.password_file) {
            (None, None) => None,
            (Some(u), None) => Some((u.clone(), Secret(String::new()))),
            (Some(u), Some(p)) => Some((
                u.clone(),
                self.password("analytics.clickhouse.password_file", p)?,
            )),
            (None, Some(_)) => {
                return Err(self.invalid(
                    None,
                    "analytics.clickhouse.password_file".into(),
                    "password_file",
                    0,
                    "a password needs its `user`".into(),
                ))
            }
        };
        // Both travel in HTTP headers (X-ClickHouse-User, X-ClickHouse-Key): what a header
        // cannot carry would fail every request, so it is refused here.
        if let Some((u, p)) = &user {
            let visible = |s: &str, space: bool| {
                s.bytes()
                    .all(|b| b.is_ascii_graphic() || (space && b == b' '))
            };
            if u.is_empty() || u.len() > 128 || !visible(u, false) {
                return Err(self.invalid(
                    None,
                    "analytics.clickhouse.user".into(),
                    "user",
                    0,
                    "a ClickHouse user name of 1 to 128 visible ASCII characters, without spaces (it is sent in an HTTP header)".into(),
                ));
            }
            if p.0.len() > 1024 || !visible(&p.0, true) {
                return Err(self.invalid(
                    None,
                    "analytics.clickhouse.password_file".into(),
                    "password_file",
                    0,
                    "the password (the file's first line) must be printable ASCII of at most 1024 characters: it is sent in an HTTP header".into(),
                ));
            }
        }
        let spill_dir = relative_to(
            self.base,
            a.spill.path.as_deref().unwrap_or(super::DEFAULT_SPILL_DIR),
        );
        if spill_dir.exists() && !spill_dir.is_dir() {
            return Err(self.invalid(
                None,
                "analytics.spill.path".into(),
                "spill",
                0,
                format!(
                    "{} is not a directory: batches are spilled as files in a directory of their own",
                    spill_dir.display()
                ),
            ));
        }
        let geo_file = |key: &str, p: &Option<String>| -> Result<_, ConfigError> {
            let Some(p) = p else { return Ok(None) };
            let path = relative_to(self.base, p);
            super::geo::Database::open(&path)
                .map(|db| Some(Arc::new(db)))
                .map_err(|why| {
                    self.invalid(
                        None,
                        format!("analytics.geoip.{key}"),
                        p,
                        0,
                        format!("{}: {why}", path.display()),
                    )
                })
        };
        let geoip = super::geo::GeoIp {
            asn: geo_file("asn", &a.geoip.asn)?,
            country: geo_file("country", &a.geoip.country)?,
        };
        Ok(Some(super::Analytics {
            authority: c.url.0.clone(),
            database: c
                .database
                .as_ref()
                .map_or_else(|| "wsedge".to_string(), |d| d.0.clone()),
            user,
            batch: c
                .batch
                .map_or(super::DEFAULT_ANALYTICS_BATCH, |b| b.0 as usize),
            flush: c
                .flush
                .as_ref()
                .map_or(super::DEFAULT_ANALYTICS_FLUSH, |d| d.0),
            timeout: c
                .timeout
                .as_ref()
                .map_or(super::DEFAULT_ANALYTICS_TIMEOUT, |d| d.0),
            spill_dir,
            spill_max: a.spill.max_size.map_or(super::DEFAULT_SPILL_MAX, |s| s.0),
            edge_id: a.edge.id.as_ref().map_or_else(host_name, |l| l.0.clone()),
            edge_region: a
                .edge
                .region
                .as_ref()
                .map_or_else(String::new, |l| l.0.clone()),
            interim: a
                .interim
                .as_ref()
                .map_or(super::DEFAULT_ANALYTICS_INTERIM, |d| d.0),
            geoip,
        }))
    }

    /// `source.etcd`: endpoints, TLS files (read when connecting), the user's password
    /// (read now, so a missing file is an error of the configuration).
    fn etcd(&self, source: &SourceFile) -> Result<EtcdSettings, ConfigError> {
        let e: &EtcdFile = &source.etcd;
        if e.endpoints.is_empty() {
            return Err(self.invalid(
                None,
                "source.etcd.endpoints".into(),
                "endpoints",
                0,
                "no etcd endpoint: list the members, like [\"http://10.0.0.9:2379\"]".into(),
            ));
        }
        let file = |p: &Option<String>| p.as_deref().map(|p| relative_to(self.base, p));
        let tls = match &e.tls {
            None => None,
            Some(t) => {
                let identity = match (file(&t.certificate), file(&t.private_key)) {
                    (Some(c), Some(k)) => Some((c, k)),
                    (None, None) => None,
                    _ => {
                        return Err(self.invalid(
                            None,
                            "source.etcd.tls".into(),
                            "tls",
                            0,
                            "a client certificate needs both `certificate` and `private_key`"
                                .into(),
                        ))
                    }
                };
                Some(EtcdTls {
                    ca_file: file(&t.ca_file),
                    identity,
                })
            }
        };
        if tls.is_some() && e.endpoints.iter().any(|u| u.0.starts_with("http://")) {
            return Err(self.invalid(
                None,
                "source.etcd.endpoints".into(),
                "http://",
                0,
                "with `tls`, every endpoint is https://".into(),
            ));
        }
        let user = match (&e.user, &e.password_file) {
            (None, None) => None,
            (Some(u), Some(p)) => Some((u.clone(), self.password("source.etcd.password_file", p)?)),
            _ => {
                return Err(self.invalid(
                    None,
                    "source.etcd.user".into(),
                    "etcd",
                    0,
                    "etcd's authentication needs both `user` and `password_file`".into(),
                ))
            }
        };
        Ok(EtcdSettings {
            endpoints: e.endpoints.iter().map(|u| u.0.clone()).collect(),
            prefix: e
                .prefix
                .as_ref()
                .map_or_else(|| "/wsedge/".to_string(), |p| p.0.clone()),
            tls,
            user,
            last_known_good: relative_to(
                self.base,
                e.last_known_good
                    .as_deref()
                    .unwrap_or(super::store::DEFAULT_LAST_KNOWN_GOOD),
            ),
            timeout: e
                .timeout
                .as_ref()
                .map_or(super::store::DEFAULT_ETCD_TIMEOUT, |t| t.0),
        })
    }

    /// With `source.etcd`, resources and defaults are etcd's only: the same keys in the
    /// local file would be ignored, so they are an error.
    fn no_local_resources(&self, f: &FileConfig) -> Result<(), ConfigError> {
        let top: serde_yaml::Value = serde_yaml::from_str(self.text).unwrap_or_default();
        for key in ["resources", "defaults"] {
            if top.get(key).is_some() || (key == "resources" && !f.resources.is_empty()) {
                return Err(self.invalid(
                    None,
                    key.into(),
                    &format!("{key}:"),
                    0,
                    format!("with `source.etcd`, {key} come from etcd ({{prefix}}{}); remove this section from the local file", if key == "resources" { "resources/<name>" } else { "defaults" }),
                ));
            }
        }
        Ok(())
    }

    fn listen(&self, f: &FileConfig) -> Result<Listen, ConfigError> {
        if f.listen.http.is_empty() && f.listen.https.is_empty() {
            return Err(self.invalid(
                None,
                "listen.http".into(),
                "listen",
                0,
                "no listener: add at least one address, like `http: [\"0.0.0.0:8080\"]`".into(),
            ));
        }
        Ok(Listen {
            http: f.listen.http.iter().map(|a| a.0).collect(),
            https: f.listen.https.iter().map(|a| a.0).collect(),
            h2_websockets: f.listen.h2_websockets.unwrap_or(true),
        })
    }

    /// Pingora's section, checked by Pingora itself and kept as YAML text (its
    /// `ServerConf` is not `Clone`).
    /// With the section, Pingora's grace period as Pingora reads it.
    fn pingora(&self, f: &FileConfig) -> Result<(Option<String>, Duration), ConfigError> {
        let Some(map) = &f.pingora else {
            return Ok((None, super::PINGORA_GRACE_PERIOD));
        };
        let yaml = serde_yaml::to_string(map).unwrap_or_default();
        match pingora::server::configuration::ServerConf::from_yaml(&yaml) {
            Ok(conf) => {
                let grace = conf
                    .grace_period_seconds
                    .map_or(super::PINGORA_GRACE_PERIOD, Duration::from_secs);
                Ok((Some(yaml), grace))
            }
            Err(e) => Err(self.invalid(
                None,
                "pingora".into(),
                "pingora",
                0,
                format!("Pingora rejects this section: {e}; see Pingora's ServerConf keys"),
            )),
        }
    }

    /// `drain:`, held to Pingora's grace period: the window and the closing handshakes
    /// after it must end before the grace period does, or the last tunnels would be cut
    /// without a Close frame.
    fn drain(&self, f: &FileConfig, grace: Duration) -> Result<DrainSettings, ConfigError> {
        let room = grace.saturating_sub(super::DRAIN_CLOSING);
        let spread = match &f.drain.spread {
            None => super::DEFAULT_DRAIN_SPREAD.min(room),
            Some(s) if s.0 > room => {
                return Err(self.invalid(
                    None,
                    "drain.spread".into(),
                    "spread:",
                    0,
                    format!(
                        "a spread of {}s and the closing handshakes after it ({}s) do not fit in Pingora's grace period ({}s, pingora.grace_period_seconds): the last tunnels would be cut without a Close frame; lower the spread to at most {}s or raise the grace period",
                        s.0.as_secs_f64(),
                        super::DRAIN_CLOSING.as_secs(),
                        grace.as_secs(),
                        room.as_secs()
                    ),
                ))
            }
            Some(s) => s.0,
        };
        Ok(DrainSettings {
            spread,
            close_code: f.drain.close_code.map_or(1001, |c| c.0),
        })
    }

    /// A certificate chain and key; an expired one is a warning (clients will say so).
    fn certificate(
        &mut self,
        at: Option<(usize, &str)>,
        key: String,
        t: &TlsFile,
    ) -> Result<Certificate, ConfigError> {
        let chain = relative_to(self.base, &t.certificate);
        let private = relative_to(self.base, &t.private_key);
        let cert = Certificate::load(&chain, &private).map_err(|why| {
            self.invalid(
                at,
                key.clone(),
                &t.certificate,
                0,
                format!("{why}; paths are relative to the config file's folder"),
            )
        })?;
        if cert.expired(self.now) {
            self.warnings.push(format!(
                "{}: {}{key}: the certificate {} has expired; clients will refuse it",
                self.file,
                at.map(|(_, r)| format!("resource \"{r}\": "))
                    .unwrap_or_default(),
                chain.display()
            ));
        }
        Ok(cert)
    }

    /// Every resource, with names and hostnames unique across them.
    fn resources(&mut self, f: &FileConfig) -> Result<Vec<Arc<Resource>>, ConfigError> {
        if f.resources.is_empty() && !self.from_store {
            return Err(self.invalid(
                None,
                "resources".into(),
                "resources",
                0,
                "no resources: add at least one resource with a name, hostnames and an origin"
                    .into(),
            ));
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut owners: HashMap<&str, &str> = HashMap::new();
        let mut resources = Vec::with_capacity(f.resources.len());
        for (i, r) in f.resources.iter().enumerate() {
            let name = r.name.0.as_str();
            let at = Some((i, name));
            if names.insert(name, i).is_some() {
                return Err(self.invalid(
                    at,
                    format!("resources[{i}].name"),
                    "name",
                    0,
                    format!("another resource is already named \"{name}\"; names must be unique"),
                ));
            }
            if r.hostnames.is_empty() {
                return Err(self.invalid(
                    at,
                    format!("resources[{i}].hostnames"),
                    "hostnames",
                    0,
                    "no hostnames: list the names this resource serves, like [\"chat.example.com\"]"
                        .into(),
                ));
            }
            for (j, h) in r.hostnames.iter().enumerate() {
                let h = h.0.as_str();
                if let Some(other) = owners.insert(h, name) {
                    return Err(self.invalid(
                        at,
                        format!("resources[{i}].hostnames[{j}]"),
                        h,
                        0,
                        format!(
                            "hostname \"{h}\" already belongs to resource \"{other}\"; a hostname may belong to one resource only"
                        ),
                    ));
                }
            }
            resources.push(Arc::new(self.resource(f, i, r)?));
        }
        Ok(resources)
    }

    /// One resource: its keys merged with `defaults`, its servers resolved, its files read.
    fn resource(
        &mut self,
        f: &FileConfig,
        i: usize,
        r: &ResourceFile,
    ) -> Result<Resource, ConfigError> {
        let at = Some((i, r.name.0.as_str()));
        let tls = match &r.tls {
            Some(t) => Some(self.certificate(at, format!("resources[{i}].tls"), t)?),
            None => None,
        };
        Ok(Resource {
            name: r.name.0.clone(),
            hostnames: r.hostnames.iter().map(|h| h.0.clone()).collect(),
            kind: r.kind,
            origin: self.origin(f, i, r)?,
            websocket: websocket(&r.websocket.or(&f.defaults.websocket), r.kind),
            tls,
        })
    }

    fn origin(&self, f: &FileConfig, i: usize, r: &ResourceFile) -> Result<Origin, ConfigError> {
        let at = Some((i, r.name.0.as_str()));
        let (o, d) = (&r.origin, &f.defaults.origin);
        let mut servers = Vec::with_capacity(o.servers.len());
        for (j, server) in o.servers.iter().enumerate() {
            let addr = resolve(&server.address.0).map_err(|why| {
                self.invalid(
                    at,
                    format!("resources[{i}].origin.servers[{j}].address"),
                    &server.address.0,
                    0,
                    why,
                )
            })?;
            servers.push(Server {
                addr,
                weight: server.weight.map_or(1, |w| w.0 as u32),
                backup: server.backup.unwrap_or(false),
            });
        }
        if servers.iter().all(|s| s.backup) {
            return Err(self.invalid(
                at,
                format!("resources[{i}].origin.servers"),
                "servers",
                0,
                "every server is a backup: make at least one a primary (remove `backup: true`)"
                    .into(),
            ));
        }
        let ca_file = o
            .ca_file
            .as_ref()
            .or(d.ca_file.as_ref())
            .map(|p| relative_to(self.base, p));
        let ca = match &ca_file {
            Some(path) => Some(OriginCa::load(path).map_err(|why| {
                self.invalid(
                    at,
                    format!("resources[{i}].origin.ca_file"),
                    "ca_file",
                    0,
                    format!("{why}; the path is relative to the config file's folder"),
                )
            })?),
            None => None,
        };
        Ok(Origin {
            protocol: o.protocol.or(d.protocol).unwrap_or_default(),
            servers,
            balance: o.balance.unwrap_or_default(),
            health_check: o.health_check.as_ref().map(|h| HealthCheck {
                path: h.path.as_ref().map(|p| p.0.clone()),
                interval: h.interval.as_ref().map_or(DEFAULT_HEALTH_INTERVAL, |i| i.0),
                healthy_after: h
                    .healthy_after
                    .map_or(DEFAULT_HEALTH_STREAK, |n| n.0 as u32),
                unhealthy_after: h
                    .unhealthy_after
                    .map_or(DEFAULT_HEALTH_STREAK, |n| n.0 as u32),
            }),
            host: o.host.clone(),
            sni: o.sni.clone(),
            verify_tls: o.verify_tls.or(d.verify_tls).unwrap_or(true),
            ca_file,
            ca,
            connect_timeout: o
                .connect_timeout
                .as_ref()
                .or(d.connect_timeout.as_ref())
                .map_or(super::DEFAULT_CONNECT_TIMEOUT, |t| t.0),
        })
    }

    fn admin(&mut self, f: &FileConfig) -> Result<Admin, ConfigError> {
        let admin =
            match &f.admin {
                None => Admin {
                    addr: super::DEFAULT_ADMIN,
                    token: None,
                    hostnames: Vec::new(),
                },
                Some(a) => Admin {
                    addr: a.listen.0,
                    token: match &a.token_file {
                        None => None,
                        Some(t) => Some(read_token(&relative_to(self.base, t)).map_err(|why| {
                            self.invalid(None, "admin.token_file".into(), t, 0, why)
                        })?),
                    },
                    hostnames: a.hostnames.iter().map(|h| h.0.clone()).collect(),
                },
            };
        if !admin.addr.ip().is_loopback() && admin.token.is_none() {
            self.warnings.push(format!(
                "{}: admin: the admin listener {} is reachable from other hosts and POST /reload needs no token; set admin.token_file",
                self.file, admin.addr
            ));
        }
        Ok(admin)
    }
}

/// A resource's WebSocket settings from its keys, already merged with `defaults`.
fn websocket(w: &WebSocketFile, kind: ResourceType) -> WebSocket {
    WebSocket {
        // static_only resources serve files: no WebSocket unless asked for.
        enabled: w.enabled.unwrap_or(kind == ResourceType::FullSite),
        idle_timeout: w
            .idle_timeout
            .as_ref()
            .map_or(super::DEFAULT_IDLE_TIMEOUT, |t| t.0),
        handshake_timeout: w
            .handshake_timeout
            .as_ref()
            .map_or(super::DEFAULT_HANDSHAKE_TIMEOUT, |t| t.0),
        paths: w.paths.iter().flatten().map(|p| p.0.clone()).collect(),
        allowed_origins: w
            .allowed_origins
            .iter()
            .flatten()
            .map(|o| o.0.clone())
            .collect(),
        max_connections: w.max_connections,
        max_connections_per_ip: w.max_connections_per_ip.map(|n| n.0 as u32),
        handshake_rate: w.handshake_rate.as_ref().map(rate),
        max_lifetime: w.max_lifetime.as_ref().map(|t| t.0),
        heartbeat: w
            .heartbeat
            .as_ref()
            .and_then(Switch::on)
            .map(|h| Heartbeat {
                interval: h.interval.0,
                timeout: h
                    .timeout
                    .as_ref()
                    .map_or(super::DEFAULT_HEARTBEAT_TIMEOUT, |t| t.0),
                origin: h.origin.unwrap_or(false),
            }),
        max_message_size: w
            .max_message_size
            .as_ref()
            .and_then(Switch::on)
            .map(|b| b.0),
        message_rate: w.message_rate.as_ref().and_then(Switch::on).map(rate),
    }
}

fn rate(r: &RateFile) -> Rate {
    Rate {
        per_second: r.rate.0,
        // Default burst: one second's worth, at least 1.
        burst: r
            .burst
            .map_or((r.rate.0.ceil() as u32).max(1), |b| b.0 as u32),
    }
}

fn client(f: &FileConfig) -> ClientLimits {
    let c = &f.client;
    ClientLimits {
        header_timeout: c
            .header_timeout
            .as_ref()
            .map_or(super::DEFAULT_HEADER_TIMEOUT, |t| t.0),
        max_header_bytes: c
            .max_header_bytes
            .map_or(super::DEFAULT_MAX_HEADER_BYTES, |b| b.0 as usize),
        keepalive_timeout: c
            .keepalive_timeout
            .as_ref()
            .map_or(super::DEFAULT_KEEPALIVE_TIMEOUT, |t| t.0),
        max_requests_per_connection: c.max_requests_per_connection.map(|n| n.0 as u32),
        ipv6_prefix: c
            .ipv6_prefix
            .map_or(super::DEFAULT_IPV6_PREFIX, |p| p.0 as u8),
    }
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
