//! The whole mesh on a real cluster (`WEFT_E2E_KUBECONFIG`): install from the images, two
//! sample services in an injected namespace, and the checks a platform engineer would make.
//! Skipped, with the reason, without a cluster (as in this lab). Made for a single-node cluster
//! with no DNS add-on and no LoadBalancer (everything is reached by ClusterIP, from inside a
//! pod with `kubectl exec`), whose pod and service networks may be in 198.18.0.0/15.
//!
//! Before running it, load the images into the node's runtime (the test cannot know how your
//! cluster imports images):
//!
//! ```sh
//! ./scripts/images.sh                                          # weft-*-<version>.oci.tar
//! ./e2e/containers/app-image.sh localhost/weft-e2e/app:e2e     # the sample application
//! podman save --format oci-archive -o target/images/app.oci.tar localhost/weft-e2e/app:e2e
//! for a in target/images/*.oci.tar; do sudo k3s ctr images import "$a"; done   # or kind load
//! # the SMI TrafficSplit CRD, pinned (install/README.md has the command)
//! WEFT_E2E_KUBECONFIG=~/.kube/config cargo nextest run -p weft-e2e --test suite \
//!   -E 'test(/^cluster::/)' --no-capture
//! ```
//!
//! `WEFT_E2E_REGISTRY` (default `localhost/weft`) and `WEFT_E2E_TAG` (default this version) name
//! Weft's images, `WEFT_E2E_APP_IMAGE` (default `localhost/weft-e2e/app:e2e`) the application.
//! It installs into the cluster and removes what it made at the end, also on failure: the
//! namespace `weft-e2e` and everything `weftctl install` applied.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use weft_e2e::lab::bin;

const NS: &str = "weft-e2e";

/// kubectl against the cluster under test; removes what the test made on drop.
struct Cluster {
    kubeconfig: PathBuf,
    installed: Option<String>,
    forward: Option<Child>,
}

impl Cluster {
    fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
    }

    fn ok(&self, args: &[&str]) -> String {
        weft_e2e::lab::succeeded(&format!("kubectl {args:?}"), self.kubectl(args))
    }

    fn apply(&self, yaml: &str) {
        let mut c = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl apply");
        if let Some(mut stdin) = c.stdin.take() {
            use std::io::Write;
            let _ = stdin.write_all(yaml.as_bytes());
        }
        let o = c.wait_with_output().expect("kubectl apply");
        assert!(
            o.status.success(),
            "apply: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut f) = self.forward.take() {
            let _ = f.kill();
            let _ = f.wait();
        }
        let _ = self.kubectl(&[
            "delete",
            "namespace",
            NS,
            "--ignore-not-found",
            "--wait=false",
        ]);
        if let Some(rendered) = self.installed.take() {
            let path = std::env::temp_dir()
                .join(format!("weft-e2e-installed-{}.yaml", std::process::id()));
            if std::fs::write(&path, rendered).is_ok() {
                let p = path.to_string_lossy().into_owned();
                let _ = self.kubectl(&["delete", "-f", &p, "--ignore-not-found", "--wait=false"]);
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

fn workloads(app_image: &str) -> String {
    let deployment = |name: &str, app: &str, version: &str, replicas: u32, sa: &str, args: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {app}, version: {version}}}}}\n  template:\n    metadata: {{labels: {{app: {app}, version: {version}}}}}\n    spec:\n      serviceAccountName: {sa}\n      containers:\n      - name: app\n        image: {app_image}\n        imagePullPolicy: IfNotPresent\n        env: [{{name: VERSION, value: {version}}}]\n{args}        ports: [{{containerPort: 8080}}]\n        readinessProbe: {{httpGet: {{path: /, port: 8080}}}}\n"
        )
    };
    let service = |name: &str, selector: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  selector: {selector}\n  ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]\n"
        )
    };
    let waiting = "        command: [/usr/bin/python3, -c, \"import time; time.sleep(86400)\"]\n";
    [
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: echo, namespace: weft-e2e}\n".to_string(),
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: client, namespace: weft-e2e}\n".to_string(),
        deployment("echo-v1", "echo", "v1", 2, "echo", ""),
        deployment("echo-v2", "echo", "v2", 1, "echo", ""),
        deployment("client", "client", "v1", 1, "client", waiting).replace(
            "        readinessProbe: {httpGet: {path: /, port: 8080}}\n",
            "",
        ),
        service("echo", "{app: echo}"),
        service("echo-v1", "{app: echo, version: v1}"),
        service("echo-v2", "{app: echo, version: v2}"),
        format!(
            "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {{name: echo, namespace: {NS}}}\nspec:\n  service: echo\n  backends:\n  - {{service: echo-v1, weight: 90}}\n  - {{service: echo-v2, weight: 10}}\n"
        ),
    ]
    .join("---\n")
}

#[test]
fn cluster_the_mesh_installed_from_its_images_serves_two_services() {
    let Ok(kubeconfig) = std::env::var("WEFT_E2E_KUBECONFIG") else {
        println!(
            "SKIP cluster_the_mesh_installed_from_its_images_serves_two_services: \
             WEFT_E2E_KUBECONFIG is not set (no cluster here; see the module docs for the steps)"
        );
        return;
    };
    let kubectl = Command::new("sh")
        .args(["-c", "command -v kubectl"])
        .output();
    if !kubectl.is_ok_and(|o| o.status.success()) {
        println!(
            "SKIP cluster_the_mesh_installed_from_its_images_serves_two_services: kubectl is not installed"
        );
        return;
    }
    let registry = std::env::var("WEFT_E2E_REGISTRY").unwrap_or_else(|_| "localhost/weft".into());
    let tag = std::env::var("WEFT_E2E_TAG").unwrap_or_else(|_| env!("CARGO_PKG_VERSION").into());
    let app_image =
        std::env::var("WEFT_E2E_APP_IMAGE").unwrap_or_else(|_| "localhost/weft-e2e/app:e2e".into());
    let mut cluster = Cluster {
        kubeconfig: PathBuf::from(&kubeconfig),
        installed: None,
        forward: None,
    };
    let split_crd = cluster.kubectl(&["get", "crd", "trafficsplits.split.smi-spec.io"]);
    assert!(
        split_crd.status.success(),
        "the SMI TrafficSplit CRD is not installed (install/README.md has the pinned command)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = dir.path().join("credentials.pem");
    let weftctl = |args: &[&str]| -> Output {
        Command::new(bin("weftctl"))
            .env("KUBECONFIG", &kubeconfig)
            .args(args)
            .output()
            .expect("weftctl")
    };
    let common = [
        "--registry",
        &registry,
        "--tag",
        &tag,
        "--cluster-name",
        "e2e",
    ];
    let rendered = weftctl(&[&["install", "--dry-run"][..], &common].concat());
    cluster.installed = Some(String::from_utf8_lossy(&rendered.stdout).into_owned());
    let (root_out, creds_out) = (
        dir.path().to_string_lossy().into_owned(),
        creds.to_string_lossy().into_owned(),
    );
    let out = weftctl(
        &[
            &["install"][..],
            &common,
            &["--root-out-dir", &root_out, "--credentials-out", &creds_out],
        ]
        .concat(),
    );
    assert!(
        out.status.success(),
        "install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.ok(&[
        "-n",
        "weft-system",
        "wait",
        "deployment",
        "--all",
        "--for=condition=Available",
        "--timeout=300s",
    ]);

    cluster.ok(&["create", "namespace", NS]);
    cluster.ok(&["label", "namespace", NS, "weft.dev/injection=enabled"]);
    cluster.apply(&workloads(&app_image));
    for app in ["echo", "client"] {
        cluster.ok(&[
            "-n",
            NS,
            "wait",
            "pod",
            "-l",
            &format!("app={app}"),
            "--for=condition=Ready",
            "--timeout=300s",
        ]);
    }
    // Injected: every pod has Weft's containers.
    let names = cluster.ok(&["-n", NS, "get", "pods", "-o", "jsonpath={range .items[*]}{.metadata.name}={.spec.initContainers[*].name} {.spec.containers[*].name};{end}"]);
    for pod in names.split(';').filter(|p| !p.is_empty()) {
        assert!(pod.contains("weft"), "not injected: {pod}");
    }
    let vip = cluster.ok(&[
        "-n",
        NS,
        "get",
        "service",
        "echo",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    let url = format!("http://{}/", vip.trim());
    let curl = |n: usize, delete_midway: bool| -> String {
        let urls: Vec<&str> = std::iter::repeat_n(url.as_str(), n).collect();
        let child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "-n",
                NS,
                "exec",
                "deploy/client",
                "-c",
                "app",
                "--",
                "/usr/bin/curl",
                "-s",
                "-m",
                "10",
                "-w",
                "\\n%{http_code}\\n",
            ])
            .args(&urls)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl exec");
        if delete_midway {
            std::thread::sleep(Duration::from_secs(1));
            let pod = cluster.ok(&[
                "-n",
                NS,
                "get",
                "pods",
                "-l",
                "app=echo,version=v1",
                "-o",
                "jsonpath={.items[0].metadata.name}",
            ]);
            cluster.ok(&["-n", NS, "delete", "pod", pod.trim(), "--wait=false"]);
        }
        let o = child.wait_with_output().expect("curl");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // Through the ClusterIP, over both sidecars' mTLS: the application sees the caller verified.
    let deadline = Instant::now() + Duration::from_secs(120);
    let answers = loop {
        let a = curl(200, false);
        if a.lines().filter(|l| *l == "200").count() == 200 {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "not every request was answered:\n{a}"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    let bodies: Vec<&str> = answers
        .lines()
        .filter(|l| l.starts_with("version="))
        .collect();
    let caller = format!("identity=spiffe://cluster.local/ns/{NS}/sa/client");
    assert!(bodies.iter().all(|b| b.ends_with(&caller)), "{answers}");
    let v2 = bodies
        .iter()
        .filter(|b| b.starts_with("version=v2"))
        .count();
    assert!((6..=40).contains(&v2), "90/10 split: {v2} of 200 to v2");
    // A backend pod deleted while requests run: none fails.
    let during = curl(300, true);
    let ok = during.lines().filter(|l| *l == "200").count();
    assert_eq!(
        ok, 300,
        "requests failed while a pod was deleted:\n{during}"
    );
    // The operator's view: every proxy SYNCED.
    cluster.forward = Some(
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "-n",
                "weft-system",
                "port-forward",
                "svc/weft-control-plane",
                "25012:15012",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("port-forward"),
    );
    std::thread::sleep(Duration::from_secs(2));
    let status = weftctl(&[
        "status",
        "--cp",
        "127.0.0.1:25012",
        "-o",
        "json",
        "--credentials",
        &creds_out,
    ]);
    let text = String::from_utf8_lossy(&status.stdout);
    let proxies: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("weftctl status: {e}: {text}"));
    let proxies = proxies.as_array().expect("array");
    assert!(proxies.len() >= 4, "{text}");
    for p in proxies {
        for t in p["types"].as_array().expect("types") {
            assert_eq!(t["state"], "SYNCED", "{p}");
        }
    }
}
