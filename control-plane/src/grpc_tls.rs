//! The control plane's TLS gRPC port (`--grpc-addr`, 15012): xDS, identity, admin and
//! federation, served with the control plane's own SVID
//! (`spiffe://<td>/ns/weft-system/sa/weft-control-plane`, issued by its own CA).
//!
//! A client certificate is optional at the handshake so that a workload without one yet can
//! bootstrap (its join token is the proof, checked by the CertificateService); every other
//! service refuses a caller that presented none. The verified caller identity reaches the
//! handlers as a [`TlsPeer`] in the request extensions.
//!
//! The server certificate is renewed at half its life and whenever the trust bundle changes;
//! the new rustls configuration serves new connections, open ones keep theirs.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use weft_proto::SpiffeId;
use weft_proto::tls::{self, ClientAuth, TlsError};

use crate::identity::Ca;
use crate::metrics::Metrics;

/// How long a client gets to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime of the control plane's own certificate.
pub const SERVER_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often the trust bundle is checked for a change (a second root being added).
pub const BUNDLE_CHECK: Duration = Duration::from_secs(10);
/// HTTP/2 streams one connection may have open (`SETTINGS_MAX_CONCURRENT_STREAMS`): a
/// sidecar needs three (ADS, LRS, certificates).
pub const MAX_CONCURRENT_STREAMS: u32 = 64;
/// Streams a client may reset before the server answers them, before a GOAWAY (the HTTP/2
/// rapid-reset attack, CVE-2023-44487).
pub const MAX_PENDING_RESETS: usize = 20;
/// Streams the server may reset for a client's errors before it sends GOAWAY.
pub const MAX_LOCAL_RESETS: usize = 64;

/// Caps on the TLS port's connections.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// TLS handshakes in flight; a connection past it is closed at once (a flood of silent
    /// clients costs a task each for at most [`HANDSHAKE_TIMEOUT`], never unbounded).
    pub handshakes: usize,
    /// Handshakes in flight from one source address: one host cannot take every slot.
    pub handshakes_per_source: usize,
    /// Open connections; past it new ones are closed at once.
    pub connections: usize,
    /// Open connections from one source address.
    pub connections_per_source: usize,
    /// How long a connection without a client certificate (bootstrap: a CSR with a token)
    /// may stay open.
    pub anonymous_max_age: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshakes: 256,
            handshakes_per_source: 16,
            connections: 16_384,
            connections_per_source: 1_024,
            anonymous_max_age: Duration::from_secs(60),
        }
    }
}

/// Counts what each source address holds, so one host cannot hold all of a cap.
#[derive(Clone, Default)]
pub struct PerSource(Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>);

/// One unit held by a source; given back when dropped.
pub struct SourceSlot {
    map: PerSource,
    ip: std::net::IpAddr,
}

impl PerSource {
    /// Takes one unit for `ip` unless it holds `max` already.
    pub fn take(&self, ip: std::net::IpAddr, max: usize) -> Option<SourceSlot> {
        let mut m = crate::lock(&self.0);
        let n = m.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            map: self.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = crate::lock(&self.map.0);
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Who is calling over the TLS port (the tonic connect info of a TLS connection).
#[derive(Clone, Debug)]
pub struct TlsPeer {
    /// The remote address.
    pub remote: SocketAddr,
    /// The verified SPIFFE ID of the client certificate; `None` when it presented none.
    pub identity: Option<SpiffeId>,
    /// What the client certificate may do (control plane, operator, workload); `Workload`
    /// without one too, and `identity` tells them apart.
    pub role: tls::Role,
}

impl TlsPeer {
    /// The cluster a control plane's client certificate names (its DNS SAN), for federation.
    pub fn control_plane_cluster(&self) -> Option<&str> {
        match &self.role {
            tls::Role::ControlPlane(c) => Some(c),
            _ => None,
        }
    }
}

/// Over the TLS port a caller must present an SVID; over the plaintext port anything goes.
/// Returns the caller's identity when there is one.
pub fn require_identity<T>(req: &tonic::Request<T>) -> Result<Option<SpiffeId>, tonic::Status> {
    match req.extensions().get::<TlsPeer>() {
        None => Ok(None),
        Some(TlsPeer {
            identity: Some(id), ..
        }) => Ok(Some(id.clone())),
        Some(TlsPeer { remote, .. }) => Err(tonic::Status::unauthenticated(format!(
            "{remote} presented no client certificate: this port serves workloads with an SVID \
             (get one from CertificateService with a join token first)"
        ))),
    }
}

/// The caller's verified identity, if the call came over TLS with a client certificate.
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Option<SpiffeId> {
    req.extensions()
        .get::<TlsPeer>()
        .and_then(|p| p.identity.clone())
}

/// One accepted TLS connection, as tonic serves it.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: TlsPeer,
    /// Its place under [`Limits::connections`], given back when tonic drops it.
    _slot: (tokio::sync::OwnedSemaphorePermit, SourceSlot),
    /// For a connection without a client certificate: when it reads as closed.
    ends: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = TlsPeer;
    fn connect_info(&self) -> TlsPeer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        // An anonymous connection past its age reads as closed: the server ends it.
        if let Some(ends) = self.ends.as_mut()
            && ends.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The control plane's identity.
pub fn server_identity(trust_domain: &str) -> Result<SpiffeId, weft_proto::SpiffeIdError> {
    SpiffeId::new(
        trust_domain,
        weft_proto::keys::CONTROL_PLANE_NAMESPACE,
        weft_proto::keys::CONTROL_PLANE_SERVICE_ACCOUNT,
    )
}

/// Why the TLS port could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum GrpcTlsError {
    /// The control plane's own certificate could not be issued.
    #[error("issuing the control plane's certificate: {0}")]
    Issue(String),
    /// The rustls configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The control plane's own certificate in the two roles it plays: the server of its TLS port,
/// and the client that dials peer control planes (federation).
pub struct Issued {
    /// Serves the TLS port (client certificate optional).
    pub server: Arc<tls::rustls::ServerConfig>,
    /// Dials peers (HTTP/2), presenting the same certificate.
    pub client: Arc<tls::rustls::ClientConfig>,
    /// Opens tunnels through a peer network's gateway, presenting the same certificate.
    pub tunnel: Arc<tls::rustls::ClientConfig>,
}

/// Issues the control plane's own SVID (with the DNS SAN naming its cluster) and builds both
/// configurations.
fn issue(ca: &Ca, id: &SpiffeId, cluster: &str) -> Result<Arc<Issued>, GrpcTlsError> {
    let (csr, key) = tls::new_csr(&id.to_string())?;
    let signed = ca
        .sign_control_plane(&csr, id, Some(SERVER_CERT_TTL), cluster)
        .map_err(|e| GrpcTlsError::Issue(e.to_string()))?;
    let svid = tls::Svid::from_pem(&signed.chain, &key)?;
    let roots = tls::roots(&signed.trust_bundle)?;
    Ok(Arc::new(Issued {
        server: tls::server_config(&svid, roots.clone(), ClientAuth::Optional, &[tls::ALPN_H2])?,
        client: tls::client_config(Some(&svid), roots.clone(), &[tls::ALPN_H2])?,
        tunnel: tls::client_config(Some(&svid), roots, &[tls::ALPN_MESH_TUNNEL])?,
    }))
}

/// The control plane's current certificate, swapped on renewal.
pub type IssuedCell = Arc<ArcSwap<Issued>>;

/// Accepts TLS connections on `listener` and hands finished handshakes to tonic.
pub struct Acceptor {
    config: IssuedCell,
}

impl Acceptor {
    /// Issues the control plane's certificate and builds the first configuration.
    pub fn new(ca: &Ca, trust_domain: &str, cluster: &str) -> Result<Self, GrpcTlsError> {
        let id = server_identity(trust_domain).map_err(|e| GrpcTlsError::Issue(e.to_string()))?;
        Ok(Acceptor {
            config: Arc::new(ArcSwap::new(issue(ca, &id, cluster)?)),
        })
    }

    /// Keeps the certificate fresh: renewed at half its life, or at once when the
    /// trust bundle changes (a rotation adding a root). Runs until aborted.
    pub async fn renew(config: IssuedCell, ca: Arc<Ca>, td: String, cluster: String) {
        let Ok(id) = server_identity(&td) else { return };
        let mut bundle = ca.trust_bundle();
        let mut issued = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(BUNDLE_CHECK).await;
            let now_bundle = ca.trust_bundle();
            if now_bundle == bundle && issued.elapsed() < SERVER_CERT_TTL / 2 {
                continue;
            }
            match issue(&ca, &id, &cluster) {
                Ok(c) => {
                    config.store(c);
                    bundle = now_bundle;
                    issued = tokio::time::Instant::now();
                    tracing::info!(identity = %id, "control plane certificate renewed");
                }
                Err(e) => {
                    tracing::error!(error = %e, "control plane certificate renewal failed; the current one keeps serving")
                }
            }
        }
    }

    /// The certificate handle (for [`Acceptor::renew`] and the federation client).
    pub fn config(&self) -> IssuedCell {
        self.config.clone()
    }

    /// Accepts forever; each handshake runs on its own task (a slow client delays nobody),
    /// and finished connections come out of the returned stream.
    pub fn incoming(
        self,
        listener: TcpListener,
        metrics: Arc<Metrics>,
        limits: Limits,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, std::io::Error>> {
        let (tx, rx) = mpsc::channel(64);
        let connections = Arc::new(tokio::sync::Semaphore::new(limits.connections));
        let handshakes = Arc::new(tokio::sync::Semaphore::new(limits.handshakes));
        let (per_source_connections, per_source_handshakes) =
            (PerSource::default(), PerSource::default());
        let shed = move |metrics: &Metrics, reason: &str| {
            metrics
                .grpc_connections_shed
                .get_or_create(&vec![("reason".into(), reason.into())])
                .inc();
        };
        tokio::spawn(async move {
            loop {
                // Ends when tonic stops taking connections (the control plane was dropped).
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = tx.closed() => return,
                };
                let (tcp, remote) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS gRPC accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let ip = remote.ip();
                let Some(source_slot) =
                    per_source_connections.take(ip, limits.connections_per_source)
                else {
                    tracing::debug!(%remote, "TLS gRPC connection shed: its source is at its connection cap");
                    shed(&metrics, "source_connections");
                    continue;
                };
                let Ok(slot) = connections.clone().try_acquire_owned() else {
                    tracing::debug!(%remote, "TLS gRPC connection shed: at the connection cap");
                    shed(&metrics, "connections");
                    continue;
                };
                let Some(source_handshake) =
                    per_source_handshakes.take(ip, limits.handshakes_per_source)
                else {
                    tracing::debug!(%remote, "TLS gRPC connection shed: its source has too many handshakes in flight");
                    shed(&metrics, "source_handshakes");
                    continue;
                };
                let Ok(handshaking) = handshakes.clone().try_acquire_owned() else {
                    tracing::debug!(%remote, "TLS gRPC connection shed: too many handshakes in flight");
                    shed(&metrics, "handshakes");
                    continue;
                };
                let anonymous_max_age = limits.anonymous_max_age;
                let _ = tcp.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(self.config.load().server.clone());
                let (tx, metrics) = (tx.clone(), metrics.clone());
                tokio::spawn(async move {
                    let _handshaking = (handshaking, source_handshake);
                    let tls =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::info!(%remote, error = %e, "TLS handshake refused");
                                metrics.tls_handshake_failures.inc();
                                return;
                            }
                            Err(_) => {
                                tracing::info!(%remote, "TLS handshake timed out");
                                metrics.tls_handshake_failures.inc();
                                return;
                            }
                        };
                    let certs = tls.get_ref().1.peer_certificates();
                    let identity = match certs {
                        None => None,
                        Some(c) => match tls::check_peer(Some(c), &[]) {
                            Ok(id) => Some(id),
                            Err(e) => {
                                tracing::info!(%remote, error = %e, "client certificate refused");
                                metrics.tls_handshake_failures.inc();
                                return;
                            }
                        },
                    };
                    let role = certs
                        .and_then(|c| c.first())
                        .map_or(tls::Role::Workload, tls::role_of);
                    let ends = identity
                        .is_none()
                        .then(|| Box::pin(tokio::time::sleep(anonymous_max_age)));
                    let conn = TlsConn {
                        inner: tls,
                        peer: TlsPeer {
                            remote,
                            identity,
                            role,
                        },
                        _slot: (slot, source_slot),
                        ends,
                    };
                    drop(_handshaking);
                    let _ = tx.send(Ok(conn)).await;
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    type Incoming = tokio_stream::wrappers::ReceiverStream<Result<TlsConn, std::io::Error>>;

    /// A TLS port with `limits` on loopback: its CA, address, metrics and connections.
    async fn port(limits: Limits) -> (Ca, SocketAddr, Arc<Metrics>, Incoming) {
        let ca = Ca::load_or_generate(None, "cluster.local", "c1").expect("CA");
        let acceptor = Acceptor::new(&ca, "cluster.local", "c1").expect("acceptor");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = Arc::new(Metrics::new());
        let incoming = acceptor.incoming(listener, metrics.clone(), limits);
        (ca, addr, metrics, incoming)
    }

    /// An anonymous TLS handshake (a bootstrapping workload) with `ca`'s port over `tcp`.
    async fn handshake(
        ca: &Ca,
        tcp: TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let roots = tls::roots(&ca.trust_bundle()).expect("roots");
        let config = tls::client_config(None, roots, &[tls::ALPN_H2]).expect("client");
        let name =
            tls::rustls::pki_types::ServerName::try_from("weft-control-plane").expect("name");
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
    }

    #[tokio::test]
    async fn the_tls_port_sheds_connections_past_its_handshake_cap() {
        let (ca, addr, metrics, mut incoming) = port(Limits {
            handshakes: 1,
            connections: 8,
            ..Limits::default()
        })
        .await;
        // A client that never says a word holds the one handshake slot...
        let _silent = TcpStream::connect(addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
        // ...so the next connection is closed at once, and counted.
        let mut shed = TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), shed.read(&mut buf))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert_eq!(n, 0, "a connection past the handshake cap is closed");
        let page = metrics.render();
        assert!(
            page.contains("weft_grpc_connections_shed_total{reason=\"handshakes\"} 1"),
            "{page}"
        );
        // Once the silent client gives up its slot, handshakes proceed again.
        drop(_silent);
        let mut ok = false;
        for _ in 0..50 {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            if handshake(&ca, tcp).await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ok, "handshakes proceed once the slot is free");
        assert!(tokio_stream::StreamExt::next(&mut incoming).await.is_some());
    }

    async fn connect_from(src: &str, to: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(src.parse().expect("ip"), 0))
            .expect("bind source");
        socket.connect(to).await.expect("connect")
    }

    /// One host cannot hold every handshake slot, and a connection without a client
    /// certificate (bootstrap) ends at its age however quiet it is.
    #[tokio::test]
    async fn one_source_holds_only_its_share_and_anonymous_connections_age_out() {
        let (ca, addr, metrics, mut incoming) = port(Limits {
            handshakes_per_source: 1,
            anonymous_max_age: Duration::from_millis(300),
            ..Limits::default()
        })
        .await;
        // 127.0.0.5 stays silent in its one handshake; its next connection is shed...
        let _silent = connect_from("127.0.0.5", addr).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut shed = connect_from("127.0.0.5", addr).await;
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), shed.read(&mut buf))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert_eq!(n, 0, "the same source's second handshake is shed");
        assert!(
            metrics
                .render()
                .contains("weft_grpc_connections_shed_total{reason=\"source_handshakes\"} 1")
        );
        // ...while another host handshakes as usual, anonymously.
        let _client = handshake(&ca, connect_from("127.0.0.6", addr).await)
            .await
            .expect("another source's handshake");
        let mut conn = tokio_stream::StreamExt::next(&mut incoming)
            .await
            .expect("a connection")
            .expect("accepted");
        assert!(conn.peer.identity.is_none());
        // It says nothing; at its age the server reads it as closed.
        let started = std::time::Instant::now();
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("ended in time")
            .expect("read");
        assert_eq!(n, 0);
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "{:?}",
            started.elapsed()
        );
    }
}
