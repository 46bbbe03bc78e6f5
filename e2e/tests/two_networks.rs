//! Two clusters on two networks whose pod ranges overlap, in network namespaces this test
//! creates (removed on exit, also on failure; nothing is connected to the host's network):
//!
//! - network A: a bridge with cluster a's hosts on 198.18.10.0/24 — its control plane `acp`
//!   (.10, also A's router to the WAN, which forwards pod traffic only to B's gateways, NATed),
//!   an echo pod `ae1` (.11) and a client pod `acl` (.20);
//! - network B: another bridge, the *same* 198.18.10.0/24 — its control plane `bcp` (.10), an
//!   echo pod `be1` (.11, the address of A's echo pod) and two gateway replicas `bgw1`/`bgw2`;
//! - a WAN bridge on 198.19.0.0/24 joining the two control planes and B's gateways only.
//!
//! Cluster a's MeshPeer says b is on network `net-b` behind its two gateways, and names b's
//! control plane by its address inside b's network: federation itself runs through them. Every pod runs
//! `weft-sidecar init` and `run` with an identity (join tokens under one shared root); the
//! client pod's DNS goes to its sidecar's mesh DNS. Scenarios: an unmodified client resolves
//! `echo.default.svc.clusterset.local` through the mesh DNS and reaches b's pod through b's
//! gateway over mTLS, b's app seeing a's client identity; killing a's only echo pod fails over
//! to b through the gateway with no failed request; killing one of b's two gateways loses no
//! request. What it measured is printed (`FIGURES`) for BENCHMARKS.md.
//!
//! Needs root, `ip`, `iptables`, `setpriv`, `curl`, `getent`, `python3` and the built binaries;
//! without them it prints `SKIP` and why.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use weft_e2e::lab::{Lab, PROXY_UID, bin, eventually, missing_prerequisite, ok, sh};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
/// Service `echo`'s clusterIP in cluster a.
const ECHO_IP: &str = "198.18.200.1";

struct Net {
    lab: Lab,
    prefix: String,
    dir: PathBuf,
    logs: PathBuf,
}

fn write(path: &Path, content: &str) {
    std::fs::write(path, content).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}

fn world(cluster: &str) -> String {
    let pod = format!("{cluster}-e1");
    let mut docs = vec![
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n  annotations: {weft.dev/mtls-mode: STRICT}\n".to_string(),
        format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: default\n  labels: {{app: echo, weft.dev/tls-mode: weft}}\nspec:\n  serviceAccountName: echo\n  containers: [{{name: echo, image: echo}}]\n"),
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: default}}\nspec:\n  clusterIP: {ECHO_IP}\n  ports: [{{name: http, port: 80, appProtocol: http}}]\n"),
        format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: echo}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n- addresses: [\"198.18.10.11\"]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: {pod}, namespace: default}}\n"),
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: echo, namespace: default}\nspec:\n  targetRef: {name: echo}\n  retry: {attempts: 3, retryOn: [5xx, connect-failure, reset], backoff: {baseInterval: 5ms}, budget: {percent: 100}}\n  outlierDetection: {consecutive5xx: 2, interval: 1s, baseEjectionTime: 5s, maxEjectionPercent: 100}\n  locality: {failover: true, crossCluster: true}\n".to_string(),
    ];
    if cluster == "a" {
        docs.push("apiVersion: weft.dev/v1alpha1\nkind: MeshPeer\nmetadata: {name: b}\nspec:\n  address: \"198.18.10.10:15012\"\n  network: net-b\n  gateways: [\"198.19.0.31:15443\", \"198.19.0.32:15443\"]\n  gatewayIdentity: spiffe://cluster.local/ns/default/sa/weft-gateway\n".to_string());
    } else {
        docs.push("apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: echo, namespace: default}\n".to_string());
        docs.push("apiVersion: weft.dev/v1alpha1\nkind: MeshPeer\nmetadata: {name: a}\nspec: {address: \"198.19.0.10:15012\"}\n".to_string());
    }
    docs.join("---\n")
}

impl Net {
    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// A second interface (`eth1`) for `host` on the WAN bridge, at `cidr`.
    fn wan(&mut self, port: &str, host: &str, cidr: &str) {
        let (br, ns) = (self.ns("wan"), self.ns(host));
        ok(&[
            "ip", "-n", &br, "link", "add", port, "type", "veth", "peer", "name", "eth1", "netns",
            &ns,
        ]);
        ok(&["ip", "-n", &br, "link", "set", port, "master", "br0"]);
        ok(&["ip", "-n", &br, "link", "set", port, "up"]);
        ok(&["ip", "-n", &ns, "addr", "add", cidr, "dev", "eth1"]);
        ok(&["ip", "-n", &ns, "link", "set", "eth1", "up"]);
    }

    fn start_cp(&mut self, cluster: &str, network: &str) {
        let args = [
            bin("weft-control-plane").to_string_lossy().into_owned(),
            "--source-dir".into(),
            self.dir
                .join(format!("world-{cluster}"))
                .to_string_lossy()
                .into_owned(),
            "--cluster-name".into(),
            cluster.into(),
            "--network".into(),
            network.into(),
            "--clusterset-vip-range".into(),
            "198.19.250.0/24".into(),
            "--ca-dir".into(),
            self.dir
                .join(format!("ca-{cluster}"))
                .to_string_lossy()
                .into_owned(),
            "--grpc-addr".into(),
            "0.0.0.0:15012".into(),
            "--metrics-addr".into(),
            "0.0.0.0:15014".into(),
            "--federation-heartbeat".into(),
            "200ms".into(),
            "--federation-timeout".into(),
            "1s".into(),
            "--replica-service".into(),
            "none".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ns, log) = (
            self.ns(&format!("{cluster}cp")),
            self.logs.join(format!("cp-{cluster}.log")),
        );
        self.lab
            .spawn(&format!("cp-{cluster}"), &ns, &args, Some(&log));
    }

    /// A pod of `cluster` on host `host`: interception (and DNS capture for the client), an
    /// identity for `namespace/sa`, the sidecar (a gateway with `gateway`), and for echo pods
    /// the app.
    fn start_pod(&mut self, cluster: &str, host: &str, namespace: &str, sa: &str, role: Role) {
        let ns = self.ns(host);
        let sidecar = bin("weft-sidecar").to_string_lossy().into_owned();
        if role == Role::Echo {
            let script = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("netns/echo.py")
                .to_string_lossy()
                .into_owned();
            let delays = self.dir.join("delays.json").to_string_lossy().into_owned();
            self.lab.spawn(
                &format!("app-{host}"),
                &ns,
                &[
                    "python3",
                    &script,
                    "--cluster",
                    cluster,
                    "--zone",
                    "z",
                    "--pod",
                    host,
                    "--delays",
                    &delays,
                ],
                Some(&self.logs.join(format!("app-{host}.log"))),
            );
        }
        match role {
            Role::Client => ok(&[
                "ip",
                "netns",
                "exec",
                &ns,
                &sidecar,
                "init",
                "--redirect-dns-port",
                "15053",
            ]),
            Role::Echo => ok(&["ip", "netns", "exec", &ns, &sidecar, "init"]),
            Role::Gateway => String::new(),
        };
        let ca = self.dir.join(format!("ca-{cluster}"));
        let token = weft_control_plane::identity::token_key(Some(&ca), "cluster.local")
            .expect("token key")
            .with_cluster(cluster)
            .mint(namespace, sa, 3600)
            .expect("token")
            .0;
        let bundle = self.dir.join(format!("bundle-{cluster}.pem"));
        std::fs::copy(ca.join("root.pem"), &bundle).expect("bundle");
        set_mode(&bundle, 0o644);
        let bundle = bundle.to_string_lossy().into_owned();
        let mut args: Vec<String> = [
            sidecar.as_str(),
            "run",
            "--xds-addr",
            "198.18.10.10:15012",
            "--trust-bundle",
            &bundle,
            "--join-token",
            &token,
            "--namespace",
            namespace,
            "--service-account",
            sa,
            "--node-id",
            host,
            "--cluster",
            cluster,
            "--admin-addr",
            "127.0.0.1:15000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        match role {
            Role::Client => args.extend(["--dns-addr".into(), "127.0.0.1:15053".into()]),
            Role::Gateway => args.extend(["--gateway-addr".into(), "0.0.0.0:15443".into()]),
            Role::Echo => {}
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.lab.spawn(
            &format!("sidecar-{host}"),
            &ns,
            &[&PROXY_UID[..], &args].concat(),
            Some(&self.logs.join(format!("sidecar-{host}.log"))),
        );
    }

    fn curl(&self, host: &str, url: &str) -> String {
        let o = sh(&[
            "ip",
            "netns",
            "exec",
            &self.ns(host),
            "curl",
            "-s",
            "-m",
            "3",
            url,
        ]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn metric(&self, host: &str, url: &str, metric: &str, labels: &[&str]) -> f64 {
        weft_testkit::metric_sum(&self.curl(host, url), metric, labels)
    }

    fn forwarded(&self) -> f64 {
        ["bgw1", "bgw2"]
            .iter()
            .map(|g| {
                self.metric(
                    g,
                    "http://127.0.0.1:15000/metrics",
                    "weft_gateway_connections_total",
                    &["result=\"forwarded\""],
                )
            })
            .sum()
    }

    /// Starts the unmodified load client in the client pod: `rate` requests/s for `secs`.
    fn load(&self, url: &str, rate: u32, secs: f64) -> std::process::Child {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("netns/client.py")
            .to_string_lossy()
            .into_owned();
        Command::new("ip")
            .args(["netns", "exec", &self.ns("acl"), "python3", &script, url])
            .args(["--rate", &rate.to_string(), "--duration", &secs.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("load client")
    }

    /// Runs the load client at 50 requests/s for `secs` against `url` (killing the `kill`
    /// processes after their delay), asserts every request answered 200 and at least 80 % of
    /// the planned ones ran, and returns the records.
    fn load_none_failed(
        &mut self,
        what: &str,
        url: &str,
        secs: f64,
        kill: Option<(Duration, &[&str])>,
    ) -> Vec<(f64, bool, String, String)> {
        let load = self.load(url, 50, secs);
        if let Some((after, names)) = kill {
            std::thread::sleep(after);
            for n in names {
                self.lab.kill(n);
            }
        }
        let out = load.wait_with_output().expect("load");
        let recs = records(&String::from_utf8_lossy(&out.stdout));
        let planned = (50.0 * secs * 0.8) as usize;
        assert!(recs.len() >= planned, "{what}: {} requests", recs.len());
        let failed: Vec<_> = recs.iter().filter(|r| !r.1).collect();
        assert!(
            failed.is_empty(),
            "{what}: {} failed: {:?}\n{}",
            failed.len(),
            failed.iter().take(5).collect::<Vec<_>>(),
            self.logs_tail()
        );
        recs
    }

    fn logs_tail(&self) -> String {
        let mut s = String::new();
        for f in [
            "cp-a.log",
            "cp-b.log",
            "sidecar-acl.log",
            "sidecar-bgw1.log",
            "sidecar-be1.log",
        ] {
            let body = std::fs::read_to_string(self.logs.join(f)).unwrap_or_default();
            let tail: Vec<&str> = body.lines().rev().take(12).collect();
            s.push_str(&format!(
                "--- {f}\n{}\n",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        s
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Client,
    Echo,
    Gateway,
}

/// One request of the load client: seconds since it started, ok, the cluster that answered.
fn records(out: &str) -> Vec<(f64, bool, String, String)> {
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            let body = v["body"].as_str().unwrap_or_default().to_string();
            let field = |k: &str| {
                body.split_whitespace()
                    .find_map(|f| f.strip_prefix(&format!("{k}=")).map(str::to_string))
                    .unwrap_or_default()
            };
            (
                v["t"].as_f64().unwrap_or_default(),
                v["ok"].as_bool().unwrap_or(false),
                field("cluster"),
                body,
            )
        })
        .collect()
}

#[test]
fn two_networks_with_overlapping_pod_ranges_meet_through_the_gateway() {
    let test = "two_networks_with_overlapping_pod_ranges_meet_through_the_gateway";
    if let Some(why) = missing_prerequisite(
        &["ip", "iptables", "curl", "getent", "setpriv", "python3"],
        &["weft-control-plane", "weft-sidecar"],
    ) {
        println!("SKIP {test}: {why}");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut net = Net {
        lab: Lab::default(),
        prefix: format!("w2n{}", std::process::id()),
        dir: tmp.path().to_path_buf(),
        logs: tmp.path().join("logs"),
    };
    std::fs::create_dir_all(&net.logs).expect("logs");
    set_mode(&net.dir, 0o755);
    write(&net.dir.join("delays.json"), "{}");
    let cas = weft_testkit::shared_root_ca_dirs(&net.dir, &["a", "b"]).expect("CA dirs");
    for (c, ca) in ["a", "b"].iter().zip(&cas) {
        std::fs::rename(ca, net.dir.join(format!("ca-{c}"))).expect("CA dir");
        let w = net.dir.join(format!("world-{c}"));
        std::fs::create_dir_all(&w).expect("world dir");
        write(&w.join("world.yaml"), &world(c));
    }

    // The three networks. Both pod networks are 198.18.10.0/24.
    for br in ["lana", "lanb", "wan"] {
        let ns = net.ns(br);
        net.lab.bridge(&ns);
    }
    let hosts = [
        ("lana", "acp", "198.18.10.10"),
        ("lana", "ae1", "198.18.10.11"),
        ("lana", "acl", "198.18.10.20"),
        ("lanb", "bcp", "198.18.10.10"),
        ("lanb", "be1", "198.18.10.11"),
        ("lanb", "bgw1", "198.18.10.30"),
        ("lanb", "bgw2", "198.18.10.31"),
    ];
    for (i, (br, host, ip)) in hosts.iter().enumerate() {
        let (b, h) = (net.ns(br), net.ns(host));
        net.lab
            .attach(&b, &format!("p{i}"), &h, &format!("{ip}/24"));
    }
    for (i, (host, ip)) in [
        ("acp", "198.19.0.10"),
        ("bcp", "198.19.0.20"),
        ("bgw1", "198.19.0.31"),
        ("bgw2", "198.19.0.32"),
    ]
    .iter()
    .enumerate()
    {
        net.wan(&format!("w{i}"), host, &format!("{ip}/24"));
    }
    // A's router: pods reach B's gateways (and nothing else of the WAN), NATed.
    let acp = net.ns("acp");
    ok(&[
        "ip",
        "netns",
        "exec",
        &acp,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    for rule in [
        "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A FORWARD -o eth1 -d 198.19.0.31 -p tcp --dport 15443 -j ACCEPT",
        "-A FORWARD -o eth1 -d 198.19.0.32 -p tcp --dport 15443 -j ACCEPT",
        "-A FORWARD -j DROP",
    ] {
        let args: Vec<&str> = rule.split(' ').collect();
        ok(&[&["ip", "netns", "exec", &acp, "iptables"][..], &args].concat());
    }
    ok(&[
        "ip",
        "netns",
        "exec",
        &acp,
        "iptables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-o",
        "eth1",
        "-j",
        "MASQUERADE",
    ]);
    for host in ["ae1", "acl"] {
        ok(&[
            "ip",
            "-n",
            &net.ns(host),
            "route",
            "add",
            "198.19.0.0/24",
            "via",
            "198.18.10.10",
        ]);
    }
    // Clusterset VIPs and clusterIPs route somewhere (the interception redirects them).
    for host in ["ae1", "acl", "be1"] {
        for cidr in ["198.19.250.0/24", "198.18.200.0/24"] {
            ok(&[
                "ip",
                "-n",
                &net.ns(host),
                "route",
                "add",
                cidr,
                "dev",
                "eth0",
            ]);
        }
    }
    let acl = net.ns("acl");
    net.lab.resolv_conf(&acl, "nameserver 198.18.10.10\n");

    net.start_cp("a", "net-a");
    net.start_cp("b", "net-b");
    net.start_pod("a", "ae1", "default", "echo", Role::Echo);
    net.start_pod("a", "acl", "default", "client", Role::Client);
    net.start_pod("b", "be1", "default", "echo", Role::Echo);
    // Join tokens are never minted for weft-system: the test's gateways are default's.
    net.start_pod("b", "bgw1", "default", "weft-gateway", Role::Gateway);
    net.start_pod("b", "bgw2", "default", "weft-gateway", Role::Gateway);
    for host in ["ae1", "acl", "be1", "bgw1", "bgw2"] {
        eventually(
            &format!("{host}'s sidecar ready"),
            Duration::from_secs(30),
            || {
                net.curl(host, "http://127.0.0.1:15000/ready")
                    .contains("ready")
            },
        );
    }
    let peer_up = || {
        net.metric(
            "acp",
            "http://127.0.0.1:15014/metrics",
            "weft_federation_peer_up",
            &["peer=\"b\""],
        ) == 1.0
    };
    eventually("a federated with b", Duration::from_secs(30), peer_up);
    // Through b's gateway: a's MeshPeer names b's control plane by its address inside b's
    // network (the address of a's own control plane, here).
    let federated_via_gateway: f64 = ["bgw1", "bgw2"]
        .iter()
        .map(|g| {
            net.metric(
                g,
                "http://127.0.0.1:15000/metrics",
                "weft_gateway_connections_total",
                &["service=\"control-plane\"", "result=\"forwarded\""],
            )
        })
        .sum();
    assert!(
        federated_via_gateway >= 1.0,
        "federation did not cross b's gateway\n{}",
        net.logs_tail()
    );

    // The overlap is real: both echo pods are 198.18.10.11; by its cluster name (local first)
    // the Service answers from a's.
    let mut local = String::new();
    eventually(
        "a's echo by its cluster name",
        Duration::from_secs(20),
        || {
            local = net.curl("acl", &format!("http://{ECHO_IP}/"));
            local.contains("cluster=a")
        },
    );

    // DNS: the clusterset name resolves to its VIP through the mesh DNS; an unmodified client
    // by that name reaches b's pod through b's gateway, b's app seeing a's client identity.
    let resolved = String::from_utf8_lossy(
        &sh(&[
            "ip",
            "netns",
            "exec",
            &acl,
            "timeout",
            "5",
            "getent",
            "ahostsv4",
            "echo.default.svc.clusterset.local",
        ])
        .stdout,
    )
    .into_owned();
    assert!(
        resolved.starts_with("198.19.250."),
        "{resolved}\n{}",
        net.logs_tail()
    );
    let mut body = String::new();
    eventually(
        "b's echo through the gateway",
        Duration::from_secs(20),
        || {
            body = net.curl("acl", "http://echo.default.svc.clusterset.local/");
            body.contains("cluster=b")
        },
    );
    assert!(
        body.contains(&format!("caller={CLIENT_ID}")),
        "{body}\n{}",
        net.logs_tail()
    );
    assert!(
        net.forwarded() >= 1.0,
        "no tunnel was counted\n{}",
        net.logs_tail()
    );

    // Failover: a's only echo pod dies under load; the cluster name fails over to b through
    // the gateway with no failed request.
    let recs = net.load_none_failed(
        "a's echo killed",
        &format!("http://{ECHO_IP}/"),
        6.0,
        Some((Duration::from_secs(2), &["sidecar-ae1", "app-ae1"])),
    );
    assert!(
        recs.iter().take(50).all(|r| r.2 == "a"),
        "local first: {:?}",
        recs.iter().take(5).collect::<Vec<_>>()
    );
    // The switch, on the client's own clock: its last answer from a, its first from b.
    let first_remote = recs
        .iter()
        .find(|r| r.2 == "b")
        .map(|r| r.0)
        .expect("b answered after the kill");
    let last_local = recs
        .iter()
        .filter(|r| r.2 == "a")
        .map(|r| r.0)
        .fold(0.0, f64::max);
    assert!(recs.iter().rev().take(50).all(|r| r.2 == "b"));

    // One of b's two gateways dies under load: no request is lost.
    let before = net.forwarded();
    let recs2 = net.load_none_failed(
        "a gateway killed",
        "http://echo.default.svc.clusterset.local/",
        4.0,
        Some((Duration::from_millis(1500), &["sidecar-bgw1"])),
    );
    assert!(recs2.iter().all(|r| r.2 == "b"));
    let after = net.metric(
        "bgw2",
        "http://127.0.0.1:15000/metrics",
        "weft_gateway_connections_total",
        &["result=\"forwarded\""],
    );
    assert!(
        after >= 1.0,
        "the other gateway took over ({before} before)"
    );
    // a exports echo too: its clusterset name now spans both clusters. Then the gateways are
    // cut off (connections to them refused): b's endpoints become unreachable, and traffic
    // stays local with no failed request (the attempts that found no gateway are retried on
    // a's endpoint, and b's is ejected).
    net.lab.kill("sidecar-bgw1");
    net.start_pod("a", "ae1", "default", "echo", Role::Echo);
    net.start_pod("b", "bgw1", "default", "weft-gateway", Role::Gateway);
    let mut exported = world("a");
    exported.push_str("---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: echo, namespace: default}\n");
    write(&net.dir.join("world-a").join("world.yaml"), &exported);
    eventually(
        "the clusterset name spans both clusters",
        Duration::from_secs(40),
        || {
            let seen: std::collections::BTreeSet<String> = (0..20)
                .map(|_| {
                    let b = net.curl("acl", "http://echo.default.svc.clusterset.local/");
                    b.split_whitespace()
                        .find_map(|f| f.strip_prefix("cluster=").map(str::to_string))
                        .unwrap_or_default()
                })
                .collect();
            seen.contains("a") && seen.contains("b")
        },
    );
    ok(&[
        "ip",
        "netns",
        "exec",
        &acp,
        "iptables",
        "-I",
        "FORWARD",
        "1",
        "-o",
        "eth1",
        "-p",
        "tcp",
        "--dport",
        "15443",
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ]);
    let recs3 = net.load_none_failed(
        "the gateways cut off",
        "http://echo.default.svc.clusterset.local/",
        4.0,
        None,
    );
    assert!(
        recs3.iter().all(|r| r.2 == "a"),
        "traffic stays local: {:?}",
        recs3
            .iter()
            .filter(|r| r.2 != "a")
            .take(5)
            .collect::<Vec<_>>()
    );
    let gateway_failures = weft_testkit::metric_sum(
        &net.curl("acl", "http://127.0.0.1:15000/metrics"),
        "weft_proxy_upstream_tls_failures_total",
        &["reason=\"gateway\""],
    );
    assert!(gateway_failures >= 1.0, "the cut was noticed");

    println!(
        "FIGURES two networks (none failed, or the test fails): failover through the gateway: {:.0} ms from the last answer of a to the first of b (50 req/s), {} requests; one of two gateways killed: {} requests; gateways cut off: {} requests, all answered locally",
        (first_remote - last_local) * 1000.0,
        recs.len(),
        recs2.len(),
        recs3.len()
    );
}
