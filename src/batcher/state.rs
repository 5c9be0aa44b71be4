//! The embedding queue's pure state: what waits, when a batch is due, and which entries ride in it.
//! No channels and no clock of its own: every decision takes `now`, so it is unit-tested directly.
use std::collections::VecDeque;

use tokio::time::Instant;

use super::{BatchConfig, Priority, effective_arrival};

/// What the state needs to know about a waiting request.
pub trait Queued {
    /// Inputs this request adds to a batch (each counts against `max_batch_size`).
    fn inputs(&self) -> usize;
    /// Its tokens, all inputs together: batches are packed end to end, so this is what it costs.
    fn tokens(&self) -> usize;
    fn enqueued_at(&self) -> Instant;
    fn deadline(&self) -> Option<Instant>;
    /// True when nobody waits for the answer any more (the caller hung up).
    fn is_abandoned(&self) -> bool;
    fn priority(&self) -> Priority {
        Priority::Interactive
    }
}

#[derive(Debug)]
pub struct State<E> {
    queue: VecDeque<E>,
    config: BatchConfig,
    /// The last batch: how many requests it answered, and when.
    last: Option<(usize, Instant)>,
}

impl<E: Queued> State<E> {
    pub fn new(config: BatchConfig) -> Self {
        Self { queue: VecDeque::new(), config, last: None }
    }

    /// Tells the state a batch of `requests` has been answered at `now`.
    pub fn batch_done(&mut self, requests: usize, now: Instant) {
        self.last = Some((requests, now));
    }

    /// How many requests the window waits for: callers answered together tend to come back together,
    /// so when the oldest waiting request arrived within one window of the last batch's answers, as many
    /// as that batch held are expected; otherwise (a lone caller, or the first request after a pause)
    /// nobody is, and the batch need not wait at all. This keeps a sequential caller from paying the
    /// window on every call while a crowd of concurrent callers still meets in one batch.
    fn expected(&self, oldest: Instant) -> usize {
        match self.last {
            Some((requests, at)) if oldest <= at + self.config.max_queue_delay => requests,
            _ => 1,
        }
    }

    fn effective(&self, e: &E) -> Instant {
        effective_arrival(e.enqueued_at(), e.priority(), self.config.batch_priority_delay)
    }

    /// Queues in order of effective arrival (see [`Priority`]): the front is the next anchor.
    pub fn push(&mut self, entry: E) {
        let at = self.effective(&entry);
        let pos = self.queue.partition_point(|e| self.effective(e) <= at);
        self.queue.insert(pos, entry);
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Removes entries nobody waits for (dropped silently) and entries past their deadline (returned,
    /// so the caller can answer them with DEADLINE_EXCEEDED, and they are counted as expired even when
    /// the caller already stopped waiting at that deadline). Neither ever reaches the model.
    pub fn remove_stale(&mut self, now: Instant) -> Vec<E> {
        let mut expired = Vec::new();
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for e in self.queue.drain(..) {
            if e.deadline().is_some_and(|d| d <= now) {
                expired.push(e);
            } else if !e.is_abandoned() {
                kept.push_back(e);
            }
        }
        self.queue = kept;
        expired
    }

    /// A batch is due when the waiting inputs fill `max_batch_size`, or their tokens fill the token
    /// budget, or the oldest entry has waited the whole window, or as many requests wait as are expected:
    /// those of the last batch's crowd (see [`Self::expected`]) and the `coming` ones, announced and still
    /// being validated.
    pub fn is_due(&self, now: Instant, coming: usize) -> bool {
        let Some(oldest) = self.queue.iter().map(Queued::enqueued_at).min() else { return false };
        if oldest + self.config.max_queue_delay <= now {
            return true;
        }
        if coming == 0 && self.queue.len() >= self.expected(oldest) {
            return true;
        }
        let inputs: usize = self.queue.iter().map(Queued::inputs).sum();
        let tokens: usize = self.queue.iter().map(Queued::tokens).sum();
        inputs >= self.config.max_batch_size || tokens >= self.config.max_batch_tokens
    }

    /// The next batch, if one is due. The first entry in effective-arrival order always rides (so nothing
    /// starves); the rest join in that order, interactive and overdue batch entries before batch entries
    /// still inside their delay, while the batch stays within `max_batch_size` inputs and
    /// `max_batch_tokens` tokens. Lengths need no sorting: the encoder packs a batch's tokens end to end,
    /// so a mixed batch costs what its tokens cost. Validation guarantees that any single entry fits both
    /// bounds on its own.
    pub fn next_batch(&mut self, now: Instant, coming: usize) -> Option<Vec<E>> {
        if !self.is_due(now, coming) {
            return None;
        }
        let anchor = self.queue.front()?;
        let mut inputs = anchor.inputs();
        let mut tokens = anchor.tokens();
        let mut chosen = vec![0usize];
        let mut candidates: Vec<usize> = (1..self.queue.len()).collect();
        // Stable sort: within each class, queue (effective-arrival) order.
        candidates.sort_by_key(|&i| self.effective(&self.queue[i]) > now);
        for i in candidates {
            if inputs >= self.config.max_batch_size {
                break;
            }
            let e = &self.queue[i];
            let (new_inputs, new_tokens) = (inputs + e.inputs(), tokens + e.tokens());
            if new_inputs <= self.config.max_batch_size && new_tokens <= self.config.max_batch_tokens {
                inputs = new_inputs;
                tokens = new_tokens;
                chosen.push(i);
            }
        }
        chosen.sort_unstable();
        // Remove from the back so earlier indices stay valid; then restore arrival order.
        let mut batch: Vec<E> = chosen.iter().rev().filter_map(|&i| self.queue.remove(i)).collect();
        batch.reverse();
        Some(batch)
    }

    /// When the loop must look again even if nothing arrives: the end of the oldest entry's window
    /// (only useful while the model is idle) or the earliest deadline.
    pub fn next_wakeup(&self, model_idle: bool) -> Option<Instant> {
        let window = if model_idle {
            self.queue.iter().map(Queued::enqueued_at).min().map(|t| t + self.config.max_queue_delay)
        } else {
            None
        };
        let deadline = self.queue.iter().filter_map(Queued::deadline).min();
        match (window, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[derive(Debug, Clone)]
    struct Fake {
        id: usize,
        inputs: usize,
        tokens: usize,
        at: Instant,
        deadline: Option<Instant>,
        abandoned: bool,
        priority: Priority,
    }

    impl Queued for Fake {
        fn inputs(&self) -> usize {
            self.inputs
        }
        fn tokens(&self) -> usize {
            self.tokens
        }
        fn enqueued_at(&self) -> Instant {
            self.at
        }
        fn deadline(&self) -> Option<Instant> {
            self.deadline
        }
        fn is_abandoned(&self) -> bool {
            self.abandoned
        }
        fn priority(&self) -> Priority {
            self.priority
        }
    }

    fn config() -> BatchConfig {
        BatchConfig {
            max_batch_size: 8,
            max_queue_delay: Duration::from_millis(5),
            max_batch_tokens: 1000,
            max_queue: 64,
            batch_priority_delay: Duration::from_millis(100),
        }
    }

    fn entry(id: usize, inputs: usize, tokens: usize, at: Instant) -> Fake {
        Fake { id, inputs, tokens, at, deadline: None, abandoned: false, priority: Priority::Interactive }
    }

    fn batch(id: usize, at: Instant) -> Fake {
        Fake { priority: Priority::Batch, ..entry(id, 4, 10, at) }
    }

    fn ids(batch: &[Fake]) -> Vec<usize> {
        batch.iter().map(|e| e.id).collect()
    }

    #[test]
    fn waits_for_the_window_then_runs_a_partial_batch() {
        let t0 = Instant::now();
        let mut s = State::new(config());
        // Three callers were just answered together: the window waits for them.
        s.batch_done(3, t0);
        s.push(entry(1, 1, 10, t0));
        s.push(entry(2, 1, 10, t0 + Duration::from_millis(1)));
        assert!(s.next_batch(t0 + Duration::from_millis(4), 0).is_none());
        assert_eq!(s.next_wakeup(true), Some(t0 + Duration::from_millis(5)));
        let batch = s.next_batch(t0 + Duration::from_millis(5), 0).unwrap();
        assert_eq!(ids(&batch), vec![1, 2]);
        assert!(s.is_empty());
    }

    #[test]
    fn a_lone_caller_never_waits_and_a_crowd_meets_again() {
        let t0 = Instant::now();
        let mut s = State::new(config()); // a 5 ms window
        // Nothing answered yet: the first request goes at once.
        s.push(entry(0, 1, 10, t0));
        assert_eq!(ids(&s.next_batch(t0, 0).unwrap()), vec![0]);
        s.batch_done(1, t0 + Duration::from_millis(3));
        // A sequential caller, back right after its answer: at once again.
        let t1 = t0 + Duration::from_millis(3);
        s.push(entry(1, 1, 10, t1));
        assert_eq!(ids(&s.next_batch(t1, 0).unwrap()), vec![1]);
        // Four callers answered together come back one by one: the batch waits for all four...
        s.batch_done(4, t1 + Duration::from_millis(3));
        let t2 = t1 + Duration::from_millis(4);
        for id in 2..5 {
            s.push(entry(id, 1, 10, t2));
            assert!(s.next_batch(t2, 0).is_none(), "{id} of 4 is not a crowd yet");
        }
        s.push(entry(5, 1, 10, t2));
        assert_eq!(ids(&s.next_batch(t2, 0).unwrap()), vec![2, 3, 4, 5]);
        // ...but never longer than the window when one of them does not come back.
        s.batch_done(4, t2);
        for id in 6..9 {
            s.push(entry(id, 1, 10, t2 + Duration::from_millis(1)));
        }
        assert!(s.next_batch(t2 + Duration::from_millis(5), 0).is_none());
        assert_eq!(s.next_batch(t2 + Duration::from_millis(6), 0).unwrap().len(), 3);
        // After a pause longer than the window, a newcomer is not taken for the crowd's first...
        let t3 = t2 + Duration::from_millis(50);
        s.push(entry(9, 1, 10, t3));
        assert_eq!(ids(&s.next_batch(t3, 0).unwrap()), vec![9]);
        // ...unless others are announced (still being tokenized): then it waits for them, within the window.
        let t4 = t3 + Duration::from_millis(50);
        s.push(entry(10, 1, 10, t4));
        assert!(s.next_batch(t4, 2).is_none());
        s.push(entry(11, 1, 10, t4));
        assert!(s.next_batch(t4, 1).is_none());
        s.push(entry(12, 1, 10, t4));
        assert_eq!(ids(&s.next_batch(t4, 0).unwrap()), vec![10, 11, 12]);
        s.push(entry(13, 1, 10, t4));
        assert_eq!(ids(&s.next_batch(t4 + Duration::from_millis(5), 3).unwrap()), vec![13]);
    }

    #[test]
    fn a_full_batch_runs_without_waiting_and_is_capped_by_size() {
        let t0 = Instant::now();
        let mut s = State::new(config());
        s.batch_done(5, t0); // five callers were just answered
        for id in 0..5 {
            s.push(entry(id, 2, 10, t0)); // 10 inputs waiting, cap 8
        }
        let batch = s.next_batch(t0, 0).unwrap();
        assert_eq!(batch.iter().map(|e| e.inputs).sum::<usize>(), 8);
        assert_eq!(ids(&batch), vec![0, 1, 2, 3]);
        assert_eq!(s.len(), 1);
        // The rest is not due yet: one entry, window still open.
        assert!(s.next_batch(t0 + Duration::from_millis(1), 0).is_none());
    }

    #[test]
    fn the_token_budget_counts_real_tokens() {
        let t0 = Instant::now();
        let mut s = State::new(config()); // 1000 tokens
        s.push(entry(0, 1, 100, t0)); // anchor, oldest
        s.push(entry(1, 1, 400, t0));
        s.push(entry(2, 1, 110, t0));
        s.push(entry(3, 1, 90, t0));
        s.push(entry(4, 1, 350, t0));
        // 1050 tokens waiting: the budget is hit, so the batch is due at once.
        let batch = s.next_batch(t0, 0).unwrap();
        // In arrival order while they fit: 100 + 400 + 110 + 90 = 700; 350 more would pass 1000. Padded,
        // the same four would have counted 4 x 400 = 1600.
        assert_eq!(ids(&batch), vec![0, 1, 2, 3]);
        assert_eq!(batch.iter().map(|e| e.tokens).sum::<usize>(), 700);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn the_oldest_entry_always_rides_so_nothing_starves() {
        let t0 = Instant::now();
        let mut s = State::new(config());
        s.push(entry(0, 1, 900, t0)); // long and oldest
        for id in 1..8 {
            s.push(entry(id, 1, 10, t0 + Duration::from_millis(1)));
        }
        let batch = s.next_batch(t0 + Duration::from_millis(5), 0).unwrap();
        assert_eq!(batch[0].id, 0);
        // 900 + 7 x 10 = 970 fits.
        assert_eq!(batch.len(), 8);
        s.push(entry(8, 1, 990, t0 + Duration::from_millis(6)));
        s.push(entry(9, 1, 20, t0 + Duration::from_millis(6)));
        // The anchor's 990 leaves no room for 20 more.
        assert_eq!(ids(&s.next_batch(t0 + Duration::from_millis(20), 0).unwrap()), vec![8]);
    }

    #[test]
    fn abandoned_entries_are_dropped_and_expired_ones_returned() {
        let t0 = Instant::now();
        let mut s = State::new(config());
        let mut gone = entry(0, 1, 10, t0);
        gone.abandoned = true;
        let mut late = entry(1, 1, 10, t0);
        late.deadline = Some(t0 + Duration::from_millis(2));
        s.push(gone);
        s.push(late);
        s.push(entry(2, 1, 10, t0));
        assert_eq!(s.next_wakeup(false), Some(t0 + Duration::from_millis(2)));
        let expired = s.remove_stale(t0 + Duration::from_millis(2));
        assert_eq!(ids(&expired), vec![1]);
        assert_eq!(s.len(), 1);
        let batch = s.next_batch(t0 + Duration::from_millis(5), 0).unwrap();
        assert_eq!(ids(&batch), vec![2]);
    }

    #[test]
    fn interactive_requests_go_first_and_batch_work_still_gets_its_turn() {
        let t0 = Instant::now();
        let mut s = State::new(config()); // 8 inputs a batch; batch work yields for up to 100 ms
        s.push(batch(0, t0));
        s.push(batch(1, t0));
        s.push(batch(2, t0));
        s.push(entry(10, 4, 10, t0 + Duration::from_millis(1)));
        s.push(entry(11, 4, 10, t0 + Duration::from_millis(2)));
        // Twelve inputs waiting, room for eight: the interactive pair goes, batch work waits...
        let b = s.next_batch(t0 + Duration::from_millis(2), 0).unwrap();
        assert_eq!(ids(&b), vec![10, 11]);
        // ...but fills spare room when interactive traffic leaves some.
        s.push(entry(12, 4, 10, t0 + Duration::from_millis(3)));
        let b = s.next_batch(t0 + Duration::from_millis(8), 0).unwrap();
        assert_eq!(ids(&b), vec![12, 0]);
        // Once overdue, a batch request is ordered before newer interactive ones: no starvation.
        let late = t0 + Duration::from_millis(150);
        s.push(entry(13, 4, 10, late));
        s.push(entry(14, 4, 10, late));
        let b = s.next_batch(late, 0).unwrap();
        assert_eq!(ids(&b), vec![1, 2]);
        assert_eq!(ids(&s.next_batch(late + Duration::from_millis(5), 0).unwrap()), vec![13, 14]);
    }

    #[test]
    fn no_window_wakeup_while_the_model_is_busy() {
        let t0 = Instant::now();
        let mut s = State::new(config());
        s.push(entry(0, 1, 10, t0));
        assert_eq!(s.next_wakeup(false), None);
        assert!(s.next_wakeup(true).is_some());
    }
}
