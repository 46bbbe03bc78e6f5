//! Who must speak mTLS to whom: PeerAuthentications and the namespace annotation, resolved
//! per workload and port.
//!
//! Precedence, most specific first (Istio's, with the annotation as the namespace shorthand):
//! 1. a PeerAuthentication with a `selector` matching the pod (the first when several match;
//!    `weftctl check` warns), its `portLevelMtls` for the port, then its `mtls`;
//! 2. a selector-less PeerAuthentication in the pod's namespace (the first);
//! 3. the namespace's `weft.dev/mtls-mode` annotation;
//! 4. a selector-less PeerAuthentication in the root namespace (`weft-system`): the mesh default;
//! 5. PERMISSIVE.
//!
//! "The first" is by kind (Weft's before Istio's), then name. `UNSET` (or no mode) at a level
//! inherits from the next one; a first namespace policy that is `UNSET` is not replaced by a
//! second one. A pod whose labels the control
//! plane does not know yet gets the strictest mode any selector policy of its namespace could
//! give it: a watch that lags never opens a port a policy closes.

use std::collections::BTreeMap;

use serde::Serialize;
use weft_proto::tls::MtlsMode;

use crate::objects::{Object, PeerAuthenticationSpec};

/// A mode and the object it comes from (`PeerAuthentication ns/name`, `Namespace ns`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Sourced {
    /// The mode.
    pub mode: MtlsMode,
    /// Where it comes from, for `weftctl` and logs.
    pub source: String,
}

/// A PeerAuthentication with a selector.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WorkloadPolicy {
    /// `PeerAuthentication ns/name` (or Istio's kind).
    pub source: String,
    /// Labels the pod must carry.
    pub selector: BTreeMap<String, String>,
    /// Its workload-wide mode, `None` to inherit.
    pub mode: Option<MtlsMode>,
    /// Container port -> mode.
    pub ports: BTreeMap<u16, MtlsMode>,
}

impl WorkloadPolicy {
    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// Every mTLS policy of the world, ready to resolve.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MtlsPolicies {
    /// Namespace -> its first namespace-wide PeerAuthentication: where it comes from and its
    /// mode (`None`: UNSET). The root namespace's is the mesh-wide default.
    pub namespace_policies: BTreeMap<String, (String, Option<MtlsMode>)>,
    /// Namespace -> its `weft.dev/mtls-mode` annotation.
    pub annotations: BTreeMap<String, Sourced>,
    /// Namespace -> its selector policies, in name order.
    pub workloads: BTreeMap<String, Vec<WorkloadPolicy>>,
    /// Namespace -> its `weft.dev/egress-hosts` (validated), read from the same Namespace
    /// objects and carried to its sidecars in their `weft-inbound` Listener.
    pub egress_hosts: BTreeMap<String, Vec<String>>,
}

/// How one workload accepts inbound connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WorkloadMtls {
    /// Its mode on ports with no override.
    pub mode: Sourced,
    /// Container port -> mode, where a policy overrides it.
    pub ports: BTreeMap<u16, Sourced>,
}

impl WorkloadMtls {
    /// The mode on one container port.
    pub fn on(&self, port: u16) -> MtlsMode {
        self.ports.get(&port).map_or(self.mode.mode, |s| s.mode)
    }
}

impl MtlsPolicies {
    /// Reads every PeerAuthentication and Namespace of the world (objects are in key order, so
    /// "the first by name" is deterministic).
    pub fn from_objects<'a>(objects: impl Iterator<Item = &'a Object>) -> Self {
        let mut out = MtlsPolicies::default();
        for obj in objects {
            let (pa, kind): (&crate::objects::Named<PeerAuthenticationSpec>, &str) = match obj {
                Object::PeerAuthentication(p) => (p, "PeerAuthentication"),
                Object::IstioPeerAuthentication(p) => {
                    (p, crate::objects::ISTIO_PEER_AUTHENTICATION)
                }
                Object::Namespace(n) => {
                    let name = n.metadata.name.clone().unwrap_or_default();
                    if let Some(hosts) = n
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(weft_proto::keys::EGRESS_HOSTS_ANNOTATION))
                        .and_then(|h| weft_proto::visibility::parse_egress_hosts(h).ok())
                    {
                        out.egress_hosts.insert(
                            name.clone(),
                            hosts
                                .into_iter()
                                .map(|h| format!("{}/{}", h.namespace, h.host))
                                .collect(),
                        );
                    }
                    if let Some(mode) = n
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(weft_proto::keys::MTLS_MODE_ANNOTATION))
                        .and_then(|m| MtlsMode::parse(m).ok())
                    {
                        let source = format!("Namespace {name}");
                        out.annotations.insert(name, Sourced { mode, source });
                    }
                    continue;
                }
                _ => continue,
            };
            let source = format!("{kind} {}/{}", pa.namespace, pa.name);
            let mode = pa.spec.mtls.as_ref().and_then(|m| m.mode());
            match &pa.spec.selector {
                Some(sel) => {
                    out.workloads
                        .entry(pa.namespace.clone())
                        .or_default()
                        .push(WorkloadPolicy {
                            source,
                            selector: sel.match_labels.clone(),
                            mode,
                            ports: pa.spec.port_modes(),
                        })
                }
                None => {
                    let slot = out
                        .namespace_policies
                        .entry(pa.namespace.clone())
                        .or_insert_with(|| (source.clone(), mode));
                    if source < slot.0 {
                        *slot = (source, mode);
                    }
                }
            }
        }
        for list in out.workloads.values_mut() {
            list.sort_by(|a, b| a.source.cmp(&b.source));
        }
        out
    }

    /// The mode of a namespace's workloads that no selector policy covers.
    pub fn namespace_mode(&self, namespace: &str) -> Sourced {
        let policy = |ns: &str| {
            self.namespace_policies.get(ns).and_then(|(source, mode)| {
                mode.map(|mode| Sourced {
                    mode,
                    source: source.clone(),
                })
            })
        };
        policy(namespace)
            .or_else(|| self.annotations.get(namespace).cloned())
            .or_else(|| policy(weft_proto::keys::CONTROL_PLANE_NAMESPACE))
            .unwrap_or_else(|| Sourced {
                mode: MtlsMode::Permissive,
                source: "default".into(),
            })
    }

    /// How a pod accepts inbound connections; `labels` is `None` when the pod is not known.
    pub fn resolve(
        &self,
        namespace: &str,
        labels: Option<&BTreeMap<String, String>>,
    ) -> WorkloadMtls {
        let base = self.namespace_mode(namespace);
        let policies = self
            .workloads
            .get(namespace)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let Some(labels) = labels else {
            // Unknown pod: the strictest any policy of its namespace could make it.
            let strict = policies.iter().find(|p| {
                p.mode == Some(MtlsMode::Strict) || p.ports.values().any(|m| *m == MtlsMode::Strict)
            });
            return WorkloadMtls {
                mode: match strict {
                    Some(p) => Sourced {
                        mode: MtlsMode::Strict,
                        source: format!("{} (pod not known yet)", p.source),
                    },
                    None => base,
                },
                ports: BTreeMap::new(),
            };
        };
        match policies.iter().find(|p| p.selects(labels)) {
            Some(p) => WorkloadMtls {
                mode: p.mode.map_or(base, |mode| Sourced {
                    mode,
                    source: p.source.clone(),
                }),
                ports: p
                    .ports
                    .iter()
                    .map(|(port, mode)| {
                        (
                            *port,
                            Sourced {
                                mode: *mode,
                                source: p.source.clone(),
                            },
                        )
                    })
                    .collect(),
            },
            None => WorkloadMtls {
                mode: base,
                ports: BTreeMap::new(),
            },
        }
    }

    /// Pods (namespace/name) that more than one selector policy matches: only the first counts.
    pub fn conflicts<'a>(
        &self,
        pods: impl Iterator<Item = (&'a str, &'a str, &'a BTreeMap<String, String>)>,
    ) -> Vec<(String, Vec<String>)> {
        let mut out = Vec::new();
        for (ns, pod, labels) in pods {
            let matching: Vec<String> = self
                .workloads
                .get(ns)
                .into_iter()
                .flatten()
                .filter(|p| p.selects(labels))
                .map(|p| p.source.clone())
                .collect();
            if matching.len() > 1 {
                out.push((format!("{ns}/{pod}"), matching));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::parse_object;
    use serde_json::json;

    fn world(docs: Vec<serde_json::Value>) -> MtlsPolicies {
        let objs: Vec<Object> = docs
            .into_iter()
            .map(|d| parse_object(d).expect("valid").expect("known"))
            .collect();
        MtlsPolicies::from_objects(objs.iter())
    }

    fn pa(ns: &str, name: &str, spec: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": ns}, "spec": spec})
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_most_specific_policy_wins_and_unset_inherits() {
        let p = world(vec![
            pa("weft-system", "mesh", json!({"mtls": {"mode": "STRICT"}})),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "legacy",
                "annotations": {"weft.dev/mtls-mode": "PERMISSIVE"}}}),
            pa("shop", "ns", json!({"mtls": {"mode": "PERMISSIVE"}})),
            // The first namespace policy says UNSET: the annotation decides, not the second.
            pa("quiet", "b-strict", json!({"mtls": {"mode": "STRICT"}})),
            pa("quiet", "a-unset", json!({"mtls": {"mode": "UNSET"}})),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "quiet",
                "annotations": {"weft.dev/mtls-mode": "PERMISSIVE"}}}),
            pa(
                "shop",
                "db",
                json!({"selector": {"matchLabels": {"app": "db"}},
                "mtls": {"mode": "STRICT"}, "portLevelMtls": {"9100": {"mode": "PERMISSIVE"}}}),
            ),
            pa(
                "shop",
                "web",
                json!({"selector": {"matchLabels": {"app": "web"}},
                "mtls": {"mode": "UNSET"}, "portLevelMtls": {"8443": {"mode": "STRICT"}}}),
            ),
        ]);
        // The mesh default reaches a namespace that says nothing; the annotation beats it.
        assert_eq!(p.namespace_mode("other").mode, MtlsMode::Strict);
        assert_eq!(p.namespace_mode("legacy").mode, MtlsMode::Permissive);
        assert_eq!(
            p.namespace_mode("quiet"),
            Sourced {
                mode: MtlsMode::Permissive,
                source: "Namespace quiet".into()
            }
        );
        // Namespace policy, then the workload's, then its port.
        let db = p.resolve("shop", Some(&labels(&[("app", "db")])));
        assert_eq!(
            (db.on(5432), db.on(9100)),
            (MtlsMode::Strict, MtlsMode::Permissive)
        );
        assert_eq!(
            db.mode.source,
            "PeerAuthentication.security.istio.io shop/db"
        );
        let web = p.resolve("shop", Some(&labels(&[("app", "web"), ("v", "2")])));
        assert_eq!(
            (web.on(80), web.on(8443)),
            (MtlsMode::Permissive, MtlsMode::Strict)
        );
        let other = p.resolve("shop", Some(&labels(&[("app", "cache")])));
        assert_eq!(other.on(6379), MtlsMode::Permissive);
        // A pod not known yet gets the strictest its namespace's policies could give it.
        assert_eq!(p.resolve("shop", None).on(80), MtlsMode::Strict);
        assert_eq!(p.resolve("legacy", None).on(80), MtlsMode::Permissive);
    }

    #[test]
    fn two_policies_selecting_one_pod_are_reported_and_the_first_by_name_wins() {
        let p = world(vec![
            pa(
                "a",
                "z-loose",
                json!({"selector": {"matchLabels": {"app": "x"}},
                "mtls": {"mode": "PERMISSIVE"}}),
            ),
            pa(
                "a",
                "a-strict",
                json!({"selector": {"matchLabels": {}}, "mtls": {"mode": "STRICT"}}),
            ),
        ]);
        let l = labels(&[("app", "x")]);
        assert_eq!(p.resolve("a", Some(&l)).on(1), MtlsMode::Strict);
        let c = p.conflicts([("a", "x-1", &l)].into_iter());
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].1.len(), 2);
    }

    #[test]
    fn bad_policies_are_refused_with_the_field() {
        for (spec, field) in [
            (json!({"mtls": {"mode": "strict"}}), "spec.mtls.mode"),
            (
                json!({"portLevelMtls": {"80": {"mode": "STRICT"}}}),
                "spec.portLevelMtls",
            ),
            (
                json!({"selector": {"matchLabels": {}}, "portLevelMtls": {"http": {"mode": "STRICT"}}}),
                "spec.portLevelMtls[\"http\"]",
            ),
            (
                json!({"mtls": {"mode": "STRICT"}, "action": "DENY"}),
                "spec",
            ),
        ] {
            let e = parse_object(pa("a", "p", spec.clone())).expect_err("refused");
            assert!(e.field.starts_with(field), "{spec}: {e}");
        }
        let e = parse_object(
            json!({"apiVersion": "security.istio.io/v2", "kind": "PeerAuthentication",
            "metadata": {"name": "p"}, "spec": {}}),
        )
        .expect_err("refused");
        assert_eq!(e.field, "apiVersion");
    }
}
