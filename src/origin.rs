//! The way to an origin: which server, which scheme, which TLS name and trust, which
//! timeouts, as a Pingora [`HttpPeer`].

use crate::config::{OriginProtocol, Resource};
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{parse_x509, WrappedX509};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

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

/// Whether the connection to the origin uses TLS, given how the client came in.
pub fn uses_tls(protocol: OriginProtocol, client_tls: bool) -> bool {
    match protocol {
        OriginProtocol::Http => false,
        OriginProtocol::Https => true,
        OriginProtocol::Follow => client_tls,
    }
}

/// The peer for one server of the resource's origin group. `client_host` is the client's
/// Host without port, used for SNI when neither `sni` nor `host` is configured.
pub fn peer(res: &Resource, server: SocketAddr, client_tls: bool, client_host: &str) -> HttpPeer {
    let o = &res.origin;
    let tls = uses_tls(o.protocol, client_tls);
    let sni = o
        .sni
        .as_deref()
        .or(o.host.as_deref())
        .unwrap_or(client_host)
        .to_string();
    let mut peer = HttpPeer::new(server, tls, sni);
    peer.options.connection_timeout = Some(o.connect_timeout);
    peer.options.total_connection_timeout = Some(o.connect_timeout);
    if tls {
        peer.options.verify_cert = o.verify_tls;
        peer.options.verify_hostname = o.verify_tls;
        peer.options.ca = o.ca.as_ref().map(|c| c.0.clone());
    }
    peer
}
