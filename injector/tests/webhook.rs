//! The injector for real: an HTTPS AdmissionReview round trip against the webhook server (a
//! real TLS handshake with the serving certificate it loaded from disk), the JSON Patch it
//! answers applied to the Pod with a JSON-patch library, and the result read back as a
//! `k8s_openapi` Pod and checked; idempotence, opt-out, classic mode, refusals, malformed
//! bodies, and a property test of the AdmissionReview path.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{Value, json};
use weft_injector::patch::{HEALTH_PORT, INIT_CONTAINER, InjectConfig, PROXY_CONTAINER};
use weft_injector::server::{TlsFiles, reload_root, serve};
use weft_injector::webhook::{Metrics, State, review};
use weft_proto::tls::rustls;

const ROOT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn cfg() -> InjectConfig {
    InjectConfig::new(
        "weft-sidecar:test",
        "weft-control-plane.weft-system.svc:15012",
        "east",
        ROOT,
    )
}

fn fixture_pod() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/pod.yaml"
    ))
    .expect("fixture");
    serde_saphyr::from_str(&text).expect("fixture is YAML")
}

fn admission_review(pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod["metadata"]["name"],
            "namespace": pod["metadata"]["namespace"],
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

/// The webhook on 127.0.0.1 with a fresh self-signed serving certificate; a client trusting it.
struct Server {
    addr: SocketAddr,
    client: Arc<rustls::ClientConfig>,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn server() -> Server {
    server_with(cfg()).await.0
}

/// [`server`] with `cfg`, and its state (to reload from).
async fn server_with(cfg: InjectConfig) -> (Server, Arc<State>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec![
        "127.0.0.1".to_string(),
        "weft-injector.weft-system.svc".to_string(),
    ])
    .expect("params");
    let cert = params.self_signed(&key).expect("cert");
    let files = TlsFiles {
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
    };
    std::fs::write(&files.cert, cert.pem()).expect("write");
    std::fs::write(&files.key, key.serialize_pem()).expect("write");
    let tls = Arc::new(arc_swap::ArcSwap::new(files.load().expect("TLS")));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let state = Arc::new(State {
        cfg: arc_swap::ArcSwap::from_pointee(cfg),
        metrics: Metrics::default(),
    });
    let task = tokio::spawn(serve(listener, tls, state.clone()));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).expect("root");
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(weft_proto::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    (
        Server {
            addr,
            client,
            _dir: dir,
            task,
        },
        state,
    )
}

impl Server {
    /// One HTTPS request; (status, body).
    async fn call(&self, method: &str, path: &str, body: Vec<u8>) -> (u16, String) {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let tls = tokio_rustls::TlsConnector::from(self.client.clone())
            .connect(name, tcp)
            .await
            .expect("TLS handshake with the webhook's certificate");
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .expect("http");
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "weft-injector.weft-system.svc")
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(body)))
            .expect("request");
        let resp = send.send_request(req).await.expect("response");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Posts a review of `pod`; the response review's `response`.
    async fn admit(&self, pod: &Value) -> Value {
        let (status, body) = self
            .call(
                "POST",
                "/inject",
                serde_json::to_vec(&admission_review(pod)).expect("json"),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("response JSON");
        assert_eq!(v["apiVersion"], "admission.k8s.io/v1", "{v}");
        assert_eq!(v["kind"], "AdmissionReview", "{v}");
        assert_eq!(
            v["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002",
            "the response answers the request"
        );
        v["response"].clone()
    }
}

/// Applies the response's JSON Patch to `pod` with a JSON-patch library; None when none.
fn apply(pod: &Value, response: &Value) -> Option<Pod> {
    let patch = response["patch"].as_str()?;
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .expect("base64 patch");
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("a JSON Patch");
    let mut doc = pod.clone();
    json_patch::patch(&mut doc, &patch).expect("the patch applies to the pod");
    Some(serde_json::from_value(doc).expect("the result is a Pod"))
}

fn args(c: &Container) -> Vec<String> {
    c.args.clone().unwrap_or_default()
}

fn arg_after(c: &Container, flag: &str) -> Option<String> {
    let a = args(c);
    a.iter()
        .position(|x| x == flag)
        .and_then(|i| a.get(i + 1).cloned())
}

#[tokio::test]
async fn a_pod_is_injected_over_https_and_the_patch_makes_a_valid_pod() {
    let srv = server().await;
    let original = fixture_pod();
    let resp = srv.admit(&original).await;
    assert_eq!(resp["allowed"], true, "{resp}");
    let pod = apply(&original, &resp).unwrap_or_else(|| panic!("a patch: {resp}"));
    let spec = pod.spec.as_ref().expect("spec");
    let inits = spec.init_containers.as_ref().expect("init containers");
    let names: Vec<&str> = inits.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]);

    // weft-init: the exclusions from the annotations, the health and admin ports — and no
    // probe port: a TCP (8080), gRPC (9090) or HTTPS (2020) probe never takes a serving port
    // out of interception, where plaintext would get past STRICT.
    let init = &inits[0];
    assert_eq!(
        arg_after(init, "--exclude-inbound-ports").as_deref(),
        Some("9100,15000,15021")
    );
    assert_eq!(
        arg_after(init, "--exclude-outbound-ports").as_deref(),
        Some("5432,6379")
    );
    assert_eq!(
        arg_after(init, "--exclude-outbound-cidrs").as_deref(),
        Some("10.96.0.0/12")
    );
    let caps = init
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    assert_eq!(caps, ["NET_ADMIN", "NET_RAW"]);

    // weft-proxy: a native sidecar, ready before the app starts, as UID 1337.
    let proxy = &inits[1];
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
    assert_eq!(proxy.image.as_deref(), Some("weft-sidecar:test"));
    assert_eq!(
        arg_after(proxy, "--xds-addr").as_deref(),
        Some("weft-control-plane.weft-system.svc:15012")
    );
    // The original probes, for the health listener to run and nothing else.
    let probes_json = proxy
        .env
        .iter()
        .flatten()
        .find(|e| e.name == weft_proto::probes::APP_PROBES_ENV)
        .and_then(|e| e.value.clone())
        .expect("WEFT_APP_PROBES");
    let probes: weft_proto::probes::AppProbes =
        serde_json::from_str(&probes_json).expect("probes JSON");
    use weft_proto::probes::AppProbe;
    let want: std::collections::BTreeMap<String, AppProbe> = [
        (
            "/app-health/app/readyz".to_string(),
            AppProbe::HttpGet {
                port: 8080,
                path: "/healthz".into(),
                https: false,
                headers: vec![],
            },
        ),
        (
            "/app-health/app/livez".to_string(),
            AppProbe::TcpSocket { port: 8080 },
        ),
        (
            "/app-health/app/startupz".to_string(),
            AppProbe::Grpc {
                port: 9090,
                service: String::new(),
            },
        ),
        (
            "/app-health/logs/livez".to_string(),
            AppProbe::HttpGet {
                port: 2020,
                path: "/ready".into(),
                https: true,
                headers: vec![],
            },
        ),
    ]
    .into();
    assert_eq!(probes.0, want);
    let startup = proxy
        .startup_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref());
    assert_eq!(startup.and_then(|h| h.path.as_deref()), Some("/ready"));
    let sc = proxy.security_context.as_ref().expect("security context");
    assert_eq!(
        (sc.run_as_user, sc.run_as_non_root),
        (Some(1337), Some(true))
    );
    let env: Vec<(String, Option<String>, Option<String>)> = proxy
        .env
        .iter()
        .flatten()
        .map(|e| {
            (
                e.name.clone(),
                e.value.clone(),
                e.value_from
                    .as_ref()
                    .and_then(|v| v.field_ref.as_ref())
                    .map(|f| f.field_path.clone()),
            )
        })
        .collect();
    let has = |name: &str, value: Option<&str>, field: Option<&str>| {
        env.iter()
            .any(|(n, v, f)| n == name && v.as_deref() == value && f.as_deref() == field)
    };
    assert!(has("POD_NAME", None, Some("metadata.name")), "{env:?}");
    assert!(
        has("WEFT_NAMESPACE", None, Some("metadata.namespace")),
        "{env:?}"
    );
    assert!(
        has(
            "WEFT_SERVICE_ACCOUNT",
            None,
            Some("spec.serviceAccountName")
        ),
        "{env:?}"
    );
    assert!(has("NODE_NAME", None, Some("spec.nodeName")), "{env:?}");
    assert!(has("WEFT_TRUST_BUNDLE_PEM", Some(ROOT), None), "{env:?}");
    assert!(
        has("WEFT_TOKEN_FILE", Some("/var/run/secrets/weft/token"), None),
        "{env:?}"
    );
    let vol = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "weft-token")
        .expect("token volume");
    let proj = vol
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_ref())
        .and_then(|s| s[0].service_account_token.clone())
        .expect("projected token");
    assert_eq!(proj.audience.as_deref(), Some("weft"));

    // Every network probe is now an HTTP GET of its assigned path on the health port.
    let health =
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(HEALTH_PORT));
    for (c, probe, path) in [
        (&spec.containers[0], "readiness", "/app-health/app/readyz"),
        (&spec.containers[0], "liveness", "/app-health/app/livez"),
        (&spec.containers[0], "startup", "/app-health/app/startupz"),
        (&spec.containers[1], "liveness", "/app-health/logs/livez"),
    ] {
        let p = match probe {
            "readiness" => c.readiness_probe.as_ref(),
            "liveness" => c.liveness_probe.as_ref(),
            _ => c.startup_probe.as_ref(),
        }
        .expect("probe");
        assert!(
            p.tcp_socket.is_none() && p.grpc.is_none(),
            "{}/{probe}",
            c.name
        );
        let h = p.http_get.as_ref().expect("httpGet");
        assert_eq!(h.path.as_deref(), Some(path));
        assert_eq!(h.port, health);
        assert_eq!(h.scheme.as_deref(), Some("HTTP"));
    }
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("weft.dev/tls-mode").map(String::as_str),
        Some("weft")
    );
    assert_eq!(labels.get("app").map(String::as_str), Some("checkout"));
    assert!(
        pod.metadata
            .annotations
            .clone()
            .unwrap_or_default()
            .contains_key("weft.dev/injected")
    );

    // Idempotent: the injected pod gets no second patch.
    let again = serde_json::to_value(&pod).expect("json");
    let resp = srv.admit(&again).await;
    assert_eq!(resp["allowed"], true);
    assert!(resp["patch"].is_null(), "{resp}");

    let (status, metrics) = srv.call("GET", "/metrics", Vec::new()).await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("weft_injector_reviews_total{outcome=\"injected\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weft_injector_reviews_total{outcome=\"skipped\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn opt_out_classic_mode_refusals_and_malformed_reviews() {
    let srv = server().await;
    // Opt-out by annotation: allowed, untouched.
    let mut pod = fixture_pod();
    pod["metadata"]["annotations"]["weft.dev/inject"] = json!("false");
    let resp = srv.admit(&pod).await;
    assert_eq!(
        (resp["allowed"].clone(), resp["patch"].clone()),
        (json!(true), Value::Null)
    );

    // Classic mode: the proxy is the first container and holds the others until ready.
    let mut pod = fixture_pod();
    pod["metadata"]["annotations"]["weft.dev/sidecar-mode"] = json!("classic");
    let resp = srv.admit(&pod).await;
    let injected = apply(&pod, &resp).expect("patch");
    let spec = injected.spec.expect("spec");
    assert_eq!(spec.containers[0].name, PROXY_CONTAINER);
    assert!(spec.containers[0].restart_policy.is_none());
    let hook = spec.containers[0]
        .lifecycle
        .as_ref()
        .and_then(|l| l.post_start.as_ref())
        .and_then(|h| h.exec.as_ref())
        .and_then(|e| e.command.clone())
        .expect("postStart hold");
    assert_eq!(&hook[..2], ["weft-sidecar", "wait-ready"]);
    let inits: Vec<String> = spec
        .init_containers
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(inits, [INIT_CONTAINER, "migrate"]);

    // A Job's pod (restartPolicy Never) gets the native sidecar, which ends with the pod.
    let mut job = fixture_pod();
    job["spec"]["restartPolicy"] = json!("Never");
    let resp = srv.admit(&job).await;
    let injected = apply(&job, &resp).expect("patch");
    let spec = injected.spec.expect("spec");
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    let proxy = spec
        .init_containers
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.name == PROXY_CONTAINER)
        .expect("proxy");
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));

    // DNS capture by annotation: init redirects port 53 to the mesh DNS the proxy serves.
    let dns = |value: Option<&str>| {
        let mut pod = fixture_pod();
        if let Some(v) = value {
            pod["metadata"]["annotations"]["weft.dev/dns-capture"] = json!(v);
        }
        pod
    };
    for (value, on) in [(None, false), (Some("false"), false), (Some("true"), true)] {
        let pod = dns(value);
        let resp = srv.admit(&pod).await;
        let injected = apply(&pod, &resp).expect("patch");
        let inits = injected
            .spec
            .and_then(|s| s.init_containers)
            .unwrap_or_default();
        let of = |name: &str| inits.iter().find(|c| c.name == name).expect("container");
        assert_eq!(
            arg_after(of(INIT_CONTAINER), "--redirect-dns-port").as_deref(),
            on.then_some("15053"),
            "{value:?}"
        );
        assert_eq!(
            arg_after(of(PROXY_CONTAINER), "--dns-addr").as_deref(),
            on.then_some("127.0.0.1:15053"),
            "{value:?}"
        );
    }
    let resp = srv.admit(&dns(Some("yes"))).await;
    assert_eq!(resp["allowed"], false, "{resp}");
    assert!(
        resp["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("weft.dev/dns-capture") && m.contains("\"yes\"")),
        "{resp}"
    );

    // A malformed Weft annotation: denied, naming it.
    let mut bad = fixture_pod();
    bad["metadata"]["annotations"]["weft.dev/exclude-inbound-ports"] = json!("80,http");
    let resp = srv.admit(&bad).await;
    assert_eq!(resp["allowed"], false, "{resp}");
    let msg = resp["status"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("shop/checkout-7d9f")
            && msg.contains("weft.dev/exclude-inbound-ports")
            && msg.contains("\"http\" is not a port"),
        "{msg}"
    );

    // Not a Pod (another kind through the same webhook): allowed untouched.
    let mut other = admission_review(&fixture_pod());
    other["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let (status, body) = srv
        .call("POST", "/inject", serde_json::to_vec(&other).expect("json"))
        .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["response"]["allowed"], true);
    assert!(v["response"]["patch"].is_null());

    // Malformed bodies: 400 with what is wrong.
    for (body, want) in [
        (
            b"garbage".to_vec(),
            "not an admission.k8s.io/v1 AdmissionReview",
        ),
        (
            b"{\"kind\": 7}".to_vec(),
            "invalid type: integer `7`, expected a string",
        ),
        (
            serde_json::to_vec(
                &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}),
            )
            .expect("json"),
            "no request",
        ),
    ] {
        let (status, text) = srv.call("POST", "/inject", body).await;
        assert_eq!(status, 400, "{text}");
        assert!(text.contains(want), "want {want:?} in {text:?}");
    }
    let (status, _) = srv.call("GET", "/inject", Vec::new()).await;
    assert_eq!(status, 405);
    let (status, _) = srv.call("GET", "/ready", Vec::new()).await;
    assert_eq!(status, 200);
}

mod property {
    use proptest::prelude::*;

    use super::*;

    fn mutate(v: &mut Value, path: &[usize], replacement: &Value) {
        let Some((i, rest)) = path.split_first() else {
            *v = replacement.clone();
            return;
        };
        match v {
            Value::Object(m) if !m.is_empty() => {
                let k = m.keys().nth(i % m.len()).cloned().unwrap_or_default();
                if let Some(next) = m.get_mut(&k) {
                    mutate(next, rest, replacement);
                }
            }
            Value::Array(a) if !a.is_empty() => {
                let n = a.len();
                mutate(&mut a[i % n], rest, replacement);
            }
            _ => *v = replacement.clone(),
        }
    }

    fn any_json() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            ".{0,12}".prop_map(Value::String),
            Just(json!([])),
            Just(json!({})),
            Just(json!({"weft.dev/exclude-inbound-ports": "x"})),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Any bytes: an answer or a 400 reason, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = review(&bytes, &cfg());
        }

        /// A real review with one value anywhere replaced: an answer (allowed or denied, with
        /// a patch that applies) or a 400 reason — never a panic, never a broken patch.
        #[test]
        fn mutated_reviews_get_an_answer(path in proptest::collection::vec(0usize..16, 0..8), replacement in any_json()) {
            let mut doc = admission_review(&fixture_pod());
            mutate(&mut doc, &path, &replacement);
            let body = serde_json::to_vec(&doc).expect("json");
            if let Ok((resp, _)) = review(&body, &cfg()) {
                let r = &resp["response"];
                prop_assert!(r["allowed"].is_boolean());
                if let Some(p) = r["patch"].as_str() {
                    let bytes = base64::engine::general_purpose::STANDARD.decode(p).expect("b64");
                    let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("patch");
                    let mut pod = doc["request"]["object"].clone();
                    prop_assert!(json_patch::patch(&mut pod, &patch).is_ok());
                }
            }
        }
    }
}

/// The trust bundle a pod's proxy is given, from an admitted pod.
fn injected_bundle(pod: &Pod) -> String {
    let proxy = pod
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .and_then(|c| c.iter().find(|c| c.name == PROXY_CONTAINER))
        .expect("proxy container");
    proxy
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "WEFT_TRUST_BUNDLE_PEM")
        .and_then(|e| e.value.clone())
        .expect("WEFT_TRUST_BUNDLE_PEM")
}

/// The mesh root file (the mounted ConfigMap `weft-root`) changes — a root rotation adds a
/// second root — and pods admitted afterwards get the new bundle without a restart; a file
/// that holds no certificate is refused and the last good bundle kept.
#[tokio::test]
async fn a_changed_mesh_root_file_reaches_new_pods_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let make_root = |cn: &str| {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.self_signed(&key).expect("root").pem()
    };
    let (old, new) = (make_root("old root"), make_root("new root"));
    let path = dir.path().join("root.pem");
    std::fs::write(&path, &old).expect("write");
    let mut c = cfg();
    c.root_pem = old.clone();
    let (srv, state) = server_with(c).await;
    let reloader = tokio::spawn(reload_root(
        path.clone(),
        state,
        std::time::Duration::from_millis(50),
    ));
    let admit_bundle = || async {
        let original = fixture_pod();
        let resp = srv.admit(&original).await;
        injected_bundle(&apply(&original, &resp).expect("patch"))
    };
    assert_eq!(admit_bundle().await, old);
    let both = format!("{old}{new}");
    std::fs::write(&path, &both).expect("write");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while admit_bundle().await != both {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new pods still get the old bundle"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    std::fs::write(&path, "not a certificate").expect("write");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(admit_bundle().await, both, "a broken file is not injected");
    // One good root and one broken block: not a bundle to hand to every new pod either.
    let half = format!("{new}-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n");
    std::fs::write(&path, &half).expect("write");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        admit_bundle().await,
        both,
        "a half-broken file is not injected"
    );
    reloader.abort();
}
