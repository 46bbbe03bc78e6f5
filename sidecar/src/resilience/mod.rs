//! The outbound cluster stack's layers and the request-path types they share: where a routed
//! request goes ([`Dispatch`]), which endpoint an attempt goes to ([`Picked`]) and how it ended
//! ([`Attempt`]). Each concern is a tower `Layer` in its own submodule with its own tests
//! (`timeout`, `breaker`, `retry`, `pick`, `outlier`), assembled in order by
//! `outbound::stack()`. The decisions themselves live below this module: the policies in
//! [`crate::policy`], the counters they take in [`crate::runtime`], endpoint choice in
//! [`crate::balance`].

/// Declares a layer of the outbound stack and its service: `$layer` wraps a service in `$svc`
/// (carrying the shared metrics when `metrics` is given), and `$svc` implements
/// `tower::Service` with its own `serve(&mut self, Req) -> BoxFut`.
macro_rules! stack_layer {
    ($(#[$ldoc:meta])* $layer:ident, $(#[$sdoc:meta])* $svc:ident, metrics) => {
        $(#[$ldoc])*
        #[derive(Clone)]
        pub struct $layer {
            metrics: std::sync::Arc<$crate::metrics::Metrics>,
        }

        impl $layer {
            /// A layer recording in `metrics`.
            pub fn new(metrics: std::sync::Arc<$crate::metrics::Metrics>) -> Self {
                $layer { metrics }
            }
        }

        impl<S> tower::Layer<S> for $layer {
            type Service = $svc<S>;
            fn layer(&self, inner: S) -> $svc<S> {
                $svc {
                    inner,
                    metrics: self.metrics.clone(),
                }
            }
        }

        $(#[$sdoc])*
        #[derive(Clone)]
        pub struct $svc<S> {
            inner: S,
            metrics: std::sync::Arc<$crate::metrics::Metrics>,
        }

        $crate::resilience::stack_service!($svc);
    };
    ($(#[$ldoc:meta])* $layer:ident, $(#[$sdoc:meta])* $svc:ident) => {
        $(#[$ldoc])*
        #[derive(Clone, Copy, Debug, Default)]
        pub struct $layer;

        impl<S> tower::Layer<S> for $layer {
            type Service = $svc<S>;
            fn layer(&self, inner: S) -> $svc<S> {
                $svc { inner }
            }
        }

        $(#[$sdoc])*
        #[derive(Clone, Debug)]
        pub struct $svc<S> {
            inner: S,
        }

        $crate::resilience::stack_service!($svc);
    };
}

/// Implements `tower::Service` for a stack service through its `serve` method: always ready
/// (back-pressure is the breakers' job), never failing (refusals are responses).
macro_rules! stack_service {
    ($svc:ident) => {
        impl<S: $crate::resilience::Svc> tower::Service<$crate::resilience::Req> for $svc<S> {
            type Response = $crate::resilience::Resp;
            type Error = std::convert::Infallible;
            type Future = $crate::resilience::BoxFut;

            fn poll_ready(
                &mut self,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), Self::Error>> {
                std::task::Poll::Ready(Ok(()))
            }

            fn call(&mut self, req: $crate::resilience::Req) -> $crate::resilience::BoxFut {
                self.serve(req)
            }
        }
    };
}

pub(crate) use {stack_layer, stack_service};

pub mod breaker;
pub mod outlier;
pub mod pick;
pub mod retry;
pub mod timeout;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use crate::http::{Req, Resp};
use crate::policy::{ClusterPolicy, Outcome, RetryPolicy};
use crate::runtime::ClusterRuntime;
/// The future every layer of the outbound stack returns. Layers never fail: a refusal is a
/// response (with `x-weft-reason`), so `Error` is `Infallible`.
pub type BoxFut = Pin<Box<dyn Future<Output = Result<Resp, Infallible>> + Send>>;

/// A service of the outbound stack.
pub trait Svc:
    tower::Service<Req, Response = Resp, Error = Infallible, Future = BoxFut> + Clone + Send + 'static
{
}
impl<T> Svc for T where
    T: tower::Service<Req, Response = Resp, Error = Infallible, Future = BoxFut>
        + Clone
        + Send
        + 'static
{
}

/// Where a routed request goes and under which policies: set by routing as a request
/// extension (`Arc<Dispatch>`), read by every layer below it.
#[derive(Debug)]
pub struct Dispatch {
    /// The cluster.
    pub cluster: String,
    /// Its endpoints by priority.
    pub endpoints: Arc<crate::state::Endpoints>,
    /// Its breakers, budget and outlier settings.
    pub policy: Arc<ClusterPolicy>,
    /// Its live counters.
    pub runtime: Arc<ClusterRuntime>,
    /// The route's deadline for the whole request.
    pub timeout: Option<Duration>,
    /// The route's retry policy (connect failures only when the route has none).
    pub retry: Arc<RetryPolicy>,
    /// The consistent-hash key, for ring hash and maglev.
    pub hash: Option<u64>,
    /// The cluster's endpoints speak HTTP/2 only.
    pub http2: bool,
    /// The request's authority (set as `Host` when the request had none).
    pub authority: String,
}

impl Dispatch {
    /// The dispatch of a request on the stack.
    pub fn of(req: &Req) -> Option<Arc<Dispatch>> {
        req.extensions().get::<Arc<Dispatch>>().cloned()
    }
}

/// Endpoints earlier attempts of this request went to (retry layer -> pick layer).
#[derive(Clone, Debug, Default)]
pub struct Tried(pub Vec<SocketAddr>);

/// A request that never reached its endpoint (no connection could be made), handed back on the
/// refusal's extensions (connection layer -> retry layer), so that the common retry — of a
/// connect failure — sends it again without a copy made in advance of every request.
#[derive(Clone)]
pub struct Unsent(Arc<std::sync::Mutex<Option<Req>>>);

impl Unsent {
    /// Wraps the request.
    pub fn new(req: Req) -> Self {
        Unsent(Arc::new(std::sync::Mutex::new(Some(req))))
    }

    /// The request, once.
    pub fn take(&self) -> Option<Req> {
        match self.0.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        }
    }
}

/// The endpoint an attempt goes to (pick layer -> the layers below).
#[derive(Clone, Debug)]
pub struct Picked(pub crate::balance::Target);

/// How an attempt ended: a response extension set by the layer that decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// The endpoint tried, when one was picked.
    pub endpoint: Option<SocketAddr>,
    /// The outcome.
    pub outcome: Outcome,
}

/// The outcome recorded on a response (a plain status when no layer recorded one).
pub fn outcome_of(resp: &Resp) -> Outcome {
    resp.extensions()
        .get::<Attempt>()
        .map_or(Outcome::Status(resp.status().as_u16()), |a| a.outcome)
}

/// A refusal the proxy answers itself, carrying the attempt's outcome.
pub fn refusal(
    status: hyper::StatusCode,
    reason: &'static str,
    detail: String,
    attempt: Option<Attempt>,
) -> Resp {
    let mut r = crate::http::refuse(status, reason, detail);
    if let Some(a) = attempt {
        r.extensions_mut().insert(a);
    }
    r
}

/// An internal error: a request reached a layer without its dispatch.
pub fn undispatched() -> BoxFut {
    Box::pin(async {
        Ok(refusal(
            hyper::StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "weft: request reached the cluster stack without a route".into(),
            None,
        ))
    })
}

/// Small services and requests for the layers' unit tests (no sockets).
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    use super::{BoxFut, ClusterPolicy, ClusterRuntime, Dispatch, Req, RetryPolicy, Svc};
    use crate::balance::{Algorithm, Target};
    use crate::state::{Endpoint, Endpoints};

    /// A dispatch to cluster `c` with one healthy endpoint, default policies.
    pub fn dispatch() -> Dispatch {
        let endpoint = Endpoint::new(
            crate::state::EndpointSpec::at("127.0.0.1:9".parse().expect("addr")),
            Arc::default(),
            Arc::new(crate::load::LocalityLoad::new("")),
        );
        Dispatch {
            cluster: "c".into(),
            endpoints: Arc::new(Endpoints::new(
                vec![vec![endpoint]],
                140,
                Algorithm::RoundRobin,
            )),
            policy: Arc::new(ClusterPolicy::default()),
            runtime: Arc::new(ClusterRuntime::default()),
            timeout: None,
            retry: Arc::new(RetryPolicy::connect_failure_default()),
            hash: None,
            http2: false,
            authority: "c".into(),
        }
    }

    /// The dispatch's first endpoint as a pick.
    pub fn target(d: &Dispatch) -> Target {
        let e = &d.endpoints.priorities[0][0];
        Target {
            addr: e.addr,
            origin: e.origin.clone(),
            mtls_identity: None,
            strict: false,
            via: None,
            stats: e.stats.clone(),
            load: e.load.clone(),
            hot: e.hot.clone(),
        }
    }

    /// A GET carrying `d`.
    pub fn request(d: impl Into<Arc<Dispatch>>) -> Req {
        let mut req = Req::new(Full::new(Bytes::new()).map_err(|n| match n {}).boxed());
        req.extensions_mut().insert(d.into());
        req
    }

    fn answer(status: u16) -> super::Resp {
        let mut r = super::Resp::new(Full::new(Bytes::new()).map_err(|n| match n {}).boxed());
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
        r
    }

    /// Answers 200 after `delay`.
    pub fn slow(delay: Duration) -> impl Svc {
        tower::service_fn(move |_req: Req| -> BoxFut {
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(answer(200))
            })
        })
    }

    /// Answers `statuses` in turn (the last one again when they run out), and counts calls.
    pub fn scripted(statuses: &[u16]) -> (impl Svc, impl Fn() -> usize) {
        let statuses: Arc<Vec<u16>> = Arc::new(statuses.to_vec());
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let svc = tower::service_fn(move |_req: Req| -> BoxFut {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let status = statuses.get(n).or(statuses.last()).copied().unwrap_or(200);
            Box::pin(async move { Ok(answer(status)) })
        });
        (svc, move || calls.load(Ordering::Relaxed))
    }
}
