//! The client's network from operator-supplied MaxMind-format databases (GeoLite2-ASN,
//! GeoLite2-Country or -City, or compatible), read whole at load so that a reload reads
//! them again and a lookup touches no file.

use serde::Deserialize;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

/// The largest database file read (GeoLite2-City is about 60 MiB).
pub const MAX_DATABASE_BYTES: u64 = 512 << 20;

/// One MaxMind-format database.
pub struct Database {
    reader: maxminddb::Reader<Vec<u8>>,
    kind: String,
    /// A lookup panicked in the reader (a file malformed past what `open` saw): the
    /// database is not asked again.
    broken: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Database({})", self.kind)
    }
}

impl PartialEq for Database {
    fn eq(&self, other: &Database) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Database {
    /// Reads and checks the file at `path` (a regular file, within the size bound, of the
    /// MaxMind DB format).
    pub fn open(path: &Path) -> Result<Database, String> {
        let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
        if !meta.is_file() {
            return Err("not a regular file".into());
        }
        if meta.len() > MAX_DATABASE_BYTES {
            return Err(format!(
                "larger than {} MiB: not a MaxMind database wsedge reads",
                MAX_DATABASE_BYTES >> 20
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        // The reader trusts the file's offsets (a hostile one makes it index past the
        // end): opening and a few lookups are tried under `catch_unwind`.
        let malformed = "not a MaxMind-format database: its structure is malformed";
        let reader = quietly(|| maxminddb::Reader::from_source(bytes))
            .ok_or(malformed)?
            .map_err(|e| format!("not a MaxMind-format database: {e}"))?;
        let probes = [
            "1.1.1.1",
            "127.0.0.1",
            "10.0.0.1",
            "192.168.1.1",
            "::1",
            "2001:db8::1",
        ];
        for ip in probes {
            let ip: IpAddr = ip.parse().expect("a valid address");
            quietly(|| {
                let _ = reader.lookup::<AsnRecord>(ip);
                let _ = reader.lookup::<CountryRecord>(ip);
            })
            .ok_or(malformed)?;
        }
        let kind = reader.metadata.database_type.clone();
        Ok(Database {
            reader,
            kind,
            broken: Default::default(),
        })
    }

    /// `f` over the reader, `None` if the reader panicked (the database is then set
    /// aside, and said so once).
    fn ask<T>(&self, f: impl FnOnce(&maxminddb::Reader<Vec<u8>>) -> Option<T>) -> Option<T> {
        use std::sync::atomic::Ordering;
        if self.broken.load(Ordering::Relaxed) {
            return None;
        }
        match quietly(|| f(&self.reader)) {
            Some(v) => v,
            None => {
                if !self.broken.swap(true, Ordering::Relaxed) {
                    log::error!(
                        "geoip: the {} database is malformed where a lookup went; not used until a reload reads a good one",
                        self.kind
                    );
                }
                None
            }
        }
    }
}

/// `f()`, or `None` if it panicked.
fn quietly<T>(f: impl FnOnce() -> T) -> Option<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok()
}

/// The databases in use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GeoIp {
    /// GeoLite2-ASN or compatible.
    pub asn: Option<Arc<Database>>,
    /// GeoLite2-Country, -City or compatible.
    pub country: Option<Arc<Database>>,
}

/// What the databases know of a client (empty strings and 0 where they know nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Network {
    /// The autonomous system number.
    pub asn: u32,
    /// `AS<number> <organization>`, the ISP as CDN statistics name it.
    pub isp: String,
    /// ISO 3166-1 country code.
    pub country: String,
    /// ISO 3166-2 subdivision (`DE-BY`) when the database has one, else the country.
    pub region: String,
}

#[derive(Deserialize)]
struct AsnRecord {
    autonomous_system_number: Option<u32>,
    autonomous_system_organization: Option<String>,
}

#[derive(Deserialize)]
struct CountryRecord {
    country: Option<Named>,
    subdivisions: Option<Vec<Named>>,
}

#[derive(Deserialize)]
struct Named {
    iso_code: Option<String>,
}

/// At most this many characters of a database's string are kept.
const MAX_FIELD: usize = 128;

fn clean(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_FIELD)
        .collect()
}

impl GeoIp {
    /// Whether any database is configured.
    pub fn any(&self) -> bool {
        self.asn.is_some() || self.country.is_some()
    }

    /// What the databases say of `ip` (a record of an unexpected shape counts as unknown).
    pub fn lookup(&self, ip: IpAddr) -> Network {
        let mut n = Network::default();
        if let Some(db) = &self.asn {
            if let Some(r) = db.ask(|r| r.lookup::<AsnRecord>(ip).ok().flatten()) {
                n.asn = r.autonomous_system_number.unwrap_or(0);
                let org = r.autonomous_system_organization.unwrap_or_default();
                n.isp = match (n.asn, org.is_empty()) {
                    (0, _) => clean(&org),
                    (a, true) => format!("AS{a}"),
                    (a, false) => clean(&format!("AS{a} {org}")),
                };
            }
        }
        if let Some(db) = &self.country {
            if let Some(r) = db.ask(|r| r.lookup::<CountryRecord>(ip).ok().flatten()) {
                n.country = r
                    .country
                    .and_then(|c| c.iso_code)
                    .map(|c| clean(&c))
                    .unwrap_or_default();
                let sub = r
                    .subdivisions
                    .and_then(|s| s.into_iter().next())
                    .and_then(|s| s.iso_code);
                n.region = match sub {
                    Some(s) if !n.country.is_empty() => clean(&format!("{}-{s}", n.country)),
                    _ => n.country.clone(),
                };
            }
        }
        n
    }
}
