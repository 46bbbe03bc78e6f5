//! Weft's sidecar: the data plane. It takes its configuration over ADS from the control plane
//! (`xds`), keeps it compiled for the request path (`state`), proxies outbound HTTP by service
//! name (`outbound`) and forwards inbound connections to the application (`inbound`), and
//! reports on `admin`.
//!
//! [`Sidecar::start`] binds every listener first (a bind error stops start-up), then serves
//! until the handle is dropped.

pub mod accept;
pub mod admin;
pub mod authz;
pub mod balance;
pub mod config;
pub mod connect;
pub mod detect;
pub mod directory;
pub mod dns;
pub mod gateway;
pub mod health;
pub mod hop;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod listener;
pub mod load;
pub mod lrs;
pub mod memory;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod pool;
pub mod resilience;
pub mod runtime;
pub mod state;
pub mod telemetry;
pub mod xds;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;

pub use config::RunConfig;

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The configuration cannot run.
    #[error("{0}")]
    Config(String),
}

/// How this sidecar reaches its control plane, from its configuration.
fn control_plane_link(
    cfg: &RunConfig,
    svid: &identity::SvidCell,
) -> Result<identity::ControlPlaneLink, StartError> {
    if cfg.plaintext_xds {
        // The plaintext port serves ADS only: a certificate needs the TLS port.
        if identity::TokenSource::from_config(cfg).is_some() {
            return Err(StartError::Config(
                "--plaintext-xds gets config only: the control plane issues certificates on its \
                 TLS port; drop --plaintext-xds and pass --trust-bundle to use --join-token or \
                 --token-file"
                    .into(),
            ));
        }
        return Ok(identity::ControlPlaneLink::plaintext(cfg.xds_addr));
    }
    let missing = || {
        StartError::Config(
            "xDS over TLS needs --trust-bundle FILE (or --trust-bundle-pem: the mesh root) and \
             --join-token or --token-file (to get the workload's certificate); pass \
             --plaintext-xds for local development"
                .into(),
        )
    };
    if identity::TokenSource::from_config(cfg).is_none() {
        return Err(missing());
    }
    let (what, pem) = match (&cfg.trust_bundle, &cfg.trust_bundle_pem) {
        (Some(path), _) => (
            format!("--trust-bundle {}", path.display()),
            std::fs::read_to_string(path).map_err(|e| {
                StartError::Config(format!("--trust-bundle {}: {e}", path.display()))
            })?,
        ),
        (None, Some(pem)) => ("--trust-bundle-pem".to_string(), pem.clone()),
        (None, None) => return Err(missing()),
    };
    identity::ControlPlaneLink::tls(cfg.xds_addr, &[pem], svid.clone())
        .map(|l| l.for_cluster(&cfg.cluster))
        .map_err(|e| StartError::Config(format!("{what}: {e}")))
}

/// A running sidecar; dropping it stops every task.
pub struct Sidecar {
    /// Outbound listener address.
    pub outbound_addr: SocketAddr,
    /// Inbound listener address.
    pub inbound_addr: SocketAddr,
    /// IPv6 outbound listener address, when the pod has IPv6.
    pub outbound_addr6: Option<SocketAddr>,
    /// IPv6 inbound listener address, when the pod has IPv6.
    pub inbound_addr6: Option<SocketAddr>,
    /// Admin listener address.
    pub admin_addr: SocketAddr,
    /// Health listener address, when enabled.
    pub health_addr: Option<SocketAddr>,
    /// Mesh DNS address (UDP and TCP), when enabled.
    pub dns_addr: Option<SocketAddr>,
    /// East-west gateway address, when this proxy is a gateway.
    pub gateway_addr: Option<SocketAddr>,
    /// The xDS state.
    pub xds: xds::XdsHandle,
    /// The workload's certificate, when a join token was given.
    pub svid: Option<identity::SvidCell>,
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
        let err = |what, addr| move |source| StartError::Bind { what, addr, source };
        let metrics = Arc::new(metrics::Metrics::new());
        let cell = identity::SvidCell::default();
        let link = control_plane_link(&cfg, &cell)?;
        let mut tasks = Vec::new();
        let svid = identity::TokenSource::from_config(&cfg).map(|token| {
            tasks.push(identity::start(
                cfg.clone(),
                token,
                link.clone(),
                cell.clone(),
                metrics.clone(),
            ));
            cell.clone()
        });
        let xds = xds::start(cfg.clone(), link.clone(), metrics.clone());
        tasks.push(lrs::start(
            xds::node(&cfg),
            link,
            xds.clone(),
            metrics.clone(),
        ));
        let mut own_ports = vec![
            cfg.outbound_addr.port(),
            cfg.inbound_addr.port(),
            cfg.admin_addr.port(),
            weft_proto::keys::OUTBOUND_PORT,
            weft_proto::keys::INBOUND_PORT,
            weft_proto::keys::ADMIN_PORT,
            weft_proto::keys::HEALTH_PORT,
        ];
        own_ports.extend(cfg.health_addr.map(|a| a.port()));
        own_ports.retain(|p| *p != 0);
        own_ports.sort_unstable();
        own_ports.dedup();
        let ctx = listener::ListenerContext {
            own_ports,
            idle_timeout: cfg.idle_timeout,
            max_connections: cfg.max_connections,
            namespace: cfg.namespace.clone(),
            cluster: cfg.cluster.clone(),
            server_first_ports: cfg.server_first_ports.clone(),
            header_read_timeout: cfg.header_read_timeout,
            xds: xds.clone(),
            svid: svid.clone(),
            metrics: metrics.clone(),
        };
        let tracer = telemetry::Tracer::start(cfg.otlp_endpoint.clone(), metrics.clone());
        let outbound = outbound::Outbound::bind(cfg.outbound_addr, ctx.clone(), tracer.clone())
            .await
            .map_err(err("outbound", cfg.outbound_addr))?;
        let inbound = inbound::Inbound::bind(cfg.inbound_addr, cfg.app_addr, ctx.clone())
            .await
            .map_err(err("inbound", cfg.inbound_addr))?;
        // IPv6: its own listeners (IPv6 only), when the pod has IPv6.
        let (mut outbound6, mut inbound6) = (None, None);
        if !cfg.no_ipv6 {
            match (
                bind_v6only(cfg.outbound_addr6),
                bind_v6only(cfg.inbound_addr6),
            ) {
                (Ok(o), Ok(i)) => {
                    outbound6 = Some(outbound::Outbound::with_listener(
                        o,
                        ctx.clone(),
                        tracer.clone(),
                    ));
                    inbound6 = Some(inbound::Inbound::with_listener(
                        i,
                        cfg.app_addr,
                        ctx.clone(),
                    ));
                }
                (Err(e), _) | (_, Err(e)) if no_ipv6_here(&e) => {
                    tracing::info!(error = %e, "no IPv6 in this pod: IPv4 listeners only");
                }
                (Err(e), _) => return Err(err("outbound (IPv6)", cfg.outbound_addr6)(e)),
                (_, Err(e)) => return Err(err("inbound (IPv6)", cfg.inbound_addr6)(e)),
            }
        }
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
        let outbound_addr6 = outbound6.as_ref().and_then(|o| o.local_addr().ok());
        let inbound_addr6 = inbound6.as_ref().and_then(|i| i.local_addr().ok());
        let mut listeners = vec![
            tokio::spawn(outbound.run(drained.clone(), cfg.drain_timeout)),
            tokio::spawn(inbound.run(drained.clone(), cfg.drain_timeout)),
        ];
        if let (Some(o), Some(i)) = (outbound6, inbound6) {
            listeners.push(tokio::spawn(o.run(drained.clone(), cfg.drain_timeout)));
            listeners.push(tokio::spawn(i.run(drained, cfg.drain_timeout)));
        }
        let mut health_addr = None;
        if let Some(addr) = cfg.health_addr {
            let l = admin::bind(addr).await.map_err(err("health", addr))?;
            health_addr = Some(l.local_addr().map_err(err("health", addr))?);
            tasks.push(tokio::spawn(health::serve(
                l,
                xds.clone(),
                svid.clone(),
                Arc::new(cfg.app_probes.clone()),
            )));
        }
        let mut gateway_addr = None;
        if let Some(addr) = cfg.gateway_addr {
            let Some(svid) = svid.clone() else {
                return Err(StartError::Config(format!(
                    "--gateway-addr {addr}: a gateway needs a workload identity (--join-token or --token-file) to accept tunnels over mTLS"
                )));
            };
            if cfg.cluster.is_empty() {
                return Err(StartError::Config(format!(
                    "--gateway-addr {addr}: a gateway needs --cluster (it forwards only to its own cluster's exported endpoints)"
                )));
            }
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(err("gateway", addr))?;
            gateway_addr = Some(l.local_addr().map_err(err("gateway", addr))?);
            tracing::info!(addr = ?gateway_addr, cluster = %cfg.cluster, "east-west gateway serving");
            tasks.push(tokio::spawn(gateway::serve(
                l,
                gateway::Gateway {
                    cluster: cfg.cluster.as_str().into(),
                    config: xds.config.clone(),
                    svid,
                    metrics: metrics.clone(),
                    max_connections: cfg.max_connections,
                    idle: cfg.idle_timeout,
                    control_plane: (!cfg.plaintext_xds).then_some(cfg.xds_addr),
                },
            )));
        }
        let mut dns_addr = None;
        if let Some(addr) = cfg.dns_addr {
            // The pod's own resolver: on any other address it is an open resolver for the
            // network (and a reflector for floods), answering with the mesh's names.
            if !addr.ip().is_loopback() {
                return Err(StartError::Config(format!(
                    "--dns-addr {addr}: the mesh DNS serves this pod only; give a loopback address such as 127.0.0.1:15053"
                )));
            }
            let (udp, tcp) = dns::bind(addr).await.map_err(err("mesh DNS", addr))?;
            dns_addr = Some(udp.local_addr().map_err(err("mesh DNS", addr))?);
            let upstreams = if cfg.dns_upstream.is_empty() {
                dns::nameservers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())
            } else {
                cfg.dns_upstream.clone()
            };
            if upstreams.is_empty() {
                tracing::warn!(
                    "mesh DNS: no upstream (no --dns-upstream, no nameserver in /etc/resolv.conf): names outside the mesh get SERVFAIL"
                );
            }
            tracing::info!(addr = ?dns_addr, ?upstreams, "mesh DNS serving");
            tasks.push(tokio::spawn(dns::serve(
                udp,
                tcp,
                xds.config.clone(),
                dns::DnsSettings {
                    upstreams,
                    max_qps: cfg.dns_max_qps,
                    max_inflight: cfg.dns_max_inflight,
                },
                metrics.clone(),
            )));
        }
        tasks.push(tokio::spawn(admin::serve(
            admin,
            xds.clone(),
            svid.clone(),
            metrics,
        )));
        tracing::info!(%outbound_addr, %inbound_addr, ?outbound_addr6, ?inbound_addr6, %admin_addr, xds = %cfg.xds_addr, "sidecar serving");
        Ok(Sidecar {
            outbound_addr,
            inbound_addr,
            outbound_addr6,
            inbound_addr6,
            admin_addr,
            health_addr,
            dns_addr,
            gateway_addr,
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

/// A listener on an IPv6 address that takes IPv6 only (`IPV6_V6ONLY`), so it never collides
/// with the IPv4 listener on the same port.
fn bind_v6only(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_only_v6(true)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Whether a bind error means the pod has no IPv6 (rather than a real problem).
fn no_ipv6_here(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::Unsupported
    ) || e.raw_os_error() == Some(97) // EAFNOSUPPORT
}
