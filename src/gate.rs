//! Per-resource WebSocket policy: is an upgrade allowed here at all?

use crate::config::Resource;
use crate::handshake::Reject;
use std::borrow::Cow;

/// Whether `res` lets a WebSocket upgrade on the request path `path` (without query)
/// through. The decision is made on the path's normal form ([`crate::path::normalize`]),
/// which is returned: that is the path to send the origin, so that what was checked is
/// what is served.
pub fn check<'a>(res: &Resource, path: &'a str) -> Result<Cow<'a, str>, Reject> {
    if !res.websocket.enabled {
        return Err(Reject::WebSocketDisabled);
    }
    let path = crate::path::normalize(path).map_err(Reject::BadPath)?;
    if !res.path_allowed(&path) {
        return Err(Reject::PathNotAllowed);
    }
    Ok(path)
}

/// Whether the request's `Origin` may open a tunnel: any when the list is empty; a missing
/// `Origin` only if the list has `none` (non-browser clients send none; browsers always
/// do, which is what makes this a defence against cross-site WebSocket hijacking).
pub fn check_origin(res: &Resource, origin: Option<&[u8]>) -> Result<(), Reject> {
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
        Err(Reject::OriginNotAllowed)
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
            Err(Reject::OriginNotAllowed)
        );
        assert_eq!(
            check_origin(&strict, Some(b"none")),
            Err(Reject::OriginNotAllowed)
        );
        assert_eq!(check_origin(&strict, None), Err(Reject::OriginNotAllowed));
        let apps = resource("[\"none\"]");
        assert_eq!(check_origin(&apps, None), Ok(()));
        assert_eq!(
            check_origin(&apps, Some(b"https://a.b")),
            Err(Reject::OriginNotAllowed)
        );
        assert_eq!(check_origin(&resource("[]"), Some(b"https://x")), Ok(()));
    }
}
