//! The last-known-good file: what etcd held when the edge last applied it, written
//! atomically (a new file renamed over the old, both synced), so that an edge that starts
//! while etcd is away serves what it served before.

use crate::config::store::Snapshot;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// The file's contents.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// The prefix the keys were under (a file of another prefix is not used).
    prefix: String,
    /// When it was written (Unix time), for operators reading it.
    written_at: u64,
    #[serde(flatten)]
    store: Snapshot,
}

/// Writes `store` (read under `prefix`) to `path`, atomically.
pub fn write(path: &Path, prefix: &str, store: &Snapshot) -> std::io::Result<()> {
    let text = serde_yaml::to_string(&File {
        prefix: prefix.to_string(),
        written_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        store: store.clone(),
    })
    .map_err(std::io::Error::other)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads the file at `path`, written for `prefix`.
pub fn read(path: &Path, prefix: &str) -> Result<Snapshot, String> {
    let text = crate::config::read_text(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file: File = serde_yaml::from_str(&text)
        .map_err(|e| format!("{}: not a last-known-good file: {e}", path.display()))?;
    if file.prefix != prefix {
        return Err(format!(
            "{}: written for prefix {}, not {prefix}",
            path.display(),
            file.prefix
        ));
    }
    Ok(file.store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_whole_and_read_back_for_its_prefix_only() {
        let dir = std::env::temp_dir().join(format!("wsedge-lkg-{}", std::process::id()));
        let path = dir.join("sub/lkg.yaml");
        let mut store = Snapshot {
            revision: 42,
            ..Default::default()
        };
        store
            .entries
            .insert("resources/a".into(), "name: a\n# ünïcode: \"'\n".into());
        write(&path, "/p/", &store).unwrap();
        assert_eq!(read(&path, "/p/").unwrap(), store);
        assert!(read(&path, "/q/").unwrap_err().contains("not /q/"));
        std::fs::write(&path, "revision: [").unwrap();
        assert!(read(&path, "/p/")
            .unwrap_err()
            .contains("not a last-known-good file"));
        let leftovers: Vec<_> = std::fs::read_dir(dir.join("sub"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
