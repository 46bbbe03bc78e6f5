//! The sidecar's Prometheus metrics: one registry, the handles each concern records into,
//! and cached handles for the hot path. A leaf module: every concern imports it, it imports no
//! other module of the crate; `admin` only serves what it renders.

use std::net::SocketAddr;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label set of one sample.
pub type Labels = Vec<(String, String)>;

/// Cached metric handles for the common outcome (a 200) of a cluster or an endpoint.
#[derive(Clone, Debug)]
pub struct Hot {
    /// The counter of 200s.
    pub ok: Counter,
    /// The latency histogram.
    pub latency: Histogram,
}

impl Hot {
    /// Counts a 200 that took `elapsed`.
    pub fn record(&self, elapsed: std::time::Duration) {
        self.ok.inc();
        self.latency.observe(elapsed.as_secs_f64());
    }
}

/// A lazily filled cache of [`Hot`] handles.
pub type HotCache = std::sync::OnceLock<Hot>;

/// The sidecar's metrics.
pub struct Metrics {
    registry: Registry,
    /// `weft_proxy_requests_total{direction,cluster,code}`.
    pub requests: Family<Labels, Counter>,
    /// `weft_proxy_request_duration_seconds{cluster}`.
    pub latency: Family<Labels, Histogram>,
    /// `weft_proxy_endpoint_requests_total{cluster,endpoint,outcome}`: tries per endpoint.
    pub endpoint_requests: Family<Labels, Counter>,
    /// `weft_proxy_endpoint_request_duration_seconds{cluster,endpoint}`.
    pub endpoint_latency: Family<Labels, Histogram>,
    /// `weft_proxy_retries_total{cluster}`.
    pub retries: Family<Labels, Counter>,
    /// `weft_proxy_overflows_total{cluster,reason}`: circuit breaker and retry budget refusals.
    pub overflows: Family<Labels, Counter>,
    /// `weft_proxy_ejections_total{cluster}`: outlier ejections.
    pub ejections: Family<Labels, Counter>,
    /// `weft_proxy_tcp_connections_total{direction,mtls}`: opaque TCP connections, and whether
    /// they crossed between sidecars as mesh mTLS.
    pub tcp_connections: Family<Labels, Counter>,
    /// `weft_proxy_connection_errors_total{listener}`: connections closed on protocol errors.
    pub connection_errors: Family<Labels, Counter>,
    /// `weft_proxy_connections_closed_total{listener,reason}`: connections the proxy closed
    /// on a limit (`max-connections`: over the listener's cap; `idle`: the idle timeout).
    pub connections_closed: Family<Labels, Counter>,
    /// `weft_gateway_connections_total{source_cluster,service,result}`: tunnels a gateway took
    /// (`forwarded`) or refused (`not-exported`, `handshake`, `bad-request`, `unreachable`,
    /// `timeout`, `no-certificate`, `not-meshed`, `max-connections`); `source_cluster` is the
    /// cluster whose intermediate issued the caller's verified certificate (`unknown` before).
    pub gateway_connections: Family<Labels, Counter>,
    /// `weft_proxy_dns_queries_total{answer}`: mesh DNS queries by how they ended (`mesh`,
    /// `nodata`, `forwarded`, `limited`, `failed`, `malformed`).
    pub dns_queries: Family<Labels, Counter>,
    /// `weft_proxy_spans_exported_total`.
    pub spans_exported: Counter,
    /// `weft_proxy_spans_dropped_total`: spans lost to a full queue or a failed export.
    pub spans_dropped: Counter,
    /// `weft_cert_expiry_seconds`: how long the current certificate lasts.
    pub cert_expiry_seconds: prometheus_client::metrics::gauge::Gauge,
    /// `weft_cert_renewals_total`.
    pub cert_renewals: Counter,
    /// `weft_cert_failures_total`: failed certificate requests.
    pub cert_failures: Counter,
    /// `weft_proxy_inbound_connections_total`.
    pub inbound_connections: Counter,
    /// `weft_proxy_inbound_requests_total{mtls,code}`: HTTP requests delivered to the app.
    pub inbound_requests: Family<Labels, Counter>,
    /// `weft_proxy_inbound_request_duration_seconds{mtls}`.
    pub inbound_latency: Family<Labels, Histogram>,
    /// `weft_proxy_inbound_refused_total{reason}`: inbound connections refused (plaintext in
    /// STRICT, failed handshakes, no certificate yet).
    pub inbound_refused: Family<Labels, Counter>,
    /// `weft_proxy_upstream_tls_failures_total{reason}`: mTLS to an endpoint failed.
    pub upstream_tls_failures: Family<Labels, Counter>,
    /// `weft_load_reports_total`: load reports sent to the control plane.
    pub load_reports: Counter,
    /// `weft_xds_updates_total`: accepted xDS responses.
    pub xds_updates: Counter,
    /// `weft_xds_nacks_total`: refused xDS responses.
    pub xds_nacks: Counter,
    /// `weft_xds_disconnects_total`.
    pub xds_disconnects: Counter,
    /// `weft_xds_resources{type}`: resources held, by type (listener, route, cluster, endpoint).
    pub xds_resources: Family<Labels, prometheus_client::metrics::gauge::Gauge>,
    /// `weft_proxy_discovery_fetches_total{result}`: first uses of a service-port that waited
    /// for its config on demand (`ok`, `timeout`).
    pub discovery_fetches: Family<Labels, Counter>,
    /// `weft_proxy_discovery_fetch_duration_seconds`: how long such a use waited.
    pub discovery_fetch_latency: Histogram,
    /// `weft_proxy_discovery_evictions_total`: idle service-ports unsubscribed.
    pub discovery_evictions: Counter,
    /// `weft_proxy_discovery_subscriptions{why}`: service-ports subscribed (`request`, `warm`).
    pub discovery_subscriptions: Family<Labels, prometheus_client::metrics::gauge::Gauge>,
    /// `weft_proxy_discovery_directory_services`: Services in the directory.
    pub discovery_directory: prometheus_client::metrics::gauge::Gauge,
    /// `weft_authz_denied_total{namespace,policy,rule}`: requests and connections an
    /// AuthorizationPolicy denied (a DENY rule; `policy=""` when no ALLOW rule matched).
    pub authz_denied: Family<Labels, Counter>,
    /// `weft_authz_audited_total{namespace,policy,rule}`: what an AUDIT rule matched.
    pub authz_audited: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 18,
    ))
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        let latency = Family::<Labels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let (inbound_connections, xds_updates, xds_nacks, xds_disconnects) = (
            Counter::default(),
            Counter::default(),
            Counter::default(),
            Counter::default(),
        );
        registry.register("weft_proxy_requests", "Requests proxied", requests.clone());
        registry.register(
            "weft_proxy_request_duration_seconds",
            "Request latency through the proxy",
            latency.clone(),
        );
        registry.register(
            "weft_proxy_inbound_connections",
            "Inbound connections",
            inbound_connections.clone(),
        );
        registry.register(
            "weft_xds_updates",
            "Accepted xDS responses",
            xds_updates.clone(),
        );
        registry.register(
            "weft_xds_nacks",
            "Refused (NACKed) xDS responses",
            xds_nacks.clone(),
        );
        registry.register(
            "weft_xds_disconnects",
            "xDS stream losses",
            xds_disconnects.clone(),
        );
        let xds_resources = Family::<Labels, prometheus_client::metrics::gauge::Gauge>::default();
        registry.register(
            "weft_xds_resources",
            "xDS resources held, by type (listener, route, cluster, endpoint)",
            xds_resources.clone(),
        );
        let discovery_fetches = Family::<Labels, Counter>::default();
        registry.register(
            "weft_proxy_discovery_fetches",
            "First uses of a service-port that waited for its config on demand, by result",
            discovery_fetches.clone(),
        );
        let discovery_fetch_latency = latency_histogram();
        registry.register(
            "weft_proxy_discovery_fetch_duration_seconds",
            "How long a first use waited for its service-port's config",
            discovery_fetch_latency.clone(),
        );
        let discovery_evictions = Counter::default();
        registry.register(
            "weft_proxy_discovery_evictions",
            "Idle service-ports unsubscribed",
            discovery_evictions.clone(),
        );
        let discovery_subscriptions =
            Family::<Labels, prometheus_client::metrics::gauge::Gauge>::default();
        registry.register(
            "weft_proxy_discovery_subscriptions",
            "Service-ports subscribed on demand, by why (request, warm)",
            discovery_subscriptions.clone(),
        );
        let discovery_directory = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "weft_proxy_discovery_directory_services",
            "Services in the on-demand directory",
            discovery_directory.clone(),
        );
        let load_reports = Counter::default();
        registry.register(
            "weft_load_reports",
            "Load reports sent to the control plane",
            load_reports.clone(),
        );
        let inbound_requests = Family::<Labels, Counter>::default();
        let inbound_latency = Family::<Labels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let inbound_refused = Family::<Labels, Counter>::default();
        let upstream_tls_failures = Family::<Labels, Counter>::default();
        let authz_denied = Family::<Labels, Counter>::default();
        let authz_audited = Family::<Labels, Counter>::default();
        registry.register(
            "weft_authz_denied",
            "Inbound requests and connections an AuthorizationPolicy denied, by policy and rule",
            authz_denied.clone(),
        );
        registry.register(
            "weft_authz_audited",
            "Inbound requests and connections an AUDIT policy matched, by policy and rule",
            authz_audited.clone(),
        );
        registry.register(
            "weft_proxy_inbound_requests",
            "HTTP requests delivered to the application, by mTLS and status",
            inbound_requests.clone(),
        );
        registry.register(
            "weft_proxy_inbound_request_duration_seconds",
            "Latency of inbound requests (the application's answer)",
            inbound_latency.clone(),
        );
        registry.register(
            "weft_proxy_inbound_refused",
            "Inbound connections refused, by reason",
            inbound_refused.clone(),
        );
        registry.register(
            "weft_proxy_upstream_tls_failures",
            "mTLS connections to endpoints that failed, by reason",
            upstream_tls_failures.clone(),
        );
        let endpoint_requests = Family::<Labels, Counter>::default();
        let endpoint_latency = Family::<Labels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "weft_proxy_endpoint_requests",
            "Tries per endpoint, by outcome",
            endpoint_requests.clone(),
        );
        registry.register(
            "weft_proxy_endpoint_request_duration_seconds",
            "Latency of tries per endpoint",
            endpoint_latency.clone(),
        );
        let cert_expiry_seconds = prometheus_client::metrics::gauge::Gauge::default();
        let (cert_renewals, cert_failures) = (Counter::default(), Counter::default());
        registry.register(
            "weft_cert_expiry_seconds",
            "Seconds until the workload certificate expires",
            cert_expiry_seconds.clone(),
        );
        registry.register(
            "weft_cert_renewals",
            "Workload certificates obtained",
            cert_renewals.clone(),
        );
        registry.register(
            "weft_cert_failures",
            "Failed workload certificate requests",
            cert_failures.clone(),
        );
        let (spans_exported, spans_dropped) = (Counter::default(), Counter::default());
        registry.register(
            "weft_proxy_spans_exported",
            "Spans exported over OTLP",
            spans_exported.clone(),
        );
        registry.register(
            "weft_proxy_spans_dropped",
            "Spans dropped (queue full or export failed)",
            spans_dropped.clone(),
        );
        let connection_errors = Family::<Labels, Counter>::default();
        registry.register(
            "weft_proxy_connection_errors",
            "Connections closed on a protocol error (garbage, slow or oversized request heads)",
            connection_errors.clone(),
        );
        let connections_closed = Family::<Labels, Counter>::default();
        registry.register(
            "weft_proxy_connections_closed",
            "Connections the proxy closed on a limit (reason max-connections or idle)",
            connections_closed.clone(),
        );
        let gateway_connections = Family::<Labels, Counter>::default();
        registry.register(
            "weft_gateway_connections",
            "East-west tunnels, by source cluster, destination service and result",
            gateway_connections.clone(),
        );
        let dns_queries = Family::<Labels, Counter>::default();
        registry.register(
            "weft_proxy_dns_queries",
            "Mesh DNS queries, by how they were answered",
            dns_queries.clone(),
        );
        let (retries, overflows, ejections, tcp_connections) = (
            Family::<Labels, Counter>::default(),
            Family::<Labels, Counter>::default(),
            Family::<Labels, Counter>::default(),
            Family::<Labels, Counter>::default(),
        );
        registry.register(
            "weft_proxy_tcp_connections",
            "Opaque TCP connections",
            tcp_connections.clone(),
        );
        registry.register("weft_proxy_retries", "Retries sent", retries.clone());
        registry.register(
            "weft_proxy_overflows",
            "Requests or retries refused by a circuit breaker or the retry budget",
            overflows.clone(),
        );
        registry.register(
            "weft_proxy_ejections",
            "Endpoints ejected by outlier detection",
            ejections.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            retries,
            overflows,
            ejections,
            tcp_connections,
            connection_errors,
            connections_closed,
            dns_queries,
            gateway_connections,
            spans_exported,
            spans_dropped,
            cert_expiry_seconds,
            cert_renewals,
            cert_failures,
            endpoint_requests,
            endpoint_latency,
            inbound_connections,
            xds_updates,
            xds_nacks,
            xds_disconnects,
            xds_resources,
            inbound_requests,
            inbound_latency,
            inbound_refused,
            upstream_tls_failures,
            load_reports,
            discovery_fetches,
            discovery_fetch_latency,
            discovery_evictions,
            discovery_subscriptions,
            discovery_directory,
            authz_denied,
            authz_audited,
        }
    }

    /// Counts an authorization decision: a denial (by the policy that decided, or by no
    /// ALLOW rule matching in `namespace`), and the AUDIT rule that matched.
    pub fn authz(&self, d: &weft_proto::rbac::Decision<'_>, namespace: &str) {
        let labels = |name: &str| -> Labels {
            let (ns, policy, rule) =
                weft_proto::rbac::parse_policy_name(name).unwrap_or((namespace, name, ""));
            vec![
                ("namespace".into(), ns.into()),
                ("policy".into(), policy.into()),
                ("rule".into(), rule.into()),
            ]
        };
        if let Some(a) = d.audit {
            self.authz_audited.get_or_create(&labels(a)).inc();
        }
        if !d.allowed {
            let l = match d.policy {
                Some(p) => labels(p),
                None => vec![
                    ("namespace".into(), namespace.into()),
                    ("policy".into(), String::new()),
                    ("rule".into(), String::new()),
                ],
            };
            self.authz_denied.get_or_create(&l).inc();
        }
    }

    /// Records one inbound HTTP request.
    pub fn inbound_request(&self, mtls: bool, code: u16, started: Instant) {
        let mtls = if mtls { "true" } else { "false" };
        self.inbound_requests
            .get_or_create(&vec![
                ("mtls".into(), mtls.into()),
                ("code".into(), code.to_string()),
            ])
            .inc();
        self.inbound_latency
            .get_or_create(&vec![("mtls".into(), mtls.into())])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Counts an inbound connection refused for `reason`.
    pub fn inbound_refused(&self, reason: &str) {
        self.inbound_refused
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    /// Counts a failed mTLS connection to an endpoint.
    pub fn upstream_tls_failure(&self, reason: &str) {
        self.upstream_tls_failures
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    /// The request counter for 200 and the latency histogram of `cluster`, to be cached by the
    /// cluster (the common case then formats and hashes no labels).
    pub fn hot_cluster(&self, cluster: &str) -> Hot {
        Hot {
            ok: self
                .requests
                .get_or_create(&vec![
                    ("direction".into(), "outbound".into()),
                    ("cluster".into(), cluster.into()),
                    ("code".into(), "200".into()),
                ])
                .clone(),
            latency: self
                .latency
                .get_or_create(&vec![("cluster".into(), cluster.into())])
                .clone(),
        }
    }

    /// The try counter for 200 and the latency histogram of one endpoint of `cluster`.
    pub fn hot_endpoint(&self, cluster: &str, endpoint: SocketAddr) -> Hot {
        let labels = vec![
            ("cluster".into(), cluster.into()),
            ("endpoint".into(), endpoint.to_string()),
        ];
        let mut with_outcome = labels.clone();
        with_outcome.push(("outcome".into(), "200".into()));
        Hot {
            ok: self.endpoint_requests.get_or_create(&with_outcome).clone(),
            latency: self.endpoint_latency.get_or_create(&labels).clone(),
        }
    }

    /// Records one outbound request.
    pub fn observe(&self, cluster: &str, code: u16, started: Instant) {
        self.requests
            .get_or_create(&vec![
                ("direction".into(), "outbound".into()),
                ("cluster".into(), cluster.into()),
                ("code".into(), code.to_string()),
            ])
            .inc();
        self.latency
            .get_or_create(&vec![("cluster".into(), cluster.into())])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Records one try against one endpoint (`outcome`: the status, or connect-failure,
    /// reset, timeout).
    pub fn attempt(
        &self,
        cluster: &str,
        endpoint: SocketAddr,
        outcome: &str,
        elapsed: std::time::Duration,
    ) {
        let labels = vec![
            ("cluster".into(), cluster.into()),
            ("endpoint".into(), endpoint.to_string()),
        ];
        let mut with_outcome = labels.clone();
        with_outcome.push(("outcome".into(), outcome.into()));
        self.endpoint_requests.get_or_create(&with_outcome).inc();
        self.endpoint_latency
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a retry.
    pub fn retry(&self, cluster: &str) {
        self.retries
            .get_or_create(&vec![("cluster".into(), cluster.into())])
            .inc();
    }

    /// Counts a refusal by a breaker (`reason`: `max-requests`, `retry-budget`).
    pub fn overflow(&self, cluster: &str, reason: &str) {
        self.overflows
            .get_or_create(&vec![
                ("cluster".into(), cluster.into()),
                ("reason".into(), reason.into()),
            ])
            .inc();
    }

    /// Counts an opaque TCP connection (`direction`: outbound or inbound).
    pub fn tcp_connection(&self, direction: &str, mtls: bool) {
        self.tcp_connections
            .get_or_create(&vec![
                ("direction".into(), direction.into()),
                ("mtls".into(), if mtls { "true" } else { "false" }.into()),
            ])
            .inc();
    }

    /// Counts a tunnel a gateway took or refused.
    pub fn gateway_connection(&self, source_cluster: &str, service: &str, result: &str) {
        self.gateway_connections
            .get_or_create(&vec![
                ("source_cluster".into(), source_cluster.into()),
                ("service".into(), service.into()),
                ("result".into(), result.into()),
            ])
            .inc();
    }

    /// Counts a mesh DNS query by how it ended.
    pub fn dns_query(&self, answer: &str) {
        self.dns_queries
            .get_or_create(&vec![("answer".into(), answer.into())])
            .inc();
    }

    /// Counts a connection the proxy closed on a limit (`max-connections`, `idle`).
    pub fn connection_closed(&self, listener: &str, reason: &str) {
        self.connections_closed
            .get_or_create(&vec![
                ("listener".into(), listener.into()),
                ("reason".into(), reason.into()),
            ])
            .inc();
    }

    /// Counts a connection closed on a protocol error (garbage, slowloris, oversized head).
    pub fn connection_error(&self, listener: &str) {
        self.connection_errors
            .get_or_create(&vec![("listener".into(), listener.into())])
            .inc();
    }

    /// Sets how many resources of `kind` the xDS client holds.
    pub fn xds_held(&self, kind: &str, n: usize) {
        self.xds_resources
            .get_or_create(&vec![("type".into(), kind.into())])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts an outlier ejection.
    pub fn ejection(&self, cluster: &str) {
        self.ejections
            .get_or_create(&vec![("cluster".into(), cluster.into())])
            .inc();
    }

    /// The Prometheus (OpenMetrics) text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.push_str("# encoding failed\n");
        }
        out
    }
}
