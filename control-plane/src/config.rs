//! The control plane's configuration: one struct, built by clap; every flag has a `WEFT_*`
//! environment variable and a documented default.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Default TLS gRPC address (xDS, identity, admin, federation).
pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:15012";
/// Default metrics address.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15014";

/// `weft-control-plane` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Directory of Kubernetes YAML to serve (the file source), watched for changes.
    #[arg(long, env = "WEFT_SOURCE_DIR", conflicts_with = "kubernetes")]
    pub source_dir: Option<PathBuf>,
    /// Read the world from the Kubernetes API (in-cluster config, KUBECONFIG, or
    /// `--kube-api`): watchers on every kind Weft reads; the replica holding the Lease writes
    /// `Accepted` conditions on Weft's own objects.
    #[arg(long, env = "WEFT_KUBERNETES")]
    pub kubernetes: bool,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "WEFT_LEASE_NAMESPACE", default_value = "weft-system")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "WEFT_LEASE_NAME", default_value = "weft-control-plane")]
    pub lease_name: String,
    /// How long an unrenewed Lease stays its holder's (renewed every third of it).
    #[arg(long, env = "WEFT_LEASE_DURATION", default_value = "15s", value_parser = crate::objects::parse_duration)]
    pub lease_duration: std::time::Duration,
    /// This cluster's name: the origin of the endpoints it serves.
    #[arg(long, env = "WEFT_CLUSTER_NAME", default_value = "cluster-1")]
    pub cluster_name: String,
    /// SPIFFE trust domain of the mesh's identities.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// This cluster's network: peers whose MeshPeer names another are reached through their
    /// gateways (their pods are not routable from here). Empty: the network every peer that
    /// names none shares.
    #[arg(long, env = "WEFT_NETWORK", default_value = "")]
    pub network: String,
    /// IPv4 range of clusterset virtual IPs: each `<svc>.<ns>.svc.clusterset.local` name gets a
    /// stable address from it, which the sidecars' mesh DNS answers and their outbound
    /// listener recognises. Class E by default (routed nowhere); `none` turns VIPs off.
    #[arg(long, env = "WEFT_CLUSTERSET_VIP_RANGE", default_value = crate::vip::DEFAULT_RANGE)]
    pub clusterset_vip_range: crate::vip::VipSetting,
    /// TLS gRPC address: xDS (client certificate required), CertificateService (join token or
    /// current SVID), admin, federation; served with the control plane's own SVID.
    #[arg(long, env = "WEFT_GRPC_ADDR", default_value = DEFAULT_GRPC_ADDR)]
    pub grpc_addr: SocketAddr,
    /// Plaintext ADS address, for local development and tests (off unless given): xDS only,
    /// anonymous — no certificates, tokens, admin or load reports. Loopback only, unless
    /// `--insecure-xds-plaintext-any-addr`.
    #[arg(long, env = "WEFT_XDS_PLAINTEXT_ADDR")]
    pub xds_plaintext_addr: Option<SocketAddr>,
    /// INSECURE: let `--xds-plaintext-addr` bind an address other hosts reach (anyone there
    /// then reads the mesh's config with no identity).
    #[arg(long, env = "WEFT_INSECURE_XDS_PLAINTEXT_ANY_ADDR")]
    pub insecure_xds_plaintext_any_addr: bool,
    /// Metrics address: /metrics, /ready, /live.
    #[arg(long, env = "WEFT_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// Directory of the mesh CA (root, intermediate, token key; generated there when absent,
    /// never overwritten). Without it the CA lives in memory and dies with the process.
    #[arg(long, env = "WEFT_CA_DIR", conflicts_with = "ca_root_dir")]
    pub ca_dir: Option<PathBuf>,
    /// Directory holding only the mesh root (`root.pem`, `root.key.pem`; read-only, e.g. a
    /// mounted Secret): this process makes its own intermediate under it, in memory. What
    /// the install manifests use; the join-token key is then in memory too.
    #[arg(long, env = "WEFT_CA_ROOT_DIR")]
    pub ca_root_dir: Option<PathBuf>,
    /// Accept Kubernetes service-account tokens as proof of identity, checked with the
    /// TokenReview API (needs RBAC `create` on `tokenreviews`).
    #[arg(long, env = "WEFT_TOKEN_REVIEW")]
    pub token_review: bool,
    /// Audiences a service-account token must be bound to (repeatable); the TokenReview asks
    /// for them and its answer must name one, so a pod's default API token (audience: the
    /// API server) proves nothing here. The injector projects tokens for `weft`.
    #[arg(
        long = "token-audience",
        env = "WEFT_TOKEN_AUDIENCES",
        value_delimiter = ',',
        default_value = weft_proto::keys::TOKEN_AUDIENCE
    )]
    pub token_audiences: Vec<String>,
    /// Longest lifetime of a join token: longer ones are neither minted nor accepted.
    #[arg(long, env = "WEFT_MAX_JOIN_TOKEN_TTL", default_value = "24h", value_parser = crate::objects::parse_duration)]
    pub max_join_token_ttl: std::time::Duration,
    /// The Kubernetes API server, e.g. `http://127.0.0.1:8001` (kubectl proxy); default: the
    /// in-cluster config or KUBECONFIG.
    #[arg(long, env = "WEFT_KUBE_API")]
    pub kube_api: Option<String>,
    /// How often sidecars report their load (LRS); rollouts judge canaries by these reports.
    #[arg(long, env = "WEFT_LOAD_REPORT_INTERVAL", default_value = "10s", value_parser = crate::objects::parse_duration)]
    pub load_report_interval: std::time::Duration,
    /// Directory for state the control plane must keep across restarts: rollout progress
    /// (`rollouts.json`) and redeemed and revoked join tokens (`join-tokens.json`); without
    /// it that state lives in memory (a restart makes redeemed tokens good again, unless
    /// `--kubernetes` shares the ledger).
    #[arg(long, env = "WEFT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Federate with another cluster's control plane: `NAME=HOST:PORT` of its TLS gRPC port
    /// (repeatable, or comma-separated in the variable). `MeshPeer` objects in the source add
    /// more; a flag wins over an object naming the same cluster.
    #[arg(long = "peer", env = "WEFT_PEERS", value_delimiter = ',', value_parser = crate::federation::parse_peer_flag)]
    pub peers: Vec<(String, String)>,
    /// How often this control plane sends each peer a heartbeat when nothing changed.
    #[arg(long, env = "WEFT_FEDERATION_HEARTBEAT", default_value = "5s", value_parser = crate::objects::parse_duration)]
    pub federation_heartbeat: std::time::Duration,
    /// How long without an update or heartbeat before a peer's link counts as lost.
    #[arg(long, env = "WEFT_FEDERATION_TIMEOUT", default_value = "15s", value_parser = crate::objects::parse_duration)]
    pub federation_timeout: std::time::Duration,
    /// How long a lost peer's endpoints stay (marked stale) before they are removed.
    #[arg(long, env = "WEFT_PEER_GRACE", default_value = "2m", value_parser = crate::objects::parse_duration)]
    pub peer_grace: std::time::Duration,
    /// INSECURE, for single-host development only: accept loopback endpoints from peers
    /// (refused by default: a peer exporting 127.0.0.1 would point this cluster's callers at
    /// their own host).
    #[arg(long, env = "WEFT_INSECURE_FEDERATION_LOOPBACK")]
    pub insecure_federation_loopback: bool,
    /// Name of this replica, shown by `weftctl status` (default: the host name).
    #[arg(long, env = "WEFT_REPLICA")]
    pub replica: Option<String>,
    /// The Service whose ready endpoints (port `grpc-tls`) are this control plane's replicas:
    /// admin queries (`weftctl status`, `endpoints --proxy`, `proxy-config`, `check`) ask
    /// every one and merge, so any replica gives the mesh-wide view. `none` to turn it off.
    #[arg(
        long,
        env = "WEFT_REPLICA_SERVICE",
        default_value = "weft-system/weft-control-plane"
    )]
    pub replica_service: String,
    /// More replicas to ask, by their TLS gRPC `HOST:PORT` (repeatable, or comma-separated in
    /// the variable), for deployments without that Service.
    #[arg(
        long = "replica-addr",
        env = "WEFT_REPLICA_ADDRS",
        value_delimiter = ','
    )]
    pub replica_addrs: Vec<String>,
    /// End each proxy's xDS stream after this long (±10 % jitter; it reconnects at once,
    /// resuming from the versions it holds), so proxies spread again over the replicas after
    /// one restarted. `0s` keeps streams forever.
    #[arg(long, env = "WEFT_XDS_MAX_STREAM_AGE", default_value = "30m", value_parser = crate::objects::parse_duration)]
    pub xds_max_stream_age: std::time::Duration,
    /// Log filter (tracing env-filter syntax), e.g. `info` or `weft_control_plane=debug`.
    #[arg(long, env = "WEFT_LOG", default_value = "info")]
    pub log: String,
    /// Log line format: `text` (colour only on a terminal) or `json` (one object per line).
    #[arg(long, env = "WEFT_LOG_FORMAT", default_value = "text")]
    pub log_format: weft_proto::logging::LogFormat,
}

/// A configuration that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No source of services.
    #[error(
        "no source: pass --kubernetes (WEFT_KUBERNETES) to read the Kubernetes API, or --source-dir DIR (WEFT_SOURCE_DIR) for a directory of YAML"
    )]
    NoSource,
    /// Bad cluster name.
    #[error("--cluster-name {0:?}: {1}")]
    ClusterName(String, String),
    /// Bad `--replica-service`.
    #[error("--replica-service: {0}")]
    ReplicaService(String),
    /// Bad trust domain.
    #[error("--trust-domain {0:?}: {1}")]
    TrustDomain(String, String),
    /// The plaintext port would be reachable from other hosts.
    #[error(
        "--xds-plaintext-addr {0} is not a loopback address: the plaintext port serves config to anyone who reaches it; bind 127.0.0.1, or pass --insecure-xds-plaintext-any-addr (WEFT_INSECURE_XDS_PLAINTEXT_ANY_ADDR) to accept that"
    )]
    PlaintextNotLoopback(SocketAddr),
}

impl Config {
    /// A configuration for tests and the demo: file source, everything on loopback port 0.
    pub fn local(source_dir: impl Into<PathBuf>) -> Self {
        let any = |s: &str| s.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        Config {
            source_dir: Some(source_dir.into()),
            kubernetes: false,
            lease_namespace: "weft-system".into(),
            lease_name: "weft-control-plane".into(),
            lease_duration: std::time::Duration::from_secs(15),
            cluster_name: "cluster-1".into(),
            trust_domain: "cluster.local".into(),
            clusterset_vip_range: crate::vip::VipSetting(crate::vip::DEFAULT_RANGE.parse().ok()),
            network: String::new(),
            grpc_addr: any("127.0.0.1:0"),
            xds_plaintext_addr: Some(any("127.0.0.1:0")),
            insecure_xds_plaintext_any_addr: false,
            metrics_addr: any("127.0.0.1:0"),
            replica: Some("local".into()),
            peers: Vec::new(),
            federation_heartbeat: std::time::Duration::from_secs(5),
            federation_timeout: std::time::Duration::from_secs(15),
            peer_grace: std::time::Duration::from_secs(120),
            // Everything runs on one host here: peers' endpoints are loopback addresses.
            insecure_federation_loopback: true,
            ca_dir: None,
            ca_root_dir: None,
            token_review: false,
            load_report_interval: std::time::Duration::from_secs(1),
            state_dir: None,
            token_audiences: vec![weft_proto::keys::TOKEN_AUDIENCE.into()],
            max_join_token_ttl: std::time::Duration::from_secs(24 * 3600),
            kube_api: None,
            log: "info".into(),
            replica_service: "none".into(),
            replica_addrs: Vec::new(),
            xds_max_stream_age: std::time::Duration::ZERO,
            log_format: weft_proto::logging::LogFormat::Text,
        }
    }

    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.source_dir.is_none() && !self.kubernetes {
            return Err(ConfigError::NoSource);
        }
        weft_proto::spiffe::validate_dns_subdomain("cluster name", &self.cluster_name)
            .map_err(|e| ConfigError::ClusterName(self.cluster_name.clone(), e.to_string()))?;
        weft_proto::SpiffeId::new(&self.trust_domain, "ns", "sa")
            .map_err(|e| ConfigError::TrustDomain(self.trust_domain.clone(), e.to_string()))?;
        self.replica_service_key()?;
        if let Some(a) = self.xds_plaintext_addr
            && !a.ip().is_loopback()
            && !self.insecure_xds_plaintext_any_addr
        {
            return Err(ConfigError::PlaintextNotLoopback(a));
        }
        Ok(())
    }

    /// `--replica-service` parsed: the Service whose endpoints are the replicas, if any.
    pub fn replica_service_key(&self) -> Result<Option<crate::catalog::ServiceKey>, ConfigError> {
        crate::replicas::parse_service(&self.replica_service).map_err(ConfigError::ReplicaService)
    }
}
