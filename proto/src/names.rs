//! Names of xDS resources and the host forms a Service answers to.
//!
//! For every Service port the control plane serves a Listener (an API listener, what a proxyless
//! gRPC client asks for with `xds:///<svc>.<ns>.svc.cluster.local:<port>`), a RouteConfiguration,
//! a Cluster and a ClusterLoadAssignment, all named `<svc>.<ns>.svc.cluster.local:<port>`.
//! The clusterset form (`.svc.clusterset.local`) names the same service across every cluster.

use std::fmt;

/// DNS suffix of a Service inside its own cluster.
pub const CLUSTER_DOMAIN: &str = "svc.cluster.local";
/// DNS suffix of a Service across every cluster of the clusterset (Kubernetes MCS).
pub const CLUSTERSET_DOMAIN: &str = "svc.clusterset.local";

/// Which DNS scope a host names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// `<svc>.<ns>.svc.cluster.local`: this cluster's endpoints (plus failover when a policy allows).
    Cluster,
    /// `<svc>.<ns>.svc.clusterset.local`: every cluster's endpoints.
    Clusterset,
}

impl Scope {
    /// The DNS suffix of the scope.
    pub fn domain(self) -> &'static str {
        match self {
            Scope::Cluster => CLUSTER_DOMAIN,
            Scope::Clusterset => CLUSTERSET_DOMAIN,
        }
    }
}

/// One port of one Service in one scope: the key of every xDS resource Weft serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    /// Service name.
    pub name: String,
    /// Service namespace.
    pub namespace: String,
    /// Service port.
    pub port: u16,
    /// Cluster-local or clusterset.
    pub scope: Scope,
}

impl ServicePortName {
    /// A cluster-scoped name.
    pub fn new(name: impl Into<String>, namespace: impl Into<String>, port: u16) -> Self {
        ServicePortName {
            name: name.into(),
            namespace: namespace.into(),
            port,
            scope: Scope::Cluster,
        }
    }

    /// The same service and port in another scope.
    pub fn with_scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    /// The fully qualified host, without port.
    pub fn host(&self) -> String {
        service_host(&self.name, &self.namespace, self.scope)
    }

    /// Parses a resource name back; `None` when it is not one Weft made.
    pub fn parse(resource: &str) -> Option<Self> {
        let (host, port) = resource.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let (scope, rest) = if let Some(r) = host.strip_suffix(CLUSTER_DOMAIN) {
            (Scope::Cluster, r)
        } else {
            (Scope::Clusterset, host.strip_suffix(CLUSTERSET_DOMAIN)?)
        };
        let rest = rest.strip_suffix('.')?;
        let (name, namespace) = rest.split_once('.')?;
        if name.is_empty() || namespace.is_empty() || namespace.contains('.') {
            return None;
        }
        Some(ServicePortName {
            name: name.into(),
            namespace: namespace.into(),
            port,
            scope,
        })
    }
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}:{}",
            self.name,
            self.namespace,
            self.scope.domain(),
            self.port
        )
    }
}

/// `<svc>.<ns>.svc.cluster.local` or `<svc>.<ns>.svc.clusterset.local`.
pub fn service_host(name: &str, namespace: &str, scope: Scope) -> String {
    format!("{name}.{namespace}.{}", scope.domain())
}

/// Every host form a Service port answers to, for a VirtualHost's `domains`: the fully qualified
/// name, `<svc>.<ns>.svc`, `<svc>.<ns>`, and (for clients in the same namespace) `<svc>`, each
/// with and without `:<port>`. The clusterset scope answers only to its fully qualified name.
pub fn virtual_host_domains(name: &str, namespace: &str, port: u16, scope: Scope) -> Vec<String> {
    let fqdn = service_host(name, namespace, scope);
    let mut hosts = vec![fqdn];
    if scope == Scope::Cluster {
        hosts.push(format!("{name}.{namespace}.svc"));
        hosts.push(format!("{name}.{namespace}"));
    }
    let mut out = Vec::with_capacity(hosts.len() * 2);
    for h in hosts {
        out.push(format!("{h}:{port}"));
        out.push(h);
    }
    out
}

/// A request authority resolved against the mesh's naming rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedHost {
    /// Service name.
    pub name: String,
    /// Service namespace.
    pub namespace: String,
    /// Port from the authority, if it had one.
    pub port: Option<u16>,
    /// Cluster-local or clusterset.
    pub scope: Scope,
}

/// Resolves an authority (`host[:port]`) as DESIGN.md lists the forms:
/// `<svc>.<ns>.svc.cluster.local`, `<svc>.<ns>.svc`, `<svc>.<ns>`, `<svc>` (in `client_namespace`),
/// and `<svc>.<ns>.svc.clusterset.local`. `None` for IP literals and names outside the mesh.
pub fn resolve_host(authority: &str, client_namespace: &str) -> Option<ResolvedHost> {
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, Some(p.parse::<u16>().ok()?)),
        Some(_) => return None, // IPv6 literal
        None => (authority, None),
    };
    let host = host.trim_end_matches('.');
    if host.is_empty() || host.parse::<std::net::Ipv4Addr>().is_ok() {
        return None;
    }
    let (scope, stem) = if let Some(s) = host.strip_suffix(CLUSTERSET_DOMAIN) {
        (Scope::Clusterset, s.strip_suffix('.')?)
    } else if let Some(s) = host.strip_suffix(CLUSTER_DOMAIN) {
        (Scope::Cluster, s.strip_suffix('.')?)
    } else if let Some(s) = host.strip_suffix(".svc") {
        (Scope::Cluster, s)
    } else {
        (Scope::Cluster, host)
    };
    let parts: Vec<&str> = stem.split('.').collect();
    let (name, namespace) = match parts.as_slice() {
        [name] => (*name, client_namespace),
        [name, ns] => (*name, *ns),
        _ => return None,
    };
    if name.is_empty() || namespace.is_empty() {
        return None;
    }
    Some(ResolvedHost {
        name: name.to_ascii_lowercase(),
        namespace: namespace.to_ascii_lowercase(),
        port,
        scope,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names_round_trip() {
        let n = ServicePortName::new("echo", "default", 8080);
        assert_eq!(n.to_string(), "echo.default.svc.cluster.local:8080");
        assert_eq!(ServicePortName::parse(&n.to_string()), Some(n.clone()));
        let cs = n.with_scope(Scope::Clusterset);
        assert_eq!(cs.to_string(), "echo.default.svc.clusterset.local:8080");
        assert_eq!(ServicePortName::parse(&cs.to_string()), Some(cs));
    }

    #[test]
    fn resource_name_rejects() {
        for bad in [
            "echo.default.svc.cluster.local",
            "echo.default.svc.cluster.local:http",
            "echo.default.svc.cluster.local:70000",
            "echo.svc.cluster.local:80",
            ".default.svc.cluster.local:80",
            "echo.a.b.svc.cluster.local:80",
            "echo.default.example.com:80",
            "echo.defaultsvc.cluster.local:80",
        ] {
            assert_eq!(ServicePortName::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn resolves_every_host_form() {
        let want = |name: &str, ns: &str, port, scope| ResolvedHost {
            name: name.into(),
            namespace: ns.into(),
            port,
            scope,
        };
        assert_eq!(
            resolve_host("echo.prod.svc.cluster.local:8080", "default"),
            Some(want("echo", "prod", Some(8080), Scope::Cluster))
        );
        assert_eq!(
            resolve_host("echo.prod.svc", "default"),
            Some(want("echo", "prod", None, Scope::Cluster))
        );
        assert_eq!(
            resolve_host("echo.prod:80", "default"),
            Some(want("echo", "prod", Some(80), Scope::Cluster))
        );
        assert_eq!(
            resolve_host("Echo", "default"),
            Some(want("echo", "default", None, Scope::Cluster))
        );
        assert_eq!(
            resolve_host("echo.prod.svc.clusterset.local:9", "default"),
            Some(want("echo", "prod", Some(9), Scope::Clusterset))
        );
    }

    #[test]
    fn does_not_resolve_foreign_hosts() {
        for h in [
            "127.0.0.1:80",
            "[::1]:80",
            "example.com.au",
            "a.b.c",
            "echo:notaport",
            "",
        ] {
            assert_eq!(resolve_host(h, "default"), None, "{h}");
        }
    }

    #[test]
    fn virtual_host_domains_cover_short_forms() {
        let d = virtual_host_domains("echo", "default", 80, Scope::Cluster);
        for want in [
            "echo.default.svc.cluster.local",
            "echo.default.svc.cluster.local:80",
            "echo.default.svc",
            "echo.default:80",
        ] {
            assert!(d.iter().any(|x| x == want), "{want} missing from {d:?}");
        }
        let cs = virtual_host_domains("echo", "default", 80, Scope::Clusterset);
        assert_eq!(cs.len(), 2);
    }
}
