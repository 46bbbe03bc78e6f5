//! SPIFFE identities of meshed workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Weft issues and accepts only this one shape. The trust domain follows the SPIFFE ID spec
//! (lowercase letters, digits, `.`, `-`, `_`); the namespace is a DNS-1123 label and the service
//! account a DNS-1123 subdomain, as Kubernetes requires of the objects they name.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID accepted, from the SPIFFE ID specification (URI length limit).
pub const MAX_LEN: usize = 2048;
/// Longest trust domain accepted (a DNS name).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A validated SPIFFE ID of a workload: trust domain, namespace, service account.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not a Weft SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The ID does not start with `spiffe://`.
    #[error("SPIFFE ID must start with \"spiffe://\": {0:?}")]
    Scheme(String),
    /// The ID is longer than [`MAX_LEN`] bytes.
    #[error("SPIFFE ID is {0} bytes long, the limit is {MAX_LEN}")]
    TooLong(usize),
    /// The ID contains a character outside printable ASCII.
    #[error("SPIFFE ID must be ASCII, found {0:?}")]
    NonAscii(char),
    /// The path is not exactly `/ns/<ns>/sa/<sa>`.
    #[error("SPIFFE ID path must be /ns/<namespace>/sa/<service-account>, found {0:?}")]
    Path(String),
    /// A segment is empty or breaks its naming rules.
    #[error("invalid {field} {value:?} in SPIFFE ID: {reason}")]
    Segment {
        /// Which segment: `trust domain`, `namespace` or `service account`.
        field: &'static str,
        /// The offending value.
        value: String,
        /// The rule it breaks.
        reason: &'static str,
    },
}

impl SpiffeId {
    /// Builds an ID from its parts, validating each.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, SpiffeIdError> {
        let id = SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        validate_trust_domain(&id.trust_domain)?;
        validate_dns_label("namespace", &id.namespace)?;
        validate_dns_subdomain("service account", &id.service_account)?;
        let len = id.to_string().len();
        if len > MAX_LEN {
            return Err(SpiffeIdError::TooLong(len));
        }
        Ok(id)
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`; anything else is an error.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.len() > MAX_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        if let Some(c) = s.chars().find(|c| !c.is_ascii() || c.is_ascii_control()) {
            return Err(SpiffeIdError::NonAscii(c));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_string()))?;
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] => SpiffeId::new(td, *ns, *sa),
            _ => {
                validate_trust_domain(td)?;
                Err(SpiffeIdError::Path(format!("/{path}")))
            }
        }
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The workload's Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The workload's Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

fn segment_err(field: &'static str, value: &str, reason: &'static str) -> SpiffeIdError {
    SpiffeIdError::Segment {
        field,
        value: value.to_string(),
        reason,
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    const FIELD: &str = "trust domain";
    if td.is_empty() {
        return Err(segment_err(FIELD, td, "must not be empty"));
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(segment_err(FIELD, td, "longer than 255 bytes"));
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(segment_err(
            FIELD,
            td,
            "only lowercase letters, digits, '.', '-' and '_' are allowed (no port, no user info)",
        ));
    }
    Ok(())
}

/// Checks a DNS-1123 label: 1 to 63 of `[a-z0-9-]`, starting and ending alphanumeric.
pub fn validate_dns_label(field: &'static str, v: &str) -> Result<(), SpiffeIdError> {
    if v.is_empty() {
        return Err(segment_err(field, v, "must not be empty"));
    }
    if v.len() > 63 {
        return Err(segment_err(field, v, "longer than 63 characters"));
    }
    let ok_char = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = v.as_bytes();
    if !bytes.iter().all(|b| ok_char(*b)) {
        return Err(segment_err(
            field,
            v,
            "only lowercase letters, digits and '-' are allowed",
        ));
    }
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(segment_err(
            field,
            v,
            "must start and end with a letter or digit",
        ));
    }
    Ok(())
}

/// Checks a DNS-1123 subdomain: dot-separated labels, at most 253 characters.
pub fn validate_dns_subdomain(field: &'static str, v: &str) -> Result<(), SpiffeIdError> {
    if v.len() > 253 {
        return Err(segment_err(field, v, "longer than 253 characters"));
    }
    if v.is_empty() {
        return Err(segment_err(field, v, "must not be empty"));
    }
    for label in v.split('.') {
        validate_dns_label(field, label).map_err(|_| {
            segment_err(
                field,
                v,
                "must be dot-separated labels of lowercase letters, digits and '-'",
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_round_trip() {
        let s = "spiffe://cluster.local/ns/default/sa/echo-v1";
        let id = SpiffeId::parse(s).expect("valid id");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "echo-v1");
        assert_eq!(id.to_string(), s);
        assert_eq!(s.parse::<SpiffeId>(), Ok(id));
    }

    #[test]
    fn service_account_may_have_dots() {
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b.c").expect("valid");
        assert_eq!(id.service_account(), "b.c");
    }

    #[test]
    fn rejects() {
        let cases: &[(&str, &str)] = &[
            ("http://cluster.local/ns/a/sa/b", "must start with"),
            ("spiffe:/cluster.local/ns/a/sa/b", "must start with"),
            ("SPIFFE://cluster.local/ns/a/sa/b", "must start with"),
            ("spiffe:///ns/a/sa/b", "trust domain \"\""),
            ("spiffe://Cluster.local/ns/a/sa/b", "invalid trust domain"),
            ("spiffe://td:443/ns/a/sa/b", "invalid trust domain"),
            ("spiffe://td/ns//sa/b", "invalid namespace \"\""),
            ("spiffe://td/ns/a/sa/", "invalid service account \"\""),
            ("spiffe://td/ns/a/sa/b/extra", "path must be"),
            ("spiffe://td/ns/a", "path must be"),
            ("spiffe://td", "path must be"),
            ("spiffe://td/sa/b/ns/a", "path must be"),
            ("spiffe://td/ns/A/sa/b", "invalid namespace"),
            ("spiffe://td/ns/-a/sa/b", "start and end"),
            ("spiffe://td/ns/a/sa/b..c", "dot-separated"),
            ("spiffe://td/ns/é/sa/b", "must be ASCII"),
            ("spiffe://td/ns/a\n/sa/b", "must be ASCII"),
        ];
        for (input, want) in cases {
            let err = SpiffeId::parse(input).expect_err(input).to_string();
            assert!(err.contains(want), "{input:?}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn rejects_over_long() {
        let ns = "a".repeat(64);
        let err = SpiffeId::parse(&format!("spiffe://td/ns/{ns}/sa/b")).expect_err("long ns");
        assert!(err.to_string().contains("longer than 63"), "{err}");
        let whole = format!("spiffe://td/ns/a/sa/{}", "b".repeat(MAX_LEN));
        assert_eq!(
            SpiffeId::parse(&whole),
            Err(SpiffeIdError::TooLong(whole.len()))
        );
        let td = "t".repeat(256);
        let err = SpiffeId::new(td, "a", "b").expect_err("long td");
        assert!(err.to_string().contains("255"), "{err}");
    }
}
