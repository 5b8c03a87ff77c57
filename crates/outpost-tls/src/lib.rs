//! The one TLS setup of a node: rustls with the `ring` provider for the listener (`[tls]`, with
//! optional client certificates from `client_ca_file`), for the edge's link to its centrals and
//! for route deliveries (`ca_file`, `cert_file`, `key_file`; system roots by default), and for
//! PostgreSQL ([`postgres`], `sslmode` in the URL).
//!
//! Certificates, keys and CA files are read here and only here, with errors that name the file and
//! what is wrong with it. Every TLS setting is held behind a swappable `Arc`: [`reload`] re-reads
//! the files on SIGHUP and when they change, and a broken new file leaves the old setting in use.

pub mod postgres;
mod reload;
pub mod x509;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

pub use reload::{spawn_reloader, Reloadable};
pub use rustls;
pub use x509::CertSummary;

/// A TLS file that cannot be used, said so an operator can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} = {}: {problem}", file.display())]
pub struct TlsError {
    /// The configuration key that names the file, e.g. `tls.cert_file`, `upstream[0].ca_file`.
    pub key: String,
    pub file: PathBuf,
    pub problem: String,
}

fn tls_error(key: &str, file: &Path, problem: impl Into<String>) -> TlsError {
    TlsError { key: key.to_string(), file: file.to_path_buf(), problem: problem.into() }
}

/// The crypto provider of every TLS connection outpost makes or accepts.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn read(key: &str, file: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(file).map_err(|e| tls_error(key, file, format!("cannot read the file: {e}")))
}

/// Reads a PEM certificate chain (the first certificate is the node's own). Refuses an empty or
/// non-PEM file and a first certificate that is expired or not yet valid.
pub fn load_certs(key: &str, file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(key, file)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| tls_error(key, file, format!("not a PEM certificate file: {e}")))?;
    let Some(first) = certs.first() else {
        return Err(tls_error(
            key,
            file,
            "not a PEM certificate file: no \"BEGIN CERTIFICATE\" section found",
        ));
    };
    check_validity(key, file, first)?;
    Ok(certs)
}

fn check_validity(key: &str, file: &Path, cert: &CertificateDer<'_>) -> Result<CertSummary, TlsError> {
    let summary = x509::summarize(cert)
        .ok_or_else(|| tls_error(key, file, "the PEM section is not a readable X.509 certificate"))?;
    let now = now_unix();
    if summary.not_after < now {
        return Err(tls_error(
            key,
            file,
            format!("the certificate expired at {}", x509::format_time(summary.not_after)),
        ));
    }
    if summary.not_before > now {
        return Err(tls_error(
            key,
            file,
            format!("the certificate is not valid before {}", x509::format_time(summary.not_before)),
        ));
    }
    Ok(summary)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(key: &str, file: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(key, file)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        tls_error(key, file, format!("not a PEM private key (expected a \"BEGIN PRIVATE KEY\" section): {e}"))
    })
}

/// A certificate chain with its key, checked to belong together.
fn certified_key(
    cert_key: &str,
    cert_file: &Path,
    key_key: &str,
    key_file: &Path,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = load_certs(cert_key, cert_file)?;
    let key = load_key(key_key, key_file)?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| tls_error(key_key, key_file, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|e| {
        tls_error(
            key_key,
            key_file,
            format!("the key does not match the certificate in {} ({e})", cert_file.display()),
        )
    })?;
    Ok(Arc::new(certified))
}

/// Reads a PEM file of CA certificates into a root store.
pub fn load_roots(key: &str, file: &Path) -> Result<RootCertStore, TlsError> {
    let bytes = read(key, file)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| tls_error(key, file, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(tls_error(
            key,
            file,
            "not a PEM certificate file: no \"BEGIN CERTIFICATE\" section found",
        ));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| tls_error(key, file, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The system's trusted roots (read once; `SSL_CERT_FILE`/`SSL_CERT_DIR` are honoured).
pub fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!("reading the system's CA certificates: {e}");
            }
            let mut roots = RootCertStore::empty();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!("no system CA certificates found: https:// without ca_file will fail");
            }
            Arc::new(roots)
        })
        .clone()
}

// ---------------------------------------------------------------------------------------------
// The listener
// ---------------------------------------------------------------------------------------------

/// The listener's files (`[tls]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Set: clients may present a certificate, and one that is presented must be signed by it.
    /// Whether a certificate is required is the endpoint's decision (edge links need one).
    pub client_ca_file: Option<PathBuf>,
}

/// The listener's TLS setting; [`ServerTls::acceptor`] gives each new connection the current one.
pub struct ServerTls {
    files: ServerFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl ServerTls {
    pub fn load(files: ServerFiles) -> Result<Arc<ServerTls>, TlsError> {
        let config = Self::build(&files)?;
        Ok(Arc::new(ServerTls { files, current: RwLock::new(Arc::new(config)) }))
    }

    fn build(files: &ServerFiles) -> Result<rustls::ServerConfig, TlsError> {
        let certified = certified_key("tls.cert_file", &files.cert_file, "tls.key_file", &files.key_file)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error("tls.cert_file", &files.cert_file, e.to_string()))?;
        let builder = match &files.client_ca_file {
            None => builder.with_no_client_auth(),
            Some(ca_file) => {
                let roots = load_roots("tls.client_ca_file", ca_file)?;
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| tls_error("tls.client_ca_file", ca_file, e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config =
            builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
        // The listener serves both (an edge's link is one HTTP/2 connection); a client that
        // offers no ALPN gets HTTP/1.1 or, with the HTTP/2 preface, HTTP/2.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// The acceptor for a new connection, with the setting in use now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner()).clone();
        tokio_rustls::TlsAcceptor::from(current)
    }

    pub fn files(&self) -> &ServerFiles {
        &self.files
    }

    /// What is in use, for the startup log (files, not secrets).
    pub fn describe(&self) -> String {
        let mut text = format!(
            "cert_file={} key_file={}",
            self.files.cert_file.display(),
            self.files.key_file.display()
        );
        match &self.files.client_ca_file {
            Some(ca) => {
                text.push_str(&format!(" client_ca_file={} (edges need a client certificate)", ca.display()))
            }
            None => text.push_str(" client_ca_file=none"),
        }
        if let Ok(certs) = load_certs("tls.cert_file", &self.files.cert_file) {
            if let Some(summary) = certs.first().and_then(|c| x509::summarize(c)) {
                text.push_str(&format!(
                    " names={:?} not_after={}",
                    summary.identities(),
                    x509::format_time(summary.not_after)
                ));
            }
        }
        text
    }
}

impl Reloadable for ServerTls {
    fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.files.cert_file.clone(), self.files.key_file.clone()];
        files.extend(self.files.client_ca_file.clone());
        files
    }

    fn reload(&self) -> Result<(), TlsError> {
        let config = Self::build(&self.files)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        Ok(())
    }

    fn name(&self) -> String {
        "[tls]".to_string()
    }
}

/// The identity of a client certificate the listener verified: what the request handlers see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The certificate's DNS names and common name.
    pub names: Vec<String>,
}

impl PeerIdentity {
    /// From the verified chain of a connection (the first certificate is the client's own).
    pub fn from_chain(chain: &[CertificateDer<'_>]) -> Option<PeerIdentity> {
        let summary = x509::summarize(chain.first()?)?;
        Some(PeerIdentity { names: summary.identities() })
    }
}

// ---------------------------------------------------------------------------------------------
// Clients: the link and route deliveries
// ---------------------------------------------------------------------------------------------

/// A client's files (`[[upstream]]` or `[[route]]`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientFiles {
    /// The configuration key of the section, e.g. `upstream[0]`, `route[erp]`.
    pub section: String,
    /// `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Both or neither: the client certificate for mTLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// A client's TLS setting. [`ClientTls::config`] is what HTTP clients are built with; its
/// verifier and certificate follow reloads.
pub struct ClientTls {
    files: ClientFiles,
    verifier: Arc<SwapVerifier>,
    cert: Arc<SwapClientCert>,
}

impl ClientTls {
    pub fn load(files: ClientFiles) -> Result<Arc<ClientTls>, TlsError> {
        let (verifier, cert) = Self::build(&files)?;
        Ok(Arc::new(ClientTls {
            files,
            verifier: Arc::new(SwapVerifier(RwLock::new(verifier))),
            cert: Arc::new(SwapClientCert(RwLock::new(cert))),
        }))
    }

    #[allow(clippy::type_complexity)]
    fn build(
        files: &ClientFiles,
    ) -> Result<(Arc<WebPkiServerVerifier>, Option<Arc<CertifiedKey>>), TlsError> {
        let section = &files.section;
        let roots = match &files.ca_file {
            Some(ca) => Arc::new(load_roots(&format!("{section}.ca_file"), ca)?),
            None => system_roots(),
        };
        let verifier =
            WebPkiServerVerifier::builder_with_provider(roots, provider()).build().map_err(|e| {
                let file = files.ca_file.clone().unwrap_or_else(|| PathBuf::from("(system roots)"));
                tls_error(&format!("{section}.ca_file"), &file, e.to_string())
            })?;
        let cert = match (&files.cert_file, &files.key_file) {
            (Some(cert), Some(key)) => Some(certified_key(
                &format!("{section}.cert_file"),
                cert,
                &format!("{section}.key_file"),
                key,
            )?),
            _ => None,
        };
        Ok((verifier, cert))
    }

    /// A rustls client configuration using this setting, offering `h2` then `http/1.1` by ALPN
    /// (the server chooses; a client that speaks only one of them sets its own list).
    pub fn config(&self) -> rustls::ClientConfig {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let mut config = builder
            .dangerous()
            .with_custom_certificate_verifier(self.verifier.clone())
            .with_client_cert_resolver(self.cert.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }

    pub fn describe(&self) -> String {
        format!(
            "{}: ca_file={} client_cert={}",
            self.files.section,
            self.files.ca_file.as_ref().map_or("(system roots)".to_string(), |f| f.display().to_string()),
            self.files.cert_file.as_ref().map_or("none".to_string(), |f| f.display().to_string()),
        )
    }

    /// Whether any file is set (else nothing needs reloading).
    pub fn has_files(&self) -> bool {
        self.files.ca_file.is_some() || self.files.cert_file.is_some()
    }
}

impl Reloadable for ClientTls {
    fn files(&self) -> Vec<PathBuf> {
        [&self.files.ca_file, &self.files.cert_file, &self.files.key_file]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }

    fn reload(&self) -> Result<(), TlsError> {
        let (verifier, cert) = Self::build(&self.files)?;
        *self.verifier.0.write().unwrap_or_else(|p| p.into_inner()) = verifier;
        *self.cert.0.write().unwrap_or_else(|p| p.into_inner()) = cert;
        Ok(())
    }

    fn name(&self) -> String {
        self.files.section.clone()
    }
}

/// The server verifier in use, swapped on reload.
struct SwapVerifier(RwLock<Arc<WebPkiServerVerifier>>);

impl SwapVerifier {
    fn current(&self) -> Arc<WebPkiServerVerifier> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl fmt::Debug for SwapVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SwapVerifier")
    }
}

impl ServerCertVerifier for SwapVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.current().verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// The client certificate in use, swapped on reload.
struct SwapClientCert(RwLock<Option<Arc<CertifiedKey>>>);

impl fmt::Debug for SwapClientCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SwapClientCert")
    }
}

impl ResolvesClientCert for SwapClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn has_certs(&self) -> bool {
        self.0.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

/// A TLS failure said for an operator: the causes of a connection error, with a hint for the
/// usual certificate problems.
pub fn explain(detail: &str) -> String {
    let hint = if detail.contains("UnknownIssuer") {
        Some("the peer's certificate is not signed by a trusted CA (check ca_file)")
    } else if detail.contains("NotValidForName") {
        Some("the peer's certificate does not name the host in the URL")
    } else if detail.contains("Expired") {
        Some("the peer's certificate has expired")
    } else if detail.contains("alert") && (detail.contains("UnknownCA") || detail.contains("BadCertificate"))
    {
        Some("the central refused this node's client certificate (not signed by its tls.client_ca_file)")
    } else if detail.contains("CertificateRequired") {
        Some("the central requires a client certificate (set cert_file and key_file)")
    } else {
        None
    };
    match hint {
        Some(hint) => format!("{detail} ({hint})"),
        None => detail.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// A node's whole setup
// ---------------------------------------------------------------------------------------------

/// Every TLS setting of a node, read once at start from its configuration.
pub struct TlsSetup {
    /// `[tls]`: the listener serves HTTPS.
    pub server: Option<Arc<ServerTls>>,
    /// One per `[[upstream]]`, in order.
    pub upstreams: Vec<Arc<ClientTls>>,
    /// One per `[[route]]`, in order.
    pub routes: Vec<Arc<ClientTls>>,
}

impl TlsSetup {
    /// Reads every certificate, key and CA file the configuration names; the first bad one is the
    /// error.
    pub fn load(config: &outpost_core::Config) -> Result<TlsSetup, TlsError> {
        let server = match &config.tls {
            None => None,
            Some(t) => Some(ServerTls::load(ServerFiles {
                cert_file: t.cert_file.clone(),
                key_file: t.key_file.clone(),
                client_ca_file: t.client_ca_file.clone(),
            })?),
        };
        let client = |section: String, files: &outpost_core::config::ClientTlsFiles| {
            ClientTls::load(ClientFiles {
                section,
                ca_file: files.ca_file.clone(),
                cert_file: files.cert_file.clone(),
                key_file: files.key_file.clone(),
            })
        };
        let upstreams = config
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| client(format!("upstream[{i}]"), &u.tls))
            .collect::<Result<_, _>>()?;
        let routes = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| client(format!("route[{i}]"), &r.tls))
            .collect::<Result<_, _>>()?;
        Ok(TlsSetup { server, upstreams, routes })
    }

    /// A setup with nothing configured (plain listener; clients with the system roots).
    pub fn none() -> TlsSetup {
        TlsSetup { server: None, upstreams: Vec::new(), routes: Vec::new() }
    }

    /// Logs what is in use (files and certificate names, never keys or tokens).
    pub fn log_effective(&self) {
        match &self.server {
            Some(server) => tracing::info!("TLS on the listener: {}", server.describe()),
            None => tracing::info!("TLS on the listener: off (plain HTTP)"),
        }
        for client in self.upstreams.iter().chain(&self.routes).filter(|c| c.has_files()) {
            tracing::info!("TLS client {}", client.describe());
        }
    }

    /// The settings read from files, for [`spawn_reloader`].
    pub fn reloadable(&self) -> Vec<Arc<dyn Reloadable>> {
        let mut all: Vec<Arc<dyn Reloadable>> = Vec::new();
        if let Some(server) = &self.server {
            all.push(server.clone());
        }
        for client in self.upstreams.iter().chain(&self.routes).filter(|c| c.has_files()) {
            all.push(client.clone());
        }
        all
    }
}
