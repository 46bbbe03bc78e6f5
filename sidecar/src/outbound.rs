//! Outbound: HTTP requests from the local application, routed by authority, path and headers to
//! a (weighted) cluster, then an endpoint by priority, then a pooled hyper connection.
//!
//! Explicit mode (DESIGN.md): a request sent straight to the outbound address is routed by its
//! `Host`/`:authority`; a host the mesh does not know gets 404 with a reason header.
//! Intercepted connections (SO_ORIGINAL_DST) are told apart by their first bytes: HTTP goes
//! down the cluster stack; anything else (and every server-first port) is opaque TCP, sent as
//! mesh mTLS (ALPN `weft-tcp`) when its destination is, or is a Service that picks, a meshed
//! endpoint ([`tcp_target`]), else copied to its original destination.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use weft_proto::keys::PROXY_REASON_HEADER;

use crate::connect::Upstream;
use crate::detect::{self, Protocol};
use crate::http::{Body, MAX_HEAD_BYTES, forward_uri, refuse};
use crate::metrics::Metrics;
use crate::policy::RetryPolicy;
use crate::resilience::Dispatch;
use crate::resilience::breaker::{Breaker, BreakerLayer, ConnectionLimit, ConnectionLimitLayer};
use crate::resilience::outlier::{Outlier, OutlierLayer};
use crate::resilience::pick::{Pick, PickLayer};
use crate::resilience::retry::{Retry, RetryLayer};
use crate::resilience::timeout::{PerTryTimeout, PerTryTimeoutLayer, Timeout, TimeoutLayer};
use crate::state::{HashOn, RouteTarget};
use crate::telemetry::{TRACEPARENT, TraceContext, Tracer};
use crate::xds::XdsHandle;
use tower::Service;
use tracing::Instrument;

/// The outbound listener and the proxy behind it.
pub struct Outbound {
    listener: TcpListener,
    proxy: Arc<Proxy>,
}

/// What every outbound connection shares.
struct Proxy {
    xds: XdsHandle,
    metrics: Arc<Metrics>,
    /// Passthrough to original destinations (hosts the mesh does not know).
    client: Client<HttpConnector, Body>,
    /// The cluster stack every routed request goes down.
    stack: Stack,
    namespace: String,
    server_first_ports: Vec<u16>,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    cap: crate::accept::Cap,
    tracer: Tracer,
    /// This workload's identity, for mesh mTLS of opaque TCP.
    svid: Option<crate::identity::SvidCell>,
    /// This proxy's cluster (told to another network's gateway).
    cluster: String,
}

impl Outbound {
    /// Binds the listener.
    pub async fn bind(
        addr: SocketAddr,
        ctx: crate::listener::ListenerContext,
        tracer: Tracer,
    ) -> std::io::Result<Self> {
        Ok(Self::with_listener(
            TcpListener::bind(addr).await?,
            ctx,
            tracer,
        ))
    }

    /// Serves on an already bound `listener` (the IPv6 one).
    pub fn with_listener(
        listener: TcpListener,
        ctx: crate::listener::ListenerContext,
        tracer: Tracer,
    ) -> Self {
        let upstream =
            crate::connect::Upstream::new(ctx.svid.clone(), ctx.metrics.clone(), &ctx.cluster);
        Outbound {
            listener,
            proxy: Arc::new(Proxy {
                stack: stack(upstream, &ctx.metrics),
                xds: ctx.xds,
                metrics: ctx.metrics,
                client: crate::connect::pooled(crate::connect::plain()),
                namespace: ctx.namespace,
                server_first_ports: ctx.server_first_ports,
                header_read_timeout: ctx.header_read_timeout,
                idle_timeout: ctx.idle_timeout,
                cap: crate::accept::Cap::new(ctx.max_connections),
                tracer,
                svid: ctx.svid,
                cluster: ctx.cluster,
            }),
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `drain` fires, then stops accepting (new connections are refused), lets
    /// in-flight HTTP requests finish within `drain_timeout`, and returns.
    pub async fn run(self, mut drain: watch::Receiver<bool>, drain_timeout: Duration) {
        let Outbound {
            listener,
            proxy: this,
        } = self;
        let graceful = GracefulShutdown::new();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = drain.wait_for(|d| *d) => break,
            };
            let (stream, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    crate::accept::failed("outbound", &e).await;
                    continue;
                }
            };
            let Some(slot) = this.cap.admit() else {
                this.metrics
                    .connection_closed("outbound", "max-connections");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let this = this.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let _slot = slot;
                // Redirected by iptables, or sent to us directly (explicit mode)?
                let orig =
                    detect::original_dst(&stream).filter(|o| Some(*o) != stream.local_addr().ok());
                let Some(dst) = orig else {
                    return this.serve_http(stream, peer, None, watcher).await;
                };
                let protocol = if this.server_first_ports.contains(&dst.port()) {
                    Protocol::Opaque
                } else {
                    detect::detect(&stream, detect::DETECT_TIMEOUT).await
                };
                match protocol {
                    Protocol::Opaque => this.opaque(stream, peer, dst).await,
                    Protocol::Http1 | Protocol::Http2 => {
                        this.serve_http(stream, peer, Some(dst), watcher).await
                    }
                }
            });
        }
        drop(listener);
        tracing::info!(in_flight = graceful.count(), "outbound draining");
        if tokio::time::timeout(drain_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                ?drain_timeout,
                "outbound drain timed out; cutting what is left"
            );
        }
    }
}

/// Where an outbound opaque TCP connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpTarget {
    /// A meshed endpoint: mesh mTLS to it, and its sidecar must prove this SPIFFE ID.
    Mesh(SocketAddr, Arc<str>),
    /// Plain TCP to the original destination (an address the mesh does not know, or a
    /// Service whose picked endpoint has no sidecar).
    Plain(SocketAddr),
    /// A meshed endpoint on another network: mesh mTLS to it inside a tunnel through one of
    /// its gateways.
    Gateway(SocketAddr, Arc<str>, Arc<crate::balance::Via>),
}

/// Where opaque TCP to `dst` goes: `dst` itself when it is a meshed endpoint (a pod IP, a
/// headless Service's member); for a Service address, the endpoint its cluster picks with
/// `roll` (the route that takes `/` without header conditions; weighted splits by weight)
/// when that endpoint is meshed; otherwise `dst`, unchanged.
pub fn tcp_target(config: &crate::state::MeshConfig, dst: SocketAddr, roll: u64) -> TcpTarget {
    if let Some(id) = config.mtls_identities.get(&dst) {
        return TcpTarget::Mesh(dst, id.clone());
    }
    let no_headers = http::HeaderMap::new();
    let picked = config
        .hosts
        .get(&dst.to_string())
        .and_then(|routes| routes.iter().find(|r| r.matches("/", &no_headers)))
        .and_then(|route| {
            let cluster = match &route.target {
                RouteTarget::Cluster(c) => c.clone(),
                RouteTarget::Weighted(list) => weighted_pick(list, roll),
            };
            let cluster = config.clusters.get(&cluster)?;
            cluster.runtime.touch();
            let target = cluster.endpoints.as_ref()?.pick(roll, None)?;
            let id = target.mtls_identity.clone()?;
            Some(match &target.via {
                Some(via) => TcpTarget::Gateway(target.addr, id, via.clone()),
                None => TcpTarget::Mesh(target.addr, id),
            })
        });
    picked.unwrap_or(TcpTarget::Plain(dst))
}

impl Proxy {
    /// Opaque TCP from the application: mesh mTLS to a meshed endpoint (see [`tcp_target`]),
    /// refused when that endpoint is STRICT and this workload has no valid certificate (never
    /// a downgrade), else copied to the original destination.
    async fn opaque(&self, stream: TcpStream, peer: SocketAddr, dst: SocketAddr) {
        // On demand, a destination the proxy holds nothing about waits to be known first: a
        // Service address for its config, any other address for what it is.
        if let Some(od) = &self.xds.on_demand {
            // A Service address waits for its service-port's whole config (also when its route
            // is held but a cluster is not yet); anything else unknown, for what it is.
            let (service_port, known) = {
                let config = self.xds.config.load();
                (config.directory.by_address(dst), config.knows(dst))
            };
            let learned = match service_port {
                Some(name) => od.discover(&self.xds, &name).await,
                None if known => Ok(()),
                None => od.discover_address(&self.xds, dst.ip()).await,
            };
            if learned.is_err() {
                tracing::warn!(%peer, %dst, "closing a connection: what its destination is did not arrive from the control plane in time");
                self.metrics
                    .connection_closed("outbound", "discovery-timeout");
                return;
            }
            if let crate::state::Unrouted::Refuse(reason) = self.xds.config.load().unrouted(dst) {
                tracing::warn!(%peer, %dst, reason, "closing a connection: a mesh address with no mTLS route, never sent plaintext");
                self.metrics.connection_closed("outbound", reason);
                return;
            }
        }
        let (target, strict) = {
            let config = self.xds.config.load();
            let target = tcp_target(&config, dst, rand::random());
            let strict = match &target {
                TcpTarget::Mesh(addr, _) => config.strict_endpoints.contains(addr),
                TcpTarget::Plain(_) => config.strict_endpoints.contains(&dst),
                // Another network is reached only inside mTLS.
                TcpTarget::Gateway(..) => true,
            };
            (target, strict)
        };
        let tls = self
            .svid
            .as_ref()
            .and_then(|s| s.load_full())
            .filter(|s| s.valid())
            .map(|s| (s.tls.upstream_tcp.clone(), s.tls.tunnel.clone()));
        let (addr, expected, config) = match (target, tls) {
            (TcpTarget::Gateway(addr, expected, via), Some((config, tunnel))) => {
                let configs = (tunnel, config);
                let upstream = crate::connect::mesh_handshake_via(
                    &via,
                    addr,
                    &expected,
                    configs,
                    &self.cluster,
                    &self.metrics,
                )
                .await;
                return self
                    .splice_mesh(stream, upstream, peer, dst, addr, "through a gateway")
                    .await;
            }
            (TcpTarget::Mesh(addr, expected), Some((config, _))) => (addr, expected, config),
            _ if strict => {
                tracing::info!(%peer, %dst, "outbound: opaque TCP to a STRICT meshed endpoint refused: this proxy has no valid certificate (no plaintext)");
                self.metrics.connection_closed("outbound", "mtls-required");
                return;
            }
            _ => {
                return crate::connect::splice(
                    stream,
                    peer,
                    dst,
                    "outbound",
                    &self.metrics,
                    self.idle_timeout,
                )
                .await;
            }
        };
        let upstream = crate::connect::mesh_handshake(addr, &expected, config, &self.metrics).await;
        self.splice_mesh(stream, upstream, peer, dst, addr, "direct")
            .await
    }

    /// Copies opaque TCP between the application and its endpoint once mesh mTLS to it is up
    /// (`how`: directly or through a gateway), or closes it when that failed.
    async fn splice_mesh<U>(
        &self,
        stream: TcpStream,
        upstream: Result<U, crate::pool::MeshConnectError>,
        peer: SocketAddr,
        dst: SocketAddr,
        addr: SocketAddr,
        how: &'static str,
    ) where
        U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        match upstream {
            Ok(upstream) => {
                self.metrics.tcp_connection("outbound", true);
                tracing::debug!(%peer, %dst, endpoint = %addr, how, "outbound: opaque TCP over mesh mTLS");
                crate::connect::splice_to(
                    stream,
                    upstream,
                    peer,
                    addr,
                    "outbound",
                    &self.metrics,
                    self.idle_timeout,
                )
                .await
            }
            Err(e) => {
                tracing::warn!(%peer, %dst, endpoint = %addr, how, error = %e, "outbound: opaque TCP: no mesh mTLS connection; closed");
                self.metrics.connection_error("outbound");
            }
        }
    }

    async fn serve_http(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        orig: Option<SocketAddr>,
        watcher: Watcher,
    ) {
        let this = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.handle(req, peer, orig).await) }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        // Slowloris and oversized heads are cut: a head must arrive whole within the timeout
        // and fit the buffer; garbage fails the parse. Each is logged and counted, nothing panics.
        builder
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .max_buf_size(MAX_HEAD_BYTES);
        builder.http2().max_header_list_size(MAX_HEAD_BYTES as u32);
        let activity = crate::accept::Activity::default();
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(activity.wrap(stream)), svc)
            .into_owned();
        tokio::select! {
            r = watcher.watch(conn) => if let Err(e) = r {
                tracing::info!(%peer, error = %e, "outbound connection closed on a protocol error");
                self.metrics.connection_error("outbound");
            },
            _ = activity.idle_for(self.idle_timeout) => {
                tracing::debug!(%peer, "outbound connection closed: idle");
                self.metrics.connection_closed("outbound", "idle");
            }
        }
    }

    /// A request for a host the mesh does not know, sent on to its original destination.
    async fn passthrough(
        &self,
        req: Request<Incoming>,
        dst: SocketAddr,
        started: Instant,
    ) -> Response<Body> {
        if self.xds.config.load().strict_endpoints.contains(&dst) {
            self.metrics.observe("passthrough", 503, started);
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "mtls-required",
                format!(
                    "weft: {dst} is a meshed endpoint of a STRICT namespace and was called by address, not through its Service: it is not sent plaintext (call the Service)"
                ),
            );
        }
        let (parts, body) = req.into_parts();
        let uri = match forward_uri("http", dst, &parts.uri) {
            Ok(u) => u,
            Err(msg) => return refuse(StatusCode::BAD_REQUEST, "bad-uri", msg),
        };
        let mut out = Request::new(body.boxed());
        // Sent on as HTTP/1.1, whatever the client spoke to the sidecar.
        *out.version_mut() = http::Version::HTTP_11;
        *out.method_mut() = parts.method;
        *out.uri_mut() = uri;
        *out.headers_mut() = parts.headers;
        let resp = match self.client.request(out).await {
            Ok(r) => r.map(|b| b.boxed()),
            Err(e) => refuse(
                StatusCode::BAD_GATEWAY,
                "passthrough-failure",
                format!("weft: {dst}: {e}"),
            ),
        };
        self.metrics
            .observe("passthrough", resp.status().as_u16(), started);
        resp
    }

    /// One request, inside its trace span: the caller's `traceparent` is continued (or a trace
    /// started) and the upstream sees the sidecar's span as parent.
    async fn handle(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        orig: Option<SocketAddr>,
    ) -> Response<Body> {
        let parent = req
            .headers()
            .get(&TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse);
        // Span attributes are built only when the span will be exported: without
        // --otlp-endpoint the span is a debug span and the path is not copied.
        let (span, trace) = if self.tracer.enabled() {
            let authority = request_authority(&req);
            self.tracer
                .request_span(parent.as_ref(), req.method(), req.uri().path(), &authority)
        } else {
            self.tracer
                .request_span(parent.as_ref(), req.method(), "", "")
        };
        if let Ok(v) = hyper::header::HeaderValue::from_bytes(&trace.header_bytes()) {
            req.headers_mut().insert(TRACEPARENT.clone(), v);
        }
        let resp = match crate::hop::request(&mut req, false) {
            Err((status, reason, msg)) => refuse(status, reason, msg),
            Ok(downstream) => {
                let mut resp = self.route(req, peer, orig).instrument(span.clone()).await;
                crate::hop::response(&mut resp, downstream, &self.metrics, "outbound");
                resp
            }
        };
        let reason = resp
            .headers()
            .get(PROXY_REASON_HEADER)
            .and_then(|v| v.to_str().ok());
        self.tracer.finish(&span, resp.status().as_u16(), reason);
        resp
    }

    /// On demand, before plaintext to an address no route names: learns from the control
    /// plane whether it is a meshed endpoint (and then holds its Services' config, so its
    /// STRICT mode and identity are known); a 503 when that does not arrive in time.
    /// Then a STRICT mesh address with no mTLS route, or a Service address on a port it
    /// lacks, is a 503 too ([`crate::state::MeshConfig::unrouted`]).
    async fn learn_address(&self, dst: SocketAddr, started: Instant) -> Result<(), Response<Body>> {
        let Some(od) = &self.xds.on_demand else {
            return Ok(());
        };
        if !self.xds.config.load().knows(dst)
            && od.discover_address(&self.xds, dst.ip()).await.is_err()
        {
            return Err(self.unavailable(started, "discovery-timeout", format!(
                "weft: whether {dst} is a mesh endpoint did not arrive from the control plane in time"
            )));
        }
        match self.xds.config.load().unrouted(dst) {
            crate::state::Unrouted::AsHeld => Ok(()),
            crate::state::Unrouted::Refuse(reason) => Err(self.unavailable(started, reason, format!(
                "weft: {dst} is a mesh address this proxy has no mTLS route to; not sent in plaintext"
            ))),
        }
    }

    /// A 503 the proxy answers itself, counted.
    fn unavailable(
        &self,
        started: Instant,
        reason: &'static str,
        detail: String,
    ) -> Response<Body> {
        self.metrics.observe("", 503, started);
        refuse(StatusCode::SERVICE_UNAVAILABLE, reason, detail)
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        orig: Option<SocketAddr>,
    ) -> Response<Body> {
        let started = Instant::now();
        let authority = request_authority(&req);
        let mut config = self.xds.config.load();
        // By name first; an intercepted client that dialed a Service IP is found by that IP.
        let lookup = |config: &crate::state::MeshConfig| {
            config
                .routes_for(&authority, &self.namespace)
                .or_else(|| orig.and_then(|dst| config.hosts.get(&dst.to_string())))
                .cloned()
        };
        let mut routes = lookup(&config);
        // On demand, a service-port the directory names but the proxy does not hold yet is
        // subscribed, and the request waits for its config (bounded).
        if routes.is_none()
            && let Some(od) = &self.xds.on_demand
            && let Some(name) = config.directory.resolve(&authority, orig, &self.namespace)
        {
            drop(config);
            if od.discover(&self.xds, &name).await.is_err() {
                return self.unavailable(
                    started,
                    "discovery-timeout",
                    format!(
                        "weft: the config of {name} did not arrive from the control plane in time"
                    ),
                );
            }
            config = self.xds.config.load();
            routes = lookup(&config);
        }
        let Some(routes) = routes else {
            if let Some(dst) = orig {
                drop(config);
                if let Err(resp) = self.learn_address(dst, started).await {
                    return resp;
                }
                return self.passthrough(req, dst, started).await;
            }
            self.metrics.observe("", 404, started);
            return refuse(
                StatusCode::NOT_FOUND,
                "no-route",
                format!("weft: no mesh service answers to host {authority:?}"),
            );
        };
        let path = req.uri().path();
        let Some(route) = routes.iter().find(|r| r.matches(path, req.headers())) else {
            self.metrics.observe("", 404, started);
            return refuse(
                StatusCode::NOT_FOUND,
                "no-route-match",
                format!("weft: no route of {authority:?} matches {path:?}"),
            );
        };
        let cluster = match &route.target {
            RouteTarget::Cluster(c) => c.clone(),
            RouteTarget::Weighted(list) => weighted_pick(list, rand::random::<u64>()),
        };
        let hash = route.hash_on.as_ref().and_then(|h| match h {
            HashOn::Header(name) => req
                .headers()
                .get(name.as_str())
                .map(|v| crate::balance::hash64(v.as_bytes())),
            HashOn::SourceIp => Some(crate::balance::hash64(peer.ip().to_string().as_bytes())),
        });
        let (timeout, retry) = (route.timeout, route.retry.clone());
        let Some((endpoints, policy, runtime, http2)) =
            config.clusters.get(&cluster).and_then(|c| {
                c.runtime.touch();
                Some((
                    c.endpoints.clone()?,
                    c.policy.clone(),
                    c.runtime.clone(),
                    c.http2,
                ))
            })
        else {
            self.metrics.observe(&cluster, 503, started);
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-healthy-endpoints",
                format!("weft: cluster {cluster} has no endpoints"),
            );
        };
        drop(config);

        let counted = runtime.clone();
        let dispatch = Arc::new(Dispatch {
            cluster: cluster.clone(),
            endpoints,
            policy,
            runtime,
            timeout,
            retry: retry.unwrap_or_else(|| DEFAULT_RETRY.clone()),
            hash,
            http2,
            authority,
        });
        let mut req = req.map(|b| b.boxed());
        req.extensions_mut().insert(dispatch);
        let resp = match self.stack.clone().call(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        match resp.status().as_u16() {
            200 => counted
                .hot
                .get_or_init(|| self.metrics.hot_cluster(&cluster))
                .record(started.elapsed()),
            code => self.metrics.observe(&cluster, code, started),
        }
        resp
    }
}

/// The cluster stack, top to bottom: the whole request's deadline, the `max_requests`
/// breaker, retries (budget, backoff, replay), the endpoint pick, outlier detection and
/// per-endpoint accounting, the per-try deadline, the `max_connections`/`max_pending_requests`
/// breaker, and the pooled (m)TLS connection to the endpoint.
pub type Stack = Timeout<Breaker<Retry<Pick<Outlier<PerTryTimeout<ConnectionLimit<Upstream>>>>>>>;

/// Builds the cluster stack over `upstream`.
pub fn stack(upstream: Upstream, metrics: &Arc<Metrics>) -> Stack {
    tower::ServiceBuilder::new()
        .layer(TimeoutLayer)
        .layer(BreakerLayer::new(metrics.clone()))
        .layer(RetryLayer::new(metrics.clone()))
        .layer(PickLayer)
        .layer(OutlierLayer::new(metrics.clone()))
        .layer(PerTryTimeoutLayer)
        .layer(ConnectionLimitLayer::new(metrics.clone()))
        .service(upstream)
}

/// The retry policy of routes without one (connect failures only).
static DEFAULT_RETRY: std::sync::LazyLock<Arc<RetryPolicy>> =
    std::sync::LazyLock::new(|| Arc::new(RetryPolicy::connect_failure_default()));

/// The request's authority: from the URI (HTTP/2, absolute form) or the Host header.
fn request_authority<B>(req: &Request<B>) -> String {
    req.uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// Picks a cluster by weight; `roll` is a uniform random number.
pub fn weighted_pick(list: &[(String, u32)], roll: u64) -> String {
    let total: u64 = list.iter().map(|(_, w)| u64::from(*w)).sum();
    let mut at = roll % total.max(1);
    for (name, w) in list {
        let w = u64::from(*w);
        if at < w {
            return name.clone();
        }
        at -= w;
    }
    list.last().map(|(n, _)| n.clone()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_pick_respects_weights_exactly_over_a_period() {
        let list = vec![
            ("a".to_string(), 90),
            ("b".to_string(), 10),
            ("z".to_string(), 0),
        ];
        let mut counts = std::collections::HashMap::new();
        for roll in 0..100u64 {
            *counts.entry(weighted_pick(&list, roll)).or_insert(0) += 1;
        }
        assert_eq!(counts.get("a"), Some(&90));
        assert_eq!(counts.get("b"), Some(&10));
        assert_eq!(counts.get("z"), None);
    }

    fn endpoint(addr: &str, identity: Option<&str>) -> crate::state::Endpoint {
        crate::state::Endpoint::new(
            crate::state::EndpointSpec {
                mtls_identity: identity.map(Arc::from),
                ..crate::state::EndpointSpec::at(addr.parse().expect("addr"))
            },
            Arc::default(),
            Arc::new(crate::load::LocalityLoad::new("")),
        )
    }

    /// A config with Service VIP 198.18.0.10:5432 -> cluster `db` (a meshed endpoint) and
    /// 198.18.0.11:5432 -> a canary split between `db` and `plain` (an unmeshed endpoint).
    fn config() -> crate::state::MeshConfig {
        let mut config = crate::state::MeshConfig::default();
        let route = |target| crate::state::Route {
            path: crate::state::PathRule::Prefix("/".into()),
            headers: vec![],
            target,
            timeout: None,
            hash_on: None,
            retry: None,
        };
        // A header-conditioned route first: a TCP connection has no headers, it is skipped.
        let canary = crate::state::Route {
            headers: vec![("x-canary".into(), "1".into())],
            ..route(RouteTarget::Cluster("plain".into()))
        };
        config.hosts.insert(
            "198.18.0.10:5432".into(),
            Arc::new(vec![canary, route(RouteTarget::Cluster("db".into()))]),
        );
        config.hosts.insert(
            "198.18.0.11:5432".into(),
            Arc::new(vec![route(RouteTarget::Weighted(vec![
                ("db".into(), 50),
                ("plain".into(), 50),
            ]))]),
        );
        config.hosts.insert(
            "198.18.0.12:5432".into(),
            Arc::new(vec![route(RouteTarget::Cluster("remote".into()))]),
        );
        let remote = crate::state::Endpoint::new(
            crate::state::EndpointSpec {
                mtls_identity: Some(Arc::from("spiffe://cluster.local/ns/data/sa/db")),
                via: Some(Arc::new(crate::balance::Via {
                    gateways: vec!["198.19.0.31:15443".parse().expect("addr")],
                    identity: Arc::from("spiffe://cluster.local/ns/weft-system/sa/weft-gateway"),
                })),
                // The same address as the local `db` endpoint: another network's.
                ..crate::state::EndpointSpec::at("198.18.0.2:5432".parse().expect("addr"))
            },
            Arc::default(),
            Arc::new(crate::load::LocalityLoad::new("")),
        );
        for (name, ep) in [
            ("remote", remote),
            (
                "db",
                endpoint(
                    "198.18.0.2:5432",
                    Some("spiffe://cluster.local/ns/data/sa/db"),
                ),
            ),
            ("plain", endpoint("198.18.0.3:5432", None)),
        ] {
            config.clusters.insert(
                name.into(),
                crate::state::ClusterState {
                    eds_name: name.into(),
                    endpoints: Some(Arc::new(crate::state::Endpoints::new(
                        vec![vec![ep]],
                        140,
                        crate::balance::Algorithm::RoundRobin,
                    ))),
                    http2: false,
                    policy: Arc::default(),
                    runtime: Arc::default(),
                },
            );
        }
        config.mtls_identities.insert(
            "198.18.0.2:5432".parse().expect("addr"),
            Arc::from("spiffe://cluster.local/ns/data/sa/db"),
        );
        config
    }

    #[test]
    fn opaque_tcp_goes_as_mesh_mtls_to_meshed_endpoints_only() {
        let config = config();
        let db = TcpTarget::Mesh(
            "198.18.0.2:5432".parse().expect("addr"),
            Arc::from("spiffe://cluster.local/ns/data/sa/db"),
        );
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        // The endpoint by its own address (a headless Service's member).
        assert_eq!(tcp_target(&config, addr("198.18.0.2:5432"), 0), db);
        // The Service's address: its default route's cluster picks the meshed endpoint.
        for roll in 0..20 {
            assert_eq!(tcp_target(&config, addr("198.18.0.10:5432"), roll), db);
        }
        // A split: the meshed side over mTLS, the unmeshed side to the original destination.
        let split: Vec<TcpTarget> = (0..100u64)
            .map(|roll| tcp_target(&config, addr("198.18.0.11:5432"), roll))
            .collect();
        assert!(split.contains(&db), "{split:?}");
        assert!(
            split.contains(&TcpTarget::Plain(addr("198.18.0.11:5432"))),
            "{split:?}"
        );
        // An endpoint on another network: through its gateway, never by its address here.
        match tcp_target(&config, addr("198.18.0.12:5432"), 0) {
            TcpTarget::Gateway(a, id, via) => {
                assert_eq!(a, addr("198.18.0.2:5432"));
                assert_eq!(&*id, "spiffe://cluster.local/ns/data/sa/db");
                assert_eq!(via.gateways, [addr("198.19.0.31:15443")]);
            }
            other => panic!("{other:?}"),
        }
        // Addresses the mesh does not know, or a known address on another port: unchanged.
        for other in ["198.18.0.3:5432", "198.18.0.10:5433", "198.18.9.9:80"] {
            assert_eq!(
                tcp_target(&config, addr(other), 0),
                TcpTarget::Plain(addr(other))
            );
        }
    }
}
