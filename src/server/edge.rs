//! What every call gets at the edge, before tonic decodes it: a request id (Envoy's `x-request-id`, or
//! a fresh one) on a tracing span and echoed in the response headers; and an oversized request's error
//! rewritten from tonic's OUT_OF_RANGE into RESOURCE_EXHAUSTED (what gRPC specifies for a message over
//! the limit) with a message that says it is the message size, not overload.
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use http::HeaderValue;
use tonic::{Code, Status};
use tracing::Instrument;

pub const REQUEST_ID: &str = "x-request-id";

#[derive(Debug, Clone, Copy)]
pub struct EdgeLayer {
    pub max_message_size: usize,
}

impl<S> tower::Layer<S> for EdgeLayer {
    type Service = EdgeService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        EdgeService { inner, max_message_size: self.max_message_size }
    }
}

#[derive(Debug, Clone)]
pub struct EdgeService<S> {
    inner: S,
    max_message_size: usize,
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
{
    type Response = S::Response;
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
        let span = tracing::info_span!("call", request_id = %id, method = %req.uri().path());
        let limit = self.max_message_size;
        let fut = self.inner.call(req);
        Box::pin(
            async move {
                let mut res = fut.await?;
                if let Ok(v) = HeaderValue::from_str(&id) {
                    res.headers_mut().insert(REQUEST_ID, v);
                }
                rewrite_oversized(res.headers_mut(), limit);
                Ok(res)
            }
            .instrument(span),
        )
    }
}

/// tonic answers a request above the decoding limit with OUT_OF_RANGE "Error, decoded message length
/// too large: found N bytes, the limit is: M bytes" (trailers-only, so in the headers).
fn rewrite_oversized(headers: &mut http::HeaderMap, limit: usize) {
    let Some(status) = Status::from_header_map(headers) else { return };
    if status.code() != Code::OutOfRange || !status.message().contains("message length too large") {
        return;
    }
    let found = status
        .message()
        .split("found ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .map(|n| format!("{n} bytes"))
        .unwrap_or_else(|| "more bytes".into());
    let replacement = Status::resource_exhausted(format!(
        "request message too large: {found}, above this server's --max-message-size of {limit} bytes; \
         split the request (this is not overload: retrying the same message will fail again)"
    ));
    let _ = replacement.add_header(headers);
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
        rewrite_oversized(&mut h, 4096);
        let s = Status::from_header_map(&h).unwrap();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.message().contains("5000 bytes") && s.message().contains("--max-message-size of 4096"), "{s:?}");
        // Any other status is left alone.
        let mut h = http::HeaderMap::new();
        Status::out_of_range("index 3").add_header(&mut h).unwrap();
        rewrite_oversized(&mut h, 4096);
        assert_eq!(Status::from_header_map(&h).unwrap().code(), Code::OutOfRange);
    }

    #[test]
    fn ids_are_unique() {
        assert_ne!(new_id(), new_id());
        assert_eq!(new_id().len(), 32);
    }
}
