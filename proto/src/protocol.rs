//! What a Service port says it speaks (`appProtocol`, or the name's prefix), as the sidecar's
//! inbound treats it. The control plane and the sidecar read the same words the same way.

/// What a port declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Declared {
    /// HTTP (`http`, `http2`, `h2c`, `grpc`, `grpc-web`, `kubernetes.io/h2c`,
    /// `kubernetes.io/ws`): plaintext must parse as HTTP/1 or h2c, or it is refused.
    Http,
    /// Raw TCP or the application's own TLS (`tcp`, `tls`, `https`): opaque, never sniffed.
    Opaque,
}

impl Declared {
    /// The declaration of a protocol word; `None` when nothing (or nothing known) is declared,
    /// which means the port is sniffed.
    pub fn of(protocol: &str) -> Option<Declared> {
        match protocol.trim().to_ascii_lowercase().as_str() {
            "" => None,
            "http" | "http2" | "h2c" | "grpc" | "grpc-web" | "kubernetes.io/h2c"
            | "kubernetes.io/ws" => Some(Declared::Http),
            "tcp" | "tls" | "https" => Some(Declared::Opaque),
            _ => None,
        }
    }
}

/// Whether a protocol word means the endpoints speak HTTP/2 only (requests go to them over
/// HTTP/2 with prior knowledge).
pub fn is_http2(protocol: &str) -> bool {
    matches!(
        protocol.trim().to_ascii_lowercase().as_str(),
        "grpc" | "h2c" | "kubernetes.io/h2c" | "http2"
    )
}
