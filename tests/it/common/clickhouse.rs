//! A real ClickHouse server on loopback (Debian's `clickhouse-server`; `scripts/setup`
//! installs it), from the package's own configuration with free ports and a scratch data
//! directory, ready when `/ping` answers; and queries over its HTTP interface.

use super::edge::{free_port, scratch_dir, STEP};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running ClickHouse; stopped on drop.
pub struct ClickHouse {
    child: Child,
    /// Its HTTP interface.
    pub http: SocketAddr,
    dir: PathBuf,
}

impl ClickHouse {
    pub fn start() -> ClickHouse {
        let base = std::fs::read_to_string("/etc/clickhouse-server/config.xml").expect(
            "clickhouse-server is not installed: `apt-get install clickhouse-server` (scripts/setup does)",
        );
        for _ in 0..5 {
            let dir = scratch_dir("clickhouse");
            let (http, tcp) = (free_port(), free_port());
            let data = format!("{}/", dir.join("data").display());
            let logs = format!("{}/", dir.join("log").display());
            let config = base
                .replace(
                    "<http_port>8123</http_port>",
                    &format!("<http_port>{http}</http_port>"),
                )
                .replace(
                    "<tcp_port>9000</tcp_port>",
                    &format!("<tcp_port>{tcp}</tcp_port>"),
                )
                .replace("<interserver_http_port>9009</interserver_http_port>", "")
                .replace("<listen_host>::1</listen_host>", "")
                .replace("/var/lib/clickhouse/", &data)
                .replace("/var/log/clickhouse-server/", &logs)
                // Buckets of days and hours in UTC, whatever the machine's zone.
                .replacen("</yandex>", "<timezone>UTC</timezone></yandex>", 1);
            std::fs::write(dir.join("config.xml"), config).unwrap();
            std::fs::copy("/etc/clickhouse-server/users.xml", dir.join("users.xml")).unwrap();
            let addr = SocketAddr::from(([127, 0, 0, 1], http));
            if let Some(child) = spawn_ready(&dir, addr) {
                return ClickHouse {
                    child,
                    http: addr,
                    dir,
                };
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        panic!("clickhouse-server did not start on free ports five times");
    }

    /// Stops the server (SIGKILL: what it had acknowledged is on disk).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        for _ in 0..5 {
            if let Some(child) = spawn_ready(&self.dir, self.http) {
                self.child = child;
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("clickhouse-server did not start again on {}", self.http);
    }

    /// Applies deploy/clickhouse/schema.sql to `database` with scripts/clickhouse-migrate.
    pub fn migrate(&self, database: &str) {
        let out = Command::new("scripts/clickhouse-migrate")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["--url", &self.url(), "--database", database])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A number a query answers (0 for an empty answer), the query's error as a panic.
    pub fn number(&self, sql: &str) -> u64 {
        let answer = self.query(sql, "").unwrap_or_else(|e| panic!("{sql}: {e}"));
        answer.trim().parse().unwrap_or(0)
    }

    /// Runs `sql` (with `body` after it, for an INSERT's rows); the answer, or
    /// ClickHouse's error.
    pub fn query(&self, sql: &str, body: &str) -> Result<String, String> {
        let q: String = sql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        post(self.http, &format!("/?query={q}"), body)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// clickhouse-server from the configuration in `dir`, once `/ping` answers at `addr`.
fn spawn_ready(dir: &std::path::Path, addr: SocketAddr) -> Option<Child> {
    let mut child = Command::new("clickhouse-server")
        .arg(format!(
            "--config-file={}",
            dir.join("config.xml").display()
        ))
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn clickhouse-server");
    let started = Instant::now();
    while started.elapsed() < STEP * 2 {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if get(addr, "/ping").is_ok_and(|b| b.starts_with("Ok.")) {
            return Some(child);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn get(addr: SocketAddr, path: &str) -> Result<String, String> {
    exchange(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
}

fn post(addr: SocketAddr, path: &str, body: &str) -> Result<String, String> {
    exchange(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// One request on a new connection; the body of a 200, else the status and body.
fn exchange(addr: SocketAddr, request: &str) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(STEP)).unwrap();
    s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).map_err(|e| e.to_string())?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").ok_or("no header")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        unchunk(body)
    } else {
        body.to_string()
    };
    if head.split_whitespace().nth(1) == Some("200") {
        Ok(body)
    } else {
        Err(format!("{}: {body}", head.lines().next().unwrap_or("")))
    }
}

fn unchunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
