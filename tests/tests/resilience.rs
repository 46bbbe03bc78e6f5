//! Resilience through the sidecar on real traffic: retries recover a flaky upstream and the
//! budget stops a storm; the circuit breaker answers 503 with its reason at the threshold; an
//! endpoint that returns 5xx is ejected and comes back; timeouts fire.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use weft_testkit::echo::Echo;
use weft_testkit::{get_via, world};

const PATIENCE: Duration = Duration::from_secs(10);

async fn echo(ip: &str, name: &str) -> Echo {
    Echo::pod(ip, name, "a").await
}

fn policy(spec: &str) -> String {
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: echo, namespace: default}}\nspec:\n  targetRef: {{kind: Service, name: echo}}\n{spec}"
    )
}

/// A control plane and a sidecar for `pods` behind Service `echo` with `policy_spec`.
async fn mesh(
    pods: &[&Echo],
    ip: &str,
    policy_spec: &str,
) -> (
    tempfile::TempDir,
    weft_testkit::ControlPlane,
    weft_testkit::Sidecar,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let eps: Vec<(SocketAddr, &str, bool)> = pods.iter().map(|p| (p.addr, "n1", true)).collect();
    std::fs::write(
        dir.path().join("world.yaml"),
        world::docs(&[
            world::service("echo", 80),
            world::slice("echo", "echo", &eps),
            policy(policy_spec),
        ]),
    )
    .expect("write");
    let cp = weft_testkit::start_control_plane(dir.path())
        .await
        .expect("control plane");
    assert!(
        cp.catalog.current().errors.is_empty(),
        "{:?}",
        cp.catalog.current().errors
    );
    let sc = weft_testkit::start_sidecar(cp.plaintext(), ip.parse().expect("ip"), "client", "a")
        .await
        .expect("sidecar");
    let mut ready = sc.xds.ready.clone();
    tokio::time::timeout(PATIENCE, ready.wait_for(|r| *r))
        .await
        .expect("ready in time")
        .expect("alive");
    (dir, cp, sc)
}

async fn metric(sc: &weft_testkit::Sidecar, name: &str) -> f64 {
    let (_, body) = get_via(sc.admin_addr, "admin", "/metrics")
        .await
        .expect("metrics");
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn retries_recover_a_flaky_upstream() {
    let flaky = echo("127.0.5.1", "flaky").await;
    flaky.behavior.fail_status.store(503, Ordering::Relaxed);
    flaky.behavior.fail_every.store(2, Ordering::Relaxed);
    let (_d, _cp, sc) = mesh(
        &[&flaky],
        "127.0.5.100",
        "  retry: {attempts: 2, retryOn: [5xx], backoff: {baseInterval: 1ms}}\n",
    )
    .await;
    for i in 0..100 {
        let (status, body) = get_via(sc.outbound_addr, "echo", "/")
            .await
            .expect("request");
        assert_eq!(status, 200, "request {i}: {body}");
    }
    // Every even-numbered try fails: the first request passes, each later one fails its first
    // try and succeeds on its retry.
    assert_eq!(metric(&sc, "weft_proxy_retries_total").await, 99.0);
    // Per endpoint: every try is counted with its outcome.
    let (_, body) = get_via(sc.admin_addr, "admin", "/metrics")
        .await
        .expect("metrics");
    let tries = |outcome: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with("weft_proxy_endpoint_requests_total"))
            .filter(|l| {
                l.contains(&format!("outcome=\"{outcome}\""))
                    && l.contains(&format!("endpoint=\"{}\"", flaky.addr))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!((tries("200"), tries("503")), (100.0, 99.0));
    assert_eq!(flaky.served.load(Ordering::Relaxed), 199);
}

#[tokio::test]
async fn retry_budget_stops_a_storm() {
    let down = echo("127.0.5.2", "down").await;
    down.behavior.fail_status.store(503, Ordering::Relaxed);
    down.behavior.delay_ms.store(20, Ordering::Relaxed);
    let (_d, _cp, sc) = mesh(
        &[&down],
        "127.0.5.101",
        "  retry: {attempts: 3, retryOn: [5xx], backoff: {baseInterval: 1ms}, budget: {percent: 10, minRetryConcurrency: 1}}\n",
    )
    .await;
    let n = 50;
    let mut tasks = Vec::new();
    for _ in 0..n {
        let proxy = sc.outbound_addr;
        tasks.push(tokio::spawn(
            async move { get_via(proxy, "echo", "/").await },
        ));
    }
    for t in tasks {
        let (status, _) = t.await.expect("task").expect("request");
        assert_eq!(status, 503, "the upstream's own 503 comes back");
    }
    let hits = down.served.load(Ordering::Relaxed);
    // Without a budget: 50 × (1 + 3) = 200 tries. The budget allows a handful in flight.
    assert!(hits < 100, "{hits} tries reached the failing upstream");
    assert!(
        metric(&sc, "weft_proxy_overflows_total").await > 0.0,
        "the budget refused retries"
    );
}

/// Sends `n` requests for `echo` through `proxy` at once; their bodies by status.
async fn concurrently(proxy: SocketAddr, n: usize) -> HashMap<u16, Vec<String>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(async move { get_via(proxy, "echo", "/").await }))
        .collect();
    let mut by_status: HashMap<u16, Vec<String>> = HashMap::new();
    for t in tasks {
        let (status, body) = t.await.expect("task").expect("request");
        by_status.entry(status).or_default().push(body);
    }
    by_status
}

#[tokio::test]
async fn circuit_breaker_answers_503_with_its_reason() {
    let slow = echo("127.0.5.3", "slow").await;
    slow.behavior.delay_ms.store(300, Ordering::Relaxed);
    let (_d, _cp, sc) = mesh(
        &[&slow],
        "127.0.5.102",
        "  circuitBreaker: {maxRequests: 2}\n",
    )
    .await;
    let by_status = concurrently(sc.outbound_addr, 6).await;
    let overflowed = by_status.get(&503).cloned().unwrap_or_default();
    assert_eq!(by_status.get(&200).map(Vec::len), Some(2), "{by_status:?}");
    assert_eq!(overflowed.len(), 4, "{by_status:?}");
    assert!(
        overflowed.iter().all(|b| b.contains("max_requests")),
        "{overflowed:?}"
    );
}

/// `maxConnections: 1` and `maxPendingRequests: 1` against a slow endpoint: one request runs,
/// one waits for the connection and then runs, the rest overflow at once with the limit named.
#[tokio::test]
async fn connection_breaker_queues_up_to_max_pending_then_overflows() {
    let slow = echo("127.0.5.7", "slow").await;
    slow.behavior.delay_ms.store(300, Ordering::Relaxed);
    let (_d, _cp, sc) = mesh(
        &[&slow],
        "127.0.5.105",
        "  circuitBreaker: {maxConnections: 1, maxPendingRequests: 1}\n",
    )
    .await;
    let by_status = concurrently(sc.outbound_addr, 5).await;
    let overflowed = by_status.get(&503).cloned().unwrap_or_default();
    assert_eq!(by_status.get(&200).map(Vec::len), Some(2), "{by_status:?}");
    assert_eq!(overflowed.len(), 3, "{by_status:?}");
    assert!(
        overflowed
            .iter()
            .all(|b| b.contains("max_pending_requests")),
        "{overflowed:?}"
    );
    assert_eq!(slow.served.load(Ordering::Relaxed), 2);
    assert!(metric(&sc, "weft_proxy_overflows_total").await >= 3.0);
}

#[tokio::test]
async fn failing_endpoint_is_ejected_and_comes_back() {
    let bad = echo("127.0.5.4", "bad").await;
    let good = echo("127.0.5.5", "good").await;
    bad.behavior.fail_status.store(500, Ordering::Relaxed);
    let (_d, _cp, sc) = mesh(
        &[&bad, &good],
        "127.0.5.103",
        "  loadBalancer: {algorithm: RoundRobin}\n  outlierDetection: {consecutive5xx: 3, baseEjectionTime: 1s, maxEjectionPercent: 50}\n",
    )
    .await;
    let mut answers = Vec::new();
    for _ in 0..30 {
        let (status, body) = get_via(sc.outbound_addr, "echo", "/")
            .await
            .expect("request");
        answers.push((
            status,
            body.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string(),
        ));
    }
    let failures = answers.iter().filter(|(s, _)| *s == 500).count();
    assert_eq!(failures, 3, "three 5xx in a row eject it: {answers:?}");
    assert!(
        answers[10..]
            .iter()
            .all(|(s, who)| *s == 200 && who == "good"),
        "{answers:?}"
    );
    assert!(metric(&sc, "weft_proxy_ejections_total").await >= 1.0);
    // It recovers; after the ejection time it takes traffic again.
    bad.behavior.fail_status.store(0, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut back = 0;
    for _ in 0..20 {
        let (status, body) = get_via(sc.outbound_addr, "echo", "/")
            .await
            .expect("request");
        assert_eq!(status, 200);
        back += usize::from(body.starts_with("bad"));
    }
    assert!(back >= 5, "the endpoint is back in rotation: {back}/20");
}

#[tokio::test]
async fn request_timeout_fires() {
    let stuck = echo("127.0.5.6", "stuck").await;
    stuck.behavior.delay_ms.store(3000, Ordering::Relaxed);
    let (_d, _cp, sc) = mesh(&[&stuck], "127.0.5.104", "  timeout: 200ms\n").await;
    let (status, body) = get_via(sc.outbound_addr, "echo", "/")
        .await
        .expect("request");
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("did not answer within"), "{body}");
}

/// Counts which pod answered each of `n` requests, sent `concurrency` at a time.
async fn served_by(proxy: SocketAddr, n: usize, concurrency: usize) -> HashMap<String, usize> {
    let per_task = n / concurrency;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            tokio::spawn(async move {
                let mut names = Vec::with_capacity(per_task);
                for _ in 0..per_task {
                    let (status, body) = get_via(proxy, "echo", "/").await.expect("request");
                    assert_eq!(status, 200, "{body}");
                    names.push(body.split(' ').next().unwrap_or_default().to_string());
                }
                names
            })
        })
        .collect();
    let mut counts = HashMap::new();
    for t in tasks {
        for name in t.await.expect("task") {
            *counts.entry(name).or_insert(0) += 1;
        }
    }
    counts
}

/// What the sidecar estimates of each endpoint (for a failure message).
async fn estimates(sc: &weft_testkit::Sidecar) -> String {
    let (_, dump) = get_via(sc.admin_addr, "admin", "/config_dump")
        .await
        .expect("config dump");
    dump.lines()
        .filter(|l| l.contains("\"addr\"") || l.contains("ewma_ms") || l.contains("outstanding"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_balancer_shares_equal_endpoints_under_a_sequential_client() {
    // Both pods answer at loopback speed, faster than the estimate assumed for an endpoint
    // never measured: the first one measured must not keep every request.
    let a = echo("127.0.5.8", "pod-a").await;
    let b = echo("127.0.5.9", "pod-b").await;
    let (_d, _cp, sc) = mesh(&[&a, &b], "127.0.5.106", "").await;
    let counts = served_by(sc.outbound_addr, 300, 1).await;
    println!("300 sequential requests served by {counts:?}");
    for pod in ["pod-a", "pod-b"] {
        let n = counts.get(pod).copied().unwrap_or(0);
        assert!(
            (90..=210).contains(&n),
            "{pod} served {n} of 300: {counts:?}; {}",
            estimates(&sc).await
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_balancer_starves_a_ten_times_slower_endpoint() {
    let fast = echo("127.0.5.10", "fast").await;
    let slow = echo("127.0.5.11", "slow").await;
    fast.behavior.delay_ms.store(5, Ordering::Relaxed);
    slow.behavior.delay_ms.store(50, Ordering::Relaxed);
    let (_d, _cp, sc) = mesh(&[&fast, &slow], "127.0.5.107", "").await;
    let counts = served_by(sc.outbound_addr, 1000, 8).await;
    println!("1000 requests, 8 at a time, served by {counts:?}");
    let n = counts.get("slow").copied().unwrap_or(0);
    assert!(
        n < 100,
        "the slow pod served {n} of 1000: {counts:?}; {}",
        estimates(&sc).await
    );
    assert_eq!(counts.values().sum::<usize>(), 1000, "{counts:?}");
}
