//! Host → resource. Exact names beat wildcards; `*.a.b` matches exactly one more label;
//! case and port are ignored. The table is immutable: a reload builds a new one.

use crate::config::{Config, Resource};
use crate::stats::{EdgeStats, ResourceStats};
use std::collections::HashMap;
use std::sync::Arc;

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

/// The lookup table built from a [`Config`].
#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<String, Arc<Site>>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, Arc<Site>>,
    sites: Vec<Arc<Site>>,
}

impl Router {
    /// Builds the table; hostnames are unique across resources (validation checks it).
    /// Each resource gets its counters from `stats`.
    pub fn new(config: &Config, stats: &EdgeStats) -> Router {
        let mut router = Router::default();
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
    fn wildcard_matches_one_label_only() {
        let r = router();
        assert!(r.find("example.com").is_none());
        assert!(r.find("a.b.c.example.com").is_none());
        assert!(r.find("other.org").is_none());
        assert!(r.find("").is_none());
    }
}
