//! PEM files the configuration names, read and checked at load: a resource's (or the
//! default) certificate chain and key, and an origin's CA bundle. Errors say which file and
//! what is wrong with it; the caller places them at the key that named the file.

use pingora::tls::sign::CertifiedKey;
use pingora::tls::CryptoProvider;
use pingora::utils::tls::{parse_x509, WrappedX509};
use std::path::Path;
use std::sync::Arc;

/// A certificate chain and its key, loaded and checked.
#[derive(Clone)]
pub struct Certificate {
    /// What rustls serves.
    pub key: Arc<CertifiedKey>,
    /// When the leaf expires (unix seconds).
    pub not_after: i64,
    /// The names the leaf is valid for: its subject alternative names, DNS names in lower
    /// case (`*.` wildcards as written) and IP addresses (IPv6 in brackets, as in a Host).
    pub names: Vec<String>,
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
        let names = parsed
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::DNSName(d) => {
                            Some(d.to_ascii_lowercase())
                        }
                        x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                            4 => <[u8; 4]>::try_from(*ip)
                                .ok()
                                .map(|b| std::net::Ipv4Addr::from(b).to_string()),
                            16 => <[u8; 16]>::try_from(*ip)
                                .ok()
                                .map(|b| format!("[{}]", std::net::Ipv6Addr::from(b))),
                            _ => None,
                        },
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();

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
            names,
        })
    }

    /// Whether the leaf has expired at `now` (unix seconds).
    pub fn expired(&self, now: i64) -> bool {
        self.not_after < now
    }

    /// Whether the leaf is valid for `host` (no port): one of its names exactly, or a `*.`
    /// name one label up (RFC 6125 §6.4.3).
    pub fn covers(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let parent = host.split_once('.').map(|(_, p)| p);
        self.names.iter().any(|n| match n.strip_prefix("*.") {
            Some(suffix) => parent == Some(suffix),
            None => *n == host,
        })
    }
}

/// CA certificates that sign an origin's certificate (`origin.ca_file`), parsed once.
#[derive(Clone)]
pub struct OriginCa(pub Arc<[WrappedX509]>);

impl std::fmt::Debug for OriginCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OriginCa({} certificates)", self.0.len())
    }
}

impl OriginCa {
    /// Reads a PEM file of CA certificates; the error says what is wrong with the file.
    pub fn load(path: &Path) -> Result<OriginCa, String> {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut certs = Vec::new();
        for item in rustls_pemfile::certs(&mut pem.as_slice()) {
            let der = item.map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
            // parse_x509 panics on bad DER: check first.
            if x509_parser::parse_x509_certificate(der.as_ref()).is_err() {
                return Err(format!(
                    "{} holds a certificate that does not parse",
                    path.display()
                ));
            }
            certs.push(WrappedX509::new(der.as_ref().to_vec(), parse_x509));
        }
        if certs.is_empty() {
            return Err(format!(
                "{} holds no certificate: put the PEM \"BEGIN CERTIFICATE\" blocks of the CA there",
                path.display()
            ));
        }
        Ok(OriginCa(certs.into()))
    }
}
