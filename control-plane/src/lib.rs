//! Weft's control plane: sources -> catalog -> translator -> Envoy xDS v3 (ADS, state of the
//! world and delta), plus the `weft.admin.v1` API and Prometheus metrics.
//!
//! [`ControlPlane::start`] binds every listener first (a bind error stops start-up), then runs
//! the source, the translator and the servers as tasks that end when the handle is dropped.

pub mod admin;
pub mod authz;
pub mod catalog;
pub mod check;
pub mod config;
pub mod crd;
pub mod federation;
pub mod grpc_tls;
pub mod identity;
pub mod inbound;
pub mod leader;
pub mod ledger;
pub mod lrs;
pub mod metrics;
pub mod netpol;
pub mod objects;
pub mod peer_auth;
pub mod replicas;
pub mod rollout;
pub mod source;
pub mod state_file;
pub mod token_review;
pub mod translate;
pub mod vip;
pub mod xds;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use weft_proto::admin::admin_server::AdminServer;
use weft_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;

pub use config::Config;

use catalog::Catalog;
use metrics::Metrics;
use translate::Translation;

/// Locks a mutex, taking the data even when another thread panicked while holding it: every
/// structure kept under a lock here is valid after any single write (no multi-step invariants),
/// so a panic elsewhere must not take the control plane down with it.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Largest xDS message accepted or sent (a full mesh's listeners can be large).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration cannot run.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// What the listener is for.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The file source could not start.
    #[error(transparent)]
    Source(#[from] source::file::FileSourceError),
    /// The CA could not be loaded or made.
    #[error("CA: {0}")]
    Ca(#[from] identity::CaError),
    /// The Kubernetes API for TokenReview cannot be used.
    #[error("--token-review: {0}")]
    TokenReview(#[from] token_review::ReviewError),
    /// The TLS port could not be set up.
    #[error("TLS gRPC port: {0}")]
    Tls(#[from] grpc_tls::GrpcTlsError),
    /// The Kubernetes API cannot be used.
    #[error("--kubernetes: {0}")]
    Kubernetes(String),
    /// The join-token ledger cannot be read.
    #[error("--state-dir: {0}")]
    Ledger(#[from] ledger::LedgerError),
}

/// A running control plane; dropping it stops every task.
pub struct ControlPlane {
    /// Where plaintext ADS is served (local development), when enabled.
    pub xds_addr: Option<SocketAddr>,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// Where TLS gRPC (xDS, identity, admin) is served.
    pub grpc_addr: SocketAddr,
    /// The mesh CA.
    pub ca: Arc<identity::Ca>,
    /// Load reported by the proxies (LRS).
    pub load: Arc<lrs::LoadStore>,
    /// The rollout controller.
    pub rollouts: Arc<rollout::Controller>,
    /// Where /metrics, /ready, /live are served.
    pub metrics_addr: SocketAddr,
    /// The catalog.
    pub catalog: Arc<Catalog>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The latest translation.
    pub translations: watch::Receiver<Arc<Translation>>,
    /// Federation: peer states.
    pub peers: Arc<federation::PeerBook>,
    /// Whether this replica holds the leader Lease (always true with the file source).
    pub leader: watch::Receiver<bool>,
    /// Dropped with the control plane: ends streams that outlive the server task.
    _stop: watch::Sender<()>,
    _tasks: Tasks,
}

/// The control plane's tasks, aborted together when dropped: with the control plane, or
/// when `start` fails half-way (a task started before the failure must not live on).
#[derive(Default)]
struct Tasks(Vec<JoinHandle<()>>);

impl Tasks {
    fn push(&mut self, t: JoinHandle<()>) {
        self.0.push(t);
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

impl ControlPlane {
    /// Validates the config, binds, and starts serving.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        // The CA first: a replica that cannot sign must fail before it binds, watches or
        // takes the leader Lease (an installed replica once crash-looped on an unreadable
        // root *after* winning the Lease).
        let ca = Arc::new(match &config.ca_root_dir {
            Some(root) => identity::Ca::under_root(root, &config.cluster_name)?,
            None => identity::Ca::load_or_generate(
                config.ca_dir.as_deref(),
                &config.trust_domain,
                &config.cluster_name,
            )?,
        });
        ca.check_cluster(&config.cluster_name)?;
        let tokens = Arc::new(
            identity::token_key(config.ca_dir.as_deref(), &config.trust_domain)?
                .with_max_ttl(config.max_join_token_ttl.as_secs())
                .with_cluster(&config.cluster_name),
        );
        let mut ledger = ledger::Ledger::open(config.state_dir.as_deref())?;
        // The Kubernetes API client, when the world comes from it (TokenReview has its own).
        let kube_client = match config.kubernetes {
            true => Some(
                token_review::TokenReviewer::client(config.kube_api.as_deref())
                    .await
                    .map_err(|e| StartError::Kubernetes(e.to_string()))?,
            ),
            false => None,
        };
        // With the Kubernetes API, every replica redeems join tokens through it.
        if let Some(client) = &kube_client {
            ledger = ledger.shared_through(client.clone(), &config.lease_namespace);
        }
        let ledger = Arc::new(ledger);
        let xds_listener = match config.xds_plaintext_addr {
            Some(addr) => Some(bind("plaintext xDS", addr).await?),
            None => None,
        };
        let grpc_listener = bind("TLS gRPC", config.grpc_addr).await?;
        let metrics_listener = bind("metrics", config.metrics_addr).await?;
        let local = |l: &TcpListener, what: &'static str, addr: SocketAddr| {
            l.local_addr()
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        let xds_addr = match (&xds_listener, config.xds_plaintext_addr) {
            (Some(l), Some(addr)) => Some(local(l, "plaintext xDS", addr)?),
            _ => None,
        };
        let grpc_addr = local(&grpc_listener, "TLS gRPC", config.grpc_addr)?;
        let metrics_addr = local(&metrics_listener, "metrics", config.metrics_addr)?;
        let replica = config.replica.clone().unwrap_or_else(hostname);
        let catalog = Arc::new(Catalog::new(&config.cluster_name, &config.trust_domain));
        catalog.set_vip_range(config.clusterset_vip_range.0);
        catalog.set_network(&config.network);
        let metrics = Arc::new(Metrics::new());
        let mut tasks = Tasks::default();

        // The source reads everything once, then watches; serving waits for that first view.
        let (leader_tx, leader_rx) = watch::channel(kube_client.is_none());
        // Replicated: the leader's rollout decisions reach the others through Rollout status.
        let (rollout_tx, rollout_rx) = tokio::sync::mpsc::unbounded_channel();
        if let Some(client) = kube_client.clone() {
            tasks.push(tokio::spawn(source::kube::run(
                client,
                catalog.clone(),
                metrics.clone(),
                leader_rx.clone(),
                rollout_rx,
            )));
        } else if let Some(dir) = config.source_dir.clone() {
            if !dir.is_dir() {
                return Err(source::file::FileSourceError::Dir {
                    path: dir,
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
                }
                .into());
            }
            let (catalog, metrics) = (catalog.clone(), metrics.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = source::file::run(dir, catalog, metrics).await {
                    tracing::error!(error = %e, "file source stopped; the last good state keeps serving");
                }
            }));
        }
        // Wait for the source's first full view (bounded: a failing source does not block start).
        let mut models = catalog.subscribe();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            models.wait_for(|m| m.ready),
        )
        .await;

        // The translator: one translation per model version, shared by every stream.
        let model = catalog.current();
        metrics.observe_model(&model);
        let (ttx, trx) = watch::channel(Arc::new(translate::translate(&model, None)));
        let snapshots = Arc::new(xds::view::SnapshotCache::default());
        {
            let metrics = metrics.clone();
            let snapshots = snapshots.clone();
            tasks.push(tokio::spawn(async move {
                while models.changed().await.is_ok() {
                    let model = models.borrow_and_update().clone();
                    let prev = ttx.borrow().clone();
                    let started = std::time::Instant::now();
                    let t = Arc::new(translate::translate(&model, Some(&prev)));
                    // Advance every place's snapshot before streams look, off their tasks.
                    snapshots.advance_all(&t);
                    metrics.observe_model(&model);
                    tracing::debug!(version = model.version, changed = t.changed.len(), elapsed = ?started.elapsed(), "translated");
                    ttx.send_replace(t);
                }
            }));
        }

        let load = Arc::new(lrs::LoadStore::default());
        let registry = Arc::new(xds::registry::Registry::default());
        let mut controller = rollout::Controller::new(
            catalog.clone(),
            load.clone(),
            metrics.clone(),
            config.state_dir.clone(),
        );
        if kube_client.is_some() {
            controller = controller.with_leadership(leader_rx.clone(), rollout_tx);
        }
        let rollouts = Arc::new(controller);
        tasks.push(tokio::spawn(rollouts.clone().run()));
        let lrs_service = weft_proto::envoy::envoy::service::load_stats::v3::load_reporting_service_server::LoadReportingServiceServer::new(
            lrs::LrsServer::new(
                load.clone(),
                config.load_report_interval,
                metrics.clone(),
                registry.clone(),
            ),
        );
        let shared = Arc::new(xds::Shared {
            translations: trx.clone(),
            registry: registry.clone(),
            snapshots,
            push_gate: Arc::new(tokio::sync::Semaphore::new(xds::PUSH_GATE)),
            metrics: metrics.clone(),
            max_stream_age: (!config.xds_max_stream_age.is_zero())
                .then_some(config.xds_max_stream_age),
        });
        let ads = AggregatedDiscoveryServiceServer::new(xds::AdsServer::new(shared))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (stop, stopped) = watch::channel(());
        let fed = Arc::new(federation::Federation {
            stopped,
            cluster: config.cluster_name.clone(),
            trust_domain: config.trust_domain.clone(),
            settings: federation::Settings {
                heartbeat: config.federation_heartbeat,
                timeout: config.federation_timeout,
                grace: config.peer_grace,
                allow_loopback: config.insecure_federation_loopback,
            },
            book: Arc::new(federation::PeerBook::default()),
            catalog: catalog.clone(),
            metrics: metrics.clone(),
            flag_peers: config.peers.iter().map(|(n, _)| n.clone()).collect(),
        });
        let acceptor = grpc_tls::Acceptor::new(&ca, &config.trust_domain, &config.cluster_name)?;
        let issued_tls = acceptor.config();
        let replicas = Arc::new(replicas::Replicas::new(
            config.replica_service_key()?,
            config.replica_addrs.clone(),
            catalog.clone(),
            issued_tls.clone(),
            config.cluster_name.clone(),
        ));
        let issued = Arc::new(identity::IssuedCerts::default());
        let admin = AdminServer::new(admin::AdminService {
            replicas,
            issued: issued.clone(),
            ca: ca.clone(),
            federation: fed.clone(),
            catalog: catalog.clone(),
            registry,
            replica: replica.clone(),
            tokens: tokens.clone(),
            ledger: ledger.clone(),
            rollouts: rollouts.clone(),
        });
        let reviewer = match config.token_review {
            true => Some(Arc::new(token_review::TokenReviewer::new(
                token_review::TokenReviewer::client(config.kube_api.as_deref()).await?,
                config.token_audiences.clone(),
                &config.trust_domain,
            ))),
            false => None,
        };
        let certificates =
            weft_proto::identity::certificate_service_server::CertificateServiceServer::new(
                identity::CertificateService {
                    ca: ca.clone(),
                    tokens,
                    reviewer,
                    issued,
                    metrics: metrics.clone(),
                    ledger,
                },
            );
        let issued = issued_tls;
        tasks.push(tokio::spawn(grpc_tls::Acceptor::renew(
            issued.clone(),
            ca.clone(),
            config.trust_domain.clone(),
            config.cluster_name.clone(),
        )));
        tasks.push(tokio::spawn(federation::import::run(
            fed.clone(),
            issued.clone(),
            config.peers.clone(),
        )));
        let federation_service = weft_proto::federation::federation_server::FederationServer::new(
            federation::export::ExportService::new(fed.clone()),
        )
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
        {
            // Over TLS, xDS and admin want a caller with an SVID; signing takes a join token.
            use tonic::service::interceptor::InterceptedService;
            let authn = |req: tonic::Request<()>| grpc_tls::require_identity(&req).map(|_| req);
            let incoming =
                acceptor.incoming(grpc_listener, metrics.clone(), grpc_tls::Limits::default());
            let server = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
                .max_concurrent_streams(grpc_tls::MAX_CONCURRENT_STREAMS)
                .http2_max_pending_accept_reset_streams(Some(grpc_tls::MAX_PENDING_RESETS))
                .http2_max_local_error_reset_streams(Some(grpc_tls::MAX_LOCAL_RESETS))
                .add_service(InterceptedService::new(ads.clone(), authn))
                .add_service(admin)
                .add_service(InterceptedService::new(lrs_service, authn))
                .add_service(certificates)
                .add_service(federation_service);
            tasks.push(tokio::spawn(async move {
                if let Err(e) = server.serve_with_incoming(incoming).await {
                    tracing::error!(error = %e, "TLS gRPC server stopped");
                }
            }));
        }
        if let (Some(xds_listener), Some(addr)) = (xds_listener, xds_addr) {
            // ADS only: anonymous config for development. Certificates, tokens, admin and
            // load reports need the TLS port, where the caller proves who it is.
            match addr.ip().is_loopback() {
                true => {
                    tracing::warn!(%addr, "plaintext ADS port open on loopback (development only): config without identity; no certificates, tokens, admin or load reports there")
                }
                false => {
                    tracing::warn!(%addr, "INSECURE: plaintext ADS port open to other hosts (--insecure-xds-plaintext-any-addr): anyone reaching it reads the mesh's config")
                }
            }
            tasks.push(tokio::spawn(async move {
                let result = tonic::transport::Server::builder()
                    .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
                    .max_concurrent_streams(grpc_tls::MAX_CONCURRENT_STREAMS)
                    .http2_max_pending_accept_reset_streams(Some(grpc_tls::MAX_PENDING_RESETS))
                    .http2_max_local_error_reset_streams(Some(grpc_tls::MAX_LOCAL_RESETS))
                    .add_service(ads)
                    .serve_with_incoming(nodelay(TcpListenerStream::new(xds_listener)))
                    .await;
                if let Err(e) = result {
                    tracing::error!(error = %e, "plaintext xDS server stopped");
                }
            }));
        }
        tasks.push(tokio::spawn(metrics::serve(
            metrics_listener,
            metrics.clone(),
        )));
        // Leader election last: only a replica that serves may hold the Lease.
        match kube_client {
            Some(client) => tasks.push(tokio::spawn(leader::run(
                client,
                leader::LeaseConfig {
                    name: config.lease_name.clone(),
                    namespace: config.lease_namespace.clone(),
                    identity: replica,
                    duration: config.lease_duration,
                    renew_every: config.lease_duration / 3,
                },
                leader_tx,
            ))),
            None => drop(leader_tx),
        }
        tracing::info!(?xds_addr, %grpc_addr, %metrics_addr, cluster = %config.cluster_name, "control plane serving");
        Ok(ControlPlane {
            xds_addr,
            trust_domain: config.trust_domain.clone(),
            grpc_addr,
            ca,
            load,
            rollouts,
            metrics_addr,
            catalog,
            metrics,
            translations: trx,
            peers: fed.book.clone(),
            leader: leader_rx,
            _stop: stop,
            _tasks: tasks,
        })
    }
}

/// Accepted connections without Nagle's algorithm: a small gRPC response must not wait for
/// the peer's delayed ACK (40 ms a round trip on Linux).
fn nodelay(
    incoming: TcpListenerStream,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::StreamExt::map(incoming, |conn| {
        conn.inspect(|c| {
            let _ = c.set_nodelay(true);
        })
    })
}

impl ControlPlane {
    /// The plaintext xDS address, for tests and the demo, which always enable it.
    ///
    /// # Panics
    /// When the control plane was started without `xds_plaintext_addr`.
    pub fn plaintext(&self) -> SocketAddr {
        self.xds_addr
            .expect("this control plane was started without a plaintext xDS address")
    }

    /// Credentials for operator `name`, valid a day, from this control plane's CA (what the
    /// demo and tests give `weftctl`).
    pub fn operator(
        &self,
        name: &str,
    ) -> Result<weft_proto::credentials::Credentials, identity::SignError> {
        self.ca.issue_operator(
            &self.trust_domain,
            name,
            std::time::Duration::from_secs(24 * 3600),
        )
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "weft-control-plane".into())
}
