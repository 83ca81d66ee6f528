//! HTTPS with the box's own certificate, made the first time webd starts
//! and kept in `<data_dir>/tls/` (the key mode 0600). No authority signs
//! it: a browser warns the first time, and the person compares the SHA-256
//! fingerprint it shows with the one the box printed on its console and
//! shows on its page. The certificate is valid from 1975 to 9999, so that
//! a box whose clock is wrong still serves it.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", .path.display())]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("making the box's certificate: {0}")]
    Make(#[from] rcgen::Error),
    #[error("the box's certificate and key do not make a TLS server: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The box's TLS server and the fingerprint people check it by.
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// SHA-256 of the certificate, as browsers show it (`AB:CD:…`).
    pub fingerprint: String,
}

impl Tls {
    /// Loads the certificate in `dir`, or makes one naming `names` when
    /// there is none yet.
    pub fn load_or_create(dir: &Path, names: &[String]) -> Result<Tls, TlsError> {
        let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
        if !cert_path.exists() || !key_path.exists() {
            create(dir, &cert_path, &key_path, names)?;
        }
        let pem = |path: &PathBuf| {
            let path = path.clone();
            move |source| TlsError::Pem { path, source }
        };
        let cert = CertificateDer::from_pem_file(&cert_path).map_err(pem(&cert_path))?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(pem(&key_path))?;
        let fingerprint = fingerprint(&cert);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            fingerprint,
        })
    }
}

/// SHA-256 of a DER certificate, in upper-case hex pairs joined by colons.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn create(dir: &Path, cert_path: &Path, key_path: &Path, names: &[String]) -> Result<(), TlsError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "PocketOS box");
    params.not_before = rcgen::date_time_ymd(1975, 1, 1);
    params.not_after = rcgen::date_time_ymd(9999, 12, 31);
    let cert = params.self_signed(&key)?;
    // The key first, never readable by others; the certificate last, so
    // that a pair is complete whenever the certificate is there.
    write_new(key_path, key.serialize_pem().as_bytes(), 0o600).map_err(io(key_path))?;
    write_new(cert_path, cert.pem().as_bytes(), 0o644).map_err(io(cert_path))?;
    tracing::info!(
        "made the box's certificate for {}: SHA-256 {}",
        names.join(", "),
        fingerprint(cert.der())
    );
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file renamed into place.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_certificate_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["pocketos".to_string(), "localhost".to_string()];
        let first = Tls::load_or_create(dir.path(), &names).unwrap();
        let again = Tls::load_or_create(dir.path(), &names).unwrap();
        assert_eq!(first.fingerprint, again.fingerprint);
        assert_eq!(first.fingerprint.len(), 32 * 3 - 1);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is the box's alone");
    }

    #[test]
    fn a_fingerprint_reads_as_browsers_show_it() {
        assert_eq!(
            fingerprint(b"abc"),
            "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:F2:00:15:AD"
        );
    }
}
