//! DICOM TLS (PS3.15 B.1, "Basic TLS Secure Transport Connection profile"):
//! rustls configs for the TLS listener and for TLS destinations.
//!
//! Input: the `node.tls` and `destinations.<name>.tls` config sections.
//! Output: an `Arc<rustls::ServerConfig>` for ingest and an
//! `Arc<rustls::ClientConfig>` per TLS destination for the outbox.
//!
//! Invariants:
//! - One crypto provider, ring (what dicom-ul's `async-tls` leaves us to
//!   choose; it builds with just a C compiler), and TLS 1.2 and 1.3 only.
//! - Trust comes only from the PEM files in the config, never from a system
//!   store: DICOM peers authenticate each other through a site's own CA.
//!
//! Failure modes: every unreadable or unusable file is a [`TlsError`] that
//! names its config key, so `check-config` and start-up point at the line
//! instead of panicking in the first handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::{Config, DestinationTlsConfig, NodeTlsConfig};

/// A TLS config that cannot be built; `key` is the config key at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {message}", path.display())]
    Pem {
        key: String,
        path: PathBuf,
        message: String,
    },
    #[error("{} holds no {what}", path.display())]
    Empty {
        key: String,
        path: PathBuf,
        what: &'static str,
    },
    #[error("{message}")]
    Rejected { key: String, message: String },
}

impl TlsError {
    pub fn key(&self) -> &str {
        match self {
            TlsError::Pem { key, .. } | TlsError::Empty { key, .. } | TlsError::Rejected { key, .. } => key,
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pem_error(key: &str, path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    TlsError::Pem {
        key: key.to_owned(),
        path: path.to_owned(),
        message: e.to_string(),
    }
}

fn certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(key, path, e))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            key: key.to_owned(),
            path: path.to_owned(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

fn private_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            key: key.to_owned(),
            path: path.to_owned(),
            what: "PEM private key",
        },
        e => pem_error(key, path, e),
    })
}

fn roots(key: &str, path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certificates(key, path)? {
        store.add(c).map_err(|e| TlsError::Rejected {
            key: key.to_owned(),
            message: format!("{}: not a usable CA certificate: {e}", path.display()),
        })?;
    }
    Ok(Arc::new(store))
}

/// The listener's config; `node.tls.*` keys in errors.
pub fn server_config(t: &NodeTlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = certificates("node.tls.certificate", &t.certificate)?;
    let key = private_key("node.tls.private_key", &t.private_key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rejected {
            key: "node.tls".into(),
            message: e.to_string(),
        })?;
    let builder = match &t.client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots("node.tls.client_ca", ca)?,
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Rejected {
                key: "node.tls.client_ca".into(),
                message: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    // Also checks that the key matches the leaf certificate.
    let cfg = builder.with_single_cert(certs, key).map_err(|e| TlsError::Rejected {
        key: "node.tls.private_key".into(),
        message: format!("does not fit node.tls.certificate: {e}"),
    })?;
    Ok(Arc::new(cfg))
}

/// A destination's config; `destinations.<name>.tls.*` keys in errors.
pub fn client_config(name: &str, t: &DestinationTlsConfig) -> Result<Arc<ClientConfig>, TlsError> {
    let key = |k: &str| format!("destinations.{name}.tls.{k}");
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rejected {
            key: key("ca"),
            message: e.to_string(),
        })?
        .with_root_certificates(roots(&key("ca"), &t.ca)?);
    let cfg = match (&t.certificate, &t.private_key) {
        (Some(c), Some(k)) => {
            let certs = certificates(&key("certificate"), c)?;
            let pk = private_key(&key("private_key"), k)?;
            builder.with_client_auth_cert(certs, pk).map_err(|e| TlsError::Rejected {
                key: key("private_key"),
                message: format!("does not fit the certificate: {e}"),
            })?
        }
        // `validate` refuses one without the other.
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// Build every TLS config once and return what fails: what `check-config`
/// and start-up report before anything listens.
pub fn check(cfg: &Config) -> Vec<TlsError> {
    let mut errors = Vec::new();
    if let Some(t) = &cfg.node.tls {
        errors.extend(server_config(t).err());
    }
    for (name, d) in &cfg.destinations {
        if let Some(t) = &d.tls {
            errors.extend(client_config(name, t).err());
        }
    }
    errors
}

/// A throwaway PKI made with the openssl CLI, for stage tests that need a
/// real TLS peer.
#[cfg(test)]
pub(crate) mod testpki {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    pub struct Pki {
        pub ca: PathBuf,
        /// Issued by `ca` for localhost and 127.0.0.1, for server and client use.
        pub cert: PathBuf,
        pub key: PathBuf,
    }

    fn openssl(dir: &Path, args: &[&str]) -> bool {
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// `None` when openssl is not installed.
    pub fn make(dir: &Path) -> Option<Pki> {
        std::fs::write(
            dir.join("leaf.ext"),
            "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .ok()?;
        let ok = openssl(dir, &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test ca", "-keyout", "ca.key", "-out", "ca.pem"])
            && openssl(dir, &["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "leaf.key", "-out", "leaf.csr"])
            && openssl(dir, &["x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", "leaf.ext", "-out", "leaf.pem"]);
        ok.then(|| Pki {
            ca: dir.join("ca.pem"),
            cert: dir.join("leaf.pem"),
            key: dir.join("leaf.key"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a self-signed CA-less pair with the openssl CLI (which the
    /// integration tests also use); `None` when openssl is not installed.
    fn openssl_pair(dir: &Path) -> Option<(PathBuf, PathBuf)> {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        let ok = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .ok()?
            .status
            .success();
        ok.then_some((cert, key))
    }

    fn node_tls(cert: &Path, key: &Path) -> NodeTlsConfig {
        NodeTlsConfig {
            port: 2762,
            certificate: cert.to_owned(),
            private_key: key.to_owned(),
            client_ca: None,
            plain: true,
        }
    }

    #[test]
    fn missing_files_name_their_key() {
        let t = node_tls(Path::new("/nonexistent/cert.pem"), Path::new("/nonexistent/key.pem"));
        let e = server_config(&t).unwrap_err();
        assert_eq!(e.key(), "node.tls.certificate");
        assert!(e.to_string().contains("/nonexistent/cert.pem"), "{e}");
    }

    #[test]
    fn a_key_file_without_a_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let Some((cert, _)) = openssl_pair(dir.path()) else {
            eprintln!("openssl not installed; skipped");
            return;
        };
        // A certificate where the key should be.
        let e = server_config(&node_tls(&cert, &cert)).unwrap_err();
        assert_eq!(e.key(), "node.tls.private_key");
        assert!(e.to_string().contains("no PEM private key"), "{e}");
        // Garbage where the certificate should be.
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a pem file\n").unwrap();
        let e = server_config(&node_tls(&junk, &cert)).unwrap_err();
        assert_eq!(e.key(), "node.tls.certificate");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (Some((cert, _)), Some((_, other_key))) = (openssl_pair(a.path()), openssl_pair(b.path())) else {
            eprintln!("openssl not installed; skipped");
            return;
        };
        let e = server_config(&node_tls(&cert, &other_key)).unwrap_err();
        assert_eq!(e.key(), "node.tls.private_key");
    }

    #[test]
    fn server_and_client_configs_build_from_one_pair() {
        let dir = tempfile::tempdir().unwrap();
        let Some((cert, key)) = openssl_pair(dir.path()) else {
            eprintln!("openssl not installed; skipped");
            return;
        };
        let mut t = node_tls(&cert, &key);
        t.client_ca = Some(cert.clone());
        server_config(&t).unwrap();
        let d = DestinationTlsConfig {
            ca: cert.clone(),
            certificate: Some(cert.clone()),
            private_key: Some(key.clone()),
            server_name: None,
        };
        client_config("pacs", &d).unwrap();
        let e = client_config("pacs", &DestinationTlsConfig { ca: key, ..d }).unwrap_err();
        assert_eq!(e.key(), "destinations.pacs.tls.ca");
    }
}
