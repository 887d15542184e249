//! A request on its way in: the header guard in front of Pingora ([`header_guard`]), the
//! `ProxyHttp` hooks ([`proxy`]) and what they read from and write to a session
//! ([`session`]).

pub mod header_guard;
pub mod proxy;
pub mod session;
