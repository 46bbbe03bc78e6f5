//! The mesh CA: a root and this control plane's intermediate, and CSR signing for workloads.
//!
//! Loaded from `--ca-dir` when the four PEM files are there (never overwritten), generated
//! there when none is, refused when only some are. Clusters that federate copy the same
//! `root.pem`/`root.key.pem` and each generates its own intermediate. Leaves are SPIFFE SVIDs:
//! one URI SAN, the proven identity, short-lived (24 h by default, capped).
//!
//! This is the signing core; the `weft.identity.v1` service, caller authentication (join
//! tokens, TokenReview) and the TLS port are the next step.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use weft_proto::SpiffeId;

/// Default leaf lifetime.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest leaf lifetime a caller may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

const FILES: [&str; 4] = [
    "root.pem",
    "root.key.pem",
    "intermediate.pem",
    "intermediate.key.pem",
];

/// Why the CA could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Some files are there, some are not.
    #[error("incomplete CA in {dir}: found {found:?}, missing {missing:?}; refusing to overwrite")]
    Incomplete {
        /// The directory.
        dir: PathBuf,
        /// Files present.
        found: Vec<&'static str>,
        /// Files missing.
        missing: Vec<&'static str>,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A PEM did not parse or a certificate could not be made.
    #[error("{what}: {source}")]
    Cert {
        /// Which item.
        what: String,
        /// The cause.
        source: rcgen::Error,
    },
}

/// Why a CSR was refused. [`SignError::permission_denied`] tells the gRPC code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignError {
    /// Not a valid CSR (bad PEM, bad signature, unsupported extension).
    #[error("CSR does not parse: {0}")]
    Garbage(String),
    /// The CSR asks for another identity than the caller proved.
    #[error("CSR asks for {got:?}, the caller proved {want}")]
    SanMismatch {
        /// The proven identity.
        want: String,
        /// What the CSR asked for.
        got: String,
    },
    /// The CSR has SANs beyond the one SPIFFE URI.
    #[error("CSR must carry exactly one URI SAN (the SPIFFE ID), found {0:?}")]
    Sans(Vec<String>),
    /// The key is not one Weft accepts.
    #[error("weak or unsupported key {0}: use ECDSA P-256/P-384 or Ed25519")]
    WeakKey(String),
    /// The requested lifetime is above the cap.
    #[error("requested TTL {asked:?} is above the cap {cap:?}")]
    TtlTooLong {
        /// Asked.
        asked: Duration,
        /// Cap.
        cap: Duration,
    },
    /// Signing failed.
    #[error("signing failed: {0}")]
    Internal(String),
}

impl SignError {
    /// PERMISSION_DENIED (identity) rather than INVALID_ARGUMENT (request).
    pub fn permission_denied(&self) -> bool {
        matches!(self, SignError::SanMismatch { .. })
    }
}

/// A signed leaf: chain (leaf, intermediate) and the trust bundle.
#[derive(Debug, Clone)]
pub struct Signed {
    /// Leaf then intermediate, PEM.
    pub chain: Vec<String>,
    /// Roots, PEM.
    pub trust_bundle: Vec<String>,
    /// Leaf expiry, seconds since the epoch.
    pub expires_at_unix: i64,
}

/// The CA.
pub struct Ca {
    root_pem: String,
    intermediate_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn cert_err(what: &str) -> impl FnOnce(rcgen::Error) -> CaError + '_ {
    move |source| CaError::Cert {
        what: what.to_string(),
        source,
    }
}

fn ca_params(cn: String, path_len: Option<u8>, years: i64) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = match path_len {
        Some(n) => IsCa::Ca(BasicConstraints::Constrained(n)),
        None => IsCa::Ca(BasicConstraints::Unconstrained),
    };
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + time::Duration::days(365 * years);
    p
}

impl Ca {
    /// Loads the CA from `dir`, or generates it there (or in memory without a dir).
    pub fn load_or_generate(
        dir: Option<&Path>,
        trust_domain: &str,
        cluster: &str,
    ) -> Result<Self, CaError> {
        let Some(dir) = dir else {
            return Self::generate(None, trust_domain, cluster);
        };
        let found: Vec<&'static str> = FILES
            .iter()
            .copied()
            .filter(|f| dir.join(f).exists())
            .collect();
        if found.is_empty() {
            return Self::generate(Some(dir), trust_domain, cluster);
        }
        if found.len() != FILES.len() {
            let missing = FILES
                .iter()
                .copied()
                .filter(|f| !found.contains(f))
                .collect();
            return Err(CaError::Incomplete {
                dir: dir.to_path_buf(),
                found,
                missing,
            });
        }
        let read = |f: &str| {
            let path = dir.join(f);
            std::fs::read_to_string(&path).map_err(|source| CaError::Io { path, source })
        };
        let (root_pem, intermediate_pem) = (read("root.pem")?, read("intermediate.pem")?);
        let key = KeyPair::from_pem(&read("intermediate.key.pem")?)
            .map_err(cert_err("intermediate.key.pem"))?;
        let issuer = Issuer::from_ca_cert_pem(&intermediate_pem, key)
            .map_err(cert_err("intermediate.pem"))?;
        Ok(Ca {
            root_pem,
            intermediate_pem,
            issuer,
        })
    }

    fn generate(dir: Option<&Path>, trust_domain: &str, cluster: &str) -> Result<Self, CaError> {
        let root_key = KeyPair::generate().map_err(cert_err("root key"))?;
        let root_params = ca_params(format!("Weft root CA ({trust_domain})"), None, 10);
        let root = root_params
            .self_signed(&root_key)
            .map_err(cert_err("root certificate"))?;
        let int_key = KeyPair::generate().map_err(cert_err("intermediate key"))?;
        let int_params = ca_params(format!("Weft intermediate CA ({cluster})"), Some(0), 1);
        let root_issuer = Issuer::new(root_params, &root_key);
        let intermediate = int_params
            .signed_by(&int_key, &root_issuer)
            .map_err(cert_err("intermediate certificate"))?;
        let (root_pem, intermediate_pem) = (root.pem(), intermediate.pem());
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            for (f, content) in FILES.iter().zip([
                root_pem.clone(),
                root_key.serialize_pem(),
                intermediate_pem.clone(),
                int_key.serialize_pem(),
            ]) {
                let path = dir.join(f);
                write_private(&path, &content).map_err(|source| CaError::Io { path, source })?;
            }
        }
        let issuer = Issuer::new(int_params, int_key);
        Ok(Ca {
            root_pem,
            intermediate_pem,
            issuer,
        })
    }

    /// The roots a workload must trust.
    pub fn trust_bundle(&self) -> Vec<String> {
        vec![self.root_pem.clone()]
    }

    /// Signs `csr_pem` for `identity` (already proven by the caller) for `ttl` (default 24 h).
    pub fn sign(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<Signed, SignError> {
        let ttl = ttl.unwrap_or(DEFAULT_TTL);
        if ttl > MAX_TTL {
            return Err(SignError::TtlTooLong {
                asked: ttl,
                cap: MAX_TTL,
            });
        }
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| SignError::Garbage(e.to_string()))?;
        let alg = csr.public_key.algorithm();
        if alg != &rcgen::PKCS_ECDSA_P256_SHA256
            && alg != &rcgen::PKCS_ECDSA_P384_SHA384
            && alg != &rcgen::PKCS_ED25519
        {
            return Err(SignError::WeakKey(format!("{alg:?}")));
        }
        let sans: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| match s {
                SanType::URI(u) => u.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        match csr.params.subject_alt_names.as_slice() {
            [SanType::URI(u)] if u.as_str() == identity.to_string() => {}
            [SanType::URI(u)] => {
                return Err(SignError::SanMismatch {
                    want: identity.to_string(),
                    got: u.as_str().to_string(),
                });
            }
            _ => return Err(SignError::Sans(sans)),
        }
        // The CA decides everything but the SAN and the key.
        let now = time::OffsetDateTime::now_utc();
        let p = &mut csr.params;
        p.distinguished_name = DistinguishedName::new();
        p.is_ca = IsCa::ExplicitNoCa;
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + time::Duration::seconds(ttl.as_secs() as i64);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let expires_at_unix = p.not_after.unix_timestamp();
        let leaf = csr
            .signed_by(&self.issuer)
            .map_err(|e| SignError::Internal(e.to_string()))?;
        Ok(Signed {
            chain: vec![leaf.pem(), self.intermediate_pem.clone()],
            trust_bundle: self.trust_bundle(),
            expires_at_unix,
        })
    }
}

/// Writes a file readable by its owner only (keys live here).
fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    opts.open(path)?.write_all(content.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    fn csr(sans: Vec<SanType>) -> String {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.serialize_request(&key).expect("csr").pem().expect("pem")
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().expect("ia5"))
    }

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://cluster.local/ns/default/sa/echo").expect("id")
    }

    #[test]
    fn signs_an_svid_that_chains_to_the_root() {
        let ca = Ca::load_or_generate(None, "cluster.local", "c1").expect("ca");
        let signed = ca
            .sign(
                &csr(vec![uri("spiffe://cluster.local/ns/default/sa/echo")]),
                &id(),
                Some(Duration::from_secs(3600)),
            )
            .expect("signed");
        let pems: Vec<Vec<u8>> = signed
            .chain
            .iter()
            .chain(&signed.trust_bundle)
            .map(|p| {
                ::x509_parser::pem::parse_x509_pem(p.as_bytes())
                    .expect("pem")
                    .1
                    .contents
            })
            .collect();
        let (_, leaf) = X509Certificate::from_der(&pems[0]).expect("leaf");
        let (_, int) = X509Certificate::from_der(&pems[1]).expect("intermediate");
        let (_, root) = X509Certificate::from_der(&pems[2]).expect("root");
        let san = leaf.subject_alternative_name().expect("ext").expect("san");
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI(
                "spiffe://cluster.local/ns/default/sa/echo"
            )]
        );
        assert!(!leaf.is_ca());
        assert!(int.is_ca() && root.is_ca());
        assert_eq!(leaf.issuer(), int.subject());
        assert_eq!(int.issuer(), root.subject());
        leaf.verify_signature(Some(int.public_key()))
            .expect("leaf signed by the intermediate");
        int.verify_signature(Some(root.public_key()))
            .expect("intermediate signed by the root");
        let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert!((3600..=3660 + 60).contains(&life), "{life}");
    }

    #[test]
    fn refuses_with_the_reason() {
        let ca = Ca::load_or_generate(None, "cluster.local", "c1").expect("ca");
        let other = csr(vec![uri("spiffe://cluster.local/ns/default/sa/admin")]);
        let e = ca.sign(&other, &id(), None).expect_err("mismatch");
        assert!(e.permission_denied(), "{e}");
        assert!(e.to_string().contains("sa/admin"), "{e}");
        let extra = csr(vec![
            uri("spiffe://cluster.local/ns/default/sa/echo"),
            SanType::DnsName("evil.example".try_into().expect("dns")),
        ]);
        assert!(matches!(
            ca.sign(&extra, &id(), None),
            Err(SignError::Sans(_))
        ));
        assert!(matches!(
            ca.sign(&csr(vec![]), &id(), None),
            Err(SignError::Sans(_))
        ));
        let good = csr(vec![uri("spiffe://cluster.local/ns/default/sa/echo")]);
        assert!(matches!(
            ca.sign(&good, &id(), Some(MAX_TTL + Duration::from_secs(1))),
            Err(SignError::TtlTooLong { .. })
        ));
        for garbage in [
            "",
            "not a csr",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ] {
            assert!(
                matches!(ca.sign(garbage, &id(), None), Err(SignError::Garbage(_))),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn a_ca_on_disk_is_reused_never_overwritten_and_partial_ones_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first =
            Ca::load_or_generate(Some(dir.path()), "cluster.local", "c1").expect("generated");
        let again = Ca::load_or_generate(Some(dir.path()), "cluster.local", "c1").expect("loaded");
        assert_eq!(first.trust_bundle(), again.trust_bundle(), "the same root");
        // A leaf from the reloaded CA chains to the same intermediate.
        let signed = again
            .sign(
                &csr(vec![uri("spiffe://cluster.local/ns/default/sa/echo")]),
                &id(),
                None,
            )
            .expect("signed");
        assert_eq!(signed.chain[1], first.intermediate_pem);
        std::fs::remove_file(dir.path().join("intermediate.key.pem")).expect("rm");
        let e = Ca::load_or_generate(Some(dir.path()), "cluster.local", "c1")
            .err()
            .expect("refused");
        assert!(
            e.to_string().contains("missing [\"intermediate.key.pem\"]"),
            "{e}"
        );
        assert!(
            dir.path().join("root.pem").exists(),
            "nothing was overwritten"
        );
    }
}
