//! Host → resource. Exact names beat wildcards; `*.a.b` matches exactly one more label;
//! case and port are ignored. The table is immutable: a reload builds a new one.

use crate::config::{ClientLimits, Config, Resource};
use crate::stats::{EdgeStats, ResourceStats};
use crate::tls::Certificate;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::Arc;

/// The live resource table, swappable as a whole (a reload builds a new [`Router`]).
pub type Resources = Arc<ArcSwap<Router>>;

/// A resource with its counters: what a request is matched to.
#[derive(Debug)]
pub struct Site {
    /// The resource's settings, as loaded (a request keeps these for its whole life).
    pub resource: Arc<Resource>,
    /// Its counters, which outlive reloads.
    pub stats: Arc<ResourceStats>,
    /// Its origin group with health state.
    pub group: crate::origin::OriginGroup,
}

/// The lookup table built from a [`Config`], with what else a request is checked against
/// and that a reload may change.
#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<String, Arc<Site>>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, Arc<Site>>,
    sites: Vec<Arc<Site>>,
    default_certificate: Option<Certificate>,
    client: Option<ClientLimits>,
}

impl Router {
    /// Builds the table; hostnames are unique across resources (validation checks it).
    /// Each resource gets its counters from `stats`.
    pub fn new(config: &Config, stats: &EdgeStats) -> Router {
        let mut router = Router {
            default_certificate: config.default_certificate.clone(),
            client: Some(config.client),
            ..Router::default()
        };
        for r in &config.resources {
            let site = Arc::new(Site {
                resource: r.clone(),
                stats: stats.resource(&r.name),
                group: crate::origin::OriginGroup::new(r),
            });
            router.sites.push(site.clone());
            for h in &r.hostnames {
                match h.strip_prefix("*.") {
                    Some(suffix) => router.wildcard.insert(suffix.to_string(), site.clone()),
                    None => router.exact.insert(h.clone(), site.clone()),
                };
            }
        }
        router
    }

    /// Every site, once each.
    pub fn sites(&self) -> &[Arc<Site>] {
        &self.sites
    }

    /// The certificate for TLS clients whose SNI routes to no resource with one of its own.
    pub fn default_certificate(&self) -> Option<&Certificate> {
        self.default_certificate.as_ref()
    }

    /// The IPv6 prefix that identifies a client in per-IP limits.
    pub fn ipv6_prefix(&self) -> u8 {
        self.client
            .map_or(crate::config::DEFAULT_IPV6_PREFIX, |c| c.ipv6_prefix)
    }

    /// The site serving `host` (a Host header or :authority value), if any.
    pub fn find(&self, host: &str) -> Option<&Arc<Site>> {
        let name = strip_port(host).trim_end_matches('.');
        // Host names are short; lower-casing on the stack is not worth the code, and most
        // clients send lower case already, so only allocate when needed.
        let lowered;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = name.to_ascii_lowercase();
            lowered.as_str()
        } else {
            name
        };
        if let Some(r) = self.exact.get(name) {
            return Some(r);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent)
    }
}

/// A Host header (or `:authority`) value checked against RFC 9110 §7.2 and RFC 3986 §3.2.2,
/// returning the host without its port: a DNS name (letters, digits, `-`, `_`, labels of 1 to
/// 63 characters, 253 in all, one trailing dot allowed), a dotted IPv4 address or a
/// bracketed IPv6 address, then an optional `:port` of digits. Anything else (`evil/`,
/// spaces, quotes, percent-encodings, `user@`, an empty name) is not a host and is never
/// routed or forwarded: the request gets 400.
pub fn valid_host(value: &str) -> Option<&str> {
    let host = strip_port(value);
    if host.len() != value.len() {
        let port = value[host.len()..].strip_prefix(':')?;
        if port.is_empty() || port.len() > 5 || port.parse::<u32>().map_or(true, |p| p > 65535) {
            return None;
        }
    }
    if let Some(inner) = host.strip_prefix('[') {
        let addr = inner.strip_suffix(']')?;
        return addr.parse::<std::net::Ipv6Addr>().is_ok().then_some(host);
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    (!name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok)).then_some(host)
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
pub(crate) fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let yaml = r#"
listen: { http: ["127.0.0.1:0"] }
resources:
  - name: exact
    hostnames: ["chat.example.com"]
    origin: { servers: [{ address: "127.0.0.1:1" }] }
  - name: wild
    hostnames: ["*.example.com", "*.chat.example.com"]
    origin: { servers: [{ address: "127.0.0.1:2" }] }
"#;
        Router::new(
            &Config::from_yaml("t.yaml", yaml).unwrap(),
            &EdgeStats::default(),
        )
    }

    #[test]
    fn exact_beats_wildcard_case_and_port_ignored() {
        let r = router();
        assert_eq!(r.find("chat.example.com").unwrap().resource.name, "exact");
        assert_eq!(
            r.find("CHAT.Example.COM:8080").unwrap().resource.name,
            "exact"
        );
        assert_eq!(r.find("news.example.com").unwrap().resource.name, "wild");
        assert_eq!(r.find("eu.chat.example.com").unwrap().resource.name, "wild");
    }

    #[test]
    fn hosts_are_names_or_addresses() {
        for ok in [
            "chat.example.com",
            "Chat.Example.com:8080",
            "example.com.",
            "_dmarc.example.com",
            "127.0.0.1:80",
            "[::1]:443",
            "[2001:db8::1]",
            "localhost",
        ] {
            assert!(valid_host(ok).is_some(), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "evil/.example.com",
            "a b.example.com",
            "\"q\".example.com",
            "a..b",
            "a%2eb.example.com",
            "user@example.com",
            "example.com:",
            "example.com:99999",
            "example.com:8o",
            "[::1",
            "[nonsense]",
            "[::1]x",
            "[::1]x80",
            ".",
        ] {
            assert!(valid_host(bad).is_none(), "{bad}");
        }
        assert!(valid_host(&"a".repeat(64)).is_none());
        assert_eq!(valid_host("example.com:443"), Some("example.com"));
    }

    #[test]
    fn wildcard_matches_one_label_only() {
        let r = router();
        assert!(r.find("example.com").is_none());
        assert!(r.find("a.b.c.example.com").is_none());
        assert!(r.find("other.org").is_none());
        assert!(r.find("").is_none());
    }
}
