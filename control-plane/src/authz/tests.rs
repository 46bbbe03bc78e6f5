//! The policy compiler, table-driven: each case is a set of policies, a request and what
//! Envoy's RBAC semantics (the sidecar's engine, `weft_proto::rbac`) must decide for it.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use serde_json::{Value, json};
use weft_proto::envoy::envoy::config::rbac::v3 as pb;
use weft_proto::rbac::{Engine, HttpInput, Input};

use super::*;

const ALICE: &str = "spiffe://cluster.local/ns/shop/sa/alice";
const BOB: &str = "spiffe://cluster.local/ns/shop/sa/bob";
const EVE: &str = "spiffe://cluster.local/ns/test-e2e/sa/eve";

fn object(ns: &str, name: &str, spec: Value) -> Object {
    crate::objects::parse_object(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns}, "spec": spec}))
    .expect("parses")
    .expect("a kind Weft reads")
}

/// The engine a workload `shop` pod labelled `app=web`, endpoint of Service `web`, runs.
fn engine_for(
    objects: &[Object],
    chain: Chain,
    labels: Option<&BTreeMap<String, String>>,
) -> Engine {
    let all = AuthzPolicies::from_objects(objects.iter());
    let services: BTreeSet<String> = ["web".to_string()].into();
    let applied = all.for_workload("shop", labels, &services);
    let rbacs: Vec<pb::Rbac> = compile(&applied, chain)
        .into_iter()
        .map(|(a, p)| {
            let wire = weft_proto::rbac::wire::Rbac::new(a, p);
            pb::Rbac::decode(wire.encode_to_vec().as_slice()).expect("decodes")
        })
        .collect();
    Engine::new(rbacs.iter().map(Some)).expect("the compiler emits only what the engine runs")
}

fn web_labels() -> BTreeMap<String, String> {
    [("app".to_string(), "web".to_string())].into()
}

/// A request: (principal, source ip, port, method, path, host, headers).
struct Req {
    principal: Option<&'static str>,
    source: &'static str,
    port: u16,
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: &'static [(&'static str, &'static str)],
}

const GET: Req = Req {
    principal: Some(ALICE),
    source: "198.18.0.9",
    port: 8080,
    method: "GET",
    path: "/api/items?x=1",
    host: "web.shop.svc.cluster.local",
    headers: &[],
};

fn decide(e: &Engine, r: &Req, chain: Chain) -> (bool, Option<String>) {
    let mut headers = http::HeaderMap::new();
    for (k, v) in r.headers {
        headers.append(
            http::HeaderName::from_static(k),
            http::HeaderValue::from_static(v),
        );
    }
    let http = HttpInput {
        method: r.method,
        path: r.path,
        authority: r.host,
        headers: &headers,
    };
    let input = Input {
        principal: r.principal,
        source: r.source.parse().expect("ip"),
        destination: std::net::SocketAddr::new("198.18.0.1".parse().expect("ip"), r.port),
        http: (chain == Chain::Http).then_some(http),
    };
    let d = e.evaluate(&input);
    (d.allowed, d.policy.map(str::to_string))
}

fn allow(rules: Value) -> Value {
    json!({"action": "ALLOW", "rules": rules})
}

fn deny(rules: Value) -> Value {
    json!({"action": "DENY", "rules": rules})
}

#[test]
fn every_field_and_istios_precedence() {
    let p0 = "ns[shop]-policy[p]-rule[0]";
    // (case, policies in shop, request, allowed)
    type Case = (&'static str, Vec<Value>, Req, bool);
    let cases: Vec<Case> = vec![
        (
            "no policy allows all",
            vec![],
            Req {
                principal: None,
                ..GET
            },
            true,
        ),
        (
            "principal exact",
            vec![allow(
                json!([{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/alice"]}}]}]),
            )],
            GET,
            true,
        ),
        (
            "principal exact: another",
            vec![allow(
                json!([{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/alice"]}}]}]),
            )],
            Req {
                principal: Some(BOB),
                ..GET
            },
            false,
        ),
        (
            "principal: plaintext has none",
            vec![allow(
                json!([{"from": [{"source": {"principals": ["*"]}}]}]),
            )],
            Req {
                principal: None,
                ..GET
            },
            false,
        ),
        (
            "principal *: any authenticated",
            vec![allow(
                json!([{"from": [{"source": {"principals": ["*"]}}]}]),
            )],
            Req {
                principal: Some(EVE),
                ..GET
            },
            true,
        ),
        (
            "principal prefix",
            vec![allow(
                json!([{"from": [{"source": {"principals": ["cluster.local/ns/shop/*"]}}]}]),
            )],
            Req {
                principal: Some(BOB),
                ..GET
            },
            true,
        ),
        (
            "principal prefix: elsewhere",
            vec![allow(
                json!([{"from": [{"source": {"principals": ["cluster.local/ns/shop/*"]}}]}]),
            )],
            Req {
                principal: Some(EVE),
                ..GET
            },
            false,
        ),
        (
            "principal suffix",
            vec![allow(
                json!([{"from": [{"source": {"principals": ["*/sa/eve"]}}]}]),
            )],
            Req {
                principal: Some(EVE),
                ..GET
            },
            true,
        ),
        (
            "notPrincipals",
            vec![allow(
                json!([{"from": [{"source": {"notPrincipals": ["cluster.local/ns/shop/sa/bob"]}}]}]),
            )],
            Req {
                principal: Some(BOB),
                ..GET
            },
            false,
        ),
        (
            "notPrincipals: others",
            vec![allow(
                json!([{"from": [{"source": {"notPrincipals": ["cluster.local/ns/shop/sa/bob"]}}]}]),
            )],
            GET,
            true,
        ),
        (
            "namespaces exact",
            vec![allow(
                json!([{"from": [{"source": {"namespaces": ["shop"]}}]}]),
            )],
            GET,
            true,
        ),
        (
            "namespaces exact: another",
            vec![allow(
                json!([{"from": [{"source": {"namespaces": ["shop"]}}]}]),
            )],
            Req {
                principal: Some(EVE),
                ..GET
            },
            false,
        ),
        (
            "namespaces exact: plaintext",
            vec![allow(
                json!([{"from": [{"source": {"namespaces": ["shop"]}}]}]),
            )],
            Req {
                principal: None,
                ..GET
            },
            false,
        ),
        (
            "namespaces prefix",
            vec![allow(
                json!([{"from": [{"source": {"namespaces": ["test-*"]}}]}]),
            )],
            Req {
                principal: Some(EVE),
                ..GET
            },
            true,
        ),
        (
            "namespaces suffix",
            vec![allow(
                json!([{"from": [{"source": {"namespaces": ["*-e2e"]}}]}]),
            )],
            Req {
                principal: Some(EVE),
                ..GET
            },
            true,
        ),
        (
            "namespaces suffix: another",
            vec![allow(
                json!([{"from": [{"source": {"namespaces": ["*-e2e"]}}]}]),
            )],
            GET,
            false,
        ),
        (
            "notNamespaces",
            vec![allow(
                json!([{"from": [{"source": {"notNamespaces": ["test-e2e"]}}]}]),
            )],
            Req {
                principal: Some(EVE),
                ..GET
            },
            false,
        ),
        (
            "serviceAccounts",
            vec![allow(
                json!([{"from": [{"source": {"serviceAccounts": ["shop/bob"]}}]}]),
            )],
            Req {
                principal: Some(BOB),
                ..GET
            },
            true,
        ),
        (
            "serviceAccounts: another",
            vec![allow(
                json!([{"from": [{"source": {"serviceAccounts": ["shop/bob"]}}]}]),
            )],
            GET,
            false,
        ),
        (
            "notServiceAccounts",
            vec![allow(
                json!([{"from": [{"source": {"notServiceAccounts": ["shop/bob"]}}]}]),
            )],
            Req {
                principal: Some(BOB),
                ..GET
            },
            false,
        ),
        (
            "ipBlocks CIDR",
            vec![allow(
                json!([{"from": [{"source": {"ipBlocks": ["198.18.0.0/24"]}}]}]),
            )],
            Req {
                principal: None,
                ..GET
            },
            true,
        ),
        (
            "ipBlocks single address: another",
            vec![allow(
                json!([{"from": [{"source": {"ipBlocks": ["198.18.0.8"]}}]}]),
            )],
            GET,
            false,
        ),
        (
            "notIpBlocks",
            vec![allow(
                json!([{"from": [{"source": {"notIpBlocks": ["198.18.0.9"]}}]}]),
            )],
            GET,
            false,
        ),
        (
            "remoteIpBlocks: the peer's address",
            vec![allow(
                json!([{"from": [{"source": {"remoteIpBlocks": ["198.18.0.9/32"]}}]}]),
            )],
            GET,
            true,
        ),
        (
            "two sources: either",
            vec![allow(
                json!([{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/bob"]}}, {"source": {"namespaces": ["test-e2e"]}}]}]),
            )],
            Req {
                principal: Some(EVE),
                ..GET
            },
            true,
        ),
        (
            "fields of one source: all",
            vec![allow(
                json!([{"from": [{"source": {"namespaces": ["shop"], "ipBlocks": ["203.0.113.0/24"]}}]}]),
            )],
            GET,
            false,
        ),
        (
            "hosts, case-insensitive",
            vec![allow(
                json!([{"to": [{"operation": {"hosts": ["WEB.shop.svc.cluster.local"]}}]}]),
            )],
            GET,
            true,
        ),
        (
            "hosts prefix",
            vec![allow(
                json!([{"to": [{"operation": {"hosts": ["web.*"]}}]}]),
            )],
            GET,
            true,
        ),
        (
            "notHosts",
            vec![allow(
                json!([{"to": [{"operation": {"notHosts": ["*.cluster.local"]}}]}]),
            )],
            GET,
            false,
        ),
        (
            "ports",
            vec![allow(json!([{"to": [{"operation": {"ports": ["8080"]}}]}]))],
            GET,
            true,
        ),
        (
            "ports: another",
            vec![allow(json!([{"to": [{"operation": {"ports": ["9090"]}}]}]))],
            GET,
            false,
        ),
        (
            "notPorts",
            vec![allow(
                json!([{"to": [{"operation": {"notPorts": ["8080"]}}]}]),
            )],
            GET,
            false,
        ),
        (
            "methods",
            vec![allow(
                json!([{"to": [{"operation": {"methods": ["GET", "HEAD"]}}]}]),
            )],
            GET,
            true,
        ),
        (
            "methods: another",
            vec![allow(
                json!([{"to": [{"operation": {"methods": ["GET"]}}]}]),
            )],
            Req {
                method: "DELETE",
                ..GET
            },
            false,
        ),
        (
            "notMethods",
            vec![allow(
                json!([{"to": [{"operation": {"notMethods": ["DELETE"]}}]}]),
            )],
            Req {
                method: "DELETE",
                ..GET
            },
            false,
        ),
        (
            "paths exact, query ignored",
            vec![allow(
                json!([{"to": [{"operation": {"paths": ["/api/items"]}}]}]),
            )],
            GET,
            true,
        ),
        (
            "paths prefix",
            vec![allow(
                json!([{"to": [{"operation": {"paths": ["/api/*"]}}]}]),
            )],
            GET,
            true,
        ),
        (
            "paths suffix",
            vec![allow(
                json!([{"to": [{"operation": {"paths": ["*/items"]}}]}]),
            )],
            GET,
            true,
        ),
        (
            "paths exact: another",
            vec![allow(json!([{"to": [{"operation": {"paths": ["/api"]}}]}]))],
            GET,
            false,
        ),
        (
            "paths *",
            vec![allow(json!([{"to": [{"operation": {"paths": ["*"]}}]}]))],
            GET,
            true,
        ),
        (
            "notPaths",
            vec![allow(
                json!([{"to": [{"operation": {"notPaths": ["/api/*"]}}]}]),
            )],
            GET,
            false,
        ),
        (
            "from and to: both",
            vec![allow(
                json!([{"from": [{"source": {"namespaces": ["shop"]}}], "to": [{"operation": {"methods": ["POST"]}}]}]),
            )],
            GET,
            false,
        ),
        (
            "when request.headers",
            vec![allow(
                json!([{"when": [{"key": "request.headers[x-tenant]", "values": ["blue"]}]}]),
            )],
            Req {
                headers: &[("x-tenant", "blue")],
                ..GET
            },
            true,
        ),
        (
            "when request.headers: absent",
            vec![allow(
                json!([{"when": [{"key": "request.headers[x-tenant]", "values": ["blue"]}]}]),
            )],
            GET,
            false,
        ),
        (
            "when request.headers notValues",
            vec![allow(
                json!([{"when": [{"key": "request.headers[x-tenant]", "notValues": ["red"]}]}]),
            )],
            Req {
                headers: &[("x-tenant", "red")],
                ..GET
            },
            false,
        ),
        (
            "when source.principal",
            vec![allow(
                json!([{"when": [{"key": "source.principal", "values": ["cluster.local/ns/shop/sa/alice"]}]}]),
            )],
            GET,
            true,
        ),
        (
            "when source.namespace notValues",
            vec![allow(
                json!([{"when": [{"key": "source.namespace", "notValues": ["shop"]}]}]),
            )],
            GET,
            false,
        ),
        (
            "when destination.port",
            vec![allow(
                json!([{"when": [{"key": "destination.port", "values": ["8080"]}]}]),
            )],
            GET,
            true,
        ),
        (
            "when source.ip",
            vec![allow(
                json!([{"when": [{"key": "source.ip", "values": ["198.18.0.0/16"]}]}]),
            )],
            GET,
            true,
        ),
        (
            "when destination.ip",
            vec![allow(
                json!([{"when": [{"key": "destination.ip", "values": ["198.18.0.2"]}]}]),
            )],
            GET,
            false,
        ),
        // Precedence.
        (
            "DENY wins over ALLOW",
            vec![
                allow(json!([{}])),
                deny(json!([{"to": [{"operation": {"methods": ["GET"]}}]}])),
            ],
            GET,
            false,
        ),
        (
            "DENY not matching: ALLOW decides",
            vec![
                allow(json!([{}])),
                deny(json!([{"to": [{"operation": {"methods": ["DELETE"]}}]}])),
            ],
            GET,
            true,
        ),
        (
            "an ALLOW exists: what it does not match is denied",
            vec![allow(
                json!([{"to": [{"operation": {"methods": ["POST"]}}]}]),
            )],
            GET,
            false,
        ),
        (
            "an empty ALLOW rule allows all",
            vec![allow(json!([{}]))],
            Req {
                principal: None,
                ..GET
            },
            true,
        ),
        (
            "an ALLOW with no rules denies all",
            vec![json!({"action": "ALLOW"})],
            GET,
            false,
        ),
        (
            "a DENY with no rules denies nothing",
            vec![json!({"action": "DENY"})],
            GET,
            true,
        ),
        (
            "AUDIT only logs",
            vec![json!({"action": "AUDIT", "rules": [{}]})],
            GET,
            true,
        ),
        // Fail closed.
        (
            "ALLOW with request principals matches nothing",
            vec![allow(
                json!([{"from": [{"source": {"requestPrincipals": ["*"]}}]}]),
            )],
            GET,
            false,
        ),
        (
            "DENY with request principals drops them, denies more",
            vec![
                allow(json!([{}])),
                deny(
                    json!([{"from": [{"source": {"requestPrincipals": ["issuer/sub"]}}], "to": [{"operation": {"paths": ["/api/*"]}}]}]),
                ),
            ],
            GET,
            false,
        ),
        (
            "ALLOW with an unknown field matches nothing",
            vec![allow(
                json!([{"to": [{"operation": {"methods": ["GET"], "verbs": ["GET"]}}]}]),
            )],
            GET,
            false,
        ),
        (
            "ALLOW with an unknown condition key matches nothing",
            vec![allow(
                json!([{"when": [{"key": "request.auth.claims[group]", "values": ["admin"]}]}]),
            )],
            GET,
            false,
        ),
        (
            "DENY with an unknown condition key denies more",
            vec![deny(
                json!([{"when": [{"key": "connection.sni", "values": ["x"]}]}]),
            )],
            GET,
            false,
        ),
        (
            "ALLOW with an unreadable port matches nothing",
            vec![allow(json!([{"to": [{"operation": {"ports": ["http"]}}]}]))],
            GET,
            false,
        ),
        (
            "CUSTOM denies what it would ask about",
            vec![
                json!({"action": "CUSTOM", "provider": {"name": "ext"}, "rules": [{"to": [{"operation": {"paths": ["/api/*"]}}]}]}),
            ],
            GET,
            false,
        ),
        (
            "CUSTOM: what it would not ask about passes",
            vec![
                json!({"action": "CUSTOM", "provider": {"name": "ext"}, "rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}]}),
            ],
            GET,
            true,
        ),
    ];
    let mut failures = Vec::new();
    for (name, specs, req, want) in &cases {
        let objects: Vec<Object> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| object("shop", if i == 0 { "p" } else { "q" }, s.clone()))
            .collect();
        let e = engine_for(&objects, Chain::Http, Some(&web_labels()));
        let (allowed, _) = decide(&e, req, Chain::Http);
        if allowed != *want {
            failures.push(format!("{name}: allowed={allowed}, want {want}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // The deciding rule is named as Istio names it.
    let e = engine_for(
        &[object(
            "shop",
            "p",
            deny(json!([{}, {"to": [{"operation": {"methods": ["GET"]}}]}])),
        )],
        Chain::Http,
        Some(&web_labels()),
    );
    assert_eq!(decide(&e, &GET, Chain::Http), (false, Some(p0.to_string())));
}

#[test]
fn tcp_ports_get_the_rules_without_http_fields() {
    let tcp = |specs: Vec<Value>, req: Req| {
        let objects: Vec<Object> = specs
            .into_iter()
            .enumerate()
            .map(|(i, s)| object("shop", &format!("p{i}"), s))
            .collect();
        decide(
            &engine_for(&objects, Chain::Tcp, Some(&web_labels())),
            &req,
            Chain::Tcp,
        )
        .0
    };
    // Principal, namespace, port: judged on the connection.
    assert!(tcp(
        vec![allow(
            json!([{"from": [{"source": {"namespaces": ["shop"]}}], "to": [{"operation": {"ports": ["8080"]}}]}])
        )],
        GET
    ));
    assert!(!tcp(
        vec![allow(
            json!([{"from": [{"source": {"namespaces": ["shop"]}}]}])
        )],
        Req {
            principal: None,
            ..GET
        }
    ));
    // An ALLOW rule with an HTTP-only field matches no connection.
    assert!(!tcp(
        vec![allow(
            json!([{"to": [{"operation": {"methods": ["GET"]}}]}])
        )],
        GET
    ));
    // A DENY rule loses it: it covers every connection on its other terms.
    assert!(!tcp(
        vec![deny(
            json!([{"to": [{"operation": {"paths": ["/admin/*"], "ports": ["8080"]}}]}])
        )],
        GET
    ));
    assert!(tcp(
        vec![deny(
            json!([{"to": [{"operation": {"paths": ["/admin/*"], "ports": ["5432"]}}]}])
        )],
        GET
    ));
    // request.headers is HTTP-only too.
    assert!(!tcp(
        vec![deny(
            json!([{"when": [{"key": "request.headers[x-a]", "values": ["b"]}]}])
        )],
        GET
    ));
}

#[test]
fn which_policies_select_a_workload() {
    let objects = vec![
        object(
            "shop",
            "by-label",
            deny(json!([{"to": [{"operation": {"paths": ["/label"]}}]}])),
        ),
        object(
            "shop",
            "by-service",
            deny(json!([{"to": [{"operation": {"paths": ["/service"]}}]}])),
        ),
        object(
            "shop",
            "other-service",
            deny(json!([{"to": [{"operation": {"paths": ["/other"]}}]}])),
        ),
        object(
            "shop",
            "other-label",
            deny(json!([{"to": [{"operation": {"paths": ["/other-label"]}}]}])),
        ),
        object(
            "weft-system",
            "mesh",
            deny(json!([{"to": [{"operation": {"paths": ["/mesh"]}}]}])),
        ),
        object(
            "weft-system",
            "mesh-web",
            deny(json!([{"to": [{"operation": {"paths": ["/mesh-web"]}}]}])),
        ),
        object(
            "elsewhere",
            "ns-wide",
            deny(json!([{"to": [{"operation": {"paths": ["/elsewhere"]}}]}])),
        ),
    ];
    let mut objects = objects;
    let with = |o: &mut Object, key: &str, v: Value| {
        if let Object::AuthorizationPolicy(p) = o {
            match key {
                "selector" => p.spec.selector = serde_json::from_value(v).ok(),
                _ => p.spec.target_refs = serde_json::from_value(v).expect("refs"),
            }
        }
    };
    with(
        &mut objects[0],
        "selector",
        json!({"matchLabels": {"app": "web"}}),
    );
    with(
        &mut objects[1],
        "targetRefs",
        json!([{"kind": "Service", "group": "", "name": "web"}]),
    );
    with(
        &mut objects[2],
        "targetRefs",
        json!([{"kind": "Service", "group": "", "name": "db"}]),
    );
    with(
        &mut objects[3],
        "selector",
        json!({"matchLabels": {"app": "db"}}),
    );
    with(
        &mut objects[5],
        "selector",
        json!({"matchLabels": {"app": "web"}}),
    );
    let e = engine_for(&objects, Chain::Http, Some(&web_labels()));
    let at = |path: &'static str| decide(&e, &Req { path, ..GET }, Chain::Http).0;
    assert!(!at("/label"));
    assert!(!at("/service"));
    assert!(at("/other"));
    assert!(at("/other-label"));
    assert!(
        !at("/mesh"),
        "a root-namespace policy without selector applies mesh-wide"
    );
    assert!(
        !at("/mesh-web"),
        "a root-namespace selector applies in every namespace"
    );
    assert!(at("/elsewhere"));
    // Labels not known yet: every selector DENY applies (the one for app=db too) ...
    let e = engine_for(&objects, Chain::Http, None);
    assert!(
        !decide(
            &e,
            &Req {
                path: "/other-label",
                ..GET
            },
            Chain::Http
        )
        .0
    );
    // ... and a selector ALLOW that could select the pod makes it deny-all.
    let allow_web = {
        let mut o = object("shop", "web-only", allow(json!([{}])));
        with(&mut o, "selector", json!({"matchLabels": {"app": "web"}}));
        o
    };
    assert!(
        decide(
            &engine_for(
                std::slice::from_ref(&allow_web),
                Chain::Http,
                Some(&web_labels())
            ),
            &GET,
            Chain::Http
        )
        .0
    );
    assert!(
        !decide(
            &engine_for(&[allow_web], Chain::Http, None),
            &GET,
            Chain::Http
        )
        .0
    );
}

#[test]
fn what_cannot_be_enforced_is_reported_by_field() {
    let spec = |v: Value| -> AuthorizationPolicySpec { serde_json::from_value(v).expect("spec") };
    let gaps = unsupported(&spec(json!({
        "action": "CUSTOM",
        "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}],
                   "when": [{"key": "request.auth.claims[iss]", "values": ["x"]}],
                   "to": [{"operation": {"ports": ["http"], "verbs": ["GET"]}}]}],
        "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "gw"}],
        "extra": 1})));
    let fields: Vec<&str> = gaps.iter().map(|(f, _)| f.as_str()).collect();
    for want in [
        "spec.extra",
        "spec.action",
        "spec.targetRefs[0]",
        "spec.rules[0].from[0].source.requestPrincipals",
        "spec.rules[0].when[0].key",
        "spec.rules[0].to[0].operation.ports",
        "spec.rules[0].to[0].operation.verbs",
    ] {
        assert!(fields.contains(&want), "{want} missing from {fields:?}");
    }
    assert!(
        unsupported(&spec(
            json!({"rules": [{"to": [{"operation": {"paths": ["/a"]}}]}]})
        ))
        .is_empty()
    );
    // A header the proxy cannot look up is a gap (never sent: it would make the sidecar
    // refuse the whole Listener), and what is sent always runs on the sidecar's engine.
    for bad in ["request.headers[:scheme]", "request.headers[a b]"] {
        let s =
            spec(json!({"action": "DENY", "rules": [{"when": [{"key": bad, "values": ["x"]}]}]}));
        assert_eq!(unsupported(&s).len(), 1, "{bad}");
        let p = Arc::new(Named {
            namespace: "shop".into(),
            name: "p".into(),
            spec: s,
            status: None,
        });
        let chains = crate::inbound::filter_chains(&[p]);
        let engines = weft_proto::rbac::Chains::of(&chains).expect("runs on the sidecar");
        assert!(
            engines
                .http
                .describe()
                .iter()
                .any(|d| d.contains("policy[p]")),
            "{bad}"
        );
    }
    // A bad action is refused at parse time, naming the field.
    let e = crate::objects::parse_object(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "x", "namespace": "shop"}, "spec": {"action": "PERMIT"}}))
    .expect_err("refused");
    assert_eq!(e.field, "spec.action");
}

#[test]
fn replicas_compile_byte_identical_listeners() {
    let objects: Vec<Object> = (0..20)
        .map(|i| {
            object(
                "shop",
                &format!("p{i}"),
                deny(json!([{"to": [{"operation": {"paths": [format!("/p{i}")]}}]}])),
            )
        })
        .collect();
    let all = AuthzPolicies::from_objects(objects.iter());
    let applied = all.for_workload("shop", None, &BTreeSet::new());
    let a = crate::inbound::filter_chains(&applied);
    let b = crate::inbound::filter_chains(&all.for_workload("shop", None, &BTreeSet::new()));
    let bytes = |c: &Vec<weft_proto::envoy::envoy::config::listener::v3::FilterChain>| {
        c.iter()
            .flat_map(|c| c.encode_to_vec())
            .collect::<Vec<u8>>()
    };
    assert_eq!(bytes(&a), bytes(&b));
}
