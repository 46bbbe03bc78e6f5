//! mTLS between sidecars and to the control plane, with real handshakes on loopback.
//!
//! Every sidecar here bootstraps over the control plane's TLS port with a join token, then
//! takes xDS and renews its certificate with its SVID. The "server" workload's endpoint in the
//! world is its sidecar's inbound listener (what iptables would redirect to), and its sidecar
//! forwards to an echo app that records the `x-weft-client-identity` it was handed.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use weft_proto::identity::SignRequest;
use weft_proto::identity::certificate_service_client::CertificateServiceClient;
use weft_sidecar::identity::{ControlPlaneLink, Svid, SvidCell};
use weft_testkit::echo::{Echo, Identity};
use weft_testkit::{ControlPlane, Sidecar, get_via, get_with, metric_sum, world};

const HOST: &str = "echo.default.svc.cluster.local";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";

fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::from([127, 0, net, host])
}

/// The world: namespace `default` in `mode`, Service echo backed by pod echo-0 (running as
/// service account `echo`, meshed) at `endpoint`.
fn world_docs(mode: &str, endpoint: SocketAddr) -> String {
    world::docs(&[
        world::namespace("default", mode),
        world::service("echo", 80),
        world::pod("echo-0", "echo", true),
        world::pod_slice("echo", "echo", &[(endpoint, "echo-0")]),
    ])
}

/// A control plane, an echo app with a server sidecar in front of it, and a client sidecar.
struct Mesh {
    dir: tempfile::TempDir,
    endpoint: SocketAddr,
    cp: ControlPlane,
    echo: Echo,
    server: Sidecar,
    client: Sidecar,
}

async fn mesh(net: u8, mode: &str, server_sa: &str, cert_ttl: Option<Duration>) -> Mesh {
    let endpoint = SocketAddr::new(ip(net, 2), 15006);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("world.yaml"), world_docs(mode, endpoint)).expect("world");
    let cp = weft_testkit::start_control_plane(dir.path())
        .await
        .expect("control plane");
    let bundles = dir.path().join("bundles");
    std::fs::create_dir_all(&bundles).expect("bundle dir");
    let (echo, server, client) = workloads([&cp, &cp], &bundles, net, server_sa, cert_ttl).await;
    Mesh {
        dir,
        endpoint,
        cp,
        echo,
        server,
        client,
    }
}

/// The echo app at 127.0.<net>.10, its server sidecar (identity `server_sa`, inbound at the
/// world's endpoint 127.0.<net>.2:15006) joined to `cps[0]`, and a client sidecar (`client`,
/// 127.0.<net>.1) joined to `cps[1]`; both ready.
async fn workloads(
    cps: [&ControlPlane; 2],
    bundles: &std::path::Path,
    net: u8,
    server_sa: &str,
    cert_ttl: Option<Duration>,
) -> (Echo, Sidecar, Sidecar) {
    let echo = Echo::start(
        SocketAddr::new(ip(net, 10), 0),
        Identity {
            name: "echo-0".into(),
            cluster: "cluster-1".into(),
            zone: String::new(),
        },
    )
    .await
    .expect("echo");
    let mut scfg =
        weft_testkit::mesh_sidecar_config(cps[0], bundles, ip(net, 2), "server", server_sa)
            .await
            .expect("server config");
    scfg.inbound_addr = SocketAddr::new(ip(net, 2), 15006);
    scfg.app_addr = Some(echo.addr);
    let mut ccfg =
        weft_testkit::mesh_sidecar_config(cps[1], bundles, ip(net, 1), "client", "client")
            .await
            .expect("client config");
    if let Some(ttl) = cert_ttl {
        scfg.cert_ttl = ttl;
        ccfg.cert_ttl = ttl;
    }
    let server = Sidecar::start(scfg).await.expect("server sidecar");
    let client = Sidecar::start(ccfg).await.expect("client sidecar");
    weft_testkit::wait_ready(&server, Duration::from_secs(15)).await;
    weft_testkit::wait_ready(&client, Duration::from_secs(15)).await;
    (echo, server, client)
}

fn last_identity(echo: &Echo) -> Option<String> {
    echo.behavior
        .last_client_identity
        .lock()
        .ok()
        .and_then(|g| g.clone())
}

async fn metrics(sc: &Sidecar) -> String {
    get_via(sc.admin_addr, "admin", "/metrics")
        .await
        .expect("metrics")
        .1
}

/// Requests `HOST` through the client sidecar until one answers 200 (config can lag a
/// moment behind readiness on the other sidecar); panics after `patience`.
async fn until_ok(client: &Sidecar, patience: Duration) -> String {
    weft_testkit::until_ok("a 200 through the mesh", patience, || async {
        match get_via(client.outbound_addr, HOST, "/").await {
            Ok((200, body)) => Ok(body),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

#[tokio::test]
async fn two_sidecars_talk_mtls_and_the_app_sees_the_verified_caller() {
    let m = mesh(40, "STRICT", "echo", None).await;
    let body = until_ok(&m.client, Duration::from_secs(10)).await;
    assert!(body.starts_with("echo-0"), "{body}");
    assert_eq!(last_identity(&m.echo).as_deref(), Some(CLIENT_ID));

    // A caller cannot forge its identity: the header is replaced with the verified one.
    let (code, _) = get_with(
        m.client.outbound_addr,
        HOST,
        "/",
        &[(
            weft_proto::keys::CLIENT_IDENTITY_HEADER,
            "spiffe://cluster.local/ns/kube-system/sa/admin",
        )],
    )
    .await
    .expect("request");
    assert_eq!(code, 200);
    assert_eq!(last_identity(&m.echo).as_deref(), Some(CLIENT_ID));

    let page = metrics(&m.server).await;
    assert!(
        metric_sum(
            &page,
            "weft_proxy_inbound_requests_total",
            &["mtls=\"true\""]
        ) >= 2.0,
        "{page}"
    );
    // Both sidecars took their config over the TLS port with their SVID.
    for sc in [&m.client, &m.server] {
        let (_, certs) = get_via(sc.admin_addr, "admin", "/certs")
            .await
            .expect("certs");
        let view: weft_sidecar::admin::CertsView = serde_json::from_str(&certs).expect("json");
        assert_eq!(view.chain.len(), 2, "{certs}");
        assert_eq!(view.trust_bundle.len(), 1, "{certs}");
        assert!(
            view.trust_bundle[0].is_ca && !view.chain[0].is_ca,
            "{certs}"
        );
        assert_eq!(view.chain[0].spiffe_id, view.spiffe_id, "{certs}");
    }
    let (_, certs) = get_via(m.client.admin_addr, "admin", "/certs")
        .await
        .expect("certs");
    assert!(certs.contains(CLIENT_ID), "{certs}");
    assert!(m.cp.metrics.certificates_issued.get() >= 2);
}

#[tokio::test]
async fn strict_refuses_plaintext_and_permissive_serves_both() {
    let m = mesh(41, "STRICT", "echo", None).await;
    until_ok(&m.client, Duration::from_secs(10)).await;

    // STRICT: a plaintext client straight to the inbound listener gets no answer.
    let plain = get_via(m.server.inbound_addr, HOST, "/").await;
    assert!(plain.is_err(), "STRICT served plaintext: {plain:?}");
    let page = metrics(&m.server).await;
    assert!(
        metric_sum(
            &page,
            "weft_proxy_inbound_refused_total",
            &["reason=\"plaintext-in-strict\""]
        ) >= 1.0,
        "{page}"
    );

    // PERMISSIVE (the file changes, the mode reaches the sidecar over xDS): both are served.
    std::fs::write(
        m.dir.path().join("world.yaml"),
        world_docs("PERMISSIVE", m.endpoint),
    )
    .expect("rewrite world");
    weft_testkit::until_ok(
        "PERMISSIVE serves plaintext",
        Duration::from_secs(15),
        || async {
            let forged = [(weft_proto::keys::CLIENT_IDENTITY_HEADER, CLIENT_ID)];
            match get_with(m.server.inbound_addr, HOST, "/", &forged).await {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    // Plaintext carries no identity, and a forged one is removed.
    assert_eq!(last_identity(&m.echo), None);
    assert_eq!(
        until_ok(&m.client, Duration::from_secs(5))
            .await
            .split(' ')
            .next(),
        Some("echo-0")
    );
    assert_eq!(last_identity(&m.echo).as_deref(), Some(CLIENT_ID));
}

#[tokio::test]
async fn a_client_certificate_from_another_root_is_refused() {
    let m = mesh(42, "STRICT", "echo", None).await;
    until_ok(&m.client, Duration::from_secs(10)).await;
    let served = m.echo.served.load(Ordering::Relaxed);

    // A certificate for the right name, signed by a CA the mesh does not trust.
    let other = weft_control_plane::identity::Ca::load_or_generate(None, "cluster.local", "other")
        .expect("other CA");
    let id = weft_proto::SpiffeId::parse(CLIENT_ID).expect("id");
    let (csr, key) = weft_proto::tls::new_csr(CLIENT_ID).expect("csr");
    let signed = other.sign(&csr, &id, None).expect("signed");
    let svid = weft_proto::tls::Svid::from_pem(&signed.chain, &key).expect("svid");
    let roots = weft_proto::tls::roots(&[m.cp.ca.root_pem().to_string()]).expect("roots");
    let config =
        weft_proto::tls::client_config(Some(&svid), roots, &[weft_proto::tls::ALPN_MESH_HTTP1])
            .expect("config");
    let tcp = tokio::net::TcpStream::connect(m.server.inbound_addr)
        .await
        .expect("tcp");
    let name = weft_proto::tls::rustls::pki_types::ServerName::IpAddress(
        m.server.inbound_addr.ip().into(),
    );
    // TLS 1.3: the server's refusal of the client certificate arrives after the client's
    // side of the handshake, so it shows on the first read.
    let outcome = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n").await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    }
    .await;
    match outcome {
        Err(_) => {}
        Ok(bytes) => assert!(
            bytes.is_empty(),
            "answered: {:?}",
            String::from_utf8_lossy(&bytes)
        ),
    }
    assert_eq!(
        m.echo.served.load(Ordering::Relaxed),
        served,
        "the app saw the request"
    );
    weft_testkit::until_ok(
        "the refused handshake is counted",
        Duration::from_secs(5),
        || async {
            let page = metrics(&m.server).await;
            let refused = metric_sum(
                &page,
                "weft_proxy_inbound_refused_total",
                &["reason=\"handshake\""],
            );
            if refused >= 1.0 { Ok(()) } else { Err(page) }
        },
    )
    .await;
}

/// An mTLS client with a valid SVID for `CLIENT_ID` (signed by the mesh's CA, as a caller's
/// sidecar holds), offering `alpn`.
fn mesh_client(m: &Mesh, alpn: &[u8]) -> tokio_rustls::TlsConnector {
    let id = weft_proto::SpiffeId::parse(CLIENT_ID).expect("id");
    let (csr, key) = weft_proto::tls::new_csr(CLIENT_ID).expect("csr");
    let signed = m.cp.ca.sign(&csr, &id, None).expect("signed");
    let svid = weft_proto::tls::Svid::from_pem(&signed.chain, &key).expect("svid");
    let roots = weft_proto::tls::roots(&[m.cp.ca.root_pem().to_string()]).expect("roots");
    let config = weft_proto::tls::client_config(Some(&svid), roots, &[alpn]).expect("config");
    tokio_rustls::TlsConnector::from(config)
}

/// Opens mesh mTLS with `alpn` to the server's inbound, writes `bytes`, and returns what came
/// back before the connection ended (an error when it was cut).
async fn raw_over_mesh_tls(
    m: &Mesh,
    alpn: &[u8],
    bytes: &[u8],
    silent_first: Duration,
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(m.server.inbound_addr).await?;
    let name = weft_proto::tls::rustls::pki_types::ServerName::IpAddress(
        m.server.inbound_addr.ip().into(),
    );
    let mut s = mesh_client(m, alpn).connect(name, tcp).await?;
    tokio::time::sleep(silent_first).await;
    s.write_all(bytes).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    Ok(buf)
}

#[tokio::test]
async fn opaque_tcp_inside_mesh_mtls_never_carries_a_forged_identity_to_the_app() {
    // A meshed caller opens mesh mTLS as opaque TCP (`weft-tcp`) and writes raw HTTP with a
    // forged identity header: copied as bytes, the app would read the header as the
    // verified caller. It is served as HTTP instead: the app sees the verified identity.
    let m = mesh(49, "STRICT", "echo", None).await;
    until_ok(&m.client, Duration::from_secs(10)).await;
    if let Ok(mut seen) = m.echo.behavior.mesh_headers.lock() {
        seen.clear();
    }
    // At once, and after staying silent past the detection time (the caller's own sidecar
    // then sends it as opaque TCP, and the inbound's first read times out too).
    for silent in [Duration::ZERO, Duration::from_millis(600)] {
        if let Ok(mut seen) = m.echo.behavior.mesh_headers.lock() {
            seen.clear();
        }
        let answer = raw_over_mesh_tls(
            &m,
            weft_proto::tls::ALPN_MESH_TCP,
            b"GET / HTTP/1.1\r\nHost: echo\r\nx-weft-client-identity: spiffe://cluster.local/ns/prod/sa/admin\r\nConnection: close\r\n\r\n",
            silent,
        )
        .await
        .expect("answered");
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{silent:?}: {answer:?}"
        );
        let seen = m
            .echo
            .behavior
            .mesh_headers
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        assert_eq!(
            seen,
            vec![("x-weft-client-identity".to_string(), CLIENT_ID.to_string())],
            "{silent:?}"
        );
    }
}

#[tokio::test]
async fn a_peer_with_the_wrong_spiffe_id_is_refused() {
    // The world says echo-0 runs as `echo`; the sidecar in front of it is `impostor`.
    let m = mesh(43, "STRICT", "impostor", None).await;
    let (code, body) = get_via(m.client.outbound_addr, HOST, "/")
        .await
        .expect("request");
    assert_eq!(code, 503, "{body}");
    assert_eq!(m.echo.served.load(Ordering::Relaxed), 0);
    let page = metrics(&m.client).await;
    assert!(
        metric_sum(
            &page,
            "weft_proxy_upstream_tls_failures_total",
            &["reason=\"identity\""]
        ) >= 1.0,
        "{page}"
    );
}

/// Certificates of a few seconds, steady traffic (new connections and pooled ones) through two
/// sidecars across several rotations on both: no request fails.
#[tokio::test]
async fn rotation_under_load_loses_no_request() {
    let m = mesh(44, "STRICT", "echo", Some(Duration::from_secs(4))).await;
    until_ok(&m.client, Duration::from_secs(10)).await;
    let renewals = |page: &str| metric_sum(page, "weft_cert_renewals_total", &[]);
    let before = (
        renewals(&metrics(&m.client).await),
        renewals(&metrics(&m.server).await),
    );
    let (mut ok, mut failed) = (0u64, Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
    // Bounded in time and in count.
    for i in 0..20_000u32 {
        if tokio::time::Instant::now() > deadline {
            break;
        }
        // Half the requests ask the upstream connection to close: a new mTLS handshake each.
        let headers: &[(&str, &str)] = if i % 2 == 0 {
            &[("connection", "close")]
        } else {
            &[]
        };
        match get_with(m.client.outbound_addr, HOST, "/", headers).await {
            Ok((200, _)) => ok += 1,
            other => failed.push(format!("{other:?}")),
        }
    }
    let after = (
        renewals(&metrics(&m.client).await),
        renewals(&metrics(&m.server).await),
    );
    if !failed.is_empty() {
        let page = metrics(&m.server).await;
        let notes: Vec<&str> = page
            .lines()
            .filter(|l| l.contains("refused") || l.contains("connection_errors"))
            .collect();
        panic!(
            "{} failed of {}: {:?}; server: {notes:?}",
            failed.len(),
            ok + failed.len() as u64,
            &failed[..failed.len().min(5)]
        );
    }
    assert!(ok > 100, "too little traffic to judge: {ok}");
    assert!(
        after.0 - before.0 >= 3.0,
        "client renewed {} times",
        after.0 - before.0
    );
    assert!(
        after.1 - before.1 >= 3.0,
        "server renewed {} times",
        after.1 - before.1
    );
}

/// Two control planes with different roots: their workloads cannot talk until each CA hands
/// out a bundle with both roots (`trust-bundle.pem`); then, without a restart, they can.
#[tokio::test]
async fn overlapping_roots_rotate_without_a_restart() {
    let net = 45;
    let endpoint = SocketAddr::new(ip(net, 2), 15006);
    let dir = tempfile::tempdir().expect("tempdir");
    let (world_dir, ca_a, ca_b, bundles) = (
        dir.path().join("world"),
        dir.path().join("ca-a"),
        dir.path().join("ca-b"),
        dir.path().join("bundles"),
    );
    for d in [&world_dir, &bundles] {
        std::fs::create_dir_all(d).expect("dir");
    }
    std::fs::write(world_dir.join("world.yaml"), world_docs("STRICT", endpoint)).expect("world");
    let start = |ca: std::path::PathBuf| {
        let mut cfg = weft_control_plane::Config::local(&world_dir);
        cfg.ca_dir = Some(ca);
        ControlPlane::start(cfg)
    };
    let cp_a = start(ca_a.clone()).await.expect("control plane A");
    let cp_b = start(ca_b.clone()).await.expect("control plane B");
    let (echo, server, client) = workloads(
        [&cp_a, &cp_b],
        &bundles,
        net,
        "echo",
        Some(Duration::from_secs(4)),
    )
    .await;

    // Different roots: refused.
    let (code, _) = get_via(client.outbound_addr, HOST, "/")
        .await
        .expect("request");
    assert_ne!(code, 200);
    assert_eq!(echo.served.load(Ordering::Relaxed), 0);

    // Each CA now hands out both roots; workloads pick them up at their next renewal.
    let root = |d: &std::path::Path| std::fs::read_to_string(d.join("root.pem")).expect("root");
    let bundle = weft_control_plane::identity::TRUST_BUNDLE_FILE;
    std::fs::write(ca_a.join(bundle), root(&ca_b)).expect("bundle A");
    std::fs::write(ca_b.join(bundle), root(&ca_a)).expect("bundle B");
    let body = until_ok(&client, Duration::from_secs(20)).await;
    assert!(body.starts_with("echo-0"), "{body}");
    assert_eq!(last_identity(&echo).as_deref(), Some(CLIENT_ID));
    for sc in [&client, &server] {
        let (_, certs) = get_via(sc.admin_addr, "admin", "/certs")
            .await
            .expect("certs");
        let view: weft_sidecar::admin::CertsView = serde_json::from_str(&certs).expect("json");
        assert_eq!(view.trust_bundle.len(), 2, "{certs}");
    }
}

/// The control plane's TLS port: xDS needs an SVID; a join token gets one; the SVID then
/// renews itself without a token; a token-less, certificate-less caller and a caller that
/// does not trust the mesh root get nothing.
#[tokio::test]
async fn the_control_plane_tls_port_authenticates_its_callers() {
    let (_dir, cp) = weft_testkit::control_plane_over(&[world::service("echo", 80)]).await;
    let root = vec![cp.ca.root_pem().to_string()];
    let td = "cluster.local";
    let anonymous = ControlPlaneLink::tls(cp.grpc_addr, &root, SvidCell::default()).expect("link");
    let channel = anonymous.channel(false).await.expect("TLS channel");

    // xDS without a client certificate: UNAUTHENTICATED, with the reason.
    let mut ads = weft_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::new(channel.clone());
    let req_for =
        |id: &str| weft_proto::envoy::envoy::service::discovery::v3::DeltaDiscoveryRequest {
            node: Some(weft_proto::envoy::envoy::config::core::v3::Node {
                id: id.into(),
                ..Default::default()
            }),
            type_url: weft_proto::type_url::CLUSTER.into(),
            ..Default::default()
        };
    let req = req_for("anon");
    let err = ads
        .delta_aggregated_resources(tokio_stream::iter(vec![req.clone()]))
        .await
        .expect_err("xDS without a certificate");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("no client certificate"), "{err:?}");

    // No token, no certificate: refused. With a token: an SVID.
    let mut certs = CertificateServiceClient::new(channel);
    let (csr, key) = weft_proto::tls::new_csr(CLIENT_ID).expect("csr");
    let refused = certs
        .sign(SignRequest {
            csr_pem: csr.clone(),
            token: String::new(),
            requested_ttl_seconds: 0,
            node_id: String::new(),
        })
        .await
        .expect_err("no credential");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let token = weft_testkit::mint_token(&cp, "default", "client")
        .await
        .expect("token");
    let signed = certs
        .sign(SignRequest {
            csr_pem: csr,
            token,
            requested_ttl_seconds: 0,
            node_id: String::new(),
        })
        .await
        .expect("signed with the token")
        .into_inner();
    let svid = Svid::new(
        signed.cert_chain_pem,
        signed.trust_bundle_pem,
        &key,
        signed.spiffe_id,
        signed.expires_at_unix,
    )
    .expect("svid");
    let cell = SvidCell::default();
    cell.store(Some(std::sync::Arc::new(svid)));
    let link = ControlPlaneLink::tls(cp.grpc_addr, &root, cell).expect("link");
    let channel = link.channel(true).await.expect("mTLS channel");

    // With the SVID: xDS answers, and a renewal needs no token.
    let mut ads = weft_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::new(channel.clone());
    let mut stream = ads
        .delta_aggregated_resources(tokio_stream::StreamExt::chain(
            tokio_stream::iter(vec![req]),
            tokio_stream::pending(),
        ))
        .await
        .expect("xDS with an SVID")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("in time")
        .expect("a response")
        .expect("not closed");
    assert!(!first.resources.is_empty());
    let (csr, _) = weft_proto::tls::new_csr(CLIENT_ID).expect("csr");
    let renewed = CertificateServiceClient::new(channel.clone())
        .sign(SignRequest {
            csr_pem: csr,
            token: String::new(),
            requested_ttl_seconds: 0,
            node_id: String::new(),
        })
        .await
        .expect("renewed by SVID")
        .into_inner();
    assert_eq!(renewed.spiffe_id, CLIENT_ID);
    // A workload may not mint tokens, nor read the mesh through admin; it reads only the
    // config of the proxy its own certificate connected.
    let mut admin = weft_proto::admin::admin_client::AdminClient::new(channel);
    let mint = admin
        .create_join_token(weft_proto::admin::CreateJoinTokenRequest {
            namespace: "default".into(),
            service_account: "other".into(),
            ttl_seconds: 60,
        })
        .await
        .expect_err("workload minting");
    assert_eq!(mint.code(), tonic::Code::PermissionDenied);
    assert!(mint.message().contains("operator credentials"), "{mint:?}");
    let list = admin
        .list_proxies(weft_proto::admin::ListProxiesRequest::default())
        .await
        .expect_err("workload listing the mesh");
    assert_eq!(list.code(), tonic::Code::PermissionDenied, "{list:?}");
    let ask = |node: &str| weft_proto::admin::GetProxyConfigRequest {
        node_id: node.into(),
        local_only: false,
    };
    let own = admin
        .get_proxy_config(ask("anon"))
        .await
        .expect("its own proxy's config")
        .into_inner();
    assert!(!own.resources.is_empty());
    // Another proxy's config: a stream opened without this certificate (plaintext ADS).
    let mut other_ads = weft_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::connect(format!("http://{}", cp.plaintext()))
        .await
        .expect("plaintext ADS");
    let mut other_req = req_for("someone-else");
    other_req.type_url = weft_proto::type_url::CLUSTER.into();
    let _other = other_ads
        .delta_aggregated_resources(tokio_stream::StreamExt::chain(
            tokio_stream::iter(vec![other_req]),
            tokio_stream::pending(),
        ))
        .await
        .expect("plaintext stream");
    weft_testkit::eventually("the other proxy connected", Duration::from_secs(5), || {
        cp.metrics.connected_proxies.get() >= 2
    })
    .await;
    let theirs = admin
        .get_proxy_config(ask("someone-else"))
        .await
        .expect_err("another proxy's config");
    assert_eq!(theirs.code(), tonic::Code::PermissionDenied, "{theirs:?}");
    // An operator reads it.
    let mut operator = weft_testkit::operator_admin(&cp).await.expect("operator");
    let seen = operator
        .get_proxy_config(ask("someone-else"))
        .await
        .expect("operator reads any proxy");
    assert!(seen.into_inner().proxy.is_some());
    // The mTLS proxy is who its certificate says, whatever its node metadata claimed.
    let anon = operator
        .get_proxy_config(ask("anon"))
        .await
        .expect("anon's config")
        .into_inner()
        .proxy
        .expect("status");
    assert_eq!(
        (anon.namespace.as_str(), anon.service_account.as_str()),
        ("default", "client")
    );

    // A caller that trusts another root does not get through the handshake.
    let other = weft_control_plane::identity::Ca::load_or_generate(None, td, "other").expect("CA");
    let stranger = ControlPlaneLink::tls(
        cp.grpc_addr,
        &[other.root_pem().to_string()],
        SvidCell::default(),
    )
    .expect("link");
    assert!(stranger.channel(false).await.is_err());
    weft_testkit::eventually(
        "the refused handshake is counted",
        Duration::from_secs(5),
        || cp.metrics.tls_handshake_failures.get() >= 1,
    )
    .await;
}

/// The plaintext port serves ADS and nothing else: no certificate, no join token, no admin,
/// no load report there, whatever the caller has.
#[tokio::test]
async fn the_plaintext_port_serves_config_only() {
    let (_dir, cp) = weft_testkit::control_plane_over(&[world::service("echo", 80)]).await;
    let url = format!("http://{}", cp.plaintext());
    let token = weft_testkit::mint_token(&cp, "default", "client")
        .await
        .expect("token over TLS");
    let (csr, _) = weft_proto::tls::new_csr(CLIENT_ID).expect("csr");
    let sign = CertificateServiceClient::connect(url.clone())
        .await
        .expect("plaintext connect")
        .sign(SignRequest {
            csr_pem: csr,
            token,
            requested_ttl_seconds: 0,
            node_id: String::new(),
        })
        .await
        .expect_err("a certificate over plaintext");
    assert_eq!(sign.code(), tonic::Code::Unimplemented, "{sign:?}");
    let mint = weft_proto::admin::admin_client::AdminClient::connect(url.clone())
        .await
        .expect("plaintext connect")
        .create_join_token(weft_proto::admin::CreateJoinTokenRequest {
            namespace: "weft-system".into(),
            service_account: "weft-control-plane".into(),
            ttl_seconds: 10 * 365 * 24 * 3600,
        })
        .await
        .expect_err("a token over plaintext");
    assert_eq!(mint.code(), tonic::Code::Unimplemented, "{mint:?}");
    let list = weft_proto::admin::admin_client::AdminClient::connect(url.clone())
        .await
        .expect("plaintext connect")
        .list_proxies(weft_proto::admin::ListProxiesRequest::default())
        .await
        .expect_err("admin over plaintext");
    assert_eq!(list.code(), tonic::Code::Unimplemented, "{list:?}");
    use weft_proto::envoy::envoy::service::load_stats::v3::load_reporting_service_client::LoadReportingServiceClient;
    let lrs = LoadReportingServiceClient::connect(url)
        .await
        .expect("plaintext connect")
        .stream_load_stats(tokio_stream::iter(vec![
            weft_proto::envoy::envoy::service::load_stats::v3::LoadStatsRequest::default(),
        ]))
        .await
        .expect_err("load reports over plaintext");
    assert_eq!(lrs.code(), tonic::Code::Unimplemented, "{lrs:?}");
    // A non-loopback plaintext address needs the explicitly insecure flag.
    let mut cfg = weft_control_plane::Config::local("/nonexistent");
    cfg.xds_plaintext_addr = Some("0.0.0.0:0".parse().expect("addr"));
    let refused = cfg.validate().expect_err("plaintext on every address");
    assert!(
        refused
            .to_string()
            .contains("--insecure-xds-plaintext-any-addr"),
        "{refused}"
    );
}

/// The TLS port caps each connection's concurrent HTTP/2 streams in its SETTINGS (the
/// plaintext port too), so one client cannot open unbounded streams.
#[tokio::test]
async fn the_control_plane_ports_advertise_a_stream_limit() {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
    async fn first_settings<S: AsyncRead + AsyncWriteExt + Unpin>(s: &mut S) -> Option<u32> {
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .expect("preface");
        let mut head = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
            .await
            .expect("in time")
            .expect("frame head");
        assert_eq!(head[3], 4, "the server's first frame is SETTINGS");
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.expect("payload");
        payload.chunks(6).find_map(|p| {
            (p.len() == 6 && p[..2] == [0, 3]).then(|| u32::from_be_bytes([p[2], p[3], p[4], p[5]]))
        })
    }
    let (_dir, cp) = weft_testkit::control_plane_over(&[world::service("echo", 80)]).await;
    let roots = weft_proto::tls::roots(&[cp.ca.root_pem().to_string()]).expect("roots");
    let config = weft_proto::tls::client_config(None, roots, &[weft_proto::tls::ALPN_H2])
        .expect("client config");
    let tcp = tokio::net::TcpStream::connect(cp.grpc_addr)
        .await
        .expect("connect");
    let name = weft_proto::tls::rustls::pki_types::ServerName::try_from("weft-control-plane")
        .expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("handshake");
    let want = Some(weft_control_plane::grpc_tls::MAX_CONCURRENT_STREAMS);
    assert_eq!(first_settings(&mut tls).await, want, "TLS port");
    let mut plain = tokio::net::TcpStream::connect(cp.plaintext())
        .await
        .expect("connect");
    assert_eq!(first_settings(&mut plain).await, want, "plaintext port");
}

/// A sidecar recognises its control plane by the name only the CA puts on the control
/// plane's own certificate: a server with a certificate from the same CA for the control
/// plane's very SPIFFE ID, but without that name (what any path that issues by SPIFFE ID
/// could produce), is refused before the sidecar sends a byte (its join token among them).
#[tokio::test]
async fn a_sidecar_refuses_a_server_that_only_claims_the_control_planes_spiffe_id() {
    let (_dir, cp) = weft_testkit::control_plane_over(&[world::service("echo", 80)]).await;
    let cp_id = "spiffe://cluster.local/ns/weft-system/sa/weft-control-plane";
    let (csr, key) = weft_proto::tls::new_csr(cp_id).expect("csr");
    let signed = cp
        .ca
        .sign(&csr, &weft_proto::SpiffeId::parse(cp_id).expect("id"), None)
        .expect("signed");
    let svid = weft_proto::tls::Svid::from_pem(&signed.chain, &key).expect("svid");
    let roots = weft_proto::tls::roots(&signed.trust_bundle).expect("roots");
    let config = weft_proto::tls::server_config(
        &svid,
        roots,
        weft_proto::tls::ClientAuth::Optional,
        &[weft_proto::tls::ALPN_H2],
    )
    .expect("server config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let fake = listener.local_addr().expect("addr");
    let handshakes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = handshakes.clone();
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                seen.fetch_add(1, Ordering::SeqCst);
                // Any HTTP/2 server: a client that took this for its control plane connects.
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Empty::<bytes::Bytes>::new(),
                    ))
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
            });
        }
    });
    let link = ControlPlaneLink::tls(fake, &[cp.ca.root_pem().to_string()], SvidCell::default())
        .expect("link");
    let err = link
        .channel(false)
        .await
        .expect_err("a server without the control plane's name");
    let text = weft_proto::logging::error_chain(err.as_ref());
    assert!(text.contains("not a control plane"), "{text}");
    weft_testkit::eventually(
        "the TLS handshake itself succeeded",
        Duration::from_secs(5),
        || handshakes.load(Ordering::SeqCst) == 1,
    )
    .await;
    // The real one passes the same check.
    let real = ControlPlaneLink::tls(
        cp.grpc_addr,
        &[cp.ca.root_pem().to_string()],
        SvidCell::default(),
    )
    .expect("link");
    real.channel(false).await.expect("the control plane itself");
    // A sidecar of another cluster (`--cluster`) does not take it for its own.
    let elsewhere = ControlPlaneLink::tls(
        cp.grpc_addr,
        &[cp.ca.root_pem().to_string()],
        SvidCell::default(),
    )
    .expect("link")
    .for_cluster("other");
    let err = elsewhere
        .channel(false)
        .await
        .expect_err("another cluster's control plane");
    let text = weft_proto::logging::error_chain(err.as_ref());
    assert!(text.contains("not \"other\""), "{text}");
    server.abort();
}

/// gRPC (an HTTP/2-only endpoint: `appProtocol: grpc`) to a meshed endpoint: the client's
/// sidecar originates mTLS offering the mesh's HTTP/2 ALPN, the server's sidecar terminates
/// it, serves HTTP/2 and forwards to the app with prior knowledge, with the verified caller.
#[tokio::test]
async fn grpc_to_a_meshed_endpoint_is_http2_inside_mtls() {
    let net = 47;
    let endpoint = SocketAddr::new(ip(net, 2), 15006);
    let dir = tempfile::tempdir().expect("tempdir");
    let world = world::docs(&[
        world::namespace("default", "STRICT"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: default}\nspec:\n  ports: [{name: grpc, port: 80, appProtocol: grpc}]\n".to_string(),
        world::pod("echo-0", "echo", true),
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo\n  namespace: default\n  labels: {{kubernetes.io/service-name: echo}}\naddressType: IPv4\nports: [{{name: grpc, port: {}}}]\nendpoints:\n- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: echo-0, namespace: default}}\n",
            endpoint.port(),
            endpoint.ip()
        ),
    ]);
    std::fs::write(dir.path().join("world.yaml"), world).expect("world");
    let cp = weft_testkit::start_control_plane(dir.path())
        .await
        .expect("control plane");
    let bundles = dir.path().join("bundles");
    std::fs::create_dir_all(&bundles).expect("bundle dir");
    let (echo, server, client) = workloads([&cp, &cp], &bundles, net, "echo", None).await;
    let body = until_ok(&client, Duration::from_secs(10)).await;
    assert!(body.starts_with("echo-0"), "{body}");
    let version = echo
        .behavior
        .last_version
        .lock()
        .ok()
        .and_then(|v| v.clone());
    assert_eq!(version.as_deref(), Some("HTTP/2.0"), "the app got HTTP/2");
    assert_eq!(last_identity(&echo).as_deref(), Some(CLIENT_ID));
    // STRICT: the request could only have come over mesh mTLS.
    let page = metrics(&server).await;
    assert!(
        metric_sum(
            &page,
            "weft_proxy_inbound_requests_total",
            &["mtls=\"true\""]
        ) >= 1.0,
        "{page}"
    );
    // Several requests share one HTTP/2 connection; all succeed.
    for _ in 0..5 {
        let (code, _) = get_via(client.outbound_addr, HOST, "/")
            .await
            .expect("request");
        assert_eq!(code, 200);
    }
    drop(cp);
}

/// Over mTLS too, a caller's own mesh-owned headers — any spelling — never reach the app:
/// the only one it sees is the identity the handshake verified.
#[tokio::test]
async fn a_meshed_callers_own_identity_headers_are_replaced_by_the_verified_one() {
    let m = mesh(48, "STRICT", "echo", None).await;
    until_ok(&m.client, Duration::from_secs(10)).await;
    if let Ok(mut seen) = m.echo.behavior.mesh_headers.lock() {
        seen.clear();
    }
    let forged = "spiffe://cluster.local/ns/prod/sa/admin";
    let (status, _) = get_with(
        m.client.outbound_addr,
        HOST,
        "/",
        &[
            ("x-weft-client-identity", forged),
            ("x_weft_client_identity", forged),
            ("X_Weft-Client_Identity", forged),
        ],
    )
    .await
    .expect("request");
    assert_eq!(status, 200);
    let seen = m
        .echo
        .behavior
        .mesh_headers
        .lock()
        .map(|g| g.clone())
        .unwrap_or_default();
    assert_eq!(
        seen,
        vec![("x-weft-client-identity".to_string(), CLIENT_ID.to_string())]
    );
}

/// A WebSocket app on `addr`: answers the upgrade with 101 (the RFC 6455 accept key), then
/// echoes every byte; records the identity header of the handshake.
async fn websocket_app(
    addr: SocketAddr,
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Option<String>>>) {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |mut req: hyper::Request<hyper::body::Incoming>| {
                        let record = record.clone();
                        async move {
                            if let Ok(mut r) = record.lock() {
                                *r = req
                                    .headers()
                                    .get("x-weft-client-identity")
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_string);
                            }
                            let key = req
                                .headers()
                                .get("sec-websocket-key")
                                .map(|v| v.as_bytes().to_vec())
                                .unwrap_or_default();
                            let mut input = key;
                            input.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
                            let digest = ring::digest::digest(
                                &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
                                &input,
                            );
                            let accept = base64::Engine::encode(
                                &base64::engine::general_purpose::STANDARD,
                                digest.as_ref(),
                            );
                            let on = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                if let Ok(up) = on.await {
                                    let mut io = hyper_util::rt::TokioIo::new(up);
                                    let (mut r, mut w) = tokio::io::split(&mut io);
                                    let _ = tokio::io::copy(&mut r, &mut w).await;
                                }
                            });
                            let resp = hyper::Response::builder()
                                .status(101)
                                .header("connection", "upgrade")
                                .header("upgrade", "websocket")
                                .header("sec-websocket-accept", accept)
                                .body(http_body_util::Empty::<bytes::Bytes>::new())
                                .expect("101");
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, seen)
}

/// WebSocket through the mesh, in a STRICT namespace: an unmodified client's upgrade crosses
/// both sidecars over mTLS, the app sees the verified caller on the handshake, and bytes then
/// flow both ways over the upgraded connection.
#[tokio::test]
async fn websocket_crosses_both_sidecars_over_mtls() {
    let net = 49;
    let endpoint = SocketAddr::new(ip(net, 2), 15006);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("world.yaml"),
        world_docs("STRICT", endpoint),
    )
    .expect("world");
    let cp = weft_testkit::start_control_plane(dir.path())
        .await
        .expect("control plane");
    let (app, seen) = websocket_app(SocketAddr::new(ip(net, 10), 0)).await;
    let mut scfg = weft_testkit::mesh_sidecar_config(&cp, dir.path(), ip(net, 2), "server", "echo")
        .await
        .expect("server config");
    scfg.inbound_addr = endpoint;
    scfg.app_addr = Some(app);
    let ccfg = weft_testkit::mesh_sidecar_config(&cp, dir.path(), ip(net, 1), "client", "client")
        .await
        .expect("client config");
    let server = Sidecar::start(scfg).await.expect("server sidecar");
    let client = Sidecar::start(ccfg).await.expect("client sidecar");
    weft_testkit::wait_ready(&server, Duration::from_secs(15)).await;
    weft_testkit::wait_ready(&client, Duration::from_secs(15)).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(client.outbound_addr)
        .await
        .expect("connect");
    s.write_all(
        format!("GET /chat HTTP/1.1\r\nhost: {HOST}\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").as_bytes(),
    )
    .await
    .expect("handshake");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("a response head")
            .expect("read");
        assert_eq!(
            n,
            1,
            "closed before the head ended: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert_eq!(
        seen.lock().ok().and_then(|g| g.clone()).as_deref(),
        Some(CLIENT_ID),
        "the app saw the verified caller on the handshake"
    );
    for msg in [&b"\x81\x05hello"[..], b"\x81\x05again"] {
        s.write_all(msg).await.expect("frame");
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .expect("echoed in time")
            .expect("read");
        assert_eq!(back, msg);
    }
}
