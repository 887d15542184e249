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
        let reader = maxminddb::Reader::from_source(bytes)
            .map_err(|e| format!("not a MaxMind-format database: {e}"))?;
        let kind = reader.metadata.database_type.clone();
        Ok(Database { reader, kind })
    }
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
            if let Ok(Some(r)) = db.reader.lookup::<AsnRecord>(ip) {
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
            if let Ok(Some(r)) = db.reader.lookup::<CountryRecord>(ip) {
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
