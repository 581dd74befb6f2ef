//! Response bodies and the one function that writes OCI errors.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::splice::Splicer;
use crate::oci;
use crate::proxy::{BlobBody, Piece};

/// Every response body berth sends: bytes in memory, or a blob stream.
pub enum Body {
    Full(Option<Bytes>),
    /// A blob's pieces; file pieces go out with sendfile (`Some` splicer: plain
    /// HTTP/1.x) and are never produced without one.
    Blob(BlobBody, Option<Splicer>),
    /// A stored blob sent with sendfile (plain HTTP/1.x).
    Spliced(super::splice::SplicedBody),
}

impl Body {
    pub fn empty() -> Self {
        Body::Full(None)
    }

    pub fn bytes(b: impl Into<Bytes>) -> Self {
        Body::Full(Some(b.into()))
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Blob(b, splicer) => b.poll_piece(cx).map(|p| {
                p.map(|p| match (p?, splicer) {
                    (Piece::Bytes(b), _) => Ok(Frame::data(b)),
                    (Piece::File { file, offset, len }, Some(s)) => {
                        Ok(Frame::data(s.frame(file, offset, len)))
                    }
                    (Piece::File { .. }, None) => Err(io::Error::other(
                        "internal: a file piece on a connection that cannot send files",
                    )),
                })
            }),
            Body::Spliced(s) => Pin::new(s).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(b) => b.is_none(),
            Body::Blob(..) => false,
            Body::Spliced(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Blob(b, _) => b
                .content_length()
                .map_or_else(SizeHint::default, SizeHint::with_exact),
            Body::Spliced(s) => s.size_hint(),
        }
    }
}

pub const API_VERSION: (&str, &str) = ("docker-distribution-api-version", "registry/2.0");

/// The JSON error response for `e`; HEAD gets the same status and headers, no body.
pub fn error(e: &oci::Error, head: bool) -> Response<Body> {
    let json = e.to_json();
    let mut resp = Response::new(if head {
        Body::empty()
    } else {
        Body::bytes(json.clone())
    });
    *resp.status_mut() = e.status();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(json.len()));
    h.insert(API_VERSION.0, HeaderValue::from_static(API_VERSION.1));
    if let Some(after) = e.retry_after {
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from(after.as_secs().max(1)),
        );
    }
    if let Some(v) = e
        .challenge
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        h.insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

pub fn status(code: StatusCode, body: &'static str, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::bytes(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = code;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
