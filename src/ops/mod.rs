//! Running an edge: reloading its configuration ([`reload`]), the admin listener
//! ([`admin`]), the background services ([`services`]), reloading when the file changes
//! ([`watch`]), the drain of a stopping process ([`drain`]), the readiness line
//! ([`ready`]) and what a container needs ([`container`]).

pub mod admin;
pub mod container;
pub mod drain;
pub mod ready;
pub mod reload;
pub mod services;
pub mod watch;
