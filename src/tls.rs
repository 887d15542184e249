//! TLS at the edge: certificates per resource chosen by SNI (exact names before wildcards,
//! like Host routing), an optional default certificate, and the SNI of each connection
//! kept so the proxy can refuse a Host of another resource (421).

use arc_swap::ArcSwap;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert};
use std::any::Any;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// A certificate chain and its key, loaded and checked.
#[derive(Clone)]
pub struct Certificate {
    /// What rustls serves.
    pub key: Arc<CertifiedKey>,
    /// When the leaf expires (unix seconds).
    pub not_after: i64,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Certificate({} in chain, not after {})",
            self.key.cert.len(),
            self.not_after
        )
    }
}

impl Certificate {
    /// Loads a PEM chain and a PEM private key; the error names the file and the problem.
    pub fn load(chain: &Path, key: &Path) -> Result<Certificate, String> {
        let pem =
            std::fs::read(chain).map_err(|e| format!("cannot read {}: {e}", chain.display()))?;
        let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{} is not valid PEM: {e}", chain.display()))?;
        let Some(leaf) = certs.first() else {
            return Err(format!(
                "{} holds no \"BEGIN CERTIFICATE\" block",
                chain.display()
            ));
        };
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| {
            format!(
                "{}: the first certificate does not parse: {e}",
                chain.display()
            )
        })?;
        let not_after = parsed.validity().not_after.timestamp();
        let spki = parsed.tbs_certificate.subject_pki.raw.to_vec();

        let key_pem =
            std::fs::read(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
        let private = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .map_err(|e| format!("{} is not valid PEM: {e}", key.display()))?
            .ok_or_else(|| format!("{} holds no private key", key.display()))?;
        pingora::tls::install_default_crypto_provider();
        let provider = CryptoProvider::get_default()
            .ok_or_else(|| "no TLS crypto provider is installed".to_string())?;
        let signing = provider
            .key_provider
            .load_private_key(private)
            .map_err(|e| format!("{}: unsupported private key: {e}", key.display()))?;
        if signing
            .public_key()
            .is_some_and(|pk| pk.as_ref() != spki.as_slice())
        {
            return Err(format!(
                "the private key {} does not match the certificate {}",
                key.display(),
                chain.display()
            ));
        }
        Ok(Certificate {
            key: Arc::new(CertifiedKey::new(certs, signing)),
            not_after,
        })
    }

    /// Whether the leaf has expired at `now` (unix seconds).
    pub fn expired(&self, now: i64) -> bool {
        self.not_after < now
    }
}

/// Hostname → certificate, built from a configuration.
#[derive(Debug, Default)]
pub struct CertTable {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl CertTable {
    /// The table for `config`: each resource's certificate under each of its hostnames.
    pub fn new(config: &crate::Config) -> CertTable {
        let mut t = CertTable {
            default: config.default_certificate.as_ref().map(|c| c.key.clone()),
            ..CertTable::default()
        };
        for r in &config.resources {
            let Some(cert) = &r.tls else { continue };
            for h in &r.hostnames {
                match h.strip_prefix("*.") {
                    Some(parent) => t.wildcard.insert(parent.to_string(), cert.key.clone()),
                    None => t.exact.insert(h.clone(), cert.key.clone()),
                };
            }
        }
        t
    }

    fn find(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = sni else {
            return self.default.clone();
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.exact
            .get(&name)
            .or_else(|| {
                name.split_once('.')
                    .and_then(|(_, parent)| self.wildcard.get(parent))
            })
            .or(self.default.as_ref())
            .cloned()
    }
}

/// Chooses the certificate by SNI; swapped whole on reload (open connections keep theirs).
#[derive(Debug, Default)]
pub struct SniResolver {
    table: ArcSwap<CertTable>,
}

impl SniResolver {
    /// A resolver serving `table`.
    pub fn new(table: CertTable) -> SniResolver {
        SniResolver {
            table: ArcSwap::from_pointee(table),
        }
    }

    /// Replaces the certificates (a reload).
    pub fn store(&self, table: CertTable) {
        self.table.store(Arc::new(table));
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // None fails the handshake: an unknown name gets no certificate of a customer.
        self.table.load().find(hello.server_name())
    }
}

/// The SNI a TLS connection asked for, kept in its digest.
#[derive(Debug, Clone)]
pub struct Sni(pub String);

/// Records each connection's SNI after the handshake.
pub struct RecordSni;

#[async_trait::async_trait]
impl TlsAccept for RecordSni {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        tls.server_name()
            .map(|n| Arc::new(Sni(n.to_ascii_lowercase())) as Arc<dyn Any + Send + Sync>)
    }
}
