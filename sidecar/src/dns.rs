//! Mesh DNS: the pod's resolver for mesh names, over UDP and TCP.
//!
//! A query for an A or AAAA record of a name the proxy holds ([`crate::state::DnsTable`]:
//! every Service's `*.svc.cluster.local` name with its clusterIP, every
//! `*.svc.clusterset.local` name with the VIP its control plane allocated) is answered here,
//! authoritatively (a name with no address of the asked family gets an empty NOERROR, never a
//! forward that could leak it). Every other query is forwarded byte for byte to the pod's
//! original resolver and its answer relayed unchanged. `weft-sidecar init
//! --redirect-dns-port` redirects the pod's port 53 here, the proxy's own queries excluded.
//!
//! Bounded: a token bucket caps queries per second (UDP and TCP together) and a semaphore the
//! forwarded queries in flight; beyond either, the answer is REFUSED and counted, so a flood
//! costs the pod neither memory nor its upstream's goodwill.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::metrics::Metrics;
use crate::state::{DnsTable, MeshConfig};

/// TTL of mesh answers, seconds: what kube-dns uses for Services.
pub const MESH_TTL: u32 = 30;
/// How long a forwarded query waits for each upstream.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest DNS message taken from a client over UDP (EDNS's usual ceiling).
pub const MAX_MESSAGE: usize = 4096;
/// Largest answer read from an upstream (a UDP datagram's limit): relayed whole, never cut.
const MAX_UPSTREAM_ANSWER: usize = 65_535;
/// A DNS header's size: anything shorter is not a query and is dropped, never forwarded.
const HEADER_LEN: usize = 12;
/// Queries one TCP connection may carry, and how long it may stay idle.
const TCP_QUERIES: usize = 64;
const TCP_IDLE: Duration = Duration::from_secs(10);

/// What to do with one query message.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Answer with these bytes.
    Answer(Vec<u8>, Outcome),
    /// Not a mesh name: forward it unchanged.
    Forward,
}

/// How a query ended, for `weft_proxy_dns_queries_total{answer}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A mesh name, answered with its addresses.
    Mesh,
    /// A mesh name without an address of the asked family, or asked for another type: empty
    /// NOERROR.
    NoData,
    /// Forwarded and relayed.
    Forwarded,
    /// Over the rate or the in-flight bound: REFUSED.
    Limited,
    /// No upstream answered: SERVFAIL.
    Failed,
    /// Not a DNS query: FORMERR (or dropped when not even the id could be read).
    Malformed,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Mesh => "mesh",
            Outcome::NoData => "nodata",
            Outcome::Forwarded => "forwarded",
            Outcome::Limited => "limited",
            Outcome::Failed => "failed",
            Outcome::Malformed => "malformed",
        }
    }
}

/// An answer with `code` and no records to `query` (its id and question echoed), when the
/// query can be read at all.
pub fn error_reply(query: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    match Message::from_vec(query) {
        Ok(q) => {
            let mut m = Message::error_msg(q.metadata.id, q.metadata.op_code, code);
            m.metadata.recursion_desired = q.metadata.recursion_desired;
            m.metadata.recursion_available = true;
            m.add_queries(q.queries.iter().cloned());
            m.to_vec().ok()
        }
        // The id alone is enough to tell the client its message was malformed.
        Err(_) if query.len() >= 2 => {
            let id = u16::from_be_bytes([query[0], query[1]]);
            Message::error_msg(id, OpCode::Query, code).to_vec().ok()
        }
        Err(_) => None,
    }
}

/// What `query` gets from the mesh names in `table`: `None` for bytes too short to be a
/// query (dropped).
pub fn resolve(query: &[u8], table: &DnsTable) -> Option<Reply> {
    resolve_with(query, &|name| table.get(name).cloned())
}

/// What `query` gets from the mesh names `lookup` knows (lower case, no trailing dot).
pub fn resolve_with(
    query: &[u8],
    lookup: &dyn Fn(&str) -> Option<std::sync::Arc<[IpAddr]>>,
) -> Option<Reply> {
    if query.len() < HEADER_LEN {
        return None;
    }
    let Ok(q) = Message::from_vec(query) else {
        return error_reply(query, ResponseCode::FormErr)
            .map(|b| Reply::Answer(b, Outcome::Malformed));
    };
    let [question] = q.queries.as_slice() else {
        return Some(Reply::Forward);
    };
    if q.metadata.message_type != MessageType::Query || q.metadata.op_code != OpCode::Query {
        return Some(Reply::Forward);
    }
    let qtype = question.query_type();
    let name = question.name().to_ascii();
    let key = name.trim_end_matches('.').to_ascii_lowercase();
    // A name the proxy does not hold — a clusterset name not yet synced or not exported
    // included — is the original resolver's to answer, as before the mesh.
    let Some(addrs) = lookup(&key) else {
        return Some(Reply::Forward);
    };
    // A mesh name is answered here whatever the type (SRV, HTTPS, TXT get an empty answer):
    // never forwarded, so the upstream never learns what the pod calls.
    let mut m = Message::response(q.metadata.id, OpCode::Query);
    m.metadata.authoritative = true;
    m.metadata.recursion_desired = q.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_query(question.clone());
    for ip in addrs.iter() {
        let rdata = match (ip, qtype) {
            (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
            (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
            _ => continue,
        };
        m.add_answer(Record::from_rdata(question.name().clone(), MESH_TTL, rdata));
    }
    let outcome = if m.answers.is_empty() {
        Outcome::NoData
    } else {
        Outcome::Mesh
    };
    m.to_vec().ok().map(|b| Reply::Answer(b, outcome))
}

/// The pod's original resolvers: the `nameserver` lines of resolv.conf text, port 53.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next()?.parse::<IpAddr>().ok())
                .flatten()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// A token bucket: `rate` per second, bursts up to `rate`.
struct Bucket {
    tokens: f64,
    last: Instant,
    rate: f64,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How the mesh DNS behaves (from `RunConfig`).
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// Where what is not a mesh name goes, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// Queries per second taken.
    pub max_qps: u32,
    /// Forwarded queries in flight at once.
    pub max_inflight: usize,
}

/// The running server's shared state.
struct Server {
    config: Arc<ArcSwap<MeshConfig>>,
    settings: DnsSettings,
    bucket: Mutex<Bucket>,
    inflight: Arc<tokio::sync::Semaphore>,
    metrics: Arc<Metrics>,
}

impl Server {
    fn count(&self, o: Outcome) {
        self.metrics.dns_query(o.as_str());
    }

    fn admit(&self) -> bool {
        match self.bucket.lock() {
            Ok(mut b) => b.take(),
            Err(p) => p.into_inner().take(),
        }
    }

    /// What to do with one query, decided without waiting: an answer now (or silence), or a
    /// forward holding one of the in-flight permits.
    fn decide(&self, query: &[u8]) -> Decision {
        if !self.admit() {
            self.count(Outcome::Limited);
            return Decision::Now(error_reply(query, ResponseCode::Refused));
        }
        let config = self.config.load();
        match resolve_with(query, &|name| config.dns_addresses(name)) {
            None => {
                self.count(Outcome::Malformed);
                Decision::Now(None)
            }
            Some(Reply::Answer(bytes, outcome)) => {
                self.count(outcome);
                Decision::Now(Some(bytes))
            }
            Some(Reply::Forward) => match self.inflight.clone().try_acquire_owned() {
                Ok(permit) => Decision::Forward(permit),
                Err(_) => {
                    self.count(Outcome::Limited);
                    Decision::Now(error_reply(query, ResponseCode::Refused))
                }
            },
        }
    }

    /// The upstreams' answer to `query`, tried in order; SERVFAIL when none answers.
    async fn forward(&self, query: &[u8], over_tcp: bool) -> Option<Vec<u8>> {
        for up in &self.settings.upstreams {
            let got = if over_tcp {
                forward_tcp(*up, query).await
            } else {
                forward_udp(*up, query).await
            };
            match got {
                Ok(resp) => {
                    self.count(Outcome::Forwarded);
                    return Some(resp);
                }
                Err(e) => {
                    tracing::debug!(upstream = %up, error = %e, "DNS upstream did not answer")
                }
            }
        }
        self.count(Outcome::Failed);
        error_reply(query, ResponseCode::ServFail)
    }

    /// The answer to one query, forwarding it when needed.
    async fn answer(&self, query: &[u8], over_tcp: bool) -> Option<Vec<u8>> {
        match self.decide(query) {
            Decision::Now(reply) => reply,
            Decision::Forward(_permit) => self.forward(query, over_tcp).await,
        }
    }
}

/// [`Server::decide`]'s verdict.
enum Decision {
    Now(Option<Vec<u8>>),
    Forward(tokio::sync::OwnedSemaphorePermit),
}

/// Sends `query` to `upstream` over UDP from a socket connected to it (only its datagrams
/// are read), and returns the first answer carrying the query's id and question.
async fn forward_udp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(upstream).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; MAX_UPSTREAM_ANSWER];
    tokio::time::timeout(UPSTREAM_TIMEOUT, async {
        loop {
            let n = sock.recv(&mut buf).await?;
            if answers(query, &buf[..n]) {
                return Ok(buf[..n].to_vec());
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

/// Whether `answer` is the answer to `query`: the same id and the same question.
fn answers(query: &[u8], answer: &[u8]) -> bool {
    if query.len() < HEADER_LEN || answer.len() < HEADER_LEN || answer[..2] != query[..2] {
        return false;
    }
    match (Message::from_vec(query), Message::from_vec(answer)) {
        (Ok(q), Ok(a)) => a.queries == q.queries,
        _ => false,
    }
}

/// Sends `query` to `upstream` over TCP and returns its answer.
async fn forward_tcp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    tokio::time::timeout(UPSTREAM_TIMEOUT, async {
        let mut s = TcpStream::connect(upstream).await?;
        write_framed(&mut s, query).await?;
        let answer = read_framed(&mut s).await?;
        if answers(query, &answer) {
            Ok(answer)
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the answer is not to this query",
            ))
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

async fn write_framed(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "message too long"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    s.write_all(&out).await
}

async fn read_framed(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = s.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Binds the mesh DNS's UDP socket and TCP listener at `addr` (the TCP one on the UDP one's
/// port when `addr`'s is 0).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let udp = UdpSocket::bind(addr).await?;
    let tcp = TcpListener::bind(udp.local_addr()?).await?;
    Ok((udp, tcp))
}

/// Serves the mesh DNS until aborted.
pub async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    config: Arc<ArcSwap<MeshConfig>>,
    settings: DnsSettings,
    metrics: Arc<Metrics>,
) {
    // Never its own upstream: a resolver listed at the mesh DNS's own address would loop.
    let own = udp.local_addr().ok();
    let mut settings = settings;
    settings.upstreams.retain(|u| Some(*u) != own);
    let rate = f64::from(settings.max_qps.max(1));
    let server = Arc::new(Server {
        config,
        inflight: Arc::new(tokio::sync::Semaphore::new(settings.max_inflight.max(1))),
        settings,
        bucket: Mutex::new(Bucket {
            tokens: rate,
            last: Instant::now(),
            rate,
        }),
        metrics,
    });
    let udp = Arc::new(udp);
    let tcp_server = server.clone();
    let tcp_task = tokio::spawn(async move {
        // As many TCP connections at once as forwarded queries: the same bound.
        let conns = Arc::new(tokio::sync::Semaphore::new(
            tcp_server.settings.max_inflight.max(1),
        ));
        loop {
            let Ok((stream, _)) = tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(permit) = conns.clone().try_acquire_owned() else {
                tcp_server.count(Outcome::Limited);
                continue;
            };
            let s = tcp_server.clone();
            tokio::spawn(async move {
                let _permit = permit;
                serve_tcp(stream, &s).await;
            });
        }
    });
    let _tcp = AbortOnDrop(tcp_task);
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, peer) = match udp.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                tracing::debug!(error = %e, "mesh DNS receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Mesh names and refusals are answered inline; only forwards get a task, each
        // holding an in-flight permit, so a flood spawns nothing.
        match server.decide(&buf[..n]) {
            Decision::Now(Some(resp)) => {
                let _ = udp.send_to(&resp, peer).await;
            }
            Decision::Now(None) => {}
            Decision::Forward(permit) => {
                let query = buf[..n].to_vec();
                let (s, udp) = (server.clone(), udp.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Some(resp) = s.forward(&query, false).await {
                        let _ = udp.send_to(&resp, peer).await;
                    }
                });
            }
        }
    }
}

/// Aborts the task when dropped (the TCP side ends with the UDP loop).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve_tcp(mut stream: TcpStream, server: &Server) {
    for _ in 0..TCP_QUERIES {
        let Ok(Ok(query)) = tokio::time::timeout(TCP_IDLE, read_framed(&mut stream)).await else {
            return;
        };
        let Some(resp) = server.answer(&query, true).await else {
            return;
        };
        if write_framed(&mut stream, &resp).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), t));
        m.to_vec().expect("encode")
    }

    fn table() -> DnsTable {
        let mut t = DnsTable::default();
        crate::state::add_dns_names(
            &mut t,
            &[
                "echo.default.svc.clusterset.local:80".into(),
                "echo.default.svc.clusterset.local".into(),
                "240.240.3.9:80".into(),
                "240.240.3.9".into(),
            ],
        );
        crate::state::add_dns_names(
            &mut t,
            &[
                "echo".into(),
                "echo.default".into(),
                "echo.default.svc.cluster.local".into(),
                "echo.default.svc.cluster.local:8080".into(),
                "198.18.0.10:8080".into(),
                "[2001:2::10]:8080".into(),
            ],
        );
        // A virtual host without an address (a headless Service) gives no name.
        crate::state::add_dns_names(&mut t, &["db.default.svc.cluster.local".into()]);
        t
    }

    fn decoded(reply: Option<Reply>) -> (Vec<IpAddr>, Outcome, Message) {
        let Some(Reply::Answer(bytes, outcome)) = reply else {
            panic!("forwarded")
        };
        let m = Message::from_vec(&bytes).expect("decode");
        let ips = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect();
        (ips, outcome, m)
    }

    #[test]
    fn mesh_names_are_answered_with_their_addresses_in_any_case_with_or_without_the_dot() {
        let t = table();
        for name in [
            "echo.default.svc.clusterset.local.",
            "ECHO.Default.svc.clusterset.local",
        ] {
            let (ips, outcome, m) = decoded(resolve(&query(name, RecordType::A), &t));
            assert_eq!(
                ips,
                vec!["240.240.3.9".parse::<IpAddr>().expect("ip")],
                "{name}"
            );
            assert_eq!(outcome, Outcome::Mesh);
            assert_eq!(m.metadata.id, 0x4242);
            assert!(m.metadata.authoritative);
            assert_eq!(m.answers[0].ttl, MESH_TTL);
        }
        let (v4, ..) = decoded(resolve(
            &query("echo.default.svc.cluster.local.", RecordType::A),
            &t,
        ));
        assert_eq!(v4, vec!["198.18.0.10".parse::<IpAddr>().expect("ip")]);
        let (v6, ..) = decoded(resolve(
            &query("echo.default.svc.cluster.local.", RecordType::AAAA),
            &t,
        ));
        assert_eq!(v6, vec!["2001:2::10".parse::<IpAddr>().expect("ip")]);
    }

    #[test]
    fn a_mesh_name_is_never_forwarded_and_names_it_does_not_hold_are() {
        let t = table();
        let (ips, outcome, m) = decoded(resolve(
            &query("echo.default.svc.clusterset.local.", RecordType::AAAA),
            &t,
        ));
        assert!(ips.is_empty());
        assert_eq!(outcome, Outcome::NoData);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        // Other types of a mesh name: answered here, empty (the upstream never hears of it).
        for ty in [RecordType::SRV, RecordType::HTTPS, RecordType::TXT] {
            let (ips, outcome, _) =
                decoded(resolve(&query("echo.default.svc.cluster.local.", ty), &t));
            assert!(ips.is_empty());
            assert_eq!(outcome, Outcome::NoData, "{ty}");
        }
        for (name, ty) in [
            ("unknown.default.svc.clusterset.local.", RecordType::A),
            ("example.com.", RecordType::A),
            ("db.default.svc.cluster.local.", RecordType::A),
            ("echo.", RecordType::A),
        ] {
            assert_eq!(
                resolve(&query(name, ty), &t),
                Some(Reply::Forward),
                "{name} {ty}"
            );
        }
    }

    #[test]
    fn garbage_gets_formerr_or_is_dropped() {
        let t = table();
        // A header promising a question that is not there.
        let broken = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff];
        let (_, outcome, m) = decoded(resolve(&broken, &t));
        assert_eq!(outcome, Outcome::Malformed);
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        // Shorter than a header: dropped, never forwarded.
        assert_eq!(resolve(&[0x12, 0x34, 0xff], &t), None);
        assert_eq!(resolve(&[], &t), None);
        assert_eq!(error_reply(&[1], ResponseCode::FormErr), None);
    }

    #[test]
    fn nameservers_come_from_resolv_conf() {
        let conf = "# generated\nsearch default.svc.cluster.local svc.cluster.local\nnameserver 198.18.0.53\nnameserver fd00::53\noptions ndots:5\nnameserver bogus\n";
        assert_eq!(
            nameservers(conf),
            vec![
                "198.18.0.53:53".parse::<SocketAddr>().expect("addr"),
                "[fd00::53]:53".parse().expect("addr")
            ]
        );
    }

    /// An answer with another id or another question (a forgery racing the real one, or a
    /// stale answer) is not relayed: the forwarder waits for the one that matches its query.
    #[tokio::test]
    async fn the_forwarder_relays_only_the_answer_with_its_querys_id() {
        let up = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = up.local_addr().expect("addr");
        let q = query("outside.test.", RecordType::A);
        let server = tokio::spawn(async move {
            let mut buf = vec![0u8; 512];
            let (n, peer) = up.recv_from(&mut buf).await.expect("recv");
            let mut forged = buf[..n].to_vec();
            forged[0] ^= 0xff;
            up.send_to(&forged, peer).await.expect("send");
            // The right id, another question: not the answer either.
            let other = query("elsewhere.test.", RecordType::A);
            let wrong = error_reply(&other, ResponseCode::NoError).expect("reply");
            up.send_to(&wrong, peer).await.expect("send");
            let real = error_reply(&buf[..n], ResponseCode::NXDomain).expect("reply");
            up.send_to(&real, peer).await.expect("send");
        });
        let got = forward_udp(addr, &q).await.expect("an answer");
        let m = Message::from_vec(&got).expect("decode");
        assert_eq!(m.metadata.id, 0x4242);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        server.await.expect("server");
    }

    #[test]
    fn the_bucket_takes_its_rate_then_refuses_until_it_refills() {
        let mut b = Bucket {
            tokens: 5.0,
            last: Instant::now(),
            rate: 5.0,
        };
        let taken = (0..20).filter(|_| b.take()).count();
        assert_eq!(taken, 5);
    }
}
