//! What proxies should hold, shared: one [`PlaceSnapshot`] per (translation version, place).
//!
//! Proxies at the same place (cluster, region, zone) hold the same resources, so the control
//! plane keeps one snapshot per place and every stream points at it: per-proxy memory does
//! not grow with the mesh. A new snapshot is built from the previous one of its place by
//! replaying only the services whose translation changed, and carries that diff, so a stream
//! one version behind learns what to push without walking the whole mesh.
//!
//! A Weft sidecar also holds its own inbound Listener (see `crate::inbound`), so snapshots are
//! keyed by (place, inbound Listener version): the replicas of a Deployment at one place share
//! one. A key lives while a stream uses it ([`SnapshotCache::acquire`]); an unused key is
//! dropped at the next translation, so neither client-chosen localities nor old policies pile
//! up snapshots.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use crate::translate::{ProxyPlace, Res, ServiceXds, Translation};

/// What proxies share a snapshot by: their place and their inbound Listener.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SnapshotKey {
    /// Cluster and locality.
    pub place: ProxyPlace,
    /// The inbound Listener's content version (`None`: the proxy gets none).
    pub inbound: Option<String>,
}

/// Index of a type in per-type arrays: CDS, EDS, LDS, RDS, DIR (the order of `type_url::ALL`).
pub type TypeIndex = usize;
/// Number of types served.
pub const TYPES: usize = 6;
/// CDS's index in [`weft_proto::type_url::ALL`].
pub const CDS: TypeIndex = 0;
const EDS: TypeIndex = 1;
const LDS: TypeIndex = 2;
const RDS: TypeIndex = 3;
/// The directory's index.
pub const DIR: TypeIndex = 4;
/// The address entries' index: never in a snapshot, answered per name from the translation.
pub const ADDR: TypeIndex = 5;

/// The index of a type URL, `None` for types Weft does not serve.
pub fn type_index(type_url: &str) -> Option<TypeIndex> {
    weft_proto::type_url::ALL
        .iter()
        .position(|t| *t == type_url)
}

/// Names whose content changed or vanished between two snapshots, per type.
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

/// Per-type changes.
pub type AllChanges = [Changes; TYPES];

/// Everything a proxy at one place should hold at one translation version.
#[derive(Debug, Default)]
pub struct PlaceSnapshot {
    /// The translation version.
    pub version: u64,
    /// Resources per type, by name.
    pub resources: [BTreeMap<String, Res>; TYPES],
    /// Changes to this snapshot from recent earlier versions of its place: (from, changes),
    /// newest first, at most [`DIFF_HISTORY`].
    diffs: Vec<(u64, Arc<AllChanges>)>,
}

/// How many earlier versions a snapshot keeps a ready diff from.
pub const DIFF_HISTORY: usize = 8;

/// The changes of `a` then `b`.
fn compose(a: &AllChanges, b: &AllChanges) -> AllChanges {
    let mut out: AllChanges = Default::default();
    for ti in 0..TYPES {
        let (a, b) = (&a[ti], &b[ti]);
        out[ti].upserted = a
            .upserted
            .difference(&b.removed)
            .chain(&b.upserted)
            .cloned()
            .collect();
        out[ti].removed = a
            .removed
            .difference(&b.upserted)
            .chain(&b.removed)
            .cloned()
            .collect();
    }
    out
}

fn lists<'a>(xds: &'a ServiceXds, eds: &'a [Res]) -> [(TypeIndex, &'a [Res]); TYPES] {
    [
        (CDS, &xds.clusters[..]),
        (EDS, eds),
        (LDS, &xds.listeners[..]),
        (RDS, &xds.routes[..]),
        (DIR, &xds.directory[..]),
        (ADDR, &[]),
    ]
}

impl PlaceSnapshot {
    fn build(t: &Translation, place: &ProxyPlace, inbound: Option<&Res>) -> Self {
        let mut resources: [BTreeMap<String, Res>; TYPES] = Default::default();
        if let Some(r) = inbound {
            resources[LDS].insert(r.name.clone(), r.clone());
        }
        for xds in t.services.values() {
            let eds = xds.endpoints(place);
            for (ti, list) in lists(xds, &eds) {
                for r in list {
                    resources[ti].insert(r.name.clone(), r.clone());
                }
            }
        }
        PlaceSnapshot {
            version: t.version,
            resources,
            diffs: Vec::new(),
        }
    }

    /// The next snapshot, from this one and the services `t` changed.
    fn advance(&self, t: &Translation, place: &ProxyPlace) -> Self {
        let mut resources = self.resources.clone();
        let mut changes: AllChanges = Default::default();
        for c in &t.changed {
            // Versions held before, to tell real changes from re-issued identical resources.
            let mut before: [BTreeMap<&str, &str>; TYPES] = Default::default();
            let old_eds = c.old.as_ref().map(|o| o.endpoints(place));
            if let (Some(old), Some(eds)) = (&c.old, &old_eds) {
                for (ti, list) in lists(old, eds) {
                    for r in list {
                        resources[ti].remove(&r.name);
                        before[ti].insert(&r.name, &r.version);
                    }
                }
            }
            if let Some(new) = &c.new {
                let eds = new.endpoints(place);
                for (ti, list) in lists(new, &eds) {
                    for r in list {
                        let same = before[ti].remove(r.name.as_str()) == Some(r.version.as_str());
                        resources[ti].insert(r.name.clone(), r.clone());
                        if !same {
                            changes[ti].upserted.insert(r.name.clone());
                        }
                    }
                }
            }
            for (ti, gone) in before.into_iter().enumerate() {
                changes[ti]
                    .removed
                    .extend(gone.into_keys().map(str::to_string));
            }
        }
        for c in &mut changes {
            let Changes { upserted, removed } = c;
            removed.retain(|n| !upserted.contains(n));
        }
        let mut diffs = Vec::with_capacity(DIFF_HISTORY);
        for (from, d) in self.diffs.iter().take(DIFF_HISTORY - 1) {
            diffs.push((*from, Arc::new(compose(d, &changes))));
        }
        diffs.insert(0, (self.version, Arc::new(changes)));
        PlaceSnapshot {
            version: t.version,
            resources,
            diffs,
        }
    }

    /// What changed from `old` (what a proxy holds) to this snapshot.
    pub fn changes_since(&self, old: &PlaceSnapshot) -> Arc<AllChanges> {
        if let Some((_, d)) = self.diffs.iter().find(|(from, _)| *from == old.version) {
            return d.clone();
        }
        self.walk(old)
    }

    /// What changed from `old`, found by walking both (a proxy far behind, a rebuilt
    /// snapshot, or one of another key: its inbound Listener changed).
    pub fn walk(&self, old: &PlaceSnapshot) -> Arc<AllChanges> {
        let mut changes: AllChanges = Default::default();
        for (ti, change) in changes.iter_mut().enumerate() {
            let (new, old) = (&self.resources[ti], &old.resources[ti]);
            for (n, r) in new {
                if old.get(n).is_none_or(|o| o.version != r.version) {
                    change.upserted.insert(n.clone());
                }
            }
            for n in old.keys() {
                if !new.contains_key(n) {
                    change.removed.insert(n.clone());
                }
            }
        }
        Arc::new(changes)
    }
}

/// The latest snapshot of every key in use.
#[derive(Debug, Default)]
pub struct SnapshotCache {
    latest: Mutex<HashMap<SnapshotKey, Arc<PlaceSnapshot>>>,
    users: Mutex<HashMap<SnapshotKey, usize>>,
}

/// A stream's use of a key: while it lives, the key's snapshot is kept and advanced.
#[derive(Debug)]
pub struct KeyUse {
    cache: Arc<SnapshotCache>,
    key: SnapshotKey,
}

impl KeyUse {
    /// The key used.
    pub fn key(&self) -> &SnapshotKey {
        &self.key
    }
}

impl Drop for KeyUse {
    fn drop(&mut self) {
        let mut users = crate::lock(&self.cache.users);
        if let Some(n) = users.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                users.remove(&self.key);
            }
        }
    }
}

impl SnapshotCache {
    /// Marks `key` as used until the returned guard drops.
    pub fn acquire(self: &Arc<Self>, key: SnapshotKey) -> KeyUse {
        *crate::lock(&self.users).entry(key.clone()).or_default() += 1;
        KeyUse {
            cache: self.clone(),
            key,
        }
    }

    /// Advances every key in use to `t` (the translator calls this for each new version, so
    /// the diff chain never breaks even when streams skip versions) and drops the others.
    pub fn advance_all(&self, t: &Translation) {
        let used: Vec<SnapshotKey> = {
            let users = crate::lock(&self.users);
            let mut latest = crate::lock(&self.latest);
            latest.retain(|k, _| users.contains_key(k));
            latest.keys().cloned().collect()
        };
        for key in used {
            // Advancing never changes the inbound Listener a snapshot holds.
            self.advance(t, &key);
        }
    }

    fn advance(&self, t: &Translation, key: &SnapshotKey) {
        let mut latest = crate::lock(&self.latest);
        if let Some(s) = latest.get(key)
            && s.version == t.prev_version
        {
            let next = Arc::new(s.advance(t, &key.place));
            latest.insert(key.clone(), next);
        }
    }

    /// The snapshot of `place` holding `inbound` at `t`'s version, built once and shared.
    pub fn get(
        &self,
        t: &Translation,
        place: &ProxyPlace,
        inbound: Option<&Res>,
    ) -> Arc<PlaceSnapshot> {
        let key = SnapshotKey {
            place: place.clone(),
            inbound: inbound.map(|r| r.version.clone()),
        };
        let mut latest = crate::lock(&self.latest);
        let snap = match latest.get(&key) {
            Some(s) if s.version == t.version => return s.clone(),
            Some(s) if s.version == t.prev_version => Arc::new(s.advance(t, place)),
            Some(s) if s.version > t.version => return s.clone(),
            _ => Arc::new(PlaceSnapshot::build(t, place, inbound)),
        };
        latest.insert(key, snap.clone());
        snap
    }

    /// How many snapshots are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        crate::lock(&self.latest).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Catalog, SourceUpdate};
    use crate::objects::parse_object;
    use crate::translate::translate;
    use serde_json::json;

    fn svc(name: &str, port: u16) -> SourceUpdate {
        let doc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"ports": [{"name": "http", "port": port}]}});
        SourceUpdate {
            upserts: vec![(
                Arc::new(parse_object(doc).expect("valid").expect("known")),
                "t".into(),
            )],
            ..Default::default()
        }
    }

    fn names(c: &BTreeSet<String>) -> Vec<&str> {
        c.iter().map(String::as_str).collect()
    }

    #[test]
    fn snapshots_advance_with_exact_diffs_and_compose_over_skipped_versions() {
        let cat = Catalog::new("c1", "td");
        let cache = Arc::new(SnapshotCache::default());
        let place = ProxyPlace::default();
        let _use = cache.acquire(SnapshotKey::default());
        cat.apply(svc("a", 80));
        cat.apply(svc("b", 80));
        let t1 = translate(&cat.current(), None);
        let s1 = cache.get(&t1, &place, None);
        assert_eq!(s1.resources[LDS].len(), 2);

        // b changes port: its 4 resources are renamed (removed + upserted); a is untouched.
        cat.apply(svc("b", 81));
        let t2 = translate(&cat.current(), Some(&t1));
        cache.advance_all(&t2);
        let s2 = cache.get(&t2, &place, None);
        let d12 = s2.changes_since(&s1);
        assert_eq!(
            names(&d12[LDS].upserted),
            vec!["b.default.svc.cluster.local:81"]
        );
        assert_eq!(
            names(&d12[LDS].removed),
            vec!["b.default.svc.cluster.local:80"]
        );

        // c appears; b goes back to 80.
        cat.apply(svc("c", 80));
        let t3 = translate(&cat.current(), Some(&t2));
        cache.advance_all(&t3);
        cat.apply(svc("b", 80));
        let t4 = translate(&cat.current(), Some(&t3));
        cache.advance_all(&t4);
        let s4 = cache.get(&t4, &place, None);
        // From s1 (three versions back) the composed diff is exactly "c is new".
        let d14 = s4.changes_since(&s1);
        assert_eq!(
            names(&d14[CDS].upserted),
            vec![
                "b.default.svc.cluster.local:80",
                "c.default.svc.cluster.local:80"
            ],
            "b:80 re-added after its removal is an upsert (harmless: same version)"
        );
        assert_eq!(
            names(&d14[CDS].removed),
            vec!["b.default.svc.cluster.local:81"]
        );
        // And it agrees with walking both snapshots, apart from that harmless re-send.
        let walked = {
            let mut s = PlaceSnapshot {
                version: 0,
                ..Default::default()
            };
            s.resources = s1.resources.clone();
            s4.changes_since(&s)
        };
        assert_eq!(
            names(&walked[CDS].upserted),
            vec!["c.default.svc.cluster.local:80"]
        );
        assert!(walked[CDS].removed.is_empty());
        assert!(Arc::ptr_eq(
            &s4.resources[LDS]["a.default.svc.cluster.local:80"],
            &s1.resources[LDS]["a.default.svc.cluster.local:80"]
        ));
    }

    #[test]
    fn keys_nobody_uses_are_dropped_at_the_next_translation() {
        let cat = Catalog::new("c1", "td");
        let cache = Arc::new(SnapshotCache::default());
        cat.apply(svc("a", 80));
        let t1 = translate(&cat.current(), None);
        let here = ProxyPlace::default();
        let elsewhere = ProxyPlace {
            cluster: "made-up".into(),
            ..Default::default()
        };
        let kept = cache.acquire(SnapshotKey::default());
        let gone = cache.acquire(SnapshotKey {
            place: elsewhere.clone(),
            inbound: None,
        });
        cache.get(&t1, &here, None);
        cache.get(&t1, &elsewhere, None);
        assert_eq!(cache.len(), 2);
        drop(gone);
        cat.apply(svc("b", 80));
        let t2 = translate(&cat.current(), Some(&t1));
        cache.advance_all(&t2);
        assert_eq!(cache.len(), 1, "a place no stream uses is not kept");
        assert_eq!(cache.get(&t2, &here, None).resources[LDS].len(), 2);
        drop(kept);
    }
}
