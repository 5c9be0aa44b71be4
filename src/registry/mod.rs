//! The loaded models: finds them and their versions in the model directory, loads and warms each one
//! (each kind's details in `load`), starts its batchers with the memory plan's budgets, and swaps versions while the server runs. Request handlers look
//! models up here by name (and optionally version). The maps sit behind one lock, held only to look up
//! or install an `Arc` (never across a load), so a swap never makes a request wait.
mod load;
mod repository;
mod versions;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tracing::info;

use self::load::Loading;
use self::repository::{Entry, Kind};
use self::versions::{VersionState, Versioned, Versions};
use crate::batcher::generate::{GenBatcher, GenConfig};
use crate::batcher::replicas::{EmbedPool, GenPool};
use crate::batcher::{BatchConfig, EmbedBatcher};
use crate::config::{GenerateConfig, ModelConfig};
use crate::engine::{Device, EngineError, Placement, device_memory, device_name, gpu_kv_tokens, place, plan_devices};
use crate::tokenizer::TextTokenizer;
use crate::tokenizer::chat::ChatTemplate;
use crate::tokenizer::gguf::GgufTokenizer;
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
    #[error(transparent)]
    Memory(#[from] crate::resources::PlanError),
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Models and devices do not fit together: a placement, or GPU memory.
    #[error("{0}")]
    Devices(String),
    #[error("model loading was interrupted: {0}")]
    Join(String),
    #[error("model {name:?} is not in the model repository (it holds: {available})")]
    NotInRepository { name: String, available: String },
    #[error("model {name:?} has no version {version} in the model repository (it has: {available})")]
    UnknownVersion { name: String, version: u64, available: String },
    #[error("model {name:?} version {version} is not a {loaded} model, as the loaded versions are")]
    KindChanged { name: String, version: u64, loaded: &'static str },
    #[error("model {name:?} is not loaded: a canary ({percent}%) needs a stable version beside it; load one first")]
    CanaryWithoutStable { name: String, percent: u8 },
    #[error("model {name:?} version {version} is already the stable version; a canary must be another version")]
    CanaryIsStable { name: String, version: u64 },
    #[error("model {name:?}{} is not loaded", .version.map(|v| format!(" version {v}")).unwrap_or_default())]
    NotLoaded { name: String, version: Option<u64> },
}

/// A loaded embedding model, ready for requests.
pub struct EmbeddingModel {
    pub name: Arc<str>,
    pub version: u64,
    /// Where it came from, relative to the model directory.
    pub source: String,
    pub device: String,
    pub dimension: usize,
    pub tokenizer: Arc<TextTokenizer>,
    pub limits: PredictLimits,
    pub batch: BatchConfig,
    /// Resident memory its loading added (weights, all replicas).
    pub weight_bytes: u64,
    pub activation_bytes_per_token: u64,
    /// One batcher per device replica.
    pub batcher: EmbedPool,
}

/// A loaded generation model, ready for requests.
pub struct GenerationModel {
    pub name: Arc<str>,
    pub version: u64,
    pub source: String,
    pub device: String,
    pub tokenizer: Arc<GgufTokenizer>,
    pub template: Option<Arc<ChatTemplate>>,
    pub limits: GenerateLimits,
    pub scheduler: GenConfig,
    /// Resident memory its loading added (weights, all replicas).
    pub weight_bytes: u64,
    pub kv_bytes_per_token: u64,
    /// One scheduler per device replica.
    pub batcher: GenPool,
}

pub struct Registry {
    root: PathBuf,
    devices: Vec<Device>,
    /// `--place`: models pinned to some of `devices`.
    placements: Vec<Placement>,
    batch: BatchConfig,
    generate: GenerateConfig,
    models: RwLock<Models>,
    /// One load or unload at a time: loading takes the cores for seconds, and two loads of one name
    /// would race to install their versions.
    admin: tokio::sync::Mutex<()>,
    /// The budgets sized at start; versions loaded later run with the same.
    plan: Option<crate::resources::MemoryPlan>,
}

#[derive(Default)]
struct Models {
    embedders: BTreeMap<String, Versions<EmbeddingModel>>,
    generators: BTreeMap<String, Versions<GenerationModel>>,
    default_embedder: Option<String>,
    default_generator: Option<String>,
}

/// One version of a model, loaded and warmed, its batchers running.
pub enum AnyModel {
    Embedding(Arc<EmbeddingModel>),
    Generation(Arc<GenerationModel>),
}

/// What a model version is doing, for the repository index (Triton's states).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexState {
    Ready,
    Unloading,
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    pub version: u64,
    pub state: IndexState,
    pub reason: String,
}

/// A loaded model's serving versions: the stable one and the canary with its share.
pub struct Served<M> {
    pub stable: Arc<M>,
    pub canary: Option<(Arc<M>, u8)>,
}

impl<M: Versioned> Served<M> {
    /// The versions taking requests.
    fn versions(&self) -> impl Iterator<Item = &Arc<M>> {
        std::iter::once(&self.stable).chain(self.canary.as_ref().map(|(m, _)| m))
    }

    /// The canary's version and share, if there is one.
    pub fn canary_share(&self) -> Option<(u64, u8)> {
        self.canary.as_ref().map(|(m, p)| (m.version(), *p))
    }
}

impl<M: Versioned> Served<M> {
    /// Requests waiting and running (sequences decoding), over the versions taking requests (not
    /// draining ones).
    pub fn load(&self) -> (usize, usize) {
        (self.versions().map(|m| m.waiting()).sum(), self.versions().map(|m| m.running()).sum())
    }
}

impl Served<GenerationModel> {
    /// KV-cache positions reserved and the budget, over the versions taking requests and their replicas.
    pub fn kv(&self) -> (usize, usize) {
        let used = self.versions().map(|m| m.batcher.kv_reserved()).sum();
        let budget = self.versions().map(|m| m.scheduler.max_kv_tokens * m.batcher.replicas()).sum();
        (used, budget)
    }
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

fn served<M: Versioned>(v: &Versions<M>) -> Option<Served<M>> {
    Some(Served { stable: v.stable()?.clone(), canary: v.canary().map(|c| (c.model.clone(), c.percent)) })
}

fn names<M: Versioned>(map: &BTreeMap<String, Versions<M>>) -> String {
    map.iter().filter(|(_, v)| v.is_loaded()).map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
}

impl Registry {
    /// Loads the highest version of every model in the directory, each warmed by one forward pass.
    /// Must run on a tokio runtime (the batchers are tasks); the loading itself happens on blocking
    /// threads.
    pub async fn load(
        config: ModelConfig,
        batch: BatchConfig,
        generate: GenerateConfig,
    ) -> Result<Self, RegistryError> {
        let device = config.device;
        // One replica of every model per device (one per visible GPU, or the CPU).
        let devices = tokio::task::spawn_blocking(move || plan_devices(device))
            .await
            .map_err(|e| RegistryError::Join(e.to_string()))??;
        let mut registry = Self {
            root: config.model_dir.clone(),
            devices,
            placements: config.placements.clone(),
            batch,
            generate,
            models: RwLock::new(Models::default()),
            admin: tokio::sync::Mutex::new(()),
            plan: None,
        };
        let scanned = registry.scan().await?;
        let entries = repository::latest(&scanned);
        if entries.is_empty() {
            return Err(RegistryError::NoModels(config.model_dir.clone()));
        }
        if let Some(p) = config.placements.iter().find(|p| !scanned.iter().any(|e| e.name == p.model)) {
            let available: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
            return Err(RegistryError::Devices(format!(
                "--place {}: no such model in the model directory (it holds: {})",
                p.model,
                available.join(", ")
            )));
        }
        // Every model's weights first, then the budgets that fit what is left of the memory limit, then
        // the batchers with those budgets.
        let mut loaded = Vec::with_capacity(entries.len());
        for entry in entries {
            loaded.push(registry.load_weights(entry).await?);
        }
        registry.plan_memory(&config, &loaded)?;
        for l in loaded {
            match registry.start(l)? {
                AnyModel::Embedding(m) => {
                    registry.write().embedders.insert(m.name.to_string(), Versions::new(m));
                }
                AnyModel::Generation(m) => {
                    registry.write().generators.insert(m.name.to_string(), Versions::new(m));
                }
            }
        }
        {
            let mut models = registry.write();
            let names: Vec<String> = models.embedders.keys().cloned().collect();
            models.default_embedder =
                pick_default("embedding-model", &config.embedding_model, &names, DEFAULT_EMBEDDING_MODEL)?;
            let names: Vec<String> = models.generators.keys().cloned().collect();
            models.default_generator =
                pick_default("generation-model", &config.generation_model, &names, DEFAULT_GENERATION_MODEL)?;
        }
        Ok(registry)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Models> {
        // The lock guards plain maps that every writer leaves consistent, so a panic elsewhere while
        // it was held does not make them wrong.
        self.models.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Models> {
        self.models.write().unwrap_or_else(|e| e.into_inner())
    }

    async fn scan(&self) -> Result<Vec<Entry>, RegistryError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || repository::scan(&root))
            .await
            .map_err(|e| RegistryError::Join(e.to_string()))?
    }

    /// Loads and warms one version on a blocking thread, then starts its batchers here.
    async fn load_entry(&self, entry: Entry) -> Result<AnyModel, RegistryError> {
        let loaded = self.load_weights(entry).await?;
        self.start(loaded)
    }

    /// Loads and warms one version's weights on a blocking thread, its engine threads running.
    async fn load_weights(&self, entry: Entry) -> Result<Loading, RegistryError> {
        let on_gpus = self.devices.iter().any(|d| !d.is_cpu());
        let chosen =
            place(&entry.name, self.devices.len(), on_gpus, &self.placements).map_err(RegistryError::Devices)?;
        let devices: Vec<Device> = chosen.iter().map(|&i| self.devices[i].clone()).collect();
        let root = self.root.clone();
        let prefill_chunk = self.generate.prefill_chunk;
        // One load at a time (at start, and under the admin lock after), so the growth of the process's
        // resident memory is this model's.
        let work = move || load::weights(&entry, &root, &devices, prefill_chunk);
        tokio::task::spawn_blocking(work).await.map_err(|e| RegistryError::Join(e.to_string()))?
    }

    /// Sizes the KV cache and the embedding token budget from the memory limit, now that the models'
    /// resident memory is known, and logs the arithmetic (see `resources::plan`).
    fn plan_memory(&mut self, config: &ModelConfig, loaded: &[Loading]) -> Result<(), RegistryError> {
        let (mut generators, mut embedders, mut kv_bytes, mut act_bytes) = (0, 0, 0, 0);
        for l in loaded {
            match l {
                Loading::Embedding(e) => {
                    embedders += e.engines.len();
                    act_bytes = act_bytes.max(e.activation_bytes_per_token);
                }
                Loading::Generation(g) => {
                    generators += g.engines.len();
                    kv_bytes = kv_bytes.max(g.kv_bytes_per_token);
                }
            }
        }
        let plan = crate::resources::plan(crate::resources::PlanInputs {
            limit: config.memory.limit,
            resident: crate::resources::resident_bytes().unwrap_or(0),
            generators,
            kv_bytes_per_token: kv_bytes,
            embedders,
            batch_bytes_per_token: act_bytes,
            kv_tokens: config.memory.kv_tokens,
            batch_tokens: config.memory.batch_tokens,
        })?;
        info!(%plan, "memory plan");
        self.batch.max_batch_tokens = plan.batch_tokens;
        self.generate.scheduler.max_kv_tokens = plan.kv_tokens;
        // On GPUs the KV cache lives in device memory: its budget is what the fullest GPU has free after
        // the weights, beyond the share --gpu-memory-fraction keeps back (read once, now), unless
        // --max-kv-tokens set one.
        let gpus: Vec<(String, (u64, u64))> =
            self.devices.iter().filter_map(|d| device_memory(d).map(|m| (device_name(d), m))).collect();
        if generators > 0 && config.memory.kv_tokens.is_none() && !gpus.is_empty() {
            let fraction = config.memory.gpu_fraction;
            let tokens = gpus.iter().map(|(_, (free, total))| gpu_kv_tokens(*free, *total, fraction, kv_bytes)).min();
            let tokens = tokens.unwrap_or(0);
            for (name, (free, total)) in &gpus {
                info!(gpu = %name, free_mib = free >> 20, total_mib = total >> 20, fraction, "GPU memory after loading");
            }
            if tokens < self.generate.max_new_tokens + 1 {
                return Err(RegistryError::Devices(format!(
                    "the GPUs leave room for {tokens} KV positions at --gpu-memory-fraction {fraction}: less than one \
                     sequence of --max-new-tokens {}; raise the fraction or serve fewer models",
                    self.generate.max_new_tokens
                )));
            }
            info!(kv_tokens = tokens, kv_bytes_per_token = kv_bytes, "KV budget from GPU memory");
            self.generate.scheduler.max_kv_tokens = tokens;
        }
        self.plan = Some(plan);
        Ok(())
    }

    /// Starts a loaded version's batchers with the registry's budgets.
    fn start(&self, loaded: Loading) -> Result<AnyModel, RegistryError> {
        Ok(match loaded {
            Loading::Embedding(l) => {
                let l = *l;
                if self.batch.max_batch_tokens < l.max_input_tokens {
                    return Err(RegistryError::BudgetTooSmall {
                        model: l.name,
                        budget: self.batch.max_batch_tokens,
                        max_input: l.max_input_tokens,
                    });
                }
                let batcher = EmbedPool::new(
                    l.engines.into_iter().map(|e| EmbedBatcher::spawn(&l.name, e, self.batch.clone())).collect(),
                );
                AnyModel::Embedding(Arc::new(EmbeddingModel {
                    name: l.name.as_str().into(),
                    version: l.version,
                    source: l.source,
                    device: l.device,
                    dimension: l.dimension,
                    tokenizer: Arc::new(l.tokenizer),
                    limits: PredictLimits {
                        max_inputs: self.batch.max_batch_size,
                        max_input_tokens: l.max_input_tokens,
                        max_batch_tokens: self.batch.max_batch_tokens,
                        default_normalize: l.default_normalize,
                    },
                    batch: self.batch.clone(),
                    weight_bytes: l.weight_bytes,
                    activation_bytes_per_token: l.activation_bytes_per_token,
                    batcher,
                }))
            }
            Loading::Generation(l) => {
                let scheduler = self.generate.scheduler.clone();
                let batcher = GenPool::new(
                    l.engines.into_iter().map(|e| GenBatcher::spawn(&l.name, e, scheduler.clone())).collect(),
                );
                AnyModel::Generation(Arc::new(GenerationModel {
                    name: l.name.as_str().into(),
                    version: l.version,
                    source: l.source,
                    device: l.device,
                    tokenizer: l.tokenizer,
                    template: l.template,
                    limits: GenerateLimits {
                        context_length: l.context_length.min(scheduler.max_kv_tokens),
                        max_new_tokens: self.generate.max_new_tokens,
                    },
                    scheduler,
                    weight_bytes: l.weight_bytes,
                    kv_bytes_per_token: l.kv_bytes_per_token,
                    batcher,
                }))
            }
        })
    }

    /// The memory plan made at start.
    /// Each GPU the models run on, by name, with its free and total memory now (empty on the CPU).
    pub fn gpu_memory(&self) -> Vec<(String, u64, u64)> {
        self.devices
            .iter()
            .filter_map(|d| device_memory(d).map(|(free, total)| (device_name(d), free, total)))
            .collect()
    }

    pub fn memory_plan(&self) -> Option<&crate::resources::MemoryPlan> {
        self.plan.as_ref()
    }

    /// The embedding model a request names (empty: the default one), at `version` or, without one,
    /// the version routing picks (the stable one or the canary).
    pub fn embedder_at(&self, name: &str, version: Option<u64>) -> Result<Arc<EmbeddingModel>, ValidationError> {
        let models = self.read();
        lookup("embedding", &models.embedders, models.default_embedder.as_deref(), name, version)
    }

    pub fn embedder(&self, name: &str) -> Result<Arc<EmbeddingModel>, ValidationError> {
        self.embedder_at(name, None)
    }

    /// The generation model a request names, as [`Registry::embedder_at`] does.
    pub fn generator_at(&self, name: &str, version: Option<u64>) -> Result<Arc<GenerationModel>, ValidationError> {
        let models = self.read();
        lookup("generation", &models.generators, models.default_generator.as_deref(), name, version)
    }

    pub fn generator(&self, name: &str) -> Result<Arc<GenerationModel>, ValidationError> {
        self.generator_at(name, None)
    }

    /// A model of either kind by name (no default), as [`Registry::embedder_at`] resolves versions.
    pub fn model_at(&self, name: &str, version: Option<u64>) -> Result<AnyModel, ValidationError> {
        let models = self.read();
        if models.embedders.get(name).is_some_and(Versions::is_loaded) {
            return lookup("embedding", &models.embedders, None, name, version).map(AnyModel::Embedding);
        }
        if models.generators.get(name).is_some_and(Versions::is_loaded) {
            return lookup("generation", &models.generators, None, name, version).map(AnyModel::Generation);
        }
        let loaded = [names(&models.embedders), names(&models.generators)];
        let loaded = loaded.iter().filter(|n| !n.is_empty()).cloned().collect::<Vec<_>>().join(", ");
        Err(ValidationError::UnknownModel { kind: "", name: name.to_string(), loaded })
    }

    /// Models whose model thread (any version taking requests, any replica) has shown no life for
    /// `timeout` or longer, with that silence: a hung forward pass or a deadlock.
    pub fn stalled(&self, timeout: Duration) -> Vec<(Arc<str>, Duration)> {
        let e = self
            .embedders()
            .into_iter()
            .flat_map(|s| s.versions().map(|m| (m.name.clone(), m.batcher.silence())).collect::<Vec<_>>());
        let g = self
            .generators()
            .into_iter()
            .flat_map(|s| s.versions().map(|m| (m.name.clone(), m.batcher.silence())).collect::<Vec<_>>());
        e.chain(g).filter(|(_, silence)| *silence >= timeout).collect()
    }

    /// Every loaded embedding model, by name.
    pub fn embedders(&self) -> Vec<Served<EmbeddingModel>> {
        self.read().embedders.values().filter_map(served).collect()
    }

    pub fn generators(&self) -> Vec<Served<GenerationModel>> {
        self.read().generators.values().filter_map(served).collect()
    }

    /// The versions of `name` taking requests: stable first, then the canary.
    pub fn serving_versions(&self, name: &str) -> Vec<u64> {
        let models = self.read();
        let s = match (models.embedders.get(name), models.generators.get(name)) {
            (Some(v), _) => served(v).map(|s| s.versions().map(|m| m.version).collect()),
            (None, Some(v)) => served(v).map(|s| s.versions().map(|m| m.version).collect()),
            (None, None) => None,
        };
        s.unwrap_or_default()
    }

    pub fn default_embedder(&self) -> Option<String> {
        self.read().default_embedder.clone()
    }

    pub fn default_generator(&self) -> Option<String> {
        self.read().default_generator.clone()
    }

    /// Loads `version` of `name` (the highest on disk when `None`), warms it, and then, atomically,
    /// makes it the stable version, or with `canary_percent` the canary taking that share of the
    /// requests that name no version. The version it replaces finishes its requests, then is freed.
    /// Asking for the current canary's version without a share promotes it without reloading.
    /// Returns the version now serving.
    pub async fn load_version(
        &self,
        name: &str,
        version: Option<u64>,
        canary_percent: Option<u8>,
    ) -> Result<u64, RegistryError> {
        let _admin = self.admin.lock().await;
        let entries = self.scan().await?;
        let on_disk: Vec<&Entry> = entries.iter().filter(|e| e.name == name).collect();
        if on_disk.is_empty() {
            let mut all: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
            all.dedup();
            return Err(RegistryError::NotInRepository { name: name.into(), available: all.join(", ") });
        }
        let entry = match version {
            None => *on_disk.iter().max_by_key(|e| e.version).expect("not empty"),
            Some(v) => *on_disk.iter().find(|e| e.version == v).ok_or_else(|| RegistryError::UnknownVersion {
                name: name.into(),
                version: v,
                available: on_disk.iter().map(|e| e.version.to_string()).collect::<Vec<_>>().join(", "),
            })?,
        };
        let v = entry.version;
        {
            let mut models = self.write();
            let loaded_as = if models.embedders.get(name).is_some_and(Versions::is_loaded) {
                Some(Kind::Embedding)
            } else if models.generators.get(name).is_some_and(Versions::is_loaded) {
                Some(Kind::Generation)
            } else {
                None
            };
            if let Some(kind) = loaded_as
                && kind != entry.kind
            {
                return Err(RegistryError::KindChanged { name: name.into(), version: v, loaded: kind.as_str() });
            }
            if let Some(p) = canary_percent {
                if loaded_as.is_none() {
                    return Err(RegistryError::CanaryWithoutStable { name: name.into(), percent: p });
                }
                let stable = match entry.kind {
                    Kind::Embedding => models.embedders[name].stable().map(|m| m.version),
                    Kind::Generation => models.generators[name].stable().map(|m| m.version),
                };
                if stable == Some(v) {
                    return Err(RegistryError::CanaryIsStable { name: name.into(), version: v });
                }
            } else {
                let promoted = match entry.kind {
                    Kind::Embedding => models.embedders.get_mut(name).is_some_and(|m| m.promote_canary(v)),
                    Kind::Generation => models.generators.get_mut(name).is_some_and(|m| m.promote_canary(v)),
                };
                if promoted {
                    info!(model = name, version = v, "canary promoted to stable");
                    return Ok(v);
                }
            }
        }
        let started = std::time::Instant::now();
        let ready = self.load_entry(entry.clone()).await?;
        let mut models = self.write();
        fn install<M: Versioned>(map: &mut BTreeMap<String, Versions<M>>, name: &str, m: Arc<M>, canary: Option<u8>) {
            match (map.get_mut(name), canary) {
                (Some(v), Some(p)) => v.set_canary(m, p),
                (Some(v), None) => v.promote(m),
                (None, _) => {
                    map.insert(name.to_string(), Versions::new(m));
                }
            }
        }
        match ready {
            AnyModel::Embedding(m) => {
                install(&mut models.embedders, name, m, canary_percent);
                models.default_embedder.get_or_insert_with(|| name.to_string());
            }
            AnyModel::Generation(m) => {
                install(&mut models.generators, name, m, canary_percent);
                models.default_generator.get_or_insert_with(|| name.to_string());
            }
        }
        info!(
            model = name,
            version = v,
            canary_percent = canary_percent.unwrap_or(0),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "model version loaded, warmed and switched in"
        );
        Ok(v)
    }

    /// Unloads `name`: every version, or with `version` the canary of that version only (a rollback).
    /// New requests stop at once; running ones finish on the version they started on.
    pub async fn unload(&self, name: &str, version: Option<u64>) -> Result<(), RegistryError> {
        let _admin = self.admin.lock().await;
        let mut models = self.write();
        let models = &mut *models;
        fn unload<M: Versioned>(v: &mut Versions<M>, version: Option<u64>) -> Result<(), Option<u64>> {
            match version {
                None => v.unload(),
                Some(n) if v.canary().is_some_and(|c| c.model.version() == n) => {
                    v.drop_canary(n);
                }
                Some(n) if v.stable().is_some_and(|s| s.version() == n) => v.unload(),
                Some(n) => return Err(Some(n)),
            }
            Ok(())
        }
        let result = if let Some(v) = models.embedders.get_mut(name).filter(|v| v.is_loaded()) {
            unload(v, version)
        } else if let Some(v) = models.generators.get_mut(name).filter(|v| v.is_loaded()) {
            unload(v, version)
        } else {
            Err(None)
        };
        match result {
            Ok(()) => {
                info!(model = name, version = version.unwrap_or(0), "unloaded; running requests finish first");
                Ok(())
            }
            Err(version) => Err(RegistryError::NotLoaded { name: name.into(), version }),
        }
    }

    /// Every model version on disk or in memory, and its state.
    pub async fn index(&self) -> Result<Vec<IndexEntry>, RegistryError> {
        let entries = self.scan().await?;
        let mut models = self.write();
        let mut states: BTreeMap<(String, u64), (IndexState, String)> = BTreeMap::new();
        for e in entries {
            states.insert((e.name, e.version), (IndexState::Unavailable, "not loaded".into()));
        }
        fn collect<M: Versioned>(
            map: &mut BTreeMap<String, Versions<M>>,
            states: &mut BTreeMap<(String, u64), (IndexState, String)>,
        ) {
            for (name, versions) in map.iter_mut() {
                // Retired versions first, so a version that is draining and serving again (a reload
                // of the same version) shows as serving.
                let mut all = versions.states();
                all.reverse();
                for (v, s) in all {
                    let state = match s {
                        VersionState::Stable => (IndexState::Ready, String::new()),
                        VersionState::Canary(p) => (IndexState::Ready, format!("canary: {p}% of requests")),
                        VersionState::Draining => {
                            (IndexState::Unloading, "finishing the requests that started on it".into())
                        }
                    };
                    states.insert((name.clone(), v), state);
                }
            }
        }
        collect(&mut models.embedders, &mut states);
        collect(&mut models.generators, &mut states);
        Ok(states
            .into_iter()
            .map(|((name, version), (state, reason))| IndexEntry { name, version, state, reason })
            .collect())
    }
}

fn lookup<M: Versioned>(
    kind: &'static str,
    map: &BTreeMap<String, Versions<M>>,
    default: Option<&str>,
    name: &str,
    version: Option<u64>,
) -> Result<Arc<M>, ValidationError> {
    let name = if name.is_empty() { default.unwrap_or("") } else { name };
    let versions = map.get(name);
    let found = match version {
        None => versions.and_then(Versions::route),
        Some(v) => versions.and_then(|m| m.get(v)),
    };
    found.ok_or_else(|| unknown(kind, name, version, map))
}

/// The error for a model (or version) no request can reach, naming what can be.
fn unknown<M: Versioned>(
    kind: &'static str,
    name: &str,
    version: Option<u64>,
    map: &BTreeMap<String, Versions<M>>,
) -> ValidationError {
    match (version, map.get(name).filter(|v| v.is_loaded())) {
        (Some(v), Some(versions)) => {
            let mut serving: Vec<String> = versions.stable().iter().map(|m| m.version().to_string()).collect();
            serving.extend(versions.canary().map(|c| c.model.version().to_string()));
            ValidationError::UnknownVersion { name: name.to_string(), version: v, serving: serving.join(", ") }
        }
        _ => ValidationError::UnknownModel { kind, name: name.to_string(), loaded: names(map) },
    }
}

impl Versioned for EmbeddingModel {
    fn version(&self) -> u64 {
        self.version
    }
    fn waiting(&self) -> usize {
        self.batcher.waiting()
    }
    fn running(&self) -> usize {
        self.batcher.running()
    }
}

impl Versioned for GenerationModel {
    fn version(&self) -> u64 {
        self.version
    }
    fn waiting(&self) -> usize {
        self.batcher.waiting()
    }
    fn running(&self) -> usize {
        self.batcher.running()
    }
}
