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

/// A control-plane replica as a process (admin credentials; the test is about the Lease).
fn replica(env: &EnvTest, name: &str, ca: &std::path::Path) -> Child {
    let port = |p: u16| format!("127.0.0.1:{p}");
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port")
    };
    Command::new(bin("weft-control-plane"))
        .env("KUBECONFIG", &env.kubeconfig)
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
        .args([
            "--grpc-addr",
            &port(free()),
            "--metrics-addr",
            &port(free()),
        ])
        .args(["--replica-service", "none"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("control plane")
}

#[test]
fn envtest_the_follower_takes_the_lease_within_its_duration_when_the_leader_dies() {
    let Some(env) =
        envtest("envtest_the_follower_takes_the_lease_within_its_duration_when_the_leader_dies")
    else {
        return;
    };
    let crds = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../install/01-crds.yaml"
    ))
    .expect("CRDs");
    let applied = env.apply(&crds);
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    env.kubectl_ok(&["create", "namespace", "weft-system"]);
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
    let until = |what: &str, patience: Duration, f: &dyn Fn(&str) -> bool| -> String {
        let deadline = Instant::now() + patience;
        loop {
            let h = holder();
            if f(&h) {
                return h;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: holder {h:?}\n{}",
                env.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let leader = until("a leader", Duration::from_secs(60), &|h| {
        h == "a" || h == "b"
    });
    let killed = Instant::now();
    for (name, child) in replicas.iter_mut() {
        if *name == leader {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    let next = until("the follower takes over", Duration::from_secs(10), &|h| {
        !h.is_empty() && h != leader
    });
    // Within the lease duration (3 s) plus one renewal period of slack.
    assert!(
        killed.elapsed() < Duration::from_secs(6),
        "{next} took {:?}",
        killed.elapsed()
    );
    for (_, child) in replicas.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
}
