//! A model loaded on several devices (one replica per visible GPU): one batcher per replica, and calls
//! routed to the replica with the least work waiting or running. With one device this is a thin wrapper.
use tokio::time::Instant;

use super::generate::{GenBatcher, GenStream};
use super::{BatchError, EmbedBatcher, Priority};
use crate::validate::ValidGenerate;

/// The index of the least loaded replica; ties go to the first, so one replica keeps the traffic while
/// the others are idle only if it is truly no busier.
pub fn least_loaded(loads: impl IntoIterator<Item = usize>) -> usize {
    loads.into_iter().enumerate().min_by_key(|&(i, load)| (load, i)).map(|(i, _)| i).unwrap_or(0)
}

#[derive(Clone)]
pub struct EmbedPool {
    replicas: Vec<EmbedBatcher>,
}

impl EmbedPool {
    pub fn new(replicas: Vec<EmbedBatcher>) -> Self {
        assert!(!replicas.is_empty(), "a model needs at least one replica");
        Self { replicas }
    }

    pub fn replicas(&self) -> usize {
        self.replicas.len()
    }

    /// The replica a new request goes to: the least loaded now. Pick it before validating the request
    /// and [`EmbedBatcher::announce`] it there.
    pub fn pick(&self) -> &EmbedBatcher {
        &self.replicas[least_loaded(self.replicas.iter().map(|b| b.queue_len() + b.running()))]
    }

    /// Requests waiting, over every replica.
    pub fn queue_len(&self) -> usize {
        self.replicas.iter().map(EmbedBatcher::queue_len).sum()
    }

    pub fn running(&self) -> usize {
        self.replicas.iter().map(EmbedBatcher::running).sum()
    }

    /// The longest silence of any replica's model thread.
    pub fn silence(&self) -> std::time::Duration {
        self.replicas.iter().map(EmbedBatcher::silence).max().unwrap_or_default()
    }
}

#[derive(Clone)]
pub struct GenPool {
    replicas: Vec<GenBatcher>,
}

impl GenPool {
    pub fn new(replicas: Vec<GenBatcher>) -> Self {
        assert!(!replicas.is_empty(), "a model needs at least one replica");
        Self { replicas }
    }

    pub fn replicas(&self) -> usize {
        self.replicas.len()
    }

    pub async fn generate(
        &self,
        request: ValidGenerate,
        deadline: Option<Instant>,
        priority: Priority,
    ) -> Result<GenStream, BatchError> {
        let i = least_loaded(self.replicas.iter().map(|b| b.waiting() + b.running()));
        self.replicas[i].generate(request, deadline, priority).await
    }

    pub fn waiting(&self) -> usize {
        self.replicas.iter().map(GenBatcher::waiting).sum()
    }

    pub fn running(&self) -> usize {
        self.replicas.iter().map(GenBatcher::running).sum()
    }

    /// The longest silence of any replica's model thread.
    pub fn silence(&self) -> std::time::Duration {
        self.replicas.iter().map(GenBatcher::silence).max().unwrap_or_default()
    }

    /// KV-cache positions reserved, over every replica.
    pub fn kv_reserved(&self) -> usize {
        self.replicas.iter().map(GenBatcher::kv_reserved).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_to_the_least_loaded_replica() {
        assert_eq!(least_loaded([3, 1, 2]), 1);
        assert_eq!(least_loaded([0, 0]), 0);
        assert_eq!(least_loaded([5, 5, 4, 4]), 2);
        assert_eq!(least_loaded([7]), 0);
    }
}
