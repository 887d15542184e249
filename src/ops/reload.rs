//! Reload: read, parse and validate the file again; if it is good, swap the resource table
//! (certificates included) atomically; if not, keep serving the old one and say why. Open
//! tunnels hold the `Arc<Resource>` they started with, so a reload never touches them.
//!
//! A reload reads files and resolves names, so it runs on a blocking thread, never on a
//! worker that serves traffic; and nothing in it can take the reloader down: a panic while
//! loading or building is caught and reported like an invalid file, and the next reload
//! works.

use crate::config::store::Snapshot;
use crate::config::{Admin, Config, DRAIN_CLOSING};
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

/// Where the configuration being served came from, for `/healthz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStatus {
    /// `file` or `etcd`.
    pub kind: &'static str,
    /// The etcd revision being served (0 for a file).
    pub revision: i64,
    /// When the configuration being served was applied.
    pub applied_at: SystemTime,
    /// Whether etcd is connected and watched (always true for a file).
    pub up: bool,
    /// Served from the last-known-good file since a start without etcd, not caught up yet.
    pub last_known_good: bool,
    /// Why etcd is not up, when it is not.
    pub error: Option<String>,
}

/// Reloads the configuration file into a live resource table.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    router: SharedRouter,
    lasting: Arc<Lasting>,
    /// The configuration being served (listeners are compared against it).
    current: Mutex<Config>,
    /// Held for a whole reload or etcd change, so that two never interleave (a reload
    /// built on an older etcd state must not swap in after a newer one).
    busy: Mutex<()>,
    last: Mutex<Option<ReloadStatus>>,
    source: Mutex<SourceStatus>,
    access_log: Option<Arc<AccessLog>>,
    /// The feed of fleet statistics, whose MaxMind databases a reload replaces.
    analytics: Option<Arc<crate::observe::analytics::Feed>>,
    /// The grace period the process runs with (from the file it started with: Pingora
    /// reads it once), which every reloaded `drain.spread` must still fit in.
    grace: std::time::Duration,
}

impl Reloader {
    /// A reloader for the file `config` came from, serving into `router`, keeping
    /// counters and limits in `lasting`.
    pub fn new(config: Config, router: SharedRouter, lasting: Arc<Lasting>) -> Reloader {
        let revision = config.store.as_ref().map_or(0, |s| s.revision);
        let now = SystemTime::now();
        lasting.stats.config_applied(revision, now);
        lasting.stats.config_source_up(config.etcd.is_none());
        Reloader {
            path: config.source.clone(),
            grace: config.grace_period,
            source: Mutex::new(SourceStatus {
                kind: if config.etcd.is_some() {
                    "etcd"
                } else {
                    "file"
                },
                revision,
                applied_at: now,
                up: config.etcd.is_none(),
                last_known_good: false,
                error: None,
            }),
            router,
            lasting,
            current: Mutex::new(config),
            busy: Mutex::new(()),
            last: Mutex::new(None),
            access_log: None,
            analytics: None,
        }
    }

    /// Also reopens `log` (a file moved away by log rotation) on every reload.
    pub fn with_access_log(mut self, log: Arc<AccessLog>) -> Reloader {
        self.access_log = Some(log);
        self
    }

    /// Gives `feed` the MaxMind databases of every configuration applied.
    pub fn with_analytics(
        mut self,
        feed: Option<Arc<crate::observe::analytics::Feed>>,
    ) -> Reloader {
        self.analytics = feed;
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
    /// table serves on. Prefer [`Self::reload_async`] from async code. With `source.etcd`,
    /// the file is joined with the etcd state being served.
    pub fn reload(&self) -> Result<String, String> {
        let result = self.swap("reload failed", |current| {
            let new = Config::load_with(&self.path, current.store.as_deref())
                .map_err(|e| e.to_string())?;
            if new.etcd != current.etcd {
                return Err(format!(
                    "{}: source.etcd changes take effect only with a restart",
                    self.path.display()
                ));
            }
            Ok(new)
        });
        self.record(result.clone());
        result
    }

    /// Applies what etcd holds at a revision (the file being served joined with it), on a
    /// blocking thread; refused like a reload when it does not validate.
    pub async fn apply_store(self: &Arc<Self>, store: Snapshot) -> Result<String, String> {
        let this = self.clone();
        let revision = store.revision;
        let result = tokio::task::spawn_blocking(move || {
            this.swap(&format!("etcd revision {revision} refused"), |current| {
                Config::from_parts(&this.path, &current.text, Some(&store)).map_err(|e| e.to_string())
            })
        })
        .await
        .unwrap_or_else(|e| {
            Err(format!(
                "etcd revision {revision} refused, still serving the previous configuration: internal error: {}",
                panic_message(e)
            ))
        });
        self.record(result.clone());
        result
    }

    /// Builds a configuration with `load` (given the one being served) and its resource
    /// table, and swaps both in; on an error (or a panic) the old ones serve on, and the
    /// message starts with `failed`.
    fn swap(
        &self,
        failed: &str,
        load: impl FnOnce(&Config) -> Result<Config, String>,
    ) -> Result<String, String> {
        let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let served = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let new = load(&served)?;
            let router = Router::new(&new, &self.lasting);
            Ok::<_, String>((new, router))
        }));
        let (new, router) = match loaded {
            Err(panic) => {
                return Err(format!(
                    "{failed}, still serving the previous configuration: internal error while loading {}: {}",
                    self.path.display(),
                    panic_text(&*panic)
                ))
            }
            Ok(Err(e)) => return Err(format!("{failed}, still serving the previous configuration: {e}")),
            Ok(Ok(built)) => built,
        };
        let fixed = |c: &Config| {
            c.analytics.clone().map(|mut a| {
                a.geoip = Default::default();
                a
            })
        };
        if fixed(&new) != fixed(&served) {
            return Err(format!(
                "{failed}, still serving the previous configuration: {}: analytics changes take effect only with a restart (but for geoip, read again at every reload)",
                self.path.display()
            ));
        }
        if new.drain.spread + DRAIN_CLOSING > self.grace {
            return Err(format!(
                "{failed}, still serving the previous configuration: {}: drain.spread ({}s) and the closing handshakes after it ({}s) do not fit in the grace period this process runs with ({}s): pingora.grace_period_seconds changes only with a restart",
                self.path.display(),
                new.drain.spread.as_secs_f64(),
                DRAIN_CLOSING.as_secs(),
                self.grace.as_secs()
            ));
        }
        // Lock poisoning would mean a panic while swapping; the data is still whole.
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        self.router.store(Arc::new(router));
        self.lasting.drain.set_settings(new.drain);
        if let Some(log) = &self.access_log {
            log.reopen(&new.access_log);
        }
        if let (Some(feed), Some(a)) = (&self.analytics, &new.analytics) {
            feed.set_geoip(&a.geoip);
        }
        for w in &new.warnings {
            log::warn!("{w}");
        }
        let revision = new.store.as_ref().map(|s| s.revision);
        let mut message = match revision {
            Some(r) => format!(
                "applied etcd revision {r}: {} resources",
                new.resources.len()
            ),
            None => format!(
                "reloaded {}: {} resources",
                self.path.display(),
                new.resources.len()
            ),
        };
        if new.listen != current.listen || new.admin.addr != current.admin.addr {
            message.push_str("; listener changes take effect only after a restart");
        }
        if new.watch != current.watch {
            message.push_str("; `watch` changes take effect only after a restart");
        }
        let now = SystemTime::now();
        {
            let mut source = self.source.lock().unwrap_or_else(|e| e.into_inner());
            source.revision = revision.unwrap_or(0);
            source.applied_at = now;
            if revision.is_some() && source.up {
                source.last_known_good = false;
            }
        }
        self.lasting
            .stats
            .config_applied(revision.unwrap_or(0), now);
        *current = new;
        Ok(message)
    }

    /// Where the configuration being served came from, and whether etcd is up.
    pub fn source(&self) -> SourceStatus {
        self.source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Says whether etcd is connected and watched (`error`: why not), and whether the
    /// configuration being served is the last-known-good file's.
    pub fn set_source(&self, up: bool, error: Option<String>, last_known_good: Option<bool>) {
        let mut source = self.source.lock().unwrap_or_else(|e| e.into_inner());
        source.up = up;
        source.error = error;
        if let Some(l) = last_known_good {
            source.last_known_good = l;
        }
        self.lasting.stats.config_source_up(up);
    }

    /// What etcd held when the configuration being served was built, if from etcd.
    pub fn store(&self) -> Option<Arc<Snapshot>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .store
            .clone()
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
