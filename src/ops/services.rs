//! The background services of an edge: origin health checks, the `/stats` ticker, reload on
//! SIGHUP or when the file changes (`watch`), and reopening the access log on SIGUSR1. Each
//! runs until the server shuts down.

use super::reload::Reloader;
use crate::observe::metrics::EdgeStats;
use crate::sites::router::SharedRouter;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::signal::unix::{signal, SignalKind};

/// Runs `tick` every `period` until shutdown (a late tick is not made up for).
async fn every<F, Fut>(period: Duration, mut shutdown: ShutdownWatch, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => tick().await,
            _ = shutdown.changed() => return,
        }
    }
}

/// Runs `action` on each `kind` signal until shutdown.
async fn on_signal<F, Fut>(kind: SignalKind, name: &str, mut shutdown: ShutdownWatch, mut action: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut signals = match signal(kind) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot listen for {name}: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = signals.recv() => action().await,
            _ = shutdown.changed() => return,
        }
    }
}

/// Runs every resource's health checks on their intervals (looked at five times a second,
/// so an interval is kept to within 200 ms).
pub struct HealthChecker(pub SharedRouter);

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, shutdown: ShutdownWatch) {
        every(Duration::from_millis(200), shutdown, || async {
            let table = self.0.load_full();
            let checks = table.sites().iter().map(|s| s.group.check_if_due());
            futures_util::future::join_all(checks).await;
        })
        .await
    }
}

/// Folds counters into the `/stats` windows once a second.
pub struct Ticker(pub Arc<EdgeStats>);

#[async_trait]
impl BackgroundService for Ticker {
    async fn start(&self, shutdown: ShutdownWatch) {
        every(Duration::from_secs(1), shutdown, || async {
            self.0.tick(SystemTime::now())
        })
        .await
    }
}

/// Reloads on SIGHUP.
pub struct SighupReload(pub Arc<Reloader>);

#[async_trait]
impl BackgroundService for SighupReload {
    async fn start(&self, shutdown: ShutdownWatch) {
        let hint = "SIGHUP (reload with POST /reload only)";
        on_signal(SignalKind::hangup(), hint, shutdown, || async {
            log::info!("SIGHUP: reloading");
            let _ = self.0.reload_async().await;
        })
        .await
    }
}

/// Reopens the access log on SIGUSR1 (after log rotation moved the file away), as nginx
/// does.
pub struct ReopenOnUsr1(pub Arc<Reloader>);

#[async_trait]
impl BackgroundService for ReopenOnUsr1 {
    async fn start(&self, shutdown: ShutdownWatch) {
        let hint = "SIGUSR1 (the access log reopens on reload only)";
        on_signal(SignalKind::user_defined1(), hint, shutdown, || async {
            log::info!("SIGUSR1: reopening the access log");
            self.0.reopen_access_log();
        })
        .await
    }
}

/// After the first event, how long the directory must be quiet before the file is read
/// (an editor's save, or a Kubernetes swap, is several events).
const SETTLE: Duration = Duration::from_millis(200);
/// At most this long from the first event to the read, however busy the directory.
const SETTLE_MAX: Duration = Duration::from_secs(1);

/// Reloads when the configuration file changes (`watch: true`): the file's directory is
/// watched with inotify, which sees an edit in place, an atomic rename over the file and
/// Kubernetes' swap of a ConfigMap volume's `..data` symlink alike. After the directory
/// settles, the file is read and, if its bytes differ from the last ones seen, reloaded
/// exactly as on SIGHUP (a file that does not validate is refused and the previous
/// configuration serves on; the next change is tried again).
pub struct WatchFile(pub Arc<Reloader>);

impl WatchFile {
    /// The file's bytes (None if it cannot be read now), read off the serving threads.
    async fn read(&self) -> Option<Vec<u8>> {
        let path = self.0.path().to_path_buf();
        tokio::task::spawn_blocking(move || std::fs::read(path).ok())
            .await
            .ok()
            .flatten()
    }
}

/// Takes every event queued on the inotify descriptor (their content does not matter:
/// the file is read again); false if the descriptor failed.
fn drain_events(fd: &tokio::io::unix::AsyncFd<std::fs::File>) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    loop {
        match fd.get_ref().read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("watch: reading inotify events: {e}");
                return false;
            }
        }
    }
}

#[async_trait]
impl BackgroundService for WatchFile {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let path = self.0.path().to_path_buf();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let fd = match crate::os::watch_dir(&dir) {
            Ok(fd) => fd,
            Err(e) => {
                log::error!(
                    "watch: cannot watch {}: {e}; reload with SIGHUP or POST /reload",
                    dir.display()
                );
                return;
            }
        };
        log::info!("watch: reloading when {} changes", path.display());
        let mut seen = self.read().await;
        loop {
            // The first event.
            tokio::select! {
                ready = fd.readable() => match ready {
                    Ok(mut guard) => {
                        guard.clear_ready();
                        if !drain_events(&fd) {
                            return;
                        }
                    }
                    Err(e) => {
                        log::error!("watch: {e}; reload with SIGHUP or POST /reload");
                        return;
                    }
                },
                _ = shutdown.changed() => return,
            }
            // Then quiet for SETTLE, or SETTLE_MAX in all.
            let until = tokio::time::Instant::now() + SETTLE_MAX;
            while let Ok(Ok(mut guard)) = tokio::time::timeout_at(
                until.min(tokio::time::Instant::now() + SETTLE),
                fd.readable(),
            )
            .await
            {
                guard.clear_ready();
                if !drain_events(&fd) {
                    return;
                }
            }
            let now = self.read().await;
            if now == seen {
                continue;
            }
            seen = now;
            log::info!("watch: {} changed, reloading", path.display());
            let _ = self.0.reload_async().await;
        }
    }
}
