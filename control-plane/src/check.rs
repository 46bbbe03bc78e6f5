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

/// Every problem in `model` and `proxies`, in a stable order.
pub fn check(model: &Model, proxies: &[ProxyStatus]) -> Vec<Finding> {
    let mut out = Vec::new();
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
    }
    out
}
