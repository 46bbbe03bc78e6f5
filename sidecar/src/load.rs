//! Load counters of one (cluster, locality): what load reports ([`crate::lrs`]) send. Counting
//! is lock-free on the request path (atomics each endpoint points at); a report takes the
//! counts since the previous one (`swap`), so nothing is counted twice and nothing is lost.
//! A leaf module: the balancer, the cluster runtime and config compilation hold these.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use weft_proto::envoy::envoy::config::core::v3::Locality;
use weft_proto::envoy::envoy::config::endpoint::v3::{
    EndpointLoadMetricStats, UpstreamLocalityStats,
};
use weft_proto::load::{BUCKETS, bucket_for, bucket_name};

/// Counters of one (cluster, locality) since the last report.
#[derive(Debug)]
pub struct LocalityLoad {
    /// The zone of the endpoints it counts.
    pub zone: String,
    issued: AtomicU64,
    succeeded: AtomicU64,
    errored: AtomicU64,
    in_progress: AtomicU64,
    latency: [AtomicU64; BUCKETS],
    latency_ms_sum: [AtomicU64; BUCKETS],
}

impl LocalityLoad {
    /// Empty counters for `zone`.
    pub fn new(zone: &str) -> Self {
        LocalityLoad {
            zone: zone.to_string(),
            issued: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            errored: AtomicU64::new(0),
            in_progress: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_ms_sum: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// An attempt starts.
    pub fn start(&self) {
        self.issued.fetch_add(1, Ordering::Relaxed);
        self.in_progress.fetch_add(1, Ordering::Relaxed);
    }

    /// An attempt that started ended, successfully or not, after `took`.
    pub fn finish(&self, success: bool, took: Duration) {
        self.in_progress.fetch_sub(1, Ordering::Relaxed);
        let counter = if success {
            &self.succeeded
        } else {
            &self.errored
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let b = bucket_for(took);
        self.latency[b].fetch_add(1, Ordering::Relaxed);
        self.latency_ms_sum[b].fetch_add(took.as_millis() as u64, Ordering::Relaxed);
    }

    /// The counts since the last call, as an LRS locality entry (`None` when nothing happened).
    pub fn take(&self) -> Option<UpstreamLocalityStats> {
        let issued = self.issued.swap(0, Ordering::Relaxed);
        let succeeded = self.succeeded.swap(0, Ordering::Relaxed);
        let errored = self.errored.swap(0, Ordering::Relaxed);
        let in_progress = self.in_progress.load(Ordering::Relaxed);
        let load_metric_stats: Vec<EndpointLoadMetricStats> = (0..BUCKETS)
            .filter_map(|i| {
                let n = self.latency[i].swap(0, Ordering::Relaxed);
                let sum = self.latency_ms_sum[i].swap(0, Ordering::Relaxed);
                (n > 0).then(|| EndpointLoadMetricStats {
                    metric_name: bucket_name(i),
                    num_requests_finished_with_metric: n,
                    total_metric_value: sum as f64,
                })
            })
            .collect();
        if issued == 0 && succeeded == 0 && errored == 0 && in_progress == 0 {
            return None;
        }
        Some(UpstreamLocalityStats {
            locality: Some(Locality {
                zone: self.zone.clone(),
                ..Default::default()
            }),
            total_successful_requests: succeeded,
            total_requests_in_progress: in_progress,
            total_error_requests: errored,
            total_issued_requests: issued,
            load_metric_stats,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_takes_what_happened_since_the_last_one() {
        let l = LocalityLoad::new("a");
        assert!(l.take().is_none(), "nothing to report");
        for _ in 0..3 {
            l.start();
        }
        l.finish(true, Duration::from_millis(3));
        l.finish(false, Duration::from_millis(700));
        let r = l.take().expect("a report");
        assert_eq!(
            (
                r.total_issued_requests,
                r.total_successful_requests,
                r.total_error_requests,
                r.total_requests_in_progress
            ),
            (3, 1, 1, 1)
        );
        let buckets: u64 = r
            .load_metric_stats
            .iter()
            .map(|m| m.num_requests_finished_with_metric)
            .sum();
        assert_eq!(buckets, 2);
        // The next report has only the one still in progress, then it finishes.
        let r = l.take().expect("in progress");
        assert_eq!(
            (r.total_issued_requests, r.total_requests_in_progress),
            (0, 1)
        );
        l.finish(true, Duration::from_millis(1));
        let r = l.take().expect("finished");
        assert_eq!(
            (r.total_successful_requests, r.total_requests_in_progress),
            (1, 0)
        );
        assert!(l.take().is_none());
    }
}
