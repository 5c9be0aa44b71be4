//! The life of every call: admission while the server drains, the in-flight count the drain waits on,
//! the grace period's end, and the outcome metrics (code, reason, duration). Every call's outcome is an
//! [`Outcome`], recorded exactly once: when the handler finishes, or, if its future is dropped first
//! (the caller hung up, the deadline layer answered, the grace period ended), from its drop. Streams
//! carry theirs in [`CallStream`] until they end.
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
        metrics::INFLIGHT.with(&[]).add(-1);
        if self.calls.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
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
        // Counted before the check: a call that passes it is already visible to `idle()`, so the drain
        // can never see zero while an admitted call is about to start.
        self.inflight.fetch_add(1, Ordering::SeqCst);
        metrics::INFLIGHT.with(&[]).add(1);
        let guard = CallGuard { calls: self.clone() };
        if self.draining.load(Ordering::SeqCst) {
            return Err(ServeError::ShuttingDown);
        }
        Ok(guard)
    }

    fn grace_is_over(&self) -> bool {
        *self.grace_over.borrow()
    }

    /// Whether the server has stopped taking calls (for readiness answers).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// Refuse new calls from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
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

    /// Runs a unary handler (which records its own [`Outcome`]), cut short with UNAVAILABLE if the grace
    /// period ends first.
    pub async fn unary<T>(
        self: &Arc<Self>,
        method: &'static str,
        work: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let _guard = match self.enter() {
            Ok(g) => g,
            Err(e) => return Err(Outcome::new(self, method, None).fail(e)),
        };
        let grace_over = self.grace_over();
        tokio::select! {
            result = work => result,
            _ = grace_over => Err(ServeError::GraceOver(self.grace).into()),
        }
    }
}

/// One call's outcome for the metrics, recorded exactly once.
pub struct Outcome {
    calls: Arc<Calls>,
    method: &'static str,
    /// "none" until the call names a model, "unknown" if it names one that is not loaded.
    model: Arc<str>,
    /// The version that served the call; empty until one is picked.
    version: String,
    started: Instant,
    deadline: Option<Instant>,
    done: bool,
}

impl Outcome {
    pub fn new(calls: &Arc<Calls>, method: &'static str, deadline: Option<Instant>) -> Self {
        Self {
            calls: calls.clone(),
            method,
            model: "none".into(),
            version: String::new(),
            started: Instant::now(),
            deadline,
            done: false,
        }
    }

    pub fn set_model(&mut self, model: Arc<str>) {
        self.model = model;
    }

    /// The model and version that serve the call: calls are counted by version too, so a canary's
    /// error rate can be compared with the stable version's.
    pub fn set_served(&mut self, model: Arc<str>, version: u64) {
        self.model = model;
        self.version = version.to_string();
    }

    /// Records the call as OK (`None`) or failed with `err`: its code and reason come from the one
    /// table, `ServeError::code_and_reason`.
    fn record(&mut self, err: Option<&ServeError>) {
        if self.done {
            return;
        }
        self.done = true;
        let (code, reason) = match err {
            None => (Code::Ok, None),
            Some(e) => {
                let (code, reason) = e.code_and_reason();
                (code, Some(reason))
            }
        };
        let code_name = code_name(code);
        let (model, version, method) = (&*self.model, self.version.as_str(), self.method);
        metrics::REQUESTS.with(&[model, version, method, code_name]).inc();
        if let Some(reason) = reason {
            metrics::FAILURES.with(&[model, version, method, code_name, reason]).inc();
        }
        metrics::REQUEST_DURATION.observe_duration(&[model, method], self.started.elapsed());
    }

    pub fn ok(mut self) {
        self.record(None);
    }

    /// Records a failed call and turns its error into the status the caller gets.
    pub fn fail(mut self, err: ServeError) -> Status {
        self.record(Some(&err));
        err.into()
    }

    /// Why a call that never finished ended: the grace period, its deadline, or the client leaving.
    fn cut_short(&self) -> ServeError {
        if self.calls.grace_is_over() {
            ServeError::GraceOver(self.calls.grace)
        } else if self.deadline.is_some_and(|d| d <= Instant::now()) {
            ServeError::DeadlinePassed("before it was answered")
        } else {
            ServeError::ClientCancelled
        }
    }
}

impl Drop for Outcome {
    /// Dropped before the handler finished: the grace period ended, the deadline passed (the deadline
    /// layer answered), or the client hung up.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let why = self.cut_short();
        self.record(Some(&why));
    }
}

/// Counts a call refused before any handler saw it (too much metadata, a malformed message): no model
/// was chosen, so its model label is "none".
pub fn record_refused(method: &str, err: &ServeError) {
    let (code, reason) = err.code_and_reason();
    let code_name = code_name(code);
    metrics::REQUESTS.with(&["none", "", method, code_name]).inc();
    metrics::FAILURES.with(&["none", "", method, code_name, reason]).inc();
}

/// Counts a failure a stream answered in band (an Open Inference Protocol stream's `error_message`):
/// among the failures, by its reason; the stream itself is one call, counted once when it ends.
pub fn record_in_band(method: &str, served: Option<(&str, u64)>, err: &ServeError) {
    let (code, reason) = err.code_and_reason();
    let version = served.map(|(_, v)| v.to_string()).unwrap_or_default();
    let model = served.map(|(m, _)| m).unwrap_or("unknown");
    metrics::FAILURES.with(&[model, &version, method, code_name(code), reason]).inc();
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

/// A stream's messages, or the error that ends it (turned into its status, and its recorded outcome,
/// here).
pub type Inner<T> = Pin<Box<dyn Stream<Item = Result<T, ServeError>> + Send>>;

/// A stalled reader (an HTTP/2 window at zero) stops hyper from polling the response body, so a stream
/// cannot notice its own deadline; a watchdog this long after it ends the call on the server's side.
const STALL_GRACE: Duration = Duration::from_millis(250);

/// What ending a stream's call takes: its outcome to record and its place in the in-flight count.
struct Ending {
    outcome: Outcome,
    _guard: CallGuard,
}

/// A response stream that holds its call's place in the in-flight count, ends with DEADLINE_EXCEEDED at
/// the call's deadline (a few ms before the caller's own timer, like unary calls) or with UNAVAILABLE
/// when the grace period ends, and records its outcome when it ends (or, through the outcome's drop,
/// when the client drops it). A watchdog ends the call at its deadline even when the client has stopped
/// reading (hyper then holds the body and never polls it again): the outcome is recorded and the
/// in-flight count released, though the HTTP/2 stream itself stays until the client reads or the
/// connection closes (hyper cannot reset one stream from outside).
pub struct CallStream<T> {
    inner: Inner<T>,
    grace_over: Pin<Box<dyn Future<Output = ()> + Send>>,
    grace: Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    ending: Arc<std::sync::Mutex<Option<Ending>>>,
    watchdog: Option<tokio::task::JoinHandle<()>>,
    finished: bool,
}

impl<T: Send + 'static> CallStream<T> {
    pub fn new(calls: &Arc<Calls>, guard: CallGuard, outcome: Outcome, inner: Inner<T>) -> Self {
        let deadline = outcome.deadline;
        let ending = Arc::new(std::sync::Mutex::new(Some(Ending { outcome, _guard: guard })));
        let watchdog = deadline.map(|d| {
            let ending = ending.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(d + STALL_GRACE).await;
                if let Some(mut e) = ending.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    e.outcome.record(Some(&ServeError::DeadlinePassed("while its reader stalled")));
                }
            })
        });
        Self {
            inner,
            grace_over: Box::pin(calls.grace_over()),
            grace: calls.grace(),
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            ending,
            watchdog,
            finished: false,
        }
    }

    /// A handle that names the model serving the stream once it is known (a stream of several requests
    /// learns it from the first).
    pub fn label(&self) -> Label {
        Label(self.ending.clone())
    }

    /// Ends the call: records it (OK, or `err`), releases the in-flight place, drops the source.
    fn finish(&mut self, err: Option<&ServeError>) {
        self.finished = true;
        self.inner = Box::pin(tokio_stream::empty());
        if let Some(w) = self.watchdog.take() {
            w.abort();
        }
        if let Some(mut e) = self.ending.lock().unwrap_or_else(|e| e.into_inner()).take() {
            e.outcome.record(err);
        }
    }

    /// Ends the call with `err`, which becomes the stream's last item.
    fn fail(&mut self, err: ServeError) -> Poll<Option<Result<T, Status>>> {
        self.finish(Some(&err));
        Poll::Ready(Some(Err(err.into())))
    }
}

/// See [`CallStream::label`].
pub struct Label(Arc<std::sync::Mutex<Option<Ending>>>);

impl Label {
    pub fn set_served(&self, model: Arc<str>, version: u64) {
        if let Some(e) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            e.outcome.set_served(model, version);
        }
    }
}

impl<T> Drop for CallStream<T> {
    fn drop(&mut self) {
        if let Some(w) = self.watchdog.take() {
            w.abort();
        }
        // An unfinished call's outcome records itself on drop (client gone, deadline, grace).
        self.ending.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

impl<T: Send + 'static> Stream for CallStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        if self.grace_over.as_mut().poll(cx).is_ready() {
            let grace = self.grace;
            return self.fail(ServeError::GraceOver(grace));
        }
        if let Some(d) = self.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            return self.fail(ServeError::DeadlinePassed("while streaming"));
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Err(err))) => self.fail(err),
            Poll::Ready(Some(Ok(item))) => Poll::Ready(Some(Ok(item))),
            Poll::Ready(None) => {
                self.finish(None);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
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
    async fn a_call_dropped_before_it_finished_is_recorded_once_with_why() {
        let calls = Calls::new(Duration::from_secs(1));
        let count = |code: &str| metrics::REQUESTS.with(&["drop-test", "", "Predict", code]).get();
        let (deadline0, cancelled0) = (count("DEADLINE_EXCEEDED"), count("CANCELLED"));
        let mut expired = Outcome::new(&calls, "Predict", Some(Instant::now()));
        expired.set_model("drop-test".into());
        drop(expired);
        let mut gone = Outcome::new(&calls, "Predict", Some(Instant::now() + Duration::from_secs(60)));
        gone.set_model("drop-test".into());
        drop(gone);
        let mut done = Outcome::new(&calls, "Predict", None);
        done.set_model("drop-test".into());
        done.ok();
        assert_eq!((count("DEADLINE_EXCEEDED") - deadline0, count("CANCELLED") - cancelled0), (1, 1));
        assert_eq!(count("OK"), 1, "a finished call is not recorded again when dropped");
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
                        Ok::<(), Status>(())
                    })
                    .await
            }
        });
        let guard = calls.enter().unwrap();
        let inner: Inner<u32> = Box::pin(tokio_stream::pending());
        let outcome = Outcome::new(&calls, "Generate", None);
        let mut stream = CallStream::new(&calls, guard, outcome, inner);
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
