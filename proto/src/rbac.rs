//! Envoy RBAC (`envoy.config.rbac.v3.RBAC`), evaluated as Envoy evaluates it: the one engine
//! the sidecar runs on every inbound request and connection, and the one `weftctl authz check`
//! asks, so the answer the CLI gives is the one the proxy enforces.
//!
//! An [`Engine`] is a chain of RBAC filters in order (Weft sends AUDIT's LOG filter, then
//! DENY, then ALLOW). Per filter, as in Envoy: `DENY` denies when a policy matches; `ALLOW`
//! denies when none matches; `LOG` only records the first policy that matches. A policy
//! matches when one of its permissions and one of its principals match. Policies are tried in
//! name order, so the one named in a decision is the same on every run.
//!
//! Only the matchers Weft generates are accepted; anything else in a policy makes the whole
//! RBAC config refused ([`Invalid`]), never skipped, so a proxy keeps its previous config
//! rather than enforce part of a new one.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use crate::envoy::envoy::config::core::v3::CidrRange;
use crate::envoy::envoy::config::listener::v3::FilterChain;
use crate::envoy::envoy::config::rbac::v3 as pb;
use crate::envoy::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use crate::envoy::envoy::r#type::matcher::v3::{
    PathMatcher, StringMatcher, path_matcher, string_matcher,
};

/// The `weft-inbound` filter chain for connections served as HTTP (an HTTP connection
/// manager whose HTTP filters include the RBAC ones).
pub const HTTP_CHAIN: &str = "inbound-http";
/// The `weft-inbound` filter chain for connections spliced as opaque TCP (network RBAC
/// filters before a TCP proxy).
pub const TCP_CHAIN: &str = "inbound-tcp";
/// Envoy's name of the HTTP RBAC filter.
pub const HTTP_FILTER: &str = "envoy.filters.http.rbac";
/// Envoy's name of the network RBAC filter.
pub const NETWORK_FILTER: &str = "envoy.filters.network.rbac";
/// The type URL of the HTTP RBAC filter's config.
pub const HTTP_RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
/// The type URL of the network RBAC filter's config.
pub const NETWORK_RBAC_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";

/// Why an RBAC config cannot be enforced as sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("RBAC policy {policy:?}: {message}")]
pub struct Invalid {
    /// The policy's name.
    pub policy: String,
    /// What is wrong, naming the matcher.
    pub message: String,
}

/// The HTTP attributes of a request (absent for a TCP connection).
#[derive(Debug, Clone, Copy)]
pub struct HttpInput<'a> {
    /// `:method`.
    pub method: &'a str,
    /// `:path`, query included (`url_path` matchers see it without the query).
    pub path: &'a str,
    /// `:authority` (HTTP/1: `Host`).
    pub authority: &'a str,
    /// The request headers.
    pub headers: &'a http::HeaderMap,
}

/// What a request or connection is judged on.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The caller's verified SPIFFE ID; `None` for a plaintext caller, which no
    /// `authenticated` principal matches.
    pub principal: Option<&'a str>,
    /// The caller's address (`direct_remote_ip`, also `remote_ip`: no forwarded header is
    /// trusted).
    pub source: IpAddr,
    /// Where the connection was going: the workload's address and container port.
    pub destination: SocketAddr,
    /// The request, on HTTP.
    pub http: Option<HttpInput<'a>>,
}

/// An RBAC filter's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Let through what a policy matches, deny the rest.
    Allow,
    /// Deny what a policy matches.
    Deny,
    /// Record what a policy matches; deny nothing.
    Log,
}

/// The outcome of evaluating an [`Engine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'e> {
    /// Whether the request or connection may proceed.
    pub allowed: bool,
    /// The deciding policy: the DENY policy that matched, or the ALLOW policy that let it
    /// through; `None` when denied because no ALLOW policy matched, or allowed with no ALLOW
    /// filter.
    pub policy: Option<&'e str>,
    /// The first LOG (AUDIT) policy that matched.
    pub audit: Option<&'e str>,
}

/// A chain of RBAC filters, ready to evaluate.
#[derive(Debug, Clone, Default)]
pub struct Engine {
    filters: Vec<Filter>,
}

#[derive(Debug, Clone)]
struct Filter {
    action: Action,
    policies: Vec<(String, Policy)>,
    /// Exact principal -> the policies (indices, ascending) only that principal can match.
    by_principal: HashMap<String, Vec<usize>>,
    /// Exact `url_path` -> the policies only that path can match (not indexed by principal).
    by_path: HashMap<String, Vec<usize>>,
    /// `url_path` prefix ending in `/` -> the policies only paths under it can match.
    by_path_prefix: HashMap<String, Vec<usize>>,
    /// The policies any request may match (ascending).
    always: Vec<usize>,
}

/// One evaluation's input with what every matcher would otherwise recompute.
struct Ctx<'a> {
    input: &'a Input<'a>,
    /// `:path` without its query.
    url_path: Option<&'a str>,
}

impl Filter {
    fn new(action: Action, mut policies: Vec<(String, Policy)>) -> Self {
        policies.sort_by(|a, b| a.0.cmp(&b.0));
        let mut f = Filter {
            action,
            policies: Vec::new(),
            by_principal: HashMap::new(),
            by_path: HashMap::new(),
            by_path_prefix: HashMap::new(),
            always: Vec::new(),
        };
        for (i, (_, p)) in policies.iter().enumerate() {
            if let Some(set) = p.required_principals() {
                for id in set {
                    f.by_principal.entry(id).or_default().push(i);
                }
            } else if let Some(paths) = p.required_paths() {
                for path in paths {
                    match path {
                        PathKey::Exact(s) => f.by_path.entry(s).or_default().push(i),
                        PathKey::Prefix(s) => f.by_path_prefix.entry(s).or_default().push(i),
                    }
                }
            } else {
                f.always.push(i);
            }
        }
        for v in f.by_path.values_mut().chain(f.by_path_prefix.values_mut()) {
            v.dedup();
        }
        f.policies = policies;
        f
    }

    /// The first policy, in name order, that matches. Only the candidates are tried: those
    /// any request may match, those the caller's principal can match, those the request's
    /// path can match (indexes over exact principals, exact paths and `/`-ended prefixes),
    /// which gives the same answer as trying every policy in order.
    fn first_match(&self, cx: &Ctx<'_>) -> Option<&str> {
        let mut best: Option<usize> = None;
        let mut consider = |list: &[usize]| {
            for &i in list {
                if best.is_some_and(|b| i >= b) {
                    return;
                }
                if self.policies[i].1.matches(cx) {
                    best = Some(i);
                    return;
                }
            }
        };
        consider(&self.always);
        if let Some(list) = cx.input.principal.and_then(|p| self.by_principal.get(p)) {
            consider(list);
        }
        if let Some(path) = cx.url_path {
            if let Some(list) = self.by_path.get(path) {
                consider(list);
            }
            if !self.by_path_prefix.is_empty() {
                for (i, _) in path.match_indices('/') {
                    if let Some(list) = self.by_path_prefix.get(&path[..=i]) {
                        consider(list);
                    }
                }
            }
        }
        best.map(|i| self.policies[i].0.as_str())
    }
}

/// A path a policy needs: exactly, or under a prefix that ends in `/`.
enum PathKey {
    Exact(String),
    Prefix(String),
}

#[derive(Debug, Clone)]
struct Policy {
    permissions: Vec<Perm>,
    principals: Vec<Id>,
}

impl Engine {
    /// Compiles RBAC configs, in filter order; `None` (a filter without rules) passes all.
    pub fn new<'a>(rbacs: impl IntoIterator<Item = Option<&'a pb::Rbac>>) -> Result<Self, Invalid> {
        let mut filters = Vec::new();
        for rbac in rbacs.into_iter().flatten() {
            let action = match pb::rbac::Action::try_from(rbac.action) {
                Ok(pb::rbac::Action::Allow) => Action::Allow,
                Ok(pb::rbac::Action::Deny) => Action::Deny,
                Ok(pb::rbac::Action::Log) => Action::Log,
                _ => {
                    return Err(Invalid {
                        policy: String::new(),
                        message: format!("action {} is not ALLOW, DENY or LOG", rbac.action),
                    });
                }
            };
            if rbac.audit_logging_options.is_some() {
                return Err(Invalid {
                    policy: String::new(),
                    message: "audit_logging_options is not supported".into(),
                });
            }
            let mut policies = Vec::with_capacity(rbac.policies.len());
            for (name, p) in &rbac.policies {
                policies.push((name.clone(), Policy::new(name, p)?));
            }
            filters.push(Filter::new(action, policies));
        }
        Ok(Engine { filters })
    }

    /// Whether any filter is there (a workload no policy selects has none).
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Whether some request from `principal` (`None`: plaintext) could pass every ALLOW
    /// filter, judging only what the caller's identity decides (conditions on the request,
    /// its address or headers count as possibly met). `false` means no request of that
    /// caller is ever allowed, whatever it asks.
    pub fn may_allow(&self, principal: Option<&str>) -> bool {
        self.filters
            .iter()
            .filter(|f| f.action == Action::Allow)
            .all(|f| {
                f.policies.iter().any(|(_, p)| {
                    p.principals
                        .iter()
                        .any(|id| id.may_match(principal) != Some(false))
                })
            })
    }

    /// Each filter as `ACTION: policy, policy` (`ALLOW: (none)` denies all), for config
    /// dumps and `weftctl`.
    pub fn describe(&self) -> Vec<String> {
        self.filters
            .iter()
            .map(|f| {
                let names: Vec<&str> = f.policies.iter().map(|(n, _)| n.as_str()).collect();
                let action = match f.action {
                    Action::Allow => "ALLOW",
                    Action::Deny => "DENY",
                    Action::Log => "LOG",
                };
                match names.is_empty() {
                    true => format!("{action}: (none)"),
                    false => format!("{action}: {}", names.join(", ")),
                }
            })
            .collect()
    }

    /// Evaluates every filter in order, stopping at the first denial.
    pub fn evaluate(&self, input: &Input<'_>) -> Decision<'_> {
        let mut decision = Decision {
            allowed: true,
            policy: None,
            audit: None,
        };
        let cx = Ctx {
            input,
            url_path: input.http.map(|h| url_path(h.path)),
        };
        for f in &self.filters {
            let matched = f.first_match(&cx);
            match f.action {
                Action::Log => {
                    if decision.audit.is_none() {
                        decision.audit = matched;
                    }
                }
                Action::Deny => {
                    if matched.is_some() {
                        decision.allowed = false;
                        decision.policy = matched;
                        return decision;
                    }
                }
                Action::Allow => match matched {
                    Some(n) => decision.policy = Some(n),
                    None => {
                        decision.allowed = false;
                        decision.policy = None;
                        return decision;
                    }
                },
            }
        }
        decision
    }
}

impl Policy {
    fn new(name: &str, p: &pb::Policy) -> Result<Self, Invalid> {
        let bad = |message: String| Invalid {
            policy: name.to_string(),
            message,
        };
        if p.condition.is_some() || p.checked_condition.is_some() || p.cel_config.is_some() {
            return Err(bad("CEL conditions are not supported".into()));
        }
        if p.permissions.is_empty() || p.principals.is_empty() {
            return Err(bad(
                "a policy needs at least one permission and one principal".into(),
            ));
        }
        let permissions = p
            .permissions
            .iter()
            .map(Perm::new)
            .collect::<Result<_, _>>()
            .map_err(bad)?;
        let principals = p
            .principals
            .iter()
            .map(Id::new)
            .collect::<Result<_, _>>()
            .map_err(bad)?;
        Ok(Policy {
            permissions,
            principals,
        })
    }

    fn matches(&self, cx: &Ctx<'_>) -> bool {
        self.permissions.iter().any(|p| p.matches(cx))
            && self.principals.iter().any(|p| p.matches(cx))
    }

    /// The paths outside which this policy cannot match, when its permissions say so (each
    /// alternative requires an exact path or a `/`-ended prefix, case-sensitive).
    fn required_paths(&self) -> Option<Vec<PathKey>> {
        let mut out = Vec::new();
        for p in &self.permissions {
            out.extend(p.required_paths()?);
        }
        Some(out)
    }

    /// The exact principals outside which this policy cannot match, when its principals say
    /// so (each alternative requires an exact, case-sensitive `authenticated` name).
    fn required_principals(&self) -> Option<Vec<String>> {
        let mut out = Vec::new();
        for p in &self.principals {
            out.extend(p.required()?);
        }
        Some(out)
    }
}

/// A compiled `Permission`.
#[derive(Debug, Clone)]
enum Perm {
    Any,
    And(Vec<Perm>),
    Or(Vec<Perm>),
    Not(Box<Perm>),
    Header(Header),
    Path(Str),
    DestIp(Cidr),
    DestPort(u16),
    DestPortRange(i32, i32),
}

/// The evaluation tree is simplified once, at compile time, without changing what it
/// matches (every matcher is a pure function of the input): nested `and`s and `or`s are
/// flattened, an `or` of exact matchers on one header becomes one set lookup, and an `and`
/// tries its cheap, selective parts first. Istio's rule shape (`and` of `or`s of a few
/// values) then costs a few comparisons per rule, not a walk over a deep tree.
impl Perm {
    /// The paths this permission can match at most, when it bounds them.
    fn required_paths(&self) -> Option<Vec<PathKey>> {
        match self {
            Perm::Path(Str {
                kind,
                ignore_case: false,
            }) => match kind {
                StrKind::Exact(s) => Some(vec![PathKey::Exact(s.clone())]),
                StrKind::Prefix(s) if s.ends_with('/') => Some(vec![PathKey::Prefix(s.clone())]),
                _ => None,
            },
            Perm::Or(v) => {
                let mut out = Vec::new();
                for p in v {
                    out.extend(p.required_paths()?);
                }
                Some(out)
            }
            Perm::And(v) => v.iter().find_map(Perm::required_paths),
            _ => None,
        }
    }

    fn cost(&self) -> u8 {
        match self {
            Perm::Any | Perm::DestPort(_) | Perm::DestPortRange(..) => 0,
            Perm::DestIp(_) => 1,
            Perm::Path(_) => 2,
            Perm::Header(_) => 3,
            Perm::Not(_) => 4,
            Perm::And(_) | Perm::Or(_) => 5,
        }
    }

    fn new(p: &pb::Permission) -> Result<Self, String> {
        use pb::permission::Rule;
        let set = |s: &pb::permission::Set| -> Result<Vec<Perm>, String> {
            s.rules.iter().map(Perm::new).collect()
        };
        Ok(match p.rule.as_ref() {
            None => return Err("a permission without a rule".into()),
            Some(Rule::Any(true)) => Perm::Any,
            Some(Rule::Any(false)) => return Err("permission any: false".into()),
            Some(Rule::AndRules(s)) => simplify_and(set(s)?),
            Some(Rule::OrRules(s)) => simplify_or(set(s)?),
            Some(Rule::NotRule(r)) => Perm::Not(Box::new(Perm::new(r)?)),
            Some(Rule::Header(h)) => Perm::Header(Header::new(h)?),
            Some(Rule::UrlPath(m)) => Perm::Path(Str::of_path(m)?),
            Some(Rule::DestinationIp(c)) => Perm::DestIp(Cidr::new(c)?),
            Some(Rule::DestinationPort(p)) => Perm::DestPort(
                u16::try_from(*p).map_err(|_| format!("destination_port {p} is not a port"))?,
            ),
            Some(Rule::DestinationPortRange(r)) => Perm::DestPortRange(r.start, r.end),
            Some(other) => return Err(format!("permission {} is not supported", rule_name(other))),
        })
    }

    fn matches(&self, cx: &Ctx<'_>) -> bool {
        match self {
            Perm::Any => true,
            Perm::And(v) => v.iter().all(|p| p.matches(cx)),
            Perm::Or(v) => v.iter().any(|p| p.matches(cx)),
            Perm::Not(p) => !p.matches(cx),
            Perm::Header(h) => h.matches(cx),
            Perm::Path(s) => cx.url_path.is_some_and(|p| s.matches(p)),
            Perm::DestIp(c) => c.contains(cx.input.destination.ip()),
            Perm::DestPort(p) => cx.input.destination.port() == *p,
            // Envoy's Int32Range: [start, end).
            Perm::DestPortRange(start, end) => {
                let p = i32::from(cx.input.destination.port());
                *start <= p && p < *end
            }
        }
    }
}

#[allow(deprecated)]
fn rule_name(r: &pb::permission::Rule) -> &'static str {
    use pb::permission::Rule;
    match r {
        Rule::Metadata(_) | Rule::SourcedMetadata(_) => "metadata",
        Rule::RequestedServerName(_) => "requested_server_name",
        Rule::Matcher(_) => "matcher",
        Rule::UriTemplate(_) => "uri_template",
        _ => "rule",
    }
}

/// A compiled `Principal`.
#[derive(Debug, Clone)]
enum Id {
    Any,
    And(Vec<Id>),
    Or(Vec<Id>),
    Not(Box<Id>),
    /// `authenticated`: a verified peer, its principal matching when a matcher is given.
    Authenticated(Option<Str>),
    RemoteIp(Cidr),
    Header(Header),
    Path(Str),
}

impl Id {
    fn cost(&self) -> u8 {
        match self {
            Id::Any => 0,
            Id::RemoteIp(_) => 1,
            Id::Authenticated(_) => 2,
            Id::Path(_) | Id::Header(_) => 3,
            Id::Not(_) => 4,
            Id::And(_) | Id::Or(_) => 5,
        }
    }

    /// Whether this identifier matches `principal` whatever the request: `None` when that
    /// depends on the request (address, headers, path).
    fn may_match(&self, principal: Option<&str>) -> Option<bool> {
        match self {
            Id::Any => Some(true),
            Id::And(v) => {
                let r: Vec<Option<bool>> = v.iter().map(|i| i.may_match(principal)).collect();
                if r.contains(&Some(false)) {
                    Some(false)
                } else if r.iter().all(|x| *x == Some(true)) {
                    Some(true)
                } else {
                    None
                }
            }
            Id::Or(v) => {
                let r: Vec<Option<bool>> = v.iter().map(|i| i.may_match(principal)).collect();
                if r.contains(&Some(true)) {
                    Some(true)
                } else if r.iter().all(|x| *x == Some(false)) {
                    Some(false)
                } else {
                    None
                }
            }
            Id::Not(i) => i.may_match(principal).map(|b| !b),
            Id::Authenticated(m) => Some(match (principal, m) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(p), Some(m)) => m.matches(p),
            }),
            Id::RemoteIp(_) | Id::Header(_) | Id::Path(_) => None,
        }
    }

    /// The exact principals this identifier can match at most, when it bounds them.
    fn required(&self) -> Option<Vec<String>> {
        match self {
            Id::Authenticated(Some(Str {
                kind: StrKind::Exact(s),
                ignore_case: false,
            })) => Some(vec![s.clone()]),
            // Every alternative bounded: their union.
            Id::Or(v) => {
                let mut out = Vec::new();
                for id in v {
                    out.extend(id.required()?);
                }
                Some(out)
            }
            // All must match: any bounded part bounds the whole.
            Id::And(v) => v.iter().find_map(Id::required),
            _ => None,
        }
    }

    fn new(p: &pb::Principal) -> Result<Self, String> {
        use pb::principal::Identifier;
        let set = |s: &pb::principal::Set| -> Result<Vec<Id>, String> {
            s.ids.iter().map(Id::new).collect()
        };
        #[allow(deprecated)]
        Ok(match p.identifier.as_ref() {
            None => return Err("a principal without an identifier".into()),
            Some(Identifier::Any(true)) => Id::Any,
            Some(Identifier::Any(false)) => return Err("principal any: false".into()),
            Some(Identifier::AndIds(s)) => simplify_and(set(s)?),
            Some(Identifier::OrIds(s)) => simplify_or(set(s)?),
            Some(Identifier::NotId(p)) => Id::Not(Box::new(Id::new(p)?)),
            Some(Identifier::Authenticated(a)) => {
                Id::Authenticated(a.principal_name.as_ref().map(Str::new).transpose()?)
            }
            Some(
                Identifier::DirectRemoteIp(c) | Identifier::RemoteIp(c) | Identifier::SourceIp(c),
            ) => Id::RemoteIp(Cidr::new(c)?),
            Some(Identifier::Header(h)) => Id::Header(Header::new(h)?),
            Some(Identifier::UrlPath(m)) => Id::Path(Str::of_path(m)?),
            Some(_) => return Err("principal kind is not supported".into()),
        })
    }

    fn matches(&self, cx: &Ctx<'_>) -> bool {
        match self {
            Id::Any => true,
            Id::And(v) => v.iter().all(|p| p.matches(cx)),
            Id::Or(v) => v.iter().any(|p| p.matches(cx)),
            Id::Not(p) => !p.matches(cx),
            Id::Authenticated(m) => match (cx.input.principal, m) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(p), Some(m)) => m.matches(p),
            },
            Id::RemoteIp(c) => c.contains(cx.input.source),
            Id::Header(h) => h.matches(cx),
            Id::Path(s) => cx.url_path.is_some_and(|p| s.matches(p)),
        }
    }
}

/// What the simplifier needs of a matcher tree (permissions and principals alike).
trait Tree: Sized {
    /// The matcher that matches everything.
    const ANY: fn() -> Self;
    /// Builds an `and` / an `or` of several.
    fn and(v: Vec<Self>) -> Self;
    fn or(v: Vec<Self>) -> Self;
    /// Takes an `and` / `or` apart, or gives the matcher back.
    fn into_and(self) -> Result<Vec<Self>, Self>;
    fn into_or(self) -> Result<Vec<Self>, Self>;
    fn is_any(&self) -> bool;
    /// Rough cost of evaluating it, to try cheap conjuncts first.
    fn cost(&self) -> u8;
    /// The header matcher it is, if it is one.
    fn header_mut(&mut self) -> Option<&mut Header>;
}

/// Both trees have the same shape of variants (`Any`, `And`, `Or`, `Header`).
macro_rules! impl_tree {
    ($t:ident) => {
        impl Tree for $t {
            const ANY: fn() -> Self = || $t::Any;
            fn and(v: Vec<Self>) -> Self {
                $t::And(v)
            }
            fn or(v: Vec<Self>) -> Self {
                $t::Or(v)
            }
            fn into_and(self) -> Result<Vec<Self>, Self> {
                match self {
                    $t::And(v) => Ok(v),
                    p => Err(p),
                }
            }
            fn into_or(self) -> Result<Vec<Self>, Self> {
                match self {
                    $t::Or(v) => Ok(v),
                    p => Err(p),
                }
            }
            fn is_any(&self) -> bool {
                matches!(self, $t::Any)
            }
            fn cost(&self) -> u8 {
                $t::cost(self)
            }
            fn header_mut(&mut self) -> Option<&mut Header> {
                match self {
                    $t::Header(h) => Some(h),
                    _ => None,
                }
            }
        }
    };
}
impl_tree!(Perm);
impl_tree!(Id);

/// An `and`, flattened, without `any`s, cheapest parts first.
fn simplify_and<T: Tree>(v: Vec<T>) -> T {
    let mut out = Vec::with_capacity(v.len());
    for p in v {
        match p.into_and() {
            Ok(inner) => out.extend(inner),
            Err(p) if p.is_any() => {}
            Err(p) => out.push(p),
        }
    }
    out.sort_by_key(T::cost);
    match out.len() {
        0 => (T::ANY)(),
        1 => out.remove(0),
        _ => T::and(out),
    }
}

/// An `or`, flattened, exact values on one header merged; `any` when one part is.
fn simplify_or<T: Tree>(v: Vec<T>) -> T {
    let mut out: Vec<T> = Vec::with_capacity(v.len());
    for p in v {
        match p.into_or() {
            Ok(inner) => inner.into_iter().for_each(|q| push_or(&mut out, q)),
            Err(p) => push_or(&mut out, p),
        }
    }
    if out.iter().any(T::is_any) {
        return (T::ANY)();
    }
    match out.len() {
        1 => out.remove(0),
        _ => T::or(out),
    }
}

/// Adds `p` to an `or`, merging an exact, case-sensitive, non-inverted header matcher into
/// an earlier one on the same header (a set of values).
fn push_or<T: Tree>(out: &mut Vec<T>, mut p: T) {
    fn exact(h: &Header) -> Option<Vec<String>> {
        if h.invert {
            return None;
        }
        match &h.spec {
            HeaderSpec::Str(Str {
                kind: StrKind::Exact(s),
                ignore_case: false,
            }) => Some(vec![s.clone()]),
            HeaderSpec::In(v) => Some(v.clone()),
            _ => None,
        }
    }
    if let Some(h) = p.header_mut()
        && let Some(values) = exact(h)
    {
        let (name, pseudo) = (h.name.clone(), h.pseudo);
        for q in out.iter_mut() {
            if let Some(other) = q.header_mut()
                && other.name == name
                && other.pseudo == pseudo
                && let Some(mut have) = exact(other)
            {
                have.extend(values);
                other.spec = HeaderSpec::In(have);
                return;
            }
        }
    }
    out.push(p);
}

/// `:path` without its query or fragment.
fn url_path(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or(path)
}

/// A compiled `StringMatcher`.
#[derive(Debug, Clone)]
struct Str {
    kind: StrKind,
    ignore_case: bool,
}

#[derive(Debug, Clone)]
enum StrKind {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(regex::Regex),
}

impl Str {
    fn new(m: &StringMatcher) -> Result<Self, String> {
        use string_matcher::MatchPattern;
        let kind = match m.match_pattern.as_ref() {
            Some(MatchPattern::Exact(s)) => StrKind::Exact(s.clone()),
            Some(MatchPattern::Prefix(s)) if !s.is_empty() => StrKind::Prefix(s.clone()),
            Some(MatchPattern::Suffix(s)) if !s.is_empty() => StrKind::Suffix(s.clone()),
            Some(MatchPattern::Contains(s)) if !s.is_empty() => StrKind::Contains(s.clone()),
            Some(MatchPattern::SafeRegex(r)) => StrKind::Regex(
                regex::Regex::new(&format!("^(?:{})$", r.regex))
                    .map_err(|e| format!("regex {:?}: {e}", r.regex))?,
            ),
            Some(MatchPattern::Prefix(_) | MatchPattern::Suffix(_) | MatchPattern::Contains(_)) => {
                return Err("an empty prefix, suffix or contains string".into());
            }
            _ => return Err("string matcher kind is not supported".into()),
        };
        let kind = match (kind, m.ignore_case) {
            (StrKind::Contains(s), true) => StrKind::Contains(s.to_ascii_lowercase()),
            (StrKind::Regex(r), true) => StrKind::Regex(
                regex::Regex::new(&format!("(?i){}", r.as_str()))
                    .map_err(|e| format!("regex: {e}"))?,
            ),
            (k, _) => k,
        };
        Ok(Str {
            kind,
            ignore_case: m.ignore_case,
        })
    }

    fn of_path(m: &PathMatcher) -> Result<Self, String> {
        match m.rule.as_ref() {
            Some(path_matcher::Rule::Path(s)) => Str::new(s),
            None => Err("a url_path matcher without a path".into()),
        }
    }

    fn matches(&self, v: &str) -> bool {
        let (v, ci) = (v.as_bytes(), self.ignore_case);
        let eq = |a: &[u8], b: &[u8]| {
            if ci {
                a.eq_ignore_ascii_case(b)
            } else {
                a == b
            }
        };
        match &self.kind {
            StrKind::Exact(s) => eq(v, s.as_bytes()),
            StrKind::Prefix(s) => v.len() >= s.len() && eq(&v[..s.len()], s.as_bytes()),
            StrKind::Suffix(s) => v.len() >= s.len() && eq(&v[v.len() - s.len()..], s.as_bytes()),
            StrKind::Contains(s) => {
                let s = s.as_bytes();
                v.windows(s.len()).any(|w| eq(w, s))
            }
            StrKind::Regex(r) => std::str::from_utf8(v).is_ok_and(|v| r.is_match(v)),
        }
    }
}

/// A compiled `HeaderMatcher`.
#[derive(Debug, Clone)]
struct Header {
    name: http::HeaderName,
    pseudo: Option<Pseudo>,
    spec: HeaderSpec,
    invert: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pseudo {
    Method,
    Path,
    Authority,
}

#[derive(Debug, Clone)]
enum HeaderSpec {
    Str(Str),
    /// Exactly one of these (case-sensitive): an `or` of exact matchers on one header, merged.
    In(Vec<String>),
    Present(bool),
}

impl Header {
    fn new(h: &HeaderMatcher) -> Result<Self, String> {
        use header_matcher::HeaderMatchSpecifier as S;
        let lower = h.name.to_ascii_lowercase();
        let pseudo = match lower.as_str() {
            ":method" => Some(Pseudo::Method),
            ":path" => Some(Pseudo::Path),
            ":authority" | "host" => Some(Pseudo::Authority),
            n if n.starts_with(':') => return Err(format!("header {n:?} is not supported")),
            _ => None,
        };
        let name = match pseudo {
            Some(_) => http::HeaderName::from_static("x-weft-pseudo"),
            None => http::HeaderName::from_bytes(lower.as_bytes())
                .map_err(|_| format!("header name {:?} is not valid", h.name))?,
        };
        let spec = match h.header_match_specifier.as_ref() {
            Some(S::StringMatch(m)) => HeaderSpec::Str(Str::new(m)?),
            Some(S::PresentMatch(p)) => HeaderSpec::Present(*p),
            #[allow(deprecated)]
            Some(S::ExactMatch(s)) => HeaderSpec::Str(Str {
                kind: StrKind::Exact(s.clone()),
                ignore_case: false,
            }),
            _ => {
                return Err(format!(
                    "header {:?}: matcher kind is not supported",
                    h.name
                ));
            }
        };
        if h.treat_missing_header_as_empty {
            return Err(format!(
                "header {:?}: treat_missing_header_as_empty is not supported",
                h.name
            ));
        }
        Ok(Header {
            name,
            pseudo,
            spec,
            invert: h.invert_match,
        })
    }

    /// Envoy's rule: a header that is absent matches nothing (a present_match of false
    /// excepted), and `invert_match` turns the result of a present header around.
    fn matches(&self, cx: &Ctx<'_>) -> bool {
        let Some(req) = cx.input.http else {
            return false;
        };
        let value: Option<Cow<'_, str>> = match self.pseudo {
            Some(Pseudo::Method) => Some(Cow::Borrowed(req.method)),
            Some(Pseudo::Path) => Some(Cow::Borrowed(req.path)),
            Some(Pseudo::Authority) => Some(Cow::Borrowed(req.authority)),
            None => {
                // Envoy joins a repeated header's values with commas.
                let mut all = req.headers.get_all(&self.name).iter();
                match (all.next(), all.next()) {
                    (None, _) => None,
                    (Some(one), None) => Some(String::from_utf8_lossy(one.as_bytes())),
                    (Some(first), Some(second)) => {
                        let mut s = String::from_utf8_lossy(first.as_bytes()).into_owned();
                        for v in std::iter::once(second).chain(all) {
                            s.push(',');
                            s.push_str(&String::from_utf8_lossy(v.as_bytes()));
                        }
                        Some(Cow::Owned(s))
                    }
                }
            }
        };
        match (&self.spec, value) {
            (HeaderSpec::Present(want), v) => (v.is_some() == *want) != self.invert,
            (_, None) => false,
            (HeaderSpec::Str(m), Some(v)) => m.matches(&v) != self.invert,
            (HeaderSpec::In(set), Some(v)) => set.iter().any(|s| *s == *v) != self.invert,
        }
    }
}

/// An address range (a compiled `CidrRange`, or `addr/len` text): what `ipBlocks` and
/// NetworkPolicy `ipBlock`s match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u32,
}

impl Cidr {
    /// Reads `addr/len` (a bare address is a single host).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (
                a,
                Some(
                    l.parse::<u32>()
                        .map_err(|_| format!("{s:?}: the prefix length is not a number"))?,
                ),
            ),
            None => (s, None),
        };
        Self::new(&CidrRange {
            address_prefix: addr.to_string(),
            prefix_len: len.map(|value| crate::envoy::google::protobuf::UInt32Value { value }),
        })
    }

    fn new(c: &CidrRange) -> Result<Self, String> {
        let addr: IpAddr = c
            .address_prefix
            .parse()
            .map_err(|_| format!("CIDR address {:?} is not an IP address", c.address_prefix))?;
        let len = c.prefix_len.as_ref().map_or(
            match addr {
                IpAddr::V4(_) => 32,
                IpAddr::V6(_) => 128,
            },
            |l| l.value,
        );
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("CIDR prefix length {len} is over {max}"));
        }
        Ok(Cidr { addr, len })
    }

    /// Whether `ip` is in the range (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.len).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.len).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// A `weft-inbound` Listener's two engines, read from its filter chains.
#[derive(Debug, Clone, Default)]
pub struct Chains {
    /// The HTTP chain's RBAC filters, in order: judged per request.
    pub http: Engine,
    /// The TCP chain's network RBAC filters: judged per connection.
    pub tcp: Engine,
}

impl Chains {
    /// Reads the RBAC filters of [`HTTP_CHAIN`] (inside its HTTP connection manager) and
    /// [`TCP_CHAIN`]. A chain, filter or matcher that cannot be enforced is an error, so the
    /// whole Listener is refused rather than enforced in part.
    pub fn of(chains: &[FilterChain]) -> Result<Self, Invalid> {
        use crate::envoy::envoy::config::listener::v3::filter::ConfigType as NetConfig;
        use crate::envoy::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
        use crate::envoy::envoy::extensions::filters::network::http_connection_manager::v3::{
            HttpConnectionManager, http_filter::ConfigType,
        };
        use crate::envoy::envoy::extensions::filters::network::rbac::v3::Rbac as NetRbac;
        use prost::Message;
        let bad = |message: String| Invalid {
            policy: String::new(),
            message,
        };
        let mut http = Vec::new();
        let mut tcp = Vec::new();
        for (i, chain) in chains.iter().enumerate() {
            for (j, f) in chain.filters.iter().enumerate() {
                let at = format!("filter_chains[{i}] ({:?}).filters[{j}]", chain.name);
                let Some(NetConfig::TypedConfig(any)) = f.config_type.as_ref() else {
                    return Err(bad(format!("{at}: no typed_config")));
                };
                let shadowed = |m: bool| match m {
                    true => Err(bad(format!(
                        "{at}: only RBAC rules are supported (not matcher or shadow rules)"
                    ))),
                    false => Ok(()),
                };
                match (chain.name.as_str(), f.name.as_str()) {
                    (HTTP_CHAIN, "envoy.filters.network.http_connection_manager") => {
                        let hcm = HttpConnectionManager::decode(any.value.as_slice())
                            .map_err(|e| bad(format!("{at}: does not decode: {e}")))?;
                        for hf in hcm.http_filters.iter().filter(|h| h.name == HTTP_FILTER) {
                            let Some(ConfigType::TypedConfig(any)) = hf.config_type.as_ref() else {
                                return Err(bad(format!(
                                    "{at}: an RBAC filter without typed_config"
                                )));
                            };
                            let r = HttpRbac::decode(any.value.as_slice())
                                .map_err(|e| bad(format!("{at}: RBAC does not decode: {e}")))?;
                            shadowed(
                                r.matcher.is_some()
                                    || r.shadow_rules.is_some()
                                    || r.shadow_matcher.is_some(),
                            )?;
                            http.push(r.rules);
                        }
                    }
                    (TCP_CHAIN, NETWORK_FILTER) => {
                        let r = NetRbac::decode(any.value.as_slice())
                            .map_err(|e| bad(format!("{at}: RBAC does not decode: {e}")))?;
                        shadowed(
                            r.matcher.is_some()
                                || r.shadow_rules.is_some()
                                || r.shadow_matcher.is_some(),
                        )?;
                        tcp.push(r.rules);
                    }
                    (TCP_CHAIN, "envoy.filters.network.tcp_proxy") => {}
                    (HTTP_CHAIN | TCP_CHAIN, other) => {
                        return Err(bad(format!("{at}: filter {other:?} is not supported")));
                    }
                    (other, _) => {
                        return Err(bad(format!(
                            "filter_chains[{i}]: chain {other:?} is not one Weft enforces"
                        )));
                    }
                }
            }
        }
        Ok(Chains {
            http: Engine::new(http.iter().map(Option::as_ref))?,
            tcp: Engine::new(tcp.iter().map(Option::as_ref))?,
        })
    }
}

/// Decodes percent-encoded unreserved characters (letters, digits, `-._~`), which name the
/// same resource encoded or not (RFC 3986 §6.2.2.2): `/%61dmin` is `/admin` to the
/// application, so it must be to the policy.
fn decode_unreserved(path: &str) -> Cow<'_, str> {
    let hex = |b: u8| (b as char).to_digit(16);
    let b = path.as_bytes();
    let (mut out, mut last, mut i) = (String::new(), 0, 0);
    while i + 2 < b.len() {
        if let (b'%', Some(h), Some(l)) = (b[i], hex(b[i + 1]), hex(b[i + 2])) {
            let c = (h * 16 + l) as u8;
            if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                out.push_str(&path[last..i]);
                out.push(c as char);
                last = i + 3;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    if last == 0 {
        return Cow::Borrowed(path);
    }
    out.push_str(&path[last..]);
    Cow::Owned(out)
}

/// RFC 3986 normalisation: percent-encoded unreserved characters decoded, dot segments
/// removed, repeated slashes merged; `Borrowed` when the path is already normal. Refuses
/// encoded slashes and backslashes, whose meaning is the server's.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, &'static str> {
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || path.contains('\\') {
        return Err("a path with an encoded slash or a backslash is ambiguous");
    }
    if path.is_empty() {
        // Only a query (`?x`): the application serves `/`.
        return Ok(Cow::Owned("/".into()));
    }
    if !path.starts_with('/') {
        // `*` (OPTIONS): judged as it is.
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path);
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing = false;
    for (i, s) in segments.iter().enumerate() {
        match *s {
            "" if i != last => {}
            "." | "%2e" | "%2E" => trailing = i == last,
            ".." | "%2e%2e" | "%2E%2E" | ".%2e" | ".%2E" | "%2e." | "%2E." => {
                out.pop();
                trailing = i == last;
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut normal = String::with_capacity(path.len());
    for s in &out {
        normal.push('/');
        normal.push_str(s);
    }
    if trailing || normal.is_empty() {
        normal.push('/');
    }
    if normal == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(normal))
    }
}

/// Istio's policy name for one rule, `ns[<namespace>]-policy[<name>]-rule[<index>]`.
pub fn policy_name(namespace: &str, name: &str, rule: usize) -> String {
    format!("ns[{namespace}]-policy[{name}]-rule[{rule}]")
}

/// The namespace, policy name and rule index in a name [`policy_name`] made.
pub fn parse_policy_name(name: &str) -> Option<(&str, &str, &str)> {
    let rest = name.strip_prefix("ns[")?;
    let (ns, rest) = rest.split_once("]-policy[")?;
    let (policy, rest) = rest.rsplit_once("]-rule[")?;
    let rule = rest.strip_suffix(']')?;
    Some((ns, policy, rule))
}

/// Envoy's deterministic wire form of an RBAC config: protobuf encodes a `map` as repeated
/// entries, and Envoy's generated type holds it in a `HashMap`, whose order changes from one
/// process to the next. Encoding the same entries sorted by name gives the same bytes (and
/// so the same resource version) for the same policies on every control plane replica;
/// decoders read it as the ordinary RBAC message.
pub mod wire {
    use super::pb;

    /// `envoy.config.rbac.v3.RBAC` with its policies in name order.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Rbac {
        /// `action`.
        #[prost(int32, tag = "1")]
        pub action: i32,
        /// `policies`, as map entries.
        #[prost(message, repeated, tag = "2")]
        pub policies: Vec<PolicyEntry>,
    }

    /// One entry of the `policies` map.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PolicyEntry {
        /// The policy's name.
        #[prost(string, tag = "1")]
        pub key: String,
        /// The policy.
        #[prost(message, optional, tag = "2")]
        pub value: Option<pb::Policy>,
    }

    /// `envoy.extensions.filters.http.rbac.v3.RBAC` (`rules`, `rules_stat_prefix`).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HttpRbac {
        /// `rules`.
        #[prost(message, optional, tag = "1")]
        pub rules: Option<Rbac>,
        /// `rules_stat_prefix`.
        #[prost(string, tag = "6")]
        pub rules_stat_prefix: String,
    }

    /// `envoy.extensions.filters.network.rbac.v3.RBAC` (`rules`, `stat_prefix`).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NetworkRbac {
        /// `rules`.
        #[prost(message, optional, tag = "1")]
        pub rules: Option<Rbac>,
        /// `stat_prefix`.
        #[prost(string, tag = "3")]
        pub stat_prefix: String,
    }

    impl Rbac {
        /// The action and policies, sorted by name.
        pub fn new(action: pb::rbac::Action, mut policies: Vec<(String, pb::Policy)>) -> Self {
            policies.sort_by(|a, b| a.0.cmp(&b.0));
            Rbac {
                action: action as i32,
                policies: policies
                    .into_iter()
                    .map(|(key, value)| PolicyEntry {
                        key,
                        value: Some(value),
                    })
                    .collect(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn s(kind: string_matcher::MatchPattern) -> StringMatcher {
        StringMatcher {
            match_pattern: Some(kind),
            ignore_case: false,
        }
    }
    fn principal(m: StringMatcher) -> pb::Principal {
        pb::Principal {
            identifier: Some(pb::principal::Identifier::Authenticated(
                pb::principal::Authenticated {
                    principal_name: Some(m),
                },
            )),
        }
    }
    fn any_perm() -> pb::Permission {
        pb::Permission {
            rule: Some(pb::permission::Rule::Any(true)),
        }
    }
    fn any_id() -> pb::Principal {
        pb::Principal {
            identifier: Some(pb::principal::Identifier::Any(true)),
        }
    }
    fn header(name: &str, m: StringMatcher, invert: bool) -> HeaderMatcher {
        HeaderMatcher {
            name: name.into(),
            invert_match: invert,
            header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(m)),
            ..Default::default()
        }
    }
    fn rbac(action: pb::rbac::Action, policies: Vec<(&str, pb::Policy)>) -> pb::Rbac {
        // Through the sorted wire form, as the control plane sends it.
        let w = wire::Rbac::new(
            action,
            policies
                .into_iter()
                .map(|(n, p)| (n.to_string(), p))
                .collect(),
        );
        pb::Rbac::decode(w.encode_to_vec().as_slice()).expect("the wire form decodes as RBAC")
    }
    fn input<'a>(principal: Option<&'a str>, http: Option<HttpInput<'a>>) -> Input<'a> {
        Input {
            principal,
            source: "198.18.0.9".parse().expect("ip"),
            destination: "198.18.0.1:8080".parse().expect("addr"),
            http,
        }
    }

    const ALICE: &str = "spiffe://cluster.local/ns/shop/sa/alice";

    #[test]
    fn deny_then_allow_then_default_deny_as_envoy_chains_them() {
        use string_matcher::MatchPattern::*;
        let deny = rbac(
            pb::rbac::Action::Deny,
            vec![(
                "ns[shop]-policy[no-admin]-rule[0]",
                pb::Policy {
                    permissions: vec![pb::Permission {
                        rule: Some(pb::permission::Rule::UrlPath(PathMatcher {
                            rule: Some(path_matcher::Rule::Path(s(Prefix("/admin".into())))),
                        })),
                    }],
                    principals: vec![any_id()],
                    ..Default::default()
                },
            )],
        );
        let allow = rbac(
            pb::rbac::Action::Allow,
            vec![(
                "ns[shop]-policy[alice]-rule[0]",
                pb::Policy {
                    permissions: vec![any_perm()],
                    principals: vec![principal(s(Exact(ALICE.into())))],
                    ..Default::default()
                },
            )],
        );
        let engine = Engine::new([Some(&deny), Some(&allow)]).expect("compiles");
        let headers = http::HeaderMap::new();
        let get = |path: &'static str| HttpInput {
            method: "GET",
            path,
            authority: "web",
            headers: &headers,
        };
        let d = engine.evaluate(&input(Some(ALICE), Some(get("/x?q=1"))));
        assert_eq!(
            (d.allowed, d.policy),
            (true, Some("ns[shop]-policy[alice]-rule[0]"))
        );
        let d = engine.evaluate(&input(Some(ALICE), Some(get("/admin/users"))));
        assert_eq!(
            (d.allowed, d.policy),
            (false, Some("ns[shop]-policy[no-admin]-rule[0]"))
        );
        // Nobody else: the ALLOW filter denies what it does not match.
        let d = engine.evaluate(&input(
            Some("spiffe://cluster.local/ns/shop/sa/bob"),
            Some(get("/x")),
        ));
        assert_eq!((d.allowed, d.policy), (false, None));
        // A plaintext caller has no principal.
        assert!(!engine.evaluate(&input(None, Some(get("/x")))).allowed);
        // An empty engine allows all; an ALLOW filter with no policies denies all.
        assert!(Engine::default().evaluate(&input(None, None)).allowed);
        let none = rbac(pb::rbac::Action::Allow, vec![]);
        assert!(
            !Engine::new([Some(&none)])
                .expect("compiles")
                .evaluate(&input(Some(ALICE), None))
                .allowed
        );
    }

    #[test]
    fn headers_ports_addresses_and_logs() {
        use string_matcher::MatchPattern::*;
        let log = rbac(
            pb::rbac::Action::Log,
            vec![(
                "ns[shop]-policy[audit]-rule[0]",
                pb::Policy {
                    permissions: vec![pb::Permission {
                        rule: Some(pb::permission::Rule::DestinationPort(8080)),
                    }],
                    principals: vec![any_id()],
                    ..Default::default()
                },
            )],
        );
        let allow = rbac(
            pb::rbac::Action::Allow,
            vec![(
                "p",
                pb::Policy {
                    permissions: vec![pb::Permission {
                        rule: Some(pb::permission::Rule::AndRules(pb::permission::Set {
                            rules: vec![
                                pb::Permission {
                                    rule: Some(pb::permission::Rule::Header(header(
                                        ":method",
                                        s(Exact("GET".into())),
                                        false,
                                    ))),
                                },
                                pb::Permission {
                                    rule: Some(pb::permission::Rule::NotRule(Box::new(
                                        pb::Permission {
                                            rule: Some(pb::permission::Rule::Header(header(
                                                "x-env",
                                                s(Prefix("prod".into())),
                                                false,
                                            ))),
                                        },
                                    ))),
                                },
                            ],
                        })),
                    }],
                    principals: vec![pb::Principal {
                        identifier: Some(pb::principal::Identifier::DirectRemoteIp(CidrRange {
                            address_prefix: "198.18.0.0".into(),
                            prefix_len: Some(prost_types_u32(15)),
                        })),
                    }],
                    ..Default::default()
                },
            )],
        );
        let engine = Engine::new([Some(&log), Some(&allow)]).expect("compiles");
        let mut headers = http::HeaderMap::new();
        let req = |h: &'static http::HeaderMap, m: &'static str| HttpInput {
            method: m,
            path: "/",
            authority: "web",
            headers: h,
        };
        let h0: &'static http::HeaderMap = Box::leak(Box::new(headers.clone()));
        let d = engine.evaluate(&input(None, Some(req(h0, "GET"))));
        assert_eq!(
            (d.allowed, d.audit),
            (true, Some("ns[shop]-policy[audit]-rule[0]"))
        );
        assert!(!engine.evaluate(&input(None, Some(req(h0, "POST")))).allowed);
        headers.append("x-env", "prod-eu".parse().expect("value"));
        let h1: &'static http::HeaderMap = Box::leak(Box::new(headers));
        assert!(!engine.evaluate(&input(None, Some(req(h1, "GET")))).allowed);
        // TCP: header matchers never match a connection.
        assert!(!engine.evaluate(&input(None, None)).allowed);
        // Another source address.
        let mut far = input(None, Some(req(h0, "GET")));
        far.source = "203.0.113.1".parse().expect("ip");
        assert!(!engine.evaluate(&far).allowed);
    }

    fn prost_types_u32(v: u32) -> crate::envoy::google::protobuf::UInt32Value {
        crate::envoy::google::protobuf::UInt32Value { value: v }
    }

    #[test]
    fn what_the_engine_cannot_enforce_is_refused_not_skipped() {
        let bad = rbac(
            pb::rbac::Action::Deny,
            vec![(
                "sni",
                pb::Policy {
                    permissions: vec![pb::Permission {
                        rule: Some(pb::permission::Rule::RequestedServerName(
                            StringMatcher::default(),
                        )),
                    }],
                    principals: vec![any_id()],
                    ..Default::default()
                },
            )],
        );
        let e = Engine::new([Some(&bad)]).expect_err("refused");
        assert_eq!(e.policy, "sni");
        let empty = rbac(
            pb::rbac::Action::Deny,
            vec![("empty", pb::Policy::default())],
        );
        assert!(Engine::new([Some(&empty)]).is_err());
    }

    #[test]
    fn string_matchers_and_names() {
        use string_matcher::MatchPattern::*;
        let m = |p, ci| {
            Str::new(&StringMatcher {
                match_pattern: Some(p),
                ignore_case: ci,
            })
            .expect("ok")
        };
        assert!(m(Suffix("/sa/alice".into()), false).matches(ALICE));
        assert!(m(Contains("/ns/shop/".into()), false).matches(ALICE));
        assert!(!m(Contains("/ns/sho/".into()), false).matches(ALICE));
        assert!(m(Exact("WEB.shop".into()), true).matches("web.SHOP"));
        assert!(!m(Exact("WEB.shop".into()), false).matches("web.SHOP"));
        assert!(m(Prefix("Web".into()), true).matches("web:80"));
        let re = crate::envoy::envoy::r#type::matcher::v3::RegexMatcher {
            regex: "spiffe://[^/]+/ns/te[^/]*/sa/.+".into(),
            ..Default::default()
        };
        let r = m(SafeRegex(re), false);
        assert!(r.matches("spiffe://td/ns/test/sa/x"));
        assert!(!r.matches("spiffe://td/ns/shop/sa/test"));
        assert_eq!(
            parse_policy_name(&policy_name("shop", "a]-rule[b", 3)),
            Some(("shop", "a]-rule[b", "3"))
        );
        let c = Cidr::new(&CidrRange {
            address_prefix: "::ffff:0:0".into(),
            prefix_len: Some(prost_types_u32(0)),
        })
        .expect("ok");
        assert!(c.contains("::1".parse().expect("ip")));
        let v4 = Cidr::new(&CidrRange {
            address_prefix: "198.18.0.0".into(),
            prefix_len: Some(prost_types_u32(16)),
        })
        .expect("ok");
        assert!(v4.contains("::ffff:198.18.3.4".parse().expect("ip")));
        assert!(!v4.contains("198.19.3.4".parse().expect("ip")));
    }

    #[test]
    fn paths_are_judged_as_the_application_reads_them() {
        for (raw, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/", "/a/"),
            ("/public/../admin", "/admin"),
            ("/./admin", "/admin"),
            ("//admin", "/admin"),
            ("/a//b///c", "/a/b/c"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/../../admin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/a/.%2E/admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/public/%2e%2E/admin", "/admin"),
            ("", "/"),
            ("/api/%41dmin%7e", "/api/Admin~"),
            ("/a%20b/%C3%A9", "/a%20b/%C3%A9"),
            ("/x%2", "/x%2"),
        ] {
            assert_eq!(normalize_path(raw).expect("normal"), want, "{raw}");
        }
        assert!(matches!(normalize_path("/a/b"), Ok(Cow::Borrowed(_))));
        for bad in ["/admin%2fusers", "/a%5Cb", "/a\\b"] {
            assert!(normalize_path(bad).is_err(), "{bad}");
        }
    }

    /// The principal index must pick exactly what trying every policy in order picks.
    #[test]
    fn the_principal_index_decides_as_a_linear_scan_would() {
        use string_matcher::MatchPattern::*;
        let ids = [
            ALICE,
            "spiffe://cluster.local/ns/shop/sa/bob",
            "spiffe://cluster.local/ns/x/sa/y",
        ];
        let mut policies = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            // Bounded: an exact principal, alone or inside and/or.
            policies.push((
                format!("p{i}-exact"),
                pb::Policy {
                    permissions: vec![pb::Permission {
                        rule: Some(pb::permission::Rule::DestinationPort(8080 + i as u32)),
                    }],
                    principals: vec![principal(s(Exact(id.to_string())))],
                    ..Default::default()
                },
            ));
            policies.push((
                format!("p{i}-and"),
                pb::Policy {
                    permissions: vec![any_perm()],
                    principals: vec![pb::Principal {
                        identifier: Some(pb::principal::Identifier::AndIds(pb::principal::Set {
                            ids: vec![any_id(), principal(s(Exact(id.to_string())))],
                        })),
                    }],
                    ..Default::default()
                },
            ));
        }
        // Unbounded: a prefix inside an or, and an exact name ignoring case.
        policies.push((
            "p-or".into(),
            pb::Policy {
                permissions: vec![pb::Permission {
                    rule: Some(pb::permission::Rule::DestinationPort(9000)),
                }],
                principals: vec![pb::Principal {
                    identifier: Some(pb::principal::Identifier::OrIds(pb::principal::Set {
                        ids: vec![
                            principal(s(Exact(ALICE.into()))),
                            principal(s(Prefix("spiffe://cluster.local/ns/x/".into()))),
                        ],
                    })),
                }],
                ..Default::default()
            },
        ));
        policies.push((
            "p-ci".into(),
            pb::Policy {
                permissions: vec![pb::Permission {
                    rule: Some(pb::permission::Rule::DestinationPort(9001)),
                }],
                principals: vec![principal(StringMatcher {
                    match_pattern: Some(Exact(ALICE.to_uppercase())),
                    ignore_case: true,
                })],
                ..Default::default()
            },
        ));
        // Bounded by path: exact, a `/`-ended prefix, either; unbounded: a prefix without `/`.
        let path = |m: string_matcher::MatchPattern| pb::Permission {
            rule: Some(pb::permission::Rule::UrlPath(PathMatcher {
                rule: Some(path_matcher::Rule::Path(s(m))),
            })),
        };
        for (name, perm) in [
            ("q-exact", path(Exact("/a".into()))),
            ("q-prefix", path(Prefix("/b/".into()))),
            (
                "q-either",
                pb::Permission {
                    rule: Some(pb::permission::Rule::OrRules(pb::permission::Set {
                        rules: vec![path(Exact("/c".into())), path(Prefix("/b/x/".into()))],
                    })),
                },
            ),
            ("q-loose", path(Prefix("/b".into()))),
        ] {
            policies.push((
                name.into(),
                pb::Policy {
                    permissions: vec![perm],
                    principals: vec![any_id()],
                    ..Default::default()
                },
            ));
        }
        let rbac = rbac(
            pb::rbac::Action::Deny,
            policies
                .iter()
                .map(|(n, p)| (n.as_str(), p.clone()))
                .collect(),
        );
        let engine = Engine::new([Some(&rbac)]).expect("compiles");
        let f = &engine.filters[0];
        let headers = http::HeaderMap::new();
        for p in ["/a", "/a/", "/b", "/b/", "/b/x/y", "/bb", "/c", "/c/d", "/"] {
            let req = HttpInput {
                method: "GET",
                path: p,
                authority: "h",
                headers: &headers,
            };
            for who in [None, Some(ALICE)] {
                let inp = input(who, Some(req));
                let cx = Ctx {
                    input: &inp,
                    url_path: Some(p),
                };
                let linear = f
                    .policies
                    .iter()
                    .find(|(_, p)| p.matches(&cx))
                    .map(|(n, _)| n.as_str());
                assert_eq!(f.first_match(&cx), linear, "{who:?} {p}");
            }
        }
        assert_eq!(
            (f.by_path.len(), f.by_path_prefix.len()),
            (2, 2),
            "{:?} {:?}",
            f.by_path.keys(),
            f.by_path_prefix.keys()
        );
        for who in ids
            .iter()
            .map(|i| Some(*i))
            .chain([None, Some("spiffe://cluster.local/ns/x/sa/z")])
        {
            for port in [8080u16, 8081, 8082, 9000, 9001, 1] {
                let mut inp = input(who, None);
                inp.destination.set_port(port);
                let cx = Ctx {
                    input: &inp,
                    url_path: None,
                };
                let linear = f
                    .policies
                    .iter()
                    .find(|(_, p)| p.matches(&cx))
                    .map(|(n, _)| n.as_str());
                assert_eq!(f.first_match(&cx), linear, "{who:?} :{port}");
            }
        }
        assert!(
            f.always.len() == 3 && f.by_principal.len() == 3,
            "{:?} {:?}",
            f.always,
            f.by_principal.keys()
        );
    }
}
