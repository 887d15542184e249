//! What clients write, checked and brought to normal form: request paths ([`path`]) and
//! host names ([`host`]). Pure functions over strings, used by the configuration (a
//! configured path prefix must be normal), the policy and routing; nothing here depends on
//! the rest of the crate.

pub mod host;
pub mod path;
