//! The east-west gateway: `weft-sidecar run --gateway-addr`, reachable from other networks at
//! the address its cluster publishes. It accepts mesh mTLS under the tunnel ALPN only (a
//! caller without a mesh certificate never gets past the handshake), reads one `CONNECT` (see
//! [`crate::tunnel`]) and, only when the endpoint asked for serves a Service this cluster
//! exports, connects to it and copies bytes both ways. It never terminates the end-to-end
//! session inside: the caller's own mTLS with the destination's sidecar runs through it.
//!
//! What is exported is read from the config the gateway holds like any proxy: an endpoint of
//! this cluster (origin = `--cluster`) under a `*.svc.clusterset.local` cluster, which the
//! control plane puts there only when this cluster exports the Service (MCS semantics).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::identity::SvidCell;
use crate::metrics::Metrics;
use crate::state::MeshConfig;
use crate::tunnel;

/// How long a caller has for its handshake and its `CONNECT`.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a gateway needs.
#[derive(Clone)]
pub struct Gateway {
    /// This gateway's cluster: only its endpoints are forwarded to.
    pub cluster: Arc<str>,
    /// The config it holds.
    pub config: Arc<arc_swap::ArcSwap<MeshConfig>>,
    /// Its certificate (the tunnel's server side).
    pub svid: SvidCell,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Tunnels open at once, at most.
    pub max_connections: usize,
    /// A tunnel with no byte either way for this long is closed (zero: never).
    pub idle: Duration,
}

/// The exported Service `target` serves in cluster `cluster` (its clusterset name), if any.
pub fn exported(config: &MeshConfig, cluster: &str, target: SocketAddr) -> Option<String> {
    config.clusters.iter().find_map(|(name, c)| {
        let host = name.rsplit_once(':').map_or(name.as_str(), |(h, _)| h);
        if !host.ends_with(".svc.clusterset.local") {
            return None;
        }
        let eps = c.endpoints.as_ref()?;
        eps.priorities
            .iter()
            .flatten()
            .any(|e| e.addr == target && &*e.origin == cluster)
            .then(|| host.to_string())
    })
}

/// A label value from what a caller declared: short and plain, or `unknown`.
fn label(declared: Option<&str>) -> String {
    match declared {
        Some(v)
            if !v.is_empty()
                && v.len() <= 63
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
        {
            v.to_string()
        }
        _ => "unknown".into(),
    }
}

/// Serves tunnels until aborted.
pub async fn serve(listener: TcpListener, gw: Gateway) {
    let slots = Arc::new(tokio::sync::Semaphore::new(gw.max_connections.max(1)));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "gateway accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            gw.metrics.connection_closed("gateway", "max-connections");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let gw = gw.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tunnel_one(stream, peer, &gw).await;
        });
    }
}

async fn tunnel_one(stream: TcpStream, peer: SocketAddr, gw: &Gateway) {
    let count = |source: &str, service: &str, result: &str| {
        gw.metrics.gateway_connection(source, service, result);
    };
    let Some(svid) = gw.svid.load_full().filter(|s| s.valid()) else {
        count("unknown", "", "no-certificate");
        tracing::warn!(%peer, "gateway has no valid certificate yet: connection dropped");
        return;
    };
    let accept = async {
        let mut tls = tokio_rustls::TlsAcceptor::from(svid.tls.gateway.clone())
            .accept(stream)
            .await
            .map_err(|e| ("handshake", e.to_string()))?;
        let caller = weft_proto::tls::check_peer(tls.get_ref().1.peer_certificates(), &[])
            .map_err(|e| ("handshake", e.to_string()))?;
        let head = tunnel::read_head(&mut tls)
            .await
            .map_err(|e| ("bad-request", e.to_string()))?;
        Ok::<_, (&'static str, String)>((tls, caller, head))
    };
    let (mut tls, caller, head) = match tokio::time::timeout(ACCEPT_TIMEOUT, accept).await {
        Ok(Ok(got)) => got,
        Ok(Err((result, why))) => {
            count("unknown", "", result);
            tracing::debug!(%peer, %why, "gateway refused a connection");
            return;
        }
        Err(_) => {
            count("unknown", "", "timeout");
            return;
        }
    };
    let (target, source) = match tunnel::parse_connect(&head) {
        Ok(t) => t,
        Err(why) => {
            count("unknown", "", "bad-request");
            let _ = tunnel::answer(&mut tls, 400, why).await;
            return;
        }
    };
    let source = label(source.as_deref());
    let Some(service) = exported(&gw.config.load(), &gw.cluster, target) else {
        count(&source, "", "not-exported");
        tracing::info!(%peer, %caller, %target, "gateway: not an endpoint of a Service this cluster exports");
        let _ = tunnel::answer(&mut tls, 403, "not-exported").await;
        return;
    };
    let upstream = match crate::connect::connect_app(target).await {
        Ok(u) => u,
        Err(e) => {
            count(&source, &service, "unreachable");
            tracing::info!(%peer, %target, error = %e, "gateway: endpoint unreachable");
            let _ = tunnel::answer(&mut tls, 502, "unreachable").await;
            return;
        }
    };
    if tunnel::answer(&mut tls, 200, "ok").await.is_err() {
        return;
    }
    count(&source, &service, "forwarded");
    tracing::debug!(%peer, %caller, %target, %service, "gateway tunnel open");
    crate::connect::splice_to(tls, upstream, peer, target, "gateway", &gw.metrics, gw.idle).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_labels_are_kept_only_when_plain_and_short() {
        assert_eq!(label(Some("east-1")), "east-1");
        assert_eq!(label(Some("")), "unknown");
        assert_eq!(label(Some("a\"b")), "unknown");
        assert_eq!(label(Some(&"x".repeat(64))), "unknown");
        assert_eq!(label(None), "unknown");
    }
}
