//! `weft-control-plane`: serves Envoy xDS v3 for the mesh. See `--help` and README.md.

use clap::Parser;
use weft_control_plane::{Config, ControlPlane};

/// mimalloc returns freed memory to the OS far better than glibc's malloc under the
/// control plane's pattern (large transient encode buffers on many connections).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let format = config.log_format;
    weft_proto::logging::init(&config.log, "info", format);
    let cp = match ControlPlane::start(config).await {
        Ok(cp) => cp,
        Err(e) => {
            weft_proto::logging::fatal(format, &anyhow::Error::from(e));
            std::process::exit(1);
        }
    };
    // One line tools can parse: `xds=ADDR|off grpc=ADDR metrics=ADDR`.
    let xds = cp.xds_addr.map_or("off".to_string(), |a| a.to_string());
    println!(
        "xds={xds} grpc={} metrics={}",
        cp.grpc_addr, cp.metrics_addr
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
