//! `weft-sidecar`: the data-plane proxy. See `weft-sidecar run --help` and README.md.

use clap::{Parser, Subcommand};
use weft_sidecar::{RunConfig, Sidecar};

/// mimalloc: the request path allocates and frees small buffers at a high rate, which glibc's
/// malloc spent ~7 % of the proxy's CPU on (profile in BENCHMARKS.md). The `system-allocator`
/// feature keeps glibc's, so heap profilers that hook malloc (heaptrack) see every allocation.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "weft-sidecar", version, about = "Weft's sidecar proxy")]
struct Cli {
    /// Runtime worker threads for `run` (default: the CPUs this process may use, at most 2 —
    /// a sidecar beside one application should not start a thread per node core).
    #[arg(long, global = true, env = "WEFT_WORKER_THREADS")]
    worker_threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run(Box<RunConfig>),
    /// Install (or with --uninstall remove) the iptables rules that redirect the pod's traffic.
    Init(weft_sidecar::init::InitConfig),
    /// Wait until the proxy's health listener says ready (the classic sidecar's startup hold,
    /// run as its postStart hook); exits 1 after the timeout.
    WaitReady {
        /// The health listener.
        #[arg(long, default_value = "127.0.0.1:15021")]
        addr: std::net::SocketAddr,
        /// How long to wait.
        #[arg(long, default_value = "120s", value_parser = weft_sidecar::config::parse_duration)]
        timeout: std::time::Duration,
    },
}

/// mimalloc gives the pages of a replaced config back at once, not when the xDS task next
/// allocates (see `weft_sidecar::memory`).
#[cfg(not(feature = "system-allocator"))]
#[allow(unsafe_code)]
fn collect_freed() {
    // SAFETY: mi_collect takes no pointers; mimalloc allows it on any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    #[cfg(not(feature = "system-allocator"))]
    weft_sidecar::memory::on_config_swap(collect_freed);
    let workers = cli.worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(2)
    });
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .enable_all()
        .build()?
        .block_on(run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    let cfg = match command {
        Command::Run(cfg) => *cfg,
        Command::Init(init) => {
            weft_sidecar::init::run_init(&init)?;
            return Ok(());
        }
        Command::WaitReady { addr, timeout } => {
            weft_sidecar::health::wait_ready(addr, timeout).map_err(anyhow::Error::msg)?;
            return Ok(());
        }
    };
    let format = cfg.log_format;
    weft_proto::logging::init(&cfg.log, "info", format);
    let sidecar = match Sidecar::start(cfg).await {
        Ok(s) => s,
        Err(e) => {
            weft_proto::logging::fatal(format, &anyhow::Error::from(e));
            std::process::exit(1);
        }
    };
    println!(
        "outbound={} inbound={} admin={}",
        sidecar.outbound_addr, sidecar.inbound_addr, sidecar.admin_addr
    );
    shutdown_signal().await;
    sidecar.drain().await;
    Ok(())
}

/// SIGTERM (what Kubernetes sends) or Ctrl-C.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the proxy");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
