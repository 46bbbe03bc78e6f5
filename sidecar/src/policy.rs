//! The policies of a route and a cluster as Weft applies them — retries (which outcomes, how
//! many, backoff), circuit breakers and the retry budget, outlier ejection — read from Envoy
//! xDS, and the outcome of an attempt they decide on. Pure data and pure functions; a leaf
//! module (the balancer, config compilation and the resilience layers all read these).
//!
//! Semantics follow Envoy's, since the control plane speaks its xDS:
//! - retries happen only on the `retry_on` conditions, at most `num_retries` times, each try
//!   bounded by `per_try_timeout`, separated by fully-jittered exponential backoff;
//! - a retry also needs the cluster's budget: retries in flight may not exceed
//!   `max(min_retry_concurrency, budget_percent × requests in flight)` nor `max_retries`;
//! - `max_requests` bounds requests in flight per cluster;
//! - an endpoint with `consecutive_5xx` (or `consecutive_gateway_failure`) failures in a row
//!   is ejected for `base_ejection_time × (times ejected)`, unless that would eject more than
//!   `max_ejection_percent` of the cluster.

use std::time::Duration;

use serde::Serialize;
use weft_proto::envoy::envoy::config::cluster::v3 as cluster;
use weft_proto::envoy::envoy::config::route::v3 as route;

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

    /// Whether an attempt that reached its endpoint (an answer, a reset, a timeout) may be
    /// retried: only then must a copy of the request be kept before it is sent. A connect
    /// failure hands the unsent request back ([`crate::resilience::Unsent`]).
    pub fn retries_answers(&self) -> bool {
        self.attempts > 0
            && (self.on_5xx || self.on_gateway_error || self.on_reset || !self.codes.is_empty())
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
}
