//! Dynamic batching in front of each model: bounded admission, time windows, token budgets, deadlines and
//! cancellation. No tonic and no candle here: requests arrive as `validate::Valid*` types and leave as
//! plain vectors; the model is reached only through the `engine` traits.
mod admission;
pub mod generate;
pub mod replicas;
mod state;
mod task;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::time::Instant;

pub use state::{Queued, State};

use self::admission::Admission;
use crate::engine::{EmbedEngine, EngineError};
use crate::validate::ValidPredict;

/// Batching limits of one embedding model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most inputs in one forward pass.
    pub max_batch_size: usize,
    /// How long the oldest waiting request may wait for company.
    pub max_queue_delay: Duration,
    /// Most tokens (all inputs' lengths together: batches are packed, not padded) in one forward pass.
    pub max_batch_tokens: usize,
    /// Most requests waiting (not yet in a running batch).
    pub max_queue: usize,
    /// How much later than its arrival a batch-priority request is ordered (see [`Priority`]).
    pub batch_priority_delay: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_queue_delay: Duration::from_millis(1),
            max_batch_tokens: 16384,
            max_queue: 256,
            batch_priority_delay: Duration::from_secs(2),
        }
    }
}

/// Scheduling class of a request. Queues are ordered by arrival time, a batch request's counted
/// `batch_priority_delay` later than it really arrived: interactive traffic goes ahead of batch work
/// that arrived less than that delay before it, and batch work waits at most that much longer than it
/// would have, so it never starves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

/// The instant a request is ordered by.
pub(crate) fn effective_arrival(at: Instant, priority: Priority, batch_delay: Duration) -> Instant {
    match priority {
        Priority::Interactive => at,
        Priority::Batch => at + batch_delay,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(
        "server overloaded: the queue of model {model} is full ({max_queue} requests waiting); retry in {} ms",
        retry_after.as_millis()
    )]
    QueueFull { model: Arc<str>, max_queue: usize, retry_after: Duration },
    #[error("deadline exceeded after waiting {waited_ms} ms in the queue of model {model}")]
    DeadlineExceeded { model: Arc<str>, waited_ms: u64 },
    #[error("model {0} is shutting down")]
    Closed(Arc<str>),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// A computed request, with what the caller may want to know about its batch.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    /// Inputs in the batch this request rode in.
    pub batch_size: usize,
    /// Requests in that batch.
    pub batch_requests: usize,
    pub queue_time: Duration,
    pub inference_time: Duration,
}

/// One waiting request as the batcher's task holds it.
struct Entry {
    request: ValidPredict,
    enqueued_at: Instant,
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<Embedded, BatchError>>,
    priority: Priority,
    /// Held while the request waits; released when its batch starts or the entry is dropped, which
    /// frees its place in the queue.
    permit: Option<OwnedSemaphorePermit>,
    /// The request's announcement (see [`EmbedBatcher::announce`]), ended when the task takes it in.
    announced: Option<Announced>,
}

/// A request on its way to a batcher (being validated and tokenized): counted until the batcher's task
/// has it, so that a batch about to start waits for it (within the window) instead of leaving without
/// it. Dropping it (a request that failed validation) just stops counting it.
pub struct Announced(Arc<AtomicUsize>);

impl Drop for Announced {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Queued for Entry {
    fn inputs(&self) -> usize {
        self.request.inputs.len()
    }
    fn tokens(&self) -> usize {
        self.request.tokens()
    }
    fn enqueued_at(&self) -> Instant {
        self.enqueued_at
    }
    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
    fn is_abandoned(&self) -> bool {
        self.reply.is_closed()
    }
    fn priority(&self) -> Priority {
        self.priority
    }
}

/// The shortest and longest retry delay suggested to a refused caller.
const RETRY_BOUNDS: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(10));

/// Live figures shared between a batcher's task and its handles.
#[derive(Debug, Default)]
pub struct EmbedStats {
    /// Requests in the batch computing now.
    pub running: AtomicUsize,
    /// Moving average of a batch's compute time, in microseconds.
    pub batch_us: AtomicU64,
    /// Requests announced and not yet in the queue (see [`Announced`]).
    pub coming: Arc<AtomicUsize>,
}

/// Folds `sample` into an exponential moving average kept in `avg` (weight 1/8; the first sample seeds it).
pub(crate) fn ewma(avg: &AtomicU64, sample: Duration) {
    let x = sample.as_micros() as u64;
    let _ =
        avg.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| Some(if a == 0 { x } else { a - a / 8 + x / 8 }));
}

/// How long a refused caller should wait: the time for the work ahead of it to drain at the recent pace.
pub(crate) fn retry_after(rounds_ahead: usize, round: Duration) -> Duration {
    (round * rounds_ahead.max(1) as u32).clamp(RETRY_BOUNDS.0, RETRY_BOUNDS.1)
}

/// A cheap, cloneable handle to one embedding model's batcher.
#[derive(Clone)]
pub struct EmbedBatcher {
    model: Arc<str>,
    tx: mpsc::Sender<Entry>,
    admission: Admission,
    pub stats: Arc<EmbedStats>,
    heartbeat: crate::engine::Heartbeat,
}

impl EmbedBatcher {
    /// Starts the batcher's task on the current tokio runtime.
    pub fn spawn(model: &str, engine: EmbedEngine, config: BatchConfig) -> Self {
        let model: Arc<str> = model.into();
        // The channel can never be full: a sender needs a permit first, and an entry in the channel
        // still holds its permit, so at most max_queue entries are ever in it.
        let (tx, rx) = mpsc::channel(config.max_queue);
        let admission = Admission::new(model.clone(), config.max_queue, config.max_batch_size);
        let stats = Arc::new(EmbedStats::default());
        let heartbeat = engine.heartbeat().clone();
        tokio::spawn(task::run(model.clone(), rx, engine, config, stats.clone()));
        Self { model, tx, admission, stats, heartbeat }
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// Requests waiting for a batch (not those already computing).
    pub fn queue_len(&self) -> usize {
        self.admission.waiting()
    }

    /// Requests in the batch computing now.
    pub fn running(&self) -> usize {
        self.stats.running.load(Ordering::Relaxed)
    }

    /// How long the model thread has shown no life (see `engine::Heartbeat`).
    pub fn silence(&self) -> Duration {
        self.heartbeat.silence()
    }

    /// The delay a refused caller is told to wait: the batches ahead of it at the recent batch time.
    pub fn retry_after(&self) -> Duration {
        self.admission.retry_after(Duration::from_micros(self.stats.batch_us.load(Ordering::Relaxed)))
    }

    /// Tells the batcher a request is on its way (call it before validating and tokenizing one), so a
    /// batch about to start waits for it; hand the guard to [`Self::embed`].
    pub fn announce(&self) -> Announced {
        self.stats.coming.fetch_add(1, Ordering::AcqRel);
        Announced(self.stats.coming.clone())
    }

    /// Queues a request and waits for its vectors. Dropping the future (the caller hung up) removes the
    /// request before it reaches the model.
    pub async fn embed(
        &self,
        request: ValidPredict,
        deadline: Option<Instant>,
        priority: Priority,
        announced: Option<Announced>,
    ) -> Result<Embedded, BatchError> {
        let permit =
            self.admission.admit(deadline, Duration::from_micros(self.stats.batch_us.load(Ordering::Relaxed)))?;
        let (reply, rx) = oneshot::channel();
        let entry =
            Entry { request, enqueued_at: Instant::now(), deadline, reply, priority, permit: Some(permit), announced };
        self.tx.send(entry).await.map_err(|_| BatchError::Closed(self.model.clone()))?;
        rx.await.map_err(|_| BatchError::Closed(self.model.clone()))?
    }
}

#[cfg(test)]
mod tests {
    //! The batcher's task with paused tokio time and a fake engine that records what reached it.
    use std::sync::{Arc, Condvar, Mutex};

    use super::*;
    use crate::engine::Embedder;
    use crate::validate::ValidInput;

    /// Records what reached it; a batch holding [`HOLD`] blocks the model until the gate opens, so that
    /// later requests have to wait in the queue.
    #[derive(Clone, Default)]
    struct Recorder {
        seen: Arc<Mutex<Vec<Vec<u32>>>>,
        gate: Arc<(Mutex<bool>, Condvar)>,
    }

    const HOLD: u32 = 999;

    impl Recorder {
        fn open(&self) {
            *self.gate.0.lock().unwrap() = true;
            self.gate.1.notify_all();
        }
    }

    impl Embedder for Recorder {
        fn embed(&mut self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EngineError> {
            if batch.iter().any(|ids| ids[0] == HOLD) {
                let (lock, cv) = &*self.gate;
                let _open = cv.wait_while(lock.lock().unwrap(), |open| !*open).unwrap();
            }
            self.seen.lock().unwrap().extend(batch.iter().cloned());
            Ok(batch.iter().map(|ids| vec![ids.len() as f32, ids[0] as f32]).collect())
        }
    }

    /// Makes the model busy with a request that blocks until `recorder.open()`.
    async fn hold(b: &EmbedBatcher) -> tokio::task::JoinHandle<Result<Embedded, BatchError>> {
        let task = {
            let b = b.clone();
            tokio::spawn(async move { b.embed(req(HOLD, 3), None, Priority::Interactive, None).await })
        };
        while b.running() == 0 {
            tokio::task::yield_now().await;
        }
        task
    }

    fn config() -> BatchConfig {
        BatchConfig {
            max_batch_size: 8,
            max_queue_delay: Duration::from_millis(5),
            max_batch_tokens: 1000,
            max_queue: 64,
            batch_priority_delay: Duration::from_secs(2),
        }
    }

    fn batcher(config: BatchConfig) -> (EmbedBatcher, Recorder) {
        let recorder = Recorder::default();
        let engine = EmbedEngine::spawn("fake", recorder.clone()).unwrap();
        (EmbedBatcher::spawn("fake", engine, config), recorder)
    }

    fn req(first: u32, len: usize) -> ValidPredict {
        let mut ids = vec![first];
        ids.resize(len, 0);
        ValidPredict { inputs: vec![ValidInput { ids }], normalize: false }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_caller_never_waits_for_the_window() {
        let (b, _) = batcher(config());
        for i in 1..4 {
            let out = b.embed(req(i, 3), None, Priority::Interactive, None).await.unwrap();
            assert_eq!(out.queue_time, Duration::ZERO);
            assert_eq!((out.batch_size, out.batch_requests), (1, 1));
            assert_eq!(out.vectors, vec![vec![3.0, i as f32]]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_runs_at_once_and_the_rest_waits_for_the_next() {
        let (b, _) = batcher(config());
        let tasks: Vec<_> = (0..9u32)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.embed(req(i, 4), None, Priority::Interactive, None).await.unwrap() })
            })
            .collect();
        let mut sizes = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            let out = t.await.unwrap();
            assert_eq!(out.vectors[0][1], i as f32, "answers go back to their own caller");
            sizes.push((out.batch_size, out.queue_time));
        }
        let full = sizes.iter().filter(|s| **s == (8, Duration::ZERO)).count();
        assert_eq!(full, 8, "{sizes:?}");
        assert!(sizes.contains(&(1, Duration::from_millis(5))), "{sizes:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_token_budget_splits_batches() {
        let (b, _) = batcher(BatchConfig { max_batch_tokens: 100, ..config() });
        let tasks: Vec<_> = (0..3u32)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(
                    async move { b.embed(req(i, 40), None, Priority::Interactive, None).await.unwrap().batch_size },
                )
            })
            .collect();
        let mut sizes = Vec::new();
        for t in tasks {
            sizes.push(t.await.unwrap());
        }
        sizes.sort();
        assert_eq!(sizes, vec![1, 2, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_hangs_up_never_reaches_the_model() {
        let (b, recorder) = batcher(config());
        let held = hold(&b).await;
        let gone = {
            let b = b.clone();
            tokio::spawn(async move { b.embed(req(77, 3), None, Priority::Interactive, None).await })
        };
        while b.queue_len() < 1 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let next = {
            let b = b.clone();
            tokio::spawn(async move { b.embed(req(1, 3), None, Priority::Interactive, None).await })
        };
        recorder.open();
        held.await.unwrap().unwrap();
        let out = next.await.unwrap().unwrap();
        assert_eq!(out.batch_requests, 1);
        assert!(recorder.seen.lock().unwrap().iter().all(|ids| ids[0] != 77));
        assert_eq!(b.queue_len(), 0, "the abandoned entry's place is free again");
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_request_is_answered_and_never_reaches_the_model() {
        let (b, recorder) = batcher(config());
        let held = hold(&b).await;
        let deadline = Instant::now() + Duration::from_millis(2);
        let err = b.embed(req(55, 3), Some(deadline), Priority::Interactive, None).await.unwrap_err();
        assert!(matches!(err, BatchError::DeadlineExceeded { waited_ms: 2, .. }), "{err}");
        let past = b.embed(req(56, 3), Some(Instant::now()), Priority::Interactive, None).await.unwrap_err();
        assert!(matches!(past, BatchError::DeadlineExceeded { waited_ms: 0, .. }), "{past}");
        recorder.open();
        held.await.unwrap().unwrap();
        assert!(recorder.seen.lock().unwrap().iter().all(|ids| ids[0] == HOLD));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_at_once() {
        let (b, recorder) = batcher(BatchConfig { max_queue: 2, max_queue_delay: Duration::from_secs(1), ..config() });
        let held = hold(&b).await;
        let waiting: Vec<_> = (0..2u32)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.embed(req(i, 3), None, Priority::Interactive, None).await })
            })
            .collect();
        while b.queue_len() < 2 {
            tokio::task::yield_now().await;
        }
        let started = Instant::now();
        let err = b.embed(req(9, 3), None, Priority::Interactive, None).await.unwrap_err();
        assert!(matches!(err, BatchError::QueueFull { max_queue: 2, .. }), "{err}");
        assert!(err.to_string().contains("retry in"), "{err}");
        assert_eq!(started.elapsed(), Duration::ZERO);
        recorder.open();
        held.await.unwrap().unwrap();
        for w in waiting {
            assert_eq!(w.await.unwrap().unwrap().batch_size, 2);
        }
    }
}
