//! What the outbound and inbound listeners share ([`ListenerContext`]).

use std::sync::Arc;

/// What both listeners share: the workload's namespace and identity, the config, metrics and
/// the connection-level limits.
#[derive(Clone)]
pub struct ListenerContext {
    /// The workload's namespace (short hosts resolve in it; its mTLS mode applies inbound).
    pub namespace: String,
    /// The proxy's cluster (`--cluster`).
    pub cluster: String,
    /// Ports whose server speaks first: never wait for the client's bytes.
    pub server_first_ports: Vec<u16>,
    /// Slowloris protection: an HTTP head must arrive whole within this.
    pub header_read_timeout: std::time::Duration,
    /// The accepted config.
    pub xds: crate::xds::XdsHandle,
    /// The workload's SVID, when it has an identity.
    pub svid: Option<crate::identity::SvidCell>,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The proxy's own listener ports: a redirected connection headed to one of them is
    /// refused by inbound (a remote caller must never reach outbound or admin through it).
    pub own_ports: Vec<u16>,
    /// Downstream idle timeout (zero: none).
    pub idle_timeout: std::time::Duration,
    /// Open connections per listener at most.
    pub max_connections: usize,
}
