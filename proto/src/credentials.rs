//! An operator's credentials file: one PEM file holding the operator's certificate chain
//! (leaf first), its private key and the mesh's root(s) — what `weftctl` presents to the
//! control plane's TLS port and how it recognises the control plane. Made offline by
//! `weft-control-plane operator issue`, by `weftctl install`, or by `weftctl demo`.
//! Roots are told from the chain by being self-signed.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::tls::{self, rustls};

/// Why a credentials file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// It could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Its content is not what a credentials file holds.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Parsed credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// Leaf then intermediates, PEM blocks.
    pub chain: Vec<String>,
    /// The leaf's PKCS#8 key, PEM.
    pub key: String,
    /// The mesh's roots, PEM blocks.
    pub roots: Vec<String>,
}

impl Credentials {
    /// The file's text: chain, key, roots.
    pub fn to_pem(&self) -> String {
        let mut out = String::new();
        for block in self.chain.iter().chain([&self.key]).chain(&self.roots) {
            out.push_str(block.trim());
            out.push('\n');
        }
        out
    }

    /// Reads a credentials text (`what` names it in errors).
    pub fn parse(what: &str, pem: &str) -> Result<Self, CredentialsError> {
        let invalid = |message: String| CredentialsError::Invalid {
            path: what.to_string(),
            message,
        };
        let mut creds = Credentials {
            chain: Vec::new(),
            key: String::new(),
            roots: Vec::new(),
        };
        for block in pem_blocks(pem) {
            if block.contains("PRIVATE KEY-----") {
                if !creds.key.is_empty() {
                    return Err(invalid("more than one private key".into()));
                }
                creds.key = block;
                continue;
            }
            let der = CertificateDer::from_pem_slice(block.as_bytes())
                .map_err(|e| invalid(format!("a PEM block is not a certificate: {e}")))?;
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
                .map_err(|e| invalid(format!("a certificate does not parse: {e}")))?;
            match cert.subject() == cert.issuer() {
                true => creds.roots.push(block),
                false => creds.chain.push(block),
            }
        }
        if creds.key.is_empty() {
            return Err(invalid("no private key".into()));
        }
        if creds.chain.is_empty() {
            return Err(invalid("no certificate besides the roots".into()));
        }
        if creds.roots.is_empty() {
            return Err(invalid("no root (self-signed) certificate".into()));
        }
        Ok(creds)
    }

    /// Reads the file at `path`.
    pub fn read(path: &Path) -> Result<Self, CredentialsError> {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Writes the file at `path`, readable by its owner only (it holds a key): a new 0600
    /// file beside it, renamed over it, so an existing file's looser mode or a symlink at
    /// `path` is never written through.
    pub fn write(&self, path: &Path) -> Result<(), CredentialsError> {
        use std::io::Write;
        let io = |source| CredentialsError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut open = std::fs::OpenOptions::new();
        open.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
        let mut f = open.open(&tmp).map_err(io)?;
        f.write_all(self.to_pem().as_bytes()).map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// The operator's name, from its certificate (the DNS SAN only the CA puts there).
    pub fn operator(&self) -> Option<String> {
        let der = CertificateDer::from_pem_slice(self.chain.first()?.as_bytes()).ok()?;
        match tls::role_of(&der) {
            tls::Role::Operator(name, _) => Some(name),
            _ => None,
        }
    }

    /// A client configuration presenting these credentials over HTTP/2 (gRPC), trusting the
    /// roots.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, tls::TlsError> {
        let svid = tls::Svid::from_pem(&self.chain, &self.key)?;
        tls::client_config(Some(&svid), tls::roots(&self.roots)?, &[tls::ALPN_H2])
    }
}

/// The PEM blocks of `text`, each from its BEGIN line to its END line.
fn pem_blocks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if line.starts_with("-----BEGIN ") {
            cur = Some(String::new());
        }
        if let Some(c) = cur.as_mut() {
            c.push_str(line);
            c.push('\n');
        }
        if line.starts_with("-----END ") {
            out.extend(cur.take());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn writing_never_loosens_the_mode_nor_follows_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("weft-creds-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let creds = Credentials {
            chain: vec!["chain".into()],
            key: "key".into(),
            roots: vec!["root".into()],
        };
        let path = dir.join("creds.pem");
        std::fs::write(&path, "old").expect("old file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        creds.write(&path).expect("write");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A symlink at the path is replaced, its target left alone.
        let target = dir.join("elsewhere");
        std::fs::write(&target, "untouched").expect("target");
        let link = dir.join("link.pem");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        creds.write(&link).expect("write");
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "untouched");
        assert!(
            std::fs::read_to_string(&link)
                .expect("read")
                .contains("key")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
