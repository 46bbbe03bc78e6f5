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

/// Protocols a port name may declare by its prefix (`http`, `grpc-api`, `tcp-db`), as
/// Istio reads them; longest first so `grpc-web` is not read as `grpc`.
const NAMED_PROTOCOLS: [&str; 8] = [
    "grpc-web", "http2", "https", "http", "grpc", "h2c", "tcp", "tls",
];

/// The protocol a Service port declares: its `appProtocol`, else its name's prefix
/// (`<protocol>[-<suffix>]`), lowercase; `""` when it declares none.
pub fn of_port(name: &str, app_protocol: Option<&str>) -> String {
    if let Some(p) = app_protocol.map(str::trim).filter(|p| !p.is_empty()) {
        return p.to_ascii_lowercase();
    }
    let name = name.to_ascii_lowercase();
    NAMED_PROTOCOLS
        .iter()
        .find(|p| {
            name.strip_prefix(**p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
        })
        .map(|p| p.to_string())
        .unwrap_or_default()
}

/// Whether a protocol word means the endpoints speak HTTP/2 only (requests go to them over
/// HTTP/2 with prior knowledge).
pub fn is_http2(protocol: &str) -> bool {
    matches!(
        protocol.trim().to_ascii_lowercase().as_str(),
        "grpc" | "h2c" | "kubernetes.io/h2c" | "http2"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_declares_by_app_protocol_else_by_its_name_prefix() {
        assert_eq!(of_port("web", Some(" GRPC ")), "grpc");
        assert_eq!(of_port("http-web", None), "http");
        assert_eq!(of_port("grpc-web", None), "grpc-web");
        assert_eq!(of_port("grpc-api", None), "grpc");
        assert_eq!(of_port("tcp", Some("")), "tcp");
        assert_eq!(of_port("httpd", None), "", "a prefix must end at '-'");
        assert_eq!(of_port("", None), "");
        assert_eq!(Declared::of(&of_port("h2c-x", None)), Some(Declared::Http));
        assert_eq!(
            Declared::of(&of_port("tls-db", None)),
            Some(Declared::Opaque)
        );
    }
}
