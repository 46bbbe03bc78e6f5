//! CSR signing throughput of the mesh CA (not a test): how many workload certificates one
//! core signs per second (goal ≥ 2000/s for P-256), in two ways —
//! 1. `Ca::sign` alone: parse and check the CSR, sign the leaf (what the CA itself costs);
//! 2. end to end: the CertificateService over gRPC with a join token per request, the control
//!    plane and 8 concurrent callers on one current-thread runtime (so on one core).
//!
//! CSRs and keys are made before the clock starts (that is the workloads' work, not the CA's).
//!
//!   taskset -c 0 cargo bench -p weft-e2e --bench csr_sign -- --count 5000 [--append]
//!
//! `--append` adds the results to BENCHMARKS.md.

use std::time::{Duration, Instant};

use weft_control_plane::identity::Ca;
use weft_proto::SpiffeId;
use weft_proto::identity::SignRequest;
use weft_proto::identity::certificate_service_client::CertificateServiceClient;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn csrs(n: usize, sa: impl Fn(usize) -> String) -> Result<Vec<(SpiffeId, String)>, BoxError> {
    (0..n)
        .map(|i| {
            let id = SpiffeId::new("cluster.local", "default", sa(i))?;
            let (csr, _key) = weft_proto::tls::new_csr(&id.to_string())?;
            Ok((id, csr))
        })
        .collect()
}

/// Signs with `Ca::sign` alone; returns the elapsed time.
fn ca_only(n: usize) -> Result<Duration, BoxError> {
    let ca = Ca::load_or_generate(None, "cluster.local", "bench")?;
    let work = csrs(n, |i| format!("sa-{i}"))?;
    let start = Instant::now();
    for (id, csr) in &work {
        ca.sign(csr, id, None)?;
    }
    Ok(start.elapsed())
}

/// Signs over gRPC with 8 concurrent callers; returns the elapsed time.
async fn over_grpc(n: usize) -> Result<Duration, BoxError> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("world.yaml"), "")?;
    let cp = weft_testkit::start_control_plane(dir.path()).await?;
    let url = format!("http://{}", cp.plaintext());
    let token = weft_testkit::mint_token(&cp, "default", "bench").await?;
    let work = csrs(n, |_| "bench".to_string())?;
    let callers = 8;
    let mut chunks: Vec<Vec<String>> = vec![Vec::new(); callers];
    for (i, (_, csr)) in work.into_iter().enumerate() {
        chunks[i % callers].push(csr);
    }
    let mut clients = Vec::new();
    for _ in 0..callers {
        clients.push(CertificateServiceClient::connect(url.clone()).await?);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (mut client, chunk) in clients.into_iter().zip(chunks) {
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            for csr_pem in chunk {
                client
                    .sign(SignRequest {
                        csr_pem,
                        token: token.clone(),
                        requested_ttl_seconds: 0,
                        node_id: String::new(),
                    })
                    .await?;
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed())
}

fn main() -> Result<(), BoxError> {
    let n: usize = arg("--count").map_or(Ok(5000), |s| s.parse())?;
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    let ca = ca_only(n)?;
    println!("Ca::sign: {n} CSRs in {ca:?}: {:.0}/s", rate(ca));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let grpc = rt.block_on(over_grpc(n))?;
    println!(
        "gRPC CertificateService: {n} CSRs in {grpc:?}: {:.0}/s",
        rate(grpc)
    );
    if std::env::args().any(|a| a == "--append") {
        use std::io::Write;
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|s| s.trim().to_string())
            })
            .unwrap_or_default();
        let verdict = |r: f64| {
            if r >= 2000.0 {
                "holds"
            } else {
                "does not hold"
            }
        };
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(concat!(env!("CARGO_MANIFEST_DIR"), "/../BENCHMARKS.md"))?;
        writeln!(
            f,
            "\n## CSR signing (P-256) — {}\n\nMachine: {cpu}; one core (`taskset -c 0`).\n\n\
             Command: `taskset -c 0 cargo bench -p weft-e2e --bench csr_sign -- --count {n} --append`\n\n\
             | path | CSRs | time | rate |\n|---|---|---|---|\n\
             | `Ca::sign` (parse, check, sign) | {n} | {ca:.2?} | {:.0}/s |\n\
             | CertificateService over gRPC, join token each, 8 callers, same core | {n} | {grpc:.2?} | {:.0}/s |\n\n\
             Goal ≥ 2000/s on one core: {} for the CA, {} end to end.",
            humantime_now(),
            rate(ca),
            rate(grpc),
            verdict(rate(ca)),
            verdict(rate(grpc)),
        )?;
    }
    Ok(())
}

fn humantime_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
