//! A WebSocket that came as an HTTP/2 extended CONNECT (RFC 8441) goes to its origin as the
//! HTTP/1.1 upgrade every origin speaks: [`upgrade_request`] turns the one into the other
//! with a key of the edge's own, [`accepts`] checks the origin's answer to that key, and
//! [`answer`] is the `200` the client gets for the origin's `101`.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use http::{header, HeaderName, Method, Version};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::Result;

/// RFC 6455 §1.3: appended to the key before hashing.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Turns the client's extended CONNECT into an HTTP/1.1 upgrade request (in place) and
/// returns the `Sec-WebSocket-Key` the edge made for it: GET, HTTP/1.1, `Host` from the
/// `:authority` (when there is no `host` field), `Upgrade: websocket`, `Connection:
/// Upgrade`, the client's `cookie` fields joined into one (RFC 9113 §8.2.3), any key the
/// client sent replaced. Subprotocol, extensions, version, `Origin` and the other fields go
/// as they came. The target is left to the caller (the gate's normal form).
pub fn upgrade_request(req: &mut RequestHeader) -> Result<String> {
    let authority = req.uri.authority().map(|a| a.as_str().to_string());
    req.set_method(Method::GET);
    req.set_version(Version::HTTP_11);
    req.extensions_mut().remove::<h2::ext::Protocol>();
    if let (false, Some(authority)) = (req.headers.contains_key(header::HOST), authority) {
        req.insert_header(header::HOST, authority)?;
    }
    let cookies: Vec<&[u8]> = req
        .headers
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    if cookies.len() > 1 {
        let joined = cookies.join(&b"; "[..]);
        req.insert_header(header::COOKIE, joined)?;
    }
    // An HTTP/2 request may say `te: trailers`; HTTP/1.1 would read it as hop-by-hop
    // anyway. A zero length (all the gate lets through) means nothing on a GET.
    for name in [header::TE, header::CONTENT_LENGTH] {
        req.remove_header(&name);
    }
    let key = BASE64.encode(rand::random::<[u8; 16]>());
    req.insert_header(header::UPGRADE, "websocket")?;
    req.insert_header(header::CONNECTION, "Upgrade")?;
    req.insert_header(header::SEC_WEBSOCKET_KEY, key.as_str())?;
    Ok(key)
}

/// The `Sec-WebSocket-Accept` that answers `key` (RFC 6455 §4.2.2).
pub fn accept_for(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(GUID.as_bytes());
    BASE64.encode(ctx.finish())
}

/// Whether the origin's `101` answers the edge's `key`: exactly one `Sec-WebSocket-Accept`,
/// the right one. (For an HTTP/1.1 client the client checks it; here the edge made the key.)
pub fn accepts(resp: &ResponseHeader, key: &str) -> bool {
    let mut accepts = resp.headers.get_all(header::SEC_WEBSOCKET_ACCEPT).iter();
    match (accepts.next(), accepts.next()) {
        (Some(v), None) => v.as_bytes().trim_ascii() == accept_for(key).as_bytes(),
        _ => false,
    }
}

/// The client's `200` for the origin's `101`: the origin's fields but those of the HTTP/1.1
/// handshake and its connection (`Sec-WebSocket-Accept`, `Upgrade`, `Connection` and the
/// other hop-by-hop fields, any length), so `sec-websocket-protocol`,
/// `sec-websocket-extensions` and the rest (a `set-cookie`) reach the client.
pub fn answer(resp: &ResponseHeader) -> Result<Box<ResponseHeader>> {
    let mut ok = ResponseHeader::build(200, Some(resp.headers.len()))?;
    let dropped = [
        header::SEC_WEBSOCKET_ACCEPT,
        header::UPGRADE,
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::CONTENT_LENGTH,
        header::TE,
        header::TRAILER,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ];
    // Fields the origin's Connection header names are hop-by-hop too.
    let named: Vec<String> = resp
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .collect();
    for (name, value) in resp.headers.iter() {
        if dropped.contains(name) || named.iter().any(|n| n == name.as_str()) {
            continue;
        }
        ok.append_header(name.clone(), value.clone())?;
    }
    Ok(Box::new(ok))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rfc_example_key_is_accepted() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let mut resp = ResponseHeader::build(101, None).unwrap();
        assert!(!accepts(&resp, "dGhlIHNhbXBsZSBub25jZQ=="), "no accept");
        resp.insert_header("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            .unwrap();
        assert!(accepts(&resp, "dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!accepts(&resp, "AAAAAAAAAAAAAAAAAAAAAA=="), "another key");
        resp.append_header("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            .unwrap();
        assert!(!accepts(&resp, "dGhlIHNhbXBsZSBub25jZQ=="), "two accepts");
    }

    #[test]
    fn an_extended_connect_becomes_an_upgrade() {
        let mut req = RequestHeader::build("CONNECT", b"/chat?room=1", None).unwrap();
        req.set_version(Version::HTTP_2);
        req.set_uri("https://a.test:8443/chat?room=1".parse().unwrap());
        req.extensions_mut()
            .insert(h2::ext::Protocol::from("websocket"));
        for (k, v) in [
            ("sec-websocket-version", "13"),
            ("sec-websocket-protocol", "chat, superchat"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("te", "trailers"),
        ] {
            req.append_header(k, v).unwrap();
        }
        let key = upgrade_request(&mut req).unwrap();
        assert_eq!(req.method, Method::GET);
        assert_eq!(req.version, Version::HTTP_11);
        assert_eq!(req.headers["host"], "a.test:8443");
        assert_eq!(req.headers["upgrade"], "websocket");
        assert_eq!(req.headers["connection"], "Upgrade");
        assert_eq!(req.headers["cookie"], "a=1; b=2");
        assert_eq!(req.headers["sec-websocket-protocol"], "chat, superchat");
        assert!(!req.headers.contains_key("te"));
        assert_eq!(req.headers.get_all("sec-websocket-key").iter().count(), 1);
        assert_eq!(req.headers["sec-websocket-key"], key.as_str());
        assert_ne!(
            key, "dGhlIHNhbXBsZSBub25jZQ==",
            "the client's key is not used"
        );
        assert_eq!(BASE64.decode(&key).unwrap().len(), 16);
        assert!(req.extensions.get::<h2::ext::Protocol>().is_none());
        // A Host the client sent stays.
        let mut with_host = RequestHeader::build("CONNECT", b"/", None).unwrap();
        with_host.insert_header("host", "b.test").unwrap();
        upgrade_request(&mut with_host).unwrap();
        assert_eq!(with_host.headers["host"], "b.test");
    }

    #[test]
    fn the_answer_keeps_the_origins_fields_but_the_handshakes() {
        let mut resp = ResponseHeader::build(101, None).unwrap();
        for (k, v) in [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade, X-Hop"),
            ("X-Hop", "1"),
            ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            ("Sec-WebSocket-Protocol", "chat"),
            ("Sec-WebSocket-Extensions", "permessage-deflate"),
            ("Set-Cookie", "s=1"),
            ("Content-Length", "0"),
        ] {
            resp.append_header(k, v).unwrap();
        }
        let ok = answer(&resp).unwrap();
        assert_eq!(ok.status, 200);
        let names: Vec<&str> = ok.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "sec-websocket-protocol",
                "sec-websocket-extensions",
                "set-cookie"
            ]
        );
    }
}
