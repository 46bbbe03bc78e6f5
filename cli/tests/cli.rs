//! `weftctl` for real: the demo binary starts a control plane, sidecars and echo pods on
//! loopback; the query commands run against it and their JSON is checked; the demo then stops
//! by itself within its bounded duration and leaves nothing behind.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const WEFTCTL: &str = env!("CARGO_BIN_EXE_weftctl");

/// Kills the demo if the test fails before it stops by itself.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A control plane as `weftctl` reaches it: its TLS port and operator credentials.
#[derive(Clone)]
struct Target {
    addr: String,
    credentials: std::path::PathBuf,
    _dir: Option<std::sync::Arc<tempfile::TempDir>>,
}

/// `cp`'s TLS port, with fresh operator credentials from its CA.
fn target(cp: &weft_testkit::ControlPlane) -> Target {
    let dir = tempfile::tempdir().expect("tempdir");
    let credentials = weft_testkit::operator_credentials(cp, dir.path(), "tester");
    Target {
        addr: cp.grpc_addr.to_string(),
        credentials,
        _dir: Some(std::sync::Arc::new(dir)),
    }
}

fn weftctl(cp: &Target, args: &[&str]) -> (i32, Value) {
    let out = Command::new(WEFTCTL)
        .args(args)
        .args(["--cp", &cp.addr, "-o", "json", "--credentials"])
        .arg(&cp.credentials)
        .output()
        .expect("weftctl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "{args:?}: not JSON ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

#[test]
fn demo_serves_both_zones_and_queries_see_it() {
    let started = Instant::now();
    let child = Command::new(WEFTCTL)
        .args([
            "demo",
            "--duration",
            "12",
            "--refresh",
            "1",
            "--xds-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--west-xds-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--west-grpc-addr",
            "127.0.0.1:0",
            "--west-metrics-addr",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo starts");
    let mut guard = Guard(child);
    let stdout = guard.0.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut cp = String::new();
    let mut west_cp = String::new();
    let mut world = String::new();
    let mut credentials = String::new();
    for line in lines.by_ref() {
        let line = line.expect("line");
        if let Some(rest) = line.trim().strip_prefix("credentials") {
            credentials = rest.split_whitespace().next().unwrap_or_default().into();
        }
        if let Some(rest) = line.trim().strip_prefix("east control plane") {
            cp = rest.split_whitespace().nth(1).expect("cp addr").to_string();
        }
        if let Some(rest) = line.trim().strip_prefix("west control plane") {
            west_cp = rest.split_whitespace().nth(1).expect("cp addr").to_string();
        }
        if let Some(rest) = line.trim().strip_prefix("east world") {
            world = rest.trim().to_string();
        }
        if line.starts_with("Try next") {
            break;
        }
    }
    assert!(!cp.is_empty(), "the demo printed its control plane address");
    assert!(
        std::path::Path::new(&credentials).exists(),
        "the demo wrote operator credentials: {credentials:?}"
    );
    let at = |addr: &str| Target {
        addr: addr.to_string(),
        credentials: credentials.clone().into(),
        _dir: None,
    };
    let (cp, west_cp) = (at(&cp), at(&west_cp));
    assert!(
        std::path::Path::new(&world).exists(),
        "world file {world} exists while running"
    );

    // status: both client sidecars, every type SYNCED.
    let (code, status) = weftctl(&cp, &["status"]);
    assert_eq!(code, 0);
    let proxies = status.as_array().expect("array");
    let mut names: Vec<&str> = proxies.iter().filter_map(|p| p["proxy"].as_str()).collect();
    names.sort();
    assert_eq!(names, vec!["client-a", "client-b"]);
    for p in proxies {
        assert_eq!(p["replica"], "demo-east");
        for t in p["types"].as_array().expect("types") {
            assert_eq!(t["state"], "SYNCED", "{p}");
        }
    }
    let zone_b = proxies
        .iter()
        .find(|p| p["proxy"] == "client-b")
        .expect("client-b");
    assert_eq!(zone_b["zone"], "zone-b");

    // services: the split and its backends.
    let (_, services) = weftctl(&cp, &["services"]);
    let echo = services
        .as_array()
        .expect("array")
        .iter()
        .find(|s| s["name"] == "echo")
        .expect("echo");
    assert_eq!(
        echo["backends"],
        serde_json::json!(["echo-v1=90", "echo-v2=10"])
    );
    let v1 = services
        .as_array()
        .expect("array")
        .iter()
        .find(|s| s["name"] == "echo-v1")
        .expect("v1");
    // Two in east, one imported from west; reachable under both names.
    assert_eq!(v1["ready_endpoints"], 3, "{v1}");
    assert_eq!(
        v1["scopes"],
        serde_json::json!(["cluster.local", "clusterset"]),
        "{v1}"
    );
    assert_eq!(v1["clusters"], serde_json::json!(["east", "west"]), "{v1}");
    let v2 = services
        .as_array()
        .expect("array")
        .iter()
        .find(|s| s["name"] == "echo-v2")
        .expect("v2");
    assert_eq!(v2["scopes"], serde_json::json!(["cluster.local"]), "{v2}");

    // proxy-config: client-b sees echo-v1 in its own zone at priority 0, zone-a at 1.
    let (_, eps) = weftctl(&cp, &["proxy-config", "client-b", "endpoints"]);
    let v1 = eps
        .as_array()
        .expect("array")
        .iter()
        .find(|r| r["name"] == "echo-v1.default.svc.cluster.local:80")
        .expect("v1 endpoints");
    for e in v1["config"]["endpoints"].as_array().expect("endpoints") {
        let want = match e["zone"].as_str() {
            Some("zone-b") => 0,
            Some("zone-a") => 1,
            _ => 2, // west's, after every east endpoint
        };
        assert_eq!(e["priority"], want, "{e}");
    }
    // The sidecar's own inbound Listener: its resolved mTLS mode, and where it comes from.
    let (_, listeners) = weftctl(&cp, &["proxy-config", "client-a", "listeners"]);
    let inbound = listeners
        .as_array()
        .expect("array")
        .iter()
        .find(|r| r["name"] == "weft-inbound")
        .unwrap_or_else(|| panic!("no weft-inbound listener: {listeners}"));
    assert!(
        matches!(
            inbound["config"]["mtls_mode"].as_str(),
            Some("STRICT" | "PERMISSIVE")
        ),
        "{inbound}"
    );
    assert!(
        !inbound["config"]["mtls_source"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{inbound}"
    );
    // endpoints: the catalog's view with client-b's priorities.
    let (code, eps) = weftctl(&cp, &["endpoints", "echo-v1", "--proxy", "client-b"]);
    assert_eq!(code, 0);
    let eps = eps.as_array().expect("array");
    assert_eq!(eps.len(), 3);
    for e in eps {
        assert_eq!(e["health"], "ready");
        let want = match e["zone"].as_str() {
            Some("zone-b") => "80=0",
            Some("zone-a") => "80=1",
            _ => "80=2",
        };
        assert_eq!(e["priorities"], serde_json::json!([want]), "{e}");
    }
    // The proxy holds what the control plane sent.
    let (code, diff) = weftctl(
        &cp,
        &[
            "proxy-config",
            "client-a",
            "--from-proxy",
            "127.0.20.1:15000",
            "--diff",
        ],
    );
    assert_eq!((code, diff), (0, serde_json::json!([])));
    let (_, dump) = weftctl(
        &cp,
        &[
            "proxy-config",
            "client-a",
            "--from-proxy",
            "127.0.20.1:15000",
        ],
    );
    assert!(
        dump["clusters"]["echo-v2.default.svc.cluster.local:80"].is_object(),
        "{dump}"
    );
    // token create: a join token for one identity.
    let (code, token) = weftctl(
        &cp,
        &[
            "token",
            "create",
            "--service-account",
            "echo",
            "--ttl",
            "15m",
        ],
    );
    assert_eq!(code, 0);
    assert_eq!(
        token["spiffe_id"],
        "spiffe://cluster.local/ns/default/sa/echo"
    );
    assert!(
        token["token"]
            .as_str()
            .is_some_and(|t| t.starts_with("wj2.")),
        "{token}"
    );
    // errors: a clean world.
    let (code, errors) = weftctl(&cp, &["errors"]);
    assert_eq!((code, errors), (0, serde_json::json!([])));
    // Federation both ways: each control plane has the other SYNCED and imported echo-v1.
    for (at, other) in [(&cp, "west"), (&west_cp, "east")] {
        let (code, peers) = weftctl(at, &["peers"]);
        assert_eq!(code, 0, "{peers:#}");
        let p = &peers[0];
        assert_eq!(
            (p["name"].as_str(), p["state"].as_str()),
            (Some(other), Some("SYNCED")),
            "{peers:#}"
        );
        assert_eq!(
            p["endpoints"],
            if other == "west" { 1 } else { 2 },
            "{peers:#}"
        );
    }
    // West's client sees its own echo-v1 first, east's after (crossCluster failover).
    let (_, eps) = weftctl(&west_cp, &["endpoints", "echo-v1", "--proxy", "client-c"]);
    for e in eps.as_array().expect("array") {
        let want = if e["cluster"] == "west" {
            "80=0"
        } else {
            "80=1"
        };
        assert_eq!(e["priorities"], serde_json::json!([want]), "{eps:#}");
    }

    // The live view shows traffic served in both zones, all successful.
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = guard.0.wait().expect("demo exits");
    assert!(status.success(), "demo exit: {status}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the demo stops within its bounded duration"
    );
    let view = rest.join("\n");
    assert!(
        view.contains("client-a -> echo     echo-v1-a east/zone-a"),
        "{view}"
    );
    assert!(
        view.contains("client-b -> echo     echo-v1-b east/zone-b"),
        "{view}"
    );
    assert!(
        view.contains("client-c -> echo-v1  echo-v1-c west/zone-c"),
        "{view}"
    );
    assert!(
        view.contains("east sees west SYNCED, west sees east SYNCED"),
        "{view}"
    );
    assert!(!view.contains("HTTP "), "no failed request: {view}");
    assert!(view.contains("is removed"), "{view}");
    assert!(
        !std::path::Path::new(&world).exists(),
        "the demo's temp world is removed"
    );
}

#[test]
fn unreachable_control_plane_and_missing_credentials_are_clear_errors() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("missing.pem");
    let out = Command::new(WEFTCTL)
        .args(["status", "--cp", "127.0.0.1:1", "--credentials"])
        .arg(&missing)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing.pem") && err.contains("operator issue"),
        "{err}"
    );
    let ca = weft_control_plane::identity::Ca::load_or_generate(None, "cluster.local", "c1")
        .expect("CA");
    let creds = dir.path().join("creds.pem");
    ca.issue_operator("cluster.local", "tester", Duration::from_secs(600))
        .expect("issue")
        .write(&creds)
        .expect("write");
    let out = Command::new(WEFTCTL)
        .args(["status", "--cp", "127.0.0.1:1", "--credentials"])
        .arg(&creds)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the control plane at 127.0.0.1:1"),
        "{err}"
    );
}

/// `weftctl check` against a real control plane over a fixture world built to have each
/// problem, then over a clean one.
#[tokio::test]
async fn check_finds_each_listed_problem_and_passes_a_clean_world() {
    use weft_testkit::world;
    let broken = vec![
        // A selector that matches no Pod (a Pod exists with other labels), hence no endpoints.
        "apiVersion: v1\nkind: Service\nmetadata: {name: lonely, namespace: default}\nspec:\n  selector: {app: lonely}\n  ports: [{name: http, port: 80}]\n".to_string(),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p1, namespace: default, labels: {app: other}}\nspec: {containers: []}\n".to_string(),
        // A port with neither name nor appProtocol.
        "apiVersion: v1\nkind: Service\nmetadata: {name: noname, namespace: default}\nspec:\n  ports: [{port: 80}]\n".to_string(),
        world::slice("noname", "noname", &[("127.0.0.9:80".parse().expect("addr"), "n1", true)]),
        // A split with a missing backend, one with all weights zero, a policy for nothing.
        world::split("missing", "lonely", &[("ghost", 100)]),
        world::split("zero", "lonely", &[("noname", 0)]),
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: orphan, namespace: default}\nspec:\n  targetRef: {name: nowhere}\n".to_string(),
        // Two PeerAuthentications selecting one pod, and one with a mode that does not exist.
        "apiVersion: weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: a, namespace: default}\nspec: {selector: {matchLabels: {app: other}}, mtls: {mode: STRICT}}\n".to_string(),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: b, namespace: default}\nspec: {selector: {matchLabels: {app: other}}, mtls: {mode: PERMISSIVE}}\n".to_string(),
        "apiVersion: weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: typo, namespace: default}\nspec: {mtls: {mode: STRIKT}}\n".to_string(),
        // Another cluster's endpoint without a sidecar, and no policy accepting plaintext.
        world::service("remote", 80),
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: remote-c2\n  namespace: default\n  labels: {kubernetes.io/service-name: remote, weft.dev/cluster: c2}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [\"127.0.9.9\"]\n  conditions: {ready: true}\n".to_string(),
        // An AuthorizationPolicy whose selector matches no Pod, and an ALLOW policy with no
        // rules on a Service: no caller gets in.
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ghost, namespace: default}\nspec: {selector: {matchLabels: {app: ghost}}, action: DENY, rules: [{}]}\n".to_string(),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: locked, namespace: default}\nspec: {targetRefs: [{kind: Service, group: \"\", name: noname}], action: ALLOW}\n".to_string(),
    ];
    let (_dir, cp) = weft_testkit::control_plane_over(&broken).await;
    let addr = target(&cp);
    // A proxy that NACKs what it gets.
    let mut ads = weft_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::connect(format!("http://{}", cp.plaintext()))
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let node = weft_proto::envoy::envoy::config::core::v3::Node {
        id: "picky".into(),
        ..Default::default()
    };
    use weft_proto::envoy::envoy::service::discovery::v3::DiscoveryRequest;
    tx.send(DiscoveryRequest {
        node: Some(node),
        type_url: weft_proto::type_url::CLUSTER.into(),
        ..Default::default()
    })
    .await
    .expect("send");
    let mut resp = ads
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let first = resp.message().await.expect("response").expect("some");
    tx.send(DiscoveryRequest {
        type_url: weft_proto::type_url::CLUSTER.into(),
        response_nonce: first.nonce.clone(),
        error_detail: Some(weft_proto::envoy::google::rpc::Status {
            code: 3,
            message: "cluster refused by test".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await
    .expect("nack");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let run = |addr: Target| async move {
        tokio::task::spawn_blocking(move || weftctl(&addr, &["check"]))
            .await
            .expect("join")
    };
    let (code, findings) = run(addr.clone()).await;
    assert_eq!(code, 1, "problems mean a non-zero exit");
    let found =
        |code: &str, object: &str| {
            findings.as_array().expect("array").iter().any(|f| {
                f["code"] == code && f["object"].as_str().is_some_and(|o| o.contains(object))
            })
        };
    assert!(
        found("selector-matches-no-pod", "Service default/lonely"),
        "{findings:#}"
    );
    assert!(
        found("no-ready-endpoints", "Service default/lonely"),
        "{findings:#}"
    );
    assert!(
        found("port-protocol-unknown", "Service default/noname"),
        "{findings:#}"
    );
    assert!(
        found("invalid-object", "TrafficSplit default/missing"),
        "{findings:#}"
    );
    assert!(
        found("invalid-object", "TrafficSplit default/zero"),
        "{findings:#}"
    );
    assert!(
        found("invalid-object", "TrafficPolicy default/orphan"),
        "{findings:#}"
    );
    assert!(found("config-nacked", "proxy picky"), "{findings:#}");
    assert!(
        found("remote-plaintext-refused", "Service default/remote"),
        "{findings:#}"
    );
    assert!(
        found("peer-authentication-conflict", "Pod default/p1"),
        "{findings:#}"
    );
    assert!(
        found("invalid-object", "PeerAuthentication default/typo"),
        "{findings:#}"
    );
    assert!(
        found("authz-selects-nothing", "AuthorizationPolicy default/ghost"),
        "{findings:#}"
    );
    assert!(
        found("authz-unreachable", "Service default/noname"),
        "{findings:#}"
    );
    assert!(
        !found("authz-unreachable", "Service default/lonely")
            && !found(
                "authz-selects-nothing",
                "AuthorizationPolicy default/locked"
            ),
        "{findings:#}"
    );
    // `weftctl authz check` names the decision per endpoint, exit 1 when denied.
    let check = |args: Vec<&'static str>| {
        let addr = addr.clone();
        async move {
            tokio::task::spawn_blocking(move || weftctl(&addr, &args))
                .await
                .expect("join")
        }
    };
    let (code, verdicts) = check(vec![
        "authz",
        "check",
        "--from",
        "default/web",
        "--to",
        "noname",
    ])
    .await;
    assert_eq!(code, 1, "{verdicts:#}");
    let v = &verdicts.as_array().expect("array")[0];
    assert_eq!(v["allowed"], false, "{verdicts:#}");
    assert!(
        v["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("denied")),
        "{verdicts:#}"
    );
    assert!(
        findings
            .as_array()
            .expect("array")
            .iter()
            .all(|f| !f["fix"].as_str().unwrap_or_default().is_empty()),
        "every finding says how to fix it"
    );
    drop(resp);
    drop(cp);

    let (_dir, clean) = weft_testkit::control_plane_over(&[
        world::service("fine", 80),
        world::slice(
            "fine",
            "fine",
            &[("127.0.0.9:80".parse().expect("addr"), "n1", true)],
        ),
    ])
    .await;
    let (code, findings) = run(target(&clean)).await;
    assert_eq!((code, findings), (0, serde_json::json!([])));
}

/// The world of the NetworkPolicy check: the control plane's pod in weft-system, meshed pods
/// web-1 and db-1 in `shop`, Service db (5432) that an AuthorizationPolicy opens to web, an
/// endpoint listed at a sidecar's inbound port (Service direct, 15006), and `policies`.
fn netpol_world(policies: &[&str]) -> Vec<String> {
    let pod = |ns: &str, name: &str, labels: &str, sa: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {labels}}}\nspec: {{serviceAccountName: {sa}, containers: [{{name: c, ports: [{{name: grpc-tls, containerPort: 15012}}]}}]}}\nstatus: {{podIP: \"{ip}\"}}\n"
        )
    };
    let mut docs = vec![
        pod("weft-system", "weft-control-plane-0", "{app.kubernetes.io/name: weft-control-plane}", "weft-control-plane", "198.18.9.1"),
        pod("shop", "web-1", "{app: web, weft.dev/tls-mode: weft}", "web", "198.18.0.1"),
        pod("shop", "db-1", "{app: db, weft.dev/tls-mode: weft}", "db", "198.18.0.2"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec:\n  ports: [{name: tcp-pg, port: 5432}]\n".to_string(),
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: db-1\n  namespace: shop\n  labels: {kubernetes.io/service-name: db}\naddressType: IPv4\nports: [{name: tcp-pg, port: 5432}]\nendpoints:\n- addresses: [\"198.18.0.2\"]\n  targetRef: {kind: Pod, name: db-1, namespace: shop}\n".to_string(),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: web-to-db, namespace: shop}\nspec:\n  selector: {matchLabels: {app: db}}\n  action: ALLOW\n  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]}]\n".to_string(),
        "apiVersion: v1\nkind: Service\nmetadata: {name: direct, namespace: shop}\nspec:\n  ports: [{name: http, port: 80}]\n".to_string(),
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: direct-1\n  namespace: shop\n  labels: {kubernetes.io/service-name: direct}\naddressType: IPv4\nports: [{name: http, port: 15006}]\nendpoints:\n- addresses: [\"198.18.0.1\"]\n  targetRef: {kind: Pod, name: web-1, namespace: shop}\n".to_string(),
    ];
    docs.extend(policies.iter().map(|p| p.to_string()));
    docs
}

#[tokio::test]
async fn check_reports_network_policies_that_block_mesh_traffic() {
    // shop denies everything but DNS: the sidecars cannot reach the control plane, web
    // cannot reach db although the mesh lets it in, nor the endpoint at 15006.
    let deny = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: default-deny, namespace: shop}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  egress: [{ports: [{port: 53, protocol: UDP}]}]\n";
    let (dir, cp) = weft_testkit::control_plane_over(&netpol_world(&[deny])).await;
    let addr = target(&cp);
    let run = |addr: Target| async move {
        tokio::task::spawn_blocking(move || weftctl(&addr, &["check"]))
            .await
            .expect("join")
    };
    let (code, findings) = run(addr.clone()).await;
    assert_eq!(code, 1, "{findings:#}");
    let with = |findings: &Value, code: &str| -> Vec<(String, String)> {
        findings
            .as_array()
            .expect("array")
            .iter()
            .filter(|f| f["code"] == code)
            .map(|f| {
                (
                    f["object"].as_str().unwrap_or_default().to_string(),
                    f["problem"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    let cp_blocked = with(&findings, "netpol-blocks-control-plane");
    assert_eq!(cp_blocked.len(), 1, "{findings:#}");
    assert_eq!(cp_blocked[0].0, "NetworkPolicy shop/default-deny");
    assert!(
        cp_blocked[0].1.contains("shop/web-1")
            && cp_blocked[0].1.contains("shop/db-1")
            && cp_blocked[0]
                .1
                .contains("weft-system/weft-control-plane-0 on 15012")
            && cp_blocked[0].1.contains("for Egress"),
        "{cp_blocked:?}"
    );
    let traffic = with(&findings, "netpol-blocks-mesh-traffic");
    let about = |svc: &str, caller: &str| {
        traffic.iter().any(|(o, p)| {
            o == "NetworkPolicy shop/default-deny" && p.contains(svc) && p.contains(caller)
        })
    };
    assert!(
        about("Service shop/db (endpoint port 5432)", "caller shop/web"),
        "{traffic:?}"
    );
    assert!(
        about(
            "Service shop/direct (endpoint port 15006)",
            "caller shop/db"
        ),
        "{traffic:?}"
    );
    // db's own identity is not let in to db by the mesh: not reported as blocked traffic.
    assert!(!about("Service shop/db", "caller shop/db"), "{traffic:?}");

    // The platform team opens what the mesh needs: egress to the control plane and to db,
    // ingress to db from web and to the sidecar's inbound port. No finding is left.
    let open = [
        deny,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: mesh, namespace: shop}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: weft-system}}, podSelector: {matchLabels: {app.kubernetes.io/name: weft-control-plane}}}]\n    ports: [{port: grpc-tls}]\n  - to: [{podSelector: {}}]\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: 5432}]\n  - from: [{podSelector: {}}]\n    ports: [{port: 15000, endPort: 15010}]\n",
    ];
    std::fs::write(
        dir.path().join("world.yaml"),
        weft_testkit::world::docs(&netpol_world(&open)),
    )
    .expect("world");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, findings) = run(addr.clone()).await;
        let left: Vec<_> = findings
            .as_array()
            .expect("array")
            .iter()
            .filter(|f| {
                f["code"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("netpol-") || c == "invalid-object")
            })
            .cloned()
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{left:#?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // A policy that cannot be read is an invalid object naming its field.
    let bad = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: typo, namespace: shop}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 198.18.0.0/99}}]}]\n";
    std::fs::write(
        dir.path().join("world.yaml"),
        weft_testkit::world::docs(&netpol_world(&[open[0], open[1], bad])),
    )
    .expect("world");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, findings) = run(addr.clone()).await;
        let invalid = with(&findings, "invalid-object");
        if let Some((o, p)) = invalid.first() {
            assert_eq!(o, "NetworkPolicy shop/typo");
            assert!(p.contains("spec.ingress[0].from[0].ipBlock.cidr"), "{p}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{findings:#}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[test]
fn completions_are_generated() {
    let out = Command::new(WEFTCTL)
        .args(["completions", "bash"])
        .output()
        .expect("runs");
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        script.contains("_weftctl") && script.contains("proxy-config"),
        "{script}"
    );
}

/// `weftctl certs` against a real sidecar: without an identity it says so and exits 1; with a
/// join token it shows the leaf (the workload's SPIFFE ID), the intermediate and the root.
#[tokio::test]
async fn certs_shows_the_proxy_chain_and_exits_1_without_one() {
    use weft_testkit::world;
    let (dir, cp) = weft_testkit::control_plane_over(&[world::service("echo", 80)]).await;
    let ip: std::net::IpAddr = "127.0.50.1".parse().expect("ip");
    let plain = weft_testkit::start_sidecar(cp.plaintext(), ip, "plain", "")
        .await
        .expect("sidecar");
    let cfg = weft_testkit::mesh_sidecar_config(
        &cp,
        dir.path(),
        "127.0.50.2".parse().expect("ip"),
        "meshed",
        "echo",
    )
    .await
    .expect("config");
    let meshed = weft_testkit::Sidecar::start(cfg).await.expect("sidecar");
    weft_testkit::wait_ready(&meshed, std::time::Duration::from_secs(15)).await;
    let certs = |admin: std::net::SocketAddr| async move {
        tokio::task::spawn_blocking(move || {
            let nowhere = Target {
                addr: "127.0.0.1:1".into(),
                credentials: "/nonexistent".into(),
                _dir: None,
            };
            weftctl(&nowhere, &["certs", &admin.to_string()])
        })
        .await
        .expect("join")
    };
    let (code, view) = certs(plain.admin_addr).await;
    assert_eq!(code, 1, "{view}");
    assert!(view["spiffe_id"].is_null(), "{view}");
    assert!(
        view["note"]
            .as_str()
            .is_some_and(|n| n.contains("no identity")),
        "{view}"
    );

    let (code, view) = certs(meshed.admin_addr).await;
    assert_eq!(code, 0, "{view}");
    assert_eq!(
        view["spiffe_id"], "spiffe://cluster.local/ns/default/sa/echo",
        "{view}"
    );
    let chain = view["chain"].as_array().expect("chain");
    assert_eq!(chain.len(), 2, "{view}");
    assert_eq!(chain[0]["spiffe_id"], view["spiffe_id"]);
    assert_eq!(chain[0]["is_ca"], false);
    assert_eq!(chain[1]["is_ca"], true);
    assert_eq!(
        chain[1]["issuer"], view["trust_bundle"][0]["subject"],
        "{view}"
    );
    let left = view["expires_in_seconds"].as_i64().expect("expiry");
    assert!(left > 23 * 3600 && left <= 24 * 3600, "{view}");
}

/// `weftctl rollouts` shows a rollout's phase, weight and decisions; `weftctl errors` shows a
/// Rollout that names a canary its split does not have, with the field.
#[tokio::test]
async fn rollouts_show_phase_weight_and_decisions() {
    use weft_testkit::world;
    let rollout = |name: &str, canary: &str| {
        format!(
            "apiVersion: weft.dev/v1alpha1\nkind: Rollout\nmetadata: {{name: {name}, namespace: default}}\nspec: {{trafficSplit: echo, canary: {canary}, steps: [20, 100], interval: 1h}}\n"
        )
    };
    let (_dir, cp) = weft_testkit::control_plane_over(&[
        world::service("echo", 80),
        world::service("echo-v1", 80),
        world::service("echo-v2", 80),
        world::split("echo", "echo", &[("echo-v1", 100), ("echo-v2", 0)]),
        rollout("good", "echo-v2"),
        rollout("stray", "echo-v3"),
    ])
    .await;
    let addr = target(&cp);
    let run = |args: &'static [&'static str]| {
        let addr = addr.clone();
        async move {
            tokio::task::spawn_blocking(move || weftctl(&addr, args))
                .await
                .expect("join")
        }
    };
    // The controller starts the rollout on its first tick.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (code, rows) = run(&["rollouts"]).await;
    assert_eq!(code, 0);
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["name"], "default/good");
    assert_eq!(rows[0]["phase"], "Progressing");
    assert_eq!(rows[0]["weight"], 20);
    assert_eq!(rows[0]["decisions"][0]["kind"], "start");
    assert_eq!(rows[0]["decisions"][0]["to"], 20);
    let (code, errors) = run(&["errors"]).await;
    assert_eq!(code, 1);
    let stray = errors
        .as_array()
        .expect("rows")
        .iter()
        .find(|e| e["object"] == "Rollout default/stray")
        .expect("the stray rollout is reported");
    assert_eq!(stray["field"], "spec.canary");
    assert!(
        stray["message"]
            .as_str()
            .is_some_and(|m| m.contains("not a backend")),
        "{stray}"
    );
}

/// Federation and certificates as `weftctl` shows them, against real control planes sharing a
/// root: `peers` (SYNCED, a peer that never answers, STALE after its control plane dies),
/// `endpoints` marking stale endpoints and adding what a real sidecar measured, and `check`
/// finding the stale and unreachable peers and a proxy whose certificate stopped renewing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_endpoints_and_check_show_federation_and_certificates() {
    use std::time::Duration;
    use weft_testkit::world;
    let base = tempfile::tempdir().expect("tempdir");
    let cas = weft_testkit::shared_root_ca_dirs(base.path(), &["east", "west"]).expect("CAs");
    let (east_dir, west_dir) = (base.path().join("east"), base.path().join("west"));
    std::fs::create_dir_all(&east_dir).expect("dir");
    std::fs::create_dir_all(&west_dir).expect("dir");
    let ep: std::net::SocketAddr = "127.0.60.1:8080".parse().expect("addr");
    std::fs::write(
        east_dir.join("world.yaml"),
        world::docs(&[
            world::service("echo", 80),
            world::slice("echo", "echo", &[(ep, "n1", true)]),
            world::export("echo"),
        ]),
    )
    .expect("write");
    let grace = Duration::from_secs(60);
    let east = weft_testkit::start_cluster_control_plane(&east_dir, "east", &cas[0], grace, None)
        .await
        .expect("east");
    let local: std::net::SocketAddr = "127.0.60.2:8080".parse().expect("addr");
    std::fs::write(
        west_dir.join("world.yaml"),
        world::docs(&[
            world::service("echo", 80),
            world::slice("echo", "echo", &[(local, "n1", true)]),
            world::cross_cluster_policy("echo"),
            world::mesh_peer("east", &east.grpc_addr.to_string()),
            world::mesh_peer("ghost", "127.0.0.1:1"),
        ]),
    )
    .expect("write");
    let west = weft_testkit::start_cluster_control_plane(&west_dir, "west", &cas[1], grace, None)
        .await
        .expect("west");
    // Peering is configured on both sides: east serves west once it names west.
    std::fs::write(
        east_dir.join("peers.yaml"),
        world::mesh_peer("west", &west.grpc_addr.to_string()),
    )
    .expect("write");
    let cp = target(&west);
    let run = |args: Vec<&'static str>| {
        let cp = cp.clone();
        async move {
            tokio::task::spawn_blocking(move || weftctl(&cp, &args))
                .await
                .expect("join")
        }
    };
    let row = |v: &Value, name: &str| {
        v.as_array()
            .and_then(|a| a.iter().find(|r| r["name"] == name).cloned())
            .unwrap_or(Value::Null)
    };
    let mut synced = Value::Null;
    for _ in 0..100 {
        let (_, v) = run(vec!["peers"]).await;
        synced = v;
        if row(&synced, "east")["state"] == "SYNCED"
            && !row(&synced, "ghost")["last_error"]
                .as_str()
                .unwrap_or_default()
                .is_empty()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, _) = run(vec!["peers"]).await;
    assert_eq!(code, 1, "a peer not SYNCED means exit 1");
    let e = row(&synced, "east");
    assert_eq!(e["state"], "SYNCED", "{synced:#}");
    assert_eq!(
        (e["services"].as_u64(), e["endpoints"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(e["origin"], "MeshPeer");
    assert!(e["last_sync_seconds"].as_i64().is_some(), "{e}");
    let g = row(&synced, "ghost");
    assert_eq!(g["state"], "CONNECTING", "{g}");
    assert_eq!(g["last_sync_seconds"], Value::Null, "{g}");

    // A real sidecar of west: its view of echo's endpoints joins the control plane's.
    let mut rc = weft_sidecar::RunConfig::local(
        west.plaintext(),
        "127.0.60.3".parse().expect("ip"),
        "viewer",
    );
    rc.cluster = "west".into();
    let sidecar = weft_testkit::Sidecar::start(rc).await.expect("sidecar");
    weft_testkit::wait_ready(&sidecar, Duration::from_secs(15)).await;
    let admin = sidecar.admin_addr.to_string();
    let args: Vec<&'static str> = vec![
        "endpoints",
        "echo",
        "--from-proxy",
        Box::leak(admin.into_boxed_str()),
    ];
    let (code, rows) = run(args).await;
    assert_eq!(code, 0, "{rows:#}");
    let by_addr = |v: &Value, a: &str| {
        v.as_array()
            .and_then(|r| r.iter().find(|x| x["address"] == a).cloned())
            .unwrap_or(Value::Null)
    };
    let remote = by_addr(&rows, "127.0.60.1");
    assert_eq!(remote["cluster"], "east", "{rows:#}");
    assert_eq!(remote["stale"], false, "{rows:#}");
    let seen = &remote["proxy"];
    assert_eq!(seen["priority"], 1, "east after west's own: {rows:#}");
    assert_eq!(seen["ejected"], false, "{rows:#}");
    assert!(
        seen["ewma_ms"].as_f64().is_some_and(|m| m > 0.0),
        "{rows:#}"
    );
    assert_eq!(
        by_addr(&rows, "127.0.60.2")["proxy"]["priority"],
        0,
        "{rows:#}"
    );

    // A proxy whose certificate stopped renewing: an 8 s SVID, 6.5 s later.
    let token = weft_testkit::mint_token(&west, "default", "stuck")
        .await
        .expect("token");
    let (csr, _key) =
        weft_proto::tls::new_csr("spiffe://cluster.local/ns/default/sa/stuck").expect("csr");
    weft_testkit::sign_with_token(
        &west,
        weft_proto::identity::SignRequest {
            csr_pem: csr,
            token,
            requested_ttl_seconds: 8,
            node_id: "stuck".into(),
        },
    )
    .await
    .expect("signed");
    let mut ads = weft_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::connect(format!("http://{}", west.plaintext()))
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(
        weft_proto::envoy::envoy::service::discovery::v3::DiscoveryRequest {
            node: Some(weft_proto::envoy::envoy::config::core::v3::Node {
                id: "stuck".into(),
                ..Default::default()
            }),
            type_url: weft_proto::type_url::CLUSTER.into(),
            ..Default::default()
        },
    )
    .await
    .expect("send");
    let _stream = ads
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream");

    // East goes away: its endpoint is kept, stale; check names it.
    drop(east);
    let mut findings = Value::Null;
    let found = |f: &Value, code: &str, object: &str| {
        f.as_array().is_some_and(|a| {
            a.iter().any(|x| {
                x["code"] == code && x["object"].as_str().is_some_and(|o| o.contains(object))
            })
        })
    };
    for _ in 0..150 {
        let (code, f) = run(vec!["check"]).await;
        assert_eq!(code, 1);
        findings = f;
        if found(&findings, "peer-stale", "peer east")
            && found(&findings, "cert-near-expiry", "proxy stuck")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(found(&findings, "peer-stale", "peer east"), "{findings:#}");
    assert!(
        found(&findings, "peer-unreachable", "peer ghost"),
        "{findings:#}"
    );
    assert!(
        found(&findings, "cert-near-expiry", "proxy stuck"),
        "{findings:#}"
    );
    assert!(
        !found(&findings, "cert-near-expiry", "proxy viewer"),
        "a proxy without an issued certificate is not flagged: {findings:#}"
    );
    let (_, rows) = run(vec!["endpoints", "echo"]).await;
    assert_eq!(by_addr(&rows, "127.0.60.1")["stale"], true, "{rows:#}");
    let (_, peers) = run(vec!["peers"]).await;
    assert_eq!(row(&peers, "east")["state"], "STALE", "{peers:#}");
    assert!(
        row(&peers, "east")["stale_seconds"].as_i64().is_some(),
        "{peers:#}"
    );
}

/// `weftctl inject` with the cluster unreachable asks the control plane for the mesh roots,
/// authenticated by the operator credentials' roots: the pod carries that control plane's
/// bundle. A control plane of another mesh (another CA) is refused, and with neither source
/// the error names both and the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inject_takes_the_roots_from_the_control_plane_when_the_cluster_is_unreachable() {
    let (_dir, cp) = weft_testkit::control_plane_over(&[]).await;
    let (_other_dir, other) = weft_testkit::control_plane_over(&[]).await;
    let ours = target(&cp);
    let home = tempfile::tempdir().expect("home");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let kubeconfig = home.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: gone, cluster: {{server: \"http://{closed}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: gone, context: {{cluster: gone, user: u}}}}]\ncurrent-context: gone\n"
        ),
    )
    .expect("kubeconfig");
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../injector/tests/fixtures/pod.yaml"
    );
    let inject = |cp_addr: &str, credentials: Option<&std::path::Path>| {
        let mut c = Command::new(WEFTCTL);
        c.env("KUBECONFIG", &kubeconfig)
            .env("HOME", home.path())
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("WEFT_CREDENTIALS")
            .args(["inject", "-f", fixture, "--cp", cp_addr]);
        if let Some(p) = credentials {
            c.arg("--credentials").arg(p);
        }
        let out = c.output().expect("weftctl inject");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let line_of = |pem: &str| {
        pem.lines()
            .find(|l| !l.starts_with("-----") && l.len() > 40)
            .expect("a base64 line")
            .to_string()
    };
    let (ok, stdout, stderr) = inject(&ours.addr, Some(&ours.credentials));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&line_of(cp.ca.root_pem())),
        "the control plane's root is not in the pod:\n{stdout}"
    );
    assert!(stderr.contains("weft-root"), "says why: {stderr}");
    // Our credentials do not authenticate another mesh's control plane: no roots from it.
    let (ok, stdout, stderr) = inject(&other.grpc_addr.to_string(), Some(&ours.credentials));
    assert!(!ok, "a control plane of another CA was believed:\n{stdout}");
    assert!(!stdout.contains(&line_of(other.ca.root_pem())));
    assert!(stderr.contains("control plane"), "{stderr}");
    // Neither the cluster nor credentials: both named, and the flag that overrides them.
    let (ok, _, stderr) = inject(&ours.addr, None);
    assert!(!ok);
    assert!(
        stderr.contains("weft-root")
            && stderr.contains("--credentials")
            && stderr.contains("--root-cert"),
        "{stderr}"
    );
}
