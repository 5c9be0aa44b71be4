//! What every call gets at the edge, before tonic decodes it: a request id (Envoy's `x-request-id`, or
//! a fresh one) on a tracing span and echoed in the response headers; metadata over `--max-header-bytes`
//! refused for this call alone; the call counted as open on its connection (see `conn`) until its
//! response body ends; an oversized request's error rewritten from tonic's OUT_OF_RANGE into
//! RESOURCE_EXHAUSTED (what gRPC specifies for a message over the limit) with a message that says it is
//! the message size, not overload; and the calls refused before any handler ran (too much metadata, a
//! malformed message) counted in the metrics.
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use tonic::Status;
use tracing::Instrument;

use super::calls;
use super::conn::{self, OpenCall};
use super::status::ServeError;

pub const REQUEST_ID: &str = "x-request-id";

#[derive(Debug, Clone, Copy)]
pub struct EdgeLayer {
    pub max_message_size: usize,
    pub max_header_bytes: usize,
}

impl<S> tower::Layer<S> for EdgeLayer {
    type Service = EdgeService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        EdgeService { inner, limits: *self }
    }
}

#[derive(Debug, Clone)]
pub struct EdgeService<S> {
    inner: S,
    limits: EdgeLayer,
}

/// The size of a request's metadata as HTTP/2 counts it against SETTINGS_MAX_HEADER_LIST_SIZE: every
/// name and value, plus 32 bytes per entry (pseudo-headers included).
fn header_list_size<B>(req: &http::Request<B>) -> usize {
    let pseudo = [
        (":method", req.method().as_str().len()),
        (":scheme", req.uri().scheme_str().map_or(0, str::len)),
        (":authority", req.uri().authority().map_or(0, |a| a.as_str().len())),
        (":path", req.uri().path_and_query().map_or(0, |p| p.as_str().len())),
    ];
    pseudo.iter().map(|(n, v)| n.len() + v + 32).sum::<usize>()
        + req.headers().iter().map(|(n, v)| n.as_str().len() + v.len() + 32).sum::<usize>()
}

/// The method's name (`Predict`, `ModelInfer`, ...) for the metrics.
fn method_of(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_string()
}

/// A response body that keeps its call counted as open on the connection until it ends or is dropped.
pub struct Tracked<B> {
    inner: B,
    _open: Option<OpenCall>,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn new_id() -> String {
    use std::hash::{BuildHasher, RandomState};
    static N: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
    let n = N.fetch_add(1, Ordering::Relaxed);
    let seed = SEED.get_or_init(RandomState::new);
    format!("{:016x}{:016x}", seed.hash_one((n, 1u8)), seed.hash_one((n, 2u8)))
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for EdgeService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<Tracked<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        // Envoy's ids are UUIDs; accept any short printable value, else make one.
        let id = req
            .headers()
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(str::to_string)
            .unwrap_or_else(new_id);
        let conn = conn::info_of(&req);
        let peer = conn.and_then(|c| c.remote_addr()).map(|a| a.to_string()).unwrap_or_default();
        let span = tracing::info_span!("call", request_id = %id, method = %req.uri().path(), %peer);
        let method = method_of(req.uri().path());
        let open = conn.map(|c| c.state.open());
        let limits = self.limits;
        let tracked = move |res: http::Response<ResBody>| res.map(|inner| Tracked { inner, _open: open });
        let size = header_list_size(&req);
        if size > limits.max_header_bytes {
            // Refused here, for this call alone: hyper would otherwise reset the stream with HTTP 431 (which
            // gRPC clients see as UNKNOWN) or, a little larger, close the whole connection with its other
            // calls (see `serve`, which gives HTTP/2 a far larger limit than this one).
            let err = ServeError::HeaderTooLarge { bytes: size, limit: limits.max_header_bytes };
            calls::record_refused(&method, &err);
            let mut res = Status::from(err).into_http::<ResBody>();
            if let Ok(v) = HeaderValue::from_str(&id) {
                res.headers_mut().insert(REQUEST_ID, v);
            }
            return Box::pin(std::future::ready(Ok(tracked(res))));
        }
        let fut = self.inner.call(req);
        Box::pin(
            async move {
                let mut res = fut.await?;
                if let Ok(v) = HeaderValue::from_str(&id) {
                    res.headers_mut().insert(REQUEST_ID, v);
                }
                refused_by_tonic(res.headers_mut(), &method, limits.max_message_size);
                Ok(tracked(res))
            }
            .instrument(span),
        )
    }
}

/// A request tonic could not read (a malformed message or frame, a message over the size limit) never
/// reached a handler, which would have counted it: its status is mapped into the one table
/// (`ServeError::from_tonic`: INTERNAL framing errors become INVALID_ARGUMENT, an oversized message's
/// OUT_OF_RANGE becomes RESOURCE_EXHAUSTED naming the size and the limit, as gRPC specifies) and
/// counted here. A status before any message is trailers-only, so it is in the headers.
fn refused_by_tonic(headers: &mut http::HeaderMap, method: &str, max_message_size: usize) {
    let Some(status) = Status::from_header_map(headers) else { return };
    let Some(err) = ServeError::from_tonic(&status, max_message_size) else { return };
    calls::record_refused(method, &err);
    let _ = Status::from(err).add_header(headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_becomes_resource_exhausted_naming_the_limit() {
        let mut h = http::HeaderMap::new();
        Status::out_of_range("Error, decoded message length too large: found 5000 bytes, the limit is: 4096 bytes")
            .add_header(&mut h)
            .unwrap();
        refused_by_tonic(&mut h, "Predict", 4096);
        let s = Status::from_header_map(&h).unwrap();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(s.message().contains("5000 bytes") && s.message().contains("--max-message-size of 4096"), "{s:?}");
        // Any other status is left alone.
        let mut h = http::HeaderMap::new();
        Status::out_of_range("index 3").add_header(&mut h).unwrap();
        refused_by_tonic(&mut h, "Predict", 4096);
        assert_eq!(Status::from_header_map(&h).unwrap().code(), tonic::Code::OutOfRange);
    }

    #[test]
    fn metadata_is_sized_as_http2_counts_it() {
        let req = http::Request::builder()
            .uri("http://h/omnibus.v1.Inference/Predict")
            .header("x-a", "12345")
            .body(())
            .unwrap();
        // :method GET (3), :scheme http (4), :authority h (1), :path (29), x-a (3 + 5).
        let pseudo = (7 + 3) + (7 + 4) + (10 + 1) + (5 + 29) + 4 * 32;
        assert_eq!(header_list_size(&req), pseudo + 3 + 5 + 32);
        assert_eq!(method_of("/omnibus.v1.Inference/Predict"), "Predict");
    }

    #[test]
    fn ids_are_unique() {
        assert_ne!(new_id(), new_id());
        assert_eq!(new_id().len(), 32);
    }
}
