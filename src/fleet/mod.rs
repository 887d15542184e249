//! A fleet of edges on one etcd (`source.etcd`): the edge reads its resources and defaults
//! from etcd at start ([`load`]), watches them with one watch per process
//! ([`watch::WatchEtcd`]) and applies every change with the same atomic swap as a reload,
//! keeps what it applied in a last-known-good file ([`last_known_good`]) to start from
//! while etcd is away, and `wsedge resource` ([`cli`]) lets an operator change a resource
//! with the same checks before it reaches any edge.
//!
//! Nothing here parses configuration: the values are joined into the local file and built
//! by `config` exactly like a file.

pub mod cli;
pub mod etcd;
pub mod last_known_good;
pub mod watch;

use crate::config::store::{EtcdSettings, Snapshot};
use crate::config::{Config, ConfigError};
use std::path::Path;

/// Where a start's resources came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The local file alone (no `source.etcd`).
    File,
    /// etcd, read now.
    Etcd,
    /// The last-known-good file, because etcd could not be read (why).
    LastKnownGood(String),
}

/// Why a configuration with `source.etcd` could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The local file, or what etcd (or the last-known-good file) holds, is not valid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// Neither etcd nor the last-known-good file could be read.
    #[error("{0}")]
    NoSource(String),
}

/// Loads the configuration at `path` as a start does: with `source.etcd`, what etcd holds
/// now, or if etcd cannot be read within its timeout, the last-known-good file; without
/// either, an error that says both reasons. Blocks (it runs its own small runtime).
pub fn load(path: &Path) -> Result<(Config, Origin), LoadError> {
    let Some(settings) = Config::etcd_settings(path)? else {
        return Ok((Config::load(path)?, Origin::File));
    };
    let read = run_blocking(async { etcd::read_all(&settings).await });
    let last_known_good = || last_known_good::read(&settings.last_known_good, &settings.prefix);
    let store = match read {
        Ok(store) => store,
        Err(why) => {
            let store = last_known_good().map_err(|lkg| {
                LoadError::NoSource(format!(
                    "{}: cannot start: etcd ({}) cannot be read: {why}; and no last-known-good configuration to start from: {lkg}",
                    path.display(),
                    settings.endpoints.join(", ")
                ))
            })?;
            let config = Config::load_with(path, Some(&store))?;
            return Ok((config, Origin::LastKnownGood(why)));
        }
    };
    match Config::load_with(path, Some(&store)) {
        Ok(config) => Ok((config, Origin::Etcd)),
        // What etcd holds does not validate: the edge the fleet had is better than none.
        Err(e) => match last_known_good() {
            Ok(good) => match Config::load_with(path, Some(&good)) {
                Ok(config) => Ok((
                    config,
                    Origin::LastKnownGood(format!(
                        "etcd revision {} does not validate: {e}",
                        store.revision
                    )),
                )),
                Err(_) => Err(e.into()),
            },
            Err(_) => Err(e.into()),
        },
    }
}

/// Runs `f` to completion on a runtime of its own (a start is not in one yet).
pub(crate) fn run_blocking<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds")
        .block_on(f)
}

/// What `settings` say, for messages: the endpoints and the prefix.
pub(crate) fn describe(settings: &EtcdSettings) -> String {
    format!(
        "{} under {}",
        settings.endpoints.join(", "),
        settings.prefix
    )
}

/// The snapshot's keys that are resources, for messages.
pub(crate) fn count(store: &Snapshot) -> usize {
    store.resource_names().count()
}
