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
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use weft_proto::keys::PROXY_REASON_HEADER;

use crate::admin::Metrics;
use crate::state::{HashOn, RouteTarget};
use crate::xds::XdsHandle;

/// Response body of the proxy.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The outbound proxy.
pub struct Outbound {
    listener: TcpListener,
    xds: XdsHandle,
    metrics: Arc<Metrics>,
    client: Client<HttpConnector, Incoming>,
    namespace: String,
}

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
        namespace: String,
        xds: XdsHandle,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(std::time::Duration::from_secs(1)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .build(connector);
        Ok(Outbound {
            listener,
            xds,
            metrics,
            client,
            namespace,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the task is dropped.
    pub async fn run(self) {
        let this = Arc::new(self);
        loop {
            let (stream, peer) = match this.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "outbound accept failed");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let this = this.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.handle(req, peer).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                    tracing::debug!(%peer, error = %e, "outbound connection closed with an error");
                }
            });
        }
    }

    async fn handle(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        let authority = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                req.headers()
                    .get(hyper::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        let config = self.xds.config.load();
        let Some(routes) = config.routes_for(&authority, &self.namespace) else {
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
        let Some(target) = config
            .clusters
            .get(&cluster)
            .and_then(|c| c.endpoints.as_ref())
            .and_then(|e| e.pick(rand::random::<u64>(), hash))
        else {
            self.metrics.observe(&cluster, 503, started);
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-healthy-endpoints",
                format!("weft: cluster {cluster} has no healthy endpoint"),
            );
        };
        let timeout = route.timeout;
        let endpoint = target.addr;
        let stats = target.stats.clone();
        drop(config);
        let _in_flight = stats.start();
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        let uri = match format!("http://{endpoint}{pq}").parse() {
            Ok(u) => u,
            Err(_) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "bad-uri",
                    format!("weft: cannot forward {pq:?}"),
                );
            }
        };
        *req.uri_mut() = uri;
        if req.headers().get(hyper::header::HOST).is_none()
            && let Ok(v) = hyper::header::HeaderValue::from_str(&authority)
        {
            req.headers_mut().insert(hyper::header::HOST, v);
        }
        *req.version_mut() = hyper::Version::HTTP_11;
        let fut = self.client.request(req);
        let result = match timeout {
            Some(t) => match tokio::time::timeout(t, fut).await {
                Ok(r) => r,
                Err(_) => {
                    self.metrics.observe(&cluster, 504, started);
                    return refuse(
                        StatusCode::GATEWAY_TIMEOUT,
                        "timeout",
                        format!("weft: {cluster} did not answer within {t:?}"),
                    );
                }
            },
            None => fut.await,
        };
        match result {
            Ok(resp) => {
                self.metrics
                    .observe(&cluster, resp.status().as_u16(), started);
                resp.map(|b| b.boxed())
            }
            Err(e) => {
                self.metrics.observe(&cluster, 503, started);
                refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream-failure",
                    format!("weft: {cluster} endpoint {endpoint}: {e}"),
                )
            }
        }
    }
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
