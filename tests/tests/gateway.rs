//! The east-west gateway for real, on loopback: a control plane, an exported Service `echo`
//! whose pod has a sidecar (STRICT), a Service `internal` this cluster does not export, and a
//! sidecar in gateway mode. A caller of another cluster opens the tunnel (mesh mTLS to the
//! gateway, `CONNECT` to the endpoint) and runs its own mesh mTLS with the endpoint's sidecar
//! through it: the application sees the caller's verified identity, not the gateway's. The
//! gateway refuses endpoints of Services not exported, addresses that are no endpoint, and
//! callers without a mesh certificate.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_proto::tls::{self, rustls};
use weft_proto::tunnel::{self, TunnelError};
use weft_testkit::echo::{Echo, Identity};
use weft_testkit::{ControlPlane, Sidecar, get_via, metric_sum, world};

const CALLER: &str = "spiffe://cluster.local/ns/default/sa/caller";
const GATEWAY: &str = "spiffe://cluster.local/ns/default/sa/weft-gateway";
const ECHO: &str = "spiffe://cluster.local/ns/default/sa/echo";

/// A client configuration for `id` (signed by the mesh CA, as a caller's sidecar holds it),
/// offering `alpn`; without `id`, no certificate at all.
fn client(
    cp: &ControlPlane,
    id: Option<&str>,
    alpn: &[u8],
) -> std::sync::Arc<rustls::ClientConfig> {
    let roots = tls::roots(&[cp.ca.root_pem().to_string()]).expect("roots");
    let svid = id.map(|id| {
        let spiffe = weft_proto::SpiffeId::parse(id).expect("id");
        let (csr, key) = tls::new_csr(id).expect("csr");
        let signed = cp.ca.sign(&csr, &spiffe, None).expect("signed");
        tls::Svid::from_pem(&signed.chain, &key).expect("svid")
    });
    tls::client_config(svid.as_ref(), roots, &[alpn]).expect("config")
}

/// In cluster `cluster` of `cp`: the echo app (127.0.<net>.10) behind its sidecar, whose
/// inbound is the world's endpoint `echo_ep`, and a gateway at 127.0.<net>.5 (identity
/// `default/weft-gateway`), both joined with join tokens.
async fn echo_behind_a_gateway(
    cp: &ControlPlane,
    bundles: &std::path::Path,
    echo_ep: SocketAddr,
    cluster: &str,
    net: u8,
) -> (Echo, Sidecar, Sidecar) {
    std::fs::create_dir_all(bundles).expect("bundles");
    let app = Echo::start(
        SocketAddr::from(([127, 0, net, 10], 0)),
        Identity {
            name: format!("{cluster}-pod"),
            cluster: cluster.into(),
            zone: String::new(),
        },
    )
    .await
    .expect("echo");
    let mut scfg = weft_testkit::mesh_sidecar_config(cp, bundles, echo_ep.ip(), "echo-0", "echo")
        .await
        .expect("server config");
    scfg.cluster = cluster.into();
    scfg.inbound_addr = echo_ep;
    scfg.app_addr = Some(app.addr);
    let server = Sidecar::start(scfg).await.expect("server sidecar");
    let gw_ip = std::net::IpAddr::from([127, 0, net, 5]);
    let mut gcfg = weft_testkit::mesh_sidecar_config(
        cp,
        bundles,
        gw_ip,
        &format!("{cluster}-gateway"),
        "weft-gateway",
    )
    .await
    .expect("gateway config");
    gcfg.cluster = cluster.into();
    gcfg.gateway_addr = Some(SocketAddr::new(gw_ip, 0));
    let gw = Sidecar::start(gcfg).await.expect("gateway");
    weft_testkit::wait_ready(&server, Duration::from_secs(15)).await;
    weft_testkit::wait_ready(&gw, Duration::from_secs(15)).await;
    (app, server, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_tunnels_to_exported_endpoints_only_and_the_caller_identity_reaches_the_app() {
    let echo_ep: SocketAddr = "127.0.8.2:15006".parse().expect("addr");
    let internal_ep: SocketAddr = "127.0.8.3:15006".parse().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("world.yaml"),
        world::docs(&[
            world::namespace("default", "STRICT"),
            world::service("echo", 80),
            world::pod("echo-0", "echo", true),
            world::pod_slice("echo", "echo", &[(echo_ep, "echo-0")]),
            world::export("echo"),
            world::service("internal", 80),
            world::pod("internal-0", "internal", true),
            world::pod_slice("internal", "internal", &[(internal_ep, "internal-0")]),
            // Exported, but its pod has no sidecar: no caller tunnels plaintext to it.
            world::service("plain", 80),
            world::pod("plain-0", "plain", false),
            world::pod_slice(
                "plain",
                "plain",
                &[("127.0.8.4:8080".parse().expect("addr"), "plain-0")],
            ),
            world::export("plain"),
        ]),
    )
    .expect("world");
    let cp = weft_testkit::start_control_plane(dir.path())
        .await
        .expect("control plane");
    let bundles = dir.path().join("bundles");
    let (app, server, gw) = echo_behind_a_gateway(&cp, &bundles, echo_ep, "cluster-1", 8).await;
    let gw_addr = gw.gateway_addr.expect("gateway bound");

    // Through the tunnel, the caller's own mTLS with the endpoint's sidecar: the endpoint
    // proves it is echo, and the application is told the caller's identity.
    let stream = tunnel::open(
        gw_addr,
        GATEWAY,
        echo_ep,
        "east",
        client(&cp, Some(CALLER), tls::ALPN_MESH_TUNNEL),
    )
    .await
    .expect("the tunnel opens");
    let name = rustls::pki_types::ServerName::IpAddress(echo_ep.ip().into());
    let mut inner =
        tokio_rustls::TlsConnector::from(client(&cp, Some(CALLER), tls::ALPN_MESH_HTTP1))
            .connect(name, stream)
            .await
            .expect("end-to-end mTLS through the gateway");
    tls::check_peer(inner.get_ref().1.peer_certificates(), &[ECHO]).expect("the endpoint is echo");
    inner
        .write_all(
            b"GET / HTTP/1.1\r\nHost: echo.default.svc.cluster.local\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("request");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), inner.read_to_string(&mut answer))
        .await
        .expect("an answer within 5 s")
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("cluster-1-pod"), "{answer}");
    let seen = app
        .behavior
        .last_client_identity
        .lock()
        .ok()
        .and_then(|g| g.clone());
    assert_eq!(
        seen.as_deref(),
        Some(CALLER),
        "the app sees the caller, not the gateway"
    );

    // A Service this cluster does not export, and an address that is no endpoint: refused,
    // naming why, before anything is dialed.
    for target in [internal_ep, "127.0.8.9:15006".parse().expect("addr")] {
        match tunnel::open(
            gw_addr,
            GATEWAY,
            target,
            "east",
            client(&cp, Some(CALLER), tls::ALPN_MESH_TUNNEL),
        )
        .await
        {
            Err(TunnelError::Refused { status, reason, .. }) => {
                assert_eq!((status, reason.as_str()), (403, "not-exported"), "{target}")
            }
            other => panic!("{target}: {:?}", other.map(|_| "opened")),
        }
    }
    match tunnel::open(
        gw_addr,
        GATEWAY,
        "127.0.8.4:8080".parse().expect("addr"),
        "east",
        client(&cp, Some(CALLER), tls::ALPN_MESH_TUNNEL),
    )
    .await
    {
        Err(TunnelError::Refused { status, reason, .. }) => {
            assert_eq!((status, reason.as_str()), (403, "not-meshed"))
        }
        other => panic!("an unmeshed endpoint: {:?}", other.map(|_| "opened")),
    }
    // The control plane's port is for peer control planes only: a workload is refused.
    match tunnel::open(
        gw_addr,
        GATEWAY,
        cp.grpc_addr,
        "east",
        client(&cp, Some(CALLER), tls::ALPN_MESH_TUNNEL),
    )
    .await
    {
        Err(TunnelError::Refused { status, reason, .. }) => {
            assert_eq!((status, reason.as_str()), (403, "not-a-peer-control-plane"))
        }
        other => panic!(
            "a workload reached the control plane: {:?}",
            other.map(|_| "opened")
        ),
    }
    // No mesh certificate: no tunnel. Nor a caller that does not speak the tunnel's ALPN.
    let anonymous = tunnel::open(
        gw_addr,
        GATEWAY,
        echo_ep,
        "east",
        client(&cp, None, tls::ALPN_MESH_TUNNEL),
    )
    .await;
    assert!(
        anonymous.is_err(),
        "a caller without a certificate got a tunnel"
    );
    let wrong_alpn = tunnel::open(
        gw_addr,
        GATEWAY,
        echo_ep,
        "east",
        client(&cp, Some(CALLER), tls::ALPN_MESH_HTTP1),
    )
    .await;
    assert!(wrong_alpn.is_err(), "the gateway served another protocol");
    // And the caller checks the gateway: one that is not the named identity is refused.
    match tunnel::open(
        gw_addr,
        ECHO,
        echo_ep,
        "east",
        client(&cp, Some(CALLER), tls::ALPN_MESH_TUNNEL),
    )
    .await
    {
        Err(TunnelError::Identity(..)) => {}
        other => panic!("{:?}", other.map(|_| "opened")),
    }

    // Counted per source cluster — the verified certificate's (cluster-1 here), not what the
    // caller declared ("east") — and service (the gateway counts a refusal on its own task, a
    // moment after the caller saw it).
    weft_testkit::until_ok("the gateway's counts", Duration::from_secs(5), || async {
        let (_, page) = get_via(gw.admin_addr, "admin", "/metrics")
            .await
            .map_err(|e| e.to_string())?;
        let n = |labels: &[&str]| metric_sum(&page, "weft_gateway_connections_total", labels);
        let got = (
            n(&[
                "source_cluster=\"cluster-1\"",
                "service=\"echo.default.svc.clusterset.local\"",
                "result=\"forwarded\"",
            ]),
            n(&["source_cluster=\"cluster-1\"", "result=\"not-exported\""]),
            n(&["result=\"handshake\""]),
            // The caller that would not trust the gateway hung up before its CONNECT.
            n(&["result=\"bad-request\""]),
            n(&["result=\"not-meshed\""]),
        );
        (got == (1.0, 2.0, 2.0, 1.0, 1.0))
            .then_some(())
            .ok_or(format!("{got:?}"))
    })
    .await;
    drop(server);
}

/// A gateway must prove who it is to callers and know its cluster: without an identity, or
/// without `--cluster`, start-up refuses, naming the flag.
#[tokio::test]
async fn a_gateway_without_an_identity_or_a_cluster_does_not_start() {
    let (dir, cp) = weft_testkit::control_plane_over(&[]).await;
    let mut plain = weft_sidecar::RunConfig::local(
        cp.plaintext(),
        "127.0.8.6".parse().expect("ip"),
        "gw-plain",
    );
    plain.gateway_addr = Some("127.0.8.6:0".parse().expect("addr"));
    let err = Sidecar::start(plain).await.err().expect("refused");
    assert!(
        err.to_string().contains("--gateway-addr") && err.to_string().contains("identity"),
        "{err}"
    );
    let mut nameless = weft_testkit::mesh_sidecar_config(
        &cp,
        dir.path(),
        "127.0.8.7".parse().expect("ip"),
        "gw-nameless",
        "weft-gateway",
    )
    .await
    .expect("config");
    nameless.cluster = String::new();
    nameless.gateway_addr = Some("127.0.8.7:0".parse().expect("addr"));
    let err = Sidecar::start(nameless).await.err().expect("refused");
    assert!(err.to_string().contains("--cluster"), "{err}");
}

/// Two clusters on two networks, federated: west's MeshPeer says east is on network
/// `east-net` behind a gateway. A west sidecar's request for east's exported Service goes
/// through that gateway (counted there), over the caller's own mTLS with east's sidecar, and
/// east's application sees the west caller's identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_reaches_another_networks_endpoints_through_its_gateway() {
    use weft_testkit::{shared_root_ca_dirs, start_cluster_control_plane};
    let patience = Duration::from_secs(20);
    let echo_ep: SocketAddr = "127.0.9.2:15006".parse().expect("addr");
    let base = tempfile::tempdir().expect("tempdir");
    let cas = shared_root_ca_dirs(base.path(), &["east", "west"]).expect("CA dirs");
    let (east_dir, west_dir) = (base.path().join("east"), base.path().join("west"));
    std::fs::create_dir_all(&east_dir).expect("dir");
    std::fs::create_dir_all(&west_dir).expect("dir");
    std::fs::write(
        east_dir.join("world.yaml"),
        world::docs(&[
            world::namespace("default", "STRICT"),
            world::service("echo", 80),
            world::pod("echo-0", "echo", true),
            world::pod_slice("echo", "echo", &[(echo_ep, "echo-0")]),
            world::export("echo"),
        ]),
    )
    .expect("world");
    let grace = Duration::from_secs(30);
    let east = start_cluster_control_plane(&east_dir, "east", &cas[0], grace, None)
        .await
        .expect("east");
    let bundles = base.path().join("bundles");
    let (app, _server, gw) = echo_behind_a_gateway(&east, &bundles, echo_ep, "east", 9).await;
    let gw_addr = gw.gateway_addr.expect("gateway bound");

    let peer = |name: &str, address: &str, extra: &str| {
        format!(
            "apiVersion: weft.dev/v1alpha1\nkind: MeshPeer\nmetadata: {{name: {name}}}\nspec: {{address: \"{address}\"{extra}}}\n"
        )
    };
    std::fs::write(
        west_dir.join("world.yaml"),
        peer(
            "east",
            &east.grpc_addr.to_string(),
            &format!(
                ", network: east-net, gateways: [\"{gw_addr}\"], gatewayIdentity: \"{GATEWAY}\""
            ),
        ),
    )
    .expect("west world");
    let mut wcfg = weft_control_plane::Config::local(&west_dir);
    wcfg.cluster_name = "west".into();
    wcfg.network = "west-net".into();
    wcfg.ca_dir = Some(cas[1].clone());
    wcfg.federation_heartbeat = Duration::from_millis(200);
    wcfg.federation_timeout = Duration::from_secs(1);
    wcfg.peer_grace = grace;
    let west = ControlPlane::start(wcfg).await.expect("west");
    std::fs::write(
        east_dir.join("peers.yaml"),
        peer("west", &west.grpc_addr.to_string(), ""),
    )
    .expect("east peers");
    let mut ccfg = weft_testkit::mesh_sidecar_config(
        &west,
        &bundles,
        "127.0.9.20".parse().expect("ip"),
        "west-client",
        "caller",
    )
    .await
    .expect("client config");
    ccfg.cluster = "west".into();
    let client = Sidecar::start(ccfg).await.expect("client");
    weft_testkit::wait_ready(&client, patience).await;

    let body = weft_testkit::until_ok("east's echo through the gateway", patience, || async {
        match get_via(
            client.outbound_addr,
            "echo.default.svc.clusterset.local",
            "/",
        )
        .await
        {
            Ok((200, body)) => Ok(body),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(body.starts_with("east-pod"), "{body}");
    let seen = app
        .behavior
        .last_client_identity
        .lock()
        .ok()
        .and_then(|g| g.clone());
    assert_eq!(
        seen.as_deref(),
        Some(CALLER),
        "east's app sees the west caller"
    );
    let (_, page) = get_via(gw.admin_addr, "admin", "/metrics")
        .await
        .expect("metrics");
    assert!(
        metric_sum(
            &page,
            "weft_gateway_connections_total",
            &[
                "source_cluster=\"west\"",
                "service=\"echo.default.svc.clusterset.local\"",
                "result=\"forwarded\""
            ]
        ) >= 1.0,
        "the request crossed the gateway:\n{page}"
    );
    // Federation itself ran through the gateway: west's control plane reached east's there.
    assert!(
        metric_sum(
            &page,
            "weft_gateway_connections_total",
            &[
                "source_cluster=\"west\"",
                "service=\"control-plane\"",
                "result=\"forwarded\""
            ]
        ) >= 1.0,
        "federation did not cross the gateway:\n{page}"
    );
    // A west proxy without an identity gets a clear 503, never a plaintext try at the
    // other network's pod address.
    let mut pcfg = weft_sidecar::RunConfig::local(
        west.plaintext(),
        "127.0.9.21".parse().expect("ip"),
        "west-plain",
    );
    pcfg.cluster = "west".into();
    let plain = Sidecar::start(pcfg).await.expect("plain sidecar");
    weft_testkit::wait_ready(&plain, patience).await;
    let (status, body) = get_via(
        plain.outbound_addr,
        "echo.default.svc.clusterset.local",
        "/",
    )
    .await
    .expect("request");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("another network"), "{body}");
    // The operator sees it: west's peer east is on east-net behind the gateway, and east's
    // endpoint is reached through it.
    let mut admin = weft_testkit::operator_admin(&west).await.expect("admin");
    let peers = admin
        .list_peers(weft_proto::admin::ListPeersRequest {})
        .await
        .expect("peers")
        .into_inner()
        .peers;
    let east_peer = peers.iter().find(|p| p.name == "east").expect("east");
    assert_eq!(east_peer.network, "east-net");
    assert_eq!(east_peer.gateways, [gw_addr.to_string()]);
    let eps = admin
        .list_endpoints(weft_proto::admin::ListEndpointsRequest {
            namespace: "default".into(),
            name: "echo".into(),
            ..Default::default()
        })
        .await
        .expect("endpoints")
        .into_inner()
        .endpoints;
    assert!(
        eps.iter()
            .any(|e| e.cluster == "east" && e.gateways == [gw_addr.to_string()]),
        "{eps:?}"
    );
    // West's view of the endpoint says how it is reached.
    let (_, dump) = get_via(client.admin_addr, "admin", "/config_dump")
        .await
        .expect("config dump");
    assert!(dump.contains(&gw_addr.to_string()), "{dump}");
}
