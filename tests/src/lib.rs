//! Test support shared by the cross-crate tests, the e2e scenarios and `weftctl demo`:
//! a control plane on a free loopback port over a directory of YAML, sidecars, and echo
//! upstreams that answer with their own name, cluster and zone.

pub mod echo;
pub mod fake_ads;
pub mod world;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

pub use weft_control_plane::ControlPlane;
pub use weft_sidecar::Sidecar;

/// Starts a control plane over `dir` with every listener on 127.0.0.1 port 0.
pub async fn start_control_plane(
    dir: &Path,
) -> Result<ControlPlane, weft_control_plane::StartError> {
    ControlPlane::start(weft_control_plane::Config::local(dir)).await
}

/// Starts cluster `cluster`'s control plane over `dir` on loopback port 0 with its CA in
/// `ca_dir` (made by [`shared_root_ca_dirs`] to federate) and fast
/// federation timings: heartbeat 200 ms, link lost after 1 s, stale endpoints kept `grace`.
pub async fn start_cluster_control_plane(
    dir: &Path,
    cluster: &str,
    ca_dir: &Path,
    grace: Duration,
    grpc_addr: Option<SocketAddr>,
) -> Result<ControlPlane, weft_control_plane::StartError> {
    let mut cfg = weft_control_plane::Config::local(dir);
    cfg.cluster_name = cluster.into();
    cfg.ca_dir = Some(ca_dir.to_path_buf());
    cfg.federation_heartbeat = Duration::from_millis(200);
    cfg.federation_timeout = Duration::from_secs(1);
    cfg.peer_grace = grace;
    if let Some(a) = grpc_addr {
        cfg.grpc_addr = a;
    }
    ControlPlane::start(cfg).await
}

/// Makes CA directories for `clusters` under one root, inside `base`, as production does:
/// the root in `base/root`, and per cluster `base/ca-<cluster>` with its own intermediate and
/// the root certificate but no root key (`weft-control-plane ca intermediate`).
pub fn shared_root_ca_dirs(
    base: &Path,
    clusters: &[&str],
) -> std::io::Result<Vec<std::path::PathBuf>> {
    use weft_control_plane::identity::Ca;
    let root = base.join("root");
    Ca::load_or_generate(Some(&root), "cluster.local", "root").map_err(std::io::Error::other)?;
    clusters
        .iter()
        .map(|c| {
            let d = base.join(format!("ca-{c}"));
            Ca::make_intermediate(&root, c, &d).map_err(std::io::Error::other)?;
            Ok(d)
        })
        .collect()
}

/// Writes credentials for operator `name` from `cp`'s CA into `dir` and returns the file
/// (what `weftctl --credentials` reads).
pub fn operator_credentials(cp: &ControlPlane, dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}-credentials.pem"));
    let written = cp
        .operator(name)
        .map_err(|e| e.to_string())
        .and_then(|c| c.write(&path).map_err(|e| e.to_string()));
    if let Err(e) = written {
        panic!("operator credentials: {e}");
    }
    path
}

/// A gRPC channel to `cp`'s TLS port, trusting its root and presenting `svid` (anonymous
/// without one: what a workload bootstrapping with a token does).
pub async fn tls_channel(
    cp: &ControlPlane,
    svid: Option<&weft_proto::tls::Svid>,
) -> Result<tonic::transport::Channel, Box<dyn std::error::Error + Send + Sync>> {
    let roots = weft_proto::tls::roots(&[cp.ca.root_pem().to_string()])?;
    let config = weft_proto::tls::client_config(svid, roots, &[weft_proto::tls::ALPN_H2])?;
    Ok(weft_proto::dial::control_plane(
        &cp.grpc_addr.to_string(),
        config,
        None,
        Duration::from_secs(3),
    )
    .await?)
}

/// Sends `req` (a CSR with a join or service-account token) to `cp`'s CertificateService over
/// anonymous TLS: what a workload bootstrapping does.
pub async fn sign_with_token(
    cp: &ControlPlane,
    req: weft_proto::identity::SignRequest,
) -> Result<weft_proto::identity::SignResponse, tonic::Status> {
    let channel = tls_channel(cp, None)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    weft_proto::identity::certificate_service_client::CertificateServiceClient::new(channel)
        .sign(req)
        .await
        .map(tonic::Response::into_inner)
}

/// An admin client to `cp`'s TLS port as an operator.
pub async fn operator_admin(
    cp: &ControlPlane,
) -> Result<
    weft_proto::admin::admin_client::AdminClient<tonic::transport::Channel>,
    Box<dyn std::error::Error + Send + Sync>,
> {
    let config = cp.operator("test-operator")?.client_config()?;
    let ch = weft_proto::dial::control_plane(
        &cp.grpc_addr.to_string(),
        config,
        None,
        Duration::from_secs(3),
    )
    .await?;
    Ok(weft_proto::admin::admin_client::AdminClient::new(ch))
}

/// Writes `docs` as `world.yaml` in a new directory and starts a control plane over it. The
/// directory lives as long as the returned `TempDir`.
pub async fn control_plane_over(docs: &[String]) -> (tempfile::TempDir, ControlPlane) {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    if let Err(e) = std::fs::write(dir.path().join("world.yaml"), world::docs(docs)) {
        panic!("writing the world: {e}");
    }
    match start_control_plane(dir.path()).await {
        Ok(cp) => (dir, cp),
        Err(e) => panic!("control plane: {e}"),
    }
}

/// Starts a sidecar bound on `ip` (port 0 for every listener) that takes config from `xds`.
pub async fn start_sidecar(
    xds: SocketAddr,
    ip: IpAddr,
    node_id: &str,
    zone: &str,
) -> Result<Sidecar, weft_sidecar::StartError> {
    let mut cfg = weft_sidecar::RunConfig::local(xds, ip, node_id);
    cfg.zone = zone.into();
    cfg.cluster = "cluster-1".into();
    Sidecar::start(cfg).await
}

/// Waits until `cond` holds, polling; panics with `what` after `patience`.
pub async fn eventually<F: FnMut() -> bool>(what: &str, patience: Duration, mut cond: F) {
    let deadline = tokio::time::Instant::now() + patience;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("not true after {patience:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `attempt` until it gives `Ok`, returning that value; panics with `what` and the last
/// error after `patience`.
pub async fn until_ok<T, F, Fut>(what: &str, patience: Duration, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match attempt().await {
            Ok(v) => return v,
            Err(last) if tokio::time::Instant::now() > deadline => {
                panic!("not true after {patience:?}: {what}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Sends one HTTP/1.1 GET to `proxy` with `Host: host` and returns (status, body).
pub async fn get_via(
    proxy: SocketAddr,
    host: &str,
    path: &str,
) -> Result<(u16, String), Box<dyn std::error::Error + Send + Sync>> {
    get_with(proxy, host, path, &[]).await
}

/// Like [`get_via`], with extra request headers.
pub async fn get_with(
    proxy: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), Box<dyn std::error::Error + Send + Sync>> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(proxy).await?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .uri(path)
        .header(hyper::header::HOST, host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::<bytes::Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Mints a join token for `namespace/service_account` through the admin API, as an operator.
pub async fn mint_token(
    cp: &ControlPlane,
    namespace: &str,
    service_account: &str,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let mut admin = operator_admin(cp).await?;
    let resp = admin
        .create_join_token(weft_proto::admin::CreateJoinTokenRequest {
            namespace: namespace.into(),
            service_account: service_account.into(),
            ttl_seconds: 600,
        })
        .await?;
    Ok(resp.into_inner().token)
}

/// A sidecar configuration for a meshed workload: xDS and certificates over the control
/// plane's TLS port, bootstrapped with a join token for `default/<service_account>` and the
/// mesh root written to `bundle_dir`.
pub async fn mesh_sidecar_config(
    cp: &ControlPlane,
    bundle_dir: &Path,
    ip: IpAddr,
    node_id: &str,
    service_account: &str,
) -> Result<weft_sidecar::RunConfig, Box<dyn std::error::Error + Send + Sync>> {
    let bundle = bundle_dir.join(format!("{node_id}-root.pem"));
    std::fs::write(&bundle, cp.ca.root_pem())?;
    let mut cfg = weft_sidecar::RunConfig::local(cp.grpc_addr, ip, node_id);
    cfg.plaintext_xds = false;
    cfg.trust_bundle = Some(bundle);
    cfg.service_account = service_account.into();
    cfg.cluster = "cluster-1".into();
    cfg.join_token = Some(mint_token(cp, "default", service_account).await?);
    Ok(cfg)
}

/// Waits until the sidecar's `/ready` answers 200 (config of every type and, with an
/// identity, a certificate); panics after `patience`.
pub async fn wait_ready(sidecar: &Sidecar, patience: Duration) {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if let Ok((200, _)) = get_via(sidecar.admin_addr, "admin", "/ready").await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let why = get_via(sidecar.admin_addr, "admin", "/ready").await;
            panic!("sidecar not ready after {patience:?}: {why:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The sum of every sample of `metric` (any labels) on a Prometheus text page whose labels
/// contain every one of `labels` (`key="value"`).
pub fn metric_sum(page: &str, metric: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
