//! The generation scheduler's pure state: who waits, who runs, and how much KV cache is promised. Each
//! admitted sequence reserves its prompt plus max_new_tokens positions, so a running sequence can never
//! run out of cache midway and nothing ever has to be preempted.
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::batcher::{Priority, effective_arrival};

/// What the state needs to know about a request.
pub trait Pending {
    /// KV-cache positions to reserve.
    fn kv_tokens(&self) -> usize;
    fn enqueued_at(&self) -> Instant;
    fn deadline(&self) -> Option<Instant>;
    /// Nobody listens any more.
    fn is_abandoned(&self) -> bool;
    fn priority(&self) -> Priority {
        Priority::Interactive
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenConfig {
    /// Sequences decoded together at most.
    pub max_running: usize,
    /// KV-cache positions reserved across running sequences at most.
    pub max_kv_tokens: usize,
    /// Requests waiting at most (beyond: RESOURCE_EXHAUSTED).
    pub max_waiting: usize,
    /// While nothing runs, how long the oldest arrival waits for company before its prefill starts.
    pub max_queue_delay: Duration,
    /// How much later than its arrival a batch-priority request is ordered (see [`Priority`]).
    pub batch_priority_delay: Duration,
}

impl Default for GenConfig {
    fn default() -> Self {
        Self {
            max_running: 16,
            max_kv_tokens: 32768,
            max_waiting: 64,
            max_queue_delay: Duration::from_millis(1),
            batch_priority_delay: Duration::from_secs(2),
        }
    }
}

#[derive(Debug)]
pub struct GenState<E> {
    waiting: VecDeque<E>,
    running: HashMap<u64, E>,
    kv_reserved: usize,
    next_id: u64,
    config: GenConfig,
}

/// Why a running sequence has to go.
#[derive(Debug, PartialEq, Eq)]
pub enum Leave {
    Abandoned,
    Expired,
}

impl<E: Pending> GenState<E> {
    pub fn new(config: GenConfig) -> Self {
        Self { waiting: VecDeque::new(), running: HashMap::new(), kv_reserved: 0, next_id: 1, config }
    }

    fn effective(&self, e: &E) -> Instant {
        effective_arrival(e.enqueued_at(), e.priority(), self.config.batch_priority_delay)
    }

    /// Queues in order of effective arrival (see [`Priority`]); admission takes from the front.
    pub fn push(&mut self, e: E) {
        let at = self.effective(&e);
        let pos = self.waiting.partition_point(|w| self.effective(w) <= at);
        self.waiting.insert(pos, e);
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn kv_reserved(&self) -> usize {
        self.kv_reserved
    }

    pub fn get(&self, id: u64) -> Option<&E> {
        self.running.get(&id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut E> {
        self.running.get_mut(&id)
    }

    /// Drops waiting entries nobody listens to; returns those past their deadline (whether or not the
    /// caller's stream has already ended at it: either way the deadline is why it leaves).
    pub fn remove_stale_waiting(&mut self, now: Instant) -> Vec<E> {
        let mut expired = Vec::new();
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for e in self.waiting.drain(..) {
            if e.deadline().is_some_and(|d| d <= now) {
                expired.push(e);
            } else if !e.is_abandoned() {
                kept.push_back(e);
            }
        }
        self.waiting = kept;
        expired
    }

    /// Running sequences that must leave before the next step, and why.
    pub fn leaving(&self, now: Instant) -> Vec<(u64, Leave)> {
        let mut out: Vec<(u64, Leave)> = self
            .running
            .iter()
            .filter_map(|(&id, e)| {
                if e.is_abandoned() {
                    Some((id, Leave::Abandoned))
                } else if e.deadline().is_some_and(|d| d <= now) {
                    Some((id, Leave::Expired))
                } else {
                    None
                }
            })
            .collect();
        out.sort_by_key(|(id, _)| *id);
        out
    }

    /// Every running sequence's id.
    pub fn running_ids(&self) -> Vec<u64> {
        self.running.keys().copied().collect()
    }

    /// Removes a running sequence and frees its reservation.
    pub fn finish(&mut self, id: u64) -> Option<E> {
        let e = self.running.remove(&id)?;
        self.kv_reserved -= e.kv_tokens();
        Some(e)
    }

    /// Waiting requests that start now, in order of effective arrival (arrival, for batch priority
    /// delayed; see [`Priority`]). Strictly in that order: when the first does not fit, nobody behind it
    /// jumps ahead, so a large request is never starved by a stream of small ones. While nothing runs,
    /// the first waits up to the window for company.
    pub fn admit(&mut self, now: Instant) -> Vec<(u64, &E)> {
        let Some(oldest) = self.waiting.front() else { return Vec::new() };
        if self.running.is_empty()
            && self.waiting.len() < self.config.max_running
            && oldest.enqueued_at() + self.config.max_queue_delay > now
        {
            return Vec::new();
        }
        let mut ids = Vec::new();
        while let Some(e) = self.waiting.front() {
            let need = e.kv_tokens();
            if self.running.len() >= self.config.max_running || self.kv_reserved + need > self.config.max_kv_tokens {
                break;
            }
            let e = self.waiting.pop_front().expect("front exists");
            let id = self.next_id;
            self.next_id += 1;
            self.kv_reserved += need;
            self.running.insert(id, e);
            ids.push(id);
        }
        ids.into_iter().map(|id| (id, &self.running[&id])).collect()
    }

    /// When to look again if nothing arrives: the window's end while idle, or the earliest deadline.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let window = if self.running.is_empty() {
            self.waiting.front().map(|e| e.enqueued_at() + self.config.max_queue_delay)
        } else {
            None
        };
        let deadlines = self.waiting.iter().chain(self.running.values()).filter_map(Pending::deadline);
        window.into_iter().chain(deadlines).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct R {
        kv: usize,
        at: Instant,
        deadline: Option<Instant>,
        gone: bool,
        priority: Priority,
    }

    impl Pending for R {
        fn kv_tokens(&self) -> usize {
            self.kv
        }
        fn enqueued_at(&self) -> Instant {
            self.at
        }
        fn deadline(&self) -> Option<Instant> {
            self.deadline
        }
        fn is_abandoned(&self) -> bool {
            self.gone
        }
        fn priority(&self) -> Priority {
            self.priority
        }
    }

    fn r(kv: usize, at: Instant) -> R {
        R { kv, at, deadline: None, gone: false, priority: Priority::Interactive }
    }

    fn cfg() -> GenConfig {
        GenConfig {
            max_running: 2,
            max_kv_tokens: 100,
            max_waiting: 8,
            max_queue_delay: Duration::from_millis(5),
            batch_priority_delay: Duration::from_millis(100),
        }
    }

    #[test]
    fn interactive_sequences_are_admitted_before_recent_batch_work_but_not_forever() {
        let t0 = Instant::now();
        let mut s = GenState::new(GenConfig { max_running: 1, ..cfg() });
        s.push(R { priority: Priority::Batch, ..r(10, t0) });
        s.push(r(10, t0 + Duration::from_millis(1)));
        let first = s.admit(t0 + Duration::from_millis(1))[0].1.at;
        assert_eq!(first, t0 + Duration::from_millis(1), "the interactive one goes first");
        s.finish(1);
        // The batch request is now overdue: a newer interactive arrival queues behind it.
        let late = t0 + Duration::from_millis(200);
        s.push(r(10, late));
        assert_eq!(s.admit(late)[0].1.priority, Priority::Batch);
    }

    #[test]
    fn idle_admission_waits_for_the_window_then_respects_the_limits() {
        let t0 = Instant::now();
        let mut s = GenState::new(cfg());
        s.push(r(30, t0));
        assert!(s.admit(t0).is_empty());
        assert_eq!(s.next_wakeup(), Some(t0 + Duration::from_millis(5)));
        s.push(r(30, t0));
        s.push(r(30, t0));
        // Two waiting fill max_running: no need to wait; the third must wait for a slot.
        let admitted: Vec<u64> = s.admit(t0).into_iter().map(|(id, _)| id).collect();
        assert_eq!(admitted, vec![1, 2]);
        assert_eq!((s.running(), s.waiting(), s.kv_reserved()), (2, 1, 60));
        s.finish(1);
        assert_eq!(s.admit(t0).len(), 1, "running sequences admit at once, no window");
    }

    #[test]
    fn the_kv_budget_is_first_come_first_served() {
        let t0 = Instant::now();
        let mut s = GenState::new(GenConfig { max_running: 8, ..cfg() });
        s.push(r(60, t0));
        s.push(r(60, t0)); // does not fit beside the first
        s.push(r(10, t0)); // would fit, but must not jump the queue
        let t = t0 + Duration::from_millis(5);
        assert_eq!(s.admit(t).len(), 1);
        assert!(s.admit(t).is_empty());
        s.finish(1);
        assert_eq!(s.admit(t).len(), 2);
        assert_eq!(s.kv_reserved(), 70);
    }

    #[test]
    fn abandoned_and_expired_entries_leave() {
        let t0 = Instant::now();
        let mut s = GenState::new(cfg());
        let mut late = r(10, t0);
        late.deadline = Some(t0 + Duration::from_millis(1));
        s.push(late);
        s.push(R { gone: true, ..r(10, t0) });
        let expired = s.remove_stale_waiting(t0 + Duration::from_millis(1));
        assert_eq!(expired.len(), 1);
        assert_eq!(s.waiting(), 0);
        s.push(r(10, t0));
        s.push(R { deadline: Some(t0 + Duration::from_millis(9)), ..r(10, t0) });
        s.admit(t0 + Duration::from_millis(5));
        s.get_mut(1).unwrap().gone = true;
        assert_eq!(s.leaving(t0 + Duration::from_millis(9)), vec![(1, Leave::Abandoned), (2, Leave::Expired)]);
    }
}
