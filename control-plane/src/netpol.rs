//! Kubernetes `networking.k8s.io/v1` NetworkPolicy, read for diagnosis only — enforcing it
//! stays the CNI's job. [`NetworkPolicies::blocked`] answers whether the world's policies let
//! a TCP connection from one pod to another pod's port through, and which policies decided,
//! with the API's semantics: a pod selected by no policy of a direction is open in it; once
//! selected, only what some rule of a selecting policy allows passes (rules are ORed; a rule
//! without peers allows every peer, without ports every port). `weftctl check` uses it to
//! report when NetworkPolicy blocks mesh traffic (`crate::check`).
//!
//! Mesh traffic crosses the network exactly as the application's would: a sidecar dials the
//! endpoint's pod IP and container port (the redirect to 15006 happens inside the pod), and
//! every sidecar dials the control plane on 15012. `ipBlock` is applied to pod IPs too (what
//! most CNIs do; the API leaves it to the implementation).

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_proto::rbac::Cidr;

use crate::objects::Object;

/// The label every namespace carries with its own name (set by the API server).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A pod as the policies see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its IP, when known (`status.podIP`, else an EndpointSlice naming it).
    pub ip: Option<IpAddr>,
    /// Its containers' named TCP ports (what a policy's named port resolves to).
    pub named_ports: BTreeMap<String, u16>,
    /// Its service account.
    pub service_account: String,
    /// Its sidecar terminates mTLS (labelled `weft.dev/tls-mode: weft`).
    pub meshed: bool,
}

/// The direction a policy restricts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    /// Into the selected pods.
    Ingress,
    /// Out of the selected pods.
    Egress,
}

impl Direction {
    /// Its name in the API (`policyTypes`).
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "Ingress",
            Direction::Egress => "Egress",
        }
    }
}

/// Why a connection does not pass: the pod the direction is about is selected by these
/// policies (`namespace/name`), and none of their rules of that direction allows it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Blocked {
    /// Ingress of the destination, or egress of the source.
    pub direction: Direction,
    /// The selecting policies, `namespace/name`, in name order.
    pub policies: Vec<String>,
}

/// A label selector, compiled (`matchLabels` and `matchExpressions`, ANDed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Selector {
    labels: BTreeMap<String, String>,
    expressions: Vec<(String, Op, Vec<String>)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Selector {
    fn compile(s: &LabelSelector, field: &str) -> Result<Self, (String, String)> {
        let mut expressions = Vec::new();
        for (i, e) in s.match_expressions.iter().flatten().enumerate() {
            let op = match e.operator.as_str() {
                "In" => Op::In,
                "NotIn" => Op::NotIn,
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    return Err((
                        format!("{field}.matchExpressions[{i}].operator"),
                        format!("{other:?} is not In, NotIn, Exists or DoesNotExist"),
                    ));
                }
            };
            let values = e.values.clone().unwrap_or_default();
            if matches!(op, Op::In | Op::NotIn) && values.is_empty() {
                return Err((
                    format!("{field}.matchExpressions[{i}].values"),
                    format!("{:?} needs at least one value", e.operator),
                ));
            }
            expressions.push((e.key.clone(), op, values));
        }
        Ok(Selector {
            labels: s.match_labels.clone().unwrap_or_default(),
            expressions,
        })
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|(k, op, values)| {
                let v = labels.get(k);
                match op {
                    Op::In => v.is_some_and(|v| values.contains(v)),
                    Op::NotIn => !v.is_some_and(|v| values.contains(v)),
                    Op::Exists => v.is_some(),
                    Op::DoesNotExist => v.is_none(),
                }
            })
    }
}

/// One peer of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Peer {
    /// Pods: in namespaces matching `namespaces` (`None`: the policy's own), with labels
    /// matching `pods` (`None`: every pod).
    Pods {
        namespaces: Option<Selector>,
        pods: Option<Selector>,
    },
    /// Addresses in `cidr` but none of `except`.
    Addresses { cidr: Cidr, except: Vec<Cidr> },
}

/// One port of a rule (TCP only: other protocols never carry mesh traffic).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Port {
    /// Any TCP port.
    Any,
    /// `port` to `end` (inclusive).
    Range(u16, u16),
    /// A container port by name (resolved on the destination pod).
    Named(String),
    /// Not TCP: matches no mesh connection.
    OtherProtocol,
}

/// One rule: `None` peers allow every peer; empty ports allow every port.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    peers: Option<Vec<Peer>>,
    ports: Vec<Port>,
}

/// One policy, compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Policy {
    namespace: String,
    name: String,
    selector: Selector,
    /// `None`: this policy does not restrict ingress.
    ingress: Option<Vec<Rule>>,
    /// `None`: this policy does not restrict egress.
    egress: Option<Vec<Rule>>,
}

fn peers(list: &[NetworkPolicyPeer], field: &str) -> Result<Vec<Peer>, (String, String)> {
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            let at = format!("{field}[{i}]");
            if let Some(b) = &p.ip_block {
                if p.pod_selector.is_some() || p.namespace_selector.is_some() {
                    return Err((
                        format!("{at}.ipBlock"),
                        "ipBlock cannot be combined with podSelector or namespaceSelector".into(),
                    ));
                }
                let cidr = Cidr::parse(&b.cidr).map_err(|m| (format!("{at}.ipBlock.cidr"), m))?;
                let except = b
                    .except
                    .iter()
                    .flatten()
                    .enumerate()
                    .map(|(j, e)| {
                        Cidr::parse(e).map_err(|m| (format!("{at}.ipBlock.except[{j}]"), m))
                    })
                    .collect::<Result<_, _>>()?;
                return Ok(Peer::Addresses { cidr, except });
            }
            if p.pod_selector.is_none() && p.namespace_selector.is_none() {
                return Err((
                    at,
                    "a peer needs podSelector, namespaceSelector or ipBlock".into(),
                ));
            }
            Ok(Peer::Pods {
                namespaces: p
                    .namespace_selector
                    .as_ref()
                    .map(|s| Selector::compile(s, &format!("{at}.namespaceSelector")))
                    .transpose()?,
                pods: p
                    .pod_selector
                    .as_ref()
                    .map(|s| Selector::compile(s, &format!("{at}.podSelector")))
                    .transpose()?,
            })
        })
        .collect()
}

fn ports(list: &[NetworkPolicyPort], field: &str) -> Result<Vec<Port>, (String, String)> {
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            let at = format!("{field}[{i}]");
            if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                return Ok(Port::OtherProtocol);
            }
            let number = |n: i32, f: &str| {
                u16::try_from(n)
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| (format!("{at}.{f}"), format!("{n} is not a port (1-65535)")))
            };
            match &p.port {
                None => Ok(Port::Any),
                Some(IntOrString::String(name)) => match name.parse::<i32>() {
                    Ok(n) => Ok(Port::Range(number(n, "port")?, number(n, "port")?)),
                    Err(_) => Ok(Port::Named(name.clone())),
                },
                Some(IntOrString::Int(n)) => {
                    let from = number(*n, "port")?;
                    let to = match p.end_port {
                        Some(e) => number(e, "endPort")?,
                        None => from,
                    };
                    if to < from {
                        return Err((
                            format!("{at}.endPort"),
                            format!("{to} is below port {from}"),
                        ));
                    }
                    Ok(Port::Range(from, to))
                }
            }
        })
        .collect()
}

/// One ingress (`from`) or egress (`to`) rule at `at`.
fn rule(
    list: Option<&[NetworkPolicyPeer]>,
    port_list: Option<&[NetworkPolicyPort]>,
    at: &str,
    peer_field: &str,
) -> Result<Rule, (String, String)> {
    Ok(Rule {
        peers: match list {
            None | Some([]) => None,
            Some(list) => Some(peers(list, &format!("{at}.{peer_field}"))?),
        },
        ports: ports(port_list.unwrap_or_default(), &format!("{at}.ports"))?,
    })
}

/// Compiles one NetworkPolicy; the error names the field that is wrong.
fn compile(np: &NetworkPolicy) -> Result<Policy, (String, String)> {
    let spec = np.spec.clone().unwrap_or_default();
    let selector = match &spec.pod_selector {
        Some(s) => Selector::compile(s, "spec.podSelector")?,
        None => Selector::default(),
    };
    let types = match &spec.policy_types {
        Some(t) => {
            for (i, v) in t.iter().enumerate() {
                if v != "Ingress" && v != "Egress" {
                    return Err((
                        format!("spec.policyTypes[{i}]"),
                        format!("{v:?} is not Ingress or Egress"),
                    ));
                }
            }
            (
                t.iter().any(|v| v == "Ingress"),
                t.iter().any(|v| v == "Egress"),
            )
        }
        // Unset: Ingress always, Egress when the policy has egress rules.
        None => (true, spec.egress.is_some()),
    };
    let ingress = types
        .0
        .then(|| {
            spec.ingress
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, r)| {
                    rule(
                        r.from.as_deref(),
                        r.ports.as_deref(),
                        &format!("spec.ingress[{i}]"),
                        "from",
                    )
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let egress = types
        .1
        .then(|| {
            spec.egress
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, r)| {
                    rule(
                        r.to.as_deref(),
                        r.ports.as_deref(),
                        &format!("spec.egress[{i}]"),
                        "to",
                    )
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    Ok(Policy {
        namespace: np
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: np.metadata.name.clone().unwrap_or_default(),
        selector,
        ingress,
        egress,
    })
}

/// Checks a NetworkPolicy the way it will be read: the error names the field.
pub fn validate(np: &NetworkPolicy) -> Result<(), (String, String)> {
    compile(np).map(|_| ())
}

/// Every NetworkPolicy of the world, with the namespace labels and pods they are judged on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkPolicies {
    policies: Vec<Policy>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Every Pod of the world, by `namespace/name`.
    pub pods: BTreeMap<(String, String), PodInfo>,
}

impl NetworkPolicies {
    /// Reads NetworkPolicies, Namespaces and Pods from `objects` (a policy that does not
    /// compile was refused at parse time; one that still fails here is skipped). Pod IPs come
    /// from `status.podIP`; [`NetworkPolicies::learn_ip`] adds those only EndpointSlices know.
    pub fn from_objects<'a>(objects: impl Iterator<Item = &'a Object>) -> Self {
        let mut out = NetworkPolicies::default();
        for o in objects {
            match o {
                Object::NetworkPolicy(np) => {
                    if let Ok(p) = compile(np) {
                        out.policies.push(p);
                    }
                }
                Object::Namespace(ns) => {
                    let name = ns.metadata.name.clone().unwrap_or_default();
                    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
                    labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
                    out.namespaces.insert(name, labels);
                }
                Object::Pod(p) => {
                    let namespace = p
                        .metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into());
                    let name = p.metadata.name.clone().unwrap_or_default();
                    let labels = p.metadata.labels.clone().unwrap_or_default();
                    let spec = p.spec.as_ref();
                    let named_ports = spec
                        .into_iter()
                        .flat_map(|s| s.containers.iter())
                        .flat_map(|c| c.ports.iter().flatten())
                        .filter(|cp| cp.protocol.as_deref().unwrap_or("TCP") == "TCP")
                        .filter_map(|cp| {
                            Some((cp.name.clone()?, u16::try_from(cp.container_port).ok()?))
                        })
                        .collect();
                    let info = PodInfo {
                        meshed: labels
                            .get(weft_proto::keys::TLS_MODE_LABEL)
                            .is_some_and(|v| v == "weft"),
                        ip: p
                            .status
                            .as_ref()
                            .and_then(|s| s.pod_ip.as_deref())
                            .and_then(|ip| ip.parse().ok()),
                        service_account: spec
                            .and_then(|s| s.service_account_name.clone())
                            .unwrap_or_else(|| "default".into()),
                        namespace: namespace.clone(),
                        name: name.clone(),
                        labels,
                        named_ports,
                    };
                    out.pods.insert((namespace, name), info);
                }
                _ => {}
            }
        }
        out.policies
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }

    /// Whether there is any NetworkPolicy.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Records `ip` for pod `namespace/name` when its status did not say.
    pub fn learn_ip(&mut self, namespace: &str, name: &str, ip: IpAddr) {
        if let Some(p) = self
            .pods
            .get_mut(&(namespace.to_string(), name.to_string()))
        {
            p.ip.get_or_insert(ip);
        }
    }

    fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        self.namespaces.get(ns).cloned().unwrap_or_else(|| {
            // A namespace with no Namespace object (the file source): its name label only.
            BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())])
        })
    }

    fn peer_matches(&self, policy_ns: &str, peer: &Peer, pod: &PodInfo) -> bool {
        match peer {
            Peer::Addresses { cidr, except } => pod
                .ip
                .is_some_and(|ip| cidr.contains(ip) && !except.iter().any(|e| e.contains(ip))),
            Peer::Pods { namespaces, pods } => {
                let ns_ok = match namespaces {
                    None => pod.namespace == policy_ns,
                    Some(sel) => sel.matches(&self.namespace_labels(&pod.namespace)),
                };
                ns_ok && pods.as_ref().is_none_or(|s| s.matches(&pod.labels))
            }
        }
    }

    fn rule_allows(
        &self,
        policy_ns: &str,
        rule: &Rule,
        peer: &PodInfo,
        dst: &PodInfo,
        port: u16,
    ) -> bool {
        let port_ok = rule.ports.is_empty()
            || rule.ports.iter().any(|p| match p {
                Port::Any => true,
                Port::Range(a, b) => (*a..=*b).contains(&port),
                Port::Named(n) => dst.named_ports.get(n) == Some(&port),
                Port::OtherProtocol => false,
            });
        port_ok
            && rule
                .peers
                .as_ref()
                .is_none_or(|list| list.iter().any(|p| self.peer_matches(policy_ns, p, peer)))
    }

    /// One direction: the policies selecting `subject` in it, and whether any rule allows.
    fn judge(
        &self,
        direction: Direction,
        subject: &PodInfo,
        peer: &PodInfo,
        dst: &PodInfo,
        port: u16,
    ) -> Option<Blocked> {
        let selecting: Vec<&Policy> = self
            .policies
            .iter()
            .filter(|p| p.namespace == subject.namespace && p.selector.matches(&subject.labels))
            .filter(|p| match direction {
                Direction::Ingress => p.ingress.is_some(),
                Direction::Egress => p.egress.is_some(),
            })
            .collect();
        if selecting.is_empty() {
            return None;
        }
        let allowed = selecting.iter().any(|p| {
            let rules = match direction {
                Direction::Ingress => p.ingress.as_deref(),
                Direction::Egress => p.egress.as_deref(),
            };
            rules
                .unwrap_or_default()
                .iter()
                .any(|r| self.rule_allows(&p.namespace, r, peer, dst, port))
        });
        (!allowed).then(|| Blocked {
            direction,
            policies: selecting
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect(),
        })
    }

    /// Whether a TCP connection from pod `from` to pod `to` on container port `port` is
    /// blocked: first the source's egress, then the destination's ingress. `None`: it passes.
    pub fn blocked(&self, from: &PodInfo, to: &PodInfo, port: u16) -> Option<Blocked> {
        self.judge(Direction::Egress, from, to, to, port)
            .or_else(|| self.judge(Direction::Ingress, to, from, to, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(docs: &[serde_json::Value]) -> NetworkPolicies {
        let objects: Vec<Object> = docs
            .iter()
            .map(|d| {
                crate::objects::parse_object(d.clone())
                    .expect("valid")
                    .expect("known kind")
            })
            .collect();
        NetworkPolicies::from_objects(objects.iter())
    }

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ip: &str) -> serde_json::Value {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": ip}})
    }

    fn np(ns: &str, name: &str, spec: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec})
    }

    fn world(policies: Vec<serde_json::Value>) -> NetworkPolicies {
        let mut docs = vec![
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "shop", "labels": {"team": "shop"}}}),
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "ops", "labels": {"team": "ops"}}}),
            pod("shop", "web", &[("app", "web")], "198.18.0.1"),
            pod("shop", "db", &[("app", "db")], "198.18.0.2"),
            pod("ops", "probe", &[("app", "probe")], "198.18.1.1"),
        ];
        docs.extend(policies);
        parse(&docs)
    }

    fn get<'a>(w: &'a NetworkPolicies, ns: &str, name: &str) -> &'a PodInfo {
        w.pods
            .get(&(ns.to_string(), name.to_string()))
            .expect("pod")
    }

    /// (description, policies, from, to, port, blocked: None or (direction, policies)).
    #[test]
    fn policies_decide_as_the_api_says() {
        use serde_json::json;
        type Case = (
            &'static str,
            Vec<serde_json::Value>,
            (&'static str, &'static str),
            (&'static str, &'static str),
            u16,
            Option<(Direction, Vec<&'static str>)>,
        );
        let deny_all = np(
            "shop",
            "deny-all",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        );
        let cases: Vec<Case> = vec![
            (
                "no policy: open",
                vec![],
                ("shop", "web"),
                ("shop", "db"),
                5432,
                None,
            ),
            (
                "deny-all blocks egress first",
                vec![deny_all.clone()],
                ("shop", "web"),
                ("shop", "db"),
                5432,
                Some((Direction::Egress, vec!["shop/deny-all"])),
            ),
            (
                "deny-all ingress for a caller from elsewhere",
                vec![deny_all.clone()],
                ("ops", "probe"),
                ("shop", "db"),
                5432,
                Some((Direction::Ingress, vec!["shop/deny-all"])),
            ),
            (
                "policyTypes unset: Ingress only",
                vec![np(
                    "shop",
                    "in",
                    json!({"podSelector": {"matchLabels": {"app": "db"}}}),
                )],
                ("shop", "db"),
                ("ops", "probe"),
                80,
                None,
            ),
            (
                "podSelector peer in the policy's namespace",
                vec![np(
                    "shop",
                    "db",
                    json!({"podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}),
                )],
                ("shop", "web"),
                ("shop", "db"),
                5432,
                None,
            ),
            (
                "a podSelector peer does not reach other namespaces",
                vec![np(
                    "shop",
                    "db",
                    json!({"podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [{"from": [{"podSelector": {}}]}]}),
                )],
                ("ops", "probe"),
                ("shop", "db"),
                5432,
                Some((Direction::Ingress, vec!["shop/db"])),
            ),
            (
                "namespaceSelector by label",
                vec![np(
                    "shop",
                    "db",
                    json!({"podSelector": {},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "ops"}}}]}]}),
                )],
                ("ops", "probe"),
                ("shop", "db"),
                5432,
                None,
            ),
            (
                "namespaceSelector and podSelector are ANDed",
                vec![np(
                    "shop",
                    "db",
                    json!({"podSelector": {},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "ops"}}, "podSelector": {"matchLabels": {"app": "other"}}}]}]}),
                )],
                ("ops", "probe"),
                ("shop", "db"),
                5432,
                Some((Direction::Ingress, vec!["shop/db"])),
            ),
            (
                "the name label every namespace has",
                vec![np(
                    "shop",
                    "db",
                    json!({"podSelector": {},
                "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["ops"]}]}}]}]}),
                )],
                ("ops", "probe"),
                ("shop", "db"),
                5432,
                None,
            ),
            (
                "ports restrict: another port blocked",
                vec![np(
                    "shop",
                    "db",
                    json!({"podSelector": {},
                "ingress": [{"ports": [{"port": 5432}]}]}),
                )],
                ("shop", "web"),
                ("shop", "db"),
                15006,
                Some((Direction::Ingress, vec!["shop/db"])),
            ),
            (
                "endPort range",
                vec![np(
                    "shop",
                    "db",
                    json!({"podSelector": {},
                "ingress": [{"ports": [{"port": 15000, "endPort": 15010}]}]}),
                )],
                ("shop", "web"),
                ("shop", "db"),
                15006,
                None,
            ),
            (
                "named port resolves on the destination pod",
                vec![np(
                    "shop",
                    "db",
                    json!({"podSelector": {},
                "ingress": [{"ports": [{"port": "http"}]}]}),
                )],
                ("shop", "web"),
                ("shop", "db"),
                8080,
                None,
            ),
            (
                "UDP rules do not carry TCP",
                vec![np(
                    "shop",
                    "db",
                    json!({"podSelector": {},
                "ingress": [{"ports": [{"port": 5432, "protocol": "UDP"}]}]}),
                )],
                ("shop", "web"),
                ("shop", "db"),
                5432,
                Some((Direction::Ingress, vec!["shop/db"])),
            ),
            (
                "ipBlock with except",
                vec![np(
                    "shop",
                    "db",
                    json!({"podSelector": {},
                "ingress": [{"from": [{"ipBlock": {"cidr": "198.18.0.0/16", "except": ["198.18.1.0/24"]}}]}]}),
                )],
                ("ops", "probe"),
                ("shop", "db"),
                5432,
                Some((Direction::Ingress, vec!["shop/db"])),
            ),
            (
                "rules of several policies are ORed",
                vec![
                    np(
                        "shop",
                        "a",
                        json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "nobody"}}}]}]}),
                    ),
                    np(
                        "shop",
                        "b",
                        json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}),
                    ),
                ],
                ("shop", "web"),
                ("shop", "db"),
                5432,
                None,
            ),
            (
                "egress allowed to the destination's port",
                vec![np(
                    "shop",
                    "out",
                    json!({"podSelector": {"matchLabels": {"app": "web"}},
                "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}], "ports": [{"port": 5432}]}]}),
                )],
                ("shop", "web"),
                ("shop", "db"),
                5432,
                None,
            ),
            (
                "egress elsewhere blocked",
                vec![np(
                    "shop",
                    "out",
                    json!({"podSelector": {"matchLabels": {"app": "web"}},
                "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}]}]}),
                )],
                ("shop", "web"),
                ("ops", "probe"),
                15012,
                Some((Direction::Egress, vec!["shop/out"])),
            ),
            (
                "NotIn and DoesNotExist",
                vec![np(
                    "shop",
                    "db",
                    json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]},
                "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}}]}]}),
                )],
                ("shop", "web"),
                ("shop", "db"),
                5432,
                None,
            ),
        ];
        for (what, policies, from, to, port, want) in cases {
            let w = world(policies);
            let got = w.blocked(get(&w, from.0, from.1), get(&w, to.0, to.1), port);
            let want = want.map(|(direction, p)| Blocked {
                direction,
                policies: p.into_iter().map(String::from).collect(),
            });
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn bad_policies_name_the_field() {
        use serde_json::json;
        for (spec, field) in [
            (
                json!({"podSelector": {}, "policyTypes": ["Inbound"]}),
                "spec.policyTypes[0]",
            ),
            (
                json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "198.18.0.0/40"}}]}]}),
                "spec.ingress[0].from[0].ipBlock.cidr",
            ),
            (
                json!({"podSelector": {}, "egress": [{"ports": [{"port": 70000}]}]}),
                "spec.egress[0].ports[0].port",
            ),
            (
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
                "spec.ingress[0].ports[0].endPort",
            ),
            (
                json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Maybe"}]}}),
                "spec.podSelector.matchExpressions[0].operator",
            ),
            (
                json!({"podSelector": {}, "ingress": [{"from": [{}]}]}),
                "spec.ingress[0].from[0]",
            ),
        ] {
            let e =
                crate::objects::parse_object(np("shop", "bad", spec.clone())).expect_err("refused");
            assert_eq!(e.field, field, "{spec}: {e:?}");
            assert_eq!(e.object, "NetworkPolicy shop/bad");
        }
    }
}
