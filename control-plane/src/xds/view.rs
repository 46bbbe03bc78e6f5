//! What one proxy should hold, kept current incrementally.
//!
//! A [`View`] remembers, per service, the translated `Arc` it last took; on a new translation it
//! only re-reads services whose `Arc` changed, so a push touching one service costs one
//! service's work per proxy, not the whole mesh's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::catalog::ServiceKey;
use crate::translate::{ProxyPlace, Res, ServiceXds, Translation};

/// Index of a type in per-type arrays: CDS, EDS, LDS, RDS (the order of `type_url::ALL`).
pub type TypeIndex = usize;
/// Number of types served.
pub const TYPES: usize = 4;
const CDS: TypeIndex = 0;
const EDS: TypeIndex = 1;
const LDS: TypeIndex = 2;
const RDS: TypeIndex = 3;

/// The index of a type URL, `None` for types Weft does not serve.
pub fn type_index(type_url: &str) -> Option<TypeIndex> {
    weft_proto::type_url::ALL
        .iter()
        .position(|t| *t == type_url)
}

/// Names whose content changed or vanished in one update, per type.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    /// Added or changed resources.
    pub upserted: BTreeSet<String>,
    /// Resources gone.
    pub removed: BTreeSet<String>,
}

impl Changes {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.upserted.is_empty() && self.removed.is_empty()
    }
}

/// The resources one proxy should hold.
#[derive(Debug, Default)]
pub struct View {
    place: ProxyPlace,
    services: HashMap<ServiceKey, (Arc<ServiceXds>, Arc<Vec<Res>>)>,
    /// Current resources per type, by name.
    pub resources: [BTreeMap<String, Res>; TYPES],
    /// The translation version the view reflects.
    pub version: u64,
}

impl View {
    /// An empty view for a proxy at `place`.
    pub fn new(place: ProxyPlace) -> Self {
        View {
            place,
            ..View::default()
        }
    }

    /// Brings the view to `t`, returning what changed per type.
    pub fn update(&mut self, t: &Translation) -> [Changes; TYPES] {
        let mut changes: [Changes; TYPES] = Default::default();
        self.version = t.version;
        let gone: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !t.services.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some((old, eds)) = self.services.remove(&k) {
                for (ti, list) in lists(&old, &eds) {
                    for r in list {
                        self.resources[ti].remove(&r.name);
                        changes[ti].removed.insert(r.name.clone());
                    }
                }
            }
        }
        for (k, xds) in &t.services {
            if let Some((old, _)) = self.services.get(k)
                && Arc::ptr_eq(old, xds)
            {
                continue;
            }
            let eds = xds.endpoints(&self.place);
            // Versions the proxy holds for this service now, to tell real changes from re-issues.
            let mut before: [BTreeMap<String, String>; TYPES] = Default::default();
            if let Some((old, old_eds)) = self.services.remove(k) {
                for (ti, list) in lists(&old, &old_eds) {
                    for r in list {
                        self.resources[ti].remove(&r.name);
                        before[ti].insert(r.name.clone(), r.version.clone());
                    }
                }
            }
            for (ti, list) in lists(xds, &eds) {
                for r in list {
                    let same = before[ti].remove(&r.name).is_some_and(|v| v == r.version);
                    self.resources[ti].insert(r.name.clone(), r.clone());
                    if !same {
                        changes[ti].upserted.insert(r.name.clone());
                    }
                }
            }
            for (ti, old_names) in before.into_iter().enumerate() {
                changes[ti].removed.extend(old_names.into_keys());
            }
            self.services.insert(k.clone(), (xds.clone(), eds));
        }
        for c in &mut changes {
            let Changes { upserted, removed } = c;
            removed.retain(|n| !upserted.contains(n));
        }
        changes
    }
}

fn lists<'a>(xds: &'a ServiceXds, eds: &'a [Res]) -> [(TypeIndex, &'a [Res]); TYPES] {
    [
        (CDS, &xds.clusters[..]),
        (EDS, eds),
        (LDS, &xds.listeners[..]),
        (RDS, &xds.routes[..]),
    ]
}
