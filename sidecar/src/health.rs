//! The health listener (`--health-addr`, 15021 when injected): what the kubelet probes.
//!
//! - `/ready`, `/live`: the proxy's own state (as on the admin listener, which stays on
//!   localhost);
//! - `/app-health/<port>/<path>`: the application's HTTP probe, forwarded to
//!   `127.0.0.1:<port>/<path>`. The injector rewrites the app's HTTP probes to this, so that in
//!   a STRICT namespace (which refuses plaintext on intercepted ports) the kubelet still reaches
//!   the app. Only ports listed in `--app-health-ports` are forwarded, and only GETs: the
//!   listener cannot be used to reach anything else in the pod.
//!
//! The health port is excluded from inbound interception (the injector passes it to `init`).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::admin::{readiness, text};
use crate::identity::SvidCell;
use crate::xds::XdsHandle;

/// How long a forwarded app probe may take (the kubelet's own timeout is usually 1 s).
pub const APP_PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest probe answer body passed back.
pub const MAX_PROBE_BODY: usize = 64 * 1024;

/// Where `/app-health/<port>/<rest>` goes, if the port is allowed: (port, path and query).
pub fn app_target(path_and_query: &str, allowed: &[u16]) -> Result<(u16, String), String> {
    let rest = path_and_query
        .strip_prefix("/app-health/")
        .ok_or("not an /app-health/ path")?;
    let (port, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port"))?;
    if !allowed.contains(&port) {
        return Err(format!(
            "port {port} is not an application health port of this pod"
        ));
    }
    Ok((port, format!("/{tail}")))
}

/// One new connection per probe, as the kubelet's own probes make: a pooled connection could
/// keep answering for an application that no longer accepts new ones.
async fn forward(port: u16, path: String) -> Response<Full<Bytes>> {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .uri(path)
            .header(hyper::header::HOST, format!("127.0.0.1:{port}"))
            .header(hyper::header::USER_AGENT, "weft-app-health")
            .body(http_body_util::Empty::<Bytes>::new())?;
        let resp = send.send_request(req).await?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_PROBE_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
    };
    match tokio::time::timeout(APP_PROBE_TIMEOUT, attempt).await {
        Ok(Ok((status, body))) => {
            let mut r = Response::new(Full::new(body));
            *r.status_mut() = status;
            r
        }
        Ok(Err(e)) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the application on port {port}: {e}\n"),
            "text/plain",
        ),
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
    allowed: Vec<u16>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (xds, svid, allowed) = (xds.clone(), svid.clone(), allowed.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (xds, svid, allowed) = (xds.clone(), svid.clone(), allowed.clone());
                async move {
                    let pq = req
                        .uri()
                        .path_and_query()
                        .map_or("/", |p| p.as_str())
                        .to_string();
                    let resp = match (req.method() == hyper::Method::GET, req.uri().path()) {
                        (_, "/live") => text(StatusCode::OK, "live\n".into(), "text/plain"),
                        (_, "/ready") => {
                            let (status, body) = readiness(&xds, svid.as_ref());
                            text(status, body.into(), "text/plain")
                        }
                        (true, p) if p.starts_with("/app-health/") => {
                            match app_target(&pq, &allowed) {
                                Ok((port, path)) => forward(port, path).await,
                                Err(m) => {
                                    text(StatusCode::FORBIDDEN, format!("{m}\n"), "text/plain")
                                }
                            }
                        }
                        _ => text(
                            StatusCode::NOT_FOUND,
                            "try /ready /live /app-health/<port>/<path>\n".into(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_ports_are_forwarded() {
        assert_eq!(
            app_target("/app-health/8080/healthz?x=1", &[8080]),
            Ok((8080, "/healthz?x=1".into()))
        );
        assert_eq!(
            app_target("/app-health/8080", &[8080]),
            Ok((8080, "/".into()))
        );
        let e = app_target("/app-health/9090/healthz", &[8080]).expect_err("not listed");
        assert!(e.contains("not an application health port"), "{e}");
        let e = app_target("/app-health/x/healthz", &[8080]).expect_err("garbage");
        assert!(e.contains("not a port"), "{e}");
    }
}
