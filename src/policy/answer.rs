//! Every answer the edge makes itself instead of passing a request on: its status, its
//! short body for people (never an internal error string), its extra headers, and the
//! handshake outcome it is counted as. One vocabulary for the header guard, the hooks and
//! the tunnel's origin failures.

use crate::observe::labels::HandshakeOutcome;
use crate::syntax::path::PathError;

/// An answer of the edge's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 400: the upgrade request is not a valid WebSocket handshake, or the request header
    /// does not parse (the text says which).
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
    /// 503: the edge is draining (shutdown, upgrade, `POST /drain`).
    Draining,
    /// 400: `Content-Length` with `Transfer-Encoding`, or disagreeing lengths.
    AmbiguousFraming,
    /// 421: the Host belongs to another resource than the TLS connection.
    Misdirected,
    /// 431: the request header is larger than `client.max_header_bytes`.
    HeaderTooLarge,
    /// 400: the Host (or `:authority`) is missing, repeated or not a host name.
    BadHost,
    /// 400: the path of an upgrade cannot be normalised safely.
    BadPath(PathError),
    /// 429: the client IP has `max_connections_per_ip` tunnels of the resource open.
    ClientOverCapacity,
    /// 405: a method the edge does not proxy (CONNECT).
    MethodNotAllowed,
    /// 502: no server of the origin group could be reached.
    OriginUnreachable,
    /// 502: the origin answered 101 without switching to WebSocket.
    OriginInvalid,
    /// 504: the origin did not answer the upgrade within `handshake_timeout`.
    OriginTimeout,
}

/// The least `Retry-After` of a 503 (and of a 429 for `max_connections_per_ip`), seconds.
pub const RETRY_AFTER: u64 = 5;

/// A `Retry-After` drawn uniformly from `base` to `2 × base` seconds.
pub fn jitter(base: u64) -> u64 {
    use rand::Rng;
    rand::thread_rng().gen_range(base..=base.saturating_mul(2))
}

impl Answer {
    /// The HTTP status.
    pub fn status(self) -> u16 {
        match self {
            Answer::Malformed(_)
            | Answer::AmbiguousFraming
            | Answer::BadHost
            | Answer::BadPath(_) => 400,
            Answer::WebSocketDisabled | Answer::PathNotAllowed | Answer::OriginNotAllowed => 403,
            Answer::UnknownHost => 404,
            Answer::MethodNotAllowed => 405,
            Answer::Misdirected => 421,
            Answer::UnsupportedVersion => 426,
            Answer::RateLimited(_) | Answer::ClientOverCapacity => 429,
            Answer::HeaderTooLarge => 431,
            Answer::OriginUnreachable | Answer::OriginInvalid => 502,
            Answer::OverCapacity | Answer::Draining => 503,
            Answer::OriginTimeout => 504,
        }
    }

    /// A short text for people; never an internal error string.
    pub fn body(self) -> &'static str {
        match self {
            Answer::Malformed(why) => why,
            Answer::UnsupportedVersion => {
                "Unsupported WebSocket version: this edge speaks version 13.\n"
            }
            Answer::WebSocketDisabled => "WebSocket is not enabled for this site.\n",
            Answer::PathNotAllowed => "WebSocket is not allowed on this path.\n",
            Answer::UnknownHost => "No site is configured for this host name.\n",
            Answer::HeaderTooLarge => "The request header is too large.\n",
            Answer::Misdirected => {
                "This connection was made for another site; connect again for this host name.\n"
            }
            Answer::AmbiguousFraming => {
                "The request has conflicting Content-Length and Transfer-Encoding.\n"
            }
            Answer::OriginNotAllowed => "WebSocket connections from this origin are not allowed.\n",
            Answer::RateLimited(_) => {
                "Too many WebSocket connections from this address; retry later.\n"
            }
            Answer::OverCapacity => {
                "This site has too many open WebSocket connections; retry later.\n"
            }
            Answer::Draining => "This edge is going out of service; retry later.\n",
            Answer::BadHost => "The Host header is missing or is not a valid host name.\n",
            Answer::BadPath(e) => e.body(),
            Answer::ClientOverCapacity => {
                "Too many open WebSocket connections from this address; retry later.\n"
            }
            Answer::MethodNotAllowed => "This method is not allowed here.\n",
            Answer::OriginUnreachable => "The origin could not be reached.\n",
            Answer::OriginInvalid => "The origin gave an invalid answer.\n",
            Answer::OriginTimeout => "The origin did not answer in time.\n",
        }
    }

    /// Headers the answer carries besides its body's.
    pub fn headers(self) -> Vec<(&'static str, String)> {
        match self {
            // RFC 6455 §4.2.2: a version mismatch tells the client which version to use.
            Answer::UnsupportedVersion => vec![
                ("Sec-WebSocket-Version", "13".into()),
                ("Upgrade", "websocket".into()),
            ],
            // Every Retry-After is drawn with jitter, so that clients refused together do
            // not all come back in the same second: from the wait the bucket needs to
            // twice that; a few seconds (5 to 10) where tunnels end at their own pace or
            // the edge goes out of service.
            Answer::RateLimited(secs) => vec![("Retry-After", jitter(secs.max(1)).to_string())],
            Answer::OverCapacity | Answer::ClientOverCapacity | Answer::Draining => {
                vec![("Retry-After", jitter(RETRY_AFTER).to_string())]
            }
            _ => Vec::new(),
        }
    }

    /// How an upgrade request answered this is counted.
    pub fn outcome(self) -> HandshakeOutcome {
        match self {
            Answer::Malformed(_) | Answer::AmbiguousFraming => HandshakeOutcome::Malformed,
            Answer::UnsupportedVersion => HandshakeOutcome::BadVersion,
            Answer::WebSocketDisabled => HandshakeOutcome::Disabled,
            Answer::PathNotAllowed => HandshakeOutcome::PathNotAllowed,
            Answer::UnknownHost => HandshakeOutcome::UnknownHost,
            Answer::OriginNotAllowed => HandshakeOutcome::OriginNotAllowed,
            Answer::Misdirected => HandshakeOutcome::Misdirected,
            Answer::HeaderTooLarge => HandshakeOutcome::HeaderTooLarge,
            Answer::RateLimited(_) => HandshakeOutcome::RateLimited,
            Answer::OverCapacity => HandshakeOutcome::OverCapacity,
            Answer::BadHost => HandshakeOutcome::BadHost,
            Answer::BadPath(_) => HandshakeOutcome::BadPath,
            Answer::ClientOverCapacity => HandshakeOutcome::ClientOverCapacity,
            Answer::Draining => HandshakeOutcome::Draining,
            Answer::MethodNotAllowed => HandshakeOutcome::MethodNotAllowed,
            Answer::OriginUnreachable => HandshakeOutcome::OriginUnreachable,
            Answer::OriginInvalid => HandshakeOutcome::OriginInvalid,
            Answer::OriginTimeout => HandshakeOutcome::OriginTimeout,
        }
    }

    /// The whole answer as bytes, for the header guard, which answers before Pingora has a
    /// session: status, headers, a plain-text body, `Connection: close`.
    pub fn raw_response(self) -> Vec<u8> {
        let status =
            http::StatusCode::from_u16(self.status()).unwrap_or(http::StatusCode::BAD_REQUEST);
        let body = self.body();
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        );
        for (name, value) in self.headers() {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        head.push_str(body);
        head.into_bytes()
    }
}
