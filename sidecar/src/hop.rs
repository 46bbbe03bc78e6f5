//! Message hygiene at the proxy boundary, both directions: hop-by-hop headers removed (RFC 9110
//! §7.6.1) — `Connection` and every header it names, `Keep-Alive`, `Proxy-Connection`,
//! `Transfer-Encoding`, `Upgrade`, and `TE` except `trailers` (which gRPC needs) — so a caller
//! cannot make the proxy drop an end-to-end header (`Connection: x-weft-…`) or smuggle framing;
//! a request whose `Host` and authority disagree is refused (400). WebSocket (an HTTP/1.1 GET
//! upgrading to `websocket`) is carried: its `Upgrade`/`Connection` pair is kept, and once
//! both sides answered 101 the two upgraded connections are spliced. Other upgrades and
//! CONNECT are refused (501) rather than half-done.

use hyper::HeaderMap;
use hyper::header::{CONNECTION, HOST, HeaderName, TE, TRANSFER_ENCODING, UPGRADE};

/// How many headers [`ALWAYS`] lists.
const HOPS: usize = 5;

/// The hop-by-hop headers [`strip`] always removes (`TE` is rewritten, not listed);
/// `Connection` first.
static ALWAYS: [HeaderName; HOPS] = [
    CONNECTION,
    TRANSFER_ENCODING,
    UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes the hop-by-hop headers of one message. One pass over its header names finds which
/// are there; only those are removed (a message without any, as most requests between
/// HTTP/1.1 keep-alive peers, is left as it is).
pub fn strip(headers: &mut HeaderMap) {
    let mut present = [false; HOPS];
    let mut te = false;
    for name in headers.keys() {
        if let Some(i) = ALWAYS.iter().position(|h| h == name) {
            present[i] = true;
        } else if name == TE {
            te = true;
        }
    }
    // `Connection` is itself a hop header: without one, no other header is named by it.
    if present[0] {
        strip_named(headers);
    }
    for (n, there) in ALWAYS.iter().zip(present) {
        if there {
            headers.remove(n);
        }
    }
    if te {
        keep_te_trailers(headers);
    }
}

/// Removes the headers `Connection` names, except `Host` and `TE`.
fn strip_named(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        // `keep-alive`, the usual option, names a header removed below anyway: not parsed.
        .filter(|t| !t.eq_ignore_ascii_case("keep-alive"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for n in named {
        // Never let `Connection` remove the headers the mesh itself relies on end to end.
        if n != HOST && n != TE {
            headers.remove(&n);
        }
    }
}

/// `TE` is hop-by-hop but `TE: trailers` is what gRPC needs end to end: kept as only that.
fn keep_te_trailers(headers: &mut HeaderMap) {
    let trailers = headers
        .get_all(TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    headers.remove(TE);
    if trailers {
        headers.insert(TE, hyper::header::HeaderValue::from_static("trailers"));
    }
}

/// Why a request cannot be forwarded as it is, if it cannot: (status, reason, message).
/// `from_mesh`: it came from a verified mesh peer, whose HTTP/2 `:authority` names the
/// endpoint (the peer sidecar's connection pool) while `Host` names the Service.
pub fn refusal<B>(req: &hyper::Request<B>, from_mesh: bool) -> Option<Refusal> {
    let mut hosts = req.headers().get_all(HOST).iter().map(|v| v.as_bytes());
    let host = hosts.next();
    if hosts.next().is_some() {
        return Some((
            hyper::StatusCode::BAD_REQUEST,
            "host-conflict",
            "weft: more than one Host header".into(),
        ));
    }
    // The same host, with or without the scheme's default port, is no conflict.
    let bare = |s: &[u8]| -> Vec<u8> {
        let s = s.to_ascii_lowercase();
        let default = if req.uri().scheme_str() == Some("https") {
            &b":443"[..]
        } else {
            &b":80"[..]
        };
        s.strip_suffix(default).map(<[u8]>::to_vec).unwrap_or(s)
    };
    // An absolute-form target (HTTP/1) or `:authority` (HTTP/2) and a Host that disagree is
    // the classic way to route by one and be served by the other (RFC 9113 §8.3.1 calls such
    // an HTTP/2 request malformed). The one exception is the mesh's own HTTP/2 between
    // sidecars, which addresses the endpoint by `:authority` and passes `Host` on.
    let mesh_h2 = from_mesh && req.version() == hyper::Version::HTTP_2;
    if !mesh_h2
        && let (Some(authority), Some(host)) = (req.uri().authority(), host)
        && bare(authority.as_str().as_bytes()) != bare(host)
    {
        return Some((
            hyper::StatusCode::BAD_REQUEST,
            "host-conflict",
            format!(
                "weft: the request's authority {:?} and its Host header {:?} disagree",
                authority.as_str(),
                String::from_utf8_lossy(host)
            ),
        ));
    }
    if (req.headers().contains_key(UPGRADE) && !is_websocket(req))
        || req.method() == hyper::Method::CONNECT
    {
        return Some((
            hyper::StatusCode::NOT_IMPLEMENTED,
            "upgrade-unsupported",
            "weft: only WebSocket upgrades are carried through the mesh (no other upgrade, no CONNECT)".into(),
        ));
    }
    None
}

/// What a refused request is answered with: (status, reason, message).
pub type Refusal = (hyper::StatusCode, &'static str, String);

/// Readies a request to cross the proxy: refused when it cannot ([`refusal`]); else its
/// hop-by-hop headers removed (a WebSocket keeps its upgrade pair), and for a WebSocket the
/// caller's side of the upgrade, for [`response`].
pub fn request<B>(
    req: &mut hyper::Request<B>,
    from_mesh: bool,
) -> Result<Option<hyper::upgrade::OnUpgrade>, Refusal> {
    if let Some(r) = refusal(req, from_mesh) {
        return Err(r);
    }
    let websocket = is_websocket(req);
    let downstream = websocket.then(|| hyper::upgrade::on(&mut *req));
    strip(req.headers_mut());
    if websocket {
        keep_websocket(req.headers_mut());
    }
    Ok(downstream)
}

/// Readies the response: hop-by-hop headers removed; when it is the 101 of a WebSocket
/// ([`request`] gave `downstream`), the pair is kept and the two upgraded connections spliced.
pub fn response<B>(
    resp: &mut hyper::Response<B>,
    downstream: Option<hyper::upgrade::OnUpgrade>,
    metrics: &std::sync::Arc<crate::metrics::Metrics>,
    listener: &'static str,
) {
    strip(resp.headers_mut());
    if let Some(downstream) = downstream
        && resp.status() == hyper::StatusCode::SWITCHING_PROTOCOLS
    {
        let upstream = hyper::upgrade::on(&mut *resp);
        keep_websocket(resp.headers_mut());
        splice_upgrades(downstream, upstream, metrics.clone(), listener);
    }
}

/// Whether `req` asks for a WebSocket: HTTP/1.1 GET, `Upgrade: websocket`, and `Connection`
/// naming `upgrade`.
fn is_websocket<B>(req: &hyper::Request<B>) -> bool {
    let has = |name: HeaderName, token: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    req.method() == hyper::Method::GET
        && req.version() == hyper::Version::HTTP_11
        && has(UPGRADE, "websocket")
        && has(CONNECTION, "upgrade")
}

/// Puts back the WebSocket upgrade pair [`strip`] removed (on a WebSocket request, or its 101).
fn keep_websocket(headers: &mut HeaderMap) {
    headers.insert(
        CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    headers.insert(
        UPGRADE,
        hyper::header::HeaderValue::from_static("websocket"),
    );
}

/// Once both sides have upgraded, copies bytes between them until either closes.
fn splice_upgrades(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    listener: &'static str,
) {
    tokio::spawn(async move {
        match tokio::try_join!(downstream, upstream) {
            Ok((d, u)) => {
                metrics.tcp_connection(listener, false);
                let (mut d, mut u) = (
                    hyper_util::rt::TokioIo::new(d),
                    hyper_util::rt::TokioIo::new(u),
                );
                if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
                    tracing::debug!(listener, error = %e, "WebSocket ended");
                }
            }
            Err(e) => {
                tracing::info!(listener, error = %e, "WebSocket upgrade failed");
                metrics.connection_error(listener);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret, host"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("x-secret", "1"),
            ("upgrade", "h2c"),
            ("te", "trailers, deflate"),
            ("host", "app"),
            ("x-end-to-end", "kept"),
        ]);
        strip(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["host", "x-end-to-end", "te"]);
        assert_eq!(h["te"], "trailers");
        let mut h = headers(&[("te", "gzip")]);
        strip(&mut h);
        assert!(h.is_empty());
        // Each hop header alone, without a `Connection` to name it (the pass that finds which
        // are present must not need one): removed, whatever its case on the wire.
        for hop in [
            "Transfer-Encoding",
            "upgrade",
            "Keep-Alive",
            "proxy-connection",
            "CONNECTION",
        ] {
            let mut h = headers(&[(hop, "x"), ("x-end-to-end", "kept")]);
            strip(&mut h);
            let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
            assert_eq!(left, ["x-end-to-end"], "{hop}");
        }
    }

    #[test]
    fn conflicting_hosts_and_upgrades_are_refused() {
        let req = |uri: &str, hs: &[(&str, &str)]| {
            let mut b = hyper::Request::builder().uri(uri);
            for (k, v) in hs {
                b = b.header(*k, *v);
            }
            b.body(()).expect("request")
        };
        assert!(refusal(&req("/", &[("host", "a")]), false).is_none());
        assert!(refusal(&req("http://a/", &[("host", "A")]), false).is_none());
        assert!(refusal(&req("http://a:80/", &[("host", "a")]), false).is_none());
        let (s, r, _) = refusal(&req("http://a/", &[("host", "b")]), false).expect("conflict");
        assert_eq!((s.as_u16(), r), (400, "host-conflict"));
        let (s, _, _) =
            refusal(&req("/", &[("host", "a"), ("host", "b")]), false).expect("two hosts");
        assert_eq!(s.as_u16(), 400);
        let (s, r, _) =
            refusal(&req("/", &[("host", "a"), ("upgrade", "websocket")]), false).expect("upgrade");
        assert_eq!(
            (s.as_u16(), r),
            (501, "upgrade-unsupported"),
            "no Connection: upgrade"
        );
        let (s, _, _) = refusal(
            &req("/", &[("upgrade", "h2c"), ("connection", "upgrade")]),
            false,
        )
        .expect("h2c upgrade");
        assert_eq!(s.as_u16(), 501);
        let ws = req(
            "/",
            &[
                ("host", "a"),
                ("upgrade", "websocket"),
                ("connection", "Upgrade"),
            ],
        );
        assert!(
            is_websocket(&ws) && refusal(&ws, false).is_none(),
            "WebSocket is carried"
        );
        // HTTP/2: `:authority` and Host must agree, except between sidecars (mesh mTLS).
        let h2 = |uri: &str, host: &str| {
            hyper::Request::builder()
                .version(hyper::Version::HTTP_2)
                .uri(uri)
                .header("host", host)
                .body(())
                .expect("request")
        };
        let (s, r, _) = refusal(&h2("http://a/", "b"), false).expect("h2 conflict");
        assert_eq!((s.as_u16(), r), (400, "host-conflict"));
        assert!(refusal(&h2("http://a/", "a"), false).is_none());
        assert!(refusal(&h2("https://10.0.0.1:8080/", "svc"), true).is_none());
    }
}
