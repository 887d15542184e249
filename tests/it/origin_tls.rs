//! Origin protocols: https with SNI and verification against a CA made at test time,
//! `verify_tls: false` only when asked, and `follow` using the client's scheme.

use crate::common::*;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn https_origin_verified_against_ca_file_and_sni() {
    let pki = Pki::new("pki");
    let ca = pki.ca_path();
    let tls_origin = Origin::start_tls(
        Mode::Echo,
        pki.acceptor(&pki.issue("origin", &["origin.test"])),
    )
    .await;
    let plain_origin = Origin::start(Mode::Echo).await;
    let yaml = format!(
        r#"
listen: {{ http: ["127.0.0.1:0"] }}
resources:
  - name: trusted
    hostnames: ["trusted.localhost"]
    origin: {{ protocol: https, sni: origin.test, ca_file: "{ca}", servers: [{{ address: "{tls}" }}] }}
  - name: untrusted
    hostnames: ["untrusted.localhost"]
    origin: {{ protocol: https, sni: origin.test, servers: [{{ address: "{tls}" }}] }}
  - name: wrong-name
    hostnames: ["wrong-name.localhost"]
    origin: {{ protocol: https, sni: other.test, ca_file: "{ca}", servers: [{{ address: "{tls}" }}] }}
  - name: unverified
    hostnames: ["unverified.localhost"]
    origin: {{ protocol: https, sni: origin.test, verify_tls: false, servers: [{{ address: "{tls}" }}] }}
  - name: follow
    hostnames: ["follow.localhost"]
    origin: {{ protocol: follow, servers: [{{ address: "{plain}" }}] }}
"#,
        ca = ca.display(),
        tls = tls_origin.addr,
        plain = plain_origin.addr,
    );
    let edge = Edge::start(&yaml);
    let connect = |host: &str| {
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                edge.url("/ws"),
            )
            .unwrap();
        req.headers_mut().insert("Host", host.parse().unwrap());
        tokio_tungstenite::connect_async(req)
    };

    for host in ["trusted.localhost", "unverified.localhost"] {
        let (mut ws, _) = within("connect", connect(host))
            .await
            .unwrap_or_else(|e| panic!("{host}: {e}\n{}", edge.log_text()));
        let big = "x".repeat(100_000);
        assert_eq!(
            echo_once(&mut ws, Message::text(big.clone())).await,
            Message::text(big),
            "{host}"
        );
    }

    for host in ["untrusted.localhost", "wrong-name.localhost"] {
        let err = within("connect", connect(host)).await.unwrap_err();
        match err {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                assert_eq!(resp.status(), 502, "{host}")
            }
            other => panic!("{host}: want 502, got {other:?}"),
        }
    }
    let log = edge.wait_log(&["cert"]);
    assert!(
        log.to_lowercase().contains("cert"),
        "the log says why the origin was refused:\n{log}"
    );

    // A ws:// client with `follow` goes to the origin over plain HTTP (a TLS hello would
    // not get a WebSocket echo from this plain origin).
    let (mut ws, _) = within("connect", connect("follow.localhost"))
        .await
        .unwrap();
    echo_once(&mut ws, Message::text("followed")).await;
    assert_eq!(plain_origin.count(), 1);
    let _ = std::fs::remove_dir_all(&pki.dir);
}
