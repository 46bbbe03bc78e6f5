//! The sidecar's configuration: one struct per subcommand, built by clap; every flag has a
//! `WEFT_*` environment variable.

use std::net::SocketAddr;

/// `weft-sidecar run` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct RunConfig {
    /// Control plane gRPC address (`HOST:PORT`, a name is resolved once at start): its TLS port
    /// (15012), or with `--plaintext-xds` its plaintext development port (15010).
    #[arg(long, env = "WEFT_XDS_ADDR", default_value = "127.0.0.1:15012", value_parser = resolve_addr)]
    pub xds_addr: SocketAddr,
    /// Take config from the control plane's plaintext ADS port, without identity (local
    /// development only: no certificate, so no mTLS; refused with `--join-token`).
    #[arg(long, env = "WEFT_PLAINTEXT_XDS")]
    pub plaintext_xds: bool,
    /// PEM file of the mesh's root(s): how the sidecar recognises its control plane before it
    /// has an SVID (afterwards the CA's bundle, renewed with each certificate, is used).
    /// Required unless `--plaintext-xds`.
    #[arg(long, env = "WEFT_TRUST_BUNDLE")]
    pub trust_bundle: Option<std::path::PathBuf>,
    /// The mesh's root(s) as PEM text instead of a file (what the injector sets).
    #[arg(long, env = "WEFT_TRUST_BUNDLE_PEM", hide_env_values = true)]
    pub trust_bundle_pem: Option<String>,
    /// A file holding the proof of identity, re-read at every certificate request: a join token
    /// or a projected Kubernetes service-account token (which the kubelet rotates).
    #[arg(long, env = "WEFT_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// Health listener for kubelet probes (`/ready`, `/live`, and the application's probes
    /// at the paths `--app-probes` lists); off unless given (the injector sets `0.0.0.0:15021`).
    #[arg(long, env = "WEFT_HEALTH_ADDR")]
    pub health_addr: Option<SocketAddr>,
    /// The application's probes the health listener may run, as JSON: health path -> probe
    /// (`{"httpGet": {"port": 8080, "path": "/healthz"}}`, `{"tcpSocket": {"port": 5432}}`,
    /// `{"grpc": {"port": 9090}}`); what the injector sets. Nothing else is forwarded.
    #[arg(long, env = "WEFT_APP_PROBES", default_value = "{}", value_parser = parse_app_probes)]
    pub app_probes: weft_proto::probes::AppProbes,
    /// xDS node id (default: `<pod>.<namespace>` from the environment, else the host name).
    #[arg(long, env = "WEFT_NODE_ID")]
    pub node_id: Option<String>,
    /// The pod's IP addresses, comma-separated (the injector sets them from `status.podIPs`):
    /// the control plane finds the Service ports this pod serves by them, when its
    /// EndpointSlices do not name the pod.
    #[arg(long, env = "WEFT_POD_IPS", value_delimiter = ',')]
    pub pod_ips: Vec<std::net::IpAddr>,
    /// The workload's namespace: short hosts (`echo`) resolve in it.
    #[arg(long, env = "WEFT_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// The workload's service account.
    #[arg(long, env = "WEFT_SERVICE_ACCOUNT", default_value = "default")]
    pub service_account: String,
    /// The cluster the proxy runs in; over TLS its control plane must be that cluster's (empty:
    /// any cluster's of the mesh).
    #[arg(long, env = "WEFT_CLUSTER", default_value = "")]
    pub cluster: String,
    /// The proxy's region.
    #[arg(long, env = "WEFT_REGION", default_value = "")]
    pub region: String,
    /// The proxy's zone: endpoints in it win.
    #[arg(long, env = "WEFT_ZONE", default_value = "")]
    pub zone: String,
    /// Outbound listener (redirected or explicit HTTP). Loopback by default: iptables' OUTPUT
    /// REDIRECT lands on 127.0.0.1, and no other host may use this pod's identity through it.
    #[arg(long, env = "WEFT_OUTBOUND_ADDR", default_value = "127.0.0.1:15001")]
    pub outbound_addr: SocketAddr,
    /// Inbound listener.
    #[arg(long, env = "WEFT_INBOUND_ADDR", default_value = "0.0.0.0:15006")]
    pub inbound_addr: SocketAddr,
    /// IPv6 outbound listener (where ip6tables' OUTPUT REDIRECT lands).
    #[arg(long, env = "WEFT_OUTBOUND_ADDR6", default_value = "[::1]:15001")]
    pub outbound_addr6: SocketAddr,
    /// IPv6 inbound listener (IPv6 only; IPv4 has its own).
    #[arg(long, env = "WEFT_INBOUND_ADDR6", default_value = "[::]:15006")]
    pub inbound_addr6: SocketAddr,
    /// Do not listen on IPv6 (the IPv6 listeners are otherwise opened whenever the pod has
    /// IPv6; `init` intercepts IPv6 whenever the pod has it).
    #[arg(long, env = "WEFT_NO_IPV6")]
    pub no_ipv6: bool,
    /// Admin listener: /metrics /ready /live /config_dump.
    #[arg(long, env = "WEFT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// The local application inbound traffic is forwarded to.
    #[arg(long, env = "WEFT_APP_ADDR")]
    pub app_addr: Option<SocketAddr>,
    /// Intercepted destination ports whose server speaks first (MySQL, SMTP, ...): opaque TCP
    /// at once, never waiting for protocol detection.
    #[arg(
        long,
        env = "WEFT_SERVER_FIRST_PORTS",
        value_delimiter = ',',
        default_value = "21,25,110,143,587,3306"
    )]
    pub server_first_ports: Vec<u16>,
    /// Join token proving the workload's identity to the control plane's CertificateService
    /// (minted with `weftctl token create`); without it the sidecar has no certificate.
    #[arg(long, env = "WEFT_JOIN_TOKEN")]
    pub join_token: Option<String>,
    /// Trust domain of the workload's SPIFFE ID.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Lifetime to ask for the workload's certificate (the CA caps it).
    #[arg(long, env = "WEFT_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub cert_ttl: std::time::Duration,
    /// OTLP/gRPC collector for request spans, e.g. `http://127.0.0.1:4317` (off when unset).
    #[arg(long, env = "WEFT_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// xDS flavour: delta (incremental; falls back to sotw when the server lacks it) or sotw.
    #[arg(long, env = "WEFT_XDS_PROTOCOL", value_enum, default_value = "delta")]
    pub xds_protocol: XdsProtocol,
    /// What config the proxy holds: `on-demand` (a directory of every Service, and the routes,
    /// cluster and endpoints of a service-port only once a request or connection uses it;
    /// needs delta xDS) or `all` (every Service's, as Envoy with wildcard CDS; always for an
    /// east-west gateway, which forwards to any exported Service). `RunConfig::local`, what
    /// in-process tests and embedders start from, says `all`.
    #[arg(long, env = "WEFT_DISCOVERY", value_enum, default_value = "on-demand")]
    pub discovery: Discovery,
    /// On demand: how long the first request to a service-port waits for its config; then it
    /// gets 503 `x-weft-reason: discovery-timeout` (an opaque connection is closed).
    #[arg(long, env = "WEFT_DISCOVERY_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub discovery_timeout: std::time::Duration,
    /// On demand: a service-port unused this long is unsubscribed (`0s`: never).
    #[arg(long, env = "WEFT_DISCOVERY_IDLE", default_value = "10m", value_parser = parse_duration)]
    pub discovery_idle: std::time::Duration,
    /// On demand: hosts subscribed at start and never dropped (the warm set), comma
    /// separated, in any form a request may name them (`echo`, `db.data:5432`,
    /// `api.shop.svc.clusterset.local:8080`); a host without a port warms each of its ports.
    #[arg(long, env = "WEFT_WARM_HOSTS", value_delimiter = ',')]
    pub warm_hosts: Vec<String>,
    /// A request head must arrive whole within this (slowloris protection).
    #[arg(long, env = "WEFT_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: std::time::Duration,
    /// On SIGTERM: how long in-flight requests get to finish after the listeners close.
    #[arg(long, env = "WEFT_DRAIN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: std::time::Duration,
    /// Close a downstream connection (HTTP or opaque TCP) after this long without a byte
    /// either way; `0s` never.
    #[arg(long, env = "WEFT_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub idle_timeout: std::time::Duration,
    /// Open connections each of the outbound and inbound listeners takes at most; more are
    /// closed at once and counted (`weft_proxy_connections_closed_total{reason="max-connections"}`).
    #[arg(long, env = "WEFT_MAX_CONNECTIONS", default_value_t = 16384)]
    pub max_connections: usize,
    /// Serve as this cluster's east-west gateway on this address (what other networks reach):
    /// mTLS tunnels (`weft-tunnel`) from callers with a mesh identity, each to one endpoint of a
    /// Service this cluster exports. Needs an identity and `--cluster`. Off unless given.
    #[arg(long, env = "WEFT_GATEWAY_ADDR")]
    pub gateway_addr: Option<SocketAddr>,
    /// Mesh DNS (UDP and TCP): answers A/AAAA for the mesh names the proxy holds (every
    /// `*.svc.cluster.local` Service with its clusterIP, every `*.svc.clusterset.local` name
    /// with its clusterset VIP) and forwards every other query unchanged to `--dns-upstream`.
    /// Off unless given; `weft-sidecar init --redirect-dns-port` sends the pod's port 53 here.
    #[arg(long, env = "WEFT_DNS_ADDR")]
    pub dns_addr: Option<SocketAddr>,
    /// Where the mesh DNS forwards what it does not answer (comma-separated); default: the
    /// `nameserver`s of /etc/resolv.conf (the pod's original resolver), read at start.
    #[arg(long, env = "WEFT_DNS_UPSTREAM", value_delimiter = ',')]
    pub dns_upstream: Vec<SocketAddr>,
    /// Queries per second the mesh DNS takes (UDP and TCP together, bursts up to as many);
    /// beyond, it answers REFUSED and counts them (`answer="limited"`).
    #[arg(long, env = "WEFT_DNS_MAX_QPS", default_value_t = 2000)]
    pub dns_max_qps: u32,
    /// Forwarded queries awaiting the upstream at once; beyond, REFUSED (`answer="limited"`).
    #[arg(long, env = "WEFT_DNS_MAX_INFLIGHT", default_value_t = 256)]
    pub dns_max_inflight: usize,
    /// Log filter (tracing env-filter syntax).
    #[arg(long, env = "WEFT_LOG", default_value = "info")]
    pub log: String,
    /// Log line format: `text` (colour only on a terminal) or `json` (one object per line).
    #[arg(long, env = "WEFT_LOG_FORMAT", default_value = "text")]
    pub log_format: weft_proto::logging::LogFormat,
}

/// What config a proxy holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Discovery {
    /// The directory, and what is used when it is used.
    OnDemand,
    /// Everything.
    All,
}

/// xDS protocol flavours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XdsProtocol {
    /// Incremental xDS.
    Delta,
    /// State of the world.
    Sotw,
}

/// Parses `500ms`, `5s`, `1m`, `2h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 5s or 1m"))?;
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "s" | "" => Ok(std::time::Duration::from_secs(n)),
        "m" => Ok(std::time::Duration::from_secs(n * 60)),
        "h" => Ok(std::time::Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unit must be ms, s, m or h")),
    }
}

/// Parses `HOST:PORT`, resolving a name once (the control plane's Service address is stable).
pub fn resolve_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .map_err(|e| format!("{s:?}: {e} (expected HOST:PORT)"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

impl RunConfig {
    /// A configuration for tests and the demo: every listener on `ip` port 0.
    pub fn local(xds_addr: SocketAddr, ip: std::net::IpAddr, node_id: &str) -> Self {
        let at = |port| SocketAddr::new(ip, port);
        RunConfig {
            xds_addr,
            plaintext_xds: true,
            trust_bundle: None,
            trust_bundle_pem: None,
            token_file: None,
            health_addr: None,
            app_probes: weft_proto::probes::AppProbes::default(),
            node_id: Some(node_id.into()),
            pod_ips: if ip.is_unspecified() {
                Vec::new()
            } else {
                vec![ip]
            },
            namespace: "default".into(),
            service_account: "default".into(),
            cluster: String::new(),
            region: String::new(),
            zone: String::new(),
            outbound_addr: at(0),
            inbound_addr: at(0),
            admin_addr: at(0),
            outbound_addr6: SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0)),
            inbound_addr6: SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0)),
            no_ipv6: true,
            app_addr: None,
            server_first_ports: vec![21, 25, 110, 143, 587, 3306],
            drain_timeout: std::time::Duration::from_secs(5),
            header_read_timeout: std::time::Duration::from_secs(10),
            xds_protocol: XdsProtocol::Delta,
            discovery: Discovery::All,
            discovery_timeout: std::time::Duration::from_secs(3),
            discovery_idle: std::time::Duration::from_secs(600),
            warm_hosts: Vec::new(),
            otlp_endpoint: None,
            join_token: None,
            trust_domain: "cluster.local".into(),
            cert_ttl: std::time::Duration::from_secs(24 * 3600),
            log: "info".into(),
            idle_timeout: std::time::Duration::from_secs(3600),
            max_connections: 16384,
            gateway_addr: None,
            dns_addr: None,
            dns_upstream: Vec::new(),
            dns_max_qps: 2000,
            dns_max_inflight: 256,
            log_format: weft_proto::logging::LogFormat::Text,
        }
    }

    /// The node id to announce.
    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            match (std::env::var("POD_NAME"), std::env::var("POD_NAMESPACE")) {
                (Ok(p), Ok(n)) => format!("{p}.{n}"),
                _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| "weft-sidecar".into()),
            }
        })
    }
}

/// Parses `--app-probes` (JSON), naming what is wrong.
pub fn parse_app_probes(s: &str) -> Result<weft_proto::probes::AppProbes, String> {
    let probes: weft_proto::probes::AppProbes = serde_json::from_str(s)
        .map_err(|e| format!("not a JSON object of health path -> probe: {e}"))?;
    for path in probes.0.keys() {
        if !path.starts_with("/app-health/") {
            return Err(format!("{path:?}: probe paths start with /app-health/"));
        }
    }
    Ok(probes)
}
