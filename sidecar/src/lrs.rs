//! Load reporting (LRS, `envoy.service.load_stats.v3`): the sidecar counts, per cluster and
//! locality (the upstream endpoint's zone), the attempts it issued, how they ended, how many
//! are in progress and how long they took (Weft's latency histogram, `weft_proto::load`), and
//! streams those counts to the control plane at the interval the control plane asks for.
//!
//! Counting is lock-free on the request path (atomics in a [`LocalityLoad`] each endpoint
//! points at); a report takes the counts since the previous one (`swap`), so nothing is counted
//! twice and nothing is lost between reports. A control plane without LRS (UNIMPLEMENTED) is
//! left alone; other failures reconnect with backoff (unsent counts go in the next report).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_proto::envoy::envoy::config::core::v3::Locality;
use weft_proto::envoy::envoy::config::endpoint::v3::{
    ClusterStats, EndpointLoadMetricStats, UpstreamLocalityStats,
};
use weft_proto::envoy::envoy::service::load_stats::v3::LoadStatsRequest;
use weft_proto::envoy::envoy::service::load_stats::v3::load_reporting_service_client::LoadReportingServiceClient;
use weft_proto::load::{BUCKETS, bucket_for, bucket_name};

use crate::identity::ControlPlaneLink;
use crate::xds::XdsHandle;

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

/// What the control plane asked for.
struct Ask {
    interval: Duration,
    all: bool,
    clusters: Vec<String>,
}

/// The load of every cluster asked for, since the last report.
fn report(xds: &XdsHandle, ask: &Ask, since: Instant) -> Vec<ClusterStats> {
    let config = xds.config.load();
    let interval = since.elapsed();
    config
        .clusters
        .iter()
        .filter(|(name, _)| ask.all || ask.clusters.contains(name))
        .filter_map(|(name, c)| {
            let localities: Vec<UpstreamLocalityStats> = c
                .runtime
                .localities()
                .iter()
                .filter_map(|l| l.take())
                .collect();
            (!localities.is_empty()).then(|| ClusterStats {
                cluster_name: name.clone(),
                cluster_service_name: c.eds_name.clone(),
                upstream_locality_stats: localities,
                load_report_interval: Some(weft_proto::envoy::google::protobuf::Duration {
                    seconds: interval.as_secs() as i64,
                    nanos: interval.subsec_nanos() as i32,
                }),
                ..Default::default()
            })
        })
        .collect()
}

/// Streams load reports to the control plane until the task is dropped.
pub fn start(
    node: weft_proto::envoy::envoy::config::core::v3::Node,
    link: ControlPlaneLink,
    xds: XdsHandle,
    metrics: Arc<crate::admin::Metrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Reports start once there is config to report on.
        let mut ready = xds.ready.clone();
        if ready.wait_for(|r| *r).await.is_err() {
            return;
        }
        let mut failures = 0u32;
        loop {
            match stream(&node, &link, &xds, &metrics).await {
                Err(e) if e.code() == tonic::Code::Unimplemented => {
                    tracing::info!("control plane has no load reporting; not reporting load");
                    return;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::debug!(error = %e, "load reporting stream ended; reconnecting");
                }
                Ok(()) => failures = 0,
            }
            let wait = Duration::from_millis(200)
                .saturating_mul(1 << failures.min(6))
                .min(Duration::from_secs(10));
            tokio::time::sleep(wait.mul_f64(0.5 + rand::random::<f64>() * 0.5)).await;
        }
    })
}

async fn stream(
    node: &weft_proto::envoy::envoy::config::core::v3::Node,
    link: &ControlPlaneLink,
    xds: &XdsHandle,
    metrics: &crate::admin::Metrics,
) -> Result<(), tonic::Status> {
    let channel = link
        .channel(true)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, rx) = mpsc::channel(4);
    let hello = LoadStatsRequest {
        node: Some(node.clone()),
        cluster_stats: Vec::new(),
    };
    tx.send(hello)
        .await
        .map_err(|_| tonic::Status::internal("report queue closed"))?;
    let mut responses = LoadReportingServiceClient::new(channel)
        .stream_load_stats(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let Some(first) = responses.message().await? else {
        return Ok(());
    };
    let mut ask = Ask {
        interval: first
            .load_reporting_interval
            .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(10))
            .max(Duration::from_millis(100)),
        all: first.send_all_clusters,
        clusters: first.clusters,
    };
    let mut since = Instant::now();
    let mut tick = tokio::time::interval(ask.interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let cluster_stats = report(xds, &ask, since);
                since = Instant::now();
                if tx.send(LoadStatsRequest { node: None, cluster_stats }).await.is_err() {
                    return Ok(());
                }
                metrics.load_reports.inc();
            }
            next = responses.message() => match next? {
                // The control plane may change what it asks for at any time.
                Some(r) => {
                    ask.all = r.send_all_clusters;
                    ask.clusters = r.clusters;
                }
                None => return Ok(()),
            },
        }
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
