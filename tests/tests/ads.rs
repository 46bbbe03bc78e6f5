//! The control plane's ADS server against a real tonic ADS client on loopback: state of the
//! world and delta, initial config, a file change pushing a new version, a NACK recorded with
//! its message while the previous version stays in force, and malformed requests refused.

use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_proto::admin::admin_client::AdminClient;
use weft_proto::admin::{
    GetProxyConfigRequest, ListProxiesRequest, ListSourceErrorsRequest, SyncState,
};
use weft_proto::envoy::envoy::config::core::v3::{Locality, Node};
use weft_proto::envoy::envoy::config::route::v3::RouteConfiguration;
use weft_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weft_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use weft_proto::envoy::google::rpc::Status as RpcStatus;
use weft_proto::type_url;
use weft_testkit::world;

const PATIENCE: Duration = Duration::from_secs(10);
const ECHO: &str = "echo.default.svc.cluster.local:80";

fn node(id: &str) -> Node {
    Node {
        id: id.into(),
        locality: Some(Locality {
            region: "r1".into(),
            zone: "a".into(),
            sub_zone: String::new(),
        }),
        ..Default::default()
    }
}

fn write_world(dir: &std::path::Path, v1_weight: u32) {
    let a: std::net::SocketAddr = "127.0.1.1:8080".parse().expect("addr");
    let b: std::net::SocketAddr = "127.0.1.2:8080".parse().expect("addr");
    let text = world::docs(&[
        world::service("echo", 80),
        world::service("echo-v1", 80),
        world::service("echo-v2", 80),
        world::slice("echo-v1-1", "echo-v1", &[(a, "n1", true)]),
        world::slice("echo-v2-1", "echo-v2", &[(b, "n1", true)]),
        world::split(
            "echo-split",
            "echo",
            &[("echo-v1", v1_weight), ("echo-v2", 100 - v1_weight)],
        ),
    ]);
    // Write then rename, so the watcher never reads half a file.
    let tmp = dir.join(".world.yaml.tmp");
    std::fs::write(&tmp, text).expect("write world");
    std::fs::rename(&tmp, dir.join("world.yaml")).expect("rename world");
}

fn weights(rc: &RouteConfiguration) -> Vec<u32> {
    use weft_proto::envoy::envoy::config::route::v3::{
        route::Action, route_action::ClusterSpecifier,
    };
    let Some(Action::Route(a)) = &rc.virtual_hosts[0].routes[0].action else {
        panic!("no action")
    };
    let Some(ClusterSpecifier::WeightedClusters(w)) = &a.cluster_specifier else {
        panic!("not weighted")
    };
    w.clusters
        .iter()
        .map(|c| c.weight.as_ref().map_or(0, |v| v.value))
        .collect()
}

async fn next<T>(s: &mut tonic::Streaming<T>) -> T {
    match tokio::time::timeout(PATIENCE, s.message()).await {
        Ok(Ok(Some(m))) => m,
        other => panic!(
            "no response within {PATIENCE:?}: {:?}",
            other.map(|r| r.map(|_| ()))
        ),
    }
}

/// Asserts nothing arrives for a while (the server must not answer an ACK with a response).
async fn quiet<T: std::fmt::Debug>(s: &mut tonic::Streaming<T>) {
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(400), s.message()).await {
        panic!("unexpected response: {m:?}");
    }
}

fn sotw(
    type_url: &str,
    names: &[&str],
    version: &str,
    nonce: &str,
    nack: Option<&str>,
) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        node: Some(node("sotw-client")),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: type_url.into(),
        response_nonce: nonce.into(),
        error_detail: nack.map(|m| RpcStatus {
            code: 3,
            message: m.into(),
            details: vec![],
        }),
        ..Default::default()
    }
}

type Ads = AggregatedDiscoveryServiceClient<tonic::transport::Channel>;
type Admin = AdminClient<tonic::transport::Channel>;

/// A control plane over the 90/10 world, with an ADS client (plaintext port) and an
/// operator's admin client (TLS port).
async fn world_and_clients() -> (tempfile::TempDir, weft_testkit::ControlPlane, Ads, Admin) {
    let dir = tempfile::tempdir().expect("tempdir");
    write_world(dir.path(), 90);
    let cp = weft_testkit::start_control_plane(dir.path())
        .await
        .expect("control plane");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.plaintext()))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let (ads, admin) = (
        AggregatedDiscoveryServiceClient::new(channel),
        weft_testkit::operator_admin(&cp).await.expect("admin"),
    );
    (dir, cp, ads, admin)
}

fn decode_route(r: &DiscoveryResponse) -> RouteConfiguration {
    RouteConfiguration::decode(r.resources[0].value.as_slice()).expect("route decodes")
}

#[tokio::test]
async fn sotw_initial_push_nack_and_update() {
    let (dir, _cp, mut ads, mut admin) = world_and_clients().await;
    let (tx, rx) = mpsc::channel(16);
    let mut resp = ads
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();

    // Wildcard CDS: every cluster.
    tx.send(sotw(type_url::CLUSTER, &[], "", "", None))
        .await
        .expect("send");
    let cds = next(&mut resp).await;
    assert_eq!(cds.type_url, type_url::CLUSTER);
    assert_eq!(cds.resources.len(), 3, "echo, echo-v1, echo-v2");
    tx.send(sotw(
        type_url::CLUSTER,
        &[],
        &cds.version_info,
        &cds.nonce,
        None,
    ))
    .await
    .expect("ack");
    quiet(&mut resp).await;

    // Named RDS: the 90/10 split.
    tx.send(sotw(type_url::ROUTE, &[ECHO], "", "", None))
        .await
        .expect("send");
    let rds = next(&mut resp).await;
    assert_eq!(rds.resources.len(), 1);
    assert_eq!(weights(&decode_route(&rds)), vec![90, 10]);

    // NACK it: recorded with its message, nothing re-sent.
    tx.send(sotw(
        type_url::ROUTE,
        &[ECHO],
        "",
        &rds.nonce,
        Some("route rejected: test says no"),
    ))
    .await
    .expect("nack");
    quiet(&mut resp).await;
    let proxies = admin
        .list_proxies(ListProxiesRequest::default())
        .await
        .expect("admin")
        .into_inner()
        .proxies;
    let p = proxies
        .iter()
        .find(|p| p.node_id == "sotw-client")
        .expect("proxy listed");
    let rds_state = p
        .types
        .iter()
        .find(|t| t.type_url == type_url::ROUTE)
        .expect("rds state");
    assert_eq!(rds_state.state(), SyncState::Nacked);
    assert!(
        rds_state.nack_detail.contains("test says no"),
        "{}",
        rds_state.nack_detail
    );
    assert_eq!(
        rds_state.acked_version, "",
        "the NACKed version is never recorded as ACKed"
    );
    let cds_state = p
        .types
        .iter()
        .find(|t| t.type_url == type_url::CLUSTER)
        .expect("cds state");
    assert_eq!(cds_state.state(), SyncState::Synced);
    assert_eq!(p.region, "r1");
    assert_eq!(p.zone, "a");
    assert_eq!(
        p.namespace, "default",
        "a client without Weft metadata is namespace default"
    );

    // A file change pushes a new version of the changed route only.
    write_world(dir.path(), 50);
    let rds2 = next(&mut resp).await;
    assert_eq!(rds2.type_url, type_url::ROUTE, "only RDS changed");
    assert_ne!(rds2.version_info, rds.version_info);
    assert_eq!(weights(&decode_route(&rds2)), vec![50, 50]);
    tx.send(sotw(
        type_url::ROUTE,
        &[ECHO],
        &rds2.version_info,
        &rds2.nonce,
        None,
    ))
    .await
    .expect("ack");
    quiet(&mut resp).await;
    let cfg = admin
        .get_proxy_config(GetProxyConfigRequest {
            node_id: "sotw-client".into(),
            local_only: false,
        })
        .await
        .expect("config")
        .into_inner();
    let rds_state = cfg
        .proxy
        .expect("proxy")
        .types
        .into_iter()
        .find(|t| t.type_url == type_url::ROUTE)
        .expect("rds");
    assert_eq!(rds_state.state(), SyncState::Synced);
    assert_eq!(rds_state.acked_version, rds2.version_info);
    let held = cfg
        .resources
        .iter()
        .find(|r| r.type_url == type_url::ROUTE && r.name == ECHO)
        .expect("route held");
    assert_eq!(
        weights(&RouteConfiguration::decode(held.value.as_slice()).expect("decode")),
        vec![50, 50]
    );
}

#[tokio::test]
async fn sotw_refuses_unknown_types_and_missing_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_world(dir.path(), 90);
    let cp = weft_testkit::start_control_plane(dir.path())
        .await
        .expect("control plane");
    let endpoint = format!("http://{}", cp.plaintext());
    for (req, want) in [
        (
            sotw(
                "type.googleapis.com/envoy.config.nope.v3.Nope",
                &[],
                "",
                "",
                None,
            ),
            "unknown type_url",
        ),
        (
            DiscoveryRequest {
                type_url: type_url::CLUSTER.into(),
                ..Default::default()
            },
            "must carry node",
        ),
    ] {
        let mut ads = AggregatedDiscoveryServiceClient::connect(endpoint.clone())
            .await
            .expect("connect");
        let (tx, rx) = mpsc::channel(4);
        tx.send(req).await.expect("send");
        let mut resp = ads
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        let err = match tokio::time::timeout(PATIENCE, resp.message()).await {
            Ok(Err(status)) => status,
            other => panic!("expected an error status, got {other:?}"),
        };
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains(want), "{}", err.message());
    }
    // The server still serves after refusing.
    let mut ads = AggregatedDiscoveryServiceClient::connect(endpoint)
        .await
        .expect("connect");
    let (tx, rx) = mpsc::channel(4);
    tx.send(sotw(type_url::LISTENER, &[], "", "", None))
        .await
        .expect("send");
    let mut resp = ads
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    assert_eq!(next(&mut resp).await.resources.len(), 3);
}

fn delta(
    type_url: &str,
    subscribe: &[&str],
    nonce: &str,
    nack: Option<&str>,
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(node("delta-client")),
        type_url: type_url.into(),
        resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        error_detail: nack.map(|m| RpcStatus {
            code: 3,
            message: m.into(),
            details: vec![],
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn delta_initial_incremental_and_nack() {
    let (dir, _cp, mut ads, mut admin) = world_and_clients().await;
    let (tx, rx) = mpsc::channel(16);
    let mut resp = ads
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();

    // Wildcard LDS.
    tx.send(delta(type_url::LISTENER, &[], "", None))
        .await
        .expect("send");
    let lds: DeltaDiscoveryResponse = next(&mut resp).await;
    let mut names: Vec<&str> = lds.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "echo-v1.default.svc.cluster.local:80",
            "echo-v2.default.svc.cluster.local:80",
            ECHO
        ]
    );
    tx.send(delta(type_url::LISTENER, &[], &lds.nonce, None))
        .await
        .expect("ack");
    // Named RDS.
    tx.send(delta(type_url::ROUTE, &[ECHO], "", None))
        .await
        .expect("send");
    let rds = next(&mut resp).await;
    assert_eq!(rds.resources.len(), 1);
    let rc = RouteConfiguration::decode(
        rds.resources[0]
            .resource
            .as_ref()
            .expect("resource")
            .value
            .as_slice(),
    )
    .expect("decode");
    assert_eq!(weights(&rc), vec![90, 10]);
    tx.send(delta(type_url::ROUTE, &[], &rds.nonce, None))
        .await
        .expect("ack");
    quiet(&mut resp).await;

    // A change sends only the changed resource.
    write_world(dir.path(), 70);
    let rds2 = next(&mut resp).await;
    assert_eq!(rds2.type_url, type_url::ROUTE);
    assert_eq!(rds2.resources.len(), 1);
    assert!(rds2.removed_resources.is_empty());
    let rc = RouteConfiguration::decode(
        rds2.resources[0]
            .resource
            .as_ref()
            .expect("resource")
            .value
            .as_slice(),
    )
    .expect("decode");
    assert_eq!(weights(&rc), vec![70, 30]);
    assert_ne!(rds2.resources[0].version, rds.resources[0].version);

    // NACK it: recorded, previous ACK stays, nothing re-sent.
    tx.send(delta(
        type_url::ROUTE,
        &[],
        &rds2.nonce,
        Some("bad weights"),
    ))
    .await
    .expect("nack");
    quiet(&mut resp).await;
    let proxies = admin
        .list_proxies(ListProxiesRequest::default())
        .await
        .expect("admin")
        .into_inner()
        .proxies;
    let p = proxies
        .iter()
        .find(|p| p.node_id == "delta-client")
        .expect("listed");
    assert_eq!(p.protocol, "delta");
    let st = p
        .types
        .iter()
        .find(|t| t.type_url == type_url::ROUTE)
        .expect("rds");
    assert_eq!(st.state(), SyncState::Nacked);
    assert!(st.nack_detail.contains("bad weights"));
    let lds_st = p
        .types
        .iter()
        .find(|t| t.type_url == type_url::LISTENER)
        .expect("lds");
    assert_eq!(lds_st.state(), SyncState::Synced);

    // Removing a service removes its listener.
    std::fs::write(
        dir.path().join("world.yaml"),
        world::docs(&[world::service("echo", 80), world::service("echo-v1", 80)]),
    )
    .expect("write");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let m = next(&mut resp).await;
        if m.type_url == type_url::LISTENER {
            assert_eq!(
                m.removed_resources,
                vec!["echo-v2.default.svc.cluster.local:80".to_string()]
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no LDS removal");
    }
}

#[tokio::test]
async fn broken_input_is_reported_and_the_last_good_state_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_world(dir.path(), 90);
    let cp = weft_testkit::start_control_plane(dir.path())
        .await
        .expect("control plane");
    let endpoint = format!("http://{}", cp.plaintext());
    let mut admin = weft_testkit::operator_admin(&cp).await.expect("admin");
    let version = cp.catalog.current().version;
    // A split whose weights are all zero, in the same file; and a file that is not YAML.
    std::fs::write(
        dir.path().join("world.yaml"),
        std::fs::read_to_string(dir.path().join("world.yaml"))
            .expect("read")
            .replace("weight: 90", "weight: 0")
            .replace("weight: 10", "weight: 0"),
    )
    .expect("write");
    std::fs::write(
        dir.path().join("broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n",
    )
    .expect("write");
    let mut models = cp.catalog.subscribe();
    tokio::time::timeout(
        PATIENCE,
        models.wait_for(|m| m.version > version && m.errors.len() >= 2),
    )
    .await
    .expect("errors within patience")
    .expect("catalog alive");
    let errors = admin
        .list_source_errors(ListSourceErrorsRequest {})
        .await
        .expect("errors")
        .into_inner()
        .errors;
    let split = errors
        .iter()
        .find(|e| e.object == "TrafficSplit default/echo-split")
        .expect("split error");
    assert_eq!(split.file, "world.yaml");
    assert_eq!(split.field, "spec.backends");
    assert!(
        split.message.contains("last good version keeps serving"),
        "{}",
        split.message
    );
    let broken = errors
        .iter()
        .find(|e| e.file == "broken.yaml")
        .expect("yaml error");
    assert!(
        broken.message.contains("not valid YAML"),
        "{}",
        broken.message
    );
    // /metrics shows them.
    let (status, body) = weft_testkit::get_via(cp.metrics_addr, "localhost", "/metrics")
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    assert!(body.contains("weft_source_errors 2"), "{body}");
    assert!(
        body.contains("object=\"TrafficSplit default/echo-split\""),
        "{body}"
    );
    // The 90/10 split still serves.
    let mut ads = AggregatedDiscoveryServiceClient::connect(endpoint)
        .await
        .expect("connect");
    let (tx, rx) = mpsc::channel(4);
    tx.send(sotw(type_url::ROUTE, &[ECHO], "", "", None))
        .await
        .expect("send");
    let mut resp = ads
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    assert_eq!(weights(&decode_route(&next(&mut resp).await)), vec![90, 10]);
}
