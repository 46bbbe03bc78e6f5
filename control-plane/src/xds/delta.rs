//! Delta (incremental) ADS: responses carry only the resources that changed and the names
//! that went away, against what the client holds.
//!
//! For a wildcard subscription the client holds exactly the stream's current snapshot of the
//! type (every change is sent), so nothing per resource is stored per proxy; named
//! subscriptions keep the versions the client holds of the names it asked for.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use tonic::Status;
use weft_proto::envoy::envoy::config::core::v3::Node;
use weft_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};

use super::stream::{Ctx, LARGE, Protocol};
use super::view::{ADDR, AllChanges, TYPES, type_index};
use super::{Subscription, legacy_wildcard_type, unknown_type};

/// Address entries one stream may subscribe to at once (a sidecar keeps far fewer: see its
/// `MAX_ADDRESSES`).
const MAX_ADDRESSES: usize = 16_384;

/// Per-stream delta state.
#[derive(Default)]
pub(crate) struct Delta {
    types: [TypeState; TYPES],
    /// Large sends split into chunks of at most `LARGE` resources, sent one per loop turn
    /// through the global push gate.
    pending: VecDeque<Chunk>,
}

struct Chunk {
    ti: usize,
    work: Work,
    removed: Vec<String>,
    always: bool,
}

/// What a chunk sends.
enum Work {
    /// These names.
    Names(Vec<String>),
    /// The subscribed resources of the current snapshot after `after`, in name order, that the
    /// client does not already hold at the same version (`initial`). A cursor, not a list, so
    /// a proxy's initial sync costs no per-resource memory while it waits its turn.
    Scan {
        after: Option<String>,
        initial: std::sync::Arc<std::collections::HashMap<String, String>>,
    },
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

    fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    async fn pump(&mut self, ctx: &mut C<'_>) -> Result<(), ()> {
        match self.pending.pop_front() {
            Some(c) => self.send_now(ctx, c, true).await,
            None => Ok(()),
        }
    }

    async fn handle(
        &mut self,
        ctx: &mut C<'_>,
        req: DeltaDiscoveryRequest,
    ) -> Result<(), Option<Status>> {
        let Some(ti) = type_index(&req.type_url) else {
            ctx.refused("unknown_type");
            return Err(Some(unknown_type(&req.type_url)));
        };
        let st = &mut self.types[ti];
        if !req.response_nonce.is_empty() && req.response_nonce == st.nonce {
            // Delta ACKs carry no version: the one sent with this nonce is the one applied.
            ctx.record_answer(ti, &req.response_nonce, req.error_detail.as_ref(), None);
        }
        if ti == ADDR {
            return self.addresses(ctx, &req).await;
        }
        let snap = ctx.snapshot.clone();
        let held = &snap.resources[ti];
        let first = st.sub.is_none();
        if first {
            let mut sub = Subscription {
                wildcard: req.resource_names_subscribe.is_empty()
                    && legacy_wildcard_type(&req.type_url),
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
            let ns = &ctx.node.namespace;
            let absent = |n: &String| !held.get(n).is_some_and(|r| r.visible_from(ns));
            // What it holds that went away, and names it asks for that do not exist (delta's
            // way of saying so: a client waiting for one learns at once).
            let mut removed: Vec<String> = initial.keys().filter(|n| absent(n)).cloned().collect();
            removed.extend(sub.names.iter().filter(|n| absent(n)).cloned());
            removed.sort();
            removed.dedup();
            st.sub = Some(sub);
            self.pending.push_back(Chunk {
                ti,
                work: Work::Scan {
                    after: None,
                    initial: std::sync::Arc::new(initial.clone().into_iter().collect()),
                },
                removed,
                always: true,
            });
            return Ok(());
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
        if !req.resource_names_unsubscribe.is_empty() || !req.resource_names_subscribe.is_empty() {
            ctx.record_sub(ti, sub);
        }
        if !added.is_empty() {
            // A name that does not exist is answered as removed.
            let ns = &ctx.node.namespace;
            let absent: Vec<String> = added
                .iter()
                .filter(|n| !held.get(*n).is_some_and(|r| r.visible_from(ns)))
                .cloned()
                .collect();
            self.send(ctx, ti, added, absent, false)
                .await
                .map_err(|_| None)?;
        }
        Ok(())
    }

    async fn push(&mut self, ctx: &mut C<'_>, changes: &AllChanges) -> Result<(), ()> {
        // Address entries follow the translation, not a snapshot: each asked one again.
        if let Some(sub) = &self.types[ADDR].sub
            && !sub.names.is_empty()
        {
            let names = sub.names.iter().cloned().collect();
            self.send_addresses(ctx, names, false).await?;
        }
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
    /// Address entries are named only, and answered from the current translation: an
    /// address that is no meshed endpoint is answered as removed, so the client knows at once.
    async fn addresses(
        &mut self,
        ctx: &mut C<'_>,
        req: &DeltaDiscoveryRequest,
    ) -> Result<(), Option<Status>> {
        let st = &mut self.types[ADDR];
        let sub = st.sub.get_or_insert_with(Subscription::default);
        for n in &req.resource_names_unsubscribe {
            sub.names.remove(n);
            st.known.remove(n);
        }
        let mut asked = Vec::new();
        for n in &req.resource_names_subscribe {
            if n.parse::<std::net::IpAddr>().is_err() {
                ctx.refused("bad_address_name");
                return Err(Some(Status::invalid_argument(format!(
                    "{}: {n:?} is not an IP address",
                    weft_proto::type_url::ADDRESS
                ))));
            }
            if sub.names.len() >= MAX_ADDRESSES {
                ctx.refused("too_many_addresses");
                return Err(Some(Status::resource_exhausted(format!(
                    "{}: at most {MAX_ADDRESSES} addresses per stream",
                    weft_proto::type_url::ADDRESS
                ))));
            }
            if sub.names.insert(n.clone()) {
                asked.push(n.clone());
            }
        }
        if !req.resource_names_unsubscribe.is_empty() {
            ctx.record_sub(ADDR, sub);
        }
        if !asked.is_empty() {
            self.send_addresses(ctx, asked, true)
                .await
                .map_err(|_| None)?;
        }
        Ok(())
    }

    /// Sends the entries of `names` that differ from what the client holds; with
    /// `answer_absent`, names that are no meshed endpoint as removed.
    async fn send_addresses(
        &mut self,
        ctx: &mut C<'_>,
        names: Vec<String>,
        answer_absent: bool,
    ) -> Result<(), ()> {
        let t = ctx.shared.translations.borrow().clone();
        let st = &mut self.types[ADDR];
        let Some(sub) = st.sub.clone() else {
            return Ok(());
        };
        let (mut resources, mut removed) = (Vec::new(), Vec::new());
        for n in names {
            match t.address_entry(&n, &ctx.node.namespace) {
                Some(r) => {
                    if st.known.get(&n) != Some(&r.version) {
                        st.known.insert(n.clone(), r.version.clone());
                        resources.push(Resource {
                            name: n,
                            version: r.version.clone(),
                            resource: Some(r.any.clone()),
                            ..Default::default()
                        });
                    }
                }
                None => {
                    if st.known.remove(&n).is_some() || answer_absent {
                        removed.push(n);
                    }
                }
            }
        }
        if resources.is_empty() && removed.is_empty() {
            return Ok(());
        }
        self.respond(ctx, ADDR, sub, resources, removed, false)
            .await
    }

    /// Sends one response of type `ti` and records it as sent.
    async fn respond(
        &mut self,
        ctx: &mut C<'_>,
        ti: usize,
        sub: Subscription,
        resources: Vec<Resource>,
        removed: Vec<String>,
        gated: bool,
    ) -> Result<(), ()> {
        let nonce = ctx.next_nonce();
        let version = ctx.snapshot.version.to_string();
        self.types[ti].nonce = nonce.clone();
        ctx.record_sent(ti, &version, &nonce, sub);
        let resp = DeltaDiscoveryResponse {
            system_version_info: version,
            resources,
            type_url: weft_proto::type_url::ALL[ti].to_string(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        };
        ctx.send(resp, gated).await
    }

    /// Sends the `candidates` the client wants and lacks, and the `removed` names it held:
    /// at once when small, else queued in chunks for `pump`.
    async fn send(
        &mut self,
        ctx: &mut C<'_>,
        ti: usize,
        candidates: Vec<String>,
        removed: Vec<String>,
        always: bool,
    ) -> Result<(), ()> {
        if candidates.len() <= LARGE && self.pending.is_empty() {
            let chunk = Chunk {
                ti,
                work: Work::Names(candidates),
                removed,
                always,
            };
            return self.send_now(ctx, chunk, false).await;
        }
        let mut removed = Some(removed);
        let mut rest = candidates.into_iter().peekable();
        let mut first = true;
        while first || rest.peek().is_some() {
            self.pending.push_back(Chunk {
                ti,
                work: Work::Names(rest.by_ref().take(LARGE).collect()),
                removed: removed.take().unwrap_or_default(),
                always: always && first,
            });
            first = false;
        }
        Ok(())
    }

    /// The names a chunk sends now; a scan that has more left re-queues itself first in line.
    fn take_names(&mut self, ctx: &C<'_>, ti: usize, work: Work) -> Vec<String> {
        match work {
            Work::Names(n) => n,
            Work::Scan { after, initial } => {
                let Some(sub) = self.types[ti].sub.as_ref() else {
                    return Vec::new();
                };
                let held = &ctx.snapshot.resources[ti];
                let range = match &after {
                    Some(a) => held.range::<String, _>((
                        std::ops::Bound::Excluded(a),
                        std::ops::Bound::Unbounded,
                    )),
                    None => held.range::<String, _>(..),
                };
                let mut names = Vec::new();
                let mut more = false;
                for (n, r) in range {
                    if !sub.wants(n)
                        || initial.get(n) == Some(&r.version)
                        || !r.visible_from(&ctx.node.namespace)
                    {
                        continue;
                    }
                    if names.len() == LARGE {
                        more = true;
                        break;
                    }
                    names.push(n.clone());
                }
                if more && let Some(last) = names.last() {
                    self.pending.push_front(Chunk {
                        ti,
                        work: Work::Scan {
                            after: Some(last.clone()),
                            initial,
                        },
                        removed: Vec::new(),
                        always: false,
                    });
                }
                names
            }
        }
    }

    async fn send_now(&mut self, ctx: &mut C<'_>, chunk: Chunk, gated: bool) -> Result<(), ()> {
        let Chunk {
            ti,
            work,
            removed,
            always,
        } = chunk;
        let candidates = self.take_names(ctx, ti, work);
        let st = &mut self.types[ti];
        let Some(sub) = st.sub.clone() else {
            return Ok(());
        };
        let held = &ctx.snapshot.resources[ti];
        let mut resources = Vec::new();
        let mut removed = removed;
        for name in candidates {
            if !sub.wants(&name) {
                continue;
            }
            let Some(r) = held.get(&name) else {
                continue;
            };
            if !r.visible_from(&ctx.node.namespace) {
                // No longer (or never) visible here: whatever the client held goes away.
                removed.push(name);
                continue;
            }
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
        self.respond(ctx, ti, sub, resources, removed, gated).await
    }
}
