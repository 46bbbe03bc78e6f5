//! Weft's contract: its own gRPC APIs (`identity`, `federation`, `admin`), Envoy's xDS v3 types
//! (re-exported from the `envoy-types` crate), and the small vocabulary every component shares:
//! SPIFFE identities, well-known label and annotation keys, and the names of xDS resources.
//! No I/O and no policy live here; `tls` builds the rustls configurations that carry
//! SPIFFE identities (from PEM in memory), and `logging` is the one log set-up every binary
//! shares (colour only on a terminal, JSON on request).

pub mod credentials;
pub mod dial;
pub mod keys;
pub mod load;
pub mod logging;
pub mod names;
pub mod probes;
pub mod protocol;
pub mod rbac;
pub mod resources;
pub mod spiffe;
pub mod tls;
pub mod tunnel;
pub mod visibility;

pub use envoy_types::pb as envoy;
pub use spiffe::{SpiffeId, SpiffeIdError};

/// `weft.identity.v1`: CSR signing.
#[allow(missing_docs, clippy::all)]
pub mod identity {
    tonic::include_proto!("weft.identity.v1");
}

/// `weft.federation.v1`: control plane to control plane.
#[allow(missing_docs, clippy::all)]
pub mod federation {
    tonic::include_proto!("weft.federation.v1");
}

/// `weft.admin.v1`: what `weftctl` asks a control plane.
#[allow(missing_docs, clippy::all)]
pub mod admin {
    tonic::include_proto!("weft.admin.v1");
}

/// `weft.xds.v1`: Weft's typed metadata inside xDS resources (key `weft`).
#[allow(missing_docs, clippy::all)]
pub mod xds {
    tonic::include_proto!("weft.xds.v1");
}

/// xDS v3 type URLs the control plane serves.
pub mod type_url {
    /// `envoy.config.listener.v3.Listener`.
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    /// `envoy.config.route.v3.RouteConfiguration`.
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    /// `envoy.config.cluster.v3.Cluster`.
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    /// `envoy.config.endpoint.v3.ClusterLoadAssignment`.
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    /// `weft.xds.v1.DirectoryEntry`: one per Service, what a sidecar discovering config on
    /// demand keeps of the mesh (Envoy and gRPC clients never ask for it).
    pub const DIRECTORY: &str = "type.googleapis.com/weft.xds.v1.DirectoryEntry";
    /// `weft.xds.v1.AddressEntry`: named subscriptions only, what an on-demand sidecar asks
    /// of an address it holds nothing about.
    pub const ADDRESS: &str = "type.googleapis.com/weft.xds.v1.AddressEntry";
    /// Every type, in the order a client should apply them (CDS before EDS, LDS before RDS).
    pub const ALL: [&str; 6] = [CLUSTER, ENDPOINT, LISTENER, ROUTE, DIRECTORY, ADDRESS];
    /// Envoy's four types (what every client may ask for).
    pub const ENVOY: [&str; 4] = [CLUSTER, ENDPOINT, LISTENER, ROUTE];

    /// A short name for logs, metrics and tables: `LDS`, `RDS`, `CDS`, `EDS`, or the URL itself.
    pub fn short(type_url: &str) -> &str {
        match type_url {
            LISTENER => "LDS",
            ROUTE => "RDS",
            CLUSTER => "CDS",
            ENDPOINT => "EDS",
            DIRECTORY => "DIR",
            ADDRESS => "ADDR",
            other => other,
        }
    }
}
