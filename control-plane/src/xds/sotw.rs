//! State-of-the-world ADS: every response of a type carries the whole subscribed set.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;
use tonic::{Status, Streaming};
use weft_proto::envoy::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use super::registry::{NodeInfo, lock, now_ms};
use super::view::{Changes, TYPES, View, type_index};
use super::{
    ConnectedGuard, Shared, Subscription, legacy_wildcard_type, nack_detail, unknown_type,
};
use crate::metrics::type_label;

#[derive(Default)]
struct TypeState {
    sub: Option<Subscription>,
    nonce: String,
}

type Tx = mpsc::Sender<Result<DiscoveryResponse, Status>>;

pub(super) async fn run(
    shared: Arc<Shared>,
    mut requests: Streaming<DiscoveryRequest>,
    tx: Tx,
    peer: Option<SocketAddr>,
) {
    let first = match requests.message().await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(?peer, error = %e, "ADS stream failed before its first request");
            return;
        }
    };
    let Some(node) = first.node.as_ref() else {
        shared
            .metrics
            .request_errors
            .get_or_create(&vec![("reason".into(), "no_node".into())])
            .inc();
        let _ = tx
            .send(Err(Status::invalid_argument(
                "the first DiscoveryRequest of a stream must carry node",
            )))
            .await;
        return;
    };
    let info = NodeInfo::from_node(node);
    let span = tracing::info_span!("ads", node = %info.id, protocol = "sotw");
    let _enter = span.enter();
    tracing::info!(?peer, namespace = %info.namespace, "proxy connected");
    drop(_enter);
    let registration = shared.registry.register(info.clone(), "sotw");
    let _connected = ConnectedGuard::new(shared.metrics.clone());
    let mut translations = shared.translations.clone();
    let mut view = View::new(info.place.clone());
    let t = translations.borrow_and_update().clone();
    view.update(&t);
    let mut stream = Stream {
        shared: &shared,
        view,
        types: Default::default(),
        nonce: 0,
        tx: &tx,
        record: &registration.record,
    };
    let mut next = Some(first);
    loop {
        let req = match next.take() {
            Some(r) => r,
            None => tokio::select! {
                msg = requests.message() => match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(node = %info.id, error = %e, "ADS stream ended");
                        break;
                    }
                },
                changed = translations.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let t = translations.borrow_and_update().clone();
                    let changes = stream.view.update(&t);
                    if stream.push_changes(&changes).await.is_err() {
                        break;
                    }
                    continue;
                }
            },
        };
        match stream.handle(req).await {
            Ok(()) => {}
            Err(Some(status)) => {
                let _ = tx.send(Err(status)).await;
                break;
            }
            Err(None) => break,
        }
    }
    tracing::info!(node = %info.id, "proxy disconnected");
}

struct Stream<'a> {
    shared: &'a Shared,
    view: View,
    types: [TypeState; TYPES],
    nonce: u64,
    tx: &'a Tx,
    record: &'a super::registry::SharedRecord,
}

impl Stream<'_> {
    /// Handles one request. `Err(Some)` ends the stream with a status, `Err(None)` quietly.
    async fn handle(&mut self, req: DiscoveryRequest) -> Result<(), Option<Status>> {
        let Some(ti) = type_index(&req.type_url) else {
            self.shared
                .metrics
                .request_errors
                .get_or_create(&vec![("reason".into(), "unknown_type".into())])
                .inc();
            return Err(Some(unknown_type(&req.type_url)));
        };
        let st = &mut self.types[ti];
        if !req.response_nonce.is_empty() {
            if req.response_nonce != st.nonce {
                // Stale: an answer to a response the client has not seen the successor of yet.
                return Ok(());
            }
            let mut rec = lock(self.record);
            let node = rec.node.id.clone();
            let t = &mut rec.types[ti];
            if let Some(err) = &req.error_detail {
                let detail = nack_detail(err);
                tracing::warn!(node = %node, type_url = %req.type_url, nonce = %req.response_nonce, %detail, "NACK");
                t.nack = Some(detail);
                self.shared
                    .metrics
                    .nacks
                    .get_or_create(&type_label(&req.type_url))
                    .inc();
            } else {
                t.acked_version = req.version_info.clone();
                t.last_ack_ms = now_ms();
                t.nack = None;
                self.shared
                    .metrics
                    .acks
                    .get_or_create(&type_label(&req.type_url))
                    .inc();
            }
        }
        let wildcard = req.resource_names.iter().any(|n| n == "*")
            || (req.resource_names.is_empty() && legacy_wildcard_type(&req.type_url));
        let sub = Subscription {
            wildcard,
            names: req
                .resource_names
                .iter()
                .filter(|n| *n != "*")
                .cloned()
                .collect(),
        };
        let changed = st.sub.as_ref() != Some(&sub);
        st.sub = Some(sub);
        if req.response_nonce.is_empty() || changed {
            self.send(ti).await.map_err(|_| None)?;
        }
        Ok(())
    }

    async fn push_changes(&mut self, changes: &[Changes; TYPES]) -> Result<(), ()> {
        for (ti, c) in changes.iter().enumerate() {
            let affected = match &self.types[ti].sub {
                Some(s) if s.wildcard => !c.is_empty(),
                Some(s) => c
                    .upserted
                    .iter()
                    .chain(&c.removed)
                    .any(|n| s.names.contains(n)),
                None => false,
            };
            if affected {
                self.send(ti).await?;
            }
        }
        Ok(())
    }

    async fn send(&mut self, ti: usize) -> Result<(), ()> {
        let type_url = weft_proto::type_url::ALL[ti];
        let Some(sub) = &self.types[ti].sub else {
            return Ok(());
        };
        let held: std::collections::BTreeMap<_, _> = self.view.resources[ti]
            .iter()
            .filter(|(n, _)| sub.wants(n))
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect();
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let version = self.view.version.to_string();
        let resp = DiscoveryResponse {
            version_info: version.clone(),
            resources: held.values().map(|r| r.any.clone()).collect(),
            type_url: type_url.to_string(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        self.types[ti].nonce = nonce.clone();
        {
            let mut rec = lock(self.record);
            let t = &mut rec.types[ti];
            t.sent = true;
            t.sent_version = version;
            t.sent_nonce = nonce;
            t.resources = held;
        }
        self.shared
            .metrics
            .pushes
            .get_or_create(&type_label(type_url))
            .inc();
        self.tx.send(Ok(resp)).await.map_err(|_| ())
    }
}
