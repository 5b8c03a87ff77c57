//! TLS for test servers standing in for downstreams, proxies and centrals.

use std::path::Path;
use std::sync::Arc;

/// A TLS acceptor serving the certificate chain in `cert` with the key in `key` (PEM files), no
/// client certificates, offering the ALPN protocols `alpn` (its preference first).
pub fn acceptor(cert: &Path, key: &Path, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    let chain = outpost_tls::load_certs("test", cert).unwrap();
    let key = outpost_tls::load_key("test", key).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(outpost_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}
