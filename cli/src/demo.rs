//! `weftctl demo`: the mesh on loopback, in one process — two clusters, `east` and `west`,
//! each with its own control plane on the file source, federated over mTLS (one shared root,
//! an intermediate each); sample echo services in two zones of `east` (a 90/10 canary split)
//! and one zone of `west`; three client sidecars (two in `east`, one in `west`) and a bounded
//! load generator, with a live view of where requests go.
//!
//! `east` exports `echo-v1`, `west` exports its own `echo-v1`; a TrafficPolicy lets each
//! cluster fail over to the other's endpoints. Addresses: east's echo pods on
//! 127.0.10.{1,2,3}:8080, west's on 127.0.11.1:8080; client sidecars on 127.0.20.{1,2,3}
//! (outbound 15001, inbound 15006, admin 15000); east's control plane serves its TLS port on
//! `--grpc-addr` (default 127.0.0.1:15012, what `weftctl` asks by default) and plaintext ADS
//! for the demo's sidecars on `--xds-addr` (127.0.0.1:15010); west's on 15022 and 15020. The
//! demo writes operator credentials (`<dir>/credentials.pem`) for `weftctl --credentials`.
//! Ctrl-C stops everything it started.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_testkit::echo::{Echo, Identity};
use weft_testkit::world;

/// `weftctl demo` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Directory for the demo's worlds (`east/world.yaml`, `west/world.yaml`: YAML you can edit
    /// while it runs) and CAs; default: a new temp dir.
    #[arg(long, env = "WEFT_DEMO_DIR")]
    pub dir: Option<PathBuf>,
    /// East's control plane plaintext ADS address (the demo's sidecars).
    #[arg(long, env = "WEFT_DEMO_XDS_ADDR", default_value = "127.0.0.1:15010")]
    pub xds_addr: SocketAddr,
    /// East's control plane TLS gRPC address (weftctl, federation).
    #[arg(long, env = "WEFT_DEMO_GRPC_ADDR", default_value = "127.0.0.1:15012")]
    pub grpc_addr: SocketAddr,
    /// West's control plane TLS gRPC address.
    #[arg(
        long,
        env = "WEFT_DEMO_WEST_GRPC_ADDR",
        default_value = "127.0.0.1:15022"
    )]
    pub west_grpc_addr: SocketAddr,
    /// East's control plane metrics address.
    #[arg(
        long,
        env = "WEFT_DEMO_METRICS_ADDR",
        default_value = "127.0.0.1:15014"
    )]
    pub metrics_addr: SocketAddr,
    /// West's control plane plaintext ADS address.
    #[arg(
        long,
        env = "WEFT_DEMO_WEST_XDS_ADDR",
        default_value = "127.0.0.1:15020"
    )]
    pub west_xds_addr: SocketAddr,
    /// West's control plane metrics address.
    #[arg(
        long,
        env = "WEFT_DEMO_WEST_METRICS_ADDR",
        default_value = "127.0.0.1:15024"
    )]
    pub west_metrics_addr: SocketAddr,
    /// Stop after this many seconds (0: run until Ctrl-C).
    #[arg(long, env = "WEFT_DEMO_DURATION", default_value_t = 0)]
    pub duration: u64,
    /// Requests per second each client sends.
    #[arg(long, env = "WEFT_DEMO_RATE", default_value_t = 20)]
    pub rate: u32,
    /// Seconds between two refreshes of the live view.
    #[arg(long, env = "WEFT_DEMO_REFRESH", default_value_t = 2)]
    pub refresh: u64,
}

const ECHO_PORT: u16 = 8080;

struct Pod {
    name: &'static str,
    service: &'static str,
    cluster: &'static str,
    ip: [u8; 4],
    node: &'static str,
    zone: &'static str,
}

const PODS: [Pod; 4] = [
    Pod {
        name: "echo-v1-a",
        service: "echo-v1",
        cluster: "east",
        ip: [127, 0, 10, 1],
        node: "node-a",
        zone: "zone-a",
    },
    Pod {
        name: "echo-v1-b",
        service: "echo-v1",
        cluster: "east",
        ip: [127, 0, 10, 2],
        node: "node-b",
        zone: "zone-b",
    },
    Pod {
        name: "echo-v2-a",
        service: "echo-v2",
        cluster: "east",
        ip: [127, 0, 10, 3],
        node: "node-a",
        zone: "zone-a",
    },
    Pod {
        name: "echo-v1-c",
        service: "echo-v1",
        cluster: "west",
        ip: [127, 0, 11, 1],
        node: "node-c",
        zone: "zone-c",
    },
];

/// A client sidecar of the demo.
struct Client {
    name: &'static str,
    cluster: &'static str,
    region: &'static str,
    zone: &'static str,
    ip: [u8; 4],
    /// The host it calls.
    host: &'static str,
}

const CLIENTS: [Client; 3] = [
    Client {
        name: "client-a",
        cluster: "east",
        region: "region-1",
        zone: "zone-a",
        ip: [127, 0, 20, 1],
        host: "echo.default.svc.cluster.local",
    },
    Client {
        name: "client-b",
        cluster: "east",
        region: "region-1",
        zone: "zone-b",
        ip: [127, 0, 20, 2],
        host: "echo.default.svc.cluster.local",
    },
    Client {
        name: "client-c",
        cluster: "west",
        region: "region-2",
        zone: "zone-c",
        ip: [127, 0, 20, 3],
        host: "echo-v1.default.svc.cluster.local",
    },
];

fn pod_addr(p: &Pod) -> SocketAddr {
    SocketAddr::from((p.ip, ECHO_PORT))
}

fn slices(cluster: &str) -> Vec<String> {
    let mut docs = Vec::new();
    for svc in ["echo-v1", "echo-v2"] {
        let eps: Vec<(SocketAddr, &str, bool)> = PODS
            .iter()
            .filter(|p| p.service == svc && p.cluster == cluster)
            .map(|p| (pod_addr(p), p.node, true))
            .collect();
        if eps.is_empty() {
            continue;
        }
        docs.push(world::service(svc, 80));
        docs.push(world::slice(svc, svc, &eps));
    }
    docs
}

fn east_world() -> String {
    let mut docs = vec![
        "# East's world: edit it while the demo runs (split weights; `ready: false` on both\n\
         # echo-v1 endpoints sends echo-v1's traffic to west).\n"
            .to_string()
            + &world::node("node-a", "region-1", "zone-a"),
        world::node("node-b", "region-1", "zone-b"),
        world::service("echo", 80),
    ];
    docs.extend(slices("east"));
    docs.push(world::split(
        "echo-canary",
        "echo",
        &[("echo-v1", 90), ("echo-v2", 10)],
    ));
    docs.push(world::export("echo-v1"));
    docs.push(world::cross_cluster_policy("echo-v1"));
    world::docs(&docs)
}

fn west_world() -> String {
    let mut docs = vec![
        "# West's world: edit it while the demo runs.\n".to_string()
            + &world::node("node-c", "region-2", "zone-c"),
    ];
    docs.extend(slices("west"));
    docs.push(world::export("echo-v1"));
    docs.push(world::cross_cluster_policy("echo-v1"));
    world::docs(&docs)
}

/// Starts one cluster's control plane over `dir/<cluster>` with its CA in `dir/ca-<cluster>`.
async fn control_plane(
    dir: &Path,
    cluster: &str,
    (xds, grpc, metrics): (SocketAddr, SocketAddr, SocketAddr),
    peers: Vec<(String, String)>,
) -> anyhow::Result<weft_control_plane::ControlPlane> {
    let mut cfg = weft_control_plane::Config::local(dir.join(cluster));
    cfg.cluster_name = cluster.into();
    cfg.ca_dir = Some(dir.join(format!("ca-{cluster}")));
    cfg.xds_plaintext_addr = Some(xds);
    cfg.grpc_addr = grpc;
    cfg.metrics_addr = metrics;
    cfg.replica = Some(format!("demo-{cluster}"));
    cfg.peers = peers;
    cfg.federation_heartbeat = Duration::from_secs(1);
    cfg.federation_timeout = Duration::from_secs(3);
    cfg.peer_grace = Duration::from_secs(30);
    Ok(weft_control_plane::ControlPlane::start(cfg).await?)
}

struct Window {
    ok: u64,
    failed: u64,
    latency: Option<hdrhistogram::Histogram<u64>>,
}

type Stats = Arc<Mutex<BTreeMap<(String, String), Window>>>;

fn record(stats: &Stats, client: &str, upstream: String, ok: bool, micros: u64) {
    let mut s = match stats.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    let w = s
        .entry((client.to_string(), upstream))
        .or_insert_with(|| Window {
            ok: 0,
            failed: 0,
            latency: hdrhistogram::Histogram::new(3).ok(),
        });
    if ok {
        w.ok += 1;
    } else {
        w.failed += 1;
    }
    if let Some(h) = w.latency.as_mut() {
        let _ = h.record(micros);
    }
}

/// Runs the demo; returns the process exit code.
pub async fn run(args: DemoArgs) -> anyhow::Result<i32> {
    // A directory the demo made itself is removed when it stops; one the user named is kept.
    let mut own_dir = None;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            let t = tempfile::Builder::new().prefix("weft-demo-").tempdir()?;
            let path = t.path().to_path_buf();
            own_dir = Some(t);
            path
        }
    };
    for c in ["east", "west"] {
        std::fs::create_dir_all(dir.join(c))?;
    }
    let (east_file, west_file) = (dir.join("east/world.yaml"), dir.join("west/world.yaml"));
    std::fs::write(&east_file, east_world())?;
    std::fs::write(&west_file, west_world())?;
    // One root for both clusters (kept when the user's directory already has one).
    if !dir.join("ca-east/root.pem").exists() {
        weft_testkit::shared_root_ca_dirs(&dir, &["east", "west"])
            .map_err(|e| anyhow::anyhow!("making the demo's CA in {}: {e}", dir.display()))?;
    }

    let mut echoes: Vec<Echo> = Vec::new();
    for p in &PODS {
        let who = Identity {
            name: p.name.into(),
            cluster: p.cluster.into(),
            zone: p.zone.into(),
        };
        echoes.push(
            Echo::start(pod_addr(p), who)
                .await
                .map_err(|e| anyhow::anyhow!("sample pod {} on {}: {e}", p.name, pod_addr(p)))?,
        );
    }
    let east = control_plane(
        &dir,
        "east",
        (args.xds_addr, args.grpc_addr, args.metrics_addr),
        Vec::new(),
    )
    .await?;
    let west = control_plane(
        &dir,
        "west",
        (
            args.west_xds_addr,
            args.west_grpc_addr,
            args.west_metrics_addr,
        ),
        vec![("east".into(), east.grpc_addr.to_string())],
    )
    .await?;
    // Operator credentials for weftctl: one file for both clusters, signed by the root.
    let credentials = dir.join("credentials.pem");
    weft_control_plane::identity::Ca::root_signer(&dir.join("root"))?
        .issue_operator("cluster.local", "demo", Duration::from_secs(24 * 3600))?
        .write(&credentials)?;
    // East learns of west from an object in its source, as a MeshPeer would arrive.
    std::fs::write(
        dir.join("east/peers.yaml"),
        world::mesh_peer("west", &west.grpc_addr.to_string()),
    )?;
    let (east_xds, west_xds) = (east.plaintext(), west.plaintext());

    let mut sidecars = Vec::new();
    for c in &CLIENTS {
        let ip = IpAddr::from(c.ip);
        let xds = if c.cluster == "east" {
            east_xds
        } else {
            west_xds
        };
        let mut rc = weft_sidecar::RunConfig::local(xds, ip, c.name);
        rc.outbound_addr = SocketAddr::new(ip, 15001);
        rc.inbound_addr = SocketAddr::new(ip, 15006);
        rc.admin_addr = SocketAddr::new(ip, 15000);
        rc.cluster = c.cluster.into();
        rc.region = c.region.into();
        rc.zone = c.zone.into();
        sidecars.push(weft_sidecar::Sidecar::start(rc).await?);
    }
    for s in &sidecars {
        let mut ready = s.xds.ready.clone();
        tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
            .await
            .map_err(|_| anyhow::anyhow!("sidecars got no config within 10 s"))??;
    }
    // Both directions of the federation synced (bounded: the live view shows it anyway).
    let synced = |cp: &weft_control_plane::ControlPlane, peer: &str| {
        cp.peers
            .snapshot()
            .get(peer)
            .is_some_and(|p| p.state == weft_control_plane::federation::LinkState::Synced)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(synced(&east, "west") && synced(&west, "east")) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    println!("Weft demo running: two clusters, east and west, federated over mTLS.");
    for (name, cp) in [("east", &east), ("west", &west)] {
        println!(
            "  {name} control plane  grpc {} (TLS: weftctl, federation)  ads {} (plaintext)  metrics http://{}/metrics",
            cp.grpc_addr,
            cp.plaintext(),
            cp.metrics_addr
        );
    }
    for s in &sidecars {
        println!(
            "  sidecar         outbound {}  admin http://{}/config_dump",
            s.outbound_addr, s.admin_addr
        );
    }
    println!(
        "  credentials     {}  (weftctl --credentials, or WEFT_CREDENTIALS)",
        credentials.display()
    );
    println!("  east world      {}", east_file.display());
    println!("  west world      {}", west_file.display());
    println!();
    println!("Try next, in another terminal:");
    let east_cp = east.grpc_addr;
    println!("  export WEFT_CREDENTIALS={}", credentials.display());
    println!("  weftctl status --cp {east_cp}            # every proxy SYNCED?");
    println!("  weftctl peers --cp {east_cp}             # federation: west SYNCED?");
    println!(
        "  weftctl endpoints echo-v1 --cp {east_cp} --proxy client-a   # east first, then west"
    );
    println!("  weftctl proxy-config client-a endpoints --cp {east_cp}");
    println!(
        "  curl -H 'Host: echo.default.svc.cluster.local' http://{}/",
        sidecars[0].outbound_addr
    );
    println!(
        "  edit {}: set the split to 50/50, or `ready: false` on both echo-v1 endpoints (failover to west)",
        east_file.display()
    );
    println!();

    let stats: Stats = Arc::default();
    let mut load = Vec::new();
    for (s, c) in sidecars.iter().zip(&CLIENTS) {
        let (proxy, stats, rate) = (s.outbound_addr, stats.clone(), args.rate.max(1));
        let host = c.host;
        let service = host.split('.').next().unwrap_or(host);
        let name = format!("{} -> {service}", c.name);
        load.push(tokio::spawn(async move {
            let name = name.as_str();
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
            loop {
                tick.tick().await;
                let started = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(2),
                    weft_testkit::get_via(proxy, host, "/"),
                )
                .await;
                let micros = started.elapsed().as_micros() as u64;
                match r {
                    Ok(Ok((200, body))) => {
                        // `<pod> <cluster> <zone>`
                        let mut w = body.split_whitespace();
                        let upstream = format!(
                            "{} {}/{}",
                            w.next().unwrap_or("?"),
                            w.next().unwrap_or("?"),
                            w.next().unwrap_or("?")
                        );
                        record(&stats, name, upstream, true, micros);
                    }
                    Ok(Ok((status, _))) => {
                        record(&stats, name, format!("HTTP {status}"), false, micros)
                    }
                    Ok(Err(e)) => record(&stats, name, format!("error: {e}"), false, micros),
                    Err(_) => record(&stats, name, "timeout".into(), false, micros),
                }
            }
        }));
    }

    let deadline = (args.duration > 0)
        .then(|| tokio::time::Instant::now() + Duration::from_secs(args.duration));
    let mut refresh = tokio::time::interval(Duration::from_secs(args.refresh.max(1)));
    refresh.tick().await;
    let tty = std::io::stdout().is_terminal();
    let peers_line = || {
        let state = |cp: &weft_control_plane::ControlPlane, peer: &str| {
            cp.peers
                .snapshot()
                .get(peer)
                .map_or("unknown", |p| p.state.as_str())
        };
        format!(
            "Federation: east sees west {}, west sees east {}",
            state(&east, "west"),
            state(&west, "east")
        )
    };
    loop {
        let stop = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = refresh.tick() => print_view(&stats, tty, &peers_line()),
            _ = tokio::signal::ctrl_c() => break,
            _ = stop => break,
        }
    }
    print_view(&stats, tty, &peers_line());
    for t in &load {
        t.abort();
    }
    drop(sidecars);
    drop(west);
    drop(east);
    drop(echoes);
    match own_dir {
        Some(t) => {
            drop(t);
            println!(
                "Demo stopped: every listener it opened is closed and {} is removed.",
                dir.display()
            );
        }
        None => println!(
            "Demo stopped: every listener it opened is closed; the worlds stay in {}.",
            dir.display()
        ),
    }
    Ok(0)
}

fn print_view(stats: &Stats, tty: bool, federation: &str) {
    let window = {
        let mut s = match stats.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        std::mem::take(&mut *s)
    };
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    for ((client, _), w) in &window {
        *totals.entry(client.clone()).or_default() += w.ok + w.failed;
    }
    let rows: Vec<Vec<String>> = window
        .iter()
        .map(|((client, upstream), w)| {
            let n = w.ok + w.failed;
            let share = 100.0 * n as f64 / totals.get(client).copied().unwrap_or(1).max(1) as f64;
            let p99 = w
                .latency
                .as_ref()
                .map_or(0.0, |h| h.value_at_quantile(0.99) as f64 / 1000.0);
            vec![
                client.clone(),
                upstream.clone(),
                n.to_string(),
                format!("{share:.0}%"),
                format!("{:.1}%", 100.0 * w.ok as f64 / n.max(1) as f64),
                format!("{p99:.2}"),
            ]
        })
        .collect();
    let mut out = String::new();
    if tty {
        out.push_str("\x1b[2J\x1b[H");
    }
    out.push_str(federation);
    out.push_str("\nWhere requests went (last window):\n");
    out.push_str(&crate::output::table(
        &[
            "CLIENT -> SERVICE",
            "UPSTREAM (POD CLUSTER/ZONE)",
            "REQUESTS",
            "SHARE",
            "SUCCESS",
            "P99_MS",
        ],
        &rows,
    ));
    print!("{out}");
    let _ = std::io::stdout().flush();
}
