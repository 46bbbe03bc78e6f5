//! The per-workload inbound Listener (`weft-inbound`): how one sidecar's inbound treats each
//! of its ports — the mTLS mode its PeerAuthentications (or namespace) give it, and the
//! protocol its Service ports declare (`appProtocol` or the port name's prefix).
//!
//! Unlike every other resource it depends on who asks, so a stream's snapshot is keyed by
//! (place, inbound listener): the replicas of one Deployment at one place still share one.
//! The sidecar is found by what its node says: node id `<pod>.<namespace>`, namespace, and
//! pod IPs (`INSTANCE_IPS`). A proxy that lies about them only changes how its own inbound
//! treats its own connections, which it controls anyway.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use weft_proto::envoy::envoy::config::core::v3 as core;
use weft_proto::envoy::envoy::config::listener::v3 as listener;
use weft_proto::protocol::Declared;

use crate::catalog::ServiceKey;
use crate::translate::{Res, Translation, resource, socket_address, weft_metadata};

/// Who asks, as its xDS node says.
#[derive(Clone, Copy, Debug)]
pub struct Workload<'a> {
    /// Its namespace.
    pub namespace: &'a str,
    /// Its pod's name, when the node id names it.
    pub pod: Option<&'a str>,
    /// Its pod's IPs.
    pub ips: &'a [IpAddr],
}

/// The protocol that wins when two Service ports reach the same container port: HTTP
/// (parsed, mesh headers stripped) over opaque, a declaration over none.
fn stronger(a: &str, b: &str) -> bool {
    let rank = |p: &str| match Declared::of(p) {
        Some(Declared::Http) => 2,
        Some(Declared::Opaque) => 1,
        None => 0,
    };
    rank(b) > rank(a)
}

/// The inbound Listener of one workload.
pub fn inbound_meta(t: &Translation, w: &Workload<'_>) -> weft_proto::xds::InboundMeta {
    let labels = w
        .pod
        .and_then(|p| t.pod_labels.get(&ServiceKey::new(w.namespace, p)));
    let mtls = t.mtls.resolve(w.namespace, labels);
    // Container port -> declared protocol, from this cluster's Services of its namespace
    // whose endpoints are this pod (by name, else by address).
    let mut protocols: BTreeMap<u16, String> = BTreeMap::new();
    let from = ServiceKey::new(w.namespace, "");
    for (_, xds) in t
        .services
        .range(from..)
        .take_while(|(k, _)| k.namespace == w.namespace)
    {
        let svc = &xds.model;
        for e in &svc.endpoints {
            let this_pod = match (&e.pod, w.pod) {
                (Some(p), Some(q)) => p == q,
                (None, _) => w.ips.contains(&e.address),
                (Some(_), None) => false,
            };
            if !this_pod || e.cluster != t.cluster {
                continue;
            }
            for port in &svc.ports {
                let Some(target) = e.port_for(port) else {
                    continue;
                };
                let p = port.protocol();
                let slot = protocols.entry(target).or_default();
                if stronger(slot, &p) {
                    *slot = p;
                }
            }
        }
    }
    let mut ports: BTreeMap<u16, weft_proto::xds::InboundPort> = BTreeMap::new();
    for (port, protocol) in protocols {
        ports.entry(port).or_default().protocol = protocol;
    }
    for (port, s) in &mtls.ports {
        let p = ports.entry(*port).or_default();
        p.mtls_mode = s.mode.as_str().to_string();
        p.mtls_source = s.source.clone();
    }
    weft_proto::xds::InboundMeta {
        mtls_mode: mtls.mode.mode.as_str().to_string(),
        mtls_source: mtls.mode.source,
        ports: ports
            .into_iter()
            .map(|(port, mut p)| {
                p.port = u32::from(port);
                p
            })
            .collect(),
    }
}

/// The `weft-inbound` Listener carrying [`inbound_meta`].
pub fn inbound_listener(t: &Translation, w: &Workload<'_>) -> Res {
    let l = listener::Listener {
        name: weft_proto::keys::INBOUND_LISTENER.to_string(),
        address: Some(socket_address(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            weft_proto::keys::INBOUND_PORT,
        )),
        traffic_direction: core::TrafficDirection::Inbound as i32,
        metadata: Some(weft_metadata(&inbound_meta(t, w))),
        ..Default::default()
    };
    resource(l.name.clone(), &l)
}
