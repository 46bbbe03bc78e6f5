//! The balancing stage of the outbound stack ([`PickLayer`]): picks each attempt's endpoint
//! from the cluster's priorities with its balancer, preferring one this request has not
//! tried yet; no healthy endpoint answers 503 `no-healthy-endpoints`.

use hyper::StatusCode;

use crate::resilience::{BoxFut, Dispatch, Picked, Req, Svc, Tried, refusal, undispatched};

crate::resilience::stack_layer!(
    /// Picks an endpoint per attempt.
    PickLayer,
    /// See [`PickLayer`].
    Pick
);

/// An endpoint of `d`, avoiding `tried`: a retry counts the endpoints it already tried
/// as unusable, so once a priority's are all tried it spills to the next priority (as
/// Envoy's previous-hosts and previous-priorities retry plugins do together).
pub fn choose(d: &Dispatch, tried: &[std::net::SocketAddr]) -> Option<crate::balance::Target> {
    d.endpoints
        .pick_untried(rand::random::<u64>(), d.hash, tried)
        .cloned()
}

impl<S: Svc> Pick<S> {
    fn serve(&mut self, mut req: Req) -> BoxFut {
        let Some(d) = Dispatch::of(&req) else {
            return undispatched();
        };
        let tried = req.extensions().get::<Tried>().map(|t| t.0.as_slice());
        let Some(target) = choose(&d, tried.unwrap_or_default()) else {
            let detail = format!("weft: cluster {} has no healthy endpoint", d.cluster);
            return Box::pin(async move {
                Ok(refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no-healthy-endpoints",
                    detail,
                    None,
                ))
            });
        };
        req.extensions_mut().insert(Picked(target));
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::test_support::{dispatch, request};
    use std::sync::Arc;
    use tower::{Layer, Service};

    #[tokio::test]
    async fn each_attempt_gets_an_endpoint_and_none_healthy_is_503() {
        // The inner service answers with the endpoint it was handed.
        let seen = tower::service_fn(|req: Req| -> BoxFut {
            let picked = req
                .extensions()
                .get::<Picked>()
                .map(|p| p.0.addr.to_string());
            Box::pin(async move {
                let detail = picked.unwrap_or_default();
                Ok(crate::http::refuse(StatusCode::OK, "picked", detail))
            })
        });
        let mut svc = PickLayer.layer(seen);
        let resp = svc.call(request(dispatch())).await.expect("infallible");
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        assert_eq!(&body[..], b"127.0.0.1:9\n");
        // Every endpoint unhealthy: nothing to pick.
        let mut d = dispatch();
        let mut e = d.endpoints.priorities[0][0].clone();
        e.spec.healthy = false;
        d.endpoints = Arc::new(crate::state::Endpoints::new(
            vec![vec![e]],
            140,
            crate::balance::Algorithm::RoundRobin,
        ));
        let resp = svc.call(request(d)).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()["x-weft-reason"], "no-healthy-endpoints");
    }
}
