//! The HTTP types every part of the request path shares — the body, request and response of
//! the proxy, the answer the proxy gives itself when it refuses a request, and the hash map its
//! lookups use. A leaf module.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Request, Response, StatusCode};
use weft_proto::keys::PROXY_REASON_HEADER;

/// A hash map for lookups on the request path (host names, endpoint addresses): foldhash,
/// seeded per process, instead of SipHash, which cost more than the lookups it hashed for.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Response body of the proxy.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A request on the proxy's request path.
pub type Req = Request<Body>;
/// A response on the proxy's request path.
pub type Resp = Response<Body>;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Answers with a status and a reason header (a request the proxy refused itself).
pub fn refuse(status: StatusCode, reason: &'static str, detail: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(detail + "\n"))
            .map_err(|n| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        PROXY_REASON_HEADER,
        hyper::header::HeaderValue::from_static(reason),
    );
    r
}

/// The URI of a request forwarded to `to`: its path and query on `scheme://to`.
pub fn forward_uri(scheme: &str, to: SocketAddr, uri: &hyper::Uri) -> Result<hyper::Uri, String> {
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    format!("{scheme}://{to}{pq}")
        .parse()
        .map_err(|_| format!("weft: cannot forward {pq:?}"))
}
