//! `weft-injector`: serves the admission webhook. See `--help` and README.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use weft_injector::patch::InjectConfig;
use weft_injector::server::{RELOAD_EVERY, TlsFiles, reload, reload_root, serve};
use weft_injector::webhook::{Metrics, State};

/// `weft-injector` flags.
#[derive(Debug, Parser)]
#[command(
    name = "weft-injector",
    version,
    about = "Weft's sidecar-injecting admission webhook"
)]
struct Args {
    /// HTTPS address: POST /inject, GET /ready /live /metrics.
    #[arg(long, env = "WEFT_INJECTOR_ADDR", default_value = "0.0.0.0:8443")]
    addr: SocketAddr,
    /// Serving certificate chain (PEM), re-read when it changes.
    #[arg(
        long,
        env = "WEFT_TLS_CERT",
        default_value = "/var/run/weft/webhook/tls.crt"
    )]
    tls_cert: PathBuf,
    /// Serving key (PEM).
    #[arg(
        long,
        env = "WEFT_TLS_KEY",
        default_value = "/var/run/weft/webhook/tls.key"
    )]
    tls_key: PathBuf,
    /// Image with `weft-sidecar`, for the injected containers.
    #[arg(
        long,
        env = "WEFT_SIDECAR_IMAGE",
        default_value = "ghcr.io/weft-mesh/weft-sidecar:0.1.0"
    )]
    image: String,
    /// The control plane's TLS gRPC address as proxies dial it.
    #[arg(
        long,
        env = "WEFT_XDS_ADDR",
        default_value = "weft-control-plane.weft-system.svc:15012"
    )]
    xds_addr: String,
    /// This cluster's name.
    #[arg(long, env = "WEFT_CLUSTER_NAME", default_value = "cluster-1")]
    cluster_name: String,
    /// The mesh trust domain.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The mesh root certificate (PEM) proxies trust the control plane with.
    #[arg(
        long,
        env = "WEFT_ROOT_CERT",
        default_value = "/var/run/weft/ca/root.pem"
    )]
    root_cert: PathBuf,
    /// Log filter.
    #[arg(long, env = "WEFT_LOG", default_value = "info")]
    log: String,
    /// Log line format: `text` (colour only on a terminal) or `json` (one object per line).
    #[arg(long, env = "WEFT_LOG_FORMAT", default_value = "text")]
    log_format: weft_proto::logging::LogFormat,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let format = args.log_format;
    weft_proto::logging::init(&args.log, "info", format);
    match serve_webhook(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            weft_proto::logging::fatal(format, &e);
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve_webhook(args: Args) -> anyhow::Result<()> {
    let root_pem = std::fs::read_to_string(&args.root_cert)
        .map_err(|e| anyhow::anyhow!("--root-cert {}: {e}", args.root_cert.display()))?;
    let mut cfg = InjectConfig::new(&args.image, &args.xds_addr, &args.cluster_name, &root_pem);
    cfg.trust_domain = args.trust_domain;
    let files = TlsFiles {
        cert: args.tls_cert,
        key: args.tls_key,
    };
    let tls = Arc::new(arc_swap::ArcSwap::new(files.load()?));
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.addr))?;
    println!("inject=https://{}/inject", listener.local_addr()?);
    tokio::spawn(reload(files, tls.clone()));
    let state = Arc::new(State {
        cfg: arc_swap::ArcSwap::from_pointee(cfg),
        metrics: Metrics::default(),
    });
    tokio::spawn(reload_root(
        args.root_cert.clone(),
        state.clone(),
        RELOAD_EVERY,
    ));
    tokio::select! {
        _ = serve(listener, tls, state) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
