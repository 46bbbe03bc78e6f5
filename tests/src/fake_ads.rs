//! A fake ADS server (delta xDS) for the sidecar's xDS client: the test pushes responses and
//! reads every request the client sends — subscriptions, ACKs and NACKs with their messages —
//! so the client's refusal paths are tested directly, with no control plane deciding what to
//! send. One stream at a time: a second stream while one is open is refused (UNAVAILABLE).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weft_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use weft_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};

type BoxStream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// The server half, shared with the tonic service.
struct Service {
    /// Responses for the open stream; taken by the stream that opens.
    responses: Mutex<Option<mpsc::Receiver<Result<DeltaDiscoveryResponse, Status>>>>,
    /// Where each request of the open stream goes.
    requests: mpsc::UnboundedSender<DeltaDiscoveryRequest>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unavailable(
            "the fake ADS server speaks delta xDS only",
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let responses = self
            .responses
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .take()
            .ok_or_else(|| Status::unavailable("the fake ADS server serves one stream"))?;
        let mut inbound = request.into_inner();
        let requests = self.requests.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                if requests.send(r).is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(responses))))
    }
}

/// A running fake ADS server on loopback; dropping it stops it.
pub struct FakeAds {
    /// Where it listens (plaintext gRPC).
    pub addr: SocketAddr,
    push: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    requests: tokio::sync::Mutex<mpsc::UnboundedReceiver<DeltaDiscoveryRequest>>,
    nonce: std::sync::atomic::AtomicU64,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeAds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A resource for [`FakeAds::push`]: its name and the message.
pub fn resource<M: Message + prost::Name>(name: &str, m: &M) -> Resource {
    Resource {
        name: name.into(),
        version: "1".into(),
        resource: Some(weft_proto::resources::any(m)),
        ..Default::default()
    }
}

impl FakeAds {
    /// Starts the server on 127.0.0.1, port 0.
    pub async fn start() -> std::io::Result<FakeAds> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (push, responses) = mpsc::channel(16);
        let (requests_tx, requests) = mpsc::unbounded_channel();
        let service = Service {
            responses: Mutex::new(Some(responses)),
            requests: requests_tx,
        };
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(service))
                .serve_with_incoming(incoming)
                .await;
        });
        Ok(FakeAds {
            addr,
            push,
            requests: tokio::sync::Mutex::new(requests),
            nonce: std::sync::atomic::AtomicU64::new(0),
            task,
        })
    }

    /// Sends one response of `type_url` (`removed`: names it deletes); returns its nonce.
    pub async fn push(&self, type_url: &str, resources: Vec<Resource>, removed: &[&str]) -> String {
        let n = self
            .nonce
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let nonce = format!("nonce-{n}");
        let response = DeltaDiscoveryResponse {
            system_version_info: format!("v{n}"),
            type_url: type_url.into(),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        // The stream may not be open yet: the channel holds the response until it is.
        let _ = self.push.send(Ok(response)).await;
        nonce
    }

    /// The next request of `type_url`, within `patience`.
    pub async fn next(&self, type_url: &str, patience: Duration) -> Option<DeltaDiscoveryRequest> {
        let mut requests = self.requests.lock().await;
        tokio::time::timeout(patience, async {
            while let Some(r) = requests.recv().await {
                if r.type_url == type_url {
                    return Some(r);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }

    /// How the client answered the response `nonce`: `Ok(())` for an ACK, `Err(message)` for a
    /// NACK; `None` when no answer came within `patience`.
    pub async fn answer(
        &self,
        type_url: &str,
        nonce: &str,
        patience: Duration,
    ) -> Option<Result<(), String>> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let r = self.next(type_url, left).await?;
            if r.response_nonce == nonce {
                return Some(match r.error_detail {
                    Some(s) => Err(s.message),
                    None => Ok(()),
                });
            }
        }
    }
}
