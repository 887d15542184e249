//! What the edge says when a tunnel ends: who gets a Close frame, with which code (RFC 6455
//! §7.4, and 1014 from the IANA registry), and who is cut without one. The table in the
//! README, "What the edge says on a tunnel", is this function.

use super::frames::{Say, Violation};
use crate::observe::labels::CloseReason;

/// A side of a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client.
    Client,
    /// The origin.
    Origin,
}

/// Why a tunnel ends, as the relay found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// No data either way for `idle_timeout`.
    IdleTimeout,
    /// The tunnel reached `max_lifetime`.
    MaxLifetime,
    /// The side answered no heartbeat Ping in time.
    Heartbeat(Side),
    /// The side's connection ended (FIN), or failed (`error`: a reset), without a Close
    /// frame from it.
    Ended {
        /// Which side.
        side: Side,
        /// Failed rather than ended.
        error: bool,
    },
    /// A write to the side failed.
    WriteFailed(Side),
    /// The side took nothing for `idle_timeout`.
    Stalled(Side),
    /// The side broke a limit.
    Broke(Side, Violation),
    /// The edge is draining: both sides are told to go, with this code and reason.
    Drain(u16, Say),
    /// Nothing for the edge to say: the closing handshake passed, or a side ended after
    /// its Close frame.
    Done(CloseReason),
}

/// A Close frame the edge owes a side.
pub type Owed = Option<(u16, Say)>;

/// What the edge does when a tunnel ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The tunnel's close reason.
    pub reason: CloseReason,
    /// The client's Close, if it gets one.
    pub to_client: Owed,
    /// The origin's Close, if it gets one.
    pub to_origin: Owed,
    /// The client is gone, or presumed gone: nothing more is sent to it or read from it,
    /// and its connection is closed at once.
    pub cut_client: bool,
    /// The origin is gone, or presumed gone: nothing more is sent to it or read from it.
    pub cut_origin: bool,
}

/// 1001: the endpoint is going away (§7.4.1).
const GOING_AWAY: u16 = 1001;
/// 1002: a protocol error.
const PROTOCOL_ERROR: u16 = 1002;
/// 1008: a message that violates policy.
const POLICY: u16 = 1008;
/// 1009: a message too big to process.
const TOO_BIG: u16 = 1009;
/// 1014: bad gateway, the origin failed (IANA WebSocket Close Code Number Registry).
const BAD_GATEWAY: u16 = 1014;

/// The table.
pub fn plan(cause: Cause) -> Plan {
    let p = |reason, to_client, to_origin| Plan {
        reason,
        to_client,
        to_origin,
        cut_client: false,
        cut_origin: false,
    };
    let ended = |side, error| match (side, error) {
        (Side::Client, false) => CloseReason::ClientClosed,
        (Side::Origin, false) => CloseReason::OriginClosed,
        (_, true) => CloseReason::Error,
    };
    // A side that ended or failed gets nothing more; the other is told why.
    let gone = |side: Side, reason| match side {
        Side::Client => Plan {
            cut_client: true,
            ..p(reason, None, Some((GOING_AWAY, Say::GoingAway)))
        },
        Side::Origin => Plan {
            cut_origin: true,
            ..p(reason, Some((BAD_GATEWAY, Say::BadGateway)), None)
        },
    };
    match cause {
        Cause::IdleTimeout => p(
            CloseReason::IdleTimeout,
            Some((GOING_AWAY, Say::IdleTimeout)),
            Some((GOING_AWAY, Say::IdleTimeout)),
        ),
        Cause::MaxLifetime => p(
            CloseReason::MaxLifetime,
            Some((GOING_AWAY, Say::MaxLifetime)),
            Some((GOING_AWAY, Say::MaxLifetime)),
        ),
        Cause::Heartbeat(Side::Client) => Plan {
            cut_client: true,
            ..p(
                CloseReason::HeartbeatTimeout,
                None,
                Some((GOING_AWAY, Say::HeartbeatTimeout)),
            )
        },
        Cause::Heartbeat(Side::Origin) => Plan {
            cut_origin: true,
            ..p(
                CloseReason::OriginHeartbeatTimeout,
                Some((BAD_GATEWAY, Say::HeartbeatTimeout)),
                None,
            )
        },
        Cause::Ended { side, error } => gone(side, ended(side, error)),
        Cause::WriteFailed(side) | Cause::Stalled(side) => gone(side, CloseReason::Error),
        Cause::Broke(side, v) => {
            let (reason, code, say) = match v {
                Violation::TooBig => (CloseReason::MessageTooBig, TOO_BIG, Say::MessageTooBig),
                Violation::Rate => (CloseReason::MessageRate, POLICY, Say::MessageRate),
                Violation::NotWebSocket => (
                    CloseReason::ProtocolError,
                    PROTOCOL_ERROR,
                    Say::ProtocolError,
                ),
            };
            let sender = Some((code, say));
            let other = Some((
                GOING_AWAY,
                Say::PeerBroke {
                    client: side == Side::Client,
                    broke: v,
                },
            ));
            match side {
                Side::Client => p(reason, sender, other),
                Side::Origin => p(reason, other, sender),
            }
        }
        // Both sides hear it; the closing handshakes are awaited as for any Close of the
        // edge's (bounded), so nothing in flight is cut.
        Cause::Drain(code, say) => p(CloseReason::Shutdown, Some((code, say)), Some((code, say))),
        Cause::Done(reason) => p(reason, None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_one_an_endpoint_may_receive() {
        // §7.4.1 and the IANA registry: 1000-1003, 1007-1011, 1014; never 1005, 1006, 1015.
        let sides = [Side::Client, Side::Origin];
        let mut causes = vec![
            Cause::IdleTimeout,
            Cause::MaxLifetime,
            Cause::Drain(GOING_AWAY, Say::GoingAway),
            Cause::Drain(1012, Say::Restarting),
            Cause::Drain(1001, Say::Draining),
        ];
        for s in sides {
            causes.push(Cause::Heartbeat(s));
            causes.push(Cause::Ended {
                side: s,
                error: false,
            });
            causes.push(Cause::Ended {
                side: s,
                error: true,
            });
            causes.push(Cause::WriteFailed(s));
            causes.push(Cause::Stalled(s));
            for v in [Violation::TooBig, Violation::Rate, Violation::NotWebSocket] {
                causes.push(Cause::Broke(s, v));
            }
        }
        for c in causes {
            let plan = plan(c);
            for (code, say) in [plan.to_client, plan.to_origin].into_iter().flatten() {
                assert!(matches!(code, 1000..=1003 | 1007..=1012 | 1014), "{c:?}");
                assert!(say.reason().len() <= 123, "{c:?}");
            }
            assert!(
                plan.to_client.is_some() || plan.to_origin.is_some(),
                "{c:?}: someone is told"
            );
        }
        assert_eq!(plan(Cause::Done(CloseReason::ClientClosed)).to_client, None);
    }
}
