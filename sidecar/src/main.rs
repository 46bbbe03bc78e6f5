//! `weft-sidecar`: the data-plane proxy. See `weft-sidecar run --help` and README.md.

use clap::{Parser, Subcommand};
use weft_sidecar::{RunConfig, Sidecar};

#[derive(Parser)]
#[command(name = "weft-sidecar", version, about = "Weft's sidecar proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run(RunConfig),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli {
        command: Command::Run(cfg),
    } = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cfg.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let sidecar = Sidecar::start(cfg).await?;
    println!(
        "outbound={} inbound={} admin={}",
        sidecar.outbound_addr, sidecar.inbound_addr, sidecar.admin_addr
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
