//! `weftctl check`: the failures people actually hit, found in the model and the proxies'
//! xDS state, each with the object, the cause and the fix. Pure over its inputs.

use weft_proto::admin::{Finding, ProxyStatus, SyncState};

use crate::catalog::Model;

fn finding(code: &str, object: String, problem: String, fix: &str) -> Finding {
    Finding {
        code: code.into(),
        object,
        problem,
        fix: fix.into(),
    }
}

/// What `check` reads besides the model and the proxies.
#[derive(Default)]
pub struct Context {
    /// Federation peers by cluster name.
    pub peers: std::collections::BTreeMap<String, crate::federation::PeerInfo>,
    /// The last certificate issued to each connected proxy (by node id).
    pub certs: std::collections::BTreeMap<String, crate::identity::IssuedCert>,
    /// When the CA (root or intermediate) expires, seconds since the epoch.
    pub ca_expires_unix: Option<i64>,
    /// Now, seconds since the epoch.
    pub now_unix: i64,
}

/// A CA certificate expiring within this many seconds is reported.
pub const CA_EXPIRY_WARNING_SECONDS: i64 = 30 * 86_400;

/// AuthorizationPolicies that select no workload, and Services whose ALLOW policies let no
/// current caller in (the mesh's identities, from its endpoints and connected proxies, and
/// plaintext), judged by the sidecars' engine on what each endpoint would be sent.
fn authz_findings(model: &Model, proxies: &[ProxyStatus], out: &mut Vec<Finding>) {
    use std::collections::{BTreeMap, BTreeSet};
    if model.authz.is_empty() {
        return;
    }
    let ports =
        crate::inbound::PortIndex::build(model.services.values().map(|s| &**s), &model.cluster);
    // Every pod the model knows, with the Services of its namespace it is an endpoint of,
    // and the endpoints of this cluster that name no pod (no labels known: by address).
    let mut workloads: Vec<(String, BTreeMap<String, String>, BTreeSet<String>)> = model
        .pod_labels
        .iter()
        .map(|(k, labels)| {
            let w = crate::inbound::Workload {
                namespace: &k.namespace,
                pod: Some(&k.name),
                ips: &[],
            };
            (k.namespace.clone(), labels.clone(), ports.services_of(&w))
        })
        .collect();
    for s in model.services.values() {
        for e in s
            .endpoints
            .iter()
            .filter(|e| e.cluster == model.cluster && e.pod.is_none())
        {
            let ips = [e.address];
            let w = crate::inbound::Workload {
                namespace: &s.key.namespace,
                pod: None,
                ips: &ips,
            };
            workloads.push((
                s.key.namespace.clone(),
                BTreeMap::new(),
                ports.services_of(&w),
            ));
        }
    }
    if !workloads.is_empty() {
        for p in model.authz.selecting_nothing(&workloads) {
            out.push(finding(
                "authz-selects-nothing",
                format!("AuthorizationPolicy {}/{}", p.namespace, p.name),
                "selects no workload: no Pod has its selector's labels or is an endpoint of its targetRefs".into(),
                "correct spec.selector or spec.targetRefs (or delete the policy)",
            ));
        }
    }
    let mut callers: BTreeSet<String> = model
        .services
        .values()
        .flat_map(|s| s.endpoints.iter().filter_map(|e| e.identity.clone()))
        .collect();
    for p in proxies {
        if let Ok(id) =
            weft_proto::SpiffeId::new(&model.trust_domain, &p.namespace, &p.service_account)
        {
            callers.insert(id.to_string());
        }
    }
    for s in model.services.values() {
        for e in s.endpoints.iter().filter(|e| e.cluster == model.cluster) {
            let ips = [e.address];
            let w = crate::inbound::Workload {
                namespace: &s.key.namespace,
                pod: e.pod.as_deref(),
                ips: &ips,
            };
            let Ok(chains) = crate::inbound::chains_for(model, &ports, &w) else {
                continue;
            };
            let opaque = s.ports.iter().all(|p| {
                weft_proto::protocol::Declared::of(&p.protocol())
                    == Some(weft_proto::protocol::Declared::Opaque)
            });
            let engine = if opaque { &chains.tcp } else { &chains.http };
            let reachable =
                engine.may_allow(None) || callers.iter().any(|c| engine.may_allow(Some(c)));
            if !reachable {
                out.push(finding(
                    "authz-unreachable",
                    format!("Service {}", s.key),
                    format!(
                        "endpoint {} ({}): its ALLOW AuthorizationPolicies let in none of the mesh's {} current caller identities, nor plaintext callers",
                        e.address,
                        e.pod.as_deref().unwrap_or("no pod"),
                        callers.len()
                    ),
                    "add an ALLOW rule for the callers that need it (weftctl authz check --from NS/SA --to SERVICE tells what is decided), or remove the ALLOW policy",
                ));
                break;
            }
        }
    }
}

/// Every problem in `model` and `proxies`, in a stable order.
pub fn check(model: &Model, proxies: &[ProxyStatus], ctx: &Context) -> Vec<Finding> {
    let mut out = Vec::new();
    authz_findings(model, proxies, &mut out);
    for e in &model.errors {
        let object = if e.object.is_empty() {
            e.file.clone()
        } else {
            e.object.clone()
        };
        let field = if e.field.is_empty() {
            String::new()
        } else {
            format!("field {}: ", e.field)
        };
        out.push(finding(
            "invalid-object",
            object,
            format!("{field}{} (in {})", e.message, e.file),
            "correct the object; until then its last good version (if any) keeps serving",
        ));
    }
    // Services that other services route to only through themselves (split or route roots)
    // legitimately have no endpoints of their own.
    let is_root = |s: &crate::catalog::ServiceModel| {
        s.routes
            .values()
            .flatten()
            .any(|r| r.backends.iter().any(|b| b.service != s.key))
    };
    for s in model.services.values() {
        let obj = format!("Service {}", s.key);
        if !s.selector.is_empty() {
            let pods_in_ns: Vec<_> = model
                .pod_labels
                .iter()
                .filter(|(k, _)| k.namespace == s.key.namespace)
                .collect();
            let matched = pods_in_ns
                .iter()
                .any(|(_, labels)| s.selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
            if !pods_in_ns.is_empty() && !matched {
                let sel: Vec<String> = s.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
                out.push(finding(
                    "selector-matches-no-pod",
                    obj.clone(),
                    format!(
                        "selector {} matches no Pod in namespace {}",
                        sel.join(","),
                        s.key.namespace
                    ),
                    "fix the selector or the Pods' labels",
                ));
            }
        }
        if !is_root(s) && !s.endpoints.iter().any(|e| e.ready) {
            out.push(finding(
                "no-ready-endpoints",
                obj.clone(),
                format!(
                    "{} endpoints, none ready: requests to it fail",
                    s.endpoints.len()
                ),
                "check the Pods behind it (readiness probes, crashes) or its EndpointSlices",
            ));
        }
        let remote_plaintext = s
            .policy
            .as_ref()
            .and_then(|p| p.locality.as_ref())
            .and_then(|l| l.remote_plaintext)
            .unwrap_or(false);
        let unused: Vec<&crate::catalog::EndpointModel> = s
            .endpoints
            .iter()
            .filter(|e| !crate::translate::usable(e, &model.cluster, remote_plaintext))
            .collect();
        if let Some(first) = unused.first() {
            out.push(finding(
                "remote-plaintext-refused",
                obj.clone(),
                format!(
                    "{} endpoints of other clusters (e.g. {} in cluster {}) have no sidecar: callers here do not send them plaintext across clusters",
                    unused.len(),
                    first.address,
                    first.cluster
                ),
                "mesh those pods, or accept plaintext with a TrafficPolicy locality.remotePlaintext: true",
            ));
        }
        for p in &s.ports {
            if p.name.is_empty() && p.app_protocol.is_none() && s.ports.len() == 1 {
                out.push(finding(
                    "port-protocol-unknown",
                    obj.clone(),
                    format!(
                        "port {} has neither a name nor appProtocol: its protocol is guessed",
                        p.port
                    ),
                    "name the port (http, grpc, ...) or set appProtocol",
                ));
            }
        }
    }
    let pods = model
        .pod_labels
        .iter()
        .map(|(k, l)| (k.namespace.as_str(), k.name.as_str(), l));
    for (pod, policies) in model.mtls.conflicts(pods) {
        out.push(finding(
            "peer-authentication-conflict",
            format!("Pod {pod}"),
            format!(
                "{} PeerAuthentications select it: {}; only {} applies",
                policies.len(),
                policies.join(", "),
                policies[0]
            ),
            "make the selectors disjoint, or merge the policies into one",
        ));
    }
    for p in proxies {
        for t in &p.types {
            if t.state() == SyncState::Nacked {
                out.push(finding(
                    "config-nacked",
                    format!("proxy {}", p.node_id),
                    format!(
                        "rejected {} version {}: {}",
                        weft_proto::type_url::short(&t.type_url),
                        t.sent_version,
                        t.nack_detail
                    ),
                    "fix the object the message names; the proxy keeps its previous config meanwhile",
                ));
            }
        }
        if let Some(c) = ctx.certs.get(&p.node_id)
            && c.near_expiry(ctx.now_unix)
        {
            let left = c.not_after_unix - ctx.now_unix;
            out.push(finding(
                "cert-near-expiry",
                format!("proxy {}", p.node_id),
                if left > 0 {
                    format!(
                        "its certificate ({}) expires in {left} s, with less than a quarter of its life left: it stopped renewing",
                        c.spiffe_id
                    )
                } else {
                    format!("its certificate ({}) expired {} s ago", c.spiffe_id, -left)
                },
                "check the sidecar's log for 'certificate request failed' and that it reaches the control plane's TLS port; restarting it with a fresh join token re-bootstraps it",
            ));
        }
    }
    if let Some(exp) = ctx.ca_expires_unix
        && exp - ctx.now_unix < CA_EXPIRY_WARNING_SECONDS
    {
        out.push(finding(
            "cert-near-expiry",
            "the mesh CA".into(),
            format!(
                "the root or this control plane's intermediate expires in {} days: no SVID can outlive it",
                (exp - ctx.now_unix) / 86_400
            ),
            "rotate the CA (ARCHITECTURE.md, root rotation) or issue a new intermediate under the root",
        ));
    }
    for (name, p) in &ctx.peers {
        use crate::federation::LinkState;
        let since = |t: Option<std::time::Instant>| t.map_or(0, |t| t.elapsed().as_secs());
        match p.state {
            LinkState::Stale => out.push(finding(
                "peer-stale",
                format!("peer {name}"),
                format!(
                    "the link to {} has been down for {} s: its endpoints are kept, marked stale, until the grace period ends ({})",
                    p.address,
                    since(p.lost_at),
                    p.last_error
                ),
                "check the peer control plane is up and its TLS port reachable from here; its endpoints leave when the grace period ends",
            )),
            LinkState::Expired => out.push(finding(
                "peer-stale",
                format!("peer {name}"),
                format!(
                    "the link to {} has been down for {} s, longer than the grace period: its endpoints were removed ({})",
                    p.address,
                    since(p.lost_at),
                    p.last_error
                ),
                "bring the peer back (or remove its --peer / MeshPeer); it resyncs by itself when reachable",
            )),
            LinkState::Connecting if !p.last_error.is_empty() => out.push(finding(
                "peer-unreachable",
                format!("peer {name}"),
                format!("never synced with {}: {}", p.address, p.last_error),
                "check the address, that both clusters share the root, and that the peer's name is its --cluster-name",
            )),
            _ => {}
        }
    }
    out
}
