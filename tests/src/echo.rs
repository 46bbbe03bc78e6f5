//! An echo upstream: answers every HTTP request with `<name> <cluster> <zone>` so a test (or the
//! demo) can see which endpoint served it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What an echo server says about itself.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Its name, e.g. `echo-v1-a`.
    pub name: String,
    /// Its cluster.
    pub cluster: String,
    /// Its zone.
    pub zone: String,
}

/// How an echo misbehaves, changeable while it runs.
#[derive(Debug, Default)]
pub struct Behavior {
    /// Answer with this status instead of 200 (0: never).
    pub fail_status: AtomicU16,
    /// Fail only every n-th request (0 or 1: every request).
    pub fail_every: AtomicU32,
    /// Wait this long before answering.
    pub delay_ms: AtomicU64,
    /// The `traceparent` header of the last request.
    pub last_traceparent: std::sync::Mutex<Option<String>>,
    /// The `x-weft-client-identity` header of the last request (what the sidecar verified).
    pub last_client_identity: std::sync::Mutex<Option<String>>,
    /// The HTTP version of the last request (`HTTP/1.1`, `HTTP/2.0`).
    pub last_version: std::sync::Mutex<Option<String>>,
    /// Every header of every request whose name a framework could read as a mesh-owned
    /// header (`x-weft-*` in any case, `_` for `-`): (name, value).
    pub mesh_headers: std::sync::Mutex<Vec<(String, String)>>,
    /// The header names of the last request, in order.
    pub last_header_names: std::sync::Mutex<Vec<String>>,
}

/// Whether a header name reads as a mesh-owned `x-weft-*` header once case is folded and any
/// separator is read as `-` (as CGI/WSGI frameworks and others fold them).
pub fn looks_mesh_owned(name: &str) -> bool {
    // Any non-alphanumeric separator, as some servers fold `.` too.
    name.to_ascii_lowercase()
        .replace(|c: char| !c.is_ascii_alphanumeric(), "-")
        .starts_with("x-weft-")
}

/// A running echo server; dropping it stops it (connections then fail, as a dead pod's would).
pub struct Echo {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests it answered.
    pub served: Arc<AtomicU64>,
    /// Its behaviour.
    pub behavior: Arc<Behavior>,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    /// A pod's echo of `cluster-1` in `zone` on `ip`, port 18080 (every endpoint of a slice
    /// shares its port, as pods do).
    ///
    /// # Panics
    /// When the address cannot be bound.
    pub async fn pod(ip: &str, name: &str, zone: &str) -> Echo {
        let addr: SocketAddr = match format!("{ip}:18080").parse() {
            Ok(a) => a,
            Err(e) => panic!("{ip}: {e}"),
        };
        let who = Identity {
            name: name.into(),
            cluster: "cluster-1".into(),
            zone: zone.into(),
        };
        match Echo::start(addr, who).await {
            Ok(e) => e,
            Err(e) => panic!("echo on {addr}: {e}"),
        }
    }

    /// Starts an echo server on `addr` (port 0 allowed).
    pub async fn start(addr: SocketAddr, who: Identity) -> std::io::Result<Echo> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let served = Arc::new(AtomicU64::new(0));
        let body = Bytes::from(format!("{} {} {}\n", who.name, who.cluster, who.zone));
        let counter = served.clone();
        let behavior = Arc::new(Behavior::default());
        let b = behavior.clone();
        // Dropping the Echo ends the accept loop and every open connection, as a killed pod's.
        let (stop, stopped) = tokio::sync::watch::channel(());
        let task = tokio::spawn(async move {
            let _stop = stop;
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (body, counter, b) = (body.clone(), counter.clone(), b.clone());
                let mut stopped = stopped.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                            let tp = req
                                .headers()
                                .get("traceparent")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string);
                            if let Ok(mut last) = b.last_traceparent.lock() {
                                *last = tp;
                            }
                            let id = req
                                .headers()
                                .get(weft_proto::keys::CLIENT_IDENTITY_HEADER)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string);
                            if let Ok(mut last) = b.last_client_identity.lock() {
                                *last = id;
                            }
                            if let Ok(mut last) = b.last_version.lock() {
                                *last = Some(format!("{:?}", req.version()));
                            }
                            if let Ok(mut names) = b.last_header_names.lock() {
                                *names = req
                                    .headers()
                                    .keys()
                                    .map(|k| k.as_str().to_string())
                                    .collect();
                            }
                            if let Ok(mut seen) = b.mesh_headers.lock() {
                                for (k, v) in req.headers() {
                                    if looks_mesh_owned(k.as_str()) {
                                        seen.push((
                                            k.as_str().to_string(),
                                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                        ));
                                    }
                                }
                            }
                            let (body, b) = (body.clone(), b.clone());
                            async move {
                                // Trailers count too: frameworks merge them into the headers.
                                use http_body_util::BodyExt;
                                if let Ok(all) = req.into_body().collect().await
                                    && let Some(trailers) = all.trailers()
                                    && let Ok(mut seen) = b.mesh_headers.lock()
                                {
                                    for (k, v) in trailers {
                                        if looks_mesh_owned(k.as_str()) {
                                            seen.push((
                                                k.as_str().to_string(),
                                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                            ));
                                        }
                                    }
                                }
                                Ok::<_, Infallible>(answer(n, body, &b).await)
                            }
                        },
                    );
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stopped.changed() => {}
                    }
                });
            }
        });
        Ok(Echo {
            addr,
            served,
            behavior,
            task,
        })
    }
}

/// The `n`-th answer under `b`: delayed and/or failed as configured.
async fn answer(n: u64, body: Bytes, b: &Behavior) -> hyper::Response<Full<Bytes>> {
    let delay = b.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let status = b.fail_status.load(Ordering::Relaxed);
    let every = u64::from(b.fail_every.load(Ordering::Relaxed).max(1));
    let mut resp = hyper::Response::new(Full::new(body));
    if status != 0 && n.is_multiple_of(every) {
        *resp.status_mut() =
            hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    }
    resp
}
