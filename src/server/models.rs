//! The ListModels RPC.
use super::pb;
use crate::registry::Registry;

fn canary(share: Option<(u64, u8)>) -> Option<pb::ModelCanary> {
    share.map(|(v, p)| pb::ModelCanary { version: v.to_string(), percent: p as u32 })
}

fn load((queue_size, running): (usize, usize)) -> Option<pb::ModelLoad> {
    Some(pb::ModelLoad { queue_size: queue_size as u32, running: running as u32 })
}

pub(super) fn list(registry: &Registry) -> pb::ListModelsResponse {
    let (default_embedder, default_generator) = (registry.default_embedder(), registry.default_generator());
    let embedders = registry.embedders().into_iter().map(|s| {
        let m = &s.stable;
        pb::ModelInfo {
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
            is_default: default_embedder.as_deref() == Some(&*m.name),
            source: m.source.clone(),
            load: load(s.load()),
            version: m.version.to_string(),
            canary: canary(s.canary_share()),
        }
    });
    let generators = registry.generators().into_iter().map(|s| {
        let m = &s.stable;
        pb::ModelInfo {
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
            is_default: default_generator.as_deref() == Some(&*m.name),
            source: m.source.clone(),
            load: load(s.load()),
            version: m.version.to_string(),
            canary: canary(s.canary_share()),
        }
    });
    pb::ListModelsResponse { models: embedders.chain(generators).collect() }
}
