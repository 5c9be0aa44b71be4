//! Admission to a model's queue, the same for both model kinds: one permit per waiting request, taken
//! before anything else, so a full queue is answered at once (RESOURCE_EXHAUSTED with a retry delay)
//! and the queue's channel, sized to the permits, never needs to block; and a request whose deadline
//! has already passed never takes a place.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::{BatchError, retry_after};

#[derive(Clone)]
pub struct Admission {
    model: Arc<str>,
    permits: Arc<Semaphore>,
    max_waiting: usize,
    /// Requests the model takes per round (a batch, or the running sequences): what the retry delay
    /// counts the waiting requests in.
    per_round: usize,
}

impl Admission {
    pub fn new(model: Arc<str>, max_waiting: usize, per_round: usize) -> Self {
        Self { model, permits: Arc::new(Semaphore::new(max_waiting)), max_waiting, per_round: per_round.max(1) }
    }

    /// Requests holding a place (queued, not yet on the model).
    pub fn waiting(&self) -> usize {
        self.max_waiting - self.permits.available_permits()
    }

    /// The delay a refused caller is told to wait: the rounds ahead of it at the recent round time.
    pub fn retry_after(&self, round: Duration) -> Duration {
        retry_after(self.waiting().div_ceil(self.per_round) + 1, round)
    }

    /// A place in the queue, held until the request leaves it; or QueueFull with the retry delay (the
    /// recent `round` time), or DeadlineExceeded for a request that expired on arrival.
    pub fn admit(&self, deadline: Option<Instant>, round: Duration) -> Result<OwnedSemaphorePermit, BatchError> {
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| BatchError::QueueFull {
            model: self.model.clone(),
            max_queue: self.max_waiting,
            retry_after: self.retry_after(round),
        })?;
        if deadline.is_some_and(|d| d <= Instant::now()) {
            // Already expired on arrival: not worth a place in the queue.
            crate::metrics::EXPIRED_BEFORE_MODEL.with(&[&self.model]).inc();
            return Err(BatchError::DeadlineExceeded { model: self.model.clone(), waited_ms: 0 });
        }
        Ok(permit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_a_freed_place_admits_again() {
        let a = Admission::new("m".into(), 2, 4);
        let round = Duration::from_millis(40);
        let first = a.admit(None, round).unwrap();
        let _second = a.admit(None, round).unwrap();
        assert_eq!(a.waiting(), 2);
        match a.admit(None, round) {
            Err(BatchError::QueueFull { max_queue: 2, retry_after, .. }) => assert!(retry_after >= round),
            other => panic!("expected QueueFull, got {:?}", other.map(|_| ())),
        }
        drop(first);
        assert!(a.admit(None, round).is_ok());
    }

    #[tokio::test]
    async fn an_expired_request_takes_no_place() {
        let a = Admission::new("m".into(), 1, 1);
        let err = a.admit(Some(Instant::now()), Duration::ZERO).map(|_| ()).unwrap_err();
        assert!(matches!(err, BatchError::DeadlineExceeded { waited_ms: 0, .. }), "{err}");
        assert_eq!(a.waiting(), 0);
    }
}
