//! The xDS client: one ADS stream (state of the world) to the control plane.
//!
//! Every response is validated as a whole: if any resource in it is refused, the response is
//! NACKed with a message naming each refused resource and the previous config stays in force
//! (a refused version is never recorded as held). Accepted responses are compiled into a new
//! [`MeshConfig`] and swapped in. When the stream breaks, the client reconnects with jittered
//! exponential backoff, re-sending the versions it holds — and keeps serving its last accepted
//! config meanwhile, however long the control plane is gone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use weft_proto::envoy::envoy::config::cluster::v3::Cluster;
use weft_proto::envoy::envoy::config::core::v3::{Locality, Node};
use weft_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;
use weft_proto::envoy::envoy::config::listener::v3::Listener;
use weft_proto::envoy::envoy::config::route::v3::RouteConfiguration;
use weft_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weft_proto::envoy::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use weft_proto::envoy::google::protobuf as pb;
use weft_proto::type_url;

use crate::balance::{Algorithm, EndpointStats};
use crate::config::{RunConfig, XdsProtocol};
use crate::runtime::ClusterRuntime;
use crate::state::{self, ClusterState, Invalid, MeshConfig, Route};

/// Addresses an on-demand sidecar keeps what it learned of at once; beyond, the least
/// recently asked is forgotten (and asked again when used).
const MAX_ADDRESSES: usize = 4096;

/// First reconnect delay.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// A stream that stayed open this long was healthy: the next failure starts from the base.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// While reconnects keep failing, one summary line per this period (the rest at debug).
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// Reconnect policy: full-range jittered exponential backoff (half to all of
/// `base × 2^attempt`, capped at [`BACKOFF_MAX`]); the attempt count resets only after a stream
/// stayed open [`HEALTHY_AFTER`] — not merely because config is held, which made a refusing
/// control plane see a reconnect every ~150 ms. Logs the first failure of an outage, then a
/// summary per [`SUMMARY_EVERY`], then the recovery.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    attempt: u32,
    /// Failures since the last summary line, and when that period began.
    unreported: u32,
    since: Option<tokio::time::Instant>,
}

impl Backoff {
    /// Records a stream that ended after `lasted` with `error`; returns how long to wait.
    pub(crate) fn failed(&mut self, lasted: Duration, error: &str) -> Duration {
        if lasted >= HEALTHY_AFTER {
            self.attempt = 0;
        }
        self.attempt = self.attempt.saturating_add(1);
        let now = tokio::time::Instant::now();
        match self.since {
            Some(since) if self.attempt > 1 => {
                self.unreported += 1;
                tracing::debug!(attempt = self.attempt, error, "xDS reconnect failed");
                if now.duration_since(since) >= SUMMARY_EVERY {
                    tracing::warn!(
                        failed = self.unreported,
                        over = ?now.duration_since(since),
                        last_error = error,
                        "xDS stream still failing; serving the last accepted config"
                    );
                    self.unreported = 0;
                    self.since = Some(now);
                }
            }
            _ => {
                tracing::warn!(error, "xDS stream failed; serving the last accepted config");
                self.unreported = 0;
                self.since = Some(now);
            }
        }
        let exp = BACKOFF_BASE
            .saturating_mul(1u32 << self.attempt.min(8))
            .min(BACKOFF_MAX);
        exp.mul_f64(rand::random::<f64>() * 0.5 + 0.5)
    }
}

/// The resources the client holds, each validated and compiled once when it arrived (never
/// the protos: with 1 000 Services they were most of the sidecar's memory).
#[derive(Default)]
struct Held {
    listeners: BTreeMap<String, state::ListenerSpec>,
    routes: BTreeMap<String, state::RouteSpec>,
    clusters: BTreeMap<String, Arc<state::ClusterSpec>>,
    endpoints: BTreeMap<String, Arc<state::EndpointSet>>,
    /// Each cluster's endpoints as last built: reused while the cluster's algorithm and its
    /// assignment are unchanged, so a change to one cluster rebuilds no other balancer (ring
    /// and maglev tables included).
    built: HashMap<String, Built>,
    versions: BTreeMap<String, String>,
    /// Names subscribed per type (RDS and EDS are named; LDS and CDS are wildcards).
    names: HashMap<&'static str, BTreeSet<String>>,
    /// Per endpoint measurements, kept across config versions.
    stats: HashMap<state::EndpointKey, Arc<EndpointStats>>,
    /// Per cluster counters, kept across config versions.
    runtimes: HashMap<String, Arc<ClusterRuntime>>,
    /// Delta: per type, the version of each resource held (sent back on reconnect).
    delta_versions: HashMap<&'static str, BTreeMap<String, String>>,
    /// On demand (see [`OnDemand`]); off: every Service's config (wildcard LDS and CDS).
    on_demand: bool,
    /// On demand: the directory entries held, by resource name (`<svc>.<ns>`).
    directory: BTreeMap<String, Arc<crate::directory::Entry>>,
    /// The directory the request path reads, rebuilt only when an entry changed.
    directory_index: Arc<crate::directory::Directory>,
    directory_changed: bool,
    /// On demand: the service-ports subscribed (RouteConfiguration names), and why.
    wanted: BTreeMap<String, Want>,
    /// `--warm-hosts`, subscribed as soon as the directory names them.
    warm_hosts: Vec<String>,
    /// The proxy's namespace (short hosts of the warm set resolve in it).
    namespace: String,
    /// Its namespace's egress host list the directory was last built with.
    egress: Vec<weft_proto::visibility::EgressHost>,
    /// On demand: addresses asked about, and what the control plane said (`None`: waiting;
    /// empty: no meshed endpoint).
    addresses: BTreeMap<std::net::IpAddr, Address>,
    /// Named resources the control plane said do not exist (type, name): a route naming one
    /// is complete without it (its requests get that backend's 503, not a timeout).
    absent: std::collections::HashSet<(&'static str, String)>,
}

/// What an address asked about is.
#[derive(Debug, Clone)]
struct Address {
    /// The service-ports it made the proxy subscribe to (`None` until answered).
    ports: Option<Vec<String>>,
    /// What the control plane said of it.
    facts: state::AddressFacts,
    /// Last asked.
    used: tokio::time::Instant,
}

/// One service-port subscribed on demand.
#[derive(Debug, Clone)]
struct Want {
    why: state::Why,
    since_unix_ms: u64,
    /// Last seen used (a request or connection to one of its clusters, or asked for).
    used: tokio::time::Instant,
}

impl Held {
    /// Counts an accepted response and the resources now held.
    fn count(&self, metrics: &crate::metrics::Metrics) {
        metrics.xds_updates.inc();
        metrics.xds_held("listener", self.listeners.len());
        metrics.xds_held("route", self.routes.len());
        metrics.xds_held("cluster", self.clusters.len());
        metrics.xds_held("endpoint", self.endpoints.len());
        if self.on_demand {
            metrics.xds_held("directory", self.directory.len());
            metrics
                .discovery_directory
                .set(i64::try_from(self.directory_index.len()).unwrap_or(i64::MAX));
            for why in [state::Why::Request, state::Why::Warm] {
                let n = self.wanted.values().filter(|w| w.why == why).count();
                metrics
                    .discovery_subscriptions
                    .get_or_create(&vec![("why".into(), why.as_str().into())])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }

    /// The types this proxy subscribes to, in the order a stream asks for them.
    fn types(&self) -> &'static [&'static str] {
        if self.on_demand {
            &[
                type_url::DIRECTORY,
                type_url::LISTENER,
                type_url::ADDRESS,
                type_url::ROUTE,
                type_url::CLUSTER,
                type_url::ENDPOINT,
            ]
        } else {
            &[
                type_url::CLUSTER,
                type_url::LISTENER,
                type_url::ENDPOINT,
                type_url::ROUTE,
            ]
        }
    }

    /// Whether a type is a wildcard subscription (every resource of it).
    fn wildcard(&self, t: &str) -> bool {
        match t {
            type_url::DIRECTORY => true,
            type_url::LISTENER | type_url::CLUSTER => !self.on_demand,
            _ => false,
        }
    }

    /// Whether the proxy holds what it needs to serve: every type accepted once (on demand:
    /// its inbound Listener and the directory; the rest arrives with use).
    fn ready(&self) -> bool {
        let needed: &[&str] = if self.on_demand {
            &[type_url::LISTENER, type_url::DIRECTORY]
        } else {
            &type_url::ENVOY
        };
        needed.iter().all(|t| self.versions.contains_key(*t))
    }

    /// The names a named type should be subscribed to, from what is held: the routes the
    /// listeners name (and, on demand, the wanted service-ports), the clusters those routes
    /// name (on demand; else CDS is a wildcard), the assignments the clusters read.
    fn desired(&self, t: &str) -> BTreeSet<String> {
        match t {
            type_url::LISTENER => [weft_proto::keys::INBOUND_LISTENER.to_string()].into(),
            type_url::ADDRESS => self.addresses.keys().map(ToString::to_string).collect(),
            type_url::ROUTE => self
                .listeners
                .values()
                .filter_map(|l| l.routes.clone())
                .chain(self.wanted.keys().cloned())
                .collect(),
            // A service-port's own cluster and assignment share its name: asked for with its
            // routes, so the common first use costs one round trip, not three.
            type_url::CLUSTER => self
                .routes
                .values()
                .flat_map(route_clusters)
                .map(str::to_string)
                .chain(self.speculative())
                .collect(),
            type_url::ENDPOINT => self
                .clusters
                .values()
                .map(|c| c.eds_name.clone())
                .chain(self.speculative())
                .collect(),
            _ => BTreeSet::new(),
        }
    }

    /// Wanted service-ports whose routes are not held yet (their own cluster and assignment
    /// are asked for meanwhile; once the routes are held, what they name is).
    fn speculative(&self) -> impl Iterator<Item = String> + '_ {
        self.wanted
            .keys()
            .filter(|n| {
                !self.routes.contains_key(*n)
                    && !self.absent.contains(&(type_url::ROUTE, n.to_string()))
            })
            .cloned()
    }

    /// Whether the service-port `name` can be routed: its routes, every cluster they name,
    /// and those clusters' endpoints are held.
    fn complete(&self, name: &str) -> bool {
        let absent = |t: &'static str, n: &str| self.absent.contains(&(t, n.to_string()));
        absent(type_url::ROUTE, name)
            || self.routes.get(name).is_some_and(|spec| {
                route_clusters(spec).all(|c| {
                    absent(type_url::CLUSTER, c)
                        || self.clusters.get(c).is_some_and(|c| {
                            self.endpoints.contains_key(&c.eds_name)
                                || absent(type_url::ENDPOINT, &c.eds_name)
                        })
                })
            })
    }

    /// Takes what the request path asks for; true when it needs a new subscription.
    fn ask(&mut self, ask: Ask) -> bool {
        match ask {
            Ask::Port(name) => self.want(name, state::Why::Request),
            Ask::Address(ip) => {
                let now = tokio::time::Instant::now();
                match self.addresses.get_mut(&ip) {
                    Some(a) => {
                        a.used = now;
                        false
                    }
                    None => {
                        if self.addresses.len() >= MAX_ADDRESSES {
                            // The least recently asked goes: it is asked again if used.
                            if let Some(old) = self
                                .addresses
                                .iter()
                                .min_by_key(|(_, a)| a.used)
                                .map(|(ip, _)| *ip)
                            {
                                self.addresses.remove(&old);
                            }
                        }
                        self.addresses.insert(
                            ip,
                            Address {
                                ports: None,
                                facts: state::AddressFacts::default(),
                                used: now,
                            },
                        );
                        true
                    }
                }
            }
        }
    }

    /// Records an address entry (`services`: directory names; none: no meshed endpoint) and
    /// subscribes to every port of those Services (their endpoints say how to reach it).
    fn answered(&mut self, ip: std::net::IpAddr, entry: &weft_proto::xds::AddressEntry) {
        let services = &entry.services;
        let facts = state::AddressFacts {
            meshed: entry.meshed,
            strict_ports: entry
                .strict_ports
                .iter()
                .filter_map(|p| u16::try_from(*p).ok())
                .collect(),
            service_address: entry.service_address,
        };
        let mut ports = Vec::new();
        for s in services {
            if let Some((name, ns)) = s.split_once('.') {
                for scope in [
                    weft_proto::names::Scope::Cluster,
                    weft_proto::names::Scope::Clusterset,
                ] {
                    let n = weft_proto::names::ServicePortName::new(name, ns, 0).with_scope(scope);
                    for port in self.directory_index.ports(&n) {
                        ports.push(
                            weft_proto::names::ServicePortName { port, ..n.clone() }.to_string(),
                        );
                    }
                }
            }
        }
        for p in &ports {
            self.want(p.clone(), state::Why::Request);
        }
        let used = tokio::time::Instant::now();
        // Only what was asked about (an answer after its eviction is not kept).
        if let Some(a) = self.addresses.get_mut(&ip) {
            *a = Address {
                ports: Some(ports),
                facts,
                used,
            };
        }
    }

    /// Subscribes to `name` for `why` (a warm subscription stays warm); true when new.
    fn want(&mut self, name: String, why: state::Why) -> bool {
        let now = tokio::time::Instant::now();
        match self.wanted.get_mut(&name) {
            Some(w) => {
                w.used = now;
                if why == state::Why::Warm {
                    w.why = why;
                }
                false
            }
            None => {
                self.wanted.insert(
                    name,
                    Want {
                        why,
                        since_unix_ms: now_unix_ms(),
                        used: now,
                    },
                );
                true
            }
        }
    }

    /// Rebuilds the directory the request path reads when its entries or the namespace's
    /// egress list changed.
    fn reindex(&mut self) {
        let egress = self
            .listeners
            .values()
            .find_map(|l| l.inbound.as_ref().map(|i| i.egress.clone()))
            .unwrap_or_default();
        if self.directory_changed || egress != self.egress {
            self.directory_changed = false;
            self.directory_index = Arc::new(crate::directory::Directory::build(
                &self.directory,
                &egress,
                &self.namespace,
            ));
            self.egress = egress;
        }
    }

    /// Subscribes the warm set's service-ports the directory now names; true when any is new.
    fn warm(&mut self) -> bool {
        self.reindex();
        let mut names = Vec::new();
        for host in &self.warm_hosts {
            let ports: Vec<String> = match self.directory_index.resolve(host, None, &self.namespace)
            {
                Some(n) if host_has_port(host) => vec![n.to_string()],
                Some(n) => self
                    .directory_index
                    .ports(&n)
                    .into_iter()
                    .map(|port| {
                        weft_proto::names::ServicePortName { port, ..n.clone() }.to_string()
                    })
                    .collect(),
                None => Vec::new(),
            };
            names.extend(ports);
        }
        let mut new = false;
        for n in names {
            new |= self.want(n, state::Why::Warm);
        }
        new
    }

    /// Drops the service-ports (asked for by a request) none of whose clusters was used for
    /// `idle`; returns how many.
    fn evict_idle(&mut self, idle: Duration) -> usize {
        let used: BTreeSet<&str> = self
            .runtimes
            .iter()
            .filter(|(_, r)| r.take_used())
            .map(|(n, _)| n.as_str())
            .collect();
        let now = tokio::time::Instant::now();
        let routes = &self.routes;
        let mut evicted = Vec::new();
        for (name, w) in &mut self.wanted {
            if routes
                .get(name)
                .is_some_and(|spec| route_clusters(spec).any(|c| used.contains(c)))
            {
                w.used = now;
            }
            if w.why == state::Why::Request && now.duration_since(w.used) >= idle {
                evicted.push(name.clone());
            }
        }
        for name in &evicted {
            self.wanted.remove(name);
            tracing::debug!(service_port = %name, "unsubscribing an idle service-port");
        }
        // Addresses not asked about for `idle` are unsubscribed too.
        let before = self.addresses.len();
        self.addresses
            .retain(|_, a| a.ports.is_none() || now.duration_since(a.used) < idle);
        evicted.len() + before - self.addresses.len()
    }
}

/// The clusters a RouteConfiguration's routes send to (a split's backends included).
fn route_clusters(spec: &state::RouteSpec) -> impl Iterator<Item = &str> {
    spec.iter()
        .flat_map(|(_, routes)| routes.iter())
        .flat_map(|r| match &r.target {
            state::RouteTarget::Cluster(c) => std::slice::from_ref(c)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            state::RouteTarget::Weighted(list) => list.iter().map(|(c, _)| c.as_str()).collect(),
        })
}

/// Whether a host names its port (`echo:8080`, `[::1]:80`).
fn host_has_port(host: &str) -> bool {
    host.rsplit_once(':')
        .is_some_and(|(h, p)| !h.ends_with(':') && p.parse::<u16>().is_ok())
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A cluster's endpoints and what they were built from.
struct Built {
    algorithm: Algorithm,
    set: Arc<state::EndpointSet>,
    endpoints: Arc<state::Endpoints>,
}

/// Shared handles: the config the request path reads and whether every type was ACKed once.
#[derive(Clone)]
pub struct XdsHandle {
    /// The accepted config.
    pub config: Arc<ArcSwap<MeshConfig>>,
    /// Becomes true once LDS, RDS, CDS and EDS were each accepted once.
    pub ready: watch::Receiver<bool>,
    /// Counts accepted configs: what open connections watch to be judged again.
    pub changed: watch::Receiver<u64>,
    /// On-demand discovery, when the proxy runs it.
    pub on_demand: Option<OnDemand>,
}

/// What the request path uses to have a service-port's config fetched on first use.
#[derive(Clone)]
pub struct OnDemand {
    /// Off once the control plane turned out not to serve it (no delta, no directory): then
    /// nothing waits and the proxy holds every Service's config.
    active: Arc<std::sync::atomic::AtomicBool>,
    wants: mpsc::Sender<Ask>,
    timeout: Duration,
    metrics: Arc<crate::metrics::Metrics>,
}

/// What the request path asks the xDS task for.
#[derive(Debug)]
enum Ask {
    /// A service-port's config (a RouteConfiguration name).
    Port(String),
    /// What an address is (a meshed endpoint's Services, or nothing).
    Address(std::net::IpAddr),
}

/// Why a service-port's config could not be had in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscoveryTimeout;

impl OnDemand {
    /// Waits until the config of `name` (a service-port the directory names) is held and
    /// complete, subscribing to it unless it is; at most `--discovery-timeout`.
    pub async fn discover(
        &self,
        xds: &XdsHandle,
        name: &weft_proto::names::ServicePortName,
    ) -> Result<(), DiscoveryTimeout> {
        let name = name.to_string();
        let ready = |c: &MeshConfig| c.subscriptions.get(&name).is_some_and(|s| s.complete);
        self.wait(xds, Ask::Port(name.clone()), &name, ready).await
    }

    /// Waits until the proxy knows what `ip` is — the config of the Services it is a meshed
    /// endpoint of, or that it is none — asking the control plane unless it knows already;
    /// at most `--discovery-timeout`. What a connection to an address neither a route nor
    /// the directory names does first, so plaintext never goes to a STRICT endpoint the proxy
    /// was not told of.
    pub async fn discover_address(
        &self,
        xds: &XdsHandle,
        ip: std::net::IpAddr,
    ) -> Result<(), DiscoveryTimeout> {
        let canonical = ip.to_canonical();
        let ready = |c: &MeshConfig| c.known_addresses.contains_key(&canonical);
        self.wait(xds, Ask::Address(canonical), &canonical.to_string(), ready)
            .await
    }

    async fn wait(
        &self,
        xds: &XdsHandle,
        ask: Ask,
        name: &str,
        ready: impl Fn(&MeshConfig) -> bool,
    ) -> Result<(), DiscoveryTimeout> {
        if !self.active.load(std::sync::atomic::Ordering::Relaxed) || ready(&xds.config.load()) {
            return Ok(());
        }
        let started = tokio::time::Instant::now();
        let deadline = started + self.timeout;
        let mut changed = xds.changed.clone();
        let outcome = async {
            tokio::time::timeout_at(deadline, self.wants.send(ask))
                .await
                .map_err(|_| DiscoveryTimeout)?
                .map_err(|_| DiscoveryTimeout)?;
            loop {
                changed.borrow_and_update();
                if ready(&xds.config.load()) {
                    return Ok(());
                }
                match tokio::time::timeout_at(deadline, changed.changed()).await {
                    Ok(Ok(())) => continue,
                    _ => return Err(DiscoveryTimeout),
                }
            }
        }
        .await;
        let result = if outcome.is_ok() { "ok" } else { "timeout" };
        self.metrics
            .discovery_fetches
            .get_or_create(&vec![("result".into(), result.into())])
            .inc();
        self.metrics
            .discovery_fetch_latency
            .observe(started.elapsed().as_secs_f64());
        if outcome.is_err() {
            tracing::warn!(%name, timeout = ?self.timeout, "on-demand config did not arrive in time");
        }
        outcome
    }
}

/// Where the xDS client publishes each accepted config.
pub struct Publish {
    cell: Arc<ArcSwap<MeshConfig>>,
    changed: watch::Sender<u64>,
}

impl Publish {
    /// Swaps the config in and tells the watchers.
    fn store(&self, c: Arc<MeshConfig>) {
        self.cell.store(c);
        self.changed.send_modify(|n| *n += 1);
        crate::memory::config_swapped();
    }
}

/// The xDS node this sidecar announces (also what its load reports name).
pub fn node(cfg: &RunConfig) -> Node {
    let s = |v: &str| pb::Value {
        kind: Some(pb::value::Kind::StringValue(v.to_string())),
    };
    let fields = [
        (weft_proto::keys::NODE_NAMESPACE, s(&cfg.namespace)),
        (
            weft_proto::keys::NODE_SERVICE_ACCOUNT,
            s(&cfg.service_account),
        ),
        (weft_proto::keys::NODE_CLUSTER, s(&cfg.cluster)),
        (
            weft_proto::keys::NODE_INSTANCE_IPS,
            s(&cfg
                .pod_ips
                .iter()
                .map(|ip| ip.to_string())
                .collect::<Vec<_>>()
                .join(",")),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Node {
        id: cfg.node_id(),
        cluster: cfg.cluster.clone(),
        metadata: Some(pb::Struct { fields }),
        locality: Some(Locality {
            region: cfg.region.clone(),
            zone: cfg.zone.clone(),
            sub_zone: String::new(),
        }),
        user_agent_name: weft_proto::keys::SIDECAR_USER_AGENT.into(),
        ..Default::default()
    }
}

/// Starts the client task; the handle's config is empty until the first responses arrive.
pub fn start(
    cfg: RunConfig,
    link: crate::identity::ControlPlaneLink,
    metrics: Arc<crate::metrics::Metrics>,
) -> XdsHandle {
    let config = Arc::new(ArcSwap::from_pointee(MeshConfig::default()));
    let (ready_tx, ready) = watch::channel(false);
    let (changed_tx, changed) = watch::channel(0u64);
    // A gateway forwards to any exported Service's endpoints: it holds them all; on demand
    // needs delta xDS.
    let on_demand = cfg.discovery == crate::config::Discovery::OnDemand
        && cfg.gateway_addr.is_none()
        && cfg.xds_protocol == XdsProtocol::Delta;
    let active = Arc::new(std::sync::atomic::AtomicBool::new(on_demand));
    let (wants_tx, mut wants) = mpsc::channel::<Ask>(1024);
    let handle = XdsHandle {
        config: config.clone(),
        ready,
        changed,
        on_demand: on_demand.then(|| OnDemand {
            active: active.clone(),
            wants: wants_tx,
            timeout: cfg.discovery_timeout,
            metrics: metrics.clone(),
        }),
    };
    let config = Publish {
        cell: config,
        changed: changed_tx,
    };
    tokio::spawn(async move {
        let mut held = Held {
            on_demand,
            warm_hosts: cfg.warm_hosts.clone(),
            namespace: cfg.namespace.clone(),
            ..Default::default()
        };
        if cfg.discovery == crate::config::Discovery::OnDemand && !on_demand {
            tracing::info!("holding every Service's config (a gateway, or state-of-the-world xDS)");
        }
        let mut backoff = Backoff::default();
        // Delta first; a server that does not implement it gets state of the world.
        let mut delta = cfg.xds_protocol == XdsProtocol::Delta;
        loop {
            let opened = tokio::time::Instant::now();
            let result = if delta {
                let mut s = Stream {
                    cfg: &cfg,
                    held: &mut held,
                    config: &config,
                    ready: &ready_tx,
                    metrics: &metrics,
                    wants: &mut wants,
                };
                s.delta(&link).await
            } else {
                stream_once(&cfg, &link, &mut held, &config, &ready_tx, &metrics).await
            };
            let lasted = opened.elapsed();
            let error = match result {
                Ok(()) => "control plane closed the xDS stream".to_string(),
                Err(e) if delta && unimplemented(e.as_ref()) => {
                    tracing::info!("control plane has no delta xDS; using state of the world");
                    if held.on_demand {
                        tracing::warn!(
                            "on-demand discovery needs delta xDS: holding every Service's config"
                        );
                        active.store(false, std::sync::atomic::Ordering::Relaxed);
                        held = Held::default();
                    }
                    delta = false;
                    continue;
                }
                // An older control plane that serves no directory: hold everything instead.
                Err(e) if held.on_demand && no_directory(e.as_ref()) => {
                    tracing::warn!(
                        "the control plane serves no on-demand directory: holding every Service's config"
                    );
                    active.store(false, std::sync::atomic::Ordering::Relaxed);
                    held = Held::default();
                    continue;
                }
                Err(e) => e.to_string(),
            };
            metrics.xds_disconnects.inc();
            let delay = backoff.failed(lasted, &error);
            tokio::time::sleep(delay).await;
        }
    });
    handle
}

fn request(
    cfg: &RunConfig,
    type_url: &str,
    held: &Held,
    nonce: &str,
    error: Option<String>,
) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: held.versions.get(type_url).cloned().unwrap_or_default(),
        node: Some(node(cfg)),
        resource_names: held
            .names
            .get(type_url)
            .map(|n| n.iter().cloned().collect())
            .unwrap_or_default(),
        type_url: type_url.to_string(),
        response_nonce: nonce.to_string(),
        error_detail: error.map(|message| weft_proto::envoy::google::rpc::Status {
            code: 3, // INVALID_ARGUMENT
            message,
            details: Vec::new(),
        }),
        ..Default::default()
    }
}

async fn stream_once(
    cfg: &RunConfig,
    link: &crate::identity::ControlPlaneLink,
    held: &mut Held,
    config: &Publish,
    ready: &watch::Sender<bool>,
    metrics: &crate::metrics::Metrics,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut client = connect(link).await?;
    let (tx, rx) = mpsc::channel(16);
    // CDS before LDS so clusters exist when routes name them; RDS/EDS follow by name.
    for t in [
        type_url::CLUSTER,
        type_url::LISTENER,
        type_url::ENDPOINT,
        type_url::ROUTE,
    ] {
        if matches!(t, type_url::CLUSTER | type_url::LISTENER)
            || held.names.get(t).is_some_and(|n| !n.is_empty())
        {
            tx.send(request(cfg, t, held, "", None)).await?;
        }
    }
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!(addr = %cfg.xds_addr, "xDS stream open");
    while let Some(resp) = responses.message().await? {
        let t = resp.type_url.clone();
        let Some(t) = type_url::ALL.iter().find(|u| **u == t).copied() else {
            tx.send(request(
                cfg,
                &resp.type_url,
                held,
                &resp.nonce,
                Some(format!("unsupported type_url {:?}", resp.type_url)),
            ))
            .await?;
            continue;
        };
        let update = Update {
            resources: &resp.resources,
            removed: &[],
            replace: true,
        };
        match apply(held, t, update) {
            Ok(()) => {
                held.versions
                    .insert(t.to_string(), resp.version_info.clone());
                config.store(Arc::new(compile(held)));
                held.count(metrics);
                tx.send(request(cfg, t, held, &resp.nonce, None)).await?;
                // Subscribe to what the new resources refer to.
                for dep in [type_url::ROUTE, type_url::ENDPOINT] {
                    let names = held.desired(dep);
                    if held.names.get(dep) != Some(&names) {
                        held.names.insert(dep, names);
                        tx.send(request(cfg, dep, held, "", None)).await?;
                    }
                }
                if held.ready() {
                    ready.send_replace(true);
                }
            }
            Err(errors) => {
                let message = nack_message(t, &errors, metrics);
                tx.send(request(cfg, t, held, &resp.nonce, Some(message)))
                    .await?;
            }
        }
    }
    Ok(())
}

type Ads = AggregatedDiscoveryServiceClient<tonic::transport::Channel>;

/// An ADS client to the control plane.
async fn connect(
    link: &crate::identity::ControlPlaneLink,
) -> Result<Ads, Box<dyn std::error::Error + Send + Sync>> {
    let channel = link.channel(true).await?;
    Ok(AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20))
}

/// One delta ADS stream's context: what it reads and where it publishes.
struct Stream<'a> {
    cfg: &'a RunConfig,
    held: &'a mut Held,
    config: &'a Publish,
    ready: &'a watch::Sender<bool>,
    metrics: &'a crate::metrics::Metrics,
    /// What the request path asks for (on demand).
    wants: &'a mut mpsc::Receiver<Ask>,
}

type Requests = mpsc::Sender<DeltaDiscoveryRequest>;

impl Stream<'_> {
    /// One delta ADS stream (xDS "incremental"): subscriptions by name, only changes travel;
    /// on demand, also the request path's first uses and the idle sweep.
    async fn delta(
        &mut self,
        link: &crate::identity::ControlPlaneLink,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut client = connect(link).await?;
        let (tx, rx) = mpsc::channel(16);
        let node = node(self.cfg);
        // What was asked for while no stream was open is subscribed with the rest.
        while let Ok(ask) = self.wants.try_recv() {
            self.held.ask(ask);
        }
        let held = &mut *self.held;
        for t in held.types() {
            let wildcard = held.wildcard(t);
            if !wildcard {
                let names = held.desired(t);
                held.names.insert(t, names);
            }
            let names: Vec<String> = held
                .names
                .get(t)
                .map(|n| n.iter().cloned().collect())
                .unwrap_or_default();
            if !wildcard && names.is_empty() {
                continue;
            }
            tx.send(DeltaDiscoveryRequest {
                node: Some(node.clone()),
                type_url: t.to_string(),
                resource_names_subscribe: if wildcard { vec!["*".into()] } else { names },
                // A reconnect says what it holds, so only differences come back.
                initial_resource_versions: held
                    .delta_versions
                    .get(t)
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
                ..Default::default()
            })
            .await?;
        }
        let mut responses = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        tracing::info!(addr = %self.cfg.xds_addr, on_demand = self.held.on_demand, "delta xDS stream open");
        let idle = self.cfg.discovery_idle;
        let sweeping = self.held.on_demand && !idle.is_zero();
        let mut sweep = tokio::time::interval(
            (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30)),
        );
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let on_demand = self.held.on_demand;
        loop {
            tokio::select! {
                resp = responses.message() => match resp? {
                    Some(resp) => self.response(&tx, resp).await?,
                    None => return Ok(()),
                },
                Some(ask) = self.wants.recv(), if on_demand => {
                    if self.held.ask(ask) {
                        self.resubscribe(&tx).await?;
                        self.publish();
                    }
                }
                _ = sweep.tick(), if sweeping => {
                    let evicted = self.held.evict_idle(idle);
                    if evicted > 0 {
                        self.metrics.discovery_evictions.inc_by(evicted as u64);
                        self.resubscribe(&tx).await?;
                        self.publish();
                    }
                }
            }
        }
    }

    /// Compiles and publishes what is held.
    fn publish(&mut self) {
        self.config.store(Arc::new(compile(self.held)));
        self.held.count(self.metrics);
    }

    /// Brings each named type's subscription in line with what the held resources (and the
    /// wanted service-ports) name: subscribes to what is new, unsubscribes what is not named.
    async fn resubscribe(
        &mut self,
        tx: &Requests,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        for t in [
            type_url::ADDRESS,
            type_url::ROUTE,
            type_url::CLUSTER,
            type_url::ENDPOINT,
        ] {
            if self.held.wildcard(t) || (t == type_url::ADDRESS && !self.held.on_demand) {
                continue;
            }
            let names = self.held.desired(t);
            let old = self.held.names.insert(t, names.clone()).unwrap_or_default();
            let subscribe: Vec<String> = names.difference(&old).cloned().collect();
            let unsubscribe: Vec<String> = old.difference(&names).cloned().collect();
            if subscribe.is_empty() && unsubscribe.is_empty() {
                continue;
            }
            // An unsubscribed resource is no longer held: what is not named goes now.
            for n in &unsubscribe {
                forget(self.held, t, n);
            }
            tx.send(DeltaDiscoveryRequest {
                type_url: t.to_string(),
                resource_names_subscribe: subscribe,
                resource_names_unsubscribe: unsubscribe,
                ..Default::default()
            })
            .await?;
        }
        Ok(())
    }

    /// Applies one response: ACKs it (and subscribes to what it names) or NACKs it.
    async fn response(
        &mut self,
        tx: &Requests,
        resp: weft_proto::envoy::envoy::service::discovery::v3::DeltaDiscoveryResponse,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let ack = |error: Option<String>| DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail: error.map(|message| weft_proto::envoy::google::rpc::Status {
                code: 3,
                message,
                details: Vec::new(),
            }),
            ..Default::default()
        };
        let Some(t) = type_url::ALL.iter().find(|u| **u == resp.type_url).copied() else {
            tx.send(ack(Some(format!(
                "unsupported type_url {:?}",
                resp.type_url
            ))))
            .await?;
            return Ok(());
        };
        // A resource of a named type no longer subscribed to (an answer already on its way
        // when the proxy unsubscribed) is not taken.
        let wanted = |name: &str| {
            self.held.wildcard(t) || self.held.names.get(t).is_some_and(|n| n.contains(name))
        };
        let taken: Vec<&weft_proto::envoy::envoy::service::discovery::v3::Resource> =
            resp.resources.iter().filter(|r| wanted(&r.name)).collect();
        let anys: Vec<pb::Any> = taken.iter().filter_map(|r| r.resource.clone()).collect();
        let update = Update {
            resources: &anys,
            removed: &resp.removed_resources,
            replace: false,
        };
        let held = &mut *self.held;
        if t == type_url::ADDRESS {
            return match address_entries(&resp) {
                Ok(entries) => {
                    for (ip, entry) in entries {
                        held.answered(ip, &entry);
                    }
                    tx.send(ack(None)).await?;
                    self.resubscribe(tx).await?;
                    self.publish();
                    Ok(())
                }
                Err(errors) => {
                    let message = nack_message(t, &errors, self.metrics);
                    tx.send(ack(Some(message))).await?;
                    Ok(())
                }
            };
        }
        if let Err(errors) = apply(held, t, update) {
            let message = nack_message(t, &errors, self.metrics);
            tx.send(ack(Some(message))).await?;
            return Ok(());
        }
        let versions = held.delta_versions.entry(t).or_default();
        for r in taken {
            versions.insert(r.name.clone(), r.version.clone());
            held.absent.remove(&(t, r.name.clone()));
        }
        for n in &resp.removed_resources {
            versions.remove(n);
            if held.names.get(t).is_some_and(|names| names.contains(n)) {
                held.absent.insert((t, n.clone()));
            }
        }
        held.versions
            .insert(t.to_string(), resp.system_version_info.clone());
        if matches!(t, type_url::DIRECTORY | type_url::LISTENER) {
            held.warm();
        }
        tx.send(ack(None)).await?;
        self.resubscribe(tx).await?;
        self.publish();
        if self.held.ready() {
            self.ready.send_replace(true);
        }
        Ok(())
    }
}

/// The address entries of a response: each address with its Services, and each removed
/// address with none; refused whole when any entry is wrong.
fn address_entries(
    resp: &weft_proto::envoy::envoy::service::discovery::v3::DeltaDiscoveryResponse,
) -> Result<Vec<(std::net::IpAddr, weft_proto::xds::AddressEntry)>, Vec<Invalid>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let bad = |name: &str, message: String| Invalid {
        kind: "AddressEntry",
        name: name.to_string(),
        message,
    };
    for r in &resp.resources {
        let Some(any) = &r.resource else {
            errors.push(bad(&r.name, "resource is missing".into()));
            continue;
        };
        let entry: weft_proto::xds::AddressEntry =
            match state::decode("AddressEntry", &r.name, &any.value) {
                Ok(e) => e,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
        match entry.address.parse::<std::net::IpAddr>() {
            Ok(ip) => out.push((ip.to_canonical(), entry)),
            Err(_) => errors.push(bad(
                &r.name,
                format!("address: {:?} is not an IP address", entry.address),
            )),
        }
    }
    for n in &resp.removed_resources {
        match n.parse::<std::net::IpAddr>() {
            Ok(ip) => out.push((ip.to_canonical(), weft_proto::xds::AddressEntry::default())),
            Err(_) => errors.push(bad(n, "removed name is not an IP address".into())),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Drops a resource of type `t` the proxy no longer subscribes to.
fn forget(held: &mut Held, t: &'static str, name: &str) {
    match t {
        type_url::ROUTE => {
            held.routes.remove(name);
        }
        type_url::CLUSTER => {
            held.clusters.remove(name);
        }
        type_url::ENDPOINT => {
            held.endpoints.remove(name);
        }
        _ => {}
    }
    if let Some(v) = held.delta_versions.get_mut(t) {
        v.remove(name);
    }
    held.absent.remove(&(t, name.to_string()));
}

/// The NACK message for refused resources (each named with its field), logged and counted.
fn nack_message(type_url: &str, errors: &[Invalid], metrics: &crate::metrics::Metrics) -> String {
    let message = errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    tracing::warn!(type_url, %message, "NACK: keeping the previous config");
    metrics.xds_nacks.inc();
    message
}

/// Whether a stream error says the server does not serve Weft's directory type.
fn no_directory(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<tonic::Status>().is_some_and(|s| {
        // The refused type is quoted in the message (`unknown type_url "..."`).
        s.code() == tonic::Code::InvalidArgument
            && s.message().contains(&format!("{:?}", type_url::DIRECTORY))
    })
}

/// Whether a stream error says the server does not speak delta xDS.
fn unimplemented(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<tonic::Status>()
        .is_some_and(|s| s.code() == tonic::Code::Unimplemented)
}

/// One response's content: the resources it carries and, for delta, the names it removes.
struct Update<'a> {
    resources: &'a [pb::Any],
    removed: &'a [String],
    /// State of the world: the resources replace the whole held set of the type.
    replace: bool,
}

/// Validates and compiles every resource of a response; only if all pass are they installed
/// (replacing the held set of the type for state of the world, merged into it for delta),
/// else nothing changes. The held map is changed in place: no copy of a whole type per
/// response.
fn merge<T>(
    held: &mut BTreeMap<String, T>,
    t: &'static str,
    kind: &'static str,
    update: &Update<'_>,
    compile: impl Fn(&[u8]) -> Result<(String, T), Invalid>,
) -> Result<(), Vec<Invalid>> {
    let mut errors = Vec::new();
    let mut fresh = Vec::with_capacity(update.resources.len());
    for any in update.resources {
        if any.type_url != t {
            errors.push(Invalid {
                kind,
                name: String::new(),
                message: format!("type {:?} in a {} response", any.type_url, kind),
            });
            continue;
        }
        match compile(&any.value) {
            Ok(r) => fresh.push(r),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    if update.replace {
        held.clear();
    }
    for name in update.removed {
        held.remove(name);
    }
    held.extend(fresh);
    Ok(())
}

/// Decodes a resource of `kind` and compiles it with `f`, naming it by `name`.
fn decoded<M: prost::Message + Default, T>(
    kind: &'static str,
    bytes: &[u8],
    name: impl Fn(&M) -> &str,
    f: impl Fn(&M) -> Result<T, Invalid>,
) -> Result<(String, T), Invalid> {
    let m: M = state::decode(kind, "", bytes)?;
    Ok((name(&m).to_string(), f(&m)?))
}

/// Applies one response: its type's handler validates and installs it (what it refers to is
/// subscribed by [`Held::desired`]).
fn apply(held: &mut Held, t: &'static str, update: Update<'_>) -> Result<(), Vec<Invalid>> {
    match t {
        type_url::LISTENER => {
            merge(&mut held.listeners, t, "Listener", &update, |b| {
                decoded(
                    "Listener",
                    b,
                    |l: &Listener| &l.name,
                    state::ListenerSpec::from_xds,
                )
            })?;
            Ok(())
        }
        type_url::ROUTE => {
            merge(&mut held.routes, t, "RouteConfiguration", &update, |b| {
                decoded(
                    "RouteConfiguration",
                    b,
                    |r: &RouteConfiguration| &r.name,
                    state::route_spec,
                )
            })?;
            Ok(())
        }
        type_url::CLUSTER => {
            merge(&mut held.clusters, t, "Cluster", &update, |b| {
                decoded(
                    "Cluster",
                    b,
                    |c: &Cluster| &c.name,
                    |c| state::ClusterSpec::from_xds(c).map(Arc::new),
                )
            })?;
            Ok(())
        }
        type_url::DIRECTORY => {
            merge(&mut held.directory, t, "DirectoryEntry", &update, |b| {
                let e: weft_proto::xds::DirectoryEntry = state::decode("DirectoryEntry", "", b)?;
                // Named as the control plane names it: `<svc>.<ns>`.
                let name = format!("{}.{}", e.name, e.namespace);
                match crate::directory::Entry::from_xds(&e) {
                    Ok(entry) => Ok((name, Arc::new(entry))),
                    Err(err) => Err(Invalid {
                        kind: "DirectoryEntry",
                        name,
                        message: format!("{}: {}", err.field, err.message),
                    }),
                }
            })?;
            held.directory_changed = true;
            Ok(())
        }
        _ => {
            merge(
                &mut held.endpoints,
                t,
                "ClusterLoadAssignment",
                &update,
                |b| {
                    decoded(
                        "ClusterLoadAssignment",
                        b,
                        |c: &ClusterLoadAssignment| &c.cluster_name,
                        |c| state::parse_endpoints(c).map(Arc::new),
                    )
                },
            )?;
            Ok(())
        }
    }
}

/// Compiles the held (already validated) resources into the request path's config. Cheap per
/// cluster: a cluster whose algorithm and assignment did not change keeps its built endpoints.
fn compile(held: &mut Held) -> MeshConfig {
    let mut hosts: crate::http::FastMap<String, Arc<Vec<Route>>> = Default::default();
    let mut dns = state::DnsTable::default();
    for spec in held.routes.values() {
        for (domains, routes) in spec {
            for d in domains {
                hosts.entry(d.clone()).or_insert_with(|| routes.clone());
            }
            state::add_dns_names(&mut dns, domains);
        }
    }
    let mut stats = std::mem::take(&mut held.stats);
    let mut lookup = |e: &state::EndpointSpec| -> Arc<EndpointStats> {
        stats.entry((e.addr, e.via.clone())).or_default().clone()
    };
    let mut before = std::mem::take(&mut held.built);
    let mut clusters = BTreeMap::new();
    for (name, spec) in &held.clusters {
        let runtime: Arc<ClusterRuntime> = held.runtimes.get(name).cloned().unwrap_or_default();
        let endpoints = held.endpoints.get(&spec.eds_name).map(|set| {
            let endpoints = match before.remove(name) {
                Some(b)
                    if b.algorithm == spec.algorithm
                        && (Arc::ptr_eq(&b.set, set) || b.set == *set) =>
                {
                    b.endpoints
                }
                _ => Arc::new(set.build(spec.algorithm, &mut lookup, &|z| runtime.locality(z))),
            };
            held.built.insert(
                name.clone(),
                Built {
                    algorithm: spec.algorithm,
                    set: set.clone(),
                    endpoints: endpoints.clone(),
                },
            );
            endpoints
        });
        clusters.insert(
            name.clone(),
            ClusterState {
                eds_name: spec.eds_name.clone(),
                endpoints,
                policy: spec.policy.clone(),
                http2: spec.http2,
                runtime,
            },
        );
    }
    let all = || {
        clusters
            .values()
            .filter_map(|c: &ClusterState| c.endpoints.as_ref())
            .flat_map(|e| e.priorities.iter().flatten())
    };
    // By address: what a connection to that address reaches here — never an endpoint of
    // another network, whose address may be one of this network's.
    let mtls_identities = all()
        .filter(|e| e.via.is_none())
        .filter_map(|e| Some((e.addr, e.mtls_identity.clone()?)))
        .collect();
    let strict_endpoints = all()
        .filter(|e| e.strict && e.via.is_none())
        .map(|e| e.addr)
        .collect();
    // Keep measurements only of endpoints and clusters still in the config.
    held.stats = all()
        .map(|e| ((e.addr, e.via.clone()), e.stats.clone()))
        .collect();
    held.runtimes = clusters
        .iter()
        .map(|(name, c)| (name.clone(), c.runtime.clone()))
        .collect();
    let inbound = held.listeners.values().find_map(|l| l.inbound.clone());
    held.reindex();
    let subscriptions = held
        .wanted
        .iter()
        .map(|(name, w)| {
            (
                name.clone(),
                state::Subscribed {
                    why: w.why,
                    since_unix_ms: w.since_unix_ms,
                    complete: held.complete(name),
                },
            )
        })
        .collect();
    MeshConfig {
        hosts,
        clusters,
        versions: held.versions.clone(),
        mtls_identities,
        inbound,
        strict_endpoints,
        dns,
        directory: held.directory_index.clone(),
        subscriptions,
        known_addresses: held
            .addresses
            .iter()
            .filter(|(_, a)| {
                a.ports
                    .as_ref()
                    .is_some_and(|ports| ports.iter().all(|p| held.complete(p)))
            })
            .map(|(ip, a)| (*ip, a.facts.clone()))
            .collect(),
    }
}

#[cfg(test)]
mod backoff_tests {
    use super::*;

    #[test]
    fn failing_streams_back_off_to_the_cap_and_reset_only_after_a_healthy_stream() {
        let mut b = Backoff::default();
        let short = Duration::from_millis(50);
        let delays: Vec<Duration> = (0..12).map(|_| b.failed(short, "refused")).collect();
        // Each delay is half to all of base × 2^attempt, capped.
        for (i, d) in delays.iter().enumerate() {
            let full = BACKOFF_BASE
                .saturating_mul(1 << (i as u32 + 1).min(8))
                .min(BACKOFF_MAX);
            assert!(
                *d >= full / 2 && *d <= full,
                "attempt {i}: {d:?} not in {:?}..{full:?}",
                full / 2
            );
        }
        assert!(delays[11] >= BACKOFF_MAX / 2);
        // Twelve short-lived failures take far longer than twelve base delays.
        let total: Duration = delays.iter().sum();
        assert!(total > Duration::from_secs(30), "{total:?}");
        // A stream that stayed healthy starts over from the base.
        let after_healthy = b.failed(HEALTHY_AFTER, "closed");
        assert!(after_healthy <= BACKOFF_BASE * 2, "{after_healthy:?}");
        // A short stream does not.
        let next = b.failed(short, "refused");
        assert!(next >= BACKOFF_BASE * 2, "{next:?}");
    }
}

#[cfg(test)]
mod apply_tests {
    use weft_proto::envoy::envoy::config::cluster::v3 as cluster;
    use weft_proto::resources::{any, assignment, eds_cluster};

    use super::*;

    fn eds(name: &str, lb: cluster::cluster::LbPolicy) -> pb::Any {
        any(&Cluster {
            lb_policy: lb as i32,
            ..eds_cluster(name)
        })
    }

    fn cla(name: &str, ports: &[u16]) -> pb::Any {
        let addrs: Vec<std::net::SocketAddr> = ports
            .iter()
            .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], *p)))
            .collect();
        any(&assignment(name, &addrs))
    }

    fn delta<'a>(resources: &'a [pb::Any], removed: &'a [String]) -> Update<'a> {
        Update {
            resources,
            removed,
            replace: false,
        }
    }

    fn endpoints(c: &MeshConfig, name: &str) -> Arc<state::Endpoints> {
        c.clusters[name].endpoints.clone().expect("endpoints")
    }

    #[test]
    fn a_change_to_one_cluster_rebuilds_no_other_clusters_balancer() {
        use cluster::cluster::LbPolicy;
        let mut held = Held::default();
        let clusters = [eds("a", LbPolicy::Maglev), eds("b", LbPolicy::RoundRobin)];
        apply(&mut held, type_url::CLUSTER, delta(&clusters, &[])).expect("clusters");
        let both = [cla("a", &[1, 2]), cla("b", &[3])];
        apply(&mut held, type_url::ENDPOINT, delta(&both, &[])).expect("endpoints");
        let first = compile(&mut held);
        // b's endpoints change: a's maglev table is kept, b's balancer is new.
        apply(
            &mut held,
            type_url::ENDPOINT,
            delta(&[cla("b", &[3, 4])], &[]),
        )
        .expect("b");
        let second = compile(&mut held);
        assert!(Arc::ptr_eq(
            &endpoints(&first, "a"),
            &endpoints(&second, "a")
        ));
        assert!(!Arc::ptr_eq(
            &endpoints(&first, "b"),
            &endpoints(&second, "b")
        ));
        assert_eq!(endpoints(&second, "b").priorities[0].len(), 2);
        // State of the world sends a again unchanged: equal, so still not rebuilt.
        let sotw = Update {
            resources: &[cla("a", &[1, 2]), cla("b", &[3, 4])],
            removed: &[],
            replace: true,
        };
        apply(&mut held, type_url::ENDPOINT, sotw).expect("sotw");
        let third = compile(&mut held);
        assert!(Arc::ptr_eq(
            &endpoints(&first, "a"),
            &endpoints(&third, "a")
        ));
        assert!(Arc::ptr_eq(
            &endpoints(&second, "b"),
            &endpoints(&third, "b")
        ));
        // a's algorithm changes: a is rebuilt.
        apply(
            &mut held,
            type_url::CLUSTER,
            delta(&[eds("a", LbPolicy::RoundRobin)], &[]),
        )
        .expect("a");
        let fourth = compile(&mut held);
        assert!(!Arc::ptr_eq(
            &endpoints(&third, "a"),
            &endpoints(&fourth, "a")
        ));
        assert_eq!(endpoints(&fourth, "a").algorithm, Algorithm::RoundRobin);
        // Measurements survive a rebuild.
        assert!(Arc::ptr_eq(
            &endpoints(&third, "a").priorities[0][0].stats,
            &endpoints(&fourth, "a").priorities[0][0].stats
        ));
    }

    #[test]
    fn one_bad_resource_refuses_the_whole_response_and_changes_nothing() {
        let mut held = Held::default();
        apply(&mut held, type_url::ENDPOINT, delta(&[cla("a", &[1])], &[])).expect("a");
        // A good change to a and a priority out of range for b, in one response.
        let mut b = assignment("b", &[std::net::SocketAddr::from(([127, 0, 0, 1], 3))]);
        b.endpoints[0].priority = 200;
        let errors = apply(
            &mut held,
            type_url::ENDPOINT,
            delta(&[cla("a", &[2]), any(&b)], &[]),
        )
        .expect_err("refused");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            (errors[0].kind, errors[0].name.as_str()),
            ("ClusterLoadAssignment", "b")
        );
        assert!(
            errors[0].message.contains("priority 200 is too large"),
            "{errors:?}"
        );
        assert_eq!(held.endpoints.len(), 1);
        assert_eq!(
            held.endpoints["a"].priorities[0][0].addr.port(),
            1,
            "a is unchanged"
        );
        // A resource of another type in the response is refused too.
        let errors = apply(
            &mut held,
            type_url::ENDPOINT,
            delta(&[eds("x", cluster::cluster::LbPolicy::RoundRobin)], &[]),
        )
        .expect_err("wrong type");
        assert!(
            errors[0]
                .message
                .contains("in a ClusterLoadAssignment response"),
            "{errors:?}"
        );
        // Delta removal.
        apply(
            &mut held,
            type_url::ENDPOINT,
            delta(&[], &["a".to_string()]),
        )
        .expect("removal");
        assert!(held.endpoints.is_empty());
    }

    /// Cluster `name` reading the assignment `service` (EDS `service_name`).
    fn eds_as(name: &str, service: &str) -> pb::Any {
        any(&Cluster {
            eds_cluster_config: Some(cluster::cluster::EdsClusterConfig {
                service_name: service.into(),
                ..Default::default()
            }),
            ..eds_cluster(name)
        })
    }

    fn ports(e: &state::Endpoints) -> Vec<u16> {
        e.priorities
            .iter()
            .flatten()
            .map(|e| e.addr.port())
            .collect()
    }

    #[test]
    fn state_of_the_world_drops_what_a_response_no_longer_names() {
        let mut held = Held::default();
        fn sotw(resources: &[pb::Any]) -> Update<'_> {
            Update {
                resources,
                removed: &[],
                replace: true,
            }
        }
        let two = [cla("a", &[1]), cla("b", &[2])];
        apply(&mut held, type_url::ENDPOINT, sotw(&two)).expect("both");
        apply(&mut held, type_url::ENDPOINT, sotw(&[cla("b", &[3])])).expect("b only");
        assert_eq!(held.endpoints.keys().collect::<Vec<_>>(), ["b"]);
        // Delta never drops what it does not name.
        apply(&mut held, type_url::ENDPOINT, delta(&[cla("a", &[1])], &[])).expect("a");
        assert_eq!(held.endpoints.len(), 2);
    }

    #[test]
    fn reuse_follows_the_assignment_a_cluster_reads_not_its_name() {
        use cluster::cluster::LbPolicy;
        let mut held = Held::default();
        // x and y read one assignment; z reads its own.
        let clusters = [
            eds_as("x", "shared"),
            eds_as("y", "shared"),
            eds("z", LbPolicy::RoundRobin),
        ];
        apply(&mut held, type_url::CLUSTER, delta(&clusters, &[])).expect("clusters");
        let sets = [cla("shared", &[1, 2]), cla("z", &[3]), cla("other", &[4])];
        apply(&mut held, type_url::ENDPOINT, delta(&sets, &[])).expect("endpoints");
        let first = compile(&mut held);
        assert_eq!(ports(&endpoints(&first, "x")), [1, 2]);
        assert_eq!(ports(&endpoints(&first, "y")), [1, 2]);
        // One endpoint, one set of stats, whichever cluster it is reached through.
        assert!(Arc::ptr_eq(
            &endpoints(&first, "x").priorities[0][0].stats,
            &endpoints(&first, "y").priorities[0][0].stats
        ));
        // The shared assignment changes: both clusters see it.
        apply(
            &mut held,
            type_url::ENDPOINT,
            delta(&[cla("shared", &[1, 5])], &[]),
        )
        .expect("shared");
        let second = compile(&mut held);
        assert_eq!(ports(&endpoints(&second, "x")), [1, 5]);
        assert_eq!(ports(&endpoints(&second, "y")), [1, 5]);
        assert!(Arc::ptr_eq(
            &endpoints(&first, "z"),
            &endpoints(&second, "z")
        ));
        // y now reads another assignment: it gets that one, x keeps the shared one.
        apply(
            &mut held,
            type_url::CLUSTER,
            delta(&[eds_as("y", "other")], &[]),
        )
        .expect("y");
        let third = compile(&mut held);
        assert_eq!(ports(&endpoints(&third, "y")), [4]);
        assert!(Arc::ptr_eq(
            &endpoints(&second, "x"),
            &endpoints(&third, "x")
        ));
        // z removed and added back: built again, not the endpoints of before its removal.
        apply(&mut held, type_url::CLUSTER, delta(&[], &["z".to_string()])).expect("rm z");
        let fourth = compile(&mut held);
        assert!(!fourth.clusters.contains_key("z"));
        apply(
            &mut held,
            type_url::CLUSTER,
            delta(&[eds("z", LbPolicy::RoundRobin)], &[]),
        )
        .expect("z");
        let fifth = compile(&mut held);
        assert_eq!(ports(&endpoints(&fifth, "z")), [3]);
        assert!(!Arc::ptr_eq(
            &endpoints(&first, "z"),
            &endpoints(&fifth, "z")
        ));
    }
}
