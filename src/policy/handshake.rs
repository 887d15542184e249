//! RFC 6455 §4.2.1 checks on an upgrade request, and RFC 8441 §4–5 on a WebSocket over
//! HTTP/2 (an extended CONNECT). Pure functions over the request header: no I/O, so they
//! are unit-tested and fuzzable.

use super::answer::Answer;
use http::{header, HeaderMap, Method, Version};
use pingora::http::RequestHeader;

/// Whether the request asks to leave HTTP: any `Upgrade` header (what makes Pingora tunnel
/// an HTTP/1.1 request) or a CONNECT (on HTTP/2, an extended CONNECT is how a WebSocket
/// opens), so every such request goes through [`check`].
pub fn is_upgrade(req: &RequestHeader) -> bool {
    req.headers.contains_key(header::UPGRADE) || req.method == Method::CONNECT
}

/// Whether the request is an HTTP/2 extended CONNECT (RFC 8441: a `:protocol`).
pub fn is_extended_connect(req: &RequestHeader) -> bool {
    req.version == Version::HTTP_2 && req.method == Method::CONNECT && protocol(req).is_some()
}

/// The `:protocol` of an HTTP/2 request.
fn protocol(req: &RequestHeader) -> Option<&str> {
    req.extensions
        .get::<h2::ext::Protocol>()
        .map(|p| p.as_str())
}

/// Checks an upgrade request: an HTTP/1.1 one against RFC 6455 §4.2.1, an HTTP/2 one
/// against RFC 8441 §4–5 ([`check_h2`]). `Ok` means a well-formed WebSocket opening
/// handshake.
pub fn check(req: &RequestHeader) -> Result<(), Answer> {
    let h = &req.headers;
    if req.version == Version::HTTP_2 {
        return check_h2(req);
    }
    // The edge is not a forward proxy.
    if req.method == Method::CONNECT {
        return Err(Answer::MethodNotAllowed);
    }
    // §4.1: "The method of the request MUST be GET, and the HTTP version MUST be at least
    // 1.1." (HTTP/2 has no Upgrade, RFC 9113 §8.2.2: it has extended CONNECT.)
    if req.version != Version::HTTP_11 {
        return Err(Answer::Malformed("A WebSocket upgrade needs HTTP/1.1.\n"));
    }
    if req.method != Method::GET {
        return Err(Answer::Malformed(
            "A WebSocket upgrade must be a GET request.\n",
        ));
    }
    if !has_token(h, header::UPGRADE, "websocket") {
        return Err(Answer::Malformed(
            "Only WebSocket upgrades are supported (Upgrade: websocket).\n",
        ));
    }
    if !has_token(h, header::CONNECTION, "upgrade") {
        return Err(Answer::Malformed(
            "A WebSocket upgrade needs the Connection: Upgrade header.\n",
        ));
    }
    if !key_is_valid(h) {
        return Err(Answer::Malformed(
            "Sec-WebSocket-Key must be 16 bytes in base64.\n",
        ));
    }
    // A body on an upgrade would be read as tunnel bytes by one side and as a body by the
    // other: refuse it (request smuggling into the tunnel).
    if h.contains_key(header::TRANSFER_ENCODING) || has_length(h) {
        return Err(Answer::Malformed(
            "A WebSocket upgrade must not carry a body.\n",
        ));
    }
    origin_and_version(h)
}

/// RFC 8441 §4–5 on an HTTP/2 request that asks to leave HTTP: a CONNECT with `:protocol
/// websocket` (a plain CONNECT is a forward proxy's, 405), no length (its DATA is the
/// tunnel), and what RFC 6455 asks that still applies (one `Origin`, version 13). There is
/// no `Sec-WebSocket-Key`: one sent is not used.
pub fn check_h2(req: &RequestHeader) -> Result<(), Answer> {
    let h = &req.headers;
    if req.method != Method::CONNECT {
        return Err(Answer::Malformed(
            "Over HTTP/2, a WebSocket opens with an extended CONNECT (RFC 8441).\n",
        ));
    }
    match protocol(req) {
        None => return Err(Answer::MethodNotAllowed),
        Some(p) if !p.eq_ignore_ascii_case("websocket") => {
            return Err(Answer::Malformed(
                "Only WebSocket is tunnelled (:protocol websocket).\n",
            ))
        }
        Some(_) => {}
    }
    if has_length(h) {
        return Err(Answer::Malformed(
            "A WebSocket CONNECT must not carry a content-length.\n",
        ));
    }
    origin_and_version(h)
}

/// A `Content-Length` other than 0.
fn has_length(h: &HeaderMap) -> bool {
    h.get_all(header::CONTENT_LENGTH)
        .iter()
        .any(|v| v.as_bytes() != b"0")
}

/// At most one `Origin`, and `Sec-WebSocket-Version: 13`.
fn origin_and_version(h: &HeaderMap) -> Result<(), Answer> {
    // The allow-list is checked against one Origin; with two, the origin would get both and
    // might read the other one.
    if h.get_all(header::ORIGIN).iter().nth(1).is_some() {
        return Err(Answer::Malformed(
            "A WebSocket upgrade must carry at most one Origin header.\n",
        ));
    }
    let mut versions = h.get_all(header::SEC_WEBSOCKET_VERSION).iter();
    match (versions.next(), versions.next()) {
        (None, _) => Err(Answer::Malformed(
            "A WebSocket upgrade needs Sec-WebSocket-Version: 13.\n",
        )),
        (Some(v), None) if v.as_bytes().trim_ascii() == b"13" => Ok(()),
        // §4.2.2: a version the server does not speak gets 426 and the versions it does.
        _ => Err(Answer::UnsupportedVersion),
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
                check(&req(extra)).map_err(Answer::status),
                Err(400),
                "{extra:?}"
            );
        }
        let mut post = req(&[]);
        post.set_method(Method::POST);
        assert_eq!(check(&post).map_err(Answer::status), Err(400));
        let mut two_origins = req(&[("Origin", "https://a.b")]);
        two_origins.append_header("Origin", "https://c.d").unwrap();
        assert_eq!(check(&two_origins).map_err(Answer::status), Err(400));
        let mut two_keys = req(&[]);
        two_keys
            .append_header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
            .unwrap();
        assert_eq!(check(&two_keys).map_err(Answer::status), Err(400));
    }

    #[test]
    fn other_version_is_426() {
        assert_eq!(
            check(&req(&[("Sec-WebSocket-Version", "8")])),
            Err(Answer::UnsupportedVersion)
        );
        assert_eq!(
            check(&req(&[("Sec-WebSocket-Version", "13, 8")])),
            Err(Answer::UnsupportedVersion)
        );
    }

    fn h2(protocol: Option<&str>, extra: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("CONNECT", b"/ws", None).unwrap();
        r.set_version(Version::HTTP_2);
        if let Some(p) = protocol {
            r.extensions_mut().insert(h2::ext::Protocol::from(p));
        }
        if !extra
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-version"))
        {
            r.insert_header("sec-websocket-version", "13").unwrap();
        }
        for (k, v) in extra {
            if !v.is_empty() {
                r.append_header(k.to_string(), *v).unwrap();
            }
        }
        r
    }

    #[test]
    fn extended_connect_over_h2() {
        assert_eq!(check(&h2(Some("websocket"), &[])), Ok(()));
        assert_eq!(check(&h2(Some("WebSocket"), &[])), Ok(()));
        assert!(is_extended_connect(&h2(Some("websocket"), &[])));
        assert!(!is_extended_connect(&h2(None, &[])));
        // A key is not used over h2; one sent does not matter.
        assert_eq!(
            check(&h2(Some("websocket"), &[("sec-websocket-key", "x")])),
            Ok(())
        );
        // A plain CONNECT is a forward proxy's: 405, and over HTTP/1.1 too.
        assert_eq!(check(&h2(None, &[])), Err(Answer::MethodNotAllowed));
        let mut h1_connect = req(&[]);
        h1_connect.set_method(Method::CONNECT);
        assert_eq!(check(&h1_connect), Err(Answer::MethodNotAllowed));
        assert!(is_upgrade(&h2(None, &[])));
        for (protocol, extra) in [
            (Some("webtransport"), &[][..]),
            (Some(""), &[]),
            (Some("websocket"), &[("content-length", "5")]),
            (Some("websocket"), &[("sec-websocket-version", "")]),
            (
                Some("websocket"),
                &[("origin", "https://a.b"), ("origin", "https://c.d")],
            ),
        ] {
            assert_eq!(
                check(&h2(protocol, extra)).map_err(Answer::status),
                Err(400),
                "{protocol:?} {extra:?}"
            );
        }
        assert_eq!(
            check(&h2(Some("websocket"), &[("sec-websocket-version", "8")])),
            Err(Answer::UnsupportedVersion)
        );
        // An HTTP/2 GET is not a WebSocket opening.
        let mut get = h2(Some("websocket"), &[]);
        get.set_method(Method::GET);
        assert_eq!(check(&get).map_err(Answer::status), Err(400));
    }
}
