//! The join-token ledger: which tokens were redeemed (join tokens are single-use) and which
//! an operator revoked. Entries live until their token would have expired anyway. With
//! `--state-dir` the ledger is `join-tokens.json` there, written (to a temporary file, then
//! renamed) before a certificate is handed out, so a restart does not make a redeemed token
//! good again.
//!
//! With `--kubernetes` the replicas share it through the API server: redeeming or revoking
//! token `<id>` creates the Lease `weft-join-<id>` in the control plane's namespace, and the
//! API server lets exactly one create succeed, so a token is good once across every replica.
//! Such Leases are labelled `weft.dev/join-token` (with their expiry in an annotation) and
//! can be deleted once expired.

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
    shared: Option<kube::Api<k8s_openapi::api::coordination::v1::Lease>>,
}

/// Label on the Leases that record join tokens (value: `redeemed` or `revoked`).
pub const LEASE_LABEL: &str = "weft.dev/join-token";
/// Annotation on them: when the token expires (unix seconds), after which they may go.
pub const EXPIRES_ANNOTATION: &str = "weft.dev/expires-at";

/// How a record reached the shared ledger.
#[derive(Clone, Copy)]
enum Kind {
    Redeemed,
    Revoked,
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
                shared: None,
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
            shared: None,
        })
    }

    /// The same ledger shared by every replica through Leases in `namespace`.
    pub fn shared_through(mut self, client: kube::Client, namespace: &str) -> Self {
        self.shared = Some(kube::Api::namespaced(client, namespace));
        self
    }

    /// Records token `id` in the shared ledger; `Ok(false)` when another replica (or an
    /// earlier call) already did.
    async fn record_shared(&self, id: &str, until: i64, kind: Kind) -> Result<bool, String> {
        let Some(api) = &self.shared else {
            return Ok(true);
        };
        let value = match kind {
            Kind::Redeemed => "redeemed",
            Kind::Revoked => "revoked",
        };
        let lease = k8s_openapi::api::coordination::v1::Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(format!("weft-join-{id}")),
                labels: Some([(LEASE_LABEL.to_string(), value.to_string())].into()),
                annotations: Some([(EXPIRES_ANNOTATION.to_string(), until.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&kube::api::PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Redeems token `id` (expiring at `expires_at_unix`) once across every replica, or says
    /// why it cannot be: [`Ledger::redeem`], then the shared ledger when there is one.
    pub async fn redeem_everywhere(
        &self,
        id: &str,
        expires_at_unix: i64,
    ) -> Result<(), TokenError> {
        self.redeem(id, expires_at_unix)?;
        match self
            .record_shared(id, expires_at_unix, Kind::Redeemed)
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(TokenError::Redeemed(format!(
                "{id} (redeemed or revoked on another replica)"
            ))),
            // Fail closed, but give the token back locally: it was not used.
            Err(e) => {
                self.unredeem(id);
                Err(TokenError::Unavailable(format!(
                    "the join-token ledger (Kubernetes Leases) cannot be written: {e}"
                )))
            }
        }
    }

    /// Revokes token `id` on every replica: [`Ledger::revoke`], then the shared ledger.
    pub async fn revoke_everywhere(&self, id: &str, until_unix: i64) -> Result<bool, String> {
        let local = self.revoke(id, until_unix).map_err(|e| e.to_string())?;
        let shared = self.record_shared(id, until_unix, Kind::Revoked).await?;
        Ok(local && shared)
    }

    /// Marks token `id` (expiring at `expires_at_unix`) redeemed on this replica, or says why
    /// it cannot be. Persisted before it returns.
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

    /// A MOCK Kubernetes API server (none runs here) that does what a real one does with
    /// Lease creates in one namespace: the first create of a name wins (201), any later one
    /// gets 409 AlreadyExists. Returns its URL and the names created.
    async fn mock_api_server() -> (String, std::sync::Arc<Mutex<Vec<String>>>) {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let names = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
        let seen = names.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let seen = seen.clone();
                            async move {
                                let ok = req.method() == hyper::Method::POST
                                    && req.uri().path()
                                        == "/apis/coordination.k8s.io/v1/namespaces/weft-system/leases";
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let lease: serde_json::Value =
                                    serde_json::from_slice(&body).unwrap_or_default();
                                let name = lease["metadata"]["name"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_string();
                                let (code, answer) = if !ok {
                                    (
                                        404,
                                        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                                    )
                                } else if crate::lock(&seen).contains(&name) {
                                    (
                                        409,
                                        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": format!("leases {name:?} already exists")}),
                                    )
                                } else {
                                    crate::lock(&seen).push(name);
                                    (201, lease)
                                };
                                let mut resp = hyper::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::from(answer.to_string()),
                                ));
                                *resp.status_mut() =
                                    hyper::StatusCode::from_u16(code).unwrap_or_default();
                                resp.headers_mut().insert(
                                    "content-type",
                                    hyper::header::HeaderValue::from_static("application/json"),
                                );
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (url, names)
    }

    fn replica(url: &str) -> Ledger {
        let config = kube::Config::new(url.parse().expect("url"));
        let client = kube::Client::try_from(config).expect("client");
        Ledger::open(None)
            .expect("ledger")
            .shared_through(client, "weft-system")
    }

    #[tokio::test]
    async fn mock_api_server_two_replicas_redeem_a_token_once_between_them() {
        let (url, names) = mock_api_server().await;
        let (a, b) = (replica(&url), replica(&url));
        let exp = now() + 600;
        a.redeem_everywhere("t1", exp)
            .await
            .expect("first redemption");
        let again = b
            .redeem_everywhere("t1", exp)
            .await
            .expect_err("on the other replica");
        assert!(
            matches!(again, TokenError::Redeemed(ref m) if m.contains("another replica")),
            "{again:?}"
        );
        // Revoked on one, refused on the other before anyone redeemed it.
        assert!(a.revoke_everywhere("t2", exp).await.expect("revoke"));
        assert!(b.redeem_everywhere("t2", exp).await.is_err());
        assert_eq!(*crate::lock(&names), ["weft-join-t1", "weft-join-t2"]);
        // The API server gone: refused as unavailable (try again), and not used up here.
        let gone = replica("http://127.0.0.1:1");
        let err = gone
            .redeem_everywhere("t3", exp)
            .await
            .expect_err("no API server");
        assert!(matches!(err, TokenError::Unavailable(_)), "{err:?}");
        assert!(gone.redeem("t3", exp).is_ok(), "given back locally");
    }

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
