//! RFC 6455 §4.2.1 checks on an upgrade request. Pure functions over the request header:
//! no I/O, so they are unit-tested and fuzzable.

use http::{header, HeaderMap, Method, Version};
use pingora::http::RequestHeader;

/// Why the edge answers a request itself instead of passing it on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// 400: the upgrade request is not a valid WebSocket handshake.
    Malformed(&'static str),
    /// 426: a `Sec-WebSocket-Version` other than 13.
    UnsupportedVersion,
    /// 403: WebSocket is off for the resource.
    WebSocketDisabled,
    /// 403: the path is not among the resource's `websocket.paths`.
    PathNotAllowed,
    /// 404: no resource serves the Host.
    UnknownHost,
    /// 403: the `Origin` is not in `allowed_origins`.
    OriginNotAllowed,
    /// 429: the client IP is over `handshake_rate`; retry after this many seconds.
    RateLimited(u64),
    /// 503: the resource has `max_connections` tunnels open.
    OverCapacity,
    /// 400: `Content-Length` with `Transfer-Encoding`, or disagreeing lengths (answered by
    /// the connection guard from the raw header: Pingora drops the length before any hook).
    AmbiguousFraming,
    /// 421: the Host belongs to another resource than the TLS connection's SNI.
    Misdirected,
    /// 431: the request header is larger than `client.max_header_bytes`.
    HeaderTooLarge,
    /// 400: the Host (or `:authority`) is missing, repeated or not a host name.
    BadHost,
    /// 400: the path of an upgrade cannot be normalised safely.
    BadPath(crate::path::PathError),
    /// 429: the client IP has `max_connections_per_ip` tunnels of the resource open.
    ClientOverCapacity,
    /// 405: a method the edge does not proxy (CONNECT).
    MethodNotAllowed,
}

impl Reject {
    /// The HTTP status of the answer.
    pub fn status(self) -> u16 {
        match self {
            Reject::Malformed(_)
            | Reject::AmbiguousFraming
            | Reject::BadHost
            | Reject::BadPath(_) => 400,
            Reject::MethodNotAllowed => 405,
            Reject::UnsupportedVersion => 426,
            Reject::WebSocketDisabled | Reject::PathNotAllowed | Reject::OriginNotAllowed => 403,
            Reject::UnknownHost => 404,
            Reject::RateLimited(_) | Reject::ClientOverCapacity => 429,
            Reject::Misdirected => 421,
            Reject::HeaderTooLarge => 431,
            Reject::OverCapacity => 503,
        }
    }

    /// A short text for people; never an internal error string.
    pub fn body(self) -> &'static str {
        match self {
            Reject::Malformed(why) => why,
            Reject::UnsupportedVersion => {
                "Unsupported WebSocket version: this edge speaks version 13.\n"
            }
            Reject::WebSocketDisabled => "WebSocket is not enabled for this site.\n",
            Reject::PathNotAllowed => "WebSocket is not allowed on this path.\n",
            Reject::UnknownHost => "No site is configured for this host name.\n",
            Reject::HeaderTooLarge => "The request header is too large.\n",
            Reject::Misdirected => {
                "This connection was made for another site; connect again for this host name.\n"
            }
            Reject::AmbiguousFraming => {
                "The request has conflicting Content-Length and Transfer-Encoding.\n"
            }
            Reject::OriginNotAllowed => "WebSocket connections from this origin are not allowed.\n",
            Reject::RateLimited(_) => {
                "Too many WebSocket connections from this address; retry later.\n"
            }
            Reject::OverCapacity => {
                "This site has too many open WebSocket connections; retry later.\n"
            }
            Reject::BadHost => "The Host header is missing or is not a valid host name.\n",
            Reject::BadPath(e) => e.body(),
            Reject::ClientOverCapacity => {
                "Too many open WebSocket connections from this address; retry later.\n"
            }
            Reject::MethodNotAllowed => "This method is not allowed here.\n",
        }
    }

    /// The label of this outcome in metrics and logs.
    pub fn outcome(self) -> &'static str {
        match self {
            Reject::Malformed(_) => "malformed",
            Reject::UnsupportedVersion => "bad_version",
            Reject::WebSocketDisabled => "disabled",
            Reject::PathNotAllowed => "path_not_allowed",
            Reject::UnknownHost => "unknown_host",
            Reject::OriginNotAllowed => "origin_not_allowed",
            Reject::AmbiguousFraming => "malformed",
            Reject::Misdirected => "misdirected",
            Reject::HeaderTooLarge => "header_too_large",
            Reject::RateLimited(_) => "rate_limited",
            Reject::OverCapacity => "over_capacity",
            Reject::BadHost => "bad_host",
            Reject::BadPath(_) => "bad_path",
            Reject::ClientOverCapacity => "client_over_capacity",
            Reject::MethodNotAllowed => "method_not_allowed",
        }
    }
}

impl Reject {
    /// The whole answer as bytes, for the connection guard that answers before Pingora
    /// has a session: status, a plain-text body, `Connection: close`.
    pub fn raw_response(self) -> Vec<u8> {
        let status =
            http::StatusCode::from_u16(self.status()).unwrap_or(http::StatusCode::BAD_REQUEST);
        let body = self.body();
        format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes()
    }
}

/// Whether the request asks for a protocol upgrade at all (any `Upgrade` header), which is
/// what makes Pingora tunnel it, so every such request goes through [`check`].
pub fn is_upgrade(req: &RequestHeader) -> bool {
    req.headers.contains_key(header::UPGRADE)
}

/// Checks an upgrade request against RFC 6455 §4.2.1. `Ok` means a well-formed WebSocket
/// opening handshake.
pub fn check(req: &RequestHeader) -> Result<(), Reject> {
    let h = &req.headers;
    // §4.1: "The method of the request MUST be GET, and the HTTP version MUST be at least
    // 1.1." HTTP/2 has no Upgrade (RFC 9113 §8.2.2); RFC 8441 is not supported.
    if req.version != Version::HTTP_11 {
        return Err(Reject::Malformed("A WebSocket upgrade needs HTTP/1.1.\n"));
    }
    if req.method != Method::GET {
        return Err(Reject::Malformed(
            "A WebSocket upgrade must be a GET request.\n",
        ));
    }
    if !has_token(h, header::UPGRADE, "websocket") {
        return Err(Reject::Malformed(
            "Only WebSocket upgrades are supported (Upgrade: websocket).\n",
        ));
    }
    if !has_token(h, header::CONNECTION, "upgrade") {
        return Err(Reject::Malformed(
            "A WebSocket upgrade needs the Connection: Upgrade header.\n",
        ));
    }
    if !key_is_valid(h) {
        return Err(Reject::Malformed(
            "Sec-WebSocket-Key must be 16 bytes in base64.\n",
        ));
    }
    // A body on an upgrade would be read as tunnel bytes by one side and as a body by the
    // other: refuse it (request smuggling into the tunnel).
    let has_body = h.contains_key(header::TRANSFER_ENCODING)
        || h.get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes() != b"0");
    if has_body {
        return Err(Reject::Malformed(
            "A WebSocket upgrade must not carry a body.\n",
        ));
    }
    // The allow-list is checked against one Origin; with two, the origin would get both and
    // might read the other one.
    if h.get_all(header::ORIGIN).iter().nth(1).is_some() {
        return Err(Reject::Malformed(
            "A WebSocket upgrade must carry at most one Origin header.\n",
        ));
    }
    let mut versions = h.get_all(header::SEC_WEBSOCKET_VERSION).iter();
    match (versions.next(), versions.next()) {
        (None, _) => Err(Reject::Malformed(
            "A WebSocket upgrade needs Sec-WebSocket-Version: 13.\n",
        )),
        (Some(v), None) if v.as_bytes().trim_ascii() == b"13" => Ok(()),
        // §4.2.2: a version the server does not speak gets 426 and the versions it does.
        _ => Err(Reject::UnsupportedVersion),
    }
}

/// Whether a comma-separated header (all its lines) holds `token`, case-insensitively.
pub(crate) fn has_token(h: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// §4.1: "a base64-encoded value that, when decoded, is 16 bytes in length", so exactly 24
/// characters: 22 of the alphabet, then `==`. Exactly one such header.
fn key_is_valid(h: &HeaderMap) -> bool {
    let mut keys = h.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let (Some(key), None) = (keys.next(), keys.next()) else {
        return false;
    };
    let k = key.as_bytes().trim_ascii();
    let alphabet = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    // Lenient like common decoders: the unused low bits of the 22nd character are not
    // checked.
    k.len() == 24 && k[..22].iter().all(alphabet) && &k[22..] == b"=="
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(extra: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/ws", None).unwrap();
        for (k, v) in [
            ("Host", "chat.example.com"),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ] {
            if !extra.iter().any(|(n, _)| n.eq_ignore_ascii_case(k)) {
                r.insert_header(k, v).unwrap();
            }
        }
        for (k, v) in extra {
            if !v.is_empty() {
                r.append_header(k.to_string(), *v).unwrap();
            }
        }
        r
    }

    #[test]
    fn rfc_example_is_valid() {
        assert_eq!(check(&req(&[])), Ok(()));
        assert_eq!(
            check(&req(&[("Connection", "keep-alive, Upgrade")])),
            Ok(())
        );
        assert_eq!(check(&req(&[("Upgrade", "WebSocket")])), Ok(()));
    }

    #[test]
    fn malformed_is_400() {
        for extra in [
            &[("Connection", "keep-alive")][..],
            &[("Connection", "")],
            &[("Upgrade", "h2c")],
            &[("Sec-WebSocket-Key", "")],
            &[("Sec-WebSocket-Key", "short")],
            &[("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZ===")],
            &[("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=")],
            &[("Sec-WebSocket-Version", "")],
            &[("Content-Length", "5")],
            &[("Transfer-Encoding", "chunked")],
        ] {
            assert_eq!(
                check(&req(extra)).map_err(Reject::status),
                Err(400),
                "{extra:?}"
            );
        }
        let mut post = req(&[]);
        post.set_method(Method::POST);
        assert_eq!(check(&post).map_err(Reject::status), Err(400));
        let mut two_origins = req(&[("Origin", "https://a.b")]);
        two_origins.append_header("Origin", "https://c.d").unwrap();
        assert_eq!(check(&two_origins).map_err(Reject::status), Err(400));
        let mut two_keys = req(&[]);
        two_keys
            .append_header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
            .unwrap();
        assert_eq!(check(&two_keys).map_err(Reject::status), Err(400));
    }

    #[test]
    fn other_version_is_426() {
        assert_eq!(
            check(&req(&[("Sec-WebSocket-Version", "8")])),
            Err(Reject::UnsupportedVersion)
        );
        assert_eq!(
            check(&req(&[("Sec-WebSocket-Version", "13, 8")])),
            Err(Reject::UnsupportedVersion)
        );
    }
}
