//! Which Services a proxy sees: a Service's `networking.istio.io/exportTo` and its caller's
//! namespace's egress host list (`weft.dev/egress-hosts`, the shape of Istio's `Sidecar`
//! `egress.hosts`). Both cut a proxy's directory; neither is an authorization rule (a
//! caller that knows an address can still dial it: authorization policies decide who may).

#[cfg(test)]
use crate::names::{CLUSTER_DOMAIN, CLUSTERSET_DOMAIN};

/// A refused visibility value: which entry and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("entry {index} ({entry:?}): {reason}")]
pub struct VisibilityError {
    /// Position in the comma-separated list.
    pub index: usize,
    /// The entry as written.
    pub entry: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

fn entries(value: &str) -> impl Iterator<Item = (usize, &str)> {
    value
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .enumerate()
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Parses an `exportTo` value: `.`, `*`, `~` (nobody else) or namespace names.
pub fn parse_export_to(value: &str) -> Result<Vec<String>, VisibilityError> {
    let mut out = Vec::new();
    for (index, e) in entries(value) {
        if !(e == "." || e == "*" || e == "~" || dns_label(e)) {
            return Err(VisibilityError {
                index,
                entry: e.into(),
                reason: "must be \".\", \"*\", \"~\" or a namespace name",
            });
        }
        out.push(e.to_string());
    }
    Ok(out)
}

/// One `<namespace>/<host>` of an egress host list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressHost {
    /// `.` (the proxy's own), `*`, or a namespace.
    pub namespace: String,
    /// `*`, `*.<suffix>`, or a name.
    pub host: String,
}

/// Parses an egress host list.
pub fn parse_egress_hosts(value: &str) -> Result<Vec<EgressHost>, VisibilityError> {
    let mut out = Vec::new();
    for (index, e) in entries(value) {
        let err = |reason| VisibilityError {
            index,
            entry: e.into(),
            reason,
        };
        let Some((ns, host)) = e.split_once('/') else {
            return Err(err("must be <namespace>/<host>"));
        };
        if !(ns == "." || ns == "*" || dns_label(ns)) {
            return Err(err("namespace must be \".\", \"*\" or a namespace name"));
        }
        let name = host.strip_prefix("*.").unwrap_or(host);
        if host != "*" && (name.is_empty() || !name.split('.').all(dns_label)) {
            return Err(err("host must be \"*\", \"*.<suffix>\" or a DNS name"));
        }
        out.push(EgressHost {
            namespace: ns.to_string(),
            host: host.to_string(),
        });
    }
    Ok(out)
}

/// Whether a Service's name `fqdn` (`<svc>.<ns>.svc.cluster.local` or
/// `...svc.clusterset.local`) in namespace `svc_ns` is among `hosts` for a proxy of
/// `proxy_ns` (an empty list allows every Service).
pub fn egress_allows(hosts: &[EgressHost], fqdn: &str, svc_ns: &str, proxy_ns: &str) -> bool {
    hosts.is_empty()
        || hosts.iter().any(|h| {
            let ns_ok = h.namespace == "*"
                || (h.namespace == "." && svc_ns == proxy_ns)
                || h.namespace == svc_ns;
            ns_ok
                && (h.host == "*"
                    || match h.host.strip_prefix('*') {
                        Some(suffix) => fqdn.ends_with(suffix),
                        None => fqdn == h.host,
                    })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_to_follows_istio() {
        // What each means is the control plane's (`translate::scoped`, `Resource::visible_from`).
        assert_eq!(parse_export_to(".").expect("dot"), ["."]);
        assert_eq!(parse_export_to(" b , c").expect("list"), ["b", "c"]);
        assert_eq!(parse_export_to("~").expect("none"), ["~"]);
        assert!(parse_export_to("").expect("empty").is_empty());
        let e = parse_export_to("., Bad_NS").expect_err("bad");
        assert_eq!((e.index, e.entry.as_str()), (1, "Bad_NS"));
    }

    #[test]
    fn egress_hosts_match_namespace_and_name() {
        let h = parse_egress_hosts(
            "./*, shared/db.shared.svc.cluster.local, *\t/*.mesh.svc.clusterset.local",
        )
        .expect_err("a tab inside an entry is refused");
        assert_eq!(h.index, 2);
        let h =
            parse_egress_hosts("./*, shared/db.shared.svc.cluster.local, */*.svc.clusterset.local")
                .expect("hosts");
        let local = |svc: &str, ns: &str| format!("{svc}.{ns}.{CLUSTER_DOMAIN}");
        assert!(egress_allows(&h, &local("anything", "me"), "me", "me"));
        assert!(egress_allows(&h, &local("db", "shared"), "shared", "me"));
        assert!(!egress_allows(
            &h,
            &local("cache", "shared"),
            "shared",
            "me"
        ));
        // Any clusterset name, but not the cluster-local name of the same Service.
        let set = format!("cache.other.{CLUSTERSET_DOMAIN}");
        assert!(egress_allows(&h, &set, "other", "me"));
        assert!(!egress_allows(&h, &local("cache", "other"), "other", "me"));
        assert!(egress_allows(&[], "x", "y", "z"));
        let e = parse_egress_hosts("nohost").expect_err("no slash");
        assert_eq!(e.reason, "must be <namespace>/<host>");
        assert!(parse_egress_hosts("a/*.").is_err());
        assert!(parse_egress_hosts("A/b").is_err());
    }
}
