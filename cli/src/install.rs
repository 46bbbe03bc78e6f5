//! `weftctl install` and `weftctl inject`: the manifests in `install/`, rendered with options,
//! and the injector's own patch function run offline.
//!
//! `install` renders exactly the committed files (embedded at build time), changed only where
//! an option says so (cluster name, trust domain, images), and adds what must be made per
//! installation: the mesh root (Secret `weft-ca`, or the one in `--ca-dir`), its certificate
//! for the injector (ConfigMap `weft-root`), and the webhook's serving certificate (Secret
//! `weft-injector-tls`, its CA in the MutatingWebhookConfiguration's `caBundle`). With
//! `--dry-run` it prints them; otherwise it applies them with server-side apply (field manager
//! `weftctl`), which is also how the webhook certificate is rotated: run it again.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The committed manifests, in apply order.
pub const MANIFESTS: [(&str, &str); 5] = [
    (
        "00-namespace.yaml",
        include_str!("../../install/00-namespace.yaml"),
    ),
    ("01-crds.yaml", include_str!("../../install/01-crds.yaml")),
    ("02-rbac.yaml", include_str!("../../install/02-rbac.yaml")),
    (
        "03-control-plane.yaml",
        include_str!("../../install/03-control-plane.yaml"),
    ),
    (
        "04-injector.yaml",
        include_str!("../../install/04-injector.yaml"),
    ),
];

/// `weftctl install` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    /// Print the manifests instead of applying them.
    #[arg(long)]
    pub dry_run: bool,
    /// This cluster's name (the origin of its endpoints; unique among federated clusters).
    #[arg(long, default_value = "cluster-1")]
    pub cluster_name: String,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Image registry and repository prefix of Weft's images.
    #[arg(long, default_value = "ghcr.io/weft-mesh")]
    pub registry: String,
    /// Image tag.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    pub tag: String,
    /// Use the mesh root in this directory (`root.pem`, `root.key.pem`; share it between
    /// clusters that federate) instead of making a new one.
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
}

/// Parses a multi-document YAML text into JSON values (empty documents skipped).
pub fn documents(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(yaml).map_err(|e| anyhow::anyhow!("not YAML: {e}"))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

fn set_arg(args: &mut Value, flag: &str, value: &str) {
    if let Some(list) = args.as_array_mut() {
        for a in list.iter_mut() {
            if a.as_str()
                .is_some_and(|s| s.starts_with(&format!("{flag}=")))
            {
                *a = json!(format!("{flag}={value}"));
            }
        }
    }
}

/// Rewrites an image `…/weft-<name>:<tag>` to the chosen registry and tag.
fn image(registry: &str, tag: &str, current: &str) -> String {
    let name = current
        .rsplit('/')
        .next()
        .and_then(|n| n.split(':').next())
        .unwrap_or(current);
    format!("{registry}/{name}:{tag}")
}

/// The mesh root: from `--ca-dir`, or new.
fn root(args: &InstallArgs) -> anyhow::Result<(String, String)> {
    if let Some(dir) = &args.ca_dir {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .map_err(|e| anyhow::anyhow!("--ca-dir {}: {f}: {e}", dir.display()))
        };
        return Ok((read("root.pem")?, read("root.key.pem")?));
    }
    let tmp = tempfile::tempdir()?;
    weft_control_plane::identity::Ca::load_or_generate(
        Some(tmp.path()),
        &args.trust_domain,
        &args.cluster_name,
    )?;
    let read = |f: &str| std::fs::read_to_string(tmp.path().join(f));
    Ok((read("root.pem")?, read("root.key.pem")?))
}

/// A one-year serving certificate for the webhook's Service, signed by a CA made for it:
/// (CA PEM, certificate PEM, key PEM).
fn webhook_certificate() -> anyhow::Result<(String, String, String)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "weft-injector CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    ca.not_before = now - time::Duration::minutes(5);
    ca.not_after = now + time::Duration::days(366);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let mut leaf = rcgen::CertificateParams::new(vec![
        "weft-injector.weft-system.svc".to_string(),
        "weft-injector.weft-system.svc.cluster.local".to_string(),
    ])?;
    leaf.not_before = now - time::Duration::minutes(5);
    leaf.not_after = now + time::Duration::days(365);
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok((ca_cert.pem(), cert.pem(), key.serialize_pem()))
}

/// Every object to install, rendered with `args`.
pub fn render(args: &InstallArgs) -> anyhow::Result<Vec<Value>> {
    weft_proto::spiffe::validate_dns_subdomain("cluster name", &args.cluster_name)
        .map_err(|e| anyhow::anyhow!("--cluster-name: {e}"))?;
    let (root_pem, root_key) = root(args)?;
    let (webhook_ca, webhook_cert, webhook_key) = webhook_certificate()?;
    let mut out = Vec::new();
    for (file, text) in MANIFESTS {
        for mut doc in documents(text).map_err(|e| anyhow::anyhow!("install/{file}: {e}"))? {
            if doc["kind"] == "Deployment" {
                let containers = doc
                    .pointer_mut("/spec/template/spec/containers")
                    .and_then(Value::as_array_mut);
                for c in containers.into_iter().flatten() {
                    if let Some(img) = c["image"].as_str() {
                        c["image"] = json!(image(&args.registry, &args.tag, img));
                    }
                    let args_v = &mut c["args"];
                    set_arg(args_v, "--cluster-name", &args.cluster_name);
                    set_arg(args_v, "--trust-domain", &args.trust_domain);
                    let sidecar = format!("{}/weft-sidecar:{}", args.registry, args.tag);
                    set_arg(args_v, "--image", &sidecar);
                }
            }
            if doc["kind"] == "MutatingWebhookConfiguration" {
                use base64::Engine;
                let bundle = base64::engine::general_purpose::STANDARD.encode(&webhook_ca);
                for w in doc["webhooks"].as_array_mut().into_iter().flatten() {
                    w["clientConfig"]["caBundle"] = json!(bundle);
                }
            }
            out.push(doc);
        }
    }
    let meta = |name: &str| json!({"name": name, "namespace": "weft-system", "labels": {"app.kubernetes.io/part-of": "weft"}});
    out.push(
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta("weft-ca"),
        "type": "Opaque", "stringData": {"root.pem": root_pem, "root.key.pem": root_key}}),
    );
    out.push(
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("weft-root"),
        "data": {"root.pem": root_pem}}),
    );
    out.push(json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta("weft-injector-tls"),
        "type": "kubernetes.io/tls", "stringData": {"tls.crt": webhook_cert, "tls.key": webhook_key}}));
    Ok(out)
}

/// Multi-document YAML of `docs`.
pub fn to_yaml(docs: &[Value]) -> anyhow::Result<String> {
    let mut s = String::new();
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            s.push_str("---\n");
        }
        s.push_str(&serde_saphyr::to_string(d)?);
    }
    Ok(s)
}

/// `weftctl install`.
pub async fn install(args: InstallArgs) -> anyhow::Result<i32> {
    let docs = render(&args)?;
    if args.dry_run {
        print!("{}", to_yaml(&docs)?);
        return Ok(0);
    }
    let client = kube::Client::try_default().await.map_err(|e| {
        anyhow::anyhow!(
            "no Kubernetes API to install into ({e}); use --dry-run to print the manifests"
        )
    })?;
    for d in docs {
        let obj: kube::core::DynamicObject = serde_json::from_value(d)?;
        let types = obj
            .types
            .clone()
            .ok_or_else(|| anyhow::anyhow!("an object without apiVersion/kind"))?;
        let gvk = kube::core::GroupVersionKind::try_from(&types)?;
        let (resource, caps) = kube::discovery::pinned_kind(&client, &gvk)
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}", types.kind))?;
        let name = obj.metadata.name.clone().unwrap_or_default();
        let api: kube::Api<kube::core::DynamicObject> =
            match (caps.scope, obj.metadata.namespace.as_deref()) {
                (kube::discovery::Scope::Namespaced, Some(ns)) => {
                    kube::Api::namespaced_with(client.clone(), ns, &resource)
                }
                _ => kube::Api::all_with(client.clone(), &resource),
            };
        api.patch(
            &name,
            &kube::api::PatchParams::apply("weftctl").force(),
            &kube::api::Patch::Apply(&obj),
        )
        .await
        .map_err(|e| anyhow::anyhow!("{} {name}: {e}", types.kind))?;
        println!("applied {} {name}", types.kind);
    }
    Ok(0)
}

/// `weftctl inject` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// The YAML to inject (`-` for stdin): Pods, or workloads with a pod template
    /// (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob); other objects pass
    /// through unchanged.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// The mesh root the proxies trust (PEM), e.g. from `kubectl -n weft-system get
    /// configmap weft-root`.
    #[arg(long)]
    pub root_cert: PathBuf,
    /// The sidecar image.
    #[arg(long, default_value = concat!("ghcr.io/weft-mesh/weft-sidecar:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// The control plane address the proxies dial.
    #[arg(long, default_value = "weft-control-plane.weft-system.svc:15012")]
    pub xds_addr: String,
    /// This cluster's name.
    #[arg(long, default_value = "cluster-1")]
    pub cluster_name: String,
}

/// Where a kind keeps its pod template.
fn template_path(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// Injects every pod (template) in `yaml`; returns the YAML to print.
pub fn inject_yaml(yaml: &str, cfg: &weft_injector::patch::InjectConfig) -> anyhow::Result<String> {
    use weft_injector::patch::{Outcome, inject};
    let mut docs = documents(yaml)?;
    for (i, doc) in docs.iter_mut().enumerate() {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let Some(path) = template_path(&kind) else {
            continue;
        };
        let Some(target) = doc.pointer_mut(path) else {
            anyhow::bail!("document {i} ({kind} {name}): no pod template at {path}");
        };
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(target.clone())
            .map_err(|e| anyhow::anyhow!("document {i} ({kind} {name}): not a pod: {e}"))?;
        match inject(&pod, cfg).map_err(|e| anyhow::anyhow!("{kind} {name}: {e}"))? {
            Outcome::Injected(p) => {
                let mut v = serde_json::to_value(&*p)?;
                if kind != "Pod" {
                    // A template has no apiVersion/kind of its own.
                    if let Some(m) = v.as_object_mut() {
                        m.remove("apiVersion");
                        m.remove("kind");
                        m.remove("status");
                    }
                }
                *target = v;
            }
            Outcome::Skipped(why) => eprintln!("{kind} {name}: not injected: {why}"),
        }
    }
    to_yaml(&docs)
}

/// `weftctl inject -f FILE`.
pub fn inject(args: &InjectArgs) -> anyhow::Result<i32> {
    let read = |p: &Path| -> anyhow::Result<String> {
        if p == Path::new("-") {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
            Ok(s)
        } else {
            std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
        }
    };
    let root = read(&args.root_cert)?;
    let cfg = weft_injector::patch::InjectConfig::new(
        &args.image,
        &args.xds_addr,
        &args.cluster_name,
        &root,
    );
    print!("{}", inject_yaml(&read(&args.file)?, &cfg)?);
    Ok(0)
}
