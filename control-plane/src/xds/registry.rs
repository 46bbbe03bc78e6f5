//! Who is connected and what they hold: per proxy and type, what was sent, what was ACKed,
//! and the detail of the last NACK. This is what `weftctl status` shows.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use weft_proto::admin::{ProxyStatus, SyncState, TypeStatus};
use weft_proto::envoy::envoy::config::core::v3::Node;
use weft_proto::keys;

use crate::catalog::Locality;
use crate::translate::{ProxyPlace, Res};
use crate::xds::Subscription;
use crate::xds::view::{PlaceSnapshot, TYPES};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The identity a proxy announced in its xDS `Node`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// `node.id`.
    pub id: String,
    /// Namespace from metadata (`default` when absent).
    pub namespace: String,
    /// Service account from metadata.
    pub service_account: String,
    /// Place: cluster and locality.
    pub place: ProxyPlace,
    /// It is Weft's sidecar (`user_agent_name`): it gets the per-workload inbound Listener.
    pub sidecar: bool,
    /// Its pod's IPs (`INSTANCE_IPS` metadata; unparsable entries are ignored).
    pub ips: Vec<std::net::IpAddr>,
}

impl NodeInfo {
    /// The pod it runs in, when its id is `<pod>.<namespace>` of its own namespace.
    pub fn pod(&self) -> Option<&str> {
        self.id
            .rsplit_once('.')
            .filter(|(pod, ns)| *ns == self.namespace && !pod.is_empty())
            .map(|(pod, _)| pod)
    }

    /// Who asks, for the inbound Listener.
    pub fn workload(&self) -> crate::inbound::Workload<'_> {
        crate::inbound::Workload {
            namespace: &self.namespace,
            pod: self.pod(),
            ips: &self.ips,
        }
    }
}

impl NodeInfo {
    /// Reads the node; a client without Weft metadata is namespace `default`, locality unknown.
    pub fn from_node(node: &Node) -> Self {
        let meta = |k: &str| -> String {
            node.metadata
                .as_ref()
                .and_then(|m| m.fields.get(k))
                .and_then(|v| match &v.kind {
                    Some(weft_proto::envoy::google::protobuf::value::Kind::StringValue(s)) => {
                        Some(s.clone())
                    }
                    _ => None,
                })
                .unwrap_or_default()
        };
        let loc = node.locality.clone().unwrap_or_default();
        let namespace = meta(keys::NODE_NAMESPACE);
        NodeInfo {
            id: node.id.clone(),
            namespace: if namespace.is_empty() {
                "default".into()
            } else {
                namespace
            },
            service_account: meta(keys::NODE_SERVICE_ACCOUNT),
            sidecar: node.user_agent_name == keys::SIDECAR_USER_AGENT,
            ips: meta(keys::NODE_INSTANCE_IPS)
                .split(',')
                .filter_map(|s| s.trim().parse().ok())
                .take(16)
                .collect(),
            place: ProxyPlace {
                cluster: meta(keys::NODE_CLUSTER),
                locality: Locality {
                    region: loc.region,
                    zone: loc.zone,
                    subzone: loc.sub_zone,
                },
            },
        }
    }
}

/// xDS state of one type for one proxy.
#[derive(Clone, Debug, Default)]
pub struct TypeRecord {
    /// Version of the last response sent.
    pub sent_version: String,
    /// Nonce of the last response sent.
    pub sent_nonce: String,
    /// Last version the proxy ACKed.
    pub acked_version: String,
    /// When, ms since the epoch.
    pub last_ack_ms: i64,
    /// Detail of the last NACK, cleared by the next ACK.
    pub nack: Option<String>,
    /// Whether anything was sent.
    pub sent: bool,
    /// What the proxy subscribed to.
    pub sub: Option<Subscription>,
}

impl TypeRecord {
    /// SYNCED / STALE / NACKED / NOT SENT.
    pub fn state(&self) -> SyncState {
        if !self.sent {
            SyncState::NotSent
        } else if self.nack.is_some() {
            SyncState::Nacked
        } else if self.acked_version == self.sent_version && !self.acked_version.is_empty() {
            SyncState::Synced
        } else {
            SyncState::Stale
        }
    }
}

/// One connected proxy.
#[derive(Debug)]
pub struct ProxyRecord {
    /// What the node said about itself.
    pub node: NodeInfo,
    /// `sotw` or `delta`.
    pub protocol: &'static str,
    /// When the stream opened.
    pub connected_at_ms: i64,
    /// Per type, in `type_url::ALL` order.
    pub types: [TypeRecord; TYPES],
    /// The snapshot the proxy was last sent (shared with every proxy at its place).
    pub snapshot: Option<Arc<PlaceSnapshot>>,
    /// The SPIFFE ID its stream's client certificate proved (none over plaintext).
    pub identity: Option<weft_proto::SpiffeId>,
}

impl ProxyRecord {
    /// The resources of type `ti` the proxy holds, as far as the server knows.
    pub fn held(&self, ti: usize) -> Vec<Res> {
        let t = &self.types[ti];
        match (&self.snapshot, &t.sub) {
            (Some(snap), Some(sub)) if t.sent => snap.resources[ti]
                .iter()
                .filter(|(n, r)| sub.wants(n) && r.visible_from(&self.node.namespace))
                .map(|(_, r)| r.clone())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether the proxy holds resource `name` of type `ti` (what [`ProxyRecord::held`]
    /// lists, asked for one name without building the list).
    pub fn holds(&self, ti: usize, name: &str) -> bool {
        let t = &self.types[ti];
        match (&self.snapshot, &t.sub) {
            (Some(snap), Some(sub)) if t.sent => {
                sub.wants(name)
                    && snap.resources[ti]
                        .get(name)
                        .is_some_and(|r| r.visible_from(&self.node.namespace))
            }
            _ => false,
        }
    }

    /// The admin API's view of this proxy.
    pub fn status(&self, replica: &str) -> ProxyStatus {
        let on_demand = self.types[crate::xds::view::DIR].sub.is_some();
        let weft_only = [
            weft_proto::type_url::DIRECTORY,
            weft_proto::type_url::ADDRESS,
        ];
        ProxyStatus {
            node_id: self.node.id.clone(),
            namespace: self.node.namespace.clone(),
            service_account: self.node.service_account.clone(),
            cluster: self.node.place.cluster.clone(),
            region: self.node.place.locality.region.clone(),
            zone: self.node.place.locality.zone.clone(),
            protocol: self.protocol.into(),
            replica: replica.into(),
            connected_at_unix_ms: self.connected_at_ms,
            types: weft_proto::type_url::ALL
                .iter()
                .zip(&self.types)
                .enumerate()
                // Weft's own directory only for the proxies that ask for it (on-demand sidecars),
                // and of theirs only the types they subscribed to (what they use).
                .filter(|(_, (url, t))| {
                    t.sub.is_some() || (!weft_only.contains(*url) && !on_demand)
                })
                .map(|(ti, (url, t))| TypeStatus {
                    type_url: url.to_string(),
                    state: t.state() as i32,
                    sent_version: t.sent_version.clone(),
                    sent_nonce: t.sent_nonce.clone(),
                    acked_version: t.acked_version.clone(),
                    last_ack_unix_ms: t.last_ack_ms,
                    nack_detail: t.nack.clone().unwrap_or_default(),
                    resource_count: self.held(ti).len() as u32,
                    wildcard: t.sub.as_ref().is_some_and(|s| s.wildcard),
                    subscribed_names: t.sub.as_ref().map_or(0, |s| s.names.len() as u32),
                })
                .collect(),
        }
    }
}

/// A proxy's shared record.
pub type SharedRecord = Arc<Mutex<ProxyRecord>>;

/// Locks a record, recovering from a poisoned lock (the data stays usable).
pub fn lock(r: &SharedRecord) -> MutexGuard<'_, ProxyRecord> {
    crate::lock(r)
}

/// Every connected proxy, by connection.
#[derive(Debug, Default)]
pub struct Registry {
    proxies: Mutex<BTreeMap<u64, SharedRecord>>,
    next: std::sync::atomic::AtomicU64,
}

/// Removes a proxy from the registry when its stream ends.
pub struct Registration {
    registry: Arc<Registry>,
    id: u64,
    /// The record.
    pub record: SharedRecord,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.guard().remove(&self.id);
    }
}

impl Registry {
    fn guard(&self) -> MutexGuard<'_, BTreeMap<u64, SharedRecord>> {
        crate::lock(&self.proxies)
    }

    /// Adds a proxy; it leaves when the returned registration drops.
    pub fn register(
        self: &Arc<Self>,
        node: NodeInfo,
        protocol: &'static str,
        identity: Option<weft_proto::SpiffeId>,
    ) -> Registration {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let record = Arc::new(Mutex::new(ProxyRecord {
            node,
            protocol,
            connected_at_ms: now_ms(),
            types: Default::default(),
            snapshot: None,
            identity,
        }));
        self.guard().insert(id, record.clone());
        Registration {
            registry: self.clone(),
            id,
            record,
        }
    }

    /// Every record, in connection order.
    pub fn all(&self) -> Vec<SharedRecord> {
        self.guard().values().cloned().collect()
    }

    /// The most recent connection of the proxy with `node_id` whose stream `identity` opened:
    /// another certificate's stream claiming the same node id is not it.
    pub fn find_opened_by(
        &self,
        node_id: &str,
        identity: &weft_proto::SpiffeId,
    ) -> Option<SharedRecord> {
        self.guard()
            .values()
            .rev()
            .find(|r| {
                let r = lock(r);
                r.node.id == node_id && r.identity.as_ref() == Some(identity)
            })
            .cloned()
    }

    /// The most recent connection of the proxy with `node_id`.
    pub fn find(&self, node_id: &str) -> Option<SharedRecord> {
        self.guard()
            .values()
            .rev()
            .find(|r| lock(r).node.id == node_id)
            .cloned()
    }
}
