//! Per-resource WebSocket policy, and the admission of an upgrade: [`admit`] is the whole
//! chain the hooks call (policy, RFC 6455, Origin, rate, slot), each step a pure check or a
//! lock-free take on the resource's limits.

use super::answer::Answer;
use super::handshake;
use super::limits::{client_key, Full, ResourceLimits, Slot};
use crate::config::Resource;
use pingora::http::RequestHeader;
use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

/// An upgrade the gate let through: the path to send the origin (the normal form that was
/// checked) and the tunnel's slot.
#[derive(Debug)]
pub struct Admitted {
    /// The request path in normal form, without the query.
    pub path: String,
    /// The slot the tunnel holds until it ends.
    pub slot: Slot,
}

/// The gate for an upgrade request to `res`, in order: WebSocket on and the path allowed
/// (403, or 400 for a path that cannot be normalised), the RFC 6455 checks (400, 426), the
/// `Origin` (403), the edge's drain (503), the client's handshake rate (429), a tunnel slot
/// for the resource and the client (503, 429). `client` is the client's IP; `ipv6_prefix`
/// says which IPv6 addresses count as one client; `draining` that the edge is draining.
pub fn admit(
    res: &Resource,
    limits: &Arc<ResourceLimits>,
    req: &RequestHeader,
    client: Option<IpAddr>,
    ipv6_prefix: u8,
    draining: bool,
) -> Result<Admitted, Answer> {
    let ws = &res.websocket;
    // A CONNECT that is not a WebSocket's has no path to check: the edge is not a proxy.
    if req.method == http::Method::CONNECT && !handshake::is_extended_connect(req) {
        return Err(Answer::MethodNotAllowed);
    }
    let path = check(res, req.uri.path())?.into_owned();
    handshake::check(req)?;
    let origin = req.headers.get(http::header::ORIGIN).map(|v| v.as_bytes());
    check_origin(res, origin)?;
    if draining {
        return Err(Answer::Draining);
    }
    let key = client.map(|ip| client_key(ip, ipv6_prefix));
    if let (Some(rate), Some(key)) = (ws.handshake_rate, key) {
        limits
            .rates()
            .try_take(key, rate)
            .map_err(|wait| Answer::RateLimited(wait.as_secs_f64().ceil() as u64))?;
    }
    let slot = Slot::reserve(
        limits,
        ws.max_connections,
        key.zip(ws.max_connections_per_ip),
    )
    .map_err(|full| match full {
        Full::Resource => Answer::OverCapacity,
        Full::Client => Answer::ClientOverCapacity,
    })?;
    Ok(Admitted { path, slot })
}

/// Whether `res` lets a WebSocket upgrade on the request path `path` (without query)
/// through. The decision is made on the path's normal form ([`crate::syntax::path::normalize`]),
/// which is returned: that is the path to send the origin, so that what was checked is
/// what is served.
pub fn check<'a>(res: &Resource, path: &'a str) -> Result<Cow<'a, str>, Answer> {
    if !res.websocket.enabled {
        return Err(Answer::WebSocketDisabled);
    }
    let path = crate::syntax::path::normalize(path).map_err(Answer::BadPath)?;
    if !res.path_allowed(&path) {
        return Err(Answer::PathNotAllowed);
    }
    Ok(path)
}

/// Whether the request's `Origin` may open a tunnel: any when the list is empty; a missing
/// `Origin` only if the list has `none` (non-browser clients send none; browsers always
/// do, which is what makes this a defence against cross-site WebSocket hijacking).
pub fn check_origin(res: &Resource, origin: Option<&[u8]>) -> Result<(), Answer> {
    let allowed = &res.websocket.allowed_origins;
    if allowed.is_empty() {
        return Ok(());
    }
    let ok = match origin {
        None => allowed.iter().any(|a| a == "none"),
        Some(o) => {
            let o = o.trim_ascii();
            allowed
                .iter()
                .any(|a| a != "none" && a.as_bytes().eq_ignore_ascii_case(o))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(Answer::OriginNotAllowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn resource(origins: &str) -> std::sync::Arc<Resource> {
        let yaml = format!(
            "listen: {{ http: [\"127.0.0.1:0\"] }}\nresources:\n  - name: r\n    hostnames: [a.b]\n    origin: {{ servers: [{{ address: \"127.0.0.1:1\" }}] }}\n    websocket: {{ allowed_origins: {origins} }}\n"
        );
        Config::from_yaml("t.yaml", &yaml).unwrap().resources[0].clone()
    }

    #[test]
    fn origins() {
        let strict = resource("[\"https://a.b\"]");
        assert_eq!(check_origin(&strict, Some(b"https://a.b")), Ok(()));
        assert_eq!(check_origin(&strict, Some(b"HTTPS://A.B")), Ok(()));
        assert_eq!(
            check_origin(&strict, Some(b"https://a.b.evil")),
            Err(Answer::OriginNotAllowed)
        );
        assert_eq!(
            check_origin(&strict, Some(b"none")),
            Err(Answer::OriginNotAllowed)
        );
        assert_eq!(check_origin(&strict, None), Err(Answer::OriginNotAllowed));
        let apps = resource("[\"none\"]");
        assert_eq!(check_origin(&apps, None), Ok(()));
        assert_eq!(
            check_origin(&apps, Some(b"https://a.b")),
            Err(Answer::OriginNotAllowed)
        );
        assert_eq!(check_origin(&resource("[]"), Some(b"https://x")), Ok(()));
    }
}
