//! Load reporting (LRS, `envoy.service.load_stats.v3`): the sidecar counts, per cluster and
//! locality (the upstream endpoint's zone), the attempts it issued, how they ended, how many
//! are in progress and how long they took (Weft's latency histogram, `weft_proto::load`), and
//! streams those counts to the control plane at the interval the control plane asks for.
//!
//! Counting is lock-free on the request path (atomics in a [`crate::load::LocalityLoad`] each endpoint
//! points at); a report takes the counts since the previous one (`swap`), so nothing is counted
//! twice and nothing is lost between reports. A control plane without LRS (UNIMPLEMENTED) is
//! left alone; other failures reconnect with backoff (unsent counts go in the next report).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_proto::envoy::envoy::config::endpoint::v3::{ClusterStats, UpstreamLocalityStats};
use weft_proto::envoy::envoy::service::load_stats::v3::LoadStatsRequest;
use weft_proto::envoy::envoy::service::load_stats::v3::load_reporting_service_client::LoadReportingServiceClient;

use crate::identity::ControlPlaneLink;
use crate::xds::XdsHandle;

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
    metrics: Arc<crate::metrics::Metrics>,
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
    metrics: &crate::metrics::Metrics,
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
