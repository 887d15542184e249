//! Host names as clients write them (a Host header, an `:authority`): which values are
//! hosts at all, and the host without its port.

/// A Host header (or `:authority`) value checked against RFC 9110 §7.2 and RFC 3986 §3.2.2,
/// returning the host without its port: a DNS name (letters, digits, `-`, `_`, labels of 1 to
/// 63 characters, 253 in all, one trailing dot allowed), a dotted IPv4 address or a
/// bracketed IPv6 address, then an optional `:port` of digits. Anything else (`evil/`,
/// spaces, quotes, percent-encodings, `user@`, an empty name) is not a host and is never
/// routed or forwarded: the request gets 400.
pub fn valid_host(value: &str) -> Option<&str> {
    let host = strip_port(value);
    if host.len() != value.len() {
        let port = value[host.len()..].strip_prefix(':')?;
        if port.is_empty() || port.len() > 5 || port.parse::<u32>().map_or(true, |p| p > 65535) {
            return None;
        }
    }
    if let Some(inner) = host.strip_prefix('[') {
        let addr = inner.strip_suffix(']')?;
        return addr.parse::<std::net::Ipv6Addr>().is_ok().then_some(host);
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    (!name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok)).then_some(host)
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_names_or_addresses() {
        for ok in [
            "chat.example.com",
            "Chat.Example.com:8080",
            "example.com.",
            "_dmarc.example.com",
            "127.0.0.1:80",
            "[::1]:443",
            "[2001:db8::1]",
            "localhost",
        ] {
            assert!(valid_host(ok).is_some(), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "evil/.example.com",
            "a b.example.com",
            "\"q\".example.com",
            "a..b",
            "a%2eb.example.com",
            "user@example.com",
            "example.com:",
            "example.com:99999",
            "example.com:8o",
            "[::1",
            "[nonsense]",
            "[::1]x",
            "[::1]x80",
            ".",
        ] {
            assert!(valid_host(bad).is_none(), "{bad}");
        }
        assert!(valid_host(&"a".repeat(64)).is_none());
        assert_eq!(valid_host("example.com:443"), Some("example.com"));
    }
}
