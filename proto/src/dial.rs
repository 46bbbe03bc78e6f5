//! Dialing a control plane's TLS gRPC port: one connector for sidecars, peer control planes
//! and `weftctl`. The server must chain to the trust bundle *and* carry the control plane's
//! DNS SAN, which only the CA puts on the control plane's own certificate (it refuses CSRs
//! with DNS names): a workload SVID, whatever its SPIFFE ID, is never taken for it.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;

use crate::tls::{self, Role, rustls};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A gRPC channel to the control plane at `address` (`HOST:PORT`) over `config` (which
/// presents the caller's certificate, if any). With `cluster`, the server must be that
/// cluster's control plane; without, any cluster's.
pub async fn control_plane(
    address: &str,
    config: Arc<rustls::ClientConfig>,
    cluster: Option<&str>,
    connect_timeout: Duration,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let (address_owned, cluster) = (address.to_string(), cluster.map(str::to_string));
    let connector = tower::service_fn(move |_: http::Uri| {
        let (config, address, cluster) = (config.clone(), address_owned.clone(), cluster.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(address.as_str()).await?;
            let _ = tcp.set_nodelay(true);
            let name = rustls::pki_types::ServerName::try_from("weft-control-plane")?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            let leaf = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or(tls::TlsError::NoPeerCertificate)?;
            check_server(&address, &tls::role_of(leaf), cluster.as_deref())?;
            Ok::<_, BoxError>(TokioIo::new(stream))
        }
    });
    tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
}

/// Whether a server with `role` is the control plane the caller wants.
pub fn check_server(address: &str, role: &Role, cluster: Option<&str>) -> Result<(), String> {
    match (role, cluster) {
        (Role::ControlPlane(_), None) => Ok(()),
        (Role::ControlPlane(c), Some(want)) if c == want => Ok(()),
        (Role::ControlPlane(c), Some(want)) => Err(format!(
            "the server at {address} is the control plane of cluster {c:?}, not {want:?}"
        )),
        (other, _) => Err(format!(
            "the server at {address} is not a control plane: its certificate lacks the \
             control plane's name (*.{}), it is {other:?}",
            tls::CONTROL_PLANE_DNS_SUFFIX
        )),
    }
}
