//! The Kubernetes objects Weft reads, parsed and validated into typed values.
//!
//! Every source (the file source today, the Kubernetes source later) turns one object's JSON
//! into an [`Object`] through [`parse_object`], so the same input gets the same verdict and the
//! same message wherever it comes from. Errors name the object and the field path
//! (`spec.backends[1].weight`), never just "invalid".

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use weft_proto::tls::MtlsMode;

/// The identity of an object in the world: kind, namespace, name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectKey {
    /// `Service`, `EndpointSlice`, ... (the Kubernetes kind).
    pub kind: &'static str,
    /// Empty for cluster-scoped kinds (Node).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Why one object was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: field {field}: {message}")]
pub struct ObjectError {
    /// `Kind ns/name`, or what could be read of it.
    pub object: String,
    /// Path of the offending field, e.g. `spec.ports[0].port`.
    pub field: String,
    /// What is wrong and, where it helps, what is expected.
    pub message: String,
}

/// A parsed, validated object of a kind Weft understands.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    /// `v1 Service`.
    Service(Box<Service>),
    /// `discovery.k8s.io/v1 EndpointSlice`.
    EndpointSlice(Box<EndpointSlice>),
    /// `v1 Node`: only its topology labels matter.
    Node(Box<Node>),
    /// `v1 Pod`: its service account and node matter.
    Pod(Box<Pod>),
    /// `v1 Namespace` (its `weft.dev/mtls-mode` annotation).
    Namespace(Box<k8s_openapi::api::core::v1::Namespace>),
    /// SMI `split.smi-spec.io/v1alpha4 TrafficSplit`.
    TrafficSplit(Box<Named<TrafficSplitSpec>>),
    /// Gateway API `gateway.networking.k8s.io/v1 HTTPRoute` (GAMMA: parentRef a Service).
    HttpRoute(Box<Named<HttpRouteSpec>>),
    /// MCS `multicluster.x-k8s.io/v1alpha1 ServiceExport`.
    /// A ServiceExport; its spec is its `metadata.creationTimestamp` in seconds (when the
    /// Service got its clusterset name: what orders clusterset VIP collisions).
    ServiceExport(Named<Option<i64>>),
    /// Weft's own `weft.dev/v1alpha1 TrafficPolicy`.
    TrafficPolicy(Box<Named<TrafficPolicySpec>>),
    /// Weft's own `weft.dev/v1alpha1 Rollout`: progressive delivery of a TrafficSplit's canary.
    Rollout(Box<Named<RolloutSpec>>),
    /// Weft's own cluster-scoped `weft.dev/v1alpha1 MeshPeer`: another cluster's control
    /// plane to federate with; `metadata.name` is that cluster's name.
    MeshPeer(Box<Named<MeshPeerSpec>>),
    /// `weft.dev/v1alpha1 PeerAuthentication`, or Istio's `security.istio.io/v1` (and
    /// `v1beta1`) of the same shape: how the selected workloads accept inbound connections.
    PeerAuthentication(Box<Named<PeerAuthenticationSpec>>),
    /// Istio's `security.istio.io/v1` (or `v1beta1`) PeerAuthentication, read as Weft's own;
    /// a separate kind so one of each with the same name can coexist.
    IstioPeerAuthentication(Box<Named<PeerAuthenticationSpec>>),
    /// Istio's `security.istio.io/v1` (or `v1beta1`) AuthorizationPolicy: who may call the
    /// selected workloads (`crate::authz`).
    AuthorizationPolicy(Box<Named<crate::authz::AuthorizationPolicySpec>>),
    /// `networking.k8s.io/v1 NetworkPolicy`: read for `weftctl check` only (`crate::netpol`);
    /// enforcing it is the CNI's job.
    NetworkPolicy(Box<k8s_openapi::api::networking::v1::NetworkPolicy>),
}

/// The object-key kind of Istio's PeerAuthentication (kubectl's `kind.group` spelling).
pub const ISTIO_PEER_AUTHENTICATION: &str = "PeerAuthentication.security.istio.io";

/// How workloads accept inbound connections, shaped like Istio's
/// `security.istio.io/v1 PeerAuthentication` (Weft reads both kinds the same way).
///
/// Without `selector` it covers its namespace; in the control plane's root namespace
/// (`weft-system`) it is the mesh-wide default. With `selector` it covers the pods whose
/// labels match, and `portLevelMtls` overrides the mode per container port.
#[derive(
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    Deserialize,
    Serialize,
    schemars::JsonSchema,
    kube::CustomResource,
)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    namespaced,
    status = "ObjectStatus",
    shortname = "wpa",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mtls.mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// The pods it covers (by label); absent: the whole namespace.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// The mode; absent or `UNSET`: inherited from the namespace (then the mesh).
    #[serde(default)]
    pub mtls: Option<PeerMtls>,
    /// Per container port (the key, `"8080"`): a mode overriding `mtls` on that port.
    /// Needs `selector`, as in Istio.
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, PeerMtls>,
}

/// Which pods a policy covers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Every label here must be on the pod; empty: every pod of the namespace.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// One mTLS setting of a PeerAuthentication.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerMtls {
    /// `STRICT`, `PERMISSIVE`, `DISABLE`, or `UNSET` (inherit).
    #[serde(default)]
    pub mode: Option<String>,
}

impl PeerMtls {
    /// The mode it sets; `None` for `UNSET` or no mode (inherit). Validated at parse time.
    pub fn mode(&self) -> Option<MtlsMode> {
        match self.mode.as_deref() {
            None | Some("UNSET") => None,
            Some(m) => MtlsMode::parse(m).ok(),
        }
    }
}

impl PeerAuthenticationSpec {
    /// The port overrides, by container port (validated at parse time).
    pub fn port_modes(&self) -> BTreeMap<u16, MtlsMode> {
        self.port_level_mtls
            .iter()
            .filter_map(|(p, m)| Some((p.parse().ok()?, m.mode()?)))
            .collect()
    }
}

/// Where a peer control plane's TLS gRPC port is.
#[derive(
    Clone, Debug, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema, kube::CustomResource,
)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "MeshPeer",
    status = "ObjectStatus",
    shortname = "mp",
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".spec.address"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshPeerSpec {
    /// `HOST:PORT` of the peer's TLS gRPC port (15012), e.g. its east-west load balancer.
    pub address: String,
    /// The peer's network. When set and not this cluster's (`--network`), its pods are not
    /// reachable from here: callers reach its endpoints through `gateways`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// `IP:PORT` of the peer's east-west gateway replicas, as reachable from this network;
    /// required with a `network` other than this cluster's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// The SPIFFE ID the peer's gateways prove (default
    /// `spiffe://<trust domain>/ns/weft-system/sa/weft-gateway`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_identity: Option<String>,
}

/// Checks a peer address is `HOST:PORT` (IPv6 hosts in brackets).
pub fn check_peer_address(address: &str) -> Result<(), String> {
    if let Ok(a) = address.parse::<std::net::SocketAddr>() {
        return match a.port() {
            0 => Err(format!("{address:?}: port 0 is not 1-65535")),
            _ => Ok(()),
        };
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!("{address:?}: expected HOST:PORT"));
    };
    if host.is_empty() || host.contains(['[', ']', '/', ' ']) {
        return Err(format!("{address:?}: expected HOST:PORT"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{address:?}: port {port:?} is not 1-65535")),
    }
}

/// A namespaced object of one of the small kinds Weft owns or borrows: name, namespace, spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Named<T> {
    /// `metadata.namespace` (defaulted to `default`).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The validated spec.
    pub spec: T,
    /// The object's `status` as the source holds it (a Rollout's phase and weight, written by
    /// the leading control plane, is how the other replicas follow it).
    pub status: Option<serde_json::Value>,
}

impl Object {
    /// The object's key.
    pub fn key(&self) -> ObjectKey {
        fn meta(
            m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        ) -> (String, String) {
            (
                m.namespace.clone().unwrap_or_else(|| "default".into()),
                m.name.clone().unwrap_or_default(),
            )
        }
        let (kind, (namespace, name)) = match self {
            Object::Service(o) => ("Service", meta(&o.metadata)),
            Object::EndpointSlice(o) => ("EndpointSlice", meta(&o.metadata)),
            Object::Node(o) => (
                "Node",
                (String::new(), o.metadata.name.clone().unwrap_or_default()),
            ),
            Object::Pod(o) => ("Pod", meta(&o.metadata)),
            Object::Namespace(o) => (
                "Namespace",
                (String::new(), o.metadata.name.clone().unwrap_or_default()),
            ),
            Object::TrafficSplit(o) => ("TrafficSplit", (o.namespace.clone(), o.name.clone())),
            Object::HttpRoute(o) => ("HTTPRoute", (o.namespace.clone(), o.name.clone())),
            Object::ServiceExport(o) => ("ServiceExport", (o.namespace.clone(), o.name.clone())),
            Object::TrafficPolicy(o) => ("TrafficPolicy", (o.namespace.clone(), o.name.clone())),
            Object::Rollout(o) => ("Rollout", (o.namespace.clone(), o.name.clone())),
            Object::MeshPeer(o) => ("MeshPeer", (String::new(), o.name.clone())),
            Object::PeerAuthentication(o) => {
                ("PeerAuthentication", (o.namespace.clone(), o.name.clone()))
            }
            Object::IstioPeerAuthentication(o) => (
                ISTIO_PEER_AUTHENTICATION,
                (o.namespace.clone(), o.name.clone()),
            ),
            Object::AuthorizationPolicy(o) => {
                (crate::authz::KIND, (o.namespace.clone(), o.name.clone()))
            }
            Object::NetworkPolicy(o) => ("NetworkPolicy", meta(&o.metadata)),
        };
        ObjectKey {
            kind,
            namespace,
            name,
        }
    }
}

/// SMI TrafficSplit spec: the root service and its weighted backends.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficSplitSpec {
    /// The root (apex) service clients call.
    pub service: String,
    /// The services that receive the traffic, with weights.
    pub backends: Vec<SplitBackend>,
    /// SMI route-group matches; Weft does not support them and refuses a split that sets them.
    #[serde(default)]
    pub matches: Option<serde_json::Value>,
}

/// One backend of a TrafficSplit.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SplitBackend {
    /// Backend service name, same namespace.
    pub service: String,
    /// Relative weight, non-negative.
    pub weight: u32,
}

/// Gateway API HTTPRoute spec, the GAMMA subset Weft serves.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    /// Parents: Services (GAMMA). Gateways are ignored.
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// Hostnames are meaningless for GAMMA routes and ignored.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Ordered rules.
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

/// A parent reference.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// `""` or `core` for a Service.
    #[serde(default)]
    pub group: Option<String>,
    /// `Service` for GAMMA.
    #[serde(default)]
    pub kind: Option<String>,
    /// Parent name.
    pub name: String,
    /// Parent namespace; the route's own when absent.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Restricts the route to one Service port.
    #[serde(default)]
    pub port: Option<u16>,
}

/// One HTTPRoute rule.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    /// Any of these matches selects the rule; none means every request.
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
    /// Retries (Gateway API HTTPRouteRetry).
    #[serde(default)]
    pub retry: Option<HttpRouteRetry>,
}

/// One match of an HTTPRoute rule.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    /// Path match.
    #[serde(default)]
    pub path: Option<PathMatchSpec>,
    /// Header matches, all must hold.
    #[serde(default)]
    pub headers: Vec<HeaderMatchSpec>,
    /// HTTP method.
    #[serde(default)]
    pub method: Option<String>,
}

/// A path match.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathMatchSpec {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// The path; defaults to `/`.
    #[serde(default)]
    pub value: Option<String>,
}

/// A header match.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatchSpec {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Header name.
    pub name: String,
    /// Value to match.
    pub value: String,
}

/// A backend reference.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    /// `""`/`core` for a Service.
    #[serde(default)]
    pub group: Option<String>,
    /// `Service`.
    #[serde(default)]
    pub kind: Option<String>,
    /// Service name.
    pub name: String,
    /// Service namespace; the route's own when absent.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Service port.
    #[serde(default)]
    pub port: Option<u16>,
    /// Relative weight, default 1.
    #[serde(default)]
    pub weight: Option<u32>,
}

/// HTTPRoute timeouts.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    /// Whole-request deadline.
    #[serde(default)]
    pub request: Option<String>,
    /// Per-try deadline.
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// HTTPRoute retry (Gateway API v1.2+).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRetry {
    /// HTTP status codes to retry.
    #[serde(default)]
    pub codes: Vec<u16>,
    /// Retries allowed.
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Base backoff.
    #[serde(default)]
    pub backoff: Option<String>,
}

/// Weft's TrafficPolicy spec: how traffic to one Service is balanced and protected.
#[derive(
    Clone,
    Debug,
    Default,
    PartialEq,
    Deserialize,
    Serialize,
    schemars::JsonSchema,
    kube::CustomResource,
)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    namespaced,
    status = "ObjectStatus",
    shortname = "tp",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    /// The Service this policy applies to.
    pub target_ref: TargetRef,
    /// Load balancing.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSpec>,
    /// Circuit breaker thresholds.
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    /// Outlier detection.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    /// Retries.
    #[serde(default)]
    pub retry: Option<RetrySpec>,
    /// Whole-request timeout, e.g. `5s`.
    #[serde(default)]
    pub timeout: Option<String>,
    /// Locality behaviour.
    #[serde(default)]
    pub locality: Option<LocalitySpec>,
}

/// The target of a policy.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// Must be `Service`.
    #[serde(default)]
    pub kind: Option<String>,
    /// `""` or `core`.
    #[serde(default)]
    pub group: Option<String>,
    /// Service name, same namespace as the policy.
    pub name: String,
}

/// Load balancing algorithm and, for hashing algorithms, the hash key.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSpec {
    /// The algorithm.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Hash key for RingHash and Maglev.
    #[serde(default)]
    pub hash: Option<HashSpec>,
}

/// Load balancing algorithms.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema,
)]
pub enum Algorithm {
    /// Power of two choices over peak-EWMA latency (the default).
    #[default]
    PeakEWMA,
    /// Round robin.
    RoundRobin,
    /// Power of two choices over outstanding requests.
    LeastRequest,
    /// Uniform random.
    Random,
    /// Consistent hashing on a ring (Ketama).
    RingHash,
    /// Maglev consistent hashing.
    Maglev,
}

/// What a hashing balancer hashes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HashSpec {
    /// A request header's value.
    #[serde(default)]
    pub header: Option<String>,
    /// The client's source IP.
    #[serde(default, rename = "sourceIP")]
    pub source_ip: bool,
}

/// Circuit breaker thresholds (Envoy's defaults apply where absent).
#[derive(
    Clone, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerSpec {
    /// Connections to the whole cluster.
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection.
    #[serde(default)]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight.
    #[serde(default)]
    pub max_requests: Option<u32>,
    /// Retries in flight.
    #[serde(default)]
    pub max_retries: Option<u32>,
}

/// Outlier detection settings.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionSpec {
    /// Consecutive 5xx before ejection (default 5).
    #[serde(default)]
    pub consecutive_5xx: Option<u32>,
    /// Consecutive gateway errors (502/503/504, connect failures) before ejection (default 5).
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    /// How often ejections are re-evaluated, e.g. `10s`.
    #[serde(default)]
    pub interval: Option<String>,
    /// Base ejection time; each further ejection of the same host multiplies it.
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    /// Cap on the share of hosts ejected at once, percent (default 10).
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
}

/// Retry settings.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySpec {
    /// Retries allowed after the first try (default 2).
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Per-try deadline.
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    /// Conditions: `5xx`, `gateway-error`, `connect-failure`, `reset`, `retriable-status-codes`.
    #[serde(default)]
    pub retry_on: Vec<String>,
    /// Status codes retried when `retriable-status-codes` is set.
    #[serde(default)]
    pub retriable_status_codes: Vec<u16>,
    /// Jittered exponential backoff.
    #[serde(default)]
    pub backoff: Option<BackoffSpec>,
    /// Retry budget: retries may add at most this share of active requests.
    #[serde(default)]
    pub budget: Option<BudgetSpec>,
}

/// Backoff between retries.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackoffSpec {
    /// First interval (default 25ms).
    #[serde(default)]
    pub base_interval: Option<String>,
    /// Cap (default 10 × base).
    #[serde(default)]
    pub max_interval: Option<String>,
}

/// Retry budget.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetSpec {
    /// Percent of active requests that may be retries (default 20).
    #[serde(default)]
    pub percent: Option<f64>,
    /// Retries always allowed regardless of the share (default 3).
    #[serde(default)]
    pub min_retry_concurrency: Option<u32>,
}

/// Locality behaviour.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalitySpec {
    /// Prefer endpoints nearer the caller (zone, then region, then cluster); default true.
    /// False puts every endpoint of the cluster at one priority.
    #[serde(default)]
    pub failover: Option<bool>,
    /// Let endpoints of other clusters join the local service name at lower priorities; default false.
    #[serde(default)]
    pub cross_cluster: Option<bool>,
    /// Accept other clusters' endpoints that have no sidecar, so calls to them cross the
    /// network in plaintext; default false: only other clusters' mTLS endpoints are used.
    #[serde(default)]
    pub remote_plaintext: Option<bool>,
}

/// Weft's Rollout spec: the canary backend of a TrafficSplit or an HTTPRoute (same namespace)
/// gets `steps` percent of the traffic in turn, one step per `interval` while its load reports
/// (LRS) stay within the thresholds, and 0 % at once when they do not. The other backends
/// share the rest in the proportions the split (or each route rule) gives them.
#[derive(
    Clone, Debug, PartialEq, Deserialize, Serialize, schemars::JsonSchema, kube::CustomResource,
)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "Rollout",
    namespaced,
    status = "RolloutStatus",
    shortname = "ro",
    printcolumn = r#"{"name":"Canary","type":"string","jsonPath":".spec.canary"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Weight","type":"integer","jsonPath":".status.weight"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutSpec {
    /// The TrafficSplit whose weights the rollout drives (or set `httpRoute`).
    #[serde(default)]
    pub traffic_split: Option<String>,
    /// The HTTPRoute whose backend weights the rollout drives, in every rule naming the canary.
    #[serde(default)]
    pub http_route: Option<String>,
    /// The backend Service being rolled out.
    pub canary: String,
    /// Canary weight per step, percent, increasing, ending at 100.
    pub steps: Vec<u32>,
    /// How long each step lasts at least, e.g. `30s`.
    pub interval: String,
    /// Requests the canary must have answered in a step before it is judged (default 20).
    #[serde(default)]
    pub min_requests: Option<u64>,
    /// Lowest acceptable share of successful canary requests, 0..1 (default 0.99).
    #[serde(default)]
    pub success_rate: Option<f64>,
    /// Highest acceptable canary p99 latency, e.g. `500ms` (no latency check when absent).
    #[serde(default)]
    pub max_p99: Option<String>,
}

/// The status Weft writes on its own objects: whether it accepted the object, and why not.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStatus {
    /// `Accepted` (True, or False with the reason and the field in the message).
    #[serde(default)]
    pub conditions: Vec<StatusCondition>,
}

/// A Rollout's status: the acceptance conditions plus where the rollout stands.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// `Accepted`.
    #[serde(default)]
    pub conditions: Vec<StatusCondition>,
    /// Progressing, Holding, Promoted, RolledBack.
    #[serde(default)]
    pub phase: Option<String>,
    /// The canary's current weight, percent.
    #[serde(default)]
    pub weight: Option<u32>,
}

/// One status condition, shaped like Kubernetes' `metav1.Condition`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusCondition {
    /// E.g. `Accepted`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase reason, e.g. `Invalid`.
    pub reason: String,
    /// Which field and what is wrong.
    pub message: String,
    /// When the status last changed (RFC 3339).
    pub last_transition_time: String,
    /// The generation the condition is about.
    #[serde(default)]
    pub observed_generation: Option<i64>,
}

/// Parses a Gateway API duration (`1h`, `10s`, `250ms`, `1m30s`): one or more number+unit pairs.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 9 {
            return Err(format!("{s:?} is not a duration like 250ms, 10s, 1m30s"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{s:?}: bad number"))?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else {
            return Err(format!("{s:?}: unit must be h, m, s or ms"));
        };
        rest = &rest[len..];
        total += unit * u32::try_from(n).map_err(|_| format!("{s:?}: too large"))?;
    }
    Ok(total)
}

/// Parses one document (as JSON) into an object; `Ok(None)` for kinds Weft does not read.
pub fn parse_object(doc: serde_json::Value) -> Result<Option<Object>, ObjectError> {
    let api_version = doc
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    let kind = doc
        .get("kind")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    let meta = doc.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(|v| v.as_str())
        .unwrap_or("default")
        .to_string();
    let label = if kind.is_empty() {
        "<object without kind>".to_string()
    } else if kind == "Node" || kind == "Namespace" || kind == "MeshPeer" {
        format!("{kind} {name}")
    } else {
        format!("{kind} {namespace}/{name}")
    };
    let err = |field: &str, message: String| ObjectError {
        object: label.clone(),
        field: field.to_string(),
        message,
    };
    if kind.is_empty() {
        return Err(err("kind", "missing".into()));
    }
    if api_version.is_empty() {
        return Err(err("apiVersion", "missing".into()));
    }
    if name.is_empty() {
        return Err(err("metadata.name", "missing".into()));
    }
    let group = api_version.split_once('/').map(|(g, _)| g).unwrap_or("");
    let obj = match (group, kind.as_str()) {
        ("", "Service") => Object::Service(Box::new(typed(doc, &label)?)),
        ("discovery.k8s.io", "EndpointSlice") => {
            Object::EndpointSlice(Box::new(typed(doc, &label)?))
        }
        ("", "Node") => Object::Node(Box::new(typed(doc, &label)?)),
        ("", "Pod") => Object::Pod(Box::new(typed(doc, &label)?)),
        ("", "Namespace") => Object::Namespace(Box::new(typed(doc, &label)?)),
        ("networking.k8s.io", "NetworkPolicy") => {
            Object::NetworkPolicy(Box::new(typed(doc, &label)?))
        }
        ("split.smi-spec.io", "TrafficSplit") => {
            Object::TrafficSplit(Box::new(named(doc, &label, namespace, name)?))
        }
        ("gateway.networking.k8s.io", "HTTPRoute") => {
            Object::HttpRoute(Box::new(named(doc, &label, namespace, name)?))
        }
        ("multicluster.x-k8s.io", "ServiceExport") => {
            let created = doc["metadata"]["creationTimestamp"]
                .as_str()
                .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                .map(|t| t.as_second());
            Object::ServiceExport(Named {
                namespace,
                name,
                spec: created,
                status: None,
            })
        }
        ("weft.dev", "TrafficPolicy") => {
            Object::TrafficPolicy(Box::new(named(doc, &label, namespace, name)?))
        }
        ("weft.dev", "Rollout") => Object::Rollout(Box::new(named(doc, &label, namespace, name)?)),
        ("weft.dev", "MeshPeer") => {
            Object::MeshPeer(Box::new(named(doc, &label, String::new(), name)?))
        }
        ("weft.dev", "PeerAuthentication") => {
            Object::PeerAuthentication(Box::new(named(doc, &label, namespace, name)?))
        }
        ("security.istio.io", kind @ ("PeerAuthentication" | "AuthorizationPolicy")) => {
            if !matches!(
                api_version.as_str(),
                "security.istio.io/v1" | "security.istio.io/v1beta1"
            ) {
                return Err(err(
                    "apiVersion",
                    format!("{api_version:?}: Weft reads security.istio.io/v1 and v1beta1"),
                ));
            }
            match kind {
                "PeerAuthentication" => {
                    Object::IstioPeerAuthentication(Box::new(named(doc, &label, namespace, name)?))
                }
                _ => Object::AuthorizationPolicy(Box::new(named(doc, &label, namespace, name)?)),
            }
        }
        _ => return Ok(None),
    };
    validate(&obj).map_err(|(field, message)| err(&field, message))?;
    Ok(Some(obj))
}

fn typed<T: DeserializeOwned>(doc: serde_json::Value, label: &str) -> Result<T, ObjectError> {
    serde_path_to_error::deserialize(doc).map_err(|e| ObjectError {
        object: label.to_string(),
        field: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

fn named<T: DeserializeOwned>(
    mut doc: serde_json::Value,
    label: &str,
    namespace: String,
    name: String,
) -> Result<Named<T>, ObjectError> {
    let spec = doc
        .get_mut("spec")
        .map(serde_json::Value::take)
        .ok_or_else(|| ObjectError {
            object: label.to_string(),
            field: "spec".into(),
            message: "missing".into(),
        })?;
    let spec: T = serde_path_to_error::deserialize(spec).map_err(|e| ObjectError {
        object: label.to_string(),
        field: format!("spec.{}", e.path()),
        message: e.inner().to_string(),
    })?;
    let status = doc.get("status").filter(|v| !v.is_null()).cloned();
    Ok(Named {
        namespace,
        name,
        spec,
        status,
    })
}

type FieldError = (String, String);

fn field_err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    (field.into(), message.into())
}

/// Checks annotation `key` of `meta` with `parse`, naming the annotation in the error.
fn annotation<T, E: std::fmt::Display>(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Result<(), FieldError> {
    match meta.annotations.as_ref().and_then(|a| a.get(key)) {
        Some(v) => parse(v)
            .map(|_| ())
            .map_err(|e| field_err(format!("metadata.annotations[{key:?}]"), e.to_string())),
        None => Ok(()),
    }
}

fn check_duration(field: &str, v: &Option<String>) -> Result<(), FieldError> {
    match v {
        Some(s) => parse_duration(s)
            .map(|_| ())
            .map_err(|m| field_err(field, m)),
        None => Ok(()),
    }
}

/// Field-level validation beyond what the types enforce.
fn validate(obj: &Object) -> Result<(), FieldError> {
    match obj {
        Object::Service(svc) => {
            annotation(
                &svc.metadata,
                weft_proto::keys::EXPORT_TO_ANNOTATION,
                weft_proto::visibility::parse_export_to,
            )?;
            let spec = svc
                .spec
                .as_ref()
                .ok_or_else(|| field_err("spec", "missing"))?;
            let ports = spec.ports.as_deref().unwrap_or_default();
            let mut names = BTreeMap::new();
            for (i, p) in ports.iter().enumerate() {
                if !(1..=65535).contains(&p.port) {
                    return Err(field_err(
                        format!("spec.ports[{i}].port"),
                        format!("{} is not a port (1-65535)", p.port),
                    ));
                }
                let name = p.name.clone().unwrap_or_default();
                if ports.len() > 1 && name.is_empty() {
                    return Err(field_err(
                        format!("spec.ports[{i}].name"),
                        "required when a Service has more than one port",
                    ));
                }
                if names.insert(name.clone(), i).is_some() {
                    return Err(field_err(
                        format!("spec.ports[{i}].name"),
                        format!("duplicate port name {name:?}"),
                    ));
                }
            }
            if let Some(a) = spec.session_affinity.as_deref()
                && !matches!(a, "None" | "ClientIP")
            {
                return Err(field_err(
                    "spec.sessionAffinity",
                    format!("{a:?}: must be None or ClientIP"),
                ));
            }
        }
        Object::EndpointSlice(es) => {
            let labels = es.metadata.labels.clone().unwrap_or_default();
            if !labels.contains_key(weft_proto::keys::SERVICE_NAME_LABEL) {
                return Err(field_err(
                    format!(
                        "metadata.labels[{:?}]",
                        weft_proto::keys::SERVICE_NAME_LABEL
                    ),
                    "missing: it names the Service the slice belongs to",
                ));
            }
            if !matches!(es.address_type.as_str(), "IPv4" | "IPv6") {
                return Err(field_err(
                    "addressType",
                    format!("{:?}: only IPv4 and IPv6 are supported", es.address_type),
                ));
            }
            for (i, ep) in es.endpoints.iter().flatten().enumerate() {
                if ep.addresses.is_empty() {
                    return Err(field_err(
                        format!("endpoints[{i}].addresses"),
                        "must hold at least one address",
                    ));
                }
                for (j, a) in ep.addresses.iter().enumerate() {
                    if a.parse::<std::net::IpAddr>().is_err() {
                        return Err(field_err(
                            format!("endpoints[{i}].addresses[{j}]"),
                            format!("{a:?} is not an IP address"),
                        ));
                    }
                }
            }
            for (i, p) in es.ports.as_deref().unwrap_or_default().iter().enumerate() {
                if let Some(port) = p.port
                    && !(1..=65535).contains(&port)
                {
                    return Err(field_err(
                        format!("ports[{i}].port"),
                        format!("{port} is not a port (1-65535)"),
                    ));
                }
            }
        }
        Object::Namespace(ns) => {
            annotation(
                &ns.metadata,
                weft_proto::keys::EGRESS_HOSTS_ANNOTATION,
                weft_proto::visibility::parse_egress_hosts,
            )?;
            if let Some(mode) = ns
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(weft_proto::keys::MTLS_MODE_ANNOTATION))
            {
                MtlsMode::parse(mode).map_err(|m| {
                    field_err(
                        format!(
                            "metadata.annotations[{:?}]",
                            weft_proto::keys::MTLS_MODE_ANNOTATION
                        ),
                        m,
                    )
                })?;
            }
        }
        Object::Node(_) | Object::Pod(_) | Object::ServiceExport(_) => {}
        Object::NetworkPolicy(np) => {
            crate::netpol::validate(np).map_err(|(field, message)| field_err(field, message))?
        }
        Object::PeerAuthentication(pa) | Object::IstioPeerAuthentication(pa) => {
            let check = |field: String, m: &PeerMtls| match m.mode.as_deref() {
                None | Some("UNSET") => Ok(()),
                Some(mode) => MtlsMode::parse(mode)
                    .map(|_| ())
                    .map_err(|e| field_err(field, format!("{e} (or UNSET to inherit)"))),
            };
            if let Some(m) = &pa.spec.mtls {
                check("spec.mtls.mode".into(), m)?;
            }
            if !pa.spec.port_level_mtls.is_empty() && pa.spec.selector.is_none() {
                return Err(field_err(
                    "spec.portLevelMtls",
                    "needs spec.selector: port-level modes apply to selected workloads only",
                ));
            }
            for (port, m) in &pa.spec.port_level_mtls {
                match port.parse::<u16>() {
                    Ok(p) if p > 0 => {}
                    _ => {
                        return Err(field_err(
                            format!("spec.portLevelMtls[{port:?}]"),
                            format!("{port:?} is not a port (1-65535)"),
                        ));
                    }
                }
                check(format!("spec.portLevelMtls[{port:?}].mode"), m)?;
            }
        }
        Object::AuthorizationPolicy(p) => crate::authz::validate(&p.spec)?,
        Object::MeshPeer(p) => {
            weft_proto::spiffe::validate_dns_subdomain("cluster name", &p.name)
                .map_err(|e| field_err("metadata.name", e.to_string()))?;
            check_peer_address(&p.spec.address).map_err(|m| field_err("spec.address", m))?;
            if let Some(n) = &p.spec.network {
                weft_proto::spiffe::validate_dns_subdomain("network name", n)
                    .map_err(|e| field_err("spec.network", e.to_string()))?;
            }
            for (i, g) in p.spec.gateways.iter().enumerate() {
                match g.parse::<std::net::SocketAddr>() {
                    Ok(a) if a.port() != 0 && !a.ip().is_unspecified() => {}
                    _ => {
                        return Err(field_err(
                            format!("spec.gateways[{i}]"),
                            format!("{g:?}: expected IP:PORT (the address callers here dial)"),
                        ));
                    }
                }
            }
            if p.spec.network.is_some() == p.spec.gateways.is_empty() {
                return Err(field_err(
                    "spec.gateways",
                    "a peer on another network needs its gateways, and gateways need the network they front",
                ));
            }
            if let Some(id) = &p.spec.gateway_identity {
                weft_proto::SpiffeId::parse(id)
                    .map_err(|e| field_err("spec.gatewayIdentity", e.to_string()))?;
            }
        }
        Object::TrafficSplit(ts) => {
            if ts.spec.service.is_empty() {
                return Err(field_err("spec.service", "must name the root Service"));
            }
            if ts.spec.matches.is_some() {
                return Err(field_err(
                    "spec.matches",
                    "HTTPRouteGroup matches are not supported; use an HTTPRoute",
                ));
            }
            if ts.spec.backends.is_empty() {
                return Err(field_err("spec.backends", "must list at least one backend"));
            }
            for (i, b) in ts.spec.backends.iter().enumerate() {
                if b.service.is_empty() {
                    return Err(field_err(format!("spec.backends[{i}].service"), "empty"));
                }
            }
            if ts.spec.backends.iter().all(|b| b.weight == 0) {
                return Err(field_err(
                    "spec.backends",
                    "all weights are zero: no backend would receive traffic",
                ));
            }
        }
        Object::HttpRoute(r) => {
            let services: Vec<_> = r
                .spec
                .parent_refs
                .iter()
                .filter(|p| p.kind.as_deref() == Some("Service"))
                .collect();
            if services.is_empty() {
                return Err(field_err(
                    "spec.parentRefs",
                    "no parentRef of kind Service: Weft serves GAMMA routes only",
                ));
            }
            for (i, rule) in r.spec.rules.iter().enumerate() {
                for (j, m) in rule.matches.iter().enumerate() {
                    if let Some(p) = &m.path {
                        let kind = p.kind.as_deref().unwrap_or("PathPrefix");
                        if !matches!(kind, "Exact" | "PathPrefix" | "RegularExpression") {
                            return Err(field_err(
                                format!("spec.rules[{i}].matches[{j}].path.type"),
                                format!("{kind:?}: must be Exact, PathPrefix or RegularExpression"),
                            ));
                        }
                        if let Some(v) = &p.value
                            && !v.starts_with('/')
                            && kind != "RegularExpression"
                        {
                            return Err(field_err(
                                format!("spec.rules[{i}].matches[{j}].path.value"),
                                format!("{v:?} must start with '/'"),
                            ));
                        }
                    }
                    for (k, h) in m.headers.iter().enumerate() {
                        let kind = h.kind.as_deref().unwrap_or("Exact");
                        if !matches!(kind, "Exact" | "RegularExpression") {
                            return Err(field_err(
                                format!("spec.rules[{i}].matches[{j}].headers[{k}].type"),
                                format!("{kind:?}: must be Exact or RegularExpression"),
                            ));
                        }
                    }
                }
                if !rule.backend_refs.is_empty()
                    && rule.backend_refs.iter().all(|b| b.weight == Some(0))
                {
                    return Err(field_err(
                        format!("spec.rules[{i}].backendRefs"),
                        "all weights are zero: no backend would receive traffic",
                    ));
                }
                for (j, b) in rule.backend_refs.iter().enumerate() {
                    if b.kind.as_deref().is_some_and(|k| k != "Service") {
                        return Err(field_err(
                            format!("spec.rules[{i}].backendRefs[{j}].kind"),
                            "only Service backends are supported",
                        ));
                    }
                }
                if let Some(t) = &rule.timeouts {
                    check_duration(&format!("spec.rules[{i}].timeouts.request"), &t.request)?;
                    check_duration(
                        &format!("spec.rules[{i}].timeouts.backendRequest"),
                        &t.backend_request,
                    )?;
                }
                if let Some(rt) = &rule.retry {
                    check_duration(&format!("spec.rules[{i}].retry.backoff"), &rt.backoff)?;
                }
            }
        }
        Object::Rollout(r) => {
            let s = &r.spec;
            match (&s.traffic_split, &s.http_route) {
                (Some(n), None) | (None, Some(n)) if !n.is_empty() => {}
                (Some(_), Some(_)) => {
                    return Err(field_err("spec", "set trafficSplit or httpRoute, not both"));
                }
                _ => {
                    return Err(field_err(
                        "spec.trafficSplit",
                        "name the TrafficSplit (or set httpRoute) whose weights the rollout drives",
                    ));
                }
            }
            if s.canary.is_empty() {
                return Err(field_err("spec.canary", "must name a backend Service"));
            }
            if s.steps.is_empty() {
                return Err(field_err("spec.steps", "needs at least one step"));
            }
            for (i, w) in s.steps.iter().enumerate() {
                if *w == 0 || *w > 100 {
                    return Err(field_err(
                        format!("spec.steps[{i}]"),
                        format!("{w} is not a weight in 1..=100"),
                    ));
                }
                if i > 0 && *w <= s.steps[i - 1] {
                    return Err(field_err(format!("spec.steps[{i}]"), "steps must increase"));
                }
            }
            if s.steps.last() != Some(&100) {
                return Err(field_err("spec.steps", "the last step must be 100"));
            }
            let interval =
                parse_duration(&s.interval).map_err(|m| field_err("spec.interval", m))?;
            if interval.is_zero() {
                return Err(field_err("spec.interval", "must be longer than 0"));
            }
            if let Some(r) = s.success_rate
                && !(0.0..=1.0).contains(&r)
            {
                return Err(field_err(
                    "spec.successRate",
                    format!("{r} is not in 0..=1"),
                ));
            }
            if let Some(p) = &s.max_p99 {
                parse_duration(p).map_err(|m| field_err("spec.maxP99", m))?;
            }
        }
        Object::TrafficPolicy(p) => {
            let s = &p.spec;
            if s.target_ref.kind.as_deref().is_some_and(|k| k != "Service") {
                return Err(field_err("spec.targetRef.kind", "must be Service"));
            }
            if s.target_ref.name.is_empty() {
                return Err(field_err("spec.targetRef.name", "must name a Service"));
            }
            if let Some(lb) = &s.load_balancer {
                let hashing = matches!(lb.algorithm, Algorithm::RingHash | Algorithm::Maglev);
                match (&lb.hash, hashing) {
                    (Some(_), false) => {
                        return Err(field_err(
                            "spec.loadBalancer.hash",
                            "only RingHash and Maglev hash requests",
                        ));
                    }
                    (Some(h), true) if h.header.is_none() && !h.source_ip => {
                        return Err(field_err(
                            "spec.loadBalancer.hash",
                            "set header or sourceIP",
                        ));
                    }
                    (Some(h), true) if h.header.is_some() && h.source_ip => {
                        return Err(field_err(
                            "spec.loadBalancer.hash",
                            "set header or sourceIP, not both",
                        ));
                    }
                    _ => {}
                }
            }
            check_duration("spec.timeout", &s.timeout)?;
            if let Some(o) = &s.outlier_detection {
                check_duration("spec.outlierDetection.interval", &o.interval)?;
                check_duration(
                    "spec.outlierDetection.baseEjectionTime",
                    &o.base_ejection_time,
                )?;
                if o.max_ejection_percent.is_some_and(|p| p > 100) {
                    return Err(field_err(
                        "spec.outlierDetection.maxEjectionPercent",
                        "must be 0-100",
                    ));
                }
            }
            if let Some(r) = &s.retry {
                check_duration("spec.retry.perTryTimeout", &r.per_try_timeout)?;
                for (i, c) in r.retry_on.iter().enumerate() {
                    if !matches!(
                        c.as_str(),
                        "5xx"
                            | "gateway-error"
                            | "connect-failure"
                            | "reset"
                            | "retriable-status-codes"
                    ) {
                        return Err(field_err(
                            format!("spec.retry.retryOn[{i}]"),
                            format!(
                                "{c:?}: must be 5xx, gateway-error, connect-failure, reset or retriable-status-codes"
                            ),
                        ));
                    }
                }
                if let Some(b) = &r.backoff {
                    check_duration("spec.retry.backoff.baseInterval", &b.base_interval)?;
                    check_duration("spec.retry.backoff.maxInterval", &b.max_interval)?;
                }
                if let Some(b) = &r.budget
                    && b.percent.is_some_and(|p| !(0.0..=100.0).contains(&p))
                {
                    return Err(field_err("spec.retry.budget.percent", "must be 0-100"));
                }
            }
        }
    }
    Ok(())
}

/// What of an accepted object Weft cannot enforce as written (it fails closed there): the
/// fields, and why, for its `Accepted` condition. `None` when everything is enforced.
pub fn unenforced(obj: &Object) -> Option<(String, String)> {
    let Object::AuthorizationPolicy(p) = obj else {
        return None;
    };
    let gaps = crate::authz::unsupported(&p.spec);
    if gaps.is_empty() {
        return None;
    }
    let fields: Vec<&str> = gaps.iter().map(|(f, _)| f.as_str()).collect();
    let reasons: Vec<String> = gaps.iter().map(|(f, m)| format!("{f}: {m}")).collect();
    Some((fields.join(", "), reasons.join("; ")))
}

/// The static kind name for a kind Weft reads (for keys of objects that failed to parse).
pub fn known_kind(kind: &str) -> Option<&'static str> {
    [
        "Service",
        "EndpointSlice",
        "Node",
        "Pod",
        "TrafficSplit",
        "HTTPRoute",
        "ServiceExport",
        "TrafficPolicy",
        "Rollout",
        "Namespace",
        "MeshPeer",
        "PeerAuthentication",
        "AuthorizationPolicy",
        "NetworkPolicy",
    ]
    .into_iter()
    .find(|k| *k == kind)
}

/// The key an unparsed document would have, when it names a known kind and has a name.
pub fn raw_key(doc: &serde_json::Value) -> Option<ObjectKey> {
    let mut kind = known_kind(doc.get("kind")?.as_str()?)?;
    if kind == "PeerAuthentication"
        && doc
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .is_some_and(|v| v.starts_with("security.istio.io/"))
    {
        kind = ISTIO_PEER_AUTHENTICATION;
    }
    let meta = doc.get("metadata")?;
    let name = meta.get("name")?.as_str()?.to_string();
    let namespace = if matches!(kind, "Node" | "Namespace" | "MeshPeer") {
        String::new()
    } else {
        meta.get("namespace")
            .and_then(|v| v.as_str())
            .unwrap_or("default")
            .to_string()
    };
    Some(ObjectKey {
        kind,
        namespace,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err_of(doc: serde_json::Value) -> ObjectError {
        parse_object(doc).expect_err("must be refused")
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "10", "ms", "1d", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rollouts_and_namespaces_are_checked_field_by_field() {
        let rollout = |spec: serde_json::Value| {
            json!({"apiVersion": "weft.dev/v1alpha1", "kind": "Rollout",
                   "metadata": {"name": "r", "namespace": "shop"}, "spec": spec})
        };
        let ok = parse_object(rollout(json!({"trafficSplit": "s", "canary": "v2",
            "steps": [10, 50, 100], "interval": "30s", "maxP99": "250ms"})));
        assert!(matches!(ok, Ok(Some(Object::Rollout(_)))), "{ok:?}");
        for (spec, field, says) in [
            (
                json!({"canary": "v2", "steps": [100], "interval": "1s"}),
                "spec.trafficSplit",
                "name the TrafficSplit",
            ),
            (
                json!({"trafficSplit": "s", "httpRoute": "h", "canary": "v2", "steps": [100], "interval": "1s"}),
                "spec",
                "not both",
            ),
            (
                json!({"trafficSplit": "s", "canary": "v2", "steps": [50, 20, 100], "interval": "1s"}),
                "spec.steps[1]",
                "increase",
            ),
            (
                json!({"trafficSplit": "s", "canary": "v2", "steps": [10, 50], "interval": "1s"}),
                "spec.steps",
                "last step must be 100",
            ),
            (
                json!({"trafficSplit": "s", "canary": "v2", "steps": [0, 100], "interval": "1s"}),
                "spec.steps[0]",
                "1..=100",
            ),
            (
                json!({"trafficSplit": "s", "canary": "v2", "steps": [100], "interval": "soon"}),
                "spec.interval",
                "",
            ),
            (
                json!({"trafficSplit": "s", "canary": "v2", "steps": [100], "interval": "1s", "successRate": 99}),
                "spec.successRate",
                "0..=1",
            ),
            (
                json!({"trafficSplit": "s", "canary": "v2", "steps": [100], "interval": "1s", "paused": true}),
                "spec",
                "unknown field",
            ),
        ] {
            let e = err_of(rollout(spec.clone()));
            assert_eq!(e.object, "Rollout shop/r");
            assert!(e.field.starts_with(field), "{spec}: {e}");
            assert!(e.message.contains(says), "{spec}: {e}");
        }
        let e = err_of(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "annotations": {"weft.dev/mtls-mode": "strict"}}}));
        assert_eq!(e.object, "Namespace shop");
        assert_eq!(e.field, "metadata.annotations[\"weft.dev/mtls-mode\"]");
        assert!(e.message.contains("STRICT, PERMISSIVE or DISABLE"), "{e}");
    }

    #[test]
    fn service_parses() {
        let o = parse_object(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "echo", "namespace": "prod"},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        }))
        .expect("valid")
        .expect("known kind");
        assert_eq!(o.key().to_string(), "Service prod/echo");
    }

    #[test]
    fn unknown_kinds_are_skipped() {
        let o = parse_object(json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "x"}}));
        assert_eq!(o, Ok(None));
    }

    #[test]
    fn type_errors_name_the_field() {
        let e = err_of(json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
            "spec": {"ports": [{"name": "http", "port": "eighty"}]}
        }));
        assert_eq!(e.object, "Service default/echo");
        assert_eq!(e.field, "spec.ports[0].port");
    }

    #[test]
    fn a_peer_on_another_network_needs_gateways_it_can_dial() {
        let peer = |spec: serde_json::Value| {
            json!({"apiVersion": "weft.dev/v1alpha1", "kind": "MeshPeer",
                "metadata": {"name": "east"}, "spec": spec})
        };
        let ok = parse_object(peer(
            json!({"address": "198.18.0.1:15012", "network": "east-net",
            "gateways": ["198.18.0.5:15443"], "gatewayIdentity": "spiffe://td/ns/weft-system/sa/gw"}),
        ));
        assert!(matches!(ok, Ok(Some(_))), "{ok:?}");
        for (spec, field) in [
            (
                json!({"address": "198.18.0.1:15012", "network": "east-net"}),
                "spec.gateways",
            ),
            (
                json!({"address": "198.18.0.1:15012", "gateways": ["198.18.0.5:15443"]}),
                "spec.gateways",
            ),
            (
                json!({"address": "198.18.0.1:15012", "network": "east-net",
                    "gateways": ["gw.east:15443"]}),
                "spec.gateways[0]",
            ),
            (
                json!({"address": "198.18.0.1:15012", "network": "East Net",
                    "gateways": ["198.18.0.5:15443"]}),
                "spec.network",
            ),
            (
                json!({"address": "198.18.0.1:15012", "network": "east-net",
                    "gateways": ["198.18.0.5:15443"], "gatewayIdentity": "gw"}),
                "spec.gatewayIdentity",
            ),
        ] {
            assert_eq!(err_of(peer(spec.clone())).field, field, "{spec}");
        }
    }

    #[test]
    fn validation_errors_name_the_field() {
        let cases = [
            (
                json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "e"},
                   "spec": {"ports": [{"port": 80}, {"port": 81}]}}),
                "spec.ports[0].name",
            ),
            (
                json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "e"},
                   "spec": {"ports": [{"port": 70000}]}}),
                "spec.ports[0].port",
            ),
            (
                json!({"apiVersion": "split.smi-spec.io/v1alpha4", "kind": "TrafficSplit",
                   "metadata": {"name": "s"},
                   "spec": {"service": "e", "backends": [{"service": "a", "weight": 0}]}}),
                "spec.backends",
            ),
            (
                json!({"apiVersion": "split.smi-spec.io/v1alpha4", "kind": "TrafficSplit",
                   "metadata": {"name": "s"},
                   "spec": {"service": "e", "backends": [{"service": "a", "weight": -1}]}}),
                "spec.backends[0].weight",
            ),
            (
                json!({"apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
                   "metadata": {"name": "p"},
                   "spec": {"targetRef": {"name": "e"}, "timeout": "soon"}}),
                "spec.timeout",
            ),
            (
                json!({"apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
                   "metadata": {"name": "p"},
                   "spec": {"targetRef": {"name": "e"}, "loadBalancer": {"algorithm": "Fastest"}}}),
                "spec.loadBalancer.algorithm",
            ),
            (
                json!({"apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
                   "metadata": {"name": "p"},
                   "spec": {"targetRef": {"name": "e"}, "retyr": {}}}),
                "spec.retyr",
            ),
            (
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": "e-1", "labels": {"kubernetes.io/service-name": "e"}},
                   "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.300"]}]}),
                "endpoints[0].addresses[0]",
            ),
            (
                json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                   "metadata": {"name": "r"},
                   "spec": {"parentRefs": [{"kind": "Gateway", "name": "g"}]}}),
                "spec.parentRefs",
            ),
            (
                json!({"apiVersion": "v1", "kind": "Service", "spec": {}}),
                "metadata.name",
            ),
        ];
        for (doc, field) in cases {
            let e = err_of(doc);
            assert_eq!(e.field, field, "{e}");
        }
    }
}
