//! 17 (files): `watch: true` reloads by itself when the configuration file changes: an
//! atomic rename over it, Kubernetes' swap of a ConfigMap volume's `..data` symlink, a write
//! in place; a file that does not validate (or is gone) is refused and the previous
//! configuration serves on, and the next good change is applied.

use crate::common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// A configuration that reloads itself, serving `hosts` from `origin`.
fn yaml(origin: SocketAddr, hosts: &[&str]) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    with_admin(&format!(
        "watch: true\nlisten: {{ http: [\"127.0.0.1:0\"] }}\nresources:\n  - name: site\n    hostnames: [{}]\n    origin: {{ servers: [{{ address: \"{origin}\" }}] }}\n",
        hosts.join(", ")
    ))
}

/// The status a plain GET for `host` gets.
async fn status_for(edge: &Edge, host: &str) -> u16 {
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    status(&raw_request(edge.addr, &req).await)
}

/// Waits (at most 5 s) until `host` gets `want`; how long that took.
async fn until_status(edge: &Edge, host: &str, want: u16) -> Duration {
    until_status_within(edge, host, want, Duration::from_secs(5)).await
}

/// Waits (at most `limit`) until `host` gets `want`; how long that took.
async fn until_status_within(edge: &Edge, host: &str, want: u16, limit: Duration) -> Duration {
    let started = Instant::now();
    while status_for(edge, host).await != want {
        assert!(
            started.elapsed() < limit,
            "{host} never got {want}; log:\n{}",
            edge.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// Writes `text` next to `path` and renames it over `path` (atomic for readers).
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_atomic_rename_and_a_kubernetes_symlink_swap_reload_within_a_second() {
    let origin = Origin::start(Mode::Status(200)).await;

    // A file replaced by rename, as deploy tools do.
    let dir = scratch_dir("watch-rename");
    let path = dir.join("wsedge.yaml");
    std::fs::write(&path, yaml(origin.addr, &["a.test"])).unwrap();
    let edge = Edge::start_file(&path, dir.clone(), &[]);
    edge.wait_log(&["watch: reloading when"]);
    assert_eq!(status_for(&edge, "a.test").await, 200);
    assert_eq!(status_for(&edge, "b.test").await, 404);
    replace(&path, &yaml(origin.addr, &["a.test", "b.test"]));
    let took = until_status(&edge, "b.test", 200).await;
    eprintln!("watch: a rename was served after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    drop(edge);

    // Kubernetes: the file is a symlink through `..data`, which is swapped atomically to a
    // new timestamped directory; the old one is then removed.
    let dir = scratch_dir("watch-k8s");
    let (old, new) = (dir.join("..2026_12_02_a"), dir.join("..2026_12_02_b"));
    std::fs::create_dir(&old).unwrap();
    std::fs::write(old.join("wsedge.yaml"), yaml(origin.addr, &["a.test"])).unwrap();
    std::os::unix::fs::symlink("..2026_12_02_a", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/wsedge.yaml", dir.join("wsedge.yaml")).unwrap();
    let edge = Edge::start_file(&dir.join("wsedge.yaml"), dir.clone(), &[]);
    edge.wait_log(&["watch: reloading when"]);
    assert_eq!(status_for(&edge, "c.test").await, 404);
    std::fs::create_dir(&new).unwrap();
    std::fs::write(new.join("wsedge.yaml"), yaml(origin.addr, &["c.test"])).unwrap();
    std::os::unix::fs::symlink("..2026_12_02_b", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(&old).unwrap();
    let took = until_status(&edge, "c.test", 200).await;
    eprintln!("watch: a ConfigMap swap was served after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(status_for(&edge, "a.test").await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_or_missing_file_is_refused_and_the_old_configuration_serves_on() {
    let origin = Origin::start(Mode::Status(200)).await;
    let dir = scratch_dir("watch-broken");
    let path = dir.join("wsedge.yaml");
    std::fs::write(&path, yaml(origin.addr, &["a.test"])).unwrap();
    let edge = Edge::start_file(&path, dir.clone(), &[]);
    edge.wait_log(&["watch: reloading when"]);

    // A key that does not exist, on line 3: refused, said with file, line and key.
    let broken = yaml(origin.addr, &["b.test"]).replace("listen:", "listen:\n  htp: []\n  ");
    replace(&path, &broken);
    let log = edge.wait_log(&["reload failed"]);
    assert!(log.contains("wsedge.yaml:"), "{log}");
    assert!(log.contains("htp"), "{log}");
    let (_, health) = edge.admin_request("GET", "/healthz").await;
    assert!(health.contains("\"ok\":false"), "{health}");
    assert_eq!(
        status_for(&edge, "a.test").await,
        200,
        "the old configuration"
    );
    assert_eq!(status_for(&edge, "b.test").await, 404);
    let (_, metrics) = edge.admin_request("GET", "/metrics").await;
    assert_eq!(
        metric(&metrics, "wsedge_config_reloads_total{result=\"failed\"}"),
        Some(1.0),
        "{metrics}"
    );

    // The next good change is applied.
    replace(&path, &yaml(origin.addr, &["b.test"]));
    until_status(&edge, "b.test", 200).await;

    // Gone: refused, the configuration serves on; written back in place (not atomically,
    // as an editor may), it is applied once whole.
    std::fs::remove_file(&path).unwrap();
    within("the refusal of a missing file", async {
        loop {
            let (_, m) = edge.admin_request("GET", "/metrics").await;
            if metric(&m, "wsedge_config_reloads_total{result=\"failed\"}") == Some(2.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(status_for(&edge, "b.test").await, 200);
    std::fs::write(&path, yaml(origin.addr, &["c.test"])).unwrap();
    until_status(&edge, "c.test", 200).await;
    assert_eq!(status_for(&edge, "b.test").await, 404);

    // Other files in the directory changing do not reload anything.
    let (_, before) = edge.admin_request("GET", "/metrics").await;
    std::fs::write(dir.join("notes.txt"), "unrelated").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, after) = edge.admin_request("GET", "/metrics").await;
    let reloads = |m: &str| metric(m, "wsedge_config_reloads_total{result=\"ok\"}");
    assert_eq!(reloads(&before), reloads(&after));
    // (and the watch was alive all along: the next change is applied)
    replace(&path, &yaml(origin.addr, &["d.test"]));
    until_status(&edge, "d.test", 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_recreated_and_written_slowly_is_applied_only_once_whole() {
    let origin = Origin::start(Mode::Status(200)).await;
    let dir = scratch_dir("watch-slow");
    let path = dir.join("wsedge.yaml");
    std::fs::write(&path, yaml(origin.addr, &["a.test"])).unwrap();
    let edge = Edge::start_file(&path, dir.clone(), &[]);
    edge.wait_log(&["watch: reloading when"]);
    // Deleted, created again and written in two halves 1.5 s apart: the first half is a
    // valid file on its own, and must not be served while the write is open.
    let half = yaml(origin.addr, &["e.test"]);
    let rest = format!(
        "  - name: extra\n    hostnames: [\"f.test\"]\n    origin: {{ servers: [{{ address: \"{}\" }}] }}\n",
        origin.addr
    );
    std::fs::remove_file(&path).unwrap();
    let mut file = std::fs::File::create(&path).unwrap();
    use std::io::Write;
    file.write_all(half.as_bytes()).unwrap();
    file.flush().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        status_for(&edge, "e.test").await,
        404,
        "half a file was served"
    );
    assert_eq!(status_for(&edge, "a.test").await, 200);
    file.write_all(rest.as_bytes()).unwrap();
    drop(file);
    until_status(&edge, "f.test", 200).await;
    assert_eq!(status_for(&edge, "e.test").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_inotify_cannot_see_is_found_by_the_periodic_read() {
    // The file's directory is itself a symlink swapped to another release (`ln -sfn`):
    // inotify watches the directory it resolved to, which does not change; the file is
    // read again every 5 s anyway.
    let origin = Origin::start(Mode::Status(200)).await;
    let base = scratch_dir("watch-release");
    for (release, host) in [("r1", "a.test"), ("r2", "g.test")] {
        std::fs::create_dir(base.join(release)).unwrap();
        std::fs::write(
            base.join(release).join("wsedge.yaml"),
            yaml(origin.addr, &[host]),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("r1", base.join("current")).unwrap();
    let path = base.join("current").join("wsedge.yaml");
    let edge = Edge::start_file(&path, base.clone(), &[]);
    edge.wait_log(&["watch: reloading when"]);
    assert_eq!(status_for(&edge, "g.test").await, 404);
    std::os::unix::fs::symlink("r2", base.join("current.tmp")).unwrap();
    std::fs::rename(base.join("current.tmp"), base.join("current")).unwrap();
    let took = until_status_within(&edge, "g.test", 200, Duration::from_secs(10)).await;
    eprintln!("watch: a release swap was found after {took:?}");
}

#[test]
fn a_bad_watch_value_is_an_error_naming_the_file_line_and_key() {
    for value in ["sometimes", "2", "[true]"] {
        let yaml = format!(
            "listen: {{ http: [\"127.0.0.1:0\"] }}\nwatch: {value}\nresources:\n  - name: r\n    hostnames: [a.test]\n    origin: {{ servers: [{{ address: \"127.0.0.1:1\" }}] }}\n"
        );
        let out = check_config("watch.yaml", &yaml);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{value}: accepted");
        assert!(err.contains("watch.yaml:2:"), "{value}: {err}");
        assert!(err.contains("watch"), "{value}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_put_in_the_files_place_is_refused_without_waiting_on_it() {
    // A read of a FIFO waits for a writer forever: the watch must not, and the edge
    // serves on and takes the next file.
    let origin = Origin::start(Mode::Status(200)).await;
    let dir = scratch_dir("watch-fifo");
    let path = dir.join("wsedge.yaml");
    std::fs::write(&path, yaml(origin.addr, &["a.test"])).unwrap();
    let edge = Edge::start_file(&path, dir.clone(), &[]);
    edge.wait_log(&["watch: reloading when"]);
    let fifo = dir.join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    std::fs::rename(&fifo, &path).unwrap();
    let log = edge.wait_log(&["not a regular file"]);
    assert!(log.contains("reload failed"), "{log}");
    assert_eq!(status_for(&edge, "a.test").await, 200);
    replace(&path, &yaml(origin.addr, &["b.test"]));
    until_status(&edge, "b.test", 200).await;
}
