//! Load reporting (LRS, `envoy.service.load_stats.v3.LoadReportingService`): sidecars stream
//! per-cluster, per-locality request counts (and Weft's latency histogram, see
//! `weft_proto::load`) every interval the server asks for; the control plane adds them up
//! across proxies in a [`LoadStore`] — what rollouts judge canaries by.
//!
//! Protocol: the client's first message carries its node; the server answers once with the
//! clusters to report (here: all of them) and the interval; every later client message holds
//! the load since its previous one.
//!
//! A report counts only as what its reporter could have seen: it must come over the TLS
//! port from a proxy with an xDS stream under the same identity and node id, and only for
//! clusters that stream was sent; zones per cluster are capped. Everything else is dropped
//! and counted (`weft_lrs_dropped_total`), so a workload certificate alone cannot steer a
//! rollout nor grow memory and metric series with made-up names.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weft_proto::envoy::envoy::config::endpoint::v3::ClusterStats;
use weft_proto::envoy::envoy::service::load_stats::v3::{
    LoadStatsRequest, LoadStatsResponse, load_reporting_service_server::LoadReportingService,
};
use weft_proto::load::{BUCKETS, bucket_of};

use crate::metrics::Metrics;

/// Request counts and latency of one cluster (or one locality of it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LoadCounts {
    /// Requests sent.
    pub issued: u64,
    /// Requests answered without a 5xx.
    pub succeeded: u64,
    /// Requests that failed (5xx, reset, timeout, no connection).
    pub errored: u64,
    /// Requests in progress at the last reports (summed over proxies).
    pub in_progress: u64,
    /// Finished requests per latency bucket (`weft_proto::load`).
    pub latency: [u64; BUCKETS],
}

impl LoadCounts {
    /// Adds `o` (saturating: reports are the reporters' numbers, and a huge one must not
    /// wrap the sums or panic).
    fn add(&mut self, o: &LoadCounts) {
        self.issued = self.issued.saturating_add(o.issued);
        self.succeeded = self.succeeded.saturating_add(o.succeeded);
        self.errored = self.errored.saturating_add(o.errored);
        for (a, b) in self.latency.iter_mut().zip(o.latency) {
            *a = a.saturating_add(b);
        }
    }

    /// What happened since `base` (an earlier snapshot of the same counters).
    pub fn since(&self, base: &LoadCounts) -> LoadCounts {
        let mut latency = [0; BUCKETS];
        for (i, l) in latency.iter_mut().enumerate() {
            *l = self.latency[i].saturating_sub(base.latency[i]);
        }
        LoadCounts {
            issued: self.issued.saturating_sub(base.issued),
            succeeded: self.succeeded.saturating_sub(base.succeeded),
            errored: self.errored.saturating_sub(base.errored),
            in_progress: self.in_progress,
            latency,
        }
    }

    /// Finished requests.
    pub fn finished(&self) -> u64 {
        self.succeeded.saturating_add(self.errored)
    }

    /// Share of finished requests that succeeded (`None` before any finished).
    pub fn success_rate(&self) -> Option<f64> {
        let n = self.finished();
        (n > 0).then(|| self.succeeded as f64 / n as f64)
    }

    /// The 99th percentile latency (bucket bound).
    pub fn p99(&self) -> Option<Duration> {
        weft_proto::load::quantile(&self.latency, 0.99)
    }

    fn from_locality(
        s: &weft_proto::envoy::envoy::config::endpoint::v3::UpstreamLocalityStats,
    ) -> Self {
        let mut latency = [0; BUCKETS];
        for m in &s.load_metric_stats {
            if let Some(i) = bucket_of(&m.metric_name) {
                latency[i] += m.num_requests_finished_with_metric;
            }
        }
        LoadCounts {
            issued: s.total_issued_requests,
            succeeded: s.total_successful_requests,
            errored: s.total_error_requests,
            in_progress: s.total_requests_in_progress,
            latency,
        }
    }
}

/// Everything reported about one cluster since the control plane started.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClusterLoad {
    /// Over every locality.
    pub total: LoadCounts,
    /// Per zone of the upstream endpoints ("" when unknown).
    pub by_zone: BTreeMap<String, LoadCounts>,
}

/// Most zones kept per cluster; stats for more are dropped.
pub const MAX_ZONES_PER_CLUSTER: usize = 64;

/// The load reported by every proxy, added up per cluster.
#[derive(Default)]
pub struct LoadStore {
    clusters: Mutex<HashMap<String, ClusterLoad>>,
}

impl LoadStore {
    /// Adds one proxy's report, for the clusters `in_view` accepts (the others are dropped
    /// and counted).
    pub fn record(
        &self,
        stats: &[ClusterStats],
        metrics: &Metrics,
        in_view: &dyn Fn(&str) -> bool,
    ) {
        let dropped = |reason: &str| {
            metrics
                .lrs_dropped
                .get_or_create(&vec![("reason".into(), reason.into())])
                .inc();
        };
        let mut clusters = crate::lock(&self.clusters);
        for c in stats {
            if !in_view(&c.cluster_name) {
                dropped("not_in_view");
                continue;
            }
            let entry = clusters.entry(c.cluster_name.clone()).or_default();
            let mut in_progress = 0;
            for l in &c.upstream_locality_stats {
                let counts = LoadCounts::from_locality(l);
                let zone = l
                    .locality
                    .as_ref()
                    .map(|l| l.zone.clone())
                    .unwrap_or_default();
                if !entry.by_zone.contains_key(&zone)
                    && (entry.by_zone.len() >= MAX_ZONES_PER_CLUSTER || zone.len() > 63)
                {
                    dropped("too_many_zones");
                    continue;
                }
                in_progress = u64::saturating_add(in_progress, counts.in_progress);
                entry.by_zone.entry(zone).or_default().add(&counts);
                entry.total.add(&counts);
                metrics.observe_load(&c.cluster_name, counts.succeeded, counts.errored);
            }
            entry.total.in_progress = in_progress;
        }
    }

    /// What has been reported about `cluster` so far (zero when nothing).
    pub fn cluster(&self, cluster: &str) -> LoadCounts {
        let clusters = crate::lock(&self.clusters);
        clusters
            .get(cluster)
            .map(|c| c.total.clone())
            .unwrap_or_default()
    }

    /// The sum over `clusters`.
    pub fn sum(&self, clusters: &[String]) -> LoadCounts {
        let mut out = LoadCounts::default();
        for c in clusters {
            out.add(&self.cluster(c));
        }
        out
    }

    /// Every cluster's load (for the admin view).
    pub fn all(&self) -> BTreeMap<String, ClusterLoad> {
        let clusters = crate::lock(&self.clusters);
        clusters
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// The LRS server.
#[derive(Clone)]
pub struct LrsServer {
    store: Arc<LoadStore>,
    interval: Duration,
    metrics: Arc<Metrics>,
    registry: Arc<crate::xds::registry::Registry>,
}

impl LrsServer {
    /// A server asking for reports every `interval`, adding to `store` what each reporter's
    /// xDS stream in `registry` was sent.
    pub fn new(
        store: Arc<LoadStore>,
        interval: Duration,
        metrics: Arc<Metrics>,
        registry: Arc<crate::xds::registry::Registry>,
    ) -> Self {
        LrsServer {
            store,
            interval,
            metrics,
            registry,
        }
    }

    /// Records `stats` from node `node` proven as `caller`: only clusters its own xDS
    /// stream holds.
    fn record(&self, node: &str, caller: Option<&weft_proto::SpiffeId>, stats: &[ClusterStats]) {
        if stats.is_empty() {
            return;
        }
        let Some(record) = caller.and_then(|id| self.registry.find_opened_by(node, id)) else {
            tracing::debug!(%node, ?caller, "load report dropped: no xDS stream of this node with this identity");
            self.metrics
                .lrs_dropped
                .get_or_create(&vec![("reason".into(), "no_xds_stream".into())])
                .inc_by(stats.len() as u64);
            return;
        };
        let record = crate::xds::registry::lock(&record);
        self.store.record(stats, &self.metrics, &|c: &str| {
            record.holds(crate::xds::view::CDS, c)
        });
    }
}

type ResponseStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<LoadStatsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl LoadReportingService for LrsServer {
    type StreamLoadStatsStream = ResponseStream;

    async fn stream_load_stats(
        &self,
        request: Request<Streaming<LoadStatsRequest>>,
    ) -> Result<Response<Self::StreamLoadStatsStream>, Status> {
        let caller = crate::grpc_tls::peer_identity(&request);
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(1);
        let this = self.clone();
        tokio::spawn(async move {
            let first = match incoming.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "LRS stream ended before its first message");
                    return;
                }
            };
            let Some(node) = first.node else {
                let _ = tx
                    .send(Err(Status::invalid_argument(
                        "the first LoadStatsRequest must carry the node",
                    )))
                    .await;
                return;
            };
            let interval = weft_proto::envoy::google::protobuf::Duration {
                seconds: this.interval.as_secs() as i64,
                nanos: this.interval.subsec_nanos() as i32,
            };
            let hello = LoadStatsResponse {
                send_all_clusters: true,
                load_reporting_interval: Some(interval),
                ..Default::default()
            };
            if tx.send(Ok(hello)).await.is_err() {
                return;
            }
            this.record(&node.id, caller.as_ref(), &first.cluster_stats);
            loop {
                match incoming.message().await {
                    Ok(Some(report)) => {
                        this.metrics.lrs_reports.inc();
                        this.record(&node.id, caller.as_ref(), &report.cluster_stats);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(node = %node.id, error = %e, "LRS stream ended");
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::envoy::envoy::config::core::v3::Locality;
    use weft_proto::envoy::envoy::config::endpoint::v3::{
        EndpointLoadMetricStats, UpstreamLocalityStats,
    };

    fn report(cluster: &str, zone: &str, ok: u64, err: u64, slow: u64) -> ClusterStats {
        ClusterStats {
            cluster_name: cluster.into(),
            upstream_locality_stats: vec![UpstreamLocalityStats {
                locality: Some(Locality {
                    zone: zone.into(),
                    ..Default::default()
                }),
                total_issued_requests: ok + err,
                total_successful_requests: ok,
                total_error_requests: err,
                load_metric_stats: vec![
                    EndpointLoadMetricStats {
                        metric_name: weft_proto::load::bucket_name(1),
                        num_requests_finished_with_metric: ok + err - slow,
                        total_metric_value: 0.0,
                    },
                    EndpointLoadMetricStats {
                        metric_name: weft_proto::load::bucket_name(9),
                        num_requests_finished_with_metric: slow,
                        total_metric_value: 0.0,
                    },
                    EndpointLoadMetricStats {
                        metric_name: "cpu".into(),
                        num_requests_finished_with_metric: 7,
                        total_metric_value: 1.0,
                    },
                ],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn reports_add_up_across_proxies_and_windows_diff() {
        let store = LoadStore::default();
        let m = Metrics::new();
        let all = |_: &str| true;
        store.record(&[report("c", "a", 90, 0, 0)], &m, &all);
        let base = store.cluster("c");
        store.record(
            &[report("c", "a", 50, 0, 1), report("d", "a", 1, 0, 0)],
            &m,
            &all,
        );
        store.record(&[report("c", "b", 48, 2, 1)], &m, &all);
        let c = store.cluster("c");
        assert_eq!((c.issued, c.succeeded, c.errored), (190, 188, 2));
        let w = c.since(&base);
        assert_eq!((w.issued, w.succeeded, w.errored), (100, 98, 2));
        assert_eq!(w.success_rate(), Some(0.98));
        assert_eq!(
            w.p99(),
            Some(Duration::from_millis(1000)),
            "2 of 100 took ≤ 1 s"
        );
        assert_eq!(store.all()["c"].by_zone.len(), 2);
        assert_eq!(store.sum(&["c".into(), "d".into()]).issued, 191);
        assert_eq!(store.cluster("none"), LoadCounts::default());
    }

    #[test]
    fn clusters_outside_the_view_and_zones_past_the_cap_are_dropped() {
        let store = LoadStore::default();
        let m = Metrics::new();
        let view = |c: &str| c == "mine";
        store.record(
            &[
                report("mine", "a", 5, 0, 0),
                report("canary", "a", 0, 100, 0),
            ],
            &m,
            &view,
        );
        assert_eq!(store.cluster("mine").issued, 5);
        assert_eq!(
            store.cluster("canary"),
            LoadCounts::default(),
            "not in the reporter's view"
        );
        for z in 0..MAX_ZONES_PER_CLUSTER + 10 {
            store.record(&[report("mine", &format!("z{z}"), 1, 0, 0)], &m, &view);
        }
        assert_eq!(store.all()["mine"].by_zone.len(), MAX_ZONES_PER_CLUSTER);
        // Numbers a reporter made up saturate rather than wrap or panic.
        let huge = report("mine", "a", u64::MAX / 2 + 1, u64::MAX / 2, 0);
        store.record(&[huge.clone(), huge], &m, &view);
        let c = store.cluster("mine");
        assert_eq!((c.succeeded, c.finished()), (u64::MAX, u64::MAX));
        assert!(c.p99().is_some());
        let page = m.render();
        assert!(
            page.contains("weft_lrs_dropped_total{reason=\"not_in_view\"} 1"),
            "{page}"
        );
        assert!(
            page.contains("weft_lrs_dropped_total{reason=\"too_many_zones\"} 11"),
            "{page}"
        );
    }
}
