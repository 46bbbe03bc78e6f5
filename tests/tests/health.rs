//! The sidecar's health listener for real: the kubelet-facing `/ready`, the application's
//! probes run exactly as the injector listed them (HTTP, HTTPS, TCP and gRPC, against
//! localhost) and nothing else — the attacker's paths, ports and queries get nothing — and
//! the classic sidecar's startup hold (`wait-ready`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use weft_proto::probes::{AppProbe, AppProbes};
use weft_testkit::echo::{Echo, Identity};
use weft_testkit::world;

/// A gRPC health server on localhost answering `status` (1 = SERVING) to every Check.
async fn grpc_health(status: u8) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let ok = req.uri().path() == "/grpc.health.v1.Health/Check";
                        let body = Full::new(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]));
                        let mut resp = hyper::Response::new(body);
                        resp.headers_mut()
                            .insert("content-type", "application/grpc".parse().expect("v"));
                        resp.headers_mut().insert(
                            "grpc-status",
                            if ok { "0" } else { "12" }.parse().expect("v"),
                        );
                        Ok::<_, Infallible>(resp)
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
            });
        }
    });
    addr
}

/// An HTTPS server on localhost (self-signed) answering 200 "tls-app".
async fn https_app() -> SocketAddr {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let config =
        weft_proto::tls::rustls::ServerConfig::builder_with_provider(weft_proto::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                weft_proto::tls::rustls::pki_types::PrivateKeyDer::Pkcs8(
                    key.serialize_der().into(),
                ),
            )
            .expect("config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    |_req: hyper::Request<hyper::body::Incoming>| async {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                            b"tls-app",
                        ))))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn the_health_port_runs_exactly_the_declared_probes_and_nothing_else() {
    let (_dir, cp) = weft_testkit::control_plane_over(&[world::service("echo", 80)]).await;
    let ip: std::net::IpAddr = "127.0.71.2".parse().expect("ip");
    let mut rc = weft_sidecar::RunConfig::local(cp.plaintext(), ip, "probed");
    rc.health_addr = Some(SocketAddr::new(ip, 0));
    // The pod's app on localhost, and a second localhost-only app no probe names: what an
    // attacker would like to reach through the health port.
    let local = Echo::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Identity {
            name: "local-app".into(),
            cluster: "c".into(),
            zone: "z".into(),
        },
    )
    .await
    .expect("local app");
    let secret = Echo::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Identity {
            name: "localhost-only-admin".into(),
            cluster: "c".into(),
            zone: "z".into(),
        },
    )
    .await
    .expect("secret app");
    let tcp_port = local.addr.port();
    let grpc_ok = grpc_health(1).await;
    let grpc_down = grpc_health(2).await;
    let tls = https_app().await;
    let probes: AppProbes = AppProbes(
        [
            (
                "/app-health/app/readyz".to_string(),
                AppProbe::HttpGet {
                    port: local.addr.port(),
                    path: "/healthz".into(),
                    https: false,
                    headers: vec![],
                },
            ),
            (
                "/app-health/app/livez".to_string(),
                AppProbe::TcpSocket { port: tcp_port },
            ),
            (
                "/app-health/app/startupz".to_string(),
                AppProbe::Grpc {
                    port: grpc_ok.port(),
                    service: String::new(),
                },
            ),
            (
                "/app-health/db/livez".to_string(),
                AppProbe::Grpc {
                    port: grpc_down.port(),
                    service: "db".into(),
                },
            ),
            (
                "/app-health/tls/readyz".to_string(),
                AppProbe::HttpGet {
                    port: tls.port(),
                    path: "/".into(),
                    https: true,
                    headers: vec![],
                },
            ),
        ]
        .into(),
    );
    // Through the flag, as the injector's JSON.
    rc.app_probes =
        weft_sidecar::config::parse_app_probes(&serde_json::to_string(&probes).expect("json"))
            .expect("probes parse");
    let sidecar = weft_testkit::Sidecar::start(rc).await.expect("sidecar");
    let health = sidecar.health_addr.expect("health listener");
    weft_testkit::wait_ready(&sidecar, Duration::from_secs(15)).await;

    let get = |path: String| async move {
        weft_testkit::get_via(health, "kubelet", &path)
            .await
            .expect("health answers")
    };
    assert_eq!(get("/ready".into()).await.0, 200);
    assert_eq!(get("/live".into()).await.0, 200);
    let (status, body) = get("/app-health/app/readyz".into()).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "probe answered 200\n"),
        "status only, never the app's body"
    );
    assert_eq!(
        get("/app-health/app/livez".into()).await.0,
        200,
        "TCP probe"
    );
    assert_eq!(
        get("/app-health/app/startupz".into()).await.0,
        200,
        "gRPC SERVING"
    );
    assert_eq!(
        get("/app-health/db/livez".into()).await.0,
        503,
        "gRPC NOT_SERVING"
    );
    let (status, body) = get("/app-health/tls/readyz".into()).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "probe answered 200\n"),
        "HTTPS probe"
    );

    // The attacker's requests: the old port-and-path form to a localhost-only app, another
    // path or a query on a declared probe, a POST. None reaches an application.
    let served_before = secret.served.load(std::sync::atomic::Ordering::Relaxed);
    for path in [
        format!("/app-health/{}/admin", secret.addr.port()),
        format!("/app-health/{}/healthz", local.addr.port()),
        "/app-health/app/readyz?debug=1".to_string(),
        "/app-health/app/readyz/../../admin".to_string(),
        "/app-health/app".to_string(),
    ] {
        let (status, _) = get(path.clone()).await;
        assert_eq!(status, 404, "{path}");
    }
    assert_eq!(
        secret.served.load(std::sync::atomic::Ordering::Relaxed),
        served_before,
        "the localhost-only app was reached through the health port"
    );
    // A declared probe with nothing behind it fails, as the app's own would.
    let port = local.addr.port();
    drop(local);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, body) = get("/app-health/app/readyz".into()).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        get("/app-health/app/livez".into()).await.0,
        503,
        "TCP probe on {port}"
    );
    // Bad probe JSON is refused naming the problem.
    let e = weft_sidecar::config::parse_app_probes(r#"{"/x": {"tcpSocket": {"port": 1}}}"#)
        .expect_err("bad path");
    assert!(e.contains("/app-health/"), "{e}");
    let e = weft_sidecar::config::parse_app_probes(r#"{"/app-health/a/livez": {"exec": {}}}"#)
        .expect_err("bad kind");
    assert!(e.contains("not a JSON object"), "{e}");

    // The classic sidecar's startup hold returns at once when ready, fails after its timeout
    // when nothing answers.
    let ok = tokio::task::spawn_blocking(move || {
        weft_sidecar::health::wait_ready(health, Duration::from_secs(5))
    })
    .await
    .expect("join");
    assert_eq!(ok, Ok(()));
    let closed = std::net::SocketAddr::from(([127, 0, 71, 3], 9));
    let err = tokio::task::spawn_blocking(move || {
        weft_sidecar::health::wait_ready(closed, Duration::from_millis(600))
    })
    .await
    .expect("join")
    .expect_err("nothing there");
    assert!(err.contains("was not ready within"), "{err}");
}
