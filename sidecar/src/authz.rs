//! Inbound authorization: the workload's RBAC filters (from its `weft-inbound` Listener)
//! judged on each HTTP request and on each connection spliced as opaque TCP.
//!
//! - HTTP: a denied request gets 403 `RBAC: access denied` (gRPC: `PERMISSION_DENIED`, as
//!   Envoy answers), never reaches the application, and is logged and counted with the
//!   deciding policy and rule. Each request is judged on the config of its moment, so a
//!   policy change applies to the next request of an open connection.
//! - TCP: judged before the application gets a byte, then again on every config change for
//!   as long as the connection lasts: a connection a new policy denies is closed.
//! - Paths: when the workload has any policy, the path is normalised (percent-encoded
//!   unreserved characters decoded, dot segments resolved, repeated slashes merged) before it is judged, and the application gets that path, so
//!   `/public/../admin` is judged as the `/admin` the application would serve. A path with
//!   an encoded `/` or `\` (`%2F`, `%5C`) is refused: what it names depends on the server.
//! - Until the Listener is accepted nothing says who may call, and nobody is let in.

use std::borrow::Cow;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode};
use weft_proto::rbac::{Decision, HttpInput, Input};

use crate::http::Body;
use crate::metrics::Metrics;
use crate::state::MeshConfig;

/// The body Envoy's RBAC filter answers a denied request with.
pub const DENIED: &str = "RBAC: access denied";

/// Who is asking, where to: what every check of one connection shares.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// The verified SPIFFE ID (mTLS), else `None`.
    pub principal: Option<&'a str>,
    /// The caller's address.
    pub peer: SocketAddr,
    /// Where the connection was going (the workload's address and container port).
    pub destination: SocketAddr,
    /// This workload's namespace (for the metric of a default denial).
    pub namespace: &'a str,
}

impl Caller<'_> {
    fn input<'a>(&'a self, http: Option<HttpInput<'a>>) -> Input<'a> {
        Input {
            principal: self.principal,
            source: self.peer.ip(),
            destination: self.destination,
            http,
        }
    }

    /// Logs and counts a decision; `what` says what was judged.
    fn record(&self, d: &Decision<'_>, what: &str, metrics: &Metrics) {
        metrics.authz(d, self.namespace);
        let caller = self.principal.unwrap_or("(plaintext)");
        if let Some(a) = d.audit {
            tracing::info!(peer = %self.peer, caller, destination = %self.destination, policy = a, allowed = d.allowed, "authz audit: {what}");
        }
        if !d.allowed {
            let policy = d.policy.unwrap_or("(no ALLOW rule matched)");
            tracing::info!(peer = %self.peer, caller, destination = %self.destination, policy, "authz: denied {what}");
        }
    }

    /// Whether an opaque TCP connection may reach the application.
    pub fn tcp_allowed(&self, config: &MeshConfig, metrics: &Metrics) -> bool {
        let Some(authz) = config.authz() else {
            tracing::info!(peer = %self.peer, "authz: connection refused: this workload's authorization is not known yet");
            metrics.inbound_refused("authz-unknown");
            return false;
        };
        let d = authz.tcp.evaluate(&self.input(None));
        self.record(&d, "connection", metrics);
        d.allowed
    }

    /// Resolves when a config change denies this (open, allowed) TCP connection.
    pub async fn revoked(
        &self,
        mut changed: tokio::sync::watch::Receiver<u64>,
        config: &arc_swap::ArcSwap<MeshConfig>,
        metrics: &Metrics,
    ) {
        loop {
            if changed.changed().await.is_err() {
                // The xDS client is gone: the config no longer changes.
                return std::future::pending().await;
            }
            let cfg = config.load();
            let allowed = match cfg.authz() {
                Some(a) => {
                    let d = a.tcp.evaluate(&self.input(None));
                    if !d.allowed {
                        self.record(&d, "an open connection (closed)", metrics);
                    }
                    d.allowed
                }
                // The authorization is no longer known: nothing says it may go on.
                None => false,
            };
            if !allowed {
                return;
            }
        }
    }

    /// Judges one HTTP request: `Ok` with the path to forward (normalised where the workload
    /// has policies), or the response to answer instead.
    pub fn http(
        &self,
        config: &MeshConfig,
        parts: &hyper::http::request::Parts,
        metrics: &Metrics,
    ) -> Result<Option<String>, Box<Response<Body>>> {
        let grpc = is_grpc(&parts.headers);
        let Some(authz) = config.authz() else {
            tracing::info!(peer = %self.peer, "authz: request refused: this workload's authorization is not known yet");
            metrics.inbound_refused("authz-unknown");
            return Err(Box::new(denied(grpc)));
        };
        if authz.http.is_empty() {
            return Ok(None);
        }
        let raw = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let (path, query) = match raw.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (raw, None),
        };
        let normal = weft_proto::rbac::normalize_path(path).map_err(|why| {
            tracing::info!(peer = %self.peer, path, "authz: request refused: {why}");
            metrics.inbound_refused("ambiguous-path");
            Box::new(crate::http::refuse(
                StatusCode::BAD_REQUEST,
                "ambiguous-path",
                format!("weft: {why}"),
            ))
        })?;
        let full: Cow<'_, str> = match (&normal, query) {
            (Cow::Borrowed(_), _) => Cow::Borrowed(raw),
            (Cow::Owned(p), Some(q)) => Cow::Owned(format!("{p}?{q}")),
            (Cow::Owned(p), None) => Cow::Owned(p.clone()),
        };
        // `Host` first: between sidecars over HTTP/2 `:authority` names the endpoint and
        // `Host` the Service (and is what the application reads); elsewhere the two agree
        // (`hop::request` refuses a request where they do not).
        let authority = parts
            .headers
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str()))
            .unwrap_or("");
        let http = HttpInput {
            method: parts.method.as_str(),
            path: &full,
            authority,
            headers: &parts.headers,
        };
        let d = authz.http.evaluate(&self.input(Some(http)));
        if d.audit.is_some() || !d.allowed {
            self.record(&d, &format!("{} {}", parts.method, path), metrics);
        }
        if !d.allowed {
            return Err(Box::new(denied(grpc)));
        }
        Ok(match full {
            Cow::Owned(p) => Some(p),
            Cow::Borrowed(_) => None,
        })
    }
}

fn is_grpc(headers: &hyper::HeaderMap) -> bool {
    headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Envoy's answer to a denied request: 403 `RBAC: access denied`, or for gRPC a
/// trailers-only `PERMISSION_DENIED` (status 7) with that message.
pub fn denied(grpc: bool) -> Response<Body> {
    let body = if grpc {
        Bytes::new()
    } else {
        Bytes::from_static(DENIED.as_bytes())
    };
    let mut r = Response::new(Full::new(body).map_err(|n| match n {}).boxed());
    if !grpc {
        *r.status_mut() = StatusCode::FORBIDDEN;
    }
    let h = r.headers_mut();
    h.insert(
        weft_proto::keys::PROXY_REASON_HEADER,
        hyper::header::HeaderValue::from_static("rbac-denied"),
    );
    if grpc {
        h.insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", hyper::header::HeaderValue::from_static("7"));
        h.insert(
            "grpc-message",
            hyper::header::HeaderValue::from_static("RBAC:%20access%20denied"),
        );
    } else {
        h.insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain"),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Before the `weft-inbound` Listener arrives nothing says who may call: a connection and
    /// a request are refused (the old inbound let every mTLS caller in).
    #[test]
    fn nobody_is_let_in_before_the_authorization_is_known() {
        let caller = Caller {
            principal: Some("spiffe://cluster.local/ns/shop/sa/alice"),
            peer: "198.18.0.9:40000".parse().expect("addr"),
            destination: "198.18.0.1:8080".parse().expect("addr"),
            namespace: "shop",
        };
        let (config, metrics) = (MeshConfig::default(), Metrics::default());
        assert!(!caller.tcp_allowed(&config, &metrics));
        let (parts, ()) = hyper::Request::get("/")
            .body(())
            .expect("request")
            .into_parts();
        let refused = caller.http(&config, &parts, &metrics).expect_err("refused");
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        // With a config and no policy, both are let in.
        let config = MeshConfig {
            inbound: Some(crate::state::InboundPolicy {
                mode: weft_proto::tls::MtlsMode::Strict,
                source: "default".into(),
                ports: Default::default(),
                authz: Default::default(),
                egress: Vec::new(),
            }),
            ..Default::default()
        };
        assert!(caller.tcp_allowed(&config, &metrics));
        assert!(matches!(caller.http(&config, &parts, &metrics), Ok(None)));
    }

    #[test]
    fn denials_look_like_envoys() {
        let r = denied(false);
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let g = denied(true);
        assert_eq!(g.status(), StatusCode::OK);
        assert_eq!(g.headers()["grpc-status"], "7");
    }
}
