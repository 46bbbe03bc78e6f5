//! How the sidecar connects to endpoints and applications: pooled plain HTTP clients, and for
//! meshed endpoints TCP, then mTLS with this workload's SVID, then a check that the peer is
//! the SPIFFE ID the control plane said the endpoint serves as (`EndpointMeta.identity`) —
//! before a byte of the request is sent. A connection is made
//! with the SVID current at that moment; a renewal affects only new connections.
//!
//! Connections to endpoints are pooled by [`crate::pool`], keyed by address, protocol and the
//! identity the peer was checked against (the one the picked endpoint carries in the current
//! config), so a pooled connection only ever carries requests for the identity it proved.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use weft_proto::tls::{self, rustls};

use crate::identity::SvidCell;
use crate::metrics::Metrics;
use crate::pool::MeshConnectError;

/// A pooled HTTP client over `connector` (idle connections kept 60 s).
pub fn pooled<C>(connector: C) -> hyper_util::client::legacy::Client<C, crate::http::Body>
where
    C: hyper_util::client::legacy::connect::Connect + Clone,
{
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

/// A pooled HTTP/2-only client over `connector` (prior knowledge, or inside mTLS).
pub fn pooled_h2<C>(connector: C) -> hyper_util::client::legacy::Client<C, crate::http::Body>
where
    C: hyper_util::client::legacy::connect::Connect + Clone,
{
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

/// Plain TCP to an endpoint or the application (no delay, bounded connect).
pub fn plain() -> hyper_util::client::legacy::connect::HttpConnector {
    let mut c = hyper_util::client::legacy::connect::HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(CONNECT_TIMEOUT));
    c
}

/// How long an opaque TCP connection waits to reach its destination.
pub const OPAQUE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opaque TCP: connects to `dst` and copies bytes both ways until either side closes, counted
/// in `weft_proxy_tcp_connections_total{direction,mtls="false"}`. Used for protocols the
/// sidecar does not speak, in both directions, when neither side is mesh mTLS.
pub async fn splice(
    client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    direction: &'static str,
    metrics: &Metrics,
    idle: Duration,
) {
    match connect_app(dst).await {
        Ok(upstream) => {
            metrics.tcp_connection(direction, false);
            splice_to(client, upstream, peer, dst, direction, metrics, idle).await
        }
        Err(e) => {
            metrics.tcp_connection(direction, false);
            tracing::warn!(%peer, %dst, direction, error = %e, "opaque: cannot reach the destination")
        }
    }
}

/// A TCP connection to `dst` (no Nagle), within the opaque connect timeout.
pub async fn connect_app(dst: SocketAddr) -> std::io::Result<TcpStream> {
    connect_tcp(dst, OPAQUE_CONNECT_TIMEOUT).await
}

/// A TCP connection to `dst` (no Nagle), within `limit`.
async fn connect_tcp(dst: SocketAddr, limit: Duration) -> std::io::Result<TcpStream> {
    match tokio::time::timeout(limit, TcpStream::connect(dst)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}

/// Copies bytes both ways between `client` and an already connected `upstream` (plain TCP
/// or mesh mTLS, counted by the caller), until either side closes or nothing moves for
/// `idle` (zero: no limit).
pub async fn splice_to<C, U>(
    client: C,
    upstream: U,
    peer: SocketAddr,
    dst: SocketAddr,
    direction: &'static str,
    metrics: &Metrics,
    idle: Duration,
) where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let activity = crate::accept::Activity::default();
    let (mut client, mut upstream) = (activity.wrap(client), activity.wrap(upstream));
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = r {
                tracing::debug!(%peer, %dst, direction, error = %e, "opaque connection ended");
            }
        }
        _ = activity.idle_for(idle) => {
            tracing::debug!(%peer, %dst, direction, ?idle, "opaque connection closed: idle");
            metrics.connection_closed(direction, "idle");
        }
    }
}

/// How long a TCP connect to an endpoint may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Mesh mTLS to a meshed endpoint: a bounded TCP connect, the handshake under `config` (its
/// ALPN says what the connection carries), then the check that the peer is `expected` (the
/// SPIFFE ID the control plane said the endpoint serves as) — before a byte is sent. Failures
/// are counted in `weft_proxy_upstream_tls_failures_total{reason}`.
pub async fn mesh_handshake(
    addr: SocketAddr,
    expected: &str,
    config: Arc<rustls::ClientConfig>,
    metrics: &Metrics,
) -> Result<TlsStream<TcpStream>, MeshConnectError> {
    let tcp = dial_plain(addr).await?;
    mesh_handshake_over(tcp, addr, expected, config, metrics).await
}

/// Mesh mTLS to a meshed endpoint on another network: a tunnel through one of its gateways
/// (from a random one, the next on failure; counted once in
/// `weft_proxy_upstream_tls_failures_total{reason="gateway"}` when none opens), then the same
/// end-to-end handshake inside.
pub async fn mesh_handshake_via(
    via: &crate::balance::Via,
    addr: SocketAddr,
    expected: &str,
    configs: (Arc<rustls::ClientConfig>, Arc<rustls::ClientConfig>),
    source_cluster: &str,
    metrics: &Metrics,
) -> Result<TlsStream<TlsStream<TcpStream>>, MeshConnectError> {
    let (tunnel_config, config) = configs;
    let start = rand::random::<u32>() as usize;
    match weft_proto::tunnel::open_any(
        &via.gateways,
        start,
        &via.identity,
        addr,
        source_cluster,
        tunnel_config,
    )
    .await
    {
        Ok(t) => mesh_handshake_over(t, addr, expected, config, metrics).await,
        Err(e) => {
            metrics.upstream_tls_failure("gateway");
            Err(MeshConnectError::Gateway(addr, e.to_string()))
        }
    }
}

/// The handshake of [`mesh_handshake`] over a stream already connected to `addr`.
async fn mesh_handshake_over<S>(
    tcp: S,
    addr: SocketAddr,
    expected: &str,
    config: Arc<rustls::ClientConfig>,
    metrics: &Metrics,
) -> Result<TlsStream<S>, MeshConnectError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let handshake = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            metrics.upstream_tls_failure("handshake");
            return Err(MeshConnectError::Handshake(addr, e));
        }
        Err(_) => {
            metrics.upstream_tls_failure("handshake-timeout");
            return Err(MeshConnectError::Handshake(
                addr,
                std::io::ErrorKind::TimedOut.into(),
            ));
        }
    };
    if let Err(e) = tls::check_peer(stream.get_ref().1.peer_certificates(), &[expected]) {
        metrics.upstream_tls_failure("identity");
        tracing::warn!(endpoint = %addr, error = %e, "mTLS peer is not the expected identity; connection dropped");
        return Err(MeshConnectError::Identity(addr, e));
    }
    Ok(stream)
}

/// The bottom of the outbound stack: sends an attempt to its picked endpoint over a pooled
/// connection ([`crate::pool`]) — mTLS when the endpoint's sidecar terminates it and this
/// workload has an SVID — and records how it ended ([`crate::resilience::Attempt`]): the
/// status, or a connect failure (nothing reached the endpoint: safe to retry anywhere), or a
/// reset.
#[derive(Clone)]
pub struct Upstream {
    pool: Arc<crate::pool::Pool>,
    /// This workload's SVID, when it has an identity.
    svid: Option<SvidCell>,
    metrics: Arc<Metrics>,
    /// This proxy's cluster (what it tells another network's gateway it comes from).
    cluster: Arc<str>,
}

impl Upstream {
    /// Plain connections, plus mTLS ones when the workload has an identity.
    pub fn new(svid: Option<SvidCell>, metrics: Arc<Metrics>, cluster: &str) -> Self {
        Upstream {
            pool: crate::pool::Pool::new(),
            svid,
            metrics,
            cluster: cluster.into(),
        }
    }
}

/// A plain TCP connection to an endpoint (no Nagle), within [`CONNECT_TIMEOUT`].
async fn dial_plain(addr: SocketAddr) -> Result<TcpStream, MeshConnectError> {
    connect_tcp(addr, CONNECT_TIMEOUT)
        .await
        .map_err(|e| MeshConnectError::Connect(addr, e))
}

impl tower::Service<crate::resilience::Req> for Upstream {
    type Response = crate::resilience::Resp;
    type Error = std::convert::Infallible;
    type Future = crate::resilience::BoxFut;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: crate::resilience::Req) -> crate::resilience::BoxFut {
        use crate::policy::Outcome;
        use crate::resilience::{Attempt, Dispatch, Picked, refusal, undispatched};
        let (Some(d), Some(Picked(target))) = (
            Dispatch::of(&req),
            req.extensions().get::<Picked>().cloned(),
        ) else {
            return undispatched();
        };
        // Upstream connections speak HTTP/1.1, whatever the client spoke to the sidecar, except
        // to endpoints that speak only HTTP/2 (gRPC): with prior knowledge when plaintext, and
        // inside mTLS under the mesh's HTTP/2 ALPN when meshed.
        let h2 = d.http2;
        // mTLS when the endpoint's sidecar terminates it and this workload has a valid SVID.
        let tls = match (&target.mtls_identity, &self.svid) {
            (Some(id), Some(svid)) => svid
                .load_full()
                .filter(|s| s.valid())
                .map(|s| (id.clone(), s)),
            _ => None,
        };
        // Never plaintext where only mTLS may go: another network (its gateway carries only
        // end-to-end mTLS), or a meshed endpoint STRICT on this port (its PeerAuthentication
        // or its namespace) — never a downgrade.
        let refused = match (&tls, &target.via, target.strict) {
            (Some(_), ..) => None,
            (None, Some(_), _) => Some(format!(
                "weft: {} is on another network, reached through its gateway only over mTLS, and this proxy has no identity or valid certificate (or the endpoint has no sidecar)",
                target.addr
            )),
            (None, None, true) => {
                let why = match &self.svid {
                    None => {
                        "this proxy has no workload identity (started without --join-token or --token-file)"
                    }
                    Some(_) => {
                        "this proxy has no valid certificate (the CA has not issued or renewed it)"
                    }
                };
                Some(format!(
                    "weft: {} requires mTLS (STRICT) and {why}: not sending it plaintext",
                    target.addr
                ))
            }
            (None, None, false) => None,
        };
        if let Some(msg) = refused {
            return Box::pin(async move {
                Ok(refusal(
                    hyper::StatusCode::SERVICE_UNAVAILABLE,
                    "no-certificate",
                    msg,
                    // Not the endpoint's fault: no ejection, and no retry elsewhere.
                    None,
                ))
            });
        }
        let (mut parts, body) = req.into_parts();
        // Origin form on the connection: the pool knows where it goes.
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            parts.uri = parts
                .uri
                .path_and_query()
                .cloned()
                .map_or_else(|| hyper::Uri::from_static("/"), hyper::Uri::from);
        }
        if !parts.headers.contains_key(hyper::header::HOST)
            && let Ok(v) = hyper::header::HeaderValue::from_str(&d.authority)
        {
            parts.headers.insert(hyper::header::HOST, v);
        }
        parts.extensions = http::Extensions::new();
        parts.version = if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        let upstream = hyper::Request::from_parts(parts, body);
        let (pool, metrics) = (self.pool.clone(), self.metrics.clone());
        let addr = target.addr;
        let via = target.via.clone();
        let cluster = self.cluster.clone();
        Box::pin(async move {
            let key = crate::pool::Key {
                addr,
                h2,
                identity: tls.as_ref().map(|(id, _)| id.clone()),
                via: via.clone(),
            };
            let sent = match (tls, via) {
                // The SVID's configs are picked only when a connection is dialed.
                (Some((id, svid)), Some(via)) => {
                    let dial = move || {
                        let (id, svid, via, metrics, cluster) = (
                            id.clone(),
                            svid.clone(),
                            via.clone(),
                            metrics.clone(),
                            cluster.clone(),
                        );
                        async move {
                            let configs = (svid.tls.tunnel.clone(), svid.tls.upstream_for(h2));
                            mesh_handshake_via(&via, addr, &id, configs, &cluster, &metrics).await
                        }
                    };
                    pool.send_or_return(&key, upstream, dial).await
                }
                (Some((id, svid)), None) => {
                    let dial = move || {
                        let (id, svid, metrics) = (id.clone(), svid.clone(), metrics.clone());
                        async move {
                            mesh_handshake(addr, &id, svid.tls.upstream_for(h2), &metrics).await
                        }
                    };
                    pool.send_or_return(&key, upstream, dial).await
                }
                (None, _) => {
                    pool.send_or_return(&key, upstream, || dial_plain(addr))
                        .await
                }
            };
            let attempt = |outcome| Attempt {
                endpoint: Some(addr),
                outcome,
            };
            Ok(match sent {
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    resp.extensions_mut()
                        .insert(attempt(Outcome::Status(status)));
                    resp
                }
                Err((e, unsent)) => {
                    let outcome = if e.is_connect() {
                        Outcome::ConnectFailure
                    } else {
                        Outcome::Reset
                    };
                    tracing::debug!(cluster = %d.cluster, endpoint = %addr, error = %e, "upstream attempt failed");
                    let mut resp = refusal(
                        hyper::StatusCode::SERVICE_UNAVAILABLE,
                        "upstream-failure",
                        format!("weft: {} endpoint {addr}: {outcome:?}", d.cluster),
                        Some(attempt(outcome)),
                    );
                    // Never written anywhere: the retry layer may send it to another endpoint.
                    if let (Outcome::ConnectFailure, Some(req)) = (outcome, unsent) {
                        resp.extensions_mut()
                            .insert(crate::resilience::Unsent::new(req));
                    }
                    resp
                }
            })
        })
    }
}
