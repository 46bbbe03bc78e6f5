//! The upstream connection pool: hyper's `client::conn` senders per endpoint, keyed by socket
//! address, protocol and (for mesh mTLS) the identity the connection was checked against, so a
//! connection verified as one SPIFFE ID never carries a request meant for another.
//!
//! HTTP/1.1: a stack of idle connections per key, each locked on its own; a request takes the
//! most recently used one that is still open, or dials. The connection goes back when the
//! response body has been read to its end (a body dropped early closes it); after a 101 it
//! belongs to the upgrade (WebSocket) and never goes back. HTTP/2: one shared
//! connection per key, redialled once closed. Idle connections older than the idle timeout are
//! dropped when met and by a sweep. A request that could not be written on a reused connection
//! (the endpoint closed it while idle) is sent once more on a new one. No URI is formatted or
//! parsed to find a connection; only the HTTP/2 request gets an absolute URI (`:authority`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use weft_proto::tls;

use crate::http::{Body, FastMap};

/// Why an mTLS connection to an endpoint was not made.
#[derive(Debug, thiserror::Error)]
pub enum MeshConnectError {
    /// The URI has no `ip:port` authority.
    #[error("{0:?} is not an endpoint address")]
    Address(String),
    /// This workload has no valid certificate.
    #[error("this workload has no valid certificate yet")]
    NoCertificate,
    /// TCP connect failed or timed out.
    #[error("connect {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    /// The TLS handshake failed or timed out.
    #[error("mTLS handshake with {0}: {1}")]
    Handshake(SocketAddr, std::io::Error),
    /// The peer is not who the control plane said.
    #[error("mTLS peer {0}: {1}")]
    Identity(SocketAddr, tls::TlsError),
    /// No gateway of the endpoint's network opened a tunnel to it.
    #[error("{0}: no gateway opened a tunnel: {1}")]
    Gateway(SocketAddr, String),
}

/// How long an idle upstream connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often an HTTP/2 upstream connection is pinged, and how long a ping may go unanswered.
pub const H2_KEEPALIVE: Duration = Duration::from_secs(20);
/// See [`H2_KEEPALIVE`].
pub const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle HTTP/1.1 connections kept per endpoint at most (more are closed when they come back).
pub const MAX_IDLE_PER_KEY: usize = 512;

/// What a pooled connection is: where to, how, and checked as whom.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    /// The endpoint.
    pub addr: SocketAddr,
    /// HTTP/2 (prior knowledge, or inside mTLS under the mesh's HTTP/2 ALPN).
    pub h2: bool,
    /// The SPIFFE ID the peer was verified as (mesh mTLS), or none (plaintext).
    pub identity: Option<Arc<str>>,
    /// Reached through another network's gateway: never the connection to this network's
    /// endpoint at the same address.
    pub via: Option<Arc<crate::balance::Via>>,
}

/// Why a request did not get a response from its endpoint.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be made (nothing reached the endpoint: safe to retry elsewhere).
    #[error(transparent)]
    Connect(#[from] MeshConnectError),
    /// The HTTP handshake on a new connection failed.
    #[error("HTTP handshake with {0}: {1}")]
    Handshake(SocketAddr, hyper::Error),
    /// The connection broke before a response.
    #[error("{0}: {1}")]
    Send(SocketAddr, hyper::Error),
}

/// Why a request was not answered, and the request itself when no connection could be made.
pub type Unsendable = (PoolError, Option<Request<Body>>);

impl PoolError {
    /// Whether nothing reached the endpoint (a connect failure), as opposed to a reset.
    pub fn is_connect(&self) -> bool {
        matches!(self, PoolError::Connect(_) | PoolError::Handshake(..))
    }
}

/// How a pool opens a new connection to an endpoint (plain TCP, or TCP then mesh mTLS): any
/// `Fn() -> impl Future<Output = Result<stream, MeshConnectError>>`.
pub trait Dial {
    /// The connection's stream.
    type Io: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    /// Opens one.
    fn dial(&self) -> impl Future<Output = Result<Self::Io, MeshConnectError>> + Send;
}

impl<F, Fut, S> Dial for F
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<S, MeshConnectError>> + Send,
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Io = S;
    fn dial(&self) -> impl Future<Output = Result<S, MeshConnectError>> + Send {
        self()
    }
}

struct Idle {
    tx: http1::SendRequest<Body>,
    since: Instant,
}

impl Idle {
    /// Still worth keeping at `now`: open, and not idle past the timeout.
    fn usable(&self, now: Instant) -> bool {
        !self.tx.is_closed() && now.saturating_duration_since(self.since) <= IDLE_TIMEOUT
    }
}

type Stack = Arc<Mutex<Vec<Idle>>>;
type Back = (http1::SendRequest<Body>, Stack);

/// Upstream connections by [`Key`].
#[derive(Default)]
pub struct Pool {
    h1: RwLock<FastMap<Key, Stack>>,
    h2: Mutex<FastMap<Key, (http2::SendRequest<Body>, Instant)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Pool {
    /// A pool, with a task (when a runtime is running) that drops expired idle connections.
    pub fn new() -> Arc<Pool> {
        let pool = Arc::new(Pool::default());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&pool);
            rt.spawn(sweep(weak));
        }
        pool
    }

    fn stack(&self, key: &Key) -> Stack {
        if let Some(s) = read(&self.h1).get(key) {
            return s.clone();
        }
        write(&self.h1).entry(key.clone()).or_default().clone()
    }

    /// Sends `req` (origin-form URI; `Host` set) to `key`'s endpoint over a pooled connection,
    /// dialling with `dial` when there is none.
    pub async fn send<D: Dial>(
        &self,
        key: &Key,
        req: Request<Body>,
        dial: D,
    ) -> Result<Response<Body>, PoolError> {
        self.send_or_return(key, req, dial)
            .await
            .map_err(|(e, _)| e)
    }

    /// [`Pool::send`], handing the request back when no connection could be made (it was
    /// never written anywhere: the caller may send it elsewhere without having copied it).
    pub async fn send_or_return<D: Dial>(
        &self,
        key: &Key,
        req: Request<Body>,
        dial: D,
    ) -> Result<Response<Body>, Unsendable> {
        if key.h2 {
            self.send_h2(key, req, dial).await
        } else {
            self.send_h1(key, req, dial).await
        }
    }

    async fn send_h1<D: Dial>(
        &self,
        key: &Key,
        mut req: Request<Body>,
        dial: D,
    ) -> Result<Response<Body>, Unsendable> {
        let stack = self.stack(key);
        let mut reused = self.checkout(&stack).await;
        loop {
            let was_reused = reused.is_some();
            let mut tx = match reused.take() {
                Some(tx) => tx,
                // Boxed: dialling (TCP, TLS) is rare and its state large; unboxed it would be
                // part of (and copied with) every request's future.
                None => match Box::pin(open_h1(key.addr, &dial)).await {
                    Ok(tx) => tx,
                    Err(e) => return Err((e, Some(req))),
                },
            };
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    // An upgraded connection is no longer HTTP: it never goes back.
                    let back = (resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS)
                        .then(|| (tx, stack.clone()));
                    return Ok(resp.map(|body| {
                        let mut body = Returning { body, back };
                        // An empty body (204, 304, `content-length: 0`) is never polled.
                        if body.body.is_end_stream() {
                            body.give_back();
                        }
                        body.boxed()
                    }));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the endpoint closed the idle connection first. Once more,
                    // on a new one.
                    Some(r) if was_reused => req = r,
                    _ => return Err((PoolError::Send(key.addr, e.into_error()), None)),
                },
            }
        }
    }

    /// The most recently used connection that is open and ready now, dropping expired and
    /// closed ones. One still busy (its request body still uploading after an early answer)
    /// stays for later and is never waited on: the request dials instead.
    async fn checkout(&self, stack: &Stack) -> Option<http1::SendRequest<Body>> {
        // From the top (most recent): the first ready one is taken, spent ones met on the way
        // are dropped, busy ones stay; the sweep handles the rest of the stack.
        let ready_now = |s: &mut Vec<Idle>| {
            let now = Instant::now();
            let mut at = s.len();
            while at > 0 {
                at -= 1;
                if !s[at].usable(now) {
                    s.remove(at);
                } else if s[at].tx.is_ready() {
                    return Some(s.remove(at).tx);
                }
            }
            None
        };
        // A connection handed back is ready once its task has run: let it run first.
        if let Some(tx) = ready_now(&mut lock(stack)) {
            return Some(tx);
        }
        if lock(stack).is_empty() {
            return None;
        }
        tokio::task::yield_now().await;
        ready_now(&mut lock(stack))
    }

    async fn send_h2<D: Dial>(
        &self,
        key: &Key,
        mut req: Request<Body>,
        dial: D,
    ) -> Result<Response<Body>, Unsendable> {
        // HTTP/2 carries `:scheme` and `:authority`: the URI is made absolute.
        let pq = req.uri().path_and_query().cloned();
        let scheme = if key.identity.is_some() {
            "https"
        } else {
            "http"
        };
        *req.uri_mut() = hyper::Uri::builder()
            .scheme(scheme)
            .authority(key.addr.to_string())
            .path_and_query(pq.unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/")))
            .build()
            .map_err(|_| {
                (
                    PoolError::Connect(MeshConnectError::Address(key.addr.to_string())),
                    None,
                )
            })?;
        let mut reused = lock(&self.h2).get_mut(key).and_then(|(tx, used)| {
            *used = Instant::now();
            (!tx.is_closed()).then(|| tx.clone())
        });
        loop {
            let was_reused = reused.is_some();
            let mut tx = match reused.take() {
                Some(tx) => tx,
                None => {
                    let tx = match Box::pin(open_h2(key.addr, &dial)).await {
                        Ok(tx) => tx,
                        Err(e) => return Err((e, Some(req))),
                    };
                    lock(&self.h2).insert(key.clone(), (tx.clone(), Instant::now()));
                    tx
                }
            };
            if let Err(e) = tx.ready().await {
                if was_reused {
                    continue;
                }
                return Err((PoolError::Send(key.addr, e), None));
            }
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(BodyExt::boxed)),
                Err(mut e) => match e.take_message() {
                    // Never sent (the connection was closing: GOAWAY): once more on a new one.
                    Some(r) if was_reused => req = r,
                    _ => return Err((PoolError::Send(key.addr, e.into_error()), None)),
                },
            }
        }
    }

    fn sweep_once(&self) {
        let now = Instant::now();
        write(&self.h1).retain(|_, stack| {
            let mut s = lock(stack);
            s.retain(|i| i.usable(now));
            // A stack a request holds right now stays (it will put its connection back).
            !s.is_empty() || Arc::strong_count(stack) > 1
        });
        lock(&self.h2).retain(|_, (tx, used)| !tx.is_closed() && used.elapsed() <= IDLE_TIMEOUT);
    }
}

/// Drives a connection on its own task until it ends.
fn drive<F: Future<Output = hyper::Result<()>> + Send + 'static>(conn: F) {
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
}

/// A new HTTP/1.1 connection to `addr` (with upgrades: a 101 hands it to the splice).
async fn open_h1<D: Dial>(
    addr: SocketAddr,
    dial: &D,
) -> Result<http1::SendRequest<Body>, PoolError> {
    let io = dial.dial().await?;
    let (tx, conn) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| PoolError::Handshake(addr, e))?;
    drive(conn.with_upgrades());
    Ok(tx)
}

/// A new HTTP/2 connection to `addr`, pinged while open so that a peer gone without a reset
/// is noticed.
async fn open_h2<D: Dial>(
    addr: SocketAddr,
    dial: &D,
) -> Result<http2::SendRequest<Body>, PoolError> {
    let io = dial.dial().await?;
    let (tx, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| PoolError::Handshake(addr, e))?;
    drive(conn);
    Ok(tx)
}

/// Drops expired idle connections every few seconds while the pool lives.
async fn sweep(pool: Weak<Pool>) {
    let mut tick = tokio::time::interval(IDLE_TIMEOUT / 4);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.sweep_once();
    }
}

/// A response body that puts its HTTP/1.1 connection back into the pool once read to the end.
struct Returning {
    body: Incoming,
    /// The connection and the stack it goes back to (none: it is not reused).
    back: Option<Back>,
}

impl Returning {
    fn give_back(&mut self) {
        if let Some((tx, stack)) = self.back.take()
            && !tx.is_closed()
        {
            let mut s = lock(&stack);
            if s.len() < MAX_IDLE_PER_KEY {
                s.push(Idle {
                    tx,
                    since: Instant::now(),
                });
            }
        }
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        // Read to its end but not polled past it: the connection is still good.
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}

impl hyper::body::Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.body).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.give_back(),
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A raw HTTP/1.1 endpoint: answers each GET with `body_len` bytes, keeping the connection
    /// unless `close_after_each` (then it closes the socket without saying so, as an endpoint
    /// closing an idle connection does). Counts connections accepted.
    async fn endpoint(body_len: usize, close_after_each: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.clear();
                        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {body_len}\r\n\r\n");
                        let mut out = head.into_bytes();
                        out.resize(out.len() + body_len, b'x');
                        if s.write_all(&out).await.is_err() || close_after_each {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn key(addr: SocketAddr, identity: Option<&str>) -> Key {
        Key {
            addr,
            h2: false,
            identity: identity.map(Arc::from),
            via: None,
        }
    }

    fn get() -> Request<Body> {
        let mut r = Request::new(http_body_util::Empty::new().map_err(|n| match n {}).boxed());
        r.headers_mut().insert(
            hyper::header::HOST,
            hyper::header::HeaderValue::from_static("t"),
        );
        r
    }

    async fn send(pool: &Pool, key: &Key) -> Result<usize, PoolError> {
        let addr = key.addr;
        let resp = pool
            .send(key, get(), || async move {
                TcpStream::connect(addr)
                    .await
                    .map_err(|e| MeshConnectError::Connect(addr, e))
            })
            .await?;
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        Ok(body.len())
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let (addr, accepted) = endpoint(5, false).await;
        let pool = Pool::new();
        for _ in 0..20 {
            assert_eq!(send(&pool, &key(addr, None)).await.expect("response"), 5);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        let idle: usize = read(&pool.h1).values().map(|s| lock(s).len()).sum();
        assert_eq!(idle, 1, "the connection is idle in the pool");
    }

    #[tokio::test]
    async fn a_body_dropped_unread_does_not_put_its_connection_back() {
        let (addr, accepted) = endpoint(256 * 1024, false).await;
        let pool = Pool::new();
        let k = key(addr, None);
        let resp = pool
            .send(&k, get(), || async move {
                TcpStream::connect(addr)
                    .await
                    .map_err(|e| MeshConnectError::Connect(addr, e))
            })
            .await
            .expect("response");
        drop(resp);
        // The next request must not be written behind 256 KiB of someone else's body.
        assert_eq!(send(&pool, &k).await.expect("response"), 256 * 1024);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_checked_as_one_identity_never_carries_another() {
        // Attacker's view: the control plane now says the endpoint at this address serves as
        // another identity (a pod replaced, an IP reused). A pool keyed by address alone would
        // send the new identity's requests down the connection verified as the old one.
        let (addr, accepted) = endpoint(2, false).await;
        let pool = Pool::new();
        send(&pool, &key(addr, Some("spiffe://weft/ns/a/sa/old")))
            .await
            .expect("response");
        send(&pool, &key(addr, Some("spiffe://weft/ns/a/sa/new")))
            .await
            .expect("response");
        send(&pool, &key(addr, None)).await.expect("response");
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_connection_the_endpoint_closed_while_idle_is_replaced() {
        let (addr, accepted) = endpoint(2, true).await;
        let pool = Pool::new();
        for i in 0..10 {
            let sent = send(&pool, &key(addr, None)).await;
            assert!(matches!(sent, Ok(2)), "request {i}: {sent:?}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 10);
    }

    /// A request body that never ends (an upload slower than anything).
    struct Endless;

    impl hyper::body::Body for Endless {
        type Data = Bytes;
        type Error = hyper::Error;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_connection_still_uploading_is_never_waited_on() {
        // Attacker's view: a caller streams a body forever; the endpoint answers early and
        // keeps the connection. Whoever is next must not queue behind that upload.
        let (addr, accepted) = endpoint(2, false).await;
        let pool = Pool::new();
        let k = key(addr, None);
        let mut upload = Request::new(Endless.boxed());
        *upload.method_mut() = hyper::Method::POST;
        upload.headers_mut().insert(
            hyper::header::HOST,
            hyper::header::HeaderValue::from_static("t"),
        );
        let resp = pool
            .send(&k, upload, || async move {
                TcpStream::connect(addr)
                    .await
                    .map_err(|e| MeshConnectError::Connect(addr, e))
            })
            .await
            .expect("early answer");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body.len(), 2);
        let next = tokio::time::timeout(Duration::from_secs(2), send(&pool, &k)).await;
        assert!(
            matches!(next, Ok(Ok(2))),
            "the next request waited: {next:?}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_failure() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let pool = Pool::new();
        let e = send(&pool, &key(addr, None)).await.expect_err("refused");
        assert!(e.is_connect(), "{e}");
        // Never written anywhere: the request comes back, for another endpoint.
        let dial = || async move {
            TcpStream::connect(addr)
                .await
                .map_err(|e| MeshConnectError::Connect(addr, e))
        };
        let (e, unsent) = pool
            .send_or_return(&key(addr, None), get(), dial)
            .await
            .expect_err("refused");
        assert!(e.is_connect(), "{e}");
        let unsent = unsent.expect("the request handed back");
        assert_eq!(unsent.headers()[hyper::header::HOST], "t");
    }
}
