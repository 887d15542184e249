//! Reload: read, parse and validate the file again; if it is good, swap the resource table
//! atomically; if not, keep serving the old one and say why. Open tunnels hold the
//! `Arc<Resource>` they started with, so a reload never touches them.

use crate::config::Config;
use crate::proxy::Resources;
use crate::routing::Router;
use crate::stats::EdgeStats;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// The result of the last reload, for `/healthz`.
#[derive(Debug, Clone)]
pub struct ReloadStatus {
    /// When it was tried.
    pub at: SystemTime,
    /// Whether the new file is being served.
    pub ok: bool,
    /// What happened, with the file, line and key of an error.
    pub message: String,
}

/// Reloads the configuration file into a live resource table.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    resources: Resources,
    stats: Arc<EdgeStats>,
    /// The configuration being served (listeners are compared against it).
    current: Mutex<Config>,
    last: Mutex<Option<ReloadStatus>>,
    certificates: Option<Arc<crate::tls::SniResolver>>,
}

impl Reloader {
    /// A reloader for the file `config` came from, serving into `resources`.
    pub fn new(config: Config, resources: Resources, stats: Arc<EdgeStats>) -> Reloader {
        Reloader {
            path: config.source.clone(),
            resources,
            stats,
            current: Mutex::new(config),
            last: Mutex::new(None),
            certificates: None,
        }
    }

    /// Also reloads the certificates of `resolver` (new TLS handshakes get the new ones;
    /// open connections keep theirs).
    pub fn with_certificates(mut self, resolver: Arc<crate::tls::SniResolver>) -> Reloader {
        self.certificates = Some(resolver);
        self
    }

    /// Reloads now. `Ok` says what changed; `Err` is the error, and the old table serves on.
    pub fn reload(&self) -> Result<String, String> {
        let result = match Config::load(&self.path) {
            Ok(new) => {
                // Lock poisoning would mean a panic while swapping; the data is still whole.
                let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
                self.resources
                    .store(Arc::new(Router::new(&new, &self.stats)));
                if let Some(resolver) = &self.certificates {
                    resolver.store(crate::tls::CertTable::new(&new));
                }
                for w in &new.warnings {
                    log::warn!("{w}");
                }
                let mut message = format!(
                    "reloaded {}: {} resources",
                    self.path.display(),
                    new.resources.len()
                );
                if new.listen.http != current.listen.http
                    || new.listen.https != current.listen.https
                    || new.admin != current.admin
                {
                    message.push_str("; listener changes take effect only after a restart");
                }
                *current = new;
                Ok(message)
            }
            Err(e) => Err(format!(
                "reload failed, still serving the previous configuration: {e}"
            )),
        };
        self.stats.reload(result.is_ok());
        match &result {
            Ok(m) => log::info!("{m}"),
            Err(m) => log::error!("{m}"),
        }
        let status = ReloadStatus {
            at: SystemTime::now(),
            ok: result.is_ok(),
            message: match &result {
                Ok(m) | Err(m) => m.clone(),
            },
        };
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
        result
    }

    /// The last reload's result, if any.
    pub fn last(&self) -> Option<ReloadStatus> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The number of resources being served.
    pub fn resources_count(&self) -> usize {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resources
            .len()
    }
}

/// Reloads on SIGHUP until the server shuts down.
pub struct SighupReload(pub Arc<Reloader>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for SighupReload {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot listen for SIGHUP, reload with POST /reload only: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    log::info!("SIGHUP: reloading");
                    let _ = self.0.reload();
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
