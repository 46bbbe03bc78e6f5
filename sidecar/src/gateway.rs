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
use weft_proto::tunnel;

/// How long a caller has for its handshake and its `CONNECT`.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections still in their handshake or `CONNECT` at once, at most: before a caller proved
/// an identity it holds one of these, not a tunnel slot, so a flood of silent connections
/// cannot crowd out the tunnels (beyond, new connections are closed at once and counted).
pub const MAX_HANDSHAKES: usize = 256;

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
    /// This cluster's control plane (its TLS port, what the gateway itself dials): peers'
    /// control planes — and only they — may tunnel to it, so federation runs through here.
    pub control_plane: Option<SocketAddr>,
}

/// Why a target is not forwarded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not an endpoint of a Service this cluster exports.
    NotExported,
    /// An exported Service's endpoint without a sidecar terminating mTLS: a legitimate caller
    /// only ever tunnels its own mTLS, so a plaintext target is never reached through here.
    NotMeshed,
}

impl Refusal {
    /// The reason in the answer and the metric.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotExported => "not-exported",
            Refusal::NotMeshed => "not-meshed",
        }
    }
}

/// The exported Service `target` serves in cluster `cluster` (its clusterset name), if it is
/// a meshed endpoint of one.
pub fn exported(config: &MeshConfig, cluster: &str, target: SocketAddr) -> Result<String, Refusal> {
    let mut unmeshed = false;
    for (name, c) in &config.clusters {
        let host = name.rsplit_once(':').map_or(name.as_str(), |(h, _)| h);
        if !host.ends_with(".svc.clusterset.local") {
            continue;
        }
        let Some(eps) = c.endpoints.as_ref() else {
            continue;
        };
        for e in eps.priorities.iter().flatten() {
            if e.addr == target && &*e.origin == cluster && e.via.is_none() {
                if e.mtls_identity.is_some() {
                    return Ok(host.to_string());
                }
                unmeshed = true;
            }
        }
    }
    Err(if unmeshed {
        Refusal::NotMeshed
    } else {
        Refusal::NotExported
    })
}

/// Serves tunnels until aborted.
pub async fn serve(listener: TcpListener, gw: Gateway) {
    let slots = Arc::new(tokio::sync::Semaphore::new(gw.max_connections.max(1)));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "gateway accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
            gw.metrics.connection_closed("gateway", "max-handshakes");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (gw, slots) = (gw.clone(), slots.clone());
        tokio::spawn(async move {
            tunnel_one(stream, peer, &gw, handshake, &slots).await;
        });
    }
}

async fn tunnel_one(
    stream: TcpStream,
    peer: SocketAddr,
    gw: &Gateway,
    handshake: tokio::sync::OwnedSemaphorePermit,
    slots: &Arc<tokio::sync::Semaphore>,
) {
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
        let certs = tls.get_ref().1.peer_certificates();
        let caller =
            weft_proto::tls::check_peer(certs, &[]).map_err(|e| ("handshake", e.to_string()))?;
        // The caller's cluster for the metrics: its verified issuer, never what it declares.
        let leaf = certs.and_then(|c| c.first());
        let source = leaf
            .and_then(weft_proto::tls::issuing_cluster)
            .unwrap_or_else(|| "unknown".into());
        let peer_control_plane = leaf.is_some_and(|l| {
            matches!(weft_proto::tls::role_of(l), weft_proto::tls::Role::ControlPlane(c) if *c != *gw.cluster)
        });
        // Only the tunnel protocol, negotiated: a client that offered no ALPN is refused too.
        if tls.get_ref().1.alpn_protocol() != Some(weft_proto::tls::ALPN_MESH_TUNNEL) {
            return Err((
                "handshake",
                "the tunnel ALPN was not negotiated".to_string(),
            ));
        }
        let head = tunnel::read_head(&mut tls)
            .await
            .map_err(|e| ("bad-request", e.to_string()))?;
        Ok::<_, (&'static str, String)>((tls, caller, source, peer_control_plane, head))
    };
    let (mut tls, caller, source, peer_control_plane, head) =
        match tokio::time::timeout(ACCEPT_TIMEOUT, accept).await {
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
    let target = match tunnel::parse_connect(&head) {
        Ok((t, _declared)) => t,
        Err(why) => {
            count(&source, "", "bad-request");
            let _ = tunnel::answer(&mut tls, 400, why).await;
            return;
        }
    };
    let config = gw.config.load();
    let to_control_plane = gw.control_plane == Some(target);
    let service = match exported(&config, &gw.cluster, target) {
        _ if to_control_plane && peer_control_plane => "control-plane".to_string(),
        _ if to_control_plane => {
            drop(config);
            count(&source, "control-plane", "not-a-peer-control-plane");
            tracing::info!(%peer, %caller, "gateway: only a peer cluster's control plane may reach this control plane");
            let _ = tunnel::answer(&mut tls, 403, "not-a-peer-control-plane").await;
            return;
        }
        Ok(s) => s,
        Err(why) => {
            drop(config);
            count(&source, "", why.as_str());
            tracing::info!(%peer, %caller, %target, reason = why.as_str(), "gateway: not a meshed endpoint of a Service this cluster exports");
            let _ = tunnel::answer(&mut tls, 403, why.as_str()).await;
            return;
        }
    };
    drop(config);
    // The caller proved an identity: from here it holds a tunnel slot, not a handshake one.
    drop(handshake);
    let Ok(_slot) = slots.clone().try_acquire_owned() else {
        count(&source, &service, "max-connections");
        let _ = tunnel::answer(&mut tls, 503, "max-connections").await;
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
    fn only_meshed_endpoints_of_exported_services_are_targets() {
        let config = MeshConfig::default();
        let target: SocketAddr = "198.18.0.2:8080".parse().expect("addr");
        assert_eq!(exported(&config, "c1", target), Err(Refusal::NotExported));
    }
}
