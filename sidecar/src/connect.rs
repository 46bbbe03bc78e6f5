//! How the sidecar connects to endpoints and applications: pooled plain HTTP clients, and for
//! meshed endpoints TCP, then mTLS with this workload's SVID, then a check that the peer is
//! the SPIFFE ID the control plane said the endpoint serves as (`EndpointMeta.identity`) —
//! before a byte of the request is sent. A connection is made
//! with the SVID current at that moment; a renewal affects only new connections.
//!
//! The pool (hyper's) keys connections by scheme and address: an mTLS endpoint is asked for
//! as `https://<ip>:<port>`, and the identity to expect is looked up by address in the
//! current config, so a pooled connection was checked against that endpoint's identity.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use weft_proto::tls::{self, rustls};

use crate::admin::Metrics;
use crate::identity::{BoxError, SvidCell};
use crate::xds::XdsHandle;

/// A pooled HTTP client over `connector` (idle connections kept 60 s).
pub fn pooled<C>(connector: C) -> hyper_util::client::legacy::Client<C, crate::outbound::Body>
where
    C: hyper_util::client::legacy::connect::Connect + Clone,
{
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

/// A pooled HTTP/2-only client over `connector` (prior knowledge, or inside mTLS).
pub fn pooled_h2<C>(connector: C) -> hyper_util::client::legacy::Client<C, crate::outbound::Body>
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
    match tokio::time::timeout(OPAQUE_CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
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

/// Why an mTLS connection to an endpoint was not made.
#[derive(Debug, thiserror::Error)]
pub enum MeshConnectError {
    /// The URI has no `ip:port` authority.
    #[error("{0:?} is not an endpoint address")]
    Address(String),
    /// The endpoint is not an mTLS endpoint in the current config.
    #[error("{0} is not an mTLS endpoint in the current config")]
    NotMeshed(SocketAddr),
    /// This workload has no valid certificate.
    #[error("this workload has no valid certificate yet")]
    NoCertificate,
    /// TCP connect failed or timed out.
    #[error("connect {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    /// The TLS handshake failed or timed out.
    #[error("mTLS handshake with {0}: {1}")]
    Handshake(SocketAddr, std::io::Error),
    /// The peer is not who the control plane said.
    #[error("mTLS peer {0}: {1}")]
    Identity(SocketAddr, tls::TlsError),
}

/// An mTLS connection to an endpoint, as hyper's client pool holds it.
pub struct MeshConn(TokioIo<TlsStream<TcpStream>>);

impl Connection for MeshConn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for MeshConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MeshConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
}

/// The connector of the outbound's mTLS client.
#[derive(Clone)]
pub struct MeshConnector {
    svid: SvidCell,
    xds: XdsHandle,
    metrics: Arc<Metrics>,
    /// Offer the mesh's HTTP/2 ALPN instead of its HTTP/1.1 one.
    h2: bool,
}

impl MeshConnector {
    /// A connector presenting the SVID in `svid`, checking identities from `xds`'s config;
    /// `h2` offers the mesh's HTTP/2 ALPN.
    pub fn new(svid: SvidCell, xds: XdsHandle, metrics: Arc<Metrics>, h2: bool) -> Self {
        MeshConnector {
            svid,
            xds,
            metrics,
            h2,
        }
    }

    async fn connect(self, uri: http::Uri) -> Result<MeshConn, MeshConnectError> {
        let addr: SocketAddr = uri
            .authority()
            .and_then(|a| a.as_str().parse().ok())
            .ok_or_else(|| MeshConnectError::Address(uri.to_string()))?;
        let expected = self
            .xds
            .config
            .load()
            .mtls_identities
            .get(&addr)
            .cloned()
            .ok_or(MeshConnectError::NotMeshed(addr))?;
        let config: Arc<rustls::ClientConfig> = match self.svid.load_full() {
            Some(s) if s.valid() && self.h2 => s.tls.upstream_h2.clone(),
            Some(s) if s.valid() => s.tls.upstream.clone(),
            _ => return Err(MeshConnectError::NoCertificate),
        };
        let stream = mesh_handshake(addr, &expected, config, &self.metrics).await?;
        Ok(MeshConn(TokioIo::new(stream)))
    }
}

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
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(MeshConnectError::Connect(addr, e)),
        Err(_) => {
            return Err(MeshConnectError::Connect(
                addr,
                std::io::ErrorKind::TimedOut.into(),
            ));
        }
    };
    let _ = tcp.set_nodelay(true);
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

impl tower::Service<http::Uri> for MeshConnector {
    type Response = MeshConn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<MeshConn, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect(uri).await.map_err(BoxError::from) })
    }
}

/// The bottom of the outbound stack: sends an attempt to its picked endpoint over a pooled
/// connection — mTLS when the endpoint's sidecar terminates it and this workload has an SVID —
/// and records how it ended ([`crate::resilience::Attempt`]): the status, or a connect failure
/// (nothing reached the endpoint: safe to retry anywhere), or a reset.
#[derive(Clone)]
pub struct Upstream {
    plain: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        crate::outbound::Body,
    >,
    /// HTTP/2 with prior knowledge, for clusters whose endpoints speak only that (gRPC).
    h2: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        crate::outbound::Body,
    >,
    mesh: Option<MeshClients>,
}

/// The mTLS clients: HTTP/1.1 and HTTP/2 inside, and the SVID they need.
#[derive(Clone)]
struct MeshClients {
    h1: hyper_util::client::legacy::Client<MeshConnector, crate::outbound::Body>,
    h2: hyper_util::client::legacy::Client<MeshConnector, crate::outbound::Body>,
    svid: SvidCell,
}

impl Upstream {
    /// Plain connections, plus mTLS ones when the workload has an identity.
    pub fn new(svid: Option<SvidCell>, xds: XdsHandle, metrics: Arc<Metrics>) -> Self {
        let mesh = svid.map(|svid| MeshClients {
            h1: pooled(MeshConnector::new(
                svid.clone(),
                xds.clone(),
                metrics.clone(),
                false,
            )),
            h2: pooled_h2(MeshConnector::new(svid.clone(), xds, metrics, true)),
            svid,
        });
        Upstream {
            plain: pooled(plain()),
            h2: pooled_h2(plain()),
            mesh,
        }
    }
}

impl tower::Service<crate::resilience::Req> for Upstream {
    type Response = crate::resilience::Resp;
    type Error = std::convert::Infallible;
    type Future = crate::resilience::BoxFut;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: crate::resilience::Req) -> crate::resilience::BoxFut {
        use crate::resilience::{Attempt, Dispatch, Outcome, Picked, refusal, undispatched};
        let (Some(d), Some(Picked(target))) = (
            Dispatch::of(&req),
            req.extensions().get::<Picked>().cloned(),
        ) else {
            return undispatched();
        };
        // mTLS when the endpoint's sidecar terminates it and this workload has an SVID.
        let mesh = self.mesh.as_ref().filter(|m| {
            target.mtls_identity.is_some() && m.svid.load().as_ref().is_some_and(|s| s.valid())
        });
        // Never a downgrade: a meshed endpoint that is STRICT on this port (its
        // PeerAuthentication or its namespace) gets mTLS or nothing.
        if mesh.is_none() && target.strict {
            let why = match &self.mesh {
                None => {
                    "this proxy has no workload identity (started without --join-token or --token-file)"
                }
                Some(_) => {
                    "this proxy has no valid certificate (the CA has not issued or renewed it)"
                }
            };
            let msg = format!(
                "weft: {} requires mTLS (STRICT) and {why}: not sending it plaintext",
                target.addr
            );
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
        // The scheme only keys the pool (mTLS and plaintext connections never mix); the
        // connector decides how to connect.
        let scheme = if mesh.is_some() { "https" } else { "http" };
        parts.uri = match crate::outbound::forward_uri(scheme, target.addr, &parts.uri) {
            Ok(u) => u,
            Err(msg) => {
                return Box::pin(async move {
                    Ok(refusal(
                        hyper::StatusCode::BAD_REQUEST,
                        "bad-uri",
                        msg,
                        None,
                    ))
                });
            }
        };
        if !parts.headers.contains_key(hyper::header::HOST)
            && let Ok(v) = hyper::header::HeaderValue::from_str(&d.authority)
        {
            parts.headers.insert(hyper::header::HOST, v);
        }
        parts.extensions = http::Extensions::new();
        // Upstream connections speak HTTP/1.1, whatever the client spoke to the sidecar, except
        // to endpoints that speak only HTTP/2 (gRPC): with prior knowledge when plaintext, and
        // inside mTLS under the mesh's HTTP/2 ALPN when meshed.
        let h2 = d.http2;
        parts.version = if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        let upstream = hyper::Request::from_parts(parts, body);
        let fut = match mesh {
            Some(m) if h2 => m.h2.request(upstream),
            Some(m) => m.h1.request(upstream),
            None if h2 => self.h2.request(upstream),
            None => self.plain.request(upstream),
        };
        Box::pin(async move {
            let attempt = |outcome| Attempt {
                endpoint: Some(target.addr),
                outcome,
            };
            Ok(match fut.await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let mut resp = resp.map(http_body_util::BodyExt::boxed);
                    resp.extensions_mut()
                        .insert(attempt(Outcome::Status(status)));
                    resp
                }
                Err(e) => {
                    let outcome = if e.is_connect() {
                        Outcome::ConnectFailure
                    } else {
                        Outcome::Reset
                    };
                    refusal(
                        hyper::StatusCode::SERVICE_UNAVAILABLE,
                        "upstream-failure",
                        format!("weft: {} endpoint {}: {outcome:?}", d.cluster, target.addr),
                        Some(attempt(outcome)),
                    )
                }
            })
        })
    }
}
