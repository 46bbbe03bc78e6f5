//! Weft's own CustomResourceDefinitions (`weft.dev/v1alpha1` TrafficPolicy, Rollout,
//! MeshPeer, PeerAuthentication), generated from the Rust types the sources validate with (kube derive +
//! schemars), so the schema the API server enforces and the parser can never drift apart.
//! `install/01-crds.yaml` is this output, committed; a test regenerates it and fails on any
//! difference (`WEFT_BLESS=1` rewrites it).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::objects::{MeshPeer, PeerAuthentication, Rollout, TrafficPolicy};

/// Weft's CRDs, in a stable order, with their status subresources and printer columns.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        TrafficPolicy::crd(),
        Rollout::crd(),
        MeshPeer::crd(),
        PeerAuthentication::crd(),
    ]
}

/// The CRDs as one multi-document YAML file (what `install/01-crds.yaml` holds).
pub fn crds_yaml() -> Result<String, serde_saphyr::ser::Error> {
    let mut out = String::from(
        "# Generated from the Rust types by `weft_control_plane::crd::crds()`; do not edit.\n\
         # Regenerate: WEFT_BLESS=1 cargo nextest run -p weft-control-plane crds_match\n",
    );
    for (i, c) in crds().iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_saphyr::to_string(c)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_have_status_printer_columns_and_schemas() {
        for c in crds() {
            let v = &c.spec.versions[0];
            let name = &c.spec.names.kind;
            assert!(
                v.subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some(),
                "{name}: status subresource"
            );
            let cols: Vec<&str> = v
                .additional_printer_columns
                .iter()
                .flatten()
                .map(|c| c.name.as_str())
                .collect();
            assert!(
                cols.contains(&"Accepted") && cols.contains(&"Age"),
                "{name}: {cols:?}"
            );
            assert!(v.schema.is_some(), "{name}: schema");
        }
        let scopes: Vec<String> = crds().into_iter().map(|c| c.spec.scope).collect();
        assert_eq!(
            scopes,
            ["Namespaced", "Namespaced", "Cluster", "Namespaced"]
        );
    }

    #[test]
    fn crds_match_the_committed_install_file() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../install/01-crds.yaml");
        let generated = crds_yaml().expect("YAML");
        if std::env::var_os("WEFT_BLESS").is_some() {
            std::fs::write(path, &generated).expect("write");
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "install/01-crds.yaml differs from the CRDs the types generate; run \
             `WEFT_BLESS=1 cargo nextest run -p weft-control-plane crds_match` and commit it"
        );
    }
}
