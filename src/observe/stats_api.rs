//! The `/stats` query: `resource=NAME&from=RFC3339&to=RFC3339&granularity=5m|1h|1d`,
//! checked, answered from the windows as JSON (the shape CDN statistics APIs use). Not on
//! any hot path: built with plain formatting.

use super::access_log::json_str;
use super::metrics::EdgeStats;
use super::time::{parse_rfc3339, rfc3339};
use super::windows::Granularity;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const USAGE: &str = "use /stats?resource=NAME&from=RFC3339&to=RFC3339&granularity=5m|1h|1d, like /stats?resource=chat&from=2026-11-22T00:00:00Z&to=2026-11-23T00:00:00Z&granularity=1h";

/// The parameters of a query, percent-decoded.
#[derive(Default)]
struct Query {
    resource: Option<String>,
    from: Option<String>,
    to: Option<String>,
    granularity: Option<String>,
}

impl Query {
    fn parse(query: &str) -> Result<Query, String> {
        let mut q = Query::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v).ok_or_else(|| format!("{k} is not well percent-encoded"))?;
            let slot = match k {
                "resource" => &mut q.resource,
                "from" => &mut q.from,
                "to" => &mut q.to,
                "granularity" => &mut q.granularity,
                other => return Err(format!("unknown parameter \"{other}\"")),
            };
            if slot.replace(v).is_some() {
                return Err(format!("{k} is given twice"));
            }
        }
        Ok(q)
    }
}

/// `%XX` decoded (a `+` stays a `+`: time offsets use it); `None` if malformed or not UTF-8.
fn percent_decode(v: &str) -> Option<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = v.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl EdgeStats {
    /// The answer to a `/stats` query string: a status (200, 400 with what is allowed, 404
    /// for an unknown resource) and a JSON body.
    pub fn stats_page(&self, query: Option<&str>) -> (u16, String) {
        match self.stats_json(query.unwrap_or("")) {
            Ok(body) => (200, body),
            Err((status, why)) => {
                let mut b = String::from("{\"error\":");
                json_str(&mut b, &why);
                b.push_str("}\n");
                (status, b)
            }
        }
    }

    fn stats_json(&self, query: &str) -> Result<String, (u16, String)> {
        let bad = |why: String| (400, format!("{why}; {USAGE}"));
        let q = Query::parse(query).map_err(bad)?;
        let resource = q
            .resource
            .ok_or_else(|| bad("resource is missing".into()))?;
        let granularity = q.granularity.unwrap_or_default();
        let g = Granularity::parse(&granularity).ok_or_else(|| {
            bad(format!(
                "granularity \"{granularity}\" is not one of 5m, 1h, 1d"
            ))
        })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let (width, len) = g.shape();
        let time = |name: &str, v: Option<String>, default: u64| match v {
            None => Ok(default),
            Some(v) => {
                parse_rfc3339(&v).ok_or_else(|| bad(format!("{name}={v} is not an RFC 3339 time")))
            }
        };
        let to = time("to", q.to, now)?;
        let from = time("from", q.from, to.saturating_sub(width * len as u64))?;
        if from >= to {
            return Err(bad("from must be before to".into()));
        }
        let buckets = self
            .query(&resource, from, to, g)
            .ok_or_else(|| (404, format!("no resource named \"{resource}\"")))?;
        let at = |secs: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(secs));
        let mut b = String::with_capacity(64 + buckets.len() * 256);
        b.push_str("{\"resource\":");
        json_str(&mut b, &resource);
        let _ = write!(b, ",\"granularity\":\"{granularity}\",\"from\":");
        json_str(&mut b, &at(from));
        b.push_str(",\"to\":");
        json_str(&mut b, &at(to));
        b.push_str(",\"buckets\":[");
        for (i, k) in buckets.iter().enumerate() {
            if i > 0 {
                b.push(',');
            }
            b.push_str("{\"start\":");
            json_str(&mut b, &at(k.start));
            let _ = write!(
                b,
                ",\"bytes_client_to_origin\":{},\"bytes_origin_to_client\":{},\"bandwidth_avg_bps\":{},\"bandwidth_peak_bps\":{},\"tunnels_opened\":{},\"tunnels_open_peak\":{},\"status\":{{",
                k.bytes_client_to_origin,
                k.bytes_origin_to_client,
                k.avg_bps(),
                k.peak_bps,
                k.tunnels_opened,
                k.tunnels_open_peak
            );
            for (j, (code, n)) in k.codes.iter().enumerate() {
                let _ = write!(b, "{}\"{code}\":{n}", if j > 0 { "," } else { "" });
            }
            b.push_str("}}");
        }
        b.push_str("]}\n");
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_decoded_and_hostile_ones_refused() {
        let stats = EdgeStats::default();
        stats.resource("chat");
        let ok = |q: &str| stats.stats_page(Some(q)).0;
        assert_eq!(ok("resource=chat&granularity=1h"), 200);
        assert_eq!(
            ok("resource=chat&granularity=1h&from=2026-11-22T00%3A00%3A00%2B01%3A00&to=2026-11-23T00:00:00Z"),
            200
        );
        assert_eq!(ok("resource=ch%61t&granularity=5m"), 200);
        for bad in [
            "",
            "resource=chat",
            "resource=chat&granularity=1w",
            "resource=chat&granularity=1h&from=yesterday",
            "resource=chat&granularity=1h&from=2026-11-23T00:00:00Z&to=2026-11-22T00:00:00Z",
            "resource=chat&granularity=1h&extra=1",
            "resource=chat&resource=news&granularity=1h",
            "resource=%zz&granularity=1h",
            "resource=%FF&granularity=1h",
        ] {
            assert_eq!(ok(bad), 400, "{bad}");
        }
        let (status, body) = stats.stats_page(Some("resource=%22%3Cnope%3E&granularity=1h"));
        assert_eq!(status, 404);
        assert!(body.contains("\\\"<nope>\\\""), "{body}");
    }
}
