//! How Weft uses xDS load reporting (LRS, `envoy.service.load_stats.v3`): besides the standard
//! per-locality request counters, a sidecar reports the latency of finished requests as a
//! histogram of named load metrics, one `EndpointLoadMetricStats` per bucket —
//! `weft.latency_ms.le.<bound>` counts requests that took at most `<bound>` ms and more than
//! the previous bound (`inf` for the rest), with the sum of their latencies. The control plane
//! adds them up across proxies and reads percentiles from them (a rollout's p99).

use std::time::Duration;

/// Upper bounds of the latency buckets, milliseconds; the last bucket is unbounded.
pub const LATENCY_BOUNDS_MS: [u64; 13] =
    [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];
/// Number of buckets (the bounded ones and the last, unbounded one).
pub const BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;
/// Prefix of the bucket metric names.
pub const LATENCY_METRIC_PREFIX: &str = "weft.latency_ms.le.";

/// The metric name of bucket `i`.
pub fn bucket_name(i: usize) -> String {
    match LATENCY_BOUNDS_MS.get(i) {
        Some(b) => format!("{LATENCY_METRIC_PREFIX}{b}"),
        None => format!("{LATENCY_METRIC_PREFIX}inf"),
    }
}

/// The bucket a metric name stands for, when it is one of Weft's.
pub fn bucket_of(name: &str) -> Option<usize> {
    let bound = name.strip_prefix(LATENCY_METRIC_PREFIX)?;
    if bound == "inf" {
        return Some(BUCKETS - 1);
    }
    let b: u64 = bound.parse().ok()?;
    LATENCY_BOUNDS_MS.iter().position(|x| *x == b)
}

/// The bucket of a request that took `d`.
pub fn bucket_for(d: Duration) -> usize {
    let ms = d.as_secs_f64() * 1000.0;
    LATENCY_BOUNDS_MS
        .iter()
        .position(|b| ms <= *b as f64)
        .unwrap_or(BUCKETS - 1)
}

/// The `q` quantile (0..1) of a histogram: the upper bound of the bucket holding it (`None`
/// for an empty histogram; the unbounded bucket reads as the largest bound doubled).
pub fn quantile(counts: &[u64; BUCKETS], q: f64) -> Option<Duration> {
    let total: u64 = counts.iter().fold(0u64, |a, c| a.saturating_add(*c));
    if total == 0 {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen = u64::saturating_add(seen, *c);
        if seen >= rank {
            let ms = LATENCY_BOUNDS_MS
                .get(i)
                .copied()
                .unwrap_or(LATENCY_BOUNDS_MS[LATENCY_BOUNDS_MS.len() - 1] * 2);
            return Some(Duration::from_millis(ms));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_buckets_hold_their_bounds() {
        for i in 0..BUCKETS {
            assert_eq!(bucket_of(&bucket_name(i)), Some(i));
        }
        assert_eq!(bucket_of("cpu"), None);
        assert_eq!(bucket_of("weft.latency_ms.le.7"), None);
        assert_eq!(bucket_for(Duration::from_micros(300)), 0);
        assert_eq!(bucket_for(Duration::from_millis(1)), 0);
        assert_eq!(bucket_for(Duration::from_millis(3)), 2);
        assert_eq!(bucket_for(Duration::from_secs(60)), BUCKETS - 1);
    }

    #[test]
    fn quantiles_read_the_bucket_bound() {
        let mut h = [0u64; BUCKETS];
        assert_eq!(quantile(&h, 0.99), None);
        h[bucket_for(Duration::from_millis(4))] = 98;
        h[bucket_for(Duration::from_millis(400))] = 2;
        assert_eq!(quantile(&h, 0.5), Some(Duration::from_millis(5)));
        assert_eq!(quantile(&h, 0.98), Some(Duration::from_millis(5)));
        assert_eq!(quantile(&h, 0.99), Some(Duration::from_millis(500)));
    }
}
