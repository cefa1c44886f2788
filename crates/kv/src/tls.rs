//! TLS on the client port: the server side from a member's files
//! (`--cert-file`, `--key-file`, `--trusted-ca-file`, `--client-cert-auth`)
//! and the client side, used by members that forward requests to the
//! leader's client port and by `skiff`'s client commands (etcdctl's
//! `--cacert`, `--cert`, `--key`).
//!
//! Certificates are read once, when the server starts or the client is
//! made; a file that cannot be read or parsed is an error that names it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use skiff_node::config::{ConfigError, NodeConfig, TlsFiles};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// Longest a client may take to finish its TLS handshake; a connection
/// that takes longer is closed (a plaintext client on the TLS port, a
/// client that stalls).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {} holds no PEM block (\"-----BEGIN\")", path.display())]
    NotPem { what: &'static str, path: PathBuf },
    #[error("{0}")]
    Config(String),
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !bytes.windows(10).any(|w| w == b"-----BEGIN") {
        return Err(TlsError::NotPem {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// The client port's server configuration: serves `files.cert`, verifies
/// the certificates clients present against the CA, and with `cert_auth`
/// refuses clients that present none.
pub fn server_config(files: &TlsFiles) -> Result<ServerTlsConfig, TlsError> {
    let identity = Identity::from_pem(
        read_pem("certificate", &files.cert)?,
        read_pem("key", &files.key)?,
    );
    let config = ServerTlsConfig::new()
        .identity(identity)
        .timeout(HANDSHAKE_TIMEOUT);
    let config = config
        .client_ca_root(Certificate::from_pem(read_pem(
            "CA file",
            &files.trusted_ca,
        )?))
        .client_auth_optional(!files.cert_auth);
    Ok(config)
}

/// How a client reaches client ports: plaintext, or TLS with the roots it
/// trusts and the certificate it presents.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// Shared: clients are cloned per connection and per task.
    config: Option<Arc<ClientTlsConfig>>,
}

impl ClientTls {
    /// Plaintext (`http://`).
    pub fn plaintext() -> ClientTls {
        ClientTls::default()
    }

    /// TLS trusting `ca` (the server's certificate must chain to it),
    /// presenting `cert`/`key` when given (both or neither). With no
    /// option at all, plaintext.
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<ClientTls, TlsError> {
        let identity = match (cert, key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(Identity::from_pem(
                read_pem("certificate", cert)?,
                read_pem("key", key)?,
            )),
            _ => {
                return Err(TlsError::Config(
                    "a client certificate needs its key (give both, or neither)".into(),
                ))
            }
        };
        if ca.is_none() && identity.is_none() {
            return Ok(ClientTls::plaintext());
        }
        let Some(ca) = ca else {
            return Err(TlsError::Config(
                "TLS needs the CA the servers' certificates chain to (--cacert)".into(),
            ));
        };
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem("CA file", ca)?));
        if let Some(identity) = identity {
            config = config.identity(identity);
        }
        Ok(ClientTls {
            config: Some(Arc::new(config)),
        })
    }

    /// A member's own client side (forwarding to the leader): TLS when its
    /// client port serves TLS, trusting its `trusted_ca` (which
    /// `NodeConfig::validate` requires with TLS) and presenting its own
    /// certificate, which the other members' `client_cert_auth` accepts:
    /// one cluster, one CA.
    pub fn for_member(files: Option<&TlsFiles>) -> Result<ClientTls, TlsError> {
        match files {
            None => Ok(ClientTls::plaintext()),
            Some(f) => ClientTls::from_files(Some(&f.trusted_ca), Some(&f.cert), Some(&f.key)),
        }
    }

    /// Whether connections use TLS.
    pub fn is_tls(&self) -> bool {
        self.config.is_some()
    }

    /// The URL scheme of this client's connections.
    pub fn scheme(&self) -> &'static str {
        if self.is_tls() {
            "https"
        } else {
            "http"
        }
    }

    /// An endpoint for `url` (`host:port`, `http://host:port` or
    /// `https://host:port`): a URL without a scheme takes this client's.
    /// Refused: `https://` on a plaintext client (no roots to verify with)
    /// and `http://` on a TLS one.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        let url = url.trim().trim_end_matches('/');
        let url = if url.contains("://") {
            url.to_string()
        } else {
            format!("{}://{url}", self.scheme())
        };
        let tls = url.starts_with("https://");
        if tls != self.is_tls() {
            return Err(TlsError::Config(if tls {
                format!("{url} needs TLS: give the CA its certificate chains to (--cacert)")
            } else {
                format!("{url} is plaintext but TLS options were given; use https://")
            }));
        }
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| TlsError::Config(format!("{url}: {e}")))?;
        match &self.config {
            None => Ok(endpoint),
            Some(config) => endpoint
                .tls_config(ClientTlsConfig::clone(config))
                .map_err(|e| TlsError::Config(format!("{url}: {e}"))),
        }
    }
}

/// A member's client-port TLS: what its server serves and how it calls
/// the other members' client ports.
#[derive(Debug, Clone, Default)]
pub struct MemberTls {
    /// `None`: the client port serves plaintext.
    pub server: Option<ServerTlsConfig>,
    pub client: ClientTls,
}

impl MemberTls {
    /// Reads and checks `cfg`'s client TLS files (before the node starts,
    /// so that a bad certificate stops the start at once).
    pub fn load(cfg: &NodeConfig) -> Result<MemberTls, ConfigError> {
        let field = |e: TlsError| ConfigError {
            field: "cert_file".into(),
            reason: e.to_string(),
        };
        let Some(files) = cfg.client_tls_files()? else {
            return Ok(MemberTls::default());
        };
        let server = server_config(&files).map_err(field)?;
        // Parses the certificate and key now rather than at the first
        // connection.
        tonic::transport::Server::builder()
            .tls_config(server.clone())
            .map_err(|e| field(TlsError::Config(format!("certificate or key: {e}"))))?;
        let client = ClientTls::for_member(Some(&files)).map_err(field)?;
        Ok(MemberTls {
            server: Some(server),
            client,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_take_the_clients_scheme_and_refuse_the_other() {
        let plain = ClientTls::plaintext();
        assert_eq!(
            plain.endpoint("127.0.0.1:1").unwrap().uri().scheme_str(),
            Some("http")
        );
        assert!(plain.endpoint("https://127.0.0.1:1").is_err());
        let tls = ClientTls {
            config: Some(Arc::new(ClientTlsConfig::new())),
        };
        assert_eq!(
            tls.endpoint("127.0.0.1:1/").unwrap().uri().scheme_str(),
            Some("https")
        );
        assert!(tls.endpoint("http://127.0.0.1:1").is_err());
    }

    #[test]
    fn unreadable_or_non_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = ClientTls::from_files(Some(&junk), None, None).unwrap_err();
        assert!(e.to_string().contains("junk.pem"), "{e}");
        let missing = dir.path().join("missing.pem");
        let e = ClientTls::from_files(Some(&missing), None, None).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let e = ClientTls::from_files(None, Some(&junk), None).unwrap_err();
        assert!(e.to_string().contains("key"), "{e}");
        assert!(!ClientTls::from_files(None, None, None).unwrap().is_tls());
    }
}
