//! The versions of one model name: the stable one new requests go to, an optional canary that takes a
//! fixed share of them, and retired ones that finish their in-flight requests before they are freed.
//! Plain data kept under the registry's lock. A request holds its version's `Arc` to the end (a
//! Generate stream holds it until its last token), so a retired version is freed, engine thread and
//! weights, when its last request ends: nothing is cut short by a swap.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

/// A loaded model, either kind: which version it is, and the work on its replicas.
pub trait Versioned {
    fn version(&self) -> u64;
    /// Requests queued over its replicas.
    fn waiting(&self) -> usize {
        0
    }
    /// Requests (or sequences) on its model threads now.
    fn running(&self) -> usize {
        0
    }
}

pub struct Canary<M> {
    pub model: Arc<M>,
    /// Share of the requests that name no version, in percent, 1 to 99.
    pub percent: u8,
}

/// What one version of a model is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    /// Takes every request that names no version (less the canary's share).
    Stable,
    /// Takes this share, in percent, of the requests that name no version.
    Canary(u8),
    /// Replaced or unloaded; still finishing requests that started on it.
    Draining,
}

pub struct Versions<M> {
    stable: Option<Arc<M>>,
    canary: Option<Canary<M>>,
    retired: Vec<(u64, Weak<M>)>,
    /// Requests routed so far: the canary's share is counted out exactly, not drawn at random, so any
    /// 100 consecutive requests give it `percent` of them.
    routed: AtomicU64,
}

impl<M: Versioned> Versions<M> {
    pub fn new(model: Arc<M>) -> Self {
        Self { stable: Some(model), canary: None, retired: Vec::new(), routed: AtomicU64::new(0) }
    }

    /// The version a request that names none goes to; `None` once the model is unloaded.
    pub fn route(&self) -> Option<Arc<M>> {
        if let Some(c) = &self.canary {
            let n = self.routed.fetch_add(1, Ordering::Relaxed);
            let p = c.percent as u64;
            // Request n goes to the canary when it crosses the next whole multiple of 100 in the
            // running total n * p: evenly spread, exactly p in every 100.
            if ((n + 1) * p) / 100 > (n * p) / 100 {
                return Some(c.model.clone());
            }
        }
        self.stable.clone()
    }

    /// A version by number, if it takes requests (stable or canary).
    pub fn get(&self, version: u64) -> Option<Arc<M>> {
        let canary = self.canary.as_ref().map(|c| &c.model);
        self.stable.iter().chain(canary).find(|m| m.version() == version).cloned()
    }

    pub fn stable(&self) -> Option<&Arc<M>> {
        self.stable.as_ref()
    }

    pub fn canary(&self) -> Option<&Canary<M>> {
        self.canary.as_ref()
    }

    fn retire(&mut self, model: Arc<M>) {
        self.retired.push((model.version(), Arc::downgrade(&model)));
    }

    /// `model` becomes the stable version; the old stable one and any canary retire (a canary of the
    /// same version is this very model and simply stops being a canary).
    pub fn promote(&mut self, model: Arc<M>) {
        if let Some(old) = self.stable.replace(model) {
            self.retire(old);
        }
        if let Some(c) = self.canary.take()
            && !Arc::ptr_eq(&c.model, self.stable.as_ref().expect("just set"))
        {
            self.retire(c.model);
        }
    }

    /// Makes the canary of `version` the stable version; false if there is none.
    pub fn promote_canary(&mut self, version: u64) -> bool {
        match self.canary.as_ref() {
            Some(c) if c.model.version() == version => {
                let model = c.model.clone();
                self.promote(model);
                true
            }
            _ => false,
        }
    }

    /// `model` takes `percent` of the requests that name no version; a previous canary retires.
    pub fn set_canary(&mut self, model: Arc<M>, percent: u8) {
        debug_assert!((1..=99).contains(&percent));
        if let Some(old) = self.canary.replace(Canary { model, percent }) {
            self.retire(old.model);
        }
    }

    /// Removes the canary of `version` (a rollback); false if there is none.
    pub fn drop_canary(&mut self, version: u64) -> bool {
        match self.canary.take() {
            Some(c) if c.model.version() == version => {
                self.retire(c.model);
                true
            }
            other => {
                self.canary = other;
                false
            }
        }
    }

    /// Every version retires: requests that name no version find no model.
    pub fn unload(&mut self) {
        if let Some(m) = self.stable.take() {
            self.retire(m);
        }
        if let Some(c) = self.canary.take() {
            self.retire(c.model);
        }
    }

    pub fn is_loaded(&self) -> bool {
        self.stable.is_some() || self.canary.is_some()
    }

    /// Every version still in memory and what it does, stable first; forgets retired versions whose
    /// last request has ended.
    pub fn states(&mut self) -> Vec<(u64, VersionState)> {
        self.retired.retain(|(_, w)| w.strong_count() > 0);
        let mut out = Vec::new();
        if let Some(m) = &self.stable {
            out.push((m.version(), VersionState::Stable));
        }
        if let Some(c) = &self.canary {
            out.push((c.model.version(), VersionState::Canary(c.percent)));
        }
        out.extend(self.retired.iter().map(|(v, _)| (*v, VersionState::Draining)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct M(u64);
    impl Versioned for M {
        fn version(&self) -> u64 {
            self.0
        }
    }

    fn routed(v: &Versions<M>, n: usize) -> Vec<u64> {
        (0..n).map(|_| v.route().expect("loaded").0).collect()
    }

    #[test]
    fn a_canary_gets_exactly_its_share_spread_out() {
        let mut v = Versions::new(Arc::new(M(1)));
        assert!(routed(&v, 10).iter().all(|&x| x == 1));
        v.set_canary(Arc::new(M(2)), 25);
        let r = routed(&v, 100);
        assert_eq!(r.iter().filter(|&&x| x == 2).count(), 25);
        // Spread, not bunched: every window of 4 has exactly one.
        assert!(r.chunks(4).all(|w| w.iter().filter(|&&x| x == 2).count() == 1), "{r:?}");
        v.set_canary(Arc::new(M(3)), 1);
        let r = routed(&v, 300);
        assert_eq!(r.iter().filter(|&&x| x == 3).count(), 3);
        assert!(!r.contains(&2), "the replaced canary takes no more requests");
    }

    #[test]
    fn a_swapped_out_version_drains_until_its_last_request_ends() {
        let mut v = Versions::new(Arc::new(M(1)));
        let in_flight = v.route().unwrap();
        v.promote(Arc::new(M(2)));
        assert_eq!(v.route().unwrap().0, 2, "new requests go to the new version at once");
        assert_eq!(v.states(), vec![(2, VersionState::Stable), (1, VersionState::Draining)]);
        assert_eq!(in_flight.0, 1, "the running request keeps its version");
        drop(in_flight);
        assert_eq!(v.states(), vec![(2, VersionState::Stable)], "freed with its last request");
    }

    #[test]
    fn canary_promotion_rollback_and_unload() {
        let mut v = Versions::new(Arc::new(M(1)));
        v.set_canary(Arc::new(M(2)), 50);
        assert_eq!(v.get(2).map(|m| m.0), Some(2));
        assert!(!v.promote_canary(3));
        assert!(v.promote_canary(2));
        assert_eq!(v.stable().unwrap().0, 2);
        assert!(v.canary().is_none());
        assert_eq!(v.states(), vec![(2, VersionState::Stable)], "version 1 had no request left");

        v.set_canary(Arc::new(M(3)), 10);
        assert!(!v.drop_canary(2));
        assert!(v.drop_canary(3));
        assert!(routed(&v, 50).iter().all(|&x| x == 2));

        v.set_canary(Arc::new(M(4)), 10);
        v.promote(Arc::new(M(5)));
        assert!(v.canary().is_none(), "a direct promotion ends the canary");
        assert!(v.get(4).is_none());

        v.unload();
        assert!(v.route().is_none());
        assert!(!v.is_loaded());
        assert!(v.states().is_empty());
    }
}
