//! Inbound: connections from other workloads, delivered to the local application
//! (`--app-addr`, else the original destination of a redirected connection).
//!
//! What arrives is told apart by its first bytes (peeked, never consumed):
//! - a TLS ClientHello offering a mesh ALPN (`weft-http/1.1`, `weft-h2`, `weft-tcp`) is another
//!   sidecar's mTLS: it is terminated with this workload's SVID, the client must present an
//!   SVID that chains to the trust bundle, and its HTTP requests reach the application with
//!   the verified caller in `x-weft-client-identity`; under `weft-tcp` (opaque TCP) the
//!   connection is judged by the TCP rules with the verified caller, then its bytes are copied
//!   to the application;
//! - plaintext HTTP/1 is served as HTTP too, so that a caller can never forge that header (it
//!   is removed);
//! - anything else (an application's own TLS, HTTP/2, other protocols) is forwarded byte for
//!   byte.
//!
//! The namespace's mode (from the control plane) decides what is let in: STRICT refuses every
//! connection that is not mesh mTLS, PERMISSIVE serves both, DISABLE never terminates TLS.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use weft_proto::SpiffeId;
use weft_proto::keys::CLIENT_IDENTITY_HEADER;
use weft_proto::tls::{self, MtlsMode};

use crate::detect::{self, Detected, Protocol};
use crate::http::{Body, MAX_HEAD_BYTES, refuse};
use crate::identity::SvidCell;
use crate::metrics::Metrics;
use crate::xds::XdsHandle;

/// How long a caller gets to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The inbound proxy.
pub struct Inbound {
    listener: TcpListener,
    shared: Arc<Shared>,
}

/// What every inbound connection shares.
struct Shared {
    app: Option<SocketAddr>,
    namespace: String,
    server_first_ports: Vec<u16>,
    own_ports: Vec<u16>,
    idle_timeout: Duration,
    cap: crate::accept::Cap,
    header_read_timeout: Duration,
    xds: XdsHandle,
    svid: Option<SvidCell>,
    client: Client<HttpConnector, Body>,
    /// HTTP/2 with prior knowledge to the application, for mesh HTTP/2 (gRPC) callers.
    client_h2: Client<HttpConnector, Body>,
    metrics: Arc<Metrics>,
}

impl Inbound {
    /// Binds the listener; `app` is `--app-addr`.
    pub async fn bind(
        addr: SocketAddr,
        app: Option<SocketAddr>,
        ctx: crate::listener::ListenerContext,
    ) -> std::io::Result<Self> {
        Ok(Self::with_listener(
            TcpListener::bind(addr).await?,
            app,
            ctx,
        ))
    }

    /// Serves on an already bound `listener` (the IPv6 one).
    pub fn with_listener(
        listener: TcpListener,
        app: Option<SocketAddr>,
        ctx: crate::listener::ListenerContext,
    ) -> Self {
        Inbound {
            listener,
            shared: Arc::new(Shared {
                app,
                namespace: ctx.namespace,
                server_first_ports: ctx.server_first_ports,
                own_ports: ctx.own_ports,
                idle_timeout: ctx.idle_timeout,
                cap: crate::accept::Cap::new(ctx.max_connections),
                header_read_timeout: ctx.header_read_timeout,
                xds: ctx.xds,
                svid: ctx.svid,
                client: crate::connect::pooled(crate::connect::plain()),
                client_h2: crate::connect::pooled_h2(crate::connect::plain()),
                metrics: ctx.metrics,
            }),
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `drain` fires, then stops accepting and gives open connections up to
    /// `drain_timeout` to end by themselves.
    pub async fn run(self, mut drain: watch::Receiver<bool>, drain_timeout: Duration) {
        // Each connection task holds a clone; the count tells how many are still open.
        let open = Arc::new(());
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = drain.wait_for(|d| *d) => break,
            };
            let (client, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    self.shared.metrics.connection_error("inbound");
                    crate::accept::failed("inbound", &e).await;
                    continue;
                }
            };
            // The application: --app-addr, else where the redirected connection was going.
            let orig =
                detect::original_dst(&client).filter(|o| Some(*o) != client.local_addr().ok());
            // Redirected here on its way to an address that is not this pod's (a neighbour
            // routing a packet for 169.254.169.254 or a database through the pod): refused,
            // or the proxy would dial it from the pod.
            if let Some(o) = orig.filter(|o| !is_local_address(o.ip(), &client)) {
                tracing::warn!(%peer, dst = %o, "inbound: refused a connection not addressed to this pod");
                self.shared.metrics.inbound_refused("not-local");
                continue;
            }
            // Redirected here on its way to one of the proxy's own ports (a remote caller
            // dialling podIP:15001 to borrow this pod's identity): refused.
            if let Some(o) = orig.filter(|o| self.shared.own_ports.contains(&o.port())) {
                tracing::warn!(%peer, dst = %o, "inbound: refused a connection to the proxy's own port");
                self.shared.metrics.inbound_refused("own-port");
                continue;
            }
            let Some(app) = self.shared.app.or(orig) else {
                tracing::warn!(%peer, "inbound connection closed: no --app-addr and not redirected");
                self.shared.metrics.connection_error("inbound");
                continue;
            };
            let Some(slot) = self.shared.cap.admit() else {
                self.shared
                    .metrics
                    .connection_closed("inbound", "max-connections");
                continue;
            };
            self.shared.metrics.inbound_connections.inc();
            let (shared, open) = (self.shared.clone(), open.clone());
            tokio::spawn(async move {
                let (_open, _slot) = (open, slot);
                // How the mesh knows this endpoint: the original destination, or (with
                // --app-addr) the inbound address the world lists as the endpoint.
                let endpoint = orig.or_else(|| client.local_addr().ok());
                shared.connection(client, peer, app, endpoint).await;
            });
        }
        drop(self.listener);
        let deadline = tokio::time::Instant::now() + drain_timeout;
        while Arc::strong_count(&open) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What a connection turned out to be.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    MeshTls,
    Http1,
    /// HTTP/2 with prior knowledge (h2c): parsed, never passed through.
    H2c,
    /// Not a byte within the detection time: decided by who speaks first.
    Silent,
    Other,
    /// Not HTTP on a port declared HTTP: refused, never copied raw.
    NotHttp,
}

impl Shared {
    async fn classify(
        &self,
        client: &TcpStream,
        app: SocketAddr,
        declared: Option<crate::state::Declared>,
        mode: MtlsMode,
    ) -> Kind {
        use crate::state::Declared;
        let server_first = self.server_first_ports.contains(&app.port());
        if server_first && mode == MtlsMode::Disable {
            return Kind::Other;
        }
        // A server-first port too: a calling sidecar speaks first (its ClientHello), while a
        // plaintext client of a server-first protocol waits for the greeting — after the
        // detection time it is copied through as it is.
        let mut first = [0u8; 2];
        let n = detect::peek_some(client, &mut first, 2, detect::DETECT_TIMEOUT).await;
        if tls::looks_like_tls(&first[..n]) {
            let alpn = detect::peek_alpn(client, detect::DETECT_TIMEOUT).await;
            if alpn.is_some_and(|a| tls::offers_mesh_alpn(&a)) {
                return Kind::MeshTls;
            }
            return match declared {
                Some(Declared::Http) if !server_first => Kind::NotHttp,
                _ => Kind::Other,
            };
        }
        if server_first {
            return Kind::Other;
        }
        // Declared opaque: only mesh mTLS is told apart, never sniffed for HTTP.
        if declared == Some(Declared::Opaque) {
            return Kind::Other;
        }
        match (
            detect::detect_first(client, detect::DETECT_TIMEOUT).await,
            declared,
        ) {
            (Detected::Protocol(Protocol::Http1), _) => Kind::Http1,
            (Detected::Protocol(Protocol::Http2), _) => Kind::H2c,
            // A declared HTTP port: a silent caller is an HTTP client yet to speak (its head
            // has --header-read-timeout); anything else is refused.
            (Detected::Silent, Some(Declared::Http)) => Kind::Http1,
            (Detected::Protocol(Protocol::Opaque), Some(Declared::Http)) => Kind::NotHttp,
            (Detected::Protocol(Protocol::Opaque), _) => Kind::Other,
            (Detected::Silent, _) => Kind::Silent,
        }
    }

    /// A plaintext caller that said nothing within the detection time. Connect to the
    /// application and let whoever speaks first decide: the application (a server-first
    /// protocol) makes it opaque; the caller's first bytes are classified as if they had come
    /// in time, so waiting never turns HTTP into raw bytes the application would parse.
    async fn late(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        app: SocketAddr,
        dst: SocketAddr,
    ) {
        let Some(upstream) = self.app_conn(peer, app).await else {
            return;
        };
        let client_first = tokio::select! {
            r = client.readable() => r.is_ok(),
            _ = upstream.readable() => false,
        };
        let protocol = match client_first {
            true => detect::detect(&client, detect::DETECT_TIMEOUT).await,
            false => Protocol::Opaque,
        };
        match protocol {
            Protocol::Http1 => {
                drop(upstream);
                self.serve_http(client, peer, app, dst, None).await
            }
            Protocol::Http2 => {
                drop(upstream);
                self.serve_h2(client, peer, app, dst, None).await
            }
            Protocol::Opaque => {
                let caller = self.caller(None, peer, dst);
                if !caller.tcp_allowed(&self.xds.config.load(), &self.metrics) {
                    return;
                }
                self.metrics.tcp_connection("inbound", false);
                let idle = self.idle_timeout;
                let splice = crate::connect::splice_to(
                    client,
                    upstream,
                    peer,
                    app,
                    "inbound",
                    &self.metrics,
                    idle,
                );
                self.until_revoked(caller, splice).await
            }
        }
    }

    async fn connection(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        app: SocketAddr,
        endpoint: Option<SocketAddr>,
    ) {
        let _ = client.set_nodelay(true);
        // The container port: the original destination's (its app port when not intercepted).
        let port = endpoint.map_or(app.port(), |e| e.port());
        // Where the caller was going, as policies name it: the pod's address and port.
        let dst = endpoint.unwrap_or(app);
        let (mode, declared) = self.xds.config.load().inbound_for(port);
        let kind = self.classify(&client, app, declared, mode).await;
        match (kind, mode) {
            (Kind::MeshTls, MtlsMode::Strict | MtlsMode::Permissive) => {
                self.mesh_tls(client, peer, app, dst, declared).await
            }
            (_, MtlsMode::Strict) => {
                tracing::info!(%peer, namespace = %self.namespace, "inbound: plaintext connection refused (mTLS mode STRICT)");
                self.metrics.inbound_refused("plaintext-in-strict");
            }
            (Kind::NotHttp, _) => {
                tracing::info!(%peer, %app, "inbound: refused bytes that are not HTTP on a port declared HTTP");
                self.metrics.inbound_refused("not-http");
            }
            (Kind::Http1, _) => self.serve_http(client, peer, app, dst, None).await,
            (Kind::H2c, _) => self.serve_h2(client, peer, app, dst, None).await,
            (Kind::Silent, _) => self.late(client, peer, app, dst).await,
            (Kind::MeshTls | Kind::Other, _) => {
                let caller = self.caller(None, peer, dst);
                if !caller.tcp_allowed(&self.xds.config.load(), &self.metrics) {
                    return;
                }
                let splice = crate::connect::splice(
                    client,
                    peer,
                    app,
                    "inbound",
                    &self.metrics,
                    self.idle_timeout,
                );
                self.until_revoked(caller, splice).await
            }
        }
    }

    /// A connection to the application, or `None` (logged and counted) when it is down.
    async fn app_conn(&self, peer: SocketAddr, app: SocketAddr) -> Option<TcpStream> {
        match crate::connect::connect_app(app).await {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(%peer, %app, error = %e, "inbound: cannot reach the application");
                self.metrics.connection_error("inbound");
                None
            }
        }
    }

    fn caller<'a>(
        &'a self,
        principal: Option<&'a str>,
        peer: SocketAddr,
        destination: SocketAddr,
    ) -> crate::authz::Caller<'a> {
        crate::authz::Caller {
            principal,
            peer,
            destination,
            namespace: &self.namespace,
        }
    }

    /// Runs a spliced connection until it ends or a new config's policies deny it (then it
    /// is closed: dropping the splice drops both sockets).
    async fn until_revoked(
        &self,
        caller: crate::authz::Caller<'_>,
        splice: impl std::future::Future<Output = ()>,
    ) {
        let changed = self.xds.changed.clone();
        tokio::select! {
            () = splice => {}
            () = caller.revoked(changed, &self.xds.config, &self.metrics) => {
                self.metrics.connection_closed("inbound", "authz-revoked");
            }
        }
    }

    /// Terminates another sidecar's mTLS; its verified identity goes with each request.
    async fn mesh_tls(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        app: SocketAddr,
        dst: SocketAddr,
        declared: Option<crate::state::Declared>,
    ) {
        let Some(svid) = self.svid.as_ref().and_then(|s| s.load_full()) else {
            tracing::warn!(%peer, "inbound: mTLS refused: this workload has no certificate yet");
            self.metrics.inbound_refused("no-certificate");
            return;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(svid.tls.inbound.clone());
        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(client)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "inbound: mTLS handshake refused");
                self.metrics.inbound_refused("handshake");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "inbound: mTLS handshake timed out");
                self.metrics.inbound_refused("handshake-timeout");
                return;
            }
        };
        let identity = match tls::check_peer(stream.get_ref().1.peer_certificates(), &[]) {
            Ok(id) => id,
            Err(e) => {
                tracing::info!(%peer, error = %e, "inbound: client certificate refused");
                self.metrics.inbound_refused("client-identity");
                return;
            }
        };
        let opaque = stream.get_ref().1.alpn_protocol() == Some(tls::ALPN_MESH_TCP);
        // A port declared opaque is judged by its TCP rules too (there a DENY's HTTP-only
        // fields are dropped, so it covers the whole port), whatever the caller speaks.
        if opaque || declared == Some(crate::state::Declared::Opaque) {
            let principal = identity.to_string();
            let caller = self.caller(Some(&principal), peer, dst);
            if !caller.tcp_allowed(&self.xds.config.load(), &self.metrics) {
                return;
            }
            if opaque {
                return self
                    .mesh_tcp(stream, peer, app, dst, identity, declared)
                    .await;
            }
        }
        if stream.get_ref().1.alpn_protocol() == Some(tls::ALPN_MESH_H2) {
            self.serve_h2(stream, peer, app, dst, Some(identity)).await;
        } else {
            self.serve_http(stream, peer, app, dst, Some(identity))
                .await;
        }
    }

    /// Opaque TCP inside mesh mTLS, already allowed by the TCP rules. What it carries is
    /// classified as plaintext is (but read, not peeked): HTTP is served as HTTP (the
    /// verified caller attached, mesh headers stripped, HTTP rules applied) — raw bytes that
    /// an application would parse as a request never carry a forged identity header; bytes
    /// that are not HTTP on a port declared HTTP are refused. Anything else (and every port
    /// declared opaque or server-first, never sniffed) is copied to the application until
    /// either side closes or a new config's policies deny the caller.
    async fn mesh_tcp(
        self: Arc<Self>,
        stream: tokio_rustls::server::TlsStream<TcpStream>,
        peer: SocketAddr,
        app: SocketAddr,
        dst: SocketAddr,
        identity: SpiffeId,
        declared: Option<crate::state::Declared>,
    ) {
        use crate::state::Declared;
        let sniffed =
            declared != Some(Declared::Opaque) && !self.server_first_ports.contains(&app.port());
        let mut stream = stream;
        let mut first = Vec::new();
        let mut upstream = None;
        let mut seen = Detected::Protocol(Protocol::Opaque);
        if sniffed {
            seen = match detect::detect_read(&mut stream, &mut first, detect::DETECT_TIMEOUT).await
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(%peer, error = %e, "inbound: mesh TCP closed: read error before its protocol was known");
                    self.metrics.connection_error("inbound");
                    return;
                }
            };
        }
        // Silent: whoever speaks first decides, as for plaintext (`late`) — the application
        // (a server-first protocol) makes it opaque; the caller's bytes are classified then,
        // so waiting never turns HTTP into raw bytes the application would parse.
        if seen == Detected::Silent && declared != Some(Declared::Http) {
            let Some(app_conn) = self.app_conn(peer, app).await else {
                return;
            };
            let idle = self.header_read_timeout;
            seen = tokio::select! {
                r = detect::detect_read(&mut stream, &mut first, idle) => match r {
                    Ok(Detected::Silent) | Ok(Detected::Protocol(Protocol::Opaque)) => Detected::Protocol(Protocol::Opaque),
                    Ok(s) => s,
                    Err(e) => {
                        tracing::info!(%peer, error = %e, "inbound: mesh TCP closed: read error before its protocol was known");
                        self.metrics.connection_error("inbound");
                        return;
                    }
                },
                _ = app_conn.readable() => Detected::Protocol(Protocol::Opaque),
            };
            upstream = Some(app_conn);
        }
        let io = detect::Replay::new(first, stream);
        match (seen, declared) {
            (Detected::Protocol(Protocol::Http1), _) | (Detected::Silent, Some(Declared::Http)) => {
                return self.serve_http(io, peer, app, dst, Some(identity)).await;
            }
            (Detected::Protocol(Protocol::Http2), _) => {
                return self.serve_h2(io, peer, app, dst, Some(identity)).await;
            }
            (_, Some(Declared::Http)) => {
                tracing::info!(%peer, %app, "inbound: refused bytes that are not HTTP on a port declared HTTP (mesh mTLS, opaque)");
                self.metrics.inbound_refused("not-http");
                return;
            }
            _ => {}
        }
        let upstream = match upstream {
            Some(u) => u,
            None => match self.app_conn(peer, app).await {
                Some(u) => u,
                None => return,
            },
        };
        self.metrics.tcp_connection("inbound", true);
        let principal = identity.to_string();
        let caller = self.caller(Some(&principal), peer, dst);
        let splice = crate::connect::splice_to(
            io,
            upstream,
            peer,
            app,
            "inbound",
            &self.metrics,
            self.idle_timeout,
        );
        self.until_revoked(caller, splice).await
    }

    /// HTTP/2 — inside mesh mTLS (a caller reaching an HTTP/2-only endpoint) or plaintext h2c
    /// — served as HTTP/2 and forwarded to the application with prior knowledge; the verified
    /// caller attached only with mTLS.
    async fn serve_h2<IO>(
        self: Arc<Self>,
        io: IO,
        peer: SocketAddr,
        app: SocketAddr,
        dst: SocketAddr,
        identity: Option<SpiffeId>,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let identity =
            identity.and_then(|id| hyper::header::HeaderValue::from_str(&id.to_string()).ok());
        let this = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let (this, identity) = (this.clone(), identity.clone());
            async move { Ok::<_, Infallible>(this.to_app(req, app, peer, dst, identity).await) }
        });
        let activity = crate::accept::Activity::default();
        let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .serve_connection(TokioIo::new(activity.wrap(io)), svc);
        tokio::select! {
            r = conn => if let Err(e) = r {
                tracing::info!(%peer, error = %e, "inbound HTTP/2 connection closed on a protocol error");
                self.metrics.connection_error("inbound");
            },
            _ = activity.idle_for(self.idle_timeout) => {
                self.metrics.connection_closed("inbound", "idle");
            }
        }
    }

    /// HTTP/1 to the application, one pooled connection per request stream; the caller's
    /// identity header is set from the handshake, never taken from the caller.
    async fn serve_http<IO>(
        self: Arc<Self>,
        io: IO,
        peer: SocketAddr,
        app: SocketAddr,
        dst: SocketAddr,
        identity: Option<SpiffeId>,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let identity =
            identity.and_then(|id| hyper::header::HeaderValue::from_str(&id.to_string()).ok());
        let mtls = identity.is_some();
        let this = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let (this, identity) = (this.clone(), identity.clone());
            async move { Ok::<_, Infallible>(this.to_app(req, app, peer, dst, identity).await) }
        });
        let activity = crate::accept::Activity::default();
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(TokioIo::new(activity.wrap(io)), svc)
            .with_upgrades();
        tokio::select! {
            r = conn => if let Err(e) = r {
                tracing::info!(%peer, mtls, error = %e, "inbound connection closed on a protocol error");
                self.metrics.connection_error("inbound");
            },
            _ = activity.idle_for(self.idle_timeout) => {
                self.metrics.connection_closed("inbound", "idle");
            }
        }
    }

    async fn to_app(
        &self,
        req: Request<hyper::body::Incoming>,
        app: SocketAddr,
        peer: SocketAddr,
        dst: SocketAddr,
        identity: Option<hyper::header::HeaderValue>,
    ) -> Response<Body> {
        let started = Instant::now();
        let mtls = identity.is_some();
        let h2 = req.version() == hyper::Version::HTTP_2;
        let mut req = req;
        let downstream = match crate::hop::request(&mut req, mtls) {
            Ok(d) => d,
            Err((status, reason, msg)) => return refuse(status, reason, msg),
        };
        let (mut parts, body) = req.into_parts();
        let principal = identity.as_ref().and_then(|v| v.to_str().ok());
        match self
            .caller(principal, peer, dst)
            .http(&self.xds.config.load(), &parts, &self.metrics)
        {
            Ok(None) => {}
            // The normalised path the policies judged is the one the application gets.
            Ok(Some(path)) => match hyper::Uri::builder().path_and_query(path).build() {
                Ok(u) => parts.uri = u,
                Err(e) => {
                    return refuse(StatusCode::BAD_REQUEST, "bad-uri", format!("weft: {e}"));
                }
            },
            Err(resp) => {
                self.metrics
                    .inbound_request(mtls, resp.status().as_u16(), started);
                return *resp;
            }
        }
        parts.uri = match crate::http::forward_uri("http", app, &parts.uri) {
            Ok(u) => u,
            Err(msg) => return refuse(StatusCode::BAD_REQUEST, "bad-uri", msg),
        };
        strip_mesh_headers(&mut parts.headers);
        parts.headers.remove(hyper::header::TRAILER);
        // Trailers too: an app (or framework) that merges them into the headers must not find
        // a mesh-owned one there either.
        let body = body.map_frame(|frame| match frame.into_trailers() {
            Ok(mut trailers) => {
                strip_mesh_headers(&mut trailers);
                hyper::body::Frame::trailers(trailers)
            }
            Err(frame) => frame,
        });
        append_forwarded_for(&mut parts.headers, peer);
        if let Some(id) = identity {
            parts.headers.insert(CLIENT_IDENTITY_HEADER, id);
        }
        let client = if h2 { &self.client_h2 } else { &self.client };
        let resp = match client
            .request(Request::from_parts(parts, body.boxed()))
            .await
        {
            Ok(r) => {
                let mut r = r.map(|b| b.boxed());
                crate::hop::response(&mut r, downstream, &self.metrics, "inbound");
                r
            }
            Err(e) => refuse(
                StatusCode::BAD_GATEWAY,
                "app-unreachable",
                format!("weft: the application at {app}: {e}"),
            ),
        };
        self.metrics
            .inbound_request(mtls, resp.status().as_u16(), started);
        resp
    }
}

/// Whether `ip` is one of this pod's own addresses (the connection's local address, else any
/// interface's) and not loopback: a redirected inbound connection must have been addressed to
/// the pod itself.
fn is_local_address(ip: std::net::IpAddr, conn: &TcpStream) -> bool {
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return false;
    }
    if conn.local_addr().is_ok_and(|l| l.ip() == ip) {
        return true;
    }
    nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
        addrs.any(|a| {
            a.address.is_some_and(|sa| {
                sa.as_sockaddr_in().map(|s| std::net::IpAddr::V4(s.ip())) == Some(ip)
                    || sa.as_sockaddr_in6().map(|s| std::net::IpAddr::V6(s.ip())) == Some(ip)
            })
        })
    })
}

/// Removes every header a framework could read as a mesh-owned one (`x-weft-*` in any case,
/// `_` for `-`: CGI and WSGI fold `x_weft_client_identity` into the same variable), from
/// every caller, mTLS or not: the identity header is then set only from the verified peer.
pub fn strip_mesh_headers(headers: &mut hyper::HeaderMap) {
    let owned: Vec<hyper::header::HeaderName> = headers
        .keys()
        .filter(|k| weft_proto::keys::is_mesh_owned_header(k.as_str()))
        .cloned()
        .collect();
    for k in owned {
        headers.remove(&k);
    }
}

/// Appends the caller's address to `x-forwarded-for`, as a proxy in front of the application
/// does: behind its sidecar the application sees every connection come from its own pod.
fn append_forwarded_for(headers: &mut hyper::HeaderMap, peer: SocketAddr) {
    let ip = peer.ip().to_string();
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = hyper::header::HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", v);
    }
}

#[cfg(test)]
mod forwarded_tests {
    use super::*;

    #[test]
    fn forwarded_for_appends_the_caller() {
        let peer: SocketAddr = "198.18.1.20:40000".parse().expect("addr");
        let mut h = hyper::HeaderMap::new();
        append_forwarded_for(&mut h, peer);
        assert_eq!(h["x-forwarded-for"], "198.18.1.20");
        let mut h = hyper::HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.7".parse().expect("value"));
        append_forwarded_for(&mut h, peer);
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 198.18.1.20");
    }
}
