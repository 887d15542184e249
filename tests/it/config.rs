//! `wsedge -t`: a good file exits 0; each kind of mistake exits 1 with a message that names
//! the file, the line, the key and the resource.

use crate::common;
use std::process::Command;

fn check(yaml: &str) -> (bool, String, String) {
    let dir = common::scratch_dir("conf");
    let path = dir.join("bad.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wsedge"))
        .arg("-t")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path.display().to_string(),
    )
}

const GOOD: &str = r#"listen:
  http: ["127.0.0.1:8080"]
resources:
  - name: chat
    hostnames: ["chat.example.com"]
    origin:
      servers:
        - { address: "127.0.0.1:9000" }
    websocket:
      idle_timeout: 60s
  - name: news
    hostnames: ["news.example.com"]
    origin:
      servers:
        - { address: "127.0.0.1:9001" }
"#;

/// Asserts a failed check whose message has `file:line:`, the key and the resource.
fn assert_error(yaml: &str, line: usize, key: &str, resource: Option<&str>, says: &str) {
    let (ok, err, file) = check(yaml);
    assert!(!ok, "should fail:\n{yaml}");
    assert!(
        err.contains(&format!("{file}:{line}:")),
        "want line {line} in: {err}"
    );
    assert!(err.contains(key), "want key {key} in: {err}");
    if let Some(r) = resource {
        assert!(
            err.contains(&format!("resource \"{r}\"")),
            "want resource {r} in: {err}"
        );
    }
    assert!(err.contains(says), "want {says:?} in: {err}");
}

#[test]
fn good_file_passes() {
    let (ok, err, _) = check(GOOD);
    assert!(ok, "{err}");
}

#[test]
fn unknown_key() {
    let yaml = GOOD.replace("      idle_timeout: 60s", "      idel_timeout: 60s");
    assert_error(
        &yaml,
        10,
        "resources[0].websocket",
        Some("chat"),
        "unknown field `idel_timeout`",
    );
}

#[test]
fn bad_duration() {
    let yaml = GOOD.replace("idle_timeout: 60s", "idle_timeout: 60 seconds");
    assert_error(
        &yaml,
        10,
        "resources[0].websocket.idle_timeout",
        Some("chat"),
        "like 500ms, 60s, 5m or 1h",
    );
}

#[test]
fn duplicate_hostname() {
    let yaml = GOOD.replace(
        "[\"news.example.com\"]",
        "[\"news.example.com\", \"chat.example.com\"]",
    );
    assert_error(
        &yaml,
        12,
        "resources[1].hostnames[1]",
        Some("news"),
        "already belongs to resource \"chat\"",
    );
}

#[test]
fn no_servers() {
    let yaml = GOOD.replace(
        "      servers:\n        - { address: \"127.0.0.1:9001\" }",
        "      servers: []",
    );
    assert_error(
        &yaml,
        14,
        "resources[1].origin.servers",
        Some("news"),
        "has no servers",
    );
}

#[test]
fn bad_address() {
    let yaml = GOOD.replace("127.0.0.1:9001", "127.0.0.1:port");
    assert_error(
        &yaml,
        15,
        "resources[1].origin.servers[0].address",
        Some("news"),
        "write ip:port",
    );
}

#[test]
fn bad_enum_value() {
    let yaml = GOOD.replace("    origin:\n      servers:\n        - { address: \"127.0.0.1:9000\" }", "    origin:\n      protocol: htp\n      servers:\n        - { address: \"127.0.0.1:9000\" }");
    assert_error(
        &yaml,
        7,
        "resources[0].origin.protocol",
        Some("chat"),
        "expected one of `http`, `https`, `follow`",
    );
}

#[test]
fn missing_ca_file() {
    let yaml = GOOD.replace(
        "    websocket:\n      idle_timeout: 60s",
        "      ca_file: nowhere.pem\n    websocket:\n      idle_timeout: 60s",
    );
    assert_error(
        &yaml,
        9,
        "resources[0].origin.ca_file",
        Some("chat"),
        "cannot read",
    );
}

#[test]
fn unreadable_file_is_an_error_not_a_panic() {
    let out = Command::new(env!("CARGO_BIN_EXE_wsedge"))
        .args(["-t", "-c", "/nonexistent/wsedge.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/wsedge.yaml: cannot read"));
}

#[test]
fn bad_origin_and_bad_rate() {
    let yaml = GOOD.replace(
        "      idle_timeout: 60s",
        "      idle_timeout: 60s\n      allowed_origins: [\"chat.example.com\"]",
    );
    assert_error(
        &yaml,
        11,
        "resources[0].websocket.allowed_origins",
        Some("chat"),
        "write an exact origin like https://",
    );
    let yaml = GOOD.replace(
        "      idle_timeout: 60s",
        "      idle_timeout: 60s\n      handshake_rate: { rate: 20 per second }",
    );
    assert_error(
        &yaml,
        11,
        "resources[0].websocket.handshake_rate",
        Some("chat"),
        "like 20/s or 600/m",
    );
}

#[test]
fn names_resolve_at_load_and_an_unresolvable_one_is_an_error() {
    let yaml = GOOD.replace("127.0.0.1:9001", "localhost:9001");
    let (ok, err, _) = check(&yaml);
    assert!(ok, "localhost resolves: {err}");
    let yaml = GOOD.replace("127.0.0.1:9001", "no-such-host.invalid:9001");
    assert_error(
        &yaml,
        15,
        "resources[1].origin.servers[0].address",
        Some("news"),
        "does not resolve",
    );
    let yaml = GOOD.replace(
        "        - { address: \"127.0.0.1:9000\" }",
        "        - { address: \"127.0.0.1:9000\", backup: true }",
    );
    assert_error(
        &yaml,
        7,
        "resources[0].origin.servers",
        Some("chat"),
        "every server is a backup",
    );
}

#[test]
fn hardening_keys_refuse_hostile_values_with_file_line_and_key() {
    let with_client = |client: &str| format!("client: {{ {client} }}\n{GOOD}");
    assert_error(
        &with_client("ipv6_prefix: 200"),
        1,
        "client.ipv6_prefix",
        None,
        "from 32 to 128",
    );
    assert_error(
        &with_client("max_header_bytes: 10"),
        1,
        "client.max_header_bytes",
        None,
        "from 1024 to 1048576",
    );
    assert_error(
        &with_client("keepalive_timeout: 100000h"),
        1,
        "client.keepalive_timeout",
        None,
        "too long",
    );
    let ws = |extra: &str| {
        GOOD.replace(
            "      idle_timeout: 60s",
            &format!("      idle_timeout: 60s\n      {extra}"),
        )
    };
    assert_error(
        &ws("max_connections_per_ip: 0"),
        11,
        "websocket.max_connections_per_ip",
        Some("chat"),
        "out of range",
    );
    assert_error(
        &ws("paths: [\"/ws/../admin\"]"),
        11,
        "websocket.paths",
        Some("chat"),
        "write \"/admin\"",
    );
    assert_error(
        &ws("paths: [\"/ws/%2F\"]"),
        11,
        "websocket.paths",
        Some("chat"),
        "encoded '/'",
    );
    assert_error(
        &GOOD.replace(
            "        - { address: \"127.0.0.1:9000\" }",
            "        - { address: \"127.0.0.1:9000\", weight: 1001 }",
        ),
        8,
        "weight",
        Some("chat"),
        "from 1 to 1000",
    );
    assert_error(
        &GOOD.replace(
            "      servers:\n        - { address: \"127.0.0.1:9000\" }",
            "      health_check: { path: \"/health check\" }\n      servers:\n        - { address: \"127.0.0.1:9000\" }",
        ),
        7,
        "health_check.path",
        Some("chat"),
        "health check path",
    );
    // The admin listener: a map with unknown keys, and token files that protect nothing.
    assert_error(
        &format!("admin: {{ listen: \"127.0.0.1:9090\", tokn_file: x }}\n{GOOD}"),
        1,
        "admin",
        None,
        "unknown field",
    );
    let dir = common::scratch_dir("token");
    std::fs::write(dir.join("short"), "secret\n").unwrap();
    assert_error(
        &format!(
            "admin: {{ listen: \"127.0.0.1:9090\", token_file: \"{}\" }}\n{GOOD}",
            dir.join("short").display()
        ),
        1,
        "admin.token_file",
        None,
        "at least 16 printable characters",
    );
    let _ = std::fs::remove_dir_all(&dir);
    // A non-loopback admin listener without a token is a warning, not an error.
    let (ok, err, _) = check(&format!("admin: \"0.0.0.0:9090\"\n{GOOD}"));
    assert!(ok, "{err}");
    assert!(err.contains("set admin.token_file"), "{err}");
}

/// deploy/kubernetes/wsedge.yaml's ConfigMap holds a configuration that `wsedge -t`
/// accepts, with the token file a test file and the origin's cluster DNS name an address
/// (names resolve at load, and this machine has no cluster DNS).
#[test]
fn the_kubernetes_example_configuration_passes_check() {
    use serde::Deserialize;
    let manifest = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/wsedge.yaml"),
    )
    .unwrap();
    let mut config = None;
    for doc in serde_yaml::Deserializer::from_str(&manifest) {
        let value = serde_yaml::Value::deserialize(doc).unwrap();
        if value["kind"] == "ConfigMap" {
            config = value["data"]["wsedge.yaml"].as_str().map(str::to_string);
        }
    }
    let config = config.expect("a ConfigMap with wsedge.yaml");
    assert!(config.contains("watch: true"), "{config}");
    let dir = common::scratch_dir("k8s");
    let token = dir.join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    let config = config
        .replace("/etc/wsedge-admin/token", token.to_str().unwrap())
        .replace("chat-origin.default.svc.cluster.local:8080", "127.0.0.1:1");
    let out = common::check_config("wsedge.yaml", &config);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A configuration file the process may not read (a mount of mode 0600 owned by another
/// user, as in a container) is an error that says who the process is, what the file
/// allows, and what to do. Runs wsedge as `nobody` (needs root to switch users).
#[test]
fn an_unreadable_file_says_who_wsedge_runs_as_and_what_to_do() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        eprintln!("not root: cannot run wsedge as another user here");
        return;
    }
    let dir = common::scratch_dir("unreadable");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join("wsedge.yaml");
    std::fs::write(
        &path,
        "listen: { http: [\"127.0.0.1:0\"] }\nresources:\n  - name: r\n    hostnames: [a.test]\n    origin: { servers: [{ address: \"127.0.0.1:1\" }] }\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A copy of the binary nobody may run wherever the checkout is (a home directory may
    // not be searchable by others).
    let bin = dir.join("wsedge");
    std::fs::copy(common::wsedge_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["-t", "-c"])
        .arg(&path)
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "read as nobody: {err}");
    for says in [
        "wsedge.yaml: cannot read the file: permission denied",
        "uid 65534",
        "owned by uid 0",
        "mode 0600",
        "chmod a+r",
    ] {
        assert!(err.contains(says), "{says:?} not in: {err}");
    }
}

/// A configuration path that is a FIFO (a read would wait for a writer forever), a
/// directory, or a file over 16 MiB is refused at once, naming the file and why.
#[test]
fn a_fifo_a_directory_or_a_huge_file_is_refused_at_once() {
    let dir = common::scratch_dir("not-a-file");
    let fifo = dir.join("fifo.yaml");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let huge = dir.join("huge.yaml");
    let mut text = String::from("listen: { http: [\"127.0.0.1:0\"] }\n");
    while text.len() <= 16 << 20 {
        text.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    std::fs::write(&huge, text).unwrap();
    for (path, says) in [
        (&fifo, "not a regular file"),
        (&dir, "not a regular file"),
        (&huge, "larger than 16 MiB"),
    ] {
        let mut child = Command::new(common::wsedge_bin())
            .args(["-t", "-c"])
            .arg(path)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > std::time::Duration::from_secs(10) {
                let _ = child.kill();
                panic!("{} was waited on", path.display());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{}: accepted", path.display());
        assert!(
            err.contains(&path.display().to_string()) && err.contains(says),
            "{says:?} not in: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Pingora's `work_stealing` is off unless the `pingora:` section turns it on (each thread
/// a runtime of its own, as nginx's workers); whatever else the section holds is kept, and
/// a value Pingora cannot read is refused at load with the file, the line and the key.
#[test]
fn threads_run_runtimes_of_their_own_unless_the_pingora_section_says_otherwise() {
    let conf = |pingora: &str| {
        let yaml = format!("{pingora}{GOOD}");
        let config = wsedge::Config::from_yaml("wsedge.yaml", &yaml).unwrap();
        wsedge::server_conf(&config)
    };
    let none = conf("");
    assert!(!none.work_stealing);
    let other_keys = conf("pingora: { threads: 3, grace_period_seconds: 7 }\n");
    assert!(!other_keys.work_stealing);
    assert_eq!(other_keys.threads, 3);
    assert_eq!(other_keys.grace_period_seconds, Some(7));
    assert!(conf("pingora: { work_stealing: true }\n").work_stealing);
    assert!(!conf("pingora: { work_stealing: false }\n").work_stealing);
    // A key that only mentions the word is not the key.
    assert!(!conf("pingora: { upgrade_sock: /tmp/work_stealing.sock }\n").work_stealing);
    for hostile in ["\"yes\"", "1", "[true]", "{ on: true }", "~"] {
        let yaml = format!("pingora: {{ work_stealing: {hostile} }}\n{GOOD}");
        let (ok, err, file) = check(&yaml);
        assert!(!ok, "work_stealing: {hostile} should be refused");
        assert!(err.contains(&format!("{file}:")), "want the file in: {err}");
        assert!(err.contains("pingora"), "want the key in: {err}");
    }
}
