//! Delta (incremental) ADS: responses carry only the resources that changed and the names
//! that went away, against what the client is known to hold.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;
use tonic::{Status, Streaming};
use weft_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};

use super::registry::{NodeInfo, lock, now_ms};
use super::view::{Changes, TYPES, View, type_index};
use super::{
    ConnectedGuard, Shared, Subscription, legacy_wildcard_type, nack_detail, unknown_type,
};
use crate::metrics::type_label;

#[derive(Default)]
struct TypeState {
    sub: Option<Subscription>,
    /// Name -> version the client holds.
    known: HashMap<String, String>,
    nonce: String,
}

type Tx = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

pub(super) async fn run(
    shared: Arc<Shared>,
    mut requests: Streaming<DeltaDiscoveryRequest>,
    tx: Tx,
    peer: Option<SocketAddr>,
) {
    let first = match requests.message().await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(?peer, error = %e, "delta ADS stream failed before its first request");
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
                "the first DeltaDiscoveryRequest of a stream must carry node",
            )))
            .await;
        return;
    };
    let info = NodeInfo::from_node(node);
    tracing::info!(node = %info.id, ?peer, namespace = %info.namespace, protocol = "delta", "proxy connected");
    let registration = shared.registry.register(info.clone(), "delta");
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
                        tracing::debug!(node = %info.id, error = %e, "delta ADS stream ended");
                        break;
                    }
                },
                changed = translations.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let t = translations.borrow_and_update().clone();
                    let changes = stream.view.update(&t);
                    if stream.push_changes(changes).await.is_err() {
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
    async fn handle(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Option<Status>> {
        let Some(ti) = type_index(&req.type_url) else {
            self.shared
                .metrics
                .request_errors
                .get_or_create(&vec![("reason".into(), "unknown_type".into())])
                .inc();
            return Err(Some(unknown_type(&req.type_url)));
        };
        let st = &mut self.types[ti];
        if !req.response_nonce.is_empty() && req.response_nonce == st.nonce {
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
                t.acked_version = t.sent_version.clone();
                t.last_ack_ms = now_ms();
                t.nack = None;
                self.shared
                    .metrics
                    .acks
                    .get_or_create(&type_label(&req.type_url))
                    .inc();
            }
        }
        let first = st.sub.is_none();
        let sub = st.sub.get_or_insert_with(|| Subscription {
            wildcard: req.resource_names_subscribe.is_empty()
                && legacy_wildcard_type(&req.type_url),
            names: BTreeSet::new(),
        });
        if first {
            st.known = req.initial_resource_versions.clone().into_iter().collect();
        }
        let mut added = Vec::new();
        for n in &req.resource_names_subscribe {
            if n == "*" {
                sub.wildcard = true;
                added.extend(self.view.resources[ti].keys().cloned());
            } else if sub.names.insert(n.clone()) || first {
                added.push(n.clone());
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                sub.wildcard = false;
            } else {
                sub.names.remove(n);
            }
            if !sub.wants(n) {
                st.known.remove(n);
            }
        }
        if !sub.wildcard {
            let sub = sub.clone();
            st.known.retain(|n, _| sub.wants(n));
        }
        if first {
            added.extend(self.view.resources[ti].keys().cloned());
            // Anything the client says it holds that no longer exists is removed.
            let gone: Vec<String> = st
                .known
                .keys()
                .filter(|n| !self.view.resources[ti].contains_key(*n))
                .cloned()
                .collect();
            self.send(ti, added, gone, true).await.map_err(|_| None)?;
        } else if !added.is_empty() {
            self.send(ti, added, Vec::new(), false)
                .await
                .map_err(|_| None)?;
        }
        Ok(())
    }

    async fn push_changes(&mut self, changes: [Changes; TYPES]) -> Result<(), ()> {
        for (ti, c) in changes.into_iter().enumerate() {
            if self.types[ti].sub.is_some() && !c.is_empty() {
                self.send(
                    ti,
                    c.upserted.into_iter().collect(),
                    c.removed.into_iter().collect(),
                    false,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Sends the `candidates` the client wants and lacks, and the `removed` names it holds.
    async fn send(
        &mut self,
        ti: usize,
        candidates: Vec<String>,
        removed: Vec<String>,
        always: bool,
    ) -> Result<(), ()> {
        let type_url = weft_proto::type_url::ALL[ti];
        let st = &mut self.types[ti];
        let Some(sub) = &st.sub else {
            return Ok(());
        };
        let mut resources = Vec::new();
        let mut sent = Vec::new();
        for name in candidates {
            if !sub.wants(&name) {
                continue;
            }
            let Some(r) = self.view.resources[ti].get(&name) else {
                continue;
            };
            if st.known.get(&name) == Some(&r.version) {
                continue;
            }
            resources.push(Resource {
                name: name.clone(),
                version: r.version.clone(),
                resource: Some(r.any.clone()),
                ..Default::default()
            });
            st.known.insert(name.clone(), r.version.clone());
            sent.push(r.clone());
        }
        let removed: Vec<String> = removed
            .into_iter()
            .filter(|n| st.known.remove(n).is_some())
            .collect();
        if resources.is_empty() && removed.is_empty() && !always {
            return Ok(());
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let version = self.view.version.to_string();
        st.nonce = nonce.clone();
        {
            let mut rec = lock(self.record);
            let t = &mut rec.types[ti];
            t.sent = true;
            t.sent_version = version.clone();
            t.sent_nonce = nonce.clone();
            for r in sent {
                t.resources.insert(r.name.clone(), r);
            }
            for n in &removed {
                t.resources.remove(n);
            }
        }
        self.shared
            .metrics
            .pushes
            .get_or_create(&type_label(type_url))
            .inc();
        let resp = DeltaDiscoveryResponse {
            system_version_info: version,
            resources,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        };
        self.tx.send(Ok(resp)).await.map_err(|_| ())
    }
}
