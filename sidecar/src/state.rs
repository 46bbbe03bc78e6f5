//! The accepted mesh configuration, compiled from xDS resources into what the request path
//! reads: host -> routes, cluster -> endpoints by priority. Built only from resources that
//! passed validation; swapped atomically (arc-swap), never mutated in place.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use serde::Serialize;

use crate::balance::{Algorithm, Balancer, EndpointStats, Target};
use crate::policy::{ClusterPolicy, RetryPolicy};
use crate::runtime::ClusterRuntime;
use weft_proto::envoy::envoy::config::cluster::v3::Cluster;
use weft_proto::envoy::envoy::config::core::v3 as core;
use weft_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;
use weft_proto::envoy::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use weft_proto::envoy::envoy::config::listener::v3::Listener;
use weft_proto::envoy::envoy::config::route::v3 as route;
use weft_proto::envoy::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};

/// Why a resource was refused (the NACK's message names the resource and the field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?}: {message}")]
pub struct Invalid {
    /// `Listener`, `RouteConfiguration`, `Cluster`, `ClusterLoadAssignment`.
    pub kind: &'static str,
    /// Resource name.
    pub name: String,
    /// What is wrong.
    pub message: String,
}

fn invalid(kind: &'static str, name: &str, message: impl Into<String>) -> Invalid {
    Invalid {
        kind,
        name: name.to_string(),
        message: message.into(),
    }
}

/// Decodes `bytes` as `M`, naming the resource on failure.
pub fn decode<M: Message + Default>(
    kind: &'static str,
    name: &str,
    bytes: &[u8],
) -> Result<M, Invalid> {
    M::decode(bytes).map_err(|e| invalid(kind, name, format!("does not decode: {e}")))
}

/// The route configuration names a Listener refers to.
pub fn listener_routes(l: &Listener) -> Result<Option<String>, Invalid> {
    let Some(api) = l
        .api_listener
        .as_ref()
        .and_then(|a| a.api_listener.as_ref())
    else {
        return Ok(None);
    };
    let hcm: HttpConnectionManager = decode("Listener", &l.name, &api.value)?;
    match hcm.route_specifier {
        Some(RouteSpecifier::Rds(rds)) if !rds.route_config_name.is_empty() => {
            Ok(Some(rds.route_config_name))
        }
        _ => Err(invalid(
            "Listener",
            &l.name,
            "api_listener must use RDS with a route_config_name",
        )),
    }
}

/// What a route sends requests to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum RouteTarget {
    /// One cluster.
    Cluster(String),
    /// Weighted clusters (name, weight), total > 0.
    Weighted(Vec<(String, u32)>),
}

/// A compiled route.
#[derive(Debug, Clone, Serialize)]
pub struct Route {
    /// Path prefix, exact path or segment prefix.
    pub path: PathRule,
    /// Header name -> exact value, all must match.
    pub headers: Vec<(String, String)>,
    /// Where to.
    pub target: RouteTarget,
    /// Deadline.
    pub timeout: Option<Duration>,
    /// What to hash for consistent-hashing balancers.
    pub hash_on: Option<HashOn>,
    /// Retries.
    pub retry: Option<Arc<RetryPolicy>>,
}

/// A request's hash key source.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum HashOn {
    /// A header's value (lowercase name).
    Header(String),
    /// The client's IP.
    SourceIp,
}

/// A path rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum PathRule {
    /// Any path starting with this.
    Prefix(String),
    /// Exactly this path.
    Exact(String),
    /// This path or anything below it as a segment.
    Segment(String),
}

impl PathRule {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathRule::Prefix(p) => path.starts_with(p.as_str()),
            PathRule::Exact(p) => path == p,
            PathRule::Segment(p) => path
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        }
    }
}

impl Route {
    /// Whether a request matches.
    pub fn matches(&self, path: &str, headers: &http::HeaderMap) -> bool {
        self.path.matches(path)
            && self.headers.iter().all(|(n, v)| {
                headers.get(n.as_str()).and_then(|h| h.to_str().ok()) == Some(v.as_str())
            })
    }
}

/// Virtual hosts compiled: (domains, routes).
pub type VirtualHosts = Vec<(Vec<String>, Vec<Route>)>;

/// Compiles a RouteConfiguration's virtual hosts.
pub fn compile_routes(rc: &route::RouteConfiguration) -> Result<VirtualHosts, Invalid> {
    let kind = "RouteConfiguration";
    let mut out = Vec::new();
    for (vi, vh) in rc.virtual_hosts.iter().enumerate() {
        let mut routes = Vec::new();
        for (ri, r) in vh.routes.iter().enumerate() {
            let at = format!("virtual_hosts[{vi}].routes[{ri}]");
            let m = r
                .r#match
                .as_ref()
                .ok_or_else(|| invalid(kind, &rc.name, format!("{at}.match missing")))?;
            use route::route_match::PathSpecifier;
            let path = match &m.path_specifier {
                Some(PathSpecifier::Prefix(p)) => PathRule::Prefix(p.clone()),
                Some(PathSpecifier::Path(p)) => PathRule::Exact(p.clone()),
                Some(PathSpecifier::PathSeparatedPrefix(p)) => PathRule::Segment(p.clone()),
                other => {
                    return Err(invalid(
                        kind,
                        &rc.name,
                        format!("{at}.match: unsupported path specifier {other:?}"),
                    ));
                }
            };
            let mut headers = Vec::new();
            for (hi, h) in m.headers.iter().enumerate() {
                use route::header_matcher::HeaderMatchSpecifier;
                use weft_proto::envoy::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
                match &h.header_match_specifier {
                    Some(HeaderMatchSpecifier::StringMatch(s)) => match &s.match_pattern {
                        Some(MatchPattern::Exact(v)) => {
                            headers.push((h.name.to_ascii_lowercase(), v.clone()))
                        }
                        _ => {
                            return Err(invalid(
                                kind,
                                &rc.name,
                                format!(
                                    "{at}.match.headers[{hi}]: only exact matches are supported"
                                ),
                            ));
                        }
                    },
                    _ => {
                        return Err(invalid(
                            kind,
                            &rc.name,
                            format!("{at}.match.headers[{hi}]: only string matches are supported"),
                        ));
                    }
                }
            }
            let Some(route::route::Action::Route(action)) = &r.action else {
                return Err(invalid(
                    kind,
                    &rc.name,
                    format!("{at}: only route actions are supported"),
                ));
            };
            use route::route_action::ClusterSpecifier;
            let target = match &action.cluster_specifier {
                Some(ClusterSpecifier::Cluster(c)) => RouteTarget::Cluster(c.clone()),
                Some(ClusterSpecifier::WeightedClusters(w)) => {
                    let list: Vec<(String, u32)> = w
                        .clusters
                        .iter()
                        .map(|c| (c.name.clone(), c.weight.as_ref().map_or(0, |w| w.value)))
                        .collect();
                    if list.iter().map(|(_, w)| u64::from(*w)).sum::<u64>() == 0 {
                        return Err(invalid(
                            kind,
                            &rc.name,
                            format!("{at}: weighted clusters all have weight 0"),
                        ));
                    }
                    RouteTarget::Weighted(list)
                }
                _ => {
                    return Err(invalid(
                        kind,
                        &rc.name,
                        format!("{at}: route action names no cluster"),
                    ));
                }
            };
            let timeout = action
                .timeout
                .as_ref()
                .filter(|d| d.seconds > 0 || d.nanos > 0)
                .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32));
            use route::route_action::hash_policy::PolicySpecifier;
            let hash_on = action
                .hash_policy
                .iter()
                .find_map(|h| match &h.policy_specifier {
                    Some(PolicySpecifier::Header(hd)) => {
                        Some(HashOn::Header(hd.header_name.to_ascii_lowercase()))
                    }
                    Some(PolicySpecifier::ConnectionProperties(c)) if c.source_ip => {
                        Some(HashOn::SourceIp)
                    }
                    _ => None,
                });
            routes.push(Route {
                path,
                headers,
                target,
                timeout,
                hash_on,
                retry: action
                    .retry_policy
                    .as_ref()
                    .map(|p| Arc::new(RetryPolicy::from_xds(p))),
            });
        }
        out.push((vh.domains.clone(), routes));
    }
    Ok(out)
}

/// One endpoint of a cluster: what its assignment says ([`EndpointSpec`], read through
/// `Deref`), bound to its measurements and its cluster's load counters.
#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    /// What the assignment says.
    #[serde(flatten)]
    pub spec: EndpointSpec,
    /// Requests in flight and latency, kept across config updates.
    #[serde(serialize_with = "ser_stats")]
    pub stats: Arc<EndpointStats>,
    /// Load counters of its cluster and locality (load reports).
    #[serde(skip)]
    pub load: Arc<crate::load::LocalityLoad>,
    /// Cached metric handles of its 200s in this cluster.
    #[serde(skip)]
    pub hot: Arc<crate::metrics::HotCache>,
}

impl Endpoint {
    /// `spec` bound to `stats` and the load counters `load`.
    pub fn new(
        spec: EndpointSpec,
        stats: Arc<EndpointStats>,
        load: Arc<crate::load::LocalityLoad>,
    ) -> Self {
        Endpoint {
            spec,
            stats,
            load,
            hot: Arc::default(),
        }
    }
}

impl std::ops::Deref for Endpoint {
    type Target = EndpointSpec;

    fn deref(&self) -> &EndpointSpec {
        &self.spec
    }
}

fn ser_stats<S: serde::Serializer>(st: &Arc<EndpointStats>, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let mut x = s.serialize_struct("stats", 4)?;
    x.serialize_field("outstanding", &st.outstanding())?;
    x.serialize_field("ewma_ms", &(st.ewma().as_secs_f64() * 1000.0))?;
    x.serialize_field("ejected", &st.is_ejected())?;
    x.serialize_field("ejections", &st.ejections())?;
    x.end()
}

/// A cluster's endpoints grouped by priority, with Envoy's overprovisioning semantics, and a
/// balancer over each priority's healthy endpoints.
#[derive(Debug, Serialize)]
pub struct Endpoints {
    /// Endpoints per priority (index = priority).
    pub priorities: Vec<Vec<Endpoint>>,
    /// Overprovisioning factor, percent (140 = 1.4).
    pub overprovisioning: u32,
    /// The balancing algorithm.
    pub algorithm: Algorithm,
    /// Share of traffic per priority, percent (computed once per config).
    pub load: Vec<u32>,
    #[serde(skip)]
    balancers: Vec<Balancer>,
}

/// Finds (or creates) the stats of an endpoint, so measurements survive config updates.
pub type StatsFor<'a> = &'a mut dyn FnMut(&EndpointSpec) -> Arc<EndpointStats>;

/// What identifies an endpoint across clusters and versions: its address and, on another
/// network, how it is reached (pod ranges may overlap between networks, so the same address
/// behind a gateway is another endpoint: its own measurements, its own connections).
pub type EndpointKey = (SocketAddr, Option<Arc<crate::balance::Via>>);

/// One endpoint as its ClusterLoadAssignment states it, before it is bound to a cluster's
/// counters and balancer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointSpec {
    /// Address.
    pub addr: SocketAddr,
    /// Healthy (HEALTHY or UNKNOWN).
    pub healthy: bool,
    /// Zone (shared by the endpoints of one locality).
    pub zone: Arc<str>,
    /// The cluster it lives in (EndpointMeta; "" when the control plane did not say).
    pub origin: Arc<str>,
    /// The SPIFFE ID to expect when the endpoint's sidecar terminates mTLS; `None` for a
    /// plaintext endpoint.
    pub mtls_identity: Option<Arc<str>>,
    /// Its sidecar accepts only mTLS on this port (EndpointMeta `strict`: its PeerAuthentication
    /// or its namespace is STRICT): never sent plaintext — without a valid certificate here the
    /// request is a 503 `no-certificate`, not a downgrade.
    pub strict: bool,
    /// On another network: reached through its cluster's gateways (EndpointMeta `gateways`).
    pub via: Option<Arc<crate::balance::Via>>,
}

impl EndpointSpec {
    /// A healthy plaintext endpoint at `addr`, no zone, no origin.
    pub fn at(addr: SocketAddr) -> Self {
        EndpointSpec {
            addr,
            healthy: true,
            zone: "".into(),
            origin: "".into(),
            mtls_identity: None,
            strict: false,
            via: None,
        }
    }
}

/// A ClusterLoadAssignment, validated and parsed once when it arrives: what the xDS client
/// holds instead of the proto (a tenth of its memory), and what a cluster's [`Endpoints`] are
/// built from.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSet {
    /// Endpoints per priority (index = priority).
    pub priorities: Vec<Vec<EndpointSpec>>,
    /// Overprovisioning factor, percent (140 = 1.4).
    pub overprovisioning: u32,
}

/// One `Arc<str>` per distinct value: the endpoints of a service share their origin and
/// identity strings instead of holding a copy each. A hash set, so an assignment whose every
/// endpoint carries a distinct string costs linear time, not quadratic.
fn interned(pool: &mut std::collections::HashSet<Arc<str>>, s: &str) -> Arc<str> {
    if let Some(v) = pool.get(s) {
        return v.clone();
    }
    let v: Arc<str> = s.into();
    pool.insert(v.clone());
    v
}

/// Validates and parses a ClusterLoadAssignment.
pub fn parse_endpoints(cla: &ClusterLoadAssignment) -> Result<EndpointSet, Invalid> {
    let kind = "ClusterLoadAssignment";
    let mut priorities: Vec<Vec<EndpointSpec>> = Vec::new();
    let mut strings: std::collections::HashSet<Arc<str>> = std::collections::HashSet::new();
    for (li, l) in cla.endpoints.iter().enumerate() {
        let p = l.priority as usize;
        if p > 128 {
            return Err(invalid(
                kind,
                &cla.cluster_name,
                format!("endpoints[{li}].priority {p} is too large"),
            ));
        }
        if priorities.len() <= p {
            priorities.resize_with(p + 1, Vec::new);
        }
        let zone = interned(
            &mut strings,
            l.locality.as_ref().map_or("", |l| l.zone.as_str()),
        );
        priorities[p].reserve_exact(l.lb_endpoints.len());
        for (ei, e) in l.lb_endpoints.iter().enumerate() {
            let at = format!("endpoints[{li}].lb_endpoints[{ei}]");
            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                return Err(invalid(
                    kind,
                    &cla.cluster_name,
                    format!("{at}: no endpoint"),
                ));
            };
            let Some(core::address::Address::SocketAddress(sa)) =
                ep.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                return Err(invalid(
                    kind,
                    &cla.cluster_name,
                    format!("{at}: no socket address"),
                ));
            };
            let ip: std::net::IpAddr = sa.address.parse().map_err(|_| {
                invalid(
                    kind,
                    &cla.cluster_name,
                    format!("{at}: {:?} is not an IP", sa.address),
                )
            })?;
            let Some(core::socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier
            else {
                return Err(invalid(kind, &cla.cluster_name, format!("{at}: no port")));
            };
            let port = u16::try_from(port).map_err(|_| {
                invalid(
                    kind,
                    &cla.cluster_name,
                    format!("{at}: port {port} out of range"),
                )
            })?;
            let health = e.health_status;
            let addr = SocketAddr::new(ip, port);
            let meta = e
                .metadata
                .as_ref()
                .and_then(|m| m.typed_filter_metadata.get("weft"))
                .and_then(|a| weft_proto::xds::EndpointMeta::decode(a.value.as_slice()).ok());
            let origin = interned(
                &mut strings,
                meta.as_ref().map_or("", |m| m.cluster.as_str()),
            );
            let strict = meta.as_ref().is_some_and(|m| m.mtls && m.strict);
            let via = match meta.as_ref() {
                Some(m) if !m.gateways.is_empty() => {
                    let bad = |what: String| invalid(kind, &cla.cluster_name, what);
                    let gateways = m
                        .gateways
                        .iter()
                        .enumerate()
                        .map(|(i, g)| {
                            g.parse::<SocketAddr>().map_err(|_| {
                                bad(format!("{at}.metadata.gateways[{i}]: {g:?} is not IP:PORT"))
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    weft_proto::SpiffeId::parse(&m.gateway_identity)
                        .map_err(|err| bad(format!("{at}.metadata.gateway_identity: {err}")))?;
                    Some(Arc::new(crate::balance::Via {
                        gateways,
                        identity: interned(&mut strings, &m.gateway_identity),
                    }))
                }
                _ => None,
            };
            let mtls_identity = match meta {
                Some(m) if m.mtls => {
                    weft_proto::SpiffeId::parse(&m.identity).map_err(|err| {
                        invalid(
                            kind,
                            &cla.cluster_name,
                            format!("{at}.metadata.identity: {err}"),
                        )
                    })?;
                    Some(interned(&mut strings, &m.identity))
                }
                _ => None,
            };
            priorities[p].push(EndpointSpec {
                addr,
                healthy: health == core::HealthStatus::Healthy as i32
                    || health == core::HealthStatus::Unknown as i32,
                zone: zone.clone(),
                origin,
                mtls_identity,
                strict,
                via,
            });
        }
    }
    let overprovisioning = cla
        .policy
        .as_ref()
        .and_then(|p| p.overprovisioning_factor.as_ref())
        .map_or(140, |v| v.value);
    Ok(EndpointSet {
        priorities,
        overprovisioning,
    })
}

impl EndpointSet {
    /// The endpoints of a cluster balanced with `algorithm`, bound to their measurements
    /// (`stats`, kept across versions) and their cluster's per-locality load counters.
    pub fn build(
        &self,
        algorithm: Algorithm,
        stats: StatsFor<'_>,
        load_for: &dyn Fn(&str) -> Arc<crate::load::LocalityLoad>,
    ) -> Endpoints {
        let priorities = self
            .priorities
            .iter()
            .map(|eps| {
                eps.iter()
                    .map(|e| Endpoint::new(e.clone(), stats(e), load_for(&e.zone)))
                    .collect()
            })
            .collect();
        Endpoints::new(priorities, self.overprovisioning, algorithm)
    }
}

impl Endpoints {
    /// Whether one more endpoint may be ejected without passing `max_percent` of the cluster.
    pub fn may_eject(&self, max_percent: u32) -> bool {
        let all = self.priorities.iter().flatten();
        let total = all.clone().count();
        let ejected = all.filter(|e| e.stats.is_ejected()).count();
        total > 0 && (ejected + 1) * 100 <= total * max_percent as usize
    }

    /// Endpoints with their balancers built.
    pub fn new(
        priorities: Vec<Vec<Endpoint>>,
        overprovisioning: u32,
        algorithm: Algorithm,
    ) -> Self {
        let balancers = priorities
            .iter()
            .map(|eps| {
                let healthy = eps
                    .iter()
                    .filter(|e| e.healthy)
                    .map(|e| Target {
                        addr: e.addr,
                        origin: e.origin.clone(),
                        mtls_identity: e.mtls_identity.clone(),
                        strict: e.strict,
                        via: e.via.clone(),
                        stats: e.stats.clone(),
                        load: e.load.clone(),
                        hot: e.hot.clone(),
                    })
                    .collect();
                Balancer::new(algorithm, healthy)
            })
            .collect();
        let mut e = Endpoints {
            priorities,
            overprovisioning,
            algorithm,
            load: Vec::new(),
            balancers,
        };
        e.load = e.priority_load();
        e
    }

    /// Share of traffic (percent) each priority gets: a priority takes `healthy share × factor`
    /// capped at what is left, the rest spills to the next one (Envoy's priority load).
    pub fn priority_load(&self) -> Vec<u32> {
        self.load_with(|e| e.healthy)
    }

    /// Priority load counting only endpoints `usable` says are.
    fn load_with(&self, usable: impl Fn(&Endpoint) -> bool) -> Vec<u32> {
        let health: Vec<u32> = self
            .priorities
            .iter()
            .map(|eps| {
                if eps.is_empty() {
                    return 0;
                }
                let healthy = eps.iter().filter(|e| usable(e)).count() as u64;
                ((healthy * u64::from(self.overprovisioning)) / eps.len() as u64).min(100) as u32
            })
            .collect();
        let total: u32 = health.iter().sum::<u32>().min(100);
        if total == 0 {
            return vec![0; health.len()];
        }
        let mut left = 100u32;
        let mut load: Vec<u32> = health
            .iter()
            .map(|h| {
                let take = (*h).min(left);
                left -= take;
                take
            })
            .collect();
        if total < 100 {
            // Normalise so the loads sum to 100 when no priority can take its full share.
            let sum: u32 = load.iter().sum();
            load = load.iter().map(|l| l * 100 / sum.max(1)).collect();
        }
        load
    }

    /// Picks an endpoint for a retry, avoiding `tried`: the priority by the load of the
    /// endpoints that are healthy, not ejected and not tried, then that priority's balancer
    /// (a few draws, then a scan, for an endpoint not tried). Falls back to [`Endpoints::pick`]
    /// when every endpoint was tried.
    pub fn pick_untried(
        &self,
        rand: u64,
        hash: Option<u64>,
        tried: &[SocketAddr],
    ) -> Option<&Target> {
        if tried.is_empty() {
            return self.pick(rand, hash);
        }
        let load =
            self.load_with(|e| e.healthy && !e.stats.is_ejected() && !tried.contains(&e.addr));
        let Some(chosen) = priority_by_load(&load, rand) else {
            return self.pick(rand, hash);
        };
        let b = self.balancers.get(chosen)?;
        let mut r = rand;
        for _ in 0..4 {
            let t = b.pick(r, hash)?;
            if !tried.contains(&t.addr) {
                return Some(t);
            }
            r = r.rotate_left(17).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        b.targets()
            .iter()
            .find(|t| !tried.contains(&t.addr) && !t.stats.is_ejected())
            .or_else(|| self.pick(rand, hash))
    }

    /// Picks an endpoint: a priority by load (`rand`'s high bits), then the priority's
    /// balancer (`rand`, and `hash` for hashing algorithms).
    pub fn pick(&self, rand: u64, hash: Option<u64>) -> Option<&Target> {
        let live;
        let load = if crate::balance::ejections_possible() {
            live = self.load_with(|e| e.healthy && !e.stats.is_ejected());
            &live
        } else {
            &self.load
        };
        let chosen = priority_by_load(load, rand)
            .or_else(|| self.balancers.iter().position(|b| !b.targets().is_empty()))?;
        self.balancers.get(chosen)?.pick(rand, hash)
    }
}

/// The priority a request goes to: `rand`'s high bits rolled against the priority load
/// (percent per priority); `None` when no priority takes any.
fn priority_by_load(load: &[u32], rand: u64) -> Option<usize> {
    let roll = ((rand >> 48) % 100) as u32;
    let mut acc = 0;
    load.iter().position(|l| {
        acc += l;
        roll < acc
    })
}

/// A cluster as the request path sees it.
#[derive(Debug, Serialize)]
pub struct ClusterState {
    /// The EDS name of its endpoints.
    pub eds_name: String,
    /// Its endpoints, once received.
    pub endpoints: Option<Arc<Endpoints>>,
    /// Its endpoints speak HTTP/2 only (`appProtocol` grpc, h2c, kubernetes.io/h2c, http2):
    /// requests go to them over HTTP/2 with prior knowledge.
    pub http2: bool,
    /// Circuit breakers, retry budget, outlier detection.
    pub policy: Arc<ClusterPolicy>,
    /// Live counters (requests and retries in flight), kept across config versions.
    #[serde(skip)]
    pub runtime: Arc<ClusterRuntime>,
}

/// Weft's metadata on a Cluster, when it has it.
pub fn cluster_meta(c: &Cluster) -> Option<weft_proto::xds::ClusterMeta> {
    c.metadata
        .as_ref()
        .and_then(|m| m.typed_filter_metadata.get("weft"))
        .and_then(|a| weft_proto::xds::ClusterMeta::decode(a.value.as_slice()).ok())
}

/// The balancing algorithm a Cluster asks for (Weft metadata, else its lb_policy).
pub fn cluster_algorithm(c: &Cluster) -> Algorithm {
    use weft_proto::envoy::envoy::config::cluster::v3::cluster::LbPolicy;
    if let Some(m) = cluster_meta(c) {
        return Algorithm::from_name(&m.algorithm);
    }
    match LbPolicy::try_from(c.lb_policy) {
        Ok(LbPolicy::LeastRequest) => Algorithm::LeastRequest,
        Ok(LbPolicy::Random) => Algorithm::Random,
        Ok(LbPolicy::RingHash) => Algorithm::RingHash,
        Ok(LbPolicy::Maglev) => Algorithm::Maglev,
        _ => Algorithm::RoundRobin,
    }
}

/// Validates a Cluster and returns its EDS service name.
pub fn cluster_eds_name(c: &Cluster) -> Result<String, Invalid> {
    if c.name.is_empty() {
        return Err(invalid("Cluster", "", "name is empty"));
    }
    use weft_proto::envoy::envoy::config::cluster::v3::cluster::{
        ClusterDiscoveryType, DiscoveryType,
    };
    match c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32 => {}
        _ => {
            return Err(invalid(
                "Cluster",
                &c.name,
                "only EDS clusters are supported",
            ));
        }
    }
    Ok(c.eds_cluster_config
        .as_ref()
        .map(|e| e.service_name.clone())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| c.name.clone()))
}

/// A Cluster, validated and read once when it arrives (what the xDS client holds instead of
/// the proto).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSpec {
    /// The EDS name of its endpoints.
    pub eds_name: String,
    /// How its endpoints are balanced.
    pub algorithm: Algorithm,
    /// Circuit breakers, retry budget, outlier detection.
    pub policy: Arc<ClusterPolicy>,
    /// Its endpoints speak HTTP/2 only.
    pub http2: bool,
}

impl ClusterSpec {
    /// Validates and reads a Cluster.
    pub fn from_xds(c: &Cluster) -> Result<Self, Invalid> {
        Ok(ClusterSpec {
            eds_name: cluster_eds_name(c)?,
            algorithm: cluster_algorithm(c),
            policy: Arc::new(ClusterPolicy::from_xds(c)),
            http2: cluster_meta(c).is_some_and(|m| weft_proto::protocol::is_http2(&m.app_protocol)),
        })
    }
}

/// A Listener, validated and read once when it arrives: the route configuration it refers to
/// (an API listener) or the inbound policy it carries (`weft-inbound`).
#[derive(Debug, Clone)]
pub struct ListenerSpec {
    /// The RouteConfiguration an API listener names.
    pub routes: Option<String>,
    /// The inbound policy of a `weft-inbound` Listener.
    pub inbound: Option<InboundPolicy>,
}

impl ListenerSpec {
    /// Validates and reads a Listener; when both its inbound policy and its routes are wrong,
    /// the error names both.
    pub fn from_xds(l: &Listener) -> Result<Self, Invalid> {
        match (InboundPolicy::from_listener(l), listener_routes(l)) {
            (Ok(inbound), Ok(routes)) => Ok(ListenerSpec { inbound, routes }),
            (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
            (Err(a), Err(b)) => Err(Invalid {
                message: format!("{}; and {}", a.message, b.message),
                ..a
            }),
        }
    }
}

/// A RouteConfiguration compiled once when it arrives: each virtual host's domains and routes.
pub type RouteSpec = Vec<(Vec<String>, Arc<Vec<Route>>)>;

/// Compiles a RouteConfiguration into the form the xDS client holds.
pub fn route_spec(rc: &route::RouteConfiguration) -> Result<RouteSpec, Invalid> {
    Ok(compile_routes(rc)?
        .into_iter()
        .map(|(domains, routes)| (domains, Arc::new(routes)))
        .collect())
}

/// Everything the request path reads, swapped as a whole.
#[derive(Debug, Default, Serialize)]
pub struct MeshConfig {
    /// Host (as in `:authority`, with or without port) -> routes.
    pub hosts: crate::http::FastMap<String, Arc<Vec<Route>>>,
    /// Cluster name -> state.
    pub clusters: BTreeMap<String, ClusterState>,
    /// Accepted versions per type URL.
    pub versions: BTreeMap<String, String>,
    /// Endpoint address -> the SPIFFE ID its sidecar must present (mTLS endpoints only).
    #[serde(skip)]
    pub mtls_identities: HashMap<SocketAddr, Arc<str>>,
    /// How this sidecar's inbound treats each port (the `weft-inbound` Listener its control
    /// plane resolved for this workload); `None` when the control plane sent none.
    pub inbound: Option<InboundPolicy>,
    /// Meshed endpoints of STRICT namespaces: never sent plaintext, also when reached by
    /// address (passthrough, opaque TCP) rather than through a route.
    #[serde(skip)]
    pub strict_endpoints: std::collections::HashSet<SocketAddr>,
    /// What the mesh DNS answers (from the virtual hosts' names and addresses).
    pub dns: DnsTable,
    /// On demand: every Service the proxy may call (what is not subscribed yet resolves here).
    pub directory: Arc<crate::directory::Directory>,
    /// On demand: the service-ports subscribed, since when and why.
    pub subscriptions: BTreeMap<String, Subscribed>,
    /// On demand: addresses the control plane said what they are, once the config of their
    /// Services is held too.
    pub known_addresses: BTreeMap<std::net::IpAddr, AddressFacts>,
}

/// What the control plane said of an address (on demand).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AddressFacts {
    /// A meshed endpoint has it.
    pub meshed: bool,
    /// Ports of STRICT ones: they never get plaintext.
    pub strict_ports: Arc<[u16]>,
    /// A Service's clusterIP or VIP.
    pub service_address: bool,
}

/// Where an unrouted connection to an address may go (on demand).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrouted {
    /// As before on-demand: by what the held config says (passthrough, mesh mTLS).
    AsHeld,
    /// Refused: a STRICT meshed endpoint the proxy holds no way to reach over mTLS, or a
    /// Service address on a port the Service lacks.
    Refuse(&'static str),
}

/// Why a service-port is subscribed on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Why {
    /// A request or connection used it.
    Request,
    /// `--warm-hosts` names it: subscribed at start, never dropped.
    Warm,
}

impl Why {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Request => "request",
            Why::Warm => "warm",
        }
    }
}

/// One on-demand subscription, as `/config_dump` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Subscribed {
    /// Why.
    pub why: Why,
    /// Since when (ms since the epoch).
    pub since_unix_ms: u64,
    /// Its routes, every cluster they name and those clusters' endpoints are held: a request
    /// to it is routed.
    pub complete: bool,
}

pub use weft_proto::protocol::Declared;

/// Mesh DNS names (lower case, no trailing dot) -> the addresses the mesh DNS answers.
pub type DnsTable = crate::http::FastMap<String, Arc<[std::net::IpAddr]>>;

/// Adds one virtual host's names to `table`: each DNS name among `domains` of a Service
/// (`<svc>.<ns>.svc.<zone>`, without a port) maps to the addresses among them (`ip`,
/// `ip:port`, `[v6]:port`: the clusterIP or clusterset VIP the control plane put beside it).
pub fn add_dns_names(table: &mut DnsTable, domains: &[String]) {
    let mut addrs: Vec<std::net::IpAddr> = domains
        .iter()
        .filter_map(|d| {
            d.parse::<std::net::IpAddr>()
                .ok()
                .or_else(|| d.parse::<SocketAddr>().ok().map(|s| s.ip()))
        })
        .collect();
    if addrs.is_empty() {
        return;
    }
    addrs.sort_unstable();
    addrs.dedup();
    for d in domains {
        if d.contains(':') || !d.contains(".svc.") || d.parse::<std::net::IpAddr>().is_ok() {
            continue;
        }
        let name = d.trim_end_matches('.').to_ascii_lowercase();
        match table.get_mut(&name) {
            Some(held) => {
                let mut merged: Vec<std::net::IpAddr> =
                    held.iter().copied().chain(addrs.iter().copied()).collect();
                merged.sort_unstable();
                merged.dedup();
                *held = merged.into();
            }
            None => {
                table.insert(name, addrs.clone().into());
            }
        }
    }
}

/// How this sidecar's inbound treats its ports, from the `weft-inbound` Listener.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InboundPolicy {
    /// The mode on ports without an override.
    pub mode: weft_proto::tls::MtlsMode,
    /// Where it comes from (`PeerAuthentication ns/name`, `Namespace ns`, `default`).
    pub source: String,
    /// Container port -> what is known of it.
    pub ports: BTreeMap<u16, InboundPort>,
    /// Who may call: the RBAC filters of the Listener's filter chains.
    pub authz: Arc<InboundAuthz>,
    /// Its namespace's egress host list: the only Services its directory keeps (empty: all).
    #[serde(skip)]
    pub egress: Vec<weft_proto::visibility::EgressHost>,
}

/// A workload's authorization: the RBAC filters of the `weft-inbound` Listener, compiled.
#[derive(Debug, Default, Serialize)]
pub struct InboundAuthz {
    /// The HTTP chain's filters: judged per request.
    #[serde(skip)]
    pub http: weft_proto::rbac::Engine,
    /// The TCP chain's filters: judged per connection spliced as opaque TCP.
    #[serde(skip)]
    pub tcp: weft_proto::rbac::Engine,
    /// The HTTP chain's filters and policy names, for the config dump.
    pub http_filters: Vec<String>,
    /// The TCP chain's filters and policy names.
    pub tcp_filters: Vec<String>,
    /// The chains as sent, which equality compares.
    #[serde(skip)]
    raw: Vec<u8>,
}

impl PartialEq for InboundAuthz {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}

impl InboundAuthz {
    /// Reads the RBAC filters of the `weft-inbound` Listener's chains. A chain, filter or
    /// matcher this sidecar cannot enforce refuses the whole Listener (the previous one keeps
    /// serving), never a part of it.
    pub fn from_listener(l: &Listener) -> Result<Self, Invalid> {
        let chains = weft_proto::rbac::Chains::of(&l.filter_chains)
            .map_err(|e| invalid("Listener", &l.name, e.to_string()))?;
        let raw = l
            .filter_chains
            .iter()
            .flat_map(|c| c.encode_to_vec())
            .collect();
        let (http, tcp) = (chains.http, chains.tcp);
        Ok(InboundAuthz {
            http_filters: http.describe(),
            tcp_filters: tcp.describe(),
            http,
            tcp,
            raw,
        })
    }
}

/// One container port of the workload.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InboundPort {
    /// Its own mode, overriding the workload's.
    pub mode: Option<weft_proto::tls::MtlsMode>,
    /// Where the override comes from.
    pub source: String,
    /// What its Service ports declare, as the control plane sent it.
    pub protocol: String,
    /// How that declaration is treated (`None`: sniffed).
    #[serde(skip)]
    pub declared: Option<Declared>,
}

impl InboundPolicy {
    /// Reads and validates the `weft-inbound` Listener; `Ok(None)` for any other Listener.
    pub fn from_listener(l: &Listener) -> Result<Option<Self>, Invalid> {
        if l.name != weft_proto::keys::INBOUND_LISTENER {
            return Ok(None);
        }
        let name = l.name.as_str();
        let any = l
            .metadata
            .as_ref()
            .and_then(|m| m.typed_filter_metadata.get("weft"))
            .ok_or_else(|| {
                invalid(
                    "Listener",
                    name,
                    "metadata.typed_filter_metadata[\"weft\"] is missing",
                )
            })?;
        let meta: weft_proto::xds::InboundMeta = decode("Listener", name, &any.value)?;
        let mode = |field: &str, v: &str| {
            weft_proto::tls::MtlsMode::parse(v)
                .map_err(|m| invalid("Listener", name, format!("weft metadata {field}: {m}")))
        };
        let mut ports = BTreeMap::new();
        for (i, p) in meta.ports.iter().enumerate() {
            let port = u16::try_from(p.port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| {
                    invalid(
                        "Listener",
                        name,
                        format!(
                            "weft metadata ports[{i}].port: {} is not a port (1-65535)",
                            p.port
                        ),
                    )
                })?;
            let m = if p.mtls_mode.is_empty() {
                None
            } else {
                Some(mode(&format!("ports[{i}].mtls_mode"), &p.mtls_mode)?)
            };
            ports.insert(
                port,
                InboundPort {
                    mode: m,
                    source: p.mtls_source.clone(),
                    protocol: p.protocol.clone(),
                    declared: Declared::of(&p.protocol),
                },
            );
        }
        let egress = weft_proto::visibility::parse_egress_hosts(&meta.egress_hosts.join(","))
            .map_err(|e| invalid("Listener", name, format!("weft metadata egress_hosts: {e}")))?;
        Ok(Some(InboundPolicy {
            mode: mode("mtls_mode", &meta.mtls_mode)?,
            source: meta.mtls_source,
            ports,
            authz: Arc::new(InboundAuthz::from_listener(l)?),
            egress,
        }))
    }
}

impl MeshConfig {
    /// How this proxy's inbound listener treats connections to one port: the port's mode and
    /// declared protocol from its `weft-inbound` Listener. Until that Listener is accepted (a
    /// proxy just started, restarted while the control plane is down, or with only some types
    /// accepted yet, or a control plane that sends none) nothing says how this workload
    /// accepts connections: STRICT, so plaintext is refused rather than let in by a guess.
    pub fn inbound_for(&self, port: u16) -> (weft_proto::tls::MtlsMode, Option<Declared>) {
        match &self.inbound {
            Some(i) => match i.ports.get(&port) {
                Some(p) => (p.mode.unwrap_or(i.mode), p.declared),
                None => (i.mode, None),
            },
            None => (weft_proto::tls::MtlsMode::Strict, None),
        }
    }

    /// The workload's authorization; `None` until its `weft-inbound` Listener is accepted,
    /// when nothing says who may call, so the inbound lets no one in (as Envoy, which has no
    /// inbound listener before LDS).
    pub fn authz(&self) -> Option<&Arc<InboundAuthz>> {
        self.inbound.as_ref().map(|i| &i.authz)
    }

    /// Whether a connection to `dst` is something this config knows: a routed address, a
    /// held meshed endpoint, or an address the control plane said what it is.
    pub fn knows(&self, dst: SocketAddr) -> bool {
        self.known_addresses.contains_key(&dst.ip().to_canonical())
            || self.mtls_identities.contains_key(&dst)
            || self.strict_endpoints.contains(&dst)
            || self.hosts.contains_key(&dst.to_string())
    }

    /// On demand, what an unrouted connection to `dst` may do once its address is known:
    /// anything the held config knows of `dst` decides as before; otherwise a STRICT meshed
    /// address or a Service address is refused, never sent plaintext.
    pub fn unrouted(&self, dst: SocketAddr) -> Unrouted {
        if self.mtls_identities.contains_key(&dst) || self.strict_endpoints.contains(&dst) {
            return Unrouted::AsHeld;
        }
        match self.known_addresses.get(&dst.ip().to_canonical()) {
            Some(f) if f.strict_ports.contains(&dst.port()) => Unrouted::Refuse("mtls-required"),
            Some(f) if f.service_address && !self.hosts.contains_key(&dst.to_string()) => {
                Unrouted::Refuse("no-route")
            }
            _ => Unrouted::AsHeld,
        }
    }

    /// The addresses the mesh DNS answers for `name` (lower case, no trailing dot): from the
    /// held virtual hosts, else (on demand) from the directory.
    pub fn dns_addresses(&self, name: &str) -> Option<Arc<[std::net::IpAddr]>> {
        self.dns
            .get(name)
            .cloned()
            .or_else(|| self.directory.dns(name))
    }

    /// Routes for an authority: as given, else resolved by the mesh's naming rules
    /// (`<svc>` in the proxy's `namespace`, `<svc>.<ns>`, ...; see `weft_proto::names`).
    pub fn routes_for(&self, authority: &str, namespace: &str) -> Option<&Arc<Vec<Route>>> {
        if let Some(r) = self.hosts.get(authority) {
            return Some(r);
        }
        let h = weft_proto::names::resolve_host(authority, namespace)?;
        let fqdn = weft_proto::names::service_host(&h.name, &h.namespace, h.scope);
        match h.port {
            Some(p) => self.hosts.get(&format!("{fqdn}:{p}")),
            None => self.hosts.get(&fqdn),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-endpoint assignment whose endpoint carries `meta`.
    fn cla_with(meta: &weft_proto::xds::EndpointMeta) -> ClusterLoadAssignment {
        use weft_proto::envoy::envoy::config::endpoint::v3 as ep;
        use weft_proto::envoy::google::protobuf::Any;
        ClusterLoadAssignment {
            cluster_name: "echo.default.svc.clusterset.local:80".into(),
            endpoints: vec![ep::LocalityLbEndpoints {
                lb_endpoints: vec![ep::LbEndpoint {
                    metadata: Some(core::Metadata {
                        typed_filter_metadata: [(
                            "weft".to_string(),
                            Any {
                                type_url: String::new(),
                                value: meta.encode_to_vec(),
                            },
                        )]
                        .into(),
                        ..Default::default()
                    }),
                    host_identifier: Some(HostIdentifier::Endpoint(ep::Endpoint {
                        address: Some(core::Address {
                            address: Some(core::address::Address::SocketAddress(
                                core::SocketAddress {
                                    address: "10.1.0.7".into(),
                                    port_specifier: Some(
                                        core::socket_address::PortSpecifier::PortValue(8080),
                                    ),
                                    ..Default::default()
                                },
                            )),
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn an_endpoint_behind_gateways_says_so_and_bad_gateways_are_refused_by_field() {
        let meta = weft_proto::xds::EndpointMeta {
            cluster: "east".into(),
            identity: "spiffe://td/ns/default/sa/echo".into(),
            mtls: true,
            gateways: vec!["198.18.0.5:15443".into(), "198.18.0.6:15443".into()],
            gateway_identity: "spiffe://td/ns/weft-system/sa/weft-gateway".into(),
            ..Default::default()
        };
        let set = parse_endpoints(&cla_with(&meta)).expect("valid");
        let via = set.priorities[0][0].via.as_ref().expect("via");
        assert_eq!(via.gateways.len(), 2);
        assert_eq!(&*via.identity, "spiffe://td/ns/weft-system/sa/weft-gateway");
        let none = weft_proto::xds::EndpointMeta {
            gateways: Vec::new(),
            ..meta.clone()
        };
        assert!(
            parse_endpoints(&cla_with(&none)).expect("valid").priorities[0][0]
                .via
                .is_none()
        );
        for (bad, field) in [
            (
                weft_proto::xds::EndpointMeta {
                    gateways: vec!["gw.east:15443".into()],
                    ..meta.clone()
                },
                "metadata.gateways[0]",
            ),
            (
                weft_proto::xds::EndpointMeta {
                    gateway_identity: "gw".into(),
                    ..meta.clone()
                },
                "metadata.gateway_identity",
            ),
        ] {
            let e = parse_endpoints(&cla_with(&bad)).expect_err("refused");
            assert!(format!("{e:?}").contains(field), "{e:?}");
        }
    }

    fn eps(p: &[(usize, bool)]) -> Endpoints {
        let mut priorities: Vec<Vec<Endpoint>> = Vec::new();
        for (i, (prio, healthy)) in p.iter().enumerate() {
            if priorities.len() <= *prio {
                priorities.resize_with(prio + 1, Vec::new);
            }
            let addr = SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16));
            priorities[*prio].push(Endpoint::new(
                EndpointSpec {
                    healthy: *healthy,
                    ..EndpointSpec::at(addr)
                },
                Arc::default(),
                Arc::new(crate::load::LocalityLoad::new("")),
            ));
        }
        Endpoints::new(priorities, 140, Algorithm::RoundRobin)
    }

    #[test]
    fn a_retry_spills_to_the_next_priority_once_a_priority_is_all_tried() {
        // Priority 0: two endpoints, priority 1: one.
        let e = eps(&[(0, true), (0, true), (1, true)]);
        let addr = |i: usize| SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16));
        for r in 0..200u64 {
            let rand = crate::balance::hash64(&r.to_le_bytes());
            let t = e.pick_untried(rand, None, &[addr(0)]).expect("pick");
            assert_ne!(t.addr, addr(0), "a tried endpoint is avoided");
            let t = e
                .pick_untried(rand, None, &[addr(0), addr(1)])
                .expect("pick");
            assert_eq!(t.addr, addr(2), "priority 0 all tried: the next priority");
        }
    }

    #[test]
    fn an_ejection_seen_through_one_cluster_moves_every_cluster_sharing_the_address() {
        // Cluster `y` lists A (priority 0) and B (priority 1); cluster `x` lists A too, with
        // the same stats (stats are per address). `x`'s outlier detection ejects A.
        let a = SocketAddr::from(([127, 0, 0, 1], 1000));
        let b = SocketAddr::from(([127, 0, 0, 1], 1001));
        let stats: Arc<EndpointStats> = Arc::default();
        let at = |addr, stats: &Arc<EndpointStats>| {
            Endpoint::new(
                EndpointSpec::at(addr),
                stats.clone(),
                Arc::new(crate::load::LocalityLoad::new("")),
            )
        };
        let y = Endpoints::new(
            vec![vec![at(a, &stats)], vec![at(b, &Arc::default())]],
            140,
            Algorithm::RoundRobin,
        );
        let x = Endpoints::new(vec![vec![at(a, &stats)]], 140, Algorithm::RoundRobin);
        assert_eq!(y.pick(0, None).map(|t| t.addr), Some(a));
        let policy = crate::policy::OutlierPolicy {
            consecutive_5xx: 1,
            consecutive_gateway: 0,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 100,
        };
        let ejected =
            stats.record_outcome(crate::policy::Outcome::Status(503), Some(&policy), || {
                x.may_eject(100)
            });
        assert!(ejected);
        // `y` was built before the ejection and never told of it: it still spills to B.
        for roll in 0..100u64 {
            assert_eq!(
                y.pick(roll << 48, None).map(|t| t.addr),
                Some(b),
                "roll {roll}"
            );
        }
    }

    #[test]
    fn a_listener_wrong_in_two_ways_is_refused_naming_both() {
        // The inbound Listener without its weft metadata, and an api_listener without an RDS
        // name: an operator fixing the first should not meet the second only after a push.
        let l = weft_proto::resources::api_listener(weft_proto::keys::INBOUND_LISTENER, "");
        let e = ListenerSpec::from_xds(&l).expect_err("refused");
        assert_eq!(e.name, weft_proto::keys::INBOUND_LISTENER);
        assert!(e.message.contains("typed_filter_metadata"), "{e}");
        assert!(e.message.contains("route_config_name"), "{e}");
    }

    #[test]
    fn priority_load_follows_overprovisioning() {
        // All healthy: everything to priority 0.
        assert_eq!(
            eps(&[(0, true), (0, true), (1, true)]).priority_load(),
            vec![100, 0]
        );
        // 3 of 4 healthy: 75 % × 1.4 = 105 → still all of it.
        assert_eq!(
            eps(&[(0, true), (0, true), (0, true), (0, false), (1, true)]).priority_load(),
            vec![100, 0]
        );
        // 1 of 2 healthy: 70 % stays, 30 % spills.
        assert_eq!(
            eps(&[(0, true), (0, false), (1, true)]).priority_load(),
            vec![70, 30]
        );
        // None healthy at 0: all to 1.
        assert_eq!(eps(&[(0, false), (1, true)]).priority_load(), vec![0, 100]);
    }

    #[test]
    fn pick_skips_unhealthy_and_spills() {
        let e = eps(&[(0, false), (0, false), (1, true)]);
        for roll in 0..100u64 {
            assert_eq!(e.pick(roll << 48, None).map(|t| t.addr.port()), Some(1002));
        }
        assert_eq!(eps(&[(0, false)]).pick(5, None).map(|t| t.addr), None);
        // 1 of 2 healthy at priority 0: 70 % stays there, 30 % spills to priority 1.
        let e = eps(&[(0, true), (0, false), (1, true)]);
        let spilled = (0..100u64)
            .filter(|r| e.pick(r << 48, None).map(|t| t.addr.port()) == Some(1002))
            .count();
        assert_eq!(spilled, 30);
    }

    /// Config arrives one type at a time (CDS, EDS, then LDS): until the `weft-inbound`
    /// Listener is accepted, nothing says how this workload accepts connections, so inbound
    /// stays STRICT — it does not fall back to a namespace mode taken from whatever clusters
    /// arrived first (a namespace with no Service would have read PERMISSIVE).
    #[test]
    fn an_unrouted_mesh_address_is_refused_unless_the_held_config_reaches_it() {
        let dst: SocketAddr = "198.18.9.2:8200".parse().expect("addr");
        let mut config = MeshConfig::default();
        config.known_addresses.insert(
            dst.ip(),
            AddressFacts {
                meshed: true,
                strict_ports: [8200].into(),
                service_address: false,
            },
        );
        assert_eq!(config.unrouted(dst), Unrouted::Refuse("mtls-required"));
        // Another port of the same pod, not a STRICT endpoint's: as before.
        let metrics_port: SocketAddr = "198.18.9.2:9100".parse().expect("addr");
        assert_eq!(config.unrouted(metrics_port), Unrouted::AsHeld);
        // Held as a STRICT endpoint: the usual path decides (mTLS, or 503 without an SVID).
        config.strict_endpoints.insert(dst);
        assert_eq!(config.unrouted(dst), Unrouted::AsHeld);
        // A Service address on a port it has no route for is refused too.
        let vip: SocketAddr = "198.18.9.1:5432".parse().expect("addr");
        config.known_addresses.insert(
            vip.ip(),
            AddressFacts {
                service_address: true,
                ..Default::default()
            },
        );
        assert_eq!(config.unrouted(vip), Unrouted::Refuse("no-route"));
        // An address the mesh knows nothing of passes through as before.
        let outside: SocketAddr = "198.18.7.7:443".parse().expect("addr");
        config
            .known_addresses
            .insert(outside.ip(), AddressFacts::default());
        assert_eq!(config.unrouted(outside), Unrouted::AsHeld);
    }

    #[test]
    fn without_its_inbound_listener_the_workload_stays_strict() {
        use weft_proto::tls::MtlsMode;
        let mut config = MeshConfig::default();
        config
            .versions
            .insert(weft_proto::type_url::CLUSTER.into(), "1".into());
        assert_eq!(config.inbound_for(8080), (MtlsMode::Strict, None));
        config.inbound = Some(InboundPolicy {
            mode: MtlsMode::Permissive,
            source: "default".into(),
            ports: [(
                9090,
                InboundPort {
                    mode: Some(MtlsMode::Strict),
                    source: "PeerAuthentication default/p".into(),
                    protocol: "http".into(),
                    declared: Some(Declared::Http),
                },
            )]
            .into(),
            authz: Default::default(),
            egress: Vec::new(),
        });
        assert_eq!(config.inbound_for(8080), (MtlsMode::Permissive, None));
        assert_eq!(
            config.inbound_for(9090),
            (MtlsMode::Strict, Some(Declared::Http))
        );
    }
}
