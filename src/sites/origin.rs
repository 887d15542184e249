//! The way to an origin: which server, which scheme, which TLS name and trust, which
//! timeouts, as a Pingora [`HttpPeer`].

use crate::config::{Balance, HealthCheck, OriginProtocol, Resource, Server};
use futures_util::FutureExt;
use pingora::lb::health_check::{HealthObserve, HttpHealthCheck, TcpHealthCheck};
use pingora::lb::selection::{Consistent, RoundRobin};
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::upstreams::peer::{HttpPeer, PeerOptions};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Instant;

/// Whether the connection to the origin uses TLS, given how the client came in.
pub fn uses_tls(protocol: OriginProtocol, client_tls: bool) -> bool {
    match protocol {
        OriginProtocol::Http => false,
        OriginProtocol::Https => true,
        OriginProtocol::Follow => client_tls,
    }
}

/// The peer for one server of the resource's origin group. `client_host` is the client's
/// Host without port, used for SNI when neither `sni` nor `host` is configured.
pub fn peer(res: &Resource, server: SocketAddr, client_tls: bool, client_host: &str) -> HttpPeer {
    let o = &res.origin;
    let tls = uses_tls(o.protocol, client_tls);
    let sni = o
        .sni
        .as_deref()
        .or(o.host.as_deref())
        .unwrap_or(client_host)
        .to_string();
    let mut peer = HttpPeer::new(server, tls, sni);
    peer.options.total_connection_timeout = Some(o.connect_timeout);
    connect_options(res, &mut peer.options);
    peer
}

/// What every connection to the resource's origin servers uses: the connect timeout and
/// (for TLS) how the server's certificate is checked.
fn connect_options(res: &Resource, options: &mut PeerOptions) {
    let o = &res.origin;
    options.connection_timeout = Some(o.connect_timeout);
    options.verify_cert = o.verify_tls;
    options.verify_hostname = o.verify_tls;
    options.ca = o.ca.as_ref().map(|c| c.0.clone());
}

/// The live origin group of a resource: weighted or sticky selection among healthy
/// primaries, backups while no primary is healthy, and health state fed by active checks.
pub struct OriginGroup {
    primary: Pool,
    backup: Option<Pool>,
    size: usize,
    check: Option<HealthCheck>,
    next_check: Mutex<Instant>,
}

enum Pool {
    RoundRobin(LoadBalancer<RoundRobin>),
    ClientIp(LoadBalancer<Consistent>),
}

impl Pool {
    fn new(res: &Resource, servers: &[Server], balance: Balance) -> Pool {
        let set: std::collections::BTreeSet<Backend> = servers
            .iter()
            .map(|s| {
                let mut b = Backend::new(&s.addr.to_string()).expect("a socket address parses");
                b.weight = s.weight as usize;
                b
            })
            .collect();
        let mut backends = Backends::new(pingora::lb::discovery::Static::new(set));
        if let Some(hc) = &res.origin.health_check {
            backends.set_health_check(health_check(res, hc));
        }
        let pool = match balance {
            Balance::RoundRobin => Pool::RoundRobin(LoadBalancer::from_backends(backends)),
            Balance::ClientIp => Pool::ClientIp(LoadBalancer::from_backends(backends)),
        };
        // Static discovery never blocks or fails.
        let updated = match &pool {
            Pool::RoundRobin(lb) => lb.update().now_or_never(),
            Pool::ClientIp(lb) => lb.update().now_or_never(),
        };
        if !matches!(updated, Some(Ok(()))) {
            log::error!("resource {}: building the origin group failed", res.name);
        }
        pool
    }

    /// A healthy server not in `tried`.
    fn select(&self, key: &[u8], tried: &[SocketAddr]) -> Option<SocketAddr> {
        let accept =
            |b: &Backend, healthy: bool| healthy && b.as_inet().is_some_and(|a| !tried.contains(a));
        let b = match self {
            Pool::RoundRobin(lb) => lb.select_with(key, 256, accept),
            Pool::ClientIp(lb) => lb.select_with(key, 256, accept),
        }?;
        b.as_inet().copied()
    }

    fn backends(&self) -> &Backends {
        match self {
            Pool::RoundRobin(lb) => lb.backends(),
            Pool::ClientIp(lb) => lb.backends(),
        }
    }
}

trait BackendAddr {
    fn as_inet(&self) -> Option<&SocketAddr>;
}

impl BackendAddr for Backend {
    fn as_inet(&self) -> Option<&SocketAddr> {
        match &self.addr {
            pingora::protocols::l4::socket::SocketAddr::Inet(a) => Some(a),
            _ => None,
        }
    }
}

/// Logs health transitions.
struct LogHealth(String);

#[async_trait::async_trait]
impl HealthObserve for LogHealth {
    async fn observe(&self, target: &Backend, healthy: bool) {
        let state = if healthy { "up" } else { "down" };
        log::warn!("resource {}: origin {} is {state}", self.0, target.addr);
    }
}

fn health_check(
    res: &Resource,
    hc: &HealthCheck,
) -> Box<dyn pingora::lb::health_check::HealthCheck + Send + Sync> {
    let tls = uses_tls(res.origin.protocol, false);
    let host = res
        .origin
        .host
        .clone()
        .unwrap_or_else(|| res.concrete_host());
    let observer = Box::new(LogHealth(res.name.clone()));
    match &hc.path {
        Some(path) => {
            let mut check = HttpHealthCheck::new(&host, tls);
            check.consecutive_success = hc.healthy_after as usize;
            check.consecutive_failure = hc.unhealthy_after as usize;
            check.req.set_uri(http::Uri::from(path.clone()));
            check.validator = Some(Box::new(|resp: &pingora::http::ResponseHeader| {
                if resp.status.is_success() {
                    Ok(())
                } else {
                    pingora::Error::e_explain(
                        pingora::ErrorType::HTTPStatus(resp.status.as_u16()),
                        "health check answer is not 2xx",
                    )
                }
            }));
            connect_options(res, &mut check.peer_template.options);
            if let Some(sni) = &res.origin.sni {
                check.peer_template.sni = sni.clone();
            }
            check.health_changed_callback = Some(observer);
            Box::new(check)
        }
        None => {
            let mut check = TcpHealthCheck::new();
            check.consecutive_success = hc.healthy_after as usize;
            check.consecutive_failure = hc.unhealthy_after as usize;
            check.peer_template.options.connection_timeout = Some(res.origin.connect_timeout);
            check.health_changed_callback = Some(observer);
            check
        }
    }
}

impl OriginGroup {
    /// The group of `res`, every server healthy until checked.
    pub fn new(res: &Resource) -> OriginGroup {
        let (backups, primaries): (Vec<_>, Vec<_>) =
            res.origin.servers.iter().copied().partition(|s| s.backup);
        OriginGroup {
            primary: Pool::new(res, &primaries, res.origin.balance),
            backup: (!backups.is_empty()).then(|| Pool::new(res, &backups, Balance::RoundRobin)),
            size: res.origin.servers.len(),
            check: res.origin.health_check.clone(),
            next_check: Mutex::new(Instant::now()),
        }
    }

    /// The next server to try for a client: a healthy primary, else a healthy backup, never
    /// one in `tried`. `None` when every candidate was tried.
    pub fn next(&self, client: Option<IpAddr>, tried: &[SocketAddr]) -> Option<SocketAddr> {
        if tried.len() >= self.size {
            return None;
        }
        // The client's address as the hash key, on the stack.
        let mut buf = [0u8; 16];
        let key: &[u8] = match client {
            Some(IpAddr::V4(ip)) => {
                buf[..4].copy_from_slice(&ip.octets());
                &buf[..4]
            }
            Some(IpAddr::V6(ip)) => {
                buf = ip.octets();
                &buf
            }
            None => &[],
        };
        self.primary
            .select(key, tried)
            .or_else(|| self.backup.as_ref()?.select(key, tried))
    }

    /// Servers in the group.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Runs the health checks if their interval has passed (the checker calls this five
    /// times a second).
    pub async fn check_if_due(&self) {
        let Some(check) = &self.check else { return };
        {
            let mut next = self.next_check.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if now < *next {
                return;
            }
            *next = now + check.interval;
        }
        self.primary.backends().run_health_check(true).await;
        if let Some(b) = &self.backup {
            b.backends().run_health_check(true).await;
        }
    }
}

impl std::fmt::Debug for OriginGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OriginGroup({} servers)", self.size)
    }
}
