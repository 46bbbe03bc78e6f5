//! `weft.admin.v1`: what `weftctl` asks. Served on the TLS gRPC port only, authorised per
//! caller by the names only the CA puts in certificates ([`weft_proto::tls::Role`]):
//! operators (`weftctl --credentials`) read and change; this cluster's control-plane replicas
//! read (the mesh-wide fan-out); a workload reads only its own proxy's config.

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
    /// The sibling replicas (mesh-wide queries ask them too).
    pub replicas: Arc<crate::replicas::Replicas>,
    /// The catalog.
    pub catalog: Arc<Catalog>,
    /// Connected proxies.
    pub registry: Arc<Registry>,
    /// This replica's name.
    pub replica: String,
    /// The join-token key.
    pub tokens: Arc<crate::identity::token::TokenKey>,
    /// Redeemed and revoked join tokens.
    pub ledger: Arc<crate::ledger::Ledger>,
    /// The rollout controller.
    pub rollouts: Arc<crate::rollout::Controller>,
    /// Federation (peer states).
    pub federation: Arc<crate::federation::Federation>,
    /// Certificates issued to proxies.
    pub issued: Arc<crate::identity::IssuedCerts>,
    /// The CA (its expiry).
    pub ca: Arc<crate::identity::Ca>,
}

/// What an admin call needs of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Reading the mesh's state (operators and sibling replicas).
    Read,
    /// Changing it or minting credentials (operators only).
    Write,
    /// One proxy's own config (also that proxy's workload).
    OwnConfig,
}

/// Who an authorised admin caller is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// An operator, by name.
    Operator(String),
    /// A replica of this cluster's control plane.
    Replica,
    /// A workload (only for [`Need::OwnConfig`]).
    Workload(weft_proto::SpiffeId),
}

/// Decides whether `peer` may make a call that needs `need` on cluster `cluster`'s admin API.
pub fn authorize(
    peer: Option<&crate::grpc_tls::TlsPeer>,
    cluster: &str,
    need: Need,
) -> Result<Caller, Status> {
    use weft_proto::tls::Role;
    let Some(peer) = peer else {
        return Err(Status::unauthenticated(
            "admin is served on the TLS gRPC port only, to operators (weftctl --credentials)",
        ));
    };
    let Some(id) = &peer.identity else {
        return Err(Status::unauthenticated(format!(
            "{} presented no client certificate: admin needs operator credentials (weftctl --credentials FILE, made by `weft-control-plane operator issue`)",
            peer.remote
        )));
    };
    use weft_proto::tls::OperatorScope;
    match (&peer.role, need) {
        (Role::Operator(name, OperatorScope::Mesh), _) => Ok(Caller::Operator(name.clone())),
        (Role::Operator(name, OperatorScope::Cluster(c)), _) if c == cluster => {
            Ok(Caller::Operator(name.clone()))
        }
        (Role::Operator(name, OperatorScope::Cluster(c)), _) => {
            Err(Status::permission_denied(format!(
                "operator {name}'s credentials were issued by cluster {c:?}'s intermediate: they count there, not on cluster {cluster:?} (issue mesh-wide ones from the root: `weft-control-plane operator issue --ca-dir ROOT_DIR`)"
            )))
        }
        (Role::ControlPlane(c), Need::Read | Need::OwnConfig) if c == cluster => {
            Ok(Caller::Replica)
        }
        (Role::ControlPlane(c), _) => Err(Status::permission_denied(format!(
            "the control plane of cluster {c:?} may not {}: only this cluster's replicas read, and only operators change",
            need.verb()
        ))),
        (Role::Workload, Need::OwnConfig) => Ok(Caller::Workload(id.clone())),
        (Role::Workload, _) => Err(Status::permission_denied(format!(
            "{id} is a workload and may not {}: that needs operator credentials (weftctl --credentials); a proxy may read only its own config",
            need.verb()
        ))),
    }
}

impl Need {
    fn verb(self) -> &'static str {
        match self {
            Need::Read => "read the mesh's state",
            Need::Write => "change the mesh or mint credentials",
            Need::OwnConfig => "read a proxy's config",
        }
    }
}

impl AdminService {
    /// Authorises `req`'s caller for `need` ([`authorize`]) and logs what an operator does.
    fn allow<T>(&self, req: &Request<T>, need: Need, what: &str) -> Result<Caller, Status> {
        let peer = req.extensions().get::<crate::grpc_tls::TlsPeer>();
        let caller = authorize(peer, &self.federation.cluster, need).inspect_err(|e| {
            tracing::info!(remote = ?peer.map(|p| p.remote), call = what, reason = %e.message(), "admin call refused");
        })?;
        if let Caller::Operator(name) = &caller
            && need == Need::Write
        {
            tracing::info!(operator = %name, call = what, "admin change by operator");
        }
        Ok(caller)
    }

    /// The proxies connected to this replica.
    fn local_proxies(&self) -> Vec<weft_proto::admin::ProxyStatus> {
        self.registry
            .all()
            .iter()
            .map(|r| lock(r).status(&self.replica))
            .collect()
    }

    /// The siblings' proxies, and every replica's status (this one, with `local` proxies,
    /// first). A replica reached at two addresses, or this one reached through the Service,
    /// counts once.
    async fn mesh_proxies(
        &self,
        local: usize,
    ) -> (
        Vec<weft_proto::admin::ProxyStatus>,
        Vec<weft_proto::admin::ReplicaStatus>,
    ) {
        let mut replicas = vec![weft_proto::admin::ReplicaStatus {
            name: self.replica.clone(),
            address: String::new(),
            proxies: local as u32,
            error: String::new(),
        }];
        let mut proxies = Vec::new();
        let answers = self
            .replicas
            .each(|mut c| async move {
                c.list_proxies(ListProxiesRequest { local_only: true })
                    .await
            })
            .await;
        for r in answers {
            match r.result {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    if replicas.iter().any(|x| x.name == resp.replica) {
                        continue;
                    }
                    replicas.push(weft_proto::admin::ReplicaStatus {
                        name: resp.replica,
                        address: r.address,
                        proxies: resp.proxies.len() as u32,
                        error: String::new(),
                    });
                    proxies.extend(resp.proxies);
                }
                Err(error) => replicas.push(weft_proto::admin::ReplicaStatus {
                    name: String::new(),
                    address: r.address,
                    proxies: 0,
                    error,
                }),
            }
        }
        (proxies, replicas)
    }

    /// The first sibling that answers `call` successfully (one that has the proxy asked for).
    async fn ask_siblings<T, F, Fut>(&self, call: F) -> Option<T>
    where
        F: Fn(weft_proto::admin::admin_client::AdminClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        self.replicas.first_ok(call).await.map(Response::into_inner)
    }

    /// What a "not connected" error covers.
    fn scope(&self, local_only: bool) -> String {
        match local_only {
            true => format!("replica {}", self.replica),
            false => format!("any replica reached from {}", self.replica),
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_proxies(
        &self,
        req: Request<ListProxiesRequest>,
    ) -> Result<Response<ListProxiesResponse>, Status> {
        self.allow(&req, Need::Read, "list_proxies")?;
        let mut proxies = self.local_proxies();
        if req.into_inner().local_only {
            return Ok(Response::new(ListProxiesResponse {
                proxies,
                replica: self.replica.clone(),
                replicas: Vec::new(),
            }));
        }
        let (remote, replicas) = self.mesh_proxies(proxies.len()).await;
        proxies.extend(remote);
        Ok(Response::new(ListProxiesResponse {
            proxies,
            replica: self.replica.clone(),
            replicas,
        }))
    }

    async fn get_proxy_config(
        &self,
        req: Request<GetProxyConfigRequest>,
    ) -> Result<Response<GetProxyConfigResponse>, Status> {
        let caller = self.allow(&req, Need::OwnConfig, "get_proxy_config")?;
        let req = req.into_inner();
        let id = req.node_id.clone();
        // A workload reads the config of a proxy whose stream its own certificate opened,
        // on the replica it is connected to; nothing else.
        let found = match &caller {
            Caller::Workload(who) => self.registry.find_opened_by(&id, who),
            _ => self.registry.find(&id),
        };
        if let Caller::Workload(who) = &caller
            && found.is_none()
        {
            return Err(Status::permission_denied(format!(
                "{who} may read only its own proxy's config; {id:?} is not a proxy connected here with that identity"
            )));
        }
        let Some(record) = found else {
            if !req.local_only {
                let ask = GetProxyConfigRequest {
                    local_only: true,
                    ..req
                };
                if let Some(found) = self
                    .ask_siblings(|mut c| {
                        let ask = ask.clone();
                        async move { c.get_proxy_config(ask).await }
                    })
                    .await
                {
                    return Ok(Response::new(found));
                }
            }
            return Err(Status::not_found(format!(
                "no proxy {id:?} is connected to {}",
                self.scope(req.local_only)
            )));
        };
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
        req: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        self.allow(&req, Need::Read, "list_services")?;
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
                    scopes: crate::translate::scopes(s, &model.cluster)
                        .into_iter()
                        .map(|sc| match sc {
                            weft_proto::names::Scope::Cluster => "cluster.local".to_string(),
                            weft_proto::names::Scope::Clusterset => "clusterset".to_string(),
                        })
                        .filter(|sc| s.local || sc == "clusterset")
                        .collect(),
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
        req: Request<weft_proto::admin::CheckRequest>,
    ) -> Result<Response<weft_proto::admin::CheckResponse>, Status> {
        self.allow(&req, Need::Read, "check")?;
        let local_only = req.into_inner().local_only;
        let proxies = self.local_proxies();
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let ctx = crate::check::Context {
            peers: self.federation.book.snapshot(),
            certs: proxies
                .iter()
                .filter_map(|p| Some((p.node_id.clone(), self.issued.get(&p.node_id)?)))
                .collect(),
            ca_expires_unix: self.ca.expires_at_unix(),
            now_unix,
        };
        let mut findings = crate::check::check(&self.catalog.current(), &proxies, &ctx);
        if !local_only {
            // Siblings' findings about their own proxies (and what only they see); what
            // every replica finds alike (the catalog's problems) once.
            for r in self
                .replicas
                .each(|mut c| async move {
                    c.check(weft_proto::admin::CheckRequest { local_only: true })
                        .await
                })
                .await
            {
                match r.result {
                    Ok(resp) => {
                        for f in resp.into_inner().findings {
                            if !findings
                                .iter()
                                .any(|have| have.code == f.code && have.object == f.object)
                            {
                                findings.push(f);
                            }
                        }
                    }
                    Err(e) => findings.push(weft_proto::admin::Finding {
                        object: format!("control-plane replica at {}", r.address),
                        problem: format!("not reached ({e}): its proxies are missing from this check"),
                        fix: "check that replica is running and its TLS port reachable from the others".into(),
                        code: "replica-unreachable".into(),
                    }),
                }
            }
        }
        Ok(Response::new(weft_proto::admin::CheckResponse { findings }))
    }

    async fn list_endpoints(
        &self,
        req: Request<weft_proto::admin::ListEndpointsRequest>,
    ) -> Result<Response<weft_proto::admin::ListEndpointsResponse>, Status> {
        self.allow(&req, Need::Read, "list_endpoints")?;
        let req = req.into_inner();
        let namespace = if req.namespace.is_empty() {
            "default".to_string()
        } else {
            req.namespace
        };
        let key = crate::catalog::ServiceKey::new(namespace, req.name);
        let model = self.catalog.current();
        let svc = model
            .services
            .get(&key)
            .ok_or_else(|| Status::not_found(format!("no Service {key} in the catalog")))?;
        // Priorities as one proxy sees them: read from the load assignments it was sent.
        let mut priorities: std::collections::HashMap<String, Vec<String>> = Default::default();
        if !req.proxy.is_empty() {
            let Some(record) = self.registry.find(&req.proxy) else {
                if !req.local_only {
                    let ask = weft_proto::admin::ListEndpointsRequest {
                        local_only: true,
                        namespace: key.namespace.clone(),
                        name: key.name.clone(),
                        proxy: req.proxy.clone(),
                    };
                    if let Some(found) = self
                        .ask_siblings(|mut c| {
                            let ask = ask.clone();
                            async move { c.list_endpoints(ask).await }
                        })
                        .await
                    {
                        return Ok(Response::new(found));
                    }
                }
                return Err(Status::not_found(format!(
                    "no proxy {:?} is connected to {}",
                    req.proxy,
                    self.scope(req.local_only)
                )));
            };
            let held = lock(&record).held(1);
            for r in held {
                let Some(name) = weft_proto::names::ServicePortName::parse(&r.name) else {
                    continue;
                };
                if name.name != key.name
                    || name.namespace != key.namespace
                    || name.scope != weft_proto::names::Scope::Cluster
                {
                    continue;
                }
                let Ok(cla) = <weft_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment as prost::Message>::decode(r.any.value.as_slice()) else {
                    continue;
                };
                for l in &cla.endpoints {
                    for e in &l.lb_endpoints {
                        use weft_proto::envoy::envoy::config::core::v3::address::Address;
                        use weft_proto::envoy::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
                        if let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier
                            && let Some(Address::SocketAddress(sa)) =
                                ep.address.as_ref().and_then(|a| a.address.as_ref())
                        {
                            priorities
                                .entry(sa.address.clone())
                                .or_default()
                                .push(format!("{}={}", name.port, l.priority));
                        }
                    }
                }
            }
        }
        let endpoints = svc
            .endpoints
            .iter()
            .map(|e| weft_proto::admin::EndpointInfo {
                address: e.address.to_string(),
                cluster: e.cluster.clone(),
                region: e.locality.region.clone(),
                zone: e.locality.zone.clone(),
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
                identity: e.identity.clone().unwrap_or_default(),
                pod: e.pod.clone().unwrap_or_default(),
                weight: e.weight,
                stale: e.stale,
                gateways: e
                    .via
                    .iter()
                    .flat_map(|v| v.gateways.iter().map(|g| g.to_string()))
                    .collect(),
                priorities: priorities
                    .remove(&e.address.to_string())
                    .unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(weft_proto::admin::ListEndpointsResponse {
            endpoints,
        }))
    }

    async fn check_authorization(
        &self,
        req: Request<weft_proto::admin::CheckAuthorizationRequest>,
    ) -> Result<Response<weft_proto::admin::CheckAuthorizationResponse>, Status> {
        self.allow(&req, Need::Read, "check_authorization")?;
        let req = req.into_inner();
        let model = self.catalog.current();
        let principal = match req.from.as_str() {
            "" => None,
            from => {
                let (ns, sa) = from.split_once('/').ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "from {from:?}: expected namespace/service-account (or nothing for plaintext)"
                    ))
                })?;
                let id = weft_proto::SpiffeId::new(&model.trust_domain, ns, sa)
                    .map_err(|e| Status::invalid_argument(format!("from {from:?}: {e}")))?;
                Some(id.to_string())
            }
        };
        let source = match req.source_ip.as_str() {
            "" => None,
            ip => Some(ip.parse().map_err(|_| {
                Status::invalid_argument(format!("source_ip {ip:?} is not an IP address"))
            })?),
        };
        let namespace = if req.namespace.is_empty() {
            "default".to_string()
        } else {
            req.namespace
        };
        let port = match req.port {
            0 => None,
            p => Some(u16::try_from(p).map_err(|_| {
                Status::invalid_argument(format!("port {p} is not a port (1-65535)"))
            })?),
        };
        let host = match req.host.is_empty() {
            true => format!("{}.{namespace}.svc.cluster.local", req.service),
            false => req.host,
        };
        let q = crate::inbound::AccessQuestion {
            principal,
            source,
            service: crate::catalog::ServiceKey::new(namespace, req.service),
            port,
            method: if req.method.is_empty() {
                "GET".into()
            } else {
                req.method
            },
            path: if req.path.is_empty() {
                "/".into()
            } else {
                req.path
            },
            host,
        };
        let verdicts = crate::inbound::check_access(&model, &q).map_err(Status::not_found)?;
        Ok(Response::new(
            weft_proto::admin::CheckAuthorizationResponse {
                verdicts: verdicts
                    .into_iter()
                    .map(|v| weft_proto::admin::AuthorizationVerdict {
                        pod: v.pod.unwrap_or_default(),
                        address: v.address.to_string(),
                        chain: v.chain.into(),
                        allowed: v.allowed,
                        policy: v.policy.unwrap_or_default(),
                        reason: v.reason,
                        audit: v.audit.unwrap_or_default(),
                    })
                    .collect(),
            },
        ))
    }

    async fn list_peers(
        &self,
        req: Request<weft_proto::admin::ListPeersRequest>,
    ) -> Result<Response<weft_proto::admin::ListPeersResponse>, Status> {
        self.allow(&req, Need::Read, "list_peers")?;
        let fed = &self.federation;
        let exporting = fed.book.exporting_to();
        let model = self.catalog.current();
        let secs = |i: Option<std::time::Instant>| i.map_or(-1, |t| t.elapsed().as_secs() as i64);
        let peers = fed
            .book
            .snapshot()
            .into_iter()
            .map(|(name, i)| weft_proto::admin::PeerStatus {
                network: model
                    .peer_vias
                    .get(&name)
                    .map(|v| v.network.clone())
                    .unwrap_or_default(),
                gateways: model
                    .peer_vias
                    .get(&name)
                    .map(|v| v.gateways.iter().map(|g| g.to_string()).collect())
                    .unwrap_or_default(),
                exporting_to: exporting.contains(&name),
                name,
                address: i.address,
                origin: i.origin.as_str().into(),
                state: i.state.as_str().into(),
                last_sync_seconds: secs(i.last_heard),
                stale_seconds: secs(i.lost_at).max(0),
                version: i.version,
                services: i.services,
                endpoints: i.endpoints,
                last_error: i.last_error,
            })
            .collect();
        Ok(Response::new(weft_proto::admin::ListPeersResponse {
            cluster: fed.cluster.clone(),
            peers,
        }))
    }

    async fn get_trust_bundle(
        &self,
        req: Request<weft_proto::admin::GetTrustBundleRequest>,
    ) -> Result<Response<weft_proto::admin::GetTrustBundleResponse>, Status> {
        self.allow(&req, Need::Read, "get_trust_bundle")?;
        Ok(Response::new(weft_proto::admin::GetTrustBundleResponse {
            roots_pem: self.ca.trust_bundle(),
        }))
    }

    async fn list_rollouts(
        &self,
        req: Request<weft_proto::admin::ListRolloutsRequest>,
    ) -> Result<Response<weft_proto::admin::ListRolloutsResponse>, Status> {
        self.allow(&req, Need::Read, "list_rollouts")?;
        let model = self.catalog.current();
        let rollouts = self
            .rollouts
            .states()
            .into_iter()
            .map(|(name, st)| {
                let m = model.rollouts.get(&name);
                let window = m.map(|m| self.rollouts.window(m, &st)).unwrap_or_default();
                weft_proto::admin::RolloutStatus {
                    steps: m.map(|m| m.steps.clone()).unwrap_or_default(),
                    name,
                    canary: st.canary.clone(),
                    split: st.split_origin.clone(),
                    phase: format!("{:?}", st.phase),
                    weight: st.weight,
                    step: st.step as u32,
                    window_requests: window.finished(),
                    window_success_rate: window.success_rate().unwrap_or(0.0),
                    window_p99_ms: window.p99().map_or(0, |d| d.as_millis() as u64),
                    decisions: st
                        .decisions
                        .iter()
                        .map(|d| weft_proto::admin::RolloutDecision {
                            at_unix_ms: d.at_unix_ms,
                            kind: d.kind.clone(),
                            from_weight: d.from,
                            to_weight: d.to,
                            reason: d.reason.clone(),
                        })
                        .collect(),
                }
            })
            .collect();
        Ok(Response::new(weft_proto::admin::ListRolloutsResponse {
            rollouts,
        }))
    }

    async fn create_join_token(
        &self,
        req: Request<weft_proto::admin::CreateJoinTokenRequest>,
    ) -> Result<Response<weft_proto::admin::CreateJoinTokenResponse>, Status> {
        self.allow(&req, Need::Write, "create_join_token")?;
        let req = req.into_inner();
        let ttl = if req.ttl_seconds == 0 {
            3600
        } else {
            req.ttl_seconds
        };
        let (token, claims) = self
            .tokens
            .mint_claims(&req.namespace, &req.service_account, ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(identity = %claims.identity, token = %claims.id, expires_at = claims.expires_at_unix, "join token minted");
        Ok(Response::new(weft_proto::admin::CreateJoinTokenResponse {
            token,
            spiffe_id: claims.identity.to_string(),
            expires_at_unix: claims.expires_at_unix,
            id: claims.id,
        }))
    }

    async fn revoke_join_token(
        &self,
        req: Request<weft_proto::admin::RevokeJoinTokenRequest>,
    ) -> Result<Response<weft_proto::admin::RevokeJoinTokenResponse>, Status> {
        self.allow(&req, Need::Write, "revoke_join_token")?;
        let id = req.into_inner().id;
        if !crate::identity::token::valid_id(&id) {
            return Err(Status::invalid_argument(format!(
                "{id:?} is not a join token id (32 lowercase hex digits, as `weftctl token create` prints)"
            )));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let until = now + self.tokens.max_ttl_secs() as i64;
        let newly_revoked = self
            .ledger
            .revoke_everywhere(&id, until)
            .await
            .map_err(|e| Status::unavailable(format!("recording the revocation: {e}")))?;
        tracing::info!(token = %id, newly_revoked, "join token revoked");
        Ok(Response::new(weft_proto::admin::RevokeJoinTokenResponse {
            newly_revoked,
        }))
    }

    async fn list_source_errors(
        &self,
        req: Request<ListSourceErrorsRequest>,
    ) -> Result<Response<ListSourceErrorsResponse>, Status> {
        self.allow(&req, Need::Read, "list_source_errors")?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Ca;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use std::time::Duration;
    use weft_proto::tls::rustls;

    fn peer_of(leaf_pem: &str) -> crate::grpc_tls::TlsPeer {
        let der = CertificateDer::from_pem_slice(leaf_pem.as_bytes()).expect("pem");
        crate::grpc_tls::TlsPeer {
            remote: "127.0.0.1:1".parse().expect("addr"),
            identity: weft_proto::tls::spiffe_id_of(&der).ok(),
            role: weft_proto::tls::role_of(&der),
        }
    }

    /// Powers are bound to the cluster whose intermediate issued them: one cluster's
    /// intermediate (all a compromised cluster holds) mints neither operators nor control
    /// planes of another; the root itself (offline) mints mesh-wide operators.
    #[test]
    fn one_clusters_intermediate_gives_no_power_over_another() {
        let base = tempfile::tempdir().expect("dir");
        let root = base.path().join("root");
        Ca::load_or_generate(Some(&root), "cluster.local", "root").expect("root");
        for c in ["east", "west"] {
            Ca::make_intermediate(&root, c, &base.path().join(c)).expect("intermediate");
        }
        let east = Ca::load_or_generate(Some(&base.path().join("east")), "cluster.local", "east")
            .expect("east");
        let leaf = |creds: weft_proto::credentials::Credentials| creds.chain[0].clone();
        let east_operator = leaf(
            east.issue_operator("cluster.local", "mallory", Duration::from_secs(60))
                .expect("issue"),
        );
        let on = |pem: &str, cluster: &str, need| authorize(Some(&peer_of(pem)), cluster, need);
        assert!(on(&east_operator, "east", Need::Write).is_ok());
        let err = on(&east_operator, "west", Need::Write).expect_err("east's operator on west");
        assert!(
            err.message().contains("issued by cluster \"east\""),
            "{err:?}"
        );
        // East's intermediate signing a control-plane certificate that names west: no role.
        let cp = weft_proto::SpiffeId::new("cluster.local", "weft-system", "weft-control-plane")
            .expect("id");
        let (csr, _) = weft_proto::tls::new_csr(&cp.to_string()).expect("csr");
        let forged = east
            .sign_control_plane(&csr, &cp, None, "west")
            .expect("signed");
        assert_eq!(
            peer_of(&forged.chain[0]).role,
            weft_proto::tls::Role::Workload
        );
        assert!(on(&forged.chain[0], "west", Need::Read).is_err());
        let (csr, _) = weft_proto::tls::new_csr(&cp.to_string()).expect("csr");
        let own = east
            .sign_control_plane(&csr, &cp, None, "east")
            .expect("signed");
        assert!(on(&own.chain[0], "east", Need::Read).is_ok());
        // The root's own operators count everywhere.
        let mesh = leaf(
            Ca::root_signer(&root)
                .expect("root signer")
                .issue_operator("cluster.local", "alice", Duration::from_secs(60))
                .expect("issue"),
        );
        assert!(on(&mesh, "west", Need::Write).is_ok() && on(&mesh, "east", Need::Write).is_ok());
    }
}
