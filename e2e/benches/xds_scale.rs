//! Control-plane scale benchmark (not a test): a mesh of `--services` Services with
//! `--endpoints` endpoints each, `--clients` simulated proxies on delta ADS (wildcard on all
//! four types, spread over three zones), then `--changes` one-file edits; for each edit, the
//! time from the write to every client having ACKed the changed resource (p50, p99, max), and
//! the control plane's RSS. Results are appended to BENCHMARKS.md.
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
    changed: Option<(usize, usize)>,
) -> std::io::Result<()> {
    let mut docs = Vec::new();
    for i in file * per_file..(file + 1) * per_file {
        let generation = match changed {
            Some((svc, g)) if svc == i => g,
            _ => 0,
        };
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

async fn client(
    id: usize,
    expected: usize,
    xds: String,
    target: watch::Receiver<String>,
    synced: mpsc::UnboundedSender<usize>,
    acked: mpsc::UnboundedSender<Report>,
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
    for (i, t) in type_url::ENVOY.iter().enumerate() {
        tx.send(DeltaDiscoveryRequest {
            node: (i == 0).then(|| node.clone()),
            type_url: t.to_string(),
            resource_names_subscribe: vec!["*".into()],
            ..Default::default()
        })
        .await?;
    }
    let mut resp = ads
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    // Initial sync is done when every type holds `expected` resources (one port per service).
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
            if held.len() == 4 && held.values().all(|s| s.len() >= expected) {
                synced_sent = true;
                held.clear();
                let _ = synced.send(id);
            }
        }
        let want = target.borrow().clone();
        if !want.is_empty() && r.resources.iter().any(|x| x.name == want) {
            let _ = acked.send((id, now));
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
    let dir = tempfile::tempdir()?;
    let nodes: Vec<String> = ZONES
        .iter()
        .map(|z| format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: node-{z}\n  labels: {{topology.kubernetes.io/region: region-1, topology.kubernetes.io/zone: {z}}}\n"))
        .collect();
    std::fs::write(dir.path().join("nodes.yaml"), nodes.join("---\n"))?;
    let files = a.services.div_ceil(a.per_file);
    let gen_start = Instant::now();
    for f in 0..files {
        write_file(dir.path(), f, a.per_file, a.endpoints, None)?;
    }
    println!(
        "world: {} services x {} endpoints in {files} files ({:?})",
        a.services,
        a.endpoints,
        gen_start.elapsed()
    );

    let start = Instant::now();
    let mut child = Command::new(&a.bin)
        .args(["--source-dir"])
        .arg(dir.path())
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
        "control plane serving after {load_time:?}; RSS {} MiB",
        rss_kib(pid, "VmRSS:") / 1024
    );

    let (target_tx, target_rx) = watch::channel(String::new());
    let (synced_tx, mut synced_rx) = mpsc::unbounded_channel();
    let (acked_tx, mut acked_rx) = mpsc::unbounded_channel();
    let sync_start = Instant::now();
    let mut tasks = Vec::new();
    let services = a.services;
    for id in 0..a.clients {
        let (x, t, s, k) = (
            format!("http://{xds}"),
            target_rx.clone(),
            synced_tx.clone(),
            acked_tx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            if let Err(e) = client(id, services, x, t, s, k).await {
                eprintln!("client {id}: {e}");
            }
        }));
    }
    let mut synced = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while synced < a.clients {
        match tokio::time::timeout_at(deadline, synced_rx.recv()).await {
            Ok(Some(_)) => synced += 1,
            _ => {
                return Err(
                    format!("only {synced}/{} clients synced within 600 s", a.clients).into(),
                );
            }
        }
    }
    let initial_sync = sync_start.elapsed();
    let rss_synced = rss_kib(pid, "VmRSS:");
    println!(
        "all {} clients synced in {initial_sync:?}; RSS {} MiB",
        a.clients,
        rss_synced / 1024
    );

    let mut samples = Vec::new();
    let mut worst_change = Duration::ZERO;
    for c in 0..a.changes {
        let svc = (c * 7919) % a.services;
        let name = format!("svc-{svc}.default.svc.cluster.local:80");
        target_tx.send_replace(name.clone());
        tokio::time::sleep(Duration::from_millis(200)).await;
        while acked_rx.try_recv().is_ok() {}
        let t0 = Instant::now();
        write_file(
            dir.path(),
            svc / a.per_file,
            a.per_file,
            a.endpoints,
            Some((svc, c + 1)),
        )?;
        let mut got: HashMap<usize, Instant> = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while got.len() < a.clients {
            match tokio::time::timeout_at(deadline, acked_rx.recv()).await {
                Ok(Some((id, at))) => {
                    got.entry(id).or_insert(at);
                }
                _ => {
                    return Err(format!(
                        "change {c}: only {}/{} clients ACKed within 120 s",
                        got.len(),
                        a.clients
                    )
                    .into());
                }
            }
        }
        let mut lat: Vec<f64> = got
            .values()
            .map(|t| t.duration_since(t0).as_secs_f64() * 1000.0)
            .collect();
        lat.sort_by(f64::total_cmp);
        let max = lat.last().copied().unwrap_or(0.0);
        worst_change = worst_change.max(Duration::from_secs_f64(max / 1000.0));
        println!(
            "change {c} ({name}): p50 {:.0} ms, p99 {:.0} ms, max {max:.0} ms",
            quantile(&lat, 0.5),
            quantile(&lat, 0.99)
        );
        samples.extend(lat);
    }
    samples.sort_by(f64::total_cmp);
    let (p50, p99, max) = (
        quantile(&samples, 0.5),
        quantile(&samples, 0.99),
        samples.last().copied().unwrap_or(0.0),
    );
    let rss_end = rss_kib(pid, "VmRSS:");
    let hwm = rss_kib(pid, "VmHWM:");
    for t in tasks {
        t.abort();
    }
    let cmd = format!(
        "ulimit -n 8192; cargo build --release -p weft-control-plane && cargo bench -p weft-e2e --bench xds_scale -- --services {} --endpoints {} --clients {} --changes {}",
        a.services, a.endpoints, a.clients, a.changes
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
    let report = format!(
        "\n## Control plane scale — {date}\n\nMachine: {cores} cores ({cpu}); control plane and the {clients} clients share them.\n\nCommand: `{cmd}`\n\n\
| measure | value |\n|---|---|\n\
| mesh | {services} services, {eps} endpoints, 3 zones |\n\
| ADS clients | {clients} (delta, wildcard on CDS/EDS/LDS/RDS, {clients} connections) |\n\
| start-up: files read and served | {load:.2} s |\n\
| initial sync of every client | {sync:.2} s |\n\
| file change -> every client ACKed: p50 | {p50:.0} ms |\n\
| file change -> every client ACKed: p99 | {p99:.0} ms |\n\
| file change -> every client ACKed: max | {max:.0} ms (over {n} samples, {changes} changes) |\n\
| control plane RSS after initial sync | {rss1} MiB |\n\
| control plane RSS at the end / peak | {rss2} MiB / {hwm} MiB |\n\n\
Goals: p99 < 1 s: {g1} ({p99:.0} ms). RSS < 1 GB: {g2} (peak {hwm} MiB).\n",
        clients = a.clients,
        services = a.services,
        eps = a.services * a.endpoints,
        changes = a.changes,
        load = load_time.as_secs_f64(),
        sync = initial_sync.as_secs_f64(),
        n = samples.len(),
        rss1 = rss_synced / 1024,
        rss2 = rss_end / 1024,
        hwm = hwm / 1024,
        g1 = goal(p99 < 1000.0),
        g2 = goal(hwm < 1024 * 1024),
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
