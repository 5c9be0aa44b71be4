//! The life of every call: admission while the server drains, the in-flight count the drain waits on,
//! the grace period's end, and the outcome metrics (code, reason, duration). Unary calls go through
//! [`Calls::unary`]; streams are wrapped in [`CallStream`], which records when the stream ends, fails,
//! is cut by the grace period, or is dropped by a client that hung up.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::{Code, Status};

use super::status::ServeError;
use crate::metrics;

/// Shared by every handler of one server.
pub struct Calls {
    draining: AtomicBool,
    inflight: AtomicUsize,
    idle: Notify,
    grace_over: watch::Sender<bool>,
    grace: Duration,
}

/// Held for as long as a call runs (for a stream: until the stream is dropped).
pub struct CallGuard {
    calls: Arc<Calls>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        metrics::INFLIGHT.with(&[]).set(self.calls.inflight.fetch_sub(1, Ordering::AcqRel) as i64 - 1);
        if self.calls.inflight.load(Ordering::Acquire) == 0 {
            self.calls.idle.notify_waiters();
        }
    }
}

impl Calls {
    pub fn new(grace: Duration) -> Arc<Self> {
        Arc::new(Self {
            draining: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            idle: Notify::new(),
            grace_over: watch::channel(false).0,
            grace,
        })
    }

    /// Admits a call, or refuses it with UNAVAILABLE once the server drains.
    pub fn enter(self: &Arc<Self>) -> Result<CallGuard, ServeError> {
        if self.draining.load(Ordering::Acquire) {
            return Err(ServeError::ShuttingDown);
        }
        let n = self.inflight.fetch_add(1, Ordering::AcqRel) + 1;
        metrics::INFLIGHT.with(&[]).set(n as i64);
        Ok(CallGuard { calls: self.clone() })
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// Refuse new calls from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Resolves when no call is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.inflight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Ends every call still running with UNAVAILABLE.
    pub fn end_grace(&self) {
        self.grace_over.send_replace(true);
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Resolves when the grace period has ended.
    pub fn grace_over(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.grace_over.subscribe();
        async move {
            let _ = rx.wait_for(|over| *over).await;
        }
    }

    /// Runs a unary handler: cut short with UNAVAILABLE if the grace period ends first, and recorded.
    pub async fn unary<T>(
        self: &Arc<Self>,
        method: &'static str,
        work: impl Future<Output = (Arc<str>, Result<T, ServeError>)>,
    ) -> Result<T, Status> {
        let started = Instant::now();
        let _guard = match self.enter() {
            Ok(g) => g,
            Err(e) => return Err(record_error(method, "none", started, e)),
        };
        let grace_over = self.grace_over();
        tokio::select! {
            (model, result) = work => match result {
                Ok(v) => {
                    record(method, &model, started, Code::Ok, None);
                    Ok(v)
                }
                Err(e) => Err(record_error(method, &model, started, e)),
            },
            _ = grace_over => Err(record_error(method, "none", started, ServeError::GraceOver(self.grace))),
        }
    }
}

fn record(method: &str, model: &str, started: Instant, code: Code, reason: Option<&str>) {
    let code_name = code_name(code);
    metrics::REQUESTS.with(&[model, method, code_name]).inc();
    if let Some(reason) = reason {
        metrics::FAILURES.with(&[model, method, code_name, reason]).inc();
    }
    metrics::REQUEST_DURATION.observe_duration(&[model, method], started.elapsed());
}

/// Records a failed call and turns its error into the status the caller gets.
pub fn record_error(method: &str, model: &str, started: Instant, err: ServeError) -> Status {
    let (code, reason) = err.code_and_reason();
    record(method, model, started, code, Some(reason));
    err.into()
}

/// gRPC's canonical code names, as Prometheus label values.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

type Inner<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A response stream that holds its call's place in the in-flight count, ends with UNAVAILABLE when the
/// grace period ends, and records its outcome exactly once.
pub struct CallStream<T> {
    inner: Inner<T>,
    grace_over: Pin<Box<dyn Future<Output = ()> + Send>>,
    grace: Duration,
    method: &'static str,
    model: Arc<str>,
    started: Instant,
    /// The failure the stream ended with, for the metric's reason label.
    reason_of: fn(&Status) -> &'static str,
    done: bool,
    _guard: CallGuard,
}

impl<T> CallStream<T> {
    pub fn new(
        calls: &Arc<Calls>,
        guard: CallGuard,
        method: &'static str,
        model: Arc<str>,
        started: Instant,
        inner: Inner<T>,
        reason_of: fn(&Status) -> &'static str,
    ) -> Self {
        Self {
            inner,
            grace_over: Box::pin(calls.grace_over()),
            grace: calls.grace(),
            method,
            model,
            started,
            reason_of,
            done: false,
            _guard: guard,
        }
    }

    fn finish(&mut self, code: Code, reason: Option<&str>) {
        if !self.done {
            self.done = true;
            record(self.method, &self.model, self.started, code, reason);
        }
    }
}

impl<T> Stream for CallStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.grace_over.as_mut().poll(cx).is_ready() {
            let err = ServeError::GraceOver(self.grace);
            let (code, reason) = err.code_and_reason();
            self.finish(code, Some(reason));
            return Poll::Ready(Some(Err(err.into())));
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Err(status))) => {
                let reason = (self.reason_of)(&status);
                self.finish(status.code(), Some(reason));
                Poll::Ready(Some(Err(status)))
            }
            Poll::Ready(None) => {
                self.finish(Code::Ok, None);
                Poll::Ready(None)
            }
            other => other,
        }
    }
}

impl<T> Drop for CallStream<T> {
    fn drop(&mut self) {
        // Dropped before it ended: the client hung up (or its deadline passed on its side).
        self.finish(Code::Cancelled, Some("client_cancelled"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn draining_refuses_new_calls_and_waits_for_running_ones() {
        let calls = Calls::new(Duration::from_secs(1));
        let guard = calls.enter().unwrap();
        calls.start_draining();
        assert!(matches!(calls.enter(), Err(ServeError::ShuttingDown)));
        let idle = tokio::spawn({
            let calls = calls.clone();
            async move { calls.idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!idle.is_finished());
        drop(guard);
        tokio::time::timeout(Duration::from_secs(1), idle).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn the_end_of_grace_cuts_unary_calls_and_streams() {
        let calls = Calls::new(Duration::from_secs(25));
        let unary = tokio::spawn({
            let calls = calls.clone();
            async move {
                calls
                    .unary("Predict", async {
                        std::future::pending::<()>().await;
                        ("m".into(), Ok::<(), ServeError>(()))
                    })
                    .await
            }
        });
        let guard = calls.enter().unwrap();
        let inner: Inner<u32> = Box::pin(tokio_stream::pending());
        let mut stream = CallStream::new(&calls, guard, "Generate", "m".into(), Instant::now(), inner, |_| "x");
        tokio::task::yield_now().await;
        calls.end_grace();
        let err = unary.await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(err.message().contains("grace period"), "{}", err.message());
        use tokio_stream::StreamExt;
        let item = stream.next().await.unwrap().unwrap_err();
        assert_eq!(item.code(), Code::Unavailable);
        assert!(stream.next().await.is_none());
        drop(stream);
        assert_eq!(calls.inflight(), 0);
    }
}
