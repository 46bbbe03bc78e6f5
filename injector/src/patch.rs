//! The injection itself, pure: a Pod in, the Pod with Weft's sidecar out (or why not). The
//! webhook turns the difference into a JSON Patch; `weftctl inject` prints the result.
//!
//! What a Pod gets:
//! - an init container `weft-init` running `weft-sidecar init` (NET_ADMIN, NET_RAW; root, no
//!   privilege escalation) with the excluded ports and CIDRs from the Pod's annotations, and
//!   the health port (15021) and the admin port (15000) always excluded from interception;
//! - the proxy `weft-proxy`: by default a native sidecar (an init container with
//!   `restartPolicy: Always`, so it starts before the app, is ready before the app starts —
//!   its startup probe — and ends with the Pod, which lets Jobs finish); with the annotation
//!   `weft.dev/sidecar-mode: classic`, the first regular container with a `postStart` hook
//!   that holds the app containers until the proxy is ready (`weft-sidecar wait-ready`);
//! - pod, namespace, service account and node through the downward API, a projected
//!   service-account token (audience `weft`) to prove its identity, the mesh root in an
//!   environment variable, resources, and probes on the proxy's health port;
//! - every network probe of the app containers (`httpGet` HTTP or HTTPS, `tcpSocket`, `grpc`)
//!   rewritten to an `httpGet` on the proxy's health port at
//!   `/app-health/<container>/<livez|readyz|startupz>`, the originals passed to the proxy as
//!   JSON (`WEFT_APP_PROBES`); the proxy runs exactly those against the app on localhost, so
//!   probes work in a STRICT namespace and no serving port is taken out of interception;
//! - the label `weft.dev/tls-mode: weft` (callers originate mTLS to it) and the annotation
//!   `weft.dev/injected`.
//!
//! A Pod that opts out (`weft.dev/inject: "false"`), is already injected, or uses the host's
//! network is left alone. Malformed annotations are refused naming the annotation.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction, HTTPGetAction,
    Lifecycle, LifecycleHandler, ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource,
    ResourceRequirements, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_proto::keys;

/// Name of the proxy container.
pub const PROXY_CONTAINER: &str = "weft-proxy";
/// Name of the init container that installs the interception rules.
pub const INIT_CONTAINER: &str = "weft-init";
pub use weft_proto::keys::{ADMIN_PORT, HEALTH_PORT, TOKEN_AUDIENCE};
/// The proxy's UID: its own traffic is never intercepted.
pub const PROXY_UID: i64 = 1337;
/// Annotation choosing the proxy's form: `native` (default) or `classic`.
pub const SIDECAR_MODE_ANNOTATION: &str = "weft.dev/sidecar-mode";
const TOKEN_VOLUME: &str = "weft-token";
const TOKEN_DIR: &str = "/var/run/secrets/weft";

/// What the injector puts into Pods.
#[derive(Clone, Debug)]
pub struct InjectConfig {
    /// The image holding `weft-sidecar`.
    pub image: String,
    /// The control plane's TLS gRPC address as the proxy dials it (`HOST:PORT`).
    pub xds_addr: String,
    /// This cluster's name.
    pub cluster: String,
    /// The mesh trust domain.
    pub trust_domain: String,
    /// The mesh root certificate (PEM), handed to the proxy in `WEFT_TRUST_BUNDLE_PEM`.
    pub root_pem: String,
    /// Resources of the proxy container.
    pub resources: ResourceRequirements,
}

impl InjectConfig {
    /// Sane defaults: 100m CPU and 64 Mi requested, 256 Mi limit.
    pub fn new(image: &str, xds_addr: &str, cluster: &str, root_pem: &str) -> Self {
        let q = |s: &str| Quantity(s.to_string());
        InjectConfig {
            image: image.into(),
            xds_addr: xds_addr.into(),
            cluster: cluster.into(),
            trust_domain: "cluster.local".into(),
            root_pem: root_pem.into(),
            resources: ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".to_string(), q("100m")),
                    ("memory".to_string(), q("64Mi")),
                ])),
                limits: Some(BTreeMap::from([("memory".to_string(), q("256Mi"))])),
                ..Default::default()
            },
        }
    }
}

/// Why a Pod is left as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// `weft.dev/inject: "false"`.
    OptedOut,
    /// It already has Weft's proxy.
    AlreadyInjected,
    /// `hostNetwork: true`: interception would capture the node's traffic.
    HostNetwork,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Skip::OptedOut => "the pod opts out (weft.dev/inject: \"false\")",
            Skip::AlreadyInjected => "the pod already has Weft's proxy",
            Skip::HostNetwork => "the pod uses the host's network; it is not injected",
        })
    }
}

/// The outcome of an injection.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The Pod with the sidecar.
    Injected(Box<Pod>),
    /// Nothing to do, and why.
    Skipped(Skip),
}

/// A Pod that cannot be injected as it is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InjectError {
    /// The offending field, e.g. `metadata.annotations["weft.dev/exclude-inbound-ports"]`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn annotation_err(key: &str, message: String) -> InjectError {
    InjectError {
        field: format!("metadata.annotations[{key:?}]"),
        message,
    }
}

/// Parses a comma-separated port list annotation.
fn ports(annotations: &BTreeMap<String, String>, key: &str) -> Result<Vec<u16>, InjectError> {
    let Some(v) = annotations.get(key) else {
        return Ok(Vec::new());
    };
    v.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(annotation_err(
                key,
                format!("{p:?} is not a port (1-65535); expected e.g. \"8081,9090\""),
            )),
        })
        .collect()
}

/// Parses a comma-separated CIDR list (IPv4 or IPv6) annotation.
fn cidrs(annotations: &BTreeMap<String, String>, key: &str) -> Result<Vec<String>, InjectError> {
    let Some(v) = annotations.get(key) else {
        return Ok(Vec::new());
    };
    v.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            let ok =
                c.split_once('/')
                    .is_some_and(|(ip, len)| match ip.parse::<std::net::IpAddr>() {
                        Ok(std::net::IpAddr::V4(_)) => len.parse::<u8>().is_ok_and(|l| l <= 32),
                        Ok(std::net::IpAddr::V6(_)) => len.parse::<u8>().is_ok_and(|l| l <= 128),
                        Err(_) => false,
                    });
            if ok {
                Ok(c.to_string())
            } else {
                Err(annotation_err(
                    key,
                    format!("{c:?} is not a CIDR; expected e.g. \"10.0.0.0/8\" or \"fd00::/8\""),
                ))
            }
        })
        .collect()
}

fn join<T: ToString>(v: &[T]) -> String {
    v.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn health_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(HEALTH_PORT)),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// Resolves a probe's port (a number, or the name of one of the container's ports).
fn probe_port(port: &IntOrString, c: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// Rewrites one network probe (`httpGet` HTTP or HTTPS, `tcpSocket`, `grpc`) into an
/// `httpGet` on the proxy's health port at the path assigned to it, and records the original
/// in `probes`. No probe takes a port out of interception: in a STRICT namespace plaintext
/// would otherwise reach the application there. `exec` probes are left as they are.
fn rewrite_probe(
    p: &mut Probe,
    c: &Container,
    kind: weft_proto::probes::ProbeKind,
    probes: &mut weft_proto::probes::AppProbes,
) {
    use weft_proto::probes::{AppProbe, ProbeHeader};
    let original = if let Some(h) = &p.http_get {
        let Some(port) = probe_port(&h.port, c) else {
            return;
        };
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        AppProbe::HttpGet {
            port,
            path: if path.starts_with('/') {
                path
            } else {
                format!("/{path}")
            },
            https: h
                .scheme
                .as_deref()
                .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS")),
            headers: h
                .http_headers
                .iter()
                .flatten()
                .map(|h| ProbeHeader {
                    name: h.name.clone(),
                    value: h.value.clone(),
                })
                .collect(),
        }
    } else if let Some(t) = &p.tcp_socket {
        let Some(port) = probe_port(&t.port, c) else {
            return;
        };
        AppProbe::TcpSocket { port }
    } else if let Some(g) = &p.grpc {
        let Ok(port) = u16::try_from(g.port) else {
            return;
        };
        AppProbe::Grpc {
            port,
            service: g.service.clone().unwrap_or_default(),
        }
    } else {
        return;
    };
    let path = weft_proto::probes::probe_path(&c.name, kind);
    probes.0.insert(path.clone(), original);
    p.tcp_socket = None;
    p.grpc = None;
    p.http_get = Some(HTTPGetAction {
        path: Some(path),
        port: IntOrString::Int(i32::from(HEALTH_PORT)),
        scheme: Some("HTTP".into()),
        ..Default::default()
    });
}

/// Injects Weft's sidecar into `pod`.
pub fn inject(pod: &Pod, cfg: &InjectConfig) -> Result<Outcome, InjectError> {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    if annotations
        .get(keys::INJECT_ANNOTATION)
        .is_some_and(|v| v.eq_ignore_ascii_case("false"))
    {
        return Ok(Outcome::Skipped(Skip::OptedOut));
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Err(InjectError {
            field: "spec".into(),
            message: "missing: a Pod needs a spec".into(),
        });
    };
    let has_proxy = |cs: &Option<Vec<Container>>| {
        cs.iter()
            .flatten()
            .any(|c| c.name == PROXY_CONTAINER || c.name == INIT_CONTAINER)
    };
    if annotations.contains_key(keys::INJECTED_ANNOTATION)
        || has_proxy(&spec.init_containers)
        || spec.containers.iter().any(|c| c.name == PROXY_CONTAINER)
    {
        return Ok(Outcome::Skipped(Skip::AlreadyInjected));
    }
    if spec.host_network == Some(true) {
        return Ok(Outcome::Skipped(Skip::HostNetwork));
    }
    let classic = match annotations.get(SIDECAR_MODE_ANNOTATION).map(String::as_str) {
        None | Some("native") => false,
        Some("classic") => true,
        Some(other) => {
            return Err(annotation_err(
                SIDECAR_MODE_ANNOTATION,
                format!("{other:?}: expected \"native\" or \"classic\""),
            ));
        }
    };
    let mut exclude_in = vec![ADMIN_PORT, HEALTH_PORT];
    exclude_in.extend(ports(&annotations, keys::EXCLUDE_INBOUND_PORTS)?);
    let exclude_out = ports(&annotations, keys::EXCLUDE_OUTBOUND_PORTS)?;
    let exclude_cidrs = cidrs(&annotations, keys::EXCLUDE_OUTBOUND_CIDRS)?;
    let dns_capture = match annotations.get(keys::DNS_CAPTURE).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(annotation_err(
                keys::DNS_CAPTURE,
                format!("{other:?}: expected \"true\" or \"false\""),
            ));
        }
    };

    let mut out = pod.clone();
    let spec = out.spec.get_or_insert_with(Default::default);
    // Every network probe of the app goes through the proxy's health port.
    let mut probes = weft_proto::probes::AppProbes::default();
    for c in spec.containers.iter_mut() {
        use weft_proto::probes::ProbeKind;
        let snapshot = c.clone();
        for (p, kind) in [
            (c.liveness_probe.as_mut(), ProbeKind::Liveness),
            (c.readiness_probe.as_mut(), ProbeKind::Readiness),
            (c.startup_probe.as_mut(), ProbeKind::Startup),
        ] {
            if let Some(p) = p {
                rewrite_probe(p, &snapshot, kind, &mut probes);
            }
        }
    }
    exclude_in.sort_unstable();
    exclude_in.dedup();

    let mut init_args = vec![
        "init".to_string(),
        "--proxy-uid".into(),
        PROXY_UID.to_string(),
        "--exclude-inbound-ports".into(),
        join(&exclude_in),
    ];
    if !exclude_out.is_empty() {
        init_args.extend(["--exclude-outbound-ports".into(), join(&exclude_out)]);
    }
    if !exclude_cidrs.is_empty() {
        init_args.extend(["--exclude-outbound-cidrs".into(), join(&exclude_cidrs)]);
    }
    if dns_capture {
        init_args.extend(["--redirect-dns-port".into(), keys::DNS_PORT.to_string()]);
    }
    let init = Container {
        name: INIT_CONTAINER.into(),
        image: Some(cfg.image.clone()),
        args: Some(init_args),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("10m".into())),
                ("memory".to_string(), Quantity("16Mi".into())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity("64Mi".into()),
            )])),
            ..Default::default()
        }),
        ..Default::default()
    };

    let mut run_args = vec![
        "run".to_string(),
        "--xds-addr".into(),
        cfg.xds_addr.clone(),
        "--cluster".into(),
        cfg.cluster.clone(),
        "--health-addr".into(),
        format!("0.0.0.0:{HEALTH_PORT}"),
    ];
    if dns_capture {
        run_args.extend(["--dns-addr".into(), format!("127.0.0.1:{}", keys::DNS_PORT)]);
    }
    let probes_json = serde_json::to_string(&probes).map_err(|e| InjectError {
        field: "spec.containers[].*Probe".into(),
        message: format!("cannot encode the probes: {e}"),
    })?;
    let mut proxy = Container {
        name: PROXY_CONTAINER.into(),
        image: Some(cfg.image.clone()),
        args: Some(run_args),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("WEFT_NAMESPACE", "metadata.namespace"),
            field_env("WEFT_SERVICE_ACCOUNT", "spec.serviceAccountName"),
            field_env("NODE_NAME", "spec.nodeName"),
            field_env("POD_IP", "status.podIP"),
            field_env("WEFT_POD_IPS", "status.podIPs"),
            env("WEFT_NODE_ID", "$(POD_NAME).$(POD_NAMESPACE)"),
            env("WEFT_TRUST_DOMAIN", &cfg.trust_domain),
            env("WEFT_TOKEN_FILE", &format!("{TOKEN_DIR}/token")),
            env("WEFT_TRUST_BUNDLE_PEM", &cfg.root_pem),
            env(weft_proto::probes::APP_PROBES_ENV, &probes_json),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("weft-health".into()),
            container_port: i32::from(HEALTH_PORT),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(cfg.resources.clone()),
        security_context: Some(SecurityContext {
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        readiness_probe: Some(health_probe("/ready", 2, 3)),
        liveness_probe: Some(health_probe("/live", 10, 3)),
        volume_mounts: Some(vec![VolumeMount {
            name: TOKEN_VOLUME.into(),
            mount_path: TOKEN_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let inits = spec.init_containers.get_or_insert_with(Vec::new);
    inits.insert(0, init);
    if classic {
        // First regular container; kubelet starts the next one only after postStart returns.
        proxy.lifecycle = Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "weft-sidecar".into(),
                        "wait-ready".into(),
                        "--timeout".into(),
                        "120s".into(),
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        spec.containers.insert(0, proxy);
    } else {
        // Native sidecar: right after weft-init, before any other init container, so they
        // (and the app) start with the proxy ready.
        proxy.restart_policy = Some("Always".into());
        proxy.startup_probe = Some(health_probe("/ready", 1, 120));
        inits.insert(1, proxy);
    }
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(TOKEN_AUDIENCE.into()),
                    expiration_seconds: Some(3600),
                    path: "token".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    });
    out.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(keys::TLS_MODE_LABEL.into(), "weft".into());
    out.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(
            keys::INJECTED_ANNOTATION.into(),
            if classic { "classic" } else { "native" }.into(),
        );
    Ok(Outcome::Injected(Box::new(out)))
}
