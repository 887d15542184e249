//! `watch: true`: the edge reloads by itself when its configuration file changes.
//!
//! The file's directory is watched with inotify, which sees an edit in place, an atomic
//! rename over the file and Kubernetes' swap of a ConfigMap volume's `..data` symlink
//! alike. After the directory settles (and a write of the file itself is closed), the file
//! is read; if its text differs from the configuration being served, it is reloaded exactly
//! as on SIGHUP: a file that does not validate (or is gone) is refused and the previous
//! configuration serves on. The same text is tried again only after [`RETRY`] (a name that
//! did not resolve may resolve later), and the file is also read every [`FALLBACK`]: what
//! inotify cannot see (a directory higher up swapped as a symlink, a watch lost with its
//! directory) is still found, later.

use super::reload::Reloader;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::time::{timeout_at, Instant};

/// After the first event, how long the directory must be quiet before the file is read (a
/// save or a Kubernetes swap is several events).
pub const SETTLE: Duration = Duration::from_millis(200);
/// At most this long from the first event to the read, however busy the directory, unless
/// the file itself is being written (created and not closed yet).
pub const SETTLE_MAX: Duration = Duration::from_secs(1);
/// A write of the file itself is waited for this long at most.
pub const WRITE_MAX: Duration = Duration::from_secs(10);
/// The file is read this often even without an event.
pub const FALLBACK: Duration = Duration::from_secs(5);
/// A text that failed to load is tried again after this long.
pub const RETRY: Duration = Duration::from_secs(60);

/// What the events since the last look said.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Something changed in the directory.
    pub changed: bool,
    /// The file itself was created or opened for writing and not closed yet.
    pub writing: bool,
    /// The watch is gone (its directory deleted or moved): make a new one.
    pub lost: bool,
}

/// Folds raw inotify events (`struct inotify_event` records) into `seen`, for the file
/// named `name` in the watched directory.
pub fn fold_events(buf: &[u8], name: &OsStr, seen: &mut Seen) {
    const HEAD: usize = 16; // wd, mask, cookie, len
    let mut at = 0;
    while at + HEAD <= buf.len() {
        let word = |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let (mask, len) = (word(at + 4), word(at + 12) as usize);
        let end = (at + HEAD + len).min(buf.len());
        let raw = &buf[at + HEAD..end];
        let entry = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
        seen.changed = true;
        if mask & (libc::IN_IGNORED | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 {
            seen.lost = true;
        }
        if entry == name.as_bytes() {
            if mask & libc::IN_CREATE != 0 {
                seen.writing = true;
            }
            if mask & (libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO | libc::IN_DELETE) != 0 {
                seen.writing = false;
            }
        }
        at += HEAD + len;
    }
}

/// Reloads the edge when its configuration file changes (`watch: true`).
pub struct WatchFile(pub Arc<Reloader>);

/// The inotify watch of a directory, made again when it is lost.
struct Watch {
    dir: PathBuf,
    fd: Option<AsyncFd<std::fs::File>>,
}

impl Watch {
    fn new(dir: PathBuf) -> Watch {
        let mut w = Watch { dir, fd: None };
        w.renew();
        w
    }

    /// Makes the watch (again); without one, only the fallback reads see changes.
    fn renew(&mut self) {
        self.fd = match crate::os::watch_dir(&self.dir) {
            Ok(fd) => Some(fd),
            Err(e) => {
                log::warn!(
                    "watch: cannot watch {}: {e}; reading the file every {}s instead",
                    self.dir.display(),
                    FALLBACK.as_secs()
                );
                None
            }
        };
    }

    /// Waits (until `deadline`) for events and folds them into `seen`; false at the
    /// deadline. Without a watch, waits for the deadline.
    async fn next(&mut self, deadline: Instant, name: &OsStr, seen: &mut Seen) -> bool {
        let Some(fd) = &self.fd else {
            tokio::time::sleep_until(deadline).await;
            return false;
        };
        let mut guard = match timeout_at(deadline, fd.readable()).await {
            Err(_) => return false,
            Ok(Ok(guard)) => guard,
            Ok(Err(e)) => {
                log::warn!("watch: {e}");
                seen.lost = true;
                return true;
            }
        };
        let mut buf = [0u8; 4096];
        loop {
            use std::io::Read;
            match fd.get_ref().read(&mut buf) {
                Ok(0) => break,
                Ok(n) => fold_events(&buf[..n], name, seen),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("watch: reading events: {e}");
                    seen.lost = true;
                    break;
                }
            }
        }
        true
    }
}

impl WatchFile {
    /// The file's text (None if it cannot be read now), read off the serving threads.
    async fn read(path: &Path) -> Option<Vec<u8>> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || {
            crate::config::read_text(&path).ok().map(String::into_bytes)
        })
        .await
        .ok()
        .flatten()
    }
}

#[async_trait]
impl BackgroundService for WatchFile {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let path = self.0.path().to_path_buf();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().unwrap_or_default().to_os_string();
        let mut watch = Watch::new(dir);
        log::info!("watch: reloading when {} changes", path.display());
        // The text last tried and when it failed, so a bad file is not retried on every
        // event.
        let mut failed: Option<(Option<Vec<u8>>, Instant)> = None;
        loop {
            // An event, or the fallback's time.
            let mut seen = Seen::default();
            let fallback = Instant::now() + FALLBACK;
            tokio::select! {
                _ = watch.next(fallback, &name, &mut seen) => {}
                _ = shutdown.changed() => return,
            }
            if seen.changed {
                // Then quiet for SETTLE (SETTLE_MAX in all), and the file's own write
                // closed (WRITE_MAX in all).
                let first = Instant::now();
                loop {
                    let cap = first + if seen.writing { WRITE_MAX } else { SETTLE_MAX };
                    let until = (Instant::now() + SETTLE).min(cap);
                    let more = watch.next(until, &name, &mut seen).await;
                    let past_cap = Instant::now() >= cap;
                    if past_cap || (!more && !seen.writing) {
                        break;
                    }
                }
            }
            if seen.lost {
                log::warn!("watch: the watch on the directory was lost; making it again");
                watch.renew();
            }
            let text = Self::read(&path).await;
            if text.as_deref() == Some(self.0.served_text().as_bytes()) {
                failed = None;
                continue;
            }
            if let Some((tried, at)) = &failed {
                if *tried == text && at.elapsed() < RETRY {
                    continue;
                }
            }
            log::info!("watch: {} changed, reloading", path.display());
            failed = match self.0.reload_async().await {
                Ok(_) => None,
                Err(_) => Some((text, Instant::now())),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(mask: u32, name: &str) -> Vec<u8> {
        let mut padded = name.as_bytes().to_vec();
        if !name.is_empty() {
            padded.resize(name.len().div_ceil(16) * 16, 0);
        }
        let mut e = Vec::new();
        e.extend(1i32.to_ne_bytes());
        e.extend(mask.to_ne_bytes());
        e.extend(0u32.to_ne_bytes());
        e.extend((padded.len() as u32).to_ne_bytes());
        e.extend(padded);
        e
    }

    #[test]
    fn events_say_a_change_a_write_in_progress_and_a_lost_watch() {
        let name = OsStr::new("wsedge.yaml");
        let mut seen = Seen::default();
        fold_events(&event(libc::IN_CREATE, "wsedge.yaml"), name, &mut seen);
        assert_eq!(
            seen,
            Seen {
                changed: true,
                writing: true,
                lost: false
            }
        );
        // Another file's close does not end the write; the file's own does.
        fold_events(
            &event(libc::IN_CLOSE_WRITE, "wsedge.yaml.swp"),
            name,
            &mut seen,
        );
        assert!(seen.writing);
        let mut two = event(libc::IN_ATTRIB, "..data");
        two.extend(event(libc::IN_CLOSE_WRITE, "wsedge.yaml"));
        fold_events(&two, name, &mut seen);
        assert!(seen.changed && !seen.writing && !seen.lost);
        fold_events(&event(libc::IN_IGNORED, ""), name, &mut seen);
        assert!(seen.lost);
        // A cut or hostile buffer is read as far as it goes, never past it.
        let mut cut = event(libc::IN_MOVED_TO, "wsedge.yaml");
        cut.truncate(20);
        fold_events(&cut, name, &mut Seen::default());
        let mut huge = event(libc::IN_MOVED_TO, "x");
        huge[12..16].copy_from_slice(&u32::MAX.to_ne_bytes());
        fold_events(&huge, name, &mut Seen::default());
        fold_events(&[0u8; 7], name, &mut Seen::default());
    }
}
