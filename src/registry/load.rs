//! Loading one version on a blocking thread: a ready replica per device from the engine (which alone
//! knows each kind's files, tokenizer, chat template and warm-up), and the resident memory the load added.
//! The registry then starts the batchers with its budgets.
use std::path::Path;
use std::sync::Arc;

use tracing::info;

use super::RegistryError;
use super::repository::{Entry, Kind};
use crate::engine::{Device, EmbedEngine, GenEngine, device_name, ready_embedder, ready_generator};
use crate::tokenizer::TextTokenizer;
use crate::tokenizer::chat::ChatTemplate;
use crate::tokenizer::gguf::GgufTokenizer;

/// Loads and warms one version of either kind, and measures the resident memory it added.
pub(super) fn weights(
    entry: &Entry,
    root: &Path,
    devices: &[Device],
    prefill_chunk: Option<usize>,
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
    prefill_chunk: Option<usize>,
) -> Result<LoadedGen, RegistryError> {
    let (name, path) = (entry.name.clone(), entry.path.as_path());
    let mut engines = Vec::with_capacity(devices.len());
    let mut first = None;
    for device in devices {
        let ready = ready_generator(&name, path, device, prefill_chunk)?;
        engines.push(ready.engine);
        first.get_or_insert((ready.tokenizer, ready.template, ready.context_length, ready.kv_bytes_per_token));
    }
    let (tokenizer, template, context_length, kv_bytes_per_token) = first.expect("at least one device");
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
    let (name, dir) = (entry.name.clone(), entry.path.as_path());
    let mut engines = Vec::with_capacity(devices.len());
    let mut first = None;
    for device in devices {
        let ready = ready_embedder(&name, dir, device)?;
        engines.push(ready.engine);
        first.get_or_insert((ready.tokenizer, ready.info));
    }
    let (tokenizer, info) = first.expect("at least one device");
    info!(model = %name, version = entry.version, replicas = engines.len(), "embedding model ready");
    Ok(Loaded {
        version: entry.version,
        source: dir.strip_prefix(root).unwrap_or(dir).display().to_string(),
        device: devices_name(devices),
        dimension: info.dimension,
        max_input_tokens: info.max_input_tokens,
        default_normalize: info.normalize,
        activation_bytes_per_token: info.activation_bytes_per_token,
        weight_bytes: 0,
        tokenizer,
        engines,
        name,
    })
}
