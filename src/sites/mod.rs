//! The resources as they are served: the Host table with each resource's counters, limits
//! and origin group ([`router`]), the origin groups and the way to an origin server
//! ([`origin`]), and the certificate of a TLS connection, chosen by routing its SNI
//! ([`tls`]).

pub mod origin;
pub mod router;
pub mod tls;
