//! The mesh in containers, from the images `scripts/images.sh` builds (here from the debug
//! binaries under test): on a podman network this test creates (`--internal`, 198.19.7.0/24,
//! never routed anywhere), a control-plane container (file source, a CA) and four pods. A pod
//! is an application container that owns the network namespace, an init container
//! (`weft-sidecar init`, root with NET_ADMIN, as a pod's init container) that installs the
//! interception rules in it, and a sidecar container (UID 1337) sharing it. The Service `echo`
//! (clusterIP 198.19.7.100) is split 90/10 between `echo-v1` (two pods) and `echo-v2` (one);
//! the client pod's application is an unmodified `curl`.
//!
//! Checks: requests to the Service address go through both sidecars over mTLS and the
//! application sees the caller's verified identity; the split holds within tolerance;
//! removing one of v1's pods while requests run fails none of them; `weftctl status` lists
//! every proxy with every type SYNCED.
//!
//! Needs root, podman, buildah and runc (podman configured as `../shared/LAB.md` says: runc,
//! cgroupfs, no default ulimits — this test writes that `CONTAINERS_CONF` itself) and the built
//! binaries; without them it prints `SKIP` and why. Every container, image and the network it
//! created are removed on exit, also on failure (all carry the label `weft-e2e=<pid>`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use weft_e2e::lab::{bin, missing_prerequisite};

const SUBNET: &str = "198.19.7.0/24";
const CP_IP: &str = "198.19.7.10";
const VIP: &str = "198.19.7.100";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";

/// What the test made in podman, removed on drop.
struct Podman {
    conf: PathBuf,
    label: String,
    network: String,
    tag: String,
}

impl Podman {
    fn cmd(&self, tool: &str, args: &[&str]) -> Output {
        Command::new(tool)
            .env("CONTAINERS_CONF", &self.conf)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool} {args:?}: {e}"))
    }

    fn podman(&self, args: &[&str]) -> Output {
        self.cmd("podman", args)
    }

    /// Runs podman; panics with its stderr unless it succeeds; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        weft_e2e::lab::succeeded(&format!("podman {args:?}"), self.podman(args))
    }

    fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.network)
    }

    /// A detached container `what` with the test's label.
    fn run(&self, what: &str, args: &[&str]) {
        let name = self.name(what);
        let label = format!("weft-e2e={}", self.label);
        self.ok(&[&["run", "-d", "--name", &name, "--label", &label][..], args].concat());
    }

    fn logs(&self, what: &str) -> String {
        let o = self.podman(&["logs", "--tail", "30", &self.name(what)]);
        format!(
            "--- {what} ---\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let filter = format!("label=weft-e2e={}", self.label);
        let ids = self.podman(&["ps", "-aq", "--filter", &filter]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.podman(&["rm", "-f", "-t", "0", id]);
        }
        let _ = self.podman(&["network", "rm", "-f", &self.network]);
        for image in ["weft-control-plane", "weft-sidecar"] {
            let _ = self.podman(&["rmi", "-f", &format!("localhost/weft/{image}:{}", self.tag)]);
        }
        let _ = self.podman(&["rmi", "-f", &format!("localhost/weft-e2e/app:{}", self.tag)]);
    }
}

fn world() -> String {
    use weft_testkit::world::{docs, pod, pod_slice, split};
    let svc = |name: &str, ip: Option<&str>| {
        let cluster_ip = ip.map_or(String::new(), |ip| format!("  clusterIP: {ip}\n"));
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{cluster_ip}  ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]\n"
        )
    };
    let at = |ip: &str| format!("{ip}:8080").parse().expect("addr");
    docs(&[
        svc("echo", Some(VIP)),
        svc("echo-v1", None),
        svc("echo-v2", None),
        pod("v1a", "echo", true),
        pod("v1b", "echo", true),
        pod("v2", "echo", true),
        pod("client", "client", true),
        pod_slice(
            "echo-v1",
            "echo-v1",
            &[(at("198.19.7.2"), "v1a"), (at("198.19.7.3"), "v1b")],
        ),
        pod_slice("echo-v2", "echo-v2", &[(at("198.19.7.4"), "v2")]),
        split("echo-split", "echo", &[("echo-v1", 90), ("echo-v2", 10)]),
    ])
}

fn chown_tree(path: &Path, uid: u32) {
    let o = Command::new("chown")
        .args(["-R", &format!("{uid}:{uid}")])
        .arg(path)
        .output()
        .expect("chown");
    assert!(o.status.success(), "chown {}", path.display());
}

#[test]
fn the_mesh_runs_in_containers_from_its_images() {
    if let Some(why) = missing_prerequisite(
        &["podman", "buildah", "runc", "ldd", "strip", "chown"],
        &["weft-control-plane", "weft-sidecar", "weftctl"],
    ) {
        println!("SKIP the_mesh_runs_in_containers_from_its_images: {why}");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let conf = dir.join("containers.conf");
    std::fs::write(
        &conf,
        "[containers]\ndefault_ulimits = []\n[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\n",
    )
    .expect("containers.conf");
    let pid = std::process::id();
    let lab = Podman {
        conf,
        label: pid.to_string(),
        network: format!("weft-e2e-{pid}"),
        tag: format!("e2e-{pid}"),
    };
    // Can podman run a container at all here? (Not everywhere root can: a locked-down CI.)
    let info = lab.podman(&["info", "--format", "{{.Host.OCIRuntime.Name}}"]);
    if !info.status.success() {
        println!(
            "SKIP the_mesh_runs_in_containers_from_its_images: podman cannot run here: {}",
            String::from_utf8_lossy(&info.stderr).trim()
        );
        return;
    }
    // Networks left by an earlier run that was killed hold the subnet: theirs, by name.
    let nets = lab.ok(&["network", "ls", "--format", "{{.Name}}"]);
    for old in nets.lines().filter(|n| n.starts_with("weft-e2e-")) {
        let filter = format!("network={old}");
        let ids = lab.podman(&["ps", "-aq", "--filter", &filter]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = lab.podman(&["rm", "-f", "-t", "0", id]);
        }
        let _ = lab.podman(&["network", "rm", "-f", old]);
    }

    // The images, from the binaries under test.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir = bin("weft-sidecar").parent().expect("bin dir").to_path_buf();
    let images = lab.cmd_env(
        &root.join("scripts/images.sh"),
        &[
            ("SKIP_BUILD", "1"),
            ("BIN_DIR", &bin_dir.to_string_lossy()),
            ("TAG", &lab.tag),
            ("OUT", &dir.join("images").to_string_lossy()),
            ("COMPONENTS", "control-plane sidecar"),
        ],
    );
    println!("{images}");
    let app = format!("localhost/weft-e2e/app:{}", lab.tag);
    lab.cmd_env_arg(&root.join("e2e/containers/app-image.sh"), &[], &app);
    let (cp_image, sidecar_image) = (
        format!("localhost/weft/weft-control-plane:{}", lab.tag),
        format!("localhost/weft/weft-sidecar:{}", lab.tag),
    );

    // Identity: a root for cluster c1, readable by the control plane's user (65532).
    let cas = weft_testkit::shared_root_ca_dirs(dir, &["c1"]).expect("CA dir");
    let ca = dir.join("ca");
    std::fs::rename(&cas[0], &ca).expect("CA dir");
    let world_dir = dir.join("world");
    std::fs::create_dir_all(&world_dir).expect("world dir");
    std::fs::write(world_dir.join("world.yaml"), world()).expect("world");
    let bundle_dir = dir.join("bundle");
    std::fs::create_dir_all(&bundle_dir).expect("bundle dir");
    std::fs::copy(ca.join("root.pem"), bundle_dir.join("root.pem")).expect("bundle");
    // The join-token key is made here, before the CA directory is mounted read-only.
    let signer = weft_control_plane::identity::token_key(Some(&ca), "cluster.local")
        .expect("token key")
        .with_cluster("c1");
    for d in [&ca, &world_dir] {
        chown_tree(d, 65532);
    }
    // The trust bundle is public: readable by the sidecars' user (1337).
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
        mode(&bundle_dir, 0o755).expect("chmod");
        mode(&bundle_dir.join("root.pem"), 0o644).expect("chmod");
    }
    let mount = |host: &Path, at: &str| format!("{}:{at}:ro", host.display());

    lab.ok(&[
        "network",
        "create",
        "--internal",
        "--subnet",
        SUBNET,
        "--label",
        &format!("weft-e2e={}", lab.label),
        &lab.network,
    ]);
    let net = lab.network.clone();
    lab.run(
        "cp",
        &[
            "--network",
            &net,
            "--ip",
            CP_IP,
            "-v",
            &mount(&world_dir, "/world"),
            "-v",
            &mount(&ca, "/ca"),
            &cp_image,
            "--source-dir",
            "/world",
            "--cluster-name",
            "c1",
            "--ca-dir",
            "/ca",
            "--grpc-addr",
            &format!("{CP_IP}:15012"),
            "--metrics-addr",
            &format!("{CP_IP}:15014"),
        ],
    );

    // A pod: its application (owning the network namespace), the init step, the sidecar.
    let pod = |name: &str, ip: &str, sa: &str, app_args: &[&str]| {
        lab.run(
            &format!("{name}-app"),
            &[&["--network", &net, "--ip", ip][..], app_args].concat(),
        );
        let netns = format!("container:{}", lab.name(&format!("{name}-app")));
        let init = lab.podman(&[
            "run",
            "--rm",
            "--network",
            &netns,
            "--user",
            "0",
            "--cap-add",
            "NET_ADMIN,NET_RAW",
            &sidecar_image,
            "init",
        ]);
        assert!(
            init.status.success(),
            "init in {name}: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let token = signer.mint("default", sa, 3600).expect("token").0;
        let (xds, node, bundle) = (
            format!("{CP_IP}:15012"),
            format!("{name}.default"),
            mount(&bundle_dir, "/bundle"),
        );
        let run = weft_e2e::lab::SidecarRun {
            xds: &xds,
            bundle: "/bundle/root.pem",
            token: &token,
            namespace: "default",
            sa,
            node: &node,
            ip,
        };
        lab.run(
            &format!("{name}-sidecar"),
            &[
                &["--network", &netns, "-v", &bundle, &sidecar_image][..],
                &run.args(),
            ]
            .concat(),
        );
    };
    for (name, ip, version) in [
        ("v1a", "198.19.7.2", "v1"),
        ("v1b", "198.19.7.3", "v1"),
        ("v2", "198.19.7.4", "v2"),
    ] {
        pod(
            name,
            ip,
            "echo",
            &["-e", &format!("VERSION={version}"), &app],
        );
    }
    // The client: an application that only waits; requests are an unmodified curl in it.
    pod(
        "client",
        "198.19.7.5",
        "client",
        &[
            "--entrypoint",
            "/usr/bin/python3",
            &app,
            "-c",
            "import time; time.sleep(3600)",
        ],
    );
    let all_logs = || {
        [
            "cp",
            "client-sidecar",
            "v1a-sidecar",
            "v1b-sidecar",
            "v2-sidecar",
        ]
        .iter()
        .map(|w| lab.logs(w))
        .collect::<String>()
    };
    let client = lab.name("client-app");
    let curl = |args: &[&str]| -> Output {
        lab.podman(&[&["exec", &client, "curl", "-s", "-m", "5"][..], args].concat())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    for name in ["client", "v1a", "v1b", "v2"] {
        let app = lab.name(&format!("{name}-app"));
        loop {
            let ready = lab.podman(&[
                "exec",
                &app,
                "/usr/bin/curl",
                "-s",
                "-m",
                "2",
                "http://127.0.0.1:15000/ready",
            ]);
            if String::from_utf8_lossy(&ready.stdout).contains("ready") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name}'s sidecar never became ready\n{}",
                all_logs()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    // Through the Service address, as the application sends it: both sidecars, mTLS, the
    // caller's identity verified at the other end; the split within tolerance.
    let url = format!("http://{VIP}/");
    let urls: Vec<&str> = std::iter::repeat_n(url.as_str(), 200).collect();
    let mut answers = String::new();
    let served = (0..50).any(|_| {
        let o = curl(&[&["-w", "%{http_code}\\n"][..], &urls].concat());
        answers = String::from_utf8_lossy(&o.stdout).into_owned();
        answers.lines().filter(|l| *l == "200").count() == 200 || {
            std::thread::sleep(Duration::from_millis(300));
            false
        }
    });
    assert!(
        served,
        "not every request was answered:\n{answers}\n{}",
        all_logs()
    );
    let bodies: Vec<&str> = answers
        .lines()
        .filter(|l| l.starts_with("version="))
        .collect();
    assert_eq!(bodies.len(), 200, "{answers}");
    for b in &bodies {
        assert!(
            b.ends_with(&format!("identity={CLIENT_ID}")),
            "the application did not see the client's verified identity: {b}"
        );
    }
    let v2 = bodies
        .iter()
        .filter(|b| b.starts_with("version=v2"))
        .count();
    assert!(
        (6..=40).contains(&v2),
        "90/10 split: {v2} of 200 went to v2"
    );

    // One of v1's pods goes away while requests run: none of them fails.
    let urls: Vec<&str> = std::iter::repeat_n(url.as_str(), 300).collect();
    let during = lab.spawn_exec(
        &client,
        &[
            &[
                "curl",
                "-s",
                "-m",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}\\n",
            ][..],
            &urls,
        ]
        .concat(),
    );
    std::thread::sleep(Duration::from_millis(500));
    for part in ["v1b-sidecar", "v1b-app"] {
        lab.ok(&["rm", "-f", "-t", "0", &lab.name(part)]);
    }
    let out = during.wait_with_output().expect("curl during the removal");
    let codes = String::from_utf8_lossy(&out.stdout).into_owned();
    let ok = codes.lines().filter(|l| *l == "200").count();
    assert_eq!(
        ok,
        300,
        "requests failed while a pod went away:\n{codes}\n{}",
        all_logs()
    );

    // The operator's view: every proxy connected, every type SYNCED.
    let creds = dir.join("operator.pem");
    weft_control_plane::identity::Ca::load_or_generate(Some(&ca), "cluster.local", "c1")
        .expect("CA")
        .issue_operator("cluster.local", "tester", Duration::from_secs(3600))
        .expect("operator")
        .write(&creds)
        .expect("credentials");
    let status = Command::new(bin("weftctl"))
        .args([
            "status",
            "--cp",
            &format!("{CP_IP}:15012"),
            "-o",
            "json",
            "--credentials",
        ])
        .arg(&creds)
        .output()
        .expect("weftctl");
    let text = String::from_utf8_lossy(&status.stdout);
    let proxies: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "weftctl status: {e}: {text}{}",
            String::from_utf8_lossy(&status.stderr)
        )
    });
    let mut names: Vec<&str> = proxies
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|p| p["proxy"].as_str())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["client.default", "v1a.default", "v2.default"],
        "{text}"
    );
    for p in proxies.as_array().expect("array") {
        for t in p["types"].as_array().expect("types") {
            assert_eq!(t["state"], "SYNCED", "{p}");
        }
    }
}

impl Podman {
    /// Runs `script` with `env` (and one argument when `arg` is not empty); panics with its
    /// output unless it succeeds; returns stdout.
    fn cmd_env_arg(&self, script: &Path, env: &[(&str, &str)], arg: &str) -> String {
        let mut c = Command::new(script);
        c.env("CONTAINERS_CONF", &self.conf);
        for (k, v) in env {
            c.env(k, v);
        }
        if !arg.is_empty() {
            c.arg(arg);
        }
        let o = c
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
        assert!(
            o.status.success(),
            "{}: {}{}",
            script.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// [`Podman::cmd_env_arg`] without an argument.
    fn cmd_env(&self, script: &Path, env: &[(&str, &str)]) -> String {
        self.cmd_env_arg(script, env, "")
    }

    /// `podman exec CONTAINER ARGS…` started in the background.
    fn spawn_exec(&self, container: &str, args: &[&str]) -> std::process::Child {
        Command::new("podman")
            .env("CONTAINERS_CONF", &self.conf)
            .args(["exec", container])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("podman exec")
    }
}
