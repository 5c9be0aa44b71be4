//! The ListModels RPC.
use super::pb;
use crate::registry::Registry;

pub(super) fn list(registry: &Registry) -> pb::ListModelsResponse {
    let models = registry
        .embedders()
        .map(|m| pb::ModelInfo {
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
            is_default: &*m.name == registry.default_embedder(),
            source: m.source.clone(),
        })
        .collect();
    pb::ListModelsResponse { models }
}
