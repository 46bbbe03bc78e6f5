//! `install/` and what `weftctl install` / `weftctl inject` make of it: every manifest
//! deserializes into its `k8s_openapi` type without losing a field, the rendered set carries
//! the options, a mesh root and a webhook certificate whose CA is the webhook's caBundle; and
//! `inject` runs the webhook's patch function on Pods and workload templates offline.

use std::process::Command;

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

const WEFTCTL: &str = env!("CARGO_BIN_EXE_weftctl");
const INSTALL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../install");

fn docs(yaml: &str) -> Vec<Value> {
    let v: Vec<Value> = serde_saphyr::from_multiple(yaml).expect("YAML");
    v.into_iter().filter(|d| !d.is_null()).collect()
}

/// Deserializes `doc` as `T` and back; the JSON must be the same (no field unknown to the type).
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) {
    let what = format!("{} {}", doc["kind"], doc["metadata"]["name"]);
    let t: T = serde_path_to_error::deserialize(doc.clone())
        .unwrap_or_else(|e| panic!("{what}: at {}: {}", e.path(), e.inner()));
    let back = serde_json::to_value(&t).expect("serialize");
    assert_eq!(
        &back, doc,
        "{what}: a field the type does not know was dropped"
    );
}

fn check(doc: &Value) {
    match doc["kind"].as_str().unwrap_or_default() {
        "Namespace" => typed::<Namespace>(doc),
        "CustomResourceDefinition" => typed::<CustomResourceDefinition>(doc),
        "ServiceAccount" => typed::<ServiceAccount>(doc),
        "ClusterRole" => typed::<ClusterRole>(doc),
        "ClusterRoleBinding" => typed::<ClusterRoleBinding>(doc),
        "Role" => typed::<Role>(doc),
        "RoleBinding" => typed::<RoleBinding>(doc),
        "Deployment" => typed::<Deployment>(doc),
        "Service" => typed::<Service>(doc),
        "PodDisruptionBudget" => typed::<PodDisruptionBudget>(doc),
        "MutatingWebhookConfiguration" => typed::<MutatingWebhookConfiguration>(doc),
        "Secret" => typed::<Secret>(doc),
        "ConfigMap" => typed::<ConfigMap>(doc),
        other => panic!("install/ has a {other} this test does not know: add its type"),
    }
}

#[test]
fn every_install_manifest_deserializes_into_its_kubernetes_type() {
    let mut kinds = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(INSTALL)
        .expect("install/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    for f in files {
        for d in docs(&std::fs::read_to_string(&f).expect("read")) {
            check(&d);
            kinds.push(d["kind"].as_str().unwrap_or_default().to_string());
        }
    }
    for k in [
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "Deployment",
        "PodDisruptionBudget",
        "MutatingWebhookConfiguration",
    ] {
        assert!(kinds.iter().any(|x| x == k), "install/ has no {k}");
    }
}

fn weftctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(WEFTCTL).args(args).output().expect("weftctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn install_dry_run_renders_the_options_a_root_and_the_webhook_certificate() {
    let ca = tempfile::tempdir().expect("tempdir");
    weft_control_plane::identity::Ca::load_or_generate(Some(ca.path()), "mesh.example", "east")
        .expect("CA");
    let (code, out, err) = weftctl(&[
        "install",
        "--dry-run",
        "--cluster-name",
        "east",
        "--trust-domain",
        "mesh.example",
        "--registry",
        "registry.example/weft",
        "--tag",
        "9.9.9",
        "--ca-dir",
        &ca.path().to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{err}");
    let rendered = docs(&out);
    for d in &rendered {
        check(d);
    }
    let committed: usize = std::fs::read_dir(INSTALL)
        .expect("install/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| docs(&std::fs::read_to_string(p).expect("read")).len())
        .sum();
    assert_eq!(
        rendered.len(),
        committed + 3,
        "install/ plus two Secrets and a ConfigMap"
    );

    let cp = find(&rendered, "Deployment", "weft-control-plane");
    let c = &cp["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.example/weft/weft-control-plane:9.9.9");
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(args.contains(&"--cluster-name=east"), "{args:?}");
    assert!(args.contains(&"--trust-domain=mesh.example"), "{args:?}");
    let inj = find(&rendered, "Deployment", "weft-injector");
    let args: Vec<&str> = inj["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.contains(&"--image=registry.example/weft/weft-sidecar:9.9.9"),
        "{args:?}"
    );

    // The given root, for the control plane (Secret) and the injector (ConfigMap).
    let root = std::fs::read_to_string(ca.path().join("root.pem")).expect("root");
    assert_eq!(
        find(&rendered, "Secret", "weft-ca")["stringData"]["root.pem"],
        root
    );
    assert_eq!(
        find(&rendered, "ConfigMap", "weft-root")["data"]["root.pem"],
        root
    );

    // The webhook's caBundle is the CA that signed its serving certificate.
    let hook = find(&rendered, "MutatingWebhookConfiguration", "weft-injector");
    let bundle = base64::engine::general_purpose::STANDARD
        .decode(
            hook["webhooks"][0]["clientConfig"]["caBundle"]
                .as_str()
                .expect("caBundle"),
        )
        .expect("base64");
    let ca_pem = String::from_utf8(bundle).expect("PEM");
    let tls = find(&rendered, "Secret", "weft-injector-tls");
    let cert_pem = tls["stringData"]["tls.crt"].as_str().expect("cert");
    let der = |pem: &str| {
        use rustls_pki::pem::PemObject;
        rustls_pki::CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM cert")
    };
    let (ca_der, leaf_der) = (der(&ca_pem), der(cert_pem));
    let (_, ca_x) = x509_parser::parse_x509_certificate(&ca_der).expect("CA");
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).expect("leaf");
    assert_eq!(leaf.issuer(), ca_x.subject());
    leaf.verify_signature(Some(ca_x.public_key()))
        .expect("the serving certificate is signed by the caBundle's CA");
    let sans = format!("{:?}", leaf.subject_alternative_name().expect("SAN"));
    assert!(sans.contains("weft-injector.weft-system.svc"), "{sans}");

    // Bad options are refused before anything is made.
    let (code, _, err) = weftctl(&["install", "--dry-run", "--cluster-name", "Not_A_Name"]);
    assert_ne!(code, 0);
    assert!(err.contains("--cluster-name"), "{err}");
}

#[test]
fn inject_patches_pods_and_workload_templates_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root.pem");
    std::fs::write(
        &root,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let input = dir.path().join("app.yaml");
    std::fs::write(
        &input,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n      - name: web\n        image: web:1\n        readinessProbe: {httpGet: {path: /ready, port: 8080}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings, namespace: shop}\ndata: {a: b}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: once, namespace: shop, annotations: {weft.dev/sidecar-mode: classic}}\nspec:\n  containers: [{name: job, image: job:1}]\n",
    )
    .expect("write");
    let (code, out, err) = weftctl(&[
        "inject",
        "-f",
        &input.to_string_lossy(),
        "--root-cert",
        &root.to_string_lossy(),
        "--cluster-name",
        "east",
    ]);
    assert_eq!(code, 0, "{err}");
    let out = docs(&out);
    assert_eq!(out.len(), 3);
    let deployment: Deployment = serde_json::from_value(out[0].clone()).expect("Deployment");
    let tpl = deployment.spec.template;
    let spec = tpl.spec.expect("pod spec");
    let inits: Vec<String> = spec
        .init_containers
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(inits, ["weft-init", "weft-proxy"]);
    assert_eq!(
        spec.containers[0]
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
            .as_deref(),
        Some("/app-health/8080/ready")
    );
    assert_eq!(
        tpl.metadata
            .and_then(|m| m.labels)
            .and_then(|l| l.get("weft.dev/tls-mode").cloned())
            .as_deref(),
        Some("weft")
    );
    assert_eq!(
        out[1],
        docs(&std::fs::read_to_string(&input).expect("read"))[1],
        "a ConfigMap passes through"
    );
    let pod: Pod = serde_json::from_value(out[2].clone()).expect("Pod");
    assert_eq!(
        pod.spec.expect("spec").containers[0].name,
        "weft-proxy",
        "classic mode"
    );

    // Injecting the output again changes nothing more.
    let again = dir.path().join("again.yaml");
    std::fs::write(&again, serde_saphyr::to_string(&out[0]).expect("yaml")).expect("write");
    let (code, twice, err) = weftctl(&[
        "inject",
        "-f",
        &again.to_string_lossy(),
        "--root-cert",
        &root.to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(docs(&twice)[0], out[0]);
    assert!(err.contains("already has Weft's proxy"), "{err}");

    // A malformed annotation is an error naming it.
    std::fs::write(
        &input,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: bad, annotations: {weft.dev/exclude-outbound-cidrs: \"10.0.0.0/99\"}}\nspec: {containers: [{name: a, image: a}]}\n",
    )
    .expect("write");
    let (code, _, err) = weftctl(&[
        "inject",
        "-f",
        &input.to_string_lossy(),
        "--root-cert",
        &root.to_string_lossy(),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("weft.dev/exclude-outbound-cidrs") && err.contains("10.0.0.0/99"),
        "{err}"
    );
}

/// The official Kubernetes schemas (offline, `kubernetes-validate` from PyPI in .venv, which
/// `./scripts/test.sh` installs): install/, what `install` renders and what `inject` makes.
#[test]
fn manifests_and_injected_pods_pass_the_official_kubernetes_schemas() {
    let validator = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../.venv/bin/kubernetes-validate"
    );
    if !std::path::Path::new(validator).exists() {
        println!(
            "SKIP manifests_and_injected_pods_pass_the_official_kubernetes_schemas: {validator} \
             is not installed (./scripts/test.sh installs it)"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, rendered, err) = weftctl(&["install", "--dry-run", "--cluster-name", "east"]);
    assert_eq!(code, 0, "{err}");
    let rendered_file = dir.path().join("rendered.yaml");
    std::fs::write(&rendered_file, rendered).expect("write");
    let root = dir.path().join("root.pem");
    std::fs::write(
        &root,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../injector/tests/fixtures/pod.yaml"
    );
    let (code, injected, err) = weftctl(&[
        "inject",
        "-f",
        fixture,
        "--root-cert",
        &root.to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{err}");
    let injected_file = dir.path().join("injected.yaml");
    std::fs::write(&injected_file, injected).expect("write");
    let mut files: Vec<String> = std::fs::read_dir(INSTALL)
        .expect("install/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    files.sort();
    files.push(rendered_file.to_string_lossy().into_owned());
    files.push(injected_file.to_string_lossy().into_owned());
    let out = Command::new(validator)
        .args(["-k", "1.33.0", "--strict"])
        .args(&files)
        .output()
        .expect("kubernetes-validate runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("ERROR"), "{text}");
    assert!(
        text.contains("passed for resource pod/checkout-7d9f"),
        "{text}"
    );
    assert!(
        text.contains("mutatingwebhookconfiguration/weft-injector"),
        "{text}"
    );
}
