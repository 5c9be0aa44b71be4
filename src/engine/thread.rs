//! The OS thread each model runs on (never the async runtime's workers), shared by both model kinds:
//! jobs arrive on a bounded channel, a panic fails one job and the thread lives on, and a heartbeat
//! says the thread is alive, both while it waits for work and around every job. A thread whose
//! heartbeat stops (a hung forward pass, a deadlock) is what `--engine-stall-timeout` detects.
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use super::EngineError;

/// How often an idle model thread beats.
const IDLE_BEAT: Duration = Duration::from_millis(500);

/// When a model thread last showed life.
#[derive(Debug, Clone)]
pub struct Heartbeat(Arc<AtomicU64>);

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Heartbeat {
    pub fn new() -> Self {
        let h = Self(Arc::new(AtomicU64::new(0)));
        h.beat();
        h
    }

    fn beat(&self) {
        self.0.store(epoch().elapsed().as_millis() as u64, Ordering::Release);
    }

    /// How long since the thread last beat.
    pub fn silence(&self) -> Duration {
        let last = Duration::from_millis(self.0.load(Ordering::Acquire));
        epoch().elapsed().saturating_sub(last)
    }
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

/// Starts `name`'s model thread running `work` for every job sent on the returned channel. The channel
/// holds two jobs: each batcher keeps at most one in flight, so one slot is all it uses, and the
/// second is headroom so that a bug there fails a job (the sender sees it full) instead of blocking.
pub fn spawn<J: Send + 'static>(
    name: &str,
    heart: Heartbeat,
    mut work: impl FnMut(J) + Send + 'static,
) -> std::io::Result<SyncSender<J>> {
    let (tx, rx): (SyncSender<J>, Receiver<J>) = sync_channel(2);
    std::thread::Builder::new().name(format!("engine-{name}")).spawn(move || {
        // A compute thread: subnormals flushed (see `models::kernels::cpu::flush_denormals`).
        crate::models::kernels::cpu::flush_denormals();
        loop {
            heart.beat();
            match rx.recv_timeout(IDLE_BEAT) {
                Ok(job) => {
                    work(job);
                    heart.beat();
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
    })?;
    Ok(tx)
}

/// Runs `f`, turning a panic (inside candle or a kernel) into this job's error.
pub fn guarded<T>(f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, EngineError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(EngineError::Panicked(panic_message(&p))))
}

pub(super) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Test-only fault: in debug builds, with `OMNIBUS_TEST_HANG_TOKENS=n`, a batch holding an input of
/// exactly `n` tokens hangs its model thread for ever (what a deadlocked kernel would do), so tests can
/// watch `--engine-stall-timeout` take the server out of service. Release builds have no such hook.
#[cfg(debug_assertions)]
pub fn test_fault(inputs: &[Vec<u32>]) {
    let Some(n) = std::env::var("OMNIBUS_TEST_HANG_TOKENS").ok().and_then(|v| v.parse::<usize>().ok()) else {
        return;
    };
    if inputs.iter().any(|i| i.len() == n) {
        tracing::warn!(tokens = n, "test fault: hanging this model thread");
        loop {
            std::thread::park();
        }
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn test_fault(_: &[Vec<u32>]) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_thread_beats_and_a_busy_one_falls_silent() {
        let heart = Heartbeat::new();
        let tx = spawn("heart", heart.clone(), |d: Duration| std::thread::sleep(d)).unwrap();
        std::thread::sleep(Duration::from_millis(1200));
        assert!(heart.silence() < Duration::from_millis(700), "idle: {:?}", heart.silence());
        tx.send(Duration::from_millis(1500)).unwrap();
        std::thread::sleep(Duration::from_millis(1200));
        assert!(heart.silence() >= Duration::from_millis(1000), "busy: {:?}", heart.silence());
        std::thread::sleep(Duration::from_millis(800));
        assert!(heart.silence() < Duration::from_millis(700), "after the job: {:?}", heart.silence());
    }
}
