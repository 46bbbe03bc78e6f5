//! Translation: catalog model -> Envoy xDS v3 resources.
//!
//! Listeners, routes and clusters do not depend on who asks, so they are translated once per
//! model version and shared by every proxy; a service whose model `Arc` did not change keeps its
//! translated resources (and their `Arc`s), which is what lets an xDS stream find what changed
//! for its proxy by pointer comparison. ClusterLoadAssignments depend on the asking proxy's
//! locality (endpoint priorities), so they are computed per locality and cached per service.
//!
//! Naming: every resource of a Service port is named `<svc>.<ns>.svc.cluster.local:<port>`
//! (see `weft_proto::names`); exported services also get the clusterset-scoped set.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::{Message, Name};
use weft_proto::envoy::envoy::config::cluster::v3 as cluster;
use weft_proto::envoy::envoy::config::core::v3 as core;
use weft_proto::envoy::envoy::config::endpoint::v3 as endpoint;
use weft_proto::envoy::envoy::config::listener::v3 as listener;
use weft_proto::envoy::envoy::config::route::v3 as route;
use weft_proto::envoy::envoy::extensions::filters::http::router::v3::Router;
use weft_proto::envoy::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use weft_proto::envoy::envoy::r#type::matcher::v3 as matcher;
use weft_proto::envoy::google::protobuf as pb;
use weft_proto::names::{Scope, ServicePortName, virtual_host_domains};

use crate::catalog::{
    EndpointModel, Locality, Model, PathMatch, RouteRetry, RouteRule, ServiceKey, ServiceModel,
};
use crate::objects::{Algorithm, TrafficPolicySpec, parse_duration};

/// Envoy's default overprovisioning factor (140 = 1.4): a priority keeps all its traffic while
/// at least 1/1.4 ≈ 71 % of its endpoints are healthy, then spills the rest to the next one.
pub const OVERPROVISIONING_FACTOR: u32 = 140;
/// Metadata filter under which Weft puts what Envoy's schema has no field for.
pub const WEFT_METADATA: &str = "weft";

/// One serialized xDS resource, shared by every proxy it is sent to.
#[derive(Debug, PartialEq)]
pub struct Resource {
    /// Resource name.
    pub name: String,
    /// Content hash, used as the delta-xDS resource version.
    pub version: String,
    /// The resource, packed.
    pub any: pb::Any,
    /// The namespaces whose proxies are sent it (a directory entry's exportTo, `.` resolved);
    /// empty: every proxy.
    pub export_to: Vec<String>,
}

impl Resource {
    /// Whether a proxy of namespace `ns` is sent it.
    pub fn visible_from(&self, ns: &str) -> bool {
        self.export_to.is_empty() || self.export_to.iter().any(|e| e == "*" || e == ns)
    }
}

/// A shared resource.
pub type Res = Arc<Resource>;

/// Packs a message into a resource named `name`.
pub fn resource<M: Message + Name>(name: String, msg: &M) -> Res {
    let value = msg.encode_to_vec();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    Arc::new(Resource {
        name,
        version: format!("{:016x}", h.finish()),
        any: pb::Any {
            type_url: M::type_url(),
            value,
        },
        export_to: Vec::new(),
    })
}

/// The asking proxy's place, which decides endpoint priorities.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProxyPlace {
    /// The proxy's cluster ("" = unknown: treated as the control plane's own).
    pub cluster: String,
    /// Its locality ("" fields = unknown).
    pub locality: Locality,
}

/// The translated resources of one Service.
#[derive(Debug)]
pub struct ServiceXds {
    /// The model it was translated from.
    pub model: Arc<ServiceModel>,
    /// Listeners (API listeners, one per port and scope).
    pub listeners: Vec<Res>,
    /// Route configurations.
    pub routes: Vec<Res>,
    /// Clusters.
    pub clusters: Vec<Res>,
    /// Its directory entry (`weft.xds.v1.DirectoryEntry`), none when it has no port.
    pub directory: Vec<Res>,
    home_cluster: String,
    endpoints: Mutex<HashMap<ProxyPlace, Arc<Vec<Res>>>>,
}

impl ServiceXds {
    /// The ClusterLoadAssignments as `place` sees them (cached per place).
    pub fn endpoints(&self, place: &ProxyPlace) -> Arc<Vec<Res>> {
        let mut cache = crate::lock(&self.endpoints);
        if let Some(v) = cache.get(place) {
            return v.clone();
        }
        let v = Arc::new(load_assignments(&self.model, place, &self.home_cluster));
        cache.insert(place.clone(), v.clone());
        v
    }
}

/// A service whose translation changed between two versions.
#[derive(Debug)]
pub struct Changed {
    /// The service.
    pub key: ServiceKey,
    /// Its translation before (`None`: it is new).
    pub old: Option<Arc<ServiceXds>>,
    /// Its translation now (`None`: it is gone).
    pub new: Option<Arc<ServiceXds>>,
}

/// Every service's translated resources for one model version.
#[derive(Debug, Default)]
pub struct Translation {
    /// The model version.
    pub version: u64,
    /// Per service; unchanged services keep their `Arc` across versions.
    pub services: BTreeMap<ServiceKey, Arc<ServiceXds>>,
    /// The version `changed` is relative to (0 with no predecessor).
    pub prev_version: u64,
    /// Services whose translation differs from `prev_version`'s. Holds the old translations of
    /// changed services only, never a previous `Translation`, so memory stays bounded.
    pub changed: Vec<Changed>,
    /// Where pods run (the model's), to place proxies that do not say.
    pub pod_places: Arc<BTreeMap<ServiceKey, Locality>>,
    /// Pods' labels (the model's), to find the policies that select a proxy's pod.
    pub pod_labels: Arc<BTreeMap<ServiceKey, BTreeMap<String, String>>>,
    /// mTLS policies (the model's).
    pub mtls: Arc<crate::peer_auth::MtlsPolicies>,
    /// AuthorizationPolicies (the model's).
    pub authz: Arc<crate::authz::AuthzPolicies>,
    /// This control plane's cluster.
    pub cluster: String,
    /// The ports each pod serves, for its inbound Listener.
    pub ports: Arc<crate::inbound::PortIndex>,
    /// Meshed endpoint address -> its Services' directory names, built on first use.
    addresses: std::sync::OnceLock<HashMap<IpAddr, AddressInfo>>,
}

impl Translation {
    /// The address entry of `ip` (`weft.xds.v1.AddressEntry`) as a proxy of namespace `ns`
    /// may see it: the Services (visible to it) with a meshed endpoint at that address, `None`
    /// when there is none.
    pub fn address_entry(&self, ip: &str, ns: &str) -> Option<Res> {
        let addr: IpAddr = ip.parse().ok()?;
        let index = self.addresses.get_or_init(|| {
            let mut index: HashMap<IpAddr, AddressInfo> = HashMap::new();
            for (key, xds) in &self.services {
                let m = &xds.model;
                for a in [m.cluster_ip, m.clusterset_vip].into_iter().flatten() {
                    let info = index.entry(a.to_canonical()).or_default();
                    info.service_address = true;
                    info.add(key);
                }
                for e in m.endpoints.iter().filter(|e| e.mtls) {
                    let info = index.entry(e.address.to_canonical()).or_default();
                    if e.mode == crate::objects::MtlsMode::Strict {
                        info.strict_ports
                            .extend(e.ports.values().map(|p| u32::from(*p)));
                    }
                    info.add(key);
                }
            }
            index
        });
        let info = index.get(&addr.to_canonical())?;
        let services: Vec<String> = info
            .services
            .iter()
            .filter(|key| {
                self.services
                    .get(*key)
                    .is_some_and(|x| x.directory.first().is_some_and(|r| r.visible_from(ns)))
            })
            .map(directory_name)
            .collect();
        let meshed = info.services.iter().any(|k| {
            self.services.get(k).is_some_and(|x| {
                x.model
                    .endpoints
                    .iter()
                    .any(|e| e.mtls && e.address.to_canonical() == addr.to_canonical())
            })
        });
        // Answered whatever the asker may see: it must never send a STRICT pod plaintext
        // because the Service is not exported to it.
        Some(resource(
            ip.to_string(),
            &weft_proto::xds::AddressEntry {
                address: ip.to_string(),
                services,
                meshed,
                strict_ports: info.strict_ports.iter().copied().collect(),
                service_address: info.service_address,
            },
        ))
    }

    /// Where a proxy is: for a Pod this control plane knows (node id `<pod>.<namespace>`, in
    /// the namespace its certificate proves), its Node's locality, whatever the proxy
    /// claims; otherwise (a VM, the file source without Pods) what the proxy says.
    pub fn place_of(&self, node_id: &str, namespace: &str, place: &ProxyPlace) -> ProxyPlace {
        let known = node_id
            .rsplit_once('.')
            .filter(|(pod, ns)| *ns == namespace && !pod.is_empty())
            .and_then(|(pod, ns)| self.pod_places.get(&ServiceKey::new(ns, pod)));
        match known {
            // The Pod's Node says where it is; what the proxy claims does not count.
            Some(loc) => ProxyPlace {
                cluster: place.cluster.clone(),
                locality: loc.clone(),
            },
            None => place.clone(),
        }
    }
}

/// Translates a model, reusing `prev`'s work for services whose model did not change.
pub fn translate(model: &Model, prev: Option<&Translation>) -> Translation {
    let mut changed = Vec::new();
    let services: BTreeMap<ServiceKey, Arc<ServiceXds>> = model
        .services
        .iter()
        .map(|(k, svc)| {
            let old = prev.and_then(|p| p.services.get(k));
            let xds = match old {
                Some(x) if Arc::ptr_eq(&x.model, svc) => x.clone(),
                _ => {
                    let new = Arc::new(translate_service(svc, &model.cluster));
                    changed.push(Changed {
                        key: k.clone(),
                        old: old.cloned(),
                        new: Some(new.clone()),
                    });
                    new
                }
            };
            (k.clone(), xds)
        })
        .collect();
    if let Some(p) = prev {
        for (k, old) in &p.services {
            if !services.contains_key(k) {
                changed.push(Changed {
                    key: k.clone(),
                    old: Some(old.clone()),
                    new: None,
                });
            }
        }
    }
    Translation {
        version: model.version,
        services,
        prev_version: prev.map_or(0, |p| p.version),
        changed,
        pod_places: model.pod_places.clone(),
        pod_labels: model.pod_labels.clone(),
        mtls: model.mtls.clone(),
        authz: model.authz.clone(),
        cluster: model.cluster.clone(),
        ports: Arc::new(crate::inbound::PortIndex::build(
            model.services.values().map(|s| &**s),
            &model.cluster,
        )),
        addresses: std::sync::OnceLock::new(),
    }
}

/// The names a service gets resources under: cluster.local always, clusterset when it is
/// exported or has endpoints in other clusters.
///
/// MCS semantics: the cluster name exists only for a Service of this cluster (a peer cannot
/// add a `cluster.local` name by exporting one); the clusterset name exists when this cluster
/// exports the Service or a peer does, and carries this cluster's endpoints only when it is
/// exported here (see [`in_scope`]).
pub fn scopes(svc: &ServiceModel, home: &str) -> Vec<Scope> {
    let mut out = Vec::with_capacity(2);
    if svc.local {
        out.push(Scope::Cluster);
    }
    if svc.has_clusterset_name(home) {
        out.push(Scope::Clusterset);
    }
    out
}

/// Whether callers here may use endpoint `e`: another cluster's endpoint only over mTLS (it
/// has a sidecar and an identity), unless the Service's policy accepts plaintext across
/// clusters (`locality.remotePlaintext`).
pub fn usable(e: &EndpointModel, home: &str, remote_plaintext: bool) -> bool {
    e.cluster == home || remote_plaintext || (e.mtls && e.identity.is_some())
}

/// Whether endpoint `e` of `svc` belongs under `scope`: under the clusterset name, this
/// cluster's own endpoints count only when it exports the Service.
pub fn in_scope(svc: &ServiceModel, e: &EndpointModel, scope: Scope, home: &str) -> bool {
    match scope {
        Scope::Cluster => true,
        Scope::Clusterset => svc.exported || e.cluster != home,
    }
}

fn translate_service(svc: &Arc<ServiceModel>, home: &str) -> ServiceXds {
    let mut listeners = Vec::new();
    let mut routes = Vec::new();
    let mut clusters = Vec::new();
    let mut entry = weft_proto::xds::DirectoryEntry {
        name: svc.key.name.clone(),
        namespace: svc.key.namespace.clone(),
        scopes: Vec::new(),
        export_to: svc.export_to.clone(),
    };
    for scope in scopes(svc, home) {
        for port in &svc.ports {
            let name = ServicePortName::new(&svc.key.name, &svc.key.namespace, port.port)
                .with_scope(scope);
            listeners.push(resource(name.to_string(), &api_listener(&name)));
            routes.push(resource(name.to_string(), &route_config(svc, &name)));
            clusters.push(resource(name.to_string(), &cluster_for(svc, &name, port)));
        }
        let address = match scope {
            Scope::Cluster => svc.cluster_ip,
            Scope::Clusterset => svc.clusterset_vip,
        };
        entry.scopes.push(weft_proto::xds::DirectoryScope {
            zone: scope.domain().trim_start_matches("svc.").to_string(),
            addresses: address.iter().map(ToString::to_string).collect(),
            ports: svc
                .ports
                .iter()
                .map(|p| weft_proto::xds::DirectoryPort {
                    port: u32::from(p.port),
                    protocol: p.protocol(),
                })
                .collect(),
        });
    }
    let directory = if entry.scopes.is_empty() || svc.ports.is_empty() {
        Vec::new()
    } else {
        vec![resource(directory_name(&svc.key), &entry)]
    };
    // exportTo hides the Service's names (directory, listeners, routes); its clusters and
    // endpoints still reach every proxy, so none forgets which addresses are STRICT.
    let all = |list: Vec<Res>| list.into_iter().map(|r| scoped(r, svc)).collect();
    ServiceXds {
        model: svc.clone(),
        listeners: all(listeners),
        routes: all(routes),
        clusters,
        directory: all(directory),
        home_cluster: home.to_string(),
        endpoints: Mutex::new(HashMap::new()),
    }
}

/// What the control plane knows of one address.
#[derive(Debug, Default)]
struct AddressInfo {
    services: Vec<ServiceKey>,
    strict_ports: std::collections::BTreeSet<u32>,
    service_address: bool,
}

impl AddressInfo {
    fn add(&mut self, key: &ServiceKey) {
        if !self.services.contains(key) {
            self.services.push(key.clone());
        }
    }
}

/// `r` sent only to the namespaces `svc`'s exportTo names (`.` is its own namespace; `~`,
/// Istio's "nowhere", matches no proxy).
fn scoped(mut r: Res, svc: &ServiceModel) -> Res {
    if !svc.export_to.is_empty()
        && let Some(m) = Arc::get_mut(&mut r)
    {
        m.export_to = svc
            .export_to
            .iter()
            .map(|e| match e.as_str() {
                "." => svc.key.namespace.clone(),
                // Istio's "exported nowhere": no namespace is spelled `~`.
                other => other.to_string(),
            })
            .collect();
        // Who is sent it is part of its version: a changed exportTo is pushed.
        m.version = format!("{}.{}", m.version, m.export_to.join(","));
    }
    r
}

/// The name of a Service's directory entry: `<svc>.<namespace>`.
pub fn directory_name(key: &ServiceKey) -> String {
    format!("{}.{}", key.name, key.namespace)
}

fn ads() -> core::ConfigSource {
    core::ConfigSource {
        resource_api_version: core::ApiVersion::V3 as i32,
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn duration(d: Duration) -> pb::Duration {
    pb::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn u32v(v: u32) -> pb::UInt32Value {
    pb::UInt32Value { value: v }
}

pub(crate) fn any_of<M: Message + Name>(m: &M) -> pb::Any {
    pb::Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// Weft's typed metadata under the `weft` key. Typed, not a `Struct`: a `Struct`'s map encodes
/// in random order, which would change a resource's version hash without changing the resource.
pub(crate) fn weft_metadata<M: Message + Name>(m: &M) -> core::Metadata {
    core::Metadata {
        typed_filter_metadata: [(WEFT_METADATA.to_string(), any_of(m))].into(),
        ..Default::default()
    }
}

/// An API listener: what proxyless gRPC clients resolve `xds:///<name>` to.
fn api_listener(name: &ServicePortName) -> listener::Listener {
    let manager = hcm::HttpConnectionManager {
        stat_prefix: name.to_string(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                config_source: Some(ads()),
                route_config_name: name.to_string(),
            },
        )),
        http_filters: vec![hcm::HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any_of(
                &Router::default(),
            ))),
            ..Default::default()
        }],
        ..Default::default()
    };
    listener::Listener {
        name: name.to_string(),
        api_listener: Some(listener::ApiListener {
            api_listener: Some(any_of(&manager)),
        }),
        ..Default::default()
    }
}

fn cluster_name(key: &ServiceKey, port: u16, scope: Scope) -> String {
    ServicePortName::new(&key.name, &key.namespace, port)
        .with_scope(scope)
        .to_string()
}

fn route_config(svc: &ServiceModel, name: &ServicePortName) -> route::RouteConfiguration {
    let policy = svc.policy.as_ref();
    let mut rules: Vec<RouteRule> = svc.routes.get(&name.port).cloned().unwrap_or_default();
    // Gateway API precedence: exact paths, then longer prefixes, then more header matches;
    // rule order breaks ties. A final catch-all sends everything else to the service itself.
    rules.sort_by_key(|r| std::cmp::Reverse(precedence(r)));
    let default_rule = RouteRule {
        matches: Vec::new(),
        backends: vec![crate::catalog::Backend {
            service: svc.key.clone(),
            port: name.port,
            weight: 1,
            local: true,
        }],
        timeout: None,
        retry: None,
        origin: String::new(),
    };
    let has_catch_all = rules.iter().any(|r| r.matches.is_empty());
    if !has_catch_all {
        rules.push(default_rule);
    }
    let mut routes = Vec::new();
    for rule in &rules {
        let action = route_action(svc, rule, name.scope, policy);
        let matches: Vec<route::RouteMatch> = if rule.matches.is_empty() {
            vec![route::RouteMatch {
                path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }]
        } else {
            rule.matches.iter().map(route_match).collect()
        };
        for m in matches {
            routes.push(route::Route {
                name: rule.origin.clone(),
                r#match: Some(m),
                action: Some(route::route::Action::Route(action.clone())),
                ..Default::default()
            });
        }
    }
    route::RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vec![route::VirtualHost {
            name: name.to_string(),
            domains: domains(svc, name),
            routes,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Host forms a virtual host answers to: the DNS names, and the address an intercepted client
/// dialed — the Service's clusterIP for the cluster scope, its clusterset VIP for the
/// clusterset scope — as `ip:port` (and bare `ip` on port 80), which is the `Host` such a
/// client sends. The sidecar's mesh DNS answers each name with the address beside it.
fn domains(svc: &ServiceModel, name: &ServicePortName) -> Vec<String> {
    let mut d = virtual_host_domains(&svc.key.name, &svc.key.namespace, name.port, name.scope);
    let addr = match name.scope {
        Scope::Cluster => svc.cluster_ip,
        Scope::Clusterset => svc.clusterset_vip,
    };
    if let Some(ip) = addr {
        let host = match ip {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        };
        d.push(format!("{host}:{}", name.port));
        if name.port == 80 {
            d.push(host);
        }
    }
    d
}

fn precedence(r: &RouteRule) -> (u8, usize, usize) {
    r.matches
        .iter()
        .map(|m| {
            let (kind, len) = match &m.path {
                Some(PathMatch::Exact(p)) => (3, p.len()),
                Some(PathMatch::Regex(p)) => (2, p.len()),
                Some(PathMatch::Prefix(p)) => (1, p.len()),
                None => (0, 0),
            };
            (kind, len, m.headers.len() + usize::from(m.method.is_some()))
        })
        .max()
        .unwrap_or((0, 0, 0))
}

fn string_matcher(value: &str, regex: bool) -> matcher::StringMatcher {
    let pattern = if regex {
        matcher::string_matcher::MatchPattern::SafeRegex(matcher::RegexMatcher {
            regex: value.to_string(),
            ..Default::default()
        })
    } else {
        matcher::string_matcher::MatchPattern::Exact(value.to_string())
    };
    matcher::StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    }
}

fn route_match(m: &crate::catalog::RouteMatch) -> route::RouteMatch {
    use route::route_match::PathSpecifier;
    let path = match &m.path {
        None => PathSpecifier::Prefix("/".into()),
        Some(PathMatch::Exact(p)) => PathSpecifier::Path(p.clone()),
        Some(PathMatch::Prefix(p)) if p == "/" => PathSpecifier::Prefix("/".into()),
        // Gateway API prefixes match whole segments: `/v2` matches `/v2` and `/v2/x`, not `/v22`.
        Some(PathMatch::Prefix(p)) => {
            PathSpecifier::PathSeparatedPrefix(p.trim_end_matches('/').to_string())
        }
        Some(PathMatch::Regex(p)) => PathSpecifier::SafeRegex(matcher::RegexMatcher {
            regex: p.clone(),
            ..Default::default()
        }),
    };
    let mut headers: Vec<route::HeaderMatcher> = m
        .headers
        .iter()
        .map(|h| route::HeaderMatcher {
            name: h.name.clone(),
            header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(
                string_matcher(&h.value, h.regex),
            )),
            ..Default::default()
        })
        .collect();
    if let Some(method) = &m.method {
        headers.push(route::HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(
                string_matcher(method, false),
            )),
            ..Default::default()
        });
    }
    route::RouteMatch {
        path_specifier: Some(path),
        headers,
        ..Default::default()
    }
}

fn dur(s: &Option<String>) -> Option<Duration> {
    s.as_deref().and_then(|s| parse_duration(s).ok())
}

/// The retry policy of a rule, else of the Service's TrafficPolicy.
fn effective_retry(rule: &RouteRule, policy: Option<&TrafficPolicySpec>) -> Option<RouteRetry> {
    if let Some(r) = &rule.retry {
        return Some(r.clone());
    }
    let r = policy?.retry.as_ref()?;
    let base = r
        .backoff
        .as_ref()
        .and_then(|b| dur(&b.base_interval))
        .unwrap_or(Duration::from_millis(25));
    let max = r
        .backoff
        .as_ref()
        .and_then(|b| dur(&b.max_interval))
        .unwrap_or(base * 10);
    Some(RouteRetry {
        attempts: r.attempts.unwrap_or(2),
        per_try_timeout: dur(&r.per_try_timeout),
        retry_on: if r.retry_on.is_empty() {
            vec!["5xx".into(), "connect-failure".into(), "reset".into()]
        } else {
            r.retry_on.clone()
        },
        retriable_status_codes: r.retriable_status_codes.clone(),
        backoff_base: base,
        backoff_max: max,
    })
}

fn route_action(
    svc: &ServiceModel,
    rule: &RouteRule,
    scope: Scope,
    policy: Option<&TrafficPolicySpec>,
) -> route::RouteAction {
    use route::route_action::ClusterSpecifier;
    // A backend only peers export has no cluster name here: it is reached by its clusterset
    // name, whatever scope the route is for.
    let backend = |b: &crate::catalog::Backend| {
        let scope = if b.local { scope } else { Scope::Clusterset };
        cluster_name(&b.service, b.port, scope)
    };
    let specifier = match rule.backends.as_slice() {
        [only] => ClusterSpecifier::Cluster(backend(only)),
        many => ClusterSpecifier::WeightedClusters(route::WeightedCluster {
            clusters: many
                .iter()
                .map(|b| route::weighted_cluster::ClusterWeight {
                    name: backend(b),
                    weight: Some(u32v(b.weight)),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    };
    let timeout = rule
        .timeout
        .or_else(|| dur(&policy.and_then(|p| p.timeout.clone())));
    let retry_policy = effective_retry(rule, policy).map(|r| route::RetryPolicy {
        retry_on: r.retry_on.join(","),
        num_retries: Some(u32v(r.attempts)),
        per_try_timeout: r.per_try_timeout.map(duration),
        retriable_status_codes: r
            .retriable_status_codes
            .iter()
            .map(|c| u32::from(*c))
            .collect(),
        retry_back_off: Some(route::retry_policy::RetryBackOff {
            base_interval: Some(duration(r.backoff_base)),
            max_interval: Some(duration(r.backoff_max)),
        }),
        ..Default::default()
    });
    route::RouteAction {
        cluster_specifier: Some(specifier),
        timeout: timeout.map(duration),
        retry_policy,
        hash_policy: hash_policy(svc),
        ..Default::default()
    }
}

fn hash_policy(svc: &ServiceModel) -> Vec<route::route_action::HashPolicy> {
    use route::route_action::hash_policy::{ConnectionProperties, Header, PolicySpecifier};
    let hash = svc
        .policy
        .as_ref()
        .and_then(|p| p.load_balancer.as_ref())
        .and_then(|lb| lb.hash.clone());
    let spec = match hash {
        Some(h) if h.header.is_some() => PolicySpecifier::Header(Header {
            header_name: h.header.unwrap_or_default().to_ascii_lowercase(),
            ..Default::default()
        }),
        Some(_) => PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true }),
        None if svc.client_ip_affinity => {
            PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true })
        }
        None => return Vec::new(),
    };
    vec![route::route_action::HashPolicy {
        policy_specifier: Some(spec),
        terminal: true,
    }]
}

/// The balancing algorithm for a Service: its policy's, else ring hash for ClientIP affinity,
/// else peak-EWMA.
pub fn algorithm(svc: &ServiceModel) -> Algorithm {
    match svc.policy.as_ref().and_then(|p| p.load_balancer.as_ref()) {
        Some(lb) => lb.algorithm,
        None if svc.client_ip_affinity => Algorithm::RingHash,
        None => Algorithm::PeakEWMA,
    }
}

fn cluster_for(
    svc: &ServiceModel,
    name: &ServicePortName,
    port: &crate::catalog::PortModel,
) -> cluster::Cluster {
    use cluster::cluster::LbPolicy;
    let algo = algorithm(svc);
    // Envoy has no peak-EWMA: it gets round robin (what proxyless gRPC clients all support)
    // and Weft's sidecar reads the algorithm from the `weft` metadata.
    let lb_policy = match algo {
        Algorithm::PeakEWMA | Algorithm::RoundRobin => LbPolicy::RoundRobin,
        Algorithm::LeastRequest => LbPolicy::LeastRequest,
        Algorithm::Random => LbPolicy::Random,
        Algorithm::RingHash => LbPolicy::RingHash,
        Algorithm::Maglev => LbPolicy::Maglev,
    };
    let algo_name = format!("{algo:?}");
    let protocol = port.protocol();
    let policy = svc.policy.as_ref();
    let circuit_breakers = policy.and_then(|p| {
        let cb = p.circuit_breaker.clone();
        let budget = p.retry.as_ref().and_then(|r| r.budget.clone());
        if cb.is_none() && budget.is_none() {
            return None;
        }
        let cb = cb.unwrap_or_default();
        Some(cluster::CircuitBreakers {
            thresholds: vec![cluster::circuit_breakers::Thresholds {
                max_connections: cb.max_connections.map(u32v),
                max_pending_requests: cb.max_pending_requests.map(u32v),
                max_requests: cb.max_requests.map(u32v),
                max_retries: cb.max_retries.map(u32v),
                retry_budget: budget.map(|b| cluster::circuit_breakers::thresholds::RetryBudget {
                    budget_percent: Some(weft_proto::envoy::envoy::r#type::v3::Percent {
                        value: b.percent.unwrap_or(20.0),
                    }),
                    min_retry_concurrency: Some(u32v(b.min_retry_concurrency.unwrap_or(3))),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        })
    });
    let outlier_detection =
        policy
            .and_then(|p| p.outlier_detection.as_ref())
            .map(|o| cluster::OutlierDetection {
                consecutive_5xx: Some(u32v(o.consecutive_5xx.unwrap_or(5))),
                consecutive_gateway_failure: Some(u32v(o.consecutive_gateway_errors.unwrap_or(5))),
                enforcing_consecutive_gateway_failure: Some(u32v(100)),
                interval: Some(duration(
                    dur(&o.interval).unwrap_or(Duration::from_secs(10)),
                )),
                base_ejection_time: Some(duration(
                    dur(&o.base_ejection_time).unwrap_or(Duration::from_secs(30)),
                )),
                max_ejection_percent: Some(u32v(o.max_ejection_percent.unwrap_or(10))),
                ..Default::default()
            });
    cluster::Cluster {
        name: name.to_string(),
        alt_stat_name: format!("{}.{}:{}", svc.key.name, svc.key.namespace, name.port),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.to_string(),
        }),
        connect_timeout: Some(duration(Duration::from_secs(1))),
        lb_policy: lb_policy as i32,
        circuit_breakers,
        outlier_detection,
        metadata: Some(weft_metadata(&weft_proto::xds::ClusterMeta {
            algorithm: algo_name,
            service: svc.key.to_string(),
            app_protocol: protocol,
        })),
        ..Default::default()
    }
}

/// Priority of an endpoint as seen from `place`: 0 same zone, 1 same region, 2 same cluster,
/// 3 another cluster. Without locality preference everything local is 0 and remote is 1.
fn raw_priority(e: &EndpointModel, place: &ProxyPlace, home: &str, prefer_local: bool) -> u32 {
    let proxy_cluster = if place.cluster.is_empty() {
        home
    } else {
        &place.cluster
    };
    if e.cluster != proxy_cluster {
        return 3;
    }
    if !prefer_local {
        return 0;
    }
    let l = &place.locality;
    let same_region = !l.region.is_empty() && l.region == e.locality.region;
    let same_zone = !l.zone.is_empty() && l.zone == e.locality.zone;
    let region_unknown = l.region.is_empty() || e.locality.region.is_empty();
    if same_zone && (same_region || region_unknown) {
        0
    } else if same_region {
        1
    } else {
        2
    }
}

fn health(e: &EndpointModel) -> core::HealthStatus {
    if e.ready {
        core::HealthStatus::Healthy
    } else if e.serving && e.terminating {
        core::HealthStatus::Draining
    } else {
        core::HealthStatus::Unhealthy
    }
}

fn load_assignments(svc: &ServiceModel, place: &ProxyPlace, home: &str) -> Vec<Res> {
    let locality = svc
        .policy
        .as_ref()
        .and_then(|p| p.locality.clone())
        .unwrap_or_default();
    let prefer_local = locality.failover.unwrap_or(true);
    let cross_cluster = locality.cross_cluster.unwrap_or(false);
    let remote_plaintext = locality.remote_plaintext.unwrap_or(false);
    let mut out = Vec::new();
    for scope in scopes(svc, home) {
        for port in &svc.ports {
            let name = ServicePortName::new(&svc.key.name, &svc.key.namespace, port.port)
                .with_scope(scope);
            // (priority, locality) -> endpoints
            let mut groups: BTreeMap<(u32, Locality), Vec<endpoint::LbEndpoint>> = BTreeMap::new();
            for e in &svc.endpoints {
                let Some(target) = e.port_for(port) else {
                    continue;
                };
                if !in_scope(svc, e, scope, home) || !usable(e, home, remote_plaintext) {
                    continue;
                }
                let prio = match scope {
                    // The clusterset name spreads over every cluster equally.
                    Scope::Clusterset => 0,
                    Scope::Cluster => {
                        let p = raw_priority(e, place, home, prefer_local);
                        // Other clusters' endpoints under the local name only with
                        // crossCluster failover.
                        if p == 3 && !cross_cluster {
                            continue;
                        }
                        p
                    }
                };
                let ep = endpoint::LbEndpoint {
                    health_status: health(e) as i32,
                    load_balancing_weight: Some(u32v(e.weight.max(1))),
                    metadata: Some(weft_metadata(&weft_proto::xds::EndpointMeta {
                        cluster: e.cluster.clone(),
                        identity: e.identity.clone().unwrap_or_default(),
                        pod: e.pod.clone().unwrap_or_default(),
                        mtls: e.mtls
                            && e.identity.is_some()
                            && e.mode_on(target) != crate::objects::MtlsMode::Disable,
                        strict: e.mtls
                            && e.identity.is_some()
                            && e.mode_on(target) == crate::objects::MtlsMode::Strict,
                        gateways: e
                            .via
                            .iter()
                            .flat_map(|v| v.gateways.iter().map(|g| g.to_string()))
                            .collect(),
                        gateway_identity: e
                            .via
                            .as_ref()
                            .map(|v| v.identity.clone())
                            .unwrap_or_default(),
                    })),
                    host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                        endpoint::Endpoint {
                            address: Some(socket_address(e.address, target)),
                            ..Default::default()
                        },
                    )),
                };
                groups
                    .entry((prio, e.locality.clone()))
                    .or_default()
                    .push(ep);
            }
            // Priorities must be contiguous from 0: compress the levels that are present.
            let mut levels: Vec<u32> = groups.keys().map(|(p, _)| *p).collect();
            levels.dedup();
            let endpoints = groups
                .into_iter()
                .map(|((p, loc), lb_endpoints)| {
                    let weight: u32 = lb_endpoints
                        .iter()
                        .map(|e| e.load_balancing_weight.as_ref().map_or(1, |w| w.value))
                        .sum();
                    endpoint::LocalityLbEndpoints {
                        locality: Some(core::Locality {
                            region: loc.region,
                            zone: loc.zone,
                            sub_zone: loc.subzone,
                        }),
                        lb_endpoints,
                        load_balancing_weight: Some(u32v(weight.max(1))),
                        priority: levels.iter().position(|l| *l == p).unwrap_or(0) as u32,
                        ..Default::default()
                    }
                })
                .collect();
            let cla = endpoint::ClusterLoadAssignment {
                cluster_name: name.to_string(),
                endpoints,
                policy: Some(endpoint::cluster_load_assignment::Policy {
                    overprovisioning_factor: Some(u32v(OVERPROVISIONING_FACTOR)),
                    ..Default::default()
                }),
                ..Default::default()
            };
            out.push(resource(name.to_string(), &cla));
        }
    }
    out
}

pub(crate) fn socket_address(ip: std::net::IpAddr, port: u16) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                port,
            ))),
            ..Default::default()
        })),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::catalog::{Catalog, SourceUpdate};
    use crate::objects::parse_object;
    use serde_json::json;
    use weft_proto::envoy::envoy::config::cluster::v3::cluster::LbPolicy;

    /// The model of a world of objects (cluster `c1`); every object must be valid.
    pub(crate) fn model(docs: Vec<serde_json::Value>) -> Arc<Model> {
        model_in(&Catalog::new("c1", "cluster.local"), docs)
    }

    /// [`model`] through `cat` (configured by the caller).
    fn model_in(cat: &Catalog, docs: Vec<serde_json::Value>) -> Arc<Model> {
        cat.apply(SourceUpdate {
            upserts: docs
                .into_iter()
                .map(|d| {
                    (
                        Arc::new(parse_object(d).expect("valid").expect("known")),
                        "t.yaml".into(),
                    )
                })
                .collect(),
            ..Default::default()
        });
        let m = cat.current();
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        m
    }

    fn service(name: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
               "spec": {"ports": [{"name": "http", "port": 80}]}})
    }

    fn node(name: &str, region: &str, zone: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {
            "topology.kubernetes.io/region": region, "topology.kubernetes.io/zone": zone}}})
    }

    /// A slice with one endpoint per (ip, node, cluster label).
    fn slice(svc: &str, eps: &[(&str, &str)], cluster: Option<&str>) -> serde_json::Value {
        let mut labels = json!({"kubernetes.io/service-name": svc});
        if let Some(c) = cluster {
            labels["weft.dev/cluster"] = json!(c);
        }
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{svc}-{}", cluster.unwrap_or("local")), "labels": labels},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": eps.iter().map(|(ip, n)| json!({"addresses": [ip], "nodeName": n})).collect::<Vec<_>>()})
    }

    fn decode<M: Message + Default>(r: &Res) -> M {
        M::decode(r.any.value.as_slice()).expect("decodes")
    }

    fn find<'a>(list: &'a [Res], name: &str) -> &'a Res {
        list.iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("{name} missing"))
    }

    const ECHO: &str = "echo.default.svc.cluster.local:80";

    fn place(cluster: &str, region: &str, zone: &str) -> ProxyPlace {
        ProxyPlace {
            cluster: cluster.into(),
            locality: Locality {
                region: region.into(),
                zone: zone.into(),
                subzone: String::new(),
            },
        }
    }

    /// (ip -> priority) as `place` sees the echo service.
    fn priorities(t: &Translation, place: &ProxyPlace) -> BTreeMap<String, u32> {
        let svc = &t.services[&ServiceKey::new("default", "echo")];
        let cla: endpoint::ClusterLoadAssignment = decode(find(&svc.endpoints(place), ECHO));
        assert_eq!(
            cla.policy
                .and_then(|p| p.overprovisioning_factor)
                .map(|v| v.value),
            Some(OVERPROVISIONING_FACTOR)
        );
        let mut out = BTreeMap::new();
        for l in cla.endpoints {
            for e in l.lb_endpoints {
                let Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(ep)) = e.host_identifier
                else {
                    panic!("no endpoint")
                };
                let Some(core::address::Address::SocketAddress(sa)) =
                    ep.address.and_then(|a| a.address)
                else {
                    panic!("no address")
                };
                assert_eq!(
                    sa.port_specifier,
                    Some(core::socket_address::PortSpecifier::PortValue(8080))
                );
                out.insert(sa.address, l.priority);
            }
        }
        out
    }

    fn locality_world(cross_cluster: bool) -> Vec<serde_json::Value> {
        let mut docs = vec![
            service("echo"),
            node("n-a1", "r1", "a"),
            node("n-a2", "r1", "a"),
            node("n-b", "r1", "b"),
            node("n-x", "r2", "x"),
            slice(
                "echo",
                &[
                    ("10.0.0.1", "n-a1"),
                    ("10.0.0.2", "n-a2"),
                    ("10.0.0.3", "n-b"),
                    ("10.0.0.4", "n-x"),
                ],
                None,
            ),
            slice("echo", &[("10.1.0.1", "n-a1")], Some("c2")),
        ];
        if cross_cluster {
            docs.push(
                json!({"apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
                "metadata": {"name": "echo"},
                "spec": {"targetRef": {"name": "echo"},
                    "locality": {"crossCluster": true, "remotePlaintext": true}}}),
            );
        }
        docs
    }

    #[test]
    fn locality_priorities_per_proxy_zone() {
        let m = model(locality_world(false));
        let t = translate(&m, None);
        let cases: Vec<(ProxyPlace, [(&str, u32); 4])> = vec![
            (
                place("c1", "r1", "a"),
                [
                    ("10.0.0.1", 0),
                    ("10.0.0.2", 0),
                    ("10.0.0.3", 1),
                    ("10.0.0.4", 2),
                ],
            ),
            (
                place("c1", "r1", "b"),
                [
                    ("10.0.0.1", 1),
                    ("10.0.0.2", 1),
                    ("10.0.0.3", 0),
                    ("10.0.0.4", 2),
                ],
            ),
            (
                place("c1", "r2", "x"),
                [
                    ("10.0.0.1", 1),
                    ("10.0.0.2", 1),
                    ("10.0.0.3", 1),
                    ("10.0.0.4", 0),
                ],
            ),
            // Unknown locality: everything local is one priority.
            (
                place("", "", ""),
                [
                    ("10.0.0.1", 0),
                    ("10.0.0.2", 0),
                    ("10.0.0.3", 0),
                    ("10.0.0.4", 0),
                ],
            ),
        ];
        for (p, want) in cases {
            let got = priorities(&t, &p);
            let want: BTreeMap<String, u32> =
                want.iter().map(|(ip, pr)| (ip.to_string(), *pr)).collect();
            assert_eq!(got, want, "proxy at {p:?}");
        }
    }

    #[test]
    fn remote_clusters_join_only_when_the_policy_allows() {
        let t = translate(&model(locality_world(true)), None);
        let got = priorities(&t, &place("c1", "r1", "a"));
        assert_eq!(
            got["10.1.0.1"], 3,
            "remote cluster after zone, region, cluster: {got:?}"
        );
        // The clusterset name holds every cluster at one priority, this cluster's endpoints
        // only when it exports the Service (MCS): not exported, only c2's endpoint.
        let clusterset = |t: &Translation| {
            let svc = &t.services[&ServiceKey::new("default", "echo")];
            let cs: endpoint::ClusterLoadAssignment = decode(find(
                &svc.endpoints(&place("c1", "r1", "a")),
                "echo.default.svc.clusterset.local:80",
            ));
            assert!(cs.endpoints.iter().all(|l| l.priority == 0));
            cs.endpoints
                .iter()
                .map(|l| l.lb_endpoints.len())
                .sum::<usize>()
        };
        assert_eq!(
            clusterset(&t),
            1,
            "a Service not exported here keeps its endpoints"
        );
        let mut docs = locality_world(true);
        docs.push(
            json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
            "metadata": {"name": "echo"}}),
        );
        assert_eq!(clusterset(&translate(&model(docs), None)), 5);
    }

    #[test]
    fn another_clusters_plaintext_endpoints_are_used_only_when_the_policy_accepts_them() {
        // c2's endpoint has no sidecar: crossCluster alone does not send callers to it in
        // plaintext, under either name.
        let mut docs = locality_world(false);
        docs.push(
            json!({"apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": "echo"},
            "spec": {"targetRef": {"name": "echo"}, "locality": {"crossCluster": true}}}),
        );
        let t = translate(&model(docs), None);
        let got = priorities(&t, &place("c1", "r1", "a"));
        assert!(!got.contains_key("10.1.0.1"), "{got:?}");
        let svc = &t.services[&ServiceKey::new("default", "echo")];
        let cs: endpoint::ClusterLoadAssignment = decode(find(
            &svc.endpoints(&place("c1", "r1", "a")),
            "echo.default.svc.clusterset.local:80",
        ));
        assert!(
            cs.endpoints.iter().all(|l| l.lb_endpoints.is_empty()),
            "{cs:?}"
        );
        // With remotePlaintext it joins (remote_clusters_join_only_when_the_policy_allows).
        assert_eq!(
            priorities(
                &translate(&model(locality_world(true)), None),
                &place("c1", "r1", "a")
            )["10.1.0.1"],
            3
        );
    }

    /// What an on-demand proxy learns of an address: a STRICT meshed pod of a Service hidden
    /// from it is still said to be STRICT (never plaintext because of exportTo); the
    /// Service's clusterIP is a Service address; anything else does not exist.
    #[test]
    fn address_entries_say_strict_whatever_the_asker_may_see() {
        use prost::Message as _;
        let t = translate(
            &model(vec![
                json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": "vault", "annotations": {"weft.dev/mtls-mode": "STRICT"}}}),
                json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "v-0", "namespace": "vault", "labels": {"weft.dev/tls-mode": "weft"}},
                    "spec": {"containers": []}}),
                json!({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "v", "namespace": "vault",
                        "annotations": {"networking.istio.io/exportTo": "."}},
                    "spec": {"clusterIP": "198.18.9.1", "ports": [{"name": "http", "port": 80}]}}),
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": "v-1", "namespace": "vault",
                        "labels": {"kubernetes.io/service-name": "v"}},
                    "addressType": "IPv4", "ports": [{"name": "http", "port": 8200}],
                    "endpoints": [{"addresses": ["198.18.9.2"],
                        "targetRef": {"kind": "Pod", "name": "v-0", "namespace": "vault"}}]}),
            ]),
            None,
        );
        let entry = |ip: &str, ns: &str| {
            t.address_entry(ip, ns)
                .map(|r| weft_proto::xds::AddressEntry::decode(&r.any.value[..]).expect("decodes"))
        };
        let hidden = entry("198.18.9.2", "default").expect("a meshed pod");
        assert!(hidden.meshed);
        assert_eq!(hidden.strict_ports, [8200]);
        assert!(hidden.services.is_empty(), "v is not exported to default");
        let own = entry("198.18.9.2", "vault").expect("a meshed pod");
        assert_eq!(own.services, ["v.vault"]);
        let vip = entry("198.18.9.1", "default").expect("the clusterIP");
        assert!(vip.service_address && !vip.meshed);
        assert!(entry("198.18.9.3", "default").is_none());
        assert!(entry("not-an-ip", "default").is_none());
        // Its name is hidden from default; its cluster is not (its STRICT endpoints stay known).
        let v = &t.services[&ServiceKey::new("vault", "v")];
        assert!(!v.routes[0].visible_from("default") && v.routes[0].visible_from("vault"));
        assert!(v.clusters[0].visible_from("default"));
        // `~` is Istio's "nowhere": not even its own namespace gets its names.
        let nowhere = translate(
            &model(vec![json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "n", "namespace": "vault",
                    "annotations": {"networking.istio.io/exportTo": "~"}},
                "spec": {"ports": [{"name": "http", "port": 80}]}})]),
            None,
        );
        let n = &nowhere.services[&ServiceKey::new("vault", "n")];
        assert!(!n.routes[0].visible_from("vault") && !n.directory[0].visible_from("other"));
    }

    #[test]
    fn a_known_pods_locality_wins_over_what_its_proxy_claims() {
        let t = translate(
            &model(vec![
                node("n-a1", "r1", "a"),
                json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "web-0", "namespace": "default"},
                    "spec": {"nodeName": "n-a1", "containers": []}}),
            ]),
            None,
        );
        let claimed = place("c1", "r9", "elsewhere");
        assert_eq!(
            t.place_of("web-0.default", "default", &claimed),
            place("c1", "r1", "a"),
            "the Pod's Node decides"
        );
        assert_eq!(
            t.place_of("web-0.default", "other", &claimed),
            claimed,
            "another namespace's proxy does not get this Pod"
        );
        assert_eq!(t.place_of("vm-1", "default", &claimed), claimed);
    }

    #[test]
    fn a_service_only_peers_export_has_no_cluster_local_name() {
        // What peer c2 exports: echo's ports and one endpoint of c2.
        let key = ServiceKey::new("default", "echo");
        let theirs = model(vec![
            service("echo"),
            slice("echo", &[("10.1.0.1", "n-a1")], Some("c2")),
        ])
        .services[&key]
            .clone();
        let cat = Catalog::new("c1", "cluster.local");
        cat.apply(SourceUpdate::default());
        cat.set_import(
            "c2",
            Some(crate::catalog::PeerImport {
                services: [(
                    key.clone(),
                    crate::catalog::ImportedService {
                        ports: theirs.ports.clone(),
                        endpoints: theirs.endpoints.clone(),
                    },
                )]
                .into(),
                stale: false,
            }),
        );
        let t = translate(&cat.current(), None);
        let svc = &t.services[&key];
        assert!(
            !svc.listeners.iter().any(|r| r.name == ECHO),
            "a peer's endpoints made a cluster.local name: {:?}",
            svc.listeners.iter().map(|r| &r.name).collect::<Vec<_>>()
        );
        assert!(
            svc.listeners
                .iter()
                .any(|r| r.name == "echo.default.svc.clusterset.local:80")
        );
    }

    #[test]
    fn split_90_10_is_weighted_clusters() {
        let m = model(vec![
            service("echo"),
            service("echo-v1"),
            service("echo-v2"),
            json!({"apiVersion": "split.smi-spec.io/v1alpha4", "kind": "TrafficSplit",
                "metadata": {"name": "s"},
                "spec": {"service": "echo", "backends": [
                    {"service": "echo-v1", "weight": 90}, {"service": "echo-v2", "weight": 10}]}}),
        ]);
        let t = translate(&m, None);
        let svc = &t.services[&ServiceKey::new("default", "echo")];
        let rc: route::RouteConfiguration = decode(find(&svc.routes, ECHO));
        let vh = &rc.virtual_hosts[0];
        assert!(vh.domains.contains(&ECHO.to_string()));
        let Some(route::route::Action::Route(action)) = &vh.routes[0].action else {
            panic!("no route action")
        };
        let Some(route::route_action::ClusterSpecifier::WeightedClusters(wc)) =
            &action.cluster_specifier
        else {
            panic!("not weighted: {action:?}")
        };
        let got: Vec<(String, u32)> = wc
            .clusters
            .iter()
            .map(|c| (c.name.clone(), c.weight.as_ref().map_or(0, |w| w.value)))
            .collect();
        assert_eq!(
            got,
            vec![
                ("echo-v1.default.svc.cluster.local:80".to_string(), 90),
                ("echo-v2.default.svc.cluster.local:80".to_string(), 10)
            ]
        );
    }

    #[test]
    fn cluster_ip_is_a_domain_for_intercepted_clients() {
        let m = model(vec![
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
            "spec": {"clusterIP": "198.18.0.10", "ports": [{"name": "http", "port": 80}]}}),
        ]);
        let t = translate(&m, None);
        let svc = &t.services[&ServiceKey::new("default", "echo")];
        let rc: route::RouteConfiguration = decode(find(&svc.routes, ECHO));
        let d = &rc.virtual_hosts[0].domains;
        assert!(d.contains(&"198.18.0.10:80".to_string()), "{d:?}");
        assert!(d.contains(&"198.18.0.10".to_string()), "{d:?}");
    }

    #[test]
    fn an_exported_service_gets_a_clusterset_vip_as_a_domain_and_others_do_not() {
        let cat = Catalog::new("c1", "cluster.local");
        cat.set_vip_range(Some("198.19.250.0/24".parse().expect("range")));
        let docs = vec![
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
            "spec": {"clusterIP": "198.18.0.10", "ports": [{"name": "http", "port": 80}]}}),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "local-only"},
            "spec": {"clusterIP": "198.18.0.11", "ports": [{"name": "http", "port": 80}]}}),
            json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
            "metadata": {"name": "echo"}}),
        ];
        let m = model_in(&cat, docs);
        let echo = &m.services[&ServiceKey::new("default", "echo")];
        let vip = echo.clusterset_vip.expect("a VIP for the exported service");
        assert!(vip.to_string().starts_with("198.19.250."), "{vip}");
        assert_eq!(
            m.services[&ServiceKey::new("default", "local-only")].clusterset_vip,
            None,
            "no clusterset name, no VIP"
        );
        let t = translate(&m, None);
        let svc = &t.services[&ServiceKey::new("default", "echo")];
        let rc: route::RouteConfiguration =
            decode(find(&svc.routes, "echo.default.svc.clusterset.local:80"));
        let d = &rc.virtual_hosts[0].domains;
        assert!(d.contains(&format!("{vip}:80")), "{d:?}");
        assert!(!d.iter().any(|x| x.starts_with("198.18.0.10")), "{d:?}");
        // The cluster name keeps the clusterIP, not the VIP.
        let rc: route::RouteConfiguration = decode(find(&svc.routes, ECHO));
        let d = &rc.virtual_hosts[0].domains;
        assert!(d.contains(&"198.18.0.10:80".to_string()), "{d:?}");
        assert!(!d.contains(&format!("{vip}:80")), "{d:?}");
    }

    #[test]
    fn api_listener_points_at_its_route_config() {
        let t = translate(&model(vec![service("echo")]), None);
        let svc = &t.services[&ServiceKey::new("default", "echo")];
        let l: listener::Listener = decode(find(&svc.listeners, ECHO));
        let api = l
            .api_listener
            .and_then(|a| a.api_listener)
            .expect("api listener");
        let m = hcm::HttpConnectionManager::decode(api.value.as_slice()).expect("hcm");
        let Some(hcm::http_connection_manager::RouteSpecifier::Rds(rds)) = m.route_specifier else {
            panic!("no rds")
        };
        assert_eq!(rds.route_config_name, ECHO);
        assert_eq!(m.http_filters[0].name, "envoy.filters.http.router");
        let c: cluster::Cluster = decode(find(&svc.clusters, ECHO));
        assert_eq!(
            c.eds_cluster_config.map(|e| e.service_name),
            Some(ECHO.to_string())
        );
        assert_eq!(c.lb_policy, LbPolicy::RoundRobin as i32);
    }

    fn policy(spec: serde_json::Value) -> (cluster::Cluster, route::RouteAction) {
        let m = model(vec![
            service("echo"),
            json!({"apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
                "metadata": {"name": "p"}, "spec": spec}),
        ]);
        let t = translate(&m, None);
        let svc = &t.services[&ServiceKey::new("default", "echo")];
        let c: cluster::Cluster = decode(find(&svc.clusters, ECHO));
        let rc: route::RouteConfiguration = decode(find(&svc.routes, ECHO));
        let Some(route::route::Action::Route(a)) = rc.virtual_hosts[0].routes[0].action.clone()
        else {
            panic!("no action")
        };
        (c, a)
    }

    #[test]
    fn policy_features_reach_cluster_and_route() {
        let (c, a) = policy(json!({
            "targetRef": {"kind": "Service", "name": "echo"},
            "loadBalancer": {"algorithm": "RingHash", "hash": {"header": "X-User"}},
            "circuitBreaker": {"maxConnections": 10, "maxPendingRequests": 5, "maxRequests": 20, "maxRetries": 2},
            "outlierDetection": {"consecutive5xx": 3, "baseEjectionTime": "5s", "maxEjectionPercent": 50},
            "retry": {"attempts": 4, "perTryTimeout": "200ms", "retryOn": ["5xx", "reset"],
                      "backoff": {"baseInterval": "10ms"}, "budget": {"percent": 25}},
            "timeout": "3s"
        }));
        assert_eq!(c.lb_policy, LbPolicy::RingHash as i32);
        let th = &c.circuit_breakers.expect("breakers").thresholds[0];
        assert_eq!(th.max_connections.as_ref().map(|v| v.value), Some(10));
        assert_eq!(th.max_pending_requests.as_ref().map(|v| v.value), Some(5));
        assert_eq!(th.max_requests.as_ref().map(|v| v.value), Some(20));
        assert_eq!(th.max_retries.as_ref().map(|v| v.value), Some(2));
        let budget = th.retry_budget.as_ref().expect("budget");
        assert_eq!(budget.budget_percent.as_ref().map(|p| p.value), Some(25.0));
        let od = c.outlier_detection.expect("outlier detection");
        assert_eq!(od.consecutive_5xx.map(|v| v.value), Some(3));
        assert_eq!(od.base_ejection_time.map(|d| d.seconds), Some(5));
        assert_eq!(od.max_ejection_percent.map(|v| v.value), Some(50));
        assert_eq!(a.timeout.map(|d| d.seconds), Some(3));
        let rp = a.retry_policy.expect("retry policy");
        assert_eq!(rp.retry_on, "5xx,reset");
        assert_eq!(rp.num_retries.map(|v| v.value), Some(4));
        assert_eq!(rp.per_try_timeout.map(|d| d.nanos), Some(200_000_000));
        let Some(route::route_action::hash_policy::PolicySpecifier::Header(h)) =
            a.hash_policy[0].policy_specifier.clone()
        else {
            panic!("no header hash")
        };
        assert_eq!(h.header_name, "x-user");
    }

    #[test]
    fn client_ip_affinity_hashes_the_source() {
        let m = model(vec![
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
            "spec": {"sessionAffinity": "ClientIP", "ports": [{"name": "http", "port": 80}]}}),
        ]);
        let t = translate(&m, None);
        let svc = &t.services[&ServiceKey::new("default", "echo")];
        let c: cluster::Cluster = decode(find(&svc.clusters, ECHO));
        assert_eq!(c.lb_policy, LbPolicy::RingHash as i32);
        let rc: route::RouteConfiguration = decode(find(&svc.routes, ECHO));
        let Some(route::route::Action::Route(a)) = &rc.virtual_hosts[0].routes[0].action else {
            panic!()
        };
        assert!(matches!(
            a.hash_policy[0].policy_specifier,
            Some(
                route::route_action::hash_policy::PolicySpecifier::ConnectionProperties(
                    route::route_action::hash_policy::ConnectionProperties { source_ip: true }
                )
            )
        ));
    }

    #[test]
    fn unchanged_services_reuse_translation() {
        let cat = Catalog::new("c1", "td");
        let up = |d: serde_json::Value| SourceUpdate {
            upserts: vec![(
                Arc::new(parse_object(d).expect("valid").expect("known")),
                "t".into(),
            )],
            ..Default::default()
        };
        cat.apply(up(service("a")));
        cat.apply(up(service("b")));
        let t1 = translate(&cat.current(), None);
        cat.apply(up(
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"},
            "spec": {"ports": [{"name": "http", "port": 81}]}}),
        ));
        let t2 = translate(&cat.current(), Some(&t1));
        let a = ServiceKey::new("default", "a");
        let b = ServiceKey::new("default", "b");
        assert!(Arc::ptr_eq(&t1.services[&a], &t2.services[&a]));
        assert!(!Arc::ptr_eq(&t1.services[&b], &t2.services[&b]));
    }
}
