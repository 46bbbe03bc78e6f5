//! How SPIFFE identities travel on the wire: rustls configurations that present a workload's
//! SVID and check a peer's, shared by the control plane (its TLS gRPC port) and the sidecar
//! (mTLS between sidecars, xDS over mTLS). Pure: configurations are built from PEM in memory.
//!
//! SPIFFE certificates carry their identity as one URI SAN and no DNS name, so the usual
//! hostname check does not apply. The client verifier here checks the chain against the trust
//! bundle (which may hold two roots while a root rotates) and that the leaf carries a SPIFFE ID;
//! *which* identity is acceptable is decided per connection after the handshake with
//! [`check_peer`], before a byte of application data is sent. Servers ask for a client
//! certificate and verify its chain; whether one is required is the caller's choice
//! ([`ClientAuth`]).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::SpiffeId;

pub use rustls;

/// ALPN for HTTP/2 (gRPC, and HTTP/2 between sidecars).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN a sidecar offers when it originates mTLS to another sidecar (HTTP/1.1 inside). The
/// receiving sidecar reads it from the ClientHello to tell mesh mTLS, which it terminates,
/// from an application's own TLS, which it passes through untouched.
pub const ALPN_MESH_HTTP1: &[u8] = b"weft-http/1.1";
/// ALPN for mesh mTLS carrying HTTP/2 (to endpoints that speak only HTTP/2: gRPC, h2c); the
/// receiving sidecar serves HTTP/2 and forwards to its application with prior knowledge.
pub const ALPN_MESH_H2: &[u8] = b"weft-h2";
/// ALPN for mesh mTLS carrying opaque TCP (a protocol the sidecars do not speak: databases,
/// server-first protocols); the receiving sidecar judges the connection by its TCP rules with
/// the verified peer and copies the bytes to its application.
pub const ALPN_MESH_TCP: &[u8] = b"weft-tcp";

/// ALPN for the east-west tunnel: mesh mTLS to another network's gateway, carrying one
/// HTTP/1.1 `CONNECT` to an endpoint there, then that endpoint's own end-to-end mesh mTLS
/// (see the sidecar's `tunnel` and `gateway` modules). Only gateways accept it.
pub const ALPN_MESH_TUNNEL: &[u8] = b"weft-tunnel";

/// Whether an ALPN list offers one of the mesh's protocols.
pub fn offers_mesh_alpn(alpn: &[Vec<u8>]) -> bool {
    alpn.iter()
        .any(|p| p == ALPN_MESH_HTTP1 || p == ALPN_MESH_H2 || p == ALPN_MESH_TCP)
}

/// Why a TLS configuration could not be built or a peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM block did not parse.
    #[error("{what}: not valid PEM: {message}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// The parser's message.
        message: String,
    },
    /// An input held nothing usable.
    #[error("{0} is empty")]
    Empty(&'static str),
    /// rustls refused the material.
    #[error("{what}: {source}")]
    Rustls {
        /// What was being built.
        what: &'static str,
        /// The cause.
        source: rustls::Error,
    },
    /// A CSR could not be made.
    #[error("making a CSR: {0}")]
    Csr(String),
    /// The peer presented no certificate.
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    /// The peer's certificate carries no usable SPIFFE ID.
    #[error("the peer's certificate has no SPIFFE ID: {0}")]
    NoSpiffeId(String),
    /// The peer is not who the caller expected.
    #[error("the peer is {got}, expected {expected}")]
    Unexpected {
        /// The peer's identity.
        got: String,
        /// What was acceptable.
        expected: String,
    },
}

/// The process's crypto provider (ring): one per process, shared by every configuration.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::LazyLock<Arc<CryptoProvider>> =
        std::sync::LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));
    PROVIDER.clone()
}

/// A workload's certificate chain and private key, ready for rustls.
#[derive(Debug)]
pub struct Svid {
    /// Leaf then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Svid {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Svid {
    /// Reads a chain (PEM blocks, leaf first) and a PKCS#8 key (PEM).
    pub fn from_pem(chain: &[String], key_pem: &str) -> Result<Self, TlsError> {
        let chain = certs("certificate chain", chain)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::Pem {
            what: "private key",
            message: e.to_string(),
        })?;
        Ok(Svid { chain, key })
    }
}

fn certs(what: &'static str, pems: &[String]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let mut out = Vec::new();
    for pem in pems {
        for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            out.push(c.map_err(|e| TlsError::Pem {
                what,
                message: e.to_string(),
            })?);
        }
    }
    if out.is_empty() {
        return Err(TlsError::Empty(what));
    }
    Ok(out)
}

/// The roots of a trust bundle (PEM blocks; two overlap while a root rotates).
pub fn roots(bundle: &[String]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs("trust bundle", bundle)? {
        store.add(c).map_err(|source| TlsError::Rustls {
            what: "trust bundle",
            source,
        })?;
    }
    Ok(Arc::new(store))
}

/// The SPIFFE ID a certificate carries: its one `spiffe://` URI SAN.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::NoSpiffeId(format!("certificate does not parse: {e}")))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| TlsError::NoSpiffeId(format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| TlsError::NoSpiffeId("no subjectAltName".into()))?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    let (Some(uri), None) = (uris.next(), uris.next()) else {
        return Err(TlsError::NoSpiffeId(
            "exactly one spiffe:// URI SAN is required".into(),
        ));
    };
    SpiffeId::parse(uri).map_err(|e| TlsError::NoSpiffeId(e.to_string()))
}

/// The DNS names a certificate carries (SPIFFE allows them beside the one URI SAN).
pub fn dns_names_of(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, x509)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = x509.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect()
}

/// Suffix of the DNS SAN that names a control plane's cluster in its certificate.
pub const CONTROL_PLANE_DNS_SUFFIX: &str = "control-plane.weft.internal";

/// The DNS SAN that names cluster `cluster`'s control plane. Every control plane has the same
/// SPIFFE ID (sidecars check that); federation tells one cluster's control plane from another's
/// by this name, which only the CA puts there.
pub fn control_plane_dns_name(cluster: &str) -> String {
    format!("{cluster}.{CONTROL_PLANE_DNS_SUFFIX}")
}

/// Suffix of the DNS SAN that marks an operator's certificate (`weftctl`'s credentials).
pub const OPERATOR_DNS_SUFFIX: &str = "operator.weft.internal";

/// The DNS SAN that marks operator `name`'s certificate. Like the control plane's, only the CA
/// puts it there (it refuses CSRs with DNS names), offline or at install.
pub fn operator_dns_name(name: &str) -> String {
    format!("{name}.{OPERATOR_DNS_SUFFIX}")
}

/// The common name of cluster `cluster`'s intermediate CA. Roles are bound to it: a
/// control-plane or operator certificate counts for a cluster only when that cluster's
/// intermediate issued it, so one cluster's intermediate cannot mint powers elsewhere.
pub fn intermediate_cn(cluster: &str) -> String {
    format!("Weft intermediate CA ({cluster})")
}

/// How the common name of a mesh root begins (`Weft root CA (<trust domain>)`).
pub const ROOT_CN_PREFIX: &str = "Weft root CA (";

/// Where an operator certificate counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OperatorScope {
    /// Signed by the mesh root itself (offline): every cluster.
    Mesh,
    /// Signed by cluster `0`'s intermediate: that cluster only.
    Cluster(String),
}

/// What a verified certificate may do, by the names only the CA puts in it and the CA that
/// signed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// A control plane of cluster `0` (its DNS SAN [`control_plane_dns_name`], issued by that
    /// cluster's intermediate).
    ControlPlane(String),
    /// An operator named `0` (its DNS SAN [`operator_dns_name`]), valid where `1` says.
    Operator(String, OperatorScope),
    /// Anything else: a workload SVID (or a role name its issuer may not give).
    Workload,
}

/// The common name of a certificate's issuer, if it has one.
fn issuer_cn(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = x509.issuer().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// The cluster whose intermediate issued a certificate (its issuer's common name is
/// [`intermediate_cn`]): meaningful once the chain was verified, since only the root's holder
/// names intermediates.
pub fn issuing_cluster(cert: &CertificateDer<'_>) -> Option<String> {
    let cn = issuer_cn(cert)?;
    cn.strip_prefix("Weft intermediate CA (")?
        .strip_suffix(')')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
}

/// The role of a certificate whose chain was verified.
pub fn role_of(cert: &CertificateDer<'_>) -> Role {
    let suffixed = |suffix: &str| {
        dns_names_of(cert).into_iter().find_map(|d| {
            d.strip_suffix(suffix)
                .and_then(|c| c.strip_suffix('.'))
                .filter(|c| !c.is_empty())
                .map(str::to_string)
        })
    };
    let issuer = issuer_cn(cert).unwrap_or_default();
    if let Some(c) = suffixed(CONTROL_PLANE_DNS_SUFFIX) {
        return match issuer == intermediate_cn(&c) {
            true => Role::ControlPlane(c),
            false => Role::Workload,
        };
    }
    let Some(name) = suffixed(OPERATOR_DNS_SUFFIX) else {
        return Role::Workload;
    };
    if issuer.starts_with(ROOT_CN_PREFIX) {
        return Role::Operator(name, OperatorScope::Mesh);
    }
    match issuer
        .strip_prefix("Weft intermediate CA (")
        .and_then(|c| c.strip_suffix(')'))
    {
        Some(cluster) if !cluster.is_empty() => {
            Role::Operator(name, OperatorScope::Cluster(cluster.to_string()))
        }
        _ => Role::Workload,
    }
}

/// After a handshake: the peer's SPIFFE ID, which must be one of `expected` (any when empty).
pub fn check_peer(
    peer_certs: Option<&[CertificateDer<'static>]>,
    expected: &[&str],
) -> Result<SpiffeId, TlsError> {
    let leaf = peer_certs
        .and_then(|c| c.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    let id = spiffe_id_of(leaf)?;
    let text = id.to_string();
    if !expected.is_empty() && !expected.iter().any(|e| *e == text) {
        return Err(TlsError::Unexpected {
            got: text,
            expected: expected.join(" or "),
        });
    }
    Ok(id)
}

/// Checks a server's chain against the trust bundle and that its leaf carries a SPIFFE ID;
/// the name the client dialed plays no part (SVIDs have no DNS names).
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        spiffe_id_of(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A client configuration: verifies servers against `bundle`, presents `svid` when given
/// (without one, only servers that do not require a client certificate will talk).
pub fn client_config(
    svid: Option<&Svid>,
    bundle: Arc<RootCertStore>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: bundle,
        algorithms: provider.signature_verification_algorithms,
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "client configuration",
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match svid {
        Some(s) => builder
            .with_client_auth_cert(s.chain.clone(), s.key.clone_key())
            .map_err(|source| TlsError::Rustls {
                what: "client certificate",
                source,
            })?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Whether a server requires clients to present a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// A client without a valid certificate fails the handshake.
    Required,
    /// A client may come without one (it is then anonymous); one it presents must verify.
    Optional,
}

/// A server configuration presenting `svid`, verifying client certificates against `bundle`.
pub fn server_config(
    svid: &Svid,
    bundle: Arc<RootCertStore>,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(bundle, provider.clone());
    let verifier = match client_auth {
        ClientAuth::Required => verifier,
        ClientAuth::Optional => verifier.allow_unauthenticated(),
    }
    .build()
    .map_err(|e| TlsError::Rustls {
        what: "client verifier",
        source: rustls::Error::General(e.to_string()),
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "server configuration",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(svid.chain.clone(), svid.key.clone_key())
        .map_err(|source| TlsError::Rustls {
            what: "server certificate",
            source,
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A fresh ECDSA P-256 key (made in memory) and a CSR for `spiffe_id`: (CSR PEM, key PEM).
pub fn new_csr(spiffe_id: &str) -> Result<(String, String), TlsError> {
    let err = |e: rcgen::Error| TlsError::Csr(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(spiffe_id.try_into().map_err(err)?)];
    let csr = params.serialize_request(&key).map_err(err)?;
    Ok((csr.pem().map_err(err)?, key.serialize_pem()))
}

/// How a namespace's sidecars accept inbound connections (`weft.dev/mtls-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub enum MtlsMode {
    /// Only mTLS from a workload with a valid SVID.
    Strict,
    /// mTLS and plaintext both (the default: lets a namespace migrate without an outage).
    #[default]
    Permissive,
    /// Plaintext only; callers do not originate mTLS to these pods.
    Disable,
}

impl MtlsMode {
    /// Reads the annotation's value.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "STRICT" => Ok(MtlsMode::Strict),
            "PERMISSIVE" => Ok(MtlsMode::Permissive),
            "DISABLE" => Ok(MtlsMode::Disable),
            other => Err(format!(
                "{other:?} is not an mTLS mode: use STRICT, PERMISSIVE or DISABLE"
            )),
        }
    }

    /// The annotation's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
        }
    }
}

/// What a certificate says, for people (`/certs`, `weftctl certs`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertInfo {
    /// Subject DN.
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// Serial number, hex.
    pub serial: String,
    /// The SPIFFE ID it carries, if any.
    pub spiffe_id: Option<String>,
    /// A CA certificate.
    pub is_ca: bool,
    /// Start of validity, seconds since the epoch.
    pub not_before_unix: i64,
    /// End of validity, seconds since the epoch.
    pub not_after_unix: i64,
}

/// The PEM certificates in `text`, one string each (from its BEGIN line, trimmed, ending in
/// a newline); other blocks and text between them are left out.
pub fn certificate_pems(text: &str) -> Vec<String> {
    text.split_inclusive("-----END CERTIFICATE-----")
        .filter_map(|b| b.find("-----BEGIN CERTIFICATE-----").map(|i| &b[i..]))
        .map(|b| format!("{}\n", b.trim()))
        .collect()
}

/// The SHA-256 fingerprint (lowercase hex) of every X.509 certificate in `pem`, in order (PEM
/// blocks that do not parse as one are left out): how
/// operators and tools tell roots apart.
pub fn fingerprints(pem: &str) -> Vec<String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .filter(|der| x509_parser::parse_x509_certificate(der.as_ref()).is_ok())
        .map(|der| {
            ring::digest::digest(&ring::digest::SHA256, der.as_ref())
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
        .collect()
}

/// Describes every certificate in `pems` (PEM blocks), in order; unreadable blocks are skipped.
pub fn describe(pems: &[String]) -> Vec<CertInfo> {
    let Ok(ders) = certs("certificates", pems) else {
        return Vec::new();
    };
    ders.iter()
        .filter_map(|der| {
            let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
            Some(CertInfo {
                subject: c.subject().to_string(),
                issuer: c.issuer().to_string(),
                serial: c.raw_serial_as_string(),
                spiffe_id: spiffe_id_of(der).ok().map(|id| id.to_string()),
                is_ca: c.is_ca(),
                not_before_unix: c.validity().not_before.timestamp(),
                not_after_unix: c.validity().not_after.timestamp(),
            })
        })
        .collect()
}

/// Whether the first bytes of a connection are a TLS handshake record (a ClientHello):
/// content type 22, protocol major version 3.
pub fn looks_like_tls(first: &[u8]) -> bool {
    first.len() >= 2 && first[0] == 0x16 && first[1] == 0x03
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_sniffing() {
        assert!(looks_like_tls(&[0x16, 0x03, 0x01, 0x02]));
        assert!(!looks_like_tls(b"GET / HTTP/1.1"));
        assert!(!looks_like_tls(b"PRI * HTTP/2.0"));
        assert!(!looks_like_tls(&[0x16]));
    }

    #[test]
    fn bad_pem_is_refused_with_what() {
        let e = roots(&["not a pem".into()]).err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("trust bundle is empty"));
        let e = Svid::from_pem(&["x".into()], "y")
            .err()
            .map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("certificate chain is empty"));
        assert!(matches!(
            check_peer(None, &[]),
            Err(TlsError::NoPeerCertificate)
        ));
    }
}
