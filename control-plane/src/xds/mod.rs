//! The ADS server: Envoy xDS v3 over one gRPC stream per proxy, state-of-the-world and delta.
//!
//! Protocol rules followed here (xDS REST/gRPC protocol, "ACK and NACK semantics"):
//! - a request whose `response_nonce` is not the last nonce sent for its type is stale and
//!   ignored;
//! - a request carrying the last nonce is an ACK (no `error_detail`) or a NACK (with one); either
//!   way it is recorded and never answered with the same resources again, so a client and this
//!   server can never ping-pong;
//! - a response is sent when the subscription changes or when what this proxy should hold
//!   changed, and only for the types (delta: only the resources) that changed.
//!
//! Unknown type URLs and malformed requests end the stream with `INVALID_ARGUMENT`.

pub mod registry;
pub mod view;

mod delta;
mod sotw;
mod stream;

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weft_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    aggregated_discovery_service_server::AggregatedDiscoveryService,
};

use crate::metrics::Metrics;
use crate::translate::Translation;
use registry::Registry;

/// What every stream shares.
pub struct Shared {
    /// The latest translation.
    pub translations: watch::Receiver<Arc<Translation>>,
    /// Connected proxies.
    pub registry: Arc<Registry>,
    /// Per-place snapshots, shared by streams.
    pub snapshots: Arc<view::SnapshotCache>,
    /// The global push gate: how many large responses may be in flight at once.
    pub push_gate: Arc<tokio::sync::Semaphore>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Streams end after about this long (±10 %), so proxies re-spread over replicas.
    pub max_stream_age: Option<std::time::Duration>,
}

/// The ADS service.
#[derive(Clone)]
pub struct AdsServer {
    shared: Arc<Shared>,
}

impl AdsServer {
    /// A server over shared state.
    pub fn new(shared: Arc<Shared>) -> Self {
        AdsServer { shared }
    }
}

/// A resource subscription of one type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subscription {
    /// Every resource of the type.
    pub wildcard: bool,
    /// Named resources.
    pub names: BTreeSet<String>,
}

impl Subscription {
    /// Whether the subscription covers `name`.
    pub fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

/// Only LDS and CDS may be wildcards when no name is given (legacy wildcard semantics).
pub(crate) fn legacy_wildcard_type(type_url: &str) -> bool {
    type_url == weft_proto::type_url::LISTENER || type_url == weft_proto::type_url::CLUSTER
}

type BoxStream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// Depth of a stream's response queue: a slow proxy blocks only its own stream task.
const RESPONSE_QUEUE: usize = 1;
/// Default size of the global push gate.
pub const PUSH_GATE: usize = 32;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let shared = self.shared.clone();
        let peer = request.remote_addr();
        let identity = crate::grpc_tls::peer_identity(&request);
        tokio::spawn(stream::run(
            sotw::Sotw::default(),
            shared,
            request.into_inner(),
            tx,
            peer,
            identity,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let shared = self.shared.clone();
        let peer = request.remote_addr();
        let identity = crate::grpc_tls::peer_identity(&request);
        tokio::spawn(stream::run(
            delta::Delta::default(),
            shared,
            request.into_inner(),
            tx,
            peer,
            identity,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Decrements the connected-proxies gauge when a stream ends.
pub(crate) struct ConnectedGuard(Arc<Metrics>);

impl ConnectedGuard {
    pub(crate) fn new(m: Arc<Metrics>) -> Self {
        m.connected_proxies.inc();
        ConnectedGuard(m)
    }
}

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        self.0.connected_proxies.dec();
    }
}

/// The error for a type URL this server does not serve.
pub(crate) fn unknown_type(type_url: &str) -> Status {
    Status::invalid_argument(format!(
        "unknown type_url {type_url:?}: this server serves {}",
        weft_proto::type_url::ALL.join(", ")
    ))
}

/// Formats a NACK's error detail for the record.
pub(crate) fn nack_detail(err: &weft_proto::envoy::google::rpc::Status) -> String {
    if err.code == 0 {
        err.message.clone()
    } else {
        format!("{} (code {})", err.message, err.code)
    }
}
