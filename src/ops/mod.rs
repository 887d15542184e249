//! Running an edge: reloading its configuration ([`reload`]), the admin listener
//! ([`admin`]), the background services ([`services`]) and the readiness line ([`ready`]).

pub mod admin;
pub mod ready;
pub mod reload;
pub mod services;
