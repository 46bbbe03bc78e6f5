//! Against a real Kubernetes API server (envtest: etcd and kube-apiserver from
//! `KUBEBUILDER_ASSETS`, `weft_e2e::envtest`), which cannot run in this lab: each test prints
//! `SKIP` and why without it. Run them with
//!
//! ```sh
//! go install sigs.k8s.io/controller-runtime/tools/setup-envtest@latest
//! export KUBEBUILDER_ASSETS=$(setup-envtest use -p path 1.33.x)
//! cargo nextest run -p weft-e2e --test suite -E 'test(/^envtest::/)'
//! ```
//!
//! No controller-manager runs there: nothing makes EndpointSlices or default roles, Pods stay
//! Pending; the tests make what they need.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use weft_e2e::envtest::EnvTest;
use weft_e2e::lab::bin;

/// The API server, or `None` after printing why the test skips.
fn envtest(test: &str) -> Option<EnvTest> {
    if let Some(why) = weft_e2e::envtest::missing() {
        println!("SKIP {test}: {why}");
        return None;
    }
    for b in ["weftctl", "weft-control-plane", "weft-injector"] {
        if !bin(b).exists() {
            println!(
                "SKIP {test}: {} is not built (cargo build --workspace --bins)",
                bin(b).display()
            );
            return None;
        }
    }
    match EnvTest::start() {
        Ok(e) => Some(e),
        Err(e) => panic!("{test}: KUBEBUILDER_ASSETS is set but envtest did not start: {e}"),
    }
}

const CRDS: [&str; 4] = [
    "trafficpolicies.weft.dev",
    "rollouts.weft.dev",
    "meshpeers.weft.dev",
    "peerauthentications.weft.dev",
];

#[test]
fn envtest_weftctl_install_is_accepted_and_every_crd_is_established_and_structural() {
    let Some(env) =
        envtest("envtest_weftctl_install_is_accepted_and_every_crd_is_established_and_structural")
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(bin("weftctl"))
        .env("KUBECONFIG", &env.kubeconfig)
        .args(["install", "--cluster-name", "c1", "--root-out-dir"])
        .arg(dir.path())
        .arg("--credentials-out")
        .arg(dir.path().join("credentials.pem"))
        .output()
        .expect("weftctl install");
    assert!(
        out.status.success(),
        "install refused by a real API server: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        env.logs()
    );
    for crd in CRDS {
        env.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            &format!("crd/{crd}"),
            "--timeout=30s",
        ]);
        let non_structural = env.kubectl_ok(&[
            "get",
            &format!("crd/{crd}"),
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"NonStructuralSchema\")].status}",
        ]);
        assert!(
            non_structural.trim().is_empty(),
            "{crd}: NonStructuralSchema {non_structural}"
        );
    }
    // A valid object is stored; the validation the schema carries refuses a missing required
    // field and a wrong type, naming the field.
    env.kubectl_ok(&["create", "namespace", "shop"]);
    let policy = |name: &str, spec: &str| {
        env.apply(&format!(
            "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n"
        ))
    };
    let created = policy("p", "{targetRef: {kind: Service, name: web}}");
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    for (name, spec, field) in [
        ("q", "{}", "spec.targetRef"),
        (
            "r",
            "{targetRef: {kind: Service, name: 7}}",
            "spec.targetRef.name",
        ),
    ] {
        let wrong = policy(name, spec);
        let err = String::from_utf8_lossy(&wrong.stderr);
        assert!(
            !wrong.status.success() && err.contains(field),
            "{spec}: {err}"
        );
    }
    // The status subresource: status is written through it (what the source's Accepted
    // condition uses), and a status in the main resource is ignored.
    let patched = env.kubectl(&[
        "-n",
        "shop",
        "patch",
        "trafficpolicy",
        "p",
        "--subresource=status",
        "--type=merge",
        "-p",
        "{\"status\":{\"conditions\":[{\"type\":\"Accepted\",\"status\":\"True\",\"reason\":\"Accepted\",\"message\":\"ok\",\"lastTransitionTime\":\"2026-01-01T00:00:00Z\"}]}}",
    ]);
    assert!(
        patched.status.success(),
        "{}",
        String::from_utf8_lossy(&patched.stderr)
    );
    // A CRD whose schema is not structural is refused by the server too, as crd.rs checks.
    let broken = env.apply(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: brokens.weft.dev}\nspec:\n  group: weft.dev\n  names: {kind: Broken, plural: brokens}\n  scope: Namespaced\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        properties:\n          spec: {properties: {x: {type: string}}}\n",
    );
    assert!(
        !broken.status.success(),
        "a non-structural CRD was accepted"
    );
}

/// A control-plane replica as a process (killed when dropped) and its metrics address.
struct Replica {
    child: Child,
    metrics: String,
}

impl Replica {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The sum of the samples of metric `name` whose labels contain every one of `labels`
    /// (0 when unreachable or absent).
    fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        use std::io::{Read, Write};
        let mut text = String::new();
        if let Ok(mut s) = std::net::TcpStream::connect(&self.metrics) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n");
            let _ = s.read_to_string(&mut text);
        }
        text.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A control-plane replica as a process, with the administrator's credentials.
fn replica(env: &EnvTest, name: &str, ca: &std::path::Path) -> Replica {
    replica_as(&env.kubeconfig, name, ca)
}

/// A control-plane replica as a process, with the credentials of `kubeconfig`.
fn replica_as(kubeconfig: &std::path::Path, name: &str, ca: &std::path::Path) -> Replica {
    let port = |p: u16| format!("127.0.0.1:{p}");
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port")
    };
    let metrics = port(free());
    let child = Command::new(bin("weft-control-plane"))
        .env("KUBECONFIG", kubeconfig)
        .args([
            "--kubernetes",
            "--cluster-name",
            "c1",
            "--lease-duration",
            "3s",
            "--replica",
            name,
        ])
        .arg("--ca-dir")
        .arg(ca)
        .args(["--grpc-addr", &port(free()), "--metrics-addr", &metrics])
        .args(["--replica-service", "none"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("control plane");
    Replica { child, metrics }
}

/// SMI's TrafficSplit, which a Rollout drives (another project's CRD: a minimal stand-in with
/// an open schema, as a cluster with the SMI CRDs installed would serve it).
const SMI_TRAFFIC_SPLIT_CRD: &str = "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: trafficsplits.split.smi-spec.io}\nspec:\n  group: split.smi-spec.io\n  scope: Namespaced\n  names: {plural: trafficsplits, singular: trafficsplit, kind: TrafficSplit}\n  versions: [{name: v1alpha4, served: true, storage: true, schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}}]\n";

/// Two replicas through a real Lease: one leads; killed, the follower takes the Lease within
/// its duration — and a Rollout the old leader had brought to 50 % is resumed there from its
/// status, not started over at its first step.
#[test]
fn envtest_the_follower_takes_the_lease_within_its_duration_when_the_leader_dies() {
    let Some(env) =
        envtest("envtest_the_follower_takes_the_lease_within_its_duration_when_the_leader_dies")
    else {
        return;
    };
    env.apply_install_file("01-crds.yaml");
    env.apply_ok(SMI_TRAFFIC_SPLIT_CRD);
    env.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/trafficsplits.split.smi-spec.io",
        "crd/rollouts.weft.dev",
        "--timeout=30s",
    ]);
    env.kubectl_ok(&["create", "namespace", "weft-system"]);
    env.kubectl_ok(&["create", "namespace", "shop"]);
    let mut world = String::new();
    for svc in ["web", "web-v1", "web-v2"] {
        world += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: shop}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\n"
        );
    }
    world += "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: web, namespace: shop}\nspec: {service: web, backends: [{service: web-v1, weight: 90}, {service: web-v2, weight: 10}]}\n---\napiVersion: weft.dev/v1alpha1\nkind: Rollout\nmetadata: {name: web, namespace: shop}\nspec: {trafficSplit: web, canary: web-v2, steps: [20, 50, 100], interval: 1h}\n";
    env.apply_ok(&world);
    // Where a previous leader left it: the second step.
    env.kubectl_ok(&[
        "-n",
        "shop",
        "patch",
        "rollout",
        "web",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Progressing","weight":50}}"#,
    ]);
    let rollout_weight = || {
        env.kubectl_ok(&[
            "-n",
            "shop",
            "get",
            "rollout",
            "web",
            "-o",
            "jsonpath={.status.phase} {.status.weight}",
        ])
        .trim()
        .to_string()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    weft_control_plane::identity::Ca::load_or_generate(Some(&ca), "cluster.local", "c1")
        .expect("CA");
    let mut replicas = [
        ("a", replica(&env, "a", &ca)),
        ("b", replica(&env, "b", &ca)),
    ];
    let holder = || {
        let o = env.kubectl(&[
            "-n",
            "weft-system",
            "get",
            "lease",
            "weft-control-plane",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]);
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let until = |what: &str, patience: Duration, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + patience;
        while !f() {
            assert!(
                Instant::now() < deadline,
                "{what}: holder {:?}, rollout {:?}\n{}",
                holder(),
                rollout_weight(),
                env.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let resumed = |r: &Replica| {
        r.metric(
            "weft_rollout_decisions_total",
            &["rollout=\"shop/web\"", "decision=\"resume\""],
        ) >= 1.0
    };
    until("a leader", Duration::from_secs(60), &|| {
        let h = holder();
        h == "a" || h == "b"
    });
    let leader = holder();
    let (lead, follow) = if leader == "a" { (0, 1) } else { (1, 0) };
    until(
        "the leader resumes the rollout from its status",
        Duration::from_secs(20),
        &|| resumed(&replicas[lead].1),
    );
    assert!(
        !resumed(&replicas[follow].1),
        "the follower decides nothing"
    );
    assert_eq!(rollout_weight(), "Progressing 50", "resumed, not restarted");
    let killed = Instant::now();
    replicas[lead].1.kill();
    until("the follower takes over", Duration::from_secs(10), &|| {
        let h = holder();
        !h.is_empty() && h != leader
    });
    // Within the lease duration (3 s) plus one renewal period of slack.
    assert!(
        killed.elapsed() < Duration::from_secs(6),
        "{} took {:?}",
        holder(),
        killed.elapsed()
    );
    until(
        "the new leader resumes the rollout where the old one left it",
        Duration::from_secs(20),
        &|| resumed(&replicas[follow].1),
    );
    assert_eq!(rollout_weight(), "Progressing 50");
}

#[tokio::test]
async fn envtest_token_review_accepts_a_token_requested_for_the_mesh_and_refuses_another_audience()
{
    let Some(env) = envtest(
        "envtest_token_review_accepts_a_token_requested_for_the_mesh_and_refuses_another_audience",
    ) else {
        return;
    };
    env.kubectl_ok(&["create", "namespace", "shop"]);
    let kubeconfig = kube::config::Kubeconfig::read_from(&env.kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    let client = kube::Client::try_from(config).expect("client");
    let reviewer = weft_control_plane::token_review::TokenReviewer::new(
        client,
        vec![weft_proto::keys::TOKEN_AUDIENCE.into()],
        "cluster.local",
    );
    // What a pod of shop/checkout holds with a projected token for the mesh's audience.
    let (_, right) = env
        .service_account("shop", "checkout", weft_proto::keys::TOKEN_AUDIENCE)
        .expect("token");
    let id = reviewer.review(&right).await.expect("reviewed");
    assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/checkout");
    // Its default token (the API server's audience) proves nothing to the mesh.
    let (_, wrong) = env
        .service_account("shop", "checkout", "https://kubernetes.default.svc")
        .expect("token");
    let refused = reviewer.review(&wrong).await;
    assert!(
        matches!(
            refused,
            Err(weft_control_plane::token_review::ReviewError::Audience { .. })
        ),
        "{refused:?}"
    );
    // A token that is no token at all.
    assert!(reviewer.review("not-a-token").await.is_err());
}

/// A CA and a serving certificate for 127.0.0.1: (CA PEM, certificate PEM, key PEM).
fn loopback_serving_certificate() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "envtest webhook CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &issuer).expect("leaf");
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

#[test]
fn envtest_the_injector_registered_by_a_real_webhook_configuration_injects_and_denies() {
    use base64::Engine;
    let Some(env) = envtest(
        "envtest_the_injector_registered_by_a_real_webhook_configuration_injects_and_denies",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = loopback_serving_certificate();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    let (cert, key) = (file("tls.crt", &cert), file("tls.key", &key));
    let root = dir.path().join("ca");
    weft_control_plane::identity::Ca::load_or_generate(Some(&root), "cluster.local", "c1")
        .expect("mesh root");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let mut injector = Command::new(bin("weft-injector"))
        .args([
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--cluster-name",
            "c1",
        ])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--root-cert")
        .arg(root.join("root.pem"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("injector");
    // Registered the way install/04-injector.yaml does, but reached by URL on loopback.
    let ca_bundle = base64::engine::general_purpose::STANDARD.encode(ca);
    env.apply_ok(&format!(
        "apiVersion: admissionregistration.k8s.io/v1\nkind: MutatingWebhookConfiguration\nmetadata: {{name: weft-injector}}\nwebhooks:\n- name: inject.weft.dev\n  admissionReviewVersions: [v1]\n  sideEffects: None\n  failurePolicy: Fail\n  reinvocationPolicy: Never\n  timeoutSeconds: 5\n  namespaceSelector:\n    matchLabels: {{weft.dev/injection: enabled}}\n  rules:\n  - {{apiGroups: [\"\"], apiVersions: [v1], operations: [CREATE], resources: [pods], scope: Namespaced}}\n  clientConfig:\n    url: https://127.0.0.1:{port}/inject\n    caBundle: {ca_bundle}\n"
    ));
    env.kubectl_ok(&["create", "namespace", "shop"]);
    env.kubectl_ok(&["label", "namespace", "shop", "weft.dev/injection=enabled"]);
    env.kubectl_ok(&["create", "namespace", "plain"]);
    let pod = |ns: &str, name: &str, annotations: &str| {
        env.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, annotations: {{{annotations}}}}}\nspec:\n  serviceAccountName: default\n  containers: [{{name: app, image: app:1, ports: [{{containerPort: 8080}}]}}]\n"
        ))
    };
    // The default service account is made by a controller that does not run here.
    for ns in ["shop", "plain"] {
        let _ = env.kubectl(&["-n", ns, "create", "serviceaccount", "default"]);
    }
    let containers = |ns: &str, name: &str| {
        env.kubectl_ok(&[
            "-n",
            ns,
            "get",
            "pod",
            name,
            "-o",
            "jsonpath={.spec.initContainers[*].name} {.spec.containers[*].name}",
        ])
    };
    // The injector may take a moment to serve: retry the first pod until it is admitted.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = pod("shop", "injected", "");
        if o.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pod was never admitted: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let injected = containers("shop", "injected");
    assert!(injected.contains("weft"), "not injected: {injected}");
    // Opted out by annotation, and a namespace without the label: untouched.
    weft_e2e::lab::succeeded(
        "create pod",
        pod("shop", "opted-out", "weft.dev/inject: \"false\""),
    );
    assert!(!containers("shop", "opted-out").contains("weft"));
    weft_e2e::lab::succeeded("create pod", pod("plain", "unlabelled", ""));
    assert!(!containers("plain", "unlabelled").contains("weft"));
    // A malformed Weft annotation: denied through the API, naming it.
    let denied = pod("shop", "bad", "weft.dev/exclude-inbound-ports: \"80,http\"");
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(
        !denied.status.success() && err.contains("weft.dev/exclude-inbound-ports"),
        "{err}"
    );
    // Pods stay Pending: no scheduler or kubelet here.
    let phase = env.kubectl_ok(&[
        "-n",
        "shop",
        "get",
        "pod",
        "injected",
        "-o",
        "jsonpath={.status.phase}",
    ]);
    assert_eq!(phase.trim(), "Pending");
    let _ = injector.kill();
    let _ = injector.wait();
}

#[test]
fn envtest_the_kube_source_lists_and_watches_and_writes_accepted_statuses() {
    let Some(env) =
        envtest("envtest_the_kube_source_lists_and_watches_and_writes_accepted_statuses")
    else {
        return;
    };
    env.apply_install_file("01-crds.yaml");
    for crd in CRDS {
        env.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            &format!("crd/{crd}"),
            "--timeout=30s",
        ]);
    }
    env.kubectl_ok(&["create", "namespace", "weft-system"]);
    env.kubectl_ok(&["create", "namespace", "shop"]);
    // The control plane runs as its own service account with exactly install/'s RBAC (no
    // default roles exist here): what it may not do, it cannot.
    env.apply_install_file("02-rbac.yaml");
    let (kubeconfig, _) = env
        .service_account("weft-system", "weft-control-plane", &env.url)
        .expect("the control plane's token");
    // A Service with its EndpointSlice (no controller makes slices here), a valid policy for
    // it, and one for a Service that does not exist.
    let world = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [\"198.18.9.1\"], conditions: {ready: true}}]\n---\napiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: good, namespace: shop}\nspec: {targetRef: {kind: Service, name: web}}\n---\napiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: orphan, namespace: shop}\nspec: {targetRef: {kind: Service, name: nowhere}}\n";
    env.apply_ok(world);
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    weft_control_plane::identity::Ca::load_or_generate(Some(&ca), "cluster.local", "c1")
        .expect("CA");
    let mut cp = replica_as(&kubeconfig, "a", &ca);
    let accepted = |name: &str| {
        env.kubectl_ok(&[
            "-n",
            "shop",
            "get",
            "trafficpolicy",
            name,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Accepted\")].status} {.status.conditions[?(@.type==\"Accepted\")].message}",
        ])
    };
    let until = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !f() {
            assert!(Instant::now() < deadline, "{what}\n{}", env.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    until("the valid policy is Accepted", &|| {
        accepted("good").starts_with("True")
    });
    until("the orphan policy is refused, naming the field", &|| {
        let a = accepted("orphan");
        a.starts_with("False") && a.contains("spec.targetRef.name")
    });
    // Another controller's condition on the same object: Weft's writes keep it (they carry
    // the resourceVersion they read and are re-based on a 409).
    env.kubectl_ok(&[
        "-n",
        "shop",
        "patch",
        "trafficpolicy",
        "orphan",
        "--subresource=status",
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/status/conditions/-","value":{"type":"Audited","status":"True","reason":"Audited","message":"by another controller","lastTransitionTime":"2026-12-01T00:00:00Z"}}]"#,
    ]);
    // The API server ends every watch within 5–10 s here (`--min-request-timeout=5`): wait
    // past two expiries, so what follows is seen by a watch that was resumed.
    std::thread::sleep(Duration::from_secs(12));
    // A watch, not a one-time list: the Service appears, and the orphan is accepted.
    env.apply_ok(
        "apiVersion: v1\nkind: Service\nmetadata: {name: nowhere, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n",
    );
    until("the orphan is accepted once its Service exists", &|| {
        accepted("orphan").starts_with("True")
    });
    let audited = env.kubectl_ok(&[
        "-n",
        "shop",
        "get",
        "trafficpolicy",
        "orphan",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Audited\")].status}",
    ]);
    assert_eq!(
        audited.trim(),
        "True",
        "the other controller's condition was lost"
    );
    cp.kill();
}
