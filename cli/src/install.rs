//! `weftctl install` and `weftctl inject`: the manifests in `install/`, rendered with options,
//! and the injector's own patch function run offline.
//!
//! `install` renders exactly the committed files (embedded at build time), changed only where
//! an option says so (cluster name, trust domain, images), and adds what must be made per
//! installation: this cluster's CA (Secret `weft-ca`: the root certificate, an intermediate
//! for this cluster and its key, the join-token key — never the root key, which stays where
//! `--ca-dir` is, or where a fresh root is written, `--root-out-dir`), the roots for the
//! injector (ConfigMap `weft-root`), the webhook's serving certificate (Secret
//! `weft-injector-tls`, its CA in the MutatingWebhookConfiguration's `caBundle`), and operator
//! credentials for `weftctl` (`--credentials-out`). With
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
    /// clusters that federate; keep it offline) instead of making a new one: the install makes
    /// this cluster's intermediate from it, and only that goes into the cluster. A cluster
    /// that already has a different root refuses it unless `--rotate-root` is given.
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
    /// Where a new root is written (`weft-root-<fingerprint>/`, files 0600) when no
    /// `--ca-dir` is given: keep it offline, it makes other clusters' intermediates and the
    /// next rotation.
    #[arg(long, default_value = ".")]
    pub root_out_dir: PathBuf,
    /// Where operator credentials for `weftctl` are written (not with `--dry-run`; an
    /// existing file is kept).
    #[arg(long, default_value = "~/.config/weft/credentials.pem")]
    pub credentials_out: String,
    /// Rotate the mesh root, in two runs: the first adds a new root (or `--ca-dir`'s) to the
    /// trust bundle beside the current one, which keeps signing; run it again once workloads
    /// have renewed (half their certificate lifetime, 12 h by default) to sign with the new
    /// root, the old one staying trusted. Without it an existing root is always kept.
    #[arg(long)]
    pub rotate_root: bool,
}

/// File names in the `weft-ca` Secret (what the control plane reads with `--ca-dir`).
pub mod ca_keys {
    /// The root the signing intermediate chains to.
    pub const ROOT: &str = "root.pem";
    /// This cluster's intermediate (path length 0), which signs workloads.
    pub const INTERMEDIATE: &str = "intermediate.pem";
    /// Its key.
    pub const INTERMEDIATE_KEY: &str = "intermediate.key.pem";
    /// The join-token key (shared by the replicas: a token minted by one verifies on all).
    pub const TOKEN_KEY: &str = "token.key";
    /// More roots every workload trusts (a rotation's other root).
    pub const BUNDLE: &str = weft_control_plane::identity::TRUST_BUNDLE_FILE;
    /// During a rotation: the root that will sign after the second `--rotate-root`.
    pub const NEXT_ROOT: &str = "next-root.pem";
    /// Its intermediate for this cluster.
    pub const NEXT_INTERMEDIATE: &str = "next-intermediate.pem";
    /// That intermediate's key.
    pub const NEXT_INTERMEDIATE_KEY: &str = "next-intermediate.key.pem";
    /// The old layout's root key: a Secret holding it is refused (the key belongs offline).
    pub const OLD_ROOT_KEY: &str = "root.key.pem";
}

/// What one root gives an install: its certificate and this cluster's intermediate under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Material {
    /// The root certificate.
    pub root: String,
    /// This cluster's intermediate certificate.
    pub intermediate: String,
    /// Its key.
    pub intermediate_key: String,
}

/// The mesh root an install applies: the `weft-ca` Secret's files, the trust bundle for the
/// `weft-root` ConfigMap (every root workloads trust), and what changed, for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootPlan {
    /// The Secret's files.
    pub secret: std::collections::BTreeMap<String, String>,
    /// Every trusted root, the signing one first (PEM).
    pub bundle: String,
    /// One line for the operator.
    pub summary: String,
}

fn fingerprint(pem: &str) -> String {
    weft_proto::tls::fingerprints(pem)
        .into_iter()
        .next()
        .map_or_else(|| "<unreadable>".into(), |f| f[..16].to_string())
}

/// Decides the CA: `existing` is the cluster's `weft-ca` Secret (decoded), `given` the root
/// from `--ca-dir` (with this cluster's intermediate made from it), `fresh` makes a new one.
/// An existing CA is kept unless `rotate`; a different `given` root without `rotate` is an
/// error, never a silent swap. No root key ever enters the Secret.
pub fn plan_roots(
    existing: Option<&std::collections::BTreeMap<String, String>>,
    given: Option<Material>,
    rotate: bool,
    fresh: impl FnOnce() -> anyhow::Result<Material>,
) -> anyhow::Result<RootPlan> {
    use ca_keys::*;
    if let Some(g) = &given
        && weft_proto::tls::fingerprints(&g.root).is_empty()
    {
        anyhow::bail!("--ca-dir: {ROOT} holds no readable certificate");
    }
    let bundle_of = |secret: &std::collections::BTreeMap<String, String>| {
        let mut out: Vec<String> = Vec::new();
        for key in [ROOT, BUNDLE, NEXT_ROOT] {
            for b in weft_proto::tls::certificate_pems(secret.get(key).map_or("", String::as_str)) {
                if !out.iter().any(|o| o.trim() == b.trim()) {
                    out.push(b);
                }
            }
        }
        out.concat()
    };
    let Some(existing) = existing else {
        if rotate {
            anyhow::bail!(
                "--rotate-root: this cluster has no mesh root yet (no Secret weft-system/weft-ca); install without it first"
            );
        }
        let m = match given {
            Some(g) => g,
            None => fresh()?,
        };
        let secret = [
            (ROOT.to_string(), m.root.clone()),
            (INTERMEDIATE.to_string(), m.intermediate),
            (INTERMEDIATE_KEY.to_string(), m.intermediate_key),
            (TOKEN_KEY.to_string(), token_key()),
        ]
        .into();
        return Ok(RootPlan {
            bundle: bundle_of(&secret),
            summary: format!("mesh root {} (new)", fingerprint(&m.root)),
            secret,
        });
    };
    if existing.contains_key(OLD_ROOT_KEY) {
        anyhow::bail!(
            "Secret weft-system/weft-ca holds the mesh root's key ({OLD_ROOT_KEY}, the old layout): copy root.pem and {OLD_ROOT_KEY} from it to a directory you keep offline, delete the Secret, and install again with --ca-dir DIR"
        );
    }
    let current = existing
        .get(ROOT)
        .filter(|r| !r.trim().is_empty())
        .ok_or_else(|| anyhow::anyhow!("Secret weft-system/weft-ca has no {ROOT}: repair it or delete it to make a new root"))?;
    for k in [INTERMEDIATE, INTERMEDIATE_KEY] {
        if !existing.contains_key(k) {
            anyhow::bail!(
                "Secret weft-system/weft-ca has no {k}: repair it or delete it to make a new root"
            );
        }
    }
    let mut secret = existing.clone();
    secret
        .entry(TOKEN_KEY.to_string())
        .or_insert_with(token_key);
    let same = |a: &str, b: &str| fingerprint(a) == fingerprint(b);
    if !rotate {
        if let Some(g) = &given
            && !same(&g.root, current)
        {
            anyhow::bail!(
                "--ca-dir holds root {} but this cluster's mesh root is {}: replacing it would cut off every workload; keep the existing root (drop --ca-dir) or rotate to it with --rotate-root",
                fingerprint(&g.root),
                fingerprint(current)
            );
        }
        let summary = match existing.get(NEXT_ROOT) {
            Some(next) => format!(
                "mesh root {} kept; rotation to {} pending (run with --rotate-root to finish)",
                fingerprint(current),
                fingerprint(next)
            ),
            None => format!("mesh root {} kept", fingerprint(current)),
        };
        return Ok(RootPlan {
            bundle: bundle_of(&secret),
            secret,
            summary,
        });
    }
    let next = (
        existing.get(NEXT_ROOT),
        existing.get(NEXT_INTERMEDIATE),
        existing.get(NEXT_INTERMEDIATE_KEY),
    );
    match next {
        // Second run: the new root's intermediate signs; the old root stays trusted.
        (Some(next), Some(next_int), Some(next_key)) => {
            if let Some(g) = &given
                && !same(&g.root, next)
            {
                anyhow::bail!(
                    "--ca-dir holds root {} but the rotation in progress is to {}: finish it without --ca-dir first",
                    fingerprint(&g.root),
                    fingerprint(next)
                );
            }
            let mut trusted: Vec<String> = weft_proto::tls::certificate_pems(current);
            trusted.extend(weft_proto::tls::certificate_pems(
                existing.get(BUNDLE).map_or("", String::as_str),
            ));
            // One copy of each root (by fingerprint, wherever it stood), never the new one.
            let mut seen = vec![fingerprint(next)];
            trusted.retain(|b| {
                let f = fingerprint(b);
                let new = !seen.contains(&f);
                seen.push(f);
                new
            });
            secret.insert(ROOT.into(), next.clone());
            secret.insert(INTERMEDIATE.into(), next_int.clone());
            secret.insert(INTERMEDIATE_KEY.into(), next_key.clone());
            secret.insert(BUNDLE.into(), trusted.concat());
            for k in [NEXT_ROOT, NEXT_INTERMEDIATE, NEXT_INTERMEDIATE_KEY] {
                secret.remove(k);
            }
            Ok(RootPlan {
                bundle: bundle_of(&secret),
                summary: format!(
                    "root rotation step 2 of 2: mesh root {} now signs (the control planes restart); {} stays trusted until you remove it from {BUNDLE}",
                    fingerprint(next),
                    fingerprint(current)
                ),
                secret,
            })
        }
        (None, None, None) => {
            let m = match given {
                Some(g) => g,
                None => fresh()?,
            };
            if same(&m.root, current) {
                anyhow::bail!(
                    "--rotate-root: --ca-dir holds the root this cluster already signs with ({})",
                    fingerprint(current)
                );
            }
            let mut trusted =
                weft_proto::tls::certificate_pems(existing.get(BUNDLE).map_or("", String::as_str));
            trusted.extend(weft_proto::tls::certificate_pems(&m.root));
            secret.insert(BUNDLE.into(), trusted.concat());
            secret.insert(NEXT_ROOT.into(), m.root.clone());
            secret.insert(NEXT_INTERMEDIATE.into(), m.intermediate);
            secret.insert(NEXT_INTERMEDIATE_KEY.into(), m.intermediate_key);
            Ok(RootPlan {
                bundle: bundle_of(&secret),
                summary: format!(
                    "root rotation step 1 of 2: new root {} is trusted beside {}, which still signs; once workloads have renewed their certificates (half their lifetime, 12 h by default) run `weftctl install --rotate-root` again",
                    fingerprint(&m.root),
                    fingerprint(current)
                ),
                secret,
            })
        }
        _ => anyhow::bail!(
            "Secret weft-system/weft-ca has only some of {NEXT_ROOT}, {NEXT_INTERMEDIATE} and {NEXT_INTERMEDIATE_KEY}: repair it"
        ),
    }
}

/// A new join-token key (32 random bytes, hex), as the control plane reads `token.key`.
fn token_key() -> String {
    weft_control_plane::identity::token::random_bytes::<32>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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

/// This cluster's intermediate under the root in `root_dir` (`root.pem`, `root.key.pem`).
fn material_from(root_dir: &Path, cluster: &str) -> anyhow::Result<Material> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("ca");
    weft_control_plane::identity::Ca::make_intermediate(root_dir, cluster, &out)
        .map_err(|e| anyhow::anyhow!("--ca-dir {}: {e}", root_dir.display()))?;
    let read = |f: &str| std::fs::read_to_string(out.join(f));
    Ok(Material {
        root: read(ca_keys::ROOT)?,
        intermediate: read(ca_keys::INTERMEDIATE)?,
        intermediate_key: read(ca_keys::INTERMEDIATE_KEY)?,
    })
}

/// The root in `--ca-dir` and this cluster's intermediate from it, if given.
fn given_root(args: &InstallArgs) -> anyhow::Result<Option<Material>> {
    args.ca_dir
        .as_deref()
        .map(|dir| material_from(dir, &args.cluster_name))
        .transpose()
}

/// A new mesh root, written to `<root-out-dir>/weft-root-<fingerprint>/` (kept offline by
/// the operator; nowhere with `keep` false, for a dry run), and this cluster's intermediate.
fn fresh_root(args: &InstallArgs, keep: bool) -> anyhow::Result<Material> {
    let tmp = tempfile::tempdir()?;
    let made = weft_control_plane::identity::Ca::load_or_generate(
        Some(tmp.path()),
        &args.trust_domain,
        "root",
    )?;
    let m = material_from(tmp.path(), &args.cluster_name)?;
    if keep {
        let dir = args
            .root_out_dir
            .join(format!("weft-root-{}", fingerprint(made.root_pem())));
        std::fs::create_dir_all(&dir)?;
        for f in [ca_keys::ROOT, ca_keys::OLD_ROOT_KEY] {
            let to = dir.join(f);
            std::fs::copy(tmp.path().join(f), &to)
                .map_err(|e| anyhow::anyhow!("writing the new root to {}: {e}", to.display()))?;
            #[cfg(unix)]
            std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        }
        eprintln!(
            "new mesh root written to {} (root.pem, root.key.pem): keep it offline; it makes other clusters' intermediates (--ca-dir) and the next rotation. Only this cluster's intermediate goes into the cluster.",
            dir.display()
        );
    }
    Ok(m)
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
pub fn render(args: &InstallArgs, roots: &RootPlan) -> anyhow::Result<Vec<Value>> {
    use base64::Engine;
    validate(args)?;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let (webhook_ca, webhook_cert, webhook_key) = webhook_certificate()?;
    let mut out = Vec::new();
    for (file, text) in MANIFESTS {
        for mut doc in documents(text).map_err(|e| anyhow::anyhow!("install/{file}: {e}"))? {
            if doc["kind"] == "Deployment" {
                if doc["metadata"]["name"] == "weft-control-plane" {
                    // A new signing intermediate rolls the replicas (they load it at start);
                    // a new trust bundle alone does not (they re-read it).
                    let signer = roots.secret.get(ca_keys::ROOT).map_or("", String::as_str);
                    doc["spec"]["template"]["metadata"]["annotations"]
                        [weft_proto::keys::CA_ROOT_FINGERPRINT_ANNOTATION] =
                        json!(fingerprint(signer));
                }
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
                let bundle = b64(&webhook_ca);
                for w in doc["webhooks"].as_array_mut().into_iter().flatten() {
                    w["clientConfig"]["caBundle"] = json!(bundle);
                }
            }
            out.push(doc);
        }
    }
    let meta = |name: &str| json!({"name": name, "namespace": "weft-system", "labels": {"app.kubernetes.io/part-of": "weft"}});
    // `data`, not `stringData`: a key this apply leaves out (a finished rotation's
    // next-root) is then removed by server-side apply, as its field manager owned it.
    let ca_data: serde_json::Map<String, Value> = roots
        .secret
        .iter()
        .map(|(k, v)| (k.clone(), json!(b64(v))))
        .collect();
    out.push(
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta("weft-ca"),
        "type": "Opaque", "data": ca_data}),
    );
    out.push(
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("weft-root"),
        "data": {"root.pem": roots.bundle}}),
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

/// The cluster's `weft-ca` Secret, decoded; `None` when there is none.
async fn existing_root(
    client: &kube::Client,
) -> anyhow::Result<Option<std::collections::BTreeMap<String, String>>> {
    let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client.clone(), "weft-system");
    let secret = api
        .get_opt("weft-ca")
        .await
        .map_err(|e| anyhow::anyhow!("reading Secret weft-system/weft-ca: {e}"))?;
    let Some(secret) = secret else {
        return Ok(None);
    };
    let mut out = std::collections::BTreeMap::new();
    for (k, v) in secret.data.unwrap_or_default() {
        let text = String::from_utf8(v.0)
            .map_err(|_| anyhow::anyhow!("Secret weft-system/weft-ca: {k} is not PEM text"))?;
        out.insert(k, text);
    }
    Ok(Some(out))
}

/// Options that cannot make a valid install, refused before anything is made or read.
fn validate(args: &InstallArgs) -> anyhow::Result<()> {
    weft_proto::spiffe::validate_dns_subdomain("cluster name", &args.cluster_name)
        .map_err(|e| anyhow::anyhow!("--cluster-name: {e}"))
}

/// `weftctl install`.
pub async fn install(args: InstallArgs) -> anyhow::Result<i32> {
    validate(&args)?;
    let given = given_root(&args)?;
    if args.dry_run {
        // No cluster is read: what a first install would apply.
        let plan = plan_roots(None, given, false, || fresh_root(&args, false))?;
        print!("{}", to_yaml(&render(&args, &plan)?)?);
        eprintln!("{} (dry run: as a first install)", plan.summary);
        return Ok(0);
    }
    let client = kube::Client::try_default().await.map_err(|e| {
        anyhow::anyhow!(
            "no Kubernetes API to install into ({e}); use --dry-run to print the manifests"
        )
    })?;
    let existing = existing_root(&client).await?;
    let plan = plan_roots(existing.as_ref(), given, args.rotate_root, || {
        fresh_root(&args, true)
    })?;
    let docs = render(&args, &plan)?;
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
    println!("{}", plan.summary);
    operator_credentials(&args, &plan)?;
    Ok(0)
}

/// Writes operator credentials for `weftctl` from the installed intermediate, unless the
/// file exists.
fn operator_credentials(args: &InstallArgs, plan: &RootPlan) -> anyhow::Result<()> {
    let path = match args.credentials_out.strip_prefix("~/") {
        Some(rest) => std::env::var_os("HOME")
            .map(|h| Path::new(&h).join(rest))
            .ok_or_else(|| {
                anyhow::anyhow!("--credentials-out {}: no HOME", args.credentials_out)
            })?,
        None => PathBuf::from(&args.credentials_out),
    };
    if path.exists() {
        println!("operator credentials: {} kept", path.display());
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    for f in [
        ca_keys::ROOT,
        ca_keys::INTERMEDIATE,
        ca_keys::INTERMEDIATE_KEY,
    ] {
        std::fs::write(
            tmp.path().join(f),
            plan.secret.get(f).map_or("", String::as_str),
        )?;
    }
    let ca = weft_control_plane::identity::Ca::load_or_generate(
        Some(tmp.path()),
        &args.trust_domain,
        &args.cluster_name,
    )?;
    let mut creds = ca.issue_operator(
        &args.trust_domain,
        "admin",
        std::time::Duration::from_secs(30 * 24 * 3600),
    )?;
    creds.roots = weft_proto::tls::certificate_pems(&plan.bundle);
    creds.write(&path)?;
    println!(
        "operator credentials for weftctl written to {} (operator admin, 30 days; more with `weft-control-plane operator issue`)",
        path.display()
    );
    Ok(())
}

/// `weftctl inject` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// The YAML to inject (`-` for stdin): Pods, or workloads with a pod template
    /// (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob); other objects pass
    /// through unchanged.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// The mesh roots the proxies trust (PEM). Without it, the cluster's ConfigMap
    /// `weft-system/weft-root` (what `weftctl install` wrote) is read through the current
    /// kubeconfig, and when the cluster cannot be read, the control plane at `--cp` is asked
    /// (with the operator credentials, whose roots authenticate it); this flag only overrides
    /// both (offline, or another cluster's bundle).
    #[arg(long)]
    pub root_cert: Option<PathBuf>,
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

/// How long `inject` waits for the cluster's `weft-root` ConfigMap.
const ROOT_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The bundle in the cluster's ConfigMap `weft-system/weft-root`, read through the current
/// kubeconfig.
async fn cluster_roots() -> anyhow::Result<String> {
    let how = "pass --root-cert FILE (e.g. `kubectl -n weft-system get configmap weft-root -o jsonpath='{.data.root\\.pem}'`)";
    let read = async {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| anyhow::anyhow!("no Kubernetes API ({e})"))?;
        let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
            kube::Api::namespaced(client, "weft-system");
        let cm = api
            .get("weft-root")
            .await
            .map_err(|e| anyhow::anyhow!("ConfigMap weft-system/weft-root: {e}"))?;
        cm.data
            .and_then(|d| d.get("root.pem").cloned())
            .filter(|pem| pem.contains("BEGIN CERTIFICATE"))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "ConfigMap weft-system/weft-root has no certificate in data[\"root.pem\"]"
                )
            })
    };
    match tokio::time::timeout(ROOT_LOOKUP_TIMEOUT, read).await {
        Ok(Ok(pem)) => Ok(pem),
        Ok(Err(e)) => anyhow::bail!(
            "no --root-cert, and the cluster's mesh root could not be read: {e}; {how}"
        ),
        Err(_) => anyhow::bail!(
            "no --root-cert, and the cluster did not answer within {ROOT_LOOKUP_TIMEOUT:?}; {how}"
        ),
    }
}

/// The roots to inject without `--root-cert`: the cluster's ConfigMap, else the control
/// plane's answer; both failures are reported when neither answers.
async fn mesh_roots(cp: &crate::query::Cp) -> anyhow::Result<String> {
    let cluster = match cluster_roots().await {
        Ok(pem) => return Ok(pem),
        Err(e) => e,
    };
    match crate::query::trust_bundle(cp).await {
        Ok(pem) => {
            eprintln!("weftctl inject: {cluster:#}; using the roots of the control plane at {cp}");
            Ok(pem)
        }
        Err(e) => {
            anyhow::bail!("{cluster:#}\n  and the control plane could not be asked either: {e:#}")
        }
    }
}

/// `weftctl inject -f FILE`.
pub async fn inject(args: &InjectArgs, cp: &crate::query::Cp) -> anyhow::Result<i32> {
    let read = |p: &Path| -> anyhow::Result<String> {
        if p == Path::new("-") {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
            Ok(s)
        } else {
            std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
        }
    };
    let root = match &args.root_cert {
        Some(path) => read(path)?,
        None => mesh_roots(cp).await?,
    };
    let cfg = weft_injector::patch::InjectConfig::new(
        &args.image,
        &args.xds_addr,
        &args.cluster_name,
        &root,
    );
    print!("{}", inject_yaml(&read(&args.file)?, &cfg)?);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(name: &str) -> Material {
        let tmp = tempfile::tempdir().expect("tempdir");
        weft_control_plane::identity::Ca::load_or_generate(Some(tmp.path()), "cluster.local", name)
            .expect("CA");
        material_from(tmp.path(), "c1").expect("intermediate")
    }

    #[test]
    fn the_root_key_never_enters_the_cluster() {
        let (a, b) = (root("a"), root("b"));
        let first = plan_roots(None, None, false, || Ok(a.clone())).expect("first");
        let step1 = plan_roots(Some(&first.secret), None, true, || Ok(b.clone())).expect("1");
        let step2 = plan_roots(Some(&step1.secret), None, true, || Ok(root("c"))).expect("2");
        for plan in [&first, &step1, &step2] {
            for (k, v) in &plan.secret {
                assert!(
                    !v.contains("PRIVATE KEY") || k.ends_with("intermediate.key.pem"),
                    "{k} holds a key"
                );
            }
            assert!(plan.secret.contains_key(ca_keys::TOKEN_KEY));
        }
        assert_eq!(
            step1.secret[ca_keys::TOKEN_KEY],
            first.secret[ca_keys::TOKEN_KEY]
        );
        // The intermediate is constrained to sign leaves only.
        use rustls_pki::pem::PemObject;
        let der = rustls_pki::CertificateDer::from_pem_slice(
            first.secret[ca_keys::INTERMEDIATE].as_bytes(),
        )
        .expect("pem");
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("x509");
        let bc = cert
            .basic_constraints()
            .expect("ext")
            .expect("basic constraints")
            .value;
        assert!(bc.ca && bc.path_len_constraint == Some(0), "{bc:?}");
        // A Secret of the old layout, with the root key in it, is refused with the way out.
        let mut old = first.secret.clone();
        old.insert(ca_keys::OLD_ROOT_KEY.into(), "key".into());
        let err = plan_roots(Some(&old), None, false, || Ok(b.clone())).expect_err("old layout");
        assert!(err.to_string().contains("offline"), "{err}");
    }

    #[test]
    fn an_existing_root_is_kept_and_never_silently_replaced() {
        let a = root("a");
        let b = root("b");
        let first = plan_roots(None, None, false, || Ok(a.clone())).expect("first");
        assert_eq!(first.secret[ca_keys::ROOT], a.root);
        // Again, with nothing given: the same files, whatever `fresh` would make.
        let again = plan_roots(Some(&first.secret), None, false, || Ok(b.clone())).expect("again");
        assert_eq!(again.secret, first.secret);
        assert_eq!(again.bundle, first.bundle);
        // The same root given: fine. Another root given: refused, naming both.
        plan_roots(
            Some(&first.secret),
            Some(a.clone()),
            false,
            || Ok(b.clone()),
        )
        .expect("same");
        let err = plan_roots(
            Some(&first.secret),
            Some(b.clone()),
            false,
            || Ok(b.clone()),
        )
        .expect_err("a different root");
        let msg = err.to_string();
        assert!(
            msg.contains("--rotate-root") && msg.contains(&fingerprint(&b.root)),
            "{msg}"
        );
        // A broken Secret is named, not overwritten.
        let mut broken = first.secret.clone();
        broken.remove(ca_keys::INTERMEDIATE_KEY);
        let err = plan_roots(Some(&broken), None, false, || Ok(b.clone())).expect_err("broken");
        assert!(err.to_string().contains("intermediate.key.pem"), "{err}");
        // Nothing to rotate on a first install.
        assert!(plan_roots(None, None, true, || Ok(b.clone())).is_err());
        // A --ca-dir root that is not a certificate is refused, not compared as "unreadable".
        let err = plan_roots(
            Some(&first.secret),
            Some(Material {
                root: "garbage".into(),
                ..a.clone()
            }),
            false,
            || Ok(b.clone()),
        )
        .expect_err("garbage root");
        assert!(err.to_string().contains("no readable certificate"), "{err}");
    }

    #[test]
    fn rotation_trusts_both_roots_before_the_new_one_signs() {
        let (a, b) = (root("a"), root("b"));
        let first = plan_roots(None, None, false, || Ok(a.clone())).expect("first");
        let step1 = plan_roots(Some(&first.secret), None, true, || Ok(b.clone())).expect("1");
        assert_eq!(
            step1.secret[ca_keys::ROOT],
            a.root,
            "the old root still signs"
        );
        assert_eq!(weft_proto::tls::fingerprints(&step1.bundle).len(), 2);
        // A plain re-install mid-rotation keeps the rotation as it is.
        let mid = plan_roots(Some(&step1.secret), None, false, || Ok(root("c"))).expect("mid");
        assert_eq!(mid.secret, step1.secret);
        let step2 = plan_roots(Some(&step1.secret), None, true, || Ok(root("c"))).expect("2");
        assert_eq!(step2.secret[ca_keys::ROOT], b.root, "the new root signs");
        assert_eq!(
            step2.secret[ca_keys::BUNDLE].trim(),
            a.root.trim(),
            "the old stays trusted"
        );
        assert!(!step2.secret.contains_key(ca_keys::NEXT_ROOT));
        // The old root listed twice, apart, in the bundle: it stays trusted once.
        let mut doubled = step1.secret.clone();
        let bundle = format!("{}{}{}", a.root, b.root, a.root);
        doubled.insert(ca_keys::BUNDLE.into(), bundle);
        let step2b = plan_roots(Some(&doubled), None, true, || Ok(root("c"))).expect("2b");
        assert_eq!(
            weft_proto::tls::fingerprints(&step2b.secret[ca_keys::BUNDLE]).len(),
            1,
            "{}",
            step2b.secret[ca_keys::BUNDLE]
        );
        let fps = weft_proto::tls::fingerprints(&step2.bundle);
        assert_eq!(fps.len(), 2);
        assert_eq!(
            fps[0],
            weft_proto::tls::fingerprints(&b.root)[0],
            "signing root first"
        );
    }
}
