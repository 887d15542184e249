//! The `/stats` query: `resource=NAME&from=RFC3339&to=RFC3339&granularity=5m|1h|1d`,
//! checked, answered from the windows as JSON (the shape CDN statistics APIs use). Not on
//! any hot path: built with plain formatting.

use super::access_log::json_str;
use super::analytics::fleet_stats::{allowed, retention_days, FleetQuery, MAX_RANGE_DAYS};
use super::metrics::EdgeStats;
use super::time::{parse_rfc3339, rfc3339};
use super::windows::{BucketView, Granularity};
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const USAGE: &str = "use /stats?resource=NAME&from=RFC3339&to=RFC3339&granularity=5m|1h|1d, like /stats?resource=chat&from=2026-11-22T00:00:00Z&to=2026-11-23T00:00:00Z&granularity=1h";

const FLEET_USAGE: &str = "use /stats?resource=NAME&from=RFC3339&to=RFC3339&granularity=5m|1h|1d, optionally with hostname=, region= (the client's), isp=, edge_region= and source=fleet|edge";

/// The longest value of a filter.
const MAX_FILTER: usize = 256;

/// The parameters of a query, percent-decoded.
#[derive(Default)]
struct Query {
    resource: Option<String>,
    from: Option<String>,
    to: Option<String>,
    granularity: Option<String>,
    hostname: Option<String>,
    region: Option<String>,
    isp: Option<String>,
    edge_region: Option<String>,
    source: Option<String>,
}

/// Where a `/stats` query is answered from.
pub enum Route {
    /// This edge's own windows ([`EdgeStats::stats_page`]).
    Edge,
    /// ClickHouse, for the whole fleet.
    Fleet(FleetQuery),
    /// Refused: the status and the JSON body.
    Refused(u16, String),
}

/// `{"error":"..."}` with `why`.
pub fn error_body(why: &str) -> String {
    let mut b = String::from("{\"error\":");
    json_str(&mut b, why);
    b.push_str("}\n");
    b
}

/// Where `query` goes: the fleet's statistics (by default when `fleet` is configured,
/// or with `source=fleet`), checked against the range rules, or this edge's windows.
pub fn route(query: &str, fleet: bool, now: u64) -> Route {
    let refuse = |why: String| Route::Refused(400, error_body(&format!("{why}; {FLEET_USAGE}")));
    let q = match Query::parse(query) {
        Ok(q) => q,
        Err(why) => return refuse(why),
    };
    let fleet_only = [&q.hostname, &q.region, &q.isp, &q.edge_region]
        .iter()
        .any(|v| v.is_some());
    let to_fleet = match q.source.as_deref() {
        None => fleet,
        Some("fleet") if fleet => true,
        Some("fleet") => {
            return refuse(
                "source=fleet needs analytics.clickhouse in the configuration: this edge has only its own windows".into(),
            )
        }
        Some("edge") => false,
        Some(other) => return refuse(format!("source \"{other}\" is not fleet or edge")),
    };
    if !to_fleet {
        if fleet_only {
            return refuse(
                "hostname, region, isp and edge_region are answered from the fleet's statistics (source=fleet, with analytics.clickhouse configured); this edge's windows are by resource only".into(),
            );
        }
        return Route::Edge;
    }
    match fleet_query(q, now) {
        Ok(f) => Route::Fleet(f),
        Err(why) => refuse(why),
    }
}

/// The fleet's rules: at most 3 months a query, a granularity that fits the range (the
/// finest by default), data still kept.
fn fleet_query(q: Query, now: u64) -> Result<FleetQuery, String> {
    let resource = q.resource.ok_or("resource is missing")?;
    let g = match q.granularity.as_deref() {
        None => None,
        Some(s) => Some(
            Granularity::parse(s)
                .ok_or_else(|| format!("granularity \"{s}\" is not one of 5m, 1h, 1d"))?,
        ),
    };
    let time = |name: &str, v: Option<String>| -> Result<Option<u64>, String> {
        match v {
            None => Ok(None),
            Some(v) => parse_rfc3339(&v)
                .map(Some)
                .ok_or_else(|| format!("{name}={v} is not an RFC 3339 time")),
        }
    };
    // By default up to the end of the current second (rows of this second included).
    let to = time("to", q.to)?.unwrap_or(now + 1);
    let default_span = match g {
        None | Some(Granularity::FiveMinutes) => 86_400,
        Some(Granularity::Hour) => 3 * 86_400,
        Some(Granularity::Day) => 31 * 86_400,
    };
    let from = time("from", q.from)?.unwrap_or(to.saturating_sub(default_span));
    if from >= to {
        return Err("from must be before to".into());
    }
    let span = to - from;
    if span > MAX_RANGE_DAYS * 86_400 {
        return Err(format!(
            "the range is {:.1} days: a query covers at most 3 months ({MAX_RANGE_DAYS} days); split it",
            span as f64 / 86_400.0
        ));
    }
    let fits = allowed(span);
    let g = match g {
        None => fits[0],
        Some(g) if fits.contains(&g) => g,
        Some(g) => {
            let names: Vec<&str> = fits.iter().map(|g| g.label()).collect();
            return Err(format!(
                "granularity {} does not fit a range of {:.1} days: 5m and 1h are for up to 3 days, 1h and 1d for up to 31, 1d beyond; use {}",
                g.label(),
                span as f64 / 86_400.0,
                names.join(" or ")
            ));
        }
    };
    let keep = retention_days(g);
    if from + keep * 86_400 < now {
        return Err(format!(
            "{} data is kept {keep} days: from={} is older; use a coarser granularity",
            g.label(),
            super::time::rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(from))
        ));
    }
    let (width, _) = g.shape();
    let filter = |name: &str, v: Option<String>| -> Result<Option<String>, String> {
        match v {
            Some(v) if v.len() > MAX_FILTER || v.chars().any(char::is_control) => Err(format!(
                "{name} must be at most {MAX_FILTER} characters, without control characters"
            )),
            other => Ok(other),
        }
    };
    Ok(FleetQuery {
        resource,
        from: from / width * width,
        to,
        granularity: Some(g),
        hostname: filter("hostname", q.hostname)?,
        region: filter("region", q.region)?,
        isp: filter("isp", q.isp)?,
        edge_region: filter("edge_region", q.edge_region)?,
    })
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
                "hostname" => &mut q.hostname,
                "region" => &mut q.region,
                "isp" => &mut q.isp,
                "edge_region" => &mut q.edge_region,
                "source" => &mut q.source,
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
            Err((status, why)) => (status, error_body(&why)),
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
        Ok(answer(&resource, g, from, to, &[], &buckets))
    }
}

/// A `/stats` answer, this edge's or the fleet's: the query (`fields` are more of it, like
/// the fleet's filters) and the buckets.
pub(crate) fn answer(
    resource: &str,
    g: Granularity,
    from: u64,
    to: u64,
    fields: &[(&str, &str)],
    buckets: &[BucketView],
) -> String {
    let at = |secs: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(secs));
    let mut b = String::with_capacity(128 + buckets.len() * 256);
    b.push_str("{\"resource\":");
    json_str(&mut b, resource);
    let _ = write!(b, ",\"granularity\":\"{}\",\"from\":", g.label());
    json_str(&mut b, &at(from));
    b.push_str(",\"to\":");
    json_str(&mut b, &at(to));
    for (k, v) in fields {
        let _ = write!(b, ",\"{k}\":");
        json_str(&mut b, v);
    }
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
    b
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
        // Without ClickHouse, the fleet's parameters are refused, and source=edge is the
        // default.
        let now = 1_796_169_600; // 2026-12-02
        for q in [
            "resource=chat&source=fleet",
            "resource=chat&isp=x",
            "resource=chat&region=DE",
        ] {
            assert!(
                matches!(route(q, false, now), Route::Refused(400, _)),
                "{q}"
            );
        }
        assert!(matches!(route("resource=chat", false, now), Route::Edge));
        assert!(matches!(route("resource=chat", true, now), Route::Fleet(_)));
        // The range decides the granularity when none is given: the finest it allows.
        let day = 86_400;
        for (span, want) in [
            (3 * day, "5m"),
            (3 * day + 1, "1h"),
            (31 * day, "1h"),
            (40 * day, "1d"),
        ] {
            let q = format!(
                "resource=chat&from=2026-09-01T00:00:00Z&to={}",
                rfc3339(UNIX_EPOCH + Duration::from_secs(1_788_220_800 + span))
            );
            match route(&q, true, now) {
                Route::Fleet(f) => {
                    assert_eq!(f.granularity.map(|g| g.label()), Some(want), "{span}")
                }
                _ => panic!("{q} refused"),
            }
        }
        let (status, body) = stats.stats_page(Some("resource=%22%3Cnope%3E&granularity=1h"));
        assert_eq!(status, 404);
        assert!(body.contains("\\\"<nope>\\\""), "{body}");
    }
}
