//! On-demand discovery (issue #22): a sidecar holds the directory and subscribes to a
//! service-port's routes, clusters and endpoints only when a request uses it — against a real
//! control plane over a file source (its per-stream state read through the admin API), and
//! against the fake ADS server where the control plane must not answer.

use std::net::SocketAddr;
use std::time::Duration;

use weft_proto::admin::{ListProxiesRequest, ProxyStatus};
use weft_proto::type_url;
use weft_sidecar::config::Discovery;
use weft_testkit::echo::Echo;
use weft_testkit::{ControlPlane, Sidecar, eventually, get_via, world};

const PATIENCE: Duration = Duration::from_secs(10);

async fn echo(ip: &str, name: &str) -> Echo {
    Echo::pod(ip, name, "a").await
}

/// A world of `n` Services `svc-<i>` (port 80), each with one endpoint at `ip`.
fn services(n: usize, ip: &str) -> Vec<String> {
    let addr: SocketAddr = format!("{ip}:18080").parse().expect("addr");
    let mut docs = vec![world::node("n1", "r", "a")];
    for i in 0..n {
        let name = format!("svc-{i}");
        docs.push(world::service(&name, 80));
        docs.push(world::slice(
            &format!("{name}-1"),
            &name,
            &[(addr, "n1", true)],
        ));
    }
    docs
}

/// An on-demand sidecar on `ip` over `xds`.
async fn on_demand(xds: SocketAddr, ip: &str, idle: Duration) -> Sidecar {
    let mut cfg = weft_sidecar::RunConfig::local(xds, ip.parse().expect("ip"), "client.default");
    cfg.cluster = "cluster-1".into();
    cfg.zone = "a".into();
    cfg.discovery = Discovery::OnDemand;
    cfg.discovery_idle = idle;
    cfg.discovery_timeout = Duration::from_secs(2);
    let sidecar = Sidecar::start(cfg).await.expect("sidecar starts");
    let mut ready = sidecar.xds.ready.clone();
    tokio::time::timeout(PATIENCE, ready.wait_for(|r| *r))
        .await
        .expect("ready in time")
        .expect("alive");
    sidecar
}

/// The control plane's view of the one proxy connected to it.
async fn proxy_status(cp: &ControlPlane) -> ProxyStatus {
    let mut admin = weft_testkit::operator_admin(cp).await.expect("admin");
    let resp = admin
        .list_proxies(ListProxiesRequest::default())
        .await
        .expect("list proxies")
        .into_inner();
    resp.proxies.into_iter().next().expect("one proxy")
}

/// (wildcard, names subscribed, resources held) of type `t` in `p`.
fn subscription(p: &ProxyStatus, t: &str) -> (bool, u32, u32) {
    p.types
        .iter()
        .find(|s| s.type_url == t)
        .map_or((false, 0, 0), |s| {
            (s.wildcard, s.subscribed_names, s.resource_count)
        })
}

async fn metrics(sidecar: &Sidecar) -> String {
    let (_, page) = get_via(sidecar.admin_addr, "admin", "/metrics")
        .await
        .expect("metrics");
    page
}

#[tokio::test]
async fn the_first_request_to_a_service_subscribes_to_it_and_succeeds() {
    let _echo = echo("127.0.61.1", "svc").await;
    let (_dir, cp) = weft_testkit::control_plane_over(&services(50, "127.0.61.1")).await;
    let sidecar = on_demand(cp.plaintext(), "127.0.61.10", Duration::ZERO).await;

    // Ready with the directory only: 50 Services known, no route, cluster or endpoint held.
    let config = sidecar.xds.config.load_full();
    assert_eq!(config.directory.len(), 50);
    assert!(config.hosts.is_empty() && config.clusters.is_empty());
    let p = proxy_status(&cp).await;
    assert_eq!(subscription(&p, type_url::DIRECTORY), (true, 0, 50));
    assert_eq!(subscription(&p, type_url::CLUSTER), (false, 0, 0));
    assert_eq!(
        subscription(&p, type_url::LISTENER),
        (false, 1, 1),
        "weft-inbound only"
    );

    // A short name, a namespaced name and the FQDN with its port all reach the service.
    for host in [
        "svc-7",
        "svc-7.default",
        "svc-7.default.svc.cluster.local:80",
    ] {
        let (status, body) = get_via(sidecar.outbound_addr, host, "/")
            .await
            .expect("get");
        assert_eq!(status, 200, "{host}: {body}");
    }
    let config = sidecar.xds.config.load_full();
    let subs: Vec<&String> = config.subscriptions.keys().collect();
    assert_eq!(subs, ["svc-7.default.svc.cluster.local:80"]);
    let s = &config.subscriptions["svc-7.default.svc.cluster.local:80"];
    assert!(s.complete && s.why == weft_sidecar::state::Why::Request);
    let p = proxy_status(&cp).await;
    for t in [type_url::ROUTE, type_url::CLUSTER, type_url::ENDPOINT] {
        assert_eq!(subscription(&p, t), (false, 1, 1), "{t}");
    }
    let page = metrics(&sidecar).await;
    assert_eq!(
        weft_testkit::metric_sum(
            &page,
            "weft_proxy_discovery_fetches_total",
            &["result=\"ok\""]
        ),
        1.0,
        "only the first request waited: {page}"
    );
    // A name the directory does not hold is still the explicit mode's 404.
    let (status, _) = get_via(sidecar.outbound_addr, "nowhere", "/")
        .await
        .expect("get");
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_canary_splits_backends_are_subscribed_with_it() {
    let _v1 = echo("127.0.62.1", "v1").await;
    let _v2 = echo("127.0.62.2", "v2").await;
    let a = |ip: &str| -> SocketAddr { format!("{ip}:18080").parse().expect("addr") };
    let (_dir, cp) = weft_testkit::control_plane_over(&[
        world::node("n1", "r", "a"),
        world::service("echo", 80),
        world::service("echo-v1", 80),
        world::service("echo-v2", 80),
        world::slice("v1", "echo-v1", &[(a("127.0.62.1"), "n1", true)]),
        world::slice("v2", "echo-v2", &[(a("127.0.62.2"), "n1", true)]),
        world::split("canary", "echo", &[("echo-v1", 50), ("echo-v2", 50)]),
    ])
    .await;
    let sidecar = on_demand(cp.plaintext(), "127.0.62.10", Duration::ZERO).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let (status, body) = get_via(sidecar.outbound_addr, "echo", "/")
            .await
            .expect("get");
        assert_eq!(status, 200, "{body}");
        seen.insert(
            body.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["v1", "v2"]);
    // One service-port subscribed; both backends' clusters and endpoints came with it.
    let config = sidecar.xds.config.load_full();
    assert_eq!(config.subscriptions.len(), 1);
    let clusters: Vec<&String> = config.clusters.keys().collect();
    assert_eq!(
        clusters,
        [
            "echo-v1.default.svc.cluster.local:80",
            "echo-v2.default.svc.cluster.local:80"
        ]
    );
    let p = proxy_status(&cp).await;
    assert_eq!(subscription(&p, type_url::CLUSTER), (false, 2, 2));
    assert_eq!(subscription(&p, type_url::ENDPOINT), (false, 2, 2));
}

#[tokio::test]
async fn an_idle_service_is_unsubscribed_on_the_control_plane() {
    let _echo = echo("127.0.63.1", "svc").await;
    let (_dir, cp) = weft_testkit::control_plane_over(&services(5, "127.0.63.1")).await;
    let sidecar = on_demand(cp.plaintext(), "127.0.63.10", Duration::from_millis(800)).await;
    for host in ["svc-1", "svc-2"] {
        let (status, body) = get_via(sidecar.outbound_addr, host, "/")
            .await
            .expect("get");
        assert_eq!(status, 200, "{body}");
    }
    let p = proxy_status(&cp).await;
    assert_eq!(subscription(&p, type_url::ROUTE), (false, 2, 2));
    // svc-1 stays in use; svc-2 is left idle.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        let (status, _) = get_via(sidecar.outbound_addr, "svc-1", "/")
            .await
            .expect("get");
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let config = sidecar.xds.config.load_full();
    let subs: Vec<&String> = config.subscriptions.keys().collect();
    assert_eq!(subs, ["svc-1.default.svc.cluster.local:80"]);
    assert_eq!(
        config.clusters.keys().collect::<Vec<_>>(),
        ["svc-1.default.svc.cluster.local:80"],
        "the idle service's cluster went with it"
    );
    // The control plane's per-stream state says the same.
    let mut last = None;
    for _ in 0..50 {
        let p = proxy_status(&cp).await;
        let now: Vec<_> = [type_url::ROUTE, type_url::CLUSTER, type_url::ENDPOINT]
            .iter()
            .map(|t| subscription(&p, t))
            .collect();
        if now.iter().all(|s| *s == (false, 1, 1)) {
            last = None;
            break;
        }
        last = Some(now);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last, None, "still subscribed on the control plane");
    let page = metrics(&sidecar).await;
    assert!(
        weft_testkit::metric_sum(&page, "weft_proxy_discovery_evictions_total", &[]) >= 1.0,
        "{page}"
    );
    // Used again, it is subscribed again.
    let (status, _) = get_via(sidecar.outbound_addr, "svc-2", "/")
        .await
        .expect("get");
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_restarted_control_plane_gets_exactly_the_held_subscriptions() {
    let _echo = echo("127.0.64.1", "svc").await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("world.yaml"),
        world::docs(&services(20, "127.0.64.1")),
    )
    .expect("world");
    let first = weft_testkit::start_control_plane(dir.path())
        .await
        .expect("control plane");
    let addr = first.plaintext();
    let sidecar = on_demand(addr, "127.0.64.10", Duration::ZERO).await;
    for host in ["svc-3", "svc-11", "svc-19"] {
        let (status, body) = get_via(sidecar.outbound_addr, host, "/")
            .await
            .expect("get");
        assert_eq!(status, 200, "{body}");
    }
    drop(first);
    // The old listener goes once its aborted tasks are dropped: retry the bind briefly.
    let second = weft_testkit::until_ok(
        "the control plane restarts on its address",
        PATIENCE,
        || {
            let mut config = weft_control_plane::Config::local(dir.path());
            config.xds_plaintext_addr = Some(addr);
            async move { ControlPlane::start(config).await.map_err(|e| e.to_string()) }
        },
    )
    .await;
    // Wait for the sidecar's new stream to be synced.
    let mut status = None;
    for _ in 0..200 {
        let mut admin = weft_testkit::operator_admin(&second).await.expect("admin");
        let proxies = admin
            .list_proxies(ListProxiesRequest::default())
            .await
            .expect("list")
            .into_inner()
            .proxies;
        if let Some(p) = proxies.into_iter().next()
            && subscription(&p, type_url::ENDPOINT).2 == 3
        {
            status = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let p = status.expect("the sidecar resubscribed to the restarted control plane");
    assert_eq!(subscription(&p, type_url::ROUTE), (false, 3, 3));
    assert_eq!(subscription(&p, type_url::CLUSTER), (false, 3, 3));
    assert_eq!(subscription(&p, type_url::ENDPOINT), (false, 3, 3));
    assert_eq!(subscription(&p, type_url::DIRECTORY), (true, 0, 20));
    let (status, _) = get_via(sidecar.outbound_addr, "svc-11", "/")
        .await
        .expect("get");
    assert_eq!(status, 200);
}

#[tokio::test]
async fn config_that_never_arrives_is_a_503_naming_why() {
    use weft_testkit::fake_ads::{FakeAds, resource};
    let ads = FakeAds::start().await.expect("fake ADS");
    let mut cfg =
        weft_sidecar::RunConfig::local(ads.addr, "127.0.65.10".parse().expect("ip"), "c.default");
    cfg.discovery = Discovery::OnDemand;
    cfg.discovery_timeout = Duration::from_millis(300);
    let sidecar = Sidecar::start(cfg).await.expect("sidecar");
    let entry = weft_proto::xds::DirectoryEntry {
        name: "slow".into(),
        namespace: "default".into(),
        scopes: vec![weft_proto::xds::DirectoryScope {
            zone: "cluster.local".into(),
            addresses: vec!["198.18.65.1".into()],
            ports: vec![weft_proto::xds::DirectoryPort {
                port: 80,
                protocol: "http".into(),
            }],
        }],
        export_to: Vec::new(),
    };
    ads.push(
        type_url::DIRECTORY,
        vec![resource("slow.default", &entry)],
        &[],
    )
    .await;
    eventually("the directory is held", PATIENCE, || {
        sidecar.xds.config.load().directory.len() == 1
    })
    .await;
    let (status, body) = weft_testkit::get_with(sidecar.outbound_addr, "slow", "/", &[])
        .await
        .expect("get");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("slow.default.svc.cluster.local:80") && body.contains("in time"),
        "{body}"
    );
    // The sidecar did ask for it by name.
    let asked = ads
        .next(type_url::ROUTE, PATIENCE)
        .await
        .expect("an RDS subscription");
    assert_eq!(
        asked.resource_names_subscribe,
        ["slow.default.svc.cluster.local:80"]
    );
    let page = metrics(&sidecar).await;
    assert_eq!(
        weft_testkit::metric_sum(
            &page,
            "weft_proxy_discovery_fetches_total",
            &["result=\"timeout\""]
        ),
        1.0,
        "{page}"
    );
}

#[tokio::test]
async fn export_to_and_egress_hosts_cut_the_directory() {
    let _echo = echo("127.0.66.1", "svc").await;
    let mut docs = services(4, "127.0.66.1");
    // svc-0 is for its own namespace only... which is the caller's; svc-1 for `shop` only.
    docs.push(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: private\n  namespace: default\n  annotations: {networking.istio.io/exportTo: \"shop\"}\nspec:\n  ports: [{name: http, port: 80}]\n"
            .to_string(),
    );
    docs.push(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: mine\n  namespace: default\n  annotations: {networking.istio.io/exportTo: \".\"}\nspec:\n  ports: [{name: http, port: 80}]\n"
            .to_string(),
    );
    let (dir, cp) = weft_testkit::control_plane_over(&docs).await;
    let sidecar = on_demand(cp.plaintext(), "127.0.66.10", Duration::ZERO).await;
    let config = sidecar.xds.config.load_full();
    // 4 + `mine`; `private` is never sent to a proxy of `default`.
    assert_eq!(config.directory.len(), 5);
    let (status, _) = get_via(sidecar.outbound_addr, "private", "/")
        .await
        .expect("get");
    assert_eq!(status, 404, "not in this proxy's directory");
    assert!(sidecar.xds.config.load().subscriptions.is_empty());
    let p = proxy_status(&cp).await;
    assert_eq!(subscription(&p, type_url::DIRECTORY), (true, 0, 5));
    // A proxy holding everything of the mesh is not sent `private`'s config either.
    let everything = weft_testkit::start_sidecar(
        cp.plaintext(),
        "127.0.66.11".parse().expect("ip"),
        "all.default",
        "a",
    )
    .await
    .expect("sidecar");
    let mut ready = everything.xds.ready.clone();
    tokio::time::timeout(PATIENCE, ready.wait_for(|r| *r))
        .await
        .expect("ready")
        .expect("alive");
    let held = everything.xds.config.load_full();
    assert!(held.hosts.contains_key("mine.default.svc.cluster.local:80"));
    assert!(
        !held
            .hosts
            .contains_key("private.default.svc.cluster.local:80"),
        "exportTo: shop, so no name for it here"
    );
    // Its cluster still arrives: which of its addresses are STRICT is never hidden.
    assert!(
        held.clusters
            .contains_key("private.default.svc.cluster.local:80")
    );
    drop(everything);

    // The namespace narrows what its proxies see to two names.
    docs.push(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n  annotations: {weft.dev/egress-hosts: \"./svc-1.default.svc.cluster.local, ./*.nowhere.example\"}\n"
            .to_string(),
    );
    std::fs::write(dir.path().join("world.yaml"), world::docs(&docs)).expect("rewrite");
    eventually("the egress list applies", PATIENCE, || {
        sidecar.xds.config.load().directory.len() == 1
    })
    .await;
    let (status, _) = get_via(sidecar.outbound_addr, "svc-2", "/")
        .await
        .expect("get");
    assert_eq!(status, 404, "svc-2 is outside the egress list");
    let (status, body) = get_via(sidecar.outbound_addr, "svc-1", "/")
        .await
        .expect("get");
    assert_eq!(status, 200, "{body}");
    // A malformed list is refused naming the annotation; the last good world keeps serving.
    docs.pop();
    docs.push(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n  annotations: {weft.dev/egress-hosts: \"svc-2\"}\n"
            .to_string(),
    );
    std::fs::write(dir.path().join("world.yaml"), world::docs(&docs)).expect("rewrite");
    eventually("the bad annotation is reported", PATIENCE, || {
        cp.catalog
            .current()
            .errors
            .iter()
            .any(|e| e.to_string().contains("weft.dev/egress-hosts"))
    })
    .await;
    let (status, _) = get_via(sidecar.outbound_addr, "svc-1", "/")
        .await
        .expect("get");
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_warm_set_is_held_before_the_first_request_and_never_dropped() {
    let _echo = echo("127.0.67.1", "svc").await;
    let (_dir, cp) = weft_testkit::control_plane_over(&services(6, "127.0.67.1")).await;
    let mut cfg = weft_sidecar::RunConfig::local(
        cp.plaintext(),
        "127.0.67.10".parse().expect("ip"),
        "w.default",
    );
    cfg.discovery = Discovery::OnDemand;
    cfg.discovery_idle = Duration::from_millis(300);
    cfg.warm_hosts = vec!["svc-2".into(), "svc-3.default.svc.cluster.local:80".into()];
    let sidecar = Sidecar::start(cfg).await.expect("sidecar");
    eventually("the warm set is held", PATIENCE, || {
        let c = sidecar.xds.config.load();
        c.subscriptions.len() == 2 && c.subscriptions.values().all(|s| s.complete)
    })
    .await;
    // Well past the idle time, nothing used it: still held.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let c = sidecar.xds.config.load_full();
    assert_eq!(
        c.subscriptions.keys().collect::<Vec<_>>(),
        [
            "svc-2.default.svc.cluster.local:80",
            "svc-3.default.svc.cluster.local:80"
        ]
    );
    assert!(
        c.subscriptions
            .values()
            .all(|s| s.why == weft_sidecar::state::Why::Warm)
    );
    let (status, _) = get_via(sidecar.outbound_addr, "svc-2", "/")
        .await
        .expect("get");
    assert_eq!(status, 200);
    let page = metrics(&sidecar).await;
    assert_eq!(
        weft_testkit::metric_sum(&page, "weft_proxy_discovery_fetches_total", &[]),
        0.0,
        "the first request to a warm service waited: {page}"
    );
}
