//! The background services of an edge: origin health checks, the `/stats` ticker, reload on
//! SIGHUP, and reopening the access log on SIGUSR1 (reloading when the file changes is
//! `super::watch`). Each runs until the server shuts down.

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
