//! Whether a request may go on, and the edge's own answer when it may not: the answers
//! ([`answer`]), the RFC 6455 checks ([`handshake`]), a resource's WebSocket policy and the
//! whole admission of an upgrade ([`gate`]), the state behind the limits ([`limits`]), and
//! the edge's drain ([`drain`]).

pub mod answer;
pub mod drain;
pub mod gate;
pub mod handshake;
pub mod limits;
