//! The sidecar's xDS client against the fake ADS server (`weft_testkit::fake_ads`): what it
//! ACKs, what it NACKs and with which message, and that a refused response changes nothing —
//! the request path keeps serving the last accepted config.

use std::net::SocketAddr;
use std::time::Duration;

use weft_proto::envoy::envoy::service::discovery::v3::Resource;
use weft_proto::resources::{api_listener, assignment, eds_cluster, route_to};
use weft_proto::type_url;
use weft_testkit::echo::{Echo, Identity};
use weft_testkit::fake_ads::{FakeAds, resource};

const PATIENCE: Duration = Duration::from_secs(10);
const HOST: &str = "echo.test";

async fn echo(name: &str) -> Echo {
    Echo::start(
        "127.0.0.1:0".parse().expect("addr"),
        Identity {
            name: name.into(),
            cluster: "c".into(),
            zone: String::new(),
        },
    )
    .await
    .expect("echo")
}

/// Pushes one response and returns how the client answered it.
async fn push(ads: &FakeAds, t: &str, r: Vec<Resource>) -> Result<(), String> {
    let nonce = ads.push(t, r, &[]).await;
    ads.answer(t, &nonce, PATIENCE)
        .await
        .unwrap_or_else(|| panic!("no answer to {t} {nonce}"))
}

/// Pushes one response the client must refuse; checks its NACK names every one of `needles`.
async fn refused(ads: &FakeAds, t: &str, r: Vec<Resource>, needles: &[&str]) {
    let msg = push(ads, t, r).await.expect_err("refused");
    for n in needles {
        assert!(msg.contains(n), "{n:?} not in the NACK: {msg}");
    }
}

async fn body(sidecar: SocketAddr) -> String {
    match weft_testkit::get_via(sidecar, HOST, "/").await {
        Ok((200, b)) => b,
        other => panic!("GET via the sidecar: {other:?}"),
    }
}

#[tokio::test]
async fn a_refused_response_is_nacked_with_its_reason_and_the_last_good_config_keeps_serving() {
    let ads = FakeAds::start().await.expect("fake ADS");
    let (one, two) = (echo("one").await, echo("two").await);
    let sidecar =
        weft_testkit::start_sidecar(ads.addr, "127.0.0.1".parse().expect("ip"), "node-1", "")
            .await
            .expect("sidecar");
    let c = eds_cluster("echo");
    assert_eq!(
        push(&ads, type_url::CLUSTER, vec![resource("echo", &c)]).await,
        Ok(())
    );
    let l = api_listener("echo", "echo-routes");
    assert_eq!(
        push(&ads, type_url::LISTENER, vec![resource("echo", &l)]).await,
        Ok(())
    );
    let r = route_to("echo-routes", HOST, "echo");
    assert_eq!(
        push(&ads, type_url::ROUTE, vec![resource("echo-routes", &r)]).await,
        Ok(())
    );
    let a = assignment("echo", &[one.addr]);
    assert_eq!(
        push(&ads, type_url::ENDPOINT, vec![resource("echo", &a)]).await,
        Ok(())
    );
    weft_testkit::wait_ready(&sidecar, PATIENCE).await;
    assert!(body(sidecar.outbound_addr).await.starts_with("one "));

    // A cluster that is not EDS: refused, named with the reason.
    let mut stat = eds_cluster("static");
    stat.cluster_discovery_type = None;
    refused(
        &ads,
        type_url::CLUSTER,
        vec![resource("echo", &c), resource("static", &stat)],
        &[r#"Cluster "static""#, "only EDS"],
    )
    .await;

    // One good change and one bad endpoint in the same response: neither is applied.
    let mut bad = assignment("echo", &[two.addr]);
    if let Some(
        weft_proto::envoy::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(e),
    ) = bad.endpoints[0].lb_endpoints[0].host_identifier.as_mut()
        && let Some(weft_proto::envoy::envoy::config::core::v3::address::Address::SocketAddress(sa)) =
            e.address.as_mut().and_then(|a| a.address.as_mut())
    {
        sa.address = "not-an-ip".into();
    }
    let moved = assignment("other", &[two.addr]);
    refused(
        &ads,
        type_url::ENDPOINT,
        vec![resource("other", &moved), resource("echo", &bad)],
        &[r#"ClusterLoadAssignment "echo""#, "not-an-ip"],
    )
    .await;
    // An unrelated response is accepted afterwards: what the refused ones carried stays out
    // (no cluster "static", no assignment "other", echo's endpoint unchanged).
    assert_eq!(
        push(&ads, type_url::ROUTE, vec![resource("echo-routes", &r)]).await,
        Ok(())
    );
    for _ in 0..5 {
        assert!(body(sidecar.outbound_addr).await.starts_with("one "));
    }
    assert!(!sidecar.xds.config.load().clusters.contains_key("static"));
    let page = metrics(sidecar.admin_addr).await;
    assert_eq!(
        weft_testkit::metric_sum(&page, "weft_xds_nacks_total", &[]),
        2.0,
        "{page}"
    );
    for (kind, n) in [
        ("cluster", 1.0),
        ("endpoint", 1.0),
        ("listener", 1.0),
        ("route", 1.0),
    ] {
        let label = format!("type=\"{kind}\"");
        assert_eq!(
            weft_testkit::metric_sum(&page, "weft_xds_resources", &[&label]),
            n,
            "{kind}: {page}"
        );
    }

    // The same change alone is accepted and takes effect.
    let good = assignment("echo", &[two.addr]);
    assert_eq!(
        push(&ads, type_url::ENDPOINT, vec![resource("echo", &good)]).await,
        Ok(())
    );
    weft_testkit::until_ok("traffic moves to the new endpoint", PATIENCE, || async {
        let b = body(sidecar.outbound_addr).await;
        b.starts_with("two ").then_some(()).ok_or(b)
    })
    .await;
    // Removing the cluster (delta) takes it out of the config.
    let nonce = ads.push(type_url::CLUSTER, Vec::new(), &["echo"]).await;
    assert_eq!(
        ads.answer(type_url::CLUSTER, &nonce, PATIENCE).await,
        Some(Ok(()))
    );
    assert!(!sidecar.xds.config.load().clusters.contains_key("echo"));
}

async fn metrics(admin: SocketAddr) -> String {
    match weft_testkit::get_via(admin, "admin", "/metrics").await {
        Ok((200, b)) => b,
        other => panic!("metrics: {other:?}"),
    }
}
