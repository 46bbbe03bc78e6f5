//! The join-token ledger: which tokens were redeemed (join tokens are single-use) and which
//! an operator revoked. Entries live until their token would have expired anyway. With
//! `--state-dir` the ledger is `join-tokens.json` there, written (to a temporary file, then
//! renamed) before a certificate is handed out, so a restart does not make a redeemed token
//! good again. Each replica keeps its own ledger (see SECURITY.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::identity::token::TokenError;

/// The ledger's file in `--state-dir`.
pub const FILE: &str = "join-tokens.json";

/// Most entries of each kind; past it, new redemptions are refused (fail closed) until old
/// entries expire.
pub const MAX_ENTRIES: usize = 1_000_000;

/// Why the ledger could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a ledger.
    #[error("{path}: not a join-token ledger: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct State {
    /// Token id -> its expiry (unix seconds).
    redeemed: BTreeMap<String, i64>,
    /// Token id -> when the entry may go (unix seconds).
    revoked: BTreeMap<String, i64>,
}

/// Redeemed and revoked join tokens.
pub struct Ledger {
    path: Option<PathBuf>,
    state: Mutex<State>,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Ledger {
    /// The ledger in `state_dir` (created when absent), or in memory without one. A file that
    /// does not parse is an error: starting with an empty ledger would make every redeemed
    /// token good again.
    pub fn open(state_dir: Option<&Path>) -> Result<Self, LedgerError> {
        let Some(dir) = state_dir else {
            return Ok(Ledger {
                path: None,
                state: Mutex::default(),
            });
        };
        let path = dir.join(FILE);
        let state = match crate::state_file::read(&path) {
            Ok(s) => s.unwrap_or_default(),
            Err(crate::state_file::ReadError::Io(source)) => {
                return Err(LedgerError::Io { path, source });
            }
            Err(e) => {
                return Err(LedgerError::Corrupt {
                    path,
                    message: e.to_string(),
                });
            }
        };
        Ok(Ledger {
            path: Some(path),
            state: Mutex::new(state),
        })
    }

    /// Marks token `id` (expiring at `expires_at_unix`) redeemed, or says why it cannot be.
    /// Persisted before it returns.
    pub fn redeem(&self, id: &str, expires_at_unix: i64) -> Result<(), TokenError> {
        let mut s = crate::lock(&self.state);
        if s.revoked.contains_key(id) {
            return Err(TokenError::Revoked(id.to_string()));
        }
        if s.redeemed.contains_key(id) {
            return Err(TokenError::Redeemed(id.to_string()));
        }
        prune(&mut s);
        if s.redeemed.len() >= MAX_ENTRIES {
            return Err(TokenError::Redeemed(format!(
                "{id} (the ledger is full: {MAX_ENTRIES} unexpired redemptions)"
            )));
        }
        s.redeemed.insert(id.to_string(), expires_at_unix);
        if let Err(e) = self.persist(&s) {
            s.redeemed.remove(id);
            tracing::error!(error = %e, "join-token ledger not written; the token is refused");
            return Err(TokenError::Redeemed(format!(
                "{id} (cannot record its redemption: {e})"
            )));
        }
        Ok(())
    }

    /// Undoes [`Ledger::redeem`] when no certificate came of it (the CSR was refused).
    pub fn unredeem(&self, id: &str) {
        let mut s = crate::lock(&self.state);
        if s.redeemed.remove(id).is_some()
            && let Err(e) = self.persist(&s)
        {
            tracing::warn!(error = %e, "join-token ledger not written after a refused CSR");
        }
    }

    /// Revokes token `id` until `until_unix` (the longest a token minted now could live).
    /// Returns whether it was newly revoked.
    pub fn revoke(&self, id: &str, until_unix: i64) -> Result<bool, LedgerError> {
        let mut s = crate::lock(&self.state);
        prune(&mut s);
        let fresh = s.revoked.insert(id.to_string(), until_unix).is_none();
        if let Err(e) = self.persist(&s) {
            if fresh {
                s.revoked.remove(id);
            }
            return Err(e);
        }
        Ok(fresh)
    }

    fn persist(&self, s: &State) -> Result<(), LedgerError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        crate::state_file::write(path, s).map_err(|source| LedgerError::Io {
            path: path.clone(),
            source,
        })
    }
}

/// Drops entries whose token has expired (nobody can present it any more).
fn prune(s: &mut State) {
    let now = now();
    s.redeemed.retain(|_, exp| *exp > now);
    s.revoked.retain(|_, until| *until > now);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_redeems_once_survives_a_restart_and_revocation_wins() {
        let dir = tempfile::tempdir().expect("dir");
        let ledger = Ledger::open(Some(dir.path())).expect("open");
        let exp = now() + 600;
        ledger.redeem("a", exp).expect("first");
        assert_eq!(
            ledger.redeem("a", exp),
            Err(TokenError::Redeemed("a".into()))
        );
        ledger.unredeem("a");
        ledger.redeem("a", exp).expect("after a refused CSR");
        assert!(ledger.revoke("b", exp).expect("revoke"), "newly revoked");
        assert!(!ledger.revoke("b", exp).expect("revoke"), "already revoked");
        drop(ledger);
        let again = Ledger::open(Some(dir.path())).expect("reopen");
        assert_eq!(
            again.redeem("a", exp),
            Err(TokenError::Redeemed("a".into()))
        );
        assert_eq!(again.redeem("b", exp), Err(TokenError::Revoked("b".into())));
        // Expired entries go; a file that is not a ledger stops start-up.
        again.redeem("old", now() - 1).expect("recorded");
        again.redeem("c", exp).expect("prunes");
        std::fs::write(dir.path().join(FILE), "{not json").expect("write");
        assert!(matches!(
            Ledger::open(Some(dir.path())),
            Err(LedgerError::Corrupt { .. })
        ));
    }
}
