//! An echo upstream: answers every HTTP request with `<name> <cluster> <zone>` so a test (or the
//! demo) can see which endpoint served it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// A running echo server; dropping it stops it (connections then fail, as a dead pod's would).
pub struct Echo {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests it answered.
    pub served: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    /// Starts an echo server on `addr` (port 0 allowed).
    pub async fn start(addr: SocketAddr, who: Identity) -> std::io::Result<Echo> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let served = Arc::new(AtomicU64::new(0));
        let body = Bytes::from(format!("{} {} {}\n", who.name, who.cluster, who.zone));
        let counter = served.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (body, counter) = (body.clone(), counter.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        counter.fetch_add(1, Ordering::Relaxed);
                        let body = body.clone();
                        async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(body))) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Echo { addr, served, task })
    }
}
