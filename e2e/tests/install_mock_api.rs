//! `weftctl install` run for real (the binary, with a kubeconfig) against a **mock API server**
//! (no real API server can run here; see LAB.md): a small HTTP server in this file that answers
//! API discovery, GETs and server-side-apply PATCHes and keeps what was applied. The control
//! plane is then started from the `weft-ca` Secret it applied — its files written where the
//! kubelet would mount them — and real sidecars join with the `weft-root` ConfigMap's bundle.
//!
//! Re-running install keeps the mesh root (a restarted control plane still serves the proxies
//! that joined before); `--rotate-root` twice moves to a new root while workloads from before
//! and after keep talking mTLS with verified identities.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use weft_e2e::lab::bin;
use weft_testkit::echo::{Echo, Identity};
use weft_testkit::{ControlPlane, Sidecar, get_via, world};

/// (group/version, kind, plural, namespaced) of every kind the install applies.
const RESOURCES: [(&str, &str, &str, bool); 13] = [
    ("v1", "Namespace", "namespaces", false),
    ("v1", "ServiceAccount", "serviceaccounts", true),
    ("v1", "Service", "services", true),
    ("v1", "Secret", "secrets", true),
    ("v1", "ConfigMap", "configmaps", true),
    (
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        false,
    ),
    (
        "rbac.authorization.k8s.io/v1",
        "ClusterRole",
        "clusterroles",
        false,
    ),
    (
        "rbac.authorization.k8s.io/v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
    ),
    ("rbac.authorization.k8s.io/v1", "Role", "roles", true),
    (
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
        "rolebindings",
        true,
    ),
    ("apps/v1", "Deployment", "deployments", true),
    (
        "policy/v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        true,
    ),
    (
        "admissionregistration.k8s.io/v1",
        "MutatingWebhookConfiguration",
        "mutatingwebhookconfigurations",
        false,
    ),
];

/// The mock API server's store: object path -> object.
type Store = Arc<Mutex<BTreeMap<String, Value>>>;

fn lock(s: &Store) -> std::sync::MutexGuard<'_, BTreeMap<String, Value>> {
    match s.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn respond(status: u16, v: &Value) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap_or_default()
}

fn not_found(what: &str) -> hyper::Response<Full<Bytes>> {
    respond(
        404,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("{what} not found"), "reason": "NotFound", "code": 404}),
    )
}

async fn handle(
    store: Store,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // Discovery: the resource list of one group/version.
    let gv = path
        .strip_prefix("/api/")
        .or_else(|| path.strip_prefix("/apis/"))
        .unwrap_or_default()
        .to_string();
    if method == hyper::Method::GET && RESOURCES.iter().any(|r| r.0 == gv) {
        let resources: Vec<Value> = RESOURCES
            .iter()
            .filter(|r| r.0 == gv)
            .map(|(_, kind, plural, namespaced)| {
                json!({"name": plural, "singularName": kind.to_lowercase(), "namespaced": namespaced,
                    "kind": kind, "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
            })
            .collect();
        return respond(
            200,
            &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
        );
    }
    match method {
        hyper::Method::GET => match lock(&store).get(&path) {
            Some(obj) => respond(200, obj),
            None => not_found(&path),
        },
        hyper::Method::PATCH => {
            let ctype = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            if ctype != "application/apply-patch+yaml" {
                return respond(
                    415,
                    &json!({"kind": "Status", "code": 415, "message": ctype}),
                );
            }
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return respond(400, &json!({"kind": "Status", "code": 400})),
            };
            let Ok(mut obj) = serde_json::from_slice::<Value>(&body) else {
                return respond(400, &json!({"kind": "Status", "code": 400}));
            };
            // weftctl is the only field manager here: its apply is the whole object, as
            // server-side apply makes it (fields it no longer sends are removed).
            let mut store = lock(&store);
            let version = store.len() + 1;
            obj["metadata"]["resourceVersion"] = json!(version.to_string());
            store.insert(path, obj.clone());
            respond(200, &obj)
        }
        _ => respond(405, &json!({"kind": "Status", "code": 405})),
    }
}

/// Starts the mock API server; returns its address.
async fn mock_api_server(store: Store) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let store = store.clone();
                    async move { Ok::<_, Infallible>(handle(store, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

const SECRET: &str = "/api/v1/namespaces/weft-system/secrets/weft-ca";
const CONFIG_MAP: &str = "/api/v1/namespaces/weft-system/configmaps/weft-root";
const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/weft-system/deployments/weft-control-plane";

/// Runs `weftctl install <extra>` against the mock; panics with its output on failure.
fn install(kubeconfig: &std::path::Path, extra: &[&str]) -> String {
    let out = std::process::Command::new(bin("weftctl"))
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .arg("install")
        .args(extra)
        .arg("--root-out-dir")
        .arg(
            kubeconfig
                .parent()
                .unwrap_or(std::path::Path::new("/nonexistent")),
        )
        .arg("--credentials-out")
        .arg(
            kubeconfig
                .parent()
                .unwrap_or(std::path::Path::new("/nonexistent"))
                .join("credentials.pem"),
        )
        .output()
        .expect("weftctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "weftctl install {extra:?}: {text}");
    text
}

/// The `weft-ca` Secret as applied, decoded.
fn secret(store: &Store) -> BTreeMap<String, String> {
    let obj = lock(store)
        .get(SECRET)
        .cloned()
        .expect("Secret weft-ca applied");
    obj["data"]
        .as_object()
        .expect("data")
        .iter()
        .map(|(k, v)| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap_or_default())
                .expect("base64");
            (k.clone(), String::from_utf8(bytes).expect("PEM"))
        })
        .collect()
}

fn bundle(store: &Store) -> String {
    lock(store).get(CONFIG_MAP).expect("ConfigMap weft-root")["data"]["root.pem"]
        .as_str()
        .expect("root.pem")
        .to_string()
}

fn root_annotation(store: &Store) -> String {
    lock(store).get(DEPLOYMENT).expect("Deployment")["spec"]["template"]["metadata"]["annotations"]
        [weft_proto::keys::CA_ROOT_FINGERPRINT_ANNOTATION]
        .as_str()
        .expect("root annotation")
        .to_string()
}

/// Writes the Secret's files into `dir` as the kubelet keeps a mounted Secret: every key a
/// file, files of keys no longer there removed.
fn mount(store: &Store, dir: &std::path::Path) {
    std::fs::create_dir_all(dir).expect("mount dir");
    let files = secret(store);
    for e in std::fs::read_dir(dir).expect("read mount").flatten() {
        if !files.contains_key(&e.file_name().to_string_lossy().into_owned()) {
            std::fs::remove_file(e.path()).expect("remove");
        }
    }
    for (k, v) in files {
        std::fs::write(dir.join(k), v).expect("write");
    }
}

fn ip(host: u8) -> IpAddr {
    IpAddr::from([127, 0, 62, host])
}

/// A control plane over `world` whose CA is the mounted root in `ca_root`, on `addrs`
/// (TLS, plaintext) when given — a replica restarted in place.
async fn control_plane(
    world: &std::path::Path,
    ca_root: &std::path::Path,
    addrs: Option<(SocketAddr, SocketAddr)>,
) -> ControlPlane {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut cfg = weft_control_plane::Config::local(world);
        cfg.ca_dir = Some(ca_root.to_path_buf());
        if let Some((tls, plain)) = addrs {
            cfg.grpc_addr = tls;
            cfg.xds_plaintext_addr = Some(plain);
        }
        match ControlPlane::start(cfg).await {
            Ok(cp) => return cp,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("control plane: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A meshed workload: an echo app and its sidecar (service account `sa`, inbound at
/// 127.0.62.<host>:15006), bootstrapped with a join token and the ConfigMap's `bundle`.
async fn workload(
    cp: &ControlPlane,
    dir: &std::path::Path,
    host: u8,
    sa: &str,
    bundle: &str,
) -> (Echo, Sidecar) {
    let echo = Echo::start(
        SocketAddr::new(ip(host + 100), 0),
        Identity {
            name: format!("{sa}-0"),
            cluster: "cluster-1".into(),
            zone: String::new(),
        },
    )
    .await
    .expect("echo");
    let mut cfg = weft_testkit::mesh_sidecar_config(cp, dir, ip(host), sa, sa)
        .await
        .expect("sidecar config");
    // The bundle the injector hands the proxy: the weft-root ConfigMap's.
    let path = dir.join(format!("{sa}-configmap-root.pem"));
    std::fs::write(&path, bundle).expect("write bundle");
    cfg.trust_bundle = Some(path);
    cfg.inbound_addr = SocketAddr::new(ip(host), 15006);
    cfg.app_addr = Some(echo.addr);
    cfg.cert_ttl = Duration::from_secs(6);
    let sc = Sidecar::start(cfg).await.expect("sidecar");
    weft_testkit::wait_ready(&sc, Duration::from_secs(15)).await;
    (echo, sc)
}

async fn certs(sc: &Sidecar) -> weft_sidecar::admin::CertsView {
    let (_, body) = get_via(sc.admin_addr, "admin", "/certs")
        .await
        .expect("/certs");
    serde_json::from_str(&body).expect("certs JSON")
}

/// Is `node` connected to `cp` with every type ACKed?
async fn synced(cp: &ControlPlane, node: &str) -> Result<(), String> {
    let mut admin = weft_testkit::operator_admin(cp)
        .await
        .map_err(|e| e.to_string())?;
    let proxies = admin
        .list_proxies(weft_proto::admin::ListProxiesRequest::default())
        .await
        .map_err(|e| e.to_string())?
        .into_inner()
        .proxies;
    let p = proxies
        .iter()
        .find(|p| p.node_id == node)
        .ok_or_else(|| format!("{node} not connected"))?;
    match p.types.iter().all(|t| !t.acked_version.is_empty()) && p.types.len() == 4 {
        true => Ok(()),
        false => Err(format!("{node}: {:?}", p.types)),
    }
}

/// A request from `from` to `host` answers 200 from the app, which saw `caller` verified.
async fn talks(from: &Sidecar, host: &str, to: &Echo, caller: &str) {
    weft_testkit::until_ok(
        &format!("{host} answers"),
        Duration::from_secs(15),
        || async {
            match get_via(from.outbound_addr, host, "/").await {
                Ok((200, body)) => Ok(body),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let seen = to
        .behavior
        .last_client_identity
        .lock()
        .ok()
        .and_then(|g| g.clone());
    assert_eq!(
        seen.as_deref(),
        Some(caller),
        "the app saw the verified caller"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_api_server_reinstall_keeps_the_root_and_rotation_keeps_workloads_talking() {
    if !bin("weftctl").exists() {
        println!(
            "SKIP mock_api_server_reinstall_keeps_the_root_and_rotation_keeps_workloads_talking: {} is not built (cargo build --bins)",
            bin("weftctl").display()
        );
        return;
    }
    let store: Store = Arc::default();
    let api = mock_api_server(store.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: mock, cluster: {{server: \"http://{api}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: mock, context: {{cluster: mock, user: u}}}}]\ncurrent-context: mock\n"
        ),
    )
    .expect("kubeconfig");
    let world_dir = dir.path().join("world");
    std::fs::create_dir_all(&world_dir).expect("world dir");
    let endpoint = |host: u8| SocketAddr::new(ip(host), 15006);
    std::fs::write(
        world_dir.join("world.yaml"),
        world::docs(&[
            world::namespace("default", "STRICT"),
            world::service("old-app", 80),
            world::service("new-app", 80),
            world::pod("old-0", "old", true),
            world::pod("new-0", "new", true),
            world::pod_slice("old-app", "old-app", &[(endpoint(2), "old-0")]),
            world::pod_slice("new-app", "new-app", &[(endpoint(3), "new-0")]),
        ]),
    )
    .expect("world");
    let ca_root = dir.path().join("mounted-weft-ca");

    // First install: a new root; the control plane serves the first workload.
    install(&kubeconfig, &[]);
    let first = secret(&store);
    let first_annotation = root_annotation(&store);
    assert_eq!(
        bundle(&store),
        first["root.pem"],
        "the injector gets the root"
    );
    // The root key stays outside the cluster: the Secret has this cluster's intermediate, the
    // new root (with its key) was written beside the kubeconfig, to be kept offline.
    assert!(
        !first.contains_key("root.key.pem")
            && first.contains_key("intermediate.key.pem")
            && first.contains_key("token.key"),
        "{:?}",
        first.keys()
    );
    let roots: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("weft-root-"))
        .collect();
    assert_eq!(roots.len(), 1, "one new root written locally");
    assert!(roots[0].path().join("root.key.pem").exists());
    mount(&store, &ca_root);
    let cp = control_plane(&world_dir, &ca_root, None).await;
    let addrs = (cp.grpc_addr, cp.plaintext());
    // The operator credentials the install wrote work against the installed control plane.
    let status = std::process::Command::new(bin("weftctl"))
        .args(["status", "--cp", &cp.grpc_addr.to_string(), "--credentials"])
        .arg(dir.path().join("credentials.pem"))
        .output()
        .expect("weftctl");
    assert!(
        status.status.success(),
        "weftctl status with the install's credentials: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let (old_echo, old) = workload(&cp, dir.path(), 2, "old", &bundle(&store)).await;

    // Install again: the same root, no rollout; a replica restarted from the Secret still
    // serves the workload that joined before.
    let out = install(&kubeconfig, &[]);
    assert!(out.contains("kept"), "{out}");
    assert_eq!(secret(&store), first, "re-install changed the mesh root");
    assert_eq!(root_annotation(&store), first_annotation);
    mount(&store, &ca_root);
    drop(cp);
    let cp = control_plane(&world_dir, &ca_root, Some(addrs)).await;
    weft_testkit::until_ok(
        "the old workload resyncs after the restart",
        Duration::from_secs(20),
        || synced(&cp, "old"),
    )
    .await;

    // Rotation, step 1: a second root is trusted, the first still signs; no rollout.
    let out = install(&kubeconfig, &["--rotate-root"]);
    assert!(out.contains("step 1 of 2"), "{out}");
    let step1 = secret(&store);
    assert_eq!(
        step1["root.pem"], first["root.pem"],
        "the old root still signs"
    );
    let next_root = step1.get("next-root.pem").cloned().expect("next root");
    assert_eq!(
        weft_proto::tls::fingerprints(&bundle(&store)).len(),
        2,
        "the injector's bundle holds both roots"
    );
    assert_eq!(root_annotation(&store), first_annotation);
    mount(&store, &ca_root);
    // The workload renews (6 s certificates) and then trusts both roots.
    weft_testkit::until_ok(
        "the old workload trusts both roots",
        Duration::from_secs(20),
        || async {
            let n = certs(&old).await.trust_bundle.len();
            if n == 2 {
                Ok(())
            } else {
                Err(format!("{n} roots"))
            }
        },
    )
    .await;

    // Step 2: the new root signs (the replicas roll), the old one stays trusted.
    let out = install(&kubeconfig, &["--rotate-root"]);
    assert!(out.contains("step 2 of 2"), "{out}");
    let step2 = secret(&store);
    assert_eq!(step2["root.pem"], next_root);
    assert!(!step2.contains_key("next-root.pem"), "{:?}", step2.keys());
    assert_ne!(
        root_annotation(&store),
        first_annotation,
        "the replicas roll"
    );
    mount(&store, &ca_root);
    drop(cp);
    let cp = control_plane(&world_dir, &ca_root, Some(addrs)).await;
    let (new_echo, new) = workload(&cp, dir.path(), 3, "new", &bundle(&store)).await;
    let issuer_root = certs(&new).await;
    assert_eq!(issuer_root.chain.len(), 2, "leaf and intermediate");
    let new_root_subject = weft_proto::tls::describe(&[next_root])[0].subject.clone();
    assert_eq!(
        issuer_root.chain[1].issuer, new_root_subject,
        "the new workload's intermediate is signed by the new root"
    );

    // Old and new workloads talk both ways over mTLS, each verified by the other.
    talks(
        &old,
        "new-app",
        &new_echo,
        "spiffe://cluster.local/ns/default/sa/old",
    )
    .await;
    talks(
        &new,
        "old-app",
        &old_echo,
        "spiffe://cluster.local/ns/default/sa/new",
    )
    .await;
    weft_testkit::until_ok(
        "the old workload still syncs",
        Duration::from_secs(20),
        || synced(&cp, "old"),
    )
    .await;
}

/// `weftctl inject` without `--root-cert` takes the mesh roots from the cluster's `weft-root`
/// ConfigMap (what install wrote); with the API unreachable it says which flag to pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_api_server_inject_reads_the_mesh_root_from_the_cluster() {
    if !bin("weftctl").exists() {
        println!(
            "SKIP mock_api_server_inject_reads_the_mesh_root_from_the_cluster: {} is not built (cargo build --bins)",
            bin("weftctl").display()
        );
        return;
    }
    let store: Store = Arc::default();
    let api = mock_api_server(store.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig_for = |server: &str| {
        let path = dir
            .path()
            .join(format!("kubeconfig-{}", server.replace([':', '/'], "_")));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: mock, cluster: {{server: \"{server}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: mock, context: {{cluster: mock, user: u}}}}]\ncurrent-context: mock\n"
            ),
        )
        .expect("kubeconfig");
        path
    };
    let kubeconfig = kubeconfig_for(&format!("http://{api}"));
    install(&kubeconfig, &["--cluster-name", "east"]);
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../injector/tests/fixtures/pod.yaml"
    );
    let inject = |kubeconfig: &std::path::Path| {
        std::process::Command::new(bin("weftctl"))
            .env("KUBECONFIG", kubeconfig)
            .env("HOME", dir.path())
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("WEFT_CREDENTIALS")
            .args(["inject", "-f", fixture])
            .output()
            .expect("weftctl inject")
    };
    let out = inject(&kubeconfig);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    // The injected proxy carries the ConfigMap's bundle.
    let roots = bundle(&store);
    let line = roots
        .lines()
        .find(|l| !l.starts_with("-----") && l.len() > 40)
        .expect("a base64 line");
    assert!(
        stdout.contains(line),
        "the ConfigMap's root is not in the pod:\n{stdout}"
    );
    // Nothing answers: a clear error naming the flag, not a hang.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let out = inject(&kubeconfig_for(&format!("http://{closed}")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--root-cert") && stderr.contains("weft-root"),
        "{stderr}"
    );
}
