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
    control_plane_via(address, config, cluster, connect_timeout, None).await
}

/// How a control plane on another network is reached: through one of its gateways (see
/// [`crate::tunnel`]), which must prove `identity`.
#[derive(Clone, Debug)]
pub struct Via {
    /// The gateways, tried in turn.
    pub gateways: Vec<std::net::SocketAddr>,
    /// The SPIFFE ID they prove.
    pub identity: String,
    /// The caller's certificate under the tunnel ALPN.
    pub tunnel: Arc<rustls::ClientConfig>,
    /// The caller's cluster (informational, in the `CONNECT`).
    pub source_cluster: String,
}

/// Something a TLS session can run over: a TCP stream, or a tunnel through a gateway.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// [`control_plane`], through a gateway when `via` says so (the TLS session with the control
/// plane then runs inside the tunnel, so the gateway never sees it).
pub async fn control_plane_via(
    address: &str,
    config: Arc<rustls::ClientConfig>,
    cluster: Option<&str>,
    connect_timeout: Duration,
    via: Option<Via>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let (address_owned, cluster) = (address.to_string(), cluster.map(str::to_string));
    let connector = tower::service_fn(move |_: http::Uri| {
        let (config, address, cluster, via) = (
            config.clone(),
            address_owned.clone(),
            cluster.clone(),
            via.clone(),
        );
        async move {
            let io: Box<dyn Io> = match &via {
                None => {
                    let tcp = tokio::net::TcpStream::connect(address.as_str()).await?;
                    let _ = tcp.set_nodelay(true);
                    Box::new(tcp)
                }
                Some(via) => {
                    let target: std::net::SocketAddr = address.parse().map_err(|_| {
                        format!("{address:?}: a control plane reached through a gateway is named by IP:PORT")
                    })?;
                    let t = crate::tunnel::open_any(
                        &via.gateways,
                        0,
                        &via.identity,
                        target,
                        &via.source_cluster,
                        via.tunnel.clone(),
                    )
                    .await
                    .map_err(|e| format!("no gateway opened a tunnel to {address}: {e}"))?;
                    Box::new(t)
                }
            };
            let name = rustls::pki_types::ServerName::try_from("weft-control-plane")?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, io)
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
