//! The mesh DNS for real, in two network namespaces this test creates (a client pod and a
//! server pod joined by a veth pair on 198.18.3.0/24, never connected to the host's network):
//! the client pod's resolv.conf names a resolver in the server pod (a stand-in that knows one
//! outside name and answers NXDOMAIN for the rest); `weft-sidecar init --redirect-dns-port`
//! sends the pod's port 53 to the sidecar's mesh DNS. An unmodified client (`getent`, `curl`)
//! then resolves `echo.default.svc.clusterset.local` to its clusterset VIP and reaches the
//! Service at it through the sidecar, while outside names still come from the original
//! resolver, which never hears of the mesh names.
//!
//! Needs root, `ip`, `iptables`, `curl`, `getent`, `setpriv`, `python3` and the built
//! binaries; without them it prints `SKIP` and why. Everything it creates (namespaces, their
//! rules, `/etc/netns/<ns>`) is removed on exit, also on failure.

use std::time::Duration;

use weft_e2e::lab::{Lab, PROXY_UID, bin, eventually, missing_prerequisite, ok, sh};

#[test]
fn an_unmodified_client_resolves_clusterset_names_through_the_mesh_dns() {
    let test = "an_unmodified_client_resolves_clusterset_names_through_the_mesh_dns";
    if let Some(why) = missing_prerequisite(
        &["ip", "iptables", "curl", "getent", "setpriv", "python3"],
        &["weft-control-plane", "weft-sidecar"],
    ) {
        println!("SKIP {test}: {why}");
        return;
    }
    let id = std::process::id();
    let (cli, srv) = (format!("weft-{id}-dnscli"), format!("weft-{id}-dnssrv"));
    let (va, vb) = (format!("da{id}"), format!("db{id}"));
    let mut lab = Lab::default();
    lab.namespace(&cli);
    lab.namespace(&srv);
    lab.veth((&cli, &va, "198.18.3.1/24"), (&srv, &vb, "198.18.3.2/24"));
    // Clusterset VIPs route somewhere, as a pod's default route makes them (no host has one:
    // the interception rules redirect every connection to them).
    ok(&[
        "ip",
        "-n",
        &cli,
        "route",
        "add",
        "198.19.250.0/24",
        "dev",
        &va,
    ]);
    lab.resolv_conf(&cli, "nameserver 198.18.3.2\n");

    let web = tempfile::tempdir().expect("tempdir");
    std::fs::write(web.path().join("index.html"), "srv-pod\n").expect("write");
    lab.web("web", &srv, "198.18.3.2", 8080, web.path());
    let logs = tempfile::tempdir().expect("tempdir");
    let resolver_log = logs.path().join("resolver.log");
    let resolver = concat!(env!("CARGO_MANIFEST_DIR"), "/dns/resolver.py");
    lab.spawn(
        "resolver",
        &srv,
        &[
            "python3",
            resolver,
            "198.18.3.2",
            "53",
            "outside.test=198.18.3.2",
        ],
        Some(&resolver_log),
    );

    let world = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        world.path().join("world.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: default}\nspec:\n  clusterIP: 198.18.3.10\n  ports: [{name: http, port: 80}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: default\n  labels: {kubernetes.io/service-name: echo}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [\"198.18.3.2\"]\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: echo, namespace: default}\n",
    )
    .expect("write");
    let world_dir = world.path().to_string_lossy().into_owned();
    let cp = bin("weft-control-plane").to_string_lossy().into_owned();
    let sidecar = bin("weft-sidecar").to_string_lossy().into_owned();
    lab.spawn(
        "control-plane",
        &cli,
        &[
            &cp,
            "--source-dir",
            &world_dir,
            "--xds-plaintext-addr",
            "127.0.0.1:15010",
            "--grpc-addr",
            "127.0.0.1:15012",
            "--metrics-addr",
            "127.0.0.1:15014",
            "--clusterset-vip-range",
            "198.19.250.0/24",
        ],
        None,
    );
    ok(&[
        "ip",
        "netns",
        "exec",
        &cli,
        &sidecar,
        "init",
        "--redirect-dns-port",
        "15053",
    ]);
    let rules = ok(&["ip", "netns", "exec", &cli, "iptables", "-t", "nat", "-S"]);
    assert!(
        rules.contains("-p udp -m udp --dport 53 -j REDIRECT --to-ports 15053"),
        "{rules}"
    );
    lab.spawn(
        "sidecar",
        &cli,
        &[
            &PROXY_UID[..],
            &[
                &sidecar,
                "run",
                "--plaintext-xds",
                "--xds-addr",
                "127.0.0.1:15010",
                "--node-id",
                "pod-a",
                "--admin-addr",
                "127.0.0.1:15000",
                "--dns-addr",
                "127.0.0.1:15053",
            ],
        ]
        .concat(),
        Some(&logs.path().join("sidecar.log")),
    );
    let in_pod = |args: &[&str]| sh(&[&["ip", "netns", "exec", &cli], args].concat());
    let text = |o: std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    eventually("sidecar ready", Duration::from_secs(15), || {
        text(in_pod(&[
            "curl",
            "-s",
            "-m",
            "2",
            "http://127.0.0.1:15000/ready",
        ]))
        .contains("ready")
    });
    let resolve = |name: &str| -> Option<String> {
        let out = in_pod(&["timeout", "5", "getent", "ahostsv4", name]);
        text(out).split_whitespace().next().map(str::to_string)
    };
    let diagnose = || {
        format!(
            "resolver log:\n{}\nsidecar log:\n{}",
            std::fs::read_to_string(&resolver_log).unwrap_or_default(),
            std::fs::read_to_string(logs.path().join("sidecar.log")).unwrap_or_default()
        )
    };

    // The clusterset name has a VIP from the control plane's range; the cluster name its
    // clusterIP. Both from the mesh DNS: the original resolver never hears of them.
    let mut vip = None;
    eventually(
        "the clusterset name resolves",
        Duration::from_secs(15),
        || {
            vip = resolve("echo.default.svc.clusterset.local");
            vip.is_some()
        },
    );
    let vip = vip.unwrap_or_default();
    assert!(vip.starts_with("198.19.250."), "{vip}\n{}", diagnose());
    assert_eq!(
        resolve("echo.default.svc.cluster.local").as_deref(),
        Some("198.18.3.10"),
        "{}",
        diagnose()
    );
    // An outside name: forwarded to the pod's resolver, its answer unchanged.
    assert_eq!(
        resolve("outside.test").as_deref(),
        Some("198.18.3.2"),
        "{}",
        diagnose()
    );
    assert_eq!(resolve("nowhere.test"), None, "NXDOMAIN passes through");
    let asked = std::fs::read_to_string(&resolver_log).unwrap_or_default();
    assert!(asked.contains("asked outside.test"), "{}", diagnose());
    assert!(
        !asked.contains("svc.clusterset.local") && !asked.contains("svc.cluster.local"),
        "mesh names leaked to the original resolver:\n{asked}"
    );

    // An unmodified HTTP client by name: resolved through the mesh DNS, dialed at the VIP,
    // intercepted and routed to the Service.
    let out = in_pod(&[
        "curl",
        "-s",
        "-m",
        "5",
        "http://echo.default.svc.clusterset.local/",
    ]);
    assert_eq!(
        text(out),
        "srv-pod\n",
        "the Service by its clusterset name\n{}",
        diagnose()
    );
    let metrics = text(in_pod(&[
        "curl",
        "-s",
        "-m",
        "2",
        "http://127.0.0.1:15000/metrics",
    ]));
    let count = |answer: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("weft_proxy_dns_queries_total")
                    && l.contains(&format!("answer=\"{answer}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(count("mesh") >= 3.0, "{metrics}");
    assert!(count("forwarded") >= 2.0, "{metrics}");

    // Uninstall removes the DNS redirection with the rest.
    ok(&["ip", "netns", "exec", &cli, &sidecar, "init", "--uninstall"]);
    let after = ok(&["ip", "netns", "exec", &cli, "iptables", "-t", "nat", "-S"]);
    assert!(
        !after.contains("WEFT") && !after.contains("--dport 53"),
        "{after}"
    );
}
