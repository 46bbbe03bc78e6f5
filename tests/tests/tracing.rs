//! Request tracing through the sidecar: W3C `traceparent` is continued (or created) and the
//! upstream sees the sidecar's span as parent; spans arrive at an in-process OTLP/gRPC receiver
//! with the right trace and parent ids.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use weft_testkit::echo::{Echo, Identity};
use weft_testkit::world;

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self
            .0
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?;
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn spans_reach_the_otlp_receiver_with_the_right_parent() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let otlp = listener.local_addr().expect("addr");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let pod = Echo::start(
        "127.0.12.1:18080".parse().expect("addr"),
        Identity {
            name: "pod".into(),
            cluster: "cluster-1".into(),
            zone: "a".into(),
        },
    )
    .await
    .expect("echo");
    let (_dir, cp) = weft_testkit::control_plane_over(&[
        world::service("echo", 80),
        world::slice("echo", "echo", &[(pod.addr, "n1", true)]),
    ])
    .await;
    let mut cfg = weft_sidecar::RunConfig::local(
        cp.plaintext(),
        "127.0.12.100".parse().expect("ip"),
        "traced",
    );
    cfg.otlp_endpoint = Some(format!("http://{otlp}"));
    let sc = weft_sidecar::Sidecar::start(cfg).await.expect("sidecar");
    let mut ready = sc.xds.ready.clone();
    tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
        .await
        .expect("ready")
        .expect("alive");

    // A request that carries a trace: the sidecar's span continues it.
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (status, _) = weft_testkit::get_with(
        sc.outbound_addr,
        "echo",
        "/traced",
        &[("traceparent", caller)],
    )
    .await
    .expect("request");
    assert_eq!(status, 200);
    let upstream = pod
        .behavior
        .last_traceparent
        .lock()
        .expect("lock")
        .clone()
        .expect("upstream got a traceparent");
    let parts: Vec<&str> = upstream.split('-').collect();
    assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
    assert_ne!(
        parts[2], "00f067aa0ba902b7",
        "the sidecar's own span is the upstream's parent"
    );

    // A request without one: a trace is started.
    let (status, _) = weft_testkit::get_via(sc.outbound_addr, "echo", "/fresh")
        .await
        .expect("request");
    assert_eq!(status, 200);
    let fresh = pod
        .behavior
        .last_traceparent
        .lock()
        .expect("lock")
        .clone()
        .expect("created");
    assert!(
        fresh.starts_with("00-") && fresh.ends_with("-01"),
        "{fresh}"
    );

    // Both spans arrive, with the ids the upstream saw.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans = receiver.0.lock().expect("lock").clone();
        if spans.len() >= 2 {
            break spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans not exported: {spans:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let continued = spans
        .iter()
        .find(|s| hex(&s.trace_id) == "4bf92f3577b34da6a3ce929d0e0e4736")
        .expect("the continued span");
    assert_eq!(
        hex(&continued.parent_span_id),
        "00f067aa0ba902b7",
        "parent is the caller's span"
    );
    assert_eq!(
        hex(&continued.span_id),
        parts[2],
        "the span the upstream was told about"
    );
    assert_eq!(continued.name, "weft.outbound");
    // Made by tracing-opentelemetry from the request span: kind client, HTTP attributes.
    assert_eq!(
        continued.kind,
        opentelemetry_proto::tonic::trace::v1::span::SpanKind::Client as i32
    );
    let attr = |name: &str| {
        continued
            .attributes
            .iter()
            .find(|a| a.key == name)
            .and_then(|a| a.value.as_ref())
            .and_then(|v| v.value.clone())
    };
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    assert_eq!(attr("url.path"), Some(Value::StringValue("/traced".into())));
    assert_eq!(
        attr("http.request.method"),
        Some(Value::StringValue("GET".into()))
    );
    assert_eq!(
        attr("http.response.status_code"),
        Some(Value::IntValue(200))
    );
    let fresh_parts: Vec<&str> = fresh.split('-').collect();
    let root = spans
        .iter()
        .find(|s| hex(&s.trace_id) == fresh_parts[1])
        .expect("the new trace's span");
    assert!(
        root.parent_span_id.is_empty(),
        "a new trace's span has no parent"
    );
    server.abort();
}
