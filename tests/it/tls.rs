//! TLS at the edge: the right certificate per SNI (exact and wildcard), wss:// echoes to
//! http and https origins, unknown SNI refused, Host/SNI mismatch 421, ALPN, and broken
//! key files caught at load.

use crate::common::*;
use std::net::SocketAddr;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_tungstenite::tungstenite::Message;

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn tls_connect(
    pki: &Pki,
    addr: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream> {
    let tcp = within("connect", tokio::net::TcpStream::connect(addr)).await?;
    within(
        "tls handshake",
        pki.connector(alpn)
            .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp),
    )
    .await
}

fn config(
    pki: &Pki,
    a: &Issued,
    b: &Issued,
    plain: SocketAddr,
    tls_origin: SocketAddr,
    extra: &str,
) -> String {
    format!(
        r#"
listen:
  http: ["127.0.0.1:0"]
  https: ["127.0.0.3:0"]{extra}
resources:
  - name: a
    hostnames: ["a.test"]
    origin: {{ servers: [{{ address: "{plain}" }}] }}
    tls: {{ certificate: "{}", private_key: "{}" }}
  - name: b
    hostnames: ["*.b.test"]
    origin: {{ protocol: follow, sni: origin.test, ca_file: "{}", servers: [{{ address: "{tls_origin}" }}] }}
    tls: {{ certificate: "{}", private_key: "{}" }}
  - name: c
    hostnames: ["c.test", "127.0.0.1"]
    origin: {{ servers: [{{ address: "{plain}" }}] }}
"#,
        a.cert.display(),
        a.key.display(),
        pki.ca_path().display(),
        b.cert.display(),
        b.key.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_gets_the_certificate_of_its_sni_and_echoes_to_http_and_https_origins() {
    let pki = Pki::new("tls");
    let a = pki.issue("a", &["a.test"]);
    let b = pki.issue("b", &["*.b.test"]);
    let origin_cert = pki.issue("origin", &["origin.test"]);
    let plain = Origin::start(Mode::Echo).await;
    let tls_origin = Origin::start_tls(Mode::Echo, pki.acceptor(&origin_cert)).await;
    let edge = Edge::start(&config(&pki, &a, &b, plain.addr, tls_origin.addr, ""));
    let https = edge.https.expect("an https listener");

    for (sni, want, origin) in [("a.test", &a, &plain), ("eu.b.test", &b, &tls_origin)] {
        let tls = tls_connect(&pki, https, sni, &[b"http/1.1"]).await.unwrap();
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0]
            .as_ref()
            .to_vec();
        assert_eq!(leaf, want.der, "{sni} got the wrong certificate");
        let (mut ws, resp) = within(
            "wss handshake",
            tokio_tungstenite::client_async(format!("wss://{sni}/ws"), tls),
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), 101);
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(
            echo_once(&mut ws, Message::binary(big.clone())).await,
            Message::binary(big),
            "{sni}"
        );
        assert_eq!(
            echo_once(&mut ws, Message::text("é ✓")).await,
            Message::text("é ✓")
        );
        within("close", ws.close(None)).await.unwrap();
        assert_eq!(origin.count(), 1, "{sni}: one connection to its origin");
    }
    // `follow` took https to the origin for the TLS client (the TLS origin served it), and
    // a plain ws:// client of the same resource goes over http.
    let seen = tls_origin.seen();
    let Some(Seen::Request(headers)) = seen.first() else {
        panic!("{seen:?}")
    };
    assert!(
        headers.contains(&("x-forwarded-proto".into(), "https".into())),
        "{headers:?}"
    );

    // Unknown SNI (a resource without a certificate, no default): no handshake.
    assert!(tls_connect(&pki, https, "c.test", &[]).await.is_err());
    assert!(tls_connect(&pki, https, "nobody.test", &[]).await.is_err());
    // A name two labels below the wildcard is not covered either.
    assert!(tls_connect(&pki, https, "x.y.b.test", &[]).await.is_err());

    // Host of another resource than the SNI: 421, for upgrades and plain requests.
    for req in [
        upgrade_request("/ws", "").replace("Host: localhost", "Host: eu.b.test"),
        "GET / HTTP/1.1\r\nHost: c.test\r\nConnection: close\r\n\r\n".to_string(),
    ] {
        let mut tls = tls_connect(&pki, https, "a.test", &[b"http/1.1"])
            .await
            .unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        within("write", tls.write_all(req.as_bytes()))
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = within("read", tls.read(&mut buf)).await.unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(answer.starts_with("HTTP/1.1 421"), "{answer}");
    }
    assert_eq!(plain.count(), 1, "misdirected requests reached no origin");

    // ALPN: h2 is offered for plain requests; a client offering http/1.1 only gets it.
    let h2 = tls_connect(&pki, https, "a.test", &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let h1 = tls_connect(&pki, https, "a.test", &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(h1.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test]
async fn default_certificate_serves_unknown_sni_and_reload_swaps_certificates() {
    let pki = Pki::new("tls-default");
    let a = pki.issue("a", &["a.test"]);
    let b = pki.issue("b", &["*.b.test"]);
    let fallback = pki.issue("default", &["edge.test"]);
    let plain = Origin::start(Mode::Echo).await;
    let extra = format!(
        "\n  default_certificate: {{ certificate: \"{}\", private_key: \"{}\" }}",
        fallback.cert.display(),
        fallback.key.display()
    );
    let edge = Edge::start(&config(&pki, &a, &b, plain.addr, plain.addr, &extra));
    let https = edge.https.unwrap();
    let tls = tls_connect(&pki, https, "c.test", &[]).await;
    // The default certificate does not name c.test, so a verifying client refuses it:
    // that it was offered is what the server side controls.
    let err = match tls {
        Ok(_) => panic!("a verifying client refuses the default certificate for c.test"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("certificate") || err.contains("Certificate"),
        "{err}"
    );

    // Reload with a new certificate for a.test: new handshakes get it.
    let a2 = pki.issue("a2", &["a.test"]);
    let path = edge.dir.join("wsedge.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(
            &a.cert.display().to_string(),
            &a2.cert.display().to_string(),
        )
        .replace(&a.key.display().to_string(), &a2.key.display().to_string());
    std::fs::write(&path, text).unwrap();
    let (status, body) = edge.admin_request("POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    let tls = tls_connect(&pki, https, "a.test", &[]).await.unwrap();
    assert_eq!(
        tls.get_ref().1.peer_certificates().unwrap()[0].as_ref(),
        a2.der.as_slice()
    );
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[test]
fn broken_key_and_missing_file_fail_the_check_with_the_resource_and_file() {
    let pki = Pki::new("tls-broken");
    let a = pki.issue("a", &["a.test"]);
    let other = pki.issue("other", &["other.test"]);
    let yaml = |cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "listen: {{ https: [\"127.0.0.1:8443\"] }}\nresources:\n  - name: shop\n    hostnames: [\"shop.test\"]\n    origin: {{ servers: [{{ address: \"127.0.0.1:1\" }}] }}\n    tls: {{ certificate: \"{}\", private_key: \"{}\" }}\n",
            cert.display(),
            key.display()
        )
    };
    let check = |text: String| {
        let path = pki.dir.join("check.yaml");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsedge"))
            .args(["-t", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = check(yaml(&a.cert, &other.key));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("resource \"shop\"")
            && err.contains("resources[0].tls")
            && err.contains("does not match"),
        "{err}"
    );
    assert!(err.contains("check.yaml:6:"), "the line: {err}");
    let (code, err) = check(yaml(&pki.dir.join("missing.pem"), &a.key));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("missing.pem") && err.contains("cannot read"),
        "{err}"
    );
    let (code, err) = check(yaml(&a.cert, &a.key));
    assert_eq!(code, Some(0), "{err}");
    let _ = std::fs::remove_dir_all(&pki.dir);
}
