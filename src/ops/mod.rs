//! Running an edge: reloading its configuration ([`reload`]), the admin listener
//! ([`admin`]), the background services ([`services`]), reloading when the file changes
//! ([`watch`]), the drain of a stopping process ([`drain`]) and the readiness line
//! ([`ready`]).

pub mod admin;
pub mod drain;
pub mod ready;
pub mod reload;
pub mod services;
pub mod watch;
