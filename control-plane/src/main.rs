//! `weft-control-plane`: serves Envoy xDS v3 for the mesh. See `--help` and README.md.
//!
//! Without a subcommand it serves; `operator issue` and `ca intermediate` are the offline
//! CA tools (they read a CA directory, print or write files, and exit).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use weft_control_plane::identity::Ca;
use weft_control_plane::{Config, ControlPlane};

/// mimalloc returns freed memory to the OS far better than glibc's malloc under the
/// control plane's pattern (large transient encode buffers on many connections).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "weft-control-plane",
    version,
    about = "Weft control plane: Kubernetes objects in, Envoy xDS v3 out",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    tool: Option<Tool>,
    #[command(flatten)]
    config: Config,
}

#[derive(Subcommand)]
enum Tool {
    /// Operator credentials for `weftctl` (offline, from a CA directory).
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// The mesh CA's offline steps.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Write a credentials file (certificate, key, mesh roots; mode 0600) that lets `weftctl`
    /// read and change the mesh over the TLS port: `weftctl --credentials FILE`.
    Issue {
        /// A CA directory: the root's (`root.pem` + `root.key.pem`: credentials for every
        /// cluster, signed by the root itself) or one cluster's (`intermediate.pem` + key, no
        /// root key: credentials for that cluster only).
        #[arg(long)]
        ca_dir: PathBuf,
        /// The operator's name (a DNS label; logged by the control plane with what it does).
        #[arg(long)]
        name: String,
        /// Lifetime (at most 90 days).
        #[arg(long, default_value = "24h", value_parser = weft_control_plane::objects::parse_duration)]
        ttl: std::time::Duration,
        /// The mesh's trust domain.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Where to write the credentials file.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Make one cluster's CA directory from the root: `root.pem`, a new intermediate and its
    /// key, and no root key. Run it where the root key lives; give each cluster's control
    /// plane its directory (`--ca-dir`, or the install's Secret).
    Intermediate {
        /// The root's directory (`root.pem`, `root.key.pem`).
        #[arg(long)]
        root_dir: PathBuf,
        /// The cluster the intermediate is for.
        #[arg(long)]
        cluster: String,
        /// The new directory (its files must not exist yet).
        #[arg(long)]
        out: PathBuf,
    },
}

fn tool(t: Tool) -> anyhow::Result<()> {
    match t {
        Tool::Operator {
            command:
                OperatorCommand::Issue {
                    ca_dir,
                    name,
                    ttl,
                    trust_domain,
                    out,
                },
        } => {
            // A root directory signs mesh-wide credentials; a cluster's directory, credentials
            // for that cluster only.
            let ca = if ca_dir.join("root.key.pem").exists() {
                Ca::root_signer(&ca_dir)?
            } else {
                Ca::load_or_generate(Some(&ca_dir), &trust_domain, "operator")?
            };
            let creds = ca.issue_operator(&trust_domain, &name, ttl)?;
            creds.write(&out)?;
            println!("wrote {} (operator {name}, valid {ttl:?})", out.display());
        }
        Tool::Ca {
            command:
                CaCommand::Intermediate {
                    root_dir,
                    cluster,
                    out,
                },
        } => {
            weft_proto::spiffe::validate_dns_subdomain("cluster name", &cluster)?;
            Ca::make_intermediate(&root_dir, &cluster, &out)?;
            println!(
                "wrote {}: root.pem, intermediate.pem, intermediate.key.pem for cluster {cluster} (no root key)",
                out.display()
            );
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(t) = cli.tool {
        return tool(t);
    }
    let config = cli.config;
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
