//! Per-workload and per-port mTLS modes (PeerAuthentication, Weft's and Istio's), sent to each
//! sidecar explicitly in its `weft-inbound` Listener, and the protocol a port name declares.
//!
//! Each test is an attack that worked before: a namespace without Services fell back to
//! PERMISSIVE once a config arrived; a STRICT PeerAuthentication was not read at all, so its
//! workload took plaintext on the inbound and was sent plaintext by clients without a
//! certificate; a port named `http-web` was sniffed, so bytes that are not HTTP reached the
//! application raw.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_proto::tls::MtlsMode;
use weft_testkit::echo::{Echo, Identity};
use weft_testkit::{Sidecar, get_via, world};

fn who(name: &str) -> Identity {
    Identity {
        name: name.into(),
        cluster: "cluster-1".into(),
        zone: String::new(),
    }
}

/// A pod of `namespace` with `labels` (YAML flow map), meshed.
fn pod(name: &str, namespace: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels: {{weft.dev/tls-mode: weft, {labels}}}\nspec:\n  serviceAccountName: {name}\n  containers: [{{name: app, image: app}}]\n"
    )
}

/// A sidecar for pod `<pod>.<namespace>`, its inbound at `inbound`, forwarding to `app`.
async fn sidecar(
    cp: SocketAddr,
    inbound: SocketAddr,
    pod: &str,
    namespace: &str,
    app: SocketAddr,
) -> Sidecar {
    let mut cfg = weft_sidecar::RunConfig::local(cp, inbound.ip(), &format!("{pod}.{namespace}"));
    cfg.namespace = namespace.into();
    cfg.cluster = "cluster-1".into();
    cfg.inbound_addr = inbound;
    cfg.app_addr = Some(app);
    let sc = Sidecar::start(cfg).await.expect("sidecar");
    weft_testkit::wait_ready(&sc, Duration::from_secs(15)).await;
    sc
}

/// Sends one plaintext GET to the inbound; whether the application answered it.
async fn plaintext_reaches_app(inbound: SocketAddr, app_name: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(inbound).await else {
        return false;
    };
    let _ = s
        .write_all(b"GET / HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).contains(app_name)
}

async fn refused(sc: &Sidecar, reason: &str) -> f64 {
    let (_, metrics) = get_via(sc.admin_addr, "admin", "/metrics")
        .await
        .expect("metrics");
    weft_testkit::metric_sum(
        &metrics,
        "weft_proxy_inbound_refused_total",
        &[&format!("reason=\"{reason}\"")],
    )
}

#[tokio::test]
async fn a_strict_namespace_without_services_refuses_plaintext_after_the_config_arrives() {
    let app = Echo::start(SocketAddr::from(([127, 0, 81, 1], 0)), who("vault"))
        .await
        .expect("app");
    let (_dir, cp) = weft_testkit::control_plane_over(&[
        world::namespace("secure", "STRICT"),
        pod("vault-0", "secure", "app: vault"),
        // Something else in the mesh, so the proxy does get a config.
        world::service("echo", 80),
    ])
    .await;
    let inbound: SocketAddr = "127.0.81.100:15006".parse().expect("addr");
    let sc = sidecar(cp.plaintext(), inbound, "vault-0", "secure", app.addr).await;
    weft_testkit::eventually(
        "the inbound policy arrived",
        Duration::from_secs(10),
        || sc.xds.config.load().inbound.is_some(),
    )
    .await;
    let policy = sc.xds.config.load().inbound.clone().expect("policy");
    assert_eq!(policy.mode, MtlsMode::Strict, "{policy:?}");
    assert_eq!(policy.source, "Namespace secure");
    assert!(!plaintext_reaches_app(inbound, "vault").await);
    assert_eq!(app.served.load(Ordering::Relaxed), 0);
    assert!(refused(&sc, "plaintext-in-strict").await >= 1.0);
}

#[tokio::test]
async fn a_workload_policy_closes_a_permissive_namespace_and_a_port_level_one_reopens_a_port() {
    let db_app = Echo::start(SocketAddr::from(([127, 0, 82, 1], 0)), who("db"))
        .await
        .expect("app");
    let web_app = Echo::start(SocketAddr::from(([127, 0, 82, 2], 0)), who("web"))
        .await
        .expect("app");
    let db_in: SocketAddr = "127.0.82.101:15006".parse().expect("addr");
    let web_in: SocketAddr = "127.0.82.102:15006".parse().expect("addr");
    let (_dir, cp) = weft_testkit::control_plane_over(&[
        world::namespace("default", "PERMISSIVE"),
        world::service("echo", 80),
        pod("db-0", "default", "app: db"),
        pod("web-0", "default", "app: web"),
        // Istio's kind: the database takes mTLS only.
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: db, namespace: default}\nspec:\n  selector: {matchLabels: {app: db}}\n  mtls: {mode: STRICT}\n".to_string(),
        // Weft's kind: the web pod is STRICT except on its inbound port.
        format!(
            "apiVersion: weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: web, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  mtls: {{mode: STRICT}}\n  portLevelMtls:\n    \"{}\": {{mode: PERMISSIVE}}\n",
            web_in.port()
        ),
    ])
    .await;
    let db = sidecar(cp.plaintext(), db_in, "db-0", "default", db_app.addr).await;
    let web = sidecar(cp.plaintext(), web_in, "web-0", "default", web_app.addr).await;
    for sc in [&db, &web] {
        weft_testkit::eventually(
            "the inbound policy arrived",
            Duration::from_secs(10),
            || sc.xds.config.load().inbound.is_some(),
        )
        .await;
    }
    let db_policy = db.xds.config.load().inbound.clone().expect("policy");
    assert_eq!(
        (db_policy.mode, db_policy.source.as_str()),
        (
            MtlsMode::Strict,
            "PeerAuthentication.security.istio.io default/db"
        )
    );
    assert!(
        !plaintext_reaches_app(db_in, "db").await,
        "plaintext reached a workload whose PeerAuthentication is STRICT"
    );
    assert_eq!(db_app.served.load(Ordering::Relaxed), 0);
    assert!(refused(&db, "plaintext-in-strict").await >= 1.0);
    // The port-level override is PERMISSIVE: plaintext is served there.
    assert!(plaintext_reaches_app(web_in, "web").await);
    let web_policy = web.xds.config.load().inbound.clone().expect("policy");
    assert_eq!(web_policy.mode, MtlsMode::Strict);
    assert_eq!(
        web_policy.ports.get(&web_in.port()).and_then(|p| p.mode),
        Some(MtlsMode::Permissive)
    );
}

#[tokio::test]
async fn a_port_named_http_dash_something_is_parsed_never_sniffed() {
    let app = tokio::net::TcpListener::bind("127.0.83.1:0")
        .await
        .expect("bind");
    let app_addr = app.local_addr().expect("addr");
    let reached = Arc::new(AtomicU32::new(0));
    let count = reached.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = app.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
        }
    });
    let inbound: SocketAddr = "127.0.83.100:15006".parse().expect("addr");
    // No appProtocol: the name's prefix declares HTTP. The slice names no pod, so the
    // control plane finds this sidecar's port by its IP.
    let (_dir, cp) = weft_testkit::control_plane_over(&[format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  ports: [{{name: http-web, port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http-web, port: {}}}]\nendpoints:\n- addresses: [\"{}\"]\n",
        inbound.port(),
        inbound.ip()
    )])
    .await;
    let sc = sidecar(cp.plaintext(), inbound, "web-0", "default", app_addr).await;
    weft_testkit::eventually("the port is declared HTTP", Duration::from_secs(10), || {
        sc.xds.config.load().inbound.as_ref().is_some_and(|i| {
            i.ports.get(&inbound.port()).map(|p| p.protocol.as_str()) == Some("http")
        })
    })
    .await;
    for garbage in [&b"\x00\x01\x02 binary"[..], b"HELLO there\r\n"] {
        let mut s = TcpStream::connect(inbound).await.expect("connect");
        let _ = s.write_all(garbage).await;
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
    }
    assert_eq!(
        reached.load(Ordering::Relaxed),
        0,
        "bytes that are not HTTP reached the application on a port named http-web"
    );
    assert!(refused(&sc, "not-http").await >= 2.0);
}

#[tokio::test]
async fn an_endpoint_strict_by_its_own_policy_is_never_sent_plaintext() {
    let server = Echo::start(SocketAddr::from(([127, 0, 84, 1], 0)), who("echo-0"))
        .await
        .expect("echo");
    let (_dir, cp) = weft_testkit::control_plane_over(&[
        world::namespace("default", "PERMISSIVE"),
        world::service("echo", 80),
        world::pod("echo-0", "echo", true),
        world::pod_slice("echo", "echo", &[(server.addr, "echo-0")]),
        "apiVersion: weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: echo, namespace: default}\nspec:\n  selector: {matchLabels: {app: echo}}\n  mtls: {mode: STRICT}\n".to_string(),
    ])
    .await;
    // A client proxy with no identity (plaintext xDS, no join token).
    let sc = weft_testkit::start_sidecar(cp.plaintext(), [127, 0, 84, 100].into(), "client", "")
        .await
        .expect("sidecar");
    weft_testkit::wait_ready(&sc, Duration::from_secs(15)).await;
    let (status, body) = get_via(sc.outbound_addr, "echo", "/")
        .await
        .expect("request");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("requires mTLS"), "{body}");
    assert_eq!(
        server.served.load(Ordering::Relaxed),
        0,
        "an endpoint STRICT by its PeerAuthentication was sent plaintext"
    );
}
