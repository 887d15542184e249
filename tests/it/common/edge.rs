//! A real wsedge process on loopback: started with a configuration, found by the
//! `listening on` lines it prints, its logs collected, killed on drop.

use super::wire::raw_request;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The longest any single step of a test may take.
pub const STEP: Duration = Duration::from_secs(10);

/// Awaits `f` under [`STEP`], panicking with `what` on timeout.
pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// The wsedge binary under test: this build's, or another build's given in `WSEDGE_BIN`
/// (to run the suite against an older commit, say).
pub fn wsedge_bin() -> PathBuf {
    std::env::var_os("WSEDGE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_wsedge")))
}

/// A free port on 127.0.0.1, for servers that cannot take port 0 (etcd, ClickHouse): bound,
/// then released for the server to bind (their harnesses retry on a lost race).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A unique scratch directory under the system temp dir.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "wsedge-test-{}-{}-{}",
        std::process::id(),
        tag,
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running wsedge process; killed on drop.
pub struct Edge {
    child: Child,
    /// The HTTP listener.
    pub addr: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// The HTTPS listener, if any.
    pub https: Option<SocketAddr>,
    pub pid: u32,
    /// Everything wsedge wrote on stderr (its log), filled by a reader thread.
    pub log: Arc<Mutex<String>>,
    /// The access-log lines (JSON) wsedge wrote on stdout.
    pub access: Arc<Mutex<Vec<String>>>,
    pub dir: PathBuf,
}

impl Edge {
    /// Starts wsedge with `yaml` (which should listen on 127.0.0.1:0).
    pub fn start(yaml: &str) -> Edge {
        Self::start_with_args(yaml, &[])
    }

    /// Starts wsedge with `yaml` and extra command-line arguments.
    pub fn start_with_args(yaml: &str, args: &[&str]) -> Edge {
        let dir = scratch_dir("edge");
        let path = dir.join("wsedge.yaml");
        std::fs::write(&path, with_admin(yaml)).unwrap();
        Self::start_file(&path, dir, args)
    }

    pub fn start_file(path: &std::path::Path, dir: PathBuf, args: &[&str]) -> Edge {
        Self::start_opts(path, dir, args, false, &wsedge_bin())
    }

    /// Like [`Self::start_file`], running `program`; with `stall_stdout`, stdout (the access
    /// log) is no longer read once the listeners are reported: a log shipper that stopped
    /// reading.
    pub fn start_opts(
        path: &std::path::Path,
        dir: PathBuf,
        args: &[&str],
        stall_stdout: bool,
        program: &std::path::Path,
    ) -> Edge {
        let mut child = Command::new(program)
            .args(args)
            .arg("-c")
            .arg(path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wsedge");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let access = Arc::new(Mutex::new(Vec::new()));
        let access2 = access.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                let l = std::mem::take(&mut line);
                let line = l.trim_end_matches('\n').to_string();
                let admin_line = line.starts_with("wsedge: admin on");
                let found = [
                    ("http", "wsedge: listening on http://"),
                    ("https", "wsedge: listening on https://"),
                    ("admin", "wsedge: admin on http://"),
                ]
                .into_iter()
                .find_map(|(kind, prefix)| {
                    Some((kind, line.strip_prefix(prefix)?.parse::<SocketAddr>().ok()?))
                });
                if let Some(f) = found {
                    let _ = tx.send(f);
                } else if line.starts_with('{') {
                    access2.lock().unwrap().push(line);
                }
                if stall_stdout && admin_line {
                    // Keep the pipe open, never read again.
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
        });
        let (mut addr, mut https, mut admin) = (None, None, None);
        // The admin line comes last.
        while admin.is_none() {
            match rx.recv_timeout(STEP) {
                Ok(("http", a)) => addr = addr.or(Some(a)),
                Ok(("https", a)) => https = https.or(Some(a)),
                Ok((_, a)) => admin = Some(a),
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "wsedge did not report its listeners; log:\n{}",
                        log.lock().unwrap()
                    );
                }
            }
        }
        let pid = child.id();
        Edge {
            child,
            addr: addr.or(https).unwrap(),
            https,
            admin: admin.unwrap(),
            pid,
            log,
            access,
            dir,
        }
    }

    /// The access-log lines so far.
    pub fn access_lines(&self) -> Vec<String> {
        self.access.lock().unwrap().clone()
    }

    /// Sends `signal` (like "HUP", "TERM", "QUIT") to the process.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit, up to `limit`; true if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let end = std::time::Instant::now() + limit;
        while std::time::Instant::now() < end {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// An admin request; returns (status, body).
    pub async fn admin_request(&self, method: &str, path: &str) -> (u16, String) {
        let host = format!("Host: {}\r\n", self.admin);
        self.admin_request_with(method, path, &host).await
    }

    /// An admin request with these header lines (each ending in CRLF, Host included).
    pub async fn admin_request_with(
        &self,
        method: &str,
        path: &str,
        headers: &str,
    ) -> (u16, String) {
        let answer = raw_request(
            self.admin,
            &format!("{method} {path} HTTP/1.1\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// Waits (bounded) until the log contains every one of `needles`; returns the log.
    pub fn wait_log(&self, needles: &[&str]) -> String {
        let end = std::time::Instant::now() + STEP;
        loop {
            let log = self.log_text();
            if needles.iter().all(|n| log.contains(n)) || std::time::Instant::now() > end {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) until `n` access lines satisfy `pred`; returns all lines.
    pub fn wait_access(&self, n: usize, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let end = std::time::Instant::now() + STEP;
        loop {
            let lines = self.access_lines();
            if lines.iter().filter(|l| pred(l)).count() >= n || std::time::Instant::now() > end {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Adds an admin listener on 127.0.0.2:0 unless the file has one: tests never use fixed
/// ports, and a different loopback address keeps it apart from the port-0 HTTP listener.
pub fn with_admin(yaml: &str) -> String {
    if yaml.lines().any(|l| l.starts_with("admin:")) {
        yaml.to_string()
    } else {
        format!("admin: \"127.0.0.2:0\"\n{yaml}")
    }
}

/// `wsedge -t` on `yaml` written to a scratch file named `name` (errors name it): the
/// process's output.
pub fn check_config(name: &str, yaml: &str) -> std::process::Output {
    let dir = scratch_dir("check");
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(wsedge_bin())
        .args(["-t", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    out
}
