//! STRICT fails closed. A proxy that has no config yet (just started, or restarted while the
//! control plane is down) refuses plaintext inbound instead of guessing PERMISSIVE. A proxy
//! without a valid certificate never sends plaintext to a meshed endpoint of a STRICT
//! namespace: the request fails with 503 `no-certificate` and says why.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_testkit::echo::{Echo, Identity};
use weft_testkit::{Sidecar, get_via, world};

fn who(name: &str) -> Identity {
    Identity {
        name: name.into(),
        cluster: "cluster-1".into(),
        zone: String::new(),
    }
}

#[tokio::test]
async fn before_any_config_inbound_refuses_plaintext() {
    let app = Echo::start(SocketAddr::from(([127, 0, 75, 1], 0)), who("app"))
        .await
        .expect("app");
    // A control plane that is not there: the proxy never gets a config.
    let dead: SocketAddr = "127.0.75.9:9".parse().expect("addr");
    let mut cfg = weft_sidecar::RunConfig::local(dead, [127, 0, 75, 100].into(), "fresh");
    cfg.app_addr = Some(app.addr);
    let sc = Sidecar::start(cfg).await.expect("sidecar");
    let mut s = tokio::net::TcpStream::connect(sc.inbound_addr)
        .await
        .expect("connect");
    let _ = s
        .write_all(b"GET / HTTP/1.1\r\nhost: app\r\ncontent-length: 0\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    assert!(
        !String::from_utf8_lossy(&out).contains("app cluster-1"),
        "plaintext reached the app before any config: {}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(app.served.load(Ordering::Relaxed), 0);
    let (_, metrics) = get_via(sc.admin_addr, "admin", "/metrics")
        .await
        .expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("weft_proxy_inbound_refused_total")
                && l.contains("plaintext-in-strict")),
        "{metrics}"
    );
}

#[tokio::test]
async fn without_a_certificate_a_strict_endpoint_gets_a_503_not_plaintext() {
    let server = Echo::start(SocketAddr::from(([127, 0, 76, 1], 0)), who("echo-0"))
        .await
        .expect("echo");
    let (_dir, cp) = weft_testkit::control_plane_over(&[
        world::namespace("default", "STRICT"),
        world::service("echo", 80),
        world::pod("echo-0", "echo", true),
        world::pod_slice("echo", "echo", &[(server.addr, "echo-0")]),
    ])
    .await;
    // A client proxy with no identity (plaintext xDS, no join token).
    let sc = weft_testkit::start_sidecar(cp.plaintext(), [127, 0, 76, 100].into(), "client", "")
        .await
        .expect("sidecar");
    weft_testkit::wait_ready(&sc, Duration::from_secs(15)).await;
    let (status, body) = get_via(sc.outbound_addr, "echo", "/")
        .await
        .expect("request");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("requires mTLS") && body.contains("no workload identity"),
        "{body}"
    );
    assert_eq!(
        server.served.load(Ordering::Relaxed),
        0,
        "the STRICT endpoint was sent plaintext"
    );
}
