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

/// `weftctl inject` of the injector's fixture pod (with a placeholder root in `dir`): the YAML.
fn inject_fixture(dir: &std::path::Path) -> String {
    let root = dir.join("root.pem");
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
    injected
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
    let secret_root = base64::engine::general_purpose::STANDARD
        .decode(
            find(&rendered, "Secret", "weft-ca")["data"]["root.pem"]
                .as_str()
                .expect("root.pem"),
        )
        .expect("base64");
    assert_eq!(String::from_utf8_lossy(&secret_root), root);
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
        Some("/app-health/web/readyz")
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
    let injected = inject_fixture(dir.path());
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

/// A file the kubelet writes into a Secret, ConfigMap, projected or downward-API volume:
/// (volume, file, mode, owner uid, owner gid).
type VolumeFile = (String, String, u32, u32, u32);

/// The files of `volume` as the kubelet lays them out, following its documented rules: mode
/// from the item, else the volume's `defaultMode`, else 0644; owned by root; with a pod
/// `fsGroup`, group-owned by it and made owner- and group-readable (`SetVolumeOwnership` for
/// read-only volumes). `objects` are the Secrets/ConfigMaps the install renders (their keys).
fn volume_files(volume: &Value, objects: &[Value], fs_group: Option<u32>) -> Vec<VolumeFile> {
    let name = volume["name"].as_str().unwrap_or_default().to_string();
    let default_mode = |v: &Value| v["defaultMode"].as_u64().map_or(0o644, |m| m as u32);
    let keys_of = |kind: &str, obj_name: &str| -> Vec<String> {
        objects
            .iter()
            .filter(|o| o["kind"] == kind && o["metadata"]["name"] == obj_name)
            .flat_map(|o| {
                ["data", "stringData"]
                    .iter()
                    .filter_map(|f| o[*f].as_object())
                    .flat_map(|m| m.keys().cloned())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    // (source, its default mode) -> files (path, mode)
    let files_of = |src: &Value, kind: &str, obj_name: &str, mode: u32| -> Vec<(String, u32)> {
        match src["items"].as_array() {
            Some(items) => items
                .iter()
                .map(|i| {
                    (
                        i["path"].as_str().unwrap_or_default().to_string(),
                        i["mode"].as_u64().map_or(mode, |m| m as u32),
                    )
                })
                .collect(),
            None => {
                let keys = keys_of(kind, obj_name);
                assert!(
                    !keys.is_empty(),
                    "volume {name}: the install renders no {kind} {obj_name} with keys"
                );
                keys.into_iter().map(|k| (k, mode)).collect()
            }
        }
    };
    let mut files: Vec<(String, u32)> = Vec::new();
    if let Some(s) = volume.get("secret") {
        let secret = s["secretName"].as_str().unwrap_or_default();
        files = files_of(s, "Secret", secret, default_mode(s));
    } else if let Some(c) = volume.get("configMap") {
        let cm = c["name"].as_str().unwrap_or_default();
        files = files_of(c, "ConfigMap", cm, default_mode(c));
    } else if let Some(p) = volume.get("projected") {
        let mode = default_mode(p);
        for src in p["sources"].as_array().into_iter().flatten() {
            if let Some(t) = src.get("serviceAccountToken") {
                files.push((t["path"].as_str().unwrap_or_default().to_string(), mode));
            } else if let Some(s) = src.get("secret") {
                files.extend(files_of(
                    s,
                    "Secret",
                    s["name"].as_str().unwrap_or(""),
                    mode,
                ));
            } else if let Some(c) = src.get("configMap") {
                files.extend(files_of(
                    c,
                    "ConfigMap",
                    c["name"].as_str().unwrap_or(""),
                    mode,
                ));
            }
        }
    } else if let Some(d) = volume.get("downwardAPI") {
        let mode = default_mode(d);
        for i in d["items"].as_array().into_iter().flatten() {
            let m = i["mode"].as_u64().map_or(mode, |m| m as u32);
            files.push((i["path"].as_str().unwrap_or_default().to_string(), m));
        }
    }
    files
        .into_iter()
        .map(|(f, mode)| match fs_group {
            Some(g) => (name.clone(), f, mode | 0o440, 0, g),
            None => (name.clone(), f, mode, 0, 0),
        })
        .collect()
}

/// Whether a process (uid, gid, supplementary groups, may bypass file modes) can read a file.
fn readable(uid: u32, groups: &[u32], dac_override: bool, f: &VolumeFile) -> bool {
    let (_, _, mode, owner, group) = *f;
    dac_override
        || (uid == owner && mode & 0o400 != 0)
        || (groups.contains(&group) && mode & 0o040 != 0)
        || mode & 0o004 != 0
}

/// Checks every container of `pod_spec` (in `what`): each file in each Secret/ConfigMap/
/// projected/downward-API volume it mounts must be readable by the user it runs as.
fn check_volume_permissions(what: &str, spec: &Value, objects: &[Value]) -> usize {
    let pod_sc = &spec["securityContext"];
    let fs_group = pod_sc["fsGroup"].as_u64().map(|g| g as u32);
    let volumes: Vec<&Value> = spec["volumes"].as_array().into_iter().flatten().collect();
    let containers = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| spec[*k].as_array().cloned().unwrap_or_default());
    let mut checked = 0;
    for c in containers {
        let cname = c["name"].as_str().unwrap_or_default();
        let sc = &c["securityContext"];
        let uid = sc["runAsUser"]
            .as_u64()
            .or(pod_sc["runAsUser"].as_u64())
            .unwrap_or_else(|| panic!("{what}/{cname}: no runAsUser: its user is the image's"))
            as u32;
        let gid = sc["runAsGroup"]
            .as_u64()
            .or(pod_sc["runAsGroup"].as_u64())
            .unwrap_or(0) as u32;
        let mut groups = vec![gid];
        groups.extend(fs_group);
        for g in pod_sc["supplementalGroups"]
            .as_array()
            .into_iter()
            .flatten()
        {
            groups.extend(g.as_u64().map(|g| g as u32));
        }
        // Root reads anything only while it keeps CAP_DAC_OVERRIDE (or DAC_READ_SEARCH).
        let caps = &sc["capabilities"];
        let list = |k: &str| -> Vec<String> {
            caps[k]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        };
        let dropped_all = list("drop").iter().any(|d| d == "ALL");
        let added = list("add");
        let dac = uid == 0
            && (!dropped_all
                || added
                    .iter()
                    .any(|a| a == "DAC_OVERRIDE" || a == "DAC_READ_SEARCH"));
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let vname = m["name"].as_str().unwrap_or_default();
            let Some(v) = volumes.iter().find(|v| v["name"] == vname) else {
                panic!("{what}/{cname}: mounts {vname}, which the pod does not have");
            };
            for f in volume_files(v, objects, fs_group) {
                assert!(
                    readable(uid, &groups, dac, &f),
                    "{what}/{cname} runs as {uid}:{gid} (groups {groups:?}) and cannot read \
                     {}/{} (volume {}: mode {:o}, owner {}:{}): set fsGroup and a group-readable \
                     defaultMode",
                    m["mountPath"].as_str().unwrap_or_default(),
                    f.1,
                    f.0,
                    f.2,
                    f.3,
                    f.4
                );
                checked += 1;
            }
        }
    }
    checked
}

/// Every file a container of the rendered install (and of an injected pod) reads from a
/// mounted Secret or ConfigMap is readable by that container's uid/gid under its
/// securityContext, as the kubelet lays the files out. (The installed control plane once
/// crash-looped on `root.pem: Permission denied`: a 0400 root-owned Secret, uid 65532.)
#[test]
fn every_mounted_secret_and_config_map_file_is_readable_by_its_container() {
    let (code, rendered, err) = weftctl(&["install", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    let objects = docs(&rendered);
    let mut checked = 0;
    for d in objects.iter().filter(|d| d["kind"] == "Deployment") {
        let what = format!("Deployment {}", d["metadata"]["name"]);
        checked += check_volume_permissions(&what, &d["spec"]["template"]["spec"], &objects);
    }
    // The two Secrets (weft-ca, weft-injector-tls) and the ConfigMap weft-root, at least.
    assert!(checked >= 5, "only {checked} files checked");
    // An injected pod: the proxy reads its projected service-account token.
    let dir = tempfile::tempdir().expect("tempdir");
    let injected = inject_fixture(dir.path());
    for pod in docs(&injected).iter().filter(|d| d["kind"] == "Pod") {
        let mut spec = pod["spec"].clone();
        // The fixture's app containers run as their image's user; only Weft's are checked.
        for k in ["initContainers", "containers"] {
            if let Some(list) = spec[k].as_array_mut() {
                list.retain(|c| c["name"].as_str().is_some_and(|n| n.starts_with("weft")));
            }
        }
        let what = format!("injected Pod {}", pod["metadata"]["name"]);
        assert!(check_volume_permissions(&what, &spec, &objects) >= 1);
    }
}
