//! Call deadlines from the `grpc-timeout` header (an integer of at most 8 digits and a unit, H M S m u n).
//!
//! tonic's transport enforces that header itself and answers an expired call with CANCELLED, a code
//! that Istio's default retry policy retries; so do clients' own timers (tonic's client reports CANCELLED
//! too). This layer sits just inside tonic's and fires a little earlier (see [`margin`]), so that an
//! expired unary call ends with DEADLINE_EXCEEDED and that status reaches the caller before its own
//! timer fires; it also puts the
//! [`Deadline`] into the request's extensions, where handlers pass it to the batchers (which drop
//! expired work before it reaches a model, and end streams that run past it).
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;

use super::status::ServeError;
use crate::validate::ValidationError;

/// When the caller stops waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub Instant);

/// How much earlier than the caller's deadline we give up: enough for the status to travel back before
/// the caller's (and tonic's) timer fires, which takes a few ms on a busy machine, and for a stream
/// to get its trailers out behind the tokens already queued; at least one tick of tokio's millisecond
/// timer wheel, at most 20 ms, and at most a twentieth of a short timeout.
fn margin(timeout: Duration) -> Duration {
    Duration::from_millis(20).min(timeout / 20).max(Duration::from_millis(1))
}

/// `default`: the deadline of unary calls that set no `grpc-timeout` (`--request-timeout`);
/// `stream_default`: of generation streams (`--stream-timeout`).
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer {
    pub default: Option<Duration>,
    pub stream_default: Option<Duration>,
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService { inner, limits: *self }
    }
}

#[derive(Debug, Clone)]
pub struct DeadlineService<S> {
    inner: S,
    limits: DeadlineLayer,
}

/// The generation streams, whose default deadline is `--stream-timeout`.
fn is_stream(path: &str) -> bool {
    path.ends_with("/Generate") || path.ends_with("/ModelStreamInfer")
}

/// A bidirectional session (Triton's clients hold one ModelStreamInfer open for their lifetime): only
/// the caller's own grpc-timeout bounds it, never a server default.
fn is_session(path: &str) -> bool {
    path.ends_with("/ModelStreamInfer")
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for DeadlineService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let timeout = match req.headers().get("grpc-timeout").map(|v| v.to_str().ok().and_then(parse)) {
            None => None,
            Some(Some(t)) => Some(t),
            Some(None) => {
                let got = req.headers().get("grpc-timeout").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                let got = got.unwrap_or_default();
                let err = ServeError::Invalid(ValidationError::BadHeader {
                    header: "grpc-timeout",
                    expected: "up to 8 digits and a unit H, M, S, m, u or n",
                    got,
                });
                return Box::pin(std::future::ready(Ok(Status::from(err).into_http())));
            }
        };
        let stream = is_stream(req.uri().path());
        let default = match (is_session(req.uri().path()), stream) {
            (true, _) => None,
            (false, true) => self.limits.stream_default,
            (false, false) => self.limits.default,
        };
        let (timeout, whose) = match (timeout, default) {
            (Some(t), _) => (t, "the call's grpc-timeout"),
            (None, Some(t)) if stream => (t, "the server's --stream-timeout (the call set no grpc-timeout)"),
            (None, Some(t)) => (t, "the server's --request-timeout (the call set no grpc-timeout)"),
            (None, None) => return Box::pin(self.inner.call(req)),
        };
        let deadline = Instant::now() + timeout.saturating_sub(margin(timeout));
        req.extensions_mut().insert(Deadline(deadline));
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, fut).await {
                Ok(result) => result,
                Err(_) => Ok(Status::from(ServeError::Deadline { whose, timeout }).into_http()),
            }
        })
    }
}

/// Reads the deadline the layer stored for this call.
pub fn of<T>(request: &tonic::Request<T>) -> Option<Instant> {
    request.extensions().get::<Deadline>().map(|d| d.0)
}

fn parse(s: &str) -> Option<Duration> {
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_streams_have_their_own_default() {
        assert!(is_stream("/omnibus.v1.Inference/Generate"));
        assert!(is_stream("/inference.GRPCInferenceService/ModelStreamInfer"));
        assert!(!is_stream("/omnibus.v1.Inference/Predict"));
    }

    #[test]
    fn the_margin_is_small_and_bounded() {
        assert_eq!(margin(Duration::from_secs(10)), Duration::from_millis(20));
        assert_eq!(margin(Duration::from_millis(100)), Duration::from_millis(5));
        assert_eq!(margin(Duration::from_millis(3)), Duration::from_millis(1));
    }

    #[test]
    fn parses_every_unit_and_rejects_junk() {
        assert_eq!(parse("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("10n"), Some(Duration::from_nanos(10)));
        assert_eq!(parse("S"), None);
        assert_eq!(parse("5x"), None);
        assert_eq!(parse("+5S"), None);
        assert_eq!(parse("123456789S"), None); // more than 8 digits
    }
}
