//! Federation (`weft.federation.v1`): control planes of different clusters stream each other
//! the services their cluster exports (MCS `ServiceExport`), over mTLS on the TLS gRPC port.
//!
//! - [`export`]: the server side. A caller must present the control-plane SVID with the DNS SAN
//!   naming its cluster ([`weft_proto::tls::control_plane_dns_name`]), that cluster must be
//!   the one it says it is in the request, and it must be a configured peer (`--peer` or a
//!   MeshPeer): peering is configured on both sides. It gets a snapshot, then changes, then a heartbeat
//!   whenever nothing changed for [`Settings::heartbeat`].
//! - [`import`]: the client side, one task per peer (`--peer NAME=ADDR` or a `MeshPeer`). It
//!   checks the server's certificate names the peer's cluster, validates every update (a peer
//!   may export only endpoints of its own cluster), and hands the result to the catalog. When
//!   the link is lost the peer's endpoints stay, marked stale, for [`Settings::grace`]; then
//!   they leave. A reconnect resyncs with a snapshot that replaces them in one step.
//!
//! What every peer looks like now is kept in a [`PeerBook`] (admin `ListPeers`, metrics).

pub mod export;
pub mod import;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The federation protocol version this control plane speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Federation timings.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// How often an exporter sends a heartbeat when nothing changed.
    pub heartbeat: Duration,
    /// How long an importer waits without hearing anything before it declares the link lost.
    pub timeout: Duration,
    /// How long a lost peer's endpoints are kept (stale) before they are removed.
    pub grace: Duration,
    /// Accept peers' loopback endpoints (`--insecure-federation-loopback`).
    pub allow_loopback: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
            grace: Duration::from_secs(120),
            allow_loopback: false,
        }
    }
}

/// Where a peer was configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `--peer NAME=ADDR`.
    Flag,
    /// A `MeshPeer` object in the source.
    MeshPeer,
}

impl Origin {
    /// The name `weftctl peers` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Flag => "flag",
            Origin::MeshPeer => "MeshPeer",
        }
    }
}

/// The state of the link to one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Never synced yet.
    Connecting,
    /// Streaming; its exports are current.
    Synced,
    /// Lost; its endpoints are kept, marked stale, until the grace period ends.
    Stale,
    /// Lost for longer than the grace period; its endpoints are gone.
    Expired,
}

impl LinkState {
    /// The name admin and `weftctl peers` show.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "CONNECTING",
            LinkState::Synced => "SYNCED",
            LinkState::Stale => "STALE",
            LinkState::Expired => "EXPIRED",
        }
    }
}

/// What is known about one peer.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// Dialed address.
    pub address: String,
    /// Where it was configured.
    pub origin: Origin,
    /// Link state.
    pub state: LinkState,
    /// When anything (snapshot, change, heartbeat) last arrived.
    pub last_heard: Option<Instant>,
    /// When the link was lost (while stale or expired).
    pub lost_at: Option<Instant>,
    /// The peer's catalog version last applied.
    pub version: u64,
    /// Services imported.
    pub services: u32,
    /// Endpoints imported.
    pub endpoints: u32,
    /// Why the last stream ended or was refused.
    pub last_error: String,
}

/// Every peer's state, plus which clusters stream our exports.
#[derive(Default)]
pub struct PeerBook {
    peers: Mutex<BTreeMap<String, PeerInfo>>,
    exporting_to: Mutex<BTreeMap<String, usize>>,
}

impl PeerBook {
    /// A copy of every peer's state, by cluster name.
    pub fn snapshot(&self) -> BTreeMap<String, PeerInfo> {
        crate::lock(&self.peers).clone()
    }

    /// Clusters streaming our exports now.
    pub fn exporting_to(&self) -> Vec<String> {
        crate::lock(&self.exporting_to).keys().cloned().collect()
    }

    /// Updates one peer's state (created as CONNECTING when new).
    pub fn update(&self, name: &str, address: &str, origin: Origin, f: impl FnOnce(&mut PeerInfo)) {
        let mut peers = crate::lock(&self.peers);
        let info = peers.entry(name.to_string()).or_insert_with(|| PeerInfo {
            address: address.to_string(),
            origin,
            state: LinkState::Connecting,
            last_heard: None,
            lost_at: None,
            version: 0,
            services: 0,
            endpoints: 0,
            last_error: String::new(),
        });
        info.address = address.to_string();
        info.origin = origin;
        f(info);
    }

    /// Forgets a peer that is no longer configured.
    pub fn remove(&self, name: &str) {
        crate::lock(&self.peers).remove(name);
    }

    fn export_started(&self, cluster: &str) {
        *crate::lock(&self.exporting_to)
            .entry(cluster.to_string())
            .or_default() += 1;
    }

    fn export_ended(&self, cluster: &str) {
        let mut m = crate::lock(&self.exporting_to);
        if let Some(n) = m.get_mut(cluster) {
            *n -= 1;
            if *n == 0 {
                m.remove(cluster);
            }
        }
    }
}

/// Shared by the export server and the import tasks.
pub struct Federation {
    /// This cluster's name.
    pub cluster: String,
    /// The mesh trust domain (imported identities must be in it).
    pub trust_domain: String,
    /// Timings.
    pub settings: Settings,
    /// Peer states.
    pub book: Arc<PeerBook>,
    /// The catalog exports are read from and imports written to.
    pub catalog: Arc<crate::catalog::Catalog>,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Closes when the control plane stops: export streams end with it (tonic keeps open
    /// connections' tasks running after its server task ends).
    pub stopped: tokio::sync::watch::Receiver<()>,
    /// Clusters named by `--peer` flags (with MeshPeer objects: whom the exporter serves).
    pub flag_peers: Vec<String>,
}

impl Federation {
    /// Whether cluster `name` is a configured peer (a `--peer` flag or a MeshPeer object):
    /// only those get this cluster's exports, whatever certificate another presents.
    pub fn is_configured_peer(&self, name: &str) -> bool {
        self.flag_peers.iter().any(|p| p == name) || self.catalog.current().peers.contains_key(name)
    }
}

/// Parses `--peer NAME=ADDR`.
pub fn parse_peer_flag(s: &str) -> Result<(String, String), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=HOST:PORT"))?;
    weft_proto::spiffe::validate_dns_subdomain("peer cluster name", name)
        .map_err(|e| format!("{s:?}: {e}"))?;
    crate::objects::check_peer_address(addr).map_err(|e| format!("{s:?}: {e}"))?;
    Ok((name.to_string(), addr.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_flags_parse_or_say_why() {
        assert_eq!(
            parse_peer_flag("east=10.0.0.1:15012"),
            Ok(("east".into(), "10.0.0.1:15012".into()))
        );
        assert_eq!(
            parse_peer_flag("west=cp.west.example:15012"),
            Ok(("west".into(), "cp.west.example:15012".into()))
        );
        let e = parse_peer_flag("east").expect_err("refused");
        assert!(e.contains("NAME=HOST:PORT"), "{e}");
        let e = parse_peer_flag("East_1=10.0.0.1:15012").expect_err("refused");
        assert!(e.contains("peer cluster name"), "{e}");
        let e = parse_peer_flag("east=10.0.0.1:0").expect_err("refused");
        assert!(e.contains("1-65535"), "{e}");
        let e = parse_peer_flag("east=10.0.0.1").expect_err("refused");
        assert!(e.contains("HOST:PORT"), "{e}");
    }

    #[test]
    fn export_counts_streams_per_cluster() {
        let book = PeerBook::default();
        book.export_started("a");
        book.export_started("a");
        book.export_ended("a");
        assert_eq!(book.exporting_to(), vec!["a".to_string()]);
        book.export_ended("a");
        assert!(book.exporting_to().is_empty());
    }
}
