//! Authorization: Istio's `security.istio.io/v1` `AuthorizationPolicy`, resolved per workload
//! and compiled into Envoy RBAC filters for its `weft-inbound` Listener.
//!
//! **Which policies apply to a workload**: those of its namespace without `selector` or
//! `targetRefs`; those whose `selector` matches its pod's labels; those whose `targetRefs`
//! name a Service of its namespace it is an endpoint of; and those of the root namespace
//! (`weft-system`) without selector (mesh-wide) or with one matching (in any namespace).
//! A pod whose labels are not known yet gets every selector DENY and AUDIT policy of its
//! namespace and, when a selector ALLOW policy could select it, a deny-all: a lagging watch
//! never lets through what a policy would refuse.
//!
//! **Compilation**, as Istio does it: one RBAC policy per rule, named
//! `ns[<ns>]-policy[<name>]-rule[<i>]`, its permissions the `to` and `when` parts on the
//! destination, its principals the `from` and `when` parts on the source; filters AUDIT (LOG),
//! then DENY (CUSTOM is compiled as DENY: with no external authorizer, what it would ask about
//! is refused), then ALLOW, present as soon as one ALLOW policy applies (so an ALLOW policy
//! with no rules denies everything). A TCP port gets the same rules without their HTTP-only
//! fields (hosts, methods, paths, request headers): an ALLOW rule that has one is dropped, a
//! DENY rule loses it and so covers more.
//!
//! **Fail closed**: what Weft cannot enforce (request principals, unknown fields, condition
//! keys outside the documented set, values it cannot read) is handled as an HTTP-only field on
//! TCP is: the ALLOW rule that holds it matches nothing, the DENY or AUDIT rule drops that
//! condition and covers more. [`unsupported`] lists each such field, which the policy's
//! `Accepted` condition and `weftctl check` report.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use weft_proto::envoy::envoy::config::core::v3::CidrRange;
use weft_proto::envoy::envoy::config::rbac::v3 as rbac;
use weft_proto::envoy::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use weft_proto::envoy::envoy::r#type::matcher::v3::{
    PathMatcher, RegexMatcher, StringMatcher, path_matcher, string_matcher,
};

use crate::objects::{Named, Object, WorkloadSelector};

/// The object-key kind of Istio's AuthorizationPolicy.
pub const KIND: &str = "AuthorizationPolicy";

/// `security.istio.io/v1` `AuthorizationPolicy`'s spec. Unknown fields are kept (not refused)
/// so that they fail closed and are reported rather than dropping the whole policy.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The pods it covers, by label; absent (and no `targetRefs`): the whole namespace.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Deprecated singular form of `targetRefs`.
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
    /// The Services whose endpoints it covers.
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    /// `ALLOW` (default), `DENY`, `AUDIT` or `CUSTOM`.
    #[serde(default)]
    pub action: Option<String>,
    /// CUSTOM's external authorizer (not supported: CUSTOM fails closed).
    #[serde(default)]
    pub provider: Option<Value>,
    /// The rules; none: an ALLOW policy denies everything, a DENY policy nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Fields Weft does not know.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// What a policy is attached to.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// API group (`""` for a Service).
    #[serde(default)]
    pub group: Option<String>,
    /// `Service` (others are not supported).
    #[serde(default)]
    pub kind: String,
    /// Its name.
    #[serde(default)]
    pub name: String,
    /// Must be the policy's own namespace when set.
    #[serde(default)]
    pub namespace: Option<String>,
}

/// One rule: it matches when every part matches (an absent part matches all).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Sources; any one matching is enough.
    #[serde(default)]
    pub from: Vec<From>,
    /// Operations; any one matching is enough.
    #[serde(default)]
    pub to: Vec<To>,
    /// Conditions; all must match.
    #[serde(default)]
    pub when: Vec<Condition>,
    /// Fields Weft does not know.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// `from[]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct From {
    /// The source.
    #[serde(default)]
    pub source: Source,
    /// Fields Weft does not know.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// Who calls: every field set must match.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Peer identities `<trust-domain>/ns/<ns>/sa/<sa>` (exact, `prefix*`, `*suffix`, `*`).
    #[serde(default)]
    pub principals: Vec<String>,
    /// Peer identities that must not match.
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// JWT principals (not supported: no RequestAuthentication).
    #[serde(default)]
    pub request_principals: Vec<String>,
    /// JWT principals that must not match (not supported).
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    /// The peer's namespace (from its identity).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Namespaces that must not match.
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// `<ns>/<sa>` service accounts.
    #[serde(default)]
    pub service_accounts: Vec<String>,
    /// Service accounts that must not match.
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    /// The peer's address: an IP or CIDR.
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    /// Addresses that must not match.
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    /// The original client's address; the sidecar trusts no forwarded header, so this is
    /// the peer's address too.
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    /// Addresses that must not match.
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
    /// Fields Weft does not know.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// `to[]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct To {
    /// The operation.
    #[serde(default)]
    pub operation: Operation,
    /// Fields Weft does not know.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// What is called: every field set must match.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// `:authority`, case-insensitive (HTTP only).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Hosts that must not match.
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Container ports.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Ports that must not match.
    #[serde(default)]
    pub not_ports: Vec<String>,
    /// Methods (HTTP only; gRPC is always POST).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Methods that must not match.
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// Paths without the query (HTTP only; gRPC: `/package.Service/Method`).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Paths that must not match.
    #[serde(default)]
    pub not_paths: Vec<String>,
    /// Fields Weft does not know.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// `when[]`: one attribute's values.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The attribute: `request.headers[<name>]`, `source.principal`, `source.namespace`,
    /// `source.ip`, `remote.ip`, `destination.ip` or `destination.port`.
    #[serde(default)]
    pub key: String,
    /// Values, one of which must match.
    #[serde(default)]
    pub values: Vec<String>,
    /// Values none of which may match.
    #[serde(default)]
    pub not_values: Vec<String>,
    /// Fields Weft does not know.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// A policy's action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Action {
    /// Allow what a rule matches; once any applies, deny the rest.
    Allow,
    /// Deny what a rule matches.
    Deny,
    /// Log what a rule matches.
    Audit,
    /// Ask an external authorizer: not supported, compiled as DENY.
    Custom,
}

impl AuthorizationPolicySpec {
    /// The action (validated at parse time).
    pub fn action(&self) -> Action {
        match self.action.as_deref() {
            Some("DENY") => Action::Deny,
            Some("AUDIT") => Action::Audit,
            Some("CUSTOM") => Action::Custom,
            _ => Action::Allow,
        }
    }

    /// Every target reference, the singular one included.
    fn targets(&self) -> impl Iterator<Item = &TargetRef> {
        self.target_ref.iter().chain(&self.target_refs)
    }
}

/// Checks what must hold for the object to be read at all.
pub fn validate(spec: &AuthorizationPolicySpec) -> Result<(), (String, String)> {
    match spec.action.as_deref() {
        None | Some("ALLOW" | "DENY" | "AUDIT" | "CUSTOM") => Ok(()),
        Some(a) => Err((
            "spec.action".into(),
            format!("{a:?}: must be ALLOW, DENY, AUDIT or CUSTOM"),
        )),
    }
}

/// Whether the compiled rule is for HTTP or for opaque TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chain {
    /// Requests: every field applies.
    Http,
    /// Connections: HTTP-only fields cannot be judged.
    Tcp,
}

/// Why part of a rule is not enforced as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gap {
    /// The field needs HTTP (on a TCP chain).
    HttpOnly,
    /// Weft cannot enforce it at all.
    Unsupported,
}

/// What each field of a policy Weft cannot enforce as written: `(field path, reason)`.
pub fn unsupported(spec: &AuthorizationPolicySpec) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for k in spec.unknown.keys() {
        out.push((format!("spec.{k}"), "not a field Weft knows".into()));
    }
    if spec.action() == Action::Custom {
        out.push((
            "spec.action".into(),
            "CUSTOM (an external authorizer) is not supported: what its rules match is denied"
                .into(),
        ));
    }
    if spec.selector.is_some() && spec.targets().next().is_some() {
        out.push((
            "spec.targetRefs".into(),
            "set together with spec.selector: the selector is used".into(),
        ));
    }
    for (i, t) in spec.targets().enumerate() {
        if !(t.kind == "Service" && t.group.as_deref().unwrap_or("").is_empty()) {
            out.push((
                format!("spec.targetRefs[{i}]"),
                format!(
                    "{:?} {:?}: only a Service can be targeted; this policy applies to no workload",
                    t.group.as_deref().unwrap_or(""),
                    t.kind
                ),
            ));
        }
    }
    for (i, r) in spec.rules.iter().enumerate() {
        let mut c = Compiler::new(Chain::Http);
        c.rule(r);
        for (field, message) in c.notes {
            out.push((format!("spec.rules[{i}].{field}"), message));
        }
    }
    out
}

/// One rule being compiled: its conjuncts on each side, and what could not be compiled.
struct Compiler {
    chain: Chain,
    permissions: Vec<rbac::Permission>,
    principals: Vec<rbac::Principal>,
    /// The strongest gap met, which decides what an ALLOW rule does.
    gap: Option<Gap>,
    notes: Vec<(String, String)>,
}

/// A value's match pattern, as Istio reads `exact`, `prefix*`, `*suffix` and `*`.
enum Pattern<'a> {
    Exact(&'a str),
    Prefix(&'a str),
    Suffix(&'a str),
    Any,
}

fn pattern(v: &str) -> Pattern<'_> {
    if v == "*" {
        Pattern::Any
    } else if let Some(p) = v.strip_suffix('*') {
        Pattern::Prefix(p)
    } else if let Some(s) = v.strip_prefix('*') {
        Pattern::Suffix(s)
    } else {
        Pattern::Exact(v)
    }
}

fn string(p: string_matcher::MatchPattern, ignore_case: bool) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(p),
        ignore_case,
    }
}

fn regex(r: String) -> string_matcher::MatchPattern {
    string_matcher::MatchPattern::SafeRegex(RegexMatcher {
        regex: r,
        ..Default::default()
    })
}

fn authenticated(m: StringMatcher) -> rbac::Principal {
    rbac::Principal {
        identifier: Some(rbac::principal::Identifier::Authenticated(
            rbac::principal::Authenticated {
                principal_name: Some(m),
            },
        )),
    }
}

fn or_ids(mut ids: Vec<rbac::Principal>) -> rbac::Principal {
    use rbac::principal::Identifier;
    if ids.len() == 1 {
        return ids.remove(0);
    }
    rbac::Principal {
        identifier: Some(Identifier::OrIds(rbac::principal::Set { ids })),
    }
}

fn and_ids(ids: Vec<rbac::Principal>) -> rbac::Principal {
    use rbac::principal::Identifier;
    rbac::Principal {
        identifier: Some(match ids.is_empty() {
            true => Identifier::Any(true),
            false => Identifier::AndIds(rbac::principal::Set { ids }),
        }),
    }
}

fn not_id(id: rbac::Principal) -> rbac::Principal {
    rbac::Principal {
        identifier: Some(rbac::principal::Identifier::NotId(Box::new(id))),
    }
}

fn or_rules(mut rules: Vec<rbac::Permission>) -> rbac::Permission {
    use rbac::permission::Rule;
    if rules.len() == 1 {
        return rules.remove(0);
    }
    rbac::Permission {
        rule: Some(Rule::OrRules(rbac::permission::Set { rules })),
    }
}

fn and_rules(rules: Vec<rbac::Permission>) -> rbac::Permission {
    use rbac::permission::Rule;
    rbac::Permission {
        rule: Some(match rules.is_empty() {
            true => Rule::Any(true),
            false => Rule::AndRules(rbac::permission::Set { rules }),
        }),
    }
}

fn not_rule(r: rbac::Permission) -> rbac::Permission {
    rbac::Permission {
        rule: Some(rbac::permission::Rule::NotRule(Box::new(r))),
    }
}

fn header_rule(name: &str, m: StringMatcher) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(m)),
        ..Default::default()
    }
}

fn header_present(name: &str) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::PresentMatch(true)),
        ..Default::default()
    }
}

/// The principal matcher of one Istio principal value (`td/ns/x/sa/y` forms).
fn principal_value(v: &str) -> rbac::Principal {
    use string_matcher::MatchPattern as P;
    authenticated(match pattern(v) {
        Pattern::Any => string(P::Prefix("spiffe://".into()), false),
        Pattern::Exact(e) => string(P::Exact(format!("spiffe://{e}")), false),
        Pattern::Prefix(p) => string(P::Prefix(format!("spiffe://{p}")), false),
        Pattern::Suffix("") => string(P::Prefix("spiffe://".into()), false),
        Pattern::Suffix(s) => string(P::Suffix(s.to_string()), false),
    })
}

/// The principal matcher of a namespace value: the `/ns/<ns>/sa/` segment of the SPIFFE ID.
/// A service account name holds no `/`, so `contains` cannot match elsewhere.
fn namespace_value(v: &str) -> Result<rbac::Principal, String> {
    use string_matcher::MatchPattern as P;
    let seg = |s: &str| -> Result<String, String> {
        match s.contains(['/', '*']) {
            true => Err(format!("{v:?} is not a namespace pattern")),
            false => Ok(regex_escape(s)),
        }
    };
    Ok(authenticated(match pattern(v) {
        Pattern::Any => string(regex("spiffe://[^/]+/ns/[^/]+/sa/.+".into()), false),
        Pattern::Exact(e) => {
            seg(e)?;
            string(P::Contains(format!("/ns/{e}/sa/")), false)
        }
        Pattern::Prefix(p) => string(
            regex(format!("spiffe://[^/]+/ns/{}[^/]*/sa/.+", seg(p)?)),
            false,
        ),
        Pattern::Suffix(s) => string(
            regex(format!("spiffe://[^/]+/ns/[^/]*{}/sa/.+", seg(s)?)),
            false,
        ),
    }))
}

/// A service account `<ns>/<sa>`: the ID's suffix.
fn service_account_value(v: &str) -> Result<rbac::Principal, String> {
    use string_matcher::MatchPattern as P;
    match v.split_once('/') {
        Some((ns, sa))
            if !ns.is_empty() && !sa.is_empty() && !v.contains('*') && !sa.contains('/') =>
        {
            Ok(authenticated(string(
                P::Suffix(format!("/ns/{ns}/sa/{sa}")),
                false,
            )))
        }
        _ => Err(format!("{v:?} is not <namespace>/<service-account>")),
    }
}

fn regex_escape(s: &str) -> String {
    regex::escape(s)
}

fn cidr(v: &str) -> Result<CidrRange, String> {
    let (addr, len) = match v.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (v, None),
    };
    let ip: std::net::IpAddr = addr
        .parse()
        .map_err(|_| format!("{v:?} is not an IP address or CIDR"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{v:?}: prefix length must be 0-{max}"))?,
        None => max,
    };
    Ok(CidrRange {
        address_prefix: ip.to_string(),
        prefix_len: Some(weft_proto::envoy::google::protobuf::UInt32Value { value: len }),
    })
}

fn remote_ip(v: &str) -> Result<rbac::Principal, String> {
    Ok(rbac::Principal {
        identifier: Some(rbac::principal::Identifier::DirectRemoteIp(cidr(v)?)),
    })
}

fn port(v: &str) -> Result<rbac::Permission, String> {
    match v.parse::<u16>() {
        Ok(p) if p > 0 => Ok(rbac::Permission {
            rule: Some(rbac::permission::Rule::DestinationPort(u32::from(p))),
        }),
        _ => Err(format!("{v:?} is not a port (1-65535)")),
    }
}

fn destination_ip(v: &str) -> Result<rbac::Permission, String> {
    Ok(rbac::Permission {
        rule: Some(rbac::permission::Rule::DestinationIp(cidr(v)?)),
    })
}

fn header_value(name: &str, v: &str, ignore_case: bool) -> rbac::Permission {
    use string_matcher::MatchPattern as P;
    let h = match pattern(v) {
        Pattern::Any => header_present(name),
        Pattern::Exact(e) => header_rule(name, string(P::Exact(e.into()), ignore_case)),
        Pattern::Prefix(p) => header_rule(name, string(P::Prefix(p.into()), ignore_case)),
        Pattern::Suffix(s) => header_rule(name, string(P::Suffix(s.into()), ignore_case)),
    };
    rbac::Permission {
        rule: Some(rbac::permission::Rule::Header(h)),
    }
}

fn path_value(v: &str) -> rbac::Permission {
    use string_matcher::MatchPattern as P;
    let m = match pattern(v) {
        Pattern::Any => {
            return rbac::Permission {
                rule: Some(rbac::permission::Rule::Any(true)),
            };
        }
        Pattern::Exact(e) => P::Exact(e.into()),
        Pattern::Prefix(p) => P::Prefix(p.into()),
        Pattern::Suffix(s) => P::Suffix(s.into()),
    };
    rbac::Permission {
        rule: Some(rbac::permission::Rule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(string(m, false))),
        })),
    }
}

/// A header condition as a principal (Istio puts `request.headers` on the source side).
fn header_id(p: rbac::Permission) -> rbac::Principal {
    use rbac::permission::Rule;
    use rbac::principal::Identifier;
    match p.rule {
        Some(Rule::Header(h)) => rbac::Principal {
            identifier: Some(Identifier::Header(h)),
        },
        _ => rbac::Principal {
            identifier: Some(Identifier::Any(true)),
        },
    }
}

impl Compiler {
    fn new(chain: Chain) -> Self {
        Compiler {
            chain,
            permissions: Vec::new(),
            principals: Vec::new(),
            gap: None,
            notes: Vec::new(),
        }
    }

    fn gap(&mut self, g: Gap, field: String, message: impl Into<String>) {
        self.gap = Some(match (self.gap, g) {
            (Some(Gap::Unsupported), _) | (_, Gap::Unsupported) => Gap::Unsupported,
            _ => Gap::HttpOnly,
        });
        if g == Gap::Unsupported {
            self.notes.push((field, message.into()));
        }
    }

    /// Values of one principal-side field: `or` of the values, negated for a `not` field.
    fn ids(
        &mut self,
        field: String,
        values: &[String],
        negate: bool,
        f: impl Fn(&str) -> Result<rbac::Principal, String>,
    ) -> Option<rbac::Principal> {
        if values.is_empty() {
            return None;
        }
        match values.iter().map(|v| f(v)).collect::<Result<Vec<_>, _>>() {
            Ok(ids) => Some(match negate {
                true => not_id(or_ids(ids)),
                false => or_ids(ids),
            }),
            Err(e) => {
                self.gap(Gap::Unsupported, field, e);
                None
            }
        }
    }

    /// Values of one permission-side field.
    fn rules(
        &mut self,
        field: String,
        values: &[String],
        negate: bool,
        http_only: bool,
        f: impl Fn(&str) -> Result<rbac::Permission, String>,
    ) -> Option<rbac::Permission> {
        if values.is_empty() {
            return None;
        }
        if http_only && self.chain == Chain::Tcp {
            self.gap(Gap::HttpOnly, field, "");
            return None;
        }
        match values.iter().map(|v| f(v)).collect::<Result<Vec<_>, _>>() {
            Ok(rules) => Some(match negate {
                true => not_rule(or_rules(rules)),
                false => or_rules(rules),
            }),
            Err(e) => {
                self.gap(Gap::Unsupported, field, e);
                None
            }
        }
    }

    fn unknown(&mut self, at: &str, unknown: &BTreeMap<String, Value>) {
        for k in unknown.keys() {
            self.gap(
                Gap::Unsupported,
                format!("{at}{k}"),
                "not a field Weft knows",
            );
        }
    }

    fn source(&mut self, at: &str, s: &Source) -> rbac::Principal {
        let mut ids = Vec::new();
        let ok = |v: &str| Ok(principal_value(v));
        let fields: [(&str, &[String], bool); 2] = [
            ("principals", &s.principals, false),
            ("notPrincipals", &s.not_principals, true),
        ];
        for (name, values, neg) in fields {
            ids.extend(self.ids(format!("{at}{name}"), values, neg, ok));
        }
        for (name, values) in [
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
        ] {
            if !values.is_empty() {
                self.gap(
                    Gap::Unsupported,
                    format!("{at}{name}"),
                    "JWT request principals are not supported (Weft has no RequestAuthentication)",
                );
            }
        }
        for (name, values, neg) in [
            ("namespaces", &s.namespaces, false),
            ("notNamespaces", &s.not_namespaces, true),
        ] {
            ids.extend(self.ids(format!("{at}{name}"), values, neg, namespace_value));
        }
        for (name, values, neg) in [
            ("serviceAccounts", &s.service_accounts, false),
            ("notServiceAccounts", &s.not_service_accounts, true),
        ] {
            ids.extend(self.ids(format!("{at}{name}"), values, neg, service_account_value));
        }
        for (name, values, neg) in [
            ("ipBlocks", &s.ip_blocks, false),
            ("notIpBlocks", &s.not_ip_blocks, true),
            ("remoteIpBlocks", &s.remote_ip_blocks, false),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks, true),
        ] {
            ids.extend(self.ids(format!("{at}{name}"), values, neg, remote_ip));
        }
        self.unknown(at, &s.unknown);
        and_ids(ids)
    }

    fn operation(&mut self, at: &str, o: &Operation) -> rbac::Permission {
        let mut rules = Vec::new();
        let host = |v: &str| Ok(header_value(":authority", v, true));
        let method = |v: &str| Ok(header_value(":method", v, false));
        let path = |v: &str| Ok(path_value(v));
        for (name, values, neg) in [("hosts", &o.hosts, false), ("notHosts", &o.not_hosts, true)] {
            rules.extend(self.rules(format!("{at}{name}"), values, neg, true, host));
        }
        for (name, values, neg) in [("ports", &o.ports, false), ("notPorts", &o.not_ports, true)] {
            rules.extend(self.rules(format!("{at}{name}"), values, neg, false, port));
        }
        for (name, values, neg) in [
            ("methods", &o.methods, false),
            ("notMethods", &o.not_methods, true),
        ] {
            rules.extend(self.rules(format!("{at}{name}"), values, neg, true, method));
        }
        for (name, values, neg) in [("paths", &o.paths, false), ("notPaths", &o.not_paths, true)] {
            rules.extend(self.rules(format!("{at}{name}"), values, neg, true, path));
        }
        self.unknown(at, &o.unknown);
        and_rules(rules)
    }

    fn condition(&mut self, at: &str, c: &Condition) {
        self.unknown(at, &c.unknown);
        let key = c.key.as_str();
        let header = key
            .strip_prefix("request.headers[")
            .and_then(|h| h.strip_suffix(']'))
            .filter(|h| !h.is_empty());
        // A name the proxy cannot look up (a pseudo-header, spaces) is not enforceable.
        if let Some(h) = header
            && (h.starts_with(':') || http::HeaderName::from_bytes(h.as_bytes()).is_err())
        {
            self.gap(
                Gap::Unsupported,
                format!("{at}key"),
                format!("{h:?} is not a header name the proxy can match"),
            );
            return;
        }
        for (values, neg, field) in [
            (&c.values, false, format!("{at}values")),
            (&c.not_values, true, format!("{at}notValues")),
        ] {
            if values.is_empty() {
                continue;
            }
            if let Some(h) = header {
                let name = h.to_ascii_lowercase();
                let f = |v: &str| Ok(header_value(&name, v, false));
                if let Some(p) = self.rules(field, values, neg, true, f) {
                    self.principals.push(header_id_tree(p));
                }
                continue;
            }
            match key {
                "source.principal" => {
                    let ok = |v: &str| Ok(principal_value(v));
                    { let x = self.ids(field, values, neg, ok); self.principals.extend(x); }
                }
                "source.namespace" => {
                    { let x = self.ids(field, values, neg, namespace_value); self.principals.extend(x); }
                }
                "source.ip" | "remote.ip" => {
                    { let x = self.ids(field, values, neg, remote_ip); self.principals.extend(x); }
                }
                "destination.ip" => {
                    { let x = self.rules(field, values, neg, false, destination_ip); self.permissions.extend(x); }
                }
                "destination.port" => {
                    { let x = self.rules(field, values, neg, false, port); self.permissions.extend(x); }
                }
                other => self.gap(
                    Gap::Unsupported,
                    format!("{at}key"),
                    format!(
                        "{other:?} is not supported (request.headers[...], source.principal, source.namespace, source.ip, remote.ip, destination.ip, destination.port)"
                    ),
                ),
            }
        }
        if c.values.is_empty() && c.not_values.is_empty() {
            self.gap(
                Gap::Unsupported,
                format!("{at}values"),
                "a condition needs values or notValues",
            );
        }
    }

    fn rule(&mut self, r: &Rule) {
        self.unknown("", &r.unknown);
        if !r.from.is_empty() {
            let ids: Vec<_> = r
                .from
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    self.unknown(&format!("from[{i}]."), &f.unknown);
                    self.source(&format!("from[{i}].source."), &f.source)
                })
                .collect();
            self.principals.push(or_ids(ids));
        }
        if !r.to.is_empty() {
            let rules: Vec<_> =
                r.to.iter()
                    .enumerate()
                    .map(|(i, t)| {
                        self.unknown(&format!("to[{i}]."), &t.unknown);
                        self.operation(&format!("to[{i}].operation."), &t.operation)
                    })
                    .collect();
            self.permissions.push(or_rules(rules));
        }
        for (i, c) in r.when.iter().enumerate() {
            self.condition(&format!("when[{i}]."), c);
        }
    }

    /// The RBAC policy, or `None` when the rule matches nothing here (an ALLOW rule with a
    /// field it cannot judge).
    fn finish(self, action: Action) -> Option<rbac::Policy> {
        if self.gap.is_some() && action == Action::Allow {
            return None;
        }
        Some(rbac::Policy {
            permissions: vec![and_rules(self.permissions)],
            principals: vec![and_ids(self.principals)],
            ..Default::default()
        })
    }
}

/// `request.headers` conditions sit on the principal side, as in Istio.
fn header_id_tree(p: rbac::Permission) -> rbac::Principal {
    use rbac::permission::Rule;
    match p.rule {
        Some(Rule::NotRule(inner)) => not_id(header_id_tree(*inner)),
        Some(Rule::OrRules(set)) => or_ids(set.rules.into_iter().map(header_id_tree).collect()),
        _ => header_id(p),
    }
}

/// The RBAC filters of one workload on one chain, in order (LOG, DENY, ALLOW); each with its
/// policies by name. A filter is absent when no policy of its kind applies.
pub fn compile(
    policies: &[Arc<Named<AuthorizationPolicySpec>>],
    chain: Chain,
) -> Vec<(rbac::rbac::Action, Vec<(String, rbac::Policy)>)> {
    let mut log = Vec::new();
    let mut deny = Vec::new();
    let mut allow = Vec::new();
    let mut any_allow = false;
    for p in policies {
        let action = p.spec.action();
        any_allow |= action == Action::Allow;
        for (i, r) in p.spec.rules.iter().enumerate() {
            let mut c = Compiler::new(chain);
            c.rule(r);
            let Some(policy) = c.finish(action) else {
                continue;
            };
            let name = weft_proto::rbac::policy_name(&p.namespace, &p.name, i);
            match action {
                Action::Allow => allow.push((name, policy)),
                Action::Deny | Action::Custom => deny.push((name, policy)),
                Action::Audit => log.push((name, policy)),
            }
        }
    }
    let mut out = Vec::new();
    if !log.is_empty() {
        out.push((rbac::rbac::Action::Log, log));
    }
    if !deny.is_empty() {
        out.push((rbac::rbac::Action::Deny, deny));
    }
    if any_allow {
        out.push((rbac::rbac::Action::Allow, allow));
    }
    out
}

/// Every AuthorizationPolicy of the world, by namespace, ready to resolve per workload.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthzPolicies {
    by_namespace: BTreeMap<String, Vec<Arc<Named<AuthorizationPolicySpec>>>>,
}

/// A synthetic deny-all named `name` (a workload whose labels are not known yet, policies
/// that compiled to what the proxy cannot run).
pub fn deny_all(namespace: &str, name: &str) -> Arc<Named<AuthorizationPolicySpec>> {
    Arc::new(Named {
        namespace: namespace.to_string(),
        name: name.into(),
        spec: AuthorizationPolicySpec {
            action: Some("DENY".into()),
            rules: vec![Rule::default()],
            ..Default::default()
        },
        status: None,
    })
}

impl AuthzPolicies {
    /// Reads every AuthorizationPolicy of the world (objects come in key order).
    pub fn from_objects<'a>(objects: impl Iterator<Item = &'a Object>) -> Self {
        let mut out = AuthzPolicies::default();
        for o in objects {
            if let Object::AuthorizationPolicy(p) = o {
                out.by_namespace
                    .entry(p.namespace.clone())
                    .or_default()
                    .push(Arc::new((**p).clone()));
            }
        }
        out
    }

    /// Whether there is none at all.
    pub fn is_empty(&self) -> bool {
        self.by_namespace.is_empty()
    }

    /// Every policy, in key order.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Named<AuthorizationPolicySpec>>> {
        self.by_namespace.values().flatten()
    }

    /// The policies that apply to one workload: its namespace, its pod's labels (`None`:
    /// not known yet) and the Services of its namespace it is an endpoint of.
    pub fn for_workload(
        &self,
        namespace: &str,
        labels: Option<&BTreeMap<String, String>>,
        services: &BTreeSet<String>,
    ) -> Vec<Arc<Named<AuthorizationPolicySpec>>> {
        let root = weft_proto::keys::CONTROL_PLANE_NAMESPACE;
        let mut out = Vec::new();
        let mut unknown_allow = false;
        let mut consider = |p: &Arc<Named<AuthorizationPolicySpec>>, own_namespace: bool| {
            let spec = &p.spec;
            let selected = match (&spec.selector, spec.targets().next().is_some()) {
                (Some(sel), _) => {
                    labels.map(|l| sel.match_labels.iter().all(|(k, v)| l.get(k) == Some(v)))
                }
                (None, true) => Some(
                    own_namespace
                        && spec.targets().any(|t| {
                            t.kind == "Service"
                                && t.group.as_deref().unwrap_or("").is_empty()
                                && t.namespace.as_deref().is_none_or(|n| n == p.namespace)
                                && services.contains(&t.name)
                        }),
                ),
                (None, false) => Some(true),
            };
            match selected {
                Some(true) => out.push(p.clone()),
                Some(false) => {}
                // Labels unknown: every DENY and AUDIT it could be under, and a deny-all
                // when an ALLOW could select it.
                None => match spec.action() {
                    Action::Allow => unknown_allow = true,
                    _ => out.push(p.clone()),
                },
            }
        };
        if namespace != root {
            for p in self.by_namespace.get(root).into_iter().flatten() {
                consider(p, false);
            }
        }
        for p in self.by_namespace.get(namespace).into_iter().flatten() {
            consider(p, true);
        }
        if unknown_allow {
            out.push(deny_all(namespace, "weft-labels-unknown"));
        }
        out
    }

    /// Policies that select no workload among `workloads` (namespace, labels, services).
    pub fn selecting_nothing<'a>(
        &'a self,
        workloads: &[(String, BTreeMap<String, String>, BTreeSet<String>)],
    ) -> Vec<&'a Arc<Named<AuthorizationPolicySpec>>> {
        self.all()
            .filter(|p| {
                !workloads.iter().any(|(ns, labels, services)| {
                    self.for_workload(ns, Some(labels), services)
                        .iter()
                        .any(|q| Arc::ptr_eq(q, p))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
