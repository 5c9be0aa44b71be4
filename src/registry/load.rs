//! Each model kind's loading details, on a blocking thread: weights on every device (one replica each),
//! the tokenizer and chat template, the warm-up pass, the engine threads, and the resident memory the
//! load added. The registry then starts the batchers with its budgets.
use std::path::Path;
use std::sync::Arc;

use tracing::{info, warn};

use super::RegistryError;
use super::repository::{Entry, Kind};
use crate::engine::{
    Device, EmbedEngine, Embedder, GenEngine, LlamaGenerator, LoadedLlama, SentenceEmbedder, device_name,
};
use crate::tokenizer::TextTokenizer;
use crate::tokenizer::chat::ChatTemplate;
use crate::tokenizer::gguf::GgufTokenizer;

/// Loads and warms one version of either kind, and measures the resident memory it added.
pub(super) fn weights(
    entry: &Entry,
    root: &Path,
    devices: &[Device],
    prefill_chunk: usize,
) -> Result<Loading, RegistryError> {
    let before = crate::resources::resident_bytes().unwrap_or(0);
    let mut loaded = match entry.kind {
        Kind::Embedding => load_embedder(entry, root, devices).map(|l| Loading::Embedding(Box::new(l)))?,
        Kind::Generation => load_generator(entry, root, devices, prefill_chunk).map(Loading::Generation)?,
    };
    loaded.set_weight_bytes(crate::resources::resident_bytes().unwrap_or(0).saturating_sub(before));
    Ok(loaded)
}

/// One version loaded on a blocking thread, before its batchers start.
pub(super) enum Loading {
    Embedding(Box<Loaded>),
    Generation(LoadedGen),
}

impl Loading {
    fn set_weight_bytes(&mut self, bytes: u64) {
        match self {
            Loading::Embedding(l) => l.weight_bytes = bytes,
            Loading::Generation(l) => l.weight_bytes = bytes,
        }
    }
}

/// A generation model loaded on a blocking thread, before its scheduler starts.
pub(super) struct LoadedGen {
    pub(super) name: String,
    pub(super) version: u64,
    pub(super) source: String,
    pub(super) device: String,
    pub(super) tokenizer: Arc<GgufTokenizer>,
    pub(super) template: Option<Arc<ChatTemplate>>,
    pub(super) context_length: usize,
    pub(super) kv_bytes_per_token: u64,
    pub(super) weight_bytes: u64,
    pub(super) engines: Vec<GenEngine>,
}

/// A model loaded on a blocking thread, before its batcher starts.
pub(super) struct Loaded {
    pub(super) name: String,
    pub(super) version: u64,
    pub(super) source: String,
    pub(super) device: String,
    pub(super) dimension: usize,
    pub(super) tokenizer: TextTokenizer,
    pub(super) max_input_tokens: usize,
    pub(super) default_normalize: bool,
    pub(super) activation_bytes_per_token: u64,
    pub(super) weight_bytes: u64,
    pub(super) engines: Vec<EmbedEngine>,
}

fn devices_name(devices: &[Device]) -> String {
    devices.iter().map(device_name).collect::<Vec<_>>().join(",")
}

fn load_generator(
    entry: &Entry,
    root: &Path,
    devices: &[Device],
    prefill_chunk: usize,
) -> Result<LoadedGen, RegistryError> {
    let (name, path) = (entry.name.clone(), entry.path.as_path());
    let mut engines = Vec::with_capacity(devices.len());
    let mut first = None;
    for device in devices {
        let LoadedLlama { generator, tokenizer, context_length, kv_bytes_per_token } =
            LlamaGenerator::load(path, device, prefill_chunk)?;
        engines.push(
            GenEngine::spawn(&name, generator).map_err(|source| RegistryError::Io { path: path.into(), source })?,
        );
        first.get_or_insert((tokenizer, context_length, kv_bytes_per_token));
    }
    let (tokenizer, context_length, kv_bytes_per_token) = first.expect("at least one device");
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
    info!(
        model = %name,
        version = entry.version,
        chat_template = template.is_some(),
        replicas = engines.len(),
        "generation model ready"
    );
    Ok(LoadedGen {
        version: entry.version,
        source: path.strip_prefix(root).unwrap_or(path).display().to_string(),
        device: devices_name(devices),
        context_length,
        kv_bytes_per_token,
        weight_bytes: 0,
        tokenizer,
        template,
        engines,
        name,
    })
}

fn load_embedder(entry: &Entry, root: &Path, devices: &[Device]) -> Result<Loaded, RegistryError> {
    let mut replicas = devices.iter().map(|d| load_embedder_on(entry, root, d));
    let mut loaded = replicas.next().expect("at least one device")?;
    for other in replicas {
        loaded.engines.extend(other?.engines);
    }
    loaded.device = devices_name(devices);
    Ok(loaded)
}

fn load_embedder_on(entry: &Entry, root: &Path, device: &Device) -> Result<Loaded, RegistryError> {
    let (name, dir) = (entry.name.clone(), entry.path.as_path());
    let started = std::time::Instant::now();
    let (mut model, info) = SentenceEmbedder::load(dir, device)?;
    let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), info.max_input_tokens)?;
    // Warm-up: one real forward pass before health says SERVING, so the first caller does not pay for
    // lazy allocations and page faults of the weights.
    let warm = model.embed(&[tokenizer.minimal()?])?;
    if warm.first().map(Vec::len) != Some(info.dimension) {
        warn!(model = %name, "warm-up returned an unexpected width");
    }
    info!(
        model = %name,
        version = entry.version,
        dimension = info.dimension,
        max_input_tokens = info.max_input_tokens,
        normalize = info.normalize,
        pooling = ?info.pooling,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "embedding model loaded and warmed"
    );
    let engine = EmbedEngine::spawn(&name, model).map_err(|source| RegistryError::Io { path: dir.into(), source })?;
    Ok(Loaded {
        version: entry.version,
        source: dir.strip_prefix(root).unwrap_or(dir).display().to_string(),
        device: device_name(device),
        dimension: info.dimension,
        max_input_tokens: info.max_input_tokens,
        default_normalize: info.normalize,
        activation_bytes_per_token: info.activation_bytes_per_token,
        weight_bytes: 0,
        tokenizer,
        engines: vec![engine],
        name,
    })
}
