//! What the hooks read from and write to a Pingora session: who the client is (address,
//! IP, TLS, SNI), which Host it asked for, the edge's own answers, and the request as the
//! origin gets it.

use crate::config::Resource;
use crate::policy::answer::Answer;
use crate::sites::tls::Sni;
use crate::syntax::host::{strip_port, valid_host};
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use pingora::Result;
use std::net::IpAddr;

/// The Host a request is for (the Host header, else the `:authority` or absolute-form
/// target's authority), checked: exactly one Host header at most, agreeing with the
/// authority when both are there (RFC 9112 §3.2.2, RFC 9113 §8.3.1), and a valid host name
/// or address ([`valid_host`]). An HTTP/1.1 request without any gets an error (RFC 9112
/// §3.2); an HTTP/1.0 request without one is for the empty host (404).
pub fn checked_host(req: &RequestHeader) -> std::result::Result<&str, ()> {
    let mut hosts = req.headers.get_all(http::header::HOST).iter();
    let header = match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return Err(()),
        (Some(h), None) => Some(h.to_str().map_err(|_| ())?),
        (None, None) => None,
    };
    let authority = req.uri.authority().map(|a| a.as_str());
    let value = match (header, authority) {
        (Some(h), Some(a)) if !h.eq_ignore_ascii_case(a) => return Err(()),
        (Some(h), _) => h,
        (None, Some(a)) => a,
        (None, None) if req.version == http::Version::HTTP_10 => return Ok(""),
        (None, None) => return Err(()),
    };
    valid_host(value).ok_or(())
}

/// The client's Host (or HTTP/2 :authority), without port, as it came (for logs and SNI).
pub fn client_host(req: &RequestHeader) -> &str {
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    strip_port(host)
}

/// The SNI the client's TLS connection asked for, if any.
pub fn sni_of(session: &Session) -> Option<String> {
    let ssl = session.digest()?.ssl_digest.as_ref()?;
    ssl.extension.get::<Sni>().map(|s| s.0.clone())
}

/// The client's address, for logs.
pub fn client_addr(session: &Session) -> String {
    session
        .client_addr()
        .map(|a| a.to_string())
        .unwrap_or_default()
}

/// The client's IP address.
pub fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// Whether the client came over TLS.
pub fn client_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

/// Writes an answer of the edge's own: its status, headers and plain-text body. A client
/// that asked to leave HTTP on this connection (`close`) does not keep it for more.
pub async fn respond(session: &mut Session, answer: Answer, close: bool) -> Result<()> {
    let extra = answer.headers();
    let mut resp = ResponseHeader::build(answer.status(), Some(4 + extra.len()))?;
    resp.insert_header("Content-Type", "text/plain; charset=utf-8")?;
    resp.insert_header("Content-Length", answer.body().len().to_string())?;
    for (name, value) in extra {
        resp.insert_header(name, value)?;
    }
    if close {
        resp.insert_header("Connection", "close")?;
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from_static(answer.body().as_bytes())), true)
        .await
}

/// The request as the origin gets it: the Host rewritten if the resource says so, and the
/// usual proxy headers (the client's address and scheme).
pub fn origin_request(req: &mut RequestHeader, res: &Resource, session: &Session) -> Result<()> {
    if let Some(host) = &res.origin.host {
        req.insert_header(http::header::HOST, host.as_str())?;
    }
    if let Some(ip) = client_ip(session) {
        let xff = match req
            .headers
            .get("X-Forwarded-For")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip.to_string(),
        };
        req.insert_header("X-Forwarded-For", xff)?;
    }
    let proto = if client_tls(session) { "https" } else { "http" };
    req.insert_header("X-Forwarded-Proto", proto)?;
    Ok(())
}
