//! A real etcd server on loopback (Debian's `etcd-server`; `scripts/setup` installs it),
//! on free ports, ready when it says it serves clients; and a TCP relay in front of it that
//! a test can cut and restore (a network partition between an edge and etcd, while the
//! test's own client still reaches etcd directly).

use super::edge::{free_port, scratch_dir, STEP};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// A running etcd; stopped on drop.
pub struct Etcd {
    child: Option<Child>,
    /// Its client URL, `http://127.0.0.1:port`.
    pub url: String,
    pub addr: SocketAddr,
    peer: u16,
    dir: PathBuf,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
    /// Server certificate and key, and the CA clients must present a certificate of.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl Etcd {
    /// Starts a one-member etcd with its data in a scratch directory.
    pub fn start() -> Etcd {
        Self::start_with(None)
    }

    /// Starts etcd on https with `cert`/`key`, requiring client certificates signed by
    /// `client_ca`.
    pub fn start_tls(cert: PathBuf, key: PathBuf, client_ca: PathBuf) -> Etcd {
        Self::start_with(Some((cert, key, client_ca)))
    }

    fn start_with(tls: Option<(PathBuf, PathBuf, PathBuf)>) -> Etcd {
        let scheme = if tls.is_some() { "https" } else { "http" };
        for _ in 0..5 {
            let (client, peer) = (free_port(), free_port());
            let mut e = Etcd {
                child: None,
                url: format!("{scheme}://127.0.0.1:{client}"),
                addr: SocketAddr::from(([127, 0, 0, 1], client)),
                peer,
                dir: scratch_dir("etcd"),
                log: Default::default(),
                tls: tls.clone(),
            };
            if e.spawn() {
                return e;
            }
        }
        panic!("etcd did not start on free ports five times");
    }

    /// Starts the process (again, on the same ports and data); true once it serves.
    fn spawn(&mut self) -> bool {
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("etcd is not installed: `apt-get install etcd-server` (scripts/setup does)");
        let mut command = Command::new(bin);
        if let Some((cert, key, ca)) = &self.tls {
            command
                .arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key)
                .arg("--trusted-ca-file")
                .arg(ca)
                .arg("--client-cert-auth");
        }
        let mut child = command
            .args(["--name", "t", "--logger", "zap", "--log-outputs", "stderr"])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &self.url])
            .args(["--advertise-client-urls", &self.url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn etcd");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        std::thread::spawn(move || {
            // Ready: a leader (it published itself through raft) and the client port served
            // (etcd 3.4 says "serving client traffic", 3.5 "ready to serve client requests").
            let (mut leader, mut serving) = (false, false);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                leader |= line.contains("published local member to cluster");
                serving |= line.contains("serving client traffic")
                    || line.contains("serving client requests")
                    || line.contains("ready to serve client requests");
                if leader && serving {
                    let _ = tx.send(true);
                }
                if line.contains("address already in use") {
                    let _ = tx.send(false);
                }
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        match rx.recv_timeout(STEP) {
            Ok(true) => {
                self.child = Some(child);
                true
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                false
            }
        }
    }

    /// Stops the process (its data stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports, with the same data.
    pub fn restart(&mut self) {
        for _ in 0..20 {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("etcd did not restart; log:\n{}", self.log.lock().unwrap());
    }

    /// Starts it again on the same ports with no data: a store rebuilt from scratch.
    pub fn restart_empty(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.join("data"));
        self.restart();
    }

    /// A client of it.
    pub async fn client(&self) -> etcd_client::Client {
        super::within(
            "connect to etcd",
            etcd_client::Client::connect([self.url.as_str()], None),
        )
        .await
        .expect("etcd client connects")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP relay to `target` that can be cut (every connection through it closed, new ones
/// refused) and restored.
pub struct Relay {
    pub addr: SocketAddr,
    open: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, watch) = tokio::sync::watch::channel(true);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !*watch.borrow() {
                    drop(inbound);
                    continue;
                }
                let mut cut = watch.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Relay { addr, open }
    }

    /// Closes every connection through the relay and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}
