//! Throwaway certificates, so that tests can run servers with TLS and check verification.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use super::{server_user::ServerUser, TestkitError};

/// The names the server certificate of a TLS topology is valid for. `127.0.0.1` is left out on
/// purpose: connecting by IP address with `verify-full` must fail on the name.
pub const SERVER_NAMES: [&str; 1] = ["localhost"];

/// The files of a topology's TLS set-up.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The authority that signed the server certificate (PEM).
    pub ca: PathBuf,
    /// The server certificate (PEM), valid for [`SERVER_NAMES`].
    pub certificate: PathBuf,
    /// The server's private key (PEM), readable by the server user only.
    pub key: PathBuf,
}

fn failed(what: &str) -> impl FnOnce(rcgen::Error) -> TestkitError + '_ {
    move |error| TestkitError::Invalid(format!("cannot generate {what}: {error}"))
}

fn authority(name: &str) -> Result<(CertificateParams, KeyPair), TestkitError> {
    let key = KeyPair::generate().map_err(failed("a CA key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(failed("a CA"))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    Ok((params, key))
}

/// Writes a new authority, and a server certificate and key it signed, into `dir`.
pub(crate) fn generate(dir: &Path, server_user: &ServerUser) -> Result<TlsFiles, TestkitError> {
    std::fs::create_dir_all(dir).map_err(TestkitError::io("creating the TLS directory"))?;
    server_user.give(dir)?;
    let (ca_params, ca_key) = authority("pgherd testkit CA")?;
    let ca_certificate = ca_params.self_signed(&ca_key).map_err(failed("a CA"))?;
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().map_err(failed("a server key"))?;
    let mut server_params = CertificateParams::new(
        SERVER_NAMES
            .iter()
            .map(|n| (*n).to_owned())
            .collect::<Vec<_>>(),
    )
    .map_err(failed("a server certificate"))?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, SERVER_NAMES[0]);
    let server_certificate = server_params
        .signed_by(&server_key, &issuer)
        .map_err(failed("a server certificate"))?;
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        certificate: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    write(&files.ca, &ca_certificate.pem(), 0o644, server_user)?;
    write(
        &files.certificate,
        &server_certificate.pem(),
        0o644,
        server_user,
    )?;
    // PostgreSQL refuses a key that others can read.
    write(&files.key, &server_key.serialize_pem(), 0o600, server_user)?;
    Ok(files)
}

/// The PEM of a new authority that signed nothing: a server's certificate never verifies
/// against it.
///
/// # Errors
///
/// When the certificate cannot be generated.
pub fn unrelated_ca_pem() -> Result<String, TestkitError> {
    let (params, key) = authority("unrelated CA")?;
    Ok(params.self_signed(&key).map_err(failed("a CA"))?.pem())
}

fn write(path: &Path, text: &str, mode: u32, server_user: &ServerUser) -> Result<(), TestkitError> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).map_err(TestkitError::io(format!("writing {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(TestkitError::io(format!("protecting {}", path.display())))?;
    server_user.give(path)
}
