//! The exporting side of federation: `Federation.Export` on the TLS gRPC port.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use weft_proto::federation as pb;

use super::{Federation, PROTOCOL_VERSION};
use crate::catalog::{Model, ServiceKey};
use crate::grpc_tls::TlsPeer;

/// What this cluster exports: every exported local Service with the endpoints of this cluster
/// only (endpoints imported from elsewhere are never re-exported, so exports cannot loop).
pub fn exports(model: &Model) -> BTreeMap<ServiceKey, pb::ExportedService> {
    model
        .services
        .iter()
        .filter(|(_, s)| s.exported && s.local)
        .map(|(k, s)| {
            let endpoints = s
                .endpoints
                .iter()
                .filter(|e| e.cluster == model.cluster)
                .map(|e| pb::Endpoint {
                    address: e.address.to_string(),
                    cluster: e.cluster.clone(),
                    locality: Some(pb::Locality {
                        region: e.locality.region.clone(),
                        zone: e.locality.zone.clone(),
                        subzone: e.locality.subzone.clone(),
                    }),
                    identity: e.identity.clone().unwrap_or_default(),
                    ready: e.ready,
                    weight: e.weight,
                    ports: e
                        .ports
                        .iter()
                        .map(|(n, p)| (n.clone(), u32::from(*p)))
                        .collect(),
                    mtls: e.mtls,
                    mtls_mode: e.mode.as_str().to_string(),
                    port_mtls_modes: e
                        .port_modes
                        .iter()
                        .map(|(p, m)| (u32::from(*p), m.as_str().to_string()))
                        .collect(),
                    serving: e.serving,
                    terminating: e.terminating,
                })
                .collect();
            let svc = pb::ExportedService {
                service: Some(pb::ServiceRef {
                    namespace: k.namespace.clone(),
                    name: k.name.clone(),
                }),
                ports: s
                    .ports
                    .iter()
                    .map(|p| pb::ServicePort {
                        name: p.name.clone(),
                        port: u32::from(p.port),
                        app_protocol: p.app_protocol.clone().unwrap_or_default(),
                    })
                    .collect(),
                endpoints,
            };
            (k.clone(), svc)
        })
        .collect()
}

/// The update that takes a receiver holding `old` to `new` (`None` when nothing changed).
pub fn diff(
    old: &BTreeMap<ServiceKey, pb::ExportedService>,
    new: &BTreeMap<ServiceKey, pb::ExportedService>,
) -> Option<(Vec<pb::ExportedService>, Vec<pb::ServiceRef>)> {
    let upserted: Vec<_> = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(_, v)| v.clone())
        .collect();
    let removed: Vec<_> = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .map(|k| pb::ServiceRef {
            namespace: k.namespace.clone(),
            name: k.name.clone(),
        })
        .collect();
    (!upserted.is_empty() || !removed.is_empty()).then_some((upserted, removed))
}

/// Checks who is asking: a control plane of another cluster, proving its cluster with its
/// certificate, speaking our protocol version. Returns its cluster name.
pub fn authorize(
    peer: Option<&TlsPeer>,
    req: &pb::ExportRequest,
    own_cluster: &str,
) -> Result<String, Status> {
    let Some(peer) = peer else {
        return Err(Status::unauthenticated(
            "federation is served on the TLS gRPC port only (the caller needs the control-plane certificate)",
        ));
    };
    let Some(id) = &peer.identity else {
        return Err(Status::unauthenticated(format!(
            "{} presented no client certificate; federation needs a peer control plane's",
            peer.remote
        )));
    };
    if id.namespace() != weft_proto::keys::CONTROL_PLANE_NAMESPACE
        || id.service_account() != weft_proto::keys::CONTROL_PLANE_SERVICE_ACCOUNT
    {
        return Err(Status::permission_denied(format!(
            "{id} is not a control plane; only control planes may federate"
        )));
    }
    let Some(cert_cluster) = peer.control_plane_cluster() else {
        return Err(Status::permission_denied(format!(
            "the certificate of {id} names no cluster (DNS SAN <cluster>.{})",
            weft_proto::tls::CONTROL_PLANE_DNS_SUFFIX
        )));
    };
    if req.cluster_name != cert_cluster {
        return Err(Status::permission_denied(format!(
            "the caller says it is cluster {:?} but its certificate is cluster {cert_cluster:?}",
            req.cluster_name
        )));
    }
    if cert_cluster == own_cluster {
        return Err(Status::permission_denied(format!(
            "cluster {cert_cluster:?} is this control plane's own cluster; a cluster does not federate with itself"
        )));
    }
    if req.protocol_version != PROTOCOL_VERSION {
        return Err(Status::failed_precondition(format!(
            "federation protocol version {} is not supported; this control plane speaks {PROTOCOL_VERSION}",
            req.protocol_version
        )));
    }
    Ok(cert_cluster.to_string())
}

/// The `weft.federation.v1.Federation` service.
pub struct ExportService {
    fed: Arc<Federation>,
}

impl ExportService {
    /// Serves `fed`'s catalog's exports.
    pub fn new(fed: Arc<Federation>) -> Self {
        ExportService { fed }
    }
}

type ExportStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ExportUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl pb::federation_server::Federation for ExportService {
    type ExportStream = ExportStream;

    async fn export(
        &self,
        request: Request<pb::ExportRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let peer = request.extensions().get::<TlsPeer>().cloned();
        let req = request.into_inner();
        let fed = self.fed.clone();
        let authorized = authorize(peer.as_ref(), &req, &fed.cluster).and_then(|c| {
            match fed.is_configured_peer(&c) {
                true => Ok(c),
                false => Err(Status::permission_denied(format!(
                    "cluster {c:?} is not a configured peer of cluster {:?}: add it with --peer or a MeshPeer there too",
                    fed.cluster
                ))),
            }
        });
        let caller = match authorized {
            Ok(c) => c,
            Err(status) => {
                tracing::warn!(remote = ?peer.as_ref().map(|p| p.remote), asked_as = %req.cluster_name, reason = %status.message(), "federation export refused");
                fed.metrics
                    .federation_refusals
                    .get_or_create(&vec![
                        ("peer".into(), req.cluster_name.clone()),
                        ("reason".into(), format!("{:?}", status.code())),
                    ])
                    .inc();
                return Err(status);
            }
        };
        tracing::info!(peer = %caller, "federation: streaming exports");
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(stream_exports(fed, caller, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Sends the snapshot, then changes and heartbeats, until the receiver goes away.
async fn stream_exports(
    fed: Arc<Federation>,
    caller: String,
    tx: mpsc::Sender<Result<pb::ExportUpdate, Status>>,
) {
    fed.book.export_started(&caller);
    fed.metrics.federation_exports.inc();
    let counter = fed
        .metrics
        .federation_updates
        .get_or_create(&vec![
            ("peer".into(), caller.clone()),
            ("direction".into(), "export".into()),
        ])
        .clone();
    let mut models = fed.catalog.subscribe();
    let mut stopped = fed.stopped.clone();
    let model = models.borrow_and_update().clone();
    let mut sent = exports(&model);
    let mut version = model.version;
    let first = pb::ExportUpdate {
        version,
        snapshot: true,
        upserted: sent.values().cloned().collect(),
        removed: Vec::new(),
        cluster_name: fed.cluster.clone(),
    };
    let mut alive = tx.send(Ok(first)).await.is_ok();
    counter.inc();
    let mut beat = tokio::time::interval(fed.settings.heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.tick().await;
    while alive {
        let update = tokio::select! {
            changed = models.changed() => {
                if changed.is_err() {
                    break;
                }
                let model = models.borrow_and_update().clone();
                if !fed.is_configured_peer(&caller) {
                    tracing::info!(peer = %caller, "federation: no longer a configured peer; export stream closed");
                    let _ = tx.send(Err(Status::permission_denied(format!("cluster {caller:?} is no longer a configured peer")))).await;
                    break;
                }
                let now = exports(&model);
                let Some((upserted, removed)) = diff(&sent, &now) else { continue };
                sent = now;
                version = model.version;
                beat.reset();
                pb::ExportUpdate { version, snapshot: false, upserted, removed, cluster_name: fed.cluster.clone() }
            }
            _ = beat.tick() => pb::ExportUpdate {
                version, snapshot: false, upserted: Vec::new(), removed: Vec::new(), cluster_name: fed.cluster.clone(),
            },
            _ = tx.closed() => break,
            _ = stopped.changed() => break,
        };
        alive = tx.send(Ok(update)).await.is_ok();
        counter.inc();
    }
    tracing::info!(peer = %caller, "federation: export stream ended");
    fed.book.export_ended(&caller);
    fed.metrics.federation_exports.dec();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(identity: Option<&str>, cluster: Option<&str>) -> TlsPeer {
        TlsPeer {
            remote: "127.0.0.1:1".parse().expect("addr"),
            identity: identity.map(|i| weft_proto::SpiffeId::parse(i).expect("id")),
            role: cluster.map_or(weft_proto::tls::Role::Workload, |c| {
                weft_proto::tls::Role::ControlPlane(c.to_string())
            }),
        }
    }

    fn req(cluster: &str, version: u32) -> pb::ExportRequest {
        pb::ExportRequest {
            cluster_name: cluster.into(),
            protocol_version: version,
        }
    }

    const CP: &str = "spiffe://cluster.local/ns/weft-system/sa/weft-control-plane";

    #[test]
    fn only_a_peer_control_plane_of_the_cluster_it_claims_may_stream() {
        let ok = authorize(Some(&peer(Some(CP), Some("east"))), &req("east", 1), "west");
        assert_eq!(ok.as_deref().ok(), Some("east"));
        let cases = [
            (None, req("east", 1), "TLS gRPC port only"),
            (
                Some(peer(None, None)),
                req("east", 1),
                "no client certificate",
            ),
            (
                Some(peer(
                    Some("spiffe://cluster.local/ns/shop/sa/web"),
                    Some("east"),
                )),
                req("east", 1),
                "is not a control plane",
            ),
            (
                Some(peer(Some(CP), None)),
                req("east", 1),
                "names no cluster",
            ),
            (
                Some(peer(Some(CP), Some("south"))),
                req("east", 1),
                "certificate is cluster \"south\"",
            ),
            (
                Some(peer(Some(CP), Some("west"))),
                req("west", 1),
                "own cluster",
            ),
            (
                Some(peer(Some(CP), Some("east"))),
                req("east", 7),
                "version 7 is not supported",
            ),
        ];
        for (p, r, want) in cases {
            let e = authorize(p.as_ref(), &r, "west").expect_err(want);
            assert!(e.message().contains(want), "{want}: {}", e.message());
        }
    }

    #[test]
    fn diff_sends_what_changed_and_what_left() {
        let svc = |name: &str, addr: &str| {
            (
                ServiceKey::new("default", name),
                pb::ExportedService {
                    service: Some(pb::ServiceRef {
                        namespace: "default".into(),
                        name: name.into(),
                    }),
                    ports: Vec::new(),
                    endpoints: vec![pb::Endpoint {
                        address: addr.into(),
                        ..Default::default()
                    }],
                },
            )
        };
        let old: BTreeMap<_, _> = [svc("a", "10.0.0.1"), svc("b", "10.0.0.2")].into();
        assert!(diff(&old, &old).is_none());
        let new: BTreeMap<_, _> = [svc("a", "10.0.0.9"), svc("c", "10.0.0.3")].into();
        let (up, removed) = diff(&old, &new).expect("changed");
        let names: Vec<_> = up
            .iter()
            .filter_map(|s| s.service.as_ref().map(|r| r.name.clone()))
            .collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].name, "b");
    }
}
