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

/// RFC 9110 `tchar`: what a method token is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Classifies a connection's first bytes. `None`: not enough bytes to tell yet.
///
/// HTTP/1 is recognised by its request line, not by a list of methods: leading empty lines
/// (which HTTP servers skip), then `token SP target SP HTTP/<d>.<d>`. A known method with its
/// space decides at once; any other token waits for the end of the line. What could still be
/// HTTP when the bytes or the time run out is treated as HTTP by [`detect`] — parsed, refused
/// if it is not — never copied raw to an application that might parse it.
pub fn classify(first: &[u8]) -> Option<Protocol> {
    // Lenient servers skip leading white space and take a tab for a space: so does this, so
    // nothing one of them would parse as a request goes by raw.
    let blank = first.iter().take_while(|b| b.is_ascii_whitespace()).count();
    let rest = &first[blank..];
    if rest.is_empty() {
        return None;
    }
    if blank == 0 {
        let n = first.len().min(H2_PREFACE.len());
        if first[..n] == H2_PREFACE[..n] {
            return (n == H2_PREFACE.len()).then_some(Protocol::Http2).or(None);
        }
    }
    if METHODS.iter().any(|m| rest.starts_with(m)) {
        return Some(Protocol::Http1);
    }
    let token = rest.iter().take_while(|b| is_tchar(**b)).count();
    if token == 0 {
        return Some(Protocol::Opaque);
    }
    if token == rest.len() {
        return None;
    }
    if rest[token] != b' ' && rest[token] != b'\t' {
        return Some(Protocol::Opaque);
    }
    let end = rest.iter().position(|b| *b == b'\n')?;
    let line = rest[..end].trim_ascii_end();
    let version = line.len() >= 9 && {
        let v = &line[line.len() - 9..];
        (v[0] == b' ' || v[0] == b'\t')
            && v[1..].starts_with(b"HTTP/")
            && v[6].is_ascii_digit()
            && v[7] == b'.'
            && v[8].is_ascii_digit()
    };
    Some(if version {
        Protocol::Http1
    } else {
        Protocol::Opaque
    })
}

/// What [`detect`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// The protocol (a stream that could still be HTTP when bytes or time ran out is HTTP/1).
    Protocol(Protocol),
    /// Not one byte within the time: a server-speaks-first protocol, or a client that waits.
    Silent,
}

/// How many first bytes are peeked to find a request line.
const PEEK_BYTES: usize = 8 * 1024;

/// Peeks until the protocol is known or `timeout` passes.
pub async fn detect_first(stream: &TcpStream, timeout: Duration) -> Detected {
    let mut buf = vec![0u8; PEEK_BYTES];
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Detected::Protocol(Protocol::Opaque),
            Err(_) if seen == 0 => return Detected::Silent,
            // Time ran out on a stream that could still be HTTP.
            Err(_) => return Detected::Protocol(Protocol::Http1),
            Ok(Ok(n)) => n,
        };
        seen = n;
        if let Some(p) = classify(&buf[..n]) {
            return Detected::Protocol(p);
        }
        if n == buf.len() {
            return Detected::Protocol(Protocol::Http1);
        }
        // More bytes are needed: wait a little for them (peek returns at once otherwise).
        tokio::time::sleep(Duration::from_millis(2)).await;
        if tokio::time::Instant::now() >= deadline {
            return Detected::Protocol(Protocol::Http1);
        }
    }
}

/// [`detect_first`] where silence counts as opaque (outbound: the local app's connection).
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Protocol {
    match detect_first(stream, timeout).await {
        Detected::Protocol(p) => p,
        Detected::Silent => Protocol::Opaque,
    }
}

/// [`detect_first`] for a stream that cannot be peeked (inside TLS): reads into `buf` until
/// [`classify`] tells or `timeout` passes; what it read stays in `buf` (also when the future
/// is dropped between reads), to be replayed with [`Replay`]. A read error is returned: the
/// stream is not to be used (TLS may still hold plaintext it decrypted before the error).
pub async fn detect_read<IO>(
    io: &mut IO,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> std::io::Result<Detected>
where
    IO: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut chunk = [0u8; 1024];
    loop {
        let detected = match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => Some(Detected::Protocol(Protocol::Opaque)),
            Err(_) if buf.is_empty() => Some(Detected::Silent),
            // Time ran out on a stream that could still be HTTP.
            Err(_) => Some(Detected::Protocol(Protocol::Http1)),
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                match classify(buf) {
                    Some(p) => Some(Detected::Protocol(p)),
                    None if buf.len() >= PEEK_BYTES => Some(Detected::Protocol(Protocol::Http1)),
                    None => None,
                }
            }
        };
        if let Some(d) = detected {
            return Ok(d);
        }
    }
}

/// A stream whose first bytes were already read: they are read again first.
#[derive(Debug)]
pub struct Replay<IO> {
    first: Vec<u8>,
    at: usize,
    inner: IO,
}

impl<IO> Replay<IO> {
    /// `inner`, with `first` (read from it before) to be read again first.
    pub fn new(first: Vec<u8>, inner: IO) -> Self {
        Replay {
            first,
            at: 0,
            inner,
        }
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Replay<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.at < this.first.len() {
            let n = (this.first.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.first[this.at..this.at + n]);
            this.at += n;
            if this.at == this.first.len() {
                this.first = Vec::new();
                this.at = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Replay<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What the first TLS record of a connection says about ALPN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hello {
    /// More bytes are needed.
    Incomplete,
    /// Not a ClientHello Weft can read (or one spread over several records).
    Malformed,
    /// A ClientHello offering these ALPN protocols (empty: no ALPN extension).
    Alpn(Vec<Vec<u8>>),
}

/// Largest ClientHello record read while sniffing (a TLS record is at most 16 KiB + header).
pub const MAX_HELLO: usize = 16 * 1024 + 5;

/// Reads the ALPN protocols a TLS ClientHello offers (RFC 8446 §4.1.2, RFC 7301 §3.1),
/// from the connection's first bytes, without consuming them. Pure and total: any bytes give
/// a verdict, never a panic.
pub fn client_hello_alpn(buf: &[u8]) -> Hello {
    struct Cur<'a>(&'a [u8]);
    impl<'a> Cur<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Some(a)
        }
        fn u8(&mut self) -> Option<usize> {
            self.take(1).map(|b| usize::from(b[0]))
        }
        fn u16(&mut self) -> Option<usize> {
            self.take(2)
                .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        }
        fn vec8(&mut self) -> Option<&'a [u8]> {
            let n = self.u8()?;
            self.take(n)
        }
        fn vec16(&mut self) -> Option<&'a [u8]> {
            let n = self.u16()?;
            self.take(n)
        }
    }
    if buf.len() < 5 {
        return if buf.is_empty() || buf[0] == 0x16 {
            Hello::Incomplete
        } else {
            Hello::Malformed
        };
    }
    if buf[0] != 0x16 {
        return Hello::Malformed;
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf.len() < 5 + len {
        return Hello::Incomplete;
    }
    let parse = || -> Option<Vec<Vec<u8>>> {
        let mut rec = Cur(&buf[5..5 + len]);
        if rec.u8()? != 1 {
            return None; // not a ClientHello
        }
        let hs_len = (rec.u8()? << 16) | rec.u16()?;
        let mut body = Cur(rec.take(hs_len)?);
        body.take(2 + 32)?; // legacy_version, random
        body.vec8()?; // legacy_session_id
        body.vec16()?; // cipher_suites
        body.vec8()?; // legacy_compression_methods
        let mut alpn = Vec::new();
        if body.0.is_empty() {
            return Some(alpn); // no extensions at all
        }
        let mut exts = Cur(body.vec16()?);
        while !exts.0.is_empty() {
            let kind = exts.u16()?;
            let data = exts.vec16()?;
            if kind == 16 {
                let mut list = Cur(Cur(data).vec16()?);
                while !list.0.is_empty() {
                    alpn.push(list.vec8()?.to_vec());
                }
            }
        }
        Some(alpn)
    };
    parse().map_or(Hello::Malformed, Hello::Alpn)
}

/// Peeks a TLS ClientHello (within `timeout`) and returns its ALPN offer; `None` when it is not
/// one Weft can read in time.
pub async fn peek_alpn(stream: &TcpStream, timeout: Duration) -> Option<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; MAX_HELLO];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return None,
        };
        match client_hello_alpn(&buf[..n]) {
            Hello::Alpn(a) => return Some(a),
            Hello::Malformed => return None,
            Hello::Incomplete if n == buf.len() => return None,
            Hello::Incomplete => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

/// Peeks up to `buf.len()` first bytes, waiting at most `timeout` for at least `want`.
pub async fn peek_some(
    stream: &TcpStream,
    buf: &mut [u8],
    want: usize,
    timeout: Duration,
) -> usize {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(buf)).await {
            Ok(Ok(n)) => n,
            _ => return 0,
        };
        if n == 0 || n >= want || tokio::time::Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The destination a redirected connection was headed to, if iptables (or ip6tables)
/// redirected it.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    if stream.local_addr().ok()?.is_ipv6() {
        let sa = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::Ip6tOriginalDst)
            .ok()?;
        let ip = std::net::Ipv6Addr::from(sa.sin6_addr.s6_addr);
        return Some(SocketAddr::V6(std::net::SocketAddrV6::new(
            ip,
            u16::from_be(sa.sin6_port),
            0,
            0,
        )));
    }
    let sa = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::OriginalDst).ok()?;
    let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
    Some(SocketAddr::V4(SocketAddrV4::new(
        ip,
        u16::from_be(sa.sin_port),
    )))
}

#[cfg(test)]
mod replay_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn what_detection_read_is_read_again_first() {
        for (sent, want) in [
            (
                &b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"[..],
                Detected::Protocol(Protocol::Http1),
            ),
            (H2_PREFACE, Detected::Protocol(Protocol::Http2)),
            (&b"\x00\x01binary"[..], Detected::Protocol(Protocol::Opaque)),
        ] {
            let (mut a, mut b) = tokio::io::duplex(64);
            // Written in two pieces: detection may need more than one read.
            let (head, tail) = sent.split_at(sent.len() / 2);
            a.write_all(head).await.expect("write");
            let writer = tokio::spawn({
                let tail = tail.to_vec();
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    a.write_all(&tail).await.expect("write");
                    a.write_all(b"|more").await.expect("write");
                    a
                }
            });
            let mut first = Vec::new();
            let seen = detect_read(&mut b, &mut first, Duration::from_secs(2))
                .await
                .expect("read");
            assert_eq!(seen, want, "{sent:?}");
            let mut r = Replay::new(first, b);
            let _a = writer.await.expect("writer");
            let mut all = vec![0u8; sent.len() + 5];
            r.read_exact(&mut all).await.expect("read");
            assert_eq!(&all[..sent.len()], sent);
            assert_eq!(&all[sent.len()..], b"|more");
        }
        // Silence is told apart from a stream cut short.
        let (_a, mut b) = tokio::io::duplex(64);
        let mut first = Vec::new();
        let seen = detect_read(&mut b, &mut first, Duration::from_millis(50))
            .await
            .expect("read");
        assert_eq!((seen, first.len()), (Detected::Silent, 0));
    }
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
            classify(b"get / HTTP/1.1\r\n"),
            Some(Protocol::Http1),
            "an HTTP server parses any token as a method"
        );
        assert_eq!(
            classify(b"PROPFIND /dav HTTP/1.1\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"PROPFIND /dav"), None, "waits for the line");
        assert_eq!(classify(b"\r\nGET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(
            classify(b"get foo\r\n"),
            Some(Protocol::Opaque),
            "memcached"
        );
        assert_eq!(
            classify(b"GET\t/\tHTTP/1.1\r\n"),
            Some(Protocol::Http1),
            "tabs"
        );
        assert_eq!(
            classify(b" \tGET / HTTP/1.1\r\n"),
            Some(Protocol::Http1),
            "leading blanks"
        );
        assert_eq!(
            classify(b"\x0cPUTX\t/ HTTP/1.0 \r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(
            classify(b"SET k v\r\n"),
            Some(Protocol::Opaque),
            "a Redis inline command"
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

        /// Any token as the method, any target: a complete request line is HTTP/1.
        #[test]
        fn any_method_token_with_a_request_line_is_http1(
            method in "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,16}",
            target in "[!-~]{1,40}",
            minor in 0u8..10,
        ) {
            let line = format!("{method} {target} HTTP/1.{minor}\r\n");
            proptest::prop_assert_eq!(classify(line.as_bytes()), Some(Protocol::Http1));
        }
    }

    /// A real ClientHello, made by rustls, offering two ALPN protocols.
    fn rustls_hello(alpn: &[&[u8]]) -> Vec<u8> {
        use weft_proto::tls::rustls;
        let mut cfg = rustls::ClientConfig::builder_with_provider(weft_proto::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from("mesh.local").expect("name");
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).expect("conn");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        out
    }

    #[test]
    fn reads_alpn_from_a_real_client_hello() {
        let hello = rustls_hello(&[b"weft-http/1.1", b"h2"]);
        assert_eq!(
            client_hello_alpn(&hello),
            Hello::Alpn(vec![b"weft-http/1.1".to_vec(), b"h2".to_vec()])
        );
        assert_eq!(client_hello_alpn(&rustls_hello(&[])), Hello::Alpn(vec![]));
        for cut in [0, 3, 5, 40, hello.len() - 1] {
            assert_eq!(
                client_hello_alpn(&hello[..cut]),
                Hello::Incomplete,
                "cut at {cut}"
            );
        }
        assert_eq!(client_hello_alpn(b"GET / HTTP/1.1\r\n"), Hello::Malformed);
    }

    proptest::proptest! {
        /// Any bytes after a TLS record header: a verdict, never a panic.
        #[test]
        fn client_hello_parser_is_total(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = client_hello_alpn(&bytes);
            let mut rec = vec![0x16, 0x03, 0x01, (bytes.len() >> 8) as u8, bytes.len() as u8];
            rec.extend_from_slice(&bytes);
            let verdict = client_hello_alpn(&rec);
            proptest::prop_assert!(verdict != Hello::Incomplete);
        }

        /// Corrupting a real ClientHello anywhere never panics the parser.
        #[test]
        fn corrupted_hello_never_panics(at in 0usize..200, byte in proptest::num::u8::ANY) {
            let mut hello = rustls_hello(&[b"weft-http/1.1"]);
            let i = at % hello.len();
            hello[i] = byte;
            let _ = client_hello_alpn(&hello);
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
