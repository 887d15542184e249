//! TLS at the edge: the certificate of a connection follows routing (the resource its SNI
//! routes to serves its own certificate; a resource without one, an unknown name or no SNI
//! get the default certificate, if any), and the SNI of each connection is kept so the
//! proxy can refuse a Host of another resource (421).

use super::router::SharedRouter;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, ResolvesServerCert};
use std::any::Any;
use std::sync::Arc;

/// Chooses a connection's certificate by routing its SNI through the live resource table,
/// so the choice always agrees with routing and is swapped with it on reload (open
/// connections keep theirs): the resource the name routes to serves its certificate; a
/// resource without one, a name no resource serves and a client without SNI get the
/// default certificate; without one the handshake fails, so an unknown name never gets a
/// customer's certificate.
#[derive(Debug)]
pub struct SniResolver {
    table: SharedRouter,
}

impl SniResolver {
    /// A resolver over the live table `table`.
    pub fn new(table: SharedRouter) -> SniResolver {
        SniResolver { table }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let router = self.table.load();
        let own = hello
            .server_name()
            .and_then(|name| router.find(name))
            .and_then(|site| site.resource.tls.as_ref());
        own.or(router.default_certificate()).map(|c| c.key.clone())
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
