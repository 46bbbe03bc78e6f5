//! Circuit breakers, answering at once rather than queueing behind a saturated cluster:
//! [`BreakerLayer`] holds one of the cluster's `max_requests` slots for the whole request
//! (retries included); [`ConnectionLimitLayer`] holds one of `max_connections` for each
//! attempt, letting at most `max_pending_requests` attempts wait for one. Overflow answers 503
//! with `x-weft-reason: overflow` and `x-weft-overflow` naming the limit, and is counted in
//! `weft_proxy_overflows_total{cluster,reason}`.

use hyper::StatusCode;

use super::{BoxFut, Dispatch, Req, Resp, Svc, refusal, undispatched};
use crate::metrics::Metrics;

/// Response header naming which limit overflowed.
pub const OVERFLOW_HEADER: &str = "x-weft-overflow";

fn overflow(metrics: &Metrics, d: &Dispatch, limit: &'static str, detail: String) -> Resp {
    metrics.overflow(&d.cluster, limit);
    let mut r = refusal(StatusCode::SERVICE_UNAVAILABLE, "overflow", detail, None);
    r.headers_mut().insert(
        OVERFLOW_HEADER,
        hyper::header::HeaderValue::from_static(limit),
    );
    r
}

crate::resilience::stack_layer!(
    /// Bounds requests in flight per cluster (`max_requests`).
    BreakerLayer,
    /// See [`BreakerLayer`].
    Breaker, metrics
);

impl<S: Svc> Breaker<S> {
    fn serve(&mut self, req: Req) -> BoxFut {
        let Some(d) = Dispatch::of(&req) else {
            return undispatched();
        };
        let mut inner = self.inner.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let Some(_slot) = d.runtime.request(&d.policy) else {
                let detail = format!(
                    "weft: {} has {} requests in flight (max_requests)",
                    d.cluster, d.policy.max_requests
                );
                return Ok(overflow(&metrics, &d, "max-requests", detail));
            };
            inner.call(req).await
        })
    }
}

crate::resilience::stack_layer!(
    /// Bounds attempts in flight per cluster (`max_connections`), with a bounded wait
    /// (`max_pending_requests`).
    ConnectionLimitLayer,
    /// See [`ConnectionLimitLayer`].
    ConnectionLimit, metrics
);

impl<S: Svc> ConnectionLimit<S> {
    fn serve(&mut self, req: Req) -> BoxFut {
        let Some(d) = Dispatch::of(&req) else {
            return undispatched();
        };
        let mut inner = self.inner.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let Ok(_connection) = d.runtime.connection(&d.policy).await else {
                let detail = format!(
                    "weft: {} has {} connections in use and {} requests waiting (max_pending_requests)",
                    d.cluster,
                    d.runtime.connections(),
                    d.runtime.pending()
                );
                return Ok(overflow(&metrics, &d, "max-pending-requests", detail));
            };
            inner.call(req).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::policy::ClusterPolicy;
    use crate::resilience::test_support::{dispatch, request, slow};
    use std::sync::Arc;
    use std::time::Duration;
    use tower::{Layer, Service};

    #[tokio::test(start_paused = true)]
    async fn max_requests_overflows_at_once_with_its_name() {
        let metrics = Arc::new(Metrics::new());
        let svc = BreakerLayer::new(metrics.clone()).layer(slow(Duration::from_secs(1)));
        let mut d = dispatch();
        d.policy = Arc::new(ClusterPolicy {
            max_requests: 2,
            ..ClusterPolicy::default()
        });
        let d = Arc::new(d);
        let calls: Vec<_> = (0..3)
            .map(|_| tokio::spawn(svc.clone().call(request(d.clone()))))
            .collect();
        let mut statuses = Vec::new();
        for c in calls {
            let r = c.await.expect("join").expect("infallible");
            statuses.push((
                r.status().as_u16(),
                r.headers().get(OVERFLOW_HEADER).cloned(),
            ));
        }
        statuses.sort_by_key(|s| s.0);
        assert_eq!(statuses[0].0, 200);
        assert_eq!(statuses[1].0, 200);
        assert_eq!(statuses[2].0, 503);
        assert_eq!(
            statuses[2].1.as_ref().map(|v| v.as_bytes()),
            Some(&b"max-requests"[..])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_wait_for_a_connection_up_to_max_pending() {
        let metrics = Arc::new(Metrics::new());
        let svc = ConnectionLimitLayer::new(metrics).layer(slow(Duration::from_secs(1)));
        let mut d = dispatch();
        d.policy = Arc::new(ClusterPolicy {
            max_connections: 1,
            max_pending_requests: 1,
            ..ClusterPolicy::default()
        });
        let d = Arc::new(d);
        // One runs, one waits (and then runs), the third overflows.
        let started = tokio::time::Instant::now();
        let calls: Vec<_> = (0..3)
            .map(|_| svc.clone().call(request(d.clone())))
            .collect();
        let results = futures_join(calls).await;
        let ok = results.iter().filter(|(s, _)| *s == 200).count();
        let over: Vec<_> = results.iter().filter(|(s, _)| *s == 503).collect();
        assert_eq!(ok, 2);
        assert_eq!(over.len(), 1);
        assert!(over[0].1.contains("max_pending_requests"), "{}", over[0].1);
        // The waiter ran after the first: two seconds in all, one at a time.
        assert!(started.elapsed() >= Duration::from_secs(2));
    }

    async fn futures_join(calls: Vec<BoxFut>) -> Vec<(u16, String)> {
        let mut handles = Vec::new();
        for c in calls {
            handles.push(tokio::spawn(async move {
                let r = c.await.expect("infallible");
                let status = r.status().as_u16();
                let body = http_body_util::BodyExt::collect(r.into_body())
                    .await
                    .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                    .unwrap_or_default();
                (status, body)
            }));
        }
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.expect("join"));
        }
        out
    }
}
