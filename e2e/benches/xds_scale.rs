//! Control-plane scale benchmark (not a test): a mesh of `--services` Services with
//! `--endpoints` endpoints each, `--clients` simulated proxies on delta ADS spread over three
//! zones, then `--changes` one-file edits; for each edit, the time from the write to every
//! client that holds the changed resource having ACKed it (p50, p99, max), how many clients
//! were sent anything, and the control plane's RSS. Two phases side by side, each against a
//! fresh control plane: every client a wildcard on all four types (what Envoy does), then
//! every client on demand (issue #22): the directory, and the routes, clusters and endpoints
//! of `--calls` Services only (two shared by its group of 100 clients, the rest its own); the
//! edits change the shared ones. `--calls 0` runs the wildcard phase alone. Results are
//! appended to BENCHMARKS.md.
//!
//! The control plane is the real release binary in its own process, so its RSS is its own.
//! Endpoint addresses are in 198.18.0.0/15 and are never contacted: only config moves, over
//! loopback. Bounded: each phase has a deadline.
//!
//! Run (see BENCHMARKS.md): `ulimit -n 8192; cargo build --release -p weft-control-plane &&
//! cargo bench -p weft-e2e --bench xds_scale -- --services 10000 --endpoints 10 --clients 1000`

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use weft_proto::envoy::envoy::config::core::v3::{Locality, Node};
use weft_proto::envoy::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use weft_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weft_proto::type_url;

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    services: usize,
    endpoints: usize,
    clients: usize,
    changes: usize,
    per_file: usize,
    calls: usize,
    bin: PathBuf,
    out: Option<PathBuf>,
}

fn args() -> Result<Args, BoxErr> {
    let mut a = Args {
        services: 10_000,
        endpoints: 10,
        clients: 1000,
        changes: 5,
        per_file: 100,
        calls: 10,
        bin: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/release/weft-control-plane"
        )),
        out: Some(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../BENCHMARKS.md"
        ))),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--services" => a.services = val()?.parse()?,
            "--endpoints" => a.endpoints = val()?.parse()?,
            "--clients" => a.clients = val()?.parse()?,
            "--changes" => a.changes = val()?.parse()?,
            "--per-file" => a.per_file = val()?.parse()?,
            "--calls" => a.calls = val()?.parse()?,
            "--control-plane-bin" => a.bin = PathBuf::from(val()?),
            "--no-write" => a.out = None,
            "--bench" => {}
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    Ok(a)
}

const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

fn service_yaml(i: usize, endpoints: usize, generation: usize) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: default}}\nspec:\n  ports: [{{name: http, port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}\n  namespace: default\n  labels: {{kubernetes.io/service-name: svc-{i}}}\naddressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints:\n",
        8080 + generation
    );
    for j in 0..endpoints {
        let n = i * endpoints + j;
        // 198.18.0.0/15: documentation/benchmark space, never contacted.
        let ip = format!("198.{}.{}.{}", 18 + (n >> 16) % 2, (n >> 8) & 255, n & 255);
        let _ = writeln!(
            s,
            "- addresses: [\"{ip}\"]\n  nodeName: node-{}",
            ZONES[j % 3]
        );
    }
    s
}

fn write_file(
    dir: &Path,
    file: usize,
    per_file: usize,
    endpoints: usize,
    generations: &HashMap<usize, usize>,
) -> std::io::Result<()> {
    let mut docs = Vec::new();
    // Each service as last edited: rewriting a file changes only the service edited now.
    for i in file * per_file..(file + 1) * per_file {
        let generation = generations.get(&i).copied().unwrap_or(0);
        docs.push(service_yaml(i, endpoints, generation));
    }
    let tmp = dir.join(format!(".svc-{file}.tmp"));
    std::fs::write(&tmp, docs.join("---\n"))?;
    std::fs::rename(tmp, dir.join(format!("svc-{file:05}.yaml")))
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// What clients report: (client, time it ACKed a response carrying the watched resource).
type Report = (usize, Instant);

/// Clients per group sharing two services in the on-demand phase.
const GROUP: usize = 100;

/// The service-port name of service `i`.
fn name(i: usize) -> String {
    format!("svc-{i}.default.svc.cluster.local:80")
}

/// The services client `id` calls on demand: its group's two shared ones (the last services),
/// then its own.
fn calls(id: usize, services: usize, n: usize) -> Vec<usize> {
    let group = id / GROUP;
    let mut out = vec![services - 1 - 2 * group, services - 2 - 2 * group];
    out.extend((0..n.saturating_sub(2)).map(|k| (id * n + k) % (services / 2)));
    out.truncate(n);
    out
}

/// The service changed by edit `c` (a shared one, so it has subscribers in both phases).
fn changed_service(c: usize, services: usize, clients: usize) -> usize {
    let groups = clients.div_ceil(GROUP).max(1);
    services - 1 - 2 * (c % groups)
}

/// Channels a client reports on.
#[derive(Clone)]
struct Reports {
    synced: mpsc::UnboundedSender<usize>,
    acked: mpsc::UnboundedSender<Report>,
    /// Any response with resources while an edit is being watched.
    updated: mpsc::UnboundedSender<usize>,
}

async fn client(
    id: usize,
    services: usize,
    named: Option<Vec<usize>>,
    xds: String,
    target: watch::Receiver<String>,
    reports: Reports,
) -> Result<(), BoxErr> {
    let mut ads = AggregatedDiscoveryServiceClient::connect(xds)
        .await?
        .max_decoding_message_size(1 << 30);
    let (tx, rx) = mpsc::channel(8);
    let node = Node {
        id: format!("bench-{id}"),
        locality: Some(Locality {
            region: "region-1".into(),
            zone: ZONES[id % 3].into(),
            sub_zone: String::new(),
        }),
        ..Default::default()
    };
    // (type, names): wildcard on Envoy's four; on demand, the directory and named RDS/CDS/EDS.
    let subs: Vec<(&str, Vec<String>)> = match &named {
        None => type_url::ENVOY
            .iter()
            .map(|t| (*t, vec!["*".to_string()]))
            .collect(),
        Some(list) => {
            let names: Vec<String> = list.iter().map(|i| name(*i)).collect();
            vec![
                (type_url::DIRECTORY, vec!["*".to_string()]),
                (type_url::ROUTE, names.clone()),
                (type_url::CLUSTER, names.clone()),
                (type_url::ENDPOINT, names),
            ]
        }
    };
    for (i, (t, names)) in subs.iter().enumerate() {
        tx.send(DeltaDiscoveryRequest {
            node: (i == 0).then(|| node.clone()),
            type_url: t.to_string(),
            resource_names_subscribe: names.clone(),
            ..Default::default()
        })
        .await?;
    }
    let expected = |t: &str| match (&named, t) {
        (None, _) | (Some(_), type_url::DIRECTORY) => services,
        (Some(list), _) => list.len(),
    };
    let mut resp = ads
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    // Initial sync is done when every type holds what it subscribed to (one port per service).
    let mut held: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    let mut synced_sent = false;
    while let Some(r) = resp.message().await? {
        tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await?;
        let now = Instant::now();
        if !synced_sent {
            let set = held.entry(r.type_url.clone()).or_default();
            set.extend(r.resources.iter().map(|x| x.name.clone()));
            if held.len() == subs.len() && held.iter().all(|(t, s)| s.len() >= expected(t)) {
                synced_sent = true;
                held.clear();
                let _ = reports.synced.send(id);
            }
            continue;
        }
        let want = target.borrow().clone();
        if want.is_empty() {
            continue;
        }
        if !r.resources.is_empty() || !r.removed_resources.is_empty() {
            let _ = reports.updated.send(id);
        }
        if r.resources.iter().any(|x| x.name == want) {
            let _ = reports.acked.send((id, now));
        }
    }
    Ok(())
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// How a report row shows one phase.
type Cell = Box<dyn Fn(&Phase) -> String>;

/// One phase's figures.
struct Phase {
    load: f64,
    sync: f64,
    p50: f64,
    p99: f64,
    max: f64,
    samples: usize,
    /// Per edit: clients holding the changed resource, clients sent anything.
    fanout: Vec<(usize, usize)>,
    rss_synced: u64,
    rss_end: u64,
    hwm: u64,
}

/// Runs one phase against a fresh control plane over `dir`: `calls` = 0 is the wildcard
/// phase. Edits continue generations from `first_edit`.
async fn phase(
    a: &Args,
    dir: &Path,
    calls: usize,
    first_edit: usize,
    generations: &mut HashMap<usize, usize>,
) -> Result<Phase, BoxErr> {
    let mode = if calls == 0 { "wildcard" } else { "on demand" };
    let start = Instant::now();
    let mut child = Command::new(&a.bin)
        .args(["--source-dir"])
        .arg(dir)
        .args([
            "--xds-plaintext-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--log",
            "warn",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let pid = child.id();
    let _guard = Kill(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let xds = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("xds="))
        .ok_or_else(|| format!("control plane printed {line:?}"))?
        .to_string();
    let load_time = start.elapsed();
    println!(
        "[{mode}] control plane serving after {load_time:?}; RSS {} MiB",
        rss_kib(pid, "VmRSS:") / 1024
    );

    let (target_tx, target_rx) = watch::channel(String::new());
    let (synced_tx, mut synced_rx) = mpsc::unbounded_channel();
    let (acked_tx, mut acked_rx) = mpsc::unbounded_channel();
    let (updated_tx, mut updated_rx) = mpsc::unbounded_channel();
    let sync_start = Instant::now();
    let mut tasks = Vec::new();
    let mut held_by: Vec<Option<Vec<usize>>> = Vec::new();
    for id in 0..a.clients {
        let named = (calls > 0).then(|| self::calls(id, a.services, calls));
        held_by.push(named.clone());
        let reports = Reports {
            synced: synced_tx.clone(),
            acked: acked_tx.clone(),
            updated: updated_tx.clone(),
        };
        let (x, t, services) = (format!("http://{xds}"), target_rx.clone(), a.services);
        tasks.push(tokio::spawn(async move {
            // A connection refused or reset while a thousand connect at once is tried again
            // (bounded); the stream then starts over, as a proxy's would.
            for attempt in 1..=5 {
                let r = client(
                    id,
                    services,
                    named.clone(),
                    x.clone(),
                    t.clone(),
                    reports.clone(),
                );
                match r.await {
                    Ok(()) => break,
                    Err(e) if attempt == 5 => eprintln!("client {id}: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(200 * attempt)).await,
                }
            }
        }));
    }
    let mut synced = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while synced.len() < a.clients {
        match tokio::time::timeout_at(deadline, synced_rx.recv()).await {
            Ok(Some(id)) => {
                synced.insert(id);
            }
            _ => {
                return Err(format!(
                    "only {}/{} clients synced within 600 s",
                    synced.len(),
                    a.clients
                )
                .into());
            }
        }
    }
    let initial_sync = sync_start.elapsed();
    let rss_synced = rss_kib(pid, "VmRSS:");
    println!(
        "[{mode}] all {} clients synced in {initial_sync:?}; RSS {} MiB",
        a.clients,
        rss_synced / 1024
    );

    let mut samples = Vec::new();
    let mut fanout = Vec::new();
    for c in 0..a.changes {
        let svc = changed_service(c, a.services, a.clients);
        let name = self::name(svc);
        let holders = held_by
            .iter()
            .filter(|h| h.as_ref().is_none_or(|l| l.contains(&svc)))
            .count();
        target_tx.send_replace(name.clone());
        tokio::time::sleep(Duration::from_millis(200)).await;
        while acked_rx.try_recv().is_ok() {}
        while updated_rx.try_recv().is_ok() {}
        let t0 = Instant::now();
        generations.insert(svc, first_edit + c + 1);
        write_file(dir, svc / a.per_file, a.per_file, a.endpoints, generations)?;
        let mut got: HashMap<usize, Instant> = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while got.len() < holders {
            match tokio::time::timeout_at(deadline, acked_rx.recv()).await {
                Ok(Some((id, at))) => {
                    got.entry(id).or_insert(at);
                }
                _ => {
                    return Err(format!(
                        "[{mode}] change {c}: only {}/{holders} clients ACKed within 120 s",
                        got.len(),
                    )
                    .into());
                }
            }
        }
        // Anything else sent for this edit arrives well within this.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut updated = std::collections::HashSet::new();
        while let Ok(id) = updated_rx.try_recv() {
            updated.insert(id);
        }
        target_tx.send_replace(String::new());
        let mut lat: Vec<f64> = got
            .values()
            .map(|t| t.duration_since(t0).as_secs_f64() * 1000.0)
            .collect();
        lat.sort_by(f64::total_cmp);
        println!(
            "[{mode}] change {c} ({name}): {holders} holders, {} clients sent anything; p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            updated.len(),
            quantile(&lat, 0.5),
            quantile(&lat, 0.99),
            lat.last().copied().unwrap_or(0.0)
        );
        fanout.push((holders, updated.len()));
        samples.extend(lat);
    }
    samples.sort_by(f64::total_cmp);
    for t in tasks {
        t.abort();
    }
    Ok(Phase {
        load: load_time.as_secs_f64(),
        sync: initial_sync.as_secs_f64(),
        p50: quantile(&samples, 0.5),
        p99: quantile(&samples, 0.99),
        max: samples.last().copied().unwrap_or(0.0),
        samples: samples.len(),
        fanout,
        rss_synced: rss_synced / 1024,
        rss_end: rss_kib(pid, "VmRSS:") / 1024,
        hwm: rss_kib(pid, "VmHWM:") / 1024,
    })
}

#[tokio::main]
async fn main() -> Result<(), BoxErr> {
    let a = args()?;
    if !a.bin.exists() {
        return Err(format!(
            "{} missing: run `cargo build --release -p weft-control-plane` first",
            a.bin.display()
        )
        .into());
    }
    if a.calls == 1 || a.calls > a.services / 2 {
        return Err("--calls is 0 (wildcard only) or 2 .. services/2".into());
    }
    let dir = tempfile::tempdir()?;
    let nodes: Vec<String> = ZONES
        .iter()
        .map(|z| format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: node-{z}\n  labels: {{topology.kubernetes.io/region: region-1, topology.kubernetes.io/zone: {z}}}\n"))
        .collect();
    std::fs::write(dir.path().join("nodes.yaml"), nodes.join("---\n"))?;
    let files = a.services.div_ceil(a.per_file);
    let gen_start = Instant::now();
    for f in 0..files {
        write_file(dir.path(), f, a.per_file, a.endpoints, &HashMap::new())?;
    }
    println!(
        "world: {} services x {} endpoints in {files} files ({:?})",
        a.services,
        a.endpoints,
        gen_start.elapsed()
    );
    let mut generations = HashMap::new();
    let wildcard = phase(&a, dir.path(), 0, 0, &mut generations).await?;
    let on_demand = if a.calls > 0 {
        Some(phase(&a, dir.path(), a.calls, a.changes, &mut generations).await?)
    } else {
        None
    };

    let cmd = format!(
        "ulimit -n 8192; cargo build --release -p weft-control-plane && cargo bench -p weft-e2e --bench xds_scale -- --services {} --endpoints {} --clients {} --changes {} --calls {}",
        a.services, a.endpoints, a.clients, a.changes, a.calls
    );
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let goal = |ok: bool| if ok { "holds" } else { "does not hold yet" };
    let fan = |p: &Phase| {
        p.fanout
            .iter()
            .map(|(h, u)| format!("{u}/{h}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let col = |p: Option<&Phase>, f: &dyn Fn(&Phase) -> String| p.map_or("-".to_string(), f);
    let od = on_demand.as_ref();
    let w = Some(&wildcard);
    let rows: Vec<(&str, Cell)> = vec![
        (
            "start-up: files read and served",
            Box::new(|p| format!("{:.2} s", p.load)),
        ),
        (
            "initial sync of every client",
            Box::new(|p| format!("{:.2} s", p.sync)),
        ),
        (
            "clients sent anything for an edit / clients holding the edited service",
            Box::new(fan),
        ),
        (
            "file change -> every holder ACKed: p50",
            Box::new(|p| format!("{:.0} ms", p.p50)),
        ),
        (
            "file change -> every holder ACKed: p99",
            Box::new(|p| format!("{:.0} ms", p.p99)),
        ),
        (
            "file change -> every holder ACKed: max",
            Box::new(|p| format!("{:.0} ms ({} samples)", p.max, p.samples)),
        ),
        (
            "control plane RSS after initial sync",
            Box::new(|p| format!("{} MiB", p.rss_synced)),
        ),
        (
            "control plane RSS at the end / peak",
            Box::new(|p| format!("{} MiB / {} MiB", p.rss_end, p.hwm)),
        ),
    ];
    let mut table = String::new();
    for (label, f) in &rows {
        let _ = writeln!(table, "| {label} | {} | {} |", col(w, f), col(od, f));
    }
    let ratio = od.map(|o| wildcard.p99 / o.p99.max(0.001));
    let only_holders = od.is_some_and(|o| o.fanout.iter().all(|(h, u)| u == h));
    let report = format!(
        "\n## Control plane scale — {date}\n\nMachine: {cores} cores ({cpu}); control plane and the {clients} clients share them.\n\nCommand: `{cmd}`\n\n\
Mesh: {services} services, {eps} endpoints, 3 zones; {clients} delta ADS clients, {changes} edits of an EndpointSlice each phase; each phase against a fresh control plane.\n\n\
| measure | wildcard (CDS/EDS/LDS/RDS) | on demand (directory + {calls} services each) |\n|---|---|---|\n{table}\n\
Goals: wildcard p99 < 1 s: {g1} ({wp99:.0} ms). RSS < 1 GB: {g2} (peak {whwm} MiB). On demand: only holders are sent an edit: {g3}; p99 at least 5x lower than wildcard: {g4} ({ratio}).\n",
        clients = a.clients,
        services = a.services,
        eps = a.services * a.endpoints,
        changes = a.changes,
        calls = a.calls,
        wp99 = wildcard.p99,
        whwm = wildcard.hwm,
        g1 = goal(wildcard.p99 < 1000.0),
        g2 = goal(wildcard.hwm < 1024),
        g3 = if od.is_some() {
            goal(only_holders)
        } else {
            "-"
        },
        g4 = match ratio {
            Some(r) => goal(r >= 5.0),
            None => "-",
        },
        ratio = ratio.map_or("-".to_string(), |r| format!("{r:.1}x")),
    );
    print!("{report}");
    if let Some(out) = &a.out {
        let mut existing = std::fs::read_to_string(out).unwrap_or_else(|_| "# Benchmarks\n".into());
        existing.push_str(&report);
        std::fs::write(out, existing)?;
        println!("appended to {}", out.display());
    }
    Ok(())
}
