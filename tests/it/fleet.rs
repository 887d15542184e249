//! 17 (etcd): edges take their resources and defaults from a real etcd on loopback, apply
//! every change with the reload's swap (open tunnels carry on), refuse a change that does
//! not validate with its key and line, keep a last-known-good file to start from while
//! etcd is away, resume their watch after a cut and read everything again past a
//! compaction; `wsedge resource` checks a change before writing it with a
//! compare-and-swap.

use crate::common::*;
use etcd_client::{Client, CompactionOptions};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const PREFIX: &str = "/wsedge/";

/// An edge's local file: a listener, an admin listener, etcd at `endpoint`.
fn local(endpoint: &str, lkg: &Path, extra: &str) -> String {
    with_admin(&format!(
        "listen: {{ http: [\"127.0.0.1:0\"] }}\naccess_log: off\n{extra}source:\n  etcd:\n    endpoints: [\"{endpoint}\"]\n    prefix: {PREFIX}\n    timeout: 2s\n    last_known_good: {}\n",
        lkg.display()
    ))
}

/// A resource's value as stored in etcd.
fn resource(name: &str, hosts: &[&str], origin: SocketAddr, idle: &str) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    format!(
        "name: {name}\nhostnames: [{}]\norigin:\n  servers: [{{ address: \"{origin}\" }}]\nwebsocket:\n  idle_timeout: {idle}\n",
        hosts.join(", ")
    )
}

async fn put(client: &mut Client, key: &str, value: impl Into<Vec<u8>>) -> i64 {
    let resp = within(
        "etcd put",
        client.put(format!("{PREFIX}{key}"), value, None),
    )
    .await
    .unwrap();
    resp.header().unwrap().revision()
}

/// A real etcd holding resource `chat` (a.test) of an echo origin.
async fn etcd_with_chat() -> (Etcd, Client, Origin) {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let origin = Origin::start(Mode::Echo).await;
    put_chat(&mut client, &origin, &["a.test"]).await;
    (etcd, client, origin)
}

/// Puts resource `chat` serving `hosts` from `origin`; the revision.
async fn put_chat(client: &mut Client, origin: &Origin, hosts: &[&str]) -> i64 {
    put(
        client,
        "resources/chat",
        resource("chat", hosts, origin.addr, "30s"),
    )
    .await
}

/// Waits (bounded) until the edge has written the file at `path`.
async fn until_exists(path: &Path) {
    let end = Instant::now() + STEP;
    while !path.exists() {
        assert!(Instant::now() < end, "no file {}", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts an edge on the local file written at `dir/wsedge.yaml`.
fn start_edge(dir: &Path, text: &str) -> Edge {
    let path = dir.join("wsedge.yaml");
    std::fs::write(&path, text).unwrap();
    Edge::start_file(&path, dir.to_path_buf(), &[])
}

/// The status of an upgrade for `host` through `edge`.
async fn upgrade_status(edge: &Edge, host: &str) -> u16 {
    let req = upgrade_request("/ws", "").replace("Host: localhost", &format!("Host: {host}"));
    status(&raw_request(edge.addr, &req).await)
}

/// Waits (at most `limit`) until an upgrade for `host` gets `want`; how long it took.
async fn until_upgrade(edge: &Edge, host: &str, want: u16, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if upgrade_status(edge, host).await == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{host} never got {want}; log:\n{}",
            edge.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `/healthz` as JSON.
async fn healthz(edge: &Edge) -> serde_yaml::Value {
    let (code, body) = edge.admin_request("GET", "/healthz").await;
    assert_eq!(code, 200, "{body}");
    serde_yaml::from_str(&body).unwrap()
}

/// Waits (bounded) until `/healthz` satisfies `pred`; returns it.
async fn until_healthz(
    edge: &Edge,
    pred: impl Fn(&serde_yaml::Value) -> bool,
) -> serde_yaml::Value {
    let started = Instant::now();
    loop {
        let h = healthz(edge).await;
        if pred(&h) {
            return h;
        }
        assert!(
            started.elapsed() < STEP,
            "healthz never matched: {h:?}\nlog:\n{}",
            edge.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens `n` tunnels for `host` through `edge`.
async fn tunnels_for(edge: &Edge, host: &'static str, n: usize) -> Vec<Ws> {
    let mut all = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(50) {
        let batch = (chunk * 50..((chunk + 1) * 50).min(n))
            .map(|_| tokio_tungstenite::connect_async(ws_request_for(edge.addr, host)));
        for r in within("open tunnels", futures_util::future::join_all(batch)).await {
            all.push(r.expect("tunnel opens").0);
        }
    }
    all
}

/// Every tunnel sends `tag-i` and gets exactly that back.
async fn exchange(tunnels: &mut [Ws], tag: &str) {
    let rounds = tunnels.iter_mut().enumerate().map(|(i, ws)| async move {
        let msg = format!("{tag}-{i}");
        ws.send(Message::text(msg.clone()))
            .await
            .map_err(|e| format!("{i}: {e}"))?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str() == msg => Ok(()),
            other => Err(format!("{i}: want {msg}, got {other:?}")),
        }
    });
    let results = within("exchange", futures_util::future::join_all(rounds)).await;
    let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    assert!(
        errors.is_empty(),
        "{} tunnels failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
}

/// The `q`-quantile of `sorted`.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_edges_on_one_etcd_apply_a_hundred_changes_and_a_thousand_tunnels_carry_on() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let origin = Origin::start(Mode::Echo).await;
    put(
        &mut client,
        "defaults",
        "websocket:\n  handshake_timeout: 2s\n",
    )
    .await;

    // Three edges; one runs four worker threads and still holds one watch.
    let dirs: Vec<PathBuf> = (0..3).map(|i| scratch_dir(&format!("fleet-{i}"))).collect();
    let edges: Vec<Edge> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let threads = if i == 2 {
                "pingora: { threads: 4 }\n"
            } else {
                ""
            };
            start_edge(d, &local(&etcd.url, &d.join("lkg.yaml"), threads))
        })
        .collect();

    // A resource put with the operator's command serves on all three.
    let conf = dirs[0].join("wsedge.yaml");
    let file = dirs[0].join("chat.yaml");
    std::fs::write(&file, resource("chat", &["a.test"], origin.addr, "30s")).unwrap();
    let (ok, out, err) = resource_cmd(&conf, &["put", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    for e in &edges {
        until_upgrade(e, "a.test", 101, STEP).await;
        assert_eq!(upgrade_status(e, "b.test").await, 404);
    }
    println!("{out}");

    // 1,000 tunnels of that resource, over the three edges.
    let mut tunnels = Vec::new();
    for (i, e) in edges.iter().enumerate() {
        tunnels.extend(tunnels_for(e, "a.test", if i == 0 { 334 } else { 333 }).await);
    }
    exchange(&mut tunnels, "before").await;

    // 100 changes of that same resource, each waited for on every edge.
    let mut took = Vec::new();
    for i in 0..100 {
        let host = format!("h{i}.test");
        let idle = if i % 2 == 0 { "31s" } else { "30s" };
        let started = Instant::now();
        let revision = put(
            &mut client,
            "resources/chat",
            resource("chat", &["a.test", &host], origin.addr, idle),
        )
        .await;
        // Each edge's /healthz, every 2 ms, until it serves the revision.
        let waits = edges.iter().map(|e| async move {
            loop {
                let h = healthz(e).await;
                if h["config"]["revision"].as_i64() >= Some(revision) {
                    return started.elapsed();
                }
                assert!(
                    started.elapsed() < STEP,
                    "revision {revision} never applied: {h:?}"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        let all = futures_util::future::join_all(waits).await;
        took.push(all.into_iter().max().unwrap());
    }
    took.sort();
    println!(
        "propagation to all three edges over 100 changes: p50 {:?}, p99 {:?}, max {:?}",
        quantile(&took, 0.5),
        quantile(&took, 0.99),
        took[took.len() - 1]
    );
    for e in &edges {
        assert_eq!(upgrade_status(e, "h99.test").await, 101);
        assert_eq!(upgrade_status(e, "h98.test").await, 404);
    }
    // Not one tunnel was cut.
    exchange(&mut tunnels, "after").await;
    let mut open = 0.0;
    for e in &edges {
        let (_, metrics) = e.admin_request("GET", "/metrics").await;
        open += metric(&metrics, "wsedge_ws_tunnels_open{resource=\"chat\"}").unwrap_or(0.0);
        assert_eq!(metric(&metrics, "wsedge_config_source_up"), Some(1.0));
        let h = healthz(e).await;
        assert_eq!(h["config"]["source"].as_str(), Some("etcd"));
    }
    assert_eq!(open, 1000.0);

    // One watch per process, whatever the threads: etcd counts three streams.
    let metrics = etcd_metrics(etcd.addr).await;
    assert_eq!(
        metric(&metrics, "etcd_debugging_mvcc_watch_stream_total"),
        Some(3.0),
        "watch streams on etcd"
    );
    // Each edge keeps what it applied.
    for d in &dirs {
        let lkg = std::fs::read_to_string(d.join("lkg.yaml")).unwrap();
        assert!(lkg.contains("h99.test"), "{lkg}");
    }
    // A resource deleted from etcd is gone from every edge; its open tunnels are not cut.
    within(
        "delete",
        client.delete(format!("{PREFIX}resources/chat"), None),
    )
    .await
    .unwrap();
    for e in &edges {
        until_upgrade(e, "a.test", 404, STEP).await;
    }
    exchange(&mut tunnels[..10], "deleted").await;
}

/// etcd's own metrics page.
async fn etcd_metrics(addr: SocketAddr) -> String {
    let answer = raw_request(
        addr,
        &format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_that_does_not_validate_is_refused_at_its_key_and_line_and_the_edge_serves_on() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let origin = Origin::start(Mode::Echo).await;
    let good = resource("chat", &["a.test"], origin.addr, "30s");
    let mut serving = put(&mut client, "resources/chat", good.clone()).await;
    let dir = scratch_dir("fleet-bad");
    let edge = start_edge(&dir, &local(&etcd.url, &dir.join("lkg.yaml"), ""));
    assert_eq!(upgrade_status(&edge, "a.test").await, 101);

    let other = resource("other", &["o.test"], origin.addr, "30s");
    let huge = format!("{good}# {}\n", "x".repeat(300 * 1024));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // A bad duration on line 6 of the value.
        (
            "resources/chat",
            good.replace("30s", "5q").into(),
            "etcd /wsedge/resources/chat:6:",
        ),
        // An unknown key.
        (
            "resources/chat",
            format!("{good}  nope: 1\n").into(),
            "unknown field `nope`",
        ),
        // A hostname another resource has: the whole configuration is checked.
        (
            "resources/other",
            other.replace("o.test", "a.test").into(),
            "already belongs to resource",
        ),
        // The value's name is not its key's.
        (
            "resources/other",
            good.clone().into(),
            "its key says \"other\"",
        ),
        // A name that is not one, in the key.
        (
            "resources/UPPER",
            good.clone().into(),
            "etcd /wsedge/resources/UPPER",
        ),
        // Not text.
        ("resources/chat", vec![0xff, 0xfe, b'\n'], "not UTF-8"),
        // Two documents.
        (
            "resources/chat",
            format!("{good}---\nname: x\n").into(),
            "one YAML document",
        ),
        // An alias to nothing (values cannot share anchors).
        (
            "resources/chat",
            good.replace("[\"a.test\"]", "*hosts").into(),
            "etcd /wsedge/resources/chat:2:",
        ),
        // Too large.
        ("resources/chat", huge.into(), "at most 256 KiB"),
        // Defaults with a bad value.
        (
            "defaults",
            b"websocket: { idle_timeout: -1s }\n".to_vec(),
            "etcd /wsedge/defaults:1:",
        ),
        // YAML that is not a mapping.
        ("defaults", b"[1, 2, 3]\n".to_vec(), "etcd /wsedge/defaults"),
    ];
    for (key, value, want) in cases {
        let revision = put(&mut client, key, value).await;
        let h = until_healthz(&edge, |h| {
            h["last_reload"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("etcd revision {revision} refused")))
        })
        .await;
        let message = h["last_reload"]["message"].as_str().unwrap();
        assert!(message.contains(want), "{key}: want {want:?} in {message}");
        assert_eq!(h["last_reload"]["ok"].as_bool(), Some(false));
        // Still serving the configuration before.
        assert_eq!(h["config"]["revision"].as_i64(), Some(serving), "{message}");
        assert_eq!(upgrade_status(&edge, "a.test").await, 101);
        // Put it right again (the keys this case touched).
        within("delete", client.delete(format!("{PREFIX}{key}"), None))
            .await
            .unwrap();
        serving = put(&mut client, "resources/chat", good.clone()).await;
        until_healthz(&edge, |h| h["config"]["revision"].as_i64() == Some(serving)).await;
    }
    let (_, metrics) = edge.admin_request("GET", "/metrics").await;
    assert!(metric(&metrics, "wsedge_config_reloads_total{result=\"failed\"}").unwrap() >= 11.0);
    // A good change after all that is applied.
    let revision = put_chat(&mut client, &origin, &["a.test", "c.test"]).await;
    until_upgrade(&edge, "c.test", 101, STEP).await;
    let h = until_healthz(&edge, |h| {
        h["config"]["revision"].as_i64() == Some(revision)
    })
    .await;
    assert_eq!(h["last_reload"]["ok"].as_bool(), Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_starts_from_its_last_known_good_file_while_etcd_is_down_and_catches_up() {
    let (mut etcd, client, origin) = etcd_with_chat().await;
    let dir = scratch_dir("fleet-lkg");
    // Outside the edges' directories (each is removed with its edge), as a volume is.
    let state = scratch_dir("fleet-lkg-state");
    let lkg = state.join("var/lkg.yaml");
    let text = local(&etcd.url, &lkg, "");
    let serving = start_edge(&dir, &text);
    assert_eq!(upgrade_status(&serving, "a.test").await, 101);
    until_exists(&lkg).await;
    // etcd killed (SIGKILL) under a serving edge: it serves on, and says etcd is down.
    etcd.stop();
    drop(client);
    until_healthz(&serving, |h| {
        h["config"]["source_up"].as_bool() == Some(false)
    })
    .await;
    assert_eq!(upgrade_status(&serving, "a.test").await, 101);
    let (_, metrics) = serving.admin_request("GET", "/metrics").await;
    assert_eq!(metric(&metrics, "wsedge_config_source_up"), Some(0.0));

    // etcd is down: the edge starts from the file, and says so.
    let dir2 = scratch_dir("fleet-lkg-2");
    let edge = start_edge(&dir2, &text);
    assert_eq!(upgrade_status(&edge, "a.test").await, 101);
    let h = healthz(&edge).await;
    assert_eq!(
        h["config"]["last_known_good"].as_bool(),
        Some(true),
        "{h:?}"
    );
    assert_eq!(h["config"]["source_up"].as_bool(), Some(false));
    assert!(h["config"]["error"].as_str().is_some());
    let (_, metrics) = edge.admin_request("GET", "/metrics").await;
    assert_eq!(metric(&metrics, "wsedge_config_source_up"), Some(0.0));
    assert!(edge
        .log_text()
        .contains("serving the last-known-good configuration"));

    // `-t` says the same, and without the file neither starts.
    let out = Command::new(wsedge_bin())
        .args(["-t", "-c"])
        .arg(dir2.join("wsedge.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("from the last-known-good file"));
    let none = dir2.join("none.yaml");
    std::fs::write(&none, local(&etcd.url, &dir2.join("missing/lkg.yaml"), "")).unwrap();
    let out = Command::new(wsedge_bin())
        .arg("-c")
        .arg(&none)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot start") && err.contains("no last-known-good configuration"),
        "{err}"
    );

    // etcd returns with a change made meanwhile: the edge catches up.
    etcd.restart();
    let mut client = etcd.client().await;
    put_chat(&mut client, &origin, &["a.test", "b.test"]).await;
    for e in [&edge, &serving] {
        until_upgrade(e, "b.test", 101, Duration::from_secs(30)).await;
        let h = until_healthz(e, |h| h["config"]["source_up"].as_bool() == Some(true)).await;
        assert_eq!(h["config"]["last_known_good"].as_bool(), Some(false));
    }
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_resumes_after_a_cut_and_reads_everything_again_past_a_compaction() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let origin = Origin::start(Mode::Echo).await;
    put(
        &mut client,
        "resources/a",
        resource("a", &["a.test"], origin.addr, "30s"),
    )
    .await;
    let relay = Relay::start(etcd.addr).await;
    let dir = scratch_dir("fleet-cut");
    let edge = start_edge(
        &dir,
        &local(&format!("http://{}", relay.addr), &dir.join("lkg.yaml"), ""),
    );
    assert_eq!(upgrade_status(&edge, "a.test").await, 101);

    // Cut: a change made meanwhile arrives after the relay is back, from the revision the
    // edge had.
    relay.cut();
    until_healthz(&edge, |h| h["config"]["source_up"].as_bool() == Some(false)).await;
    put(
        &mut client,
        "resources/b",
        resource("b", &["b.test"], origin.addr, "30s"),
    )
    .await;
    relay.restore();
    until_upgrade(&edge, "b.test", 101, Duration::from_secs(30)).await;
    edge.wait_log(&["watching"]);

    // Cut again; changes, then a compaction past them: the edge's revision is gone, so it
    // reads everything again.
    relay.cut();
    until_healthz(&edge, |h| h["config"]["source_up"].as_bool() == Some(false)).await;
    put(
        &mut client,
        "resources/c",
        resource("c", &["c.test"], origin.addr, "30s"),
    )
    .await;
    within(
        "delete",
        client.delete(format!("{PREFIX}resources/a"), None),
    )
    .await
    .unwrap();
    let last = put(
        &mut client,
        "resources/d",
        resource("d", &["d.test"], origin.addr, "30s"),
    )
    .await;
    within(
        "compact",
        client.compact(last, Some(CompactionOptions::new().with_physical())),
    )
    .await
    .unwrap();
    relay.restore();
    until_upgrade(&edge, "d.test", 101, Duration::from_secs(30)).await;
    assert_eq!(upgrade_status(&edge, "c.test").await, 101);
    assert_eq!(upgrade_status(&edge, "a.test").await, 404);
    let log = edge.wait_log(&["compacted"]);
    assert!(log.contains("compacted"), "{log}");
    let h = until_healthz(&edge, |h| h["config"]["revision"].as_i64() == Some(last)).await;
    assert_eq!(h["config"]["source_up"].as_bool(), Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_rebuilt_from_scratch_behind_the_edges_revision_is_read_again() {
    let (mut etcd, mut client, origin) = etcd_with_chat().await;
    let dir = scratch_dir("fleet-rebuilt");
    let edge = start_edge(&dir, &local(&etcd.url, &dir.join("lkg.yaml"), ""));
    // The edge sees revisions well past what a new store will have.
    let mut seen = 0;
    for i in 0..10 {
        let hosts = ["a.test", if i % 2 == 0 { "x.test" } else { "y.test" }];
        seen = put(
            &mut client,
            "resources/chat",
            resource("chat", &hosts, origin.addr, "30s"),
        )
        .await;
    }
    until_healthz(&edge, |h| h["config"]["revision"].as_i64() == Some(seen)).await;
    // The store is rebuilt from nothing (a lost cluster, a restore of an old backup): its
    // revisions start again from 1.
    drop(client);
    etcd.restart_empty();
    let mut client = etcd.client().await;
    let now = put_chat(&mut client, &origin, &["a.test", "new.test"]).await;
    assert!(now < seen, "{now} {seen}");
    until_upgrade(&edge, "new.test", 101, Duration::from_secs(30)).await;
    assert_eq!(upgrade_status(&edge, "y.test").await, 404);
    let log = edge.wait_log(&["a store rebuilt or restored"]);
    assert!(log.contains("a store rebuilt or restored"), "{log}");
    let h = until_healthz(&edge, |h| h["config"]["revision"].as_i64() == Some(now)).await;
    assert_eq!(h["config"]["source_up"].as_bool(), Some(true));
}

/// Runs `wsedge resource ...` with the edge's file `conf`.
fn resource_cmd(conf: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(wsedge_bin())
        .arg("resource")
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wsedge_resource_checks_a_change_before_writing_it_with_a_compare_and_swap() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let origin = Origin::start(Mode::Echo).await;
    let dir = scratch_dir("fleet-cli");
    let conf = dir.join("wsedge.yaml");
    std::fs::write(&conf, local(&etcd.url, &dir.join("lkg.yaml"), "")).unwrap();
    let file = |name: &str, text: &str| -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let chat = file(
        "chat.yaml",
        &resource("chat", &["a.test"], origin.addr, "30s"),
    );
    let chat_s = chat.to_str().unwrap();

    let (ok, out, err) = resource_cmd(&conf, &["put", chat_s]);
    assert!(ok, "{err}");
    assert!(
        out.contains("/wsedge/resources/chat: written at revision"),
        "{out}"
    );
    let (ok, out, _) = resource_cmd(&conf, &["list"]);
    assert!(ok && out.contains("chat"), "{out}");
    let (ok, out, _) = resource_cmd(&conf, &["get", "chat"]);
    assert!(ok && out.contains("a.test"), "{out}");

    // A bad change is refused before etcd sees it, placed in the operator's file.
    let bad = file(
        "bad.yaml",
        &resource("chat", &["a.test"], origin.addr, "5q"),
    );
    let before = client
        .get(PREFIX, None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let (ok, _, err) = resource_cmd(&conf, &["put", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("bad.yaml:6:") && err.contains("idle_timeout"),
        "{err}"
    );
    let (_, out, _) = resource_cmd(&conf, &["diff", bad.to_str().unwrap()]);
    assert!(
        out.contains("-   idle_timeout: 30s") && out.contains("+   idle_timeout: 5q"),
        "{out}"
    );
    assert!(out.contains("it would be refused"), "{out}");
    // So is a hostname another resource has (the whole configuration is checked), and a
    // file without a name.
    let other = file(
        "other.yaml",
        &resource("other", &["a.test"], origin.addr, "30s"),
    );
    let (ok, _, err) = resource_cmd(&conf, &["put", other.to_str().unwrap()]);
    assert!(
        !ok && err.contains("already belongs to resource \"chat\""),
        "{err}"
    );
    let nameless = file("nameless.yaml", "hostnames: [x.test]\n");
    let (ok, _, err) = resource_cmd(&conf, &["put", nameless.to_str().unwrap()]);
    assert!(!ok && err.contains("no `name`"), "{err}");
    let after = client
        .get(PREFIX, None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert_eq!(before, after, "a refused change wrote nothing");
    // The same value written straight into etcd: `-t` says the same as the command.
    put(&mut client, "resources/chat", std::fs::read(&bad).unwrap()).await;
    let out = Command::new(wsedge_bin())
        .args(["-t", "-c"])
        .arg(&conf)
        .output()
        .unwrap();
    let t_err = String::from_utf8_lossy(&out.stderr).into_owned();
    let (_, _, cli_err) = resource_cmd(&conf, &["put", bad.to_str().unwrap()]);
    let after_place = |e: &str| e.split_once(":6:").map(|(_, rest)| rest.trim().to_string());
    assert!(t_err.contains("etcd /wsedge/resources/chat:6:"), "{t_err}");
    assert_eq!(
        after_place(&t_err),
        after_place(&cli_err),
        "{t_err}\n{cli_err}"
    );
    put(&mut client, "resources/chat", std::fs::read(&chat).unwrap()).await;

    // Two operators: a write checked against an older revision is refused.
    let settings = wsedge::Config::etcd_settings(&conf).unwrap().unwrap();
    put_chat(&mut client, &origin, &["a.test", "z.test"]).await;
    let op = etcd_client::TxnOp::put(format!("{PREFIX}resources/chat"), "name: chat\n", None);
    let refused = wsedge::fleet::cli::write_if_unchanged(&mut client, &settings, before, op).await;
    assert!(refused.unwrap_err().contains("changed since revision"));
    let value = client
        .get(format!("{PREFIX}resources/chat"), None)
        .await
        .unwrap();
    assert!(value.kvs()[0].value_str().unwrap().contains("z.test"));

    // Two operators reviewed the same revision and put at once: one wins, the other is
    // told to read again.
    let (_, listed, _) = resource_cmd(&conf, &["list"]);
    let revision: i64 = listed
        .strip_prefix("revision ")
        .and_then(|r| r.split(':').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("{listed}"));
    let one = file(
        "one.yaml",
        &resource("chat", &["a.test", "one.test"], origin.addr, "30s"),
    );
    let two = file(
        "two.yaml",
        &resource("chat", &["a.test", "two.test"], origin.addr, "30s"),
    );
    let r = revision.to_string();
    let racers: Vec<_> = [&one, &two]
        .iter()
        .map(|f| {
            Command::new(wsedge_bin())
                .args(["resource", "-c"])
                .arg(&conf)
                .args(["put", f.to_str().unwrap(), "--if-revision", &r])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let results: Vec<_> = racers
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let won = results.iter().filter(|o| o.status.success()).count();
    assert_eq!(won, 1, "{results:?}");
    let lost = results.iter().find(|o| !o.status.success()).unwrap();
    let lost_err = String::from_utf8_lossy(&lost.stderr);
    assert!(
        lost_err.contains("nothing written") && lost_err.contains("run the command again"),
        "{lost_err}"
    );
    let (ok, _, err) = resource_cmd(
        &conf,
        &["put", one.to_str().unwrap(), "--if-revision", "999999"],
    );
    assert!(!ok && err.contains("etcd is at revision"), "{err}");

    // --etcd and --prefix are checked; delete removes.
    let (ok, _, err) = resource_cmd(&conf, &["--etcd", "ftp://x", "list"]);
    assert!(!ok && err.contains("invalid etcd endpoint"), "{err}");
    let (ok, _, err) = resource_cmd(&conf, &["--prefix", "nope", "list"]);
    assert!(!ok && err.contains("invalid etcd prefix"), "{err}");
    let (ok, out, err) = resource_cmd(&conf, &["delete", "chat"]);
    assert!(ok, "{err}");
    assert!(out.contains("deleted"), "{out}");
    let (ok, _, err) = resource_cmd(&conf, &["get", "chat"]);
    assert!(!ok && err.contains("no resource chat"), "{err}");
}

#[test]
fn the_local_file_of_an_etcd_edge_is_checked_like_any_file() {
    let cases = [
        (
            "listen: { http: [\"127.0.0.1:0\"] }\nsource: { etcd: { endpoints: [\"http://127.0.0.1:1\"] } }\nresources:\n  - { name: a, hostnames: [a.test], origin: { servers: [{ address: \"127.0.0.1:1\" }] } }\n",
            "with `source.etcd`, resources come from etcd",
        ),
        (
            "listen: { http: [\"127.0.0.1:0\"] }\nsource: { etcd: { endpoints: [\"http://127.0.0.1:1\"] } }\ndefaults: {}\n",
            "defaults come from etcd",
        ),
        (
            "listen: { http: [\"127.0.0.1:0\"] }\nsource: { etcd: { endpoints: [\"127.0.0.1:2379\"] } }\n",
            "invalid etcd endpoint",
        ),
        (
            "listen: { http: [\"127.0.0.1:0\"] }\nsource: { etcd: { endpoints: [\"http://127.0.0.1:1\"], prefix: wsedge } }\n",
            "invalid etcd prefix",
        ),
        (
            "listen: { http: [\"127.0.0.1:0\"] }\nsource: { etcd: { endpoints: [\"http://127.0.0.1:1\"], user: root } }\n",
            "needs both `user` and `password_file`",
        ),
        (
            "listen: { http: [\"127.0.0.1:0\"] }\nsource: { etcd: { endpoints: [] } }\n",
            "no etcd endpoint",
        ),
        (
            "listen: { http: [\"127.0.0.1:0\"] }\nsource: { etcd: { endpoints: [\"http://127.0.0.1:1\"], tls: { ca_file: ca.pem } } }\n",
            "every endpoint is https://",
        ),
        (
            "listen: { http: [\"127.0.0.1:0\"] }\nsource: { etcd: { endpoints: [\"http://127.0.0.1:1\"], nope: 1 } }\n",
            "unknown field `nope`",
        ),
    ];
    for (yaml, want) in cases {
        let out = check_config("edge.yaml", yaml);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{yaml}");
        assert!(
            err.contains("edge.yaml:") && err.contains(want),
            "want {want:?}: {err}"
        );
    }
}

/// A client of `etcd` over TLS with `identity`, as `user` when given.
async fn tls_client(
    etcd: &Etcd,
    pki: &Pki,
    identity: &Issued,
    user: Option<(&str, &str)>,
) -> Client {
    let read = |p: &Path| std::fs::read(p).unwrap();
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read(&pki.ca_path())))
        .identity(etcd_client::Identity::from_pem(
            read(&identity.cert),
            read(&identity.key),
        ));
    let mut options = etcd_client::ConnectOptions::new().with_tls(tls);
    if let Some((u, p)) = user {
        options = options.with_user(u, p);
    }
    within(
        "connect to etcd over TLS",
        Client::connect([etcd.url.as_str()], Some(options)),
    )
    .await
    .expect("TLS client connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_reads_etcd_over_tls_with_a_client_certificate_and_a_user_of_its_own() {
    let pki = Pki::new("etcd-pki");
    let server = pki.issue("etcd", &["127.0.0.1", "localhost"]);
    let operator = pki.issue("operator", &["operator"]);
    let edge_cert = pki.issue("edge", &["edge"]);
    let etcd = Etcd::start_tls(server.cert.clone(), server.key.clone(), pki.ca_path());
    let origin = Origin::start(Mode::Echo).await;

    // Users: root, and `wsedge`, which may only read the prefix.
    let mut admin = tls_client(&etcd, &pki, &operator, None).await;
    admin.user_add("root", "root-password", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.role_add("edge").await.unwrap();
    let read = etcd_client::Permission::read(PREFIX).with_prefix();
    admin.role_grant_permission("edge", read).await.unwrap();
    admin
        .user_add("wsedge", "edge-password", None)
        .await
        .unwrap();
    admin.user_grant_role("wsedge", "edge").await.unwrap();
    put(
        &mut admin,
        "resources/chat",
        resource("chat", &["a.test"], origin.addr, "30s"),
    )
    .await;
    admin.auth_enable().await.unwrap();
    let mut root = tls_client(&etcd, &pki, &operator, Some(("root", "root-password"))).await;

    let dir = scratch_dir("fleet-tls");
    let state = scratch_dir("fleet-tls-state");
    std::fs::write(state.join("password"), "edge-password\n").unwrap();
    let source = |ca: &Path, password: &str, lkg: &str| {
        format!(
            "listen: {{ http: [\"127.0.0.1:0\"] }}\naccess_log: off\nsource:\n  etcd:\n    endpoints: [\"{}\"]\n    timeout: 2s\n    tls: {{ ca_file: \"{}\", certificate: \"{}\", private_key: \"{}\" }}\n    user: wsedge\n    password_file: \"{}\"\n    last_known_good: \"{}\"\n",
            etcd.url,
            ca.display(),
            edge_cert.cert.display(),
            edge_cert.key.display(),
            state.join(password).display(),
            state.join(lkg).display()
        )
    };
    let edge = start_edge(
        &dir,
        &with_admin(&source(&pki.ca_path(), "password", "lkg.yaml")),
    );
    assert_eq!(upgrade_status(&edge, "a.test").await, 101);
    put(
        &mut root,
        "resources/chat",
        resource("chat", &["a.test", "b.test"], origin.addr, "30s"),
    )
    .await;
    until_upgrade(&edge, "b.test", 101, STEP).await;
    let h = healthz(&edge).await;
    assert_eq!(h["config"]["source_up"].as_bool(), Some(true), "{h:?}");

    // A wrong password, a CA that did not sign etcd's certificate: etcd cannot be read,
    // and without a last-known-good file the edge does not start.
    std::fs::write(state.join("wrong"), "guess\n").unwrap();
    let other = Pki::new("etcd-other-ca");
    for (name, text, want) in [
        (
            "wrong-password.yaml",
            source(&pki.ca_path(), "wrong", "none.yaml"),
            "authentication failed",
        ),
        (
            "wrong-ca.yaml",
            source(&other.ca_path(), "password", "none.yaml"),
            "cannot be read",
        ),
    ] {
        let path = state.join(name);
        std::fs::write(&path, &text).unwrap();
        let out = Command::new(wsedge_bin())
            .args(["-t", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}");
        assert!(
            err.contains(want) && err.contains("no last-known-good"),
            "{name}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_starts_on_an_etcd_state_that_does_not_validate_serves_its_last_known_good() {
    let (etcd, mut client, origin) = etcd_with_chat().await;
    let state = scratch_dir("fleet-invalid-state");
    let lkg = state.join("lkg.yaml");
    let text = local(&etcd.url, &lkg, "");
    let d1 = scratch_dir("fleet-invalid-1");
    {
        let _first = start_edge(&d1, &text);
        until_exists(&lkg).await;
    }
    // A bad value lands in etcd (written around `wsedge resource`).
    put(
        &mut client,
        "resources/chat",
        resource("chat", &["a.test"], origin.addr, "never"),
    )
    .await;
    let d2 = scratch_dir("fleet-invalid-2");
    let edge = start_edge(&d2, &text);
    assert_eq!(upgrade_status(&edge, "a.test").await, 101);
    let log = edge.log_text();
    assert!(
        log.contains("does not validate") && log.contains("etcd /wsedge/resources/chat:6:"),
        "{log}"
    );
    let h = healthz(&edge).await;
    assert_eq!(
        h["config"]["last_known_good"].as_bool(),
        Some(true),
        "{h:?}"
    );
    // Fixed in etcd: the edge applies it.
    put_chat(&mut client, &origin, &["a.test", "b.test"]).await;
    until_upgrade(&edge, "b.test", 101, STEP).await;
    let h = until_healthz(&edge, |h| {
        h["config"]["last_known_good"].as_bool() == Some(false)
    })
    .await;
    assert_eq!(h["config"]["source_up"].as_bool(), Some(true));
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_that_accepts_and_never_answers_is_given_up_on_within_its_timeout() {
    // A listener that takes the connection and says nothing (a hung member, a black hole).
    let silent = Origin::start(Mode::Silent).await;
    let dir = scratch_dir("fleet-silent");
    let path = dir.join("wsedge.yaml");
    std::fs::write(
        &path,
        local(
            &format!("http://{}", silent.addr),
            &dir.join("none/lkg.yaml"),
            "",
        ),
    )
    .unwrap();
    let started = Instant::now();
    let out = Command::new("timeout")
        .arg("30")
        .arg(wsedge_bin())
        .args(["-t", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    // `timeout` would exit 124 after 30 s; wsedge gives up after its 2 s timeout itself.
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(took < Duration::from_secs(25), "{took:?}");
    assert!(
        err.contains("cannot be read") && err.contains("no last-known-good"),
        "{err}"
    );
}
