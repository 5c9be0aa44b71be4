//! Continuous batching for generation models: between decode steps the scheduler admits waiting
//! sequences (their prefill runs in the next step) and removes finished, abandoned and expired ones;
//! each step advances every running sequence by a token in one batched forward pass.
mod state;
mod task;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;

pub use state::{GenConfig, GenState, Leave, Pending};

use super::{BatchError, Priority};
use crate::engine::{Finish, GenEngine};
use crate::validate::ValidGenerate;

/// What a Generate caller receives, in order: tokens, then exactly one `End` (or an error).
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// First, when asked: the prompt's log-probabilities (see `engine::PositionLogprobs`).
    PromptLogprobs(Vec<crate::engine::PositionLogprobs>),
    Token {
        id: u32,
        text: String,
        logprob: f32,
        index: u32,
        /// The most likely tokens at this position, when asked.
        top: Vec<(u32, f32)>,
    },
    End {
        finish: Finish,
        stop: Option<String>,
        prompt_tokens: u32,
        completion_tokens: u32,
        queue_time: Duration,
        time_to_first_token: Duration,
        total: Duration,
    },
}

pub type GenStream = mpsc::Receiver<Result<GenEvent, BatchError>>;

struct Entry {
    /// Taken when the sequence is admitted and handed to the engine.
    request: Option<ValidGenerate>,
    kv_tokens: usize,
    enqueued_at: Instant,
    deadline: Option<Instant>,
    admitted_at: Option<Instant>,
    first_token_at: Option<Instant>,
    tx: mpsc::Sender<Result<GenEvent, BatchError>>,
    priority: Priority,
    /// Held while waiting; released at admission.
    permit: Option<OwnedSemaphorePermit>,
}

impl Pending for Entry {
    fn kv_tokens(&self) -> usize {
        self.kv_tokens
    }
    fn enqueued_at(&self) -> Instant {
        self.enqueued_at
    }
    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
    fn is_abandoned(&self) -> bool {
        self.tx.is_closed()
    }
    fn priority(&self) -> Priority {
        self.priority
    }
}

/// Live counts, for ListModels and autoscaling.
#[derive(Debug, Default)]
pub struct GenStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    /// KV-cache positions reserved by the running sequences (of `GenConfig::max_kv_tokens`).
    pub kv_reserved: AtomicUsize,
    /// Expired requests answered before reaching the model.
    pub expired_waiting: AtomicUsize,
    /// Moving average of a finished sequence's time from admission to its end, in microseconds.
    pub sequence_us: std::sync::atomic::AtomicU64,
}

/// A cheap, cloneable handle to one generation model's scheduler.
#[derive(Clone)]
pub struct GenBatcher {
    model: Arc<str>,
    tx: mpsc::Sender<Entry>,
    admission: super::admission::Admission,
    pub stats: Arc<GenStats>,
    heartbeat: crate::engine::Heartbeat,
}

impl GenBatcher {
    pub fn spawn(model: &str, engine: GenEngine, config: GenConfig) -> Self {
        let model: Arc<str> = model.into();
        // Never full: a sender needs a permit first and an entry in the channel still holds it.
        let (tx, rx) = mpsc::channel(config.max_waiting);
        let admission = super::admission::Admission::new(model.clone(), config.max_waiting, config.max_running);
        let stats = Arc::new(GenStats::default());
        let heartbeat = engine.heartbeat().clone();
        tokio::spawn(task::run(model.clone(), rx, engine, config, stats.clone()));
        Self { model, tx, admission, stats, heartbeat }
    }

    /// How long the model thread has shown no life (see `engine::Heartbeat`).
    pub fn silence(&self) -> std::time::Duration {
        self.heartbeat.silence()
    }

    /// KV-cache positions the running sequences have reserved.
    pub fn kv_reserved(&self) -> usize {
        self.stats.kv_reserved.load(Ordering::Relaxed)
    }

    pub fn running(&self) -> usize {
        self.stats.running.load(Ordering::Relaxed)
    }

    pub fn waiting(&self) -> usize {
        self.admission.waiting()
    }

    /// The delay a refused caller is told to wait: the waiting sequences, admitted `max_running` at a
    /// time, at the recent sequence duration.
    pub fn retry_after(&self) -> Duration {
        self.admission.retry_after(Duration::from_micros(self.stats.sequence_us.load(Ordering::Relaxed)))
    }

    /// Queues a request; its tokens arrive on the returned stream. Dropping the stream cancels it.
    pub async fn generate(
        &self,
        request: ValidGenerate,
        deadline: Option<Instant>,
        priority: Priority,
    ) -> Result<GenStream, BatchError> {
        let round = Duration::from_micros(self.stats.sequence_us.load(Ordering::Relaxed));
        let permit = self.admission.admit(deadline, round)?;
        // Room for the prompt's log-probabilities, every token and the end: the scheduler's try_send can
        // then never find it full.
        let (tx, rx) = mpsc::channel(request.max_new_tokens + 3);
        let entry = Entry {
            kv_tokens: request.kv_tokens(),
            request: Some(request),
            enqueued_at: Instant::now(),
            deadline,
            admitted_at: None,
            first_token_at: None,
            tx,
            priority,
            permit: Some(permit),
        };
        self.tx.send(entry).await.map_err(|_| BatchError::Closed(self.model.clone()))?;
        Ok(rx)
    }
}
