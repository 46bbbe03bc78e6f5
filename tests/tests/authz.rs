//! Authorization through real sidecars with real SVIDs: Istio AuthorizationPolicies from the
//! file source, compiled by the control plane into the server's `weft-inbound` RBAC filters
//! and enforced by its inbound on HTTP requests and opaque TCP connections.
//!
//! Each case is an attack that worked before: any meshed workload (or a plaintext caller in
//! a PERMISSIVE namespace) could call any other, whatever its identity, method, path or port.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_testkit::echo::{Echo, Identity};
use weft_testkit::{Sidecar, get_via, metric_sum, world};

const HOST: &str = "echo.default.svc.cluster.local";

fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::from([127, 0, net, host])
}

fn write_world(dir: &Path, docs: &[String]) {
    let tmp = dir.join(".world.yaml.tmp");
    std::fs::write(&tmp, world::docs(docs)).expect("world");
    std::fs::rename(&tmp, dir.join("world.yaml")).expect("rename world");
}

fn policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{spec}"
    )
}

/// The server's world: PERMISSIVE `default`, Service echo backed by pod echo-0 (meshed,
/// `app: echo`) at `endpoint`, with `port_name` as the slice's port name.
fn base(endpoint: SocketAddr, port_name: &str) -> Vec<String> {
    vec![
        world::namespace("default", "PERMISSIVE"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: default}}\nspec:\n  ports: [{{name: {port_name}, port: 80}}]\n"
        ),
        world::pod("echo-0", "echo", true),
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo\n  namespace: default\n  labels: {{kubernetes.io/service-name: echo}}\naddressType: IPv4\nports: [{{name: {port_name}, port: {}}}]\nendpoints:\n- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: echo-0, namespace: default}}\n",
            endpoint.port(),
            endpoint.ip()
        ),
    ]
}

/// A meshed sidecar in `default` running as `sa`, its node id naming pod `<pod>.default`.
async fn meshed(
    cp: &weft_testkit::ControlPlane,
    dir: &Path,
    at: IpAddr,
    pod: &str,
    sa: &str,
    app: Option<SocketAddr>,
) -> Sidecar {
    let mut cfg = weft_testkit::mesh_sidecar_config(cp, dir, at, &format!("{pod}.default"), sa)
        .await
        .expect("sidecar config");
    if let Some(app) = app {
        cfg.inbound_addr = SocketAddr::new(at, 15006);
        cfg.app_addr = Some(app);
    }
    let sc = Sidecar::start(cfg).await.expect("sidecar");
    weft_testkit::wait_ready(&sc, Duration::from_secs(15)).await;
    sc
}

/// Waits until the server sidecar holds RBAC filters `ready` accepts.
async fn filters_arrived(
    server: &Sidecar,
    ready: impl Fn(&weft_sidecar::state::InboundAuthz) -> bool,
) {
    weft_testkit::eventually(
        "the server's RBAC filters arrived",
        Duration::from_secs(10),
        || server.xds.config.load().authz().is_some_and(|a| ready(a)),
    )
    .await;
}

/// One kept-alive HTTP/1.1 connection to a proxy.
struct Conn(hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>);

impl Conn {
    async fn open(proxy: SocketAddr) -> Conn {
        let stream = TcpStream::connect(proxy).await.expect("connect");
        let (send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        Conn(send)
    }

    /// (status, body) of `method path`.
    async fn call(&mut self, method: &str, path: &str) -> (u16, String) {
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, HOST)
            .body(Empty::new())
            .expect("request");
        let resp = self.0.send_request(req).await.expect("response");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// What the control plane's `CheckAuthorization` (`weftctl authz check`) answers for one
/// request to echo from `default/<who>` (or plaintext).
async fn checked(
    cp: &weft_testkit::ControlPlane,
    who: Option<&str>,
    method: &str,
    path: &str,
) -> weft_proto::admin::AuthorizationVerdict {
    let mut admin = weft_testkit::operator_admin(cp).await.expect("admin");
    let mut v = admin
        .check_authorization(weft_proto::admin::CheckAuthorizationRequest {
            from: who.map(|w| format!("default/{w}")).unwrap_or_default(),
            namespace: "default".into(),
            service: "echo".into(),
            method: method.into(),
            path: path.into(),
            ..Default::default()
        })
        .await
        .expect("check")
        .into_inner()
        .verdicts;
    assert_eq!(v.len(), 1, "{v:?}");
    v.remove(0)
}

async fn metrics(sc: &Sidecar) -> String {
    get_via(sc.admin_addr, "admin", "/metrics")
        .await
        .expect("metrics")
        .1
}

/// The HTTP policies of the first test, as the platform team writes them.
fn http_policies() -> Vec<String> {
    vec![
        // alice may read the API; bob only /public on the inbound port; anyone in `default`
        // may read /ns-only.
        policy(
            "api",
            "  selector: {matchLabels: {app: echo}}\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/default/sa/alice]}}]\n    to: [{operation: {methods: [GET], paths: [/api/*]}}]\n  - from: [{source: {principals: [cluster.local/ns/default/sa/bob]}}]\n    to: [{operation: {ports: [\"15006\"], paths: [/public*]}}]\n  - from: [{source: {namespaces: [default]}}]\n    to: [{operation: {paths: [/ns-only]}}]\n",
        ),
        policy(
            "no-admin",
            "  action: DENY\n  rules:\n  - to: [{operation: {paths: [/api/admin*]}}]\n",
        ),
        policy(
            "audit-api",
            "  action: AUDIT\n  rules:\n  - to: [{operation: {paths: [/api/*]}}]\n",
        ),
    ]
}

#[tokio::test]
async fn http_requests_are_allowed_and_denied_by_identity_method_path_and_port() {
    let net = 90;
    let endpoint = SocketAddr::new(ip(net, 2), 15006);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut docs = base(endpoint, "http");
    docs.extend(http_policies());
    write_world(dir.path(), &docs);
    let cp = weft_testkit::start_control_plane(dir.path())
        .await
        .expect("control plane");
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
    let server = meshed(
        &cp,
        dir.path(),
        ip(net, 2),
        "echo-0",
        "echo",
        Some(echo.addr),
    )
    .await;
    let alice = meshed(&cp, dir.path(), ip(net, 1), "alice-0", "alice", None).await;
    let bob = meshed(&cp, dir.path(), ip(net, 3), "bob-0", "bob", None).await;
    filters_arrived(&server, |a| !a.http.is_empty()).await;

    let mut a = Conn::open(alice.outbound_addr).await;
    let mut b = Conn::open(bob.outbound_addr).await;
    weft_testkit::until_ok("alice reaches the API", Duration::from_secs(10), || async {
        match get_via(alice.outbound_addr, HOST, "/api/items").await {
            Ok((200, body)) => Ok(body),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let served = echo.served.load(std::sync::atomic::Ordering::Relaxed);
    // (caller, method, path, what the server's sidecar must answer); each also asked of the
    // control plane (`weftctl authz check`), which must agree.
    let cases: [(Option<&str>, &str, &str, u16); 11] = [
        // By principal and method and path.
        (Some("alice"), "GET", "/api/items", 200),
        (Some("alice"), "POST", "/api/items", 403),
        // DENY wins over ALLOW, also through a path that only normalises to it.
        (Some("alice"), "GET", "/api/admin/users", 403),
        (Some("alice"), "GET", "/api/x/../admin/users", 403),
        (Some("alice"), "GET", "/api//admin", 403),
        (Some("alice"), "GET", "/api/%61dmin/users", 403),
        (Some("alice"), "GET", "/api/admin%2Fusers", 400),
        // Default deny: bob matches no ALLOW rule on the API; his own rule lets /public in.
        (Some("bob"), "GET", "/api/items", 403),
        (Some("bob"), "GET", "/public/index.html", 200),
        // By namespace.
        (Some("bob"), "GET", "/ns-only", 200),
        // A plaintext caller in PERMISSIVE has no principal: bob's rule does not match it.
        (None, "GET", "/public/index.html", 403),
    ];
    for (who, method, path, want) in cases {
        let (code, body) = match who {
            Some("alice") => a.call(method, path).await,
            Some(_) => b.call(method, path).await,
            None => get_via(server.inbound_addr, HOST, path)
                .await
                .expect("plaintext"),
        };
        assert_eq!(code, want, "{who:?} {method} {path}: {body}");
        if code == 403 {
            assert_eq!(body, "RBAC: access denied");
        }
        let verdict = checked(&cp, who, method, path).await;
        assert_eq!(
            verdict.allowed,
            code == 200,
            "weftctl authz check disagrees for {who:?} {method} {path}: {verdict:?}"
        );
    }
    let v = checked(&cp, Some("alice"), "GET", "/api/admin/users").await;
    assert_eq!(v.policy, "ns[default]-policy[no-admin]-rule[0]", "{v:?}");
    assert_eq!(
        echo.served.load(std::sync::atomic::Ordering::Relaxed) - served,
        3,
        "exactly the allowed requests reached the application"
    );
    let page = metrics(&server).await;
    assert!(
        metric_sum(
            &page,
            "weft_authz_denied_total",
            &["policy=\"no-admin\"", "namespace=\"default\"", "rule=\"0\""]
        ) >= 3.0,
        "{page}"
    );
    assert!(
        metric_sum(&page, "weft_authz_denied_total", &["policy=\"\""]) >= 3.0,
        "{page}"
    );
    // AUDIT logs and allows.
    assert!(
        metric_sum(&page, "weft_authz_audited_total", &["policy=\"audit-api\""]) >= 2.0,
        "{page}"
    );

    // A policy edit denies alice on her next request on the same connection, while bob's
    // allowed long-lived connection keeps working.
    let mut edited = base(endpoint, "http");
    edited.extend(http_policies());
    edited.push(policy(
        "no-alice",
        "  action: DENY\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/default/sa/alice]}}]\n",
    ));
    write_world(dir.path(), &edited);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, _) = a.call("GET", "/api/items").await;
        if code == 403 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edit never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(b.call("GET", "/public/index.html").await.0, 200);
    weft_testkit::until_ok(
        "the control plane sees the edit",
        Duration::from_secs(5),
        || async {
            match checked(&cp, Some("alice"), "GET", "/api/items").await {
                v if !v.allowed && v.policy == "ns[default]-policy[no-alice]-rule[0]" => Ok(()),
                v => Err(format!("{v:?}")),
            }
        },
    )
    .await;
    assert!(
        checked(&cp, Some("bob"), "GET", "/public/index.html")
            .await
            .allowed
    );
    let (_, dump) = get_via(server.admin_addr, "admin", "/config_dump")
        .await
        .expect("dump");
    assert!(
        dump.contains("ns[default]-policy[no-alice]-rule[0]"),
        "{dump}"
    );
}

/// A TCP echo: every byte it reads goes back.
async fn tcp_echo(at: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind(at).await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Whether `s` echoes one line within a second (false: closed or silent).
async fn echoes(s: &mut TcpStream) -> bool {
    if s.write_all(b"ping\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 5];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if &buf == b"ping\n"
    )
}

#[tokio::test]
async fn tcp_connections_are_judged_before_the_app_and_closed_when_a_deny_arrives() {
    let net = 91;
    let endpoint = SocketAddr::new(ip(net, 2), 15006);
    let dir = tempfile::tempdir().expect("tempdir");
    // An opaque port (`tcp-*`), callers allowed by address.
    let allow_block = policy(
        "by-address",
        &format!(
            "  action: ALLOW\n  rules:\n  - from: [{{source: {{ipBlocks: [\"{}/32\"]}}}}]\n    to: [{{operation: {{ports: [\"15006\"]}}}}]\n",
            ip(net, 1)
        ),
    );
    let mut docs = base(endpoint, "tcp-echo");
    docs.push(allow_block.clone());
    write_world(dir.path(), &docs);
    let cp = weft_testkit::start_control_plane(dir.path())
        .await
        .expect("control plane");
    let app = tcp_echo(SocketAddr::new(ip(net, 10), 0)).await;
    let server = meshed(&cp, dir.path(), ip(net, 2), "echo-0", "echo", Some(app)).await;
    filters_arrived(&server, |a| !a.tcp.is_empty()).await;
    let dial = |from: u8| async move {
        let s = tokio::net::TcpSocket::new_v4().expect("socket");
        s.bind(SocketAddr::new(ip(net, from), 0)).expect("bind");
        s.connect(server.inbound_addr).await.expect("connect")
    };
    let mut allowed = dial(1).await;
    assert!(echoes(&mut allowed).await, "the allowed address is served");
    let mut other = dial(5).await;
    assert!(!echoes(&mut other).await, "another address is closed");
    // A DENY on the port closes the open connection and refuses new ones.
    let mut edited = base(endpoint, "tcp-echo");
    edited.push(allow_block);
    edited.push(policy(
        "close-port",
        "  action: DENY\n  rules:\n  - to: [{operation: {ports: [\"15006\"]}}]\n",
    ));
    write_world(dir.path(), &edited);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while echoes(&mut allowed).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the open connection was not closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut again = dial(1).await;
    assert!(!echoes(&mut again).await);
    let page = metrics(&server).await;
    assert!(
        metric_sum(&page, "weft_authz_denied_total", &["policy=\"close-port\""]) >= 2.0,
        "{page}"
    );
    assert!(
        metric_sum(
            &page,
            "weft_proxy_connections_closed_total",
            &["reason=\"authz-revoked\""]
        ) >= 1.0,
        "{page}"
    );
}
