//! What a container needs from the edge: `wsedge healthcheck` (a `HEALTHCHECK` without
//! curl in the image), a hint when a listener on loopback can never be reached through
//! `docker run -p`, and a clear error when the directory of Pingora's upgrade socket is
//! not the process's to write (a shared volume owned by another user).

use crate::config::Config;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

/// Whether this process runs as a container's main process (PID 1 in a container made by
/// Docker or Podman): there, a listener on loopback is out of reach of published ports.
pub fn container_main_process() -> bool {
    std::process::id() == 1
        && (Path::new("/.dockerenv").exists() || Path::new("/run/.containerenv").exists())
}

/// The listeners on a loopback address, and what to do about them, when this process is
/// a container's main process.
pub fn loopback_hint(config: &Config) -> Option<String> {
    if !container_main_process() {
        return None;
    }
    let loopback: Vec<String> = config
        .listen
        .http
        .iter()
        .chain(&config.listen.https)
        .filter(|a| a.ip().is_loopback())
        .map(|a| a.to_string())
        .collect();
    (!loopback.is_empty()).then(|| {
        format!(
            "listening on {} inside a container: connections published with `docker run -p` arrive on the container's own address and are refused; listen on 0.0.0.0 (or [::]) instead",
            loopback.join(", ")
        )
    })
}

/// `GET /healthz` on the admin listener of the configuration at `path` (an unspecified
/// address is asked on loopback): the body when it answers 200.
pub fn healthcheck(path: &Path) -> Result<String, String> {
    let text = crate::config::read_text(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let admin = admin_addr(&text).map_err(|e| format!("{}: admin: {e}", path.display()))?;
    let target = match admin.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), admin.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), admin.port())
        }
        _ => admin,
    };
    let limit = Duration::from_secs(3);
    let mut s = TcpStream::connect_timeout(&target, limit).map_err(|e| format!("{target}: {e}"))?;
    s.set_read_timeout(Some(limit)).ok();
    s.set_write_timeout(Some(limit)).ok();
    write!(
        s,
        "GET /healthz HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{target}: {e}"))?;
    let mut answer = Vec::new();
    s.take(64 * 1024)
        .read_to_end(&mut answer)
        .map_err(|e| format!("{target}: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.split_whitespace().nth(1).unwrap_or("");
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .trim()
        .to_string();
    if status == "200" {
        Ok(body)
    } else {
        Err(format!("{target}: /healthz answered {status}: {body}"))
    }
}

/// The admin address of a configuration's text (`admin: ip:port` or `admin: { listen }`),
/// or the default.
fn admin_addr(text: &str) -> Result<SocketAddr, String> {
    let v: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let a = match v.get("admin") {
        None => return Ok(crate::config::DEFAULT_ADMIN),
        Some(a) => a.get("listen").unwrap_or(a),
    };
    a.as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "not an address like 0.0.0.0:9090".to_string())
}

/// Checks that this process may create Pingora's upgrade socket at `sock` (`-u` binds it):
/// a directory it cannot write fails with who owns it and what to do, not with Pingora's
/// bare EACCES after the old process was already told to hand over.
pub fn check_upgrade_socket(sock: &str) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let dir = match Path::new(sock).parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let probe = dir.join(format!(".wsedge-probe-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => {
            let (uid, gid) = crate::os::effective_ids();
            let owner = std::fs::metadata(dir).map_or_else(
                |e| format!("cannot be read ({e})"),
                |m| {
                    format!(
                        "is owned by uid {} gid {} with mode {:04o}",
                        m.uid(),
                        m.gid(),
                        m.mode() & 0o7777
                    )
                },
            );
            Err(format!(
                "pingora.upgrade_sock {sock}: wsedge runs as uid {uid} gid {gid} and cannot create the socket in {} ({e}); the directory {owner}: give it to this user (chown {uid}:{gid}), or set pingora.upgrade_sock (and the old process's) to a directory it may write",
                dir.display()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_admin_address_is_read_from_either_form() {
        use super::admin_addr;
        assert_eq!(
            admin_addr("listen: {}").unwrap(),
            crate::config::DEFAULT_ADMIN
        );
        assert_eq!(admin_addr("admin: \"0.0.0.0:9091\"").unwrap().port(), 9091);
        assert_eq!(
            admin_addr("admin: { listen: \"[::]:9092\" }")
                .unwrap()
                .port(),
            9092
        );
        assert!(admin_addr("admin: nope").is_err());
        assert!(admin_addr("admin: [").is_err());
    }
}
