//! A real Kubernetes API server for tests, the envtest way: `etcd` and `kube-apiserver` (and
//! `kubectl`, used to look) from the directory `KUBEBUILDER_ASSETS` names — what
//! `setup-envtest use -p path` prints. No controller-manager, scheduler or kubelet runs: Pods
//! stay Pending, nothing makes EndpointSlices or default RBAC roles, so tests make what they
//! need. Everything listens on 127.0.0.1 and is stopped, its data removed, on drop.
//!
//! Authentication is a static token of an administrator (`system:masters`) plus, per test, the
//! tokens it asks for ([`EnvTest::user`]); authorization is RBAC, so a component run with its
//! own identity gets exactly what its manifests bind.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running etcd and kube-apiserver.
pub struct EnvTest {
    /// The kubeconfig of the administrator.
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    dir: tempfile::TempDir,
    assets: PathBuf,
    children: Vec<Child>,
}

impl Drop for EnvTest {
    fn drop(&mut self) {
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// Why envtest cannot run here, if it cannot: `KUBEBUILDER_ASSETS` unset, or a binary missing.
pub fn missing() -> Option<String> {
    let Some(dir) = std::env::var_os("KUBEBUILDER_ASSETS") else {
        return Some(
            "KUBEBUILDER_ASSETS is not set (a directory with etcd, kube-apiserver and kubectl: \
             `setup-envtest use -p path 1.33.x`); no API server can be downloaded here"
                .into(),
        );
    };
    let dir = PathBuf::from(dir);
    for b in ["etcd", "kube-apiserver", "kubectl"] {
        if !dir.join(b).exists() {
            return Some(format!("KUBEBUILDER_ASSETS={} has no {b}", dir.display()));
        }
    }
    None
}

impl EnvTest {
    /// Starts etcd and the API server and waits until it is ready (at most a minute).
    pub fn start() -> Result<EnvTest, String> {
        if let Some(why) = missing() {
            return Err(why);
        }
        let assets = PathBuf::from(std::env::var_os("KUBEBUILDER_ASSETS").unwrap_or_default());
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let (client, peer, secure) = (free_port()?, free_port()?, free_port()?);
        let logs = dir.path().to_path_buf();
        let log = |name: &str| -> Result<Stdio, String> {
            std::fs::File::create(logs.join(format!("{name}.log")))
                .map(Stdio::from)
                .map_err(|e| e.to_string())
        };
        let mut env = EnvTest {
            kubeconfig: dir.path().join("kubeconfig"),
            url: format!("https://127.0.0.1:{secure}"),
            assets: assets.clone(),
            children: Vec::new(),
            dir,
        };
        let d = env.dir.path().to_path_buf();
        let etcd = Command::new(assets.join("etcd"))
            .arg(format!("--data-dir={}", d.join("etcd").display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=default=http://127.0.0.1:{peer}"))
            .arg("--unsafe-no-fsync")
            .stdout(log("etcd")?)
            .stderr(log("etcd.err")?)
            .spawn()
            .map_err(|e| format!("etcd: {e}"))?;
        env.children.push(etcd);
        // The service-account signing key (the API server issues and checks tokens with it).
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        write(&d.join("sa.key"), &key.serialize_pem())?;
        write(&d.join("sa.pub"), &key.public_key_pem())?;
        write(
            &d.join("tokens.csv"),
            "weft-envtest-admin,admin,admin-uid,\"system:masters\"\n",
        )?;
        let apiserver = Command::new(assets.join("kube-apiserver"))
            .arg(format!("--etcd-servers=http://127.0.0.1:{client}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={secure}"))
            .arg(format!("--cert-dir={}", d.join("certs").display()))
            // Allocated from, never routed to: the lab's range.
            .arg("--service-cluster-ip-range=198.18.240.0/24")
            .arg("--authorization-mode=RBAC")
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .arg(format!(
                "--service-account-issuer=https://127.0.0.1:{secure}"
            ))
            .arg(format!(
                "--service-account-key-file={}",
                d.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d.join("sa.key").display()
            ))
            .arg("--allow-privileged=true")
            // Watches end within 5–10 s (default 30–60 min): every test exercises the
            // watchers' resume, as a long-running control plane does.
            .arg("--min-request-timeout=5")
            .stdout(log("kube-apiserver")?)
            .stderr(log("kube-apiserver.err")?)
            .spawn()
            .map_err(|e| format!("kube-apiserver: {e}"))?;
        env.children.push(apiserver);
        env.write_kubeconfig(&env.kubeconfig.clone(), "weft-envtest-admin")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let o = env.kubectl(&["get", "--raw", "/readyz"]);
            if o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ok") {
                return Ok(env);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the API server did not become ready within a minute: {}\n{}",
                    String::from_utf8_lossy(&o.stderr),
                    env.logs()
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Writes a kubeconfig for `token` at `path` (the server's certificate is self-signed by
    /// the API server itself at start: not verified, loopback only).
    fn write_kubeconfig(&self, path: &Path, token: &str) -> Result<(), String> {
        write(
            path,
            &format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: envtest\n  cluster:\n    server: {}\n    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: envtest\n  context: {{cluster: envtest, user: u, namespace: default}}\ncurrent-context: envtest\n",
                self.url
            ),
        )
    }

    /// A kubeconfig for service account `namespace/name`, with a token the API server issued
    /// through TokenRequest (audience `audience`, one hour): what a pod of it would hold.
    pub fn service_account(
        &self,
        namespace: &str,
        name: &str,
        audience: &str,
    ) -> Result<(PathBuf, String), String> {
        let create = self.kubectl(&["-n", namespace, "create", "serviceaccount", name]);
        if !create.status.success()
            && !String::from_utf8_lossy(&create.stderr).contains("AlreadyExists")
        {
            return Err(String::from_utf8_lossy(&create.stderr).into_owned());
        }
        let token = self.kubectl(&[
            "-n",
            namespace,
            "create",
            "token",
            name,
            "--audience",
            audience,
            "--duration",
            "1h",
        ]);
        if !token.status.success() {
            return Err(String::from_utf8_lossy(&token.stderr).into_owned());
        }
        let token = String::from_utf8_lossy(&token.stdout).trim().to_string();
        let path = self
            .dir
            .path()
            .join(format!("kubeconfig-{namespace}-{name}"));
        self.write_kubeconfig(&path, &token)?;
        Ok((path, token))
    }

    /// Runs kubectl (from the assets) as the administrator.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(self.assets.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
    }

    /// kubectl that must succeed; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        crate::lab::succeeded(&format!("kubectl {args:?}"), self.kubectl(args))
    }

    /// [`EnvTest::apply`] that must succeed.
    pub fn apply_ok(&self, yaml: &str) -> String {
        crate::lab::succeeded("kubectl apply", self.apply(yaml))
    }

    /// Applies `install/FILE` of this repository.
    pub fn apply_install_file(&self, file: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../install")
            .join(file);
        let yaml =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        self.apply_ok(&yaml)
    }

    /// `kubectl apply --server-side -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> Output {
        let mut c = Command::new(self.assets.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args([
                "apply",
                "--server-side",
                "--field-manager",
                "weft-envtest",
                "-f",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl apply");
        if let Some(mut stdin) = c.stdin.take() {
            let _ = stdin.write_all(yaml.as_bytes());
        }
        c.wait_with_output().expect("kubectl apply")
    }

    /// The last lines of the API server's log (for failure messages).
    pub fn logs(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        let err = read("kube-apiserver.err.log");
        let tail: Vec<&str> = err.lines().rev().take(20).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}
