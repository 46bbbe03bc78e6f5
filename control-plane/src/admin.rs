//! `weft.admin.v1`: what `weftctl` asks. Served on the same gRPC server as xDS.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use weft_proto::admin::admin_server::Admin;
use weft_proto::admin::{
    ConfigResource, GetProxyConfigRequest, GetProxyConfigResponse, ListProxiesRequest,
    ListProxiesResponse, ListServicesRequest, ListServicesResponse, ListSourceErrorsRequest,
    ListSourceErrorsResponse, ServiceSummary, SourceError,
};

use crate::catalog::Catalog;
use crate::xds::registry::{Registry, lock};

/// The admin service.
pub struct AdminService {
    /// The catalog.
    pub catalog: Arc<Catalog>,
    /// Connected proxies.
    pub registry: Arc<Registry>,
    /// This replica's name.
    pub replica: String,
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_proxies(
        &self,
        _: Request<ListProxiesRequest>,
    ) -> Result<Response<ListProxiesResponse>, Status> {
        let proxies = self
            .registry
            .all()
            .iter()
            .map(|r| lock(r).status(&self.replica))
            .collect();
        Ok(Response::new(ListProxiesResponse {
            proxies,
            replica: self.replica.clone(),
        }))
    }

    async fn get_proxy_config(
        &self,
        req: Request<GetProxyConfigRequest>,
    ) -> Result<Response<GetProxyConfigResponse>, Status> {
        let id = req.into_inner().node_id;
        let record = self.registry.find(&id).ok_or_else(|| {
            Status::not_found(format!(
                "no proxy {id:?} is connected to this control plane"
            ))
        })?;
        let rec = lock(&record);
        let mut resources = Vec::new();
        for (ti, url) in weft_proto::type_url::ALL.iter().enumerate() {
            for r in rec.held(ti) {
                resources.push(ConfigResource {
                    type_url: url.to_string(),
                    name: r.name.clone(),
                    version: r.version.clone(),
                    value: r.any.value.clone(),
                });
            }
        }
        Ok(Response::new(GetProxyConfigResponse {
            proxy: Some(rec.status(&self.replica)),
            resources,
        }))
    }

    async fn list_services(
        &self,
        _: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        let model = self.catalog.current();
        let services = model
            .services
            .values()
            .map(|s| {
                let mut clusters: Vec<String> =
                    s.endpoints.iter().map(|e| e.cluster.clone()).collect();
                clusters.sort();
                clusters.dedup();
                ServiceSummary {
                    namespace: s.key.namespace.clone(),
                    name: s.key.name.clone(),
                    ports: s.ports.iter().map(|p| u32::from(p.port)).collect(),
                    endpoints: s.endpoints.len() as u32,
                    ready_endpoints: s.endpoints.iter().filter(|e| e.ready).count() as u32,
                    split: s
                        .routes
                        .values()
                        .flatten()
                        .flat_map(|r| &r.backends)
                        .map(|b| format!("{}={}", b.service.name, b.weight))
                        .collect(),
                    exported: s.exported,
                    clusters,
                }
            })
            .collect();
        Ok(Response::new(ListServicesResponse {
            catalog_version: model.version,
            services,
        }))
    }

    async fn check(
        &self,
        _: Request<weft_proto::admin::CheckRequest>,
    ) -> Result<Response<weft_proto::admin::CheckResponse>, Status> {
        let proxies: Vec<_> = self
            .registry
            .all()
            .iter()
            .map(|r| lock(r).status(&self.replica))
            .collect();
        let findings = crate::check::check(&self.catalog.current(), &proxies);
        Ok(Response::new(weft_proto::admin::CheckResponse { findings }))
    }

    async fn list_source_errors(
        &self,
        _: Request<ListSourceErrorsRequest>,
    ) -> Result<Response<ListSourceErrorsResponse>, Status> {
        let errors = self
            .catalog
            .current()
            .errors
            .iter()
            .map(|e| SourceError {
                file: e.file.clone(),
                object: e.object.clone(),
                field: e.field.clone(),
                message: e.message.clone(),
            })
            .collect();
        Ok(Response::new(ListSourceErrorsResponse { errors }))
    }
}
