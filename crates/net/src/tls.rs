//! TLS on the peer and snapshot ports (etcd's `--peer-cert-file`,
//! `--peer-key-file`, `--peer-trusted-ca-file`, `--peer-client-cert-auth`).
//!
//! A member is both sides: it accepts its peers' connections (Raft
//! messages, snapshot requests) and opens its own to them. Both sides
//! present the member's certificate and verify the other's against the peer
//! CA; a member verifies the server it connects to by the host it dials: the
//! host name of its peer URL, or its IP address (the certificate must name
//! it). With client certificate authentication on, an inbound Raft
//! connection is accepted only when its certificate names the peer host of
//! the member its Hello claims to be ([`PeerTls::check_identity`]): a member
//! never applies a message from a connection that did not authenticate as
//! the member it claims to be.
//!
//! The handshake happens before any frame is read, within the caller's
//! handshake timeout. The crypto is rustls with the ring provider.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::addr::Host;

/// A peer TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {}: {reason}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("peer TLS: {0}")]
    Config(String),
}

/// The peer TLS files of a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub trusted_ca: PathBuf,
    /// Refuse peers without a certificate of the CA, and check that an
    /// inbound connection's certificate names the member it claims to be.
    pub client_cert_auth: bool,
    /// With `client_cert_auth`: the common name every inbound peer's
    /// certificate must carry (etcd's `--peer-cert-allowed-cn`).
    pub allowed_cn: Option<String>,
}

/// A member's peer TLS: how it accepts and how it connects.
#[derive(Clone)]
pub struct PeerTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    client_cert_auth: bool,
    allowed_cn: Option<String>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("client_cert_auth", &self.client_cert_auth)
            .finish_non_exhaustive()
    }
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |reason: String| TlsError::File {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_error("holds no certificate".into()));
    }
    Ok(certs)
}

/// The ring provider, as the client port's (tonic's `tls-ring`). rustls
/// deprecates it for lacking post-quantum key exchange; aws-lc-rs has that
/// but needs cmake to build, and the build must need only a Rust toolchain
/// and a C compiler.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl PeerTls {
    /// Reads and checks `files` (every error names the file).
    pub fn from_files(files: &PeerTlsFiles) -> Result<PeerTls, TlsError> {
        let chain = certs("peer certificate", &files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::File {
            what: "peer key",
            path: files.key.clone(),
            reason: e.to_string(),
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs("peer CA file", &files.trusted_ca)? {
            roots.add(ca).map_err(|e| TlsError::File {
                what: "peer CA file",
                path: files.trusted_ca.clone(),
                reason: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);
        let config_error = |e: rustls::Error| TlsError::Config(e.to_string());

        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
        let verifier = if files.client_cert_auth {
            verifier.build()
        } else {
            verifier.allow_unauthenticated().build()
        }
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config_error)?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(config_error)?;
        Ok(PeerTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
            client_cert_auth: files.client_cert_auth,
            allowed_cn: files.allowed_cn.clone(),
        })
    }

    /// Whether inbound connections must authenticate.
    pub fn client_cert_auth(&self) -> bool {
        self.client_cert_auth
    }

    /// The server side of the handshake on an accepted connection; with
    /// an allowed common name, a peer whose certificate carries another is
    /// refused here, before any frame is read.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<PeerStream> {
        let tls = self.acceptor.accept(tcp).await?;
        if let Some(allowed) = &self.allowed_cn {
            let cn = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| common_name(c.as_ref()));
            if cn.as_deref() != Some(allowed.as_str()) {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "peer certificate common name {cn:?} is not the allowed {allowed:?} \
                         (--peer-cert-allowed-cn)"
                    ),
                ));
            }
        }
        Ok(PeerStream::Server(Box::new(tls)))
    }

    /// The client side of the handshake on a connection to `host` (the
    /// server's certificate must name it: its DNS name, or its IP address).
    pub async fn connect(&self, host: &Host, tcp: TcpStream) -> io::Result<PeerStream> {
        let name = host
            .server_name()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tls = self.connector.connect(name, tcp).await?;
        Ok(PeerStream::Client(Box::new(tls)))
    }

    /// With client certificate authentication: whether `stream` (accepted)
    /// presented a certificate that names `claimed`, the peer host (name
    /// or IP address) of the member its Hello says it is. Without it,
    /// always `Ok`.
    pub fn check_identity(&self, stream: &PeerStream, claimed: &Host) -> Result<(), String> {
        if !self.client_cert_auth {
            return Ok(());
        }
        let PeerStream::Server(tls) = stream else {
            return Err("not a TLS connection".into());
        };
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("no client certificate")?;
        let parsed = rustls::server::ParsedCertificate::try_from(cert)
            .map_err(|e| format!("client certificate: {e}"))?;
        rustls::client::verify_server_name(&parsed, &claimed.server_name()?)
            .map_err(|e| format!("the certificate does not name {claimed}: {e}"))
    }
}

/// The subject common name of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// A peer or snapshot connection: plaintext or TLS (either side).
pub enum PeerStream {
    Plain(TcpStream),
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PeerStream::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            PeerStream::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PeerStream::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            PeerStream::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PeerStream::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
            PeerStream::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PeerStream::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            PeerStream::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            PeerStream::Client(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            PeerStream::Server(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            PeerStream::Plain(s) => s.is_write_vectored(),
            PeerStream::Client(s) => s.is_write_vectored(),
            PeerStream::Server(s) => s.is_write_vectored(),
        }
    }
}
