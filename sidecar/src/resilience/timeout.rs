//! Deadlines: [`TimeoutLayer`] bounds a whole request (the route's `timeout`, retries
//! included) and answers 504 `timeout`; [`PerTryTimeoutLayer`] bounds one attempt (the retry
//! policy's `per_try_timeout`) and answers 504 `per-try-timeout` with outcome `Timeout`, which
//! the retry layer may retry and the outlier layer counts as a gateway error.

use hyper::StatusCode;

use super::{Attempt, BoxFut, Dispatch, Outcome, Picked, Req, Svc, refusal, undispatched};

crate::resilience::stack_layer!(
    /// Bounds the whole request by the route's timeout.
    TimeoutLayer,
    /// See [`TimeoutLayer`].
    Timeout
);

impl<S: Svc> Timeout<S> {
    fn serve(&mut self, req: Req) -> BoxFut {
        let Some(d) = Dispatch::of(&req) else {
            return undispatched();
        };
        let fut = self.inner.clone().call(req);
        let Some(limit) = d.timeout else { return fut };
        Box::pin(async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
                Err(_) => Ok(refusal(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!("weft: {} did not answer within {limit:?}", d.cluster),
                    None,
                )),
            }
        })
    }
}

crate::resilience::stack_layer!(
    /// Bounds each attempt by the retry policy's per-try timeout.
    PerTryTimeoutLayer,
    /// See [`PerTryTimeoutLayer`].
    PerTryTimeout
);

impl<S: Svc> PerTryTimeout<S> {
    fn serve(&mut self, req: Req) -> BoxFut {
        let Some(d) = Dispatch::of(&req) else {
            return undispatched();
        };
        let endpoint = req.extensions().get::<Picked>().map(|p| p.0.addr);
        let fut = self.inner.clone().call(req);
        let Some(limit) = d.retry.per_try_timeout else {
            return fut;
        };
        Box::pin(async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
                Err(_) => Ok(refusal(
                    StatusCode::GATEWAY_TIMEOUT,
                    "per-try-timeout",
                    format!(
                        "weft: {} endpoint {} did not answer in time",
                        d.cluster,
                        endpoint.map_or("?".into(), |e| e.to_string())
                    ),
                    Some(Attempt {
                        endpoint,
                        outcome: Outcome::Timeout,
                    }),
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::test_support::{dispatch, request, slow};
    use std::time::Duration;
    use tower::{Layer, Service};

    #[tokio::test(start_paused = true)]
    async fn the_route_deadline_answers_504() {
        let mut svc = TimeoutLayer.layer(slow(Duration::from_secs(5)));
        let mut d = dispatch();
        d.timeout = Some(Duration::from_millis(100));
        let resp = svc.call(request(d)).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(resp.headers()["x-weft-reason"], "timeout");
        // Without a deadline the slow answer comes through.
        let resp = svc.call(request(dispatch())).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_over_its_per_try_timeout_is_a_timeout_outcome() {
        let mut svc = PerTryTimeoutLayer.layer(slow(Duration::from_secs(5)));
        let mut d = dispatch();
        let mut retry = (*d.retry).clone();
        retry.per_try_timeout = Some(Duration::from_millis(50));
        d.retry = std::sync::Arc::new(retry);
        let resp = svc.call(request(d)).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(super::super::outcome_of(&resp), Outcome::Timeout);
    }
}
