//! The sidecar on real traffic: a real control plane over a file source, echo upstreams on
//! their own 127.x addresses, and HTTP requests sent through the sidecar's outbound listener
//! in explicit mode.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use weft_testkit::echo::{Echo, Identity};
use weft_testkit::{get_via, world};

const PATIENCE: Duration = Duration::from_secs(10);

/// An echo on `ip`, port 18080: every endpoint of a slice shares its port, as pods do.
async fn echo(ip: &str, name: &str, zone: &str) -> Echo {
    Echo::pod(ip, name, zone).await
}

/// Sends `n` requests to `host` through `proxy` and counts answers by the echo's name.
async fn tally(proxy: SocketAddr, host: &str, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let (status, body) = get_via(proxy, host, "/").await.expect("request");
        let key = if status == 200 {
            body.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        } else {
            format!("status {status}: {body}")
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

async fn ready(sidecar: &weft_testkit::Sidecar) {
    let mut ready = sidecar.xds.ready.clone();
    tokio::time::timeout(PATIENCE, ready.wait_for(|r| *r))
        .await
        .expect("sidecar ready in time")
        .expect("alive");
}

#[tokio::test]
async fn split_90_10_through_the_sidecar() {
    let v1 = echo("127.0.2.1", "v1", "a").await;
    let v2 = echo("127.0.2.2", "v2", "a").await;
    let (_dir, cp) = weft_testkit::control_plane_over(&[
        world::service("echo", 80),
        world::service("echo-v1", 80),
        world::service("echo-v2", 80),
        world::slice("echo-v1", "echo-v1", &[(v1.addr, "n1", true)]),
        world::slice("echo-v2", "echo-v2", &[(v2.addr, "n1", true)]),
        world::split("echo", "echo", &[("echo-v1", 90), ("echo-v2", 10)]),
    ])
    .await;
    let sc = weft_testkit::start_sidecar(
        cp.plaintext(),
        "127.0.2.100".parse().expect("ip"),
        "client",
        "a",
    )
    .await
    .expect("sidecar");
    ready(&sc).await;
    let n = 2000;
    let counts = tally(sc.outbound_addr, "echo.default.svc.cluster.local", n).await;
    let v2 = counts.get("v2").copied().unwrap_or(0) as f64;
    assert_eq!(
        counts.get("v1").copied().unwrap_or(0) + v2 as usize,
        n,
        "every request answered: {counts:?}"
    );
    // 5 standard deviations of a binomial(2000, 0.1): 5 * sqrt(180) ≈ 67.
    assert!((v2 - 200.0).abs() <= 67.0, "v2 got {v2} of {n}: {counts:?}");
    // Short host forms resolve too.
    let (status, _) = get_via(sc.outbound_addr, "echo-v2.default:80", "/")
        .await
        .expect("req");
    assert_eq!(status, 200);
    // An unknown host is refused with a reason.
    let (status, body) = get_via(sc.outbound_addr, "nope.default.svc.cluster.local", "/")
        .await
        .expect("req");
    assert_eq!(status, 404);
    assert!(body.contains("no mesh service"), "{body}");
}

#[tokio::test]
async fn locality_preference_failover_and_control_plane_loss() {
    let a1 = echo("127.0.3.1", "a1", "a").await;
    let a2 = echo("127.0.3.2", "a2", "a").await;
    let b1 = echo("127.0.3.3", "b1", "b").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |a_ready: bool| {
        world::docs(&[
            world::service("echo", 80),
            world::node("na", "r1", "a"),
            world::node("nb", "r1", "b"),
            world::slice(
                "echo",
                "echo",
                &[
                    (a1.addr, "na", a_ready),
                    (a2.addr, "na", a_ready),
                    (b1.addr, "nb", true),
                ],
            ),
        ])
    };
    std::fs::write(dir.path().join("world.yaml"), write(true)).expect("write");
    let cp = weft_testkit::start_control_plane(dir.path())
        .await
        .expect("control plane");
    let sc = weft_testkit::start_sidecar(
        cp.plaintext(),
        "127.0.3.100".parse().expect("ip"),
        "client-a",
        "a",
    )
    .await
    .expect("sidecar");
    ready(&sc).await;
    // In-zone while the zone is healthy.
    let counts = tally(sc.outbound_addr, "echo", 200).await;
    assert_eq!(
        counts.get("b1"),
        None,
        "no traffic leaves zone a: {counts:?}"
    );
    assert_eq!(
        counts.get("a1").copied().unwrap_or(0) + counts.get("a2").copied().unwrap_or(0),
        200,
        "{counts:?}"
    );

    // Zone a's endpoints become unready: traffic fails over to zone b.
    std::fs::write(dir.path().join("world.yaml"), write(false)).expect("write");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let counts = tally(sc.outbound_addr, "echo", 20).await;
        if counts.get("b1") == Some(&20) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failover: {counts:?}"
        );
    }

    // The control plane goes away: the sidecar keeps serving its last config.
    drop(cp);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = tally(sc.outbound_addr, "echo", 50).await;
    assert_eq!(counts.get("b1"), Some(&50), "{counts:?}");
}

#[tokio::test]
async fn ring_hash_keeps_a_client_on_one_endpoint() {
    let pods = [
        echo("127.0.4.1", "p1", "a").await,
        echo("127.0.4.2", "p2", "a").await,
        echo("127.0.4.3", "p3", "a").await,
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let eps: Vec<(SocketAddr, &str, bool)> = pods.iter().map(|p| (p.addr, "n1", true)).collect();
    std::fs::write(
        dir.path().join("world.yaml"),
        world::docs(&[
            world::service("echo", 80),
            world::slice("echo", "echo", &eps),
            "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: echo, namespace: default}\nspec:\n  targetRef: {kind: Service, name: echo}\n  loadBalancer: {algorithm: RingHash, hash: {header: x-user}}\n".to_string(),
        ]),
    )
    .expect("write");
    let cp = weft_testkit::start_control_plane(dir.path())
        .await
        .expect("control plane");
    let sc = weft_testkit::start_sidecar(
        cp.plaintext(),
        "127.0.4.100".parse().expect("ip"),
        "client",
        "a",
    )
    .await
    .expect("sidecar");
    ready(&sc).await;
    let mut owners = HashMap::new();
    for user in 0..30 {
        let user = format!("user-{user}");
        let mut seen = HashMap::new();
        for _ in 0..10 {
            let (status, body) =
                weft_testkit::get_with(sc.outbound_addr, "echo", "/", &[("x-user", &user)])
                    .await
                    .expect("request");
            assert_eq!(status, 200, "{body}");
            *seen
                .entry(
                    body.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                )
                .or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 1, "{user} must stick to one endpoint: {seen:?}");
        let owner = seen.into_keys().next().unwrap_or_default();
        *owners.entry(owner).or_insert(0) += 1;
    }
    assert!(
        owners.len() >= 2,
        "different users spread over endpoints: {owners:?}"
    );
}

#[tokio::test]
async fn killing_in_zone_endpoints_fails_over_with_no_failed_request() {
    let a1 = echo("127.0.6.1", "a1", "a").await;
    let a2 = echo("127.0.6.2", "a2", "a").await;
    let b1 = echo("127.0.6.3", "b1", "b").await;
    let (_dir, cp) = weft_testkit::control_plane_over(&[
        world::service("echo", 80),
        world::node("na", "r1", "a"),
        world::node("nb", "r1", "b"),
        world::slice(
            "echo",
            "echo",
            &[
                (a1.addr, "na", true),
                (a2.addr, "na", true),
                (b1.addr, "nb", true),
            ],
        ),
    ])
    .await;
    let sc = weft_testkit::start_sidecar(
        cp.plaintext(),
        "127.0.6.100".parse().expect("ip"),
        "client-a",
        "a",
    )
    .await
    .expect("sidecar");
    ready(&sc).await;
    let before = tally(sc.outbound_addr, "echo", 50).await;
    assert_eq!(before.get("b1"), None, "{before:?}");
    // Kill both zone-a pods; the control plane is not told.
    drop(a1);
    drop(a2);
    let after = tally(sc.outbound_addr, "echo", 200).await;
    assert_eq!(
        after.get("b1"),
        Some(&200),
        "every request answered, by zone b: {after:?}"
    );
    drop(b1);
}

#[tokio::test]
async fn both_xds_flavours_configure_the_sidecar() {
    let pod = echo("127.0.10.201", "pod", "a").await;
    let (_dir, cp) = weft_testkit::control_plane_over(&[
        world::service("echo", 80),
        world::slice("echo", "echo", &[(pod.addr, "n1", true)]),
    ])
    .await;
    let mut sidecars = Vec::new();
    for (i, protocol) in [
        weft_sidecar::config::XdsProtocol::Delta,
        weft_sidecar::config::XdsProtocol::Sotw,
    ]
    .into_iter()
    .enumerate()
    {
        let ip = format!("127.0.10.{}", 210 + i).parse().expect("ip");
        let mut cfg =
            weft_sidecar::RunConfig::local(cp.plaintext(), ip, &format!("proxy-{protocol:?}"));
        cfg.xds_protocol = protocol;
        let sc = weft_sidecar::Sidecar::start(cfg).await.expect("sidecar");
        ready(&sc).await;
        let (status, body) = get_via(sc.outbound_addr, "echo", "/")
            .await
            .expect("request");
        assert_eq!(
            (status, body.split_whitespace().next()),
            (200, Some("pod")),
            "{protocol:?}"
        );
        sidecars.push(sc);
    }
    let mut admin = weft_testkit::operator_admin(&cp).await.expect("admin");
    let proxies = admin
        .list_proxies(weft_proto::admin::ListProxiesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .proxies;
    let protocol_of = |id: &str| {
        proxies
            .iter()
            .find(|p| p.node_id == id)
            .map(|p| p.protocol.clone())
    };
    assert_eq!(protocol_of("proxy-Delta").as_deref(), Some("delta"));
    assert_eq!(protocol_of("proxy-Sotw").as_deref(), Some("sotw"));
    for p in &proxies {
        for t in &p.types {
            assert_eq!(
                t.state(),
                weft_proto::admin::SyncState::Synced,
                "{} {}",
                p.node_id,
                t.type_url
            );
        }
    }
}

#[tokio::test]
async fn requests_keep_succeeding_for_30s_without_the_control_plane() {
    let pod = echo("127.0.11.1", "pod", "a").await;
    let (_dir, cp) = weft_testkit::control_plane_over(&[
        world::service("echo", 80),
        world::slice("echo", "echo", &[(pod.addr, "n1", true)]),
    ])
    .await;
    let sc = weft_testkit::start_sidecar(
        cp.plaintext(),
        "127.0.11.100".parse().expect("ip"),
        "client",
        "a",
    )
    .await
    .expect("sidecar");
    ready(&sc).await;
    drop(cp);
    // Bounded: 150 requests, one every 200 ms, for 30 s.
    for i in 0..150 {
        let (status, body) = get_via(sc.outbound_addr, "echo", "/")
            .await
            .expect("request");
        assert_eq!(status, 200, "request {i} at {}ms: {body}", i * 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A control plane that refuses every stream (it accepts and hangs up at once) after the
/// sidecar held a full config: reconnects back off exponentially instead of hammering it.
/// (Before, the attempt counter reset after every sleep once all four types were held: one
/// attempt about every 150 ms, ~80 in 12 s.) Bounded: 12 s of counting.
#[tokio::test]
async fn reconnects_to_a_refusing_control_plane_back_off() {
    let pod = echo("127.0.11.2", "pod", "a").await;
    let (_dir, cp) = weft_testkit::control_plane_over(&[
        world::service("echo", 80),
        world::slice("echo", "echo", &[(pod.addr, "n1", true)]),
    ])
    .await;
    let xds = cp.plaintext();
    let sc = weft_testkit::start_sidecar(xds, "127.0.11.101".parse().expect("ip"), "client", "a")
        .await
        .expect("sidecar");
    ready(&sc).await;
    drop(cp);
    // The refusing server takes the control plane's port as soon as it is free.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let listener = loop {
        match tokio::net::TcpListener::bind(xds).await {
            Ok(l) => break l,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("rebinding {xds}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    // One attempt may open two connections back to back (tonic's channel redials once when
    // its fresh connection dies under the first call): connections within 50 ms of the
    // previous one count as the same attempt.
    let mut attempts = 0u32;
    let mut last: Option<tokio::time::Instant> = None;
    let counting = tokio::time::sleep(Duration::from_secs(12));
    tokio::pin!(counting);
    loop {
        tokio::select! {
            _ = &mut counting => break,
            conn = listener.accept() => {
                if let Ok((c, _)) = conn {
                    let now = tokio::time::Instant::now();
                    if last.is_none_or(|l| now.duration_since(l) > Duration::from_millis(50)) {
                        attempts += 1;
                    }
                    last = Some(now);
                    drop(c);
                }
            }
        }
    }
    assert!(
        (3..=12).contains(&attempts),
        "{attempts} reconnect attempts in 12 s (want a few, backing off: at most 12)"
    );
    // Meanwhile the last accepted config still serves.
    let (status, _) = get_via(sc.outbound_addr, "echo", "/")
        .await
        .expect("request");
    assert_eq!(status, 200);
}

/// A route the sidecar cannot apply (a regular-expression path, which it does not support yet)
/// is NACKed with a message naming the resource, the control plane records it, and the
/// previous config keeps serving.
#[tokio::test]
async fn unsupported_route_is_nacked_and_the_previous_config_serves() {
    let pod = echo("127.0.13.1", "pod", "a").await;
    let base = vec![
        world::service("echo", 80),
        world::slice("echo", "echo", &[(pod.addr, "n1", true)]),
    ];
    let (dir, cp) = weft_testkit::control_plane_over(&base).await;
    let sc = weft_testkit::start_sidecar(
        cp.plaintext(),
        "127.0.13.100".parse().expect("ip"),
        "strict",
        "a",
    )
    .await
    .expect("sidecar");
    ready(&sc).await;
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: regex, namespace: default}\nspec:\n  parentRefs: [{kind: Service, name: echo}]\n  rules:\n  - matches: [{path: {type: RegularExpression, value: \"/v[0-9]+\"}}]\n    backendRefs: [{name: echo, port: 80}]\n".to_string();
    let mut docs = base.clone();
    docs.push(route);
    std::fs::write(dir.path().join("world.yaml"), world::docs(&docs)).expect("write");
    let mut admin = weft_testkit::operator_admin(&cp).await.expect("admin");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let detail = loop {
        let proxies = admin
            .list_proxies(weft_proto::admin::ListProxiesRequest::default())
            .await
            .expect("list")
            .into_inner()
            .proxies;
        let rds = proxies
            .iter()
            .flat_map(|p| &p.types)
            .find(|t| t.type_url == weft_proto::type_url::ROUTE)
            .cloned();
        if let Some(t) = rds.filter(|t| t.state() == weft_proto::admin::SyncState::Nacked) {
            break t.nack_detail;
        }
        assert!(tokio::time::Instant::now() < deadline, "no NACK recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        detail.contains("RouteConfiguration \"echo.default.svc.cluster.local:80\""),
        "{detail}"
    );
    assert!(detail.contains("unsupported path specifier"), "{detail}");
    let (status, body) = get_via(sc.outbound_addr, "echo", "/v2")
        .await
        .expect("request");
    assert_eq!(
        (status, body.split_whitespace().next()),
        (200, Some("pod")),
        "the previous route still serves"
    );
}

/// A client speaking HTTP/2 with prior knowledge to the sidecar (explicit mode) is served: the
/// sidecar routes by `:authority` and sends the request on to the endpoint as HTTP/1.1.
#[tokio::test]
async fn http2_clients_are_routed_and_sent_on_as_http1() {
    use http_body_util::{BodyExt, Empty};
    let pod = echo("127.0.9.1", "pod", "a").await;
    let (_dir, cp) = weft_testkit::control_plane_over(&[
        world::service("echo", 80),
        world::slice("echo", "echo", &[(pod.addr, "n1", true)]),
    ])
    .await;
    let sc = weft_testkit::start_sidecar(
        cp.plaintext(),
        "127.0.9.100".parse().expect("ip"),
        "h2",
        "a",
    )
    .await
    .expect("sidecar");
    ready(&sc).await;
    let tcp = tokio::net::TcpStream::connect(sc.outbound_addr)
        .await
        .expect("connect");
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    for path in ["/one", "/two", "/three"] {
        let req = hyper::Request::builder()
            .uri(format!("http://echo.default.svc.cluster.local{path}"))
            .body(Empty::<bytes::Bytes>::new())
            .expect("request");
        let resp = send.send_request(req).await.expect("answer");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(body.starts_with(b"pod"), "{body:?}");
    }
}

/// An endpoint that speaks only HTTP/2 (a Service port with `appProtocol: kubernetes.io/h2c`,
/// as gRPC servers are) is reached over HTTP/2 with prior knowledge, whatever the client spoke.
#[tokio::test]
async fn http2_only_endpoints_are_reached_over_http2() {
    let listener = tokio::net::TcpListener::bind("127.0.9.21:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = format!("{:?}", req.version());
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    },
                );
                // HTTP/2 only: an HTTP/1.1 request here is a protocol error.
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
            });
        }
    });
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: grpc, namespace: default}\nspec:\n  ports: [{name: grpc, port: 9090, appProtocol: kubernetes.io/h2c}]\n".to_string();
    let slice = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: grpc\n  namespace: default\n  labels: {{kubernetes.io/service-name: grpc}}\naddressType: IPv4\nports: [{{name: grpc, port: {}}}]\nendpoints:\n- addresses: [\"{}\"]\n",
        addr.port(),
        addr.ip()
    );
    let (_dir, cp) = weft_testkit::control_plane_over(&[service, slice]).await;
    let sc = weft_testkit::start_sidecar(
        cp.plaintext(),
        "127.0.9.120".parse().expect("ip"),
        "grpc-client",
        "a",
    )
    .await
    .expect("sidecar");
    ready(&sc).await;
    for _ in 0..3 {
        let (status, body) = get_via(sc.outbound_addr, "grpc:9090", "/svc/Method")
            .await
            .expect("request");
        assert_eq!((status, body.as_str()), (200, "HTTP/2.0"));
    }
    server.abort();
}

/// A sidecar that does not say where it runs (an injected one: no `--zone`) is placed by its
/// pod: its node id is `<pod>.<namespace>`, the Pod names its Node, the Node has the zone; so
/// its own zone's endpoints come first.
#[tokio::test]
async fn a_proxy_without_a_zone_is_placed_by_its_pod() {
    let a = Echo::start(
        "127.0.9.31:0".parse().expect("addr"),
        Identity {
            name: "in-zone".into(),
            cluster: "cluster-1".into(),
            zone: "zone-a".into(),
        },
    )
    .await
    .expect("echo");
    let b = Echo::start(
        "127.0.9.32:0".parse().expect("addr"),
        Identity {
            name: "other-zone".into(),
            cluster: "cluster-1".into(),
            zone: "zone-b".into(),
        },
    )
    .await
    .expect("echo");
    let docs = vec![
        world::node("node-a", "region-1", "zone-a"),
        world::node("node-b", "region-1", "zone-b"),
        world::service("echo", 80),
        world::slice(
            "echo",
            "echo",
            &[(a.addr, "node-a", true), (b.addr, "node-b", true)],
        ),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: client-0, namespace: default}\nspec:\n  nodeName: node-a\n  containers: [{name: app, image: app}]\n".to_string(),
    ];
    let (_dir, cp) = weft_testkit::control_plane_over(&docs).await;
    let sc = weft_testkit::start_sidecar(
        cp.plaintext(),
        "127.0.9.130".parse().expect("ip"),
        "client-0.default",
        "",
    )
    .await
    .expect("sidecar");
    ready(&sc).await;
    for _ in 0..20 {
        let (status, body) = get_via(sc.outbound_addr, "echo.default.svc.cluster.local", "/")
            .await
            .expect("request");
        assert_eq!(status, 200);
        assert!(body.starts_with("in-zone"), "zone-a first: {body}");
    }
    let mut admin = weft_testkit::operator_admin(&cp).await.expect("admin");
    let proxies = admin
        .list_proxies(weft_proto::admin::ListProxiesRequest::default())
        .await
        .expect("proxies")
        .into_inner()
        .proxies;
    let me = proxies
        .iter()
        .find(|p| p.node_id == "client-0.default")
        .expect("the proxy");
    assert_eq!(me.zone, "zone-a", "{me:?}");
}
