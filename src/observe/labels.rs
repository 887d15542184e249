//! The vocabulary of metrics and logs: why a tunnel ended and what became of an upgrade
//! request, as enums with their labels. Each list is `ALL`, so metrics can be made ahead
//! and the documentation checked against it.

/// Why a tunnel ended (docs/design.md, "Close reasons").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client ended the connection.
    ClientClosed,
    /// The origin ended the connection.
    OriginClosed,
    /// No data either way for the resource's `idle_timeout`.
    IdleTimeout,
    /// A read or write failed.
    Error,
    /// The process shut down (or the task was dropped) with the tunnel still open.
    Shutdown,
    /// The tunnel reached the resource's `max_lifetime`.
    MaxLifetime,
    /// The client answered no heartbeat Ping in time.
    HeartbeatTimeout,
    /// The origin answered no heartbeat Ping in time (`heartbeat.origin`).
    OriginHeartbeatTimeout,
    /// A data message over `max_message_size`, from either side.
    MessageTooBig,
    /// The client sent messages over `message_rate`.
    MessageRate,
    /// Under message limits, a side sent bytes that are not WebSocket frames.
    ProtocolError,
}

impl CloseReason {
    /// Every reason, in the order of their discriminants.
    pub const ALL: [CloseReason; 11] = [
        CloseReason::ClientClosed,
        CloseReason::OriginClosed,
        CloseReason::IdleTimeout,
        CloseReason::Error,
        CloseReason::Shutdown,
        CloseReason::MaxLifetime,
        CloseReason::HeartbeatTimeout,
        CloseReason::OriginHeartbeatTimeout,
        CloseReason::MessageTooBig,
        CloseReason::MessageRate,
        CloseReason::ProtocolError,
    ];

    /// Whether the edge itself decided the end (a timer or a limit), rather than a side.
    pub fn by_edge(self) -> bool {
        !matches!(
            self,
            CloseReason::ClientClosed | CloseReason::OriginClosed | CloseReason::Error
        )
    }

    /// The label in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::OriginClosed => "origin_closed",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Error => "error",
            CloseReason::Shutdown => "shutdown",
            CloseReason::MaxLifetime => "max_lifetime",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::OriginHeartbeatTimeout => "origin_heartbeat_timeout",
            CloseReason::MessageTooBig => "message_too_big",
            CloseReason::MessageRate => "message_rate",
            CloseReason::ProtocolError => "protocol_error",
        }
    }
}

/// What became of one heartbeat: `wsedge_ws_heartbeats_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatResult {
    /// The edge's Ping went out.
    Sent,
    /// Its Pong came back.
    Answered,
    /// No Pong, nor any other byte, in time: the tunnel ended.
    Timeout,
}

impl HeartbeatResult {
    /// Every result.
    pub const ALL: [HeartbeatResult; 3] = [
        HeartbeatResult::Sent,
        HeartbeatResult::Answered,
        HeartbeatResult::Timeout,
    ];

    /// The label in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            HeartbeatResult::Sent => "sent",
            HeartbeatResult::Answered => "answered",
            HeartbeatResult::Timeout => "timeout",
        }
    }
}

/// What became of an upgrade request: `wsedge_ws_handshakes_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeOutcome {
    /// The 101 went out: a tunnel opened.
    Ok,
    /// Not a well-formed WebSocket handshake (400).
    Malformed,
    /// A `Sec-WebSocket-Version` other than 13 (426).
    BadVersion,
    /// WebSocket is off for the resource (403).
    Disabled,
    /// The path is not among the resource's `paths` (403).
    PathNotAllowed,
    /// The path cannot be normalised safely (400).
    BadPath,
    /// No resource serves the Host (404).
    UnknownHost,
    /// The Host is not a host name (400).
    BadHost,
    /// The `Origin` is not allowed (403).
    OriginNotAllowed,
    /// The Host belongs to another resource than the TLS connection (421).
    Misdirected,
    /// The request header is too large (431).
    HeaderTooLarge,
    /// The client is over `handshake_rate` (429).
    RateLimited,
    /// The resource is at `max_connections` (503).
    OverCapacity,
    /// The client is at `max_connections_per_ip` (429).
    ClientOverCapacity,
    /// The edge is draining (503).
    Draining,
    /// A method the edge does not proxy (405).
    MethodNotAllowed,
    /// No server of the origin group could be reached (502).
    OriginUnreachable,
    /// The origin did not answer in time (504).
    OriginTimeout,
    /// The origin answered with something other than 101, passed on.
    OriginRefused,
    /// The origin's 101 was not a WebSocket answer (502).
    OriginInvalid,
}

impl HandshakeOutcome {
    /// Every outcome.
    pub const ALL: [HandshakeOutcome; 20] = [
        HandshakeOutcome::Ok,
        HandshakeOutcome::Malformed,
        HandshakeOutcome::BadVersion,
        HandshakeOutcome::Disabled,
        HandshakeOutcome::PathNotAllowed,
        HandshakeOutcome::BadPath,
        HandshakeOutcome::UnknownHost,
        HandshakeOutcome::BadHost,
        HandshakeOutcome::OriginNotAllowed,
        HandshakeOutcome::Misdirected,
        HandshakeOutcome::HeaderTooLarge,
        HandshakeOutcome::RateLimited,
        HandshakeOutcome::OverCapacity,
        HandshakeOutcome::ClientOverCapacity,
        HandshakeOutcome::Draining,
        HandshakeOutcome::MethodNotAllowed,
        HandshakeOutcome::OriginUnreachable,
        HandshakeOutcome::OriginTimeout,
        HandshakeOutcome::OriginRefused,
        HandshakeOutcome::OriginInvalid,
    ];

    /// The label in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeOutcome::Ok => "ok",
            HandshakeOutcome::Malformed => "malformed",
            HandshakeOutcome::BadVersion => "bad_version",
            HandshakeOutcome::Disabled => "disabled",
            HandshakeOutcome::PathNotAllowed => "path_not_allowed",
            HandshakeOutcome::BadPath => "bad_path",
            HandshakeOutcome::UnknownHost => "unknown_host",
            HandshakeOutcome::BadHost => "bad_host",
            HandshakeOutcome::OriginNotAllowed => "origin_not_allowed",
            HandshakeOutcome::Misdirected => "misdirected",
            HandshakeOutcome::HeaderTooLarge => "header_too_large",
            HandshakeOutcome::RateLimited => "rate_limited",
            HandshakeOutcome::OverCapacity => "over_capacity",
            HandshakeOutcome::ClientOverCapacity => "client_over_capacity",
            HandshakeOutcome::Draining => "draining",
            HandshakeOutcome::MethodNotAllowed => "method_not_allowed",
            HandshakeOutcome::OriginUnreachable => "origin_unreachable",
            HandshakeOutcome::OriginTimeout => "origin_timeout",
            HandshakeOutcome::OriginRefused => "origin_refused",
            HandshakeOutcome::OriginInvalid => "origin_invalid",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's metric tables list every label the code emits, and no other.
    #[test]
    fn the_readme_lists_every_label() {
        let readme = include_str!("../../README.md");
        let row = |metric: &str| {
            readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{metric}`")))
                .unwrap_or_else(|| panic!("no README row for {metric}"))
                .to_string()
        };
        let handshakes = row("wsedge_ws_handshakes_total");
        for o in HandshakeOutcome::ALL {
            assert!(handshakes.contains(&format!("`{}`", o.as_str())), "{o:?}");
        }
        let beats = row("wsedge_ws_heartbeats_total");
        for r in HeartbeatResult::ALL {
            assert!(beats.contains(&format!("`{}`", r.as_str())), "{r:?}");
        }
        let closes = row("wsedge_ws_closed_total");
        for r in CloseReason::ALL {
            assert!(closes.contains(&format!("`{}`", r.as_str())), "{r:?}");
        }
    }
}
