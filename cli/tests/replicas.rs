//! Two control-plane replicas in process, as installed: proxies reach them through one address
//! that picks a replica per connection (a stand-in for the Service's ClusterIP, written here),
//! and the replicas find each other as the endpoints of their own Service
//! (`weft-system/weft-control-plane`, port `grpc-tls`) in the catalog.
//!
//! - Streams end at their max age (2 s here), so proxies that all joined one replica spread
//!   over both once the second is up.
//! - `weftctl status`, `endpoints --proxy`, `proxy-config` and `check` asked of either replica
//!   give the mesh-wide view and name the replica holding each proxy; a replica that cannot be
//!   reached is reported, not silently left out.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use weft_testkit::{ControlPlane, Sidecar, world};

const WEFTCTL: &str = env!("CARGO_BIN_EXE_weftctl");
const PROXIES: usize = 6;

fn ip(host: u8) -> IpAddr {
    IpAddr::from([127, 0, 63, host])
}

/// One address for many replicas: each accepted connection goes to a random current backend.
async fn balancer(backends: Arc<Mutex<Vec<SocketAddr>>>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip(9), 0))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                continue;
            };
            let choice = {
                let list = backends.lock().map(|l| l.clone()).unwrap_or_default();
                (!list.is_empty()).then(|| list[rand::random_range(0..list.len())])
            };
            tokio::spawn(async move {
                let Some(to) = choice else { return };
                if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    addr
}

/// A replica named `name` on 127.0.63.<host>, its CA under the shared root in `ca_dir`.
async fn replica(
    world: &std::path::Path,
    ca_dir: &std::path::Path,
    name: &str,
    host: u8,
) -> ControlPlane {
    let mut cfg = weft_control_plane::Config::local(world);
    cfg.ca_dir = Some(ca_dir.to_path_buf());
    cfg.replica = Some(name.into());
    cfg.grpc_addr = SocketAddr::new(ip(host), 0);
    cfg.xds_plaintext_addr = Some(SocketAddr::new(ip(host), 0));
    cfg.replica_service = "weft-system/weft-control-plane".into();
    cfg.xds_max_stream_age = Duration::from_secs(2);
    ControlPlane::start(cfg).await.expect("replica")
}

/// The replicas' own Service and one EndpointSlice per replica (its TLS port).
fn replica_service(replicas: &[&ControlPlane]) -> Vec<String> {
    let mut docs = vec!["apiVersion: v1\nkind: Service\nmetadata: {name: weft-control-plane, namespace: weft-system}\nspec:\n  ports: [{name: grpc-tls, port: 15012, appProtocol: grpc}]\n".to_string()];
    for (i, r) in replicas.iter().enumerate() {
        docs.push(format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: weft-control-plane-{i}\n  namespace: weft-system\n  labels: {{kubernetes.io/service-name: weft-control-plane}}\naddressType: IPv4\nports: [{{name: grpc-tls, port: {}}}]\nendpoints:\n- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n",
            r.grpc_addr.port(),
            r.grpc_addr.ip()
        ));
    }
    docs
}

/// `weftctl --cp <cp's TLS port> -o json <args>` with fresh operator credentials from cp's
/// CA: (exit code, JSON, stderr).
fn weftctl(cp: &ControlPlane, args: &[&str]) -> (i32, Value, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let credentials = weft_testkit::operator_credentials(cp, dir.path(), "tester");
    let out = Command::new(WEFTCTL)
        .args(args)
        .args([
            "--cp",
            &cp.grpc_addr.to_string(),
            "-o",
            "json",
            "--credentials",
        ])
        .arg(&credentials)
        .output()
        .expect("weftctl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {text}\n{err}"));
    (out.status.code().unwrap_or(-1), v, err)
}

/// (proxy, replica) rows of `weftctl status` asked of `cp`.
fn status_rows(cp: &ControlPlane) -> (i32, Vec<(String, String)>, String) {
    let (code, v, err) = weftctl(cp, &["status"]);
    let rows = v
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["proxy"].as_str().unwrap_or_default().to_string(),
                r["replica"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    (code, rows, err)
}

/// Proxies connected to `cp` now.
fn held_by(cp: &ControlPlane) -> usize {
    cp.metrics.connected_proxies.get().max(0) as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica_answers_for_the_whole_mesh_and_proxies_spread_over_replicas() {
    let dir = tempfile::tempdir().expect("tempdir");
    let world_dir = dir.path().join("world");
    std::fs::create_dir_all(&world_dir).expect("world dir");
    let echo = SocketAddr::new(ip(50), 8080);
    let app = vec![
        world::service("echo", 80),
        world::slice("echo", "echo", &[(echo, "n1", true)]),
    ];
    std::fs::write(world_dir.join("world.yaml"), world::docs(&app)).expect("world");
    // One cluster, so one CA directory (the install's Secret) for both replicas.
    let cas = weft_testkit::shared_root_ca_dirs(dir.path(), &["cluster-1"]).expect("CA dirs");

    // Replica a alone behind the Service address: every proxy joins it.
    let a = replica(&world_dir, &cas[0], "replica-a", 1).await;
    let backends = Arc::new(Mutex::new(vec![a.plaintext()]));
    let service = balancer(backends.clone()).await;
    let mut sidecars: Vec<Sidecar> = Vec::new();
    for i in 0..PROXIES {
        let sc = weft_testkit::start_sidecar(service, ip(20 + i as u8), &format!("proxy-{i}"), "z")
            .await
            .expect("sidecar");
        sidecars.push(sc);
    }
    for sc in &sidecars {
        weft_testkit::wait_ready(sc, Duration::from_secs(15)).await;
    }
    assert_eq!(held_by(&a), PROXIES);

    // Replica b joins; the replicas' Service lists both.
    let b = replica(&world_dir, &cas[0], "replica-b", 2).await;
    if let Ok(mut l) = backends.lock() {
        l.push(b.plaintext());
    }
    let mut docs = app.clone();
    docs.extend(replica_service(&[&a, &b]));
    std::fs::write(world_dir.join("world.yaml"), world::docs(&docs)).expect("world");

    // Streams age out and reconnect through the Service address: both replicas hold some.
    weft_testkit::eventually(
        "proxies spread over both replicas",
        Duration::from_secs(40),
        || held_by(&a) > 0 && held_by(&b) > 0 && held_by(&a) + held_by(&b) == PROXIES,
    )
    .await;

    // Either replica shows every proxy, each with the replica that holds it.
    for (asked, name) in [(&a, "replica-a"), (&b, "replica-b")] {
        let (code, rows, err) = weft_testkit::until_ok(
            &format!("{name} shows all {PROXIES} proxies on both replicas"),
            Duration::from_secs(20),
            || async {
                let (code, rows, err) = status_rows(asked);
                let mut proxies: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
                proxies.sort();
                proxies.dedup();
                let on = |r: &str| rows.iter().any(|x| x.1 == r);
                if proxies.len() == PROXIES && on("replica-a") && on("replica-b") && code == 0 {
                    Ok((code, rows.clone(), err))
                } else {
                    Err(format!("exit {code}: {rows:?}; {err}"))
                }
            },
        )
        .await;
        assert_eq!(code, 0, "{err}");
        assert!(
            err.contains("replica-a (") && err.contains("replica-b ("),
            "stderr names both replicas: {err}"
        );
        assert!(rows.len() >= PROXIES);
    }

    // A proxy held by b, asked of a: endpoints as it sees them and its config.
    let (_, rows, _) = status_rows(&a);
    let on_b = rows
        .iter()
        .find(|r| r.1 == "replica-b")
        .map(|r| r.0.clone())
        .expect("a proxy on b");
    let (code, eps, err) = weftctl(&a, &["endpoints", "echo", "--proxy", &on_b]);
    assert_eq!(code, 0, "{err}");
    assert!(
        eps.to_string().contains(&echo.ip().to_string()),
        "endpoints as {on_b} sees them: {eps}"
    );
    let (code, cfg, err) = weftctl(&a, &["proxy-config", &on_b]);
    assert_eq!(code, 0, "{err}");
    assert!(
        cfg.to_string().contains("echo.default.svc.cluster.local"),
        "{cfg}"
    );
    let (_, findings, _) = weftctl(&a, &["check"]);
    assert!(
        !findings.to_string().contains("replica-unreachable"),
        "{findings}"
    );

    // b goes away (its endpoint still listed): a says so instead of showing half the mesh.
    if let Ok(mut l) = backends.lock() {
        l.retain(|x| *x != b.plaintext());
    }
    drop(b);
    let (code, _, err) = weft_testkit::until_ok(
        "a reports the unreachable replica",
        Duration::from_secs(20),
        || async {
            let (code, rows, err) = status_rows(&a);
            match err.contains("was not reached") {
                true => Ok((code, rows, err)),
                false => Err(err),
            }
        },
    )
    .await;
    assert_eq!(code, 1, "an incomplete view exits 1: {err}");
    let (_, findings, _) = weftctl(&a, &["check"]);
    assert!(
        findings.to_string().contains("replica-unreachable"),
        "{findings}"
    );
    drop(sidecars);
}
