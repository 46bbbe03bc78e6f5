//! Builders for the YAML worlds tests and the demo write into a file-source directory.

use std::net::SocketAddr;

/// A `v1 Service` with one HTTP port.
pub fn service(name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  ports: [{{name: http, port: {port}, appProtocol: http}}]\n"
    )
}

/// A `v1 Node` in `zone` of region `region`.
pub fn node(name: &str, region: &str, zone: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{topology.kubernetes.io/region: {region}, topology.kubernetes.io/zone: {zone}}}\n"
    )
}

/// An EndpointSlice for `svc` with endpoints (address, node name, ready).
pub fn slice(name: &str, svc: &str, endpoints: &[(SocketAddr, &str, bool)]) -> String {
    let port = endpoints.first().map_or(80, |(a, _, _)| a.port());
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints:\n"
    );
    for (addr, node, ready) in endpoints {
        s.push_str(&format!(
            "- addresses: [\"{}\"]\n  nodeName: {node}\n  conditions: {{ready: {ready}}}\n",
            addr.ip()
        ));
    }
    s
}

/// An SMI TrafficSplit of `svc` over (backend, weight).
pub fn split(name: &str, svc: &str, backends: &[(&str, u32)]) -> String {
    let mut s = format!(
        "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  service: {svc}\n  backends:\n"
    );
    for (b, w) in backends {
        s.push_str(&format!("  - {{service: {b}, weight: {w}}}\n"));
    }
    s
}

/// A `v1 Namespace` with the `weft.dev/mtls-mode` annotation (`STRICT`, `PERMISSIVE`, ...).
pub fn namespace(name: &str, mtls_mode: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  annotations: {{weft.dev/mtls-mode: {mtls_mode}}}\n"
    )
}

/// A `v1 Pod` in `default` running as `service_account`; `meshed` labels it
/// `weft.dev/tls-mode: weft` (its sidecar terminates mTLS).
pub fn pod(name: &str, service_account: &str, meshed: bool) -> String {
    let labels = if meshed {
        "{app: echo, weft.dev/tls-mode: weft}"
    } else {
        "{app: echo}"
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {labels}\nspec:\n  serviceAccountName: {service_account}\n  containers: [{{name: app, image: echo}}]\n"
    )
}

/// An EndpointSlice for `svc` whose endpoints are pods: (address, pod name), all ready.
pub fn pod_slice(name: &str, svc: &str, endpoints: &[(SocketAddr, &str)]) -> String {
    let port = endpoints.first().map_or(80, |(a, _)| a.port());
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints:\n"
    );
    for (addr, pod) in endpoints {
        s.push_str(&format!(
            "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: {pod}, namespace: default}}\n",
            addr.ip()
        ));
    }
    s
}

/// Joins documents into one multi-document YAML file.
pub fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}

/// An MCS `ServiceExport` of `svc` in `default`.
pub fn export(svc: &str) -> String {
    format!(
        "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {svc}, namespace: default}}\n"
    )
}

/// A `MeshPeer`: federate with cluster `name`'s control plane at `address`.
pub fn mesh_peer(name: &str, address: &str) -> String {
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: MeshPeer\nmetadata: {{name: {name}}}\nspec: {{address: \"{address}\"}}\n"
    )
}

/// A TrafficPolicy letting other clusters' endpoints join `svc`'s local name (failover),
/// plaintext ones too (the test worlds' peer endpoints have no sidecars).
pub fn cross_cluster_policy(svc: &str) -> String {
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {svc}-failover, namespace: default}}\nspec:\n  targetRef: {{name: {svc}}}\n  locality: {{failover: true, crossCluster: true, remotePlaintext: true}}\n"
    )
}

/// A TrafficPolicy accepting other clusters' plaintext endpoints of `svc` (no failover onto
/// its local name).
pub fn remote_plaintext_policy(svc: &str) -> String {
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {svc}-plaintext, namespace: default}}\nspec:\n  targetRef: {{name: {svc}}}\n  locality: {{remotePlaintext: true}}\n"
    )
}
