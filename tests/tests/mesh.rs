//! Every integration test of this crate, one module per file (one binary to build and link).

mod ads;
mod authz;
mod dns;
mod fail_closed;
mod federation;
mod forgery;
mod gateway;
mod hardening;
mod health;
mod identity;
mod kube_source;
mod mtls;
mod on_demand;
mod peer_auth;
mod resilience;
mod rollout;
mod sidecar;
#[path = "tracing.rs"]
mod traces;
mod xds_client;
