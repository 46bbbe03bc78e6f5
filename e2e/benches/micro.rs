//! Criterion micro-benchmarks of the hot pieces (not tests):
//! - the balancer pick, per algorithm, over 10 to 10 000 endpoints (goal ≤ 1 µs at 1000);
//! - route matching: host lookup then the first matching rule of an HTTPRoute with 20 rules;
//! - the translator: a whole model of 100 and 1000 services, and one service changed;
//! - authorization: one request judged by the sidecar's RBAC engine against 10 and 100
//!   AuthorizationPolicy rules compiled by the control plane (goal ≤ 1 µs at 100), for a
//!   request the last rule allows and one no rule matches (every rule tried).
//!
//!   cargo bench -p weft-e2e --bench micro            # all
//!   cargo bench -p weft-e2e --bench micro -- pick    # a subset

#![allow(missing_docs)] // criterion_group!/criterion_main! generate undocumented functions

use std::collections::HashMap;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use prost::Message;
use weft_control_plane::catalog::{Catalog, SourceUpdate};
use weft_sidecar::balance::Algorithm;
use weft_sidecar::load::LocalityLoad;
use weft_sidecar::state::{Endpoint, EndpointSpec, Endpoints};

fn endpoints(n: usize, algorithm: Algorithm) -> Endpoints {
    let eps = (0..n)
        .map(|i| {
            let addr = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8080));
            let spec = EndpointSpec {
                zone: "a".into(),
                origin: "c1".into(),
                ..EndpointSpec::at(addr)
            };
            Endpoint::new(spec, Arc::default(), Arc::new(LocalityLoad::new("a")))
        })
        .collect();
    Endpoints::new(vec![eps], 140, algorithm)
}

fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    for algorithm in [
        Algorithm::PeakEwma,
        Algorithm::LeastRequest,
        Algorithm::RoundRobin,
        Algorithm::Random,
        Algorithm::RingHash,
        Algorithm::Maglev,
    ] {
        for n in [10usize, 100, 1000, 10_000] {
            let eps = endpoints(n, algorithm);
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            g.bench_with_input(BenchmarkId::new(format!("{algorithm:?}"), n), &n, |b, _| {
                b.iter(|| {
                    // xorshift: a cheap, deterministic random stream.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    black_box(eps.pick(x, Some(x.rotate_left(17))).map(|t| t.addr))
                })
            });
        }
    }
    g.finish();
}

fn parse(yaml: &str) -> SourceUpdate {
    let docs: Vec<serde_json::Value> = yaml
        .split("\n---\n")
        .filter_map(|d| serde_saphyr::from_str(d).ok())
        .collect();
    SourceUpdate {
        upserts: docs
            .into_iter()
            .filter_map(|d| weft_control_plane::objects::parse_object(d).ok().flatten())
            .map(|o| (Arc::new(o), "bench.yaml".to_string()))
            .collect(),
        initial_sync_done: true,
        ..SourceUpdate::default()
    }
}

fn world(services: usize) -> String {
    let mut docs = Vec::new();
    for s in 0..services {
        docs.push(weft_testkit::world::service(&format!("svc-{s}"), 80));
        let eps: Vec<(SocketAddr, &str, bool)> = (0..10)
            .map(|e| {
                (
                    SocketAddr::from(([10, 1, (s % 250) as u8, e as u8], 8080)),
                    "n1",
                    true,
                )
            })
            .collect();
        docs.push(weft_testkit::world::slice(
            &format!("svc-{s}"),
            &format!("svc-{s}"),
            &eps,
        ));
    }
    docs.join("---\n")
}

fn routes(c: &mut Criterion) {
    // An HTTPRoute on svc-0 with 20 rules (prefix and header matches) to svc-1.
    let mut rules = String::new();
    for r in 0..20 {
        rules.push_str(&format!(
            "  - matches: [{{path: {{type: PathPrefix, value: /api/v{r}}}, headers: [{{name: x-tenant, value: t{r}}}]}}]\n    backendRefs: [{{name: svc-1, port: 80}}]\n"
        ));
    }
    let route = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: default}}\nspec:\n  parentRefs: [{{kind: Service, name: svc-0, port: 80}}]\n  rules:\n{rules}"
    );
    let catalog = Catalog::new("cluster-1", "cluster.local");
    catalog.apply(parse(&format!("{}---\n{route}", world(2))));
    assert!(
        catalog.current().errors.is_empty(),
        "{:?}",
        catalog.current().errors
    );
    let t = weft_control_plane::translate::translate(&catalog.current(), None);
    let mut hosts: HashMap<String, Arc<Vec<weft_sidecar::state::Route>>> = HashMap::new();
    for svc in t.services.values() {
        for r in &svc.routes {
            let rc = weft_proto::envoy::envoy::config::route::v3::RouteConfiguration::decode(
                r.any.value.as_slice(),
            )
            .expect("route configuration");
            for (domains, routes) in weft_sidecar::state::compile_routes(&rc).expect("compiles") {
                let routes = Arc::new(routes);
                for d in domains {
                    hosts.insert(d, routes.clone());
                }
            }
        }
    }
    let mut headers = http::HeaderMap::new();
    headers.insert("x-tenant", http::HeaderValue::from_static("t17"));
    c.bench_function("route/host+20-rule match", |b| {
        b.iter(|| {
            let routes = hosts
                .get(black_box("svc-0.default.svc.cluster.local"))
                .expect("host");
            black_box(
                routes
                    .iter()
                    .position(|r| r.matches(black_box("/api/v17/items"), &headers)),
            )
        })
    });
}

fn translator(c: &mut Criterion) {
    let mut g = c.benchmark_group("translate");
    g.sample_size(10);
    for n in [100usize, 1000] {
        let catalog = Catalog::new("cluster-1", "cluster.local");
        catalog.apply(parse(&world(n)));
        let model = catalog.current();
        g.bench_with_input(BenchmarkId::new("whole model", n), &n, |b, _| {
            b.iter(|| {
                black_box(
                    weft_control_plane::translate::translate(&model, None)
                        .services
                        .len(),
                )
            })
        });
        // One service changed: the rest keep their translation.
        let prev = weft_control_plane::translate::translate(&model, None);
        catalog.apply(parse(&weft_testkit::world::service("svc-0", 8080)));
        let changed = catalog.current();
        g.bench_with_input(BenchmarkId::new("one service changed", n), &n, |b, _| {
            b.iter(|| {
                black_box(
                    weft_control_plane::translate::translate(&changed, Some(&prev))
                        .changed
                        .len(),
                )
            })
        });
    }
    g.finish();
}

/// The engine for `rules` ALLOW rules (principal, method and path each) plus one DENY rule,
/// as the control plane compiles them for a workload.
fn authz_engine(rules: usize, principals: bool) -> weft_proto::rbac::Engine {
    use weft_control_plane::authz::{AuthzPolicies, Chain, compile};
    let rule = |i: usize| match principals {
        true => serde_json::json!({
            "from": [{"source": {"principals": [format!("cluster.local/ns/ns{i}/sa/sa{i}")]}}],
            "to": [{"operation": {"methods": ["GET", "HEAD"], "paths": [format!("/api/v{i}/*")]}}],
        }),
        // No principal: every rule is tried (the worst case).
        false => serde_json::json!({
            "to": [{"operation": {"methods": ["GET", "HEAD"], "paths": [format!("/api/v{i}/*")]}}],
        }),
    };
    let doc = |name: &str, spec: serde_json::Value| {
        weft_control_plane::objects::parse_object(serde_json::json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "shop"}, "spec": spec}))
        .expect("parses")
        .expect("read")
    };
    let objects = [
        doc(
            "allow",
            serde_json::json!({"rules": (0..rules).map(rule).collect::<Vec<_>>()}),
        ),
        doc(
            "deny",
            serde_json::json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}]}),
        ),
    ];
    let all = AuthzPolicies::from_objects(objects.iter());
    let applied = all.for_workload("shop", None, &Default::default());
    let rbacs: Vec<_> = compile(&applied, Chain::Http)
        .into_iter()
        .map(|(a, p)| {
            let wire = weft_proto::rbac::wire::Rbac::new(a, p);
            weft_proto::envoy::envoy::config::rbac::v3::Rbac::decode(
                wire.encode_to_vec().as_slice(),
            )
            .expect("decodes")
        })
        .collect();
    weft_proto::rbac::Engine::new(rbacs.iter().map(Some)).expect("compiles")
}

fn authz(c: &mut Criterion) {
    let mut g = c.benchmark_group("authz");
    let headers = http::HeaderMap::new();
    for (rules, principals) in [(10usize, true), (100, true), (100, false)] {
        let engine = authz_engine(rules, principals);
        let last = rules - 1;
        let principal = format!("spiffe://cluster.local/ns/ns{last}/sa/sa{last}");
        let path = format!("/api/v{last}/items?page=2");
        let shape = if principals { "" } else { "paths-only-" };
        for (case, principal) in [
            ("last-rule-allows", principal.as_str()),
            ("none-matches", "spiffe://cluster.local/ns/x/sa/y"),
        ] {
            let none = case == "none-matches";
            let path = if none && !principals {
                "/other"
            } else {
                path.as_str()
            };
            let input = weft_proto::rbac::Input {
                principal: Some(principal),
                source: "198.18.0.9".parse().expect("ip"),
                destination: "198.18.0.1:8080".parse().expect("addr"),
                http: Some(weft_proto::rbac::HttpInput {
                    method: "GET",
                    path,
                    authority: "web.shop.svc.cluster.local",
                    headers: &headers,
                }),
            };
            assert_eq!(engine.evaluate(&input).allowed, !none);
            g.bench_with_input(
                BenchmarkId::new(format!("{shape}{case}"), rules),
                &rules,
                |b, _| b.iter(|| black_box(engine.evaluate(black_box(&input)).allowed)),
            );
        }
    }
    g.finish();
}

criterion_group!(benches, pick, routes, translator, authz);
criterion_main!(benches);
