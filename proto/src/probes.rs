//! Application probes as the injector hands them to the sidecar's health listener.
//!
//! The injector rewrites every network probe of an application container (`httpGet` — HTTP
//! or HTTPS —, `tcpSocket`, `grpc`) into an `httpGet` on the proxy's health port at a path it
//! assigns, `/app-health/<container>/<livez|readyz|startupz>`, and passes the original probes
//! to the sidecar as one JSON document (the `WEFT_APP_PROBES` variable): path -> probe. The
//! health listener runs exactly those probes against the application on localhost and nothing
//! else: no caller chooses a port, a path or a query.

use std::collections::BTreeMap;

/// The environment variable (and `weft-sidecar run --app-probes`) carrying the probes.
pub const APP_PROBES_ENV: &str = "WEFT_APP_PROBES";

/// The health-listener path of one probe of one container.
pub fn probe_path(container: &str, kind: ProbeKind) -> String {
    format!("/app-health/{container}/{}", kind.as_str())
}

/// Which of a container's probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// `livenessProbe`.
    Liveness,
    /// `readinessProbe`.
    Readiness,
    /// `startupProbe`.
    Startup,
}

impl ProbeKind {
    /// The last path segment.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "livez",
            ProbeKind::Readiness => "readyz",
            ProbeKind::Startup => "startupz",
        }
    }
}

/// An HTTP header a probe sends.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProbeHeader {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// One original probe, run against `127.0.0.1:<port>`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum AppProbe {
    /// An HTTP(S) GET; its status is the probe's answer (HTTPS certificates are not verified,
    /// as the kubelet does not).
    HttpGet {
        /// Port.
        port: u16,
        /// Path and query, as the pod spec had them.
        path: String,
        /// HTTPS instead of HTTP.
        #[serde(default)]
        https: bool,
        /// Headers the probe sends.
        #[serde(default)]
        headers: Vec<ProbeHeader>,
    },
    /// A TCP connect.
    TcpSocket {
        /// Port.
        port: u16,
    },
    /// The gRPC health-checking protocol (`grpc.health.v1.Health/Check`).
    Grpc {
        /// Port.
        port: u16,
        /// The service asked about ("" for the server as a whole).
        #[serde(default)]
        service: String,
    },
}

/// Every probe of a pod, by health-listener path.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct AppProbes(pub BTreeMap<String, AppProbe>);
