//! The CertificateService over a real gRPC connection: a join token minted by the admin API
//! proves an identity and gets an SVID for exactly it; an unauthenticated caller, a token for
//! another identity, an expired token, an oversized TTL and a garbage CSR are each refused with
//! their reason; nothing panics and the service keeps serving.

use std::time::Duration;

use tonic::Code;
use weft_proto::admin::CreateJoinTokenRequest;
use weft_proto::admin::admin_client::AdminClient;
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
    let url = format!("http://{}", cp.plaintext());
    let mut admin = AdminClient::connect(url.clone()).await.expect("admin");
    let mut certs = CertificateServiceClient::connect(url).await.expect("certs");
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
        },
    )
    .await;
    refused(
        Code::InvalidArgument,
        "above the cap",
        SignRequest {
            csr_pem: echo_csr.clone(),
            token: echo_token.token.clone(),
            requested_ttl_seconds: 30 * 24 * 3600,
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
            token: echo_token.token.clone(),
            requested_ttl_seconds: 0,
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
        },
    )
    .await;

    // Still serving.
    let again = certs
        .sign(SignRequest {
            csr_pem: echo_csr,
            token: echo_token.token,
            requested_ttl_seconds: 3600,
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
    let mut admin = AdminClient::connect(format!("http://{}", cp.plaintext()))
        .await
        .expect("admin");
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
    let mut cfg = weft_sidecar::RunConfig::local(
        cp.plaintext(),
        "127.0.14.100".parse().expect("ip"),
        "with-cert",
    );
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
