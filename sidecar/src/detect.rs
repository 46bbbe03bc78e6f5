//! Protocol detection and the original destination of redirected connections.
//!
//! A connection iptables redirected to the outbound port carries its original destination
//! (`SO_ORIGINAL_DST`). Its first bytes are peeked (never consumed) for a short time: an HTTP/1
//! request line or the HTTP/2 prior-knowledge preface makes it HTTP; anything else, silence
//! (server-speaks-first protocols), or a port listed as server-first makes it opaque TCP,
//! forwarded to the original destination untouched.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use tokio::net::TcpStream;

/// How long to wait for a client's first bytes before treating the connection as opaque.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(200);
/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// Anything else.
    Opaque,
}

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Classifies a connection's first bytes. `None`: not enough bytes to tell yet.
pub fn classify(first: &[u8]) -> Option<Protocol> {
    if first.is_empty() {
        return None;
    }
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2).or(None);
    }
    let mut maybe_http = false;
    for m in METHODS {
        let k = first.len().min(m.len());
        if first[..k] == m[..k] {
            if k == m.len() {
                return Some(Protocol::Http1);
            }
            maybe_http = true;
        }
    }
    if maybe_http {
        None
    } else {
        Some(Protocol::Opaque)
    }
}

/// Peeks until the protocol is known or `timeout` passes (then: opaque).
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Protocol {
    let mut buf = [0u8; 32];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Protocol::Opaque,
            Ok(Ok(n)) => n,
        };
        if let Some(p) = classify(&buf[..n]) {
            return p;
        }
        if n == buf.len() {
            return Protocol::Opaque;
        }
        // More bytes are needed: wait a little for them (peek returns at once otherwise).
        tokio::time::sleep(Duration::from_millis(2)).await;
        if tokio::time::Instant::now() >= deadline {
            return Protocol::Opaque;
        }
    }
}

/// The destination a redirected connection was headed to, if iptables redirected it.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sa = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::OriginalDst).ok()?;
    let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
    Some(SocketAddr::V4(SocketAddrV4::new(
        ip,
        u16::from_be(sa.sin_port),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"POST /x"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(
            classify(b"PRI * HTTP/2.0"),
            None,
            "a partial preface waits for more"
        );
        assert_eq!(classify(b"GE"), None);
        assert_eq!(
            classify(b"\x16\x03\x01\x02\x00"),
            Some(Protocol::Opaque),
            "TLS ClientHello"
        );
        assert_eq!(
            classify(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
            Some(Protocol::Opaque),
            "Postgres"
        );
        assert_eq!(
            classify(b"get / HTTP/1.1"),
            Some(Protocol::Opaque),
            "methods are case-sensitive"
        );
        assert_eq!(classify(b""), None);
    }

    proptest::proptest! {
        /// Any bytes: classify never panics, and more bytes never turn a verdict into "unsure".
        #[test]
        fn classify_is_total_and_stable(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let verdict = classify(&bytes);
            if let Some(v) = verdict {
                let mut longer = bytes.clone();
                longer.extend_from_slice(b"xyz");
                proptest::prop_assert_eq!(classify(&longer), Some(v));
            }
        }

        /// Every request line of a known method is HTTP/1, whatever follows.
        #[test]
        fn request_lines_are_http1(m in 0usize..9, rest in proptest::collection::vec(proptest::num::u8::ANY, 0..32)) {
            let mut bytes = METHODS[m].to_vec();
            bytes.extend(rest);
            proptest::prop_assert_eq!(classify(&bytes), Some(Protocol::Http1));
        }
    }

    #[test]
    fn original_dst_is_none_without_redirect() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = l.local_addr().expect("addr");
            let c = TcpStream::connect(addr).await.expect("connect");
            // Without iptables, SO_ORIGINAL_DST is absent (ENOENT) or the address itself.
            let got = original_dst(&c);
            assert!(
                got.is_none() || got == Some(addr) || got == c.peer_addr().ok(),
                "{got:?}"
            );
        });
    }
}
