//! 17 (the container): `wsedge healthcheck` for a `HEALTHCHECK` without curl, `--demo`
//! refused on a real configuration (an image's default command with an operator's file
//! mounted), and `-u` into an upgrade-socket directory wsedge may not write, refused with
//! whose it is and what to do. The image itself is built and run by hand (docker is not
//! in CI); the closing note of issue 17 has those checks.

use crate::common::*;
use std::process::Command;

/// `wsedge healthcheck -c FILE` with `admin` as the file's admin setting.
fn healthcheck(admin: &str) -> (bool, String, String) {
    let dir = scratch_dir("healthcheck");
    let path = dir.join("wsedge.yaml");
    std::fs::write(
        &path,
        format!("admin: {admin}\nlisten: {{ http: [\"127.0.0.1:0\"] }}\n"),
    )
    .unwrap();
    let out = Command::new(wsedge_bin())
        .args(["healthcheck", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_asks_the_admin_listener_and_fails_while_draining_or_down() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&one_resource(origin.addr, ""));
    let (ok, out, err) = healthcheck(&format!("\"{}\"", edge.admin));
    assert!(ok, "{err}");
    assert!(out.contains("\"status\":\"ok\""), "{out}");
    let (ok, _, err) = healthcheck(&format!("{{ listen: \"{}\" }}", edge.admin));
    assert!(ok, "{err}");
    // Draining: /healthz is 503, so the container is unhealthy.
    let (code, _) = edge.admin_request("POST", "/drain").await;
    assert_eq!(code, 202);
    let (ok, _, err) = healthcheck(&format!("\"{}\"", edge.admin));
    assert!(!ok && err.contains("answered 503"), "{err}");
    // Nothing listening; a file that says no address.
    let (ok, _, err) = healthcheck(&format!("\"{}\"", closed_port("127.0.0.1")));
    assert!(!ok && err.contains("refused"), "{err}");
    let (ok, _, err) = healthcheck("nope");
    assert!(!ok && err.contains("admin: not an address"), "{err}");
}

#[test]
fn demo_refuses_a_configuration_whose_origin_is_not_on_loopback() {
    let out = check_args(
        "listen: { http: [\"127.0.0.1:0\"] }\nadmin: \"127.0.0.2:0\"\nresources:\n  - name: shop\n    hostnames: [shop.example.com]\n    origin: { servers: [{ address: \"10.0.0.5:8080\" }] }\n",
        &["--demo"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("10.0.0.5:8080 is not") && err.contains("run without --demo"),
        "{err}"
    );
}

/// Runs wsedge with `yaml` and `args` until it exits (it must, at once).
fn check_args(yaml: &str, args: &[&str]) -> std::process::Output {
    let dir = scratch_dir("args");
    let path = dir.join("wsedge.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new("timeout")
        .arg("20")
        .arg(wsedge_bin())
        .args(args)
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// `-u` as a user who may not write the upgrade socket's directory (a volume shared
/// between containers, owned by root): refused before anything is handed over, naming
/// the owner and what to do. Runs wsedge as `nobody` (needs root to switch users).
#[test]
fn an_upgrade_into_a_directory_wsedge_may_not_write_says_whose_it_is() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        eprintln!("not root: cannot run wsedge as another user here");
        return;
    }
    let dir = scratch_dir("upgrade-dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let shared = dir.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join("wsedge.yaml");
    std::fs::write(
        &path,
        format!(
            "pingora: {{ upgrade_sock: \"{}/upgrade.sock\" }}\nlisten: {{ http: [\"127.0.0.1:0\"] }}\nadmin: \"127.0.0.2:0\"\nresources:\n  - name: r\n    hostnames: [a.test]\n    origin: {{ servers: [{{ address: \"127.0.0.1:1\" }}] }}\n",
            shared.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let bin = dir.join("wsedge");
    std::fs::copy(wsedge_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("timeout")
        .arg("20")
        .args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .arg(&bin)
        .args(["-u", "-c"])
        .arg(&path)
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "{err}");
    for says in [
        "upgrade_sock",
        "uid 65534",
        "owned by uid 0",
        "mode 0755",
        "chown 65534:65534",
    ] {
        assert!(err.contains(says), "{says:?} not in: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_gives_up_on_an_admin_listener_that_never_answers() {
    // It takes the connection and says nothing: the check fails (after its 3 s read
    // timeout), it does not hang the container's HEALTHCHECK.
    // (Not the test origin: it answers health checks.)
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let (ok, out, err) = within(
        "healthcheck against a silent listener",
        tokio::task::spawn_blocking(move || healthcheck(&format!("\"{admin}\""))),
    )
    .await
    .unwrap();
    hold.abort();
    assert!(!ok, "{admin}: out {out:?} err {err:?}");
    assert!(err.contains(&admin.to_string()), "{err}");
}
