//! The attacker's view of the inbound listener in a PERMISSIVE namespace (the default): a
//! plaintext caller on the pod network tries to make the application see an
//! `x-weft-client-identity` it did not earn. It waits past protocol detection before its first
//! byte, uses a method outside the usual list, speaks h2c with prior knowledge, or spells the
//! header the way CGI/WSGI frameworks fold it (`x_weft_client_identity`). The sidecar here has
//! no certificate, so every mesh-owned header the application sees is a forgery.
//!
//! A proptest then drives arbitrary prefixes, methods, header spellings, extra headers and
//! timing through the inbound.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_testkit::echo::{Echo, Identity};
use weft_testkit::{Sidecar, world};

const FORGED: &str = "spiffe://cluster.local/ns/prod/sa/admin";

struct Target {
    echo: Echo,
    sidecar: Sidecar,
    _dir: tempfile::TempDir,
    _cp: weft_testkit::ControlPlane,
}

async fn target(net: u8) -> Target {
    let echo = Echo::start(
        SocketAddr::from(([127, 0, net, 1], 0)),
        Identity {
            name: "app".into(),
            cluster: "cluster-1".into(),
            zone: String::new(),
        },
    )
    .await
    .expect("echo");
    let (dir, cp) = weft_testkit::control_plane_over(&[
        world::namespace("default", "PERMISSIVE"),
        world::service("app", 80),
        world::slice("app", "app", &[(echo.addr, "n1", true)]),
    ])
    .await;
    let mut cfg = weft_sidecar::RunConfig::local(cp.plaintext(), [127, 0, net, 100].into(), "app");
    cfg.app_addr = Some(echo.addr);
    let sidecar = Sidecar::start(cfg).await.expect("sidecar");
    let mut ready = sidecar.xds.ready.clone();
    tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
        .await
        .expect("ready")
        .expect("alive");
    Target {
        echo,
        sidecar,
        _dir: dir,
        _cp: cp,
    }
}

impl Target {
    /// Mesh-owned headers the application was handed so far (each one a forgery here).
    fn forged(&self) -> Vec<(String, String)> {
        self.echo
            .behavior
            .mesh_headers
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default()
    }

    /// Sends `bytes` to the inbound after `delay`, then reads what comes back for a moment.
    async fn raw(&self, delay: Duration, bytes: &[u8]) -> String {
        let mut s = TcpStream::connect(self.sidecar.inbound_addr)
            .await
            .expect("connect");
        tokio::time::sleep(delay).await;
        let _ = s.write_all(bytes).await;
        let mut out = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut out))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        String::from_utf8_lossy(&out[..n]).into_owned()
    }
}

fn request(method: &str, header: &str) -> Vec<u8> {
    format!("{method} / HTTP/1.1\r\nhost: app\r\n{header}: {FORGED}\r\ncontent-length: 0\r\n\r\n")
        .into_bytes()
}

#[tokio::test]
async fn a_method_outside_the_sniffers_list_cannot_forge_the_caller() {
    let t = target(70).await;
    let reply = t
        .raw(
            Duration::ZERO,
            &request("PROPFIND", "x-weft-client-identity"),
        )
        .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "served as HTTP: {reply}");
    assert_eq!(t.forged(), vec![], "the app saw a forged identity");
}

#[tokio::test]
async fn waiting_past_detection_before_the_first_byte_cannot_forge_the_caller() {
    let t = target(71).await;
    let reply = t
        .raw(
            Duration::from_millis(600),
            &request("GET", "x-weft-client-identity"),
        )
        .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "served as HTTP: {reply}");
    assert_eq!(t.forged(), vec![], "the app saw a forged identity");
}

#[tokio::test]
async fn underscore_and_case_spellings_of_the_header_are_stripped() {
    let t = target(72).await;
    for name in [
        "x_weft_client_identity",
        "X-WEFT-CLIENT-IDENTITY",
        "X_Weft-Client_Identity",
        "x.weft.client.identity",
        "x-weft-anything-else",
    ] {
        let reply = t.raw(Duration::ZERO, &request("GET", name)).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{name}: {reply}");
    }
    assert_eq!(t.forged(), vec![], "the app saw a forged identity");
}

/// An h2c (prior knowledge) connection to the target's inbound.
async fn h2c<B>(t: &Target) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(t.sidecar.inbound_addr)
        .await
        .expect("connect");
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2c handshake");
    tokio::spawn(conn);
    send
}

#[tokio::test]
async fn h2c_with_prior_knowledge_is_parsed_and_cannot_forge_the_caller() {
    let t = target(73).await;
    let mut send = h2c(&t).await;
    for name in ["x-weft-client-identity", "x_weft_client_identity"] {
        let req = hyper::Request::builder()
            .uri("http://app/")
            .header(name, FORGED)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let resp = send.send_request(req).await.expect("h2c response");
        assert_eq!(resp.status(), 200, "{name}");
    }
    assert_eq!(t.forged(), vec![], "the app saw a forged identity");
}

/// Over h2c, an `:authority` and a `Host` that disagree are refused (RFC 9113 §8.3.1), as an
/// absolute-form target and a disagreeing Host are over HTTP/1: no request is routed by one
/// and served by the other.
#[tokio::test]
async fn h2c_authority_and_host_that_disagree_are_refused() {
    let t = target(85).await;
    let mut send = h2c(&t).await;
    let served = t.echo.served.load(std::sync::atomic::Ordering::Relaxed);
    let req = hyper::Request::builder()
        .uri("http://app/")
        .header("host", "admin.internal")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("h2c response");
    assert_eq!(resp.status(), 400);
    assert_eq!(
        t.echo.served.load(std::sync::atomic::Ordering::Relaxed),
        served,
        "a request with two authorities reached the app"
    );
}

mod property {
    use proptest::prelude::*;

    use super::*;

    /// The identity header with each letter's case and each `-` chosen at random.
    fn spelling() -> impl Strategy<Value = String> {
        proptest::collection::vec((any::<bool>(), any::<bool>()), 22).prop_map(|flips| {
            "x-weft-client-identity"
                .chars()
                .zip(flips)
                .map(|(c, (upper, underscore))| match c {
                    '-' if underscore => '_',
                    c if upper => c.to_ascii_uppercase(),
                    c => c,
                })
                .collect()
        })
    }

    fn method() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("GET".to_string()),
            Just("POST".to_string()),
            Just("PROPFIND".to_string()),
            Just("MKCOL".to_string()),
            "[A-Z]{1,12}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        /// Whatever comes first (nothing, arbitrary bytes), whatever the method, spelling,
        /// extra headers and timing: the application never sees a mesh-owned header.
        #[test]
        fn no_plaintext_stream_makes_the_app_see_an_identity(
            prefix in proptest::collection::vec(any::<u8>(), 0..24),
            with_prefix in any::<bool>(),
            method in method(),
            name in spelling(),
            extra in proptest::collection::vec(("[a-z][a-z0-9-]{0,12}", "[ -~]{0,20}"), 0..4),
            late in any::<bool>(),
            lead in prop_oneof![Just(""), Just(" "), Just("\t"), Just("\r\n"), Just("\x00")],
            sep in prop_oneof![Just(" "), Just("\t")],
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let t = target(74).await;
                let mut bytes = if with_prefix { prefix.clone() } else { Vec::new() };
                let mut req = format!("{lead}{method}{sep}/{sep}HTTP/1.1\r\nhost: app\r\n{name}: {FORGED}\r\n");
                for (k, v) in &extra {
                    req.push_str(&format!("{k}: {v}\r\n"));
                }
                req.push_str("content-length: 0\r\n\r\n");
                bytes.extend_from_slice(req.as_bytes());
                let delay = if late { Duration::from_millis(300) } else { Duration::ZERO };
                let _ = t.raw(delay, &bytes).await;
                prop_assert_eq!(t.forged(), vec![]);
                Ok(())
            })?;
        }
    }
}

/// Hop-by-hop hygiene at the inbound, as a caller on the pod network would try it: headers it
/// names in `Connection` (and `Keep-Alive`, `Proxy-Connection`) never reach the app; a `Host`
/// that disagrees with the authority is refused; an upgrade is refused, not half-done.
#[tokio::test]
async fn hop_by_hop_headers_conflicting_hosts_and_upgrades_are_handled_at_the_inbound() {
    let t = target(77).await;
    let reply = t
        .raw(
            Duration::ZERO,
            b"GET / HTTP/1.1\r\nhost: app\r\nconnection: keep-alive, x-drop-me\r\nx-drop-me: 1\r\nkeep-alive: timeout=5\r\nproxy-connection: keep-alive\r\nx-kept: 1\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let names = t
        .echo
        .behavior
        .last_header_names
        .lock()
        .map(|g| g.clone())
        .unwrap_or_default();
    assert!(names.contains(&"x-kept".to_string()), "{names:?}");
    for gone in ["x-drop-me", "keep-alive", "proxy-connection", "connection"] {
        assert!(
            !names.contains(&gone.to_string()),
            "{gone} reached the app: {names:?}"
        );
    }
    let served = t.echo.served.load(std::sync::atomic::Ordering::Relaxed);
    let reply = t
        .raw(
            Duration::ZERO,
            b"GET http://app/ HTTP/1.1\r\nhost: admin.internal\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    let reply = t
        .raw(
            Duration::ZERO,
            b"GET / HTTP/1.1\r\nhost: app\r\nconnection: upgrade\r\nupgrade: h2c\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
    assert!(reply.starts_with("HTTP/1.1 501"), "{reply}");
    assert_eq!(
        t.echo.served.load(std::sync::atomic::Ordering::Relaxed),
        served,
        "a refused request reached the app"
    );
}

/// A port the mesh declares HTTP (`appProtocol: http`) takes HTTP only: bytes that do not
/// parse as HTTP/1 or h2c are refused and never reach the application raw, where sniffing
/// alone would have passed them through.
#[tokio::test]
async fn a_port_declared_http_refuses_what_is_not_http() {
    // The application: counts the connections that reach it.
    let app = tokio::net::TcpListener::bind("127.0.78.1:0")
        .await
        .expect("bind");
    let app_addr = app.local_addr().expect("addr");
    let reached = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let count = reached.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = app.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    // The world lists this sidecar's inbound as the endpoint of an HTTP port.
    let inbound: SocketAddr = "127.0.78.100:15006".parse().expect("addr");
    // Another namespace's Service claims the same address as a TCP port, to switch the
    // parsing (and the stripping) off: it must not count for this pod.
    let evil = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: x, namespace: evil}}\nspec:\n  ports: [{{name: raw, port: 80, appProtocol: tcp}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: x\n  namespace: evil\n  labels: {{kubernetes.io/service-name: x}}\naddressType: IPv4\nports: [{{name: raw, port: {}}}]\nendpoints:\n- addresses: [\"{}\"]\n",
        inbound.port(),
        inbound.ip()
    );
    let (_dir, cp) = weft_testkit::control_plane_over(&[
        world::namespace("default", "PERMISSIVE"),
        world::service("app", 80),
        world::slice("app", "app", &[(inbound, "n1", true)]),
        evil,
    ])
    .await;
    let mut cfg = weft_sidecar::RunConfig::local(cp.plaintext(), inbound.ip(), "app");
    cfg.inbound_addr = inbound;
    cfg.app_addr = Some(app_addr);
    let sc = Sidecar::start(cfg).await.expect("sidecar");
    weft_testkit::wait_ready(&sc, Duration::from_secs(15)).await;
    weft_testkit::eventually("the port is declared HTTP", Duration::from_secs(10), || {
        sc.xds.config.load().inbound.as_ref().is_some_and(|i| {
            i.ports.get(&inbound.port()).and_then(|p| p.declared)
                == Some(weft_sidecar::state::Declared::Http)
        })
    })
    .await;
    for garbage in [
        &b"\x00\x01\x02 binary"[..],
        b"HELLO there\r\n",
        b"\x16\x03\x01\x00\x05hello",
    ] {
        let mut s = TcpStream::connect(inbound).await.expect("connect");
        let _ = s.write_all(garbage).await;
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        reached.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "non-HTTP bytes were passed to the app on an HTTP port"
    );
    let (_, metrics) = weft_testkit::get_via(sc.admin_addr, "admin", "/metrics")
        .await
        .expect("metrics");
    assert!(
        weft_testkit::metric_sum(
            &metrics,
            "weft_proxy_inbound_refused_total",
            &["reason=\"not-http\""]
        ) >= 3.0,
        "{metrics}"
    );
}

/// Trailers are headers to many frameworks: a plaintext caller's trailer spelling a mesh-owned
/// header (HTTP/1 chunked with `Trailer:`, or an h2c trailing HEADERS frame) never reaches the
/// app.
#[tokio::test]
async fn mesh_owned_trailers_are_stripped() {
    let t = target(79).await;
    let reply = t
        .raw(
            Duration::ZERO,
            format!("POST / HTTP/1.1\r\nhost: app\r\ntransfer-encoding: chunked\r\ntrailer: x-weft-client-identity\r\n\r\n1\r\na\r\n0\r\nx-weft-client-identity: {FORGED}\r\n\r\n").as_bytes(),
        )
        .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let mut send = h2c(&t).await;
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("x_weft_client_identity", FORGED.parse().expect("value"));
    let frames: Vec<Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>> = vec![
        Ok(hyper::body::Frame::data(bytes::Bytes::from_static(b"a"))),
        Ok(hyper::body::Frame::trailers(trailers)),
    ];
    let req = hyper::Request::builder()
        .method("POST")
        .uri("http://app/")
        .body(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )))
        .expect("request");
    let resp = send.send_request(req).await.expect("h2c response");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        t.forged(),
        vec![],
        "the app saw a forged identity in trailers"
    );
}
