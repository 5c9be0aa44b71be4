//! Where candle starts: device choice, the synchronous model traits the batchers drive, and the OS thread
//! each model runs on (never the async runtime's workers).
mod device;
mod embed;
mod generate;
pub mod sampling;
pub mod text;
mod thread;

use std::path::PathBuf;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::error;

/// The device models run on; callers above the engine name it through here, never through candle.
pub use candle_core::Device;
pub use device::{
    DeviceChoice, Placement, Plan, Target, Visible, device_memory, device_name, gpu_kv_tokens, parse_visible, place,
    plan, plan_devices,
};
pub use embed::{EmbedderInfo, EncoderPath, Pooling, ReadyEmbedder, SentenceEmbedder, ready_embedder};
pub use generate::{
    Finish, GenEngine, Generator, LlamaGenerator, LoadedLlama, PositionLogprobs, ReadyGenerator, SeqEvent, SeqId,
    StepPlan, StepReport, gguf_tokenizer, load_gguf_tokenizer, ready_generator,
};
pub use thread::Heartbeat;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot load {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("device: {0}")]
    Device(String),
    #[error("the batch failed: {0}")]
    Batch(String),
    #[error("the model thread panicked: {0}")]
    Panicked(String),
    #[error("the model thread is busy or has stopped")]
    Stopped,
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// The device ran out of memory during a step (a CUDA out-of-memory error): the calls it hit end;
    /// the server and the model stay up.
    #[error("the device ran out of memory for this batch ({0}); retry later or with a shorter request")]
    DeviceMemory(String),
}

impl EngineError {
    /// What one failed step becomes for every sequence it hit: a device out of memory keeps its own
    /// kind (a status of its own), anything else is a failed batch.
    pub fn for_each_call(&self) -> EngineError {
        match self {
            EngineError::DeviceMemory(m) => EngineError::DeviceMemory(m.clone()),
            other => EngineError::Batch(other.to_string()),
        }
    }

    /// A candle error from a forward pass, with CUDA's out-of-memory recognised by its driver code.
    pub fn from_step(err: candle_core::Error) -> EngineError {
        let text = err.to_string();
        if text.contains("CUDA_ERROR_OUT_OF_MEMORY") || text.contains("out of memory") {
            EngineError::DeviceMemory(text)
        } else {
            EngineError::Candle(err)
        }
    }
}

impl EngineError {
    pub fn load(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        Self::Load { path: path.into(), reason: reason.to_string() }
    }
}

/// A sentence-embedding model as the engine thread drives it.
pub trait Embedder: Send + 'static {
    /// One pooled, not yet normalised, vector per token-id sequence, in order.
    fn embed(&mut self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EngineError>;
}

/// What a batch's forward pass produced.
#[derive(Debug)]
pub struct EngineOutput {
    pub vectors: Vec<Vec<f32>>,
    pub elapsed: Duration,
}

struct Job {
    inputs: Vec<Vec<u32>>,
    reply: oneshot::Sender<Result<EngineOutput, EngineError>>,
}

/// Handle to an embedding model running on its own OS thread.
#[derive(Clone)]
pub struct EmbedEngine {
    tx: SyncSender<Job>,
    heart: Heartbeat,
}

impl EmbedEngine {
    /// Moves the model onto a new thread named after it.
    pub fn spawn<M: Embedder>(name: &str, mut model: M) -> std::io::Result<Self> {
        let heart = Heartbeat::new();
        let tx = thread::spawn(name, heart.clone(), move |job: Job| {
            if job.reply.is_closed() {
                return;
            }
            let start = Instant::now();
            thread::test_fault(&job.inputs);
            let result = thread::guarded(|| model.embed(&job.inputs));
            if let Err(err) = &result {
                error!(error = %err, "embedding batch failed");
            }
            let _ = job.reply.send(result.map(|vectors| EngineOutput { vectors, elapsed: start.elapsed() }));
        })?;
        Ok(Self { tx, heart })
    }

    /// Hands a batch to the model thread; the answer comes on the returned receiver.
    pub fn submit(&self, inputs: Vec<Vec<u32>>) -> oneshot::Receiver<Result<EngineOutput, EngineError>> {
        let (reply, rx) = oneshot::channel();
        if let Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) = self.tx.try_send(Job { inputs, reply })
        {
            let _ = job.reply.send(Err(EngineError::Stopped));
        }
        rx
    }

    /// The model thread's heartbeat.
    pub fn heartbeat(&self) -> &Heartbeat {
        &self.heart
    }
}

/// Scales a vector to unit length (sentence-transformers' Normalize module); a zero vector stays zero.
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        // Same epsilon-free division as torch.nn.functional.normalize for non-degenerate inputs.
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_out_of_memory_keeps_its_kind_for_every_call() {
        let oom = EngineError::from_step(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        ));
        assert!(matches!(oom.for_each_call(), EngineError::DeviceMemory(_)), "{oom}");
        let other = EngineError::from_step(candle_core::Error::Msg("shape mismatch".into()));
        assert!(matches!(other.for_each_call(), EngineError::Batch(ref m) if m.contains("shape mismatch")));
    }

    #[test]
    fn normalize_gives_unit_length_and_keeps_zero() {
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut z = vec![0.0; 3];
        l2_normalize(&mut z);
        assert_eq!(z, vec![0.0; 3]);
    }

    struct Ftz;
    impl Embedder for Ftz {
        fn embed(&mut self, _: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EngineError> {
            Ok(vec![vec![crate::models::kernels::cpu::denormals_flushed() as u8 as f32]])
        }
    }

    #[tokio::test]
    async fn the_model_thread_flushes_subnormals() {
        let engine = EmbedEngine::spawn("ftz", Ftz).unwrap();
        assert_eq!(engine.submit(vec![vec![1]]).await.unwrap().unwrap().vectors, vec![vec![1.0]]);
    }

    struct Boom;
    impl Embedder for Boom {
        fn embed(&mut self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EngineError> {
            if batch.is_empty() {
                panic!("boom");
            }
            Ok(batch.iter().map(|s| vec![s.len() as f32]).collect())
        }
    }

    #[tokio::test]
    async fn a_panicking_batch_fails_alone_and_the_thread_lives_on() {
        let engine = EmbedEngine::spawn("boom", Boom).unwrap();
        let err = engine.submit(vec![]).await.unwrap().unwrap_err();
        assert!(matches!(err, EngineError::Panicked(ref m) if m == "boom"), "{err}");
        let ok = engine.submit(vec![vec![1, 2, 3]]).await.unwrap().unwrap();
        assert_eq!(ok.vectors, vec![vec![3.0]]);
    }
}
