//! Kubernetes service-account tokens as proof of identity: the CertificateService asks the
//! API server (TokenReview, `authentication.k8s.io/v1`) whether a token is valid and whom it
//! belongs to, and issues only for that service account.
//!
//! The mapping from a review's status to a SPIFFE ID is pure ([`identity_from_review`]); the
//! client only moves the review to the API server and back. Outside a cluster the API server
//! can be given explicitly (`--kube-api`, e.g. `kubectl proxy` on `http://127.0.0.1:8001`).

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use weft_proto::SpiffeId;

/// Why a service-account token did not prove an identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReviewError {
    /// The API server says the token is not valid.
    #[error("the Kubernetes API server did not authenticate the token: {0}")]
    Unauthenticated(String),
    /// The token is valid but not a service account's.
    #[error("the token belongs to {0:?}, not a service account (system:serviceaccount:<ns>:<sa>)")]
    NotAServiceAccount(String),
    /// The service account's name does not make a SPIFFE ID.
    #[error("service account {0:?}: {1}")]
    BadName(String, String),
    /// The API server could not be asked.
    #[error("TokenReview failed: {0}")]
    Unavailable(String),
    /// The token is not bound to an audience this control plane accepts.
    #[error(
        "the token is not bound to an accepted audience ({wanted:?}; the review answered {got:?}): project a service-account token for one of them"
    )]
    Audience {
        /// What was asked for.
        wanted: Vec<String>,
        /// What the review said the token is for.
        got: Vec<String>,
    },
}

impl ReviewError {
    /// UNAVAILABLE (try again) rather than PERMISSION_DENIED.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, ReviewError::Unavailable(_))
    }
}

/// The identity a TokenReview status proves: `system:serviceaccount:<ns>:<sa>` becomes
/// `spiffe://<trust_domain>/ns/<ns>/sa/<sa>`. The status must name one of `audiences` (the
/// API server answers with those of the requested audiences the token is bound to; an API
/// server that ignores audiences answers none, and is refused).
pub fn identity_from_review(
    status: Option<&TokenReviewStatus>,
    trust_domain: &str,
    audiences: &[String],
) -> Result<SpiffeId, ReviewError> {
    let Some(status) = status.filter(|s| s.authenticated == Some(true)) else {
        let why = status
            .and_then(|s| s.error.clone())
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "not authenticated".into());
        return Err(ReviewError::Unauthenticated(why));
    };
    let got = status.audiences.clone().unwrap_or_default();
    if !got.iter().any(|a| audiences.contains(a)) {
        return Err(ReviewError::Audience {
            wanted: audiences.to_vec(),
            got,
        });
    }
    let username = status
        .user
        .as_ref()
        .and_then(|u| u.username.clone())
        .unwrap_or_default();
    let Some((ns, sa)) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
    else {
        return Err(ReviewError::NotAServiceAccount(username));
    };
    SpiffeId::new(trust_domain, ns, sa)
        .map_err(|e| ReviewError::BadName(username.clone(), e.to_string()))
}

/// Reviews tokens with one API server.
pub struct TokenReviewer {
    client: kube::Client,
    audiences: Vec<String>,
    trust_domain: String,
}

impl TokenReviewer {
    /// A reviewer over `client` accepting tokens bound to one of `audiences` (never empty:
    /// an empty list is the mesh's own, [`weft_proto::keys::TOKEN_AUDIENCE`]).
    pub fn new(client: kube::Client, audiences: Vec<String>, trust_domain: &str) -> Self {
        let audiences = if audiences.is_empty() {
            vec![weft_proto::keys::TOKEN_AUDIENCE.to_string()]
        } else {
            audiences
        };
        TokenReviewer {
            client,
            audiences,
            trust_domain: trust_domain.into(),
        }
    }

    /// A client for `url` (`--kube-api`), else in-cluster config or `KUBECONFIG`.
    pub async fn client(url: Option<&str>) -> Result<kube::Client, ReviewError> {
        let config = match url {
            Some(u) => {
                let uri = u
                    .parse()
                    .map_err(|e| ReviewError::Unavailable(format!("--kube-api {u:?}: {e}")))?;
                kube::Config::new(uri)
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| ReviewError::Unavailable(format!("no Kubernetes config: {e}")))?,
        };
        kube::Client::try_from(config).map_err(|e| ReviewError::Unavailable(e.to_string()))
    }

    /// Asks the API server whose `token` this is.
    pub async fn review(&self, token: &str) -> Result<SpiffeId, ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(self.audiences.clone()),
            },
            ..Default::default()
        };
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let answer = api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
        identity_from_review(answer.status.as_ref(), &self.trust_domain, &self.audiences)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn status(authenticated: bool, user: &str, error: Option<&str>) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            user: Some(UserInfo {
                username: Some(user.into()),
                ..Default::default()
            }),
            error: error.map(str::to_string),
            audiences: Some(vec!["weft".into()]),
        }
    }

    fn weft() -> Vec<String> {
        vec!["weft".into()]
    }

    /// A pod's default token (bound to the API server's audience), or an API server that
    /// ignores audiences, proves nothing.
    #[test]
    fn a_token_for_another_audience_is_refused() {
        let mut s = status(true, "system:serviceaccount:shop:checkout", None);
        s.audiences = Some(vec!["https://kubernetes.default.svc".into()]);
        assert!(matches!(
            identity_from_review(Some(&s), "td", &weft()),
            Err(ReviewError::Audience { .. })
        ));
        s.audiences = None;
        assert!(matches!(
            identity_from_review(Some(&s), "td", &weft()),
            Err(ReviewError::Audience { .. })
        ));
    }

    #[test]
    fn a_service_account_becomes_its_spiffe_id() {
        let s = status(true, "system:serviceaccount:shop:checkout", None);
        assert_eq!(
            identity_from_review(Some(&s), "mesh.local", &weft()).map(|id| id.to_string()),
            Ok("spiffe://mesh.local/ns/shop/sa/checkout".into())
        );
    }

    #[test]
    fn everything_else_is_refused_with_its_reason() {
        let expired = status(false, "", Some("token has expired"));
        assert_eq!(
            identity_from_review(Some(&expired), "td", &weft()),
            Err(ReviewError::Unauthenticated("token has expired".into()))
        );
        assert_eq!(
            identity_from_review(None, "td", &weft()),
            Err(ReviewError::Unauthenticated("not authenticated".into()))
        );
        let node = status(true, "system:node:worker-1", None);
        assert_eq!(
            identity_from_review(Some(&node), "td", &weft()),
            Err(ReviewError::NotAServiceAccount(
                "system:node:worker-1".into()
            ))
        );
        let bad = status(true, "system:serviceaccount:Bad_NS:sa", None);
        assert!(matches!(
            identity_from_review(Some(&bad), "td", &weft()),
            Err(ReviewError::BadName(..))
        ));
    }
}
