//! Progressive delivery on real traffic: sidecars report load (LRS) to the control plane, whose
//! counts must match the traffic sent; a Rollout promotes a healthy canary through its steps
//! and rolls a failing one back at once, after which the stable version takes every request;
//! the rollout's state survives a control-plane restart.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use weft_control_plane::rollout::Phase;
use weft_testkit::echo::Echo;
use weft_testkit::{ControlPlane, Sidecar, get_via, world};

async fn echo(ip: &str, name: &str) -> Echo {
    Echo::pod(ip, name, "a").await
}

/// Services echo (the root), echo-v1 (stable) and echo-v2 (canary), a TrafficSplit all to v1,
/// and, when given, a Rollout of v2.
fn world_docs(v1: SocketAddr, v2: SocketAddr, rollout: Option<&str>) -> String {
    let mut docs = vec![
        world::service("echo", 80),
        world::service("echo-v1", 80),
        world::service("echo-v2", 80),
        world::slice("echo-v1", "echo-v1", &[(v1, "n1", true)]),
        world::slice("echo-v2", "echo-v2", &[(v2, "n1", true)]),
        world::split("echo", "echo", &[("echo-v1", 100), ("echo-v2", 0)]),
    ];
    if let Some(spec) = rollout {
        docs.push(format!(
            "apiVersion: weft.dev/v1alpha1\nkind: Rollout\nmetadata: {{name: echo-v2, namespace: default}}\nspec:\n  trafficSplit: echo\n  canary: echo-v2\n{spec}"
        ));
    }
    world::docs(&docs)
}

async fn control_plane(dir: &Path, state: Option<&Path>) -> ControlPlane {
    let mut cfg = weft_control_plane::Config::local(dir);
    cfg.load_report_interval = Duration::from_millis(250);
    cfg.state_dir = state.map(Path::to_path_buf);
    let cp = ControlPlane::start(cfg).await.expect("control plane");
    assert!(
        cp.catalog.current().errors.is_empty(),
        "{:?}",
        cp.catalog.current().errors
    );
    cp
}

/// A meshed client sidecar: load reports go over the TLS port, with its identity.
async fn sidecar(cp: &ControlPlane, ip: &str) -> Sidecar {
    let dir = tempfile::tempdir().expect("dir");
    let mut cfg = weft_testkit::mesh_sidecar_config(
        cp,
        dir.path(),
        ip.parse().expect("ip"),
        "client",
        "client",
    )
    .await
    .expect("sidecar config");
    cfg.zone = "a".into();
    let sc = Sidecar::start(cfg).await.expect("sidecar");
    weft_testkit::wait_ready(&sc, Duration::from_secs(10)).await;
    sc
}

/// Steady traffic to `echo` until stopped (bounded: 20 000 requests or 60 s), counting
/// answers by status and by which version answered.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    v2: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

fn load(proxy: SocketAddr) -> Load {
    let (stop, ok, failed, v2) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let (s, o, f, c) = (stop.clone(), ok.clone(), failed.clone(), v2.clone());
    let task = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for _ in 0..20_000 {
            if s.load(Ordering::Relaxed) || tokio::time::Instant::now() > deadline {
                break;
            }
            match get_via(proxy, "echo", "/").await {
                Ok((200, body)) => {
                    o.fetch_add(1, Ordering::Relaxed);
                    if body.starts_with("v2") {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => {
                    f.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    Load {
        stop,
        ok,
        failed,
        v2,
        task,
    }
}

impl Load {
    /// Stops the traffic: (answered 200, failed, answered by v2).
    async fn stop(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.v2.load(Ordering::Relaxed),
        )
    }
}

async fn until_phase(cp: &ControlPlane, phase: Phase, patience: Duration) {
    weft_testkit::until_ok("the rollout reaches its phase", patience, || async {
        let states = cp.rollouts.states();
        match states.get("default/echo-v2") {
            Some(s) if s.phase == phase => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// A workload certificate alone cannot steer a rollout: a load report from a holder of a
/// valid SVID whose proxy has no xDS stream under that identity (or for a node another
/// identity opened) changes nothing, and is counted as dropped.
#[tokio::test]
async fn load_reports_outside_the_reporters_own_view_change_nothing() {
    use weft_proto::envoy::envoy::config::endpoint::v3::{ClusterStats, UpstreamLocalityStats};
    use weft_proto::envoy::envoy::service::load_stats::v3::LoadStatsRequest;
    use weft_proto::envoy::envoy::service::load_stats::v3::load_reporting_service_client::LoadReportingServiceClient;
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("world.yaml"),
        world_docs(
            "127.0.9.1:8080".parse().expect("addr"),
            "127.0.9.2:8080".parse().expect("addr"),
            None,
        ),
    )
    .expect("world");
    let cp = control_plane(dir.path(), None).await;
    // A real client holds the canary's cluster in its view...
    let sc = sidecar(&cp, "127.0.9.100").await;
    // ...the intruder has a certificate of its own and reports for the canary, as itself
    // and as that client's node.
    let token = weft_testkit::mint_token(&cp, "default", "intruder")
        .await
        .expect("token");
    let (csr, key) =
        weft_proto::tls::new_csr("spiffe://cluster.local/ns/default/sa/intruder").expect("csr");
    let signed = weft_testkit::sign_with_token(
        &cp,
        weft_proto::identity::SignRequest {
            csr_pem: csr,
            token,
            requested_ttl_seconds: 0,
            node_id: String::new(),
        },
    )
    .await
    .expect("signed");
    let svid = weft_proto::tls::Svid::from_pem(&signed.cert_chain_pem, &key).expect("svid");
    let canary = "echo-v2.default.svc.cluster.local:80";
    let bad = |node: &str| LoadStatsRequest {
        node: Some(weft_proto::envoy::envoy::config::core::v3::Node {
            id: node.into(),
            ..Default::default()
        }),
        cluster_stats: vec![ClusterStats {
            cluster_name: canary.into(),
            upstream_locality_stats: vec![UpstreamLocalityStats {
                total_issued_requests: 1000,
                total_error_requests: 1000,
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    for node in ["intruder", "client"] {
        let channel = weft_testkit::tls_channel(&cp, Some(&svid))
            .await
            .expect("mTLS");
        let mut stream = LoadReportingServiceClient::new(channel)
            .stream_load_stats(tokio_stream::iter(vec![bad(node), bad(node)]))
            .await
            .expect("LRS stream")
            .into_inner();
        let _ = stream.message().await;
    }
    weft_testkit::eventually("both reports dropped", Duration::from_secs(5), || {
        let page = cp.metrics.render();
        weft_testkit::metric_sum(
            &page,
            "weft_lrs_dropped_total",
            &["reason=\"no_xds_stream\""],
        ) >= 4.0
    })
    .await;
    assert_eq!(
        cp.load.cluster(canary).errored,
        0,
        "a forged report counted"
    );
    // The intruder opens an xDS stream of its own claiming the client's node id: the real
    // client's reports still count (they are matched to the stream its own certificate
    // opened, not to whichever stream last claimed the node id).
    let mut ads = weft_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::new(
        weft_testkit::tls_channel(&cp, Some(&svid)).await.expect("mTLS"),
    );
    let _claim = ads
        .delta_aggregated_resources(tokio_stream::StreamExt::chain(
            tokio_stream::iter(vec![
                weft_proto::envoy::envoy::service::discovery::v3::DeltaDiscoveryRequest {
                    node: Some(weft_proto::envoy::envoy::config::core::v3::Node {
                        id: "client".into(),
                        ..Default::default()
                    }),
                    type_url: weft_proto::type_url::CLUSTER.into(),
                    ..Default::default()
                },
            ]),
            tokio_stream::pending(),
        ))
        .await
        .expect("the intruder's stream");
    weft_testkit::eventually("both streams connected", Duration::from_secs(5), || {
        cp.metrics.connected_proxies.get() >= 2
    })
    .await;
    for _ in 0..5 {
        let _ = get_via(sc.outbound_addr, "echo-v1", "/").await;
    }
    weft_testkit::until_ok(
        "the real client's reports count",
        Duration::from_secs(10),
        || async {
            let issued = cp
                .load
                .cluster("echo-v1.default.svc.cluster.local:80")
                .issued;
            (issued >= 5)
                .then_some(())
                .ok_or(format!("{issued} issued"))
        },
    )
    .await;
    drop(sc);
}

#[tokio::test]
async fn load_reports_match_the_traffic_sent() {
    let (v1, v2) = (echo("127.0.8.1", "v1").await, echo("127.0.8.2", "v2").await);
    v2.behavior.fail_status.store(503, Ordering::Relaxed);
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("world.yaml"),
        world_docs(v1.addr, v2.addr, None),
    )
    .expect("world");
    let cp = control_plane(dir.path(), None).await;
    let sc = sidecar(&cp, "127.0.8.100").await;
    for _ in 0..100 {
        let (status, _) = get_via(sc.outbound_addr, "echo-v1", "/")
            .await
            .expect("request");
        assert_eq!(status, 200);
    }
    for _ in 0..20 {
        let (status, _) = get_via(sc.outbound_addr, "echo-v2", "/")
            .await
            .expect("request");
        assert_eq!(status, 503);
    }
    let v1_cluster = "echo-v1.default.svc.cluster.local:80";
    let v2_cluster = "echo-v2.default.svc.cluster.local:80";
    weft_testkit::until_ok(
        "every request reported",
        Duration::from_secs(10),
        || async {
            let (a, b) = (cp.load.cluster(v1_cluster), cp.load.cluster(v2_cluster));
            if a.finished() == 100 && b.finished() == 20 {
                Ok(())
            } else {
                Err(format!("{a:?} {b:?}"))
            }
        },
    )
    .await;
    let a = cp.load.cluster(v1_cluster);
    assert_eq!((a.issued, a.succeeded, a.errored), (100, 100, 0));
    assert_eq!(
        a.latency.iter().sum::<u64>(),
        100,
        "every request in the histogram"
    );
    let b = cp.load.cluster(v2_cluster);
    assert_eq!((b.issued, b.succeeded, b.errored), (20, 0, 20));
    assert_eq!(
        cp.load.all()[v1_cluster].by_zone.keys().collect::<Vec<_>>(),
        vec![""]
    );
    // Nothing more arrives: reports carry only what happened since the previous one.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(cp.load.cluster(v1_cluster).issued, 100);
    assert_eq!(
        cp.load.cluster("echo.default.svc.cluster.local:80").issued,
        0
    );
}

#[tokio::test]
async fn a_healthy_canary_is_promoted_through_its_steps() {
    let (v1, v2) = (
        echo("127.0.8.11", "v1").await,
        echo("127.0.8.12", "v2").await,
    );
    let dir = tempfile::tempdir().expect("dir");
    let spec = "  steps: [20, 50, 100]\n  interval: 1s\n  minRequests: 10\n  successRate: 0.95\n  maxP99: 1s\n";
    std::fs::write(
        dir.path().join("world.yaml"),
        world_docs(v1.addr, v2.addr, Some(spec)),
    )
    .expect("world");
    let cp = control_plane(dir.path(), None).await;
    let sc = sidecar(&cp, "127.0.8.110").await;
    let traffic = load(sc.outbound_addr);
    until_phase(&cp, Phase::Promoted, Duration::from_secs(30)).await;
    let (ok, failed, by_v2) = traffic.stop().await;
    assert_eq!(failed, 0, "{ok} ok");
    assert!(
        by_v2 > 0 && by_v2 < ok,
        "both versions served during the rollout: {by_v2} of {ok}"
    );
    let st = cp.rollouts.states()["default/echo-v2"].clone();
    let steps: Vec<(&str, u32, u32)> = st
        .decisions
        .iter()
        .map(|d| (d.kind.as_str(), d.from, d.to))
        .filter(|d| d.0 != "hold")
        .collect();
    assert_eq!(
        steps,
        vec![
            ("start", 0, 20),
            ("promote", 20, 50),
            ("promote", 50, 100),
            ("complete", 100, 100)
        ],
        "{:?}",
        st.decisions
    );
    assert!(
        st.decisions[1].reason.contains("success rate 100.0 %"),
        "{:?}",
        st.decisions
    );
    // At 100 % every request goes to the canary.
    let mut to_v2 = 0;
    for _ in 0..50 {
        let (status, body) = get_via(sc.outbound_addr, "echo", "/")
            .await
            .expect("request");
        assert_eq!(status, 200);
        to_v2 += usize::from(body.starts_with("v2"));
    }
    assert_eq!(to_v2, 50);
    // What weftctl shows comes from the admin API.
    let resp = weft_testkit::operator_admin(&cp)
        .await
        .expect("admin")
        .list_rollouts(weft_proto::admin::ListRolloutsRequest {})
        .await
        .expect("rollouts")
        .into_inner();
    let r = &resp.rollouts[0];
    assert_eq!(
        (r.phase.as_str(), r.weight, r.steps.clone()),
        ("Promoted", 100, vec![20, 50, 100])
    );
    assert_eq!(r.decisions.len(), st.decisions.len());
    // The file source still says what the user wrote.
    assert!(
        std::fs::read_to_string(dir.path().join("world.yaml"))
            .expect("world")
            .contains("weight: 0")
    );
}

#[tokio::test]
async fn a_failing_canary_is_rolled_back_and_the_state_survives_a_restart() {
    let (v1, v2) = (
        echo("127.0.8.21", "v1").await,
        echo("127.0.8.22", "v2").await,
    );
    v2.behavior.fail_status.store(500, Ordering::Relaxed);
    let dir = tempfile::tempdir().expect("dir");
    let state = tempfile::tempdir().expect("state");
    // A long interval: the rollback must not wait for it.
    let spec = "  steps: [20, 50, 100]\n  interval: 30s\n  minRequests: 10\n  successRate: 0.95\n";
    std::fs::write(
        dir.path().join("world.yaml"),
        world_docs(v1.addr, v2.addr, Some(spec)),
    )
    .expect("world");
    let cp = control_plane(dir.path(), Some(state.path())).await;
    let sc = sidecar(&cp, "127.0.8.120").await;
    let started = tokio::time::Instant::now();
    let traffic = load(sc.outbound_addr);
    until_phase(&cp, Phase::RolledBack, Duration::from_secs(20)).await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "rolled back within one interval"
    );
    let (_, failed_before, _) = traffic.stop().await;
    let st = cp.rollouts.states()["default/echo-v2"].clone();
    let last = st.decisions.last().expect("decisions");
    assert_eq!(
        (last.kind.as_str(), last.from, last.to),
        ("rollback", 20, 0)
    );
    assert!(last.reason.contains("success rate"), "{}", last.reason);
    // Judging needed at least the minimum count of canary requests, and not many more.
    assert!(
        (10..200).contains(&failed_before),
        "{failed_before} failed while judging"
    );
    // The stable version takes every request now: none fails.
    let served_by_v2 = v2.served.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..200 {
        let (status, body) = get_via(sc.outbound_addr, "echo", "/")
            .await
            .expect("request");
        assert_eq!((status, body.split(' ').next()), (200, Some("v1")));
    }
    assert_eq!(v2.served.load(Ordering::Relaxed), served_by_v2);
    let (_, metrics) = get_via(cp.metrics_addr, "cp", "/metrics")
        .await
        .expect("metrics");
    assert!(
        weft_testkit::metric_sum(
            &metrics,
            "weft_rollout_decisions_total",
            &["decision=\"rollback\""]
        ) == 1.0,
        "{metrics}"
    );

    // A new control plane over the same state: still rolled back, nothing started again.
    let decisions = st.decisions.len();
    drop(sc);
    drop(cp);
    let cp = control_plane(dir.path(), Some(state.path())).await;
    let sc = sidecar(&cp, "127.0.8.121").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = cp.rollouts.states()["default/echo-v2"].clone();
    assert_eq!(
        (st.phase, st.weight, st.decisions.len()),
        (Phase::RolledBack, 0, decisions)
    );
    for _ in 0..50 {
        let (status, body) = get_via(sc.outbound_addr, "echo", "/")
            .await
            .expect("request");
        assert_eq!((status, body.split(' ').next()), (200, Some("v1")));
    }
}
