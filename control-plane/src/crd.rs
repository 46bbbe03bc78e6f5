//! Weft's own CustomResourceDefinitions (`weft.dev/v1alpha1` TrafficPolicy, Rollout,
//! MeshPeer, PeerAuthentication), generated from the Rust types the sources validate with (kube derive +
//! schemars), so the schema the API server enforces and the parser can never drift apart.
//! `install/01-crds.yaml` is this output, committed; a test regenerates it and fails on any
//! difference (`WEFT_BLESS=1` rewrites it).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
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

/// Where a CRD's schema is not structural (the API server's rules for `apiextensions.k8s.io/v1`:
/// every node typed, junctors holding value validations only, `metadata` restricted to
/// `name`/`generateName`, `properties` and `additionalProperties` exclusive), one message per
/// problem naming the CRD and the path. Empty: structural. An API server refuses such a CRD,
/// so this runs in the test command, where none is.
pub fn structural_errors(crd: &CustomResourceDefinition) -> Vec<String> {
    let mut errors = Vec::new();
    for (i, v) in crd.spec.versions.iter().enumerate() {
        let at = format!(
            "{} spec.versions[{i}].schema.openAPIV3Schema",
            crd.spec.names.kind
        );
        match v
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
        {
            None => errors.push(format!("{at}: missing (a structural schema is required)")),
            Some(root) => {
                node(root, &at, Place::Root, &mut errors);
                if let Some(meta) = root.properties.as_ref().and_then(|p| p.get("metadata")) {
                    metadata(meta, &format!("{at}.properties.metadata"), &mut errors);
                }
            }
        }
    }
    errors
}

/// Where a schema node sits: what it must and must not say.
#[derive(Clone, Copy, PartialEq)]
enum Place {
    /// The root, a property or an array's items: must be typed.
    Root,
    Field,
    /// Inside `allOf`/`anyOf`/`oneOf`/`not`: value validations only.
    Junctor,
}

fn node(s: &JSONSchemaProps, at: &str, place: Place, errors: &mut Vec<String>) {
    let escape = s.x_kubernetes_int_or_string == Some(true)
        || s.x_kubernetes_preserve_unknown_fields == Some(true);
    if place == Place::Junctor {
        for (set, field) in [
            (s.type_.is_some(), "type"),
            (s.description.is_some(), "description"),
            (s.default.is_some(), "default"),
            (s.additional_properties.is_some(), "additionalProperties"),
            (s.nullable == Some(true), "nullable"),
        ] {
            if set {
                errors.push(format!("{at}: {field} inside allOf/anyOf/oneOf/not"));
            }
        }
    } else if s.type_.as_deref().is_none_or(str::is_empty) && !escape {
        errors.push(format!("{at}: no type"));
    }
    if s.properties.is_some() && s.additional_properties.is_some() {
        errors.push(format!("{at}: both properties and additionalProperties"));
    }
    let inner = if place == Place::Junctor {
        Place::Junctor
    } else {
        Place::Field
    };
    for (name, p) in s.properties.iter().flatten() {
        node(p, &format!("{at}.properties.{name}"), inner, errors);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(p)) = &s.additional_properties {
        node(p, &format!("{at}.additionalProperties"), inner, errors);
    }
    match &s.items {
        Some(JSONSchemaPropsOrArray::Schema(p)) => node(p, &format!("{at}.items"), inner, errors),
        Some(JSONSchemaPropsOrArray::Schemas(ps)) => {
            for (i, p) in ps.iter().enumerate() {
                node(p, &format!("{at}.items[{i}]"), inner, errors);
            }
        }
        None => {}
    }
    let junctors = [
        ("allOf", &s.all_of),
        ("anyOf", &s.any_of),
        ("oneOf", &s.one_of),
    ];
    for (word, list) in junctors {
        for (i, j) in list.iter().flatten().enumerate() {
            let path = format!("{at}.{word}[{i}]");
            node(j, &path, Place::Junctor, errors);
            outside(s, j, &path, errors);
        }
    }
    if let Some(j) = &s.not {
        node(j, &format!("{at}.not"), Place::Junctor, errors);
        outside(s, j, &format!("{at}.not"), errors);
    }
}

/// A field a junctor names must be specified outside it too.
fn outside(s: &JSONSchemaProps, j: &JSONSchemaProps, at: &str, errors: &mut Vec<String>) {
    for name in j.properties.iter().flatten().map(|(n, _)| n) {
        if !s.properties.as_ref().is_some_and(|p| p.contains_key(name)) {
            errors.push(format!(
                "{at}.properties.{name}: not specified outside the junctor"
            ));
        }
    }
}

/// `metadata` may only restrict `name` and `generateName` (type string).
fn metadata(s: &JSONSchemaProps, at: &str, errors: &mut Vec<String>) {
    for (name, p) in s.properties.iter().flatten() {
        if name != "name" && name != "generateName" {
            errors.push(format!(
                "{at}.properties.{name}: only name and generateName may be restricted"
            ));
        } else if p.type_.as_deref() != Some("string") {
            errors.push(format!("{at}.properties.{name}: must be a string"));
        }
    }
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
    fn weft_crds_are_structural_and_a_broken_schema_is_caught_by_path() {
        for c in crds() {
            let errors = structural_errors(&c);
            assert!(errors.is_empty(), "{}: {errors:#?}", c.spec.names.kind);
        }
        // The same check, against deliberate breakage of a real CRD.
        let mut broken = TrafficPolicy::crd();
        let root = broken.spec.versions[0]
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .expect("schema");
        let spec = root
            .properties
            .as_mut()
            .and_then(|p| p.get_mut("spec"))
            .expect("spec");
        // A field without a type, and one with both properties and additionalProperties.
        let props = spec.properties.get_or_insert_default();
        props.insert("untyped".into(), JSONSchemaProps::default());
        props.insert(
            "both".into(),
            JSONSchemaProps {
                type_: Some("object".into()),
                properties: Some(Default::default()),
                additional_properties: Some(JSONSchemaPropsOrBool::Bool(true)),
                ..Default::default()
            },
        );
        // A type inside a junctor, for a field not specified outside it.
        spec.any_of = Some(vec![JSONSchemaProps {
            type_: Some("object".into()),
            properties: Some([("ghost".to_string(), JSONSchemaProps::default())].into()),
            ..Default::default()
        }]);
        // metadata restricted beyond name.
        root.properties.as_mut().expect("properties").insert(
            "metadata".into(),
            JSONSchemaProps {
                type_: Some("object".into()),
                properties: Some([("labels".to_string(), JSONSchemaProps::default())].into()),
                ..Default::default()
            },
        );
        let errors = structural_errors(&broken).join("\n");
        let at = "TrafficPolicy spec.versions[0].schema.openAPIV3Schema";
        for want in [
            format!("{at}.properties.spec.properties.untyped: no type"),
            format!(
                "{at}.properties.spec.properties.both: both properties and additionalProperties"
            ),
            format!("{at}.properties.spec.anyOf[0]: type inside allOf/anyOf/oneOf/not"),
            format!(
                "{at}.properties.spec.anyOf[0].properties.ghost: not specified outside the junctor"
            ),
            format!(
                "{at}.properties.metadata.properties.labels: only name and generateName may be restricted"
            ),
        ] {
            assert!(errors.contains(&want), "missing {want:?} in:\n{errors}");
        }
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
