//! The sidecar's listeners under bad input and shutdown: garbage bytes, a slowloris client and
//! an oversized request head are closed cleanly, logged and counted, and the proxy keeps
//! serving; a drain lets an in-flight request finish while new connections are refused.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_testkit::echo::{Echo, Identity};
use weft_testkit::{get_via, world};

const PATIENCE: Duration = Duration::from_secs(10);

async fn setup(
    ip: &str,
    tweak: impl FnOnce(&mut weft_sidecar::RunConfig),
) -> (
    Echo,
    tempfile::TempDir,
    weft_testkit::ControlPlane,
    weft_testkit::Sidecar,
) {
    let pod_ip = ip.replace(".100", ".1");
    let echo = Echo::start(
        format!("{pod_ip}:18080").parse().expect("addr"),
        Identity {
            name: "pod".into(),
            cluster: "cluster-1".into(),
            zone: "a".into(),
        },
    )
    .await
    .expect("echo");
    let (dir, cp) = weft_testkit::control_plane_over(&[
        world::service("echo", 80),
        world::slice("echo", "echo", &[(echo.addr, "n1", true)]),
    ])
    .await;
    let mut cfg = weft_sidecar::RunConfig::local(cp.plaintext(), ip.parse().expect("ip"), "client");
    tweak(&mut cfg);
    let sc = weft_sidecar::Sidecar::start(cfg).await.expect("sidecar");
    let mut ready = sc.xds.ready.clone();
    tokio::time::timeout(PATIENCE, ready.wait_for(|r| *r))
        .await
        .expect("ready")
        .expect("alive");
    (echo, dir, cp, sc)
}

/// Writes `bytes`, then reads until the proxy closes; returns what it answered.
async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .expect("closed within patience");
    String::from_utf8_lossy(&out).into_owned()
}

async fn connection_errors(sc: &weft_testkit::Sidecar) -> f64 {
    let (_, body) = get_via(sc.admin_addr, "admin", "/metrics")
        .await
        .expect("metrics");
    body.lines()
        .filter(|l| l.starts_with("weft_proxy_connection_errors_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn garbage_slowloris_and_oversized_heads_are_closed_and_counted() {
    let (_echo, _d, _cp, sc) = setup("127.0.7.100", |c| {
        c.header_read_timeout = Duration::from_millis(300)
    })
    .await;
    // Garbage: answered 400 (or just closed), never a crash.
    let reply = send_raw(sc.outbound_addr, b"\x00\x01\x02 not http at all\r\n\r\n").await;
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 400"),
        "{reply:?}"
    );
    // Slowloris: half a head, then silence; closed after the header read timeout.
    let mut s = TcpStream::connect(sc.outbound_addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: echo\r\nX-Slow: ")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the slow client was cut off");
    // An oversized head.
    let mut big = b"GET / HTTP/1.1\r\nHost: echo\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 200 * 1024));
    big.extend(b"\r\n\r\n");
    let reply = send_raw(sc.outbound_addr, &big).await;
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 431") || reply.starts_with("HTTP/1.1 400"),
        "{reply:?}"
    );
    assert!(connection_errors(&sc).await >= 3.0, "each was counted");
    // The proxy still serves.
    let (status, body) = get_via(sc.outbound_addr, "echo", "/")
        .await
        .expect("request");
    assert_eq!((status, body.split_whitespace().next()), (200, Some("pod")));
}

/// The inbound listener: a slowloris and an oversized plaintext HTTP head are cut off and
/// counted; a mesh TLS hello while this workload has no certificate is refused and counted;
/// bytes of another protocol go to the application untouched (the inbound cannot know the
/// application's protocol); a plain request is still served, its forged identity removed.
#[tokio::test]
async fn inbound_cuts_slow_and_oversized_heads_and_refuses_what_it_cannot_terminate() {
    let app = Echo::start(
        "127.0.7.11:0".parse().expect("addr"),
        Identity {
            name: "app".into(),
            cluster: "cluster-1".into(),
            zone: "a".into(),
        },
    )
    .await
    .expect("app");
    let app_addr = app.addr;
    let (_echo, _d, _cp, sc) = setup("127.0.7.110", move |c| {
        c.header_read_timeout = Duration::from_millis(300);
        c.app_addr = Some(app_addr);
    })
    .await;
    let mut s = TcpStream::connect(sc.inbound_addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: app\r\nX-Slow: ")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the slow client was cut off");
    let mut big = b"GET / HTTP/1.1\r\nHost: app\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 200 * 1024));
    big.extend(b"\r\n\r\n");
    let reply = send_raw(sc.inbound_addr, &big).await;
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 431") || reply.starts_with("HTTP/1.1 400"),
        "{reply:?}"
    );
    assert!(connection_errors(&sc).await >= 2.0, "each was counted");
    // A ClientHello offering the mesh ALPN, to a sidecar without a certificate.
    let mut hello = vec![0x16, 0x03, 0x01];
    let ext_alpn: Vec<u8> = {
        let proto = weft_proto::tls::ALPN_MESH_HTTP1;
        let mut list = vec![proto.len() as u8];
        list.extend_from_slice(proto);
        let mut e = vec![0x00, 0x10];
        e.extend_from_slice(&((list.len() + 2) as u16).to_be_bytes());
        e.extend_from_slice(&(list.len() as u16).to_be_bytes());
        e.extend(list);
        e
    };
    let mut body = vec![0x03, 0x03];
    body.extend([7u8; 32]);
    body.extend([0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(ext_alpn.len() as u16).to_be_bytes());
    body.extend(ext_alpn);
    let mut handshake = vec![1, 0];
    handshake.extend_from_slice(&(body.len() as u16).to_be_bytes());
    handshake.extend(body);
    hello.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    hello.extend(handshake);
    let reply = send_raw(sc.inbound_addr, &hello).await;
    assert!(reply.is_empty(), "{reply:?}");
    let (_, page) = get_via(sc.admin_addr, "admin", "/metrics")
        .await
        .expect("metrics");
    assert!(
        weft_testkit::metric_sum(
            &page,
            "weft_proxy_inbound_refused_total",
            &["no-certificate"]
        ) >= 1.0,
        "{page}"
    );
    // Another protocol: forwarded as is (the echo app answers it with 400, as HTTP servers do).
    let reply = send_raw(sc.inbound_addr, b"\x00\x01 not http\r\n\r\n").await;
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 400"),
        "{reply:?}"
    );
    // Still serving, and a forged identity never reaches the application.
    let (status, _) = weft_testkit::get_with(
        sc.inbound_addr,
        "app",
        "/",
        &[(
            weft_proto::keys::CLIENT_IDENTITY_HEADER,
            "spiffe://x/ns/y/sa/z",
        )],
    )
    .await
    .expect("request");
    assert_eq!(status, 200);
    assert_eq!(
        app.behavior
            .last_client_identity
            .lock()
            .expect("lock")
            .clone(),
        None
    );
}

#[tokio::test]
async fn drain_finishes_in_flight_requests_and_refuses_new_ones() {
    let (echo, _d, _cp, sc) =
        setup("127.0.8.100", |c| c.drain_timeout = Duration::from_secs(5)).await;
    echo.behavior.delay_ms.store(600, Ordering::Relaxed);
    let addr = sc.outbound_addr;
    let in_flight = tokio::spawn(async move { get_via(addr, "echo", "/").await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let drained = tokio::spawn(sc.drain());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "new connections are refused while draining"
    );
    let (status, _) = in_flight
        .await
        .expect("task")
        .expect("the in-flight request completes");
    assert_eq!(status, 200);
    tokio::time::timeout(PATIENCE, drained)
        .await
        .expect("drain ends")
        .expect("task");
}

/// Fuzzing the HTTP head parser path through the real listener: arbitrary bytes (and
/// arbitrary bytes after a valid request line) never take the proxy down.
#[test]
fn arbitrary_bytes_never_take_the_proxy_down() {
    use proptest::prelude::*;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (_echo, _d, _cp, sc) = rt.block_on(setup("127.0.9.100", |c| {
        c.header_read_timeout = Duration::from_millis(200)
    }));
    let addr = sc.outbound_addr;
    let config = ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    };
    proptest!(config, |(prefix in prop_oneof![Just(Vec::new()), Just(b"GET / HTTP/1.1\r\nHost: echo\r\n".to_vec())],
                        junk in proptest::collection::vec(any::<u8>(), 0..512))| {
        let mut bytes = prefix;
        bytes.extend(junk);
        rt.block_on(async {
            let mut s = TcpStream::connect(addr).await.expect("the proxy still accepts");
            let _ = s.write_all(&bytes).await;
            let _ = s.shutdown().await;
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        });
    });
    let (status, _) = rt.block_on(get_via(addr, "echo", "/")).expect("request");
    assert_eq!(status, 200, "the proxy serves after the fuzzing");
}

/// A connection that goes quiet is closed after the idle timeout (opaque TCP and HTTP keep-
/// alive alike), and a listener takes no more than its connection cap: extra connections are
/// closed at once. Both are counted.
#[tokio::test]
async fn idle_connections_are_closed_and_listeners_are_capped() {
    // An application that accepts and never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.9.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = silent.accept().await {
            if let Ok(mut k) = keep.lock() {
                k.push(s);
            }
        }
    });
    let (_echo, _d, _cp, sc) = setup("127.0.9.100", |c| {
        c.idle_timeout = Duration::from_millis(400);
        c.max_connections = 3;
        c.app_addr = Some(silent_addr);
    })
    .await;
    // Opaque bytes to a silent app: spliced, then cut once nothing moves.
    let started = tokio::time::Instant::now();
    let mut s = TcpStream::connect(sc.inbound_addr).await.expect("connect");
    s.write_all(b"\x00\x01binary").await.expect("write");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
        .await
        .expect("closed within patience")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed, nothing answered");
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "{:?}",
        started.elapsed()
    );
    // HTTP keep-alive through outbound: one request, then quiet: closed.
    let mut h = TcpStream::connect(sc.outbound_addr).await.expect("connect");
    h.write_all(b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n")
        .await
        .expect("write");
    let mut got = vec![0u8; 4096];
    let n = h.read(&mut got).await.expect("response");
    assert!(String::from_utf8_lossy(&got[..n]).starts_with("HTTP/1.1 200"));
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, h.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "an idle keep-alive connection stayed open");
    // The cap: three open connections are held, the fourth is closed at once.
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(sc.inbound_addr).await.expect("connect");
        c.write_all(b"\x00\x02").await.expect("write");
        open.push(c);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut extra = TcpStream::connect(sc.inbound_addr).await.expect("connect");
    let n = tokio::time::timeout(Duration::from_millis(300), extra.read(&mut buf))
        .await
        .expect("the fourth connection is closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let (_, metrics) = get_via(sc.admin_addr, "admin", "/metrics")
        .await
        .expect("metrics");
    let count = |reason: &str| {
        weft_testkit::metric_sum(
            &metrics,
            "weft_proxy_connections_closed_total",
            &[&format!("reason=\"{reason}\"")],
        )
    };
    assert!(count("idle") >= 2.0, "{metrics}");
    assert!(count("max-connections") >= 1.0, "{metrics}");
    drop(open);
}
