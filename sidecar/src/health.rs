//! The health listener (`--health-addr`, 15021 when injected): what the kubelet probes.
//!
//! - `/ready`, `/live`: the proxy's own state (as on the admin listener, which stays on
//!   localhost);
//! - the application's probes, at exactly the paths `--app-probes` lists
//!   (`/app-health/<container>/<livez|readyz|startupz>`, set by the injector, which rewrote
//!   every network probe of the pod to them): each runs the original probe — HTTP or HTTPS GET
//!   of its own path, TCP connect, gRPC health check — against `127.0.0.1:<port>`. No caller
//!   picks a port, a path or a query, so the listener cannot reach anything else in the pod,
//!   and no probe needs a port taken out of interception (which would let plaintext past
//!   STRICT there).
//!
//! The health port is excluded from inbound interception (the injector passes it to `init`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use weft_proto::probes::{AppProbe, AppProbes};
use weft_proto::tls::rustls;

use crate::admin::{readiness, text};
use crate::identity::SvidCell;
use crate::xds::XdsHandle;

/// How long a forwarded app probe may take (the kubelet's own timeout is usually 1 s).
pub const APP_PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest probe answer body read (only its status is passed back).
pub const MAX_PROBE_BODY: usize = 64 * 1024;
/// Open connections the health listener takes at most.
pub const MAX_HEALTH_CONNECTIONS: usize = 256;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Accepts any server certificate: the kubelet does not verify HTTPS probes either, and the
/// application is on this pod's loopback.
#[derive(Debug)]
struct AnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn probe_tls() -> Result<Arc<rustls::ClientConfig>, BoxError> {
    let provider = weft_proto::tls::provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// An HTTP/1 GET of `path` over `io`: (status, body).
async fn http_get<IO>(
    io: IO,
    port: u16,
    path: &str,
    headers: &[weft_proto::probes::ProbeHeader],
) -> Result<(StatusCode, Bytes), BoxError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .uri(path)
        .header(hyper::header::HOST, format!("127.0.0.1:{port}"))
        .header(hyper::header::USER_AGENT, "weft-app-health");
    for h in headers {
        req = req.header(h.name.as_str(), h.value.as_str());
    }
    let resp = send
        .send_request(req.body(http_body_util::Empty::<Bytes>::new())?)
        .await?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_PROBE_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Ok((status, body))
}

/// `grpc.health.v1.Health/Check` for `service` over `tcp`: SERVING is 200, anything else 503.
async fn grpc_check(tcp: TcpStream, service: &str) -> Result<(StatusCode, Bytes), BoxError> {
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await?;
    tokio::spawn(conn);
    // HealthCheckRequest { string service = 1; }, length-prefixed as gRPC frames messages.
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a);
        let mut n = service.len();
        while n >= 0x80 {
            msg.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        msg.push(n as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let req = Request::builder()
        .method("POST")
        .uri("http://127.0.0.1/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(frame)))?;
    let resp = send.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    let collected = http_body_util::Limited::new(body, MAX_PROBE_BODY)
        .collect()
        .await?;
    let grpc_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let bytes = collected.to_bytes();
    // HealthCheckResponse { ServingStatus status = 1; } — SERVING = 1.
    let serving = grpc_status == "0" && bytes.len() >= 7 && bytes[5] == 0x08 && bytes[6] == 1;
    Ok(if serving {
        (StatusCode::OK, Bytes::from_static(b"SERVING\n"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from(format!("not SERVING (grpc-status {grpc_status:?})\n")),
        )
    })
}

/// Runs one probe against the application on localhost, on a new connection (as the
/// kubelet's own probes do: a pooled one could keep answering for an application that no
/// longer accepts new ones).
async fn run_probe(probe: &AppProbe) -> Response<Full<Bytes>> {
    let port = match probe {
        AppProbe::HttpGet { port, .. }
        | AppProbe::TcpSocket { port }
        | AppProbe::Grpc { port, .. } => *port,
    };
    let attempt = async {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        match probe {
            AppProbe::TcpSocket { .. } => Ok((StatusCode::OK, Bytes::from_static(b"open\n"))),
            AppProbe::HttpGet {
                path,
                https: false,
                headers,
                ..
            } => http_get(tcp, port, path, headers).await,
            AppProbe::HttpGet {
                path,
                https: true,
                headers,
                ..
            } => {
                let name = rustls::pki_types::ServerName::try_from("localhost")?;
                let tls = tokio_rustls::TlsConnector::from(probe_tls()?)
                    .connect(name, tcp)
                    .await?;
                http_get(tls, port, path, headers).await
            }
            AppProbe::Grpc { service, .. } => grpc_check(tcp, service).await,
        }
    };
    // Only the status goes back, with a fixed body: the port is reachable from anywhere, and
    // an application may say more to a local caller (and a probe may carry credentials).
    match tokio::time::timeout(APP_PROBE_TIMEOUT, attempt).await {
        Ok(Ok((status, _body))) => {
            let mut r = Response::new(Full::new(Bytes::from(format!(
                "probe answered {}\n",
                status.as_u16()
            ))));
            *r.status_mut() = status;
            r
        }
        Ok(Err(e)) => {
            tracing::debug!(port, error = %e, "application probe failed");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "probe failed\n".into(),
                "text/plain",
            )
        }
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the application on port {port} did not answer within {APP_PROBE_TIMEOUT:?}\n"),
            "text/plain",
        ),
    }
}

/// Serves the health listener until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    xds: XdsHandle,
    svid: Option<SvidCell>,
    probes: Arc<AppProbes>,
) {
    // The kubelet opens a few connections; anyone else gets no more than these.
    let cap = crate::accept::Cap::new(MAX_HEALTH_CONNECTIONS);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                crate::accept::failed("health", &e).await;
                continue;
            }
        };
        let Some(slot) = cap.admit() else {
            continue;
        };
        let (xds, svid, probes) = (xds.clone(), svid.clone(), probes.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (xds, svid, probes) = (xds.clone(), svid.clone(), probes.clone());
                async move {
                    let get = req.method() == hyper::Method::GET;
                    // The whole path and query must be one the injector listed.
                    let pq = req
                        .uri()
                        .path_and_query()
                        .map_or("/", |p| p.as_str())
                        .to_string();
                    let probe = probes.0.get(&pq).filter(|_| get);
                    let resp = match (probe, req.uri().path()) {
                        (_, "/live") => text(StatusCode::OK, "live\n".into(), "text/plain"),
                        (_, "/ready") => {
                            let (status, body) = readiness(&xds, svid.as_ref());
                            text(status, body.into(), "text/plain")
                        }
                        (Some(p), _) => run_probe(p).await,
                        _ => text(
                            StatusCode::NOT_FOUND,
                            "try /ready /live, or an application probe path this pod declares\n"
                                .into(),
                            "text/plain",
                        ),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// `weft-sidecar wait-ready`: polls `http://<addr>/ready` until it answers 200 or `timeout`
/// passes (the classic-sidecar startup hold). Blocking; returns the outcome.
pub fn wait_ready(addr: std::net::SocketAddr, timeout: Duration) -> Result<(), String> {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + timeout;
    let mut last = String::from("not tried");
    while std::time::Instant::now() < deadline {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(format!("GET /ready HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
            let mut buf = Vec::new();
            s.take(4096).read_to_end(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf).into_owned())
        })();
        match attempt {
            Ok(r) if r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200") => {
                return Ok(());
            }
            Ok(r) => last = r.lines().next().unwrap_or_default().to_string(),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!(
        "the proxy at {addr} was not ready within {timeout:?} (last: {last})"
    ))
}
