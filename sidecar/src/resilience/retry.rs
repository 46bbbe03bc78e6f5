//! Retries ([`RetryLayer`]): an attempt whose outcome the route's policy lists (`retry_on`) is
//! tried again on another endpoint, at most `num_retries` times, after a fully jittered
//! exponential backoff, and only while the cluster's retry budget allows (each retry holds a
//! budget slot while in flight: Envoy's "active retries") — so a failing upstream gets a
//! bounded share of extra load, never a storm. A body is replayed only when it is small and
//! whole (at most [`MAX_REPLAY_BODY`]); larger or unknown-size bodies stream once.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper::body::Body as _;

use super::{
    Attempt, BoxFut, Dispatch, Req, Resp, Svc, Tried, Unsent, outcome_of, refusal, undispatched,
};
use crate::http::Body;
use crate::metrics::Metrics;

/// Largest request body kept in memory so a request can be retried.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

crate::resilience::stack_layer!(
    /// Retries attempts per the route's policy and the cluster's budget.
    RetryLayer,
    /// See [`RetryLayer`].
    Retry, metrics
);

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|n| match n {}).boxed()
}

impl<S: Svc> Retry<S> {
    fn serve(&mut self, req: Req) -> BoxFut {
        let Some(d) = Dispatch::of(&req) else {
            return undispatched();
        };
        let (inner, metrics) = (self.inner.clone(), self.metrics.clone());
        Box::pin(async move { Ok(retry(inner, metrics, d, req).await) })
    }
}

async fn retry<S: Svc>(mut inner: S, metrics: Arc<Metrics>, d: Arc<Dispatch>, req: Req) -> Resp {
    let (parts, body) = req.into_parts();
    let replayable = body
        .size_hint()
        .upper()
        .is_some_and(|n| n <= MAX_REPLAY_BODY);
    if !replayable {
        // Streams once: no retry is possible.
        return inner
            .call(Req::from_parts(parts, body))
            .await
            .unwrap_or_else(|n| match n {});
    }
    // Most requests (GET) have no body: nothing to read or keep.
    let collected = if body.is_end_stream() {
        Ok(Bytes::new())
    } else {
        body.collect().await.map(|b| b.to_bytes())
    };
    let bytes = match collected {
        Ok(b) => b,
        Err(e) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                "bad-request-body",
                format!("weft: reading the request body: {e}"),
                None,
            );
        }
    };
    let mut tried = Tried::default();
    let mut retries = 0u32;
    let mut _retry_slot = None;
    // A copy for the next attempt is made before sending only when the policy may retry an
    // attempt that reached its endpoint; one that never did comes back whole (`Unsent`).
    let template = d.retry.retries_answers().then(|| parts.clone());
    let mut next = Req::from_parts(parts, full(bytes.clone()));
    loop {
        let mut attempt = next;
        // The first attempt has tried nothing: nothing to carry.
        if !tried.0.is_empty() {
            attempt.extensions_mut().insert(tried.clone());
        }
        // A request handed back by the connection layer lost its extensions.
        if attempt.extensions().get::<Arc<Dispatch>>().is_none() {
            attempt.extensions_mut().insert(d.clone());
        }
        let mut resp = inner.call(attempt).await.unwrap_or_else(|n| match n {});
        let outcome = outcome_of(&resp);
        if !(d.retry.retriable(outcome) && retries < d.retry.attempts) {
            return resp;
        }
        let again = resp
            .extensions_mut()
            .remove::<Unsent>()
            .and_then(|u| u.take())
            .or_else(|| {
                template
                    .clone()
                    .map(|p| Req::from_parts(p, full(bytes.clone())))
            });
        // Retriable, but nothing to send again (it reached the endpoint, no copy was kept).
        let Some(again) = again else {
            return resp;
        };
        next = again;
        // Only a request that is tried again needs to know where it went.
        if let Some(Attempt {
            endpoint: Some(e), ..
        }) = resp.extensions().get::<Attempt>()
        {
            tried.0.push(*e);
        }
        // The previous retry's slot is released before asking for the next one.
        _retry_slot = None;
        let Some(slot) = d.runtime.retry(&d.policy) else {
            metrics.overflow(&d.cluster, "retry-budget");
            return resp;
        };
        _retry_slot = Some(slot);
        let wait = d.retry.backoff(retries, rand::random::<f64>());
        retries += 1;
        metrics.retry(&d.cluster);
        drop(resp);
        if wait > Duration::ZERO {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{ClusterPolicy, RetryPolicy};
    use crate::resilience::test_support::{dispatch, request, scripted};
    use tower::{Layer, Service};

    fn with_retry(retry_on: &str, attempts: u32, budget: Option<(f64, u32)>) -> Dispatch {
        let mut d = dispatch();
        let mut r = RetryPolicy::connect_failure_default();
        r.on_connect_failure = false;
        r.on_5xx = retry_on.contains("5xx");
        r.attempts = attempts;
        r.backoff_base = Duration::from_millis(1);
        r.backoff_max = Duration::from_millis(2);
        d.retry = Arc::new(r);
        d.policy = Arc::new(ClusterPolicy {
            budget,
            max_retries: 100,
            ..ClusterPolicy::default()
        });
        d
    }

    #[tokio::test]
    async fn a_flaky_upstream_is_retried_until_it_answers() {
        let (svc, calls) = scripted(&[503, 503, 200]);
        let mut svc = RetryLayer::new(Arc::new(Metrics::new())).layer(svc);
        let resp = svc
            .call(request(with_retry("5xx", 3, None)))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), 200);
        assert_eq!(calls(), 3);
    }

    #[tokio::test]
    async fn attempts_and_conditions_bound_retries() {
        let (svc, calls) = scripted(&[503, 503, 503, 503]);
        let mut svc = RetryLayer::new(Arc::new(Metrics::new())).layer(svc);
        let resp = svc
            .call(request(with_retry("5xx", 2, None)))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), 503, "the last answer is returned");
        assert_eq!(calls(), 3, "one try and two retries");
        // A 404 is not a 5xx: no retry.
        let (svc, calls) = scripted(&[404, 200]);
        let mut svc = RetryLayer::new(Arc::new(Metrics::new())).layer(svc);
        let resp = svc
            .call(request(with_retry("5xx", 2, None)))
            .await
            .expect("infallible");
        assert_eq!((resp.status().as_u16(), calls()), (404, 1));
    }

    #[tokio::test]
    async fn the_budget_stops_a_storm() {
        // Budget: 0 % of requests in flight, at least 1 retry in flight at a time. Two
        // concurrent failing requests: only one may be retrying at any moment.
        let (svc, calls) = scripted(&[503; 64]);
        let metrics = Arc::new(Metrics::new());
        let svc = RetryLayer::new(metrics.clone()).layer(svc);
        let d = Arc::new(with_retry("5xx", 10, Some((0.0, 0))));
        let resp = svc
            .clone()
            .call(request(d.clone()))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), 503);
        assert_eq!(calls(), 1, "a zero budget allows no retry at all");
        let budget = vec![
            ("cluster".to_string(), "c".to_string()),
            ("reason".to_string(), "retry-budget".to_string()),
        ];
        assert_eq!(metrics.overflows.get_or_create(&budget).get(), 1);
    }

    #[tokio::test]
    async fn a_large_body_streams_once() {
        let (svc, calls) = scripted(&[503, 200]);
        let mut svc = RetryLayer::new(Arc::new(Metrics::new())).layer(svc);
        let mut req = request(with_retry("5xx", 3, None));
        *req.body_mut() = full(Bytes::from(vec![0u8; (MAX_REPLAY_BODY + 1) as usize]));
        let resp = svc.call(req).await.expect("infallible");
        assert_eq!((resp.status().as_u16(), calls()), (503, 1));
    }

    /// An extension that counts its clones: how often the request was copied.
    #[derive(Debug)]
    struct Marker(Arc<std::sync::atomic::AtomicUsize>);

    impl Clone for Marker {
        fn clone(&self) -> Self {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Marker(self.0.clone())
        }
    }

    #[tokio::test]
    async fn a_connect_failure_is_retried_with_the_request_it_handed_back_not_a_copy() {
        // The first attempt fails to connect and hands its request back, as the connection
        // layer does; the second is answered.
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = calls.clone();
        let inner = tower::service_fn(move |req: Req| -> BoxFut {
            let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                if n == 0 {
                    let mut r = refusal(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream-failure",
                        "refused".into(),
                        Some(Attempt {
                            endpoint: Some("127.0.0.1:9".parse().expect("addr")),
                            outcome: crate::policy::Outcome::ConnectFailure,
                        }),
                    );
                    r.extensions_mut().insert(Unsent::new(req));
                    return Ok(r);
                }
                Ok(crate::http::refuse(StatusCode::OK, "ok", String::new()))
            })
        });
        let mut svc = RetryLayer::new(Arc::new(Metrics::new())).layer(inner);
        let copies = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut req = request(dispatch());
        req.extensions_mut().insert(Marker(copies.clone()));
        let resp = svc.call(req).await.expect("infallible");
        assert_eq!(resp.status(), 200);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(
            copies.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "the request was copied although only connect failures are retried"
        );
        // A policy that retries answers keeps a copy before sending: it has to.
        let (inner, _) = scripted(&[503, 200]);
        let mut svc = RetryLayer::new(Arc::new(Metrics::new())).layer(inner);
        let mut req = request(with_retry("5xx", 2, None));
        req.extensions_mut().insert(Marker(copies.clone()));
        let resp = svc.call(req).await.expect("infallible");
        assert_eq!(resp.status(), 200);
        assert!(copies.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    }
}
