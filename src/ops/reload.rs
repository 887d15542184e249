//! Reload: read, parse and validate the file again; if it is good, swap the resource table
//! (certificates included) atomically; if not, keep serving the old one and say why. Open
//! tunnels hold the `Arc<Resource>` they started with, so a reload never touches them.
//!
//! A reload reads files and resolves names, so it runs on a blocking thread, never on a
//! worker that serves traffic; and nothing in it can take the reloader down: a panic while
//! loading or building is caught and reported like an invalid file, and the next reload
//! works.

use crate::config::{Admin, Config, ConfigError, DRAIN_CLOSING};
use crate::observe::access_log::AccessLog;
use crate::sites::router::{Lasting, Router, SharedRouter};
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
    router: SharedRouter,
    lasting: Arc<Lasting>,
    /// The configuration being served (listeners are compared against it).
    current: Mutex<Config>,
    last: Mutex<Option<ReloadStatus>>,
    access_log: Option<Arc<AccessLog>>,
    /// The grace period the process runs with (from the file it started with: Pingora
    /// reads it once), which every reloaded `drain.spread` must still fit in.
    grace: std::time::Duration,
}

impl Reloader {
    /// A reloader for the file `config` came from, serving into `router`, keeping
    /// counters and limits in `lasting`.
    pub fn new(config: Config, router: SharedRouter, lasting: Arc<Lasting>) -> Reloader {
        Reloader {
            path: config.source.clone(),
            grace: config.grace_period,
            router,
            lasting,
            current: Mutex::new(config),
            last: Mutex::new(None),
            access_log: None,
        }
    }

    /// Also reopens `log` (a file moved away by log rotation) on every reload.
    pub fn with_access_log(mut self, log: Arc<AccessLog>) -> Reloader {
        self.access_log = Some(log);
        self
    }

    /// Reloads on a blocking thread (files, PEM parsing, DNS) and never fails to answer:
    /// a panic on the way is reported as a failed reload, and the old table serves on.
    pub async fn reload_async(self: &Arc<Self>) -> Result<String, String> {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.reload()).await {
            Ok(result) => result,
            Err(e) => {
                let why = panic_message(e);
                let message = format!(
                    "reload failed, still serving the previous configuration: internal error while loading {}: {why}",
                    self.path.display()
                );
                self.record(Err(message.clone()));
                Err(message)
            }
        }
    }

    /// Reloads now, on this thread. `Ok` says what changed; `Err` is the error, and the old
    /// table serves on. Prefer [`Self::reload_async`] from async code.
    pub fn reload(&self) -> Result<String, String> {
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let new = Config::load(&self.path)?;
            let router = Router::new(&new, &self.lasting);
            Ok::<_, ConfigError>((new, router))
        }));
        let result = match loaded {
            Err(panic) => Err(format!(
                "reload failed, still serving the previous configuration: internal error while loading {}: {}",
                self.path.display(),
                panic_text(&*panic)
            )),
            Ok(Err(e)) => Err(format!(
                "reload failed, still serving the previous configuration: {e}"
            )),
            Ok(Ok((new, _))) if new.drain.spread + DRAIN_CLOSING > self.grace => Err(format!(
                "reload failed, still serving the previous configuration: {}: drain.spread ({}s) and the closing handshakes after it ({}s) do not fit in the grace period this process runs with ({}s): pingora.grace_period_seconds changes only with a restart",
                self.path.display(),
                new.drain.spread.as_secs_f64(),
                DRAIN_CLOSING.as_secs(),
                self.grace.as_secs()
            )),
            Ok(Ok((new, router))) => {
                // Lock poisoning would mean a panic while swapping; the data is still whole.
                let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
                self.router.store(Arc::new(router));
                self.lasting.drain.set_settings(new.drain);
                if let Some(log) = &self.access_log {
                    log.reopen(&new.access_log);
                }
                for w in &new.warnings {
                    log::warn!("{w}");
                }
                let mut message = format!(
                    "reloaded {}: {} resources",
                    self.path.display(),
                    new.resources.len()
                );
                if new.listen != current.listen || new.admin.addr != current.admin.addr {
                    message.push_str("; listener changes take effect only after a restart");
                }
                if new.watch != current.watch {
                    message.push_str("; `watch` changes take effect only after a restart");
                }
                *current = new;
                Ok(message)
            }
        };
        self.record(result.clone());
        result
    }

    /// Counts, logs and keeps (for `/healthz`) a reload's result.
    fn record(&self, result: Result<String, String>) {
        self.lasting.stats.reload(result.is_ok());
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
    }

    /// Reopens the access log file (log rotation).
    pub fn reopen_access_log(&self) {
        if let Some(log) = &self.access_log {
            let target = self
                .current
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .access_log
                .clone();
            log.reopen(&target);
        }
    }

    /// The file this reloader reads.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The text of the configuration being served.
    pub fn served_text(&self) -> Arc<str> {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        current.text.clone()
    }

    /// The admin listener's settings being served (its token may change on reload).
    pub fn admin(&self) -> Admin {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admin
            .clone()
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

/// What a panic said, for a message.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_string())
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(panic) => panic_text(&*panic),
        Err(e) => e.to_string(),
    }
}
