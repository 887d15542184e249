//! The drain of a stopping process: once Pingora has closed the listeners (SIGTERM) or
//! handed them to a new process (graceful upgrade: `-u`, then SIGQUIT to the old one), every
//! open tunnel is told to go at a moment of its own over `drain.spread`
//! ([`crate::policy::drain`]); and as soon as no tunnel and no request is left, the edge
//! says so (the binary exits then, instead of waiting out Pingora's whole grace period).

use crate::observe::metrics::EdgeStats;
use crate::policy::drain::{Drain, Kind};
use async_trait::async_trait;
use pingora::server::{ExecutionPhase, ShutdownWatch};
use pingora::services::background::BackgroundService;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast::{self, error::TryRecvError};

/// What to do once a stopping edge has nothing left to serve.
pub type OnDrained = Arc<dyn Fn() + Send + Sync>;

/// How often a stopping edge looks whether anything is left.
const LOOK: Duration = Duration::from_millis(50);

/// Starts the drain when the server shuts down, and calls `on_drained` once nothing is
/// left.
pub struct DrainOnShutdown {
    drain: Arc<Drain>,
    stats: Arc<EdgeStats>,
    phases: Mutex<broadcast::Receiver<ExecutionPhase>>,
    on_drained: Option<OnDrained>,
}

impl DrainOnShutdown {
    /// Drains with `drain` at shutdown; `phases` (from `Server::watch_execution_phase`)
    /// tells a graceful upgrade from a stop.
    pub fn new(
        drain: Arc<Drain>,
        stats: Arc<EdgeStats>,
        phases: broadcast::Receiver<ExecutionPhase>,
        on_drained: Option<OnDrained>,
    ) -> DrainOnShutdown {
        DrainOnShutdown {
            drain,
            stats,
            phases: Mutex::new(phases),
            on_drained,
        }
    }

    /// Whether the phases so far say the listeners were handed to a new process.
    fn kind(&self) -> Kind {
        let mut phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        let mut kind = Kind::Shutdown;
        loop {
            match phases.try_recv() {
                Ok(
                    ExecutionPhase::GracefulUpgradeTransferringFds
                    | ExecutionPhase::GracefulUpgradeCloseTimeout,
                ) => kind = Kind::Upgrade,
                Ok(_) | Err(TryRecvError::Lagged(_)) => {}
                Err(_) => return kind,
            }
        }
    }
}

#[async_trait]
impl BackgroundService for DrainOnShutdown {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow_and_update() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        let kind = self.kind();
        let open = self.stats.tunnels_open();
        self.drain.start(kind);
        if let Some(o) = self.drain.order() {
            log::info!(
                "{}: {open} tunnels are told to go (Close {}) over {:?}",
                match kind {
                    Kind::Upgrade => "graceful upgrade",
                    _ => "shutdown",
                },
                o.close_code,
                o.spread
            );
        }
        let Some(done) = &self.on_drained else {
            return;
        };
        let mut look = tokio::time::interval(LOOK);
        // Bounded by Pingora's grace period, after which the runtime is dropped.
        loop {
            look.tick().await;
            if self.stats.tunnels_open() <= 0 && self.stats.connections() == 0 {
                log::info!("drained: no tunnel and no request left");
                done();
                return;
            }
        }
    }
}
