//! End-to-end scenarios live in `e2e/tests/`: the third-party xDS interop test (Python grpcio),
//! network-namespace scenarios (interception, the three-cluster suite) and benchmarks.
//!
//! [`lab`] is what the network-namespace scenarios share: prerequisites, commands, and a
//! [`lab::Lab`] that owns every namespace and process a test made and removes them on drop,
//! also when the test fails.

/// A real API server for tests (etcd and kube-apiserver from `KUBEBUILDER_ASSETS`).
pub mod envtest;

/// Network-namespace lab helpers.
pub mod lab {
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Output, Stdio};
    use std::time::{Duration, Instant};

    const BIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug");

    /// A built binary of the workspace (`WEFT_<NAME>_BIN` overrides the path).
    pub fn bin(name: &str) -> PathBuf {
        let var = format!("WEFT_{}_BIN", name.to_uppercase().replace('-', "_"));
        std::env::var(var)
            .map(PathBuf::from)
            .unwrap_or_else(|_| Path::new(BIN).join(name))
    }

    /// Runs a command and returns what it did (panics only when it cannot be started).
    pub fn sh(args: &[&str]) -> Output {
        Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// The stdout of a command that had to succeed; panics naming `what` with its stderr.
    pub fn succeeded(what: &str, o: Output) -> String {
        assert!(
            o.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs a command that must succeed and returns its stdout.
    pub fn ok(args: &[&str]) -> String {
        let o = sh(args);
        assert!(
            o.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Why a network-namespace test cannot run here, if it cannot: not root, a tool missing,
    /// a binary not built.
    pub fn missing_prerequisite(tools: &[&str], bins: &[&str]) -> Option<String> {
        let uid = Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Some("not root (network namespaces and iptables need it)".into());
        }
        for tool in tools {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output();
            if !found.is_ok_and(|o| o.status.success()) {
                return Some(format!("{tool} is not installed"));
            }
        }
        for b in bins {
            if !bin(b).exists() {
                return Some(format!(
                    "{} is not built (cargo build --workspace --bins)",
                    bin(b).display()
                ));
            }
        }
        None
    }

    /// Runs the rest of a command line as the proxy UID (1337), whose own connections the
    /// interception rules leave alone: `[PROXY_UID, &[sidecar, "run", ...]].concat()`.
    pub const PROXY_UID: [&str; 6] = [
        "setpriv",
        "--reuid",
        "1337",
        "--regid",
        "1337",
        "--clear-groups",
    ];

    /// What `weft-sidecar run` takes after `run` in a pod of cluster `c1` that joins with a
    /// token (IPv4 only, admin on 127.0.0.1:15000): control plane, trust bundle, token,
    /// namespace, service account, node ID, pod IP.
    pub struct SidecarRun<'a> {
        /// The control plane's TLS gRPC address.
        pub xds: &'a str,
        /// The trust bundle's path (as the sidecar sees it).
        pub bundle: &'a str,
        /// The join token.
        pub token: &'a str,
        /// The pod's namespace.
        pub namespace: &'a str,
        /// Its service account.
        pub sa: &'a str,
        /// Its node ID (`pod.namespace`).
        pub node: &'a str,
        /// Its IP.
        pub ip: &'a str,
    }

    impl SidecarRun<'_> {
        /// The arguments, `run` first.
        pub fn args(&self) -> Vec<&str> {
            vec![
                "run",
                "--xds-addr",
                self.xds,
                "--trust-bundle",
                self.bundle,
                "--join-token",
                self.token,
                "--namespace",
                self.namespace,
                "--service-account",
                self.sa,
                "--node-id",
                self.node,
                "--pod-ips",
                self.ip,
                "--cluster",
                "c1",
                "--no-ipv6",
                "--admin-addr",
                "127.0.0.1:15000",
            ]
        }
    }

    /// Polls `f` every 100 ms until it holds; panics naming `what` after `patience`.
    pub fn eventually(what: &str, patience: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + patience;
        while !f() {
            assert!(
                Instant::now() < deadline,
                "not true after {patience:?}: {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything a test made: namespaces (their veths and rules go with them) and named
    /// processes. Dropping it kills the processes and deletes the namespaces.
    #[derive(Default)]
    pub struct Lab {
        /// Namespaces, deleted on drop.
        pub namespaces: Vec<String>,
        children: Vec<(String, Child)>,
        /// `/etc/netns/<ns>` directories made for namespaces, removed on drop.
        etc: Vec<std::path::PathBuf>,
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            for (_, c) in &mut self.children {
                let _ = c.kill();
                let _ = c.wait();
            }
            for ns in &self.namespaces {
                let _ = Command::new("ip").args(["netns", "del", ns]).output();
            }
            for dir in &self.etc {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    impl Lab {
        /// Creates a namespace (owned by the lab) with its loopback up.
        pub fn namespace(&mut self, name: &str) {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
            ok(&["ip", "netns", "add", name]);
            self.namespaces.push(name.to_string());
            ok(&["ip", "-n", name, "link", "set", "lo", "up"]);
        }

        /// Joins namespaces `a` and `b` with a veth pair (`dev_a` in `a` at `cidr_a`, `dev_b`
        /// in `b` at `cidr_b`), both ends up.
        pub fn veth(
            &mut self,
            (a, dev_a, cidr_a): (&str, &str, &str),
            (b, dev_b, cidr_b): (&str, &str, &str),
        ) {
            ok(&[
                "ip", "link", "add", dev_a, "type", "veth", "peer", "name", dev_b,
            ]);
            for (ns, dev, cidr) in [(a, dev_a, cidr_a), (b, dev_b, cidr_b)] {
                ok(&["ip", "link", "set", dev, "netns", ns]);
                ok(&["ip", "-n", ns, "addr", "add", cidr, "dev", dev]);
                ok(&["ip", "-n", ns, "link", "set", dev, "up"]);
            }
        }

        /// Serves `dir` over HTTP at `bind:port` in namespace `ns` (Python's http.server), as
        /// process `name`.
        pub fn web(&mut self, name: &str, ns: &str, bind: &str, port: u16, dir: &Path) {
            let (port, dir) = (port.to_string(), dir.to_string_lossy().into_owned());
            self.spawn(
                name,
                ns,
                &[
                    "python3",
                    "-m",
                    "http.server",
                    &port,
                    "--bind",
                    bind,
                    "--directory",
                    &dir,
                ],
                None,
            );
        }

        /// Gives processes run in namespace `ns` (through `ip netns exec`) this resolv.conf,
        /// as a pod's is: `/etc/netns/<ns>/resolv.conf`, removed on drop.
        pub fn resolv_conf(&mut self, ns: &str, text: &str) {
            let dir = Path::new("/etc/netns").join(ns);
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            self.etc.push(dir.clone());
            std::fs::write(dir.join("resolv.conf"), text)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        }

        /// Creates namespace `br` holding a bridge (`br0`) for hosts to join: a flat network
        /// of namespaces, never connected to the host's.
        pub fn bridge(&mut self, br: &str) {
            self.namespace(br);
            ok(&["ip", "-n", br, "link", "add", "br0", "type", "bridge"]);
            ok(&["ip", "-n", br, "link", "set", "br0", "up"]);
        }

        /// Creates host namespace `ns` joined to `br`'s bridge through veth `port` (its end
        /// in `ns` is `eth0`), with address `cidr`.
        pub fn attach(&mut self, br: &str, port: &str, ns: &str, cidr: &str) {
            self.namespace(ns);
            ok(&[
                "ip", "-n", br, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ]);
            ok(&["ip", "-n", br, "link", "set", port, "master", "br0"]);
            ok(&["ip", "-n", br, "link", "set", port, "up"]);
            ok(&["ip", "-n", ns, "addr", "add", cidr, "dev", "eth0"]);
            ok(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        }

        /// Starts `args` inside namespace `ns` as process `name` (output discarded unless
        /// `log` names a file for it).
        pub fn spawn(&mut self, name: &str, ns: &str, args: &[&str], log: Option<&Path>) {
            let (out, err) = match log.and_then(|p| std::fs::File::create(p).ok()) {
                Some(f) => match f.try_clone() {
                    Ok(g) => (Stdio::from(f), Stdio::from(g)),
                    Err(_) => (Stdio::null(), Stdio::null()),
                },
                None => (Stdio::null(), Stdio::null()),
            };
            let child = Command::new("ip")
                .args(["netns", "exec", ns])
                .args(args)
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("{args:?}: {e}"));
            self.children.push((name.to_string(), child));
        }

        /// Kills (SIGKILL) every process named `name` and waits for it.
        pub fn kill(&mut self, name: &str) {
            for (n, c) in &mut self.children {
                if n == name {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
            self.children.retain(|(n, _)| n != name);
        }

        /// Whether process `name` is still running.
        pub fn running(&mut self, name: &str) -> bool {
            self.children
                .iter_mut()
                .any(|(n, c)| n == name && matches!(c.try_wait(), Ok(None)))
        }
    }
}
