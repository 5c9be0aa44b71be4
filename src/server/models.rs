//! The ListModels RPC.
use super::pb;
use crate::registry::Registry;

pub(super) fn list(registry: &Registry) -> pb::ListModelsResponse {
    let embedders = registry.embedders().map(|m| pb::ModelInfo {
        name: m.name.to_string(),
        kind: pb::ModelKind::Embedding.into(),
        device: m.device.clone(),
        limits: Some(pb::ModelLimits {
            max_input_tokens: m.limits.max_input_tokens as u32,
            max_batch_size: m.batch.max_batch_size as u32,
            embedding_dimension: m.dimension as u32,
            max_batch_tokens: m.batch.max_batch_tokens as u32,
            max_queue: m.batch.max_queue as u32,
        }),
        is_default: registry.default_embedder() == Some(&*m.name),
        source: m.source.clone(),
        load: Some(pb::ModelLoad { queue_size: m.batcher.queue_len() as u32, running: m.batcher.running() as u32 }),
    });
    let generators = registry.generators().map(|m| pb::ModelInfo {
        name: m.name.to_string(),
        kind: pb::ModelKind::Generation.into(),
        device: m.device.clone(),
        limits: Some(pb::ModelLimits {
            max_input_tokens: m.limits.context_length as u32,
            max_batch_size: m.scheduler.max_running as u32,
            embedding_dimension: 0,
            max_batch_tokens: m.scheduler.max_kv_tokens as u32,
            max_queue: m.scheduler.max_waiting as u32,
        }),
        is_default: registry.default_generator() == Some(&*m.name),
        source: m.source.clone(),
        load: Some(pb::ModelLoad { queue_size: m.batcher.waiting() as u32, running: m.batcher.running() as u32 }),
    });
    pb::ListModelsResponse { models: embedders.chain(generators).collect() }
}
