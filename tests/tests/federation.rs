//! Federation between real control planes on loopback: `weft.federation.v1` over mTLS with
//! certificates from CAs that share a root, exports flowing into the peer's catalog and xDS,
//! a lost peer's endpoints kept stale for the grace period and resynced without a flap, and
//! refusals (wrong cluster, another root, unknown protocol version, a workload certificate).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prost::Message;
use weft_control_plane::catalog::ServiceKey;
use weft_control_plane::translate::ProxyPlace;
use weft_proto::admin::admin_client::AdminClient;
use weft_proto::admin::{ListEndpointsRequest, ListPeersRequest, PeerStatus};
use weft_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;
use weft_testkit::world::{cross_cluster_policy, docs, export, mesh_peer, node, service, slice};
use weft_testkit::{ControlPlane, shared_root_ca_dirs, start_cluster_control_plane, until_ok};

const PATIENCE: Duration = Duration::from_secs(10);

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

fn write(dir: &Path, file: &str, parts: &[String]) {
    std::fs::write(dir.join(file), docs(parts)).expect("write world");
}

/// East exports `echo` (one endpoint, or two with `more`) and `only-east`; `private` is not
/// exported.
fn east_world(more: bool) -> Vec<String> {
    let mut echo = vec![(addr("127.0.10.1:8080"), "n-east", true)];
    if more {
        echo.push((addr("127.0.10.3:8080"), "n-east", true));
    }
    vec![
        node("n-east", "r-east", "e1"),
        service("echo", 80),
        slice("echo-east", "echo", &echo),
        export("echo"),
        service("only-east", 80),
        slice(
            "only-east",
            "only-east",
            &[(addr("127.0.10.2:8080"), "n-east", true)],
        ),
        export("only-east"),
        service("private", 80),
        slice(
            "private",
            "private",
            &[(addr("127.0.10.9:8080"), "n-east", true)],
        ),
    ]
}

fn west_world() -> Vec<String> {
    vec![
        node("n-west", "r-west", "w1"),
        service("echo", 80),
        slice(
            "echo-west",
            "echo",
            &[(addr("127.0.20.1:8080"), "n-west", true)],
        ),
        export("echo"),
        cross_cluster_policy("echo"),
    ]
}

async fn admin(cp: &ControlPlane) -> AdminClient<tonic::transport::Channel> {
    weft_testkit::operator_admin(cp).await.expect("admin")
}

async fn peer(cp: &ControlPlane, name: &str) -> Result<PeerStatus, String> {
    let resp = admin(cp)
        .await
        .list_peers(ListPeersRequest {})
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    resp.peers
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(|| format!("no peer {name}"))
}

/// (address, cluster, stale) of a service's endpoints in `cp`'s catalog, sorted.
fn endpoints(cp: &ControlPlane, svc: &str) -> Vec<(String, String, bool)> {
    let m = cp.catalog.current();
    let mut v: Vec<_> = m
        .services
        .get(&ServiceKey::new("default", svc))
        .map(|s| {
            s.endpoints
                .iter()
                .map(|e| (e.address.to_string(), e.cluster.clone(), e.stale))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn has_service(cp: &ControlPlane, name: &str) -> bool {
    cp.catalog
        .current()
        .services
        .contains_key(&ServiceKey::new("default", name))
}

fn ep(a: &str, c: &str, stale: bool) -> (String, String, bool) {
    (a.to_string(), c.to_string(), stale)
}

/// Priorities of a service's cluster.local endpoints as a proxy in `place` sees them.
fn priorities(cp: &ControlPlane, svc: &str, place: &ProxyPlace) -> Vec<(String, u32)> {
    let t = cp.translations.borrow().clone();
    let Some(x) = t.services.get(&ServiceKey::new("default", svc)) else {
        return Vec::new();
    };
    let name = format!("{svc}.default.svc.cluster.local:80");
    let mut out = Vec::new();
    for r in x.endpoints(place).iter().filter(|r| r.name == name) {
        let cla = ClusterLoadAssignment::decode(r.any.value.as_slice()).expect("CLA");
        for l in cla.endpoints {
            for e in l.lb_endpoints {
                use weft_proto::envoy::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
                if let Some(HostIdentifier::Endpoint(e)) = e.host_identifier
                    && let Some(
                        weft_proto::envoy::envoy::config::core::v3::address::Address::SocketAddress(
                            sa,
                        ),
                    ) = e.address.and_then(|a| a.address)
                {
                    out.push((sa.address, l.priority));
                }
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_reach_the_peer_then_go_stale_resync_without_a_flap_and_expire() {
    let base = tempfile::tempdir().expect("tempdir");
    let cas = shared_root_ca_dirs(base.path(), &["east", "west"]).expect("CA dirs");
    let (east_dir, west_dir) = (base.path().join("east"), base.path().join("west"));
    std::fs::create_dir_all(&east_dir).expect("dir");
    std::fs::create_dir_all(&west_dir).expect("dir");
    write(&east_dir, "world.yaml", &east_world(false));
    let grace = Duration::from_secs(4);
    let east = start_cluster_control_plane(&east_dir, "east", &cas[0], grace, None)
        .await
        .expect("east");
    let east_addr = east.grpc_addr;
    write(&west_dir, "world.yaml", &west_world());
    write(
        &west_dir,
        "peers.yaml",
        &[mesh_peer("east", &east_addr.to_string())],
    );
    let west = start_cluster_control_plane(&west_dir, "west", &cas[1], grace, None)
        .await
        .expect("west");
    // Peering is configured on both sides: east serves west only once it names west.
    write(
        &east_dir,
        "peers.yaml",
        &[mesh_peer("west", &west.grpc_addr.to_string())],
    );

    // West imports east's exports: echo joins the local service, only-east exists through
    // federation alone, private stays private.
    let p = until_ok("west synced with east", PATIENCE, || async {
        let p = peer(&west, "east").await?;
        (p.state == "SYNCED" && p.services == 2)
            .then_some(p.clone())
            .ok_or(format!("{p:?}"))
    })
    .await;
    assert_eq!(p.endpoints, 2, "{p:?}");
    assert_eq!(p.origin, "MeshPeer");
    assert_eq!(
        endpoints(&west, "echo"),
        [
            ep("127.0.10.1", "east", false),
            ep("127.0.20.1", "west", false)
        ]
    );
    assert_eq!(
        endpoints(&west, "only-east"),
        [ep("127.0.10.2", "east", false)]
    );
    assert!(endpoints(&west, "private").is_empty());
    let only = west.catalog.current().services[&ServiceKey::new("default", "only-east")].clone();
    assert!(!only.local);
    // Locality and failover order survive the trip: for a west proxy, east comes after west.
    let m = west.catalog.current();
    let east_ep = m.services[&ServiceKey::new("default", "echo")]
        .endpoints
        .iter()
        .find(|e| e.cluster == "east")
        .cloned()
        .expect("east endpoint");
    assert_eq!(
        (
            east_ep.locality.region.as_str(),
            east_ep.locality.zone.as_str()
        ),
        ("r-east", "e1")
    );
    let place = ProxyPlace {
        cluster: "west".into(),
        locality: weft_control_plane::catalog::Locality {
            region: "r-west".into(),
            zone: "w1".into(),
            subzone: String::new(),
        },
    };
    until_ok("xDS has east at a lower priority", PATIENCE, || async {
        let got = priorities(&west, "echo", &place);
        (got == [("127.0.10.1".to_string(), 1), ("127.0.20.1".to_string(), 0)])
            .then_some(())
            .ok_or(format!("{got:?}"))
    })
    .await;

    // A change on east arrives incrementally.
    write(&east_dir, "world.yaml", &east_world(true));
    until_ok("the new east endpoint", PATIENCE, || async {
        let got = endpoints(&west, "echo");
        (got.len() == 3).then_some(()).ok_or(format!("{got:?}"))
    })
    .await;

    // Peering both ways: east imports west's echo; west sees east streaming from it.
    write(
        &east_dir,
        "peers.yaml",
        &[mesh_peer("west", &west.grpc_addr.to_string())],
    );
    until_ok("east synced with west", PATIENCE, || async {
        let p = peer(&east, "west").await?;
        (p.state == "SYNCED").then_some(()).ok_or(format!("{p:?}"))
    })
    .await;
    assert!(endpoints(&east, "echo").contains(&ep("127.0.20.1", "west", false)));
    until_ok("west exports to east", PATIENCE, || async {
        let p = peer(&west, "east").await?;
        p.exporting_to.then_some(()).ok_or(format!("{p:?}"))
    })
    .await;

    // Watch west's catalog: east's endpoint must never leave while east is only briefly away.
    let flapped = Arc::new(AtomicBool::new(false));
    let watch = {
        let (mut models, flapped) = (west.catalog.subscribe(), flapped.clone());
        tokio::spawn(async move {
            while models.changed().await.is_ok() {
                let m = models.borrow_and_update().clone();
                let present = m
                    .services
                    .get(&ServiceKey::new("default", "echo"))
                    .is_some_and(|s| s.endpoints.iter().any(|e| e.cluster == "east"));
                if !present {
                    flapped.store(true, Ordering::SeqCst);
                }
            }
        })
    };

    // East goes away: its endpoints stay, marked stale.
    drop(east);
    until_ok("east is stale on west", PATIENCE, || async {
        let p = peer(&west, "east").await?;
        (p.state == "STALE").then_some(()).ok_or(format!("{p:?}"))
    })
    .await;
    assert_eq!(
        endpoints(&west, "echo"),
        [
            ep("127.0.10.1", "east", true),
            ep("127.0.10.3", "east", true),
            ep("127.0.20.1", "west", false)
        ]
    );
    let listed = admin(&west)
        .await
        .list_endpoints(ListEndpointsRequest {
            namespace: "default".into(),
            name: "echo".into(),
            proxy: String::new(),
            local_only: false,
        })
        .await
        .expect("endpoints")
        .into_inner();
    assert!(
        listed
            .endpoints
            .iter()
            .all(|e| e.stale == (e.cluster == "east")),
        "{listed:?}"
    );
    let page = reqwest_metrics(west.metrics_addr).await;
    assert_eq!(
        weft_testkit::metric_sum(&page, "weft_federation_peer_stale", &["peer=\"east\""]),
        1.0,
        "{page}"
    );

    // East comes back on the same address within the grace period: resynced, not stale.
    let east = start_cluster_control_plane(&east_dir, "east", &cas[0], grace, Some(east_addr))
        .await
        .expect("east again");
    until_ok("west resynced with east", PATIENCE, || async {
        let p = peer(&west, "east").await?;
        (p.state == "SYNCED").then_some(()).ok_or(format!("{p:?}"))
    })
    .await;
    assert!(endpoints(&west, "echo").iter().all(|(_, _, stale)| !stale));
    assert!(
        !flapped.load(Ordering::SeqCst),
        "east's endpoints left west's catalog during a short outage"
    );
    watch.abort();

    // East goes away for longer than the grace period: its endpoints leave.
    drop(east);
    until_ok("east expired on west", Duration::from_secs(15), || async {
        let p = peer(&west, "east").await?;
        (p.state == "EXPIRED").then_some(()).ok_or(format!("{p:?}"))
    })
    .await;
    assert_eq!(endpoints(&west, "echo"), [ep("127.0.20.1", "west", false)]);
    assert!(!has_service(&west, "only-east"));
}

async fn reqwest_metrics(addr: SocketAddr) -> String {
    weft_testkit::get_via(addr, "metrics", "/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_the_wrong_identity_root_or_version_are_refused() {
    let base = tempfile::tempdir().expect("tempdir");
    let cas = shared_root_ca_dirs(base.path(), &["east", "west", "nowhere"]).expect("CA dirs");
    let (east_dir, west_dir, rogue_dir) = (
        base.path().join("east"),
        base.path().join("west"),
        base.path().join("rogue"),
    );
    for d in [&east_dir, &west_dir, &rogue_dir] {
        std::fs::create_dir_all(d).expect("dir");
    }
    write(&east_dir, "world.yaml", &east_world(false));
    write(&rogue_dir, "world.yaml", &east_world(false));
    let grace = Duration::from_secs(30);
    let east = start_cluster_control_plane(&east_dir, "east", &cas[0], grace, None)
        .await
        .expect("east");
    // Another root altogether, claiming to be cluster "north".
    let rogue = start_cluster_control_plane(
        &rogue_dir,
        "north",
        &base.path().join("ca-rogue"),
        grace,
        None,
    )
    .await
    .expect("rogue");
    write(&west_dir, "world.yaml", &west_world());
    write(
        &west_dir,
        "peers.yaml",
        &[
            // East's address under another cluster's name.
            mesh_peer("south", &east.grpc_addr.to_string()),
            mesh_peer("north", &rogue.grpc_addr.to_string()),
        ],
    );
    let west = start_cluster_control_plane(&west_dir, "west", &cas[1], grace, None)
        .await
        .expect("west");
    // Peering is configured on both sides: east serves west only once it names west.
    write(
        &east_dir,
        "peers.yaml",
        &[mesh_peer("west", &west.grpc_addr.to_string())],
    );
    let south = until_ok("south refused with the reason", PATIENCE, || async {
        let p = peer(&west, "south").await?;
        p.last_error
            .contains("control plane of cluster \"east\", not \"south\"")
            .then_some(p.clone())
            .ok_or(format!("{p:?}"))
    })
    .await;
    assert_eq!(south.state, "CONNECTING", "{south:?}");
    let north = until_ok("north refused with the reason", PATIENCE, || async {
        let p = peer(&west, "north").await?;
        (!p.last_error.is_empty())
            .then_some(p.clone())
            .ok_or(format!("{p:?}"))
    })
    .await;
    assert!(
        north.last_error.to_lowercase().contains("certificate")
            || north.last_error.contains("UnknownIssuer"),
        "{north:?}"
    );
    // Nothing of theirs reached the catalog.
    assert_eq!(endpoints(&west, "echo"), [ep("127.0.20.1", "west", false)]);
    assert!(!has_service(&west, "only-east"));

    // Straight at east's Export: a client speaking another protocol version, and a workload.
    let roots = weft_proto::tls::roots(&west.ca.trust_bundle()).expect("roots");
    let cp_id = weft_proto::SpiffeId::new(
        "cluster.local",
        weft_proto::keys::CONTROL_PLANE_NAMESPACE,
        weft_proto::keys::CONTROL_PLANE_SERVICE_ACCOUNT,
    )
    .expect("id");
    let workload_id = weft_proto::SpiffeId::new("cluster.local", "default", "web").expect("id");
    // A control plane of the mesh that is no peer of east's: its own intermediate.
    let nowhere = weft_control_plane::identity::Ca::load_or_generate(
        Some(&cas[2]),
        "cluster.local",
        "nowhere",
    )
    .expect("nowhere's CA");
    let client = |id: &weft_proto::SpiffeId, cluster: Option<&str>| {
        let (csr, key) = weft_proto::tls::new_csr(&id.to_string()).expect("csr");
        let signed = match cluster {
            Some("nowhere") => nowhere.sign_control_plane(&csr, id, None, "nowhere"),
            Some(c) => west.ca.sign_control_plane(&csr, id, None, c),
            None => west.ca.sign(&csr, id, None),
        }
        .expect("sign");
        let svid = weft_proto::tls::Svid::from_pem(&signed.chain, &key).expect("svid");
        weft_proto::tls::client_config(Some(&svid), roots.clone(), &[weft_proto::tls::ALPN_H2])
            .expect("config")
    };
    let call = |config, cluster: &'static str, version: u32| {
        let target = east.grpc_addr.to_string();
        async move {
            let ch = weft_control_plane::federation::import::connect(&target, "east", config, None)
                .await
                .expect("connect");
            weft_proto::federation::federation_client::FederationClient::new(ch)
                .export(weft_proto::federation::ExportRequest {
                    cluster_name: cluster.into(),
                    protocol_version: version,
                })
                .await
                .map(|_| ())
        }
    };
    let e = call(client(&cp_id, Some("west")), "west", 7)
        .await
        .expect_err("version 7");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("version 7 is not supported"), "{e:?}");
    let e = call(client(&cp_id, Some("west")), "south", 1)
        .await
        .expect_err("claims another cluster");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = call(client(&cp_id, Some("nowhere")), "nowhere", 1)
        .await
        .expect_err("a control plane of the mesh that is not a peer");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("not a configured peer"), "{e:?}");
    let e = call(client(&workload_id, None), "west", 1)
        .await
        .expect_err("a workload");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("is not a control plane"), "{e:?}");
    until_ok("the configured peer is served", PATIENCE, || async {
        call(client(&cp_id, Some("west")), "west", 1)
            .await
            .map_err(|e| e.to_string())
    })
    .await;
}

/// A scripted "east": a real TLS port with east's control-plane certificate (from `ca_dir`),
/// whose Federation answers its `n`th Export call (from 0) with `script(n)`; the stream then
/// stays open and silent when `stay` is true, or ends. Returns its address and server task.
async fn rogue_east(
    ca_dir: &Path,
    script: fn(u32) -> (Vec<weft_proto::federation::ExportUpdate>, bool),
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use weft_proto::federation as fpb;
    let ca =
        weft_control_plane::identity::Ca::load_or_generate(Some(ca_dir), "cluster.local", "east")
            .expect("east CA");
    let acceptor = weft_control_plane::grpc_tls::Acceptor::new(&ca, "cluster.local", "east")
        .expect("acceptor");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    struct Rogue {
        calls: std::sync::atomic::AtomicU32,
        script: fn(u32) -> (Vec<fpb::ExportUpdate>, bool),
    }
    #[tonic::async_trait]
    impl fpb::federation_server::Federation for Rogue {
        type ExportStream = std::pin::Pin<
            Box<dyn tokio_stream::Stream<Item = Result<fpb::ExportUpdate, tonic::Status>> + Send>,
        >;
        async fn export(
            &self,
            _: tonic::Request<fpb::ExportRequest>,
        ) -> Result<tonic::Response<Self::ExportStream>, tonic::Status> {
            let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (updates, stay) = (self.script)(n);
            let updates = tokio_stream::iter(updates.into_iter().map(Ok));
            Ok(tonic::Response::new(match stay {
                true => Box::pin(tokio_stream::StreamExt::chain(
                    updates,
                    tokio_stream::pending(),
                )),
                false => Box::pin(updates),
            }))
        }
    }
    let metrics = std::sync::Arc::new(weft_control_plane::metrics::Metrics::new());
    let incoming = acceptor.incoming(
        listener,
        metrics,
        weft_control_plane::grpc_tls::Limits::default(),
    );
    let rogue = Rogue {
        calls: Default::default(),
        script,
    };
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(fpb::federation_server::FederationServer::new(rogue))
            .serve_with_incoming(incoming)
            .await;
    });
    (addr, server)
}

/// East's echo with one endpoint at `addr` claiming cluster `cluster`.
fn rogue_echo(addr: &str, cluster: &str) -> weft_proto::federation::ExportedService {
    use weft_proto::federation as fpb;
    fpb::ExportedService {
        service: Some(fpb::ServiceRef {
            namespace: "default".into(),
            name: "echo".into(),
        }),
        ports: vec![fpb::ServicePort {
            name: "http".into(),
            port: 80,
            app_protocol: String::new(),
        }],
        endpoints: vec![fpb::Endpoint {
            address: addr.into(),
            cluster: cluster.into(),
            ready: true,
            weight: 1,
            ports: [("http".to_string(), 8080u32)].into(),
            ..Default::default()
        }],
    }
}

/// A federation update from east.
fn rogue_update(
    version: u64,
    snapshot: bool,
    upserted: Vec<weft_proto::federation::ExportedService>,
) -> weft_proto::federation::ExportUpdate {
    weft_proto::federation::ExportUpdate {
        version,
        snapshot,
        upserted,
        removed: vec![],
        cluster_name: "east".into(),
    }
}

/// West over its world, importing from `east_addr`.
async fn west_importing_from(
    base: &Path,
    ca: &Path,
    east_addr: std::net::SocketAddr,
) -> ControlPlane {
    let west_dir = base.join("west");
    std::fs::create_dir_all(&west_dir).expect("dir");
    write(&west_dir, "world.yaml", &west_world());
    write(
        &west_dir,
        "peers.yaml",
        &[mesh_peer("east", &east_addr.to_string())],
    );
    start_cluster_control_plane(&west_dir, "west", ca, Duration::from_secs(60), None)
        .await
        .expect("west")
}

/// A peer that presents the right certificate but sends a bad stream: a snapshot, then an
/// update claiming an endpoint of another cluster. The importer refuses it with the reason,
/// keeps the snapshot's endpoints (stale), and never takes the bad one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_a_bad_update_is_refused_and_the_catalog_keeps_its_last_good_state() {
    let base = tempfile::tempdir().expect("tempdir");
    let cas = shared_root_ca_dirs(base.path(), &["east", "west"]).expect("CA dirs");
    // A snapshot, then an update with another cluster's endpoint; then silence.
    let (rogue_addr, server) = rogue_east(&cas[0], |_| {
        (
            vec![
                rogue_update(1, true, vec![rogue_echo("127.0.10.1", "east")]),
                rogue_update(2, false, vec![rogue_echo("127.0.66.6", "west")]),
            ],
            true,
        )
    })
    .await;
    let west = west_importing_from(base.path(), &cas[1], rogue_addr).await;
    let p = until_ok(
        "the bad update refused with its reason",
        PATIENCE,
        || async {
            let p = peer(&west, "east").await?;
            p.last_error
                .contains("a peer may export only its own cluster's endpoints")
                .then_some(p.clone())
                .ok_or(format!("{p:?}"))
        },
    )
    .await;
    assert!(p.last_error.contains("service default/echo"), "{p:?}");
    let eps = endpoints(&west, "echo");
    assert!(
        eps.contains(&ep("127.0.10.1", "east", true)),
        "the snapshot's endpoint stays, stale: {eps:?}"
    );
    assert!(
        !eps.iter().any(|(a, _, _)| a == "127.0.66.6"),
        "the bad endpoint never entered the catalog: {eps:?}"
    );
    let page = reqwest_metrics(west.metrics_addr).await;
    assert!(
        weft_testkit::metric_sum(
            &page,
            "weft_federation_refusals_total",
            &["peer=\"east\"", "reason=\"invalid_update\""]
        ) >= 1.0,
        "{page}"
    );
    server.abort();
}

/// Through a real sidecar: `<svc>.<ns>.svc.clusterset.local` spreads over every cluster's
/// endpoints, while the local name stays local (no crossCluster policy), and a service that
/// exists only in the peer is reachable by its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clusterset_name_reaches_every_cluster_through_a_sidecar() {
    use weft_testkit::echo::{Echo, Identity};
    let echo = |ip: &str, name: &str, cluster: &str| {
        let (ip, name, cluster) = (ip.to_string(), name.to_string(), cluster.to_string());
        async move {
            Echo::start(
                format!("{ip}:0").parse().expect("addr"),
                Identity {
                    name,
                    cluster,
                    zone: "z".into(),
                },
            )
            .await
            .expect("echo")
        }
    };
    let east_ep = echo("127.0.12.1", "east-pod", "east").await;
    let west_ep = echo("127.0.22.1", "west-pod", "west").await;
    let only_ep = echo("127.0.12.2", "only-pod", "east").await;
    let base = tempfile::tempdir().expect("tempdir");
    let cas = shared_root_ca_dirs(base.path(), &["east", "west"]).expect("CA dirs");
    let (east_dir, west_dir) = (base.path().join("east"), base.path().join("west"));
    std::fs::create_dir_all(&east_dir).expect("dir");
    std::fs::create_dir_all(&west_dir).expect("dir");
    write(
        &east_dir,
        "world.yaml",
        &[
            service("echo", 80),
            slice("echo", "echo", &[(east_ep.addr, "node-1", true)]),
            export("echo"),
            service("only-east", 80),
            slice("only-east", "only-east", &[(only_ep.addr, "node-1", true)]),
            export("only-east"),
        ],
    );
    let grace = Duration::from_secs(30);
    let east = start_cluster_control_plane(&east_dir, "east", &cas[0], grace, None)
        .await
        .expect("east");
    write(
        &west_dir,
        "world.yaml",
        &[
            service("echo", 80),
            slice("echo", "echo", &[(west_ep.addr, "node-2", true)]),
            export("echo"),
            // East's pods have no sidecars: accepting them in plaintext is this cluster's call.
            weft_testkit::world::remote_plaintext_policy("echo"),
            weft_testkit::world::remote_plaintext_policy("only-east"),
            mesh_peer("east", &east.grpc_addr.to_string()),
        ],
    );
    let west = start_cluster_control_plane(&west_dir, "west", &cas[1], grace, None)
        .await
        .expect("west");
    // Peering is configured on both sides: east serves west only once it names west.
    write(
        &east_dir,
        "peers.yaml",
        &[mesh_peer("west", &west.grpc_addr.to_string())],
    );
    until_ok("west synced with east", PATIENCE, || async {
        let p = peer(&west, "east").await?;
        (p.state == "SYNCED").then_some(()).ok_or(format!("{p:?}"))
    })
    .await;
    let mut rc = weft_sidecar::RunConfig::local(
        west.plaintext(),
        "127.0.22.9".parse().expect("ip"),
        "client",
    );
    rc.cluster = "west".into();
    let sc = weft_testkit::Sidecar::start(rc).await.expect("sidecar");
    weft_testkit::wait_ready(&sc, PATIENCE).await;
    let seen = |host: &'static str| {
        let out = sc.outbound_addr;
        async move {
            let mut pods = std::collections::BTreeSet::new();
            for _ in 0..40 {
                let (status, body) = weft_testkit::get_via(out, host, "/")
                    .await
                    .expect("request");
                assert_eq!(status, 200, "{host}: {body}");
                pods.insert(
                    body.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
            pods
        }
    };
    until_ok(
        "the clusterset name reaches both clusters",
        PATIENCE,
        || async {
            let pods = seen("echo.default.svc.clusterset.local").await;
            (pods.len() == 2).then_some(()).ok_or(format!("{pods:?}"))
        },
    )
    .await;
    let local = seen("echo.default.svc.cluster.local").await;
    assert_eq!(
        local.into_iter().collect::<Vec<_>>(),
        ["west-pod"],
        "the local name stays local without crossCluster"
    );
    let only = seen("only-east.default.svc.clusterset.local").await;
    assert_eq!(only.into_iter().collect::<Vec<_>>(), ["only-pod"]);
    // A peer's export does not make a cluster.local name here (no local Service of it).
    let (status, body) =
        weft_testkit::get_via(sc.outbound_addr, "only-east.default.svc.cluster.local", "/")
            .await
            .expect("request");
    assert_eq!(status, 404, "{body}");
    drop(east);
}
