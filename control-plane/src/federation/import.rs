//! The importing side of federation: one task per peer streams its exports into the catalog.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use weft_proto::federation as pb;
use weft_proto::federation::federation_client::FederationClient;
use weft_proto::tls;

use super::{Federation, LinkState, Origin, PROTOCOL_VERSION};
use crate::catalog::{EndpointModel, ImportedService, Locality, PeerImport, PortModel, ServiceKey};
use crate::grpc_tls::IssuedCell;

/// Most services one peer may export.
pub const MAX_SERVICES: usize = 20_000;
/// Most endpoints one exported service may carry.
pub const MAX_ENDPOINTS: usize = 20_000;
/// How long a connection attempt (TCP, TLS, the Export call) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What the importer holds from one peer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Held {
    /// The peer's catalog version last applied.
    pub version: u64,
    /// Its exported services.
    pub services: BTreeMap<ServiceKey, ImportedService>,
}

impl Held {
    /// Endpoints held.
    pub fn endpoint_count(&self) -> usize {
        self.services.values().map(|s| s.endpoints.len()).sum()
    }
}

/// Validates one update from `peer` and applies it to `held`. `first` is true for the first
/// update of a stream, which must be a snapshot. Returns whether the services changed (false
/// for a heartbeat). On error nothing is changed and the message names the service and field.
pub fn apply_update(
    peer: &str,
    trust_domain: &str,
    allow_loopback: bool,
    held: &mut Option<Held>,
    first: bool,
    u: &pb::ExportUpdate,
) -> Result<bool, String> {
    if u.cluster_name != peer {
        return Err(format!(
            "the update names cluster {:?}; this link is to {peer:?}",
            u.cluster_name
        ));
    }
    if first && !u.snapshot {
        return Err("the first update of a stream must be a snapshot".into());
    }
    let heartbeat = !u.snapshot && u.upserted.is_empty() && u.removed.is_empty();
    if !u.snapshot {
        let Some(h) = held.as_ref() else {
            return Err("an incremental update arrived before any snapshot".into());
        };
        if (heartbeat && u.version < h.version) || (!heartbeat && u.version <= h.version) {
            return Err(format!(
                "version went from {} to {}; versions must increase",
                h.version, u.version
            ));
        }
    }
    let mut upserts = Vec::with_capacity(u.upserted.len());
    for (i, s) in u.upserted.iter().enumerate() {
        upserts.push(convert(peer, trust_domain, allow_loopback, i, s)?);
    }
    let mut removes = Vec::with_capacity(u.removed.len());
    for (i, r) in u.removed.iter().enumerate() {
        removes.push(service_key(r).map_err(|m| format!("removed[{i}]: {m}"))?);
    }
    let mut next = if u.snapshot {
        Held::default()
    } else {
        held.clone().unwrap_or_default()
    };
    for k in removes {
        next.services.remove(&k);
    }
    for (k, s) in upserts {
        next.services.insert(k, s);
    }
    if next.services.len() > MAX_SERVICES {
        return Err(format!(
            "{} services exported; at most {MAX_SERVICES} are taken from one peer",
            next.services.len()
        ));
    }
    next.version = u.version;
    let changed = held.as_ref().is_none_or(|h| h.services != next.services);
    *held = Some(next);
    Ok(changed)
}

fn service_key(r: &pb::ServiceRef) -> Result<ServiceKey, String> {
    weft_proto::spiffe::validate_dns_label("namespace", &r.namespace).map_err(|e| e.to_string())?;
    weft_proto::spiffe::validate_dns_label("name", &r.name).map_err(|e| e.to_string())?;
    Ok(ServiceKey::new(&r.namespace, &r.name))
}

fn port(v: u32, field: &str) -> Result<u16, String> {
    u16::try_from(v)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{field}: {v} is not a port (1-65535)"))
}

/// Why an address can never be a peer's pod: it means "this host", "this link", "no host" or
/// many hosts wherever it is used, so importing it would point callers somewhere else.
fn special_purpose(ip: IpAddr, allow_loopback: bool) -> Option<&'static str> {
    match ip {
        _ if ip.is_unspecified() => Some("unspecified"),
        _ if ip.is_loopback() => (!allow_loopback).then_some("loopback"),
        _ if ip.is_multicast() => Some("multicast"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("link-local"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("broadcast"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("link-local"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => special_purpose(IpAddr::V4(v4), allow_loopback),
            None => None,
        },
        IpAddr::V4(_) => None,
    }
}

fn convert(
    peer: &str,
    trust_domain: &str,
    allow_loopback: bool,
    i: usize,
    s: &pb::ExportedService,
) -> Result<(ServiceKey, ImportedService), String> {
    let r = s
        .service
        .as_ref()
        .ok_or_else(|| format!("upserted[{i}].service: missing"))?;
    let key = service_key(r).map_err(|m| format!("upserted[{i}].service: {m}"))?;
    let at = |field: String, m: String| format!("service {key}: {field}: {m}");
    if s.endpoints.len() > MAX_ENDPOINTS {
        return Err(at(
            "endpoints".into(),
            format!("{} endpoints; at most {MAX_ENDPOINTS}", s.endpoints.len()),
        ));
    }
    let mut ports = Vec::new();
    for (j, p) in s.ports.iter().enumerate() {
        ports.push(PortModel {
            name: p.name.clone(),
            port: port(p.port, &format!("ports[{j}].port")).map_err(|m| at(String::new(), m))?,
            app_protocol: (!p.app_protocol.is_empty()).then(|| p.app_protocol.clone()),
        });
    }
    let mut endpoints = Vec::new();
    for (j, e) in s.endpoints.iter().enumerate() {
        let field = |f: &str| format!("endpoints[{j}].{f}");
        let address: IpAddr = e.address.parse().map_err(|_| {
            at(
                field("address"),
                format!("{:?} is not an IP address", e.address),
            )
        })?;
        if let Some(kind) = special_purpose(address, allow_loopback) {
            return Err(at(
                field("address"),
                format!("{address} is a {kind} address, never a peer's pod"),
            ));
        }
        if e.cluster != peer {
            return Err(at(
                field("cluster"),
                format!(
                    "{:?}: a peer may export only its own cluster's endpoints ({peer:?})",
                    e.cluster
                ),
            ));
        }
        let identity = if e.identity.is_empty() {
            None
        } else {
            let id = weft_proto::SpiffeId::parse(&e.identity)
                .map_err(|m| at(field("identity"), m.to_string()))?;
            if id.trust_domain() != trust_domain {
                return Err(at(
                    field("identity"),
                    format!("{id} is outside the mesh's trust domain {trust_domain:?}"),
                ));
            }
            // A Service's pods run in its namespace: an endpoint claiming another namespace's
            // identity would make callers accept that workload's certificate for this Service.
            if id.namespace() != key.namespace {
                return Err(at(
                    field("identity"),
                    format!(
                        "{id} is in namespace {:?}; endpoints of {key} serve identities of {:?} only",
                        id.namespace(),
                        key.namespace
                    ),
                ));
            }
            Some(e.identity.clone())
        };
        let mut eports = BTreeMap::new();
        for (name, p) in &e.ports {
            eports.insert(
                name.clone(),
                port(*p, &field(&format!("ports[{name:?}]"))).map_err(|m| at(String::new(), m))?,
            );
        }
        // The peer resolved its pods' policies; "" (an older peer) is PERMISSIVE.
        let mode_of = |field: String, m: &str| match m {
            "" => Ok(crate::objects::MtlsMode::Permissive),
            m => crate::objects::MtlsMode::parse(m).map_err(|e| at(field, e)),
        };
        let mode = mode_of(field("mtls_mode"), &e.mtls_mode)?;
        let mut port_modes = BTreeMap::new();
        for (p, m) in &e.port_mtls_modes {
            let f = field(&format!("port_mtls_modes[{p}]"));
            let p = port(*p, &f).map_err(|m| at(String::new(), m))?;
            port_modes.insert(p, mode_of(f, m)?);
        }
        let loc = e.locality.clone().unwrap_or_default();
        endpoints.push(EndpointModel {
            address,
            ports: eports,
            cluster: e.cluster.clone(),
            locality: Locality {
                region: loc.region,
                zone: loc.zone,
                subzone: loc.subzone,
            },
            identity,
            ready: e.ready,
            serving: e.serving || e.ready,
            terminating: e.terminating,
            weight: e.weight.max(1),
            pod: None,
            mtls: e.mtls,
            mode,
            port_modes,
            stale: false,
            via: None,
        });
    }
    Ok((key, ImportedService { ports, endpoints }))
}

/// A gRPC channel to a peer over mTLS: presents the certificate in `config` and accepts only a
/// server whose certificate is the control plane's and names cluster `expected`.
pub async fn connect(
    address: &str,
    expected: &str,
    config: Arc<tls::rustls::ClientConfig>,
    via: Option<weft_proto::dial::Via>,
) -> Result<tonic::transport::Channel, String> {
    weft_proto::dial::control_plane_via(address, config, Some(expected), CONNECT_TIMEOUT, via)
        .await
        .map_err(|e| weft_proto::logging::error_chain(&e))
}

/// One peer: where and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    /// Its cluster name.
    pub name: String,
    /// `HOST:PORT` of its TLS gRPC port.
    pub address: String,
    /// Where it was configured.
    pub origin: Origin,
    /// On another network: its gateways and the identity they prove (the link runs through
    /// them, `address` being the peer's address inside its network).
    pub via: Option<(Vec<std::net::SocketAddr>, String)>,
}

struct Link {
    fed: Arc<Federation>,
    issued: IssuedCell,
    peer: PeerSpec,
    held: Option<Held>,
    /// The link's state and last error (what the book shows, kept here for decisions).
    state: LinkState,
    last_error: String,
}

impl Link {
    fn labels(&self) -> Vec<(String, String)> {
        vec![("peer".into(), self.peer.name.clone())]
    }

    fn book(&self, f: impl FnOnce(&mut super::PeerInfo)) {
        self.fed
            .book
            .update(&self.peer.name, &self.peer.address, self.peer.origin, f);
    }

    fn publish(&self, stale: bool) {
        let import = self.held.as_ref().map(|h| PeerImport {
            services: h.services.clone(),
            stale,
        });
        let endpoints = self.held.as_ref().map_or(0, Held::endpoint_count);
        let m = &self.fed.metrics;
        m.imported_endpoints
            .get_or_create(&self.labels())
            .set(endpoints as i64);
        m.peer_stale
            .get_or_create(&self.labels())
            .set(i64::from(stale && import.is_some()));
        self.fed.catalog.set_import(&self.peer.name, import);
    }

    /// One stream: connect, take the snapshot, then updates until the link fails. Connecting
    /// gives up at `connect_by` (the end of a grace period) so that expiry is on time.
    async fn stream_once(&mut self, connect_by: Option<Instant>) -> Result<(), String> {
        let connect_timeout = connect_by.map_or(CONNECT_TIMEOUT, |by| {
            CONNECT_TIMEOUT.min(
                by.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(50)),
            )
        });
        let issued = self.issued.load();
        let via = self
            .peer
            .via
            .as_ref()
            .map(|(gateways, identity)| weft_proto::dial::Via {
                gateways: gateways.clone(),
                identity: identity.clone(),
                tunnel: issued.tunnel.clone(),
                source_cluster: self.fed.cluster.clone(),
            });
        let channel = tokio::time::timeout(
            connect_timeout,
            connect(
                &self.peer.address,
                &self.peer.name,
                issued.client.clone(),
                via,
            ),
        )
        .await
        .map_err(|_| format!("connecting took longer than {connect_timeout:?}"))??;
        let mut client =
            FederationClient::new(channel).max_decoding_message_size(crate::MAX_MESSAGE_BYTES);
        let call = client.export(pb::ExportRequest {
            cluster_name: self.fed.cluster.clone(),
            protocol_version: PROTOCOL_VERSION,
        });
        let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, call)
            .await
            .map_err(|_| format!("the Export call took longer than {CONNECT_TIMEOUT:?}"))?
            .map_err(|s| format!("the peer refused: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        let received = self
            .fed
            .metrics
            .federation_updates
            .get_or_create(&vec![
                ("peer".into(), self.peer.name.clone()),
                ("direction".into(), "import".into()),
            ])
            .clone();
        let mut first = true;
        loop {
            let timeout = self.fed.settings.timeout;
            let msg = tokio::time::timeout(timeout, stream.message())
                .await
                .map_err(|_| format!("nothing heard for {timeout:?} (no update, no heartbeat)"))?
                .map_err(|s| format!("stream failed: {:?}: {}", s.code(), s.message()))?
                .ok_or("the peer ended the stream")?;
            received.inc();
            let was_stale = first && self.held.is_some();
            let changed = apply_update(
                &self.peer.name,
                &self.fed.trust_domain,
                self.fed.settings.allow_loopback,
                &mut self.held,
                first,
                &msg,
            )
            .map_err(|reason| {
                self.fed
                    .metrics
                    .federation_refusals
                    .get_or_create(&vec![
                        ("peer".into(), self.peer.name.clone()),
                        ("reason".into(), "invalid_update".into()),
                    ])
                    .inc();
                format!("refused an invalid update: {reason}")
            })?;
            if first {
                tracing::info!(peer = %self.peer.name, version = msg.version, services = msg.upserted.len(), "federation: synced");
                self.fed
                    .metrics
                    .peer_up
                    .get_or_create(&self.labels())
                    .set(1);
            }
            first = false;
            if changed || was_stale {
                self.publish(false);
            }
            let held = self.held.as_ref();
            let (version, services, endpoints) = held.map_or((0, 0, 0), |h| {
                (h.version, h.services.len(), h.endpoint_count())
            });
            self.state = LinkState::Synced;
            self.book(|i| {
                i.state = LinkState::Synced;
                i.last_heard = Some(Instant::now());
                i.lost_at = None;
                i.version = version;
                i.services = services as u32;
                i.endpoints = endpoints as u32;
            });
        }
    }

    /// Runs the link until aborted: stream, and on loss keep the endpoints stale for the grace
    /// period while reconnecting with backoff.
    async fn run(mut self) {
        self.book(|_| {});
        let mut backoff = Duration::from_millis(200);
        let mut lost_at: Option<Instant> = None;
        loop {
            let started = Instant::now();
            let grace_ends = match (&self.held, lost_at) {
                (Some(_), Some(at)) => Some(at + self.fed.settings.grace),
                _ => None,
            };
            let err = match self.stream_once(grace_ends).await {
                Ok(()) => "the stream ended".to_string(),
                Err(e) => e,
            };
            self.fed
                .metrics
                .peer_up
                .get_or_create(&self.labels())
                .set(0);
            if self.state == LinkState::Synced {
                lost_at = Some(Instant::now());
                backoff = Duration::from_millis(200);
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(200);
            }
            let grace = self.fed.settings.grace;
            match (&self.held, lost_at) {
                (Some(_), Some(at)) if at.elapsed() < grace => {
                    if self.state != LinkState::Stale {
                        tracing::warn!(peer = %self.peer.name, error = %err, grace = ?grace, "federation: link lost; its endpoints stay, marked stale, for the grace period");
                        self.publish(true);
                    } else {
                        tracing::debug!(peer = %self.peer.name, error = %err, "federation: reconnect failed");
                    }
                    self.state = LinkState::Stale;
                    self.book(|i| {
                        i.state = LinkState::Stale;
                        i.lost_at = Some(at);
                        i.last_error = err.clone();
                    });
                }
                (Some(_), Some(_)) => {
                    tracing::warn!(peer = %self.peer.name, error = %err, "federation: grace period over; the peer's endpoints are removed");
                    self.held = None;
                    self.publish(true);
                    self.state = LinkState::Expired;
                    self.book(|i| {
                        i.state = LinkState::Expired;
                        i.services = 0;
                        i.endpoints = 0;
                        i.last_error = err.clone();
                    });
                }
                _ => {
                    if self.last_error != err {
                        tracing::warn!(peer = %self.peer.name, address = %self.peer.address, error = %err, "federation: cannot sync with peer; retrying");
                    }
                    self.book(|i| i.last_error = err.clone());
                }
            }
            self.last_error = err;
            // Sleep the backoff, but wake for the end of the grace period.
            let mut wait = backoff;
            if let (Some(at), Some(_)) = (lost_at, &self.held) {
                wait = wait.min((at + grace).saturating_duration_since(Instant::now()));
            }
            tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// The peers to run: the flags, then MeshPeer objects for clusters no flag names.
pub fn desired(
    own: &str,
    flags: &[(String, String)],
    mesh_peers: &BTreeMap<String, String>,
    vias: &BTreeMap<String, Arc<crate::catalog::Via>>,
) -> BTreeMap<String, PeerSpec> {
    let mut out = BTreeMap::new();
    for (name, address) in mesh_peers {
        out.insert(
            name.clone(),
            PeerSpec {
                name: name.clone(),
                address: address.clone(),
                origin: Origin::MeshPeer,
                via: vias
                    .get(name)
                    .map(|v| (v.gateways.clone(), v.identity.clone())),
            },
        );
    }
    for (name, address) in flags {
        out.insert(
            name.clone(),
            PeerSpec {
                name: name.clone(),
                address: address.clone(),
                origin: Origin::Flag,
                via: None,
            },
        );
    }
    out.remove(own);
    out
}

/// Runs one link per configured peer, following `--peer` flags and MeshPeer objects, until
/// aborted (which ends every link).
pub async fn run(fed: Arc<Federation>, issued: IssuedCell, flags: Vec<(String, String)>) {
    if flags.iter().any(|(n, _)| *n == fed.cluster) {
        tracing::error!(cluster = %fed.cluster, "--peer names this control plane's own cluster; ignored");
    }
    let mut models = fed.catalog.subscribe();
    let mut links: JoinSet<()> = JoinSet::new();
    let mut running: HashMap<String, (PeerSpec, tokio::task::AbortHandle)> = HashMap::new();
    loop {
        let (mesh_peers, vias) = {
            let m = models.borrow_and_update();
            (m.peers.clone(), m.peer_vias.clone())
        };
        let want = desired(&fed.cluster, &flags, &mesh_peers, &vias);
        running.retain(|name, (spec, handle)| {
            if want.get(name) == Some(spec) {
                return true;
            }
            handle.abort();
            if !want.contains_key(name) {
                tracing::info!(peer = %name, "federation: peer removed; its endpoints leave");
                fed.catalog.set_import(name, None);
                fed.book.remove(name);
            }
            false
        });
        for (name, spec) in want {
            if running.contains_key(&name) {
                continue;
            }
            tracing::info!(peer = %name, address = %spec.address, origin = spec.origin.as_str(), "federation: peering");
            let link = Link {
                fed: fed.clone(),
                issued: issued.clone(),
                peer: spec.clone(),
                held: None,
                state: LinkState::Connecting,
                last_error: String::new(),
            };
            let handle = links.spawn(link.run());
            running.insert(name, (spec, handle));
        }
        while links.try_join_next().is_some() {}
        if models.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(addr: &str, cluster: &str) -> pb::Endpoint {
        pb::Endpoint {
            address: addr.into(),
            cluster: cluster.into(),
            locality: Some(pb::Locality {
                region: "r".into(),
                zone: "z1".into(),
                subzone: String::new(),
            }),
            identity: "spiffe://cluster.local/ns/default/sa/echo".into(),
            ready: true,
            weight: 1,
            ports: [("http".to_string(), 8080u32)].into(),
            mtls: true,
            serving: true,
            terminating: false,
            ..Default::default()
        }
    }

    /// A peer's endpoints keep the mode the peer resolved for them (its PeerAuthentications),
    /// not one this cluster would guess from its own namespace of the same name; a mode that
    /// is not one is refused.
    #[test]
    fn a_peers_modes_are_kept_and_bad_ones_refused() {
        let mut held = None;
        let mut e = ep("10.1.0.1", "east");
        e.mtls_mode = "STRICT".into();
        e.port_mtls_modes = [(9100, "PERMISSIVE".to_string())].into();
        let snap = update(5, true, vec![svc("echo", vec![e])]);
        assert_eq!(
            apply_update("east", TD, false, &mut held, true, &snap),
            Ok(true)
        );
        let got = &held.as_ref().expect("held").services[&ServiceKey::new("default", "echo")]
            .endpoints[0];
        assert_eq!(
            (got.mode_on(8080), got.mode_on(9100)),
            (
                crate::objects::MtlsMode::Strict,
                crate::objects::MtlsMode::Permissive
            )
        );
        let mut bad = ep("10.1.0.1", "east");
        bad.mtls_mode = "strictish".into();
        let err = apply_update(
            "east",
            TD,
            false,
            &mut held,
            false,
            &update(6, false, vec![svc("echo", vec![bad])]),
        )
        .expect_err("bad mode");
        assert!(err.contains("endpoints[0].mtls_mode"), "{err}");
    }

    fn svc(name: &str, eps: Vec<pb::Endpoint>) -> pb::ExportedService {
        pb::ExportedService {
            service: Some(pb::ServiceRef {
                namespace: "default".into(),
                name: name.into(),
            }),
            ports: vec![pb::ServicePort {
                name: "http".into(),
                port: 80,
                app_protocol: String::new(),
            }],
            endpoints: eps,
        }
    }

    fn update(version: u64, snapshot: bool, up: Vec<pb::ExportedService>) -> pb::ExportUpdate {
        pb::ExportUpdate {
            version,
            snapshot,
            upserted: up,
            removed: Vec::new(),
            cluster_name: "east".into(),
        }
    }

    const TD: &str = "cluster.local";

    #[test]
    fn snapshot_then_changes_then_heartbeats() {
        let mut held = None;
        let snap = update(5, true, vec![svc("echo", vec![ep("10.1.0.1", "east")])]);
        assert_eq!(
            apply_update("east", TD, true, &mut held, true, &snap),
            Ok(true)
        );
        let h = held.clone().expect("held");
        let e = &h.services[&ServiceKey::new("default", "echo")].endpoints[0];
        assert_eq!(e.cluster, "east");
        assert_eq!(e.locality.zone, "z1");
        assert_eq!(e.ports["http"], 8080);
        assert!(e.mtls && e.ready && !e.stale);
        // A heartbeat repeats the version and changes nothing.
        assert_eq!(
            apply_update(
                "east",
                TD,
                true,
                &mut held,
                false,
                &update(5, false, vec![])
            ),
            Ok(false)
        );
        let mut change = update(6, false, vec![svc("other", vec![ep("10.1.0.2", "east")])]);
        change.removed.push(pb::ServiceRef {
            namespace: "default".into(),
            name: "echo".into(),
        });
        assert_eq!(
            apply_update("east", TD, true, &mut held, false, &change),
            Ok(true)
        );
        let h = held.clone().expect("held");
        assert_eq!(h.version, 6);
        assert_eq!(
            h.services
                .keys()
                .map(|k| k.name.as_str())
                .collect::<Vec<_>>(),
            ["other"]
        );
        // A new stream's snapshot may restart the version (another replica of the peer, or
        // the peer restarted).
        let snap = update(1, true, vec![svc("echo", vec![ep("10.1.0.1", "east")])]);
        assert_eq!(
            apply_update("east", TD, true, &mut held, true, &snap),
            Ok(true)
        );
        assert_eq!(held.as_ref().map(|h| h.services.len()), Some(1));
    }

    #[test]
    fn a_misbehaving_peer_is_refused_and_nothing_changes() {
        let mut held = None;
        let snap = update(5, true, vec![svc("echo", vec![ep("10.1.0.1", "east")])]);
        assert_eq!(
            apply_update("east", TD, true, &mut held, true, &snap),
            Ok(true)
        );
        let before = held.clone();
        let mut wrong_cluster = update(6, false, vec![]);
        wrong_cluster.cluster_name = "west".into();
        let mut bad_name = svc("echo", vec![]);
        if let Some(r) = bad_name.service.as_mut() {
            r.name = "Not_A_Name".into();
        }
        let mut bad_port = svc("echo", vec![ep("10.1.0.1", "east")]);
        bad_port.endpoints[0].ports.insert("http".into(), 70000);
        let mut foreign_id = ep("10.1.0.1", "east");
        foreign_id.identity = "spiffe://other.domain/ns/default/sa/echo".into();
        let cases: Vec<(bool, pb::ExportUpdate, &str)> = vec![
            (false, wrong_cluster, "names cluster \"west\""),
            (true, update(7, false, vec![]), "must be a snapshot"),
            (false, update(4, false, vec![]), "version went from 5 to 4"),
            (
                false,
                update(5, false, vec![svc("x", vec![ep("10.1.0.9", "east")])]),
                "version went from 5 to 5",
            ),
            (
                false,
                update(6, false, vec![svc("echo", vec![ep("10.1.0.1", "west")])]),
                "service default/echo: endpoints[0].cluster: \"west\": a peer may export only its own",
            ),
            (
                false,
                update(6, false, vec![svc("echo", vec![ep("not-an-ip", "east")])]),
                "endpoints[0].address: \"not-an-ip\" is not an IP address",
            ),
            (
                false,
                update(6, false, vec![bad_name]),
                "upserted[0].service",
            ),
            (
                false,
                update(6, false, vec![bad_port]),
                "70000 is not a port",
            ),
            (
                false,
                update(6, false, vec![svc("echo", vec![foreign_id])]),
                "outside the mesh's trust domain",
            ),
        ];
        for (first, u, want) in cases {
            let e = apply_update("east", TD, true, &mut held, first, &u).expect_err(want);
            assert!(e.contains(want), "want {want:?} in {e:?}");
            assert_eq!(held, before, "a refused update changed nothing ({want})");
        }
    }

    /// The attacks of one compromised peer: endpoints on addresses that mean "this host" (or
    /// this link, or no host) wherever they are used, and endpoints claiming another
    /// namespace's identity. Each is refused with the reason; nothing changes.
    #[test]
    fn a_peer_cannot_export_special_addresses_or_other_namespaces_identities() {
        let mut held = None;
        let snap = update(5, true, vec![svc("echo", vec![ep("10.1.0.1", "east")])]);
        assert_eq!(
            apply_update("east", TD, false, &mut held, true, &snap),
            Ok(true)
        );
        let before = held.clone();
        let mut other_ns = ep("10.1.0.2", "east");
        other_ns.identity = "spiffe://cluster.local/ns/vault/sa/vault".into();
        let mut cases: Vec<(pb::Endpoint, &str)> = [
            ("127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
        ]
        .into_iter()
        .map(|(a, why)| (ep(a, "east"), why))
        .collect();
        cases.push((other_ns, "is in namespace \"vault\""));
        for (e, want) in cases {
            let u = update(6, false, vec![svc("echo", vec![e])]);
            let err = apply_update("east", TD, false, &mut held, false, &u).expect_err(want);
            assert!(err.contains(want), "want {want:?} in {err:?}");
            assert_eq!(held, before, "a refused update changed nothing ({want})");
        }
        // Loopback only with the development flag.
        let lo = update(6, false, vec![svc("echo", vec![ep("127.0.0.1", "east")])]);
        assert_eq!(
            apply_update("east", TD, true, &mut held, false, &lo),
            Ok(true)
        );
    }

    mod property {
        use proptest::prelude::*;

        use super::*;

        fn any_endpoint() -> impl Strategy<Value = pb::Endpoint> {
            (
                prop_oneof![Just("10.1.0.1".to_string()), ".{0,16}"],
                prop_oneof![Just("east".to_string()), Just("west".to_string()), ".{0,8}"],
                prop_oneof![Just(String::new()), ".{0,40}"],
                any::<u32>(),
                proptest::collection::btree_map(".{0,6}", any::<u32>(), 0..3),
            )
                .prop_map(|(address, cluster, identity, weight, ports)| pb::Endpoint {
                    address,
                    cluster,
                    identity,
                    weight,
                    ports: ports.into_iter().collect(),
                    ready: true,
                    ..Default::default()
                })
        }

        fn any_update() -> impl Strategy<Value = pb::ExportUpdate> {
            (
                any::<u64>(),
                any::<bool>(),
                proptest::collection::vec(
                    (
                        ".{0,12}",
                        ".{0,12}",
                        proptest::collection::vec(any_endpoint(), 0..4),
                        any::<u32>(),
                    ),
                    0..4,
                ),
                prop_oneof![Just("east".to_string()), ".{0,8}"],
            )
                .prop_map(|(version, snapshot, services, cluster_name)| {
                    pb::ExportUpdate {
                        version,
                        snapshot,
                        cluster_name,
                        removed: Vec::new(),
                        upserted: services
                            .into_iter()
                            .map(|(ns, name, endpoints, port)| pb::ExportedService {
                                service: Some(pb::ServiceRef {
                                    namespace: ns,
                                    name,
                                }),
                                ports: vec![pb::ServicePort {
                                    name: "http".into(),
                                    port,
                                    app_protocol: String::new(),
                                }],
                                endpoints,
                            })
                            .collect(),
                    }
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            /// Whatever a peer sends: either it is applied and everything held is valid and
            /// the peer's own, or it is refused and nothing changed. Never a panic.
            #[test]
            fn any_update_is_applied_whole_or_refused_whole(updates in proptest::collection::vec(any_update(), 1..6)) {
                let mut held = None;
                let mut first = true;
                for u in &updates {
                    let before = held.clone();
                    match apply_update("east", "cluster.local", true, &mut held, first, u) {
                        Ok(_) => {
                            first = false;
                            let h = held.as_ref().expect("held after success");
                            for (k, s) in &h.services {
                                prop_assert!(!k.name.is_empty() && !k.namespace.is_empty());
                                prop_assert!(s.ports.iter().all(|p| p.port > 0));
                                prop_assert!(s.endpoints.iter().all(|e| e.cluster == "east"));
                            }
                        }
                        Err(m) => {
                            prop_assert!(!m.is_empty());
                            prop_assert_eq!(&held, &before);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn flags_win_over_mesh_peers_and_the_own_cluster_is_skipped() {
        let flags = vec![("east".to_string(), "10.0.0.1:15012".to_string())];
        let objects: BTreeMap<String, String> = [
            ("east".to_string(), "10.9.9.9:15012".to_string()),
            ("south".to_string(), "10.0.0.3:15012".to_string()),
            ("west".to_string(), "10.0.0.2:15012".to_string()),
        ]
        .into();
        let d = desired("west", &flags, &objects, &BTreeMap::new());
        assert_eq!(d.keys().collect::<Vec<_>>(), ["east", "south"]);
        assert_eq!(d["east"].address, "10.0.0.1:15012");
        assert_eq!(d["east"].origin, Origin::Flag);
        assert_eq!(d["south"].origin, Origin::MeshPeer);
    }
}
