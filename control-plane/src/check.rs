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

/// The control plane's own pods carry this label (install/03-control-plane.yaml).
pub const CONTROL_PLANE_LABEL: (&str, &str) = ("app.kubernetes.io/name", "weft-control-plane");
/// The port every sidecar dials on the control plane (xDS and certificates, TLS).
pub const CONTROL_PLANE_PORT: u16 = 15012;
/// The sidecar's inbound port, an endpoint port when a workload lists its sidecar directly.
pub const INBOUND_PORT: u16 = 15006;
/// At most this many `netpol-blocks-*` findings of one code (then one saying how many more).
pub const MAX_NETPOL_FINDINGS: usize = 50;

/// One NetworkPolicy finding per group: what blocked, the direction, where from and to.
fn netpol_finding(
    code: &str,
    blocked: &crate::netpol::Blocked,
    what: String,
    fix: &str,
) -> Finding {
    finding(
        code,
        format!(
            "NetworkPolicy {}",
            blocked.policies.join(", NetworkPolicy ")
        ),
        format!(
            "{what}: blocked by {} (they select the pod for {} and none of their {} rules allows it)",
            blocked.policies.join(", "),
            blocked.direction.as_str(),
            blocked.direction.as_str().to_lowercase(),
        ),
        fix,
    )
}

/// NetworkPolicies that block mesh traffic (the CNI enforces them; this only reads them):
/// a meshed pod's connection to the control plane (15012, else its sidecar has neither
/// config nor identity); a connection to an endpoint listed at the sidecar's inbound port
/// (15006); and a meshed caller that a Service's AuthorizationPolicies let in. Callers are
/// judged one per (namespace, service account, labels); findings are grouped and capped.
fn netpol_findings(model: &Model, out: &mut Vec<Finding>) {
    use std::collections::BTreeMap;
    let np = &model.netpol;
    if np.is_empty() {
        return;
    }
    let mut callers: BTreeMap<_, &crate::netpol::PodInfo> = BTreeMap::new();
    for p in np.pods.values().filter(|p| p.meshed) {
        callers
            .entry((&p.namespace, &p.service_account, &p.labels))
            .or_insert(p);
    }
    // The control plane, from every meshed namespace.
    let (label, value) = CONTROL_PLANE_LABEL;
    let mut groups: BTreeMap<(String, crate::netpol::Blocked), (Vec<String>, String)> =
        BTreeMap::new();
    for cp in np
        .pods
        .values()
        .filter(|p| p.labels.get(label).is_some_and(|v| v == value))
    {
        for c in callers.values() {
            if let Some(b) = np.blocked(c, cp, CONTROL_PLANE_PORT) {
                let g = groups
                    .entry((c.namespace.clone(), b))
                    .or_insert_with(|| (Vec::new(), format!("{}/{}", cp.namespace, cp.name)));
                g.0.push(format!("{}/{}", c.namespace, c.name));
            }
        }
    }
    for ((ns, b), (pods, cp)) in groups {
        out.push(netpol_finding(
            "netpol-blocks-control-plane",
            &b,
            format!(
                "meshed pods of namespace {ns} ({}) cannot reach the control plane {cp} on {CONTROL_PLANE_PORT}: their sidecars get no config and no certificate",
                pods.join(", ")
            ),
            "allow TCP 15012 between the meshed pods and the control plane pods (app.kubernetes.io/name: weft-control-plane): an egress rule in the caller's namespace, an ingress rule in the control plane's",
        ));
    }
    // Callers the mesh lets in (or any meshed caller of an endpoint at 15006).
    let ports =
        crate::inbound::PortIndex::build(model.services.values().map(|s| &**s), &model.cluster);
    let mut groups: BTreeMap<(String, String, crate::netpol::Blocked), Vec<u16>> = BTreeMap::new();
    for s in model.services.values() {
        for e in s.endpoints.iter().filter(|e| e.cluster == model.cluster) {
            let Some(dst) = e
                .pod
                .as_ref()
                .and_then(|pod| np.pods.get(&(s.key.namespace.clone(), pod.clone())))
            else {
                continue;
            };
            let ips = [e.address];
            let w = crate::inbound::Workload {
                namespace: &s.key.namespace,
                pod: e.pod.as_deref(),
                ips: &ips,
            };
            let engine = crate::inbound::chains_for(model, &ports, &w).ok().map(|c| {
                let opaque = s.ports.iter().all(|p| {
                    weft_proto::protocol::Declared::of(&p.protocol())
                        == Some(weft_proto::protocol::Declared::Opaque)
                });
                if opaque { c.tcp } else { c.http }
            });
            for c in callers.values() {
                let id = weft_proto::SpiffeId::new(
                    &model.trust_domain,
                    &c.namespace,
                    &c.service_account,
                )
                .map(|id| id.to_string())
                .ok();
                let allowed = engine.as_ref().is_some_and(|en| {
                    !en.is_empty() && id.as_deref().is_some_and(|id| en.may_allow(Some(id)))
                });
                for port in e.ports.values().copied() {
                    if !(allowed || port == INBOUND_PORT) {
                        continue;
                    }
                    if let Some(b) = np.blocked(c, dst, port) {
                        let caller = format!(
                            "{}/{} ({}/{})",
                            c.namespace, c.service_account, c.namespace, c.name
                        );
                        let ports = groups.entry((format!("{}", s.key), caller, b)).or_default();
                        if !ports.contains(&port) {
                            ports.push(port);
                        }
                    }
                }
            }
        }
    }
    let total = groups.len();
    for ((svc, caller, b), ports) in groups.into_iter().take(MAX_NETPOL_FINDINGS) {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        out.push(netpol_finding(
            "netpol-blocks-mesh-traffic",
            &b,
            format!(
                "caller {caller} cannot reach Service {svc} (endpoint port {}), which the mesh would let in",
                ports.join(", ")
            ),
            "allow the caller in the listed NetworkPolicies (the port is the endpoint's container port: the sidecar redirects it inside the pod), or deny it in an AuthorizationPolicy too so the two agree",
        ));
    }
    if total > MAX_NETPOL_FINDINGS {
        out.push(finding(
            "netpol-blocks-mesh-traffic",
            "NetworkPolicy".into(),
            format!(
                "{} more caller and Service pairs are blocked the same way",
                total - MAX_NETPOL_FINDINGS
            ),
            "see the findings above",
        ));
    }
}

/// Every problem in `model` and `proxies`, in a stable order.
pub fn check(model: &Model, proxies: &[ProxyStatus], ctx: &Context) -> Vec<Finding> {
    let mut out = Vec::new();
    authz_findings(model, proxies, &mut out);
    netpol_findings(model, &mut out);
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
