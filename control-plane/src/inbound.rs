//! The per-workload inbound Listener (`weft-inbound`): how one sidecar's inbound treats each
//! of its ports — the mTLS mode its PeerAuthentications (or namespace) give it, and the
//! protocol its Service ports declare (`appProtocol` or the port name's prefix).
//!
//! Unlike every other resource it depends on who asks, so a stream's snapshot is keyed by
//! (place, inbound listener): the replicas of one Deployment at one place still share one.
//! The sidecar is found by what its node says: node id `<pod>.<namespace>`, namespace, and
//! pod IPs (`INSTANCE_IPS`). A proxy that lies about them only changes how its own inbound
//! treats its own connections, which it controls anyway.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use weft_proto::envoy::envoy::config::core::v3 as core;
use weft_proto::envoy::envoy::config::listener::v3 as listener;
use weft_proto::protocol::Declared;

use crate::catalog::ServiceKey;
use crate::translate::{Res, Translation, resource, socket_address, weft_metadata};

/// Who asks, as its xDS node says.
#[derive(Clone, Copy, Debug)]
pub struct Workload<'a> {
    /// Its namespace.
    pub namespace: &'a str,
    /// Its pod's name, when the node id names it.
    pub pod: Option<&'a str>,
    /// Its pod's IPs.
    pub ips: &'a [IpAddr],
}

/// The protocol that wins when two Service ports reach the same container port: HTTP
/// (parsed, mesh headers stripped) over opaque, a declaration over none.
fn stronger(a: &str, b: &str) -> bool {
    let rank = |p: &str| match Declared::of(p) {
        Some(Declared::Http) => 2,
        Some(Declared::Opaque) => 1,
        None => 0,
    };
    rank(b) > rank(a)
}

/// How an endpoint names its pod: by name (its `targetRef`), else only by address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum PodRef {
    Name(String),
    Ip(IpAddr),
}

/// Container port -> declared protocol, and the Services it is an endpoint of, per (namespace,
/// pod) of this cluster's endpoints, built once per translation so a stream's inbound
/// Listener is a lookup, not a scan.
#[derive(Debug, Default)]
pub struct PortIndex {
    ports: HashMap<(String, PodRef), BTreeMap<u16, String>>,
    services: HashMap<(String, PodRef), BTreeSet<String>>,
}

impl PortIndex {
    /// The index of `services`' endpoints in `cluster`.
    pub fn build<'a>(
        services: impl Iterator<Item = &'a crate::catalog::ServiceModel>,
        cluster: &str,
    ) -> Self {
        let mut out: HashMap<(String, PodRef), BTreeMap<u16, String>> = HashMap::new();
        let mut names: HashMap<(String, PodRef), BTreeSet<String>> = HashMap::new();
        for svc in services {
            for e in svc.endpoints.iter().filter(|e| e.cluster == cluster) {
                let pod = match &e.pod {
                    Some(p) => PodRef::Name(p.clone()),
                    None => PodRef::Ip(e.address),
                };
                let key = (svc.key.namespace.clone(), pod);
                names
                    .entry(key.clone())
                    .or_default()
                    .insert(svc.key.name.clone());
                let ports = out.entry(key).or_default();
                for port in &svc.ports {
                    let Some(target) = e.port_for(port) else {
                        continue;
                    };
                    merge(ports, target, port.protocol());
                }
            }
        }
        PortIndex {
            ports: out,
            services: names,
        }
    }

    /// The refs a workload is known by: its pod's name, and its IPs.
    fn refs<'a>(w: &'a Workload<'_>) -> impl Iterator<Item = (String, PodRef)> + 'a {
        w.pod
            .map(|p| PodRef::Name(p.to_string()))
            .into_iter()
            .chain(w.ips.iter().map(|ip| PodRef::Ip(*ip)))
            .map(|r| (w.namespace.to_string(), r))
    }

    /// The Services of its namespace a workload is an endpoint of.
    pub fn services_of(&self, w: &Workload<'_>) -> BTreeSet<String> {
        Self::refs(w)
            .filter_map(|k| self.services.get(&k))
            .flatten()
            .cloned()
            .collect()
    }

    /// The ports of a workload: its pod's by name, and those of endpoints that name no pod
    /// but have one of its IPs.
    fn of(&self, w: &Workload<'_>) -> BTreeMap<u16, String> {
        let mut out = BTreeMap::new();
        for k in Self::refs(w) {
            if let Some(ports) = self.ports.get(&k) {
                for (port, protocol) in ports {
                    merge(&mut out, *port, protocol.clone());
                }
            }
        }
        out
    }
}

fn merge(ports: &mut BTreeMap<u16, String>, port: u16, protocol: String) {
    let slot = ports.entry(port).or_default();
    if stronger(slot, &protocol) {
        *slot = protocol;
    }
}

/// The inbound Listener of one workload.
pub fn inbound_meta(t: &Translation, w: &Workload<'_>) -> weft_proto::xds::InboundMeta {
    let labels = w
        .pod
        .and_then(|p| t.pod_labels.get(&ServiceKey::new(w.namespace, p)));
    let mtls = t.mtls.resolve(w.namespace, labels);
    // From this cluster's Services of its namespace whose endpoints are this pod.
    let protocols = t.ports.of(w);
    let mut ports: BTreeMap<u16, weft_proto::xds::InboundPort> = BTreeMap::new();
    for (port, protocol) in protocols {
        ports.entry(port).or_default().protocol = protocol;
    }
    for (port, s) in &mtls.ports {
        let p = ports.entry(*port).or_default();
        p.mtls_mode = s.mode.as_str().to_string();
        p.mtls_source = s.source.clone();
    }
    weft_proto::xds::InboundMeta {
        egress_hosts: t
            .mtls
            .egress_hosts
            .get(w.namespace)
            .cloned()
            .unwrap_or_default(),
        mtls_mode: mtls.mode.mode.as_str().to_string(),
        mtls_source: mtls.mode.source,
        ports: ports
            .into_iter()
            .map(|(port, mut p)| {
                p.port = u32::from(port);
                p
            })
            .collect(),
    }
}

/// The AuthorizationPolicies that apply to a workload.
pub fn policies_of(
    t: &Translation,
    w: &Workload<'_>,
) -> Vec<std::sync::Arc<crate::objects::Named<crate::authz::AuthorizationPolicySpec>>> {
    policies_for(&t.authz, &t.pod_labels, &t.ports, w)
}

/// [`policies_of`] from the parts of a model.
fn policies_for(
    authz: &crate::authz::AuthzPolicies,
    pod_labels: &BTreeMap<ServiceKey, BTreeMap<String, String>>,
    ports: &PortIndex,
    w: &Workload<'_>,
) -> Vec<std::sync::Arc<crate::objects::Named<crate::authz::AuthorizationPolicySpec>>> {
    let labels = w
        .pod
        .and_then(|p| pod_labels.get(&ServiceKey::new(w.namespace, p)));
    authz.for_workload(w.namespace, labels, &ports.services_of(w))
}

/// The RBAC engines a workload's sidecar runs: its policies compiled into the filter chains
/// it is sent, read back by `weft_proto::rbac` as the sidecar reads them.
pub fn chains_for(
    model: &crate::catalog::Model,
    ports: &PortIndex,
    w: &Workload<'_>,
) -> Result<weft_proto::rbac::Chains, String> {
    let policies = policies_for(&model.authz, &model.pod_labels, ports, w);
    weft_proto::rbac::Chains::of(&filter_chains(&policies))
        .map_err(|e| format!("the compiled policies do not evaluate: {e}"))
}

/// What `weftctl authz check` asks.
#[derive(Clone, Debug)]
pub struct AccessQuestion {
    /// The caller's verified SPIFFE ID; `None` for plaintext.
    pub principal: Option<String>,
    /// The caller's address.
    pub source: Option<IpAddr>,
    /// The Service.
    pub service: ServiceKey,
    /// The Service port; `None` for its first.
    pub port: Option<u16>,
    /// Method, path and host of the request.
    pub method: String,
    /// The request path.
    pub path: String,
    /// `:authority`.
    pub host: String,
}

/// The answer for one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessVerdict {
    /// Its pod, when known.
    pub pod: Option<String>,
    /// Address and container port.
    pub address: std::net::SocketAddr,
    /// `http` or `tcp`.
    pub chain: &'static str,
    /// Allowed.
    pub allowed: bool,
    /// The deciding RBAC policy.
    pub policy: Option<String>,
    /// The matching AUDIT policy.
    pub audit: Option<String>,
    /// Why, in a sentence.
    pub reason: String,
}

/// Answers an [`AccessQuestion`] for every endpoint of the Service in this cluster: the
/// `weft-inbound` filter chains each would be sent, read and evaluated by
/// `weft_proto::rbac` exactly as the sidecar does, after its mTLS mode (a plaintext caller
/// of a STRICT port is refused before any policy).
pub fn check_access(
    model: &crate::catalog::Model,
    q: &AccessQuestion,
) -> Result<Vec<AccessVerdict>, String> {
    let svc = model
        .services
        .get(&q.service)
        .ok_or_else(|| format!("no Service {} in the catalog", q.service))?;
    let port = match q.port {
        Some(p) => svc
            .ports
            .iter()
            .find(|sp| sp.port == p)
            .ok_or_else(|| format!("Service {} has no port {p}", q.service))?,
        None => svc
            .ports
            .first()
            .ok_or_else(|| format!("Service {} has no ports", q.service))?,
    };
    let ports = PortIndex::build(model.services.values().map(|s| &**s), &model.cluster);
    let mut out = Vec::new();
    for e in svc.endpoints.iter().filter(|e| e.cluster == model.cluster) {
        let Some(target) = e.port_for(port) else {
            continue;
        };
        let address = std::net::SocketAddr::new(e.address, target);
        let ips = [e.address];
        let w = Workload {
            namespace: &q.service.namespace,
            pod: e.pod.as_deref(),
            ips: &ips,
        };
        let chains = chains_for(model, &ports, &w)?;
        let labels = e.pod.as_deref().and_then(|p| {
            model
                .pod_labels
                .get(&ServiceKey::new(&q.service.namespace, p))
        });
        let mode = model.mtls.resolve(&q.service.namespace, labels).on(target);
        let tcp = weft_proto::protocol::Declared::of(&port.protocol())
            == Some(weft_proto::protocol::Declared::Opaque);
        let chain = if tcp { "tcp" } else { "http" };
        let refused = |reason: String| AccessVerdict {
            pod: e.pod.clone(),
            address,
            chain,
            allowed: false,
            policy: None,
            audit: None,
            reason,
        };
        if q.principal.is_none() && mode == weft_proto::tls::MtlsMode::Strict {
            out.push(refused(
                "mTLS mode STRICT refuses a plaintext caller".into(),
            ));
            continue;
        }
        let engine = if tcp { &chains.tcp } else { &chains.http };
        // The path as the sidecar judges it: normalised when the workload has policies.
        let (raw, query) = match q.path.split_once('?') {
            Some((p, qs)) => (p, Some(qs)),
            None => (q.path.as_str(), None),
        };
        let path = match (
            tcp || engine.is_empty(),
            weft_proto::rbac::normalize_path(raw),
        ) {
            (true, _) => q.path.clone(),
            (false, Ok(p)) => match query {
                Some(qs) => format!("{p}?{qs}"),
                None => p.into_owned(),
            },
            (false, Err(why)) => {
                out.push(refused(format!("refused with 400: {why}")));
                continue;
            }
        };
        let headers = http::HeaderMap::new();
        let http = weft_proto::rbac::HttpInput {
            method: &q.method,
            path: &path,
            authority: &q.host,
            headers: &headers,
        };
        let input = weft_proto::rbac::Input {
            principal: q.principal.as_deref(),
            source: q.source.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            destination: address,
            http: (!tcp).then_some(http),
        };
        let d = engine.evaluate(&input);
        let reason = match (d.allowed, d.policy) {
            (true, Some(p)) => format!("allowed by {p}"),
            (true, None) => "allowed: no ALLOW policy applies and no DENY rule matches".into(),
            (false, Some(p)) => format!("denied by {p}"),
            (false, None) => "denied: ALLOW policies apply and none of their rules matches".into(),
        };
        out.push(AccessVerdict {
            pod: e.pod.clone(),
            address,
            chain,
            allowed: d.allowed,
            policy: d.policy.map(str::to_string),
            audit: d.audit.map(str::to_string),
            reason,
        });
    }
    Ok(out)
}

/// The cluster the inbound's routes and TCP proxy name: the connection's original
/// destination, i.e. the application.
const PASSTHROUGH: &str = "inbound-passthrough";

/// The `weft-inbound` Listener: [`inbound_meta`], and the workload's authorization as Envoy
/// RBAC filters in two filter chains: HTTP (an HTTP connection manager: RBAC filters, then
/// the router) for connections served as HTTP, and TCP (network RBAC filters, then a TCP
/// proxy) for everything spliced.
pub fn inbound_listener(t: &Translation, w: &Workload<'_>) -> Res {
    let policies = policies_of(t, w);
    let l = listener::Listener {
        name: weft_proto::keys::INBOUND_LISTENER.to_string(),
        address: Some(socket_address(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            weft_proto::keys::INBOUND_PORT,
        )),
        traffic_direction: core::TrafficDirection::Inbound as i32,
        metadata: Some(weft_metadata(&inbound_meta(t, w))),
        filter_chains: filter_chains(&policies),
        ..Default::default()
    };
    resource(l.name.clone(), &l)
}

/// The HTTP and TCP filter chains with the policies' RBAC filters, checked with the engine
/// the sidecar runs: chains it would refuse (which would freeze every later update of the
/// workload's Listeners) are never sent; a deny-all is, and the error is logged.
pub fn filter_chains(
    policies: &[std::sync::Arc<crate::objects::Named<crate::authz::AuthorizationPolicySpec>>],
) -> Vec<listener::FilterChain> {
    let chains = build_chains(policies);
    match weft_proto::rbac::Chains::of(&chains) {
        Ok(_) => chains,
        Err(e) => {
            let names: Vec<String> = policies
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect();
            tracing::error!(policies = ?names, error = %e, "authorization compiled to RBAC the sidecar cannot run; sending deny-all instead");
            let namespace = policies.first().map_or("", |p| p.namespace.as_str());
            build_chains(&[crate::authz::deny_all(namespace, "weft-uncompilable")])
        }
    }
}

fn build_chains(
    policies: &[std::sync::Arc<crate::objects::Named<crate::authz::AuthorizationPolicySpec>>],
) -> Vec<listener::FilterChain> {
    use crate::authz::{Chain, compile};
    use prost::Message;
    use weft_proto::envoy::envoy::config::route::v3 as route;
    use weft_proto::envoy::envoy::extensions::filters::http::router::v3::Router;
    use weft_proto::envoy::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
    use weft_proto::envoy::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
    use weft_proto::envoy::google::protobuf::Any;
    use weft_proto::rbac::{self as r, wire};

    let http_filters = compile(policies, Chain::Http)
        .into_iter()
        .map(|(action, policies)| hcm::HttpFilter {
            name: r::HTTP_FILTER.into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(Any {
                type_url: r::HTTP_RBAC_TYPE.into(),
                value: wire::HttpRbac {
                    rules: Some(wire::Rbac::new(action, policies)),
                    rules_stat_prefix: String::new(),
                }
                .encode_to_vec(),
            })),
            ..Default::default()
        })
        .chain([hcm::HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(
                crate::translate::any_of(&Router::default()),
            )),
            ..Default::default()
        }])
        .collect();
    let manager = hcm::HttpConnectionManager {
        stat_prefix: "inbound".into(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
            route::RouteConfiguration {
                name: "inbound".into(),
                virtual_hosts: vec![route::VirtualHost {
                    name: "inbound".into(),
                    domains: vec!["*".into()],
                    routes: vec![route::Route {
                        r#match: Some(route::RouteMatch {
                            path_specifier: Some(route::route_match::PathSpecifier::Prefix(
                                "/".into(),
                            )),
                            ..Default::default()
                        }),
                        action: Some(route::route::Action::Route(route::RouteAction {
                            cluster_specifier: Some(
                                route::route_action::ClusterSpecifier::Cluster(PASSTHROUGH.into()),
                            ),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )),
        http_filters,
        ..Default::default()
    };
    let network = compile(policies, Chain::Tcp)
        .into_iter()
        .map(|(action, policies)| listener::Filter {
            name: r::NETWORK_FILTER.into(),
            config_type: Some(listener::filter::ConfigType::TypedConfig(Any {
                type_url: r::NETWORK_RBAC_TYPE.into(),
                value: wire::NetworkRbac {
                    rules: Some(wire::Rbac::new(action, policies)),
                    stat_prefix: "inbound".into(),
                }
                .encode_to_vec(),
            })),
        })
        .chain([listener::Filter {
            name: "envoy.filters.network.tcp_proxy".into(),
            config_type: Some(listener::filter::ConfigType::TypedConfig(
                crate::translate::any_of(&tcp::TcpProxy {
                    stat_prefix: "inbound".into(),
                    cluster_specifier: Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(
                        PASSTHROUGH.into(),
                    )),
                    ..Default::default()
                }),
            )),
        }])
        .collect();
    let alpn = |a: &[u8]| String::from_utf8_lossy(a).into_owned();
    vec![
        listener::FilterChain {
            name: r::HTTP_CHAIN.into(),
            filter_chain_match: Some(listener::FilterChainMatch {
                application_protocols: vec![
                    "http/1.1".into(),
                    "h2c".into(),
                    alpn(weft_proto::tls::ALPN_MESH_HTTP1),
                    alpn(weft_proto::tls::ALPN_MESH_H2),
                ],
                ..Default::default()
            }),
            filters: vec![listener::Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(
                    crate::translate::any_of(&manager),
                )),
            }],
            ..Default::default()
        },
        listener::FilterChain {
            name: r::TCP_CHAIN.into(),
            filters: network,
            ..Default::default()
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn world(docs: Vec<serde_json::Value>) -> Translation {
        crate::translate::translate(&crate::translate::tests::model(docs), None)
    }

    fn pod(name: &str, app: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": app}},
            "spec": {"containers": []}})
    }

    /// Replicas of one Deployment get byte-identical Listeners (so they share a snapshot);
    /// a pod another policy selects does not. Ports come from slices naming the pod, or,
    /// naming none, having its IP.
    #[test]
    fn replicas_share_their_listener_and_ports_are_found_by_name_or_address() {
        let t = world(vec![
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"ports": [{"name": "http-web", "port": 80}, {"name": "grpc", "port": 90}]}}),
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "web", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http-web", "port": 8080}, {"name": "grpc", "port": 9090}],
                "endpoints": [
                    {"addresses": ["198.18.0.1"], "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop"}},
                    {"addresses": ["198.18.0.2"], "targetRef": {"kind": "Pod", "name": "web-2", "namespace": "shop"}},
                    {"addresses": ["198.18.0.3"]}]}),
            pod("web-1", "web"),
            pod("web-2", "web"),
            pod("db-1", "db"),
            json!({"apiVersion": "weft.dev/v1alpha1", "kind": "PeerAuthentication",
                "metadata": {"name": "db", "namespace": "shop"},
                "spec": {"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "STRICT"}}}),
        ]);
        let of = |pod: Option<&str>, ips: &[IpAddr]| {
            inbound_listener(
                &t,
                &Workload {
                    namespace: "shop",
                    pod,
                    ips,
                },
            )
        };
        let (w1, w2) = (of(Some("web-1"), &[]), of(Some("web-2"), &[]));
        assert_eq!(w1.version, w2.version, "replicas must share one listener");
        assert_ne!(of(Some("db-1"), &[]).version, w1.version);
        let meta = inbound_meta(
            &t,
            &Workload {
                namespace: "shop",
                pod: Some("web-1"),
                ips: &[],
            },
        );
        let ports: Vec<(u32, &str)> = meta
            .ports
            .iter()
            .map(|p| (p.port, p.protocol.as_str()))
            .collect();
        assert_eq!(ports, [(8080, "http"), (9090, "grpc")]);
        // By address only: the endpoint naming no pod.
        let by_ip = inbound_meta(
            &t,
            &Workload {
                namespace: "shop",
                pod: None,
                ips: &["198.18.0.3".parse().expect("ip")],
            },
        );
        assert_eq!(by_ip.ports.len(), 2);
        // Another namespace claiming the name finds nothing.
        let elsewhere = inbound_meta(
            &t,
            &Workload {
                namespace: "evil",
                pod: Some("web-1"),
                ips: &[],
            },
        );
        assert!(elsewhere.ports.is_empty());
    }
}
