//! The mesh DNS for real: a control plane (file source) with an exported Service, a sidecar
//! answering DNS on loopback over UDP and TCP, and a stand-in for the pod's original resolver
//! (a loopback UDP/TCP server that answers every A query with one address of its own).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use weft_testkit::echo::{Echo, Identity};
use weft_testkit::{get_via, world};

/// What the stand-in upstream answers for any A query.
const UPSTREAM_ANSWER: [u8; 4] = [198, 18, 77, 7];

/// The pod's original resolver: answers every A query with [`UPSTREAM_ANSWER`], over UDP and
/// TCP, and counts what it was asked.
struct Upstream {
    addr: SocketAddr,
    asked: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn upstream_answer(query: &[u8]) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let mut m = Message::response(q.metadata.id, OpCode::Query);
    m.add_queries(q.queries.iter().cloned());
    for question in &q.queries {
        if question.query_type() == RecordType::A {
            m.add_answer(Record::from_rdata(
                question.name().clone(),
                60,
                RData::A(A(UPSTREAM_ANSWER.into())),
            ));
        }
    }
    m.to_vec().ok()
}

async fn upstream(ip: &str) -> Upstream {
    let udp = UdpSocket::bind((ip, 0)).await.expect("bind udp");
    let addr = udp.local_addr().expect("addr");
    let tcp = TcpListener::bind(addr).await.expect("bind tcp");
    let asked = Arc::new(AtomicU64::new(0));
    let n = asked.clone();
    let u = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((len, peer)) = udp.recv_from(&mut buf).await {
            n.fetch_add(1, Ordering::Relaxed);
            if let Some(resp) = upstream_answer(&buf[..len]) {
                let _ = udp.send_to(&resp, peer).await;
            }
        }
    });
    let n = asked.clone();
    let t = tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            n.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let Ok(len) = s.read_u16().await else { return };
                let mut q = vec![0u8; len as usize];
                if s.read_exact(&mut q).await.is_err() {
                    return;
                }
                if let Some(resp) = upstream_answer(&q) {
                    let _ = s.write_u16(resp.len() as u16).await;
                    let _ = s.write_all(&resp).await;
                }
            });
        }
    });
    Upstream {
        addr,
        asked,
        tasks: vec![u, t],
    }
}

fn query(id: u16, name: &str, t: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), t));
    m.to_vec().expect("encode")
}

/// One UDP query to `server`: the answer's response code and A addresses.
async fn ask(server: SocketAddr, id: u16, name: &str) -> (ResponseCode, Vec<IpAddr>) {
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    s.connect(server).await.expect("connect");
    s.send(&query(id, name, RecordType::A)).await.expect("send");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf))
        .await
        .expect("an answer within 5 s")
        .expect("recv");
    decode(&buf[..n], id)
}

fn decode(bytes: &[u8], id: u16) -> (ResponseCode, Vec<IpAddr>) {
    let m = Message::from_vec(bytes).expect("a DNS message");
    assert_eq!(m.metadata.id, id, "the answer carries the query's id");
    let ips = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect();
    (m.metadata.response_code, ips)
}

/// The same over TCP (length-prefixed).
async fn ask_tcp(server: SocketAddr, id: u16, name: &str) -> (ResponseCode, Vec<IpAddr>) {
    let mut s = TcpStream::connect(server).await.expect("connect");
    let q = query(id, name, RecordType::A);
    s.write_u16(q.len() as u16).await.expect("len");
    s.write_all(&q).await.expect("query");
    let len = tokio::time::timeout(Duration::from_secs(5), s.read_u16())
        .await
        .expect("an answer within 5 s")
        .expect("len");
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf).await.expect("answer");
    decode(&buf, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_dns_answers_mesh_names_forwards_the_rest_and_bounds_a_flood() {
    let echo = Echo::start(
        "127.0.6.2:18080".parse().expect("addr"),
        Identity {
            name: "pod-a".into(),
            cluster: "cluster-1".into(),
            zone: "a".into(),
        },
    )
    .await
    .expect("echo");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("world.yaml"),
        world::docs(&[
            "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: default}\nspec:\n  clusterIP: 198.18.0.10\n  ports: [{name: http, port: 80, appProtocol: http}]\n".into(),
            world::slice("echo", "echo", &[(echo.addr, "n1", true)]),
            world::export("echo"),
            world::service("local-only", 80),
        ]),
    )
    .expect("write");
    let cp = weft_testkit::start_control_plane(dir.path())
        .await
        .expect("control plane");
    let vip = cp.catalog.current().services
        [&weft_control_plane::catalog::ServiceKey::new("default", "echo")]
        .clusterset_vip
        .expect("the exported service has a clusterset VIP");
    let up = upstream("127.0.6.53").await;
    let mut cfg = weft_sidecar::RunConfig::local(
        cp.plaintext(),
        "127.0.6.1".parse().expect("ip"),
        "dns-client",
    );
    cfg.cluster = "cluster-1".into();
    cfg.dns_addr = Some("127.0.6.1:0".parse().expect("addr"));
    cfg.dns_upstream = vec![up.addr];
    cfg.dns_max_qps = 200;
    let sc = weft_testkit::Sidecar::start(cfg).await.expect("sidecar");
    weft_testkit::wait_ready(&sc, Duration::from_secs(15)).await;
    let dns = sc.dns_addr.expect("mesh DNS bound");

    // Mesh names, from the config the proxy holds: the clusterset name gets its VIP, the
    // cluster name its clusterIP; the upstream is not asked.
    let clusterset = "echo.default.svc.clusterset.local.";
    assert_eq!(
        ask(dns, 1, clusterset).await,
        (ResponseCode::NoError, vec![vip])
    );
    assert_eq!(
        ask(dns, 2, "echo.default.svc.cluster.local.").await,
        (
            ResponseCode::NoError,
            vec!["198.18.0.10".parse::<IpAddr>().expect("ip")]
        )
    );
    assert_eq!(
        ask_tcp(dns, 3, clusterset).await.1,
        vec![vip],
        "over TCP too"
    );
    assert_eq!(up.asked.load(Ordering::Relaxed), 0, "mesh names stay local");
    // Everything else goes to the original resolver, and its answer comes back unchanged.
    let theirs = vec![IpAddr::from(UPSTREAM_ANSWER)];
    assert_eq!(ask(dns, 4, "example.com.").await.1, theirs);
    assert_eq!(ask_tcp(dns, 6, "example.org.").await.1, theirs);
    // A name it does not hold — here a Service without a clusterset name, under that zone —
    // is the original resolver's to answer, as before the mesh.
    assert_eq!(
        ask(dns, 5, "local-only.default.svc.clusterset.local.")
            .await
            .1,
        theirs
    );
    assert_eq!(up.asked.load(Ordering::Relaxed), 3);

    // The VIP is recognised by the outbound listener: a client that resolved the clusterset
    // name and dialed its address (Host: the VIP) reaches the Service.
    let (status, body) = get_via(sc.outbound_addr, &vip.to_string(), "/")
        .await
        .expect("request");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("pod-a"), "{body}");

    // A flood: 1000 queries within about a tenth of a second against 200 per second (sent in
    // bursts of 25 so that neither socket buffer drops them). Beyond the budget the answer is
    // REFUSED, at once, and counted; the upstream sees at most the admitted ones.
    let flood = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    flood.connect(dns).await.expect("connect");
    let reader = {
        let flood = flood.clone();
        tokio::spawn(async move {
            let (mut refused, mut answered) = (0u32, 0u32);
            let mut buf = vec![0u8; 4096];
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(3), flood.recv(&mut buf)).await
            {
                match Message::from_vec(&buf[..n]).map(|m| m.metadata.response_code) {
                    Ok(ResponseCode::Refused) => refused += 1,
                    Ok(_) => answered += 1,
                    Err(e) => panic!("not DNS: {e}"),
                }
                if refused + answered == 1000 {
                    break;
                }
            }
            (refused, answered)
        })
    };
    for i in 0..1000u16 {
        let name = if i % 2 == 0 {
            clusterset
        } else {
            "flood.example."
        };
        flood
            .send(&query(10_000 + i, name, RecordType::A))
            .await
            .expect("send");
        if i % 25 == 24 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let (refused, answered) = reader.await.expect("reader");
    println!("flood: {answered} answered, {refused} refused");
    assert!(
        refused + answered >= 950,
        "{answered} + {refused}: answers were lost"
    );
    assert!(refused >= 600, "{refused} refused of 1000 at 200 qps");
    assert!(answered >= 100, "the budget is still served: {answered}");
    assert!(
        up.asked.load(Ordering::Relaxed) <= 3 + 250,
        "the upstream saw {} queries",
        up.asked.load(Ordering::Relaxed)
    );
    let (_, page) = get_via(sc.admin_addr, "admin", "/metrics")
        .await
        .expect("metrics");
    let limited = weft_testkit::metric_sum(
        &page,
        "weft_proxy_dns_queries_total",
        &["answer=\"limited\""],
    );
    assert!(
        limited >= f64::from(refused),
        "{limited} counted, {refused} refused\n{page}"
    );
    assert!(
        weft_testkit::metric_sum(&page, "weft_proxy_dns_queries_total", &["answer=\"mesh\""])
            >= 3.0
    );
}

/// The mesh DNS is the pod's own resolver: on an address other hosts reach it would answer
/// them too (mesh names, and a reflector for floods), so start-up refuses one, naming the flag.
#[tokio::test]
async fn mesh_dns_refuses_to_listen_beyond_loopback() {
    let (_dir, cp) = weft_testkit::control_plane_over(&[]).await;
    let mut cfg = weft_sidecar::RunConfig::local(
        cp.plaintext(),
        "127.0.6.3".parse().expect("ip"),
        "dns-open",
    );
    cfg.dns_addr = Some("0.0.0.0:0".parse().expect("addr"));
    let err = weft_testkit::Sidecar::start(cfg)
        .await
        .err()
        .expect("an open resolver is refused");
    assert!(err.to_string().contains("--dns-addr 0.0.0.0:0"), "{err}");
}
