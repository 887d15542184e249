//! The etcd client as wsedge uses it (the `etcd-client` crate): connecting with the
//! settings' TLS and user, reading everything under the prefix at one revision, and turning
//! keys and values into a [`Snapshot`]. Every request is held to the settings' timeout.

use crate::config::store::{EtcdSettings, Snapshot, MAX_KEYS};
use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use std::time::Duration;
use tokio::time::timeout;

/// Connects to the members of `settings`.
pub async fn connect(s: &EtcdSettings) -> Result<Client, String> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(s.timeout)
        // HTTP/2 pings find a member gone silent (a cut network) within a few seconds.
        .with_keep_alive(Duration::from_secs(5), s.timeout)
        .with_keep_alive_while_idle(true);
    if let Some((user, password)) = &s.user {
        opts = opts.with_user(user.clone(), password.0.clone());
    }
    if let Some(t) = &s.tls {
        let read = |p: &std::path::Path| {
            crate::config::read_text(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        let mut tls = TlsOptions::new();
        if let Some(ca) = &t.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let Some((cert, key)) = &t.identity {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        opts = opts.with_tls(tls);
    }
    match timeout(s.timeout, Client::connect(&s.endpoints, Some(opts))).await {
        Err(_) => Err(format!("no answer within {}s", s.timeout.as_secs_f64())),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(c)) => Ok(c),
    }
}

/// Everything under the prefix, at one revision.
pub async fn read(client: &mut Client, s: &EtcdSettings) -> Result<Snapshot, String> {
    let get = client.get(s.prefix.as_str(), Some(GetOptions::new().with_prefix()));
    let resp = match timeout(s.timeout, get).await {
        Err(_) => return Err(format!("no answer within {}s", s.timeout.as_secs_f64())),
        Ok(r) => r.map_err(|e| e.to_string())?,
    };
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut store = Snapshot {
        revision,
        ..Default::default()
    };
    if resp.kvs().len() > MAX_KEYS {
        return Err(format!(
            "{} keys under {}: at most {MAX_KEYS} are read",
            resp.kvs().len(),
            s.prefix
        ));
    }
    for kv in resp.kvs() {
        put(&mut store, &s.prefix, kv.key(), kv.value());
    }
    Ok(store)
}

/// Connects and reads, as a start does.
pub async fn read_all(s: &EtcdSettings) -> Result<Snapshot, String> {
    let mut client = connect(s).await?;
    read(&mut client, s).await
}

/// The key without the prefix (lossily decoded if it is not UTF-8).
pub fn relative(prefix: &str, key: &[u8]) -> String {
    let key = String::from_utf8_lossy(key);
    key.strip_prefix(prefix).unwrap_or(&key).to_string()
}

/// Sets a key's value in `store`; a value that is not UTF-8 text is kept as unreadable.
pub fn put(store: &mut Snapshot, prefix: &str, key: &[u8], value: &[u8]) {
    let k = relative(prefix, key);
    store.entries.remove(&k);
    store.unreadable.remove(&k);
    match std::str::from_utf8(value) {
        Ok(v) if std::str::from_utf8(key).is_ok() => {
            store.entries.insert(k, v.to_string());
        }
        _ => {
            store
                .unreadable
                .insert(k, "the key or its value is not UTF-8 text".into());
        }
    }
}

/// Removes a key from `store`.
pub fn delete(store: &mut Snapshot, prefix: &str, key: &[u8]) {
    let k = relative(prefix, key);
    store.entries.remove(&k);
    store.unreadable.remove(&k);
}
