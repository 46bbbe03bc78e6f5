//! The sidecar's admin endpoint (15000): `/metrics`, `/ready`, `/live`, `/config_dump` (the
//! accepted config), `/clusters` (endpoints with health, priority, outstanding requests and
//! EWMA latency).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::xds::XdsHandle;

/// A response with a body and its content type.
pub fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

fn json(r: serde_json::Result<String>) -> Response<Full<Bytes>> {
    match r {
        Ok(s) => text(StatusCode::OK, s, "application/json"),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
            "text/plain",
        ),
    }
}

/// What `/certs` shows: the workload's identity, chain and trust bundle.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct CertsView {
    /// The SPIFFE ID, when the workload has a certificate.
    pub spiffe_id: Option<String>,
    /// Seconds until the leaf expires.
    pub expires_in_seconds: Option<i64>,
    /// Leaf, then intermediates.
    pub chain: Vec<weft_proto::tls::CertInfo>,
    /// Roots trusted (two while a root rotates).
    pub trust_bundle: Vec<weft_proto::tls::CertInfo>,
    /// Why there is no certificate, when there is none.
    pub note: Option<String>,
}

fn certs_view(svid: Option<&crate::identity::SvidCell>) -> CertsView {
    let current = svid.and_then(|s| s.load_full());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    CertsView {
        spiffe_id: current.as_ref().map(|s| s.spiffe_id.clone()),
        expires_in_seconds: current.as_ref().map(|s| s.expires_at_unix - now),
        chain: current
            .as_ref()
            .map(|s| weft_proto::tls::describe(&s.chain))
            .unwrap_or_default(),
        trust_bundle: current
            .as_ref()
            .map(|s| weft_proto::tls::describe(&s.trust_bundle))
            .unwrap_or_default(),
        note: match (svid, &current) {
            (None, _) => Some("no identity: the sidecar runs without --join-token".into()),
            (Some(_), None) => Some("waiting for the first certificate".into()),
            _ => None,
        },
    }
}

/// Whether the proxy is ready: every xDS type accepted and, with an identity, a certificate
/// held. Answers `/ready` on the admin and health listeners.
pub fn readiness(
    xds: &XdsHandle,
    svid: Option<&crate::identity::SvidCell>,
) -> (StatusCode, &'static str) {
    let has_cert = svid.is_none_or(|s| s.load().is_some());
    match (*xds.ready.borrow(), has_cert) {
        (true, true) => (StatusCode::OK, "ready\n"),
        (_, false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the workload certificate\n",
        ),
        (false, true) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first config of every xDS type\n",
        ),
    }
}

fn handle(
    path: &str,
    xds: &XdsHandle,
    svid: Option<&crate::identity::SvidCell>,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    match path {
        "/live" => text(StatusCode::OK, "live\n".into(), "text/plain"),
        "/ready" => {
            let (status, body) = readiness(xds, svid);
            text(status, body.into(), "text/plain")
        }
        "/certs" => json(serde_json::to_string_pretty(&certs_view(svid))),
        "/metrics" => text(
            StatusCode::OK,
            metrics.render(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/config_dump" => json(serde_json::to_string_pretty(&**xds.config.load())),
        "/clusters" => json(serde_json::to_string_pretty(&xds.config.load().clusters)),
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics /ready /live /config_dump /clusters /certs\n".into(),
            "text/plain",
        ),
    }
}

/// Serves the admin endpoint until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    xds: XdsHandle,
    svid: Option<crate::identity::SvidCell>,
    metrics: Arc<Metrics>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                crate::accept::failed("admin", &e).await;
                continue;
            }
        };
        let (xds, svid, metrics) = (xds.clone(), svid.clone(), metrics.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let r = handle(req.uri().path(), &xds, svid.as_ref(), &metrics);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
