//! TLS for PostgreSQL connections, with libpq's `sslmode` semantics read from the URL:
//!
//! | sslmode | encryption | server certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | `allow`, `prefer` (default) | when the server offers it | not checked |
//! | `require` | always | not checked, unless `sslrootcert` is given (then as `verify-ca`) |
//! | `verify-ca` | always | signed by `sslrootcert` (default: system roots) |
//! | `verify-full` | always | `verify-ca` and it names the host |
//!
//! tokio-postgres itself knows only `disable`, `prefer` and `require` and refuses unknown
//! parameters, so [`prepare`] rewrites the URL for it and returns the connector that checks the
//! certificate as asked.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

use crate::{load_roots, provider, system_roots, TlsError};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The connector for a PostgreSQL URL (cheap to clone).
#[derive(Clone)]
pub struct PgTls {
    pub mode: SslMode,
    pub root_file: Option<PathBuf>,
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgTls(sslmode={})", self.mode.as_str())
    }
}

/// Reads `sslmode` and `sslrootcert` from `url`; returns the URL tokio-postgres can parse (their
/// values replaced by what it knows) and the connector. Only URLs (`postgres://…?…`) carry these
/// parameters; a key=value string is passed on as it is, with the default `prefer`.
pub fn prepare(url: &str) -> Result<(String, PgTls), TlsError> {
    let mut mode = SslMode::Prefer;
    let mut root_file = None;
    let mut rewritten = url.to_string();
    if let Some((base, query)) = url.split_once('?').filter(|_| url.contains("://")) {
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "sslmode" => {
                    mode = match value {
                        "disable" => SslMode::Disable,
                        "allow" | "prefer" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        other => {
                            return Err(TlsError {
                                key: "postgres".into(),
                                file: PathBuf::from("(URL)"),
                                problem: format!(
                                    "sslmode={other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                                ),
                            })
                        }
                    };
                }
                "sslrootcert" => root_file = Some(PathBuf::from(percent_decode(value))),
                _ => kept.push(pair.to_string()),
            }
        }
        if root_file.is_some() && mode == SslMode::Require {
            mode = SslMode::VerifyCa;
        }
        let tokio_mode = match mode {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            _ => "require",
        };
        kept.push(format!("sslmode={tokio_mode}"));
        rewritten = format!("{base}?{}", kept.join("&"));
    }
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => Arc::new(NoVerification),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = match &root_file {
                Some(file) => Arc::new(load_roots("postgres sslrootcert", file)?),
                None => system_roots(),
            };
            let webpki =
                WebPkiServerVerifier::builder_with_provider(roots, provider()).build().map_err(|e| {
                    TlsError {
                        key: "postgres sslrootcert".into(),
                        file: root_file.clone().unwrap_or_default(),
                        problem: e.to_string(),
                    }
                })?;
            Arc::new(PgVerifier { webpki, check_name: mode == SslMode::VerifyFull })
        }
    };
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok((rewritten, PgTls { mode, root_file, config: Arc::new(config) }))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(b) = text.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, io::Error> {
        let name = ServerName::try_from(domain.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("host {domain:?}: {e}")))?;
        Ok(PgTlsConnect { config: self.config.clone(), name })
    }
}

pub struct PgTlsConnect {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move {
            let stream = connector.connect(self.name, stream).await.map_err(|e| {
                io::Error::new(e.kind(), format!("TLS with PostgreSQL: {}", crate::explain(&e.to_string())))
            })?;
            Ok(PgTlsStream(stream))
        })
    }
}

/// A TLS stream to PostgreSQL (no channel binding: SCRAM without `-PLUS`).
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

/// `prefer`/`require`: encrypted, the server's certificate not checked (libpq does the same).
#[derive(Debug)]
struct NoVerification;

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca` (chain only) and `verify-full` (chain and host name).
#[derive(Debug)]
struct PgVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for PgVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_is_rewritten_for_tokio_postgres() {
        let cases = [
            ("postgres://u@h/db", "postgres://u@h/db", SslMode::Prefer),
            ("postgres://u@h/db?sslmode=disable", "postgres://u@h/db?sslmode=disable", SslMode::Disable),
            ("postgres://u@h/db?sslmode=allow", "postgres://u@h/db?sslmode=prefer", SslMode::Prefer),
            (
                "postgres://u@h/db?application_name=x&sslmode=require",
                "postgres://u@h/db?application_name=x&sslmode=require",
                SslMode::Require,
            ),
            (
                "postgres://u@h/db?sslmode=verify-full",
                "postgres://u@h/db?sslmode=require",
                SslMode::VerifyFull,
            ),
            ("postgres://u@h/db?sslmode=verify-ca", "postgres://u@h/db?sslmode=require", SslMode::VerifyCa),
        ];
        for (url, want, mode) in cases {
            let (got, tls) = prepare(url).unwrap();
            assert_eq!(got, want, "{url}");
            assert_eq!(tls.mode, mode, "{url}");
        }
        assert!(prepare("postgres://u@h/db?sslmode=bogus").unwrap_err().problem.contains("bogus"));
        let missing =
            prepare("postgres://u@h/db?sslmode=require&sslrootcert=/nonexistent/ca.pem").unwrap_err();
        assert!(missing.problem.contains("cannot read"), "{missing}");
    }
}
