//! Passive health ([`OutlierLayer`]): each attempt's outcome is fed to its endpoint's outlier
//! detector — consecutive 5xx (or gateway errors) eject it for `base_ejection_time × times
//! ejected` (capped), never past the cluster's `max_ejection_percent`. Without a policy, a
//! refused connection ejects at once for a few seconds, so a dead pod leaves rotation (and
//! traffic spills to the next priority) before the control plane knows. The layer also keeps
//! the endpoint's in-flight count and latency (what peak-EWMA balancing reads), the
//! per-endpoint try metrics and the load-report counters of the endpoint's locality.

use std::time::Instant;

use super::{Attempt, BoxFut, Dispatch, Picked, Req, Svc, outcome_of, undispatched};
use crate::policy::{CONNECT_FAILURE_EJECTION, Outcome};

crate::resilience::stack_layer!(
    /// Records attempt outcomes per endpoint and ejects outliers.
    OutlierLayer,
    /// See [`OutlierLayer`].
    Outlier, metrics
);

impl<S: Svc> Outlier<S> {
    fn serve(&mut self, req: Req) -> BoxFut {
        let (Some(d), Some(Picked(target))) = (
            Dispatch::of(&req),
            req.extensions().get::<Picked>().cloned(),
        ) else {
            return undispatched();
        };
        let (mut inner, metrics) = (self.inner.clone(), self.metrics.clone());
        Box::pin(async move {
            let stats = target.stats.clone();
            let in_flight = stats.start();
            target.load.start();
            let started = Instant::now();
            let mut resp = inner.call(req).await.unwrap_or_else(|n| match n {});
            drop(in_flight);
            // Two clock reads per attempt: its start and its end.
            let ended = Instant::now();
            let took = ended.saturating_duration_since(started);
            let outcome = outcome_of(&resp);
            target.load.finish(!outcome.is_5xx(), took);
            if let Outcome::Status(_) = outcome {
                stats.observe_at(took, ended);
            }
            match outcome {
                Outcome::Status(200) => target
                    .hot
                    .get_or_init(|| metrics.hot_endpoint(&d.cluster, target.addr))
                    .record(took),
                other => {
                    let label = match other {
                        Outcome::Status(code) => code.to_string(),
                        Outcome::ConnectFailure => "connect-failure".into(),
                        Outcome::Reset => "reset".into(),
                        Outcome::Timeout => "timeout".into(),
                    };
                    metrics.attempt(&d.cluster, target.addr, &label, took);
                }
            }
            let policy = match (&d.policy.outlier, outcome) {
                (Some(o), _) => Some(o),
                (None, Outcome::ConnectFailure) => Some(&CONNECT_FAILURE_EJECTION),
                (None, _) => None,
            };
            let ejected = stats.record_outcome(outcome, policy, || {
                policy.is_some_and(|o| d.endpoints.may_eject(o.max_ejection_percent))
            });
            if ejected {
                tracing::warn!(cluster = %d.cluster, endpoint = %target.addr, ?outcome, "outlier ejected");
                metrics.ejection(&d.cluster);
            }
            let attempt = Attempt {
                endpoint: Some(target.addr),
                outcome,
            };
            // The connection layer usually said the same already: no second insert then.
            if resp.extensions().get::<Attempt>() != Some(&attempt) {
                resp.extensions_mut().insert(attempt);
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::policy::{ClusterPolicy, OutlierPolicy};
    use crate::resilience::test_support::{dispatch, request, scripted};
    use std::sync::Arc;
    use std::time::Duration;
    use tower::{Layer, Service};

    #[tokio::test]
    async fn consecutive_5xx_eject_the_endpoint_and_it_comes_back() {
        let (svc, _) = scripted(&[500, 500, 500, 200]);
        let mut svc = OutlierLayer::new(Arc::new(Metrics::new())).layer(svc);
        let mut d = dispatch();
        d.policy = Arc::new(ClusterPolicy {
            outlier: Some(OutlierPolicy {
                consecutive_5xx: 3,
                consecutive_gateway: 0,
                base_ejection: Duration::from_millis(200),
                max_ejection_percent: 100,
            }),
            ..ClusterPolicy::default()
        });
        let d = Arc::new(d);
        let target = d.endpoints.priorities[0][0].stats.clone();
        for _ in 0..3 {
            let mut req = request(d.clone());
            req.extensions_mut()
                .insert(Picked(crate::resilience::test_support::target(&d)));
            let resp = svc.call(req).await.expect("infallible");
            let attempt = resp.extensions().get::<Attempt>().copied();
            assert_eq!(attempt.map(|a| a.outcome), Some(Outcome::Status(500)));
        }
        assert!(target.is_ejected(), "three 5xx in a row eject");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(!target.is_ejected(), "the ejection ends");
    }
}
