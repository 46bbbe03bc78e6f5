//! Request tracing: W3C Trace Context propagation and OTLP span export.
//!
//! Every outbound request gets a span: it continues the caller's trace when the request carries
//! a valid `traceparent` (W3C Trace Context, level 1), else starts one, and the upstream request
//! carries a `traceparent` naming the sidecar's span as parent. With `--otlp-endpoint`, finished
//! spans are batched (up to 512, or every second) and exported with OTLP/gRPC
//! (`opentelemetry.proto.collector.trace.v1.TraceService/Export`) by a task on the proxy's own
//! runtime. Export is best-effort: a full queue drops spans (counted) rather than slow requests.
//!
//! The exporter is written against the OTLP protos directly rather than through
//! tracing-opentelemetry: the OpenTelemetry SDK's batch processor exports from its own OS thread
//! with no Tokio reactor, where the tonic exporter cannot run (a known upstream pitfall).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use tokio::sync::mpsc;

/// The W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";
/// Spans waiting for export at most.
pub const QUEUE: usize = 4096;
/// Spans per export at most.
pub const BATCH: usize = 512;
/// Longest wait before a partial batch is exported.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            u8::from(self.sampled)
        )
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

/// A finished span.
#[derive(Debug, Clone)]
pub struct FinishedSpan {
    /// The span's own context.
    pub context: TraceContext,
    /// Its parent span, if it continued a trace.
    pub parent: Option<[u8; 8]>,
    /// Span name.
    pub name: &'static str,
    /// Start.
    pub start: SystemTime,
    /// End.
    pub end: SystemTime,
    /// Attributes.
    pub attributes: Vec<(&'static str, String)>,
    /// Whether the request failed (5xx or refused).
    pub error: bool,
}

/// Records spans and hands them to the exporter (when one is configured).
#[derive(Clone, Debug, Default)]
pub struct Tracer {
    tx: Option<mpsc::Sender<FinishedSpan>>,
}

impl Tracer {
    /// A tracer exporting to `endpoint` (e.g. `http://collector:4317`), or recording nothing.
    pub fn start(endpoint: Option<String>, metrics: std::sync::Arc<crate::admin::Metrics>) -> Self {
        let Some(endpoint) = endpoint else {
            return Tracer::default();
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(export_loop(endpoint, rx, metrics));
        Tracer { tx: Some(tx) }
    }

    /// Whether spans are exported.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues a finished span; drops it when the queue is full.
    pub fn record(&self, span: FinishedSpan, metrics: &crate::admin::Metrics) {
        if let Some(tx) = &self.tx
            && tx.try_send(span).is_err()
        {
            metrics.spans_dropped.inc();
        }
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

fn kv(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }),
    }
}

/// The OTLP form of a span.
pub fn to_otlp(s: &FinishedSpan) -> Span {
    Span {
        trace_id: s.context.trace_id.to_vec(),
        span_id: s.context.span_id.to_vec(),
        parent_span_id: s.parent.map(|p| p.to_vec()).unwrap_or_default(),
        name: s.name.to_string(),
        kind: span::SpanKind::Client as i32,
        start_time_unix_nano: unix_nanos(s.start),
        end_time_unix_nano: unix_nanos(s.end),
        attributes: s.attributes.iter().map(|(k, v)| kv(k, v.clone())).collect(),
        status: Some(Status {
            code: if s.error {
                status::StatusCode::Error
            } else {
                status::StatusCode::Ok
            } as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn export_loop(
    endpoint: String,
    mut rx: mpsc::Receiver<FinishedSpan>,
    metrics: std::sync::Arc<crate::admin::Metrics>,
) {
    let channel = match tonic::transport::Endpoint::from_shared(endpoint.clone()) {
        Ok(e) => e.connect_timeout(Duration::from_secs(3)).connect_lazy(),
        Err(e) => {
            tracing::error!(%endpoint, error = %e, "--otlp-endpoint is not a URI; spans are not exported");
            return;
        }
    };
    let mut client = TraceServiceClient::new(channel);
    let resource = Resource {
        attributes: vec![kv("service.name", "weft-sidecar".into())],
        ..Default::default()
    };
    loop {
        let Some(first) = rx.recv().await else { return };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "weft-sidecar".into(),
                        ..Default::default()
                    }),
                    spans: batch.iter().map(to_otlp).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        match client.export(request).await {
            Ok(_) => {
                metrics.spans_exported.inc_by(batch.len() as u64);
            }
            Err(e) => {
                tracing::warn!(%endpoint, error = %e, spans = batch.len(), "OTLP export failed; spans dropped");
                metrics.spans_dropped.inc_by(batch.len() as u64);
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
