//! Opaque TCP between sidecars is mesh mTLS, for real: in network namespaces this test creates
//! (a bridge joining a control-plane host 198.18.0.10, a database pod 198.18.0.2 and a client
//! pod 198.18.0.1, never connected to the host's network), both pods run `weft-sidecar init` +
//! `weft-sidecar run` with SVIDs from the control plane's CA, and the database's namespace is
//! STRICT. An unmodified TCP client (`e2e/netns/tcp_client.py`) dials the Service's clusterIP
//! on a client-first port (5432) and on a server-first one (3306, the server greets first):
//! both are echoed, which STRICT allows only over mTLS. Bytes that are not HTTP sent to a port
//! declared HTTP are refused inside mTLS too. A host without a sidecar dialling the pod
//! directly gets nothing. Then a DENY naming the client's principal on 5432 closes the
//! client's open connection and refuses new ones, while 3306 keeps serving — the inbound
//! judged a TCP connection by its verified peer.
//!
//! Needs root, `ip`, `iptables`, `setpriv`, `curl`, `python3` and the built binaries; without
//! them it prints `SKIP` and why. Everything it creates is removed on exit, also on failure.

use std::path::{Path, PathBuf};
use std::time::Duration;

use weft_e2e::lab::{Lab, PROXY_UID, bin, eventually, missing_prerequisite, sh};

const DB_VIP: &str = "198.18.0.20";

fn netns_script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("netns")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn world() -> String {
    [
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: data\n  annotations: {weft.dev/mtls-mode: STRICT}\n",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: db-0\n  namespace: data\n  labels: {app: db, weft.dev/tls-mode: weft}\nspec:\n  serviceAccountName: db\n  containers: [{name: db, image: db}]\n",
        &format!("apiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: data}}\nspec:\n  clusterIP: {DB_VIP}\n  ports: [{{name: tcp-echo, port: 5432}}, {{name: mysql, port: 3306}}, {{name: web, port: 8080, appProtocol: http}}]\n"),
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: db-1\n  namespace: data\n  labels: {kubernetes.io/service-name: db}\naddressType: IPv4\nports: [{name: tcp-echo, port: 5432}, {name: mysql, port: 3306}, {name: web, port: 8080}]\nendpoints:\n- addresses: [\"198.18.0.2\"]\n  conditions: {ready: true}\n  targetRef: {kind: Pod, name: db-0, namespace: data}\n",
    ]
    .join("---\n")
}

/// The DENY that names the client's principal on the database's 5432.
const DENY_CLIENT: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-client, namespace: data}\nspec:\n  action: DENY\n  rules:\n  - from: [{source: {principals: [\"cluster.local/ns/default/sa/client\"]}}]\n    to: [{operation: {ports: [\"5432\"]}}]\n";

struct Pods {
    lab: Lab,
    prefix: String,
    dir: PathBuf,
}

impl Pods {
    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// `weft-sidecar init` and `run` in `host`, as `namespace/sa` with a join token.
    fn start_sidecar(&mut self, host: &str, ip: &str, namespace: &str, sa: &str, pod: &str) {
        let ns = self.ns(host);
        let sidecar = bin("weft-sidecar").to_string_lossy().into_owned();
        weft_e2e::lab::ok(&["ip", "netns", "exec", &ns, &sidecar, "init"]);
        let ca = self.dir.join("ca-c1");
        let token = weft_control_plane::identity::token_key(Some(&ca), "cluster.local")
            .expect("token key")
            .with_cluster("c1")
            .mint(namespace, sa, 3600)
            .expect("token")
            .0;
        let bundle = self.dir.join("bundle.pem");
        std::fs::copy(ca.join("root.pem"), &bundle).expect("bundle");
        set_mode(&bundle, 0o644);
        let bundle = bundle.to_string_lossy().into_owned();
        let node = format!("{pod}.{namespace}");
        let log = self.dir.join(format!("sidecar-{host}.log"));
        self.lab.spawn(
            &format!("sidecar-{host}"),
            &ns,
            &[
                &PROXY_UID[..],
                &[sidecar.as_str()],
                &weft_e2e::lab::SidecarRun {
                    xds: "198.18.0.10:15012",
                    bundle: &bundle,
                    token: &token,
                    namespace,
                    sa,
                    node: &node,
                    ip,
                }
                .args(),
            ]
            .concat(),
            Some(&log),
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

    fn metric(&self, host: &str, metric: &str, labels: &[&str]) -> f64 {
        let page = self.curl(host, "http://127.0.0.1:15000/metrics");
        weft_testkit::metric_sum(&page, metric, labels)
    }

    /// Runs the TCP client in `host` once: `count` echoed rounds (after a greeting with
    /// `greeting`). Its output, and whether every round was echoed.
    fn tcp(&self, host: &str, to: &str, port: u16, greeting: bool, count: u32) -> (bool, String) {
        let (script, port, count) = (
            netns_script("tcp_client.py"),
            port.to_string(),
            count.to_string(),
        );
        let ns = self.ns(host);
        let mut args = vec![
            "ip",
            "netns",
            "exec",
            &ns,
            "python3",
            &script,
            to,
            &port,
            "--count",
            &count,
            "--duration",
            "10",
        ];
        if greeting {
            args.push("--greeting");
        }
        let o = sh(&args);
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    }

    fn logs(&self) -> String {
        ["sidecar-cli.log", "sidecar-db.log", "cp.log"]
            .iter()
            .map(|f| {
                let body = std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
                let tail: Vec<&str> = body.lines().rev().take(12).collect();
                format!(
                    "--- {f}\n{}\n",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect()
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn opaque_tcp_is_mesh_mtls_in_a_strict_namespace_and_a_deny_closes_it() {
    if let Some(why) = missing_prerequisite(
        &["ip", "iptables", "curl", "setpriv", "python3"],
        &["weft-control-plane", "weft-sidecar"],
    ) {
        println!("SKIP opaque_tcp_is_mesh_mtls_in_a_strict_namespace_and_a_deny_closes_it: {why}");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut pods = Pods {
        lab: Lab::default(),
        prefix: format!("wtcp{}", std::process::id()),
        dir: tmp.path().to_path_buf(),
    };
    set_mode(&pods.dir, 0o755);
    let cas = weft_testkit::shared_root_ca_dirs(&pods.dir, &["c1"]).expect("CA dir");
    std::fs::rename(&cas[0], pods.dir.join("ca-c1")).expect("CA dir");
    let world_dir = pods.dir.join("world");
    std::fs::create_dir_all(&world_dir).expect("world dir");
    std::fs::write(world_dir.join("world.yaml"), world()).expect("world");

    let br = pods.ns("br");
    pods.lab.bridge(&br);
    for (i, (host, ip)) in [
        ("cp", "198.18.0.10"),
        ("db", "198.18.0.2"),
        ("cli", "198.18.0.1"),
    ]
    .into_iter()
    .enumerate()
    {
        let ns = pods.ns(host);
        pods.lab
            .attach(&br, &format!("t{i}"), &ns, &format!("{ip}/24"));
    }
    let cp = bin("weft-control-plane").to_string_lossy().into_owned();
    let (world_arg, ca_arg) = (
        world_dir.to_string_lossy().into_owned(),
        pods.dir.join("ca-c1").to_string_lossy().into_owned(),
    );
    let (cp_ns, cp_log) = (pods.ns("cp"), pods.dir.join("cp.log"));
    pods.lab.spawn(
        "cp",
        &cp_ns,
        &[
            &cp,
            "--source-dir",
            &world_arg,
            "--cluster-name",
            "c1",
            "--ca-dir",
            &ca_arg,
            "--grpc-addr",
            "198.18.0.10:15012",
            "--metrics-addr",
            "198.18.0.10:15014",
        ],
        Some(&cp_log),
    );
    // The database: an echo on 5432 (client-first) and 3306 (it greets first).
    let db_ns = pods.ns("db");
    pods.lab.spawn(
        "db-app",
        &db_ns,
        &[
            "python3",
            &netns_script("tcp_echo.py"),
            "--bind",
            "198.18.0.2",
            "--port",
            "5432",
            "--port",
            "3306:greet",
            "--port",
            "8080",
        ],
        None,
    );
    pods.start_sidecar("db", "198.18.0.2", "data", "db", "db-0");
    pods.start_sidecar("cli", "198.18.0.1", "default", "client", "client-0");
    let patience = Duration::from_secs(30);
    for host in ["db", "cli"] {
        eventually(&format!("the {host} sidecar is ready"), patience, || {
            pods.curl(host, "http://127.0.0.1:15000/ready")
                .contains("ready")
        });
    }

    // Client-first TCP through the Service: STRICT serves it, so it crossed as mTLS.
    let mut last = String::new();
    let reached = (0..100).any(|_| {
        let (ok, out) = pods.tcp("cli", DB_VIP, 5432, false, 3);
        last = out;
        ok || {
            std::thread::sleep(Duration::from_millis(200));
            false
        }
    });
    assert!(reached, "5432 not echoed: {last}\n{}", pods.logs());
    // Server-first: the greeting arrives through two sidecars, then the echo.
    let (ok, out) = pods.tcp("cli", DB_VIP, 3306, true, 2);
    assert!(ok, "3306: {out}\n{}", pods.logs());
    assert!(out.contains("greeting hello from tcp-echo"), "{out}");
    let mtls = |host: &str, direction: &str| {
        pods.metric(
            host,
            "weft_proxy_tcp_connections_total",
            &[&format!("direction=\"{direction}\""), "mtls=\"true\""],
        )
    };
    assert!(mtls("cli", "outbound") >= 2.0, "{}", pods.logs());
    assert!(mtls("db", "inbound") >= 2.0, "{}", pods.logs());
    // A port declared HTTP takes HTTP only, also inside mesh mTLS: bytes that are not HTTP
    // (opaque to the client's sidecar, so sent as `weft-tcp`) never reach the app raw.
    let (ok, out) = pods.tcp("cli", DB_VIP, 8080, false, 1);
    assert!(!ok, "non-HTTP bytes reached a port declared HTTP: {out}");
    assert!(
        pods.metric(
            "db",
            "weft_proxy_inbound_refused_total",
            &["reason=\"not-http\""]
        ) >= 1.0,
        "{}",
        pods.logs()
    );
    // A host without a sidecar dialling the pod directly: plaintext, refused by STRICT.
    let (ok, out) = pods.tcp("cp", "198.18.0.2", 5432, false, 1);
    assert!(!ok, "plaintext reached a STRICT TCP endpoint: {out}");

    // A long-lived allowed connection, then a DENY on 5432 naming the client's principal.
    let client_log = pods.dir.join("long-client.log");
    let (script, cli_ns) = (netns_script("tcp_client.py"), pods.ns("cli"));
    pods.lab.spawn(
        "long-client",
        &cli_ns,
        &[
            "python3",
            &script,
            DB_VIP,
            "5432",
            "--count",
            "0",
            "--interval",
            "0.1",
            "--duration",
            "40",
        ],
        Some(&client_log),
    );
    let read_log = || std::fs::read_to_string(&client_log).unwrap_or_default();
    eventually("the long-lived connection echoes", patience, || {
        read_log().contains("ok 5")
    });
    std::fs::write(world_dir.join("deny.yaml"), DENY_CLIENT).expect("policy");
    eventually("the DENY closes the open connection", patience, || {
        read_log().contains("closed")
    });
    let (ok, out) = pods.tcp("cli", DB_VIP, 5432, false, 1);
    assert!(!ok, "a new connection passed the DENY: {out}");
    // The DENY is on 5432 only: the server-first port still serves the same caller.
    let (ok, out) = pods.tcp("cli", DB_VIP, 3306, true, 1);
    assert!(ok, "3306 after the DENY: {out}\n{}", pods.logs());
    assert!(
        pods.metric("db", "weft_authz_denied_total", &["policy=\"deny-client\""]) >= 1.0,
        "{}",
        pods.logs()
    );
    assert!(
        pods.metric(
            "db",
            "weft_proxy_connections_closed_total",
            &["reason=\"authz-revoked\""]
        ) >= 1.0,
        "{}",
        pods.logs()
    );
}
