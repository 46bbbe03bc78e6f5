//! Delta (incremental) ADS: responses carry only the resources that changed and the names
//! that went away, against what the client holds.
//!
//! For a wildcard subscription the client holds exactly the stream's current snapshot of the
//! type (every change is sent), so nothing per resource is stored per proxy; named
//! subscriptions keep the versions the client holds of the names it asked for.

use std::collections::{BTreeMap, BTreeSet};

use tonic::Status;
use weft_proto::envoy::envoy::config::core::v3::Node;
use weft_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};

use super::registry::{lock, now_ms};
use super::stream::{Ctx, Protocol};
use super::view::{AllChanges, TYPES, type_index};
use super::{Subscription, legacy_wildcard_type, nack_detail, unknown_type};
use crate::metrics::type_label;

/// Per-stream delta state.
#[derive(Default)]
pub(crate) struct Delta {
    types: [TypeState; TYPES],
}

#[derive(Default)]
struct TypeState {
    sub: Option<Subscription>,
    /// Name -> version the client holds, for names outside a wildcard.
    known: BTreeMap<String, String>,
    nonce: String,
}

type C<'a> = Ctx<'a, DeltaDiscoveryResponse>;

impl Protocol for Delta {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    const NAME: &'static str = "delta";

    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    async fn handle(&mut self, ctx: &mut C<'_>, req: DeltaDiscoveryRequest) -> Result<(), Option<Status>> {
        let Some(ti) = type_index(&req.type_url) else {
            ctx.refused("unknown_type");
            return Err(Some(unknown_type(&req.type_url)));
        };
        let st = &mut self.types[ti];
        if !req.response_nonce.is_empty() && req.response_nonce == st.nonce {
            let mut rec = lock(&ctx.reg.record);
            let t = &mut rec.types[ti];
            if let Some(err) = &req.error_detail {
                let detail = nack_detail(err);
                tracing::warn!(node = %ctx.node.id, type_url = %req.type_url, nonce = %req.response_nonce, %detail, "NACK");
                t.nack = Some(detail);
                ctx.shared.metrics.nacks.get_or_create(&type_label(&req.type_url)).inc();
            } else {
                t.acked_version = t.sent_version.clone();
                t.last_ack_ms = now_ms();
                t.nack = None;
                ctx.shared.metrics.acks.get_or_create(&type_label(&req.type_url)).inc();
            }
        }
        let snap = ctx.snapshot.clone();
        let held = &snap.resources[ti];
        let first = st.sub.is_none();
        if first {
            let mut sub = Subscription {
                wildcard: req.resource_names_subscribe.is_empty() && legacy_wildcard_type(&req.type_url),
                names: BTreeSet::new(),
            };
            for n in &req.resource_names_subscribe {
                if n == "*" {
                    sub.wildcard = true;
                } else {
                    sub.names.insert(n.clone());
                }
            }
            // What the client says it holds (a reconnect): send only what differs.
            let initial = &req.initial_resource_versions;
            let upserted: Vec<String> = held
                .iter()
                .filter(|(n, r)| sub.wants(n) && initial.get(*n) != Some(&r.version))
                .map(|(n, _)| n.clone())
                .collect();
            let removed: Vec<String> = initial.keys().filter(|n| !held.contains_key(*n)).cloned().collect();
            st.sub = Some(sub);
            return self.send(ctx, ti, upserted, removed, true).await.map_err(|_| None);
        }
        let Some(sub) = st.sub.as_mut() else {
            return Ok(());
        };
        let mut added = Vec::new();
        for n in &req.resource_names_subscribe {
            if n == "*" {
                if !sub.wildcard {
                    sub.wildcard = true;
                    added.extend(held.keys().filter(|k| !st.known.contains_key(*k)).cloned());
                }
            } else if sub.names.insert(n.clone()) && !sub.wildcard {
                added.push(n.clone());
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                if sub.wildcard {
                    sub.wildcard = false;
                    // The client keeps what it holds of the names it still subscribes to.
                    st.known = held
                        .iter()
                        .filter(|(k, _)| sub.names.contains(*k))
                        .map(|(k, r)| (k.clone(), r.version.clone()))
                        .collect();
                }
            } else {
                sub.names.remove(n);
                st.known.remove(n);
            }
        }
        if !added.is_empty() {
            self.send(ctx, ti, added, Vec::new(), false).await.map_err(|_| None)?;
        }
        Ok(())
    }

    async fn push(&mut self, ctx: &mut C<'_>, changes: &AllChanges) -> Result<(), ()> {
        for (ti, c) in changes.iter().enumerate() {
            if self.types[ti].sub.is_some() && !c.is_empty() {
                self.send(
                    ctx,
                    ti,
                    c.upserted.iter().cloned().collect(),
                    c.removed.iter().cloned().collect(),
                    false,
                )
                .await?;
            }
        }
        Ok(())
    }
}

impl Delta {
    /// Sends the `candidates` the client wants and lacks, and the `removed` names it held.
    async fn send(
        &mut self,
        ctx: &mut C<'_>,
        ti: usize,
        candidates: Vec<String>,
        removed: Vec<String>,
        always: bool,
    ) -> Result<(), ()> {
        let type_url = weft_proto::type_url::ALL[ti];
        let st = &mut self.types[ti];
        let Some(sub) = st.sub.clone() else {
            return Ok(());
        };
        let held = &ctx.snapshot.resources[ti];
        let mut resources = Vec::new();
        for name in candidates {
            if !sub.wants(&name) {
                continue;
            }
            let Some(r) = held.get(&name) else {
                continue;
            };
            if !sub.wildcard {
                if st.known.get(&name) == Some(&r.version) {
                    continue;
                }
                st.known.insert(name.clone(), r.version.clone());
            }
            resources.push(Resource {
                name,
                version: r.version.clone(),
                resource: Some(r.any.clone()),
                ..Default::default()
            });
        }
        let removed: Vec<String> = removed
            .into_iter()
            .filter(|n| sub.wildcard || st.known.remove(n).is_some() || sub.names.contains(n))
            .collect();
        if resources.is_empty() && removed.is_empty() && !always {
            return Ok(());
        }
        let nonce = ctx.next_nonce();
        let version = ctx.snapshot.version.to_string();
        st.nonce = nonce.clone();
        {
            let mut rec = lock(&ctx.reg.record);
            rec.snapshot = Some(ctx.snapshot.clone());
            let t = &mut rec.types[ti];
            t.sent = true;
            t.sent_version = version.clone();
            t.sent_nonce = nonce.clone();
            t.sub = Some(sub);
        }
        ctx.shared.metrics.pushes.get_or_create(&type_label(type_url)).inc();
        let resp = DeltaDiscoveryResponse {
            system_version_info: version,
            resources,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        };
        ctx.tx.send(Ok(resp)).await.map_err(|_| ())
    }
}
