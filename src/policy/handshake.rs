//! RFC 6455 §4.2.1 checks on an upgrade request. Pure functions over the request header:
//! no I/O, so they are unit-tested and fuzzable.

use super::answer::Answer;
use http::{header, HeaderMap, Method, Version};
use pingora::http::RequestHeader;

/// Whether the request asks for a protocol upgrade at all (any `Upgrade` header), which is
/// what makes Pingora tunnel it, so every such request goes through [`check`].
pub fn is_upgrade(req: &RequestHeader) -> bool {
    req.headers.contains_key(header::UPGRADE)
}

/// Checks an upgrade request against RFC 6455 §4.2.1. `Ok` means a well-formed WebSocket
/// opening handshake.
pub fn check(req: &RequestHeader) -> Result<(), Answer> {
    let h = &req.headers;
    // §4.1: "The method of the request MUST be GET, and the HTTP version MUST be at least
    // 1.1." HTTP/2 has no Upgrade (RFC 9113 §8.2.2); RFC 8441 is not supported.
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
    let has_body = h.contains_key(header::TRANSFER_ENCODING)
        || h.get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes() != b"0");
    if has_body {
        return Err(Answer::Malformed(
            "A WebSocket upgrade must not carry a body.\n",
        ));
    }
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
}
