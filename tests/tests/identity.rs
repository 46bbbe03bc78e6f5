//! The CertificateService over a real gRPC connection: a join token minted by the admin API
//! proves an identity and gets an SVID for exactly it; an unauthenticated caller, a token for
//! another identity, an expired token, an oversized TTL and a garbage CSR are each refused with
//! their reason; nothing panics and the service keeps serving.

use std::time::Duration;

use tonic::Code;
use weft_proto::admin::CreateJoinTokenRequest;
use weft_proto::identity::SignRequest;
use weft_proto::identity::certificate_service_client::CertificateServiceClient;
use weft_testkit::world;

fn csr_for(uri: &str) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().expect("ia5"))];
    p.serialize_request(&key).expect("csr").pem().expect("pem")
}

#[tokio::test]
async fn issue_verify_and_refuse() {
    let (_dir, cp) = weft_testkit::control_plane_over(&[world::service("echo", 80)]).await;
    let mut admin = weft_testkit::operator_admin(&cp).await.expect("admin");
    let mut certs = CertificateServiceClient::new(
        weft_testkit::tls_channel(&cp, None)
            .await
            .expect("anonymous TLS"),
    );
    let token = |sa: &str, ttl: u64| CreateJoinTokenRequest {
        namespace: "default".into(),
        service_account: sa.into(),
        ttl_seconds: ttl,
    };
    let echo_token = admin
        .create_join_token(token("echo", 600))
        .await
        .expect("mint")
        .into_inner();
    assert_eq!(
        echo_token.spiffe_id,
        "spiffe://cluster.local/ns/default/sa/echo"
    );
    let echo_csr = csr_for("spiffe://cluster.local/ns/default/sa/echo");

    // Issued: a chain of two and a trust bundle.
    let ok = certs
        .sign(SignRequest {
            csr_pem: echo_csr.clone(),
            token: echo_token.token.clone(),
            requested_ttl_seconds: 0,
            node_id: String::new(),
        })
        .await
        .expect("signed")
        .into_inner();
    assert_eq!(ok.cert_chain_pem.len(), 2);
    assert_eq!(ok.trust_bundle_pem.len(), 1);
    assert_eq!(ok.spiffe_id, echo_token.spiffe_id);

    let refused = |code: Code, want: &'static str, req: SignRequest| {
        let mut certs = certs.clone();
        async move {
            let status = certs.sign(req).await.expect_err("must be refused");
            assert_eq!(status.code(), code, "{}", status.message());
            assert!(
                status.message().contains(want),
                "{:?} lacks {want:?}",
                status.message()
            );
        }
    };
    refused(
        Code::PermissionDenied,
        "no credential",
        SignRequest {
            csr_pem: echo_csr.clone(),
            token: String::new(),
            requested_ttl_seconds: 0,
            node_id: String::new(),
        },
    )
    .await;
    refused(
        Code::PermissionDenied,
        "malformed",
        SignRequest {
            csr_pem: echo_csr.clone(),
            token: "let me in".into(),
            requested_ttl_seconds: 0,
            node_id: String::new(),
        },
    )
    .await;
    let admin_token = admin
        .create_join_token(token("admin", 600))
        .await
        .expect("mint")
        .into_inner();
    refused(
        Code::PermissionDenied,
        "the caller proved spiffe://cluster.local/ns/default/sa/admin",
        SignRequest {
            csr_pem: echo_csr.clone(),
            token: admin_token.token,
            requested_ttl_seconds: 0,
            node_id: String::new(),
        },
    )
    .await;
    // Single-use: the token that was just redeemed is refused the second time.
    refused(
        Code::PermissionDenied,
        "already redeemed",
        SignRequest {
            csr_pem: echo_csr.clone(),
            token: echo_token.token.clone(),
            requested_ttl_seconds: 0,
            node_id: String::new(),
        },
    )
    .await;
    // A refused CSR does not use the token up.
    let spare = admin
        .create_join_token(token("echo", 600))
        .await
        .expect("mint")
        .into_inner();
    refused(
        Code::InvalidArgument,
        "above the cap",
        SignRequest {
            csr_pem: echo_csr.clone(),
            token: spare.token.clone(),
            requested_ttl_seconds: 30 * 24 * 3600,
            node_id: String::new(),
        },
    )
    .await;
    refused(
        Code::InvalidArgument,
        "does not parse",
        SignRequest {
            csr_pem:
                "-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n-----END CERTIFICATE REQUEST-----\n"
                    .into(),
            token: spare.token.clone(),
            requested_ttl_seconds: 0,
            node_id: String::new(),
        },
    )
    .await;
    let short = admin
        .create_join_token(token("echo", 1))
        .await
        .expect("mint")
        .into_inner();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    refused(
        Code::PermissionDenied,
        "expired",
        SignRequest {
            csr_pem: echo_csr.clone(),
            token: short.token,
            requested_ttl_seconds: 0,
            node_id: String::new(),
        },
    )
    .await;

    // Still serving, and the token the refused CSRs carried is still good once. Revoked,
    // a token is refused even unredeemed.
    let revoked = admin
        .create_join_token(token("echo", 600))
        .await
        .expect("mint")
        .into_inner();
    assert!(
        admin
            .revoke_join_token(weft_proto::admin::RevokeJoinTokenRequest {
                id: revoked.id.clone(),
            })
            .await
            .expect("revoke")
            .into_inner()
            .newly_revoked
    );
    refused(
        Code::PermissionDenied,
        "revoked",
        SignRequest {
            csr_pem: echo_csr.clone(),
            token: revoked.token,
            requested_ttl_seconds: 0,
            node_id: String::new(),
        },
    )
    .await;
    let again = certs
        .sign(SignRequest {
            csr_pem: echo_csr,
            token: spare.token,
            requested_ttl_seconds: 3600,
            node_id: String::new(),
        })
        .await
        .expect("signed again");
    assert_eq!(again.into_inner().cert_chain_pem.len(), 2);
}

/// A sidecar with a join token gets its SVID (key made in the process) and renews it at about
/// half-life: with a 4 s certificate, several renewals happen within seconds.
#[tokio::test]
async fn sidecar_obtains_and_renews_its_certificate() {
    let (_dir, cp) = weft_testkit::control_plane_over(&[world::service("echo", 80)]).await;
    let mut admin = weft_testkit::operator_admin(&cp).await.expect("admin");
    let token = admin
        .create_join_token(CreateJoinTokenRequest {
            namespace: "default".into(),
            service_account: "echo".into(),
            ttl_seconds: 600,
        })
        .await
        .expect("mint")
        .into_inner()
        .token;
    let bundle = tempfile::tempdir().expect("dir");
    std::fs::write(bundle.path().join("root.pem"), cp.ca.root_pem()).expect("bundle");
    let mut cfg = weft_sidecar::RunConfig::local(
        cp.grpc_addr,
        "127.0.14.100".parse().expect("ip"),
        "with-cert",
    );
    cfg.plaintext_xds = false;
    cfg.trust_bundle = Some(bundle.path().join("root.pem"));
    cfg.service_account = "echo".into();
    cfg.join_token = Some(token);
    cfg.cert_ttl = Duration::from_secs(4);
    let sc = weft_sidecar::Sidecar::start(cfg).await.expect("sidecar");
    let svid = sc.svid.clone().expect("identity enabled");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let first = loop {
        if let Some(s) = svid.load_full() {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "no certificate");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(first.spiffe_id, "spiffe://cluster.local/ns/default/sa/echo");
    assert_eq!(first.chain.len(), 2);
    // Renewed before it expires, more than once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let current = svid.load_full().expect("still has one");
        if current.expires_at_unix >= first.expires_at_unix + 3 {
            assert_ne!(
                current.chain[0], first.chain[0],
                "each renewal is a new leaf"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not renewed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, metrics) = weft_testkit::get_via(sc.admin_addr, "admin", "/metrics")
        .await
        .expect("metrics");
    let renewals: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("weft_cert_renewals_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(renewals >= 2.0, "{metrics}");
    assert!(metrics.contains("weft_cert_expiry_seconds"), "{metrics}");
}

/// A MOCK Kubernetes API server (none can run here): it answers TokenReview the way a real
/// one does — `authenticated` with the service account's username, or not with an error —
/// and records the tokens and audiences it was asked about. The control plane, with
/// `--token-review --kube-api <mock>`, must issue only for the reviewed service account.
struct MockApiServer {
    addr: std::net::SocketAddr,
    asked: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    task: tokio::task::JoinHandle<()>,
    _stop: tokio::sync::watch::Sender<()>,
}

/// Dropping the mock ends its listener and every open connection (a dead API server).
impl Drop for MockApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn mock_api_server() -> MockApiServer {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = asked.clone();
    let (stop, stopped) = tokio::sync::watch::channel(());
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            let mut stopped = stopped.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let review: serde_json::Value =
                                serde_json::from_slice(&body).unwrap_or_default();
                            if let Ok(mut s) = seen.lock() {
                                s.push(review.clone());
                            }
                            // As a real API server: the token's audiences that were asked for.
                            let asked_for: Vec<String> = review["spec"]["audiences"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|a| a.as_str().map(str::to_string))
                                .collect();
                            let bound = |token_audiences: &[&str]| -> Vec<String> {
                                asked_for
                                    .iter()
                                    .filter(|a| token_audiences.contains(&a.as_str()))
                                    .cloned()
                                    .collect()
                            };
                            let sa = |user: &str, auds: &[&str]| {
                                serde_json::json!({"authenticated": true,
                                    "user": {"username": user}, "audiences": bound(auds)})
                            };
                            let status = match review["spec"]["token"].as_str() {
                                Some("sa-token-echo") => {
                                    sa("system:serviceaccount:default:echo", &["weft"])
                                }
                                // A pod's default token: bound to the API server only.
                                Some("default-token-echo") => sa(
                                    "system:serviceaccount:default:echo",
                                    &["https://kubernetes.default.svc"],
                                ),
                                Some("sa-token-control-plane") => sa(
                                    "system:serviceaccount:weft-system:weft-control-plane",
                                    &["weft"],
                                ),
                                Some("node-token") => sa("system:node:worker-1", &["weft"]),
                                _ => {
                                    serde_json::json!({"authenticated": false, "error": "token has expired"})
                                }
                            };
                            let answer = serde_json::json!({
                                "apiVersion": "authentication.k8s.io/v1",
                                "kind": "TokenReview",
                                "metadata": {},
                                "spec": review["spec"],
                                "status": status,
                            });
                            let code = if path == "/apis/authentication.k8s.io/v1/tokenreviews" {
                                201
                            } else {
                                404
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
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = stopped.changed() => {}
                }
            });
        }
    });
    MockApiServer {
        addr,
        asked,
        task,
        _stop: stop,
    }
}

#[tokio::test]
async fn token_review_with_a_mock_kubernetes_api_server() {
    let api = mock_api_server().await;
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("world.yaml"), world::service("echo", 80)).expect("world");
    let mut cfg = weft_control_plane::Config::local(dir.path());
    cfg.token_review = true;
    cfg.token_audiences = vec!["weft".into()];
    cfg.kube_api = Some(format!("http://{}", api.addr));
    let cp = weft_testkit::ControlPlane::start(cfg)
        .await
        .expect("control plane");
    let mut certs = CertificateServiceClient::new(
        weft_testkit::tls_channel(&cp, None)
            .await
            .expect("anonymous TLS"),
    );
    let sign = |token: &str, sa: &str| SignRequest {
        csr_pem: csr_for(&format!("spiffe://cluster.local/ns/default/sa/{sa}")),
        token: token.into(),
        requested_ttl_seconds: 0,
        node_id: String::new(),
    };
    // A valid service-account token: an SVID for exactly that service account.
    let ok = certs
        .sign(sign("sa-token-echo", "echo"))
        .await
        .expect("issued")
        .into_inner();
    assert_eq!(ok.spiffe_id, "spiffe://cluster.local/ns/default/sa/echo");
    // The same token asking for another identity; an expired token; a node's token.
    let refused = |token: &'static str, sa: &'static str| {
        let mut certs = certs.clone();
        async move { certs.sign(sign(token, sa)).await.expect_err("refused") }
    };
    let other = refused("sa-token-echo", "admin").await;
    assert_eq!(other.code(), Code::PermissionDenied);
    assert!(other.message().contains("sa/admin"), "{other:?}");
    let expired = refused("expired-token", "echo").await;
    assert_eq!(expired.code(), Code::PermissionDenied);
    assert!(
        expired.message().contains("token has expired"),
        "{expired:?}"
    );
    let node = refused("node-token", "echo").await;
    assert_eq!(node.code(), Code::PermissionDenied);
    assert!(node.message().contains("system:node:worker-1"), "{node:?}");
    // A pod's default token is valid for the API server, not for the mesh.
    let default = refused("default-token-echo", "echo").await;
    assert_eq!(default.code(), Code::PermissionDenied);
    assert!(default.message().contains("audience"), "{default:?}");
    // A service account of the control plane's namespace is never issued from a token.
    let mut certs_cp = certs.clone();
    let reserved = certs_cp
        .sign(SignRequest {
            csr_pem: csr_for("spiffe://cluster.local/ns/weft-system/sa/weft-control-plane"),
            token: "sa-token-control-plane".into(),
            requested_ttl_seconds: 0,
            node_id: String::new(),
        })
        .await
        .expect_err("refused");
    assert_eq!(reserved.code(), Code::PermissionDenied);
    assert!(reserved.message().contains("never issued"), "{reserved:?}");
    // What the API server was asked: the token and the audience.
    let asked = api.asked.lock().expect("lock").clone();
    assert_eq!(asked.len(), 6);
    assert_eq!(asked[0]["kind"], "TokenReview");
    assert_eq!(asked[0]["spec"]["token"], "sa-token-echo");
    assert_eq!(asked[0]["spec"]["audiences"][0], "weft");
    // Join tokens still work next to TokenReview, and never reach the API server.
    let join = weft_testkit::mint_token(&cp, "default", "echo")
        .await
        .expect("mint");
    certs
        .clone()
        .sign(sign(&join, "echo"))
        .await
        .expect("join token");
    assert_eq!(api.asked.lock().expect("lock").len(), 6);
    // The API server gone: UNAVAILABLE (try again), not a denial.
    drop(api);
    let gone = refused("sa-token-echo", "echo").await;
    assert_eq!(gone.code(), Code::Unavailable, "{gone:?}");
}

/// A CSR with a key outside Weft's policy (RSA: only ECDSA P-256/P-384 and Ed25519 are
/// accepted) for the caller's own identity is refused. The key is a fixture generated once with
/// `openssl genpkey` (ring signs with RSA keys but cannot make them, nor sign with RSA-1024).
#[tokio::test]
async fn a_key_outside_the_policy_is_refused() {
    let (_dir, cp) = weft_testkit::control_plane_over(&[world::service("echo", 80)]).await;
    let key = rcgen::KeyPair::from_pem_and_sign_algo(
        include_str!("../fixtures/rsa-2048.key.pem"),
        &rcgen::PKCS_RSA_SHA256,
    )
    .expect("RSA key");
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://cluster.local/ns/default/sa/echo"
            .try_into()
            .expect("ia5"),
    )];
    let csr = p.serialize_request(&key).expect("csr").pem().expect("pem");
    let token = weft_testkit::mint_token(&cp, "default", "echo")
        .await
        .expect("token");
    let err = weft_testkit::sign_with_token(
        &cp,
        SignRequest {
            csr_pem: csr,
            token,
            requested_ttl_seconds: 0,
            node_id: String::new(),
        },
    )
    .await
    .expect_err("weak key");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("weak or unsupported key"), "{err:?}");
}
