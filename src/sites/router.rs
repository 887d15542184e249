//! Host → resource. Exact names beat wildcards; `*.a.b` matches exactly one more label;
//! case and port are ignored. The table is immutable: a reload builds a new one and swaps
//! it in whole ([`SharedRouter`]); what must outlive reloads (counters, the state behind
//! the limits) is kept by resource name in [`Lasting`].

use super::origin::OriginGroup;
use crate::config::{Certificate, ClientLimits, Config, Resource};
use crate::observe::metrics::{EdgeStats, ResourceStats};
use crate::policy::drain::Drain;
use crate::policy::limits::ResourceLimits;
use crate::syntax::host::strip_port;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The live resource table, swappable as a whole (a reload builds a new [`Router`]).
pub type SharedRouter = Arc<ArcSwap<Router>>;

/// What each resource keeps across reloads, by name: its counters and its limits' state
/// (open tunnel slots, rate buckets), so that a reload neither resets a count nor frees a
/// slot a tunnel still holds.
#[derive(Debug, Default)]
pub struct Lasting {
    /// The counters of every resource.
    pub stats: Arc<EdgeStats>,
    limits: Mutex<HashMap<String, Arc<ResourceLimits>>>,
    /// The edge's drain (its settings follow reloads; a drain that runs goes on).
    pub drain: Arc<Drain>,
}

impl Lasting {
    /// Keeps `stats` (shared with whatever serves them) and the limits' state.
    pub fn new(stats: Arc<EdgeStats>) -> Lasting {
        Lasting {
            stats,
            limits: Mutex::default(),
            drain: Arc::default(),
        }
    }

    fn limits(&self, name: &str) -> Arc<ResourceLimits> {
        // Poisoning would mean a panic while inserting; the map is still whole.
        let mut map = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(name.to_string()).or_default().clone()
    }
}

/// A resource as it is served: what a request is matched to.
#[derive(Debug)]
pub struct Site {
    /// The resource's settings, as loaded (a request keeps these for its whole life).
    pub resource: Arc<Resource>,
    /// Its counters, which outlive reloads.
    pub stats: Arc<ResourceStats>,
    /// Its tunnel slots and rate buckets, which outlive reloads too.
    pub limits: Arc<ResourceLimits>,
    /// Its origin group with health state.
    pub group: OriginGroup,
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
    /// Each resource gets its counters and limits' state from `lasting`.
    pub fn new(config: &Config, lasting: &Lasting) -> Router {
        let mut router = Router {
            default_certificate: config.default_certificate.clone(),
            client: Some(config.client),
            ..Router::default()
        };
        for r in &config.resources {
            let site = Arc::new(Site {
                resource: r.clone(),
                stats: lasting.stats.resource(&r.name),
                limits: lasting.limits(&r.name),
                group: OriginGroup::new(r),
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
            &Lasting::default(),
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
    fn wildcard_matches_one_label_only() {
        let r = router();
        assert!(r.find("example.com").is_none());
        assert!(r.find("a.b.c.example.com").is_none());
        assert!(r.find("other.org").is_none());
        assert!(r.find("").is_none());
    }
}
