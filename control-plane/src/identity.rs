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
/// Longest lifetime of an operator's credentials (`operator issue`).
pub const MAX_OPERATOR_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// Extra roots to hand out with every certificate (a root rotation in progress).
pub const TRUST_BUNDLE_FILE: &str = "trust-bundle.pem";

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
    /// The intermediate is another cluster's (roles are bound to the issuing cluster).
    #[error(
        "the CA's intermediate is cluster {found:?}'s, but this control plane is cluster {cluster:?}: make one for it with `weft-control-plane ca intermediate --cluster {cluster}`"
    )]
    OtherCluster {
        /// The intermediate's cluster.
        found: String,
        /// This control plane's.
        cluster: String,
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
    /// Where `trust-bundle.pem` (extra roots, for a root rotation) is looked for.
    dir: Option<PathBuf>,
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
        if found == FILES[..2] {
            // A shared root (federation): this cluster makes its own intermediate under it.
            return Self::intermediate_under_root(dir, cluster, true);
        }
        // The plug-in layout: this cluster's intermediate and the root certificate, with the
        // root key kept offline (`weft-control-plane ca intermediate` made the directory).
        let offline_root = ["root.pem", "intermediate.pem", "intermediate.key.pem"];
        if found.len() != FILES.len() && found != offline_root {
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
            dir: Some(dir.to_path_buf()),
            root_pem,
            intermediate_pem,
            issuer,
        })
    }

    fn generate(dir: Option<&Path>, trust_domain: &str, cluster: &str) -> Result<Self, CaError> {
        let root_key = KeyPair::generate().map_err(cert_err("root key"))?;
        let root_params = ca_params(
            format!("{}{trust_domain})", weft_proto::tls::ROOT_CN_PREFIX),
            None,
            10,
        );
        let root = root_params
            .self_signed(&root_key)
            .map_err(cert_err("root certificate"))?;
        let int_key = KeyPair::generate().map_err(cert_err("intermediate key"))?;
        let int_params = ca_params(weft_proto::tls::intermediate_cn(cluster), Some(0), 1);
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
            dir: dir.map(Path::to_path_buf),
            root_pem,
            intermediate_pem,
            issuer,
        })
    }

    /// Loads only the root from `dir` (`root.pem`, `root.key.pem`, read-only, e.g. a mounted
    /// Secret) and makes an intermediate for this process in memory: each replica of a
    /// control plane signs with its own, all chained to the shared root. `trust-bundle.pem`
    /// is read from `dir` too.
    pub fn under_root(dir: &Path, cluster: &str) -> Result<Self, CaError> {
        let missing: Vec<&'static str> = FILES[..2]
            .iter()
            .copied()
            .filter(|f| !dir.join(f).exists())
            .collect();
        if !missing.is_empty() {
            return Err(CaError::Incomplete {
                dir: dir.to_path_buf(),
                found: FILES[..2]
                    .iter()
                    .copied()
                    .filter(|f| !missing.contains(f))
                    .collect(),
                missing,
            });
        }
        Self::intermediate_under_root(dir, cluster, false)
    }

    /// Makes cluster `cluster`'s CA directory `out` from the root in `root_dir` (`root.pem`,
    /// `root.key.pem`): `root.pem`, a new `intermediate.pem` (path length 0: it signs only
    /// leaves) and `intermediate.key.pem` — no root key. A control plane runs from `out` with
    /// `--ca-dir`, the root key stays where it was (offline). Refuses to overwrite.
    pub fn make_intermediate(root_dir: &Path, cluster: &str, out: &Path) -> Result<(), CaError> {
        let (root_pem, _, int_key, intermediate_pem) = Self::new_intermediate(root_dir, cluster)?;
        std::fs::create_dir_all(out).map_err(|source| CaError::Io {
            path: out.to_path_buf(),
            source,
        })?;
        let files = [
            ("root.pem", root_pem),
            ("intermediate.pem", intermediate_pem),
            ("intermediate.key.pem", int_key.serialize_pem()),
        ];
        if let Some((f, _)) = files.iter().find(|(f, _)| out.join(f).exists()) {
            return Err(CaError::Io {
                path: out.join(f),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "refusing to overwrite a CA file",
                ),
            });
        }
        for (f, content) in files {
            let path = out.join(f);
            write_private(&path, &content).map_err(|source| CaError::Io { path, source })?;
        }
        Ok(())
    }

    /// A new intermediate for `cluster` under the root in `dir`: (root PEM, its params, its
    /// key, its PEM).
    fn new_intermediate(
        dir: &Path,
        cluster: &str,
    ) -> Result<(String, CertificateParams, KeyPair, String), CaError> {
        let read = |f: &str| {
            let path = dir.join(f);
            std::fs::read_to_string(&path).map_err(|source| CaError::Io { path, source })
        };
        let root_pem = read("root.pem")?;
        let root_key =
            KeyPair::from_pem(&read("root.key.pem")?).map_err(cert_err("root.key.pem"))?;
        let root_issuer =
            Issuer::from_ca_cert_pem(&root_pem, root_key).map_err(cert_err("root.pem"))?;
        let int_key = KeyPair::generate().map_err(cert_err("intermediate key"))?;
        let int_params = ca_params(weft_proto::tls::intermediate_cn(cluster), Some(0), 1);
        let intermediate = int_params
            .signed_by(&int_key, &root_issuer)
            .map_err(cert_err("intermediate certificate"))?;
        let intermediate_pem = intermediate.pem();
        Ok((root_pem, int_params, int_key, intermediate_pem))
    }

    /// Makes this cluster's intermediate under the root in `dir`, written there when `write`.
    fn intermediate_under_root(dir: &Path, cluster: &str, write: bool) -> Result<Self, CaError> {
        let (root_pem, int_params, int_key, intermediate_pem) =
            Self::new_intermediate(dir, cluster)?;
        for (f, content) in FILES[2..]
            .iter()
            .zip([intermediate_pem.clone(), int_key.serialize_pem()])
            .filter(|_| write)
        {
            let path = dir.join(f);
            write_private(&path, &content).map_err(|source| CaError::Io { path, source })?;
        }
        tracing::info!(dir = %dir.display(), %cluster, "made this cluster's intermediate CA under the shared root");
        Ok(Ca {
            dir: Some(dir.to_path_buf()),
            root_pem,
            intermediate_pem,
            issuer: Issuer::new(int_params, int_key),
        })
    }

    /// The roots a workload must trust: this CA's root, plus every certificate in
    /// `<ca-dir>/trust-bundle.pem` (read at each call). Rotating a root is: add the new root
    /// there on every cluster, wait for workloads to renew (they now trust both), switch the
    /// CA files to the new root, then drop the old one from the bundle.
    pub fn trust_bundle(&self) -> Vec<String> {
        let mut out = vec![self.root_pem.clone()];
        let extra = self
            .dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.join(TRUST_BUNDLE_FILE)).ok())
            .unwrap_or_default();
        for pem in weft_proto::tls::certificate_pems(&extra) {
            if pem.trim() != self.root_pem.trim() && !out.contains(&pem) {
                out.push(pem);
            }
        }
        out
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Signs with the root itself, from `dir` (`root.pem`, `root.key.pem`): for mesh-wide
    /// operator credentials, offline (`operator issue --ca-dir ROOT_DIR`). Leaves it signs
    /// chain straight to the root.
    pub fn root_signer(dir: &Path) -> Result<Self, CaError> {
        let read = |f: &str| {
            let path = dir.join(f);
            std::fs::read_to_string(&path).map_err(|source| CaError::Io { path, source })
        };
        let root_pem = read("root.pem")?;
        let key = KeyPair::from_pem(&read("root.key.pem")?).map_err(cert_err("root.key.pem"))?;
        let issuer = Issuer::from_ca_cert_pem(&root_pem, key).map_err(cert_err("root.pem"))?;
        Ok(Ca {
            dir: None,
            root_pem,
            intermediate_pem: String::new(),
            issuer,
        })
    }

    /// Refuses an intermediate made for another cluster than `cluster`.
    pub fn check_cluster(&self, cluster: &str) -> Result<(), CaError> {
        let found = weft_proto::tls::describe(std::slice::from_ref(&self.intermediate_pem))
            .first()
            .and_then(|c| {
                c.subject
                    .split("CN=")
                    .nth(1)
                    .and_then(|cn| cn.strip_prefix("Weft intermediate CA ("))
                    .and_then(|rest| rest.split(')').next())
                    .map(str::to_string)
            });
        match found {
            Some(found) if found != cluster => Err(CaError::OtherCluster {
                found,
                cluster: cluster.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// When the first of the root and this control plane's intermediate expires (seconds since
    /// the epoch): every SVID it signs must end before then.
    pub fn expires_at_unix(&self) -> Option<i64> {
        weft_proto::tls::describe(&[self.root_pem.clone(), self.intermediate_pem.clone()])
            .iter()
            .map(|c| c.not_after_unix)
            .min()
    }

    /// Signs `csr_pem` for `identity` (already proven by the caller) for `ttl` (default 24 h).
    pub fn sign(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<Signed, SignError> {
        self.sign_with_dns(csr_pem, identity, ttl, None)
    }

    /// Signs a control plane's own certificate: as [`Ca::sign`], plus the DNS SAN naming its
    /// cluster ([`weft_proto::tls::control_plane_dns_name`]), which federation checks. Only the
    /// control plane calls this for itself; CSRs from outside never get a DNS name.
    pub fn sign_control_plane(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        ttl: Option<Duration>,
        cluster: &str,
    ) -> Result<Signed, SignError> {
        let dns = weft_proto::tls::control_plane_dns_name(cluster);
        self.sign_with_dns(csr_pem, identity, ttl, Some(&dns))
    }

    /// Makes credentials for operator `name` (`weftctl`): a fresh key and a certificate for
    /// `spiffe://<td>/ns/weft-system/sa/weft-operator` with the operator DNS SAN, which only
    /// this call puts there. Offline (`operator issue`), at install, or for the demo.
    pub fn issue_operator(
        &self,
        trust_domain: &str,
        name: &str,
        ttl: Duration,
    ) -> Result<weft_proto::credentials::Credentials, SignError> {
        weft_proto::spiffe::validate_dns_subdomain("operator name", name)
            .map_err(|e| SignError::Internal(e.to_string()))?;
        if ttl > MAX_OPERATOR_TTL {
            return Err(SignError::TtlTooLong {
                asked: ttl,
                cap: MAX_OPERATOR_TTL,
            });
        }
        let id = SpiffeId::new(
            trust_domain,
            weft_proto::keys::CONTROL_PLANE_NAMESPACE,
            weft_proto::keys::OPERATOR_SERVICE_ACCOUNT,
        )
        .map_err(|e| SignError::Internal(e.to_string()))?;
        let (csr, key) = weft_proto::tls::new_csr(&id.to_string())
            .map_err(|e| SignError::Internal(e.to_string()))?;
        let dns = weft_proto::tls::operator_dns_name(name);
        let signed = self.sign_capped(&csr, &id, ttl, MAX_OPERATOR_TTL, Some(&dns))?;
        Ok(weft_proto::credentials::Credentials {
            chain: signed.chain,
            key,
            roots: signed.trust_bundle,
        })
    }

    fn sign_with_dns(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        ttl: Option<Duration>,
        dns: Option<&str>,
    ) -> Result<Signed, SignError> {
        self.sign_capped(csr_pem, identity, ttl.unwrap_or(DEFAULT_TTL), MAX_TTL, dns)
    }

    fn sign_capped(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        ttl: Duration,
        cap: Duration,
        dns: Option<&str>,
    ) -> Result<Signed, SignError> {
        if ttl > cap {
            return Err(SignError::TtlTooLong { asked: ttl, cap });
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
        // A random 128-bit serial (its top bit clear: positive in DER), never derived from
        // the key, so two certificates for one key are told apart and serials cannot be guessed.
        let mut serial = token::random_bytes::<16>();
        serial[0] &= 0x7f;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
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
        if let Some(dns) = dns {
            let name = dns
                .to_string()
                .try_into()
                .map_err(|e: rcgen::Error| SignError::Internal(e.to_string()))?;
            p.subject_alt_names.push(SanType::DnsName(name));
        }
        let expires_at_unix = p.not_after.unix_timestamp();
        let leaf = csr
            .signed_by(&self.issuer)
            .map_err(|e| SignError::Internal(e.to_string()))?;
        let mut chain = vec![leaf.pem()];
        if !self.intermediate_pem.is_empty() {
            chain.push(self.intermediate_pem.clone());
        }
        Ok(Signed {
            chain,
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

    #[test]
    fn a_ca_directory_made_for_another_cluster_is_refused() {
        let ca = Ca::load_or_generate(None, "cluster.local", "east").expect("CA");
        ca.check_cluster("east").expect("its own cluster");
        let err = ca.check_cluster("west").expect_err("another cluster");
        assert!(err.to_string().contains("cluster \"east\"'s"), "{err}");
    }
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

    /// Serials are random, not derived from the key: one CSR signed twice gets two serials of
    /// at least 64 random bits.
    #[test]
    fn serials_are_random() {
        let ca = Ca::load_or_generate(None, "cluster.local", "c1").expect("ca");
        let req = csr(vec![uri("spiffe://cluster.local/ns/default/sa/echo")]);
        let serial = |pem: &str| {
            let der = ::x509_parser::pem::parse_x509_pem(pem.as_bytes())
                .expect("pem")
                .1
                .contents;
            let (_, c) = X509Certificate::from_der(&der).expect("cert");
            c.raw_serial().to_vec()
        };
        let a = serial(&ca.sign(&req, &id(), None).expect("signed").chain[0]);
        let b = serial(&ca.sign(&req, &id(), None).expect("signed").chain[0]);
        assert_ne!(a, b, "the same key got the same serial twice");
        assert!(a.len() >= 8, "{a:?}");
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
    fn a_read_only_root_gives_an_in_memory_intermediate_per_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let full = Ca::load_or_generate(Some(dir.path()), "cluster.local", "east").expect("CA");
        let root_only = tempfile::tempdir().expect("tempdir");
        for f in ["root.pem", "root.key.pem"] {
            std::fs::copy(dir.path().join(f), root_only.path().join(f)).expect("copy");
        }
        let a = Ca::under_root(root_only.path(), "east").expect("replica a");
        let b = Ca::under_root(root_only.path(), "east").expect("replica b");
        assert_eq!(a.root_pem(), full.root_pem(), "the shared root");
        assert_ne!(
            a.intermediate_pem, b.intermediate_pem,
            "one intermediate per process"
        );
        let files: Vec<_> = std::fs::read_dir(root_only.path())
            .expect("dir")
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(
            files.len(),
            2,
            "nothing written next to a read-only root: {files:?}"
        );
        std::fs::remove_file(root_only.path().join("root.key.pem")).expect("rm");
        let e = Ca::under_root(root_only.path(), "east")
            .err()
            .expect("no key");
        assert!(e.to_string().contains("root.key.pem"), "{e}");
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

/// Join tokens: the proof of identity outside Kubernetes. A token binds one SPIFFE ID until
/// an expiry, under a random id (what makes it single-use and revocable, see
/// [`crate::ledger`]), authenticated with HMAC-SHA256 under a key only the control plane
/// holds, for one cluster: `wj2.<hex(namespace/service-account/expiry/id/cluster)>.<hex(mac)>`.
pub mod token {
    use std::time::{SystemTime, UNIX_EPOCH};

    use ring::hmac;
    use weft_proto::SpiffeId;

    /// Why a token was refused (all PERMISSION_DENIED: the caller did not prove who it is).
    #[derive(Debug, thiserror::Error, PartialEq, Eq)]
    pub enum TokenError {
        /// No token at all.
        #[error("no credential: send a join token")]
        Missing,
        /// Not a Weft join token.
        #[error("malformed join token")]
        Malformed,
        /// The MAC does not verify (another control plane's token, or tampered).
        #[error("join token signature does not verify")]
        BadSignature,
        /// Past its expiry.
        #[error("join token expired at {0} (unix seconds)")]
        Expired(i64),
        /// Binds something that is not a valid identity.
        #[error("join token names an invalid identity: {0}")]
        Identity(String),
        /// Names the control plane's own namespace, whose identities no token may prove.
        #[error(
            "identities in namespace {} are never issued from a join token",
            weft_proto::keys::CONTROL_PLANE_NAMESPACE
        )]
        Reserved,
        /// Already redeemed for a certificate (tokens are single-use).
        #[error("join token {0} was already redeemed: join tokens are single-use, mint a new one")]
        Redeemed(String),
        /// Revoked by an operator.
        #[error("join token {0} was revoked")]
        Revoked(String),
        /// Minted for another cluster's control plane (tokens are bound to one cluster).
        #[error("join token was minted for cluster {minted_for:?}, this is cluster {here:?}")]
        OtherCluster {
            /// The cluster it names.
            minted_for: String,
            /// This control plane's.
            here: String,
        },
        /// Whether it was redeemed cannot be decided now (the shared ledger is unreachable).
        #[error("join token not redeemable now: {0}")]
        Unavailable(String),
        /// The old format, without an id (so it could not be single-use).
        #[error(
            "join token format wj1 is no longer accepted (it carries no id, so it could not be single-use): mint a new one"
        )]
        Outdated,
        /// Lives longer than the control plane allows (`--max-join-token-ttl`).
        #[error(
            "join token lives {asked}s, more than the {cap}s this control plane allows (--max-join-token-ttl)"
        )]
        TtlTooLong {
            /// Seconds asked for (or left, for a presented token).
            asked: u64,
            /// The cap.
            cap: u64,
        },
    }

    /// Default cap on a join token's lifetime (`--max-join-token-ttl`).
    pub const DEFAULT_MAX_TTL_SECS: u64 = 24 * 3600;

    fn now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default()
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn unhex(s: &str) -> Option<Vec<u8>> {
        if !s.len().is_multiple_of(2) {
            return None;
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
            .collect()
    }

    /// What a valid token says.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Claims {
        /// The identity it proves.
        pub identity: SpiffeId,
        /// Its id (32 hex digits).
        pub id: String,
        /// Its expiry, seconds since the epoch.
        pub expires_at_unix: i64,
    }

    /// Whether `id` has the shape of a token id (what revocation accepts).
    pub fn valid_id(id: &str) -> bool {
        id.len() == 32
            && id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    }

    /// Mints and checks tokens under one key.
    pub struct TokenKey {
        key: hmac::Key,
        trust_domain: String,
        max_ttl_secs: u64,
        cluster: String,
    }

    impl TokenKey {
        /// A key from 32 secret bytes.
        pub fn new(secret: &[u8], trust_domain: &str) -> Self {
            TokenKey {
                key: hmac::Key::new(hmac::HMAC_SHA256, secret),
                trust_domain: trust_domain.into(),
                max_ttl_secs: DEFAULT_MAX_TTL_SECS,
                cluster: String::new(),
            }
        }

        /// The same key for cluster `cluster`: its tokens name it, and tokens naming another
        /// cluster are refused (two clusters sharing a key still cannot use each other's).
        pub fn with_cluster(mut self, cluster: &str) -> Self {
            self.cluster = cluster.into();
            self
        }

        /// The same key with another lifetime cap: longer tokens are neither minted nor
        /// accepted (a token made elsewhere with the key, or before the cap was lowered).
        pub fn with_max_ttl(mut self, secs: u64) -> Self {
            self.max_ttl_secs = secs;
            self
        }

        /// The lifetime cap, seconds.
        pub fn max_ttl_secs(&self) -> u64 {
            self.max_ttl_secs
        }

        fn reserved(namespace: &str) -> bool {
            namespace == weft_proto::keys::CONTROL_PLANE_NAMESPACE
        }

        /// A random key (the control plane's own, when it has no CA directory).
        pub fn random(trust_domain: &str) -> Self {
            let secret: [u8; 32] = rand_bytes();
            Self::new(&secret, trust_domain)
        }

        /// A token for `namespace`/`service_account` valid for `ttl_secs`: (token, identity,
        /// expiry).
        pub fn mint(
            &self,
            namespace: &str,
            service_account: &str,
            ttl_secs: u64,
        ) -> Result<(String, SpiffeId, i64), TokenError> {
            self.mint_claims(namespace, service_account, ttl_secs)
                .map(|(t, c)| (t, c.identity, c.expires_at_unix))
        }

        /// As [`TokenKey::mint`], with everything the token says.
        pub fn mint_claims(
            &self,
            namespace: &str,
            service_account: &str,
            ttl_secs: u64,
        ) -> Result<(String, Claims), TokenError> {
            let id = SpiffeId::new(&self.trust_domain, namespace, service_account)
                .map_err(|e| TokenError::Identity(e.to_string()))?;
            if Self::reserved(namespace) {
                return Err(TokenError::Reserved);
            }
            if ttl_secs > self.max_ttl_secs {
                return Err(TokenError::TtlTooLong {
                    asked: ttl_secs,
                    cap: self.max_ttl_secs,
                });
            }
            let exp = now() + ttl_secs as i64;
            let token_id = hex(&rand_bytes::<16>());
            let payload = format!(
                "{namespace}/{service_account}/{exp}/{token_id}/{}",
                self.cluster
            );
            let mac = hmac::sign(&self.key, payload.as_bytes());
            Ok((
                format!("wj2.{}.{}", hex(payload.as_bytes()), hex(mac.as_ref())),
                Claims {
                    identity: id,
                    id: token_id,
                    expires_at_unix: exp,
                },
            ))
        }

        /// The identity a token proves.
        pub fn verify(&self, token: &str) -> Result<SpiffeId, TokenError> {
            self.verify_claims(token).map(|c| c.identity)
        }

        /// Everything a valid token says (whether it was redeemed is the ledger's question).
        pub fn verify_claims(&self, token: &str) -> Result<Claims, TokenError> {
            if token.is_empty() {
                return Err(TokenError::Missing);
            }
            if token.starts_with("wj1.") {
                return Err(TokenError::Outdated);
            }
            let mut parts = token.split('.');
            let (Some("wj2"), Some(p), Some(m), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(TokenError::Malformed);
            };
            let (payload, mac) = (
                unhex(p).ok_or(TokenError::Malformed)?,
                unhex(m).ok_or(TokenError::Malformed)?,
            );
            hmac::verify(&self.key, &payload, &mac).map_err(|_| TokenError::BadSignature)?;
            let payload = String::from_utf8(payload).map_err(|_| TokenError::Malformed)?;
            let mut f = payload.split('/');
            let (Some(ns), Some(sa), Some(exp), Some(token_id), Some(cluster), None) =
                (f.next(), f.next(), f.next(), f.next(), f.next(), f.next())
            else {
                return Err(TokenError::Malformed);
            };
            if !valid_id(token_id) {
                return Err(TokenError::Malformed);
            }
            if cluster != self.cluster {
                return Err(TokenError::OtherCluster {
                    minted_for: cluster.into(),
                    here: self.cluster.clone(),
                });
            }
            let exp: i64 = exp.parse().map_err(|_| TokenError::Malformed)?;
            let now = now();
            if exp <= now {
                return Err(TokenError::Expired(exp));
            }
            let left = (exp - now) as u64;
            if left > self.max_ttl_secs {
                return Err(TokenError::TtlTooLong {
                    asked: left,
                    cap: self.max_ttl_secs,
                });
            }
            if Self::reserved(ns) {
                return Err(TokenError::Reserved);
            }
            Ok(Claims {
                identity: SpiffeId::new(&self.trust_domain, ns, sa)
                    .map_err(|e| TokenError::Identity(e.to_string()))?,
                id: token_id.to_string(),
                expires_at_unix: exp,
            })
        }
    }

    /// `N` bytes from the OS's secure random source (aborts if it fails: a CA must not go on
    /// with predictable bytes).
    pub fn random_bytes<const N: usize>() -> [u8; N] {
        rand_bytes()
    }

    fn rand_bytes<const N: usize>() -> [u8; N] {
        use ring::rand::SecureRandom;
        let mut b = [0u8; N];
        if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
            // The OS RNG failing is not recoverable for a CA; refuse to mint predictable keys.
            std::process::abort();
        }
        b
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn tokens_prove_exactly_their_identity() {
            let k = TokenKey::new(&[7; 32], "cluster.local");
            let (t, id, _) = k.mint("default", "echo", 60).expect("mint");
            assert_eq!(k.verify(&t), Ok(id));
            let other = TokenKey::new(&[8; 32], "cluster.local");
            // The same key for another cluster: refused, naming both.
            let (east, _, _) = TokenKey::new(&[7; 32], "cluster.local")
                .with_cluster("east")
                .mint("default", "echo", 60)
                .expect("mint");
            let west = TokenKey::new(&[7; 32], "cluster.local").with_cluster("west");
            assert!(
                matches!(west.verify(&east), Err(TokenError::OtherCluster { ref minted_for, .. }) if minted_for == "east")
            );
            assert_eq!(other.verify(&t), Err(TokenError::BadSignature));
            let mut tampered = t.clone();
            tampered.replace_range(4..6, "00");
            assert!(matches!(
                k.verify(&tampered),
                Err(TokenError::BadSignature | TokenError::Malformed)
            ));
            assert_eq!(k.verify(""), Err(TokenError::Missing));
            assert_eq!(k.verify("garbage"), Err(TokenError::Malformed));
            let (expired, _, exp) = k.mint("default", "echo", 0).expect("mint");
            assert_eq!(k.verify(&expired), Err(TokenError::Expired(exp)));
            assert!(matches!(
                k.mint("Bad NS", "echo", 60),
                Err(TokenError::Identity(_))
            ));
        }

        /// Nothing in the control plane's namespace comes from a join token, whoever holds
        /// the key; and no token outlives the cap, also one minted before the cap was lowered.
        #[test]
        fn reserved_identities_and_long_lives_are_refused() {
            let k = TokenKey::new(&[7; 32], "cluster.local");
            assert_eq!(
                k.mint("weft-system", "weft-control-plane", 60),
                Err(TokenError::Reserved)
            );
            assert!(matches!(
                k.mint("default", "echo", 10 * 365 * 86_400),
                Err(TokenError::TtlTooLong { .. })
            ));
            // Made by hand with the key: the MAC verifies, the namespace does not.
            let forged = {
                let payload = format!(
                    "weft-system/weft-control-plane/{}/{}/",
                    now() + 60,
                    "0".repeat(32)
                );
                let mac = hmac::sign(&k.key, payload.as_bytes());
                format!("wj2.{}.{}", hex(payload.as_bytes()), hex(mac.as_ref()))
            };
            assert_eq!(k.verify(&forged), Err(TokenError::Reserved));
            let generous = TokenKey::new(&[7; 32], "cluster.local").with_max_ttl(20 * 365 * 86_400);
            let (ten_years, _, _) = generous
                .mint("default", "echo", 10 * 365 * 86_400)
                .expect("mint");
            assert!(matches!(
                k.verify(&ten_years),
                Err(TokenError::TtlTooLong { .. })
            ));
        }
    }
}

/// `weft.identity.v1.CertificateService`: a caller proves who it is and gets an SVID for
/// exactly that identity. Proof is a join token, a Kubernetes service-account token checked
/// with TokenReview (`--token-review`), or — to renew — the caller's current SVID
/// presented as its client certificate on the TLS port (then no token is needed, so join
/// tokens can be short-lived bootstrap credentials).
pub struct CertificateService {
    /// The CA.
    pub ca: std::sync::Arc<Ca>,
    /// The join-token key.
    pub tokens: std::sync::Arc<token::TokenKey>,
    /// Kubernetes service-account tokens, when `--token-review` is on.
    pub reviewer: Option<std::sync::Arc<crate::token_review::TokenReviewer>>,
    /// Issue and refusal counters.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// The last certificate issued to each proxy.
    pub issued: std::sync::Arc<IssuedCerts>,
    /// Redeemed and revoked join tokens.
    pub ledger: std::sync::Arc<crate::ledger::Ledger>,
}

/// A certificate issued to a proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// When it was issued, seconds since the epoch.
    pub issued_at_unix: i64,
    /// Expiry, seconds since the epoch.
    pub not_after_unix: i64,
}

impl IssuedCert {
    /// Whether less than a quarter of its life is left at `now`: sidecars renew at about half
    /// life, so such a proxy has stopped renewing.
    pub fn near_expiry(&self, now_unix: i64) -> bool {
        let life = (self.not_after_unix - self.issued_at_unix).max(1);
        (self.not_after_unix - now_unix) * 4 < life
    }
}

/// The last certificate issued to each proxy (by node id), kept in memory.
#[derive(Default)]
pub struct IssuedCerts(std::sync::Mutex<std::collections::BTreeMap<String, IssuedCert>>);

/// Most proxies remembered; past it, expired records are dropped first.
pub const MAX_ISSUED_RECORDS: usize = 200_000;

impl IssuedCerts {
    /// Records the certificate issued to `node_id`.
    pub fn record(&self, node_id: &str, cert: IssuedCert) {
        let mut m = crate::lock(&self.0);
        if m.len() >= MAX_ISSUED_RECORDS && !m.contains_key(node_id) {
            let now = now_unix();
            m.retain(|_, c| c.not_after_unix > now);
            if m.len() >= MAX_ISSUED_RECORDS {
                return;
            }
        }
        m.insert(node_id.to_string(), cert);
    }

    /// The last certificate issued to `node_id`.
    pub fn get(&self, node_id: &str) -> Option<IssuedCert> {
        crate::lock(&self.0).get(node_id).cloned()
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl CertificateService {
    fn refuse(&self, status: tonic::Status) -> tonic::Status {
        let code = format!("{:?}", status.code());
        self.metrics
            .certificate_refusals
            .get_or_create(&vec![("code".into(), code)])
            .inc();
        status
    }
}

#[tonic::async_trait]
impl weft_proto::identity::certificate_service_server::CertificateService for CertificateService {
    async fn sign(
        &self,
        req: tonic::Request<weft_proto::identity::SignRequest>,
    ) -> Result<tonic::Response<weft_proto::identity::SignResponse>, tonic::Status> {
        let peer = crate::grpc_tls::peer_identity(&req);
        let req = req.into_inner();
        let is_join_token = req.token.starts_with("wj1.") || req.token.starts_with("wj2.");
        let mut join_token = None;
        let identity = match (req.token.is_empty(), peer, &self.reviewer) {
            (true, Some(current), _) => current,
            (false, _, Some(reviewer)) if !is_join_token => {
                reviewer.review(&req.token).await.map_err(|e| {
                    tracing::info!(error = %e, "certificate request refused: service-account token");
                    self.refuse(if e.is_unavailable() {
                        tonic::Status::unavailable(e.to_string())
                    } else {
                        tonic::Status::permission_denied(e.to_string())
                    })
                })?
            }
            _ => {
                let claims = self.tokens.verify_claims(&req.token).map_err(|e| {
                    tracing::info!(error = %e, "certificate request refused: no valid credential");
                    self.refuse(tonic::Status::permission_denied(e.to_string()))
                })?;
                join_token = Some((claims.id, claims.expires_at_unix));
                claims.identity
            }
        };
        // The control plane's namespace is never proven by a token (join or service account):
        // its identities are the control plane's own, which sidecars trust as their xDS server.
        if !req.token.is_empty()
            && identity.namespace() == weft_proto::keys::CONTROL_PLANE_NAMESPACE
        {
            tracing::warn!(%identity, "certificate request refused: a token may not prove an identity in the control plane's namespace");
            return Err(self.refuse(tonic::Status::permission_denied(format!(
                "{identity}: identities in namespace {} are never issued from a token",
                weft_proto::keys::CONTROL_PLANE_NAMESPACE
            ))));
        }
        // A join token is good once: redeemed (and persisted) before signing, given back only
        // if no certificate comes of it.
        if let Some((id, exp)) = &join_token {
            self.ledger.redeem_everywhere(id, *exp).await.map_err(|e| {
                tracing::warn!(%identity, token = %id, error = %e, "certificate request refused: join token not redeemable");
                self.refuse(match e {
                    token::TokenError::Unavailable(_) => tonic::Status::unavailable(e.to_string()),
                    _ => tonic::Status::permission_denied(e.to_string()),
                })
            })?;
        }
        let ttl =
            (req.requested_ttl_seconds > 0).then(|| Duration::from_secs(req.requested_ttl_seconds));
        let signed = self.ca.sign(&req.csr_pem, &identity, ttl).map_err(|e| {
            if let Some((id, _)) = &join_token {
                self.ledger.unredeem(id);
            }
            tracing::warn!(%identity, error = %e, "CSR refused");
            self.refuse(if e.permission_denied() {
                tonic::Status::permission_denied(e.to_string())
            } else {
                tonic::Status::invalid_argument(e.to_string())
            })
        })?;
        self.metrics.certificates_issued.inc();
        if !req.node_id.is_empty() && req.node_id.len() <= 253 {
            self.issued.record(
                &req.node_id,
                IssuedCert {
                    spiffe_id: identity.to_string(),
                    issued_at_unix: now_unix(),
                    not_after_unix: signed.expires_at_unix,
                },
            );
        }
        tracing::info!(%identity, expires_at = signed.expires_at_unix, "SVID issued");
        Ok(tonic::Response::new(weft_proto::identity::SignResponse {
            cert_chain_pem: signed.chain,
            trust_bundle_pem: signed.trust_bundle,
            expires_at_unix: signed.expires_at_unix,
            spiffe_id: identity.to_string(),
        }))
    }
}

/// The join-token key kept in the CA directory (`token.key`, hex), made there once; a random
/// in-memory key without a directory.
pub fn token_key(dir: Option<&Path>, trust_domain: &str) -> Result<token::TokenKey, CaError> {
    let Some(dir) = dir else {
        return Ok(token::TokenKey::random(trust_domain));
    };
    let path = dir.join("token.key");
    if !path.exists() {
        let secret: String = (0..32).map(|_| format!("{:02x}", rand_byte())).collect();
        std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        write_private(&path, &secret).map_err(|source| CaError::Io {
            path: path.clone(),
            source,
        })?;
    }
    let hex = std::fs::read_to_string(&path).map_err(|source| CaError::Io {
        path: path.clone(),
        source,
    })?;
    let bytes: Vec<u8> = (0..hex.trim().len() / 2)
        .filter_map(|i| u8::from_str_radix(hex.trim().get(i * 2..i * 2 + 2)?, 16).ok())
        .collect();
    if bytes.len() < 32 {
        return Err(CaError::Io {
            path,
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "token.key must hold 32 hex-encoded bytes",
            ),
        });
    }
    Ok(token::TokenKey::new(&bytes, trust_domain))
}

fn rand_byte() -> u8 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 1];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        std::process::abort();
    }
    b[0]
}
