//! The Kubernetes source against a **mock API server** (no real API server can run here; see
//! LAB.md): a small HTTP server in this file that answers the list and watch requests kube-rs
//! watchers make, status patches, and Lease reads and writes with resourceVersion conflicts.
//! The control plane under test is the real one, talking HTTP to it with the real kube client.
//!
//! With `WEFT_E2E_KUBECONFIG=/path/to/kubeconfig` the last test runs against a real cluster
//! instead (it needs Weft's CRDs installed); without it, it prints that it skipped and why.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use weft_control_plane::catalog::ServiceKey;
use weft_testkit::{ControlPlane, until_ok};

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// One collection of the mock API server: objects by (namespace, name), a version, watchers.
struct Collection {
    kind: String,
    objects: BTreeMap<(String, String), Value>,
    events: broadcast::Sender<Value>,
}

#[derive(Default)]
struct Mock {
    /// Collection path (e.g. `/api/v1/services`) -> collection.
    collections: BTreeMap<String, Collection>,
    /// Collections the mock answers 404 for, as if their CRD were not installed.
    missing: Vec<String>,
    version: u64,
    /// Status patches received: (path, body).
    status_patches: Vec<(String, Value)>,
    /// The Lease, if created.
    lease: Option<Value>,
    /// Another controller's condition, written to the object at this status path just before
    /// the next status patch there is handled (a write race Weft must not lose it to).
    race: Option<(String, Value)>,
    /// Watches from a resourceVersion older than this get 410 Expired (etcd compacted).
    compacted: u64,
    /// Ends every open watch (as an API server's watch timeout does).
    cut: Arc<tokio::sync::Notify>,
}

type Shared = Arc<Mutex<Mock>>;

fn lock(m: &Shared) -> std::sync::MutexGuard<'_, Mock> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// An object's (namespace, name).
fn key_of(obj: &Value) -> (String, String) {
    let field = |f: &str| obj["metadata"][f].as_str().unwrap_or_default().to_string();
    (field("namespace"), field("name"))
}

impl Mock {
    /// Stamps `obj` with the next resourceVersion.
    fn versioned(&mut self, mut obj: Value) -> Value {
        self.version += 1;
        obj["metadata"]["resourceVersion"] = json!(self.version.to_string());
        obj
    }

    fn add(&mut self, path: &str, kind: &str, obj: Value) {
        let obj = self.versioned(obj);
        let key = key_of(&obj);
        let c = self
            .collections
            .entry(path.to_string())
            .or_insert_with(|| Collection {
                kind: kind.to_string(),
                objects: BTreeMap::new(),
                events: broadcast::channel(64).0,
            });
        let ty = if c.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        c.objects.insert(key, obj.clone());
        let _ = c.events.send(json!({"type": ty, "object": obj}));
    }

    /// Replaces an object without telling open watches (what a watch that was down missed).
    fn change_unseen(&mut self, path: &str, obj: Value) {
        let obj = self.versioned(obj);
        let key = key_of(&obj);
        if let Some(c) = self.collections.get_mut(path) {
            c.objects.insert(key, obj);
        }
    }

    /// The (collection, namespace, name) a `.../<plural>/<name>/status` path names.
    fn locate(path: &str) -> (String, String, String) {
        let parts: Vec<&str> = path.trim_end_matches("/status").rsplitn(2, '/').collect();
        let (name, prefix) = (
            parts[0].to_string(),
            parts.get(1).copied().unwrap_or_default(),
        );
        match prefix.split_once("/namespaces/") {
            Some((base, rest)) => {
                let (ns, plural) = rest.split_once('/').unwrap_or((rest, ""));
                (format!("{base}/{plural}"), ns.to_string(), name)
            }
            None => (prefix.to_string(), String::new(), name),
        }
    }

    fn object(&self, collection: &str, ns: &str, name: &str) -> Option<Value> {
        self.collections
            .get(collection)
            .and_then(|c| c.objects.get(&(ns.to_string(), name.to_string())))
            .cloned()
    }

    fn delete(&mut self, path: &str, namespace: &str, name: &str) {
        self.version += 1;
        if let Some(c) = self.collections.get_mut(path)
            && let Some(mut obj) = c.objects.remove(&(namespace.to_string(), name.to_string()))
        {
            obj["metadata"]["resourceVersion"] = json!(self.version.to_string());
            let _ = c.events.send(json!({"type": "DELETED", "object": obj}));
        }
    }
}

fn json_response(status: u16, v: &Value) -> hyper::Response<Body> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap_or_default()
}

fn status(code: u16, reason: &str, message: &str) -> hyper::Response<Body> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": message, "reason": reason, "code": code}),
    )
}

/// RFC 7386 JSON merge patch, as the API server applies `Patch::Merge`.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Some(t) = target.as_object_mut() {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/weft-system/leases";

async fn handle(mock: Shared, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);

    // Leases: get, create, replace (with resourceVersion checks).
    if path.starts_with(LEASES) {
        let mut m = lock(&mock);
        let named = path
            .strip_prefix(LEASES)
            .unwrap_or_default()
            .trim_start_matches('/');
        return match (method.as_str(), named.is_empty()) {
            ("GET", false) => match &m.lease {
                Some(l) => json_response(200, l),
                None => status(404, "NotFound", "leases \"weft-control-plane\" not found"),
            },
            ("POST", true) => {
                if m.lease.is_some() {
                    return status(409, "AlreadyExists", "lease exists");
                }
                m.version += 1;
                let mut l = body;
                l["metadata"]["resourceVersion"] = json!(m.version.to_string());
                m.lease = Some(l.clone());
                json_response(201, &l)
            }
            ("PUT", false) => {
                let current = m
                    .lease
                    .as_ref()
                    .map(|l| l["metadata"]["resourceVersion"].clone());
                if current != Some(body["metadata"]["resourceVersion"].clone()) {
                    return status(409, "Conflict", "the object has been modified");
                }
                m.version += 1;
                let mut l = body;
                l["metadata"]["resourceVersion"] = json!(m.version.to_string());
                m.lease = Some(l.clone());
                json_response(200, &l)
            }
            _ => status(405, "MethodNotAllowed", "mock: not supported"),
        };
    }

    // Status patches: .../<plural>/<name>/status (namespaced or not).
    if method == "PATCH" && path.ends_with("/status") {
        let mut m = lock(&mock);
        m.status_patches.push((path.clone(), body.clone()));
        // Find the object and merge the status in, as the API server would.
        let (collection, ns, name) = Mock::locate(&path);
        if let Some((at, condition)) = m.race.take_if(|(at, _)| path.ends_with(at.as_str()))
            && let Some(mut o) = m.object(&collection, &ns, &name)
        {
            let mut conditions = o["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            conditions.push(condition);
            o["status"]["conditions"] = json!(conditions);
            let kind = m.collections[&collection].kind.clone();
            m.add(&collection, &kind, o);
            println!("mock: another controller wrote {at} first");
        }
        let obj = m.object(&collection, &ns, &name);
        return match obj {
            Some(o)
                if body["metadata"]["resourceVersion"].is_string()
                    && body["metadata"]["resourceVersion"] != o["metadata"]["resourceVersion"] =>
            {
                status(
                    409,
                    "Conflict",
                    "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again",
                )
            }
            Some(mut o) => {
                merge_patch(&mut o, &body);
                let kind = m.collections[&collection].kind.clone();
                m.add(&collection, &kind, o.clone());
                json_response(200, &o)
            }
            None => status(
                404,
                "NotFound",
                &format!("{collection} {ns}/{name} not found"),
            ),
        };
    }

    if method != "GET" {
        return status(405, "MethodNotAllowed", "mock: not supported");
    }
    // One object's status subresource (what a writer re-reads after a conflict).
    if path.ends_with("/status") {
        let m = lock(&mock);
        let (collection, ns, name) = Mock::locate(&path);
        return match m.object(&collection, &ns, &name) {
            Some(o) => json_response(200, &o),
            None => status(404, "NotFound", &format!("{ns}/{name} not found")),
        };
    }
    if lock(&mock).missing.contains(&path) {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    let watch = query
        .split('&')
        .any(|q| q == "watch=true" || q == "watch=1");
    let since: u64 = query
        .split('&')
        .find_map(|q| q.strip_prefix("resourceVersion="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (kind, items, version, events, compacted, cut) = {
        let m = lock(&mock);
        let Some(c) = m.collections.get(&path) else {
            // A collection the mock was given nothing for: empty.
            return json_response(
                200,
                &json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": m.version.to_string()}, "items": []}),
            );
        };
        (
            c.kind.clone(),
            c.objects.values().cloned().collect::<Vec<_>>(),
            m.version,
            c.events.subscribe(),
            m.compacted,
            m.cut.clone(),
        )
    };
    if !watch {
        return json_response(
            200,
            &json!({"kind": format!("{kind}List"), "apiVersion": "v1",
                "metadata": {"resourceVersion": version.to_string()}, "items": items}),
        );
    }
    if since > 0 && since < compacted {
        // What the API server says once etcd compacted past the watcher's version.
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
            "status": "Failure", "reason": "Expired", "code": 410,
            "message": format!("too old resource version: {since} ({compacted})")}});
        return hyper::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!("{gone}\n"))).boxed())
            .unwrap_or_default();
    }
    // A watch: events as JSON lines, for a bounded time or until cut (the client re-watches).
    let stream = futures::stream::unfold(
        (
            events,
            tokio::time::Instant::now() + Duration::from_secs(20),
            cut,
        ),
        |(mut rx, until, cut)| async move {
            let ev = tokio::select! {
                ev = tokio::time::timeout_at(until, rx.recv()) => ev,
                _ = cut.notified() => return None,
            };
            match ev {
                Ok(Ok(ev)) => {
                    let line = format!("{ev}\n");
                    Some((
                        Ok::<_, Infallible>(Frame::data(Bytes::from(line))),
                        (rx, until, cut),
                    ))
                }
                _ => None,
            }
        },
    );
    hyper::Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .unwrap_or_default()
}

async fn serve(mock: Shared) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let mock = mock.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let mock = mock.clone();
                    async move { Ok::<_, Infallible>(handle(mock, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const NODES: &str = "/api/v1/nodes";
const POLICIES: &str = "/apis/weft.dev/v1alpha1/trafficpolicies";
const PEERS: &str = "/apis/weft.dev/v1alpha1/meshpeers";
const ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/httproutes";
const EXPORTS: &str = "/apis/multicluster.x-k8s.io/v1alpha1/serviceexports";
const PODS: &str = "/api/v1/pods";
const NETPOLS: &str = "/apis/networking.k8s.io/v1/networkpolicies";

fn slice(addrs: &[&str]) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "checkout-x7k2p", "namespace": "shop", "generation": 3,
            "labels": {"kubernetes.io/service-name": "checkout", "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": addrs.iter().map(|a| json!({"addresses": [a], "conditions": {"ready": true, "serving": true, "terminating": false},
            "nodeName": "node-a", "zone": "zone-a"})).collect::<Vec<_>>()})
}

fn world() -> Mock {
    let mut m = Mock::default();
    m.add(SERVICES, "Service", json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "checkout", "namespace": "shop", "uid": "1", "creationTimestamp": "2026-11-28T06:00:00Z"},
        "spec": {"clusterIP": "10.96.4.7", "type": "ClusterIP", "selector": {"app": "checkout"},
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "appProtocol": "http"}]},
        "status": {"loadBalancer": {}}}));
    m.add(
        SLICES,
        "EndpointSlice",
        slice(&["10.244.1.5", "10.244.2.9"]),
    );
    m.add(NODES, "Node", json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/region": "eu-west", "topology.kubernetes.io/zone": "zone-a"}},
        "status": {"capacity": {"cpu": "4"}}}));
    m.add(
        POLICIES,
        "TrafficPolicy",
        json!({"apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": "retries", "namespace": "shop", "generation": 1},
        "spec": {"targetRef": {"name": "checkout"}, "retry": {"attempts": 3}}}),
    );
    m.add(
        POLICIES,
        "TrafficPolicy",
        json!({"apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": "broken", "namespace": "shop", "generation": 4},
        "spec": {"targetRef": {"name": "checkout"}, "timeout": "soon"}}),
    );
    m.add(
        PEERS,
        "MeshPeer",
        json!({"apiVersion": "weft.dev/v1alpha1", "kind": "MeshPeer",
        "metadata": {"name": "west", "generation": 1}, "spec": {"address": "127.0.0.1:1"}}),
    );
    m.add(
        POLICIES,
        "TrafficPolicy",
        json!({"apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": "orphan", "namespace": "shop", "generation": 1},
        "spec": {"targetRef": {"name": "nowhere"}}}),
    );
    // A GAMMA route another controller already reported on: its entry must stay.
    m.add(ROUTES, "HTTPRoute", json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "checkout", "namespace": "shop", "generation": 2},
        // As the API server stores it: Gateway API's defaults filled in.
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "checkout", "port": 80}],
            "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                "backendRefs": [{"group": "", "kind": "Service", "name": "checkout", "port": 80, "weight": 1}]}]},
        "status": {"parents": [{"parentRef": {"name": "gw"}, "controllerName": "example.com/gateway",
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                "lastTransitionTime": "2026-11-28T05:00:00Z"}]}]}}));
    m.add(
        EXPORTS,
        "ServiceExport",
        json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
        "metadata": {"name": "checkout", "namespace": "shop", "generation": 1}}),
    );
    m.add(
        EXPORTS,
        "ServiceExport",
        json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
        "metadata": {"name": "ghost", "namespace": "shop", "generation": 1}}),
    );
    // A meshed pod, the control plane's pod, and a NetworkPolicy that cuts the first off
    // from the second (as the API server stores them: defaults filled in).
    m.add(PODS, "Pod", json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "checkout-1", "namespace": "shop", "labels": {"app": "checkout", "weft.dev/tls-mode": "weft"}},
        "spec": {"serviceAccountName": "checkout", "containers": [{"name": "app", "image": "checkout"}]},
        "status": {"podIP": "10.244.1.5", "phase": "Running"}}));
    m.add(PODS, "Pod", json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "weft-control-plane-0", "namespace": "weft-system", "labels": {"app.kubernetes.io/name": "weft-control-plane"}},
        "spec": {"containers": [{"name": "cp", "image": "weft", "ports": [{"name": "grpc-tls", "containerPort": 15012, "protocol": "TCP"}]}]},
        "status": {"podIP": "10.244.3.3", "phase": "Running"}}));
    m.add(
        NETPOLS,
        "NetworkPolicy",
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "egress-lockdown", "namespace": "shop", "generation": 1},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}}),
    );
    // The SMI CRD is not installed on this "cluster".
    m.missing
        .push("/apis/split.smi-spec.io/v1alpha4/trafficsplits".into());
    m
}

async fn replica(api: SocketAddr, name: &str) -> ControlPlane {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = weft_control_plane::Config::local(dir.path());
    cfg.source_dir = None;
    cfg.kubernetes = true;
    cfg.kube_api = Some(format!("http://{api}"));
    cfg.replica = Some(name.into());
    cfg.lease_duration = Duration::from_secs(2);
    ControlPlane::start(cfg).await.expect("control plane")
}

fn endpoints(cp: &ControlPlane) -> Vec<(String, String)> {
    let m = cp.catalog.current();
    m.services
        .get(&ServiceKey::new("shop", "checkout"))
        .map(|s| {
            s.endpoints
                .iter()
                .map(|e| (e.address.to_string(), e.locality.zone.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn accepted(mock: &Shared, path_end: &str) -> Option<(String, String)> {
    lock(mock)
        .status_patches
        .iter()
        .rev()
        .find(|(p, _)| p.ends_with(path_end))
        .map(|(_, b)| {
            let c = &b["status"]["conditions"][0];
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["message"].as_str().unwrap_or_default().to_string(),
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_api_server_kube_source_feeds_the_catalog_writes_status_and_elects_one_leader() {
    let mock: Shared = Arc::new(Mutex::new(world()));
    let (api, server) = serve(mock.clone()).await;
    let a = replica(api, "replica-a").await;
    let patience = Duration::from_secs(15);

    // The world reached the catalog through the same validation as files, with locality from
    // the Node; the missing SMI CRD did not hold the first sync.
    until_ok("checkout's endpoints in the catalog", patience, || async {
        let got = endpoints(&a);
        (got.len() == 2 && a.catalog.current().ready)
            .then_some(())
            .ok_or(format!("{got:?}"))
    })
    .await;
    assert!(endpoints(&a).iter().all(|(_, z)| z == "zone-a"));
    let m = a.catalog.current();
    let svc = &m.services[&ServiceKey::new("shop", "checkout")];
    assert_eq!(svc.policy_name.as_deref(), Some("shop/retries"));
    assert_eq!(m.peers.get("west").map(String::as_str), Some("127.0.0.1:1"));
    let err = m
        .errors
        .iter()
        .find(|e| e.object == "TrafficPolicy shop/broken")
        .expect("the broken policy is reported");
    assert_eq!(err.field, "spec.timeout");
    // NetworkPolicies arrive too, and `weftctl check`'s reading of them sees the lockdown.
    let findings = weft_control_plane::check::check(&m, &[], &Default::default());
    assert!(
        findings
            .iter()
            .any(|f| f.code == "netpol-blocks-control-plane"
                && f.object == "NetworkPolicy shop/egress-lockdown"
                && f.problem.contains("shop/checkout-1")),
        "{findings:?}"
    );

    // replica-a leads (the only one) and writes Accepted conditions on Weft's objects.
    until_ok("replica-a holds the Lease", patience, || async {
        (*a.leader.borrow())
            .then_some(())
            .ok_or("not yet".to_string())
    })
    .await;
    let holder = lock(&mock)
        .lease
        .as_ref()
        .map(|l| l["spec"]["holderIdentity"].clone());
    assert_eq!(holder, Some(json!("replica-a")));
    until_ok("statuses written", patience, || async {
        let ok = accepted(&mock, "/namespaces/shop/trafficpolicies/retries/status");
        let bad = accepted(&mock, "/namespaces/shop/trafficpolicies/broken/status");
        let peer = accepted(&mock, "/meshpeers/west/status");
        let n = lock(&mock).status_patches.len();
        match (ok, bad, peer, n >= 7) {
            (Some(o), Some(b), Some(p), true) => Ok((o, b, p)),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // Cross-object problems count: a policy for a Service that does not exist, an export of
    // a missing Service.
    let (s, m) = accepted(&mock, "/trafficpolicies/orphan/status").expect("orphan");
    assert_eq!(s, "False");
    assert!(
        m.starts_with("spec.targetRef.name: Service shop/nowhere not found"),
        "{m}"
    );
    let (s, m) = accepted(&mock, "/serviceexports/ghost/status").expect("ghost");
    assert_eq!(s, "False");
    assert!(m.contains("Service shop/ghost not found"), "{m}");
    assert_eq!(
        accepted(&mock, "/serviceexports/checkout/status")
            .map(|(s, _)| s)
            .as_deref(),
        Some("True")
    );
    // The HTTPRoute: Weft's entry per parentRef, the other controller's entry kept.
    let route = lock(&mock).collections[ROUTES].objects
        [&("shop".to_string(), "checkout".to_string())]
        .clone();
    let parents = route["status"]["parents"]
        .as_array()
        .expect("parents")
        .clone();
    assert_eq!(parents.len(), 2, "{parents:#?}");
    assert!(
        parents
            .iter()
            .any(|p| p["controllerName"] == "example.com/gateway")
    );
    let ours = parents
        .iter()
        .find(|p| p["controllerName"] == "weft.dev/mesh-controller")
        .expect("Weft's entry");
    assert_eq!(ours["parentRef"]["name"], "checkout");
    assert_eq!(ours["conditions"][0]["type"], "Accepted");
    assert_eq!(ours["conditions"][0]["status"], "True");
    assert_eq!(ours["conditions"][0]["observedGeneration"], 2);
    let (bad_status, bad_message) =
        accepted(&mock, "/namespaces/shop/trafficpolicies/broken/status").expect("written");
    assert_eq!(bad_status, "False");
    assert!(bad_message.starts_with("spec.timeout:"), "{bad_message}");
    assert_eq!(
        accepted(&mock, "/trafficpolicies/retries/status")
            .map(|(s, _)| s)
            .as_deref(),
        Some("True")
    );
    // Its own status writes come back as watch events; they are not written again.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let writes = lock(&mock).status_patches.len();
    assert_eq!(writes, 7, "one write per object, no loop");

    // Watch events: an endpoint added, a policy deleted.
    lock(&mock).add(
        SLICES,
        "EndpointSlice",
        slice(&["10.244.1.5", "10.244.2.9", "10.244.3.4"]),
    );
    lock(&mock).delete(POLICIES, "shop", "retries");
    until_ok("the watch events applied", patience, || async {
        let m = a.catalog.current();
        let n = endpoints(&a).len();
        let policy = m.services[&ServiceKey::new("shop", "checkout")]
            .policy_name
            .clone();
        (n == 3 && policy.is_none())
            .then_some(())
            .ok_or(format!("{n} endpoints, policy {policy:?}"))
    })
    .await;

    // A second replica follows; when the leader stops, it takes the Lease over.
    let b = replica(api, "replica-b").await;
    until_ok("replica-b synced", patience, || async {
        (endpoints(&b).len() == 3)
            .then_some(())
            .ok_or("not yet".to_string())
    })
    .await;
    assert!(!*b.leader.borrow(), "only one leader");
    drop(a);
    until_ok("replica-b took over", Duration::from_secs(20), || async {
        (*b.leader.borrow())
            .then_some(())
            .ok_or("not yet".to_string())
    })
    .await;
    let lease = lock(&mock).lease.clone().expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "replica-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    server.abort();
}

/// Against a real cluster when `WEFT_E2E_KUBECONFIG` names a kubeconfig: the control plane
/// syncs every kind and takes the Lease.
/// A replica that cannot load its CA (here: the mounted root has no key, as when the Secret's
/// files are unreadable to the container's user) fails to start with an error naming the file,
/// and never takes the leader Lease — neither during start nor afterwards (no task of the
/// failed start lives on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_api_server_a_replica_that_cannot_load_its_ca_never_takes_the_lease() {
    let mock: Shared = Arc::new(Mutex::new(world()));
    let (api, _server) = serve(mock.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let root_dir = dir.path().join("ca-root");
    weft_control_plane::identity::Ca::load_or_generate(Some(&root_dir), "cluster.local", "c1")
        .expect("root");
    std::fs::remove_file(root_dir.join("root.key.pem")).expect("remove key");
    let mut cfg = weft_control_plane::Config::local(dir.path());
    cfg.source_dir = None;
    cfg.kubernetes = true;
    cfg.kube_api = Some(format!("http://{api}"));
    cfg.replica = Some("replica-broken".into());
    cfg.lease_duration = Duration::from_secs(1);
    cfg.ca_root_dir = Some(root_dir.clone());
    let err = match ControlPlane::start(cfg).await {
        Ok(_) => panic!("a control plane without a readable CA key started"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("root.key.pem"),
        "the error names the file: {err}"
    );
    // Longer than a Lease acquisition takes (the other tests see one within a second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        lock(&mock).lease.is_none(),
        "a replica that cannot serve took the Lease: {:?}",
        lock(&mock).lease
    );
}

#[tokio::test]
async fn real_cluster_suite_runs_only_with_a_kubeconfig() {
    let Ok(path) = std::env::var("WEFT_E2E_KUBECONFIG") else {
        println!(
            "SKIP real_cluster_suite_runs_only_with_a_kubeconfig: WEFT_E2E_KUBECONFIG is not set \
             (no Kubernetes API server can run on this machine; the mock API server test covers \
             the source here)"
        );
        return;
    };
    // SAFETY of intent: kube's Config::infer reads KUBECONFIG; set it for this process only.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = weft_control_plane::Config::local(dir.path());
    cfg.source_dir = None;
    cfg.kubernetes = true;
    cfg.kube_api = None;
    cfg.replica = Some("weft-e2e".into());
    // kube infers from KUBECONFIG; the suite is run as `WEFT_E2E_KUBECONFIG=... KUBECONFIG=...`.
    assert_eq!(
        std::env::var("KUBECONFIG").ok().as_deref(),
        Some(path.as_str()),
        "run with KUBECONFIG set to the same file as WEFT_E2E_KUBECONFIG"
    );
    let cp = ControlPlane::start(cfg).await.expect("control plane");
    until_ok(
        "synced with the cluster",
        Duration::from_secs(60),
        || async {
            cp.catalog
                .current()
                .ready
                .then_some(())
                .ok_or("not yet".to_string())
        },
    )
    .await;
    until_ok("leader", Duration::from_secs(60), || async {
        (*cp.leader.borrow())
            .then_some(())
            .ok_or("not yet".to_string())
    })
    .await;
}

const SPLITS: &str = "/apis/split.smi-spec.io/v1alpha4/trafficsplits";
const ROLLOUTS: &str = "/apis/weft.dev/v1alpha1/rollouts";

/// The canary's weight on `cp` (the `web` split's backend `web-v2`), in basis points.
fn canary_weight(cp: &ControlPlane) -> Option<u32> {
    let m = cp.catalog.current();
    let svc = m.services.get(&ServiceKey::new("shop", "web"))?;
    svc.routes
        .values()
        .flatten()
        .flat_map(|r| &r.backends)
        .find(|b| b.service.name == "web-v2")
        .map(|b| b.weight)
}

/// Replicated rollouts: only the leader decides; it resumes from the Rollout's status instead
/// of starting over, and the follower applies the same weight, so every proxy sees one canary
/// weight whichever replica it is connected to. When the leader goes, the new one resumes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_api_server_replicas_follow_the_leaders_rollout_through_its_status() {
    let mut m = Mock::default();
    for svc in ["web", "web-v1", "web-v2"] {
        m.add(
            SERVICES,
            "Service",
            json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": svc, "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
        );
    }
    m.add(SPLITS, "TrafficSplit", json!({"apiVersion": "split.smi-spec.io/v1alpha4", "kind": "TrafficSplit",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"service": "web", "backends": [{"service": "web-v1", "weight": 90}, {"service": "web-v2", "weight": 10}]}}));
    // A rollout another replica was leading: at its second step, 50 %.
    m.add(ROLLOUTS, "Rollout", json!({"apiVersion": "weft.dev/v1alpha1", "kind": "Rollout",
        "metadata": {"name": "web", "namespace": "shop", "generation": 1},
        "spec": {"trafficSplit": "web", "canary": "web-v2", "steps": [20, 50, 100], "interval": "1h"},
        "status": {"phase": "Progressing", "weight": 50}}));
    let mock: Shared = Arc::new(Mutex::new(m));
    let (api, server) = serve(mock.clone()).await;
    let patience = Duration::from_secs(15);
    let a = replica(api, "replica-a").await;
    until_ok("replica-a leads", patience, || async {
        (*a.leader.borrow())
            .then_some(())
            .ok_or("not yet".to_string())
    })
    .await;
    let b = replica(api, "replica-b").await;
    for (name, cp) in [("leader", &a), ("follower", &b)] {
        until_ok(&format!("the {name} applies 50 %"), patience, || async {
            let w = canary_weight(cp);
            (w == Some(5000)).then_some(()).ok_or(format!("{w:?}"))
        })
        .await;
    }
    // The leader takes the rollout over on its next evaluation tick.
    let web = until_ok("the leader holds the rollout", patience, || async {
        a.rollouts
            .states()
            .get("shop/web")
            .cloned()
            .ok_or("not yet".to_string())
    })
    .await;
    assert_eq!((web.weight, web.step), (50, 1));
    assert_eq!(web.decisions[0].kind, "resume", "{:?}", web.decisions);
    assert!(
        b.rollouts.states().is_empty(),
        "the follower decides nothing"
    );
    // Nothing regressed the published weight.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let weights: Vec<Value> = lock(&mock)
        .status_patches
        .iter()
        .filter(|(p, _)| p.contains("/rollouts/web/"))
        .filter_map(|(_, body)| body["status"].get("weight").cloned())
        .collect();
    assert!(weights.iter().all(|w| w == 50), "{weights:?}");

    // The leader goes: the other resumes at the same step.
    drop(a);
    until_ok(
        "replica-b takes over and resumes",
        Duration::from_secs(20),
        || async {
            let st = b.rollouts.states();
            match st.get("shop/web") {
                Some(w) if *b.leader.borrow() => Ok((w.weight, w.decisions[0].kind.clone())),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(canary_weight(&b), Some(5000));
    server.abort();
}

/// The conditions of `path_end`'s object as the mock holds them now: (type, status) pairs.
fn conditions_now(mock: &Shared, collection: &str, ns: &str, name: &str) -> Vec<(String, String)> {
    lock(mock)
        .object(collection, ns, name)
        .and_then(|o| o["status"]["conditions"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap_or_default().to_string(),
                c["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Another controller writes its own condition on a TrafficPolicy between Weft's read and
/// Weft's status write. A merge patch replaces the whole list, so a blind write would drop
/// that condition: Weft's write carries the resourceVersion it read, the API server refuses
/// it with 409, and Weft writes again on top of the fresh copy — both conditions stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_api_server_status_write_races_keep_the_other_controllers_condition() {
    let mut m = world();
    m.race = Some((
        "/namespaces/shop/trafficpolicies/retries/status".into(),
        json!({"type": "Audited", "status": "True", "reason": "Audited", "message": "by another controller"}),
    ));
    let mock: Shared = Arc::new(Mutex::new(m));
    let (api, server) = serve(mock.clone()).await;
    let a = replica(api, "replica-a").await;
    let got = until_ok(
        "Accepted written beside the other condition",
        Duration::from_secs(20),
        || async {
            let c = conditions_now(&mock, POLICIES, "shop", "retries");
            let has = |t: &str| c.iter().any(|(ty, s)| ty == t && s == "True");
            (has("Accepted") && has("Audited"))
                .then(|| c.clone())
                .ok_or(format!("{c:?}"))
        },
    )
    .await;
    assert_eq!(got.len(), 2, "{got:?}");
    // The first write lost the race and was refused; the next carried the fresh version.
    let tries: Vec<Value> = lock(&mock)
        .status_patches
        .iter()
        .filter(|(p, _)| p.ends_with("/trafficpolicies/retries/status"))
        .map(|(_, b)| b["metadata"]["resourceVersion"].clone())
        .collect();
    assert!(tries.len() >= 2, "{tries:?}");
    assert!(tries.iter().all(Value::is_string), "{tries:?}");
    assert_ne!(tries[0], tries[1], "the retry is based on the fresh copy");
    let metrics = a.metrics.render();
    assert!(
        metrics.contains("weft_kube_status_writes_total{result=\"conflict\"} 1"),
        "{metrics}"
    );
    server.abort();
}

/// Watches end (the API server's timeout) and, once etcd compacted past the version a watcher
/// holds, resuming is refused with 410: the source relists and what changed while no watch was
/// open — a slice that lost an endpoint — reaches the catalog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_api_server_kube_source_survives_watch_expiry_and_relists_after_410() {
    let mock: Shared = Arc::new(Mutex::new(world()));
    let (api, server) = serve(mock.clone()).await;
    let a = replica(api, "replica-a").await;
    let patience = Duration::from_secs(40);
    let count = |n: usize| {
        let a = &a;
        move || async move {
            let got = endpoints(a);
            (got.len() == n).then_some(()).ok_or(format!("{got:?}"))
        }
    };
    until_ok("two endpoints", patience, count(2)).await;
    // A plain expiry: every watch ends, the watchers resume from their version and see the
    // next change.
    lock(&mock).cut.notify_waiters();
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock(&mock).add(
        SLICES,
        "EndpointSlice",
        slice(&["10.244.1.5", "10.244.2.9", "10.244.3.1"]),
    );
    until_ok("the change after the expiry", patience, count(3)).await;
    // A change no open watch sees, then compaction past it: only a relist can tell.
    {
        let mut m = lock(&mock);
        m.change_unseen(SLICES, slice(&["10.244.1.5"]));
        m.compacted = m.version + 1;
        m.cut.notify_waiters();
    }
    until_ok("the relist after 410", patience, count(1)).await;
    server.abort();
}
