//! Which TCP ports this process listens on, read from `/proc` (Linux). Pingora binds the
//! listeners itself and reports nothing, so wsedge looks once they are up and prints where
//! to connect: the readiness line that people, scripts and tests wait for.
//!
//! Port 0 ("any free port") is resolved before Pingora binds when two port-0 listeners share
//! an IP ([`pin_ambiguous_ports`]): their bound sockets could not be told apart afterwards.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

/// The addresses this process is listening on (TCP, IPv4 and IPv6).
pub fn listening_addrs() -> Vec<SocketAddr> {
    let inodes: HashSet<u64> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect();
    let mut out = Vec::new();
    for (file, v6) in [("/proc/self/net/tcp", false), ("/proc/self/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != "0A" {
                continue; // 0A = LISTEN
            }
            if !f[9].parse().is_ok_and(|i: u64| inodes.contains(&i)) {
                continue;
            }
            if let Some(addr) = parse_proc_addr(f[1], v6) {
                out.push(addr);
            }
        }
    }
    out.sort();
    out
}

/// `0100007F:1F90` → 127.0.0.1:8080 (the kernel prints the address in host byte order
/// per 32-bit word).
fn parse_proc_addr(s: &str, v6: bool) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = if v6 {
        let mut bytes = [0u8; 16];
        for i in 0..4 {
            let word = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
            bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.to_ne_bytes(),
        ))
    };
    Some(SocketAddr::new(ip, port))
}

/// Replaces port 0 by a port that is free now (the kernel's pick for a socket bound and
/// closed here) in each address of `addrs` that shares its IP with another port-0 address:
/// those listeners could not be told apart once bound, and the readiness line could print
/// an https listener as http. Another process could take the port before Pingora binds
/// it; Pingora's bind then fails loudly, which is better than a wrong line. Unambiguous
/// addresses are left as they are: a graceful upgrade (`-u`) inherits listeners under the
/// addresses the configuration gives, port 0 included.
pub fn pin_ambiguous_ports(addrs: &mut [&mut SocketAddr]) -> std::io::Result<()> {
    let zero_ips: Vec<IpAddr> = addrs
        .iter()
        .filter(|a| a.port() == 0)
        .map(|a| a.ip())
        .collect();
    for a in addrs.iter_mut() {
        let shared = zero_ips.iter().filter(|ip| **ip == a.ip()).count() > 1;
        if a.port() == 0 && shared {
            **a = std::net::TcpListener::bind(**a)?.local_addr()?;
        }
    }
    Ok(())
}

/// Waits (up to `limit`) until every configured listener is bound and returns the bound
/// addresses that match `wanted` (same IP; port 0 matches any port), in `wanted` order.
pub fn wait_for(
    wanted: &[SocketAddr],
    exclude: &[SocketAddr],
    limit: Duration,
) -> Option<Vec<SocketAddr>> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let mut bound: Vec<SocketAddr> = listening_addrs()
            .into_iter()
            .filter(|a| !exclude.contains(a))
            .collect();
        // Fixed ports first, so a port-0 listener cannot take a fixed one's socket.
        let mut found: Vec<Option<SocketAddr>> = vec![None; wanted.len()];
        for fixed_pass in [true, false] {
            for (slot, w) in found.iter_mut().zip(wanted) {
                if slot.is_some() || (w.port() != 0) != fixed_pass {
                    continue;
                }
                let pos = bound
                    .iter()
                    .position(|b| b.ip() == w.ip() && (w.port() == 0 || b.port() == w.port()));
                if let Some(i) = pos {
                    *slot = Some(bound.remove(i));
                }
            }
        }
        if found.iter().all(Option::is_some) {
            return Some(found.into_iter().flatten().collect());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_own_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert!(listening_addrs().contains(&addr));
        let w = wait_for(
            &["127.0.0.1:0".parse().unwrap()],
            &[],
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(w[0].ip(), addr.ip());
    }
}
