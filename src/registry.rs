//! The loaded models: finds them in the model directory, loads and warms each one, and starts its engine
//! thread and batcher. Request handlers look models up here by name.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use crate::batcher::{BatchConfig, EmbedBatcher};
use crate::config::ModelConfig;
use crate::engine::{EmbedEngine, Embedder, EngineError, SentenceEmbedder, device_name, select_device};
use crate::tokenizer::{TextTokenizer, TokenizerError};
use crate::validate::{PredictLimits, ValidationError};

/// The embedding model an empty request model means when it is loaded.
pub const DEFAULT_EMBEDDING_MODEL: &str = "all-MiniLM-L6-v2";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "no embedding model found in {0}: expected a folder with config.json, model.safetensors and \
         tokenizer.json (run `python3 models/fetch.py` for the defaults)"
    )]
    NoModels(PathBuf),
    #[error("--embedding-model {name:?} is not among the loaded models ({loaded})")]
    UnknownDefault { name: String, loaded: String },
    #[error(
        "model {model}: --max-batch-tokens {budget} is below its max_input_tokens {max_input}: a single \
         full-length input could never run"
    )]
    BudgetTooSmall { model: String, budget: usize, max_input: usize },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("model loading was interrupted: {0}")]
    Join(String),
}

/// A loaded embedding model, ready for requests.
pub struct EmbeddingModel {
    pub name: Arc<str>,
    /// Where it came from, relative to the model directory.
    pub source: String,
    pub device: String,
    pub dimension: usize,
    pub tokenizer: Arc<TextTokenizer>,
    pub limits: PredictLimits,
    pub batch: BatchConfig,
    pub batcher: EmbedBatcher,
}

pub struct Registry {
    embedders: BTreeMap<String, Arc<EmbeddingModel>>,
    default_embedder: String,
}

/// A model loaded on a blocking thread, before its batcher starts.
struct Loaded {
    name: String,
    source: String,
    device: String,
    dimension: usize,
    tokenizer: TextTokenizer,
    limits: PredictLimits,
    engine: EmbedEngine,
}

impl Registry {
    /// Loads every model of the directory, each warmed by one forward pass. Must run on a tokio runtime
    /// (the batchers are tasks); the loading itself happens on a blocking thread.
    pub async fn load(config: ModelConfig, batch: BatchConfig) -> Result<Self, RegistryError> {
        let batch_for_load = batch.clone();
        let loaded = tokio::task::spawn_blocking(move || load_all(&config, &batch_for_load).map(|l| (l, config)))
            .await
            .map_err(|e| RegistryError::Join(e.to_string()))?;
        let (loaded, config) = loaded?;
        let names: Vec<String> = loaded.iter().map(|l| l.name.clone()).collect();
        let default_embedder = match &config.embedding_model {
            Some(name) if names.contains(name) => name.clone(),
            Some(name) => return Err(RegistryError::UnknownDefault { name: name.clone(), loaded: names.join(", ") }),
            None if names.iter().any(|n| n == DEFAULT_EMBEDDING_MODEL) => DEFAULT_EMBEDDING_MODEL.to_string(),
            None => names.first().cloned().ok_or_else(|| RegistryError::NoModels(config.model_dir.clone()))?,
        };
        let embedders = loaded
            .into_iter()
            .map(|l| {
                let batcher = EmbedBatcher::spawn(&l.name, l.engine, batch.clone());
                let model = EmbeddingModel {
                    name: l.name.as_str().into(),
                    source: l.source,
                    device: l.device,
                    dimension: l.dimension,
                    tokenizer: Arc::new(l.tokenizer),
                    limits: l.limits,
                    batch: batch.clone(),
                    batcher,
                };
                (l.name, Arc::new(model))
            })
            .collect();
        Ok(Self { embedders, default_embedder })
    }

    /// The embedding model a request names; empty means the default one.
    pub fn embedder(&self, name: &str) -> Result<Arc<EmbeddingModel>, ValidationError> {
        let name = if name.is_empty() { self.default_embedder.as_str() } else { name };
        self.embedders.get(name).cloned().ok_or_else(|| ValidationError::UnknownModel {
            kind: "embedding",
            name: name.to_string(),
            loaded: self.embedders.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    pub fn embedders(&self) -> impl Iterator<Item = &Arc<EmbeddingModel>> {
        self.embedders.values()
    }

    pub fn default_embedder(&self) -> &str {
        &self.default_embedder
    }
}

/// Model folders in the directory: the directory itself when it is one model, else its subfolders.
fn discover(dir: &Path) -> Result<Vec<PathBuf>, RegistryError> {
    let is_embedder = |p: &Path| p.join("config.json").is_file() && p.join("tokenizer.json").is_file();
    if is_embedder(dir) {
        return Ok(vec![dir.to_path_buf()]);
    }
    let io = |source| RegistryError::Io { path: dir.to_path_buf(), source };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let hidden = path.file_name().and_then(|n| n.to_str()).is_none_or(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() && is_embedder(&path) {
            found.push(path);
        } else if path.extension().is_some_and(|e| e == "gguf") {
            // Generation models are served once Generate exists; until then they are only noted.
            info!(path = %path.display(), "GGUF file found; generation models are not served by this build");
        }
    }
    found.sort();
    Ok(found)
}

fn load_all(config: &ModelConfig, batch: &BatchConfig) -> Result<Vec<Loaded>, RegistryError> {
    let folders = discover(&config.model_dir)?;
    if folders.is_empty() {
        return Err(RegistryError::NoModels(config.model_dir.clone()));
    }
    let device = select_device(config.device)?;
    folders.iter().map(|dir| load_embedder(dir, &config.model_dir, &device, batch)).collect()
}

fn load_embedder(
    dir: &Path,
    root: &Path,
    device: &candle_core::Device,
    batch: &BatchConfig,
) -> Result<Loaded, RegistryError> {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("embedding").to_string();
    let started = std::time::Instant::now();
    let (mut model, info) = SentenceEmbedder::load(dir, device)?;
    if batch.max_batch_tokens < info.max_input_tokens {
        return Err(RegistryError::BudgetTooSmall {
            model: name,
            budget: batch.max_batch_tokens,
            max_input: info.max_input_tokens,
        });
    }
    let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), info.max_input_tokens)?;
    // Warm-up: one real forward pass before health says SERVING, so the first caller does not pay for
    // lazy allocations and page faults of the weights.
    let warm = model.embed(&[tokenizer.minimal()?])?;
    if warm.first().map(Vec::len) != Some(info.dimension) {
        warn!(model = %name, "warm-up returned an unexpected width");
    }
    info!(
        model = %name,
        dimension = info.dimension,
        max_input_tokens = info.max_input_tokens,
        normalize = info.normalize,
        pooling = ?info.pooling,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "embedding model loaded and warmed"
    );
    let engine = EmbedEngine::spawn(&name, model).map_err(|source| RegistryError::Io { path: dir.into(), source })?;
    Ok(Loaded {
        source: dir.strip_prefix(root).unwrap_or(dir).display().to_string(),
        device: device_name(device),
        dimension: info.dimension,
        limits: PredictLimits {
            max_inputs: batch.max_batch_size,
            max_input_tokens: info.max_input_tokens,
            max_batch_tokens: batch.max_batch_tokens,
            default_normalize: info.normalize,
        },
        tokenizer,
        engine,
        name,
    })
}
