//! The other replicas of this control plane, for the mesh-wide admin view.
//!
//! Every replica serves its own proxies, so "which proxies are connected, and what do they
//! hold" has one answer per replica. The replica `weftctl` reaches asks its siblings over
//! mTLS — presenting the control plane's own SVID and accepting only a server that is this
//! cluster's control plane — with `local_only` set (so a sibling never fans out again), and
//! merges. Siblings are found as the ready endpoints (port `grpc-tls`) of the control plane's
//! own Service in the catalog (`--replica-service`, the installed `weft-system/
//! weft-control-plane`), plus any `--replica-addr`. The answering replica is recognised by
//! the name it returns and skipped.

use std::sync::Arc;
use std::time::Duration;

use weft_proto::admin::admin_client::AdminClient;

use crate::catalog::{Catalog, ServiceKey};
use crate::grpc_tls::IssuedCell;

/// The Service port (by name) replicas are asked on: the TLS gRPC port.
pub const REPLICA_PORT_NAME: &str = "grpc-tls";
/// How long one sibling may take to connect and answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// How to find and reach the sibling replicas.
pub struct Replicas {
    service: Option<ServiceKey>,
    fixed: Vec<String>,
    catalog: Arc<Catalog>,
    tls: IssuedCell,
    cluster: String,
}

/// One sibling's answer: where it was asked and what it said (or why it could not).
pub struct Remote<T> {
    /// `HOST:PORT` it was asked at.
    pub address: String,
    /// Its answer.
    pub result: Result<T, String>,
}

impl Replicas {
    /// Siblings from `service`'s endpoints and `fixed` addresses, dialled with `tls`.
    pub fn new(
        service: Option<ServiceKey>,
        fixed: Vec<String>,
        catalog: Arc<Catalog>,
        tls: IssuedCell,
        cluster: String,
    ) -> Self {
        Replicas {
            service,
            fixed,
            catalog,
            tls,
            cluster,
        }
    }

    /// Where the replicas (this one possibly among them) can be asked, as of now.
    pub fn addresses(&self) -> Vec<String> {
        let mut out = self.fixed.clone();
        if let Some(key) = &self.service {
            let model = self.catalog.current();
            if let Some(svc) = model.services.get(key) {
                for e in &svc.endpoints {
                    if e.cluster != self.cluster || !(e.ready || e.serving) {
                        continue;
                    }
                    if let Some(port) = e.ports.get(REPLICA_PORT_NAME) {
                        out.push(std::net::SocketAddr::new(e.address, *port).to_string());
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Asks every replica at [`Self::addresses`] with `call`, in parallel, each bounded by a
    /// timeout; the caller skips its own answer by name.
    pub async fn each<T, F, Fut>(&self, call: F) -> Vec<Remote<T>>
    where
        F: Fn(AdminClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let asks = self.addresses().into_iter().map(|a| self.ask(a, &call));
        futures::future::join_all(asks).await
    }

    /// Asks every replica in parallel and returns the first successful answer as soon as it
    /// comes (not after the slowest sibling's timeout); `None` when none answers.
    pub async fn first_ok<T, F, Fut>(&self, call: F) -> Option<T>
    where
        F: Fn(AdminClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        use futures::StreamExt;
        let mut asks: futures::stream::FuturesUnordered<_> = self
            .addresses()
            .into_iter()
            .map(|a| self.ask(a, &call))
            .collect();
        while let Some(r) = asks.next().await {
            if let Ok(v) = r.result {
                return Some(v);
            }
        }
        None
    }

    /// Asks one replica, bounded by [`ASK_TIMEOUT`].
    async fn ask<T, F, Fut>(&self, address: String, call: &F) -> Remote<T>
    where
        F: Fn(AdminClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let client = self.tls.load().client.clone();
        let attempt = async {
            let channel =
                crate::federation::import::connect(&address, &self.cluster, client, None).await?;
            call(AdminClient::new(channel))
                .await
                .map_err(|s| format!("{}: {}", s.code(), s.message()))
        };
        let result = match tokio::time::timeout(ASK_TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {ASK_TIMEOUT:?}")),
        };
        if let Err(e) = &result {
            tracing::debug!(%address, error = %e, "sibling replica not reached");
        }
        Remote { address, result }
    }
}

/// Parses `--replica-service`: `NAMESPACE/NAME`, or `none` (or empty) for no discovery.
pub fn parse_service(s: &str) -> Result<Option<ServiceKey>, String> {
    let s = s.trim();
    if s.is_empty() || s.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(Some(ServiceKey::new(ns.to_string(), name.to_string())))
        }
        _ => Err(format!(
            "{s:?} is not NAMESPACE/NAME (e.g. weft-system/weft-control-plane) or none"
        )),
    }
}
