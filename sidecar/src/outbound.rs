//! Outbound: HTTP requests from the local application, routed by authority, path and headers to
//! a (weighted) cluster, then an endpoint by priority, then a pooled hyper connection.
//!
//! Explicit mode (DESIGN.md): a request sent straight to the outbound address is routed by its
//! `Host`/`:authority`; a host the mesh does not know gets 404 with a reason header.
//! Transparent interception (SO_ORIGINAL_DST), protocol detection and the resilience layers
//! are not built yet; this is the seam they plug into.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body as _, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use weft_proto::keys::PROXY_REASON_HEADER;

use crate::admin::Metrics;
use crate::balance::Target;
use crate::detect::{self, Protocol};
use crate::resilience::{
    CONNECT_FAILURE_EJECTION, ClusterPolicy, ClusterRuntime, Outcome, RetryPolicy,
};
use crate::state::{Endpoints, HashOn, RouteTarget};
use crate::telemetry::{FinishedSpan, TRACEPARENT, TraceContext, Tracer};
use crate::xds::XdsHandle;
use tracing::Instrument;

/// Response body of the proxy.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The outbound listener and the proxy behind it.
pub struct Outbound {
    listener: TcpListener,
    proxy: Arc<Proxy>,
}

/// What every outbound connection shares.
struct Proxy {
    xds: XdsHandle,
    metrics: Arc<Metrics>,
    client: Client<HttpConnector, Body>,
    /// mTLS to meshed endpoints, when this workload has an identity.
    mesh: Option<(
        Client<crate::connect::MeshConnector, Body>,
        crate::identity::SvidCell,
    )>,
    namespace: String,
    server_first_ports: Vec<u16>,
    header_read_timeout: Duration,
    tracer: Tracer,
}

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Answers with a status and a reason header (a request the proxy refused itself).
pub fn refuse(status: StatusCode, reason: &'static str, detail: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(detail + "\n"))
            .map_err(|n| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        PROXY_REASON_HEADER,
        hyper::header::HeaderValue::from_static(reason),
    );
    r
}

impl Outbound {
    /// Binds the listener.
    pub async fn bind(
        addr: SocketAddr,
        ctx: crate::ListenerContext,
        tracer: Tracer,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let mesh = ctx.svid.map(|svid| {
            let connector = crate::connect::MeshConnector::new(
                svid.clone(),
                ctx.xds.clone(),
                ctx.metrics.clone(),
            );
            (crate::connect::pooled(connector), svid)
        });
        Ok(Outbound {
            listener,
            proxy: Arc::new(Proxy {
                xds: ctx.xds,
                metrics: ctx.metrics,
                client: crate::connect::pooled(crate::connect::plain()),
                mesh,
                namespace: ctx.namespace,
                server_first_ports: ctx.server_first_ports,
                header_read_timeout: ctx.header_read_timeout,
                tracer,
            }),
        })
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
                    tracing::warn!(error = %e, "outbound accept failed");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let this = this.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
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

impl Proxy {
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
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        if let Err(e) = watcher.watch(conn).await {
            tracing::info!(%peer, error = %e, "outbound connection closed on a protocol error");
            self.metrics.connection_error("outbound");
        }
    }

    /// Opaque TCP: forwarded byte for byte to where the client was going.
    async fn opaque(&self, mut client: TcpStream, peer: SocketAddr, dst: SocketAddr) {
        self.metrics.tcp_connection("outbound");
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(dst)).await {
            Ok(Ok(mut upstream)) => {
                let _ = upstream.set_nodelay(true);
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    tracing::debug!(%peer, %dst, error = %e, "opaque connection ended");
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(%peer, %dst, error = %e, "opaque: cannot reach the original destination")
            }
            Err(_) => tracing::debug!(%peer, %dst, "opaque: connect timed out"),
        }
    }

    /// A request for a host the mesh does not know, sent on to its original destination.
    async fn passthrough(
        &self,
        req: Request<Incoming>,
        dst: SocketAddr,
        started: Instant,
    ) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let uri = match forward_uri("http", dst, &parts.uri) {
            Ok(u) => u,
            Err(msg) => return refuse(StatusCode::BAD_REQUEST, "bad-uri", msg),
        };
        let mut out = Request::new(body.boxed());
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
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse);
        let trace = TraceContext::child_of(parent.as_ref());
        if let Ok(v) = hyper::header::HeaderValue::from_str(&trace.header()) {
            req.headers_mut().insert(TRACEPARENT, v);
        }
        // Span attributes are built only when the span will be exported: nothing extra is
        // allocated on the request path otherwise.
        let exporting = self.tracer.enabled() && trace.sampled;
        let start = std::time::SystemTime::now();
        let attributes = exporting.then(|| {
            vec![
                ("http.request.method", req.method().to_string()),
                ("url.path", req.uri().path().to_string()),
                ("server.address", request_authority(&req)),
            ]
        });
        let span = tracing::debug_span!("request", trace_id = %trace.header());
        let resp = self.route(req, peer, orig).instrument(span).await;
        if let Some(mut attributes) = attributes {
            let status = resp.status();
            attributes.push(("http.response.status_code", status.as_str().to_string()));
            if let Some(reason) = resp
                .headers()
                .get(PROXY_REASON_HEADER)
                .and_then(|v| v.to_str().ok())
            {
                attributes.push(("weft.reason", reason.to_string()));
            }
            let span = FinishedSpan {
                context: trace,
                parent: parent.map(|p| p.span_id),
                name: "weft.outbound",
                start,
                end: std::time::SystemTime::now(),
                attributes,
                error: status.is_server_error(),
            };
            self.tracer.record(span, &self.metrics);
        }
        resp
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        orig: Option<SocketAddr>,
    ) -> Response<Body> {
        let started = Instant::now();
        let authority = request_authority(&req);
        let config = self.xds.config.load();
        // By name first; an intercepted client that dialed a Service IP is found by that IP.
        let routes = config
            .routes_for(&authority, &self.namespace)
            .or_else(|| orig.and_then(|dst| config.hosts.get(&dst.to_string())));
        let Some(routes) = routes else {
            if let Some(dst) = orig {
                drop(config);
                return self.passthrough(req, dst, started).await;
            }
            self.metrics.observe("", 404, started);
            return refuse(
                StatusCode::NOT_FOUND,
                "no-route",
                format!("weft: no mesh service answers to host {authority:?}"),
            );
        };
        let path = req.uri().path().to_string();
        let Some(route) = routes.iter().find(|r| r.matches(&path, req.headers())) else {
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
        let Some((endpoints, policy, runtime)) = config
            .clusters
            .get(&cluster)
            .and_then(|c| Some((c.endpoints.clone()?, c.policy.clone(), c.runtime.clone())))
        else {
            self.metrics.observe(&cluster, 503, started);
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-healthy-endpoints",
                format!("weft: cluster {cluster} has no endpoints"),
            );
        };
        drop(config);

        // Circuit breaker: answer at once rather than queue behind a saturated cluster.
        let Some(_request_slot) = runtime.request(&policy) else {
            self.metrics.overflow(&cluster, "max-requests");
            self.metrics.observe(&cluster, 503, started);
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "overflow",
                format!(
                    "weft: {cluster} has {} requests in flight (max_requests)",
                    policy.max_requests
                ),
            );
        };
        let attempts = Attempts {
            this: self,
            cluster: &cluster,
            endpoints: &endpoints,
            policy: &policy,
            runtime: &runtime,
            retry: Some(retry.as_deref().unwrap_or(&DEFAULT_RETRY)),
            hash,
            authority: &authority,
        };
        let resp = match timeout {
            Some(t) => match tokio::time::timeout(t, attempts.run(req)).await {
                Ok(r) => r,
                Err(_) => refuse(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!("weft: {cluster} did not answer within {t:?}"),
                ),
            },
            None => attempts.run(req).await,
        };
        self.metrics
            .observe(&cluster, resp.status().as_u16(), started);
        resp
    }
}

/// The retry policy of routes without one (connect failures only).
static DEFAULT_RETRY: std::sync::LazyLock<RetryPolicy> =
    std::sync::LazyLock::new(RetryPolicy::connect_failure_default);

/// Largest request body kept in memory so a request can be retried; larger (or unknown-size)
/// bodies stream through and are not retried.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// One request's tries against one cluster.
struct Attempts<'a> {
    this: &'a Proxy,
    cluster: &'a str,
    endpoints: &'a Endpoints,
    policy: &'a ClusterPolicy,
    runtime: &'a ClusterRuntime,
    retry: Option<&'a RetryPolicy>,
    hash: Option<u64>,
    authority: &'a str,
}

impl Attempts<'_> {
    async fn run(&self, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        // A body can be replayed only if it is small and whole in memory.
        let replayable = self.retry.is_some()
            && body
                .size_hint()
                .upper()
                .is_some_and(|n| n <= MAX_REPLAY_BODY);
        let (replay, mut streaming) = if replayable {
            match body.collect().await {
                Ok(b) => (Some(b.to_bytes()), None),
                Err(e) => {
                    return refuse(
                        StatusCode::BAD_REQUEST,
                        "bad-request-body",
                        format!("weft: reading the request body: {e}"),
                    );
                }
            }
        } else {
            (None, Some(body))
        };
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut retries = 0u32;
        let mut retry_slot = None;
        loop {
            let Some(target) = self.pick(&tried) else {
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no-healthy-endpoints",
                    format!("weft: cluster {} has no healthy endpoint", self.cluster),
                );
            };
            let body: Body = match (&replay, streaming.take()) {
                (Some(bytes), _) => Full::new(bytes.clone()).map_err(|n| match n {}).boxed(),
                (None, Some(b)) => b.boxed(),
                (None, None) => Full::new(Bytes::new()).map_err(|n| match n {}).boxed(),
            };
            // mTLS when the endpoint's sidecar terminates it and this workload has an SVID.
            let mesh = self.this.mesh.as_ref().filter(|(_, svid)| {
                target.mtls_identity.is_some() && svid.load().as_ref().is_some_and(|s| s.valid())
            });
            let req = match self.request(&parts, target.addr, body, mesh.is_some()) {
                Ok(r) => r,
                Err(msg) => return refuse(StatusCode::BAD_REQUEST, "bad-uri", msg),
            };
            let stats = target.stats.clone();
            let in_flight = stats.start();
            let started = Instant::now();
            let fut = match mesh {
                Some((client, _)) => client.request(req),
                None => self.this.client.request(req),
            };
            let per_try = self.retry.and_then(|r| r.per_try_timeout);
            let result = match per_try {
                Some(t) => tokio::time::timeout(t, fut).await.map_err(|_| ()),
                None => Ok(fut.await),
            };
            drop(in_flight);
            let (outcome, resp) = match result {
                Ok(Ok(resp)) => {
                    stats.observe(started.elapsed());
                    (Outcome::Status(resp.status().as_u16()), Some(resp))
                }
                Ok(Err(e)) if e.is_connect() => (Outcome::ConnectFailure, None),
                Ok(Err(_)) => (Outcome::Reset, None),
                Err(()) => (Outcome::Timeout, None),
            };
            let label = match outcome {
                Outcome::Status(code) => code.to_string(),
                Outcome::ConnectFailure => "connect-failure".into(),
                Outcome::Reset => "reset".into(),
                Outcome::Timeout => "timeout".into(),
            };
            self.this
                .metrics
                .attempt(self.cluster, target.addr, &label, started.elapsed());
            let outlier = match (&self.policy.outlier, outcome) {
                (Some(o), _) => Some(o),
                (None, Outcome::ConnectFailure) => Some(&CONNECT_FAILURE_EJECTION),
                (None, _) => None,
            };
            let ejected = stats.record_outcome(outcome, outlier, || {
                outlier.is_some_and(|o| self.endpoints.may_eject(o.max_ejection_percent))
            });
            if ejected {
                tracing::warn!(cluster = self.cluster, endpoint = %target.addr, ?outcome, "outlier ejected");
                self.this.metrics.ejection(self.cluster);
                self.endpoints.note_ejection(stats.ejected_for());
            }
            let may_retry = self
                .retry
                .is_some_and(|p| p.retriable(outcome) && retries < p.attempts)
                && (replay.is_some() || streaming.is_some());
            if may_retry {
                // A retry holds one budget slot while it is in flight (Envoy's "active retries").
                retry_slot = None;
                match self.runtime.retry(self.policy) {
                    Some(slot) => {
                        retry_slot = Some(slot);
                        let wait = self.retry.map_or(Duration::ZERO, |p| {
                            p.backoff(retries, rand::random::<f64>())
                        });
                        retries += 1;
                        tried.push(target.addr);
                        self.this.metrics.retry(self.cluster);
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    None => self.this.metrics.overflow(self.cluster, "retry-budget"),
                }
            }
            drop(retry_slot);
            return match (outcome, resp) {
                (_, Some(resp)) => resp.map(|b| b.boxed()),
                (Outcome::Timeout, None) => refuse(
                    StatusCode::GATEWAY_TIMEOUT,
                    "per-try-timeout",
                    format!(
                        "weft: {} endpoint {} did not answer in time",
                        self.cluster, target.addr
                    ),
                ),
                (o, None) => refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream-failure",
                    format!("weft: {} endpoint {}: {o:?}", self.cluster, target.addr),
                ),
            };
        }
    }

    /// Picks an endpoint, preferring one not tried yet for this request.
    fn pick(&self, tried: &[SocketAddr]) -> Option<Target> {
        let mut last = None;
        for _ in 0..4 {
            let t = self.endpoints.pick(rand::random::<u64>(), self.hash)?;
            if !tried.contains(&t.addr) {
                return Some(t.clone());
            }
            last = Some(t.clone());
        }
        last
    }

    fn request(
        &self,
        parts: &http::request::Parts,
        endpoint: SocketAddr,
        body: Body,
        mtls: bool,
    ) -> Result<Request<Body>, String> {
        // The scheme only keys the pool (mTLS and plaintext connections never mix); the
        // connector decides how to connect.
        let scheme = if mtls { "https" } else { "http" };
        let uri = forward_uri(scheme, endpoint, &parts.uri)?;
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = parts.headers.clone();
        if !req.headers().contains_key(hyper::header::HOST)
            && let Ok(v) = hyper::header::HeaderValue::from_str(self.authority)
        {
            req.headers_mut().insert(hyper::header::HOST, v);
        }
        Ok(req)
    }
}

/// The URI of a request forwarded to `to`: its path and query on `scheme://to`.
pub fn forward_uri(scheme: &str, to: SocketAddr, uri: &hyper::Uri) -> Result<hyper::Uri, String> {
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    format!("{scheme}://{to}{pq}")
        .parse()
        .map_err(|_| format!("weft: cannot forward {pq:?}"))
}

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
}
