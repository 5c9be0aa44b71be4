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

/// What the pool asks of one replica's batcher, whichever model kind.
pub trait Replica {
    /// Requests queued, not yet running.
    fn waiting(&self) -> usize;
    /// Requests (or sequences) on the model now.
    fn running(&self) -> usize;
    /// How long its model thread has shown no life.
    fn silence(&self) -> std::time::Duration;
}

impl Replica for EmbedBatcher {
    fn waiting(&self) -> usize {
        self.queue_len()
    }
    fn running(&self) -> usize {
        EmbedBatcher::running(self)
    }
    fn silence(&self) -> std::time::Duration {
        EmbedBatcher::silence(self)
    }
}

impl Replica for GenBatcher {
    fn waiting(&self) -> usize {
        GenBatcher::waiting(self)
    }
    fn running(&self) -> usize {
        GenBatcher::running(self)
    }
    fn silence(&self) -> std::time::Duration {
        GenBatcher::silence(self)
    }
}

/// One model's replicas, for both model kinds: the routing and the totals live here once.
#[derive(Clone)]
pub struct Pool<B> {
    replicas: Vec<B>,
}

pub type EmbedPool = Pool<EmbedBatcher>;
pub type GenPool = Pool<GenBatcher>;

impl<B: Replica> Pool<B> {
    pub fn new(replicas: Vec<B>) -> Self {
        assert!(!replicas.is_empty(), "a model needs at least one replica");
        Self { replicas }
    }

    pub fn replicas(&self) -> usize {
        self.replicas.len()
    }

    /// The replica a new request goes to: the least loaded now (waiting plus running).
    pub fn pick(&self) -> &B {
        &self.replicas[least_loaded(self.replicas.iter().map(|b| b.waiting() + b.running()))]
    }

    /// Requests waiting, over every replica.
    pub fn waiting(&self) -> usize {
        self.replicas.iter().map(B::waiting).sum()
    }

    pub fn running(&self) -> usize {
        self.replicas.iter().map(B::running).sum()
    }

    /// The longest silence of any replica's model thread.
    pub fn silence(&self) -> std::time::Duration {
        self.replicas.iter().map(B::silence).max().unwrap_or_default()
    }
}

impl Pool<GenBatcher> {
    pub async fn generate(
        &self,
        request: ValidGenerate,
        deadline: Option<Instant>,
        priority: Priority,
    ) -> Result<GenStream, BatchError> {
        self.pick().generate(request, deadline, priority).await
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
