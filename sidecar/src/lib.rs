//! Weft's sidecar: the data plane. It takes its configuration over ADS from the control plane
//! (`xds`), keeps it compiled for the request path (`state`), proxies outbound HTTP by service
//! name (`outbound`) and forwards inbound connections to the application (`inbound`), and
//! reports on `admin`.
//!
//! [`Sidecar::start`] binds every listener first (a bind error stops start-up), then serves
//! until the handle is dropped.

pub mod admin;
pub mod balance;
pub mod config;
pub mod detect;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod outbound;
pub mod resilience;
pub mod state;
pub mod telemetry;
pub mod xds;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;

pub use config::RunConfig;

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({what}): {source}")]
pub struct StartError {
    /// Which listener.
    pub what: &'static str,
    /// The address.
    pub addr: SocketAddr,
    /// The cause.
    pub source: std::io::Error,
}

/// A running sidecar; dropping it stops every task.
pub struct Sidecar {
    /// Outbound listener address.
    pub outbound_addr: SocketAddr,
    /// Inbound listener address.
    pub inbound_addr: SocketAddr,
    /// Admin listener address.
    pub admin_addr: SocketAddr,
    /// The xDS state.
    pub xds: xds::XdsHandle,
    /// The workload's certificate, when a join token was given.
    pub svid: Option<std::sync::Arc<arc_swap::ArcSwapOption<identity::Svid>>>,
    drain: tokio::sync::watch::Sender<bool>,
    listeners: Vec<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        for t in self.tasks.iter().chain(&self.listeners) {
            t.abort();
        }
    }
}

impl Sidecar {
    /// Binds and starts serving.
    pub async fn start(cfg: RunConfig) -> Result<Self, StartError> {
        let err = |what, addr| move |source| StartError { what, addr, source };
        let metrics = Arc::new(admin::Metrics::new());
        let xds = xds::start(cfg.clone(), metrics.clone());
        let svid = cfg
            .join_token
            .clone()
            .map(|token| identity::start(cfg.clone(), token, metrics.clone()));
        let outbound = outbound::Outbound::bind(
            cfg.outbound_addr,
            cfg.namespace.clone(),
            cfg.server_first_ports.clone(),
            cfg.header_read_timeout,
            telemetry::Tracer::start(cfg.otlp_endpoint.clone(), metrics.clone()),
            xds.clone(),
            metrics.clone(),
        )
        .await
        .map_err(err("outbound", cfg.outbound_addr))?;
        let inbound = inbound::Inbound::bind(cfg.inbound_addr, cfg.app_addr, metrics.clone())
            .await
            .map_err(err("inbound", cfg.inbound_addr))?;
        let admin = admin::bind(cfg.admin_addr)
            .await
            .map_err(err("admin", cfg.admin_addr))?;
        let outbound_addr = outbound
            .local_addr()
            .map_err(err("outbound", cfg.outbound_addr))?;
        let inbound_addr = inbound
            .local_addr()
            .map_err(err("inbound", cfg.inbound_addr))?;
        let admin_addr = admin.local_addr().map_err(err("admin", cfg.admin_addr))?;
        let (drain, drained) = tokio::sync::watch::channel(false);
        let listeners = vec![
            tokio::spawn(outbound.run(drained.clone(), cfg.drain_timeout)),
            tokio::spawn(inbound.run(drained, cfg.drain_timeout)),
        ];
        let tasks = vec![tokio::spawn(admin::serve(admin, xds.clone(), metrics))];
        tracing::info!(%outbound_addr, %inbound_addr, %admin_addr, xds = %cfg.xds_addr, "sidecar serving");
        Ok(Sidecar {
            outbound_addr,
            inbound_addr,
            admin_addr,
            xds,
            svid,
            drain,
            listeners,
            tasks,
        })
    }

    /// Drains: stops accepting (new connections are refused), lets in-flight requests finish
    /// within the configured drain timeout, then stops everything.
    pub async fn drain(mut self) {
        tracing::info!("draining");
        self.drain.send_replace(true);
        for l in std::mem::take(&mut self.listeners) {
            let _ = l.await;
        }
    }
}
