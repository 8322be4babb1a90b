//! TLS for an endpoint, with libpq's `sslmode` meanings, through rustls.

use std::{fmt, io::BufReader, path::Path, sync::Arc};

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode as DriverSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::{
    error::{Error, ErrorKind},
    settings::{EndpointSettings, SslMode},
};

/// How connections to one endpoint are made: plain, or through rustls.
#[derive(Clone)]
pub(crate) enum Tls {
    /// `sslmode = "disable"`.
    Plain,
    /// Any other mode.
    Rustls(MakeRustlsConnect),
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tls::Plain => "Plain",
            Tls::Rustls(_) => "Rustls",
        })
    }
}

impl Tls {
    /// The connector and the driver's `sslmode` for `endpoint`.
    ///
    /// # Errors
    ///
    /// A [`Config`](ErrorKind::Config) error when the trusted authorities cannot be read.
    pub(crate) fn for_endpoint(
        name: &str,
        endpoint: &EndpointSettings,
    ) -> Result<(Tls, DriverSslMode), Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config_error = |detail: String| {
            Error::new(ErrorKind::Config).with_detail(format!("endpoints.{name}: {detail}"))
        };
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(format!("TLS set-up failed: {e}")))?;
        let (config, mode) = match endpoint.sslmode {
            SslMode::Disable => return Ok((Tls::Plain, DriverSslMode::Disable)),
            SslMode::Prefer | SslMode::Require => {
                let config = builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(EncryptOnly { provider }))
                    .with_no_client_auth();
                let mode = if endpoint.sslmode == SslMode::Prefer {
                    DriverSslMode::Prefer
                } else {
                    DriverSslMode::Require
                };
                (config, mode)
            }
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let roots = Arc::new(
                    roots(endpoint.sslrootcert.as_deref())
                        .map_err(|detail| config_error(format!("sslrootcert: {detail}")))?,
                );
                let chain = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| {
                        config_error(format!("cannot use the trusted authorities: {e}"))
                    })?;
                let config = if endpoint.sslmode == SslMode::VerifyCa {
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(ChainOnly { chain }))
                        .with_no_client_auth()
                } else {
                    builder.with_webpki_verifier(chain).with_no_client_auth()
                };
                (config, DriverSslMode::Require)
            }
        };
        Ok((Tls::Rustls(MakeRustlsConnect::new(config)), mode))
    }
}

/// The trusted authorities: the PEM file given, or the Mozilla set.
fn roots(file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    let Some(file) = file else {
        store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok(store);
    };
    let opened =
        std::fs::File::open(file).map_err(|e| format!("cannot read `{}`: {e}", file.display()))?;
    let certificates: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut BufReader::new(opened))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("`{}` is not a PEM file: {e}", file.display()))?;
    if certificates.is_empty() {
        return Err(format!("`{}` holds no certificate", file.display()));
    }
    for certificate in certificates {
        store
            .add(certificate)
            .map_err(|e| format!("`{}` holds an unusable certificate: {e}", file.display()))?;
    }
    Ok(store)
}

/// `sslmode = "prefer"` / `"require"`: encrypt, accept any certificate (as libpq does), but still
/// check that the server holds the key of the certificate it shows.
#[derive(Debug)]
struct EncryptOnly {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for EncryptOnly {
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
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `sslmode = "verify-ca"`: the chain must lead to a trusted authority; the host name is not
/// checked.
#[derive(Debug)]
struct ChainOnly {
    chain: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The chain is checked before the name, so a name error means the chain was good.
        match self.chain.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}
