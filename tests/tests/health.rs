//! The sidecar's health listener for real: the kubelet-facing `/ready`, application probes
//! forwarded through `/app-health/<port>/<path>` only to the listed ports, and the classic
//! sidecar's startup hold (`wait-ready`).

use std::time::Duration;

use weft_testkit::echo::{Echo, Identity};
use weft_testkit::world;

#[tokio::test]
async fn app_probes_pass_through_the_health_port_to_listed_ports_only() {
    let (_dir, cp) = weft_testkit::control_plane_over(&[world::service("echo", 80)]).await;
    let app = Echo::start(
        "127.0.71.1:0".parse().expect("addr"),
        Identity {
            name: "app".into(),
            cluster: "c".into(),
            zone: "z".into(),
        },
    )
    .await
    .expect("app");
    let ip: std::net::IpAddr = "127.0.71.2".parse().expect("ip");
    let mut rc = weft_sidecar::RunConfig::local(cp.plaintext(), ip, "probed");
    rc.health_addr = Some(std::net::SocketAddr::new(ip, 0));
    // The pod's app listens on localhost (where probes are forwarded); `app` stands for
    // another port in the pod that is not a health port.
    let local = Echo::start(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        Identity {
            name: "local-app".into(),
            cluster: "c".into(),
            zone: "z".into(),
        },
    )
    .await
    .expect("local app");
    rc.app_health_ports = vec![local.addr.port()];
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
    let (status, body) = get(format!("/app-health/{}/healthz", local.addr.port())).await;
    assert_eq!((status, body.as_str()), (200, "local-app c z\n"));
    let (status, body) = get(format!("/app-health/{}/healthz", app.addr.port())).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not an application health port"), "{body}");
    // A listed port with nothing behind it: the probe fails, as the app's would.
    let port = local.addr.port();
    drop(local);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, body) = get(format!("/app-health/{port}/healthz")).await;
    assert_eq!(status, 503, "{body}");

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
