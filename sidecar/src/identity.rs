//! The workload's SPIFFE identity and the TLS it is used for.
//!
//! - A P-256 key made in memory (it never leaves the process) and a CSR sent to the control
//!   plane's CertificateService: the first time with the join token (over TLS verified against
//!   `--trust-bundle`), later presenting the current SVID as proof, so a short-lived join
//!   token only bootstraps.
//! - Renewal at 40-60 % of the remaining life, retried with backoff while the old certificate
//!   stays in use. Each SVID carries the rustls configurations made from it ([`MeshTls`]);
//!   swapping the SVID swaps them, so new connections use the new certificate and trust
//!   bundle while open connections keep theirs (a trust bundle with two roots is how a root
//!   rotates without a restart).
//! - [`ControlPlaneLink`] is how the sidecar reaches the control plane: plaintext (local
//!   development) or TLS, checking that the server is the control plane's SPIFFE ID.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use weft_proto::identity::SignRequest;
use weft_proto::identity::certificate_service_client::CertificateServiceClient;
use weft_proto::tls::{self, ClientAuth, TlsError, rustls};

/// Boxed error of the control-plane link.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The rustls configurations made from one SVID and its trust bundle.
#[derive(Debug)]
pub struct MeshTls {
    /// Towards other sidecars: presents the SVID, offers the mesh ALPN (HTTP/1.1 inside).
    pub upstream: Arc<rustls::ClientConfig>,
    /// The same, offering the mesh's HTTP/2 ALPN (to HTTP/2-only endpoints).
    pub upstream_h2: Arc<rustls::ClientConfig>,
    /// The same, offering the mesh's opaque-TCP ALPN (connections the sidecar does not parse).
    pub upstream_tcp: Arc<rustls::ClientConfig>,
    /// Inbound from other sidecars: requires a client SVID that chains to the bundle.
    pub inbound: Arc<rustls::ServerConfig>,
    /// Towards another network's gateway: presents the SVID, offers the tunnel ALPN.
    pub tunnel: Arc<rustls::ClientConfig>,
    /// As a gateway: requires a client SVID, accepts only the tunnel ALPN.
    pub gateway: Arc<rustls::ServerConfig>,
    /// Towards the control plane: presents the SVID, ALPN h2.
    pub control_plane: Arc<rustls::ClientConfig>,
}

impl MeshTls {
    /// The config towards another sidecar for HTTP/2 (`h2`) or HTTP/1.1 inside.
    pub fn upstream_for(&self, h2: bool) -> Arc<rustls::ClientConfig> {
        if h2 {
            self.upstream_h2.clone()
        } else {
            self.upstream.clone()
        }
    }

    fn new(svid: &tls::Svid, bundle: &[String]) -> Result<Self, TlsError> {
        let roots = tls::roots(bundle)?;
        Ok(MeshTls {
            upstream: tls::client_config(Some(svid), roots.clone(), &[tls::ALPN_MESH_HTTP1])?,
            upstream_h2: tls::client_config(Some(svid), roots.clone(), &[tls::ALPN_MESH_H2])?,
            upstream_tcp: tls::client_config(Some(svid), roots.clone(), &[tls::ALPN_MESH_TCP])?,
            inbound: tls::server_config(
                svid,
                roots.clone(),
                ClientAuth::Required,
                &[tls::ALPN_MESH_HTTP1, tls::ALPN_MESH_H2, tls::ALPN_MESH_TCP],
            )?,
            tunnel: tls::client_config(Some(svid), roots.clone(), &[tls::ALPN_MESH_TUNNEL])?,
            gateway: tls::server_config(
                svid,
                roots.clone(),
                ClientAuth::Required,
                &[tls::ALPN_MESH_TUNNEL],
            )?,
            control_plane: tls::client_config(Some(svid), roots, &[tls::ALPN_H2])?,
        })
    }
}

/// The current SVID.
#[derive(Debug, Clone)]
pub struct Svid {
    /// Leaf then intermediates, PEM.
    pub chain: Vec<String>,
    /// Roots, PEM.
    pub trust_bundle: Vec<String>,
    /// The identity.
    pub spiffe_id: String,
    /// Expiry, seconds since the epoch.
    pub expires_at_unix: i64,
    /// The TLS configurations made from it.
    pub tls: Arc<MeshTls>,
}

impl Svid {
    /// An SVID from what the CertificateService answered and the key the CSR was made with.
    pub fn new(
        chain: Vec<String>,
        trust_bundle: Vec<String>,
        key_pem: &str,
        spiffe_id: String,
        expires_at_unix: i64,
    ) -> Result<Self, TlsError> {
        let svid = tls::Svid::from_pem(&chain, key_pem)?;
        let mesh = MeshTls::new(&svid, &trust_bundle)?;
        Ok(Svid {
            chain,
            trust_bundle,
            spiffe_id,
            expires_at_unix,
            tls: Arc::new(mesh),
        })
    }

    /// Whether it is still valid.
    pub fn valid(&self) -> bool {
        self.remaining() > Duration::ZERO
    }

    /// How long it is still valid.
    pub fn remaining(&self) -> Duration {
        let expires = Duration::from_secs(self.expires_at_unix.max(0) as u64);
        expires.saturating_sub(now())
    }
}

/// The workload's current SVID, `None` until the first one arrives.
pub type SvidCell = Arc<ArcSwapOption<Svid>>;

fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// How the sidecar reaches its control plane.
#[derive(Clone)]
pub struct ControlPlaneLink {
    addr: SocketAddr,
    tls: Option<TlsLink>,
}

#[derive(Clone)]
struct TlsLink {
    /// The cluster whose control plane it must be (`--cluster`), when known.
    cluster: Option<String>,
    /// Roots from `--trust-bundle`, used until an SVID brings the CA's own bundle.
    bootstrap: Arc<rustls::ClientConfig>,
    svid: SvidCell,
}

impl ControlPlaneLink {
    /// Plaintext gRPC (the control plane's development port).
    pub fn plaintext(addr: SocketAddr) -> Self {
        ControlPlaneLink { addr, tls: None }
    }

    /// TLS gRPC: the server must chain to `bundle` (PEM) and carry the control plane's DNS
    /// SAN, which only the CA puts on the control plane's own certificate (a workload's SVID,
    /// whatever its SPIFFE ID, never passes); the client presents the SVID in `svid` once
    /// there is one.
    pub fn tls(addr: SocketAddr, bundle: &[String], svid: SvidCell) -> Result<Self, TlsError> {
        let bootstrap = tls::client_config(None, tls::roots(bundle)?, &[tls::ALPN_H2])?;
        Ok(ControlPlaneLink {
            addr,
            tls: Some(TlsLink {
                cluster: None,
                bootstrap,
                svid,
            }),
        })
    }

    /// The same link, accepting only cluster `cluster`'s control plane (its certificate is
    /// issued by that cluster's intermediate); empty: any cluster's of the mesh.
    pub fn for_cluster(mut self, cluster: &str) -> Self {
        if let Some(t) = self.tls.as_mut() {
            t.cluster = (!cluster.is_empty()).then(|| cluster.to_string());
        }
        self
    }

    /// Whether the link is TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A gRPC channel. Over TLS it presents the current SVID; `wait_for_svid` waits until there
    /// is one (xDS), otherwise a workload without a valid one connects anonymously (bootstrap).
    pub async fn channel(
        &self,
        wait_for_svid: bool,
    ) -> Result<tonic::transport::Channel, BoxError> {
        let Some(link) = &self.tls else {
            let endpoint =
                tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))?
                    .connect_timeout(Duration::from_secs(3))
                    .http2_keep_alive_interval(Duration::from_secs(30));
            return Ok(endpoint.connect().await?);
        };
        let config = loop {
            match link.svid.load_full() {
                Some(s) if s.valid() => break s.tls.control_plane.clone(),
                _ if !wait_for_svid => break link.bootstrap.clone(),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        Ok(weft_proto::dial::control_plane(
            &self.addr.to_string(),
            config,
            link.cluster.as_deref(),
            Duration::from_secs(3),
        )
        .await?)
    }
}

async fn fetch(
    cfg: &crate::config::RunConfig,
    link: &ControlPlaneLink,
    current: Option<&Svid>,
    token: &str,
    spiffe_id: &str,
) -> Result<Svid, BoxError> {
    let (csr_pem, key_pem) = tls::new_csr(spiffe_id)?;
    // Over TLS a valid SVID is its own proof: renewal needs no token.
    let renewing = link.is_tls() && current.is_some_and(Svid::valid);
    let channel = link.channel(false).await?;
    let resp = CertificateServiceClient::new(channel)
        .sign(SignRequest {
            csr_pem,
            token: if renewing {
                String::new()
            } else {
                token.to_string()
            },
            requested_ttl_seconds: cfg.cert_ttl.as_secs(),
            node_id: cfg.node_id(),
        })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    Ok(Svid::new(
        resp.cert_chain_pem,
        resp.trust_bundle_pem,
        &key_pem,
        resp.spiffe_id,
        resp.expires_at_unix,
    )?)
}

/// Where the proof of identity comes from.
#[derive(Clone, Debug)]
pub enum TokenSource {
    /// `--join-token`.
    Literal(String),
    /// `--token-file`: re-read every time (projected service-account tokens rotate).
    File(std::path::PathBuf),
}

impl TokenSource {
    /// The source the configuration names, if any (`--join-token` wins).
    pub fn from_config(cfg: &crate::config::RunConfig) -> Option<Self> {
        cfg.join_token
            .clone()
            .map(TokenSource::Literal)
            .or_else(|| cfg.token_file.clone().map(TokenSource::File))
    }

    /// The token now.
    pub fn read(&self) -> Result<String, String> {
        match self {
            TokenSource::Literal(t) => Ok(t.clone()),
            TokenSource::File(p) => std::fs::read_to_string(p)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("--token-file {}: {e}", p.display())),
        }
    }
}

/// Keeps `current` holding a valid SVID, in the background.
pub fn start(
    cfg: crate::config::RunConfig,
    token: TokenSource,
    link: ControlPlaneLink,
    current: SvidCell,
    metrics: Arc<crate::metrics::Metrics>,
) -> tokio::task::JoinHandle<()> {
    let spiffe_id = format!(
        "spiffe://{}/ns/{}/sa/{}",
        cfg.trust_domain, cfg.namespace, cfg.service_account
    );
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            let held = current.load_full();
            let fetched = match token.read() {
                Ok(t) => fetch(&cfg, &link, held.as_deref(), &t, &spiffe_id).await,
                Err(e) => Err(e.into()),
            };
            let wait = match fetched {
                Ok(svid) => {
                    failures = 0;
                    let left = svid.remaining();
                    tracing::info!(spiffe_id = %svid.spiffe_id, expires_in_s = left.as_secs(), "certificate issued");
                    metrics.cert_renewals.inc();
                    current.store(Some(Arc::new(svid)));
                    // Renew at 40-60 % of the life left: about half-life, spread out.
                    left.mul_f64(0.4 + rand::random::<f64>() * 0.2)
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, "certificate request failed; keeping the current one");
                    metrics.cert_failures.inc();
                    Duration::from_millis(200)
                        .saturating_mul(1 << failures.min(8))
                        .min(Duration::from_secs(30))
                }
            };
            let expiry = current
                .load()
                .as_ref()
                .map_or(0, |s| s.remaining().as_secs());
            metrics.cert_expiry_seconds.set(expiry as i64);
            tokio::time::sleep(wait.max(Duration::from_millis(100))).await;
        }
    })
}
