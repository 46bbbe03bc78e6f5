//! The smallest Envoy resources Weft's sidecar accepts, for tests, examples and tools that
//! speak xDS to it (the fake ADS server in `weft-testkit`, the sidecar's own unit tests).

use std::net::SocketAddr;

use prost::{Message, Name};

use crate::envoy::envoy::config::cluster::v3 as cluster;
use crate::envoy::envoy::config::core::v3 as core;
use crate::envoy::envoy::config::endpoint::v3 as endpoint;
use crate::envoy::envoy::config::listener::v3 as listener;
use crate::envoy::envoy::config::route::v3 as route;
use crate::envoy::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use crate::envoy::google::protobuf as pb;

/// An EDS cluster named `name`.
pub fn eds_cluster(name: &str) -> cluster::Cluster {
    cluster::Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        ..Default::default()
    }
}

/// The assignment of cluster `name`: `endpoints`, healthy, in one locality.
pub fn assignment(name: &str, endpoints: &[SocketAddr]) -> endpoint::ClusterLoadAssignment {
    let lb = endpoints
        .iter()
        .map(|a| endpoint::LbEndpoint {
            host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                endpoint::Endpoint {
                    address: Some(core::Address {
                        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                            address: a.ip().to_string(),
                            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(
                                u32::from(a.port()),
                            )),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                },
            )),
            health_status: core::HealthStatus::Healthy as i32,
            ..Default::default()
        })
        .collect();
    endpoint::ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![endpoint::LocalityLbEndpoints {
            lb_endpoints: lb,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// An API listener named `name` whose routes are the RouteConfiguration `routes` (RDS).
pub fn api_listener(name: &str, routes: &str) -> listener::Listener {
    use prost::Message;
    let manager = hcm::HttpConnectionManager {
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                route_config_name: routes.into(),
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    listener::Listener {
        name: name.into(),
        api_listener: Some(listener::ApiListener {
            api_listener: Some(pb::Any {
                type_url: <hcm::HttpConnectionManager as prost::Name>::type_url(),
                value: manager.encode_to_vec(),
            }),
        }),
        ..Default::default()
    }
}

/// A RouteConfiguration `name` sending every path of `domain` to `cluster`.
pub fn route_to(name: &str, domain: &str, cluster: &str) -> route::RouteConfiguration {
    route::RouteConfiguration {
        name: name.into(),
        virtual_hosts: vec![route::VirtualHost {
            name: name.into(),
            domains: vec![domain.into()],
            routes: vec![route::Route {
                r#match: Some(route::RouteMatch {
                    path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::route::Action::Route(route::RouteAction {
                    cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(
                        cluster.into(),
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// `m` packed as an `Any` under its type URL.
pub fn any<M: Message + Name>(m: &M) -> pb::Any {
    pb::Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}
