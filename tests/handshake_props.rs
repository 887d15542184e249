//! Property suite over the handshake checks: arbitrary methods, versions and header sets
//! never panic and always give one of DESIGN.md §3's answers (Ok, 400, 426; 403 from the
//! origin gate). Cases per run: `PROPTEST_CASES` (CI runs the default below; the 10 million
//! case run is `PROPTEST_CASES=10000000 cargo test --release --test handshake_props`).

use proptest::prelude::*;
use wsedge::handshake::{self, Reject};

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
                if reject == Reject::UnsupportedVersion {
                    prop_assert!(req.headers.contains_key("sec-websocket-version"));
                }
            }
        }
        let _ = handshake::is_upgrade(&req);
    }
}
