//! The loaded models: finds them in the model directory, loads and warms each one, and starts its engine
//! thread and batcher. Request handlers look models up here by name.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use crate::batcher::generate::{GenBatcher, GenConfig};
use crate::batcher::replicas::{EmbedPool, GenPool};
use crate::batcher::{BatchConfig, EmbedBatcher};
use crate::config::{GenerateConfig, ModelConfig};
use crate::engine::{
    Device, EmbedEngine, Embedder, EngineError, GenEngine, LlamaGenerator, LoadedLlama, SentenceEmbedder, device_name,
    plan_devices,
};
use crate::tokenizer::chat::ChatTemplate;
use crate::tokenizer::gguf::GgufTokenizer;
use crate::tokenizer::{TextTokenizer, TokenizerError};
use crate::validate::{GenerateLimits, PredictLimits, ValidationError};

/// The embedding model an empty request model means when it is loaded.
pub const DEFAULT_EMBEDDING_MODEL: &str = "all-MiniLM-L6-v2";
/// The generation model an empty request model means when it is loaded.
pub const DEFAULT_GENERATION_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "no model found in {0}: expected a folder with config.json, model.safetensors and tokenizer.json, \
         or a .gguf file (run `python3 models/fetch.py` for the defaults)"
    )]
    NoModels(PathBuf),
    #[error("--{flag} {name:?} is not among the loaded models ({loaded})")]
    UnknownDefault { flag: &'static str, name: String, loaded: String },
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
    /// One batcher per device replica.
    pub batcher: EmbedPool,
}

/// A loaded generation model, ready for requests.
pub struct GenerationModel {
    pub name: Arc<str>,
    pub source: String,
    pub device: String,
    pub tokenizer: Arc<GgufTokenizer>,
    pub template: Option<Arc<ChatTemplate>>,
    pub limits: GenerateLimits,
    pub scheduler: GenConfig,
    /// One scheduler per device replica.
    pub batcher: GenPool,
}

pub struct Registry {
    embedders: BTreeMap<String, Arc<EmbeddingModel>>,
    default_embedder: Option<String>,
    generators: BTreeMap<String, Arc<GenerationModel>>,
    default_generator: Option<String>,
}

/// A generation model loaded on a blocking thread, before its scheduler starts.
struct LoadedGen {
    name: String,
    source: String,
    device: String,
    tokenizer: Arc<GgufTokenizer>,
    template: Option<Arc<ChatTemplate>>,
    limits: GenerateLimits,
    engines: Vec<GenEngine>,
}

fn pick_default(
    flag: &'static str,
    wanted: &Option<String>,
    names: &[String],
    fallback: &str,
) -> Result<Option<String>, RegistryError> {
    match wanted {
        Some(name) if names.contains(name) => Ok(Some(name.clone())),
        Some(name) => Err(RegistryError::UnknownDefault { flag, name: name.clone(), loaded: names.join(", ") }),
        None if names.iter().any(|n| n == fallback) => Ok(Some(fallback.to_string())),
        None => Ok(names.first().cloned()),
    }
}

/// A model loaded on a blocking thread, before its batcher starts.
struct Loaded {
    name: String,
    source: String,
    device: String,
    dimension: usize,
    tokenizer: TextTokenizer,
    limits: PredictLimits,
    engines: Vec<EmbedEngine>,
}

impl Registry {
    /// Loads every model of the directory, each warmed by one forward pass. Must run on a tokio runtime
    /// (the batchers are tasks); the loading itself happens on a blocking thread.
    pub async fn load(
        config: ModelConfig,
        batch: BatchConfig,
        generate: GenerateConfig,
    ) -> Result<Self, RegistryError> {
        let (batch_for_load, gen_for_load) = (batch.clone(), generate.clone());
        let loaded = tokio::task::spawn_blocking(move || {
            load_all(&config, &batch_for_load, &gen_for_load).map(|(l, g)| (l, g, config))
        })
        .await
        .map_err(|e| RegistryError::Join(e.to_string()))?;
        let (loaded, loaded_gen, config) = loaded?;
        let names: Vec<String> = loaded.iter().map(|l| l.name.clone()).collect();
        let default_embedder =
            pick_default("embedding-model", &config.embedding_model, &names, DEFAULT_EMBEDDING_MODEL)?;
        let gen_names: Vec<String> = loaded_gen.iter().map(|l| l.name.clone()).collect();
        let default_generator =
            pick_default("generation-model", &config.generation_model, &gen_names, DEFAULT_GENERATION_MODEL)?;
        let generators = loaded_gen
            .into_iter()
            .map(|l| {
                let batcher = GenPool::new(
                    l.engines.into_iter().map(|e| GenBatcher::spawn(&l.name, e, generate.scheduler.clone())).collect(),
                );
                let model = GenerationModel {
                    name: l.name.as_str().into(),
                    source: l.source,
                    device: l.device,
                    tokenizer: l.tokenizer,
                    template: l.template,
                    limits: l.limits,
                    scheduler: generate.scheduler.clone(),
                    batcher,
                };
                (l.name, Arc::new(model))
            })
            .collect();
        let embedders = loaded
            .into_iter()
            .map(|l| {
                let batcher = EmbedPool::new(
                    l.engines.into_iter().map(|e| EmbedBatcher::spawn(&l.name, e, batch.clone())).collect(),
                );
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
        Ok(Self { embedders, default_embedder, generators, default_generator })
    }

    /// The embedding model a request names; empty means the default one.
    pub fn embedder(&self, name: &str) -> Result<Arc<EmbeddingModel>, ValidationError> {
        let name = if name.is_empty() { self.default_embedder.as_deref().unwrap_or("") } else { name };
        self.embedders.get(name).cloned().ok_or_else(|| ValidationError::UnknownModel {
            kind: "embedding",
            name: name.to_string(),
            loaded: self.embedders.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    pub fn embedders(&self) -> impl Iterator<Item = &Arc<EmbeddingModel>> {
        self.embedders.values()
    }

    pub fn default_embedder(&self) -> Option<&str> {
        self.default_embedder.as_deref()
    }

    /// The generation model a request names; empty means the default one.
    pub fn generator(&self, name: &str) -> Result<Arc<GenerationModel>, ValidationError> {
        let name = if name.is_empty() { self.default_generator.as_deref().unwrap_or("") } else { name };
        self.generators.get(name).cloned().ok_or_else(|| ValidationError::UnknownModel {
            kind: "generation",
            name: name.to_string(),
            loaded: self.generators.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    pub fn generators(&self) -> impl Iterator<Item = &Arc<GenerationModel>> {
        self.generators.values()
    }

    pub fn default_generator(&self) -> Option<&str> {
        self.default_generator.as_deref()
    }
}

/// Model folders and GGUF files in the directory (or the directory itself when it is one model folder,
/// or a path to one GGUF file).
fn discover(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>), RegistryError> {
    let is_embedder = |p: &Path| p.join("config.json").is_file() && p.join("tokenizer.json").is_file();
    if is_embedder(dir) {
        return Ok((vec![dir.to_path_buf()], Vec::new()));
    }
    if dir.is_file() && dir.extension().is_some_and(|e| e == "gguf") {
        return Ok((Vec::new(), vec![dir.to_path_buf()]));
    }
    let mut ggufs = Vec::new();
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
        } else if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            ggufs.push(path);
        }
    }
    found.sort();
    ggufs.sort();
    Ok((found, ggufs))
}

fn load_all(
    config: &ModelConfig,
    batch: &BatchConfig,
    generate: &GenerateConfig,
) -> Result<(Vec<Loaded>, Vec<LoadedGen>), RegistryError> {
    let (folders, ggufs) = discover(&config.model_dir)?;
    if folders.is_empty() && ggufs.is_empty() {
        return Err(RegistryError::NoModels(config.model_dir.clone()));
    }
    // One replica of every model per device (one per visible GPU, or the CPU).
    let devices = plan_devices(config.device)?;
    let embedders = folders
        .iter()
        .map(|dir| load_embedder(dir, &config.model_dir, &devices, batch))
        .collect::<Result<Vec<_>, _>>()?;
    let generators = ggufs
        .iter()
        .map(|path| load_generator(path, &config.model_dir, &devices, generate))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((embedders, generators))
}

fn devices_name(devices: &[Device]) -> String {
    devices.iter().map(device_name).collect::<Vec<_>>().join(",")
}

fn load_generator(
    path: &Path,
    root: &Path,
    devices: &[Device],
    generate: &GenerateConfig,
) -> Result<LoadedGen, RegistryError> {
    let name = path.file_stem().and_then(|n| n.to_str()).unwrap_or("generation").to_string();
    let mut engines = Vec::with_capacity(devices.len());
    let mut first = None;
    for device in devices {
        let LoadedLlama { generator, tokenizer, context_length } =
            LlamaGenerator::load(path, device, generate.prefill_chunk)?;
        engines.push(
            GenEngine::spawn(&name, generator).map_err(|source| RegistryError::Io { path: path.into(), source })?,
        );
        first.get_or_insert((tokenizer, context_length));
    }
    let (tokenizer, context_length) = first.expect("at least one device");
    let template = match tokenizer.chat_template.as_deref() {
        None => None,
        Some(source) => {
            let text = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or("").to_string();
            match ChatTemplate::new(source, &text(tokenizer.bos), &text(tokenizer.eos)) {
                Ok(t) => Some(Arc::new(t)),
                Err(e) => {
                    warn!(model = %name, error = %e, "chat template unusable; only raw prompts are served");
                    None
                }
            }
        }
    };
    info!(model = %name, chat_template = template.is_some(), replicas = engines.len(), "generation model ready");
    Ok(LoadedGen {
        source: path.strip_prefix(root).unwrap_or(path).display().to_string(),
        device: devices_name(devices),
        limits: GenerateLimits {
            context_length: context_length.min(generate.scheduler.max_kv_tokens),
            max_new_tokens: generate.max_new_tokens,
        },
        tokenizer,
        template,
        engines,
        name,
    })
}

fn load_embedder(dir: &Path, root: &Path, devices: &[Device], batch: &BatchConfig) -> Result<Loaded, RegistryError> {
    let mut replicas = devices.iter().map(|d| load_embedder_on(dir, root, d, batch));
    let mut loaded = replicas.next().expect("at least one device")?;
    for other in replicas {
        loaded.engines.extend(other?.engines);
    }
    loaded.device = devices_name(devices);
    Ok(loaded)
}

fn load_embedder_on(dir: &Path, root: &Path, device: &Device, batch: &BatchConfig) -> Result<Loaded, RegistryError> {
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
        engines: vec![engine],
        name,
    })
}
