//! Every integration test of this crate, one module per file (one binary to build and link).

mod cluster;
mod containers;
mod envtest;
mod grpc_xds_interop;
mod install_mock_api;
mod interception;
mod logs;
mod mesh_dns;
mod multicluster;
mod tcp_mtls;
mod two_networks;
