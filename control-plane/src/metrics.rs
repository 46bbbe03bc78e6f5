//! The control plane's Prometheus metrics and its small HTTP endpoint (`/metrics`, `/ready`,
//! `/live`) on `--metrics-addr`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::catalog::Model;

/// Label set of one metric sample.
pub type Labels = Vec<(String, String)>;

/// Every control-plane metric.
pub struct Metrics {
    registry: Registry,
    /// `weft_xds_connected_proxies`: ADS streams open now.
    pub connected_proxies: Gauge,
    /// `weft_xds_pushes_total{type}`: responses sent.
    pub pushes: Family<Labels, Counter>,
    /// `weft_xds_acks_total{type}`.
    pub acks: Family<Labels, Counter>,
    /// `weft_xds_nacks_total{type}`.
    pub nacks: Family<Labels, Counter>,
    /// `weft_xds_request_errors_total{reason}`: malformed requests refused.
    pub request_errors: Family<Labels, Counter>,
    /// `weft_xds_streams_aged_total`: streams this replica ended at their max age.
    pub streams_aged: Counter,
    /// `weft_xds_push_gate_timeouts_total`: large responses that gave their push-gate permit
    /// back because their stream's transport did not take them in time (a stalled client).
    pub push_gate_timeouts: Counter,
    /// `weft_catalog_version`.
    pub catalog_version: Gauge,
    /// `weft_catalog_services`.
    pub catalog_services: Gauge,
    /// `weft_catalog_endpoints`.
    pub catalog_endpoints: Gauge,
    /// `weft_source_errors`: current number of source/validation errors.
    pub source_errors: Gauge,
    /// `weft_source_error{file,object,field}`: 1 for every current error.
    pub source_error: Family<Labels, Gauge>,
    /// `weft_source_reloads_total`.
    pub source_reloads: Counter,
    /// `weft_tls_handshake_failures_total`: TLS handshakes refused on the gRPC port.
    pub tls_handshake_failures: Counter,
    /// `weft_grpc_connections_shed_total`: connections to the TLS port closed unserved,
    /// by `reason` (`handshakes`: too many handshakes in flight; `connections`: at the cap).
    pub grpc_connections_shed: Family<Labels, Counter>,
    /// `weft_certificates_issued_total`: SVIDs signed.
    pub certificates_issued: Counter,
    /// `weft_certificate_refusals_total{code}`: CSRs refused, by gRPC code.
    pub certificate_refusals: Family<Labels, Counter>,
    /// `weft_lrs_reports_total`: load reports received.
    pub lrs_reports: Counter,
    /// `weft_lrs_dropped_total`: per-cluster load stats refused, by `reason` (`no_xds_stream`:
    /// the reporter has no xDS stream with its identity; `not_in_view`: a cluster it was not
    /// sent; `too_many_zones`).
    pub lrs_dropped: Family<Labels, Counter>,
    /// `weft_lrs_requests_total{cluster,outcome}`: requests reported by proxies.
    pub lrs_requests: Family<Labels, Counter>,
    /// `weft_rollout_canary_weight{rollout}`: the canary's current weight, percent.
    pub rollout_weight: Family<Labels, Gauge>,
    /// `weft_rollout_decisions_total{rollout,decision}`: promote, hold, rollback, ...
    pub rollout_decisions: Family<Labels, Counter>,
    /// `weft_kube_status_writes_total{result}`: `Accepted` condition writes (`written`,
    /// `conflict`: refused with 409 and retried on a fresh copy, `error`).
    pub status_writes: Family<Labels, Counter>,
    /// `weft_federation_peer_up{peer}`: 1 while the import stream from the peer is synced.
    pub peer_up: Family<Labels, Gauge>,
    /// `weft_federation_peer_stale{peer}`: 1 while the peer's endpoints are kept stale.
    pub peer_stale: Family<Labels, Gauge>,
    /// `weft_federation_imported_endpoints{peer}`: endpoints imported from the peer.
    pub imported_endpoints: Family<Labels, Gauge>,
    /// `weft_federation_updates_total{peer,direction}`: updates received (import) or sent
    /// (export), heartbeats included.
    pub federation_updates: Family<Labels, Counter>,
    /// `weft_federation_refusals_total{peer,reason}`: streams or updates refused.
    pub federation_refusals: Family<Labels, Counter>,
    /// `weft_federation_exports`: peer control planes streaming our exports now.
    pub federation_exports: Gauge,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            connected_proxies: Gauge::default(),
            pushes: Family::default(),
            acks: Family::default(),
            nacks: Family::default(),
            request_errors: Family::default(),
            streams_aged: Counter::default(),
            push_gate_timeouts: Counter::default(),
            catalog_version: Gauge::default(),
            catalog_services: Gauge::default(),
            catalog_endpoints: Gauge::default(),
            source_errors: Gauge::default(),
            source_error: Family::default(),
            source_reloads: Counter::default(),
            tls_handshake_failures: Counter::default(),
            grpc_connections_shed: Family::default(),
            certificates_issued: Counter::default(),
            certificate_refusals: Family::default(),
            lrs_reports: Counter::default(),
            lrs_dropped: Family::default(),
            lrs_requests: Family::default(),
            rollout_weight: Family::default(),
            rollout_decisions: Family::default(),
            status_writes: Family::default(),
            peer_up: Family::default(),
            peer_stale: Family::default(),
            imported_endpoints: Family::default(),
            federation_updates: Family::default(),
            federation_refusals: Family::default(),
            federation_exports: Gauge::default(),
            ready: AtomicBool::new(false),
            registry: Registry::default(),
        };
        registry.register(
            "weft_xds_connected_proxies",
            "ADS streams open",
            m.connected_proxies.clone(),
        );
        registry.register("weft_xds_pushes", "xDS responses sent", m.pushes.clone());
        registry.register(
            "weft_federation_peer_up",
            "1 while the import stream from a peer control plane is synced",
            m.peer_up.clone(),
        );
        registry.register(
            "weft_federation_peer_stale",
            "1 while a lost peer's endpoints are kept, marked stale",
            m.peer_stale.clone(),
        );
        registry.register(
            "weft_federation_imported_endpoints",
            "Endpoints imported from a peer",
            m.imported_endpoints.clone(),
        );
        registry.register(
            "weft_federation_updates",
            "Federation updates received (import) or sent (export)",
            m.federation_updates.clone(),
        );
        registry.register(
            "weft_federation_refusals",
            "Federation streams or updates refused",
            m.federation_refusals.clone(),
        );
        registry.register(
            "weft_federation_exports",
            "Peer control planes streaming this cluster's exports",
            m.federation_exports.clone(),
        );
        registry.register("weft_xds_acks", "xDS responses ACKed", m.acks.clone());
        registry.register("weft_xds_nacks", "xDS responses NACKed", m.nacks.clone());
        registry.register(
            "weft_xds_streams_aged",
            "xDS streams ended at their max age (proxies reconnect, spreading over replicas)",
            m.streams_aged.clone(),
        );
        registry.register(
            "weft_xds_push_gate_timeouts",
            "Large xDS responses that gave their push-gate permit back because the client did not take them in time",
            m.push_gate_timeouts.clone(),
        );
        registry.register(
            "weft_xds_request_errors",
            "Malformed xDS requests refused",
            m.request_errors.clone(),
        );
        registry.register(
            "weft_catalog_version",
            "Catalog model version",
            m.catalog_version.clone(),
        );
        registry.register(
            "weft_catalog_services",
            "Services in the catalog",
            m.catalog_services.clone(),
        );
        registry.register(
            "weft_catalog_endpoints",
            "Endpoints in the catalog",
            m.catalog_endpoints.clone(),
        );
        registry.register(
            "weft_source_errors",
            "Current source and validation errors",
            m.source_errors.clone(),
        );
        registry.register(
            "weft_source_error",
            "One sample per current source error (file, object, field)",
            m.source_error.clone(),
        );
        registry.register(
            "weft_source_reloads",
            "Source reloads",
            m.source_reloads.clone(),
        );
        registry.register(
            "weft_grpc_connections_shed",
            "Connections to the TLS gRPC port closed unserved, by reason (handshakes, connections)",
            m.grpc_connections_shed.clone(),
        );
        registry.register(
            "weft_tls_handshake_failures",
            "TLS handshakes refused on the gRPC port",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "weft_certificates_issued",
            "Workload certificates signed",
            m.certificates_issued.clone(),
        );
        registry.register(
            "weft_certificate_refusals",
            "Certificate requests refused, by gRPC code",
            m.certificate_refusals.clone(),
        );
        registry.register(
            "weft_lrs_dropped",
            "Per-cluster load stats refused, by reason (no_xds_stream, not_in_view, too_many_zones)",
            m.lrs_dropped.clone(),
        );
        registry.register(
            "weft_lrs_reports",
            "Load reports received from proxies",
            m.lrs_reports.clone(),
        );
        registry.register(
            "weft_lrs_requests",
            "Requests reported by proxies, by cluster and outcome",
            m.lrs_requests.clone(),
        );
        registry.register(
            "weft_rollout_canary_weight",
            "A rollout's current canary weight, percent",
            m.rollout_weight.clone(),
        );
        registry.register(
            "weft_rollout_decisions",
            "Rollout decisions, by kind",
            m.rollout_decisions.clone(),
        );
        registry.register(
            "weft_kube_status_writes",
            "Accepted condition writes to the Kubernetes API, by result",
            m.status_writes.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts reported requests of `cluster`.
    pub fn observe_load(&self, cluster: &str, succeeded: u64, errored: u64) {
        for (outcome, n) in [("success", succeeded), ("error", errored)] {
            if n > 0 {
                self.lrs_requests
                    .get_or_create(&vec![
                        ("cluster".into(), cluster.into()),
                        ("outcome".into(), outcome.into()),
                    ])
                    .inc_by(n);
            }
        }
    }

    /// Updates the catalog gauges from a new model.
    pub fn observe_model(&self, model: &Model) {
        self.catalog_version.set(model.version as i64);
        self.catalog_services.set(model.services.len() as i64);
        self.catalog_endpoints.set(model.endpoint_count() as i64);
        self.source_errors.set(model.errors.len() as i64);
        self.source_error.clear();
        for e in &model.errors {
            self.source_error
                .get_or_create(&vec![
                    ("file".into(), e.file.clone()),
                    ("object".into(), e.object.clone()),
                    ("field".into(), e.field.clone()),
                ])
                .set(1);
        }
        if model.ready {
            self.ready.store(true, Ordering::Relaxed);
        }
    }

    /// True once the sources delivered their first view.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.push_str("# encoding failed\n");
        }
        out
    }
}

/// A label set with one `type` label (the xDS short name).
pub fn type_label(type_url: &str) -> Labels {
    vec![(
        "type".into(),
        weft_proto::type_url::short(type_url).to_string(),
    )]
}

/// Most connections the metrics port serves at once.
pub const METRICS_MAX_CONNECTIONS: usize = 256;
/// Most from one source address, so one host cannot crowd out the kubelet's probes.
pub const METRICS_MAX_CONNECTIONS_PER_SOURCE: usize = 8;
/// How long a metrics client gets to send its request headers.
pub const METRICS_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `/metrics`, `/ready` and `/live` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    // A scraper is one connection; this many at once is already a misbehaving client.
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_MAX_CONNECTIONS));
    let sources = crate::grpc_tls::PerSource::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(source) = sources.take(peer.ip(), METRICS_MAX_CONNECTIONS_PER_SOURCE) else {
            continue; // dropped: that source is at its cap (a probe comes from elsewhere)
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: at the cap
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = (slot, source);
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&req, &metrics)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn handle(req: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            let mut r = text(StatusCode::OK, metrics.render());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" if metrics.is_ready() => text(StatusCode::OK, "ready\n".into()),
        "/ready" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "sources not synced yet\n".into(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /ready, /live\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn from(src: &str, to: std::net::SocketAddr) -> tokio::net::TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(std::net::SocketAddr::new(src.parse().expect("ip"), 0))
            .expect("bind");
        socket.connect(to).await.expect("connect")
    }

    /// One host holding its share of idle connections cannot crowd out a probe from another.
    #[tokio::test]
    async fn one_source_cannot_crowd_out_the_probes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve(listener, Arc::new(Metrics::new())));
        let mut idle = Vec::new();
        for _ in 0..METRICS_MAX_CONNECTIONS_PER_SOURCE {
            idle.push(from("127.0.0.7", addr).await);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let mut extra = from("127.0.0.7", addr).await;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), extra.read(&mut buf))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert_eq!(n, 0, "the source's next connection is closed");
        let mut probe = from("127.0.0.8", addr).await;
        probe
            .write_all(b"GET /live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            probe.read_to_string(&mut answer),
        )
        .await
        .expect("answered in time")
        .expect("read");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}
