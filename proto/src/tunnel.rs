//! The east-west tunnel, client side and wire format (the gateway is the sidecar's
//! `gateway` module): how a sidecar — or a control plane, for federation — reaches an endpoint in
//! another network (pod addresses it cannot route to, or that overlap its own) through that
//! network's gateway, without the gateway terminating the end-to-end identity.
//!
//! The sidecar opens mesh mTLS to the gateway (ALPN `weft-tunnel`; its own SVID, and the
//! gateway must prove the identity the control plane named), sends one HTTP/1.1
//! `CONNECT <endpoint> HTTP/1.1` and reads the answer's head; after a 200 the stream is a byte
//! pipe to the endpoint, over which the sidecar runs its usual mesh mTLS with the endpoint's
//! sidecar. So the destination verifies the caller's own certificate, the gateway sees only
//! who is calling (its outer session) and where to, and policy, retries and balancing stay in
//! the caller's sidecar, per endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::tls::{self, TlsError, rustls};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The longest `CONNECT` request or answer head either side reads.
pub const MAX_HEAD: usize = 1024;
/// How long the TCP connect to a gateway may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the tunnel's TCP connect, handshake and `CONNECT` exchange may take together.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// The request header naming the caller's cluster (informational: the gateway labels its
/// metrics with the cluster of the caller's verified certificate, never with this).
pub const SOURCE_CLUSTER: &str = "weft-source-cluster";
/// The answer header saying why a tunnel was refused.
pub const REASON: &str = "weft-reason";

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The gateway could not be reached (nothing was sent: safe to try another).
    #[error("gateway {0}: connect: {1}")]
    Connect(SocketAddr, std::io::Error),
    /// The TLS handshake with the gateway failed.
    #[error("gateway {0}: TLS handshake: {1}")]
    Handshake(SocketAddr, std::io::Error),
    /// The gateway is not who the control plane said.
    #[error("gateway {0}: {1}")]
    Identity(SocketAddr, TlsError),
    /// The gateway answered the `CONNECT` with an error.
    #[error("gateway {gateway} refused the tunnel to {target}: {status} {reason}")]
    Refused {
        /// The gateway.
        gateway: SocketAddr,
        /// The endpoint asked for.
        target: SocketAddr,
        /// Its status.
        status: u16,
        /// Its `weft-reason`.
        reason: String,
    },
    /// The gateway's answer is not HTTP, or the exchange broke or took too long.
    #[error("gateway {0}: {1}")]
    Protocol(SocketAddr, String),
}

/// The `CONNECT` request for `target`, from cluster `source_cluster`.
pub fn connect_request(target: SocketAddr, source_cluster: &str) -> String {
    format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{SOURCE_CLUSTER}: {source_cluster}\r\n\r\n"
    )
}

/// The endpoint and the declared source cluster of a `CONNECT` head, or why it is refused.
pub fn parse_connect(head: &str) -> Result<(SocketAddr, Option<String>), &'static str> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (Some("CONNECT"), Some(target), Some("HTTP/1.1"), None) =
        (first.next(), first.next(), first.next(), first.next())
    else {
        return Err("not-connect");
    };
    // An address, never a name: the gateway resolves nothing on a caller's behalf.
    let target: SocketAddr = target.parse().map_err(|_| "bad-target")?;
    let source = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(SOURCE_CLUSTER))
        .map(|(_, v)| v.trim().to_string());
    Ok((target, source))
}

/// An answer head: `status` with its `weft-reason`.
pub fn response(status: u16, reason: &str) -> String {
    let text = match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Error",
    };
    format!("HTTP/1.1 {status} {text}\r\n{REASON}: {reason}\r\n\r\n")
}

/// Reads one head (up to the blank line, at most [`MAX_HEAD`] bytes) byte by byte, so nothing
/// after it is consumed: what follows belongs to the tunnel.
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(128);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "head too long",
            ));
        }
        head.push(s.read_u8().await?);
    }
    String::from_utf8(head)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "head is not text"))
}

/// Opens a tunnel through `gateway` (which must prove `gateway_identity`) to `target`, as a
/// caller of cluster `source_cluster` presenting the SVID in `config` (the `tunnel` config).
pub async fn open(
    gateway: SocketAddr,
    gateway_identity: &str,
    target: SocketAddr,
    source_cluster: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>, TunnelError> {
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(gateway)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(TunnelError::Connect(gateway, e)),
        Err(_) => {
            return Err(TunnelError::Connect(
                gateway,
                std::io::ErrorKind::TimedOut.into(),
            ));
        }
    };
    let _ = tcp.set_nodelay(true);
    let exchange = async {
        let name = rustls::pki_types::ServerName::IpAddress(gateway.ip().into());
        let mut s = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| TunnelError::Handshake(gateway, e))?;
        tls::check_peer(s.get_ref().1.peer_certificates(), &[gateway_identity])
            .map_err(|e| TunnelError::Identity(gateway, e))?;
        let protocol = |e: std::io::Error| TunnelError::Protocol(gateway, e.to_string());
        s.write_all(connect_request(target, source_cluster).as_bytes())
            .await
            .map_err(protocol)?;
        let head = read_head(&mut s).await.map_err(protocol)?;
        let status = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| {
                TunnelError::Protocol(gateway, format!("not an HTTP answer: {head:?}"))
            })?;
        if status != 200 {
            let reason = head
                .split("\r\n")
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case(REASON))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default();
            return Err(TunnelError::Refused {
                gateway,
                target,
                status,
                reason,
            });
        }
        Ok(s)
    };
    tokio::time::timeout(OPEN_TIMEOUT, exchange)
        .await
        .map_err(|_| TunnelError::Protocol(gateway, "timed out".into()))?
}

/// [`open`] through the first of `gateways` (tried in turn from index `start`, wrapping) that
/// opens one; the last failure when none does.
pub async fn open_any(
    gateways: &[SocketAddr],
    start: usize,
    gateway_identity: &str,
    target: SocketAddr,
    source_cluster: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>, TunnelError> {
    let mut last = TunnelError::Protocol(target, "no gateway listed".into());
    for i in 0..gateways.len() {
        let gw = gateways[(start + i) % gateways.len()];
        match open(gw, gateway_identity, target, source_cluster, config.clone()).await {
            Ok(t) => return Ok(t),
            Err(e) => {
                tracing::debug!(gateway = %gw, %target, error = %e, "tunnel not opened");
                last = e;
            }
        }
    }
    Err(last)
}

/// Writes an answer head.
pub async fn answer<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: u16,
    reason: &str,
) -> std::io::Result<()> {
    s.write_all(response(status, reason).as_bytes()).await?;
    s.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_heads_round_trip_and_anything_else_is_refused_by_name() {
        let target: SocketAddr = "198.18.9.2:15006".parse().expect("addr");
        let head = connect_request(target, "east");
        assert_eq!(parse_connect(&head), Ok((target, Some("east".into()))));
        assert_eq!(
            parse_connect("CONNECT [2001:2::5]:80 HTTP/1.1\r\n\r\n"),
            Ok(("[2001:2::5]:80".parse().expect("addr"), None))
        );
        for (bad, why) in [
            ("GET / HTTP/1.1\r\n\r\n", "not-connect"),
            ("CONNECT echo.default.svc:80 HTTP/1.1\r\n\r\n", "bad-target"),
            ("CONNECT 198.18.9.2:80 HTTP/1.0\r\n\r\n", "not-connect"),
            ("CONNECT 198.18.9.2:80 HTTP/1.1 x\r\n\r\n", "not-connect"),
        ] {
            assert_eq!(parse_connect(bad), Err(why), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_head_is_read_to_its_blank_line_and_no_further_and_is_bounded() {
        let mut input: &[u8] = b"HTTP/1.1 200 OK\r\n\r\nTLS bytes";
        let head = read_head(&mut input).await.expect("head");
        assert_eq!(head, "HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(input, b"TLS bytes", "the tunnel's bytes are left for it");
        let long = vec![b'a'; MAX_HEAD + 10];
        let mut input: &[u8] = &long;
        assert!(read_head(&mut input).await.is_err());
    }
}
