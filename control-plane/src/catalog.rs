//! The catalog: one versioned model of the mesh (services, endpoints with cluster, locality,
//! identity and health, resolved routes and splits, policies), built from the objects the
//! sources hold and published as a cheap-to-clone snapshot.
//!
//! Sources only send changes ([`SourceUpdate`]); the catalog rebuilds the model, keeps the `Arc`
//! of every service that did not change (so translators and xDS streams can skip it by pointer
//! comparison), bumps the version and publishes. Cross-object problems (a split whose backend
//! does not exist) are recorded as errors and the last good resolution of that object keeps
//! serving.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use weft_proto::SpiffeId;

use crate::objects::{Object, ObjectKey, TrafficPolicySpec, parse_duration};

/// A Service's identity in the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ServiceKey {
    /// Builds a key.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where an endpoint or a proxy runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Locality {
    /// `topology.kubernetes.io/region`.
    pub region: String,
    /// `topology.kubernetes.io/zone`.
    pub zone: String,
    /// Weft's subzone label.
    pub subzone: String,
}

/// A problem found in a source or while resolving references, shown on /metrics and the admin API.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SourceError {
    /// The file (or source) the object came from.
    pub file: String,
    /// `Kind ns/name`, empty when the whole file is unreadable.
    pub object: String,
    /// Field path.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file)?;
        if !self.object.is_empty() {
            write!(f, ": {}", self.object)?;
        }
        if !self.field.is_empty() {
            write!(f, ": field {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PortModel {
    /// Port name ("" for a single unnamed port).
    pub name: String,
    /// Service port.
    pub port: u16,
    /// `appProtocol`, when set.
    pub app_protocol: Option<String>,
}

impl PortModel {
    /// The protocol the port declares ([`weft_proto::protocol::of_port`]).
    pub fn protocol(&self) -> String {
        weft_proto::protocol::of_port(&self.name, self.app_protocol.as_deref())
    }
}

/// One endpoint of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointModel {
    /// Pod IP.
    pub address: IpAddr,
    /// Port name -> endpoint port.
    pub ports: BTreeMap<String, u16>,
    /// Origin cluster.
    pub cluster: String,
    /// Locality.
    pub locality: Locality,
    /// The SPIFFE ID the endpoint serves as, when its Pod is known.
    pub identity: Option<String>,
    /// `conditions.ready`.
    pub ready: bool,
    /// `conditions.serving`.
    pub serving: bool,
    /// `conditions.terminating`.
    pub terminating: bool,
    /// Relative weight (1 unless said otherwise).
    pub weight: u32,
    /// The pod behind it, when known.
    pub pod: Option<String>,
    /// Its sidecar terminates mTLS (the pod is labelled `weft.dev/tls-mode: weft`; a peer's
    /// endpoint: the peer says so). Callers originate mTLS unless its port's mode is DISABLE.
    pub mtls: bool,
    /// How its sidecar accepts inbound connections on ports without an override.
    pub mode: crate::objects::MtlsMode,
    /// Endpoint port -> mode, where a PeerAuthentication overrides it per port.
    pub port_modes: BTreeMap<u16, crate::objects::MtlsMode>,
    /// Imported from a peer control plane that is unreachable now: kept for the grace period.
    pub stale: bool,
    /// Its cluster is on another network: reached through that cluster's gateways.
    pub via: Option<Arc<Via>>,
}

/// How callers here reach the endpoints of a peer cluster on another network: through its
/// east-west gateways (MeshPeer `network`, `gateways`, `gatewayIdentity`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Via {
    /// The peer's network.
    pub network: String,
    /// Its gateways' addresses, as reachable from here.
    pub gateways: Vec<std::net::SocketAddr>,
    /// The SPIFFE ID they prove.
    pub identity: String,
}

impl EndpointModel {
    /// Its sidecar's mode on one endpoint port.
    pub fn mode_on(&self, port: u16) -> crate::objects::MtlsMode {
        self.port_modes.get(&port).copied().unwrap_or(self.mode)
    }

    /// The endpoint port serving a Service port (matched by name, as Kubernetes does).
    pub fn port_for(&self, port: &PortModel) -> Option<u16> {
        self.ports.get(&port.name).copied().or_else(|| {
            // A slice with one unnamed port serves a Service with one port.
            (self.ports.len() == 1)
                .then(|| self.ports.values().next().copied())
                .flatten()
        })
    }
}

/// A path match of a resolved route.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum PathMatch {
    /// Exact path.
    Exact(String),
    /// Path prefix (segment-aware as Gateway API requires).
    Prefix(String),
    /// RE2 regular expression.
    Regex(String),
}

/// A header match of a resolved route.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct HeaderMatch {
    /// Header name, lowercase.
    pub name: String,
    /// Value or regex.
    pub value: String,
    /// True for a regular expression.
    pub regex: bool,
}

/// One way a request can match a rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct RouteMatch {
    /// Path.
    pub path: Option<PathMatch>,
    /// Headers, all must hold.
    pub headers: Vec<HeaderMatch>,
    /// Method.
    pub method: Option<String>,
}

/// A backend a rule sends traffic to, with its resolved port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Backend {
    /// Backend Service.
    pub service: ServiceKey,
    /// Backend Service port.
    pub port: u16,
    /// Relative weight.
    pub weight: u32,
    /// A Service of that name exists in this cluster; false for one only peers export, which
    /// is routed to by its clusterset name (it has no cluster name here).
    pub local: bool,
}

/// Retry settings carried by a route (from an HTTPRoute rule or the Service's policy).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct RouteRetry {
    /// Retries after the first try.
    pub attempts: u32,
    /// Per-try deadline.
    pub per_try_timeout: Option<Duration>,
    /// Envoy retry_on conditions.
    pub retry_on: Vec<String>,
    /// Status codes retried for `retriable-status-codes`.
    pub retriable_status_codes: Vec<u16>,
    /// Backoff base.
    pub backoff_base: Duration,
    /// Backoff cap.
    pub backoff_max: Duration,
}

/// A resolved routing rule for one Service port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct RouteRule {
    /// Any match selects the rule; empty means every request.
    pub matches: Vec<RouteMatch>,
    /// Weighted backends.
    pub backends: Vec<Backend>,
    /// Request deadline.
    pub timeout: Option<Duration>,
    /// Retries.
    pub retry: Option<RouteRetry>,
    /// The object the rule came from (`HTTPRoute ns/name` or `TrafficSplit ns/name`).
    pub origin: String,
}

/// A Service with everything the translator needs, resolved.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceModel {
    /// Key.
    pub key: ServiceKey,
    /// Ports.
    pub ports: Vec<PortModel>,
    /// `sessionAffinity: ClientIP`.
    pub client_ip_affinity: bool,
    /// Endpoints from every cluster, local first.
    pub endpoints: Vec<EndpointModel>,
    /// Rules per Service port (HTTPRoute or TrafficSplit); empty means "all to this Service".
    pub routes: BTreeMap<u16, Vec<RouteRule>>,
    /// The TrafficPolicy targeting it, if any.
    pub policy: Option<TrafficPolicySpec>,
    /// The policy's name, for diagnostics.
    pub policy_name: Option<String>,
    /// Exported to the clusterset (ServiceExport).
    pub exported: bool,
    /// Label selector (for diagnostics: a selector that matches no Pod).
    pub selector: BTreeMap<String, String>,
    /// `spec.clusterIP`: what an intercepted client connects to.
    pub cluster_ip: Option<IpAddr>,
    /// The clusterset name's virtual IP (see [`crate::vip`]), when it has that name and a range
    /// is configured: what the mesh DNS answers for it and its clusterset virtual host takes.
    pub clusterset_vip: Option<IpAddr>,
    /// The Service object's `metadata.creationTimestamp`, seconds (none for a file without
    /// one, or a service only peers export): older names keep their VIP on a collision.
    pub created_unix: Option<i64>,
    /// Its namespace's mTLS mode.
    pub mtls_mode: crate::objects::MtlsMode,
    /// A Service object exists in this cluster; false for a service only peers export, which
    /// exists here through federation alone.
    pub local: bool,
    /// `networking.istio.io/exportTo` (validated): the namespaces whose proxies see it in
    /// their directory; empty: every namespace.
    pub export_to: Vec<String>,
}

impl ServiceModel {
    /// Whether it has the clusterset name (`<svc>.<ns>.svc.clusterset.local`) for a control
    /// plane of cluster `home`: exported here, or with endpoints in another cluster (a peer
    /// exports it).
    pub fn has_clusterset_name(&self, home: &str) -> bool {
        self.exported || self.endpoints.iter().any(|e| e.cluster != home)
    }
}

/// The published model: versioned, immutable, cheap to clone (`Arc`).
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// Bumped on every change.
    pub version: u64,
    /// This control plane's cluster.
    pub cluster: String,
    /// Trust domain of SPIFFE IDs.
    pub trust_domain: String,
    /// Services by key; an unchanged service keeps its `Arc` across versions.
    pub services: BTreeMap<ServiceKey, Arc<ServiceModel>>,
    /// Source and resolution errors, sorted.
    pub errors: Vec<SourceError>,
    /// Pods by namespace/name with their labels (for selector diagnostics).
    pub pod_labels: Arc<BTreeMap<ServiceKey, BTreeMap<String, String>>>,
    /// True once every source delivered its first full view.
    pub ready: bool,
    /// Rollouts by `namespace/name`, resolved against their TrafficSplits.
    pub rollouts: BTreeMap<String, Arc<RolloutModel>>,
    /// Peer control planes named by MeshPeer objects: cluster name -> address.
    pub peers: BTreeMap<String, String>,
    /// Where each Pod runs (namespace/pod -> its Node's locality): a proxy that does not say
    /// where it is (an injected sidecar) is placed by its pod.
    pub pod_places: Arc<BTreeMap<ServiceKey, Locality>>,
    /// PeerAuthentications and namespace modes, to resolve per workload.
    pub mtls: Arc<crate::peer_auth::MtlsPolicies>,
    /// AuthorizationPolicies, to resolve per workload.
    pub authz: Arc<crate::authz::AuthzPolicies>,
    /// NetworkPolicies with the pods and namespaces they judge (diagnosis only).
    pub netpol: Arc<crate::netpol::NetworkPolicies>,
    /// Where clusterset VIPs come from (`--clusterset-vip-range`); `None`: no VIPs.
    pub vip_range: Option<crate::vip::VipRange>,
    /// This cluster's network (`--network`; empty: the same as every peer's that names none).
    pub network: String,
    /// Peers on another network, by cluster name: how their endpoints are reached.
    pub peer_vias: BTreeMap<String, Arc<Via>>,
}

/// What one peer control plane exports, as the federation client last received it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerImport {
    /// Its exported services: ports and endpoints (their `cluster` is the peer).
    pub services: BTreeMap<ServiceKey, ImportedService>,
    /// The link is down: endpoints are marked stale until the grace period ends.
    pub stale: bool,
}

/// One service a peer exports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImportedService {
    /// Its ports.
    pub ports: Vec<PortModel>,
    /// Its endpoints in the peer's cluster.
    pub endpoints: Vec<EndpointModel>,
}

/// Everything imported, by peer cluster name.
pub type Imports = BTreeMap<String, PeerImport>;

/// A Rollout resolved: which split it drives and which xDS clusters carry its canary.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RolloutModel {
    /// `namespace/name` of the Rollout.
    pub key: String,
    /// The `origin` of the route rules it drives (`TrafficSplit ns/name` or `HTTPRoute ns/name`).
    pub split_origin: String,
    /// The canary backend.
    pub canary: ServiceKey,
    /// The canary's xDS cluster names (one per port), what its load reports are keyed by.
    pub canary_clusters: Vec<String>,
    /// Canary weight per step, percent.
    pub steps: Vec<u32>,
    /// Least time per step.
    pub interval: Duration,
    /// Requests needed in a step before judging.
    pub min_requests: u64,
    /// Lowest acceptable success rate.
    pub success_rate: f64,
    /// Highest acceptable p99.
    pub max_p99: Option<Duration>,
    /// Phase and weight in the Rollout's status, as the leading control plane wrote them.
    pub status: Option<(String, u32)>,
}

/// Canary weights the rollout controller sets, by split origin: (canary, percent).
pub type WeightOverrides = BTreeMap<String, (ServiceKey, u32)>;

/// Rewrites the weights of a rule driven by a rollout: the canary gets `percent` of 10 000,
/// the other backends share the rest in their written proportions (equally if those are 0).
pub fn override_weights(rule: &mut RouteRule, canary: &ServiceKey, percent: u32) {
    let percent = percent.min(100);
    let others: u64 = rule
        .backends
        .iter()
        .filter(|b| &b.service != canary)
        .map(|b| u64::from(b.weight))
        .sum();
    let n_others = rule
        .backends
        .iter()
        .filter(|b| &b.service != canary)
        .count() as u64;
    let rest = u64::from(100 - percent) * 100;
    for b in &mut rule.backends {
        b.weight = if &b.service == canary {
            percent * 100
        } else {
            (rest * u64::from(b.weight))
                .checked_div(others)
                .unwrap_or(rest / n_others.max(1)) as u32
        };
    }
}

impl Model {
    /// Number of endpoints over every service.
    pub fn endpoint_count(&self) -> usize {
        self.services.values().map(|s| s.endpoints.len()).sum()
    }
}

/// What a source sends the catalog: objects to add or replace, keys to remove, and (when
/// `errors` is `Some`) the complete list of this source's current errors.
#[derive(Debug, Default)]
pub struct SourceUpdate {
    /// Objects to add or replace, with the file they came from (shared with the source, not
    /// copied: a 100k-endpoint world is held once).
    pub upserts: Vec<(Arc<Object>, String)>,
    /// Objects gone.
    pub removes: Vec<ObjectKey>,
    /// The source's current errors, replacing the previous list.
    pub errors: Option<Vec<SourceError>>,
    /// The source has delivered its first complete view.
    pub initial_sync_done: bool,
}

impl SourceUpdate {
    /// Nothing to apply.
    pub fn is_noop(&self) -> bool {
        self.upserts.is_empty() && self.removes.is_empty() && self.errors.is_none()
    }
}

struct State {
    overrides: WeightOverrides,
    imports: Imports,
    world: BTreeMap<ObjectKey, (Arc<Object>, String)>,
    source_errors: Vec<SourceError>,
    last_good_routes: HashMap<ObjectKey, Vec<(ServiceKey, u16, RouteRule)>>,
    ready: bool,
}

/// The catalog: holds the world of objects and publishes models.
pub struct Catalog {
    state: Mutex<State>,
    tx: watch::Sender<Arc<Model>>,
}

impl Catalog {
    /// A new, empty catalog for one cluster.
    pub fn new(cluster: impl Into<String>, trust_domain: impl Into<String>) -> Self {
        // Versions start at the start time in microseconds: a restarted control plane's
        // versions are higher than the last ones it published.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let model = Model {
            cluster: cluster.into(),
            trust_domain: trust_domain.into(),
            version: start,
            ..Model::default()
        };
        let (tx, _) = watch::channel(Arc::new(model));
        Catalog {
            state: Mutex::new(State {
                overrides: WeightOverrides::new(),
                imports: Imports::new(),
                world: BTreeMap::new(),
                source_errors: Vec::new(),
                last_good_routes: HashMap::new(),
                ready: false,
            }),
            tx,
        }
    }

    /// Allocates clusterset VIPs from `range` from now on (`None`: none). Set before the
    /// first source update; the next model carries them.
    pub fn set_vip_range(&self, range: Option<crate::vip::VipRange>) {
        self.tx.send_modify(|m| {
            let mut next = (**m).clone();
            next.vip_range = range;
            *m = Arc::new(next);
        });
    }

    /// Sets this cluster's network (`--network`) from now on: peers named on another network
    /// are reached through their gateways.
    pub fn set_network(&self, network: &str) {
        self.tx.send_modify(|m| {
            let mut next = (**m).clone();
            next.network = network.to_string();
            *m = Arc::new(next);
        });
    }

    /// Watches the published model.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Model>> {
        self.tx.subscribe()
    }

    /// The current model.
    pub fn current(&self) -> Arc<Model> {
        self.tx.borrow().clone()
    }

    /// Sets the canary weights rollouts drive (replacing the previous set) and republishes
    /// the model when they changed. What the user wrote stays as written in the sources.
    pub fn set_overrides(&self, overrides: WeightOverrides) {
        {
            let mut st = crate::lock(&self.state);
            if st.overrides == overrides {
                return;
            }
            st.overrides = overrides;
        }
        self.apply(SourceUpdate::default());
    }

    /// Replaces what one peer exports (`None`: forget the peer) and republishes the model.
    pub fn set_import(&self, peer: &str, import: Option<PeerImport>) {
        {
            let mut st = crate::lock(&self.state);
            let changed = match &import {
                Some(i) => st.imports.get(peer) != Some(i),
                None => st.imports.contains_key(peer),
            };
            if !changed {
                return;
            }
            match import {
                Some(i) => st.imports.insert(peer.to_string(), i),
                None => st.imports.remove(peer),
            };
        }
        self.apply(SourceUpdate::default());
    }

    /// Applies a source's changes, rebuilds and publishes the model.
    pub fn apply(&self, update: SourceUpdate) {
        let mut st = crate::lock(&self.state);
        for key in &update.removes {
            st.world.remove(key);
        }
        for (obj, file) in update.upserts {
            st.world.insert(obj.key(), (obj, file));
        }
        if let Some(errors) = update.errors {
            st.source_errors = errors;
        }
        st.ready |= update.initial_sync_done;
        let prev = self.current();
        let st = &mut *st;
        let (mut model, mut errors, good) = build(
            &st.world,
            &prev,
            &st.last_good_routes,
            &st.overrides,
            &st.imports,
        );
        for (k, v) in good {
            st.last_good_routes.insert(k, v);
        }
        st.last_good_routes.retain(|k, _| st.world.contains_key(k));
        errors.extend(st.source_errors.iter().cloned());
        errors.sort();
        errors.dedup();
        model.errors = errors;
        model.ready = st.ready;
        model.version = prev.version + 1;
        self.tx.send_replace(Arc::new(model));
    }
}

/// A pod's service account and node.
/// (service account, node, meshed: labelled `weft.dev/tls-mode: weft`).
type PodInfo = (Option<String>, Option<String>, bool);

type GoodRoutes = Vec<(ObjectKey, Vec<(ServiceKey, u16, RouteRule)>)>;

/// Builds a model from the world; pure apart from reading `prev` for Arc reuse.
fn build(
    world: &BTreeMap<ObjectKey, (Arc<Object>, String)>,
    prev: &Model,
    last_good: &HashMap<ObjectKey, Vec<(ServiceKey, u16, RouteRule)>>,
    overrides: &WeightOverrides,
    imports: &Imports,
) -> (Model, Vec<SourceError>, GoodRoutes) {
    let mut errors = Vec::new();
    let mut good = Vec::new();
    let mut nodes: HashMap<&str, Locality> = HashMap::new();
    // (namespace, pod) -> (service account, node)
    let mut pods: HashMap<(&str, &str), PodInfo> = HashMap::new();
    let mut pod_labels = BTreeMap::new();
    let policies = crate::peer_auth::MtlsPolicies::from_objects(world.values().map(|(o, _)| &**o));
    let authz = crate::authz::AuthzPolicies::from_objects(world.values().map(|(o, _)| &**o));
    for (obj, _) in world.values() {
        match &**obj {
            Object::Node(n) => {
                let labels = n.metadata.labels.clone().unwrap_or_default();
                let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
                nodes.insert(
                    n.metadata.name.as_deref().unwrap_or_default(),
                    Locality {
                        region: get(weft_proto::keys::TOPOLOGY_REGION),
                        zone: get(weft_proto::keys::TOPOLOGY_ZONE),
                        subzone: get(weft_proto::keys::TOPOLOGY_SUBZONE),
                    },
                );
            }
            Object::Pod(p) => {
                let ns = p.metadata.namespace.as_deref().unwrap_or("default");
                let name = p.metadata.name.as_deref().unwrap_or_default();
                let spec = p.spec.as_ref();
                let sa = spec
                    .and_then(|s| s.service_account_name.clone())
                    .or_else(|| Some("default".to_string()));
                let node = spec.and_then(|s| s.node_name.clone());
                let meshed = p
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(weft_proto::keys::TLS_MODE_LABEL))
                    .is_some_and(|v| v == "weft");
                pods.insert((ns, name), (sa, node, meshed));
                pod_labels.insert(
                    ServiceKey::new(ns, name),
                    p.metadata.labels.clone().unwrap_or_default(),
                );
            }
            _ => {}
        }
    }

    // Services first, then endpoints, then the things that refer to services.
    let mut services: BTreeMap<ServiceKey, ServiceModel> = BTreeMap::new();
    for (obj, _) in world.values() {
        if let Object::Service(svc) = &**obj {
            let key = ServiceKey::new(
                svc.metadata.namespace.as_deref().unwrap_or("default"),
                svc.metadata.name.as_deref().unwrap_or_default(),
            );
            let spec = svc.spec.clone().unwrap_or_default();
            let ports = spec
                .ports
                .unwrap_or_default()
                .into_iter()
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                .filter_map(|p| {
                    Some(PortModel {
                        name: p.name.unwrap_or_default(),
                        port: u16::try_from(p.port).ok()?,
                        app_protocol: p.app_protocol,
                    })
                })
                .collect();
            let key_ns = key.namespace.clone();
            services.insert(
                key.clone(),
                ServiceModel {
                    key,
                    ports,
                    client_ip_affinity: spec.session_affinity.as_deref() == Some("ClientIP"),
                    endpoints: Vec::new(),
                    routes: BTreeMap::new(),
                    policy: None,
                    policy_name: None,
                    exported: false,
                    selector: spec.selector.unwrap_or_default(),
                    cluster_ip: spec
                        .cluster_ip
                        .as_deref()
                        .and_then(|ip| ip.parse::<IpAddr>().ok()),
                    clusterset_vip: None,
                    created_unix: svc
                        .metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|t| t.0.as_second()),
                    mtls_mode: policies.namespace_mode(&key_ns).mode,
                    local: true,
                    export_to: svc
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(weft_proto::keys::EXPORT_TO_ANNOTATION))
                        .and_then(|v| weft_proto::visibility::parse_export_to(v).ok())
                        .unwrap_or_default(),
                },
            );
        }
    }

    for ((obj, file), key) in world.values().zip(world.keys()) {
        let Object::EndpointSlice(es) = &**obj else {
            continue;
        };
        let ns = es.metadata.namespace.as_deref().unwrap_or("default");
        let labels = es.metadata.labels.clone().unwrap_or_default();
        let svc_name = labels
            .get(weft_proto::keys::SERVICE_NAME_LABEL)
            .cloned()
            .unwrap_or_default();
        let Some(svc) = services.get_mut(&ServiceKey::new(ns, svc_name.clone())) else {
            errors.push(SourceError {
                file: file.clone(),
                object: key.to_string(),
                field: format!(
                    "metadata.labels[{:?}]",
                    weft_proto::keys::SERVICE_NAME_LABEL
                ),
                message: format!("Service {ns}/{svc_name} not found; the slice is unused"),
            });
            continue;
        };
        let cluster = labels
            .get(weft_proto::keys::CLUSTER_LABEL)
            .cloned()
            .unwrap_or_else(|| prev.cluster.clone());
        let ports: BTreeMap<String, u16> = es
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    u16::try_from(p.port?).ok()?,
                ))
            })
            .collect();
        for ep in es.endpoints.iter().flatten() {
            let Some(address) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            if svc.endpoints.iter().any(|e| e.address == address) {
                continue;
            }
            let cond = ep.conditions.clone().unwrap_or_default();
            let ready = cond.ready.unwrap_or(true);
            let pod = ep
                .target_ref
                .as_ref()
                .filter(|t| t.kind.as_deref() == Some("Pod"))
                .and_then(|t| t.name.clone());
            let pod_info = pod.as_deref().and_then(|p| pods.get(&(ns, p)));
            let node_name = ep
                .node_name
                .clone()
                .or_else(|| pod_info.and_then(|(_, n, _)| n.clone()));
            let mut locality = node_name
                .as_deref()
                .and_then(|n| nodes.get(n).cloned())
                .unwrap_or_default();
            if locality.zone.is_empty()
                && let Some(z) = &ep.zone
            {
                locality.zone = z.clone();
            }
            let identity = pod_info
                .and_then(|(sa, _, _)| sa.as_deref())
                .and_then(|sa| SpiffeId::new(prev.trust_domain.clone(), ns, sa).ok())
                .map(|id| id.to_string());
            let mtls = pod_info.is_some_and(|(_, _, meshed)| *meshed);
            let workload = policies.resolve(
                ns,
                pod.as_deref()
                    .and_then(|p| pod_labels.get(&ServiceKey::new(ns, p))),
            );
            svc.endpoints.push(EndpointModel {
                address,
                ports: ports.clone(),
                cluster: cluster.clone(),
                locality,
                identity,
                ready,
                serving: cond.serving.unwrap_or(ready),
                terminating: cond.terminating.unwrap_or(false),
                weight: 1,
                pod,
                mtls,
                mode: workload.mode.mode,
                port_modes: workload.ports.iter().map(|(p, s)| (*p, s.mode)).collect(),
                stale: false,
                via: None,
            });
        }
    }
    let vias = peer_vias(world, &prev.network, &prev.trust_domain);
    merge_imports(&mut services, imports, &policies, &vias);
    let peer_vias_now = vias;

    // Exports and policies.
    let mut policy_owner: HashMap<ServiceKey, String> = HashMap::new();
    for ((obj, file), key) in world.values().zip(world.keys()) {
        match &**obj {
            Object::ServiceExport(e) => {
                match services.get_mut(&ServiceKey::new(&e.namespace, &e.name)) {
                    Some(s) => {
                        s.exported = true;
                        // Its clusterset name (and VIP) dates from the later of the Service
                        // and its export: an old Service exported now is new to the VIPs.
                        s.created_unix = match (s.created_unix, e.spec) {
                            (Some(a), Some(b)) => Some(a.max(b)),
                            (_, None) => None,
                            (None, b) => b,
                        };
                    }
                    None => errors.push(SourceError {
                        file: file.clone(),
                        object: key.to_string(),
                        field: "metadata.name".into(),
                        message: format!(
                            "Service {}/{} not found: nothing to export",
                            e.namespace, e.name
                        ),
                    }),
                }
            }
            Object::TrafficPolicy(p) => {
                let target = ServiceKey::new(&p.namespace, &p.spec.target_ref.name);
                let Some(s) = services.get_mut(&target) else {
                    errors.push(SourceError {
                        file: file.clone(),
                        object: key.to_string(),
                        field: "spec.targetRef.name".into(),
                        message: format!("Service {target} not found"),
                    });
                    continue;
                };
                if let Some(owner) = policy_owner.get(&target) {
                    errors.push(SourceError {
                        file: file.clone(),
                        object: key.to_string(),
                        field: "spec.targetRef".into(),
                        message: format!(
                            "Service {target} already has TrafficPolicy {owner}; this one is ignored"
                        ),
                    });
                    continue;
                }
                policy_owner.insert(target, p.name.clone());
                s.policy = Some(p.spec.clone());
                s.policy_name = Some(format!("{}/{}", p.namespace, p.name));
            }
            _ => {}
        }
    }

    // Routes: HTTPRoutes first (they win over splits on the same port), then TrafficSplits.
    let ports_of: HashMap<ServiceKey, Vec<PortModel>> = services
        .iter()
        .map(|(k, s)| (k.clone(), s.ports.clone()))
        .collect();
    let mut owner: HashMap<(ServiceKey, u16), String> = HashMap::new();
    let route_objects = world
        .iter()
        .filter(|(_, (o, _))| matches!(**o, Object::HttpRoute(_)))
        .chain(
            world
                .iter()
                .filter(|(_, (o, _))| matches!(**o, Object::TrafficSplit(_))),
        );
    for (key, (obj, file)) in route_objects {
        let resolved = match &**obj {
            Object::HttpRoute(r) => resolve_http_route(r, &ports_of),
            Object::TrafficSplit(s) => resolve_split(s, &ports_of),
            _ => continue,
        };
        let rules = match resolved {
            Ok(rules) => {
                good.push((key.clone(), rules.clone()));
                rules
            }
            Err((field, message)) => {
                let kept = last_good.get(key);
                errors.push(SourceError {
                    file: file.clone(),
                    object: key.to_string(),
                    field,
                    message: if kept.is_some() {
                        format!("{message}; the last good version keeps serving")
                    } else {
                        message
                    },
                });
                match kept {
                    Some(r) => r.clone(),
                    None => continue,
                }
            }
        };
        let mut taken = BTreeSet::new();
        for (svc, port, _) in &rules {
            if let Some(other) = owner.get(&(svc.clone(), *port))
                && other != &key.to_string()
            {
                errors.push(SourceError {
                    file: file.clone(),
                    object: key.to_string(),
                    field: "spec".into(),
                    message: format!(
                        "Service {svc} port {port} is already routed by {other}; ignored there"
                    ),
                });
                taken.insert((svc.clone(), *port));
            }
        }
        for (svc, port, rule) in rules {
            if taken.contains(&(svc.clone(), port)) {
                continue;
            }
            owner.insert((svc.clone(), port), key.to_string());
            if let Some(s) = services.get_mut(&svc) {
                s.routes.entry(port).or_default().push(rule);
            }
        }
    }

    let peers = world
        .values()
        .filter_map(|(o, _)| match &**o {
            Object::MeshPeer(p) => Some((p.name.clone(), p.spec.address.clone())),
            _ => None,
        })
        .collect();

    // Rollouts: resolved against the splits, then their weights applied to the split's rules.
    let mut rollouts = BTreeMap::new();
    for ((obj, file), key) in world.values().zip(world.keys()) {
        let Object::Rollout(r) = &**obj else { continue };
        match resolve_rollout(r, world, &services) {
            Ok(m) => {
                rollouts.insert(m.key.clone(), Arc::new(m));
            }
            Err((field, message)) => errors.push(SourceError {
                file: file.clone(),
                object: key.to_string(),
                field,
                message,
            }),
        }
    }
    let local: std::collections::HashSet<ServiceKey> = services
        .iter()
        .filter(|(_, s)| s.local)
        .map(|(k, _)| k.clone())
        .collect();
    for s in services.values_mut() {
        for rule in s.routes.values_mut().flatten() {
            if let Some((canary, percent)) = overrides.get(&rule.origin) {
                override_weights(rule, canary, *percent);
            }
            for b in &mut rule.backends {
                b.local = local.contains(&b.service);
            }
        }
    }

    if let Some(range) = &prev.vip_range {
        let vips = range.allocate(
            services
                .values()
                .filter(|s| s.has_clusterset_name(&prev.cluster))
                .map(|s| (&s.key, s.created_unix)),
        );
        for s in services.values_mut() {
            s.clusterset_vip = vips.get(&s.key).copied();
        }
    }
    let services = services
        .into_iter()
        .map(|(k, s)| {
            let arc = match prev.services.get(&k) {
                Some(old) if **old == s => old.clone(),
                _ => Arc::new(s),
            };
            (k, arc)
        })
        .collect::<BTreeMap<ServiceKey, Arc<ServiceModel>>>();
    let mut netpol =
        crate::netpol::NetworkPolicies::from_objects(world.values().map(|(o, _)| &**o));
    for s in services.values() {
        for e in s.endpoints.iter().filter(|e| e.cluster == prev.cluster) {
            if let Some(pod) = &e.pod {
                netpol.learn_ip(&s.key.namespace, pod, e.address);
            }
        }
    }
    let model = Model {
        version: prev.version,
        cluster: prev.cluster.clone(),
        trust_domain: prev.trust_domain.clone(),
        services,
        errors: Vec::new(),
        pod_labels: if *prev.pod_labels == pod_labels {
            prev.pod_labels.clone()
        } else {
            Arc::new(pod_labels)
        },
        mtls: if *prev.mtls == policies {
            prev.mtls.clone()
        } else {
            Arc::new(policies)
        },
        authz: if *prev.authz == authz {
            prev.authz.clone()
        } else {
            Arc::new(authz)
        },
        netpol: if *prev.netpol == netpol {
            prev.netpol.clone()
        } else {
            Arc::new(netpol)
        },
        ready: prev.ready,
        vip_range: prev.vip_range,
        network: prev.network.clone(),
        peer_vias: peer_vias_now,
        rollouts,
        peers,
        pod_places: {
            let places: BTreeMap<ServiceKey, Locality> = pods
                .iter()
                .filter_map(|((ns, name), (_, node, _))| {
                    let loc = nodes.get(node.as_deref()?)?;
                    Some((ServiceKey::new(*ns, *name), loc.clone()))
                })
                .collect();
            if *prev.pod_places == places {
                prev.pod_places.clone()
            } else {
                Arc::new(places)
            }
        },
    };
    (model, errors, good)
}

/// The peers on a network other than `home`, by cluster name, with how to reach them.
fn peer_vias(
    world: &BTreeMap<ObjectKey, (Arc<Object>, String)>,
    home: &str,
    trust_domain: &str,
) -> BTreeMap<String, Arc<Via>> {
    world
        .values()
        .filter_map(|(o, _)| match &**o {
            Object::MeshPeer(p) => {
                let network = p.spec.network.as_deref()?;
                if network == home {
                    return None;
                }
                let gateways = p
                    .spec
                    .gateways
                    .iter()
                    .filter_map(|g| g.parse().ok())
                    .collect();
                let identity = p.spec.gateway_identity.clone().unwrap_or_else(|| {
                    format!("spiffe://{trust_domain}/ns/weft-system/sa/weft-gateway")
                });
                Some((
                    p.name.clone(),
                    Arc::new(Via {
                        network: network.to_string(),
                        gateways,
                        identity,
                    }),
                ))
            }
            _ => None,
        })
        .collect()
}

/// Adds what peers export: their endpoints join the local Service of the same name, or make a
/// service that exists here through federation alone. A peer's endpoint never replaces a
/// local one at the same address — unless the peer is on another network (`vias`), whose
/// addresses are its own (pod ranges may overlap): that endpoint is kept beside, reached
/// through its gateways.
fn merge_imports(
    services: &mut BTreeMap<ServiceKey, ServiceModel>,
    imports: &Imports,
    policies: &crate::peer_auth::MtlsPolicies,
    vias: &BTreeMap<String, Arc<Via>>,
) {
    for import in imports.values() {
        for (key, imported) in &import.services {
            let svc = services.entry(key.clone()).or_insert_with(|| ServiceModel {
                key: key.clone(),
                ports: Vec::new(),
                client_ip_affinity: false,
                endpoints: Vec::new(),
                routes: BTreeMap::new(),
                policy: None,
                policy_name: None,
                exported: false,
                selector: BTreeMap::new(),
                cluster_ip: None,
                clusterset_vip: None,
                created_unix: None,
                mtls_mode: policies.namespace_mode(&key.namespace).mode,
                local: false,
                export_to: Vec::new(),
            });
            if !svc.local {
                for p in &imported.ports {
                    if !svc.ports.iter().any(|q| q.port == p.port) {
                        svc.ports.push(p.clone());
                    }
                }
                svc.ports.sort_by_key(|p| p.port);
            }
            for e in &imported.endpoints {
                let via = vias.get(&e.cluster).cloned();
                if svc
                    .endpoints
                    .iter()
                    .any(|x| x.address == e.address && x.via == via)
                {
                    continue;
                }
                let mut e = e.clone();
                e.stale = import.stale;
                e.via = via;
                svc.endpoints.push(e);
            }
        }
    }
}

fn resolve_rollout(
    r: &crate::objects::Named<crate::objects::RolloutSpec>,
    world: &BTreeMap<ObjectKey, (Arc<Object>, String)>,
    services: &BTreeMap<ServiceKey, ServiceModel>,
) -> Result<RolloutModel, (String, String)> {
    let (kind, field, name) = match (&r.spec.traffic_split, &r.spec.http_route) {
        (Some(n), _) => ("TrafficSplit", "spec.trafficSplit", n.clone()),
        (None, Some(n)) => ("HTTPRoute", "spec.httpRoute", n.clone()),
        (None, None) => return Err(("spec.trafficSplit".into(), "missing".into())),
    };
    let key = ObjectKey {
        kind,
        namespace: r.namespace.clone(),
        name: name.clone(),
    };
    let Some((obj, _)) = world.get(&key) else {
        return Err((
            field.into(),
            format!("{kind} {}/{name} not found", r.namespace),
        ));
    };
    let has_canary = match &**obj {
        Object::TrafficSplit(split) => split
            .spec
            .backends
            .iter()
            .any(|b| b.service == r.spec.canary),
        Object::HttpRoute(route) => route
            .spec
            .rules
            .iter()
            .flat_map(|rule| &rule.backend_refs)
            .any(|b| {
                b.name == r.spec.canary && b.namespace.as_deref().is_none_or(|ns| ns == r.namespace)
            }),
        _ => false,
    };
    if !has_canary {
        return Err((
            "spec.canary".into(),
            format!(
                "{} is not a backend of {kind} {}/{name}",
                r.spec.canary, r.namespace
            ),
        ));
    }
    let canary = ServiceKey::new(&r.namespace, &r.spec.canary);
    let svc = services.get(&canary).ok_or_else(|| {
        (
            "spec.canary".to_string(),
            format!("Service {canary} not found"),
        )
    })?;
    let canary_clusters = svc
        .ports
        .iter()
        .map(|p| {
            weft_proto::names::ServicePortName::new(&canary.name, &canary.namespace, p.port)
                .to_string()
        })
        .collect();
    let duration = |s: &str| crate::objects::parse_duration(s).unwrap_or_default();
    Ok(RolloutModel {
        key: format!("{}/{}", r.namespace, r.name),
        split_origin: format!("{kind} {}/{name}", r.namespace),
        canary,
        canary_clusters,
        steps: r.spec.steps.clone(),
        interval: duration(&r.spec.interval),
        min_requests: r.spec.min_requests.unwrap_or(20),
        success_rate: r.spec.success_rate.unwrap_or(0.99),
        max_p99: r.spec.max_p99.as_deref().map(duration),
        status: r.status.as_ref().and_then(|s| {
            let phase = s.get("phase")?.as_str()?.to_string();
            let weight = u32::try_from(s.get("weight")?.as_u64()?).ok()?;
            Some((phase, weight.min(100)))
        }),
    })
}

type Resolved = Result<Vec<(ServiceKey, u16, RouteRule)>, (String, String)>;

/// The backend port serving a parent port: explicit, else the same number, else the only port.
fn backend_port(
    backend: &ServiceKey,
    explicit: Option<u16>,
    parent_port: u16,
    ports_of: &HashMap<ServiceKey, Vec<PortModel>>,
) -> Result<u16, String> {
    let ports = ports_of
        .get(backend)
        .ok_or_else(|| format!("Service {backend} not found"))?;
    if let Some(p) = explicit {
        return if ports.iter().any(|x| x.port == p) {
            Ok(p)
        } else {
            Err(format!("Service {backend} has no port {p}"))
        };
    }
    if ports.iter().any(|x| x.port == parent_port) {
        return Ok(parent_port);
    }
    match ports.as_slice() {
        [only] => Ok(only.port),
        _ => Err(format!(
            "Service {backend} has no port {parent_port}; name one with a port"
        )),
    }
}

fn resolve_split(
    s: &crate::objects::Named<crate::objects::TrafficSplitSpec>,
    ports_of: &HashMap<ServiceKey, Vec<PortModel>>,
) -> Resolved {
    let root = ServiceKey::new(&s.namespace, &s.spec.service);
    let root_ports = ports_of.get(&root).ok_or_else(|| {
        (
            "spec.service".to_string(),
            format!("Service {root} not found"),
        )
    })?;
    let mut out = Vec::new();
    for p in root_ports {
        let mut backends = Vec::new();
        for (i, b) in s.spec.backends.iter().enumerate() {
            let key = ServiceKey::new(&s.namespace, &b.service);
            let port = backend_port(&key, None, p.port, ports_of)
                .map_err(|m| (format!("spec.backends[{i}].service"), m))?;
            backends.push(Backend {
                service: key,
                port,
                weight: b.weight,
                local: true,
            });
        }
        out.push((
            root.clone(),
            p.port,
            RouteRule {
                matches: Vec::new(),
                backends,
                timeout: None,
                retry: None,
                origin: format!("TrafficSplit {}/{}", s.namespace, s.name),
            },
        ));
    }
    Ok(out)
}

fn resolve_http_route(
    r: &crate::objects::Named<crate::objects::HttpRouteSpec>,
    ports_of: &HashMap<ServiceKey, Vec<PortModel>>,
) -> Resolved {
    let mut out = Vec::new();
    for (pi, parent) in r.spec.parent_refs.iter().enumerate() {
        if parent.kind.as_deref() != Some("Service") {
            continue;
        }
        let root = ServiceKey::new(
            parent.namespace.as_deref().unwrap_or(&r.namespace),
            &parent.name,
        );
        let root_ports = ports_of.get(&root).ok_or_else(|| {
            (
                format!("spec.parentRefs[{pi}].name"),
                format!("Service {root} not found"),
            )
        })?;
        let ports: Vec<u16> = match parent.port {
            Some(p) if root_ports.iter().any(|x| x.port == p) => vec![p],
            Some(p) => {
                return Err((
                    format!("spec.parentRefs[{pi}].port"),
                    format!("Service {root} has no port {p}"),
                ));
            }
            None => root_ports.iter().map(|p| p.port).collect(),
        };
        for port in ports {
            for (ri, rule) in r.spec.rules.iter().enumerate() {
                let mut backends = Vec::new();
                for (bi, b) in rule.backend_refs.iter().enumerate() {
                    let key =
                        ServiceKey::new(b.namespace.as_deref().unwrap_or(&r.namespace), &b.name);
                    let bport = backend_port(&key, b.port, port, ports_of)
                        .map_err(|m| (format!("spec.rules[{ri}].backendRefs[{bi}]"), m))?;
                    backends.push(Backend {
                        service: key,
                        port: bport,
                        weight: b.weight.unwrap_or(1),
                        local: true,
                    });
                }
                if backends.is_empty() {
                    backends.push(Backend {
                        service: root.clone(),
                        port,
                        weight: 1,
                        local: true,
                    });
                }
                let matches = rule
                    .matches
                    .iter()
                    .map(|m| RouteMatch {
                        path: m.path.as_ref().map(|p| {
                            let v = p.value.clone().unwrap_or_else(|| "/".into());
                            match p.kind.as_deref().unwrap_or("PathPrefix") {
                                "Exact" => PathMatch::Exact(v),
                                "RegularExpression" => PathMatch::Regex(v),
                                _ => PathMatch::Prefix(v),
                            }
                        }),
                        headers: m
                            .headers
                            .iter()
                            .map(|h| HeaderMatch {
                                name: h.name.to_ascii_lowercase(),
                                value: h.value.clone(),
                                regex: h.kind.as_deref() == Some("RegularExpression"),
                            })
                            .collect(),
                        method: m.method.clone(),
                    })
                    .collect();
                let timeouts = rule.timeouts.as_ref();
                let dur = |s: Option<&String>| s.and_then(|s| parse_duration(s).ok());
                let per_try = dur(timeouts.and_then(|t| t.backend_request.as_ref()));
                let retry = rule.retry.as_ref().map(|rt| {
                    let base = dur(rt.backoff.as_ref()).unwrap_or(Duration::from_millis(25));
                    RouteRetry {
                        attempts: rt.attempts.unwrap_or(2),
                        per_try_timeout: per_try,
                        retry_on: if rt.codes.is_empty() {
                            vec!["5xx".into(), "connect-failure".into(), "reset".into()]
                        } else {
                            vec![
                                "retriable-status-codes".into(),
                                "connect-failure".into(),
                                "reset".into(),
                            ]
                        },
                        retriable_status_codes: rt.codes.clone(),
                        backoff_base: base,
                        backoff_max: base * 10,
                    }
                });
                out.push((
                    root.clone(),
                    port,
                    RouteRule {
                        matches,
                        backends,
                        timeout: dur(timeouts.and_then(|t| t.request.as_ref())),
                        retry,
                        origin: format!("HTTPRoute {}/{}", r.namespace, r.name),
                    },
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::parse_object;
    use serde_json::json;

    fn obj(v: serde_json::Value) -> (Arc<Object>, String) {
        (
            Arc::new(parse_object(v).expect("valid").expect("known")),
            "test.yaml".to_string(),
        )
    }

    pub(crate) fn service(name: &str, port: u16) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
               "spec": {"ports": [{"name": "http", "port": port}]}})
    }

    /// Pod ranges of two networks may overlap: a peer's endpoint at the address of a local one
    /// is another endpoint when the peer is on another network (kept, reached through its
    /// gateways), and the same one otherwise (the local one wins).
    #[test]
    fn an_overlapping_address_on_another_network_is_another_endpoint() {
        let world = |network: &str| {
            let cat = Catalog::new("west", "cluster.local");
            cat.set_network("west-net");
            cat.apply(SourceUpdate {
                upserts: vec![
                    obj(service("echo", 80)),
                    obj(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                        "metadata": {"name": "echo-1", "labels": {"kubernetes.io/service-name": "echo"}},
                        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                        "endpoints": [{"addresses": ["198.18.10.11"]}]})),
                    obj(json!({"apiVersion": "weft.dev/v1alpha1", "kind": "MeshPeer",
                        "metadata": {"name": "east"},
                        "spec": serde_json::from_str::<serde_json::Value>(network).expect("json")})),
                ],
                ..Default::default()
            });
            let local =
                cat.current().services[&ServiceKey::new("default", "echo")].endpoints[0].clone();
            let mut theirs = local.clone();
            theirs.cluster = "east".into();
            cat.set_import(
                "east",
                Some(PeerImport {
                    services: [(
                        ServiceKey::new("default", "echo"),
                        ImportedService {
                            ports: Vec::new(),
                            endpoints: vec![theirs],
                        },
                    )]
                    .into(),
                    stale: false,
                }),
            );
            cat.current().services[&ServiceKey::new("default", "echo")]
                .endpoints
                .iter()
                .map(|e| (e.cluster.clone(), e.via.as_ref().map(|v| v.gateways.len())))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            world(
                r#"{"address": "198.19.0.20:15012", "network": "east-net", "gateways": ["198.19.0.31:15443"]}"#
            ),
            [("west".to_string(), None), ("east".to_string(), Some(1))]
        );
        assert_eq!(
            world(r#"{"address": "198.19.0.20:15012"}"#),
            [("west".to_string(), None)],
            "on one network the same address is the same endpoint"
        );
    }

    /// A Service's clusterset name dates from the later of the Service and its export: an old
    /// Service kept unexported to squat a slot is new when it is exported.
    #[test]
    fn a_clusterset_name_is_as_old_as_its_export() {
        let cat = Catalog::new("c1", "cluster.local");
        cat.apply(SourceUpdate {
            upserts: vec![
                obj(json!({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "echo", "creationTimestamp": "2026-01-01T00:00:00Z"},
                    "spec": {"ports": [{"name": "http", "port": 80}]}})),
                obj(
                    json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                    "metadata": {"name": "echo", "creationTimestamp": "2026-06-01T00:00:00Z"}}),
                ),
            ],
            ..Default::default()
        });
        let exported = "2026-06-01T00:00:00Z"
            .parse::<k8s_openapi::jiff::Timestamp>()
            .expect("time")
            .as_second();
        assert_eq!(
            cat.current().services[&ServiceKey::new("default", "echo")].created_unix,
            Some(exported)
        );
    }

    #[test]
    fn endpoints_get_locality_and_identity() {
        let cat = Catalog::new("c1", "cluster.local");
        cat.apply(SourceUpdate {
            upserts: vec![
                obj(service("echo", 80)),
                obj(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1",
                    "labels": {"topology.kubernetes.io/region": "r1", "topology.kubernetes.io/zone": "z1"}}})),
                obj(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p1"},
                    "spec": {"serviceAccountName": "echo-sa", "nodeName": "n1", "containers": []}})),
                obj(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": "echo-1", "labels": {"kubernetes.io/service-name": "echo"}},
                    "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                    "endpoints": [
                        {"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": "p1"}},
                        {"addresses": ["10.0.0.2"], "zone": "z2", "conditions": {"ready": false}}
                    ]})),
            ],
            ..Default::default()
        });
        let m = cat.current();
        let svc = &m.services[&ServiceKey::new("default", "echo")];
        assert_eq!(svc.endpoints.len(), 2);
        let e1 = &svc.endpoints[0];
        assert_eq!(e1.locality.region, "r1");
        assert_eq!(e1.locality.zone, "z1");
        assert_eq!(
            e1.identity.as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/echo-sa")
        );
        assert_eq!(e1.port_for(&svc.ports[0]), Some(8080));
        assert_eq!(e1.cluster, "c1");
        let e2 = &svc.endpoints[1];
        assert_eq!(e2.locality.zone, "z2");
        assert!(!e2.ready);
    }

    #[test]
    fn unchanged_services_keep_their_arc() {
        let cat = Catalog::new("c1", "td");
        cat.apply(SourceUpdate {
            upserts: vec![obj(service("a", 80)), obj(service("b", 80))],
            ..Default::default()
        });
        let m1 = cat.current();
        cat.apply(SourceUpdate {
            upserts: vec![obj(service("b", 81))],
            ..Default::default()
        });
        let m2 = cat.current();
        assert_eq!(m2.version, m1.version + 1);
        let a = ServiceKey::new("default", "a");
        let b = ServiceKey::new("default", "b");
        assert!(Arc::ptr_eq(&m1.services[&a], &m2.services[&a]));
        assert!(!Arc::ptr_eq(&m1.services[&b], &m2.services[&b]));
    }

    fn split(backends: serde_json::Value) -> (Arc<Object>, String) {
        obj(
            json!({"apiVersion": "split.smi-spec.io/v1alpha4", "kind": "TrafficSplit",
            "metadata": {"name": "echo-split"},
            "spec": {"service": "echo", "backends": backends}}),
        )
    }

    #[test]
    fn split_resolves_and_last_good_survives_a_missing_backend() {
        let cat = Catalog::new("c1", "td");
        cat.apply(SourceUpdate {
            upserts: vec![
                obj(service("echo", 80)),
                obj(service("echo-v1", 80)),
                obj(service("echo-v2", 80)),
                split(json!([{"service": "echo-v1", "weight": 90}, {"service": "echo-v2", "weight": 10}])),
            ],
            ..Default::default()
        });
        let m = cat.current();
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        let rules = &m.services[&ServiceKey::new("default", "echo")].routes[&80];
        assert_eq!(rules[0].backends.len(), 2);
        assert_eq!(rules[0].backends[0].weight, 90);

        cat.apply(SourceUpdate {
            upserts: vec![split(
                json!([{"service": "echo-v1", "weight": 50}, {"service": "echo-v3", "weight": 50}]),
            )],
            ..Default::default()
        });
        let m = cat.current();
        assert_eq!(m.errors.len(), 1);
        let e = &m.errors[0];
        assert_eq!(e.object, "TrafficSplit default/echo-split");
        assert_eq!(e.field, "spec.backends[1].service");
        assert!(e.message.contains("echo-v3 not found"), "{}", e.message);
        assert!(e.message.contains("last good"), "{}", e.message);
        let rules = &m.services[&ServiceKey::new("default", "echo")].routes[&80];
        assert_eq!(
            rules[0].backends[0].weight, 90,
            "the 90/10 split keeps serving"
        );
    }

    #[test]
    fn policy_for_missing_service_is_an_error() {
        let cat = Catalog::new("c1", "td");
        cat.apply(SourceUpdate {
            upserts: vec![obj(
                json!({"apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
                "metadata": {"name": "p"}, "spec": {"targetRef": {"name": "ghost"}}}),
            )],
            ..Default::default()
        });
        let m = cat.current();
        assert_eq!(m.errors[0].field, "spec.targetRef.name");
    }

    #[test]
    fn http_route_matches_and_timeouts() {
        let cat = Catalog::new("c1", "td");
        cat.apply(SourceUpdate {
            upserts: vec![
                obj(service("echo", 80)),
                obj(service("echo-v2", 8080)),
                obj(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                    "metadata": {"name": "r"},
                    "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
                      "rules": [{
                        "matches": [{"path": {"type": "PathPrefix", "value": "/v2"},
                                     "headers": [{"name": "X-Canary", "value": "1"}]}],
                        "backendRefs": [{"name": "echo-v2", "port": 8080}],
                        "timeouts": {"request": "2s", "backendRequest": "500ms"},
                        "retry": {"attempts": 3, "codes": [503], "backoff": "50ms"}
                      }]}})),
            ],
            ..Default::default()
        });
        let m = cat.current();
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        let rule = &m.services[&ServiceKey::new("default", "echo")].routes[&80][0];
        assert_eq!(rule.matches[0].path, Some(PathMatch::Prefix("/v2".into())));
        assert_eq!(rule.matches[0].headers[0].name, "x-canary");
        assert_eq!(rule.backends[0].port, 8080);
        assert_eq!(rule.timeout, Some(Duration::from_secs(2)));
        let retry = rule.retry.as_ref().expect("retry");
        assert_eq!(retry.attempts, 3);
        assert_eq!(retry.per_try_timeout, Some(Duration::from_millis(500)));
        assert_eq!(retry.retriable_status_codes, vec![503]);
    }
}
