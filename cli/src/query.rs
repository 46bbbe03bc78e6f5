//! Queries against a control plane's admin API.

use std::net::SocketAddr;

use prost::Message;
use serde::Serialize;
use serde_json::{Value, json};
use weft_proto::admin::admin_client::AdminClient;
use weft_proto::admin::{
    GetProxyConfigRequest, ListProxiesRequest, ListServicesRequest, ListSourceErrorsRequest,
    SyncState,
};
use weft_proto::envoy::envoy::config::cluster::v3::Cluster;
use weft_proto::envoy::envoy::config::core::v3 as core;
use weft_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;
use weft_proto::envoy::envoy::config::listener::v3::Listener;
use weft_proto::envoy::envoy::config::route::v3 as route;
use weft_proto::type_url;

use crate::Format;
use crate::output::print;

/// Where the control plane is and how to prove to it that the caller is an operator.
#[derive(Clone, Debug)]
pub struct Cp {
    /// `HOST:PORT` of its TLS gRPC port.
    pub addr: String,
    /// The operator credentials file (`--credentials`); `None`: the default path.
    pub credentials: Option<std::path::PathBuf>,
}

impl std::fmt::Display for Cp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr)
    }
}

/// Where `weftctl` looks for credentials without `--credentials`.
pub fn default_credentials() -> Option<std::path::PathBuf> {
    std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".config/weft/credentials.pem"))
}

async fn client(cp: &Cp) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
    let path = cp
        .credentials
        .clone()
        .or_else(default_credentials)
        .ok_or_else(|| {
            anyhow::anyhow!("no operator credentials: pass --credentials FILE (WEFT_CREDENTIALS)")
        })?;
    let creds = weft_proto::credentials::Credentials::read(&path).map_err(|e| {
        anyhow::anyhow!(
            "operator credentials: {e}\n  make them with `weft-control-plane operator issue --ca-dir DIR --name NAME --out FILE` (or `weftctl install` / `weftctl demo` write them), then pass --credentials FILE (WEFT_CREDENTIALS)"
        )
    })?;
    let config = creds
        .client_config()
        .map_err(|e| anyhow::anyhow!("operator credentials {}: {e}", path.display()))?;
    let ch = weft_proto::dial::control_plane(
        &cp.addr,
        config,
        None,
        std::time::Duration::from_secs(3),
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the control plane at {cp}: {} (set --cp or WEFT_CP to its TLS gRPC port)",
            weft_proto::logging::error_chain(&e)
        )
    })?;
    Ok(AdminClient::new(ch).max_decoding_message_size(64 * 1024 * 1024))
}

/// The mesh roots the control plane at `cp` hands proxies now, PEM (its answer is trusted
/// through the roots in the operator credentials, which authenticate it).
pub async fn trust_bundle(cp: &Cp) -> anyhow::Result<String> {
    let mut c = client(cp).await?;
    let roots = c
        .get_trust_bundle(weft_proto::admin::GetTrustBundleRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("control plane at {cp}: {}", s.message()))?
        .into_inner()
        .roots_pem;
    if !roots.iter().any(|p| p.contains("BEGIN CERTIFICATE")) {
        anyhow::bail!("the control plane at {cp} sent no root certificate");
    }
    Ok(roots.join("\n"))
}

/// One proxy row of `weftctl status` (JSON/YAML field names are stable).
#[derive(Serialize)]
pub struct ProxyRow {
    /// Node id.
    pub proxy: String,
    /// Namespace.
    pub namespace: String,
    /// Cluster.
    pub cluster: String,
    /// Zone.
    pub zone: String,
    /// Control plane replica.
    pub replica: String,
    /// `sotw` or `delta`.
    pub protocol: String,
    /// Per type short name (CDS, EDS, LDS, RDS, DIR).
    pub types: Vec<TypeRow>,
    /// On demand: the service-ports it subscribes to (`None`: it holds every Service's).
    pub subscribed: Option<u32>,
}

/// One xDS type of one proxy.
#[derive(Serialize)]
pub struct TypeRow {
    /// CDS, EDS, LDS or RDS.
    #[serde(rename = "type")]
    pub kind: String,
    /// SYNCED, STALE, NACKED or NOT_SENT.
    pub state: String,
    /// Last version sent.
    pub sent_version: String,
    /// Last version ACKed.
    pub acked_version: String,
    /// Seconds since the last ACK, if any.
    pub ack_age_seconds: Option<f64>,
    /// The NACK's message.
    pub nack: Option<String>,
    /// Resources held.
    pub resources: u32,
    /// A wildcard subscription (every resource of the type).
    pub wildcard: bool,
    /// Names subscribed besides.
    pub subscribed_names: u32,
}

fn state_name(s: SyncState) -> &'static str {
    match s {
        SyncState::Synced => "SYNCED",
        SyncState::Stale => "STALE",
        SyncState::Nacked => "NACKED",
        SyncState::NotSent | SyncState::Unspecified => "NOT_SENT",
    }
}

/// Says on stderr which control-plane replicas answered for how many proxies, and which
/// could not be asked (their proxies are then missing); true when all were reached.
fn report_replicas(replicas: &[weft_proto::admin::ReplicaStatus]) -> bool {
    if replicas.is_empty() {
        return true;
    }
    let reached: Vec<String> = replicas
        .iter()
        .filter(|r| r.error.is_empty())
        .map(|r| format!("{} ({} proxies)", r.name, r.proxies))
        .collect();
    eprintln!("replicas: {}", reached.join(", "));
    let mut all = true;
    for r in replicas.iter().filter(|r| !r.error.is_empty()) {
        all = false;
        eprintln!(
            "warning: the replica at {} was not reached ({}): its proxies are missing above",
            r.address, r.error
        );
    }
    all
}

/// `weftctl status`: every replica's proxies; exit 1 when any proxy has a NACKed type or a
/// replica could not be asked.
pub async fn status(cp: &Cp, format: Format) -> anyhow::Result<i32> {
    let resp = client(cp)
        .await?
        .list_proxies(ListProxiesRequest::default())
        .await?
        .into_inner();
    let now = weft_now_ms();
    let rows: Vec<ProxyRow> = resp
        .proxies
        .iter()
        .map(|p| ProxyRow {
            proxy: p.node_id.clone(),
            namespace: p.namespace.clone(),
            cluster: p.cluster.clone(),
            zone: p.zone.clone(),
            replica: p.replica.clone(),
            protocol: p.protocol.clone(),
            types: p
                .types
                .iter()
                .map(|t| TypeRow {
                    kind: type_url::short(&t.type_url).to_string(),
                    state: state_name(t.state()).into(),
                    sent_version: t.sent_version.clone(),
                    acked_version: t.acked_version.clone(),
                    ack_age_seconds: (t.last_ack_unix_ms > 0)
                        .then(|| (now - t.last_ack_unix_ms) as f64 / 1000.0),
                    nack: (!t.nack_detail.is_empty()).then(|| t.nack_detail.clone()),
                    resources: t.resource_count,
                    wildcard: t.wildcard,
                    subscribed_names: t.subscribed_names,
                })
                .collect(),
            // A proxy holding the directory discovers on demand: its RDS names are what it uses.
            subscribed: p
                .types
                .iter()
                .any(|t| t.type_url == type_url::DIRECTORY)
                .then(|| {
                    p.types
                        .iter()
                        .find(|t| t.type_url == type_url::ROUTE)
                        .map_or(0, |t| t.subscribed_names)
                }),
        })
        .collect();
    let nacked = rows
        .iter()
        .any(|r| r.types.iter().any(|t| t.state == "NACKED"));
    let table_rows = rows
        .iter()
        .map(|r| {
            let mut cells = vec![
                r.proxy.clone(),
                r.namespace.clone(),
                r.cluster.clone(),
                r.zone.clone(),
                r.replica.clone(),
            ];
            for kind in ["CDS", "EDS", "LDS", "RDS"] {
                // An on-demand proxy subscribes to a type only once it uses a service.
                let absent = if r.subscribed.is_some() {
                    "-"
                } else {
                    "NOT_SENT"
                };
                let cell = r.types.iter().find(|t| t.kind == kind).map_or(
                    absent.to_string(),
                    |t| match &t.nack {
                        Some(n) => format!("NACKED ({n})"),
                        None => match t.ack_age_seconds {
                            Some(age) if t.state == "SYNCED" => {
                                format!("SYNCED v{} {age:.0}s", t.acked_version)
                            }
                            _ => t.state.clone(),
                        },
                    },
                );
                cells.push(cell);
            }
            cells.push(match r.subscribed {
                Some(n) => format!("on demand: {n}"),
                None => "all".into(),
            });
            cells
        })
        .collect();
    print(
        format,
        &rows,
        &[
            "PROXY",
            "NAMESPACE",
            "CLUSTER",
            "ZONE",
            "REPLICA",
            "CDS",
            "EDS",
            "LDS",
            "RDS",
            "SERVICES",
        ],
        table_rows,
    )?;
    let all_replicas = report_replicas(&resp.replicas);
    Ok(i32::from(nacked || !all_replicas))
}

fn weft_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// One service row.
#[derive(Serialize)]
pub struct ServiceRow {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Ports.
    pub ports: Vec<u32>,
    /// Endpoints, ready ones.
    pub ready_endpoints: u32,
    /// All endpoints.
    pub endpoints: u32,
    /// Split or route backends, `name=weight`.
    pub backends: Vec<String>,
    /// Exported to the clusterset.
    pub exported: bool,
    /// Clusters its endpoints come from.
    pub clusters: Vec<String>,
    /// `cluster.local` (a Service exists in this cluster) and/or `clusterset` (exported here or
    /// by a peer: `<svc>.<ns>.svc.clusterset.local`).
    pub scopes: Vec<String>,
}

/// `weftctl services`.
pub async fn services(cp: &Cp, format: Format) -> anyhow::Result<i32> {
    let resp = client(cp)
        .await?
        .list_services(ListServicesRequest {})
        .await?
        .into_inner();
    let rows: Vec<ServiceRow> = resp
        .services
        .into_iter()
        .map(|s| ServiceRow {
            namespace: s.namespace,
            name: s.name,
            ports: s.ports,
            ready_endpoints: s.ready_endpoints,
            endpoints: s.endpoints,
            backends: s.split,
            exported: s.exported,
            clusters: s.clusters,
            scopes: s.scopes,
        })
        .collect();
    let table = rows
        .iter()
        .map(|r| {
            vec![
                r.namespace.clone(),
                r.name.clone(),
                r.ports
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                format!("{}/{}", r.ready_endpoints, r.endpoints),
                r.backends.join(" "),
                r.clusters.join(","),
                r.scopes.join(","),
            ]
        })
        .collect();
    print(
        format,
        &rows,
        &[
            "NAMESPACE",
            "NAME",
            "PORTS",
            "READY",
            "BACKENDS",
            "CLUSTERS",
            "SCOPES",
        ],
        table,
    )?;
    Ok(0)
}

/// One rollout, as `weftctl rollouts` prints it (JSON/YAML field names are stable).
#[derive(Serialize)]
pub struct RolloutRow {
    /// `namespace/name`.
    pub name: String,
    /// The canary Service.
    pub canary: String,
    /// Progressing, Promoted or RolledBack.
    pub phase: String,
    /// The canary's weight, percent.
    pub weight: u32,
    /// Every step's weight.
    pub steps: Vec<u32>,
    /// The current step's index.
    pub step: u32,
    /// Canary requests finished in the current step, their success rate and p99 (ms).
    pub window: (u64, f64, u64),
    /// Decisions, oldest first: `{at_unix_ms, kind, from, to, reason}`.
    pub decisions: Vec<serde_json::Value>,
}

/// `weftctl rollouts`: each rollout's phase, canary weight and decisions with their reasons.
pub async fn rollouts(cp: &Cp, format: Format) -> anyhow::Result<i32> {
    let resp = client(cp)
        .await?
        .list_rollouts(weft_proto::admin::ListRolloutsRequest {})
        .await?
        .into_inner();
    let rows: Vec<RolloutRow> = resp
        .rollouts
        .into_iter()
        .map(|r| RolloutRow {
            name: r.name,
            canary: r.canary,
            phase: r.phase,
            weight: r.weight,
            steps: r.steps,
            step: r.step,
            window: (r.window_requests, r.window_success_rate, r.window_p99_ms),
            decisions: r
                .decisions
                .into_iter()
                .map(|d| {
                    json!({"at_unix_ms": d.at_unix_ms, "kind": d.kind, "from": d.from_weight,
                           "to": d.to_weight, "reason": d.reason})
                })
                .collect(),
        })
        .collect();
    let table = rows
        .iter()
        .map(|r| {
            let last = r.decisions.last();
            vec![
                r.name.clone(),
                r.canary.clone(),
                r.phase.clone(),
                format!("{} %", r.weight),
                r.steps
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                format!("{} req, {:.1} %", r.window.0, r.window.1 * 100.0),
                last.map_or(String::new(), |d| {
                    format!(
                        "{}: {}",
                        d["kind"].as_str().unwrap_or_default(),
                        d["reason"].as_str().unwrap_or_default()
                    )
                }),
            ]
        })
        .collect();
    print(
        format,
        &rows,
        &[
            "ROLLOUT",
            "CANARY",
            "PHASE",
            "WEIGHT",
            "STEPS",
            "WINDOW",
            "LAST DECISION",
        ],
        table,
    )?;
    Ok(0)
}

/// One source error.
#[derive(Serialize)]
pub struct ErrorRow {
    /// File.
    pub file: String,
    /// Object.
    pub object: String,
    /// Field path.
    pub field: String,
    /// Message.
    pub message: String,
}

/// `weftctl errors`; exit 1 when there are any.
pub async fn errors(cp: &Cp, format: Format) -> anyhow::Result<i32> {
    let resp = client(cp)
        .await?
        .list_source_errors(ListSourceErrorsRequest {})
        .await?
        .into_inner();
    let rows: Vec<ErrorRow> = resp
        .errors
        .into_iter()
        .map(|e| ErrorRow {
            file: e.file,
            object: e.object,
            field: e.field,
            message: e.message,
        })
        .collect();
    let table = rows
        .iter()
        .map(|r| {
            vec![
                r.file.clone(),
                r.object.clone(),
                r.field.clone(),
                r.message.clone(),
            ]
        })
        .collect();
    print(
        format,
        &rows,
        &["FILE", "OBJECT", "FIELD", "MESSAGE"],
        table,
    )?;
    Ok(i32::from(!rows.is_empty()))
}

/// One peer row of `weftctl peers` (JSON/YAML field names are stable).
#[derive(Serialize)]
pub struct PeerRow {
    /// The peer's cluster name.
    pub name: String,
    /// Where it is dialed.
    pub address: String,
    /// `flag` or `MeshPeer`.
    pub origin: String,
    /// CONNECTING, SYNCED, STALE or EXPIRED.
    pub state: String,
    /// Seconds since its last update or heartbeat (`null`: never).
    pub last_sync_seconds: Option<i64>,
    /// Seconds it has been unreachable (0 while connected).
    pub stale_seconds: i64,
    /// Its catalog version last applied.
    pub version: u64,
    /// Services imported from it.
    pub services: u32,
    /// Endpoints imported from it.
    pub endpoints: u32,
    /// Whether it streams our exports now.
    pub exporting_to: bool,
    /// Why the last stream ended or was refused.
    pub last_error: String,
    /// Its network, when another than ours ("" on a flat network).
    pub network: String,
    /// The gateways its endpoints are reached through.
    pub gateways: Vec<String>,
}

/// `weftctl peers`.
pub async fn peers(cp: &Cp, format: Format) -> anyhow::Result<i32> {
    let resp = client(cp)
        .await?
        .list_peers(weft_proto::admin::ListPeersRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let rows: Vec<PeerRow> = resp
        .peers
        .into_iter()
        .map(|p| PeerRow {
            name: p.name,
            address: p.address,
            origin: p.origin,
            state: p.state,
            last_sync_seconds: (p.last_sync_seconds >= 0).then_some(p.last_sync_seconds),
            stale_seconds: p.stale_seconds,
            version: p.version,
            services: p.services,
            endpoints: p.endpoints,
            exporting_to: p.exporting_to,
            last_error: p.last_error,
            network: p.network,
            gateways: p.gateways,
        })
        .collect();
    if rows.is_empty() && format == Format::Table {
        println!(
            "cluster {}: no peers (--peer NAME=ADDR or MeshPeer objects)",
            resp.cluster
        );
        return Ok(0);
    }
    let table = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.address.clone(),
                r.state.clone(),
                r.last_sync_seconds
                    .map_or("never".into(), |s| format!("{s}s ago")),
                format!("{}/{}", r.services, r.endpoints),
                if r.exporting_to { "yes" } else { "no" }.into(),
                if r.network.is_empty() {
                    "-".into()
                } else {
                    format!("{} via {}", r.network, r.gateways.join(","))
                },
                r.last_error.clone(),
            ]
        })
        .collect();
    print(
        format,
        &rows,
        &[
            "PEER",
            "ADDRESS",
            "STATE",
            "LAST SYNC",
            "SERVICES/ENDPOINTS",
            "EXPORTING TO",
            "NETWORK",
            "LAST ERROR",
        ],
        table,
    )?;
    Ok(i32::from(rows.iter().any(|r| r.state != "SYNCED")))
}

/// One endpoint row.
#[derive(Serialize)]
pub struct EndpointRow {
    /// Address.
    pub address: String,
    /// Origin cluster.
    pub cluster: String,
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// `ready`, `serving`, `terminating` or `not-ready`.
    pub health: String,
    /// Weight.
    pub weight: u32,
    /// SPIFFE ID.
    pub identity: String,
    /// Pod.
    pub pod: String,
    /// `port=priority` as the asked proxy sees it.
    pub priorities: Vec<String>,
    /// Imported from a peer that is unreachable now (kept for the grace period).
    pub stale: bool,
    /// On another network: the gateways proxies here reach it through.
    pub gateways: Vec<String>,
    /// With `--from-proxy`: what that proxy measured (absent when it does not hold it).
    pub proxy: Option<ProxyEndpointView>,
}

/// What one proxy measured of an endpoint (its `/clusters`).
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct ProxyEndpointView {
    /// The priority it holds the endpoint at.
    pub priority: usize,
    /// Healthy as the control plane said.
    pub healthy: bool,
    /// Ejected by outlier detection now.
    pub ejected: bool,
    /// Times ejected.
    pub ejections: u32,
    /// Requests in flight.
    pub outstanding: u32,
    /// Peak-EWMA latency, milliseconds.
    pub ewma_ms: f64,
}

/// Endpoint address (IP) -> what the proxy at `admin` measured, for `svc`'s cluster.local
/// clusters.
async fn proxy_endpoint_views(
    admin: SocketAddr,
    name: &str,
    namespace: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, ProxyEndpointView>> {
    let body = http_get(admin, "/clusters").await?;
    let clusters: Value = serde_json::from_str(&body)
        .map_err(|e| anyhow::anyhow!("{admin}/clusters is not JSON: {e}"))?;
    let prefix = format!("{name}.{namespace}.svc.cluster.local:");
    let mut out = std::collections::BTreeMap::new();
    for (cluster, state) in clusters.as_object().into_iter().flatten() {
        if !cluster.starts_with(&prefix) {
            continue;
        }
        let prios = state["endpoints"]["priorities"].as_array();
        for (p, eps) in prios.into_iter().flatten().enumerate() {
            for e in eps.as_array().into_iter().flatten() {
                let addr = e["addr"].as_str().unwrap_or_default();
                let ip = addr
                    .parse::<SocketAddr>()
                    .map_or(addr.to_string(), |a| a.ip().to_string());
                let st = &e["stats"];
                out.insert(
                    ip,
                    ProxyEndpointView {
                        priority: p,
                        healthy: e["healthy"].as_bool().unwrap_or(false),
                        ejected: st["ejected"].as_bool().unwrap_or(false),
                        ejections: st["ejections"].as_u64().unwrap_or(0) as u32,
                        outstanding: st["outstanding"].as_u64().unwrap_or(0) as u32,
                        ewma_ms: st["ewma_ms"].as_f64().unwrap_or(0.0),
                    },
                );
            }
        }
    }
    Ok(out)
}

/// `weftctl endpoints <svc> [--proxy ID]`.
pub async fn endpoints(
    cp: &Cp,
    service: &str,
    proxy: Option<String>,
    from_proxy: Option<SocketAddr>,
    format: Format,
) -> anyhow::Result<i32> {
    let (name, namespace) = service.split_once('.').unwrap_or((service, "default"));
    let measured = match from_proxy {
        Some(admin) => Some(proxy_endpoint_views(admin, name, namespace).await?),
        None => None,
    };
    let resp = client(cp)
        .await?
        .list_endpoints(weft_proto::admin::ListEndpointsRequest {
            namespace: namespace.into(),
            name: name.into(),
            proxy: proxy.unwrap_or_default(),
            local_only: false,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let rows: Vec<EndpointRow> = resp
        .endpoints
        .into_iter()
        .map(|e| EndpointRow {
            health: if e.ready {
                "ready"
            } else if e.serving && e.terminating {
                "terminating"
            } else if e.serving {
                "serving"
            } else {
                "not-ready"
            }
            .into(),
            proxy: measured.as_ref().and_then(|m| m.get(&e.address).cloned()),
            address: e.address,
            cluster: e.cluster,
            region: e.region,
            zone: e.zone,
            weight: e.weight,
            identity: e.identity,
            pod: e.pod,
            priorities: e.priorities,
            stale: e.stale,
            gateways: e.gateways,
        })
        .collect();
    let table = rows
        .iter()
        .map(|r| {
            let health = if r.stale {
                format!("{} (stale)", r.health)
            } else {
                r.health.clone()
            };
            let mut row = vec![
                r.address.clone(),
                r.cluster.clone(),
                r.zone.clone(),
                health,
                r.weight.to_string(),
                r.priorities.join(","),
                r.pod.clone(),
                if r.gateways.is_empty() {
                    "direct".into()
                } else {
                    format!("gateway {}", r.gateways.join(","))
                },
            ];
            if measured.is_some() {
                row.extend(match &r.proxy {
                    Some(v) => [
                        if v.ejected { "ejected" } else { "-" }.to_string(),
                        format!("{:.2}", v.ewma_ms),
                        v.outstanding.to_string(),
                    ],
                    None => ["not held".into(), String::new(), String::new()],
                });
            }
            row
        })
        .collect();
    let mut headers = vec![
        "ADDRESS", "CLUSTER", "ZONE", "HEALTH", "WEIGHT", "PRIORITY", "POD", "REACHED",
    ];
    if measured.is_some() {
        headers.extend(["EJECTED", "EWMA MS", "IN FLIGHT"]);
    }
    print(format, &rows, &headers, table)?;
    Ok(0)
}

/// One endpoint's answer to `weftctl authz check`.
#[derive(Debug, Serialize)]
pub struct AuthzRow {
    /// The pod, when known.
    pub pod: String,
    /// Address and container port.
    pub address: String,
    /// `http` or `tcp`.
    pub chain: String,
    /// Allowed.
    pub allowed: bool,
    /// The deciding RBAC policy, `ns[..]-policy[..]-rule[..]`.
    pub policy: String,
    /// The AUDIT rule that matched.
    pub audit: String,
    /// Why.
    pub reason: String,
}

/// What `weftctl authz check` is asked (its flags).
#[derive(clap::Args)]
pub struct AuthzQuestion {
    /// The caller, `namespace/service-account`; omit for a plaintext caller.
    #[arg(long)]
    pub from: Option<String>,
    /// The service: `svc`, `svc.ns`, optionally `:port` (a Service port; default its first).
    #[arg(long)]
    pub to: String,
    /// The request's method.
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// The request's path (query included, as sent).
    #[arg(long, default_value = "/")]
    pub path: String,
    /// The request's host (default the service's cluster.local name).
    #[arg(long)]
    pub host: Option<String>,
    /// The caller's address, for ipBlocks rules.
    #[arg(long)]
    pub from_ip: Option<std::net::IpAddr>,
}

/// `weftctl authz check`: per endpoint, allowed or denied and by which policy and rule
/// (exit 0 when every endpoint allows, 1 when one denies).
pub async fn authz_check(cp: &Cp, q: AuthzQuestion, format: Format) -> anyhow::Result<i32> {
    let (target, port) = match q.to.rsplit_once(':') {
        Some((t, p)) => (
            t,
            p.parse::<u32>()
                .map_err(|_| anyhow::anyhow!("--to {:?}: port {p:?} is not a number", q.to))?,
        ),
        None => (q.to.as_str(), 0),
    };
    let (service, namespace) = target.split_once('.').unwrap_or((target, "default"));
    // `svc.ns.svc.cluster.local` names too.
    let namespace = namespace.split('.').next().unwrap_or(namespace);
    let resp = client(cp)
        .await?
        .check_authorization(weft_proto::admin::CheckAuthorizationRequest {
            from: q.from.unwrap_or_default(),
            namespace: namespace.into(),
            service: service.into(),
            port,
            method: q.method,
            path: q.path,
            host: q.host.unwrap_or_default(),
            source_ip: q.from_ip.map(|i| i.to_string()).unwrap_or_default(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    if resp.verdicts.is_empty() {
        anyhow::bail!("{service}.{namespace} has no endpoint in this cluster to judge");
    }
    let rows: Vec<AuthzRow> = resp
        .verdicts
        .into_iter()
        .map(|v| AuthzRow {
            pod: v.pod,
            address: v.address,
            chain: v.chain,
            allowed: v.allowed,
            policy: v.policy,
            audit: v.audit,
            reason: v.reason,
        })
        .collect();
    let denied = rows.iter().any(|r| !r.allowed);
    let table = rows
        .iter()
        .map(|r| {
            vec![
                r.pod.clone(),
                r.address.clone(),
                r.chain.clone(),
                if r.allowed { "ALLOWED" } else { "DENIED" }.to_string(),
                r.reason.clone(),
            ]
        })
        .collect();
    print(
        format,
        &rows,
        &["POD", "ADDRESS", "CHAIN", "DECISION", "WHY"],
        table,
    )?;
    Ok(i32::from(denied))
}

/// `weftctl token create`.
pub async fn token_create(
    cp: &Cp,
    namespace: &str,
    service_account: &str,
    ttl: u64,
    format: Format,
) -> anyhow::Result<i32> {
    let t = client(cp)
        .await?
        .create_join_token(weft_proto::admin::CreateJoinTokenRequest {
            namespace: namespace.into(),
            service_account: service_account.into(),
            ttl_seconds: ttl,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    match format {
        Format::Table => {
            // The token alone on stdout (scripts capture it); its id for revocation on stderr.
            eprintln!(
                "token {} for {} (single-use, until {}): revoke with `weftctl token revoke {}`",
                t.id, t.spiffe_id, t.expires_at_unix, t.id
            );
            println!("{}", t.token)
        }
        _ => print(
            format,
            &json!({"token": t.token, "id": t.id, "spiffe_id": t.spiffe_id, "expires_at_unix": t.expires_at_unix}),
            &[],
            Vec::new(),
        )?,
    }
    Ok(0)
}

/// `weftctl token revoke ID`.
pub async fn token_revoke(cp: &Cp, id: &str, format: Format) -> anyhow::Result<i32> {
    let r = client(cp)
        .await?
        .revoke_join_token(weft_proto::admin::RevokeJoinTokenRequest { id: id.into() })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    match format {
        Format::Table => println!(
            "token {id} {}",
            if r.newly_revoked {
                "revoked"
            } else {
                "was already revoked"
            }
        ),
        _ => print(
            format,
            &json!({"id": id, "newly_revoked": r.newly_revoked}),
            &[],
            Vec::new(),
        )?,
    }
    Ok(0)
}

/// One finding of `weftctl check`.
#[derive(Serialize)]
pub struct FindingRow {
    /// Stable code, e.g. `selector-matches-no-pod`.
    pub code: String,
    /// The object.
    pub object: String,
    /// What is wrong.
    pub problem: String,
    /// How to fix it.
    pub fix: String,
}

/// `weftctl check`; exit 0 only when clean.
pub async fn check(cp: &Cp, format: Format) -> anyhow::Result<i32> {
    let resp = client(cp)
        .await?
        .check(weft_proto::admin::CheckRequest::default())
        .await?
        .into_inner();
    let rows: Vec<FindingRow> = resp
        .findings
        .into_iter()
        .map(|f| FindingRow {
            code: f.code,
            object: f.object,
            problem: f.problem,
            fix: f.fix,
        })
        .collect();
    if rows.is_empty() && format == Format::Table {
        println!("no problems found");
        return Ok(0);
    }
    let table = rows
        .iter()
        .map(|r| vec![r.object.clone(), r.problem.clone(), r.fix.clone()])
        .collect();
    print(format, &rows, &["OBJECT", "PROBLEM", "FIX"], table)?;
    Ok(i32::from(!rows.is_empty()))
}

/// Which resources `proxy-config` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ConfigKind {
    /// Every type.
    All,
    /// LDS.
    Listeners,
    /// RDS.
    Routes,
    /// CDS.
    Clusters,
    /// EDS.
    Endpoints,
    /// The directory (on-demand proxies): one entry per Service.
    Directory,
    /// What an on-demand proxy subscribes to: with `--from-proxy`, each service-port with why
    /// and since when; from the control plane, the service-ports whose routes it was sent.
    Subscriptions,
}

/// `weftctl proxy-config <proxy> [kind]`.
pub async fn proxy_config(
    cp: &Cp,
    proxy: &str,
    kind: ConfigKind,
    format: Format,
) -> anyhow::Result<i32> {
    let resp = client(cp)
        .await?
        .get_proxy_config(GetProxyConfigRequest {
            node_id: proxy.to_string(),
            local_only: false,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let want = |t: &str| match kind {
        // The directory is the mesh's every Service: only when asked for.
        ConfigKind::All => t != type_url::DIRECTORY,
        ConfigKind::Listeners => t == type_url::LISTENER,
        ConfigKind::Routes | ConfigKind::Subscriptions => t == type_url::ROUTE,
        ConfigKind::Clusters => t == type_url::CLUSTER,
        ConfigKind::Endpoints => t == type_url::ENDPOINT,
        ConfigKind::Directory => t == type_url::DIRECTORY,
    };
    let mut items = Vec::new();
    let mut table = Vec::new();
    for r in resp.resources.iter().filter(|r| want(&r.type_url)) {
        let (summary, detail) = summarize(&r.type_url, &r.value).unwrap_or_else(|e| {
            (
                json!({ "error": e.to_string() }),
                format!("undecodable: {e}"),
            )
        });
        table.push(vec![
            type_url::short(&r.type_url).to_string(),
            r.name.clone(),
            r.version.clone(),
            detail,
        ]);
        items.push(json!({
            "type": type_url::short(&r.type_url),
            "name": r.name,
            "version": r.version,
            "config": summary,
        }));
    }
    print(
        format,
        &items,
        &["TYPE", "NAME", "VERSION", "SUMMARY"],
        table,
    )?;
    Ok(0)
}

fn duration_s(d: &Option<weft_proto::envoy::google::protobuf::Duration>) -> Option<f64> {
    d.as_ref()
        .map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

/// A JSON view and a one-line summary of one resource.
fn summarize(type_url: &str, bytes: &[u8]) -> Result<(Value, String), prost::DecodeError> {
    Ok(match type_url {
        type_url::LISTENER => {
            let l = Listener::decode(bytes)?;
            let inbound = l
                .metadata
                .as_ref()
                .and_then(|m| m.typed_filter_metadata.get("weft"))
                .filter(|_| l.name == weft_proto::keys::INBOUND_LISTENER)
                .map(|a| weft_proto::xds::InboundMeta::decode(a.value.as_slice()))
                .transpose()?;
            match inbound {
                Some(m) => {
                    let ports: Vec<Value> = m
                        .ports
                        .iter()
                        .map(|p| {
                            json!({"port": p.port, "mtls_mode": p.mtls_mode,
                                "mtls_source": p.mtls_source, "protocol": p.protocol})
                        })
                        .collect();
                    let line: Vec<String> = m
                        .ports
                        .iter()
                        .map(|p| {
                            let mode = if p.mtls_mode.is_empty() {
                                &m.mtls_mode
                            } else {
                                &p.mtls_mode
                            };
                            let proto = if p.protocol.is_empty() {
                                "sniffed"
                            } else {
                                &p.protocol
                            };
                            format!("{}={proto}/{mode}", p.port)
                        })
                        .collect();
                    (
                        json!({"name": l.name, "inbound": true, "mtls_mode": m.mtls_mode,
                            "mtls_source": m.mtls_source, "ports": ports}),
                        format!(
                            "inbound: {} ({}){}{}",
                            m.mtls_mode,
                            m.mtls_source,
                            if line.is_empty() { "" } else { "; ports " },
                            line.join(" ")
                        ),
                    )
                }
                None => (
                    json!({"name": l.name, "api_listener": l.api_listener.is_some()}),
                    "api listener".into(),
                ),
            }
        }
        type_url::ROUTE => {
            let rc = route::RouteConfiguration::decode(bytes)?;
            let mut routes = Vec::new();
            let mut line = Vec::new();
            for vh in &rc.virtual_hosts {
                for r in &vh.routes {
                    let Some(route::route::Action::Route(a)) = &r.action else {
                        continue;
                    };
                    let target = match &a.cluster_specifier {
                        Some(route::route_action::ClusterSpecifier::Cluster(c)) => {
                            json!({ c.clone(): 100 })
                        }
                        Some(route::route_action::ClusterSpecifier::WeightedClusters(w)) => {
                            Value::Object(
                                w.clusters
                                    .iter()
                                    .map(|c| {
                                        (
                                            c.name.clone(),
                                            json!(c.weight.as_ref().map_or(0, |v| v.value)),
                                        )
                                    })
                                    .collect(),
                            )
                        }
                        _ => Value::Null,
                    };
                    let m = format!(
                        "{:?}",
                        r.r#match.as_ref().and_then(|m| m.path_specifier.clone())
                    );
                    line.push(format!("{m} -> {target}"));
                    routes.push(json!({
                        "match": m,
                        "backends": target,
                        "timeout_seconds": duration_s(&a.timeout),
                        "retries": a.retry_policy.as_ref().and_then(|p| p.num_retries.as_ref()).map(|v| v.value),
                    }));
                }
            }
            let domains: Vec<&String> = rc.virtual_hosts.iter().flat_map(|v| &v.domains).collect();
            (
                json!({"domains": domains, "routes": routes}),
                line.join("; "),
            )
        }
        type_url::CLUSTER => {
            let c = Cluster::decode(bytes)?;
            let lb = weft_proto::envoy::envoy::config::cluster::v3::cluster::LbPolicy::try_from(
                c.lb_policy,
            )
            .map(|p| p.as_str_name())
            .unwrap_or("UNKNOWN");
            let algorithm = c
                .metadata
                .as_ref()
                .and_then(|m| m.typed_filter_metadata.get("weft"))
                .and_then(|a| weft_proto::xds::ClusterMeta::decode(a.value.as_slice()).ok())
                .map(|m| m.algorithm)
                .unwrap_or_default();
            let th = c
                .circuit_breakers
                .as_ref()
                .and_then(|b| b.thresholds.first());
            (
                json!({
                    "lb_policy": lb,
                    "algorithm": algorithm,
                    "max_connections": th.and_then(|t| t.max_connections.as_ref()).map(|v| v.value),
                    "max_requests": th.and_then(|t| t.max_requests.as_ref()).map(|v| v.value),
                    "outlier_detection": c.outlier_detection.is_some(),
                }),
                format!("{algorithm} ({lb})"),
            )
        }
        type_url::DIRECTORY => {
            let e = weft_proto::xds::DirectoryEntry::decode(bytes)?;
            let line = e
                .scopes
                .iter()
                .map(|s| {
                    let ports: Vec<String> = s
                        .ports
                        .iter()
                        .map(|p| format!("{}/{}", p.port, p.protocol))
                        .collect();
                    format!("{} {} [{}]", s.zone, s.addresses.join(","), ports.join(" "))
                })
                .collect::<Vec<_>>()
                .join("; ");
            let scopes: Vec<Value> = e
                .scopes
                .iter()
                .map(|s| {
                    json!({
                        "zone": s.zone,
                        "addresses": s.addresses,
                        "ports": s.ports.iter().map(|p| json!({"port": p.port, "protocol": p.protocol})).collect::<Vec<_>>(),
                    })
                })
                .collect();
            (
                json!({"name": e.name, "namespace": e.namespace, "scopes": scopes, "export_to": e.export_to}),
                line,
            )
        }
        _ => {
            let cla = ClusterLoadAssignment::decode(bytes)?;
            let mut eps = Vec::new();
            for l in &cla.endpoints {
                let loc = l.locality.clone().unwrap_or_default();
                for e in &l.lb_endpoints {
                    let addr = match &e.host_identifier {
                        Some(weft_proto::envoy::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(ep)) => {
                            match ep.address.as_ref().and_then(|a| a.address.as_ref()) {
                                Some(core::address::Address::SocketAddress(sa)) => match sa.port_specifier {
                                    Some(core::socket_address::PortSpecifier::PortValue(p)) => format!("{}:{p}", sa.address),
                                    _ => sa.address.clone(),
                                },
                                _ => String::new(),
                            }
                        }
                        _ => String::new(),
                    };
                    let health = core::HealthStatus::try_from(e.health_status)
                        .map(|h| h.as_str_name())
                        .unwrap_or("UNKNOWN");
                    eps.push(json!({
                        "address": addr,
                        "priority": l.priority,
                        "region": loc.region,
                        "zone": loc.zone,
                        "health": health,
                        "weight": e.load_balancing_weight.as_ref().map_or(1, |w| w.value),
                    }));
                }
            }
            let line = eps
                .iter()
                .map(|e| {
                    format!(
                        "{}@p{}",
                        e["address"].as_str().unwrap_or_default(),
                        e["priority"]
                    )
                })
                .collect::<Vec<_>>()
                .join(" ");
            (json!({ "endpoints": eps }), line)
        }
    })
}

/// `weftctl certs ADMIN_ADDR`: the proxy's identity, certificate chain and trust bundle, from
/// its admin `/certs`. Exit 1 when it holds no valid certificate.
pub async fn certs(admin: SocketAddr, format: Format) -> anyhow::Result<i32> {
    let body = http_get(admin, "/certs").await?;
    let view: weft_sidecar::admin::CertsView = serde_json::from_str(&body)
        .map_err(|e| anyhow::anyhow!("{admin}/certs is not what weftctl expects: {e}"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let left = |t: i64| {
        let s = t - now;
        if s <= 0 {
            "EXPIRED".to_string()
        } else if s >= 86_400 {
            format!("{}d{}h", s / 86_400, (s % 86_400) / 3600)
        } else {
            format!("{}h{}m{}s", s / 3600, (s % 3600) / 60, s % 60)
        }
    };
    let role = |i: usize, c: &weft_proto::tls::CertInfo, bundle: bool| match (bundle, i, c.is_ca) {
        (true, _, _) => "root",
        (false, 0, _) => "leaf",
        (false, _, true) => "intermediate",
        (false, _, false) => "certificate",
    };
    let rows: Vec<Vec<String>> = view
        .chain
        .iter()
        .enumerate()
        .map(|(i, c)| (i, c, false))
        .chain(
            view.trust_bundle
                .iter()
                .enumerate()
                .map(|(i, c)| (i, c, true)),
        )
        .map(|(i, c, bundle)| {
            vec![
                role(i, c, bundle).to_string(),
                c.spiffe_id.clone().unwrap_or_else(|| c.subject.clone()),
                c.serial.clone(),
                left(c.not_after_unix),
            ]
        })
        .collect();
    print(
        format,
        &view,
        &["ROLE", "IDENTITY", "SERIAL", "EXPIRES IN"],
        rows,
    )?;
    if let (Format::Table, Some(note)) = (format, &view.note) {
        println!("{note}");
    }
    let valid = view.expires_in_seconds.is_some_and(|s| s > 0);
    Ok(if valid { 0 } else { 1 })
}

/// GETs `path` from an HTTP/1.1 server (a sidecar's admin endpoint).
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the proxy's admin endpoint at {addr}: {e}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<bytes::Bytes>::new())?;
    let resp = send.send_request(req).await?;
    if !resp.status().is_success() {
        anyhow::bail!("{addr}{path} answered {}", resp.status());
    }
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

type EndpointSets = std::collections::BTreeMap<String, std::collections::BTreeSet<String>>;

/// Cluster -> endpoint addresses, from the control plane's record of what it sent.
fn control_plane_endpoints(resources: &[weft_proto::admin::ConfigResource]) -> EndpointSets {
    let mut out = EndpointSets::new();
    for r in resources
        .iter()
        .filter(|r| r.type_url == type_url::ENDPOINT)
    {
        let Ok((summary, _)) = summarize(&r.type_url, &r.value) else {
            continue;
        };
        let set = out.entry(r.name.clone()).or_default();
        for e in summary["endpoints"].as_array().into_iter().flatten() {
            if let Some(a) = e["address"].as_str() {
                set.insert(a.to_string());
            }
        }
    }
    out
}

/// Cluster -> endpoint addresses, from a sidecar's `/config_dump`.
fn proxy_endpoints(dump: &Value) -> EndpointSets {
    let mut out = EndpointSets::new();
    for (name, c) in dump["clusters"].as_object().into_iter().flatten() {
        let set = out.entry(name.clone()).or_default();
        for prio in c["endpoints"]["priorities"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for e in prio.as_array().into_iter().flatten() {
                if let Some(a) = e["addr"].as_str() {
                    set.insert(a.to_string());
                }
            }
        }
    }
    out
}

/// One difference between the control plane's and the proxy's view of a cluster.
#[derive(Serialize)]
pub struct DiffRow {
    /// `endpoints` (name: a cluster; items: endpoint addresses) or `routes` (name: a host;
    /// items: route targets, `cluster` or `cluster=weight`).
    pub kind: String,
    /// The cluster or host.
    pub name: String,
    /// Items the control plane sent that the proxy does not hold.
    pub only_in_control_plane: Vec<String>,
    /// Items the proxy holds that the control plane did not send (or no longer does).
    pub only_in_proxy: Vec<String>,
}

/// Host -> route targets, from the RouteConfigurations the control plane sent.
fn control_plane_routes(resources: &[weft_proto::admin::ConfigResource]) -> EndpointSets {
    let mut out = EndpointSets::new();
    for r in resources.iter().filter(|r| r.type_url == type_url::ROUTE) {
        let Ok(rc) = route::RouteConfiguration::decode(r.value.as_slice()) else {
            continue;
        };
        for vh in &rc.virtual_hosts {
            let mut targets = std::collections::BTreeSet::new();
            for rt in &vh.routes {
                if let Some(route::route::Action::Route(a)) = &rt.action {
                    match &a.cluster_specifier {
                        Some(route::route_action::ClusterSpecifier::Cluster(c)) => {
                            targets.insert(c.clone());
                        }
                        Some(route::route_action::ClusterSpecifier::WeightedClusters(w)) => {
                            for c in &w.clusters {
                                let weight = c.weight.as_ref().map_or(0, |v| v.value);
                                targets.insert(format!("{}={weight}", c.name));
                            }
                        }
                        _ => {}
                    }
                }
            }
            for d in &vh.domains {
                out.entry(d.clone())
                    .or_default()
                    .extend(targets.iter().cloned());
            }
        }
    }
    out
}

/// Host -> route targets, from a sidecar's `/config_dump`.
fn proxy_routes(dump: &Value) -> EndpointSets {
    let mut out = EndpointSets::new();
    for (host, routes) in dump["hosts"].as_object().into_iter().flatten() {
        let set = out.entry(host.clone()).or_default();
        for r in routes.as_array().into_iter().flatten() {
            if let Some(c) = r["target"]["Cluster"].as_str() {
                set.insert(c.to_string());
            }
            for w in r["target"]["Weighted"].as_array().into_iter().flatten() {
                if let (Some(c), Some(n)) = (w[0].as_str(), w[1].as_u64()) {
                    set.insert(format!("{c}={n}"));
                }
            }
        }
    }
    out
}

/// Where two name -> items maps differ, as rows of `kind`.
fn diff_sets(kind: &str, sent: &EndpointSets, held: &EndpointSets) -> Vec<DiffRow> {
    let names: std::collections::BTreeSet<&String> = sent.keys().chain(held.keys()).collect();
    let empty = std::collections::BTreeSet::new();
    names
        .into_iter()
        .filter_map(|c| {
            let (a, b) = (sent.get(c).unwrap_or(&empty), held.get(c).unwrap_or(&empty));
            let only_cp: Vec<String> = a.difference(b).cloned().collect();
            let only_proxy: Vec<String> = b.difference(a).cloned().collect();
            let missing = sent.contains_key(c) != held.contains_key(c);
            (missing || !only_cp.is_empty() || !only_proxy.is_empty()).then(|| DiffRow {
                kind: kind.into(),
                name: c.clone(),
                only_in_control_plane: only_cp,
                only_in_proxy: only_proxy,
            })
        })
        .collect()
}

/// `weftctl proxy-config <proxy> --from-proxy ADMIN [--diff]`.
pub async fn proxy_view(
    cp: &Cp,
    proxy: &str,
    admin: SocketAddr,
    kind: ConfigKind,
    diff: bool,
    format: Format,
) -> anyhow::Result<i32> {
    let dump: Value = serde_json::from_str(&http_get(admin, "/config_dump").await?)
        .map_err(|e| anyhow::anyhow!("{admin}/config_dump is not JSON: {e}"))?;
    if kind == ConfigKind::Subscriptions {
        let subs = dump["subscriptions"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let now = weft_now_ms();
        let rows = subs
            .iter()
            .map(|(name, s)| {
                let since = s["since_unix_ms"].as_i64().unwrap_or(now);
                vec![
                    name.clone(),
                    s["why"].as_str().unwrap_or_default().to_string(),
                    format!("{:.0}s ago", (now - since).max(0) as f64 / 1000.0),
                    if s["complete"].as_bool() == Some(true) {
                        "held".into()
                    } else {
                        "waiting".into()
                    },
                ]
            })
            .collect();
        let services = dump["directory"]["services"].as_u64().unwrap_or(0);
        print(
            format,
            &dump["subscriptions"],
            &["SERVICE-PORT", "WHY", "SINCE", "CONFIG"],
            rows,
        )?;
        if format == Format::Table {
            println!("directory: {services} services");
        }
        return Ok(0);
    }
    let held = proxy_endpoints(&dump);
    if !diff {
        let rows: Vec<Vec<String>> = held
            .iter()
            .map(|(c, eps)| vec![c.clone(), eps.iter().cloned().collect::<Vec<_>>().join(" ")])
            .collect();
        print(format, &dump, &["CLUSTER", "ENDPOINTS"], rows)?;
        return Ok(0);
    }
    let resp = client(cp)
        .await?
        .get_proxy_config(GetProxyConfigRequest {
            node_id: proxy.to_string(),
            local_only: false,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let mut rows = diff_sets(
        "endpoints",
        &control_plane_endpoints(&resp.resources),
        &held,
    );
    rows.extend(diff_sets(
        "routes",
        &control_plane_routes(&resp.resources),
        &proxy_routes(&dump),
    ));
    if rows.is_empty() && format == Format::Table {
        println!("in sync: the proxy holds what the control plane sent");
        return Ok(0);
    }
    let table = rows
        .iter()
        .map(|r| {
            vec![
                r.kind.clone(),
                r.name.clone(),
                r.only_in_control_plane.join(" "),
                r.only_in_proxy.join(" "),
            ]
        })
        .collect();
    print(
        format,
        &rows,
        &["KIND", "NAME", "ONLY IN CONTROL PLANE", "ONLY IN PROXY"],
        table,
    )?;
    Ok(i32::from(!rows.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_endpoints_reads_the_config_dump_shape() {
        let dump = serde_json::json!({"clusters": {"c1": {"endpoints": {"priorities": [
            [{"addr": "10.0.0.1:80"}], [{"addr": "10.0.0.2:80"}]]}}, "c2": {"endpoints": null}}});
        let got = proxy_endpoints(&dump);
        assert_eq!(
            got["c1"].iter().collect::<Vec<_>>(),
            vec!["10.0.0.1:80", "10.0.0.2:80"]
        );
        assert!(got["c2"].is_empty());
    }

    #[test]
    fn route_diff_names_the_host_and_the_targets_on_each_side() {
        use route::{RouteAction, RouteConfiguration, VirtualHost, WeightedCluster};
        let weighted = |v1: u32, v2: u32| route::Route {
            action: Some(route::route::Action::Route(RouteAction {
                cluster_specifier: Some(route::route_action::ClusterSpecifier::WeightedClusters(
                    WeightedCluster {
                        clusters: [("v1", v1), ("v2", v2)]
                            .into_iter()
                            .map(|(n, w)| route::weighted_cluster::ClusterWeight {
                                name: n.into(),
                                weight: Some(weft_proto::envoy::google::protobuf::UInt32Value {
                                    value: w,
                                }),
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            })),
            ..Default::default()
        };
        let rc = RouteConfiguration {
            name: "echo".into(),
            virtual_hosts: vec![VirtualHost {
                domains: vec!["echo".into(), "echo:80".into()],
                routes: vec![weighted(90, 10)],
                ..Default::default()
            }],
            ..Default::default()
        };
        let sent = control_plane_routes(&[weft_proto::admin::ConfigResource {
            type_url: type_url::ROUTE.into(),
            name: "echo".into(),
            version: "1".into(),
            value: rc.encode_to_vec(),
        }]);
        // The proxy still holds the previous weights for one of the hosts.
        let dump = serde_json::json!({"hosts": {
            "echo": [{"target": {"Weighted": [["v1", 90], ["v2", 10]]}}],
            "echo:80": [{"target": {"Weighted": [["v1", 50], ["v2", 50]]}}]}});
        let rows = diff_sets("routes", &sent, &proxy_routes(&dump));
        assert_eq!(rows.len(), 1, "only the stale host differs");
        assert_eq!(
            (rows[0].kind.as_str(), rows[0].name.as_str()),
            ("routes", "echo:80")
        );
        assert_eq!(rows[0].only_in_control_plane, ["v1=90", "v2=10"]);
        assert_eq!(rows[0].only_in_proxy, ["v1=50", "v2=50"]);
    }
}
