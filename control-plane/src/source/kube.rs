//! The Kubernetes source: kube-rs watchers over every kind Weft reads, feeding the same
//! catalog through the same validation (`objects::parse_object`) as the file source.
//!
//! Split in two:
//! - [`KubeState`] is pure: watcher events in, catalog updates and verdicts out (unit-tested on
//!   real-shaped objects). A relist replaces everything it held of that kind; an object that
//!   fails validation keeps its last good version and is reported with its field;
//! - [`run`] drives the watchers, applies the updates, and — on the replica holding the
//!   leader Lease — writes an `Accepted` condition on Weft's own objects (True, or False with
//!   the reason and the field in the message), only when it changed, so its own status writes
//!   never loop back into more writes.
//!
//! A kind whose CRD is not installed (SMI, Gateway API, MCS are optional) is reported once and
//! retried with backoff; it never blocks the first sync of the others.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::watcher;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::catalog::{Catalog, SourceError, SourceUpdate};
use crate::objects::{Object, ObjectKey, parse_object};

/// What `SourceError.file` says for objects from the API server.
pub const ORIGIN: &str = "kubernetes";

/// One kind the source watches.
#[derive(Debug, PartialEq, Eq)]
pub struct Kind {
    /// API group ("" for core).
    pub group: &'static str,
    /// Version.
    pub version: &'static str,
    /// Kind, as `ObjectKey.kind` spells it.
    pub kind: &'static str,
    /// Resource plural.
    pub plural: &'static str,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// How Weft reports on objects of this kind.
    pub status: StatusStyle,
}

/// Where an object's `Accepted` verdict is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusStyle {
    /// Not written (core kinds; TrafficSplit v1alpha4 has no status).
    None,
    /// `status.conditions[type=Accepted]` (Weft's kinds, ServiceExport).
    Conditions,
    /// Gateway API: an entry per parentRef in `status.parents` with Weft's controller name.
    RouteParents,
}

/// The controller name Weft writes in HTTPRoute `status.parents`.
pub const CONTROLLER_NAME: &str = "weft.dev/mesh-controller";

/// Every kind the source watches.
pub const KINDS: [Kind; 15] = [
    Kind {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        namespaced: true,
        status: StatusStyle::None,
    },
    Kind {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        namespaced: true,
        status: StatusStyle::None,
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Node",
        plural: "nodes",
        namespaced: false,
        status: StatusStyle::None,
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        namespaced: true,
        status: StatusStyle::None,
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        namespaced: false,
        status: StatusStyle::None,
    },
    Kind {
        group: "split.smi-spec.io",
        version: "v1alpha4",
        kind: "TrafficSplit",
        plural: "trafficsplits",
        namespaced: true,
        status: StatusStyle::None,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "HTTPRoute",
        plural: "httproutes",
        namespaced: true,
        status: StatusStyle::RouteParents,
    },
    Kind {
        group: "multicluster.x-k8s.io",
        version: "v1alpha1",
        kind: "ServiceExport",
        plural: "serviceexports",
        namespaced: true,
        status: StatusStyle::Conditions,
    },
    Kind {
        group: "weft.dev",
        version: "v1alpha1",
        kind: "TrafficPolicy",
        plural: "trafficpolicies",
        namespaced: true,
        status: StatusStyle::Conditions,
    },
    Kind {
        group: "weft.dev",
        version: "v1alpha1",
        kind: "Rollout",
        plural: "rollouts",
        namespaced: true,
        status: StatusStyle::Conditions,
    },
    Kind {
        group: "weft.dev",
        version: "v1alpha1",
        kind: "MeshPeer",
        plural: "meshpeers",
        namespaced: false,
        status: StatusStyle::Conditions,
    },
    Kind {
        group: "weft.dev",
        version: "v1alpha1",
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        namespaced: true,
        status: StatusStyle::Conditions,
    },
    // Istio's, read the same way; Weft writes no status on another project's objects.
    Kind {
        group: "security.istio.io",
        version: "v1",
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        namespaced: true,
        status: StatusStyle::None,
    },
    // Istio's too, but Weft enforces it, so it says whether it can (the Accepted condition,
    // next to any condition Istio's own controllers write).
    Kind {
        group: "security.istio.io",
        version: "v1",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        namespaced: true,
        status: StatusStyle::Conditions,
    },
    // Read for `weftctl check` only (does one block mesh traffic?); the CNI enforces it.
    Kind {
        group: "networking.k8s.io",
        version: "v1",
        kind: "NetworkPolicy",
        plural: "networkpolicies",
        namespaced: true,
        status: StatusStyle::None,
    },
];

impl Kind {
    /// `group/version`, or `version` for core.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The kube-rs resource description.
    pub fn resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, self.version, self.kind),
            self.plural,
        )
    }

    /// The kind objects of this resource are keyed under: its `kind`, except Istio's
    /// PeerAuthentication, which must not collide with Weft's.
    pub fn id(&self) -> &'static str {
        if self.group == "security.istio.io" && self.kind == "PeerAuthentication" {
            crate::objects::ISTIO_PEER_AUTHENTICATION
        } else {
            self.kind
        }
    }

    fn key(&self, doc: &Value) -> ObjectKey {
        let meta = &doc["metadata"];
        ObjectKey {
            kind: self.id(),
            namespace: if self.namespaced {
                meta["namespace"].as_str().unwrap_or("default").to_string()
            } else {
                String::new()
            },
            name: meta["name"].as_str().unwrap_or_default().to_string(),
        }
    }
}

/// One watcher event, as JSON objects.
#[derive(Debug, Clone)]
pub enum Event {
    /// Created or changed.
    Apply(Value),
    /// Deleted.
    Delete(Value),
    /// A (re)list began: what follows until `RelistDone` is the whole set.
    Relist,
    /// One object of a relist.
    RelistItem(Value),
    /// The relist is complete.
    RelistDone,
    /// The kind cannot be watched now (its CRD is missing, or the API refused); counts as
    /// synced so the others are served.
    Unavailable(String),
}

/// Whether Weft accepts an object it writes status on.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// How its status is written.
    pub style: StatusStyle,
    /// The object.
    pub key: ObjectKey,
    /// `spec.parentRefs` (HTTPRoute).
    pub parent_refs: Value,
    /// The current `status.parents` (HTTPRoute), other controllers' entries included.
    pub parents: Value,
    /// The current `status.conditions`, others' types included (kept when writing ours).
    pub conditions: Value,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `metadata.resourceVersion` of the copy the conditions were read from: the status write
    /// carries it, so a write racing another controller's fails with 409 instead of dropping
    /// that controller's condition (a merge patch replaces the whole list).
    pub resource_version: Option<String>,
    /// `Ok`, or the field and what is wrong with it.
    pub accepted: Result<(), (String, String)>,
    /// The object's current `Accepted` condition (status, reason, message, generation).
    pub current: Option<(String, String, String, Option<i64>)>,
    /// `accepted` is an error because part of the object cannot be enforced as written (the
    /// object is in use, failing closed there), not because it was refused.
    pub unsupported: bool,
}

impl Verdict {
    /// `(status, reason, message)` of the condition to write.
    pub fn condition(&self) -> (&'static str, &'static str, String) {
        match &self.accepted {
            Ok(()) => ("True", "Accepted", "accepted by Weft".into()),
            Err((_, message)) if self.unsupported => (
                "False",
                "UnsupportedValue",
                format!("{message} (enforced fail-closed)"),
            ),
            Err((field, message)) => ("False", "Invalid", format!("{field}: {message}")),
        }
    }

    /// Whether the object already says this.
    pub fn already_recorded(&self) -> bool {
        let (status, reason, message) = self.condition();
        self.current.as_ref().is_some_and(|(s, r, m, g)| {
            s == status && r == reason && *m == message && *g == self.generation
        })
    }
}

/// The pure part of the source: what it holds, what is wrong, what is synced.
#[derive(Default)]
pub struct KubeState {
    objects: HashMap<ObjectKey, Arc<Object>>,
    errors: BTreeMap<ObjectKey, SourceError>,
    relisting: HashMap<&'static str, Vec<Value>>,
    synced: BTreeSet<&'static str>,
    sent_errors: Option<Vec<SourceError>>,
}

impl KubeState {
    /// Whether every kind finished its first list.
    pub fn synced(&self) -> bool {
        self.synced.len() == KINDS.len()
    }

    /// Applies one event of `kind`: the catalog update, and verdicts on Weft's own objects.
    pub fn apply(&mut self, kind: &'static Kind, ev: Event) -> (SourceUpdate, Vec<Verdict>) {
        let mut upserts = Vec::new();
        let mut removes = Vec::new();
        let mut verdicts = Vec::new();
        let mut take = |state: &mut Self, doc: Value, verdicts: &mut Vec<Verdict>| {
            let (key, outcome) = state.take(kind, doc.clone());
            if kind.status != StatusStyle::None {
                let mut v = verdict(kind.status, &key, &doc, outcome.as_ref().err().cloned());
                if let Ok(Some(obj)) = &outcome
                    && let Some(gap) = crate::objects::unenforced(obj)
                {
                    v.accepted = Err(gap);
                    v.unsupported = true;
                }
                verdicts.push(v);
            }
            if let Ok(Some(obj)) = outcome {
                upserts.push((obj, ORIGIN.to_string()));
            }
        };
        match ev {
            Event::Apply(doc) => take(self, doc, &mut verdicts),
            Event::Delete(doc) => {
                let key = kind.key(&doc);
                self.errors.remove(&key);
                if self.objects.remove(&key).is_some() {
                    removes.push(key);
                }
            }
            Event::Relist => {
                self.relisting.insert(kind.id(), Vec::new());
            }
            Event::RelistItem(doc) => self.relisting.entry(kind.id()).or_default().push(doc),
            Event::RelistDone => {
                let docs = self.relisting.remove(kind.id()).unwrap_or_default();
                let fresh: BTreeSet<ObjectKey> = docs.iter().map(|d| kind.key(d)).collect();
                let gone: Vec<ObjectKey> = self
                    .objects
                    .keys()
                    .filter(|k| k.kind == kind.id() && !fresh.contains(*k))
                    .cloned()
                    .collect();
                for k in gone {
                    self.objects.remove(&k);
                    removes.push(k);
                }
                self.errors
                    .retain(|k, _| k.kind != kind.id() || fresh.contains(k));
                for doc in docs {
                    take(self, doc, &mut verdicts);
                }
                self.synced.insert(kind.id());
            }
            Event::Unavailable(_) => {
                self.synced.insert(kind.id());
            }
        }
        let errors: Vec<SourceError> = self.errors.values().cloned().collect();
        let errors = if self.sent_errors.as_ref() == Some(&errors) {
            None
        } else {
            self.sent_errors = Some(errors.clone());
            Some(errors)
        };
        let update = SourceUpdate {
            upserts,
            removes,
            errors,
            initial_sync_done: self.synced(),
        };
        (update, verdicts)
    }

    /// Validates one object; a refused one keeps its last good version.
    #[allow(clippy::type_complexity)]
    fn take(
        &mut self,
        kind: &Kind,
        mut doc: Value,
    ) -> (ObjectKey, Result<Option<Arc<Object>>, (String, String)>) {
        if let Some(m) = doc.as_object_mut() {
            m.insert("apiVersion".into(), json!(kind.api_version()));
            m.insert("kind".into(), json!(kind.kind));
            // What the API server adds and Weft never reads: left out so a strict spec
            // parser only sees what users wrote. A Rollout's status is read: it is how
            // replicas follow the leader's rollout decisions.
            if kind.kind != "Rollout" {
                m.remove("status");
            }
        }
        let key = kind.key(&doc);
        match parse_object(doc) {
            Ok(Some(obj)) => {
                let obj = Arc::new(obj);
                self.errors.remove(&key);
                self.objects.insert(key.clone(), obj.clone());
                (key, Ok(Some(obj)))
            }
            Ok(None) => (key, Ok(None)),
            Err(e) => {
                let kept = self.objects.contains_key(&key);
                self.errors.insert(
                    key.clone(),
                    SourceError {
                        file: ORIGIN.into(),
                        object: e.object.clone(),
                        field: e.field.clone(),
                        message: if kept {
                            format!("{}; the last good version keeps serving", e.message)
                        } else {
                            e.message.clone()
                        },
                    },
                );
                (key, Err((e.field, e.message)))
            }
        }
    }
}

fn verdict(
    style: StatusStyle,
    key: &ObjectKey,
    doc: &Value,
    error: Option<(String, String)>,
) -> Verdict {
    let conditions = match style {
        StatusStyle::RouteParents => doc["status"]["parents"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["controllerName"] == CONTROLLER_NAME)
            .map(|p| p["conditions"].clone())
            .unwrap_or(Value::Null),
        _ => doc["status"]["conditions"].clone(),
    };
    let current = conditions
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Accepted")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
                c["message"].as_str().unwrap_or_default().to_string(),
                c["observedGeneration"].as_i64(),
            )
        });
    Verdict {
        style,
        key: key.clone(),
        parent_refs: doc["spec"]["parentRefs"].clone(),
        parents: doc["status"]["parents"].clone(),
        conditions: doc["status"]["conditions"].clone(),
        generation: doc["metadata"]["generation"].as_i64(),
        resource_version: doc["metadata"]["resourceVersion"]
            .as_str()
            .map(str::to_string),
        accepted: error.map_or(Ok(()), Err),
        current,
        unsupported: false,
    }
}

/// The status patch that records `v` (a merge patch of the status subresource). For an
/// HTTPRoute it keeps other controllers' `status.parents` entries and replaces Weft's. It
/// carries the resourceVersion the conditions were read at (when known): the API server
/// refuses it with 409 Conflict if the object changed since.
pub fn status_patch(v: &Verdict, now_rfc3339: &str) -> Value {
    let mut patch = status_body(v, now_rfc3339);
    if let Some(rv) = &v.resource_version {
        patch["metadata"] = json!({"resourceVersion": rv});
    }
    patch
}

/// Takes the fresh copy `doc` of the object as the base of the next write (its conditions,
/// parents and resourceVersion); what Weft decided about it stays.
pub fn rebase(v: &mut Verdict, doc: &Value) {
    let fresh = verdict(v.style, &v.key, doc, None);
    v.parent_refs = fresh.parent_refs;
    v.parents = fresh.parents;
    v.conditions = fresh.conditions;
    v.current = fresh.current;
    v.resource_version = fresh.resource_version;
    // The generation judged stays: a newer spec arrives through the watch and is judged then.
}

/// How many times a status write is retried after a 409 Conflict (re-reading the object each
/// time) before it waits for the next change.
pub const STATUS_CONFLICT_RETRIES: usize = 3;

fn status_body(v: &Verdict, now_rfc3339: &str) -> Value {
    let (status, reason, message) = v.condition();
    let condition = json!({
        "type": "Accepted",
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now_rfc3339,
        "observedGeneration": v.generation,
    });
    match v.style {
        StatusStyle::RouteParents => {
            let mut parents: Vec<Value> = v
                .parents
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["controllerName"] != CONTROLLER_NAME)
                .cloned()
                .collect();
            for r in v.parent_refs.as_array().into_iter().flatten() {
                parents.push(json!({
                    "parentRef": r,
                    "controllerName": CONTROLLER_NAME,
                    "conditions": [condition],
                }));
            }
            json!({"status": {"parents": parents}})
        }
        _ => {
            // A merge patch replaces the whole list: keep the other condition types (an MCS
            // controller's `Valid` on a ServiceExport) and replace only `Accepted`.
            let mut conditions: Vec<Value> = v
                .conditions
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["type"] != "Accepted")
                .cloned()
                .collect();
            conditions.push(condition);
            json!({"status": {"conditions": conditions}})
        }
    }
}

fn to_value(obj: DynamicObject) -> Value {
    serde_json::to_value(obj).unwrap_or(Value::Null)
}

/// Watches one kind forever, sending its events to `tx`.
async fn watch_kind(client: kube::Client, idx: usize, tx: mpsc::Sender<(usize, Event)>) {
    use kube::runtime::WatchStreamExt;
    let kind = &KINDS[idx];
    let api: kube::Api<DynamicObject> = kube::Api::all_with(client, &kind.resource());
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut reported = false;
    while let Some(item) = stream.next().await {
        let ev = match item {
            Ok(watcher::Event::Apply(o)) => Event::Apply(to_value(o)),
            Ok(watcher::Event::Delete(o)) => Event::Delete(to_value(o)),
            Ok(watcher::Event::Init) => Event::Relist,
            Ok(watcher::Event::InitApply(o)) => Event::RelistItem(to_value(o)),
            Ok(watcher::Event::InitDone) => {
                reported = false;
                Event::RelistDone
            }
            Err(e) => {
                if reported {
                    continue;
                }
                reported = true;
                tracing::warn!(kind = kind.kind, error = %e, "cannot watch {} (CRD not installed, or no permission?); retrying with backoff", kind.plural);
                Event::Unavailable(e.to_string())
            }
        };
        if tx.send((idx, ev)).await.is_err() {
            return;
        }
    }
}

/// Runs the source until aborted: every kind's watcher into the catalog; status writes while
/// `leader` says this replica leads (all pending ones at once when it becomes leader).
pub async fn run(
    client: kube::Client,
    catalog: Arc<Catalog>,
    metrics: Arc<crate::metrics::Metrics>,
    mut leader: watch::Receiver<bool>,
    mut rollouts: mpsc::UnboundedReceiver<crate::rollout::StatusChange>,
) {
    let (tx, mut rx) = mpsc::channel(256);
    let mut watchers = tokio::task::JoinSet::new();
    for idx in 0..KINDS.len() {
        watchers.spawn(watch_kind(client.clone(), idx, tx.clone()));
    }
    drop(tx);
    let mut state = KubeState::default();
    let mut election = true;
    let mut writer = StatusWriter {
        client,
        metrics: metrics.clone(),
        verdicts: HashMap::new(),
        written: HashMap::new(),
    };
    loop {
        tokio::select! {
            next = rx.recv() => {
                let Some((idx, ev)) = next else { return };
                let kind = &KINDS[idx];
                if let (true, Event::Delete(doc)) = (kind.status != StatusStyle::None, &ev) {
                    writer.forget(&kind.key(doc));
                }
                let (update, verdicts) = state.apply(kind, ev);
                if !update.is_noop() {
                    metrics.source_reloads.inc();
                    catalog.apply(update);
                }
                for v in verdicts {
                    writer.verdicts.insert(v.key.clone(), (kind, v));
                }
                // The catalog's verdict counts, cross-object problems included (a policy for a
                // Service that does not exist, a route to a missing backend).
                writer.judge(&catalog.current().errors);
            }
            Some(change) = rollouts.recv() => {
                if *leader.borrow() {
                    writer.rollout_status(&change).await;
                }
            }
            changed = leader.changed(), if election => {
                // The election ended (its task stopped): keep its last word.
                election = changed.is_ok();
            }
        }
        // Judge only a complete world: before every kind listed, a reference to an object of
        // a kind not yet seen would look broken.
        if *leader.borrow() && state.synced() {
            writer.flush().await;
        }
    }
}

/// What a write of `v` records: (status, reason, message, generation).
fn want(v: &Verdict) -> (String, String, String, Option<i64>) {
    let (status, reason, message) = v.condition();
    (
        status.to_string(),
        reason.to_string(),
        message,
        v.generation,
    )
}

/// Writes `Accepted` conditions that are not on the objects yet.
struct StatusWriter {
    client: kube::Client,
    metrics: Arc<crate::metrics::Metrics>,
    verdicts: HashMap<ObjectKey, (&'static Kind, Verdict)>,
    /// What this replica last wrote per object (status, reason, message, generation).
    written: HashMap<ObjectKey, (String, String, String, Option<i64>)>,
}

impl StatusWriter {
    /// Sets each object's verdict from the model's errors (the first one naming it).
    fn judge(&mut self, errors: &[SourceError]) {
        let mut first: HashMap<&str, (&str, &str)> = HashMap::new();
        for e in errors {
            first
                .entry(e.object.as_str())
                .or_insert((e.field.as_str(), e.message.as_str()));
        }
        for (key, (_, v)) in self.verdicts.iter_mut() {
            v.accepted = match first.get(key.to_string().as_str()) {
                Some((field, message)) => Err((field.to_string(), message.to_string())),
                None => Ok(()),
            };
        }
    }

    /// Writes a rollout's phase and weight to its status (what the other replicas follow).
    async fn rollout_status(&self, c: &crate::rollout::StatusChange) {
        let Some((ns, name)) = c.key.split_once('/') else {
            return;
        };
        let Some(kind) = KINDS.iter().find(|k| k.kind == "Rollout") else {
            return;
        };
        let api: kube::Api<DynamicObject> =
            kube::Api::namespaced_with(self.client.clone(), ns, &kind.resource());
        let patch = json!({"status": {"phase": c.phase, "weight": c.weight}});
        if let Err(e) = api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(rollout = %c.key, error = %e, "cannot write the rollout's status");
        }
    }

    fn forget(&mut self, key: &ObjectKey) {
        self.verdicts.remove(key);
        self.written.remove(key);
    }

    async fn flush(&mut self) {
        let due: Vec<ObjectKey> = self
            .verdicts
            .iter()
            .filter(|(key, (_, v))| {
                !v.already_recorded() && self.written.get(*key) != Some(&want(v))
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            let Some((kind, mut v)) = self.verdicts.get(&key).cloned() else {
                continue;
            };
            if self.write(kind, &key, &mut v).await {
                self.written.insert(key.clone(), want(&v));
            }
            // What the write learned of the object (a newer resourceVersion, another
            // controller's condition) is the base of the next one.
            if let Some(slot) = self.verdicts.get_mut(&key) {
                slot.1 = v;
            }
        }
    }

    /// Writes `v`'s condition; on 409 Conflict re-reads the object and writes again on top of
    /// what is there now, at most [`STATUS_CONFLICT_RETRIES`] times. True when written (or
    /// found already there).
    async fn write(&self, kind: &'static Kind, key: &ObjectKey, v: &mut Verdict) -> bool {
        let api: kube::Api<DynamicObject> = if kind.namespaced {
            kube::Api::namespaced_with(self.client.clone(), &key.namespace, &kind.resource())
        } else {
            kube::Api::all_with(self.client.clone(), &kind.resource())
        };
        for attempt in 0..=STATUS_CONFLICT_RETRIES {
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let patch = status_patch(v, &now);
            match api
                .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.count("written");
                    return true;
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    self.count("conflict");
                    if attempt == STATUS_CONFLICT_RETRIES {
                        tracing::warn!(object = %key, "the Accepted condition lost {} write races in a row; writing again on the object's next change", attempt + 1);
                        return false;
                    }
                    match api.get_status(&key.name).await {
                        Ok(fresh) => {
                            rebase(v, &to_value(fresh));
                            if v.already_recorded() {
                                return true;
                            }
                        }
                        Err(e) => {
                            self.count("error");
                            tracing::warn!(object = %key, error = %e, "cannot re-read the object after a status write conflict");
                            return false;
                        }
                    }
                }
                Err(e) => {
                    self.count("error");
                    tracing::warn!(object = %key, error = %e, "cannot write the Accepted condition");
                    return false;
                }
            }
        }
        false
    }

    fn count(&self, result: &str) {
        self.metrics
            .status_writes
            .get_or_create(&vec![("result".into(), result.into())])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(k: &str) -> &'static Kind {
        KINDS.iter().find(|x| x.kind == k).expect("kind")
    }

    /// A Service as the API server sends it (managed fields, status, uid, ...).
    fn service(name: &str, port: i64) -> Value {
        json!({
            "metadata": {"name": name, "namespace": "shop", "uid": "4f1c", "resourceVersion": "812",
                "creationTimestamp": "2026-11-28T06:00:00Z",
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"clusterIP": "10.96.4.7", "clusterIPs": ["10.96.4.7"], "type": "ClusterIP",
                "ipFamilies": ["IPv4"], "sessionAffinity": "None",
                "selector": {"app": name},
                "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}]},
            "status": {"loadBalancer": {}}
        })
    }

    fn policy(name: &str, retry_attempts: Value, generation: i64) -> Value {
        json!({
            "metadata": {"name": name, "namespace": "shop", "generation": generation, "uid": "9a"},
            "spec": {"targetRef": {"name": "checkout"}, "retry": {"attempts": retry_attempts}},
        })
    }

    /// Weft writes `Accepted` on Istio's AuthorizationPolicy (it enforces it): True, or False
    /// with `UnsupportedValue` naming each field it enforces fail-closed; and its key does not
    /// collide with Istio's PeerAuthentication.
    #[test]
    fn authorization_policies_say_what_is_not_enforced_as_written() {
        let mut st = KubeState::default();
        let k = KINDS
            .iter()
            .find(|k| k.kind == "AuthorizationPolicy")
            .expect("watched");
        assert_eq!(k.id(), "AuthorizationPolicy");
        let doc = |name: &str, spec: Value| json!({"metadata": {"name": name, "namespace": "shop", "generation": 2}, "spec": spec});
        let (u, v) = st.apply(
            k,
            Event::Apply(doc("fine", json!({"action": "DENY", "rules": [{}]}))),
        );
        assert_eq!(u.upserts.len(), 1);
        assert_eq!(v[0].condition().0, "True");
        let (u, v) = st.apply(
            k,
            Event::Apply(doc(
                "jwt",
                json!({"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}),
            )),
        );
        assert_eq!(u.upserts.len(), 1, "in use, failing closed");
        let (status, reason, message) = v[0].condition();
        assert_eq!((status, reason), ("False", "UnsupportedValue"));
        assert!(
            message.contains("spec.rules[0].from[0].source.requestPrincipals")
                && message.contains("fail-closed"),
            "{message}"
        );
        let (u, v) = st.apply(k, Event::Apply(doc("bad", json!({"action": "PERMIT"}))));
        assert!(u.upserts.is_empty());
        assert_eq!(v[0].condition().1, "Invalid");
    }

    #[test]
    fn a_relist_is_the_whole_set_and_the_first_sync_waits_for_every_kind() {
        let mut st = KubeState::default();
        let svc = kind("Service");
        st.apply(svc, Event::Relist);
        st.apply(svc, Event::RelistItem(service("checkout", 80)));
        let (u, _) = st.apply(svc, Event::RelistItem(service("cart", 80)));
        assert!(
            u.upserts.is_empty(),
            "a relist is applied when it is complete"
        );
        let (u, _) = st.apply(svc, Event::RelistDone);
        assert_eq!(u.upserts.len(), 2);
        assert!(!u.initial_sync_done, "other kinds have not listed yet");
        // A second relist without cart removes it.
        st.apply(svc, Event::Relist);
        st.apply(svc, Event::RelistItem(service("checkout", 80)));
        let (u, _) = st.apply(svc, Event::RelistDone);
        assert_eq!(u.removes.len(), 1);
        assert_eq!(u.removes[0].to_string(), "Service shop/cart");
        for k in KINDS.iter().filter(|k| k.kind != "Service") {
            let ev = if k.group == "split.smi-spec.io" {
                Event::Unavailable("404: the server could not find the requested resource".into())
            } else {
                Event::RelistDone
            };
            st.apply(k, ev);
        }
        assert!(
            st.synced(),
            "a kind without its CRD does not block the first sync"
        );
        let (u, _) = st.apply(svc, Event::Delete(service("checkout", 80)));
        assert_eq!(u.removes.len(), 1);
        assert!(u.initial_sync_done);
    }

    #[test]
    fn invalid_objects_are_reported_with_their_field_and_keep_their_last_good_version() {
        let mut st = KubeState::default();
        let tp = kind("TrafficPolicy");
        let (u, v) = st.apply(tp, Event::Apply(policy("retries", json!(3), 1)));
        assert_eq!(u.upserts.len(), 1);
        assert_eq!(v[0].accepted, Ok(()));
        assert!(!v[0].already_recorded());
        // The user breaks it: the catalog keeps the good one, the error names the field.
        let (u, v) = st.apply(tp, Event::Apply(policy("retries", json!("three"), 2)));
        assert!(
            u.upserts.is_empty() && u.removes.is_empty(),
            "the last good version stays"
        );
        let errors = u.errors.expect("errors changed");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].object, "TrafficPolicy shop/retries");
        assert_eq!(errors[0].field, "spec.retry.attempts");
        assert!(
            errors[0]
                .message
                .contains("last good version keeps serving"),
            "{errors:?}"
        );
        let (status, reason, message) = v[0].condition();
        assert_eq!((status, reason), ("False", "Invalid"));
        assert!(message.starts_with("spec.retry.attempts:"), "{message}");
        let patch = status_patch(&v[0], "2026-11-28T06:00:00Z");
        assert_eq!(patch["status"]["conditions"][0]["observedGeneration"], 2);
        // Another controller's condition on the object survives our write.
        let mut other = v[0].clone();
        other.conditions =
            json!([{"type": "Valid", "status": "True"}, {"type": "Accepted", "status": "Unknown"}]);
        let p = status_patch(&other, "2026-11-28T06:00:00Z");
        let types: Vec<&str> = p["status"]["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .filter_map(|c| c["type"].as_str())
            .collect();
        assert_eq!(types, ["Valid", "Accepted"]);
        assert_eq!(p["status"]["conditions"][1]["status"], "False");
        // Once the object carries that condition, it is not written again.
        let mut recorded = policy("retries", json!("three"), 2);
        recorded["status"] = patch["status"].clone();
        let (_, v) = st.apply(tp, Event::Apply(recorded));
        assert!(v[0].already_recorded(), "{v:?}");
        // Fixed: the error leaves.
        let (u, v) = st.apply(tp, Event::Apply(policy("retries", json!(2), 3)));
        assert_eq!(u.upserts.len(), 1);
        assert_eq!(u.errors, Some(vec![]));
        assert_eq!(v[0].accepted, Ok(()));
        // Core kinds get no verdicts (Weft does not write their status).
        let (_, v) = st.apply(kind("Service"), Event::Apply(service("checkout", 80)));
        assert!(v.is_empty());
    }

    #[test]
    fn cluster_scoped_kinds_have_no_namespace_and_api_versions_are_set() {
        let mut st = KubeState::default();
        let peer = json!({"metadata": {"name": "west", "generation": 1},
            "spec": {"address": "10.0.0.2:15012"}});
        let (u, v) = st.apply(kind("MeshPeer"), Event::Apply(peer));
        let (obj, origin) = &u.upserts[0];
        assert_eq!(origin, ORIGIN);
        assert_eq!(obj.key().to_string(), "MeshPeer west");
        assert_eq!(v[0].key.namespace, "");
        assert_eq!(kind("EndpointSlice").api_version(), "discovery.k8s.io/v1");
        assert_eq!(kind("Pod").api_version(), "v1");
    }
}
