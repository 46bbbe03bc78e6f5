//! The webhook's HTTPS server: TLS from a certificate and key on disk (a Secret made by
//! cert-manager or `weftctl install`), re-read when the files change so a rotated certificate
//! is served without a restart; HTTP/1.1 inside.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use weft_proto::tls::rustls;

use crate::webhook::{State, handle};

/// How often the certificate files are checked for a change.
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);
/// How long a client gets to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the serving certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The PEM did not hold what it should.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the pair.
    #[error("certificate and key do not make a TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The certificate chain and key files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain (leaf first).
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// Builds the server configuration from the files.
    pub fn load(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let cert_pem = read(&self.cert)?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Pem {
                path: self.cert.clone(),
                message: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsError::Pem {
                path: self.cert.clone(),
                message: "no certificate in it".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key)?).map_err(|e| TlsError::Pem {
            path: self.key.clone(),
            message: e.to_string(),
        })?;
        let mut config = rustls::ServerConfig::builder_with_provider(weft_proto::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    fn stamp(&self) -> Option<(SystemTime, SystemTime)> {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        Some((m(&self.cert)?, m(&self.key)?))
    }
}

/// Re-reads the files when they change; a bad new pair is logged and the current one kept.
pub async fn reload(files: TlsFiles, cell: Arc<ArcSwap<rustls::ServerConfig>>) {
    let mut seen = files.stamp();
    loop {
        tokio::time::sleep(RELOAD_EVERY).await;
        let now = files.stamp();
        if now == seen {
            continue;
        }
        match files.load() {
            Ok(c) => {
                cell.store(c);
                seen = now;
                tracing::info!(cert = %files.cert.display(), "serving certificate reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "new serving certificate refused; the current one keeps serving")
            }
        }
    }
}

/// Re-reads the mesh root file (`--root-cert`, the mounted ConfigMap `weft-root`, which the
/// kubelet updates in place) every `every`; when its certificates change, pods admitted from
/// then on get the new trust bundle — no restart. A file without a certificate, or with a PEM
/// block that is not one, is logged once and the current bundle kept.
pub async fn reload_root(path: PathBuf, state: Arc<crate::webhook::State>, every: Duration) {
    let mut refused: Option<String> = None;
    loop {
        tokio::time::sleep(every).await;
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot re-read the mesh root; injecting the current one");
                continue;
            }
        };
        let current = state.cfg.load();
        if text == current.root_pem || refused.as_ref() == Some(&text) {
            continue;
        }
        let roots = weft_proto::tls::fingerprints(&text);
        let blocks = text.matches("-----BEGIN ").count();
        if roots.is_empty() || roots.len() != blocks {
            tracing::error!(path = %path.display(), certificates = roots.len(), pem_blocks = blocks, "the mesh root file holds no certificate, or a PEM block that is not one; injecting the current bundle until it is fixed");
            refused = Some(text);
            continue;
        }
        refused = None;
        let mut next = (**current).clone();
        next.root_pem = text;
        state.cfg.store(Arc::new(next));
        tracing::info!(path = %path.display(), roots = roots.len(), fingerprints = ?roots, "mesh trust bundle reloaded");
    }
}

/// Accepts TLS connections and serves the webhook until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ArcSwap<rustls::ServerConfig>>,
    state: Arc<State>,
) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
        let state = state.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%remote, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(state, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        });
    }
}
