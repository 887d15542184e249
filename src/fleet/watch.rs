//! One watch on etcd per process: every change under the prefix is applied with the
//! reload's atomic swap (open tunnels keep their settings), or refused with the previous
//! configuration serving on; what is applied is written to the last-known-good file. The
//! watch resumes from the last revision seen after a reconnect, and reads everything again
//! when that revision was compacted away.

use super::{etcd, last_known_good};
use crate::config::store::{EtcdSettings, Snapshot};
use crate::ops::reload::Reloader;
use async_trait::async_trait;
use etcd_client::{EventType, WatchOptions};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::timeout;

/// The first wait before connecting again; it doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// The longest wait before connecting again.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// At most this many watch answers already received are folded into one change.
const COALESCE: usize = 256;

/// Watches etcd and applies its changes (`source.etcd`).
pub struct WatchEtcd {
    reloader: Arc<Reloader>,
    settings: EtcdSettings,
}

impl WatchEtcd {
    /// The watch that applies etcd's changes through `reloader`. An edge that started from
    /// its last-known-good file (`Reloader::source`) reads everything first.
    pub fn new(reloader: Arc<Reloader>, settings: EtcdSettings) -> Self {
        WatchEtcd { reloader, settings }
    }
}

/// What the watch knows between sessions.
struct State {
    /// etcd's state as last seen (applied or refused).
    store: Snapshot,
    /// Read everything before watching (a start from the last-known-good file, a
    /// compacted revision).
    full_read: bool,
}

impl WatchEtcd {
    /// Applies `store`, and keeps it in the last-known-good file when it serves.
    async fn apply(&self, store: Snapshot) {
        let revision = store.revision;
        if self.reloader.apply_store(store.clone()).await.is_ok() {
            self.reloader.set_source(true, None, Some(false));
            self.save(store).await;
        } else {
            log::warn!("etcd: revision {revision} was refused; fix the value named above (wsedge resource put checks it first)");
        }
    }

    /// Writes the last-known-good file off the async threads.
    async fn save(&self, store: Snapshot) {
        let path = self.settings.last_known_good.clone();
        let prefix = self.settings.prefix.clone();
        let written = tokio::task::spawn_blocking(move || {
            last_known_good::write(&path, &prefix, &store)
                .map_err(|e| format!("{}: {e}", path.display()))
        })
        .await;
        if let Ok(Err(e)) = written {
            log::warn!("etcd: cannot write the last-known-good file {e}; a start without etcd will not have it");
        }
    }

    /// One connection: read everything if needed, then watch from the next revision
    /// until the connection or the watch ends. Returns why it ended.
    async fn session(&self, st: &mut State) -> String {
        let s = &self.settings;
        let mut client = match etcd::connect(s).await {
            Ok(c) => c,
            Err(e) => return format!("cannot connect: {e}"),
        };
        if st.full_read {
            match etcd::read(&mut client, s).await {
                Ok(store) => {
                    st.full_read = false;
                    st.store = store.clone();
                    self.apply(store).await;
                }
                Err(e) => return format!("cannot read {}: {e}", s.prefix),
            }
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(st.store.revision + 1)
            .with_progress_notify();
        let mut stream = match timeout(s.timeout, client.watch(s.prefix.as_str(), Some(options)))
            .await
        {
            Err(_) => return format!("no answer to the watch within {}s", s.timeout.as_secs_f64()),
            Ok(Err(e)) => return format!("cannot watch: {e}"),
            Ok(Ok(stream)) => stream,
        };
        self.reloader.set_source(true, None, None);
        log::info!(
            "etcd: watching {} from revision {}",
            super::describe(s),
            st.store.revision + 1
        );
        loop {
            let mut next = st.store.clone();
            let mut changed = false;
            // The first answer waits; answers already there join the same change.
            for i in 0..COALESCE {
                let message = if i == 0 {
                    stream.message().await
                } else {
                    match timeout(Duration::ZERO, stream.message()).await {
                        Ok(m) => m,
                        Err(_) => break,
                    }
                };
                let resp = match message {
                    Err(e) => return format!("the watch ended: {e}"),
                    Ok(None) => return "etcd closed the watch".into(),
                    Ok(Some(resp)) => resp,
                };
                if resp.compact_revision() > 0 {
                    st.full_read = true;
                    return format!(
                        "revision {} is compacted away (etcd keeps from {}): reading everything again",
                        st.store.revision + 1,
                        resp.compact_revision()
                    );
                }
                if resp.created()
                    && resp
                        .header()
                        .is_some_and(|h| h.revision() < st.store.revision)
                {
                    // etcd is behind what this edge saw: a store rebuilt or restored from a
                    // backup. Watching from the old revision would wait for revisions
                    // that mean something else; read everything instead.
                    st.full_read = true;
                    return format!(
                        "etcd is at revision {} but this edge has seen {} (a store rebuilt or restored?): reading everything again",
                        resp.header().map_or(0, |h| h.revision()),
                        st.store.revision
                    );
                }
                if resp.canceled() {
                    st.full_read = true;
                    return format!("etcd canceled the watch: {}", resp.cancel_reason());
                }
                if resp.events().is_empty() && !resp.created() {
                    // A progress notice (sent only once the watch has caught up) moves the
                    // revision on without a change. The header of other answers is not
                    // used: while catching up it runs ahead of the events it carries.
                    if let Some(h) = resp.header() {
                        next.revision = next.revision.max(h.revision());
                    }
                }
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    match event.event_type() {
                        EventType::Put => etcd::put(&mut next, &s.prefix, kv.key(), kv.value()),
                        EventType::Delete => etcd::delete(&mut next, &s.prefix, kv.key()),
                    }
                    next.revision = next.revision.max(kv.mod_revision());
                    changed = true;
                }
            }
            let revision_only = !changed;
            st.store = next.clone();
            if !revision_only {
                log::info!("etcd: revision {}: applying", next.revision);
                self.apply(next).await;
            }
        }
    }
}

#[async_trait]
impl BackgroundService for WatchEtcd {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let store = self
            .reloader
            .store()
            .map(|s| (*s).clone())
            .unwrap_or_default();
        let from_last_known_good = self.reloader.source().last_known_good;
        if !from_last_known_good {
            self.save(store.clone()).await;
        }
        let mut st = State {
            store,
            full_read: from_last_known_good,
        };
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = tokio::time::Instant::now();
            let why = tokio::select! {
                why = self.session(&mut st) => why,
                _ = shutdown.changed() => return,
            };
            // A session that lasted resets the wait; one that failed at once doubles it.
            if started.elapsed() > BACKOFF_MAX {
                backoff = BACKOFF_MIN;
            }
            log::warn!(
                "etcd: {why}; serving revision {} and trying again in {:.1}s",
                self.reloader.source().revision,
                backoff.as_secs_f64()
            );
            self.reloader.set_source(false, Some(why), None);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}
