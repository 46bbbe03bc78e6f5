//! Request tracing: W3C Trace Context propagation and OTLP span export through
//! tracing-opentelemetry.
//!
//! Every outbound request continues the caller's trace when it carries a valid `traceparent`
//! (W3C Trace Context, level 1), else starts one, and the upstream request carries a
//! `traceparent` naming the sidecar's span as parent. With `--otlp-endpoint`, the request is a
//! `tracing` span (`weft.outbound`, kind client, HTTP semantic-convention attributes) created
//! under a sidecar-owned subscriber that holds tracing-opentelemetry's layer; the OpenTelemetry
//! SDK's batch processor (up to 4096 queued, batches of 512, every second) hands finished spans
//! to [`OtlpExporter`], which passes them to a task on the proxy's runtime that sends them
//! with OTLP/gRPC (`TraceService/Export`).
//!
//! Why the hand-off: the SDK's batch processor exports from its own OS thread, where a tonic
//! client cannot run (no Tokio reactor there), and its async-runtime variant blocks in
//! shutdown — which deadlocks a current-thread runtime when a sidecar is dropped. The exporter
//! therefore only queues (never blocks, drops counted), and the gRPC call happens on Tokio.
//! Only the request span goes to that subscriber: the proxy's logs keep going wherever the
//! process's own subscriber sends them.

use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanData,
};
use tokio::sync::mpsc;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// The W3C trace context header (a `HeaderName` made once: inserting by `&str` would parse
/// and allocate the name on every request).
pub static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
/// Spans waiting for export at most.
pub const QUEUE: usize = 4096;
/// Spans per export at most.
pub const BATCH: usize = 512;
/// Longest wait before a partial batch is exported.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Batches waiting for the gRPC call at most (beyond it, batches are dropped and counted).
pub const BATCHES_IN_FLIGHT: usize = 8;

/// A trace position: trace id, span id, sampled flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// 16-byte trace id.
    pub trace_id: [u8; 16],
    /// 8-byte span id.
    pub span_id: [u8; 8],
    /// The `sampled` flag.
    pub sampled: bool,
}

fn hex_decode<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

impl TraceContext {
    /// Parses a `traceparent` value; `None` for anything the spec says to ignore (bad format,
    /// version ff, all-zero ids).
    pub fn parse(v: &str) -> Option<Self> {
        let mut parts = v.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let version: [u8; 1] = hex_decode(version)?;
        // Version 00 has exactly four fields; later versions may add more.
        if version[0] == 0xff || (version[0] == 0 && parts.next().is_some()) {
            return None;
        }
        let trace_id: [u8; 16] = hex_decode(trace)?;
        let span_id: [u8; 8] = hex_decode(span)?;
        let flags: [u8; 1] = hex_decode(flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            sampled: flags[0] & 1 == 1,
        })
    }

    /// The `traceparent` value.
    pub fn header(&self) -> String {
        String::from_utf8_lossy(&self.header_bytes()).into_owned()
    }

    /// The `traceparent` value as bytes, written without the formatting machinery (it is made
    /// for every request; the profile showed `format!` per byte at ~3 % of user time).
    pub fn header_bytes(&self) -> [u8; 55] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 55];
        out[..3].copy_from_slice(b"00-");
        let ids = self.trace_id.iter().chain(self.span_id.iter());
        let mut at = 3;
        for (k, b) in ids.enumerate() {
            if k == 16 {
                out[at] = b'-';
                at += 1;
            }
            out[at] = HEX[usize::from(b >> 4)];
            out[at + 1] = HEX[usize::from(b & 15)];
            at += 2;
        }
        out[at..].copy_from_slice(if self.sampled { b"-01" } else { b"-00" });
        out
    }

    /// A child of `parent` (same trace, new span id), or the root of a new sampled trace.
    pub fn child_of(parent: Option<&TraceContext>) -> Self {
        let span_id = loop {
            let id: [u8; 8] = rand::random();
            if id != [0; 8] {
                break id;
            }
        };
        match parent {
            Some(p) => TraceContext {
                trace_id: p.trace_id,
                span_id,
                sampled: p.sampled,
            },
            None => TraceContext {
                trace_id: rand::random(),
                span_id,
                sampled: true,
            },
        }
    }
}

/// Creates request spans and exports them (when an OTLP endpoint is configured).
#[derive(Clone, Default)]
pub struct Tracer {
    otel: Option<Otel>,
}

#[derive(Clone)]
struct Otel {
    /// The subscriber request spans are created under (tracing-opentelemetry's layer).
    dispatch: tracing::Dispatch,
    /// Kept so the batch processor lives as long as the tracer.
    _provider: SdkTracerProvider,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("exporting", &self.otel.is_some())
            .finish()
    }
}

impl Tracer {
    /// A tracer exporting to `endpoint` (e.g. `http://collector:4317`), or only propagating.
    pub fn start(
        endpoint: Option<String>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Self {
        let Some(endpoint) = endpoint else {
            return Tracer::default();
        };
        let channel = match tonic::transport::Endpoint::from_shared(endpoint.clone()) {
            Ok(e) => e.connect_timeout(Duration::from_secs(3)).connect_lazy(),
            Err(e) => {
                tracing::error!(%endpoint, error = %e, "--otlp-endpoint is not a URI; spans are not exported");
                return Tracer::default();
            }
        };
        let (tx, rx) = mpsc::channel(BATCHES_IN_FLIGHT);
        let resource = opentelemetry_sdk::Resource::builder_empty()
            .with_service_name("weft-sidecar")
            .build();
        tokio::spawn(export_loop(
            endpoint,
            TraceServiceClient::new(channel),
            ResourceAttributesWithSchema::from(&resource),
            rx,
            metrics.clone(),
        ));
        let exporter = OtlpExporter { tx, metrics };
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(QUEUE)
                    .with_max_export_batch_size(BATCH)
                    .with_scheduled_delay(FLUSH_EVERY)
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("weft-sidecar"));
        let subscriber = tracing_subscriber::registry().with(layer);
        Tracer {
            otel: Some(Otel {
                dispatch: tracing::Dispatch::new(subscriber),
                _provider: provider,
            }),
        }
    }

    /// Whether spans are exported.
    pub fn enabled(&self) -> bool {
        self.otel.is_some()
    }

    /// The span of one request continuing `parent` (or starting a trace), and the trace
    /// context the upstream request must carry. Without export the span is a plain debug span
    /// of the process's own subscriber and the context is made here.
    pub fn request_span(
        &self,
        parent: Option<&TraceContext>,
        method: &http::Method,
        path: &str,
        authority: &str,
    ) -> (tracing::Span, TraceContext) {
        let Some(otel) = self
            .otel
            .as_ref()
            .filter(|_| parent.is_none_or(|p| p.sampled))
        else {
            let ctx = TraceContext::child_of(parent);
            let span = tracing::debug_span!("request", trace_id = %ctx.header());
            return (span, ctx);
        };
        let span = tracing::dispatcher::with_default(&otel.dispatch, || {
            tracing::info_span!(
                "weft.outbound",
                otel.kind = "client",
                http.request.method = %method,
                url.path = %path,
                server.address = %authority,
                http.response.status_code = tracing::field::Empty,
                weft.reason = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        });
        if let Some(p) = parent {
            let remote = SpanContext::new(
                TraceId::from_bytes(p.trace_id),
                SpanId::from_bytes(p.span_id),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            );
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
        }
        let sc = span.context().span().span_context().clone();
        let ctx = TraceContext {
            trace_id: sc.trace_id().to_bytes(),
            span_id: sc.span_id().to_bytes(),
            sampled: true,
        };
        (span, ctx)
    }

    /// Records how a request ended on its span.
    pub fn finish(&self, span: &tracing::Span, status: u16, reason: Option<&str>) {
        if self.otel.is_none() {
            return;
        }
        span.record("http.response.status_code", i64::from(status));
        if let Some(r) = reason {
            span.record("weft.reason", r);
        }
        span.record(
            "otel.status_code",
            if status >= 500 { "ERROR" } else { "OK" },
        );
    }
}

/// The SDK's exporter: queues each batch for the export task, never blocking the processor's
/// thread; a full queue drops the batch (counted in `weft_proxy_spans_dropped_total`).
pub struct OtlpExporter {
    tx: mpsc::Sender<Vec<SpanData>>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for OtlpExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpExporter")
            .field("queued", &(BATCHES_IN_FLIGHT - self.tx.capacity()))
            .finish()
    }
}

impl opentelemetry_sdk::trace::SpanExporter for OtlpExporter {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let n = batch.len() as u64;
        if self.tx.try_send(batch).is_err() {
            self.metrics.spans_dropped.inc_by(n);
        }
        std::future::ready(Ok(()))
    }
}

async fn export_loop(
    endpoint: String,
    mut client: TraceServiceClient<tonic::transport::Channel>,
    resource: ResourceAttributesWithSchema,
    mut rx: mpsc::Receiver<Vec<SpanData>>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) {
    while let Some(batch) = rx.recv().await {
        let n = batch.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(batch, &resource),
        };
        match client.export(request).await {
            Ok(_) => {
                metrics.spans_exported.inc_by(n);
            }
            Err(e) => {
                tracing::warn!(%endpoint, error = %e, spans = n, "OTLP export failed; spans dropped");
                metrics.spans_dropped.inc_by(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trip_and_rejects() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::parse(v).expect("valid");
        assert_eq!(c.header(), v);
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(
            TraceContext::parse(unsampled).expect("valid").header(),
            unsampled
        );
        assert!(c.sampled);
        let child = TraceContext::child_of(Some(&c));
        assert_eq!(child.trace_id, c.trace_id);
        assert_ne!(child.span_id, c.span_id);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        let root = TraceContext::child_of(None);
        assert!(root.sampled && root.trace_id != [0; 16]);
    }
}
