//! Resilience on the request path. This module holds the decisions — retries (which outcomes,
//! how many, backoff, the retry budget), circuit breakers, outlier ejection: pure functions and
//! small atomic counters — and the request-path types every layer shares; each concern is a
//! tower `Layer` in its own submodule with its own tests (`timeout`, `breaker`, `retry`,
//! `outlier`), assembled in order by `outbound::stack()`.
//!
//! Semantics follow Envoy's, since the control plane speaks its xDS:
//! - retries happen only on the `retry_on` conditions, at most `num_retries` times, each try
//!   bounded by `per_try_timeout`, separated by fully-jittered exponential backoff;
//! - a retry also needs the cluster's budget: retries in flight may not exceed
//!   `max(min_retry_concurrency, budget_percent × requests in flight)` nor `max_retries` —
//!   so a failing upstream gets at most a bounded share of extra load, never a storm;
//! - `max_requests` bounds requests in flight per cluster; overflow answers 503 at once with
//!   `x-weft-reason: overflow`;
//! - an endpoint with `consecutive_5xx` (or `consecutive_gateway_failure`) failures in a row
//!   is ejected for `base_ejection_time × (times ejected)`, unless that would eject more than
//!   `max_ejection_percent` of the cluster.

/// Declares a layer of the outbound stack and its service: `$layer` wraps a service in `$svc`
/// (carrying the shared metrics when `metrics` is given), and `$svc` implements
/// `tower::Service` with its own `serve(&mut self, Req) -> BoxFut`.
macro_rules! stack_layer {
    ($(#[$ldoc:meta])* $layer:ident, $(#[$sdoc:meta])* $svc:ident, metrics) => {
        $(#[$ldoc])*
        #[derive(Clone)]
        pub struct $layer {
            metrics: std::sync::Arc<$crate::admin::Metrics>,
        }

        impl $layer {
            /// A layer recording in `metrics`.
            pub fn new(metrics: std::sync::Arc<$crate::admin::Metrics>) -> Self {
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
            metrics: std::sync::Arc<$crate::admin::Metrics>,
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
pub mod retry;
pub mod timeout;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use hyper::{Request, Response};

use serde::Serialize;
use weft_proto::envoy::envoy::config::cluster::v3 as cluster;
use weft_proto::envoy::envoy::config::route::v3 as route;

/// A request on the outbound stack.
pub type Req = Request<crate::outbound::Body>;
/// A response on the outbound stack.
pub type Resp = Response<crate::outbound::Body>;
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
    let mut r = crate::outbound::refuse(status, reason, detail);
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

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status.
    Status(u16),
    /// The connection could not be made.
    ConnectFailure,
    /// The connection broke before a response.
    Reset,
    /// The per-try timeout fired.
    Timeout,
}

impl Outcome {
    /// A gateway error: 502, 503, 504, a connect failure, a reset or a timeout.
    pub fn is_gateway_error(self) -> bool {
        match self {
            Outcome::Status(s) => matches!(s, 502..=504),
            _ => true,
        }
    }

    /// A 5xx or anything that is not a response at all.
    pub fn is_5xx(self) -> bool {
        match self {
            Outcome::Status(s) => s >= 500,
            _ => true,
        }
    }
}

fn dur(d: &Option<weft_proto::envoy::google::protobuf::Duration>) -> Option<Duration> {
    d.as_ref()
        .filter(|d| d.seconds > 0 || d.nanos > 0)
        .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
}

/// A route's retry policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetryPolicy {
    /// Retry 5xx responses (and connect failures, resets, timeouts).
    pub on_5xx: bool,
    /// Retry 502/503/504 (and connect failures, resets, timeouts).
    pub on_gateway_error: bool,
    /// Retry connect failures.
    pub on_connect_failure: bool,
    /// Retry resets (and timeouts).
    pub on_reset: bool,
    /// Retry these statuses (`retriable-status-codes`).
    pub codes: Vec<u16>,
    /// Retries after the first try.
    pub attempts: u32,
    /// Deadline of one try.
    pub per_try_timeout: Option<Duration>,
    /// First backoff interval.
    pub backoff_base: Duration,
    /// Longest backoff interval.
    pub backoff_max: Duration,
}

impl RetryPolicy {
    /// Reads an Envoy retry policy. Unknown `retry_on` tokens are ignored (Envoy knows more
    /// conditions than Weft acts on; refusing the whole route for one would lose more).
    pub fn from_xds(p: &route::RetryPolicy) -> Self {
        let mut r = RetryPolicy {
            on_5xx: false,
            on_gateway_error: false,
            on_connect_failure: false,
            on_reset: false,
            codes: p
                .retriable_status_codes
                .iter()
                .filter_map(|c| u16::try_from(*c).ok())
                .collect(),
            attempts: p.num_retries.as_ref().map_or(1, |v| v.value),
            per_try_timeout: dur(&p.per_try_timeout),
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
        };
        if let Some(b) = &p.retry_back_off {
            if let Some(base) = dur(&b.base_interval) {
                r.backoff_base = base;
                r.backoff_max = base * 10;
            }
            if let Some(max) = dur(&b.max_interval) {
                r.backoff_max = max.max(r.backoff_base);
            }
        }
        for token in p.retry_on.split(',').map(str::trim) {
            match token {
                "5xx" => r.on_5xx = true,
                "gateway-error" => r.on_gateway_error = true,
                "connect-failure" => r.on_connect_failure = true,
                "reset" => r.on_reset = true,
                "retriable-status-codes" => {}
                _ => {}
            }
        }
        if !p
            .retry_on
            .split(',')
            .any(|t| t.trim() == "retriable-status-codes")
        {
            r.codes.clear();
        }
        r
    }

    /// The policy of a route without one: a connect failure (nothing reached the upstream, so
    /// any request is safe to send again) is retried on another endpoint, up to 3 times.
    pub fn connect_failure_default() -> Self {
        RetryPolicy {
            on_5xx: false,
            on_gateway_error: false,
            on_connect_failure: true,
            on_reset: false,
            codes: Vec::new(),
            attempts: 3,
            per_try_timeout: None,
            backoff_base: Duration::from_millis(5),
            backoff_max: Duration::from_millis(25),
        }
    }

    /// Whether an outcome may be retried under this policy (attempts and budget aside).
    pub fn retriable(&self, o: Outcome) -> bool {
        match o {
            Outcome::Status(s) => {
                (self.on_5xx && s >= 500)
                    || (self.on_gateway_error && matches!(s, 502..=504))
                    || self.codes.contains(&s)
            }
            Outcome::ConnectFailure => {
                self.on_connect_failure || self.on_5xx || self.on_gateway_error || self.on_reset
            }
            Outcome::Reset | Outcome::Timeout => {
                self.on_reset || self.on_5xx || self.on_gateway_error
            }
        }
    }

    /// Backoff before retry number `retry` (0-based): uniform in [0, min(max, base × 2^retry)].
    pub fn backoff(&self, retry: u32, uniform: f64) -> Duration {
        let cap = self
            .backoff_base
            .saturating_mul(1u32 << retry.min(16))
            .min(self.backoff_max);
        cap.mul_f64(uniform.clamp(0.0, 1.0))
    }
}

/// A cluster's limits and outlier settings (Envoy's defaults where unset).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClusterPolicy {
    /// Upstream connections in use (HTTP/1.1: one request each, so attempts in flight).
    pub max_connections: u32,
    /// Attempts waiting for a connection.
    pub max_pending_requests: u32,
    /// Requests in flight.
    pub max_requests: u32,
    /// Retries in flight.
    pub max_retries: u32,
    /// Retry budget: (percent of requests in flight, minimum retry concurrency).
    pub budget: Option<(f64, u32)>,
    /// Outlier detection, when configured.
    pub outlier: Option<OutlierPolicy>,
}

impl Default for ClusterPolicy {
    fn default() -> Self {
        ClusterPolicy {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            budget: None,
            outlier: None,
        }
    }
}

/// Outlier detection settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OutlierPolicy {
    /// 5xx in a row before ejection.
    pub consecutive_5xx: u32,
    /// Gateway errors in a row before ejection.
    pub consecutive_gateway: u32,
    /// Base ejection time; multiplied by the number of times the endpoint was ejected.
    pub base_ejection: Duration,
    /// Most of the cluster that may be ejected at once, percent.
    pub max_ejection_percent: u32,
}

/// Passive health without a policy: an endpoint that refuses a connection is taken out of
/// rotation at once for a few seconds (growing if it keeps refusing), so traffic moves on —
/// across priorities too — before the control plane learns the endpoint is gone.
pub const CONNECT_FAILURE_EJECTION: OutlierPolicy = OutlierPolicy {
    consecutive_5xx: 0,
    consecutive_gateway: 1,
    base_ejection: Duration::from_secs(5),
    max_ejection_percent: 100,
};

/// Longest ejection, whatever the count (Envoy's default max_ejection_time).
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

impl ClusterPolicy {
    /// Reads an Envoy cluster's circuit breakers, retry budget and outlier detection.
    pub fn from_xds(c: &cluster::Cluster) -> Self {
        let mut p = ClusterPolicy::default();
        if let Some(t) = c
            .circuit_breakers
            .as_ref()
            .and_then(|b| b.thresholds.first())
        {
            if let Some(v) = &t.max_requests {
                p.max_requests = v.value;
            }
            if let Some(v) = &t.max_connections {
                p.max_connections = v.value;
            }
            if let Some(v) = &t.max_pending_requests {
                p.max_pending_requests = v.value;
            }
            if let Some(v) = &t.max_retries {
                p.max_retries = v.value;
            }
            if let Some(b) = &t.retry_budget {
                p.budget = Some((
                    b.budget_percent.as_ref().map_or(20.0, |v| v.value),
                    b.min_retry_concurrency.as_ref().map_or(3, |v| v.value),
                ));
            }
        }
        p.outlier = c.outlier_detection.as_ref().map(|o| OutlierPolicy {
            consecutive_5xx: o.consecutive_5xx.as_ref().map_or(5, |v| v.value),
            consecutive_gateway: o
                .consecutive_gateway_failure
                .as_ref()
                .map_or(5, |v| v.value),
            base_ejection: dur(&o.base_ejection_time).unwrap_or(Duration::from_secs(30)),
            max_ejection_percent: o.max_ejection_percent.as_ref().map_or(10, |v| v.value),
        });
        p
    }

    /// Retries allowed in flight with `requests` in flight.
    pub fn retry_allowance(&self, requests: u32) -> u32 {
        let by_budget = match self.budget {
            Some((percent, min)) => ((f64::from(requests) * percent / 100.0) as u32).max(min),
            None => u32::MAX,
        };
        by_budget.min(self.max_retries)
    }
}

/// A cluster's live counters, kept across config versions.
#[derive(Debug, Default)]
pub struct ClusterRuntime {
    requests: AtomicU32,
    retries: AtomicU32,
    connections: AtomicU32,
    pending: AtomicU32,
    /// Wakes an attempt waiting for a connection when one is released.
    released: tokio::sync::Notify,
    /// Cached metric handles of this cluster's 200s.
    pub hot: crate::admin::HotCache,
    /// Load counters per locality (zone), for load reports.
    localities: std::sync::Mutex<std::collections::BTreeMap<String, Arc<crate::lrs::LocalityLoad>>>,
}

/// Releases a counted slot when dropped.
pub struct Slot<'a>(&'a AtomicU32);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection slot; releasing it wakes one waiting attempt.
pub struct ConnectionSlot {
    runtime: Arc<ClusterRuntime>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.runtime.connections.fetch_sub(1, Ordering::AcqRel);
        self.runtime.released.notify_one();
    }
}

fn try_take(counter: &AtomicU32, limit: u32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < limit).then(|| n + 1)
        })
        .is_ok()
}

fn take(counter: &AtomicU32, limit: u32) -> Option<Slot<'_>> {
    // Lazily: a Slot made and dropped on refusal would release a slot never taken.
    try_take(counter, limit).then(|| Slot(counter))
}

/// Why an attempt got no connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionRefused {
    /// `max_connections` in use and `max_pending_requests` already waiting.
    PendingOverflow,
}

impl ClusterRuntime {
    /// A request slot, or `None` when `max_requests` are in flight (the breaker is open).
    pub fn request(&self, p: &ClusterPolicy) -> Option<Slot<'_>> {
        take(&self.requests, p.max_requests)
    }

    /// A retry slot, or `None` when the budget or `max_retries` says no.
    pub fn retry(&self, p: &ClusterPolicy) -> Option<Slot<'_>> {
        let allowance = p.retry_allowance(self.requests.load(Ordering::Relaxed));
        take(&self.retries, allowance)
    }

    /// Requests in flight.
    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A connection for one attempt: at once while fewer than `max_connections` are in use,
    /// else after waiting as one of at most `max_pending_requests` (Envoy's pending queue);
    /// beyond that, refused at once.
    pub async fn connection(
        self: &Arc<Self>,
        p: &ClusterPolicy,
    ) -> Result<ConnectionSlot, ConnectionRefused> {
        let slot = || ConnectionSlot {
            runtime: self.clone(),
        };
        if try_take(&self.connections, p.max_connections) {
            return Ok(slot());
        }
        let Some(_pending) = take(&self.pending, p.max_pending_requests) else {
            return Err(ConnectionRefused::PendingOverflow);
        };
        loop {
            // Register for a wake-up before checking, so a release in between is not lost.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if try_take(&self.connections, p.max_connections) {
                return Ok(slot());
            }
            released.await;
        }
    }

    /// The load counters of this cluster's endpoints in `zone` (made once, kept across config
    /// versions; only config compilation and load reports take the lock).
    pub fn locality(&self, zone: &str) -> Arc<crate::lrs::LocalityLoad> {
        let mut l = match self.localities.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        l.entry(zone.to_string())
            .or_insert_with(|| Arc::new(crate::lrs::LocalityLoad::new(zone)))
            .clone()
    }

    /// Every locality's load counters.
    pub fn localities(&self) -> Vec<Arc<crate::lrs::LocalityLoad>> {
        match self.localities.lock() {
            Ok(g) => g.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        }
    }

    /// Connections in use.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Attempts waiting for a connection.
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }
}

/// Shared runtime handle.
pub type Runtime = Arc<ClusterRuntime>;

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::envoy::google::protobuf as pb;

    fn policy(retry_on: &str, codes: &[u32]) -> RetryPolicy {
        RetryPolicy::from_xds(&route::RetryPolicy {
            retry_on: retry_on.into(),
            num_retries: Some(pb::UInt32Value { value: 2 }),
            retriable_status_codes: codes.to_vec(),
            retry_back_off: Some(route::retry_policy::RetryBackOff {
                base_interval: Some(pb::Duration {
                    seconds: 0,
                    nanos: 10_000_000,
                }),
                max_interval: Some(pb::Duration {
                    seconds: 0,
                    nanos: 50_000_000,
                }),
            }),
            ..Default::default()
        })
    }

    #[test]
    fn retry_conditions() {
        let p = policy("5xx", &[]);
        assert!(p.retriable(Outcome::Status(500)));
        assert!(p.retriable(Outcome::Status(503)));
        assert!(!p.retriable(Outcome::Status(404)));
        assert!(p.retriable(Outcome::Reset));
        let g = policy("gateway-error", &[]);
        assert!(!g.retriable(Outcome::Status(500)));
        assert!(g.retriable(Outcome::Status(502)));
        assert!(g.retriable(Outcome::ConnectFailure));
        let c = policy("connect-failure", &[]);
        assert!(c.retriable(Outcome::ConnectFailure));
        assert!(!c.retriable(Outcome::Status(503)));
        assert!(!c.retriable(Outcome::Reset));
        let codes = policy("retriable-status-codes,reset", &[409]);
        assert!(codes.retriable(Outcome::Status(409)));
        assert!(!codes.retriable(Outcome::Status(500)));
        // Codes without the token are not retried.
        assert!(!policy("reset", &[409]).retriable(Outcome::Status(409)));
    }

    #[test]
    fn backoff_is_jittered_exponential_and_capped() {
        let p = policy("5xx", &[]);
        assert_eq!(p.backoff(0, 1.0), Duration::from_millis(10));
        assert_eq!(p.backoff(1, 1.0), Duration::from_millis(20));
        assert_eq!(
            p.backoff(5, 1.0),
            Duration::from_millis(50),
            "capped at max_interval"
        );
        assert_eq!(p.backoff(3, 0.0), Duration::ZERO);
        assert_eq!(p.backoff(2, 0.5), Duration::from_millis(20));
    }

    #[test]
    fn breaker_and_budget_bound_concurrency() {
        let p = ClusterPolicy {
            max_requests: 2,
            max_retries: 10,
            budget: Some((20.0, 1)),
            ..ClusterPolicy::default()
        };
        let rt = ClusterRuntime::default();
        let a = rt.request(&p).expect("first");
        let b = rt.request(&p).expect("second");
        assert!(rt.request(&p).is_none(), "third overflows");
        // Two requests in flight: 20 % is 0.4, the minimum concurrency 1 wins.
        let r1 = rt.retry(&p).expect("one retry");
        assert!(rt.retry(&p).is_none(), "budget exhausted");
        drop((a, b, r1));
        assert!(rt.request(&p).is_some(), "slots come back");
        // max_retries caps even a generous budget.
        let p2 = ClusterPolicy {
            max_requests: 100,
            max_retries: 1,
            budget: Some((100.0, 50)),
            ..ClusterPolicy::default()
        };
        let rt2 = ClusterRuntime::default();
        let _r = rt2.retry(&p2).expect("one");
        assert!(rt2.retry(&p2).is_none());
    }

    #[tokio::test]
    async fn connections_queue_up_to_max_pending_then_refuse() {
        let p = ClusterPolicy {
            max_connections: 1,
            max_pending_requests: 1,
            ..ClusterPolicy::default()
        };
        let rt = Arc::new(ClusterRuntime::default());
        let first = rt.connection(&p).await.expect("a free connection");
        // The second waits (pending); the third finds the queue full and is refused at once.
        let rt2 = rt.clone();
        let p2 = p.clone();
        let waiter = tokio::spawn(async move { rt2.connection(&p2).await.map(|_| ()) });
        while rt.pending() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            rt.connection(&p).await.err(),
            Some(ConnectionRefused::PendingOverflow)
        );
        assert!(!waiter.is_finished());
        drop(first);
        assert_eq!(
            waiter.await.ok(),
            Some(Ok(())),
            "released connection goes to the waiter"
        );
        assert_eq!((rt.connections(), rt.pending()), (0, 0));
    }
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
        let endpoint = Endpoint {
            addr: "127.0.0.1:9".parse().expect("addr"),
            healthy: true,
            zone: String::new(),
            origin: Arc::from(""),
            mtls_identity: None,
            strict: false,
            stats: Arc::default(),
            load: Arc::new(crate::lrs::LocalityLoad::new("")),
            hot: Arc::default(),
        };
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
