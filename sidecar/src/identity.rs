//! The workload's SPIFFE identity: a P-256 key made in memory (it never leaves the process),
//! a CSR sent to the control plane's CertificateService with the join token, and renewal at
//! about half the certificate's life (with jitter), retried with backoff while the old
//! certificate stays in use. `weft_cert_expiry_seconds` tells how long the current one lasts.
//! (Serving and checking mTLS with it is the next step.)

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use weft_proto::identity::SignRequest;
use weft_proto::identity::certificate_service_client::CertificateServiceClient;

/// The current SVID.
#[derive(Debug, Clone)]
pub struct Svid {
    /// Leaf then intermediates, PEM.
    pub chain: Vec<String>,
    /// Roots, PEM.
    pub trust_bundle: Vec<String>,
    /// The private key, PEM (in memory only).
    pub key_pem: String,
    /// The identity.
    pub spiffe_id: String,
    /// Expiry, seconds since the epoch.
    pub expires_at_unix: i64,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Builds a CSR for `spiffe_id` with a fresh key; returns (csr, key).
pub fn csr(spiffe_id: &str) -> Result<(String, String), String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut p = rcgen::CertificateParams::default();
    let uri = spiffe_id
        .try_into()
        .map_err(|e: rcgen::Error| e.to_string())?;
    p.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    let csr = p.serialize_request(&key).map_err(|e| e.to_string())?;
    Ok((csr.pem().map_err(|e| e.to_string())?, key.serialize_pem()))
}

async fn fetch(cfg: &crate::RunConfig, token: &str, spiffe_id: &str) -> Result<Svid, String> {
    let (csr_pem, key_pem) = csr(spiffe_id)?;
    let mut client = CertificateServiceClient::connect(format!("http://{}", cfg.xds_addr))
        .await
        .map_err(|e| e.to_string())?;
    let resp = client
        .sign(SignRequest {
            csr_pem,
            token: token.to_string(),
            requested_ttl_seconds: cfg.cert_ttl.as_secs(),
        })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    Ok(Svid {
        chain: resp.cert_chain_pem,
        trust_bundle: resp.trust_bundle_pem,
        key_pem,
        spiffe_id: resp.spiffe_id,
        expires_at_unix: resp.expires_at_unix,
    })
}

/// Keeps an SVID current in the background; `None` until the first one arrives.
pub fn start(
    cfg: crate::RunConfig,
    token: String,
    metrics: Arc<crate::admin::Metrics>,
) -> Arc<ArcSwapOption<Svid>> {
    let current: Arc<ArcSwapOption<Svid>> = Arc::default();
    let out = current.clone();
    let spiffe_id = format!(
        "spiffe://{}/ns/{}/sa/{}",
        cfg.trust_domain, cfg.namespace, cfg.service_account
    );
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            let wait = match fetch(&cfg, &token, &spiffe_id).await {
                Ok(svid) => {
                    failures = 0;
                    let left = (svid.expires_at_unix - now_unix()).max(0) as u64;
                    tracing::info!(spiffe_id = %svid.spiffe_id, expires_in_s = left, "certificate issued");
                    metrics.cert_renewals.inc();
                    current.store(Some(Arc::new(svid)));
                    // Renew at 40-60 % of the life left: about half-life, spread out.
                    Duration::from_secs(left).mul_f64(0.4 + rand::random::<f64>() * 0.2)
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
                .map_or(0, |s| s.expires_at_unix - now_unix());
            metrics.cert_expiry_seconds.set(expiry.max(0));
            tokio::time::sleep(wait.max(Duration::from_millis(100))).await;
        }
    });
    out
}
