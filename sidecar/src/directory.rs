//! The mesh's directory as an on-demand sidecar keeps it: every Service's names, addresses and
//! ports (`weft.xds.v1.DirectoryEntry`, one resource per Service), and how a request's
//! authority or original destination resolves to the one service-port whose routes, cluster
//! and endpoints it then subscribes to. A leaf module: it knows names, not config.
//!
//! Compact on purpose: entries are keyed by their resource name `<svc>.<ns>` (which is what a
//! host resolves to, so no per-host-form strings are stored) plus one index of addresses.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use weft_proto::names::{Scope, ServicePortName};
use weft_proto::visibility::EgressHost;

use crate::http::FastMap;

/// A refused directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryError {
    /// The field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// One Service's name in one scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeEntry {
    /// Cluster-local or clusterset.
    pub scope: Scope,
    /// Its clusterIP or clusterset VIP.
    pub addresses: Box<[IpAddr]>,
    /// Its ports, ascending, with the protocol each declares.
    pub ports: Box<[(u16, Box<str>)]>,
}

/// One Service of the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Service name.
    pub name: Box<str>,
    /// Namespace.
    pub namespace: Box<str>,
    /// Its names.
    pub scopes: Box<[ScopeEntry]>,
}

impl Entry {
    /// Compiles a directory entry resource, naming the field of what is wrong.
    pub fn from_xds(e: &weft_proto::xds::DirectoryEntry) -> Result<Self, EntryError> {
        let err = |field: String, message: String| EntryError { field, message };
        if e.name.is_empty() || e.namespace.is_empty() {
            return Err(err("name".into(), "name and namespace are required".into()));
        }
        let mut scopes = Vec::with_capacity(e.scopes.len());
        for (i, s) in e.scopes.iter().enumerate() {
            let scope = match s.zone.as_str() {
                "cluster.local" => Scope::Cluster,
                "clusterset.local" => Scope::Clusterset,
                other => {
                    return Err(err(
                        format!("scopes[{i}].zone"),
                        format!("{other:?} is neither cluster.local nor clusterset.local"),
                    ));
                }
            };
            let mut addresses = Vec::with_capacity(s.addresses.len());
            for (j, a) in s.addresses.iter().enumerate() {
                addresses.push(a.parse::<IpAddr>().map_err(|_| {
                    err(
                        format!("scopes[{i}].addresses[{j}]"),
                        format!("{a:?} is not an IP address"),
                    )
                })?);
            }
            let mut ports = Vec::with_capacity(s.ports.len());
            for (j, p) in s.ports.iter().enumerate() {
                let port = u16::try_from(p.port)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| {
                        err(
                            format!("scopes[{i}].ports[{j}].port"),
                            format!("{} is not a port", p.port),
                        )
                    })?;
                ports.push((port, p.protocol.clone().into_boxed_str()));
            }
            ports.sort();
            scopes.push(ScopeEntry {
                scope,
                addresses: addresses.into(),
                ports: ports.into(),
            });
        }
        Ok(Entry {
            name: e.name.clone().into(),
            namespace: e.namespace.clone().into(),
            scopes: scopes.into(),
        })
    }

    fn scope(&self, scope: Scope) -> Option<&ScopeEntry> {
        self.scopes.iter().find(|s| s.scope == scope)
    }

    /// The service-port of `scope` a request names: `port` when given (and the Service has
    /// it), else the one a host without a port maps to, which is what the full config's
    /// virtual hosts give such a host: the first of the ports in resource-name order.
    fn port_name(&self, scope: Scope, port: Option<u16>) -> Option<ServicePortName> {
        let s = self.scope(scope)?;
        let port = match port {
            Some(p) => s.ports.iter().find(|(q, _)| *q == p)?.0,
            None => s
                .ports
                .iter()
                .map(|(p, _)| *p)
                .min_by_key(|p| p.to_string())?,
        };
        Some(ServicePortName::new(&*self.name, &*self.namespace, port).with_scope(scope))
    }
}

/// The directory: entries by resource name, and the addresses they are dialed at.
#[derive(Debug, Default)]
pub struct Directory {
    entries: FastMap<Box<str>, Arc<Entry>>,
    addresses: FastMap<IpAddr, (Arc<Entry>, Scope)>,
}

/// `/config_dump` shows how many Services it holds, not each of them.
impl serde::Serialize for Directory {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Directory", 2)?;
        st.serialize_field("services", &self.entries.len())?;
        st.serialize_field("addresses", &self.addresses.len())?;
        st.end()
    }
}

impl Directory {
    /// Indexes the held entries, keeping only those `egress` lets a proxy of `namespace` see.
    pub fn build(
        held: &BTreeMap<String, Arc<Entry>>,
        egress: &[EgressHost],
        namespace: &str,
    ) -> Self {
        let mut d = Directory::default();
        for (name, e) in held {
            let visible: Vec<Scope> = e
                .scopes
                .iter()
                .map(|s| s.scope)
                .filter(|s| {
                    let fqdn = weft_proto::names::service_host(&e.name, &e.namespace, *s);
                    weft_proto::visibility::egress_allows(egress, &fqdn, &e.namespace, namespace)
                })
                .collect();
            if visible.is_empty() {
                continue;
            }
            let e = if visible.len() == e.scopes.len() {
                e.clone()
            } else {
                Arc::new(Entry {
                    scopes: e
                        .scopes
                        .iter()
                        .filter(|s| visible.contains(&s.scope))
                        .cloned()
                        .collect(),
                    ..(**e).clone()
                })
            };
            for s in e.scopes.iter() {
                for a in s.addresses.iter() {
                    d.addresses
                        .entry(*a)
                        .or_insert_with(|| (e.clone(), s.scope));
                }
            }
            d.entries.insert(name.as_str().into(), e);
        }
        d
    }

    /// Services held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The service-port a request resolves to: by its authority (the mesh's name forms, short
    /// names in the proxy's `namespace`), else by the address it dialed (`orig`, or an
    /// `ip[:port]` authority: a clusterIP or clusterset VIP; a bare address is port 80 unless
    /// the connection says otherwise).
    pub fn resolve(
        &self,
        authority: &str,
        orig: Option<SocketAddr>,
        namespace: &str,
    ) -> Option<ServicePortName> {
        if let Some(h) = weft_proto::names::resolve_host(authority, namespace) {
            let key = format!("{}.{}", h.name, h.namespace);
            if let Some(e) = self.entries.get(key.as_str()) {
                let port = h.port.or_else(|| {
                    orig.map(|o| o.port())
                        .filter(|p| e.port_name(h.scope, Some(*p)).is_some())
                });
                // A port or scope the Service lacks falls through to the dialed address.
                if let Some(n) = e.port_name(h.scope, port) {
                    return Some(n);
                }
            }
        }
        let by_authority = authority.parse::<SocketAddr>().ok().or_else(|| {
            authority
                .parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, 80))
        });
        by_authority
            .into_iter()
            .chain(orig)
            .find_map(|dst| self.by_address(dst))
    }

    /// Every port of the Service and scope `name` names.
    pub fn ports(&self, name: &ServicePortName) -> Vec<u16> {
        self.entries
            .get(format!("{}.{}", name.name, name.namespace).as_str())
            .and_then(|e| e.scope(name.scope))
            .map(|s| s.ports.iter().map(|(p, _)| *p).collect())
            .unwrap_or_default()
    }

    /// The service-port a connection to `dst` (a clusterIP or VIP and port) reaches.
    pub fn by_address(&self, dst: SocketAddr) -> Option<ServicePortName> {
        let (e, scope) = self.addresses.get(&dst.ip())?;
        e.port_name(*scope, Some(dst.port()))
    }

    /// The addresses of a mesh DNS name (`<svc>.<ns>.svc.cluster.local` or
    /// `.svc.clusterset.local`, lower case, no trailing dot); `None` for a name it does not hold.
    pub fn dns(&self, name: &str) -> Option<Arc<[IpAddr]>> {
        let scope = if name.ends_with(weft_proto::names::CLUSTERSET_DOMAIN) {
            Scope::Clusterset
        } else if name.ends_with(weft_proto::names::CLUSTER_DOMAIN) {
            Scope::Cluster
        } else {
            return None;
        };
        let h = weft_proto::names::resolve_host(name, "")?;
        let e = self
            .entries
            .get(format!("{}.{}", h.name, h.namespace).as_str())?;
        let s = e.scope(scope)?;
        (!s.addresses.is_empty()).then(|| s.addresses.iter().copied().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::xds::{DirectoryEntry, DirectoryPort, DirectoryScope};

    fn entry(name: &str, ns: &str, zone: &str, addr: &str, ports: &[u32]) -> DirectoryEntry {
        DirectoryEntry {
            name: name.into(),
            namespace: ns.into(),
            scopes: vec![DirectoryScope {
                zone: zone.into(),
                addresses: vec![addr.into()],
                ports: ports
                    .iter()
                    .map(|p| DirectoryPort {
                        port: *p,
                        protocol: "http".into(),
                    })
                    .collect(),
            }],
            export_to: Vec::new(),
        }
    }

    fn dir(entries: &[DirectoryEntry], egress: &[EgressHost]) -> Directory {
        let held = entries
            .iter()
            .map(|e| {
                (
                    format!("{}.{}", e.name, e.namespace),
                    Arc::new(Entry::from_xds(e).expect("valid")),
                )
            })
            .collect();
        Directory::build(&held, egress, "default")
    }

    #[test]
    fn hosts_and_addresses_resolve_to_one_service_port() {
        let d = dir(
            &[
                entry(
                    "echo",
                    "default",
                    "cluster.local",
                    "198.18.0.10",
                    &[8080, 80],
                ),
                entry("db", "data", "clusterset.local", "240.240.0.7", &[5432]),
            ],
            &[],
        );
        let r = |a: &str, o: Option<&str>| {
            d.resolve(a, o.map(|o| o.parse().expect("addr")), "default")
                .map(|n| n.to_string())
        };
        assert_eq!(
            r("echo", None).as_deref(),
            Some("echo.default.svc.cluster.local:80")
        );
        assert_eq!(
            r("echo.default.svc:8080", None).as_deref(),
            Some("echo.default.svc.cluster.local:8080")
        );
        // The dialed port decides for a host without one.
        assert_eq!(
            r("echo", Some("198.18.0.10:8080")).as_deref(),
            Some("echo.default.svc.cluster.local:8080")
        );
        assert_eq!(r("echo:9999", None), None, "a port the Service lacks");
        // ... but the address it dialed still names a service-port.
        assert_eq!(
            r("echo:9999", Some("198.18.0.10:8080")).as_deref(),
            Some("echo.default.svc.cluster.local:8080")
        );
        assert_eq!(
            r("198.18.0.10", None).as_deref(),
            Some("echo.default.svc.cluster.local:80")
        );
        assert_eq!(
            r("whatever", Some("240.240.0.7:5432")).as_deref(),
            Some("db.data.svc.clusterset.local:5432")
        );
        assert_eq!(r("db.data", None), None, "db has only the clusterset name");
        assert_eq!(r("unknown", Some("198.18.9.9:80")), None);
        assert_eq!(
            d.dns("db.data.svc.clusterset.local").as_deref(),
            Some(&["240.240.0.7".parse::<IpAddr>().expect("ip")][..])
        );
        assert_eq!(d.dns("db.data.svc.cluster.local"), None);
    }

    #[test]
    fn egress_hosts_cut_the_directory() {
        let egress = weft_proto::visibility::parse_egress_hosts("./*").expect("hosts");
        let d = dir(
            &[
                entry("echo", "default", "cluster.local", "198.18.0.10", &[80]),
                entry("db", "data", "cluster.local", "198.18.0.11", &[5432]),
            ],
            &egress,
        );
        assert_eq!(d.len(), 1);
        assert!(d.resolve("db.data", None, "default").is_none());
        assert!(
            d.by_address("198.18.0.11:5432".parse().expect("addr"))
                .is_none()
        );
    }

    #[test]
    fn a_bad_entry_names_its_field() {
        let mut e = entry("echo", "default", "cluster.local", "not-an-ip", &[80]);
        let err = Entry::from_xds(&e).expect_err("bad address");
        assert_eq!(err.field, "scopes[0].addresses[0]");
        e.scopes[0].addresses.clear();
        e.scopes[0].zone = "example.com".into();
        assert_eq!(
            Entry::from_xds(&e).expect_err("zone").field,
            "scopes[0].zone"
        );
    }
}
