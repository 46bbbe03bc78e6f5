//! `weftctl demo`: the mesh on loopback, in one process — a control plane on the file source,
//! sample echo services in two zones (a 90/10 canary split), two client sidecars (one per
//! zone) and a bounded load generator, with a live view of where requests go.
//!
//! Addresses: echo pods on 127.0.10.{1,2,3}:8080, client sidecars on 127.0.20.{1,2}
//! (outbound 15001, inbound 15006, admin 15000), the control plane on `--xds-addr`
//! (default 127.0.0.1:15010, what `weftctl` asks by default). Ctrl-C stops everything it started.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_testkit::echo::{Echo, Identity};
use weft_testkit::world;

/// `weftctl demo` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Directory for the demo's world (YAML you can edit while it runs); default: a new temp dir.
    #[arg(long, env = "WEFT_DEMO_DIR")]
    pub dir: Option<PathBuf>,
    /// Control plane xDS + admin address.
    #[arg(long, env = "WEFT_DEMO_XDS_ADDR", default_value = "127.0.0.1:15010")]
    pub xds_addr: SocketAddr,
    /// Control plane metrics address.
    #[arg(
        long,
        env = "WEFT_DEMO_METRICS_ADDR",
        default_value = "127.0.0.1:15014"
    )]
    pub metrics_addr: SocketAddr,
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
    ip: [u8; 4],
    node: &'static str,
    zone: &'static str,
}

const PODS: [Pod; 3] = [
    Pod {
        name: "echo-v1-a",
        service: "echo-v1",
        ip: [127, 0, 10, 1],
        node: "node-a",
        zone: "zone-a",
    },
    Pod {
        name: "echo-v1-b",
        service: "echo-v1",
        ip: [127, 0, 10, 2],
        node: "node-b",
        zone: "zone-b",
    },
    Pod {
        name: "echo-v2-a",
        service: "echo-v2",
        ip: [127, 0, 10, 3],
        node: "node-a",
        zone: "zone-a",
    },
];

fn pod_addr(p: &Pod) -> SocketAddr {
    SocketAddr::from((p.ip, ECHO_PORT))
}

fn world_yaml() -> String {
    let mut docs = vec![
        "# The demo's world: edit it while the demo runs (weights, ready: false, ...).\n"
            .to_string()
            + &world::node("node-a", "region-1", "zone-a"),
        world::node("node-b", "region-1", "zone-b"),
        world::service("echo", 80),
    ];
    for svc in ["echo-v1", "echo-v2"] {
        docs.push(world::service(svc, 80));
        let eps: Vec<(SocketAddr, &str, bool)> = PODS
            .iter()
            .filter(|p| p.service == svc)
            .map(|p| (pod_addr(p), p.node, true))
            .collect();
        docs.push(world::slice(svc, svc, &eps));
    }
    docs.push(world::split(
        "echo-canary",
        "echo",
        &[("echo-v1", 90), ("echo-v2", 10)],
    ));
    world::docs(&docs)
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
    let world_file = dir.join("world.yaml");
    std::fs::write(&world_file, world_yaml())?;

    let mut echoes: Vec<Echo> = Vec::new();
    for p in &PODS {
        let who = Identity {
            name: p.name.into(),
            cluster: "cluster-1".into(),
            zone: p.zone.into(),
        };
        echoes.push(
            Echo::start(pod_addr(p), who)
                .await
                .map_err(|e| anyhow::anyhow!("sample pod {} on {}: {e}", p.name, pod_addr(p)))?,
        );
    }
    let mut cfg = weft_control_plane::Config::local(&dir);
    cfg.xds_plaintext_addr = Some(args.xds_addr);
    cfg.metrics_addr = args.metrics_addr;
    cfg.replica = Some("demo".into());
    let cp = weft_control_plane::ControlPlane::start(cfg).await?;
    let xds_addr = cp.plaintext();

    let mut sidecars = Vec::new();
    for (i, zone) in ["zone-a", "zone-b"].iter().enumerate() {
        let ip = IpAddr::from([127, 0, 20, i as u8 + 1]);
        let mut rc =
            weft_sidecar::RunConfig::local(xds_addr, ip, &format!("client-{}", &zone[5..]));
        rc.outbound_addr = SocketAddr::new(ip, 15001);
        rc.inbound_addr = SocketAddr::new(ip, 15006);
        rc.admin_addr = SocketAddr::new(ip, 15000);
        rc.cluster = "cluster-1".into();
        rc.region = "region-1".into();
        rc.zone = zone.to_string();
        sidecars.push(weft_sidecar::Sidecar::start(rc).await?);
    }
    for s in &sidecars {
        let mut ready = s.xds.ready.clone();
        tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
            .await
            .map_err(|_| anyhow::anyhow!("sidecars got no config within 10 s"))??;
    }

    println!("Weft demo running.");
    println!(
        "  control plane   xds+admin {}  metrics http://{}/metrics",
        xds_addr, cp.metrics_addr
    );
    for s in &sidecars {
        println!(
            "  sidecar         outbound {}  admin http://{}/config_dump",
            s.outbound_addr, s.admin_addr
        );
    }
    println!("  world           {}", world_file.display());
    println!();
    println!("Try next, in another terminal:");
    println!(
        "  weftctl status --cp {}            # every proxy SYNCED?",
        xds_addr
    );
    println!(
        "  weftctl proxy-config client-a endpoints --cp {}",
        xds_addr
    );
    println!(
        "  curl -H 'Host: echo.default.svc.cluster.local' http://{}/",
        sidecars[0].outbound_addr
    );
    println!(
        "  edit {}: set the split to 50/50, or `ready: false` on echo-v1 in zone-a (failover)",
        world_file.display()
    );
    println!();

    let stats: Stats = Arc::default();
    let mut load = Vec::new();
    for s in &sidecars {
        let (proxy, stats, rate) = (s.outbound_addr, stats.clone(), args.rate.max(1));
        let name = if proxy.ip() == IpAddr::from([127, 0, 20, 1]) {
            "client-a"
        } else {
            "client-b"
        };
        load.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
            loop {
                tick.tick().await;
                let started = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(2),
                    weft_testkit::get_via(proxy, "echo.default.svc.cluster.local", "/"),
                )
                .await;
                let micros = started.elapsed().as_micros() as u64;
                match r {
                    Ok(Ok((200, body))) => {
                        let mut w = body.split_whitespace();
                        let upstream =
                            format!("{} {}", w.next().unwrap_or("?"), w.nth(1).unwrap_or("?"));
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
    loop {
        let stop = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = refresh.tick() => print_view(&stats, tty),
            _ = tokio::signal::ctrl_c() => break,
            _ = stop => break,
        }
    }
    print_view(&stats, tty);
    for t in &load {
        t.abort();
    }
    drop(sidecars);
    drop(cp);
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
            "Demo stopped: every listener it opened is closed; the world stays in {}.",
            dir.display()
        ),
    }
    Ok(0)
}

fn print_view(stats: &Stats, tty: bool) {
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
    out.push_str("Where requests went (last window):\n");
    out.push_str(&crate::output::table(
        &[
            "CLIENT", "UPSTREAM", "REQUESTS", "SHARE", "SUCCESS", "P99_MS",
        ],
        &rows,
    ));
    print!("{out}");
    let _ = std::io::stdout().flush();
}
