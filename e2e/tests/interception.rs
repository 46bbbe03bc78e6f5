//! Transparent interception for real: in two network namespaces this test creates (a client
//! pod and a server pod joined by a veth pair, addresses in 198.18.0.0/24, never connected to
//! the host's network), `weft-sidecar init` installs the iptables rules, `weft-sidecar run`
//! runs as the proxy UID, and an unmodified client (`curl`) that dials a Service's clusterIP
//! reaches the server pod through the sidecar. A pod IP the mesh does not know passes
//! through to its original destination. `init` is idempotent and `--uninstall` leaves nothing.
//!
//! Needs root, `ip`, `iptables`, `curl`, `setpriv`, `python3` and the built binaries; without
//! them it prints `SKIP` and why. Everything it creates is removed on exit, also on failure.

use std::time::Duration;

use weft_e2e::lab::{Lab, PROXY_UID, bin, eventually, missing_prerequisite, ok, sh};

#[test]
fn unmodified_client_is_intercepted_in_a_network_namespace() {
    if let Some(why) = missing_prerequisite(
        &["ip", "iptables", "curl", "setpriv", "python3"],
        &["weft-control-plane", "weft-sidecar"],
    ) {
        println!("SKIP unmodified_client_is_intercepted_in_a_network_namespace: {why}");
        return;
    }
    let id = std::process::id();
    let (cli, srv) = (format!("weft-{id}-cli"), format!("weft-{id}-srv"));
    let (va, vb) = (format!("wa{id}"), format!("wb{id}"));
    // A host only the client pod reaches (what a metadata server or a database is to a pod).
    let meta = format!("weft-{id}-meta");
    let (vc, vd) = (format!("wc{id}"), format!("wd{id}"));
    let mut lab = Lab::default();
    lab.namespace(&cli);
    lab.namespace(&srv);
    lab.namespace(&meta);
    ok(&[
        "ip", "link", "add", &vc, "type", "veth", "peer", "name", &vd,
    ]);
    ok(&["ip", "link", "set", &vc, "netns", &cli]);
    ok(&["ip", "link", "set", &vd, "netns", &meta]);
    ok(&["ip", "-n", &cli, "addr", "add", "198.18.1.1/24", "dev", &vc]);
    ok(&[
        "ip",
        "-n",
        &meta,
        "addr",
        "add",
        "198.18.1.2/24",
        "dev",
        &vd,
    ]);
    ok(&["ip", "-n", &cli, "link", "set", &vc, "up"]);
    ok(&["ip", "-n", &meta, "link", "set", &vd, "up"]);
    ok(&[
        "ip", "link", "add", &va, "type", "veth", "peer", "name", &vb,
    ]);
    ok(&["ip", "link", "set", &va, "netns", &cli]);
    ok(&["ip", "link", "set", &vb, "netns", &srv]);
    ok(&["ip", "-n", &cli, "addr", "add", "198.18.0.1/24", "dev", &va]);
    ok(&["ip", "-n", &srv, "addr", "add", "198.18.0.2/24", "dev", &vb]);
    // IPv6 too (2001:2::/48, the IPv6 benchmarking range): a dual-stack pod.
    ok(&[
        "ip",
        "-n",
        &cli,
        "-6",
        "addr",
        "add",
        "2001:2::1/64",
        "dev",
        &va,
        "nodad",
    ]);
    ok(&[
        "ip",
        "-n",
        &srv,
        "-6",
        "addr",
        "add",
        "2001:2::2/64",
        "dev",
        &vb,
        "nodad",
    ]);
    for (ns, dev) in [(&cli, &va), (&srv, &vb)] {
        ok(&["ip", "-n", ns, "link", "set", dev, "up"]);
        ok(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }

    // The server pod: a plain HTTP server that says who it is.
    let web = tempfile::tempdir().expect("tempdir");
    std::fs::write(web.path().join("index.html"), "srv-pod\n").expect("write");
    let web_dir = web.path().to_string_lossy().into_owned();
    lab.spawn(
        "web",
        &srv,
        &[
            "python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            "198.18.0.2",
            "--directory",
            &web_dir,
        ],
        None,
    );
    let secret = tempfile::tempdir().expect("tempdir");
    std::fs::write(secret.path().join("index.html"), "metadata-secret\n").expect("write");
    let secret_dir = secret.path().to_string_lossy().into_owned();
    lab.spawn(
        "meta-web",
        &meta,
        &[
            "python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            "198.18.1.2",
            "--directory",
            &secret_dir,
        ],
        None,
    );
    lab.spawn(
        "web-strict",
        &srv,
        &[
            "python3",
            "-m",
            "http.server",
            "9090",
            "--bind",
            "198.18.0.2",
            "--directory",
            &web_dir,
        ],
        None,
    );
    lab.spawn(
        "web6",
        &srv,
        &[
            "python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            "2001:2::2",
            "--directory",
            &web_dir,
        ],
        None,
    );

    // The world: Service echo at clusterIP 198.18.0.10:80 -> the server pod's 8080.
    let world = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        world.path().join("world.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: default}\nspec:\n  clusterIP: 198.18.0.10\n  ports: [{name: http, port: 80}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: default\n  labels: {kubernetes.io/service-name: echo}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [\"198.18.0.2\"]\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: secure\n  annotations: {weft.dev/mtls-mode: STRICT}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: vault-0\n  namespace: secure\n  labels: {weft.dev/tls-mode: weft}\nspec:\n  serviceAccountName: vault\n  containers: [{name: app, image: vault}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: vault, namespace: secure}\nspec:\n  ports: [{name: http, port: 80, appProtocol: http}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: vault-1\n  namespace: secure\n  labels: {kubernetes.io/service-name: vault}\naddressType: IPv4\nports: [{name: http, port: 9090}]\nendpoints:\n- addresses: [\"198.18.0.2\"]\n  targetRef: {kind: Pod, name: vault-0, namespace: secure}\n",
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
        ],
        None,
    );

    // Interception rules, twice: the second run must leave the same rules.
    ok(&["ip", "netns", "exec", &cli, &sidecar, "init"]);
    let rules = ok(&["ip", "netns", "exec", &cli, "iptables", "-t", "nat", "-S"]);
    ok(&["ip", "netns", "exec", &cli, &sidecar, "init"]);
    assert_eq!(
        ok(&["ip", "netns", "exec", &cli, "iptables", "-t", "nat", "-S"]),
        rules,
        "init is idempotent"
    );
    assert!(rules.contains("--uid-owner 1337 -j RETURN"), "{rules}");
    assert!(rules.contains("REDIRECT --to-ports 15001"), "{rules}");
    // The same rules for IPv6: no dual-stack bypass.
    let rules6 = ok(&["ip", "netns", "exec", &cli, "ip6tables", "-t", "nat", "-S"]);
    assert!(rules6.contains("--uid-owner 1337 -j RETURN"), "{rules6}");
    assert!(rules6.contains("-d ::1/128 -j RETURN"), "{rules6}");
    assert!(rules6.contains("REDIRECT --to-ports 15001"), "{rules6}");
    assert!(rules6.contains("REDIRECT --to-ports 15006"), "{rules6}");

    // The sidecar, as the proxy UID so its own connections are not intercepted.
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
            ],
        ]
        .concat(),
        None,
    );
    // curl inside a namespace, bounded to 5 s.
    let curl_in = |ns: &str, args: &[&str]| {
        sh(&[&["ip", "netns", "exec", ns, "curl", "-s", "-m", "5"], args].concat())
    };
    let curl = |url: &str| curl_in(&cli, &[url]);
    eventually("sidecar ready", Duration::from_secs(15), || {
        String::from_utf8_lossy(&curl("http://127.0.0.1:15000/ready").stdout).contains("ready")
    });

    // An unmodified client dials the clusterIP (no host has it): the sidecar routes it.
    let out = curl("http://198.18.0.10/");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "srv-pod\n");
    // A pod IP the mesh has no Service for passes through to where it was going.
    let out = curl("http://198.18.0.2:8080/");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "srv-pod\n");
    let metrics =
        String::from_utf8_lossy(&curl("http://127.0.0.1:15000/metrics").stdout).into_owned();
    let counted = |cluster: &str| {
        metrics.lines().any(|l| {
            l.starts_with("weft_proxy_requests_total")
                && l.contains(&format!("cluster=\"{cluster}\""))
                && l.contains("code=\"200\"")
        })
    };
    assert!(
        counted("echo.default.svc.cluster.local:80"),
        "the Service request crossed the sidecar:\n{metrics}"
    );
    assert!(
        counted("passthrough"),
        "the pod-IP request crossed the sidecar:\n{metrics}"
    );

    // IPv6: the unmodified client's connection to the server pod's IPv6 address crosses the
    // sidecar too (before, ip6tables had no rules and IPv6 skipped the proxy).
    let passthrough = |m: &str| {
        weft_testkit::metric_sum(m, "weft_proxy_requests_total", &["cluster=\"passthrough\""])
    };
    let before = passthrough(&String::from_utf8_lossy(
        &curl("http://127.0.0.1:15000/metrics").stdout,
    ));
    let out = curl("http://[2001:2::2]:8080/");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "srv-pod\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = passthrough(&String::from_utf8_lossy(
        &curl("http://127.0.0.1:15000/metrics").stdout,
    ));
    assert_eq!(after, before + 1.0, "the IPv6 request crossed the sidecar");

    // A meshed endpoint of a STRICT namespace called by its pod IP (not through its Service):
    // the client sidecar has no identity, so nothing may go plaintext — 503 with the reason.
    let out = curl("http://198.18.0.2:9090/");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("srv-pod"),
        "plaintext reached a STRICT meshed endpoint by address"
    );
    let out = curl_in(
        &cli,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://198.18.0.2:9090/",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "503");

    // An attacker next to the pod routes a packet for the host only the pod reaches through
    // the pod: it is not addressed to the pod, so it is not redirected, and the proxy never
    // dials it on the attacker's behalf (before, PREROUTING sent it to inbound, which did).
    ok(&[
        "ip",
        "-n",
        &srv,
        "route",
        "add",
        "198.18.1.0/24",
        "via",
        "198.18.0.1",
    ]);
    let out = curl_in(&srv, &["http://198.18.1.2:8080/"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("metadata-secret"),
        "a neighbour reached the pod's private host through its proxy"
    );

    // An attacker on another host dials the pod's own proxy ports to borrow its identity
    // (podIP:15001 would be redirected to inbound and, before, proxied out as this pod) or
    // to read its admin: nothing answers. Inbound counts the refusal.
    for port in [15001, 15000] {
        let url = format!("http://198.18.0.1:{port}/");
        let out = curl_in(&srv, &["-H", "Host: echo", &url]);
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("srv-pod"),
            "a remote caller went out through {url} as this pod"
        );
        assert!(!out.status.success(), "{url} answered a remote caller");
    }
    let metrics =
        String::from_utf8_lossy(&curl("http://127.0.0.1:15000/metrics").stdout).into_owned();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("weft_proxy_inbound_refused_total") && l.contains("own-port")),
        "the own-port refusal is counted:\n{metrics}"
    );

    // Uninstall leaves no Weft rule behind.
    ok(&["ip", "netns", "exec", &cli, &sidecar, "init", "--uninstall"]);
    let after = ok(&["ip", "netns", "exec", &cli, "iptables", "-t", "nat", "-S"]);
    assert!(!after.contains("WEFT"), "{after}");
    let after6 = ok(&["ip", "netns", "exec", &cli, "ip6tables", "-t", "nat", "-S"]);
    assert!(!after6.contains("WEFT"), "{after6}");
}
