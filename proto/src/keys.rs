//! Well-known label, annotation and node-metadata keys, shared by every component so that a
//! key is spelled once.

/// Namespace label that opts a namespace into sidecar injection (`enabled`).
pub const INJECTION_LABEL: &str = "weft.dev/injection";
/// Pod annotation that opts a pod out of injection (`false`).
pub const INJECT_ANNOTATION: &str = "weft.dev/inject";
/// Pod annotation: comma-separated inbound ports not intercepted.
pub const EXCLUDE_INBOUND_PORTS: &str = "weft.dev/exclude-inbound-ports";
/// Pod annotation: comma-separated outbound ports not intercepted.
pub const EXCLUDE_OUTBOUND_PORTS: &str = "weft.dev/exclude-outbound-ports";
/// Pod annotation: comma-separated outbound CIDRs not intercepted.
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "weft.dev/exclude-outbound-cidrs";
/// Pod annotation: `"true"` sends the pod's DNS through its sidecar's mesh DNS (clusterset
/// names resolve); `"false"` (the default) leaves it alone.
pub const DNS_CAPTURE: &str = "weft.dev/dns-capture";
/// Pod annotation set by the injector on pods it has patched.
pub const INJECTED_ANNOTATION: &str = "weft.dev/injected";

/// Node label carrying the region (Kubernetes well-known).
pub const TOPOLOGY_REGION: &str = "topology.kubernetes.io/region";
/// Node label carrying the zone (Kubernetes well-known).
pub const TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";
/// Node label carrying the subzone (Weft's own; Kubernetes has none).
pub const TOPOLOGY_SUBZONE: &str = "weft.dev/subzone";
/// EndpointSlice label naming the Service it belongs to (Kubernetes well-known).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label or annotation naming the cluster an object came from.
pub const CLUSTER_LABEL: &str = "weft.dev/cluster";

/// xDS node metadata: the proxy's namespace.
pub const NODE_NAMESPACE: &str = "NAMESPACE";
/// xDS node metadata: the proxy's service account.
pub const NODE_SERVICE_ACCOUNT: &str = "SERVICE_ACCOUNT";
/// xDS node metadata: the proxy's cluster (Kubernetes cluster, not xDS cluster).
pub const NODE_CLUSTER: &str = "CLUSTER_ID";
/// xDS node metadata: the pod's IP addresses, comma-separated (as Istio names it).
pub const NODE_INSTANCE_IPS: &str = "INSTANCE_IPS";
/// xDS `node.user_agent_name` of Weft's sidecar: only it is sent the inbound listener.
pub const SIDECAR_USER_AGENT: &str = "weft-sidecar";
/// Name of the per-workload Listener describing how the sidecar's inbound treats each port.
pub const INBOUND_LISTENER: &str = "weft-inbound";

/// Response header naming why the sidecar refused a request itself (circuit open, no route...).
pub const PROXY_REASON_HEADER: &str = "x-weft-reason";
/// Request header carrying the verified SPIFFE ID of the calling workload to the application.
pub const CLIENT_IDENTITY_HEADER: &str = "x-weft-client-identity";

/// Namespace of the control plane's own identity.
pub const CONTROL_PLANE_NAMESPACE: &str = "weft-system";
/// Service account of the control plane's own identity.
pub const CONTROL_PLANE_SERVICE_ACCOUNT: &str = "weft-control-plane";
/// Service account in an operator's certificate (`weftctl`); what makes it an operator is the
/// DNS SAN only the CA puts there ([`crate::tls::operator_dns_name`]).
pub const OPERATOR_SERVICE_ACCOUNT: &str = "weft-operator";
/// Namespace annotation choosing how its sidecars accept inbound connections:
/// `STRICT` (mTLS only), `PERMISSIVE` (mTLS and plaintext; the default) or `DISABLE`.
pub const MTLS_MODE_ANNOTATION: &str = "weft.dev/mtls-mode";
/// Service annotation (Istio's): the namespaces whose proxies see the Service in their
/// directory, comma separated: `.` its own, `*` every one (the default), or names.
pub const EXPORT_TO_ANNOTATION: &str = "networking.istio.io/exportTo";
/// Namespace annotation: the only Services its proxies see (the shape of Istio's `Sidecar`
/// `egress.hosts`), comma separated `<namespace>/<host>`: namespace `.` (the proxy's own),
/// `*` or a name; host `*`, `*.<suffix>` or a DNS name of the Service. Absent: every Service.
pub const EGRESS_HOSTS_ANNOTATION: &str = "weft.dev/egress-hosts";
/// Pod label saying its sidecar terminates mTLS (`weft`), set by the injector; callers
/// originate mTLS only to endpoints whose pod carries it.
pub const TLS_MODE_LABEL: &str = "weft.dev/tls-mode";
/// Pod-template annotation on the control plane's Deployment: the fingerprint of the root it
/// signs under (a new one rolls the replicas, which load the root at start).
pub const CA_ROOT_FINGERPRINT_ANNOTATION: &str = "weft.dev/ca-root-sha256";

/// Prefix of the headers only the mesh sets (`x-weft-client-identity`, ...).
pub const MESH_HEADER_PREFIX: &str = "x-weft-";

/// Whether `name` reads as a mesh-owned header once case is folded and any character that is
/// not a letter or digit is taken for the `-` (CGI/WSGI fold `_` and `-`; some servers fold
/// `.` too): such headers never pass from a caller to an application.
pub fn is_mesh_owned_header(name: &str) -> bool {
    name.len() >= MESH_HEADER_PREFIX.len()
        && name
            .bytes()
            .zip(MESH_HEADER_PREFIX.bytes())
            .all(|(a, b)| match b {
                b'-' => !a.is_ascii_alphanumeric(),
                _ => a.to_ascii_lowercase() == b,
            })
}

/// The sidecar's outbound port (redirected and explicit traffic).
pub const OUTBOUND_PORT: u16 = 15001;
/// The sidecar's inbound port.
pub const INBOUND_PORT: u16 = 15006;
/// The sidecar's admin port (loopback only).
pub const ADMIN_PORT: u16 = 15000;
/// The sidecar's health port for kubelet probes.
pub const HEALTH_PORT: u16 = 15021;
/// Port of the sidecar's mesh DNS (UDP and TCP, on 127.0.0.1) in injected pods.
pub const DNS_PORT: u16 = 15053;
/// Audience of the projected service-account token a sidecar proves its identity with (what
/// the injector projects and the control plane's TokenReview asks for by default).
pub const TOKEN_AUDIENCE: &str = "weft";

#[cfg(test)]
mod tests {
    #[test]
    fn mesh_owned_headers_fold_case_and_every_separator() {
        for yes in [
            "x-weft-client-identity",
            "X_WEFT_CLIENT_IDENTITY",
            "x.weft.client.identity",
            "x-weft-",
        ] {
            assert!(super::is_mesh_owned_header(yes), "{yes}");
        }
        for no in [
            "x-wefts",
            "xweft-client",
            "x-weft",
            "weft-client",
            "x-west-a",
        ] {
            assert!(!super::is_mesh_owned_header(no), "{no}");
        }
    }
}
