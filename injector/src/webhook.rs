//! The admission webhook: `POST /inject` takes an `admission.k8s.io/v1` AdmissionReview and
//! answers with the review's response, carrying a JSON Patch that adds Weft's sidecar.
//!
//! Outcomes, and why:
//! - a Pod is injected: allowed, with the patch;
//! - a Pod that opts out, is already injected, or uses the host network: allowed, no patch;
//! - a Pod whose Weft annotations are malformed: **denied**, naming the annotation — the user
//!   wrote something wrong and should hear it now;
//! - anything the webhook itself cannot handle (a Pod it cannot read): allowed without a
//!   sidecar **with a warning** (kubectl prints it) and a log line and metric — never a silent
//!   change of behaviour, never a Pod blocked by a webhook bug;
//! - a body that is not an AdmissionReview: HTTP 400 with what is wrong.
//!
//! The MutatingWebhookConfiguration uses `failurePolicy: Fail` scoped to namespaces labelled
//! `weft.dev/injection=enabled`: when the webhook is down, Pods there are refused loudly (the API
//! server says it could not call the webhook) rather than started without mTLS unnoticed.

use std::sync::Arc;

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::patch::{InjectConfig, Outcome, inject};

/// Largest AdmissionReview body read (the API server's own limit is 3 MiB for an object).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// A request that is not a usable AdmissionReview (answered with HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadReview(pub String);

/// What happened to one review (the `outcome` label of `weft_injector_reviews_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Patched.
    Injected,
    /// Allowed unchanged (opted out, already injected, not a Pod, ...).
    Skipped,
    /// Denied: malformed Weft annotations.
    Denied,
    /// Allowed unchanged with a warning: the webhook could not handle it.
    Warned,
}

impl Verdict {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Injected => "injected",
            Verdict::Skipped => "skipped",
            Verdict::Denied => "denied",
            Verdict::Warned => "warned",
        }
    }
}

/// Answers one AdmissionReview (JSON bytes): the response review, and what happened.
pub fn review(body: &[u8], cfg: &InjectConfig) -> Result<(serde_json::Value, Verdict), BadReview> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let review: AdmissionReview<DynamicObject> = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| {
            BadReview(format!(
                "not an admission.k8s.io/v1 AdmissionReview: at {}: {}",
                e.path(),
                e.inner()
            ))
        })?;
    let req: AdmissionRequest<DynamicObject> = review
        .try_into()
        .map_err(|_| BadReview("the AdmissionReview has no request".into()))?;
    let (resp, verdict) = respond(&req, cfg);
    let mut out = serde_json::to_value(resp.into_review())
        .map_err(|e| BadReview(format!("cannot encode the response: {e}")))?;
    base64_patch(&mut out);
    Ok((out, verdict))
}

/// kube-core serializes the patch (a Go `[]byte`) as an array of numbers; Kubernetes writes
/// `[]byte` as base64 and documents the patch so. Sends the documented form.
fn base64_patch(review: &mut serde_json::Value) {
    use base64::Engine;
    let Some(patch) = review.pointer_mut("/response/patch") else {
        return;
    };
    if let Some(items) = patch.as_array() {
        let bytes: Vec<u8> = items
            .iter()
            .filter_map(|b| b.as_u64().and_then(|n| u8::try_from(n).ok()))
            .collect();
        *patch = serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
}

fn warned(req: &AdmissionRequest<DynamicObject>, what: String) -> (AdmissionResponse, Verdict) {
    tracing::warn!(uid = %req.uid, pod = %pod_name(req), reason = %what, "admitted without a sidecar");
    let mut resp = AdmissionResponse::from(req);
    resp.warnings = Some(vec![format!(
        "weft-injector: {what}; the pod was admitted without Weft's sidecar"
    )]);
    (resp, Verdict::Warned)
}

fn pod_name(req: &AdmissionRequest<DynamicObject>) -> String {
    let ns = req.namespace.clone().unwrap_or_default();
    let name = if req.name.is_empty() {
        req.object
            .as_ref()
            .and_then(|o| o.metadata.generate_name.clone())
            .map(|g| format!("{g}*"))
            .unwrap_or_default()
    } else {
        req.name.clone()
    };
    format!("{ns}/{name}")
}

fn respond(
    req: &AdmissionRequest<DynamicObject>,
    cfg: &InjectConfig,
) -> (AdmissionResponse, Verdict) {
    if !req.kind.group.is_empty() || req.kind.kind != "Pod" {
        return (AdmissionResponse::from(req), Verdict::Skipped);
    }
    let Some(obj) = req.object.as_ref() else {
        return warned(req, "the review carries no object".into());
    };
    let original = match serde_json::to_value(obj) {
        Ok(v) => v,
        Err(e) => return warned(req, format!("cannot read the object: {e}")),
    };
    let pod: k8s_openapi::api::core::v1::Pod =
        match serde_path_to_error::deserialize(original.clone()) {
            Ok(p) => p,
            Err(e) => {
                return warned(
                    req,
                    format!("cannot read the pod at {}: {}", e.path(), e.inner()),
                );
            }
        };
    match inject(&pod, cfg) {
        Ok(Outcome::Skipped(why)) => {
            tracing::debug!(pod = %pod_name(req), reason = %why, "not injected");
            (AdmissionResponse::from(req), Verdict::Skipped)
        }
        Ok(Outcome::Injected(patched)) => {
            let after = match serde_json::to_value(&*patched) {
                Ok(v) => v,
                Err(e) => return warned(req, format!("cannot encode the patched pod: {e}")),
            };
            let patch = json_patch::diff(&original, &after);
            match AdmissionResponse::from(req).with_patch(patch) {
                Ok(r) => {
                    tracing::info!(pod = %pod_name(req), "sidecar injected");
                    (r, Verdict::Injected)
                }
                Err(e) => warned(req, format!("cannot encode the patch: {e}")),
            }
        }
        Err(e) => {
            tracing::info!(pod = %pod_name(req), error = %e, "pod refused: malformed Weft annotation");
            (
                AdmissionResponse::from(req)
                    .deny(format!("weft-injector: pod {}: {e}", pod_name(req))),
                Verdict::Denied,
            )
        }
    }
}

/// The injector's metrics.
pub struct Metrics {
    registry: Registry,
    /// `weft_injector_reviews_total{outcome}`.
    pub reviews: Family<Vec<(String, String)>, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let reviews = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "weft_injector_reviews",
            "AdmissionReviews answered, by outcome (injected, skipped, denied, warned, bad_request)",
            reviews.clone(),
        );
        Metrics { registry, reviews }
    }
}

impl Metrics {
    /// Counts one review.
    pub fn count(&self, outcome: &str) {
        self.reviews
            .get_or_create(&vec![("outcome".into(), outcome.into())])
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// Shared by every connection of the server.
pub struct State {
    /// What to inject (swapped when the mesh root file changes).
    pub cfg: arc_swap::ArcSwap<InjectConfig>,
    /// Metrics.
    pub metrics: Metrics,
}

/// Handles one HTTP request: `POST /inject`, `GET /ready|/live|/metrics`.
pub async fn handle(
    state: Arc<State>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use http_body_util::BodyExt;
    use hyper::StatusCode;
    let text = |status: StatusCode, body: String, ctype: &str| {
        hyper::Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, ctype)
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap_or_default()
    };
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/ready" | "/live") => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        ("GET", "/metrics") => text(
            StatusCode::OK,
            state.metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        ("POST", "/inject") => {
            let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY_BYTES);
            let body = match limited.collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    state.metrics.count("bad_request");
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("cannot read the body (at most {MAX_BODY_BYTES} bytes): {e}\n"),
                        "text/plain",
                    );
                }
            };
            match review(&body, &state.cfg.load()) {
                Ok((resp, verdict)) => {
                    state.metrics.count(verdict.as_str());
                    text(StatusCode::OK, resp.to_string(), "application/json")
                }
                Err(BadReview(msg)) => {
                    state.metrics.count("bad_request");
                    tracing::info!(error = %msg, "malformed AdmissionReview");
                    text(StatusCode::BAD_REQUEST, format!("{msg}\n"), "text/plain")
                }
            }
        }
        (_, "/inject") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST an AdmissionReview to /inject\n".into(),
            "text/plain",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "try POST /inject, GET /ready /live /metrics\n".into(),
            "text/plain",
        ),
    }
}
