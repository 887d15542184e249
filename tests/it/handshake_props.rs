//! Property suite over the handshake checks: arbitrary methods, versions and header sets
//! never panic and always give one of the answers of docs/design.md (Ok, 400, 426; 403 from the
//! origin gate). Cases per run: `PROPTEST_CASES` (CI runs the default below; the 10 million
//! case run is `PROPTEST_CASES=10000000 cargo test --release --test handshake_props`).

use proptest::prelude::*;
use wsedge::handshake;
use wsedge::Answer;

/// Header names the checks care about, plus noise.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("Upgrade".to_string()),
        Just("Connection".to_string()),
        Just("Sec-WebSocket-Key".to_string()),
        Just("Sec-WebSocket-Version".to_string()),
        Just("Content-Length".to_string()),
        Just("Transfer-Encoding".to_string()),
        Just("Origin".to_string()),
        Just("Host".to_string()),
        "[A-Za-z][A-Za-z0-9-]{0,20}",
    ]
}

/// Values that are near the valid ones, and arbitrary visible bytes.
fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"websocket".to_vec()),
        Just(b"Upgrade".to_vec()),
        Just(b"keep-alive, Upgrade".to_vec()),
        Just(b"dGhlIHNhbXBsZSBub25jZQ==".to_vec()),
        Just(b"13".to_vec()),
        Just(b"0".to_vec()),
        Just(b"chunked".to_vec()),
        "[A-Za-z0-9+/=]{0,30}".prop_map(String::into_bytes),
        proptest::collection::vec(0x20u8..0x7f, 0..40),
        // Any byte a header value may hold (obs-text included), without rejection sampling.
        proptest::collection::vec(
            any::<u8>().prop_map(|b| if b == b'\t' || (b >= 0x20 && b != 0x7f) {
                b
            } else {
                b' '
            }),
            0..40
        ),
    ]
}

fn request() -> impl Strategy<Value = pingora::http::RequestHeader> {
    (
        prop_oneof![Just("GET"), Just("POST"), Just("HEAD"), Just("OPTIONS")],
        prop_oneof![
            Just(http::Version::HTTP_11),
            Just(http::Version::HTTP_10),
            Just(http::Version::HTTP_2)
        ],
        proptest::collection::vec((name(), value()), 0..12),
    )
        .prop_map(|(method, version, headers)| {
            let mut r = pingora::http::RequestHeader::build(method, b"/ws", None).unwrap();
            r.set_version(version);
            for (n, v) in headers {
                if let Ok(v) = http::HeaderValue::from_bytes(&v) {
                    let _ = r.append_header(n, v);
                }
            }
            r
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(5_000)
    ))]

    #[test]
    fn any_header_set_gets_a_status_of_the_table(req in request()) {
        let result = handshake::check(&req);
        match result {
            Ok(()) => {
                // Only a well-formed GET/1.1 upgrade passes.
                prop_assert_eq!(req.method.as_str(), "GET");
                prop_assert_eq!(req.version, http::Version::HTTP_11);
            }
            Err(reject) => {
                prop_assert!(matches!(reject.status(), 400 | 426), "{:?}", reject);
                prop_assert!(!reject.body().is_empty());
                if reject == Answer::UnsupportedVersion {
                    prop_assert!(req.headers.contains_key("sec-websocket-version"));
                }
            }
        }
        let _ = handshake::is_upgrade(&req);
    }
}

// Paths: what the gate decides on, and what an origin makes of what it is sent.

/// Pieces of paths an attacker tries, and some noise.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        prop_oneof![
            Just("ws"),
            Just("admin"),
            Just("room"),
            Just("."),
            Just(".."),
            Just(""),
            Just("%2e"),
            Just("%2E%2e"),
            Just("%2e."),
            Just(".%2E"),
            Just("%2f"),
            Just("%2F"),
            Just("%5c"),
            Just("\\"),
            Just("%252e%252e"),
            Just("%25"),
            Just("%2532%2545"),
            Just("..;"),
            Just(".;x"),
            Just("..%3b"),
            Just("%77s"),
            Just("w%73"),
            Just("a%20b"),
            Just("%00"),
            Just("%zz"),
            Just("%C3%A9"),
            Just(";x"),
            Just("ws%2f.."),
        ]
        .prop_map(str::to_string),
        "[a-z.%;~0-9A-F]{0,6}",
    ]
}

fn raw_path() -> impl Strategy<Value = String> {
    proptest::collection::vec(segment(), 0..8).prop_map(|s| format!("/{}", s.join("/")))
}

/// How a lenient origin reads a path: decodes every percent-encoding (up to three times,
/// for origins that decode again), takes `\` for `/`, drops `;parameters`, merges slashes
/// and resolves dot-segments (never above the root).
fn origin_view(path: &str) -> String {
    let mut bytes = path.as_bytes().to_vec();
    for _ in 0..3 {
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
            }
            out.push(bytes[i]);
            i += 1;
        }
        bytes = out;
    }
    let text = String::from_utf8_lossy(&bytes).replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    for seg in text.split('/') {
        let seg = seg.split(';').next().unwrap_or("");
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

fn with_paths(paths: &str) -> std::sync::Arc<wsedge::Resource> {
    let yaml = format!(
        "listen: {{ http: [\"127.0.0.1:0\"] }}\nresources:\n  - name: r\n    hostnames: [a.b]\n    origin: {{ servers: [{{ address: \"127.0.0.1:1\" }}] }}\n    websocket: {{ paths: {paths} }}\n"
    );
    wsedge::Config::from_yaml("t.yaml", &yaml)
        .unwrap()
        .resources[0]
        .clone()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(5_000)
    ))]

    #[test]
    fn nothing_outside_paths_ever_reaches_the_origin(raw in raw_path()) {
        let res = with_paths("[\"/ws\"]");
        if let Ok(sent) = wsedge::gate::check(&res, &raw) {
            let seen = origin_view(&sent);
            prop_assert!(
                seen == "/ws" || seen.starts_with("/ws/"),
                "{} was let through as {} and an origin reads {}", raw, sent, seen
            );
        }
    }

    #[test]
    fn the_decision_on_a_normal_path_is_the_decision_on_the_raw_path(raw in raw_path()) {
        let res = with_paths("[\"/ws\", \"/api/\"]");
        if let Ok(normal) = wsedge::path::normalize(&raw) {
            // Normal form is a fixed point.
            prop_assert_eq!(wsedge::path::normalize(&normal).unwrap(), normal.clone());
            if normal == raw {
                prop_assert_eq!(
                    wsedge::gate::check(&res, &raw).is_ok(),
                    res.path_allowed(&raw),
                    "{}", raw
                );
            }
        }
    }

    #[test]
    fn only_host_names_and_addresses_are_hosts(
        host in prop_oneof![
            "[a-z0-9.-]{0,20}(:[0-9]{0,6})?",
            "\\[[0-9a-f:]{0,12}\\](:[0-9]{1,5})?",
            proptest::collection::vec(0x20u8..0x7f, 0..30).prop_map(|v| String::from_utf8(v).unwrap()),
        ]
    ) {
        if let Some(name) = wsedge::host::valid_host(&host) {
            prop_assert!(!name.is_empty());
            prop_assert!(
                name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b)),
                "{:?}", host
            );
            prop_assert!(!host.contains(['/', ' ', '"', '@', '%', '\\']), "{:?}", host);
        }
    }
}
